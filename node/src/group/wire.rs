//! The group wire format: protobuf messages (prost), each signed item as
//! `Signed { body, sig }` where `sig` is Ed25519 by the author's identity
//! key over a domain label and the body. Decoders check presence, sizes and
//! keys; nothing here trusts the sender.

use sha2::{Digest as _, Sha256};
use transport::identity::{PeerId, SecretKey};

/// A SHA-256 hash: an op's or a post's name.
pub type Hash = [u8; 32];

/// The all-zero hash: "no previous item".
pub const ZERO: Hash = [0; 32];

/// Domain label of membership ops.
const OP_DOMAIN: &[u8] = b"coterie group op v1\0";
/// Domain label of posts.
const POST_DOMAIN: &[u8] = b"coterie group post v1\0";

/// Longest group name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Largest post body, in bytes.
pub const MAX_BODY: usize = 16 * 1024;
/// Most members of a group.
pub const MAX_MEMBERS: usize = 64;
/// Largest frame, in bytes: base64 inside an OMEMO message it stays under
/// the stream's 64 KiB stanza limit. Senders cut their frames to fit.
pub const MAX_FRAME: usize = 40 * 1024;

/// A signed item as it travels and as it is stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Signed {
    /// The encoded `OpBody` or `PostBody`.
    #[prost(bytes = "vec", tag = "1")]
    pub body: Vec<u8>,
    /// Ed25519 signature over the domain label and `body`.
    #[prost(bytes = "vec", tag = "2")]
    pub sig: Vec<u8>,
}

/// A membership change.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OpBody {
    /// The group (the genesis op's hash); empty in the genesis op.
    #[prost(bytes = "vec", tag = "1")]
    pub group: Vec<u8>,
    /// 0 for the genesis op, the parent's epoch + 1 otherwise.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// The parent op's hash; empty in the genesis op.
    #[prost(bytes = "vec", tag = "3")]
    pub prev: Vec<u8>,
    /// The author's identity key.
    #[prost(bytes = "vec", tag = "4")]
    pub author: Vec<u8>,
    /// What changes: see `OpKind`.
    #[prost(uint32, tag = "5")]
    pub kind: u32,
    /// The member added or removed.
    #[prost(bytes = "vec", tag = "6")]
    pub member: Vec<u8>,
    /// The group's name (create, rename).
    #[prost(string, tag = "7")]
    pub name: String,
    /// The last post of the member who leaves or is removed that counts.
    #[prost(uint64, tag = "8")]
    pub last_seq: u64,
    /// Whether the added member is an admin.
    #[prost(bool, tag = "9")]
    pub admin: bool,
    /// The author's clock, milliseconds since the epoch (informational).
    #[prost(uint64, tag = "10")]
    pub at_ms: u64,
    /// Random bytes in the genesis op (two groups never share a name).
    #[prost(bytes = "vec", tag = "11")]
    pub nonce: Vec<u8>,
    /// For an added member: how far the adder had read each author; the
    /// new member is owed only the posts after these.
    #[prost(message, repeated, tag = "12")]
    pub base: Vec<Head>,
}

/// A message in a group.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PostBody {
    /// The group.
    #[prost(bytes = "vec", tag = "1")]
    pub group: Vec<u8>,
    /// The author's identity key.
    #[prost(bytes = "vec", tag = "2")]
    pub author: Vec<u8>,
    /// The author's post counter, from 1.
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    /// The hash of the author's previous post (empty for seq 1).
    #[prost(bytes = "vec", tag = "4")]
    pub prev: Vec<u8>,
    /// The membership the author saw (the head op's hash).
    #[prost(bytes = "vec", tag = "5")]
    pub mhead: Vec<u8>,
    /// How far the author had read each member's posts.
    #[prost(message, repeated, tag = "6")]
    pub seen: Vec<Head>,
    /// The text.
    #[prost(bytes = "vec", tag = "7")]
    pub body: Vec<u8>,
    /// The author's clock, milliseconds since the epoch (informational).
    #[prost(uint64, tag = "8")]
    pub at_ms: u64,
}

/// How far someone has a member's posts (contiguously, from 1).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Head {
    /// The member's identity key.
    #[prost(bytes = "vec", tag = "1")]
    pub author: Vec<u8>,
    /// The highest seq held with every earlier one.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
}

