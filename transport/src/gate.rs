//! The connection gate: a listener shows its certificate only to a dialer
//! that proves it is a contact (or holds an open invite).
//!
//! TLS 1.3 sends the server's certificate before the client's. Without a
//! gate, anyone who can reach a listening port (a stranger port-scanning
//! the LAN) would receive the node's raw public key, which *is* its
//! identity and onion address. So the dialer puts a one-time **ticket** in
//! its ClientHello, as an extra ALPN entry:
//!
//! ```text
//! "cg1" ‖ window (u32 BE, unix time / 300 s) ‖ nonce (12 random bytes)
//!       ‖ HMAC-SHA256(gate key, "coterie gate v1" ‖ server key ‖ window ‖ nonce)[..16]
//! ```
//!
//! The gate key is HKDF of the two identity keys' X25519 agreement (both
//! ends compute it, nobody else can), or HKDF of an invite's one-time
//! secret while the invite is open. The listener's certificate resolver
//! accepts a ticket only if its window is within one of the listener's
//! clock, its tag verifies under one of the keys its policy lists, the
//! tag names *this* server (a ticket sent to one contact is worthless at
//! another) and its nonce has not been seen before (a replayed ticket is
//! refused). Anything else aborts the handshake with an alert and no
//! certificate. A fresh nonce per connection keeps tickets unlinkable.
//!
//! What the gate does not stop: an attacker on the path who *suppresses*
//! a contact's ClientHello and sends its own with the stolen ticket, before
//! the contact's reaches the listener. ALPN is all rustls lets a resolver
//! see, so the ticket cannot be bound to the client's key share.
//! `docs/threat-model.md` lists this.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{PeerId, SecretKey};

/// Leading bytes of a ticket inside the ALPN list.
pub const TICKET_PREFIX: &[u8] = b"cg1";
/// Length of a ticket: prefix, window, nonce, tag.
pub const TICKET_LEN: usize = 3 + 4 + 12 + 16;
/// Seconds per ticket window.
pub const WINDOW_SECS: u64 = 300;
/// How many ticket-shaped ALPN entries of one ClientHello are checked.
pub const MAX_TICKETS_PER_HELLO: usize = 2;
/// How many distinct nonces a listener remembers before it refuses new
/// tickets (only tickets with a valid tag are remembered, so only contacts
/// can fill it).
pub const MAX_REMEMBERED: usize = 16_384;

/// 32 bytes of HKDF-SHA-256 (no salt) from `ikm` for `info`: every secret
/// two contacts derive from what they share.
pub(crate) fn hkdf32(ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is always a valid HKDF-SHA256 output length.
    let _ = hkdf::Hkdf::<Sha256>::new(None, ikm).expand(info, out.as_mut_slice());
    out
}

/// A secret that lets a dialer get past a listener's gate.
#[derive(Clone)]
pub struct GateKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for GateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GateKey(..)")
    }
}

impl GateKey {
    /// The key two contacts share: both ends compute the same one.
    /// `None` if `peer` is not a usable curve point.
    pub fn for_pair(own: &SecretKey, peer: &PeerId) -> Option<GateKey> {
        let shared = own.agree(peer)?;
        Some(GateKey::derive(shared.as_slice(), b"coterie gate v1: pair"))
    }

    /// The key of an open invite, from its one-time secret.
    pub fn for_invite(secret: &[u8; 32]) -> GateKey {
        GateKey::derive(secret, b"coterie gate v1: invite")
    }

    fn derive(ikm: &[u8], info: &[u8]) -> GateKey {
        GateKey(hkdf32(ikm, info))
    }

    fn tag(&self, server: &PeerId, window: u32, nonce: &[u8]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_slice())
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        m.update(b"coterie gate v1");
        m.update(server.as_bytes());
        m.update(&window.to_be_bytes());
        m.update(nonce);
        m
    }

    /// A fresh ticket for dialing `server` at unix time `now`.
    pub fn ticket(&self, server: &PeerId, now: u64) -> Vec<u8> {
        let window = window_of(now);
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let tag = self.tag(server, window, &nonce).finalize().into_bytes();
        let mut t = Vec::with_capacity(TICKET_LEN);
        t.extend_from_slice(TICKET_PREFIX);
        t.extend_from_slice(&window.to_be_bytes());
        t.extend_from_slice(&nonce);
        t.extend_from_slice(&tag[..16]);
        t
    }
}

