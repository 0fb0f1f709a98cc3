//! The Double Ratchet as OMEMO uses it, with each version's message framing.
//!
//! Root chain: HKDF-SHA-256(salt = root key, ikm = DH output, info) → new
//! root key ‖ chain key. Message chains: message key = HMAC(ck, 0x01),
//! next chain key = HMAC(ck, 0x02). A message key becomes AES-256-CBC key,
//! HMAC key and IV through HKDF(salt = 0³², info = version's label).

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::proto::{v2, v03};
use super::{OmemoError, Result, Version, b64, keys};

type HmacSha256 = Hmac<Sha256>;

/// At most this many keys are skipped by one message (python-omemo's default).
pub const MAX_SKIP_PER_MESSAGE: u32 = 1000;
/// At most this many skipped keys are kept per session; the oldest go first.
pub const MAX_SKIPPED_KEYS: usize = 1000;
/// Skipped keys older than this are dropped (seconds: 30 days).
pub const SKIPPED_KEY_TTL: u64 = 30 * 24 * 3600;

/// A message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Sender's ratchet public key.
    pub dh: [u8; 32],
    /// Length of the sender's previous sending chain.
    pub pn: u32,
    /// Index of this message in its chain.
    pub n: u32,
}

/// A parsed ratchet message: header, MAC, the bytes the MAC covers, and
/// the ciphertext.
#[derive(Clone, Debug)]
pub struct Wire {
    /// The header.
    pub header: Header,
    mac: Vec<u8>,
    covered: Vec<u8>,
    ciphertext: Vec<u8>,
}

fn arr32(v: &[u8]) -> Option<[u8; 32]> {
    v.try_into().ok()
}

impl Wire {
    /// Parses a ratchet message of the given version.
    pub fn parse(v: Version, bytes: &[u8]) -> Result<Wire> {
        match v {
            Version::V03 => {
                let mac_at = bytes
                    .len()
                    .checked_sub(8)
                    .filter(|&n| n >= 1)
                    .ok_or(OmemoError::Malformed("0.3 message: too short"))?;
                let (covered, mac) = bytes.split_at(mac_at);
                if covered[0] != 0x33 {
                    return Err(OmemoError::Malformed("0.3 message: version byte"));
                }
                let m = v03::Message::decode(&covered[1..])
                    .map_err(|_| OmemoError::Malformed("0.3 message: protobuf"))?;
                let dh = m
                    .dh_pub
                    .as_deref()
                    .and_then(parse_djb)
                    .ok_or(OmemoError::Malformed("0.3 message: ratchet key"))?;
                Ok(Wire {
                    header: Header {
                        dh,
                        pn: m.pn.ok_or(OmemoError::Malformed("0.3 message: pn"))?,
                        n: m.n.ok_or(OmemoError::Malformed("0.3 message: n"))?,
                    },
                    mac: mac.to_vec(),
                    covered: covered.to_vec(),
                    ciphertext: m
                        .ciphertext
                        .ok_or(OmemoError::Malformed("0.3 message: ciphertext"))?,
                })
            }
            Version::V2 => {
                let a = v2::AuthenticatedMessage::decode(bytes)
                    .map_err(|_| OmemoError::Malformed("OMEMO 2 message: protobuf"))?;
                let (Some(mac), Some(covered)) = (a.mac, a.message) else {
                    return Err(OmemoError::Malformed("OMEMO 2 message: fields"));
                };
                let m = v2::Message::decode(covered.as_slice())
                    .map_err(|_| OmemoError::Malformed("OMEMO 2 message: protobuf"))?;
                let dh = m
                    .dh_pub
                    .as_deref()
                    .and_then(arr32)
                    .ok_or(OmemoError::Malformed("OMEMO 2 message: ratchet key"))?;
                Ok(Wire {
                    header: Header {
                        dh,
                        pn: m.pn.ok_or(OmemoError::Malformed("OMEMO 2 message: pn"))?,
                        n: m.n.ok_or(OmemoError::Malformed("OMEMO 2 message: n"))?,
                    },
                    mac,
                    covered,
                    ciphertext: m
                        .ciphertext
                        .ok_or(OmemoError::Malformed("OMEMO 2 message: ciphertext"))?,
                })
            }
        }
    }
}

