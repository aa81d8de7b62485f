//! The engine: every room, participant and peer connection of this SFU, driven by inputs.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;
use str0m::format::{CodecConfig, PayloadParams};
use str0m::media::Rid;
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpPacket;
use str0m::{Candidate, Input, Rtc};

pub use super::ids::SessionId;
use super::ids::{
    Ids, ParticipantIdentity, ParticipantSid, RoomName, RoomSid, TrackSid, PARTICIPANT_PREFIX,
    ROOM_PREFIX, TRACK_PREFIX,
};
use super::registry::RegisteredRoom;

mod admin;
mod bandwidth;
mod downtrack;
mod forward;
mod lifetime;
mod negotiate;
mod packet;
mod participant;
mod periodic;
mod red;
mod requests;
mod resume;
mod room;
mod single;
mod timers;
mod track;

use downtrack::DownTrack;
use participant::{Participant, Pc, PcKind, Transport};
use room::Room;

/// Server version reported to clients. Not `0.15.1` (client-sdk-js disables dynacast there).
const SERVER_VERSION: &str = "1.9.0";
/// LiveKit signalling protocol spoken.
const PROTOCOL: i32 = 17;
/// Most tracks one participant may publish; more `add_track`s are refused.
const MAX_TRACKS_PER_PARTICIPANT: usize = 16;
/// A participant whose peer connections never connect is dropped after this.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// Speaker detection cadence.
const SPEAKER_INTERVAL: Duration = Duration::from_millis(500);
/// Connection quality cadence.
const QUALITY_INTERVAL: Duration = Duration::from_secs(5);
/// Minimum gap between keyframe requests to one publisher track.
const KEYFRAME_THROTTLE: Duration = Duration::from_millis(500);

/// How a participant session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Departure {
    /// The client left (or its signalling ended).
    Left,
    /// The server removed it.
    Removed,
    /// A newer session of the same identity took its place: the room goes on.
    Replaced,
    /// The server is shutting down: the client is told to reconnect.
    ShutDown,
}

/// Datagram counters (exported at `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SfuStats {
    /// Datagrams handed to the engine.
    pub datagrams: u64,
    /// Dropped: unknown ICE ufrag, or from an address that never completed ICE.
    pub dropped_unknown_peer: u64,
    /// Dropped: not STUN, DTLS, RTP or RTCP.
    pub dropped_invalid: u64,
    /// Refused by the peer connection they were routed to (STUN that fails its ICE checks,
    /// e.g. a wrong MESSAGE-INTEGRITY, included).
    pub rejected_by_peer: u64,
    /// NACKs received from subscribers (packets they lost and asked to be resent; str0m
    /// resends them over RTX from its send buffer).
    pub nacks_received: u64,
    /// Video down-tracks paused because the subscriber's downlink could not carry them.
    pub bandwidth_pauses: u64,
    /// Video down-tracks moved to a lower layer because of the subscriber's downlink.
    pub bandwidth_downgrades: u64,
    /// Peer connections connected over UDP.
    pub connected_udp: u64,
    /// Peer connections connected over ICE-TCP.
    pub connected_tcp: u64,
    /// Peer connections connected through Conclave's TURN relay, by how the client reaches
    /// it: UDP, TCP, TLS.
    pub connected_turn: [u64; 3],
    /// RTP packets sent to peer Conclaves' relays ([`CascadeRole::Relay`]).
    pub relayed_packets: u64,
    /// Their payload bytes.
    pub relayed_bytes: u64,
    /// Participants polled (each poll drains its peer connections): the per-packet cost the
    /// batching of [`Sfu::drain`] cuts.
    pub participant_polls: u64,
}

/// Engine settings.
#[derive(Debug, Clone, Default)]
pub struct SfuConfig {
    /// Local UDP addresses announced as ICE host candidates.
    pub candidates: Vec<SocketAddr>,
    /// How long a participant whose signalling connection was lost is kept for the client to
    /// resume (`rtc.resume_window_secs`); `None`: no resume, a lost connection is a leave.
    pub resume_window: Option<Duration>,
    /// Local TCP addresses announced as passive ICE-TCP host candidates (RFC 6544), for
    /// clients whose network drops UDP; empty when `rtc.tcp_port` is 0.
    pub tcp_candidates: Vec<SocketAddr>,
    /// Seed for SIDs and ICE credentials (`None` = OS entropy).
    pub seed: Option<u64>,
    /// Put in front of every local ICE ufrag this engine mints (ICE characters only): the net
    /// layer's tag for the loop thread that owns the engine, so a STUN request can be routed
    /// to it before any engine has seen the sender.
    pub ufrag_prefix: String,
    /// The relay addresses of Conclave's own TURN server (`turn/`): a peer connection whose
    /// UDP peer is one of them reaches the SFU through TURN (operator view only).
    pub relays: super::RelayAddresses,
    /// What clients are told of signalling pings (`JoinResponse.ping_interval`/`ping_timeout`).
    pub ping: Ping,
    /// No downlink estimation, allocation or pacing: every subscriber gets the layers it asks
    /// for (`rtc.congestion_control = false`).
    pub congestion_control_off: bool,
}

/// How often clients ping over signalling, and after how long without an answer they take
/// the connection for dead and resume (`rtc.ping_interval_secs`, `rtc.ping_timeout_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    /// Seconds between pings.
    pub interval_secs: u32,
    /// Seconds without a pong after which the client reconnects.
    pub timeout_secs: u32,
}

impl Default for Ping {
    /// LiveKit's: every 5 s, dead after 15 s.
    fn default() -> Self {
        Ping {
            interval_secs: 5,
            timeout_secs: 15,
        }
    }
}

/// The IP protocol a packet came or goes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpProto {
    /// A UDP datagram on the media port.
    Udp,
    /// One RFC 4571 frame on an ICE-TCP connection (the net layer frames and unframes).
    Tcp,
}

impl IpProto {
    /// The name operators see (admin API, metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            IpProto::Udp => "udp",
            IpProto::Tcp => "tcp",
        }
    }
}

/// How a connected peer connection reaches the SFU (operator view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MediaPath {
    /// UDP straight to the media port.
    Udp,
    /// ICE-TCP.
    Tcp,
    /// Through Conclave's TURN relay, the client reaching it over UDP, TCP or TLS.
    Turn(super::RelayVia),
}

impl MediaPath {
    fn as_str(self) -> &'static str {
        match self {
            MediaPath::Udp => "udp",
            MediaPath::Tcp => "tcp",
            MediaPath::Turn(super::RelayVia::Udp) => "turn/udp",
            MediaPath::Turn(super::RelayVia::Tcp) => "turn/tcp",
            MediaPath::Turn(super::RelayVia::Tls) => "turn/tls",
        }
    }
}

