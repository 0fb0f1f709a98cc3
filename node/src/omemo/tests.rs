//! Device-level tests: two Coterie devices talking, in both versions.

use minidom::Element;
use proptest::prelude::*;

use super::device::{Recipient, RemoteDevice, SessionSlot, encrypt};
use super::xml::{Bundle, EncryptedElement, devices_element, parse_devices};
use super::*;

struct Dev {
    jid: String,
    id: Identity,
    dev: OwnDevice,
    /// Sessions with the other device, per version.
    slots: std::collections::HashMap<Version, SessionSlot>,
}

impl Dev {
    fn new(seed: u8, jid: &str) -> Dev {
        Dev {
            jid: jid.into(),
            id: Identity::from_seed(&[seed; 32]),
            dev: OwnDevice::new(0, &mut rand::rngs::OsRng),
            slots: Default::default(),
        }
    }

    /// Our bundle as the other side receives it (through XML).
    fn bundle(&self, v: Version) -> Bundle {
        let el = self.dev.bundle(&self.id, v).to_element();
        let text = String::from(&el);
        Bundle::parse(&text.parse::<Element>().expect("xml")).expect("bundle")
    }

    fn send(&mut self, v: Version, to: &Dev, text: Option<&str>) -> Element {
        let slot = self.slots.entry(v).or_default();
        if slot.current.is_none() {
            slot.install(
                Session::initiate(&self.id, &to.bundle(v), &mut rand::rngs::OsRng)
                    .expect("initiate"),
            );
        }
        let session = slot.current.as_mut().expect("session");
        let mut r = [Recipient {
            jid: &to.jid,
            device_id: to.dev.device_id,
            session,
        }];
        encrypt(
            v,
            &self.id,
            self.dev.device_id,
            &mut r,
            text.map(str::as_bytes),
            &mut rand::rngs::OsRng,
        )
        .to_element()
    }

    fn recv(&mut self, from: &Dev, el: &Element) -> Result<Option<String>> {
        let text = String::from(el);
        let el = EncryptedElement::parse(&text.parse::<Element>().expect("xml"), 1 << 16)?;
        let v = el.version;
        let slot = self.slots.entry(v).or_default();
        let out = self.dev.decrypt(
            &self.id,
            &self.jid,
            RemoteDevice {
                identity: Some(from.id.mont_public()),
            },
            slot,
            &el,
            0,
            &mut rand::rngs::OsRng,
        )?;
        Ok(out.plaintext.map(|p| String::from_utf8(p).expect("utf8")))
    }
}

/// `rounds` messages each way, a first then b, each decrypting to its text.
fn converse(a: &mut Dev, b: &mut Dev, v: Version, rounds: usize) {
    for i in 0..rounds {
        let m = a.send(v, b, Some(&format!("a{i}")));
        assert_eq!(
            b.recv(a, &m).expect("a→b").as_deref(),
            Some(format!("a{i}").as_str())
        );
        let m = b.send(v, a, Some(&format!("b{i}")));
        assert_eq!(
            a.recv(b, &m).expect("b→a").as_deref(),
            Some(format!("b{i}").as_str())
        );
    }
}

fn pair() -> (Dev, Dev) {
    (Dev::new(1, "alice@a.onion"), Dev::new(2, "bob@b.onion"))
}

#[test]
fn first_message_then_conversation_in_both_versions() {
    for v in Version::ALL {
        let (mut a, mut b) = pair();
        let m = a.send(v, &b, Some("hello <bob> & ü"));
        assert_eq!(
            b.recv(&a, &m).expect("first").as_deref(),
            Some("hello <bob> & ü")
        );
        assert_eq!(
            b.dev.prekey_count(),
            device::PREKEY_TARGET - 1,
            "prekey used up"
        );
        converse(&mut b, &mut a, v, 10);
        // Empty key-transport messages decrypt to nothing.
        let m = a.send(v, &b, None);
        assert_eq!(b.recv(&a, &m).expect("empty"), None);
    }
}

