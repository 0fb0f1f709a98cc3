//! Real-socket handshakes on 127.0.0.1: mutual authentication with pinned
//! raw public keys over TCP and QUIC, behind the ticket gate.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use coterie_transport::gate::{TICKET_LEN, TICKET_PREFIX};
use coterie_transport::{
    GateKey, PeerAddr, PeerId, PeerPolicy, Refusal, SecretKey, TlsContext, Transport, quic, tcp,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The listener's contacts, their gate keys, and what the gate refused.
#[derive(Debug)]
struct Allow {
    own: SecretKey,
    peers: Mutex<HashSet<PeerId>>,
    keys: Mutex<Vec<GateKey>>,
    refused: Mutex<Vec<Refusal>>,
}

impl Allow {
    fn add(&self, peer: PeerId) {
        self.peers.lock().expect("lock").insert(peer);
        let k = GateKey::for_pair(&self.own, &peer).expect("gate key");
        self.keys.lock().expect("lock").push(k);
    }
    fn refusals(&self) -> Vec<Refusal> {
        self.refused.lock().expect("lock").clone()
    }
}

impl PeerPolicy for Allow {
    fn admit(&self, peer: &PeerId) -> bool {
        self.peers.lock().map(|s| s.contains(peer)).unwrap_or(false)
    }
    fn gate_keys(&self) -> Arc<[GateKey]> {
        let keys: Vec<GateKey> = self.keys.lock().map(|k| k.clone()).unwrap_or_default();
        keys.into()
    }
    fn gate_refused(&self, why: Refusal) {
        self.refused.lock().expect("lock").push(why);
    }
}

struct Server {
    id: PeerId,
    tcp: PeerAddr,
    quic: PeerAddr,
    policy: Arc<Allow>,
    rx: mpsc::Receiver<coterie_transport::Authenticated>,
}

fn gate(client: &SecretKey, server: &Server) -> GateKey {
    GateKey::for_pair(client, &server.id).expect("gate key")
}

async fn server() -> Server {
    let key = SecretKey::generate();
    let tls = TlsContext::new(&key).expect("tls");
    let policy = Arc::new(Allow {
        own: key.clone(),
        peers: Mutex::default(),
        keys: Mutex::default(),
        refused: Mutex::default(),
    });
    let (tx, rx) = mpsc::channel(4);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let tcp_addr = l.local_addr().expect("addr");
    tokio::spawn(tcp::serve(l, tls.clone(), policy.clone(), tx.clone()));
    let ep = quic::bind("127.0.0.1:0".parse().expect("addr"), &tls, policy.clone()).expect("quic");
    let quic_addr = ep.local_addr().expect("addr");
    tokio::spawn(quic::serve(ep, tx));
    Server {
        id: key.peer_id(),
        tcp: PeerAddr::Tcp(tcp_addr),
        quic: PeerAddr::Quic(quic_addr),
        policy,
        rx,
    }
}

fn dialers(key: &SecretKey) -> (tcp::TcpTransport, quic::QuicTransport) {
    let tls = TlsContext::new(key).expect("tls");
    (
        tcp::TcpTransport::new(tls.clone()),
        quic::QuicTransport::new(tls),
    )
}

#[tokio::test]
async fn contacts_authenticate_each_other_on_both_carriers() {
    let mut s = server().await;
    let client = SecretKey::generate();
    s.policy.add(client.peer_id());
    let g = gate(&client, &s);
    let (t, q) = dialers(&client);
    for (dialer, addr) in [
        (&t as &dyn Transport, &s.tcp),
        (&q as &dyn Transport, &s.quic),
    ] {
        let mut c = dialer.dial(addr, s.id, &g).await.expect("dial");
        assert_eq!(c.peer, s.id);
        c.io.write_all(b"ping").await.expect("write");
        c.io.flush().await.expect("flush");
        let mut acc = s.rx.recv().await.expect("accepted");
        assert_eq!(acc.peer, client.peer_id(), "server learns the client's key");
        assert_eq!(
            acc.channel_binding, c.channel_binding,
            "both ends export the same binding"
        );
        let mut buf = [0u8; 4];
        acc.io.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
    }
}

#[tokio::test]
async fn unknown_client_key_is_refused_in_the_handshake() {
    let mut s = server().await;
    let stranger = SecretKey::generate();
    // Even with a ticket that passes the gate (as an invite's would), a key
    // the policy does not admit is refused.
    let invite = GateKey::for_invite(&[7; 32]);
    s.policy.keys.lock().expect("lock").push(invite.clone());
    let (t, q) = dialers(&stranger);
    for (dialer, addr) in [
        (&t as &dyn Transport, &s.tcp),
        (&q as &dyn Transport, &s.quic),
    ] {
        let r = dialer.dial(addr, s.id, &invite).await;
        // TLS 1.3 client auth completes after the client's Finished, so a TCP
        // dialer may see success before the alert arrives; the listener must
        // never hand the stream up, and a read on the client side fails.
        if let Ok(mut c) = r {
            let _ = c.io.write_all(b"<stream:stream>").await;
            let mut buf = [0u8; 1];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(5), c.io.read(&mut buf)).await;
            assert!(
                !matches!(read, Ok(Ok(n)) if n > 0),
                "{addr}: a stranger got bytes back"
            );
        }
    }
    let got = tokio::time::timeout(std::time::Duration::from_millis(500), s.rx.recv()).await;
    assert!(
        got.is_err(),
        "the listener handed up a stream from an unknown key"
    );
}

