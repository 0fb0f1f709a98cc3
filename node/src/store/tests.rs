use super::*;
use crate::store::crypto::KdfParams;

fn fast_kdf() -> KdfParams {
    KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
        salt: "000102030405060708090a0b0c0d0e0f".into(),
    }
}

fn profile() -> Profile {
    Profile {
        name: "alice".into(),
        seed: [7; 32],
        created: 1,
        retention_days: DEFAULT_RETENTION_DAYS,
        last_addrs: vec![],
        bridge: None,
        settings: Default::default(),
    }
}

fn contact(peer: u8) -> Contact {
    Contact {
        id: 0,
        name: format!("friend{peer}"),
        peer: [peer; 32],
        addrs: vec![],
        state: ContactState::Active,
        added: 1,
        last_seen: None,
        last_carrier: None,
    }
}

fn new_store() -> (tempfile::TempDir, Store) {
    let d = tempfile::tempdir().expect("tempdir");
    let s = Store::create(&d.path().join("p"), "pw", &profile(), fast_kdf()).expect("create");
    (d, s)
}

#[test]
fn wrong_passphrase_is_a_clear_error_and_leaves_the_store_intact() {
    let (d, s) = new_store();
    let c = s.add_contact(contact(1)).expect("add");
    s.queue_outgoing(c, "hello", 5).expect("queue");
    drop(s);
    let dir = d.path().join("p");
    assert!(matches!(
        Store::open(&dir, "nope"),
        Err(OpenStoreError::WrongPassphrase(_))
    ));
    let s = Store::open(&dir, "pw").expect("reopen");
    assert_eq!(s.history(c, 10).expect("history")[0].body, "hello");
}