/// `0x05 ‖ key` (libsignal's "DJB" key type) → key.
pub(crate) fn parse_djb(v: &[u8]) -> Option<[u8; 32]> {
    match v {
        [0x05, rest @ ..] => arr32(rest),
        _ => None,
    }
}

/// key → `0x05 ‖ key`.
pub(crate) fn djb(k: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(33);
    v.push(0x05);
    v.extend_from_slice(k);
    v
}

/// A symmetric chain.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[allow(missing_debug_implementations)]
pub struct Chain {
    #[serde(with = "b64")]
    key: [u8; 32],
    /// Messages taken from this chain.
    pub n: u32,
}

impl Chain {
    fn new(key: [u8; 32]) -> Chain {
        Chain { key, n: 0 }
    }

    fn step(&mut self) -> [u8; 32] {
        let mk = hmac32(&self.key, &[0x01]);
        self.key = hmac32(&self.key, &[0x02]);
        // 2³² messages in one chain do not happen; never wrap or panic.
        self.n = self.n.saturating_add(1);
        mk
    }
}

fn hmac32(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data);
    m.finalize().into_bytes().into()
}

fn hmac_parts(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// A message key that was skipped over, kept for a late message.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[allow(missing_debug_implementations)]
pub struct SkippedKey {
    #[serde(with = "b64")]
    dh: [u8; 32],
    n: u32,
    #[serde(with = "b64")]
    key: [u8; 32],
    /// Unix seconds when it was skipped.
    at: u64,
}

/// One Double Ratchet.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct Ratchet {
    #[zeroize(skip)]
    version: Version,
    #[serde(with = "b64")]
    root: [u8; 32],
    #[serde(with = "b64")]
    own_priv: [u8; 32],
    /// Public half of `own_priv` (kept: a scalar multiplication per message
    /// is most of the cost of encrypting).
    #[serde(with = "b64")]
    own_pub: [u8; 32],
    #[serde(with = "b64")]
    other_pub: [u8; 32],
    send: Chain,
    recv: Option<Chain>,
    pn: u32,
    skipped: Vec<SkippedKey>,
}

impl std::fmt::Debug for Ratchet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ratchet({}, sent {}, received {:?}, {} skipped)",
            self.version,
            self.send.n,
            self.recv.as_ref().map(|c| c.n),
            self.skipped.len()
        )
    }
}

impl Ratchet {
    fn root_step(&mut self) -> Result<[u8; 32]> {
        let shared = zeroize::Zeroizing::new(keys::dh_bytes(&self.own_priv, &self.other_pub)?);
        let hk = Hkdf::<Sha256>::new(Some(&self.root), shared.as_ref());
        let mut okm = [0u8; 64];
        hk.expand(self.version.root_info(), &mut okm)
            .map_err(|_| OmemoError::Malformed("hkdf"))?;
        self.root.copy_from_slice(&okm[..32]);
        let mut ck = [0u8; 32];
        ck.copy_from_slice(&okm[32..]);
        okm.zeroize();
        Ok(ck)
    }

    /// The ratchet of the side that started the session (after X3DH).
    pub fn active(
        version: Version,
        shared: [u8; 32],
        their_spk: [u8; 32],
        rng: &mut (impl rand::RngCore + rand::CryptoRng),
    ) -> Result<Ratchet> {
        let (own, own_pub) = keys::generate(rng);
        let mut r = Ratchet {
            version,
            root: shared,
            own_priv: *own,
            own_pub,
            other_pub: their_spk,
            send: Chain::new([0; 32]),
            recv: None,
            pn: 0,
            skipped: Vec::new(),
        };
        r.send = Chain::new(r.root_step()?);
        Ok(r)
    }

    /// The ratchet of the side that received the key exchange.
    pub fn passive(
        version: Version,
        shared: [u8; 32],
        own_spk: &[u8; 32],
        their_ratchet: [u8; 32],
        rng: &mut (impl rand::RngCore + rand::CryptoRng),
    ) -> Result<Ratchet> {
        let mut r = Ratchet {
            version,
            root: shared,
            own_priv: *own_spk,
            own_pub: [0; 32],
            other_pub: their_ratchet,
            send: Chain::new([0; 32]),
            recv: None,
            pn: 0,
            skipped: Vec::new(),
        };
        r.recv = Some(Chain::new(r.root_step()?));
        let (own, own_pub) = keys::generate(rng);
        r.own_priv = *own;
        r.own_pub = own_pub;
        r.send = Chain::new(r.root_step()?);
        Ok(r)
    }

