//! The python-omemo reference peer (`tests/omemo-peer/peer.py`) as a child
//! process, and a Rust OMEMO device to talk to it.
//!
//! The peer runs from the venv `.ci/test` creates
//! (`tests/omemo-peer/.venv`, or `COTERIE_OMEMO_PYTHON`). If it is missing
//! or cannot start, the test fails and says how to create it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use minidom::Element;
use node::omemo::device::{Recipient, RemoteDevice, SessionSlot, encrypt};
use node::omemo::xml::{Bundle, EncryptedElement};
use node::omemo::{Identity, OmemoError, OwnDevice, Session, Version, sce};
use serde_json::{Value, json};

/// The python interpreter of the reference peer's venv.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("COTERIE_OMEMO_PYTHON") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("omemo-peer/.venv/bin/python")
}

/// A running python-omemo device.
#[allow(missing_debug_implementations)]
pub struct PyPeer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Its bare JID.
    pub jid: String,
    /// Its device id.
    pub device_id: u32,
    /// Messages it sent on its own (namespace, XML), oldest first.
    pub events: Vec<(String, String)>,
}

impl PyPeer {
    /// Starts a peer for `jid`.
    pub fn start(jid: &str) -> PyPeer {
        let py = python();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("omemo-peer/peer.py");
        assert!(
            py.exists(),
            "the python-omemo reference peer needs its venv at {}: run `bash .ci/test` (it creates it), or \
             `python3 -m venv tests/omemo-peer/.venv && tests/omemo-peer/.venv/bin/pip install -r tests/omemo-peer/requirements.txt`",
            py.display()
        );
        let mut child = Command::new(&py)
            .arg(&script)
            .args(["--jid", jid])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the python-omemo peer {}: {e}", py.display()));
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut p = PyPeer {
            child,
            stdin,
            stdout,
            jid: jid.into(),
            device_id: 0,
            events: Vec::new(),
        };
        let ready = p.line();
        assert_eq!(
            ready["event"], "ready",
            "python-omemo peer did not start: {ready}"
        );
        p.device_id = ready["device_id"].as_u64().expect("device id") as u32;
        p
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        let n = self
            .stdout
            .read_line(&mut l)
            .expect("read from python-omemo peer");
        assert!(n > 0, "python-omemo peer exited (see its stderr above)");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad line from peer: {e}: {l}"))
    }

    /// Sends a command; returns its reply (events are collected).
    pub fn cmd(&mut self, c: Value) -> Value {
        writeln!(self.stdin, "{c}").expect("write to peer");
        self.stdin.flush().expect("flush");
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                if v["event"] == "sent" {
                    self.events.push((
                        v["ns"].as_str().expect("ns").into(),
                        v["xml"].as_str().expect("xml").into(),
                    ));
                }
                continue;
            }
            return v;
        }
    }

    /// Like [`cmd`](Self::cmd) but the reply must be ok.
    pub fn ok(&mut self, c: Value) -> Value {
        let r = self.cmd(c.clone());
        assert_eq!(r["ok"], true, "peer refused {c}: {r}");
        r
    }

    /// Its current bundle in a version.
    pub fn bundle(&mut self, v: Version) -> Bundle {
        let own = self.ok(json!({"cmd": "own"}));
        let xml = own["bundles"][v.ns()].as_str().expect("bundle xml");
        Bundle::parse(&xml.parse::<Element>().expect("bundle is XML")).expect("python's bundle")
    }

    /// Tells it about a Rust device.
    pub fn add(&mut self, d: &RustDevice) {
        let bundles: serde_json::Map<String, Value> = Version::ALL
            .iter()
            .map(|v| {
                (
                    v.ns().to_string(),
                    Value::String(String::from(&d.dev.bundle(&d.id, *v).to_element())),
                )
            })
            .collect();
        self.ok(json!({"cmd": "add_device", "jid": d.jid, "device_id": d.dev.device_id, "bundles": bundles}));
    }

    /// Encrypts `body` to `to`: the `<encrypted/>` XML.
    pub fn encrypt(&mut self, v: Version, to: &str, body: &str) -> String {
        let r = self.ok(json!({"cmd": "encrypt", "ns": v.ns(), "to": to, "body": body}));
        r["xml"].as_str().expect("xml").into()
    }

    /// Decrypts; `Ok(body)` or `Err(error text)`.
    pub fn decrypt(&mut self, v: Version, from: &str, xml: &str) -> Result<Option<String>, String> {
        let r = self.cmd(json!({"cmd": "decrypt", "ns": v.ns(), "from": from, "xml": xml}));
        if r["ok"] == true {
            Ok(r["body"].as_str().map(String::from))
        } else {
            Err(format!("{} {}", r["error"], r["cause"]))
        }
    }

    /// Takes the messages it sent on its own.
    pub fn take_events(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.events)
    }
}

