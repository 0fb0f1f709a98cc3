//! The running node: listeners, dialers, one session task per contact, and
//! the control socket. Thin async glue around the sans-IO session and the
//! store.
//!
//! ```text
//!  TCP/QUIC/memory listeners ──▶ accept ──▶ preface ──┐
//!  per-contact dialer ──▶ dial ──▶ preface ───────────┤
//!                                                     ▼
//!                         session task (one per contact, serialized by a lock)
//!                           Session (sans-IO) ⇄ socket, Store (spawn_blocking)
//!  control socket (0600) ──▶ ops on the store, kicks the session task
//! ```

pub mod compat;
mod conn;
pub mod control;
pub mod groups;
mod hold;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use transport::memory::MemoryNetwork;
use transport::{Carrier, GateKey, PeerAddr, PeerId, PeerPolicy, SecretKey, TlsContext, Transport};

use crate::store::{ContactState, Store};
use crate::stream::parser::Limits;
use crate::stream::session::RateLimit;

/// LAN discovery settings.
pub type LanSettings = discovery::lan::mdns::LanConfig;

/// How the node runs.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    /// Addresses to listen on (TCP and QUIC on each).
    pub listen: Vec<SocketAddr>,
    /// Addresses to put in invites and announce to contacts instead of the bound ones.
    pub advertise: Vec<PeerAddr>,
    /// An in-memory network to join under this name (tests).
    pub memory: Option<(MemoryNetwork, String)>,
    /// Input limits per stream.
    pub limits: Limits,
    /// Input rate per stream.
    pub rate: RateLimit,
    /// Serve the control socket in the profile directory.
    pub control_socket: bool,
    /// Where to publish our addresses and look up contacts' current ones.
    pub discovery: Option<Arc<dyn discovery::Discovery>>,
    /// Announce and find contacts on the local network with encrypted mDNS
    /// records (used when `discovery` is not set). Multicasts on every
    /// interface of the network namespace.
    pub lan: Option<discovery::lan::mdns::LanConfig>,
    /// **Dangerous**: plain XEP-0174 presence and cleartext streams with
    /// classic link-local clients. Off unless the user asks.
    pub compat: Option<CompatSettings>,
    /// Be reachable as an onion service and reach contacts' onion services
    /// (arti). `None`: no Tor at all.
    pub tor: Option<transport::onion::TorSettings>,
}

