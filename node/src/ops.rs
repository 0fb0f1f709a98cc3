//! What the user can ask of a profile, independent of whether a node is
//! running. The CLI calls these directly on the store when no node runs; the
//! node calls them when a request arrives on its control socket.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use transport::{PeerAddr, PeerId, SecretKey};

use crate::invite::{Invite, InviteError, parse_ttl, valid_name};
use crate::store::{
    Contact, ContactState, Delivery, Direction, IssuedInvite, Message, Store, StoreError,
};

/// Longest message body accepted from the user, in bytes.
pub const MAX_BODY: usize = 16 * 1024;
/// Largest escaped body we queue: encrypted (XEP-0420 envelope, AES-CBC,
/// base64, keys for a dozen devices) it stays under the receiver's 64 KiB
/// stanza limit.
const MAX_STANZA_FOR_BODY: usize = 40 * 1024;

/// Why an operation failed; each variant maps to a documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No contact matches.
    #[error("no contact matches `{0}` (see `coterie contacts`)")]
    NoSuchContact(String),
    /// Several contacts match.
    #[error("`{0}` matches {1} contacts; use a longer fingerprint prefix")]
    Ambiguous(String, usize),
    /// The invite is unusable.
    #[error(transparent)]
    Invite(#[from] InviteError),
    /// Bad user input.
    #[error("{0}")]
    Usage(String),
    /// The contact is already known.
    #[error("you already have this contact, as `{0}`")]
    AlreadyContact(String),
}

impl OpError {
    /// The process exit code for this error (see README, "Exit codes").
    pub fn exit_code(&self) -> i32 {
        match self {
            OpError::Store(_) => 1,
            OpError::Usage(_) => 2,
            OpError::NoSuchContact(_) | OpError::Ambiguous(..) => 5,
            OpError::Invite(_) | OpError::AlreadyContact(_) => 6,
        }
    }
}

/// Own identity, for `coterie id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdView {
    /// `NAME@<onion>.onion`
    pub jid: String,
    /// The onion address.
    pub onion: String,
    /// Fingerprint in groups.
    pub fingerprint: String,
}

/// A contact, for `coterie contacts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactView {
    /// Local name.
    pub name: String,
    /// `NAME@<onion>.onion` as they call themselves... here: their onion JID.
    pub jid: String,
    /// Their fingerprint.
    pub fingerprint: String,
    /// `connected`, `offline`, or `pending` (invite not yet redeemed).
    pub state: String,
    /// Carrier of the live or last session.
    pub transport: Option<String>,
    /// Unix seconds of the last session.
    pub last_seen: Option<u64>,
    /// Stanzas waiting for their ack.
    pub queued: u64,
    /// A classic XEP-0174 client: chats with it are not encrypted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cleartext: bool,
    /// A friend on ordinary XMPP, reached through the bridge account.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bridged: bool,
}

/// A message, for `coterie history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// Per-contact sequence.
    pub seq: u64,
    /// `out` or `in`.
    pub dir: String,
    /// Text.
    pub body: String,
    /// Unix milliseconds.
    pub ts: u64,
    /// `queued`, `sent`, `delivered`, `received`.
    pub state: String,
    /// Incoming: sent by a device of the contact that is not verified.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unverified: bool,
    /// Incoming: could not be decrypted, and why (the body is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undecryptable: Option<String>,
    /// Sent or received in the clear (a classic XEP-0174 contact).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cleartext: bool,
}

/// An OMEMO device, for `coterie fingerprints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Device id.
    pub device: u32,
    /// Identity fingerprint (Curve25519 form, as other OMEMO clients show it).
    pub fingerprint: String,
    /// `pinned` (the invite's key), `verified`, `untrusted`, or `own`.
    pub trust: String,
    /// OMEMO versions it published bundles for.
    pub versions: Vec<String>,
}

/// Devices of a contact and our own, for `coterie fingerprints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintsView {
    /// The contact's name.
    pub contact: String,
    /// Our device.
    pub own: DeviceView,
    /// Theirs.
    pub devices: Vec<DeviceView>,
}