#[test]
fn create_refuses_to_overwrite_and_open_needs_a_profile() {
    let (d, s) = new_store();
    drop(s);
    let dir = d.path().join("p");
    assert!(matches!(
        Store::create(&dir, "pw", &profile(), fast_kdf()),
        Err(OpenStoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        Store::open(&d.path().join("q"), "pw"),
        Err(OpenStoreError::NoProfile(_))
    ));
}

#[test]
fn second_open_while_in_use_is_reported() {
    let (d, _s) = new_store();
    assert!(matches!(
        Store::open(&d.path().join("p"), "pw"),
        Err(OpenStoreError::InUse(_))
    ));
}

#[test]
fn one_key_is_one_contact() {
    let (_d, s) = new_store();
    s.add_contact(contact(1)).expect("add");
    assert!(s.add_contact(contact(1)).is_err());
    assert_eq!(s.contacts().expect("list").len(), 1);
}

#[test]
fn removing_a_contact_removes_everything_kept_for_it_and_nothing_else() {
    let (_d, s) = new_store();
    let a = s.add_contact(contact(1)).expect("add a");
    let b = s.add_contact(contact(2)).expect("add b");
    for c in [a, b] {
        s.queue_outgoing(c, "queued", 5).expect("queue");
        s.queue_outgoing(c, "another", 6).expect("queue");
    }
    assert!(s.remove_contact(b).expect("remove"));
    assert!(!s.remove_contact(b).expect("again"), "already gone");
    assert!(s.contact(b).expect("read").is_none());
    assert!(s.history(b, 10).expect("history").is_empty());
    assert_eq!(s.outbox_len(b).expect("outbox"), 0);
    assert_eq!(
        s.history(a, 10).expect("history").len(),
        2,
        "a is untouched"
    );
    assert_eq!(s.outbox_len(a).expect("outbox"), 2);
    // The key can be a contact again, starting from nothing.
    let b2 = s.add_contact(contact(2)).expect("re-add");
    assert!(s.history(b2, 10).expect("history").is_empty());
    assert_eq!(s.outbox_len(b2).expect("outbox"), 0);
}

#[test]
fn outgoing_messages_go_queued_sent_delivered() {
    let (_d, s) = new_store();
    let c = s.add_contact(contact(1)).expect("add");
    let m1 = s.queue_outgoing(c, "one", 10).expect("q");
    let m2 = s.queue_outgoing(c, "two", 11).expect("q");
    assert_eq!(s.outbox_after(c, 0, usize::MAX).expect("outbox").len(), 2);
    assert_eq!(s.ack_outgoing(c, 1).expect("ack"), vec![m1.seq]);
    assert_eq!(s.outbox_after(c, 0, usize::MAX).expect("outbox").len(), 1);
    // A stale ack changes nothing.
    assert!(s.ack_outgoing(c, 1).expect("ack").is_empty());
    let r = s
        .receive(
            c,
            &[Incoming::Receipt {
                of: m1.stanza_id.clone(),
            }],
            12,
        )
        .expect("recv");
    assert_eq!(r.delivered, vec![m1.seq]);
    assert_eq!(r.h, 1);
    let h = s.history(c, 10).expect("history");
    assert_eq!(
        h.iter().map(|m| m.state).collect::<Vec<_>>(),
        vec![Delivery::Delivered, Delivery::Queued]
    );
    assert_eq!(h[1].seq, m2.seq);
}

#[test]
fn a_forged_receipt_changes_nothing() {
    let (_d, s) = new_store();
    let c = s.add_contact(contact(1)).expect("add");
    let m = s.queue_outgoing(c, "one", 10).expect("q");
    let forged = format!("m{}.deadbeef", m.seq);
    let r = s
        .receive(
            c,
            &[
                Incoming::Receipt { of: forged },
                Incoming::Receipt {
                    of: "garbage".into(),
                },
            ],
            12,
        )
        .expect("recv");
    assert!(r.delivered.is_empty());
    assert_eq!(r.h, 2, "every stanza counts for XEP-0198");
}

#[test]
fn incoming_messages_are_stored_with_receipts_queued_atomically() {
    let (_d, s) = new_store();
    let c = s.add_contact(contact(1)).expect("add");
    let items = vec![
        Incoming::Chat {
            id: "a".into(),
            body: "hi".into(),
            wants_receipt: true,
        },
        Incoming::Other,
        Incoming::Chat {
            id: "b".into(),
            body: "there".into(),
            wants_receipt: false,
        },
    ];
    let r = s.receive(c, &items, 3).expect("recv");
    assert_eq!(r.h, 3);
    assert_eq!(r.new_messages.len(), 2);
    let out = s.outbox_after(c, 0, usize::MAX).expect("outbox");
    assert_eq!(out.len(), 1);
    assert!(matches!(&out[0].1, OutStanza::Receipt { of, .. } if of == "a"));
    assert_eq!(s.peer_state(c).expect("st").in_h, 3);
}

#[test]
fn history_pages_the_latest_messages_in_order() {
    let (_d, s) = new_store();
    let c = s.add_contact(contact(1)).expect("add");
    for i in 0..20 {
        s.queue_outgoing(c, &format!("m{i}"), i).expect("q");
    }
    let h = s.history(c, 5).expect("history");
    assert_eq!(
        h.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        vec!["m15", "m16", "m17", "m18", "m19"]
    );
    // Earlier pages, as the app scrolls back: no gap, no overlap, and
    // another contact's messages never show.
    let other = s.add_contact(contact(2)).expect("add");
    s.queue_outgoing(other, "not bob's", 99).expect("q");
    let mut before = h[0].seq;
    let mut all: Vec<String> = h.iter().map(|m| m.body.clone()).collect();
    loop {
        let page = crate::ops::page(&s, c, Some(before), 6).expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.windows(2).all(|w| w[0].seq < w[1].seq));
        before = page[0].seq;
        let mut bodies: Vec<String> = page.iter().map(|m| m.body.clone()).collect();
        bodies.append(&mut all);
        all = bodies;
    }
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(all, want);
    assert!(
        crate::ops::page(&s, 999, None, 5).is_err(),
        "an unknown contact is an error"
    );
}