#[test]
fn key_exchange_is_sent_until_answered_and_a_used_prekey_is_refused() {
    for v in Version::ALL {
        let (mut a, mut b) = pair();
        let m1 = a.send(v, &b, Some("1"));
        let m2 = a.send(v, &b, Some("2"));
        let kex = |m: &Element| EncryptedElement::parse(m, 1 << 16).expect("parse").keys[0].kex;
        assert!(kex(&m1) && kex(&m2));
        assert_eq!(b.recv(&a, &m2).expect("2").as_deref(), Some("2"));
        assert_eq!(b.recv(&a, &m1).expect("1").as_deref(), Some("1"));
        // Replays of either are refused, the session survives.
        assert_eq!(b.recv(&a, &m1), Err(OmemoError::Duplicate));
        let reply = b.send(v, &a, Some("ok"));
        assert!(!kex(&reply));
        assert_eq!(a.recv(&b, &reply).expect("reply").as_deref(), Some("ok"));
        let m3 = a.send(v, &b, Some("3"));
        assert!(
            !kex(&m3),
            "confirmed session stops sending the key exchange"
        );
        assert_eq!(b.recv(&a, &m3).expect("3").as_deref(), Some("3"));
        // A new session offering the same one-time prekey is refused.
        let mut b_lost = Dev {
            jid: b.jid.clone(),
            id: Identity::from_seed(&[2; 32]),
            dev: b.dev.clone(),
            slots: Default::default(),
        };
        assert!(matches!(
            b_lost.recv(&a, &m1),
            Err(OmemoError::UnknownPreKey(_))
        ));
    }
}

#[test]
fn forged_truncated_and_misaddressed_messages_are_refused_without_damage() {
    for v in Version::ALL {
        let (mut a, mut b) = pair();
        let m = a.send(v, &b, Some("x"));
        b.recv(&a, &m).expect("first");
        let good = a.send(v, &b, Some("good"));
        let parsed = EncryptedElement::parse(&good, 1 << 16).expect("parse");
        // Truncated key data.
        let mut t = parsed.clone();
        let half = t.keys[0].data.len() / 2;
        t.keys[0].data.truncate(half);
        assert!(b.recv(&a, &t.to_element()).is_err());
        // Flipped payload bit.
        let mut f = parsed.clone();
        if let Some(p) = f.payload.as_mut() {
            p[0] ^= 1;
        }
        assert_eq!(b.recv(&a, &f.to_element()), Err(OmemoError::PayloadAuth));
        // Not for us.
        let mut n = parsed.clone();
        n.keys[0].rid ^= 1;
        assert_eq!(b.recv(&a, &n.to_element()), Err(OmemoError::NotForUs));
        // From someone else's identity (a forged key exchange).
        let mut c = Dev::new(3, "mallory@m.onion");
        let forged = c.send(v, &b, Some("trust me"));
        assert_eq!(b.recv(&a, &forged), Err(OmemoError::IdentityMismatch));
        // The real message still decrypts afterwards.
        assert_eq!(b.recv(&a, &good).expect("good").as_deref(), Some("good"));
    }
}

#[test]
fn simultaneous_initiation_converges() {
    for v in Version::ALL {
        let (mut a, mut b) = pair();
        let from_a = a.send(v, &b, Some("from a"));
        let from_b = b.send(v, &a, Some("from b"));
        assert_eq!(
            b.recv(&a, &from_a).expect("b gets a").as_deref(),
            Some("from a")
        );
        assert_eq!(
            a.recv(&b, &from_b).expect("a gets b").as_deref(),
            Some("from b")
        );
        converse(&mut a, &mut b, v, 3);
    }
}

