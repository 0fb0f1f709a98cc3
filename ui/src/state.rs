//! # coterie-ui
//!
//! The desktop app's state, as a pure reducer: `(State, Action) → State`.
//! The egui views (to come) render a [`State`] and turn clicks into
//! [`Action`]s; the node's [`node::runtime::NodeEvent`]s become actions too.
//! No I/O happens here, so every behaviour a person sees can be unit-tested.
//!
//! ```text
//!   node events ─┐
//!                ├─▶ reduce(state, action) ─▶ state ─▶ views
//!   user input ──┘
//! ```

use std::collections::BTreeMap;

use node::ops::{ContactView, MessageView};
use node::runtime::NodeEvent;

/// One contact in the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRow {
    /// Local id.
    pub id: u64,
    /// What it is shown as.
    pub view: ContactView,
    /// Messages received since the chat was last opened.
    pub unread: u32,
    /// Whether a session is live.
    pub online: bool,
}

/// What the app shows.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Contacts by local id.
    pub contacts: BTreeMap<u64, ContactRow>,
    /// The contact whose chat is open.
    pub open: Option<u64>,
    /// The open chat's messages, oldest first.
    pub messages: Vec<MessageView>,
    /// A message to show the user (an error they can act on).
    pub notice: Option<String>,
}

/// Something that happened.
#[derive(Debug, Clone)]
pub enum Action {
    /// The contact list was (re)loaded from the store.
    ContactsLoaded(Vec<(u64, ContactView)>),
    /// The user opened a chat; its latest page was loaded.
    ChatOpened {
        /// Contact id.
        contact: u64,
        /// Latest messages, oldest first.
        page: Vec<MessageView>,
    },
    /// The user closed the chat.
    ChatClosed,
    /// The user sent a message; the node stored it.
    Sent(MessageView),
    /// An event from the node.
    Node(NodeEvent),
    /// A message arrived in the open chat (loaded after a `Received` event).
    Arrived(MessageView),
    /// An operation failed; tell the user.
    Failed(String),
    /// The user dismissed the notice.
    Dismiss,
}

/// Applies an action.
pub fn reduce(mut s: State, a: Action) -> State {
    match a {
        Action::ContactsLoaded(list) => {
            let old = std::mem::take(&mut s.contacts);
            for (id, view) in list {
                let (unread, online) = old
                    .get(&id)
                    .map(|r| (r.unread, r.online))
                    .unwrap_or((0, view.state == "connected"));
                s.contacts.insert(
                    id,
                    ContactRow {
                        id,
                        view,
                        unread,
                        online,
                    },
                );
            }
            if s.open.is_some_and(|o| !s.contacts.contains_key(&o)) {
                s.open = None;
                s.messages.clear();
            }
        }
        Action::ChatOpened { contact, page } => {
            s.open = Some(contact);
            s.messages = page;
            if let Some(r) = s.contacts.get_mut(&contact) {
                r.unread = 0;
            }
        }
        Action::ChatClosed => {
            s.open = None;
            s.messages.clear();
        }
        Action::Sent(m) => s.messages.push(m),
        Action::Arrived(m) => {
            if !s.messages.iter().any(|x| x.seq == m.seq) {
                s.messages.push(m);
            }
        }
        Action::Node(ev) => match ev {
            NodeEvent::Received { contact, .. } => {
                if s.open != Some(contact)
                    && let Some(r) = s.contacts.get_mut(&contact)
                {
                    r.unread = r.unread.saturating_add(1);
                }
            }
            NodeEvent::Sent { contact, seq } => set_state(&mut s, contact, seq, "sent"),
            NodeEvent::Delivered { contact, seq } => set_state(&mut s, contact, seq, "delivered"),
            NodeEvent::Connection { contact, up } => {
                if let Some(r) = s.contacts.get_mut(&contact) {
                    r.online = up;
                }
            }
        },
        Action::Failed(msg) => s.notice = Some(msg),
        Action::Dismiss => s.notice = None,
    }
    s
}

