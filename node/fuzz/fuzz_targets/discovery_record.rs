//! mDNS records from anyone on the LAN, arbitrary bytes split into TXT
//! properties: the Coterie record reader and the XEP-0174 presence reader
//! never panic and never accept more than their limits.
#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use discovery::lan::record::{MAX_SLOTS, Record};
use discovery::lan::xep0174::parse_presence;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `key=value` properties, one per NUL-separated chunk.
    let props: Vec<(&str, &[u8])> = data
        .split(|b| *b == 0)
        .filter_map(|p| {
            let eq = p.iter().position(|b| *b == b'=')?;
            Some((std::str::from_utf8(&p[..eq]).ok()?, &p[eq + 1..]))
        })
        .collect();
    if let Ok((_, slots)) = Record::parse_txt(props.iter().copied()) {
        assert!(!slots.is_empty() && slots.len() <= MAX_SLOTS);
    }
    let text: HashMap<String, String> = props
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    let name = props.first().map(|(k, _)| *k).unwrap_or("x");
    let full = format!("{name}._presence._tcp.local.");
    let ips = [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))];
    let _ = parse_presence(&full, &text, 5298, &ips);
});
