//! The node's groups: the sans-IO core (`crate::group`) kept in memory and
//! written through to the store; frames travel in the contacts' outboxes
//! (OMEMO-encrypted, acknowledged, retransmitted like messages).
//!
//! One lock serialises every change to every group, so each change and its
//! write to the store happen in the order the frames arrived.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use data_encoding::{BASE64, HEXLOWER};
use serde::{Deserialize, Serialize};
use transport::identity::PeerId;

use super::{Shared, db};
use crate::group::{ActionError, Event, Frame, Group, Hash, Signed, Step};
use crate::ops::{OpError, now_ms};
use crate::store::{GroupPostRow, GroupWrite, Store};

/// Groups whose welcome is still arriving (ops split over frames).
const MAX_PENDING_WELCOMES: usize = 8;

#[derive(Default)]
pub(crate) struct Groups {
    held: tokio::sync::Mutex<Held>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Groups")
    }
}

#[derive(Default)]
struct Held {
    loaded: bool,
    /// row → group.
    groups: BTreeMap<u64, Group>,
    /// Ops of groups we are being welcomed into.
    pending: HashMap<Hash, Vec<Signed>>,
}

/// A group, for the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// The group id (hex).
    pub id: String,
    /// Its name.
    pub name: String,
    /// How many members.
    pub members: usize,
    /// Whether the user is a member (false after leaving or removal).
    pub member: bool,
    /// Whether the user is an admin.
    pub admin: bool,
}

/// A member, for the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// The contact's name, "me", or the key's short fingerprint.
    pub name: String,
    /// Their fingerprint (hex key prefix).
    pub key: String,
    /// Whether they are the user.
    pub me: bool,
    /// Whether they are a contact (reachable directly).
    pub contact: bool,
    /// Whether they are an admin.
    pub admin: bool,
    /// Whether they are connected now.
    pub online: bool,
}

/// A post, for the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPostView {
    /// Its place in the history.
    pub n: u64,
    /// The author: a contact's name, "me", or a short fingerprint.
    pub from: String,
    /// The text ("" if withdrawn).
    pub body: String,
    /// The author's clock.
    pub at_ms: u64,
    /// It no longer counts: its author had left or been removed.
    pub withdrawn: bool,
}

fn usage(e: impl std::fmt::Display) -> OpError {
    OpError::Usage(e.to_string())
}

fn decode_signed(b64: &str) -> Option<Signed> {
    let bytes = BASE64.decode(b64.as_bytes()).ok()?;
    prost::Message::decode(bytes.as_slice()).ok()
}

fn load_all(
    store: &Store,
    key: &transport::identity::SecretKey,
) -> Result<BTreeMap<u64, Group>, OpError> {
    let mut out = BTreeMap::new();
    for (row, rec) in store.groups()? {
        let ops: Vec<Signed> = rec.ops.iter().filter_map(|o| decode_signed(o)).collect();
        let posts: Vec<Signed> = store
            .group_posts(row, usize::MAX)?
            .iter()
            .filter(|p| !p.withdrawn)
            .filter_map(|p| decode_signed(&p.signed))
            .collect();
        match Group::load(key.clone(), ops, posts) {
            Ok(g) => {
                out.insert(row, g);
            }
            Err(e) => tracing::warn!("a stored group could not be loaded: {e}"),
        }
    }
    Ok(out)
}

async fn lock(shared: &Arc<Shared>) -> Result<tokio::sync::MutexGuard<'_, Held>, OpError> {
    let mut held = shared.groups.held.lock().await;
    if !held.loaded {
        let key = shared.key.clone();
        held.groups = db(&shared.store, move |s| load_all(s, &key)).await??;
        held.loaded = true;
        for g in held.groups.values_mut() {
            mark_live(shared, g);
        }
    }
    Ok(held)
}

fn contact_of(shared: &Shared, peer: &PeerId) -> Option<u64> {
    shared.contacts.read().ok()?.get(peer).copied()
}

fn peer_of(shared: &Shared, contact: u64) -> Option<PeerId> {
    let c = shared.contacts.read().ok()?;
    c.iter().find(|(_, id)| **id == contact).map(|(p, _)| *p)
}

