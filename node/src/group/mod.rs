//! Groups with no room server (sans-IO).
//!
//! A group is two signed logs that every member keeps whole:
//!
//! - **Membership**: ops (create, add, remove, leave, rename), each signed
//!   by its author and naming its parent op, so they form a tree rooted in
//!   the genesis op, whose hash is the group's id. Each op is checked
//!   against the membership its parent leaves (only admins add, remove and
//!   rename). Every member picks the same chain from that tree: from the
//!   genesis, always the valid child with the smallest hash. An op that
//!   loses a race is re-issued by its author on the new head.
//! - **Posts**: each author numbers their posts 1, 2, 3… and links each to
//!   the previous one's hash, signs it, and names the membership head they
//!   saw and how far they had read everyone else (`seen`). A relay cannot
//!   forge or alter a post (signature), reorder one (numbers and links), or
//!   drop one unnoticed: the next post, or anyone's `seen`, shows the gap,
//!   and a member that answered a summary without what it signed it had is
//!   reported as withholding.
//!
//! The author sends each post to the members it is connected to; when two
//! members meet they exchange summaries (membership head and, per author,
//! how far they hold every post) and each answers with what the other
//! lacks and is owed: a member is owed the posts after the ones the adder
//! had read when they joined, and nothing once removed, even from a member
//! that has not heard of the removal yet but relays a post whose author had.
//!
//! Input: frames from peers, connects and disconnects, the user's actions,
//! and the time. Output: frames to send and events for the user. Nothing
//! here does I/O; every call leaves the state consistent whatever a peer
//! sent.

pub mod wire;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use transport::identity::{PeerId, SecretKey};

pub use wire::{Change, Frame, Hash, Op, Post, Signed, WireError};
use wire::{MAX_BODY, MAX_FRAME, MAX_MEMBERS, Summary, ZERO};

/// Ops held while their parent is unknown.
const MAX_ORPHAN_OPS: usize = 64;
/// Most ops a group may have (membership changes are rare).
pub const MAX_OPS: usize = 4096;
/// Posts held ahead of an author's contiguous head, per author.
pub const MAX_AHEAD: u64 = 1024;
/// Posts held while their membership head is unknown.
const MAX_WAITING: usize = 1024;
/// An unsolicited summary to the same peer at most this often.
const SUMMARY_EVERY_MS: u64 = 1_000;
/// New posts accepted from one author at once, then…
pub const FLOOD_BURST: f64 = 500.0;
/// …this many a second.
pub const FLOOD_PER_SEC: f64 = 5.0;
/// A summary to every connected member at least this often.
const RESYNC_EVERY_MS: u64 = 60_000;

/// A member's place in the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// May add, remove and rename.
    pub admin: bool,
    /// The epoch of the op that added them.
    pub since: u64,
    /// Owed only the posts after these.
    pub base: BTreeMap<PeerId, u64>,
}

/// The membership an op leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The op's epoch.
    pub epoch: u64,
    /// The group's name.
    pub name: String,
    /// Current members.
    pub members: BTreeMap<PeerId, Member>,
    /// Members who left or were removed, with their last post that counts.
    pub gone: BTreeMap<PeerId, u64>,
}

/// Why a membership change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The author is not a member.
    #[error("the author is not a member")]
    NotMember,
    /// Only admins add, remove and rename.
    #[error("only an admin can do that")]
    NotAdmin,
    /// Already a member.
    #[error("already a member")]
    AlreadyMember,
    /// A member who left or was removed cannot be added again.
    #[error("a member who left or was removed cannot be added again: create a new group")]
    WasMember,
    /// Not a member.
    #[error("not a member of the group")]
    NoSuchMember,
    /// Use leave.
    #[error("to leave, use leave, not remove")]
    RemoveSelf,
    /// Full.
    #[error("the group is full ({MAX_MEMBERS} members)")]
    Full,
    /// Wrong group or epoch.
    #[error("op does not follow its parent")]
    Sequence,
    /// Too many ops.
    #[error("the group has too many membership changes")]
    TooManyOps,
}

impl Membership {
    fn genesis(op: &Op) -> Option<Membership> {
        let Change::Create { name } = &op.change else {
            return None;
        };
        let mut members = BTreeMap::new();
        members.insert(
            op.author,
            Member {
                admin: true,
                since: 0,
                base: BTreeMap::new(),
            },
        );
        Some(Membership {
            epoch: 0,
            name: name.clone(),
            members,
            gone: BTreeMap::new(),
        })
    }

    /// The membership after `op`, whose parent left `self`.
    pub fn apply(&self, op: &Op) -> Result<Membership, Refused> {
        if op.epoch != self.epoch + 1 {
            return Err(Refused::Sequence);
        }
        let author = self.members.get(&op.author).ok_or(Refused::NotMember)?;
        let mut next = self.clone();
        next.epoch = op.epoch;
        match &op.change {
            Change::Create { .. } => return Err(Refused::Sequence),
            Change::Add {
                member,
                admin,
                base,
            } => {
                if !author.admin {
                    return Err(Refused::NotAdmin);
                }
                if self.members.contains_key(member) {
                    return Err(Refused::AlreadyMember);
                }
                if self.gone.contains_key(member) {
                    return Err(Refused::WasMember);
                }
                if self.members.len() >= MAX_MEMBERS {
                    return Err(Refused::Full);
                }
                next.members.insert(
                    *member,
                    Member {
                        admin: *admin,
                        since: op.epoch,
                        base: base.iter().copied().collect(),
                    },
                );
            }
            Change::Remove { member, last_seq } => {
                if !author.admin {
                    return Err(Refused::NotAdmin);
                }
                if *member == op.author {
                    return Err(Refused::RemoveSelf);
                }
                if next.members.remove(member).is_none() {
                    return Err(Refused::NoSuchMember);
                }
                next.gone.insert(*member, *last_seq);
            }
            Change::Leave { last_seq } => {
                next.members.remove(&op.author);
                next.gone.insert(op.author, *last_seq);
            }
            Change::Rename { name } => {
                if !author.admin {
                    return Err(Refused::NotAdmin);
                }
                next.name = name.clone();
            }
        }
        // A group keeps an admin: the longest-standing member (then the
        // smallest key) becomes one when the last admin goes.
        let heir = next
            .members
            .iter()
            .min_by_key(|(k, m)| (m.since, **k))
            .map(|(k, _)| *k);
        if !next.members.values().any(|m| m.admin)
            && let Some(m) = heir.and_then(|h| next.members.get_mut(&h))
        {
            m.admin = true;
        }
        Ok(next)
    }

