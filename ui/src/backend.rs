//! The backend: a thread with its own tokio runtime that owns the store
//! and the node. The views send it [`Command`]s and never wait; it answers
//! with [`Action`]s and wakes the UI, so no frame ever blocks on the store,
//! the network or Tor.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use node::ops::{self, OpError};
use node::runtime::{Node, NodeConfig, NodeEvent};
use node::settings::Settings;
use node::store::crypto::KdfParams;
use node::store::{OpenStoreError, Profile, Store};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::state::{Action, PAGE, Status, TorLine};

/// The port the app's node listens on unless settings say otherwise.
pub const DEFAULT_PORT: u16 = 7474;

/// What the views ask for.
#[derive(Debug)]
pub enum Command {
    /// List the profiles in the base directory.
    ListProfiles,
    /// Create a profile and open it.
    Create {
        /// Directory name under the base directory.
        profile: String,
        /// Display name.
        name: String,
        /// Passphrase.
        passphrase: Zeroizing<String>,
    },
    /// Open a profile and start its node.
    Unlock {
        /// Directory name.
        profile: String,
        /// Passphrase.
        passphrase: Zeroizing<String>,
    },
    /// Reload the contact list.
    Contacts,
    /// Open a chat: its latest page.
    Open(u64),
    /// Load the page of `contact`'s chat before `before`.
    Older {
        /// Contact id.
        contact: u64,
        /// First seq loaded.
        before: u64,
    },
    /// Load one message (after a `Received` event for the open chat).
    Fetch {
        /// Contact id.
        contact: u64,
        /// Its seq.
        seq: u64,
    },
    /// Send a message.
    Send {
        /// Contact id.
        contact: u64,
        /// The text.
        text: String,
    },
    /// Make an invite.
    Invite,
    /// Reload the group list.
    Groups,
    /// Open a group chat (or reload the open one).
    OpenGroup {
        /// Group id (hex).
        id: String,
        /// A reload, not the user opening it.
        refresh: bool,
    },
    /// Create a group.
    CreateGroup(String),
    /// Write to a group.
    SendGroup {
        /// Group id (hex).
        id: String,
        /// The text.
        text: String,
    },
    /// Make a group link (admins).
    GroupLink(String),
    /// Leave a group.
    LeaveGroup(String),
    /// Add a contact from an invite link.
    Add {
        /// The link.
        link: String,
        /// A name for them (else the one in the invite).
        name: Option<String>,
    },
    /// Show a contact's fingerprints.
    Fingerprints(u64),
    /// Mark a device verified.
    Verify {
        /// Contact id.
        contact: u64,
        /// Device id.
        device: u32,
    },
    /// Store settings.
    Save {
        /// Settings.
        settings: Settings,
        /// Retention days (0: forever).
        retention: u32,
    },
    /// Log the bridge into an XMPP account (replacing any).
    BridgeSet {
        /// The account, user@example.org.
        jid: String,
        /// Its password.
        password: Zeroizing<String>,
        /// HOST:PORT, or empty for the domain on 5222.
        server: String,
        /// A PEM file with the server's CA, or empty for the system's.
        ca_file: String,
        /// Connect without Tor (dangerous).
        direct: bool,
    },
    /// Log the bridge out and forget its account.
    BridgeOff,
    /// Stop the node and delete the open profile.
    Wipe,
    /// Stop the node and close the profile (back to the profile list).
    Lock,
}

/// How the backend runs.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Where profiles live, one directory each.
    pub base: PathBuf,
    /// Key derivation cost for new profiles (each gets its own salt).
    pub kdf: KdfParams,
    /// Never start Tor, whatever the profile's settings say (tests, and
    /// `coterie-app --no-tor`).
    pub no_tor: bool,
    /// Never start LAN discovery or the XEP-0174 mode (tests).
    pub no_lan: bool,
    /// Listen here instead of the profile's setting (tests).
    pub listen: Option<SocketAddr>,
}

impl BackendConfig {
    /// Profiles under `$XDG_DATA_HOME/coterie` (as the `coterie` command).
    pub fn default_base() -> PathBuf {
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("coterie")
    }
}

