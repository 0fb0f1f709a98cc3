//! Offline delivery held by others, with real `coterie` processes on
//! 127.0.0.1: Ana writes to Ben while he is offline; a `coterie serve` box
//! both added holds the sealed messages; Ana goes offline; Ben comes back
//! and gets them from the box, once; when Ana returns her direct copies are
//! not shown again and her messages turn delivered. The box never had
//! anything readable.

use std::time::Duration;

use coterie_tests::{NodeProc, assert_no_plaintext, delivered, introduce, texts, wait_for};
use serde_json::Value;

fn holding(n: &NodeProc, args: &[&str]) -> Value {
    let mut a = vec!["holding"];
    a.extend_from_slice(args);
    let out = n.cli(&a);
    assert_eq!(out.code, 0, "{} holding {args:?}: {out:?}", n.name);
    out.json.into_iter().next().unwrap_or(Value::Null)
}

fn held(n: &NodeProc) -> u64 {
    holding(n, &[])["held"].as_u64().expect("held count")
}

/// How many times `body` came in from `contact`.
fn got(n: &NodeProc, contact: &str, body: &str) -> usize {
    texts(n, contact)
        .iter()
        .filter(|(d, b, _)| d == "in" && b == body)
        .count()
}

#[test]
fn a_serve_box_holds_messages_for_an_offline_contact_and_they_arrive_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut ana = NodeProc::init(tmp.path(), "ana");
    let mut ben = NodeProc::init(tmp.path(), "ben");
    let mut boxn = NodeProc::init(tmp.path(), "the-box");
    boxn.serve = true;
    // Off until the user turns it on; bad input says what to do.
    let v = holding(&ana, &[]);
    assert_eq!(
        (v["use_holders"].as_bool(), v["offer"].as_bool()),
        (Some(false), Some(false))
    );
    let out = ana.cli(&["holding", "use", "on", "--hours", "9999"]);
    assert_ne!(out.code, 0);
    assert!(
        format!("{out:?}").contains("--hours must be between 1 and 336"),
        "{out:?}"
    );

    for n in [&mut ana, &mut ben, &mut boxn] {
        n.start();
    }
    assert_eq!(holding(&boxn, &[])["offer"], true, "serve holds");
    // The box is each one's contact (the box's contacts change after Ana
    // met it: its offer to her is renewed); Ana and Ben know each other.
    introduce(&boxn, &ana);
    introduce(&boxn, &ben);
    introduce(&ana, &ben);
    holding(&ana, &["use", "on", "--hours", "48"]);
    ana.send("ben", "hello, directly");
    wait_for("the direct message", Duration::from_secs(30), || {
        delivered(&ana, "ben", "hello, directly").then_some(())
    });

    // Ben goes offline; Ana writes; the box takes the sealed copies.
    ben.stop();
    wait_for("ana to see ben gone", Duration::from_secs(20), || {
        (!ana.connected_to("ben")).then_some(())
    });
    let bodies = [
        "the meeting moved to thursday",
        "bring the flyers",
        "and the long extension cord",
    ];
    for b in bodies {
        ana.send("ben", b);
    }
    wait_for(
        "the box to hold three messages",
        Duration::from_secs(30),
        || (held(&boxn) == 3).then_some(()),
    );
    // Ana goes offline too: only the box has them now.
    ana.stop();

    ben.start();
    for b in bodies {
        wait_for(
            &format!("ben to get {b:?}"),
            Duration::from_secs(60),
            || (got(&ben, "ana", b) == 1).then_some(()),
        );
    }
    let order: Vec<String> = texts(&ben, "ana")
        .into_iter()
        .filter(|(d, _, _)| d == "in")
        .map(|(_, b, _)| b)
        .collect();
    assert_eq!(order, ["hello, directly", bodies[0], bodies[1], bodies[2]]);
    wait_for("the box to let go", Duration::from_secs(30), || {
        (held(&boxn) == 0).then_some(())
    });

    // Ana returns: her outbox sends the same stanzas directly; Ben shows
    // nothing twice, and his receipts mark them delivered.
    ana.start();
    for b in bodies {
        wait_for(&format!("{b:?} delivered"), Duration::from_secs(60), || {
            delivered(&ana, "ben", b).then_some(())
        });
    }
    for b in bodies {
        assert_eq!(got(&ben, "ana", b), 1, "{b:?} shown more than once");
    }

    // Without "use", nothing is left with the box.
    holding(&ana, &["use", "off"]);
    ben.stop();
    wait_for("ana to see ben gone", Duration::from_secs(20), || {
        (!ana.connected_to("ben")).then_some(())
    });
    ana.send("ben", "kept by ana alone");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(held(&boxn), 0, "left with a holder while turned off");

    // What the box learned: nothing readable in its profile or its log,
    // no chat shown, no name or address of either at info level.
    for n in [&mut ana, &mut boxn] {
        n.stop();
    }
    let mut needles: Vec<&[u8]> = bodies.iter().map(|b| b.as_bytes()).collect();
    needles.push(b"kept by ana alone");
    assert_no_plaintext(&boxn.dir, &needles);
    let log = boxn.log_text();
    for b in bodies {
        assert!(!log.contains(b), "a body in the box's log");
    }
    for who in [&ana, &ben] {
        let onion = who.key().onion_address();
        assert!(!log.contains(&onion), "an onion address in the box's log");
        assert!(
            !log.contains(&onion[..16]),
            "an onion address in the box's log"
        );
    }
}
