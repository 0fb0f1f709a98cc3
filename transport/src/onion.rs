//! Tor onion services with arti: the node's identity key is its onion
//! service's key, and the same mutual TLS as on the LAN runs inside each
//! onion stream.
//!
//! ```text
//!  dialer                                         listener
//!  TorClient::connect(<peer>.onion:7474)  ──Tor──▶ RunningOnionService
//!    (descriptor readable only with the          (restricted discovery:
//!     dialer's discovery key for that peer)       one key per contact)
//!  TLS 1.3 client, gate ticket, own key  ◀──────▶ TLS 1.3 server, PeerPolicy
//! ```
//!
//! **Restricted discovery.** The service's descriptor is encrypted to a
//! list of client discovery keys (X25519), so someone who knows the onion
//! address but is not a contact cannot fetch it, and so cannot learn whether
//! the node is online. Each contact's key is derived, on both ends, from
//! what the invite exchanged ([`DiscoveryKeys`]); an open invite has a key
//! derived from its one-time secret. arti caps the list at
//! [`tor_hsservice::config::restricted_discovery::MAX_RESTRICTED_DISCOVERY_CLIENTS`].
//!
//! **Keys stay in memory.** arti's keystore is forced to its ephemeral kind:
//! the identity key and the discovery keys are handed to arti at every start
//! from the node's encrypted store and never written to arti's state
//! directory. arti's state and cache directories (guards, directory cache,
//! replay logs) live in the profile.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arti_client::{KeystoreSelector, StreamPrefs, TorClient, TorClientConfig};
use futures::StreamExt as _;
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tor_cell::relaycell::msg::{Connected, End, EndReason};
use tor_hscrypto::pk::{HsClientDescEncKey, HsClientDescEncSecretKey, HsId, HsIdKeypair};
use tor_hsservice::config::OnionServiceConfigBuilder;
use tor_hsservice::config::restricted_discovery::HsClientNickname;
use tor_hsservice::{HsNickname, RunningOnionService, StreamRequest};
use tor_llcrypto::pk::{curve25519, ed25519};
use tor_rtcompat::PreferredRuntime;
use zeroize::Zeroizing;

use crate::{
    Authenticated, BoxFuture, Carrier, DialError, GateKey, MAX_CONCURRENT_HANDSHAKES, PeerAddr,
    PeerId, PeerPolicy, SecretKey, TlsContext, Transport, tls,
};

/// The virtual port of a Coterie onion service.
pub const ONION_PORT: u16 = 7474;
/// The most contacts (plus open invites) the onion service can admit:
/// arti's limit for restricted discovery.
pub const MAX_AUTHORIZED: usize =
    tor_hsservice::config::restricted_discovery::MAX_RESTRICTED_DISCOVERY_CLIENTS;
/// How long a dial may take to fetch the descriptor, build the circuits
/// and open the stream (the TLS handshake has its own deadline).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The onion service's nickname inside arti (one service per profile).
const SERVICE_NICKNAME: &str = "coterie";

/// Why Tor could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TorError {
    /// The `--tor-config` file could not be read or is not arti's TOML.
    #[error("cannot use the Tor configuration {path}: {why}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        why: String,
    },
    /// arti refused to start.
    #[error("cannot start Tor (arti): {0}")]
    Start(String),
}

/// Where arti keeps its files and which configuration it starts from.
#[derive(Debug, Clone)]
pub struct TorSettings {
    /// arti's state directory (guards, onion-service replay logs).
    pub state_dir: PathBuf,
    /// arti's cache directory (directory documents).
    pub cache_dir: PathBuf,
    /// An arti TOML file (bridges, a private network, …); arti's defaults
    /// without it.
    pub config_file: Option<PathBuf>,
}

