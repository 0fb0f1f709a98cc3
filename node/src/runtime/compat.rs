//! **Dangerous** XEP-0174 compatibility mode (`--danger-xep0174-compat`):
//! cleartext link-local XMPP with classic clients (libpurple's Bonjour).
//!
//! ```text
//!  _presence._tcp (mdns-sd) ──▶ classic peer seen ──▶ Cleartext contact
//!  plain TCP listener ──▶ from an announced address? ──▶ session ─┐
//!  outbox grew / peer seen ──▶ dial its port.p2pj ──▶ session ────┤
//!                                   session: <message/> in ⇄ out ◀┘
//! ```
//!
//! Nothing here is encrypted or authenticated: anyone on the LAN can read
//! these chats and can claim any name. So it is never on by default, every
//! contact met this way is a separate `Cleartext` contact (never one of
//! the user's Coterie contacts, never given a key, never sent a Coterie
//! message), and `contacts` and `history` mark it. As libpurple does, a
//! connection is taken only from an address some `_presence` record
//! announced.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use discovery::lan::xep0174::{ClassicPeer, Presence};
use minidom::Element;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::{Shared, db};
use crate::store::{Contact, ContactState, Incoming, OutStanza};
use crate::stream::parser::{Limits, NS_CLIENT, ParseEvent, StreamParser};

/// Default XEP-0174 port (`port.p2pj`).
pub const DEFAULT_PORT: u16 = 5298;
/// At most this many classic peers become contacts.
pub const MAX_CLEARTEXT_CONTACTS: usize = 64;
/// How long a dial or a stream header may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// How often a live session looks for queued messages besides being kicked.
const POLL: Duration = Duration::from_millis(250);
/// How long a classic stream must stand before we write to it, and again
/// before what we wrote counts as sent.
const SETTLE: Duration = Duration::from_millis(500);

/// Settings of the compatibility mode.
#[derive(Debug, Clone, Copy)]
pub struct CompatSettings {
    /// The plain XMPP port to listen on and announce.
    pub port: u16,
    /// Seconds between fresh mDNS daemons (bounds mdns-sd's cache under a
    /// flood of records); `--lan-period`.
    pub period_secs: u64,
}

impl Default for CompatSettings {
    fn default() -> Self {
        CompatSettings {
            port: DEFAULT_PORT,
            period_secs: 600,
        }
    }
}

/// The running compatibility mode.
pub(crate) struct Compat {
    presence: Presence,
    /// Contacts with a live cleartext stream.
    live: Mutex<HashSet<u64>>,
    /// Contacts whose sender task runs.
    senders: Mutex<HashSet<u64>>,
    /// Contacts with messages written but not yet counted as sent.
    unsettled: Mutex<HashSet<u64>>,
    /// Serializes creating cleartext contacts (the browser and the
    /// listener may meet the same peer at once).
    adding: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Compat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compat(..)")
    }
}

impl Compat {
    /// Our instance name, as announced.
    pub(crate) fn instance(&self) -> &str {
        &self.presence.instance
    }

    /// The classic peers seen on the LAN now, by instance name.
    pub(crate) fn seen(&self) -> Vec<String> {
        self.presence.instances()
    }

    /// Withdraws our `_presence` record.
    pub(crate) fn withdraw(&self) {
        self.presence.stop();
    }

    /// Waits (at most `limit`) until no stream has messages written but not
    /// yet counted as sent, so that stopping the node does not make them go
    /// out twice.
    pub(crate) async fn settle(&self, limit: Duration) {
        let end = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < end
            && self
                .unsettled
                .lock()
                .map(|u| !u.is_empty())
                .unwrap_or(false)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn set_unsettled(&self, id: u64, on: bool) {
        if let Ok(mut u) = self.unsettled.lock() {
            if on {
                u.insert(id);
            } else {
                u.remove(&id);
            }
        }
    }

    pub(crate) fn is_live(&self, contact: u64) -> bool {
        self.live
            .lock()
            .map(|l| l.contains(&contact))
            .unwrap_or(false)
    }
}

/// Why the compatibility mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum CompatError {
    /// No address to announce.
    #[error(
        "--danger-xep0174-compat needs a LAN address to listen on: add --listen with your LAN IPv4 address"
    )]
    NoAddress,
    /// The port is taken.
    #[error("cannot listen on {0} for XEP-0174: {1} (pick another port with --compat-port)")]
    Bind(SocketAddr, String),
    /// mDNS failed.
    #[error("cannot announce on the LAN: {0}")]
    Mdns(String),
}

