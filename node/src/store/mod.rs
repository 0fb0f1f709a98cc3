//! The encrypted profile store (redb).
//!
//! One file, `profile.redb`, in the profile directory. The `meta` table holds
//! only the Argon2id parameters and the wrapped data key; every other value is
//! sealed with the data key (see [`crypto`]). Row keys are integers (local ids
//! and sequence numbers) or keyed hashes, never names, JIDs or keys.
//!
//! Every operation that changes message state is one write transaction, so a
//! crash at any point leaves either the state before or the state after.

pub mod crypto;
pub mod groups;
pub mod held;
pub mod model;
pub mod omemo;

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};
use zeroize::Zeroizing;

use crate::store::crypto::{DataKey, KdfParams, KeyError};
pub use crate::store::groups::{GroupPostRow, GroupRow, GroupWrite};
pub use crate::store::held::{Deposits, HoldChanges};
pub use crate::store::model::*;
pub use crate::store::omemo::{Learned, OmemoCtx, Outbox, OwnOmemo};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PROFILE: TableDefinition<u64, &[u8]> = TableDefinition::new("profile");
const CONTACTS: TableDefinition<u64, &[u8]> = TableDefinition::new("contacts");
const PEERS: TableDefinition<u64, &[u8]> = TableDefinition::new("peers");
const MESSAGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("messages");
const OUTBOX: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("outbox");
const INVITES: TableDefinition<u64, &[u8]> = TableDefinition::new("invites");
/// Row of the profile table holding the bridge's archive cursor.
const BRIDGE_CURSOR_ROW: u64 = 1;

/// The store file's name inside a profile directory.
pub const STORE_FILE: &str = "profile.redb";
const FORMAT: &[u8] = b"coterie-store-v1";

/// Why a profile could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    /// No profile at that path.
    #[error("no profile at {0} (create one with `coterie init`)")]
    NoProfile(PathBuf),
    /// A profile already exists there.
    #[error("a profile already exists at {0} (use another --profile, or `coterie wipe` it first)")]
    AlreadyExists(PathBuf),
    /// Another process (a running node) has the store open.
    #[error("the profile at {0} is in use by another process (is `coterie run` running?)")]
    InUse(PathBuf),
    /// The passphrase is wrong.
    #[error("wrong passphrase for the profile at {0}")]
    WrongPassphrase(PathBuf),
    /// The file is not a Coterie store or is damaged.
    #[error("the profile at {path} is damaged or not a Coterie profile: {detail}")]
    Corrupt {
        /// Where.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The file system refused.
    #[error("cannot access the profile at {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[error("store: {what} failed: {detail}")]
pub struct StoreError {
    what: &'static str,
    detail: String,
}

impl StoreError {
    /// A background task running a store operation failed.
    pub fn task(detail: String) -> Self {
        StoreError {
            what: "background store task",
            detail,
        }
    }

    fn new(what: &'static str, e: impl std::fmt::Display) -> Self {
        StoreError {
            what,
            detail: e.to_string(),
        }
    }
}

trait Ctx<T> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError>;
}
impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::new(what, e))
    }
}

/// Why an invite could not be redeemed on the inviter's side.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedeemError {
    /// No such invite (never issued here, or forged).
    #[error("unknown invite")]
    Unknown,
    /// Already used once.
    #[error("invite already used")]
    Used,
    /// Past its expiry.
    #[error("invite expired")]
    Expired,
    /// The proof of the secret did not verify.
    #[error("invite proof invalid")]
    BadProof,
    /// The redeeming key is already a contact.
    #[error("already a contact")]
    AlreadyContact,
}

/// The most memory the database's page cache may take. redb's default is
/// 1 GiB: a profile that grew (a long history, an outbox of thousands for a
/// contact who is away) would let the node's memory grow with it.
pub const DB_CACHE_BYTES: usize = 32 * 1024 * 1024;

fn db_builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(DB_CACHE_BYTES);
    b
}

/// An open, unlocked profile store.
pub struct Store {
    db: Database,
    key: DataKey,
    dir: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(..)")
    }
}

