//! Keeping the account online: logins with backoff (stopping on what only
//! the user can fix), a stanza stream with stream management, and answers
//! to what the server and others ask that reveal nothing.
//!
//! The session sends no presence yet: the server then keeps messages for
//! the account (offline storage, its archive) instead of handing them to a
//! session that cannot show them. Presence starts with message delivery
//! over the bridge.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_xmpp::Stanza;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::Message;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::stanzastream::{Connection, Event, StanzaStream, StreamEvent};

use super::connect::{self, Dial};
use super::relay::{self, Chats, Cmd, Link};
use super::{BridgeAccount, BridgeError, BridgeState, BridgeStatus, backoff};
use crate::store::ContactState;

/// Stanzas queued in each direction before senders wait.
const QUEUE_DEPTH: usize = 64;

/// A running bridge.
#[derive(Debug)]
pub struct Bridge {
    status: Arc<Mutex<BridgeStatus>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    kick: mpsc::UnboundedSender<u64>,
}

/// What the node gives the bridge.
#[derive(Debug, Clone)]
pub struct Env {
    /// The node's Tor client, if it runs one.
    pub tor: Option<Arc<transport::onion::Tor>>,
    /// The store.
    pub store: Arc<crate::store::Store>,
    /// Where message events go.
    pub events: tokio::sync::broadcast::Sender<crate::runtime::NodeEvent>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Bridge {
    /// Starts keeping `acct` online. `tor` is the node's Tor client, if it
    /// runs one; an account that goes through Tor waits for it and, on a
    /// node without Tor, stops with [`BridgeError::TorOff`].
    pub fn start(acct: BridgeAccount, env: Env) -> Bridge {
        let mut first = BridgeStatus::offline(Some(&acct));
        first.state = BridgeState::Connecting;
        let status = Arc::new(Mutex::new(first));
        let (stop, stopped) = watch::channel(false);
        let dial = match (acct.direct, env.tor.clone()) {
            (true, _) => Ok(Dial::Direct),
            (false, Some(tor)) => Ok(Dial::Tor(tor)),
            (false, None) => Err(BridgeError::TorOff),
        };
        let (kick, kicks) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(acct, dial, env, kicks, status.clone(), stopped));
        Bridge {
            status,
            stop,
            task,
            kick,
        }
    }

    /// A bridged contact's outbox grew (other contacts are ignored).
    pub fn kick(&self, contact: u64) {
        let _ = self.kick.send(contact);
    }

    /// What it is doing.
    pub fn status(&self) -> BridgeStatus {
        lock(&self.status).clone()
    }

    /// Logs out and stops.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await;
    }
}

fn set(status: &Mutex<BridgeStatus>, f: impl FnOnce(&mut BridgeStatus)) {
    f(&mut lock(status));
}

fn fail(status: &Mutex<BridgeStatus>, e: &BridgeError) {
    tracing::warn!(fatal = e.is_fatal(), "bridge: {}", kind(e));
    set(status, |s| {
        s.state = if e.is_fatal() {
            BridgeState::Failed
        } else {
            BridgeState::Retrying
        };
        s.error = Some(e.to_string());
    });
}

/// The error's kind, for the log (the message may name the server).
fn kind(e: &BridgeError) -> &'static str {
    match e {
        BridgeError::TorOff => "Tor is off",
        BridgeError::Tor(_) => "Tor could not reach the server",
        BridgeError::Unreachable(_) => "server unreachable",
        BridgeError::Certificate { .. } => "certificate not valid",
        BridgeError::NoTls => "no STARTTLS",
        BridgeError::Auth(_) => "login refused",
        BridgeError::Stream(_) => "stream closed",
        BridgeError::Protocol(_) => "protocol error",
        BridgeError::Account(_) => "account unusable",
    }
}