/// The pseudo-key a cleartext contact is stored under: not a public key,
/// only unique per instance name.
fn pseudo_peer(instance: &str) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(b"coterie xep0174 contact v1\0");
    h.update(instance.as_bytes());
    h.finalize().into()
}

/// Starts the listener, the announcement and the browser. `ips` are the
/// node's listen addresses.
pub(crate) async fn start(
    shared: &Arc<Shared>,
    settings: CompatSettings,
    ips: &[IpAddr],
    name: &str,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<Arc<Compat>, CompatError> {
    let ips: Vec<IpAddr> = ips
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    let Some(first) = ips.first().copied() else {
        return Err(CompatError::NoAddress);
    };
    let bind = SocketAddr::new(first, settings.port);
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|e| CompatError::Bind(bind, e.to_string()))?;
    let port = listener
        .local_addr()
        .map_err(|e| CompatError::Bind(bind, e.to_string()))?
        .port();
    let recycle = Duration::from_secs(settings.period_secs.max(10));
    let presence = Presence::start(name, &[first], port, recycle).map_err(CompatError::Mdns)?;
    tracing::warn!(
        "DANGER: XEP-0174 compatibility mode is on: your name is announced in the clear and chats with classic clients are not encrypted"
    );
    let compat = Arc::new(Compat {
        presence,
        live: Mutex::new(HashSet::new()),
        senders: Mutex::new(HashSet::new()),
        unsettled: Mutex::new(HashSet::new()),
        adding: tokio::sync::Mutex::new(()),
    });
    // Peers seen on the LAN become cleartext contacts (bounded), and each
    // gets a sender task.
    let (seen_tx, mut seen_rx) = mpsc::channel::<ClassicPeer>(64);
    compat.presence.on_peer(Arc::new(move |p: &ClassicPeer| {
        let _ = seen_tx.try_send(p.clone());
    }));
    {
        let (shared, compat) = (shared.clone(), compat.clone());
        tasks.spawn(async move {
            // Contacts met in an earlier run get their sender at once.
            if let Ok(Ok(all)) = db(&shared.store, |s| s.contacts()).await {
                for c in all {
                    if let ContactState::Cleartext { instance } = c.state {
                        spawn_sender(&shared, &compat, c.id, instance);
                    }
                }
            }
            // A record seen is not a contact: only a stream the peer opens, or
            // a message the user sends it, makes one (a flood of records
            // must not fill the contact list). Known ones are dialled.
            while let Some(p) = seen_rx.recv().await {
                if let Some(id) = existing_contact(&shared, &p.instance).await {
                    spawn_sender(&shared, &compat, id, p.instance.clone());
                    shared.kick(id).notify_one();
                }
            }
        });
    }
    {
        let (shared, compat) = (shared.clone(), compat.clone());
        tasks.spawn(accept_loop(shared, compat, listener));
    }
    Ok(compat)
}

/// The cleartext contact for `instance`, if there is one.
async fn existing_contact(shared: &Arc<Shared>, instance: &str) -> Option<u64> {
    let instance = instance.to_string();
    db(&shared.store, move |s| {
        s.contacts().ok()?.into_iter().find_map(|c| match c.state {
            ContactState::Cleartext { instance: i } if i == instance => Some(c.id),
            _ => None,
        })
    })
    .await
    .ok()
    .flatten()
}

/// For `coterie send` to a name that is not a contact: if a classic peer
/// of that instance name is on the LAN, it becomes a cleartext contact.
pub(crate) async fn contact_for_send(
    shared: &Arc<Shared>,
    compat: &Arc<Compat>,
    instance: &str,
) -> Option<u64> {
    let peer = compat.presence.lookup(instance)?;
    let id = contact_for(shared, compat, &peer).await?;
    spawn_sender(shared, compat, id, peer.instance);
    Some(id)
}

