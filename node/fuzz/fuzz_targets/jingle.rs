//! A Jingle `transport-info` from a contact, arbitrary XML: never panics,
//! and what it accepts is bounded by the candidate limit.
#![no_main]

use coterie_node::stream::jingle::{MAX_CANDIDATES, parse_transport_info};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(el) = s.parse::<minidom::Element>() else {
        return;
    };
    if let Ok(addrs) = parse_transport_info(el, "sid1") {
        assert!(addrs.len() <= MAX_CANDIDATES);
    }
});
