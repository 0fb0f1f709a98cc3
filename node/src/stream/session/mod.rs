//! One XMPP stream between two Coterie nodes, as a state machine.
//!
//! The session between two contacts is a single XEP-0198 session that never
//! ends: both sides persist their counters, so every connection *resumes* it.
//! The handshake on each connection is:
//!
//! ```text
//! initiator                                   responder
//!   <stream:stream from=I to=R version=1.0> ──▶
//!                       ◀── <stream:stream from=R to=I version=1.0 id=…>
//!                       ◀── <stream:features><sm xmlns='urn:xmpp:sm:3'/></…>
//!   <resume h=Hi previd=S/>                  ──▶
//!                       ◀── <resumed h=Hr previd=S/>
//!   … stanzas, <a h=…/>, <r/> both ways …
//! ```
//!
//! `h` counts stanzas (message, iq, presence) *durably handled*: the driver
//! stores a batch, then calls [`Session::persisted`], and only then is an
//! `<a/>` sent. After `<resume/>`/`<resumed/>` each side retransmits every
//! stanza above the other's `h`, so across disconnects and restarts each
//! stanza is handled exactly once, in order.
//!
//! No I/O, no clock: bytes and `now` go in, [`Event`]s and padded write
//! units come out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use minidom::Element;
use xmpp_parsers::message::{Lang, Message, MessageType};
use xmpp_parsers::receipts::{Received, Request};
use xmpp_parsers::sm;

use crate::store::{Incoming, OutStanza};
use crate::stream::padding::Padding;
use crate::stream::parser::{
    Condition, Limits, NS_CLIENT, NS_STREAMS, ParseEvent, StreamFault, StreamParser,
};

/// XEP-0198 namespace.
pub const NS_SM: &str = "urn:xmpp:sm:3";
/// XEP-0184 namespace.
pub const NS_RECEIPTS: &str = "urn:xmpp:receipts";
/// Coterie's own namespace for address announcements.
pub use crate::stream::jingle::NS_JINGLE;

/// Which side opened the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We dialled.
    Initiator,
    /// They dialled.
    Responder,
}

/// How fast a peer may send stanzas before we stop reading (back-pressure).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained stanzas per second.
    pub per_second: f64,
    /// Burst size.
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 10_000.0,
            burst: 20_000.0,
        }
    }
}

/// Everything a session needs to start.
#[derive(Clone, Debug)]
pub struct Params {
    /// Our side.
    pub role: Role,
    /// Our stream address (onion domain).
    pub local: String,
    /// Their stream address.
    pub peer: String,
    /// The pairwise session id (`previd`).
    pub session_id: String,
    /// Stanzas from them we have durably handled.
    pub in_h: u64,
    /// Our stanzas they have acknowledged.
    pub out_acked: u64,
    /// Input limits.
    pub limits: Limits,
    /// Input rate.
    pub rate: RateLimit,
    /// How our units are padded.
    pub padding: Padding,
}

/// What the driver must act on.
#[derive(Debug, Clone)]
pub enum Event {
    /// The stream is resumed; they have handled our stanzas up to `peer_h`.
    /// Retransmit everything above it.
    Resumed {
        /// Their `h`.
        peer_h: u64,
    },
    /// Stanzas to store, in order. Call [`Session::persisted`] afterwards.
    Stanzas(Vec<Incoming>),
    /// They acknowledged our stanzas up to `h`.
    Acked(u64),
    /// They announced where they can be reached (a Jingle
    /// `transport-info`), best first.
    Addresses(Vec<transport::PeerAddr>),
    /// A PEP notification (OMEMO device lists and bundles).
    Pep(Element),
    /// They closed the stream.
    Closed,
    /// They sent a stream error (condition name only).
    PeerError(String),
    /// Their input broke the rules; a stream error was queued and the stream is closing.
    Fault(StreamFault),
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    AwaitHeader,
    AwaitFeatures,
    AwaitResume,
    AwaitResumed,
    Open,
    Closed,
}

/// The session state machine.
#[derive(Debug)]
pub struct Session {
    p: Params,
    phase: Phase,
    parser: StreamParser,
    transmit: VecDeque<Vec<u8>>,
    /// Stanzas counted (handed to the driver), persisted or not.
    counted_h: u64,
    /// Stanzas the driver confirmed as stored.
    durable_h: u64,
    out_acked: u64,
    /// Our stanzas the peer can have counted: its `h` at resumption plus
    /// what we sent since. An ack above this is a protocol violation.
    out_sent: u64,
    tokens: f64,
    last_refill: Instant,
    throttle_until: Option<Instant>,
    /// Bytes of an incomplete UTF-8/XML write are not our concern: the parser buffers.
    sent_close: bool,
}

