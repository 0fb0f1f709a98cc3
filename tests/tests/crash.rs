//! `kill -9` during bursts of 1,000 OMEMO-encrypted messages, 20 times: of
//! the receiver mid-burst (even rounds) or of the sender while it encrypts
//! and transmits its backlog (odd rounds). After every kill, every message
//! the receiver acknowledged is in its store exactly once, in order; after
//! every restart a new message still decrypts (no session desynchronised);
//! at the end every message arrived exactly once and none failed to decrypt.

use std::time::{Duration, Instant};

use coterie_tests::{NodeProc, running_pair, wait_for};
use rand::Rng;
use serde_json::json;

const ROUNDS: usize = 20;
const BURST: usize = 1000;

fn incoming(n: &NodeProc, contact: &str) -> Vec<String> {
    let out = n.cli(&["history", contact, "--limit", "1000000"]);
    assert_eq!(out.code, 0, "offline history failed: {}", out.stderr);
    out.json
        .iter()
        .filter(|m| m["dir"] == "in")
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn undecryptable(n: &NodeProc, contact: &str) -> usize {
    let out = n.cli(&["history", contact, "--limit", "1000000"]);
    out.json
        .iter()
        .filter(|m| m.get("undecryptable").is_some())
        .count()
}

fn acked(n: &NodeProc, contact: &str) -> Vec<String> {
    n.history(contact, 1_000_000)
        .into_iter()
        .filter(|m| m["dir"] == "out" && (m["state"] == "sent" || m["state"] == "delivered"))
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn kill9_of_receiver_or_sender_loses_duplicates_and_desynchronises_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut alice, mut bob) = running_pair(tmp.path());
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut expected = Vec::with_capacity(ROUNDS * BURST);
    let start = Instant::now();
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(rng.gen_range(50..1500));
        let bodies: Vec<String> = (0..BURST).map(|i| format!("r{round:02}-m{i:04}")).collect();
        expected.extend(bodies.iter().cloned());
        let mut ctl = alice.control_conn().expect("control");
        let mut sender = Some(std::thread::spawn(move || {
            for b in bodies {
                ctl.call(&json!({"cmd": "send", "contact": "bob", "text": b}))
                    .expect("send");
            }
        }));
        if round % 2 == 1 {
            // Sender: everything queued, then killed while it encrypts and sends.
            if let Some(s) = sender.take() {
                s.join().expect("sender");
            }
            std::thread::sleep(kill_after / 4);
            alice.kill9();
            alice.start();
        } else {
            std::thread::sleep(kill_after);
        }
        bob.kill9();
        // Everything Alice saw acknowledged must be in Bob's store, once, in order.
        let acked_now = acked(&alice, "bob");
        let stored = incoming(&bob, "alice");
        assert!(
            stored.len() >= acked_now.len() && stored[..acked_now.len()] == acked_now[..],
            "round {round}: acked {} but stored {} (or out of order)",
            acked_now.len(),
            stored.len()
        );
        let mut dedup = stored.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(
            dedup.len(),
            stored.len(),
            "round {round}: duplicates in Bob's store"
        );
        bob.start();
        if let Some(s) = sender.take() {
            s.join().expect("sender");
        }
        // After the restart the sessions still work: a new message decrypts.
        let probe = format!("probe after round {round}");
        alice.send("bob", &probe);
        expected.push(probe.clone());
        wait_for(&probe, Duration::from_secs(120), || {
            bob.history("alice", 5)
                .iter()
                .any(|m| m["body"] == probe.as_str())
                .then_some(())
        });
    }
    wait_for(
        "every message acknowledged",
        Duration::from_secs(120),
        || (acked(&alice, "bob").len() == expected.len()).then_some(()),
    );
    bob.stop();
    let stored = incoming(&bob, "alice");
    assert_eq!(stored.len(), expected.len(), "lost or duplicated messages");
    assert!(stored == expected, "messages out of order");
    assert_eq!(
        undecryptable(&bob, "alice"),
        0,
        "a message failed to decrypt"
    );
    eprintln!(
        "{ROUNDS} kills during {BURST}-message bursts: {} messages exactly once, in order, in {:?}",
        stored.len(),
        start.elapsed()
    );
}
