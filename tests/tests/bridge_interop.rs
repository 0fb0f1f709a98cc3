//! The bridge against a reference XMPP client: slixmpp with slixmpp-omemo
//! (python-omemo), on Debian's Prosody with TLS from a test CA. Both
//! directions, OMEMO 2 with a current client and 0.3 with an older one,
//! the Coterie node offline while the friend writes, and the server
//! restarted mid-chat.

use std::time::Duration;

use coterie_tests::prosody::{Server, ServerOpts};
use coterie_tests::xmpp_client::{Friend, FriendOpts, Omemo};
use coterie_tests::{NodeProc, wait_for};
use serde_json::Value;

const DOMAIN: &str = "example.test";
const NS_OLD: &str = "eu.siacs.conversations.axolotl";
const NS_TWO: &str = "urn:xmpp:omemo:2";

fn history(n: &NodeProc, contact: &str) -> Vec<Value> {
    let out = n.cli(&["history", contact, "--limit", "1000"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.json
}

fn arrived(n: &NodeProc, contact: &str, body: &str) -> usize {
    history(n, contact)
        .iter()
        .filter(|m| m["dir"] == "in" && m["body"] == body)
        .count()
}

fn state_of(n: &NodeProc, contact: &str, body: &str) -> String {
    history(n, contact)
        .iter()
        .find(|m| m["dir"] == "out" && m["body"] == body)
        .and_then(|m| m["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn bridge_online(n: &NodeProc) {
    wait_for("the bridge online", Duration::from_secs(30), || {
        let out = n.cli(&["bridge", "status"]);
        (out.json
            .first()
            .is_some_and(|s| s["state"] == "online" && s["published"] == true))
        .then_some(())
    });
}

struct Setup {
    server: Server,
    node: NodeProc,
    _tmp: tempfile::TempDir,
}

/// A server with `me` (the Coterie user) and the given friends; the node's
/// bridge set (directly: the Tor path has its own test) and the friends
/// added as bridged contacts.
fn setup(friends: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut users = vec![("me", "my password")];
    users.extend(friends.iter().map(|f| (*f, "friend password")));
    let server = Server::start(
        &tmp.path().join("prosody"),
        &ServerOpts::new(DOMAIN, &users),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let node = NodeProc::init(tmp.path(), "coterie-user");
    let ca = server.ca_file();
    let out = node.cli_env(
        &[
            "bridge",
            "set",
            &format!("me@{DOMAIN}"),
            "--server",
            &server.addr(),
            "--ca-file",
            ca.to_str().expect("path"),
            "--danger-bridge-without-tor",
        ],
        &[("COTERIE_BRIDGE_PASSWORD", "my password")],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    for f in friends {
        let out = node.cli(&["add", &format!("xmpp:{f}@{DOMAIN}")]);
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    Setup {
        server,
        node,
        _tmp: tmp,
    }
}

/// The bridge's status, the node's log and the server's last stanzas.
fn dump(s: &Setup) -> String {
    let log = s.server.log();
    let _ = std::fs::write("/tmp/interop-prosody.log", &log);
    let tail: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("RECV: <message") || l.contains("SEND: <message"))
        .rev()
        .take(12)
        .collect();
    format!(
        "\nbridge: {:?}\nnode log:\n{}\nserver (last messages):\n{}",
        s.node.cli(&["bridge", "status"]).json,
        s.node.log_text(),
        tail.join("\n")
    )
}

fn friend(s: &Setup, name: &str, omemo: Omemo) -> Friend {
    Friend::start(&FriendOpts {
        jid: format!("{name}@{DOMAIN}"),
        password: "friend password".into(),
        server: s.server.addr(),
        ca_file: s.server.ca_file(),
        data: s._tmp.path().join(format!("{name}-omemo")),
        omemo,
        echo: false,
        netns: None,
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_current_client_and_coterie_chat_with_omemo_2_both_ways() {
    let mut s = setup(&["dino"]);
    let mut f = friend(&s, "dino", Omemo::Both);
    s.node.start();
    bridge_online(&s.node);
    let me = format!("me@{DOMAIN}");

    // Coterie writes first: it fetches the friend's devices from PEP.
    s.node.send("dino", "hello from coterie");
    let got = f
        .wait_message(&me, "hello from coterie", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}{}", dump(&s)));
    assert_eq!(got["encrypted"], true);
    assert_eq!(
        got["ns"],
        serde_json::json!([NS_TWO]),
        "OMEMO 2 with a current client"
    );

    // The friend answers: it fetched our devices from our PEP.
    let ns = f
        .send(&me, "hello from dino")
        .unwrap_or_else(|e| panic!("{e}{}", dump(&s)));
    assert!(ns.contains(&NS_TWO.to_string()), "{ns:?}");
    wait_for("coterie reads dino", Duration::from_secs(30), || {
        (arrived(&s.node, "dino", "hello from dino") == 1).then_some(())
    });
    wait_for("sent to the server", Duration::from_secs(30), || {
        (state_of(&s.node, "dino", "hello from coterie") != "queued").then_some(())
    });

    // The node is offline while the friend writes: it gets it once when
    // it is back.
    s.node.stop();
    f.send(&me, "while coterie was away")
        .unwrap_or_else(|e| panic!("{e}{}", dump(&s)));
    std::thread::sleep(Duration::from_millis(500));
    s.node.start();
    wait_for("the offline message", Duration::from_secs(30), || {
        (arrived(&s.node, "dino", "while coterie was away") == 1).then_some(())
    });

    // The server restarts mid-chat.
    s.server
        .restart()
        .unwrap_or_else(|e| panic!("{e}{}", dump(&s)));
    drop(f);
    let mut f = friend(&s, "dino", Omemo::Both);
    s.node.send("dino", "after the restart");
    f.wait_message(&me, "after the restart", Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}{}", dump(&s)));
    f.send(&me, "and back")
        .unwrap_or_else(|e| panic!("{e}{}", dump(&s)));
    wait_for(
        "coterie reads after the restart",
        Duration::from_secs(60),
        || (arrived(&s.node, "dino", "and back") == 1).then_some(()),
    );
    f.drain(Duration::from_secs(2));
    assert_eq!(f.count(&me, "after the restart"), 1, "once");
    for body in ["hello from dino", "while coterie was away", "and back"] {
        assert_eq!(arrived(&s.node, "dino", body), 1, "{body} once");
    }
    // Bodies never reach the server.
    let log = s.server.log();
    for body in [
        "hello from",
        "while coterie was away",
        "after the restart",
        "and back",
    ] {
        assert!(!log.contains(body), "the server saw {body:?}");
    }
    f.quit();
    s.node.stop();
}

#[test]
fn an_older_client_with_only_omemo_0_3_and_coterie_chat_both_ways() {
    let mut s = setup(&["gajim"]);
    let mut f = friend(&s, "gajim", Omemo::Old);
    s.node.start();
    bridge_online(&s.node);
    let me = format!("me@{DOMAIN}");
    s.node.send("gajim", "hello old friend");
    let got = f
        .wait_message(&me, "hello old friend", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}{}", dump(&s)));
    assert_eq!(
        got["ns"],
        serde_json::json!([NS_OLD]),
        "0.3 for a 0.3-only client"
    );
    let ns = f
        .send(&me, "hello coterie, in 0.3")
        .unwrap_or_else(|e| panic!("{e}{}", dump(&s)));
    assert_eq!(ns, [NS_OLD]);
    wait_for(
        "coterie reads the 0.3 message",
        Duration::from_secs(30),
        || (arrived(&s.node, "gajim", "hello coterie, in 0.3") == 1).then_some(()),
    );
    f.quit();
    s.node.stop();
}