#[test]
fn a_group_link_takes_as_many_people_as_it_says_and_names_its_group() {
    let (_d, s) = new_store();
    s.add_invite(&IssuedInvite {
        invite_id: [5; 16],
        secret: [6; 32],
        expires: 100,
        used: false,
        redeemed_by: None,
        group: Some("ab".repeat(32)),
        uses_left: Some(2),
        redeemers: Vec::new(),
    })
    .expect("add");
    let ok = |sec: &[u8; 32]| sec == &[6; 32];
    let first = s.redeem_invite(&[5; 16], 50, ok, contact(3)).expect("db");
    assert!(first.is_ok(), "{first:?}");
    // The same person again (a retry) is not a second use.
    let again = s.redeem_invite(&[5; 16], 50, ok, contact(3)).expect("db");
    assert!(again.is_ok(), "{again:?}");
    assert!(!s.open_invite_secrets(50).expect("open").is_empty());
    assert!(
        s.redeem_invite(&[5; 16], 50, ok, contact(4))
            .expect("db")
            .is_ok()
    );
    assert_eq!(
        s.redeem_invite(&[5; 16], 50, ok, contact(5))
            .expect("db")
            .err(),
        Some(RedeemError::Used)
    );
    assert!(s.open_invite_secrets(50).expect("open").is_empty());
    assert_eq!(s.invite_group(&[5; 16]).expect("db"), Some("ab".repeat(32)));
    assert_eq!(s.invite_group(&[7; 16]).expect("db"), None);
}

#[test]
fn invites_are_single_use_and_expire() {
    let (_d, s) = new_store();
    let inv = IssuedInvite {
        invite_id: [1; 16],
        secret: [2; 32],
        expires: 100,
        used: false,
        redeemed_by: None,
        group: None,
        uses_left: None,
        redeemers: Vec::new(),
    };
    s.add_invite(&inv).expect("add");
    assert!(!s.open_invite_secrets(50).expect("open").is_empty());
    assert!(s.open_invite_secrets(100).expect("open").is_empty());
    let ok = |sec: &[u8; 32]| sec == &[2; 32];
    assert_eq!(
        s.redeem_invite(&[9; 16], 50, ok, contact(3))
            .expect("r")
            .err(),
        Some(RedeemError::Unknown)
    );
    assert_eq!(
        s.redeem_invite(&[1; 16], 50, |_| false, contact(3))
            .expect("r")
            .err(),
        Some(RedeemError::BadProof)
    );
    assert_eq!(
        s.redeem_invite(&[1; 16], 150, ok, contact(3))
            .expect("r")
            .err(),
        Some(RedeemError::Expired)
    );
    let c = s
        .redeem_invite(&[1; 16], 50, ok, contact(3))
        .expect("r")
        .expect("redeemed");
    assert_eq!(s.contact(c.id).expect("c").map(|c| c.peer), Some([3; 32]));
    assert_eq!(
        s.redeem_invite(&[1; 16], 50, ok, contact(4))
            .expect("r")
            .err(),
        Some(RedeemError::Used)
    );
    assert!(s.open_invite_secrets(50).expect("open").is_empty());
}

#[test]
fn retention_deletes_old_messages_but_never_queued_ones() {
    let (_d, s) = new_store();
    let c = s.add_contact(contact(1)).expect("add");
    let day = 86_400_000u64;
    let old_queued = s.queue_outgoing(c, "old queued", day).expect("q");
    s.receive(
        c,
        &[Incoming::Chat {
            id: "x".into(),
            body: "old".into(),
            wants_receipt: false,
        }],
        2 * day,
    )
    .expect("r");
    s.receive(
        c,
        &[Incoming::Chat {
            id: "y".into(),
            body: "new".into(),
            wants_receipt: false,
        }],
        40 * day,
    )
    .expect("r");
    assert_eq!(s.apply_retention(41 * day).expect("retention"), 1);
    let bodies: Vec<String> = s
        .history(c, 10)
        .expect("h")
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(bodies, vec!["old queued".to_string(), "new".to_string()]);
    assert_eq!(old_queued.seq, 1);
}

