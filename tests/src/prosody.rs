//! A private Prosody (Debian package `prosody`) on 127.0.0.1 for tests and
//! benchmarks: its own config, data directory and port, accounts written
//! directly into its internal storage, killed when dropped.

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
