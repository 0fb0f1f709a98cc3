//! A group-control frame from a member, arbitrary bytes: decoding never
//! panics, and a group fed whatever decodes (aimed at its own id, so every
//! path past the id check is reached) never panics and keeps its own
//! membership: the creator is still a member and admin.
#![no_main]

use coterie_node::group::{Frame, Group};
use libfuzzer_sys::fuzz_target;
use transport::identity::SecretKey;

fuzz_target!(|data: &[u8]| {
    let Ok(mut frame) = Frame::decode(data) else {
        return;
    };
    let me = SecretKey::from_seed(&[7; 32]);
    let peer = SecretKey::from_seed(&[9; 32]).peer_id();
    let Ok(mut g) = Group::create(me, "fuzz", 1_000) else {
        return;
    };
    if g.add(peer, false, 1_001).is_err() {
        return;
    }
    let _ = g.connected(peer, 1_002);
    frame.group = g.id().to_vec();
    let _ = g.handle(peer, frame, 1_003);
    let _ = g.tick(61_003);
    assert!(g.is_member(), "a frame from a member removed the creator");
});
