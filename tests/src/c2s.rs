//! A minimal XMPP client (RFC 6120 c2s: SASL PLAIN, resource binding) for
//! measuring an ordinary server on 127.0.0.1. Plaintext TCP: it only ever
//! talks to the private Prosody of [`crate::prosody`], on loopback.

use std::time::Duration;

use node::stream::parser::{Limits, ParseEvent, StreamParser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A logged-in client.
#[derive(Debug)]
pub struct C2s {
    sock: TcpStream,
    parser: StreamParser,
    queue: std::collections::VecDeque<minidom::Element>,
    /// Our full JID.
    pub jid: String,
}

fn header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    )
}

impl C2s {
    /// Connects and logs in as `user@localhost/resource`.
    pub async fn login(
        port: u16,
        user: &str,
        password: &str,
        resource: &str,
    ) -> Result<C2s, String> {
        let sock = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut c = C2s {
            sock,
            parser: StreamParser::new(Limits::default()),
            queue: Default::default(),
            jid: String::new(),
        };
        c.write(&header("localhost")).await?;
        c.next().await?; // features
        let creds = data_encoding::BASE64.encode(format!("\0{user}\0{password}").as_bytes());
        c.write(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>"
        ))
        .await?;
        let r = c.next().await?;
        if r.name() != "success" {
            return Err(format!("login failed: {}", String::from(&r)));
        }
        c.parser = StreamParser::new(Limits::default());
        c.write(&header("localhost")).await?;
        c.next().await?; // features with bind
        c.write(&format!("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>")).await?;
        let r = c.next().await?;
        let jid = r
            .get_child("bind", "urn:ietf:params:xml:ns:xmpp-bind")
            .and_then(|b| b.get_child("jid", "urn:ietf:params:xml:ns:xmpp-bind"))
            .map(|j| j.text())
            .ok_or("bind failed")?;
        c.jid = jid;
        c.write("<presence/>").await?;
        Ok(c)
    }

    /// Writes raw XML.
    pub async fn write(&mut self, xml: &str) -> Result<(), String> {
        self.sock
            .write_all(xml.as_bytes())
            .await
            .map_err(|e| e.to_string())
    }

    /// The next top-level element (stream headers are skipped).
    pub async fn next(&mut self) -> Result<minidom::Element, String> {
        let mut buf = [0u8; 65536];
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Ok(e);
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.sock.read(&mut buf))
                .await
                .map_err(|_| "server timed out")?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("server closed the stream".into());
            }
            let evs = self
                .parser
                .feed(&buf[..n])
                .map_err(|(_, f)| f.to_string())?;
            for ev in evs {
                if let ParseEvent::Element(e) = ev {
                    self.queue.push_back(e);
                }
            }
        }
    }

    /// The next `<message/>`.
    pub async fn next_message(&mut self) -> Result<minidom::Element, String> {
        loop {
            let e = self.next().await?;
            if e.name() == "message" {
                return Ok(e);
            }
        }
    }
}
