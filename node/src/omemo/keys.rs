//! Identity keys in their three forms, and signed-prekey signatures.
//!
//! A Coterie device has one Ed25519 identity key (the same key the invite
//! pins). X3DH needs it as an X25519 key: the secret scalar is the clamped
//! first half of SHA-512(seed) — the scalar Ed25519 itself uses — and the
//! public key is the Montgomery form of the Ed25519 point.
//!
//! OMEMO 2 publishes the Ed25519 key and signs the signed prekey with
//! Ed25519. OMEMO 0.3 publishes the Montgomery form; the signature carries
//! the Ed25519 sign bit in its otherwise unused top bit (the convention of
//! libsignal's `curve_sigs`), so a verifier can rebuild the Ed25519 key.

use curve25519_dalek::edwards::CompressedEdwardsY;
use curve25519_dalek::montgomery::MontgomeryPoint;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha512};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::{OmemoError, Result, Version};

/// Our identity key, ready for signing and key agreement.
pub struct Identity {
    signing: SigningKey,
    x: StaticSecret,
    mont: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity(..)")
    }
}

impl Identity {
    /// The identity of an Ed25519 seed.
    pub fn from_seed(seed: &[u8; 32]) -> Identity {
        let signing = SigningKey::from_bytes(seed);
        let mut h = Sha512::digest(seed);
        let mut scalar = Zeroizing::new([0u8; 32]);
        scalar.copy_from_slice(&h[..32]);
        zeroize::Zeroize::zeroize(h.as_mut_slice());
        let x = StaticSecret::from(*scalar);
        let mont = PublicKey::from(&x).to_bytes();
        Identity { signing, x, mont }
    }

    /// Ed25519 public key.
    pub fn ed_public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Curve25519 (Montgomery) public key.
    pub fn mont_public(&self) -> [u8; 32] {
        self.mont
    }

    /// X25519 with our identity key.
    pub(crate) fn dh(&self, their: &[u8; 32]) -> Result<[u8; 32]> {
        dh(&self.x, their)
    }

    /// The signature over a signed prekey, as the version publishes it.
    pub fn sign_spk(&self, v: Version, spk: &[u8; 32]) -> [u8; 64] {
        match v {
            Version::V2 => self.signing.sign(spk).to_bytes(),
            Version::V03 => {
                let mut msg = [0u8; 33];
                msg[0] = 0x05;
                msg[1..].copy_from_slice(spk);
                let mut sig = self.signing.sign(&msg).to_bytes();
                sig[63] |= self.ed_public()[31] & 0x80;
                sig
            }
        }
    }
}

/// X25519 that refuses low-order inputs (an all-zero shared secret).
pub(crate) fn dh(secret: &StaticSecret, their: &[u8; 32]) -> Result<[u8; 32]> {
    let shared = secret.diffie_hellman(&PublicKey::from(*their));
    if !shared.was_contributory() {
        return Err(OmemoError::WeakKey);
    }
    Ok(shared.to_bytes())
}

/// The Montgomery form of an Ed25519 public key.
pub fn ed_to_mont(ed: &[u8; 32]) -> Option<[u8; 32]> {
    let point = CompressedEdwardsY(*ed).decompress()?;
    Some(point.to_montgomery().to_bytes())
}

/// The Ed25519 key with the given sign bit whose Montgomery form is `mont`.
pub fn mont_to_ed(mont: &[u8; 32], sign: bool) -> Option<[u8; 32]> {
    let point = MontgomeryPoint(*mont).to_edwards(u8::from(sign))?;
    Some(point.compress().to_bytes())
}

/// Checks a bundle's signed prekey signature. `ik` is the Ed25519 form;
/// for 0.3 `sig` must already have its sign bit cleared (see
/// [`super::xml::Bundle`] parsing).
pub fn verify_spk(v: Version, ik: &[u8; 32], spk: &[u8; 32], sig: &[u8; 64]) -> Result<()> {
    let key = VerifyingKey::from_bytes(ik).map_err(|_| OmemoError::BadSignature)?;
    let sig = Signature::from_bytes(sig);
    let ok = match v {
        Version::V2 => key.verify_strict(spk, &sig).is_ok(),
        Version::V03 => {
            let mut msg = [0u8; 33];
            msg[0] = 0x05;
            msg[1..].copy_from_slice(spk);
            key.verify_strict(&msg, &sig).is_ok()
        }
    };
    if ok {
        Ok(())
    } else {
        Err(OmemoError::BadSignature)
    }
}

/// A fresh X25519 key pair: (secret bytes, public).
pub(crate) fn generate(
    rng: &mut (impl rand::RngCore + rand::CryptoRng),
) -> (Zeroizing<[u8; 32]>, [u8; 32]) {
    let mut sk = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(sk.as_mut());
    let public = PublicKey::from(&StaticSecret::from(*sk)).to_bytes();
    (sk, public)
}

/// The public key of a stored secret.
pub(crate) fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

/// X25519 with a stored secret.
pub(crate) fn dh_bytes(secret: &[u8; 32], their: &[u8; 32]) -> Result<[u8; 32]> {
    dh(&StaticSecret::from(*secret), their)
}

/// The fingerprint users compare: the Curve25519 form in hex, in groups of
/// eight (as Conversations, Dino and Gajim show it).
pub fn fingerprint(ed: &[u8; 32]) -> String {
    match ed_to_mont(ed) {
        Some(mont) => fingerprint_mont(&mont),
        None => "invalid key".into(),
    }
}

/// [`fingerprint`] of a key already in Montgomery form.
pub fn fingerprint_mont(mont: &[u8; 32]) -> String {
    let hex = data_encoding::HEXLOWER.encode(mont);
    hex.as_bytes()
        .chunks(8)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_forms_agree() {
        for i in 0..32u8 {
            let id = Identity::from_seed(&[i; 32]);
            let ed = id.ed_public();
            assert_eq!(ed_to_mont(&ed), Some(id.mont_public()));
            let sign = ed[31] & 0x80 != 0;
            assert_eq!(mont_to_ed(&id.mont_public(), sign), Some(ed));
        }
    }

    #[test]
    fn spk_signatures_verify_in_both_versions() {
        for i in 0..16u8 {
            let id = Identity::from_seed(&[i; 32]);
            let spk = [i.wrapping_add(7); 32];
            let s2 = id.sign_spk(Version::V2, &spk);
            verify_spk(Version::V2, &id.ed_public(), &spk, &s2).expect("v2");
            let mut s3 = id.sign_spk(Version::V03, &spk);
            // What a 0.3 verifier does: sign bit from the signature.
            let sign = s3[63] & 0x80 != 0;
            s3[63] &= 0x7f;
            let ed = mont_to_ed(&id.mont_public(), sign).expect("ed");
            verify_spk(Version::V03, &ed, &spk, &s3).expect("v03");
            assert!(verify_spk(Version::V03, &ed, &[0; 32], &s3).is_err());
            assert!(verify_spk(Version::V2, &ed, &spk, &s3).is_err());
        }
    }

    #[test]
    fn low_order_points_are_refused() {
        let id = Identity::from_seed(&[1; 32]);
        assert_eq!(id.dh(&[0; 32]), Err(OmemoError::WeakKey));
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(id.dh(&one), Err(OmemoError::WeakKey));
    }
}
