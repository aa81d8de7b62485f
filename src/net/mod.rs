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
use std::sync::{Arc, PoisonError, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot};

mod batch;
pub mod queue;
pub mod tcp;

use crate::sfu::ids::{ParticipantIdentity, RoomName, RoomSid};
use crate::sfu::registry::{RoomOptions, RoomRegistry};
use crate::sfu::{Command, IpProto, Join, Output, SessionId, Sfu, SfuConfig, SfuEvent, SignalOut};
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
    /// The ICE-TCP port could not be bound.
    #[error("cannot bind TCP {addr} (rtc.tcp_port / rtc.node_ips; 0 turns ICE-TCP off): {source}")]
    BindTcp {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A media loop thread could not be started.
    #[error("cannot start the media thread {name}: {source}")]
    Thread {
        /// The thread's name.
        name: String,
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
    /// A client resumes its participant on a new signalling connection (see
    /// [`Sfu::resume`]): on success its messages go to `sink` from now on; replies the session
    /// and the connection's epoch.
    Resume {
        /// Room name.
        room: RoomName,
        /// Identity.
        identity: ParticipantIdentity,
        /// The participant SID the client names.
        sid: String,
        /// TURN servers with fresh credentials for the reconnect response.
        ice_servers: Vec<livekit_protocol::IceServer>,
        /// Where its signal messages go.
        sink: SignalSink,
        /// Reply.
        reply: oneshot::Sender<Option<(SessionId, u32)>>,
    },
    /// How many sessions (participants) the loop holds.
    Sessions {
        /// Reply.
        reply: oneshot::Sender<usize>,
    },
    /// How each participant of a room reaches the SFU ("udp", "tcp"), by identity.
    Transports {
        /// Room name.
        room: RoomName,
        /// Reply.
        reply: oneshot::Sender<HashMap<String, String>>,
    },
    /// What each cascade relay of a room was sent, per track ([`Sfu::relayed`]).
    Relayed {
        /// Room name.
        room: RoomName,
        /// Reply.
        reply: oneshot::Sender<HashMap<String, Vec<crate::sfu::RelayedTrack>>>,
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

/// One loop thread's counters, published by the loop (relaxed atomics, read by `/metrics`).
#[derive(Debug, Default)]
pub struct LoopStats {
    /// Datagrams handed to this loop's engine.
    pub datagrams: AtomicU64,
    /// Dropped by this loop's engine: unknown ufrag or address.
    pub dropped_unknown_peer: AtomicU64,
    /// Dropped by this loop's engine: unparseable.
    pub dropped_invalid: AtomicU64,
    /// Refused by their peer connection.
    pub rejected_by_peer: AtomicU64,
    /// Datagrams the kernel would not take at once (dropped, never waited for).
    pub dropped_sends: AtomicU64,
    /// NACKs received from subscribers.
    pub nacks_received: AtomicU64,
    /// Participants polled (each poll drains its peer connections).
    pub participant_polls: AtomicU64,
    /// Video down-tracks paused for lack of downlink bandwidth.
    pub bandwidth_pauses: AtomicU64,
    /// Video down-tracks stepped down a layer for lack of downlink bandwidth.
    pub bandwidth_downgrades: AtomicU64,
    /// Peer connections connected over UDP.
    pub connected_udp: AtomicU64,
    /// Peer connections connected over ICE-TCP.
    pub connected_tcp: AtomicU64,
    /// Peer connections connected through the TURN relay: client over UDP, TCP, TLS.
    pub connected_turn: [AtomicU64; 3],
    /// RTP packets sent to peer Conclaves' relays.
    pub relayed_packets: AtomicU64,
    /// Their payload bytes.
    pub relayed_bytes: AtomicU64,
    /// Nanoseconds the loop spent working (not waiting for input).
    pub busy_nanos: AtomicU64,
    /// Requests and datagrams waiting for the loop (gauge, sampled once per wake-up).
    pub queue_depth: AtomicU64,
    /// Rooms the loop owns (gauge).
    pub rooms: AtomicU64,
}

/// Media-path counters: per loop thread, the receiver's (with more than one loop) and the
/// signal queues'.
#[derive(Debug)]
pub struct NetStats {
    /// Per loop thread, indexed by thread.
    pub loops: Vec<LoopStats>,
    /// Datagrams the receiver could place with no loop (unknown ufrag or address).
    pub unroutable: AtomicU64,
    /// Datagrams dropped because the loop owning them had a full queue.
    pub dropped_handoff: AtomicU64,
    /// Sessions disconnected because their signal queue was full.
    pub signal_queue_full: AtomicU64,
    /// ICE-TCP connections.
    pub tcp: Arc<tcp::TcpStats>,
}

impl NetStats {
    /// Counters for `threads` loops, all zero.
    pub fn new(threads: usize) -> Self {
        Self {
            loops: (0..threads).map(|_| LoopStats::default()).collect(),
            unroutable: AtomicU64::new(0),
            dropped_handoff: AtomicU64::new(0),
            signal_queue_full: AtomicU64::new(0),
            tcp: Arc::default(),
        }
    }

    fn sum(&self, field: impl Fn(&LoopStats) -> &AtomicU64) -> u64 {
        self.loops
            .iter()
            .map(|l| field(l).load(Ordering::Relaxed))
            .sum()
    }

    /// Prometheus text for these counters: totals, then one series per loop thread.
    pub fn render(&self) -> String {
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let unroutable = load(&self.unroutable);
        let handoff = load(&self.dropped_handoff);
        let rows = [
            (
                "conclave_media_datagrams_total",
                "Datagrams received on the media port.",
                self.sum(|l| &l.datagrams) + unroutable + handoff,
            ),
            (
                "conclave_media_dropped_unknown_peer_total",
                "Datagrams dropped: unknown ICE ufrag or source address.",
                self.sum(|l| &l.dropped_unknown_peer) + unroutable,
            ),
            (
                "conclave_media_dropped_invalid_total",
                "Datagrams dropped: not STUN, DTLS, RTP or RTCP.",
                self.sum(|l| &l.dropped_invalid),
            ),
            (
                "conclave_media_rejected_total",
                "Datagrams refused by their peer connection (STUN failing integrity included).",
                self.sum(|l| &l.rejected_by_peer),
            ),
            (
                "conclave_media_send_dropped_total",
                "Datagrams not sent because the socket was full.",
                self.sum(|l| &l.dropped_sends),
            ),
            (
                "conclave_media_nacks_received_total",
                "NACKs received from subscribers (lost packets they asked to be resent).",
                self.sum(|l| &l.nacks_received),
            ),
            (
                "conclave_cascade_relayed_packets_total",
                "RTP packets sent to peer Conclaves' relays (each track once per peer).",
                self.sum(|l| &l.relayed_packets),
            ),
            (
                "conclave_cascade_relayed_bytes_total",
                "Payload bytes of the RTP packets sent to peer Conclaves' relays.",
                self.sum(|l| &l.relayed_bytes),
            ),
            (
                "conclave_media_bandwidth_pauses_total",
                "Video tracks paused for a subscriber whose downlink could not carry them.",
                self.sum(|l| &l.bandwidth_pauses),
            ),
            (
                "conclave_media_bandwidth_downgrades_total",
                "Video tracks stepped down a layer for a subscriber's downlink.",
                self.sum(|l| &l.bandwidth_downgrades),
            ),
            (
                "conclave_media_handoff_dropped_total",
                "Datagrams dropped because the media loop owning them had a full queue.",
                handoff,
            ),
            (
                "conclave_signal_queue_full_total",
                "Signalling sessions disconnected because they did not take their messages in time.",
                load(&self.signal_queue_full),
            ),
            (
                "conclave_media_tcp_accepted_total",
                "ICE-TCP connections accepted on rtc.tcp_port.",
                load(&self.tcp.accepted),
            ),
            (
                "conclave_media_tcp_refused_total",
                "ICE-TCP connections closed at once: the connection limit was reached.",
                load(&self.tcp.refused_full),
            ),
            (
                "conclave_media_tcp_closed_idle_total",
                "ICE-TCP connections closed for silence or for not reading (clients gone or on another path).",
                load(&self.tcp.closed_idle),
            ),
            (
                "conclave_media_tcp_closed_bad_total",
                "ICE-TCP connections closed for breaking the rules (no STUN first, oversized frame, failed ICE).",
                load(&self.tcp.closed_bad),
            ),
        ];
        let mut out = String::new();
        for (name, help, v) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        }
        let name = "conclave_media_connections_total";
        out.push_str(&format!(
            "# HELP {name} Peer connections connected, by the transport they use.\n# TYPE {name} counter\n{name}{{transport=\"udp\"}} {}\n{name}{{transport=\"tcp\"}} {}\n{name}{{transport=\"turn/udp\"}} {}\n{name}{{transport=\"turn/tcp\"}} {}\n{name}{{transport=\"turn/tls\"}} {}\n",
            self.sum(|l| &l.connected_udp),
            self.sum(|l| &l.connected_tcp),
            self.sum(|l| &l.connected_turn[0]),
            self.sum(|l| &l.connected_turn[1]),
            self.sum(|l| &l.connected_turn[2]),
        ));
        let name = "conclave_media_tcp_connections";
        out.push_str(&format!(
            "# HELP {name} ICE-TCP connections open.\n# TYPE {name} gauge\n{name} {}\n",
            self.tcp.open.load(Ordering::Relaxed)
        ));
        let per_loop: [PerLoopMetric; 5] = [
            (
                "conclave_loop_busy_seconds_total",
                "counter",
                "Seconds the media loop thread spent working (not waiting for input).",
                |l| format!("{:.6}", l.busy_nanos.load(Ordering::Relaxed) as f64 / 1e9),
            ),
            (
                "conclave_loop_datagrams_total",
                "counter",
                "Datagrams handed to the media loop thread.",
                |l| l.datagrams.load(Ordering::Relaxed).to_string(),
            ),
            (
                "conclave_loop_participant_polls_total",
                "counter",
                "Participants whose peer connections the media loop thread polled.",
                |l| l.participant_polls.load(Ordering::Relaxed).to_string(),
            ),
            (
                "conclave_loop_queue_depth",
                "gauge",
                "Requests and datagrams waiting for the media loop thread.",
                |l| l.queue_depth.load(Ordering::Relaxed).to_string(),
            ),
            (
                "conclave_loop_rooms",
                "gauge",
                "Rooms owned by the media loop thread.",
                |l| l.rooms.load(Ordering::Relaxed).to_string(),
            ),
        ];
        for (name, kind, help, value) in per_loop {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (i, l) in self.loops.iter().enumerate() {
                out.push_str(&format!("{name}{{thread=\"{i}\"}} {}\n", value(l)));
            }
        }
        out
    }
}

/// A per-loop series: name, type, help and how to read it.
type PerLoopMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&LoopStats) -> String,
);