impl From<&Message> for MessageView {
    fn from(m: &Message) -> Self {
        MessageView {
            seq: m.seq,
            dir: if m.dir == Direction::Out {
                "out".into()
            } else {
                "in".into()
            },
            body: m.body.clone(),
            ts: m.ts,
            state: m.state.as_str().into(),
            unverified: m.unverified,
            undecryptable: m.undecryptable.clone(),
            cleartext: false,
        }
    }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The profile's secret key.
pub fn secret_key(store: &Store) -> Result<SecretKey, OpError> {
    Ok(SecretKey::from_seed(&store.profile()?.seed))
}

/// `coterie id`
pub fn id(store: &Store) -> Result<IdView, OpError> {
    let p = store.profile()?;
    let peer = SecretKey::from_seed(&p.seed).peer_id();
    Ok(IdView {
        jid: format!("{}@{}", p.name, peer.onion_address()),
        onion: peer.onion_address(),
        fingerprint: peer.fingerprint(),
    })
}

/// `coterie invite`: issues and records a single-use invite.
pub fn invite(store: &Store, ttl: &str, addrs: &[PeerAddr], now: u64) -> Result<String, OpError> {
    invite_for(store, ttl, addrs, now, None, None)
}

/// An invite that also adds whoever redeems it to `group` (hex id), usable
/// `uses` times (a meeting room's QR code) or once.
pub fn invite_for(
    store: &Store,
    ttl: &str,
    addrs: &[PeerAddr],
    now: u64,
    group: Option<String>,
    uses: Option<u32>,
) -> Result<String, OpError> {
    if uses.is_some_and(|u| u == 0 || u > 500) {
        return Err(OpError::Usage("--uses must be 1 to 500".into()));
    }
    let secs = parse_ttl(ttl).ok_or_else(|| {
        OpError::Usage(format!(
            "invalid --ttl `{ttl}`: use a number followed by s, m, h, d or w (for example 7d)"
        ))
    })?;
    if secs > 90 * 86400 {
        return Err(OpError::Usage(
            "--ttl may be at most 90d: an invite is a secret; keep its life short".into(),
        ));
    }
    let p = store.profile()?;
    let key = SecretKey::from_seed(&p.seed);
    let inv = IssuedInvite {
        invite_id: rand::random(),
        secret: rand::random(),
        expires: now + secs,
        used: false,
        redeemed_by: None,
        group,
        uses_left: uses,
        redeemers: Vec::new(),
    };
    store.add_invite(&inv)?;
    Ok(Invite::issue(
        &key,
        &p.name,
        inv.invite_id,
        inv.secret,
        inv.expires,
        addrs,
    ))
}

/// `coterie add URI`: pins the inviter and remembers the secret to redeem;
/// or, for `xmpp:friend@example.org` (no invite in it), adds a friend on
/// ordinary XMPP, reached through the bridge.
pub fn add(store: &Store, uri: &str, name: Option<&str>, now: u64) -> Result<ContactView, OpError> {
    if !uri.contains('?') && uri.trim().starts_with("xmpp:") {
        return add_bridged(store, uri, name, now);
    }
    let inv = Invite::parse(uri, now)?;
    let me = secret_key(store)?.peer_id();
    if inv.inviter == me {
        return Err(InviteError::OwnInvite.into());
    }
    if let Some(c) = store
        .contacts()?
        .into_iter()
        .find(|c| c.peer == *inv.inviter.as_bytes())
    {
        return Err(OpError::AlreadyContact(c.name));
    }
    let name = name.unwrap_or(&inv.name).to_string();
    if !valid_name(&name) {
        return Err(OpError::Usage(
            "contact names are 1-64 characters without control characters, @, /, quotes, <, > or &"
                .into(),
        ));
    }
    let c = Contact {
        id: 0,
        name,
        peer: *inv.inviter.as_bytes(),
        addrs: inv.addrs.iter().map(|a| a.to_string()).collect(),
        state: ContactState::Redeeming {
            invite_id: inv.id,
            secret: inv.secret,
        },
        added: now,
        last_seen: None,
        last_carrier: None,
    };
    let id = store.add_contact(c)?;
    let c = store
        .contact(id)?
        .ok_or_else(|| OpError::NoSuchContact(id.to_string()))?;
    view(store, &c, None)
}

fn add_bridged(
    store: &Store,
    uri: &str,
    name: Option<&str>,
    now: u64,
) -> Result<ContactView, OpError> {
    let jid = crate::bridge::parse_account_jid(uri)
        .map_err(|_| {
            OpError::Usage(format!(
                "{uri:?} is neither an invite nor an XMPP address: give a friend on XMPP as xmpp:friend@example.org"
            ))
        })?
        .to_string();
    let contacts = store.contacts()?;
    if let Some(c) = contacts
        .iter()
        .find(|c| matches!(&c.state, ContactState::Bridged { jid: j } if *j == jid))
    {
        return Err(OpError::AlreadyContact(c.name.clone()));
    }
    if store.profile()?.bridge.is_some_and(|a| a.jid == jid) {
        return Err(OpError::Usage("that is your own bridge account".into()));
    }
    let name = name
        .map(str::to_owned)
        .unwrap_or_else(|| jid.split('@').next().unwrap_or(&jid).to_owned());
    if !valid_name(&name) {
        return Err(OpError::Usage(
            "contact names are 1-64 characters without control characters, @, /, quotes, <, > or &"
                .into(),
        ));
    }
    if contacts.iter().any(|c| c.name == name) {
        return Err(OpError::Usage(format!(
            "you already have a contact called {name}; choose another with --name"
        )));
    }
    let peer: [u8; 32] = sha2::Sha256::digest(format!("xmpp:{jid}").as_bytes()).into();
    let c = Contact {
        id: 0,
        name,
        peer,
        addrs: Vec::new(),
        state: ContactState::Bridged { jid },
        added: now,
        last_seen: None,
        last_carrier: None,
    };
    let id = store.add_contact(c)?;
    let c = store
        .contact(id)?
        .ok_or_else(|| OpError::NoSuchContact(id.to_string()))?;
    view(store, &c, None)
}

/// The live state of a contact, as the node knows it.
pub type Live<'a> = Option<&'a str>;

/// A contact as shown to the user; `live` is the carrier of a live session.
pub fn view(store: &Store, c: &Contact, live: Live<'_>) -> Result<ContactView, OpError> {
    if let ContactState::Bridged { jid } = &c.state {
        return Ok(ContactView {
            name: c.name.clone(),
            jid: jid.clone(),
            fingerprint: String::new(),
            state: "bridged".into(),
            transport: Some("bridge".into()),
            last_seen: c.last_seen,
            queued: store.outbox_len(c.id)?,
            cleartext: false,
            bridged: true,
        });
    }
    if let ContactState::Cleartext { instance } = &c.state {
        return Ok(ContactView {
            name: c.name.clone(),
            jid: instance.clone(),
            fingerprint: String::new(),
            state: if live.is_some() {
                "connected"
            } else {
                "offline"
            }
            .into(),
            transport: live.map(str::to_string).or_else(|| c.last_carrier.clone()),
            last_seen: c.last_seen,
            queued: store.outbox_len(c.id)?,
            cleartext: true,
            bridged: false,
        });
    }
    let peer = PeerId::from_bytes(c.peer).map_err(|e| OpError::Usage(e.to_string()))?;
    let state = match (&c.state, live) {
        (ContactState::Redeeming { .. }, _) => "pending",
        (ContactState::Refused { .. }, _) => "refused",
        (_, Some(_)) => "connected",
        _ => "offline",
    };
    Ok(ContactView {
        name: c.name.clone(),
        jid: peer.onion_address(),
        fingerprint: peer.fingerprint(),
        state: state.into(),
        transport: live.map(str::to_string).or_else(|| c.last_carrier.clone()),
        last_seen: c.last_seen,
        queued: store.outbox_len(c.id)?,
        cleartext: false,
        bridged: false,
    })
}

/// Finds a contact by name (case-insensitive) or fingerprint prefix (at least 4 hex digits).
pub fn find_contact(store: &Store, sel: &str) -> Result<Contact, OpError> {
    let all = store.contacts()?;
    let by_name: Vec<&Contact> = all
        .iter()
        .filter(|c| c.name.eq_ignore_ascii_case(sel))
        .collect();
    if by_name.len() == 1 {
        return Ok(by_name[0].clone());
    }
    let hex: String = sel
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let by_fp: Vec<&Contact> = if hex.len() >= 4 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        all.iter()
            .filter(|c| {
                PeerId::from_bytes(c.peer)
                    .map(|p| p.fingerprint_compact().starts_with(&hex))
                    .unwrap_or(false)
            })
            .collect()
    } else {
        Vec::new()
    };
    match (by_name.len(), by_fp.len()) {
        (_, 1) => Ok(by_fp[0].clone()),
        (0, 0) => Err(OpError::NoSuchContact(sel.to_string())),
        (n, m) => Err(OpError::Ambiguous(sel.to_string(), n.max(m))),
    }
}