/// How a peer connection whose nominated peer is `remote` over `proto` reaches the SFU.
fn path_of(relays: &super::RelayAddresses, proto: IpProto, remote: SocketAddr) -> MediaPath {
    match (proto, relays.get(&remote)) {
        (IpProto::Tcp, _) => MediaPath::Tcp,
        (IpProto::Udp, Some(via)) => MediaPath::Turn(via),
        (IpProto::Udp, None) => MediaPath::Udp,
    }
}

/// A packet to send.
#[derive(Debug)]
pub struct Transmit {
    /// Over UDP, or on the ICE-TCP connection between `source` and `destination`.
    pub proto: IpProto,
    /// Local address to send from.
    pub source: SocketAddr,
    /// Peer address.
    pub destination: SocketAddr,
    /// Bytes.
    pub contents: Vec<u8>,
}

/// What a session should tell its client, or that it must close.
#[derive(Debug)]
pub enum SignalOut {
    /// Send this message.
    Message(Box<Msg>),
    /// The session is over: flush and close the WebSocket.
    Close,
}

/// Lifecycle events for the rest of the service (registry, webhooks, Matrix enforcement).
#[derive(Debug, Clone, PartialEq)]
pub enum SfuEvent {
    /// The first participant joined a room the engine had no state for.
    RoomStarted {
        /// LiveKit room name.
        room: RoomName,
        /// Room SID.
        sid: RoomSid,
    },
    /// The last participant left; the engine dropped the room's state.
    RoomFinished {
        /// LiveKit room name.
        room: RoomName,
        /// Room SID.
        sid: RoomSid,
    },
    /// A track's media arrived and subscribers can get it.
    TrackPublished {
        /// LiveKit room name.
        room: RoomName,
        /// The room's SID.
        room_sid: RoomSid,
        /// The publisher.
        participant: Box<lk::ParticipantInfo>,
        /// The track.
        track: Box<lk::TrackInfo>,
    },
    /// A track went away (unpublished, or its publisher left).
    TrackUnpublished {
        /// LiveKit room name.
        room: RoomName,
        /// The room's SID.
        room_sid: RoomSid,
        /// The publisher.
        participant: Box<lk::ParticipantInfo>,
        /// The track.
        track: Box<lk::TrackInfo>,
    },
    /// A participant joined a room.
    ParticipantJoined {
        /// LiveKit room name.
        room: RoomName,
        /// The room's SID.
        room_sid: RoomSid,
        /// Participant identity.
        identity: ParticipantIdentity,
        /// Participant SID.
        sid: ParticipantSid,
        /// Session.
        session: SessionId,
        /// Its info at join time.
        info: Box<lk::ParticipantInfo>,
    },
    /// A participant left.
    ParticipantLeft {
        /// LiveKit room name.
        room: RoomName,
        /// The room's SID.
        room_sid: RoomSid,
        /// Participant identity.
        identity: ParticipantIdentity,
        /// Participant SID.
        sid: ParticipantSid,
        /// Session.
        session: SessionId,
        /// Why it left.
        reason: lk::DisconnectReason,
        /// Its last info (state `DISCONNECTED`, with the disconnect reason).
        info: Box<lk::ParticipantInfo>,
        /// Whether its peer connections ever connected (else LiveKit's
        /// `participant_connection_aborted`).
        ever_connected: bool,
    },
}

impl SfuEvent {
    /// The room the event is about.
    pub fn room(&self) -> &RoomName {
        match self {
            Self::RoomStarted { room, .. }
            | Self::RoomFinished { room, .. }
            | Self::TrackPublished { room, .. }
            | Self::TrackUnpublished { room, .. }
            | Self::ParticipantJoined { room, .. }
            | Self::ParticipantLeft { room, .. } => room,
        }
    }

    /// The SID of the room the event is about (the same from `RoomStarted` to `RoomFinished`).
    pub fn room_sid(&self) -> &RoomSid {
        match self {
            Self::RoomStarted { sid, .. } | Self::RoomFinished { sid, .. } => sid,
            Self::TrackPublished { room_sid, .. }
            | Self::TrackUnpublished { room_sid, .. }
            | Self::ParticipantJoined { room_sid, .. }
            | Self::ParticipantLeft { room_sid, .. } => room_sid,
        }
    }
}

/// Outputs of the engine.
#[derive(Debug)]
pub enum Output {
    /// Send a datagram.
    Transmit(Transmit),
    /// Deliver to a session.
    Signal(SessionId, SignalOut),
    /// A lifecycle event.
    Event(SfuEvent),
    /// Nothing more to do until this instant (or the next input).
    Timeout(Instant),
}

/// A validated client joining (token checked by `signal`).
#[derive(Debug, Clone)]
pub struct Join {
    /// New session ID.
    pub session: SessionId,
    /// LiveKit room name.
    pub room: RoomName,
    /// Identity (`sub`).
    pub identity: ParticipantIdentity,
    /// Display name.
    pub name: String,
    /// Metadata from the token (v1: the join request's, when it carries some).
    pub metadata: String,
    /// Participant attributes (v1: the join request's `participant_attributes`, checked
    /// against the limits and `canUpdateOwnMetadata` by `signal`).
    pub attributes: HashMap<String, String>,
    /// Permissions from the token grants.
    pub permission: lk::ParticipantPermission,
    /// Subscribe to every track automatically.
    pub auto_subscribe: bool,
    /// The client's `client_protocol`, copied into its info.
    pub client_protocol: i32,
    /// v1 signalling (`/rtc/v1`): one peer connection on which the client always offers,
    /// instead of v0's publisher and subscriber connections (`docs/design/rtc-v1.md`).
    pub single_pc: bool,
    /// TURN servers (with this participant's credentials) for its join response.
    pub ice_servers: Vec<lk::IceServer>,
    /// What the participant is to the cascade (`docs/cascade.md`).
    pub cascade: CascadeRole,
}

/// One track a cascade relay receives, with what it was sent so far ([`Sfu::relayed`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelayedTrack {
    /// The track's SID.
    pub track_sid: String,
    /// `audio` or `video`.
    pub kind: &'static str,
    /// RTP packets sent.
    pub packets: u64,
    /// Their payload bytes.
    pub payload_bytes: u64,
    /// Payload bits per second sent lately (smoothed over a few seconds).
    pub bitrate: u64,
    /// The simulcast layers (rids) relayed now (those up to the quality the relay asks for),
    /// each on its own stream; empty: one stream.
    pub layers: Vec<String>,
}

/// What a participant is to the cascade between Conclaves (`docs/cascade.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CascadeRole {
    /// A client like any other.
    #[default]
    None,
    /// Here, a mirror of a peer Conclave's participant: its "client" is the peer's SFU,
    /// whose subscriber offers arrive as this participant's publisher offers. The peer's
    /// connections are ICE-lite like ours, so this publisher connection runs full ICE (and is
    /// controlling): it checks the candidates of the peer's offer itself.
    ///
    /// Its own local UDP address (a socket of its own, bound by the caller): every connection
    /// between two Conclaves would otherwise share one pair of addresses (each Conclave has
    /// one media port), and DTLS and SRTP carry nothing else to tell them apart.
    Mirror(Option<SocketAddr>),
    /// A peer Conclave's roster connection: signalling only (who is here, what they
    /// publish); it never connects media, so no connect deadline applies.
    Roster,
    /// A peer Conclave's media relay: it gets every layer it asks for, without bandwidth
    /// allocation here (the peer allocates per subscriber of its own).
    Relay,
}

