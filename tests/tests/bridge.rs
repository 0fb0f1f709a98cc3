//! The bridge to an ordinary XMPP server: a real Prosody (Debian package)
//! on 127.0.0.1 with TLS from a test CA, a node logged into an account on
//! it, and what the server holds afterwards.
//!
//! These nodes run without Tor and their accounts are set with
//! `--danger-bridge-without-tor`: the Tor path is tested with the private
//! Tor network.

use std::time::Duration;

use coterie_tests::prosody::{Server, ServerOpts};
use coterie_tests::xmpp_client::{Friend, FriendOpts, Omemo};
use coterie_tests::{NodeProc, wait_for};
use serde_json::Value;

const DOMAIN: &str = "example.test";

fn set(n: &NodeProc, jid: &str, password: &str, extra: &[&str]) -> coterie_tests::CliOut {
    let mut args = vec!["bridge", "set", jid];
    args.extend_from_slice(extra);
    n.cli_env(&args, &[("COTERIE_BRIDGE_PASSWORD", password)])
}

fn bridge_status(n: &NodeProc) -> Value {
    let out = n.cli(&["bridge", "status"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.json[0].clone()
}

fn wait_state(n: &NodeProc, state: &str, secs: u64) -> Value {
    wait_for(
        &format!("bridge {state}"),
        Duration::from_secs(secs),
        || {
            let s = bridge_status(n);
            (s["state"] == state).then_some(s)
        },
    )
}

/// Prosody's file-name encoding undone (`%2e` → `.`).
fn decode_store(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let hex: String = chars.by_ref().take(2).collect();
            match u8::from_str_radix(&hex, 16) {
                Ok(b) => out.push(b as char),
                Err(_) => out.push_str(&hex),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Full JIDs the server bound for `bare`, in order.
fn bound_resources(log: &str, bare: &str) -> Vec<String> {
    let prefix = format!("{bare}/");
    let mut out: Vec<String> = Vec::new();
    for line in log
        .lines()
        .filter(|l| l.contains("Resource bound") || l.contains("bound"))
    {
        if let Some(i) = line.find(&prefix) {
            let rest = &line[i + prefix.len()..];
            let res: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            if !res.is_empty() && !out.contains(&res) {
                out.push(res);
            }
        }
    }
    out
}

#[test]
fn the_bridge_logs_in_over_tls_and_the_server_keeps_nothing_about_the_user() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(
        &tmp.path().join("prosody"),
        &ServerOpts::new(DOMAIN, &[("me", "correct horse"), ("friend", "pw")]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut n = NodeProc::init(tmp.path(), "bridge-user");
    let jid = format!("me@{DOMAIN}");

    // Set while no node runs: kept in the store.
    let ca = server.ca_file();
    let out = set(
        &n,
        &jid,
        "correct horse",
        &[
            "--server",
            &server.addr(),
            "--ca-file",
            ca.to_str().expect("path"),
            "--danger-bridge-without-tor",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json[0]["state"], "stopped", "{:?}", out.json);
    assert_eq!(out.json[0]["route"], "direct");
    assert_eq!(out.json[0]["jid"], jid.as_str());

    // Two sessions: each binds a resource of its own.
    for _ in 0..2 {
        n.start();
        let s = wait_state(&n, "online", 30);
        assert_eq!(s["route"], "direct");
        let s = wait_for("OMEMO keys published", Duration::from_secs(30), || {
            let s = bridge_status(&n);
            (s["published"] == true || s["note"].is_string()).then_some(s)
        });
        assert_eq!(s["published"], true, "{s}");
        assert!(s["error"].is_null(), "{s}");
        let st = n.status();
        assert_eq!(st["bridge"]["state"], "online", "{st}");
        n.stop();
    }
    let log = server.log();
    let resources = bound_resources(&log, &jid);
    assert_eq!(
        resources.len(),
        2,
        "two sessions, two resources: {resources:?}"
    );
    for r in &resources {
        assert_eq!(r.len(), 16, "{r}");
        assert!(!r.to_lowercase().contains("coterie"), "{r}");
    }

    // Everything the node sent the server, from the server's own log
    // (mod_stanza_debug: every element received on a c2s stream is a
    // "RECV:" line): no roster, no bookmarks, no vCard or avatar, no
    // private XML, no capabilities, no presence, nothing naming Coterie.
    let from_us: Vec<&str> = log.lines().filter(|l| l.contains("RECV: <")).collect();
    assert!(
        from_us
            .iter()
            .any(|l| l.contains("urn:ietf:params:xml:ns:xmpp-bind")),
        "the log shows what the node sent: {} lines",
        from_us.len()
    );
    for l in &from_us {
        for banned in [
            "jabber:iq:roster",
            "storage:bookmarks",
            "urn:xmpp:bookmarks",
            "vcard-temp",
            "urn:ietf:params:xml:ns:vcard-4.0",
            "urn:xmpp:avatar",
            "jabber:iq:private",
            "http://jabber.org/protocol/caps",
            "jabber:iq:version",
            "<status",
            "<nick",
        ] {
            assert!(!l.contains(banned), "the node sent {banned}: {l}");
        }
    }
    // One bare initial presence per session (the server then delivers
    // what it kept), nothing in it.
    let presences: Vec<&&str> = from_us.iter().filter(|l| l.contains("<presence")).collect();
    assert_eq!(presences.len(), 2, "{presences:?}");
    for p in presences {
        // xmpp-parsers always writes the default priority; nothing else.
        let inner = p
            .split_once('>')
            .map(|(_, rest)| rest.trim_end().trim_end_matches("</presence>"))
            .unwrap_or_default();
        assert!(
            p.trim_end().ends_with("/>") || inner == "<priority>0</priority>",
            "{p}"
        );
    }
    for l in log.lines() {
        assert!(
            !l.to_lowercase().contains("coterie"),
            "the server saw the name: {l}"
        );
    }
    eprintln!("{} elements from the node's sessions", from_us.len());

    // What the server stores for the account: the account itself; the
    // OMEMO device lists and bundles (both versions), which friends must
    // be able to fetch; and, in "pep", the node configurations, including
    // the empty `storage:bookmarks` node Prosody's mod_bookmarks creates at
    // every login on its own. No roster, no private XML, no vCard, no
    // other PEP items (bookmarks, avatar, vCard4 and the like would be
    // `pep_<node>` stores), no archive.
    let omemo_node = |n: &str| {
        n == "eu.siacs.conversations.axolotl.devicelist"
            || n.starts_with("eu.siacs.conversations.axolotl.bundles:")
            || n == "urn:xmpp:omemo:2:devices"
            || n == "urn:xmpp:omemo:2:bundles"
    };
    let stored = server.stored("me");
    for (store, _) in &stored {
        match store.strip_prefix("pep_") {
            Some(node) => {
                let node = decode_store(node);
                assert!(omemo_node(&node), "the server stored PEP items of {node}");
            }
            None => assert!(
                ["accounts", "pep"].contains(&store.as_str()),
                "the server stored {store}: {stored:?}"
            ),
        }
    }
    assert_eq!(
        stored.iter().filter(|(s, _)| s.starts_with("pep_")).count(),
        4,
        "two device lists and two bundles: {stored:?}"
    );
    if let Some((_, f)) = stored.iter().find(|(s, _)| s == "pep") {
        let nodes = std::fs::read_to_string(f).unwrap_or_default();
        let named: Vec<&str> = nodes
            .lines()
            .filter_map(|l| l.trim().strip_prefix("[\""))
            .filter_map(|l| l.split('"').next())
            .filter(|n| n.contains(':') || n.contains('.'))
            .filter(|n| !n.contains('@'))
            .collect();
        for n in named {
            assert!(
                omemo_node(n) || n == "storage:bookmarks",
                "PEP node {n}: {nodes}"
            );
        }
    }

    // Off: the account and its password leave the store.
    let out = n.cli(&["bridge", "off"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json[0]["removed"], true);
    assert_eq!(bridge_status(&n)["state"], "off");
    coterie_tests::assert_no_plaintext(&n.dir, &[b"correct horse", jid.as_bytes()]);
}

#[test]
fn bridge_errors_say_what_to_do_and_never_fall_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut server = Server::start(
        &tmp.path().join("prosody"),
        &ServerOpts::new(DOMAIN, &[("me", "right password")]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = server.ca_file();
    let ca = ca.to_str().expect("path");
    let jid = format!("me@{DOMAIN}");
    let mut n = NodeProc::init(tmp.path(), "bridge-errors");

    // Bad input from the user: refused before anything is stored.
    let out = set(&n, "not-an-address", "pw", &[]);
    assert_eq!(out.code, 2);
    assert!(
        out.json[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("user@example.org")
    );
    let out = set(&n, &jid, "pw", &["--server", "127.0.0.1"]);
    assert_eq!(out.code, 2);
    assert!(
        out.json[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("HOST:PORT")
    );
    let out = set(&n, &jid, "", &["--danger-bridge-without-tor"]);
    assert_eq!(out.code, 2);
    assert!(
        out.json[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("COTERIE_BRIDGE_PASSWORD")
    );
    assert_eq!(bridge_status(&n)["state"], "off");

    n.start();

    // Through Tor (the default) on a node without Tor: it stops and says
    // why; it does not connect directly.
    let before = server.log().matches("Client connected").count();
    let out = set(
        &n,
        &jid,
        "right password",
        &["--server", &server.addr(), "--ca-file", ca],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = wait_state(&n, "failed", 10);
    assert!(
        s["error"]
            .as_str()
            .unwrap_or_default()
            .contains("--danger-bridge-without-tor"),
        "{s}"
    );
    assert_eq!(s["route"], "tor");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        server.log().matches("Client connected").count(),
        before,
        "no direct connection"
    );

    // A wrong password: stops, no retry loop hammering the server.
    let direct = [
        "--server",
        &server.addr(),
        "--ca-file",
        ca,
        "--danger-bridge-without-tor",
    ];
    let out = set(&n, &jid, "wrong password", &direct);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = wait_state(&n, "failed", 30);
    let e = s["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("refused the login") && e.contains("bridge set"),
        "{s}"
    );
    let attempts = server.log().matches("Client connected").count();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        server.log().matches("Client connected").count(),
        attempts,
        "no retries"
    );

    // The system's roots do not know the test CA: a certificate error,
    // nothing sent after the handshake, and the bridge stops.
    let out = set(
        &n,
        &jid,
        "right password",
        &["--server", &server.addr(), "--danger-bridge-without-tor"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = wait_state(&n, "failed", 30);
    let e = s["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("certificate") && e.contains(DOMAIN) && e.contains("--ca-file"),
        "{s}"
    );

    // Server down: retries with growing pauses and comes online when the
    // server is back.
    server.stop();
    let out = set(&n, &jid, "right password", &direct);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = wait_state(&n, "retrying", 30);
    assert!(
        s["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot reach the server"),
        "{s}"
    );
    assert!(s["retry_in"].as_u64().is_some(), "{s}");
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    wait_state(&n, "online", 90);

    // A server restart mid-session: the bridge comes back by itself.
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    let mut last = Value::Null;
    let back = (0..90).any(|_| {
        std::thread::sleep(Duration::from_secs(1));
        last = bridge_status(&n);
        last["state"] == "online" && last["connections"].as_u64() >= Some(2)
    });
    if !back {
        let log = server.log();
        let _ = std::fs::write("/tmp/bridge-prosody.log", &log);
        let _ = std::fs::write("/tmp/bridge-node.log", n.log_text());
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        panic!(
            "not back after a server restart: {last}; log: {}\nserver: {}",
            n.log_text(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    n.stop();
}

#[test]
fn a_certificate_for_another_name_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut opts = ServerOpts::new(DOMAIN, &[("me", "pw")]);
    opts.cert_name = "other.test".into();
    let server =
        Server::start(&tmp.path().join("prosody"), &opts).unwrap_or_else(|e| panic!("{e}"));
    let mut n = NodeProc::init(tmp.path(), "bridge-mismatch");
    n.start();
    let ca = server.ca_file();
    let out = set(
        &n,
        &format!("me@{DOMAIN}"),
        "pw",
        &[
            "--server",
            &server.addr(),
            "--ca-file",
            ca.to_str().expect("path"),
            "--danger-bridge-without-tor",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = wait_state(&n, "failed", 30);
    let e = s["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("certificate is not valid for example.test"),
        "{s}"
    );
    assert!(
        !server.log().contains("Authenticated as"),
        "no login on a bad certificate"
    );
    n.stop();
}

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

/// Waits for `f`; on timeout, fails with both bridges' status, the nodes'
/// logs and the server's last words.
fn wait_or_dump(what: &str, secs: u64, nodes: &[NodeProc], server: &Server, f: impl Fn() -> bool) {
    for _ in 0..secs * 4 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut dump = String::new();
    for n in nodes {
        dump += &format!("\n{}: {}\n{}", n.name, bridge_status(n), n.log_text());
    }
    let log = server.log();
    let _ = std::fs::write("/tmp/bridge-prosody.log", &log);
    panic!("timed out waiting for {what}:{dump}");
}

/// Two Coterie users who only share an ordinary XMPP server: each logs
/// its bridge into its own account there and adds the other's address.
#[test]
fn two_coterie_users_chat_through_their_xmpp_accounts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut server = Server::start(
        &tmp.path().join("prosody"),
        &ServerOpts::new(
            DOMAIN,
            &[("ana", "ana's password"), ("ben", "ben's password")],
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = server.ca_file();
    let ca = ca.to_str().expect("path").to_string();
    let mut nodes = Vec::new();
    for (name, user, pw, other) in [
        ("ana-node", "ana", "ana's password", "ben"),
        ("ben-node", "ben", "ben's password", "ana"),
    ] {
        let mut n = NodeProc::init(tmp.path(), name);
        let jid = format!("{user}@{DOMAIN}");
        let out = set(
            &n,
            &jid,
            pw,
            &[
                "--server",
                &server.addr(),
                "--ca-file",
                &ca,
                "--danger-bridge-without-tor",
            ],
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        let out = n.cli(&["add", &format!("xmpp:{other}@{DOMAIN}")]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.json[0]["bridged"], true, "{:?}", out.json);
        assert_eq!(out.json[0]["name"], other);
        n.start();
        nodes.push(n);
    }
    for n in &nodes {
        wait_state(n, "online", 30);
    }

    // Both ways; delivered once each, with receipts.
    nodes[0].send("ben", "hello ben, over the bridge");
    wait_or_dump("ben reads ana", 30, &nodes, &server, || {
        arrived(&nodes[1], "ana", "hello ben, over the bridge") == 1
    });
    nodes[1].send("ana", "hello ana, same way back");
    wait_or_dump("ana reads ben", 30, &nodes, &server, || {
        arrived(&nodes[0], "ben", "hello ana, same way back") == 1
    });
    wait_or_dump("ana's message delivered", 30, &nodes, &server, || {
        state_of(&nodes[0], "ben", "hello ben, over the bridge") == "delivered"
    });

    // Ben is offline while Ana writes: the server keeps it; Ben gets it
    // once when he is back.
    nodes[1].stop();
    nodes[0].send("ben", "while you were away");
    wait_or_dump("sent to the server", 30, &nodes, &server, || {
        state_of(&nodes[0], "ben", "while you were away") == "sent"
    });
    nodes[1].start();
    wait_for(
        "ben reads what came while away",
        Duration::from_secs(30),
        || (arrived(&nodes[1], "ana", "while you were away") == 1).then_some(()),
    );

    // The server restarts mid-chat: both bridges come back, the chat goes on.
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    nodes[1].send("ana", "after the restart");
    wait_for(
        "ana reads after the restart",
        Duration::from_secs(90),
        || (arrived(&nodes[0], "ben", "after the restart") == 1).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(arrived(&nodes[1], "ana", "hello ben, over the bridge"), 1);
    assert_eq!(arrived(&nodes[1], "ana", "while you were away"), 1);

    // The server never saw a body.
    let log = server.log();
    for body in [
        "hello ben",
        "same way back",
        "while you were away",
        "after the restart",
    ] {
        assert!(!log.contains(body), "the server saw {body:?}");
    }
    for f in coterie_tests::files_under(&server.dir.join("data")) {
        let data = std::fs::read(&f).unwrap_or_default();
        assert!(
            !data
                .windows(b"while you were away".len())
                .any(|w| w == b"while you were away"),
            "{} holds a body",
            f.display()
        );
    }
    for n in nodes.iter_mut() {
        n.stop();
    }
}

/// arti's configuration for the private network, allowing exits to
/// loopback (where the test's Prosody listens, inside the network's
/// namespace).
fn arti_with_local_exits(tor: &coterie_tests::tornet::TorNet, dir: &std::path::Path) -> String {
    let base = std::fs::read_to_string(tor.arti_config()).expect("arti config");
    let path = dir.join("arti-local-exits.toml");
    std::fs::write(
        &path,
        format!("{base}\n[address_filter]\nallow_local_addrs = true\n"),
    )
    .expect("write arti config");
    path.to_str().expect("utf-8").to_string()
}

/// The account goes through the private Tor network's exit: the server
/// listens on the loopback of the network's namespace, which the node's
/// own namespace cannot reach directly.
#[test]
fn the_bridge_reaches_the_server_only_through_a_tor_exit() {
    let lan = coterie_tests::netns::Lan::new(1);
    let (router_ns, router_ip) = lan.router();
    let tor = coterie_tests::tornet::TorNet::builder()
        .in_namespace(&router_ns, router_ip)
        .exit_ports(&[5222])
        .start();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut opts = ServerOpts::new(DOMAIN, &[("me", "over tor"), ("dino", "friend password")]);
    opts.netns = Some(router_ns.clone());
    // The exit's policy summary names this port (see `exit_ports`).
    opts.port = 5222;
    let server =
        Server::start(&tmp.path().join("prosody"), &opts).unwrap_or_else(|e| panic!("{e}"));
    let cfg = arti_with_local_exits(&tor, tmp.path());
    let mut n = NodeProc::init(tmp.path(), "bridge-tor");
    n.netns = Some(lan.hosts[0].clone());
    let ca = server.ca_file();
    let out = set(
        &n,
        &format!("me@{DOMAIN}"),
        "over tor",
        &[
            "--server",
            &server.addr(),
            "--ca-file",
            ca.to_str().expect("path"),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json[0]["route"], "tor");
    n.start_with(&["--tor-config", &cfg, "--advertise", "tcp:127.0.0.1:9"]);
    let mut last = Value::Null;
    let online = (0..180).any(|_| {
        std::thread::sleep(Duration::from_secs(1));
        last = bridge_status(&n);
        last["state"] == "online"
    });
    assert!(
        online,
        "not online through Tor: {last}; log: {}",
        n.log_text()
    );
    assert_eq!(last["route"], "tor");
    let st = n.status();
    assert_eq!(st["bridge"]["route"], "tor", "{st}");
    assert!(server.log().contains("Authenticated as me@example.test"));

    // A friend on the server's side (the Python reference client, in the
    // namespace that holds the server): the chat goes both ways, OMEMO
    // end to end, with the node's traffic only through the exit.
    let out = n.cli(&["add", &format!("xmpp:dino@{DOMAIN}")]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut f = Friend::start(&FriendOpts {
        jid: format!("dino@{DOMAIN}"),
        password: "friend password".into(),
        server: server.addr(),
        ca_file: server.ca_file(),
        data: tmp.path().join("dino-omemo"),
        omemo: Omemo::Both,
        echo: false,
        netns: Some(router_ns.clone()),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let me = format!("me@{DOMAIN}");
    n.send("dino", "hello dino, through a tor exit");
    let got = f
        .wait_message(
            &me,
            "hello dino, through a tor exit",
            Duration::from_secs(90),
        )
        .unwrap_or_else(|e| panic!("{e}; node log: {}", n.log_text()));
    assert_eq!(got["encrypted"], true, "{got}");
    f.send(&me, "hello coterie, back through the exit")
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for("the node reads dino", Duration::from_secs(90), || {
        (arrived(&n, "dino", "hello coterie, back through the exit") == 1).then_some(())
    });
    // The server saw the account only from the exit relay's side: every
    // client address it logged is loopback (the exit and the friend share
    // its namespace), never the node's LAN address.
    let log = server.log();
    let node_ip = lan.hosts[0].ip.to_string();
    assert!(
        !log.contains(&node_ip),
        "the server saw the node's address {node_ip}"
    );
    // Prosody logs each accepted connection as `New connection FD n (peer,
    // port, local, port)`: the node's (through the exit) and the friend's,
    // all from loopback.
    let peers: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("New connection FD ").nth(1))
        .collect();
    assert!(peers.len() >= 2, "connections seen: {peers:?}");
    for p in &peers {
        assert!(
            p.contains("(127.0.0.1, "),
            "a connection not from the exit: {p}"
        );
    }
    for body in ["hello dino", "back through the exit"] {
        assert!(!log.contains(body), "the server saw {body:?}");
    }
    f.quit();
    n.stop();
}

/// With a Tor that cannot bootstrap, the bridge waits for it and never
/// connects directly, although the server is right there.
#[test]
fn a_tor_failure_never_falls_back_to_a_direct_connection() {
    let lan = coterie_tests::netns::Lan::new(1);
    let tmp = tempfile::tempdir().expect("tmp");
    let host = lan.hosts[0].clone();
    let mut opts = ServerOpts::new(DOMAIN, &[("me", "pw")]);
    opts.netns = Some(host.ns.clone());
    let server =
        Server::start(&tmp.path().join("prosody"), &opts).unwrap_or_else(|e| panic!("{e}"));
    // A network that is not there (the namespace has no route anywhere).
    let cfg = tmp.path().join("arti.toml");
    std::fs::write(
        &cfg,
        "[tor_network]\n\
         fallback_caches = [ { rsa_identity = \"0000000000000000000000000000000000000000\", ed_identity = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\", orports = [\"127.0.0.1:1\"] } ]\n\
         [tor_network.authorities]\n\
         v3idents = [\"0000000000000000000000000000000000000000\"]\n",
    )
    .expect("write config");
    let mut n = NodeProc::init(tmp.path(), "bridge-no-tor");
    n.netns = Some(host);
    let ca = server.ca_file();
    let out = set(
        &n,
        &format!("me@{DOMAIN}"),
        "pw",
        &[
            "--server",
            &server.addr(),
            "--ca-file",
            ca.to_str().expect("path"),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    n.start_with(&["--tor-config", cfg.to_str().expect("utf-8")]);
    wait_state(&n, "waitingfortor", 30);
    std::thread::sleep(Duration::from_secs(10));
    let s = bridge_status(&n);
    assert_eq!(s["state"], "waitingfortor", "{s}");
    assert!(
        !server.log().contains("Client connected"),
        "the server saw a connection"
    );
    n.stop();
}

/// The server closes the session with a stream error, again and again:
/// the bridge comes back each time, waits longer when sessions keep
/// ending at once, and says what happened.
#[test]
fn stream_errors_from_the_server_are_ridden_out_with_growing_pauses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(
        &tmp.path().join("prosody"),
        &ServerOpts::new(DOMAIN, &[("me", "pw")]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut n = NodeProc::init(tmp.path(), "bridge-kicked");
    let ca = server.ca_file();
    let out = set(
        &n,
        &format!("me@{DOMAIN}"),
        "pw",
        &[
            "--server",
            &server.addr(),
            "--ca-file",
            ca.to_str().expect("path"),
            "--danger-bridge-without-tor",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    n.start();
    wait_state(&n, "online", 30);
    let mut saw_pause = false;
    for kick in 1..=3u64 {
        let said = server
            .shell(&format!(
                "c2s:close(\"me@{DOMAIN}\", \"go away\", \"policy-violation\")"
            ))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(said.contains("1 sessions closed"), "{said}");
        let mut last = Value::Null;
        let back = (0..240).any(|_| {
            std::thread::sleep(Duration::from_millis(250));
            last = bridge_status(&n);
            saw_pause |= last["retry_in"].as_u64().is_some();
            last["state"] == "online" && last["connections"].as_u64() > Some(kick)
        });
        assert!(
            back,
            "not back after kick {kick}: {last}; log: {}",
            n.log_text()
        );
    }
    assert!(
        saw_pause,
        "sessions that end at once are retried after a pause"
    );
    assert!(server.log().contains("policy-violation"));
    assert!(n.running(), "the node is still up");
    n.stop();
}

/// Someone who is not a contact floods the account: nothing is stored,
/// the status counts them, and the node stays up and keeps chatting.
#[test]
fn a_flood_from_a_stranger_stores_nothing_and_stops_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(
        &tmp.path().join("prosody"),
        &ServerOpts::new(DOMAIN, &[("ana", "pw1"), ("eve", "pw2")]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = server.ca_file();
    let ca = ca.to_str().expect("path").to_string();
    let mut ana = NodeProc::init(tmp.path(), "ana-node");
    let mut eve = NodeProc::init(tmp.path(), "eve-node");
    for (n, user, pw) in [(&ana, "ana", "pw1"), (&eve, "eve", "pw2")] {
        let out = set(
            n,
            &format!("{user}@{DOMAIN}"),
            pw,
            &[
                "--server",
                &server.addr(),
                "--ca-file",
                &ca,
                "--danger-bridge-without-tor",
            ],
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    // Eve adds Ana; Ana does not add Eve.
    assert_eq!(eve.cli(&["add", &format!("xmpp:ana@{DOMAIN}")]).code, 0);
    ana.start();
    eve.start();
    wait_state(&ana, "online", 30);
    wait_state(&eve, "online", 30);
    const FLOOD: u64 = 300;
    let mut c = eve.control_conn().unwrap_or_else(|e| panic!("{e}"));
    for i in 0..FLOOD {
        let r = c
            .call(
                &serde_json::json!({"cmd": "send", "contact": "ana", "text": format!("spam {i}")}),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r["seq"].as_u64().is_some(), "{r}");
    }
    let mut last = Value::Null;
    let counted = (0..240).any(|_| {
        std::thread::sleep(Duration::from_millis(250));
        last = bridge_status(&ana);
        last["ignored"].as_u64() >= Some(FLOOD)
    });
    assert!(
        counted,
        "ana counted the flood: {last}; eve: {}",
        bridge_status(&eve)
    );
    assert_eq!(ana.cli(&["contacts"]).json.len(), 0, "no contact made");
    assert!(ana.running());
    // Ana adds Eve after all: from then on her messages are read.
    assert_eq!(ana.cli(&["add", &format!("xmpp:eve@{DOMAIN}")]).code, 0);
    eve.send("ana", "now you know me");
    wait_for("ana reads eve", Duration::from_secs(30), || {
        (arrived(&ana, "eve", "now you know me") == 1).then_some(())
    });
    assert_eq!(
        history(&ana, "eve").len(),
        1,
        "none of the flood was stored"
    );
    ana.stop();
    eve.stop();
}

/// Ben's node is killed (-9) while Ana's messages stream in: whatever the
/// server had handed over but the node had not stored yet comes back from
/// the archive, and what the server still held comes from its offline
/// store: every message arrives exactly once.
#[test]
fn a_killed_node_gets_every_message_exactly_once_from_the_archive() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(
        &tmp.path().join("prosody"),
        &ServerOpts::new(DOMAIN, &[("ana", "pw1"), ("ben", "pw2")]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = server.ca_file();
    let ca = ca.to_str().expect("path").to_string();
    let mut nodes = Vec::new();
    for (name, user, pw, other) in [
        ("ana-k", "ana", "pw1", "ben"),
        ("ben-k", "ben", "pw2", "ana"),
    ] {
        let mut n = NodeProc::init(tmp.path(), name);
        let out = set(
            &n,
            &format!("{user}@{DOMAIN}"),
            pw,
            &[
                "--server",
                &server.addr(),
                "--ca-file",
                &ca,
                "--danger-bridge-without-tor",
            ],
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(n.cli(&["add", &format!("xmpp:{other}@{DOMAIN}")]).code, 0);
        n.start();
        nodes.push(n);
    }
    for n in &nodes {
        wait_state(n, "online", 30);
    }
    // One message first, so Ben's node has an archive position.
    nodes[0].send("ben", "m-first");
    wait_or_dump("the first message", 30, &nodes, &server, || {
        arrived(&nodes[1], "ana", "m-first") == 1
    });
    const N: usize = 60;
    let mut c = nodes[0].control_conn().unwrap_or_else(|e| panic!("{e}"));
    for i in 0..N {
        c.call(&serde_json::json!({"cmd": "send", "contact": "ben", "text": format!("m-{i:03}")}))
            .unwrap_or_else(|e| panic!("{e}"));
        if i == N / 3 {
            nodes[1].kill9();
        }
    }
    wait_or_dump("all sent", 60, &nodes[..1], &server, || {
        history(&nodes[0], "ben")
            .iter()
            .filter(|m| m["dir"] == "out")
            .all(|m| m["state"] != "queued")
    });
    nodes[1].start();
    wait_or_dump("every message at ben", 60, &nodes, &server, || {
        (0..N).all(|i| arrived(&nodes[1], "ana", &format!("m-{i:03}")) >= 1)
    });
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..N {
        assert_eq!(
            arrived(&nodes[1], "ana", &format!("m-{i:03}")),
            1,
            "m-{i:03} exactly once"
        );
    }
    assert_eq!(arrived(&nodes[1], "ana", "m-first"), 1);
    let caught: Vec<String> = nodes[1]
        .log_text()
        .lines()
        .filter(|l| l.contains("caught up from the archive"))
        .map(str::to_string)
        .collect();
    eprintln!("ben: {caught:?}");
    assert!(!caught.is_empty(), "the restarted node read the archive");
    for n in nodes.iter_mut() {
        n.stop();
    }
}
