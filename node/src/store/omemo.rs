//! OMEMO state in the store: our device (prekeys), each contact's devices
//! and sessions. Encryption of queued messages and decryption of incoming
//! ones happen inside the same write transaction as the message rows they
//! belong to, so a crash never separates a ratchet step from its message.

use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    Ctx as _, DeviceRecord, Direction, Incoming, Message, OutStanza, PeerBundles, PeerOmemo,
    Received, Store, StoreError, Trust, k64, model::Delivery,
};
use crate::omemo::device::{Recipient, RemoteDevice, encrypt};
use crate::omemo::pep::PepItem;
use crate::omemo::xml::{Bundle, EncryptedElement};
use crate::omemo::{Identity, OmemoError, OwnDevice, Session, SessionSlot, Version, keys, sce};

/// Row 0 is our device; row N is contact N's devices and sessions; row
/// `BUNDLE_ROWS | N` holds contact N's bundles.
pub(super) const OMEMO: TableDefinition<u64, &[u8]> = TableDefinition::new("omemo");
const BUNDLE_ROWS: u64 = 1 << 62;

/// Deletes contact `id`'s devices, sessions and bundles inside `tx`.
pub(super) fn forget_contact(tx: &redb::WriteTransaction, id: u64) -> Result<(), StoreError> {
    let mut t = tx.open_table(OMEMO).ctx("open omemo")?;
    t.remove(id).ctx("remove omemo sessions")?;
    t.remove(BUNDLE_ROWS | id).ctx("remove omemo bundles")?;
    Ok(())
}

/// Devices kept per contact; messages from and bundles of further devices
/// are refused.
pub const MAX_CONTACT_DEVICES: usize = 16;

/// Largest payload accepted in an `<encrypted/>` element (decoded bytes).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// What OMEMO needs to know about one conversation.
#[derive(Clone)]
pub struct OmemoCtx {
    /// Our identity key.
    pub identity: Arc<Identity>,
    /// Our bare JID (the onion address).
    pub own_jid: String,
    /// Theirs.
    pub peer_jid: String,
    /// The contact's key pinned by the invite (Ed25519).
    pub pinned: [u8; 32],
    /// Our OMEMO device id.
    pub device_id: u32,
    /// Where our device is kept: [`OWN_DEVICE_ROW`], or
    /// [`BRIDGE_DEVICE_ROW`] for the bridge's.
    pub own_row: u64,
}

impl OmemoCtx {
    /// The same conversation context for another contact, key `pinned`.
    pub fn for_peer(&self, pinned: [u8; 32]) -> Option<OmemoCtx> {
        let peer = transport::PeerId::from_bytes(pinned).ok()?;
        Some(OmemoCtx {
            peer_jid: peer.onion_address(),
            pinned,
            ..self.clone()
        })
    }
}

/// Row of our device (the node's identity).
pub const OWN_DEVICE_ROW: u64 = 0;
/// Row of the bridge account's device: a separate identity, so the XMPP
/// server and the friends there never see the key the node's onion
/// address is made of.
pub const BRIDGE_DEVICE_ROW: u64 = 1 << 61;
/// The "pinned key" of a bridged contact: none. Their devices are trusted
/// blindly ([`Trust::Blind`]).
pub const NO_PIN: [u8; 32] = [0; 32];

impl std::fmt::Debug for OmemoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OmemoCtx(..)")
    }
}

/// Our side of every conversation: identity, JID, device id.
#[derive(Clone)]
pub struct OwnOmemo {
    /// Our identity key.
    pub identity: Arc<Identity>,
    /// Our bare JID (the onion address).
    pub jid: String,
    /// Our OMEMO device id.
    pub device_id: u32,
}

impl std::fmt::Debug for OwnOmemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OwnOmemo(device {})", self.device_id)
    }
}

