//! Our device (signed prekey, one-time prekeys), sessions with other
//! devices, and encrypting and decrypting `<encrypted/>` elements.

use prost::Message as _;
use rand::Rng;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::proto::{v2, v03};
use super::ratchet::{MAX_SKIP_PER_MESSAGE, Ratchet, Wire, djb, parse_djb};
use super::xml::{Bundle, EncryptedElement, KeyElement};
use super::{Identity, OmemoError, Result, Version, b64, keys, payload, x3dh};

/// One-time prekeys kept published.
pub const PREKEY_TARGET: usize = 100;
/// The signed prekey is replaced after this many seconds (7 days); the
/// previous one is still accepted until the next rotation.
pub const SPK_ROTATION: u64 = 7 * 24 * 3600;

#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SignedPreKey {
    id: u32,
    #[serde(with = "b64")]
    secret: [u8; 32],
    created: u64,
}

#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct PreKey {
    id: u32,
    #[serde(with = "b64")]
    secret: [u8; 32],
}

/// Our own device: its id and its prekeys (the identity key is the
/// profile's).
#[derive(Clone, Serialize, Deserialize)]
pub struct OwnDevice {
    /// The device id (1 ..= 2³¹−1).
    pub device_id: u32,
    spk: SignedPreKey,
    old_spk: Option<SignedPreKey>,
    prekeys: Vec<PreKey>,
    next_prekey_id: u32,
}

impl std::fmt::Debug for OwnDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OwnDevice({}, spk {}, {} prekeys)",
            self.device_id,
            self.spk.id,
            self.prekeys.len()
        )
    }
}

fn new_spk(id: u32, now: u64, rng: &mut (impl rand::RngCore + rand::CryptoRng)) -> SignedPreKey {
    let (secret, _) = keys::generate(rng);
    SignedPreKey {
        id,
        secret: *secret,
        created: now,
    }
}

impl OwnDevice {
    /// A new device with a random id and a full set of prekeys.
    pub fn new(now: u64, rng: &mut (impl rand::RngCore + rand::CryptoRng)) -> OwnDevice {
        let mut d = OwnDevice {
            device_id: rng.gen_range(1..=0x7FFF_FFFF),
            spk: new_spk(1, now, rng),
            old_spk: None,
            prekeys: Vec::new(),
            next_prekey_id: 1,
        };
        d.refill(rng);
        d
    }

    fn refill(&mut self, rng: &mut (impl rand::RngCore + rand::CryptoRng)) -> bool {
        let mut changed = false;
        while self.prekeys.len() < PREKEY_TARGET {
            let (secret, _) = keys::generate(rng);
            self.prekeys.push(PreKey {
                id: self.next_prekey_id,
                secret: *secret,
            });
            self.next_prekey_id = self.next_prekey_id.wrapping_add(1).max(1);
            changed = true;
        }
        changed
    }

    /// Rotates the signed prekey when due and replenishes one-time prekeys.
    /// Returns whether the bundle changed (and should be published again).
    pub fn maintain(&mut self, now: u64, rng: &mut (impl rand::RngCore + rand::CryptoRng)) -> bool {
        let mut changed = self.refill(rng);
        if now.saturating_sub(self.spk.created) >= SPK_ROTATION {
            let id = self.spk.id.wrapping_add(1).max(1);
            let fresh = new_spk(id, now, rng);
            self.old_spk = Some(std::mem::replace(&mut self.spk, fresh));
            changed = true;
        }
        changed
    }

    /// Number of unused one-time prekeys.
    pub fn prekey_count(&self) -> usize {
        self.prekeys.len()
    }

    /// Id of the current signed prekey.
    pub fn spk_id(&self) -> u32 {
        self.spk.id
    }

    /// Our bundle for a version.
    pub fn bundle(&self, id: &Identity, v: Version) -> Bundle {
        let spk = keys::public_of(&self.spk.secret);
        let mut sig = id.sign_spk(v, &spk);
        if v == Version::V03 {
            sig[63] &= 0x7f;
        }
        Bundle {
            version: v,
            ik: id.ed_public(),
            spk_id: self.spk.id,
            spk,
            spk_sig: sig,
            prekeys: self
                .prekeys
                .iter()
                .map(|p| (p.id, keys::public_of(&p.secret)))
                .collect(),
        }
    }

