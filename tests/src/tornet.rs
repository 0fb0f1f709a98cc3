//! A private Tor network for integration tests: 3 directory authorities and
//! 5 relays (the last one an exit limited to loopback, and to the network's
//! own /24 when it runs on a LAN address) of Debian's `tor`, all inside a
//! network namespace, plus the arti TOML that points a `coterie` node at it.
//!
//! ```text
//!  namespace ctorXXXX (only `lo`), or an existing one given to the builder
//!  ├─ cotauth0..cotauth2   directory authorities (also relays)
//!  ├─ cotrelay0..cotrelay3 relays
//!  └─ cotexit              exit relay (127.0.0.0/8, and IP/24 on a LAN)
//! ```
//!
//! Safety: every `tor` process runs only inside a network namespace (never
//! the root one), and only one without a default route: the network cannot
//! reach the public internet. Every process is killed by its PID, and the
//! namespace the harness created is deleted, when the [`TorNet`] drops, also
//! when a test panics. Needs root (CI runs as root) and the Debian packages
//! `tor` (with `tor-gencert`) and `iproute2`.
//!
//! Every router is flagged HSDir, every router but the exit Guard (a
//! client whose guard is the only exit cannot build an exit circuit), and
//! the exit Exit, by the
//! authorities' `TestingDirAuthVote*` options, and Stable by zero
//! `AuthDirVoteStableGuarantee*` thresholds (otherwise a relay whose uptime is
//! below the median, such as one just restarted, goes without Stable), so
//! the network is usable as soon as the first consensus is out;
//! [`TorNetBuilder::start`] waits for it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Directory authorities in every network.
const AUTHORITIES: usize = 3;
/// Non-authority relays in every network (the last is the exit).
const RELAYS: usize = 5;
/// How long [`TorNetBuilder::start`] waits for a usable consensus.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long [`TorNet::restart_relay`] waits for the relay to bootstrap.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// Flags every router must carry in every authority's consensus before the
/// network is ready.
const READY_FLAGS: [&str; 3] = ["Guard", "Stable", "HSDir"];
/// Lines of each log that [`TorNet::log_tail`] shows.
const TAIL_LINES: usize = 25;

/// Configures a [`TorNet`] before it starts.
#[derive(Debug, Clone)]
pub struct TorNetBuilder {
    /// The authorities' voting interval in seconds (default 20). The onion
    /// service time period of the network is 24 voting intervals.
    voting_interval_secs: u32,
    /// An existing namespace and the address configured there, or `None`
    /// for a fresh namespace with only `lo` (127.0.0.1).
    namespace: Option<(String, Ipv4Addr)>,
    /// Ports the exit also accepts for any address (see
    /// [`TorNetBuilder::exit_ports`]).
    exit_ports: Vec<u16>,
}

impl Default for TorNetBuilder {
    fn default() -> Self {
        TorNetBuilder {
            voting_interval_secs: 20,
            namespace: None,
            exit_ports: Vec::new(),
        }
    }
}

impl TorNetBuilder {
    /// Sets the authorities' voting interval to `secs` seconds. C tor needs
    /// the interval to divide 30 minutes, and the onion service time period
    /// (24 intervals) must be a whole number of minutes of at least 5: 15,
    /// 20, 25, 30, 40, 45, 50, 60, … Panics otherwise.
    pub fn voting_interval(mut self, secs: u32) -> Self {
        assert!(
            1800u32.is_multiple_of(secs),
            "voting interval {secs} s: tor needs it to divide 30 minutes evenly"
        );
        assert!(
            (24 * secs).is_multiple_of(60) && 24 * secs / 60 >= 5,
            "voting interval {secs} s: 24 × it must be a whole number of minutes, at least 5 \
             (use a multiple of 5 s, at least 15 s)"
        );
        self.voting_interval_secs = secs;
        self
    }

