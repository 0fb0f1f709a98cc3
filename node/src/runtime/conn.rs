//! Connections: the pre-XML preface (session or invite redemption), the
//! one-session-per-contact rule, and the session loop.
//!
//! Preface, written by the dialer right after the TLS handshake:
//!
//! ```text
//! "CTR1" mode:u8                          mode 1: resume our session
//! "CTR1" 2 invite_id:16 proof:32 n:u8 name:n   mode 2: redeem an invite
//!                    ◀── status:u8        (mode 2 only; 0 = accepted)
//! ```
//!
//! Both the preface and the answer are zero-padded to 256 bytes.
//!
//! It is fixed-size binary on purpose: a key admitted only because an invite
//! is open gets no further than these bytes unless its proof verifies, so
//! nothing from a stranger ever reaches the XML parser.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use transport::{Authenticated, GateKey, PeerAddr, PeerId};

use super::{ConnEntry, NodeEvent, Shared, db};
use crate::invite::{check_proof, redeem_proof, valid_name};
use crate::store::OmemoCtx;
use crate::store::{Contact, ContactState, RedeemError};
use crate::stream::jingle;
use crate::stream::session::{Event, Params, Role, Session};

const MAGIC: &[u8; 4] = b"CTR1";
/// The preface and the redemption answer are padded to this size, like every
/// other write on the wire (see `stream::padding`).
const PREFACE_LEN: usize = 256;
const MODE_SESSION: u8 = 1;
const MODE_REDEEM: u8 = 2;
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const IDLE_PING: Duration = Duration::from_secs(30);
const IDLE_DEAD: Duration = Duration::from_secs(90);
/// With our stanzas unacknowledged, ask for an ack this often.
const ACTIVE_PING: Duration = Duration::from_secs(2);
/// A ping unanswered this long means the path is gone (a cut LAN link
/// never says so): the session moves to another candidate. Tor's round
/// trips are longer and more variable.
const PING_DEADLINE_LAN: Duration = Duration::from_secs(6);
const PING_DEADLINE_TOR: Duration = Duration::from_secs(30);
/// How long the LAN candidates have to themselves before the onion
/// service is dialled too.
const ONION_HEAD_START: Duration = Duration::from_secs(2);
/// A stream up this long is no longer part of a simultaneous dial.
const SETTLED: Duration = Duration::from_secs(5);
/// While the stream runs over Tor, LAN candidates are retried at most this
/// far apart.
const UPGRADE_BACKOFF_MAX: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Most of our stanzas in flight (sent, not yet acknowledged) per session.
const WINDOW: u64 = 256;
/// Most padded units waiting for the writer; a peer that lets more pile up
/// has stopped reading and is disconnected.
const WRITE_QUEUE: usize = 4096;

/// Flow state of one connection: what we sent, what they acknowledged.
#[derive(Debug, Default)]
struct Flow {
    /// Our stanzas up to this number were written on this connection
    /// (`None` until the stream is resumed).
    sent: Option<u64>,
    /// Our stanzas up to this number were acknowledged.
    acked: u64,
    /// OMEMO context of this conversation.
    ctx: Option<OmemoCtx>,
    /// A queued chat waits for a trusted device's bundle.
    waiting: bool,
}

/// A store operation from connection code, off the async threads; errors
/// become the text the session logs when it ends.
async fn store_op<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&crate::store::Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, String> {
    db(&shared.store, f)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Changes a contact record in place; `f` returns whether anything changed.
async fn edit_contact(
    shared: &Shared,
    id: u64,
    f: impl FnOnce(&mut Contact) -> bool + Send + 'static,
) -> Result<(), String> {
    store_op(shared, move |s| {
        if let Some(mut c) = s.contact(id)?
            && f(&mut c)
        {
            s.update_contact(&c)?;
        }
        Ok(())
    })
    .await
}

/// Commands to a session task.
#[derive(Debug)]
pub(crate) enum ConnCmd {
    /// New stanzas are queued in the store.
    OutboxGrew,
    /// The contact was removed: end the stream.
    Close,
}

fn status_of(e: &RedeemError) -> u8 {
    match e {
        RedeemError::Unknown => 1,
        RedeemError::Used => 2,
        RedeemError::Expired => 3,
        RedeemError::BadProof => 4,
        RedeemError::AlreadyContact => 5,
    }
}

fn reason_of(status: u8) -> &'static str {
    match status {
        1 => "the inviter does not know this invite",
        2 => "the invite was already used",
        3 => "the invite expired",
        4 => "the invite proof was refused",
        5 => "the inviter already has this contact",
        _ => "the inviter refused the invite",
    }
}

/// Accepts authenticated streams from every listener.
pub(crate) async fn accept_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Authenticated>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let a = tokio::select! {
            a = rx.recv() => match a { Some(a) => a, None => return },
            _ = shutdown.changed() => return,
        };
        let s = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = inbound(s, a).await {
                tracing::debug!("inbound connection ended: {e}");
            }
        });
    }
}

