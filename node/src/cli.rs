//! Command-line parsing, passphrase handling and output.
//!
//! Exit codes (also in the README):
//! 0 success · 1 internal or storage error · 2 bad usage · 3 no profile ·
//! 4 wrong passphrase · 5 no such contact · 6 invite refused or invalid ·
//! 7 profile busy / node not answering · 8 network (cannot listen)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use coterie_node::invite::valid_name;
use coterie_node::ops::{self, OpError};
use coterie_node::runtime::control::{self, ControlError, Request, Response};
use coterie_node::runtime::{Node, NodeConfig};
use coterie_node::store::crypto::KdfParams;
use coterie_node::store::{self, OpenStoreError, Profile, Store};
use serde::Serialize;
use transport::PeerAddr;

#[derive(Parser, Debug)]
#[command(
    name = "coterie",
    version,
    about = "Coterie: a serverless, end-to-end encrypted messenger"
)]
struct Cli {
    /// Profile directory (default: $XDG_DATA_HOME/coterie/default).
    #[arg(long, global = true, env = "COTERIE_PROFILE")]
    profile: Option<PathBuf>,
    /// Print one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a profile (passphrase from COTERIE_PASSPHRASE, else prompted).
    Init {
        /// Your display name (the part before @ in your address).
        #[arg(long, default_value = "me")]
        name: String,
    },
    /// Show your address and fingerprint.
    Id,
    /// Print a single-use invite link.
    Invite {
        /// How long the invite stays valid (s, m, h, d, w).
        #[arg(long, default_value = "7d")]
        ttl: String,
    },
    /// Add a contact from an invite link.
    Add {
        /// The invite link (xmpp:…?coterie-invite;…).
        uri: String,
        /// What to call them (default: the name in the invite).
        #[arg(long)]
        name: Option<String>,
    },
    /// List contacts and their state.
    Contacts,
    /// Remove a contact: their node is refused from then on, and the
    /// history and queued messages with them are deleted.
    Remove {
        /// Contact name or fingerprint prefix.
        contact: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// Run the node in the foreground.
    Run {
        #[command(flatten)]
        args: RunArgs,
    },
    /// Run a headless, always-on node for a small box that holds sealed
    /// messages between its contacts while they are offline (`coterie run`
    /// with holding offered). Contacts who add it and turn on `coterie
    /// holding use on` leave messages with it.
    Serve {
        #[command(flatten)]
        args: RunArgs,
    },
    /// Offline delivery: leave messages for offline contacts with mutual
    /// contacts who hold them, and hold for your contacts. Without a
    /// change: shows the settings.
    Holding {
        #[command(subcommand)]
        cmd: Option<HoldingCmd>,
    },
    /// Send a message (queued durably if the contact is offline).
    Send {
        /// Contact name or fingerprint prefix.
        contact: String,
        /// The text.
        text: String,
    },
    /// Show messages with a contact.
    History {
        /// Contact name or fingerprint prefix.
        contact: String,
        /// How many of the latest messages.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// A contact's OMEMO devices with their fingerprints and trust.
    Fingerprints {
        /// Contact name or fingerprint prefix.
        contact: String,
    },
    /// Trust a contact's device after comparing its fingerprint with them.
    Verify {
        /// Contact name or fingerprint prefix.
        contact: String,
        /// Device id (from `coterie fingerprints`).
        device: u32,
    },
    /// Show or set how many days messages are kept (0 = forever; default 30).
    Retention {
        /// New value in days.
        days: Option<u32>,
    },
    /// The bridge to an ordinary XMPP account (friends on Conversations,
    /// Dino, Gajim), through Tor.
    Bridge {
        #[command(subcommand)]
        cmd: BridgeCmd,
    },
    /// Groups with no room server (needs a running node: `coterie run`).
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// What the node is doing.
    Status,
    /// Stop a running node.
    Stop,
    /// Give back the disk space of deleted messages (the node must be
    /// stopped; safe to interrupt).
    Compact,
    /// Destroy the profile irrecoverably.
    Wipe {
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Create a group with you as its admin.
    Create {
        /// Its name.
        name: String,
    },
    /// Your groups.
    List,
    /// A link (and QR code) that makes whoever uses it your contact and a
    /// member: for a meeting room, one scan each (admins).
    Link {
        /// Group name or id prefix.
        group: String,
        /// How long it works.
        #[arg(long, default_value = "2h")]
        ttl: String,
        /// How many people may use it.
        #[arg(long, default_value_t = 50)]
        uses: u32,
    },
    /// Join a group with its link (you become the inviter's contact; they
    /// add you once their node sees you).
    Join {
        /// The link.
        uri: String,
    },
    /// Add a contact to a group (admins).
    Invite {
        /// Group name or id prefix.
        group: String,
        /// Contact name or fingerprint prefix.
        contact: String,
        /// Make them an admin too.
        #[arg(long)]
        admin: bool,
    },
    /// Who is in a group.
    Members {
        /// Group name or id prefix.
        group: String,
    },
    /// Write to a group.
    Send {
        /// Group name or id prefix.
        group: String,
        /// The text.
        text: String,
    },
    /// A group's messages, oldest first.
    History {
        /// Group name or id prefix.
        group: String,
        /// How many of the latest.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Leave a group.
    Leave {
        /// Group name or id prefix.
        group: String,
    },
    /// Remove a member (admins): they get nothing written after this.
    Remove {
        /// Group name or id prefix.
        group: String,
        /// Contact name, or member key prefix (see `members`).
        member: String,
    },
    /// Rename a group (admins).
    Rename {
        /// Group name or id prefix.
        group: String,
        /// The new name.
        name: String,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Listen on ADDR (TCP and QUIC). Repeatable. Default 127.0.0.1:7474.
    /// An IPv6 link-local address needs its interface: [fe80::1%wlan0]:7474.
    #[arg(long = "listen", value_name = "ADDR", value_parser = listen_addr)]
    listen: Vec<SocketAddr>,
    /// Announce ADDR (tcp:IP:PORT or quic:IP:PORT) instead of the listen addresses. Repeatable.
    #[arg(long = "advertise", value_name = "ADDR")]
    advertise: Vec<String>,
    /// Find contacts on the local network (encrypted mDNS records only contacts can read).
    #[arg(long)]
    lan: bool,
    /// Seconds before LAN records change names and contents.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    lan_period: u64,
    /// DANGEROUS: also announce yourself with a plain XEP-0174 record
    /// (your name in the clear) and chat in CLEARTEXT with classic
    /// link-local clients (Pidgin/finch "Bonjour"). Those chats are not
    /// encrypted or authenticated; they are marked cleartext.
    #[arg(long = "danger-xep0174-compat")]
    danger_xep0174_compat: bool,
    /// The plain XMPP port of the compatibility mode.
    #[arg(long, value_name = "PORT", default_value_t = coterie_node::runtime::compat::DEFAULT_PORT, requires = "danger_xep0174_compat")]
    compat_port: u16,
    /// An arti configuration file (TOML: bridges, a private Tor network,
    /// …). Without it, arti's defaults: the public Tor network.
    #[arg(long, value_name = "FILE")]
    tor_config: Option<PathBuf>,
    /// No Tor: not reachable as an onion service, contacts reached only
    /// on the LAN or at the addresses they announced.
    #[arg(long, conflicts_with = "tor_config")]
    no_tor: bool,
}

#[derive(Subcommand, Debug)]
enum HoldingCmd {
    /// Leave messages for an offline contact with mutual contacts who
    /// offer to hold (they learn who it is for and its size, never its
    /// text): `on` or `off`.
    Use {
        #[arg(value_parser = on_off, action = clap::ArgAction::Set)]
        state: bool,
        /// How long holders keep what you leave, in hours (1 to 336).
        #[arg(long)]
        hours: Option<u32>,
    },
    /// Hold sealed messages between your contacts for them: `on` or `off`.
    Offer {
        #[arg(value_parser = on_off, action = clap::ArgAction::Set)]
        state: bool,
    },
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("`{s}`: say on or off")),
    }
}

#[derive(Subcommand, Debug)]
enum BridgeCmd {
    /// Log into an XMPP account (password from COTERIE_BRIDGE_PASSWORD, else
    /// prompted; kept in the encrypted profile). Replaces any account set.
    Set {
        /// The account, user@example.org.
        jid: String,
        /// Connect to HOST:PORT instead of the account's domain on 5222
        /// (Tor cannot look up SRV records).
        #[arg(long, value_name = "HOST:PORT")]
        server: Option<String>,
        /// Trust only the certificates in this PEM file (a self-hosted
        /// server's own CA) instead of the system's.
        #[arg(long, value_name = "PEM")]
        ca_file: Option<PathBuf>,
        /// DANGEROUS: connect without Tor. The server, and everyone on the
        /// way, sees this device's IP address.
        #[arg(long = "danger-bridge-without-tor")]
        danger_bridge_without_tor: bool,
    },
    /// What the bridge is doing.
    Status,
    /// Log out and forget the account and its password.
    Off,
}

struct Fail {
    code: i32,
    msg: String,
}

impl From<OpError> for Fail {
    fn from(e: OpError) -> Self {
        Fail {
            code: e.exit_code(),
            msg: e.to_string(),
        }
    }
}

impl From<OpenStoreError> for Fail {
    fn from(e: OpenStoreError) -> Self {
        let code = match e {
            OpenStoreError::NoProfile(_) => 3,
            OpenStoreError::WrongPassphrase(_) => 4,
            OpenStoreError::InUse(_) => 7,
            OpenStoreError::AlreadyExists(_) => 2,
            _ => 1,
        };
        Fail {
            code,
            msg: e.to_string(),
        }
    }
}

fn fail(code: i32, msg: impl Into<String>) -> Fail {
    Fail {
        code,
        msg: msg.into(),
    }
}

fn default_profile() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("coterie").join("default")
}

fn passphrase(confirm: bool) -> Result<zeroize::Zeroizing<String>, Fail> {
    if let Ok(p) = std::env::var("COTERIE_PASSPHRASE") {
        return Ok(zeroize::Zeroizing::new(p));
    }
    let first = rpassword::prompt_password("Passphrase: ").map_err(|_| {
        fail(
            2,
            "no passphrase: set COTERIE_PASSPHRASE or run in a terminal",
        )
    })?;
    let first = zeroize::Zeroizing::new(first);
    if confirm {
        let again = zeroize::Zeroizing::new(
            rpassword::prompt_password("Repeat passphrase: ")
                .map_err(|e| fail(2, e.to_string()))?,
        );
        if *again != *first {
            return Err(fail(2, "the passphrases differ; try again"));
        }
    }
    Ok(first)
}

/// Fails with what to do when a node runs on the profile (`action` needs
/// the profile to itself).
fn node_stopped(dir: &Path, action: &str) -> Result<(), Fail> {
    let rt = runtime()?;
    if ask_node(&rt, dir, &Request::Status)?.is_some() {
        return Err(fail(
            7,
            format!(
                "a node is running on this profile: stop it first (`coterie stop`), then {action}"
            ),
        ));
    }
    Ok(())
}

fn open(dir: &Path) -> Result<Store, Fail> {
    if !Store::exists(dir) {
        return Err(OpenStoreError::NoProfile(dir.to_path_buf()).into());
    }
    let pw = passphrase(false)?;
    Ok(Store::open(dir, &pw)?)
}

/// Runs `req` on the node if one runs, else `offline` on the store. A node
/// that is still starting (store locked, control socket not yet up) is
/// waited for, up to 20 seconds.
fn via_node_or_store<T: serde::de::DeserializeOwned>(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    req: &Request,
    offline: impl Fn(&Store) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut pw: Option<zeroize::Zeroizing<String>> = None;
    loop {
        if let Some(v) = ask_node(rt, dir, req)? {
            return from_value(v);
        }
        if !Store::exists(dir) {
            return Err(OpenStoreError::NoProfile(dir.to_path_buf()).into());
        }
        if pw.is_none() {
            pw = Some(passphrase(false)?);
        }
        let pass = pw.as_ref().map(|p| p.as_str()).unwrap_or_default();
        match Store::open(dir, pass) {
            Ok(s) => return offline(&s),
            Err(OpenStoreError::InUse(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

struct Out {
    json: bool,
}

impl Out {
    fn json<T: Serialize>(&self, v: &T) {
        println!("{}", serde_json::to_string(v).unwrap_or_default());
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Fail> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(1, format!("cannot start the runtime: {e}")))
}

/// Asks the running node; `Ok(None)` when no node runs.
fn ask_node(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    req: &Request,
) -> Result<Option<serde_json::Value>, Fail> {
    match rt.block_on(control::request(dir, req)) {
        Ok(Response { ok: true, data, .. }) => Ok(Some(data.unwrap_or(serde_json::Value::Null))),
        Ok(Response { error, code, .. }) => Err(fail(code, error.unwrap_or_default())),
        Err(ControlError::NotRunning) => Ok(None),
        Err(e) => Err(fail(
            7,
            format!(
                "{e}; if no node is running, remove {}",
                dir.join(control::SOCKET_NAME).display()
            ),
        )),
    }
}

fn from_value<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, Fail> {
    serde_json::from_value(v).map_err(|e| fail(1, format!("unexpected answer from the node: {e}")))
}

fn fmt_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (d, r) = (secs / 86400, secs % 86400);
    // Days since epoch to a civil date (Howard Hinnant's algorithm).
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        r / 3600,
        (r % 3600) / 60
    )
}

pub(crate) fn main() -> i32 {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("COTERIE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let out = Out { json: cli.json };
    let dir = cli.profile.clone().unwrap_or_else(default_profile);
    let result = match cli.cmd {
        Some(cmd) => run(cmd, &dir, &out),
        None => start(&dir, &out),
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            if out.json {
                out.json(&serde_json::json!({"ok": false, "error": f.msg, "code": f.code}));
            } else {
                eprintln!("coterie: {}", f.msg);
            }
            f.code
        }
    }
}

fn run(cmd: Cmd, dir: &Path, out: &Out) -> Result<(), Fail> {
    match cmd {
        Cmd::Init { name } => {
            if !valid_name(&name) {
                return Err(fail(
                    2,
                    "--name must be 1-64 characters without control characters, @, /, quotes, <, > or &",
                ));
            }
            if Store::exists(dir) {
                return Err(OpenStoreError::AlreadyExists(dir.to_path_buf()).into());
            }
            let pw = passphrase(true)?;
            if pw.chars().count() < 8 {
                return Err(fail(
                    2,
                    "the passphrase must have at least 8 characters (a few random words are best)",
                ));
            }
            let p = Profile {
                name,
                seed: rand::random(),
                created: ops::now_secs(),
                retention_days: store::DEFAULT_RETENTION_DAYS,
                last_addrs: vec![],
                bridge: None,
                settings: Default::default(),
            };
            let s = Store::create(dir, &pw, &p, KdfParams::recommended())?;
            let id = ops::id(&s)?;
            if out.json {
                out.json(&serde_json::json!({"ok": true, "profile": dir, "id": id}));
            } else {
                println!("Created profile in {}", dir.display());
                println!("Address:     {}", id.jid);
                println!("Fingerprint: {}", id.fingerprint);
            }
            Ok(())
        }
        Cmd::Id => {
            let rt = runtime()?;
            let id: ops::IdView = via_node_or_store(&rt, dir, &Request::Id, |s| Ok(ops::id(s)?))?;
            if out.json {
                out.json(&id);
            } else {
                println!("{}\nfingerprint: {}", id.jid, id.fingerprint);
            }
            Ok(())
        }
        Cmd::Invite { ttl } => {
            let rt = runtime()?;
            let uri: String = via_node_or_store(
                &rt,
                dir,
                &Request::Invite { ttl: ttl.clone() },
                |s| {
                    let addrs: Vec<PeerAddr> = s
                        .profile()
                        .map_err(OpError::from)?
                        .last_addrs
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .collect();
                    if addrs.is_empty() && !out.json {
                        eprintln!(
                            "note: no node has run on this profile yet, so the invite carries no address; start `coterie run` and make the invite then"
                        );
                    }
                    Ok(ops::invite(s, &ttl, &addrs, ops::now_secs())?)
                },
            )?;
            if out.json {
                out.json(&serde_json::json!({"invite": uri}));
            } else {
                println!("{uri}");
            }
            Ok(())
        }
        Cmd::Add { uri, name } => {
            let rt = runtime()?;
            let c: ops::ContactView = via_node_or_store(
                &rt,
                dir,
                &Request::Add {
                    uri: uri.clone(),
                    name: name.clone(),
                },
                |s| Ok(ops::add(s, &uri, name.as_deref(), ops::now_secs())?),
            )?;
            if out.json {
                out.json(&c);
            } else if c.bridged {
                println!(
                    "Added {} ({}), a friend on XMPP reached through the bridge.",
                    c.name, c.jid
                );
                println!(
                    "Their devices are trusted blindly until you compare fingerprints: `coterie fingerprints {}`.",
                    c.name
                );
            } else {
                println!(
                    "Added {} ({}). Fingerprint: {}",
                    c.name, c.state, c.fingerprint
                );
                println!("Compare the fingerprint with them over a channel you trust.");
            }
            Ok(())
        }
        Cmd::Contacts => {
            let rt = runtime()?;
            let list: Vec<ops::ContactView> =
                via_node_or_store(&rt, dir, &Request::Contacts, |s| {
                    let mut v = Vec::new();
                    for c in s.contacts().map_err(OpError::from)? {
                        v.push(ops::view(s, &c, None)?);
                    }
                    Ok(v)
                })?;
            for c in &list {
                if out.json {
                    out.json(c);
                } else {
                    let seen = c
                        .last_seen
                        .map(|t| format!(", last seen {}", fmt_time(t * 1000)))
                        .unwrap_or_default();
                    let via = c
                        .transport
                        .as_ref()
                        .map(|t| format!(" via {t}"))
                        .unwrap_or_default();
                    let key = if c.bridged {
                        format!("XMPP {} through the bridge", c.jid)
                    } else if c.cleartext {
                        format!(
                            "CLEARTEXT: classic XEP-0174 client {}, not encrypted",
                            c.jid
                        )
                    } else {
                        c.fingerprint.chars().take(19).collect()
                    };
                    println!(
                        "{:<20} {:<10}{via}{seen}  [{key}]  queued {}",
                        c.name, c.state, c.queued
                    );
                }
            }
            if list.is_empty() && !out.json {
                println!(
                    "No contacts yet: `coterie invite` makes a link to give someone; `coterie add LINK` uses theirs."
                );
            }
            Ok(())
        }
        Cmd::Send { contact, text } => {
            let rt = runtime()?;
            let m: ops::MessageView = via_node_or_store(
                &rt,
                dir,
                &Request::Send {
                    contact: contact.clone(),
                    text: text.clone(),
                },
                |s| Ok(ops::send(s, &contact, &text, ops::now_ms(), None)?.1),
            )?;
            if out.json {
                out.json(&m);
            } else {
                println!("{} (#{})", m.state, m.seq);
            }
            Ok(())
        }
        Cmd::History { contact, limit } => {
            let rt = runtime()?;
            let list: Vec<ops::MessageView> = via_node_or_store(
                &rt,
                dir,
                &Request::History {
                    contact: contact.clone(),
                    limit,
                },
                |s| Ok(ops::history(s, &contact, limit)?),
            )?;
            for m in &list {
                if out.json {
                    out.json(m);
                } else {
                    let arrow = if m.dir == "out" { "→" } else { "←" };
                    let body = match &m.undecryptable {
                        Some(why) => format!("[could not be decrypted: {why}]"),
                        None if m.unverified => format!("[unverified device] {}", m.body),
                        None if m.cleartext => format!("[cleartext] {}", m.body),
                        None => m.body.clone(),
                    };
                    println!("{} {arrow} {:<9} {body}", fmt_time(m.ts), m.state);
                }
            }
            Ok(())
        }
        Cmd::Bridge { cmd } => bridge(cmd, dir, out),
        Cmd::Group { cmd } => group(cmd, dir, out),
        Cmd::Status => {
            let rt = runtime()?;
            let status: control::StatusView = via_node_or_store(&rt, dir, &Request::Status, |s| {
                let mut queued = 0;
                let contacts = s.contacts().map_err(OpError::from)?;
                for c in &contacts {
                    queued += s.outbox_len(c.id).map_err(OpError::from)?;
                }
                Ok(control::StatusView {
                    running: false,
                    listening: vec![],
                    peers: vec![],
                    contacts: contacts.len(),
                    queued,
                    uptime_secs: 0,
                    stats: Default::default(),
                    cleartext_presence: None,
                    classic_peers: Vec::new(),
                    tor: None,
                    bridge: ops::bridge_status(s)?,
                })
            })?;
            match status {
                s if s.running => {
                    if out.json {
                        out.json(&s);
                    } else {
                        println!(
                            "node running for {}s; listening on {}",
                            s.uptime_secs,
                            s.listening.join(", ")
                        );
                        println!(
                            "{} contacts, {} connected, {} stanzas queued",
                            s.contacts,
                            s.peers.len(),
                            s.queued
                        );
                        for p in &s.peers {
                            println!("  {} via {} for {}s", p.name, p.transport, p.since_secs);
                        }
                        match &s.tor {
                            Some(t) => {
                                println!(
                                    "Tor: {}% {}; onion service: {} ({} may read it)",
                                    t.bootstrap_percent, t.phase, t.onion_service, t.authorized
                                );
                                if let Some(b) = &t.blocked {
                                    println!("  Tor is stuck: {b}");
                                }
                                if let Some(e) = &t.error {
                                    println!("  Tor problem: {e}");
                                }
                            }
                            None => println!("Tor: off"),
                        }
                        print_bridge(&s.bridge);
                        if let Some(name) = &s.cleartext_presence {
                            println!(
                                "DANGER: XEP-0174 compatibility mode on; announced in the clear as {name}"
                            );
                            for p in &s.classic_peers {
                                println!("  classic peer on the LAN (cleartext): {p}");
                            }
                        }
                    }
                }
                v => {
                    if out.json {
                        out.json(&v);
                    } else {
                        println!(
                            "no node running; {} contacts, {} stanzas queued (start one with `coterie run`)",
                            v.contacts, v.queued
                        );
                    }
                }
            }
            Ok(())
        }
        Cmd::Fingerprints { contact } => {
            let rt = runtime()?;
            let v: ops::FingerprintsView = via_node_or_store(
                &rt,
                dir,
                &Request::Fingerprints {
                    contact: contact.clone(),
                },
                |s| Ok(ops::fingerprints(s, &contact)?),
            )?;
            if out.json {
                out.json(&v);
            } else {
                println!("you (device {}): {}", v.own.device, v.own.fingerprint);
                if v.devices.is_empty() {
                    println!(
                        "{}: no devices seen yet (they appear once you connect)",
                        v.contact
                    );
                }
                for d in &v.devices {
                    println!(
                        "{} device {} [{}]: {}",
                        v.contact, d.device, d.trust, d.fingerprint
                    );
                }
            }
            Ok(())
        }
        Cmd::Remove { contact, yes } => {
            if !yes {
                eprint!(
                    "Remove {contact} and delete every message with them? Their node will be refused. Type `remove` to confirm: "
                );
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .map_err(|e| fail(2, e.to_string()))?;
                if line.trim() != "remove" {
                    return Err(fail(2, "not confirmed; nothing was removed"));
                }
            }
            let rt = runtime()?;
            let v: ops::RemovedView = via_node_or_store(
                &rt,
                dir,
                &Request::Remove {
                    contact: contact.clone(),
                },
                |s| Ok(ops::remove(s, &contact)?.1),
            )?;
            if out.json {
                out.json(&v);
            } else {
                println!("Removed {} and {} messages.", v.removed, v.messages);
            }
            Ok(())
        }
        Cmd::Verify { contact, device } => {
            let rt = runtime()?;
            let d: ops::DeviceView = via_node_or_store(
                &rt,
                dir,
                &Request::Verify {
                    contact: contact.clone(),
                    device,
                },
                |s| Ok(ops::verify(s, &contact, device)?),
            )?;
            if out.json {
                out.json(&d);
            } else {
                println!("device {} is {}: {}", d.device, d.trust, d.fingerprint);
            }
            Ok(())
        }
        Cmd::Retention { days } => {
            let rt = runtime()?;
            let v: u32 = via_node_or_store(&rt, dir, &Request::Retention { days }, |s| {
                Ok(ops::retention(s, days)?)
            })?;
            if out.json {
                out.json(&serde_json::json!({"retention_days": v}));
            } else if v == 0 {
                println!("messages are kept until you delete them");
            } else {
                println!(
                    "messages older than {v} days are deleted (queued ones are kept until delivered)"
                );
            }
            Ok(())
        }
        Cmd::Stop => {
            let rt = runtime()?;
            match ask_node(&rt, dir, &Request::Stop)? {
                Some(_) => {
                    if out.json {
                        out.json(&serde_json::json!({"ok": true}));
                    }
                    Ok(())
                }
                None => Err(fail(7, "no node is running on this profile")),
            }
        }
        Cmd::Run { args } => run_with(dir, args, false, out),
        Cmd::Serve { args } => run_with(dir, args, true, out),
        Cmd::Holding { cmd } => {
            let change = match cmd {
                None => ops::HoldChange::default(),
                Some(HoldingCmd::Use { state, hours }) => ops::HoldChange {
                    use_holders: Some(state),
                    ttl_hours: hours,
                    ..Default::default()
                },
                Some(HoldingCmd::Offer { state }) => ops::HoldChange {
                    offer: Some(state),
                    ..Default::default()
                },
            };
            let rt = runtime()?;
            let v: ops::HoldingView = via_node_or_store(
                &rt,
                dir,
                &Request::Holding {
                    change: change.clone(),
                },
                |s| Ok(ops::holding(s, &change)?),
            )?;
            if out.json {
                out.json(&v);
            } else {
                let on = |b: bool| if b { "on" } else { "off" };
                println!(
                    "leave messages with holders: {} (kept up to {} hours)",
                    on(v.use_holders),
                    v.ttl_hours
                );
                println!(
                    "hold for my contacts: {} ({} held now)",
                    on(v.offer),
                    v.held
                );
            }
            Ok(())
        }
        Cmd::Compact => {
            node_stopped(dir, "compact")?;
            let mut store = open(dir)?;
            let (before, after) = store.compact().map_err(ops::OpError::from)?;
            if out.json {
                out.json(&serde_json::json!({"before_bytes": before, "after_bytes": after}));
            } else {
                println!(
                    "profile compacted: {} KiB → {} KiB",
                    before.div_ceil(1024),
                    after.div_ceil(1024)
                );
            }
            Ok(())
        }
        Cmd::Wipe { yes } => {
            if !Store::exists(dir) {
                return Err(OpenStoreError::NoProfile(dir.to_path_buf()).into());
            }
            node_stopped(dir, "wipe")?;
            if !yes {
                eprint!(
                    "This destroys {} and every message and contact in it, irrecoverably. Type `wipe` to confirm: ",
                    dir.display()
                );
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .map_err(|e| fail(2, e.to_string()))?;
                if line.trim() != "wipe" {
                    return Err(fail(2, "not confirmed; nothing was deleted"));
                }
            }
            store::wipe(dir)
                .map_err(|e| fail(1, format!("wipe of {} failed: {e}", dir.display())))?;
            if out.json {
                out.json(&serde_json::json!({"ok": true, "wiped": dir}));
            } else {
                println!("Profile wiped.");
            }
            Ok(())
        }
    }
}

/// `coterie run` and `coterie serve`.
fn run_with(dir: &Path, args: RunArgs, serve: bool, out: &Out) -> Result<(), Fail> {
    let RunArgs {
        listen,
        advertise,
        lan,
        lan_period,
        danger_xep0174_compat,
        compat_port,
        tor_config,
        no_tor,
    } = args;
    if lan_period < 10 {
        return Err(fail(2, "--lan-period must be at least 10 seconds"));
    }
    let lan = lan.then_some(coterie_node::runtime::LanSettings {
        period_secs: lan_period,
    });
    let compat = danger_xep0174_compat.then_some(coterie_node::runtime::CompatSettings {
        port: compat_port,
        period_secs: lan_period,
    });
    if compat.is_some() {
        eprintln!(
            "DANGER: XEP-0174 compatibility mode. Your name is announced on the LAN in the clear, and chats with classic clients are NOT encrypted: anyone on the network can read them and pretend to be them. They are marked [cleartext]."
        );
    }
    let tor = (!no_tor).then(|| tor_settings(dir, tor_config));
    let launch = Launch {
        listen,
        advertise,
        lan,
        compat,
        tor,
        serve,
    };
    run_node(dir, launch, out)
}

/// `coterie` with no command: create the profile on first start, then run the node.
fn start(dir: &Path, out: &Out) -> Result<(), Fail> {
    if !Store::exists(dir) {
        let name = match std::env::var("COTERIE_NAME") {
            Ok(n) => n,
            Err(_) => {
                eprint!("No profile yet at {}. Your display name: ", dir.display());
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .map_err(|e| fail(2, e.to_string()))?;
                line.trim().to_string()
            }
        };
        run(Cmd::Init { name }, dir, out)?;
    }
    let tor = Some(tor_settings(dir, None));
    let launch = Launch {
        listen: Vec::new(),
        advertise: Vec::new(),
        lan: None,
        compat: None,
        tor,
        serve: false,
    };
    run_node(dir, launch, out)
}

/// arti keeps its state and cache inside the profile (one Tor identity,
/// guards included, per profile: profiles stay unlinkable).
fn tor_settings(dir: &Path, config_file: Option<PathBuf>) -> transport::onion::TorSettings {
    transport::onion::TorSettings {
        state_dir: dir.join("tor").join("state"),
        cache_dir: dir.join("tor").join("cache"),
        config_file,
    }
}

fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    transport::parse_socket_addr(s).ok_or_else(|| {
        format!(
            "`{s}` is not IP:PORT (e.g. 192.168.1.5:7474, or [fe80::1%wlan0]:7474 for an IPv6 link-local address on an existing interface)"
        )
    })
}

/// What a node is started with.
struct Launch {
    listen: Vec<SocketAddr>,
    advertise: Vec<String>,
    lan: Option<coterie_node::runtime::LanSettings>,
    compat: Option<coterie_node::runtime::CompatSettings>,
    tor: Option<transport::onion::TorSettings>,
    /// `coterie serve`: hold for contacts.
    serve: bool,
}

fn run_node(dir: &Path, launch: Launch, out: &Out) -> Result<(), Fail> {
    let Launch {
        mut listen,
        advertise,
        lan,
        compat,
        tor,
        serve,
    } = launch;
    if listen.is_empty() {
        listen.push(SocketAddr::from(([127, 0, 0, 1], 7474)));
    }
    let advertise: Vec<PeerAddr> = advertise
        .iter()
        .map(|a| {
            a.parse().map_err(|_| {
                fail(
                    2,
                    format!("--advertise `{a}` is not tcp:IP:PORT or quic:IP:PORT"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    if advertise.is_empty() && listen.iter().any(|a| a.ip().is_unspecified()) {
        return Err(fail(
            2,
            "listening on an unspecified address (0.0.0.0 or ::) needs --advertise with the address contacts should dial",
        ));
    }
    let store = open(dir)?;
    if serve {
        let change = ops::HoldChange {
            offer: Some(true),
            ..Default::default()
        };
        ops::holding(&store, &change)?;
        if !out.json {
            println!(
                "Serving: this node holds sealed messages between its contacts while they are offline (it sees whom they are for and their size, never their text) for up to {} days.",
                coterie_node::hold::MAX_TTL_SECS / 86_400
            );
        }
    }
    let rt = runtime()?;
    rt.block_on(async {
        let cfg = NodeConfig { listen, advertise, control_socket: true, lan, compat, tor, ..Default::default() };
        let mut node = Node::start(store, cfg).await.map_err(|e| {
            let code = match e {
                coterie_node::runtime::StartError::Bind { .. } => 8,
                coterie_node::runtime::StartError::Control { .. } => 7,
                coterie_node::runtime::StartError::Lan(_) => 8,
                coterie_node::runtime::StartError::Compat(_) => 8,
                coterie_node::runtime::StartError::Tor(transport::onion::TorError::Config { .. }) => 2,
                _ => 1,
            };
            fail(code, e.to_string())
        })?;
        let addrs: Vec<String> = node.advertised().iter().map(|a| a.to_string()).collect();
        if out.json {
            out.json(&serde_json::json!({"event": "started", "listening": addrs}));
        } else {
            println!("Coterie node running; contacts can reach it at {}. Ctrl-C stops it.", addrs.join(", "));
        }
        let signal = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        node.wait(signal).await;
        node.shutdown().await;
        if out.json {
            out.json(&serde_json::json!({"event": "stopped"}));
        }
        Ok(())
    })
}

fn via_node(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    req: &Request,
) -> Result<serde_json::Value, Fail> {
    if !Store::exists(dir) {
        return Err(OpenStoreError::NoProfile(dir.to_path_buf()).into());
    }
    ask_node(rt, dir, req)?.ok_or_else(|| {
        fail(
            7,
            "groups need the running node: start it with `coterie run` (or open the app)",
        )
    })
}

fn group(cmd: GroupCmd, dir: &Path, out: &Out) -> Result<(), Fail> {
    use coterie_node::runtime::groups::{GroupPostView, GroupView, MemberView};
    let rt = runtime()?;
    let print_group = |v: serde_json::Value| -> Result<(), Fail> {
        if out.json {
            out.json(&v);
            return Ok(());
        }
        let g: GroupView = from_value(v)?;
        let role = match (g.member, g.admin) {
            (false, _) => "you are no longer a member",
            (true, true) => "admin",
            (true, false) => "member",
        };
        println!(
            "{} ({} members; {role}) id {}",
            g.name,
            g.members,
            &g.id[..16]
        );
        Ok(())
    };
    match cmd {
        GroupCmd::Create { name } => {
            print_group(via_node(&rt, dir, &Request::GroupCreate { name })?)
        }
        GroupCmd::Invite {
            group,
            contact,
            admin,
        } => print_group(via_node(
            &rt,
            dir,
            &Request::GroupInvite {
                group,
                contact,
                admin,
            },
        )?),
        GroupCmd::Leave { group } => {
            print_group(via_node(&rt, dir, &Request::GroupLeave { group })?)
        }
        GroupCmd::Remove { group, member } => {
            print_group(via_node(&rt, dir, &Request::GroupRemove { group, member })?)
        }
        GroupCmd::Rename { group, name } => {
            print_group(via_node(&rt, dir, &Request::GroupRename { group, name })?)
        }
        GroupCmd::Link { group, ttl, uses } => {
            let v = via_node(&rt, dir, &Request::GroupLink { group, ttl, uses })?;
            if out.json {
                out.json(&serde_json::json!({ "uri": v }));
            } else {
                let uri: String = from_value(v)?;
                println!("{uri}");
                println!(
                    "Anyone with this link can join until it expires or is used up: share it only with the people in the room."
                );
            }
            Ok(())
        }
        GroupCmd::Join { uri } => {
            let v = via_node(&rt, dir, &Request::Add { uri, name: None })?;
            if out.json {
                out.json(&v);
            } else {
                let c: ops::ContactView = from_value(v)?;
                println!(
                    "Contacting {}; you join the group as soon as their node sees you (`coterie group list`).",
                    c.name
                );
            }
            Ok(())
        }
        GroupCmd::List => {
            let v = via_node(&rt, dir, &Request::GroupList)?;
            if out.json {
                out.json(&v);
                return Ok(());
            }
            let all: Vec<GroupView> = from_value(v)?;
            if all.is_empty() {
                println!("No groups yet: `coterie group create NAME`.");
            }
            for g in all {
                println!("{}  {} ({} members)", &g.id[..16], g.name, g.members);
            }
            Ok(())
        }
        GroupCmd::Members { group } => {
            let v = via_node(&rt, dir, &Request::GroupMembers { group })?;
            if out.json {
                out.json(&v);
                return Ok(());
            }
            let all: Vec<MemberView> = from_value(v)?;
            for m in all {
                let mut notes = Vec::new();
                if m.admin {
                    notes.push("admin");
                }
                if !m.me && !m.contact {
                    notes.push("not a contact: reached through other members");
                }
                if m.online {
                    notes.push("connected");
                }
                println!("{}  {}  {}", m.key, m.name, notes.join(", "));
            }
            Ok(())
        }
        GroupCmd::Send { group, text } => {
            let v = via_node(&rt, dir, &Request::GroupSend { group, text })?;
            if out.json {
                out.json(&v);
            } else {
                println!(
                    "Sent to the group's connected members; the others get it when they meet one of you."
                );
            }
            Ok(())
        }
        GroupCmd::History { group, limit } => {
            let v = via_node(&rt, dir, &Request::GroupHistory { group, limit })?;
            if out.json {
                out.json(&v);
                return Ok(());
            }
            let all: Vec<GroupPostView> = from_value(v)?;
            for p in all {
                if p.withdrawn {
                    println!(
                        "[{}] {}: (withdrawn: written after they left)",
                        fmt_time(p.at_ms),
                        p.from
                    );
                } else {
                    println!("[{}] {}: {}", fmt_time(p.at_ms), p.from, p.body);
                }
            }
            Ok(())
        }
    }
}

fn bridge_password() -> Result<String, Fail> {
    if let Ok(p) = std::env::var("COTERIE_BRIDGE_PASSWORD") {
        return Ok(p);
    }
    rpassword::prompt_password("Password of the XMPP account: ").map_err(|_| {
        fail(
            2,
            "no password: set COTERIE_BRIDGE_PASSWORD or run in a terminal",
        )
    })
}

fn bridge(cmd: BridgeCmd, dir: &Path, out: &Out) -> Result<(), Fail> {
    use coterie_node::bridge::{BridgeAccount, BridgeStatus};
    let rt = runtime()?;
    let status: BridgeStatus = match cmd {
        BridgeCmd::Set {
            jid,
            server,
            ca_file,
            danger_bridge_without_tor,
        } => {
            // Check what can be checked before asking for the password.
            coterie_node::bridge::parse_account_jid(&jid).map_err(|e| fail(2, e.to_string()))?;
            if let Some(s) = &server {
                coterie_node::bridge::parse_server(s).map_err(|e| fail(2, e.to_string()))?;
            }
            let ca_pem = match &ca_file {
                Some(f) => Some(std::fs::read_to_string(f).map_err(|e| {
                    fail(2, format!("cannot read the CA file {}: {e}", f.display()))
                })?),
                None => None,
            };
            let password = zeroize::Zeroizing::new(bridge_password()?);
            let account = BridgeAccount::new(
                &jid,
                password.to_string(),
                server.as_deref(),
                ca_pem,
                danger_bridge_without_tor,
            )
            .map_err(|e| fail(2, e.to_string()))?;
            let req = Request::BridgeSet {
                account: account.clone(),
            };
            via_node_or_store(&rt, dir, &req, |s| {
                ops::bridge_set(s, account.clone())?;
                Ok(ops::bridge_status(s)?)
            })?
        }
        BridgeCmd::Status => via_node_or_store(&rt, dir, &Request::BridgeStatus, |s| {
            Ok(ops::bridge_status(s)?)
        })?,
        BridgeCmd::Off => {
            let had: bool =
                via_node_or_store(&rt, dir, &Request::BridgeOff, |s| Ok(ops::bridge_off(s)?))?;
            if out.json {
                out.json(&serde_json::json!({"ok": true, "removed": had}));
            } else if had {
                println!("Bridge off: logged out; the account and its password are forgotten.");
            } else {
                println!("No bridge account was set.");
            }
            return Ok(());
        }
    };
    if out.json {
        out.json(&status);
    } else {
        print_bridge(&status);
    }
    Ok(())
}

fn print_bridge(b: &coterie_node::bridge::BridgeStatus) {
    use coterie_node::bridge::{BridgeState, Route};
    let Some(jid) = &b.jid else {
        println!("Bridge: off (`coterie bridge set you@example.org` reaches friends on XMPP)");
        return;
    };
    let route = match b.route {
        Some(Route::Direct) => "DIRECTLY, WITHOUT TOR: the server sees this device's IP address",
        _ => "through Tor",
    };
    let state = match b.state {
        BridgeState::Off => "off",
        BridgeState::Stopped => "set (starts with `coterie run`)",
        BridgeState::WaitingForTor => "waiting for Tor",
        BridgeState::Connecting => "connecting",
        BridgeState::Online => "online",
        BridgeState::Retrying => "retrying",
        BridgeState::Failed => "stopped on an error",
    };
    println!(
        "Bridge: {jid} via {} {route}: {state}",
        b.server.as_deref().unwrap_or("?")
    );
    if let Some(e) = &b.error {
        println!("  {e}");
    }
    if let Some(s) = b.retry_in {
        println!("  next attempt in {s}s");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn holding_takes_on_or_off() {
        let p = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        assert!(p(&["coterie", "holding", "use", "on", "--hours", "48"]).is_ok());
        assert!(p(&["coterie", "holding", "offer", "off"]).is_ok());
        let e = p(&["coterie", "holding", "use", "yes"]).expect_err("yes is not on/off");
        assert!(e.to_string().contains("say on or off"), "{e}");
        assert!(p(&["coterie", "serve", "--no-tor"]).is_ok());
    }
}