/// Reads arti's configuration: the user's file, if any, then Coterie's
/// settings on top (storage in the profile, keystore in memory). A key arti
/// does not know is an error, not a silent default: a misspelt bridge line
/// must not mean a direct connection to the public network.
pub fn load_config(s: &TorSettings) -> Result<TorClientConfig, TorError> {
    let bad = |why: String| TorError::Config {
        path: s.config_file.clone().unwrap_or_default(),
        why,
    };
    let mut sources = tor_config::ConfigurationSources::new_empty();
    if let Some(f) = &s.config_file {
        if !f.is_file() {
            return Err(bad("no such file".into()));
        }
        sources.push_source(
            tor_config::ConfigurationSource::from_path(f),
            tor_config::sources::MustRead::MustRead,
        );
    }
    let ours = format!(
        "[storage]\nstate_dir = {}\ncache_dir = {}\n[storage.keystore.primary]\nkind = \"ephemeral\"\n",
        toml_string(&s.state_dir),
        toml_string(&s.cache_dir)
    );
    sources.push_source(
        tor_config::ConfigurationSource::from_verbatim(ours),
        tor_config::sources::MustRead::MustRead,
    );
    let tree = sources.load().map_err(|e| bad(report(&e)))?;
    let opts = tor_config::load::ConfigResolveOptions::default();
    let res = tor_config::load::resolve_return_results::<TorClientConfig>(&tree, &opts)
        .map_err(|e| bad(report(&e)))?;
    if let Some(k) = res.unrecognized.first() {
        return Err(bad(format!("unknown setting `{k}`")));
    }
    Ok(res.value)
}

/// A path as a TOML string.
fn toml_string(p: &Path) -> String {
    toml::Value::String(p.to_string_lossy().into_owned()).to_string()
}

/// An error with its sources, on one line (arti's reporter; never `{:?}`:
/// see the Tor note).
fn report(e: &impl tor_error::ErrorReport) -> String {
    let r = e.report().to_string();
    // The reporter starts with "error: "; our messages already say so.
    r.strip_prefix("error: ").map(str::to_string).unwrap_or(r)
}

/// The discovery secret one contact uses to read the other's descriptor.
///
/// Derived from the two identity keys' X25519 agreement, so both ends
/// compute it without a message; bound to the direction (`client` reads
/// `service`'s descriptor) so the two directions use different keys.
#[derive(Clone)]
pub struct DiscoveryKeys(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for DiscoveryKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiscoveryKeys(..)")
    }
}

impl DiscoveryKeys {
    /// The secret with which `client` reads `service`'s descriptor; `own`
    /// is one of the two. `None` if the other key is not a usable point.
    pub fn for_pair(own: &SecretKey, client: &PeerId, service: &PeerId) -> Option<DiscoveryKeys> {
        let me = own.peer_id();
        let other = if me == *client { service } else { client };
        let shared = own.agree(other)?;
        let mut info = b"coterie onion discovery v1: pair".to_vec();
        info.extend_from_slice(client.as_bytes());
        info.extend_from_slice(service.as_bytes());
        Some(DiscoveryKeys::derive(shared.as_slice(), &info))
    }

    /// The secret with which the holder of an open invite reads the
    /// inviter's descriptor.
    pub fn for_invite(secret: &[u8; 32]) -> DiscoveryKeys {
        DiscoveryKeys::derive(secret, b"coterie onion discovery v1: invite")
    }

    fn derive(ikm: &[u8], info: &[u8]) -> DiscoveryKeys {
        DiscoveryKeys(crate::gate::hkdf32(ikm, info))
    }

    /// The public key the service authorizes.
    pub fn public(&self) -> HsClientDescEncKey {
        HsClientDescEncKey::from(&self.secret())
    }

    fn secret(&self) -> HsClientDescEncSecretKey {
        HsClientDescEncSecretKey::from(curve25519::StaticSecret::from(*self.0))
    }
}