/// Writes what a step changed and queues its frames; logs alerts without
/// identifiers.
async fn commit(
    shared: &Arc<Shared>,
    row: Option<u64>,
    g: &Group,
    step: Step,
    own: Option<(&Signed, &str, u64)>,
) -> Result<u64, OpError> {
    let now = now_ms();
    let mut w = GroupWrite {
        ops: g.ops().iter().map(prost::Message::encode_to_vec).collect(),
        ..GroupWrite::default()
    };
    if let Some((signed, body, at_ms)) = own {
        w.posts.push(GroupPostRow {
            n: 0,
            author: HEXLOWER.encode(g.me().as_bytes()),
            seq: g.heads().get(&g.me()).copied().unwrap_or(0),
            body: body.to_string(),
            at_ms,
            received_ms: now,
            signed: BASE64.encode(&prost::Message::encode_to_vec(signed)),
            withdrawn: false,
        });
    }
    let mut posts = 0;
    for e in &step.events {
        match e {
            Event::Post {
                author,
                seq,
                body,
                at_ms,
            } => {
                tracing::debug!(author = %author.short(), seq, "group post shown");
                let signed = g
                    .signed_post(author, *seq)
                    .map(|s| BASE64.encode(&prost::Message::encode_to_vec(s)))
                    .unwrap_or_default();
                w.posts.push(GroupPostRow {
                    n: 0,
                    author: HEXLOWER.encode(author.as_bytes()),
                    seq: *seq,
                    body: String::from_utf8_lossy(body).into_owned(),
                    at_ms: *at_ms,
                    received_ms: now,
                    signed,
                    withdrawn: false,
                });
                posts += 1;
            }
            Event::Withdrawn { author, seq } => {
                w.withdrawn.push((HEXLOWER.encode(author.as_bytes()), *seq));
            }
            Event::Alert(a) => tracing::warn!("group: {}", a.describe()),
            Event::Undone { why } => {
                tracing::info!("group: one of your membership changes was undone: {why}")
            }
            Event::Membership => {}
        }
    }
    let mut kicked = Vec::new();
    for o in step.out {
        match contact_of(shared, &o.to) {
            Some(c) => {
                w.frames.push((c, *o.to.as_bytes(), o.frame.encode()));
                if !kicked.contains(&c) {
                    kicked.push(c);
                }
            }
            None => tracing::debug!("group frame for a member who is not a contact: dropped"),
        }
    }
    let id = *g.id();
    let own = shared.omemo.clone();
    let row = db(&shared.store, move |s| {
        s.write_group(row, &id, &w, Some(&own))
    })
    .await??;
    for c in kicked {
        shared.outbox_grew(c);
    }
    if posts > 0 {
        let _ = shared
            .events
            .send(super::NodeEvent::GroupPosts { group: row });
    }
    Ok(row)
}

/// Runs `f` on every group and writes what each produced.
async fn each(shared: &Arc<Shared>, mut f: impl FnMut(&mut Group, u64) -> Step) {
    let Ok(mut held) = lock(shared).await else {
        return;
    };
    let now = now_ms();
    let rows: Vec<u64> = held.groups.keys().copied().collect();
    for row in rows {
        let Some(g) = held.groups.get_mut(&row) else {
            continue;
        };
        let step = f(g, now);
        if step.out.is_empty() && step.events.is_empty() {
            continue;
        }
        let g = &held.groups[&row];
        if let Err(e) = commit(shared, Some(row), g, step, None).await {
            tracing::warn!("group: could not store a change: {e}");
        }
    }
}

/// A session with `contact` is up: members among them get our summaries.
pub(crate) async fn connected(shared: &Arc<Shared>, contact: u64) {
    if let Some(peer) = peer_of(shared, contact) {
        each(shared, |g, now| g.connected(peer, now)).await;
    }
}

/// A session with `contact` ended.
pub(crate) async fn disconnected(shared: &Arc<Shared>, contact: u64) {
    let Some(peer) = peer_of(shared, contact) else {
        return;
    };
    if let Ok(mut held) = lock(shared).await {
        for g in held.groups.values_mut() {
            g.disconnected(peer);
        }
    }
}

