//! The UDP loop: owns the [`Sfu`] engine and the media sockets (one port, one socket per node
//! IP), feeds it datagrams, commands and timeouts, and carries out what it outputs.
//!
//! Sends never wait: a datagram the kernel will not take now is dropped (counted), so a slow or
//! dead peer cannot block the others. Sessions get their signal messages through queues bounded
//! by messages and bytes ([`queue`]); a session that does not keep up is disconnected with
//! [`QUEUE_FULL_REASON`], never waited for.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot};

mod batch;
pub mod queue;

use crate::sfu::ids::{ParticipantIdentity, RoomName, RoomSid};
use crate::sfu::registry::{RoomOptions, RoomRegistry};
use crate::sfu::{Command, Join, Output, SessionId, Sfu, SfuConfig, SfuEvent, SignalOut};
use livekit_protocol::DisconnectReason;
pub use queue::{session_queue, Refused, SignalQueue, SignalSink};

/// Capacity of the command queue into the loop.
const COMMAND_QUEUE: usize = 4096;
/// How long a session that ends waits for the loop to take its disconnect (see
/// [`SfuHandle::hang_up`]).
const HANG_UP_WAIT: Duration = Duration::from_secs(5);
/// Why a session whose signal queue is full is disconnected: it did not take its messages in
/// time. LiveKit has no reason of its own for this; `CONNECTION_TIMEOUT` is what a client that
/// stops answering gets too, and it keeps a full queue apart from a closed signal connection
/// (`SIGNAL_CLOSE`) in webhooks (docs/decisions.md).
pub const QUEUE_FULL_REASON: DisconnectReason = DisconnectReason::ConnectionTimeout;

/// A network failure at start-up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A media socket could not be bound.
    #[error("cannot bind UDP {addr} (rtc.udp_port / rtc.node_ips): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Requests into the loop.
pub enum LoopRequest {
    /// An engine command.
    Sfu(Command),
    /// Registers a session's signal queue, then joins it.
    Open {
        /// The session.
        session: SessionId,
        /// Where its signal messages go.
        sink: SignalSink,
        /// The join.
        join: Join,
    },
    /// Creates a room unless it exists; replies whether it was created now.
    CreateRoom {
        /// Room name.
        room: RoomName,
        /// Lifetime settings.
        options: RoomOptions,
        /// Reply.
        reply: oneshot::Sender<bool>,
    },
    /// Sets a room's metadata; replies whether the room exists.
    SetRoomMetadata {
        /// Room name.
        room: RoomName,
        /// New metadata.
        metadata: String,
        /// Reply.
        reply: oneshot::Sender<bool>,
    },
    /// Deletes a room (its participants are removed); replies whether it existed.
    DeleteRoom {
        /// Room name.
        room: RoomName,
        /// Reply.
        reply: oneshot::Sender<bool>,
    },
    /// Snapshot of a room's participants.
    Participants {
        /// Room name.
        room: RoomName,
        /// Reply.
        reply: oneshot::Sender<Vec<livekit_protocol::ParticipantInfo>>,
    },
    /// The live part of a room's info (RoomService), `None` when nobody is connected.
    Room {
        /// Room name.
        room: RoomName,
        /// Reply.
        reply: oneshot::Sender<Option<livekit_protocol::Room>>,
    },
    /// A room's SID, `None` when the room does not exist.
    RoomSid {
        /// Room name.
        room: RoomName,
        /// Reply.
        reply: oneshot::Sender<Option<RoomSid>>,
    },
    /// One participant's info (RoomService), `None` when absent.
    Participant {
        /// Room name.
        room: RoomName,
        /// Identity.
        identity: ParticipantIdentity,
        /// Reply.
        reply: oneshot::Sender<Option<livekit_protocol::ParticipantInfo>>,
    },
}

/// Media-path counters, published by the loop (relaxed atomics, read by `/metrics`).
#[derive(Debug, Default)]
pub struct NetStats {
    /// Datagrams received.
    pub datagrams: AtomicU64,
    /// Dropped: unknown ufrag or address.
    pub dropped_unknown_peer: AtomicU64,
    /// Dropped: unparseable.
    pub dropped_invalid: AtomicU64,
    /// Refused by their peer connection.
    pub rejected_by_peer: AtomicU64,
    /// Datagrams the kernel would not take at once (dropped, never waited for).
    pub dropped_sends: AtomicU64,
    /// Sessions disconnected because their signal queue was full.
    pub signal_queue_full: AtomicU64,
}

