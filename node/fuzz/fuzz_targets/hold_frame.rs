//! A holding frame (offer, deposit, held message) from a contact, arbitrary
//! bytes: never panics; whatever decodes encodes back to a frame that
//! decodes to the same value (nothing is lost or invented on the way to
//! the store).
#![no_main]

use coterie_node::hold::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        let again = Frame::decode(&f.encode()).expect("an accepted frame re-decodes");
        assert_eq!(f, again);
    }
});
