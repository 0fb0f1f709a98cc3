//! Encrypted LAN announcements (sans-IO): what goes into a DNS-SD record so
//! that only contacts can read it, and nothing links it to the previous
//! period's.
//!
//! Each pair of contacts shares a secret nobody else can compute:
//! `S = HKDF-SHA-256(salt "coterie lan v1", X25519(a, B), info = A ‖ B sorted)`
//! (the identity keys converted from Ed25519; see
//! [`transport::SecretKey::agree`]). Time is cut into periods (10 minutes by
//! default); in period `p` a node publishes one record per 64 contacts:
//!
//! ```text
//! instance  random 16 base32 chars        (new every period)
//! host      random "c…" label .local.     (new every period)
//! SRV port  random decoy                  (new every period)
//! TXT v=1  n=<16-byte nonce>  s0..sK=<slots, 12 bytes each>
//! slot      HMAC(S, "tag" ‖ p ‖ n)[..8] ‖ ports ⊕ HMAC(S, "ports" ‖ p ‖ n)[..4]
//! ```
//!
//! Slots are shuffled and padded with random ones to 8, 16, 32 or 64, so
//! the record tells neither who is addressed nor exactly how many. A
//! contact recomputes its tag for periods p−1, p, p+1 (clock skew) and finds
//! its slot; the slot gives the TCP and QUIC ports; the IP addresses are the
//! record's A/AAAA addresses. A stranger sees random bytes that change
//! completely every period.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::seq::SliceRandom;
use rand::{CryptoRng, Rng, RngCore};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use transport::{PeerId, SecretKey};
use zeroize::Zeroizing;

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_coterie._tcp.local.";
/// Default period, in seconds.
pub const DEFAULT_PERIOD_SECS: u64 = 600;
/// Bytes of a tag.
pub const TAG_LEN: usize = 8;
/// Bytes of a slot: tag and masked ports.
pub const SLOT_LEN: usize = TAG_LEN + 4;
/// Bytes of a record's nonce.
pub const NONCE_LEN: usize = 16;
/// Slot counts a record is padded to; more contacts take more records.
pub const BUCKETS: [usize; 4] = [8, 16, 32, 64];
/// Most slots in one record (hostile records with more are ignored).
pub const MAX_SLOTS: usize = 64;
/// Slots per TXT string (12 × 15 = 180 bytes, 240 base64 characters: under
/// the 255-byte limit of one TXT string).
const SLOTS_PER_TXT: usize = 15;

type HmacSha256 = Hmac<Sha256>;

/// Where a contact's node listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ports {
    /// TCP port.
    pub tcp: u16,
    /// QUIC (UDP) port.
    pub quic: u16,
}

/// The secret shared with one contact.
pub struct PairSecret {
    me: PeerId,
    peer: PeerId,
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for PairSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairSecret(..)")
    }
}

