//! Arbitrary text as an invite link: never panics; anything accepted
//! re-verifies and names a valid onion address.
#![no_main]

use coterie_node::invite::Invite;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(inv) = Invite::parse(s, 0) {
        assert!(inv.addrs.len() <= 8);
        assert!(transport_ok(&inv.inviter.onion_address()));
    }
});

fn transport_ok(onion: &str) -> bool {
    onion.len() == 62 && onion.ends_with(".onion")
}
