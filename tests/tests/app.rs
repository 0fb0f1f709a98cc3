//! The desktop app, end to end: `coterie-app` under Xvfb in a namespaced
//! LAN host, a second node (`coterie run`) on another host. Driven with
//! the keyboard only (xdotool): Tab to a control, Enter to press it. The
//! app unlocks its profile, redeems the invite its user added, sends a
//! message and shows the reply; screenshots are saved along the way.
//!
//! Needs root (namespaces) and Debian's xvfb, xdotool, imagemagick and
//! Mesa (`.ci/test` installs them). Screenshots go to
//! `$COTERIE_SCREENSHOTS` (default: the test's temp directory).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coterie_tests::netns::Lan;
use coterie_tests::{NodeProc, PASSPHRASE, texts, wait_for};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{tool}` is missing: install the Debian package {package} (`bash .ci/test` does)"
    );
}

fn x(display: &str, args: &[&str]) -> String {
    let out = Command::new("xdotool")
        .args(args)
        .env("DISPLAY", display)
        .output()
        .expect("run xdotool");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn keys(display: &str, win: &str, keys: &[&str]) {
    for k in keys {
        // XTEST input (what a real keyboard produces): winit ignores
        // events sent to a window with XSendEvent.
        x(display, &["windowfocus", "--sync", win]);
        x(display, &["key", k]);
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn type_text(display: &str, win: &str, text: &str) {
    x(display, &["windowfocus", "--sync", win]);
    x(display, &["type", "--delay", "30", text]);
    std::thread::sleep(Duration::from_millis(300));
}

fn screenshot(display: &str, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.png"));
    let out = Command::new("import")
        .args(["-window", "root"])
        .arg(&path)
        .env("DISPLAY", display)
        .output()
        .expect("run import (imagemagick)");
    assert!(
        out.status.success(),
        "screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(
        len > 2_000,
        "screenshot {name} is nearly empty ({len} bytes)"
    );
    path
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised name: utime is the 14th, stime the 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

#[test]
fn the_app_unlocks_chats_with_a_node_on_the_lan_and_stays_idle() {
    need("Xvfb", "xvfb");
    need("xdotool", "xdotool");
    need("import", "imagemagick");
    let app = coterie_tests::build_bin("coterie-ui", "coterie-app");
    let lan = Lan::new(2);
    let tmp = tempfile::tempdir().expect("tmp");
    let shots = std::env::var_os("COTERIE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("screenshots"));
    std::fs::create_dir_all(&shots).expect("screenshot dir");

    // Bob: a node on host 1.
    let mut bob = NodeProc::init(tmp.path(), "bob");
    bob.netns = Some(lan.hosts[1].clone());
    bob.start();
    // Alice's profile, made with the CLI; she adds bob's invite before her
    // app ever runs (it is redeemed when the app's node starts).
    let profiles = tmp.path().join("profiles");
    let alice = NodeProc::init(&profiles, "default");
    let out = alice.cli(&["add", &bob.invite(), "--name", "bob"]);
    assert_eq!(out.code, 0, "add: {}", out.stderr);

    // Xvfb and the app on host 0.
    let display = format!(":{}", 90 + std::process::id() % 9);
    let xvfb = Kill(
        lan.command(0, Path::new("Xvfb"))
            .args([
                display.as_str(),
                "-screen",
                "0",
                "1100x720x24",
                "-nolisten",
                "tcp",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Xvfb"),
    );
    std::thread::sleep(Duration::from_secs(1));
    let port = coterie_tests::free_port();
    let log = std::fs::File::create(shots.join("app.log")).expect("log");
    let app_proc = Kill(
        lan.command(0, &app)
            .args(["--no-tor", "--size", "1100x720"])
            .arg("--listen")
            .arg(format!("{}:{port}", lan.hosts[0].ip))
            .env("DISPLAY", &display)
            .env("COTERIE_PROFILES", &profiles)
            .env("LIBGL_ALWAYS_SOFTWARE", "1")
            .env("COTERIE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start coterie-app"),
    );
    let app_log = || std::fs::read_to_string(shots.join("app.log")).unwrap_or_default();
    let win = wait_for("the app's window", Duration::from_secs(30), || {
        let w = x(&display, &["search", "--name", "^Coterie$"]);
        w.lines()
            .next()
            .map(str::to_string)
            .filter(|w| !w.is_empty())
    });
    x(&display, &["windowfocus", "--sync", &win]);
    std::thread::sleep(Duration::from_secs(2));
    screenshot(&display, &shots, "1-profiles");

    // Tab to "Open default", Enter; the passphrase field has the focus.
    keys(&display, &win, &["Tab", "Return"]);
    type_text(&display, &win, PASSPHRASE);
    screenshot(&display, &shots, "2-unlock");
    keys(&display, &win, &["Return"]);
    // The app's node redeems the invite: bob sees alice connected.
    wait_for("bob connected to alice", Duration::from_secs(60), || {
        bob.connected_to("default").then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    screenshot(&display, &shots, "3-contacts");

    // Tab past "Invite someone", "Add contact", "Settings", "Lock" and "New
    // group" to bob; Enter opens the chat with the composer focused; type
    // and Enter sends.
    keys(
        &display,
        &win,
        &["Tab", "Tab", "Tab", "Tab", "Tab", "Tab", "Return"],
    );
    type_text(&display, &win, "hello bob, from the app");
    keys(&display, &win, &["Return"]);
    wait_for("bob has alice's message", Duration::from_secs(30), || {
        texts(&bob, "default")
            .iter()
            .any(|(dir, body, _)| dir == "in" && body == "hello bob, from the app")
            .then_some(())
    });
    let r = bob.send("default", "hi alice, bob here");
    assert_eq!(r["dir"], "out", "{r}");
    // The app's node answers the CLI through its control socket.
    wait_for(
        "the app stored bob's reply",
        Duration::from_secs(30),
        || {
            texts(&alice, "bob")
                .iter()
                .any(|(dir, body, _)| dir == "in" && body == "hi alice, bob here")
                .then_some(())
        },
    );
    let delivered = wait_for("alice's message delivered", Duration::from_secs(30), || {
        texts(&alice, "bob")
            .iter()
            .find(|(dir, _, state)| dir == "out" && state == "delivered")
            .cloned()
    });
    assert_eq!(delivered.1, "hello bob, from the app");
    std::thread::sleep(Duration::from_secs(1));
    screenshot(&display, &shots, "4-chat");

    // Idle: with nothing happening the app draws nothing.
    let pid = app_proc.0.id();
    std::thread::sleep(Duration::from_secs(2));
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(10));
    let ticks = cpu_ticks(pid) - c0;
    let secs = t0.elapsed().as_secs_f64();
    // Clock ticks are 1/100 s on Linux.
    let cpu = ticks as f64 / 100.0 / secs * 100.0;
    println!("idle CPU of coterie-app over {secs:.1} s: {cpu:.2}% of one core ({ticks} ticks)");
    println!("screenshots in {}", shots.display());
    assert!(
        !app_log().contains("panicked"),
        "the app panicked: {}",
        app_log()
    );
    drop(app_proc);
    drop(xvfb);
    bob.stop();
}