    /// Whether `peer` is owed post `seq` of `author`.
    fn owed(&self, peer: &PeerId, author: &PeerId, seq: u64) -> bool {
        self.members
            .get(peer)
            .is_some_and(|m| seq > m.base.get(author).copied().unwrap_or(0))
    }
}

/// Something the user should know of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A post, delivered once, each author's in order.
    Post {
        /// Who wrote it.
        author: PeerId,
        /// Their number for it.
        seq: u64,
        /// The text.
        body: Vec<u8>,
        /// The author's clock.
        at_ms: u64,
    },
    /// A post shown earlier no longer counts: its author had been removed
    /// (or had left) before writing it.
    Withdrawn {
        /// Who wrote it.
        author: PeerId,
        /// Their number for it.
        seq: u64,
    },
    /// The membership or name changed.
    Membership,
    /// One of the user's membership changes lost a race and no longer
    /// applies; it was not re-issued.
    Undone {
        /// Why.
        why: Refused,
    },
    /// A member misbehaved.
    Alert(Alert),
}

/// Misbehaviour detected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alert {
    /// A peer relayed an item whose signature does not verify, or that is
    /// malformed.
    Forged {
        /// The peer that sent it.
        peer: PeerId,
        /// What was wrong.
        why: WireError,
    },
    /// An author signed two different posts with the same number, or broke
    /// their own chain.
    Equivocation {
        /// The author.
        author: PeerId,
    },
    /// A peer answered a summary without posts it had signed it held.
    Withheld {
        /// The peer.
        peer: PeerId,
        /// Whose posts.
        author: PeerId,
        /// The first one missing.
        seq: u64,
    },
    /// A member sent their own posts faster than anyone writes; the
    /// excess was refused.
    Flood {
        /// The author.
        author: PeerId,
    },
    /// A signed membership change that its parent does not allow.
    BadChange {
        /// The peer that sent it.
        peer: PeerId,
        /// Why.
        why: Refused,
    },
}

impl Alert {
    /// A description without identifiers, for logs.
    pub fn describe(&self) -> String {
        match self {
            Alert::Forged { why, .. } => {
                format!("a member relayed a forged or malformed item ({why})")
            }
            Alert::Equivocation { .. } => {
                "an author signed two different posts with one number".into()
            }
            Alert::Withheld { .. } => "a member withheld posts it had signed it held".into(),
            Alert::Flood { .. } => {
                "a member wrote faster than allowed; the excess was refused".into()
            }
            Alert::BadChange { why, .. } => format!("a membership change was refused ({why})"),
        }
    }
}

/// A frame for a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    /// To whom.
    pub to: PeerId,
    /// What.
    pub frame: Frame,
}

/// What a call produced.
#[derive(Debug, Default)]
pub struct Step {
    /// Frames to send.
    pub out: Vec<Out>,
    /// Events for the user.
    pub events: Vec<Event>,
}

/// Why the user's action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The membership does not allow it.
    #[error("{0}")]
    Refused(#[from] Refused),
    /// The user is no longer a member.
    #[error("you are no longer a member of this group")]
    NotMember,
    /// Empty or too long.
    #[error("the message is empty or longer than {MAX_BODY} bytes")]
    Body,
    /// Empty, too long or with control characters.
    #[error(
        "a group name has 1 to {} characters and no control characters",
        wire::MAX_NAME_CHARS
    )]
    Name,
}

/// Why stored or welcome data does not make a group.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// No genesis op.
    #[error("no genesis op")]
    NoGenesis,
    /// An item is broken.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// The user is not a member.
    #[error("you are not a member of this group")]
    NotMember,
}

#[derive(Debug, Clone)]
struct StoredPost {
    post: Post,
    signed: Signed,
    delivered: bool,
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
    reported_ms: Option<u64>,
}

#[derive(Debug, Default, Clone)]
struct PeerView {
    online: bool,
    /// How far they are known to hold each author (their summary, what
    /// they sent us, what we sent them).
    known: BTreeMap<PeerId, u64>,
    /// How far they said (summary) or signed (seen) they hold.
    claims: BTreeMap<PeerId, u64>,
    last_summary_ms: Option<u64>,
    /// A summary was held back by the rate limit: send it at a tick.
    summary_due: bool,
}