/// Inputs from signalling sessions and operators.
#[derive(Debug)]
pub enum Command {
    /// A validated client joins (token checked by `signal`).
    Join(Join),
    /// A signal request from a session's client.
    Request {
        /// Session.
        session: SessionId,
        /// The request.
        message: Box<lk::signal_request::Message>,
    },
    /// The session's WebSocket ended (or it asked to leave).
    Disconnect {
        /// Session.
        session: SessionId,
        /// The signalling connection it comes from (see [`Sfu::resume`]); `None`: whichever
        /// is the session's now (the loop's own disconnects: a full signal queue).
        epoch: Option<u32>,
        /// Why.
        reason: lk::DisconnectReason,
    },
    /// Remove a participant by identity (operator, Matrix membership).
    Remove {
        /// Room name.
        room: RoomName,
        /// Identity.
        identity: ParticipantIdentity,
        /// Reason shown to the client.
        reason: lk::DisconnectReason,
    },
    /// Server-initiated (un)mute of a published track (RoomService `MutePublishedTrack`): the
    /// track info changes for everyone and the publisher gets a `mute` message.
    MuteTrack {
        /// Room name.
        room: RoomName,
        /// The publisher's identity.
        identity: ParticipantIdentity,
        /// The track.
        track_sid: TrackSid,
        /// Muted or not.
        muted: bool,
    },
    /// Changes a participant (RoomService `UpdateParticipant`); empty strings keep a field, an
    /// empty attribute value deletes the attribute.
    UpdateParticipant {
        /// Room name.
        room: RoomName,
        /// Identity.
        identity: ParticipantIdentity,
        /// New metadata.
        metadata: String,
        /// New display name.
        name: String,
        /// Attributes to set or (empty value) delete.
        attributes: HashMap<String, String>,
        /// New permissions.
        permission: Option<lk::ParticipantPermission>,
    },
    /// Subscribes a participant to tracks or unsubscribes it (RoomService
    /// `UpdateSubscriptions`).
    UpdateSubscriptions {
        /// Room name.
        room: RoomName,
        /// Identity.
        identity: ParticipantIdentity,
        /// Track SIDs.
        track_sids: Vec<TrackSid>,
        /// Subscribe (true) or unsubscribe.
        subscribe: bool,
    },
    /// A data packet from the server (RoomService `SendData`) to the packet's
    /// `destination_identities`, or to everyone when empty.
    SendData {
        /// Room name.
        room: RoomName,
        /// The packet, sent as is.
        packet: Box<lk::DataPacket>,
        /// Over `_reliable` (else `_lossy`).
        reliable: bool,
    },
    /// Sends `room_update` with this info (its live fields filled in) to every participant
    /// (RoomService `UpdateRoomMetadata`).
    UpdateRoom {
        /// Room name.
        room: RoomName,
        /// The room info (metadata and lifetime settings from the registry).
        info: Box<lk::Room>,
    },
    /// Removes every participant of a room with `ROOM_DELETED` (RoomService `DeleteRoom`).
    DeleteRoom {
        /// Room name.
        room: RoomName,
    },
    /// The server is shutting down: every participant is told to reconnect (`LeaveRequest`
    /// action `RECONNECT`, reason `SERVER_SHUTDOWN`: the SDKs rejoin the restarted server on
    /// their own), its signalling is closed and it leaves.
    Shutdown,
}

/// One RTP packet handed from a publisher to its room.
struct Forward {
    publisher: SessionId,
    track_sid: TrackSid,
    /// Its simulcast layer.
    rid: Option<Rid>,
    /// Its source stream (track and layer, see [`packet::source_id`]).
    source: u64,
    /// The publisher connection's payload parameters of its codec.
    params: PayloadParams,
    /// For a RED-wrapped packet (its payload type is `params`' RED one), its primary block
    /// (what subscribers without RED get).
    primary: Option<std::sync::Arc<[u8]>>,
    /// Whether it starts a keyframe (video).
    keyframe: bool,
    packet: RtpPacket,
}

/// The SFU engine.
pub struct Sfu {
    config: SfuConfig,
    ids: Ids,
    /// Rooms with participants.
    rooms: BTreeMap<RoomName, Room>,
    /// Room records and lifetimes (created rooms, with or without participants).
    registered: BTreeMap<RoomName, RegisteredRoom>,
    /// Whether `registered` changed since the loop last published it.
    rooms_changed: bool,
    /// Which room each session is in.
    sessions: HashMap<SessionId, RoomName>,
    by_ufrag: HashMap<String, (SessionId, PcKind)>,
    /// Peer addresses that passed ICE, per protocol (a UDP and a TCP peer may share one).
    by_addr: HashMap<(IpProto, SocketAddr), (SessionId, PcKind)>,
    /// Cascade mirrors' connections, by (their own local address, the peer's address).
    by_local: HashMap<(SocketAddr, SocketAddr), (SessionId, PcKind)>,
    /// Participants whose signalling was lost, with the deadline for their resume.
    detached: HashMap<SessionId, Instant>,
    out: VecDeque<Output>,
    /// Sessions whose connections were written to (media, data) and are polled once, at the
    /// next [`Sfu::poll_output`], however many inputs wrote to them before it (see
    /// [`Sfu::drain`]).
    pending: Pending,
    /// Each participant's earliest deadline, filed after every poll of its connections.
    timers: timers::Timers,
    next_speakers: Option<Instant>,
    next_quality: Option<Instant>,
    unix_now: i64,
    last_now: Instant,
    stats: SfuStats,
    /// One DTLS certificate for every peer connection of this engine (see [`Sfu::new`]).
    dtls_cert: Option<str0m::config::DtlsCert>,
}

/// Sessions waiting to be drained, each once, in the order they were first added.
#[derive(Debug, Default)]
struct Pending {
    order: VecDeque<SessionId>,
    set: HashSet<SessionId>,
}

impl Pending {
    fn add(&mut self, session: SessionId) {
        if self.set.insert(session) {
            self.order.push_back(session);
        }
    }

    fn pop(&mut self) -> Option<SessionId> {
        let s = self.order.pop_front()?;
        self.set.remove(&s);
        Some(s)
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn clear(&mut self) {
        self.order.clear();
        self.set.clear();
    }
}

/// The room of `session`, borrowing only the room map and the session index (so the output
/// queue stays usable).
fn room_mut<'a>(
    rooms: &'a mut BTreeMap<RoomName, Room>,
    sessions: &HashMap<SessionId, RoomName>,
    session: SessionId,
) -> Option<&'a mut Room> {
    rooms.get_mut(sessions.get(&session)?)
}

fn msg(m: Msg) -> SignalOut {
    SignalOut::Message(Box::new(m))
}