/// The handle the views hold.
#[derive(Debug)]
pub struct Backend {
    tx: mpsc::UnboundedSender<Command>,
    rx: std::sync::mpsc::Receiver<Action>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Wake = Arc<dyn Fn() + Send + Sync>;

impl Backend {
    /// Starts the backend thread. `wake` is called after every answer
    /// (the app passes `egui::Context::request_repaint`).
    pub fn start(cfg: BackendConfig, wake: impl Fn() + Send + Sync + 'static) -> Backend {
        let (tx, cmd_rx) = mpsc::unbounded_channel();
        let (out_tx, rx) = std::sync::mpsc::channel();
        let wake: Wake = Arc::new(wake);
        let thread = std::thread::Builder::new()
            .name("coterie-backend".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = out_tx.send(Action::Failed(format!(
                            "cannot start the background worker: {e}"
                        )));
                        wake();
                        return;
                    }
                };
                let out = Out { tx: out_tx, wake };
                rt.block_on(run(cfg, cmd_rx, out));
            })
            .ok();
        Backend { tx, rx, thread }
    }

    /// Asks for something; the answer comes through [`Backend::drain`].
    pub fn send(&self, c: Command) {
        let _ = self.tx.send(c);
    }

    /// The answers so far.
    pub fn drain(&self) -> Vec<Action> {
        self.rx.try_iter().collect()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Closing the channel makes the backend stop its node and return.
        let (tx, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Out {
    tx: std::sync::mpsc::Sender<Action>,
    wake: Wake,
}

impl Out {
    fn send(&self, a: Action) {
        let _ = self.tx.send(a);
        (self.wake)();
    }
}

struct Open {
    node: Node,
    dir: PathBuf,
    lan: bool,
    events: tokio::sync::broadcast::Receiver<NodeEvent>,
}

async fn run(cfg: BackendConfig, mut rx: mpsc::UnboundedReceiver<Command>, out: Out) {
    let mut open: Option<Open> = None;
    let mut last_status = Status::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                handle(&cfg, &mut open, cmd, &out).await;
            }
            ev = async {
                match open.as_mut() {
                    Some(o) => o.events.recv().await,
                    None => std::future::pending().await,
                }
            } => match ev {
                Ok(ev) => {
                    let reload = matches!(ev, NodeEvent::Connection { .. });
                    let group = matches!(ev, NodeEvent::GroupPosts { .. });
                    out.send(Action::Node(ev));
                    if reload && let Some(o) = &open {
                        contacts(o, &out).await;
                    }
                    if group && let Some(o) = &open {
                        groups(o, &out).await;
                    }
                }
                // Missed events: the store is the truth, reload from it.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if let Some(o) = &open {
                        contacts(o, &out).await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
            },
            _ = tick.tick(), if open.is_some() => {
                // Only a change wakes the UI: an idle app stays idle.
                if let Some(o) = &open {
                    let s = status(o, &cfg);
                    if s != last_status {
                        last_status = s.clone();
                        out.send(Action::Status(s));
                    }
                }
            }
        }
    }
    if let Some(o) = open.take() {
        o.node.shutdown().await;
    }
}

fn status(o: &Open, cfg: &BackendConfig) -> Status {
    let v = o.node.status();
    let _ = cfg;
    Status {
        tor: v.tor.map(|t| TorLine {
            percent: t.bootstrap_percent,
            phase: t.phase,
            service: t.onion_service,
            problem: t.error.or(t.blocked),
        }),
        bridge: crate::state::BridgeLine::of(&v.bridge),
        lan: o.lan,
        listening: v.listening,
        sessions: v.peers.len(),
    }
}

/// Profile directory names under `base`, sorted.
pub fn list_profiles(base: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| Store::exists(&e.path()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Whether `name` can be a profile directory.
pub fn valid_profile_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '_' || c == '.')
}

fn open_error(e: OpenStoreError) -> String {
    match e {
        OpenStoreError::WrongPassphrase(_) => {
            "Wrong passphrase. Try again: it cannot be recovered or reset.".into()
        }
        OpenStoreError::InUse(_) => {
            "This profile is open elsewhere (another Coterie window or `coterie run`). Close that first.".into()
        }
        OpenStoreError::AlreadyExists(_) => {
            "A profile with that name exists already: pick another name.".into()
        }
        e => e.to_string(),
    }
}

fn op_error(e: OpError) -> String {
    e.to_string()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("internal error: {e}"))
}