/// One group, as one member holds it.
pub struct Group {
    key: SecretKey,
    me: PeerId,
    id: Hash,
    ops: HashMap<Hash, (Op, Signed)>,
    /// The membership after each valid op.
    states: HashMap<Hash, Membership>,
    children: HashMap<Hash, Vec<Hash>>,
    invalid: HashSet<Hash>,
    orphans: VecDeque<(Op, Signed)>,
    chain: Vec<Hash>,
    /// The membership at the chain's head.
    current: Membership,
    /// Own changes, to re-issue if they lose a race.
    intents: Vec<(Hash, Change)>,
    posts: BTreeMap<(PeerId, u64), StoredPost>,
    /// New posts each author may still send now.
    flood: BTreeMap<PeerId, Bucket>,
    /// (member, author): we relayed the author's posts to the member, who
    /// lacked them; their next ones are pushed as they arrive.
    relay_for: BTreeSet<(PeerId, PeerId)>,
    contiguous: BTreeMap<PeerId, u64>,
    waiting: VecDeque<(PeerId, Post, Signed)>,
    peers: BTreeMap<PeerId, PeerView>,
    last_resync_ms: u64,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("ops", &self.ops.len())
            .field("posts", &self.posts.len())
            .finish_non_exhaustive()
    }
}

impl Group {
    /// Creates a group with the user as its only member and admin.
    pub fn create(key: SecretKey, name: &str, now_ms: u64) -> Result<Group, ActionError> {
        check_name(name)?;
        let genesis = Op::seal(
            &key,
            &ZERO,
            0,
            &ZERO,
            &Change::Create { name: name.into() },
            now_ms,
        );
        Group::load(key, vec![genesis], Vec::new()).map_err(|_| ActionError::Name)
    }

    /// Rebuilds a group from its stored ops and posts (or from a welcome:
    /// the ops only).
    pub fn load(key: SecretKey, ops: Vec<Signed>, posts: Vec<Signed>) -> Result<Group, LoadError> {
        let mut genesis = None;
        let mut rest = Vec::new();
        for s in ops {
            let op = Op::open(&s)?;
            if op.epoch == 0 {
                genesis = Some((op, s));
            } else {
                rest.push((op, s));
            }
        }
        let (g, gs) = genesis.ok_or(LoadError::NoGenesis)?;
        let state = Membership::genesis(&g).ok_or(LoadError::NoGenesis)?;
        let me = key.peer_id();
        let id = g.hash;
        let mut group = Group {
            key,
            me,
            id,
            ops: HashMap::new(),
            states: HashMap::new(),
            children: HashMap::new(),
            invalid: HashSet::new(),
            orphans: VecDeque::new(),
            chain: vec![id],
            current: state.clone(),
            intents: Vec::new(),
            posts: BTreeMap::new(),
            contiguous: BTreeMap::new(),
            waiting: VecDeque::new(),
            peers: BTreeMap::new(),
            last_resync_ms: 0,
            flood: BTreeMap::new(),
            relay_for: BTreeSet::new(),
        };
        group.ops.insert(id, (g, gs));
        group.states.insert(id, state);
        rest.sort_by_key(|(o, _)| o.epoch);
        let mut step = Step::default();
        for (op, s) in rest {
            if op.group == id {
                group.insert_op(op, s, None, &mut step);
            }
        }
        group.choose_chain(0, &mut step);
        if !group.state().members.contains_key(&me) && !group.state().gone.contains_key(&me) {
            return Err(LoadError::NotMember);
        }
        for s in posts {
            let post = Post::open(&s)?;
            if post.group == id {
                group.accept_post(me, post, s, 0, &mut step);
            }
        }
        // Stored posts were shown before.
        for p in group.posts.values_mut() {
            p.delivered = true;
        }
        Ok(group)
    }

    /// The group's id.
    pub fn id(&self) -> &Hash {
        &self.id
    }

    /// The membership now.
    pub fn state(&self) -> &Membership {
        &self.current
    }

    /// The membership head's hash.
    pub fn head(&self) -> Hash {
        *self.chain.last().unwrap_or(&self.id)
    }

    /// Whether the user is a member now.
    pub fn is_member(&self) -> bool {
        self.state().members.contains_key(&self.me)
    }

    /// Every op, parents first (for storing, and for a welcome).
    pub fn ops(&self) -> Vec<Signed> {
        let mut v: Vec<&(Op, Signed)> = self.ops.values().collect();
        v.sort_by_key(|(o, _)| (o.epoch, o.hash));
        v.into_iter().map(|(_, s)| s.clone()).collect()
    }

    /// The ops on the chain, genesis first (what a new member needs).
    pub fn welcome(&self) -> Vec<Signed> {
        self.chain
            .iter()
            .filter_map(|h| self.ops.get(h).map(|(_, s)| s.clone()))
            .collect()
    }

    /// Every post held, each author's in order.
    pub fn posts(&self) -> impl Iterator<Item = (&Post, &Signed)> {
        self.posts.values().map(|p| (&p.post, &p.signed))
    }

    /// Per author, the highest post held with every earlier one owed.
    pub fn heads(&self) -> &BTreeMap<PeerId, u64> {
        &self.contiguous
    }

    /// The user's own key.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// A peer is connected: it gets our summary if it is a member.
    pub fn connected(&mut self, peer: PeerId, now_ms: u64) -> Step {
        let mut step = Step::default();
        self.peers.entry(peer).or_default().online = true;
        if self.state().members.contains_key(&peer) && peer != self.me {
            self.send_summary(peer, now_ms, &mut step);
        }
        step
    }

    /// A peer is known to be connected (its summary exchange happened
    /// elsewhere, e.g. before this group was loaded): new posts go to it.
    pub fn mark_online(&mut self, peer: PeerId) {
        self.peers.entry(peer).or_default().online = true;
    }

    /// The signed post `seq` of `author`, if held.
    pub fn signed_post(&self, author: &PeerId, seq: u64) -> Option<&Signed> {
        self.posts.get(&(*author, seq)).map(|p| &p.signed)
    }

    /// A peer is gone.
    pub fn disconnected(&mut self, peer: PeerId) {
        if let Some(v) = self.peers.get_mut(&peer) {
            // What was in flight may be lost: the next summary says.
            v.online = false;
            v.known.clear();
            self.relay_for.retain(|(to, _)| *to != peer);
        }
    }