    /// Lets the exit accept these ports for any address, before its
    /// `reject *:*`. Clients choose exits by the policy summary in the
    /// microdescriptors, which leaves out private addresses: an exit that
    /// accepts only loopback looks like one that accepts nothing, and arti
    /// finds no exit for a stream to 127.0.0.1. With the port in the
    /// summary it does, and the exit then connects to its own loopback.
    /// The namespace has no default route, so nothing leaves it.
    pub fn exit_ports(mut self, ports: &[u16]) -> Self {
        self.exit_ports = ports.to_vec();
        self
    }

    /// Runs the network inside the existing namespace `ns` on address `ip`,
    /// which the caller has already configured on an interface there (for
    /// instance a test LAN's bridge namespace, so LAN hosts reach the
    /// network), instead of a fresh namespace with only `lo`. The namespace
    /// is not deleted on drop; it must have no default route.
    pub fn in_namespace(mut self, ns: &str, ip: Ipv4Addr) -> Self {
        self.namespace = Some((ns.to_string(), ip));
        self
    }

    /// Starts the network and blocks until every authority serves a valid
    /// consensus that lists every router with the Stable and HSDir flags,
    /// every router but the exit with Guard, and the exit with Exit: typically 14–32 s after the tor
    /// processes start, as the first consensus waits for a voting interval
    /// boundary. Panics with a clear message and the tail of the tor logs
    /// if a step fails, a tor process exits, or readiness takes over 90 s;
    /// whatever was started is stopped and removed first.
    pub fn start(self) -> TorNet {
        let tor = find_program(&["/usr/sbin/tor", "/usr/bin/tor"], "tor");
        let gencert = find_program(
            &["/usr/bin/tor-gencert", "/usr/sbin/tor-gencert"],
            "tor-gencert",
        );
        let dir = tempfile::Builder::new()
            .prefix("coterie-tornet-")
            .tempdir()
            .expect("cannot create a temporary directory for the Tor network");
        let (ns, ip, own_ns) = match &self.namespace {
            Some((ns, ip)) => (ns.clone(), *ip, false),
            None => (create_namespace(), Ipv4Addr::LOCALHOST, true),
        };
        // From here on, dropping `net` (also by a panic) stops every tor
        // started so far and deletes the namespace if it is ours.
        let mut net = TorNet {
            ns,
            own_ns,
            ip,
            voting_interval_secs: self.voting_interval_secs,
            exit_ports: self.exit_ports.clone(),
            tor,
            routers: Vec::new(),
            arti_config: dir.path().join("arti.toml"),
            ready_after: Duration::ZERO,
            dir,
        };
        net.check_namespace();
        let base = net.pick_port_base();
        net.create_routers(&gencert, base);
        net.write_torrcs();
        net.write_arti_config();
        let started = Instant::now();
        for i in 0..net.routers.len() {
            net.spawn(i);
        }
        net.wait_ready(started);
        net.ready_after = started.elapsed();
        net
    }
}

/// One tor process of the network.
#[derive(Debug)]
struct Router {
    /// Its nickname.
    nick: String,
    /// Whether it is a directory authority.
    authority: bool,
    /// Whether it is the exit.
    exit: bool,
    /// Its DataDirectory (mode 0700), which also holds its torrc and logs.
    data: PathBuf,
    /// Its ORPort on the network's address.
    or_port: u16,
    /// Its DirPort on the network's address.
    dir_port: u16,
    /// RSA identity fingerprint, 40 upper-case hex digits.
    rsa_id: String,
    /// Ed25519 identity, unpadded base64.
    ed_id: String,
    /// The authority's v3 identity (certificate fingerprint), if an authority.
    v3ident: Option<String>,
    /// The running process (started through `ip netns exec`, which execs
    /// tor in place: this is tor's own PID).
    child: Option<Child>,
}

impl Router {
    fn torrc(&self) -> PathBuf {
        self.data.join("torrc")
    }
    fn log(&self) -> PathBuf {
        self.data.join("notice.log")
    }
    fn stdout_log(&self) -> PathBuf {
        self.data.join("stdout.log")
    }
}

