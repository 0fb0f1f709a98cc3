//! The egui views: they draw a [`State`] and turn input into backend
//! commands. Text being typed lives here (it is nobody else's business);
//! everything else comes from the reducer.
//!
//! Every control has a name a screen reader reads (AccessKit): buttons by
//! their text, text fields tied to their label with `labelled_by`, the QR
//! code described. Tab moves between controls, Enter sends.

use egui::{Color32, RichText, ScrollArea, TextEdit, Ui};
use node::settings::{Jitter, Padding, Settings};
use zeroize::Zeroizing;

use crate::backend::{Backend, Command, valid_profile_name};
use crate::state::{Action, Pane, Screen, State, reduce};

const WARN: Color32 = Color32::from_rgb(0xd0, 0x80, 0x00);
const DANGER: Color32 = Color32::from_rgb(0xd0, 0x30, 0x30);
const OK: Color32 = Color32::from_rgb(0x30, 0xa0, 0x50);

/// What is being typed.
#[derive(Default)]
struct Forms {
    profile: String,
    name: String,
    pass: Zeroizing<String>,
    pass2: Zeroizing<String>,
    strength: Option<(u64, u8, String)>,
    link: String,
    link_name: String,
    compose: String,
    group_name: String,
    group_compose: String,
    settings: Option<SettingsForm>,
    bridge: BridgeForm,
    wipe_confirm: String,
    focus_compose: bool,
    heights: Heights,
}

/// Measured heights of chat messages, so that a long history lays out
/// only the messages in view.
#[derive(Default)]
struct Heights {
    width: f32,
    by_seq: std::collections::HashMap<(u64, u64), f32>,
}

#[derive(Default)]
struct BridgeForm {
    jid: String,
    password: Zeroizing<String>,
    server: String,
    ca_file: String,
    direct: bool,
}

#[derive(Clone)]
struct SettingsForm {
    s: Settings,
    retention: u32,
    listen: String,
    tor_config: String,
}

/// The app: state, what is being typed, and the backend.
pub struct App {
    /// What is shown.
    pub state: State,
    forms: Forms,
    backend: Backend,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("state", &self.state).finish()
    }
}

impl App {
    /// An app on this backend; asks for the profile list at once.
    pub fn new(backend: Backend) -> App {
        backend.send(Command::ListProfiles);
        App {
            state: State::default(),
            forms: Forms {
                profile: "default".into(),
                ..Forms::default()
            },
            backend,
        }
    }

    /// Applies the backend's answers, and asks for what they imply.
    pub fn pump(&mut self) {
        for a in self.backend.drain() {
            self.apply(a);
        }
    }

    fn apply(&mut self, a: Action) {
        use node::runtime::NodeEvent;
        // Follow-ups: a message for the open chat is loaded; a contact
        // coming or going is reloaded with its transport.
        match &a {
            Action::Node(NodeEvent::Received { contact, seq })
                if self.state.open == Some(*contact) =>
            {
                self.backend.send(Command::Fetch {
                    contact: *contact,
                    seq: *seq,
                });
            }
            Action::Node(NodeEvent::GroupPosts { .. }) => {
                if let Some(id) = self.state.open_group.clone() {
                    self.backend.send(Command::OpenGroup { id, refresh: true });
                }
            }
            Action::Unlocked { .. } => {
                self.forms.pass = Zeroizing::default();
                self.forms.pass2 = Zeroizing::default();
                self.forms.strength = None;
            }
            Action::Wiped => {
                self.forms = Forms {
                    profile: "default".into(),
                    ..Forms::default()
                };
            }
            _ => {}
        }
        let s = std::mem::take(&mut self.state);
        self.state = reduce(s, a);
    }

    fn act(&mut self, a: Action) {
        self.apply(a);
    }

    /// Draws one frame.
    pub fn ui(&mut self, ui: &mut Ui) {
        self.pump();
        self.notice(ui);
        match self.state.screen.clone() {
            Screen::Profiles => self.profiles(ui),
            Screen::Create => self.create(ui),
            Screen::Unlock(p) => self.unlock(ui, &p),
            Screen::Main => self.main(ui),
        }
    }

