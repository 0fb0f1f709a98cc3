//! Hostile connections, from strangers and from contacts: half-open
//! sockets, slow-loris handshakes, oversized garbage, rapid reconnects, and
//! a contact whose node stops reading. Each is cut off or back-pressured;
//! the node's memory stays bounded, it never panics, other contacts chat on
//! (an established session and a new handshake alike) and nothing stored
//! is lost. Authenticated malformed stanzas are in `malformed.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coterie_tests::raw::RawPeer;
use coterie_tests::{NodeProc, assert_nothing_plain, introduce, round_trip, texts, wait_for};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The stranger's own loopback address: the node tells it apart from the
/// contacts, who connect from 127.0.0.1.
const STRANGER: [u8; 4] = [127, 0, 0, 2];

fn soak() -> bool {
    std::env::var_os("COTERIE_SOAK").is_some()
}

async fn from_stranger(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((STRANGER, 0)))?;
    s.connect(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// How long until the node closed `s` (a read gives 0 or an error), at
/// most `limit`.
async fn closed_after<R: AsyncRead + Unpin>(s: &mut R, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

#[derive(Default)]
struct Figures {
    half_open: AtomicU64,
    reconnects: AtomicU64,
    slowest_cut_ms: AtomicU64,
}

#[test]
fn strangers_holding_trickling_and_flooding_sockets_spare_contacts() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut alice = NodeProc::init(tmp.path(), "alice_under_attack");
    let mut bob = NodeProc::init(tmp.path(), "bob_the_contact");
    alice.start();
    bob.start();
    introduce(&alice, &bob);
    round_trip(&bob, &alice, "before the attack");
    // A contact that will make new handshakes during the attack (a raw
    // peer: its handshake goes to alice's listener, whoever dials first).
    let carol = RawPeer::new();
    let (_c, status) = rt.block_on(carol.redeem(&alice.invite(), alice.port));
    assert_eq!(status, 0, "carol's invite refused");
    let key = alice.key();
    let rss0 = alice.rss_kib().expect("rss");
    let port = alice.port;
    let attack_for = Duration::from_secs(if soak() { 300 } else { 14 });
    let stop = Arc::new(AtomicBool::new(false));
    let figures = Arc::new(Figures::default());
    let limit = transport::HANDSHAKE_TIMEOUT + Duration::from_secs(3);

    let mut tasks = Vec::new();
    // 200 half-open sockets that never send a byte, reopened as they are
    // closed; each must be closed within the handshake deadline.
    for _ in 0..200 {
        let (stop, fig) = (stop.clone(), figures.clone());
        tasks.push(rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = from_stranger(port).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                fig.half_open.fetch_add(1, Ordering::Relaxed);
                let took = closed_after(&mut s, limit).await;
                let took = took.unwrap_or_else(|| panic!("a half-open socket outlived {limit:?}"));
                fig.slowest_cut_ms
                    .fetch_max(took.as_millis() as u64, Ordering::Relaxed);
            }
        }));
    }
    // Slow-loris: a TLS record header, then one byte every 300 ms.
    for _ in 0..8 {
        let (stop, fig) = (stop.clone(), figures.clone());
        tasks.push(rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(s) = from_stranger(port).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let (mut r, mut w) = s.into_split();
                let t = Instant::now();
                let trickle = tokio::spawn(async move {
                    let hello = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
                    for b in hello.iter().cycle().take(1000) {
                        if w.write_all(&[*b]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                });
                if closed_after(&mut r, limit).await.is_none() {
                    panic!("a slow-loris handshake outlived {limit:?}");
                }
                trickle.abort();
                fig.slowest_cut_ms
                    .fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }));
    }
    // Oversized: 16 MiB of random bytes at once, again and again.
    {
        let (stop, fig) = (stop.clone(), figures.clone());
        tasks.push(rt.spawn(async move {
            let junk: Vec<u8> = (0..16 << 20).map(|_| rand::random::<u8>()).collect();
            while !stop.load(Ordering::Relaxed) {
                let Ok(s) = from_stranger(port).await else {
                    continue;
                };
                let (mut r, mut w) = s.into_split();
                let junk = junk.clone();
                let writer = tokio::spawn(async move {
                    let _ = w.write_all(&junk).await;
                });
                let t = Instant::now();
                if closed_after(&mut r, limit).await.is_none() {
                    panic!("a 16 MiB garbage sender was not cut off");
                }
                writer.abort();
                fig.slowest_cut_ms
                    .fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }));
    }
    // Rapid reconnects: connect and close, as fast as it goes.
    {
        let (stop, fig) = (stop.clone(), figures.clone());
        tasks.push(rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = from_stranger(port).await {
                    drop(s);
                    fig.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
        }));
    }

    // During the attack: the established session chats, and carol's fresh
    // handshakes are accepted at once.
    let t0 = Instant::now();
    let mut rounds = 0;
    let mut worst_rt = Duration::ZERO;
    let mut worst_handshake = Duration::ZERO;
    let mut peak = rss0;
    while t0.elapsed() < attack_for {
        std::thread::sleep(Duration::from_millis(500));
        let rt_ = round_trip(&bob, &alice, &format!("during the attack {rounds}"));
        worst_rt = worst_rt.max(rt_);
        let t = Instant::now();
        rt.block_on(async {
            let mut c = tokio::time::timeout(Duration::from_secs(10), carol.session(port, key))
                .await
                .expect("carol's handshake starved by the strangers");
            c.open_stream(&carol.key.peer_id(), 0).await;
        });
        worst_handshake = worst_handshake.max(t.elapsed());
        peak = peak.max(alice.rss_kib().unwrap_or(0));
        rounds += 1;
        assert!(alice.running(), "alice died under attack");
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        rt.block_on(t).expect("an attack task failed its check");
    }
    let rss1 = alice.rss_kib().expect("rss");
    eprintln!(
        "{attack_for:?} of attack: {} half-open sockets, {} connect-and-close, slowest cut {} ms; \
         {rounds} round trips with bob (worst {worst_rt:.1?}), carol's worst new handshake \
         {worst_handshake:.1?}; alice RSS {rss0} KiB before, peak {peak} KiB, after {rss1} KiB",
        figures.half_open.load(Ordering::Relaxed),
        figures.reconnects.load(Ordering::Relaxed),
        figures.slowest_cut_ms.load(Ordering::Relaxed),
    );
    assert!(rounds >= 3, "too few rounds to tell: {rounds}");
    assert!(
        worst_rt < Duration::from_secs(5),
        "the attack delayed a contact's message by {worst_rt:?}"
    );
    assert!(
        worst_handshake < Duration::from_secs(5),
        "the attack delayed a contact's handshake by {worst_handshake:?}"
    );
    assert!(
        peak < rss0 + 64 * 1024,
        "memory grew under attack: {rss0} KiB → {peak} KiB"
    );
    let log = alice.log_text();
    assert!(!log.contains("panicked"), "alice panicked: {log}");
    assert!(
        !log.contains("127.0.0.2"),
        "the log names an address: {log}"
    );

    // Nothing stored was lost: every message from bob is there, once.
    let from_bob: Vec<String> = texts(&alice, &bob.name)
        .into_iter()
        .filter(|(d, _, _)| d == "in")
        .map(|(_, b, _)| b)
        .collect();
    assert_eq!(from_bob.len(), rounds + 1, "{from_bob:?}");
    bob.stop();
    alice.stop();
    assert_nothing_plain(tmp.path(), &[&alice, &bob], &["during the attack"]);
}