#[test]
fn nothing_identifying_is_on_disk_in_plaintext() {
    let (d, s) = new_store();
    let mut ct = contact(0x41);
    ct.name = "Zebediah-Contactname".into();
    ct.addrs = vec!["tcp:127.0.0.1:49999".into()];
    let c = s.add_contact(ct).expect("add");
    s.queue_outgoing(c, "SECRET-BODY-MARKER", 1).expect("q");
    s.add_invite(&IssuedInvite {
        invite_id: [0x42; 16],
        secret: [0x43; 32],
        expires: 10,
        used: false,
        redeemed_by: None,
        group: None,
        uses_left: None,
        redeemers: Vec::new(),
    })
    .expect("inv");
    drop(s);
    let bytes = std::fs::read(d.path().join("p").join(STORE_FILE)).expect("read");
    for needle in [
        &b"SECRET-BODY-MARKER"[..],
        b"Zebediah",
        b"alice",
        b"127.0.0.1",
        &[0x41; 32],
        &[0x42; 16],
        &[0x43; 32],
        &[7; 32],
    ] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "found {:?} on disk",
            String::from_utf8_lossy(needle)
        );
    }
}

#[test]
fn wipe_removes_the_profile() {
    let (d, s) = new_store();
    drop(s);
    let dir = d.path().join("p");
    wipe(&dir).expect("wipe");
    assert!(!dir.exists());
    assert!(matches!(
        Store::open(&dir, "pw"),
        Err(OpenStoreError::NoProfile(_))
    ));
}

mod omemo_state {
    use std::sync::Arc;

    use super::*;
    use crate::omemo::pep::PepItem;
    use crate::omemo::{Identity, OwnDevice, Session, Version};

    /// A contact whose device identity is `seed`'s key, pinned or not.
    fn setup(pinned_seed: u8) -> (tempfile::TempDir, Store, u64, OmemoCtx) {
        let (d, s) = new_store();
        let peer = Identity::from_seed(&[pinned_seed; 32]);
        let mut c = contact(1);
        c.peer = peer.ed_public();
        let id = s.add_contact(c).expect("add");
        let own = s.omemo_device(0).expect("own device");
        let ctx = OmemoCtx {
            identity: Arc::new(Identity::from_seed(&profile().seed)),
            own_jid: "me.onion".into(),
            peer_jid: "them.onion".into(),
            pinned: peer.ed_public(),
            device_id: own.device_id,
            own_row: crate::store::omemo::OWN_DEVICE_ROW,
        };
        (d, s, id, ctx)
    }

    fn bundles(seed: u8, versions: &[Version]) -> Vec<PepItem> {
        let id = Identity::from_seed(&[seed; 32]);
        let dev = OwnDevice::new(0, &mut rand::rngs::OsRng);
        versions
            .iter()
            .map(|v| {
                let b = dev.bundle(&id, *v);
                let xml = String::from(&b.to_element());
                PepItem::Bundle(dev.device_id, b, xml)
            })
            .collect()
    }

    fn namespace_sent(s: &Store, c: u64, ctx: &OmemoCtx) -> Option<String> {
        let out = s.outbox_encrypted(c, 0, 10, ctx).expect("outbox");
        out.items.iter().find_map(|(_, st)| match st {
            OutStanza::Chat { omemo: Some(x), .. } => {
                let el: minidom::Element = x.parse().expect("xml");
                Some(el.ns())
            }
            _ => None,
        })
    }

