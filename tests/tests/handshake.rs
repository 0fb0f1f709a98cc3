//! Who may talk to a node: a dialer without a contact's (or an open
//! invite's) gate ticket is refused in its ClientHello, before the node's
//! certificate is sent, on TCP and on QUIC, and not one byte from it
//! reaches the XML parser. Someone who holds an open invite gets through
//! TLS but no further than the fixed-size preface unless it proves the
//! invite secret.

use std::time::Duration;

use coterie_tests::raw::RawPeer;
use coterie_tests::{NodeProc, running_pair, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::{GateKey, PeerAddr};

fn stat(n: &NodeProc, k: &str) -> u64 {
    n.status()["stats"][k].as_u64().expect("stat")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_refused_in_the_handshake_on_tcp_and_quic() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = running_pair(tmp.path());
    let key = a.key();
    // The pair's own traffic (OMEMO announcements after the session opens)
    // must be over before counting: wait until bob's device is known and
    // the counter stands still for half a second.
    wait_for(
        "bob's OMEMO device announced",
        Duration::from_secs(10),
        || {
            let fp = a.cli(&["fingerprints", "bob"]);
            fp.json
                .first()
                .and_then(|v| v["devices"].as_array().map(|d| !d.is_empty()))
                .unwrap_or(false)
                .then_some(())
        },
    );
    let mut xml_before = stat(&a, "xml_bytes_in");
    wait_for(
        "the pair's traffic to settle",
        Duration::from_secs(10),
        || {
            std::thread::sleep(Duration::from_millis(500));
            let now = stat(&a, "xml_bytes_in");
            let settled = now == xml_before;
            xml_before = now;
            settled.then_some(())
        },
    );
    let refused_before = stat(&a, "gate_refused");
    let stranger = RawPeer::new();
    for addr in [
        PeerAddr::Tcp(([127, 0, 0, 1], a.port).into()),
        PeerAddr::Quic(([127, 0, 0, 1], a.port).into()),
    ] {
        // The gate answers the ClientHello with an alert: the dial fails
        // before the node's certificate (its identity) is ever sent.
        match stranger.dial(&addr, key).await {
            Err(e) => assert!(
                e.to_string().contains("handshake") || e.to_string().contains("TLS"),
                "{addr}: {e}"
            ),
            Ok(_) => panic!("{addr}: a stranger completed a TLS handshake"),
        }
    }
    // Both attempts were refused by the gate, and nothing reached the parser.
    wait_for("two refusals counted", Duration::from_secs(5), || {
        (stat(&a, "gate_refused") >= refused_before + 2).then_some(())
    });
    assert_eq!(
        stat(&a, "xml_bytes_in"),
        xml_before,
        "bytes from an unknown key reached the XML parser"
    );
    // The contact is unaffected.
    b.send("alice", "still here");
    wait_for("delivery", Duration::from_secs(10), || {
        coterie_tests::texts(&a, "bob")
            .iter()
            .any(|(_, t, _)| t == "still here")
            .then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_open_invite_a_stranger_stops_at_the_preface() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut a = NodeProc::init(tmp.path(), "alice");
    a.start();
    let key = a.key();
    let uri = a.invite();
    let xml_before = stat(&a, "xml_bytes_in");
    let stranger = RawPeer::new();
    let addr = PeerAddr::Tcp(([127, 0, 0, 1], a.port).into());
    let inv = node::invite::Invite::parse(&uri, node::ops::now_secs()).expect("invite");
    let invite_gate = GateKey::for_invite(&inv.secret);

    // 0. Without the invite, an open invite does not open the gate.
    assert!(
        stranger.dial(&addr, key).await.is_err(),
        "the gate let a stranger without the invite through"
    );

    // 1. TLS passes with the invite's ticket, but a session preface from a
    //    non-contact is dropped.
    let mut c = stranger
        .dial_with(&addr, key, &invite_gate)
        .await
        .expect("TLS passes while an invite is open");
    let mut pre = b"CTR1\x01".to_vec();
    pre.resize(256, 0);
    c.io.write_all(&pre).await.expect("write");
    c.io.write_all(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>").await.expect("write");
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), c.io.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "connection should be closed: {r:?}"
    );

    // 2. A redemption with a wrong proof is refused.
    let mut c = stranger
        .dial_with(&addr, key, &invite_gate)
        .await
        .expect("dial");
    let mut pre = b"CTR1\x02".to_vec();
    pre.extend_from_slice(&inv.id);
    pre.extend_from_slice(&[7u8; 32]);
    pre.push(4);
    pre.extend_from_slice(b"evil");
    pre.resize(256, 0);
    c.io.write_all(&pre).await.expect("write");
    let mut ans = [0u8; 256];
    c.io.read_exact(&mut ans).await.expect("answer");
    assert_eq!(ans[0], 4, "bad proof is answered with status 4");

    // 3. A proof computed for another connection (replayed) is refused too.
    let (mut first, status) = stranger.redeem(&uri, a.port).await;
    assert_eq!(status, 0, "the real redemption works");
    drop(first.a.io.shutdown().await);

    assert_eq!(
        stat(&a, "xml_bytes_in"),
        xml_before,
        "a stranger's bytes reached the XML parser"
    );
    assert!(stat(&a, "prefaces_rejected") >= 2);

    // 4. The invite is single-use: once redeemed its ticket no longer opens
    //    the gate, for anyone.
    let other = RawPeer::new();
    let r = other.dial_with(&addr, key, &invite_gate).await;
    assert!(r.is_err(), "a used invite still opens the gate");
}