/// The priority of a passive ICE-TCP host candidate (RFC 8445 §5.1.2.1): host type
/// preference, a local preference far below a UDP host's (65535), component 1.
const TCP_CANDIDATE_PRIORITY: u32 = (126 << 24) | (8191 << 8) | 255;

/// A passive ICE-TCP host candidate on `addr` with [`TCP_CANDIDATE_PRIORITY`] (str0m's builder
/// sets no priority; its SDP parser keeps the one given).
fn tcp_candidate(addr: SocketAddr) -> Result<Candidate, str0m::error::IceError> {
    let line = format!(
        "candidate:{} 1 tcp {TCP_CANDIDATE_PRIORITY} {} {} typ host tcptype passive",
        u32::from(addr.port()) | 0x7c00_0000,
        addr.ip(),
        addr.port()
    );
    Candidate::from_sdp_string(&line)
}

/// What the join and reconnect responses say of this server.
fn server_info() -> lk::ServerInfo {
    lk::ServerInfo {
        edition: lk::server_info::Edition::Standard as i32,
        version: SERVER_VERSION.into(),
        protocol: PROTOCOL,
        debug_info: concat!("conclave ", env!("CARGO_PKG_VERSION")).into(),
        ..Default::default()
    }
}

fn linear_audio_level(level: i8) -> f32 {
    // RFC 6464: -dBov, 0 (loudest) ..= 127 (silence).
    let dbov = f32::from(level.clamp(0, 127));
    10f32.powf(-dbov / 20.0)
}

impl Sfu {
    /// A new engine, started at `now`.
    pub fn new(config: SfuConfig, now: Instant) -> Self {
        let ids = match config.seed {
            Some(s) => Ids::from_seed(s),
            None => Ids::from_entropy(),
        };
        Self {
            config,
            ids,
            rooms: BTreeMap::new(),
            registered: BTreeMap::new(),
            rooms_changed: false,
            sessions: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            by_local: HashMap::new(),
            detached: HashMap::new(),
            out: VecDeque::new(),
            pending: Pending::default(),
            timers: timers::Timers::default(),
            next_speakers: None,
            next_quality: None,
            unix_now: 0,
            last_now: now,
            stats: SfuStats::default(),
            // Generated once, not per peer connection: a key pair and a self-signed
            // certificate per connection cost CPU on every join and memory for as long as it
            // lasts, and buy nothing (the fingerprint in each answer authenticates the
            // connection either way; browsers share one certificate across their own
            // connections too). Without it str0m generates one per connection.
            dtls_cert: str0m::crypto::from_feature_flags()
                .dtls_provider
                .generate_certificate(),
        }
    }

    /// Whether packets from `source` over `proto` reach a peer connection here (it passed
    /// ICE with one of this engine's peer connections, which still exists).
    pub fn knows_address(&self, proto: IpProto, source: &SocketAddr) -> bool {
        self.by_addr.contains_key(&(proto, *source))
    }

    /// What the cascade relays of `room` (participants with [`CascadeRole::Relay`]) were sent,
    /// by relay identity: per track, RTP packets and payload bytes.
    pub fn relayed(&self, room: &RoomName) -> HashMap<String, Vec<RelayedTrack>> {
        let Some(r) = self.rooms.get(room) else {
            return HashMap::new();
        };
        r.participants
            .values()
            .filter(|p| p.cascade == CascadeRole::Relay)
            .map(|p| {
                let tracks = p
                    .down_tracks
                    .iter()
                    .map(|d| RelayedTrack {
                        track_sid: d.track_sid.to_string(),
                        kind: match d.kind {
                            str0m::media::MediaKind::Audio => "audio",
                            str0m::media::MediaKind::Video => "video",
                        },
                        packets: d.packets,
                        payload_bytes: d.payload_bytes,
                        bitrate: d.bitrate,
                        layers: d
                            .layer_rids
                            .iter()
                            .filter(|&&(_, q)| q <= d.max_quality)
                            .map(|(r, _)| r.to_string())
                            .collect(),
                    })
                    .collect();
                (p.identity.to_string(), tracks)
            })
            .collect()
    }

    /// Whether `session` is a participant here (joined, not left).
    pub fn has_session(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    /// Datagram counters so far.
    pub fn stats(&self) -> SfuStats {
        self.stats
    }

    /// Sets the wall clock (Unix seconds) used for `joined_at` and room creation times.
    pub fn set_unix_time(&mut self, unix_now: i64) {
        self.unix_now = unix_now;
    }

    /// Number of participants in `room`.
    pub fn participant_count(&self, room: &RoomName) -> usize {
        self.rooms.get(room).map_or(0, |r| r.participants.len())
    }

    /// How each participant of `room` reaches the SFU: the protocols of its connected peer
    /// connections ("udp", "tcp"; several joined by ","), by identity; absent until connected.
    pub fn transports(&self, room: &RoomName) -> HashMap<String, String> {
        let Some(r) = self.rooms.get(room) else {
            return HashMap::new();
        };
        r.participants
            .values()
            .filter_map(|p| {
                let mut names: Vec<&str> = p
                    .transport
                    .paths()
                    .into_iter()
                    .map(|(proto, remote)| path_of(&self.config.relays, proto, remote).as_str())
                    .collect();
                names.dedup();
                (!names.is_empty()).then(|| (p.identity.to_string(), names.join(",")))
            })
            .collect()
    }

    /// Snapshot of a room's participants (Twirp `ListParticipants`).
    pub fn participants(&self, room: &RoomName) -> Vec<lk::ParticipantInfo> {
        self.rooms
            .get(room)
            .map(|r| r.participants.values().map(|p| p.info.clone()).collect())
            .unwrap_or_default()
    }

    /// Next output. Call until it returns [`Output::Timeout`].
    pub fn poll_output(&mut self) -> Output {
        if let Some(o) = self.out.pop_front() {
            return o;
        }
        if !self.pending.is_empty() {
            self.drain_pending(self.last_now);
            if let Some(o) = self.out.pop_front() {
                return o;
            }
        }
        Output::Timeout(self.poll_timeout())
    }

    fn poll_timeout(&mut self) -> Instant {
        let participants = self.next_filed_deadline();
        let mut t: Option<Instant> = self.next_speakers;
        let mut take = |x: Instant| {
            t = Some(match t {
                Some(cur) if cur <= x => cur,
                _ => x,
            });
        };
        if let Some(q) = self.next_quality {
            take(q);
        }
        if let Some(e) = self.next_expiry() {
            take(e);
        }
        if let Some(e) = self.next_detached_expiry() {
            take(e);
        }
        if let Some(p) = participants {
            take(p);
        }
        // With nothing scheduled, wake up rarely.
        t.unwrap_or(self.last_now + Duration::from_secs(3600))
    }

    fn signal(&mut self, session: SessionId, m: Msg) {
        self.out.push_back(Output::Signal(session, msg(m)));
    }

    // ------------------------------------------------------------------ inputs

    /// Handles a command at `now`.
    pub fn handle_command(&mut self, now: Instant, command: Command) {
        self.last_now = now;
        match command {
            Command::Join(join) => self.join(now, join),
            Command::Request { session, message } => self.request(now, session, *message),
            Command::Disconnect {
                session,
                epoch,
                reason,
            } => self.signalling_ended(now, session, epoch, reason),
            Command::Remove {
                room,
                identity,
                reason,
            } => {
                if let Some(session) = self.session_of(&room, &identity) {
                    self.leave(now, session, reason, true);
                }
            }
            Command::Shutdown => self.shut_down(now),
            admin @ (Command::MuteTrack { .. }
            | Command::UpdateParticipant { .. }
            | Command::UpdateSubscriptions { .. }
            | Command::SendData { .. }
            | Command::UpdateRoom { .. }
            | Command::DeleteRoom { .. }) => self.admin_command(now, admin),
        }
    }

    /// Handles a UDP datagram that arrived at `destination` from `source` at `now`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        packet: &[u8],
    ) {
        self.handle_packet(now, IpProto::Udp, source, destination, packet);
    }