/// What `coterie remove` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedView {
    /// The contact's local name.
    pub removed: String,
    /// Messages deleted with it (history and queue).
    pub messages: u64,
}

/// `coterie remove`: forgets a contact and everything kept for it. Their
/// node is refused from then on (TLS policy, gate, onion descriptor).
pub fn remove(store: &Store, sel: &str) -> Result<(u64, RemovedView), OpError> {
    let c = find_contact(store, sel)?;
    let messages = store.history(c.id, usize::MAX)?.len() as u64 + store.outbox_len(c.id)?;
    store.remove_contact(c.id)?;
    Ok((
        c.id,
        RemovedView {
            removed: c.name,
            messages,
        },
    ))
}

/// `coterie send`: stores the message durably and queues it.
pub fn send(
    store: &Store,
    sel: &str,
    text: &str,
    now_ms: u64,
    omemo: Option<&crate::store::OwnOmemo>,
) -> Result<(Contact, MessageView), OpError> {
    if text.is_empty() {
        return Err(OpError::Usage("the message is empty".into()));
    }
    if text.len() > MAX_BODY {
        return Err(OpError::Usage(format!(
            "the message is {} bytes; the limit is {MAX_BODY}",
            text.len()
        )));
    }
    if !crate::stream::session::is_xml_text(text) {
        return Err(OpError::Usage(
            "the message contains control characters that cannot be sent; remove them and try again".into(),
        ));
    }
    // The receiver's limit applies to the escaped stanza (`&` is 5 bytes on the wire).
    let wire = crate::stream::session::encode_chat("m18446744073709551615.ffffffff", text)
        .map(|v| v.len());
    if wire.is_none_or(|n| n > MAX_STANZA_FOR_BODY) {
        return Err(OpError::Usage(
            "the message has too many characters that XML must escape (& < >); shorten it".into(),
        ));
    }
    let c = find_contact(store, sel)?;
    if matches!(c.state, ContactState::Cleartext { .. }) {
        // The user chose the dangerous compatibility mode for this peer; the
        // message is marked cleartext in `history`.
        let m = store.queue_outgoing(c.id, text, now_ms)?;
        let mut v = MessageView::from(&m);
        v.cleartext = true;
        return Ok((c, v));
    }
    if matches!(c.state, ContactState::Bridged { .. }) {
        // The bridge encrypts when it sends (it knows the friend's devices).
        let m = store.queue_outgoing(c.id, text, now_ms)?;
        return Ok((c, MessageView::from(&m)));
    }
    // With a running node the message is encrypted as it is queued; the
    // CLI without a node leaves that to the node's first send.
    let m = match omemo.and_then(|o| o.ctx(c.peer)) {
        Some(ctx) => store.queue_outgoing_encrypted(c.id, text, now_ms, &ctx)?,
        None => store.queue_outgoing(c.id, text, now_ms)?,
    };
    Ok((c, MessageView::from(&m)))
}

