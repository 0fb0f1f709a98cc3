//! The bridge to ordinary XMPP: the node logs into one XMPP account on a
//! server (tokio-xmpp over rustls) so the user can reach friends on
//! Conversations, Dino or Gajim.
//!
//! The server learns as little as the protocol allows. The bridge connects
//! through Tor unless the user set it up with `--danger-bridge-without-tor`,
//! and never falls back: a Tor failure waits for Tor, a certificate error
//! stops the bridge until the user acts. It binds a random resource on
//! every connection, never fetches or writes a roster, bookmarks, a vCard,
//! an avatar or private XML, sends no entity capabilities and answers
//! software-version and disco queries without naming Coterie.
//!
//! This module holds what the store keeps ([`BridgeAccount`]), what the
//! user sees ([`BridgeStatus`]) and the errors in words a person can act on
//! ([`BridgeError`]). [`connect`] logs in; [`session`] keeps the account
//! online.

pub mod connect;
pub mod relay;
pub mod session;

use serde::{Deserialize, Serialize};

/// The XMPP client port used when the account has no `--server`: Tor
/// cannot look up SRV records, so the bridge does not either.
pub const DEFAULT_PORT: u16 = 5222;

/// The account the bridge logs into. Kept, sealed, in the profile record.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeAccount {
    /// The account's bare JID, `user@example.org`.
    pub jid: String,
    /// Its password.
    pub password: String,
    /// `host:port` to connect to instead of the JID's domain on 5222.
    pub server: Option<String>,
    /// PEM certificates to trust instead of the system's roots (a private
    /// CA or a self-hosted server). The contents, not a path: the file may
    /// move.
    pub ca_pem: Option<String>,
    /// **Dangerous**: connect without Tor; the server and everyone on the
    /// path see the device's IP address.
    pub direct: bool,
    /// Seed of the account's OMEMO identity: its own, never the node's
    /// (whose public key is the onion address).
    #[serde(default = "rand::random")]
    pub omemo_seed: [u8; 32],
}

impl std::fmt::Debug for BridgeAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeAccount")
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

/// Why an account cannot be set up as given (the user's input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// Not a bare JID with a user part.
    #[error("{0:?} is not an XMPP address: give it as user@example.org")]
    Jid(String),
    /// `--server` is not `host:port`.
    #[error("--server {0:?} must be HOST:PORT, for example xmpp.example.org:5222")]
    Server(String),
    /// The CA file holds no certificate.
    #[error("the CA file holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    Ca,
    /// An empty password.
    #[error("the password is empty: set COTERIE_BRIDGE_PASSWORD or type it when asked")]
    Password,
}

impl BridgeAccount {
    /// Checks and normalises what the user typed.
    pub fn new(
        jid: &str,
        password: String,
        server: Option<&str>,
        ca_pem: Option<String>,
        direct: bool,
    ) -> Result<BridgeAccount, AccountError> {
        let jid = parse_account_jid(jid)?;
        if password.is_empty() {
            return Err(AccountError::Password);
        }
        if let Some(s) = server {
            parse_server(s)?;
        }
        if let Some(pem) = &ca_pem
            && connect::parse_ca(pem).map(|c| c.is_empty()).unwrap_or(true)
        {
            return Err(AccountError::Ca);
        }
        Ok(BridgeAccount {
            jid: jid.to_string(),
            password,
            server: server.map(str::to_owned),
            ca_pem,
            direct,
            omemo_seed: rand::random(),
        })
    }

    /// The bare JID.
    pub fn bare(&self) -> Result<jid::BareJid, AccountError> {
        parse_account_jid(&self.jid)
    }

    /// Where to connect: `--server`, else the domain on [`DEFAULT_PORT`].
    pub fn endpoint(&self) -> Result<(String, u16), AccountError> {
        match &self.server {
            Some(s) => parse_server(s),
            None => Ok((self.bare()?.domain().to_string(), DEFAULT_PORT)),
        }
    }
}

/// A bare JID with a localpart (an account, not a server).
pub fn parse_account_jid(s: &str) -> Result<jid::BareJid, AccountError> {
    let s = s.trim();
    let s = s.strip_prefix("xmpp:").unwrap_or(s);
    match jid::BareJid::new(s) {
        Ok(j) if j.node().is_some() => Ok(j),
        _ => Err(AccountError::Jid(s.to_owned())),
    }
}

