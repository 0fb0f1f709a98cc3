//! A stranger who knows a node's onion address: tries to open a stream to
//! its onion service with arti (never a TLS handshake) and prints what
//! happened as one JSON line. Run only against the private test network:
//! `onion-probe TOR_CONFIG WORK_DIR ONION_ADDRESS [--wrong-key | --invite URI]`.
//!
//! With `--invite URI` the probe holds an open invite's discovery key, so
//! it reaches the service, and then tries the TLS handshake as a stranger
//! (its own random key, a gate ticket for that key): it prints
//! `{"ok": false, "kind": "Handshake", …}` when the node refuses it.
//!
//! Keeps trying while the failure is one a fresh descriptor could cure
//! (not yet published, no circuit), up to 90 s, so the result says what a
//! stranger gets from a published descriptor:
//! `{"ok": false, "kind": "OnionServiceMissingClientAuth", "error": "…"}`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arti_client::HasKind as _;
use serde_json::json;
use transport::onion::{DiscoveryKeys, ONION_PORT, Tor, TorSettings, load_config};
use transport::{PeerId, SecretKey, TlsContext};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: onion-probe TOR_CONFIG WORK_DIR ONION_ADDRESS [--wrong-key]";
    let config_file = PathBuf::from(args.get(1).expect(usage));
    let work = PathBuf::from(args.get(2).expect(usage));
    let target = PeerId::from_onion(args.get(3).expect(usage)).expect("an onion address");
    let wrong_key = args.iter().any(|a| a == "--wrong-key");
    let invite = args
        .iter()
        .position(|a| a == "--invite")
        .and_then(|i| args.get(i + 1))
        .map(|u| node::invite::Invite::parse(u, 0).expect("an invite link"));
    let settings = TorSettings {
        state_dir: work.join("state"),
        cache_dir: work.join("cache"),
        config_file: Some(config_file),
    };
    let config = load_config(&settings).expect("tor config");
    let me = SecretKey::generate();
    let tls = TlsContext::new(&me).expect("tls");
    let tor = Tor::start(config, &me, tls).expect("arti starts");
    if let Some(inv) = &invite {
        tor.set_discovery_keys(&[(target, DiscoveryKeys::for_invite(&inv.secret))]);
        let gate = transport::GateKey::for_pair(&me, &target).expect("gate key");
        let addr = transport::PeerAddr::Onion(target, ONION_PORT);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let r = transport::Transport::dial(&tor.transport(), &addr, target, &gate).await;
            let (kind, error) = match r {
                Ok(_) => {
                    println!("{}", json!({"ok": true}));
                    return;
                }
                Err(transport::DialError::Handshake(e)) => ("Handshake", e),
                Err(e) => ("Unreachable", e.to_string()),
            };
            if kind == "Handshake" || Instant::now() > deadline {
                println!("{}", json!({"ok": false, "kind": kind, "error": error}));
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    if wrong_key {
        // A key the service never authorized: what a removed contact holds.
        let k = DiscoveryKeys::for_invite(&rand::random());
        tor.set_discovery_keys(&[(target, k)]);
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(30),
            tor.connect_raw(&target, ONION_PORT),
        )
        .await;
        let (kind, error) = match attempt {
            Ok(Ok(_stream)) => {
                println!("{}", json!({"ok": true}));
                return;
            }
            Ok(Err(e)) => (format!("{:?}", e.kind()), e.to_string()),
            Err(_) => ("Timeout".to_string(), "no answer in 30 s".to_string()),
        };
        let settled = kind.contains("ClientAuth");
        if settled || Instant::now() > deadline {
            println!(
                "{}",
                json!({"ok": false, "kind": kind, "error": error, "bootstrap": tor.status().bootstrap_percent})
            );
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
