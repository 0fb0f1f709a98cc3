//! Encryption at rest: a passphrase-derived key wraps a random data key, and
//! the data key seals every stored value.
//!
//! ```text
//! passphrase ──Argon2id(salt, m, t, p)──▶ KEK ──XChaCha20-Poly1305──▶ wrapped data key (meta table)
//! data key ──XChaCha20-Poly1305(aad = table ‖ key)──▶ every value in every other table
//! ```
//!
//! Binding the table name and row key into the AEAD's associated data means a
//! sealed value cannot be moved to another row or table without detection.
//! Plaintexts are padded to a multiple of [`PAD_TO`] bytes before sealing so
//! that stored sizes say little about message lengths.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Plaintexts are padded to a multiple of this many bytes.
pub(crate) const PAD_TO: usize = 64;
const WRAP_AAD: &[u8] = b"coterie profile data key v1";

/// Argon2id parameters, recorded in the profile so they can change later.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Lanes.
    pub p: u32,
    /// Random salt, hex.
    pub salt: String,
}

impl KdfParams {
    /// The defaults: RFC 9106's second recommended option (64 MiB, t=3), one lane.
    pub fn recommended() -> Self {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        KdfParams {
            m_kib: 64 * 1024,
            t: 3,
            p: 1,
            salt: data_encoding::HEXLOWER.encode(&salt),
        }
    }
}

/// Why a key could not be derived or unwrapped.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The recorded KDF parameters are unusable (corrupt profile header).
    #[error("the profile's key-derivation parameters are invalid")]
    BadParams,
    /// The passphrase does not unlock the data key.
    #[error("wrong passphrase")]
    WrongPassphrase,
}

/// Derives the key-encryption key from a passphrase.
pub(crate) fn derive_kek(
    passphrase: &str,
    params: &KdfParams,
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let salt = data_encoding::HEXLOWER
        .decode(params.salt.as_bytes())
        .map_err(|_| KeyError::BadParams)?;
    let p = argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
        .map_err(|_| KeyError::BadParams)?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(passphrase.as_bytes(), &salt, out.as_mut())
        .map_err(|_| KeyError::BadParams)?;
    Ok(out)
}

/// The key that seals stored values.
pub(crate) struct DataKey {
    cipher: XChaCha20Poly1305,
    index: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Why a stored value could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("a stored value failed authentication (corrupt or tampered profile)")]
pub struct SealError;

impl DataKey {
    /// A fresh random data key, and its bytes (to be wrapped).
    pub(crate) fn generate() -> (Self, Zeroizing<[u8; 32]>) {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(k.as_mut());
        (DataKey::from_raw(&k), k)
    }

    /// Wraps the data key under the KEK.
    pub(crate) fn wrap(kek: &[u8; 32], key: &[u8; 32]) -> Vec<u8> {
        seal_raw(&XChaCha20Poly1305::new(kek.into()), key, WRAP_AAD)
    }

    /// Unwraps the data key; fails on a wrong passphrase.
    pub(crate) fn unwrap_with(kek: &[u8; 32], wrapped: &[u8]) -> Result<Self, KeyError> {
        let key = open_raw(&XChaCha20Poly1305::new(kek.into()), wrapped, WRAP_AAD)
            .map_err(|_| KeyError::WrongPassphrase)?;
        let key = Zeroizing::new(key);
        if key.len() != 32 {
            return Err(KeyError::WrongPassphrase);
        }
        let raw: [u8; 32] = key
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongPassphrase)?;
        let raw = Zeroizing::new(raw);
        Ok(DataKey::from_raw(&raw))
    }

    fn from_raw(raw: &[u8; 32]) -> Self {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(b"coterie store index key v1");
        h.update(raw);
        let mut index = Zeroizing::new([0u8; 32]);
        index.copy_from_slice(&h.finalize());
        DataKey {
            cipher: XChaCha20Poly1305::new(raw.into()),
            index,
        }
    }

    /// A keyed hash for turning identifying values into opaque row keys.
    pub(crate) fn index_of(&self, domain: &str, value: &[u8]) -> u64 {
        use hmac::{Mac as _, SimpleHmac};
        let Ok(mut m) =
            <SimpleHmac<sha2::Sha256> as hmac::Mac>::new_from_slice(self.index.as_ref())
        else {
            return 0;
        };
        m.update(domain.as_bytes());
        m.update(&[0]);
        m.update(value);
        let out = m.finalize().into_bytes();
        let mut b = [0u8; 8];
        b.copy_from_slice(&out[..8]);
        u64::from_le_bytes(b)
    }

    /// Seals a value for `table` at row `key`, padding it first.
    pub(crate) fn seal(&self, table: &str, key: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut padded = Zeroizing::new(Vec::with_capacity(plaintext.len() + PAD_TO + 4));
        padded.extend_from_slice(&(plaintext.len() as u32).to_le_bytes());
        padded.extend_from_slice(plaintext);
        let target = padded.len().div_ceil(PAD_TO) * PAD_TO;
        padded.resize(target, 0);
        seal_raw(&self.cipher, &padded, &aad(table, key))
    }

    /// Opens a value sealed for `table` at row `key`.
    pub(crate) fn open(
        &self,
        table: &str,
        key: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let padded = Zeroizing::new(open_raw(&self.cipher, sealed, &aad(table, key))?);
        let len_bytes: [u8; 4] = padded
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(SealError)?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        let body = padded.get(4..4 + len).ok_or(SealError)?;
        Ok(Zeroizing::new(body.to_vec()))
    }
}

