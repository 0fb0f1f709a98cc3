//! `coterie-bench`: the figures in docs/benchmarks.md.
//!
//! ```text
//! cargo run --release -p coterie-tests --bin coterie-bench -- [all|rtt|throughput|store] [--n N] [--store-messages N]
//! cargo run --release -p coterie-tests --bin coterie-bench -- tor [--n N] [--runs N]
//! cargo run --release -p coterie-tests --bin coterie-bench -- bridge [--n N]
//! cargo run --release -p coterie-tests --bin coterie-bench -- load [--peers 50] [--rate 20] [--secs 60]
//! ```
//!
//! Everything runs on 127.0.0.1. `rtt` needs Debian's `prosody`. `lan` and
//! `tor` need root: they build namespaces, and `tor` starts the private Tor
//! network (tests/src/tornet.rs) and runs its nodes inside its namespace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coterie_tests::c2s::C2s;
use coterie_tests::prosody::Prosody;
use node::runtime::{Node, NodeConfig, NodeEvent};
use node::settings::Padding;
use node::store::crypto::KdfParams;
use node::store::{Delivery, Direction, Message, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PASS: &str = "benchmark passphrase";

fn body_1k() -> String {
    "x".repeat(1024)
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (q(0.5), q(0.9), q(0.99))
}

fn create(dir: &Path, name: &str) {
    coterie_tests::load::create_profile(dir, name, PASS, KdfParams::recommended());
}

async fn open_retry(dir: &Path) -> Store {
    for _ in 0..200 {
        match Store::open(dir, PASS) {
            Ok(s) => return s,
            Err(node::store::OpenStoreError::InUse(_)) => {
                tokio::time::sleep(Duration::from_millis(25)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("store stayed in use");
}

async fn start(dir: &Path) -> Node {
    let cfg = NodeConfig {
        listen: vec!["127.0.0.1:0".parse().expect("addr")],
        ..Default::default()
    };
    Node::start(open_retry(dir).await, cfg)
        .await
        .expect("start")
}

async fn wait_event(
    rx: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
    f: impl Fn(&NodeEvent) -> bool,
) {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Ok(e)) if f(&e) => return,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("event channel: {e}"),
            Err(_) => panic!("timed out waiting for an event"),
        }
    }
}

async fn pair(root: &Path) -> (Node, Node) {
    create(&root.join("a"), "alice");
    create(&root.join("b"), "bob");
    let a = start(&root.join("a")).await;
    let b = start(&root.join("b")).await;
    introduce(a, b).await
}

/// `a` invites, `b` adds; returns once they are connected.
async fn introduce(a: Node, b: Node) -> (Node, Node) {
    let mut ev = a.subscribe();
    let uri = a.invite("1h").await.expect("invite");
    b.add(&uri, Some("alice")).await.expect("add");
    wait_event(&mut ev, |e| {
        matches!(e, NodeEvent::Connection { up: true, .. })
    })
    .await;
    (a, b)
}

/// `n` round trips of a 1 KB message from `a` to "bob" (sent, stored,
/// acked, receipt back), in ms, after 20 warm-up ones.
async fn round_trips(
    a: &Node,
    ev: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
    n: usize,
) -> Vec<f64> {
    let body = body_1k();
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let t = Instant::now();
        let m = a.send("bob", &body).await.expect("send");
        wait_event(
            ev,
            |e| matches!(e, NodeEvent::Delivered { seq, .. } if *seq == m.seq),
        )
        .await;
        if i >= 20 {
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    out
}

async fn rtt(n: usize) {
    println!(
        "## 1 KB message round trip (sent, stored, acked, receipt back), 127.0.0.1, {n} runs after 20 warm-up"
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = pair(tmp.path()).await;
    let mut ev = a.subscribe();
    let coterie = round_trips(&a, &mut ev, n).await;
    let body = body_1k();
    a.shutdown().await;
    b.shutdown().await;

    let p = Prosody::start(
        &tmp.path().join("prosody"),
        &[("alice", "pw-a"), ("bob", "pw-b")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut ca = C2s::login(p.port, "alice", "pw-a", "bench")
        .await
        .expect("alice login");
    let mut cb = C2s::login(p.port, "bob", "pw-b", "bench")
        .await
        .expect("bob login");
    let (to_b, to_a) = (cb.jid.clone(), ca.jid.clone());
    let echo = tokio::spawn(async move {
        loop {
            let Ok(m) = cb.next_message().await else {
                return;
            };
            if let Some(id) = m.attr("id")
                && m.get_child("request", "urn:xmpp:receipts").is_some()
            {
                let r = format!(
                    "<message to='{to_a}' id='r{id}'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>"
                );
                if cb.write(&r).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut prosody = Vec::new();
    for i in 0..n + 20 {
        let id = format!("m{i}");
        let t = Instant::now();
        ca.write(&format!("<message to='{to_b}' id='{id}' type='chat'><body>{body}</body><request xmlns='urn:xmpp:receipts'/></message>"))
            .await
            .expect("send");
        loop {
            let m = ca.next_message().await.expect("receipt");
            if m.get_child("received", "urn:xmpp:receipts")
                .and_then(|r| r.attr("id"))
                == Some(id.as_str())
            {
                break;
            }
        }
        if i >= 20 {
            prosody.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    echo.abort();
    let (cm, c9, c99) = stats(coterie);
    let (pm, p9, p99) = stats(prosody);
    println!("| path | median ms | p90 ms | p99 ms |\n| --- | --- | --- | --- |");
    println!("| Coterie node → node (TLS 1.3, both ends fsync) | {cm:.3} | {c9:.3} | {c99:.3} |");
    println!("| Prosody c2s → c2s (plaintext, in memory) | {pm:.3} | {p9:.3} | {p99:.3} |");
    println!(
        "ratio Coterie/Prosody (median): {:.2} (goal ≤ 0.25)\n",
        cm / pm
    );
}

async fn raw_rustls(n: usize) -> f64 {
    use transport::{GateKey, PeerAddr, PeerPolicy, SecretKey, TlsContext, Transport};
    #[derive(Debug)]
    struct Any(Arc<[GateKey]>);
    impl PeerPolicy for Any {
        fn admit(&self, _: &transport::PeerId) -> bool {
            true
        }
        fn gate_keys(&self) -> Arc<[GateKey]> {
            self.0.clone()
        }
    }
    let (ks, kc) = (SecretKey::generate(), SecretKey::generate());
    let gate = GateKey::for_pair(&kc, &ks.peer_id()).expect("gate key");
    let (ts, tc) = (
        TlsContext::new(&ks).expect("tls"),
        TlsContext::new(&kc).expect("tls"),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let policy = Any(vec![gate.clone()].into());
    tokio::spawn(transport::tcp::serve(l, ts, Arc::new(policy), tx));
    let mut c = transport::tcp::TcpTransport::new(tc)
        .dial(&PeerAddr::Tcp(addr), ks.peer_id(), &gate)
        .await
        .expect("dial");
    let mut s = rx.recv().await.expect("accept");
    let total = n * 1024;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < total {
            got += s.io.read(&mut buf).await.expect("read");
        }
        Instant::now()
    });
    let payload = vec![b'x'; 1024];
    let t = Instant::now();
    for _ in 0..n {
        c.io.write_all(&payload).await.expect("write");
    }
    c.io.flush().await.expect("flush");
    let end = reader.await.expect("reader");
    n as f64 / (end - t).as_secs_f64()
}

async fn coterie_stream(n: usize) -> f64 {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = pair(tmp.path()).await;
    b.shutdown().await;
    let body = body_1k();
    let bodies: Vec<&str> = (0..1000).map(|_| body.as_str()).collect();
    let contact = node::ops::find_contact(a.store(), "bob").expect("bob").id;
    for _ in 0..n / 1000 {
        a.store()
            .queue_outgoing_many(contact, &bodies, 0)
            .expect("queue");
    }
    let b = start(&tmp.path().join("b")).await;
    let mut ev = b.subscribe();
    wait_event(&mut ev, |e| {
        matches!(e, NodeEvent::Connection { up: true, .. })
    })
    .await;
    let t = Instant::now();
    let mut got = 0;
    while got < n / 1000 * 1000 {
        match tokio::time::timeout(Duration::from_secs(60), ev.recv()).await {
            Ok(Ok(NodeEvent::Received { .. })) => got += 1,
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(k))) => got += k as usize,
            other => panic!("{other:?}"),
        }
    }
    let rate = got as f64 / t.elapsed().as_secs_f64();
    a.shutdown().await;
    b.shutdown().await;
    rate
}

async fn throughput(n: usize) {
    println!(
        "## Messages per second on one stream, 1 KB payloads, {n} messages, 3 runs each (median)"
    );
    let mut raw = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..3 {
        raw.push(raw_rustls(n).await);
        ours.push(coterie_stream(n).await);
    }
    let (r, _, _) = stats(raw);
    let (o, _, _) = stats(ours);
    println!("| path | messages/s |\n| --- | --- |");
    println!("| raw rustls over TCP (1 KB writes, no framing, no storage) | {r:.0} |");
    println!("| Coterie stream (XML, padding, XEP-0198, receiver fsync per batch) | {o:.0} |");
    println!("ratio Coterie/raw: {:.3} (goal ≥ 0.30)\n", o / r);
}

fn store_open_child(dir: &Path) {
    let t = Instant::now();
    let (s, timings) = Store::open_timed(dir, PASS).expect("open");
    let open = t.elapsed();
    let contact = s.contacts().expect("contacts")[0].id;
    let t = Instant::now();
    let page = s.history(contact, 50).expect("page");
    let first_page = t.elapsed();
    assert_eq!(page.len(), 50);
    let mut pages = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let _ = s.history(contact, 50).expect("page");
        pages.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (pm, _, _) = stats(pages);
    println!(
        "{{\"db_ms\":{:.3},\"kdf_ms\":{:.3},\"open_ms\":{:.3},\"first_page_ms\":{:.3},\"page_median_ms\":{pm:.4}}}",
        timings.db.as_secs_f64() * 1000.0,
        timings.kdf.as_secs_f64() * 1000.0,
        open.as_secs_f64() * 1000.0,
        first_page.as_secs_f64() * 1000.0
    );
}

fn store(n: usize) {
    println!("## Store with {n} messages");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("p");
    create(&dir, "alice");
    {
        let s = Store::open(&dir, PASS).expect("open");
        let c = node::store::Contact {
            id: 0,
            name: "bob".into(),
            peer: *transport::SecretKey::generate().peer_id().as_bytes(),
            addrs: vec![],
            state: node::store::ContactState::Active,
            added: 0,
            last_seen: None,
            last_carrier: None,
        };
        let id = s.add_contact(c).expect("contact");
        let t = Instant::now();
        let mut seq = 1;
        while seq <= n as u64 {
            let batch: Vec<Message> = (0..10_000.min(n as u64 - seq + 1))
                .map(|i| Message {
                    seq: seq + i,
                    dir: if i % 2 == 0 {
                        Direction::In
                    } else {
                        Direction::Out
                    },
                    body: format!(
                        "message {} with some ordinary chat text in it, about eighty bytes long.",
                        seq + i
                    ),
                    ts: 1_700_000_000_000 + (seq + i) * 1000,
                    state: if i % 2 == 0 {
                        Delivery::Received
                    } else {
                        Delivery::Delivered
                    },
                    stanza_id: format!("m{}.00000000", seq + i),
                    unverified: false,
                    undecryptable: None,
                })
                .collect();
            s.bulk_insert_messages(id, &batch).expect("insert");
            seq += batch.len() as u64;
        }
        let size = std::fs::metadata(dir.join(node::store::STORE_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        println!(
            "filled in {:.1} s; file {:.0} MiB",
            t.elapsed().as_secs_f64(),
            size as f64 / (1 << 20) as f64
        );
    }
    let exe = std::env::current_exe().expect("exe");
    let mut runs = Vec::new();
    for _ in 0..5 {
        let out = std::process::Command::new(&exe)
            .args(["store-open", &dir.display().to_string()])
            .output()
            .expect("child");
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{e}: {line} {}", String::from_utf8_lossy(&out.stderr)));
        runs.push(v);
    }
    let med = |k: &str| {
        stats(
            runs.iter()
                .map(|v| v[k].as_f64().unwrap_or(f64::NAN))
                .collect(),
        )
        .0
    };
    println!("fresh process each time, page cache warm, median of 5:");
    println!("| figure | ms | goal |\n| --- | --- | --- |");
    println!(
        "| open the database (file, header, tables) | {:.3} | ≤ 100 |",
        med("db_ms")
    );
    println!(
        "| Argon2id key derivation (64 MiB, t=3) | {:.1} | (deliberately slow) |",
        med("kdf_ms")
    );
    println!(
        "| first page of the latest 50 after open | {:.3} | ≤ 2 |",
        med("first_page_ms")
    );
    println!(
        "| latest page of 50, steady state (median of 100) | {:.4} | ≤ 2 |\n",
        med("page_median_ms")
    );
}

/// Encrypt and decrypt cost of one 1 KB message, per OMEMO version: one
/// way (a symmetric ratchet step per message) and ping-pong (a
/// Diffie-Hellman ratchet step per message), including the `<encrypted/>`
/// XML both ways.
fn omemo(n: usize) {
    use node::omemo::device::{Recipient, RemoteDevice, SessionSlot, encrypt};
    use node::omemo::xml::EncryptedElement;
    use node::omemo::{Identity, OwnDevice, Session, Version, sce};
    println!("## OMEMO per 1 KB message, {n} messages per figure");
    println!("| version | pattern | encrypt µs | decrypt µs |\n| --- | --- | --- | --- |");
    let body = body_1k();
    let mut rng = rand::rngs::OsRng;
    for v in Version::ALL {
        for ping_pong in [false, true] {
            let ids = [Identity::from_seed(&[1; 32]), Identity::from_seed(&[2; 32])];
            let mut devs = [OwnDevice::new(0, &mut rng), OwnDevice::new(0, &mut rng)];
            let jids = ["a@bench", "b@bench"];
            let mut slots = [SessionSlot::default(), SessionSlot::default()];
            let b = devs[1].bundle(&ids[1], v);
            slots[0].install(Session::initiate(&ids[0], &b, &mut rng).expect("initiate"));
            let (mut enc_t, mut dec_t) = (0.0f64, 0.0f64);
            for i in 0..n + 1 {
                let (from, to) = if ping_pong && i % 2 == 1 {
                    (1, 0)
                } else {
                    (0, 1)
                };
                let t = Instant::now();
                let pt = match v {
                    Version::V03 => body.as_bytes().to_vec(),
                    Version::V2 => sce::seal(&body, jids[from], &mut rng),
                };
                let to_dev = devs[to].device_id;
                let session = slots[from].current.as_mut().expect("session");
                let mut r = [Recipient {
                    jid: jids[to],
                    device_id: to_dev,
                    session,
                }];
                let el = encrypt(
                    v,
                    &ids[from],
                    devs[from].device_id,
                    &mut r,
                    Some(&pt),
                    &mut rng,
                );
                let xml = String::from(&el.to_element());
                let t1 = Instant::now();
                let parsed: minidom::Element = xml.parse().expect("xml");
                let parsed = EncryptedElement::parse(&parsed, 1 << 16).expect("parse");
                let [da, db] = &mut devs;
                let d = if to == 0 { da } else { db };
                let out = d
                    .decrypt(
                        &ids[to],
                        jids[to],
                        RemoteDevice { identity: None },
                        &mut slots[to],
                        &parsed,
                        0,
                        &mut rng,
                    )
                    .expect("decrypt");
                if v == Version::V2 {
                    sce::open(&out.plaintext.expect("payload"), jids[from]).expect("envelope");
                }
                let t2 = Instant::now();
                // The first message (X3DH) is not counted.
                if i > 0 {
                    enc_t += (t1 - t).as_secs_f64();
                    dec_t += (t2 - t1).as_secs_f64();
                }
            }
            let pattern = if ping_pong {
                "ping-pong (DH step)"
            } else {
                "one way"
            };
            println!(
                "| {v} | {pattern} | {:.1} | {:.1} |",
                enc_t * 1e6 / n as f64,
                dec_t * 1e6 / n as f64
            );
        }
    }
    println!();
}

/// LAN discovery: two contacts whose stored addresses are all stale start
/// at the same moment on a namespaced LAN; time until both see the session.
/// Needs root (network namespaces).
fn lan(runs: usize) {
    use coterie_tests::netns::Lan;
    use coterie_tests::{NodeProc, free_port, introduce};
    println!("## LAN discovery: both nodes started → contacts connected, {runs} runs");
    let net = Lan::new(2);
    let tmp = tempfile::tempdir().expect("tmp");
    let mut a = NodeProc::init(tmp.path(), "alice_bench");
    let mut b = NodeProc::init(tmp.path(), "bob_bench");
    a.netns = Some(net.hosts[0].clone());
    b.netns = Some(net.hosts[1].clone());
    let args = ["--lan", "--lan-period", "600"];
    a.start_with(&args);
    b.start_with(&args);
    introduce(&a, &b);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        a.stop();
        b.stop();
        a.port = free_port();
        b.port = free_port();
        let t = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| a.start_with(&args));
            s.spawn(|| b.start_with(&args));
        });
        loop {
            if a.connected_to("bob_bench") && b.connected_to("alice_bench") {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no connection within 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    a.stop();
    b.stop();
    let (med, p90, _) = stats(times.clone());
    let mut sorted = times;
    sorted.sort_by(|x, y| x.total_cmp(y));
    let p95 = sorted[((sorted.len() as f64 * 0.95).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1)];
    println!("| median ms | p90 ms | p95 ms | goal |\n| --- | --- | --- | --- |");
    println!("| {med:.0} | {p90:.0} | {p95:.0} | median ≤ 1000 |\n");
}

/// Unix seconds of a log line's RFC 3339 UTC timestamp
/// (`2026-12-03T06:18:41.615527Z …`).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, mi, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + sec)
}

/// The time of the first line of `log` after byte `from` that contains
/// every one of `needles`.
fn logged_at(log: &str, from: usize, needles: &[&str]) -> Option<f64> {
    log.get(from..)?
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .and_then(log_time)
}

/// A group of `members` on a namespaced LAN, joined through one link (a
/// meeting room: everyone a contact of the organiser only): time until
/// every member has shown a post, against one 1:1 hop between two of them
/// in the same run. Both from the nodes' own log timestamps (debug lines
/// "group post shown", "message stored"), so neither includes polling.
/// With `mesh`, every member is also every other's contact (an affinity
/// group whose members all know each other): posts go to everyone directly.
fn group_lan(runs: usize, members: usize, mesh: bool) {
    use coterie_tests::netns::Lan;
    use coterie_tests::{NodeProc, wait_for};
    use serde_json::json;
    const G: &str = "bench-room";
    let shape = if mesh {
        "everyone a contact of everyone"
    } else {
        "one link, star of contacts"
    };
    println!(
        "## Group of {members} on a namespaced LAN ({shape}) vs a 1:1 hop, {runs} runs each, interleaved"
    );
    let lan = Lan::new(members);
    let mut tmp = tempfile::tempdir().expect("tmp");
    // COTERIE_BENCH_KEEP=1 keeps the profiles and logs for a look after.
    if std::env::var_os("COTERIE_BENCH_KEEP").is_some() {
        // Kept even when the run panics: the logs are what to look at.
        tmp.disable_cleanup(true);
        eprintln!("keeping {}", tmp.path().display());
    }
    let tmp_path = tmp.path().to_path_buf();
    let mut nodes: Vec<NodeProc> = (0..members)
        .map(|i| {
            let mut p = NodeProc::init(&tmp_path, &format!("member-{i:02}"));
            p.netns = Some(lan.hosts[i].clone());
            p.env.push((
                "COTERIE_LOG".into(),
                "info,coterie_node::runtime=debug".into(),
            ));
            p
        })
        .collect();
    for n in nodes.iter_mut() {
        n.start_with(&["--lan", "--lan-period", "600"]);
    }
    let mut ctl: Vec<coterie_tests::Control> = nodes
        .iter()
        .map(|n| n.control_conn().expect("control"))
        .collect();
    ctl[0]
        .call(&json!({"cmd": "groupcreate", "name": G}))
        .expect("create");
    let uri = ctl[0]
        .call(&json!({"cmd": "grouplink", "group": G, "ttl": "1h", "uses": members}))
        .expect("link");
    let uri = uri.as_str().expect("uri").to_string();
    for c in ctl.iter_mut().skip(1) {
        c.call(&json!({"cmd": "add", "uri": uri})).expect("join");
    }
    for (i, c) in ctl.iter_mut().enumerate() {
        wait_for(
            &format!("member {i} sees everyone"),
            Duration::from_secs(180),
            || {
                let m = c.call(&json!({"cmd": "groupmembers", "group": G})).ok()?;
                (m.as_array().map_or(0, Vec::len) == members).then_some(())
            },
        );
    }
    if mesh {
        for i in 1..members {
            for j in i + 1..members {
                let uri = ctl[i]
                    .call(&json!({"cmd": "invite", "ttl": "1h"}))
                    .expect("invite");
                ctl[j]
                    .call(&json!({"cmd": "add", "uri": uri, "name": nodes[i].name}))
                    .expect("add");
            }
        }
        for (i, c) in ctl.iter_mut().enumerate() {
            wait_for(
                &format!("member {i} connected to everyone"),
                Duration::from_secs(180),
                || {
                    let v = c.call(&json!({"cmd": "contacts"})).ok()?;
                    let up = v
                        .as_array()?
                        .iter()
                        .filter(|c| c["state"] == "connected")
                        .count();
                    (up == members - 1).then_some(())
                },
            );
        }
    }
    // Warm-up: everyone writes once (sessions, OMEMO, relays learned).
    for (i, c) in ctl.iter_mut().enumerate() {
        c.call(&json!({"cmd": "groupsend", "group": G, "text": format!("warm-up {i}")}))
            .expect("send");
    }
    std::thread::sleep(Duration::from_secs(5));
    let keys: Vec<String> = nodes.iter().map(|n| n.key().short()).collect();
    let contact0 = nodes[0].name.clone();
    let mut seqs = vec![1u64; members];
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default()
    };
    let (mut group_ms, mut hop_ms) = (Vec::new(), Vec::new());
    let settle = Duration::from_millis(2500);
    let mut fan_ms: Vec<f64> = Vec::new();
    for r in 0..runs {
        // The group: member 1 + r % (members − 1) writes.
        let from = 1 + r % (members - 1);
        seqs[from] += 1;
        let marks: Vec<usize> = nodes.iter().map(|n| n.log_text().len()).collect();
        let t = now();
        ctl[from]
            .call(&json!({"cmd": "groupsend", "group": G, "text": format!("group run {r}")}))
            .expect("send");
        let author = format!("author={}", keys[from]);
        let seq = format!("seq={}", seqs[from]);
        let mut last = 0.0f64;
        for (i, n) in nodes.iter().enumerate() {
            if i == from {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            let at = loop {
                if let Some(at) = logged_at(
                    &n.log_text(),
                    marks[i],
                    &["group post shown", &author, &seq],
                ) {
                    break at;
                }
                if Instant::now() > deadline {
                    let log = n.log_text();
                    let tail: Vec<&str> = log.lines().filter(|l| l.contains("group")).collect();
                    panic!(
                        "member {i} did not show run {r} ({author} {seq}) in 60 s; its group log lines: {:?}",
                        &tail[tail.len().saturating_sub(10)..]
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            if at - t > 1.0 {
                eprintln!(
                    "run {r}: member {i} showed it after {:.0} ms",
                    (at - t) * 1000.0
                );
            }
            last = last.max(at);
        }
        group_ms.push((last - t) * 1000.0);
        // Each measurement starts from a quiet network: what a post sets
        // off afterwards (summaries to members not known to hold it, at
        // most one per peer a second) must not land in the hop's time.
        std::thread::sleep(settle);
        // One hop: member 1 writes to the organiser.
        let mark = nodes[0].log_text().len();
        let t = now();
        ctl[1]
            .call(&json!({"cmd": "send", "contact": contact0, "text": format!("hop run {r}")}))
            .expect("send");
        let at = wait_for(
            "the organiser stores the message",
            Duration::from_secs(60),
            || logged_at(&nodes[0].log_text(), mark, &["message stored"]),
        );
        hop_ms.push((at - t) * 1000.0);
        std::thread::sleep(settle);
        if mesh {
            // What this machine allows: the same author sends a 1:1
            // message to each of the others, one after another, and the
            // time runs until the last has stored it (19 receivers at once
            // on 2 cores, no group protocol).
            let marks: Vec<usize> = nodes.iter().map(|n| n.log_text().len()).collect();
            let t = now();
            for (i, n) in nodes.iter().enumerate() {
                if i != from {
                    ctl[from]
                        .call(&json!({"cmd": "send", "contact": n.name, "text": format!("fan run {r}")}))
                        .expect("send");
                }
            }
            let mut last = 0.0f64;
            for (i, n) in nodes.iter().enumerate() {
                if i == from {
                    continue;
                }
                let at = wait_for(
                    &format!("member {i} stores the 1:1 message"),
                    Duration::from_secs(60),
                    || logged_at(&n.log_text(), marks[i], &["message stored"]),
                );
                last = last.max(at);
            }
            fan_ms.push((last - t) * 1000.0);
            std::thread::sleep(settle);
        }
    }
    drop(ctl);
    for n in nodes.iter_mut() {
        n.stop();
    }
    let pct = |v: &[f64], p: f64| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        s[((s.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(s.len() - 1)]
    };
    println!("| path | median ms | p90 ms | p99 ms |\n| --- | --- | --- | --- |");
    for (name, v) in [
        ("1:1 hop (stored)", &hop_ms),
        ("group: every member has shown it", &group_ms),
        (
            "1:1 to each of the others, until the last stored it",
            &fan_ms,
        ),
    ] {
        if v.is_empty() {
            continue;
        }
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99)
        );
    }
    println!(
        "\np99 ratio group / 1:1 hop: {:.2} (goal ≤ 2)\n",
        pct(&group_ms, 0.99) / pct(&hop_ms, 0.99)
    );
}

/// Nodes whose only path is their onion services (the advertised address
/// is a closed port).
async fn start_tor(dir: &Path, arti: &Path) -> Node {
    let cfg = NodeConfig {
        listen: vec!["127.0.0.1:0".parse().expect("addr")],
        advertise: vec!["tcp:127.0.0.1:9".parse().expect("addr")],
        tor: Some(transport::onion::TorSettings {
            state_dir: dir.join("tor/state"),
            cache_dir: dir.join("tor/cache"),
            config_file: Some(arti.to_path_buf()),
        }),
        ..Default::default()
    };
    Node::start(open_retry(dir).await, cfg)
        .await
        .expect("start")
}

/// A plain onion service that echoes, on arti alone: the baseline.
/// Round trips of 1 KB and of 4 KB (the padding bucket a 1 KB message
/// fills once OMEMO-encrypted), in ms.
async fn raw_onion_echo(arti: &Path, work: &Path, n: usize) -> (Vec<f64>, Vec<f64>) {
    use futures::StreamExt as _;
    let settings = |name: &str| transport::onion::TorSettings {
        state_dir: work.join(name).join("state"),
        cache_dir: work.join(name).join("cache"),
        config_file: Some(arti.to_path_buf()),
    };
    let service_cfg = transport::onion::load_config(&settings("svc")).expect("config");
    let svc = arti_client::TorClient::create_bootstrapped(service_cfg)
        .await
        .expect("service bootstrap");
    let mut oc = tor_hsservice::config::OnionServiceConfigBuilder::default();
    oc.nickname("echo".parse().expect("nickname"));
    let (running, requests) = svc
        .launch_onion_service(oc.build().expect("service config"))
        .expect("launch")
        .expect("enabled");
    let hsid = running.onion_address().expect("onion address");
    tokio::spawn(async move {
        let mut streams = std::pin::pin!(tor_hsservice::handle_rend_requests(requests));
        while let Some(req) = streams.next().await {
            tokio::spawn(async move {
                let Ok(mut s) = req
                    .accept(tor_cell::relaycell::msg::Connected::new_empty())
                    .await
                else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => {
                            if s.write_all(&buf[..k]).await.is_err() || s.flush().await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let client_cfg = transport::onion::load_config(&settings("cli")).expect("config");
    let cli = arti_client::TorClient::create_bootstrapped(client_cfg)
        .await
        .expect("client bootstrap");
    let target = transport::PeerId::from_bytes(*hsid.as_ref())
        .expect("an onion key")
        .onion_address();
    let mut stream = None;
    for _ in 0..60 {
        match cli.connect((target.as_str(), 80)).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    let mut s = stream.expect("raw onion stream within 60 s");
    // Interleaved, so both sizes see the same network weather.
    let (mut small, mut bucket) = (Vec::new(), Vec::new());
    for i in 0..n + 20 {
        for (size, out) in [(1024, &mut small), (4096, &mut bucket)] {
            let payload = vec![b'x'; size];
            let mut back = vec![0u8; size];
            let t = Instant::now();
            s.write_all(&payload).await.expect("write");
            s.flush().await.expect("flush");
            s.read_exact(&mut back).await.expect("read");
            if i >= 20 {
                out.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    drop(running);
    (small, bucket)
}

/// Inside the Tor network's namespace: the round trips and the start times.
async fn tor_inner(arti: &Path, n: usize, runs: usize) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (raw, raw4k) = raw_onion_echo(arti, &tmp.path().join("raw"), n).await;

    let root = tmp.path();
    create(&root.join("a"), "alice");
    create(&root.join("b"), "bob");
    // The same pair at each padding level (the profile setting; the
    // default, `standard`, first).
    let mut coterie = Vec::new();
    let mut first = true;
    for level in [Padding::Standard, Padding::Light, Padding::Strong] {
        for d in [root.join("a"), root.join("b")] {
            let store = open_retry(&d).await;
            let mut p = store.profile().expect("profile");
            p.settings.padding = level;
            store.set_profile(&p).expect("settings");
        }
        let a = start_tor(&root.join("a"), arti).await;
        let b = start_tor(&root.join("b"), arti).await;
        let (a, b) = if first { introduce(a, b).await } else { (a, b) };
        first = false;
        let mut ev = a.subscribe();
        let mut carrier = None;
        for _ in 0..600 {
            carrier = a.status().peers.first().map(|p| p.transport.clone());
            if carrier.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            carrier.as_deref(),
            Some("onion"),
            "the pair must talk over Tor"
        );
        coterie.push((level, round_trips(&a, &mut ev, n).await));
        a.shutdown().await;
        b.shutdown().await;
    }

    let mut starts = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let (da, db) = (root.join("a"), root.join("b"));
        let (a, b) = tokio::join!(start_tor(&da, arti), start_tor(&db, arti));
        let mut ev = a.subscribe();
        if a.status().peers.is_empty() {
            wait_event(&mut ev, |e| {
                matches!(e, NodeEvent::Connection { up: true, .. })
            })
            .await;
        }
        starts.push(t.elapsed().as_secs_f64() * 1000.0);
        a.shutdown().await;
        b.shutdown().await;
    }

    let (rm, r9, r99) = stats(raw);
    let (qm, q9, q99) = stats(raw4k);
    println!(
        "| path | median ms | p90 ms | p99 ms | median / raw 1 KB |\n| --- | --- | --- | --- | --- |"
    );
    println!("| raw arti onion stream, 1 KB echo | {rm:.2} | {r9:.2} | {r99:.2} | 1.00 |");
    println!(
        "| raw arti onion stream, 4 KB echo (a 1 KB message's padded size) | {qm:.2} | {q9:.2} | {q99:.2} | {:.2} |",
        qm / rm
    );
    for (level, times) in coterie {
        let (cm, c9, c99) = stats(times);
        println!(
            "| Coterie 1 KB message over the onion, padding `{}` (OMEMO, stored, acked, receipt back) | {cm:.2} | {c9:.2} | {c99:.2} | {:.2} |",
            level.name(),
            cm / rm
        );
    }
    println!("goal: Coterie (default padding) / raw 1 KB ≤ 1.3\n");
    let (sm, s9, _) = stats(starts.clone());
    let max = starts.iter().copied().fold(0.0, f64::max);
    println!(
        "### both nodes started → contact connected over Tor, {runs} runs (warm arti state)\n"
    );
    println!("| median ms | p90 ms | max ms |\n| --- | --- | --- |");
    println!("| {sm:.0} | {s9:.0} | {max:.0} |\n");
}

/// The private Tor network, the inner measurements in its namespace, then
/// a node process's idle memory with arti and its onion service up.
fn tor(n: usize, runs: usize) {
    use coterie_tests::netns::Host;
    use coterie_tests::tornet::TorNet;
    use coterie_tests::{NodeProc, wait_for};
    println!(
        "## Over Tor: the private network (tests/src/tornet.rs), {n} round trips after 20 warm-up"
    );
    let net = TorNet::start();
    let me = std::env::current_exe().expect("exe");
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", net.ns()])
        .arg(&me)
        .arg("tor-inner")
        .arg(net.arti_config())
        .args(["--n", &n.to_string(), "--runs", &runs.to_string()])
        .status()
        .expect("run the inner benchmark");
    assert!(status.success(), "inner Tor benchmark failed");

    let tmp = tempfile::tempdir().expect("tmp");
    let host = Host {
        ns: net.ns().to_string(),
        ip: std::net::Ipv4Addr::LOCALHOST,
        ip6: std::net::Ipv6Addr::UNSPECIFIED,
        v6_only: false,
    };
    let mut a = NodeProc::init(tmp.path(), "alice_rss");
    let mut b = NodeProc::init(tmp.path(), "bob_rss");
    a.netns = Some(host.clone());
    b.netns = Some(host);
    let cfg = net.arti_config().to_str().expect("utf-8").to_string();
    let args = [
        "--tor-config",
        cfg.as_str(),
        "--advertise",
        "tcp:127.0.0.1:9",
    ];
    a.start_with(&args);
    b.start_with(&args);
    let uri = a.invite();
    b.add(&uri, "alice_rss");
    wait_for("a contact over Tor", Duration::from_secs(180), || {
        (a.connected_to("bob_rss") && b.connected_to("alice_rss")).then_some(())
    });
    std::thread::sleep(Duration::from_secs(30));
    let rss = a.rss_kib().expect("rss") as f64 / 1024.0;
    let service = a.status()["tor"]["onion_service"].clone();
    println!(
        "### idle node process: arti bootstrapped, onion service up ({service}), one contact connected, 30 s idle\n"
    );
    println!("| RSS MiB | goal |\n| --- | --- |\n| {rss:.1} | ≤ 40 |\n");
    a.stop();
    b.stop();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).map(String::as_str).unwrap_or("all");
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    if what == "tor-inner" {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let arti = Path::new(args.get(2).expect("arti config"));
        rt.block_on(tor_inner(arti, flag("--n", 200), flag("--runs", 5)));
        return;
    }
    if what == "store-open" {
        store_open_child(Path::new(args.get(2).expect("dir")));
        return;
    }
    if let Ok(f) = tracing_subscriber::EnvFilter::try_from_env("COTERIE_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(f)
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "# coterie-bench {} on {} cores",
        chrono_free_date(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if matches!(what, "all" | "rtt") {
        rt.block_on(rtt(flag("--n", 200)));
    }
    if matches!(what, "all" | "throughput") {
        rt.block_on(throughput(flag("--messages", 20_000)));
    }
    if what == "lan" {
        lan(flag("--runs", 20));
        return;
    }
    if what == "tor" {
        tor(flag("--n", 200), flag("--runs", 5));
        return;
    }
    if what == "group-lan" {
        let mesh = args.iter().any(|a| a == "--mesh");
        group_lan(flag("--runs", 30), flag("--members", 20), mesh);
        return;
    }
    if what == "bridge" {
        bridge(&rt, flag("--n", 100));
        return;
    }
    if what == "load" {
        let tmp = tempfile::tempdir().expect("tmp");
        let (peers, rate, secs) = (flag("--peers", 50), flag("--rate", 20), flag("--secs", 60));
        println!(
            "## Load: {peers} contacts × {rate} msg/s × {secs} s into one `coterie run` (127.0.0.1)"
        );
        let f = coterie_tests::load::run(tmp.path(), peers, rate as u32, secs as u64);
        println!("{f}");
        return;
    }
    if matches!(what, "all" | "omemo") {
        omemo(flag("--omemo-messages", 10_000));
    }
    if matches!(what, "all" | "store") {
        store(flag("--store-messages", 1_000_000));
    }
}

/// Round trips through an ordinary XMPP server: Coterie's bridge → an
/// echoing slixmpp-omemo friend → back, against the same between two
/// Python clients. Both OMEMO 2, 100-byte messages, Prosody with TLS on
/// 127.0.0.1, the bridge connected directly (no Tor).
fn bridge(rt: &tokio::runtime::Runtime, n: usize) {
    use coterie_tests::prosody::{Server, ServerOpts};
    use coterie_tests::xmpp_client::{Friend, FriendOpts, Omemo};
    const WARM: usize = 10;
    const SIZE: usize = 100;
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(
        &tmp.path().join("prosody"),
        &ServerOpts::new(
            "example.test",
            &[("me", "pw"), ("echo", "pw"), ("py", "pw")],
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let friend = |name: &str, echo: bool| {
        Friend::start(&FriendOpts {
            jid: format!("{name}@example.test"),
            password: "pw".into(),
            server: server.addr(),
            ca_file: server.ca_file(),
            data: tmp.path().join(name),
            omemo: Omemo::Both,
            echo,
            netns: None,
        })
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let _echo = friend("echo", true);
    println!(
        "## {SIZE}-byte OMEMO 2 message round trip through Prosody (TLS, 127.0.0.1) to an echoing slixmpp-omemo client, {n} runs after {WARM} warm-up"
    );
    let mut py = friend("py", false);
    py.rtt("echo@example.test", WARM, SIZE)
        .unwrap_or_else(|e| panic!("{e}"));
    let python = py
        .rtt("echo@example.test", n, SIZE)
        .unwrap_or_else(|e| panic!("{e}"));
    py.quit();

    let ca = std::fs::read_to_string(server.ca_file()).expect("ca");
    let coterie = rt.block_on(async {
        let dir = tmp.path().join("me");
        create(&dir, "me");
        let node = start(&dir).await;
        let acct = node::bridge::BridgeAccount::new(
            "me@example.test",
            "pw".into(),
            Some(&server.addr()),
            Some(ca),
            true,
        )
        .expect("account");
        node.bridge_set(acct).await.expect("bridge");
        node.add("xmpp:echo@example.test", None).await.expect("add");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(node.status().bridge.state == node::bridge::BridgeState::Online
            && node.status().bridge.published)
        {
            assert!(Instant::now() < deadline, "bridge not online");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut ev = node.subscribe();
        let mut out = Vec::with_capacity(n);
        for i in 0..WARM + n {
            let body = format!("rtt {i} ");
            let body = format!("{body:x<SIZE$}");
            let t = Instant::now();
            node.send("echo", &body).await.expect("send");
            wait_event(&mut ev, |e| matches!(e, NodeEvent::Received { .. })).await;
            if i >= WARM {
                out.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        node.shutdown().await;
        out
    });
    let (pm, p9, p99) = stats(python);
    let (cm, c9, c99) = stats(coterie);
    println!("| path | median ms | p90 ms | p99 ms |");
    println!("| --- | --- | --- | --- |");
    println!("| Coterie bridge → friend → Coterie | {cm:.3} | {c9:.3} | {c99:.3} |");
    println!("| Python client → friend → Python client | {pm:.3} | {p9:.3} | {p99:.3} |");
    println!("ratio Coterie / Python (median): {:.2}", cm / pm);
}

fn chrono_free_date() -> String {
    let out = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