fn set_state(s: &mut State, contact: u64, seq: u64, state: &str) {
    if s.open != Some(contact) {
        return;
    }
    if let Some(m) = s
        .messages
        .iter_mut()
        .find(|m| m.seq == seq && m.dir == "out")
    {
        // States only move forward: a late "sent" never undoes "delivered".
        if !(m.state == "delivered" && state == "sent") {
            m.state = state.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(name: &str, state: &str) -> ContactView {
        ContactView {
            name: name.into(),
            jid: format!("{name}.onion"),
            fingerprint: "0000".into(),
            state: state.into(),
            transport: None,
            last_seen: None,
            queued: 0,
            cleartext: false,
        }
    }

    fn msg(seq: u64, dir: &str, state: &str) -> MessageView {
        MessageView {
            seq,
            dir: dir.into(),
            body: format!("m{seq}"),
            ts: 0,
            state: state.into(),
            unverified: false,
            undecryptable: None,
            cleartext: false,
        }
    }

    fn loaded() -> State {
        reduce(
            State::default(),
            Action::ContactsLoaded(vec![
                (1, contact("bob", "connected")),
                (2, contact("carol", "offline")),
            ]),
        )
    }

    #[test]
    fn unread_counts_only_for_closed_chats_and_clear_on_open() {
        let s = loaded();
        assert!(s.contacts[&1].online && !s.contacts[&2].online);
        let s = reduce(s, Action::Node(NodeEvent::Received { contact: 2, seq: 1 }));
        let s = reduce(s, Action::Node(NodeEvent::Received { contact: 2, seq: 2 }));
        assert_eq!(s.contacts[&2].unread, 2);
        let s = reduce(
            s,
            Action::ChatOpened {
                contact: 2,
                page: vec![msg(1, "in", "received"), msg(2, "in", "received")],
            },
        );
        assert_eq!(s.contacts[&2].unread, 0);
        let s = reduce(s, Action::Node(NodeEvent::Received { contact: 2, seq: 3 }));
        assert_eq!(
            s.contacts[&2].unread, 0,
            "the open chat does not count unread"
        );
    }

    #[test]
    fn delivery_states_move_forward_only() {
        let s = reduce(
            loaded(),
            Action::ChatOpened {
                contact: 1,
                page: vec![],
            },
        );
        let s = reduce(s, Action::Sent(msg(5, "out", "queued")));
        let s = reduce(s, Action::Node(NodeEvent::Delivered { contact: 1, seq: 5 }));
        let s = reduce(s, Action::Node(NodeEvent::Sent { contact: 1, seq: 5 }));
        assert_eq!(s.messages[0].state, "delivered");
        // Events for another chat do not touch this one.
        let s = reduce(s, Action::Sent(msg(6, "out", "queued")));
        let s = reduce(s, Action::Node(NodeEvent::Delivered { contact: 2, seq: 6 }));
        assert_eq!(s.messages[1].state, "queued");
    }

    #[test]
    fn arrivals_are_not_duplicated_and_connections_update() {
        let s = reduce(
            loaded(),
            Action::ChatOpened {
                contact: 1,
                page: vec![msg(1, "in", "received")],
            },
        );
        let s = reduce(s, Action::Arrived(msg(1, "in", "received")));
        let s = reduce(s, Action::Arrived(msg(2, "in", "received")));
        assert_eq!(s.messages.len(), 2);
        let s = reduce(
            s,
            Action::Node(NodeEvent::Connection {
                contact: 1,
                up: false,
            }),
        );
        assert!(!s.contacts[&1].online);
    }

    #[test]
    fn a_removed_contact_closes_its_chat_and_notices_can_be_dismissed() {
        let s = reduce(
            loaded(),
            Action::ChatOpened {
                contact: 2,
                page: vec![msg(1, "in", "received")],
            },
        );
        let s = reduce(
            s,
            Action::ContactsLoaded(vec![(1, contact("bob", "connected"))]),
        );
        assert_eq!(s.open, None);
        assert!(s.messages.is_empty());
        let s = reduce(s, Action::Failed("no such contact".into()));
        assert!(s.notice.is_some());
        assert!(reduce(s, Action::Dismiss).notice.is_none());
    }
}
