//! The LAN [`Discovery`]: encrypted records ([`super::record`]) published and
//! browsed with `mdns-sd`.
//!
//! Two threads: one re-announces at every period boundary (old instances are
//! unregistered, new ones registered under new random names), one reads
//! browse events and keeps, per contact, the addresses its latest record
//! gave. Only contacts' records are kept, so memory is bounded by the
//! contact list whatever a stranger multicasts; anything else is dropped
//! without a log line naming it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use transport::{PeerAddr, PeerId, SecretKey};

use super::record::{self, PairSecret, Ports, Record, SERVICE_TYPE};
use crate::Discovery;

/// A hook called with a contact whose record was just seen.
pub type FoundHook = Arc<dyn Fn(&PeerId) + Send + Sync>;

/// Settings.
#[derive(Debug, Clone, Copy)]
pub struct LanConfig {
    /// Seconds per period (records rotate at each boundary).
    pub period_secs: u64,
}

impl Default for LanConfig {
    fn default() -> Self {
        LanConfig {
            period_secs: record::DEFAULT_PERIOD_SECS,
        }
    }
}

struct Seen {
    addrs: Vec<PeerAddr>,
    at: Instant,
}

struct Inner {
    /// Replaced by a fresh daemon every period: mdns-sd caches every record
    /// it hears, and a stranger can multicast as many as it likes; starting
    /// over each period bounds that cache to one period's worth.
    daemon: Mutex<Option<ServiceDaemon>>,
    /// The period of the current daemon.
    daemon_period: Mutex<u64>,
    key: SecretKey,
    cfg: LanConfig,
    secrets: RwLock<Vec<PairSecret>>,
    seen: Mutex<HashMap<PeerId, Seen>>,
    ports: RwLock<Option<Ports>>,
    /// The addresses we announce: only those we listen on (never every
    /// interface's, which could include stable MAC-derived IPv6 addresses).
    ips: RwLock<Vec<IpAddr>>,
    stopped: std::sync::atomic::AtomicBool,
    registered: Mutex<Vec<String>>,
    found: RwLock<Option<FoundHook>>,
    /// Wakes the announcer early (ports or contacts changed, or stop).
    wake: std::sync::mpsc::SyncSender<bool>,
}