    /// Handles a packet that arrived over `proto` at `destination` from `source` at
    /// `now` (for TCP: one frame's payload).
    pub fn handle_packet(
        &mut self,
        now: Instant,
        proto: IpProto,
        source: SocketAddr,
        destination: SocketAddr,
        packet: &[u8],
    ) {
        self.last_now = now;
        self.stats.datagrams += 1;
        let stun_ufrag = super::stun::local_ufrag(packet);
        // A cascade mirror's own socket: one peer connection per (local, remote) pair.
        let mirrored = if self.by_local.is_empty() {
            None
        } else {
            self.by_local.get(&(destination, source)).copied()
        };
        let target = match (mirrored, stun_ufrag) {
            (Some(t), _) => Some(t),
            (None, Some(ufrag)) => self.by_ufrag.get(ufrag).copied(),
            (None, None) => self.by_addr.get(&(proto, source)).copied(),
        };
        let Some((session, kind)) = target else {
            // Unknown ufrag, or not STUN from an address that never did ICE: one hash lookup.
            self.stats.dropped_unknown_peer += 1;
            return;
        };
        let proto_ = match proto {
            IpProto::Udp => Protocol::Udp,
            IpProto::Tcp => Protocol::Tcp,
        };
        let Ok(receive) = Receive::new(proto_, source, destination, packet) else {
            self.stats.dropped_invalid += 1;
            return;
        };
        let input = Input::Receive(now, receive);
        let Some(p) = self.participant_mut(session) else {
            self.stats.rejected_by_peer += 1;
            return;
        };
        let Some(pc) = p.pc_mut(kind) else {
            self.stats.rejected_by_peer += 1;
            return;
        };
        let rtc = &mut pc.rtc;
        // STUN is taken only if str0m's ICE agent accepts it (`Rtc::accepts`): for a binding
        // request, our ufrag, the peer's (once known) and a MESSAGE-INTEGRITY made with our ICE
        // password; or it comes from the address already nominated. `handle_input` answers
        // `Ok` for STUN it ignores, so its result alone says nothing about integrity: only an
        // accepted message may teach us the sender's address.
        if stun_ufrag.is_some() && !rtc.accepts(&input) {
            self.stats.rejected_by_peer += 1;
            tracing::debug!(%session, "STUN message failed the peer connection's checks");
            return;
        }
        if rtc.handle_input(input).is_err() {
            self.stats.rejected_by_peer += 1;
            tracing::debug!(%session, "peer connection rejected input");
        } else if stun_ufrag.is_some() && mirrored.is_none() {
            self.by_addr.insert((proto, source), (session, kind));
        } else {
            // DTLS and SRTP flow on the nominated path only (STUN checks on every pair).
            pc.proto = Some(proto);
            pc.remote = Some(source);
        }
        self.drain(now, session);
    }

