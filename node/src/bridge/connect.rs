//! Logging into the account: a stream to the server (through a Tor exit or,
//! when the user asked for it, directly), STARTTLS with a certificate valid
//! for the account's domain, SASL, and a stream ready for resource binding
//! (which [`tokio_xmpp::stanzastream::StanzaStream`] does, with a random
//! resource).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, BufStream};
use tokio_xmpp::error::AuthError;
use tokio_xmpp::parsers::{ns, starttls};
use tokio_xmpp::stanzastream::Connection;
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, PendingFeaturesRecv, RecvFeaturesError, StreamHeader, Timeouts,
    XmlStream, XmppStreamElement, initiate_stream,
};

use super::{BridgeAccount, BridgeError, random_resource};

/// How long a whole login may take (a Tor circuit, two TLS round trips,
/// SASL) before it counts as failed.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(90);

/// Stream timeouts: silence for this long makes the stream ping the
/// server, and as long again without an answer ends it.
pub fn timeouts() -> Timeouts {
    Timeouts {
        read_timeout: Duration::from_secs(120),
        response_timeout: Duration::from_secs(60),
    }
}

/// How the bridge reaches the server.
#[derive(Clone, Debug)]
pub enum Dial {
    /// Through a Tor exit.
    Tor(Arc<transport::onion::Tor>),
    /// Straight from this device (the user set `--danger-bridge-without-tor`).
    Direct,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The certificates in `pem` (CERTIFICATE blocks; anything else is skipped).
pub fn parse_ca(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// The TLS configuration: the account's own CA when it has one (and then
/// only that), else the system's roots.
pub fn tls_config(acct: &BridgeAccount) -> Result<Arc<ClientConfig>, BridgeError> {
    let mut roots = RootCertStore::empty();
    match &acct.ca_pem {
        Some(pem) => {
            let certs = parse_ca(pem).map_err(|_| super::AccountError::Ca)?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(super::AccountError::Ca.into());
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(BridgeError::Certificate {
                    domain: acct.bare()?.domain().to_string(),
                    reason:
                        "this system has no trusted root certificates (install ca-certificates)"
                            .into(),
                });
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BridgeError::Protocol(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Connects, secures and authenticates one stream; the caller binds it.
pub async fn login(
    acct: &BridgeAccount,
    tls: Arc<ClientConfig>,
    dial: &Dial,
) -> Result<Connection, BridgeError> {
    match tokio::time::timeout(LOGIN_TIMEOUT, login_inner(acct, tls, dial)).await {
        Ok(r) => r,
        Err(_) => Err(match dial {
            Dial::Tor(_) => {
                BridgeError::Tor(format!("no login within {} s", LOGIN_TIMEOUT.as_secs()))
            }
            Dial::Direct => {
                BridgeError::Unreachable(format!("no login within {} s", LOGIN_TIMEOUT.as_secs()))
            }
        }),
    }
}

async fn login_inner(
    acct: &BridgeAccount,
    tls: Arc<ClientConfig>,
    dial: &Dial,
) -> Result<Connection, BridgeError> {
    let jid = acct.bare()?;
    let domain = jid.domain().as_str().to_owned();
    let (host, port) = acct.endpoint()?;
    let io: Box<dyn Io> = match dial {
        Dial::Tor(tor) => Box::new(
            tor.connect_exit(&host, port)
                .await
                .map_err(BridgeError::Tor)?,
        ),
        Dial::Direct => Box::new(
            tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| BridgeError::Unreachable(e.to_string()))?,
        ),
    };

    // Plaintext: only the stream header, the features and the STARTTLS
    // request cross it.
    let header = || StreamHeader {
        to: Some(Cow::Owned(domain.clone())),
        from: None,
        id: None,
    };
    let pending = initiate_stream(BufStream::new(io), ns::JABBER_CLIENT, header(), timeouts())
        .await
        .map_err(io_error)?;
    let (features, mut plain) = recv_features(pending).await?;
    if !features.can_starttls() {
        return Err(BridgeError::NoTls);
    }
    plain
        .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
            starttls::Request,
        )))
        .await
        .map_err(io_error)?;
    match next(&mut plain).await? {
        XmppStreamElement::Starttls(starttls::Nonza::Proceed(_)) => {}
        XmppStreamElement::Starttls(starttls::Nonza::Failure(_)) => {
            return Err(BridgeError::NoTls);
        }
        XmppStreamElement::StreamError(e) => return Err(BridgeError::Stream(e.to_string())),
        _ => {
            return Err(BridgeError::Protocol(
                "unexpected element instead of STARTTLS proceed".into(),
            ));
        }
    }
    let io = plain.into_inner().into_inner();
    let name = ServerName::try_from(domain.clone())
        .map_err(|_| BridgeError::Protocol(format!("{domain:?} is not a TLS server name")))?;
    let secured = tokio_rustls::TlsConnector::from(tls)
        .connect(name, io)
        .await
        .map_err(|e| tls_error(&domain, e))?;

    let pending = initiate_stream(
        BufStream::new(secured),
        ns::JABBER_CLIENT,
        header(),
        timeouts(),
    )
    .await
    .map_err(io_error)?;
    let (features, stream) = recv_features(pending).await?;
    // Never ANONYMOUS: it would log in as someone else.
    let mechanisms = features
        .sasl_mechanisms
        .into_iter()
        .filter(|m| m != "ANONYMOUS")
        .collect();
    let node = jid.node().map(|n| n.as_str()).unwrap_or_default();
    let creds = sasl::common::Credentials::default()
        .with_username(node)
        .with_password(acct.password.as_str())
        .with_channel_binding(sasl::common::ChannelBinding::None);
    let reset = tokio_xmpp::client_login(stream, mechanisms, creds)
        .await
        .map_err(login_error)?;
    let pending = reset.send_header(header()).await.map_err(io_error)?;
    let (features, stream) = recv_features(pending).await?;
    // The stanza stream panics on a stream it cannot bind: refuse it here.
    if !features.can_bind() {
        return Err(BridgeError::Protocol(
            "the server offers no resource binding".into(),
        ));
    }
    let full = jid
        .with_resource_str(&random_resource())
        .map_err(|e| BridgeError::Protocol(e.to_string()))?;
    Ok(Connection {
        stream: stream.box_stream(),
        features,
        identity: full.into(),
    })
}

type Xmpp<I> = XmlStream<I, FallibleStreamElement>;

async fn recv_features<I: tokio::io::AsyncBufRead + AsyncWrite + Unpin>(
    p: PendingFeaturesRecv<I>,
) -> Result<
    (
        tokio_xmpp::parsers::stream_features::StreamFeatures,
        Xmpp<I>,
    ),
    BridgeError,
> {
    p.recv_features().await.map_err(|e| match e {
        RecvFeaturesError::Io(e) => io_error(e),
        RecvFeaturesError::StreamError(e) => BridgeError::Stream(e.0.condition.to_string()),
    })
}

async fn next<I: tokio::io::AsyncBufRead + AsyncWrite + Unpin>(
    s: &mut Xmpp<I>,
) -> Result<XmppStreamElement, BridgeError> {
    loop {
        match s.next().await {
            None => {
                return Err(BridgeError::Stream(
                    "the server closed the connection".into(),
                ));
            }
            Some(Ok(FallibleStreamElement::Ok(el))) => return Ok(el),
            Some(Ok(FallibleStreamElement::Err(e))) => {
                return Err(BridgeError::Protocol(e.to_string()));
            }
            Some(Err(tokio_xmpp::xmlstream::ReadError::SoftTimeout)) => continue,
            Some(Err(e)) => return Err(BridgeError::Protocol(e.to_string())),
        }
    }
}

fn io_error(e: std::io::Error) -> BridgeError {
    match e.kind() {
        std::io::ErrorKind::InvalidData => BridgeError::Protocol(e.to_string()),
        _ => BridgeError::Stream(e.to_string()),
    }
}

/// A failed handshake: certificate problems stop the bridge (they may be
/// an attack); anything else is retried, over TLS again.
fn tls_error(domain: &str, e: std::io::Error) -> BridgeError {
    let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(
            err @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType),
        ) => BridgeError::Certificate {
            domain: domain.to_owned(),
            reason: err.to_string(),
        },
        Some(err) => BridgeError::Protocol(format!("TLS: {err}")),
        None => BridgeError::Stream(e.to_string()),
    }
}

fn login_error(e: tokio_xmpp::Error) -> BridgeError {
    match e {
        tokio_xmpp::Error::Auth(AuthError::Fail(cond)) => {
            BridgeError::Auth(format!("{cond:?}").to_lowercase().replace('_', "-"))
        }
        tokio_xmpp::Error::Auth(AuthError::NoMechanism) => {
            BridgeError::Auth("the server offers no login method Coterie accepts".into())
        }
        tokio_xmpp::Error::Auth(e) => BridgeError::Auth(e.to_string()),
        tokio_xmpp::Error::Io(e) => io_error(e),
        tokio_xmpp::Error::Disconnected => {
            BridgeError::Stream("the server closed the connection during login".into())
        }
        e => BridgeError::Protocol(e.to_string()),
    }
}