/// `coterie history`
pub fn history(store: &Store, sel: &str, limit: usize) -> Result<Vec<MessageView>, OpError> {
    let c = find_contact(store, sel)?;
    let cleartext = matches!(c.state, ContactState::Cleartext { .. });
    Ok(store
        .history(c.id, limit.clamp(1, 1_000_000))?
        .iter()
        .map(|m| MessageView {
            cleartext,
            ..MessageView::from(m)
        })
        .collect())
}

/// One page of a chat for the app: the latest `limit` messages with the
/// contact `id` whose seq is below `before` (`None`: the latest), oldest first.
pub fn page(
    store: &Store,
    id: u64,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<MessageView>, OpError> {
    let c = store
        .contact(id)?
        .ok_or_else(|| OpError::Usage("that contact no longer exists".into()))?;
    let cleartext = matches!(c.state, ContactState::Cleartext { .. });
    Ok(store
        .history_before(id, before.unwrap_or(u64::MAX), limit.clamp(1, 10_000))?
        .iter()
        .map(|m| MessageView {
            cleartext,
            ..MessageView::from(m)
        })
        .collect())
}

fn no_keys(c: &Contact) -> Result<(), OpError> {
    match c.state {
        ContactState::Cleartext { .. } => Err(OpError::Usage(format!(
            "{} is a classic XEP-0174 client: it has no keys to list or verify, and chats with it are cleartext",
            c.name
        ))),
        _ => Ok(()),
    }
}

fn device_view(d: &crate::store::DeviceRecord) -> DeviceView {
    DeviceView {
        device: d.id,
        fingerprint: crate::omemo::keys::fingerprint_mont(&d.identity),
        trust: d.trust.as_str().into(),
        versions: d.versions.iter().map(|v| v.to_string()).collect(),
    }
}

/// `coterie fingerprints CONTACT`
pub fn fingerprints(store: &Store, sel: &str) -> Result<FingerprintsView, OpError> {
    let c = find_contact(store, sel)?;
    no_keys(&c)?;
    let p = store.omemo_peer(c.id)?;
    let profile = store.profile()?;
    // A bridged friend sees the bridge account's device, not the node's.
    let (own, seed) = match (&c.state, &profile.bridge) {
        (ContactState::Bridged { .. }, Some(acct)) => (
            store.omemo_device_at(crate::store::omemo::BRIDGE_DEVICE_ROW, now_secs())?,
            acct.omemo_seed,
        ),
        (ContactState::Bridged { .. }, None) => {
            return Err(OpError::Usage(format!(
                "{} is a friend on XMPP and no bridge account is set: `coterie bridge set you@example.org` first",
                c.name
            )));
        }
        _ => (store.omemo_device(now_secs())?, profile.seed),
    };
    let id = crate::omemo::Identity::from_seed(&seed);
    Ok(FingerprintsView {
        contact: c.name.clone(),
        own: DeviceView {
            device: own.device_id,
            fingerprint: crate::omemo::keys::fingerprint(&id.ed_public()),
            trust: "own".into(),
            versions: crate::omemo::Version::ALL
                .iter()
                .map(|v| v.to_string())
                .collect(),
        },
        devices: p.devices.iter().map(device_view).collect(),
    })
}

/// `coterie verify CONTACT DEVICE`: the user compared the device's
/// fingerprint with the contact; messages are encrypted to it from now on.
pub fn verify(store: &Store, sel: &str, device: u32) -> Result<DeviceView, OpError> {
    let c = find_contact(store, sel)?;
    no_keys(&c)?;
    if !store.omemo_verify(c.id, device)? {
        return Err(OpError::Usage(format!(
            "{} has no device {device}; `coterie fingerprints {}` lists them",
            c.name, c.name
        )));
    }
    let p = store.omemo_peer(c.id)?;
    p.devices
        .iter()
        .find(|d| d.id == device)
        .map(device_view)
        .ok_or_else(|| OpError::Usage(format!("{} has no device {device}", c.name)))
}

/// `coterie retention [DAYS]`: shows or sets how long messages are kept
/// (0 = forever). Returns the value in force.
pub fn retention(store: &Store, days: Option<u32>) -> Result<u32, OpError> {
    let mut p = store.profile()?;
    if let Some(d) = days {
        if d > 36_500 {
            return Err(OpError::Usage(
                "retention is at most 36500 days; use 0 to keep messages forever".into(),
            ));
        }
        p.retention_days = d;
        store.set_profile(&p)?;
    }
    Ok(p.retention_days)
}

/// A change to the offline-delivery settings (`None`: unchanged).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HoldChange {
    /// Leave messages for offline contacts with holders.
    pub use_holders: Option<bool>,
    /// Hold for our contacts.
    pub offer: Option<bool>,
    /// How long what we leave is held, in hours.
    pub ttl_hours: Option<u32>,
}