pub use compat::{CompatError, CompatSettings};

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] transport::TlsSetupError),
    /// A listener could not be bound.
    #[error(
        "cannot listen on {addr}: {reason} (is another node using this port? pick another with --listen)"
    )]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// LAN discovery could not start.
    #[error("cannot start LAN discovery: {0}")]
    Lan(String),
    /// The XEP-0174 compatibility mode could not start.
    #[error(transparent)]
    Compat(#[from] CompatError),
    /// Tor could not be set up (the configuration file is wrong, …).
    #[error(transparent)]
    Tor(#[from] transport::onion::TorError),
    /// The control socket could not be created.
    #[error("cannot create the control socket {path}: {source}")]
    Control {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A live connection, as the node tracks it.
#[derive(Debug)]
pub(crate) struct ConnEntry {
    pub(crate) conn_id: u64,
    pub(crate) initiator: PeerId,
    pub(crate) carrier: Carrier,
    pub(crate) cmd: mpsc::Sender<conn::ConnCmd>,
    pub(crate) close: Arc<Notify>,
    pub(crate) since: Instant,
    pub(crate) resumed: bool,
}

/// Something that happened to a contact's messages. Subscribers (the UI,
/// benchmarks) get these instead of polling the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A message from `contact` was stored.
    Received {
        /// Local contact id.
        contact: u64,
        /// Message seq.
        seq: u64,
    },
    /// The contact's node acknowledged storing our message.
    Sent {
        /// Local contact id.
        contact: u64,
        /// Message seq.
        seq: u64,
    },
    /// The contact's node sent a receipt for our message.
    Delivered {
        /// Local contact id.
        contact: u64,
        /// Message seq.
        seq: u64,
    },
    /// A session with the contact was resumed or ended.
    Connection {
        /// Local contact id.
        contact: u64,
        /// Whether it is up now.
        up: bool,
    },
    /// A group got new posts, or is new.
    GroupPosts {
        /// The group's local row.
        group: u64,
    },
}

/// Counters a test or an operator can read through `status`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// TLS handshakes refused because the client key is not admitted.
    pub(crate) tls_refused: AtomicU64,
    /// ClientHellos the gate turned away (no, forged, stale or replayed
    /// ticket): no certificate was shown.
    pub(crate) gate_refused: AtomicU64,
    /// Connections closed at the preface (bad magic, non-contact, bad proof).
    pub(crate) prefaces_rejected: AtomicU64,
    /// Bytes handed to the XML parser, all sessions.
    pub(crate) xml_bytes_in: AtomicU64,
    /// Streams closed because of bad input.
    pub(crate) stream_faults: AtomicU64,
    /// Sessions resumed.
    pub(crate) sessions: AtomicU64,
    /// Messages from contacts stored since the node started (direct and
    /// held).
    pub(crate) messages_in: AtomicU64,
}

/// State shared by the node's tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Arc<Store>,
    pub(crate) me: PeerId,
    /// Our OMEMO identity (the same key as `me`) and device.
    pub(crate) omemo: crate::store::OwnOmemo,
    pub(crate) cfg: NodeConfig,
    /// peer key → contact id, for the TLS policy.
    pub(crate) contacts: RwLock<HashMap<PeerId, u64>>,
    pub(crate) open_invites: AtomicBool,
    /// Keys a dialer's gate ticket may be made with: contacts and open invites.
    pub(crate) gate_keys: RwLock<Arc<[GateKey]>>,
    /// The identity key, for the gate keys of dials.
    pub(crate) key: SecretKey,
    /// The XEP-0174 compatibility mode, when on.
    pub(crate) compat: std::sync::OnceLock<Arc<compat::Compat>>,
    /// arti, when Tor is on.
    pub(crate) tor: Option<Arc<transport::onion::Tor>>,
    pub(crate) conns: Mutex<HashMap<u64, ConnEntry>>,
    pub(crate) session_locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) kicks: Mutex<HashMap<u64, Arc<Notify>>>,
    /// Per contact: discovery just found fresh addresses (an attempt on
    /// older ones is abandoned).
    pub(crate) found: Mutex<HashMap<u64, Arc<Notify>>>,
    pub(crate) advertised: RwLock<Vec<PeerAddr>>,
    pub(crate) transports: Vec<Arc<dyn Transport>>,
    pub(crate) next_conn: AtomicU64,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) started: Instant,
    pub(crate) stats: Stats,
    pub(crate) events: tokio::sync::broadcast::Sender<NodeEvent>,
    /// How stream writes are padded (the profile's setting).
    pub(crate) padding: crate::settings::Padding,
    /// Random delay before our messages leave (the profile's setting).
    pub(crate) jitter: crate::settings::Jitter,
    /// The bridge to an ordinary XMPP account, when one is set.
    pub(crate) bridge: Mutex<Option<crate::bridge::session::Bridge>>,
    /// Groups (loaded on first use).
    pub(crate) groups: groups::Groups,
    /// Offline delivery through holders.
    pub(crate) holding: hold::Holding,
    /// Serializes [`Shared::refresh_policy`].
    pub(crate) refresh_lock: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Policy(std::sync::Weak<Shared>);