#[test]
fn a_lost_session_is_rebuilt_by_a_new_key_exchange() {
    for v in Version::ALL {
        let (mut a, mut b) = pair();
        let m = a.send(v, &b, Some("1"));
        b.recv(&a, &m).expect("1");
        let r = b.send(v, &a, Some("r"));
        a.recv(&b, &r).expect("r");
        // b loses its sessions: a's next message cannot be read...
        b.slots.clear();
        let m = a.send(v, &b, Some("2"));
        assert_eq!(b.recv(&a, &m), Err(OmemoError::NoSession));
        // ...so b starts a new session (an empty key-transport message)...
        let repair = b.send(v, &a, None);
        assert_eq!(a.recv(&b, &repair).expect("repair"), None);
        // ...and a, which adopted it, is understood again.
        let m = a.send(v, &b, Some("3"));
        assert_eq!(b.recv(&a, &m).expect("3").as_deref(), Some("3"));
    }
}

/// A first message (key exchange) from `a` to `b` built from `bundle`.
fn first_message(a: &Dev, b: &Dev, bundle: &Bundle) -> EncryptedElement {
    let mut s = Session::initiate(&a.id, bundle, &mut rand::rngs::OsRng).expect("initiate");
    let mut r = [Recipient {
        jid: &b.jid,
        device_id: b.dev.device_id,
        session: &mut s,
    }];
    encrypt(
        bundle.version,
        &a.id,
        a.dev.device_id,
        &mut r,
        Some(b"hi"),
        &mut rand::rngs::OsRng,
    )
}

#[test]
fn signed_prekey_rotation_keeps_the_previous_one() {
    let (a, mut b) = pair();
    let old_bundle = b.bundle(Version::V2);
    assert!(b.dev.maintain(device::SPK_ROTATION, &mut rand::rngs::OsRng));
    assert_ne!(b.dev.spk_id(), old_bundle.spk_id);
    // a still holds the old bundle: its key exchange is accepted.
    let m = first_message(&a, &b, &old_bundle);
    assert_eq!(
        b.recv(&a, &m.to_element()).expect("old spk").as_deref(),
        Some("hi")
    );
    // After a second rotation it is gone.
    b.dev
        .maintain(2 * device::SPK_ROTATION, &mut rand::rngs::OsRng);
    let m = first_message(&a, &b, &old_bundle);
    assert!(matches!(
        b.recv(&a, &m.to_element()),
        Err(OmemoError::UnknownSignedPreKey(_))
    ));
}

#[test]
fn bundles_and_device_lists_round_trip_and_broken_ones_are_refused() {
    let a = Dev::new(1, "a@a.onion");
    for v in Version::ALL {
        let b = a.dev.bundle(&a.id, v);
        assert_eq!(a.bundle(v), b);
        // A bundle whose signed prekey was swapped fails its signature.
        let mut broken = b.clone();
        broken.spk[0] ^= 1;
        assert_eq!(
            Bundle::parse(&broken.to_element()),
            Err(OmemoError::BadSignature)
        );
        let mut no_pk = b.clone();
        no_pk.prekeys.clear();
        assert_eq!(
            Bundle::parse(&no_pk.to_element()),
            Err(OmemoError::NoPreKeys)
        );
        let list = devices_element(v, &[5, 7, 5, 0]);
        assert_eq!(parse_devices(&list).expect("list"), (v, vec![5, 7]));
    }
}