    /// Drives time: the due timers of peer connections (only the participants whose deadline
    /// passed: `engine/timers.rs`) and periodic room tasks.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        for session in self.pop_due(now) {
            let timers_due = self
                .participant_mut(session)
                .map(|p| {
                    let due = p.timers_due(now);
                    if due {
                        p.handle_timeout(now);
                    }
                    due
                })
                .unwrap_or(false);
            if timers_due {
                self.drain(now, session);
            }
            let lost = self
                .participant_mut(session)
                .and_then(|p| p.connection_lost(now));
            match lost {
                Some(reason) => {
                    tracing::info!(
                        %session,
                        ?reason,
                        "peer connection lost; removing participant"
                    );
                    self.leave(now, session, reason, true);
                }
                None => self.refile(session),
            }
        }
        self.expire_rooms(now);
        self.expire_detached(now);
        if self.next_speakers.is_some_and(|t| t <= now) {
            self.update_speakers(now);
        }
        if self.next_quality.is_some_and(|t| t <= now) {
            self.update_quality(now);
        }
    }

    // ------------------------------------------------------------------ join / leave

    /// A peer connection; `sends` when the SFU sends media on it (the subscriber side, or a
    /// single peer connection), which then estimates its bandwidth (`engine/bandwidth.rs`).
    fn new_pc(&mut self, now: Instant, sends: bool) -> Pc {
        self.new_pc_with(now, sends, true, None)
    }

    /// A peer connection; for a cascade mirror's (see [`CascadeRole::Mirror`]) full ICE on
    /// its own socket `only` (when given) as the one candidate.
    fn new_pc_with(
        &mut self,
        now: Instant,
        sends: bool,
        ice_lite: bool,
        only: Option<SocketAddr>,
    ) -> Pc {
        let (ufrag, pass) = self.ids.ice_credentials();
        let ufrag = format!("{}{ufrag}", self.config.ufrag_prefix);
        let mut builder = Rtc::builder();
        if let Some(cert) = &self.dtls_cert {
            builder = builder.set_dtls_cert(cert.clone());
        }
        builder = builder
            .set_ice_lite(ice_lite)
            // Packets are forwarded as they come (`engine/packet.rs`), not as frames.
            .set_rtp_mode(true)
            .set_local_ice_credentials(str0m::IceCreds {
                ufrag: ufrag.clone(),
                pass,
            })
            .clear_codecs()
            .enable_opus(true, true)
            .enable_vp8(true)
            .enable_h264(true);
        // Transport-cc on video only: the estimate is for video allocation, and str0m pads any
        // media section with transport-cc up to 50 kbit/s; on audio that would put padding on
        // every audio-only listener's link (an all-hands of hundreds).
        let params = builder
            .codec_config()
            .params()
            .iter()
            .map(|p| {
                let mut p = *p;
                if p.spec().codec.is_audio() {
                    p.set_fb_transport_cc(false);
                }
                p
            })
            .collect();
        *builder.codec_config() = CodecConfig::new_from_payload_params(params);
        let mut rtc = builder
            // Loss, RTT and jitter for connection quality (`sfu/quality.rs`).
            .set_stats_interval(Some(bandwidth::STATS_INTERVAL))
            // No estimate, no allocation (`bandwidth.rs` grants nothing without one).
            .enable_bwe(
                (sends && !self.config.congestion_control_off)
                    .then_some(bandwidth::INITIAL_ESTIMATE),
            )
            .build(now);
        let udp = match only {
            Some(a) => vec![a],
            None => self.config.candidates.clone(),
        };
        for addr in &udp {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!(%addr, error = %e, "cannot use address as candidate"),
            }
        }
        // Ranked far below UDP: a client that can reach both must settle on UDP (no
        // head-of-line blocking). str0m's own ranking of a second host candidate is only two
        // below the first, and Chromium on a loaded machine nominated TCP on loopback.
        let tcp = if only.is_some() {
            &[][..]
        } else {
            &self.config.tcp_candidates[..]
        };
        for addr in tcp {
            match tcp_candidate(*addr) {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot use address as a TCP candidate")
                }
            }
        }
        Pc {
            rtc,
            ufrag,
            next_timeout: now,
            connected: false,
            proto: None,
            remote: None,
            restarting: false,
        }
    }

    fn join(&mut self, now: Instant, join: Join) {
        let Join {
            session,
            room: room_name,
            identity,
            name,
            metadata,
            attributes,
            permission,
            auto_subscribe,
            client_protocol,
            single_pc,
            ice_servers,
            cascade,
        } = join;
        if self.refuse_if_full(session, &room_name, &identity) {
            return;
        }
        // One participant per identity: the newcomer replaces the old session.
        if let Some(old) = self.session_of(&room_name, &identity) {
            self.leave_as(
                now,
                old,
                lk::DisconnectReason::DuplicateIdentity,
                Departure::Replaced,
            );
        }
        let unix = self.unix_now;
        if !self.rooms.contains_key(&room_name) {
            // The room's one SID: its record's (created before anybody joined), else a new one.
            let (room_sid, created) = match self.registered.get(&room_name) {
                Some(r) => (r.sid.clone(), r.created_unix),
                None => (RoomSid::new(self.ids.sid(ROOM_PREFIX)), unix),
            };
            self.out.push_back(Output::Event(SfuEvent::RoomStarted {
                room: room_name.clone(),
                sid: room_sid.clone(),
            }));
            self.rooms.insert(
                room_name.clone(),
                Room::new(room_name.clone(), room_sid, created),
            );
        }
        let Some(room) = self.rooms.get(&room_name) else {
            return;
        };
        let room_sid = room.sid.clone();
        let room_created = room.created_unix;
        let sid = ParticipantSid::new(self.ids.sid(PARTICIPANT_PREFIX));
        let span = tracing::info_span!("participant", room = %room_name, %identity, %sid);
        let _enter = span.enter();

        // v1 registers its one connection as the publisher: trickle targets PUBLISHER.
        let transport = if single_pc {
            Transport::Single {
                pc: Box::new(self.new_pc(now, true)),
                slots: Vec::new(),
                reoffer_requested: false,
                answered: false,
            }
        } else {
            Transport::Dual {
                publisher: None,
                subscriber: Box::new(self.new_pc(now, true)),
            }
        };

        let info = lk::ParticipantInfo {
            sid: sid.to_string(),
            identity: identity.to_string(),
            name,
            metadata,
            attributes,
            state: lk::participant_info::State::Joined as i32,
            joined_at: unix,
            joined_at_ms: unix * 1000,
            version: 1,
            permission: Some(permission.clone()),
            is_publisher: false,
            client_protocol,
            ..Default::default()
        };
        for (pc, &kind) in transport.pcs().zip(transport.kinds()) {
            self.by_ufrag.insert(pc.ufrag.clone(), (session, kind));
        }
        self.sessions.insert(session, room_name.clone());

        let mut participant = Participant {
            session,
            identity: identity.clone(),
            sid: sid.clone(),
            info: info.clone(),
            auto_subscribe: auto_subscribe && permission.can_subscribe,
            transport,
            tracks: Vec::new(),
            unbound_mids: Vec::new(),
            down_tracks: Vec::new(),
            out_streams: HashMap::new(),
            sub_pending: None,
            sub_restart_wanted: false,
            sub_restart: None,
            sub_offer_id: 0,
            sub_reliable: None,
            sub_lossy: None,
            pub_channels: HashMap::new(),
            data_backlog: VecDeque::new(),
            data_backlog_bytes: 0,
            joined_at: now,
            signal_epoch: 0,
            reliable_seq: 0,
            filed: None,
            audio_level: 0.0,
            speaking: false,
            link: bandwidth::Link::default(),
            cascade,
        };

        let client_configuration = self.client_configuration();
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let others: Vec<lk::ParticipantInfo> = room
            .participants
            .values()
            .filter(|p| !p.hidden())
            .map(|p| p.info.clone())
            .collect();

        let join = lk::JoinResponse {
            room: Some(lk::Room {
                sid: room_sid.to_string(),
                name: room_name.to_string(),
                creation_time: room_created,
                creation_time_ms: room_created * 1000,
                num_participants: (room.participants.len() + 1) as u32,
                empty_timeout: 300,
                departure_timeout: 20,
                ..Default::default()
            }),
            participant: Some(info.clone()),
            other_participants: others,
            server_version: SERVER_VERSION.into(),
            ice_servers,
            // v1: the client's one connection is its publisher connection; LiveKit forces
            // `false` (design §1.5).
            subscriber_primary: !single_pc,
            client_configuration: Some(client_configuration),
            ping_timeout: self.config.ping.timeout_secs as i32,
            ping_interval: self.config.ping.interval_secs as i32,
            server_info: Some(server_info()),
            enabled_publish_codecs: vec![
                lk::Codec {
                    mime: "video/VP8".into(),
                    fmtp_line: String::new(),
                },
                lk::Codec {
                    mime: "video/H264".into(),
                    fmtp_line: String::new(),
                },
                lk::Codec {
                    mime: "audio/opus".into(),
                    fmtp_line: String::new(),
                },
            ],
            fast_publish: permission.can_publish,
            ..Default::default()
        };
        self.out
            .push_back(Output::Signal(session, msg(Msg::Join(join))));
        tracing::info!("participant joined");

        // Existing tracks go into the first subscriber offer (fast start).
        if participant.auto_subscribe {
            let relay = participant.cascade == CascadeRole::Relay;
            for p in room.participants.values() {
                for t in p.bound_tracks() {
                    participant.down_tracks.push(DownTrack::new(
                        p.session,
                        p.sid.as_str(),
                        t,
                        relay,
                    ));
                }
            }
        }
        // Announce the newcomer to everyone else.
        if !permission.hidden {
            let update = Msg::Update(lk::ParticipantUpdate {
                participants: vec![info],
            });
            for p in room.participants.values() {
                self.out
                    .push_back(Output::Signal(p.session, msg(update.clone())));
            }
        }
        participant.file_deadline(&mut self.timers);
        room.participants.insert(session, participant);
        self.count_participant(now, &room_name, true);
        // v0: the first subscriber offer, data channels plus existing tracks (fast start).
        // v1: nothing, the client offers first (design §1.5).
        if !single_pc {
            self.renegotiate(now, session);
        }
        let info = self
            .participant_mut(session)
            .map(|p| Box::new(p.info.clone()))
            .unwrap_or_default();
        self.out
            .push_back(Output::Event(SfuEvent::ParticipantJoined {
                room: room_name,
                room_sid,
                identity,
                sid,
                session,
                info,
            }));
        if self.next_speakers.is_none() {
            self.next_speakers = Some(now + SPEAKER_INTERVAL);
        }
        if self.next_quality.is_none() {
            self.next_quality = Some(now + QUALITY_INTERVAL);
        }
        self.drain(now, session);
    }

    /// Tells every participant to reconnect and closes its signalling (see
    /// [`Command::Shutdown`]).
    fn shut_down(&mut self, now: Instant) {
        let sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
        tracing::info!(
            participants = sessions.len(),
            "shutting down: participants told to reconnect"
        );
        for session in sessions {
            self.leave_as(
                now,
                session,
                lk::DisconnectReason::ServerShutdown,
                Departure::ShutDown,
            );
        }
    }

    /// Sessions (participants) this engine holds.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    fn leave(
        &mut self,
        now: Instant,
        session: SessionId,
        reason: lk::DisconnectReason,
        server_initiated: bool,
    ) {
        let how = if server_initiated {
            Departure::Removed
        } else {
            Departure::Left
        };
        self.leave_as(now, session, reason, how);
    }

    fn leave_as(
        &mut self,
        now: Instant,
        session: SessionId,
        reason: lk::DisconnectReason,
        how: Departure,
    ) {
        let server_initiated = how != Departure::Left;
        let Some(room_name) = self.sessions.remove(&session) else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let Some(mut p) = room.participants.remove(&session) else {
            return;
        };
        for pc in p.transport.pcs() {
            self.by_ufrag.remove(&pc.ufrag);
        }
        if let Some(creds) = &p.sub_restart {
            self.by_ufrag.remove(&creds.ufrag);
        }
        self.by_addr.retain(|_, (s, _)| *s != session);
        self.by_local.retain(|_, (s, _)| *s != session);
        self.detached.remove(&session);
        if server_initiated {
            // Shutting down: the SDKs rejoin (a full reconnect) once the server is back.
            let action = if how == Departure::ShutDown {
                lk::leave_request::Action::Reconnect
            } else {
                lk::leave_request::Action::Disconnect
            };
            self.out.push_back(Output::Signal(
                session,
                msg(Msg::Leave(lk::LeaveRequest {
                    can_reconnect: how == Departure::ShutDown,
                    reason: reason as i32,
                    action: action as i32,
                    regions: None,
                })),
            ));
        }
        self.out
            .push_back(Output::Signal(session, SignalOut::Close));
        p.close(reason);
        for t in p.bound_tracks() {
            self.out
                .push_back(Output::Event(SfuEvent::TrackUnpublished {
                    room: room_name.clone(),
                    room_sid: room.sid.clone(),
                    participant: Box::new(p.info.clone()),
                    track: Box::new(t.info.clone()),
                }));
        }
        p.info.tracks.clear();
        tracing::info!(room = %room_name, identity = %p.identity, ?reason, "participant left");
        let hidden = p.hidden();
        let update = Msg::Update(lk::ParticipantUpdate {
            participants: vec![p.info.clone()],
        });
        let mut touched = Vec::new();
        for other in room.participants.values_mut() {
            if !hidden {
                self.out
                    .push_back(Output::Signal(other.session, msg(update.clone())));
            }
            if other.stop_down_tracks(|d| d.publisher == session) {
                touched.push(other.session);
            }
        }
        // A session replaced by a newer one of the same identity leaves the room to it: the
        // room goes on (same SID, no RoomFinished/RoomStarted), as in LiveKit.
        let replaced = how == Departure::Replaced;
        let room_sid = room.sid.clone();
        let finished = room.participants.is_empty() && !replaced;
        self.count_participant(now, &room_name, false);
        self.out.push_back(Output::Event(SfuEvent::ParticipantLeft {
            room: room_name.clone(),
            room_sid: room_sid.clone(),
            identity: p.identity.clone(),
            sid: p.sid.clone(),
            session,
            reason,
            ever_connected: p.ever_connected(),
            info: Box::new(p.info.clone()),
        }));
        if finished {
            self.rooms.remove(&room_name);
            self.out.push_back(Output::Event(SfuEvent::RoomFinished {
                room: room_name,
                sid: room_sid,
            }));
        }
        for s in touched {
            self.renegotiate(now, s);
            self.drain(now, s);
        }
    }

    // ------------------------------------------------------------------ requests

    fn request(&mut self, now: Instant, session: SessionId, message: lk::signal_request::Message) {
        use lk::signal_request::Message as Req;
        if !self.sessions.contains_key(&session) {
            return;
        }
        match message {
            Req::Offer(sd) => self.publisher_offer(now, session, sd),
            Req::Answer(sd) => self.subscriber_answer(now, session, sd),
            Req::Trickle(t) => self.trickle(session, t),
            Req::AddTrack(req) => self.add_track(now, session, req),
            Req::Mute(m) => self.mute(session, &m.sid, m.muted),
            Req::Subscription(s) => self.subscription(now, session, s),
            Req::TrackSetting(s) => self.track_settings(now, session, s),
            Req::Leave(_) => {
                self.leave(now, session, lk::DisconnectReason::ClientInitiated, false);
                return;
            }
            Req::UpdateMetadata(u) => self.update_metadata(session, u),
            other => {
                tracing::debug!(%session, request = ?std::mem::discriminant(&other), "ignored signal request");
            }
        }
        self.drain(now, session);
    }

    // ------------------------------------------------------------------ subscriptions

    // ------------------------------------------------------------------ draining

    /// Drains both peer connections of `session` now; the connections its media and data
    /// were written to are drained at the next [`Sfu::poll_output`].
    ///
    /// Why not at once: polling a str0m connection walks all of its machinery (ICE, DTLS,
    /// SCTP, every stream), which costs more than the write it follows. A caller that hands
    /// several datagrams in before polling (the media loop reads what the socket holds) has
    /// each subscriber polled once for all the packets written to it, not once per packet.
    fn drain(&mut self, now: Instant, session: SessionId) {
        let (forwards, relayed_to) = self.drain_one(now, session);
        for t in relayed_to {
            self.pending.add(t);
        }
        for f in forwards {
            for t in self.forward(now, f) {
                self.pending.add(t);
            }
        }
    }

    /// Drains every pending session (and those their own media and data reach in turn).
    fn drain_pending(&mut self, now: Instant) {
        let mut rounds = 0;
        while let Some(s) = self.pending.pop() {
            rounds += 1;
            if rounds > 100_000 {
                tracing::error!("drain did not settle; giving up this round");
                self.pending.clear();
                break;
            }
            self.drain(now, s);
        }
    }

    /// Drains one participant's peer connections; returns the media to forward and the
    /// sessions its data packets were written to (to be drained in turn, so that the data
    /// leaves now rather than at their next timer).
    fn drain_one(&mut self, now: Instant, session: SessionId) -> (Vec<Forward>, Vec<SessionId>) {
        let Some(room) = room_mut(&mut self.rooms, &self.sessions, session) else {
            return (Vec::new(), Vec::new());
        };
        let room_name = room.name.clone();
        let room_sid = room.sid.clone();
        let Some(p) = room.participants.get_mut(&session) else {
            return (Vec::new(), Vec::new());
        };
        let polled = p.poll(now, &mut self.out);
        p.file_deadline(&mut self.timers);
        self.stats.participant_polls += 1;
        self.stats.nacks_received += polled.nacks;
        for &path in &polled.connected {
            match path.map(|(proto, remote)| path_of(&self.config.relays, proto, remote)) {
                Some(MediaPath::Tcp) => self.stats.connected_tcp += 1,
                Some(MediaPath::Turn(via)) => self.stats.connected_turn[via as usize] += 1,
                _ => self.stats.connected_udp += 1,
            }
        }
        for t in &polled.unpublished {
            self.out
                .push_back(Output::Event(SfuEvent::TrackUnpublished {
                    room: room_name.clone(),
                    room_sid: room_sid.clone(),
                    participant: Box::new(p.info.clone()),
                    track: Box::new(t.info.clone()),
                }));
        }
        if polled.dead {
            self.leave(now, session, lk::DisconnectReason::MediaFailure, true);
            return (Vec::new(), Vec::new());
        }
        for (track, rid) in polled.keyframe_wanted {
            // A subscriber's request goes to the track's publisher.
            let publisher = self.publisher_of(&track).unwrap_or(session);
            self.request_keyframe(now, publisher, &track, rid);
        }
        for sid in polled.newly_bound {
            self.subscribe_all_to(now, session, &sid);
        }
        if !polled.unpublished.is_empty() {
            for t in &polled.unpublished {
                self.unpublish(now, session, &t.sid);
            }
            self.broadcast_participant(session);
        }
        let mut relayed_to = Vec::new();
        for (reliable, bytes) in polled.data {
            for t in self.relay_data(session, reliable, &bytes) {
                if !relayed_to.contains(&t) {
                    relayed_to.push(t);
                }
            }
        }
        (polled.forwards, relayed_to)
    }

    /// Files `session`'s deadline if it has none filed (after its entry was popped).
    fn refile(&mut self, session: SessionId) {
        if let Some(room) = room_mut(&mut self.rooms, &self.sessions, session) {
            if let Some(p) = room.participants.get_mut(&session) {
                p.file_deadline(&mut self.timers);
            }
        }
    }

    /// Whether the heap entry `(at, session)` is `session`'s filed deadline (not superseded,
    /// and the participant is still here).
    fn is_filed(&self, at: Instant, session: SessionId) -> bool {
        self.sessions
            .get(&session)
            .and_then(|room| self.rooms.get(room))
            .and_then(|r| r.participants.get(&session))
            .is_some_and(|p| p.filed == Some(at))
    }

    /// The earliest filed deadline, dropping stale entries on the way (`engine/timers.rs`).
    fn next_filed_deadline(&mut self) -> Option<Instant> {
        self.compact_timers();
        while let Some((at, session)) = self.timers.peek() {
            if self.is_filed(at, session) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    /// The participants whose deadline passed at `now`, earliest first; each has nothing
    /// filed any more. One whose deadline only moved later is filed anew instead.
    fn pop_due(&mut self, now: Instant) -> Vec<SessionId> {
        let mut due = Vec::new();
        while let Some((at, session)) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if !self.is_filed(at, session) {
                continue;
            }
            let Some(p) = self.participant_mut(session) else {
                continue;
            };
            p.filed = None;
            if p.next_timeout() <= now {
                due.push(session);
            } else {
                self.refile(session);
            }
        }
        due
    }

    /// Drops the stale entries when they outnumber the participants: superseded deadlines
    /// stay in the heap until their time, and a burst of earlier deadlines could pile them up.
    fn compact_timers(&mut self) {
        let participants = self.sessions.len();
        if self.timers.len() <= 4 * participants + 1024 {
            return;
        }
        let live: Vec<(Instant, SessionId)> = self
            .rooms
            .values()
            .flat_map(|r| r.participants.values())
            .filter_map(|p| p.filed.map(|at| (at, p.session)))
            .collect();
        self.timers.rebuild(live.into_iter());
    }

    fn publisher_of(&self, track_sid: &TrackSid) -> Option<SessionId> {
        self.rooms
            .values()
            .find_map(|r| r.track(track_sid).map(|(p, _)| p.session))
    }

    // ------------------------------------------------------------------ lookup

    /// The room of `session` (through the session index).
    fn room_of(&self, session: SessionId) -> Option<&Room> {
        self.rooms.get(self.sessions.get(&session)?)
    }

    /// The room of `session`, mutably.
    fn room_of_mut(&mut self, session: SessionId) -> Option<&mut Room> {
        room_mut(&mut self.rooms, &self.sessions, session)
    }

    /// The room and participant of `session`.
    fn locate(&self, session: SessionId) -> Option<(&Room, &Participant)> {
        let room = self.room_of(session)?;
        Some((room, room.participants.get(&session)?))
    }

    /// The participant of `session`, mutably.
    fn participant_mut(&mut self, session: SessionId) -> Option<&mut Participant> {
        self.room_of_mut(session)?.participants.get_mut(&session)
    }

    /// The session of participant `identity` in `room`.
    fn session_of(&self, room: &RoomName, identity: &ParticipantIdentity) -> Option<SessionId> {
        Some(self.rooms.get(room)?.by_identity(identity)?.session)
    }

    /// Bumps the participant's version and sends its complete info to the whole room
    /// (including itself).
    fn broadcast_participant(&mut self, session: SessionId) {
        let Some(room) = room_mut(&mut self.rooms, &self.sessions, session) else {
            return;
        };
        let Some(p) = room.participants.get_mut(&session) else {
            return;
        };
        let hidden = p.hidden();
        let update = Msg::Update(lk::ParticipantUpdate {
            participants: vec![p.next_version()],
        });
        for other in room.participants.values() {
            if hidden && other.session != session {
                continue;
            }
            self.out
                .push_back(Output::Signal(other.session, msg(update.clone())));
        }
    }
}

#[cfg(test)]
mod bandwidth_tests;
#[cfg(test)]
mod data_tests;
#[cfg(test)]
mod room_tests;
#[cfg(test)]
mod rtp_tests;
#[cfg(test)]
mod single_tests;
#[cfg(test)]
mod tests;