impl Drop for PyPeer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        let _ = self.stdin.flush();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Rust OMEMO device (the implementation under test), with its sessions
/// per (peer JID, version).
#[allow(missing_debug_implementations)]
pub struct RustDevice {
    /// Bare JID.
    pub jid: String,
    /// Identity key.
    pub id: Identity,
    /// Device state.
    pub dev: OwnDevice,
    /// Sessions.
    pub slots: HashMap<(String, Version), SessionSlot>,
}

impl RustDevice {
    /// A new device.
    pub fn new(jid: &str) -> RustDevice {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        RustDevice {
            jid: jid.into(),
            id: Identity::from_seed(&seed),
            dev: OwnDevice::new(0, &mut rand::rngs::OsRng),
            slots: HashMap::new(),
        }
    }

    /// Encrypts to the peer (starting a session from its bundle if needed);
    /// `None` sends an empty key-transport message. Returns the XML.
    pub fn encrypt(&mut self, v: Version, to: &mut PyPeer, body: Option<&str>) -> String {
        let slot = self.slots.entry((to.jid.clone(), v)).or_default();
        if slot.current.is_none() {
            let b = to.bundle(v);
            slot.install(
                Session::initiate(&self.id, &b, &mut rand::rngs::OsRng).expect("initiate"),
            );
        }
        let session = slot.current.as_mut().expect("session");
        let plaintext = body.map(|b| match v {
            Version::V03 => b.as_bytes().to_vec(),
            Version::V2 => sce::seal(b, &self.jid, &mut rand::rngs::OsRng),
        });
        let mut r = [Recipient {
            jid: &to.jid,
            device_id: to.device_id,
            session,
        }];
        let el = encrypt(
            v,
            &self.id,
            self.dev.device_id,
            &mut r,
            plaintext.as_deref(),
            &mut rand::rngs::OsRng,
        );
        String::from(&el.to_element())
    }

    /// Decrypts XML from the peer: the body, if any.
    pub fn decrypt(&mut self, from: &PyPeer, xml: &str) -> Result<Option<String>, OmemoError> {
        let el: Element = xml.parse().expect("peer sent XML");
        let el = EncryptedElement::parse(&el, 1 << 16)?;
        let v = el.version;
        let slot = self.slots.entry((from.jid.clone(), v)).or_default();
        let out = self.dev.decrypt(
            &self.id,
            &self.jid,
            RemoteDevice { identity: None },
            slot,
            &el,
            0,
            &mut rand::rngs::OsRng,
        )?;
        match (v, out.plaintext) {
            (_, None) => Ok(None),
            (Version::V03, Some(p)) => Ok(Some(String::from_utf8(p).expect("utf-8 body"))),
            (Version::V2, Some(p)) => sce::open(&p, &from.jid),
        }
    }

    /// Decrypts every message the peer sent on its own; they carry no body.
    pub fn drain(&mut self, from: &mut PyPeer) -> usize {
        let evs = from.take_events();
        for (_, xml) in &evs {
            assert_eq!(
                self.decrypt(from, xml).expect("automatic message decrypts"),
                None
            );
        }
        evs.len()
    }
}