proptest! {
    #[test]
    fn parsers_never_panic_on_arbitrary_key_data(data in proptest::collection::vec(any::<u8>(), 0..400), kex: bool, v2: bool) {
        let v = if v2 { Version::V2 } else { Version::V03 };
        let (mut a, mut b) = pair();
        let first = a.send(v, &b, Some("x"));
        b.recv(&a, &first).expect("first");
        let mut el = EncryptedElement::parse(&a.send(v, &b, Some("y")), 1 << 16).expect("parse");
        el.keys[0].data = data;
        el.keys[0].kex = kex;
        prop_assert!(b.recv(&a, &el.to_element()).is_err());
    }

    #[test]
    fn encrypted_elements_round_trip(sid in 1u32.., rids in proptest::collection::vec((1u32.., any::<bool>(), proptest::collection::vec(any::<u8>(), 0..100)), 0..5), payload in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)), v2: bool) {
        let v = if v2 { Version::V2 } else { Version::V03 };
        let el = EncryptedElement {
            version: v,
            sid,
            keys: rids.into_iter().map(|(rid, kex, data)| KeyElement { jid: v2.then(|| "x@y.onion".to_string()), rid, kex, data }).collect(),
            iv: (!v2).then(|| vec![7u8; 12]),
            payload,
        };
        let text = String::from(&el.to_element());
        let back = EncryptedElement::parse(&text.parse::<Element>().expect("xml"), 1 << 16).expect("parse");
        prop_assert_eq!(back, el);
    }

    #[test]
    fn bundle_parser_never_panics(ik in proptest::collection::vec(any::<u8>(), 0..40), spk in proptest::collection::vec(any::<u8>(), 0..40), sig in proptest::collection::vec(any::<u8>(), 0..70), id: u32, v2: bool) {
        let v = if v2 { Version::V2 } else { Version::V03 };
        let ns = v.ns();
        let b64 = |x: &[u8]| data_encoding::BASE64.encode(x);
        let xml = match v {
            Version::V2 => format!("<bundle xmlns='{ns}'><spk id='{id}'>{}</spk><spks>{}</spks><ik>{}</ik><prekeys><pk id='1'>{}</pk></prekeys></bundle>", b64(&spk), b64(&sig), b64(&ik), b64(&spk)),
            Version::V03 => format!("<bundle xmlns='{ns}'><signedPreKeyPublic signedPreKeyId='{id}'>{}</signedPreKeyPublic><signedPreKeySignature>{}</signedPreKeySignature><identityKey>{}</identityKey><prekeys><preKeyPublic preKeyId='1'>{}</preKeyPublic></prekeys></bundle>", b64(&spk), b64(&sig), b64(&ik), b64(&spk)),
        };
        let el: Element = xml.parse().expect("xml");
        prop_assert!(Bundle::parse(&el).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn ratchet_message_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        for v in Version::ALL {
            let _ = ratchet::Wire::parse(v, &data);
        }
    }

    #[test]
    fn envelopes_round_trip(body in "\\PC{0,200}", from in "[a-z0-9]{1,20}@[a-z0-9]{1,20}\\.onion") {
        prop_assume!(crate::stream::session::is_xml_text(&body));
        let e = sce::seal(&body, &from, &mut rand::rngs::OsRng);
        let back = sce::open(&e, &from).expect("open");
        // An empty body element reads back as empty text.
        prop_assert_eq!(back.unwrap_or_default(), body);
    }

    #[test]
    fn payloads_round_trip(pt in proptest::collection::vec(any::<u8>(), 0..2000), v2: bool) {
        let v = if v2 { Version::V2 } else { Version::V03 };
        let s = payload::seal(v, &pt, &mut rand::rngs::OsRng);
        prop_assert_eq!(payload::open(v, &s.key_material, &s.payload, s.iv.as_deref()).expect("open"), pt);
    }

    #[test]
    fn device_lists_round_trip(ids in proptest::collection::vec(1u32.., 0..80), v2: bool) {
        let v = if v2 { Version::V2 } else { Version::V03 };
        let mut want: Vec<u32> = Vec::new();
        for i in &ids {
            if !want.contains(i) && want.len() < xml::MAX_DEVICES {
                want.push(*i);
            }
        }
        let text = String::from(&devices_element(v, &ids));
        let back = parse_devices(&text.parse::<Element>().expect("xml")).expect("parse");
        prop_assert_eq!(back, (v, want));
    }

    #[test]
    fn bundles_round_trip(seed: [u8; 32], v2: bool) {
        let v = if v2 { Version::V2 } else { Version::V03 };
        let id = Identity::from_seed(&seed);
        let dev = OwnDevice::new(0, &mut rand::rngs::OsRng);
        let b = dev.bundle(&id, v);
        let text = String::from(&b.to_element());
        prop_assert_eq!(Bundle::parse(&text.parse::<Element>().expect("xml")).expect("parse"), b);
    }
}