/// Finds or creates the cleartext contact for `p`.
async fn contact_for(shared: &Arc<Shared>, compat: &Compat, p: &ClassicPeer) -> Option<u64> {
    let _one_at_a_time = compat.adding.lock().await;
    let instance = p.instance.clone();
    let res = db(
        &shared.store,
        move |s| -> Result<Option<u64>, crate::store::StoreError> {
            let all = s.contacts()?;
            if let Some(c) = all.iter().find(
                |c| matches!(&c.state, ContactState::Cleartext { instance: i } if *i == instance),
            ) {
                return Ok(Some(c.id));
            }
            let n = all
                .iter()
                .filter(|c| matches!(c.state, ContactState::Cleartext { .. }))
                .count();
            if n >= MAX_CLEARTEXT_CONTACTS {
                return Ok(None);
            }
            let id = s.add_contact(Contact {
                id: 0,
                name: instance.clone(),
                peer: pseudo_peer(&instance),
                addrs: Vec::new(),
                state: ContactState::Cleartext { instance },
                added: crate::ops::now_secs(),
                last_seen: None,
                last_carrier: None,
            })?;
            Ok(Some(id))
        },
    )
    .await;
    match res {
        Ok(Ok(id)) => id,
        _ => None,
    }
}

fn spawn_sender(shared: &Arc<Shared>, compat: &Arc<Compat>, id: u64, instance: String) {
    let new = compat
        .senders
        .lock()
        .map(|mut s| s.insert(id))
        .unwrap_or(false);
    if new {
        tokio::spawn(sender(shared.clone(), compat.clone(), id, instance));
    }
}

/// Dials the classic peer whenever something is queued for it and no
/// stream is live.
async fn sender(shared: Arc<Shared>, compat: Arc<Compat>, id: u64, instance: String) {
    let mut shutdown = shared.shutdown.clone();
    let kick = shared.kick(id);
    loop {
        tokio::select! {
            () = kick.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(3)) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if compat.is_live(id) {
            continue;
        }
        let queued = db(&shared.store, move |s| s.outbox_len(id)).await;
        if !matches!(queued, Ok(Ok(n)) if n > 0) {
            continue;
        }
        let Some(peer) = compat.presence.lookup(&instance) else {
            continue;
        };
        for ip in &peer.ips {
            let addr = SocketAddr::new(*ip, peer.port);
            tracing::debug!(contact = id, "XEP-0174: dialling a classic peer");
            match tokio::time::timeout(HANDSHAKE, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    session(&shared, &compat, id, &instance, s, true).await;
                    tracing::debug!(contact = id, "XEP-0174: outgoing stream ended");
                    break;
                }
                _ => tracing::debug!(contact = id, "XEP-0174 dial failed"),
            }
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, compat: Arc<Compat>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Some(peer) = compat.presence.by_ip(remote.ip()) else {
            tracing::debug!("XEP-0174 connection from an address nobody announced: closed");
            continue;
        };
        let Some(id) = contact_for(&shared, &compat, &peer).await else {
            tracing::debug!("XEP-0174: too many cleartext contacts; connection closed");
            continue;
        };
        spawn_sender(&shared, &compat, id, peer.instance.clone());
        let (shared, compat) = (shared.clone(), compat.clone());
        tokio::spawn(async move {
            session(&shared, &compat, id, &peer.instance, stream, false).await;
        });
    }
}

fn header(from: &str, to: &str) -> String {
    // Instance names never contain quotes, `<` or `&` (see parse_presence
    // and Presence::start).
    format!(
        "<?xml version='1.0' encoding='UTF-8'?><stream:stream xmlns='{NS_CLIENT}' xmlns:stream='http://etherx.jabber.org/streams' from='{from}' to='{to}' version='1.0'>"
    )
}

/// A `<message type='chat'>` with `body`, or `None` if XML cannot carry it
/// (`send` refuses such text before it is queued). An instance name that is
/// not a valid JID is left off: classic clients take the sender from the
/// stream, and the stanza must not be dropped for it.
pub(crate) fn chat_stanza(from: &str, to: &str, id: &str, body: &str) -> Option<Vec<u8>> {
    use xmpp_parsers::jid::Jid;
    use xmpp_parsers::message::{Id, Lang, Message, MessageType};
    if !crate::stream::session::is_xml_text(body) || !crate::stream::session::is_xml_text(id) {
        return None;
    }
    let mut m = Message::new(Jid::new(to).ok());
    m.from = Jid::new(from).ok();
    m.type_ = MessageType::Chat;
    m.id = Some(Id(id.to_string()));
    m.bodies.insert(Lang::default(), body.to_string());
    let el = Element::from(m);
    let mut v = Vec::new();
    el.write_to(&mut v).ok().map(|()| v)
}

