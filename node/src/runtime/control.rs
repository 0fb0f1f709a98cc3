//! The control socket: a Unix socket in the profile directory (mode 0600,
//! the directory 0700) through which `coterie send|history|contacts|status`
//! reach a running node. One JSON request per line, one JSON response per line.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::{Shared, db, groups};
use crate::ops::{self, ContactView, MessageView, OpError};

/// File name of the control socket inside the profile directory.
pub const SOCKET_NAME: &str = "control.sock";
const MAX_REQUEST: usize = 64 * 1024;

/// A request to the running node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Own identity.
    Id,
    /// New invite.
    Invite {
        /// Lifetime, e.g. `7d`.
        ttl: String,
    },
    /// Add a contact.
    Add {
        /// Invite URI.
        uri: String,
        /// Local name.
        name: Option<String>,
    },
    /// List contacts.
    Contacts,
    /// Remove a contact.
    Remove {
        /// Name or fingerprint prefix.
        contact: String,
    },
    /// Send a message.
    Send {
        /// Name or fingerprint prefix.
        contact: String,
        /// Text.
        text: String,
    },
    /// Message history.
    History {
        /// Name or fingerprint prefix.
        contact: String,
        /// Most recent N.
        limit: usize,
    },
    /// A contact's OMEMO devices and fingerprints.
    Fingerprints {
        /// Name or fingerprint prefix.
        contact: String,
    },
    /// Verify a contact's device.
    Verify {
        /// Name or fingerprint prefix.
        contact: String,
        /// Device id.
        device: u32,
    },
    /// Show or set message retention in days (0 = forever).
    Retention {
        /// New value, if setting.
        days: Option<u32>,
    },
    /// Show or change offline delivery through holders.
    Holding {
        /// What to change.
        change: crate::ops::HoldChange,
    },
    /// Set the bridge's account (replacing any) and start it.
    BridgeSet {
        /// The account.
        account: crate::bridge::BridgeAccount,
    },
    /// Remove the bridge's account and log out.
    BridgeOff,
    /// Create a group.
    GroupCreate {
        /// Its name.
        name: String,
    },
    /// Every group.
    GroupList,
    /// A link that makes its users contacts and members (admins).
    GroupLink {
        /// Group name or id prefix.
        group: String,
        /// Lifetime, e.g. `2h`.
        ttl: String,
        /// How many people may use it.
        uses: u32,
    },
    /// Add a contact to a group (admins).
    GroupInvite {
        /// Group name or id prefix.
        group: String,
        /// Contact name or fingerprint prefix.
        contact: String,
        /// As an admin.
        admin: bool,
    },
    /// A group's members.
    GroupMembers {
        /// Group name or id prefix.
        group: String,
    },
    /// Post to a group.
    GroupSend {
        /// Group name or id prefix.
        group: String,
        /// Text.
        text: String,
    },
    /// A group's history.
    GroupHistory {
        /// Group name or id prefix.
        group: String,
        /// Most recent N.
        limit: usize,
    },
    /// Leave a group.
    GroupLeave {
        /// Group name or id prefix.
        group: String,
    },
    /// Remove a member (admins).
    GroupRemove {
        /// Group name or id prefix.
        group: String,
        /// Contact name, or member key prefix.
        member: String,
    },
    /// Rename a group (admins).
    GroupRename {
        /// Group name or id prefix.
        group: String,
        /// New name.
        name: String,
    },
    /// What the bridge is doing.
    BridgeStatus,
    /// Node status.
    Status,
    /// Stop the node.
    Stop,
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether it worked.
    pub ok: bool,
    /// What went wrong (for people).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Exit code for the CLI.
    pub code: i32,
    /// The result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    fn ok(v: impl Serialize) -> Self {
        Response {
            ok: true,
            error: None,
            code: 0,
            data: serde_json::to_value(v).ok(),
        }
    }
    fn err(e: &OpError) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            code: e.exit_code(),
            data: None,
        }
    }
}

/// A peer with a live session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerView {
    /// Contact name.
    pub name: String,
    /// Carrier.
    pub transport: String,
    /// Seconds since the session started.
    pub since_secs: u64,
}

/// `coterie status`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// Whether a node is running (always true from the node).
    pub running: bool,
    /// Addresses the node listens on / announces.
    pub listening: Vec<String>,
    /// Live sessions.
    pub peers: Vec<PeerView>,
    /// Contacts known.
    pub contacts: usize,
    /// Stanzas waiting for acks, all contacts.
    pub queued: u64,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Counters.
    #[serde(default)]
    pub stats: StatsView,
    /// In the dangerous XEP-0174 compatibility mode: the name announced in
    /// the clear (`name@coterie-<random>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleartext_presence: Option<String>,
    /// In that mode: classic peers seen on the LAN (`coterie send NAME`
    /// to one of them starts a cleartext chat).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classic_peers: Vec<String>,
    /// Tor, when the node runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tor: Option<TorView>,
    /// The bridge to an ordinary XMPP account.
    #[serde(default = "bridge_off_status")]
    pub bridge: crate::bridge::BridgeStatus,
}

