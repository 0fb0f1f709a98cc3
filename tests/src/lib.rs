//! Harness for Coterie's integration suites: real `coterie` processes on
//! 127.0.0.1, driven through their CLI and control socket, plus a raw peer
//! that speaks the wire protocol by hand (for hostile-input tests).
//!
//! Everything binds to loopback only. Every process a test starts is killed
//! when its handle drops, also on panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod c2s;
pub mod load;
pub mod netns;
pub mod omemo_peer;
pub mod prosody;
pub mod raw;
pub mod tornet;
pub mod xmpp_client;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The passphrase every test profile uses.
pub const PASSPHRASE: &str = "test passphrase for coterie";

/// Path of the `coterie` binary, built once per test process.
pub fn coterie_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("coterie-node", "coterie"))
}

/// Builds `bin` of `package` in the cargo profile this test (or tool) was
/// built with, and returns its path.
pub fn build_bin(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // target/<profile>/deps/<test> (tests) or target/<profile>/<bin> (tools).
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(p) => p.to_string(),
    };
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--profile", &profile])
        .args(["-p", package, "--bin", bin])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {bin}: {e}"));
    assert!(status.success(), "building {bin} failed");
    let path = dir.join(bin);
    assert!(path.exists(), "{bin} not found at {}", path.display());
    path
}

/// A free port on 127.0.0.1 for both TCP and UDP (QUIC).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let t = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = t.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found on 127.0.0.1");
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `coterie` profile and, when started, its node process.
#[derive(Debug)]
pub struct NodeProc {
    /// Display name.
    pub name: String,
    /// Profile directory.
    pub dir: PathBuf,
    /// The port it listens on (TCP and QUIC).
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    /// Run inside this network namespace, listening on this address.
    pub netns: Option<netns::Host>,
    /// Extra environment for `coterie run`.
    pub env: Vec<(String, String)>,
    /// Start with `coterie serve` (holding for contacts) instead of `run`.
    pub serve: bool,
}

/// What a CLI call returned.
#[derive(Debug)]
pub struct CliOut {
    /// Exit code.
    pub code: i32,
    /// Stdout lines parsed as JSON (`--json` output).
    pub json: Vec<Value>,
    /// Raw stderr.
    pub stderr: String,
}

impl NodeProc {
    /// Creates a profile named `name` under `root`.
    pub fn init(root: &Path, name: &str) -> NodeProc {
        let dir = root.join(name);
        let n = NodeProc {
            name: name.into(),
            log: root.join(format!("{name}.log")),
            dir,
            port: free_port(),
            child: None,
            netns: None,
            env: Vec::new(),
            serve: false,
        };
        let out = n.cli(&["init", "--name", name]);
        assert_eq!(out.code, 0, "init failed: {}", out.stderr);
        n
    }

    /// A handle on a profile directory without creating it.
    pub fn detached(name: &str, dir: PathBuf) -> NodeProc {
        NodeProc {
            name: name.into(),
            log: dir.with_extension("log"),
            dir,
            port: free_port(),
            child: None,
            netns: None,
            env: Vec::new(),
            serve: false,
        }
    }

    /// Runs a CLI command on this profile with `--json`.
    pub fn cli(&self, args: &[&str]) -> CliOut {
        self.cli_env(args, &[])
    }