    fn notice(&mut self, ui: &mut Ui) {
        let Some(n) = self.state.notice.clone() else {
            return;
        };
        let mut dismiss = false;
        egui::Panel::top("notice").show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                let color = if n.error { DANGER } else { OK };
                ui.label(RichText::new(&n.text).color(color).strong());
                if ui.button("Dismiss").clicked() {
                    dismiss = true;
                }
            });
        });
        if dismiss {
            self.act(Action::Dismiss);
        }
    }

    fn busy(&self, ui: &mut Ui) -> bool {
        if let Some(b) = &self.state.busy {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label(b);
            });
            return true;
        }
        false
    }

    // ---- onboarding ----

    fn profiles(&mut self, ui: &mut Ui) {
        egui::CentralPanel::default().show(ui, |ui| {
            ui.heading("Coterie");
            ui.label(
                "Choose a profile. Each one is a separate identity: contacts cannot link them.",
            );
            ui.add_space(8.0);
            for p in self.state.profiles.clone() {
                if ui.button(format!("Open {p}")).clicked() {
                    self.act(Action::ShowUnlock(p));
                }
            }
            ui.add_space(8.0);
            if ui.button("Create a new profile").clicked() {
                self.forms.profile = next_profile_name(&self.state.profiles);
                self.act(Action::ShowCreate);
            }
        });
    }

    fn create(&mut self, ui: &mut Ui) {
        egui::CentralPanel::default().show(ui, |ui| {
            ui.heading("Create your profile");
            ui.label("Your name is what your contacts see first. The passphrase encrypts everything on this device; it cannot be recovered.");
            ui.add_space(8.0);
            let busy = self.busy(ui);
            let f = &mut self.forms;
            labelled(ui, "Profile", |ui| {
                ui.add(TextEdit::singleline(&mut f.profile).desired_width(200.0))
            });
            labelled(ui, "Your name", |ui| {
                ui.add(TextEdit::singleline(&mut f.name).desired_width(200.0))
            });
            labelled(ui, "Passphrase", |ui| {
                ui.add(
                    TextEdit::singleline(&mut *f.pass)
                        .password(true)
                        .desired_width(200.0),
                )
            });
            labelled(ui, "Repeat passphrase", |ui| {
                ui.add(
                    TextEdit::singleline(&mut *f.pass2)
                        .password(true)
                        .desired_width(200.0),
                )
            });
            let (score, advice) = strength(f);
            let words = ["very weak", "weak", "fair", "good", "strong"];
            let color = [DANGER, DANGER, WARN, OK, OK][usize::from(score)];
            ui.add(
                egui::ProgressBar::new((f32::from(score) + 1.0) / 5.0)
                    .fill(color)
                    .desired_width(300.0)
                    .text(format!("Passphrase strength: {}", words[usize::from(score)])),
            );
            if !advice.is_empty() {
                ui.label(advice);
            }
            let mismatch = !f.pass2.is_empty() && *f.pass != *f.pass2;
            if mismatch {
                ui.colored_label(DANGER, "The passphrases differ.");
            }
            let ready = !busy
                && valid_profile_name(&f.profile)
                && !f.name.trim().is_empty()
                && f.pass.chars().count() >= 8
                && *f.pass == *f.pass2;
            ui.horizontal(|ui| {
                if ui.add_enabled(ready, egui::Button::new("Create profile")).clicked() {
                    self.backend.send(Command::Create {
                        profile: self.forms.profile.trim().to_string(),
                        name: self.forms.name.trim().to_string(),
                        passphrase: self.forms.pass.clone(),
                    });
                }
                if !self.state.profiles.is_empty() && ui.button("Back").clicked() {
                    self.act(Action::ShowProfiles);
                }
            });
            if !ready && !busy {
                ui.label("Fill in a name and a passphrase of at least 8 characters, twice.");
            }
        });
    }

    fn unlock(&mut self, ui: &mut Ui, profile: &str) {
        egui::CentralPanel::default().show(ui, |ui| {
            ui.heading(format!("Unlock {profile}"));
            let busy = self.busy(ui);
            let r = labelled(ui, "Passphrase", |ui| {
                ui.add(
                    TextEdit::singleline(&mut *self.forms.pass)
                        .password(true)
                        .desired_width(240.0),
                )
            });
            if !busy && !r.has_focus() && self.forms.pass.is_empty() {
                r.request_focus();
            }
            let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            ui.horizontal(|ui| {
                let go = ui.add_enabled(!busy, egui::Button::new("Unlock")).clicked();
                if (go || enter) && !busy && !self.forms.pass.is_empty() {
                    self.backend.send(Command::Unlock {
                        profile: profile.to_string(),
                        passphrase: std::mem::take(&mut self.forms.pass),
                    });
                }
                if ui.add_enabled(!busy, egui::Button::new("Back")).clicked() {
                    self.act(Action::ShowProfiles);
                }
            });
        });
    }

    // ---- main ----

    fn main(&mut self, ui: &mut Ui) {
        self.status_bar(ui);
        self.contact_list(ui);
        egui::CentralPanel::default().show(ui, |ui| match self.state.pane.clone() {
            Pane::Chat => self.chat(ui),
            Pane::Invite => self.invite(ui),
            Pane::AddContact => self.add_contact(ui),
            Pane::Verify(c) => self.verify(ui, c),
            Pane::Settings => self.settings(ui),
            Pane::Group => self.group(ui),
            Pane::NewGroup => self.new_group(ui),
            Pane::GroupLink => self.group_link(ui),
        });
    }

    fn status_bar(&mut self, ui: &mut Ui) {
        let st = self.state.status.clone();
        egui::Panel::bottom("status").show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                match &st.tor {
                    Some(t) => {
                        ui.add(
                            egui::ProgressBar::new(f32::from(t.percent) / 100.0)
                                .desired_width(220.0)
                                .text(format!("Tor {}%: {}", t.percent, t.phase)),
                        );
                        ui.label(format!("Onion service: {}", t.service));
                    }
                    None => {
                        ui.label("Tor: off");
                    }
                }
                ui.separator();
                ui.label(if st.lan {
                    "LAN discovery: on"
                } else {
                    "LAN discovery: off"
                });
                ui.separator();
                ui.label(format!("Live sessions: {}", st.sessions));
                if let Some(b) = &st.bridge {
                    ui.separator();
                    if b.direct {
                        ui.colored_label(DANGER, b.text());
                    } else {
                        ui.label(b.text());
                    }
                }
            });
            if let Some(p) = st.tor.as_ref().and_then(|t| t.problem.as_ref()) {
                ui.colored_label(WARN, p);
            }
            if let Some(p) = st.bridge.as_ref().and_then(|b| b.problem.as_ref()) {
                ui.colored_label(WARN, format!("Bridge: {p}"));
            }
        });
    }

    fn contact_list(&mut self, ui: &mut Ui) {
        egui::Panel::left("contacts")
            .resizable(true)
            .default_size(240.0)
            .show(ui, |ui| {
                if let Some(me) = &self.state.me {
                    ui.label(
                        RichText::new(self.state.profile.clone().unwrap_or_default()).strong(),
                    );
                    ui.label(RichText::new(short_fp(&me.fingerprint)).monospace().small())
                        .on_hover_text("Your fingerprint");
                }
                ui.horizontal_wrapped(|ui| {
                    if ui.button("Invite someone").clicked() {
                        self.backend.send(Command::Invite);
                    }
                    if ui.button("Add contact").clicked() {
                        self.act(Action::ShowPane(Pane::AddContact));
                    }
                    if ui.button("Settings").clicked() {
                        self.forms.settings = None;
                        self.act(Action::ShowPane(Pane::Settings));
                    }
                    if ui
                        .button("Lock")
                        .on_hover_text("Close this profile")
                        .clicked()
                    {
                        self.forms = Forms {
                            profile: "default".into(),
                            ..Forms::default()
                        };
                        self.backend.send(Command::Lock);
                    }
                });
                ui.separator();
                ui.horizontal(|ui| {
                    ui.label(RichText::new("Groups").strong());
                    if ui.button("New group").clicked() {
                        self.act(Action::ShowPane(Pane::NewGroup));
                    }
                });
                let groups: Vec<_> = self.state.groups.values().cloned().collect();
                for g in groups {
                    let plural = if g.members == 1 { "" } else { "s" };
                    let mut text = format!("{} — {} member{plural}", g.name, g.members);
                    if !g.member {
                        text.push_str(" (left)");
                    }
                    let selected = self.state.open_group.as_deref() == Some(g.id.as_str())
                        && matches!(self.state.pane, Pane::Group | Pane::GroupLink);
                    if ui.selectable_label(selected, text).clicked() {
                        self.backend.send(Command::OpenGroup {
                            id: g.id.clone(),
                            refresh: false,
                        });
                    }
                }
                ui.separator();
                if self.state.contacts.is_empty() {
                    ui.label("No contacts yet. Invite someone, or add their invite link.");
                }
                let now = node::ops::now_secs();
                let rows: Vec<_> = self.state.contacts.values().cloned().collect();
                ScrollArea::vertical()
                    .id_salt("contact-list")
                    .show(ui, |ui| {
                        for r in rows {
                            let mut text = format!("{} — {}", r.view.name, r.reach());
                            if r.unread > 0 {
                                text.push_str(&format!(" · {} unread", r.unread));
                            }
                            let selected = self.state.open == Some(r.id);
                            let resp = ui.selectable_label(selected, text);
                            let resp = match (r.online, r.view.last_seen) {
                                (false, Some(t)) => {
                                    resp.on_hover_text(format!("last seen {}", ago(now, t)))
                                }
                                _ => resp,
                            };
                            if resp.clicked() {
                                self.backend.send(Command::Open(r.id));
                                self.forms.focus_compose = true;
                            }
                            if !r.online
                                && let Some(t) = r.view.last_seen
                            {
                                ui.label(
                                    RichText::new(format!("last seen {}", ago(now, t)))
                                        .small()
                                        .weak(),
                                );
                            }
                        }
                    });
            });
    }

    fn chat(&mut self, ui: &mut Ui) {
        let Some(id) = self.state.open else {
            ui.label("Pick a contact to chat with.");
            return;
        };
        let Some(row) = self.state.contacts.get(&id).cloned() else {
            return;
        };
        ui.horizontal(|ui| {
            ui.heading(&row.view.name);
            ui.label(row.reach());
            if row.view.queued > 0 {
                ui.label(format!("{} waiting", row.view.queued));
            }
            if !row.view.cleartext && ui.button("Verify fingerprints").clicked() {
                self.backend.send(Command::Fingerprints(id));
            }
            if ui.button("Close chat").clicked() {
                self.act(Action::ChatClosed);
            }
        });
        if row.view.cleartext {
            ui.colored_label(
                DANGER,
                "Cleartext chat with a classic XEP-0174 client: NOT encrypted, anyone on the network can read it.",
            );
        }
        ui.separator();
        // Composer at the bottom, history fills the rest.
        let mut send = false;
        egui::Panel::bottom("composer").show(ui, |ui| {
            ui.horizontal(|ui| {
                let label = ui.label("Message");
                let r = ui
                    .add(
                        TextEdit::singleline(&mut self.forms.compose)
                            .hint_text("Write a message")
                            .desired_width(ui.available_width() - 80.0),
                    )
                    .labelled_by(label.id);
                if self.forms.focus_compose {
                    r.request_focus();
                    self.forms.focus_compose = false;
                }
                if r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                    send = true;
                    r.request_focus();
                }
                if ui.button("Send").clicked() {
                    send = true;
                }
            });
        });
        if send && !self.forms.compose.trim().is_empty() {
            self.backend.send(Command::Send {
                contact: id,
                text: std::mem::take(&mut self.forms.compose),
            });
        }
        let older = self.state.older;
        let first = self.state.messages.first().map(|m| m.seq);
        if older
            && let Some(first) = first
            && ui.button("Load earlier messages").clicked()
        {
            self.backend.send(Command::Older {
                contact: id,
                before: first,
            });
        }
        history(ui, id, &self.state.messages, &mut self.forms.heights);
    }

    fn new_group(&mut self, ui: &mut Ui) {
        ui.heading("New group");
        ui.label("A group has no server: every member keeps it, and it works while any member, you included, is offline. You will be its admin.");
        let f = &mut self.forms;
        labelled(ui, "Group name", |ui| {
            ui.add(TextEdit::singleline(&mut f.group_name).desired_width(280.0))
        });
        let name = f.group_name.trim().to_string();
        if ui
            .add_enabled(!name.is_empty(), egui::Button::new("Create group"))
            .clicked()
        {
            f.group_name.clear();
            self.backend.send(Command::CreateGroup(name));
        }
    }

    fn group(&mut self, ui: &mut Ui) {
        let Some(id) = self.state.open_group.clone() else {
            ui.label("Pick a group.");
            return;
        };
        let Some(g) = self.state.groups.get(&id).cloned() else {
            return;
        };
        ui.horizontal(|ui| {
            ui.heading(&g.name);
            ui.label(format!(
                "{} member{}",
                g.members,
                if g.members == 1 { "" } else { "s" }
            ));
            if g.admin && ui.button("Invite link").clicked() {
                self.backend.send(Command::GroupLink(id.clone()));
            }
            if g.member && ui.button("Leave group").clicked() {
                self.backend.send(Command::LeaveGroup(id.clone()));
            }
        });
        if !g.member {
            ui.colored_label(WARN, "You are no longer a member: nothing new reaches you.");
        }
        egui::Panel::right("members")
            .resizable(true)
            .default_size(200.0)
            .show(ui, |ui| {
                ui.label(RichText::new("Members").strong());
                for m in &self.state.group_members {
                    let mut notes = Vec::new();
                    if m.admin {
                        notes.push("admin");
                    }
                    if !m.me {
                        notes.push(if m.online {
                            "connected"
                        } else if !m.contact {
                            "through others"
                        } else {
                            "offline"
                        });
                    }
                    ui.label(format!("{} — {}", m.name, notes.join(", ")))
                        .on_hover_text(format!("key {}", m.key));
                }
            });
        let mut send = false;
        egui::Panel::bottom("group-composer").show(ui, |ui| {
            ui.horizontal(|ui| {
                let label = ui.label("Message to the group");
                let r = ui
                    .add_enabled(
                        g.member,
                        TextEdit::singleline(&mut self.forms.group_compose)
                            .hint_text("Write to everyone")
                            .desired_width(ui.available_width() - 80.0),
                    )
                    .labelled_by(label.id);
                if r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                    send = true;
                    r.request_focus();
                }
                if ui
                    .add_enabled(g.member, egui::Button::new("Send"))
                    .clicked()
                {
                    send = true;
                }
            });
        });
        if send && !self.forms.group_compose.trim().is_empty() {
            self.backend.send(Command::SendGroup {
                id,
                text: std::mem::take(&mut self.forms.group_compose),
            });
        }
        ScrollArea::vertical()
            .id_salt("group-history")
            .stick_to_bottom(true)
            .show(ui, |ui| {
                if self.state.group_posts.is_empty() {
                    ui.label("No messages yet.");
                }
                for p in &self.state.group_posts {
                    if p.withdrawn {
                        ui.label(
                            RichText::new(format!(
                                "[{}] {}: (withdrawn: written after they left)",
                                clock(p.at_ms),
                                p.from
                            ))
                            .weak(),
                        );
                    } else {
                        ui.label(format!("[{}] {}: {}", clock(p.at_ms), p.from, p.body));
                    }
                }
            });
    }

    fn group_link(&mut self, ui: &mut Ui) {
        let name = self
            .state
            .open_group
            .as_ref()
            .and_then(|id| self.state.groups.get(id))
            .map(|g| g.name.clone())
            .unwrap_or_default();
        ui.heading(format!("Join {name}"));
        let Some(link) = self.state.group_link.clone() else {
            ui.label("Making a link…");
            return;
        };
        ui.label("Show this in the room: whoever scans or pastes it (Add contact) becomes your contact and a member. It works for 2 hours, for up to 50 people; anyone who sees it can join, so show it only to the people in the room.");
        let mut shown = link.clone();
        labelled(ui, "Group link", |ui| {
            ui.add(
                TextEdit::multiline(&mut shown)
                    .desired_rows(2)
                    .desired_width(ui.available_width()),
            )
        });
        ui.horizontal(|ui| {
            if ui.button("Copy link").clicked() {
                ui.ctx().copy_text(link.clone());
                self.act(Action::Info("Link copied.".into()));
            }
            if ui.button("Back to the group").clicked() {
                self.act(Action::ShowPane(Pane::Group));
            }
        });
        ui.add_space(8.0);
        crate::qr::show(ui, &link, "QR code of the group link");
    }

    fn invite(&mut self, ui: &mut Ui) {
        ui.heading("Invite someone");
        let Some(link) = self.state.invite.clone() else {
            ui.label("Making an invite…");
            return;
        };
        ui.label("Give this link to one person, in person or over a channel you trust. It works once, for 7 days; whoever has it can become your contact.");
        let mut shown = link.clone();
        labelled(ui, "Invite link", |ui| {
            ui.add(
                TextEdit::multiline(&mut shown)
                    .desired_rows(2)
                    .desired_width(ui.available_width()),
            )
        });
        if ui.button("Copy link").clicked() {
            ui.ctx().copy_text(link.clone());
            self.act(Action::Info("Link copied.".into()));
        }
        ui.add_space(8.0);
        crate::qr::show(ui, &link, "QR code of the invite link");
    }

    fn add_contact(&mut self, ui: &mut Ui) {
        ui.heading("Add a contact");
        ui.label("Paste the invite link they gave you, or the XMPP address (xmpp:friend@example.org) of a friend on Conversations, Dino or Gajim: they are reached through the bridge (Settings).");
        let f = &mut self.forms;
        labelled(ui, "Invite link or XMPP address", |ui| {
            ui.add(TextEdit::singleline(&mut f.link).desired_width(ui.available_width()))
        });
        labelled(ui, "Their name (optional)", |ui| {
            ui.add(TextEdit::singleline(&mut f.link_name).desired_width(200.0))
        });
        let link = f.link.trim();
        let bridged = link.starts_with("xmpp:") && !link.contains('?') && link.contains('@');
        let ready = link.contains("coterie-invite") || bridged;
        if !link.is_empty() && !ready {
            ui.colored_label(
                DANGER,
                "That is neither a Coterie invite link (xmpp:…?coterie-invite;…) nor an XMPP address (xmpp:friend@example.org).",
            );
        }
        if bridged {
            ui.colored_label(
                WARN,
                "A friend on ordinary XMPP: their server sees that you write to each other (not what). Their devices are trusted until you compare fingerprints.",
            );
        }
        if ui.add_enabled(ready, egui::Button::new("Add")).clicked() {
            let link = std::mem::take(&mut self.forms.link);
            let name = std::mem::take(&mut self.forms.link_name);
            self.backend.send(Command::Add {
                link,
                name: Some(name),
            });
        }
    }

    fn verify(&mut self, ui: &mut Ui, contact: u64) {
        let Some((c, f)) = self.state.fingerprints.clone() else {
            return;
        };
        if c != contact {
            return;
        }
        ui.heading(format!("Verify {}", f.contact));
        ui.label(format!(
            "Compare these with {} in person or on a call. Mark a device verified only if its fingerprint matches what they read out.",
            f.contact
        ));
        ui.add_space(8.0);
        ui.columns(2, |cols| {
            cols[0].label(RichText::new("Your fingerprint").strong());
            cols[0].label(RichText::new(&f.own.fingerprint).monospace());
            cols[1].label(RichText::new(format!("{}'s devices", f.contact)).strong());
            if f.devices.is_empty() {
                cols[1].label("No device known yet: you will see it after your first session.");
            }
            for d in &f.devices {
                cols[1].label(RichText::new(&d.fingerprint).monospace());
                if d.trust == "verified" {
                    cols[1].colored_label(OK, format!("Device {}: verified", d.device));
                } else {
                    let why = if d.trust == "pinned" {
                        "the key from the invite, not compared yet"
                    } else {
                        "NOT verified: nothing is encrypted to it until you verify it"
                    };
                    cols[1].colored_label(WARN, format!("Device {}: {why}", d.device));
                    if cols[1]
                        .button(format!("Mark device {} verified", d.device))
                        .clicked()
                    {
                        self.backend.send(Command::Verify {
                            contact,
                            device: d.device,
                        });
                    }
                }
            }
        });
        if ui.button("Back to the chat").clicked() {
            self.act(Action::ShowPane(Pane::Chat));
        }
    }

    fn settings(&mut self, ui: &mut Ui) {
        ui.heading("Settings");
        let Some((stored, retention)) = self.state.settings.clone() else {
            return;
        };
        let form = self.forms.settings.get_or_insert_with(|| SettingsForm {
            listen: stored.listen.join(", "),
            tor_config: stored.tor_config.clone().unwrap_or_default(),
            s: stored.clone(),
            retention,
        });
        ScrollArea::vertical().id_salt("settings").show(ui, |ui| {
            labelled(ui, "Keep messages for (days, 0 = forever)", |ui| {
                ui.add(egui::DragValue::new(&mut form.retention).range(0..=36_500))
            });
            ui.separator();
            ui.label(RichText::new("Padding").strong());
            ui.label("Every write is padded to a size class so its length says little about the message.");
            for p in Padding::ALL {
                let text = match p {
                    Padding::Light => "Light: 7 size classes, at most 2× the bytes",
                    Padding::Standard => "Standard: 4 size classes, at most 4× the bytes",
                    Padding::Strong => "Strong: 2 size classes (4 and 16 KiB); slowest over Tor",
                };
                ui.radio_value(&mut form.s.padding, p, text);
            }
            ui.label(RichText::new("Jitter").strong());
            for j in Jitter::ALL {
                let text = match j {
                    Jitter::Off => "Off: messages leave at once",
                    Jitter::Light => "Light: up to 0.3 s before a message leaves",
                    Jitter::Strong => "Strong: up to 1.5 s",
                };
                ui.radio_value(&mut form.s.jitter, j, text);
            }
            ui.separator();
            ui.label(RichText::new("Messages for contacts who are offline").strong());
            ui.label("A holder is a contact of both of you (a friend, or an always-on box running `coterie serve`). It keeps only the encrypted message; it sees whom it is for, when and how big.");
            ui.checkbox(
                &mut form.s.hold.use_holders,
                "Leave my messages for offline contacts with holders",
            );
            labelled(ui, "Holders keep them for (hours)", |ui| {
                ui.add(egui::DragValue::new(&mut form.s.hold.ttl_hours).range(1..=336))
            });
            ui.checkbox(&mut form.s.hold.offer, "Hold messages between my contacts for them");
            ui.separator();
            ui.label(RichText::new("Network (applies at the next start)").strong());
            ui.checkbox(&mut form.s.tor, "Tor: be reachable as an onion service, reach contacts from anywhere");
            labelled(ui, "Tor configuration file (arti TOML, for bridges)", |ui| {
                ui.add(TextEdit::singleline(&mut form.tor_config).desired_width(260.0))
            });
            ui.checkbox(&mut form.s.lan, "LAN discovery: find contacts on this network (encrypted records only they can read)");
            labelled(ui, "Listen on (IP:PORT, comma-separated)", |ui| {
                ui.add(
                    TextEdit::singleline(&mut form.listen)
                        .hint_text("127.0.0.1:7474")
                        .desired_width(260.0),
                )
            });
            ui.checkbox(&mut form.s.compat, "XEP-0174 compatibility with classic clients (DANGEROUS)");
            if form.s.compat {
                ui.colored_label(
                    DANGER,
                    "Your name is announced on the LAN in the clear, and chats with classic clients are NOT encrypted: anyone on the network can read them and pretend to be them.",
                );
            }
            if ui.button("Save settings").clicked() {
                let mut s = form.s.clone();
                s.listen = form
                    .listen
                    .split(',')
                    .map(|x| x.trim().to_string())
                    .filter(|x| !x.is_empty())
                    .collect();
                s.tor_config = Some(form.tor_config.trim().to_string()).filter(|x| !x.is_empty());
                self.backend.send(Command::Save {
                    settings: s,
                    retention: form.retention,
                });
            }
            ui.separator();
            ui.label(RichText::new("Bridge to XMPP").strong());
            ui.label("Log into an ordinary XMPP account to chat, OMEMO-encrypted, with friends on Conversations, Dino or Gajim. The server keeps no roster, bookmarks or profile of yours; it sees whom you write to and when.");
            match &self.state.status.bridge {
                Some(b) => {
                    ui.label(b.text());
                    if ui.button("Log out and forget the account").clicked() {
                        self.backend.send(Command::BridgeOff);
                    }
                }
                None => {
                    ui.label("No account set.");
                }
            }
            let b = &mut self.forms.bridge;
            labelled(ui, "Account (user@example.org)", |ui| {
                ui.add(TextEdit::singleline(&mut b.jid).desired_width(260.0))
            });
            labelled(ui, "Password", |ui| {
                ui.add(
                    TextEdit::singleline(&mut *b.password)
                        .password(true)
                        .desired_width(260.0),
                )
            });
            labelled(ui, "Server (HOST:PORT, optional)", |ui| {
                ui.add(
                    TextEdit::singleline(&mut b.server)
                        .hint_text("the account's domain on 5222")
                        .desired_width(260.0),
                )
            });
            labelled(ui, "Server's CA certificate (PEM file, optional)", |ui| {
                ui.add(TextEdit::singleline(&mut b.ca_file).desired_width(260.0))
            });
            ui.checkbox(&mut b.direct, "Connect without Tor (DANGEROUS)");
            if b.direct {
                ui.colored_label(
                    DANGER,
                    "The server, and everyone on the way, sees this device's IP address.",
                );
            }
            let ready = b.jid.contains('@') && !b.password.is_empty();
            if ui
                .add_enabled(ready, egui::Button::new("Log in"))
                .clicked()
            {
                let b = std::mem::take(&mut self.forms.bridge);
                self.backend.send(Command::BridgeSet {
                    jid: b.jid,
                    password: b.password,
                    server: b.server,
                    ca_file: b.ca_file,
                    direct: b.direct,
                });
            }
            ui.separator();
            ui.label(RichText::new("Wipe this profile").strong().color(DANGER));
            ui.label("Deletes your identity, contacts and every message on this device, irrecoverably.");
            labelled(ui, "Type wipe to confirm", |ui| {
                ui.add(TextEdit::singleline(&mut self.forms.wipe_confirm).desired_width(120.0))
            });
            let armed = self.forms.wipe_confirm.trim() == "wipe";
            if ui
                .add_enabled(armed, egui::Button::new(RichText::new("Wipe now").color(DANGER)))
                .clicked()
            {
                self.forms.wipe_confirm.clear();
                self.backend.send(Command::Wipe);
            }
        });
    }
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        App::ui(self, ui);
    }
}