/// What `coterie status` shows about Tor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TorStatus {
    /// Bootstrap progress, 0–100.
    pub bootstrap_percent: u8,
    /// What arti is doing, in its words ("connecting to the network", …).
    pub phase: String,
    /// Why bootstrapping is stuck, if it is.
    pub blocked: Option<String>,
    /// The onion service's state: `not started`, `waiting for a contact`
    /// (restricted discovery needs at least one key), or arti's state
    /// (`Bootstrapping`, `Running`, `DegradedReachable`, …).
    pub service: String,
    /// The last error, in words a person can act on.
    pub error: Option<String>,
    /// How many discovery keys the service admits.
    pub authorized: usize,
}

struct Service {
    running: Arc<RunningOnionService>,
}

/// A Tor client (arti) with, once it has contacts, the node's onion service.
pub struct Tor {
    client: Arc<TorClient<PreferredRuntime>>,
    tls: TlsContext,
    hsid: Mutex<Option<HsIdKeypair>>,
    status: Arc<Mutex<TorStatus>>,
    service: Mutex<Option<Service>>,
    incoming: Mutex<Option<Incoming>>,
    discovery: Mutex<std::collections::HashMap<PeerId, HsClientDescEncKey>>,
    /// The discovery keys last given to the service, as strings.
    last_authorized: Mutex<Option<Vec<String>>>,
}

struct Incoming {
    policy: Arc<dyn PeerPolicy>,
    out: mpsc::Sender<Authenticated>,
}