impl OwnOmemo {
    /// The context of a conversation with the contact whose pinned key is
    /// `pinned` (Ed25519); `None` if that is not a valid key.
    pub fn ctx(&self, pinned: [u8; 32]) -> Option<OmemoCtx> {
        let peer = transport::PeerId::from_bytes(pinned).ok()?;
        Some(OmemoCtx {
            identity: self.identity.clone(),
            own_jid: self.jid.clone(),
            peer_jid: peer.onion_address(),
            pinned,
            device_id: self.device_id,
            own_row: OWN_DEVICE_ROW,
        })
    }
}

/// What learning a contact's PEP items changed.
#[derive(Debug, Default)]
pub struct Learned {
    /// Devices seen for the first time that are not trusted.
    pub new_untrusted: Vec<u32>,
    /// Whether some trusted device now has a bundle (queued messages can go).
    pub can_send: bool,
}

/// Outbox items ready to send.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Stanzas, numbered, in order.
    pub items: Vec<(u64, OutStanza)>,
    /// A chat could not be encrypted yet: no trusted device of the contact
    /// has published a bundle. Sending stops there until one does.
    pub waiting: bool,
}

impl PeerOmemo {
    fn slot(&mut self, device: u32, v: Version) -> &mut SessionSlot {
        if let Some(i) = self
            .slots
            .iter()
            .position(|(d, sv, _)| *d == device && *sv == v)
        {
            return &mut self.slots[i].2;
        }
        self.slots.push((device, v, SessionSlot::default()));
        let last = self.slots.len() - 1;
        &mut self.slots[last].2
    }

    fn slot_of(&self, device: u32, v: Version) -> Option<&SessionSlot> {
        self.slots
            .iter()
            .find(|(d, sv, _)| *d == device && *sv == v)
            .map(|(_, _, s)| s)
    }

    /// Removes a one-time prekey of theirs that we used from the stored
    /// bundle, so a second session never offers it again.
    fn forget_prekey(&mut self, device: u32, v: Version, pk: u32) {
        let Some(b) = self.bundles.as_mut() else {
            return;
        };
        let Some(i) = b
            .bundles
            .iter()
            .position(|(d, bv, _)| *d == device && *bv == v)
        else {
            return;
        };
        let parsed = b.bundles[i]
            .2
            .parse()
            .ok()
            .and_then(|el| Bundle::parse(&el).ok());
        match parsed {
            Some(mut bundle) => {
                bundle.prekeys.retain(|(id, _)| *id != pk);
                if bundle.prekeys.is_empty() {
                    b.bundles.remove(i);
                } else {
                    b.bundles[i].2 = String::from(&bundle.to_element());
                }
            }
            None => {
                b.bundles.remove(i);
            }
        }
        self.bundles_dirty = true;
    }

    fn device(&self, id: u32) -> Option<&DeviceRecord> {
        self.devices.iter().find(|d| d.id == id)
    }

    fn bundle(&self, id: u32, v: Version) -> Option<Bundle> {
        let xml = &self
            .bundles
            .as_ref()?
            .bundles
            .iter()
            .find(|(d, bv, _)| *d == id && *bv == v)?
            .2;
        Bundle::parse(&xml.parse().ok()?).ok()
    }

    fn has_session(&self, id: u32, v: Version) -> bool {
        self.slots
            .iter()
            .any(|(d, sv, s)| *d == id && *sv == v && s.current.is_some())
    }

    fn can_use(&self, id: u32, v: Version) -> bool {
        self.has_session(id, v) || self.device(id).is_some_and(|d| d.versions.contains(&v))
    }

    /// Trusted devices we can encrypt to, and the version to use: the one
    /// that reaches the most of them, OMEMO 2 on a tie.
    fn targets(&self) -> Option<(Version, Vec<u32>)> {
        let trusted: Vec<u32> = self
            .devices
            .iter()
            .filter(|d| d.trust.trusted())
            .map(|d| d.id)
            .collect();
        Version::ALL
            .iter()
            .map(|&v| {
                let reach: Vec<u32> = trusted
                    .iter()
                    .copied()
                    .filter(|d| self.can_use(*d, v))
                    .collect();
                (v, reach)
            })
            .filter(|(_, reach)| !reach.is_empty())
            .max_by_key(|(v, reach)| (reach.len(), *v == Version::V2))
    }
}

