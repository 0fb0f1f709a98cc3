//! Shared by the OMEMO fuzz targets: a receiving device with an
//! established session, so inputs reach the ratchet, not only the parsers.

use std::sync::OnceLock;

use coterie_node::omemo::device::{Recipient, RemoteDevice, SessionSlot, encrypt};
use coterie_node::omemo::xml::{EncryptedElement, KeyElement};
use coterie_node::omemo::{Identity, OwnDevice, Session, Version};
use rand::SeedableRng;

pub struct Fixture {
    pub receiver: Identity,
    pub device: OwnDevice,
    pub slot: SessionSlot,
    pub sender_identity: [u8; 32],
}

fn build(v: Version) -> Fixture {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let sender = Identity::from_seed(&[1; 32]);
    let receiver = Identity::from_seed(&[2; 32]);
    let mut device = OwnDevice::new(0, &mut rng);
    let bundle = device.bundle(&receiver, v);
    let mut s = Session::initiate(&sender, &bundle, &mut rng).expect("initiate");
    let mut r = [Recipient {
        jid: "r@x",
        device_id: device.device_id,
        session: &mut s,
    }];
    let el = encrypt(v, &sender, 9, &mut r, Some(b"hi"), &mut rng);
    let mut slot = SessionSlot::default();
    device
        .decrypt(
            &receiver,
            "r@x",
            RemoteDevice { identity: None },
            &mut slot,
            &el,
            0,
            &mut rng,
        )
        .expect("first message");
    Fixture {
        receiver,
        device,
        slot,
        sender_identity: sender.mont_public(),
    }
}

pub fn fixture(v: Version) -> &'static Fixture {
    static V03: OnceLock<Fixture> = OnceLock::new();
    static V2: OnceLock<Fixture> = OnceLock::new();
    match v {
        Version::V03 => V03.get_or_init(|| build(v)),
        Version::V2 => V2.get_or_init(|| build(v)),
    }
}

/// `data` as the key data (and, split, the payload) of a message to the
/// fixture's device, as a key exchange or not; and as `<encrypted/>` XML.
pub fn envelope(v: Version, data: &[u8]) {
    let f = fixture(v);
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let cut = rest.len().min(usize::from(flags >> 1));
    let (key, payload) = rest.split_at(rest.len() - cut);
    let el = EncryptedElement {
        version: v,
        sid: 9,
        keys: vec![KeyElement {
            jid: (v == Version::V2).then(|| "r@x".to_string()),
            rid: f.device.device_id,
            kex: flags & 1 == 1,
            data: key.to_vec(),
        }],
        iv: (v == Version::V03).then(|| vec![0; 12]),
        payload: (!payload.is_empty()).then(|| payload.to_vec()),
    };
    let mut device = f.device.clone();
    let mut slot = f.slot.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let known = RemoteDevice {
        identity: Some(f.sender_identity),
    };
    let _ = device.decrypt(&f.receiver, "r@x", known, &mut slot, &el, 0, &mut rng);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(xml) = text.parse::<minidom::Element>()
    {
        let _ = EncryptedElement::parse(&xml, 1 << 16);
    }
}
