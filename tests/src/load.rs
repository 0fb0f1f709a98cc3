//! Load on one node: `peers` contacts, each an in-process node over real
//! sockets on 127.0.0.1, each sending `rate` OMEMO messages a second for
//! `secs` seconds to one `coterie run` process (the hub). Every body carries
//! its send time; the hub stores each with its receive time, so the hub's
//! own history gives the latency of every message. The hub's RSS and CPU
//! come from `/proc`. Used by `tests/tests/load.rs` (short) and by
//! `coterie-bench load` (the 50 × 20/s × 60 s figures).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use node::runtime::{Node, NodeConfig, NodeEvent};
use node::store::crypto::KdfParams;
use node::store::{DEFAULT_RETENTION_DAYS, Profile, Store};

use crate::{NodeProc, wait_for};

/// Every body starts with this.
pub const MARK: &str = "loadtest-";

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Peers, rate per peer, seconds.
    pub shape: (usize, u32, u64),
    /// Messages the peers sent.
    pub sent: usize,
    /// Distinct messages in the hub's store.
    pub unique: usize,
    /// Messages stored more than once.
    pub duplicated: usize,
    /// Messages a peer sent that the hub never stored.
    pub lost: usize,
    /// Messages that failed to decrypt at the hub.
    pub undecryptable: usize,
    /// Send-to-stored latency at the hub, ms: p50, p99, max.
    pub latency_ms: (f64, f64, f64),
    /// From the last send until the last message was stored.
    pub drain: Duration,
    /// Hub RSS before the load and its peak (VmHWM), KiB.
    pub rss_kib: (u64, u64),
    /// Hub CPU time during the run, seconds (user + system).
    pub cpu_secs: f64,
    /// CPU time of this process (the peers) during the run, seconds.
    pub peers_cpu_secs: f64,
    /// How long a peer's send call took (sealing and storing the message
    /// at the sender), ms: p50, p99.
    pub send_call_ms: (f64, f64),
    /// Wall time of the sending phase plus the drain.
    pub wall: Duration,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (peers, rate, secs) = self.shape;
        write!(
            f,
            "{peers} peers × {rate} msg/s × {secs} s: sent {}, stored {} (lost {}, duplicated {}, \
             undecryptable {}); latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; drained {:.1?} \
             after the last send; hub RSS {} KiB before, peak {} KiB; hub CPU {:.1} s in {:.1?} \
             ({:.0} % of one core); the peers' process {:.1} s of CPU; a peer's send call p50 \
             {:.1} ms, p99 {:.1} ms",
            self.sent,
            self.unique,
            self.lost,
            self.duplicated,
            self.undecryptable,
            self.latency_ms.0,
            self.latency_ms.1,
            self.latency_ms.2,
            self.drain,
            self.rss_kib.0,
            self.rss_kib.1,
            self.cpu_secs,
            self.wall,
            100.0 * self.cpu_secs / self.wall.as_secs_f64(),
            self.peers_cpu_secs,
            self.send_call_ms.0,
            self.send_call_ms.1,
        )
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of `pid`, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// Creates a profile named `name` in `dir`, in-process (no `coterie init`).
pub fn create_profile(dir: &Path, name: &str, passphrase: &str, kdf: KdfParams) {
    let p = Profile {
        name: name.into(),
        seed: rand::random(),
        created: 0,
        retention_days: DEFAULT_RETENTION_DAYS,
        last_addrs: vec![],
        bridge: None,
        settings: Default::default(),
    };
    Store::create(dir, passphrase, &p, kdf).expect("create a profile");
}

fn fast_profile(dir: &Path, name: &str) {
    // A test profile: a light key derivation (the hub, a real `coterie
    // init`, has the default one).
    let kdf = KdfParams {
        m_kib: 1024,
        t: 1,
        ..KdfParams::recommended()
    };
    create_profile(dir, name, crate::PASSPHRASE, kdf);
}

