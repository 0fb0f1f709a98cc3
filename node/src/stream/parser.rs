//! Incremental parser for one XMPP stream: bytes in, stream header and
//! top-level elements out. No I/O, no clock.
//!
//! Built on rxml, which refuses DTDs, entity declarations, processing
//! instructions and comments, and checks UTF-8. On top of that the parser
//! enforces Coterie's limits: bytes per top-level element, nesting depth,
//! and what may appear between elements (whitespace only: that is where
//! padding goes).

use std::collections::BTreeMap;

use minidom::Element;
use minidom::tree_builder::TreeBuilder;
use rxml::{Parse, RawEvent, RawParser};
use xmpp_parsers::stream_error::DefinedCondition;

/// The XMPP streams namespace.
pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
/// The client namespace used as the default namespace of Coterie streams.
pub const NS_CLIENT: &str = "jabber:client";

/// Limits on what a peer may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum bytes of one top-level element (stanza or nonza).
    pub max_stanza_bytes: usize,
    /// Maximum element nesting below the stream root.
    pub max_depth: usize,
    /// Maximum bytes of the stream header.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 64 * 1024,
            max_depth: 16,
            max_header_bytes: 2048,
        }
    }
}

/// The opening `<stream:stream>` tag's attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// `from`
    pub from: Option<String>,
    /// `to`
    pub to: Option<String>,
    /// `version`
    pub version: Option<String>,
    /// `id`
    pub id: Option<String>,
}

/// What the parser produced.
#[derive(Debug, Clone, PartialEq)]
pub enum ParseEvent {
    /// The stream header.
    Header(Header),
    /// A complete top-level element.
    Element(Element),
    /// `</stream:stream>`.
    End,
}

/// Why the peer's stream is unacceptable; maps to an RFC 6120 stream error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{condition:?}: {detail}")]
pub struct StreamFault {
    /// The stream error condition to send.
    pub condition: Condition,
    /// A short description for the log (never contains peer data).
    pub detail: &'static str,
}

/// The subset of stream error conditions Coterie sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Malformed XML or bad UTF-8.
    NotWellFormed,
    /// DTD, entity, comment or processing instruction.
    RestrictedXml,
    /// Over a size, depth or rate limit.
    PolicyViolation,
    /// Wrong root element or namespace.
    InvalidNamespace,
    /// A top-level element we do not understand or that is invalid.
    UnsupportedStanzaType,
    /// Bad header attributes.
    InvalidFrom,
    /// Internal failure on our side.
    InternalServerError,
}

impl Condition {
    /// The xmpp-parsers condition.
    pub fn defined(&self) -> DefinedCondition {
        match self {
            Condition::NotWellFormed => DefinedCondition::NotWellFormed,
            Condition::RestrictedXml => DefinedCondition::RestrictedXml,
            Condition::PolicyViolation => DefinedCondition::PolicyViolation,
            Condition::InvalidNamespace => DefinedCondition::InvalidNamespace,
            Condition::UnsupportedStanzaType => DefinedCondition::UnsupportedStanzaType,
            Condition::InvalidFrom => DefinedCondition::InvalidFrom,
            Condition::InternalServerError => DefinedCondition::InternalServerError,
        }
    }
}

fn fault(condition: Condition, detail: &'static str) -> StreamFault {
    StreamFault { condition, detail }
}

fn map_rxml(e: &rxml::Error) -> StreamFault {
    use rxml::Error as E;
    match e {
        E::RestrictedXml(_) | E::UndeclaredEntity => {
            fault(Condition::RestrictedXml, "restricted XML feature")
        }
        // rxml has no DTD support at all: `<!DOCTYPE` and `<!ENTITY` fail as a
        // malformed `<!` section, which is exactly a restricted-XML case.
        E::InvalidSyntax(s) if s.contains("cdata or comment") => {
            fault(Condition::RestrictedXml, "DTD, comment or CDATA section")
        }
        E::InvalidUtf8Byte(_) | E::InvalidChar(..) => {
            fault(Condition::NotWellFormed, "invalid UTF-8 or character")
        }
        E::UndeclaredNamespacePrefix(_) | E::ReservedNamespacePrefix | E::ReservedNamespaceName => {
            fault(Condition::InvalidNamespace, "namespace error")
        }
        _ => fault(Condition::NotWellFormed, "XML not well-formed"),
    }
}

#[derive(Debug)]
enum State {
    /// Before the root element.
    Prolog,
    /// Inside `<stream:stream ...` collecting attributes.
    RootHead {
        prefix: Option<String>,
        local: String,
        attrs: Vec<(Option<String>, String, String)>,
    },
    /// Between top-level elements.
    Open,
    /// Inside a top-level element.
    Element,
    /// After `</stream:stream>` or a fault.
    Done,
}