fn set_bundle(b: &mut PeerBundles, dev: u32, v: Version, xml: String) {
    b.bundles.retain(|(d, bv, _)| !(*d == dev && *bv == v));
    b.bundles.push((dev, v, xml));
}

fn trust_for(identity: &[u8; 32], pinned: &[u8; 32]) -> Trust {
    if *pinned == NO_PIN {
        Trust::Blind
    } else if keys::ed_to_mont(pinned).as_ref() == Some(identity) {
        Trust::Pinned
    } else {
        Trust::Untrusted
    }
}

impl Store {
    fn own_device_in(
        &self,
        t: &impl ReadableTable<u64, &'static [u8]>,
        row: u64,
    ) -> Result<Option<OwnDevice>, StoreError> {
        match t.get(row).ctx("read omemo")? {
            Some(v) => Ok(Some(self.open_json("omemo", &k64(row), v.value())?)),
            None => Ok(None),
        }
    }

    fn peer_omemo_in(
        &self,
        t: &impl ReadableTable<u64, &'static [u8]>,
        contact: u64,
    ) -> Result<PeerOmemo, StoreError> {
        match t.get(contact).ctx("read omemo")? {
            Some(v) => self.open_json("omemo", &k64(contact), v.value()),
            None => Ok(PeerOmemo::default()),
        }
    }

    /// Whether `element` comes from a trusted device `contact` already
    /// has: what a message passed on by a holder must be before it is
    /// decrypted (its sender is only claimed, and a first message from an
    /// unknown device would use up one of our prekeys).
    pub(super) fn is_from_known_device_in(
        &self,
        tx: &redb::WriteTransaction,
        contact: u64,
        element: &minidom::Element,
    ) -> Result<bool, StoreError> {
        let Ok(parsed) = EncryptedElement::parse(element, MAX_PAYLOAD) else {
            return Ok(false);
        };
        let t = tx.open_table(OMEMO).ctx("open omemo")?;
        let p = self.peer_omemo_in(&t, contact)?;
        Ok(p.device(parsed.sid).is_some_and(|d| d.trust.trusted()))
    }

    fn bundles_in(
        &self,
        t: &impl ReadableTable<u64, &'static [u8]>,
        contact: u64,
    ) -> Result<PeerBundles, StoreError> {
        let row = BUNDLE_ROWS | contact;
        match t.get(row).ctx("read omemo")? {
            Some(v) => self.open_json("omemo", &k64(row), v.value()),
            None => Ok(PeerBundles::default()),
        }
    }

    /// Loads the contact's bundles into `p` if a session may have to be
    /// started (a target device without a session).
    fn load_bundles_if_needed(
        &self,
        t: &impl ReadableTable<u64, &'static [u8]>,
        contact: u64,
        p: &mut PeerOmemo,
        force: bool,
    ) -> Result<(), StoreError> {
        let needed = force
            || p.targets()
                .is_some_and(|(v, ds)| ds.iter().any(|d| !p.has_session(*d, v)));
        if needed && p.bundles.is_none() {
            p.bundles = Some(self.bundles_in(t, contact)?);
        }
        Ok(())
    }

    /// Writes a contact's devices and sessions, and their bundles if a used
    /// prekey was dropped from them.
    fn save_peer(
        &self,
        t: &mut redb::Table<u64, &[u8]>,
        contact: u64,
        p: &PeerOmemo,
    ) -> Result<(), StoreError> {
        self.put_omemo(t, contact, p)?;
        if p.bundles_dirty
            && let Some(b) = &p.bundles
        {
            self.put_omemo(t, BUNDLE_ROWS | contact, b)?;
        }
        Ok(())
    }