    /// Periodic work (call about once a second): summaries held back by
    /// the rate limit, and one to every connected member now and then.
    pub fn tick(&mut self, now_ms: u64) -> Step {
        let mut step = Step::default();
        let resync = now_ms.saturating_sub(self.last_resync_ms) >= RESYNC_EVERY_MS;
        if resync {
            self.last_resync_ms = now_ms;
        }
        for p in self.online_members() {
            let due = self.peers.get(&p).is_some_and(|v| {
                v.summary_due
                    && v.last_summary_ms
                        .is_none_or(|t| now_ms.saturating_sub(t) >= SUMMARY_EVERY_MS)
            });
            if resync || due {
                self.send_summary(p, now_ms, &mut step);
            }
        }
        step
    }

    /// Writes a post and sends it to every connected member.
    pub fn post(&mut self, body: &[u8], now_ms: u64) -> Result<(Signed, Step), ActionError> {
        if body.is_empty() || body.len() > MAX_BODY {
            return Err(ActionError::Body);
        }
        if !self.is_member() {
            return Err(ActionError::NotMember);
        }
        let seq = self.contiguous.get(&self.me).copied().unwrap_or(0) + 1;
        let prev = self
            .posts
            .get(&(self.me, seq - 1))
            .map(|p| p.post.hash)
            .unwrap_or(ZERO);
        let seen: Vec<(PeerId, u64)> = self
            .contiguous
            .iter()
            .filter(|(a, _)| **a != self.me)
            .map(|(a, s)| (*a, *s))
            .collect();
        let signed = Post::seal(
            &self.key,
            &self.id,
            seq,
            &prev,
            &self.head(),
            &seen,
            body,
            now_ms,
        );
        let post = Post::open(&signed).map_err(|_| ActionError::Body)?;
        let mut step = Step::default();
        self.accept_post(self.me, post, signed.clone(), now_ms, &mut step);
        let online = self.online_members();
        let state = self.state();
        // Everyone owed the post is connected: they all get it from us, and
        // say so to none of the others (no storm of summaries).
        let to_all = state
            .members
            .keys()
            .filter(|m| **m != self.me && state.owed(m, &self.me, seq))
            .all(|m| online.contains(m));
        for peer in online {
            if self.state().owed(&peer, &self.me, seq) {
                let mut out = self.frame_to(peer, Vec::new(), vec![signed.clone()]);
                out.frame.to_all = to_all;
                step.out.push(out);
                self.knows(peer, self.me, seq);
            }
        }
        Ok((signed, step))
    }

    /// Adds a member (admins only). Returns the welcome the new member
    /// needs (the chain's ops).
    pub fn add(&mut self, member: PeerId, admin: bool, now_ms: u64) -> Result<Step, ActionError> {
        let base = self.contiguous.iter().map(|(a, s)| (*a, *s)).collect();
        self.change(
            Change::Add {
                member,
                admin,
                base,
            },
            now_ms,
        )
    }

    /// Removes a member (admins only): their posts after the last one the
    /// user holds do not count, and they are sent nothing more.
    pub fn remove(&mut self, member: PeerId, now_ms: u64) -> Result<Step, ActionError> {
        let last_seq = self.contiguous.get(&member).copied().unwrap_or(0);
        self.change(Change::Remove { member, last_seq }, now_ms)
    }

    /// Leaves the group.
    pub fn leave(&mut self, now_ms: u64) -> Result<Step, ActionError> {
        let last_seq = self.contiguous.get(&self.me).copied().unwrap_or(0);
        self.change(Change::Leave { last_seq }, now_ms)
    }

    /// Renames the group (admins only).
    pub fn rename(&mut self, name: &str, now_ms: u64) -> Result<Step, ActionError> {
        check_name(name)?;
        self.change(Change::Rename { name: name.into() }, now_ms)
    }

    fn change(&mut self, change: Change, now_ms: u64) -> Result<Step, ActionError> {
        if !self.is_member() {
            return Err(ActionError::NotMember);
        }
        let mut step = Step::default();
        let hash = self.seal_change(&change, now_ms, &mut step)?;
        self.intents.push((hash, change));
        if self.intents.len() > 64 {
            self.intents.remove(0);
        }
        Ok(step)
    }

    /// Signs `change` on the current head, applies it and sends it.
    fn seal_change(
        &mut self,
        change: &Change,
        now_ms: u64,
        step: &mut Step,
    ) -> Result<Hash, ActionError> {
        let before = self.state().clone();
        let head = self.head();
        let signed = Op::seal(&self.key, &self.id, before.epoch + 1, &head, change, now_ms);
        let op = Op::open(&signed).map_err(|_| ActionError::Name)?;
        before.apply(&op)?;
        let hash = op.hash;
        let me = self.me;
        self.insert_op(op, signed.clone(), Some(me), step);
        self.choose_chain(now_ms, step);
        self.spread_ops(&before, vec![signed], None, step);
        Ok(hash)
    }

    /// Sends new ops to the connected members, the added member (the whole
    /// chain) and the removed one (so they know).
    fn spread_ops(
        &mut self,
        before: &Membership,
        ops: Vec<Signed>,
        from: Option<PeerId>,
        step: &mut Step,
    ) {
        let after = self.state().clone();
        let mut to: BTreeSet<PeerId> = self.online_members().into_iter().collect();
        // The added member gets the chain and the removed one the news:
        // from the change's author connected or not (the driver queues
        // frames durably), from the others when connected.
        let mine = from.is_none();
        let online = |p: &PeerId| self.peers.get(p).is_some_and(|v| v.online);
        for gone in before.members.keys() {
            if !after.members.contains_key(gone) && (mine || online(gone)) {
                to.insert(*gone);
            }
        }
        for new in after.members.keys() {
            if !before.members.contains_key(new) && (mine || online(new)) {
                to.insert(*new);
            }
        }
        to.remove(&self.me);
        if let Some(f) = from {
            to.remove(&f);
        }
        for peer in to {
            let new_member =
                !before.members.contains_key(&peer) && after.members.contains_key(&peer);
            let ops = if new_member {
                self.welcome()
            } else {
                ops.clone()
            };
            step.out
                .extend(self.pack(peer, ops, Vec::new(), None, false));
        }
    }

