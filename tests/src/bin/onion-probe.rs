//! A stranger who knows a node's onion address: tries to open a stream to
//! its onion service with arti (never a TLS handshake) and prints what
//! happened as one JSON line. Run only against the private test network:
//! `onion-probe TOR_CONFIG WORK_DIR ONION_ADDRESS [--wrong-key]`.
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
    let settings = TorSettings {
        state_dir: work.join("state"),
        cache_dir: work.join("cache"),
        config_file: Some(config_file),
    };
    let config = load_config(&settings).expect("tor config");
    let me = SecretKey::generate();
    let tls = TlsContext::new(&me).expect("tls");
    let tor = Tor::start(config, &me, tls).expect("arti starts");
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