    /// Messages sent in the current sending chain.
    pub fn sending_chain_length(&self) -> u32 {
        self.send.n
    }

    /// Messages received in the current receiving chain.
    pub fn receiving_chain_length(&self) -> Option<u32> {
        self.recv.as_ref().map(|c| c.n)
    }

    /// Skipped keys held.
    pub fn skipped_len(&self) -> usize {
        self.skipped.len()
    }

    /// Encrypts `plaintext` (key material) with associated data `ad`
    /// (sender's and receiver's encoded identity keys, as the version
    /// orders them). Returns the serialized, authenticated message.
    pub fn encrypt(&mut self, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let header = Header {
            dh: self.own_pub,
            pn: self.pn,
            n: self.send.n,
        };
        let mut mk = self.send.step();
        let out = seal(self.version, &mk, ad, header, plaintext);
        mk.zeroize();
        out
    }

    /// Decrypts a message. On any error the ratchet is unchanged.
    pub fn decrypt(&mut self, ad: &[u8], wire: &Wire, now: u64) -> Result<Vec<u8>> {
        self.decrypt_skipping(ad, wire, now, MAX_SKIP_PER_MESSAGE)
    }

    /// [`Ratchet::decrypt`], deriving at most `max_skip` keys per chain
    /// before the MAC is checked (the work a forged message can cause).
    pub fn decrypt_skipping(
        &mut self,
        ad: &[u8],
        wire: &Wire,
        now: u64,
        max_skip: u32,
    ) -> Result<Vec<u8>> {
        let h = wire.header;
        if let Some(i) = self.skipped.iter().position(|s| s.dh == h.dh && s.n == h.n) {
            let pt = open(self.version, &self.skipped[i].key, ad, wire)?;
            self.skipped.remove(i);
            return Ok(pt);
        }
        let mut trial = self.clone();
        let mut fresh = Vec::new();
        let mut mk = trial.advance(h, now, max_skip.min(MAX_SKIP_PER_MESSAGE), &mut fresh)?;
        let pt = open(self.version, &mk, ad, wire);
        mk.zeroize();
        let pt = pt?;
        trial.skipped.extend(fresh);
        trial
            .skipped
            .retain(|s| now.saturating_sub(s.at) <= SKIPPED_KEY_TTL);
        if trial.skipped.len() > MAX_SKIPPED_KEYS {
            let drop = trial.skipped.len() - MAX_SKIPPED_KEYS;
            trial.skipped.drain(..drop);
        }
        *self = trial;
        Ok(pt)
    }

    /// Moves the receiving side forward to the message key for `h`.
    fn advance(
        &mut self,
        h: Header,
        now: u64,
        max_skip: u32,
        fresh: &mut Vec<SkippedKey>,
    ) -> Result<[u8; 32]> {
        if h.dh != self.other_pub {
            if let Some(recv) = self.recv.as_mut() {
                let skip = h.pn.saturating_sub(recv.n);
                // Like python-omemo: too many keys of the old chain are
                // simply not kept, but the new chain is still accepted.
                if skip <= max_skip {
                    for _ in 0..skip {
                        let n = recv.n;
                        let key = recv.step();
                        fresh.push(SkippedKey {
                            dh: self.other_pub,
                            n,
                            key,
                            at: now,
                        });
                    }
                }
            }
            self.other_pub = h.dh;
            self.recv = Some(Chain::new(self.root_step()?));
            let (own, own_pub) = keys::generate(&mut rand::rngs::OsRng);
            self.own_priv = *own;
            self.own_pub = own_pub;
            self.pn = self.send.n;
            self.send = Chain::new(self.root_step()?);
        }
        let recv = self
            .recv
            .as_mut()
            .ok_or(OmemoError::Malformed("no receiving chain"))?;
        if h.n < recv.n {
            return Err(OmemoError::Duplicate);
        }
        let skip = h.n - recv.n;
        if skip > max_skip {
            return Err(OmemoError::TooManySkipped(skip));
        }
        for _ in 0..skip {
            let n = recv.n;
            let key = recv.step();
            fresh.push(SkippedKey {
                dh: h.dh,
                n,
                key,
                at: now,
            });
        }
        Ok(recv.step())
    }
}