#[tokio::test]
async fn dialer_refuses_a_server_with_another_key() {
    let s = server().await;
    let client = SecretKey::generate();
    s.policy.add(client.peer_id());
    let impostor_expected = SecretKey::generate().peer_id();
    let g = GateKey::for_pair(&client, &impostor_expected).expect("gate key");
    let (t, q) = dialers(&client);
    assert!(t.dial(&s.tcp, impostor_expected, &g).await.is_err());
    assert!(q.dial(&s.quic, impostor_expected, &g).await.is_err());
}

/// A client verifier that accepts anything and records every certificate
/// it is shown: what a stranger would learn.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<Vec<u8>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.lock().expect("lock").push(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// A stranger's TLS client: offers `alpn`, records any certificate.
fn stranger_config(alpn: Vec<Vec<u8>>, rec: Arc<Recorder>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(rec)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn;
    cfg
}

/// Runs a stranger's handshake over TCP and QUIC; returns how many
/// certificates it was shown in all.
async fn probe(s: &Server, alpn: Vec<Vec<u8>>) -> usize {
    let rec = Arc::new(Recorder::default());
    let cfg = Arc::new(stranger_config(alpn, rec.clone()));
    let PeerAddr::Tcp(tcp_addr) = s.tcp else {
        unreachable!()
    };
    let sock = tokio::net::TcpStream::connect(tcp_addr)
        .await
        .expect("connect");
    let name = ServerName::try_from("peer.invalid").expect("name");
    let r = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, sock)
        .await;
    assert!(r.is_err(), "a stranger completed a TCP handshake");
    let PeerAddr::Quic(quic_addr) = s.quic else {
        unreachable!()
    };
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from((*cfg).clone()).expect("quic crypto");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let connecting = ep
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            quic_addr,
            "peer.invalid",
        )
        .expect("connect");
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), connecting).await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "a stranger completed a QUIC handshake"
    );
    rec.0.lock().map(|v| v.len()).expect("lock")
}

#[tokio::test]
async fn a_stranger_without_a_ticket_is_never_shown_the_certificate() {
    let s = server().await;
    s.policy.add(SecretKey::generate().peer_id());
    // Plain Coterie ALPN, no ticket; then a ticket-shaped forgery.
    let mut forged = TICKET_PREFIX.to_vec();
    forged.resize(TICKET_LEN, 0x5a);
    assert_eq!(probe(&s, vec![b"coterie/1".to_vec()]).await, 0);
    assert_eq!(probe(&s, vec![b"coterie/1".to_vec(), forged]).await, 0);
    let refused = s.policy.refusals();
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(
        refused[..2].iter().all(|r| *r == Refusal::Missing),
        "{refused:?}"
    );
    assert!(
        refused[2..].iter().all(|r| *r != Refusal::Missing),
        "{refused:?}"
    );
}

/// Forwards one TCP connection to `to`, recording what the client sent first.
async fn sniffing_relay(to: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        let (mut c, _) = l.accept().await.expect("accept");
        let mut up = tokio::net::TcpStream::connect(to).await.expect("connect");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // The ClientHello is the first flight; read until the ticket is in.
        while find_ticket(&seen).is_none() && seen.len() < 16_384 {
            let n = c.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            up.write_all(&buf[..n]).await.expect("forward");
        }
        tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
        });
        seen
    });
    (addr, h)
}

fn find_ticket(bytes: &[u8]) -> Option<Vec<u8>> {
    bytes
        .windows(TICKET_LEN)
        .find(|w| w.starts_with(TICKET_PREFIX))
        .map(<[u8]>::to_vec)
}

#[tokio::test]
async fn a_replayed_ticket_is_refused_on_both_carriers() {
    let s = server().await;
    let client = SecretKey::generate();
    s.policy.add(client.peer_id());
    let PeerAddr::Tcp(tcp_addr) = s.tcp else {
        unreachable!()
    };
    let (relay, sniffed) = sniffing_relay(tcp_addr).await;
    let (t, _) = dialers(&client);
    let mut c = t
        .dial(&PeerAddr::Tcp(relay), s.id, &gate(&client, &s))
        .await
        .expect("the contact gets through the relay");
    c.io.write_all(b"x").await.expect("write");
    let ticket = find_ticket(&sniffed.await.expect("relay")).expect("a ticket on the wire");
    // The sniffer offers the contact's ticket in its own ClientHello.
    assert_eq!(probe(&s, vec![b"coterie/1".to_vec(), ticket]).await, 0);
    assert_eq!(
        s.policy.refusals(),
        vec![Refusal::Replayed, Refusal::Replayed]
    );
}
