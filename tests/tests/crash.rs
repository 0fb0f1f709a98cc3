//! `kill -9` during bursts of 1,000 OMEMO-encrypted messages, 10 times (40
//! in the soak, `COTERIE_SOAK=1`): of
//! the receiver mid-burst (even rounds) or of the sender while it encrypts
//! and transmits its backlog (odd rounds). After every kill, every message
//! the receiver acknowledged is in its store exactly once, in order; after
//! every restart a new message still decrypts (no session desynchronised);
//! at the end every message arrived exactly once and none failed to decrypt.
//!
//! Then `kill -9` in every state in turn (5 runs; 200 in the soak): during
//! a send, a receive, a new contact's session setup, a group catching up,
//! and `coterie compact`. After every kill the profile opens, what was
//! acknowledged is stored, and a message each way still decrypts.

use std::time::{Duration, Instant};

use coterie_tests::{NodeProc, running_pair, wait_for};
use rand::Rng;
use serde_json::json;

fn rounds() -> usize {
    if std::env::var_os("COTERIE_SOAK").is_some() {
        40
    } else {
        10
    }
}
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

/// What `n` saw acknowledged (works whether `n` runs or not).
fn acked(n: &NodeProc, contact: &str) -> Vec<String> {
    let out = n.cli(&["history", contact, "--limit", "1000000"]);
    assert_eq!(out.code, 0, "history failed: {}", out.stderr);
    out.json
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
    let rounds = rounds();
    let mut expected = Vec::with_capacity(rounds * BURST);
    let start = Instant::now();
    for round in 0..rounds {
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
        "{rounds} kills during {BURST}-message bursts: {} messages exactly once, in order, in {:?}",
        stored.len(),
        start.elapsed()
    );
}

/// What a run kills the node in the middle of.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Alice encrypting and sending a burst.
    Send,
    /// Bob receiving, decrypting and storing a burst.
    Receive,
    /// A new contact's first exchange: invite, keys, the first message.
    SessionSetup,
    /// Bob catching up on a burst of group posts.
    GroupSync,
    /// `coterie compact` rewriting Bob's profile.
    Compaction,
}

const STATES: [State; 5] = [
    State::Send,
    State::Receive,
    State::SessionSetup,
    State::GroupSync,
    State::Compaction,
];