async fn handle(cfg: &BackendConfig, open: &mut Option<Open>, cmd: Command, out: &Out) {
    match cmd {
        Command::ListProfiles => {
            let base = cfg.base.clone();
            if let Ok(p) = blocking(move || list_profiles(&base)).await {
                out.send(Action::ProfilesListed(p));
            }
        }
        Command::Create {
            profile,
            name,
            passphrase,
        } => {
            if !valid_profile_name(&profile) {
                out.send(Action::OpenFailed(
                    "The profile name may have letters, digits, '-', '_' and '.' (at most 64)."
                        .into(),
                ));
                return;
            }
            if !node::invite::valid_name(&name) {
                out.send(Action::OpenFailed(
                    "Your name must be 1-64 characters without @, /, quotes, <, > or &.".into(),
                ));
                return;
            }
            if passphrase.chars().count() < 8 {
                out.send(Action::OpenFailed(
                    "The passphrase must have at least 8 characters (a few random words are best)."
                        .into(),
                ));
                return;
            }
            out.send(Action::Working("Creating your profile…".into()));
            let dir = cfg.base.join(&profile);
            // The configured cost, with a fresh salt for every profile.
            let mut kdf = cfg.kdf.clone();
            kdf.salt = KdfParams::recommended().salt;
            let made = blocking(move || {
                let p = Profile {
                    name,
                    seed: rand::random(),
                    created: ops::now_secs(),
                    retention_days: node::store::DEFAULT_RETENTION_DAYS,
                    last_addrs: vec![],
                    bridge: None,
                    settings: Settings::default(),
                };
                Store::create(&dir, &passphrase, &p, kdf)
            })
            .await;
            match made {
                Ok(Ok(store)) => start(cfg, open, profile, store, out).await,
                Ok(Err(e)) => out.send(Action::OpenFailed(open_error(e))),
                Err(e) => out.send(Action::OpenFailed(e)),
            }
        }
        Command::Unlock {
            profile,
            passphrase,
        } => {
            out.send(Action::Working("Unlocking…".into()));
            let dir = cfg.base.join(&profile);
            match blocking(move || Store::open(&dir, &passphrase)).await {
                Ok(Ok(store)) => start(cfg, open, profile, store, out).await,
                Ok(Err(e)) => out.send(Action::OpenFailed(open_error(e))),
                Err(e) => out.send(Action::OpenFailed(e)),
            }
        }
        Command::Wipe => {
            let Some(o) = open.take() else { return };
            out.send(Action::Working("Wiping the profile…".into()));
            let dir = o.dir.clone();
            o.node.shutdown().await;
            match blocking(move || node::store::wipe(&dir)).await {
                Ok(Ok(())) => out.send(Action::Wiped),
                Ok(Err(e)) => out.send(Action::Failed(format!(
                    "The wipe failed: {e}. Delete {} by hand.",
                    o.dir.display()
                ))),
                Err(e) => out.send(Action::Failed(e)),
            }
        }
        Command::Lock => {
            if let Some(o) = open.take() {
                out.send(Action::Working("Closing the profile…".into()));
                o.node.shutdown().await;
            }
            let base = cfg.base.clone();
            let profiles = blocking(move || list_profiles(&base))
                .await
                .unwrap_or_default();
            out.send(Action::Locked(profiles));
        }
        other => {
            let Some(o) = open.as_ref() else {
                out.send(Action::Failed("No profile is open.".into()));
                return;
            };
            if let Err(e) = on_node(o, other, out).await {
                out.send(Action::Failed(e));
            }
        }
    }
}

