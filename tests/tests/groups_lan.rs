//! A meeting room on a LAN with no internet (namespaced test LAN, root
//! only): eight real nodes, Tor off; the organiser shows one group link,
//! everyone joins with it, everyone writes, everyone reads everything once.

use std::time::{Duration, Instant};

use coterie_tests::netns::Lan;
use coterie_tests::{NodeProc, wait_for};

const GROUP: &str = "tenants-assembly-room";
const N: usize = 8;

fn history(n: &NodeProc) -> Vec<(String, String)> {
    coterie_tests::group_history(n, GROUP)
}

fn members(n: &NodeProc) -> usize {
    coterie_tests::group_members(n, GROUP)
}

#[test]
fn eight_people_in_a_room_join_with_one_link_and_all_read_everything_once() {
    let lan = Lan::new(N);
    let tmp = tempfile::tempdir().expect("tmp");
    let mut nodes: Vec<NodeProc> = (0..N)
        .map(|i| {
            let mut p = NodeProc::init(tmp.path(), &format!("attendee-{i}-of-the-room"));
            p.netns = Some(lan.hosts[i].clone());
            p
        })
        .collect();
    for n in nodes.iter_mut() {
        n.start_with(&["--lan", "--lan-period", "10"]);
    }
    let out = nodes[0].cli(&["group", "create", GROUP]);
    assert_eq!(out.code, 0, "{:?}", out.json);
    let out = nodes[0].cli(&["group", "link", GROUP, "--uses", "7", "--ttl", "1h"]);
    assert_eq!(out.code, 0, "{:?}", out.json);
    let uri = out.json[0]["uri"].as_str().expect("uri").to_string();
    // The link names the organiser's LAN address: nothing else is needed.
    assert!(
        uri.contains(&lan.hosts[0].ip.to_string()),
        "the link lacks the LAN address: {uri}"
    );
    // Everyone in the room scans at once: the organiser takes seven
    // redemptions together (a contact-list refresh that finished out of
    // order once dropped a newcomer's welcome).
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for n in &nodes[1..] {
            let uri = &uri;
            s.spawn(move || {
                let out = n.cli(&["group", "join", uri]);
                assert_eq!(out.code, 0, "{}: {:?}", n.name, out.json);
            });
        }
    });
    for n in &nodes {
        wait_for(
            &format!("{} sees {N} members", n.name),
            Duration::from_secs(90),
            || (members(n) == N).then_some(()),
        );
    }
    let joined = t0.elapsed();

    for n in &nodes {
        let out = n.cli(&["group", "send", GROUP, &format!("{} says hello", n.name)]);
        assert_eq!(out.code, 0, "{:?}", out.json);
    }
    let t1 = Instant::now();
    for n in &nodes {
        for m in &nodes {
            if n.name == m.name {
                continue;
            }
            let body = format!("{} says hello", m.name);
            wait_for(
                &format!("{} reads {body:?}", n.name),
                Duration::from_secs(90),
                || history(n).iter().any(|(_, b)| *b == body).then_some(()),
            );
        }
    }
    let all_read = t1.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    for n in &nodes {
        let h = history(n);
        assert_eq!(
            h.len(),
            N,
            "{} has {} posts, not {N}: {h:?}",
            n.name,
            h.len()
        );
        for m in &nodes {
            let body = format!("{} says hello", m.name);
            assert_eq!(
                h.iter().filter(|(_, b)| *b == body).count(),
                1,
                "{}: {body:?} not exactly once",
                n.name
            );
        }
    }
    eprintln!(
        "{N} nodes joined in {:.1} s; every post read everywhere {:.1} s after the last was sent",
        joined.as_secs_f64(),
        all_read.as_secs_f64()
    );
    for n in nodes.iter_mut() {
        n.stop();
    }
}
