//! Three real `coterie` processes on 127.0.0.1: invite → add → chat both
//! ways, queued delivery after a restart, and nothing readable on disk.

use std::time::Duration;

use coterie_tests::{NodeProc, assert_no_plaintext, delivered, introduce, texts, wait_for};

fn received_once(n: &NodeProc, contact: &str, body: &str) -> bool {
    texts(n, contact)
        .iter()
        .filter(|(d, b, _)| d == "in" && b == body)
        .count()
        == 1
}

#[test]
fn three_nodes_invite_add_and_chat_both_ways() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Names long enough that finding one in a store is not chance.
    let mut nodes: Vec<NodeProc> = ["alice-marigold", "bob-quillfeather", "carol-wrenfield"]
        .iter()
        .map(|n| NodeProc::init(tmp.path(), n))
        .collect();
    for n in nodes.iter_mut() {
        n.start();
    }
    introduce(&nodes[0], &nodes[1]);
    introduce(&nodes[0], &nodes[2]);
    introduce(&nodes[1], &nodes[2]);

    let pairs = [(0, 1), (0, 2), (1, 2)];
    for &(i, j) in &pairs {
        for (from, to) in [(i, j), (j, i)] {
            let body = format!(
                "secret note from {} to {}",
                nodes[from].name, nodes[to].name
            );
            let m = nodes[from].send(&nodes[to].name, &body);
            assert!(m["state"] == "queued" || m["state"] == "sent", "{m}");
        }
    }
    for &(i, j) in &pairs {
        for (from, to) in [(i, j), (j, i)] {
            let body = format!(
                "secret note from {} to {}",
                nodes[from].name, nodes[to].name
            );
            wait_for(
                &format!("{body} delivered"),
                Duration::from_secs(20),
                || delivered(&nodes[from], &nodes[to].name, &body).then_some(()),
            );
            assert!(
                received_once(&nodes[to], &nodes[from].name, &body),
                "{body} not received exactly once"
            );
        }
    }

    // Carol goes away; Alice writes; Carol comes back and gets it once.
    nodes[2].stop();
    let m = nodes[0].send("carol-wrenfield", "while you were out");
    assert_eq!(m["state"], "queued");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        texts(&nodes[0], "carol-wrenfield")
            .iter()
            .any(|(_, b, s)| b == "while you were out" && s == "queued")
    );
    nodes[2].start();
    wait_for(
        "queued message delivered after restart",
        Duration::from_secs(30),
        || delivered(&nodes[0], "carol-wrenfield", "while you were out").then_some(()),
    );
    assert!(received_once(
        &nodes[2],
        "alice-marigold",
        "while you were out"
    ));

    // The CLI works on the store directly when no node runs.
    for n in nodes.iter_mut() {
        n.stop();
    }
    let out = nodes[1].cli(&["history", "carol-wrenfield"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.json.iter().any(|m| m["body"]
        == "secret note from carol-wrenfield to bob-quillfeather"
        && m["dir"] == "in"));
    let out = nodes[1].cli(&["send", "carol-wrenfield", "offline send"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json[0]["state"], "queued");

    // Nothing a seized disk would reveal: bodies, names, addresses, keys.
    let mut needles: Vec<Vec<u8>> = vec![
        b"secret note".to_vec(),
        b"while you were out".to_vec(),
        b"offline send".to_vec(),
        b"127.0.0.1".to_vec(),
    ];
    for n in &nodes {
        needles.push(n.name.as_bytes().to_vec());
        let id = n.cli(&["id"]);
        let onion = id.json[0]["onion"].as_str().expect("onion").to_string();
        needles.push(onion.trim_end_matches(".onion").as_bytes().to_vec());
        let key = transport::PeerId::from_onion(&onion).expect("onion");
        needles.push(key.as_bytes().to_vec());
        needles.push(key.fingerprint_compact().as_bytes().to_vec());
    }
    let refs: Vec<&[u8]> = needles.iter().map(|v| v.as_slice()).collect();
    for n in &nodes {
        assert_no_plaintext(&n.dir, &refs);
    }
}

#[test]
fn cli_errors_are_clear_and_have_documented_codes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = NodeProc::init(tmp.path(), "alice");
    // Wrong passphrase: exit 4, and the store still opens with the right one.
    let out = std::process::Command::new(coterie_tests::coterie_bin())
        .args(["--profile"])
        .arg(&a.dir)
        .args(["contacts"])
        .env("COTERIE_PASSPHRASE", "not the passphrase")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    assert_eq!(a.cli(&["contacts"]).code, 0);
    // No profile: exit 3 with a hint.
    let out = a_copy(&a, tmp.path().join("nowhere")).cli(&["id"]);
    assert_eq!(out.code, 3);
    assert!(
        out.json[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("coterie init")
    );
    // Unknown contact: exit 5.
    assert_eq!(a.cli(&["send", "nobody", "hi"]).code, 5);
    // Not an invite: exit 6.
    let out = a.cli(&["add", "https://example.org/"]);
    assert_eq!(out.code, 6);
    // A forged invite (altered after signing): exit 6, says so.
    let b = NodeProc::init(tmp.path(), "bob");
    let inv = b.cli(&["invite", "--ttl", "1h"]).json[0]["invite"]
        .as_str()
        .expect("invite")
        .to_string();
    let forged = inv.replacen("exp=", "exp=9", 1);
    let out = a.cli(&["add", &forged]);
    assert_eq!(out.code, 6);
    assert!(
        out.json[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("altered or forged"),
        "{:?}",
        out.json
    );
    // A bad TTL: exit 2 with what to do.
    let out = b.cli(&["invite", "--ttl", "forever"]);
    assert_eq!(out.code, 2);
    // Own invite is refused.
    assert_eq!(b.cli(&["add", &inv]).code, 6);
    // Text XML cannot carry, or that escapes past the stanza limit, is refused up front.
    let a_invite = a.cli(&["invite", "--ttl", "1h"]).json[0]["invite"].clone();
    let c = b.cli(&["add", a_invite.as_str().expect("invite"), "--name", "alice"]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    let out = b.cli(&["send", "alice", &format!("bell {} rings", '\u{7}')]);
    assert_eq!(out.code, 2, "a control character is refused");
    let out = b.cli(&["send", "alice", &"&".repeat(15_000)]);
    assert_eq!(out.code, 2, "too much escaping is refused");
    // Retention: 30 days by default, configurable, bounded.
    assert_eq!(a.cli(&["retention"]).json[0]["retention_days"], 30);
    assert_eq!(a.cli(&["retention", "7"]).json[0]["retention_days"], 7);
    assert_eq!(a.cli(&["retention"]).json[0]["retention_days"], 7);
    assert_eq!(a.cli(&["retention", "99999"]).code, 2);
}

fn a_copy(a: &NodeProc, dir: std::path::PathBuf) -> NodeProc {
    let _ = a;
    NodeProc::detached("nobody", dir)
}