    /// Handles a frame from a peer (already authenticated as `from` by its
    /// session).
    pub fn handle(&mut self, from: PeerId, frame: Frame, now_ms: u64) -> Step {
        let mut step = Step::default();
        if frame.group.as_slice() != self.id {
            return step;
        }
        self.peers.entry(from).or_default().online = true;
        // Ops first: they may make the sender a member, or name the
        // membership the posts refer to.
        let before = self.state().clone();
        let mut fresh = Vec::new();
        for s in frame.ops.into_iter().take(MAX_OPS) {
            match Op::open(&s) {
                Ok(op) if op.group == self.id || op.hash == self.id => {
                    if !self.ops.contains_key(&op.hash) && !self.invalid.contains(&op.hash) {
                        fresh.push(s.clone());
                        self.insert_op(op, s, Some(from), &mut step);
                    }
                }
                Ok(_) => {}
                Err(why) => step
                    .events
                    .push(Event::Alert(Alert::Forged { peer: from, why })),
            }
        }
        if !fresh.is_empty() {
            self.choose_chain(now_ms, &mut step);
            self.spread_ops(&before, fresh, Some(from), &mut step);
            self.retry_waiting(now_ms, &mut step);
        }
        let sender_is_member = self.state().members.contains_key(&from);
        if !sender_is_member {
            return step;
        }
        let mut gap = false;
        let shown_before = step.events.len();
        // The author reached every member itself: nobody needs a nudge.
        let author_reached_all = frame.to_all;
        for s in frame.posts {
            match Post::open(&s) {
                Ok(post) if post.group == self.id => {
                    let seq = post.seq;
                    let author = post.author;
                    self.knows(from, author, seq);
                    self.accept_post(from, post, s, now_ms, &mut step);
                    if seq > self.contiguous.get(&author).copied().unwrap_or(0) + 1 {
                        gap = true;
                    }
                }
                Ok(_) => {}
                Err(why) => step
                    .events
                    .push(Event::Alert(Alert::Forged { peer: from, why })),
            }
        }
        if let Some(summary) = frame.summary {
            self.answer_summary(from, &summary, now_ms, &mut step);
        }
        if frame.answered {
            self.check_withheld(from, &mut step);
        }
        // New posts: nudge connected members not known to hold them (a
        // summary; they ask back for what they lack). Members that are not
        // the author's contacts get posts this way within seconds.
        let fresh: Vec<(PeerId, u64)> = step.events[shown_before..]
            .iter()
            .filter_map(|e| match e {
                Event::Post { author, seq, .. } => Some((*author, *seq)),
                _ => None,
            })
            .collect();
        // Posts the author sent to every member itself: the others are
        // told at the next tick, not at once (each would otherwise tell each
        // other at the moment everyone is busy showing the post; the tick
        // still covers a member the author's copy has not reached).
        let deferred = author_reached_all && fresh.iter().all(|(a, _)| *a == from);
        if !fresh.is_empty() {
            let state = self.state().clone();
            for peer in self.online_members() {
                if peer == from {
                    continue;
                }
                // Members we had to relay an author's posts to (they are
                // not connected to the author) get the new ones at once.
                let push: Vec<Signed> = fresh
                    .iter()
                    .filter(|(a, s)| {
                        *a != peer
                            && self.relay_for.contains(&(peer, *a))
                            && state.owed(&peer, a, *s)
                            && self.known_by(&peer, a) < *s
                    })
                    .filter_map(|(a, s)| self.posts.get(&(*a, *s)).map(|p| p.signed.clone()))
                    .collect();
                if !push.is_empty() {
                    for (a, s) in &fresh {
                        if self.relay_for.contains(&(peer, *a)) {
                            self.knows(peer, *a, *s);
                        }
                    }
                    step.out
                        .extend(self.pack(peer, Vec::new(), push, None, false));
                }
                let lacks = fresh.iter().any(|(a, s)| {
                    *a != peer && state.owed(&peer, a, *s) && self.known_by(&peer, a) < *s
                });
                if lacks && deferred {
                    self.peers.entry(peer).or_default().summary_due = true;
                } else if lacks {
                    self.maybe_summary(peer, now_ms, &mut step);
                }
            }
        }
        if gap || self.behind_claims(&from) {
            self.maybe_summary(from, now_ms, &mut step);
        }
        step
    }

    fn online_members(&self) -> Vec<PeerId> {
        let state = self.state();
        self.peers
            .iter()
            .filter(|(p, v)| v.online && **p != self.me && state.members.contains_key(p))
            .map(|(p, _)| *p)
            .collect()
    }

    fn frame_to(&self, to: PeerId, ops: Vec<Signed>, posts: Vec<Signed>) -> Out {
        Out {
            to,
            frame: Frame {
                group: self.id.to_vec(),
                ops,
                posts,
                summary: None,
                answered: false,
                to_all: false,
            },
        }
    }

