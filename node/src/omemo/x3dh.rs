//! X3DH key agreement (with a one-time prekey, as OMEMO requires).
//!
//! `SK = HKDF-SHA-256(salt = 0³², ikm = 0xFF³² ‖ DH1 ‖ DH2 ‖ DH3 ‖ DH4, info)`
//! with DH1 = DH(IK_A, SPK_B), DH2 = DH(EK_A, IK_B), DH3 = DH(EK_A, SPK_B),
//! DH4 = DH(EK_A, OPK_B). The associated data is the active side's encoded
//! identity key followed by the passive side's.

use hkdf::Hkdf;
use rand::seq::SliceRandom;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::xml::Bundle;
use super::{Identity, OmemoError, Result, Version, keys};

/// What the active side gets out of X3DH.
pub struct Active {
    /// The shared secret.
    pub shared: Zeroizing<[u8; 32]>,
    /// Associated data: active ‖ passive identity.
    pub ad: Vec<u8>,
    /// Our ephemeral public key.
    pub ek: [u8; 32],
    /// The one-time prekey we used.
    pub pk_id: u32,
}

impl std::fmt::Debug for Active {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "x3dh::Active(pk {})", self.pk_id)
    }
}

fn kdf(v: Version, dhs: [Zeroizing<[u8; 32]>; 4]) -> Zeroizing<[u8; 32]> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * 5));
    ikm.extend_from_slice(&[0xFF; 32]);
    for d in &dhs {
        ikm.extend_from_slice(d.as_ref());
    }
    let hk = Hkdf::<Sha256>::new(Some(&[0u8; 32]), &ikm);
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA-256's limit.
    hk.expand(v.x3dh_info(), out.as_mut())
        .unwrap_or_else(|_| unreachable!());
    out
}

/// Starts a session from `bundle` (its signature was checked when it was
/// parsed, and is checked again here).
pub fn active(
    v: Version,
    own: &Identity,
    bundle: &Bundle,
    rng: &mut (impl rand::RngCore + rand::CryptoRng),
) -> Result<Active> {
    keys::verify_spk(v, &bundle.ik, &bundle.spk, &bundle.spk_sig)?;
    let &(pk_id, pk) = bundle.prekeys.choose(rng).ok_or(OmemoError::NoPreKeys)?;
    let their_ik = keys::ed_to_mont(&bundle.ik).ok_or(OmemoError::Malformed("identity key"))?;
    let (ek_secret, ek) = keys::generate(rng);
    let dh1 = Zeroizing::new(own.dh(&bundle.spk)?);
    let dh2 = Zeroizing::new(keys::dh_bytes(&ek_secret, &their_ik)?);
    let dh3 = Zeroizing::new(keys::dh_bytes(&ek_secret, &bundle.spk)?);
    let dh4 = Zeroizing::new(keys::dh_bytes(&ek_secret, &pk)?);
    let shared = kdf(v, [dh1, dh2, dh3, dh4]);
    let mut ad = v
        .encode_identity(&own.ed_public())
        .ok_or(OmemoError::Malformed("identity key"))?;
    ad.extend(
        v.encode_identity(&bundle.ik)
            .ok_or(OmemoError::Malformed("identity key"))?,
    );
    Ok(Active {
        shared,
        ad,
        ek,
        pk_id,
    })
}

/// The passive side: `their_ik` is the initiator's identity in Montgomery
/// form, `their_ik_enc` as the version encodes it in associated data.
pub fn passive(
    v: Version,
    own: &Identity,
    spk: &[u8; 32],
    opk: &[u8; 32],
    their_ik: &[u8; 32],
    their_ik_enc: &[u8],
    ek: &[u8; 32],
) -> Result<(Zeroizing<[u8; 32]>, Vec<u8>)> {
    let dh1 = Zeroizing::new(keys::dh_bytes(spk, their_ik)?);
    let dh2 = Zeroizing::new(own.dh(ek)?);
    let dh3 = Zeroizing::new(keys::dh_bytes(spk, ek)?);
    let dh4 = Zeroizing::new(keys::dh_bytes(opk, ek)?);
    let shared = kdf(v, [dh1, dh2, dh3, dh4]);
    let mut ad = their_ik_enc.to_vec();
    ad.extend(
        v.encode_identity(&own.ed_public())
            .ok_or(OmemoError::Malformed("identity key"))?,
    );
    Ok((shared, ad))
}