async fn run(
    acct: BridgeAccount,
    dial: Result<Dial, BridgeError>,
    env: Env,
    kicks: mpsc::UnboundedReceiver<u64>,
    status: Arc<Mutex<BridgeStatus>>,
    mut stopped: watch::Receiver<bool>,
) {
    let setup = dial.and_then(|d| Ok((d, connect::tls_config(&acct)?, acct.bare()?)));
    let (dial, tls, account) = match setup {
        Ok(v) => v,
        Err(e) => return fail(&status, &e),
    };
    let own = account.clone();
    let (cmd_tx, mut cmds) = mpsc::channel::<Cmd>(QUEUE_DEPTH);
    let (inbox_tx, inbox) = mpsc::channel::<Message>(QUEUE_DEPTH);
    let (online_tx, online) = watch::channel(0u64);
    let chats = Arc::new(Chats::new(
        env.store.clone(),
        env.events.clone(),
        account,
        &acct.omemo_seed,
        Link(cmd_tx),
    ));
    let worker = tokio::spawn(chat_worker(chats, kicks, inbox, online, status.clone()));
    // IQs we sent, by id, waiting for their answer.
    let mut pending: HashMap<String, Pending> = HashMap::new();
    // Set when the session ends (stopped, or an error the user must fix):
    // from then on every connection the stream asks for is a dead one.
    let ended = Arc::new(AtomicBool::new(false));
    let gave_up = Arc::new(tokio::sync::Notify::new());
    // Connections handed to the stream since it was last established.
    let handed = Arc::new(AtomicU32::new(0));
    let up = Arc::new(Mutex::new((None, 0u32)));
    let reconnector = {
        let handed = handed.clone();
        let up = up.clone();
        let status = status.clone();
        let stopped = stopped.clone();
        let ended = ended.clone();
        let gave_up = gave_up.clone();
        Box::new(
            move |_: Option<String>, slot: oneshot::Sender<Connection>| {
                tokio::spawn(connect_loop(
                    Attempt {
                        acct: acct.clone(),
                        dial: dial.clone(),
                        tls: tls.clone(),
                        status: status.clone(),
                        stopped: stopped.clone(),
                        ended: ended.clone(),
                        gave_up: gave_up.clone(),
                        handed: handed.clone(),
                        up: up.clone(),
                    },
                    slot,
                ));
            },
        )
    };
    let mut stream = StanzaStream::new(reconnector, QUEUE_DEPTH);
    let stopping = loop {
        let ev = tokio::select! {
            _ = until_stopped(&mut stopped) => break true,
            () = gave_up.notified() => break false,
            Some(cmd) = cmds.recv() => {
                match cmd {
                    Cmd::Send(st) => drop(stream.send(st).await),
                    Cmd::Iq(iq, query, reply) => {
                        if pending.len() >= MAX_PENDING_IQS {
                            let _ = reply.send(Err("too many requests in flight".into()));
                        } else {
                            pending.insert(iq.id().to_owned(), (reply, query, Vec::new()));
                            drop(stream.send(Box::new(Stanza::Iq(*iq))).await);
                        }
                    }
                }
                continue;
            }
            ev = stream.next() => ev,
        };
        match ev {
            None => break false,
            Some(Event::Stream(StreamEvent::Reset { .. })) => {
                handed.store(0, Ordering::SeqCst);
                lock(&up).0 = Some(std::time::Instant::now());
                // Answers to what the old stream asked will not come.
                for (_, (reply, _, _)) in pending.drain() {
                    let _ = reply.send(Err("the connection was reset".into()));
                }
                set(&status, |s| s.published = false);
                online_tx.send_modify(|n| *n += 1);
                tracing::info!("bridge: online");
                set(&status, |s| {
                    s.state = BridgeState::Online;
                    s.error = None;
                    s.retry_in = None;
                    s.connections += 1;
                });
            }
            Some(Event::Stream(StreamEvent::Resumed)) => set(&status, |s| {
                handed.store(0, Ordering::SeqCst);
                s.state = BridgeState::Online;
                s.error = None;
                s.retry_in = None;
            }),
            Some(Event::Stream(StreamEvent::Suspended)) => set(&status, |s| {
                if s.state == BridgeState::Online {
                    s.state = BridgeState::Connecting;
                    s.error =
                        Some("the server closed the connection or it broke; reconnecting".into());
                }
            }),
            Some(Event::Stanza(Stanza::Message(m))) => {
                // A page of our own archive, for the query that asked.
                if let Some((query, archived)) = relay::archived(&m, &own) {
                    if let Some((_, _, got)) = pending
                        .values_mut()
                        .find(|(_, q, _)| q.as_deref() == Some(query.as_str()))
                        && got.len() < relay::MAM_PAGE * 2
                    {
                        got.push(archived);
                    }
                    continue;
                }
                // Waits when the chat worker is behind: the server keeps
                // the rest (stream management) meanwhile.
                let _ = inbox_tx.send(m).await;
            }
            Some(Event::Stanza(Stanza::Iq(iq))) => {
                let id = iq.id().to_owned();
                match iq {
                    Iq::Result { payload, .. } => {
                        if let Some((reply, _, archived)) = pending.remove(&id) {
                            let _ = reply.send(Ok((payload, archived)));
                        }
                    }
                    Iq::Error { error, .. } => {
                        if let Some((reply, _, _)) = pending.remove(&id) {
                            let _ = reply.send(Err(format!("{:?}", error.defined_condition)));
                        }
                    }
                    request => {
                        if let Some(reply) = answer(Stanza::Iq(request)) {
                            drop(stream.send(Box::new(reply)).await);
                        }
                    }
                }
            }
            // Presence from others is not asked for and not used.
            Some(Event::Stanza(_)) => {}
        }
    };
    worker.abort();
    ended.store(true, Ordering::SeqCst);
    if stopping && status_is(&status, BridgeState::Online) {
        // Log out cleanly.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), stream.close()).await;
    } else {
        // The worker waits for a connection; dropping the frontend first
        // lets it exit on the dead one the connector hands it.
        drop(stream);
    }
    if stopping {
        set(&status, |s| s.state = BridgeState::Stopped);
    }
}

