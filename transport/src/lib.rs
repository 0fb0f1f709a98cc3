//! # coterie-transport
//!
//! Authenticated, encrypted duplex byte streams to a peer named by its
//! Ed25519 key. Nothing above this crate sees an unauthenticated byte.
//!
//! ```text
//!          node (XMPP stream, sessions)
//!                     │  Authenticated { peer, carrier, io }
//!        ┌────────────┼─────────────┐
//!   TcpTransport  QuicTransport  OnionTransport  MemoryTransport
//!   tokio-rustls  quinn          arti (TLS inside in-process pipes
//!                                the onion stream)
//!        └──────── one TlsContext, one verifier module ────────┘
//! ```
//!
//! What this crate does **not** do: XML, message framing, retries, choosing
//! which address to dial. Those belong to `node`.
//!
//! Every carrier runs TLS 1.3 with RFC 7250 raw public keys in both
//! directions. The dialer pins one key; the listener admits keys through a
//! [`PeerPolicy`]. A refused key fails the handshake before any application
//! data is read (see [`verifier`]).

pub mod gate;
pub mod identity;
pub mod limit;
pub mod memory;
pub mod onion;
pub mod quic;
pub mod tcp;
pub mod tls;
pub mod verifier;

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub use gate::{GateKey, Refusal};
pub use identity::{PeerId, PeerIdError, SecretKey};
pub use tls::{TlsContext, TlsSetupError};
pub use verifier::PeerPolicy;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many handshakes a listener runs at once; more wait (slow-loris bound).
/// One source address gets at most [`limit::MAX_HANDSHAKES_PER_ADDR`] of them.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 64;

/// A boxed future, for object-safe async trait methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The byte stream of an authenticated connection.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Which carrier a stream runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Carrier {
    /// TLS over TCP.
    Tcp,
    /// QUIC (TLS inside).
    Quic,
    /// TLS inside a Tor onion-service stream (arti).
    Onion,
    /// In-process pipes (tests).
    Memory,
}

impl fmt::Display for Carrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Carrier::Tcp => "tcp",
            Carrier::Quic => "quic",
            Carrier::Onion => "onion",
            Carrier::Memory => "memory",
        })
    }
}

/// Where a peer can be dialled.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    /// `tcp:IP:PORT`
    Tcp(SocketAddr),
    /// `quic:IP:PORT`
    Quic(SocketAddr),
    /// `onion:<56 characters>.onion:PORT`: the onion service whose
    /// address is this identity key.
    Onion(PeerId, u16),
    /// `mem:NAME`
    Memory(String),
}

impl PeerAddr {
    /// The carrier this address is for.
    pub fn carrier(&self) -> Carrier {
        match self {
            PeerAddr::Tcp(_) => Carrier::Tcp,
            PeerAddr::Quic(_) => Carrier::Quic,
            PeerAddr::Onion(..) => Carrier::Onion,
            PeerAddr::Memory(_) => Carrier::Memory,
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Tcp(a) => write!(f, "tcp:{a}"),
            PeerAddr::Quic(a) => write!(f, "quic:{a}"),
            PeerAddr::Onion(id, port) => write!(f, "onion:{}:{port}", id.onion_address()),
            PeerAddr::Memory(n) => write!(f, "mem:{n}"),
        }
    }
}

/// A string that is not a peer address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "not a peer address: expected tcp:IP:PORT, quic:IP:PORT, onion:ADDRESS.onion:PORT or mem:NAME"
)]
pub struct BadPeerAddr;

impl FromStr for PeerAddr {
    type Err = BadPeerAddr;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s.split_once(':').ok_or(BadPeerAddr)?;
        match scheme {
            "tcp" => parse_socket_addr(rest)
                .map(PeerAddr::Tcp)
                .ok_or(BadPeerAddr),
            "quic" => parse_socket_addr(rest)
                .map(PeerAddr::Quic)
                .ok_or(BadPeerAddr),
            "onion" => {
                let (host, port) = rest.rsplit_once(':').ok_or(BadPeerAddr)?;
                let id = PeerId::from_onion(host.strip_suffix(".onion").ok_or(BadPeerAddr)?)
                    .map_err(|_| BadPeerAddr)?;
                Ok(PeerAddr::Onion(id, port.parse().map_err(|_| BadPeerAddr)?))
            }
            "mem" if !rest.is_empty() && rest.len() <= 64 => Ok(PeerAddr::Memory(rest.to_string())),
            _ => Err(BadPeerAddr),
        }
    }
}

/// Parses `IP:PORT`, including an IPv6 address with a zone
/// (`[fe80::1%eth0]:7474` or `[fe80::1%2]:7474`), which the standard
/// parser refuses. A link-local address means nothing without its
/// interface; the zone is the interface's index or name (looked up on
/// Linux in `/sys/class/net`).
pub fn parse_socket_addr(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    let inner = s.strip_prefix('[')?;
    let (host, port) = inner.split_once("]:")?;
    let (ip, zone) = host.split_once('%')?;
    let ip: std::net::Ipv6Addr = ip.parse().ok()?;
    let port: u16 = port.parse().ok()?;
    let scope = match zone.parse::<u32>() {
        Ok(n) => n,
        Err(_) => interface_index(zone)?,
    };
    Some(SocketAddr::V6(std::net::SocketAddrV6::new(
        ip, port, 0, scope,
    )))
}