/// The AES key, HMAC key and IV of a key: HKDF-SHA-256(salt 0³², info) → 80 bytes.
pub(crate) fn derive(info: &[u8], key: &[u8]) -> ([u8; 32], [u8; 32], [u8; 16]) {
    let hk = Hkdf::<Sha256>::new(Some(&[0u8; 32]), key);
    let mut okm = [0u8; 80];
    // 80 bytes is far below HKDF-SHA-256's limit.
    hk.expand(info, &mut okm).unwrap_or_else(|_| unreachable!());
    let mut e = [0u8; 32];
    let mut a = [0u8; 32];
    let mut iv = [0u8; 16];
    e.copy_from_slice(&okm[..32]);
    a.copy_from_slice(&okm[32..64]);
    iv.copy_from_slice(&okm[64..]);
    okm.zeroize();
    (e, a, iv)
}

type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// AES-256-CBC with PKCS#7.
pub(crate) fn cbc_encrypt(key: &[u8; 32], iv: &[u8; 16], pt: &[u8]) -> Vec<u8> {
    Aes256CbcEnc::new(key.into(), iv.into()).encrypt_padded_vec_mut::<Pkcs7>(pt)
}

/// AES-256-CBC with PKCS#7; `None` if the padding is wrong.
pub(crate) fn cbc_decrypt(key: &[u8; 32], iv: &[u8; 16], ct: &[u8]) -> Option<Vec<u8>> {
    Aes256CbcDec::new(key.into(), iv.into())
        .decrypt_padded_vec_mut::<Pkcs7>(ct)
        .ok()
}

/// HMAC-SHA-256 truncated to `len`.
pub(crate) fn mac(key: &[u8], parts: &[&[u8]], len: usize) -> Vec<u8> {
    hmac_parts(key, parts)[..len].to_vec()
}

fn seal(v: Version, mk: &[u8; 32], ad: &[u8], h: Header, pt: &[u8]) -> Vec<u8> {
    let (mut ek, mut ak, iv) = derive(v.message_info(), mk);
    let ct = cbc_encrypt(&ek, &iv, pt);
    let out = match v {
        Version::V03 => {
            let mut covered = vec![0x33];
            v03::Message {
                dh_pub: Some(djb(&h.dh)),
                n: Some(h.n),
                pn: Some(h.pn),
                ciphertext: Some(ct),
            }
            .encode(&mut covered)
            .unwrap_or_else(|_| unreachable!());
            let tag = mac(&ak, &[ad, &covered], v.mac_len());
            covered.extend_from_slice(&tag);
            covered
        }
        Version::V2 => {
            let covered = v2::Message {
                n: Some(h.n),
                pn: Some(h.pn),
                dh_pub: Some(h.dh.to_vec()),
                ciphertext: Some(ct),
            }
            .encode_to_vec();
            let tag = mac(&ak, &[ad, &covered], v.mac_len());
            v2::AuthenticatedMessage {
                mac: Some(tag),
                message: Some(covered),
            }
            .encode_to_vec()
        }
    };
    ek.zeroize();
    ak.zeroize();
    out
}

