//! The real widgets, driven through their accessible names (egui_kittest):
//! onboarding, adding a contact, sending, verifying. Each app runs a real
//! backend and node on 127.0.0.1 (no Tor, no LAN: nothing leaves loopback).
//! After every settled frame the harness also checks that every control
//! has an accessible name.

use std::path::Path;
use std::time::{Duration, Instant};

use coterie_ui::state::{Pane, Screen};
use coterie_ui::{App, Backend, BackendConfig};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use node::store::crypto::KdfParams;

fn backend(base: &Path) -> Backend {
    let mut kdf = KdfParams::recommended();
    // Cheap keys: these tests are about widgets, not Argon2.
    kdf.m_kib = 256;
    kdf.t = 1;
    Backend::start(
        BackendConfig {
            base: base.to_path_buf(),
            kdf,
            no_tor: true,
            no_lan: true,
            listen: Some("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"))),
        },
        || {},
    )
}

fn harness(base: &Path) -> Harness<'static, App> {
    Harness::builder()
        .with_size([1000.0, 700.0])
        .build_ui_state(|ui, app: &mut App| app.ui(ui), App::new(backend(base)))
}

/// Steps frames until `cond` holds (the backend answers asynchronously).
fn until(h: &mut Harness<'_, App>, what: &str, cond: impl Fn(&App) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        h.step();
        if cond(h.state()) {
            // Let the frame that shows it settle, then check every control
            // is named.
            h.step();
            h.step();
            h.check_accessibility();
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; state: {:?}",
            h.state().state
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn type_into(h: &mut Harness<'_, App>, label: &str, text: &str) {
    h.get_by_label(label).scroll_to_me();
    h.step();
    h.get_by_label(label).focus();
    h.step();
    h.get_by_label(label).type_text(text);
    h.step();
}

fn click(h: &mut Harness<'_, App>, label: &str) {
    // Controls below a scroll area's fold are scrolled into view first, as
    // a person would.
    h.get_by_label(label).scroll_to_me();
    h.step();
    h.get_by_label(label).click();
    // One frame handles the click, the next shows what it changed.
    h.step();
    h.step();
}

fn create(h: &mut Harness<'_, App>, name: &str, pass: &str) {
    until(h, "the create form (no profile yet)", |a| {
        a.state.screen == Screen::Create
    });
    type_into(h, "Your name", name);
    type_into(h, "Passphrase", pass);
    type_into(h, "Repeat passphrase", pass);
    h.step();
    click(h, "Create profile");
    until(h, "the profile to open", |a| a.state.screen == Screen::Main);
}

#[test]
fn onboarding_creates_a_profile_then_refuses_a_wrong_passphrase_and_opens_with_the_right_one() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    {
        let mut h = harness(dir.path());
        until(&mut h, "the create form", |a| {
            a.state.screen == Screen::Create
        });
        // The create button stays disabled until the form is complete.
        type_into(&mut h, "Your name", "alice");
        type_into(&mut h, "Passphrase", "short");
        h.step();
        assert!(
            h.query_by_label_contains("Passphrase strength: very weak")
                .is_some(),
            "the strength of a weak passphrase is shown"
        );
        click(&mut h, "Create profile");
        h.step();
        assert_eq!(
            h.state().state.screen,
            Screen::Create,
            "not created with a short passphrase"
        );
        // Strength goes up with a better one.
        h.get_by_label("Passphrase").focus();
        h.step();
        h.get_by_label("Passphrase")
            .type_text(" correct horse battery staple");
        type_into(
            &mut h,
            "Repeat passphrase",
            "short correct horse battery staple",
        );
        h.step();
        assert!(
            h.query_by_label_contains("Passphrase strength: strong")
                .is_some()
                || h.query_by_label_contains("Passphrase strength: good")
                    .is_some(),
            "a long passphrase is rated good or strong"
        );
        click(&mut h, "Create profile");
        until(&mut h, "the main screen", |a| {
            a.state.screen == Screen::Main
        });
        assert!(h.query_by_label("Invite someone").is_some());
        assert!(h.query_by_label_contains("No contacts yet").is_some());
    }
    // A new start: the chooser lists the profile; a wrong passphrase is a
    // clear message and leaves the form up.
    let mut h = harness(dir.path());
    until(&mut h, "the profile list", |a| {
        a.state.screen == Screen::Profiles && a.state.profiles == ["default"]
    });
    click(&mut h, "Open default");
    type_into(&mut h, "Passphrase", "not the passphrase");
    click(&mut h, "Unlock");
    until(&mut h, "the refusal", |a| {
        a.state.notice.as_ref().is_some_and(|n| n.error)
    });
    assert!(h.query_by_label_contains("Wrong passphrase").is_some());
    assert_eq!(h.state().state.screen, Screen::Unlock("default".into()));
    type_into(&mut h, "Passphrase", "short correct horse battery staple");
    click(&mut h, "Unlock");
    until(&mut h, "the main screen", |a| {
        a.state.screen == Screen::Main
    });
    // Lock, then make a second, unlinkable profile beside it: the chooser
    // shows both.
    click(&mut h, "Lock");
    until(&mut h, "the profile list", |a| {
        a.state.screen == Screen::Profiles
    });
    assert!(
        h.state().state.me.is_none(),
        "nothing of the closed profile is kept"
    );
    click(&mut h, "Create a new profile");
    type_into(&mut h, "Your name", "alice at work");
    type_into(&mut h, "Passphrase", "another long passphrase");
    type_into(&mut h, "Repeat passphrase", "another long passphrase");
    click(&mut h, "Create profile");
    until(&mut h, "the second profile open", |a| {
        a.state.screen == Screen::Main && a.state.profile.as_deref() == Some("profile-2")
    });
    click(&mut h, "Lock");
    until(&mut h, "both profiles listed", |a| {
        a.state.screen == Screen::Profiles && a.state.profiles == ["default", "profile-2"]
    });
    assert!(h.query_by_label("Open default").is_some());
    assert!(h.query_by_label("Open profile-2").is_some());
}

#[test]
fn the_status_bar_shows_tor_progress_lan_and_problems() {
    use coterie_ui::state::{BridgeLine, Status, TorLine};
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut h = harness(dir.path());
    create(&mut h, "alice", "alice passphrase one");
    h.state_mut().state.status = Status {
        tor: Some(TorLine {
            percent: 45,
            phase: "fetching directory".into(),
            service: "Bootstrapping".into(),
            problem: Some("Tor has not connected after 30 s: check the network".into()),
        }),
        bridge: Some(BridgeLine {
            jid: "me@example.org".into(),
            state: "online".into(),
            direct: true,
            problem: None,
        }),
        lan: true,
        listening: vec![],
        sessions: 0,
    };
    h.step();
    h.step();
    assert!(h.query_by_label("Tor 45%: fetching directory").is_some());
    // A bridge without Tor says so in the status bar.
    assert!(
        h.query_by_label("XMPP bridge me@example.org DIRECTLY, without Tor: online")
            .is_some()
    );
    assert!(h.query_by_label("Onion service: Bootstrapping").is_some());
    assert!(h.query_by_label("LAN discovery: on").is_some());
    assert!(h.query_by_label_contains("Tor has not connected").is_some());
}

#[test]
fn two_apps_add_each_other_chat_and_verify() {
    let da = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut a = harness(da.path());
    let mut b = harness(db.path());
    create(&mut a, "alice", "alice passphrase one");
    create(&mut b, "bob", "bob passphrase two");

    // Alice makes an invite: a link and a QR code.
    click(&mut a, "Invite someone");
    until(&mut a, "the invite", |x| x.state.invite.is_some());
    assert_eq!(a.state().state.pane, Pane::Invite);
    assert!(a.query_by_label("QR code of the invite link").is_some());
    let link = a.state().state.invite.clone().unwrap_or_default();
    assert!(link.contains("coterie-invite"), "{link}");

    // Bob pastes it.
    click(&mut b, "Add contact");
    type_into(&mut b, "Invite link or XMPP address", "not a link");
    assert!(
        b.query_by_label_contains("That is neither a Coterie invite link")
            .is_some()
    );
    b.get_by_label("Invite link or XMPP address").focus();
    b.step();
    b.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    b.step();
    b.get_by_label("Invite link or XMPP address")
        .type_text(&link);
    b.step();
    type_into(&mut b, "Their name (optional)", "alice");
    click(&mut b, "Add");
    // Both show the other as connected over the LAN (TCP on loopback).
    until(&mut b, "alice connected", |x| {
        x.state
            .contacts
            .values()
            .any(|c| c.view.name == "alice" && c.online)
    });
    until(&mut a, "bob connected", |x| {
        x.state.contacts.values().any(|c| c.online)
    });
    assert!(b.query_by_label_contains("alice — LAN").is_some());

    // Bob opens the chat and sends with Enter.
    click(&mut b, "alice — LAN");
    until(&mut b, "the chat", |x| x.state.open.is_some());
    type_into(&mut b, "Message", "hello from the widgets");
    b.key_press(egui::Key::Enter);
    b.step();
    until(&mut b, "the message delivered", |x| {
        x.state
            .messages
            .iter()
            .any(|m| m.body == "hello from the widgets" && m.state == "delivered")
    });
    // Alice sees it as unread, then opens the chat.
    until(&mut a, "an unread message", |x| {
        x.state.contacts.values().any(|c| c.unread == 1)
    });
    let bob_row = a
        .state()
        .state
        .contacts
        .values()
        .find(|c| c.unread == 1)
        .map(|c| format!("{} — LAN · 1 unread", c.view.name))
        .unwrap_or_default();
    click(&mut a, &bob_row);
    until(&mut a, "the message in alice's chat", |x| {
        x.state
            .messages
            .iter()
            .any(|m| m.body == "hello from the widgets")
    });
    assert!(a.query_by_label("hello from the widgets").is_some());
    // Bob's one device is the key his invite pinned: not flagged.
    assert!(a.query_by_label("unverified device").is_none());

    // Verification: both fingerprints side by side, then mark verified.
    click(&mut a, "Verify fingerprints");
    until(&mut a, "the fingerprints", |x| {
        x.state
            .fingerprints
            .as_ref()
            .is_some_and(|(_, f)| !f.devices.is_empty())
    });
    assert!(a.query_by_label("Your fingerprint").is_some());
    let dev = a
        .state()
        .state
        .fingerprints
        .as_ref()
        .map(|(_, f)| f.devices[0].device)
        .unwrap_or_default();
    click(&mut a, &format!("Mark device {dev} verified"));
    until(&mut a, "the device verified", |x| {
        x.state
            .fingerprints
            .as_ref()
            .is_some_and(|(_, f)| f.devices[0].trust == "verified")
    });
    assert!(
        a.query_by_label(&format!("Device {dev}: verified"))
            .is_some()
    );
}

#[test]
fn sending_to_an_offline_contact_queues_then_delivers_when_it_returns() {
    let da = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut a = harness(da.path());
    create(&mut a, "alice", "alice passphrase one");
    click(&mut a, "Invite someone");
    until(&mut a, "the invite", |x| x.state.invite.is_some());
    let link = a.state().state.invite.clone().unwrap_or_default();
    {
        let mut b = harness(db.path());
        create(&mut b, "bob", "bob passphrase two");
        click(&mut b, "Add contact");
        type_into(&mut b, "Invite link or XMPP address", &link);
        click(&mut b, "Add");
        until(&mut a, "bob connected", |x| {
            x.state.contacts.values().any(|c| c.online)
        });
        // Bob's app closes (its node stops).
    }
    until(&mut a, "bob offline", |x| {
        x.state.contacts.values().all(|c| !c.online)
    });
    let row = a
        .state()
        .state
        .contacts
        .values()
        .map(|c| format!("{} — offline", c.view.name))
        .next()
        .unwrap_or_default();
    click(&mut a, &row);
    until(&mut a, "the chat", |x| x.state.open.is_some());
    type_into(&mut a, "Message", "while you were away");
    click(&mut a, "Send");
    until(&mut a, "the message queued", |x| {
        x.state
            .messages
            .iter()
            .any(|m| m.body == "while you were away" && m.state == "queued")
    });
    // Bob comes back: it is delivered.
    let mut b = harness(db.path());
    until(&mut b, "the profile list", |x| {
        x.state.screen == Screen::Profiles
    });
    click(&mut b, "Open default");
    type_into(&mut b, "Passphrase", "bob passphrase two");
    click(&mut b, "Unlock");
    until(&mut b, "bob's main screen", |x| {
        x.state.screen == Screen::Main
    });
    until(&mut a, "the queued message delivered", |x| {
        x.state
            .messages
            .iter()
            .any(|m| m.body == "while you were away" && m.state == "delivered")
    });
}

#[test]
fn settings_are_saved_and_wipe_needs_its_confirmation() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut h = harness(dir.path());
    create(&mut h, "alice", "alice passphrase one");
    click(&mut h, "Settings");
    assert_eq!(h.state().state.pane, Pane::Settings);
    click(
        &mut h,
        "Strong: 2 size classes (4 and 16 KiB); slowest over Tor",
    );
    click(&mut h, "Light: up to 0.3 s before a message leaves");
    click(
        &mut h,
        "Leave my messages for offline contacts with holders",
    );
    click(
        &mut h,
        "XEP-0174 compatibility with classic clients (DANGEROUS)",
    );
    assert!(
        h.query_by_label_contains("NOT encrypted").is_some(),
        "the compatibility mode shows its warning"
    );
    click(
        &mut h,
        "XEP-0174 compatibility with classic clients (DANGEROUS)",
    );
    type_into(
        &mut h,
        "Listen on (IP:PORT, comma-separated)",
        "not an address",
    );
    click(&mut h, "Save settings");
    until(&mut h, "the refusal of a bad address", |a| {
        a.state.notice.as_ref().is_some_and(|n| n.error)
    });
    assert!(
        h.query_by_label_contains("is not an address to listen on")
            .is_some()
    );
    h.get_by_label("Listen on (IP:PORT, comma-separated)")
        .focus();
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.get_by_label("Listen on (IP:PORT, comma-separated)")
        .type_text("127.0.0.1:7475");
    h.step();
    click(&mut h, "Save settings");
    until(&mut h, "the settings saved", |a| {
        a.state
            .settings
            .as_ref()
            .is_some_and(|(s, _)| s.padding == node::settings::Padding::Strong)
    });
    let (s, _) = h.state().state.settings.clone().unwrap_or_default();
    assert_eq!(s.jitter, node::settings::Jitter::Light);
    assert!(s.hold.use_holders && !s.hold.offer);
    assert_eq!(s.listen, ["127.0.0.1:7475"]);
    assert!(!s.compat);
    assert!(h.state().state.restart_needed);

    // Wipe: disabled until "wipe" is typed.
    click(&mut h, "Wipe now");
    assert_eq!(
        h.state().state.screen,
        Screen::Main,
        "not wiped without the word"
    );
    type_into(&mut h, "Type wipe to confirm", "wipe");
    click(&mut h, "Wipe now");
    until(&mut h, "the profile list", |a| {
        a.state.screen == Screen::Profiles || a.state.screen == Screen::Create
    });
    assert!(coterie_ui::backend::list_profiles(dir.path()).is_empty());
    assert!(!dir.path().join("default").join("profile.redb").exists());
}