/// Height assumed for a message not yet laid out.
const ESTIMATE: f32 = 40.0;

/// The chat history as a virtual list: every message has a place (its
/// measured height, or an estimate until it was first shown), but only
/// those in view are laid out, so a frame costs the same with 100 or
/// 10,000 messages loaded.
fn history(ui: &mut Ui, contact: u64, msgs: &[node::ops::MessageView], h: &mut Heights) {
    let width = ui.available_width();
    if (width - h.width).abs() > 0.5 {
        // Text wraps differently: measure again.
        h.by_seq.clear();
        h.width = width;
    }
    let gap = ui.spacing().item_spacing.y;
    let mut tops = Vec::with_capacity(msgs.len() + 1);
    let mut y = 0.0;
    for m in msgs {
        tops.push(y);
        y += h.by_seq.get(&(contact, m.seq)).copied().unwrap_or(ESTIMATE) + gap;
    }
    tops.push(y);
    let total = y;
    ScrollArea::vertical()
        .id_salt(("history", contact))
        .stick_to_bottom(true)
        .auto_shrink([false, false])
        .show_viewport(ui, |ui, view| {
            ui.set_min_height(total);
            let origin = ui.min_rect().min;
            let start = tops.partition_point(|t| *t <= view.min.y).saturating_sub(1);
            let end = tops.partition_point(|t| *t < view.max.y).min(msgs.len());
            for (i, m) in msgs.iter().enumerate().take(end).skip(start) {
                let rect = egui::Rect::from_min_size(
                    origin + egui::vec2(0.0, tops[i]),
                    egui::vec2(width, f32::INFINITY),
                );
                let r = ui
                    .scope_builder(egui::UiBuilder::new().max_rect(rect), |ui| message(ui, m))
                    .response;
                h.by_seq.insert((contact, m.seq), r.rect.height());
            }
        });
}