fn aad(table: &str, key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(table.len() + 1 + key.len());
    a.extend_from_slice(table.as_bytes());
    a.push(0);
    a.extend_from_slice(key);
    a
}

fn seal_raw(c: &XChaCha20Poly1305, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut out = nonce.to_vec();
    // Encryption with a valid key and in-memory buffers cannot fail.
    #[allow(clippy::expect_used)]
    let ct = c
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("XChaCha20-Poly1305 encryption is infallible for in-memory buffers");
    out.extend_from_slice(&ct);
    out
}

fn open_raw(c: &XChaCha20Poly1305, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() < 24 + 16 {
        return Err(SealError);
    }
    let (nonce, ct) = sealed.split_at(24);
    c.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| SealError)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fast_params() -> KdfParams {
        KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
            salt: "00112233445566778899aabbccddeeff".into(),
        }
    }

    #[test]
    fn wrong_passphrase_is_detected() {
        let p = fast_params();
        let kek = derive_kek("correct horse", &p).expect("kdf");
        let (_, raw) = DataKey::generate();
        let wrapped = DataKey::wrap(&kek, &raw);
        assert!(DataKey::unwrap_with(&kek, &wrapped).is_ok());
        let bad = derive_kek("correct hose", &p).expect("kdf");
        assert!(matches!(
            DataKey::unwrap_with(&bad, &wrapped),
            Err(KeyError::WrongPassphrase)
        ));
    }

    #[test]
    fn sealed_values_are_bound_to_their_row() {
        let (k, _) = DataKey::generate();
        let s = k.seal("messages", &[1, 2], b"hello");
        assert_eq!(
            k.open("messages", &[1, 2], &s).expect("open").as_slice(),
            b"hello"
        );
        assert!(k.open("messages", &[1, 3], &s).is_err());
        assert!(k.open("contacts", &[1, 2], &s).is_err());
    }

    #[test]
    fn sealed_sizes_are_padded() {
        let (k, _) = DataKey::generate();
        let a = k.seal("t", b"", b"a");
        let b = k.seal("t", b"", &[b'x'; 50]);
        assert_eq!(a.len(), b.len());
        assert!(!a.windows(5).any(|w| w == b"hello"));
    }

    #[test]
    fn bad_params_are_an_error_not_a_panic() {
        let mut p = fast_params();
        p.salt = "zz".into();
        assert!(matches!(derive_kek("x", &p), Err(KeyError::BadParams)));
        let mut p = fast_params();
        p.m_kib = 0;
        assert!(matches!(derive_kek("x", &p), Err(KeyError::BadParams)));
    }

    proptest! {
        #[test]
        fn seal_open_roundtrip(data in proptest::collection::vec(any::<u8>(), 0..2000), key in proptest::collection::vec(any::<u8>(), 0..16)) {
            let (k, _) = DataKey::generate();
            let s = k.seal("t", &key, &data);
            prop_assert_eq!(s.len() % PAD_TO, (24 + 16) % PAD_TO);
            let opened = k.open("t", &key, &s).expect("open");
            prop_assert_eq!(opened.as_slice(), data.as_slice());
        }

        #[test]
        fn open_never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (k, _) = DataKey::generate();
            prop_assert!(k.open("t", b"", &data).is_err());
        }
    }
}