/// A running private Tor network. Dropping it kills every tor process it
/// started (by PID) and deletes the namespace it created.
#[derive(Debug)]
pub struct TorNet {
    ns: String,
    own_ns: bool,
    ip: Ipv4Addr,
    voting_interval_secs: u32,
    exit_ports: Vec<u16>,
    tor: PathBuf,
    /// Authorities first, then relays; the exit is the last one.
    routers: Vec<Router>,
    arti_config: PathBuf,
    ready_after: Duration,
    /// Holds every DataDirectory and the arti config; dropped last.
    dir: tempfile::TempDir,
}

impl TorNet {
    /// A builder, to change the voting interval or run in an existing
    /// namespace.
    pub fn builder() -> TorNetBuilder {
        TorNetBuilder::default()
    }

    /// Starts a network with the defaults: its own namespace `ctorXXXX`
    /// with only `lo` up, on 127.0.0.1, with a 20 s voting interval (an
    /// 8 minute onion service time period). Blocks until it is ready; see
    /// [`TorNetBuilder::start`].
    pub fn start() -> TorNet {
        TorNet::builder().start()
    }

    /// The namespace the network runs in. Nodes using it must run there, or
    /// be able to reach [`TorNet::ip`] from theirs.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The address every router listens on.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// An arti 0.47 TOML file with the network's fallback caches (the
    /// authorities' ORPorts), authorities, path rules that let relays on one
    /// address share paths, and the test network's `hsdir_interval`. Pass it
    /// as `coterie run --tor-config FILE`. It has no `[storage]` section.
    pub fn arti_config(&self) -> &Path {
        &self.arti_config
    }

    /// The onion service time period: 24 voting intervals.
    pub fn time_period(&self) -> Duration {
        Duration::from_secs(24 * u64::from(self.voting_interval_secs))
    }