/// The loop thread that owns `room` among `threads`: a stable hash of its name (FNV-1a), so
/// every request about a room, and every session in it, reaches the same loop without a
/// shared table (docs/decisions.md "Rooms pinned to media loop threads").
pub fn loop_of_room(room: &str, threads: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % threads.max(1) as u64) as usize
}

/// The loop thread a session belongs to: sessions are numbered so that the remainder is the
/// loop of their room ([`SfuHandle::new_session`]).
fn loop_of_session(session: SessionId, threads: usize) -> usize {
    (session.0 % threads.max(1) as u64) as usize
}

/// The loop a request goes to: the one owning its room, or its session's.
fn loop_of_request(req: &LoopRequest, threads: usize) -> usize {
    let room = |r: &RoomName| loop_of_room(r.as_str(), threads);
    match req {
        LoopRequest::Sfu(c) => match c {
            Command::Join(j) => room(&j.room),
            Command::Request { session, .. } | Command::Disconnect { session, .. } => {
                loop_of_session(*session, threads)
            }
            Command::Remove { room: r, .. }
            | Command::MuteTrack { room: r, .. }
            | Command::UpdateParticipant { room: r, .. }
            | Command::UpdateSubscriptions { room: r, .. }
            | Command::SendData { room: r, .. }
            | Command::UpdateRoom { room: r, .. }
            | Command::DeleteRoom { room: r, .. } => room(r),
            // For every loop: `SfuHandle::shut_down` sends it to each.
            Command::Shutdown => 0,
        },
        LoopRequest::Open { join, .. } => room(&join.room),
        // Asked of every loop by `SfuHandle::shut_down`.
        LoopRequest::Sessions { .. } => 0,
        LoopRequest::CreateRoom { room: r, .. }
        | LoopRequest::SetRoomMetadata { room: r, .. }
        | LoopRequest::DeleteRoom { room: r, .. }
        | LoopRequest::Participants { room: r, .. }
        | LoopRequest::Resume { room: r, .. }
        | LoopRequest::Transports { room: r, .. }
        | LoopRequest::Relayed { room: r, .. }
        | LoopRequest::Room { room: r, .. }
        | LoopRequest::RoomSid { room: r, .. }
        | LoopRequest::Participant { room: r, .. } => room(r),
    }
}