/// What a node holds of a group, sent when two members meet.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// Its membership head.
    #[prost(bytes = "vec", tag = "1")]
    pub mhead: Vec<u8>,
    /// Its contiguous heads, one per author it has posts of.
    #[prost(message, repeated, tag = "2")]
    pub heads: Vec<Head>,
}

/// One unit of group traffic between two members (inside their OMEMO
/// session: every hop sees only ciphertext).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    /// The group.
    #[prost(bytes = "vec", tag = "1")]
    pub group: Vec<u8>,
    /// Membership ops, parents before children.
    #[prost(message, repeated, tag = "2")]
    pub ops: Vec<Signed>,
    /// Posts, each author's in seq order.
    #[prost(message, repeated, tag = "3")]
    pub posts: Vec<Signed>,
    /// The sender's summary: the receiver answers with what the sender lacks.
    #[prost(message, optional, tag = "4")]
    pub summary: Option<Summary>,
    /// The sender has answered the receiver's summary in full (a member
    /// that then still lacks what the sender signed it had was withheld).
    #[prost(bool, tag = "5")]
    pub answered: bool,
    /// Set by an author on its own new post when it sent the post to every
    /// other member directly: the receivers tell the others at the next
    /// tick rather than at once (honoured only in a frame from the author
    /// itself).
    #[prost(bool, tag = "6")]
    pub to_all: bool,
}

/// The kinds of membership op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// The genesis op: the author is the first member and admin.
    Create = 1,
    /// An admin adds a member.
    Add = 2,
    /// An admin removes a member.
    Remove = 3,
    /// A member leaves.
    Leave = 4,
    /// An admin renames the group.
    Rename = 5,
}

impl OpKind {
    fn from_u32(v: u32) -> Option<OpKind> {
        Some(match v {
            1 => OpKind::Create,
            2 => OpKind::Add,
            3 => OpKind::Remove,
            4 => OpKind::Leave,
            5 => OpKind::Rename,
            _ => return None,
        })
    }
}

/// Why an item from a peer is refused. Never includes identifiers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not valid protobuf.
    #[error("undecodable group item")]
    Decode,
    /// A key that is not a valid Ed25519 public key.
    #[error("invalid member key")]
    Key,
    /// The signature does not verify.
    #[error("bad signature")]
    Signature,
    /// A field out of range (hash length, name, body size, kind).
    #[error("malformed group item: {0}")]
    Field(&'static str),
}

fn hash_of(domain: &[u8], body: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(domain);
    h.update(body);
    h.finalize().into()
}

fn sign(key: &SecretKey, domain: &[u8], body: Vec<u8>) -> Signed {
    let mut msg = Vec::with_capacity(domain.len() + body.len());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(&body);
    Signed {
        sig: key.sign(&msg).to_vec(),
        body,
    }
}

fn verify(author: &PeerId, domain: &[u8], s: &Signed) -> Result<(), WireError> {
    let sig: [u8; 64] = s
        .sig
        .as_slice()
        .try_into()
        .map_err(|_| WireError::Signature)?;
    let mut msg = Vec::with_capacity(domain.len() + s.body.len());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(&s.body);
    if author.verify(&msg, &sig) {
        Ok(())
    } else {
        Err(WireError::Signature)
    }
}

fn key(b: &[u8]) -> Result<PeerId, WireError> {
    let a: [u8; 32] = b.try_into().map_err(|_| WireError::Key)?;
    PeerId::from_bytes(a).map_err(|_| WireError::Key)
}

fn hash_field(b: &[u8], what: &'static str) -> Result<Hash, WireError> {
    b.try_into().map_err(|_| WireError::Field(what))
}

fn check_name(name: &str) -> Result<(), WireError> {
    let n = name.chars().count();
    if n == 0 || n > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(WireError::Field("name"));
    }
    Ok(())
}

/// A verified membership op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Its name.
    pub hash: Hash,
    /// The group (its own hash for the genesis op).
    pub group: Hash,
    /// Its epoch.
    pub epoch: u64,
    /// Its parent (`ZERO` for genesis).
    pub prev: Hash,
    /// Who signed it.
    pub author: PeerId,
    /// What it does.
    pub change: Change,
    /// The author's clock.
    pub at_ms: u64,
}

