//! An opened session fed arbitrary peer bytes: never panics, and after a
//! fault it has queued a stream error and is closed.
#![no_main]

use std::time::Instant;

use coterie_node::stream::padding::Padding;
use coterie_node::stream::parser::Limits;
use coterie_node::stream::session::{Event, Params, RateLimit, Role, Session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let p = Params {
        role: Role::Responder,
        local: "b.onion".into(),
        peer: "a.onion".into(),
        session_id: "s".into(),
        in_h: 0,
        out_acked: 0,
        limits: Limits::default(),
        rate: RateLimit::default(),
        padding: Padding::Standard,
    };
    let mut s = Session::new(p, now);
    let hdr = b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'><resume xmlns='urn:xmpp:sm:3' h='0' previd='s'/>";
    let _ = s.handle_input(hdr, now);
    let evs = s.handle_input(data, now);
    if evs.iter().any(|e| matches!(e, Event::Fault(_))) {
        assert!(s.is_closed());
        let mut out = Vec::new();
        while let Some(u) = s.poll_transmit() {
            out.extend(u);
        }
        assert!(out.windows(16).any(|w| w == b"</stream:stream>"));
    }
});