fn bridge_off_status() -> crate::bridge::BridgeStatus {
    crate::bridge::BridgeStatus::offline(None)
}

/// Tor's state, as `status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TorView {
    /// Bootstrap progress, 0–100.
    pub bootstrap_percent: u8,
    /// What arti is doing.
    pub phase: String,
    /// Why bootstrapping is stuck, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
    /// The onion service: `waiting for a first contact`, `Bootstrapping`,
    /// `Running`, `DegradedReachable`, …
    pub onion_service: String,
    /// How many contacts and open invites may read the service's descriptor.
    pub authorized: usize,
    /// The last error, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Counters since start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatsView {
    /// TLS handshakes refused because the client key is not admitted.
    pub tls_refused: u64,
    /// ClientHellos turned away by the gate (no certificate shown).
    pub gate_refused: u64,
    /// Connections closed at the preface.
    pub prefaces_rejected: u64,
    /// Bytes handed to the XML parser.
    pub xml_bytes_in: u64,
    /// Streams closed because of bad input.
    pub stream_faults: u64,
    /// Sessions resumed.
    pub sessions: u64,
    /// Messages from contacts stored since the node started.
    #[serde(default)]
    pub messages_in: u64,
}

/// Binds the control socket, replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another node is already running on this profile",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub(crate) async fn serve(shared: Arc<Shared>, listener: UnixListener, stop: watch::Sender<bool>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let (s, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let _ = handle_client(s, stream, stop).await;
        });
    }
}

async fn handle_client(
    shared: Arc<Shared>,
    stream: UnixStream,
    stop: watch::Sender<bool>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        // (the answer, whether the connection ends after it)
        let (resp, last) = match next_request(&mut rd).await? {
            Line::End => break,
            Line::TooLong => {
                let e = format!("control request longer than {MAX_REQUEST} bytes");
                (Response::err(&OpError::Usage(e)), true)
            }
            Line::Request(line) => match serde_json::from_slice::<Request>(&line) {
                Ok(req) => (dispatch(&shared, req, &stop).await, false),
                Err(e) => {
                    let e = format!("bad control request: {e}");
                    (Response::err(&OpError::Usage(e)), false)
                }
            },
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        wr.write_all(&out).await?;
        if last {
            break;
        }
    }
    Ok(())
}

/// One line read from a control client.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A request (without its newline).
    Request(Vec<u8>),
    /// Over [`MAX_REQUEST`] without a newline: the connection is closed.
    TooLong,
    /// The client closed the connection.
    End,
}

/// Reads the next request line: each line may be up to [`MAX_REQUEST`]
/// bytes, and a connection may carry any number of them (a client such as
/// the app keeps one connection for its whole life).
async fn next_request<R: tokio::io::AsyncBufRead + Unpin>(rd: &mut R) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let n = rd
        .take(MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(Line::End);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        Ok(Line::Request(line))
    } else if line.len() > MAX_REQUEST {
        Ok(Line::TooLong)
    } else {
        // The last line, without a newline: still a request.
        Ok(Line::Request(line))
    }
}

async fn dispatch(shared: &Arc<Shared>, req: Request, stop: &watch::Sender<bool>) -> Response {
    let r: Result<serde_json::Value, OpError> = async {
        Ok(match req {
            Request::Id => json(db(&shared.store, ops::id).await??),
            Request::Invite { ttl } => json(do_invite(shared, &ttl).await?),
            Request::Add { uri, name } => json(do_add(shared, &uri, name.as_deref()).await?),
            Request::Contacts => json(contacts(shared).await?),
            Request::Send { contact, text } => json(do_send(shared, &contact, &text).await?),
            Request::Remove { contact } => json(do_remove(shared, &contact).await?),
            Request::History { contact, limit } => {
                json(db(&shared.store, move |s| ops::history(s, &contact, limit)).await??)
            }
            Request::Retention { days } => {
                json(db(&shared.store, move |s| ops::retention(s, days)).await??)
            }
            Request::Holding { change } => {
                json(db(&shared.store, move |s| ops::holding(s, &change)).await??)
            }
            Request::Fingerprints { contact } => {
                json(db(&shared.store, move |s| ops::fingerprints(s, &contact)).await??)
            }
            Request::Verify { contact, device } => {
                json(db(&shared.store, move |s| ops::verify(s, &contact, device)).await??)
            }
            Request::BridgeSet { account } => json(bridge_set(shared, account).await?),
            Request::BridgeOff => json(bridge_off(shared).await?),
            Request::BridgeStatus => json(shared.bridge_status()),
            Request::GroupCreate { name } => json(groups::create(shared, &name).await?),
            Request::GroupList => json(groups::list(shared).await?),
            Request::GroupLink { group, ttl, uses } => {
                json(groups::link(shared, &group, &ttl, uses).await?)
            }
            Request::GroupInvite {
                group,
                contact,
                admin,
            } => json(groups::add(shared, &group, &contact, admin).await?),
            Request::GroupMembers { group } => json(groups::members(shared, &group).await?),
            Request::GroupSend { group, text } => json(groups::send(shared, &group, &text).await?),
            Request::GroupHistory { group, limit } => {
                json(groups::history(shared, &group, limit).await?)
            }
            Request::GroupLeave { group } => json(groups::leave(shared, &group).await?),
            Request::GroupRemove { group, member } => {
                json(groups::remove(shared, &group, &member).await?)
            }
            Request::GroupRename { group, name } => {
                json(groups::rename(shared, &group, &name).await?)
            }
            Request::Status => json(status(shared)),
            Request::Stop => {
                let _ = stop.send(true);
                serde_json::Value::Null
            }
        })
    }
    .await;
    match r {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(&e),
    }
}