/// A contact whose node stops reading (its process frozen with SIGSTOP)
/// while a burst is sent to it: the sender keeps at most its window in
/// flight, cuts the dead connection, keeps the rest in its outbox, and
/// chats on with another contact; when the frozen node wakes, every
/// message arrives once, in order.
#[test]
fn a_frozen_contact_is_cut_off_not_buffered_and_gets_everything_later() {
    let count = if soak() { 20_000 } else { 2_000 };
    let tmp = tempfile::tempdir().expect("tmp");
    let mut alice = NodeProc::init(tmp.path(), "alice_sender");
    let mut bob = NodeProc::init(tmp.path(), "bob_frozen");
    let mut carol = NodeProc::init(tmp.path(), "carol_awake");
    for n in [&mut alice, &mut bob, &mut carol] {
        n.start();
    }
    introduce(&alice, &bob);
    introduce(&alice, &carol);
    round_trip(&alice, &bob, "before the freeze");
    let rss0 = alice.rss_kib().expect("rss");
    let bob_pid = bob.pid().expect("pid").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &bob_pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} failed");
    };
    signal("-STOP");
    let t0 = Instant::now();
    let bodies: Vec<String> = (0..count).map(|i| format!("while frozen {i:05}")).collect();
    let mut ctl = alice.control_conn().expect("control");
    for b in &bodies {
        ctl.call(&serde_json::json!({"cmd": "send", "contact": bob.name, "text": b}))
            .expect("send");
    }
    // Alice notices the dead connection (its pings go unanswered).
    wait_for(
        "alice to cut the frozen connection",
        Duration::from_secs(60),
        || (!alice.connected_to(&bob.name)).then_some(()),
    );
    let cut = t0.elapsed();
    let mut peak = alice.rss_kib().unwrap_or(0);
    let rt_ = round_trip(&alice, &carol, "carol is unaffected");
    peak = peak.max(alice.rss_kib().unwrap_or(0));
    signal("-CONT");
    let t1 = Instant::now();
    wait_for(
        "every message in bob's store",
        Duration::from_secs(if soak() { 1200 } else { 120 }),
        || {
            std::thread::sleep(Duration::from_millis(200));
            peak = peak.max(alice.rss_kib().unwrap_or(0));
            let got = bob
                .history(&alice.name, 1_000_000)
                .iter()
                .filter(|m| m["dir"] == "in")
                .count();
            (got > count).then_some(())
        },
    );
    let drained = t1.elapsed();
    let got: Vec<String> = bob
        .history(&alice.name, 1_000_000)
        .iter()
        .filter(|m| m["dir"] == "in")
        .filter_map(|m| m["body"].as_str())
        .filter(|b| b.starts_with("while frozen"))
        .map(str::to_string)
        .collect();
    assert!(
        got == bodies,
        "lost, duplicated or reordered: {} of {count}",
        got.len()
    );
    eprintln!(
        "{count} messages to a frozen contact: connection cut after {cut:.1?}; carol's round trip \
         meanwhile {rt_:.1?}; after waking, all arrived once in order in {drained:.1?}; \
         alice RSS {rss0} KiB before, peak {peak} KiB"
    );
    assert!(
        rt_ < Duration::from_secs(5),
        "a frozen contact delayed another by {rt_:?}"
    );
    assert!(
        peak < rss0 + 64 * 1024,
        "alice buffered for the frozen contact: {rss0} KiB → {peak} KiB"
    );
    for n in [&mut alice, &mut bob, &mut carol] {
        n.stop();
    }
    assert_nothing_plain(tmp.path(), &[&alice, &bob, &carol], &["while frozen"]);
}