/// A text field (or other widget) with a visible label that is also its
/// accessible name.
fn labelled(
    ui: &mut Ui,
    label: &str,
    add: impl FnOnce(&mut Ui) -> egui::Response,
) -> egui::Response {
    ui.horizontal(|ui| {
        let l = ui.label(label);
        add(ui).labelled_by(l.id)
    })
    .inner
}

fn message(ui: &mut Ui, m: &node::ops::MessageView) {
    let out = m.dir == "out";
    let layout = if out {
        egui::Layout::right_to_left(egui::Align::TOP)
    } else {
        egui::Layout::left_to_right(egui::Align::TOP)
    };
    ui.with_layout(layout, |ui| {
        ui.vertical(|ui| {
            let mut meta = clock(m.ts);
            if out {
                meta.push_str(" · ");
                meta.push_str(&m.state);
            }
            let body = match &m.undecryptable {
                Some(why) => RichText::new(format!("(could not decrypt: {why})")).italics(),
                None => RichText::new(&m.body),
            };
            ui.label(body);
            ui.horizontal(|ui| {
                ui.label(RichText::new(meta).small().weak());
                if m.unverified {
                    ui.label(RichText::new("unverified device").small().color(WARN));
                }
                if m.cleartext {
                    ui.label(RichText::new("cleartext").small().color(DANGER));
                }
            });
        });
    });
}

