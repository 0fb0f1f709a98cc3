//! Hostile input from an authenticated contact: each bad stream is closed
//! with the right stream error, the node keeps running, other contacts are
//! unaffected and nothing stored is lost.

use std::time::Duration;

use coterie_tests::raw::RawPeer;
use coterie_tests::{round_trip, running_pair, texts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_corpus_closes_only_the_offending_stream() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut alice, bob) = running_pair(tmp.path());
    round_trip(&bob, &alice, "before the attack");

    let key = alice.key();
    let evil = RawPeer::new();
    let (mut conn, status) = evil.redeem(&alice.invite(), alice.port).await;
    assert_eq!(status, 0);
    conn.open_stream(&evil.key.peer_id(), 0).await;

    let huge = format!(
        "<message id='h'><body>{}</body></message>",
        "a".repeat(300_000)
    );
    let deep = format!("<message id='d'>{}", "<x>".repeat(200));
    let mut bad_utf8 = b"<message id='u'><body>".to_vec();
    bad_utf8.extend_from_slice(&[0xc3, 0x28, 0xff]);
    bad_utf8.extend_from_slice(b"</body></message>");
    let corpus: Vec<(&str, Vec<u8>, &str)> = vec![
        ("huge stanza", huge.into_bytes(), "policy-violation"),
        ("deep nesting", deep.into_bytes(), "policy-violation"),
        (
            "DTD",
            b"<!DOCTYPE lol [<!ENTITY lol 'lol'>]>".to_vec(),
            "restricted-xml",
        ),
        (
            "entity",
            b"<message id='e'><body>&lol;</body></message>".to_vec(),
            "restricted-xml",
        ),
        ("invalid UTF-8", bad_utf8, "not-well-formed"),
        (
            "text at stream level",
            b"hello<message/>".to_vec(),
            "not-well-formed",
        ),
        (
            "unknown top-level element",
            b"<iq2 xmlns='urn:evil'/>".to_vec(),
            "unsupported-stanza-type",
        ),
    ];
    let mut first = true;
    for (what, bytes, condition) in corpus {
        if !first {
            conn = evil.session(alice.port, key).await;
            conn.open_stream(&evil.key.peer_id(), 0).await;
        }
        first = false;
        let _ = conn.send(&bytes).await;
        let (got, closed) = conn.read_to_close(Duration::from_secs(10)).await;
        assert!(closed, "{what}: stream not closed");
        assert!(
            got.contains(condition),
            "{what}: expected <{condition}/>, got {got:?}"
        );
        assert!(got.contains("</stream:stream>"), "{what}: no stream close");
        assert!(alice.running(), "{what}: alice died");
        // Bob's session is untouched.
        round_trip(&bob, &alice, &format!("after {what}"));
    }

    // A flood of valid stanzas is throttled, not buffered without bound, and
    // does not starve other contacts.
    conn = evil.session(alice.port, key).await;
    conn.open_stream(&evil.key.peer_id(), 0).await;
    let flood: String = (0..10_000)
        .map(|i| format!("<message id='f{i}' type='chat'><body>flood {i}</body></message>"))
        .collect();
    let writer = tokio::spawn(async move {
        let _ = conn.send(flood.as_bytes()).await;
        conn
    });
    let rt = round_trip(&bob, &alice, "during the flood");
    assert!(
        rt < Duration::from_secs(5),
        "a flooding contact delayed another contact by {rt:?}"
    );
    let _conn = writer.await.expect("writer");
    assert!(alice.running());

    // Nothing stored was lost, and every message from bob is there once.
    let from_bob: Vec<String> = texts(&alice, "bob")
        .into_iter()
        .filter(|(d, _, _)| d == "in")
        .map(|(_, b, _)| b)
        .collect();
    assert_eq!(
        from_bob.first().map(String::as_str),
        Some("before the attack")
    );
    assert_eq!(from_bob.len(), 9, "{from_bob:?}");
    let stats = alice.status()["stats"].clone();
    assert!(stats["stream_faults"].as_u64().unwrap_or(0) >= 7, "{stats}");
    assert!(
        !alice.log_text().contains("panicked"),
        "alice panicked: {}",
        alice.log_text()
    );
    // The log never names bodies or addresses.
    let log = alice.log_text();
    assert!(
        !log.contains("flood 1")
            && !log.contains("before the attack")
            && !log.contains("127.0.0.1:"),
        "log leaks: {log}"
    );
}