/// What an op changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new group with this name.
    Create {
        /// The name.
        name: String,
    },
    /// A member joins.
    Add {
        /// Who.
        member: PeerId,
        /// As an admin.
        admin: bool,
        /// The posts before the member joined: they are owed those after.
        base: Vec<(PeerId, u64)>,
    },
    /// A member is removed; their posts after `last_seq` do not count.
    Remove {
        /// Who.
        member: PeerId,
        /// Their last post that counts.
        last_seq: u64,
    },
    /// The author leaves after their post `last_seq`.
    Leave {
        /// Their last post.
        last_seq: u64,
    },
    /// A new name.
    Rename {
        /// The name.
        name: String,
    },
}

impl Op {
    /// Decodes and verifies a signed op.
    pub fn open(s: &Signed) -> Result<Op, WireError> {
        let b =
            <OpBody as prost::Message>::decode(s.body.as_slice()).map_err(|_| WireError::Decode)?;
        let author = key(&b.author)?;
        verify(&author, OP_DOMAIN, s)?;
        let hash = hash_of(OP_DOMAIN, &s.body);
        let kind = OpKind::from_u32(b.kind).ok_or(WireError::Field("kind"))?;
        let (group, prev) = if kind == OpKind::Create {
            if !b.group.is_empty() || !b.prev.is_empty() || b.epoch != 0 {
                return Err(WireError::Field("genesis"));
            }
            if b.nonce.len() != 16 {
                return Err(WireError::Field("nonce"));
            }
            (hash, ZERO)
        } else {
            if b.epoch == 0 {
                return Err(WireError::Field("epoch"));
            }
            (hash_field(&b.group, "group")?, hash_field(&b.prev, "prev")?)
        };
        let change = match kind {
            OpKind::Create => {
                check_name(&b.name)?;
                Change::Create { name: b.name }
            }
            OpKind::Add => {
                if b.base.len() > MAX_MEMBERS * 2 {
                    return Err(WireError::Field("base"));
                }
                Change::Add {
                    member: key(&b.member)?,
                    admin: b.admin,
                    base: b
                        .base
                        .iter()
                        .map(|h| Ok((key(&h.author)?, h.seq)))
                        .collect::<Result<Vec<_>, WireError>>()?,
                }
            }
            OpKind::Remove => Change::Remove {
                member: key(&b.member)?,
                last_seq: b.last_seq,
            },
            OpKind::Leave => Change::Leave {
                last_seq: b.last_seq,
            },
            OpKind::Rename => {
                check_name(&b.name)?;
                Change::Rename { name: b.name }
            }
        };
        Ok(Op {
            hash,
            group,
            epoch: b.epoch,
            prev,
            author,
            change,
            at_ms: b.at_ms,
        })
    }

    /// Signs a new op. `group`/`prev` are ignored for `Create`.
    pub fn seal(
        key: &SecretKey,
        group: &Hash,
        epoch: u64,
        prev: &Hash,
        change: &Change,
        at_ms: u64,
    ) -> Signed {
        let mut b = OpBody {
            author: key.peer_id().as_bytes().to_vec(),
            at_ms,
            ..OpBody::default()
        };
        match change {
            Change::Create { name } => {
                b.kind = OpKind::Create as u32;
                b.name = name.clone();
                b.nonce = rand::random::<[u8; 16]>().to_vec();
            }
            other => {
                b.group = group.to_vec();
                b.epoch = epoch;
                b.prev = prev.to_vec();
                match other {
                    Change::Create { .. } => {}
                    Change::Add {
                        member,
                        admin,
                        base,
                    } => {
                        b.kind = OpKind::Add as u32;
                        b.member = member.as_bytes().to_vec();
                        b.admin = *admin;
                        b.base = heads(base);
                    }
                    Change::Remove { member, last_seq } => {
                        b.kind = OpKind::Remove as u32;
                        b.member = member.as_bytes().to_vec();
                        b.last_seq = *last_seq;
                    }
                    Change::Leave { last_seq } => {
                        b.kind = OpKind::Leave as u32;
                        b.last_seq = *last_seq;
                    }
                    Change::Rename { name } => {
                        b.kind = OpKind::Rename as u32;
                        b.name = name.clone();
                    }
                }
            }
        }
        sign(key, OP_DOMAIN, prost::Message::encode_to_vec(&b))
    }
}

