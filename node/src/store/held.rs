//! Offline delivery held by others, the store's side (`docs/protocol.md`
//! §7.5): what a holder keeps for its contacts (sealed, with an expiry),
//! the deposits a sender makes from its outbox, and the ids of the messages
//! received, so that a message that comes both ways is shown once.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::omemo::{Decrypted, Encryptor, OmemoCtx, OwnOmemo};
use super::{Contact, ContactState, Ctx, Incoming, OutStanza, Received, Store, StoreError, k128};
use crate::hold::{self, Frame};
use crate::omemo::sce::Content;
use crate::settings::HoldSettings;

/// Deposits a holder keeps: (recipient contact, n), in arrival order.
pub(super) const HELD: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("held");
/// The same deposits by (recipient contact, index of sender and id) → n:
/// one copy of each.
pub(super) const HELD_IDS: TableDefinition<(u64, u64), u64> = TableDefinition::new("held_ids");
/// How many deposits each sender has here: index of the sender's key → count.
const HELD_BY: TableDefinition<u64, u64> = TableDefinition::new("held_by");
/// Ids of messages received: (contact, index of the id) → when (ms).
pub(super) const SEEN: TableDefinition<(u64, u64), u64> = TableDefinition::new("seen_ids");

/// Most tags an `<encrypted/>` element left with a holder may have.
const MAX_HELD_TAGS: usize = 128;

#[derive(Serialize, Deserialize)]
pub(super) struct HeldRow {
    from: [u8; 32],
    id: String,
    element: String,
    expires: u64,
    /// Its key in [`HELD_IDS`].
    idx: u64,
}

/// What the holder side of a batch changed.
#[derive(Debug, Default)]
pub struct HoldChanges {
    /// Offers from the contact (a holder).
    pub offers: Vec<hold::Offer>,
    /// Contacts something is now held for.
    pub held_for: Vec<u64>,
    /// Messages that came through a holder: (contact, seq).
    pub messages: Vec<(u64, u64)>,
    /// Contacts whose outbox grew (receipts for held messages).
    pub queued_for: Vec<u64>,
}

impl HoldChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.offers.is_empty()
            && self.held_for.is_empty()
            && self.messages.is_empty()
            && self.queued_for.is_empty()
    }
}

/// Deposits made from an outbox.
#[derive(Debug, Default)]
pub struct Deposits {
    /// Deposit frames, in outbox order.
    pub frames: Vec<Vec<u8>>,
    /// The last outbox number looked at.
    pub last: u64,
}

fn active_by_key<'a>(contacts: &'a [Contact], key: &[u8; 32]) -> Option<&'a Contact> {
    contacts
        .iter()
        .find(|c| c.peer == *key && c.state == ContactState::Active)
}

/// Adds `delta` to the count of deposits from `from`.
fn count_by(
    store: &Store,
    t: &mut redb::Table<u64, u64>,
    from: &[u8; 32],
    delta: i64,
) -> Result<u64, StoreError> {
    let k = store.key.index_of("held by", from);
    let n = t
        .get(k)
        .ctx("read held counts")?
        .map(|v| v.value())
        .unwrap_or(0);
    let n = n.saturating_add_signed(delta);
    if n == 0 {
        t.remove(k).ctx("write held counts")?;
    } else {
        t.insert(k, n).ctx("write held counts")?;
    }
    Ok(n)
}

impl Store {
    /// The offline-delivery settings.
    pub fn hold_settings(&self) -> Result<HoldSettings, StoreError> {
        Ok(self.profile()?.settings.hold)
    }

    /// Changes the offline-delivery settings.
    pub fn set_hold_settings(&self, h: HoldSettings) -> Result<(), StoreError> {
        let mut p = self.profile()?;
        p.settings.hold = h;
        self.set_profile(&p)
    }

