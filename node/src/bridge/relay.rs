//! Chats over the bridge: our device list and bundle on the account's PEP,
//! friends' devices fetched from theirs, queued messages encrypted and
//! sent, incoming ones decrypted and stored.
//!
//! A message counts as sent once the server answered a ping sent after it
//! (it handles a stream's stanzas in order), which holds with or without
//! stream management; until then it stays queued and goes again after a
//! reconnect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use minidom::Element;
use tokio::sync::{mpsc, oneshot};
use tokio_xmpp::Stanza;
use tokio_xmpp::jid::{BareJid, Jid};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::Message;

use crate::omemo::pep::{self, PepItem};
use crate::omemo::{Identity, Version};
use crate::runtime::NodeEvent;
use crate::store::omemo::{BRIDGE_DEVICE_ROW, NO_PIN, OmemoCtx};
use crate::store::{ContactState, Incoming, OutStanza, Store};

/// How long an IQ may wait for its answer.
pub const IQ_TIMEOUT: Duration = Duration::from_secs(30);
/// Stanzas sent per round before waiting for the server's answer.
const BATCH: usize = 32;
/// A friend's device list is fetched again after this long.
const DEVICES_FRESH: Duration = Duration::from_secs(600);
/// Devices of one friend whose bundles are fetched.
const MAX_FETCHED_DEVICES: usize = 16;

/// An IQ's answer: the result payload and, for an archive query, the
/// archived messages (archive id, message) that came before it.
pub(crate) type Reply = oneshot::Sender<Result<(Option<Element>, Vec<(String, Message)>), String>>;

/// Archived messages asked for per page.
pub const MAM_PAGE: usize = 50;
/// Pages read per session at most.
const MAM_PAGES: usize = 40;
/// Archive ids remembered to recognise a message seen twice.
const SEEN: usize = 4096;

/// What tasks ask of the stream's owner.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Send a stanza.
    Send(Box<Stanza>),
    /// Send an IQ and hand back its answer (with the archived messages of
    /// the archive query named, if any).
    Iq(Box<Iq>, Option<String>, Reply),
}

/// A page of our own archive: `(queryid, (archive id, message))`. Only
/// from our own account (no `from`, or our bare JID): anyone else could
/// forge "archived" messages.
pub(crate) fn archived(m: &Message, own: &BareJid) -> Option<(String, (String, Message))> {
    use tokio_xmpp::parsers::mam::Result_;
    let el = m
        .payloads
        .iter()
        .find(|p| p.is("result", "urn:xmpp:mam:2"))?;
    if m.from.as_ref().is_some_and(|f| f.to_bare() != *own) {
        return None;
    }
    let r = Result_::try_from(el.clone()).ok()?;
    Some((r.queryid?.0, (r.id, r.forwarded.message)))
}

/// The archive id our server stamped on a message (XEP-0359), if any.
fn stanza_id(m: &Message, own: &BareJid) -> Option<String> {
    use tokio_xmpp::parsers::stanza_id::StanzaId;
    m.payloads
        .iter()
        .filter(|p| p.is("stanza-id", "urn:xmpp:sid:0"))
        .filter_map(|p| StanzaId::try_from(p.clone()).ok())
        .find(|s| s.by.to_bare() == *own)
        .map(|s| s.id)
}

/// A handle on the stream, for the chat tasks.
#[derive(Clone, Debug)]
pub(crate) struct Link(pub(crate) mpsc::Sender<Cmd>);

impl Link {
    async fn send(&self, st: Stanza) -> Result<(), String> {
        self.0
            .send(Cmd::Send(Box::new(st)))
            .await
            .map_err(|_| "the bridge stopped".to_string())
    }

    /// Sends a get/set IQ; its result payload, or why not.
    async fn iq(&self, iq: Iq) -> Result<Option<Element>, String> {
        Ok(self.query(iq, None).await?.0)
    }

    /// Sends an IQ, collecting the archived messages of `archive_query`.
    async fn query(
        &self,
        iq: Iq,
        archive_query: Option<String>,
    ) -> Result<(Option<Element>, Vec<(String, Message)>), String> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(Cmd::Iq(Box::new(iq), archive_query, tx))
            .await
            .map_err(|_| "the bridge stopped".to_string())?;
        match tokio::time::timeout(IQ_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the connection was lost".into()),
            Err(_) => Err("no answer".into()),
        }
    }
}

fn iq_id() -> String {
    format!("b{:016x}", rand::random::<u64>())
}

