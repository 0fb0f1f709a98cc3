//! # coterie-discovery
//!
//! Where can a contact be reached right now? The node asks a [`Discovery`]
//! before dialling, and merges the answer with the addresses it already has
//! in the contact record (from the invite, or announced by the contact in an
//! earlier session).
//!
//! ```text
//!   node dialer ──lookup(peer)──▶ Discovery ──▶ [PeerAddr, …]
//!   node start  ──publish(addrs)─▶ Discovery
//! ```
//!
//! Implementations here: [`MemoryDiscovery`], a shared in-process directory
//! for multi-node tests. The LAN implementation (encrypted, contacts-only
//! mDNS records) and the onion-service one plug in behind the same trait.
//!
//! What this crate does not do: connect, authenticate, or decide whom to
//! trust. An address from discovery is only a hint; the TLS handshake pins
//! the key.

pub mod lan;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use transport::{PeerAddr, PeerId};

/// Most addresses kept per peer; more are ignored.
pub const MAX_ADDRS_PER_PEER: usize = 8;

/// A source of current addresses for peers.
pub trait Discovery: Send + Sync + fmt::Debug {
    /// Addresses where `peer` may be reachable now, best first.
    fn lookup(&self, peer: &PeerId) -> Vec<PeerAddr>;
    /// Announces where this node (`me`) can be reached.
    fn publish(&self, me: &PeerId, addrs: &[PeerAddr]);
    /// Withdraws this node's announcement (going offline).
    fn withdraw(&self, me: &PeerId);
    /// The contacts to announce to and look for (implementations that do
    /// not care ignore it).
    fn set_contacts(&self, _contacts: &[PeerId]) {}
    /// Calls `f` when a contact's address is newly seen, so the node can
    /// dial at once instead of at its next retry.
    fn on_found(&self, _f: lan::mdns::FoundHook) {}
}

/// An in-process directory shared by every node of a test.
#[derive(Clone, Default)]
pub struct MemoryDiscovery {
    map: Arc<RwLock<HashMap<PeerId, Vec<PeerAddr>>>>,
}

impl fmt::Debug for MemoryDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.map.read().map(|m| m.len()).unwrap_or(0);
        write!(f, "MemoryDiscovery({n} peers)")
    }
}

impl MemoryDiscovery {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Discovery for MemoryDiscovery {
    fn lookup(&self, peer: &PeerId) -> Vec<PeerAddr> {
        self.map
            .read()
            .ok()
            .and_then(|m| m.get(peer).cloned())
            .unwrap_or_default()
    }

    fn publish(&self, me: &PeerId, addrs: &[PeerAddr]) {
        if let Ok(mut m) = self.map.write() {
            m.insert(
                *me,
                addrs.iter().take(MAX_ADDRS_PER_PEER).cloned().collect(),
            );
        }
    }

    fn withdraw(&self, me: &PeerId) {
        if let Ok(mut m) = self.map.write() {
            m.remove(me);
        }
    }
}

/// Merges addresses from several sources, keeping the first occurrence of
/// each and at most [`MAX_ADDRS_PER_PEER`].
pub fn merge(sources: &[&[PeerAddr]]) -> Vec<PeerAddr> {
    let mut out: Vec<PeerAddr> = Vec::new();
    for s in sources {
        for a in *s {
            if out.len() < MAX_ADDRS_PER_PEER && !out.contains(a) {
                out.push(a.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::SecretKey;

    fn addr(p: u16) -> PeerAddr {
        PeerAddr::Tcp(([127, 0, 0, 1], p).into())
    }

    #[test]
    fn publish_lookup_withdraw() {
        let d = MemoryDiscovery::new();
        let (a, b) = (
            SecretKey::generate().peer_id(),
            SecretKey::generate().peer_id(),
        );
        assert!(d.lookup(&a).is_empty());
        d.publish(&a, &[addr(1), addr(2)]);
        assert_eq!(d.lookup(&a), vec![addr(1), addr(2)]);
        assert!(
            d.lookup(&b).is_empty(),
            "one peer's addresses are not another's"
        );
        d.publish(&a, &[addr(3)]);
        assert_eq!(
            d.lookup(&a),
            vec![addr(3)],
            "a new announcement replaces the old"
        );
        d.withdraw(&a);
        assert!(d.lookup(&a).is_empty());
    }

    #[test]
    fn announcements_are_bounded() {
        let d = MemoryDiscovery::new();
        let a = SecretKey::generate().peer_id();
        let many: Vec<PeerAddr> = (0..100).map(addr).collect();
        d.publish(&a, &many);
        assert_eq!(d.lookup(&a).len(), MAX_ADDRS_PER_PEER);
    }

    #[test]
    fn merge_keeps_order_and_drops_duplicates() {
        let x = [addr(1), addr(2)];
        let y = [addr(2), addr(3)];
        assert_eq!(merge(&[&x, &y]), vec![addr(1), addr(2), addr(3)]);
        let many: Vec<PeerAddr> = (0..20).map(addr).collect();
        assert_eq!(merge(&[&many]).len(), MAX_ADDRS_PER_PEER);
    }
}