    fn spk_secret(&self, id: u32) -> Option<[u8; 32]> {
        if self.spk.id == id {
            return Some(self.spk.secret);
        }
        self.old_spk
            .as_ref()
            .filter(|s| s.id == id)
            .map(|s| s.secret)
    }

    /// Removes and returns a one-time prekey: each is accepted once.
    fn take_prekey(&mut self, id: u32) -> Option<[u8; 32]> {
        let i = self.prekeys.iter().position(|p| p.id == id)?;
        let p = self.prekeys.remove(i);
        Some(p.secret)
    }
}

/// Who started a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Initiation {
    /// We did, from their bundle.
    Active,
    /// They did, with a key exchange.
    Passive,
}

/// The key exchange that built a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Kex {
    /// Initiator's identity, Montgomery form.
    #[serde(with = "b64")]
    ik: [u8; 32],
    #[serde(with = "b64")]
    ek: [u8; 32],
    spk_id: u32,
    pk_id: u32,
}

/// A session with one device of another party, in one version.
#[derive(Clone, Serialize, Deserialize)]
pub struct Session {
    /// Version.
    pub version: Version,
    /// Who started it.
    pub initiation: Initiation,
    ratchet: Ratchet,
    /// Associated data: active identity ‖ passive identity, encoded.
    #[serde(with = "b64::vec")]
    ad: Vec<u8>,
    kex: Kex,
    /// Their identity, Montgomery form (what fingerprints show).
    #[serde(with = "b64")]
    pub their_identity: [u8; 32],
    /// Whether they have answered (until then an active session keeps
    /// sending its key exchange).
    pub confirmed: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Session({}, {:?}, {:?}, confirmed {})",
            self.version, self.initiation, self.ratchet, self.confirmed
        )
    }
}

impl Session {
    /// Starts a session with the device whose (checked) bundle this is.
    pub fn initiate(
        own: &Identity,
        bundle: &Bundle,
        rng: &mut (impl rand::RngCore + rand::CryptoRng),
    ) -> Result<Session> {
        let v = bundle.version;
        let a = x3dh::active(v, own, bundle, rng)?;
        let ratchet = Ratchet::active(v, *a.shared, bundle.spk, rng)?;
        Ok(Session {
            version: v,
            initiation: Initiation::Active,
            ratchet,
            ad: a.ad,
            kex: Kex {
                ik: own.mont_public(),
                ek: a.ek,
                spk_id: bundle.spk_id,
                pk_id: a.pk_id,
            },
            their_identity: keys::ed_to_mont(&bundle.ik)
                .ok_or(OmemoError::Malformed("identity key"))?,
            confirmed: false,
        })
    }

    /// Associated data for a message in the given direction.
    fn ad(&self, sending: bool) -> Vec<u8> {
        let n = self.version.identity_len();
        let (first, second) = self.ad.split_at(n.min(self.ad.len()));
        match self.version {
            // OMEMO 2: always active ‖ passive.
            Version::V2 => self.ad.clone(),
            // 0.3 (libsignal): sender ‖ receiver.
            Version::V03 => {
                let we_are_first = (self.initiation == Initiation::Active) == sending;
                if we_are_first {
                    self.ad.clone()
                } else {
                    [second, first].concat()
                }
            }
        }
    }

    /// The one-time prekey of theirs this session was started with (for a
    /// session we started).
    pub fn prekey_used(&self) -> Option<u32> {
        (self.initiation == Initiation::Active).then_some(self.kex.pk_id)
    }

    /// Ratchet state, for diagnostics.
    pub fn sending_chain_length(&self) -> u32 {
        self.ratchet.sending_chain_length()
    }

