//! The HTTP server: the accept loop that runs the router on the one HTTP port, with the
//! timeouts and connection caps that keep the port answering under load and abuse.
//!
//! Every accepted connection gets a slot from [`ConnectionLimits`]:
//!
//! * a **full** slot while fewer than `http.max_connections` connections are open and fewer
//!   than `http.max_connections_per_ip` come from the same source (IPv6 sources are grouped
//!   by `/64`);
//! * otherwise a **reserved** slot, if one of the `http.reserved_connections` is free: such a
//!   connection may idle only `http.header_timeout_secs`, serves one request, and only
//!   `/healthz` and the appservice API
//!   (`/_matrix/app/…` and the legacy unprefixed paths); anything else gets 503. Sources on
//!   loopback or private addresses (where the homeserver normally is) may use every reserved
//!   slot, others only half of them, so a flood from outside cannot take the homeserver's;
//! * otherwise the connection is answered 503 at once (if the socket takes it) and closed.
//!
//! Each connection is watched: a request head must arrive within `http.header_timeout_secs`
//! of its first byte, a connection with no request in flight is closed after
//! `http.idle_timeout_secs`, and a WebSocket upgrade must be handed over within
//! `http.ws_handshake_timeout_secs` of its request. A slot lives as long as the socket, so an
//! upgraded WebSocket keeps its slot (its own silence timeout, `rtc.signal_timeout_secs`,
//! ends it).
//!
//! On shutdown the loop stops accepting, asks every connection to finish its request and
//! close, and waits at most [`DRAIN_TIMEOUT`] for them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

use crate::config::HttpConfig;
use crate::metrics::{inc, Metrics};

/// How long shutdown waits for open connections to finish their requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What is written to a connection refused because every slot is taken.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
retry-after: 1\r\ncontent-length: 0\r\n\r\n";

/// How often a refusal or accept error is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The server's timeouts and caps (`[http]`).
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// From a request's first byte to the end of its head.
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// From a WebSocket upgrade request to the hand-over of the socket.
    pub ws_handshake_timeout: Duration,
    /// From the end of a request head to its response: the body must arrive and the handler
    /// answer within it (a body trickled byte by byte is cut off).
    pub request_timeout: Duration,
    /// Connections with a full slot, from all sources.
    pub max_connections: usize,
    /// Connections with a full slot from one source address (IPv6: one `/64`).
    pub max_connections_per_ip: usize,
    /// Slots beyond the caps, for `/healthz` and the appservice API only.
    pub reserved_connections: usize,
}

impl ServerSettings {
    /// The settings of `http`.
    pub fn from_config(http: &HttpConfig) -> Self {
        Self {
            header_timeout: Duration::from_secs(http.header_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(http.idle_timeout_secs.max(1)),
            ws_handshake_timeout: Duration::from_secs(http.ws_handshake_timeout_secs.max(1)),
            request_timeout: Duration::from_secs(http.request_timeout_secs.max(1)),
            max_connections: http.max_connections.max(1),
            max_connections_per_ip: http.max_connections_per_ip.max(1),
            reserved_connections: http.reserved_connections,
        }
    }
}

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit, where the OS
/// allows. Returns the soft and hard limits in force afterwards, if they could be read.
#[cfg(unix)]
pub fn raise_fd_limit() -> Option<(libc::rlim_t, libc::rlim_t)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes into the struct we own; no other memory is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `setrlimit` only reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Some((lim.rlim_cur, lim.rlim_max))
}

/// Which kind of slot a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// Within the caps: everything is served.
    Full,
    /// Beyond the caps: one request, `/healthz` and the appservice API only.
    Reserved,
}

#[derive(Debug, Default)]
struct Counts {
    full: usize,
    reserved: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// The connection caps: who gets a slot.
#[derive(Debug)]
pub struct ConnectionLimits {
    max: usize,
    per_ip: usize,
    reserved: usize,
    counts: Mutex<Counts>,
}

/// A taken slot; given back when dropped (with the socket).
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    kind: SlotKind,
    source: IpAddr,
}

impl Slot {
    /// The kind of slot.
    pub fn kind(&self) -> SlotKind {
        self.kind
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.limits.lock();
        match self.kind {
            SlotKind::Full => {
                c.full = c.full.saturating_sub(1);
                if let Some(n) = c.per_source.get_mut(&self.source) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        c.per_source.remove(&self.source);
                    }
                }
            }
            SlotKind::Reserved => c.reserved = c.reserved.saturating_sub(1),
        }
    }
}