/// The offline-delivery settings and what this node holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldingView {
    /// We leave messages for offline contacts with holders.
    pub use_holders: bool,
    /// We hold for our contacts.
    pub offer: bool,
    /// How long what we leave is held, in hours.
    pub ttl_hours: u32,
    /// Messages held here for contacts now.
    pub held: u64,
}

/// `coterie holding`: shows, and with `change` sets, offline delivery.
pub fn holding(store: &Store, change: &HoldChange) -> Result<HoldingView, OpError> {
    let mut h = store.hold_settings()?;
    if let Some(t) = change.ttl_hours {
        let max = (crate::hold::MAX_TTL_SECS / 3600) as u32;
        if t == 0 || t > max {
            return Err(OpError::Usage(format!(
                "--hours must be between 1 and {max} (holders keep nothing longer)"
            )));
        }
        h.ttl_hours = t;
    }
    if let Some(u) = change.use_holders {
        h.use_holders = u;
    }
    if let Some(o) = change.offer {
        h.offer = o;
    }
    if change.use_holders.is_some() || change.offer.is_some() || change.ttl_hours.is_some() {
        store.set_hold_settings(h)?;
    }
    Ok(HoldingView {
        use_holders: h.use_holders,
        offer: h.offer,
        ttl_hours: h.ttl_hours,
        held: store.held_count()?,
    })
}