fn json(v: impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

pub(crate) async fn do_invite(shared: &Arc<Shared>, ttl: &str) -> Result<String, OpError> {
    invite_for(shared, ttl, None, None).await
}

/// An invite with this node's addresses, optionally a group's link usable
/// `uses` times; the gate opens for it at once.
pub(crate) async fn invite_for(
    shared: &Arc<Shared>,
    ttl: &str,
    group: Option<String>,
    uses: Option<u32>,
) -> Result<String, OpError> {
    let addrs = shared
        .advertised
        .read()
        .map(|a| a.clone())
        .unwrap_or_default();
    let ttl = ttl.to_string();
    let uri = db(&shared.store, move |s| {
        ops::invite_for(s, &ttl, &addrs, ops::now_secs(), group, uses)
    })
    .await??;
    shared.refresh_policy().await;
    Ok(uri)
}

pub(crate) async fn do_add(
    shared: &Arc<Shared>,
    uri: &str,
    name: Option<&str>,
) -> Result<ContactView, OpError> {
    let (uri, name) = (uri.to_string(), name.map(str::to_string));
    let v = db(&shared.store, move |s| {
        ops::add(s, &uri, name.as_deref(), ops::now_secs())
    })
    .await??;
    shared.refresh_policy().await;
    Ok(v)
}

pub(crate) async fn do_remove(
    shared: &Arc<Shared>,
    contact: &str,
) -> Result<ops::RemovedView, OpError> {
    let sel = contact.to_string();
    let (id, v) = db(&shared.store, move |s| ops::remove(s, &sel)).await??;
    shared.refresh_policy().await;
    shared.close_session(id);
    Ok(v)
}

pub(crate) async fn do_send(
    shared: &Arc<Shared>,
    contact: &str,
    text: &str,
) -> Result<MessageView, OpError> {
    if let Some(compat) = shared.compat.get() {
        let sel = contact.to_string();
        let known = db(&shared.store, move |s| ops::find_contact(s, &sel).is_ok()).await?;
        if !known {
            super::compat::contact_for_send(shared, compat, contact).await;
        }
    }
    let (contact, text) = (contact.to_string(), text.to_string());
    let own = shared.omemo.clone();
    let (c, m) = db(&shared.store, move |s| {
        ops::send(s, &contact, &text, ops::now_ms(), Some(&own))
    })
    .await??;
    shared.outbox_grew(c.id);
    Ok(m)
}

async fn contacts(shared: &Arc<Shared>) -> Result<Vec<ContactView>, OpError> {
    Ok(contacts_by_id(shared)
        .await?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// Every contact with its local id and live state.
pub(crate) async fn contacts_by_id(
    shared: &Arc<Shared>,
) -> Result<Vec<(u64, ContactView)>, OpError> {
    let all = db(&shared.store, |s| s.contacts()).await??;
    let mut out = Vec::new();
    for c in all {
        let live = shared
            .live_carrier(c.id)
            .map(|c| c.to_string())
            .or_else(|| {
                shared
                    .compat
                    .get()
                    .filter(|x| x.is_live(c.id))
                    .map(|_| "xep0174".to_string())
            });
        let store = shared.store.clone();
        let id = c.id;
        out.push((
            id,
            db(&store, move |s| ops::view(s, &c, live.as_deref())).await??,
        ));
    }
    Ok(out)
}

pub(crate) async fn bridge_set(
    shared: &Arc<Shared>,
    acct: crate::bridge::BridgeAccount,
) -> Result<crate::bridge::BridgeStatus, OpError> {
    let acct = db(&shared.store, move |s| ops::bridge_set(s, acct)).await??;
    shared.restart_bridge(Some(acct)).await;
    Ok(shared.bridge_status())
}

pub(crate) async fn bridge_off(shared: &Arc<Shared>) -> Result<bool, OpError> {
    let had = db(&shared.store, ops::bridge_off).await??;
    shared.restart_bridge(None).await;
    Ok(had)
}

pub(crate) fn status(shared: &Arc<Shared>) -> StatusView {
    let names: std::collections::HashMap<u64, String> = shared
        .store
        .contacts()
        .map(|cs| cs.into_iter().map(|c| (c.id, c.name)).collect())
        .unwrap_or_default();
    let peers = {
        let conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .iter()
            .filter(|(_, e)| e.resumed)
            .map(|(id, e)| PeerView {
                name: names.get(id).cloned().unwrap_or_default(),
                transport: e.carrier.to_string(),
                since_secs: e.since.elapsed().as_secs(),
            })
            .collect()
    };
    let queued = names
        .keys()
        .map(|id| shared.store.outbox_len(*id).unwrap_or(0))
        .sum();
    let tor = shared.tor.as_ref().map(|t| {
        let s = t.status();
        TorView {
            bootstrap_percent: s.bootstrap_percent,
            phase: s.phase,
            blocked: s.blocked,
            onion_service: s.service,
            authorized: s.authorized,
            error: s.error,
        }
    });
    StatusView {
        tor,
        running: true,
        listening: shared
            .reachable_at()
            .iter()
            .map(|a| a.to_string())
            .collect(),
        peers,
        contacts: names.len(),
        queued,
        uptime_secs: shared.started.elapsed().as_secs(),
        stats: {
            let st = &shared.stats;
            let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            StatsView {
                tls_refused: g(&st.tls_refused),
                gate_refused: g(&st.gate_refused),
                prefaces_rejected: g(&st.prefaces_rejected),
                xml_bytes_in: g(&st.xml_bytes_in),
                stream_faults: g(&st.stream_faults),
                sessions: g(&st.sessions),
                messages_in: g(&st.messages_in),
            }
        },
        cleartext_presence: shared.compat.get().map(|c| c.instance().to_string()),
        bridge: shared.bridge_status(),
        classic_peers: shared.compat.get().map(|c| c.seen()).unwrap_or_default(),
    }
}

/// Why the CLI could not talk to the node.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No node is listening.
    #[error("no node is running on this profile")]
    NotRunning,
    /// The node did not answer sensibly.
    #[error("the running node did not answer: {0}")]
    Broken(String),
}

/// Sends one request to the node running on the profile in `dir`.
pub async fn request(dir: &Path, req: &Request) -> Result<Response, ControlError> {
    let path = dir.join(SOCKET_NAME);
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|_| ControlError::NotRunning)?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Broken(e.to_string()))?;
    line.push(b'\n');
    wr.write_all(&line)
        .await
        .map_err(|e| ControlError::Broken(e.to_string()))?;
    let mut lines = BufReader::new(rd).lines();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| ControlError::Broken("timed out".into()))?
        .map_err(|e| ControlError::Broken(e.to_string()))?
        .ok_or_else(|| ControlError::Broken("connection closed".into()))?;
    serde_json::from_str(&resp).map_err(|e| ControlError::Broken(e.to_string()))
}

