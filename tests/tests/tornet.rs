//! The private Tor network harness (`coterie_tests::tornet`) on its own:
//! it comes up with every router usable, writes an arti config that
//! parses, survives a relay restart, and leaves no process or namespace
//! behind (root only: CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use coterie_tests::tornet::TorNet;

fn namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_private_tor_network_comes_up() {
    let t0 = Instant::now();
    let mut net = TorNet::start();
    eprintln!(
        "tor network ready in {:?} after start ({:?} in all, with keys)",
        net.ready_after(),
        t0.elapsed()
    );
    let ns = net.ns().to_string();
    assert!(ns.starts_with("ctor"), "unexpected namespace name {ns}");
    assert!(namespaces().contains(&ns), "namespace {ns} is not listed");
    assert_eq!(net.ip(), std::net::Ipv4Addr::LOCALHOST);
    assert_eq!(net.time_period().as_secs(), 24 * 20);

    // Every authority and relay is in the consensus as a usable HSDir.
    let flags = net.consensus_flags();
    assert_eq!(net.router_count(), 8);
    assert_eq!(net.relay_count(), 5);
    assert_eq!(flags.len(), net.router_count(), "consensus: {flags:?}");
    for nick in net.nicknames() {
        let f = flags
            .get(nick)
            .unwrap_or_else(|| panic!("{nick} is not in the consensus: {flags:?}"));
        for want in ["HSDir", "Stable", "Running", "Valid"] {
            assert!(f.contains(want), "{nick} lacks {want}: {f:?}");
        }
        // Every router but the exit is a guard.
        assert_eq!(f.contains("Guard"), !f.contains("Exit"), "{nick}: {f:?}");
    }
    assert_eq!(
        flags.values().filter(|f| f.contains("Exit")).count(),
        1,
        "exactly one exit: {flags:?}"
    );

    // The arti config parses and says what a node needs.
    let text = std::fs::read_to_string(net.arti_config()).expect("arti config");
    let cfg: toml::Table = toml::from_str(&text).expect("arti config is valid TOML");
    let tor_network = cfg["tor_network"].as_table().expect("[tor_network]");
    let fallbacks = tor_network["fallback_caches"]
        .as_array()
        .expect("fallback_caches");
    assert_eq!(fallbacks.len(), 3);
    for fb in fallbacks {
        let rsa = fb["rsa_identity"].as_str().expect("rsa_identity");
        assert!(rsa.len() == 40 && rsa.chars().all(|c| c.is_ascii_hexdigit()));
        let ed = fb["ed_identity"].as_str().expect("ed_identity");
        assert_eq!(ed.len(), 43, "unpadded base64 of 32 bytes: {ed}");
        let orports = fb["orports"].as_array().expect("orports");
        assert_eq!(orports.len(), 1);
        assert!(
            orports[0]
                .as_str()
                .expect("orport")
                .starts_with("127.0.0.1:")
        );
    }
    let v3idents = tor_network["authorities"]["v3idents"]
        .as_array()
        .expect("authorities.v3idents");
    assert_eq!(v3idents.len(), 3);
    assert_eq!(
        cfg["path_rules"]["ipv4_subnet_family_prefix"].as_integer(),
        Some(33)
    );
    assert_eq!(
        cfg["path_rules"]["ipv6_subnet_family_prefix"].as_integer(),
        Some(129)
    );
    assert_eq!(
        cfg["override_net_params"]["hsdir_interval"].as_integer(),
        Some(8)
    );
    assert!(
        !cfg.contains_key("storage"),
        "no [storage] in the arti config"
    );

    // A relay can be killed and brought back.
    let pids_before = net.pids();
    net.kill_relay(0);
    assert_eq!(net.pids().len(), pids_before.len() - 1);
    let t1 = Instant::now();
    net.restart_relay(0);
    eprintln!("relay 0 bootstrapped again in {:?}", t1.elapsed());
    assert_eq!(net.pids().len(), pids_before.len());

    let pids = net.pids();
    let dir = net.dir().to_path_buf();
    drop(net);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "tor process {pid} still runs after the network dropped"
        );
    }
    assert!(!namespaces().contains(&ns), "namespace {ns} is left behind");
    assert!(!dir.exists(), "{} is left behind", dir.display());
}