/// A verified post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    /// Its name.
    pub hash: Hash,
    /// The group.
    pub group: Hash,
    /// Who wrote it.
    pub author: PeerId,
    /// The author's counter.
    pub seq: u64,
    /// The author's previous post (`ZERO` for seq 1).
    pub prev: Hash,
    /// The membership the author saw.
    pub mhead: Hash,
    /// How far the author had read each author.
    pub seen: Vec<(PeerId, u64)>,
    /// The text.
    pub body: Vec<u8>,
    /// The author's clock.
    pub at_ms: u64,
}

impl Post {
    /// Decodes and verifies a signed post.
    pub fn open(s: &Signed) -> Result<Post, WireError> {
        let b = <PostBody as prost::Message>::decode(s.body.as_slice())
            .map_err(|_| WireError::Decode)?;
        let author = key(&b.author)?;
        verify(&author, POST_DOMAIN, s)?;
        if b.seq == 0 {
            return Err(WireError::Field("seq"));
        }
        if b.body.len() > MAX_BODY {
            return Err(WireError::Field("body too large"));
        }
        if b.seen.len() > MAX_MEMBERS * 2 {
            return Err(WireError::Field("seen"));
        }
        let prev = if b.seq == 1 {
            if !b.prev.is_empty() {
                return Err(WireError::Field("prev"));
            }
            ZERO
        } else {
            hash_field(&b.prev, "prev")?
        };
        let seen = b
            .seen
            .iter()
            .map(|h| Ok((key(&h.author)?, h.seq)))
            .collect::<Result<Vec<_>, WireError>>()?;
        Ok(Post {
            hash: hash_of(POST_DOMAIN, &s.body),
            group: hash_field(&b.group, "group")?,
            author,
            seq: b.seq,
            prev,
            mhead: hash_field(&b.mhead, "mhead")?,
            seen,
            body: b.body,
            at_ms: b.at_ms,
        })
    }

    /// Signs a new post.
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        key: &SecretKey,
        group: &Hash,
        seq: u64,
        prev: &Hash,
        mhead: &Hash,
        seen: &[(PeerId, u64)],
        body: &[u8],
        at_ms: u64,
    ) -> Signed {
        let b = PostBody {
            group: group.to_vec(),
            author: key.peer_id().as_bytes().to_vec(),
            seq,
            prev: if seq == 1 { Vec::new() } else { prev.to_vec() },
            mhead: mhead.to_vec(),
            seen: heads(seen),
            body: body.to_vec(),
            at_ms,
        };
        sign(key, POST_DOMAIN, prost::Message::encode_to_vec(&b))
    }
}

impl Frame {
    /// Decodes a frame, refusing one over `MAX_FRAME`.
    pub fn decode(bytes: &[u8]) -> Result<Frame, WireError> {
        if bytes.len() > MAX_FRAME {
            return Err(WireError::Field("frame too large"));
        }
        <Frame as prost::Message>::decode(bytes).map_err(|_| WireError::Decode)
    }

    /// Encodes the frame.
    pub fn encode(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(self)
    }

    /// Its encoded size.
    pub fn size(&self) -> usize {
        prost::Message::encoded_len(self)
    }
}

/// Encodes heads.
pub fn heads(v: &[(PeerId, u64)]) -> Vec<Head> {
    v.iter()
        .map(|(a, s)| Head {
            author: a.as_bytes().to_vec(),
            seq: *s,
        })
        .collect()
}

/// Decodes a summary's heads, dropping none silently: a bad key fails it.
pub fn heads_of(s: &Summary) -> Result<Vec<(PeerId, u64)>, WireError> {
    if s.heads.len() > MAX_MEMBERS * 2 {
        return Err(WireError::Field("heads"));
    }
    s.heads
        .iter()
        .map(|h| Ok((key(&h.author)?, h.seq)))
        .collect()
}

/// A summary's membership head.
pub fn mhead_of(s: &Summary) -> Result<Hash, WireError> {
    hash_field(&s.mhead, "mhead")
}
