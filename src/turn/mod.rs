//! The embedded TURN server (RFC 8656) for clients whose network lets nothing through but
//! TCP or TLS to one port (`[turn]`): UDP, TCP and TLS listeners, short-lived credentials
//! derived from the LiveKit secret (`credentials.rs`), handed to each participant in
//! `JoinResponse.ice_servers`.
//!
//! It relays **only** to Conclave's own media addresses (`rtc.node_ips` × `rtc.udp_port`):
//! a CreatePermission, ChannelBind or Send naming any other address is refused (403) or
//! dropped, and datagrams reaching a relay from anywhere else are dropped. It is never an
//! open relay. Each allocation is a real UDP socket on a node IP; the SFU sees its client's
//! media come from that socket like any other UDP peer, so TURN needs nothing of the media
//! loops, and [`RelayAddresses`] tells the operator view which peers are relays.
//!
//! Hostile clients: nothing is kept for an unauthenticated request (nonces are stateless);
//! stream connections must send a message within [`FIRST_MESSAGE_TIMEOUT`], stay under
//! [`MAX_FRAME`] and not stay silent for [`IDLE_TIMEOUT`]; at most [`MAX_CONNECTIONS`] stream
//! connections and `turn.max_allocations` allocations exist at once, at most
//! [`MAX_ALLOCATIONS_PER_CREDENTIAL`] of them with one credential.

pub mod credentials;
pub mod message;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use livekit_protocol as lk;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, Notify};
use tracing::Instrument;

pub use crate::sfu::{RelayAddresses, RelayVia};
use credentials::{Credentials, Refusal, REALM};
use message::{attr, Builder, Class, Message};