impl std::fmt::Debug for Tor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tor").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Tor {
    /// Creates the Tor client and starts bootstrapping in the background
    /// (retrying with backoff while there is no network). Returns at once:
    /// nothing else in the node waits for Tor.
    pub fn start(
        config: TorClientConfig,
        id: &SecretKey,
        tls: TlsContext,
    ) -> Result<Arc<Tor>, TorError> {
        // arti's TLS (to relays) needs a process-wide rustls provider.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let client = TorClient::builder()
            .config(config)
            .bootstrap_behavior(arti_client::BootstrapBehavior::Manual)
            .create_unbootstrapped()
            .map_err(|e| TorError::Start(report(&e)))?;
        let kp = ed25519::Keypair::from_bytes(&id.to_seed());
        let hsid = HsIdKeypair::from(ed25519::ExpandedKeypair::from(&kp));
        let tor = Arc::new(Tor {
            client,
            tls,
            hsid: Mutex::new(Some(hsid)),
            status: Arc::new(Mutex::new(TorStatus {
                phase: "starting".into(),
                service: "not started".into(),
                ..TorStatus::default()
            })),
            service: Mutex::new(None),
            incoming: Mutex::new(None),
            discovery: Mutex::new(Default::default()),
            last_authorized: Mutex::new(None),
        });
        tokio::spawn(bootstrap_loop(Arc::downgrade(&tor)));
        tokio::spawn(stall_watch(Arc::downgrade(&tor.status)));
        tokio::spawn(watch_bootstrap(
            tor.client.bootstrap_events(),
            Arc::downgrade(&tor.status),
        ));
        Ok(tor)
    }

    /// The current status.
    pub fn status(&self) -> TorStatus {
        lock(&self.status).clone()
    }

    /// Starts accepting onion streams; authenticated connections go to
    /// `out`. The service itself is published once [`Tor::authorize`] has
    /// been given at least one key.
    pub fn serve(&self, policy: Arc<dyn PeerPolicy>, out: mpsc::Sender<Authenticated>) {
        *lock(&self.incoming) = Some(Incoming { policy, out });
    }

    /// Sets the discovery keys the service admits (contacts and open
    /// invites), launching the service on the first call with a key.
    /// Keys beyond [`MAX_AUTHORIZED`] are left out (and said so in the
    /// status).
    pub fn authorize(self: &Arc<Self>, keys: &[HsClientDescEncKey]) {
        let mut keys: Vec<&HsClientDescEncKey> = keys.iter().collect();
        keys.sort_by_key(|k| k.to_string());
        keys.dedup();
        let dropped = keys.len().saturating_sub(MAX_AUTHORIZED);
        keys.truncate(MAX_AUTHORIZED);
        if dropped > 0 {
            tracing::warn!(dropped, "too many contacts for restricted discovery");
        }
        let mut cfg = OnionServiceConfigBuilder::default();
        match HsNickname::new(SERVICE_NICKNAME.into()) {
            Ok(n) => {
                cfg.nickname(n);
            }
            Err(e) => return self.fail(format!("bad service nickname: {e}")),
        }
        if !keys.is_empty() {
            let rd = cfg.restricted_discovery();
            rd.enabled(true);
            for k in &keys {
                let Ok(nick) = nickname_for(k).parse::<HsClientNickname>() else {
                    continue;
                };
                rd.static_keys().access().push((nick, (*k).clone()));
            }
        }
        lock(&self.status).authorized = keys.len();
        let wanted: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let mut svc = lock(&self.service);
        {
            // The same list again (most policy refreshes change no key):
            // nothing to tell arti, no new descriptor.
            let mut last = lock(&self.last_authorized);
            if last.as_ref() == Some(&wanted) && (svc.is_some() || keys.is_empty()) {
                return;
            }
            *last = Some(wanted);
        }
        if keys.is_empty() {
            // arti cannot publish a restricted service with no keys, and
            // with no contacts nobody should reach it: withdraw it.
            let was = svc.take().is_some();
            lock(&self.status).service = if was {
                "withdrawn: no contacts".into()
            } else {
                "waiting for a first contact".into()
            };
            return;
        }
        let built = match cfg.build() {
            Ok(b) => b,
            Err(e) => return self.fail(format!("onion service configuration: {e}")),
        };
        if let Some(s) = svc.as_mut() {
            if let Err(e) = s
                .running
                .reconfigure(built, tor_config::Reconfigure::WarnOnFailures)
            {
                self.fail(format!("cannot update the onion service's contacts: {e}"));
            }
            return;
        }
        // The identity key goes into arti's (in-memory) keystore at the
        // first launch; a relaunch finds it there.
        let launched = match lock(&self.hsid).take() {
            Some(hsid) => self
                .client
                .launch_onion_service_with_hsid(built, hsid)
                .map(|o| o.map(|(r, s)| (r, s.boxed()))),
            None => self
                .client
                .launch_onion_service(built)
                .map(|o| o.map(|(r, s)| (r, s.boxed()))),
        };
        match launched {
            Ok(Some((running, requests))) => {
                tokio::spawn(watch_service(
                    running.status_events(),
                    Arc::downgrade(&self.status),
                ));
                tokio::spawn(accept_loop(Arc::downgrade(self), requests));
                *svc = Some(Service { running });
            }
            Ok(None) => self.fail("the onion service is disabled in the Tor configuration".into()),
            Err(e) => self.fail(format!("cannot start the onion service: {}", report(&e))),
        }
    }

    /// Gives arti the secrets with which this node reads its contacts'
    /// descriptors; keys of peers not in the list are forgotten.
    pub fn set_discovery_keys(&self, keys: &[(PeerId, DiscoveryKeys)]) {
        let mut known = lock(&self.discovery);
        let wanted: std::collections::HashSet<PeerId> = keys.iter().map(|(p, _)| *p).collect();
        let gone: Vec<PeerId> = known
            .keys()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        for p in gone {
            known.remove(&p);
            if let Ok(hsid) = hs_id(&p) {
                let _ = self
                    .client
                    .remove_service_discovery_key(KeystoreSelector::Primary, hsid);
            }
        }
        for (peer, k) in keys {
            let public = k.public();
            if known.get(peer) == Some(&public) {
                continue;
            }
            let Ok(hsid) = hs_id(peer) else { continue };
            let _ = self
                .client
                .remove_service_discovery_key(KeystoreSelector::Primary, hsid);
            match self.client.insert_service_discovery_key(
                KeystoreSelector::Primary,
                hsid,
                k.secret(),
            ) {
                Ok(_) => {
                    known.insert(*peer, public);
                }
                Err(e) => tracing::warn!("cannot give arti a discovery key: {}", report(&e)),
            }
        }
    }

    /// Opens a bare onion stream to `peer`'s service, without TLS
    /// (diagnostics and the benchmark's baseline).
    pub async fn connect_raw(
        &self,
        peer: &PeerId,
        port: u16,
    ) -> Result<arti_client::DataStream, arti_client::Error> {
        let mut prefs = StreamPrefs::new();
        prefs.connect_to_onion_services(tor_config::BoolOrAuto::Explicit(true));
        self.client
            .connect_with_prefs((peer.onion_address(), port), &prefs)
            .await
    }

    /// Opens a stream to `host:port` on the ordinary internet through a Tor
    /// exit (the exit resolves `host`), on circuits of its own: an exit
    /// relay cannot link it to the node's other streams. Waits for the
    /// bootstrap; never connects any other way. The error is arti's, in
    /// words (it may name the host: show it to the user, do not log it).
    pub async fn connect_exit(
        &self,
        host: &str,
        port: u16,
    ) -> Result<arti_client::DataStream, String> {
        let mut prefs = StreamPrefs::new();
        prefs.new_isolation_group();
        self.client
            .connect_with_prefs((host, port), &prefs)
            .await
            .map_err(|e| report(&e))
    }

    fn fail(&self, why: String) {
        tracing::warn!("tor: {why}");
        lock(&self.status).error = Some(why);
    }

    /// A dialer over this client.
    pub fn transport(self: &Arc<Self>) -> OnionTransport {
        OnionTransport { tor: self.clone() }
    }
}