impl PairSecret {
    /// The secret `me` shares with `peer`; `None` for an invalid peer key.
    pub fn new(me: &SecretKey, peer: &PeerId) -> Option<PairSecret> {
        let dh = me.agree(peer)?;
        let mine = me.peer_id();
        let (lo, hi) = if mine.as_bytes() < peer.as_bytes() {
            (mine, *peer)
        } else {
            (*peer, mine)
        };
        let mut info = [0u8; 64];
        info[..32].copy_from_slice(lo.as_bytes());
        info[32..].copy_from_slice(hi.as_bytes());
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"coterie lan v1"), dh.as_ref());
        let mut key = Zeroizing::new([0u8; 32]);
        hk.expand(&info, key.as_mut()).ok()?;
        Some(PairSecret {
            me: mine,
            peer: *peer,
            key,
        })
    }

    /// The contact.
    pub fn peer(&self) -> &PeerId {
        &self.peer
    }

    /// `announcer` tells the two directions apart: a record we publish must
    /// not read, to us, as one from the contact.
    fn prf(&self, label: &[u8], announcer: &PeerId, period: u64, nonce: &[u8]) -> [u8; 32] {
        // HMAC takes keys of any length.
        let mut m = <HmacSha256 as Mac>::new_from_slice(self.key.as_ref())
            .unwrap_or_else(|_| unreachable!("any key length"));
        m.update(label);
        m.update(announcer.as_bytes());
        m.update(&period.to_be_bytes());
        m.update(nonce);
        m.finalize().into_bytes().into()
    }

    /// The tag also covers the record's addresses: a stranger who adds an
    /// address to someone's record (or replays it from elsewhere) makes it
    /// unreadable, never points a contact at itself.
    fn tag(
        &self,
        announcer: &PeerId,
        period: u64,
        nonce: &[u8; NONCE_LEN],
        addrs: &[u8],
    ) -> [u8; TAG_LEN] {
        let mut input = nonce.to_vec();
        input.extend_from_slice(addrs);
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&self.prf(b"tag", announcer, period, &input)[..TAG_LEN]);
        t
    }

    fn mask(&self, announcer: &PeerId, period: u64, nonce: &[u8; NONCE_LEN]) -> [u8; 4] {
        let mut m = [0u8; 4];
        m.copy_from_slice(&self.prf(b"ports", announcer, period, nonce)[..4]);
        m
    }

    /// Our key (the announcer of the records we publish).
    pub fn me(&self) -> &PeerId {
        &self.me
    }
}

/// The canonical bytes of a record's address set (sorted, deduplicated;
/// IPv4 as 4 bytes, IPv6 as 16), covered by every tag.
pub fn address_bytes(ips: &[std::net::IpAddr]) -> Vec<u8> {
    let mut v: Vec<Vec<u8>> = ips
        .iter()
        .map(|ip| match ip {
            std::net::IpAddr::V4(a) => a.octets().to_vec(),
            std::net::IpAddr::V6(a) => a.octets().to_vec(),
        })
        .collect();
    v.sort();
    v.dedup();
    v.concat()
}

/// The period of a Unix time.
pub fn period_of(unix_secs: u64, period_secs: u64) -> u64 {
    unix_secs / period_secs.max(1)
}

/// One announcement: one DNS-SD service instance.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// Service instance name (random).
    pub instance: String,
    /// Host name (random, ends in `.local.`).
    pub host: String,
    /// SRV port (a random decoy: the real ports are in the slots).
    pub decoy_port: u16,
    /// Nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Slots, shuffled and padded.
    pub slots: Vec<[u8; SLOT_LEN]>,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Record({} slots)", self.slots.len())
    }
}

fn label(rng: &mut impl RngCore, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rng.fill_bytes(&mut b);
    data_encoding::BASE32_NOPAD.encode(&b).to_ascii_lowercase()
}

/// This period's records for our contacts (one per 64 contacts; one with
/// only padding when there are none, so having no contacts looks the same).
pub fn announce(
    secrets: &[PairSecret],
    ports: Ports,
    ips: &[std::net::IpAddr],
    period: u64,
    rng: &mut (impl RngCore + CryptoRng),
) -> Vec<Record> {
    let addrs = address_bytes(ips);
    let mut order: Vec<&PairSecret> = secrets.iter().collect();
    order.shuffle(rng);
    let mut chunks: Vec<Vec<&PairSecret>> = order.chunks(MAX_SLOTS).map(<[_]>::to_vec).collect();
    if chunks.is_empty() {
        chunks.push(Vec::new());
    }
    let mut port_bytes = [0u8; 4];
    port_bytes[..2].copy_from_slice(&ports.tcp.to_be_bytes());
    port_bytes[2..].copy_from_slice(&ports.quic.to_be_bytes());
    chunks
        .into_iter()
        .map(|chunk| {
            let mut nonce = [0u8; NONCE_LEN];
            rng.fill_bytes(&mut nonce);
            let mut slots: Vec<[u8; SLOT_LEN]> = chunk
                .iter()
                .map(|s| {
                    let mut slot = [0u8; SLOT_LEN];
                    slot[..TAG_LEN].copy_from_slice(&s.tag(&s.me, period, &nonce, &addrs));
                    let mask = s.mask(&s.me, period, &nonce);
                    for i in 0..4 {
                        slot[TAG_LEN + i] = port_bytes[i] ^ mask[i];
                    }
                    slot
                })
                .collect();
            let target = BUCKETS
                .iter()
                .copied()
                .find(|b| *b >= slots.len())
                .unwrap_or(MAX_SLOTS);
            while slots.len() < target {
                let mut filler = [0u8; SLOT_LEN];
                rng.fill_bytes(&mut filler);
                slots.push(filler);
            }
            slots.shuffle(rng);
            Record {
                instance: label(rng, 10),
                host: format!("c{}.local.", label(rng, 10)),
                decoy_port: rng.gen_range(1024..=65535),
                nonce,
                slots,
            }
        })
        .collect()
}