/// Group frames that arrived from `contact`, in order.
pub(crate) async fn frames(shared: &Arc<Shared>, contact: u64, frames: Vec<Vec<u8>>) {
    let Some(peer) = peer_of(shared, contact) else {
        return;
    };
    let Ok(mut held) = lock(shared).await else {
        return;
    };
    for bytes in frames {
        let frame = match Frame::decode(&bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("group: a contact sent an unusable frame: {e}");
                continue;
            }
        };
        let Ok(id) = <Hash>::try_from(frame.group.as_slice()) else {
            tracing::warn!("group: a contact sent a frame without a group id");
            continue;
        };
        let now = now_ms();
        let row = held
            .groups
            .iter()
            .find(|(_, g)| *g.id() == id)
            .map(|(r, _)| *r);
        let row = match row {
            Some(r) => r,
            None => match welcome(shared, &mut held, id, &frame, peer).await {
                Some(r) => r,
                None => continue,
            },
        };
        let Some(g) = held.groups.get_mut(&row) else {
            continue;
        };
        let step = g.handle(peer, frame, now);
        // A frame that changed nothing to keep or send (a copy of what we
        // hold) costs no write.
        if step.out.is_empty() && step.events.is_empty() {
            continue;
        }
        let g = &held.groups[&row];
        if let Err(e) = commit(shared, Some(row), g, step, None).await {
            tracing::warn!("group: could not store a change: {e}");
        }
    }
}

/// A frame for a group we do not have: a welcome from a contact who added
/// us (its ops, genesis first, possibly over several frames).
async fn welcome(
    shared: &Arc<Shared>,
    held: &mut Held,
    id: Hash,
    frame: &Frame,
    from: PeerId,
) -> Option<u64> {
    if frame.ops.is_empty() {
        return None;
    }
    if !held.pending.contains_key(&id) && held.pending.len() >= MAX_PENDING_WELCOMES {
        held.pending.clear();
    }
    let ops = held.pending.entry(id).or_default();
    if ops.len() + frame.ops.len() > crate::group::MAX_OPS {
        held.pending.remove(&id);
        return None;
    }
    ops.extend(frame.ops.iter().cloned());
    let ops = ops.clone();
    let g = match Group::load(shared.key.clone(), ops, Vec::new()) {
        Ok(g) if *g.id() == id && g.is_member() => g,
        // Not (yet) a welcome for us: wait for the rest.
        _ => return None,
    };
    held.pending.remove(&id);
    let mut g = g;
    let step = g.connected(from, now_ms());
    match commit(shared, None, &g, step, None).await {
        Ok(row) => {
            tracing::info!("group: a contact added you to a group");
            held.groups.insert(row, g);
            let _ = shared
                .events
                .send(super::NodeEvent::GroupPosts { group: row });
            Some(row)
        }
        Err(e) => {
            tracing::warn!("group: could not store a new group: {e}");
            None
        }
    }
}

/// Periodic summaries.
pub(crate) async fn tick(shared: &Arc<Shared>) {
    each(shared, |g, now| g.tick(now)).await;
}

/// Contacts with a resumed session now.
pub(crate) fn live_contacts(shared: &Shared) -> Vec<u64> {
    shared
        .conns
        .lock()
        .map(|c| {
            c.iter()
                .filter(|(_, e)| e.resumed)
                .map(|(k, _)| *k)
                .collect()
        })
        .unwrap_or_default()
}

/// Marks the members with a live session as connected (no frames).
fn mark_live(shared: &Shared, g: &mut Group) {
    let conns = live_contacts(shared);
    for c in conns {
        if let Some(p) = peer_of(shared, c) {
            g.mark_online(p);
        }
    }
}

fn find<'a>(held: &'a Held, sel: &str) -> Result<(u64, &'a Group), OpError> {
    let sel_l = sel.to_ascii_lowercase();
    let hits: Vec<(u64, &Group)> = held
        .groups
        .iter()
        .filter(|(_, g)| {
            g.state().name.eq_ignore_ascii_case(sel)
                || (sel_l.len() >= 4 && HEXLOWER.encode(g.id()).starts_with(&sel_l))
        })
        .map(|(r, g)| (*r, g))
        .collect();
    match hits.as_slice() {
        [one] => Ok(*one),
        [] => Err(usage(format!(
            "no group matches `{sel}` (see `coterie group list`)"
        ))),
        more => Err(usage(format!(
            "`{sel}` matches {} groups; use the group id (see `coterie group list`)",
            more.len()
        ))),
    }
}

fn view(g: &Group) -> GroupView {
    let s = g.state();
    GroupView {
        id: HEXLOWER.encode(g.id()),
        name: s.name.clone(),
        members: s.members.len(),
        member: g.is_member(),
        admin: s.members.get(&g.me()).is_some_and(|m| m.admin),
    }
}

fn action(e: ActionError) -> OpError {
    usage(e)
}

