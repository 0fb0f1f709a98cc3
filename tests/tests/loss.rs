//! Bad Wi-Fi: two nodes on the namespaced test LAN, the bridge between them
//! dropping 20 % of frames at random (nftables; this kernel has no netem)
//! and cutting the link completely for 5 s every 30 s. Every message
//! arrives exactly once, in order, decrypts, and turns `delivered`; the
//! time to drain is reported; nothing plain is left on disk.
//!
//! CI runs the short version (a few hundred messages, one cut). The soak
//! (`tests/soak`, `COTERIE_SOAK=1`) sends 10,000 with a cut every 30 s.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coterie_tests::netns::Lan;
use coterie_tests::{NodeProc, assert_nothing_plain, introduce, wait_for};
use serde_json::json;

/// Every body of the run starts with this (the plaintext check looks for it).
const MARK: &str = "lossy-wifi-";

fn soak() -> bool {
    std::env::var_os("COTERIE_SOAK").is_some()
}

/// (bodies received from `contact`, how many failed to decrypt).
fn received(n: &NodeProc, contact: &str) -> (Vec<String>, usize) {
    let h = n.history(contact, 1_000_000);
    let bodies = h
        .iter()
        .filter(|m| m["dir"] == "in")
        .filter_map(|m| m["body"].as_str())
        .filter(|b| b.starts_with(MARK))
        .map(str::to_string)
        .collect();
    let bad = h
        .iter()
        .filter(|m| m.get("undecryptable").is_some())
        .count();
    (bodies, bad)
}

fn delivered(n: &NodeProc, contact: &str) -> usize {
    n.history(contact, 1_000_000)
        .iter()
        .filter(|m| m["dir"] == "out" && m["state"] == "delivered")
        .count()
}

#[test]
fn lossy_flapping_lan_delivers_every_message_exactly_once_in_order() {
    // (messages, one every, first cut after, then every, each lasting)
    let (count, pace, first_cut, cut_every, cut_for) = if soak() {
        // Written over about 2.5 minutes, as people chat: five cuts fall
        // mid-stream.
        (
            10_000,
            Duration::from_millis(15),
            Duration::from_secs(30),
            Duration::from_secs(30),
            Duration::from_secs(5),
        )
    } else {
        // As fast as the sender queues; the cut falls while it still does.
        (
            300,
            Duration::ZERO,
            Duration::from_millis(300),
            Duration::from_secs(30),
            Duration::from_secs(5),
        )
    };
    let lan = Lan::new(2);
    let tmp = tempfile::tempdir().expect("tmp");
    let mut a = NodeProc::init(tmp.path(), "alice_on_wifi");
    let mut b = NodeProc::init(tmp.path(), "bob_on_wifi");
    a.netns = Some(lan.hosts[0].clone());
    b.netns = Some(lan.hosts[1].clone());
    a.start();
    b.start();
    introduce(&a, &b);

    lan.lossy(20);
    // The link drops out for `cut_for`, every `cut_every`, until the last
    // message is in.
    let done = Arc::new(AtomicBool::new(false));
    let flapper = {
        let done = done.clone();
        let lan = &lan;
        move || {
            let mut cuts = 0u32;
            let mut next = Instant::now() + first_cut;
            while !done.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    lan.cut_all();
                    std::thread::sleep(cut_for);
                    lan.heal_all();
                    cuts += 1;
                    next = Instant::now() + cut_every;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            cuts
        }
    };

    let bodies: Vec<String> = (0..count).map(|i| format!("{MARK}{i:05}")).collect();
    let t0 = Instant::now();
    let (cuts, sent_in) = std::thread::scope(|s| {
        let flaps = s.spawn(flapper);
        let mut ctl = a.control_conn().expect("control");
        for body in &bodies {
            ctl.call(&json!({"cmd": "send", "contact": b.name, "text": body}))
                .expect("send");
            std::thread::sleep(pace);
        }
        let sent_in = t0.elapsed();
        wait_for(
            "every message received",
            Duration::from_secs(if soak() { 3600 } else { 180 }),
            || {
                std::thread::sleep(Duration::from_millis(200));
                (received(&b, &a.name).0.len() >= count).then_some(())
            },
        );
        done.store(true, Ordering::Relaxed);
        (flaps.join().expect("flapper"), sent_in)
    });
    let drained = t0.elapsed();
    lan.heal_all();
    wait_for(
        "every message delivered (receipts back)",
        Duration::from_secs(120),
        || (delivered(&a, &b.name) == count).then_some(()),
    );
    let acked = t0.elapsed();

    let (got, bad) = received(&b, &a.name);
    assert_eq!(bad, 0, "messages failed to decrypt");
    assert_eq!(got.len(), count, "lost or duplicated messages");
    assert!(got == bodies, "messages out of order");
    assert!(cuts >= 1, "the link was never cut");
    eprintln!(
        "loss 20 %, {cuts} cuts of {cut_for:?} every {cut_every:?}: {count} messages queued in \
         {sent_in:.1?}, all received exactly once in order after {drained:.1?} \
         ({:.0} msg/s), all delivered after {acked:.1?}",
        count as f64 / drained.as_secs_f64()
    );
    b.stop();
    a.stop();
    assert_nothing_plain(tmp.path(), &[&a, &b], &[MARK]);
}