/// The nickname arti files a client key under: derived from the key alone,
/// so it names no contact.
fn nickname_for(k: &HsClientDescEncKey) -> String {
    use sha2::Digest as _;
    let d = Sha256::digest(k.to_string().as_bytes());
    format!("k{}", data_encoding::HEXLOWER.encode(&d[..10]))
}

fn hs_id(peer: &PeerId) -> Result<HsId, String> {
    peer.onion_address()
        .parse::<HsId>()
        .map_err(|e| format!("not an onion address: {e}"))
}

async fn bootstrap_loop(tor: std::sync::Weak<Tor>) {
    let mut backoff = Duration::from_secs(2);
    loop {
        let Some(t) = tor.upgrade() else { return };
        let client = t.client.clone();
        drop(t);
        match client.bootstrap().await {
            Ok(()) => {
                if let Some(t) = tor.upgrade() {
                    lock(&t.status).error = None;
                }
                return;
            }
            Err(e) => {
                let Some(t) = tor.upgrade() else { return };
                t.fail(format!(
                    "Tor cannot connect ({}); retrying in {} s. Check the network, or give bridges with --tor-config",
                    report(&e),
                    backoff.as_secs()
                ));
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(300));
    }
}

/// arti keeps retrying on its own without calling a stall an error; a
/// person needs to hear that Tor is not connecting, and what to try.
async fn stall_watch(status: std::sync::Weak<Mutex<TorStatus>>) {
    let started = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(STALL_CHECK).await;
        let Some(s) = status.upgrade() else { return };
        let mut s = lock(&s);
        if s.bootstrap_percent >= 100 {
            return;
        }
        let ours = s
            .error
            .as_deref()
            .is_none_or(|e| e.starts_with(STALL_PREFIX));
        if started.elapsed() >= STALLED_AFTER && ours {
            s.error = Some(format!(
                "{STALL_PREFIX} after {} s (stuck at {}%: {}); still retrying. Check the network; where Tor is blocked, give bridges with --tor-config. The LAN works meanwhile.",
                started.elapsed().as_secs(),
                s.bootstrap_percent,
                s.phase
            ));
        }
    }
}