async fn inbound(shared: Arc<Shared>, mut a: Authenticated) -> Result<(), String> {
    let peer = a.peer;
    let reject = |why: &str| {
        shared
            .stats
            .prefaces_rejected
            .fetch_add(1, Ordering::Relaxed);
        why.to_string()
    };
    let mut pre = [0u8; PREFACE_LEN];
    tokio::time::timeout(PREFACE_TIMEOUT, a.io.read_exact(&mut pre))
        .await
        .map_err(|_| reject("preface timed out"))?
        .map_err(|e| reject(&e.to_string()))?;
    if &pre[..4] != MAGIC {
        return Err(reject("bad preface"));
    }
    let known = shared
        .contacts
        .read()
        .ok()
        .and_then(|c| c.get(&peer).copied());
    let contact = match pre[4] {
        MODE_SESSION => {
            let Some(id) = known else {
                return Err(reject("session from a non-contact"));
            };
            let c = store_op(&shared, move |s| s.contact(id)).await?;
            match c {
                Some(c) if c.state == ContactState::Active => c.id,
                _ => return Err(reject("session from a contact that is not active")),
            }
        }
        MODE_REDEEM => redeem_inbound(&shared, &mut a, &pre)
            .await
            .map_err(|e| reject(&e))?,
        _ => return Err(reject("unknown preface mode")),
    };
    run_session(shared, a, Role::Responder, peer, contact).await;
    Ok(())
}

async fn redeem_inbound(
    shared: &Arc<Shared>,
    a: &mut Authenticated,
    pre: &[u8; PREFACE_LEN],
) -> Result<u64, String> {
    let fixed = &pre[5..5 + 49];
    let n = fixed[48] as usize;
    if n == 0 || n > 64 {
        return Err("bad name length".into());
    }
    let name = pre[54..54 + n].to_vec();
    let name = String::from_utf8(name)
        .ok()
        .filter(|n| valid_name(n))
        .unwrap_or_else(|| "contact".into());
    let mut invite_id = [0u8; 16];
    invite_id.copy_from_slice(&fixed[..16]);
    let mut proof = [0u8; 32];
    proof.copy_from_slice(&fixed[16..48]);
    let (me, peer, binding) = (shared.me, a.peer, a.channel_binding);
    let contact = Contact {
        id: 0,
        name,
        peer: *peer.as_bytes(),
        addrs: Vec::new(),
        state: ContactState::Active,
        added: crate::ops::now_secs(),
        last_seen: None,
        last_carrier: None,
    };
    let now = crate::ops::now_secs();
    let res = store_op(shared, move |s| {
        s.redeem_invite(
            &invite_id,
            now,
            |secret| check_proof(secret, &me, &peer, &binding, &proof),
            contact,
        )
    })
    .await?;
    let status = match &res {
        Ok(_) => 0,
        Err(e) => status_of(e),
    };
    // The gate and the contact list change before the answer goes out: a
    // used invite's ticket must not open the gate once the invitee has
    // seen its redemption succeed.
    shared.refresh_policy().await;
    let mut answer = [0u8; PREFACE_LEN];
    answer[0] = status;
    a.io.write_all(&answer).await.map_err(|e| e.to_string())?;
    a.io.flush().await.map_err(|e| e.to_string())?;
    match res {
        Ok(c) => {
            tracing::info!(peer = %peer.short(), "invite redeemed: new contact");
            // A group's link: the new contact joins the group too.
            if let Ok(Some(group)) = store_op(shared, move |s| s.invite_group(&invite_id)).await {
                super::groups::redeemed(shared, &group, peer).await;
            }
            Ok(c.id)
        }
        Err(e) => Err(format!("invite redemption refused: {e}")),
    }
}