    fn put_omemo<T: serde::Serialize>(
        &self,
        t: &mut redb::Table<u64, &[u8]>,
        row: u64,
        v: &T,
    ) -> Result<(), StoreError> {
        let sealed = self.seal_json("omemo", &k64(row), v)?;
        t.insert(row, sealed.as_slice()).ctx("write omemo")?;
        Ok(())
    }

    /// Our OMEMO device, created on first use; prekeys replenished and the
    /// signed prekey rotated when due.
    pub fn omemo_device(&self, now_s: u64) -> Result<OwnDevice, StoreError> {
        self.omemo_device_at(OWN_DEVICE_ROW, now_s)
    }

    /// Forgets the bridge account's device (a new one is made on next use).
    pub fn forget_bridge_device(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        {
            let mut t = tx.open_table(OMEMO).ctx("open omemo")?;
            t.remove(BRIDGE_DEVICE_ROW).ctx("remove bridge device")?;
        }
        tx.commit().ctx("commit")?;
        Ok(())
    }

    /// The device kept in `row` ([`OWN_DEVICE_ROW`] or
    /// [`BRIDGE_DEVICE_ROW`]), created on first use; prekeys replenished
    /// and the signed prekey rotated when due.
    pub fn omemo_device_at(&self, row: u64, now_s: u64) -> Result<OwnDevice, StoreError> {
        // Usually nothing is due: a read, no write transaction (disk sync).
        {
            let rx = self.db.begin_read().ctx("read")?;
            if let Ok(t) = rx.open_table(OMEMO)
                && let Some(d) = self.own_device_in(&t, row)?
                && !d.clone().maintain(now_s, &mut rand::rngs::OsRng)
            {
                return Ok(d);
            }
        }
        let tx = self.db.begin_write().ctx("write")?;
        let dev = {
            let mut t = tx.open_table(OMEMO).ctx("open omemo")?;
            let mut rng = rand::rngs::OsRng;
            let (dev, changed) = match self.own_device_in(&t, row)? {
                Some(mut d) => {
                    let c = d.maintain(now_s, &mut rng);
                    (d, c)
                }
                None => (OwnDevice::new(now_s, &mut rng), true),
            };
            if changed {
                self.put_omemo(&mut t, row, &dev)?;
            }
            dev
        };
        tx.commit().ctx("commit")?;
        Ok(dev)
    }