/// The incremental stream parser.
pub struct StreamParser {
    raw: RawParser,
    limits: Limits,
    state: State,
    /// Namespace declarations on the root, for the element builders.
    root_prefixes: BTreeMap<Option<String>, String>,
    builder: Option<TreeBuilder>,
    depth: usize,
    element_bytes: usize,
    header_bytes: usize,
}

impl std::fmt::Debug for StreamParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamParser({:?}, depth {})", self.state, self.depth)
    }
}

impl StreamParser {
    /// A parser expecting a stream header.
    pub fn new(limits: Limits) -> Self {
        let opts = rxml::Options {
            max_token_length: 8192,
            ..Default::default()
        };
        StreamParser {
            raw: <RawParser as rxml::WithOptions>::with_options(opts),
            limits,
            state: State::Prolog,
            root_prefixes: BTreeMap::new(),
            builder: None,
            depth: 0,
            element_bytes: 0,
            header_bytes: 0,
        }
    }

    /// Feeds bytes; returns what completed. After an error the parser stays failed.
    pub fn feed(
        &mut self,
        mut data: &[u8],
    ) -> Result<Vec<ParseEvent>, (Vec<ParseEvent>, StreamFault)> {
        let mut out = Vec::new();
        if matches!(self.state, State::Done) {
            if data.iter().all(u8::is_ascii_whitespace) {
                return Ok(out);
            }
            return Err((
                out,
                fault(Condition::NotWellFormed, "data after end of stream"),
            ));
        }
        loop {
            match self.raw.parse(&mut data, false) {
                Ok(Some(ev)) => {
                    if let Err(f) = self.on_event(ev, &mut out) {
                        self.state = State::Done;
                        return Err((out, f));
                    }
                    if matches!(self.state, State::Done) {
                        return Ok(out);
                    }
                }
                Ok(None) => return Ok(out),
                Err(rxml::error::EndOrError::NeedMoreData) => return Ok(out),
                Err(rxml::error::EndOrError::Error(e)) => {
                    self.state = State::Done;
                    return Err((out, map_rxml(&e)));
                }
            }
        }
    }

