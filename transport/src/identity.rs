//! Node identity: an Ed25519 key, and the names derived from it.
//!
//! A node *is* its key. The same 32-byte public key names the node's TLS
//! identity (an RFC 7250 raw public key), its v3 onion address (Tor's
//! rend-spec-v3 §6: `base32(PUBKEY | CHECKSUM | VERSION) + ".onion"`), and the
//! fingerprint people compare when they verify each other.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::Digest as _;
use zeroize::Zeroizing;

/// Length of the onion address label (without `.onion`).
pub const ONION_LABEL_LEN: usize = 56;
const ONION_VERSION: u8 = 0x03;
const ONION_CHECKSUM_CONST: &[u8] = b".onion checksum";

/// A node's public identity: an Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; 32]);

/// Why bytes or text do not name a valid peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerIdError {
    /// The bytes are not a valid Ed25519 point.
    #[error("not a valid Ed25519 public key")]
    InvalidKey,
    /// The onion address has the wrong length or alphabet.
    #[error(
        "not a v3 onion address (expected 56 base32 characters, optionally followed by .onion)"
    )]
    BadOnionEncoding,
    /// The onion address' version byte is not 3.
    #[error("unsupported onion address version {0} (only v3 is supported)")]
    BadOnionVersion(u8),
    /// The onion address' checksum does not match: a typo or a forgery.
    #[error("onion address checksum mismatch (typo or tampered address)")]
    BadOnionChecksum,
}

impl PeerId {
    /// Builds a peer id from a 32-byte Ed25519 public key, checking it is a valid point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, PeerIdError> {
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| PeerIdError::InvalidKey)?;
        if key.is_weak() {
            return Err(PeerIdError::InvalidKey);
        }
        Ok(PeerId(bytes))
    }

    /// The raw 32-byte public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Verifies an Ed25519 signature by this peer.
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify(msg, &Signature::from_bytes(sig)).is_ok()
    }

    /// The 56-character v3 onion label (lowercase, without `.onion`).
    pub fn onion_label(&self) -> String {
        let mut raw = [0u8; 35];
        raw[..32].copy_from_slice(&self.0);
        raw[32..34].copy_from_slice(&onion_checksum(&self.0));
        raw[34] = ONION_VERSION;
        BASE32_NOPAD.encode(&raw).to_ascii_lowercase()
    }

    /// The onion address, `<label>.onion`.
    pub fn onion_address(&self) -> String {
        format!("{}.onion", self.onion_label())
    }

    /// Parses a v3 onion address (with or without `.onion`, any case).
    pub fn from_onion(s: &str) -> Result<Self, PeerIdError> {
        let label = s.strip_suffix(".onion").unwrap_or(s);
        if label.len() != ONION_LABEL_LEN {
            return Err(PeerIdError::BadOnionEncoding);
        }
        let raw = BASE32_NOPAD
            .decode(label.to_ascii_uppercase().as_bytes())
            .map_err(|_| PeerIdError::BadOnionEncoding)?;
        let raw: [u8; 35] = raw.try_into().map_err(|_| PeerIdError::BadOnionEncoding)?;
        if raw[34] != ONION_VERSION {
            return Err(PeerIdError::BadOnionVersion(raw[34]));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&raw[..32]);
        if raw[32..34] != onion_checksum(&key) {
            return Err(PeerIdError::BadOnionChecksum);
        }
        PeerId::from_bytes(key)
    }

    /// The full fingerprint people compare: SHA-256 of the key, 16 groups of 4 hex digits.
    pub fn fingerprint(&self) -> String {
        let digest = sha2::Sha256::digest(self.0);
        let hex = data_encoding::HEXLOWER.encode(&digest);
        hex.as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The fingerprint without spaces, for prefix matching.
    pub fn fingerprint_compact(&self) -> String {
        data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(self.0))
    }

    /// A short id for logs: the first 8 hex digits of the fingerprint. Not
    /// enough to recover the key or the onion address, enough to tell peers
    /// apart in one log.
    pub fn short(&self) -> String {
        self.fingerprint_compact()[..8].to_string()
    }

    /// The DER SubjectPublicKeyInfo of this key (RFC 8410), as carried in an
    /// RFC 7250 raw-public-key TLS handshake.
    pub fn to_spki_der(&self) -> Vec<u8> {
        let mut der = Vec::with_capacity(44);
        der.extend_from_slice(&ED25519_SPKI_PREFIX);
        der.extend_from_slice(&self.0);
        der
    }

    /// Parses an RFC 8410 Ed25519 SubjectPublicKeyInfo. Anything else is refused.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, PeerIdError> {
        let key = der
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .ok_or(PeerIdError::InvalidKey)?;
        let key: [u8; 32] = key.try_into().map_err(|_| PeerIdError::InvalidKey)?;
        PeerId::from_bytes(key)
    }
}

/// `SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING (33 bytes) }` before the key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn onion_checksum(key: &[u8; 32]) -> [u8; 2] {
    let mut h = sha3::Sha3_256::new();
    h.update(ONION_CHECKSUM_CONST);
    h.update(key);
    h.update([ONION_VERSION]);
    let d = h.finalize();
    [d[0], d[1]]
}

impl fmt::Debug for PeerId {
    // Short form only: Debug output ends up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl FromStr for PeerId {
    type Err = PeerIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PeerId::from_onion(s)
    }
}