/// The contacts a record addresses us from, with their ports: each of our
/// contacts whose tag for a period near `now` is in the record.
/// `ips` are the addresses the record came with.
pub fn read(
    record: &Record,
    ips: &[std::net::IpAddr],
    secrets: &[PairSecret],
    now: u64,
) -> Vec<(PeerId, Ports)> {
    let addrs = address_bytes(ips);
    let mut found = Vec::new();
    for s in secrets {
        'periods: for p in [now, now.wrapping_sub(1), now.wrapping_add(1)] {
            let tag = s.tag(&s.peer, p, &record.nonce, &addrs);
            for slot in &record.slots {
                if bool::from(slot[..TAG_LEN].ct_eq(&tag)) {
                    let mask = s.mask(&s.peer, p, &record.nonce);
                    let b: Vec<u8> = (0..4).map(|i| slot[TAG_LEN + i] ^ mask[i]).collect();
                    found.push((
                        s.peer,
                        Ports {
                            tcp: u16::from_be_bytes([b[0], b[1]]),
                            quic: u16::from_be_bytes([b[2], b[3]]),
                        },
                    ));
                    break 'periods;
                }
            }
        }
    }
    found
}

/// Why a record's TXT data was ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxtError {
    /// Not version 1.
    Version,
    /// Nonce missing or of the wrong size.
    Nonce,
    /// Slots missing, not whole, or too many.
    Slots,
}

impl Record {
    /// The TXT properties: `v=1`, `n=<nonce>`, `s0=…`, `s1=…` (base64).
    pub fn txt(&self) -> Vec<(String, String)> {
        let b64 = data_encoding::BASE64_NOPAD;
        let mut out = vec![
            ("v".to_string(), "1".to_string()),
            ("n".into(), b64.encode(&self.nonce)),
        ];
        for (i, chunk) in self.slots.chunks(SLOTS_PER_TXT).enumerate() {
            out.push((format!("s{i}"), b64.encode(&chunk.concat())));
        }
        out
    }

    /// Reads the nonce and slots back from TXT properties (any order;
    /// unknown keys ignored). Hostile input is bounded: at most
    /// [`MAX_SLOTS`] slots are read.
    pub fn parse_txt<'a>(
        props: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<([u8; NONCE_LEN], Vec<[u8; SLOT_LEN]>), TxtError> {
        let b64 = data_encoding::BASE64_NOPAD;
        let mut version = false;
        let mut nonce = None;
        let mut parts: Vec<(usize, Vec<u8>)> = Vec::new();
        for (k, v) in props {
            match k {
                "v" => version = v == b"1",
                "n" => {
                    nonce = b64
                        .decode(v)
                        .ok()
                        .and_then(|n| <[u8; NONCE_LEN]>::try_from(n.as_slice()).ok());
                }
                _ => {
                    let Some(i) = k.strip_prefix('s').and_then(|i| i.parse::<usize>().ok()) else {
                        continue;
                    };
                    if i >= MAX_SLOTS.div_ceil(SLOTS_PER_TXT) || v.len() > 256 {
                        return Err(TxtError::Slots);
                    }
                    let bytes = b64.decode(v).map_err(|_| TxtError::Slots)?;
                    if bytes.len() % SLOT_LEN != 0 {
                        return Err(TxtError::Slots);
                    }
                    parts.push((i, bytes));
                }
            }
        }
        if !version {
            return Err(TxtError::Version);
        }
        let nonce = nonce.ok_or(TxtError::Nonce)?;
        parts.sort_by_key(|(i, _)| *i);
        parts.dedup_by_key(|(i, _)| *i);
        let slots: Vec<[u8; SLOT_LEN]> = parts
            .iter()
            .flat_map(|(_, b)| b.chunks_exact(SLOT_LEN))
            .filter_map(|c| <[u8; SLOT_LEN]>::try_from(c).ok())
            .take(MAX_SLOTS + 1)
            .collect();
        if slots.is_empty() || slots.len() > MAX_SLOTS {
            return Err(TxtError::Slots);
        }
        Ok((nonce, slots))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: u8) -> SecretKey {
        SecretKey::from_seed(&[i; 32])
    }