/// LAN discovery over mDNS.
#[derive(Clone)]
pub struct LanDiscovery {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LanDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LanDiscovery(..)")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl LanDiscovery {
    /// Starts the mDNS daemon, browsing and (once ports are published)
    /// announcing. Runs mDNS on every interface of this network namespace.
    pub fn start(key: &SecretKey, contacts: &[PeerId], cfg: LanConfig) -> Result<Self, String> {
        let (wake, wake_rx) = std::sync::mpsc::sync_channel(4);
        let inner = Arc::new(Inner {
            daemon: Mutex::new(None),
            daemon_period: Mutex::new(0),
            key: SecretKey::from_seed(&key.to_seed()),
            cfg,
            secrets: RwLock::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
            ports: RwLock::new(None),
            ips: RwLock::new(Vec::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            registered: Mutex::new(Vec::new()),
            found: RwLock::new(None),
            wake,
        });
        let lan = LanDiscovery { inner };
        lan.inner.recycle()?;
        lan.set_contacts(contacts);
        let weak = Arc::downgrade(&lan.inner);
        std::thread::Builder::new()
            .name("coterie-lan-announce".into())
            .spawn(move || announcer(weak, wake_rx))
            .map_err(|e| e.to_string())?;
        Ok(lan)
    }

    /// Replaces the contact list (whom we announce to and look for).
    pub fn set_contacts(&self, contacts: &[PeerId]) {
        let secrets: Vec<PairSecret> = contacts
            .iter()
            .filter_map(|c| PairSecret::new(&self.inner.key, c))
            .collect();
        if let Ok(mut s) = self.inner.secrets.write() {
            *s = secrets;
        }
        if let Ok(mut seen) = self.inner.seen.lock() {
            seen.retain(|p, _| contacts.contains(p));
        }
        let _ = self.inner.wake.try_send(true);
    }

    /// Calls `f` whenever a contact's record is seen (to dial at once).
    pub fn on_found(&self, f: FoundHook) {
        if let Ok(mut h) = self.inner.found.write() {
            *h = Some(f);
        }
    }

    /// Stops announcing and browsing.
    pub fn stop(&self) {
        self.inner.stop();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Inner {
    /// Withdraws our records and shuts the daemon down; the announcer sees
    /// `stopped` and never starts another.
    fn stop(&self) {
        use std::sync::atomic::Ordering;
        self.stopped.store(true, Ordering::SeqCst);
        self.unregister_all();
        let old = self.daemon.lock().ok().and_then(|mut d| d.take());
        if let Some(d) = old {
            let _ = d.shutdown();
        }
        let _ = self.wake.try_send(false);
    }

    fn period(&self) -> u64 {
        record::period_of(now_secs(), self.cfg.period_secs)
    }

    /// Starts a fresh daemon (browsing) in place of the current one, which
    /// is shut down after our records were withdrawn from it.
    fn recycle(self: &Arc<Self>) -> Result<(), String> {
        let daemon = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
        // A contact's announcement counts the moment it is multicast, not
        // only when it answers one of our (backing-off) queries.
        daemon
            .accept_unsolicited(true)
            .map_err(|e| format!("mDNS: {e}"))?;
        let events = daemon
            .browse(SERVICE_TYPE)
            .map_err(|e| format!("mDNS browse: {e}"))?;
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("coterie-lan-browse".into())
            .spawn(move || {
                // Ends when its daemon is shut down (the channel closes).
                while let Ok(ev) = events.recv() {
                    let Some(inner) = weak.upgrade() else { return };
                    if let ServiceEvent::ServiceResolved(info) = ev {
                        inner.on_resolved(&info);
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        self.unregister_all();
        let old = {
            let mut slot = self
                .daemon
                .lock()
                .map_err(|_| "mDNS state poisoned".to_string())?;
            if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
                // Stopped meanwhile: the new daemon goes too.
                Some(daemon)
            } else {
                slot.replace(daemon)
            }
        };
        if let Some(d) = old {
            let _ = d.shutdown();
        }
        if let Ok(mut p) = self.daemon_period.lock() {
            *p = self.period();
        }
        Ok(())
    }

    fn on_resolved(&self, info: &mdns_sd::ResolvedService) {
        let props: Vec<(&str, &[u8])> = info
            .txt_properties
            .iter()
            .map(|p| (p.key(), p.val().unwrap_or_default()))
            .collect();
        let Ok((nonce, slots)) = Record::parse_txt(props) else {
            tracing::debug!("ignored a malformed LAN record");
            return;
        };
        let rec = Record {
            instance: String::new(),
            host: String::new(),
            decoy_port: 0,
            nonce,
            slots,
        };
        let ips: Vec<IpAddr> = info.addresses.iter().map(|a| a.to_ip_addr()).collect();
        let hits = match self.secrets.read() {
            Ok(s) => record::read(&rec, &ips, &s, self.period()),
            Err(_) => return,
        };
        for (peer, ports) in hits {
            let mut addrs = Vec::new();
            for ip in info.addresses.iter().take(8) {
                let ip = ip.to_ip_addr();
                if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                    continue;
                }
                let scope = match ip {
                    IpAddr::V6(v6) if v6.is_unicast_link_local() => info
                        .addresses
                        .iter()
                        .find_map(|s| match s {
                            mdns_sd::ScopedIp::V6(s6) if IpAddr::V6(*s6.addr()) == ip => {
                                Some(s6.scope_id().index)
                            }
                            _ => None,
                        })
                        .unwrap_or(0),
                    _ => 0,
                };
                let sock = |port: u16| match ip {
                    IpAddr::V6(v6) => {
                        SocketAddr::V6(std::net::SocketAddrV6::new(v6, port, 0, scope))
                    }
                    IpAddr::V4(v4) => SocketAddr::V4(std::net::SocketAddrV4::new(v4, port)),
                };
                addrs.push(PeerAddr::Tcp(sock(ports.tcp)));
                addrs.push(PeerAddr::Quic(sock(ports.quic)));
            }
            if addrs.is_empty() {
                continue;
            }
            // IPv4 first: link-local IPv6 needs the right interface scope.
            addrs.sort_by_key(|a| {
                matches!(
                    a,
                    PeerAddr::Tcp(SocketAddr::V6(_)) | PeerAddr::Quic(SocketAddr::V6(_))
                )
            });
            addrs.truncate(crate::MAX_ADDRS_PER_PEER);
            // The hook (dial now) fires only for addresses not seen before:
            // repeats of a record cost nothing.
            let new = match self.seen.lock() {
                Ok(mut seen) => {
                    let new = seen.get(&peer).is_none_or(|s| s.addrs != addrs);
                    seen.insert(
                        peer,
                        Seen {
                            addrs,
                            at: Instant::now(),
                        },
                    );
                    new
                }
                Err(_) => false,
            };
            if new {
                tracing::debug!("a contact's LAN record was seen");
                let hook = self.found.read().ok().and_then(|h| h.clone());
                if let Some(h) = hook {
                    h(&peer);
                }
            }
        }
    }

    fn unregister_all(&self) {
        let names: Vec<String> = match self.registered.lock() {
            Ok(mut r) => std::mem::take(&mut *r),
            Err(_) => return,
        };
        if let Ok(d) = self.daemon.lock()
            && let Some(d) = d.as_ref()
        {
            for n in names {
                let _ = d.unregister(&n);
            }
        }
    }

    fn announce(self: &Arc<Self>) {
        let due = self
            .daemon_period
            .lock()
            .map(|p| *p != self.period())
            .unwrap_or(false);
        if due && let Err(e) = self.recycle() {
            tracing::warn!("cannot restart LAN discovery: {e}");
        }
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let Some(ports) = self.ports.read().ok().and_then(|p| *p) else {
            return;
        };
        let ips = self.ips.read().map(|i| i.clone()).unwrap_or_default();
        if ips.is_empty() {
            return;
        }
        let records = match self.secrets.read() {
            Ok(s) => record::announce(&s, ports, &ips, self.period(), &mut rand::rngs::OsRng),
            Err(_) => return,
        };
        let ip_list: Vec<IpAddr> = ips.clone();
        self.unregister_all();
        let mut names = Vec::new();
        for r in records {
            let props: HashMap<String, String> = r.txt().into_iter().collect();
            let mut info = match ServiceInfo::new(
                SERVICE_TYPE,
                &r.instance,
                &r.host,
                ip_list.as_slice(),
                r.decoy_port,
                props,
            ) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!("cannot build a LAN record: {e}");
                    continue;
                }
            };
            // Names are 80 random bits: a conflict cannot happen, and
            // probing for one (RFC 6762 §8.1) would delay the record ~0.8 s.
            info.set_requires_probe(false);
            let name = info.get_fullname().to_string();
            let res = match self.daemon.lock() {
                Ok(d) => match d.as_ref() {
                    Some(d) => d.register(info).map_err(|e| e.to_string()),
                    None => return,
                },
                Err(_) => return,
            };
            match res {
                Ok(()) => names.push(name),
                Err(e) => tracing::warn!("cannot announce on the LAN: {e}"),
            }
        }
        if let Ok(mut r) = self.registered.lock() {
            *r = names;
        }
    }
}

/// Re-announces at every period boundary, or when woken.
fn announcer(inner: std::sync::Weak<Inner>, wake: std::sync::mpsc::Receiver<bool>) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        i.announce();
        let secs = i.cfg.period_secs.max(1);
        let left = secs - now_secs() % secs;
        drop(i);
        match wake.recv_timeout(Duration::from_secs(left)) {
            Ok(false) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            Ok(true) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

impl Discovery for LanDiscovery {
    fn lookup(&self, peer: &PeerId) -> Vec<PeerAddr> {
        // A record is good for two periods (its own and the next).
        let max_age = Duration::from_secs(2 * self.inner.cfg.period_secs.max(1));
        self.inner
            .seen
            .lock()
            .ok()
            .and_then(|s| {
                s.get(peer)
                    .filter(|e| e.at.elapsed() <= max_age)
                    .map(|e| e.addrs.clone())
            })
            .unwrap_or_default()
    }

    fn publish(&self, _me: &PeerId, addrs: &[PeerAddr]) {
        let mut ips: Vec<IpAddr> = addrs
            .iter()
            .filter_map(|a| match a {
                PeerAddr::Tcp(s) | PeerAddr::Quic(s) => Some(s.ip()),
                _ => None,
            })
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast())
            .collect();
        ips.sort();
        ips.dedup();
        if ips.is_empty() {
            tracing::warn!("LAN discovery: no LAN address to announce (listen on the LAN address)");
        }
        if let Ok(mut i) = self.inner.ips.write() {
            *i = ips;
        }
        let tcp = addrs.iter().find_map(|a| match a {
            PeerAddr::Tcp(s) => Some(s.port()),
            _ => None,
        });
        let quic = addrs.iter().find_map(|a| match a {
            PeerAddr::Quic(s) => Some(s.port()),
            _ => None,
        });
        if let Some(tcp) = tcp {
            if let Ok(mut p) = self.inner.ports.write() {
                *p = Some(Ports {
                    tcp,
                    quic: quic.unwrap_or(tcp),
                });
            }
            let _ = self.inner.wake.try_send(true);
        }
    }

    fn withdraw(&self, _me: &PeerId) {
        self.stop();
    }

    fn set_contacts(&self, contacts: &[PeerId]) {
        LanDiscovery::set_contacts(self, contacts);
    }

    fn on_found(&self, f: FoundHook) {
        LanDiscovery::on_found(self, f);
    }
}