impl PeerPolicy for Policy {
    fn admit(&self, peer: &PeerId) -> bool {
        let Some(s) = self.0.upgrade() else {
            return false;
        };
        let known = s
            .contacts
            .read()
            .map(|c| c.contains_key(peer))
            .unwrap_or(false);
        let ok = known || s.open_invites.load(Ordering::SeqCst);
        if !ok {
            s.stats.tls_refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn gate_keys(&self) -> Arc<[GateKey]> {
        let Some(s) = self.0.upgrade() else {
            return Arc::new([]);
        };
        s.gate_keys
            .read()
            .map(|k| k.clone())
            .unwrap_or_else(|_| Arc::new([]))
    }

    fn gate_refused(&self, _why: transport::Refusal) {
        if let Some(s) = self.0.upgrade() {
            s.stats.gate_refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs a blocking store operation off the async threads.
pub(crate) async fn db<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> T + Send + 'static,
) -> Result<T, crate::store::StoreError> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| crate::store::StoreError::task(e.to_string()))
}

impl Shared {
    /// A message from `contact` was stored (directly or held for us):
    /// counted for `status` and announced to subscribers.
    pub(crate) fn message_stored(&self, contact: u64, seq: u64) {
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send(NodeEvent::Received { contact, seq });
    }

    pub(crate) fn kick(&self, contact: u64) -> Arc<Notify> {
        let mut k = self.kicks.lock().unwrap_or_else(|e| e.into_inner());
        k.entry(contact)
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    pub(crate) fn found(&self, contact: u64) -> Arc<Notify> {
        let mut k = self.found.lock().unwrap_or_else(|e| e.into_inner());
        k.entry(contact)
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    pub(crate) fn session_lock(&self, contact: u64) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.session_locks.lock().unwrap_or_else(|e| e.into_inner());
        l.entry(contact)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone()
    }

    pub(crate) fn live_carrier(&self, contact: u64) -> Option<Carrier> {
        let c = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        c.get(&contact).filter(|e| e.resumed).map(|e| e.carrier)
    }

    pub(crate) fn is_connected(&self, contact: u64) -> bool {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&contact)
    }

    /// Ends the live session with `contact`, if any (a removed contact).
    pub(crate) fn close_session(&self, contact: u64) {
        let cmd = {
            let c = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            c.get(&contact).map(|e| e.cmd.clone())
        };
        if let Some(tx) = cmd {
            let _ = tx.try_send(conn::ConnCmd::Close);
        }
    }

    /// Tells the session task for `contact` (if any) that the outbox grew,
    /// or wakes its dialer.
    pub(crate) fn outbox_grew(&self, contact: u64) {
        let cmd = {
            let c = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            c.get(&contact).map(|e| e.cmd.clone())
        };
        match cmd {
            Some(tx) => {
                let _ = tx.try_send(conn::ConnCmd::OutboxGrew);
            }
            None => self.kick(contact).notify_one(),
        }
        if let Some(b) = self
            .bridge
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            b.kick(contact);
        }
    }

    pub(crate) async fn refresh_policy(&self) {
        // One refresh at a time, each reading the store after the previous
        // one wrote: two running at once could otherwise finish out of
        // order, the older snapshot last (a contact just added missing from
        // the map, so a group's welcome to them dropped; a used invite's
        // gate key back for a moment).
        let _one = self.refresh_lock.lock().await;
        let now = crate::ops::now_secs();
        let store = self.store.clone();
        let res = db(&store, move |s| -> Result<_, crate::store::StoreError> {
            let contacts = s.contacts()?;
            let invites = s.open_invite_secrets(now)?;
            Ok((contacts, invites))
        })
        .await;
        if let Ok(Ok((contacts, invites))) = res {
            let map: HashMap<PeerId, u64> = contacts
                .iter()
                .filter(|c| {
                    !matches!(
                        c.state,
                        ContactState::Refused { .. }
                            | ContactState::Cleartext { .. }
                            | ContactState::Bridged { .. }
                    )
                })
                .filter_map(|c| PeerId::from_bytes(c.peer).ok().map(|p| (p, c.id)))
                .collect();
            let open = !invites.is_empty();
            let keys: Vec<GateKey> = map
                .keys()
                .filter_map(|p| GateKey::for_pair(&self.key, p))
                .chain(invites.iter().map(|i| GateKey::for_invite(i)))
                .collect();
            if let Ok(mut k) = self.gate_keys.write() {
                *k = keys.into();
            }
            if let Some(d) = &self.cfg.discovery {
                let peers: Vec<PeerId> = map.keys().copied().collect();
                d.set_contacts(&peers);
            }
            if let Some(tor) = &self.tor {
                self.refresh_tor(tor, &contacts, &map, &invites);
            }
            if let Ok(mut m) = self.contacts.write() {
                *m = map;
            }
            self.open_invites.store(open, Ordering::SeqCst);
        }
    }
}

impl Shared {
    /// Where contacts can reach this node: the advertised addresses and,
    /// when Tor is on, the onion service (not advertised: it is the key).
    pub(crate) fn reachable_at(&self) -> Vec<PeerAddr> {
        let mut out = self
            .advertised
            .read()
            .map(|a| a.clone())
            .unwrap_or_default();
        if self.tor.is_some() {
            out.push(PeerAddr::Onion(self.me, transport::onion::ONION_PORT));
        }
        out
    }