fn open(v: Version, mk: &[u8; 32], ad: &[u8], w: &Wire) -> Result<Vec<u8>> {
    let (mut ek, mut ak, iv) = derive(v.message_info(), mk);
    let tag = mac(&ak, &[ad, &w.covered], v.mac_len());
    ak.zeroize();
    if w.mac.len() != tag.len() || !bool::from(tag.ct_eq(&w.mac)) {
        ek.zeroize();
        return Err(OmemoError::BadMac);
    }
    let pt = cbc_decrypt(&ek, &iv, &w.ciphertext);
    ek.zeroize();
    pt.ok_or(OmemoError::Malformed("ratchet message padding"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn pair(v: Version) -> (Ratchet, Ratchet) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (spk, spk_pub) = keys::generate(&mut rng);
        let shared = [9u8; 32];
        let mut a = Ratchet::active(v, shared, spk_pub, &mut rng).expect("active");
        let first = a.encrypt(b"AD", b"hello");
        let w = Wire::parse(v, &first).expect("parse");
        let mut b = Ratchet::passive(v, shared, &spk, w.header.dh, &mut rng).expect("passive");
        assert_eq!(b.decrypt(b"AD", &w, 0).expect("first"), b"hello");
        (a, b)
    }

    fn roundtrip(from: &mut Ratchet, to: &mut Ratchet, v: Version, text: &[u8]) {
        let c = from.encrypt(b"AD", text);
        let w = Wire::parse(v, &c).expect("parse");
        assert_eq!(to.decrypt(b"AD", &w, 0).expect("decrypt"), text);
    }

    #[test]
    fn ping_pong_and_out_of_order_in_both_versions() {
        for v in Version::ALL {
            let (mut a, mut b) = pair(v);
            for i in 0..5u8 {
                roundtrip(&mut a, &mut b, v, &[i; 20]);
                roundtrip(&mut b, &mut a, v, &[i; 33]);
            }
            let c: Vec<_> = (0..4u8).map(|i| a.encrypt(b"AD", &[i])).collect();
            for i in [3usize, 0, 2, 1] {
                let w = Wire::parse(v, &c[i]).expect("parse");
                assert_eq!(b.decrypt(b"AD", &w, 0).expect("late"), [i as u8]);
            }
            assert_eq!(b.skipped_len(), 0);
            // A replay of any of them is refused and changes nothing.
            let w = Wire::parse(v, &c[1]).expect("parse");
            assert_eq!(b.decrypt(b"AD", &w, 0).err(), Some(OmemoError::Duplicate));
            roundtrip(&mut a, &mut b, v, b"still fine");
        }
    }

    #[test]
    fn forged_or_misaddressed_messages_change_nothing() {
        for v in Version::ALL {
            let (mut a, mut b) = pair(v);
            let mut c = a.encrypt(b"AD", b"x");
            let last = c.len() - 1;
            c[last] ^= 1;
            let before = serde_json::to_string(&b).expect("json");
            if let Ok(w) = Wire::parse(v, &c) {
                assert!(b.decrypt(b"AD", &w, 0).is_err());
            }
            let good = a.encrypt(b"AD", b"y");
            let w = Wire::parse(v, &good).expect("parse");
            assert_eq!(
                b.decrypt(b"other AD", &w, 0).err(),
                Some(OmemoError::BadMac)
            );
            assert_eq!(serde_json::to_string(&b).expect("json"), before);
            assert_eq!(b.decrypt(b"AD", &w, 0).expect("good"), b"y");
        }
    }

    #[test]
    fn skipping_is_bounded() {
        let v = Version::V2;
        let (mut a, mut b) = pair(v);
        for _ in 0..MAX_SKIP_PER_MESSAGE + 1 {
            a.encrypt(b"AD", b"lost");
        }
        let c = a.encrypt(b"AD", b"too far");
        let w = Wire::parse(v, &c).expect("parse");
        assert!(matches!(
            b.decrypt(b"AD", &w, 0),
            Err(OmemoError::TooManySkipped(_))
        ));
    }

    #[test]
    fn skipped_keys_expire() {
        let v = Version::V03;
        let (mut a, mut b) = pair(v);
        let early = a.encrypt(b"AD", b"early");
        roundtrip(&mut a, &mut b, v, b"later");
        assert_eq!(b.skipped_len(), 1);
        // The next decryption, a month and a day on, drops the old key.
        let c = a.encrypt(b"AD", b"next");
        let w = Wire::parse(v, &c).expect("parse");
        b.decrypt(b"AD", &w, SKIPPED_KEY_TTL + 1).expect("next");
        assert_eq!(b.skipped_len(), 0);
        let w = Wire::parse(v, &early).expect("parse");
        assert!(b.decrypt(b"AD", &w, SKIPPED_KEY_TTL + 2).is_err());
    }
}