/// `coterie group create NAME`.
pub(crate) async fn create(shared: &Arc<Shared>, name: &str) -> Result<GroupView, OpError> {
    let mut g = Group::create(shared.key.clone(), name, now_ms()).map_err(action)?;
    let mut held = lock(shared).await?;
    let row = commit(shared, None, &g, Step::default(), None).await?;
    mark_live(shared, &mut g);
    let v = view(&g);
    held.groups.insert(row, g);
    Ok(v)
}

/// Every group.
pub(crate) async fn list(shared: &Arc<Shared>) -> Result<Vec<GroupView>, OpError> {
    let held = lock(shared).await?;
    Ok(held.groups.values().map(view).collect())
}

/// The group `sel` names, with its connected members marked.
fn chosen<'a>(
    shared: &Shared,
    held: &'a mut Held,
    sel: &str,
) -> Result<(u64, &'a mut Group), OpError> {
    let row = find(held, sel)?.0;
    let g = held
        .groups
        .get_mut(&row)
        .ok_or_else(|| usage("the group is gone"))?;
    mark_live(shared, g);
    Ok((row, g))
}

/// Runs a change on one group and commits it.
async fn change(
    shared: &Arc<Shared>,
    sel: &str,
    f: impl FnOnce(&mut Group, u64) -> Result<Step, ActionError>,
) -> Result<GroupView, OpError> {
    let mut held = lock(shared).await?;
    let (row, g) = chosen(shared, &mut held, sel)?;
    let now = now_ms();
    let step = f(g, now).map_err(action)?;
    let g = &held.groups[&row];
    commit(shared, Some(row), g, step, None).await?;
    Ok(view(g))
}

fn member_key(store: &Store, g: &Group, sel: &str) -> Result<PeerId, OpError> {
    if let Ok(c) = crate::ops::find_contact(store, sel) {
        return PeerId::from_bytes(c.peer).map_err(|_| usage("the contact's key is invalid"));
    }
    let sel_l = sel.to_ascii_lowercase();
    let hits: Vec<PeerId> = g
        .state()
        .members
        .keys()
        .filter(|k| sel_l.len() >= 4 && HEXLOWER.encode(k.as_bytes()).starts_with(&sel_l))
        .copied()
        .collect();
    match hits.as_slice() {
        [one] => Ok(*one),
        _ => Err(usage(format!(
            "no single contact or member matches `{sel}` (see `coterie group members`)"
        ))),
    }
}

/// `coterie group invite GROUP CONTACT`: adds a contact (admins only).
pub(crate) async fn add(
    shared: &Arc<Shared>,
    sel: &str,
    contact: &str,
    admin: bool,
) -> Result<GroupView, OpError> {
    let sel2 = contact.to_string();
    let c = db(&shared.store, move |s| crate::ops::find_contact(s, &sel2)).await??;
    let peer = PeerId::from_bytes(c.peer).map_err(|_| usage("the contact's key is invalid"))?;
    change(shared, sel, |g, now| g.add(peer, admin, now)).await
}

/// `coterie group remove GROUP MEMBER` (admins only).
pub(crate) async fn remove(
    shared: &Arc<Shared>,
    sel: &str,
    member: &str,
) -> Result<GroupView, OpError> {
    let key = {
        let held = lock(shared).await?;
        let g = find(&held, sel)?.1;
        let store = shared.store.clone();
        // Contact lookup reads the store: cheap, and the lock is ours.
        member_key(&store, g, member)?
    };
    change(shared, sel, |g, now| g.remove(key, now)).await
}

/// `coterie group leave GROUP`.
pub(crate) async fn leave(shared: &Arc<Shared>, sel: &str) -> Result<GroupView, OpError> {
    change(shared, sel, |g, now| g.leave(now)).await
}

/// `coterie group rename GROUP NAME` (admins only).
pub(crate) async fn rename(
    shared: &Arc<Shared>,
    sel: &str,
    name: &str,
) -> Result<GroupView, OpError> {
    change(shared, sel, |g, now| g.rename(name, now)).await
}

/// `coterie group send GROUP TEXT`.
pub(crate) async fn send(
    shared: &Arc<Shared>,
    sel: &str,
    text: &str,
) -> Result<GroupPostView, OpError> {
    let mut held = lock(shared).await?;
    let (row, g) = chosen(shared, &mut held, sel)?;
    let now = now_ms();
    let (signed, step) = g.post(text.as_bytes(), now).map_err(action)?;
    let g = &held.groups[&row];
    commit(shared, Some(row), g, step, Some((&signed, text, now))).await?;
    Ok(GroupPostView {
        n: 0,
        from: "me".into(),
        body: text.to_string(),
        at_ms: now,
        withdrawn: false,
    })
}

