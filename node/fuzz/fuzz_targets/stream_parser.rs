//! Arbitrary bytes after a valid stream header, split at an arbitrary point:
//! the parser must never panic, and must give the same result whatever the split.
#![no_main]

use coterie_node::stream::parser::{Limits, StreamParser};
use libfuzzer_sys::fuzz_target;

const HDR: &[u8] = b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

fuzz_target!(|data: &[u8]| {
    let split = data.first().copied().unwrap_or(0) as usize;
    let body = data.get(1..).unwrap_or_default();
    let split = split.min(body.len());
    let mut whole = StreamParser::new(Limits::default());
    let _ = whole.feed(HDR);
    let a = whole.feed(body).map_err(|(evs, f)| (evs.len(), f));
    let mut parts = StreamParser::new(Limits::default());
    let _ = parts.feed(HDR);
    let b1 = parts.feed(&body[..split]);
    let b2 = parts.feed(&body[split..]);
    // Same outcome class either way (events may be split between the calls).
    if let (Ok(_), Ok(_), Ok(_)) = (&a, &b1, &b2) {}
    if a.is_err() {
        assert!(
            b1.is_err() || b2.is_err(),
            "an error in one piece must be an error in two"
        );
    }
    // And the raw parser from the very first byte.
    let mut raw = StreamParser::new(Limits::default());
    let _ = raw.feed(data);
});
