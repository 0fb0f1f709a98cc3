use super::*;
use crate::stream::padding::Padding;
use proptest::prelude::*;

fn params(role: Role, in_h: u64, out_acked: u64) -> Params {
    Params {
        role,
        local: if role == Role::Initiator {
            "a.onion".into()
        } else {
            "b.onion".into()
        },
        peer: if role == Role::Initiator {
            "b.onion".into()
        } else {
            "a.onion".into()
        },
        session_id: "s1".into(),
        in_h,
        out_acked,
        limits: Limits::default(),
        rate: RateLimit::default(),
        padding: Padding::Standard,
    }
}

/// Moves everything `from` wants to write into `to`; returns `to`'s events.
fn pump(from: &mut Session, to: &mut Session, now: Instant) -> Vec<Event> {
    // One read may carry several units, as on a real socket.
    let mut wire = Vec::new();
    while let Some(u) = from.poll_transmit() {
        assert!(
            Padding::Standard.buckets().contains(&u.len()) || u.len() % 16384 == 0,
            "unpadded unit of {} bytes",
            u.len()
        );
        wire.extend(u);
    }
    if wire.is_empty() {
        Vec::new()
    } else {
        to.handle_input(&wire, now)
    }
}

fn handshake(a: &mut Session, b: &mut Session, now: Instant) -> (Vec<Event>, Vec<Event>) {
    let mut ea = Vec::new();
    let mut eb = Vec::new();
    for _ in 0..4 {
        eb.extend(pump(a, b, now));
        ea.extend(pump(b, a, now));
    }
    (ea, eb)
}

/// An initiator and a responder, both fresh, with the stream resumed.
fn open_pair(now: Instant) -> (Session, Session) {
    let mut a = Session::new(params(Role::Initiator, 0, 0), now);
    let mut b = Session::new(params(Role::Responder, 0, 0), now);
    handshake(&mut a, &mut b, now);
    (a, b)
}

/// An `<encrypted/>` element as the store keeps it (the session only
/// carries it; OMEMO is tested in `crate::omemo`).
fn enc(n: u64) -> String {
    format!(
        "<encrypted xmlns='urn:xmpp:omemo:2'><header sid='{n}'/><payload>AAAA</payload></encrypted>"
    )
}

fn chat(n: u64) -> OutStanza {
    OutStanza::Chat {
        id: format!("m{n}.00000000"),
        body: format!("body {n}"),
        seq: n,
        omemo: Some(enc(n)),
    }
}

fn sid_of(i: &Incoming) -> Option<String> {
    match i {
        Incoming::Encrypted { element, .. } => element
            .get_child("header", "urn:xmpp:omemo:2")
            .and_then(|h| h.attr("sid"))
            .map(String::from),
        _ => None,
    }
}

#[test]
fn handshake_resumes_with_both_counters() {
    let now = Instant::now();
    let mut a = Session::new(params(Role::Initiator, 7, 2), now);
    let mut b = Session::new(params(Role::Responder, 2, 7), now);
    let (ea, eb) = handshake(&mut a, &mut b, now);
    assert!(a.is_open() && b.is_open());
    assert!(
        matches!(ea.as_slice(), [Event::Resumed { peer_h: 2 }]),
        "{ea:?}"
    );
    assert!(
        matches!(eb.as_slice(), [Event::Resumed { peer_h: 7 }]),
        "{eb:?}"
    );
}

#[test]
fn stanzas_flow_and_are_acked_only_after_persisting() {
    let now = Instant::now();
    let (mut a, mut b) = open_pair(now);
    for n in 1..=3 {
        a.send(&chat(n));
    }
    let eb = pump(&mut a, &mut b, now);
    let [Event::Stanzas(items)] = eb.as_slice() else {
        panic!("{eb:?}")
    };
    assert_eq!(items.len(), 3);
    assert!(matches!(
        &items[0],
        Incoming::Encrypted {
            wants_receipt: true,
            ..
        }
    ));
    assert_eq!(sid_of(&items[0]).as_deref(), Some("1"));
    // Nothing acked yet: B has not stored them.
    assert!(pump(&mut b, &mut a, now).is_empty());
    b.persisted(3);
    let ea = pump(&mut b, &mut a, now);
    assert!(matches!(ea.as_slice(), [Event::Acked(3)]), "{ea:?}");
}

#[test]
fn receipts_round_trip() {
    let now = Instant::now();
    let (mut a, mut b) = open_pair(now);
    b.send(&OutStanza::Receipt {
        id: "r1".into(),
        of: "m1.00000000".into(),
    });
    let ea = pump(&mut b, &mut a, now);
    let [Event::Stanzas(items)] = ea.as_slice() else {
        panic!("{ea:?}")
    };
    assert!(matches!(&items[0], Incoming::Receipt { of } if of == "m1.00000000"));
}

