//! The app's state, as a pure reducer: `(State, Action) → State`.
//!
//! The views render a [`State`] and turn clicks into commands for the
//! backend; the backend's answers and the node's events come back as
//! [`Action`]s. No I/O happens here, so every behaviour a person sees can
//! be unit-tested.
//!
//! ```text
//!   backend answers, node events ─┐
//!                                 ├─▶ reduce(state, action) ─▶ state ─▶ views
//!   user input (local only) ──────┘
//! ```

use std::collections::BTreeMap;

use node::ops::{ContactView, DeviceView, FingerprintsView, IdView, MessageView};
use node::runtime::NodeEvent;
use node::runtime::groups::{GroupPostView, GroupView, MemberView};
use node::settings::Settings;

/// Messages loaded per page of a chat.
pub const PAGE: usize = 100;

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

impl ContactRow {
    /// How the contact is reached now, in words: `LAN`, `Tor`, `LAN
    /// (cleartext)`, `offline`, `invited`.
    pub fn reach(&self) -> &'static str {
        if self.view.bridged {
            return "XMPP (bridge)";
        }
        if self.view.state == "pending" {
            return "invited";
        }
        if !self.online {
            return "offline";
        }
        match self.view.transport.as_deref() {
            Some("onion") => "Tor",
            Some("xep0174") => "LAN (cleartext)",
            _ => "LAN",
        }
    }
}

/// Which screen is up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Screen {
    /// The list of profiles on this device.
    #[default]
    Profiles,
    /// Creating a profile.
    Create,
    /// Asking for a profile's passphrase.
    Unlock(String),
    /// A profile is open: contacts and chats.
    Main,
}

/// What the main screen shows beside the contact list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Pane {
    /// The open chat (or a hint to pick one).
    #[default]
    Chat,
    /// A new invite: link and QR code.
    Invite,
    /// Pasting someone's invite.
    AddContact,
    /// Comparing fingerprints with a contact.
    Verify(u64),
    /// The open group chat.
    Group,
    /// Creating a group.
    NewGroup,
    /// A group's link: text and QR code.
    GroupLink,
    /// Settings.
    Settings,
}

/// Tor's state as the status bar shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TorLine {
    /// 0–100.
    pub percent: u8,
    /// What arti is doing.
    pub phase: String,
    /// The onion service's state.
    pub service: String,
    /// Something the user can act on.
    pub problem: Option<String>,
}

/// The bridge's state as the status bar shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeLine {
    /// The account.
    pub jid: String,
    /// What it is doing, in words.
    pub state: String,
    /// It connects without Tor (the user chose so).
    pub direct: bool,
    /// Something the user can act on.
    pub problem: Option<String>,
}

impl BridgeLine {
    /// The node's bridge status in words; `None` when no account is set.
    pub fn of(b: &node::bridge::BridgeStatus) -> Option<BridgeLine> {
        use node::bridge::{BridgeState, Route};
        let jid = b.jid.clone()?;
        let state = match b.state {
            BridgeState::Off => "off",
            BridgeState::Stopped => "stopped",
            BridgeState::WaitingForTor => "waiting for Tor",
            BridgeState::Connecting => "connecting",
            BridgeState::Online => "online",
            BridgeState::Retrying => "retrying",
            BridgeState::Failed => "stopped on an error",
        };
        Some(BridgeLine {
            jid,
            state: state.into(),
            direct: b.route == Some(Route::Direct),
            problem: b.error.clone().or_else(|| b.note.clone()),
        })
    }

    /// The status bar's words.
    pub fn text(&self) -> String {
        let via = if self.direct {
            "DIRECTLY, without Tor"
        } else {
            "through Tor"
        };
        format!("XMPP bridge {} {via}: {}", self.jid, self.state)
    }
}

