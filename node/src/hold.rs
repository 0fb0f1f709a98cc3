//! Offline delivery held by others (`docs/protocol.md` §7.5), sans-IO: the
//! frames a holder, a depositor and a recipient exchange, and their checks.
//!
//! A holder is a contact of both sides (a friend's node, or a `coterie
//! serve` box both added) that offers to hold. It tells each contact which of
//! its other contacts it can deliver to, as salted tags that name only keys
//! the reader already knows ([`Offer`]). A sender whose contact is offline
//! deposits the message exactly as it will later send it directly: the
//! OMEMO `<encrypted/>` element for the recipient. The holder passes it on
//! when the recipient connects. Frames travel inside OMEMO messages between
//! contacts, so each hop sees them only after decrypting its own layer, and
//! the held element stays sealed for the recipient.

use sha2::{Digest as _, Sha256};

/// Largest `<encrypted/>` element that is deposited (longer messages wait
/// for the direct path): a deposit stays one stanza under the 64 KiB limit.
pub const MAX_HELD_ELEMENT: usize = 24 * 1024;
/// Longest stanza id.
pub const MAX_ID: usize = 64;
/// Most contacts an offer lists.
pub const MAX_TAGS: usize = 4096;
/// How long a deposit is held unless the sender asks for less.
pub const DEFAULT_TTL_SECS: u64 = 7 * 24 * 3600;
/// The longest a holder keeps anything.
pub const MAX_TTL_SECS: u64 = 14 * 24 * 3600;
/// Most deposits a holder keeps from one sender.
pub const MAX_PER_SENDER: usize = 1000;
/// Most deposits a holder keeps in all.
pub const MAX_TOTAL: usize = 10_000;

const TAG_DOMAIN: &[u8] = b"coterie hold tag v1\0";

const KIND_OFFER: u32 = 1;
const KIND_DEPOSIT: u32 = 2;
const KIND_HELD: u32 = 3;

/// The wire form: one protobuf message, fields by kind.
#[derive(Clone, PartialEq, prost::Message)]
struct Wire {
    #[prost(uint32, tag = "1")]
    kind: u32,
    /// Offer: the salt of its tags.
    #[prost(bytes = "vec", tag = "2")]
    salt: Vec<u8>,
    /// Offer: one tag per contact it can deliver to.
    #[prost(bytes = "vec", repeated, tag = "3")]
    tags: Vec<Vec<u8>>,
    /// Offer: the longest it holds, in seconds.
    #[prost(uint64, tag = "4")]
    ttl_secs: u64,
    /// Deposit: the recipient's key; held: the sender's key.
    #[prost(bytes = "vec", tag = "5")]
    peer: Vec<u8>,
    /// Deposit, held: the message's stanza id.
    #[prost(string, tag = "6")]
    id: String,
    /// Deposit, held: the `<encrypted/>` element for the recipient.
    #[prost(string, tag = "7")]
    element: String,
    /// Deposit: Unix seconds after which it is dropped.
    #[prost(uint64, tag = "8")]
    expires: u64,
}

/// A holder's offer to one of its contacts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Salt of the tags (fresh for every offer).
    pub salt: [u8; 16],
    /// [`tag`] of each contact the holder can deliver to.
    pub tags: Vec<[u8; 16]>,
    /// The longest the holder keeps a deposit, in seconds.
    pub ttl_secs: u64,
}

impl Offer {
    /// An offer naming `keys`, with a fresh salt.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a [u8; 32]>, ttl_secs: u64) -> Offer {
        let salt: [u8; 16] = rand::random();
        let mut tags: Vec<[u8; 16]> = keys.into_iter().map(|k| tag(&salt, k)).collect();
        tags.sort_unstable();
        tags.truncate(MAX_TAGS);
        Offer {
            salt,
            tags,
            ttl_secs: ttl_secs.min(MAX_TTL_SECS),
        }
    }

    /// Whether the holder can deliver to `key`.
    pub fn covers(&self, key: &[u8; 32]) -> bool {
        self.tags.binary_search(&tag(&self.salt, key)).is_ok()
    }
}

/// A hold frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Holder → contact: "I hold for these of my contacts".
    Offer(Offer),
    /// Sender → holder: hold this for `to`.
    Deposit {
        /// The recipient's key.
        to: [u8; 32],
        /// The message's stanza id (the same as on the direct path).
        id: String,
        /// The `<encrypted/>` element for the recipient.
        element: String,
        /// Unix seconds after which it is dropped.
        expires: u64,
    },
    /// Holder → recipient: this was left for you by `from`.
    Held {
        /// The sender's key.
        from: [u8; 32],
        /// The message's stanza id.
        id: String,
        /// The `<encrypted/>` element.
        element: String,
    },
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// Not a frame.
    #[error("hold frame: not a valid encoding")]
    Encoding,
    /// Unknown kind.
    #[error("hold frame: unknown kind")]
    Kind,
    /// A field is missing, too long or of the wrong size.
    #[error("hold frame: bad {0}")]
    Field(&'static str),
}

