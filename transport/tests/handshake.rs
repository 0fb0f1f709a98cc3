//! Real-socket handshakes on 127.0.0.1: mutual authentication with pinned
//! raw public keys over TCP and QUIC.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use coterie_transport::{
    PeerAddr, PeerId, PeerPolicy, SecretKey, TlsContext, Transport, quic, tcp,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

#[derive(Debug, Default)]
struct Allow(Mutex<HashSet<PeerId>>);
impl PeerPolicy for Allow {
    fn admit(&self, peer: &PeerId) -> bool {
        self.0.lock().map(|s| s.contains(peer)).unwrap_or(false)
    }
}

struct Server {
    id: PeerId,
    tcp: PeerAddr,
    quic: PeerAddr,
    policy: Arc<Allow>,
    rx: mpsc::Receiver<coterie_transport::Authenticated>,
}

async fn server() -> Server {
    let key = SecretKey::generate();
    let tls = TlsContext::new(&key).expect("tls");
    let policy = Arc::new(Allow::default());
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
    s.policy.0.lock().expect("lock").insert(client.peer_id());
    let (t, q) = dialers(&client);
    for (dialer, addr) in [
        (&t as &dyn Transport, &s.tcp),
        (&q as &dyn Transport, &s.quic),
    ] {
        let mut c = dialer.dial(addr, s.id).await.expect("dial");
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
    let (t, q) = dialers(&stranger);
    for (dialer, addr) in [
        (&t as &dyn Transport, &s.tcp),
        (&q as &dyn Transport, &s.quic),
    ] {
        let r = dialer.dial(addr, s.id).await;
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
    s.policy.0.lock().expect("lock").insert(client.peer_id());
    let impostor_expected = SecretKey::generate().peer_id();
    let (t, q) = dialers(&client);
    assert!(t.dial(&s.tcp, impostor_expected).await.is_err());
    assert!(q.dial(&s.quic, impostor_expected).await.is_err());
}