    /// A contact's OMEMO devices.
    pub fn omemo_peer(&self, contact: u64) -> Result<PeerOmemo, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = match rx.open_table(OMEMO) {
            Ok(t) => t,
            // No node has run yet: nothing is known.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(PeerOmemo::default()),
            Err(e) => return Err(StoreError::new("open omemo", e)),
        };
        self.peer_omemo_in(&t, contact)
    }

    /// Marks a contact's device verified. `false` if there is no such device.
    pub fn omemo_verify(&self, contact: u64, device: u32) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let found = {
            let mut t = tx.open_table(OMEMO).ctx("open omemo")?;
            let mut p = self.peer_omemo_in(&t, contact)?;
            let found = match p.devices.iter_mut().find(|d| d.id == device) {
                Some(d) => {
                    // The user compared the fingerprint: an untrusted device
                    // becomes trusted, the invite's pinned one is recorded as
                    // compared too.
                    d.trust = Trust::Verified;
                    true
                }
                None => false,
            };
            if found {
                self.put_omemo(&mut t, contact, &p)?;
            }
            found
        };
        tx.commit().ctx("commit")?;
        Ok(found)
    }

    /// Records a contact's device lists and bundles.
    pub fn omemo_learn(
        &self,
        contact: u64,
        pinned: [u8; 32],
        items: Vec<PepItem>,
        now_s: u64,
    ) -> Result<Learned, StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let mut learned = Learned::default();
        {
            let mut t = tx.open_table(OMEMO).ctx("open omemo")?;
            let mut p = self.peer_omemo_in(&t, contact)?;
            let mut bundles = self.bundles_in(&t, contact)?;
            for item in items {
                match item {
                    PepItem::Devices(v, ids) => {
                        p.listed.retain(|(lv, _)| *lv != v);
                        p.listed.push((v, ids));
                    }
                    PepItem::Bundle(dev, b, xml) => {
                        let Some(identity) = keys::ed_to_mont(&b.ik) else {
                            continue;
                        };
                        let full = p.devices.len() >= MAX_CONTACT_DEVICES;
                        match p.devices.iter_mut().find(|d| d.id == dev) {
                            Some(d) if d.identity != identity => {
                                tracing::warn!(
                                    device = dev,
                                    "a contact's device published a different identity key; ignored"
                                );
                                continue;
                            }
                            Some(d) => {
                                if !d.versions.contains(&b.version) {
                                    d.versions.push(b.version);
                                }
                                set_bundle(&mut bundles, dev, b.version, xml);
                            }
                            None if full => {
                                tracing::warn!(
                                    "a contact announced more devices than kept; ignored"
                                );
                            }
                            None => {
                                let trust = trust_for(&identity, &pinned);
                                if trust == Trust::Untrusted {
                                    tracing::warn!(
                                        device = dev,
                                        "a contact has a new device; it stays untrusted until verified"
                                    );
                                    learned.new_untrusted.push(dev);
                                }
                                p.devices.push(DeviceRecord {
                                    id: dev,
                                    identity,
                                    trust,
                                    versions: vec![b.version],
                                    first_seen: now_s,
                                });
                                set_bundle(&mut bundles, dev, b.version, xml);
                            }
                        }
                    }
                }
            }
            learned.can_send = p.targets().is_some();
            self.put_omemo(&mut t, contact, &p)?;
            self.put_omemo(&mut t, BUNDLE_ROWS | contact, &bundles)?;
        }
        tx.commit().ctx("commit")?;
        Ok(learned)
    }

    /// Queued stanzas numbered above `after` (at most `limit`), every chat
    /// encrypted. Chats encrypted now are stored with their ciphertext and
    /// the advanced sessions in one transaction, before anything is sent.
    pub fn outbox_encrypted(
        &self,
        contact: u64,
        after: u64,
        limit: usize,
        ctx: &OmemoCtx,
    ) -> Result<Outbox, StoreError> {
        let items = self.outbox_after(contact, after, limit)?;
        let needs = items.iter().any(|(_, s)| s.pending_content().is_some());
        if !needs {
            return Ok(Outbox {
                items,
                waiting: false,
            });
        }
        let tx = self.db.begin_write().ctx("write")?;
        let out = {
            let mut t = tx.open_table(OMEMO).ctx("open omemo")?;
            let mut ot = tx.open_table(super::OUTBOX).ctx("open outbox")?;
            let mut p = self.peer_omemo_in(&t, contact)?;
            self.load_bundles_if_needed(&t, contact, &mut p, false)?;
            let mut rng = rand::rngs::OsRng;
            let mut ready = Vec::with_capacity(items.len());
            let mut waiting = false;
            let targets = p.targets();
            for (n, st) in items {
                let st = match st.pending_content() {
                    Some(content) => {
                        let el = targets.as_ref().and_then(|(v, devices)| {
                            encrypt_for(&mut p, ctx, *v, devices, Some(&content), &mut rng)
                        });
                        let Some(el) = el else {
                            tracing::debug!(
                                devices = targets.as_ref().map_or(0, |(_, d)| d.len()),
                                known = p.devices.len(),
                                "a queued stanza cannot be encrypted yet"
                            );
                            waiting = true;
                            break;
                        };
                        let st = st.encrypted(el);
                        self.put_out(&mut ot, contact, n, &st)?;
                        st
                    }
                    None => st,
                };
                ready.push((n, st));
            }
            self.save_peer(&mut t, contact, &p)?;
            Outbox {
                items: ready,
                waiting,
            }
        };
        tx.commit().ctx("commit")?;
        Ok(out)
    }

    /// Decrypts the encrypted items of an incoming batch (inside the
    /// batch's transaction). Returns, per item, the message to store (if
    /// any); queues key-transport repairs into `repairs`.
    pub(super) fn decrypt_batch(
        &self,
        tx: &redb::WriteTransaction,
        contact: u64,
        ctx: &OmemoCtx,
        items: &[Incoming],
        now_ms: u64,
        res: &mut Received,
    ) -> Result<Vec<Option<Decrypted>>, StoreError> {
        let mut out = Vec::with_capacity(items.len());
        if !items
            .iter()
            .any(|i| matches!(i, Incoming::Encrypted { .. }))
        {
            out.resize_with(items.len(), || None);
            return Ok(out);
        }
        let now_s = now_ms / 1000;
        let mut t = tx.open_table(OMEMO).ctx("open omemo")?;
        let mut own = self
            .own_device_in(&t, ctx.own_row)?
            .ok_or_else(|| StoreError::new("decrypt", "no OMEMO device yet"))?;
        let own_before = own.prekey_count();
        let mut p = self.peer_omemo_in(&t, contact)?;
        let mut rng = rand::rngs::OsRng;
        let mut repaired: Vec<(u32, Version)> = Vec::new();
        for item in items {
            let Incoming::Encrypted { element, .. } = item else {
                out.push(None);
                continue;
            };
            let parsed = match EncryptedElement::parse(element, MAX_PAYLOAD) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("refused an OMEMO message from a contact: {e}");
                    out.push(Some(Decrypted::Failed(e)));
                    continue;
                }
            };
            let (sid, v) = (parsed.sid, parsed.version);
            let known = p.device(sid).map(|d| d.identity);
            if known.is_none() && p.devices.len() >= MAX_CONTACT_DEVICES {
                tracing::warn!("refused an OMEMO message from yet another device of a contact");
                out.push(Some(Decrypted::Failed(OmemoError::Malformed(
                    "too many devices for one contact",
                ))));
                continue;
            }
            // Worked on a copy: nothing is recorded for a message that fails.
            let mut slot = p.slot_of(sid, v).cloned().unwrap_or_default();
            match own.decrypt(
                &ctx.identity,
                &ctx.own_jid,
                RemoteDevice { identity: known },
                &mut slot,
                &parsed,
                now_s,
                &mut rng,
            ) {
                Ok(o) => {
                    *p.slot(sid, v) = slot;
                    if p.device(sid).is_none() {
                        let trust = trust_for(&o.sender_identity, &ctx.pinned);
                        if trust == Trust::Untrusted {
                            tracing::warn!(
                                device = sid,
                                "a message from a contact's new device; it stays untrusted until verified"
                            );
                        }
                        p.devices.push(DeviceRecord {
                            id: sid,
                            identity: o.sender_identity,
                            trust,
                            versions: Vec::new(),
                            first_seen: now_s,
                        });
                    }
                    let verified = p.device(sid).is_some_and(|d| d.trust.verified());
                    let content = match (v, o.plaintext) {
                        (_, None) => {
                            out.push(None);
                            continue;
                        }
                        (Version::V03, Some(pt)) => String::from_utf8(pt)
                            .map_err(|_| OmemoError::Malformed("UTF-8 body"))
                            .map(|b| {
                                sce::Content::frame_from_xml(&b).unwrap_or(sce::Content::Body(b))
                            }),
                        (Version::V2, Some(pt)) => sce::open_content(&pt, &ctx.peer_jid)
                            .and_then(|b| b.ok_or(OmemoError::Malformed("envelope without body"))),
                    };
                    out.push(Some(match content {
                        Ok(sce::Content::Body(body)) => Decrypted::Body {
                            body,
                            unverified: !verified,
                        },
                        Ok(sce::Content::Group(frame)) => Decrypted::Group(frame),
                        Ok(sce::Content::Hold(frame)) => Decrypted::Hold(frame),
                        Err(e) => {
                            tracing::warn!(
                                "an OMEMO message from a contact had a bad envelope: {e}"
                            );
                            Decrypted::Failed(e)
                        }
                    }));
                }
                Err(OmemoError::Duplicate) => {
                    tracing::warn!("dropped a replayed OMEMO message from a contact");
                    out.push(None);
                }
                Err(e) => {
                    tracing::warn!(
                        device = sid,
                        "could not decrypt an OMEMO message from a contact: {e}"
                    );
                    // XEP-0384: a broken session is rebuilt from the
                    // device's bundle, announced by an empty message.
                    // Only for a missing session: a forged message (bad MAC)
                    // must not make us replace a working one.
                    let repair = matches!(e, OmemoError::NoSession)
                        && !repaired.contains(&(sid, v))
                        && p.device(sid).is_some_and(|d| d.trust.trusted());
                    if repair {
                        self.load_bundles_if_needed(&t, contact, &mut p, true)?;
                    }
                    if repair
                        && let Some(b) = p.bundle(sid, v)
                        && let Ok(s) = Session::initiate(&ctx.identity, &b, &mut rng)
                    {
                        if let Some(pk) = s.prekey_used() {
                            p.forget_prekey(sid, v, pk);
                        }
                        p.slot(sid, v).install(s);
                        if let Some(el) = encrypt_for(&mut p, ctx, v, &[sid], None, &mut rng) {
                            repaired.push((sid, v));
                            res.repairs.push(el);
                        }
                    }
                    out.push(parsed.payload.is_some().then_some(Decrypted::Failed(e)));
                }
            }
        }
        if own.prekey_count() != own_before {
            own.maintain(now_s, &mut rng);
            self.put_omemo(&mut t, ctx.own_row, &own)?;
            res.bundle_changed = true;
        }
        self.save_peer(&mut t, contact, &p)?;
        Ok(out)
    }
}