/// `HH:MM` (UTC) of a Unix-milliseconds time.
fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    format!("{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60)
}

fn ago(now: u64, then: u64) -> String {
    let d = now.saturating_sub(then);
    match d {
        0..60 => "just now".into(),
        60..3600 => format!("{} min ago", d / 60),
        3600..86_400 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86_400),
    }
}

fn short_fp(fp: &str) -> String {
    fp.split_whitespace().take(4).collect::<Vec<_>>().join(" ")
}

fn next_profile_name(existing: &[String]) -> String {
    if !existing.iter().any(|p| p == "default") {
        return "default".into();
    }
    (2..)
        .map(|i| format!("profile-{i}"))
        .find(|n| !existing.contains(n))
        .unwrap_or_default()
}

/// zxcvbn's score 0–4 and its advice, computed once per passphrase.
fn strength(f: &mut Forms) -> (u8, String) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    f.pass.hash(&mut h);
    f.name.hash(&mut h);
    let key = h.finish();
    if let Some((k, s, a)) = &f.strength
        && *k == key
    {
        return (*s, a.clone());
    }
    let (score, advice) = if f.pass.is_empty() {
        (0, String::new())
    } else {
        let e = zxcvbn::zxcvbn(&f.pass, &[f.name.as_str()]);
        let advice = e
            .feedback()
            .map(|fb| {
                let mut parts: Vec<String> =
                    fb.warning().map(|w| w.to_string()).into_iter().collect();
                parts.extend(fb.suggestions().iter().map(|s| s.to_string()));
                parts.join(" ")
            })
            .unwrap_or_default();
        (u8::from(e.score()), advice)
    };
    f.strength = Some((key, score, advice.clone()));
    (score, advice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable;

    #[test]
    fn messages_show_their_state_and_flag_unverified_devices_and_cleartext() {
        let m = |seq, dir: &str, state: &str, unverified, cleartext| node::ops::MessageView {
            seq,
            dir: dir.into(),
            body: format!("body {seq}"),
            ts: 3_600_000,
            state: state.into(),
            unverified,
            undecryptable: None,
            cleartext,
        };
        let list = vec![
            m(1, "out", "queued", false, false),
            m(2, "in", "received", true, false),
            m(3, "in", "received", false, true),
        ];
        let mut h = Harness::new_ui(|ui| {
            for x in &list {
                message(ui, x);
            }
        });
        h.run();
        assert!(h.query_by_label("01:00 · queued").is_some());
        assert_eq!(h.query_all_by_label("unverified device").count(), 1);
        assert_eq!(h.query_all_by_label("cleartext").count(), 1);
    }

    #[test]
    fn profile_names_and_times_read_well() {
        assert_eq!(next_profile_name(&[]), "default");
        assert_eq!(
            next_profile_name(&["default".into(), "profile-2".into()]),
            "profile-3"
        );
        assert_eq!(clock(3_723_000), "01:02");
        assert_eq!(ago(1000, 990), "just now");
        assert_eq!(ago(10_000, 10_000 - 7200), "2 h ago");
        assert_eq!(short_fp("aaaa bbbb cccc dddd eeee"), "aaaa bbbb cccc dddd");
    }
}