/// Reconstructs a 64-bit counter from its 32-bit wire form, given a value it
/// cannot be below.
pub fn unwrap_h(floor: u64, wire: u32) -> u64 {
    floor + u64::from(wire.wrapping_sub(floor as u32))
}

/// XEP-0334 hints.
pub const NS_HINTS: &str = "urn:xmpp:hints";
/// XEP-0380 explicit message encryption.
pub const NS_EME: &str = "urn:xmpp:eme:0";

/// An OMEMO message stanza: the `<encrypted/>` element (XML from the
/// store), a receipt request for chats, a storage hint (servers do not
/// archive a message with only `<encrypted/>`), and XEP-0380's marker.
pub fn encode_encrypted(id: &str, encrypted_xml: &str, chat: bool) -> Option<Vec<u8>> {
    write_el(&Element::from(encrypted_message(id, encrypted_xml, chat)?))
}

/// The message carrying an OMEMO `<encrypted/>` element (a chat asks for
/// a receipt; a key transport does not), with the storage hint and the
/// XEP-0380 marker; `None` if the stored element does not parse.
pub fn encrypted_message(id: &str, encrypted_xml: &str, chat: bool) -> Option<Message> {
    let enc: Element = encrypted_xml.parse().ok()?;
    let ns = enc.ns();
    if !is_xml_text(id) {
        return None;
    }
    let mut m = Message::new(None);
    m.type_ = MessageType::Chat;
    m.id = Some(xmpp_parsers::message::Id(id.to_string()));
    m.payloads.push(enc);
    if chat {
        m.payloads.push(Element::from(Request));
    }
    m.payloads.push(Element::builder("store", NS_HINTS).build());
    let name = rxml::NcName::try_from("namespace").ok()?;
    m.payloads.push(
        Element::builder("encryption", NS_EME)
            .attr(name, ns)
            .build(),
    );
    Some(m)
}

/// A delivery receipt (XEP-0184) for their message `of`.
pub fn receipt_message(id: &str, of: &str) -> Message {
    let mut m = Message::new(None);
    m.id = Some(xmpp_parsers::message::Id(id.to_string()));
    m.payloads
        .push(Element::from(Received { id: of.to_string() }));
    m
}

/// Serializes an element. Callers make sure its text is XML-safe (see
/// [`is_xml_text`]): minidom panics on text that is not.
fn write_el(el: &Element) -> Option<Vec<u8>> {
    let mut v = Vec::with_capacity(256);
    el.write_to(&mut v).ok().map(|()| v)
}

/// Whether `text` can travel in XML 1.0 character data (RFC 6120 §11.1).
pub fn is_xml_text(text: &str) -> bool {
    text.chars().all(|c| matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..))
}

/// The chat stanza for `body`, as it goes on the wire before padding; `None`
/// if the body cannot be carried in XML.
pub fn encode_chat(id: &str, body: &str) -> Option<Vec<u8>> {
    // minidom panics on text XML cannot carry: check first.
    if !is_xml_text(body) || !is_xml_text(id) {
        return None;
    }
    let mut m = Message::new(None);
    m.type_ = MessageType::Chat;
    m.id = Some(xmpp_parsers::message::Id(id.to_string()));
    m.bodies.insert(Lang::default(), body.to_string());
    m.payloads.push(Element::from(Request));
    write_el(&Element::from(m))
}

impl Session {
    /// Starts a session; an initiator queues its stream header at once.
    pub fn new(p: Params, now: Instant) -> Self {
        let mut s = Session {
            phase: Phase::AwaitHeader,
            parser: StreamParser::new(p.limits),
            transmit: VecDeque::new(),
            counted_h: p.in_h,
            durable_h: p.in_h,
            out_acked: p.out_acked,
            out_sent: p.out_acked,
            tokens: p.rate.burst,
            last_refill: now,
            throttle_until: None,
            sent_close: false,
            p,
        };
        if s.p.role == Role::Initiator {
            s.queue_header(None);
        }
        s
    }

    fn queue(&mut self, mut unit: Vec<u8>) {
        self.p.padding.pad(&mut unit);
        self.transmit.push_back(unit);
    }