#[test]
fn tab_moves_between_controls_and_enter_presses_them() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut h = harness(dir.path());
    create(&mut h, "alice", "alice passphrase one");
    // Tab from nothing focuses the first control, then the next.
    h.key_press(egui::Key::Tab);
    h.step();
    assert!(h.get_by_label("Invite someone").is_focused());
    h.key_press(egui::Key::Tab);
    h.step();
    assert!(h.get_by_label("Add contact").is_focused());
    h.key_press(egui::Key::Enter);
    h.step();
    h.step();
    assert_eq!(h.state().state.pane, Pane::AddContact);
}

#[test]
fn a_long_chat_lays_out_only_what_is_in_view_and_opens_at_the_latest() {
    use coterie_ui::state::{Action, reduce};
    use node::ops::{ContactView, MessageView};
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut h = harness(dir.path());
    create(&mut h, "alice", "alice passphrase one");
    let st = std::mem::take(&mut h.state_mut().state);
    let st = reduce(
        st,
        Action::ContactsLoaded(vec![(
            99,
            ContactView {
                name: "bob".into(),
                jid: "b.onion".into(),
                fingerprint: "ab".into(),
                state: "offline".into(),
                transport: None,
                last_seen: None,
                queued: 0,
                cleartext: false,
                bridged: false,
            },
        )]),
    );
    let page = (1..=10_000u64)
        .map(|seq| MessageView {
            seq,
            dir: if seq % 2 == 0 { "out" } else { "in" }.into(),
            body: format!("line {seq}"),
            ts: 0,
            state: "delivered".into(),
            unverified: false,
            undecryptable: None,
            cleartext: false,
        })
        .collect();
    h.state_mut().state = reduce(st, Action::ChatOpened { contact: 99, page });
    for _ in 0..5 {
        h.step();
    }
    assert!(
        h.query_by_label("line 10000").is_some(),
        "the latest message is in view"
    );
    assert!(
        h.query_by_label("line 1").is_none(),
        "the first is not laid out"
    );
    let shown = h.query_all_by_label_contains("line ").count();
    assert!(
        (5..200).contains(&shown),
        "{shown} of 10,000 messages laid out"
    );
}