impl NetStats {
    /// Prometheus text for these counters.
    pub fn render(&self) -> String {
        let rows = [
            (
                "conclave_media_datagrams_total",
                "Datagrams received on the media port.",
                &self.datagrams,
            ),
            (
                "conclave_media_dropped_unknown_peer_total",
                "Datagrams dropped: unknown ICE ufrag or source address.",
                &self.dropped_unknown_peer,
            ),
            (
                "conclave_media_dropped_invalid_total",
                "Datagrams dropped: not STUN, DTLS, RTP or RTCP.",
                &self.dropped_invalid,
            ),
            (
                "conclave_media_rejected_total",
                "Datagrams refused by their peer connection (STUN failing integrity included).",
                &self.rejected_by_peer,
            ),
            (
                "conclave_media_send_dropped_total",
                "Datagrams not sent because the socket was full.",
                &self.dropped_sends,
            ),
            (
                "conclave_signal_queue_full_total",
                "Signalling sessions disconnected because they did not take their messages in time.",
                &self.signal_queue_full,
            ),
        ];
        let mut out = String::new();
        for (name, help, v) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// Handle to the running loop, shared by signalling sessions and the admin API.
#[derive(Clone)]
pub struct SfuHandle {
    tx: mpsc::Sender<LoopRequest>,
    next_session: Arc<AtomicU64>,
    events: broadcast::Sender<SfuEvent>,
    /// The media addresses (host candidates).
    pub addresses: Arc<Vec<SocketAddr>>,
    /// Media-path counters.
    pub stats: Arc<NetStats>,
}

impl SfuHandle {
    /// A fresh session ID.
    pub fn new_session(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends a request to the loop (waits if its queue is full); false if the loop is gone.
    pub async fn send(&self, req: LoopRequest) -> bool {
        self.tx.send(req).await.is_ok()
    }

    /// Sends an engine command to the loop; false if the loop is gone.
    pub async fn command(&self, command: Command) -> bool {
        self.send(LoopRequest::Sfu(command)).await
    }

    /// Removes participant `identity` from `room` (the client is told `reason`); true if the
    /// loop got the request (whether the participant was there is not checked).
    pub async fn remove(
        &self,
        room: &RoomName,
        identity: &ParticipantIdentity,
        reason: DisconnectReason,
    ) -> bool {
        self.command(Command::Remove {
            room: room.clone(),
            identity: identity.clone(),
            reason,
        })
        .await
    }

    /// Tells the loop that `session`'s signalling ended; false if the loop is gone.
    pub async fn disconnect(&self, session: SessionId, reason: DisconnectReason) -> bool {
        self.command(Command::Disconnect { session, reason }).await
    }

    /// Ends `session` for `reason` and waits (at most a few seconds) until the loop has taken
    /// the disconnect and let go of the session's queue: until then `queue` stays open and is
    /// emptied, so a message the loop sends meanwhile neither finds a closed session (which
    /// would count as a vanished session, `SIGNAL_CLOSE`) nor a full queue, and the reason the
    /// others and the webhooks get is `reason`.
    pub async fn hang_up(
        &self,
        session: SessionId,
        reason: DisconnectReason,
        mut queue: SignalQueue,
    ) {
        if !self.disconnect(session, reason).await {
            return;
        }
        let drained = tokio::time::timeout(HANG_UP_WAIT, async {
            while let Some(out) = queue.recv().await {
                if matches!(out, SignalOut::Close) {
                    break;
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(%session, "the SFU loop did not take the disconnect in time");
        }
    }

    /// Registers `session`'s signal queue and joins it; false if the loop is gone. A refused
    /// join (room full) drops `sink`.
    pub async fn open(&self, sink: SignalSink, join: Join) -> bool {
        let session = join.session;
        self.send(LoopRequest::Open {
            session,
            sink,
            join,
        })
        .await
    }

    /// Lifecycle events (joins, leaves).
    pub fn subscribe_events(&self) -> broadcast::Receiver<SfuEvent> {
        self.events.subscribe()
    }

    /// Creates `room` unless it exists (idempotent); true if it was created now. When this
    /// returns, the registry view shows the room.
    pub async fn create_room(&self, room: &RoomName, options: RoomOptions) -> bool {
        self.ask(|reply| LoopRequest::CreateRoom {
            room: room.clone(),
            options,
            reply,
        })
        .await
        .unwrap_or(false)
    }

    /// Sets `room`'s metadata; false if the room does not exist (or the loop is gone).
    pub async fn set_room_metadata(&self, room: &RoomName, metadata: &str) -> bool {
        self.ask(|reply| LoopRequest::SetRoomMetadata {
            room: room.clone(),
            metadata: metadata.to_owned(),
            reply,
        })
        .await
        .unwrap_or(false)
    }

    /// Deletes `room` and removes its participants (`ROOM_DELETED`); false if it existed
    /// neither as a created room nor with participants (or the loop is gone).
    pub async fn delete_room(&self, room: &RoomName) -> bool {
        self.ask(|reply| LoopRequest::DeleteRoom {
            room: room.clone(),
            reply,
        })
        .await
        .unwrap_or(false)
    }

    /// Sends the request `make` builds and waits for its reply; `None` if the loop is gone.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> LoopRequest) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        if !self.send(make(reply)).await {
            return None;
        }
        rx.await.ok()
    }

    /// The participants of `room` right now.
    pub async fn participants(&self, room: &RoomName) -> Vec<livekit_protocol::ParticipantInfo> {
        let (reply, rx) = oneshot::channel();
        let req = LoopRequest::Participants {
            room: room.clone(),
            reply,
        };
        if !self.send(req).await {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// `room`'s SID (`RM_…`), the same while the room exists, with or without participants;
    /// `None` if it does not exist (or the loop is gone).
    pub async fn room_sid(&self, room: &RoomName) -> Option<RoomSid> {
        self.ask(|reply| LoopRequest::RoomSid {
            room: room.clone(),
            reply,
        })
        .await
        .flatten()
    }

    /// The live part of `room`'s info (SID, creation time, counts), if anybody is connected.
    pub async fn room_info(&self, room: &RoomName) -> Option<livekit_protocol::Room> {
        let (reply, rx) = oneshot::channel();
        let req = LoopRequest::Room {
            room: room.clone(),
            reply,
        };
        if !self.send(req).await {
            return None;
        }
        rx.await.ok().flatten()
    }

    /// Participant `identity` of `room` right now.
    pub async fn participant(
        &self,
        room: &RoomName,
        identity: &ParticipantIdentity,
    ) -> Option<livekit_protocol::ParticipantInfo> {
        let (reply, rx) = oneshot::channel();
        let req = LoopRequest::Participant {
            room: room.clone(),
            identity: identity.clone(),
            reply,
        };
        if !self.send(req).await {
            return None;
        }
        rx.await.ok().flatten()
    }
}

/// The IPs to announce when `rtc.node_ips` is empty: loopback plus the address of the default
/// route (found with a connected UDP socket; `connect` sends nothing).
pub fn default_node_ips() -> Vec<IpAddr> {
    let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") {
        // TEST-NET-1 address: only the routing table is consulted.
        if sock.connect("192.0.2.1:9").is_ok() {
            if let Ok(local) = sock.local_addr() {
                if !local.ip().is_unspecified() && !ips.contains(&local.ip()) {
                    ips.push(local.ip());
                }
            }
        }
    }
    ips
}

/// Binds the media sockets and starts the loop on the current tokio runtime.
pub fn start(
    node_ips: &[IpAddr],
    port: u16,
    registry: Arc<RoomRegistry>,
) -> Result<SfuHandle, NetError> {
    let mut sockets = Vec::new();
    for ip in node_ips {
        let addr = SocketAddr::new(*ip, port);
        let std_sock = std::net::UdpSocket::bind(addr)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|source| NetError::Bind { addr, source })?;
        let local = std_sock
            .local_addr()
            .map_err(|source| NetError::Bind { addr, source })?;
        let sock =
            UdpSocket::from_std(std_sock).map_err(|source| NetError::Bind { addr, source })?;
        sockets.push((local, sock));
    }
    let addresses: Vec<SocketAddr> = sockets.iter().map(|(a, _)| *a).collect();
    tracing::info!(?addresses, "media sockets bound");
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (events, _) = broadcast::channel(1024);
    let sfu = Sfu::new(
        SfuConfig {
            candidates: addresses.clone(),
            seed: None,
        },
        Instant::now(),
    );
    let stats = Arc::new(NetStats::default());
    let handle = SfuHandle {
        stats: stats.clone(),
        tx,
        next_session: Arc::new(AtomicU64::new(1)),
        events: events.clone(),
        addresses: Arc::new(addresses),
    };
    tokio::spawn(run(sfu, sockets, rx, registry, events, stats));
    Ok(handle)
}

struct Loop {
    sfu: Sfu,
    sockets: Vec<(SocketAddr, UdpSocket)>,
    sinks: HashMap<SessionId, SignalSink>,
    registry: Arc<RoomRegistry>,
    events: broadcast::Sender<SfuEvent>,
    dropped_sends: u64,
    stats: Arc<NetStats>,
    /// Datagrams to send, per socket (capacity kept between drains).
    pending: Vec<Vec<(SocketAddr, Vec<u8>)>>,
}

impl Loop {
    /// Sends every queued datagram, batched per socket; never waits.
    fn flush(&mut self) {
        for (i, (_, sock)) in self.sockets.iter().enumerate() {
            let Some(q) = self.pending.get_mut(i) else {
                continue;
            };
            if q.is_empty() {
                continue;
            }
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                self.dropped_sends += batch::send_batch(sock.as_raw_fd(), q) as u64;
            }
            #[cfg(not(target_os = "linux"))]
            for (dest, bytes) in q.iter() {
                if sock.try_send_to(bytes, *dest).is_err() {
                    self.dropped_sends += 1;
                }
            }
            q.clear();
        }
    }

    /// Publishes the engine's room records to the registry view if they changed.
    fn publish_rooms(&mut self) {
        if self.sfu.take_rooms_changed() {
            self.registry.publish(self.sfu.registered_rooms().cloned());
        }
    }

    /// Carries out every pending output; returns the next timeout. Sessions whose queue was
    /// full or closed are disconnected, and what that outputs is carried out too.
    fn drain(&mut self) -> Instant {
        loop {
            let (next, gone) = self.drain_outputs();
            if gone.is_empty() {
                return next;
            }
            for (session, refused) in gone {
                let reason = match refused {
                    Refused::Full => {
                        tracing::warn!(%session, "session queue full; disconnecting it");
                        self.stats.signal_queue_full.fetch_add(1, Ordering::Relaxed);
                        QUEUE_FULL_REASON
                    }
                    // Its task ended without a disconnect of its own (failed upgrade, panic):
                    // the signal connection is gone.
                    Refused::Closed => {
                        tracing::info!(%session, "session gone without a word; disconnecting it");
                        DisconnectReason::SignalClose
                    }
                };
                self.sfu
                    .handle_command(Instant::now(), Command::Disconnect { session, reason });
            }
        }
    }

    /// Carries out the pending outputs; returns the next timeout and the sessions whose queue
    /// refused a message (their sinks are dropped).
    fn drain_outputs(&mut self) -> (Instant, Vec<(SessionId, Refused)>) {
        self.publish_rooms();
        let mut gone = Vec::new();
        loop {
            match self.sfu.poll_output() {
                Output::Timeout(t) => {
                    self.flush();
                    let s = self.sfu.stats();
                    self.stats.datagrams.store(s.datagrams, Ordering::Relaxed);
                    self.stats
                        .dropped_unknown_peer
                        .store(s.dropped_unknown_peer, Ordering::Relaxed);
                    self.stats
                        .dropped_invalid
                        .store(s.dropped_invalid, Ordering::Relaxed);
                    self.stats
                        .rejected_by_peer
                        .store(s.rejected_by_peer, Ordering::Relaxed);
                    self.stats
                        .dropped_sends
                        .store(self.dropped_sends, Ordering::Relaxed);
                    return (t, gone);
                }
                Output::Transmit(t) => {
                    // Queued per socket; flushed in batches when the drain is over.
                    let idx = self
                        .sockets
                        .iter()
                        .position(|(a, _)| *a == t.source)
                        .unwrap_or(0);
                    if let Some(q) = self.pending.get_mut(idx) {
                        q.push((t.destination, t.contents));
                    }
                }
                Output::Signal(session, out) => {
                    let close = matches!(out, SignalOut::Close);
                    let refused = match self.sinks.get(&session) {
                        Some(sink) => sink.offer(out).err(),
                        None => None,
                    };
                    if close {
                        // Dropping the sink ends the session's queue after what it holds.
                        self.sinks.remove(&session);
                    } else if let Some(refused) = refused {
                        self.sinks.remove(&session);
                        gone.push((session, refused));
                    }
                }
                Output::Event(e) => {
                    let _ = self.events.send(e);
                }
            }
        }
    }

    fn request(&mut self, req: LoopRequest) {
        let now = Instant::now();
        self.sfu.set_unix_time(crate::clock::unix_secs() as i64);
        match req {
            LoopRequest::Sfu(c) => self.sfu.handle_command(now, c),
            LoopRequest::Open {
                session,
                sink,
                join,
            } => {
                // A refused join (room full) closes the session: its sink goes at once.
                self.sinks.insert(session, sink);
                self.sfu.handle_command(now, Command::Join(join));
            }
            LoopRequest::CreateRoom {
                room,
                options,
                reply,
            } => {
                let created = self.sfu.create_room(now, &room, options);
                self.publish_rooms();
                let _ = reply.send(created);
            }
            LoopRequest::SetRoomMetadata {
                room,
                metadata,
                reply,
            } => {
                let found = self.sfu.set_room_metadata(now, &room, &metadata);
                self.publish_rooms();
                let _ = reply.send(found);
            }
            LoopRequest::DeleteRoom { room, reply } => {
                let found = self.sfu.delete_room(now, &room);
                self.publish_rooms();
                let _ = reply.send(found);
            }
            LoopRequest::Participants { room, reply } => {
                let _ = reply.send(self.sfu.participants(&room));
            }
            LoopRequest::Room { room, reply } => {
                let _ = reply.send(self.sfu.room_info(&room));
            }
            LoopRequest::RoomSid { room, reply } => {
                let _ = reply.send(self.sfu.room_sid(&room));
            }
            LoopRequest::Participant {
                room,
                identity,
                reply,
            } => {
                let _ = reply.send(self.sfu.participant_info(&room, &identity));
            }
        }
    }
}

async fn run(
    sfu: Sfu,
    sockets: Vec<(SocketAddr, UdpSocket)>,
    mut rx: mpsc::Receiver<LoopRequest>,
    registry: Arc<RoomRegistry>,
    events: broadcast::Sender<SfuEvent>,
    stats: Arc<NetStats>,
) {
    let mut lp = Loop {
        pending: sockets.iter().map(|_| Vec::new()).collect(),
        stats,
        sfu,
        sockets,
        sinks: HashMap::new(),
        registry,
        events,
        dropped_sends: 0,
    };
    let mut buf = vec![0u8; 2048];
    loop {
        let timeout = lp.drain();
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(timeout));
        tokio::select! {
            req = rx.recv() => match req {
                Some(req) => lp.request(req),
                None => {
                    tracing::info!(dropped_sends = lp.dropped_sends, "SFU loop stopped");
                    return;
                }
            },
            res = recv_any(&lp.sockets, &mut buf) => {
                if let Some((n, source, local)) = res {
                    lp.sfu.handle_datagram(Instant::now(), source, local, &buf[..n]);
                }
            },
            () = sleep => {
                lp.sfu.set_unix_time(crate::clock::unix_secs() as i64);
                lp.sfu.handle_timeout(Instant::now());
            }
        }
    }
}

/// Receives one datagram from whichever socket has one.
async fn recv_any(
    sockets: &[(SocketAddr, UdpSocket)],
    buf: &mut [u8],
) -> Option<(usize, SocketAddr, SocketAddr)> {
    std::future::poll_fn(|cx| {
        for (local, sock) in sockets {
            let mut rb = ReadBuf::new(buf);
            match sock.poll_recv_from(cx, &mut rb) {
                Poll::Ready(Ok(source)) => {
                    return Poll::Ready(Some((rb.filled().len(), source, *local)));
                }
                Poll::Ready(Err(e)) => {
                    // ICMP errors (port unreachable) surface here; they are not fatal.
                    tracing::trace!(error = %e, "UDP receive error");
                    return Poll::Ready(None);
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_protocol as lk;
    use lk::signal_request::Message as Req;
    use lk::signal_response::Message as Msg;

    const WAIT: Duration = Duration::from_secs(10);

    fn loop_on_loopback() -> SfuHandle {
        start(
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            0,
            Arc::new(RoomRegistry::default()),
        )
        .expect("bind a loopback port")
    }

    fn join(session: SessionId, identity: &str) -> Join {
        Join {
            session,
            room: "room".into(),
            identity: identity.into(),
            name: identity.into(),
            metadata: String::new(),
            attributes: Default::default(),
            permission: livekit_protocol::ParticipantPermission {
                can_subscribe: true,
                can_publish: true,
                can_publish_data: true,
                can_update_metadata: true,
                ..Default::default()
            },
            auto_subscribe: true,
            client_protocol: 17,
            single_pc: false,
        }
    }

    /// Opens a session and reads its join response.
    async fn open(sfu: &SfuHandle, identity: &str) -> (SessionId, SignalQueue) {
        let session = sfu.new_session();
        let (sink, mut queue) = session_queue();
        assert!(sfu.open(sink, join(session, identity)).await);
        let first = tokio::time::timeout(WAIT, queue.recv())
            .await
            .expect("join");
        assert!(
            matches!(&first, Some(SignalOut::Message(m)) if matches!(**m, Msg::Join(_))),
            "{first:?}"
        );
        (session, queue)
    }

    /// Reads a queue to its end in the background.
    fn read_all(mut queue: SignalQueue) {
        tokio::spawn(async move { while queue.recv().await.is_some() {} });
    }

    async fn update(sfu: &SfuHandle, session: SessionId, metadata: String) {
        let message = Box::new(Req::UpdateMetadata(lk::UpdateParticipantMetadata {
            metadata,
            ..Default::default()
        }));
        assert!(sfu.command(Command::Request { session, message }).await);
    }

    /// The reason `who` left with.
    async fn left(events: &mut broadcast::Receiver<SfuEvent>, who: &str) -> DisconnectReason {
        loop {
            let event = tokio::time::timeout(WAIT, events.recv())
                .await
                .expect("in time")
                .expect("events");
            if let SfuEvent::ParticipantLeft {
                identity, reason, ..
            } = event
            {
                if identity.as_str() == who {
                    return reason;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_session_that_never_reads_is_disconnected_within_the_byte_bound() {
        let sfu = loop_on_loopback();
        let mut events = sfu.subscribe_events();
        // The observer's queue is never read, not even its join response.
        let observer = sfu.new_session();
        let (sink, mut observer_queue) = session_queue();
        assert!(sfu.open(sink, join(observer, "observer")).await);
        let (talker, talker_queue) = open(&sfu, "talker").await;
        read_all(talker_queue);
        // 200 updates of 60 kB (within the limits) would be 12 MB for the observer.
        for i in 0..200 {
            update(&sfu, talker, format!("{i:05}{}", "m".repeat(60_000))).await;
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            let queued = observer_queue.queued_bytes();
            assert!(
                queued <= queue::SESSION_QUEUE_BYTES,
                "{queued} bytes queued"
            );
        }
        assert_eq!(left(&mut events, "observer").await, QUEUE_FULL_REASON);
        assert!(observer_queue.queued_bytes() <= queue::SESSION_QUEUE_BYTES);
        // Its backlog is dropped at once, and the others stay.
        assert!(observer_queue.recv().await.is_none());
        assert_eq!(sfu.stats.signal_queue_full.load(Ordering::Relaxed), 1);
        assert!(sfu
            .participant(&"room".into(), &"talker".into())
            .await
            .is_some());
        assert!(sfu
            .participant(&"room".into(), &"observer".into())
            .await
            .is_none());
    }

    #[tokio::test]
    async fn hang_ups_keep_their_reason_and_a_vanished_session_is_no_full_queue() {
        let sfu = loop_on_loopback();
        let mut events = sfu.subscribe_events();
        let (alice, alice_queue) = open(&sfu, "alice").await;
        read_all(alice_queue);
        let (bob, bob_queue) = open(&sfu, "bob").await;
        let (_carol, carol_queue) = open(&sfu, "carol").await;
        // alice's update is queued before bob's leave: the loop sends it to bob while bob hangs
        // up (the race that made ~1 % of hang-ups `SIGNAL_CLOSE`).
        update(&sfu, alice, "hello".into()).await;
        sfu.hang_up(bob, DisconnectReason::ClientInitiated, bob_queue)
            .await;
        assert_eq!(
            left(&mut events, "bob").await,
            DisconnectReason::ClientInitiated
        );
        // A session whose task vanished without a word: a closed signal connection.
        drop(carol_queue);
        update(&sfu, alice, "again".into()).await;
        assert_eq!(
            left(&mut events, "carol").await,
            DisconnectReason::SignalClose
        );
        assert_eq!(sfu.stats.signal_queue_full.load(Ordering::Relaxed), 0);
    }
}