#[test]
fn r_is_answered_with_the_durable_count() {
    let now = Instant::now();
    let (mut a, mut b) = open_pair(now);
    a.send(&chat(1));
    pump(&mut a, &mut b, now);
    a.request_ack();
    pump(&mut a, &mut b, now);
    // B answers with h=0: the stanza is counted but not stored yet.
    assert!(pump(&mut b, &mut a, now).is_empty());
}

#[test]
fn resume_after_a_crash_retransmits_only_what_was_not_stored() {
    let now = Instant::now();
    // A sent 5, B stored 3 before the connection died.
    let mut a = Session::new(params(Role::Initiator, 0, 0), now);
    let mut b = Session::new(params(Role::Responder, 3, 0), now);
    let (ea, _) = handshake(&mut a, &mut b, now);
    assert!(matches!(ea.as_slice(), [Event::Resumed { peer_h: 3 }]));
    // The driver retransmits 4 and 5; B counts them as 4 and 5.
    a.send(&chat(4));
    a.send(&chat(5));
    let eb = pump(&mut a, &mut b, now);
    let [Event::Stanzas(items)] = eb.as_slice() else {
        panic!("{eb:?}")
    };
    assert_eq!(items.len(), 2);
    b.persisted(5);
    assert!(matches!(
        pump(&mut b, &mut a, now).as_slice(),
        [Event::Acked(5)]
    ));
}

#[test]
fn wrong_session_id_is_refused() {
    let now = Instant::now();
    let mut a = Session::new(params(Role::Initiator, 0, 0), now);
    let mut pb = params(Role::Responder, 0, 0);
    pb.session_id = "other".into();
    let mut b = Session::new(pb, now);
    let (ea, eb) = handshake(&mut a, &mut b, now);
    assert!(
        eb.iter()
            .any(|e| matches!(e, Event::Fault(f) if f.condition == Condition::PolicyViolation))
    );
    assert!(
        ea.iter()
            .any(|e| matches!(e, Event::PeerError(c) if c == "policy-violation")),
        "{ea:?}"
    );
    assert!(a.is_closed() && b.is_closed());
}

#[test]
fn stanza_before_resumption_is_refused() {
    let now = Instant::now();
    let mut b = Session::new(params(Role::Responder, 0, 0), now);
    let hdr = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";
    b.handle_input(hdr.as_bytes(), now);
    let ev = b.handle_input(b"<message id='x'><body>early</body></message>", now);
    assert!(
        matches!(ev.as_slice(), [Event::Fault(f)] if f.condition == Condition::UnsupportedStanzaType)
    );
}

#[test]
fn malformed_input_queues_a_stream_error_and_closes() {
    let now = Instant::now();
    let (_a, mut b) = open_pair(now);
    let ev = b.handle_input(b"<message><body>\xff\xfe</body></message>", now);
    assert!(matches!(ev.last(), Some(Event::Fault(f)) if f.condition == Condition::NotWellFormed));
    let mut wire = Vec::new();
    while let Some(u) = b.poll_transmit() {
        wire.extend(u);
    }
    let wire = String::from_utf8_lossy(&wire);
    assert!(
        wire.contains("not-well-formed") && wire.contains("</stream:stream>"),
        "{wire}"
    );
    assert!(b.is_closed());
}

#[test]
fn a_flood_is_throttled() {
    let now = Instant::now();
    let mut a = Session::new(params(Role::Initiator, 0, 0), now);
    let mut pb = params(Role::Responder, 0, 0);
    pb.rate = RateLimit {
        per_second: 10.0,
        burst: 5.0,
    };
    let mut b = Session::new(pb, now);
    handshake(&mut a, &mut b, now);
    for n in 1..=10 {
        a.send(&chat(n));
    }
    pump(&mut a, &mut b, now);
    let until = b.throttle_until().expect("throttled");
    assert!(
        until >= now + Duration::from_millis(400),
        "{:?}",
        until - now
    );
}

#[test]
fn clean_close_is_reported() {
    let now = Instant::now();
    let (mut a, mut b) = open_pair(now);
    a.close();
    let eb = pump(&mut a, &mut b, now);
    assert!(matches!(eb.as_slice(), [Event::Closed]));
    assert!(b.is_closed());
}

#[test]
fn candidates_are_announced_with_jingle_and_bounded() {
    let now = Instant::now();
    let (mut a, mut b) = open_pair(now);
    let many: Vec<transport::PeerAddr> = (0..20)
        .map(|i| format!("tcp:127.0.0.1:{}", 1000 + i).parse().expect("addr"))
        .collect();
    a.send_candidates(&many);
    let eb = pump(&mut a, &mut b, now);
    let [Event::Addresses(got)] = eb.as_slice() else {
        panic!("{eb:?}")
    };
    assert_eq!(got.len(), crate::stream::jingle::MAX_CANDIDATES);
    assert_eq!(got[0].to_string(), "tcp:127.0.0.1:1000");
}

