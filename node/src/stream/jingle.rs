//! Jingle (XEP-0166) transport candidates for the node-to-node stream.
//!
//! The "content" Jingle negotiates here is the XML stream itself. Each side
//! sends, whenever a stream opens or its addresses change, a
//! `transport-info` listing where it can be reached, best first:
//!
//! ```xml
//! <jingle xmlns='urn:xmpp:jingle:1' action='transport-info' sid='SESSION-ID'>
//!   <content creator='initiator' name='stream'>
//!     <transport xmlns='urn:coterie:jingle:transport:0'>
//!       <candidate id='0' priority='300' addr='quic:10.0.0.2:7474'/>
//!       <candidate id='1' priority='290' addr='tcp:10.0.0.2:7474'/>
//!       <candidate id='2' priority='100' addr='onion:….onion:7474'/>
//!     </transport>
//!   </content>
//! </jingle>
//! ```
//!
//! The peer keeps the list (it replaces the last one) and prefers LAN
//! candidates over the onion: while the live stream runs over Tor it keeps
//! trying the LAN candidates, and a stream that opens on one takes the
//! XEP-0198 session over (`<resume/>` on the new stream is the switch; the
//! old stream is closed). When the LAN stream dies, the dialer falls back to
//! the onion candidate and resumes there. `docs/protocol.md` §7 is the
//! profile.

use minidom::Element;
use xmpp_parsers::jingle::{Action, Content, ContentId, Creator, Jingle, SessionId, Transport};

use transport::{Carrier, PeerAddr};

use crate::omemo::xml::nc;

/// The transport description's namespace.
pub const NS_TRANSPORT: &str = "urn:coterie:jingle:transport:0";
/// Jingle's namespace.
pub const NS_JINGLE: &str = "urn:xmpp:jingle:1";
/// The one content of a Coterie Jingle session: the stream.
pub const CONTENT: &str = "stream";
/// Most candidates taken from one `transport-info`.
pub const MAX_CANDIDATES: usize = 8;
/// Longest candidate address accepted.
const MAX_ADDR_LEN: usize = 100;

/// How much a carrier is preferred (higher first): the LAN before Tor.
pub fn priority(carrier: Carrier) -> u32 {
    match carrier {
        Carrier::Quic => 300,
        Carrier::Tcp => 290,
        Carrier::Memory => 280,
        Carrier::Onion => 100,
    }
}

/// Whether a stream over `new` should take over from one over `old`.
pub fn better(new: Carrier, old: Carrier) -> bool {
    rank(new) > rank(old)
}

/// LAN carriers share a rank: moving between TCP and QUIC is not worth a
/// switch; leaving Tor for the LAN is.
fn rank(c: Carrier) -> u8 {
    match c {
        Carrier::Onion => 0,
        Carrier::Tcp | Carrier::Quic | Carrier::Memory => 1,
    }
}

/// A `transport-info` for session `sid` offering `addrs`, sorted best first.
pub fn transport_info(sid: &str, addrs: &[PeerAddr]) -> Element {
    let mut sorted: Vec<&PeerAddr> = addrs.iter().collect();
    sorted.sort_by_key(|a| std::cmp::Reverse(priority(a.carrier())));
    let mut t = Element::builder("transport", NS_TRANSPORT);
    for (i, a) in sorted.iter().take(MAX_CANDIDATES).enumerate() {
        t = t.append(
            Element::builder("candidate", NS_TRANSPORT)
                .attr(nc("id"), i.to_string())
                .attr(nc("priority"), priority(a.carrier()).to_string())
                .attr(nc("addr"), a.to_string())
                .build(),
        );
    }
    let content = Content::new(Creator::Initiator, ContentId(CONTENT.into()))
        .with_transport(Transport::Unknown(t.build()));
    Jingle::new(Action::TransportInfo, SessionId(sid.into()))
        .add_content(content)
        .into()
}

/// Why a Jingle element was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JingleError {
    /// Not a Jingle element XEP-0166 accepts.
    #[error("malformed jingle: {0}")]
    Malformed(String),
    /// Another action than `transport-info`.
    #[error("unsupported jingle action")]
    Action,
    /// A session id that is not this stream's.
    #[error("jingle for another session")]
    Session,
}