fn group_bodies(n: &NodeProc, group: &str) -> Vec<String> {
    let out = n.cli(&["group", "history", group, "--limit", "100000"]);
    assert_eq!(out.code, 0, "group history: {}", out.stderr);
    out.json
        .first()
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|p| p["body"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Both ways, each message decrypts and turns delivered (no ratchet
/// desynchronised by the kill).
fn chat_both_ways(a: &NodeProc, b: &NodeProc, tag: &str) {
    for (from, to) in [(a, b), (b, a)] {
        let body = format!("{tag} from {}", from.name);
        from.send(&to.name, &body);
        wait_for(&body, Duration::from_secs(60), || {
            coterie_tests::delivered(from, &to.name, &body).then_some(())
        });
    }
    assert_eq!(
        undecryptable(a, &b.name),
        0,
        "{tag}: undecryptable at {}",
        a.name
    );
    assert_eq!(
        undecryptable(b, &a.name),
        0,
        "{tag}: undecryptable at {}",
        b.name
    );
}

#[test]
fn kill9_in_every_state_opens_loses_nothing_acked_and_desynchronises_nothing() {
    let runs = if std::env::var_os("COTERIE_SOAK").is_some() {
        200
    } else {
        STATES.len()
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut alice, mut bob) = running_pair(tmp.path());
    let group = "crash-test-collective";
    let out = alice.cli(&["group", "create", group]);
    assert_eq!(out.code, 0, "group create: {}", out.stderr);
    let out = alice.cli(&["group", "invite", group, "bob"]);
    assert_eq!(out.code, 0, "group invite: {}", out.stderr);
    wait_for("bob in the group", Duration::from_secs(30), || {
        (coterie_tests::group_members(&bob, group) == 2).then_some(())
    });
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut direct = Vec::new();
    let mut posts = Vec::new();
    let mut newcomers = 0;
    let mut window: Option<(Duration, Duration)> = None;
    let start = Instant::now();
    for run in 0..runs {
        let state = STATES[run % STATES.len()];
        let kill_after = Duration::from_millis(rng.gen_range(0..800));
        match state {
            State::Send | State::Receive => {
                let bodies: Vec<String> = (0..200)
                    .map(|i| format!("crashmsg-{run:03}-{i:03}"))
                    .collect();
                direct.extend(bodies.iter().cloned());
                let mut ctl = alice.control_conn().expect("control");
                for b in &bodies {
                    ctl.call(&json!({"cmd": "send", "contact": "bob", "text": b}))
                        .expect("send");
                }
                std::thread::sleep(kill_after);
                let send = matches!(state, State::Send);
                if send {
                    alice.kill9();
                } else {
                    bob.kill9();
                }
                let acked_now = acked(&alice, "bob");
                let stored = incoming(&bob, "alice");
                assert!(
                    stored.len() >= acked_now.len() && stored[..acked_now.len()] == acked_now[..],
                    "run {run} ({state:?}): acked {} but stored {}",
                    acked_now.len(),
                    stored.len()
                );
                if send {
                    alice.start();
                } else {
                    bob.start();
                }
            }
            State::SessionSetup => {
                newcomers += 1;
                let mut x = NodeProc::init(tmp.path(), &format!("newcomer{run:03}"));
                x.start();
                let uri = alice.invite();
                x.add(&uri, "alice");
                let first = format!("first words {run}");
                x.send("alice", &first);
                std::thread::sleep(kill_after);
                // Either side, mid-handshake or mid-first-message.
                if rng.gen_bool(0.5) {
                    x.kill9();
                    x.start();
                } else {
                    alice.kill9();
                    alice.start();
                }
                wait_for(&first, Duration::from_secs(60), || {
                    coterie_tests::delivered(&x, "alice", &first).then_some(())
                });
                chat_both_ways(&alice, &x, &format!("after run {run}"));
                let got = incoming(&alice, &x.name);
                assert_eq!(
                    got.iter().filter(|b| **b == first).count(),
                    1,
                    "run {run}: the first message is not there exactly once: {got:?}"
                );
                x.stop();
            }
            State::GroupSync => {
                let bodies: Vec<String> = (0..100)
                    .map(|i| format!("crashpost-{run:03}-{i:03}"))
                    .collect();
                posts.extend(bodies.iter().cloned());
                let mut ctl = alice.control_conn().expect("control");
                for b in &bodies {
                    ctl.call(&json!({"cmd": "groupsend", "group": group, "text": b}))
                        .expect("group send");
                }
                std::thread::sleep(kill_after);
                bob.kill9();
                bob.start();
            }
            State::Compaction => {
                // (Group history needs a running node.)
                let before_posts = group_bodies(&bob, group);
                bob.stop();
                let before = incoming(&bob, "alice");
                let compact = || {
                    std::process::Command::new(coterie_tests::coterie_bin())
                        .arg("--profile")
                        .arg(&bob.dir)
                        .args(["--json", "compact"])
                        .env("COTERIE_PASSPHRASE", coterie_tests::PASSPHRASE)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .expect("compact")
                };
                // The kill lands inside the compaction itself, not in the
                // unlocking before it: the window is measured once, from a
                // whole run against a run that only opens the profile.
                let (opened, done) = *window.get_or_insert_with(|| {
                    let t = Instant::now();
                    let _ = incoming(&bob, "alice");
                    let opened = t.elapsed();
                    let t = Instant::now();
                    let ok = compact().wait().expect("compact").success();
                    assert!(ok, "coterie compact failed");
                    (opened, t.elapsed())
                });
                let mut c = compact();
                let inside =
                    rng.gen_range(0..done.saturating_sub(opened).as_micros().max(1) as u64);
                std::thread::sleep(opened + Duration::from_micros(inside));
                let _ = c.kill();
                let _ = c.wait();
                // The profile opens and holds what it held.
                assert_eq!(
                    incoming(&bob, "alice"),
                    before,
                    "run {run}: compaction lost messages"
                );
                bob.start();
                let after_posts = group_bodies(&bob, group);
                assert!(
                    after_posts.len() >= before_posts.len()
                        && after_posts[..before_posts.len()] == before_posts[..],
                    "run {run}: compaction lost posts"
                );
            }
        }
        // After every run: a new message each way still decrypts.
        chat_both_ways(&alice, &bob, &format!("probe {run}"));
    }
    // At the end: every direct message once, in order; every post once.
    wait_for(
        "every message acknowledged",
        Duration::from_secs(120),
        || {
            let got = incoming(&bob, "alice");
            let want = got.iter().filter(|b| b.starts_with("crashmsg-")).count();
            (want == direct.len()).then_some(())
        },
    );
    let got: Vec<String> = incoming(&bob, "alice")
        .into_iter()
        .filter(|b| b.starts_with("crashmsg-"))
        .collect();
    assert!(
        got == direct,
        "direct messages lost, duplicated or reordered"
    );
    wait_for("every post at bob", Duration::from_secs(120), || {
        (group_bodies(&bob, group).len() >= posts.len()).then_some(())
    });
    let got_posts = group_bodies(&bob, group);
    assert_eq!(
        got_posts.len(),
        posts.len(),
        "group posts lost or duplicated"
    );
    let mut sorted = got_posts.clone();
    sorted.sort();
    let mut want = posts.clone();
    want.sort();
    assert_eq!(sorted, want, "group posts differ");
    eprintln!(
        "{runs} kills across {:?}: {} direct messages and {} group posts exactly once, \
         {newcomers} new contacts set up through a kill, compaction killed within {:?}, in {:?}",
        STATES,
        direct.len(),
        posts.len(),
        window,
        start.elapsed()
    );
    alice.stop();
    bob.stop();
    coterie_tests::assert_nothing_plain(
        tmp.path(),
        &[&alice, &bob],
        &["first words", "crashpost-", "crashmsg-"],
    );
}