    /// Who may read our onion service's descriptor (contacts, open
    /// invites), and the keys with which we read our contacts'.
    fn refresh_tor(
        &self,
        tor: &Arc<transport::onion::Tor>,
        contacts: &[crate::store::Contact],
        admitted: &HashMap<PeerId, u64>,
        invites: &[zeroize::Zeroizing<[u8; 32]>],
    ) {
        use transport::onion::DiscoveryKeys;
        let mut authorized: Vec<_> = admitted
            .keys()
            .filter_map(|p| DiscoveryKeys::for_pair(&self.key, p, &self.me))
            .map(|k| k.public())
            .collect();
        authorized.extend(
            invites
                .iter()
                .map(|i| DiscoveryKeys::for_invite(i).public()),
        );
        tor.authorize(&authorized);
        let reading: Vec<(PeerId, DiscoveryKeys)> = contacts
            .iter()
            .filter_map(|c| {
                let p = PeerId::from_bytes(c.peer).ok()?;
                let k = match &c.state {
                    ContactState::Active => DiscoveryKeys::for_pair(&self.key, &self.me, &p)?,
                    ContactState::Redeeming { secret, .. } => DiscoveryKeys::for_invite(secret),
                    ContactState::Refused { .. }
                    | ContactState::Cleartext { .. }
                    | ContactState::Bridged { .. } => return None,
                };
                Some((p, k))
            })
            .collect();
        tor.set_discovery_keys(&reading);
    }
}

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Node {
    /// Starts listeners, dialers and the control socket.
    pub async fn start(store: Store, mut cfg: NodeConfig) -> Result<Node, StartError> {
        let store = Arc::new(store);
        let profile = db(&store, |s| s.profile()).await??;
        let key = SecretKey::from_seed(&profile.seed);
        if let (None, Some(lan)) = (&cfg.discovery, cfg.lan) {
            let d = discovery::lan::mdns::LanDiscovery::start(&key, &[], lan)
                .map_err(StartError::Lan)?;
            cfg.discovery = Some(Arc::new(d));
        }
        let me = key.peer_id();
        let tls = TlsContext::new(&key)?;
        // Our OMEMO device exists (prekeys replenished, signed prekey rotated)
        // before any stream opens.
        let now_s = crate::ops::now_ms() / 1000;
        let device = db(&store, move |s| s.omemo_device(now_s)).await??;
        let omemo = crate::store::OwnOmemo {
            identity: Arc::new(crate::omemo::Identity::from_seed(&profile.seed)),
            jid: me.onion_address(),
            device_id: device.device_id,
        };
        let (stop, shutdown) = watch::channel(false);
        let mut transports: Vec<Arc<dyn Transport>> = vec![
            Arc::new(transport::tcp::TcpTransport::new(tls.clone())),
            Arc::new(transport::quic::QuicTransport::new(tls.clone())),
        ];
        if let Some((net, _)) = &cfg.memory {
            transports.push(Arc::new(net.transport(me)));
        }
        let tor = match &cfg.tor {
            Some(settings) => {
                let config = transport::onion::load_config(settings)?;
                let tor = transport::onion::Tor::start(config, &key, tls.clone())?;
                transports.push(Arc::new(tor.transport()));
                Some(tor)
            }
            None => None,
        };
        let shared = Arc::new_cyclic(|_| Shared {
            store: store.clone(),
            me,
            omemo,
            cfg: cfg.clone(),
            contacts: RwLock::new(HashMap::new()),
            open_invites: AtomicBool::new(false),
            gate_keys: RwLock::new(Arc::new([])),
            key: key.clone(),
            compat: std::sync::OnceLock::new(),
            tor: tor.clone(),
            conns: Mutex::new(HashMap::new()),
            session_locks: Mutex::new(HashMap::new()),
            kicks: Mutex::new(HashMap::new()),
            found: Mutex::new(HashMap::new()),
            advertised: RwLock::new(Vec::new()),
            transports,
            next_conn: AtomicU64::new(1),
            shutdown,
            started: Instant::now(),
            stats: Stats::default(),
            events: tokio::sync::broadcast::channel(4096).0,
            padding: profile.settings.padding,
            jitter: profile.settings.jitter,
            bridge: Mutex::new(None),
            groups: groups::Groups::default(),
            holding: hold::Holding::default(),
            refresh_lock: tokio::sync::Mutex::new(()),
        });
        shared.refresh_policy().await;
        if let Some(d) = &shared.cfg.discovery {
            // A contact seen on the LAN (or elsewhere) is dialled at once.
            let weak = Arc::downgrade(&shared);
            d.on_found(Arc::new(move |peer: &PeerId| {
                let Some(s) = weak.upgrade() else { return };
                let id = s.contacts.read().ok().and_then(|m| m.get(peer).copied());
                // Not connected, or connected over Tor: a LAN path is better.
                if let Some(id) = id
                    && (!s.is_connected(id) || s.live_carrier(id) == Some(Carrier::Onion))
                {
                    s.found(id).notify_one();
                    s.kick(id).notify_one();
                }
            }));
        }
        let policy: Arc<dyn PeerPolicy> = Arc::new(Policy(Arc::downgrade(&shared)));
        let (acc_tx, acc_rx) = mpsc::channel(64);
        let mut tasks = tokio::task::JoinSet::new();
        let mut bound = Vec::new();
        for addr in &cfg.listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| StartError::Bind {
                    addr: format!("tcp:{addr}"),
                    reason: e.to_string(),
                })?;
            let tcp_addr = l.local_addr().map_err(|e| StartError::Bind {
                addr: format!("tcp:{addr}"),
                reason: e.to_string(),
            })?;
            let ep = transport::quic::bind(tcp_addr, &tls, policy.clone()).map_err(|e| {
                StartError::Bind {
                    addr: format!("quic:{tcp_addr}"),
                    reason: e.to_string(),
                }
            })?;
            bound.push(PeerAddr::Tcp(tcp_addr));
            bound.push(PeerAddr::Quic(tcp_addr));
            let (tls2, pol2, tx2) = (tls.clone(), policy.clone(), acc_tx.clone());
            tasks.spawn(async move {
                if let Err(e) = transport::tcp::serve(l, tls2, pol2, tx2).await {
                    tracing::error!("TCP listener stopped: {e}");
                }
            });
            tasks.spawn(transport::quic::serve(ep, acc_tx.clone()));
        }
        if let Some((net, name)) = &cfg.memory {
            let mut rx = net.listen(name, me, policy.clone());
            let tx = acc_tx.clone();
            bound.push(PeerAddr::Memory(name.clone()));
            tasks.spawn(async move {
                while let Some(a) = rx.recv().await {
                    if tx.send(a).await.is_err() {
                        return;
                    }
                }
            });
        }
        if let Some(tor) = &tor {
            // Not among the advertised addresses: the onion address is the
            // key itself, which every contact already has.
            tor.serve(policy.clone(), acc_tx.clone());
        }
        drop(acc_tx);
        let advertised = if cfg.advertise.is_empty() {
            bound.clone()
        } else {
            cfg.advertise.clone()
        };
        if let Ok(mut a) = shared.advertised.write() {
            *a = advertised.clone();
        }
        if let Some(d) = &cfg.discovery {
            d.publish(&me, &advertised);
        }
        let strs: Vec<String> = advertised.iter().map(|a| a.to_string()).collect();
        db(&store, move |s| -> Result<(), crate::store::StoreError> {
            let mut p = s.profile()?;
            if p.last_addrs != strs {
                p.last_addrs = strs;
                s.set_profile(&p)?;
            }
            Ok(())
        })
        .await??;
        tracing::info!(node = %me.short(), listeners = bound.len(), "node started");