/// Handle to the running loops, shared by signalling sessions and the admin API.
#[derive(Clone)]
pub struct SfuHandle {
    loops: Arc<[mpsc::Sender<LoopRequest>]>,
    next_session: Arc<AtomicU64>,
    events: broadcast::Sender<SfuEvent>,
    /// The media addresses (host candidates).
    pub addresses: Arc<Vec<SocketAddr>>,
    /// The ICE-TCP addresses (passive host candidates); empty with ICE-TCP off.
    pub tcp_addresses: Arc<Vec<SocketAddr>>,
    /// Media-path counters.
    pub stats: Arc<NetStats>,
}

impl SfuHandle {
    /// A fresh session ID for a session joining `room`: numbered so that it belongs to the
    /// loop thread owning the room. A session must join the room it was numbered for.
    pub fn new_session(&self, room: &RoomName) -> SessionId {
        let threads = self.loops.len() as u64;
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        SessionId(n * threads + self.loop_of_room(room) as u64)
    }

    /// Number of media loop threads.
    pub fn threads(&self) -> usize {
        self.loops.len()
    }

    /// The loop thread that owns `room`.
    pub fn loop_of_room(&self, room: &RoomName) -> usize {
        loop_of_room(room.as_str(), self.loops.len())
    }

    /// Sends a request to the loop that owns its room or session (waits if that loop's queue
    /// is full); false if the loop is gone.
    pub async fn send(&self, req: LoopRequest) -> bool {
        let i = loop_of_request(&req, self.loops.len());
        match self.loops.get(i) {
            Some(tx) => tx.send(req).await.is_ok(),
            None => false,
        }
    }

    /// Resumes participant `identity` (SID `sid`) of `room` on a new signalling connection
    /// whose messages go to `sink` (see [`Sfu::resume`]): the session and the connection's
    /// epoch, or `None` when there is nothing to resume (the client must rejoin).
    pub async fn resume(
        &self,
        room: &RoomName,
        identity: &ParticipantIdentity,
        sid: &str,
        ice_servers: Vec<livekit_protocol::IceServer>,
        sink: SignalSink,
    ) -> Option<(SessionId, u32)> {
        let (reply, rx) = oneshot::channel();
        let req = LoopRequest::Resume {
            room: room.clone(),
            identity: identity.clone(),
            sid: sid.to_owned(),
            ice_servers,
            sink,
            reply,
        };
        if !self.send(req).await {
            return None;
        }
        rx.await.ok().flatten()
    }