/// The index of the network interface `name`, if it exists.
pub fn interface_index(name: &str) -> Option<u32> {
    let plausible = !name.is_empty()
        && name.len() <= 15
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if !plausible {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A stream whose other end proved it holds `peer`'s key.
pub struct Authenticated {
    /// The peer's identity, as proven in the handshake.
    pub peer: PeerId,
    /// The carrier.
    pub carrier: Carrier,
    /// The remote socket address, where there is one.
    pub remote: Option<SocketAddr>,
    /// 32 bytes from the TLS exporter: the same on both ends of this one
    /// connection and on no other. Application proofs are bound to it.
    pub channel_binding: [u8; 32],
    /// The byte stream.
    pub io: Box<dyn Io>,
}

impl fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticated")
            .field("peer", &self.peer)
            .field("carrier", &self.carrier)
            .finish_non_exhaustive()
    }
}

/// Why a dial did not produce an authenticated stream.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The address is for another carrier than this transport.
    #[error("{0} cannot be dialled by this transport")]
    WrongCarrier(Carrier),
    /// The peer could not be reached at all.
    #[error("could not reach the peer: {0}")]
    Unreachable(std::io::Error),
    /// The handshake did not finish in time.
    #[error("the TLS handshake timed out")]
    Timeout,
    /// The handshake failed: wrong key, refused by the peer, or a protocol error.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// TLS could not be configured.
    #[error(transparent)]
    Setup(#[from] TlsSetupError),
}

/// A carrier that can dial a peer and hand back an authenticated stream.
pub trait Transport: Send + Sync + fmt::Debug {
    /// The carrier this transport dials.
    fn carrier(&self) -> Carrier;
    /// Dials `addr`, which must answer with `expected`'s key; `gate` makes
    /// the ticket that gets the dial past the listener's gate.
    fn dial<'a>(
        &'a self,
        addr: &'a PeerAddr,
        expected: PeerId,
        gate: &'a GateKey,
    ) -> BoxFuture<'a, Result<Authenticated, DialError>>;
}

pub(crate) fn channel_binding_from(
    f: impl FnOnce(&mut [u8; 32]) -> Result<(), rustls::Error>,
) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    f(&mut out).map_err(|e| format!("TLS exporter failed: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn peer_addr_parses_and_prints() {
        for s in ["tcp:127.0.0.1:5000", "quic:[::1]:7", "mem:alice"] {
            let a: PeerAddr = s.parse().expect("parses");
            assert_eq!(a.to_string(), s);
        }
        let key = SecretKey::from_seed(&[7; 32]).peer_id();
        let onion = format!("onion:{}:7474", key.onion_address());
        let a: PeerAddr = onion.parse().expect("onion address parses");
        assert_eq!(a, PeerAddr::Onion(key, 7474));
        assert_eq!(a.to_string(), onion);
        let label = key.onion_label();
        for bad in [
            "",
            "tcp:",
            "udp:1.2.3.4:5",
            "tcp:host:5",
            "mem:",
            &format!("onion:{label}:7474"),
            &format!("onion:{label}.onion"),
            &format!("onion:{label}.onion:99999"),
            &format!("onion:a{}.onion:1", &label[1..]),
        ] {
            assert_eq!(bad.parse::<PeerAddr>(), Err(BadPeerAddr), "{bad}");
        }
    }

    #[test]
    fn link_local_addresses_keep_their_zone() {
        let a: PeerAddr = "tcp:[fe80::1%3]:5000".parse().expect("numeric zone");
        let PeerAddr::Tcp(SocketAddr::V6(v6)) = a else {
            panic!("{a}")
        };
        assert_eq!((v6.scope_id(), v6.port()), (3, 5000));
        assert_eq!(a.to_string(), "tcp:[fe80::1%3]:5000");
        assert_eq!(a.to_string().parse::<PeerAddr>(), Ok(a));
        let lo = parse_socket_addr("[fe80::1%lo]:7").expect("interface name");
        assert!(matches!(lo, SocketAddr::V6(v) if v.scope_id() > 0));
        for bad in [
            "[fe80::1%no-such-if0]:7",
            "[fe80::1%../../etc]:7",
            "[fe80::1%]:7",
            "[1.2.3.4%1]:7",
            "fe80::1%1:7",
        ] {
            assert_eq!(parse_socket_addr(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn peer_addr_roundtrip(ip in any::<[u8; 4]>(), port in any::<u16>(), quic in any::<bool>()) {
            let sa = SocketAddr::from((ip, port));
            let a = if quic { PeerAddr::Quic(sa) } else { PeerAddr::Tcp(sa) };
            prop_assert_eq!(a.to_string().parse::<PeerAddr>(), Ok(a));
        }
    }
}