const STALL_PREFIX: &str = "Tor has not connected";
/// How long bootstrapping may take before the status calls it a problem.
const STALLED_AFTER: Duration = Duration::from_secs(30);
const STALL_CHECK: Duration = Duration::from_secs(5);

async fn watch_bootstrap(
    mut events: arti_client::status::BootstrapEvents,
    status: std::sync::Weak<Mutex<TorStatus>>,
) {
    while let Some(ev) = events.next().await {
        let Some(s) = status.upgrade() else { return };
        let mut s = lock(&s);
        s.bootstrap_percent = (ev.as_frac() * 100.0).round().clamp(0.0, 100.0) as u8;
        let text = ev.to_string();
        s.phase = text
            .split_once("%: ")
            .map(|(_, p)| p.to_string())
            .unwrap_or(text);
        s.blocked = ev.blocked().map(|b| b.to_string());
        if ev.ready_for_traffic() {
            s.error = None;
        }
    }
}

async fn watch_service(
    mut events: tor_hsservice::status::OnionServiceStatusStream,
    status: std::sync::Weak<Mutex<TorStatus>>,
) {
    while let Some(ev) = events.next().await {
        let Some(s) = status.upgrade() else { return };
        lock(&s).service = format!("{:?}", ev.state());
    }
}

async fn accept_loop(
    tor: std::sync::Weak<Tor>,
    requests: impl futures::Stream<Item = tor_hsservice::RendRequest> + Send + 'static,
) {
    let mut streams = std::pin::pin!(tor_hsservice::handle_rend_requests(requests));
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let mut acceptor: Option<(TlsAcceptor, mpsc::Sender<Authenticated>)> = None;
    while let Some(req) = streams.next().await {
        let Some(t) = tor.upgrade() else { return };
        if acceptor.is_none() {
            let incoming = lock(&t.incoming);
            if let Some(i) = incoming.as_ref() {
                match t.tls.server_config(i.policy.clone()) {
                    Ok(cfg) => acceptor = Some((TlsAcceptor::from(Arc::new(cfg)), i.out.clone())),
                    Err(e) => tracing::warn!("onion listener: {e}"),
                }
            }
        }
        drop(t);
        let Some((acc, out)) = acceptor.clone() else {
            refuse(req).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("too many onion handshakes at once; stream refused");
            refuse(req).await;
            continue;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let port_ok = matches!(
                req.request(),
                tor_proto::stream::IncomingStreamRequest::Begin(b) if b.port() == ONION_PORT
            );
            if !port_ok {
                refuse(req).await;
                return;
            }
            let stream = match req.accept(Connected::new_empty()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("onion stream not accepted: {e}");
                    return;
                }
            };
            if let Some(a) = tls::accept(&acc, stream, Carrier::Onion, None).await {
                let _ = out.send(a).await;
            }
        });
    }
}

async fn refuse(req: StreamRequest) {
    let _ = req.reject(End::new_with_reason(EndReason::DONE)).await;
}

/// Dials contacts' onion services.
#[derive(Debug, Clone)]
pub struct OnionTransport {
    tor: Arc<Tor>,
}

impl OnionTransport {
    async fn dial_inner(
        &self,
        id: PeerId,
        port: u16,
        expected: PeerId,
        gate: &GateKey,
    ) -> Result<Authenticated, DialError> {
        if id != expected {
            return Err(DialError::Handshake(
                "the onion address is not the expected contact's".into(),
            ));
        }
        let cfg = Arc::new(self.tor.tls.client_config(expected, gate)?);
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, self.tor.connect_raw(&id, port))
            .await
            .map_err(|_| DialError::Unreachable(std::io::ErrorKind::TimedOut.into()))?
            .map_err(|e| DialError::Unreachable(std::io::Error::other(report(&e))))?;
        tls::connect(cfg, stream, Carrier::Onion, None, expected).await
    }
}