/// `coterie bridge set`: keeps the account (password included) in the
/// profile record, which the store seals.
/// The same account keeps its OMEMO identity and device (friends keep
/// their sessions); another account gets new ones.
pub fn bridge_set(
    store: &Store,
    mut acct: crate::bridge::BridgeAccount,
) -> Result<crate::bridge::BridgeAccount, OpError> {
    let mut p = store.profile()?;
    match p.bridge.as_ref() {
        Some(old) if old.jid == acct.jid => acct.omemo_seed = old.omemo_seed,
        _ => store.forget_bridge_device()?,
    }
    p.bridge = Some(acct.clone());
    store.set_profile(&p)?;
    Ok(acct)
}

/// `coterie bridge off`: forgets the account and its password. Returns
/// whether there was one.
pub fn bridge_off(store: &Store) -> Result<bool, OpError> {
    let mut p = store.profile()?;
    let had = p.bridge.take().is_some();
    if had {
        store.set_profile(&p)?;
        store.forget_bridge_device()?;
    }
    Ok(had)
}

/// `coterie bridge status` when no node runs.
pub fn bridge_status(store: &Store) -> Result<crate::bridge::BridgeStatus, OpError> {
    Ok(crate::bridge::BridgeStatus::offline(
        store.profile()?.bridge.as_ref(),
    ))
}

/// Whether a message state counts as done for the sender.
pub fn is_final(state: Delivery) -> bool {
    matches!(state, Delivery::Delivered | Delivery::Received)
}