fn names(store: &Store) -> HashMap<String, String> {
    store
        .contacts()
        .unwrap_or_default()
        .into_iter()
        .map(|c| (HEXLOWER.encode(&c.peer), c.name))
        .collect()
}

fn short(hex: &str) -> String {
    hex.chars().take(8).collect()
}

/// `coterie group history GROUP`.
pub(crate) async fn history(
    shared: &Arc<Shared>,
    sel: &str,
    limit: usize,
) -> Result<Vec<GroupPostView>, OpError> {
    let (row, me) = {
        let held = lock(shared).await?;
        let (row, g) = find(&held, sel)?;
        (row, HEXLOWER.encode(g.me().as_bytes()))
    };
    db(&shared.store, move |s| {
        let names = names(s);
        Ok::<_, OpError>(
            s.group_posts(row, limit)?
                .into_iter()
                .map(|p| GroupPostView {
                    n: p.n,
                    from: if p.author == me {
                        "me".into()
                    } else {
                        names
                            .get(&p.author)
                            .cloned()
                            .unwrap_or_else(|| short(&p.author))
                    },
                    body: if p.withdrawn { String::new() } else { p.body },
                    at_ms: p.at_ms,
                    withdrawn: p.withdrawn,
                })
                .collect(),
        )
    })
    .await?
}

/// `coterie group members GROUP`.
pub(crate) async fn members(shared: &Arc<Shared>, sel: &str) -> Result<Vec<MemberView>, OpError> {
    let (members, me) = {
        let held = lock(shared).await?;
        let g = find(&held, sel)?.1;
        let m: Vec<(PeerId, bool)> = g
            .state()
            .members
            .iter()
            .map(|(k, m)| (*k, m.admin))
            .collect();
        (m, g.me())
    };
    let live = live_contacts(shared);
    let contacts: HashMap<PeerId, u64> = shared
        .contacts
        .read()
        .map(|c| c.clone())
        .unwrap_or_default();
    let names = db(&shared.store, |s| Ok::<_, OpError>(names(s))).await??;
    Ok(members
        .into_iter()
        .map(|(k, admin)| {
            let hex = HEXLOWER.encode(k.as_bytes());
            let contact = contacts.get(&k).copied();
            MemberView {
                name: if k == me {
                    "me".into()
                } else {
                    names.get(&hex).cloned().unwrap_or_else(|| short(&hex))
                },
                key: short(&hex),
                me: k == me,
                contact: contact.is_some(),
                admin,
                online: contact.is_some_and(|c| live.contains(&c)),
            }
        })
        .collect())
}

/// `coterie group link GROUP`: an invite link (and QR code) that makes
/// whoever uses it a contact and a member (admins only; `uses` people).
pub(crate) async fn link(
    shared: &Arc<Shared>,
    sel: &str,
    ttl: &str,
    uses: u32,
) -> Result<String, OpError> {
    let id = {
        let held = lock(shared).await?;
        let g = find(&held, sel)?.1;
        if !g.state().members.get(&g.me()).is_some_and(|m| m.admin) {
            return Err(action(ActionError::Refused(
                crate::group::Refused::NotAdmin,
            )));
        }
        HEXLOWER.encode(g.id())
    };
    super::control::invite_for(shared, ttl, Some(id), Some(uses)).await
}

/// Someone redeemed a group link: add them (if we are still an admin).
pub(crate) async fn redeemed(shared: &Arc<Shared>, id_hex: &str, peer: PeerId) {
    let Ok(mut held) = lock(shared).await else {
        return;
    };
    let Some(row) = held
        .groups
        .iter()
        .find(|(_, g)| HEXLOWER.encode(g.id()) == id_hex)
        .map(|(r, _)| *r)
    else {
        tracing::info!("group: a link was used for a group that is gone");
        return;
    };
    let now = now_ms();
    let Some(g) = held.groups.get_mut(&row) else {
        return;
    };
    mark_live(shared, g);
    match g.add(peer, false, now) {
        Ok(step) => {
            let g = &held.groups[&row];
            match commit(shared, Some(row), g, step, None).await {
                Ok(_) => tracing::info!("group: someone joined through a link"),
                Err(e) => tracing::warn!("group: could not store a change: {e}"),
            }
        }
        Err(e) => tracing::info!("group: a link was used but the member was not added: {e}"),
    }
}