/// Runs the load and returns its figures. Panics with a clear message if
/// the hub or a peer cannot start.
pub fn run(root: &Path, peers: usize, rate: u32, secs: u64) -> Figures {
    let mut hub = NodeProc::init(root, "load-hub");
    hub.start();
    let pid = hub.pid().expect("hub pid");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let names: Vec<String> = (0..peers).map(|i| format!("peer{i:02}")).collect();
    let nodes: Vec<Arc<Node>> = rt.block_on(async {
        let mut nodes = Vec::new();
        for name in &names {
            let dir = root.join(name);
            fast_profile(&dir, name);
            let cfg = NodeConfig {
                listen: vec!["127.0.0.1:0".parse().expect("addr")],
                ..Default::default()
            };
            let store = Store::open(&dir, crate::PASSPHRASE).expect("open peer");
            let n = Node::start(store, cfg).await.expect("start peer");
            let mut ev = n.subscribe();
            n.add(&hub.invite(), Some("hub")).await.expect("add hub");
            // Keys exchanged and a session up: the first message delivered.
            let m = n
                .send("hub", &format!("{MARK}hello from {name}"))
                .await
                .expect("send");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, ev.recv()).await {
                    Ok(Ok(NodeEvent::Delivered { seq, .. })) if seq == m.seq => break,
                    Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                    other => panic!("{name}'s first message to the hub: {other:?}"),
                }
            }
            nodes.push(Arc::new(n));
        }
        nodes
    });
    let rss0 = proc_status(pid, "VmRSS:");
    let cpu0 = cpu_secs(pid);
    let me = std::process::id();
    let peers_cpu0 = cpu_secs(me);
    let t0 = Instant::now();
    let per_peer = (u64::from(rate) * secs) as usize;
    // Each peer sends on its own clock, `rate` a second.
    let (sent, mut calls): (usize, Vec<f64>) = rt.block_on(async {
        let mut tasks = Vec::new();
        for (p, n) in nodes.iter().enumerate() {
            let n = n.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut calls = Vec::with_capacity(per_peer);
                for i in 0..per_peer {
                    tick.tick().await;
                    let body = format!("{MARK}{p:02}-{i:06}-{}", unix_ms());
                    let t = Instant::now();
                    n.send("hub", &body).await.expect("send");
                    calls.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                calls
            }));
        }
        let mut calls = Vec::new();
        for t in tasks {
            calls.extend(t.await.expect("sender"));
        }
        (calls.len(), calls)
    });
    let sent_done = Instant::now();
    // Drain: until the hub holds every message (or it stops growing).
    // The hub's own counter (no history dump while it is under load).
    let count = |hub: &NodeProc| -> usize {
        hub.status()["stats"]["messages_in"].as_u64().unwrap_or(0) as usize
    };
    let want = sent + peers;
    wait_for(
        "the hub to store every message",
        Duration::from_secs(60 + secs * 2),
        || {
            std::thread::sleep(Duration::from_millis(250));
            (count(&hub) >= want).then_some(())
        },
    );
    let drain = sent_done.elapsed();
    let wall = t0.elapsed();
    let cpu = cpu_secs(pid) - cpu0;
    let peers_cpu = cpu_secs(me) - peers_cpu0;
    calls.sort_by(|a, b| a.total_cmp(b));
    let call_q = |p: f64| {
        calls
            .get(((calls.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let peak = proc_status(pid, "VmHWM:");

    let mut seen = HashSet::new();
    let mut duplicated = 0;
    let mut undecryptable = 0;
    let mut lat = Vec::new();
    for name in &names {
        for m in hub.history(name, 1_000_000) {
            if m["dir"] != "in" {
                continue;
            }
            if m.get("undecryptable").is_some() {
                undecryptable += 1;
                continue;
            }
            let body = m["body"].as_str().unwrap_or_default().to_string();
            if body.contains("hello from") {
                continue;
            }
            let sent_ms: Option<u64> = body.rsplit('-').next().and_then(|v| v.parse().ok());
            if let (Some(s), Some(r)) = (sent_ms, m["ts"].as_u64()) {
                lat.push(r.saturating_sub(s) as f64);
            }
            if !seen.insert(body) {
                duplicated += 1;
            }
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let figures = Figures {
        shape: (peers, rate, secs),
        sent,
        unique: seen.len(),
        duplicated,
        lost: sent.saturating_sub(seen.len()),
        undecryptable,
        latency_ms: (q(0.5), q(0.99), lat.last().copied().unwrap_or(f64::NAN)),
        drain,
        rss_kib: (rss0, peak),
        cpu_secs: cpu,
        peers_cpu_secs: peers_cpu,
        send_call_ms: (call_q(0.5), call_q(0.99)),
        wall,
    };
    rt.block_on(async {
        for n in nodes {
            if let Ok(n) = Arc::try_unwrap(n) {
                n.shutdown().await;
            }
        }
    });
    hub.stop();
    figures
}