    /// Cuts ops and posts into frames under `MAX_FRAME`, in order; the
    /// summary and the `answered` mark go on the last.
    fn pack(
        &self,
        to: PeerId,
        ops: Vec<Signed>,
        posts: Vec<Signed>,
        summary: Option<Summary>,
        answered: bool,
    ) -> Vec<Out> {
        let reserve = summary.as_ref().map_or(0, prost::Message::encoded_len) + 64;
        let budget = MAX_FRAME.saturating_sub(reserve);
        let mut frames = Vec::new();
        let mut cur = self.frame_to(to, Vec::new(), Vec::new());
        let items = ops
            .into_iter()
            .map(|o| (true, o))
            .chain(posts.into_iter().map(|p| (false, p)));
        for (is_op, item) in items {
            let size = prost::Message::encoded_len(&item) + 8;
            let empty = cur.frame.ops.is_empty() && cur.frame.posts.is_empty();
            if !empty && cur.frame.size() + size > budget {
                frames.push(std::mem::replace(
                    &mut cur,
                    self.frame_to(to, Vec::new(), Vec::new()),
                ));
            }
            if is_op {
                cur.frame.ops.push(item);
            } else {
                cur.frame.posts.push(item);
            }
        }
        cur.frame.summary = summary;
        cur.frame.answered = answered;
        frames.push(cur);
        frames
    }

    fn summary(&self) -> Summary {
        let heads: Vec<(PeerId, u64)> = self.contiguous.iter().map(|(a, s)| (*a, *s)).collect();
        Summary {
            mhead: self.head().to_vec(),
            heads: wire::heads(&heads),
        }
    }

    fn send_summary(&mut self, peer: PeerId, now_ms: u64, step: &mut Step) {
        let mut out = self.frame_to(peer, Vec::new(), Vec::new());
        out.frame.summary = Some(self.summary());
        step.out.push(out);
        let v = self.peers.entry(peer).or_default();
        v.last_summary_ms = Some(now_ms);
        v.summary_due = false;
    }

    /// A summary now, or at the next tick after the rate limit if one went
    /// out less than `SUMMARY_EVERY_MS` ago.
    fn maybe_summary(&mut self, peer: PeerId, now_ms: u64, step: &mut Step) {
        let last = self.peers.get(&peer).and_then(|v| v.last_summary_ms);
        if last.is_none_or(|t| now_ms.saturating_sub(t) >= SUMMARY_EVERY_MS) {
            self.send_summary(peer, now_ms, step);
        } else {
            self.peers.entry(peer).or_default().summary_due = true;
        }
    }

    /// How far `peer` is known to hold `author`'s posts.
    fn known_by(&self, peer: &PeerId, author: &PeerId) -> u64 {
        self.peers
            .get(peer)
            .and_then(|v| v.known.get(author))
            .copied()
            .unwrap_or(0)
    }

    /// Records that `peer` holds post `seq` of `author`.
    fn knows(&mut self, peer: PeerId, author: PeerId, seq: u64) {
        let k = self
            .peers
            .entry(peer)
            .or_default()
            .known
            .entry(author)
            .or_insert(0);
        *k = (*k).max(seq);
    }