    /// The authorities' voting interval.
    pub fn voting_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.voting_interval_secs))
    }

    /// How long the network took from starting the tor processes to a
    /// usable consensus.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// The number of non-authority relays (indices `0..relay_count()` of
    /// [`TorNet::kill_relay`]); the last one is the exit.
    pub fn relay_count(&self) -> usize {
        RELAYS
    }

    /// The number of routers in the consensus: authorities and relays.
    pub fn router_count(&self) -> usize {
        self.routers.len()
    }

    /// The relay index of the exit, which [`TorNet::kill_relay`] refuses.
    pub fn exit_relay(&self) -> usize {
        RELAYS - 1
    }

    /// Every router's nickname: authorities first, then relays.
    pub fn nicknames(&self) -> Vec<&str> {
        self.routers.iter().map(|r| r.nick.as_str()).collect()
    }

    /// The PIDs of the running tor processes (for checks that they are gone
    /// after the network drops).
    pub fn pids(&self) -> Vec<u32> {
        self.routers
            .iter()
            .filter_map(|r| r.child.as_ref().map(Child::id))
            .collect()
    }

    /// The temporary directory holding every DataDirectory, torrc and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Nickname → flags of every router in the newest consensus any
    /// authority holds (empty before the first one).
    pub fn consensus_flags(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.routers
            .iter()
            .filter(|r| r.authority)
            .filter_map(|r| self.authority_consensus(r))
            .max_by_key(|c| c.valid_after)
            .map(|c| c.flags)
            .unwrap_or_default()
    }

    /// Kills relay `i` (in `0..relay_count()`, not the exit) with SIGKILL,
    /// for reliability tests. The authorities do not test reachability, so
    /// the consensus keeps listing it as Running and HSDir (it only loses
    /// Fast): clients still pick it, as they would a relay that just died.
    /// Its keys stay: [`TorNet::restart_relay`] brings the same relay back.
    pub fn kill_relay(&mut self, i: usize) {
        let idx = self.relay_index(i);
        assert!(
            !self.routers[idx].exit,
            "kill_relay({i}): relay {i} is the network's only exit; kill another one"
        );
        let r = &mut self.routers[idx];
        let mut child = r
            .child
            .take()
            .unwrap_or_else(|| panic!("kill_relay({i}): {} is not running", r.nick));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts relay `i` again after [`TorNet::kill_relay`], with the same
    /// keys and ports, and waits (up to 60 s) until it has bootstrapped.
    pub fn restart_relay(&mut self, i: usize) {
        let idx = self.relay_index(i);
        assert!(
            self.routers[idx].child.is_none(),
            "restart_relay({i}): {} is still running",
            self.routers[idx].nick
        );
        let log = self.routers[idx].log();
        let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        self.spawn(idx);
        let deadline = Instant::now() + RESTART_TIMEOUT;
        loop {
            let text = std::fs::read(&log).unwrap_or_default();
            let fresh = text.get(offset as usize..).unwrap_or_default();
            if String::from_utf8_lossy(fresh).contains("Bootstrapped 100%") {
                return;
            }
            self.check_alive();
            if Instant::now() > deadline {
                panic!(
                    "relay {} did not bootstrap within {RESTART_TIMEOUT:?} of its restart\n{}",
                    self.routers[idx].nick,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of every tor log (and of any output tor printed
    /// before its log was open), for failure messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for r in &self.routers {
            for path in [r.stdout_log(), r.log()] {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                if lines.is_empty() {
                    continue;
                }
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("log");
                let _ = writeln!(out, "==== {} {name} ====", r.nick);
                for l in &lines[lines.len().saturating_sub(TAIL_LINES)..] {
                    let _ = writeln!(out, "{l}");
                }
            }
        }
        out
    }

    fn relay_index(&self, i: usize) -> usize {
        assert!(
            i < RELAYS,
            "relay index {i} out of range: the network has {RELAYS} relays"
        );
        AUTHORITIES + i
    }

    /// Refuses namespaces that are the root one or that have a default
    /// route (tor must not reach the public internet), and checks that the
    /// address is configured there.
    fn check_namespace(&self) {
        let ns_file = Path::new("/run/netns").join(&self.ns);
        let ns_meta = std::fs::metadata(&ns_file).unwrap_or_else(|e| {
            panic!(
                "network namespace {} does not exist ({}: {e})",
                self.ns,
                ns_file.display()
            )
        });
        for root in ["/proc/1/ns/net", "/proc/self/ns/net"] {
            if let Ok(m) = std::fs::metadata(root) {
                assert!(
                    !(m.dev() == ns_meta.dev() && m.ino() == ns_meta.ino()),
                    "namespace {} is the root network namespace: refusing to run tor there",
                    self.ns
                );
            }
        }
        for family in ["-4", "-6"] {
            let routes = ip_output(&["-n", &self.ns, family, "route", "show", "default"])
                .unwrap_or_else(|e| panic!("cannot read the routes of {}: {e}", self.ns));
            assert!(
                routes.trim().is_empty(),
                "namespace {} has a default route ({}): refusing to run tor where it could \
                 reach the internet",
                self.ns,
                routes.trim()
            );
        }
        let addrs = ip_output(&["-n", &self.ns, "-4", "-o", "addr", "show"])
            .unwrap_or_else(|e| panic!("cannot read the addresses of {}: {e}", self.ns));
        assert!(
            addrs.contains(&format!("inet {}/", self.ip)),
            "address {} is not configured in namespace {} (it has: {})",
            self.ip,
            self.ns,
            addrs.trim()
        );
    }

    /// A base port with `base..base+8` (ORPorts) and `base+50..base+58`
    /// (DirPorts) free in the namespace. A fresh namespace has every port
    /// free; a shared one gets a random base between 20000 and 59900.
    fn pick_port_base(&self) -> u16 {
        if self.own_ns {
            return 5000;
        }
        for _ in 0..50 {
            let base = 20000 + 100 * (rand::random::<u16>() % 400);
            let Ok(listening) = Command::new("ss").args(["-N", &self.ns, "-Htanu"]).output() else {
                return base;
            };
            let used: BTreeSet<u16> = String::from_utf8_lossy(&listening.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().nth(4))
                .filter_map(|a| a.rsplit(':').next()?.parse().ok())
                .collect();
            let wanted =
                (0..AUTHORITIES + RELAYS).flat_map(|i| [base + i as u16, base + 50 + i as u16]);
            if wanted.clone().all(|p| !used.contains(&p)) {
                return base;
            }
        }
        panic!("no free block of ports found in namespace {}", self.ns);
    }

    /// Creates every DataDirectory with its keys, and reads the identities.
    /// Key generation takes about 0.6 s (relay) to 1.5 s (authority) of CPU
    /// per router: they run in parallel.
    fn create_routers(&mut self, gencert: &Path, base: u16) {
        let this = &*self;
        let routers: Vec<Router> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..AUTHORITIES + RELAYS)
                .map(|i| s.spawn(move || this.create_router(i, gencert, base)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        self.routers = routers;
    }

    /// Creates the DataDirectory of router `i` with its keys (and an
    /// authority's certificate), and reads its identities.
    fn create_router(&self, i: usize, gencert: &Path, base: u16) -> Router {
        let n = AUTHORITIES + RELAYS;
        let authority = i < AUTHORITIES;
        let exit = i == n - 1;
        let nick = if authority {
            format!("cotauth{i}")
        } else if exit {
            "cotexit".to_string()
        } else {
            format!("cotrelay{}", i - AUTHORITIES)
        };
        let data = self.dir.path().join(&nick);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(data.join("keys"))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", data.display()));
        let or_port = base + i as u16;
        let dir_port = base + 50 + i as u16;
        let v3ident = authority.then(|| {
            let keys = data.join("keys");
            let mut child = self
                .ns_command(gencert)
                .args([
                    "--create-identity-key",
                    "--passphrase-fd",
                    "0",
                    "-i",
                    "authority_identity_key",
                    "-s",
                    "authority_signing_key",
                    "-c",
                    "authority_certificate",
                    "-m",
                    "12",
                    "-a",
                    &format!("{}:{dir_port}", self.ip),
                ])
                .current_dir(&keys)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("cannot run tor-gencert (Debian package tor)");
            // An empty passphrase.
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"\n");
            }
            let out = child
                .wait_with_output()
                .expect("tor-gencert did not finish");
            assert!(
                out.status.success(),
                "tor-gencert failed for {nick}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let cert = std::fs::read_to_string(keys.join("authority_certificate"))
                .expect("tor-gencert wrote no authority_certificate");
            cert.lines()
                .find_map(|l| l.strip_prefix("fingerprint "))
                .map(|f| f.trim().to_string())
                .expect("authority_certificate has no fingerprint line")
        });
        let out = self
            .ns_command(&self.tor)
            .args([
                "--ignore-missing-torrc",
                "-f",
                "/nonexistent",
                "--defaults-torrc",
            ])
            .arg(self.empty_defaults())
            .arg("--DataDirectory")
            .arg(&data)
            .args(["--ORPort", "1", "--list-fingerprint"])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run tor --list-fingerprint (Debian package tor)");
        assert!(
            out.status.success(),
            "tor --list-fingerprint failed for {nick}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let fpr = std::fs::read_to_string(data.join("fingerprint"))
            .expect("tor --list-fingerprint wrote no fingerprint file");
        let rsa_id = fpr
            .split_whitespace()
            .nth(1)
            .map(str::to_uppercase)
            .filter(|f| f.len() == 40 && f.chars().all(|c| c.is_ascii_hexdigit()))
            .unwrap_or_else(|| panic!("unexpected fingerprint file for {nick}: {fpr:?}"));
        let ed_key = std::fs::read(data.join("keys/ed25519_master_id_public_key"))
            .expect("tor --list-fingerprint wrote no ed25519_master_id_public_key");
        assert!(
            ed_key.len() >= 32,
            "ed25519_master_id_public_key of {nick} is too short"
        );
        let ed_id = data_encoding::BASE64_NOPAD.encode(&ed_key[ed_key.len() - 32..]);
        Router {
            nick,
            authority,
            exit,
            data,
            or_port,
            dir_port,
            rsa_id,
            ed_id,
            v3ident,
            child: None,
        }
    }

    /// Writes every router's torrc.
    fn write_torrcs(&self) {
        let ip = self.ip;
        let v = self.voting_interval_secs;
        // Vote and distribution delays of 4 s, less on short intervals:
        // tor wants their sum under half the interval.
        let d = ((v - 1) / 4).min(4);
        let exit = self
            .routers
            .iter()
            .find(|r| r.exit)
            .expect("the network has an exit");
        // Every router but the exit is a guard: a client whose guard was
        // the only exit could build no exit circuit at all (arti picks the
        // guard first, and a path never uses one relay twice).
        let guards = self
            .routers
            .iter()
            .filter(|r| !r.exit)
            .map(|r| format!("${}", r.rsa_id))
            .collect::<Vec<_>>()
            .join(",");
        let mut common = String::new();
        let _ = writeln!(
            common,
            "TestingTorNetwork 1\n\
             PathsNeededToBuildCircuits 0.67\n\
             TestingDirAuthVoteExit ${}\n\
             TestingDirAuthVoteHSDir *\n\
             TestingDirAuthVoteGuard {}\n\
             TestingDirAuthVoteGuardIsStrict 1\n\
             TestingMinExitFlagThreshold 0\n\
             V3AuthNIntervalsValid 2\n\
             AddressDisableIPv6 1\n\
             ClientUseIPv6 0\n\
             Sandbox 0\n\
             RunAsDaemon 0\n\
             ShutdownWaitLength 0\n\
             SafeLogging 0\n\
             ContactInfo coterie-tests\n\
             SocksPort 0\n\
             Address {ip}\n\
             AssumeReachable 1\n\
             ServerDNSDetectHijacking 0\n\
             ServerDNSTestAddresses\n\
             ServerDNSResolvConfFile /dev/null\n\
             ServerDNSAllowBrokenConfig 1",
            exit.rsa_id, guards
        );
        for a in self.routers.iter().filter(|r| r.authority) {
            let _ = writeln!(
                common,
                "DirAuthority {} orport={} no-v2 v3ident={} {ip}:{} {}",
                a.nick,
                a.or_port,
                a.v3ident.as_deref().expect("an authority has a v3ident"),
                a.dir_port,
                a.rsa_id
            );
        }
        for r in &self.routers {
            let mut rc = common.clone();
            let _ = writeln!(
                rc,
                "Nickname {}\nDataDirectory {}\nLog notice file {}\nORPort {ip}:{}\nDirPort {ip}:{}",
                r.nick,
                r.data.display(),
                r.log().display(),
                r.or_port,
                r.dir_port
            );
            if r.exit {
                let o = ip.octets();
                let _ = writeln!(
                    rc,
                    "ExitRelay 1\nExitPolicyRejectPrivate 0\nExitPolicy accept 127.0.0.0/8:*"
                );
                if !ip.is_loopback() {
                    let _ = writeln!(rc, "ExitPolicy accept {}.{}.{}.0/24:*", o[0], o[1], o[2]);
                }
                for port in &self.exit_ports {
                    let _ = writeln!(rc, "ExitPolicy accept *:{port}");
                }
                let _ = writeln!(rc, "ExitPolicy reject *:*");
            } else {
                let _ = writeln!(rc, "ExitRelay 0\nExitPolicy reject *:*");
            }
            if r.authority {
                // Stable is otherwise given only to relays whose uptime is at
                // least the median: on a fresh network some relays missed it
                // for minutes.
                let _ = writeln!(
                    rc,
                    "AuthoritativeDirectory 1\n\
                     V3AuthoritativeDirectory 1\n\
                     AuthDirTestReachability 0\n\
                     AuthDirVoteStableGuaranteeMinUptime 0\n\
                     AuthDirVoteStableGuaranteeMTBF 0\n\
                     TestingV3AuthInitialVotingInterval {v}\n\
                     TestingV3AuthInitialVoteDelay {d}\n\
                     TestingV3AuthInitialDistDelay {d}\n\
                     V3AuthVotingInterval {v}\n\
                     V3AuthVoteDelay {d}\n\
                     V3AuthDistDelay {d}\n\
                     ConsensusParams hsdir_interval={}",
                    24 * v / 60
                );
            }
            std::fs::write(r.torrc(), rc)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", r.torrc().display()));
        }
    }

    /// Writes the arti TOML (see [`TorNet::arti_config`]).
    fn write_arti_config(&self) {
        let mut toml =
            String::from("# A private Tor network of coterie-tests (tests/src/tornet.rs).\n");
        toml.push_str("[tor_network]\nfallback_caches = [\n");
        let authorities: Vec<&Router> = self.routers.iter().filter(|r| r.authority).collect();
        for a in &authorities {
            let _ = writeln!(
                toml,
                "    {{ rsa_identity = \"{}\", ed_identity = \"{}\", orports = [\"{}:{}\"] }},",
                a.rsa_id, a.ed_id, self.ip, a.or_port
            );
        }
        toml.push_str("]\n\n[tor_network.authorities]\nv3idents = [\n");
        for a in &authorities {
            let _ = writeln!(
                toml,
                "    \"{}\",",
                a.v3ident.as_deref().expect("an authority has a v3ident")
            );
        }
        let _ = write!(
            toml,
            "]\n\n\
             # Every relay shares one address: without this they would all be one\n\
             # family and no path could be built.\n\
             [path_rules]\n\
             ipv4_subnet_family_prefix = 33\n\
             ipv6_subnet_family_prefix = 129\n\n\
             # C tor's onion service time period on a test network: 24 voting intervals.\n\
             [override_net_params]\n\
             hsdir_interval = {}\n\
             # Circuits on loopback build in milliseconds: an adaptive build\n\
             # timeout learnt from them (floor 10 ms) fails every circuit at the\n\
             # first load spike or relay restart. A fixed 60 s, as before learning.\n\
             cbtdisabled = 1\n",
            24 * self.voting_interval_secs / 60
        );
        std::fs::write(&self.arti_config, toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.arti_config.display()));
    }

    /// An empty file given to tor as its defaults torrc, so no system-wide
    /// `torrc-defaults` changes the network.
    fn empty_defaults(&self) -> PathBuf {
        let path = self.dir.path().join("torrc-defaults");
        if !path.exists() {
            std::fs::write(&path, "")
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
        path
    }

    /// `program` run inside the network's namespace.
    fn ns_command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Starts router `idx` in the namespace, output appended to its
    /// `stdout.log`.
    fn spawn(&mut self, idx: usize) {
        let r = &self.routers[idx];
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(r.stdout_log())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", r.stdout_log().display()));
        let err = out.try_clone().expect("cannot duplicate a log file handle");
        let child = self
            .ns_command(&self.tor)
            .arg("-f")
            .arg(r.torrc())
            .arg("--defaults-torrc")
            .arg(self.empty_defaults())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tor for {}: {e}", r.nick));
        self.routers[idx].child = Some(child);
    }

    /// Panics with the logs if a started tor process has exited.
    fn check_alive(&mut self) {
        let mut dead = Vec::new();
        for r in &mut self.routers {
            if let Some(c) = r.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                dead.push(format!("{} ({status})", r.nick));
                r.child = None;
            }
        }
        if !dead.is_empty() {
            panic!(
                "tor exited in the test network: {}\n{}",
                dead.join(", "),
                self.log_tail()
            );
        }
    }

    /// The current microdesc consensus authority `r` holds, if any.
    fn authority_consensus(&self, r: &Router) -> Option<Consensus> {
        let text = std::fs::read_to_string(r.data.join("cached-microdesc-consensus")).ok()?;
        parse_consensus(&text)
    }

    /// Why authority `a` is not ready to serve a usable consensus, or
    /// `None` when it is: its consensus must be valid already (tor writes
    /// it a moment before it serves it) and list every router with the
    /// ready flags (and the exit with Exit).
    fn not_ready(&self, a: &Router) -> Option<String> {
        let Some(c) = self.authority_consensus(a) else {
            return Some(format!("{} has no consensus", a.nick));
        };
        if c.valid_after > unix_now() {
            return Some(format!("{}'s consensus is not valid yet", a.nick));
        }
        let lacking: Vec<String> = self
            .routers
            .iter()
            .filter_map(|r| {
                let Some(have) = c.flags.get(&r.nick) else {
                    return Some(format!("{} absent", r.nick));
                };
                let exit = r.exit.then_some("Exit");
                let no: Vec<&str> = READY_FLAGS
                    .iter()
                    .copied()
                    .filter(|f| !(r.exit && *f == "Guard"))
                    .chain(exit)
                    .filter(|f| !have.contains(*f))
                    .collect();
                (!no.is_empty()).then(|| format!("{} lacks {}", r.nick, no.join(", ")))
            })
            .collect();
        (!lacking.is_empty()).then(|| format!("{}'s consensus: {}", a.nick, lacking.join(", ")))
    }

    /// Waits until every authority serves a consensus listing every router
    /// with the ready flags.
    fn wait_ready(&mut self, started: Instant) {
        let deadline = started + READY_TIMEOUT;
        loop {
            let missing: Vec<String> = self
                .routers
                .iter()
                .filter(|r| r.authority)
                .filter_map(|a| self.not_ready(a))
                .collect();
            if missing.is_empty() {
                return;
            }
            self.check_alive();
            if Instant::now() > deadline {
                panic!(
                    "the private Tor network in namespace {} was not ready after {READY_TIMEOUT:?}: \
                     {}\n{}",
                    self.ns,
                    missing.join("; "),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for TorNet {
    fn drop(&mut self) {
        for r in &mut self.routers {
            if let Some(mut c) = r.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if self.own_ns {
            let _ = ip_output(&["netns", "del", &self.ns]);
        }
    }
}

/// What the harness reads from a consensus.
#[derive(Debug)]
struct Consensus {
    /// `valid-after`, in seconds since the Unix epoch.
    valid_after: u64,
    /// Nickname → flags of every router.
    flags: BTreeMap<String, BTreeSet<String>>,
}

/// Parses a (microdesc or full) consensus; `None` if it has no
/// `valid-after` line.
fn parse_consensus(text: &str) -> Option<Consensus> {
    let mut flags = BTreeMap::new();
    let mut valid_after = None;
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("valid-after ") {
            valid_after = parse_utc(rest);
        } else if let Some(rest) = line.strip_prefix("r ") {
            current = rest.split_whitespace().next().map(str::to_string);
        } else if let Some(rest) = line.strip_prefix("s ")
            && let Some(nick) = current.take()
        {
            flags.insert(nick, rest.split_whitespace().map(str::to_string).collect());
        } else if line.starts_with("directory-footer") {
            break;
        }
    }
    Some(Consensus {
        valid_after: valid_after?,
        flags,
    })
}

/// Seconds since the Unix epoch of a `YYYY-MM-DD HH:MM:SS` UTC time.
fn parse_utc(s: &str) -> Option<u64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':').map(|v| v.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    // Days from 1970-01-01 to the date (proleptic Gregorian calendar).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// The current time in seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the system clock is before 1970")
        .as_secs()
}

/// The first of `candidates` that exists, or a panic naming the package.
fn find_program(candidates: &[&str], name: &str) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: `apt-get install tor` (Debian package tor)")
        })
}

/// Runs `ip ARGS` and returns its stdout.
fn ip_output(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (Debian package iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates a fresh namespace `ctorXXXX` with only `lo`, up.
fn create_namespace() -> String {
    let mut last_err = String::new();
    for _ in 0..20 {
        let ns = format!("ctor{:04x}", rand::random::<u16>());
        match ip_output(&["netns", "add", &ns]) {
            Ok(_) => {
                if let Err(e) = ip_output(&["-n", &ns, "link", "set", "lo", "up"]) {
                    let _ = ip_output(&["netns", "del", &ns]);
                    panic!("cannot bring up lo in namespace {ns}: {e}");
                }
                return ns;
            }
            // A name taken by another run is never touched: try another.
            Err(e) => last_err = e,
        }
    }
    panic!(
        "cannot create a network namespace for the Tor network (needs root and iproute2): {last_err}"
    );
}