/// `host:port`, `[v6]:port`.
pub fn parse_server(s: &str) -> Result<(String, u16), AccountError> {
    let bad = || AccountError::Server(s.to_owned());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// A random resource for one connection: 16 base32 letters, the same
/// shape every time, naming nothing.
pub fn random_resource() -> String {
    let bytes: [u8; 10] = rand::random();
    data_encoding::BASE32_NOPAD
        .encode(&bytes)
        .to_ascii_lowercase()
}

/// How the bridge reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Through a Tor exit (the default).
    Tor,
    /// Straight from this device: the server sees its IP address.
    Direct,
}

/// What the bridge is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgeState {
    /// No account set.
    Off,
    /// Set, but no node runs (the CLI read the store).
    Stopped,
    /// Waiting for Tor to bootstrap.
    WaitingForTor,
    /// Connecting, logging in.
    Connecting,
    /// Logged in and available.
    Online,
    /// Lost the connection; retrying after a pause.
    Retrying,
    /// Stopped on an error only the user can fix (password, certificate,
    /// no TLS, Tor switched off). `bridge set` starts it again.
    Failed,
}

/// What `coterie bridge status` and the app show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeStatus {
    /// The state.
    pub state: BridgeState,
    /// The account, when set.
    pub jid: Option<String>,
    /// Where it connects (`host:port`), when set.
    pub server: Option<String>,
    /// How, when set.
    pub route: Option<Route>,
    /// The last error, in words a person can act on.
    pub error: Option<String>,
    /// Seconds until the next attempt, while retrying.
    pub retry_in: Option<u64>,
    /// Connections made since the node started.
    pub connections: u64,
    /// What holds up the chats, if anything (a friend without OMEMO keys,
    /// keys that could not be published, …).
    #[serde(default)]
    pub note: Option<String>,
    /// Messages from addresses that are not bridged contacts: not stored
    /// (add the sender with `coterie add xmpp:THEM` to read them).
    #[serde(default)]
    pub ignored: u64,
    /// Our OMEMO device list and bundle are on the account's PEP (this
    /// session).
    #[serde(default)]
    pub published: bool,
}

impl BridgeStatus {
    /// The status of an account no node runs (or of none).
    pub fn offline(acct: Option<&BridgeAccount>) -> BridgeStatus {
        BridgeStatus {
            state: if acct.is_some() {
                BridgeState::Stopped
            } else {
                BridgeState::Off
            },
            jid: acct.map(|a| a.jid.clone()),
            server: acct.and_then(|a| a.endpoint().ok().map(|(h, p)| format!("{h}:{p}"))),
            route: acct.map(|a| if a.direct { Route::Direct } else { Route::Tor }),
            error: None,
            retry_in: None,
            connections: 0,
            note: None,
            ignored: 0,
            published: false,
        }
    }
}

/// Why the bridge is not online, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    /// The node runs without Tor and the account goes through Tor.
    #[error(
        "Tor is off for this node, and the bridge only connects through Tor: start the node with Tor, or set the bridge again with --danger-bridge-without-tor"
    )]
    TorOff,
    /// Tor could not open a stream to the server.
    #[error(
        "Tor could not reach the server ({0}); retrying through Tor (the bridge never connects directly)"
    )]
    Tor(String),
    /// A direct connection failed.
    #[error("cannot reach the server: {0}; retrying")]
    Unreachable(String),
    /// The server's certificate is not valid for the account's domain.
    #[error(
        "the server's certificate is not valid for {domain} ({reason}); nothing was sent and the bridge stopped. If the server uses its own CA, set the bridge again with --ca-file"
    )]
    Certificate {
        /// The domain it had to be valid for.
        domain: String,
        /// rustls' words.
        reason: String,
    },
    /// The server does not offer STARTTLS.
    #[error(
        "the server does not offer TLS (STARTTLS); the bridge never logs in without it and stopped"
    )]
    NoTls,
    /// The server refused the login.
    #[error(
        "the server refused the login ({0}); the bridge stopped: check the address and set the password again with `coterie bridge set`"
    )]
    Auth(String),
    /// The server ended the stream with an error.
    #[error("the server closed the stream: {0}; retrying")]
    Stream(String),
    /// The server broke the protocol.
    #[error("the server broke the XMPP protocol ({0}); retrying")]
    Protocol(String),
    /// The account in the store is unusable.
    #[error(transparent)]
    Account(#[from] AccountError),
}

