//! A hand-written Coterie peer for hostile-input tests. It implements the
//! wire format from docs/protocol.md independently of the node's code (only
//! the transport and the invite parser are shared), so it can send whatever
//! bytes a test wants after a real, authenticated handshake.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::{
    Authenticated, DialError, GateKey, PeerAddr, PeerId, SecretKey, TlsContext, Transport,
};

const PREFACE_LEN: usize = 256;

/// A raw peer with its own identity key.
#[derive(Debug)]
pub struct RawPeer {
    /// Its key.
    pub key: SecretKey,
    tls: TlsContext,
}

impl Default for RawPeer {
    fn default() -> Self {
        Self::new()
    }
}

impl RawPeer {
    /// A peer with a fresh key.
    pub fn new() -> Self {
        let key = SecretKey::generate();
        let tls = TlsContext::new(&key).expect("tls");
        RawPeer { key, tls }
    }

    /// Dials over TCP or QUIC with the ticket a contact of `expected` makes.
    pub async fn dial(
        &self,
        addr: &PeerAddr,
        expected: PeerId,
    ) -> Result<Authenticated, DialError> {
        let gate = GateKey::for_pair(&self.key, &expected).expect("gate key");
        self.dial_with(addr, expected, &gate).await
    }

    /// Dials over TCP or QUIC with a ticket made from `gate`.
    pub async fn dial_with(
        &self,
        addr: &PeerAddr,
        expected: PeerId,
        gate: &GateKey,
    ) -> Result<Authenticated, DialError> {
        match addr {
            PeerAddr::Tcp(_) => {
                transport::tcp::TcpTransport::new(self.tls.clone())
                    .dial(addr, expected, gate)
                    .await
            }
            _ => {
                transport::quic::QuicTransport::new(self.tls.clone())
                    .dial(addr, expected, gate)
                    .await
            }
        }
    }

    /// Redeems `uri` over TCP; returns the connection (before the XML
    /// stream) and the answer byte (0 = accepted).
    pub async fn redeem(&self, uri: &str, port: u16) -> (RawConn, u8) {
        let inv = node::invite::Invite::parse(uri, node::ops::now_secs()).expect("invite");
        let addr = PeerAddr::Tcp(([127, 0, 0, 1], port).into());
        let gate = GateKey::for_invite(&inv.secret);
        let mut a = self
            .dial_with(&addr, inv.inviter, &gate)
            .await
            .expect("dial");
        let proof = node::invite::redeem_proof(
            &inv.secret,
            &inv.inviter,
            &self.key.peer_id(),
            &a.channel_binding,
        );
        let mut pre = b"CTR1".to_vec();
        pre.push(2);
        pre.extend_from_slice(&inv.id);
        pre.extend_from_slice(&proof);
        pre.push(4);
        pre.extend_from_slice(b"evil");
        pre.resize(PREFACE_LEN, 0);
        a.io.write_all(&pre).await.expect("preface");
        let mut ans = [0u8; PREFACE_LEN];
        a.io.read_exact(&mut ans).await.expect("answer");
        (
            RawConn {
                a,
                inviter: inv.inviter,
            },
            ans[0],
        )
    }

    /// Opens a session connection (mode 1) to an existing contact.
    pub async fn session(&self, port: u16, node: PeerId) -> RawConn {
        let addr = PeerAddr::Tcp(([127, 0, 0, 1], port).into());
        let mut a = self.dial(&addr, node).await.expect("dial");
        let mut pre = b"CTR1".to_vec();
        pre.push(1);
        pre.resize(PREFACE_LEN, 0);
        a.io.write_all(&pre).await.expect("preface");
        RawConn { a, inviter: node }
    }
}

/// A raw connection.
#[derive(Debug)]
pub struct RawConn {
    /// The authenticated stream.
    pub a: Authenticated,
    /// The node's key.
    pub inviter: PeerId,
}

/// The session id both sides derive (see docs/protocol.md).
pub fn session_id(a: &PeerId, b: &PeerId) -> String {
    use std::fmt::Write as _;
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let mut h = <sha2_shim::Sha256 as sha2_shim::Digest>::new();
    sha2_shim::Digest::update(&mut h, b"coterie session v1");
    sha2_shim::Digest::update(&mut h, lo.as_bytes());
    sha2_shim::Digest::update(&mut h, hi.as_bytes());
    let d = sha2_shim::Digest::finalize(h);
    d[..12].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

mod sha2_shim {
    pub(crate) use sha2::{Digest, Sha256};
}

impl RawConn {
    /// Writes bytes as they are.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.a.io.write_all(bytes).await?;
        self.a.io.flush().await
    }

    /// Reads until `needle` appears or the stream ends; returns what was read.
    pub async fn read_until(&mut self, needle: &str, timeout: Duration) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if String::from_utf8_lossy(&got).contains(needle) {
                break;
            }
            match tokio::time::timeout_at(deadline, self.a.io.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Reads everything until the peer closes (or `timeout`); true if it closed.
    pub async fn read_to_close(&mut self, timeout: Duration) -> (String, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.a.io.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return (String::from_utf8_lossy(&got).into_owned(), true);
                }
                Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Opens the XML stream and resumes with `h`; returns once `<resumed/>` arrived.
    pub async fn open_stream(&mut self, me: &PeerId, h: u32) -> String {
        let sid = session_id(me, &self.inviter);
        let hdr = format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' from='{}' to='{}' version='1.0'>",
            me.onion_address(),
            self.inviter.onion_address()
        );
        self.send(hdr.as_bytes()).await.expect("header");
        let got = self
            .read_until("</stream:features>", Duration::from_secs(10))
            .await;
        assert!(
            got.contains("urn:xmpp:sm:3"),
            "no stream management offered: {got}"
        );
        self.send(format!("<resume xmlns='urn:xmpp:sm:3' h='{h}' previd='{sid}'/>").as_bytes())
            .await
            .expect("resume");
        let got = self.read_until("resumed", Duration::from_secs(10)).await;
        assert!(got.contains("resumed"), "not resumed: {got}");
        got
    }
}