fn window_of(now: u64) -> u32 {
    u32::try_from(now / WINDOW_SECS).unwrap_or(u32::MAX)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a ticket was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No ticket in the ClientHello (a stranger, or a scanner).
    Missing,
    /// A ticket whose window is too far from the listener's clock.
    Stale,
    /// A ticket no listed key made, or made for another server.
    Forged,
    /// A ticket that was already used once.
    Replayed,
    /// The listener remembers too many nonces to take another.
    Full,
}

/// A listener's memory of the nonces it has accepted, shared by all its
/// carriers so a ticket used over TCP cannot be replayed over QUIC.
#[derive(Debug, Default)]
pub struct Gate {
    seen: Mutex<HashMap<[u8; 12], u32>>,
}

impl Gate {
    /// Checks the tickets among `alpn` against `keys` for `server`, at
    /// unix time `now`, and remembers the nonce of the one it accepts.
    pub fn check<'a>(
        &self,
        alpn: impl Iterator<Item = &'a [u8]>,
        keys: &[GateKey],
        server: &PeerId,
        now: u64,
    ) -> Result<(), Refusal> {
        let current = window_of(now);
        let mut worst = Refusal::Missing;
        // A dialer sends one ticket; looking at more would let a ClientHello
        // full of them cost hundreds of HMACs per listed key.
        let tickets = alpn
            .filter(|p| p.len() == TICKET_LEN && p.starts_with(TICKET_PREFIX))
            .take(MAX_TICKETS_PER_HELLO);
        for t in tickets {
            let (window, rest) = t[TICKET_PREFIX.len()..].split_at(4);
            let (nonce, tag) = rest.split_at(12);
            let mut w = [0u8; 4];
            w.copy_from_slice(window);
            let window = u32::from_be_bytes(w);
            if window.abs_diff(current) > 1 {
                worst = Refusal::Stale;
                continue;
            }
            let valid = keys.iter().any(|k| {
                k.tag(server, window, nonce)
                    .verify_truncated_left(tag)
                    .is_ok()
            });
            if !valid {
                worst = Refusal::Forged;
                continue;
            }
            let mut n = [0u8; 12];
            n.copy_from_slice(nonce);
            return self.remember(n, window, current);
        }
        Err(worst)
    }

    fn remember(&self, nonce: [u8; 12], window: u32, current: u32) -> Result<(), Refusal> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains_key(&nonce) {
            return Err(Refusal::Replayed);
        }
        if seen.len() >= MAX_REMEMBERED {
            // Windows older than current-1 can no longer be presented.
            seen.retain(|_, w| w.saturating_add(1) >= current);
            if seen.len() >= MAX_REMEMBERED {
                return Err(Refusal::Full);
            }
        }
        seen.insert(nonce, window);
        Ok(())
    }

    /// How many nonces are remembered (for tests and status).
    pub fn remembered(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// A shareable gate.
pub type SharedGate = Arc<Gate>;

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (SecretKey, SecretKey, SecretKey) {
        (
            SecretKey::from_seed(&[1; 32]),
            SecretKey::from_seed(&[2; 32]),
            SecretKey::from_seed(&[3; 32]),
        )
    }

    const NOW: u64 = 1_800_000_000;

    /// `gate` checks one ALPN entry against one key.
    fn one(
        gate: &Gate,
        entry: &[u8],
        key: &GateKey,
        server: &PeerId,
        now: u64,
    ) -> Result<(), Refusal> {
        gate.check([entry].into_iter(), std::slice::from_ref(key), server, now)
    }

    #[test]
    fn a_contact_passes_once_and_a_replay_is_refused() {
        let (a, b, _) = keys();
        let ka = GateKey::for_pair(&a, &b.peer_id()).expect("key");
        let kb = GateKey::for_pair(&b, &a.peer_id()).expect("key");
        let gate = Gate::default();
        let t = ka.ticket(&b.peer_id(), NOW);
        assert_eq!(t.len(), TICKET_LEN);
        let alpn = [b"coterie/1".as_slice(), t.as_slice()];
        assert_eq!(
            gate.check(
                alpn.iter().copied(),
                std::slice::from_ref(&kb),
                &b.peer_id(),
                NOW
            ),
            Ok(())
        );
        assert_eq!(
            gate.check(alpn.iter().copied(), &[kb], &b.peer_id(), NOW + 1),
            Err(Refusal::Replayed)
        );
        assert_eq!(gate.remembered(), 1);
    }

    #[test]
    fn strangers_other_servers_and_stale_tickets_are_refused() {
        let (a, b, c) = keys();
        let ab = GateKey::for_pair(&a, &b.peer_id()).expect("key");
        let cb = GateKey::for_pair(&c, &b.peer_id()).expect("key");
        let gate = Gate::default();
        // No ticket at all.
        let none = [b"coterie/1".as_slice()];
        assert_eq!(
            gate.check(
                none.iter().copied(),
                std::slice::from_ref(&ab),
                &b.peer_id(),
                NOW
            ),
            Err(Refusal::Missing)
        );
        // A stranger's key is not on the list.
        let t = cb.ticket(&b.peer_id(), NOW);
        assert_eq!(one(&gate, &t, &ab, &b.peer_id(), NOW), Err(Refusal::Forged));
        // A ticket A made for B does not open A's own listener (same pair key).
        let t = ab.ticket(&b.peer_id(), NOW);
        assert_eq!(one(&gate, &t, &ab, &a.peer_id(), NOW), Err(Refusal::Forged));
        // Two windows away is stale; one window either way is fine.
        let t = ab.ticket(&b.peer_id(), NOW - 2 * WINDOW_SECS);
        assert_eq!(one(&gate, &t, &ab, &b.peer_id(), NOW), Err(Refusal::Stale));
        let t = ab.ticket(&b.peer_id(), NOW + WINDOW_SECS);
        assert_eq!(
            gate.check([t.as_slice()].into_iter(), &[ab], &b.peer_id(), NOW),
            Ok(())
        );
        assert_eq!(gate.remembered(), 1);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let (a, b, _) = keys();
        let k = GateKey::for_pair(&a, &b.peer_id()).expect("key");
        let t = k.ticket(&b.peer_id(), NOW);
        for i in TICKET_PREFIX.len()..TICKET_LEN {
            let mut bad = t.clone();
            bad[i] ^= 1;
            let r = Gate::default().check(
                [bad.as_slice()].into_iter(),
                std::slice::from_ref(&k),
                &b.peer_id(),
                NOW,
            );
            assert!(r.is_err(), "byte {i}");
        }
    }

    #[test]
    fn invite_keys_work_and_tickets_do_not_repeat() {
        let (_, b, _) = keys();
        let k = GateKey::for_invite(&[9; 32]);
        let t1 = k.ticket(&b.peer_id(), NOW);
        let t2 = k.ticket(&b.peer_id(), NOW);
        assert_ne!(t1, t2);
        let g = Gate::default();
        assert_eq!(one(&g, &t1, &k, &b.peer_id(), NOW), Ok(()));
        assert_eq!(
            g.check([t2.as_slice()].into_iter(), &[k], &b.peer_id(), NOW),
            Ok(())
        );
    }

    #[test]
    fn only_the_first_tickets_of_a_hello_are_checked() {
        let (a, b, c) = keys();
        let k = GateKey::for_pair(&a, &b.peer_id()).expect("key");
        let junk = GateKey::for_pair(&c, &b.peer_id()).expect("key");
        let good = k.ticket(&b.peer_id(), NOW);
        let bad: Vec<Vec<u8>> = (0..MAX_TICKETS_PER_HELLO)
            .map(|_| junk.ticket(&b.peer_id(), NOW))
            .collect();
        let alpn = bad.iter().map(Vec::as_slice).chain([good.as_slice()]);
        let r = Gate::default().check(alpn, std::slice::from_ref(&k), &b.peer_id(), NOW);
        assert_eq!(r, Err(Refusal::Forged));
    }

    #[test]
    fn memory_is_bounded() {
        let (a, b, _) = keys();
        let k = GateKey::for_pair(&a, &b.peer_id()).expect("key");
        let g = Gate::default();
        for i in 0..MAX_REMEMBERED {
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&(i as u64).to_be_bytes());
            g.remember(n, window_of(NOW), window_of(NOW)).expect("room");
        }
        let t = k.ticket(&b.peer_id(), NOW);
        assert_eq!(one(&g, &t, &k, &b.peer_id(), NOW), Err(Refusal::Full));
        // Two windows later the old nonces are dropped and room is made.
        let later = NOW + 2 * WINDOW_SECS;
        let t = k.ticket(&b.peer_id(), later);
        assert_eq!(
            g.check([t.as_slice()].into_iter(), &[k], &b.peer_id(), later),
            Ok(())
        );
        assert_eq!(g.remembered(), 1);
    }
}