fn map_db_open(path: &Path, e: redb::DatabaseError) -> OpenStoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => OpenStoreError::InUse(path.to_path_buf()),
        redb::DatabaseError::Storage(redb::StorageError::Io(source)) => OpenStoreError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => OpenStoreError::Corrupt {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> OpenStoreError {
    OpenStoreError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn k64(k: u64) -> [u8; 8] {
    k.to_be_bytes()
}
fn k128(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    out
}

/// Creates the profile directory with owner-only permissions.
pub fn create_profile_dir(dir: &Path) -> Result<(), OpenStoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |source| OpenStoreError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    Ok(())
}

impl Store {
    /// Whether a profile exists in `dir`.
    pub fn exists(dir: &Path) -> bool {
        dir.join(STORE_FILE).exists()
    }

    /// Creates a new profile in `dir`.
    pub fn create(
        dir: &Path,
        passphrase: &str,
        profile: &Profile,
        kdf: KdfParams,
    ) -> Result<Store, OpenStoreError> {
        let path = dir.join(STORE_FILE);
        if path.exists() {
            return Err(OpenStoreError::AlreadyExists(dir.to_path_buf()));
        }
        create_profile_dir(dir)?;
        let kek = derive_kek_or(dir, passphrase, &kdf)?;
        let (key, raw) = DataKey::generate();
        let wrapped = DataKey::wrap(&kek, &raw);
        let db = db_builder()
            .create(&path)
            .map_err(|e| map_db_open(dir, e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        let store = Store {
            db,
            key,
            dir: dir.to_path_buf(),
        };
        let params = serde_json::to_vec(&kdf).map_err(|e| corrupt(dir, e))?;
        let tx = store.db.begin_write().map_err(|e| corrupt(dir, e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| corrupt(dir, e))?;
            meta.insert("format", FORMAT).map_err(|e| corrupt(dir, e))?;
            meta.insert("kdf", params.as_slice())
                .map_err(|e| corrupt(dir, e))?;
            meta.insert("wrapped_key", wrapped.as_slice())
                .map_err(|e| corrupt(dir, e))?;
            let mut t = tx.open_table(PROFILE).map_err(|e| corrupt(dir, e))?;
            let v = store
                .seal_json("profile", &k64(0), profile)
                .map_err(|e| corrupt(dir, e))?;
            t.insert(0, v.as_slice()).map_err(|e| corrupt(dir, e))?;
            for def in [CONTACTS, PEERS, INVITES] {
                tx.open_table(def).map_err(|e| corrupt(dir, e))?;
            }
            tx.open_table(MESSAGES).map_err(|e| corrupt(dir, e))?;
            tx.open_table(OUTBOX).map_err(|e| corrupt(dir, e))?;
        }
        tx.commit().map_err(|e| corrupt(dir, e))?;
        Ok(store)
    }

    /// Gives back the space that deleted messages left in the database
    /// file (redb's compaction: it moves pages down and truncates, each
    /// step in a committed transaction, so a crash in the middle leaves a
    /// profile that opens with everything in it). Returns the file's size
    /// before and after, in bytes.
    pub fn compact(&mut self) -> Result<(u64, u64), StoreError> {
        let path = self.dir.join(STORE_FILE);
        let size = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .ctx("reading the file size")
        };
        let before = size(&path)?;
        self.db.compact().ctx("compaction")?;
        Ok((before, size(&path)?))
    }

    /// Opens and unlocks the profile in `dir`.
    pub fn open(dir: &Path, passphrase: &str) -> Result<Store, OpenStoreError> {
        Self::open_timed(dir, passphrase).map(|(s, _)| s)
    }

    /// Like [`Store::open`], also reporting how long the database and the
    /// key derivation took.
    pub fn open_timed(
        dir: &Path,
        passphrase: &str,
    ) -> Result<(Store, OpenTimings), OpenStoreError> {
        let t0 = std::time::Instant::now();
        let path = dir.join(STORE_FILE);
        if !path.exists() {
            return Err(OpenStoreError::NoProfile(dir.to_path_buf()));
        }
        let db = db_builder().open(&path).map_err(|e| map_db_open(dir, e))?;
        let (kdf, wrapped) = {
            let rx = db.begin_read().map_err(|e| corrupt(dir, e))?;
            let meta = rx.open_table(META).map_err(|e| corrupt(dir, e))?;
            let get = |k: &str| -> Result<Vec<u8>, OpenStoreError> {
                Ok(meta
                    .get(k)
                    .map_err(|e| corrupt(dir, e))?
                    .ok_or_else(|| corrupt(dir, format!("missing {k}")))?
                    .value()
                    .to_vec())
            };
            if get("format")? != FORMAT {
                return Err(corrupt(dir, "unknown store format"));
            }
            let kdf: KdfParams =
                serde_json::from_slice(&get("kdf")?).map_err(|e| corrupt(dir, e))?;
            (kdf, get("wrapped_key")?)
        };
        let db_time = t0.elapsed();
        let t1 = std::time::Instant::now();
        let kek = derive_kek_or(dir, passphrase, &kdf)?;
        let kdf_time = t1.elapsed();
        let key = DataKey::unwrap_with(&kek, &wrapped).map_err(|e| match e {
            KeyError::WrongPassphrase => OpenStoreError::WrongPassphrase(dir.to_path_buf()),
            KeyError::BadParams => corrupt(dir, e),
        })?;
        let store = Store {
            db,
            key,
            dir: dir.to_path_buf(),
        };
        Ok((
            store,
            OpenTimings {
                db: db_time,
                kdf: kdf_time,
            },
        ))
    }

    /// The profile directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn seal_json<T: Serialize>(
        &self,
        table: &str,
        key: &[u8],
        v: &T,
    ) -> Result<Vec<u8>, StoreError> {
        let plain = Zeroizing::new(serde_json::to_vec(v).ctx("encoding a record")?);
        Ok(self.key.seal(table, key, &plain))
    }

    fn open_json<T: DeserializeOwned>(
        &self,
        table: &str,
        key: &[u8],
        v: &[u8],
    ) -> Result<T, StoreError> {
        let plain = self.key.open(table, key, v).ctx("decrypting a record")?;
        serde_json::from_slice(&plain).ctx("decoding a record")
    }

    // ---- profile ----

    /// The profile record.
    pub fn profile(&self) -> Result<Profile, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = rx.open_table(PROFILE).ctx("open profile")?;
        let v = t
            .get(0)
            .ctx("read profile")?
            .ok_or_else(|| StoreError::new("read profile", "missing"))?;
        self.open_json("profile", &k64(0), v.value())
    }

    /// Replaces the profile record.
    pub fn set_profile(&self, p: &Profile) -> Result<(), StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        {
            let mut t = tx.open_table(PROFILE).ctx("open profile")?;
            let v = self.seal_json("profile", &k64(0), p)?;
            t.insert(0, v.as_slice()).ctx("write profile")?;
        }
        tx.commit().ctx("commit")
    }

    /// Where the bridge account `jid` stopped reading its server's archive
    /// (the archive id of the last message handled), if it has.
    pub fn bridge_cursor(&self, jid: &str) -> Result<Option<String>, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = rx.open_table(PROFILE).ctx("open profile")?;
        let Some(v) = t.get(BRIDGE_CURSOR_ROW).ctx("read cursor")? else {
            return Ok(None);
        };
        let (j, id): (String, String) =
            self.open_json("profile", &k64(BRIDGE_CURSOR_ROW), v.value())?;
        Ok((j == jid).then_some(id))
    }

    /// Moves the bridge account's archive cursor (for an archived message
    /// that stores nothing).
    pub fn set_bridge_cursor(&self, jid: &str, id: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        self.put_cursor(&tx, jid, id)?;
        tx.commit().ctx("commit")
    }

    fn put_cursor(
        &self,
        tx: &redb::WriteTransaction,
        jid: &str,
        id: &str,
    ) -> Result<(), StoreError> {
        let mut t = tx.open_table(PROFILE).ctx("open profile")?;
        let v = self.seal_json(
            "profile",
            &k64(BRIDGE_CURSOR_ROW),
            &(jid.to_owned(), id.to_owned()),
        )?;
        t.insert(BRIDGE_CURSOR_ROW, v.as_slice())
            .ctx("write cursor")?;
        Ok(())
    }

    /// [`Store::ack_and_receive`] for a message the bridge got, with its
    /// archive id: the message and the cursor past it are stored in one
    /// transaction, so a crash never stores one without the other (the
    /// archive is read again from the cursor: exactly once).
    pub fn receive_bridged(
        &self,
        contact: u64,
        items: &[Incoming],
        now_ms: u64,
        ctx: &OmemoCtx,
        cursor: Option<(&str, &str)>,
    ) -> Result<Received, StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let res = self.receive_in(&tx, contact, items, now_ms, Some(ctx))?;
        if let Some((jid, id)) = cursor {
            self.put_cursor(&tx, jid, id)?;
        }
        tx.commit().ctx("commit")?;
        Ok(res)
    }

    // ---- contacts ----

    /// All contacts, by id.
    pub fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = rx.open_table(CONTACTS).ctx("open contacts")?;
        self.contacts_of(&t)
    }

    /// Every contact in `t` (a read or a write transaction's table).
    fn contacts_of(
        &self,
        t: &impl ReadableTable<u64, &'static [u8]>,
    ) -> Result<Vec<Contact>, StoreError> {
        let mut out = Vec::new();
        for row in t.iter().ctx("list contacts")? {
            let (k, v) = row.ctx("list contacts")?;
            out.push(self.open_json("contacts", &k64(k.value()), v.value())?);
        }
        Ok(out)
    }

    /// One contact.
    pub fn contact(&self, id: u64) -> Result<Option<Contact>, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = rx.open_table(CONTACTS).ctx("open contacts")?;
        match t.get(id).ctx("read contact")? {
            Some(v) => Ok(Some(self.open_json("contacts", &k64(id), v.value())?)),
            None => Ok(None),
        }
    }

    fn put_contact(&self, t: &mut redb::Table<u64, &[u8]>, c: &Contact) -> Result<(), StoreError> {
        let v = self.seal_json("contacts", &k64(c.id), c)?;
        t.insert(c.id, v.as_slice()).ctx("write contact")?;
        Ok(())
    }

    fn next_contact_id(t: &redb::Table<u64, &[u8]>) -> Result<u64, StoreError> {
        Ok(t.last()
            .ctx("read contacts")?
            .map(|(k, _)| k.value() + 1)
            .unwrap_or(1))
    }

    /// Adds a contact; `id` in `c` is ignored and the new id returned. The
    /// key is checked in the same transaction: one key, one contact.
    pub fn add_contact(&self, mut c: Contact) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let id;
        {
            let mut t = tx.open_table(CONTACTS).ctx("open contacts")?;
            for row in t.iter().ctx("list contacts")? {
                let (k, v) = row.ctx("list contacts")?;
                let existing: Contact = self.open_json("contacts", &k64(k.value()), v.value())?;
                if existing.peer == c.peer {
                    return Err(StoreError::new(
                        "add contact",
                        "this key is already a contact",
                    ));
                }
            }
            id = Self::next_contact_id(&t)?;
            c.id = id;
            self.put_contact(&mut t, &c)?;
        }
        tx.commit().ctx("commit")?;
        Ok(id)
    }

    /// Rewrites a contact record.
    pub fn update_contact(&self, c: &Contact) -> Result<(), StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        {
            let mut t = tx.open_table(CONTACTS).ctx("open contacts")?;
            self.put_contact(&mut t, c)?;
        }
        tx.commit().ctx("commit")
    }

    /// Removes a contact and everything kept for it: messages, queued
    /// stanzas, stream state, OMEMO devices, sessions and bundles. One
    /// transaction: a crash leaves the contact whole or gone.
    pub fn remove_contact(&self, id: u64) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let existed;
        {
            let mut t = tx.open_table(CONTACTS).ctx("open contacts")?;
            existed = t.remove(id).ctx("remove contact")?.is_some();
            let mut p = tx.open_table(PEERS).ctx("open peers")?;
            p.remove(id).ctx("remove peer state")?;
            self.take_held_in(&tx, id)?;
            for table in [MESSAGES, OUTBOX] {
                let mut m = tx.open_table(table).ctx("open messages")?;
                m.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
                    .ctx("remove messages")?;
            }
            let mut seen = tx.open_table(held::SEEN).ctx("open seen")?;
            seen.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
                .ctx("remove seen ids")?;
            omemo::forget_contact(&tx, id)?;
        }
        tx.commit().ctx("commit")?;
        Ok(existed)
    }

    // ---- invites ----

    /// Records an invite we issued.
    pub fn add_invite(&self, inv: &IssuedInvite) -> Result<(), StoreError> {
        let row = self.key.index_of("invite", &inv.invite_id);
        let tx = self.db.begin_write().ctx("write")?;
        {
            let mut t = tx.open_table(INVITES).ctx("open invites")?;
            let v = self.seal_json("invites", &k64(row), inv)?;
            t.insert(row, v.as_slice()).ctx("write invite")?;
        }
        tx.commit().ctx("commit")
    }

    /// The secrets of the invites still redeemable at `now`.
    pub fn open_invite_secrets(
        &self,
        now: u64,
    ) -> Result<Vec<zeroize::Zeroizing<[u8; 32]>>, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = rx.open_table(INVITES).ctx("open invites")?;
        let mut out = Vec::new();
        for row in t.iter().ctx("list invites")? {
            let (k, v) = row.ctx("list invites")?;
            let inv: IssuedInvite = self.open_json("invites", &k64(k.value()), v.value())?;
            if !inv.used && inv.expires > now {
                out.push(zeroize::Zeroizing::new(inv.secret));
            }
        }
        Ok(out)
    }

    /// The group (hex id) an issued invite adds its redeemers to, if any.
    pub fn invite_group(&self, invite_id: &[u8; 16]) -> Result<Option<String>, StoreError> {
        let row = self.key.index_of("invite", invite_id);
        let rx = self.db.begin_read().ctx("read")?;
        let t = rx.open_table(INVITES).ctx("open invites")?;
        let inv: Option<IssuedInvite> = match t.get(row).ctx("read invite")? {
            Some(v) => Some(self.open_json("invites", &k64(row), v.value())?),
            None => None,
        };
        Ok(inv
            .filter(|i| &i.invite_id == invite_id)
            .and_then(|i| i.group))
    }

    /// Redeems an invite: checks it, marks it used and adds the new contact,
    /// in one transaction. `verify` gets the secret and checks the proof.
    pub fn redeem_invite(
        &self,
        invite_id: &[u8; 16],
        now: u64,
        verify: impl FnOnce(&[u8; 32]) -> bool,
        mut contact: Contact,
    ) -> Result<Result<Contact, RedeemError>, StoreError> {
        let row = self.key.index_of("invite", invite_id);
        let tx = self.db.begin_write().ctx("write")?;
        let result = {
            let mut inv_t = tx.open_table(INVITES).ctx("open invites")?;
            let inv: Option<IssuedInvite> = match inv_t.get(row).ctx("read invite")? {
                Some(v) => Some(self.open_json("invites", &k64(row), v.value())?),
                None => None,
            };
            let mut ct = tx.open_table(CONTACTS).ctx("open contacts")?;
            let mut existing: Option<Contact> = None;
            for r in ct.iter().ctx("list contacts")? {
                let (k, v) = r.ctx("list contacts")?;
                let c: Contact = self.open_json("contacts", &k64(k.value()), v.value())?;
                if c.peer == contact.peer {
                    existing = Some(c);
                }
            }
            match inv {
                None => Err(RedeemError::Unknown),
                Some(inv) if &inv.invite_id != invite_id => Err(RedeemError::Unknown),
                Some(inv) if !verify(&inv.secret) => Err(RedeemError::BadProof),
                // The same invitee again (it crashed before recording our answer): idempotent.
                Some(inv)
                    if existing.is_some()
                        && (inv.redeemed_by == Some(contact.peer)
                            || inv.redeemers.contains(&contact.peer)) =>
                {
                    existing.ok_or(RedeemError::Unknown)
                }
                Some(inv) if inv.used => Err(RedeemError::Used),
                Some(inv) if inv.expires <= now => Err(RedeemError::Expired),
                Some(_) if existing.is_some() => Err(RedeemError::AlreadyContact),
                Some(mut inv) => {
                    match inv.uses_left {
                        Some(n) => {
                            let left = n.saturating_sub(1);
                            inv.uses_left = Some(left);
                            inv.used = left == 0;
                            inv.redeemers.push(contact.peer);
                        }
                        None => inv.used = true,
                    }
                    inv.redeemed_by = Some(contact.peer);
                    let v = self.seal_json("invites", &k64(row), &inv)?;
                    inv_t.insert(row, v.as_slice()).ctx("write invite")?;
                    contact.id = Self::next_contact_id(&ct)?;
                    self.put_contact(&mut ct, &contact)?;
                    Ok(contact)
                }
            }
        };
        if result.is_ok() {
            tx.commit().ctx("commit")?;
        } else {
            tx.abort().ctx("abort")?;
        }
        Ok(result)
    }

    // ---- peer state and messages ----

    fn peer_state_in(
        &self,
        t: &impl ReadableTable<u64, &'static [u8]>,
        contact: u64,
    ) -> Result<PeerState, StoreError> {
        match t.get(contact).ctx("read peer state")? {
            Some(v) => self.open_json("peers", &k64(contact), v.value()),
            None => Ok(PeerState {
                next_seq: 1,
                ..Default::default()
            }),
        }
    }

    fn put_peer_state(
        &self,
        t: &mut redb::Table<u64, &[u8]>,
        contact: u64,
        s: &PeerState,
    ) -> Result<(), StoreError> {
        let v = self.seal_json("peers", &k64(contact), s)?;
        t.insert(contact, v.as_slice()).ctx("write peer state")?;
        Ok(())
    }

    /// Stream-management counters for a contact.
    pub fn peer_state(&self, contact: u64) -> Result<PeerState, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = rx.open_table(PEERS).ctx("open peers")?;
        self.peer_state_in(&t, contact)
    }

    fn put_message(
        &self,
        t: &mut redb::Table<(u64, u64), &[u8]>,
        contact: u64,
        m: &Message,
    ) -> Result<(), StoreError> {
        let v = self.seal_json("messages", &k128(contact, m.seq), m)?;
        t.insert((contact, m.seq), v.as_slice())
            .ctx("write message")?;
        Ok(())
    }

    fn put_out(
        &self,
        t: &mut redb::Table<(u64, u64), &[u8]>,
        contact: u64,
        n: u64,
        s: &OutStanza,
    ) -> Result<(), StoreError> {
        let v = self.seal_json("outbox", &k128(contact, n), s)?;
        t.insert((contact, n), v.as_slice()).ctx("write outbox")?;
        Ok(())
    }

    /// Queues a stanza after the contact's last: numbers it, names it
    /// `<prefix><n>.<nonce>` and writes it.
    fn queue_out(
        &self,
        ot: &mut redb::Table<(u64, u64), &[u8]>,
        contact: u64,
        st: &mut PeerState,
        prefix: char,
        make: impl FnOnce(String) -> OutStanza,
    ) -> Result<(), StoreError> {
        st.out_last += 1;
        let nonce: u32 = rand::random();
        let s = make(format!("{prefix}{}.{nonce:08x}", st.out_last));
        self.put_out(ot, contact, st.out_last, &s)
    }

    /// Stores an outgoing message and queues its stanza, durably, in one
    /// transaction. Returns the message.
    pub fn queue_outgoing(
        &self,
        contact: u64,
        body: &str,
        now_ms: u64,
    ) -> Result<Message, StoreError> {
        let mut v = self.queue_outgoing_many(contact, &[body], now_ms)?;
        v.pop()
            .ok_or_else(|| StoreError::new("queue message", "nothing queued"))
    }

    /// Stores several outgoing messages and queues their stanzas in one
    /// transaction (one disk sync), in order.
    pub fn queue_outgoing_many(
        &self,
        contact: u64,
        bodies: &[&str],
        now_ms: u64,
    ) -> Result<Vec<Message>, StoreError> {
        self.queue_in(contact, bodies, now_ms, None)
    }

    /// Like [`Store::queue_outgoing`], and encrypts the stanza in the same
    /// transaction when a trusted device of the contact is known (else it
    /// is encrypted when it is first sent).
    pub fn queue_outgoing_encrypted(
        &self,
        contact: u64,
        body: &str,
        now_ms: u64,
        ctx: &OmemoCtx,
    ) -> Result<Message, StoreError> {
        let mut v = self.queue_in(contact, &[body], now_ms, Some(ctx))?;
        v.pop()
            .ok_or_else(|| StoreError::new("queue message", "nothing queued"))
    }

    fn queue_in(
        &self,
        contact: u64,
        bodies: &[&str],
        now_ms: u64,
        ctx: Option<&OmemoCtx>,
    ) -> Result<Vec<Message>, StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let mut out = Vec::with_capacity(bodies.len());
        {
            let mut peers = tx.open_table(PEERS).ctx("open peers")?;
            let mut st = self.peer_state_in(&peers, contact)?;
            let mut mt = tx.open_table(MESSAGES).ctx("open messages")?;
            let mut ot = tx.open_table(OUTBOX).ctx("open outbox")?;
            let mut enc = match ctx {
                Some(ctx) => Some(omemo::Encryptor::open(self, &tx, contact, ctx)?),
                None => None,
            };
            for body in bodies {
                let seq = st.next_seq.max(1);
                st.next_seq = seq + 1;
                st.out_last += 1;
                let nonce: u32 = rand::random();
                let msg = Message {
                    seq,
                    dir: Direction::Out,
                    body: (*body).to_string(),
                    ts: now_ms,
                    state: Delivery::Queued,
                    stanza_id: format!("m{seq}.{nonce:08x}"),
                    unverified: false,
                    undecryptable: None,
                };
                self.put_message(&mut mt, contact, &msg)?;
                let stanza = OutStanza::Chat {
                    id: msg.stanza_id.clone(),
                    body: msg.body.clone(),
                    seq,
                    omemo: enc.as_mut().and_then(|e| e.encrypt(body)),
                };
                self.put_out(&mut ot, contact, st.out_last, &stanza)?;
                out.push(msg);
            }
            if let Some(e) = enc {
                e.save(self, &tx, contact)?;
            }
            self.put_peer_state(&mut peers, contact, &st)?;
        }
        tx.commit().ctx("commit")?;
        Ok(out)
    }

    /// Our queued stanzas for `contact` numbered above `after`, in order, at most `limit`.
    pub fn outbox_after(
        &self,
        contact: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutStanza)>, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = rx.open_table(OUTBOX).ctx("open outbox")?;
        let mut out = Vec::new();
        for row in t
            .range((contact, after.saturating_add(1))..=(contact, u64::MAX))
            .ctx("read outbox")?
            .take(limit)
        {
            let (k, v) = row.ctx("read outbox")?;
            let (c, n) = k.value();
            out.push((n, self.open_json("outbox", &k128(c, n), v.value())?));
        }
        Ok(out)
    }

    /// The peer acknowledged our stanzas up to `h`: drop them from the
    /// outbox and mark their messages sent. Returns the seqs newly sent.
    pub fn ack_outgoing(&self, contact: u64, h: u64) -> Result<Vec<u64>, StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let sent = self.ack_in(&tx, contact, h)?;
        tx.commit().ctx("commit")?;
        Ok(sent)
    }

    /// An ack and the stanzas that came with it, in one transaction (one
    /// disk sync instead of two). Returns the seqs newly sent and what the
    /// stanzas changed.
    pub fn ack_and_receive(
        &self,
        contact: u64,
        ack: Option<u64>,
        items: &[Incoming],
        now_ms: u64,
        ctx: Option<&OmemoCtx>,
    ) -> Result<(Vec<u64>, Received), StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let sent = match ack {
            Some(h) => self.ack_in(&tx, contact, h)?,
            None => Vec::new(),
        };
        let res = self.receive_in(&tx, contact, items, now_ms, ctx)?;
        tx.commit().ctx("commit")?;
        Ok((sent, res))
    }

    fn ack_in(
        &self,
        tx: &redb::WriteTransaction,
        contact: u64,
        h: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let mut sent = Vec::new();
        {
            let mut peers = tx.open_table(PEERS).ctx("open peers")?;
            let mut st = self.peer_state_in(&peers, contact)?;
            if h <= st.out_acked {
                return Ok(sent);
            }
            let h = h.min(st.out_last);
            let mut ot = tx.open_table(OUTBOX).ctx("open outbox")?;
            let mut mt = tx.open_table(MESSAGES).ctx("open messages")?;
            let acked: Vec<(u64, OutStanza)> = {
                let mut v = Vec::new();
                for row in ot
                    .range((contact, st.out_acked + 1)..=(contact, h))
                    .ctx("read outbox")?
                {
                    let (k, val) = row.ctx("read outbox")?;
                    let (c, n) = k.value();
                    v.push((n, self.open_json("outbox", &k128(c, n), val.value())?));
                }
                v
            };
            for (n, s) in acked {
                ot.remove((contact, n)).ctx("trim outbox")?;
                if let OutStanza::Chat { seq, .. } = s {
                    let m: Option<Message> = match mt.get((contact, seq)).ctx("read message")? {
                        Some(v) => {
                            Some(self.open_json("messages", &k128(contact, seq), v.value())?)
                        }
                        None => None,
                    };
                    if let Some(mut m) = m.filter(|m| m.state == Delivery::Queued) {
                        m.state = Delivery::Sent;
                        self.put_message(&mut mt, contact, &m)?;
                        sent.push(seq);
                    }
                }
            }
            st.out_acked = h;
            self.put_peer_state(&mut peers, contact, &st)?;
        }
        Ok(sent)
    }

    /// Handles stanzas that arrived from `contact`, in order, in one
    /// transaction: stores messages, queues receipts, applies receipts, and
    /// advances the inbound counter. Returns the new `h` (to ack only after
    /// this returned) and what changed.
    pub fn receive(
        &self,
        contact: u64,
        items: &[Incoming],
        now_ms: u64,
    ) -> Result<Received, StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let res = self.receive_in(&tx, contact, items, now_ms, None)?;
        tx.commit().ctx("commit")?;
        Ok(res)
    }

    fn receive_in(
        &self,
        tx: &redb::WriteTransaction,
        contact: u64,
        items: &[Incoming],
        now_ms: u64,
        ctx: Option<&OmemoCtx>,
    ) -> Result<Received, StoreError> {
        let mut res = Received::default();
        // A message already received (through a holder, §7.5) is counted
        // and not decrypted again: shown once whichever way it came.
        let seen = self.seen_in(tx, contact, items)?;
        let unseen: Vec<Incoming>;
        let items = if seen.contains(&true) {
            unseen = items
                .iter()
                .zip(&seen)
                .map(|(i, s)| if *s { Incoming::Other } else { i.clone() })
                .collect();
            &unseen[..]
        } else {
            items
        };
        let mut holds = Vec::new();
        let decrypted = match ctx {
            Some(ctx) => self.decrypt_batch(tx, contact, ctx, items, now_ms, &mut res)?,
            None => items.iter().map(|_| None).collect(),
        };
        let mut decrypted = decrypted.into_iter();
        {
            let mut peers = tx.open_table(PEERS).ctx("open peers")?;
            let mut st = self.peer_state_in(&peers, contact)?;
            let mut mt = tx.open_table(MESSAGES).ctx("open messages")?;
            let mut ot = tx.open_table(OUTBOX).ctx("open outbox")?;
            let mut seen_t = tx.open_table(held::SEEN).ctx("open seen")?;
            for item in items {
                st.in_h += 1;
                let dec = decrypted.next().flatten();
                // Group traffic is the group layer's to handle (after this
                // transaction); it is not a message and gets no receipt.
                // Hold frames are handled below, in this transaction.
                let dec = match dec {
                    Some(omemo::Decrypted::Group(frame)) => {
                        res.group_frames.push(frame);
                        continue;
                    }
                    Some(omemo::Decrypted::Hold(frame)) => {
                        holds.push(frame);
                        continue;
                    }
                    other => other,
                };
                let message = match item {
                    Incoming::Encrypted {
                        id, wants_receipt, ..
                    } => dec.map(|d| (d, id, *wants_receipt)),
                    Incoming::Plain { id } => {
                        tracing::warn!("a contact sent a message without OMEMO; not shown");
                        let e =
                            crate::omemo::OmemoError::Malformed("message sent without encryption");
                        Some((omemo::Decrypted::Failed(e), id, false))
                    }
                    Incoming::Chat {
                        id,
                        body,
                        wants_receipt,
                    } => Some((
                        omemo::Decrypted::Body {
                            body: body.clone(),
                            unverified: false,
                        },
                        id,
                        *wants_receipt,
                    )),
                    Incoming::Receipt { of } => {
                        self.apply_receipt(&mut mt, contact, of, &mut res)?;
                        None
                    }
                    Incoming::Other => None,
                };
                if let Some((d, id, wants_receipt)) = message {
                    let seq = st.next_seq.max(1);
                    st.next_seq = seq + 1;
                    let m = omemo::message_of(d, seq, id, now_ms);
                    self.put_message(&mut mt, contact, &m)?;
                    if m.undecryptable.is_none() {
                        self.mark_seen(&mut seen_t, contact, id, now_ms)?;
                    }
                    res.new_messages.push(seq);
                    // No receipt for what the user cannot read.
                    if wants_receipt && m.undecryptable.is_none() {
                        self.queue_out(&mut ot, contact, &mut st, 'r', |rid| OutStanza::Receipt {
                            id: rid,
                            of: id.clone(),
                        })?;
                        res.queued_stanzas = true;
                    }
                }
            }
            for el in std::mem::take(&mut res.repairs) {
                self.queue_out(&mut ot, contact, &mut st, 'k', |id| {
                    OutStanza::KeyTransport { id, omemo: el }
                })?;
                res.queued_stanzas = true;
            }
            self.put_peer_state(&mut peers, contact, &st)?;
            res.h = st.in_h;
        }
        if !holds.is_empty() {
            self.hold_frames_in(tx, contact, holds, now_ms, ctx, &mut res)?;
        }
        Ok(res)
    }

    /// A receipt for one of our messages: marks it delivered if the id
    /// names one of ours ("m<seq>.<nonce>", checked in full).
    fn apply_receipt(
        &self,
        mt: &mut redb::Table<(u64, u64), &[u8]>,
        contact: u64,
        of: &str,
        res: &mut Received,
    ) -> Result<(), StoreError> {
        let seq = of
            .strip_prefix('m')
            .and_then(|s| s.split('.').next())
            .and_then(|s| s.parse::<u64>().ok());
        let Some(seq) = seq else { return Ok(()) };
        let m: Option<Message> = match mt.get((contact, seq)).ctx("read message")? {
            Some(v) => Some(self.open_json("messages", &k128(contact, seq), v.value())?),
            None => None,
        };
        if let Some(mut m) = m.filter(|m| {
            m.dir == Direction::Out && m.stanza_id == of && m.state != Delivery::Delivered
        }) {
            m.state = Delivery::Delivered;
            self.put_message(mt, contact, &m)?;
            res.delivered.push(seq);
        }
        Ok(())
    }

    /// The latest `limit` messages with `contact`, oldest first.
    pub fn history(&self, contact: u64, limit: usize) -> Result<Vec<Message>, StoreError> {
        self.history_before(contact, u64::MAX, limit)
    }

    /// The latest `limit` messages with `contact` whose seq is below
    /// `before`, oldest first: one page of a long chat.
    pub fn history_before(
        &self,
        contact: u64,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = rx.open_table(MESSAGES).ctx("open messages")?;
        let mut out = Vec::with_capacity(limit.min(1024));
        for row in t
            .range((contact, 0)..(contact, before))
            .ctx("read messages")?
            .rev()
            .take(limit)
        {
            let (k, v) = row.ctx("read messages")?;
            let (c, s) = k.value();
            out.push(self.open_json("messages", &k128(c, s), v.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// Number of stanzas waiting for `contact`'s ack.
    pub fn outbox_len(&self, contact: u64) -> Result<u64, StoreError> {
        let st = self.peer_state(contact)?;
        Ok(st.out_last - st.out_acked)
    }

    /// Deletes messages older than the retention period (never queued ones).
    /// Returns how many were deleted.
    pub fn apply_retention(&self, now_ms: u64) -> Result<u64, StoreError> {
        let days = self.profile()?.retention_days;
        if days == 0 {
            return Ok(0);
        }
        let cutoff = now_ms.saturating_sub(u64::from(days) * 86_400_000);
        let contacts: Vec<u64> = self.contacts()?.iter().map(|c| c.id).collect();
        let tx = self.db.begin_write().ctx("write")?;
        let mut n = 0;
        {
            let mut mt = tx.open_table(MESSAGES).ctx("open messages")?;
            for c in contacts {
                // Sequence numbers grow with time: walk from the oldest and stop at the first young one.
                let mut doomed = Vec::new();
                for row in mt.range((c, 0)..=(c, u64::MAX)).ctx("read messages")? {
                    let (k, v) = row.ctx("read messages")?;
                    let (_, s) = k.value();
                    let m: Message = self.open_json("messages", &k128(c, s), v.value())?;
                    if m.ts >= cutoff {
                        break;
                    }
                    if m.state != Delivery::Queued {
                        doomed.push(s);
                    }
                }
                for s in doomed {
                    mt.remove((c, s)).ctx("delete message")?;
                    n += 1;
                }
            }
            let mut seen = tx.open_table(held::SEEN).ctx("open seen")?;
            seen.retain(|_, at| at >= cutoff).ctx("prune seen ids")?;
        }
        tx.commit().ctx("commit")?;
        Ok(n)
    }

    /// Inserts many messages at once (benchmarks and imports): one transaction.
    pub fn bulk_insert_messages(&self, contact: u64, msgs: &[Message]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        {
            let mut mt = tx.open_table(MESSAGES).ctx("open messages")?;
            let mut peers = tx.open_table(PEERS).ctx("open peers")?;
            let mut st = self.peer_state_in(&peers, contact)?;
            for m in msgs {
                self.put_message(&mut mt, contact, m)?;
                st.next_seq = st.next_seq.max(m.seq + 1);
            }
            self.put_peer_state(&mut peers, contact, &st)?;
        }
        tx.commit().ctx("commit")
    }
}

fn derive_kek_or(
    dir: &Path,
    passphrase: &str,
    kdf: &KdfParams,
) -> Result<Zeroizing<[u8; 32]>, OpenStoreError> {
    crypto::derive_kek(passphrase, kdf).map_err(|e| corrupt(dir, e))
}

/// Where the time of [`Store::open_timed`] went.
#[derive(Debug, Clone, Copy)]
pub struct OpenTimings {
    /// Opening the database file and reading the header.
    pub db: std::time::Duration,
    /// Argon2id key derivation (deliberately slow).
    pub kdf: std::time::Duration,
}

/// What [`Store::receive`] changed.
#[derive(Debug, Default)]
pub struct Received {
    /// The inbound counter after this batch.
    pub h: u64,
    /// Seqs of new incoming messages.
    pub new_messages: Vec<u64>,
    /// Seqs of our messages now delivered.
    pub delivered: Vec<u64>,
    /// Whether receipts were queued (the outbox grew).
    pub queued_stanzas: bool,
    /// Key-transport messages to queue (session repairs), filled while
    /// decrypting.
    pub repairs: Vec<String>,
    /// A one-time prekey was used: our bundle changed and should be
    /// announced again.
    pub bundle_changed: bool,
    /// Group frames that came in this batch, in order.
    pub group_frames: Vec<Vec<u8>>,
    /// What hold frames in this batch changed.
    pub hold: HoldChanges,
}

/// Destroys the profile in `dir`: overwrites the store file with random
/// bytes, syncs, and removes the directory. Without the wrapped data key the
/// sealed values cannot be recovered even where the file system keeps old
/// blocks (copy-on-write, SSD remapping).
pub fn wipe(dir: &Path) -> Result<(), std::io::Error> {
    use std::io::{Seek, Write};
    let path = dir.join(STORE_FILE);
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&path) {
        let len = f.metadata()?.len();
        f.seek(std::io::SeekFrom::Start(0))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut buf);
            let n = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    std::fs::remove_dir_all(dir)
}

#[cfg(test)]
mod tests;