/// The node's state for the status bar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Tor, when on.
    pub tor: Option<TorLine>,
    /// The bridge, when an account is set.
    pub bridge: Option<BridgeLine>,
    /// LAN discovery on.
    pub lan: bool,
    /// Where the node listens.
    pub listening: Vec<String>,
    /// Live sessions.
    pub sessions: usize,
}

/// A message to the person: an error they can act on, or news.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The words.
    pub text: String,
    /// Whether it is an error.
    pub error: bool,
}

/// What the app shows.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// The screen.
    pub screen: Screen,
    /// Profiles on this device (directory names).
    pub profiles: Vec<String>,
    /// Something slow is running (unlocking, starting the node): its words.
    pub busy: Option<String>,
    /// The open profile's name.
    pub profile: Option<String>,
    /// Our identity.
    pub me: Option<IdView>,
    /// Contacts by local id.
    pub contacts: BTreeMap<u64, ContactRow>,
    /// The contact whose chat is open.
    pub open: Option<u64>,
    /// The open chat's loaded messages, oldest first.
    pub messages: Vec<MessageView>,
    /// Older messages exist above the loaded ones.
    pub older: bool,
    /// The right-hand pane.
    pub pane: Pane,
    /// The invite link last made.
    pub invite: Option<String>,
    /// Fingerprints for the verification pane.
    pub fingerprints: Option<(u64, FingerprintsView)>,
    /// Settings and retention days, as stored.
    pub settings: Option<(Settings, u32)>,
    /// Settings were saved that apply at the next start.
    pub restart_needed: bool,
    /// The node's state.
    pub status: Status,
    /// A message to show.
    pub notice: Option<Notice>,
    /// Groups by id (hex).
    pub groups: BTreeMap<String, GroupView>,
    /// The group whose chat is open.
    pub open_group: Option<String>,
    /// Its latest posts, oldest first.
    pub group_posts: Vec<GroupPostView>,
    /// Its members.
    pub group_members: Vec<MemberView>,
    /// The group link last made.
    pub group_link: Option<String>,
}

/// Something that happened.
#[derive(Debug, Clone)]
pub enum Action {
    /// The profiles on this device.
    ProfilesListed(Vec<String>),
    /// The user wants to create a profile.
    ShowCreate,
    /// The user went back to the profile list.
    ShowProfiles,
    /// The user picked a profile to unlock.
    ShowUnlock(String),
    /// Something slow started.
    Working(String),
    /// The profile is open and its node runs.
    Unlocked {
        /// Profile (directory) name.
        profile: String,
        /// Our identity.
        me: IdView,
        /// Stored settings.
        settings: Settings,
        /// Retention in days.
        retention: u32,
    },
    /// Opening or creating failed; stay on the form with this message.
    OpenFailed(String),
    /// The contact list was (re)loaded.
    ContactsLoaded(Vec<(u64, ContactView)>),
    /// A chat was opened with its latest page.
    ChatOpened {
        /// Contact id.
        contact: u64,
        /// Latest messages, oldest first.
        page: Vec<MessageView>,
    },
    /// An older page of the open chat was loaded.
    OlderLoaded {
        /// Contact id.
        contact: u64,
        /// Messages, oldest first, all older than the loaded ones.
        page: Vec<MessageView>,
    },
    /// The user closed the chat.
    ChatClosed,
    /// The user sent a message; the node stored it.
    Sent {
        /// Contact id.
        contact: u64,
        /// The message.
        message: MessageView,
    },
    /// An event from the node.
    Node(NodeEvent),
    /// A message was loaded after a `Received` event.
    Arrived {
        /// Contact id.
        contact: u64,
        /// The message.
        message: MessageView,
    },
    /// The user switched panes.
    ShowPane(Pane),
    /// An invite was made.
    Invited(String),
    /// A contact was added from an invite.
    Added(String),
    /// Fingerprints for the verification pane.
    Fingerprints(u64, FingerprintsView),
    /// The user marked a device verified.
    Verified(u64, DeviceView),
    /// Settings were saved.
    SettingsSaved {
        /// As stored.
        settings: Settings,
        /// Retention days.
        retention: u32,
        /// Some apply only at the next start.
        restart_needed: bool,
    },
    /// The node's state changed.
    Status(Status),
    /// The open profile was wiped.
    Wiped,
    /// The profile was closed; the profiles on this device.
    Locked(Vec<String>),
    /// An operation failed; tell the user.
    Failed(String),
    /// News for the user (not an error).
    Info(String),
    /// The user dismissed the notice.
    Dismiss,
    /// The group list was (re)loaded.
    GroupsLoaded(Vec<GroupView>),
    /// A group chat was opened (or refreshed).
    GroupOpened {
        /// Group id.
        id: String,
        /// Latest posts, oldest first.
        posts: Vec<GroupPostView>,
        /// Members.
        members: Vec<MemberView>,
        /// A reload of the open group (not the user opening one).
        refresh: bool,
    },
    /// A group was created.
    GroupCreated(GroupView),
    /// A group link was made.
    GroupLinked(String),
}