/// The longest message accepted on a stream (TCP/TLS): media packets fit a 1500-byte MTU,
/// plus the ChannelData or Send framing.
pub const MAX_FRAME: usize = 4096;
/// A stream connection must send its first message within this (also the TLS handshake).
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream connection silent this long is closed (ICE consent checks cross it every 5 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A write to a client that cannot complete this long closes its connection.
pub const WRITE_STALL: Duration = Duration::from_secs(5);
/// The most TCP and TLS connections held at once; more are closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 4096;
/// Allocation lifetime when the client asks for none or less (RFC 8656 §7.2).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// The longest allocation lifetime granted.
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// Permissions last this long unless refreshed (RFC 8656 §9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel bindings last this long unless refreshed (RFC 8656 §12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// The most allocations one credential may hold at once (a browser makes one per TURN URL
/// and network interface: a handful); more are refused with 486, so a leaked credential
/// cannot take the whole `turn.max_allocations`.
pub const MAX_ALLOCATIONS_PER_CREDENTIAL: usize = 16;
/// Messages queued for one stream client; more are dropped (like a full UDP socket).
const WRITE_QUEUE: usize = 512;
/// The IANA protocol number of UDP, the only relay transport (REQUESTED-TRANSPORT).
const UDP_PROTOCOL: u8 = 17;

/// Why the TURN server could not start.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// A listener could not be bound.
    #[error("cannot bind TURN {proto} listener {addr}: {source}")]
    Bind {
        /// "udp", "tcp" or "tls".
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be read or used.
    #[error("TURN TLS: {0}")]
    Tls(String),
}

/// What [`start`] needs.
#[derive(Debug, Clone)]
pub struct TurnSettings {
    /// UDP listen addresses (empty: no TURN over UDP).
    pub udp: Vec<SocketAddr>,
    /// TCP listen addresses.
    pub tcp: Vec<SocketAddr>,
    /// TLS listen addresses (need `tls`).
    pub tls: Vec<SocketAddr>,
    /// The TLS server configuration (certificate and key), when `tls` is not empty.
    pub tls_config: Option<Arc<rustls::ServerConfig>>,
    /// The IP relay sockets are bound on (a node IP: the SFU's media socket is reached from
    /// it on this host).
    pub relay_ip: IpAddr,
    /// The only peers allocations may reach: the SFU's UDP media addresses.
    pub media: Vec<SocketAddr>,
    /// The most allocations at once (then 486 Allocation Quota Reached).
    pub max_allocations: usize,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct TurnStats {
    /// Allocations open now.
    pub allocations: AtomicUsize,
    /// Allocations granted since start.
    pub allocations_total: AtomicU64,
    /// Requests refused for missing, wrong or expired credentials (401, 441).
    pub refused_auth: AtomicU64,
    /// Permissions, channel bindings and sends refused for naming an address that is not
    /// Conclave's media address, and datagrams from such addresses dropped at a relay.
    pub refused_peer: AtomicU64,
    /// Packets relayed from clients to the SFU.
    pub to_media: AtomicU64,
    /// Packets relayed from the SFU to clients.
    pub to_clients: AtomicU64,
    /// TCP and TLS connections open now.
    pub connections: AtomicUsize,
    /// Datagrams and connections dropped for not being TURN, oversized, silent or refused at
    /// the connection limit.
    pub dropped_bad: AtomicU64,
}

impl TurnStats {
    /// Prometheus text.
    pub fn render(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, kind, help, v) in [
            (
                "conclave_turn_allocations",
                "gauge",
                "TURN allocations open.",
                self.allocations.load(Ordering::Relaxed) as u64,
            ),
            (
                "conclave_turn_allocations_total",
                "counter",
                "TURN allocations granted.",
                load(&self.allocations_total),
            ),
            (
                "conclave_turn_refused_auth_total",
                "counter",
                "TURN requests refused for missing, wrong or expired credentials.",
                load(&self.refused_auth),
            ),
            (
                "conclave_turn_refused_peer_total",
                "counter",
                "TURN permissions, bindings, sends and inbound datagrams refused for an address that is not Conclave's media address.",
                load(&self.refused_peer),
            ),
            (
                "conclave_turn_relayed_to_media_total",
                "counter",
                "Packets relayed from TURN clients to the SFU.",
                load(&self.to_media),
            ),
            (
                "conclave_turn_relayed_to_clients_total",
                "counter",
                "Packets relayed from the SFU to TURN clients.",
                load(&self.to_clients),
            ),
            (
                "conclave_turn_connections",
                "gauge",
                "TURN TCP and TLS connections open.",
                self.connections.load(Ordering::Relaxed) as u64,
            ),
            (
                "conclave_turn_dropped_bad_total",
                "counter",
                "TURN datagrams and connections dropped for breaking the protocol or the limits.",
                load(&self.dropped_bad),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        }
        out
    }
}

/// A running TURN server.
#[derive(Debug, Clone)]
pub struct TurnServer {
    /// Bound UDP listeners.
    pub udp_addresses: Vec<SocketAddr>,
    /// Bound TCP listeners.
    pub tcp_addresses: Vec<SocketAddr>,
    /// Bound TLS listeners.
    pub tls_addresses: Vec<SocketAddr>,
    /// Counters.
    pub stats: Arc<TurnStats>,
}

/// The ICE servers handed to participants: fresh credentials per call.
#[derive(Debug, Clone)]
pub struct IceServers {
    credentials: Credentials,
    urls: Vec<String>,
}

impl IceServers {
    /// `urls` (`turn:host:port?transport=udp`, `turns:host:port?transport=tcp`, …) with
    /// credentials from `credentials`.
    pub fn new(credentials: Credentials, urls: Vec<String>) -> Self {
        IceServers { credentials, urls }
    }

    /// The URLs a server with these listeners offers, `host` naming it (the TLS
    /// certificate's name for `turns:`).
    pub fn urls_for(
        host: &str,
        udp: Option<u16>,
        tcp: Option<u16>,
        tls: Option<u16>,
    ) -> Vec<String> {
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => host.to_owned(),
        };
        let mut urls = Vec::new();
        if let Some(p) = udp {
            urls.push(format!("turn:{host}:{p}?transport=udp"));
        }
        if let Some(p) = tcp {
            urls.push(format!("turn:{host}:{p}?transport=tcp"));
        }
        if let Some(p) = tls {
            urls.push(format!("turns:{host}:{p}?transport=tcp"));
        }
        urls
    }

    /// One `IceServer` with a fresh credential.
    pub fn mint(&self) -> Vec<lk::IceServer> {
        let (username, credential) = self.credentials.mint(unix_now());
        vec![lk::IceServer {
            urls: self.urls.clone(),
            username,
            credential,
        }]
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Loads a PEM certificate chain and private key into a TLS server configuration.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, TurnError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TurnError::Tls(format!("certificate {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(TurnError::Tls(format!(
            "certificate {}: no certificate in it",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TurnError::Tls(format!("key {}: {e}", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TurnError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| TurnError::Tls(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Binds the listeners and starts serving on the current tokio runtime.
pub async fn start(
    settings: TurnSettings,
    credentials: Credentials,
    relays: RelayAddresses,
) -> Result<TurnServer, TurnError> {
    let stats = Arc::new(TurnStats::default());
    let shared = Arc::new(Shared::new(
        credentials,
        &settings.media,
        settings.relay_ip,
        settings.max_allocations,
        relays,
        stats.clone(),
    ));
    let mut server = TurnServer {
        udp_addresses: Vec::new(),
        tcp_addresses: Vec::new(),
        tls_addresses: Vec::new(),
        stats,
    };
    for addr in &settings.udp {
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|source| TurnError::Bind {
                proto: "udp",
                addr: *addr,
                source,
            })?;
        let local = socket.local_addr().map_err(|source| TurnError::Bind {
            proto: "udp",
            addr: *addr,
            source,
        })?;
        server.udp_addresses.push(local);
        tokio::spawn(serve_udp(shared.clone(), Arc::new(socket), local));
    }
    let tls = settings
        .tls_config
        .clone()
        .map(tokio_rustls::TlsAcceptor::from);
    for (addrs, via, out) in [
        (&settings.tcp, RelayVia::Tcp, &mut server.tcp_addresses),
        (&settings.tls, RelayVia::Tls, &mut server.tls_addresses),
    ] {
        for addr in addrs {
            let proto = if via == RelayVia::Tls { "tls" } else { "tcp" };
            let bind_err = |source| TurnError::Bind {
                proto,
                addr: *addr,
                source,
            };
            let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
            let local = listener.local_addr().map_err(bind_err)?;
            out.push(local);
            let acceptor = match via {
                RelayVia::Tls => Some(tls.clone().ok_or_else(|| {
                    TurnError::Tls("a TLS listener without a certificate".into())
                })?),
                _ => None,
            };
            tokio::spawn(serve_tcp(shared.clone(), listener, local, acceptor));
        }
    }
    tracing::info!(
        udp = ?server.udp_addresses,
        tcp = ?server.tcp_addresses,
        tls = ?server.tls_addresses,
        media = ?settings.media,
        "TURN server listening"
    );
    Ok(server)
}

/// One client of the server: its transport and 5-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ClientKey {
    via: RelayVia,
    local: SocketAddr,
    remote: SocketAddr,
}

/// Where a client's messages go.
#[derive(Debug, Clone)]
enum Sink {
    Udp(Arc<UdpSocket>, SocketAddr),
    Stream(mpsc::Sender<Vec<u8>>),
}

impl Sink {
    fn send(&self, bytes: Vec<u8>) {
        match self {
            Sink::Udp(socket, to) => {
                let _ = socket.try_send_to(&bytes, *to);
            }
            Sink::Stream(tx) => {
                let _ = tx.try_send(bytes);
            }
        }
    }

    fn pads(&self) -> bool {
        matches!(self, Sink::Stream(_))
    }
}

#[derive(Debug)]
struct Allocation {
    username: String,
    integrity: [u8; 16],
    relay: Arc<UdpSocket>,
    relay_addr: SocketAddr,
    sink: Sink,
    state: Mutex<AllocationState>,
    ended: Notify,
}

#[derive(Debug)]
struct AllocationState {
    expires: Instant,
    /// The Allocate's transaction (a retransmission gets the same answer).
    transaction: [u8; 12],
    permissions: HashMap<IpAddr, Instant>,
    channels: HashMap<u16, (SocketAddr, Instant)>,
}

impl Allocation {
    fn state(&self) -> std::sync::MutexGuard<'_, AllocationState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl AllocationState {
    fn permitted(&self, peer: IpAddr, now: Instant) -> bool {
        self.permissions.get(&peer).is_some_and(|&e| e > now)
    }
}

struct Shared {
    credentials: Credentials,
    /// The only peers: the SFU's media addresses.
    media: HashSet<SocketAddr>,
    relay_ip: IpAddr,
    max_allocations: usize,
    allocations: Mutex<HashMap<ClientKey, Arc<Allocation>>>,
    relays: RelayAddresses,
    stats: Arc<TurnStats>,
}

impl Shared {
    fn new(
        credentials: Credentials,
        media: &[SocketAddr],
        relay_ip: IpAddr,
        max_allocations: usize,
        relays: RelayAddresses,
        stats: Arc<TurnStats>,
    ) -> Self {
        Shared {
            credentials,
            media: media.iter().copied().collect(),
            relay_ip,
            max_allocations,
            allocations: Mutex::new(HashMap::new()),
            relays,
            stats,
        }
    }

    /// Whether `ip` is the IP of one of the media addresses (permissions are per IP).
    fn is_media_ip(&self, ip: IpAddr) -> bool {
        self.media.iter().any(|a| a.ip() == ip)
    }
}

/// What a message from a client asks of its connection.
enum Verdict {
    /// Carry on (a reply, if any, was sent).
    Ok,
    /// Not TURN: a stream connection is closed, a datagram dropped.
    Bad,
}

impl Shared {
    fn allocation(&self, key: &ClientKey) -> Option<Arc<Allocation>> {
        self.allocations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Ends `key`'s allocation, if any (its relay task stops and unregisters it).
    fn end(&self, key: &ClientKey) {
        let removed = self
            .allocations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
        if let Some(a) = removed {
            self.relays.remove(&a.relay_addr);
            self.stats.allocations.fetch_sub(1, Ordering::Relaxed);
            a.ended.notify_one();
        }
    }

    /// Handles one message (STUN or ChannelData) from `key`.
    fn handle(self: &Arc<Self>, key: ClientKey, sink: &Sink, bytes: &[u8]) -> Verdict {
        let now = Instant::now();
        if bytes.first().is_some_and(|b| b >> 6 == 1) {
            let Some((channel, data)) = message::parse_channel_data(bytes) else {
                return Verdict::Bad;
            };
            if let Some(a) = self.allocation(&key) {
                let peer = {
                    let s = a.state();
                    s.channels
                        .get(&channel)
                        .filter(|(peer, e)| *e > now && s.permitted(peer.ip(), now))
                        .map(|(peer, _)| *peer)
                };
                if let Some(peer) = peer {
                    self.relay_out(&a, peer, data);
                }
            }
            return Verdict::Ok;
        }
        let Ok(m) = Message::parse(bytes) else {
            return Verdict::Bad;
        };
        match m.class {
            Class::Request => {
                let reply = self.request(key, sink, &m, now);
                sink.send(reply);
            }
            Class::Indication if m.method == message::SEND => self.send_indication(key, &m, now),
            // Responses and other indications: nothing to do.
            _ => {}
        }
        Verdict::Ok
    }

    fn relay_out(&self, a: &Allocation, peer: SocketAddr, data: &[u8]) {
        // Permissions are only ever installed for media IPs; the exact address is checked
        // again here (a media IP with another port is not Conclave's).
        if !self.media.contains(&peer) {
            self.stats.refused_peer.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if a.relay.try_send_to(data, peer).is_ok() {
            self.stats.to_media.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn send_indication(&self, key: ClientKey, m: &Message<'_>, now: Instant) {
        let Some(a) = self.allocation(&key) else {
            return;
        };
        let (Some(peers), Some(data)) =
            (m.xor_addresses(attr::XOR_PEER_ADDRESS), m.get(attr::DATA))
        else {
            return;
        };
        let Some(&peer) = peers.first() else {
            return;
        };
        if !a.state().permitted(peer.ip(), now) {
            self.stats.refused_peer.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.relay_out(&a, peer, data);
    }

    fn request(
        self: &Arc<Self>,
        key: ClientKey,
        sink: &Sink,
        m: &Message<'_>,
        now: Instant,
    ) -> Vec<u8> {
        let error = |code: u16, reason: &str| {
            Builder::new(m.method, Class::Error, m.transaction)
                .error(code, reason)
                .finish()
        };
        let unknown = m.unknown_required();
        if !unknown.is_empty() {
            let list: Vec<u8> = unknown.iter().flat_map(|t| t.to_be_bytes()).collect();
            return Builder::new(m.method, Class::Error, m.transaction)
                .error(420, "Unknown Attribute")
                .attr(attr::UNKNOWN_ATTRIBUTES, &list)
                .finish();
        }
        if m.method == message::BINDING {
            return Builder::new(m.method, Class::Success, m.transaction)
                .xor_address(attr::XOR_MAPPED_ADDRESS, key.remote)
                .finish();
        }
        if ![
            message::ALLOCATE,
            message::REFRESH,
            message::CREATE_PERMISSION,
            message::CHANNEL_BIND,
        ]
        .contains(&m.method)
        {
            return error(400, "Bad Request");
        }
        let existing = self.allocation(&key);
        if m.method != message::ALLOCATE && existing.is_none() {
            return error(437, "Allocation Mismatch");
        }
        let integrity = match self.authenticate(key, m, existing.as_deref()) {
            Ok(k) => k,
            Err(reply) => return reply,
        };
        let ok = || Builder::new(m.method, Class::Success, m.transaction);
        match (m.method, existing) {
            (message::ALLOCATE, Some(a)) => {
                if a.state().transaction != m.transaction {
                    return error(437, "Allocation Mismatch");
                }
                let lifetime = a.state().expires.saturating_duration_since(now);
                ok().xor_address(attr::XOR_RELAYED_ADDRESS, a.relay_addr)
                    .u32(attr::LIFETIME, lifetime.as_secs() as u32)
                    .xor_address(attr::XOR_MAPPED_ADDRESS, key.remote)
                    .integrity(&integrity)
                    .finish()
            }
            (message::ALLOCATE, None) => {
                match m.get(attr::REQUESTED_TRANSPORT).and_then(|v| v.first()) {
                    Some(&UDP_PROTOCOL) => {}
                    Some(_) => return error(442, "Unsupported Transport Protocol"),
                    None => return error(400, "Bad Request"),
                }
                if let Some(family) = m
                    .get(attr::REQUESTED_ADDRESS_FAMILY)
                    .and_then(|v| v.first())
                {
                    let ours = if self.relay_ip.is_ipv4() { 1 } else { 2 };
                    if *family != ours {
                        return error(440, "Address Family not Supported");
                    }
                }
                let lifetime = lifetime(m.u32(attr::LIFETIME));
                let Some(username) = m.text(attr::USERNAME) else {
                    return error(400, "Bad Request");
                };
                match self.allocate(key, sink, username, integrity, lifetime, m.transaction, now) {
                    Ok(relay_addr) => ok()
                        .xor_address(attr::XOR_RELAYED_ADDRESS, relay_addr)
                        .u32(attr::LIFETIME, lifetime.as_secs() as u32)
                        .xor_address(attr::XOR_MAPPED_ADDRESS, key.remote)
                        .integrity(&integrity)
                        .finish(),
                    Err((code, reason)) => error(code, reason),
                }
            }
            (message::REFRESH, Some(a)) => {
                let requested = m.u32(attr::LIFETIME);
                let granted = if requested == Some(0) {
                    self.end(&key);
                    Duration::ZERO
                } else {
                    let l = lifetime(requested);
                    a.state().expires = now + l;
                    l
                };
                ok().u32(attr::LIFETIME, granted.as_secs() as u32)
                    .integrity(&integrity)
                    .finish()
            }
            (message::CREATE_PERMISSION, Some(a)) => {
                let Some(peers) = m
                    .xor_addresses(attr::XOR_PEER_ADDRESS)
                    .filter(|p| !p.is_empty())
                else {
                    return error(400, "Bad Request");
                };
                if peers.iter().any(|p| !self.is_media_ip(p.ip())) {
                    self.stats.refused_peer.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(?peers, "TURN permission to a foreign address refused");
                    return error(403, "Forbidden");
                }
                let mut s = a.state();
                for p in peers {
                    s.permissions.insert(p.ip(), now + PERMISSION_LIFETIME);
                }
                drop(s);
                ok().integrity(&integrity).finish()
            }
            (message::CHANNEL_BIND, Some(a)) => {
                let channel = m
                    .get(attr::CHANNEL_NUMBER)
                    .and_then(|v| Some(u16::from_be_bytes([*v.first()?, *v.get(1)?])))
                    .filter(|c| (message::CHANNEL_MIN..=message::CHANNEL_MAX).contains(c));
                let peer = m
                    .xor_addresses(attr::XOR_PEER_ADDRESS)
                    .and_then(|p| (p.len() == 1).then(|| p[0]));
                let (Some(channel), Some(peer)) = (channel, peer) else {
                    return error(400, "Bad Request");
                };
                if !self.media.contains(&peer) {
                    self.stats.refused_peer.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "TURN channel to a foreign address refused");
                    return error(403, "Forbidden");
                }
                let mut s = a.state();
                let taken = s.channels.get(&channel).is_some_and(|(p, _)| *p != peer)
                    || s.channels
                        .iter()
                        .any(|(c, (p, _))| *p == peer && *c != channel);
                if taken {
                    return error(400, "Bad Request");
                }
                s.channels.insert(channel, (peer, now + CHANNEL_LIFETIME));
                s.permissions.insert(peer.ip(), now + PERMISSION_LIFETIME);
                drop(s);
                ok().integrity(&integrity).finish()
            }
            _ => error(437, "Allocation Mismatch"),
        }
    }

    /// Checks the long-term credential of a request (RFC 8489 §9.2): the key to sign the
    /// answer with, or the error answer.
    fn authenticate(
        &self,
        key: ClientKey,
        m: &Message<'_>,
        allocation: Option<&Allocation>,
    ) -> Result<[u8; 16], Vec<u8>> {
        let unix = unix_now();
        let challenge = |code: u16, reason: &str| {
            Builder::new(m.method, Class::Error, m.transaction)
                .error(code, reason)
                .attr(attr::REALM, REALM.as_bytes())
                .attr(
                    attr::NONCE,
                    self.credentials.nonce(key.remote.ip(), unix).as_bytes(),
                )
                .finish()
        };
        if !m.has_integrity() {
            // The first request of every client: not a refusal yet.
            return Err(challenge(401, "Unauthorized"));
        }
        let (Some(username), Some(realm), Some(nonce)) = (
            m.text(attr::USERNAME),
            m.text(attr::REALM),
            m.text(attr::NONCE),
        ) else {
            return Err(Builder::new(m.method, Class::Error, m.transaction)
                .error(400, "Bad Request")
                .finish());
        };
        if !self.credentials.nonce_ok(nonce, key.remote.ip(), unix) {
            return Err(challenge(438, "Stale Nonce"));
        }
        let refuse = |code, reason| {
            self.stats.refused_auth.fetch_add(1, Ordering::Relaxed);
            Err(challenge(code, reason))
        };
        if realm != REALM {
            return refuse(401, "Unauthorized");
        }
        match allocation {
            // An allocation keeps the credential it was made with: its refreshes need not a
            // new one once the credential's time is over (a call outlives the TTL).
            Some(a) if a.username != username => {
                self.stats.refused_auth.fetch_add(1, Ordering::Relaxed);
                return Err(Builder::new(m.method, Class::Error, m.transaction)
                    .error(441, "Wrong Credentials")
                    .finish());
            }
            Some(a) => {
                if !m.integrity_ok(&a.integrity) {
                    return refuse(401, "Unauthorized");
                }
                return Ok(a.integrity);
            }
            None => {}
        }
        match self.credentials.check_username(username, unix) {
            Ok(()) => {}
            Err(Refusal::Expired) => {
                tracing::debug!(username, "TURN credential expired");
                return refuse(401, "Unauthorized");
            }
            Err(Refusal::Malformed) => return refuse(401, "Unauthorized"),
        }
        let integrity = self.credentials.integrity_key(username);
        if !m.integrity_ok(&integrity) {
            return refuse(401, "Unauthorized");
        }
        Ok(integrity)
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate(
        self: &Arc<Self>,
        key: ClientKey,
        sink: &Sink,
        username: &str,
        integrity: [u8; 16],
        lifetime: Duration,
        transaction: [u8; 12],
        now: Instant,
    ) -> Result<SocketAddr, (u16, &'static str)> {
        let mut all = self
            .allocations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if all.len() >= self.max_allocations {
            tracing::warn!(max = self.max_allocations, "TURN allocation quota reached");
            return Err((486, "Allocation Quota Reached"));
        }
        let held = all.values().filter(|a| a.username == username).count();
        if held >= MAX_ALLOCATIONS_PER_CREDENTIAL {
            tracing::warn!(username, held, "TURN allocations per credential reached");
            return Err((486, "Allocation Quota Reached"));
        }
        let relay = std::net::UdpSocket::bind(SocketAddr::new(self.relay_ip, 0))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(UdpSocket::from_std)
            .map_err(|e| {
                tracing::warn!(error = %e, "TURN relay socket could not be bound");
                (508, "Insufficient Capacity")
            })?;
        let relay_addr = relay
            .local_addr()
            .map_err(|_| (508, "Insufficient Capacity"))?;
        let a = Arc::new(Allocation {
            username: username.to_owned(),
            integrity,
            relay: Arc::new(relay),
            relay_addr,
            sink: sink.clone(),
            state: Mutex::new(AllocationState {
                expires: now + lifetime,
                transaction,
                permissions: HashMap::new(),
                channels: HashMap::new(),
            }),
            ended: Notify::new(),
        });
        all.insert(key, a.clone());
        drop(all);
        self.relays.insert(relay_addr, key.via);
        self.stats.allocations.fetch_add(1, Ordering::Relaxed);
        self.stats.allocations_total.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("turn_allocation", client = %key.remote, via = key.via.as_str(), relay = %relay_addr);
        tracing::debug!(parent: &span, "TURN allocation granted");
        tokio::spawn(self.clone().relay_in(key, a).instrument(span));
        Ok(relay_addr)
    }

    /// Reads what reaches an allocation's relay socket and hands what comes from the SFU to
    /// the client, until the allocation expires or ends.
    async fn relay_in(self: Arc<Self>, key: ClientKey, a: Arc<Allocation>) {
        let mut buf = vec![0u8; 2048];
        loop {
            let expires = a.state().expires;
            tokio::select! {
                r = a.relay.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else {
                        // A socket error is not expected to repeat; never spin on one.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let now = Instant::now();
                    let framed = {
                        let s = a.state();
                        if !self.media.contains(&from) || !s.permitted(from.ip(), now) {
                            None
                        } else {
                            let channel = s
                                .channels
                                .iter()
                                .find(|(_, (p, e))| *p == from && *e > now)
                                .map(|(c, _)| *c);
                            Some(match channel {
                                Some(c) => message::channel_data(c, &buf[..n], a.sink.pads()),
                                None => Builder::new(message::DATA, Class::Indication, rand::random())
                                    .xor_address(attr::XOR_PEER_ADDRESS, from)
                                    .attr(attr::DATA, &buf[..n])
                                    .finish(),
                            })
                        }
                    };
                    match framed {
                        Some(bytes) => {
                            self.stats.to_clients.fetch_add(1, Ordering::Relaxed);
                            a.sink.send(bytes);
                        }
                        None => {
                            self.stats.refused_peer.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                _ = tokio::time::sleep_until(expires.into()) => {
                    if a.state().expires <= Instant::now() {
                        tracing::debug!("TURN allocation expired");
                        self.end(&key);
                        return;
                    }
                }
                _ = a.ended.notified() => {
                    tracing::debug!("TURN allocation ended");
                    return;
                }
            }
        }
    }
}

fn lifetime(requested: Option<u32>) -> Duration {
    requested
        .map(|s| Duration::from_secs(u64::from(s)))
        .unwrap_or(DEFAULT_LIFETIME)
        .clamp(DEFAULT_LIFETIME, MAX_LIFETIME)
}

async fn serve_udp(shared: Arc<Shared>, socket: Arc<UdpSocket>, local: SocketAddr) {
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok((n, remote)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let key = ClientKey {
            via: RelayVia::Udp,
            local,
            remote,
        };
        let sink = Sink::Udp(socket.clone(), remote);
        if let Verdict::Bad = shared.handle(key, &sink, &buf[..n]) {
            shared.stats.dropped_bad.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn serve_tcp(
    shared: Arc<Shared>,
    listener: TcpListener,
    local: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let via = if tls.is_some() {
        RelayVia::Tls
    } else {
        RelayVia::Tcp
    };
    loop {
        let Ok((stream, remote)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if shared.stats.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            shared.stats.dropped_bad.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let _ = stream.set_nodelay(true);
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        let key = ClientKey { via, local, remote };
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let clean = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => serve_stream(&shared, key, stream).await,
                        _ => false,
                    }
                }
                None => serve_stream(&shared, key, stream).await,
            };
            if !clean {
                shared.stats.dropped_bad.fetch_add(1, Ordering::Relaxed);
            }
            shared.end(&key);
            shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Serves one TCP or TLS connection until it closes; `false` if it was closed for breaking
/// the rules (garbage, oversized, silent, stalled).
async fn serve_stream<S>(shared: &Arc<Shared>, key: ClientKey, stream: S) -> bool
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    let writer_task = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            match tokio::time::timeout(WRITE_STALL, writer.write_all(&bytes)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        let _ = writer.shutdown().await;
    });
    let sink = Sink::Stream(tx);
    let mut buf = vec![0u8; MAX_FRAME];
    let mut timeout = FIRST_MESSAGE_TIMEOUT;
    let clean = loop {
        if writer_task.is_finished() {
            break false;
        }
        match tokio::time::timeout(timeout, reader.read_exact(&mut buf[..4])).await {
            Ok(Ok(_)) => {}
            // End of stream between messages: a clean close.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break true,
            _ => break false,
        }
        let Some(len) = message::stream_frame_len(&buf[..4]).filter(|l| *l <= MAX_FRAME) else {
            break false;
        };
        match tokio::time::timeout(IDLE_TIMEOUT, reader.read_exact(&mut buf[4..len])).await {
            Ok(Ok(_)) => {}
            _ => break false,
        }
        // ChannelData over a stream is padded; the parser takes it with its padding.
        if let Verdict::Bad = shared.handle(key, &sink, &buf[..len]) {
            break false;
        }
        timeout = IDLE_TIMEOUT;
    };
    writer_task.abort();
    clean
}

/// The request handling without listeners, for the `turn` fuzz target (`fuzz/`): one
/// stream client that first allocates, gets a permission and binds channel 0x4000 to the
/// media address 127.0.0.1:9 (discard) with a valid credential, then sends `messages`; the
/// replies are dropped. Returns whether every message was TURN. Needs a tokio runtime
/// entered (the relay socket).
#[doc(hidden)]
pub fn fuzz_messages(messages: &[&[u8]]) -> bool {
    let media: SocketAddr = ([127, 0, 0, 1], 9).into();
    let credentials = Credentials::new("fuzz secret of thirty-two characters", 600);
    let shared = Arc::new(Shared::new(
        credentials.clone(),
        &[media],
        media.ip(),
        4,
        RelayAddresses::default(),
        Arc::new(TurnStats::default()),
    ));
    let key = ClientKey {
        via: RelayVia::Tcp,
        local: ([127, 0, 0, 1], 3478).into(),
        remote: ([127, 0, 0, 2], 40000).into(),
    };
    let (tx, _rx) = mpsc::channel(WRITE_QUEUE);
    let sink = Sink::Stream(tx);
    let (username, _) = credentials.mint(unix_now());
    let nonce = credentials.nonce(key.remote.ip(), unix_now());
    let integrity = credentials.integrity_key(&username);
    let signed = |method: u16, b: fn(Builder, SocketAddr) -> Builder| {
        b(Builder::new(method, Class::Request, rand::random()), media)
            .attr(attr::USERNAME, username.as_bytes())
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, nonce.as_bytes())
            .integrity(&integrity)
            .finish()
    };
    let prefix = [
        signed(message::ALLOCATE, |b, _| {
            b.u32(attr::REQUESTED_TRANSPORT, u32::from(UDP_PROTOCOL) << 24)
        }),
        signed(message::CREATE_PERMISSION, |b, m| {
            b.xor_address(attr::XOR_PEER_ADDRESS, m)
        }),
        signed(message::CHANNEL_BIND, |b, m| {
            b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
                .xor_address(attr::XOR_PEER_ADDRESS, m)
        }),
    ];
    for m in &prefix {
        shared.handle(key, &sink, m);
    }
    let all_turn = messages
        .iter()
        .all(|m| matches!(shared.handle(key, &sink, m), Verdict::Ok));
    shared.end(&key);
    all_turn
}

#[cfg(test)]
mod tests;
