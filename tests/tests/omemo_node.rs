//! OMEMO through a running node, seen from a hand-written contact: what the
//! node sends is encrypted (no body on the wire), and bad OMEMO input gets a
//! clear record, closes nothing and loses no later message.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use coterie_tests::raw::{RawConn, RawPeer};
use coterie_tests::{running_pair, wait_for};
use minidom::Element;
use node::omemo::device::{Recipient, RemoteDevice, SessionSlot, encrypt};
use node::omemo::pep::{self, PepItem};
use node::omemo::xml::{Bundle, EncryptedElement};
use node::omemo::{Identity, OwnDevice, Session, Version, keys, sce};

/// Bytes from the node, kept across reads.
struct Rx {
    text: String,
}

impl Rx {
    async fn until(&mut self, conn: &mut RawConn, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.text.contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "no `{needle}` from the node; got: {}",
                self.text
            );
            let more = conn.read_until(needle, Duration::from_secs(2)).await;
            self.text.push_str(&more);
        }
    }

    /// Removes and returns the first complete `<tag …>…</tag>`.
    fn take(&mut self, tag: &str) -> Option<String> {
        let start = self.text.find(&format!("<{tag} "))?;
        let close = format!("</{tag}>");
        let end = self.text[start..].find(&close)? + start + close.len();
        let el = self.text[start..end].to_string();
        self.text.replace_range(start..end, "");
        Some(el)
    }
}

/// The next message from the node that carries an `<encrypted/>` element
/// (receipts are skipped).
async fn next_encrypted(rx: &mut Rx, conn: &mut RawConn) -> EncryptedElement {
    loop {
        if let Some(m) = rx.take("message") {
            assert!(!m.contains("<body"), "no plaintext body: {m}");
            let el: Element = m.parse().expect("message XML");
            if let Some(e) = el.children().find(|c| c.name() == "encrypted") {
                return EncryptedElement::parse(e, 1 << 16).expect("parse");
            }
            continue;
        }
        rx.until(conn, "</message>").await;
    }
}

fn stanza(id: &str, enc: &EncryptedElement) -> Vec<u8> {
    format!(
        "<message type='chat' id='{id}'>{}<request xmlns='urn:xmpp:receipts'/></message>",
        String::from(&enc.to_element())
    )
    .into_bytes()
}

fn enc_to(
    id: &Identity,
    sid: u32,
    to_jid: &str,
    to_dev: u32,
    session: &mut Session,
    from_jid: &str,
    text: &str,
) -> EncryptedElement {
    let pt = sce::seal(text, from_jid, &mut rand::rngs::OsRng);
    let mut r = [Recipient {
        jid: to_jid,
        device_id: to_dev,
        session,
    }];
    encrypt(
        Version::V2,
        id,
        sid,
        &mut r,
        Some(&pt),
        &mut rand::rngs::OsRng,
    )
}

/// One of the contact's devices, sending to the node's device.
struct DeviceOf<'a> {
    id: &'a Identity,
    device: u32,
    from_jid: &'a str,
    to_jid: &'a str,
    to_dev: u32,
}