    #[test]
    fn omemo_2_when_the_device_speaks_it_else_0_3() {
        let (_d, s, c, ctx) = setup(9);
        s.queue_outgoing(c, "hello", 1).expect("q");
        let l = s
            .omemo_learn(c, ctx.pinned, bundles(9, &[Version::V03]), 0)
            .expect("learn");
        assert!(l.can_send && l.new_untrusted.is_empty());
        assert_eq!(
            namespace_sent(&s, c, &ctx).as_deref(),
            Some(crate::omemo::NS_V03)
        );

        let (_d, s, c, ctx) = setup(9);
        s.queue_outgoing(c, "hello", 1).expect("q");
        s.omemo_learn(c, ctx.pinned, bundles(9, &Version::ALL), 0)
            .expect("learn");
        assert_eq!(
            namespace_sent(&s, c, &ctx).as_deref(),
            Some(crate::omemo::NS_V2)
        );
        // The ciphertext is kept: asking again gives the same bytes.
        let a = s.outbox_encrypted(c, 0, 10, &ctx).expect("outbox");
        let b = s.outbox_encrypted(c, 0, 10, &ctx).expect("outbox");
        assert_eq!(a.items.len(), b.items.len());
        match (&a.items[0].1, &b.items[0].1) {
            (OutStanza::Chat { omemo: Some(x), .. }, OutStanza::Chat { omemo: Some(y), .. }) => {
                assert_eq!(x, y)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_chat_waits_until_a_trusted_device_has_a_bundle() {
        let (_d, s, c, ctx) = setup(9);
        s.queue_outgoing(c, "hello", 1).expect("q");
        let out = s.outbox_encrypted(c, 0, 10, &ctx).expect("outbox");
        assert!(out.waiting && out.items.is_empty(), "no bundle yet: waits");
        // A device whose key is not the pinned one is not trusted.
        let l = s
            .omemo_learn(c, ctx.pinned, bundles(5, &Version::ALL), 0)
            .expect("learn");
        assert_eq!(l.new_untrusted.len(), 1);
        assert!(!l.can_send);
        let out = s.outbox_encrypted(c, 0, 10, &ctx).expect("outbox");
        assert!(
            out.waiting && out.items.is_empty(),
            "still nothing to a stranger's device"
        );
        // Verified by the user: now it can be encrypted to.
        let dev = s.omemo_peer(c).expect("peer").devices[0].id;
        assert!(s.omemo_verify(c, dev).expect("verify"));
        let out = s.outbox_encrypted(c, 0, 10, &ctx).expect("outbox");
        assert!(!out.waiting && out.items.len() == 1);
        assert!(
            !s.omemo_verify(c, dev ^ 1).expect("verify"),
            "unknown device"
        );
    }

    /// What a 1 KB message costs on the wire (the Tor benchmark's
    /// question): one device, OMEMO 2, the first message of a session.
    #[test]
    fn a_1_kb_message_is_one_4_kib_unit_at_the_standard_and_light_levels() {
        use crate::stream::padding::Padding;
        let (_d, s, c, ctx) = setup(9);
        s.omemo_learn(c, ctx.pinned, bundles(9, &[Version::V2]), 0)
            .expect("learn");
        let own = OwnOmemo {
            identity: ctx.identity.clone(),
            jid: ctx.own_jid.clone(),
            device_id: ctx.device_id,
        };
        let name = s.contact(c).expect("c").expect("contact").name;
        for _ in 0..2 {
            crate::ops::send(&s, &name, &"x".repeat(1024), 1, Some(&own)).expect("send");
        }
        let out = s.outbox_encrypted(c, 0, usize::MAX, &ctx).expect("outbox");
        assert_eq!(out.items.len(), 2);
        for (_, st) in &out.items {
            let OutStanza::Chat { omemo: Some(x), .. } = st else {
                panic!("not an encrypted chat stanza")
            };
            // The longest stanza id a session writes.
            let unit =
                crate::stream::session::encode_encrypted("m18446744073709551615.ffffffff", x, true)
                    .expect("encode");
            println!("1 KB body: a {}-byte unit", unit.len());
            assert!((2048..4096).contains(&unit.len()), "{} bytes", unit.len());
            assert_eq!(Padding::Standard.padded_len(unit.len()), 4096);
            assert_eq!(Padding::Light.padded_len(unit.len()), 4096);
        }
    }

    #[test]
    fn the_largest_accepted_bodies_encrypt_under_the_stanza_limit() {
        let (_d, s, c, ctx) = setup(9);
        // Three devices of the contact, all trusted by the user.
        for seed in [9, 10, 11] {
            s.omemo_learn(c, ctx.pinned, bundles(seed, &Version::ALL), 0)
                .expect("learn");
        }
        for d in s.omemo_peer(c).expect("peer").devices {
            s.omemo_verify(c, d.id).expect("verify");
        }
        let own = OwnOmemo {
            identity: ctx.identity.clone(),
            jid: ctx.own_jid.clone(),
            device_id: ctx.device_id,
        };
        let name = s.contact(c).expect("c").expect("contact").name;
        for ch in ['a', '&', '<', '"', 'é', '🙂'] {
            // The longest body of this character that `send` accepts.
            let mut n = crate::ops::MAX_BODY;
            let body = loop {
                let b: String = std::iter::repeat_n(ch, n / ch.len_utf8()).collect();
                if crate::ops::send(&s, &name, &b, 1, Some(&own)).is_ok() {
                    break b;
                }
                n -= n / 8;
            };
            assert!(!body.is_empty());
            let out = s.outbox_encrypted(c, 0, usize::MAX, &ctx).expect("outbox");
            for (_, st) in &out.items {
                if let OutStanza::Chat { omemo: Some(x), .. } = st {
                    let unit = crate::stream::session::encode_encrypted(
                        "m18446744073709551615.ffffffff",
                        x,
                        true,
                    )
                    .expect("encode");
                    assert!(unit.len() < 64 * 1024, "{ch:?}: {} bytes", unit.len());
                }
            }
        }
    }

    #[test]
    fn messages_that_fail_leave_no_state_behind_and_devices_are_capped() {
        use crate::omemo::device::{Recipient, encrypt};
        let (_d, s, c, ctx) = setup(9);
        let own = s.omemo_device(0).expect("own");
        let own_bundle = own.bundle(&ctx.identity, Version::V2);
        let mut items = Vec::new();
        // Key exchanges from many devices of strangers' keys, most of them
        // not for our device: only failures and at most the cap remain.
        for i in 0..40u8 {
            let id = Identity::from_seed(&[100 + i; 32]);
            // Each its own one-time prekey: a reused one is refused, which
            // is not what this test is about.
            let mut b = own_bundle.clone();
            b.prekeys = vec![own_bundle.prekeys[usize::from(i)]];
            let mut sess = Session::initiate(&id, &b, &mut rand::rngs::OsRng).expect("initiate");
            let rid = if i % 2 == 0 {
                own.device_id
            } else {
                own.device_id ^ 1
            };
            let mut r = [Recipient {
                jid: &ctx.own_jid,
                device_id: rid,
                session: &mut sess,
            }];
            let pt = crate::omemo::sce::seal("x", &ctx.peer_jid, &mut rand::rngs::OsRng);
            let el = encrypt(
                Version::V2,
                &id,
                1000 + u32::from(i),
                &mut r,
                Some(&pt),
                &mut rand::rngs::OsRng,
            );
            items.push(Incoming::Encrypted {
                id: format!("e{i}"),
                element: el.to_element(),
                wants_receipt: false,
            });
        }
        let (_, res) = s
            .ack_and_receive(c, None, &items, 1000, Some(&ctx))
            .expect("receive");
        assert_eq!(
            res.new_messages.len(),
            40,
            "every message is recorded, readable or not"
        );
        let p = s.omemo_peer(c).expect("peer");
        assert_eq!(p.devices.len(), crate::store::omemo::MAX_CONTACT_DEVICES);
        assert_eq!(
            p.slots.len(),
            p.devices.len(),
            "no session slot for a message that failed"
        );
        assert!(p.devices.iter().all(|d| d.trust == Trust::Untrusted));
    }
}

#[test]
fn compaction_gives_back_deleted_space_and_keeps_everything_else() {
    let (d, mut s) = new_store();
    let keep = s.add_contact(contact(1)).expect("add");
    let gone = s.add_contact(contact(2)).expect("add");
    let body = "x".repeat(2000);
    let bodies: Vec<&str> = (0..500).map(|_| body.as_str()).collect();
    s.queue_outgoing_many(gone, &bodies, 5).expect("queue");
    s.queue_outgoing(keep, "still here", 6).expect("queue");
    assert!(s.remove_contact(gone).expect("remove"));
    let (before, after) = s.compact().expect("compact");
    assert!(
        after < before / 2,
        "1 MB deleted, file {before} → {after} bytes"
    );
    drop(s);
    let s = Store::open(&d.path().join("p"), "pw").expect("reopen");
    let h = s.history(keep, 10).expect("history");
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].body, "still here");
}