    /// Encrypts key material for this device: (data, is key exchange).
    fn encrypt_key(&mut self, own: &Identity, km: &[u8]) -> (Vec<u8>, bool) {
        let ad = self.ad(true);
        let msg = self.ratchet.encrypt(&ad, km);
        if self.initiation == Initiation::Passive || self.confirmed {
            return (msg, false);
        }
        let data = match self.version {
            Version::V03 => {
                let mut out = vec![0x33];
                v03::KeyExchange {
                    pk_id: Some(self.kex.pk_id),
                    ek: Some(djb(&self.kex.ek)),
                    ik: Some(djb(&own.mont_public())),
                    message: Some(msg),
                    unused: None,
                    spk_id: Some(self.kex.spk_id),
                }
                .encode(&mut out)
                .unwrap_or_else(|_| unreachable!());
                out
            }
            Version::V2 => {
                let inner = v2::AuthenticatedMessage::decode(msg.as_slice()).unwrap_or_default();
                v2::KeyExchange {
                    pk_id: Some(self.kex.pk_id),
                    spk_id: Some(self.kex.spk_id),
                    ik: Some(own.ed_public().to_vec()),
                    ek: Some(self.kex.ek.to_vec()),
                    message: Some(inner),
                }
                .encode_to_vec()
            }
        };
        (data, true)
    }
}

/// A parsed key exchange: its fields, the initiator's identity as the
/// version encodes it in associated data, and the inner message.
struct ParsedKex {
    kex: Kex,
    ik_enc: Vec<u8>,
    inner: Vec<u8>,
}

fn parse_kex(v: Version, data: &[u8]) -> Result<ParsedKex> {
    let m = |what| OmemoError::Malformed(what);
    match v {
        Version::V03 => {
            let rest = data
                .strip_prefix(&[0x33])
                .ok_or(m("0.3 key exchange: version byte"))?;
            let k = v03::KeyExchange::decode(rest).map_err(|_| m("0.3 key exchange: protobuf"))?;
            let ik_raw = k.ik.ok_or(m("0.3 key exchange: ik"))?;
            let ik = parse_djb(&ik_raw).ok_or(m("0.3 key exchange: ik"))?;
            Ok(ParsedKex {
                kex: Kex {
                    ik,
                    ek: k
                        .ek
                        .as_deref()
                        .and_then(parse_djb)
                        .ok_or(m("0.3 key exchange: ek"))?,
                    spk_id: k.spk_id.ok_or(m("0.3 key exchange: spk id"))?,
                    pk_id: k.pk_id.ok_or(m("0.3 key exchange: pk id"))?,
                },
                ik_enc: ik_raw,
                inner: k.message.ok_or(m("0.3 key exchange: message"))?,
            })
        }
        Version::V2 => {
            let k =
                v2::KeyExchange::decode(data).map_err(|_| m("OMEMO 2 key exchange: protobuf"))?;
            let ik_ed: [u8; 32] =
                k.ik.as_deref()
                    .and_then(|b| b.try_into().ok())
                    .ok_or(m("OMEMO 2 key exchange: ik"))?;
            Ok(ParsedKex {
                kex: Kex {
                    ik: keys::ed_to_mont(&ik_ed).ok_or(m("OMEMO 2 key exchange: ik"))?,
                    ek: k
                        .ek
                        .as_deref()
                        .and_then(|b| b.try_into().ok())
                        .ok_or(m("OMEMO 2 key exchange: ek"))?,
                    spk_id: k.spk_id.ok_or(m("OMEMO 2 key exchange: spk id"))?,
                    pk_id: k.pk_id.ok_or(m("OMEMO 2 key exchange: pk id"))?,
                },
                ik_enc: ik_ed.to_vec(),
                inner: k
                    .message
                    .ok_or(m("OMEMO 2 key exchange: message"))?
                    .encode_to_vec(),
            })
        }
    }
}

/// One recipient of an outgoing message.
#[derive(Debug)]
pub struct Recipient<'a> {
    /// Their bare JID (written into OMEMO 2's `<keys jid=…>`).
    pub jid: &'a str,
    /// Their device.
    pub device_id: u32,
    /// The session with it.
    pub session: &'a mut Session,
}