        if let Some(settings) = cfg.compat {
            let ips: Vec<std::net::IpAddr> = cfg.listen.iter().map(SocketAddr::ip).collect();
            let c = compat::start(&shared, settings, &ips, &profile.name, &mut tasks).await?;
            let _ = shared.compat.set(c);
        }
        tasks.spawn(conn::accept_loop(shared.clone(), acc_rx));
        tasks.spawn(conn::dial_manager(shared.clone()));
        tasks.spawn(retention_loop(shared.clone()));
        tasks.spawn(tick_loop(shared.clone()));
        if let Some(acct) = profile.bridge.clone() {
            shared.restart_bridge(Some(acct)).await;
        }
        if cfg.control_socket {
            let path = store.dir().join(control::SOCKET_NAME);
            let listener = control::bind(&path).map_err(|source| StartError::Control {
                path: path.clone(),
                source,
            })?;
            tasks.spawn(control::serve(shared.clone(), listener, stop.clone()));
        }
        Ok(Node {
            shared,
            stop,
            tasks,
        })
    }

    /// This node's identity.
    pub fn peer_id(&self) -> PeerId {
        self.shared.me
    }

    /// The addresses contacts are told, and the onion service when Tor is on.
    pub fn advertised(&self) -> Vec<PeerAddr> {
        self.shared.reachable_at()
    }

    /// Events about messages and sessions. A slow subscriber misses events
    /// (`RecvError::Lagged`) rather than slowing the node; the store stays
    /// the source of truth.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<NodeEvent> {
        self.shared.events.subscribe()
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// Sends a message (see [`crate::ops::send`]) and wakes the session.
    pub async fn send(
        &self,
        contact: &str,
        text: &str,
    ) -> Result<crate::ops::MessageView, crate::ops::OpError> {
        control::do_send(&self.shared, contact, text).await
    }

    /// Creates an invite with this node's addresses.
    pub async fn invite(&self, ttl: &str) -> Result<String, crate::ops::OpError> {
        control::do_invite(&self.shared, ttl).await
    }

    /// Adds a contact from an invite and starts redeeming it.
    pub async fn add(
        &self,
        uri: &str,
        name: Option<&str>,
    ) -> Result<crate::ops::ContactView, crate::ops::OpError> {
        control::do_add(&self.shared, uri, name).await
    }

    /// Every contact with its local id and live state.
    pub async fn contacts(
        &self,
    ) -> Result<Vec<(u64, crate::ops::ContactView)>, crate::ops::OpError> {
        control::contacts_by_id(&self.shared).await
    }

    /// Sets the bridge's account (replacing any) and starts it.
    pub async fn bridge_set(
        &self,
        acct: crate::bridge::BridgeAccount,
    ) -> Result<crate::bridge::BridgeStatus, crate::ops::OpError> {
        control::bridge_set(&self.shared, acct).await
    }

    /// Logs the bridge out and forgets its account.
    pub async fn bridge_off(&self) -> Result<bool, crate::ops::OpError> {
        control::bridge_off(&self.shared).await
    }

    /// Creates a group (see [`groups`]).
    pub async fn group_create(&self, name: &str) -> Result<groups::GroupView, crate::ops::OpError> {
        groups::create(&self.shared, name).await
    }

    /// Every group.
    pub async fn groups(&self) -> Result<Vec<groups::GroupView>, crate::ops::OpError> {
        groups::list(&self.shared).await
    }

    /// A group's latest posts, oldest first.
    pub async fn group_history(
        &self,
        group: &str,
        limit: usize,
    ) -> Result<Vec<groups::GroupPostView>, crate::ops::OpError> {
        groups::history(&self.shared, group, limit).await
    }

    /// A group's members.
    pub async fn group_members(
        &self,
        group: &str,
    ) -> Result<Vec<groups::MemberView>, crate::ops::OpError> {
        groups::members(&self.shared, group).await
    }

    /// Posts to a group.
    pub async fn group_send(
        &self,
        group: &str,
        text: &str,
    ) -> Result<groups::GroupPostView, crate::ops::OpError> {
        groups::send(&self.shared, group, text).await
    }

    /// A link that makes its users contacts and members (admins).
    pub async fn group_link(
        &self,
        group: &str,
        ttl: &str,
        uses: u32,
    ) -> Result<String, crate::ops::OpError> {
        groups::link(&self.shared, group, ttl, uses).await
    }

    /// Leaves a group.
    pub async fn group_leave(&self, group: &str) -> Result<groups::GroupView, crate::ops::OpError> {
        groups::leave(&self.shared, group).await
    }

    /// Current status.
    pub fn status(&self) -> control::StatusView {
        control::status(&self.shared)
    }

    /// Waits until a stop is requested (control socket `stop`) or the signal future fires.
    pub async fn wait(&mut self, signal: impl std::future::Future<Output = ()>) {
        let mut rx = self.stop.subscribe();
        tokio::select! {
            _ = signal => {}
            _ = rx.wait_for(|v| *v) => {}
        }
    }

    /// Stops every task; sessions end without a goodbye (the peer resumes later).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(d) = &self.shared.cfg.discovery {
            d.withdraw(&self.shared.me);
        }
        if let Some(c) = self.shared.compat.get() {
            c.settle(Duration::from_secs(2)).await;
            let c = c.clone();
            let _ = tokio::task::spawn_blocking(move || c.withdraw()).await;
        }
        if let Some((net, name)) = &self.shared.cfg.memory {
            net.unlisten(name);
        }
        let conns: Vec<_> = {
            let c = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
            c.values().map(|e| e.close.clone()).collect()
        };
        for c in conns {
            c.notify_one();
        }
        self.shared.restart_bridge(None).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.tasks.shutdown().await;
        if self.shared.cfg.control_socket {
            let _ = std::fs::remove_file(self.shared.store.dir().join(control::SOCKET_NAME));
        }
    }
}

