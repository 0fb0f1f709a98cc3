//! Groups in the store: per group one sealed row with its signed ops, and
//! its posts in the order this node showed them. A change to a group — its
//! ops, the posts it showed, the frames it sends to contacts — is one
//! transaction.

use data_encoding::{BASE64, HEXLOWER};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::omemo::Encryptor;
use super::{Ctx as _, OUTBOX, OutStanza, OwnOmemo, PEERS, Store, StoreError, k64, k128};

pub(super) const GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("groups");
pub(super) const GROUP_POSTS: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("group_posts");

/// A group as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupRow {
    /// The group id, hex.
    pub id: String,
    /// Its signed ops (protobuf `Signed`, base64).
    pub ops: Vec<String>,
    /// The next post index.
    pub next: u64,
}

/// A post as this node showed it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupPostRow {
    /// Its place in this node's history.
    pub n: u64,
    /// The author's key, hex.
    pub author: String,
    /// The author's number for it.
    pub seq: u64,
    /// The text.
    pub body: String,
    /// The author's clock.
    pub at_ms: u64,
    /// When it arrived here.
    pub received_ms: u64,
    /// The signed post (protobuf `Signed`, base64), to relay.
    pub signed: String,
    /// It no longer counts (its author had left or been removed).
    #[serde(default)]
    pub withdrawn: bool,
}

/// What to write for one change to a group.
#[derive(Debug, Default)]
pub struct GroupWrite {
    /// Every op (replaces the stored list).
    pub ops: Vec<Vec<u8>>,
    /// Posts shown now, in order (without `n`; assigned here).
    pub posts: Vec<GroupPostRow>,
    /// Posts withdrawn: (author hex, seq).
    pub withdrawn: Vec<(String, u64)>,
    /// Frames for contacts: (contact id, their key, frame bytes).
    pub frames: Vec<(u64, [u8; 32], Vec<u8>)>,
}

impl Store {
    /// Every group: (row, record).
    pub fn groups(&self) -> Result<Vec<(u64, GroupRow)>, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = match rx.open_table(GROUPS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::new("open groups", e)),
        };
        let mut out = Vec::new();
        for row in t.iter().ctx("list groups")? {
            let (k, v) = row.ctx("list groups")?;
            out.push((
                k.value(),
                self.open_json("groups", &k64(k.value()), v.value())?,
            ));
        }
        Ok(out)
    }

    /// A group's posts, oldest first; at most the last `limit`.
    pub fn group_posts(&self, row: u64, limit: usize) -> Result<Vec<GroupPostRow>, StoreError> {
        let rx = self.db.begin_read().ctx("read")?;
        let t = match rx.open_table(GROUP_POSTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::new("open group posts", e)),
        };
        let mut out = Vec::new();
        for r in t
            .range((row, 0)..=(row, u64::MAX))
            .ctx("read group posts")?
            .rev()
            .take(limit)
        {
            let (k, v) = r.ctx("read group posts")?;
            let (g, n) = k.value();
            out.push(self.open_json("group_posts", &k128(g, n), v.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// Writes one change to a group (a new group when `row` is `None`), and
    /// queues its frames in the contacts' outboxes, in one transaction;
    /// with `own`, each frame is OMEMO-encrypted there too (one disk sync
    /// for a post to every member, not one per member when it is sent).
    /// Returns the group's row.
    pub fn write_group(
        &self,
        row: Option<u64>,
        id: &[u8; 32],
        w: &GroupWrite,
        own: Option<&OwnOmemo>,
    ) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        let row = {
            let mut gt = tx.open_table(GROUPS).ctx("open groups")?;
            let (row, mut rec) = match row {
                Some(r) => {
                    let rec: GroupRow = match gt.get(r).ctx("read group")? {
                        Some(v) => self.open_json("groups", &k64(r), v.value())?,
                        None => return Err(StoreError::new("write group", "no such group")),
                    };
                    (r, rec)
                }
                None => {
                    let r = gt
                        .last()
                        .ctx("read groups")?
                        .map_or(1, |(k, _)| k.value() + 1);
                    (
                        r,
                        GroupRow {
                            id: HEXLOWER.encode(id),
                            ops: Vec::new(),
                            next: 1,
                        },
                    )
                }
            };
            if !w.ops.is_empty() {
                rec.ops = w.ops.iter().map(|o| BASE64.encode(o)).collect();
            }
            let mut pt = tx.open_table(GROUP_POSTS).ctx("open group posts")?;
            for p in &w.posts {
                let mut p = p.clone();
                p.n = rec.next;
                rec.next += 1;
                let v = self.seal_json("group_posts", &k128(row, p.n), &p)?;
                pt.insert((row, p.n), v.as_slice())
                    .ctx("write group post")?;
            }
            if !w.withdrawn.is_empty() {
                let mut hits = Vec::new();
                for r in pt
                    .range((row, 0)..=(row, u64::MAX))
                    .ctx("read group posts")?
                {
                    let (k, v) = r.ctx("read group posts")?;
                    let (g, n) = k.value();
                    let p: GroupPostRow = self.open_json("group_posts", &k128(g, n), v.value())?;
                    if w.withdrawn
                        .iter()
                        .any(|(a, s)| *a == p.author && *s == p.seq)
                    {
                        hits.push(p);
                    }
                }
                for mut p in hits {
                    p.withdrawn = true;
                    let v = self.seal_json("group_posts", &k128(row, p.n), &p)?;
                    pt.insert((row, p.n), v.as_slice())
                        .ctx("write group post")?;
                }
            }
            let v = self.seal_json("groups", &k64(row), &rec)?;
            gt.insert(row, v.as_slice()).ctx("write group")?;
            row
        };
        if !w.frames.is_empty() {
            let mut peers = tx.open_table(PEERS).ctx("open peers")?;
            let mut ot = tx.open_table(OUTBOX).ctx("open outbox")?;
            for (contact, peer, frame) in &w.frames {
                let mut st = self.peer_state_in(&peers, *contact)?;
                let omemo = match own.and_then(|o| o.ctx(*peer)) {
                    Some(ctx) => {
                        let mut enc = Encryptor::open(self, &tx, *contact, &ctx)?;
                        let el =
                            enc.encrypt_content(&crate::omemo::sce::Content::Group(frame.clone()));
                        enc.save(self, &tx, *contact)?;
                        el
                    }
                    None => None,
                };
                self.queue_out(&mut ot, *contact, &mut st, 'g', |id| OutStanza::Group {
                    id,
                    frame: BASE64.encode(frame),
                    omemo,
                })?;
                self.put_peer_state(&mut peers, *contact, &st)?;
            }
        }
        tx.commit().ctx("commit")?;
        Ok(row)
    }

    /// Forgets a group and its posts.
    pub fn delete_group(&self, row: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().ctx("write")?;
        {
            let mut gt = tx.open_table(GROUPS).ctx("open groups")?;
            gt.remove(row).ctx("delete group")?;
            let mut pt = tx.open_table(GROUP_POSTS).ctx("open group posts")?;
            pt.retain_in((row, 0)..=(row, u64::MAX), |_, _| false)
                .ctx("delete group posts")?;
        }
        tx.commit().ctx("commit")?;
        Ok(())
    }
}
