//! Frame time of the app's main screen: 50 contacts, a chat open whose
//! store holds 10,000 messages. Prints figures and the ratio to the goal
//! (4 ms per frame). One frame = egui's pass over every view plus
//! tessellation into triangles (what the GPU would draw); the GPU upload
//! itself is not included (no GPU here).
//!
//! `cargo bench -p coterie-ui --bench frame`

use std::time::{Duration, Instant};

use coterie_ui::state::{Action, ContactRow, PAGE, Screen, State, reduce};
use coterie_ui::{App, Backend, BackendConfig};
use node::ops::{ContactView, IdView, MessageView};

const GOAL_MS: f64 = 4.0;

fn contacts() -> Vec<(u64, ContactView)> {
    (1..=50u64)
        .map(|i| {
            (
                i,
                ContactView {
                    name: format!("contact {i:02}"),
                    jid: format!("{i:056}.onion"),
                    fingerprint: "abcd ".repeat(16),
                    state: if i % 3 == 0 { "offline" } else { "connected" }.into(),
                    transport: Some(if i % 2 == 0 { "onion" } else { "quic" }.into()),
                    last_seen: Some(1_700_000_000),
                    queued: 0,
                    cleartext: false,
                    bridged: false,
                },
            )
        })
        .collect()
}

fn messages(range: std::ops::RangeInclusive<u64>) -> Vec<MessageView> {
    range
        .map(|seq| MessageView {
            seq,
            dir: if seq % 2 == 0 { "out" } else { "in" }.into(),
            body: format!(
                "message {seq}: a line of chat about the meeting on Thursday, who brings what, and where"
            ),
            ts: 1_700_000_000_000 + seq * 60_000,
            state: if seq % 2 == 0 { "delivered" } else { "received" }.into(),
            unverified: false,
            undecryptable: None,
            cleartext: false,
        })
        .collect()
}

fn state(loaded: usize) -> State {
    let mut s = State::default();
    s = reduce(
        s,
        Action::Unlocked {
            profile: "default".into(),
            me: IdView {
                jid: "alice@x.onion".into(),
                onion: "x.onion".into(),
                fingerprint: "abcd ".repeat(16),
            },
            settings: Default::default(),
            retention: 30,
        },
    );
    s = reduce(s, Action::ContactsLoaded(contacts()));
    let first = 10_000 - loaded as u64 + 1;
    s = reduce(
        s,
        Action::ChatOpened {
            contact: 1,
            page: messages(first..=10_000),
        },
    );
    assert_eq!(s.screen, Screen::Main);
    assert_eq!(s.contacts.len(), 50);
    let _: Option<&ContactRow> = s.contacts.get(&1);
    s
}

fn measure(app: &mut App, ctx: &egui::Context, frames: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(frames);
    for i in 0..frames {
        let input = egui::RawInput {
            screen_rect: Some(egui::Rect::from_min_size(
                egui::Pos2::ZERO,
                egui::vec2(1280.0, 800.0),
            )),
            // A pointer moving over the list: every frame does real work.
            events: vec![egui::Event::PointerMoved(egui::pos2(
                100.0 + (i % 50) as f32,
                300.0,
            ))],
            ..Default::default()
        };
        let t = Instant::now();
        let full = ctx.run_ui(input, |ui| app.ui(ui));
        let prims = ctx.tessellate(full.shapes, full.pixels_per_point);
        let dt = t.elapsed();
        std::hint::black_box(prims);
        out.push(dt.as_secs_f64() * 1000.0);
    }
    out
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("coterie-frame-bench-{}", std::process::id()));
    println!(
        "| chat loaded | frames | median ms | p99 ms | max ms | median / goal ({GOAL_MS} ms) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for loaded in [PAGE, 1_000, 10_000] {
        // A backend with no profile: the state is set by hand below.
        let mut app = App::new(Backend::start(
            BackendConfig {
                base: dir.clone(),
                kdf: node::store::crypto::KdfParams::recommended(),
                no_tor: true,
                no_lan: true,
                listen: None,
            },
            || {},
        ));
        std::thread::sleep(Duration::from_millis(50));
        app.pump();
        app.state = state(loaded);
        let ctx = egui::Context::default();
        // Warm-up: fonts, galley caches, the scroll area sticking to the bottom.
        measure(&mut app, &ctx, 30);
        let mut v = measure(&mut app, &ctx, 300);
        let med = pct(&mut v, 0.5);
        let p99 = pct(&mut v, 0.99);
        let max = pct(&mut v, 1.0);
        println!(
            "| {loaded} of 10,000 | 300 | {med:.2} | {p99:.2} | {max:.2} | {:.2} |",
            med / GOAL_MS
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