/// The text of a classic client's message, if it is one with a body.
pub(crate) fn chat_body(el: &Element) -> Option<(String, String)> {
    if el.name() != "message" || matches!(el.attr("type"), Some("error" | "groupchat")) {
        return None;
    }
    let body = el
        .children()
        .find(|c| c.name() == "body" && c.ns() == NS_CLIENT)?
        .text();
    if body.is_empty() {
        return None;
    }
    let id = el
        .attr("id")
        .filter(|i| i.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("x{:016x}", rand::random::<u64>()));
    Some((id, body))
}

struct LiveGuard<'a>(&'a Compat, u64);
impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut l) = self.0.live.lock() {
            l.remove(&self.1);
        }
        self.0.set_unsettled(self.1, false);
    }
}

/// One cleartext stream with a classic peer, in both directions.
async fn session(
    shared: &Arc<Shared>,
    compat: &Arc<Compat>,
    id: u64,
    them: &str,
    stream: TcpStream,
    initiator: bool,
) {
    if let Ok(mut l) = compat.live.lock() {
        l.insert(id);
    }
    let _guard = LiveGuard(compat, id);
    let me = compat.presence.instance.clone();
    let (mut rd, mut wr) = stream.into_split();
    let mut parser = StreamParser::new(Limits::default());
    let mut buf = vec![0u8; 16 * 1024];
    let kick = shared.kick(id);
    let mut shutdown = shared.shutdown.clone();
    if initiator && wr.write_all(header(&me, them).as_bytes()).await.is_err() {
        return;
    }
    let mut answered = initiator;
    let mut got_header = false;
    let mut incoming: Vec<Incoming> = Vec::new();
    let deadline = tokio::time::Instant::now() + HANDSHAKE;
    // Classic streams have no acks. A peer that does not want the stream
    // (libpurple, when it has not yet resolved our record) answers with its
    // header and closes at once: so nothing is written until the stream has
    // stood for SETTLE, and what was written is marked sent only once the
    // stream stood for SETTLE more. A stream that ends earlier leaves it
    // queued for the next one (a duplicate is possible, a loss is not).
    let mut settled_at: Option<tokio::time::Instant> = None;
    let mut written: Option<(u64, tokio::time::Instant)> = None;
    // The node is stopping: write nothing more, let what was written settle.
    let mut closing = false;
    loop {
        let now = tokio::time::Instant::now();
        if let Some((last, at)) = written
            && now >= at + SETTLE
        {
            match db(&shared.store, move |s| s.ack_outgoing(id, last)).await {
                Ok(Ok(_)) => {
                    written = None;
                    compat.set_unsettled(id, false);
                }
                _ => {
                    tracing::warn!(contact = id, "could not mark cleartext messages sent");
                    return;
                }
            }
        }
        if closing && written.is_none() {
            let _ = wr.write_all(b"</stream:stream>").await;
            return;
        }
        if !closing && written.is_none() && settled_at.is_some_and(|t| now >= t) && answered {
            match write_outbox(shared, id, &me, them, &mut wr).await {
                Ok(Some(last)) => {
                    compat.set_unsettled(id, true);
                    written = Some((last, now));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(contact = id, "XEP-0174 write failed: {e}");
                    return;
                }
            }
        }
        let read = tokio::select! {
            r = rd.read(&mut buf) => r,
            () = kick.notified() => continue,
            () = tokio::time::sleep(POLL) => {
                if !got_header && tokio::time::Instant::now() > deadline {
                    tracing::debug!(contact = id, "XEP-0174 peer sent no stream header");
                    return;
                }
                continue;
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let events = match parser.feed(&buf[..n]) {
            Ok(ev) => ev,
            Err((ev, fault)) => {
                tracing::debug!(contact = id, "XEP-0174 stream fault: {}", fault.detail);
                handle(ev, &mut got_header, &mut incoming);
                store_incoming(shared, id, &mut incoming).await;
                let _ = wr.write_all(b"</stream:stream>").await;
                return;
            }
        };
        let ended = handle(events, &mut got_header, &mut incoming);
        if got_header && settled_at.is_none() {
            settled_at = Some(tokio::time::Instant::now() + SETTLE);
        }
        if got_header && !answered {
            if wr.write_all(header(&me, them).as_bytes()).await.is_err() {
                return;
            }
            answered = true;
        }
        store_incoming(shared, id, &mut incoming).await;
        if ended {
            let _ = wr.write_all(b"</stream:stream>").await;
            return;
        }
    }
}

/// Applies parser events; returns whether the stream ended.
fn handle(events: Vec<ParseEvent>, got_header: &mut bool, incoming: &mut Vec<Incoming>) -> bool {
    for ev in events {
        match ev {
            ParseEvent::Header(_) => *got_header = true,
            ParseEvent::Element(el) => {
                if let Some((id, body)) = chat_body(&el) {
                    incoming.push(Incoming::Chat {
                        id,
                        body,
                        wants_receipt: false,
                    });
                }
            }
            ParseEvent::End => return true,
        }
    }
    false
}

async fn store_incoming(shared: &Arc<Shared>, id: u64, incoming: &mut Vec<Incoming>) {
    if incoming.is_empty() {
        return;
    }
    let items = std::mem::take(incoming);
    let n = items.len();
    let now = crate::ops::now_ms();
    match db(&shared.store, move |s| s.receive(id, &items, now)).await {
        Ok(Ok(_)) => tracing::debug!(contact = id, n, "XEP-0174 messages stored"),
        _ => tracing::warn!(contact = id, "could not store cleartext messages"),
    }
}

/// Writes the queued chat messages (at most 64); returns the outbox number
/// of the last one written, to be marked sent once the stream stood.
async fn write_outbox(
    shared: &Arc<Shared>,
    id: u64,
    me: &str,
    them: &str,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Result<Option<u64>, String> {
    let pending = db(&shared.store, move |s| {
        let st = s.peer_state(id)?;
        s.outbox_after(id, st.out_acked, 64)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let Some(last) = pending.last().map(|(n, _)| *n) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (_, s) in &pending {
        // Receipts and OMEMO key transports do not exist for classic peers.
        if let OutStanza::Chat { id: sid, body, .. } = s {
            match chat_stanza(me, them, sid, body) {
                Some(b) => out.extend_from_slice(&b),
                // `send` refuses such text; an old row could still hold it.
                None => tracing::warn!(
                    contact = id,
                    "a queued cleartext message cannot be carried in XML and was not sent"
                ),
            }
        }
    }
    wr.write_all(&out).await.map_err(|e| e.to_string())?;
    wr.flush().await.map_err(|e| e.to_string())?;
    Ok(Some(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanzas_round_trip_and_escape() {
        let b = chat_stanza("a@h", "b@h", "m1", "1 < 2 & 'q'").expect("stanza");
        let s = String::from_utf8(b).expect("utf8");
        assert!(s.contains("&lt;") && s.contains("&amp;"), "{s}");
        let el: Element = s.parse().expect("parses");
        assert_eq!(
            chat_body(&el),
            Some(("m1".to_string(), "1 < 2 & 'q'".to_string()))
        );
        assert!(chat_stanza("a@h", "b@h", "m1", "bell \u{7}").is_none());
        // A peer whose instance name is no JID still gets the message.
        let b = chat_stanza("a@h", "Fin User@@h", "m2", "hi").expect("stanza");
        let el: Element = String::from_utf8(b).expect("utf8").parse().expect("parses");
        assert_eq!(chat_body(&el).map(|(_, b)| b).as_deref(), Some("hi"));
    }

    #[test]
    fn libpurple_messages_are_read_and_others_ignored() {
        // What finch sends: a body plus XHTML-IM and jabber:x:event.
        let finch: Element = "<message xmlns='jabber:client' to='a@h' from='f@fh' type='chat' id='x1'><body>hi there</body><html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/xhtml'>hi there</body></html><x xmlns='jabber:x:event'><composing/></x></message>"
            .parse()
            .expect("parses");
        assert_eq!(
            chat_body(&finch).map(|(_, b)| b).as_deref(),
            Some("hi there")
        );
        for other in [
            "<message xmlns='jabber:client' type='chat'><x xmlns='jabber:x:event'><composing/></x></message>",
            "<message xmlns='jabber:client' type='error'><body>no</body></message>",
            "<iq xmlns='jabber:client' type='get' id='1'/>",
        ] {
            let el: Element = other.parse().expect("parses");
            assert_eq!(chat_body(&el), None, "{other}");
        }
    }

    #[test]
    fn pseudo_keys_differ_per_instance() {
        assert_ne!(pseudo_peer("a@h"), pseudo_peer("a@h2"));
    }
}