/// Encrypts `plaintext` (or, with `None`, an empty key-transport message)
/// for every recipient. All sessions must be of version `v`.
pub fn encrypt(
    v: Version,
    own: &Identity,
    own_device: u32,
    recipients: &mut [Recipient<'_>],
    plaintext: Option<&[u8]>,
    rng: &mut (impl rand::RngCore + rand::CryptoRng),
) -> EncryptedElement {
    let (km, payload, iv) = match plaintext {
        Some(pt) => {
            let s = payload::seal(v, pt, rng);
            (s.key_material.to_vec(), Some(s.payload), s.iv)
        }
        None => {
            let len = match v {
                Version::V03 => 32,
                Version::V2 => 48,
            };
            let mut km = vec![0u8; len];
            rng.fill_bytes(&mut km);
            let iv = (v == Version::V03).then(|| {
                let mut iv = vec![0u8; 12];
                rng.fill_bytes(&mut iv);
                iv
            });
            (km, None, iv)
        }
    };
    let keys = recipients
        .iter_mut()
        .map(|r| {
            let (data, kex) = r.session.encrypt_key(own, &km);
            KeyElement {
                jid: (v == Version::V2).then(|| r.jid.to_string()),
                rid: r.device_id,
                kex,
                data,
            }
        })
        .collect();
    let mut km = km;
    km.zeroize();
    EncryptedElement {
        version: v,
        sid: own_device,
        keys,
        iv,
        payload,
    }
}

/// What a successful decryption gives.
#[derive(Debug)]
pub struct DecryptOutcome {
    /// The payload, or `None` for an empty (key transport) message.
    pub plaintext: Option<Vec<u8>>,
    /// Whether a new session was built from a key exchange.
    pub new_session: bool,
    /// The sender's identity, Montgomery form.
    pub sender_identity: [u8; 32],
}

/// A device of another party, as far as decryption needs to know it.
#[derive(Debug, Clone, Copy)]
pub struct RemoteDevice {
    /// Its identity key (Montgomery form), if known from a bundle or an
    /// earlier session.
    pub identity: Option<[u8; 32]>,
}

/// Decrypts one ratchet message in session `s` and, with the key material
/// it carries, the element's payload (if any).
fn open_in(
    s: &mut Session,
    wire: &Wire,
    el: &EncryptedElement,
    now: u64,
    max_skip: u32,
) -> Result<Option<Vec<u8>>> {
    let ad = s.ad(false);
    let mut km = s.ratchet.decrypt_skipping(&ad, wire, now, max_skip)?;
    let plaintext = el
        .payload
        .as_ref()
        .map(|p| payload::open(el.version, &km, p, el.iv.as_deref()))
        .transpose();
    km.zeroize();
    plaintext
}

/// The sessions with one device in one version: the one we send with, and
/// a few earlier ones still accepted for decryption (messages in flight when
/// a session was replaced, or both sides starting a session at once).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SessionSlot {
    /// The session we encrypt with.
    pub current: Option<Session>,
    /// Earlier sessions, newest first, at most [`MAX_PREVIOUS`].
    pub previous: Vec<Session>,
}

/// Earlier sessions kept per device and version.
pub const MAX_PREVIOUS: usize = 2;
/// Keys an earlier session may skip for one message.
pub const PREVIOUS_MAX_SKIP: u32 = 32;

impl SessionSlot {
    fn archive(&mut self, s: Session) {
        self.previous.insert(0, s);
        self.previous.truncate(MAX_PREVIOUS);
    }

    /// Installs a session we started (after a repair or a first message).
    pub fn install(&mut self, s: Session) {
        if let Some(old) = self.current.take() {
            self.archive(old);
        }
        self.current = Some(s);
    }
}