#[cfg(test)]
mod line_tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_carries_any_number_of_requests_each_bounded() {
        // 40,000 requests of about 60 bytes: 2.4 MB on one connection (the
        // old reader stopped the whole connection after 1 MiB, mid-line).
        let req = br#"{"cmd":"send","contact":"bob","text":"message number 12345"}"#;
        let mut input = Vec::new();
        for _ in 0..40_000 {
            input.extend_from_slice(req);
            input.push(b'\n');
        }
        let mut rd = BufReader::new(input.as_slice());
        let mut n = 0;
        loop {
            match next_request(&mut rd).await.expect("read") {
                Line::Request(l) => {
                    assert_eq!(l, req);
                    n += 1;
                }
                Line::End => break,
                Line::TooLong => panic!("a 60-byte request is not too long"),
            }
        }
        assert_eq!(n, 40_000);

        // A line over the limit is refused without reading it all into memory.
        let huge = vec![b'a'; MAX_REQUEST * 4];
        let mut rd = BufReader::new(huge.as_slice());
        assert_eq!(next_request(&mut rd).await.expect("read"), Line::TooLong);
        // A last line without its newline is still a request.
        let mut rd = BufReader::new(&b"{\"cmd\":\"status\"}"[..]);
        assert!(matches!(
            next_request(&mut rd).await.expect("read"),
            Line::Request(_)
        ));
        assert_eq!(next_request(&mut rd).await.expect("read"), Line::End);
    }
}