/// Applies an action.
pub fn reduce(mut s: State, a: Action) -> State {
    match a {
        Action::ProfilesListed(p) => {
            s.profiles = p;
            if s.screen == Screen::Profiles && s.profiles.is_empty() {
                s.screen = Screen::Create;
            }
        }
        Action::ShowCreate => {
            s.screen = Screen::Create;
            s.notice = None;
        }
        Action::ShowProfiles => {
            s.screen = Screen::Profiles;
            s.notice = None;
        }
        Action::ShowUnlock(p) => {
            s.screen = Screen::Unlock(p);
            s.notice = None;
        }
        Action::Working(w) => s.busy = Some(w),
        Action::Unlocked {
            profile,
            me,
            settings,
            retention,
        } => {
            s.busy = None;
            s.notice = None;
            s.screen = Screen::Main;
            s.profile = Some(profile);
            s.me = Some(me);
            s.settings = Some((settings, retention));
            s.pane = Pane::Chat;
        }
        // Opening failed: the message shows on the form, which stays up.
        Action::OpenFailed(msg) | Action::Failed(msg) => {
            s.busy = None;
            s.notice = Some(Notice {
                text: msg,
                error: true,
            });
        }
        Action::ContactsLoaded(list) => {
            let old = std::mem::take(&mut s.contacts);
            for (id, view) in list {
                let unread = old.get(&id).map(|r| r.unread).unwrap_or(0);
                let online = view.state == "connected";
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
            s.older = page.len() >= PAGE;
            s.open = Some(contact);
            s.open_group = None;
            s.messages = page;
            s.pane = Pane::Chat;
            if let Some(r) = s.contacts.get_mut(&contact) {
                r.unread = 0;
            }
        }
        Action::OlderLoaded { contact, page } => {
            if s.open == Some(contact) {
                s.older = page.len() >= PAGE;
                let first = s.messages.first().map(|m| m.seq).unwrap_or(u64::MAX);
                let mut page: Vec<MessageView> =
                    page.into_iter().filter(|m| m.seq < first).collect();
                page.append(&mut s.messages);
                s.messages = page;
            }
        }
        Action::ChatClosed => {
            s.open = None;
            s.messages.clear();
            s.older = false;
        }
        Action::Sent { contact, message } => {
            if s.open == Some(contact) {
                insert_in_order(&mut s.messages, message);
            }
            if let Some(r) = s.contacts.get_mut(&contact) {
                r.view.queued += 1;
            }
        }
        Action::Arrived { contact, message } => {
            if s.open == Some(contact) {
                insert_in_order(&mut s.messages, message);
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
                    if up {
                        r.view.state = "connected".into();
                    } else if r.view.state == "connected" {
                        r.view.state = "offline".into();
                    }
                }
            }
            // The view reloads the groups (and the open one).
            NodeEvent::GroupPosts { .. } => {}
        },
        Action::ShowPane(p) => {
            s.pane = p;
            s.notice = None;
        }
        Action::GroupsLoaded(v) => {
            s.groups = v.into_iter().map(|g| (g.id.clone(), g)).collect();
        }
        Action::GroupCreated(g) => {
            s.groups.insert(g.id.clone(), g);
        }
        Action::GroupOpened {
            id,
            posts,
            members,
            refresh,
        } => {
            // A refresh of a group that is no longer open changes nothing.
            if refresh && s.open_group.as_deref() != Some(id.as_str()) {
                return s;
            }
            s.open = None;
            s.open_group = Some(id);
            s.group_posts = posts;
            s.group_members = members;
            if s.pane != Pane::GroupLink {
                s.pane = Pane::Group;
            }
        }
        Action::GroupLinked(uri) => {
            s.group_link = Some(uri);
            s.pane = Pane::GroupLink;
        }
        Action::Invited(link) => {
            s.invite = Some(link);
            s.pane = Pane::Invite;
        }
        Action::Added(name) => {
            s.pane = Pane::Chat;
            s.notice = Some(Notice {
                text: format!("{name} added. You are connected once their node answers."),
                error: false,
            });
        }
        Action::Fingerprints(c, f) => {
            s.fingerprints = Some((c, f));
            s.pane = Pane::Verify(c);
        }
        Action::Verified(c, d) => {
            if let Some((fc, f)) = &mut s.fingerprints
                && *fc == c
                && let Some(x) = f.devices.iter_mut().find(|x| x.device == d.device)
            {
                *x = d;
            }
        }
        Action::SettingsSaved {
            settings,
            retention,
            restart_needed,
        } => {
            s.settings = Some((settings, retention));
            s.restart_needed |= restart_needed;
            s.notice = Some(Notice {
                text: if s.restart_needed {
                    "Settings saved. Network settings apply the next time you open this profile."
                        .into()
                } else {
                    "Settings saved.".into()
                },
                error: false,
            });
        }
        Action::Status(st) => s.status = st,
        Action::Wiped => {
            let profile = s.profile.take();
            s = State {
                profiles: s
                    .profiles
                    .into_iter()
                    .filter(|p| Some(p) != profile.as_ref())
                    .collect(),
                notice: Some(Notice {
                    text: "The profile was wiped.".into(),
                    error: false,
                }),
                ..State::default()
            };
        }
        Action::Locked(profiles) => {
            // Nothing of the closed profile stays in memory.
            s = State {
                profiles,
                ..State::default()
            };
        }
        Action::Info(msg) => {
            s.notice = Some(Notice {
                text: msg,
                error: false,
            });
        }
        Action::Dismiss => s.notice = None,
    }
    s
}

