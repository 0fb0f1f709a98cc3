//! What the store holds. Every one of these is sealed before it touches disk.

use serde::{Deserialize, Serialize};

/// The profile's own identity and settings.
#[derive(Clone, Serialize, Deserialize)]
pub struct Profile {
    /// Display name (the localpart of the JID).
    pub name: String,
    /// Ed25519 seed of the identity key.
    pub seed: [u8; 32],
    /// Unix seconds.
    pub created: u64,
    /// Messages older than this many days are deleted; 0 keeps everything.
    pub retention_days: u32,
    /// Addresses the node listened on last time it ran (for invites made offline).
    #[serde(default)]
    pub last_addrs: Vec<String>,
    /// What the user chose in the app.
    #[serde(default)]
    pub settings: crate::settings::Settings,
    /// The ordinary XMPP account the bridge logs into, if the user set one.
    #[serde(default)]
    pub bridge: Option<crate::bridge::BridgeAccount>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Profile(..)")
    }
}

/// Default retention, in days.
pub const DEFAULT_RETENTION_DAYS: u32 = 30;

/// A contact's lifecycle.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ContactState {
    /// Keys pinned on both sides; sessions may run.
    Active,
    /// We added them from their invite and still have to prove it to them.
    Redeeming {
        /// The invite's id.
        invite_id: [u8; 16],
        /// The invite's one-time secret.
        secret: [u8; 32],
    },
    /// The inviter refused our redemption (used, expired, unknown invite).
    Refused {
        /// What they said.
        reason: String,
    },
    /// A classic XEP-0174 client met on the LAN in the dangerous
    /// compatibility mode: nothing to or from it is encrypted or
    /// authenticated. `peer` is then a hash of the instance name, not a key.
    Cleartext {
        /// Its service instance name, `user@host`.
        instance: String,
    },
    /// A friend on ordinary XMPP, reached through the bridge account with
    /// OMEMO. `peer` is then a hash of the JID, not a key.
    Bridged {
        /// Their bare JID.
        jid: String,
    },
}

/// A contact.
#[derive(Clone, Serialize, Deserialize)]
pub struct Contact {
    /// Local id (store key).
    pub id: u64,
    /// The name the user knows them by.
    pub name: String,
    /// Their Ed25519 key.
    pub peer: [u8; 32],
    /// Where they said they can be reached.
    pub addrs: Vec<String>,
    /// Lifecycle.
    pub state: ContactState,
    /// Unix seconds when added.
    pub added: u64,
    /// Unix seconds of the last session, if any.
    pub last_seen: Option<u64>,
    /// Carrier of the last session.
    pub last_carrier: Option<String>,
}

impl std::fmt::Debug for Contact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Contact(#{})", self.id)
    }
}

/// Direction of a message.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Direction {
    /// We sent it.
    Out,
    /// They sent it.
    In,
}

/// Delivery state.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum Delivery {
    /// Stored locally, not yet acknowledged by the contact's node.
    Queued,
    /// The contact's node acknowledged storing it (XEP-0198).
    Sent,
    /// The contact's node sent a receipt (XEP-0184).
    Delivered,
    /// An incoming message.
    Received,
}

impl Delivery {
    /// Lowercase name for output.
    pub fn as_str(&self) -> &'static str {
        match self {
            Delivery::Queued => "queued",
            Delivery::Sent => "sent",
            Delivery::Delivered => "delivered",
            Delivery::Received => "received",
        }
    }
}

/// A chat message.
#[derive(Clone, Serialize, Deserialize)]
pub struct Message {
    /// Per-contact sequence (store key part).
    pub seq: u64,
    /// Direction.
    pub dir: Direction,
    /// The text.
    pub body: String,
    /// Unix milliseconds (sent time for outgoing, arrival for incoming).
    pub ts: u64,
    /// Delivery state.
    pub state: Delivery,
    /// The stanza id on the wire.
    pub stanza_id: String,
    /// Incoming: sent by a device of the contact that is not verified.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unverified: bool,
    /// Incoming: why it could not be decrypted (the body is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undecryptable: Option<String>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Message(#{} {:?} {:?})", self.seq, self.dir, self.state)
    }
}

