//! The message payload, encrypted once for all recipient devices; its key
//! travels in each device's ratchet message.
//!
//! - 0.3: AES-128-GCM, 12-byte IV in the header; key material = key ‖ tag.
//! - OMEMO 2: a 32-byte key → HKDF(info "OMEMO Payload") → AES-256-CBC key,
//!   HMAC key, IV; key material = key ‖ HMAC-SHA-256(ciphertext)[..16].

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use super::ratchet::{cbc_decrypt, cbc_encrypt, derive, mac};
use super::{OmemoError, Result, Version};

/// An encrypted payload and the key material that opens it.
pub struct Sealed {
    /// What goes into each device's ratchet message.
    pub key_material: Zeroizing<Vec<u8>>,
    /// The `<payload/>`.
    pub payload: Vec<u8>,
    /// 0.3's `<iv/>`.
    pub iv: Option<Vec<u8>>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({} bytes)", self.payload.len())
    }
}

fn v2_keys(key: &[u8]) -> ([u8; 32], [u8; 32], [u8; 16]) {
    derive(b"OMEMO Payload", key)
}

/// Encrypts `plaintext`.
pub fn seal(
    v: Version,
    plaintext: &[u8],
    rng: &mut (impl rand::RngCore + rand::CryptoRng),
) -> Sealed {
    match v {
        Version::V03 => {
            let mut key = Zeroizing::new([0u8; 16]);
            rng.fill_bytes(key.as_mut());
            let mut iv = [0u8; 12];
            rng.fill_bytes(&mut iv);
            let cipher = Aes128Gcm::new(key.as_ref().into());
            // Encryption into a Vec cannot fail for messages this size.
            let mut ct = cipher
                .encrypt(Nonce::from_slice(&iv), plaintext)
                .unwrap_or_default();
            let tag = ct.split_off(ct.len().saturating_sub(16));
            let mut km = Zeroizing::new(key.to_vec());
            km.extend_from_slice(&tag);
            Sealed {
                key_material: km,
                payload: ct,
                iv: Some(iv.to_vec()),
            }
        }
        Version::V2 => {
            let mut key = Zeroizing::new([0u8; 32]);
            rng.fill_bytes(key.as_mut());
            let (mut e, mut a, iv) = v2_keys(key.as_ref());
            let ct = cbc_encrypt(&e, &iv, plaintext);
            let tag = mac(&a, &[&ct], 16);
            e.zeroize();
            a.zeroize();
            let mut km = Zeroizing::new(key.to_vec());
            km.extend_from_slice(&tag);
            Sealed {
                key_material: km,
                payload: ct,
                iv: None,
            }
        }
    }
}

/// Decrypts a payload with the key material from our ratchet message.
pub fn open(v: Version, key_material: &[u8], payload: &[u8], iv: Option<&[u8]>) -> Result<Vec<u8>> {
    match v {
        Version::V03 => {
            let iv = iv
                .filter(|i| i.len() == 12)
                .ok_or(OmemoError::Malformed("0.3 payload IV"))?;
            // Key ‖ tag: the tag is authenticated by our ratchet message.
            // (Very old clients sent a bare key with the tag in the payload,
            // where any other recipient could swap it: not accepted.)
            if key_material.len() != 32 {
                return Err(OmemoError::Malformed("0.3 key material"));
            }
            let key = &key_material[..16];
            let mut ct = payload.to_vec();
            ct.extend_from_slice(&key_material[16..]);
            let cipher =
                Aes128Gcm::new_from_slice(key).map_err(|_| OmemoError::Malformed("key"))?;
            cipher
                .decrypt(Nonce::from_slice(iv), ct.as_slice())
                .map_err(|_| OmemoError::PayloadAuth)
        }
        Version::V2 => {
            if key_material.len() != 48 {
                return Err(OmemoError::Malformed("OMEMO 2 key material"));
            }
            let (mut e, mut a, iv) = v2_keys(&key_material[..32]);
            let tag = mac(&a, &[payload], 16);
            a.zeroize();
            if !bool::from(tag.ct_eq(&key_material[32..])) {
                e.zeroize();
                return Err(OmemoError::PayloadAuth);
            }
            let pt = cbc_decrypt(&e, &iv, payload);
            e.zeroize();
            pt.ok_or(OmemoError::Malformed("OMEMO 2 payload padding"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_detect_tampering() {
        let mut rng = rand::rngs::OsRng;
        for v in Version::ALL {
            for len in [0usize, 1, 15, 16, 17, 1000] {
                let pt = vec![0xA5u8; len];
                let s = seal(v, &pt, &mut rng);
                assert_eq!(
                    open(v, &s.key_material, &s.payload, s.iv.as_deref()).expect("open"),
                    pt
                );
                let mut bad = s.payload.clone();
                if let Some(b) = bad.first_mut() {
                    *b ^= 1;
                    assert!(open(v, &s.key_material, &bad, s.iv.as_deref()).is_err());
                }
                let mut km = s.key_material.to_vec();
                let last = km.len() - 1;
                km[last] ^= 1;
                assert_eq!(
                    open(v, &km, &s.payload, s.iv.as_deref()),
                    Err(OmemoError::PayloadAuth)
                );
            }
        }
    }
}