    /// Runs a CLI command with `--json` and extra environment.
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> CliOut {
        let out = Command::new(coterie_bin())
            .arg("--profile")
            .arg(&self.dir)
            .arg("--json")
            .args(args)
            .envs(env.iter().copied())
            .env("COTERIE_PASSPHRASE", PASSPHRASE)
            .stdin(Stdio::null())
            .output()
            .expect("run coterie");
        let json = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("non-JSON output {l:?}: {e}"))
            })
            .collect();
        CliOut {
            code: out.status.code().unwrap_or(-1),
            json,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts `coterie run` and waits until it listens.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// Starts `coterie run` with extra arguments.
    pub fn start_with(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let (mut cmd, host) = match &self.netns {
            Some(h) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &h.ns]).arg(coterie_bin());
                (c, h.listen_host())
            }
            None => (Command::new(coterie_bin()), "127.0.0.1".to_string()),
        };
        let mut child = cmd
            .arg("--profile")
            .arg(&self.dir)
            .arg("--json")
            .arg(if self.serve { "serve" } else { "run" })
            .args(["--listen", &format!("{host}:{}", self.port)])
            .args(extra)
            // Never arti's defaults on these machines (they would reach the
            // public Tor network): Tor only with the private network's file.
            .args((!extra.contains(&"--tor-config")).then_some("--no-tor"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("COTERIE_PASSPHRASE", PASSPHRASE)
            // Its temporary files land next to its profile, where the
            // plaintext checks look.
            .env("TMPDIR", self.tmp_dir())
            // The node's own `env` wins, then the test's environment.
            .env(
                "COTERIE_LOG",
                self.env
                    .iter()
                    .find(|(k, _)| k == "COTERIE_LOG")
                    .map(|(_, v)| v.clone())
                    .or_else(|| std::env::var("COTERIE_LOG").ok())
                    .unwrap_or_else(|| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn coterie run");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(
            first.contains("\"started\""),
            "{} did not start: {first:?}; log: {}",
            self.name,
            self.log_text()
        );
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.child = Some(child);
    }

    /// The node's temporary directory (`TMPDIR` of `coterie run`).
    pub fn tmp_dir(&self) -> PathBuf {
        let d = self.dir.with_extension("tmp");
        std::fs::create_dir_all(&d).expect("node's TMPDIR");
        d
    }

    /// The node's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the running node, in KiB (Linux `/proc`).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// Whether the process is running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the node cleanly (control socket `stop`), then waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = self.control(&json!({"cmd": "stop"}));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// One control-socket request; returns the `data` of a successful answer.
    pub fn control(&self, req: &Value) -> Result<Value, String> {
        let mut c = self.control_conn()?;
        c.call(req)
    }

    /// A persistent control connection (for bursts).
    pub fn control_conn(&self) -> Result<Control, String> {
        let s = UnixStream::connect(self.dir.join("control.sock")).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        Ok(Control { w: s, r })
    }

    /// The node's status (requires a running node).
    pub fn status(&self) -> Value {
        self.control(&json!({"cmd": "status"})).expect("status")
    }

    /// An invite from the running node.
    pub fn invite(&self) -> String {
        self.control(&json!({"cmd": "invite", "ttl": "1h"}))
            .expect("invite")
            .as_str()
            .expect("string")
            .to_string()
    }

    /// Adds a contact from `uri` under `name`.
    pub fn add(&self, uri: &str, name: &str) {
        self.control(&json!({"cmd": "add", "uri": uri, "name": name}))
            .expect("add");
    }

    /// Sends `text` to `contact`.
    pub fn send(&self, contact: &str, text: &str) -> Value {
        self.control(&json!({"cmd": "send", "contact": contact, "text": text}))
            .expect("send")
    }

    /// History with `contact` (latest `limit`).
    pub fn history(&self, contact: &str, limit: usize) -> Vec<Value> {
        match self.control(&json!({"cmd": "history", "contact": contact, "limit": limit})) {
            Ok(v) => v.as_array().cloned().unwrap_or_default(),
            Err(e) => panic!("history from {}: {e}", self.name),
        }
    }

    /// Whether `contact` has a live, resumed session.
    pub fn connected_to(&self, contact: &str) -> bool {
        let Ok(v) = self.control(&json!({"cmd": "contacts"})) else {
            return false;
        };
        v.as_array()
            .map(|a| {
                a.iter()
                    .any(|c| c["name"] == contact && c["state"] == "connected")
            })
            .unwrap_or(false)
    }

    /// The node's key, as `coterie id` reports it.
    pub fn key(&self) -> transport::PeerId {
        let out = self.cli(&["id"]);
        let onion = out
            .json
            .first()
            .and_then(|v| v["onion"].as_str())
            .unwrap_or_else(|| panic!("id failed: {}", out.stderr));
        transport::PeerId::from_onion(onion).expect("a valid onion address")
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A control-socket connection.
#[derive(Debug)]
pub struct Control {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Control {
    /// Sends a request and reads the answer.
    pub fn call(&mut self, req: &Value) -> Result<Value, String> {
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.w.write_all(&line).map_err(|e| e.to_string())?;
        let mut resp = String::new();
        self.r.read_line(&mut resp).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&resp).map_err(|e| format!("{e}: {resp:?}"))?;
        if v["ok"] == true {
            Ok(v.get("data").cloned().unwrap_or(Value::Null))
        } else {
            Err(v["error"].as_str().unwrap_or("unknown error").to_string())
        }
    }
}

/// Introduces `a` and `b` (both running): `a` invites, `b` adds, and waits
/// until both see a live session. `b` calls `a` by `a.name`, and vice versa.
pub fn introduce(a: &NodeProc, b: &NodeProc) {
    let uri = a.invite();
    b.add(&uri, &a.name);
    wait_for(
        &format!("{} and {} to connect", a.name, b.name),
        Duration::from_secs(20),
        || {
            // The inviter names the new contact by the name the invitee sent.
            (a.connected_to(&b.name) && b.connected_to(&a.name)).then_some(())
        },
    );
}

/// Builds the test tool binary `name` (of this crate) and returns its path.
pub fn tool(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", "coterie-tests", "--bin", name])
        .status()
        .expect("cargo");
    assert!(status.success(), "building {name} failed");
    dir.join(name)
}

/// Sleeps until 1.5 s past the next multiple of `period` seconds of unix
/// time: the moment a LAN node has replaced its mDNS daemon.
pub fn sleep_past_period_boundary(period: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    let into = now.as_millis() as u64 % (period * 1000);
    std::thread::sleep(Duration::from_millis(period * 1000 - into + 1500));
}

/// Two running nodes, `alice` and `bob`, introduced to each other.
pub fn running_pair(root: &Path) -> (NodeProc, NodeProc) {
    let mut a = NodeProc::init(root, "alice");
    let mut b = NodeProc::init(root, "bob");
    a.start();
    b.start();
    introduce(&a, &b);
    (a, b)
}

/// Texts and states of the history with `contact`, oldest first.
pub fn texts(n: &NodeProc, contact: &str) -> Vec<(String, String, String)> {
    n.history(contact, 10_000)
        .into_iter()
        .map(|m| {
            (
                m["dir"].as_str().unwrap_or_default().to_string(),
                m["body"].as_str().unwrap_or_default().to_string(),
                m["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Sends `body` from `from` to `to` and waits until it is delivered
/// (stored at `to`, receipt back); returns how long that took. Panics
/// after 30 s.
pub fn round_trip(from: &NodeProc, to: &NodeProc, body: &str) -> Duration {
    let t = Instant::now();
    from.send(&to.name, body);
    wait_for(
        &format!("{body} delivered"),
        Duration::from_secs(30),
        || delivered(from, &to.name, body).then_some(()),
    );
    t.elapsed()
}

/// Whether `n` has a message `body` to `contact` marked delivered.
pub fn delivered(n: &NodeProc, contact: &str, body: &str) -> bool {
    texts(n, contact)
        .iter()
        .any(|(d, b, s)| d == "out" && b == body && s == "delivered")
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Asserts no file under `dir` contains any of `needles`.
///
/// Needles must be at least 8 bytes: a shorter one turns up by chance in
/// a megabyte of ciphertext (a 3-byte name does so in about one file in
/// sixteen), which would make the check fail for no reason.
pub fn assert_no_plaintext(dir: &Path, needles: &[&[u8]]) {
    for n in needles {
        assert!(
            n.len() >= 8,
            "needle {:?} is too short to tell plaintext from chance",
            String::from_utf8_lossy(n)
        );
    }
    for f in files_under(dir) {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        for n in needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == *n),
                "{} contains {:?} in plaintext",
                f.display(),
                String::from_utf8_lossy(n)
            );
        }
    }
}

/// After a run: nothing a user would not want on disk is there in the
/// clear, in any profile, log or temporary file under `root` (where
/// [`NodeProc`] keeps all three). Looked for: every string in `marks` (a
/// prefix every message body of the run shares, say), each node's onion
/// address (lower and upper case), its raw public key and its name when
/// long enough to tell from chance.
pub fn assert_nothing_plain(root: &Path, nodes: &[&NodeProc], marks: &[&str]) {
    let mut needles: Vec<Vec<u8>> = marks.iter().map(|m| m.as_bytes().to_vec()).collect();
    for n in nodes {
        let onion = n.key().onion_address();
        let label = onion.trim_end_matches(".onion").to_string();
        needles.push(label.as_bytes().to_vec());
        needles.push(label.to_uppercase().into_bytes());
        needles.push(n.key().as_bytes().to_vec());
        if n.name.len() >= 8 {
            needles.push(n.name.as_bytes().to_vec());
        }
    }
    let refs: Vec<&[u8]> = needles.iter().map(Vec::as_slice).collect();
    assert_no_plaintext(root, &refs);
    eprintln!(
        "no plaintext: {} needles over {} files under {}",
        refs.len(),
        files_under(root).len(),
        root.display()
    );
}

/// (from, body) of a node's history of `group`, oldest first (empty if the
/// node has no such group yet).
pub fn group_history(n: &NodeProc, group: &str) -> Vec<(String, String)> {
    let out = n.cli(&["group", "history", group, "--limit", "1000"]);
    if out.code != 0 {
        return Vec::new();
    }
    out.json
        .first()
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["from"].as_str().unwrap_or_default().to_string(),
                        p["body"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How many members `n` lists in `group` (0 if it has no such group).
pub fn group_members(n: &NodeProc, group: &str) -> usize {
    let out = n.cli(&["group", "members", group]);
    if out.code != 0 {
        return 0;
    }
    out.json
        .first()
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}