/// The address a per-source count is kept for: IPv4 as is (also when mapped into IPv6),
/// IPv6 by its `/64`.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Loopback and private addresses, where a homeserver beside Conclave connects from.
fn is_local(ip: IpAddr) -> bool {
    match source_key(ip) {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

impl ConnectionLimits {
    /// Caps from `settings`.
    pub fn new(settings: &ServerSettings) -> Arc<Self> {
        Arc::new(Self {
            max: settings.max_connections,
            per_ip: settings.max_connections_per_ip,
            reserved: settings.reserved_connections,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection from `ip`, or `None` when it must be refused.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let source = source_key(ip);
        let mut c = self.lock();
        let from_source = c.per_source.get(&source).copied().unwrap_or(0);
        let kind = if c.full < self.max && from_source < self.per_ip {
            c.full += 1;
            *c.per_source.entry(source).or_insert(0) += 1;
            SlotKind::Full
        } else {
            let allowed = if is_local(ip) {
                self.reserved
            } else {
                self.reserved / 2
            };
            if c.reserved >= allowed {
                return None;
            }
            c.reserved += 1;
            SlotKind::Reserved
        };
        Some(Slot {
            limits: self.clone(),
            kind,
            source,
        })
    }

    /// Open connections: (full slots, reserved slots).
    pub fn open(&self) -> (usize, usize) {
        let c = self.lock();
        (c.full, c.reserved)
    }
}

/// What a connection is doing, for its watchdog. Changed only from the connection's own task
/// (reads, the service future and the watchdog run in it), so relaxed atomics suffice.
struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    reading_head: AtomicBool,
    /// Start of the current idle period or request head, in ms since `base`.
    since_ms: AtomicU64,
    /// Start of a WebSocket upgrade request plus one, in ms since `base`; 0 if none.
    upgrade_ms: AtomicU64,
    /// Start of the request in flight (not an upgrade) plus one, in ms since `base`; 0 if none.
    request_ms: AtomicU64,
    changed: Notify,
}

/// Why a watched connection was closed.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    Header,
    Idle,
    Handshake,
    Request,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            reading_head: AtomicBool::new(false),
            since_ms: AtomicU64::new(0),
            upgrade_ms: AtomicU64::new(0),
            request_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes arrived: when nothing is in flight they start a request head.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && !self.reading_head.load(Ordering::Relaxed)
        {
            self.since_ms.store(self.now_ms(), Ordering::Relaxed);
            self.reading_head.store(true, Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    /// A request head was read.
    fn on_request(&self, upgrade: bool) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.reading_head.store(false, Ordering::Relaxed);
        if upgrade {
            self.upgrade_ms.store(self.now_ms() + 1, Ordering::Relaxed);
        } else {
            self.request_ms.store(self.now_ms() + 1, Ordering::Relaxed);
        }
        self.changed.notify_one();
    }

    /// A response was produced (or its future dropped); `upgrading` if it switches protocols.
    fn on_response(&self, upgrading: bool) {
        if !upgrading {
            self.upgrade_ms.store(0, Ordering::Relaxed);
        }
        self.request_ms.store(0, Ordering::Relaxed);
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        self.changed.notify_one();
    }

    /// Whether a deadline has passed, else the next one (ms since `base`).
    fn check(&self, s: &ServerSettings) -> Result<Option<u64>, Expiry> {
        let now = self.now_ms();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut next: Option<u64> = None;
        let upgrade = self.upgrade_ms.load(Ordering::Relaxed);
        if upgrade > 0 {
            let at = (upgrade - 1).saturating_add(ms(s.ws_handshake_timeout));
            if now >= at {
                return Err(Expiry::Handshake);
            }
            next = Some(at);
        }
        let request = self.request_ms.load(Ordering::Relaxed);
        if request > 0 {
            let at = (request - 1).saturating_add(ms(s.request_timeout));
            if now >= at {
                return Err(Expiry::Request);
            }
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            let since = self.since_ms.load(Ordering::Relaxed);
            let (limit, why) = if self.reading_head.load(Ordering::Relaxed) {
                (s.header_timeout, Expiry::Header)
            } else {
                (s.idle_timeout, Expiry::Idle)
            };
            let at = since.saturating_add(ms(limit));
            if now >= at {
                return Err(why);
            }
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        Ok(next)
    }
}

/// Decrements the in-flight count when the response is ready or the request is dropped.
struct InFlight {
    activity: Arc<Activity>,
    upgrading: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.on_response(self.upgrading);
    }
}

/// The socket of one connection: reports reads to the watchdog and holds the slot for as
/// long as the socket lives (also after a WebSocket upgrade).
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    _slot: Slot,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether a reserved slot serves `path`: `/healthz` and the appservice API.
pub fn served_in_reserve(path: &str) -> bool {
    path == "/healthz"
        || path.starts_with("/_matrix/app/")
        || path.starts_with("/transactions/")
        || path.starts_with("/users/")
        || path.starts_with("/rooms/")
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
}

fn busy() -> Response<Body> {
    let mut r = Response::new(Body::from("server busy: too many connections\n"));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Rate-limits one kind of warning to one line per [`LOG_EVERY`], with a count.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    /// `Some(suppressed since last)` when a line may be logged now.
    fn tick(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then drains the connections.
pub async fn run(
    listener: TcpListener,
    app: Router,
    settings: ServerSettings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let settings = Arc::new(settings);
    let limits = ConnectionLimits::new(&settings);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut refusals = Throttled::default();
    let mut accept_errors = Throttled::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: the connection waits in the backlog; try again soon.
                    if let Some(more) = accept_errors.tick() {
                        tracing::error!(error = %e, suppressed = more, "accept error");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = limits.admit(peer.ip()) else {
            inc(&metrics.http_connections_refused);
            if let Some(more) = refusals.tick() {
                let (full, reserved) = limits.open();
                tracing::warn!(
                    %peer,
                    open = full,
                    reserved,
                    suppressed = more,
                    "connection refused: http.max_connections / max_connections_per_ip \
                     and the reserved slots are all taken"
                );
            }
            let _ = stream.try_write(REFUSAL);
            continue;
        };
        if slot.kind() == SlotKind::Reserved {
            inc(&metrics.http_connections_reserved);
            if let Some(more) = refusals.tick() {
                tracing::warn!(
                    %peer,
                    suppressed = more,
                    "connection caps reached; serving only /healthz and the appservice API \
                     on a reserved slot"
                );
            }
        }
        tokio::spawn(serve_connection(
            stream,
            peer,
            slot,
            app.clone(),
            settings.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    if tokio::time::timeout(DRAIN_TIMEOUT, stop_tx.closed())
        .await
        .is_err()
    {
        let (full, reserved) = limits.open();
        tracing::warn!(
            open = full + reserved,
            "connections still open after {DRAIN_TIMEOUT:?}; closing them"
        );
    }
    Ok(())
}

/// Serves one connection under its watchdog.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    app: Router,
    settings: Arc<ServerSettings>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let reserved = slot.kind() == SlotKind::Reserved;
    // A reserved slot is for one quick request: it may idle only as long as a head may take.
    let settings = if reserved {
        Arc::new(ServerSettings {
            idle_timeout: settings.idle_timeout.min(settings.header_timeout),
            ..(*settings).clone()
        })
    } else {
        settings
    };
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
        _slot: slot,
    });
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let activity = service_activity.clone();
        let app = app.clone();
        let upgrade = is_upgrade(&req);
        activity.on_request(upgrade);
        let mut guard = InFlight {
            activity,
            upgrading: false,
        };
        async move {
            if reserved && !served_in_reserve(req.uri().path()) {
                return Ok::<_, Infallible>(busy());
            }
            let response = match app.oneshot(req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            guard.upgrading = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            drop(guard);
            Ok(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(!reserved)
        .header_read_timeout(None::<Duration>);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let mut draining = *stop.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let deadline = match activity.check(&settings) {
            Ok(d) => d,
            Err(why) => {
                tracing::trace!(%peer, ?why, "closing connection: timeout");
                inc(&metrics.http_connection_timeouts);
                return;
            }
        };
        let sleep = async {
            match deadline {
                Some(ms) => {
                    let at = activity.base + Duration::from_millis(ms);
                    tokio::time::sleep_until(at.into()).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = sleep => {}
            () = activity.changed.notified() => {}
            changed = stop.changed(), if !draining => {
                draining = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max: usize, per_ip: usize, reserved: usize) -> ServerSettings {
        ServerSettings {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            ws_handshake_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(3),
            max_connections: max,
            max_connections_per_ip: per_ip,
            reserved_connections: reserved,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn caps_then_reserve_then_refusal() {
        let limits = ConnectionLimits::new(&settings(3, 2, 4));
        let a1 = limits.admit(ip("203.0.113.1")).expect("slot");
        let a2 = limits.admit(ip("203.0.113.1")).expect("slot");
        assert_eq!((a1.kind(), a2.kind()), (SlotKind::Full, SlotKind::Full));
        // Per-source cap reached: reserve.
        let a3 = limits.admit(ip("203.0.113.1")).expect("slot");
        assert_eq!(a3.kind(), SlotKind::Reserved);
        let b1 = limits.admit(ip("203.0.113.2")).expect("slot");
        assert_eq!(b1.kind(), SlotKind::Full);
        // Global cap reached; outsiders get half of the reserve (2), local sources all of it.
        let b2 = limits.admit(ip("203.0.113.2")).expect("slot");
        assert_eq!(b2.kind(), SlotKind::Reserved);
        assert!(limits.admit(ip("203.0.113.3")).is_none());
        let l1 = limits.admit(ip("127.0.0.1")).expect("slot");
        let l2 = limits.admit(ip("10.1.2.3")).expect("slot");
        assert_eq!(l1.kind(), SlotKind::Reserved);
        assert!(limits.admit(ip("127.0.0.1")).is_none());
        drop((l1, l2, a3, b2));
        assert_eq!(limits.open(), (3, 0));
        drop(a1);
        let c = limits.admit(ip("203.0.113.3")).expect("slot");
        assert_eq!(c.kind(), SlotKind::Full);
        drop((a2, b1, c));
        assert_eq!(limits.open(), (0, 0));
        assert!(limits.lock().per_source.is_empty());
    }

    #[test]
    fn ipv6_sources_are_counted_by_slash_64() {
        let limits = ConnectionLimits::new(&settings(10, 1, 0));
        let _a = limits.admit(ip("2001:db8:1:2::1")).expect("slot");
        assert!(limits.admit(ip("2001:db8:1:2::ffff")).is_none());
        assert!(limits.admit(ip("2001:db8:1:3::1")).is_some());
        let _m = limits.admit(ip("::ffff:192.0.2.1")).expect("slot");
        assert!(limits.admit(ip("192.0.2.1")).is_none());
    }

    #[test]
    fn reserve_serves_health_and_the_appservice_api_only() {
        assert!(served_in_reserve("/healthz"));
        assert!(served_in_reserve("/_matrix/app/v1/ping"));
        assert!(served_in_reserve("/_matrix/app/v1/transactions/1"));
        assert!(served_in_reserve("/transactions/1"));
        assert!(!served_in_reserve("/sfu/get"));
        assert!(!served_in_reserve("/rtc"));
        assert!(!served_in_reserve("/metrics"));
    }

    #[test]
    fn watchdog_deadlines() {
        let s = settings(1, 1, 0);
        let a = Activity::new();
        // Idle from the start: the idle deadline.
        assert_eq!(a.check(&s).expect("open"), Some(2000));
        a.on_request(false);
        assert!(
            a.check(&s)
                .expect("open")
                .is_some_and(|d| d >= 3000 && d <= 3000 + a.now_ms()),
            "a request in flight has the request deadline only"
        );
        let expired = ServerSettings {
            request_timeout: Duration::ZERO,
            ..s.clone()
        };
        assert!(matches!(a.check(&expired), Err(Expiry::Request)));
        a.on_response(false);
        assert!(a.check(&expired).is_ok(), "no request in flight any more");
        assert!(a.check(&s).expect("open").is_some_and(|d| d >= 2000));
        a.on_request(true);
        assert!(a
            .check(&s)
            .expect("open")
            .is_some_and(|d| d <= 1000 + a.now_ms()));
        a.on_response(true);
        a.since_ms.store(0, Ordering::Relaxed);
        a.upgrade_ms.store(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1010));
        assert!(matches!(a.check(&s), Err(Expiry::Handshake)));
        a.upgrade_ms.store(0, Ordering::Relaxed);
        a.on_read();
        assert!(a.check(&s).is_ok(), "a head just started");
        a.since_ms.store(0, Ordering::Relaxed);
        assert!(matches!(a.check(&s), Err(Expiry::Header)));
    }
}