#[test]
fn a_friend_on_xmpp_is_added_after_setting_up_the_bridge_and_is_marked() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut h = harness(dir.path());
    create(&mut h, "carol", "carol passphrase one");
    click(&mut h, "Settings");
    type_into(&mut h, "Account (user@example.org)", "carol@example.test");
    type_into(&mut h, "Password", "the account password");
    // Nothing listens there: the bridge retries and says why.
    type_into(&mut h, "Server (HOST:PORT, optional)", "127.0.0.1:1");
    click(&mut h, "Connect without Tor (DANGEROUS)");
    assert!(
        h.query_by_label_contains("sees this device's IP address")
            .is_some(),
        "going around Tor shows its warning"
    );
    click(&mut h, "Log in");
    until(&mut h, "the bridge in the status bar", |a| {
        a.state
            .status
            .bridge
            .as_ref()
            .is_some_and(|b| b.direct && b.problem.is_some())
    });
    // In the status bar and in the settings.
    assert!(
        h.query_all_by_label_contains("XMPP bridge carol@example.test DIRECTLY, without Tor")
            .count()
            >= 1
    );
    assert!(
        h.query_by_label_contains("Bridge: cannot reach the server")
            .is_some()
    );

    click(&mut h, "Add contact");
    type_into(
        &mut h,
        "Invite link or XMPP address",
        "xmpp:dave@example.org",
    );
    assert!(
        h.query_by_label_contains("A friend on ordinary XMPP")
            .is_some()
    );
    click(&mut h, "Add");
    until(&mut h, "dave in the contact list", |a| {
        a.state
            .contacts
            .values()
            .any(|c| c.view.name == "dave" && c.view.bridged)
    });
    assert!(h.query_by_label_contains("dave — XMPP (bridge)").is_some());

    // Off: the status bar no longer shows a bridge.
    click(&mut h, "Settings");
    click(&mut h, "Log out and forget the account");
    until(&mut h, "the bridge gone", |a| {
        a.state.status.bridge.is_none()
    });
}

