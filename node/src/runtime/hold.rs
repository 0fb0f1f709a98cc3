//! Offline delivery held by others (`docs/protocol.md` §7.5), the running
//! node's side: a holder offers to each connected contact and passes on
//! what it holds when the recipient connects; a sender leaves the messages
//! queued for an offline contact with connected holders that can reach
//! them. Thin glue over `crate::hold` and `Store`'s held rows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use transport::PeerId;

use super::{Shared, db};
use crate::hold::Offer;
use crate::ops::{now_ms, now_secs};

/// How often a holder drops expired deposits.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// In memory only: offers vanish with their session, and what was left
/// with a holder is left again after a restart (the holder keeps one copy).
#[derive(Debug, Default)]
pub(crate) struct Holding {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Connected holders' offers, by contact.
    offers: HashMap<u64, Offer>,
    /// (holder, recipient) → the last outbox number left with that holder.
    left: HashMap<(u64, u64), u64>,
    /// Contacts we sent an offer to, with the contact set it named.
    offered: HashMap<u64, u64>,
    last_expiry: Option<Instant>,
}

impl Holding {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn contacts(shared: &Shared) -> Vec<(PeerId, u64)> {
    shared
        .contacts
        .read()
        .map(|c| c.iter().map(|(p, id)| (*p, *id)).collect())
        .unwrap_or_default()
}

/// A fingerprint of the contact set (an offer is re-sent when it changes).
fn contact_set(all: &[(PeerId, u64)]) -> u64 {
    let mut ids: Vec<u64> = all.iter().map(|(_, id)| *id).collect();
    ids.sort_unstable();
    ids.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, id| {
        (h ^ id).wrapping_mul(0x100_0000_01b3)
    })
}

async fn settings(shared: &Arc<Shared>) -> Option<crate::settings::HoldSettings> {
    match db(&shared.store, |s| s.hold_settings()).await {
        Ok(Ok(h)) => Some(h),
        Ok(Err(e)) => {
            tracing::warn!("could not read the holding settings: {e}");
            None
        }
        Err(_) => None,
    }
}

/// A session with `contact` is up: pass on what we hold for them, and
/// offer to hold for them if we do.
pub(crate) async fn connected(shared: &Arc<Shared>, contact: u64) {
    let all = contacts(shared);
    let Some(peer) = all.iter().find(|(_, id)| *id == contact).map(|(p, _)| *p) else {
        return;
    };
    release(shared, contact, peer).await;
    if settings(shared).await.is_some_and(|h| h.offer) {
        offer(shared, contact, peer, &all).await;
    }
}

/// Moves what we hold for `contact` into their outbox.
async fn release(shared: &Arc<Shared>, contact: u64, peer: PeerId) {
    let own = shared.omemo.clone();
    let key = *peer.as_bytes();
    match db(&shared.store, move |s| {
        s.release_held(contact, key, now_secs(), &own)
    })
    .await
    {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => {
            tracing::debug!(n, "passing on held messages");
            shared.outbox_grew(contact);
        }
        Ok(Err(e)) => tracing::warn!("could not pass on held messages: {e}"),
        Err(_) => {}
    }
}

async fn offer(shared: &Arc<Shared>, contact: u64, peer: PeerId, all: &[(PeerId, u64)]) {
    let others = all
        .iter()
        .filter(|(_, id)| *id != contact)
        .map(|(p, _)| p.as_bytes());
    let o = Offer::new(others, crate::hold::MAX_TTL_SECS);
    let frame = crate::hold::Frame::Offer(o).encode();
    let own = shared.omemo.clone();
    let key = *peer.as_bytes();
    match db(&shared.store, move |s| {
        s.queue_hold(contact, key, &[frame], &own)
    })
    .await
    {
        Ok(Ok(())) => {
            shared
                .holding
                .lock()
                .offered
                .insert(contact, contact_set(all));
            shared.outbox_grew(contact);
        }
        Ok(Err(e)) => tracing::warn!("could not offer to hold: {e}"),
        Err(_) => {}
    }
}

/// The session with `contact` ended: its offer goes with it.
pub(crate) fn disconnected(shared: &Shared, contact: u64) {
    let mut st = shared.holding.lock();
    st.offers.remove(&contact);
    st.offered.remove(&contact);
    st.left.retain(|(h, _), _| *h != contact);
}