async fn on_node(o: &Open, cmd: Command, out: &Out) -> Result<(), String> {
    let store = o.node.store().clone();
    match cmd {
        Command::Contacts => contacts(o, out).await,
        Command::Open(contact) => {
            let page = blocking(move || ops::page(&store, contact, None, PAGE))
                .await?
                .map_err(op_error)?;
            out.send(Action::ChatOpened { contact, page });
        }
        Command::Older { contact, before } => {
            let page = blocking(move || ops::page(&store, contact, Some(before), PAGE))
                .await?
                .map_err(op_error)?;
            out.send(Action::OlderLoaded { contact, page });
        }
        Command::Fetch { contact, seq } => {
            let page = blocking(move || ops::page(&store, contact, Some(seq + 1), 1))
                .await?
                .map_err(op_error)?;
            if let Some(message) = page.into_iter().find(|m| m.seq == seq) {
                out.send(Action::Arrived { contact, message });
            }
        }
        Command::Send { contact, text } => {
            if text.trim().is_empty() {
                return Ok(());
            }
            let sel = fingerprint_of(o, contact).await?;
            let message = o.node.send(&sel, &text).await.map_err(op_error)?;
            out.send(Action::Sent { contact, message });
        }
        Command::Invite => {
            let link = o.node.invite("7d").await.map_err(op_error)?;
            out.send(Action::Invited(link));
        }
        Command::Groups => groups(o, out).await,
        Command::OpenGroup { id, refresh } => open_group(o, out, id, refresh).await?,
        Command::CreateGroup(name) => {
            let g = o.node.group_create(name.trim()).await.map_err(op_error)?;
            let id = g.id.clone();
            out.send(Action::GroupCreated(g));
            open_group(o, out, id, false).await?;
        }
        Command::SendGroup { id, text } => {
            if text.trim().is_empty() {
                return Ok(());
            }
            o.node.group_send(&id, &text).await.map_err(op_error)?;
            open_group(o, out, id, true).await?;
        }
        Command::GroupLink(id) => {
            let uri = o.node.group_link(&id, "2h", 50).await.map_err(op_error)?;
            out.send(Action::GroupLinked(uri));
        }
        Command::LeaveGroup(id) => {
            o.node.group_leave(&id).await.map_err(op_error)?;
            groups(o, out).await;
            out.send(Action::Info("You left the group.".into()));
        }
        Command::Add { link, name } => {
            let v = o
                .node
                .add(
                    link.trim(),
                    name.as_deref().filter(|n| !n.trim().is_empty()),
                )
                .await
                .map_err(op_error)?;
            out.send(Action::Added(v.name));
            contacts(o, out).await;
        }
        Command::Fingerprints(contact) => {
            let sel = fingerprint_of(o, contact).await?;
            let f = blocking(move || ops::fingerprints(&store, &sel))
                .await?
                .map_err(op_error)?;
            out.send(Action::Fingerprints(contact, f));
        }
        Command::Verify { contact, device } => {
            let sel = fingerprint_of(o, contact).await?;
            let d = blocking(move || ops::verify(&store, &sel, device))
                .await?
                .map_err(op_error)?;
            out.send(Action::Verified(contact, d));
        }
        Command::Save {
            settings,
            retention,
        } => {
            for l in &settings.listen {
                if transport::parse_socket_addr(l).is_none() {
                    return Err(format!(
                        "“{l}” is not an address to listen on: write IP:PORT, e.g. 192.168.1.20:7474."
                    ));
                }
            }
            if let Some(f) = &settings.tor_config
                && !Path::new(f).is_file()
            {
                return Err(format!(
                    "There is no file at “{f}”: give the path of an arti configuration (TOML) file, or leave it empty."
                ));
            }
            let s2 = settings.clone();
            let (old, retention) = blocking(move || -> Result<(Settings, u32), OpError> {
                let retention = ops::retention(&store, Some(retention))?;
                let mut p = store.profile()?;
                let old = std::mem::replace(&mut p.settings, s2);
                store.set_profile(&p)?;
                Ok((old, retention))
            })
            .await?
            .map_err(op_error)?;
            // Holding applies at once (the node reads it every second).
            let restart_needed = Settings {
                hold: old.hold,
                ..settings.clone()
            } != old;
            out.send(Action::SettingsSaved {
                restart_needed,
                settings,
                retention,
            });
        }
        Command::BridgeSet {
            jid,
            password,
            server,
            ca_file,
            direct,
        } => {
            let ca_file = ca_file.trim();
            let ca_pem = if ca_file.is_empty() {
                None
            } else {
                Some(std::fs::read_to_string(ca_file).map_err(|e| {
                    format!(
                        "Cannot read “{ca_file}” ({e}): give the path of the server's CA certificate (PEM), or leave it empty."
                    )
                })?)
            };
            let server = Some(server.trim()).filter(|s| !s.is_empty());
            let acct = node::bridge::BridgeAccount::new(
                jid.trim(),
                password.to_string(),
                server,
                ca_pem,
                direct,
            )
            .map_err(|e| format!("{}.", capitalised(&e.to_string())))?;
            o.node.bridge_set(acct).await.map_err(op_error)?;
            out.send(Action::Info(
                "Bridge set: connecting. Add friends on XMPP with their address (xmpp:friend@example.org) under Add contact."
                    .into(),
            ));
        }
        Command::BridgeOff => {
            let had = o.node.bridge_off().await.map_err(op_error)?;
            out.send(Action::Info(if had {
                "Bridge off: logged out; the account and its password are forgotten.".into()
            } else {
                "No bridge account was set.".into()
            }));
        }
        Command::ListProfiles
        | Command::Create { .. }
        | Command::Unlock { .. }
        | Command::Wipe
        | Command::Lock => {}
    }
    Ok(())
}

