//! A friend on ordinary XMPP (`tests/xmpp-client/friend.py`: slixmpp with
//! slixmpp-omemo) as a child process, driven with JSON lines.
//!
//! It runs from the venv `.ci/test` creates (`tests/xmpp-client/.venv`, or
//! `COTERIE_FRIEND_PYTHON`). If that is missing, or the friend cannot log
//! in, [`Friend::start`] fails and says how to fix it. `COTERIE_FRIEND_LOG`
//! (a Python log level, default WARNING) shows its log on stderr.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The python interpreter of the friend's venv.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("COTERIE_FRIEND_PYTHON") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("xmpp-client/.venv/bin/python")
}

/// Which OMEMO versions the friend's client has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Omemo {
    /// OMEMO 2 and 0.3 (current Conversations, Dino, Gajim).
    Both,
    /// OMEMO 0.3 only (older releases).
    Old,
}

/// How to start a friend.
#[derive(Debug, Clone)]
pub struct FriendOpts {
    /// Its bare JID.
    pub jid: String,
    /// Its password.
    pub password: String,
    /// `127.0.0.1:PORT` of the server.
    pub server: String,
    /// The server's CA (PEM).
    pub ca_file: PathBuf,
    /// Where its OMEMO state lives (the same directory: the same device).
    pub data: PathBuf,
    /// Its OMEMO versions.
    pub omemo: Omemo,
    /// Answer every message with `echo:` + its body.
    pub echo: bool,
    /// Run it inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

/// A running friend.
#[allow(missing_debug_implementations)]
pub struct Friend {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
    /// Messages it received, oldest first.
    pub messages: Vec<Value>,
    /// Its full JID.
    pub jid: String,
    /// Its OMEMO device id.
    pub device_id: u64,
}

impl Friend {
    /// Starts the friend and waits until it is logged in with OMEMO ready.
    pub fn start(o: &FriendOpts) -> Result<Friend, String> {
        let py = python();
        if !py.exists() {
            return Err(format!(
                "the XMPP reference friend needs its venv at {}: run `bash .ci/test` (it creates it), or \
                 `python3 -m venv tests/xmpp-client/.venv && tests/xmpp-client/.venv/bin/pip install -r tests/xmpp-client/requirements.txt`",
                py.display()
            ));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("xmpp-client/friend.py");
        let mut cmd = match &o.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&py);
                c
            }
            None => Command::new(&py),
        };
        let mut child = cmd
            .arg(&script)
            .args(["--jid", &o.jid, "--server", &o.server])
            .arg("--ca-file")
            .arg(&o.ca_file)
            .arg("--data")
            .arg(&o.data)
            .args([
                "--omemo",
                match o.omemo {
                    Omemo::Both => "both",
                    Omemo::Old => "0.3",
                },
            ])
            .args([
                "--log-level",
                &std::env::var("COTERIE_FRIEND_LOG").unwrap_or_else(|_| "WARNING".into()),
            ])
            .args(o.echo.then_some("--echo"))
            .env("FRIEND_PASSWORD", &o.password)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the XMPP friend {}: {e}", py.display()))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("friend printed non-JSON: {line}"),
                }
            }
        });
        let mut f = Friend {
            child,
            stdin,
            lines,
            messages: Vec::new(),
            jid: String::new(),
            device_id: 0,
        };
        let online = f.next_line(Duration::from_secs(60), |v| {
            v["event"] == "online" || v["event"] == "fatal"
        })?;
        if online["event"] == "fatal" {
            return Err(format!(
                "the XMPP friend {} failed: {}",
                o.jid, online["error"]
            ));
        }
        f.jid = online["jid"].as_str().unwrap_or_default().to_string();
        f.device_id = online["device_id"].as_u64().unwrap_or_default();
        Ok(f)
    }

    /// Reads lines until one matches (messages are kept on the way).
    fn next_line(
        &mut self,
        timeout: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.lines.recv_timeout(left) {
                Ok(v) => v,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "the XMPP friend said nothing useful for {timeout:?}"
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    return Err(format!("the XMPP friend exited ({status:?})"));
                }
            };
            if v["event"] == "message" || v["event"] == "error" {
                self.messages.push(v.clone());
            }
            if want(&v) {
                return Ok(v);
            }
        }
    }

    /// Sends `body` to `to`, OMEMO-encrypted; the namespaces it used.
    pub fn send(&mut self, to: &str, body: &str) -> Result<Vec<String>, String> {
        let cmd = json!({"cmd": "send", "to": to, "body": body});
        writeln!(self.stdin, "{cmd}").map_err(|e| e.to_string())?;
        self.stdin.flush().map_err(|e| e.to_string())?;
        let r = self.next_line(Duration::from_secs(60), |v| v.get("ok").is_some())?;
        if r["ok"] != true {
            return Err(format!("the friend could not send: {}", r["error"]));
        }
        Ok(r["ns"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `n` round trips of `size`-byte messages to the echoing friend `to`:
    /// milliseconds each, measured inside the friend's process.
    pub fn rtt(&mut self, to: &str, n: usize, size: usize) -> Result<Vec<f64>, String> {
        let cmd = json!({"cmd": "rtt", "to": to, "n": n, "size": size});
        writeln!(self.stdin, "{cmd}").map_err(|e| e.to_string())?;
        self.stdin.flush().map_err(|e| e.to_string())?;
        let r = self.next_line(Duration::from_secs(60 + 30 * n as u64), |v| {
            v.get("ok").is_some()
        })?;
        if r["ok"] != true {
            return Err(format!("the round trips failed: {}", r["error"]));
        }
        self.messages.clear();
        Ok(r["ms"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default())
    }

    /// Waits for a message from `from` whose body is `body`.
    pub fn wait_message(
        &mut self,
        from: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<Value, String> {
        let hit = |v: &Value| v["from"] == from && v["body"] == body;
        if let Some(m) = self.messages.iter().find(|v| hit(v)) {
            return Ok(m.clone());
        }
        self.next_line(timeout, |v| v["event"] == "message" && hit(v))
            .map_err(|e| format!("{e}; received so far: {:?}", self.messages))
    }

    /// Reads whatever arrived in the next `d` (to count duplicates).
    pub fn drain(&mut self, d: Duration) {
        let _ = self.next_line(d, |_| false);
    }

    /// How many messages from `from` had `body`.
    pub fn count(&self, from: &str, body: &str) -> usize {
        self.messages
            .iter()
            .filter(|v| v["from"] == from && v["body"] == body)
            .count()
    }

    /// Disconnects cleanly.
    pub fn quit(mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Friend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