/// The candidate addresses of a peer's `transport-info` for session `sid`,
/// best first. Candidates that do not parse are skipped, at most
/// [`MAX_CANDIDATES`] are taken.
pub fn parse_transport_info(el: Element, sid: &str) -> Result<Vec<PeerAddr>, JingleError> {
    let j = Jingle::try_from(el).map_err(|e| JingleError::Malformed(e.to_string()))?;
    if j.action != Action::TransportInfo {
        return Err(JingleError::Action);
    }
    if j.sid.0 != sid {
        return Err(JingleError::Session);
    }
    let mut out: Vec<(u32, PeerAddr)> = Vec::new();
    for c in j.contents.iter().filter(|c| c.name.0 == CONTENT) {
        let Some(Transport::Unknown(t)) = &c.transport else {
            continue;
        };
        if !t.is("transport", NS_TRANSPORT) {
            continue;
        }
        for cand in t.children().filter(|c| c.is("candidate", NS_TRANSPORT)) {
            if out.len() >= MAX_CANDIDATES {
                break;
            }
            let Some(addr) = cand.attr("addr").filter(|a| a.len() <= MAX_ADDR_LEN) else {
                continue;
            };
            let Ok(a) = addr.parse::<PeerAddr>() else {
                continue;
            };
            let p = cand
                .attr("priority")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if !out.iter().any(|(_, x)| *x == a) {
                out.push((p, a));
            }
        }
    }
    out.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
    Ok(out.into_iter().map(|(_, a)| a).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Vec<PeerAddr> {
        let key = transport::SecretKey::from_seed(&[3; 32]).peer_id();
        vec![
            PeerAddr::Onion(key, 7474),
            "tcp:10.0.0.2:7474".parse().expect("tcp"),
            "quic:10.0.0.2:7474".parse().expect("quic"),
        ]
    }

    #[test]
    fn candidates_round_trip_best_first() {
        let el = transport_info("s1", &addrs());
        let text = String::from(&el);
        assert!(text.contains("action='transport-info'"), "{text}");
        assert!(text.contains(NS_TRANSPORT), "{text}");
        let got = parse_transport_info(el, "s1").expect("parse");
        let carriers: Vec<Carrier> = got.iter().map(PeerAddr::carrier).collect();
        assert_eq!(carriers, [Carrier::Quic, Carrier::Tcp, Carrier::Onion]);
    }

    #[test]
    fn the_lan_beats_tor_and_nothing_else_is_a_switch() {
        assert!(better(Carrier::Tcp, Carrier::Onion));
        assert!(better(Carrier::Quic, Carrier::Onion));
        assert!(!better(Carrier::Onion, Carrier::Tcp));
        assert!(!better(Carrier::Quic, Carrier::Tcp));
        assert!(!better(Carrier::Onion, Carrier::Onion));
    }

    #[test]
    fn hostile_transport_info_is_refused_or_bounded() {
        let other = transport_info("s2", &addrs());
        assert_eq!(parse_transport_info(other, "s1"), Err(JingleError::Session));
        let initiate: Element =
            "<jingle xmlns='urn:xmpp:jingle:1' action='session-initiate' sid='s1'/>"
                .parse()
                .expect("xml");
        assert_eq!(
            parse_transport_info(initiate, "s1"),
            Err(JingleError::Action)
        );
        let junk: Element = "<jingle xmlns='urn:xmpp:jingle:1' action='no-such' sid='s1'/>"
            .parse()
            .expect("xml");
        assert!(matches!(
            parse_transport_info(junk, "s1"),
            Err(JingleError::Malformed(_))
        ));
        // Many candidates, bad and duplicate ones among them.
        let mut t = String::from("<transport xmlns='urn:coterie:jingle:transport:0'>");
        t.push_str("<candidate addr='udp:1.2.3.4:5' priority='999'/>");
        t.push_str(&format!(
            "<candidate addr='tcp:{}' priority='5'/>",
            "9".repeat(200)
        ));
        for i in 0..20 {
            t.push_str(&format!(
                "<candidate addr='tcp:10.0.0.{}:7474' priority='{i}'/><candidate addr='tcp:10.0.0.{}:7474'/>",
                i % 3,
                i % 3
            ));
        }
        t.push_str("</transport>");
        let el: Element = format!(
            "<jingle xmlns='urn:xmpp:jingle:1' action='transport-info' sid='s1'><content creator='initiator' name='stream'>{t}</content></jingle>"
        )
        .parse()
        .expect("xml");
        let got = parse_transport_info(el, "s1").expect("parse");
        assert_eq!(got.len(), 3, "{got:?}");
    }
}