    fn on_event(&mut self, ev: RawEvent, out: &mut Vec<ParseEvent>) -> Result<(), StreamFault> {
        let len = ev_len(&ev);
        match &mut self.state {
            State::Prolog => {
                self.header_bytes += len;
                if self.header_bytes > self.limits.max_header_bytes {
                    return Err(fault(Condition::PolicyViolation, "stream header too large"));
                }
                match ev {
                    RawEvent::XmlDeclaration(..) => Ok(()),
                    RawEvent::ElementHeadOpen(_, (prefix, local)) => {
                        self.state = State::RootHead {
                            prefix: prefix.map(|p| p.as_str().to_owned()),
                            local: local.as_str().to_owned(),
                            attrs: Vec::new(),
                        };
                        Ok(())
                    }
                    _ => Err(fault(Condition::NotWellFormed, "expected stream header")),
                }
            }
            State::RootHead {
                prefix,
                local,
                attrs,
            } => {
                self.header_bytes += len;
                if self.header_bytes > self.limits.max_header_bytes {
                    return Err(fault(Condition::PolicyViolation, "stream header too large"));
                }
                match ev {
                    RawEvent::Attribute(_, (p, n), v) => {
                        if attrs.len() >= 16 {
                            return Err(fault(
                                Condition::PolicyViolation,
                                "too many header attributes",
                            ));
                        }
                        attrs.push((
                            p.map(|p| p.as_str().to_owned()),
                            n.as_str().to_owned(),
                            v.to_string(),
                        ));
                        Ok(())
                    }
                    RawEvent::ElementHeadClose(_) => {
                        let (prefix, local, attrs) =
                            (prefix.take(), std::mem::take(local), std::mem::take(attrs));
                        let header = self.finish_header(prefix, &local, attrs)?;
                        self.state = State::Open;
                        out.push(ParseEvent::Header(header));
                        Ok(())
                    }
                    _ => Err(fault(Condition::NotWellFormed, "bad stream header")),
                }
            }
            State::Open => match ev {
                RawEvent::Text(_, t) => {
                    if t.as_str().bytes().all(|b| b.is_ascii_whitespace()) {
                        Ok(())
                    } else {
                        Err(fault(Condition::NotWellFormed, "text between stanzas"))
                    }
                }
                RawEvent::ElementFoot(_) => {
                    self.state = State::Done;
                    out.push(ParseEvent::End);
                    Ok(())
                }
                RawEvent::ElementHeadOpen(..) => {
                    let prefixes: BTreeMap<Option<String>, String> = self.root_prefixes.clone();
                    let mut b = TreeBuilder::new().with_prefixes_stack(vec![prefixes.into()]);
                    self.depth = 1;
                    self.element_bytes = len;
                    b.process_event(ev)
                        .map_err(|_| fault(Condition::InvalidNamespace, "namespace error"))?;
                    self.builder = Some(b);
                    self.state = State::Element;
                    Ok(())
                }
                _ => Err(fault(
                    Condition::NotWellFormed,
                    "unexpected XML at stream level",
                )),
            },
            State::Element => {
                self.element_bytes += len;
                if self.element_bytes > self.limits.max_stanza_bytes {
                    return Err(fault(Condition::PolicyViolation, "stanza too large"));
                }
                let closes = matches!(ev, RawEvent::ElementFoot(_));
                if matches!(ev, RawEvent::ElementHeadOpen(..)) {
                    self.depth += 1;
                    if self.depth > self.limits.max_depth {
                        return Err(fault(
                            Condition::PolicyViolation,
                            "stanza nested too deeply",
                        ));
                    }
                }
                let Some(b) = self.builder.as_mut() else {
                    return Err(fault(Condition::InternalServerError, "parser state"));
                };
                b.process_event(ev)
                    .map_err(|_| fault(Condition::InvalidNamespace, "namespace error"))?;
                if closes {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let el = self.builder.take().and_then(|mut b| b.root.take());
                        let el = el.ok_or(fault(Condition::InternalServerError, "parser state"))?;
                        self.state = State::Open;
                        out.push(ParseEvent::Element(el));
                    }
                }
                Ok(())
            }
            State::Done => Err(fault(Condition::NotWellFormed, "data after end of stream")),
        }
    }

    fn finish_header(
        &mut self,
        prefix: Option<String>,
        local: &str,
        attrs: Vec<(Option<String>, String, String)>,
    ) -> Result<Header, StreamFault> {
        let mut h = Header::default();
        let mut prefixes = BTreeMap::new();
        for (p, n, v) in attrs {
            match (p.as_deref(), n.as_str()) {
                (None, "xmlns") => {
                    prefixes.insert(None, v);
                }
                (Some("xmlns"), pfx) => {
                    prefixes.insert(Some(pfx.to_owned()), v);
                }
                (None, "from") => h.from = Some(v),
                (None, "to") => h.to = Some(v),
                (None, "version") => h.version = Some(v),
                (None, "id") => h.id = Some(v),
                _ => {}
            }
        }
        if local != "stream" || prefixes.get(&prefix).map(String::as_str) != Some(NS_STREAMS) {
            return Err(fault(
                Condition::InvalidNamespace,
                "root is not stream:stream",
            ));
        }
        if prefixes.get(&None).map(String::as_str) != Some(NS_CLIENT) {
            return Err(fault(
                Condition::InvalidNamespace,
                "default namespace is not jabber:client",
            ));
        }
        self.root_prefixes = prefixes;
        Ok(h)
    }
}

