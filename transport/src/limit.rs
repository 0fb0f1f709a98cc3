//! Bounds on handshakes in progress, per listener and per source address.
//!
//! A listener runs at most [`MAX_CONCURRENT_HANDSHAKES`] handshakes at once
//! (each with [`HANDSHAKE_TIMEOUT`]), and at most
//! [`MAX_HANDSHAKES_PER_ADDR`] from one source address: an IPv4 address, or
//! an IPv6 /64 (one host can use a whole /64). Without the second bound one
//! stranger on the LAN holding connections open without a byte sent would
//! take every slot, and a contact's reconnect would wait in the backlog
//! behind them.
//!
//! [`MAX_CONCURRENT_HANDSHAKES`]: crate::MAX_CONCURRENT_HANDSHAKES
//! [`HANDSHAKE_TIMEOUT`]: crate::HANDSHAKE_TIMEOUT

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// How many handshakes one source address may have in progress at once.
pub const MAX_HANDSHAKES_PER_ADDR: usize = 8;

/// The part of an address one host controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6Prefix(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => Source::V4(u32::from(a)),
            IpAddr::V6(a) => Source::V6Prefix((u128::from(a) >> 64) as u64),
        }
    }
}

/// Handshakes in progress, by source.
#[derive(Debug, Clone, Default)]
pub(crate) struct PerSource {
    counts: Arc<Mutex<HashMap<Source, usize>>>,
}

/// One handshake's place; given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    counts: Arc<Mutex<HashMap<Source, usize>>>,
    source: Source,
}

impl PerSource {
    /// A place for a handshake from `ip`, or `None` when that source
    /// already has [`MAX_HANDSHAKES_PER_ADDR`] in progress.
    pub(crate) fn try_start(&self, ip: IpAddr) -> Option<Slot> {
        let source = Source::from(ip);
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(source).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_ADDR {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: self.counts.clone(),
            source,
        })
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // No entry outlives its handshakes: the map is bounded by
                // the handshakes in progress, not by every address seen.
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn one_source_gets_at_most_its_share_and_others_are_untouched() {
        let p = PerSource::default();
        let held: Vec<Slot> = (0..MAX_HANDSHAKES_PER_ADDR)
            .map(|_| p.try_start(ip("10.0.0.9")).expect("within the share"))
            .collect();
        assert!(p.try_start(ip("10.0.0.9")).is_none());
        // The same host as an IPv4-mapped IPv6 address is the same source.
        assert!(p.try_start(ip("::ffff:10.0.0.9")).is_none());
        let other = p.try_start(ip("10.0.0.10")).expect("another host");
        drop(other);
        drop(held);
        assert_eq!(p.sources(), 0, "entries are dropped with their slots");
        assert!(p.try_start(ip("10.0.0.9")).is_some());
    }

    #[test]
    fn an_ipv6_host_is_its_slash_64() {
        let p = PerSource::default();
        let _held: Vec<Slot> = (0..MAX_HANDSHAKES_PER_ADDR as u16)
            .map(|i| {
                let a = format!("2001:db8:1:2::{:x}", i + 1);
                p.try_start(ip(&a)).expect("within the share")
            })
            .collect();
        // Another address in the same /64: refused.
        assert!(p.try_start(ip("2001:db8:1:2:ffff::1")).is_none());
        // The next /64: its own share.
        assert!(p.try_start(ip("2001:db8:1:3::1")).is_some());
    }
}