/// What a batch from `contact` changed on the holding side.
pub(crate) async fn received(
    shared: &Arc<Shared>,
    contact: u64,
    changes: crate::store::HoldChanges,
) {
    if changes.is_empty() {
        return;
    }
    if let Some(o) = changes.offers.into_iter().last() {
        let mut st = shared.holding.lock();
        st.offers.insert(contact, o);
        st.left.retain(|(h, _), _| *h != contact);
    }
    for &(c, seq) in &changes.messages {
        tracing::debug!(seq, "message stored (held)");
        shared.message_stored(c, seq);
    }
    for c in changes.queued_for {
        shared.outbox_grew(c);
    }
    let live = super::groups::live_contacts(shared);
    let all = contacts(shared);
    for c in changes.held_for {
        if let Some((peer, _)) = all.iter().find(|(_, id)| *id == c && live.contains(id)) {
            release(shared, c, *peer).await;
        }
    }
}

/// Every second: re-offer when our contacts changed, leave queued messages
/// for offline contacts with connected holders, drop expired deposits.
pub(crate) async fn tick(shared: &Arc<Shared>) {
    let Some(h) = settings(shared).await else {
        return;
    };
    let all = contacts(shared);
    let live = super::groups::live_contacts(shared);
    if h.offer {
        let set = contact_set(&all);
        let stale: Vec<(PeerId, u64)> = {
            let st = shared.holding.lock();
            all.iter()
                .filter(|(_, id)| live.contains(id) && st.offered.get(id) != Some(&set))
                .copied()
                .collect()
        };
        for (peer, c) in stale {
            offer(shared, c, peer, &all).await;
        }
        let due = {
            let mut st = shared.holding.lock();
            let due = st.last_expiry.is_none_or(|t| t.elapsed() >= EXPIRE_EVERY);
            if due {
                st.last_expiry = Some(Instant::now());
            }
            due
        };
        if due {
            match db(&shared.store, |s| s.expire_held(now_secs())).await {
                Ok(Ok(n)) if n > 0 => tracing::info!(n, "held messages expired"),
                Ok(Err(e)) => tracing::warn!("could not expire held messages: {e}"),
                _ => {}
            }
        }
    }
    if h.use_holders {
        leave(shared, &all, &live, h.ttl_secs()).await;
    }
}

/// Leaves what is queued for each offline contact with every connected
/// holder that can reach them.
async fn leave(shared: &Arc<Shared>, all: &[(PeerId, u64)], live: &[u64], ttl: u64) {
    let offers: Vec<(u64, Offer)> = {
        let st = shared.holding.lock();
        st.offers
            .iter()
            .filter(|(h, _)| live.contains(h))
            .map(|(h, o)| (*h, o.clone()))
            .collect()
    };
    if offers.is_empty() {
        return;
    }
    for (peer, rcpt) in all {
        if live.contains(rcpt) {
            continue;
        }
        for (holder, o) in &offers {
            if holder == rcpt || !o.covers(peer.as_bytes()) {
                continue;
            }
            let Some(holder_peer) = all.iter().find(|(_, id)| id == holder).map(|(p, _)| *p) else {
                continue;
            };
            let after = shared
                .holding
                .lock()
                .left
                .get(&(*holder, *rcpt))
                .copied()
                .unwrap_or(0);
            let Some(ctx) = shared.omemo.ctx(*peer.as_bytes()) else {
                continue;
            };
            let (rcpt, holder, key, hkey) =
                (*rcpt, *holder, *peer.as_bytes(), *holder_peer.as_bytes());
            let own = shared.omemo.clone();
            let expires = now_ms() / 1000 + ttl;
            let r = db(&shared.store, move |s| {
                let d = s.deposits(rcpt, key, after, expires, &ctx)?;
                s.queue_hold(holder, hkey, &d.frames, &own)?;
                Ok::<_, crate::store::StoreError>(d)
            })
            .await;
            match r {
                Ok(Ok(d)) => {
                    if !d.frames.is_empty() {
                        tracing::debug!(n = d.frames.len(), "left messages with a holder");
                        shared.outbox_grew(holder);
                    }
                    shared.holding.lock().left.insert((holder, rcpt), d.last);
                }
                Ok(Err(e)) => tracing::warn!("could not leave messages with a holder: {e}"),
                Err(_) => {}
            }
        }
    }
}
