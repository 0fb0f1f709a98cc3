//! A private Prosody (Debian package `prosody`) on 127.0.0.1 for tests and
//! benchmarks: its own config, data directory and port, accounts written
//! directly into its internal storage, killed when dropped.
//!
//! [`Prosody::start`] is the plaintext, in-memory-roster server of the
//! benchmarks. [`Server`] is an ordinary server as a Coterie user's
//! provider runs it: TLS required (a certificate from a test CA made with
//! `openssl`), the modules Conversations expects (roster, PEP, bookmarks,
//! vCard, private XML, MAM, offline storage, stream management, carbons),
//! internal file storage the tests read afterwards, and every stanza in its
//! debug log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Prosody.
#[derive(Debug)]
pub struct Prosody {
    /// Its c2s port on 127.0.0.1.
    pub port: u16,
    /// Its working directory.
    pub dir: PathBuf,
    child: Child,
}

impl Prosody {
    /// Starts Prosody in `dir` with the `(user, password)` accounts on host `localhost`.
    /// Fails with a clear message when Prosody is not installed.
    pub fn start(dir: &Path, users: &[(&str, &str)]) -> Result<Prosody, String> {
        let bin = ["/usr/bin/prosody", "/usr/sbin/prosody"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or(
                "Prosody is not installed: `apt-get install prosody` (the test command does this)",
            )?;
        let port = crate::free_port();
        let accounts = dir.join("data/localhost/accounts");
        std::fs::create_dir_all(&accounts).map_err(|e| e.to_string())?;
        for (u, p) in users {
            std::fs::write(
                accounts.join(format!("{u}.dat")),
                format!("return {{\n\t[\"password\"] = {p:?};\n}};\n"),
            )
            .map_err(|e| e.to_string())?;
        }
        let cfg = format!(
            r#"run_as_root = true
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
certificates = "{d}"
log = {{ {{ levels = {{ min = "warn" }}, to = "file", filename = "{d}/prosody.log" }} }}
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
s2s_ports = {{ }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_plain"
storage = "internal"
modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping" }}
modules_disabled = {{ "s2s"; "tls" }}
VirtualHost "localhost"
"#,
            d = dir.display()
        );
        let cfg_path = dir.join("prosody.cfg.lua");
        std::fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&cfg_path)
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start Prosody: {e}"))?;
        let mut p = Prosody {
            port,
            dir: dir.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || p.child.try_wait().map(|s| s.is_some()).unwrap_or(true)
            {
                let log = std::fs::read_to_string(dir.join("prosody.log")).unwrap_or_default();
                return Err(format!("Prosody did not start on 127.0.0.1:{port}: {log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(p)
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to run a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerOpts {
    /// The XMPP domain (the virtual host).
    pub domain: String,
    /// The name in the server's certificate (the domain, unless a test
    /// wants a mismatch).
    pub cert_name: String,
    /// `(user, password)` accounts.
    pub users: Vec<(String, String)>,
    /// The c2s port (a free one if 0).
    pub port: u16,
    /// Run inside this network namespace (on its 127.0.0.1) instead of the
    /// test's own.
    pub netns: Option<String>,
}

impl ServerOpts {
    /// `domain` with a matching certificate and these accounts.
    pub fn new(domain: &str, users: &[(&str, &str)]) -> ServerOpts {
        ServerOpts {
            domain: domain.into(),
            cert_name: domain.into(),
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            port: 0,
            netns: None,
        }
    }
}

/// An ordinary XMPP server with TLS, as described in the module docs.
#[derive(Debug)]
pub struct Server {
    /// Its c2s port on 127.0.0.1.
    pub port: u16,
    /// Its working directory.
    pub dir: PathBuf,
    /// The domain.
    pub domain: String,
    netns: Option<String>,
    child: Option<Child>,
    cfg: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run openssl (apt-get install openssl): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Makes `ca.pem` (a test CA) and `server.crt`/`server.key` for `name`,
/// signed by it, in `dir`.
pub fn make_certs(dir: &Path, name: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3",
            "-subj",
            "/CN=Coterie test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    )?;
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    )
}

/// How Prosody's internal storage spells a host in a path
/// (`example.test` → `example%2etest`).
pub fn encode_host(host: &str) -> String {
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_string()
            } else {
                format!("%{:02x}", c as u32)
            }
        })
        .collect()
}

impl Server {
    /// Starts the server in `dir`. Fails with a clear message when Prosody
    /// or openssl is missing or the server does not come up.
    pub fn start(dir: &Path, opts: &ServerOpts) -> Result<Server, String> {
        let port = if opts.port == 0 {
            crate::free_port()
        } else {
            opts.port
        };
        make_certs(dir, &opts.cert_name)?;
        let host = encode_host(&opts.domain);
        let accounts = dir.join("data").join(&host).join("accounts");
        std::fs::create_dir_all(&accounts).map_err(|e| e.to_string())?;
        for (u, p) in &opts.users {
            std::fs::write(
                accounts.join(format!("{u}.dat")),
                format!("return {{\n\t[\"password\"] = {p:?};\n}};\n"),
            )
            .map_err(|e| e.to_string())?;
        }
        let cfg = format!(
            r#"run_as_root = true
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
log = {{ {{ levels = {{ min = "debug" }}, to = "file", filename = "{d}/prosody.log" }} }}
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
c2s_require_encryption = true
allow_unencrypted_plain_auth = false
authentication = "internal_plain"
storage = "internal"
archive_expires_after = "1w"
default_archive_policy = true
ssl = {{ certificate = "{d}/server.crt"; key = "{d}/server.key"; }}
modules_enabled = {{ "roster"; "saslauth"; "tls"; "disco"; "pep"; "private"; "vcard4"; "vcard_legacy"; "bookmarks"; "mam"; "offline"; "carbons"; "smacks"; "ping"; "version"; "blocklist"; "lastactivity"; "time"; "stanza_debug"; "admin_shell" }}
admin_socket = "{d}/admin.sock"
modules_disabled = {{ "s2s" }}
VirtualHost "{domain}"
"#,
            d = dir.display(),
            domain = opts.domain,
        );
        let cfg_path = dir.join("prosody.cfg.lua");
        std::fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
        let mut s = Server {
            port,
            dir: dir.to_path_buf(),
            domain: opts.domain.clone(),
            netns: opts.netns.clone(),
            child: None,
            cfg: cfg_path,
        };
        s.run()?;
        Ok(s)
    }

    fn run(&mut self) -> Result<(), String> {
        let bin = ["/usr/bin/prosody", "/usr/sbin/prosody"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or(
                "Prosody is not installed: `apt-get install prosody` (the test command does this)",
            )?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        // In another namespace its port cannot be tried from here: its log
        // says when it listens.
        let listening = format!("Activated service 'c2s' on [127.0.0.1]:{}", self.port);
        let before = self.log().matches(&listening).count();
        let child = cmd
            .arg("--config")
            .arg(&self.cfg)
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start Prosody: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let up = |s: &Server| match &s.netns {
            Some(_) => s.log().matches(&listening).count() > before,
            None => std::net::TcpStream::connect(("127.0.0.1", s.port)).is_ok(),
        };
        while !up(self) {
            let exited = self
                .child
                .as_mut()
                .map(|c| c.try_wait().map(|s| s.is_some()).unwrap_or(true))
                .unwrap_or(true);
            if Instant::now() > deadline || exited {
                return Err(format!(
                    "Prosody did not start on 127.0.0.1:{}: {}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The test CA's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.run()
    }

    /// Runs a command in the server's admin shell (`prosodyctl shell`),
    /// e.g. `c2s:close("me@example.test", "bye", "policy-violation")`.
    pub fn shell(&self, command: &str) -> Result<String, String> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "prosodyctl"]);
                c
            }
            None => Command::new("prosodyctl"),
        };
        let out = cmd
            .arg("--config")
            .arg(&self.cfg)
            .args(["shell", command])
            .output()
            .map_err(|e| format!("cannot run prosodyctl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "prosodyctl shell {command:?} failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Its log (every stanza, at debug level).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prosody.log")).unwrap_or_default()
    }

    /// What the server stores about `user`: `(store, file)` for every file
    /// of the user in the host's internal storage (`accounts`, `roster`,
    /// `private`, `pep_*`, `vcard`, `archive`, `offline`, …).
    pub fn stored(&self, user: &str) -> Vec<(String, PathBuf)> {
        let host = self.dir.join("data").join(encode_host(&self.domain));
        let mut out = Vec::new();
        let Ok(stores) = std::fs::read_dir(&host) else {
            return out;
        };
        for store in stores.flatten() {
            let name = store.file_name().to_string_lossy().into_owned();
            for f in crate::files_under(&store.path()) {
                let stem = f
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if stem == encode_host(user) || stem == user {
                    out.push((name.clone(), f));
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