impl Shared {
    /// Stops the bridge, if one runs, and starts `acct`'s.
    pub(crate) async fn restart_bridge(&self, acct: Option<crate::bridge::BridgeAccount>) {
        let old = self.bridge.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(b) = old {
            b.stop().await;
        }
        if let Some(acct) = acct {
            let env = crate::bridge::session::Env {
                tor: self.tor.clone(),
                store: self.store.clone(),
                events: self.events.clone(),
            };
            let b = crate::bridge::session::Bridge::start(acct, env);
            *self.bridge.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
        }
    }

    /// What the bridge is doing.
    pub(crate) fn bridge_status(&self) -> crate::bridge::BridgeStatus {
        self.bridge
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|b| b.status())
            .unwrap_or_else(|| crate::bridge::BridgeStatus::offline(None))
    }
}

/// Every second: group summaries to connected members, then offline
/// delivery (offers, deposits, expiry).
async fn tick_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {
                groups::tick(&shared).await;
                hold::tick(&shared).await;
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// How often [`tick_loop`] runs: the group core gets the time (summaries
/// held back by its rate limit go out then), and queued messages are left
/// with holders.
const TICK: Duration = Duration::from_secs(1);

async fn retention_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let store = shared.store.clone();
        match db(&store, |s| s.apply_retention(crate::ops::now_ms())).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(deleted = n, "retention removed old messages"),
            Ok(Err(e)) => tracing::warn!("retention failed: {e}"),
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
