//! TLS 1.3 over TCP (tokio-rustls).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;

use crate::GateKey;
use crate::tls;
use crate::{
    Authenticated, BoxFuture, Carrier, DialError, MAX_CONCURRENT_HANDSHAKES, PeerAddr, PeerId,
    PeerPolicy, TlsContext, Transport,
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
        // A stale LAN address must not hold the dialer for the kernel's
        // two-minute SYN timeout: the onion service may be next in line.
        let tcp = tokio::time::timeout(crate::HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| DialError::Unreachable(std::io::ErrorKind::TimedOut.into()))?
            .map_err(DialError::Unreachable)?;
        let _ = tcp.set_nodelay(true);
        tls::connect(cfg, tcp, Carrier::Tcp, Some(addr), expected).await
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
/// [`MAX_CONCURRENT_HANDSHAKES`] at once and at most
/// [`crate::limit::MAX_HANDSHAKES_PER_ADDR`] from one address, so a slow or
/// hostile client cannot stall the listener. Returns when `out` is closed.
pub async fn serve(
    listener: TcpListener,
    tls: TlsContext,
    policy: Arc<dyn PeerPolicy>,
    out: mpsc::Sender<Authenticated>,
) -> Result<(), crate::TlsSetupError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls.server_config(policy)?));
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let per_source = crate::limit::PerSource::default();
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
        let Some(slot) = per_source.try_start(remote.ip()) else {
            // That address already has its share of handshakes in
            // progress: closed at once, the permit goes back.
            tracing::debug!("inbound TCP refused: too many handshakes from one address");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let out = out.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _slot = slot;
            if let Some(a) = tls::accept(&acceptor, tcp, Carrier::Tcp, Some(remote)).await {
                let _ = out.send(a).await;
            }
        });
    }
}
