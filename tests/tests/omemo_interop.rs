//! Interop of Coterie's OMEMO with python-omemo (`oldmemo` and `twomemo`),
//! in both directions, for both versions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use coterie_tests::omemo_peer::{PyPeer, RustDevice};
use node::omemo::{OmemoError, Version};

const RUST: &str = "rust@coterie.test";
const PY: &str = "python@coterie.test";

fn setup() -> (RustDevice, PyPeer) {
    let r = RustDevice::new(RUST);
    let mut p = PyPeer::start(PY);
    p.add(&r);
    (r, p)
}

/// A session Rust started and python has answered (its session-completion
/// message decrypted).
fn established(v: Version) -> (RustDevice, PyPeer) {
    let (mut r, mut p) = setup();
    let first = r.encrypt(v, &mut p, Some("start"));
    assert_eq!(
        p.decrypt(v, RUST, &first)
            .expect("python decrypts the first message")
            .as_deref(),
        Some("start")
    );
    r.drain(&mut p);
    (r, p)
}

#[test]
fn rust_starts_the_session_then_100_messages_each_way() {
    for v in Version::ALL {
        let (mut r, mut p) = setup();
        let first = r.encrypt(v, &mut p, Some("hello from rust <&> ü"));
        assert!(
            first.contains(if v == Version::V2 { "kex=" } else { "prekey=" }),
            "{v}: first message carries the key exchange"
        );
        assert_eq!(
            p.decrypt(v, RUST, &first)
                .expect("python decrypts the key exchange")
                .as_deref(),
            Some("hello from rust <&> ü")
        );
        // python-omemo answers a key exchange with an empty message.
        assert_eq!(
            r.drain(&mut p),
            1,
            "{v}: python's session-completion message"
        );
        for i in 0..100 {
            let m = r.encrypt(v, &mut p, Some(&format!("r{i}")));
            assert_eq!(
                p.decrypt(v, RUST, &m).expect("python decrypts").as_deref(),
                Some(format!("r{i}").as_str()),
                "{v}"
            );
            let m = p.encrypt(v, RUST, &format!("p{i}"));
            assert_eq!(
                r.decrypt(&p, &m).expect("rust decrypts").as_deref(),
                Some(format!("p{i}").as_str()),
                "{v}"
            );
        }
        let after = r.encrypt(v, &mut p, Some("confirmed"));
        assert!(
            !after.contains("kex=") && !after.contains("prekey="),
            "{v}: a confirmed session stops sending the key exchange"
        );
        assert_eq!(
            p.decrypt(v, RUST, &after).expect("decrypt").as_deref(),
            Some("confirmed")
        );
    }
}

#[test]
fn python_starts_the_session_and_the_prekey_is_used_once() {
    for v in Version::ALL {
        let (mut r, mut p) = setup();
        let before = r.dev.prekey_count();
        let first = p.encrypt(v, RUST, "hello from python");
        assert_eq!(
            r.decrypt(&p, &first)
                .expect("rust decrypts the key exchange")
                .as_deref(),
            Some("hello from python")
        );
        assert_eq!(
            r.dev.prekey_count(),
            before - 1,
            "{v}: the one-time prekey is consumed"
        );
        // The same key exchange again is a replay, not a second session.
        assert_eq!(r.decrypt(&p, &first), Err(OmemoError::Duplicate), "{v}");
        let reply = r.encrypt(v, &mut p, Some("hi python"));
        assert_eq!(
            p.decrypt(v, RUST, &reply)
                .expect("python decrypts")
                .as_deref(),
            Some("hi python")
        );
        for i in 0..100 {
            let m = p.encrypt(v, RUST, &format!("p{i}"));
            assert_eq!(
                r.decrypt(&p, &m).expect("rust decrypts").as_deref(),
                Some(format!("p{i}").as_str()),
                "{v}"
            );
        }
        // Python's own messages so far (if any) decrypt on the Rust side.
        r.drain(&mut p);
        for i in 0..100 {
            let m = r.encrypt(v, &mut p, Some(&format!("r{i}")));
            assert_eq!(
                p.decrypt(v, RUST, &m).expect("python decrypts").as_deref(),
                Some(format!("r{i}").as_str()),
                "{v}"
            );
        }
        // Python's heartbeats (empty messages) decrypt on the Rust side.
        let beats = r.drain(&mut p);
        assert!(
            beats > 0,
            "{v}: python-omemo sent staleness heartbeats after 53 unanswered messages"
        );
    }
}