/// The outcome of decrypting one item.
#[derive(Debug)]
pub(super) enum Decrypted {
    /// A message.
    Body {
        /// Its text.
        body: String,
        /// From a device that is not trusted.
        unverified: bool,
    },
    /// A message that could not be decrypted.
    Failed(OmemoError),
    /// A group frame (self-authenticating: its items are signed).
    Group(Vec<u8>),
    /// A hold frame.
    Hold(Vec<u8>),
}

/// Encrypts for `devices` in version `v` (starting sessions from bundles as
/// needed); the `<encrypted/>` element as XML, or `None` if no device could
/// be reached.
fn encrypt_for(
    p: &mut PeerOmemo,
    ctx: &OmemoCtx,
    v: Version,
    devices: &[u32],
    body: Option<&sce::Content>,
    rng: &mut rand::rngs::OsRng,
) -> Option<String> {
    for &d in devices {
        if !p.has_session(d, v) {
            let b = p.bundle(d, v)?;
            match Session::initiate(&ctx.identity, &b, rng) {
                Ok(s) => {
                    if let Some(pk) = s.prekey_used() {
                        p.forget_prekey(d, v, pk);
                    }
                    p.slot(d, v).install(s);
                }
                Err(e) => {
                    tracing::warn!(device = d, "cannot start an OMEMO session: {e}");
                    return None;
                }
            }
        }
    }
    let plaintext = body.map(|b| match (v, b) {
        (Version::V03, sce::Content::Body(b)) => b.as_bytes().to_vec(),
        (Version::V03, g) => String::from(&g.element()).into_bytes(),
        (Version::V2, c) => sce::seal_content(c, &ctx.own_jid, rng),
    });
    let mut sessions: Vec<(u32, Session)> = Vec::new();
    for &d in devices {
        let s = p.slot(d, v).current.take()?;
        sessions.push((d, s));
    }
    let el = {
        let mut recipients: Vec<Recipient<'_>> = sessions
            .iter_mut()
            .map(|(d, s)| Recipient {
                jid: &ctx.peer_jid,
                device_id: *d,
                session: s,
            })
            .collect();
        encrypt(
            v,
            &ctx.identity,
            ctx.device_id,
            &mut recipients,
            plaintext.as_deref(),
            rng,
        )
    };
    for (d, s) in sessions {
        p.slot(d, v).current = Some(s);
    }
    let xml = String::from(&el.to_element());
    // The receiver refuses stanzas over 64 KiB: never send one (the
    // sender's body limit keeps this from happening with a few devices).
    if xml.len() > MAX_ENCRYPTED_XML {
        tracing::warn!(
            devices = devices.len(),
            "an encrypted message would be too large to send"
        );
        return None;
    }
    Some(xml)
}

