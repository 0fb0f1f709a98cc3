//! In-process transport for fast multi-node tests.
//!
//! Same contract as the real carriers: the dialer pins the listener's key and
//! the listener's [`PeerPolicy`] decides whether the dialer is admitted, after
//! the dialer's gate ticket passed. Apart from the ticket no cryptography
//! runs: the "handshake" is a lookup in a shared table, which is what makes
//! hundreds of simulated nodes cheap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::gate::{Gate, GateKey, unix_now};
use crate::{
    Authenticated, BoxFuture, Carrier, DialError, PeerAddr, PeerId, PeerPolicy, Transport,
};

type Listener = (
    PeerId,
    Arc<dyn PeerPolicy>,
    mpsc::Sender<Authenticated>,
    Arc<Gate>,
);

/// A shared in-memory "network" of named listeners.
#[derive(Debug, Clone, Default)]
pub struct MemoryNetwork {
    listeners: Arc<Mutex<HashMap<String, ListenerEntry>>>,
}

struct ListenerEntry(Listener);

impl std::fmt::Debug for ListenerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Listener({})", self.0.0.short())
    }
}

impl MemoryNetwork {
    /// A new, empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a listener under `name`; authenticated streams arrive on the receiver.
    pub fn listen(
        &self,
        name: &str,
        local: PeerId,
        policy: Arc<dyn PeerPolicy>,
    ) -> mpsc::Receiver<Authenticated> {
        let (tx, rx) = mpsc::channel(16);
        if let Ok(mut l) = self.listeners.lock() {
            l.insert(
                name.to_string(),
                ListenerEntry((local, policy, tx, Arc::new(Gate::default()))),
            );
        }
        rx
    }

    /// Removes a listener (the node went offline).
    pub fn unlisten(&self, name: &str) {
        if let Ok(mut l) = self.listeners.lock() {
            l.remove(name);
        }
    }

    /// A dialer for `local` on this network.
    pub fn transport(&self, local: PeerId) -> MemoryTransport {
        MemoryTransport {
            net: self.clone(),
            local,
        }
    }
}

/// Dials listeners of a [`MemoryNetwork`].
#[derive(Debug, Clone)]
pub struct MemoryTransport {
    net: MemoryNetwork,
    local: PeerId,
}

impl Transport for MemoryTransport {
    fn carrier(&self) -> Carrier {
        Carrier::Memory
    }

    fn dial<'a>(
        &'a self,
        addr: &'a PeerAddr,
        expected: PeerId,
        gate: &'a GateKey,
    ) -> BoxFuture<'a, Result<Authenticated, DialError>> {
        Box::pin(async move {
            let PeerAddr::Memory(name) = addr else {
                return Err(DialError::WrongCarrier(addr.carrier()));
            };
            let entry = self.net.listeners.lock().ok().and_then(|l| {
                l.get(name)
                    .map(|e| (e.0.0, e.0.1.clone(), e.0.2.clone(), e.0.3.clone()))
            });
            let Some((listener_id, policy, tx, listener_gate)) = entry else {
                return Err(DialError::Unreachable(
                    std::io::ErrorKind::ConnectionRefused.into(),
                ));
            };
            let ticket = gate.ticket(&expected, unix_now());
            let keys = policy.gate_keys();
            if let Err(why) = listener_gate.check(
                [ticket.as_slice()].into_iter(),
                &keys,
                &listener_id,
                unix_now(),
            ) {
                policy.gate_refused(why);
                return Err(DialError::Handshake("the peer refused our ticket".into()));
            }
            if listener_id != expected {
                return Err(DialError::Handshake(
                    "peer presented an unexpected key".into(),
                ));
            }
            if !policy.admit(&self.local) {
                return Err(DialError::Handshake("peer refused our key".into()));
            }
            let (a, b) = tokio::io::duplex(64 * 1024);
            let channel_binding: [u8; 32] = rand::random();
            tx.send(Authenticated {
                peer: self.local,
                carrier: Carrier::Memory,
                remote: None,
                channel_binding,
                io: Box::new(b),
            })
            .await
            .map_err(|_| DialError::Unreachable(std::io::ErrorKind::ConnectionRefused.into()))?;
            Ok(Authenticated {
                peer: expected,
                carrier: Carrier::Memory,
                remote: None,
                channel_binding,
                io: Box::new(a),
            })
        })
    }
}