/// A selector `ops` resolves to exactly this contact.
async fn fingerprint_of(o: &Open, contact: u64) -> Result<String, String> {
    let store = o.node.store().clone();
    blocking(move || store.contact(contact))
        .await?
        .map_err(|e| e.to_string())?
        .and_then(|c| transport::PeerId::from_bytes(c.peer).ok())
        .map(|p| p.fingerprint_compact())
        .ok_or_else(|| "That contact no longer exists.".to_string())
}

/// Loads a group's latest posts and members for its chat.
async fn open_group(o: &Open, out: &Out, id: String, refresh: bool) -> Result<(), String> {
    let posts = o
        .node
        .group_history(&id, crate::state::PAGE)
        .await
        .map_err(op_error)?;
    let members = o.node.group_members(&id).await.map_err(op_error)?;
    out.send(Action::GroupOpened {
        id,
        posts,
        members,
        refresh,
    });
    Ok(())
}

async fn groups(o: &Open, out: &Out) {
    match o.node.groups().await {
        Ok(list) => out.send(Action::GroupsLoaded(list)),
        Err(e) => out.send(Action::Failed(op_error(e))),
    }
}

async fn contacts(o: &Open, out: &Out) {
    match o.node.contacts().await {
        Ok(list) => out.send(Action::ContactsLoaded(list)),
        Err(e) => out.send(Action::Failed(op_error(e))),
    }
}

fn node_config(cfg: &BackendConfig, dir: &Path, s: &Settings) -> Result<NodeConfig, String> {
    let mut listen = Vec::new();
    if let Some(a) = cfg.listen {
        listen.push(a);
    } else {
        for l in &s.listen {
            listen.push(transport::parse_socket_addr(l).ok_or_else(|| {
                format!("The listen address “{l}” in settings is not IP:PORT; fix it in Settings.")
            })?);
        }
        if listen.is_empty() {
            // The usual port, unless another node (a `coterie run`, another
            // profile's window) has it: then any free one.
            let usual = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT));
            let free = std::net::TcpListener::bind(usual).is_ok();
            listen.push(if free {
                usual
            } else {
                SocketAddr::from(([127, 0, 0, 1], 0))
            });
        }
    }
    let tor = (s.tor && !cfg.no_tor).then(|| transport::onion::TorSettings {
        state_dir: dir.join("tor").join("state"),
        cache_dir: dir.join("tor").join("cache"),
        config_file: s.tor_config.as_ref().map(PathBuf::from),
    });
    let lan = (s.lan && !cfg.no_lan).then(node::runtime::LanSettings::default);
    let compat = (s.compat && !cfg.no_lan).then(node::runtime::CompatSettings::default);
    Ok(NodeConfig {
        listen,
        lan,
        compat,
        tor,
        control_socket: true,
        ..Default::default()
    })
}

async fn start(
    cfg: &BackendConfig,
    open: &mut Option<Open>,
    profile: String,
    store: Store,
    out: &Out,
) {
    if let Some(o) = open.take() {
        o.node.shutdown().await;
    }
    out.send(Action::Working("Starting your node…".into()));
    let dir = cfg.base.join(&profile);
    let store2 = Arc::new(store);
    let facts = {
        let s = store2.clone();
        blocking(move || -> Result<_, OpError> {
            let p = s.profile()?;
            Ok((ops::id(&s)?, p.settings, p.retention_days))
        })
        .await
    };
    let (me, settings, retention) = match facts {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return out.send(Action::OpenFailed(op_error(e))),
        Err(e) => return out.send(Action::OpenFailed(e)),
    };
    let ncfg = match node_config(cfg, &dir, &settings) {
        Ok(c) => c,
        Err(e) => return out.send(Action::OpenFailed(e)),
    };
    let Ok(store) = Arc::try_unwrap(store2) else {
        return out.send(Action::OpenFailed(
            "internal error: store still shared".into(),
        ));
    };
    let lan = ncfg.lan.is_some();
    match Node::start(store, ncfg).await {
        Ok(node) => {
            let events = node.subscribe();
            let o = Open {
                node,
                dir,
                lan,
                events,
            };
            out.send(Action::Unlocked {
                profile,
                me,
                settings,
                retention,
            });
            contacts(&o, out).await;
            groups(&o, out).await;
            *open = Some(o);
        }
        Err(e) => out.send(Action::OpenFailed(format!(
            "Your node could not start: {e}"
        ))),
    }
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}
