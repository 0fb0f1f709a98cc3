//! rustls configuration shared by every carrier (TCP, QUIC, and later Tor).
//!
//! TLS 1.3 only, raw public keys only, Ed25519 only, hybrid post-quantum key
//! exchange (X25519MLKEM768) preferred, no SNI (the peer's name would leak in
//! the ClientHello), no session resumption tickets (they link connections).

use std::sync::Arc;

use rustls::client::AlwaysResolvesClientRawPublicKeys;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};

use crate::gate::{Gate, GateKey, unix_now};
use crate::verifier::{PeerPolicy, PinnedServer, PolicyClient};
use crate::{PeerId, SecretKey};

/// The ALPN protocol id of a Coterie stream.
pub const ALPN: &[u8] = b"coterie/1";
/// Label for the TLS exporter that binds application proofs to one connection.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-coterie-channel-binding";

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The TLS library refused the identity key or the protocol settings.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The node's TLS identity and settings, from which per-connection configs are made.
#[derive(Clone)]
pub struct TlsContext {
    provider: Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
    local: PeerId,
    gate: Arc<Gate>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsContext({})", self.local.short())
    }
}

fn provider() -> CryptoProvider {
    let mut p = aws_lc_rs::default_provider();
    p.kx_groups = vec![
        aws_lc_rs::kx_group::X25519MLKEM768,
        aws_lc_rs::kx_group::X25519,
    ];
    p
}

impl TlsContext {
    /// Builds the TLS identity from the node's secret key.
    pub fn new(secret: &SecretKey) -> Result<Self, TlsSetupError> {
        let provider = Arc::new(provider());
        let der = secret.to_pkcs8_der();
        let signing = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec())))?;
        let local = secret.peer_id();
        let cert = CertificateDer::from(local.to_spki_der());
        let key = Arc::new(CertifiedKey::new(vec![cert], signing));
        Ok(TlsContext {
            provider,
            key,
            local,
            gate: Arc::new(Gate::default()),
        })
    }

    /// This node's identity.
    pub fn local(&self) -> PeerId {
        self.local
    }

    /// The gate shared by every listener made from this context.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// A client config that accepts exactly `expected` as the server and
    /// carries a fresh ticket made with `gate` (see [`crate::gate`]).
    pub fn client_config(
        &self,
        expected: PeerId,
        gate: &GateKey,
    ) -> Result<ClientConfig, TlsSetupError> {
        let verifier = PinnedServer {
            expected,
            algs: self.provider.signature_verification_algorithms,
        };
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(
                self.key.clone(),
            )));
        cfg.alpn_protocols = vec![ALPN.to_vec(), gate.ticket(&expected, unix_now())];
        cfg.enable_sni = false;
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(cfg)
    }

    /// A server config that admits client keys according to `policy`.
    pub fn server_config(
        &self,
        policy: Arc<dyn PeerPolicy>,
    ) -> Result<ServerConfig, TlsSetupError> {
        let resolver = GatedResolver {
            key: self.key.clone(),
            local: self.local,
            gate: self.gate.clone(),
            policy: policy.clone(),
        };
        let verifier = PolicyClient {
            policy,
            algs: self.provider.signature_verification_algorithms,
        };
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(resolver));
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.session_storage = Arc::new(NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(cfg)
    }
}

/// Shows the certificate only to a ClientHello with a valid ticket.
struct GatedResolver {
    key: Arc<CertifiedKey>,
    local: PeerId,
    gate: Arc<Gate>,
    policy: Arc<dyn PeerPolicy>,
}

impl std::fmt::Debug for GatedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatedResolver")
    }
}

impl ResolvesServerCert for GatedResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let keys = self.policy.gate_keys();
        let alpn = hello.alpn().into_iter().flatten();
        match self.gate.check(alpn, &keys, &self.local, unix_now()) {
            Ok(()) => Some(self.key.clone()),
            Err(why) => {
                tracing::debug!(?why, "gate refused a ClientHello; no certificate sent");
                self.policy.gate_refused(why);
                None
            }
        }
    }

    fn only_raw_public_keys(&self) -> bool {
        true
    }
}

/// The server name handed to rustls. It is never sent (SNI is off) and never
/// checked (the verifier pins a key); it only satisfies the API.
pub(crate) fn placeholder_server_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::IpAddress(rustls::pki_types::IpAddr::V4(
        rustls::pki_types::Ipv4Addr::from([0, 0, 0, 0]),
    ))
}

/// Runs the client side of the handshake over `io` (already connected to
/// the listener) and binds the result to this connection.
pub(crate) async fn connect<IO>(
    cfg: Arc<ClientConfig>,
    io: IO,
    carrier: crate::Carrier,
    remote: Option<std::net::SocketAddr>,
    expected: PeerId,
) -> Result<crate::Authenticated, crate::DialError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    use crate::DialError;
    let tls = tokio::time::timeout(
        crate::HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(cfg).connect(placeholder_server_name(), io),
    )
    .await
    .map_err(|_| DialError::Timeout)?
    .map_err(|e| DialError::Handshake(e.to_string()))?;
    let (_, conn) = tls.get_ref();
    let channel_binding = crate::channel_binding_from(|out| {
        conn.export_keying_material(out, EXPORTER_LABEL, None)
            .map(|_| ())
    })
    .map_err(DialError::Handshake)?;
    Ok(crate::Authenticated {
        peer: expected,
        carrier,
        remote,
        channel_binding,
        io: Box::new(tls),
    })
}

/// Runs the server side of the handshake over `io`, with the handshake
/// deadline. `None` (logged at debug, without identifiers) if the dialer
/// was refused, too slow, or broke the protocol.
pub(crate) async fn accept<IO>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: IO,
    carrier: crate::Carrier,
    remote: Option<std::net::SocketAddr>,
) -> Option<crate::Authenticated>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let tls = match tokio::time::timeout(crate::HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::debug!(%carrier, "inbound TLS handshake failed: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!(%carrier, "inbound TLS handshake timed out");
            return None;
        }
    };
    let (_, conn) = tls.get_ref();
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| PeerId::from_spki_der(c.as_ref()).ok())?;
    let channel_binding = crate::channel_binding_from(|o| {
        conn.export_keying_material(o, EXPORTER_LABEL, None)
            .map(|_| ())
    })
    .ok()?;
    Some(crate::Authenticated {
        peer,
        carrier,
        remote,
        channel_binding,
        io: Box::new(tls),
    })
}