#[test]
fn a_group_is_created_written_to_and_its_link_shown_as_a_qr_code() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut h = harness(dir.path());
    create(&mut h, "dora", "dora passphrase one");
    click(&mut h, "New group");
    type_into(&mut h, "Group name", "reading circle");
    click(&mut h, "Create group");
    until(&mut h, "the group open", |a| {
        a.state.pane == Pane::Group && a.state.open_group.is_some()
    });
    assert!(
        h.query_by_label_contains("reading circle — 1 member")
            .is_some(),
        "the group in the list"
    );
    assert!(h.query_by_label_contains("me — admin").is_some());
    type_into(&mut h, "Message to the group", "first meeting on friday");
    click(&mut h, "Send");
    until(&mut h, "the message in the group", |a| {
        a.state
            .group_posts
            .iter()
            .any(|p| p.body == "first meeting on friday" && p.from == "me")
    });
    assert!(
        h.query_by_label_contains("me: first meeting on friday")
            .is_some()
    );
    click(&mut h, "Invite link");
    until(&mut h, "the link", |a| {
        a.state.pane == Pane::GroupLink && a.state.group_link.is_some()
    });
    assert!(
        h.query_by_label_contains("QR code of the group link")
            .is_some()
    );
    click(&mut h, "Back to the group");
    click(&mut h, "Leave group");
    until(&mut h, "left", |a| {
        a.state.groups.values().all(|g| !g.member)
    });
    assert!(
        h.query_by_label_contains("You are no longer a member")
            .is_some()
    );
}