    fn secrets(me: &SecretKey, others: &[&SecretKey]) -> Vec<PairSecret> {
        others
            .iter()
            .map(|o| PairSecret::new(me, &o.peer_id()).expect("secret"))
            .collect()
    }

    const PORTS: Ports = Ports {
        tcp: 7474,
        quic: 7475,
    };
    const IPS: [std::net::IpAddr; 1] = [std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2))];

    #[test]
    fn a_record_with_other_addresses_reads_as_nothing() {
        let (a, b) = (key(1), key(2));
        let recs = announce(&secrets(&a, &[&b]), PORTS, &IPS, 7, &mut rand::rngs::OsRng);
        let attacker = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 66));
        let s = secrets(&b, &[&a]);
        assert_eq!(read(&recs[0], &IPS, &s, 7).len(), 1);
        assert!(
            read(&recs[0], &[IPS[0], attacker], &s, 7).is_empty(),
            "an added address"
        );
        assert!(
            read(&recs[0], &[attacker], &s, 7).is_empty(),
            "replayed from elsewhere"
        );
        // Order and duplicates do not matter.
        assert_eq!(read(&recs[0], &[IPS[0], IPS[0]], &s, 7).len(), 1);
    }

    #[test]
    fn contacts_read_the_record_and_strangers_do_not() {
        let (a, b, c, x) = (key(1), key(2), key(3), key(9));
        let mut rng = rand::rngs::OsRng;
        let recs = announce(&secrets(&a, &[&b, &c]), PORTS, &IPS, 100, &mut rng);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].slots.len(), 8, "padded to the first bucket");
        for reader in [&b, &c] {
            let got = read(&recs[0], &IPS, &secrets(reader, &[&a, &x]), 100);
            assert_eq!(got, vec![(a.peer_id(), PORTS)]);
        }
        // Clock skew of one period either way is tolerated; two is not.
        assert_eq!(read(&recs[0], &IPS, &secrets(&b, &[&a]), 101).len(), 1);
        assert_eq!(read(&recs[0], &IPS, &secrets(&b, &[&a]), 99).len(), 1);
        assert!(read(&recs[0], &IPS, &secrets(&b, &[&a]), 102).is_empty());
        // A stranger, or a contact of b that is not a's, learns nothing.
        assert!(read(&recs[0], &IPS, &secrets(&x, &[&a, &b, &c]), 100).is_empty());
        // Our own record does not read as one from our contacts.
        assert!(read(&recs[0], &IPS, &secrets(&a, &[&b, &c]), 100).is_empty());
    }

    #[test]
    fn many_contacts_take_several_records_of_bounded_size() {
        let me = key(1);
        let others: Vec<SecretKey> = (0..150u32)
            .map(|i| {
                let mut s = [7u8; 32];
                s[..4].copy_from_slice(&i.to_be_bytes());
                SecretKey::from_seed(&s)
            })
            .collect();
        let refs: Vec<&SecretKey> = others.iter().collect();
        let recs = announce(&secrets(&me, &refs), PORTS, &IPS, 5, &mut rand::rngs::OsRng);
        assert_eq!(recs.len(), 3);
        assert!(recs.iter().all(|r| r.slots.len() <= MAX_SLOTS));
        let mut seen = 0;
        for o in &others {
            let s = secrets(o, &[&me]);
            seen += recs
                .iter()
                .filter(|r| !read(r, &IPS, &s, 5).is_empty())
                .count();
        }
        assert_eq!(seen, 150, "every contact finds itself exactly once");
    }

    #[test]
    fn nothing_repeats_between_periods() {
        let (a, b) = (key(1), key(2));
        let s = secrets(&a, &[&b]);
        let mut rng = rand::rngs::OsRng;
        let r1 = &announce(&s, PORTS, &IPS, 1, &mut rng)[0];
        let r2 = &announce(&s, PORTS, &IPS, 2, &mut rng)[0];
        assert_ne!(r1.instance, r2.instance);
        assert_ne!(r1.host, r2.host);
        assert_ne!(r1.nonce, r2.nonce);
        for a in &r1.slots {
            for b in &r2.slots {
                assert_ne!(a[..TAG_LEN], b[..TAG_LEN]);
            }
        }
        let v1: Vec<String> = r1
            .txt()
            .into_iter()
            .map(|(_, v)| v)
            .filter(|v| v != "1")
            .collect();
        let v2: Vec<String> = r2.txt().into_iter().map(|(_, v)| v).collect();
        assert!(v1.iter().all(|v| !v2.contains(v)));
    }

    #[test]
    fn no_contacts_still_announces_a_padded_record() {
        let recs = announce(&[], PORTS, &IPS, 1, &mut rand::rngs::OsRng);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].slots.len(), 8);
    }

    #[test]
    fn hostile_txt_is_refused() {
        let ok = announce(&[], PORTS, &IPS, 1, &mut rand::rngs::OsRng)
            .remove(0)
            .txt();
        let props = |v: &[(String, String)]| -> Vec<(String, Vec<u8>)> {
            v.iter()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                .collect()
        };
        let parse = |p: &[(String, Vec<u8>)]| {
            Record::parse_txt(p.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
        };
        assert!(parse(&props(&ok)).is_ok());
        let mut no_v = props(&ok);
        no_v.retain(|(k, _)| k != "v");
        assert_eq!(parse(&no_v), Err(TxtError::Version));
        let mut too_many = props(&ok);
        too_many.push(("s9".into(), b"AAAA".to_vec()));
        assert_eq!(parse(&too_many), Err(TxtError::Slots));
        let mut odd = props(&ok);
        odd.push(("s1".into(), b"AAAAAA".to_vec()));
        assert_eq!(parse(&odd), Err(TxtError::Slots));
    }

    proptest! {
        #[test]
        fn txt_round_trips(n in 0usize..200, tcp: u16, quic: u16) {
            let me = key(1);
            let others: Vec<SecretKey> = (0..n as u32).map(|i| {
                let mut s = [9u8; 32];
                s[..4].copy_from_slice(&i.to_be_bytes());
                SecretKey::from_seed(&s)
            }).collect();
            let refs: Vec<&SecretKey> = others.iter().collect();
            for r in announce(&secrets(&me, &refs), Ports { tcp, quic }, &IPS, 3, &mut rand::rngs::OsRng) {
                let txt: Vec<(String, Vec<u8>)> = r.txt().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
                for (k, v) in &txt {
                    prop_assert!(k.len() + 1 + v.len() <= 255, "TXT string too long");
                }
                let (nonce, slots) = Record::parse_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).expect("parse");
                prop_assert_eq!(nonce, r.nonce);
                prop_assert_eq!(slots, r.slots);
            }
        }

        #[test]
        fn arbitrary_txt_never_panics(props in proptest::collection::vec(("[a-z0-9]{0,4}", proptest::collection::vec(any::<u8>(), 0..300)), 0..12)) {
            let _ = Record::parse_txt(props.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        }
    }
}
