//! Arbitrary bytes as an OMEMO 2 message (key exchange or ratchet message,
//! with a payload) to a device with an established session: never panics.
#![no_main]

use coterie_node::omemo::Version;
use libfuzzer_sys::fuzz_target;

#[path = "omemo_common.rs"]
mod omemo_common;

fuzz_target!(|data: &[u8]| omemo_common::envelope(Version::V2, data));