/// An outbound stanza waiting for the peer's XEP-0198 ack.
#[derive(Clone, Serialize, Deserialize)]
pub enum OutStanza {
    /// A chat message.
    Chat {
        /// Stanza id.
        id: String,
        /// Text.
        body: String,
        /// Message seq, to mark it sent when acked.
        seq: u64,
        /// The OMEMO `<encrypted/>` element, once encrypted (retransmissions
        /// send the same ciphertext).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        omemo: Option<String>,
    },
    /// An empty OMEMO message (key transport): a new session after a repair.
    KeyTransport {
        /// Stanza id.
        id: String,
        /// The `<encrypted/>` element.
        omemo: String,
    },
    /// A group frame (`docs/protocol.md` §7.4) for this contact, who is a
    /// member: sent OMEMO-encrypted, without a receipt.
    Group {
        /// Stanza id.
        id: String,
        /// The frame, base64.
        frame: String,
        /// The `<encrypted/>` element, once encrypted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        omemo: Option<String>,
    },
    /// A hold frame (`docs/protocol.md` §7.5) for this contact: an offer,
    /// a deposit or a held message, sent OMEMO-encrypted, without a receipt.
    Hold {
        /// Stanza id.
        id: String,
        /// The frame, base64.
        frame: String,
        /// The `<encrypted/>` element, once encrypted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        omemo: Option<String>,
    },
    /// A delivery receipt for one of their messages.
    Receipt {
        /// Stanza id of the receipt itself.
        id: String,
        /// The id being acknowledged.
        of: String,
    },
}

impl OutStanza {
    /// Whether this is a chat message.
    pub fn is_chat(&self) -> bool {
        matches!(self, OutStanza::Chat { .. })
    }

    /// What still has to be encrypted: the content of a chat, group or
    /// hold stanza not yet encrypted.
    pub fn pending_content(&self) -> Option<crate::omemo::sce::Content> {
        use crate::omemo::sce::Content;
        let frame = |f: &str| {
            data_encoding::BASE64
                .decode(f.as_bytes())
                .unwrap_or_default()
        };
        match self {
            OutStanza::Chat {
                body, omemo: None, ..
            } => Some(Content::Body(body.clone())),
            OutStanza::Group {
                frame: f,
                omemo: None,
                ..
            } => Some(Content::Group(frame(f))),
            OutStanza::Hold {
                frame: f,
                omemo: None,
                ..
            } => Some(Content::Hold(frame(f))),
            _ => None,
        }
    }

    /// This stanza with its `<encrypted/>` element.
    pub fn encrypted(self, el: String) -> OutStanza {
        match self {
            OutStanza::Chat { id, body, seq, .. } => OutStanza::Chat {
                id,
                body,
                seq,
                omemo: Some(el),
            },
            OutStanza::Group { id, frame, .. } => OutStanza::Group {
                id,
                frame,
                omemo: Some(el),
            },
            OutStanza::Hold { id, frame, .. } => OutStanza::Hold {
                id,
                frame,
                omemo: Some(el),
            },
            other => other,
        }
    }
}

impl std::fmt::Debug for OutStanza {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutStanza::Chat { seq, .. } => write!(f, "Chat(#{seq})"),
            OutStanza::Receipt { .. } => f.write_str("Receipt"),
            OutStanza::KeyTransport { .. } => f.write_str("KeyTransport"),
            OutStanza::Group { .. } => f.write_str("Group"),
            OutStanza::Hold { .. } => f.write_str("Hold"),
        }
    }
}

/// Per-contact stream-management counters. They outlive every connection:
/// the XEP-0198 session between two Coterie nodes never ends.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerState {
    /// How many stanzas from them we have durably handled (XEP-0198 `h`).
    pub in_h: u64,
    /// Number of the last stanza we queued for them (first is 1).
    pub out_last: u64,
    /// Highest of our stanzas they acknowledged.
    pub out_acked: u64,
    /// Next message seq.
    pub next_seq: u64,
}

/// An invite we issued.
#[derive(Clone, Serialize, Deserialize)]
pub struct IssuedInvite {
    /// Public id (also in the URI).
    pub invite_id: [u8; 16],
    /// One-time secret.
    pub secret: [u8; 32],
    /// Unix seconds.
    pub expires: u64,
    /// Set once redeemed; kept until expiry to say "already used".
    pub used: bool,
    /// Who redeemed it.
    #[serde(default)]
    pub redeemed_by: Option<[u8; 32]>,
    /// A group whose link this is (hex id): whoever redeems it is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// For a link many may use (a meeting room's QR code): how many more
    /// redemptions it accepts. `None`: single use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
    /// Everyone who redeemed a multi-use link (a retry is not a new use).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redeemers: Vec<[u8; 32]>,
}

