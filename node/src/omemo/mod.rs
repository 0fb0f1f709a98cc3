//! OMEMO (XEP-0384): X3DH and the Double Ratchet, in both wire formats.
//!
//! - OMEMO 0.3, namespace `eu.siacs.conversations.axolotl`: what
//!   Conversations, Dino, Gajim and Profanity deploy. AES-128-GCM payloads,
//!   Curve25519 identity keys on the wire, 8-byte message MACs.
//! - OMEMO 2, namespace `urn:xmpp:omemo:2`: Ed25519 identity keys,
//!   AES-256-CBC + HMAC payloads carrying an XEP-0420 envelope.
//!
//! Everything here is sans-IO and deterministic given its random number
//! generator: the node keeps the state in its encrypted store and commits it
//! in the same transaction as the message it belongs to. Functions that can
//! fail on peer input never leave a half-updated state behind: they work on
//! copies and change `self` only on success.
//!
//! Built on RustCrypto and dalek primitives rather than a Signal library;
//! `docs/protocol.md` says why.

pub mod device;
pub mod keys;
pub mod payload;
pub mod pep;
pub mod proto;
pub mod ratchet;
pub mod sce;
pub mod x3dh;
pub mod xml;

use serde::{Deserialize, Serialize};

pub use device::{DecryptOutcome, OwnDevice, Recipient, RemoteDevice, Session, SessionSlot};
pub use keys::Identity;
pub use xml::{Bundle, EncryptedElement, KeyElement};

/// Namespace of OMEMO 0.3.
pub const NS_V03: &str = "eu.siacs.conversations.axolotl";
/// Namespace of OMEMO 2.
pub const NS_V2: &str = "urn:xmpp:omemo:2";

/// The two OMEMO versions in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Version {
    /// `eu.siacs.conversations.axolotl`.
    V03,
    /// `urn:xmpp:omemo:2`.
    V2,
}

impl Version {
    /// Both, preferred first.
    pub const ALL: [Version; 2] = [Version::V2, Version::V03];

    /// The XML namespace.
    pub fn ns(self) -> &'static str {
        match self {
            Version::V03 => NS_V03,
            Version::V2 => NS_V2,
        }
    }

    /// The version a namespace names.
    pub fn from_ns(ns: &str) -> Option<Version> {
        match ns {
            NS_V03 => Some(Version::V03),
            NS_V2 => Some(Version::V2),
            _ => None,
        }
    }

    /// PEP node of the device list.
    pub fn devices_node(self) -> &'static str {
        match self {
            Version::V03 => "eu.siacs.conversations.axolotl.devicelist",
            Version::V2 => "urn:xmpp:omemo:2:devices",
        }
    }

    /// PEP node of a device's bundle (0.3 has one node per device).
    pub fn bundle_node(self, device_id: u32) -> String {
        match self {
            Version::V03 => format!("eu.siacs.conversations.axolotl.bundles:{device_id}"),
            Version::V2 => "urn:xmpp:omemo:2:bundles".to_string(),
        }
    }

    pub(crate) fn x3dh_info(self) -> &'static [u8] {
        match self {
            Version::V03 => b"WhisperText",
            Version::V2 => b"OMEMO X3DH",
        }
    }

    pub(crate) fn root_info(self) -> &'static [u8] {
        match self {
            Version::V03 => b"WhisperRatchet",
            Version::V2 => b"OMEMO Root Chain",
        }
    }

    pub(crate) fn message_info(self) -> &'static [u8] {
        match self {
            Version::V03 => b"WhisperMessageKeys",
            Version::V2 => b"OMEMO Message Key Material",
        }
    }

    pub(crate) fn mac_len(self) -> usize {
        match self {
            Version::V03 => 8,
            Version::V2 => 16,
        }
    }

    /// How an identity key (Ed25519 form) is written into associated data.
    pub(crate) fn encode_identity(self, ed: &[u8; 32]) -> Option<Vec<u8>> {
        match self {
            Version::V03 => {
                let mont = keys::ed_to_mont(ed)?;
                let mut v = Vec::with_capacity(33);
                v.push(0x05);
                v.extend_from_slice(&mont);
                Some(v)
            }
            Version::V2 => Some(ed.to_vec()),
        }
    }

    /// How many bytes one encoded identity takes.
    pub(crate) fn identity_len(self) -> usize {
        match self {
            Version::V03 => 33,
            Version::V2 => 32,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V03 => "OMEMO 0.3",
            Version::V2 => "OMEMO 2",
        })
    }
}

/// Why an OMEMO operation failed. The texts carry no key material and no
/// message content: they are safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OmemoError {
    /// Bytes or XML that do not follow the format.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A bundle whose signed prekey signature does not verify.
    #[error("bundle signature does not verify")]
    BadSignature,
    /// A bundle without one-time prekeys.
    #[error("bundle has no one-time prekeys")]
    NoPreKeys,
    /// The message authentication code does not match (forged, altered,
    /// or for another session).
    #[error("message authentication failed")]
    BadMac,
    /// The payload's authentication tag does not match.
    #[error("payload authentication failed")]
    PayloadAuth,
    /// This message was decrypted before (a replay).
    #[error("message already decrypted (replay)")]
    Duplicate,
    /// The message skips more keys than allowed.
    #[error("message skips {0} keys, more than allowed")]
    TooManySkipped(u32),
    /// No session with the sending device and no key exchange in the message.
    #[error("no session with the sending device")]
    NoSession,
    /// The key exchange names a one-time prekey we do not have (used before,
    /// or never issued).
    #[error("one-time prekey {0} unknown or already used")]
    UnknownPreKey(u32),
    /// The key exchange names a signed prekey we no longer have.
    #[error("signed prekey {0} unknown")]
    UnknownSignedPreKey(u32),
    /// The key exchange's identity key is not the one known for the device.
    #[error("identity key does not match the device's known key")]
    IdentityMismatch,
    /// The element carries no key for this device.
    #[error("message not encrypted for this device")]
    NotForUs,
    /// A Diffie-Hellman result was all zeros (a low-order public key).
    #[error("weak public key")]
    WeakKey,
    /// The decrypted envelope names another sender.
    #[error("envelope sender does not match the stream")]
    SenderMismatch,
}

/// Result of OMEMO operations.
pub type Result<T> = std::result::Result<T, OmemoError>;

/// Serde helpers for byte arrays as base64 strings (compact in the sealed
/// JSON rows of the store).
pub(crate) mod b64 {
    use data_encoding::BASE64;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        v: &[u8; N],
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> std::result::Result<[u8; N], D::Error> {
        let s = String::deserialize(d)?;
        let v = BASE64
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("wrong key length"))
    }

    pub(crate) mod vec {
        use super::*;
        pub(crate) fn serialize<S: Serializer>(
            v: &[u8],
            s: S,
        ) -> std::result::Result<S::Ok, S::Error> {
            s.serialize_str(&BASE64.encode(v))
        }
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> std::result::Result<Vec<u8>, D::Error> {
            let s = String::deserialize(d)?;
            BASE64
                .decode(s.as_bytes())
                .map_err(serde::de::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests;