#[test]
fn a_chat_is_never_sent_in_the_clear() {
    let now = Instant::now();
    let (mut a, mut b) = open_pair(now);
    // Not encrypted (the runtime encrypts first): a placeholder goes out,
    // counted, without the body.
    a.send(&OutStanza::Chat {
        id: "m1.0".into(),
        body: "the secret plan".into(),
        seq: 1,
        omemo: None,
    });
    let mut wire = Vec::new();
    while let Some(u) = a.poll_transmit() {
        wire.extend(u);
    }
    assert!(!String::from_utf8_lossy(&wire).contains("secret"));
    let eb = b.handle_input(&wire, now);
    assert!(
        matches!(eb.as_slice(), [Event::Stanzas(items)] if matches!(&items[..], [Incoming::Other])),
        "{eb:?}"
    );
}

#[test]
fn a_plaintext_body_from_a_peer_is_flagged() {
    let now = Instant::now();
    let (_a, mut b) = open_pair(now);
    let eb = b.handle_input(
        b"<message xmlns='jabber:client' id='x1' type='chat'><body>hi</body></message>",
        now,
    );
    assert!(
        matches!(eb.as_slice(), [Event::Stanzas(items)] if matches!(&items[..], [Incoming::Plain { id }] if id == "x1")),
        "{eb:?}"
    );
}

#[test]
fn encrypted_messages_carry_hints_and_no_body() {
    let unit = encode_encrypted("m1.0", &enc(1), true).expect("encode");
    let text = String::from_utf8(unit).expect("utf8");
    assert!(text.contains("urn:xmpp:omemo:2"), "{text}");
    assert!(text.contains("urn:xmpp:hints"), "{text}");
    assert!(text.contains("urn:xmpp:eme:0"), "{text}");
    assert!(!text.contains("<body"), "{text}");
}

proptest! {
    #[test]
    fn unwrap_h_recovers_any_value_within_range(floor in any::<u64>(), delta in 0u64..u64::from(u32::MAX)) {
        let floor = floor / 2;
        let v = floor + delta;
        prop_assert_eq!(unwrap_h(floor, v as u32), v);
    }

    #[test]
    fn encrypted_stanzas_roundtrip(sid in 1u64.., id in "[a-z0-9.]{1,40}") {
        let now = Instant::now();
        let mut a = Session::new(params(Role::Initiator, 0, 0), now);
        let mut b = Session::new(params(Role::Responder, 0, 0), now);
        handshake(&mut a, &mut b, now);
        a.send(&OutStanza::Chat { id: id.clone(), body: String::new(), seq: 1, omemo: Some(enc(sid)) });
        let eb = pump(&mut a, &mut b, now);
        let [Event::Stanzas(items)] = eb.as_slice() else { panic!("{eb:?}") };
        let same_id = matches!(&items[..], [Incoming::Encrypted { id: i, .. }] if *i == id);
        prop_assert!(same_id);
        prop_assert_eq!(sid_of(&items[0]), Some(sid.to_string()));
    }

    #[test]
    fn session_never_panics_on_garbage_after_open(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let now = Instant::now();
        let mut a = Session::new(params(Role::Initiator, 0, 0), now);
        let mut b = Session::new(params(Role::Responder, 0, 0), now);
        handshake(&mut a, &mut b, now);
        let _ = b.handle_input(&data, now);
    }
}

#[test]
fn an_ack_for_stanzas_never_sent_is_refused() {
    let now = Instant::now();
    let (mut a, mut b) = open_pair(now);
    a.send(&chat(1));
    pump(&mut a, &mut b, now);
    let ev = a.handle_input(b"<a xmlns='urn:xmpp:sm:3' h='5'/>", now);
    assert!(
        matches!(ev.as_slice(), [Event::Fault(f)] if f.condition == Condition::PolicyViolation),
        "{ev:?}"
    );
}

#[test]
fn stanzas_before_a_close_are_handed_over_first() {
    let now = Instant::now();
    let (mut a, mut b) = open_pair(now);
    a.send(&chat(1));
    a.close();
    let eb = pump(&mut a, &mut b, now);
    assert!(
        matches!(eb.as_slice(), [Event::Stanzas(items), Event::Closed] if items.len() == 1),
        "{eb:?}"
    );
}

#[test]
fn an_unencodable_stanza_still_counts_as_one() {
    let now = Instant::now();
    let (mut a, mut b) = open_pair(now);
    a.send(&OutStanza::Chat {
        id: "m1.0".into(),
        body: String::new(),
        seq: 1,
        omemo: Some("<encrypted broken".into()),
    });
    a.send(&chat(2));
    let eb = pump(&mut a, &mut b, now);
    let [Event::Stanzas(items)] = eb.as_slice() else {
        panic!("{eb:?}")
    };
    assert_eq!(items.len(), 2, "the placeholder keeps the count aligned");
    assert!(matches!(&items[0], Incoming::Other));
    assert_eq!(sid_of(&items[1]).as_deref(), Some("2"));
}

#[test]
fn xml_text_check() {
    assert!(is_xml_text("hello\tworld\n\u{e9}\u{1F600}"));
    assert!(!is_xml_text("bell\u{7}"));
    assert!(!is_xml_text("\u{FFFE}"));
    assert!(!is_xml_text("nul\u{0}"));
}