impl Transport for OnionTransport {
    fn carrier(&self) -> Carrier {
        Carrier::Onion
    }

    fn dial<'a>(
        &'a self,
        addr: &'a PeerAddr,
        expected: PeerId,
        gate: &'a GateKey,
    ) -> BoxFuture<'a, Result<Authenticated, DialError>> {
        Box::pin(async move {
            match addr {
                PeerAddr::Onion(id, port) => self.dial_inner(*id, *port, expected, gate).await,
                other => Err(DialError::WrongCarrier(other.carrier())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    #[test]
    fn both_ends_derive_the_same_discovery_key_per_direction() {
        let (a, b) = (key(1), key(2));
        let (pa, pb) = (a.peer_id(), b.peer_id());
        let a_reads_b = DiscoveryKeys::for_pair(&a, &pa, &pb).expect("a");
        let b_admits_a = DiscoveryKeys::for_pair(&b, &pa, &pb).expect("b");
        assert_eq!(a_reads_b.public(), b_admits_a.public());
        let b_reads_a = DiscoveryKeys::for_pair(&b, &pb, &pa).expect("b->a");
        assert_ne!(a_reads_b.public(), b_reads_a.public(), "directions differ");
        let c = key(3);
        let c_reads_b = DiscoveryKeys::for_pair(&c, &c.peer_id(), &pb).expect("c");
        assert_ne!(
            c_reads_b.public(),
            a_reads_b.public(),
            "a stranger's key is another"
        );
        let inv = DiscoveryKeys::for_invite(&[9; 32]);
        assert_ne!(inv.public(), a_reads_b.public());
        assert_eq!(inv.public(), DiscoveryKeys::for_invite(&[9; 32]).public());
    }

    #[test]
    fn client_nicknames_are_valid_slugs_and_name_no_contact() {
        let k = DiscoveryKeys::for_invite(&[1; 32]).public();
        let n = nickname_for(&k);
        assert!(n.parse::<HsClientNickname>().is_ok(), "{n}");
        assert_eq!(n.len(), 21);
        assert_ne!(
            n,
            nickname_for(&DiscoveryKeys::for_invite(&[2; 32]).public())
        );
    }

    #[test]
    fn the_identity_key_is_the_onion_service_key() {
        let k = key(5);
        let kp = ed25519::Keypair::from_bytes(&k.to_seed());
        let hsid = HsIdKeypair::from(ed25519::ExpandedKeypair::from(&kp));
        let id: HsId = tor_hscrypto::pk::HsIdKey::from(&hsid).id();
        assert_eq!(id, hs_id(&k.peer_id()).expect("onion"));
    }

    fn settings(dir: &Path, file: Option<PathBuf>) -> TorSettings {
        TorSettings {
            state_dir: dir.join("state"),
            cache_dir: dir.join("cache"),
            config_file: file,
        }
    }

    #[test]
    fn a_bad_tor_config_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("coterie-torcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = load_config(&settings(&dir, Some(dir.join("nope.toml"))));
        assert!(
            matches!(&missing, Err(TorError::Config { why, .. }) if why == "no such file"),
            "{missing:?}"
        );
        let typo = dir.join("typo.toml");
        std::fs::write(&typo, "[bridges]\nenabeld = true\n").expect("write");
        let err = load_config(&settings(&dir, Some(typo))).expect_err("unknown key");
        assert!(err.to_string().contains("enabeld"), "{err}");
        let broken = dir.join("broken.toml");
        std::fs::write(&broken, "[tor_network\n").expect("write");
        assert!(load_config(&settings(&dir, Some(broken))).is_err());
        let ok = dir.join("ok.toml");
        std::fs::write(&ok, "[path_rules]\nipv4_subnet_family_prefix = 33\n").expect("write");
        load_config(&settings(&dir, Some(ok))).expect("a valid file loads");
        load_config(&settings(&dir, None)).expect("no file: arti's defaults");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
