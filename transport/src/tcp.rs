//! TLS 1.3 over TCP (tokio-rustls).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::GateKey;
use crate::tls::{EXPORTER_LABEL, placeholder_server_name};
use crate::{
    Authenticated, BoxFuture, Carrier, DialError, HANDSHAKE_TIMEOUT, MAX_CONCURRENT_HANDSHAKES,
    PeerAddr, PeerId, PeerPolicy, TlsContext, Transport, channel_binding_from,
};

/// Dials peers over TCP.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    tls: TlsContext,
}

impl TcpTransport {
    /// A TCP dialer for this identity.
    pub fn new(tls: TlsContext) -> Self {
        TcpTransport { tls }
    }

    async fn dial_inner(
        &self,
        addr: SocketAddr,
        expected: PeerId,
        gate: &GateKey,
    ) -> Result<Authenticated, DialError> {
        let cfg = Arc::new(self.tls.client_config(expected, gate)?);
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(DialError::Unreachable)?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(cfg).connect(placeholder_server_name(), tcp),
        )
        .await
        .map_err(|_| DialError::Timeout)?
        .map_err(|e| DialError::Handshake(e.to_string()))?;
        let (_, conn) = tls.get_ref();
        let channel_binding = channel_binding_from(|out| {
            conn.export_keying_material(out, EXPORTER_LABEL, None)
                .map(|_| ())
        })
        .map_err(DialError::Handshake)?;
        Ok(Authenticated {
            peer: expected,
            carrier: Carrier::Tcp,
            remote: Some(addr),
            channel_binding,
            io: Box::new(tls),
        })
    }
}

impl Transport for TcpTransport {
    fn carrier(&self) -> Carrier {
        Carrier::Tcp
    }

    fn dial<'a>(
        &'a self,
        addr: &'a PeerAddr,
        expected: PeerId,
        gate: &'a GateKey,
    ) -> BoxFuture<'a, Result<Authenticated, DialError>> {
        Box::pin(async move {
            match addr {
                PeerAddr::Tcp(a) => self.dial_inner(*a, expected, gate).await,
                other => Err(DialError::WrongCarrier(other.carrier())),
            }
        })
    }
}

/// Accepts TCP connections and hands authenticated ones to `out`.
///
/// Each handshake runs in its own task with a deadline, at most
/// [`MAX_CONCURRENT_HANDSHAKES`] at once, so a slow or hostile client cannot
/// stall the listener. Returns when `out` is closed.
pub async fn serve(
    listener: TcpListener,
    tls: TlsContext,
    policy: Arc<dyn PeerPolicy>,
    out: mpsc::Sender<Authenticated>,
) -> Result<(), crate::TlsSetupError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls.server_config(policy)?));
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return Ok(());
        };
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = out.closed() => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let out = out.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let res = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            let tls = match res {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!("inbound TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!("inbound TLS handshake timed out");
                    return;
                }
            };
            let (_, conn) = tls.get_ref();
            let Some(peer) = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| PeerId::from_spki_der(c.as_ref()).ok())
            else {
                return;
            };
            let Ok(channel_binding) = channel_binding_from(|o| {
                conn.export_keying_material(o, EXPORTER_LABEL, None)
                    .map(|_| ())
            }) else {
                return;
            };
            let _ = out
                .send(Authenticated {
                    peer,
                    carrier: Carrier::Tcp,
                    remote: Some(remote),
                    channel_binding,
                    io: Box::new(tls),
                })
                .await;
        });
    }
}