/// Inserts by seq, replacing a message already loaded (a later state).
fn insert_in_order(v: &mut Vec<MessageView>, m: MessageView) {
    match v.binary_search_by_key(&m.seq, |x| x.seq) {
        Ok(i) => {
            // States only move forward: keep a "delivered" already shown.
            if !(v[i].state == "delivered" && m.state != "delivered") {
                v[i] = m;
            }
        }
        Err(i) => v.insert(i, m),
    }
}

fn set_state(s: &mut State, contact: u64, seq: u64, state: &str) {
    if let Some(r) = s.contacts.get_mut(&contact)
        && state == "sent"
    {
        r.view.queued = r.view.queued.saturating_sub(1);
    }
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
            transport: (state == "connected").then(|| "tcp".into()),
            last_seen: None,
            queued: 0,
            cleartext: false,
            bridged: false,
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

    fn me() -> IdView {
        IdView {
            jid: "alice@x.onion".into(),
            onion: "x.onion".into(),
            fingerprint: "1234".into(),
        }
    }

    fn loaded() -> State {
        let s = reduce(
            State::default(),
            Action::Unlocked {
                profile: "default".into(),
                me: me(),
                settings: Settings::default(),
                retention: 30,
            },
        );
        reduce(
            s,
            Action::ContactsLoaded(vec![
                (1, contact("bob", "connected")),
                (2, contact("carol", "offline")),
            ]),
        )
    }

    fn open(s: State, contact: u64, page: Vec<MessageView>) -> State {
        reduce(s, Action::ChatOpened { contact, page })
    }

    #[test]
    fn onboarding_goes_to_create_without_profiles_and_keeps_errors_on_the_form() {
        let s = reduce(State::default(), Action::ProfilesListed(vec![]));
        assert_eq!(s.screen, Screen::Create);
        let s = reduce(
            State::default(),
            Action::ProfilesListed(vec!["default".into(), "work".into()]),
        );
        assert_eq!(s.screen, Screen::Profiles);
        let s = reduce(s, Action::ShowUnlock("work".into()));
        let s = reduce(s, Action::Working("Unlocking…".into()));
        assert!(s.busy.is_some());
        let s = reduce(s, Action::OpenFailed("Wrong passphrase.".into()));
        assert_eq!(s.screen, Screen::Unlock("work".into()));
        assert!(s.busy.is_none());
        assert!(s.notice.as_ref().is_some_and(|n| n.error));
        let s = reduce(
            s,
            Action::Unlocked {
                profile: "work".into(),
                me: me(),
                settings: Settings::default(),
                retention: 30,
            },
        );
        assert_eq!(s.screen, Screen::Main);
        assert!(
            s.notice.is_none(),
            "a stale error does not follow into the app"
        );
    }

    #[test]
    fn unread_counts_only_for_closed_chats_and_clear_on_open() {
        let s = loaded();
        assert!(s.contacts[&1].online && !s.contacts[&2].online);
        assert_eq!(s.contacts[&1].reach(), "LAN");
        assert_eq!(s.contacts[&2].reach(), "offline");
        let s = reduce(s, Action::Node(NodeEvent::Received { contact: 2, seq: 1 }));
        let s = reduce(s, Action::Node(NodeEvent::Received { contact: 2, seq: 2 }));
        assert_eq!(s.contacts[&2].unread, 2);
        let s = open(
            s,
            2,
            vec![msg(1, "in", "received"), msg(2, "in", "received")],
        );
        assert_eq!(s.contacts[&2].unread, 0);
        let s = reduce(s, Action::Node(NodeEvent::Received { contact: 2, seq: 3 }));
        assert_eq!(
            s.contacts[&2].unread, 0,
            "the open chat does not count unread"
        );
        // A reload keeps the unread counts it has.
        let s = reduce(s, Action::Node(NodeEvent::Received { contact: 1, seq: 9 }));
        let s = reduce(
            s,
            Action::ContactsLoaded(vec![
                (1, contact("bob", "connected")),
                (2, contact("carol", "offline")),
            ]),
        );
        assert_eq!(s.contacts[&1].unread, 1);
    }

    #[test]
    fn delivery_states_move_forward_only() {
        let s = open(loaded(), 1, vec![]);
        let s = reduce(
            s,
            Action::Sent {
                contact: 1,
                message: msg(5, "out", "queued"),
            },
        );
        assert_eq!(s.contacts[&1].view.queued, 1);
        let s = reduce(s, Action::Node(NodeEvent::Delivered { contact: 1, seq: 5 }));
        let s = reduce(s, Action::Node(NodeEvent::Sent { contact: 1, seq: 5 }));
        assert_eq!(s.messages[0].state, "delivered");
        assert_eq!(s.contacts[&1].view.queued, 0);
        // Events for another chat do not touch this one.
        let s = reduce(
            s,
            Action::Sent {
                contact: 1,
                message: msg(6, "out", "queued"),
            },
        );
        let s = reduce(s, Action::Node(NodeEvent::Delivered { contact: 2, seq: 6 }));
        assert_eq!(s.messages[1].state, "queued");
    }

    #[test]
    fn arrivals_are_not_duplicated_and_stay_in_order() {
        let s = open(loaded(), 1, vec![msg(1, "in", "received")]);
        let s = reduce(
            s,
            Action::Arrived {
                contact: 1,
                message: msg(3, "in", "received"),
            },
        );
        let s = reduce(
            s,
            Action::Arrived {
                contact: 1,
                message: msg(1, "in", "received"),
            },
        );
        let s = reduce(
            s,
            Action::Arrived {
                contact: 1,
                message: msg(2, "in", "received"),
            },
        );
        let seqs: Vec<u64> = s.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        // A message for a chat that is not open is not shown here.
        let s = reduce(
            s,
            Action::Arrived {
                contact: 2,
                message: msg(4, "in", "received"),
            },
        );
        assert_eq!(s.messages.len(), 3);
        let s = reduce(
            s,
            Action::Node(NodeEvent::Connection {
                contact: 1,
                up: false,
            }),
        );
        assert!(!s.contacts[&1].online);
        assert_eq!(s.contacts[&1].reach(), "offline");
    }

    #[test]
    fn older_pages_are_prepended_and_say_whether_more_exist() {
        let latest: Vec<MessageView> = (101..=200).map(|i| msg(i, "in", "received")).collect();
        let s = open(loaded(), 1, latest);
        assert!(s.older, "a full page means there may be more");
        let older: Vec<MessageView> = (51..=100).map(|i| msg(i, "in", "received")).collect();
        let s = reduce(
            s,
            Action::OlderLoaded {
                contact: 1,
                page: older,
            },
        );
        assert!(!s.older, "a short page is the beginning");
        assert_eq!(s.messages.len(), 150);
        assert!(s.messages.windows(2).all(|w| w[0].seq < w[1].seq));
        // A page for a chat closed meanwhile is dropped.
        let s = reduce(s, Action::ChatClosed);
        let s = reduce(
            s,
            Action::OlderLoaded {
                contact: 1,
                page: vec![msg(1, "in", "received")],
            },
        );
        assert!(s.messages.is_empty());
    }

    #[test]
    fn a_removed_contact_closes_its_chat_and_notices_can_be_dismissed() {
        let s = open(loaded(), 2, vec![msg(1, "in", "received")]);
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

    #[test]
    fn settings_that_need_a_restart_say_so_and_wipe_returns_to_the_profiles() {
        let s = loaded();
        let set = Settings {
            lan: true,
            ..Settings::default()
        };
        let s = reduce(
            s,
            Action::SettingsSaved {
                settings: set.clone(),
                retention: 7,
                restart_needed: true,
            },
        );
        assert_eq!(s.settings, Some((set, 7)));
        assert!(
            s.notice
                .as_ref()
                .is_some_and(|n| n.text.contains("next time"))
        );
        let s = reduce(
            State {
                profiles: vec!["default".into(), "work".into()],
                ..s
            },
            Action::Wiped,
        );
        assert_eq!(s.screen, Screen::Profiles);
        assert_eq!(s.profiles, ["work"]);
        assert!(s.contacts.is_empty() && s.me.is_none());
    }

    #[test]
    fn reach_names_the_path_in_words() {
        let row = |state: &str, transport: Option<&str>, online| ContactRow {
            id: 1,
            view: ContactView {
                transport: transport.map(str::to_string),
                ..contact("bob", state)
            },
            unread: 0,
            online,
        };
        assert_eq!(row("connected", Some("onion"), true).reach(), "Tor");
        assert_eq!(row("connected", Some("quic"), true).reach(), "LAN");
        assert_eq!(
            row("connected", Some("xep0174"), true).reach(),
            "LAN (cleartext)"
        );
        assert_eq!(row("offline", Some("onion"), false).reach(), "offline");
        assert_eq!(row("pending", None, false).reach(), "invited");
        let mut bridged = row("bridged", Some("bridge"), false);
        bridged.view.bridged = true;
        assert_eq!(bridged.reach(), "XMPP (bridge)");
    }

    #[test]
    fn the_bridge_line_says_how_it_connects_and_what_to_fix() {
        use node::bridge::{BridgeState, BridgeStatus, Route};
        assert_eq!(BridgeLine::of(&BridgeStatus::offline(None)), None);
        let mut b = BridgeStatus::offline(None);
        b.jid = Some("me@example.org".into());
        b.route = Some(Route::Direct);
        b.state = BridgeState::Failed;
        b.error = Some("the server refused the login".into());
        let line = BridgeLine::of(&b).expect("line");
        assert!(line.direct);
        assert!(
            line.text().contains("DIRECTLY, without Tor"),
            "{}",
            line.text()
        );
        assert!(line.text().contains("stopped on an error"));
        assert_eq!(
            line.problem.as_deref(),
            Some("the server refused the login")
        );
        b.route = Some(Route::Tor);
        b.state = BridgeState::Online;
        b.error = None;
        let line = BridgeLine::of(&b).expect("line");
        assert_eq!(
            line.text(),
            "XMPP bridge me@example.org through Tor: online"
        );
        assert_eq!(line.problem, None);
    }

    #[test]
    fn locking_forgets_the_profile() {
        let s = open(loaded(), 1, vec![msg(1, "in", "received")]);
        let s = reduce(s, Action::Locked(vec!["default".into(), "work".into()]));
        assert_eq!(s.screen, Screen::Profiles);
        assert_eq!(s.profiles, ["default", "work"]);
        assert!(s.me.is_none() && s.contacts.is_empty() && s.messages.is_empty());
        assert!(s.settings.is_none() && s.invite.is_none());
    }

    #[test]
    fn verification_updates_the_device_shown() {
        let dev = |trust: &str| DeviceView {
            device: 7,
            fingerprint: "ab".into(),
            trust: trust.into(),
            versions: vec![],
        };
        let f = FingerprintsView {
            contact: "bob".into(),
            own: dev("own"),
            devices: vec![dev("undecided")],
        };
        let s = reduce(loaded(), Action::Fingerprints(1, f));
        assert_eq!(s.pane, Pane::Verify(1));
        let s = reduce(s, Action::Verified(1, dev("verified")));
        assert_eq!(
            s.fingerprints
                .as_ref()
                .map(|(_, f)| f.devices[0].trust.as_str()),
            Some("verified")
        );
    }

    #[test]
    fn a_group_opens_beside_chats_and_a_late_refresh_of_another_does_not_steal_the_view() {
        use node::runtime::groups::{GroupPostView, GroupView};
        let g = |id: &str| GroupView {
            id: id.into(),
            name: format!("group {id}"),
            members: 3,
            member: true,
            admin: false,
        };
        let post = |b: &str| GroupPostView {
            n: 1,
            from: "ana".into(),
            body: b.into(),
            at_ms: 1,
            withdrawn: false,
        };
        let s = reduce(
            State::default(),
            Action::GroupsLoaded(vec![g("aa"), g("bb")]),
        );
        assert_eq!(s.groups.len(), 2);
        let s = reduce(
            s,
            Action::GroupOpened {
                id: "aa".into(),
                posts: vec![post("hello")],
                members: vec![],
                refresh: false,
            },
        );
        assert_eq!(s.pane, Pane::Group);
        assert_eq!(s.open_group.as_deref(), Some("aa"));
        assert_eq!(s.open, None);
        let s = reduce(
            s,
            Action::GroupOpened {
                id: "bb".into(),
                posts: vec![post("elsewhere")],
                members: vec![],
                refresh: true,
            },
        );
        assert_eq!(s.open_group.as_deref(), Some("aa"));
        assert_eq!(s.group_posts[0].body, "hello");
        let s = reduce(s, Action::GroupLinked("xmpp:x".into()));
        assert_eq!(s.pane, Pane::GroupLink);
    }
}