    fn queue_header(&mut self, id: Option<&str>) {
        let id = id.map(|i| format!(" id='{i}'")).unwrap_or_default();
        let h = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAMS}' from='{}' to='{}' version='1.0'{id}>",
            self.p.local, self.p.peer
        );
        self.queue(h.into_bytes());
    }

    /// Whether stanzas may be sent now.
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Whether the stream has ended (either side).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The next padded unit to write, if any. Write each unit on its own.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// When to read again, if the peer exceeded its rate.
    pub fn throttle_until(&self) -> Option<Instant> {
        self.throttle_until
    }

    /// The stream `h` we have durably handled.
    pub fn durable_h(&self) -> u64 {
        self.durable_h
    }

    /// Feeds bytes from the peer.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        if self.phase == Phase::Closed {
            return events;
        }
        let (parsed, fault) = match self.parser.feed(data) {
            Ok(p) => (p, None),
            Err((p, f)) => (p, Some(f)),
        };
        let mut batch = Vec::new();
        for ev in parsed {
            if let Err(f) = self.on_parse_event(ev, now, &mut batch, &mut events) {
                self.flush_batch(&mut batch, &mut events);
                self.fail(f, &mut events);
                return events;
            }
            if self.phase == Phase::Closed {
                break;
            }
        }
        self.flush_batch(&mut batch, &mut events);
        if let Some(f) = fault {
            self.fail(f, &mut events);
        }
        events
    }

    fn flush_batch(&mut self, batch: &mut Vec<Incoming>, events: &mut Vec<Event>) {
        if !batch.is_empty() {
            events.push(Event::Stanzas(std::mem::take(batch)));
        }
    }

    fn fail(&mut self, f: StreamFault, events: &mut Vec<Event>) {
        let err = xmpp_parsers::stream_error::StreamError {
            condition: f.condition.defined(),
            texts: Default::default(),
            application_specific: vec![],
        };
        let mut unit = xso::to_vec(&err).unwrap_or_default();
        unit.extend_from_slice(b"</stream:stream>");
        if self.phase == Phase::AwaitHeader && self.p.role == Role::Responder {
            // RFC 6120 §4.9.1.1: open a stream before sending the error.
            self.queue_header(None);
        }
        self.queue(unit);
        self.sent_close = true;
        self.phase = Phase::Closed;
        events.push(Event::Fault(f));
    }

    fn on_parse_event(
        &mut self,
        ev: ParseEvent,
        now: Instant,
        batch: &mut Vec<Incoming>,
        events: &mut Vec<Event>,
    ) -> Result<(), StreamFault> {
        match ev {
            ParseEvent::Header(h) => {
                if self.phase != Phase::AwaitHeader {
                    return Err(StreamFault {
                        condition: Condition::NotWellFormed,
                        detail: "second header",
                    });
                }
                if h.version.as_deref() != Some("1.0") {
                    return Err(StreamFault {
                        condition: Condition::PolicyViolation,
                        detail: "stream version must be 1.0",
                    });
                }
                match self.p.role {
                    Role::Responder => {
                        let id = self.p.session_id.clone();
                        self.queue_header(Some(&id));
                        self.queue(
                            format!("<stream:features><sm xmlns='{NS_SM}'/></stream:features>")
                                .into_bytes(),
                        );
                        self.phase = Phase::AwaitResume;
                    }
                    Role::Initiator => self.phase = Phase::AwaitFeatures,
                }
                Ok(())
            }
            ParseEvent::End => {
                if !self.sent_close {
                    self.queue(b"</stream:stream>".to_vec());
                    self.sent_close = true;
                }
                self.phase = Phase::Closed;
                // Stanzas that came before the close are stored first.
                if !batch.is_empty() {
                    events.push(Event::Stanzas(std::mem::take(batch)));
                }
                events.push(Event::Closed);
                Ok(())
            }
            ParseEvent::Element(el) => self.on_element(el, now, batch, events),
        }
    }

    fn on_element(
        &mut self,
        el: Element,
        now: Instant,
        batch: &mut Vec<Incoming>,
        events: &mut Vec<Event>,
    ) -> Result<(), StreamFault> {
        let unexpected = StreamFault {
            condition: Condition::UnsupportedStanzaType,
            detail: "unexpected element",
        };
        let ns = el.ns();
        match (self.phase_ref(), ns.as_str(), el.name()) {
            (_, NS_STREAMS, "error") => {
                let cond = el
                    .children()
                    .next()
                    .map(|c| c.name().to_owned())
                    .unwrap_or_default();
                let cond: String = cond
                    .chars()
                    .filter(|c| c.is_ascii_lowercase() || *c == '-')
                    .take(40)
                    .collect();
                self.phase = Phase::Closed;
                if !batch.is_empty() {
                    events.push(Event::Stanzas(std::mem::take(batch)));
                }
                events.push(Event::PeerError(cond));
                Ok(())
            }
            (Phase::AwaitFeatures, NS_STREAMS, "features") => {
                let has_sm = el.children().any(|c| c.is("sm", NS_SM));
                if !has_sm {
                    return Err(StreamFault {
                        condition: Condition::UnsupportedStanzaType,
                        detail: "peer lacks stream management",
                    });
                }
                let r = sm::Resume {
                    h: self.durable_h as u32,
                    previd: sm::StreamId(self.p.session_id.clone()),
                };
                self.queue(xso::to_vec(&r).unwrap_or_default());
                self.phase = Phase::AwaitResumed;
                Ok(())
            }
            (Phase::AwaitResume, NS_SM, "resume") => {
                let r: sm::Resume = xso::transform(&el).map_err(|_| bad("malformed resume"))?;
                let resp = sm::Resumed {
                    h: self.durable_h as u32,
                    previd: sm::StreamId(self.p.session_id.clone()),
                };
                self.open_with(&r.previd.0, r.h, events)?;
                self.queue(xso::to_vec(&resp).unwrap_or_default());
                Ok(())
            }
            (Phase::AwaitResumed, NS_SM, "resumed") => {
                let r: sm::Resumed = xso::transform(&el).map_err(|_| bad("malformed resumed"))?;
                self.open_with(&r.previd.0, r.h, events)
            }
            (Phase::Open, NS_SM, "a") => {
                let a: sm::A = xso::transform(&el).map_err(|_| bad("malformed ack"))?;
                let h = unwrap_h(self.out_acked, a.h);
                if h > self.out_sent {
                    return Err(StreamFault {
                        condition: Condition::PolicyViolation,
                        detail: "ack for stanzas never sent",
                    });
                }
                if h > self.out_acked {
                    self.out_acked = h;
                    // Flush any stanzas counted so far so the order of events is kept.
                    let pending = std::mem::take(batch);
                    if !pending.is_empty() {
                        events.push(Event::Stanzas(pending));
                    }
                    events.push(Event::Acked(h));
                }
                Ok(())
            }
            (Phase::Open, NS_SM, "r") => {
                self.queue(xso::to_vec(&sm::A::new(self.durable_h as u32)).unwrap_or_default());
                Ok(())
            }
            (Phase::Open, NS_JINGLE, "jingle") => {
                // A candidate list we cannot use loses nothing: it is
                // ignored, the stream goes on.
                self.take_token(now);
                match crate::stream::jingle::parse_transport_info(el, &self.p.session_id) {
                    Ok(addrs) => events.push(Event::Addresses(addrs)),
                    Err(e) => tracing::debug!("jingle ignored: {e}"),
                }
                Ok(())
            }
            (Phase::Open, crate::omemo::pep::NS_PUBSUB_EVENT, "event") => {
                // Each costs a store transaction: rate-limited like stanzas.
                self.take_token(now);
                events.push(Event::Pep(el));
                Ok(())
            }
            (Phase::Open, NS_CLIENT, "message" | "iq" | "presence") => {
                self.take_token(now);
                self.counted_h += 1;
                batch.push(incoming_of(el));
                Ok(())
            }
            _ => Err(unexpected),
        }
    }

    /// The peer's `<resume/>` or `<resumed/>`: checks the session id and
    /// opens the stream with the peer's `h`.
    fn open_with(
        &mut self,
        previd: &str,
        wire_h: u32,
        events: &mut Vec<Event>,
    ) -> Result<(), StreamFault> {
        if previd != self.p.session_id {
            return Err(StreamFault {
                condition: Condition::PolicyViolation,
                detail: "unknown session id",
            });
        }
        let peer_h = unwrap_h(self.out_acked, wire_h);
        self.out_sent = self.out_sent.max(peer_h);
        self.out_acked = self.out_acked.max(peer_h);
        self.phase = Phase::Open;
        events.push(Event::Resumed { peer_h });
        Ok(())
    }

    fn phase_ref(&self) -> &Phase {
        &self.phase
    }

    fn take_token(&mut self, now: Instant) {
        let r = self.p.rate;
        let dt = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f64();
        self.last_refill = now;
        self.tokens = (self.tokens + dt * r.per_second).min(r.burst) - 1.0;
        self.throttle_until = if self.tokens < 0.0 {
            Some(now + Duration::from_secs_f64(-self.tokens / r.per_second))
        } else {
            None
        };
    }

    /// The driver stored everything up to `h`: acknowledge it.
    pub fn persisted(&mut self, h: u64) {
        if h > self.durable_h && self.phase != Phase::Closed {
            self.durable_h = h;
            self.queue(xso::to_vec(&sm::A::new(h as u32)).unwrap_or_default());
        }
    }

    /// Sends one of our queued stanzas.
    pub fn send(&mut self, stanza: &OutStanza) {
        if self.phase != Phase::Open {
            return;
        }
        let unit = match stanza {
            OutStanza::Chat {
                id,
                omemo: Some(omemo),
                ..
            }
            | OutStanza::KeyTransport { id, omemo }
            | OutStanza::Group {
                id,
                omemo: Some(omemo),
                ..
            }
            | OutStanza::Hold {
                id,
                omemo: Some(omemo),
                ..
            } => encode_encrypted(id, omemo, stanza.is_chat()),
            // Never sent in the clear: the runtime encrypts before sending.
            OutStanza::Chat { omemo: None, .. }
            | OutStanza::Group { omemo: None, .. }
            | OutStanza::Hold { omemo: None, .. } => None,
            OutStanza::Receipt { id, of } => write_el(&Element::from(receipt_message(id, of))),
        };
        // A stanza that cannot be encoded (only possible for data stored by
        // an older version) still goes out as an empty message, so both
        // sides keep counting the same stanzas (XEP-0198 `h`).
        let unit = unit.unwrap_or_else(|| {
            tracing::warn!(
                "a queued stanza could not be encoded; sending an empty one in its place"
            );
            format!("<message xmlns='{NS_CLIENT}'/>").into_bytes()
        });
        self.out_sent += 1;
        self.queue(unit);
    }

    /// Asks the peer for an ack.
    pub fn request_ack(&mut self) {
        if self.phase == Phase::Open {
            self.queue(xso::to_vec(&sm::R).unwrap_or_default());
        }
    }

    /// Offers our transport candidates (a Jingle `transport-info`).
    pub fn send_candidates(&mut self, addrs: &[transport::PeerAddr]) {
        if self.phase != Phase::Open {
            return;
        }
        let el = crate::stream::jingle::transport_info(&self.p.session_id, addrs);
        if let Some(unit) = write_el(&el) {
            self.queue(unit);
        }
    }

    /// Sends a top-level element that is not a stanza (not counted by
    /// XEP-0198): PEP notifications, re-sent on every connection.
    pub fn send_element(&mut self, el: &Element) {
        if self.phase != Phase::Open {
            return;
        }
        if let Some(unit) = write_el(el) {
            self.queue(unit);
        }
    }

    /// Closes the stream cleanly.
    pub fn close(&mut self) {
        if !self.sent_close {
            self.queue(b"</stream:stream>".to_vec());
            self.sent_close = true;
        }
    }
}