/// A node's secret identity key. Zeroized on drop; never printed.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's RNG.
    pub fn generate() -> Self {
        SecretKey(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Restores a key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed, for storing in the encrypted profile.
    pub fn to_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public identity.
    pub fn peer_id(&self) -> PeerId {
        PeerId(self.0.verifying_key().to_bytes())
    }

    /// X25519 between this key and `peer`'s, both converted from Ed25519
    /// (the secret scalar is Ed25519's own: clamped SHA-512(seed)[..32];
    /// the public key is the Edwards point's Montgomery form). Both sides
    /// get the same 32 bytes; `None` for a low-order peer key. Used for
    /// secrets two contacts share without talking (LAN discovery).
    pub fn agree(&self, peer: &PeerId) -> Option<Zeroizing<[u8; 32]>> {
        use sha2::Digest as _;
        let mut h = sha2::Sha512::digest(self.0.to_bytes());
        let mut scalar = Zeroizing::new([0u8; 32]);
        scalar.copy_from_slice(&h[..32]);
        zeroize::Zeroize::zeroize(h.as_mut_slice());
        let their = curve25519_dalek::edwards::CompressedEdwardsY(peer.0)
            .decompress()?
            .to_montgomery()
            .to_bytes();
        let secret = x25519_dalek::StaticSecret::from(*scalar);
        let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(their));
        shared
            .was_contributory()
            .then(|| Zeroizing::new(shared.to_bytes()))
    }

    /// Signs `msg` with the identity key.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    /// PKCS#8 v1 DER of the private key, for handing to the TLS stack.
    pub(crate) fn to_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        // RFC 8410 §7: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
        let mut der = Zeroizing::new(Vec::with_capacity(48));
        der.extend_from_slice(&[
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ]);
        der.extend_from_slice(self.0.as_bytes());
        der
    }
}

impl Clone for SecretKey {
    fn clone(&self) -> Self {
        SecretKey(self.0.clone())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(for {})", self.peer_id().short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn onion_address_matches_tor_rend_spec_vector() {
        // Public key of the onion address in Tor's own test suite
        // (src/test/test_hs_common.c, test_build_address): the expected
        // address is "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkenl5sid".
        let pubkey_hex = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        let bytes: [u8; 32] = data_encoding::HEXLOWER
            .decode(pubkey_hex.as_bytes())
            .expect("hex")
            .try_into()
            .expect("32 bytes");
        let id = PeerId::from_bytes(bytes).expect("valid key");
        assert_eq!(
            id.onion_label(),
            "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkenl5sid"
        );
    }

    #[test]
    fn onion_checksum_catches_a_typo() {
        let id = SecretKey::generate().peer_id();
        let mut s = id.onion_label().into_bytes();
        s[10] = if s[10] == b'a' { b'b' } else { b'a' };
        let s = String::from_utf8(s).expect("ascii");
        assert!(matches!(
            PeerId::from_onion(&s),
            Err(PeerIdError::BadOnionChecksum | PeerIdError::InvalidKey)
        ));
    }

    #[test]
    fn onion_rejects_wrong_length_and_version() {
        assert_eq!(
            PeerId::from_onion("abc.onion"),
            Err(PeerIdError::BadOnionEncoding)
        );
        let id = SecretKey::generate().peer_id();
        let mut raw = [0u8; 35];
        raw[..32].copy_from_slice(id.as_bytes());
        raw[34] = 2;
        let label = BASE32_NOPAD.encode(&raw).to_ascii_lowercase();
        assert_eq!(
            PeerId::from_onion(&label),
            Err(PeerIdError::BadOnionVersion(2))
        );
    }

    #[test]
    fn spki_rejects_other_algorithms() {
        let id = SecretKey::generate().peer_id();
        let mut der = id.to_spki_der();
        der[8] = 0x71; // Ed448's OID ends in 113
        assert!(PeerId::from_spki_der(&der).is_err());
        assert!(PeerId::from_spki_der(&id.to_spki_der()[..40]).is_err());
    }

    #[test]
    fn signatures_verify_only_for_the_signer() {
        let a = SecretKey::generate();
        let b = SecretKey::generate();
        let sig = a.sign(b"hello");
        assert!(a.peer_id().verify(b"hello", &sig));
        assert!(!b.peer_id().verify(b"hello", &sig));
        assert!(!a.peer_id().verify(b"hellO", &sig));
    }

    #[test]
    fn debug_never_prints_the_full_key() {
        let k = SecretKey::generate();
        let dbg = format!("{:?} {:?}", k, k.peer_id());
        assert!(!dbg.contains(&k.peer_id().onion_label()));
        assert!(!dbg.contains(&data_encoding::HEXLOWER.encode(k.to_seed().as_ref())));
    }

    proptest! {
        #[test]
        fn onion_roundtrip(seed in any::<[u8; 32]>()) {
            let id = SecretKey::from_seed(&seed).peer_id();
            prop_assert_eq!(PeerId::from_onion(&id.onion_address()), Ok(id));
            prop_assert_eq!(PeerId::from_onion(&id.onion_label().to_uppercase()), Ok(id));
        }

        #[test]
        fn spki_roundtrip(seed in any::<[u8; 32]>()) {
            let id = SecretKey::from_seed(&seed).peer_id();
            prop_assert_eq!(PeerId::from_spki_der(&id.to_spki_der()), Ok(id));
        }

        #[test]
        fn onion_parser_never_panics(s in "\\PC{0,80}") {
            let _ = PeerId::from_onion(&s);
        }
    }
}

#[cfg(test)]
mod agree_tests {
    use super::*;

    #[test]
    fn both_sides_agree_and_third_parties_differ() {
        let a = SecretKey::from_seed(&[1; 32]);
        let b = SecretKey::from_seed(&[2; 32]);
        let c = SecretKey::from_seed(&[3; 32]);
        let ab = a.agree(&b.peer_id()).expect("ab");
        assert_eq!(*ab, *b.agree(&a.peer_id()).expect("ba"));
        assert_ne!(*ab, *a.agree(&c.peer_id()).expect("ac"));
    }
}
