//! QUIC (quinn), with the same rustls configuration and verifier as TCP.
//!
//! One QUIC connection carries one bidirectional stream: the XML stream. The
//! dialer opens it and writes first.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Mutex, Semaphore, mpsc};

use crate::GateKey;
use crate::tls::EXPORTER_LABEL;
use crate::{
    Authenticated, BoxFuture, Carrier, DialError, HANDSHAKE_TIMEOUT, MAX_CONCURRENT_HANDSHAKES,
    PeerAddr, PeerId, PeerPolicy, TlsContext, TlsSetupError, Transport,
};

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    // One XML stream per connection: refuse more.
    t.max_concurrent_bidi_streams(1u8.into());
    t.max_concurrent_uni_streams(0u8.into());
    Arc::new(t)
}

/// A QUIC bidirectional stream, kept together with its connection.
struct QuicIo {
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl AsyncRead for QuicIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

fn binding(conn: &quinn::Connection) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| "TLS exporter failed".to_string())?;
    Ok(out)
}

fn peer_of(conn: &quinn::Connection) -> Option<PeerId> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    PeerId::from_spki_der(certs.first()?.as_ref()).ok()
}

/// Dials peers over QUIC from lazily created client endpoints.
#[derive(Debug)]
pub struct QuicTransport {
    tls: TlsContext,
    v4: Mutex<Option<quinn::Endpoint>>,
    v6: Mutex<Option<quinn::Endpoint>>,
}

impl QuicTransport {
    /// A QUIC dialer for this identity.
    pub fn new(tls: TlsContext) -> Self {
        QuicTransport {
            tls,
            v4: Mutex::new(None),
            v6: Mutex::new(None),
        }
    }

    async fn endpoint(&self, for_addr: SocketAddr) -> Result<quinn::Endpoint, DialError> {
        let (slot, bind): (_, SocketAddr) = if for_addr.is_ipv4() {
            (&self.v4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into())
        } else {
            (&self.v6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        };
        let mut slot = slot.lock().await;
        if let Some(ep) = slot.as_ref() {
            return Ok(ep.clone());
        }
        let ep = quinn::Endpoint::client(bind).map_err(DialError::Unreachable)?;
        *slot = Some(ep.clone());
        Ok(ep)
    }

    async fn dial_inner(
        &self,
        addr: SocketAddr,
        expected: PeerId,
        gate: &GateKey,
    ) -> Result<Authenticated, DialError> {
        let tls = self.tls.client_config(expected, gate)?;
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| DialError::Handshake(format!("QUIC TLS config: {e}")))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport_config());
        let ep = self.endpoint(addr).await?;
        let connecting = ep
            .connect_with(cfg, addr, "peer.invalid")
            .map_err(|e| DialError::Handshake(e.to_string()))?;
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| DialError::Timeout)?
            .map_err(|e| DialError::Handshake(e.to_string()))?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| DialError::Handshake(e.to_string()))?;
        let channel_binding = binding(&conn).map_err(DialError::Handshake)?;
        Ok(Authenticated {
            peer: expected,
            carrier: Carrier::Quic,
            remote: Some(addr),
            channel_binding,
            io: Box::new(QuicIo {
                _conn: conn,
                send,
                recv,
            }),
        })
    }
}

impl Transport for QuicTransport {
    fn carrier(&self) -> Carrier {
        Carrier::Quic
    }

    fn dial<'a>(
        &'a self,
        addr: &'a PeerAddr,
        expected: PeerId,
        gate: &'a GateKey,
    ) -> BoxFuture<'a, Result<Authenticated, DialError>> {
        Box::pin(async move {
            match addr {
                PeerAddr::Quic(a) => self.dial_inner(*a, expected, gate).await,
                other => Err(DialError::WrongCarrier(other.carrier())),
            }
        })
    }
}

/// Binds a QUIC listener on `addr`.
pub fn bind(
    addr: SocketAddr,
    tls: &TlsContext,
    policy: Arc<dyn PeerPolicy>,
) -> Result<quinn::Endpoint, BindError> {
    let crypto = QuicServerConfig::try_from(tls.server_config(policy)?)
        .map_err(|e| BindError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config());
    quinn::Endpoint::server(cfg, addr).map_err(BindError::Io)
}

/// Why a QUIC listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The UDP socket could not be bound.
    #[error("could not bind the UDP socket: {0}")]
    Io(std::io::Error),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// quinn refused the TLS configuration.
    #[error("QUIC configuration refused: {0}")]
    Config(String),
}

/// Accepts QUIC connections on `endpoint` and hands authenticated streams to `out`.
///
/// As over TCP, at most [`MAX_CONCURRENT_HANDSHAKES`] handshakes run at once
/// and at most [`crate::limit::MAX_HANDSHAKES_PER_ADDR`] from one address;
/// a connection attempt beyond either is refused at once (quinn answers
/// it with a close, no state is kept).
pub async fn serve(endpoint: quinn::Endpoint, out: mpsc::Sender<Authenticated>) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let per_source = crate::limit::PerSource::default();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => return },
            _ = out.closed() => return,
        };
        let remote = incoming.remote_address();
        let (Ok(permit), Some(slot)) = (
            permits.clone().try_acquire_owned(),
            per_source.try_start(remote.ip()),
        ) else {
            tracing::debug!("inbound QUIC refused: too many handshakes in progress");
            incoming.refuse();
            continue;
        };
        let out = out.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _slot = slot;
            let accept = async {
                let conn = incoming.await.map_err(|e| e.to_string())?;
                let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
                let peer = peer_of(&conn).ok_or("no peer key")?;
                let channel_binding = binding(&conn)?;
                Ok::<_, String>(Authenticated {
                    peer,
                    carrier: Carrier::Quic,
                    remote: Some(remote),
                    channel_binding,
                    io: Box::new(QuicIo {
                        _conn: conn,
                        send,
                        recv,
                    }),
                })
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(a)) => {
                    let _ = out.send(a).await;
                }
                Ok(Err(e)) => tracing::debug!("inbound QUIC handshake failed: {e}"),
                Err(_) => tracing::debug!("inbound QUIC handshake timed out"),
            }
        });
    }
}