    /// How many deposits this node holds for its contacts.
    pub fn held_count(&self) -> Result<u64, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        match rx.open_table(HELD) {
            Ok(t) => t.len().ctx("count held"),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(StoreError::new("open held", e)),
        }
    }

    /// Drops deposits whose expiry passed. Returns how many.
    pub fn expire_held(&self, now_s: u64) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let mut n = 0;
        {
            let mut t = tx.open_table(HELD).ctx("open held")?;
            let mut ids = tx.open_table(HELD_IDS).ctx("open held ids")?;
            let mut doomed = Vec::new();
            for row in t.iter().ctx("read held")? {
                let (k, v) = row.ctx("read held")?;
                let (c, i) = k.value();
                let r: HeldRow = self.open_json("held", &k128(c, i), v.value())?;
                if r.expires <= now_s {
                    doomed.push(((c, i), r.idx, r.from));
                }
            }
            let mut by = tx.open_table(HELD_BY).ctx("open held counts")?;
            for (k, idx, from) in doomed {
                t.remove(k).ctx("drop held")?;
                ids.remove((k.0, idx)).ctx("drop held id")?;
                count_by(self, &mut by, &from, -1)?;
                n += 1;
            }
        }
        tx.commit().ctx("commit")?;
        Ok(n)
    }

    /// Moves what is held for `contact` into its outbox, encrypted for it,
    /// in one transaction (delivered once it acks them). Returns how many.
    pub fn release_held(
        &self,
        contact: u64,
        peer: [u8; 32],
        now_s: u64,
        own: &OwnOmemo,
    ) -> Result<usize, StoreError> {
        let Some(ctx) = own.ctx(peer) else {
            return Ok(0);
        };
        let tx = self.db.begin_write().ctx("write")?;
        let frames: Vec<Vec<u8>> = self
            .take_held_in(&tx, contact)?
            .into_iter()
            .filter(|r| r.expires > now_s)
            .map(|r| {
                Frame::Held {
                    from: r.from,
                    id: r.id,
                    element: r.element,
                }
                .encode()
            })
            .collect();
        let n = frames.len();
        self.queue_hold_in(&tx, contact, &frames, &ctx)?;
        tx.commit().ctx("commit")?;
        Ok(n)
    }

    /// Removes and returns everything held for `contact`, in order.
    pub(super) fn take_held_in(
        &self,
        tx: &redb::WriteTransaction,
        contact: u64,
    ) -> Result<Vec<HeldRow>, StoreError> {
        let mut t = tx.open_table(HELD).ctx("open held")?;
        let mut ids = tx.open_table(HELD_IDS).ctx("open held ids")?;
        let mut by = tx.open_table(HELD_BY).ctx("open held counts")?;
        let mut rows = Vec::new();
        for row in t
            .range((contact, 0)..=(contact, u64::MAX))
            .ctx("read held")?
        {
            let (k, v) = row.ctx("read held")?;
            let (c, i) = k.value();
            rows.push(self.open_json::<HeldRow>("held", &k128(c, i), v.value())?);
        }
        t.retain_in((contact, 0)..=(contact, u64::MAX), |_, _| false)
            .ctx("take held")?;
        ids.retain_in((contact, 0)..=(contact, u64::MAX), |_, _| false)
            .ctx("take held ids")?;
        for r in &rows {
            count_by(self, &mut by, &r.from, -1)?;
        }
        Ok(rows)
    }

    /// Queues hold frames for `contact` (key `peer`), encrypted.
    pub fn queue_hold(
        &self,
        contact: u64,
        peer: [u8; 32],
        frames: &[Vec<u8>],
        own: &OwnOmemo,
    ) -> Result<(), StoreError> {
        let Some(ctx) = own.ctx(peer) else {
            return Ok(());
        };
        let tx = self.db.begin_write().ctx("write")?;
        self.queue_hold_in(&tx, contact, frames, &ctx)?;
        tx.commit().ctx("commit")
    }

    fn queue_hold_in(
        &self,
        tx: &redb::WriteTransaction,
        contact: u64,
        frames: &[Vec<u8>],
        ctx: &OmemoCtx,
    ) -> Result<(), StoreError> {
        if frames.is_empty() {
            return Ok(());
        }
        let mut enc = Encryptor::open(self, tx, contact, ctx)?;
        {
            let mut peers = tx.open_table(super::PEERS).ctx("open peers")?;
            let mut ot = tx.open_table(super::OUTBOX).ctx("open outbox")?;
            let mut st = self.peer_state_in(&peers, contact)?;
            for f in frames {
                let omemo = enc.encrypt_content(&Content::Hold(f.clone()));
                self.queue_out(&mut ot, contact, &mut st, 'h', |id| OutStanza::Hold {
                    id,
                    frame: data_encoding::BASE64.encode(f),
                    omemo,
                })?;
            }
            self.put_peer_state(&mut peers, contact, &st)?;
        }
        enc.save(self, tx, contact)
    }

    /// Deposit frames for the chats queued for `contact` (key `peer`) after
    /// outbox number `after`: each the ciphertext that will later go to
    /// them directly (encrypted now if it was not yet). Messages too large
    /// to deposit are skipped (they wait for the direct path).
    pub fn deposits(
        &self,
        contact: u64,
        peer: [u8; 32],
        after: u64,
        expires: u64,
        ctx: &OmemoCtx,
    ) -> Result<Deposits, StoreError> {
        let st = self.peer_state(contact)?;
        let after = after.max(st.out_acked);
        let mut d = Deposits {
            frames: Vec::new(),
            last: after,
        };
        if st.out_last <= after {
            return Ok(d);
        }
        let out = self.outbox_encrypted(contact, after, 64, ctx)?;
        if out.waiting {
            // No keys for them yet: they come only with a direct session,
            // which delivers these itself. Not tried again every tick.
            d.last = st.out_last;
        }
        for (n, s) in out.items {
            d.last = d.last.max(n);
            if let OutStanza::Chat {
                id,
                omemo: Some(element),
                ..
            } = s
                && element.len() <= hold::MAX_HELD_ELEMENT
            {
                d.frames.push(
                    Frame::Deposit {
                        to: peer,
                        id,
                        element,
                        expires,
                    }
                    .encode(),
                );
            }
        }
        Ok(d)
    }

    /// Whether each item is a message from `contact` already received
    /// (through a holder or directly).
    pub(super) fn seen_in(
        &self,
        tx: &redb::WriteTransaction,
        contact: u64,
        items: &[Incoming],
    ) -> Result<Vec<bool>, StoreError> {
        let t = tx.open_table(SEEN).ctx("open seen")?;
        let mut out = Vec::with_capacity(items.len());
        for i in items {
            out.push(match i {
                Incoming::Encrypted { id, .. } => t
                    .get((contact, self.key.index_of("seen", id.as_bytes())))
                    .ctx("read seen")?
                    .is_some(),
                _ => false,
            });
        }
        Ok(out)
    }

    /// Records that message `id` from `contact` was received.
    pub(super) fn mark_seen(
        &self,
        t: &mut redb::Table<(u64, u64), u64>,
        contact: u64,
        id: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        t.insert((contact, self.key.index_of("seen", id.as_bytes())), now_ms)
            .ctx("write seen")?;
        Ok(())
    }

    /// Handles the hold frames that came from `contact` in a batch, inside
    /// the batch's transaction: a deposit is kept (if we hold), a held
    /// message is decrypted with its sender's session and stored once, an
    /// offer is handed to the runtime. Bad frames are dropped and logged
    /// without identifiers.
    pub(super) fn hold_frames_in(
        &self,
        tx: &redb::WriteTransaction,
        contact: u64,
        frames: Vec<Vec<u8>>,
        now_ms: u64,
        ctx: Option<&OmemoCtx>,
        res: &mut Received,
    ) -> Result<(), StoreError> {
        let now_s = now_ms / 1000;
        let contacts = {
            let t = tx.open_table(super::CONTACTS).ctx("open contacts")?;
            self.contacts_of(&t)?
        };
        // Only between Coterie contacts (never from a bridged friend).
        let Some(sender) = contacts
            .iter()
            .find(|c| c.id == contact && c.state == ContactState::Active)
            .map(|c| c.peer)
        else {
            return Ok(());
        };
        let mut offering: Option<bool> = None;
        for f in frames {
            let frame = match Frame::decode(&f) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("refused a hold frame from a contact: {e}");
                    continue;
                }
            };
            match frame {
                Frame::Offer(o) => res.hold.offers.push(o),
                Frame::Deposit {
                    to,
                    id,
                    element,
                    expires,
                } => {
                    let on = match offering {
                        Some(on) => on,
                        None => *offering.insert(self.hold_settings()?.offer),
                    };
                    if !on {
                        tracing::info!(
                            "a contact left a message to hold, but holding is off: dropped"
                        );
                        continue;
                    }
                    let Some(rcpt) = active_by_key(&contacts, &to).filter(|c| c.id != contact)
                    else {
                        tracing::info!(
                            "a contact left a message for someone we do not hold for: dropped"
                        );
                        continue;
                    };
                    let expires = expires.min(now_s + hold::MAX_TTL_SECS);
                    if expires <= now_s {
                        continue;
                    }
                    self.deposit_in(tx, rcpt.id, sender, id, element, expires)?;
                    if !res.hold.held_for.contains(&rcpt.id) {
                        res.hold.held_for.push(rcpt.id);
                    }
                }
                Frame::Held { from, id, element } => {
                    let Some(author) = active_by_key(&contacts, &from) else {
                        tracing::info!("a held message from someone who is not a contact: dropped");
                        continue;
                    };
                    let Some(ctx) = ctx.and_then(|c| c.for_peer(from)) else {
                        continue;
                    };
                    self.held_message_in(tx, author.id, id, &element, now_ms, &ctx, res)?;
                }
            }
        }
        Ok(())
    }

    /// Keeps a deposit, within the per-sender and total limits.
    fn deposit_in(
        &self,
        tx: &redb::WriteTransaction,
        rcpt: u64,
        from: [u8; 32],
        id: String,
        element: String,
        expires: u64,
    ) -> Result<(), StoreError> {
        let mut t = tx.open_table(HELD).ctx("open held")?;
        let mut ids = tx.open_table(HELD_IDS).ctx("open held ids")?;
        let mut name = Vec::with_capacity(32 + id.len());
        name.extend_from_slice(&from);
        name.extend_from_slice(id.as_bytes());
        let idx = self.key.index_of("held", &name);
        if ids.get((rcpt, idx)).ctx("read held ids")?.is_some() {
            return Ok(());
        }
        let mut by = tx.open_table(HELD_BY).ctx("open held counts")?;
        let total = t.len().ctx("count held")?;
        let mine = count_by(self, &mut by, &from, 0)?;
        if total >= hold::MAX_TOTAL as u64 || mine >= hold::MAX_PER_SENDER as u64 {
            tracing::warn!("holding limit reached: a deposit from a contact was dropped");
            return Ok(());
        }
        count_by(self, &mut by, &from, 1)?;
        let n = t
            .range((rcpt, 0)..=(rcpt, u64::MAX))
            .ctx("read held")?
            .next_back()
            .transpose()
            .ctx("read held")?
            .map(|(k, _)| k.value().1 + 1)
            .unwrap_or(1);
        let row = HeldRow {
            from,
            id,
            element,
            expires,
            idx,
        };
        let v = self.seal_json("held", &k128(rcpt, n), &row)?;
        t.insert((rcpt, n), v.as_slice()).ctx("write held")?;
        ids.insert((rcpt, idx), n).ctx("write held ids")?;
        Ok(())
    }

    /// A message from `author` that a holder passed on: stored once, with a
    /// receipt queued for the author; one that does not decrypt is dropped
    /// (a holder cannot put words in anyone's mouth, nor fill a chat with
    /// undecryptable rows).
    #[allow(clippy::too_many_arguments)]
    fn held_message_in(
        &self,
        tx: &redb::WriteTransaction,
        author: u64,
        id: String,
        element: &str,
        now_ms: u64,
        ctx: &OmemoCtx,
        res: &mut Received,
    ) -> Result<(), StoreError> {
        if element.bytes().filter(|b| *b == b'<').count() > MAX_HELD_TAGS {
            tracing::warn!("refused a held message: too many elements");
            return Ok(());
        }
        let Ok(element) = element.parse::<minidom::Element>() else {
            tracing::warn!("refused a held message: not XML");
            return Ok(());
        };
        let item = Incoming::Encrypted {
            id: id.clone(),
            element,
            wants_receipt: true,
        };
        if self.seen_in(tx, author, std::slice::from_ref(&item))?[0] {
            tracing::debug!("a held message already received: dropped");
            return Ok(());
        }
        let Incoming::Encrypted { element, .. } = &item else {
            return Ok(());
        };
        if !self.is_from_known_device_in(tx, author, element)? {
            tracing::warn!("a held message not from a known device of its sender: dropped");
            return Ok(());
        }
        let mut scratch = Received::default();
        let dec = self.decrypt_batch(tx, author, ctx, &[item], now_ms, &mut scratch)?;
        res.bundle_changed |= scratch.bundle_changed;
        let Some(Some(Decrypted::Body { body, unverified })) = dec.into_iter().next() else {
            tracing::warn!("a held message could not be decrypted: dropped");
            return Ok(());
        };
        let mut peers = tx.open_table(super::PEERS).ctx("open peers")?;
        let mut mt = tx.open_table(super::MESSAGES).ctx("open messages")?;
        let mut ot = tx.open_table(super::OUTBOX).ctx("open outbox")?;
        let mut seen = tx.open_table(SEEN).ctx("open seen")?;
        let mut st = self.peer_state_in(&peers, author)?;
        let seq = st.next_seq.max(1);
        st.next_seq = seq + 1;
        let m = super::omemo::message_of(Decrypted::Body { body, unverified }, seq, &id, now_ms);
        self.put_message(&mut mt, author, &m)?;
        self.mark_seen(&mut seen, author, &id, now_ms)?;
        self.queue_out(&mut ot, author, &mut st, 'r', |rid| OutStanza::Receipt {
            id: rid,
            of: id,
        })?;
        self.put_peer_state(&mut peers, author, &st)?;
        res.hold.messages.push((author, seq));
        if !res.hold.queued_for.contains(&author) {
            res.hold.queued_for.push(author);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::omemo::Identity;
    use crate::store::crypto::KdfParams;
    use crate::store::{Delivery, Direction, Profile};

    /// One profile: its store, its OMEMO side, its key.
    struct Peer {
        _dir: tempfile::TempDir,
        s: Store,
        own: OwnOmemo,
        key: [u8; 32],
    }

    fn peer(seed: u8, hold: HoldSettings) -> Peer {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = crate::settings::Settings {
            hold,
            ..Default::default()
        };
        let p = Profile {
            name: format!("p{seed}"),
            seed: [seed; 32],
            created: 1,
            retention_days: 0,
            last_addrs: vec![],
            settings,
            bridge: None,
        };
        let kdf = KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
            salt: "000102030405060708090a0b0c0d0e0f".into(),
        };
        let s = Store::create(&dir.path().join("p"), "pw", &p, kdf).expect("create");
        let id = Identity::from_seed(&[seed; 32]);
        let key = id.ed_public();
        let jid = transport::PeerId::from_bytes(key)
            .expect("key")
            .onion_address();
        let device_id = s.omemo_device(1).expect("device").device_id;
        Peer {
            _dir: dir,
            s,
            own: OwnOmemo {
                identity: Arc::new(id),
                jid,
                device_id,
            },
            key,
        }
    }

    fn id_of(a: &Peer, b: &Peer) -> u64 {
        a.s.contacts()
            .expect("contacts")
            .iter()
            .find(|c| c.peer == b.key)
            .map(|c| c.id)
            .expect("a contact")
    }

    /// Makes `a` and `b` contacts who know each other's OMEMO bundles.
    fn befriend(a: &Peer, b: &Peer) {
        for (x, y) in [(a, b), (b, a)] {
            let c = Contact {
                id: 0,
                name: format!("c{}", y.key[0]),
                peer: y.key,
                addrs: vec![],
                state: ContactState::Active,
                added: 1,
                last_seen: None,
                last_carrier: None,
            };
            let cid = x.s.add_contact(c).expect("add");
            let dev = y.s.omemo_device(1).expect("device");
            let mut items = Vec::new();
            for el in crate::omemo::pep::announcements(&dev, &y.own.identity) {
                items.extend(crate::omemo::pep::parse_event(&el).expect("pep"));
            }
            x.s.omemo_learn(cid, y.key, items, 1).expect("learn");
        }
    }

    /// Carries what `from` has queued for `to` over a perfect link; returns
    /// what `to` made of it.
    fn carry(from: &Peer, to: &Peer, now_ms: u64) -> Received {
        let (ct, cf) = (id_of(from, to), id_of(to, from));
        let st = from.s.peer_state(ct).expect("state");
        let ctx = from.own.ctx(to.key).expect("ctx");
        let out = from
            .s
            .outbox_encrypted(ct, st.out_acked, 1000, &ctx)
            .expect("outbox");
        let items: Vec<Incoming> = out
            .items
            .iter()
            .map(|(_, s)| match s {
                OutStanza::Chat {
                    id, omemo: Some(x), ..
                }
                | OutStanza::Hold {
                    id, omemo: Some(x), ..
                }
                | OutStanza::Group {
                    id, omemo: Some(x), ..
                }
                | OutStanza::KeyTransport { id, omemo: x } => Incoming::Encrypted {
                    id: id.clone(),
                    element: x.parse().expect("xml"),
                    wants_receipt: s.is_chat(),
                },
                OutStanza::Receipt { of, .. } => Incoming::Receipt { of: of.clone() },
                _ => Incoming::Other,
            })
            .collect();
        let rctx = to.own.ctx(from.key).expect("ctx");
        let (_, res) =
            to.s.ack_and_receive(cf, None, &items, now_ms, Some(&rctx))
                .expect("receive");
        from.s.ack_outgoing(ct, res.h).expect("ack");
        res
    }

    fn offer_from(h: &Peer, to: &Peer, a: &Peer) -> hold::Offer {
        let o = hold::Offer::new([&a.key, &to.key], hold::MAX_TTL_SECS);
        h.s.queue_hold(id_of(h, to), to.key, &[Frame::Offer(o).encode()], &h.own)
            .expect("offer");
        let res = carry(h, to, 1000);
        res.hold.offers.into_iter().next().expect("offer arrived")
    }

    fn leave(a: &Peer, b: &Peer, h: &Peer, expires: u64) -> usize {
        let ctx = a.own.ctx(b.key).expect("ctx");
        let d =
            a.s.deposits(id_of(a, b), b.key, 0, expires, &ctx)
                .expect("deposits");
        a.s.queue_hold(id_of(a, h), h.key, &d.frames, &a.own)
            .expect("queue");
        d.frames.len()
    }

    fn bodies(p: &Peer, of: &Peer) -> Vec<String> {
        p.s.history(id_of(p, of), 100)
            .expect("history")
            .into_iter()
            .filter(|m| m.dir == Direction::In)
            .map(|m| m.body)
            .collect()
    }

    const HOLDER: HoldSettings = HoldSettings {
        use_holders: false,
        offer: true,
        ttl_hours: 168,
    };
    const USER: HoldSettings = HoldSettings {
        use_holders: true,
        offer: false,
        ttl_hours: 168,
    };

    fn trio() -> (Peer, Peer, Peer) {
        let (a, b, h) = (peer(1, USER), peer(2, USER), peer(3, HOLDER));
        befriend(&a, &b);
        befriend(&a, &h);
        befriend(&b, &h);
        (a, b, h)
    }

    #[test]
    fn a_held_message_reaches_its_recipient_once_whichever_way_comes_first() {
        let (a, b, h) = trio();
        let o = offer_from(&h, &a, &b);
        assert!(o.covers(&b.key) && !o.covers(&[9; 32]));
        // A writes to B, who is offline: it is left with H.
        let ca = id_of(&a, &b);
        for t in ["one", "two", "three"] {
            a.s.queue_outgoing(ca, t, 1000).expect("queue");
        }
        assert_eq!(leave(&a, &b, &h, 10_000), 3);
        let res = carry(&a, &h, 1000);
        assert_eq!(res.hold.held_for, vec![id_of(&h, &b)]);
        assert_eq!(h.s.held_count().expect("count"), 3);
        // The same deposit again (after A restarted) is kept once.
        leave(&a, &b, &h, 10_000);
        carry(&a, &h, 1000);
        assert_eq!(h.s.held_count().expect("count"), 3);
        // Nothing H keeps is readable: the body is nowhere in its file.
        let raw = std::fs::read(h.s.dir().join(crate::store::STORE_FILE)).expect("read");
        assert!(!raw.windows(5).any(|w| w == b"three"));
        // B connects to H: H passes them on; B has them once, in order,
        // with receipts queued for A.
        assert_eq!(
            h.s.release_held(id_of(&h, &b), b.key, 1, &h.own)
                .expect("release"),
            3
        );
        assert_eq!(h.s.held_count().expect("count"), 0);
        let res = carry(&h, &b, 2000);
        assert_eq!(res.hold.messages.len(), 3);
        assert_eq!(res.hold.queued_for, vec![id_of(&b, &a)]);
        assert_eq!(bodies(&b, &a), ["one", "two", "three"]);
        // Later A reaches B directly and sends the same stanzas: counted,
        // not shown again; B's receipts mark A's messages delivered.
        let res = carry(&a, &b, 3000);
        assert!(res.new_messages.is_empty());
        assert_eq!(res.h, 3);
        assert_eq!(bodies(&b, &a), ["one", "two", "three"]);
        let res = carry(&b, &a, 3000);
        assert_eq!(res.delivered.len(), 3);
        let states: Vec<Delivery> =
            a.s.history(ca, 10)
                .expect("history")
                .iter()
                .map(|m| m.state)
                .collect();
        assert_eq!(states, [Delivery::Delivered; 3]);
        // A new message after all that goes through as usual.
        a.s.queue_outgoing(ca, "four", 4000).expect("queue");
        carry(&a, &b, 4000);
        assert_eq!(bodies(&b, &a), ["one", "two", "three", "four"]);
    }

    #[test]
    fn a_copy_that_arrives_after_the_direct_one_is_dropped() {
        let (a, b, h) = trio();
        offer_from(&h, &a, &b);
        a.s.queue_outgoing(id_of(&a, &b), "hi", 1000)
            .expect("queue");
        leave(&a, &b, &h, 10_000);
        carry(&a, &h, 1000);
        // B comes online where A is, first.
        carry(&a, &b, 2000);
        assert_eq!(bodies(&b, &a), ["hi"]);
        h.s.release_held(id_of(&h, &b), b.key, 1, &h.own)
            .expect("release");
        let res = carry(&h, &b, 3000);
        assert!(res.hold.messages.is_empty());
        assert_eq!(bodies(&b, &a), ["hi"]);
    }

    #[test]
    fn held_messages_expire_and_a_holder_keeps_only_what_it_offered() {
        let (a, b, h) = trio();
        offer_from(&h, &a, &b);
        a.s.queue_outgoing(id_of(&a, &b), "old", 1000)
            .expect("queue");
        leave(&a, &b, &h, 50);
        carry(&a, &h, 1000);
        assert_eq!(h.s.held_count().expect("count"), 1);
        assert_eq!(h.s.expire_held(49).expect("expire"), 0);
        assert_eq!(h.s.expire_held(50).expect("expire"), 1);
        assert_eq!(
            h.s.release_held(id_of(&h, &b), b.key, 60, &h.own)
                .expect("release"),
            0
        );
        // A holder that stopped offering keeps nothing.
        let mut off = HOLDER;
        off.offer = false;
        h.s.set_hold_settings(off).expect("settings");
        leave(&a, &b, &h, 10_000);
        carry(&a, &h, 1000);
        assert_eq!(h.s.held_count().expect("count"), 0);
        // Nor for someone who is not its contact.
        h.s.set_hold_settings(HOLDER).expect("settings");
        let stranger = peer(4, USER);
        befriend(&a, &stranger);
        a.s.queue_outgoing(id_of(&a, &stranger), "x", 1000)
            .expect("queue");
        leave(&a, &stranger, &h, 10_000);
        carry(&a, &h, 1000);
        assert_eq!(h.s.held_count().expect("count"), 0);
    }

    #[test]
    fn a_holder_keeps_at_most_its_limit_from_one_sender_and_counts_what_leaves() {
        let (a, b, h) = trio();
        let (rcpt, from) = (id_of(&h, &b), a.key);
        let put = |n: usize, start: usize| {
            let tx = h.s.db.begin_write().expect("tx");
            for i in start..start + n {
                h.s.deposit_in(
                    &tx,
                    rcpt,
                    from,
                    format!("m{i}.0"),
                    "<encrypted/>".into(),
                    99,
                )
                .expect("deposit");
            }
            tx.commit().expect("commit");
        };
        put(hold::MAX_PER_SENDER + 5, 0);
        assert_eq!(
            h.s.held_count().expect("count"),
            hold::MAX_PER_SENDER as u64
        );
        // Another sender still has room.
        let tx = h.s.db.begin_write().expect("tx");
        h.s.deposit_in(&tx, rcpt, b.key, "m1.0".into(), "<encrypted/>".into(), 99)
            .expect("deposit");
        tx.commit().expect("commit");
        assert_eq!(
            h.s.held_count().expect("count"),
            hold::MAX_PER_SENDER as u64 + 1
        );
        // What leaves (expired here) frees the sender's room again.
        assert_eq!(
            h.s.expire_held(100).expect("expire"),
            hold::MAX_PER_SENDER as u64 + 1
        );
        put(3, 5000);
        assert_eq!(h.s.held_count().expect("count"), 3);
        // Removing the recipient drops what was held for them.
        assert!(h.s.remove_contact(rcpt).expect("remove"));
        assert_eq!(h.s.held_count().expect("count"), 0);
        put(hold::MAX_PER_SENDER, 9000);
        assert_eq!(
            h.s.held_count().expect("count"),
            hold::MAX_PER_SENDER as u64
        );
    }

    #[test]
    fn nothing_is_left_for_a_contact_whose_keys_are_unknown_and_it_is_not_retried() {
        let a = peer(1, USER);
        let b = peer(2, USER);
        // A knows B's key from the invite but never had a session: no OMEMO keys.
        let c = Contact {
            id: 0,
            name: "b".into(),
            peer: b.key,
            addrs: vec![],
            state: ContactState::Active,
            added: 1,
            last_seen: None,
            last_carrier: None,
        };
        let cb = a.s.add_contact(c).expect("add");
        a.s.queue_outgoing(cb, "hello", 1).expect("queue");
        let ctx = a.own.ctx(b.key).expect("ctx");
        let d = a.s.deposits(cb, b.key, 0, 99, &ctx).expect("deposits");
        assert!(d.frames.is_empty());
        assert_eq!(d.last, 1, "the next tick starts after it");
        let again = a.s.deposits(cb, b.key, d.last, 99, &ctx).expect("deposits");
        assert!(again.frames.is_empty() && again.last == 1);
    }

    #[test]
    fn a_holder_cannot_forge_or_misattribute_a_message() {
        let (a, b, h) = trio();
        let c = peer(5, USER);
        befriend(&b, &c);
        befriend(&h, &c);
        // A real message from A, passed on as if from C: does not decrypt
        // with C's session, so it is dropped, not shown as C's.
        a.s.queue_outgoing(id_of(&a, &b), "from a", 1000)
            .expect("queue");
        let ctx = a.own.ctx(b.key).expect("ctx");
        let d =
            a.s.deposits(id_of(&a, &b), b.key, 0, 10_000, &ctx)
                .expect("deposits");
        let Ok(Frame::Deposit { id, element, .. }) = Frame::decode(&d.frames[0]) else {
            panic!("a deposit")
        };
        let as_c = Frame::Held {
            from: c.key,
            id: id.clone(),
            element: element.clone(),
        };
        // Garbage in place of the ciphertext, in A's name.
        let garbage = Frame::Held {
            from: a.key,
            id: "m9.00000000".into(),
            element: "<encrypted xmlns='urn:xmpp:omemo:2'><header sid='1'/></encrypted>".into(),
        };
        h.s.queue_hold(
            id_of(&h, &b),
            b.key,
            &[as_c.encode(), garbage.encode(), b"\x01\x02junk".to_vec()],
            &h.own,
        )
        .expect("queue");
        let res = carry(&h, &b, 2000);
        assert!(res.hold.messages.is_empty());
        assert!(bodies(&b, &c).is_empty() && bodies(&b, &a).is_empty());
        assert_eq!(res.h, 3, "bad frames are counted, the stream goes on");
        // The genuine one, in A's name, is shown.
        let real = Frame::Held {
            from: a.key,
            id,
            element,
        };
        h.s.queue_hold(id_of(&h, &b), b.key, &[real.encode()], &h.own)
            .expect("queue");
        carry(&h, &b, 3000);
        assert_eq!(bodies(&b, &a), ["from a"]);
    }
}