/// How often messages waiting for a friend's keys look for them again.
const KEYS_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// An IQ waiting for its answer: who wants it, the archive query it
/// belongs to, and the archived messages that came for it so far.
type Pending = (relay::Reply, Option<String>, Vec<(String, Message)>);

/// IQs the bridge may wait for at once.
const MAX_PENDING_IQS: usize = 256;

/// Runs the chats one thing at a time: messages that arrived (in order),
/// outboxes to send, and, on every new session, our keys published, our
/// presence sent (the server then hands over what it kept for us) and
/// every bridged outbox tried.
async fn chat_worker(
    chats: Arc<Chats>,
    mut kicks: mpsc::UnboundedReceiver<u64>,
    mut inbox: mpsc::Receiver<Message>,
    mut online: watch::Receiver<u64>,
    status: Arc<Mutex<BridgeStatus>>,
) {
    let mut due: BTreeSet<u64> = BTreeSet::new();
    // Contacts whose messages wait for their keys, tried again at `retry`.
    let mut later: BTreeSet<u64> = BTreeSet::new();
    let mut retry = tokio::time::Instant::now() + KEYS_RETRY;
    let mut session = false;
    loop {
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(retry), if !later.is_empty() => {
                due.append(&mut later);
            }
            changed = online.changed() => {
                if changed.is_err() {
                    return;
                }
                session = true;
                // What arrived while we were away or was lost in a crash,
                // from the archive, before the presence that makes the
                // server hand over its offline store (the same messages,
                // recognised by their archive id).
                match chats.catch_up().await {
                    Ok(n) if n > 0 => tracing::info!(messages = n, "bridge: caught up from the archive"),
                    Ok(_) => {}
                    Err(e) => note(&status, Some(format!("reading the archive failed: {e}"))),
                }
                let presence = Stanza::Presence(Presence::available());
                if chats.link.0.send(Cmd::Send(Box::new(presence))).await.is_err() {
                    return;
                }
                match chats.publish_own().await {
                    Ok(()) => set(&status, |s| s.published = true),
                    Err(e) => note(&status, Some(e)),
                }
                let store = chats.store.clone();
                let all = tokio::task::spawn_blocking(move || store.contacts()).await;
                if let Ok(Ok(all)) = all {
                    due.extend(
                        all.iter()
                            .filter(|c| matches!(c.state, ContactState::Bridged { .. }))
                            .map(|c| c.id),
                    );
                }
            }
            m = inbox.recv() => {
                let Some(m) = m else { return };
                match chats.received(m).await {
                    Ok(true) => {}
                    Ok(false) => set(&status, |s| s.ignored += 1),
                    Err(e) => note(&status, Some(e)),
                }
            }
            k = kicks.recv() => {
                let Some(k) = k else { return };
                due.insert(k);
            }
        }
        if session && status_is(&status, BridgeState::Online) {
            for c in std::mem::take(&mut due) {
                match chats.deliver(c).await {
                    Ok(false) => note(&status, None),
                    Ok(true) => {
                        if later.is_empty() {
                            retry = tokio::time::Instant::now() + KEYS_RETRY;
                        }
                        later.insert(c);
                        note(
                            &status,
                            Some(
                                "queued messages wait for a friend's OMEMO keys (their client has not published any yet)"
                                    .into(),
                            ),
                        );
                    }
                    Err(e) => note(&status, Some(e)),
                }
            }
        }
    }
}

fn note(status: &Mutex<BridgeStatus>, what: Option<String>) {
    if let Some(w) = &what {
        tracing::warn!("bridge chats: {}", w.split(':').next().unwrap_or_default());
    }
    set(status, |s| s.note = what);
}

/// Resolves once the bridge is told to stop (or its owner is gone).
async fn until_stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn status_is(status: &Mutex<BridgeStatus>, state: BridgeState) -> bool {
    lock(status).state == state
}