/// The chats of one bridge account.
pub(crate) struct Chats {
    pub(crate) store: Arc<Store>,
    pub(crate) events: tokio::sync::broadcast::Sender<NodeEvent>,
    pub(crate) account: BareJid,
    pub(crate) identity: Arc<Identity>,
    pub(crate) link: Link,
    fetched: Mutex<HashMap<u64, Instant>>,
    /// Archive ids of messages handled, newest last.
    seen: Mutex<std::collections::VecDeque<String>>,
}

impl std::fmt::Debug for Chats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Chats(..)")
    }
}

async fn db<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, String> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

impl Chats {
    pub(crate) fn new(
        store: Arc<Store>,
        events: tokio::sync::broadcast::Sender<NodeEvent>,
        account: BareJid,
        omemo_seed: &[u8; 32],
        link: Link,
    ) -> Chats {
        Chats {
            store,
            events,
            account,
            identity: Arc::new(Identity::from_seed(omemo_seed)),
            link,
            fetched: Mutex::new(HashMap::new()),
            seen: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    async fn device(&self) -> Result<crate::omemo::OwnDevice, String> {
        let now = crate::ops::now_secs();
        db(&self.store, move |s| {
            s.omemo_device_at(BRIDGE_DEVICE_ROW, now)
        })
        .await
    }

    async fn ctx(&self, friend: &str) -> Result<OmemoCtx, String> {
        let dev = self.device().await?;
        Ok(OmemoCtx {
            identity: self.identity.clone(),
            own_jid: self.account.to_string(),
            peer_jid: friend.to_owned(),
            pinned: NO_PIN,
            device_id: dev.device_id,
            own_row: BRIDGE_DEVICE_ROW,
        })
    }

    /// Publishes our device lists and bundles (both versions).
    pub(crate) async fn publish_own(&self) -> Result<(), String> {
        let dev = self.device().await?;
        for payload in pep::publications(&dev, &self.identity) {
            let iq = Iq::Set {
                from: None,
                to: None,
                id: iq_id(),
                payload,
            };
            self.link
                .iq(iq)
                .await
                .map_err(|e| format!("publishing our OMEMO keys failed: {e}"))?;
        }
        Ok(())
    }

    /// Sends a friend's queued stanzas until none is left, fetching their
    /// devices first when needed. `Ok(true)`: messages wait for the
    /// friend's keys (try again later).
    pub(crate) async fn deliver(&self, contact: u64) -> Result<bool, String> {
        let Some(c) = db(&self.store, move |s| s.contact(contact)).await? else {
            return Ok(false);
        };
        let ContactState::Bridged { jid } = c.state else {
            return Ok(false);
        };
        let friend: BareJid = jid
            .parse()
            .map_err(|_| "a bridged contact has a broken address".to_string())?;
        let ctx = self.ctx(&jid).await?;
        let stale = {
            let f = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
            f.get(&contact).is_none_or(|t| t.elapsed() > DEVICES_FRESH)
        };
        if stale {
            self.fetch_devices(contact, &friend).await?;
        }
        loop {
            let st = db(&self.store, move |s| s.peer_state(contact)).await?;
            let ctx2 = ctx.clone();
            let after = st.out_acked;
            let out = db(&self.store, move |s| {
                s.outbox_encrypted(contact, after, BATCH, &ctx2)
            })
            .await?;
            if out.items.is_empty() {
                return Ok(out.waiting);
            }
            let mut last = after;
            for (n, stanza) in &out.items {
                if let Some(m) = message_for(&friend, stanza) {
                    self.link.send(Stanza::Message(m)).await?;
                }
                last = *n;
            }
            // The server answers in order: once the ping is back, it has
            // the messages.
            let ping = Iq::Get {
                from: None,
                to: Some(Jid::from(BareJid::from_parts(None, self.account.domain()))),
                id: iq_id(),
                payload: Element::builder("ping", "urn:xmpp:ping").build(),
            };
            self.link.iq(ping).await?;
            let sent = db(&self.store, move |s| s.ack_outgoing(contact, last)).await?;
            for seq in sent {
                let _ = self.events.send(NodeEvent::Sent { contact, seq });
            }
            if out.waiting {
                return Ok(true);
            }
        }
    }

    /// Fetches a friend's device lists and their bundles.
    async fn fetch_devices(&self, contact: u64, friend: &BareJid) -> Result<(), String> {
        let mut items: Vec<PepItem> = Vec::new();
        for v in Version::ALL {
            let Ok(list) = self.items(friend, v.devices_node(), None).await else {
                // No such node: they do not use that version.
                continue;
            };
            let mut ids: Vec<u32> = Vec::new();
            for i in list {
                if let PepItem::Devices(lv, l) = &i
                    && *lv == v
                {
                    ids.extend(l);
                }
                items.push(i);
            }
            ids.sort_unstable();
            ids.dedup();
            for id in ids.into_iter().take(MAX_FETCHED_DEVICES) {
                let got = match v {
                    Version::V03 => self.items(friend, &v.bundle_node(id), None).await,
                    Version::V2 => {
                        self.items(friend, &v.bundle_node(id), Some(&id.to_string()))
                            .await
                    }
                };
                // A device without a bundle is skipped, not fatal.
                items.extend(got.unwrap_or_default());
            }
        }
        let found = items.iter().any(|i| matches!(i, PepItem::Bundle(..)));
        let now = crate::ops::now_secs();
        db(&self.store, move |s| {
            s.omemo_learn(contact, NO_PIN, items, now)
        })
        .await?;
        if found {
            self.fetched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(contact, Instant::now());
        }
        Ok(())
    }

    async fn items(
        &self,
        from: &BareJid,
        node: &str,
        item: Option<&str>,
    ) -> Result<Vec<PepItem>, String> {
        let iq = Iq::Get {
            from: None,
            to: Some(Jid::from(from.clone())),
            id: iq_id(),
            payload: pep::fetch_items(node, item),
        };
        match self.link.iq(iq).await? {
            Some(p) => pep::parse_result(&p).map_err(|e| e.to_string()),
            None => Ok(Vec::new()),
        }
    }

    /// Reads what the archive holds after the last message handled, page
    /// by page, and handles it as if it had just arrived. Returns how many
    /// archived messages it read. Nothing to do before the first message.
    pub(crate) async fn catch_up(&self) -> Result<usize, String> {
        use tokio_xmpp::parsers::mam::{Fin, Query, QueryId};
        use tokio_xmpp::parsers::rsm::SetQuery;
        let own = self.account.to_string();
        let Some(mut last) = db(&self.store, move |s| s.bridge_cursor(&own)).await? else {
            // The first session: start from the archive's newest message
            // (what is older and not yet read comes from the offline
            // store, after our presence).
            let queryid = format!("q{:016x}", rand::random::<u64>());
            let query = Query {
                queryid: Some(QueryId(queryid.clone())),
                node: None,
                form: None,
                set: Some(SetQuery {
                    max: Some(1),
                    after: None,
                    before: Some(String::new()),
                    index: None,
                }),
                flip_page: false,
            };
            let (fin, page) = self
                .link
                .query(Iq::from_set(iq_id(), query), Some(queryid))
                .await?;
            let newest = fin
                .and_then(|f| Fin::try_from(f).ok())
                .and_then(|f| f.set.last)
                .or_else(|| page.last().map(|(id, _)| id.clone()));
            if let Some(id) = newest {
                let own = self.account.to_string();
                db(&self.store, move |s| s.set_bridge_cursor(&own, &id)).await?;
            }
            return Ok(0);
        };
        let mut read = 0;
        for _ in 0..MAM_PAGES {
            let queryid = format!("q{:016x}", rand::random::<u64>());
            let query = Query {
                queryid: Some(QueryId(queryid.clone())),
                node: None,
                form: None,
                set: Some(SetQuery {
                    max: Some(MAM_PAGE),
                    after: Some(last.clone()),
                    before: None,
                    index: None,
                }),
                flip_page: false,
            };
            let (fin, page) = self
                .link
                .query(Iq::from_set(iq_id(), query), Some(queryid))
                .await?;
            let complete = fin
                .and_then(|f| Fin::try_from(f).ok())
                .is_none_or(|f| f.complete);
            let n = page.len();
            for (id, m) in page {
                self.handle(m, Some(id.clone())).await?;
                last = id;
                read += 1;
            }
            if complete || n == 0 {
                break;
            }
        }
        Ok(read)
    }

    fn seen(&self, archive_id: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|s| s == archive_id)
    }

    fn mark_seen(&self, archive_id: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() == SEEN {
            seen.pop_front();
        }
        seen.push_back(archive_id.to_owned());
    }

    /// A message that arrived on the account. Returns whether it was from
    /// a bridged contact (anything else is not stored).
    pub(crate) async fn received(&self, m: Message) -> Result<bool, String> {
        let archive_id = stanza_id(&m, &self.account);
        if archive_id.as_deref().is_some_and(|id| self.seen(id)) {
            // Read from the archive already (the offline store hands over
            // the same messages after our presence).
            return Ok(true);
        }
        self.handle(m, archive_id).await
    }

    /// Stores what a bridged contact sent, and moves the archive cursor
    /// past it in the same transaction (`archive_id`: its id in our
    /// archive, when the server stamped one). Our own messages (from
    /// another session, or archived) and other people's move only the
    /// cursor.
    async fn handle(&self, m: Message, archive_id: Option<String>) -> Result<bool, String> {
        if let Some(id) = &archive_id {
            self.mark_seen(id);
        }
        let own = self.account.to_string();
        let cursor_only = |archive_id: Option<String>, own: String| async move {
            if let Some(id) = archive_id {
                db(&self.store, move |s| s.set_bridge_cursor(&own, &id)).await?;
            }
            Ok::<(), String>(())
        };
        let from = m.from.as_ref().map(|j| j.to_bare());
        let Some(from) = from.filter(|f| *f != self.account) else {
            cursor_only(archive_id, own).await?;
            return Ok(true);
        };
        let jid = from.to_string();
        let j2 = jid.clone();
        let contact = db(&self.store, move |s| {
            Ok(s.contacts()?
                .into_iter()
                .find(|c| matches!(&c.state, ContactState::Bridged { jid } if *jid == j2)))
        })
        .await?;
        let Some(c) = contact else {
            cursor_only(archive_id, own).await?;
            return Ok(false);
        };
        let item = crate::stream::session::incoming_of(Element::from(m));
        if matches!(item, Incoming::Other) {
            cursor_only(archive_id, own).await?;
            return Ok(true);
        }
        let ctx = self.ctx(&jid).await?;
        let id = c.id;
        let now = crate::ops::now_ms();
        let res = db(&self.store, move |s| {
            let cursor = archive_id.as_deref().map(|a| (own.as_str(), a));
            s.receive_bridged(id, &[item], now, &ctx, cursor)
        })
        .await?;
        for &seq in &res.new_messages {
            let _ = self.events.send(NodeEvent::Received { contact: id, seq });
        }
        for &seq in &res.delivered {
            let _ = self.events.send(NodeEvent::Delivered { contact: id, seq });
        }
        if res.bundle_changed {
            self.publish_own().await?;
        }
        if res.queued_stanzas {
            // Receipts and session repairs.
            self.deliver(id).await?;
        }
        Ok(true)
    }
}

/// The message for one queued stanza, addressed to `friend`.
pub fn message_for(friend: &BareJid, st: &OutStanza) -> Option<Message> {
    let mut m = match st {
        OutStanza::Chat {
            id, omemo: Some(x), ..
        } => crate::stream::session::encrypted_message(id, x, true)?,
        OutStanza::KeyTransport { id, omemo } => {
            crate::stream::session::encrypted_message(id, omemo, false)?
        }
        // Never in the clear; no groups over the bridge.
        OutStanza::Chat { omemo: None, .. } | OutStanza::Group { .. } | OutStanza::Hold { .. } => {
            return None;
        }
        OutStanza::Receipt { id, of } => crate::stream::session::receipt_message(id, of),
    };
    m.to = Some(Jid::from(friend.clone()));
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chats_go_to_the_friend_encrypted_with_hints_and_never_in_the_clear() {
        let friend: BareJid = "friend@example.org".parse().expect("jid");
        let clear = OutStanza::Chat {
            id: "m1.0".into(),
            body: "secret".into(),
            seq: 1,
            omemo: None,
        };
        assert!(message_for(&friend, &clear).is_none());
        let enc = OutStanza::Chat {
            id: "m1.0".into(),
            body: "secret".into(),
            seq: 1,
            omemo: Some(
                "<encrypted xmlns='urn:xmpp:omemo:2'><header sid='1'/><payload>AAAA</payload></encrypted>"
                    .into(),
            ),
        };
        let m = message_for(&friend, &enc).expect("message");
        let xml = String::from(&Element::from(m));
        assert!(xml.contains("to='friend@example.org'"), "{xml}");
        assert!(xml.contains("type='chat'"), "{xml}");
        assert!(xml.contains("urn:xmpp:hints"), "{xml}");
        assert!(xml.contains("urn:xmpp:receipts"), "{xml}");
        assert!(!xml.contains("secret"), "{xml}");
        assert!(!xml.contains("<body"), "{xml}");
    }
}
