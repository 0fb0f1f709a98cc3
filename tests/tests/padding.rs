//! Every TLS record a session puts on the wire carries one padded unit: its
//! plaintext is one of the size buckets (or a full 16 KiB record). A relay
//! between two real nodes records the record sizes in both directions.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use coterie_tests::{NodeProc, texts, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// TLS 1.3 adds the inner content type (1 byte) and the AEAD tag (16 bytes).
const OVERHEAD: usize = 17;
const BUCKETS: [usize; 4] = [256, 1024, 4096, 16384];

type Records = Arc<Mutex<Vec<(u8, usize)>>>;

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    records: Records,
) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        pending.extend_from_slice(&buf[..n]);
        while pending.len() >= 5 {
            let len = u16::from_be_bytes([pending[3], pending[4]]) as usize;
            if pending.len() < 5 + len {
                break;
            }
            records.lock().expect("lock").push((pending[0], len));
            pending.drain(..5 + len);
        }
    }
}

async fn relay(listen: TcpListener, target: u16, a_to_b: Records, b_to_a: Records) {
    while let Ok((inbound, _)) = listen.accept().await {
        let Ok(out) = TcpStream::connect(("127.0.0.1", target)).await else {
            continue;
        };
        let (ir, iw) = inbound.into_split();
        let (or, ow) = out.into_split();
        tokio::spawn(pipe(ir, ow, a_to_b.clone()));
        tokio::spawn(pipe(or, iw, b_to_a.clone()));
    }
}

fn allowed(len: usize) -> bool {
    len >= OVERHEAD && BUCKETS.contains(&(len - OVERHEAD))
}

fn check(direction: &str, records: &[(u8, usize)]) {
    let app: Vec<usize> = records
        .iter()
        .filter(|(t, _)| *t == 23)
        .map(|(_, l)| *l)
        .collect();
    // The encrypted handshake flight (certificate, verify, finished) comes
    // first; after it, only padded units may appear.
    let first_padded = app.iter().position(|l| allowed(*l)).unwrap_or(app.len());
    assert!(
        first_padded <= 1,
        "{direction}: {first_padded} unpadded records before the first padded one: {app:?}"
    );
    let rest = &app[first_padded..];
    assert!(
        rest.len() >= 10,
        "{direction}: only {} records seen",
        rest.len()
    );
    let bad: Vec<usize> = rest.iter().copied().filter(|l| !allowed(*l)).collect();
    assert!(
        bad.is_empty(),
        "{direction}: records outside the buckets: {bad:?} (all: {rest:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_bucket_sized_records_on_the_wire() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut alice = NodeProc::init(tmp.path(), "alice");
    let mut bob = NodeProc::init(tmp.path(), "bob");
    let relay_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let relay_port = relay_listener.local_addr().expect("addr").port();
    let (ab, ba): (Records, Records) = Default::default();
    tokio::spawn(relay(relay_listener, alice.port, ab.clone(), ba.clone()));
    // Alice is reached only through the relay; Bob advertises a dead port so
    // that Alice never dials him around it.
    alice.start_with(&["--advertise", &format!("tcp:127.0.0.1:{relay_port}")]);
    bob.start_with(&["--advertise", "tcp:127.0.0.1:9"]);
    coterie_tests::introduce(&alice, &bob);

    let sizes = [1usize, 60, 200, 700, 1500, 3000, 5000, 9000, 15000];
    for (i, n) in sizes.iter().enumerate() {
        let body: String = "x".repeat(*n);
        alice.send("bob", &format!("{i}:{body}"));
        bob.send("alice", &format!("{i}:{body}"));
    }
    wait_for("all delivered", Duration::from_secs(30), || {
        let done = |n: &NodeProc, c: &str| {
            texts(n, c)
                .iter()
                .filter(|(d, _, s)| d == "out" && s == "delivered")
                .count()
                == sizes.len()
        };
        (done(&alice, "bob") && done(&bob, "alice")).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let ab = ab.lock().expect("lock").clone();
    let ba = ba.lock().expect("lock").clone();
    check("bob→alice", &ab);
    check("alice→bob", &ba);
}
