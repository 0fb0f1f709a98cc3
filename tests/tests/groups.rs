//! Groups with no room server, with real `coterie` processes on 127.0.0.1:
//! four members, not all of them contacts of each other; the creator
//! offline while the others go on; a member offline who catches up from
//! whoever is there; a removed member who gets nothing more; nothing
//! readable on disk.

use std::time::Duration;

use coterie_tests::{NodeProc, assert_no_plaintext, introduce, wait_for};
use serde_json::Value;

const GROUP: &str = "river-collective-meeting";

/// What a failed command said (`--json` prints errors as JSON on stdout).
fn said(out: &coterie_tests::CliOut) -> String {
    out.json
        .first()
        .and_then(|v| v["error"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| out.stderr.clone())
}

fn group(n: &NodeProc, args: &[&str]) -> Value {
    let mut a = vec!["group"];
    a.extend_from_slice(args);
    let out = n.cli(&a);
    assert_eq!(out.code, 0, "{} group {args:?}: {}", n.name, said(&out));
    out.json.into_iter().next().unwrap_or(Value::Null)
}

fn history(n: &NodeProc) -> Vec<(String, String)> {
    coterie_tests::group_history(n, GROUP)
}

fn count(n: &NodeProc, body: &str) -> usize {
    history(n).iter().filter(|(_, b)| b == body).count()
}

fn wait_post(n: &NodeProc, body: &str, secs: u64) {
    wait_for(
        &format!("{} to get {body:?}", n.name),
        Duration::from_secs(secs),
        || (count(n, body) >= 1).then_some(()),
    );
}

fn members(n: &NodeProc) -> usize {
    coterie_tests::group_members(n, GROUP)
}

#[test]
fn a_group_keeps_working_without_its_creator_and_without_a_server() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut n: Vec<NodeProc> = ["ana-creator", "ben-member", "cleo-member", "dov-member"]
        .iter()
        .map(|name| NodeProc::init(tmp.path(), name))
        .collect();
    // Without a running node: an error that says what to do.
    let out = n[0].cli(&["group", "list"]);
    assert_eq!(out.code, 7, "{}", said(&out));
    assert!(said(&out).contains("coterie run"), "{}", said(&out));
    for x in n.iter_mut() {
        x.start();
    }
    // Ana knows everyone; Cleo knows Ben and Dov; Ben and Dov do not know
    // each other.
    introduce(&n[0], &n[1]);
    introduce(&n[0], &n[2]);
    introduce(&n[0], &n[3]);
    introduce(&n[1], &n[2]);
    introduce(&n[2], &n[3]);

    let g = group(&n[0], &["create", GROUP]);
    assert_eq!(g["name"], GROUP);
    assert_eq!(g["admin"], true);
    for who in ["ben-member", "cleo-member", "dov-member"] {
        group(&n[0], &["invite", GROUP, who]);
    }
    for x in &n {
        wait_for(
            &format!("{} sees four members", x.name),
            Duration::from_secs(30),
            || (members(x) == 4).then_some(()),
        );
    }
    // A member cannot add people.
    let out = n[1].cli(&["group", "invite", GROUP, "cleo-member"]);
    assert_ne!(out.code, 0);
    assert!(said(&out).contains("admin"), "{}", said(&out));

    // Everyone writes; everyone gets everything once.
    for x in &n {
        group(x, &["send", GROUP, &format!("hello from {}", x.name)]);
    }
    for x in &n {
        for y in &n {
            if x.name != y.name {
                wait_post(x, &format!("hello from {}", y.name), 60);
            }
        }
    }

    // A newcomer in the room joins with the link (one scan): they become
    // Ana's contact and a member, and see what is written from then on.
    let mut eve = NodeProc::init(tmp.path(), "eve-newcomer");
    eve.start();
    let link = n[0].cli(&["group", "link", GROUP, "--uses", "5", "--ttl", "1h"]);
    assert_eq!(link.code, 0, "{}", said(&link));
    let uri = link.json[0]["uri"].as_str().expect("uri").to_string();
    let out = n[1].cli(&["group", "link", GROUP]);
    assert_ne!(out.code, 0, "a member who is not an admin made a link");
    let out = eve.cli(&["group", "join", &uri]);
    assert_eq!(out.code, 0, "{}", said(&out));
    wait_for("eve is in the group", Duration::from_secs(60), || {
        (members(&eve) == 5).then_some(())
    });
    group(&eve, &["send", GROUP, "hello from the newcomer eve"]);
    for x in &n {
        wait_post(x, "hello from the newcomer eve", 60);
    }
    assert_eq!(
        count(&eve, "hello from ben-member"),
        0,
        "history from before joining"
    );
    group(&n[2], &["send", GROUP, "welcome eve, from cleo"]);
    wait_post(&eve, "welcome eve, from cleo", 60);
    eve.stop();

    // The creator goes offline: Ben writes; Dov, who is not Ben's contact,
    // gets it through Cleo.
    n[0].stop();
    group(&n[1], &["send", GROUP, "the creator is away, we go on"]);
    wait_post(&n[3], "the creator is away, we go on", 60);

    // Dov is offline while Ben and Cleo write; he catches up from Cleo.
    n[3].stop();
    group(&n[1], &["send", GROUP, "written while dov was out (ben)"]);
    group(&n[2], &["send", GROUP, "written while dov was out (cleo)"]);
    wait_post(&n[2], "written while dov was out (ben)", 60);
    n[3].start();
    wait_post(&n[3], "written while dov was out (ben)", 90);
    wait_post(&n[3], "written while dov was out (cleo)", 90);

    // The creator comes back and catches up too.
    n[0].start();
    wait_post(&n[0], "written while dov was out (cleo)", 90);

    // The admin removes Dov: what is written after never reaches him.
    group(&n[0], &["remove", GROUP, "dov-member"]);
    for x in &n[..3] {
        wait_for(
            &format!("{} sees four members", x.name),
            Duration::from_secs(30),
            || (members(x) == 4).then_some(()),
        );
    }
    wait_for("dov learns he was removed", Duration::from_secs(30), || {
        let out = n[3].cli(&["group", "list"]);
        (out.json.first().and_then(|v| v[0]["member"].as_bool()) == Some(false)).then_some(())
    });
    group(&n[2], &["send", GROUP, "after dov left the room"]);
    wait_post(&n[1], "after dov left the room", 60);
    wait_post(&n[0], "after dov left the room", 60);
    std::thread::sleep(Duration::from_secs(5));
    // (His history still works and holds what came before.)
    assert_eq!(count(&n[3], "hello from ana-creator"), 1);
    assert_eq!(
        count(&n[3], "after dov left the room"),
        0,
        "a removed member read on"
    );
    let out = n[3].cli(&["group", "send", GROUP, "can I still write?"]);
    assert_ne!(out.code, 0);
    assert!(said(&out).contains("no longer a member"), "{}", said(&out));

    // Exactly once everywhere, also after a restart.
    n[1].stop();
    n[1].start();
    for x in &n[..3] {
        for y in &n {
            let body = format!("hello from {}", y.name);
            if x.name != y.name {
                assert_eq!(
                    count(x, &body),
                    1,
                    "{} has {body:?} {} times",
                    x.name,
                    count(x, &body)
                );
            }
        }
        assert_eq!(count(x, "the creator is away, we go on"), 1);
    }

    // Nothing readable on disk.
    for x in n.iter_mut() {
        x.stop();
    }
    assert_no_plaintext(
        tmp.path(),
        &[
            GROUP.as_bytes(),
            b"the creator is away, we go on",
            b"after dov left the room",
        ],
    );
}
