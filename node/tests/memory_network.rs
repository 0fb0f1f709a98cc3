//! Several nodes in one process over the in-memory transport: invites,
//! redemption, chat both ways, receipts, offline queueing and restarts.

use std::time::Duration;

use coterie_node::runtime::{Node, NodeConfig};
use coterie_node::store::crypto::KdfParams;
use coterie_node::store::{DEFAULT_RETENTION_DAYS, Delivery, Profile, Store};
use discovery::MemoryDiscovery;
use transport::memory::MemoryNetwork;

fn kdf() -> KdfParams {
    KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
        salt: "000102030405060708090a0b0c0d0e0f".into(),
    }
}

fn create(dir: &std::path::Path, name: &str) {
    let p = Profile {
        name: name.into(),
        seed: rand::random(),
        created: 0,
        retention_days: DEFAULT_RETENTION_DAYS,
        last_addrs: vec![],
        bridge: None,
        settings: Default::default(),
    };
    Store::create(dir, "pw", &p, kdf()).expect("create");
}

async fn start(dir: &std::path::Path, net: &MemoryNetwork, name: &str) -> Node {
    start_with(dir, net, name, None).await
}

async fn start_with(
    dir: &std::path::Path,
    net: &MemoryNetwork,
    name: &str,
    d: Option<MemoryDiscovery>,
) -> Node {
    let mut store = None;
    for _ in 0..100 {
        match Store::open(dir, "pw") {
            Ok(s) => {
                store = Some(s);
                break;
            }
            Err(coterie_node::store::OpenStoreError::InUse(_)) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    let discovery = d.map(|d| std::sync::Arc::new(d) as std::sync::Arc<dyn discovery::Discovery>);
    let cfg = NodeConfig {
        memory: Some((net.clone(), name.into())),
        discovery,
        ..Default::default()
    };
    Node::start(store.expect("store released"), cfg)
        .await
        .expect("start")
}

async fn wait_for<F: Fn() -> bool>(what: &str, f: F) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn states(node: &Node, contact: &str) -> Vec<(String, Delivery)> {
    let c = coterie_node::ops::find_contact(node.store(), contact).expect("contact");
    node.store()
        .history(c.id, 1000)
        .expect("history")
        .into_iter()
        .map(|m| (m.body, m.state))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_add_chat_both_ways_and_queue_while_offline() {
    let tmp = tempfile::tempdir().expect("tmp");
    let net = MemoryNetwork::new();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    create(&da, "alice");
    create(&db, "bob");
    let a = start(&da, &net, "alice").await;
    let b = start(&db, &net, "bob").await;

    let uri = a.invite("1h").await.expect("invite");
    b.add(&uri, None).await.expect("add");
    wait_for("redemption", || {
        a.store().contacts().map(|c| c.len() == 1).unwrap_or(false)
    })
    .await;
    wait_for("session", || {
        a.status().peers.len() == 1 && b.status().peers.len() == 1
    })
    .await;

    b.send("alice", "hello alice").await.expect("send");
    a.send("bob", "hello bob").await.expect("send");
    wait_for("delivery both ways", || {
        states(&a, "bob").contains(&("hello bob".into(), Delivery::Delivered))
            && states(&b, "alice").contains(&("hello alice".into(), Delivery::Delivered))
    })
    .await;
    assert!(states(&a, "bob").contains(&("hello alice".into(), Delivery::Received)));

    // Bob goes offline; Alice queues; Bob comes back and gets it once.
    b.shutdown().await;
    a.send("bob", "while you were away").await.expect("send");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(states(&a, "bob").contains(&("while you were away".into(), Delivery::Queued)));
    let b = start(&db, &net, "bob").await;
    wait_for("queued message delivered", || {
        states(&a, "bob").contains(&("while you were away".into(), Delivery::Delivered))
    })
    .await;
    let got: Vec<_> = states(&b, "alice")
        .into_iter()
        .filter(|(t, _)| t == "while you were away")
        .collect();
    assert_eq!(got.len(), 1, "exactly once");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_works_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let net = MemoryNetwork::new();
    for n in ["a", "b", "c"] {
        create(&tmp.path().join(n), n);
    }
    let a = start(&tmp.path().join("a"), &net, "a").await;
    let b = start(&tmp.path().join("b"), &net, "b").await;
    let c = start(&tmp.path().join("c"), &net, "c").await;
    let uri = a.invite("1h").await.expect("invite");
    b.add(&uri, Some("inviter")).await.expect("add");
    wait_for("b redeemed", || {
        a.store().contacts().map(|c| c.len() == 1).unwrap_or(false)
    })
    .await;
    c.add(&uri, Some("inviter"))
        .await
        .expect("add stores it; redemption is refused later");
    wait_for("c refused", || {
        c.store()
            .contacts()
            .map(|cs| {
                cs.iter()
                    .any(|x| matches!(x.state, coterie_node::store::ContactState::Refused { .. }))
            })
            .unwrap_or(false)
    })
    .await;
    assert_eq!(a.store().contacts().expect("contacts").len(), 1);
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_finds_contacts_whose_addresses_changed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let net = MemoryNetwork::new();
    let dir = MemoryDiscovery::new();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    create(&da, "alice");
    create(&db, "bob");
    let a = start_with(&da, &net, "alice", Some(dir.clone())).await;
    let b = start_with(&db, &net, "bob", Some(dir.clone())).await;
    let uri = a.invite("1h").await.expect("invite");
    b.add(&uri, None).await.expect("add");
    wait_for("session", || a.status().peers.len() == 1).await;
    a.shutdown().await;
    b.shutdown().await;
    // Both come back at new addresses: what each stored about the other is stale.
    let a = start_with(&da, &net, "alice-moved", Some(dir.clone())).await;
    a.send("bob", "found you").await.expect("send");
    let b = start_with(&db, &net, "bob-moved", Some(dir.clone())).await;
    wait_for("delivery through discovered addresses", || {
        states(&a, "bob").contains(&("found you".into(), Delivery::Delivered))
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_strong_jitter_and_padding_messages_arrive_once_in_order_and_not_at_once() {
    use coterie_node::settings::{Jitter, Padding};
    let tmp = tempfile::tempdir().expect("tmp");
    let net = MemoryNetwork::new();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    create(&da, "alice");
    create(&db, "bob");
    // Alice chose the strongest settings in the app.
    {
        let s = Store::open(&da, "pw").expect("open");
        let mut p = s.profile().expect("profile");
        p.settings.jitter = Jitter::Strong;
        p.settings.padding = Padding::Strong;
        s.set_profile(&p).expect("settings");
    }
    let a = start(&da, &net, "alice").await;
    let b = start(&db, &net, "bob").await;
    let uri = b.invite("1h").await.expect("invite");
    a.add(&uri, None).await.expect("add");
    wait_for("session", || {
        a.status().peers.len() == 1 && b.status().peers.len() == 1
    })
    .await;
    // Many sends in a row: each may wait up to 1.5 s, the order holds.
    let mut firsts = Vec::new();
    for round in 0..3 {
        let t = std::time::Instant::now();
        let body = format!("r{round}");
        a.send("bob", &body).await.expect("send");
        wait_for("delivery", || {
            states(&b, "alice").iter().any(|(m, _)| *m == body)
        })
        .await;
        firsts.push(t.elapsed());
    }
    for i in 0..20 {
        a.send("bob", &format!("m{i:02}")).await.expect("send");
    }
    wait_for("all 20", || states(&b, "alice").len() == 23).await;
    let got: Vec<String> = states(&b, "alice").into_iter().map(|(m, _)| m).collect();
    let want: Vec<String> = ["r0", "r1", "r2"]
        .into_iter()
        .map(String::from)
        .chain((0..20).map(|i| format!("m{i:02}")))
        .collect();
    assert_eq!(got, want, "every message once, in order");
    // The jitter is at most 1.5 s a send; the in-memory path takes
    // milliseconds, so three sends that all left at once would be chance.
    assert!(
        firsts.iter().all(|d| *d < Duration::from_secs(5)),
        "{firsts:?}"
    );
    assert!(
        firsts.iter().any(|d| *d >= Duration::from_millis(20)),
        "no send was held back: {firsts:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}
