//! **Dangerous** compatibility mode: plain XEP-0174 `_presence._tcp`
//! records, so classic link-local clients (libpurple's Bonjour, as in
//! `finch` and Pidgin) can see and chat with a Coterie user.
//!
//! Everything here is in the clear: the display name, the service instance
//! `name@host`, the address and port. It is never on unless the user asks
//! for it (`coterie run --danger-xep0174-compat`). Even then, the host name
//! is a random label made at start, never the machine's own.
//!
//! [`presence_txt`] and [`parse_presence`] are the sans-IO part; [`Presence`]
//! announces and browses with `mdns-sd`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use mdns_sd::{ResolvedService, ServiceDaemon, ServiceEvent, ServiceInfo};

/// The DNS-SD service type of XEP-0174.
pub const PRESENCE_TYPE: &str = "_presence._tcp.local.";
/// At most this many classic peers are remembered.
pub const MAX_PEERS: usize = 64;
/// Longest instance name accepted (`user@host`).
pub const MAX_INSTANCE: usize = 96;

/// A classic peer seen on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassicPeer {
    /// Its instance name, `user@host` (what classic clients use as the JID).
    pub instance: String,
    /// Its addresses (from the A records of its host).
    pub ips: Vec<IpAddr>,
    /// Its XMPP port (`port.p2pj`, else the SRV port).
    pub port: u16,
    /// Its display name (`1st` and `last`, else `nick`), if any.
    pub name: Option<String>,
}

/// The TXT record XEP-0174 §6.3 asks for: `txtvers`, `port.p2pj`, `status`,
/// and the display name in `1st`/`nick`.
pub fn presence_txt(name: &str, port: u16) -> Vec<(String, String)> {
    vec![
        ("txtvers".into(), "1".into()),
        ("port.p2pj".into(), port.to_string()),
        ("status".into(), "avail".into()),
        ("1st".into(), name.into()),
        ("nick".into(), name.into()),
    ]
}

fn clean(s: &str, max: usize) -> Option<String> {
    let s: String = s.chars().filter(|c| !c.is_control()).take(max).collect();
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Reads a `_presence._tcp` instance: its name (the part of the full name
/// before the service type), its TXT properties, SRV port and addresses.
/// `None` for anything malformed or not usable.
pub fn parse_presence(
    fullname: &str,
    props: &HashMap<String, String>,
    srv_port: u16,
    ips: &[IpAddr],
) -> Option<ClassicPeer> {
    let instance = fullname.strip_suffix(&format!(".{PRESENCE_TYPE}"))?;
    if instance.is_empty()
        || instance.len() > MAX_INSTANCE
        || instance
            .chars()
            .any(|c| c.is_control() || c == '/' || c == '\'' || c == '"')
    {
        return None;
    }
    let port = match props.get("port.p2pj") {
        Some(p) => p.trim().parse().ok()?,
        None => srv_port,
    };
    if port == 0 {
        return None;
    }
    let ips: Vec<IpAddr> = ips
        .iter()
        .copied()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast())
        .take(8)
        .collect();
    if ips.is_empty() {
        return None;
    }
    let first = props.get("1st").and_then(|s| clean(s, 64));
    let last = props.get("last").and_then(|s| clean(s, 64));
    let name = match (first, last) {
        (Some(f), Some(l)) => Some(format!("{f} {l}")),
        (Some(f), None) => Some(f),
        (None, Some(l)) => Some(l),
        (None, None) => props.get("nick").and_then(|s| clean(s, 64)),
    };
    Some(ClassicPeer {
        instance: instance.to_string(),
        ips,
        port,
        name,
    })
}

/// A hook told of a classic peer seen (or seen at new addresses).
pub type PeerHook = Arc<dyn Fn(&ClassicPeer) + Send + Sync>;

struct Seen {
    peer: ClassicPeer,
    at: Instant,
}

/// Our `_presence._tcp` announcement and what we see of others'.
///
/// mdns-sd caches every record it hears, without a cap; like the encrypted
/// discovery, the daemon is replaced every `recycle` (our record is
/// registered again on the new one, under the same name), so a flood costs
/// at most one interval's worth of cache.
pub struct Presence {
    daemon: Arc<std::sync::Mutex<Option<ServiceDaemon>>>,
    /// Our own instance, `name@host`.
    pub instance: String,
    peers: Arc<RwLock<HashMap<String, Seen>>>,
    hook: Arc<RwLock<Option<PeerHook>>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Presence(..)")
    }
}

