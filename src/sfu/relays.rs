//! Which UDP peer addresses are relays of Conclave's own TURN server, and how their clients
//! reach it: the SFU sees a TURN client's media come from its relay socket like any UDP
//! peer, and the operator view (admin API, metrics) tells it apart with this. The TURN
//! server writes it; the engine only reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};

/// How a TURN client reaches the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayVia {
    /// TURN over UDP.
    Udp,
    /// TURN over TCP.
    Tcp,
    /// TURN over TLS.
    Tls,
}

impl RelayVia {
    /// "udp", "tcp", "tls".
    pub fn as_str(self) -> &'static str {
        match self {
            RelayVia::Udp => "udp",
            RelayVia::Tcp => "tcp",
            RelayVia::Tls => "tls",
        }
    }
}

/// The relay addresses of open TURN allocations, shared between the TURN server and the
/// media loops (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct RelayAddresses(Arc<RwLock<HashMap<SocketAddr, RelayVia>>>);

impl RelayAddresses {
    /// `addr` is now the relay of a client reaching TURN `via`.
    pub fn insert(&self, addr: SocketAddr, via: RelayVia) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr, via);
    }

    /// `addr` is no relay any more.
    pub fn remove(&self, addr: &SocketAddr) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(addr);
    }

    /// How the client behind relay `addr` reaches TURN, if `addr` is a relay.
    pub fn get(&self, addr: &SocketAddr) -> Option<RelayVia> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(addr)
            .copied()
    }
}