impl std::fmt::Debug for IssuedInvite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IssuedInvite(used={})", self.used)
    }
}

/// What arrived from a peer, already parsed and checked.
#[derive(Clone, Debug)]
pub enum Incoming {
    /// A chat message whose text is already in the clear: never parsed off
    /// the wire (see [`Incoming::Encrypted`]); used by local imports and
    /// store tests.
    Chat {
        /// Its stanza id.
        id: String,
        /// Text.
        body: String,
        /// Whether they asked for a receipt.
        wants_receipt: bool,
    },
    /// An OMEMO-encrypted message (or key transport, without payload).
    Encrypted {
        /// Its stanza id.
        id: String,
        /// The `<encrypted/>` element.
        element: minidom::Element,
        /// Whether they asked for a receipt.
        wants_receipt: bool,
    },
    /// A chat message with a plaintext body: Coterie nodes never send one.
    Plain {
        /// Its stanza id.
        id: String,
    },
    /// A receipt for one of our messages.
    Receipt {
        /// The id they acknowledge.
        of: String,
    },
    /// Any other stanza: counted for XEP-0198, otherwise ignored.
    Other,
}

/// How far a contact's device is trusted.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Trust {
    /// Its identity key is the one pinned by the invite.
    Pinned,
    /// The user compared its fingerprint and verified it.
    Verified,
    /// Seen, not verified: nothing is encrypted to it, and what it sends is
    /// marked.
    Untrusted,
    /// A bridged contact's device, as their server lists it: there is no
    /// invite to pin a key, so messages are encrypted to it (as XMPP
    /// clients do, "blind trust before verification") and what it sends
    /// is marked unverified until the user compares fingerprints.
    Blind,
}

impl Trust {
    /// Whether messages are encrypted to the device.
    pub fn trusted(self) -> bool {
        matches!(self, Trust::Pinned | Trust::Verified | Trust::Blind)
    }

    /// Whether its key is known to be theirs (pinned or verified).
    pub fn verified(self) -> bool {
        matches!(self, Trust::Pinned | Trust::Verified)
    }

    /// Lowercase name for output.
    pub fn as_str(self) -> &'static str {
        match self {
            Trust::Pinned => "pinned",
            Trust::Verified => "verified",
            Trust::Untrusted => "untrusted",
            Trust::Blind => "unverified",
        }
    }
}

/// One OMEMO device of a contact.
#[derive(Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Device id.
    pub id: u32,
    /// Identity key, Curve25519 (Montgomery) form.
    pub identity: [u8; 32],
    /// Trust.
    pub trust: Trust,
    /// The versions it published a bundle for (the bundles themselves are
    /// kept apart: see [`PeerBundles`]).
    pub versions: Vec<crate::omemo::Version>,
    /// Unix seconds when first seen.
    pub first_seen: u64,
}

impl std::fmt::Debug for DeviceRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({}, {:?})", self.id, self.trust)
    }
}

/// A contact's latest bundles (XML), per device and version. Kept in their
/// own row: they are large (100 prekeys each) and only needed to start a
/// session, while the devices and sessions row changes with every message.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerBundles {
    /// (device, version, bundle XML).
    pub bundles: Vec<(u32, crate::omemo::Version, String)>,
}

/// A contact's OMEMO state: devices and sessions.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerOmemo {
    /// Devices with a known identity.
    pub devices: Vec<DeviceRecord>,
    /// The device ids they list, per version.
    pub listed: Vec<(crate::omemo::Version, Vec<u32>)>,
    /// Sessions per (device, version).
    pub slots: Vec<(u32, crate::omemo::Version, crate::omemo::SessionSlot)>,
    /// The bundles, when loaded (never stored in this row).
    #[serde(skip)]
    pub bundles: Option<PeerBundles>,
    /// `bundles` changed (a used prekey was dropped) and must be written.
    #[serde(skip)]
    pub bundles_dirty: bool,
}