/// What one connection attempt needs.
struct Attempt {
    acct: BridgeAccount,
    dial: Dial,
    tls: Arc<rustls::ClientConfig>,
    status: Arc<Mutex<BridgeStatus>>,
    stopped: watch::Receiver<bool>,
    ended: Arc<AtomicBool>,
    gave_up: Arc<tokio::sync::Notify>,
    handed: Arc<AtomicU32>,
    /// When the last session came up, and how many in a row ended within
    /// [`STABLE`].
    up: Arc<Mutex<(Option<std::time::Instant>, u32)>>,
}

/// A session that lasts this long counts as stable.
const STABLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Logs in until it works, the user must act, or the bridge stops.
///
/// The stanza stream's worker panics when its connection slot is dropped,
/// so the slot is always answered: with a live connection, or, once the
/// session has ended, with a dead one that makes the worker exit.
async fn connect_loop(a: Attempt, slot: oneshot::Sender<Connection>) {
    let Attempt {
        acct,
        dial,
        tls,
        status,
        mut stopped,
        ended,
        gave_up,
        handed,
        up,
    } = a;
    // The stream asks again although the last connection we handed it
    // never came up: that connection failed during negotiation. The known
    // case is a resumption the server refuses with a `<failed/>` without
    // `h` (Prosody after a restart), which xmpp-parsers 0.23 cannot parse,
    // so tokio-xmpp retries the same resumption forever. Without stream
    // management in the features the stream drops the old state and binds
    // afresh; and a stream that keeps failing waits as after any failure.
    let end = |slot: oneshot::Sender<Connection>| async move {
        if let Some(dead) = dead_connection().await {
            let _ = slot.send(dead);
        }
    };
    let unestablished = handed.load(Ordering::SeqCst);
    let mut attempt = unestablished.saturating_sub(1);
    // A session that ended soon after it came up (a server that closes
    // every stream with an error, say) is not retried at once either.
    let flapped = {
        let mut u = lock(&up);
        match u.0.take() {
            Some(t) if t.elapsed() < STABLE => {
                u.1 = u.1.saturating_add(1);
                Some(u.1)
            }
            Some(_) => {
                u.1 = 0;
                None
            }
            None => None,
        }
    };
    let pause = {
        let mut rng = rand::thread_rng();
        [
            (unestablished > 1).then(|| backoff(unestablished - 2, &mut rng)),
            flapped.map(|n| backoff(n - 1, &mut rng)),
        ]
        .into_iter()
        .flatten()
        .max()
    };
    if let Some(pause) = pause {
        set(&status, |s| {
            s.state = BridgeState::Retrying;
            s.retry_in = Some(pause.as_secs().max(1));
        });
        tokio::select! {
            () = until_stopped(&mut stopped) => return end(slot).await,
            () = tokio::time::sleep(pause) => {}
        }
    }
    loop {
        if ended.load(Ordering::SeqCst) || *stopped.borrow() {
            return end(slot).await;
        }
        if let Dial::Tor(tor) = &dial {
            let ready = async {
                while tor.status().bootstrap_percent < 100 {
                    set(&status, |s| s.state = BridgeState::WaitingForTor);
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            };
            tokio::select! {
                _ = until_stopped(&mut stopped) => return end(slot).await,
                () = ready => {}
            }
        }
        set(&status, |s| {
            s.state = BridgeState::Connecting;
            s.retry_in = None;
        });
        let result = tokio::select! {
            _ = until_stopped(&mut stopped) => return end(slot).await,
            r = connect::login(&acct, tls.clone(), &dial) => r,
        };
        match result {
            Ok(mut conn) => {
                if unestablished > 0 {
                    conn.features.stream_management = None;
                }
                handed.fetch_add(1, Ordering::SeqCst);
                // Fails only when the stream is gone; nothing to do then.
                let _ = slot.send(conn);
                return;
            }
            Err(e) => {
                fail(&status, &e);
                if e.is_fatal() {
                    ended.store(true, Ordering::SeqCst);
                    gave_up.notify_one();
                    return end(slot).await;
                }
                let pause = backoff(attempt, &mut rand::thread_rng());
                attempt = attempt.saturating_add(1);
                set(&status, |s| s.retry_in = Some(pause.as_secs().max(1)));
                tokio::select! {
                    _ = until_stopped(&mut stopped) => return end(slot).await,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// A connection that is over as soon as the worker uses it: an in-memory
/// stream whose far end sends a header and features, then hangs up.
async fn dead_connection() -> Option<Connection> {
    use tokio_xmpp::parsers::{bind::BindFeature, ns, stream_features::StreamFeatures};
    use tokio_xmpp::xmlstream::{
        FallibleStreamElement, StreamHeader, accept_stream, initiate_stream,
    };
    let (near, far) = tokio::io::duplex(4096);
    let t = connect::timeouts();
    let features = StreamFeatures {
        bind: Some(BindFeature { required: true }),
        ..StreamFeatures::default()
    };
    let answer = tokio::spawn(async move {
        let accepted = accept_stream(tokio::io::BufStream::new(far), ns::JABBER_CLIENT, t)
            .await
            .ok()?;
        let pending = accepted.send_header(StreamHeader::default()).await.ok()?;
        let hung_up = pending
            .send_features::<FallibleStreamElement>(&features)
            .await
            .ok();
        drop(hung_up);
        Some(())
    });
    let pending = initiate_stream(
        tokio::io::BufStream::new(near),
        ns::JABBER_CLIENT,
        StreamHeader::default(),
        t,
    )
    .await
    .ok()?;
    let (features, stream) = pending
        .recv_features::<FallibleStreamElement>()
        .await
        .ok()?;
    let _ = answer.await;
    Some(Connection {
        stream: stream.box_stream(),
        features,
        identity: jid::BareJid::new("ended@invalid").ok()?.into(),
    })
}

/// What to send back for a stanza the session got. Requests are answered
/// so that nothing is learnt: a ping gets its pong; software version, disco,
/// vCard, last activity, time and everything else get
/// `service-unavailable`, exactly as for a feature a client lacks.
pub fn answer(st: Stanza) -> Option<Stanza> {
    let Stanza::Iq(iq) = st else {
        return None;
    };
    let (from, id, payload) = match iq {
        Iq::Get {
            from, id, payload, ..
        }
        | Iq::Set {
            from, id, payload, ..
        } => (from, id, payload),
        _ => return None,
    };
    let is_ping = payload.is("ping", "urn:xmpp:ping");
    let reply = if is_ping {
        Iq::Result {
            from: None,
            to: from,
            id,
            payload: None,
        }
    } else {
        Iq::Error {
            from: None,
            to: from,
            id,
            error: StanzaError {
                type_: ErrorType::Cancel,
                by: None,
                defined_condition: DefinedCondition::ServiceUnavailable,
                texts: BTreeMap::new(),
                other: None,
            },
            payload: None,
        }
    };
    Some(Stanza::Iq(reply))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_xmpp::minidom::Element;

    fn iq(xml: &str) -> Stanza {
        let el: Element = xml.parse().expect("xml");
        Stanza::Iq(Iq::try_from(el).expect("iq"))
    }

    fn xml(st: Stanza) -> String {
        String::from(&Element::from(st))
    }

    #[test]
    fn pings_are_answered_and_nothing_else_is_revealed() {
        let pong = answer(iq(
            "<iq xmlns='jabber:client' type='get' id='p1' from='example.org'><ping xmlns='urn:xmpp:ping'/></iq>",
        ))
        .expect("pong");
        let pong = xml(pong);
        assert!(
            pong.contains("type='result'") && pong.contains("id='p1'"),
            "{pong}"
        );

        for q in [
            "<query xmlns='jabber:iq:version'/>",
            "<query xmlns='http://jabber.org/protocol/disco#info'/>",
            "<query xmlns='http://jabber.org/protocol/disco#items'/>",
            "<vCard xmlns='vcard-temp'/>",
            "<query xmlns='jabber:iq:last'/>",
            "<time xmlns='urn:xmpp:time'/>",
        ] {
            let req = format!(
                "<iq xmlns='jabber:client' type='get' id='q' from='spy@example.org/x'>{q}</iq>"
            );
            let out = xml(answer(iq(&req)).expect("answer"));
            assert!(out.contains("type='error'"), "{out}");
            assert!(out.contains("service-unavailable"), "{out}");
            assert!(!out.to_lowercase().contains("coterie"), "{out}");
            assert!(!out.contains("<query") && !out.contains("vCard"), "{out}");
        }
    }

    #[test]
    fn results_errors_and_messages_get_no_answer() {
        assert!(answer(iq("<iq xmlns='jabber:client' type='result' id='r'/>")).is_none());
        let el: Element = "<message xmlns='jabber:client' from='a@b/c'><body>x</body></message>"
            .parse()
            .expect("xml");
        let msg = tokio_xmpp::parsers::message::Message::try_from(el).expect("message");
        assert!(answer(Stanza::Message(msg)).is_none());
    }
}