    /// Graceful shutdown of the media side: every loop tells its participants to reconnect
    /// and closes their signalling ([`Command::Shutdown`]). Returns once every loop has done
    /// so, with the participants still held (none, unless a loop is gone); the sessions then
    /// write the leave and close their WebSockets.
    pub async fn shut_down(&self) -> usize {
        let mut held = 0;
        for tx in self.loops.iter() {
            let _ = tx.send(LoopRequest::Sfu(Command::Shutdown)).await;
            let (reply, rx) = oneshot::channel();
            if tx.send(LoopRequest::Sessions { reply }).await.is_ok() {
                held += rx.await.unwrap_or(0);
            }
        }
        held
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
    pub async fn disconnect(
        &self,
        session: SessionId,
        epoch: u32,
        reason: DisconnectReason,
    ) -> bool {
        let epoch = Some(epoch);
        self.command(Command::Disconnect {
            session,
            epoch,
            reason,
        })
        .await
    }

    /// Ends `session` for `reason` and waits (at most a few seconds) until the loop has taken
    /// the disconnect and let go of the session's queue: until then `queue` stays open and is
    /// emptied, so a message the loop sends meanwhile neither finds a closed session (which
    /// would count as a vanished session, `SIGNAL_CLOSE`) nor a full queue, and the reason the
    /// others and the webhooks get is `reason`.
    pub async fn hang_up(
        &self,
        session: SessionId,
        epoch: u32,
        reason: DisconnectReason,
        mut queue: SignalQueue,
    ) {
        if !self.disconnect(session, epoch, reason).await {
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

    /// How each participant of `room` reaches the SFU: "udp" or "tcp" (both, joined by ",",
    /// for a v0 client whose two peer connections differ), by identity; absent until its
    /// peer connection is connected.
    pub async fn transports(&self, room: &RoomName) -> HashMap<String, String> {
        let (reply, rx) = oneshot::channel();
        let req = LoopRequest::Transports {
            room: room.clone(),
            reply,
        };
        if !self.send(req).await {
            return HashMap::new();
        }
        rx.await.unwrap_or_default()
    }

    /// What each cascade relay of `room` was sent, per track, by relay identity.
    pub async fn relayed(&self, room: &RoomName) -> HashMap<String, Vec<crate::sfu::RelayedTrack>> {
        let (reply, rx) = oneshot::channel();
        let req = LoopRequest::Relayed {
            room: room.clone(),
            reply,
        };
        if !self.send(req).await {
            return HashMap::new();
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

/// How long a loop keeps an address it no longer serves in the shared routing table: a sweep
/// every this often removes them (meanwhile their datagrams reach it and are dropped there).
const ROUTE_SWEEP: Duration = Duration::from_secs(10);
/// Capacity of each loop's queue of datagrams handed on by the receiver.
const DATAGRAM_QUEUE: usize = 8192;
/// Most datagrams a media loop takes in before it polls the connections they reached: what
/// is already waiting is read at once (never waiting for more), so a subscriber written to by
/// several of them is polled once (`Sfu::drain`), and their sends go out in one batch.
const RECEIVE_BATCH: usize = 32;

/// Which loop serves each peer address that passed ICE (filled by the loops, read by the
/// receiver); only used with more than one loop.
type Routes = Arc<RwLock<HashMap<SocketAddr, usize>>>;

/// What the receiver and the ICE-TCP connections hand to the loop that owns a peer
/// connection.
enum Inbound {
    /// A UDP datagram, or one frame of an ICE-TCP connection.
    Packet {
        proto: IpProto,
        source: SocketAddr,
        local: SocketAddr,
        bytes: Vec<u8>,
    },
    /// An ICE-TCP connection from `remote` to `local` (before its first frame): what the
    /// engine sends there goes to `writer`, the connection's only sender (dropping it closes
    /// the connection).
    TcpOpen {
        local: SocketAddr,
        remote: SocketAddr,
        writer: mpsc::Sender<Vec<u8>>,
    },
    /// That connection ended.
    TcpClosed {
        local: SocketAddr,
        remote: SocketAddr,
    },
}

/// An ICE-TCP connection as its loop holds it.
struct TcpPeer {
    writer: mpsc::Sender<Vec<u8>>,
    /// Its first frame passed ICE here: from then on the sweep closes it once the engine no
    /// longer knows its address (the participant left).
    verified: bool,
}

/// Binds the media sockets and starts `threads` media loops, each on its own thread (see
/// [`loop_of_room`]). With one loop, it reads the sockets itself; with more, one receiver
/// thread reads them and hands each datagram to the loop owning its peer connection (by the
/// ufrag prefix of a STUN request, else by the source address the owner learned through ICE).
/// Every loop sends on its own handle to the same sockets: one media port either way.
/// With `tcp_port`, ICE-TCP listeners on each node IP ([`tcp`], their own thread) hand
/// their connections' frames to the loops the same way. Every loop's engine is `engine`
/// with the bound addresses as candidates and the loop's ufrag prefix.
pub fn start(
    node_ips: &[IpAddr],
    port: u16,
    tcp_port: Option<u16>,
    threads: usize,
    engine: SfuConfig,
    registry: Arc<RoomRegistry>,
) -> Result<SfuHandle, NetError> {
    let threads = threads.max(1);
    let mut sockets = Vec::new();
    for ip in node_ips {
        let addr = SocketAddr::new(*ip, port);
        let sock = std::net::UdpSocket::bind(addr)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|source| NetError::Bind { addr, source })?;
        let local = sock
            .local_addr()
            .map_err(|source| NetError::Bind { addr, source })?;
        sockets.push((local, sock));
    }
    let addresses: Vec<SocketAddr> = sockets.iter().map(|(a, _)| *a).collect();
    let mut listeners = Vec::new();
    if let Some(tcp_port) = tcp_port {
        for ip in node_ips {
            let addr = SocketAddr::new(*ip, tcp_port);
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(|l| l.local_addr().map(|a| (a, l)))
                .map_err(|source| NetError::BindTcp { addr, source })?;
            listeners.push(listener);
        }
    }
    let tcp_addresses: Vec<SocketAddr> = listeners.iter().map(|(a, _)| *a).collect();
    tracing::info!(?addresses, ?tcp_addresses, threads, "media sockets bound");
    let (events, _) = broadcast::channel(1024);
    let stats = Arc::new(NetStats::new(threads));
    let routes: Routes = Arc::new(RwLock::new(HashMap::new()));
    let mut request_txs = Vec::new();
    let mut datagram_txs = Vec::new();
    let (stopped_tx, stopped_rx) = oneshot::channel::<()>();
    let mut stopped_tx = Some(stopped_tx);
    for index in 0..threads {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (dtx, drx) = mpsc::channel(DATAGRAM_QUEUE);
        request_txs.push(tx);
        datagram_txs.push(dtx.clone());
        let send_sockets = clone_sockets(&sockets)?;
        let sfu = Sfu::new(
            SfuConfig {
                candidates: addresses.clone(),
                tcp_candidates: tcp_addresses.clone(),
                ufrag_prefix: if threads > 1 {
                    format!("{index:02x}")
                } else {
                    String::new()
                },
                ..engine.clone()
            },
            Instant::now(),
        );
        let lp = Loop {
            index,
            threads,
            pending: sockets.iter().map(|_| Vec::new()).collect(),
            stats: stats.clone(),
            sfu,
            sockets: send_sockets,
            sinks: HashMap::new(),
            registry: registry.clone(),
            events: events.clone(),
            dropped_sends: 0,
            routes: routes.clone(),
            tcp: HashMap::new(),
            inbound_tx: dtx.clone(),
            mirrors: HashMap::new(),
        };
        // With one loop, it reads the sockets; with more, the receiver does (the first loop
        // to stop stops it).
        let receive = if threads == 1 {
            Some(clone_sockets(&sockets)?)
        } else {
            None
        };
        let stopped = stopped_tx.take();
        let span = tracing::info_span!("media_loop", thread = index);
        let fut = async move {
            run(lp, rx, drx, receive).await;
            drop(stopped);
        };
        spawn_thread(
            format!("conclave-media-{index}"),
            tracing::Instrument::instrument(fut, span),
        )?;
    }
    if !listeners.is_empty() {
        let (loops, tcp_stats) = (datagram_txs.clone(), stats.tcp.clone());
        spawn_thread("conclave-media-tcp".into(), async move {
            let listeners = listeners
                .into_iter()
                .filter_map(|(addr, l)| match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::error!(%addr, error = %e, "cannot listen for ICE-TCP");
                        None
                    }
                })
                .collect();
            tcp::serve(listeners, loops, tcp_stats).await;
        })?;
    }
    if threads > 1 {
        let router = Router {
            loops: datagram_txs,
            routes,
            stats: stats.clone(),
        };
        let receive = clone_sockets(&sockets)?;
        spawn_thread("conclave-media-rx".into(), async move {
            router.run(receive, stopped_rx).await;
        })?;
    }
    Ok(SfuHandle {
        stats,
        loops: request_txs.into(),
        next_session: Arc::new(AtomicU64::new(1)),
        events,
        addresses: Arc::new(addresses),
        tcp_addresses: Arc::new(tcp_addresses),
    })
}

/// Second handles to the same sockets (the same port; `dup(2)`), one per user.
fn clone_sockets(
    sockets: &[(SocketAddr, std::net::UdpSocket)],
) -> Result<Vec<(SocketAddr, std::net::UdpSocket)>, NetError> {
    sockets
        .iter()
        .map(|(addr, s)| {
            s.try_clone()
                .map(|c| (*addr, c))
                .map_err(|source| NetError::Bind {
                    addr: *addr,
                    source,
                })
        })
        .collect()
}

/// Runs `fut` on a new thread with its own single-threaded tokio runtime (timers and sockets
/// of that thread's loop only).
fn spawn_thread(
    name: String,
    fut: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NetError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| NetError::Thread {
            name: name.clone(),
            source,
        })?;
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || runtime.block_on(fut))
        .map(drop)
        .map_err(|source| NetError::Thread { name, source })
}

/// Registers std sockets with the current runtime for reading.
fn readable(sockets: Vec<(SocketAddr, std::net::UdpSocket)>) -> Vec<(SocketAddr, UdpSocket)> {
    sockets
        .into_iter()
        .filter_map(|(addr, s)| match UdpSocket::from_std(s) {
            Ok(s) => Some((addr, s)),
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot read the media socket");
                None
            }
        })
        .collect()
}