    /// Whether `peer` said or signed it holds posts we lack.
    fn behind_claims(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|v| {
            v.claims.iter().any(|(a, s)| {
                self.owed_to_me(a, *s) && *s > self.contiguous.get(a).copied().unwrap_or(0)
            })
        })
    }

    /// Whether we are owed post `seq` of `author` (a member, after our
    /// base, and not after the author's last post that counts).
    fn owed_to_me(&self, author: &PeerId, seq: u64) -> bool {
        let state = self.state();
        state.owed(&self.me, author, seq) && state.gone.get(author).is_none_or(|last| seq <= *last)
    }

    fn answer_summary(&mut self, from: PeerId, summary: &Summary, now_ms: u64, step: &mut Step) {
        let (Ok(theirs), Ok(mhead)) = (wire::heads_of(summary), wire::mhead_of(summary)) else {
            step.events.push(Event::Alert(Alert::Forged {
                peer: from,
                why: WireError::Field("summary"),
            }));
            return;
        };
        let theirs: BTreeMap<PeerId, u64> = theirs.into_iter().collect();
        {
            let view = self.peers.entry(from).or_default();
            view.known = theirs.clone();
            for (a, s) in &theirs {
                let c = view.claims.entry(*a).or_insert(0);
                *c = (*c).max(*s);
            }
        }
        // Ops they lack: all but the ancestors of their head.
        let mut have: HashSet<Hash> = HashSet::new();
        let mut cur = Some(mhead);
        while let Some(h) = cur {
            match self.ops.get(&h) {
                Some((op, _)) if have.insert(h) && op.epoch > 0 => cur = Some(op.prev),
                _ => cur = None,
            }
        }
        let mut ops: Vec<&(Op, Signed)> = if have.is_empty() {
            self.ops.values().collect()
        } else {
            self.ops
                .values()
                .filter(|(o, _)| !have.contains(&o.hash))
                .collect()
        };
        ops.sort_by_key(|(o, _)| (o.epoch, o.hash));
        let ops: Vec<Signed> = ops.into_iter().map(|(_, s)| s.clone()).collect();
        // Posts they lack and are owed, by our membership and by the one the
        // post's author saw.
        let state = self.state();
        let mut posts = Vec::new();
        let mut sent = Vec::new();
        let authors: BTreeSet<PeerId> = self.posts.keys().map(|(a, _)| *a).collect();
        let lacking = authors.into_iter().filter(|a| *a != from).flat_map(|a| {
            let after = theirs.get(&a).copied().unwrap_or(0);
            self.posts
                .range((a, after.saturating_add(1))..=(a, u64::MAX))
        });
        for ((author, seq), p) in lacking {
            let author_knew_gone = self
                .states
                .get(&p.post.mhead)
                .is_some_and(|m| m.gone.contains_key(&from));
            if state.owed(&from, author, *seq) && !author_knew_gone {
                posts.push(p.signed.clone());
                sent.push((*author, *seq));
            }
        }
        // They hold something we lack (or a membership we do not know):
        // ask in return.
        let behind = theirs.iter().any(|(a, s)| {
            *s > self.contiguous.get(a).copied().unwrap_or(0) && self.owed_to_me(a, *s)
        }) || !self.ops.contains_key(&mhead);
        let summary = behind.then(|| self.summary());
        if behind {
            self.peers.entry(from).or_default().last_summary_ms = Some(now_ms);
        }
        if ops.is_empty() && posts.is_empty() && summary.is_none() {
            // Nothing they lack, nothing we lack: no answer.
            return;
        }
        for (a, s) in sent {
            self.knows(from, a, s);
            // They lacked it: they are not connected to its author (or
            // were not): relay that author's next posts to them at once.
            if a != self.me && self.relay_for.len() < MAX_MEMBERS * MAX_MEMBERS {
                self.relay_for.insert((from, a));
            }
        }
        step.out.extend(self.pack(from, ops, posts, summary, true));
    }

    fn check_withheld(&mut self, from: PeerId, step: &mut Step) {
        let claims = self
            .peers
            .get(&from)
            .map(|v| v.claims.clone())
            .unwrap_or_default();
        for (author, claimed) in claims {
            let have = self.contiguous.get(&author).copied().unwrap_or(0);
            if author == from || claimed <= have {
                continue;
            }
            let first = have + 1;
            // Held but waiting for its membership, or not owed: not withheld.
            let pending = self.posts.contains_key(&(author, first))
                || self
                    .waiting
                    .iter()
                    .any(|(_, p, _)| p.author == author && p.seq == first);
            if !pending && self.owed_to_me(&author, first) {
                step.events.push(Event::Alert(Alert::Withheld {
                    peer: from,
                    author,
                    seq: first,
                }));
            }
        }
        // Reported once per claim.
        if let Some(v) = self.peers.get_mut(&from) {
            v.claims.clear();
        }
    }

    /// Checks an op against its parent and keeps it (or holds it until its
    /// parent arrives).
    fn insert_op(&mut self, op: Op, s: Signed, from: Option<PeerId>, step: &mut Step) {
        if self.ops.len() >= MAX_OPS {
            if let Some(peer) = from {
                step.events.push(Event::Alert(Alert::BadChange {
                    peer,
                    why: Refused::TooManyOps,
                }));
            }
            return;
        }
        let Some(parent) = self.states.get(&op.prev) else {
            if self.orphans.iter().all(|(o, _)| o.hash != op.hash) {
                if self.orphans.len() >= MAX_ORPHAN_OPS {
                    self.orphans.pop_front();
                }
                self.orphans.push_back((op, s));
            }
            return;
        };
        match parent.apply(&op) {
            Ok(next) => {
                let hash = op.hash;
                self.children.entry(op.prev).or_default().push(hash);
                self.states.insert(hash, next);
                self.ops.insert(hash, (op, s));
                // Its children may be waiting.
                let ready: Vec<(Op, Signed)> = {
                    let (r, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.orphans)
                        .into_iter()
                        .partition(|(o, _)| o.prev == hash);
                    self.orphans = keep.into();
                    r
                };
                for (o, s) in ready {
                    self.insert_op(o, s, from, step);
                }
            }
            Err(why) => {
                self.invalid.insert(op.hash);
                if let Some(peer) = from {
                    step.events
                        .push(Event::Alert(Alert::BadChange { peer, why }));
                }
            }
        }
    }

    /// Picks the chain (from the genesis, the valid child with the smallest
    /// hash each time); re-issues the user's changes that lost; withdraws
    /// posts that no longer count.
    fn choose_chain(&mut self, now_ms: u64, step: &mut Step) {
        let mut chain = vec![self.id];
        let mut cur = self.id;
        while let Some(next) = self
            .children
            .get(&cur)
            .and_then(|c| c.iter().min().copied())
        {
            chain.push(next);
            cur = next;
        }
        if chain == self.chain {
            return;
        }
        let Some(current) = chain.last().and_then(|h| self.states.get(h)).cloned() else {
            return;
        };
        self.chain = chain;
        self.current = current;
        step.events.push(Event::Membership);
        self.recount(step);
        // The user's own changes that are not on the chain: re-issue those
        // that still apply.
        let on_chain: HashSet<Hash> = self.chain.iter().copied().collect();
        let lost: Vec<(Hash, Change)> = self
            .intents
            .iter()
            .filter(|(h, _)| !on_chain.contains(h))
            .cloned()
            .collect();
        if lost.is_empty() || !self.is_member() {
            return;
        }
        self.intents.retain(|(h, _)| on_chain.contains(h));
        for (_, change) in lost {
            match self
                .state()
                .apply(&probe(&self.me, self.state().epoch + 1, &change))
            {
                Ok(_) => {
                    if let Ok(h) = self.seal_change(&change, now_ms, step) {
                        self.intents.push((h, change));
                    }
                }
                // Someone else made the same change.
                Err(_) if self.already_applies(&change) => {}
                Err(why) => step.events.push(Event::Undone { why }),
            }
        }
    }

    fn already_applies(&self, change: &Change) -> bool {
        let s = self.state();
        match change {
            Change::Add { member, .. } => s.members.contains_key(member),
            Change::Remove { member, .. } => s.gone.contains_key(member),
            Change::Rename { name } => s.name == *name,
            Change::Leave { .. } | Change::Create { .. } => false,
        }
    }

    /// Recomputes the contiguous heads after the membership changed:
    /// posts that no longer count are withdrawn.
    fn recount(&mut self, step: &mut Step) {
        let state = self.state().clone();
        let mut withdrawn = Vec::new();
        for ((author, seq), p) in &self.posts {
            if state.gone.get(author).is_some_and(|last| *seq > *last) {
                withdrawn.push((*author, *seq, p.delivered));
            }
        }
        for (author, seq, shown) in withdrawn {
            self.posts.remove(&(author, seq));
            if shown {
                step.events.push(Event::Withdrawn { author, seq });
            }
        }
        self.advance_all(step);
    }

    fn base_of(&self, author: &PeerId) -> u64 {
        self.state()
            .members
            .get(&self.me)
            .and_then(|m| m.base.get(author).copied())
            .unwrap_or(0)
    }

    fn advance_all(&mut self, step: &mut Step) {
        let authors: BTreeSet<PeerId> = self.posts.keys().map(|(a, _)| *a).collect();
        for a in authors {
            self.advance(a, step);
        }
    }

    /// Moves an author's contiguous head forward, delivering each post once.
    fn advance(&mut self, author: PeerId, step: &mut Step) {
        let base = self.base_of(&author);
        let mut head = self.contiguous.get(&author).copied().unwrap_or(0).max(base);
        while let Some(p) = self.posts.get_mut(&(author, head + 1)) {
            head += 1;
            if !p.delivered {
                p.delivered = true;
                step.events.push(Event::Post {
                    author,
                    seq: head,
                    body: p.post.body.clone(),
                    at_ms: p.post.at_ms,
                });
            }
        }
        if head > 0 {
            self.contiguous.insert(author, head);
        }
    }

    /// Checks a verified post against the logs and keeps it.
    fn accept_post(&mut self, from: PeerId, post: Post, s: Signed, now_ms: u64, step: &mut Step) {
        let author = post.author;
        let seq = post.seq;
        // Its membership must be known: hold it until the ops arrive.
        let Some(m) = self.states.get(&post.mhead) else {
            if !self.invalid.contains(&post.mhead) {
                if self.waiting.len() >= MAX_WAITING {
                    self.waiting.pop_front();
                }
                self.waiting.push_back((from, post, s));
            }
            return;
        };
        if !m.members.contains_key(&author) {
            step.events.push(Event::Alert(Alert::BadChange {
                peer: from,
                why: Refused::NotMember,
            }));
            return;
        }
        if !self.owed_to_me(&author, seq) && author != self.me {
            return;
        }
        if author == self.me && seq <= self.base_of(&author) {
            return;
        }
        let have = self.contiguous.get(&author).copied().unwrap_or(0);
        if seq > have + MAX_AHEAD {
            return;
        }
        if let Some(old) = self.posts.get(&(author, seq)) {
            if old.post.hash != post.hash {
                step.events
                    .push(Event::Alert(Alert::Equivocation { author }));
            }
            return;
        }
        if seq <= have {
            // Already delivered and since pruned: nothing to do.
            return;
        }
        let prev_ok = self
            .posts
            .get(&(author, seq - 1))
            .is_none_or(|p| p.post.hash == post.prev);
        let next_ok = self
            .posts
            .get(&(author, seq + 1))
            .is_none_or(|p| p.post.prev == post.hash);
        if !prev_ok || !next_ok {
            step.events
                .push(Event::Alert(Alert::Equivocation { author }));
            return;
        }
        // A member who writes faster than anyone types is refused beyond a
        // burst (what is refused comes again with the next sync, slowly).
        if author != self.me && from != self.me && !self.flood_allows(author, now_ms, step) {
            return;
        }
        // What the author signed it had read, when it comes from the author
        // itself (before any answer it sends next): a claim it must honour.
        if author != self.me && from == author {
            let view = self.peers.entry(author).or_default();
            for (a, s) in &post.seen {
                let c = view.claims.entry(*a).or_insert(0);
                *c = (*c).max(*s);
            }
        }
        self.posts.insert(
            (author, seq),
            StoredPost {
                post,
                signed: s,
                delivered: author == self.me,
            },
        );
        self.advance(author, step);
    }

    /// One token per new post of `author`: `FLOOD_BURST`, refilled at
    /// `FLOOD_PER_SEC`. Reports a flood once a minute per author.
    fn flood_allows(&mut self, author: PeerId, now_ms: u64, step: &mut Step) -> bool {
        let b = self.flood.entry(author).or_insert(Bucket {
            tokens: FLOOD_BURST,
            at_ms: now_ms,
            reported_ms: None,
        });
        let dt = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + dt * FLOOD_PER_SEC).min(FLOOD_BURST);
        b.at_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return true;
        }
        if b.reported_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= 60_000)
        {
            b.reported_ms = Some(now_ms);
            step.events.push(Event::Alert(Alert::Flood { author }));
        }
        false
    }

    fn retry_waiting(&mut self, now_ms: u64, step: &mut Step) {
        let ready: Vec<(PeerId, Post, Signed)> = {
            let (r, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
                .into_iter()
                .partition(|(_, p, _)| {
                    self.states.contains_key(&p.mhead) || self.invalid.contains(&p.mhead)
                });
            self.waiting = keep.into();
            r
        };
        for (from, p, s) in ready {
            self.accept_post(from, p, s, now_ms, step);
        }
    }
}

fn check_name(name: &str) -> Result<(), ActionError> {
    let n = name.trim().chars().count();
    if n == 0 || n > wire::MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(ActionError::Name);
    }
    Ok(())
}

/// An unsigned op for checking whether a change still applies.
fn probe(author: &PeerId, epoch: u64, change: &Change) -> Op {
    Op {
        hash: ZERO,
        group: ZERO,
        epoch,
        prev: ZERO,
        author: *author,
        change: change.clone(),
        at_ms: 0,
    }
}