fn bad(detail: &'static str) -> StreamFault {
    StreamFault {
        condition: Condition::UnsupportedStanzaType,
        detail,
    }
}

/// Reads what Coterie needs out of a counted stanza (or a message the
/// bridge received). Anything malformed is
/// still counted (the sender counts it too) but ignored.
pub fn incoming_of(el: Element) -> Incoming {
    if !el.is("message", NS_CLIENT) {
        return Incoming::Other;
    }
    let Ok(m) = Message::try_from(el) else {
        return Incoming::Other;
    };
    if let Some(r) = m.payloads.iter().find(|p| p.is("received", NS_RECEIPTS)) {
        if let Ok(r) = Received::try_from(r.clone()) {
            return Incoming::Receipt { of: r.id };
        }
        return Incoming::Other;
    }
    let Some(id) =
        m.id.as_ref()
            .map(|i| i.0.clone())
            .filter(|i| !i.is_empty() && i.len() <= 64)
    else {
        return Incoming::Other;
    };
    let wants_receipt = m.payloads.iter().any(|p| p.is("request", NS_RECEIPTS));
    let encrypted = m
        .payloads
        .iter()
        .find(|p| p.name() == "encrypted" && crate::omemo::Version::from_ns(&p.ns()).is_some());
    if let Some(e) = encrypted {
        return Incoming::Encrypted {
            id,
            element: e.clone(),
            wants_receipt,
        };
    }
    if m.get_best_body(vec![]).is_some() {
        // Coterie nodes never send a body in the clear.
        return Incoming::Plain { id };
    }
    Incoming::Other
}

#[cfg(test)]
mod tests;