/// Tag of `key` under `salt`: who reads it learns only whether a key they
/// already know is listed.
pub fn tag(salt: &[u8; 16], key: &[u8; 32]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(TAG_DOMAIN);
    h.update(salt);
    h.update(key);
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

fn key32(v: &[u8], what: &'static str) -> Result<[u8; 32], HoldError> {
    v.try_into().map_err(|_| HoldError::Field(what))
}

/// Whether `id` is a stanza id a Coterie node sends (short, plain ASCII).
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

fn valid_element(e: &str) -> bool {
    !e.is_empty() && e.len() <= MAX_HELD_ELEMENT && e.starts_with("<encrypted")
}

impl Frame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let w = match self {
            Frame::Offer(o) => Wire {
                kind: KIND_OFFER,
                salt: o.salt.to_vec(),
                tags: o.tags.iter().map(|t| t.to_vec()).collect(),
                ttl_secs: o.ttl_secs,
                ..Wire::default()
            },
            Frame::Deposit {
                to,
                id,
                element,
                expires,
            } => Wire {
                kind: KIND_DEPOSIT,
                peer: to.to_vec(),
                id: id.clone(),
                element: element.clone(),
                expires: *expires,
                ..Wire::default()
            },
            Frame::Held { from, id, element } => Wire {
                kind: KIND_HELD,
                peer: from.to_vec(),
                id: id.clone(),
                element: element.clone(),
                ..Wire::default()
            },
        };
        prost::Message::encode_to_vec(&w)
    }

    /// Reads and checks a frame from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Frame, HoldError> {
        let w: Wire = prost::Message::decode(bytes).map_err(|_| HoldError::Encoding)?;
        match w.kind {
            KIND_OFFER => {
                let salt: [u8; 16] = w
                    .salt
                    .as_slice()
                    .try_into()
                    .map_err(|_| HoldError::Field("salt"))?;
                if w.tags.len() > MAX_TAGS {
                    return Err(HoldError::Field("tags"));
                }
                let mut tags = Vec::with_capacity(w.tags.len());
                for t in &w.tags {
                    tags.push(
                        <[u8; 16]>::try_from(t.as_slice()).map_err(|_| HoldError::Field("tag"))?,
                    );
                }
                tags.sort_unstable();
                Ok(Frame::Offer(Offer {
                    salt,
                    tags,
                    ttl_secs: w.ttl_secs.min(MAX_TTL_SECS),
                }))
            }
            KIND_DEPOSIT | KIND_HELD => {
                let peer = key32(&w.peer, "key")?;
                if !valid_id(&w.id) {
                    return Err(HoldError::Field("id"));
                }
                if !valid_element(&w.element) {
                    return Err(HoldError::Field("element"));
                }
                if w.kind == KIND_HELD {
                    return Ok(Frame::Held {
                        from: peer,
                        id: w.id,
                        element: w.element,
                    });
                }
                if w.expires == 0 {
                    return Err(HoldError::Field("expiry"));
                }
                Ok(Frame::Deposit {
                    to: peer,
                    id: w.id,
                    element: w.element,
                    expires: w.expires,
                })
            }
            _ => Err(HoldError::Kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let offer = Offer::new([&a, &b], 3600);
        for f in [
            Frame::Offer(offer),
            Frame::Deposit {
                to: a,
                id: "m5.0badcafe".into(),
                element: "<encrypted xmlns='urn:xmpp:omemo:2'/>".into(),
                expires: 99,
            },
            Frame::Held {
                from: b,
                id: "m6.0badcafe".into(),
                element: "<encrypted xmlns='urn:xmpp:omemo:2'/>".into(),
            },
        ] {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
    }

    #[test]
    fn an_offer_names_only_keys_the_reader_knows() {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let o = Offer::new([&a, &b], MAX_TTL_SECS * 10);
        assert!(o.covers(&a) && o.covers(&b) && !o.covers(&c));
        assert_eq!(o.ttl_secs, MAX_TTL_SECS);
        // Fresh salt: two offers for the same contacts share no tag.
        let o2 = Offer::new([&a, &b], 60);
        assert!(o.tags.iter().all(|t| !o2.tags.contains(t)));
        // The tags are not the keys, nor a hash a stranger can precompute
        // without the salt.
        assert!(o.tags.iter().all(|t| t[..] != a[..16] && t[..] != b[..16]));
    }

    #[test]
    fn bad_frames_are_refused_not_trusted() {
        assert_eq!(Frame::decode(b"\xff\xff\xff"), Err(HoldError::Encoding));
        let w = |f: Wire| prost::Message::encode_to_vec(&f);
        assert_eq!(
            Frame::decode(&w(Wire {
                kind: 9,
                ..Wire::default()
            })),
            Err(HoldError::Kind)
        );
        let good = Wire {
            kind: KIND_DEPOSIT,
            peer: vec![7; 32],
            id: "m1.00000000".into(),
            element: "<encrypted/>".into(),
            expires: 5,
            ..Wire::default()
        };
        assert!(Frame::decode(&w(good.clone())).is_ok());
        let cases = [
            Wire {
                peer: vec![7; 31],
                ..good.clone()
            },
            Wire {
                id: String::new(),
                ..good.clone()
            },
            Wire {
                id: "m1 <x>".into(),
                ..good.clone()
            },
            Wire {
                id: "m".repeat(MAX_ID + 1),
                ..good.clone()
            },
            Wire {
                element: "<body>hi</body>".into(),
                ..good.clone()
            },
            Wire {
                element: format!("<encrypted>{}", "a".repeat(MAX_HELD_ELEMENT)),
                ..good.clone()
            },
            Wire {
                expires: 0,
                ..good.clone()
            },
            Wire {
                kind: KIND_OFFER,
                salt: vec![1; 15],
                ..Wire::default()
            },
            Wire {
                kind: KIND_OFFER,
                salt: vec![1; 16],
                tags: vec![vec![0; 16]; MAX_TAGS + 1],
                ..Wire::default()
            },
            Wire {
                kind: KIND_OFFER,
                salt: vec![1; 16],
                tags: vec![vec![0; 15]],
                ..Wire::default()
            },
        ];
        for c in cases {
            assert!(matches!(Frame::decode(&w(c)), Err(HoldError::Field(_))));
        }
    }
}
