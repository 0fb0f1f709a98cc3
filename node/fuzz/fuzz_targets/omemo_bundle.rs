//! Arbitrary text as a PEP notification, bundle or device list of either
//! OMEMO version: never panics; a bundle accepted has a valid signature.
#![no_main]

use coterie_node::omemo::keys::verify_spk;
use coterie_node::omemo::pep::{PepItem, parse_event};
use coterie_node::omemo::xml::{Bundle, parse_devices};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(el) = s.parse::<minidom::Element>() else {
        return;
    };
    if let Ok(b) = Bundle::parse(&el) {
        assert!(verify_spk(b.version, &b.ik, &b.spk, &b.spk_sig).is_ok());
        assert!(!b.prekeys.is_empty());
    }
    if let Ok((_, ids)) = parse_devices(&el) {
        assert!(ids.len() <= 64 && !ids.contains(&0));
    }
    if let Ok(items) = parse_event(&el) {
        for i in items {
            if let PepItem::Bundle(_, b, _) = i {
                assert!(verify_spk(b.version, &b.ik, &b.spk, &b.spk_sig).is_ok());
            }
        }
    }
});