impl BridgeError {
    /// An error only the user can fix: no retry until `bridge set`.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            BridgeError::TorOff
                | BridgeError::Certificate { .. }
                | BridgeError::NoTls
                | BridgeError::Auth(_)
                | BridgeError::Account(_)
        )
    }
}

/// The pause before attempt `n` (0-based): 1 s doubling to 64 s, each
/// drawn uniformly from its upper half so that many nodes do not retry in
/// step.
pub fn backoff(n: u32, rng: &mut impl rand::Rng) -> std::time::Duration {
    let cap_ms = 1000u64 << n.min(6);
    std::time::Duration::from_millis(rng.gen_range(cap_ms / 2..=cap_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_jids_need_a_user_part() {
        assert_eq!(
            parse_account_jid(" xmpp:Alice@Example.org ")
                .map(|j| j.to_string())
                .ok(),
            Some("alice@example.org".to_owned())
        );
        for bad in ["example.org", "", "@example.org", "a@", "a@b/c d e\u{0}"] {
            assert!(parse_account_jid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn servers_are_host_and_port() {
        assert_eq!(
            parse_server("127.0.0.1:5222").ok(),
            Some(("127.0.0.1".to_owned(), 5222))
        );
        assert_eq!(
            parse_server("[::1]:5223").ok(),
            Some(("::1".to_owned(), 5223))
        );
        for bad in [
            "example.org",
            "example.org:",
            ":5222",
            "h:0",
            "h:70000",
            "a b:1",
        ] {
            assert!(parse_server(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_endpoint_defaults_to_the_domain_on_5222() {
        let a =
            BridgeAccount::new("me@example.org", "pw".into(), None, None, false).expect("account");
        assert_eq!(a.endpoint().ok(), Some(("example.org".to_owned(), 5222)));
        let a = BridgeAccount::new(
            "me@example.org",
            "pw".into(),
            Some("xmpp.example.net:443"),
            None,
            false,
        )
        .expect("account");
        assert_eq!(
            a.endpoint().ok(),
            Some(("xmpp.example.net".to_owned(), 443))
        );
    }

    #[test]
    fn bad_input_says_what_to_do() {
        let e = BridgeAccount::new("me@example.org", String::new(), None, None, false);
        assert_eq!(e, Err(AccountError::Password));
        let e = BridgeAccount::new(
            "me@example.org",
            "pw".into(),
            None,
            Some("not a certificate".into()),
            false,
        );
        assert_eq!(e, Err(AccountError::Ca));
        assert!(
            AccountError::Jid("x".into())
                .to_string()
                .contains("user@example.org")
        );
    }

    #[test]
    fn the_debug_form_hides_the_account() {
        let a = BridgeAccount::new(
            "secret-user@example.org",
            "hunter22".into(),
            None,
            None,
            true,
        )
        .expect("account");
        let d = format!("{a:?}");
        assert!(!d.contains("secret-user") && !d.contains("hunter22"), "{d}");
    }

    #[test]
    fn resources_are_random_and_name_nothing() {
        let a = random_resource();
        let b = random_resource();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert!(!a.contains("coterie"));
    }

    #[test]
    fn backoff_doubles_to_a_minute_with_jitter() {
        let mut rng = rand::thread_rng();
        for n in 0..20 {
            let d = backoff(n, &mut rng).as_millis() as u64;
            let cap = 1000u64 << n.min(6);
            assert!(d >= cap / 2 && d <= cap, "{n}: {d}");
        }
    }

    #[test]
    fn only_what_the_user_must_fix_is_fatal() {
        assert!(BridgeError::Auth("not-authorized".into()).is_fatal());
        assert!(BridgeError::NoTls.is_fatal());
        assert!(BridgeError::TorOff.is_fatal());
        assert!(
            BridgeError::Certificate {
                domain: "d".into(),
                reason: "r".into()
            }
            .is_fatal()
        );
        assert!(!BridgeError::Tor("timeout".into()).is_fatal());
        assert!(!BridgeError::Unreachable("refused".into()).is_fatal());
        assert!(!BridgeError::Stream("system-shutdown".into()).is_fatal());
    }
}