/// The receiver with more than one loop: reads the media sockets and hands each datagram to
/// the loop owning its peer connection, never waiting for one (a full queue drops it).
struct Router {
    loops: Vec<mpsc::Sender<Inbound>>,
    routes: Routes,
    stats: Arc<NetStats>,
}

impl Router {
    async fn run(
        self,
        sockets: Vec<(SocketAddr, std::net::UdpSocket)>,
        mut stopped: oneshot::Receiver<()>,
    ) {
        let sockets = readable(sockets);
        let mut buf = vec![0u8; 2048];
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                res = recv_any(&sockets, &mut buf) => {
                    if let Some((n, source, local)) = res {
                        self.route(source, local, &buf[..n]);
                    }
                }
            }
        }
    }

    /// The loop for a datagram: a STUN request names it in the prefix of our ufrag; anything
    /// else comes from an address whose loop learned it through ICE.
    fn owner(&self, source: &SocketAddr, packet: &[u8]) -> Option<usize> {
        if let Some(ufrag) = crate::sfu::stun::local_ufrag(packet) {
            return ufrag
                .get(..2)
                .and_then(|p| usize::from_str_radix(p, 16).ok())
                .filter(|i| *i < self.loops.len());
        }
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        routes.get(source).copied()
    }

    fn route(&self, source: SocketAddr, local: SocketAddr, packet: &[u8]) {
        let Some(tx) = self.owner(&source, packet).and_then(|i| self.loops.get(i)) else {
            self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let datagram = Inbound::Packet {
            proto: IpProto::Udp,
            source,
            local,
            bytes: packet.to_vec(),
        };
        if tx.try_send(datagram).is_err() {
            self.stats.dropped_handoff.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Loop {
    /// This loop's index among `threads`.
    index: usize,
    threads: usize,
    sfu: Sfu,
    /// Send handles to the media sockets.
    sockets: Vec<(SocketAddr, std::net::UdpSocket)>,
    sinks: HashMap<SessionId, SignalSink>,
    registry: Arc<RoomRegistry>,
    events: broadcast::Sender<SfuEvent>,
    dropped_sends: u64,
    stats: Arc<NetStats>,
    /// Datagrams to send, per socket (capacity kept between drains).
    pending: Vec<Vec<(SocketAddr, Vec<u8>)>>,
    routes: Routes,
    /// ICE-TCP connections by (local, remote) address.
    tcp: HashMap<(SocketAddr, SocketAddr), TcpPeer>,
    /// This loop's own inbound queue (cascade mirrors' sockets feed it).
    inbound_tx: mpsc::Sender<Inbound>,
    /// Cascade mirrors' own sockets (see [`crate::sfu::CascadeRole::Mirror`]): address and
    /// reader task, by session.
    mirrors: HashMap<SessionId, (SocketAddr, tokio::task::JoinHandle<()>)>,
}

impl Loop {
    fn stats(&self) -> Option<&LoopStats> {
        self.stats.loops.get(self.index)
    }

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
                if sock.send_to(bytes, *dest).is_err() {
                    self.dropped_sends += 1;
                }
            }
            q.clear();
        }
    }

    /// Publishes the engine's room records to the registry view if they changed.
    fn publish_rooms(&mut self) {
        if self.sfu.take_rooms_changed() {
            let rooms: Vec<_> = self.sfu.registered_rooms().cloned().collect();
            if let Some(s) = self.stats() {
                s.rooms.store(rooms.len() as u64, Ordering::Relaxed);
            }
            self.registry.publish_from(self.index, rooms);
        }
    }

    /// Takes what the receiver or an ICE-TCP connection handed on.
    fn inbound(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Packet {
                proto: IpProto::Udp,
                source,
                local,
                bytes,
            } => self.datagram(source, local, &bytes),
            Inbound::Packet {
                proto: IpProto::Tcp,
                source,
                local,
                bytes,
            } => self.tcp_frame(source, local, &bytes),
            Inbound::TcpOpen {
                local,
                remote,
                writer,
            } => {
                let peer = TcpPeer {
                    writer,
                    verified: false,
                };
                self.tcp.insert((local, remote), peer);
            }
            Inbound::TcpClosed { local, remote } => {
                self.tcp.remove(&(local, remote));
            }
        }
    }

    /// Feeds one ICE-TCP frame to the engine. A connection whose first frame did not pass
    /// ICE here is closed (its writer dropped), as is one whose peer the engine forgot.
    fn tcp_frame(&mut self, source: SocketAddr, local: SocketAddr, bytes: &[u8]) {
        self.sfu
            .handle_packet(Instant::now(), IpProto::Tcp, source, local, bytes);
        let known = self.sfu.knows_address(IpProto::Tcp, &source);
        match self.tcp.get_mut(&(local, source)) {
            Some(peer) if known => peer.verified = true,
            // Its participant left (or its peer connection went): nothing to count.
            Some(peer) if peer.verified => {
                tracing::debug!(%source, "ICE-TCP connection of a departed peer; closing it");
                self.tcp.remove(&(local, source));
            }
            Some(_) => {
                tracing::debug!(%source, "ICE-TCP connection failed ICE; closing it");
                self.tcp.remove(&(local, source));
                self.stats.tcp.closed_bad.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
    }

    /// Feeds one datagram to the engine; with several loops, an address that passed ICE here
    /// goes into the shared routes so the receiver sends its other datagrams here.
    fn datagram(&mut self, source: SocketAddr, local: SocketAddr, bytes: &[u8]) {
        self.sfu
            .handle_datagram(Instant::now(), source, local, bytes);
        if self.threads > 1
            && crate::sfu::stun::is_stun(bytes)
            && self.sfu.knows_address(IpProto::Udp, &source)
        {
            let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
            let known = routes.get(&source) == Some(&self.index);
            drop(routes);
            if !known {
                self.routes
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(source, self.index);
            }
        }
    }

    /// Binds a cascade mirror its own UDP socket on the first media address (any port), read
    /// by a task of this loop's runtime into its inbound queue, sent on like the others.
    fn bind_mirror(&mut self, session: SessionId) -> std::io::Result<SocketAddr> {
        let ip = self
            .sockets
            .first()
            .map(|(a, _)| a.ip())
            .ok_or_else(|| std::io::Error::other("no media socket"))?;
        let sock = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
        sock.set_nonblocking(true)?;
        let local = sock.local_addr()?;
        let send = sock.try_clone()?;
        let read = UdpSocket::from_std(sock)?;
        let tx = self.inbound_tx.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                match read.recv_from(&mut buf).await {
                    Ok((n, source)) => {
                        let packet = Inbound::Packet {
                            proto: IpProto::Udp,
                            source,
                            local,
                            bytes: buf[..n].to_vec(),
                        };
                        // Full: dropped, as the receiver drops (never waits).
                        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(packet) {
                            return;
                        }
                    }
                    Err(e) => tracing::trace!(error = %e, "cascade mirror socket receive error"),
                }
            }
        });
        self.sockets.push((local, send));
        self.pending.push(Vec::new());
        self.mirrors.insert(session, (local, reader));
        tracing::debug!(%session, %local, "cascade mirror socket bound");
        Ok(local)
    }

    /// Closes the sockets of cascade mirrors that left (after a flush: nothing pending).
    fn sweep_mirrors(&mut self) {
        let gone: Vec<SessionId> = self
            .mirrors
            .keys()
            .filter(|s| !self.sfu.has_session(**s))
            .copied()
            .collect();
        for session in gone {
            if let Some((local, reader)) = self.mirrors.remove(&session) {
                reader.abort();
                if let Some(i) = self.sockets.iter().position(|(a, _)| *a == local) {
                    self.sockets.remove(i);
                    self.pending.remove(i);
                }
            }
        }
    }

    /// Removes from the shared routes the addresses this loop no longer serves.
    fn sweep_routes(&mut self) {
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        let (index, sfu) = (self.index, &self.sfu);
        routes.retain(|addr, owner| *owner != index || sfu.knows_address(IpProto::Udp, addr));
    }

    /// Closes the ICE-TCP connections of peers the engine no longer knows (they left).
    fn sweep_tcp(&mut self) {
        let sfu = &self.sfu;
        self.tcp
            .retain(|(_, remote), peer| !peer.verified || sfu.knows_address(IpProto::Tcp, remote));
    }

    /// Hands a frame to its ICE-TCP connection's writer, never waiting: a full queue drops
    /// it (a peer that does not read), a closed one forgets the connection.
    fn send_tcp(&mut self, local: SocketAddr, remote: SocketAddr, contents: Vec<u8>) {
        let Some(peer) = self.tcp.get(&(local, remote)) else {
            self.dropped_sends += 1;
            return;
        };
        match peer.writer.try_send(contents) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.dropped_sends += 1,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.dropped_sends += 1;
                self.tcp.remove(&(local, remote));
            }
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
                let disconnect = Command::Disconnect {
                    session,
                    epoch: None,
                    reason,
                };
                self.sfu.handle_command(Instant::now(), disconnect);
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
                    if let Some(l) = self.stats() {
                        l.datagrams.store(s.datagrams, Ordering::Relaxed);
                        l.dropped_unknown_peer
                            .store(s.dropped_unknown_peer, Ordering::Relaxed);
                        l.dropped_invalid
                            .store(s.dropped_invalid, Ordering::Relaxed);
                        l.rejected_by_peer
                            .store(s.rejected_by_peer, Ordering::Relaxed);
                        l.dropped_sends.store(self.dropped_sends, Ordering::Relaxed);
                        l.nacks_received.store(s.nacks_received, Ordering::Relaxed);
                        l.participant_polls
                            .store(s.participant_polls, Ordering::Relaxed);
                        l.relayed_packets
                            .store(s.relayed_packets, Ordering::Relaxed);
                        l.relayed_bytes.store(s.relayed_bytes, Ordering::Relaxed);
                        l.bandwidth_pauses
                            .store(s.bandwidth_pauses, Ordering::Relaxed);
                        l.bandwidth_downgrades
                            .store(s.bandwidth_downgrades, Ordering::Relaxed);
                        l.connected_udp.store(s.connected_udp, Ordering::Relaxed);
                        l.connected_tcp.store(s.connected_tcp, Ordering::Relaxed);
                        for (stat, v) in l.connected_turn.iter().zip(s.connected_turn) {
                            stat.store(v, Ordering::Relaxed);
                        }
                    }
                    return (t, gone);
                }
                Output::Transmit(t) if t.proto == IpProto::Tcp => {
                    self.send_tcp(t.source, t.destination, t.contents);
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
                let mut join = join;
                if join.cascade == crate::sfu::CascadeRole::Mirror(None) {
                    match self.bind_mirror(session) {
                        Ok(addr) => join.cascade = crate::sfu::CascadeRole::Mirror(Some(addr)),
                        Err(e) => {
                            tracing::warn!(%session, error = %e, "no socket for a cascade mirror");
                            self.sinks.remove(&session);
                            return;
                        }
                    }
                }
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
            LoopRequest::Transports { room, reply } => {
                let _ = reply.send(self.sfu.transports(&room));
            }
            LoopRequest::Relayed { room, reply } => {
                let _ = reply.send(self.sfu.relayed(&room));
            }
            LoopRequest::Sessions { reply } => {
                let _ = reply.send(self.sfu.session_count());
            }
            LoopRequest::Resume {
                room,
                identity,
                sid,
                ice_servers,
                sink,
                reply,
            } => {
                let resumed = self.sfu.resume(now, &room, &identity, &sid, ice_servers);
                if let Some((session, _)) = resumed {
                    // The old connection's queue (if the loop still had it) ends here.
                    self.sinks.insert(session, sink);
                }
                let _ = reply.send(resumed);
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

/// Runs one media loop until its request queue closes. `receive`: the media sockets, when
/// this loop reads them itself (it is the only one); otherwise its datagrams come from the
/// receiver through `datagrams`.
async fn run(
    mut lp: Loop,
    mut rx: mpsc::Receiver<LoopRequest>,
    mut datagrams: mpsc::Receiver<Inbound>,
    receive: Option<Vec<(SocketAddr, std::net::UdpSocket)>>,
) {
    let sockets = readable(receive.unwrap_or_default());
    let mut buf = vec![0u8; 2048];
    let mut next_sweep = Instant::now() + ROUTE_SWEEP;
    let mut woke = Instant::now();
    loop {
        let mut timeout = lp.drain();
        if lp.threads > 1 || !lp.tcp.is_empty() || !lp.mirrors.is_empty() {
            if woke >= next_sweep {
                if lp.threads > 1 {
                    lp.sweep_routes();
                }
                lp.sweep_tcp();
                lp.sweep_mirrors();
                next_sweep = woke + ROUTE_SWEEP;
            }
            timeout = timeout.min(next_sweep);
        }
        if let Some(s) = lp.stats() {
            let busy = woke.elapsed().as_nanos() as u64;
            s.busy_nanos.fetch_add(busy, Ordering::Relaxed);
            s.queue_depth
                .store((rx.len() + datagrams.len()) as u64, Ordering::Relaxed);
        }
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(timeout));
        tokio::select! {
            req = rx.recv() => {
                woke = Instant::now();
                match req {
                    Some(req) => lp.request(req),
                    None => {
                        tracing::info!(dropped_sends = lp.dropped_sends, "SFU loop stopped");
                        return;
                    }
                }
            },
            Some(d) = datagrams.recv() => {
                woke = Instant::now();
                lp.inbound(d);
                for _ in 1..RECEIVE_BATCH {
                    match datagrams.try_recv() {
                        Ok(d) => lp.inbound(d),
                        Err(_) => break,
                    }
                }
            },
            res = recv_any(&sockets, &mut buf), if !sockets.is_empty() => {
                woke = Instant::now();
                if let Some((n, source, local)) = res {
                    lp.datagram(source, local, &buf[..n]);
                }
                for _ in 1..RECEIVE_BATCH {
                    match try_recv_any(&sockets, &mut buf) {
                        Some((n, source, local)) => lp.datagram(source, local, &buf[..n]),
                        None => break,
                    }
                }
            },
            () = sleep => {
                woke = Instant::now();
                lp.sfu.set_unix_time(crate::clock::unix_secs() as i64);
                lp.sfu.handle_timeout(woke);
            }
        }
    }
}

/// A datagram that is already waiting on one of the sockets, without waiting for one.
fn try_recv_any(
    sockets: &[(SocketAddr, UdpSocket)],
    buf: &mut [u8],
) -> Option<(usize, SocketAddr, SocketAddr)> {
    sockets.iter().find_map(|(local, sock)| {
        sock.try_recv_from(buf)
            .ok()
            .map(|(n, source)| (n, source, *local))
    })
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
            Some(0),
            1,
            SfuConfig {
                resume_window: Some(Duration::from_secs(30)),
                ..Default::default()
            },
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
            ice_servers: Vec::new(),
            cascade: crate::sfu::CascadeRole::None,
        }
    }

    /// Opens a session and reads its join response.
    async fn open(sfu: &SfuHandle, identity: &str) -> (SessionId, SignalQueue) {
        let session = sfu.new_session(&"room".into());
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

    /// Reads `queue` until a participant update carrying `metadata` arrives.
    async fn read_until_echo(queue: &mut SignalQueue, metadata: &str) {
        loop {
            let out = tokio::time::timeout(WAIT, queue.recv())
                .await
                .expect("the echo in time")
                .expect("the queue stays open");
            if let SignalOut::Message(m) = out {
                if let Msg::Update(u) = *m {
                    if u.participants.iter().any(|p| p.metadata == metadata) {
                        return;
                    }
                }
            }
        }
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

    /// Every request about a room, and about the sessions numbered for it, reaches the loop
    /// that owns the room: a room never spans loops.
    #[tokio::test]
    async fn requests_about_a_room_reach_the_loop_that_owns_it() {
        let threads = 3;
        let sfu = start(
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            0,
            Some(0),
            threads,
            SfuConfig::default(),
            Arc::new(RoomRegistry::default()),
        )
        .expect("bind a loopback port");
        assert_eq!(sfu.threads(), threads);
        let mut owners = std::collections::HashSet::new();
        for i in 0..30 {
            let room: RoomName = format!("room-{i}").into();
            let owner = sfu.loop_of_room(&room);
            owners.insert(owner);
            let session = sfu.new_session(&room);
            let mut join = join(session, "alice");
            join.room = room.clone();
            let identity: ParticipantIdentity = "alice".into();
            let (reply, _) = oneshot::channel();
            let requests = [
                LoopRequest::Sfu(Command::Join(join.clone())),
                LoopRequest::Open {
                    session,
                    sink: session_queue().0,
                    join,
                },
                LoopRequest::Sfu(Command::Request {
                    session,
                    message: Box::new(Req::Leave(Default::default())),
                }),
                LoopRequest::Sfu(Command::Disconnect {
                    session,
                    epoch: None,
                    reason: DisconnectReason::ClientInitiated,
                }),
                LoopRequest::Sfu(Command::Remove {
                    room: room.clone(),
                    identity: identity.clone(),
                    reason: DisconnectReason::ClientInitiated,
                }),
                LoopRequest::Sfu(Command::DeleteRoom { room: room.clone() }),
                LoopRequest::Participant {
                    room: room.clone(),
                    identity,
                    reply,
                },
            ];
            for req in &requests {
                assert_eq!(loop_of_request(req, threads), owner, "room-{i}");
            }
        }
        assert_eq!(owners.len(), threads, "rooms spread over every loop");
    }

    /// With two loops, rooms on both are served at once: each loop creates and answers for
    /// its own rooms, the registry shows them all, and STUN naming a loop that does not exist
    /// or an unknown address is dropped and counted by the receiver.
    #[tokio::test]
    async fn two_loops_serve_their_rooms_and_the_receiver_drops_what_it_cannot_place() {
        let registry = Arc::new(RoomRegistry::default());
        let sfu = start(
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            0,
            None,
            2,
            SfuConfig::default(),
            registry.clone(),
        )
        .expect("bind a loopback port");
        let first: RoomName = "east".into();
        let second: RoomName = (0..100)
            .map(|i| RoomName::from(format!("west-{i}")))
            .find(|r| sfu.loop_of_room(r) != sfu.loop_of_room(&first))
            .expect("a room on the other loop");
        for room in [&first, &second] {
            assert!(sfu.create_room(room, RoomOptions::default()).await);
            assert!(sfu.room_sid(room).await.is_some());
        }
        assert_eq!(registry.list(Instant::now()).len(), 2);
        for l in &sfu.stats.loops {
            assert_eq!(l.rooms.load(Ordering::Relaxed), 1);
        }
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let media = sfu.addresses[0];
        // Not STUN, from an address no loop knows; then STUN for loop "ff".
        probe.send_to(&[0x80; 40], media).expect("send");
        let mut stun = vec![0u8, 1, 0, 12, 0x21, 0x12, 0xA4, 0x42];
        stun.extend_from_slice(&[7; 12]);
        stun.extend_from_slice(&[0, 6, 0, 8]);
        stun.extend_from_slice(b"ffab:cde");
        probe.send_to(&stun, media).expect("send");
        let deadline = Instant::now() + WAIT;
        while sfu.stats.unroutable.load(Ordering::Relaxed) < 2 {
            assert!(Instant::now() < deadline, "the receiver counted both drops");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(sfu
            .stats
            .render()
            .contains("conclave_loop_rooms{thread=\"1\"} 1"));
    }

    #[tokio::test]
    async fn a_session_that_never_reads_is_disconnected_within_the_byte_bound() {
        let sfu = loop_on_loopback();
        let mut events = sfu.subscribe_events();
        // The observer's queue is never read, not even its join response.
        let observer = sfu.new_session(&"room".into());
        let (sink, mut observer_queue) = session_queue();
        assert!(sfu.open(sink, join(observer, "observer")).await);
        let (talker, mut talker_queue) = open(&sfu, "talker").await;
        // 200 updates of 60 kB (within the limits) would be 12 MB for the observer.
        for i in 0..200 {
            let metadata = format!("{i:05}{}", "m".repeat(60_000));
            update(&sfu, talker, metadata.clone()).await;
            // The talker keeps up: it reads up to the echo of its update. (The loop runs on
            // its own thread, so a reader left in the background can fall behind it on a
            // busy machine and fill its queue too.)
            read_until_echo(&mut talker_queue, &metadata).await;
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
        sfu.hang_up(bob, 0, DisconnectReason::ClientInitiated, bob_queue)
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