impl Presence {
    /// Announces `name@<random host>` at `ips`:`port` and browses for
    /// others, starting a fresh mDNS daemon every `recycle`. Only ever call
    /// this inside a test's network namespace.
    pub fn start(
        name: &str,
        ips: &[IpAddr],
        port: u16,
        recycle: std::time::Duration,
    ) -> Result<Presence, String> {
        let label: String = {
            let r: [u8; 5] = rand::random();
            data_encoding::BASE32_NOPAD.encode(&r).to_ascii_lowercase()
        };
        let host = format!("coterie-{label}");
        let local: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .take(32)
            .collect();
        let local = if local.is_empty() {
            "coterie".into()
        } else {
            local
        };
        let instance = format!("{local}@{host}");
        let props: HashMap<String, String> = presence_txt(name, port).into_iter().collect();
        let info = ServiceInfo::new(
            PRESENCE_TYPE,
            &instance,
            &format!("{host}.local."),
            ips,
            port,
            props,
        )
        .map_err(|e| format!("cannot build the _presence record: {e}"))?;
        let parts = Parts {
            own: instance.clone(),
            peers: Arc::default(),
            hook: Arc::default(),
        };
        let p = Presence {
            daemon: Arc::new(std::sync::Mutex::new(Some(parts.fresh_daemon(&info)?))),
            instance,
            peers: parts.peers.clone(),
            hook: parts.hook.clone(),
            stopped: Arc::default(),
        };
        let (slot, stopped) = (p.daemon.clone(), p.stopped.clone());
        std::thread::Builder::new()
            .name("coterie-xep0174-recycle".into())
            .spawn(move || {
                use std::sync::atomic::Ordering;
                let tick = std::time::Duration::from_millis(200);
                let mut since = std::time::Duration::ZERO;
                while !stopped.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                    since += tick;
                    if since < recycle {
                        continue;
                    }
                    since = std::time::Duration::ZERO;
                    let Ok(new) = parts.fresh_daemon(&info) else {
                        continue;
                    };
                    let old = match slot.lock() {
                        Ok(mut d) if !stopped.load(Ordering::SeqCst) => d.replace(new),
                        _ => Some(new),
                    };
                    // No goodbye: the record lives on in the new daemon.
                    if let Some(d) = old {
                        let _ = d.shutdown();
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(p)
    }

    /// Sets the hook told of peers seen.
    pub fn on_peer(&self, f: PeerHook) {
        if let Ok(mut h) = self.hook.write() {
            *h = Some(f);
        }
    }

    /// The classic peer announced as `instance`, if seen.
    pub fn lookup(&self, instance: &str) -> Option<ClassicPeer> {
        self.peers
            .read()
            .ok()?
            .get(instance)
            .map(|s| s.peer.clone())
    }

    /// The instance names of the classic peers seen, sorted.
    pub fn instances(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .peers
            .read()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The classic peer whose record carries `ip`, if any: a connection
    /// from an address nobody announced is not taken (as libpurple does).
    pub fn by_ip(&self, ip: IpAddr) -> Option<ClassicPeer> {
        let peers = self.peers.read().ok()?;
        let mut hits = peers.values().filter(|s| s.peer.ips.contains(&ip));
        let first = hits.next()?;
        // Two instances at one address: which one is talking is unknowable.
        hits.next().is_none().then(|| first.peer.clone())
    }

    /// Withdraws the announcement (goodbye packets, so classic clients
    /// drop it at once instead of when its TTL ends) and stops browsing.
    pub fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let daemon = self.daemon.lock().ok().and_then(|mut d| d.take());
        if let Some(d) = daemon {
            if let Ok(done) = d.unregister(&format!("{}.{PRESENCE_TYPE}", self.instance)) {
                let _ = done.recv_timeout(std::time::Duration::from_secs(1));
            }
            let _ = d.shutdown();
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Records `peer` (evicting the peer seen longest ago when [`MAX_PEERS`]
/// are known); returns whether it is new or changed.
fn remember(peers: &mut HashMap<String, Seen>, peer: ClassicPeer, at: Instant) -> bool {
    if !peers.contains_key(&peer.instance)
        && peers.len() >= MAX_PEERS
        && let Some(oldest) = peers
            .iter()
            .min_by_key(|(_, s)| s.at)
            .map(|(k, _)| k.clone())
    {
        peers.remove(&oldest);
    }
    let changed = peers.get(&peer.instance).is_none_or(|s| s.peer != peer);
    peers.insert(peer.instance.clone(), Seen { peer, at });
    changed
}

/// What the browse threads share with the [`Presence`].
struct Parts {
    own: String,
    peers: Arc<RwLock<HashMap<String, Seen>>>,
    hook: Arc<RwLock<Option<PeerHook>>>,
}

impl Parts {
    /// A daemon that announces `info` and feeds what it browses into the
    /// shared table.
    fn fresh_daemon(&self, info: &ServiceInfo) -> Result<ServiceDaemon, String> {
        let daemon = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
        daemon
            .accept_unsolicited(true)
            .map_err(|e| format!("mDNS: {e}"))?;
        daemon
            .register(info.clone())
            .map_err(|e| format!("cannot announce _presence: {e}"))?;
        let events = daemon
            .browse(PRESENCE_TYPE)
            .map_err(|e| format!("mDNS browse: {e}"))?;
        let (peers, hook, own) = (self.peers.clone(), self.hook.clone(), self.own.clone());
        std::thread::Builder::new()
            .name("coterie-xep0174-browse".into())
            .spawn(move || {
                // Ends when its daemon is shut down (the channel closes).
                while let Ok(ev) = events.recv() {
                    match ev {
                        ServiceEvent::ServiceResolved(info) => {
                            on_resolved(&info, &own, &peers, &hook)
                        }
                        ServiceEvent::ServiceRemoved(_, fullname) => {
                            if let Some(i) = fullname.strip_suffix(&format!(".{PRESENCE_TYPE}"))
                                && let Ok(mut p) = peers.write()
                            {
                                p.remove(i);
                            }
                        }
                        _ => {}
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(daemon)
    }
}

fn on_resolved(
    info: &ResolvedService,
    own: &str,
    peers: &RwLock<HashMap<String, Seen>>,
    hook: &RwLock<Option<PeerHook>>,
) {
    let props: HashMap<String, String> = info
        .txt_properties
        .iter()
        .map(|p| (p.key().to_string(), p.val_str().to_string()))
        .collect();
    let ips: Vec<IpAddr> = info.addresses.iter().map(|a| a.to_ip_addr()).collect();
    let Some(peer) = parse_presence(&info.fullname, &props, info.port, &ips) else {
        tracing::debug!("ignored a malformed _presence record");
        return;
    };
    if peer.instance == own {
        return;
    }
    let changed = match peers.write() {
        Ok(mut p) => remember(&mut p, peer.clone(), Instant::now()),
        Err(_) => return,
    };
    if changed {
        let h = hook.read().ok().and_then(|h| h.clone());
        if let Some(h) = h {
            h(&peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const IP: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2))];

    #[test]
    fn a_libpurple_record_is_read() {
        let p = parse_presence(
            "fin@fhost._presence._tcp.local.",
            &props(&[
                ("txtvers", "1"),
                ("port.p2pj", "5298"),
                ("1st", "Fin"),
                ("last", "User"),
            ]),
            5298,
            &IP,
        )
        .expect("peer");
        assert_eq!(p.instance, "fin@fhost");
        assert_eq!(p.port, 5298);
        assert_eq!(p.name.as_deref(), Some("Fin User"));
    }

    #[test]
    fn our_txt_reads_back() {
        let txt: HashMap<String, String> = presence_txt("alice", 6000).into_iter().collect();
        let p = parse_presence("alice@h._presence._tcp.local.", &txt, 1, &IP).expect("peer");
        assert_eq!((p.port, p.name.as_deref()), (6000, Some("alice")));
    }

    #[test]
    fn a_flood_of_records_keeps_at_most_max_peers() {
        let mut peers = HashMap::new();
        let t0 = Instant::now();
        let peer = |i: usize| ClassicPeer {
            instance: format!("p{i}@h"),
            ips: IP.to_vec(),
            port: 5298,
            name: None,
        };
        for i in 0..10 * MAX_PEERS {
            assert!(remember(
                &mut peers,
                peer(i),
                t0 + std::time::Duration::from_millis(i as u64)
            ));
        }
        assert_eq!(peers.len(), MAX_PEERS);
        // The newest are kept; a repeat is not news, a change is.
        assert!(peers.contains_key(&format!("p{}@h", 10 * MAX_PEERS - 1)));
        assert!(!peers.contains_key("p0@h"));
        let last = 10 * MAX_PEERS - 1;
        assert!(!remember(&mut peers, peer(last), t0));
        let mut moved = peer(last);
        moved.port = 5299;
        assert!(remember(&mut peers, moved, t0));
        assert_eq!(peers.len(), MAX_PEERS);
    }

    #[test]
    fn malformed_records_are_refused() {
        let ok = props(&[("port.p2pj", "5298")]);
        for (name, props, ips) in [
            ("x@h._other._tcp.local.", ok.clone(), IP.to_vec()),
            ("._presence._tcp.local.", ok.clone(), IP.to_vec()),
            ("a'b@h._presence._tcp.local.", ok.clone(), IP.to_vec()),
            (
                "x@h._presence._tcp.local.",
                props(&[("port.p2pj", "99999")]),
                IP.to_vec(),
            ),
            (
                "x@h._presence._tcp.local.",
                props(&[("port.p2pj", "0")]),
                IP.to_vec(),
            ),
            ("x@h._presence._tcp.local.", ok.clone(), vec![]),
            (
                "x@h._presence._tcp.local.",
                ok.clone(),
                vec![IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
            ),
        ] {
            assert!(
                parse_presence(name, &props, 5298, &ips).is_none(),
                "{name} {props:?}"
            );
        }
        let long = format!("{}@h._presence._tcp.local.", "a".repeat(200));
        assert!(parse_presence(&long, &ok, 5298, &IP).is_none());
    }
}