impl OwnDevice {
    /// Decrypts `el` from the sender device whose sessions are `slot`. On
    /// success `self` (a used prekey) and `slot` are updated; on error
    /// neither changes.
    #[allow(clippy::too_many_arguments)]
    pub fn decrypt(
        &mut self,
        own: &Identity,
        own_jid: &str,
        sender: RemoteDevice,
        slot: &mut SessionSlot,
        el: &EncryptedElement,
        now: u64,
        rng: &mut (impl rand::RngCore + rand::CryptoRng),
    ) -> Result<DecryptOutcome> {
        let v = el.version;
        let key = el
            .keys
            .iter()
            .find(|k| {
                k.rid == self.device_id
                    && k.jid
                        .as_deref()
                        .is_none_or(|j| j.eq_ignore_ascii_case(own_jid))
            })
            .ok_or(OmemoError::NotForUs)?;
        let mut new_slot = slot.clone();
        if key.kex {
            let p = parse_kex(v, &key.data)?;
            if sender.identity.is_some_and(|i| i != p.kex.ik) {
                return Err(OmemoError::IdentityMismatch);
            }
            let wire = Wire::parse(v, &p.inner)?;
            // A key exchange we already built a session from: an ordinary message.
            let known = std::iter::once(new_slot.current.as_mut())
                .flatten()
                .chain(new_slot.previous.iter_mut())
                .find(|s| s.version == v && s.initiation == Initiation::Passive && s.kex == p.kex);
            if let Some(s) = known {
                let plaintext = open_in(s, &wire, el, now, MAX_SKIP_PER_MESSAGE)?;
                let sender_identity = s.their_identity;
                *slot = new_slot;
                return Ok(DecryptOutcome {
                    plaintext,
                    new_session: false,
                    sender_identity,
                });
            }
            // A new session: it uses up a one-time prekey (on a copy until
            // the message is proven authentic).
            let mut device = self.clone();
            let spk = device
                .spk_secret(p.kex.spk_id)
                .ok_or(OmemoError::UnknownSignedPreKey(p.kex.spk_id))?;
            let opk = device
                .take_prekey(p.kex.pk_id)
                .ok_or(OmemoError::UnknownPreKey(p.kex.pk_id))?;
            let (shared, ad) = x3dh::passive(v, own, &spk, &opk, &p.kex.ik, &p.ik_enc, &p.kex.ek)?;
            let ratchet = Ratchet::passive(v, *shared, &spk, wire.header.dh, rng)?;
            let mut s = Session {
                version: v,
                initiation: Initiation::Passive,
                ratchet,
                ad,
                their_identity: p.kex.ik,
                kex: p.kex,
                confirmed: true,
            };
            let plaintext = open_in(&mut s, &wire, el, now, MAX_SKIP_PER_MESSAGE)?;
            let sender_identity = s.their_identity;
            // Both sides started a session at once: the side with the
            // smaller identity key keeps its own, the other adopts it.
            let keep_ours = new_slot.current.as_ref().is_some_and(|c| {
                c.version == v
                    && c.initiation == Initiation::Active
                    && !c.confirmed
                    && own.mont_public() < sender_identity
            });
            if keep_ours {
                new_slot.archive(s);
            } else {
                new_slot.install(s);
            }
            *slot = new_slot;
            *self = device;
            return Ok(DecryptOutcome {
                plaintext,
                new_session: true,
                sender_identity,
            });
        }
        let wire = Wire::parse(v, &key.data)?;
        let mut last = OmemoError::NoSession;
        // Earlier sessions may skip only a few keys: a forged message must
        // not cost thousands of key derivations per session it is tried on.
        let candidates = std::iter::once(new_slot.current.as_mut())
            .flatten()
            .map(|s| (s, MAX_SKIP_PER_MESSAGE))
            .chain(new_slot.previous.iter_mut().map(|s| (s, PREVIOUS_MAX_SKIP)))
            .filter(|(s, _)| s.version == v);
        for (s, max_skip) in candidates {
            match open_in(s, &wire, el, now, max_skip) {
                Ok(plaintext) => {
                    s.confirmed = true;
                    let sender_identity = s.their_identity;
                    *slot = new_slot;
                    return Ok(DecryptOutcome {
                        plaintext,
                        new_session: false,
                        sender_identity,
                    });
                }
                // A replay is a replay whichever session it belongs to.
                Err(OmemoError::Duplicate) => return Err(OmemoError::Duplicate),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}