fn ev_len(ev: &RawEvent) -> usize {
    match ev {
        RawEvent::XmlDeclaration(m, _)
        | RawEvent::ElementHeadOpen(m, _)
        | RawEvent::Attribute(m, _, _)
        | RawEvent::ElementHeadClose(m)
        | RawEvent::ElementFoot(m)
        | RawEvent::Text(m, _) => m.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HDR: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0' from='a.onion'>";

    fn parse_all(chunks: &[&[u8]]) -> Result<Vec<ParseEvent>, StreamFault> {
        let mut p = StreamParser::new(Limits::default());
        let mut all = Vec::new();
        for c in chunks {
            match p.feed(c) {
                Ok(evs) => all.extend(evs),
                Err((evs, f)) => {
                    all.extend(evs);
                    let _ = all;
                    return Err(f);
                }
            }
        }
        Ok(all)
    }

    #[test]
    fn header_stanzas_and_end() {
        let doc = format!(
            "{HDR}  <message id='1'><body>hi</body></message>\n\n   <r xmlns='urn:xmpp:sm:3'/></stream:stream>"
        );
        let evs = parse_all(&[doc.as_bytes()]).expect("parses");
        assert!(
            matches!(&evs[0], ParseEvent::Header(h) if h.from.as_deref() == Some("a.onion") && h.version.as_deref() == Some("1.0"))
        );
        let ParseEvent::Element(m) = &evs[1] else {
            panic!("expected message")
        };
        assert_eq!((m.name(), m.ns().as_str()), ("message", NS_CLIENT));
        let ParseEvent::Element(r) = &evs[2] else {
            panic!("expected r")
        };
        assert_eq!(r.ns(), "urn:xmpp:sm:3");
        assert_eq!(evs[3], ParseEvent::End);
    }

    #[test]
    fn byte_at_a_time_gives_the_same_result() {
        let doc = format!("{HDR}<message id='1'><body>h\u{e9}llo</body></message>");
        let whole = parse_all(&[doc.as_bytes()]).expect("whole");
        let chunks: Vec<&[u8]> = doc.as_bytes().chunks(1).collect();
        assert_eq!(parse_all(&chunks).expect("bytes"), whole);
    }

    #[test]
    fn dtd_is_restricted_xml() {
        let doc = "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><stream:stream/>";
        assert_eq!(
            parse_all(&[doc.as_bytes()]).err().map(|f| f.condition),
            Some(Condition::RestrictedXml)
        );
    }

    #[test]
    fn entity_reference_is_rejected() {
        let doc = format!("{HDR}<message><body>&lol;</body></message>");
        assert_eq!(
            parse_all(&[doc.as_bytes()]).err().map(|f| f.condition),
            Some(Condition::RestrictedXml)
        );
    }

    #[test]
    fn invalid_utf8_is_not_well_formed() {
        let mut doc = format!("{HDR}<message><body>").into_bytes();
        doc.extend_from_slice(&[0xff, 0xfe]);
        doc.extend_from_slice(b"</body>");
        assert_eq!(
            parse_all(&[&doc]).err().map(|f| f.condition),
            Some(Condition::NotWellFormed)
        );
    }

    #[test]
    fn huge_stanza_is_a_policy_violation_without_buffering_it() {
        let mut p = StreamParser::new(Limits::default());
        p.feed(HDR.as_bytes()).expect("header");
        p.feed(b"<message><body>").expect("open");
        let chunk = vec![b'a'; 8192];
        let mut failed = None;
        for _ in 0..100 {
            if let Err((_, f)) = p.feed(&chunk) {
                failed = Some(f.condition);
                break;
            }
        }
        assert_eq!(failed, Some(Condition::PolicyViolation));
    }

    #[test]
    fn deep_nesting_is_a_policy_violation() {
        let doc = format!("{HDR}<message>{}", "<x>".repeat(50));
        assert_eq!(
            parse_all(&[doc.as_bytes()]).err().map(|f| f.condition),
            Some(Condition::PolicyViolation)
        );
    }

    #[test]
    fn wrong_root_or_namespace_is_refused() {
        let doc =
            "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>";
        assert_eq!(
            parse_all(&[doc.as_bytes()]).err().map(|f| f.condition),
            Some(Condition::InvalidNamespace)
        );
        let doc = "<html xmlns='jabber:client'>";
        assert_eq!(
            parse_all(&[doc.as_bytes()]).err().map(|f| f.condition),
            Some(Condition::InvalidNamespace)
        );
    }

    #[test]
    fn text_between_stanzas_is_refused_but_whitespace_is_padding() {
        let doc = format!("{HDR}   \n\t  hello<message/>");
        assert_eq!(
            parse_all(&[doc.as_bytes()]).err().map(|f| f.condition),
            Some(Condition::NotWellFormed)
        );
    }

    #[test]
    fn comments_and_processing_instructions_are_refused() {
        for bad in ["<!-- c -->", "<?pi x?>"] {
            let doc = format!("{HDR}{bad}");
            assert!(parse_all(&[doc.as_bytes()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn stanzas_before_a_fault_are_still_returned() {
        let mut p = StreamParser::new(Limits::default());
        let doc = format!("{HDR}<message id='1'/><message id='2'/>\u{1}");
        let Err((evs, f)) = p.feed(doc.as_bytes()) else {
            panic!("should fail")
        };
        assert_eq!(evs.len(), 3);
        assert_eq!(f.condition, Condition::NotWellFormed);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut p = StreamParser::new(Limits::default());
            let _ = p.feed(HDR.as_bytes());
            let _ = p.feed(&data);
        }

        #[test]
        fn arbitrary_split_points_do_not_change_the_result(split in 0usize..200) {
            let doc = format!("{HDR}<message id='x'><body>abc &amp; d\u{e9}f</body></message>");
            let b = doc.as_bytes();
            let split = split.min(b.len());
            let whole = parse_all(&[b]);
            let parts = parse_all(&[&b[..split], &b[split..]]);
            prop_assert_eq!(whole, parts);
        }
    }
}