/// Largest `<encrypted/>` element we send (the receiver's stanza limit is 64 KiB).
pub const MAX_ENCRYPTED_XML: usize = 62 * 1024;

/// Encrypts several messages to one contact inside a store transaction.
pub(super) struct Encryptor<'c> {
    ctx: &'c OmemoCtx,
    peer: PeerOmemo,
    targets: Option<(Version, Vec<u32>)>,
    changed: bool,
}

impl<'c> Encryptor<'c> {
    pub(super) fn open(
        store: &Store,
        tx: &redb::WriteTransaction,
        contact: u64,
        ctx: &'c OmemoCtx,
    ) -> Result<Self, StoreError> {
        let t = tx.open_table(OMEMO).ctx("open omemo")?;
        let mut peer = store.peer_omemo_in(&t, contact)?;
        store.load_bundles_if_needed(&t, contact, &mut peer, false)?;
        let targets = peer.targets();
        Ok(Encryptor {
            ctx,
            peer,
            targets,
            changed: false,
        })
    }

    /// The `<encrypted/>` XML for `body`, or `None` if it cannot be
    /// encrypted now (it will be when first sent).
    pub(super) fn encrypt(&mut self, body: &str) -> Option<String> {
        self.encrypt_content(&sce::Content::Body(body.to_string()))
    }