#[test]
fn out_of_order_delivery_and_skipped_keys_across_ratchet_steps() {
    for v in Version::ALL {
        let (mut r, mut p) = established(v);
        // Python → Rust: chain 1 (3 messages), Rust answers (ratchet step), chain 2 (3 messages).
        let c1: Vec<String> = (0..3)
            .map(|i| p.encrypt(v, RUST, &format!("c1-{i}")))
            .collect();
        assert_eq!(
            r.decrypt(&p, &c1[1]).expect("c1-1").as_deref(),
            Some("c1-1")
        );
        let answer = r.encrypt(v, &mut p, Some("answer"));
        p.decrypt(v, RUST, &answer).expect("answer");
        let c2: Vec<String> = (0..3)
            .map(|i| p.encrypt(v, RUST, &format!("c2-{i}")))
            .collect();
        // Newest first; the old chain's messages arrive last.
        for (m, want) in [
            (&c2[2], "c2-2"),
            (&c2[0], "c2-0"),
            (&c1[2], "c1-2"),
            (&c2[1], "c2-1"),
            (&c1[0], "c1-0"),
        ] {
            assert_eq!(r.decrypt(&p, m).expect(want).as_deref(), Some(want), "{v}");
        }
        // Rust → Python, reversed.
        let ms: Vec<String> = (0..5)
            .map(|i| r.encrypt(v, &mut p, Some(&format!("r{i}"))))
            .collect();
        for i in (0..5).rev() {
            assert_eq!(
                p.decrypt(v, RUST, &ms[i])
                    .expect("python out of order")
                    .as_deref(),
                Some(format!("r{i}").as_str()),
                "{v}"
            );
        }
        // A replay to Python is refused too.
        assert!(
            p.decrypt(v, RUST, &ms[0]).is_err(),
            "{v}: python refuses a replay"
        );
    }
}

#[test]
fn sessions_are_rebuilt_after_either_side_loses_state() {
    for v in Version::ALL {
        let (mut r, mut p) = established(v);
        let m = p.encrypt(v, RUST, "two");
        r.decrypt(&p, &m).expect("two");

        // Python loses its sessions: Rust's next message cannot be read.
        p.ok(serde_json::json!({"cmd": "lose_sessions", "jid": RUST}));
        let lost = r.encrypt(v, &mut p, Some("lost"));
        let e = p
            .decrypt(v, RUST, &lost)
            .expect_err("python has no session");
        assert!(e.contains("NoSession"), "{v}: {e}");
        // Python rebuilds: an empty key exchange, which Rust adopts.
        let rep = p.ok(serde_json::json!({"cmd": "replace_sessions", "jid": RUST, "device_id": r.dev.device_id}));
        assert!(
            rep["initiated"]
                .as_array()
                .expect("initiated")
                .iter()
                .any(|n| n == v.ns()),
            "{v}: {rep}"
        );
        let evs = p.take_events();
        for (ns, xml) in &evs {
            if ns == v.ns() {
                assert_eq!(
                    r.decrypt(&p, xml).expect("rust accepts the new session"),
                    None
                );
            }
        }
        let m = r.encrypt(v, &mut p, Some("three"));
        assert_eq!(
            p.decrypt(v, RUST, &m)
                .expect("python reads the rebuilt session")
                .as_deref(),
            Some("three")
        );
        let m = p.encrypt(v, RUST, "four");
        assert_eq!(
            r.decrypt(&p, &m)
                .expect("rust reads the rebuilt session")
                .as_deref(),
            Some("four")
        );

        // Rust loses its sessions: Python's next message cannot be read...
        r.slots.clear();
        let m = p.encrypt(v, RUST, "five");
        assert_eq!(r.decrypt(&p, &m), Err(OmemoError::NoSession), "{v}");
        // ...Rust repairs with an empty key exchange, as XEP-0384 says.
        let repair = r.encrypt(v, &mut p, None);
        assert_eq!(
            p.decrypt(v, RUST, &repair)
                .expect("python accepts the repair"),
            None
        );
        r.drain(&mut p);
        let m = p.encrypt(v, RUST, "six");
        assert_eq!(r.decrypt(&p, &m).expect("six").as_deref(), Some("six"));
    }
}