/// Keeps a connection to every contact that has addresses.
pub(crate) async fn dial_manager(shared: Arc<Shared>) {
    let mut running = std::collections::HashSet::new();
    let mut shutdown = shared.shutdown.clone();
    loop {
        let ids: Vec<u64> = shared
            .contacts
            .read()
            .map(|c| c.values().copied().collect())
            .unwrap_or_default();
        for id in ids {
            if running.insert(id) {
                tokio::spawn(dialer(shared.clone(), id));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn dialer(shared: Arc<Shared>, contact: u64) {
    let kick = shared.kick(contact);
    let found_new = shared.found(contact);
    let mut shutdown = shared.shutdown.clone();
    let mut backoff = BACKOFF_MIN;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let over_tor = shared.live_carrier(contact) == Some(transport::Carrier::Onion);
        if over_tor {
            // Jingle: the stream runs over Tor; try the LAN candidates. A
            // stream that opens there takes the session over.
            match lan_candidates(&shared, contact).await {
                Some((c, lan)) if !lan.is_empty() => {
                    match dial_once(&shared, &c, &lan, &found_new).await {
                        Ok(()) => backoff = BACKOFF_MIN,
                        Err(DialEnd::FreshAddresses) => continue,
                        Err(DialEnd::Failed(e)) => {
                            tracing::debug!(contact, "LAN candidates failed: {e}");
                            backoff = (backoff * 2).min(UPGRADE_BACKOFF_MAX);
                        }
                    }
                }
                _ => backoff = (backoff * 2).min(UPGRADE_BACKOFF_MAX),
            }
        } else if !shared.is_connected(contact) {
            let c = match db(&shared.store, move |s| s.contact(contact)).await {
                Ok(Ok(Some(c))) => Some(c),
                Ok(Ok(None)) => return, // the contact is gone
                _ => None,              // a passing store error: try again later
            };
            let Some(c) = c else {
                tokio::time::sleep(backoff).await;
                continue;
            };
            if matches!(
                c.state,
                ContactState::Refused { .. }
                    | ContactState::Cleartext { .. }
                    | ContactState::Bridged { .. }
            ) {
                // Refused: nothing to do. Cleartext: the compat module talks
                // to it. Bridged: the bridge does.
                return;
            }
            // The onion service last: the LAN is faster when it works.
            let mut addrs = direct_candidates(&shared, &c);
            if shared.tor.is_some()
                && let Ok(p) = PeerId::from_bytes(c.peer)
            {
                addrs.push(PeerAddr::Onion(p, transport::onion::ONION_PORT));
            }
            if !addrs.is_empty() {
                match dial_once(&shared, &c, &addrs, &found_new).await {
                    Ok(()) => backoff = BACKOFF_MIN,
                    Err(DialEnd::FreshAddresses) => {
                        backoff = BACKOFF_MIN;
                        continue;
                    }
                    Err(DialEnd::Failed(e)) => {
                        tracing::debug!(contact, "dial failed: {e}");
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
        // Jitter keeps two nodes from retrying in lockstep.
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = kick.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The contact and its LAN candidates, for a switch away from Tor.
async fn lan_candidates(shared: &Arc<Shared>, contact: u64) -> Option<(Contact, Vec<PeerAddr>)> {
    let c = match db(&shared.store, move |s| s.contact(contact)).await {
        Ok(Ok(Some(c))) if c.state == ContactState::Active => c,
        _ => return None,
    };
    let addrs = direct_candidates(shared, &c);
    Some((c, addrs))
}

/// A contact's LAN and direct candidates: what discovery found first
/// (stored addresses may be stale), then those its Jingle `transport-info`
/// named. Never the onion service.
fn direct_candidates(shared: &Shared, c: &Contact) -> Vec<PeerAddr> {
    let known: Vec<PeerAddr> = c.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    let found = match (&shared.cfg.discovery, PeerId::from_bytes(c.peer)) {
        (Some(d), Ok(p)) => d.lookup(&p),
        _ => Vec::new(),
    };
    let mut addrs = discovery::merge(&[&found, &known]);
    addrs.retain(|a| a.carrier() != transport::Carrier::Onion);
    addrs
}

/// Whether an error means the peer refused our ticket or key in the TLS handshake (as
/// opposed to being unreachable). TLS 1.3 reports a refused client key only
/// after the client's handshake completes, so this shows up on the first read.
fn refused_by_peer(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("alert")
        || m.contains("cryptographic handshake failed")
        || m.contains("refused our key")
        || m.contains("refused our ticket")
}

async fn mark_refused(shared: &Arc<Shared>, id: u64, reason: &str) -> Result<(), String> {
    tracing::warn!(contact = id, "invite refused: {reason}");
    set_contact_state(
        shared,
        id,
        ContactState::Refused {
            reason: reason.to_string(),
        },
    )
    .await
}

/// Records a contact's new lifecycle state and refreshes the TLS policy.
async fn set_contact_state(
    shared: &Arc<Shared>,
    id: u64,
    state: ContactState,
) -> Result<(), String> {
    edit_contact(shared, id, move |c| {
        c.state = state;
        true
    })
    .await?;
    shared.refresh_policy().await;
    Ok(())
}

const REFUSED_AT_HANDSHAKE: &str = "the inviter's node refused the connection: the invite was already used, expired or withdrawn; ask for a new one";

/// Dials the contact's addresses in order; on success runs the session to its end.
/// How a dial attempt ended without a session.
enum DialEnd {
    /// Discovery found fresh addresses while we were connecting to older
    /// ones: start over with them.
    FreshAddresses,
    /// It failed.
    Failed(String),
}

impl From<String> for DialEnd {
    fn from(e: String) -> Self {
        DialEnd::Failed(e)
    }
}

impl From<&str> for DialEnd {
    fn from(e: &str) -> Self {
        DialEnd::Failed(e.to_string())
    }
}

/// Dials `addrs` in order and runs the session on the first that answers.
/// Only the connecting (TCP/QUIC and TLS handshake) is abandoned when fresh
/// addresses arrive, never a running session.
async fn dial_once(
    shared: &Arc<Shared>,
    c: &Contact,
    addrs: &[PeerAddr],
    found_new: &tokio::sync::Notify,
) -> Result<(), DialEnd> {
    let peer = PeerId::from_bytes(c.peer).map_err(|e| e.to_string())?;
    let gate = match &c.state {
        ContactState::Redeeming { secret, .. } => GateKey::for_invite(secret),
        _ => GateKey::for_pair(&shared.key, &peer).ok_or("the contact's key is not usable")?,
    };
    // One attempt: every candidate at once, the first stream wins. A
    // stopping node does not wait for a slow dial (an onion service can
    // take a minute): it holds the store open.
    let mut shutdown = shared.shutdown.clone();
    let connected = tokio::select! {
        r = connect_first(shared, addrs, peer, &gate) => r,
        () = found_new.notified() => return Err(DialEnd::FreshAddresses),
        _ = shutdown.wait_for(|stop| *stop) => return Err(DialEnd::Failed("the node is stopping".into())),
    };
    match connected {
        Ok(mut a) => {
            match &c.state {
                ContactState::Redeeming { invite_id, secret } => {
                    let proof = redeem_proof(secret, &peer, &shared.me, &a.channel_binding);
                    let name = store_op(shared, |s| s.profile().map(|p| p.name)).await?;
                    let mut pre = Vec::with_capacity(PREFACE_LEN);
                    pre.extend_from_slice(MAGIC);
                    pre.push(MODE_REDEEM);
                    pre.extend_from_slice(invite_id);
                    pre.extend_from_slice(&proof);
                    pre.push(name.len() as u8);
                    pre.extend_from_slice(name.as_bytes());
                    pre.resize(PREFACE_LEN, 0);
                    a.io.write_all(&pre).await.map_err(|e| e.to_string())?;
                    a.io.flush().await.map_err(|e| e.to_string())?;
                    let mut st = [0u8; PREFACE_LEN];
                    let read = tokio::time::timeout(PREFACE_TIMEOUT, a.io.read_exact(&mut st))
                        .await
                        .map_err(|_| "no answer to the invite")?;
                    if let Err(e) = read {
                        if refused_by_peer(&e.to_string()) {
                            mark_refused(shared, c.id, REFUSED_AT_HANDSHAKE).await?;
                        }
                        return Err(DialEnd::Failed(e.to_string()));
                    }
                    let id = c.id;
                    let new_state = if st[0] == 0 {
                        ContactState::Active
                    } else {
                        tracing::warn!(
                            contact = id,
                            "invite refused by the inviter: {}",
                            reason_of(st[0])
                        );
                        ContactState::Refused {
                            reason: reason_of(st[0]).into(),
                        }
                    };
                    let accepted = new_state == ContactState::Active;
                    set_contact_state(shared, id, new_state).await?;
                    if !accepted {
                        return Err("invite refused".into());
                    }
                }
                ContactState::Active => {
                    let mut pre = MAGIC.to_vec();
                    pre.push(MODE_SESSION);
                    pre.resize(PREFACE_LEN, 0);
                    a.io.write_all(&pre).await.map_err(|e| e.to_string())?;
                }
                ContactState::Refused { .. } => return Err("invite was refused".into()),
                ContactState::Cleartext { .. } => {
                    return Err("a classic XEP-0174 contact is never dialled with TLS".into());
                }
                ContactState::Bridged { .. } => {
                    return Err("a bridged contact is reached through the bridge".into());
                }
            }
            run_session(shared.clone(), a, Role::Initiator, shared.me, c.id).await;
            Ok(())
        }
        Err(e) => {
            if matches!(c.state, ContactState::Redeeming { .. }) && refused_by_peer(&e) {
                mark_refused(shared, c.id, REFUSED_AT_HANDSHAKE).await?;
            }
            Err(DialEnd::Failed(e))
        }
    }
}

/// Dials every candidate at once ("happy eyeballs"); the first
/// authenticated stream wins and the others are dropped before anything is
/// written on them. The onion service starts [`ONION_HEAD_START`] after the
/// LAN candidates, so a live LAN path wins and a dead one (a QUIC dial
/// waits out its handshake timeout) does not hold up Tor.
async fn connect_first(
    shared: &Arc<Shared>,
    addrs: &[PeerAddr],
    peer: PeerId,
    gate: &GateKey,
) -> Result<Authenticated, String> {
    use futures::StreamExt as _;
    let has_lan = addrs
        .iter()
        .any(|a| a.carrier() != transport::Carrier::Onion);
    let mut pending: futures::stream::FuturesUnordered<_> = addrs
        .iter()
        .filter_map(|addr| {
            let t = shared
                .transports
                .iter()
                .find(|t| t.carrier() == addr.carrier())?;
            let wait = if has_lan && addr.carrier() == transport::Carrier::Onion {
                ONION_HEAD_START
            } else {
                Duration::ZERO
            };
            Some(async move {
                tokio::time::sleep(wait).await;
                t.dial(addr, peer, gate).await
            })
        })
        .collect();
    // A refusal says more than an unreachable address: it is what a
    // redeeming dialer must see.
    let mut last = String::from("no transport for these addresses");
    let mut refused = None;
    while let Some(r) = pending.next().await {
        match r {
            Ok(a) => return Ok(a),
            Err(e) => {
                last = e.to_string();
                if refused_by_peer(&last) {
                    refused = Some(last.clone());
                }
            }
        }
    }
    Err(refused.unwrap_or(last))
}

fn session_id(a: &PeerId, b: &PeerId) -> String {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let mut h = sha2::Sha256::new();
    h.update(b"coterie session v1");
    h.update(lo.as_bytes());
    h.update(hi.as_bytes());
    data_encoding::HEXLOWER.encode(&h.finalize()[..12])
}

/// Registers a connection under the one-connection-per-contact rule: a
/// newer connection from the same side replaces the older (that side's
/// old stream is gone, or it found a better path); between the two sides,
/// a LAN stream replaces one over Tor (the Jingle switch, see
/// `stream::jingle`), and on equal footing the connection dialled by the
/// smaller key wins. Both nodes apply the same rule, so they keep the same
/// connection.
fn register(
    shared: &Shared,
    contact: u64,
    initiator: PeerId,
    carrier: transport::Carrier,
) -> Option<(u64, mpsc::Receiver<ConnCmd>, Arc<tokio::sync::Notify>)> {
    let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(old) = conns.get(&contact) {
        let keep_old = if old.initiator == initiator || jingle::better(carrier, old.carrier) {
            false
        } else if old.resumed && old.since.elapsed() >= SETTLED {
            // The peer dialled although this stream has been up a while:
            // on its side the stream is gone (it dials only then, or for a
            // better path), so ours is a dead one that has not noticed yet.
            false
        } else if jingle::better(old.carrier, carrier) {
            true
        } else {
            old.initiator < initiator
        };
        if keep_old {
            return None;
        }
        // A stored permit: the old session sees it even if it is busy now.
        old.close.notify_one();
    }
    let conn_id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel(8);
    let close = Arc::new(tokio::sync::Notify::new());
    conns.insert(
        contact,
        ConnEntry {
            conn_id,
            initiator,
            carrier,
            cmd: tx,
            close: close.clone(),
            since: Instant::now(),
            resumed: false,
        },
    );
    Some((conn_id, rx, close))
}

fn unregister(shared: &Shared, contact: u64, conn_id: u64) {
    let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
    if conns.get(&contact).map(|e| e.conn_id) == Some(conn_id) {
        conns.remove(&contact);
    }
}

fn still_current(shared: &Shared, contact: u64, conn_id: u64) -> bool {
    shared
        .conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&contact)
        .map(|e| e.conn_id)
        == Some(conn_id)
}

async fn run_session(
    shared: Arc<Shared>,
    a: Authenticated,
    role: Role,
    initiator: PeerId,
    contact: u64,
) {
    let peer = a.peer;
    let carrier = a.carrier;
    let Some((conn_id, cmd_rx, close)) = register(&shared, contact, initiator, carrier) else {
        tracing::debug!(peer = %peer.short(), "duplicate connection dropped");
        return;
    };
    // One session per contact at a time: wait for a replaced one to finish.
    let lock = shared.session_lock(contact);
    let guard = tokio::time::timeout(Duration::from_secs(15), lock.lock_owned()).await;
    let Ok(_guard) = guard else {
        unregister(&shared, contact, conn_id);
        return;
    };
    if !still_current(&shared, contact, conn_id) {
        return;
    }
    let span = tracing::info_span!("session", peer = %peer.short(), %carrier);
    let result = tracing::Instrument::instrument(
        session_loop(&shared, a, role, contact, conn_id, cmd_rx, close),
        span,
    )
    .await;
    unregister(&shared, contact, conn_id);
    super::groups::disconnected(&shared, contact).await;
    super::hold::disconnected(&shared, contact);
    match &result {
        Ok(()) => tracing::debug!(peer = %peer.short(), "session ended"),
        Err(e) => tracing::info!(peer = %peer.short(), "session ended: {e}"),
    }
    let now = crate::ops::now_secs();
    let c = carrier.to_string();
    let _ = edit_contact(&shared, contact, move |ct| {
        ct.last_seen = Some(now);
        ct.last_carrier = Some(c);
        true
    })
    .await;
    let _ = shared
        .events
        .send(NodeEvent::Connection { contact, up: false });
    // Wake the dialer: the contact may be reachable again soon.
    shared.kick(contact).notify_one();
}

/// Hands the session's padded units to the writer task.
fn write_out(session: &mut Session, wtx: &mpsc::Sender<Vec<u8>>) -> Result<(), String> {
    while let Some(unit) = session.poll_transmit() {
        wtx.try_send(unit).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "peer stopped reading".to_string(),
            mpsc::error::TrySendError::Closed(_) => "connection lost while writing".to_string(),
        })?;
    }
    Ok(())
}

/// Writes units in order, each as its own write (hence its own TLS
/// record(s)), flushing when the queue runs dry. Runs beside the reader so
/// that a session never stops reading while it writes.
async fn writer_task(mut wr: impl AsyncWriteExt + Unpin, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(unit) = rx.recv().await {
        match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&unit)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        if rx.is_empty()
            && !matches!(
                tokio::time::timeout(WRITE_TIMEOUT, wr.flush()).await,
                Ok(Ok(()))
            )
        {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

async fn session_loop(
    shared: &Arc<Shared>,
    a: Authenticated,
    role: Role,
    contact: u64,
    conn_id: u64,
    cmd_rx: mpsc::Receiver<ConnCmd>,
    close: Arc<tokio::sync::Notify>,
) -> Result<(), String> {
    let peer = a.peer;
    let st = store_op(shared, move |s| s.peer_state(contact)).await?;
    let params = Params {
        role,
        local: shared.me.onion_address(),
        peer: peer.onion_address(),
        session_id: session_id(&shared.me, &peer),
        in_h: st.in_h,
        out_acked: st.out_acked,
        limits: shared.cfg.limits,
        rate: shared.cfg.rate,
        padding: shared.padding,
    };
    let session = Session::new(params, Instant::now());
    let (rd, wr) = tokio::io::split(a.io);
    let (wtx, wrx) = mpsc::channel(WRITE_QUEUE);
    let writer = tokio::spawn(writer_task(wr, wrx));
    let ids = Ids {
        contact,
        conn_id,
        peer,
        carrier: a.carrier,
    };
    let result = read_loop(shared, session, rd, &wtx, ids, cmd_rx, close).await;
    // Let the writer flush what is queued (a closing tag, a stream error).
    drop(wtx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    result
}

/// Which contact and which connection a session loop serves.
#[derive(Debug, Clone, Copy)]
struct Ids {
    contact: u64,
    conn_id: u64,
    peer: PeerId,
    carrier: transport::Carrier,
}

async fn read_loop(
    shared: &Arc<Shared>,
    mut session: Session,
    mut rd: impl AsyncReadExt + Unpin,
    wtx: &mpsc::Sender<Vec<u8>>,
    ids: Ids,
    mut cmd_rx: mpsc::Receiver<ConnCmd>,
    close: Arc<tokio::sync::Notify>,
) -> Result<(), String> {
    let Ids {
        contact, conn_id, ..
    } = ids;
    // Large reads mean large batches: one store transaction (one fsync) per read.
    let mut buf = vec![0u8; 256 * 1024];
    let mut flow = Flow {
        ctx: shared.omemo.ctx(*ids.peer.as_bytes()),
        ..Flow::default()
    };
    let mut last_rx = Instant::now();
    let mut last_ping = last_rx;
    // When the oldest ping still without any answer went out.
    let mut unanswered: Option<Instant> = None;
    let deadline = match ids.carrier {
        transport::Carrier::Onion => PING_DEADLINE_TOR,
        _ => PING_DEADLINE_LAN,
    };
    let mut shutdown = shared.shutdown.clone();
    // With jitter on, new messages leave at this time (the whole queue
    // waits, so the order holds).
    let mut send_at: Option<Instant> = None;
    write_out(&mut session, wtx)?;
    loop {
        // A peer over its rate is not read until its time comes (back-pressure),
        // but commands, shutdown and the idle check still run.
        let throttle = session.throttle_until().filter(|t| *t > Instant::now());
        let paused = throttle.is_some();
        let resume = tokio::time::sleep_until(throttle.unwrap_or_else(Instant::now).into());
        let waiting = flow.sent.is_some_and(|sent| sent > flow.acked);
        let every = if waiting { ACTIVE_PING } else { IDLE_PING };
        let idle = tokio::time::sleep_until((last_rx.max(last_ping) + every).into());
        let jittered = tokio::time::sleep_until(send_at.unwrap_or_else(Instant::now).into());
        tokio::select! {
            _ = resume, if paused => {}
            _ = jittered, if send_at.is_some() => {
                send_at = None;
                send_outbox(shared, &mut session, contact, &mut flow).await?;
            }
            () = close.notified() => {
                session.close();
                let _ = write_out(&mut session, wtx);
                return Ok(());
            }
            r = rd.read(&mut buf), if !paused => {
                let mut n = r.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed by peer".into());
                }
                // Take whatever else is already here (TLS hands out one record
                // per read): a bigger batch is one store transaction instead of many.
                let mut eof = false;
                while n + 16 * 1024 <= buf.len() {
                    // Poll once: ready data is taken, anything else means "nothing more now".
                    let mut more = std::pin::pin!(rd.read(&mut buf[n..]));
                    let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(more.as_mut().poll(cx))).await;
                    match polled {
                        std::task::Poll::Ready(Ok(0)) => {
                            eof = true;
                            break;
                        }
                        std::task::Poll::Ready(Ok(k)) => n += k,
                        std::task::Poll::Ready(Err(e)) => return Err(e.to_string()),
                        std::task::Poll::Pending => break,
                    }
                }
                last_rx = Instant::now();
                unanswered = None;
                shared.stats.xml_bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                let mut events = session.handle_input(&buf[..n], last_rx).into_iter().peekable();
                while let Some(ev) = events.next() {
                    // An ack followed by stanzas: one transaction, one disk sync.
                    if let Event::Acked(h) = ev
                        && let Some(Event::Stanzas(_)) = events.peek()
                        && let Some(Event::Stanzas(items)) = events.next()
                    {
                        store_batch(shared, &mut session, contact, &mut flow, Some(h), items).await?;
                        continue;
                    }
                    handle_event(shared, &mut session, contact, conn_id, &mut flow, ev).await?;
                }
                if eof {
                    write_out(&mut session, wtx)?;
                    return Err("connection closed by peer".into());
                }
            }
            cmd = cmd_rx.recv() => match cmd {
                Some(ConnCmd::OutboxGrew) => {
                    let delay = shared.jitter.draw(&mut rand::thread_rng());
                    match delay {
                        None => send_outbox(shared, &mut session, contact, &mut flow).await?,
                        Some(d) => {
                            send_at.get_or_insert_with(|| Instant::now() + d);
                        }
                    }
                }
                Some(ConnCmd::Close) | None => {
                    session.close();
                    let _ = write_out(&mut session, wtx);
                    return Ok(());
                }
            },
            _ = idle => {
                if unanswered.is_some_and(|t| t.elapsed() >= deadline) {
                    return Err(format!("no answer to a ping in {} s: the path is gone", deadline.as_secs()));
                }
                if last_rx.elapsed() >= IDLE_DEAD {
                    return Err("peer silent for too long".into());
                }
                last_ping = Instant::now();
                unanswered.get_or_insert(last_ping);
                session.request_ack();
            }
            _ = shutdown.changed() => {
                session.close();
                let _ = write_out(&mut session, wtx);
                return Ok(());
            }
        }
        write_out(&mut session, wtx)?;
        if session.is_closed() {
            return Ok(());
        }
    }
}

async fn handle_event(
    shared: &Arc<Shared>,
    session: &mut Session,
    contact: u64,
    conn_id: u64,
    flow: &mut Flow,
    ev: Event,
) -> Result<(), String> {
    match ev {
        Event::Resumed { peer_h } => {
            let sent = store_op(shared, move |s| s.ack_outgoing(contact, peer_h)).await?;
            for seq in sent {
                let _ = shared.events.send(NodeEvent::Sent { contact, seq });
            }
            flow.sent = Some(peer_h);
            flow.acked = peer_h;
            {
                let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(e) = conns.get_mut(&contact).filter(|e| e.conn_id == conn_id) {
                    e.resumed = true;
                }
            }
            // After `resumed` is set: a subscriber that asks for the
            // contact's state on this event sees it connected.
            let _ = shared
                .events
                .send(NodeEvent::Connection { contact, up: true });
            shared.stats.sessions.fetch_add(1, Ordering::Relaxed);
            tracing::info!("session resumed");
            session.send_candidates(&shared.reachable_at());
            announce(shared, session).await?;
            super::groups::connected(shared, contact).await;
            super::hold::connected(shared, contact).await;
            send_outbox(shared, session, contact, flow).await?;
        }
        Event::Stanzas(items) => store_batch(shared, session, contact, flow, None, items).await?,
        Event::Acked(h) => {
            tracing::trace!(h, "ack");
            let sent = store_op(shared, move |s| s.ack_outgoing(contact, h)).await?;
            for seq in sent {
                let _ = shared.events.send(NodeEvent::Sent { contact, seq });
            }
            flow.acked = flow.acked.max(h);
            // The window opened: send more.
            send_outbox(shared, session, contact, flow).await?;
        }
        Event::Addresses(addrs) => {
            // The onion candidate is the peer's key, which we have.
            let valid: Vec<String> = addrs
                .into_iter()
                .filter(|a| {
                    matches!(
                        a,
                        PeerAddr::Tcp(_) | PeerAddr::Quic(_) | PeerAddr::Memory(_)
                    )
                })
                .map(|a| a.to_string())
                .collect();
            edit_contact(shared, contact, move |c| {
                let changed = c.addrs != valid;
                c.addrs = valid;
                changed
            })
            .await?;
        }
        Event::Pep(el) => match crate::omemo::pep::parse_event(&el) {
            Ok(items) if !items.is_empty() => {
                let pinned = flow.ctx.as_ref().map(|c| c.pinned).unwrap_or_default();
                let now = crate::ops::now_ms() / 1000;
                let learned =
                    store_op(shared, move |s| s.omemo_learn(contact, pinned, items, now)).await?;
                tracing::debug!(
                    can_send = learned.can_send,
                    waiting = flow.waiting,
                    "learned the contact's OMEMO keys"
                );
                if learned.can_send && flow.waiting {
                    send_outbox(shared, session, contact, flow).await?;
                }
            }
            Ok(_) => {}
            // A broken bundle or list: refused, the stream goes on.
            Err(e) => tracing::warn!("refused an OMEMO announcement from a contact: {e}"),
        },
        Event::Closed => return Err("peer closed the stream".into()),
        Event::PeerError(cond) => return Err(format!("peer sent stream error {cond}")),
        Event::Fault(f) => {
            shared.stats.stream_faults.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("closing stream after bad input from peer: {}", f.detail);
        }
    }
    Ok(())
}

/// Stores a batch of stanzas (and an ack that came with it), then
/// acknowledges them: durable first, then the `<a/>`.
async fn store_batch(
    shared: &Arc<Shared>,
    session: &mut Session,
    contact: u64,
    flow: &mut Flow,
    ack: Option<u64>,
    items: Vec<crate::store::Incoming>,
) -> Result<(), String> {
    let now = crate::ops::now_ms();
    let n_items = items.len();
    let t0 = Instant::now();
    let ctx = flow.ctx.clone();
    let (sent, res) = store_op(shared, move |s| {
        s.ack_and_receive(contact, ack, &items, now, ctx.as_ref())
    })
    .await?;
    tracing::trace!(
        stanzas = n_items,
        ack = ack.is_some(),
        took_us = t0.elapsed().as_micros() as u64,
        "stored batch"
    );
    session.persisted(res.h);
    for seq in sent {
        let _ = shared.events.send(NodeEvent::Sent { contact, seq });
    }
    for &seq in &res.new_messages {
        tracing::debug!(seq, "message stored");
        shared.message_stored(contact, seq);
    }
    for &seq in &res.delivered {
        let _ = shared.events.send(NodeEvent::Delivered { contact, seq });
    }
    if let Some(h) = ack {
        flow.acked = flow.acked.max(h);
    }
    if res.bundle_changed {
        announce(shared, session).await?;
    }
    if !res.group_frames.is_empty() {
        super::groups::frames(shared, contact, res.group_frames).await;
    }
    super::hold::received(shared, contact, res.hold).await;
    if res.queued_stanzas || ack.is_some() {
        send_outbox(shared, session, contact, flow).await?;
    }
    Ok(())
}

/// Pushes our OMEMO device lists and bundles to the peer.
async fn announce(shared: &Arc<Shared>, session: &mut Session) -> Result<(), String> {
    let now = crate::ops::now_ms() / 1000;
    let own = store_op(shared, move |s| s.omemo_device(now)).await?;
    for el in crate::omemo::pep::announcements(&own, &shared.omemo.identity) {
        session.send_element(&el);
    }
    Ok(())
}

async fn send_outbox(
    shared: &Arc<Shared>,
    session: &mut Session,
    contact: u64,
    flow: &mut Flow,
) -> Result<(), String> {
    let Some(after) = flow.sent else {
        return Ok(());
    };
    // At most WINDOW of our stanzas in flight: the rest waits for acks.
    let room = (flow.acked + WINDOW).saturating_sub(after);
    // Refill only when half the window is free (or nothing is in flight):
    // trickling a few stanzas per ack makes tiny batches, each costing the
    // receiver a disk sync (silly-window avoidance, as in TCP).
    let in_flight = after > flow.acked;
    if !session.is_open() || room == 0 || (in_flight && room < WINDOW / 2) {
        return Ok(());
    }
    let Some(ctx) = flow.ctx.clone() else {
        return Ok(());
    };
    let out = store_op(shared, move |s| {
        s.outbox_encrypted(contact, after, room as usize, &ctx)
    })
    .await?;
    if out.waiting && !flow.waiting {
        tracing::info!("queued messages wait for the contact's OMEMO keys");
    }
    if !out.waiting && flow.waiting {
        tracing::debug!("queued messages go: the contact's OMEMO keys are known");
    }
    flow.waiting = out.waiting;
    for (n, st) in out.items {
        session.send(&st);
        flow.sent = Some(n);
    }
    Ok(())
}