    /// The `<encrypted/>` XML for `content`, or `None` if it cannot be
    /// encrypted now (it will be when first sent).
    pub(super) fn encrypt_content(&mut self, content: &sce::Content) -> Option<String> {
        let (v, devices) = self.targets.clone()?;
        let el = encrypt_for(
            &mut self.peer,
            self.ctx,
            v,
            &devices,
            Some(content),
            &mut rand::rngs::OsRng,
        )?;
        self.changed = true;
        Some(el)
    }

    pub(super) fn save(
        self,
        store: &Store,
        tx: &redb::WriteTransaction,
        contact: u64,
    ) -> Result<(), StoreError> {
        if self.changed {
            let mut t = tx.open_table(OMEMO).ctx("open omemo")?;
            store.save_peer(&mut t, contact, &self.peer)?;
        }
        Ok(())
    }
}

/// The message row for a decrypted item.
pub(super) fn message_of(d: Decrypted, seq: u64, id: &str, now_ms: u64) -> Message {
    let (body, unverified, undecryptable) = match d {
        Decrypted::Body { body, unverified } => (body, unverified, None),
        Decrypted::Failed(e) => (String::new(), false, Some(e.to_string())),
        // Not a message: handled before rows are made.
        Decrypted::Group(_) | Decrypted::Hold(_) => {
            (String::new(), false, Some("not a message".into()))
        }
    };
    Message {
        seq,
        dir: Direction::In,
        body,
        ts: now_ms,
        state: Delivery::Received,
        stanza_id: id.to_string(),
        unverified,
        undecryptable,
    }
}