impl DeviceOf<'_> {
    fn enc(&self, session: &mut Session, text: &str) -> EncryptedElement {
        enc_to(
            self.id,
            self.device,
            self.to_jid,
            self.to_dev,
            session,
            self.from_jid,
            text,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_encrypts_everything_and_survives_bad_omemo_input() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (alice, _bob) = running_pair(tmp.path());
    let alice_key = alice.key();
    let alice_jid = alice_key.onion_address();

    let evil = RawPeer::new();
    let evil_jid = evil.key.peer_id().onion_address();
    let id = Identity::from_seed(&evil.key.to_seed());
    let mut dev = OwnDevice::new(node::ops::now_secs(), &mut rand::rngs::OsRng);
    let (mut conn, status) = evil.redeem(&alice.invite(), alice.port).await;
    assert_eq!(status, 0, "invite accepted");
    let mut rx = Rx {
        text: conn.open_stream(&evil.key.peer_id(), 0).await,
    };

    // The node announces its devices and bundles in both versions.
    while rx.text.matches("</event>").count() < 4 {
        rx.until(&mut conn, "eu.siacs.conversations.axolotl.bundles:")
            .await;
        let more = conn.read_until("</event>", Duration::from_secs(2)).await;
        rx.text.push_str(&more);
    }
    let mut alice_bundle: Option<(u32, Bundle)> = None;
    let mut alice_bundle_03: Option<Bundle> = None;
    let mut versions = Vec::new();
    while let Some(ev) = rx.take("event") {
        let el: Element = ev.parse().expect("event XML");
        for item in pep::parse_event(&el).expect("valid announcement") {
            if let PepItem::Bundle(d, b, _) = item {
                assert_eq!(
                    keys::ed_to_mont(&b.ik),
                    keys::ed_to_mont(alice_key.as_bytes()),
                    "the bundle's identity is the pinned key"
                );
                versions.push(b.version);
                if b.version == Version::V03 {
                    alice_bundle_03 = Some(b.clone());
                }
                if b.version == Version::V2 {
                    alice_bundle = Some((d, b));
                }
            }
        }
    }
    versions.sort();
    assert_eq!(versions, vec![Version::V03, Version::V2]);
    let (alice_dev, alice_bundle) = alice_bundle.expect("OMEMO 2 bundle");

    // We announce ours; the node can now encrypt to us.
    for el in pep::announcements(&dev, &id) {
        conn.send(String::from(&el).as_bytes())
            .await
            .expect("announce");
    }
    alice.send("evil", "the plan <is> & stays secret");
    rx.until(&mut conn, "</message>").await;
    let msg = rx.take("message").expect("a message");
    assert!(
        !msg.contains("plan") && !msg.contains("<body"),
        "no plaintext on the stream: {msg}"
    );
    assert!(msg.contains("urn:xmpp:omemo:2"), "{msg}");
    let msg: Element = msg.parse().expect("message XML");
    let enc = msg
        .get_child("encrypted", "urn:xmpp:omemo:2")
        .expect("encrypted");
    let enc = EncryptedElement::parse(enc, 1 << 16).expect("parse");
    let mut slot = SessionSlot::default();
    let alice_mont = keys::ed_to_mont(alice_key.as_bytes()).expect("mont");
    // Decrypts what the node sent us.
    let from_alice = |dev: &mut OwnDevice, slot: &mut SessionSlot, el: &EncryptedElement| {
        let known = RemoteDevice {
            identity: Some(alice_mont),
        };
        dev.decrypt(&id, &evil_jid, known, slot, el, 0, &mut rand::rngs::OsRng)
    };
    let out = from_alice(&mut dev, &mut slot, &enc).expect("we decrypt the node's message");
    let body = sce::open(&out.plaintext.expect("payload"), &alice_jid).expect("envelope");
    assert_eq!(body.as_deref(), Some("the plan <is> & stays secret"));
    // The node used one of our one-time prekeys; like every OMEMO client we
    // republish our bundle without it (and refilled), so a later session the
    // node builds with us cannot pick the used one.
    assert_eq!(dev.prekey_count(), node::omemo::device::PREKEY_TARGET - 1);
    assert!(dev.maintain(node::ops::now_secs(), &mut rand::rngs::OsRng));
    for el in pep::announcements(&dev, &id) {
        conn.send(String::from(&el).as_bytes())
            .await
            .expect("announce");
    }
    let mut session = slot.current.clone().expect("session");
    let to = |id, device| DeviceOf {
        id,
        device,
        from_jid: &evil_jid,
        to_jid: &alice_jid,
        to_dev: alice_dev,
    };
    let as_evil = to(&id, dev.device_id);

    // Now the contact sends, good and bad.
    let good1 = as_evil.enc(&mut session, "hello alice");
    conn.send(&stanza("g1", &good1)).await.expect("send");
    // A replay of it under a new stanza id.
    conn.send(&stanza("replay", &good1)).await.expect("send");
    // Forged: payload altered.
    let mut forged = as_evil.enc(&mut session, "forged");
    if let Some(p) = forged.payload.as_mut() {
        p[3] ^= 0x40;
    }
    conn.send(&stanza("forged", &forged)).await.expect("send");
    // Truncated key.
    let mut truncated = as_evil.enc(&mut session, "truncated");
    truncated.keys[0].data.truncate(10);
    conn.send(&stanza("trunc", &truncated)).await.expect("send");
    // A device the contact never announced, with another identity key.
    let mut one_pk = alice_bundle.clone();
    one_pk.prekeys.truncate(1);
    let id2 = Identity::from_seed(&[0x42; 32]);
    let dev2 = OwnDevice::new(0, &mut rand::rngs::OsRng);
    let as_dev2 = to(&id2, dev2.device_id);
    let mut s2 = Session::initiate(&id2, &one_pk, &mut rand::rngs::OsRng).expect("initiate");
    let new_dev = as_dev2.enc(&mut s2, "from a new device");
    conn.send(&stanza("newdev", &new_dev)).await.expect("send");
    // A third identity reusing the same one-time prekey: refused.
    let id3 = Identity::from_seed(&[0x43; 32]);
    let as_dev3 = to(&id3, 777);
    let mut s3 = Session::initiate(&id3, &one_pk, &mut rand::rngs::OsRng).expect("initiate");
    let reuse = as_dev3.enc(&mut s3, "prekey reused");
    conn.send(&stanza("reuse", &reuse)).await.expect("send");
    let good2 = as_evil.enc(&mut session, "still here");
    conn.send(&stanza("g2", &good2)).await.expect("send");

    let hist = wait_for(
        "the contact's messages stored",
        Duration::from_secs(20),
        || {
            let h = alice.history("evil", 50);
            h.iter().any(|m| m["body"] == "still here").then_some(h)
        },
    );
    let incoming: Vec<&serde_json::Value> = hist.iter().filter(|m| m["dir"] == "in").collect();
    let bodies: Vec<&str> = incoming
        .iter()
        .map(|m| m["body"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        bodies.iter().filter(|b| **b == "hello alice").count(),
        1,
        "the replay is not stored twice: {hist:?}"
    );
    let failed: Vec<&str> = incoming
        .iter()
        .filter_map(|m| m["undecryptable"].as_str())
        .collect();
    assert_eq!(
        failed.len(),
        3,
        "forged, truncated and reused-prekey messages are recorded: {hist:?}"
    );
    assert!(
        failed.iter().any(|f| f.contains("payload authentication")),
        "{failed:?}"
    );
    assert!(failed.iter().any(|f| f.contains("prekey")), "{failed:?}");
    let new_dev_msg = incoming
        .iter()
        .find(|m| m["body"] == "from a new device")
        .expect("new device's message");
    assert_eq!(
        new_dev_msg["unverified"], true,
        "marked as from an unverified device"
    );
    let good = incoming
        .iter()
        .find(|m| m["body"] == "still here")
        .expect("later message");
    assert!(
        good.get("unverified").is_none(),
        "the pinned device's messages are not marked"
    );
    for m in &incoming {
        let b = m["body"].as_str().unwrap_or("");
        assert!(
            !b.contains("forged") && !b.contains("truncated") && !b.contains("reused"),
            "{m}"
        );
    }

    // The user sees both devices and verifies the new one.
    let fp = alice.cli(&["fingerprints", "evil"]);
    let v = fp.json.first().expect("fingerprints json");
    let devices = v["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 2, "{v}");
    let untrusted: Vec<&serde_json::Value> = devices
        .iter()
        .filter(|d| d["trust"] == "untrusted")
        .collect();
    assert_eq!(untrusted.len(), 1, "{v}");
    assert_eq!(untrusted[0]["device"], dev2.device_id);
    assert_eq!(
        untrusted[0]["fingerprint"],
        keys::fingerprint(&id2.ed_public())
    );
    assert!(
        devices
            .iter()
            .any(|d| d["trust"] == "pinned" && d["device"] == dev.device_id),
        "{v}"
    );
    let ver = alice.cli(&["verify", "evil", &dev2.device_id.to_string()]);
    assert_eq!(
        ver.json.first().expect("verify json")["trust"],
        "verified",
        "{}",
        ver.stderr
    );
    let bad = alice.cli(&["verify", "evil", "12345"]);
    assert_eq!(
        bad.code, 2,
        "an unknown device is a usage error: {}",
        bad.stderr
    );
    let msg = bad
        .json
        .first()
        .and_then(|j| j["error"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains("coterie fingerprints"),
        "the error says what to do: {msg}"
    );
    let after = as_dev2.enc(&mut s2, "verified now");
    conn.send(&stanza("ver", &after)).await.expect("send");
    let m = wait_for(
        "message from the verified device",
        Duration::from_secs(20),
        || {
            alice
                .history("evil", 50)
                .into_iter()
                .find(|m| m["body"] == "verified now")
        },
    );
    assert!(m.get("unverified").is_none(), "{m}");

    // A forged ratchet message (no session it belongs to, bad MAC): recorded,
    // and the working session is *not* replaced.
    let mut stray =
        Session::initiate(&id, &alice_bundle, &mut rand::rngs::OsRng).expect("initiate");
    stray.confirmed = true;
    let forged_mac = as_evil.enc(&mut stray, "forged ratchet");
    conn.send(&stanza("badmac", &forged_mac))
        .await
        .expect("send");
    // A message in a version the node has no session in (as if it had lost
    // it): the node rebuilds that session with an empty key-exchange message
    // (XEP-0384), which we adopt. It is the next encrypted message we get,
    // so the forged one above triggered nothing.
    let mut s03 = Session::initiate(
        &id,
        &alice_bundle_03.expect("0.3 bundle"),
        &mut rand::rngs::OsRng,
    )
    .expect("initiate 0.3");
    s03.confirmed = true;
    let mut r = [Recipient {
        jid: &alice_jid,
        device_id: alice_dev,
        session: &mut s03,
    }];
    let no_session = encrypt(
        Version::V03,
        &id,
        dev.device_id,
        &mut r,
        Some(b"no session"),
        &mut rand::rngs::OsRng,
    );
    conn.send(&stanza("nosession", &no_session))
        .await
        .expect("send");
    let repair = next_encrypted(&mut rx, &mut conn).await;
    assert_eq!(
        repair.version,
        Version::V03,
        "the repair is for the broken 0.3 session only"
    );
    assert!(
        repair.payload.is_none() && repair.keys.iter().all(|k| k.kex),
        "an empty key exchange: {repair:?}"
    );
    let mut slot03 = SessionSlot::default();
    let out = from_alice(&mut dev, &mut slot03, &repair).expect("we adopt the rebuilt session");
    assert!(out.new_session && out.plaintext.is_none());
    // The OMEMO 2 session still works.
    alice.send("evil", "after the repair");
    let next = next_encrypted(&mut rx, &mut conn).await;
    let out = from_alice(&mut dev, &mut slot, &next).expect("decrypts on the unchanged session");
    let body = sce::open(&out.plaintext.expect("payload"), &alice_jid).expect("envelope");
    assert_eq!(body.as_deref(), Some("after the repair"));
    let hist = alice.history("evil", 100);
    let failed = hist
        .iter()
        .filter(|m| m.get("undecryptable").is_some())
        .count();
    assert_eq!(
        failed, 5,
        "forged, truncated, reused prekey, bad MAC, no session: {hist:?}"
    );
}
