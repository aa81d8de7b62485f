//! The engine: every room, participant and peer connection of this SFU, driven by inputs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;
use prost::Message as _;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId, Reliability};
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, Mid, Rid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output as RtcOutput, Rtc};

use super::ids::{Ids, PARTICIPANT_PREFIX, ROOM_PREFIX, TRACK_PREFIX};
use super::rewrite::Timeline;
use super::simulcast::{self, Layers};

mod admin;

/// Identifies one signalling session (one WebSocket, one participant).
pub type SessionId = u64;

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

/// Datagram counters (exported at `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SfuStats {
    /// Datagrams handed to the engine.
    pub datagrams: u64,
    /// Dropped: unknown ICE ufrag, or from an address that never completed ICE.
    pub dropped_unknown_peer: u64,
    /// Dropped: not STUN, DTLS, RTP or RTCP.
    pub dropped_invalid: u64,
    /// Refused by the peer connection they were routed to.
    pub rejected_by_peer: u64,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// Local UDP addresses announced as ICE host candidates.
    pub candidates: Vec<SocketAddr>,
    /// Seed for SIDs and ICE credentials (`None` = OS entropy).
    pub seed: Option<u64>,
}

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit {
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
        room: String,
        /// Room SID.
        sid: String,
    },
    /// The last participant left; the engine dropped the room's state.
    RoomFinished {
        /// LiveKit room name.
        room: String,
        /// Room SID.
        sid: String,
    },
    /// A track's media arrived and subscribers can get it.
    TrackPublished {
        /// LiveKit room name.
        room: String,
        /// The publisher.
        participant: Box<lk::ParticipantInfo>,
        /// The track.
        track: Box<lk::TrackInfo>,
    },
    /// A track went away (unpublished, or its publisher left).
    TrackUnpublished {
        /// LiveKit room name.
        room: String,
        /// The publisher.
        participant: Box<lk::ParticipantInfo>,
        /// The track.
        track: Box<lk::TrackInfo>,
    },
    /// A participant joined a room.
    ParticipantJoined {
        /// LiveKit room name.
        room: String,
        /// Participant identity.
        identity: String,
        /// Participant SID.
        sid: String,
        /// Session.
        session: SessionId,
        /// Its info at join time.
        info: Box<lk::ParticipantInfo>,
    },
    /// A participant left.
    ParticipantLeft {
        /// LiveKit room name.
        room: String,
        /// Participant identity.
        identity: String,
        /// Participant SID.
        sid: String,
        /// Session.
        session: SessionId,
        /// Why (LiveKit `DisconnectReason`).
        reason: i32,
        /// Its last info (state `DISCONNECTED`, with the disconnect reason).
        info: Box<lk::ParticipantInfo>,
        /// Whether its peer connections ever connected (else LiveKit's
        /// `participant_connection_aborted`).
        ever_connected: bool,
    },
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
    pub room: String,
    /// Identity (`sub`).
    pub identity: String,
    /// Display name.
    pub name: String,
    /// Metadata from the token.
    pub metadata: String,
    /// Permissions from the token grants.
    pub permission: lk::ParticipantPermission,
    /// Subscribe to every track automatically.
    pub auto_subscribe: bool,
    /// The client's `client_protocol`, copied into its info.
    pub client_protocol: i32,
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
        /// `DisconnectReason`.
        reason: i32,
    },
    /// Remove a participant by identity (operator, Matrix membership).
    Remove {
        /// Room name.
        room: String,
        /// Identity.
        identity: String,
        /// `DisconnectReason` shown to the client.
        reason: i32,
    },
    /// Server-initiated (un)mute of a published track (RoomService `MutePublishedTrack`): the
    /// track info changes for everyone and the publisher gets a `mute` message.
    MuteTrack {
        /// Room name.
        room: String,
        /// The publisher's identity.
        identity: String,
        /// The track.
        track_sid: String,
        /// Muted or not.
        muted: bool,
    },
    /// Changes a participant (RoomService `UpdateParticipant`); empty strings keep a field, an
    /// empty attribute value deletes the attribute.
    UpdateParticipant {
        /// Room name.
        room: String,
        /// Identity.
        identity: String,
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
        room: String,
        /// Identity.
        identity: String,
        /// Track SIDs.
        track_sids: Vec<String>,
        /// Subscribe (true) or unsubscribe.
        subscribe: bool,
    },
    /// A data packet from the server (RoomService `SendData`) to the packet's
    /// `destination_identities`, or to everyone when empty.
    SendData {
        /// Room name.
        room: String,
        /// The packet, sent as is.
        packet: Box<lk::DataPacket>,
        /// Over `_reliable` (else `_lossy`).
        reliable: bool,
    },
    /// Sends `room_update` with this info (its live fields filled in) to every participant
    /// (RoomService `UpdateRoomMetadata`).
    UpdateRoom {
        /// Room name.
        room: String,
        /// The room info (metadata and lifetime settings from the registry).
        info: Box<lk::Room>,
    },
    /// Removes every participant of a room with `ROOM_DELETED` (RoomService `DeleteRoom`).
    DeleteRoom {
        /// Room name.
        room: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PcKind {
    Publisher,
    Subscriber,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutState {
    ToOpen,
    Negotiating(Mid),
    Open(Mid),
    ToStop(Mid),
    NegotiatingStop(Mid),
}

/// A track forwarded to one subscriber.
struct OutTrack {
    publisher: SessionId,
    track_sid: String,
    kind: MediaKind,
    stream_id: String,
    state: OutState,
    timeline: Timeline,
    /// Simulcast layer forwarded now, and the one wanted (switch on its keyframe).
    current_rid: Option<Rid>,
    wanted_rid: Option<Rid>,
    waiting_keyframe: bool,
    disabled: bool,
    /// Highest quality the subscriber asked for (`update_track_settings`).
    max_quality: i32,
    /// Whether the subscriber was told the stream is paused.
    paused: bool,
}

impl OutTrack {
    fn mid(&self) -> Option<Mid> {
        match self.state {
            OutState::ToOpen => None,
            OutState::Negotiating(m)
            | OutState::Open(m)
            | OutState::ToStop(m)
            | OutState::NegotiatingStop(m) => Some(m),
        }
    }
}

/// A track published by a participant.
struct Track {
    info: lk::TrackInfo,
    cid: String,
    kind: MediaKind,
    mid: Option<Mid>,
    layers: Layers,
    /// Last dynacast state sent to the publisher (LOW, MEDIUM, HIGH enabled).
    sent_qualities: Option<[bool; 3]>,
    last_keyframe_request: Option<Instant>,
}

struct Pc {
    rtc: Rtc,
    ufrag: String,
    next_timeout: Instant,
    connected: bool,
}

struct Participant {
    session: SessionId,
    info: lk::ParticipantInfo,
    auto_subscribe: bool,
    publisher: Pc,
    subscriber: Pc,
    tracks: Vec<Track>,
    /// Media the publisher PC announced before a matching `add_track`.
    unbound_mids: Vec<(Mid, MediaKind, String)>,
    outs: Vec<OutTrack>,
    sub_pending: Option<(SdpPendingOffer, u32)>,
    sub_offer_id: u32,
    sub_reliable: Option<ChannelId>,
    sub_lossy: Option<ChannelId>,
    pub_channels: HashMap<ChannelId, bool>,
    joined_at: Instant,
    audio_level: f32,
    speaking: bool,
}

struct Room {
    sid: String,
    created_unix: i64,
    participants: BTreeMap<SessionId, Participant>,
}

/// Media handed from a publisher to its room.
struct Forward {
    publisher: SessionId,
    track_sid: String,
    data: MediaData,
    keyframe: bool,
}

/// The SFU engine.
pub struct Sfu {
    config: SfuConfig,
    ids: Ids,
    rooms: BTreeMap<String, Room>,
    sessions: HashMap<SessionId, String>,
    by_ufrag: HashMap<String, (SessionId, PcKind)>,
    by_addr: HashMap<SocketAddr, (SessionId, PcKind)>,
    out: VecDeque<Output>,
    next_speakers: Option<Instant>,
    next_quality: Option<Instant>,
    unix_now: i64,
    last_now: Instant,
    stats: SfuStats,
}

fn msg(m: Msg) -> SignalOut {
    SignalOut::Message(Box::new(m))
}

fn ms_from_level(level: i8) -> f32 {
    // RFC 6464: -dBov, 0 (loudest) ..= 127 (silence).
    let dbov = f32::from(level.clamp(0, 127));
    10f32.powf(-dbov / 20.0)
}

fn rid_rank(rid: &Rid) -> u8 {
    match &**rid {
        "f" => 3,
        "h" => 2,
        "q" => 1,
        _ => 0,
    }
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
            sessions: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            out: VecDeque::new(),
            next_speakers: None,
            next_quality: None,
            unix_now: 0,
            last_now: now,
            stats: SfuStats::default(),
        }
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
    pub fn participant_count(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, |r| r.participants.len())
    }

    /// Snapshot of a room's participants (Twirp `ListParticipants`).
    pub fn participants(&self, room: &str) -> Vec<lk::ParticipantInfo> {
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
        Output::Timeout(self.poll_timeout())
    }

    fn poll_timeout(&self) -> Instant {
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
        for room in self.rooms.values() {
            for p in room.participants.values() {
                take(p.publisher.next_timeout);
                take(p.subscriber.next_timeout);
                take(p.joined_at + CONNECT_DEADLINE);
            }
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
            Command::Disconnect { session, reason } => self.leave(now, session, reason, false),
            Command::Remove {
                room,
                identity,
                reason,
            } => {
                let found = self.rooms.get(&room).and_then(|r| {
                    r.participants
                        .values()
                        .find(|p| p.info.identity == identity)
                        .map(|p| p.session)
                });
                if let Some(session) = found {
                    self.leave(now, session, reason, true);
                }
            }
            admin @ (Command::MuteTrack { .. }
            | Command::UpdateParticipant { .. }
            | Command::UpdateSubscriptions { .. }
            | Command::SendData { .. }
            | Command::UpdateRoom { .. }
            | Command::DeleteRoom { .. }) => self.admin_command(now, admin),
        }
    }

    /// Handles a datagram that arrived at `destination` from `source` at `now`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        packet: &[u8],
    ) {
        self.last_now = now;
        self.stats.datagrams += 1;
        let stun_ufrag = super::stun::local_ufrag(packet);
        let target = match stun_ufrag {
            Some(ufrag) => self.by_ufrag.get(ufrag).copied(),
            None => self.by_addr.get(&source).copied(),
        };
        let Some((session, kind)) = target else {
            // Unknown ufrag, or not STUN from an address that never did ICE: one hash lookup.
            self.stats.dropped_unknown_peer += 1;
            return;
        };
        let Ok(receive) = Receive::new(Protocol::Udp, source, destination, packet) else {
            self.stats.dropped_invalid += 1;
            return;
        };
        let failed = match self.pc_mut(session, kind) {
            Some(pc) => pc.rtc.handle_input(Input::Receive(now, receive)).is_err(),
            None => true,
        };
        if failed {
            self.stats.rejected_by_peer += 1;
            tracing::debug!(session, "peer connection rejected input");
        } else if stun_ufrag.is_some() {
            // Learn the address from STUN carrying this connection's ufrag that it took
            // without error (str0m verifies message integrity before answering).
            self.by_addr.insert(source, (session, kind));
        }
        self.drain(now, session);
    }

    /// Drives time: timers of every peer connection and periodic room tasks.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        let mut due = Vec::new();
        let mut dead = Vec::new();
        for room in self.rooms.values() {
            for p in room.participants.values() {
                if p.publisher.next_timeout <= now || p.subscriber.next_timeout <= now {
                    due.push(p.session);
                }
                let never_connected = !p.subscriber.connected && !p.publisher.connected;
                if never_connected && now >= p.joined_at + CONNECT_DEADLINE {
                    dead.push((p.session, lk::DisconnectReason::JoinFailure as i32));
                } else if !p.subscriber.rtc.is_alive() || !p.publisher.rtc.is_alive() {
                    dead.push((p.session, lk::DisconnectReason::ConnectionTimeout as i32));
                }
            }
        }
        for session in due {
            for kind in [PcKind::Publisher, PcKind::Subscriber] {
                if let Some(pc) = self.pc_mut(session, kind) {
                    if pc.next_timeout <= now {
                        let _ = pc.rtc.handle_input(Input::Timeout(now));
                    }
                }
            }
            self.drain(now, session);
        }
        for (session, reason) in dead {
            tracing::info!(
                session,
                reason,
                "peer connection lost; removing participant"
            );
            self.leave(now, session, reason, true);
        }
        if self.next_speakers.is_some_and(|t| t <= now) {
            self.update_speakers(now);
        }
        if self.next_quality.is_some_and(|t| t <= now) {
            self.update_quality(now);
        }
    }

    // ------------------------------------------------------------------ join / leave

    fn new_pc(&mut self, now: Instant) -> Pc {
        let (ufrag, pass) = self.ids.ice_credentials();
        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .set_local_ice_credentials(str0m::IceCreds {
                ufrag: ufrag.clone(),
                pass,
            })
            .clear_codecs()
            .enable_opus(true, true)
            .enable_vp8(true)
            .enable_h264(true)
            .build(now);
        for addr in &self.config.candidates {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!(%addr, error = %e, "cannot use address as candidate"),
            }
        }
        Pc {
            rtc,
            ufrag,
            next_timeout: now,
            connected: false,
        }
    }

    fn join(&mut self, now: Instant, join: Join) {
        let Join {
            session,
            room: room_name,
            identity,
            name,
            metadata,
            permission,
            auto_subscribe,
            client_protocol,
        } = join;
        // One participant per identity: the newcomer replaces the old session.
        let duplicate = self.rooms.get(&room_name).and_then(|r| {
            r.participants
                .values()
                .find(|p| p.info.identity == identity)
                .map(|p| p.session)
        });
        if let Some(old) = duplicate {
            self.leave(
                now,
                old,
                lk::DisconnectReason::DuplicateIdentity as i32,
                true,
            );
        }
        let room_sid = self.ids.sid(ROOM_PREFIX);
        let unix = self.unix_now;
        if !self.rooms.contains_key(&room_name) {
            self.out.push_back(Output::Event(SfuEvent::RoomStarted {
                room: room_name.clone(),
                sid: room_sid.clone(),
            }));
        }
        let room = self.rooms.entry(room_name.clone()).or_insert_with(|| Room {
            sid: room_sid,
            created_unix: unix,
            participants: BTreeMap::new(),
        });
        let room_sid = room.sid.clone();
        let room_created = room.created_unix;
        let sid = self.ids.sid(PARTICIPANT_PREFIX);
        let span = tracing::info_span!("participant", room = %room_name, %identity, %sid);
        let _enter = span.enter();

        let publisher = self.new_pc(now);
        let subscriber = self.new_pc(now);

        let info = lk::ParticipantInfo {
            sid: sid.clone(),
            identity: identity.clone(),
            name,
            metadata,
            state: lk::participant_info::State::Joined as i32,
            joined_at: unix,
            joined_at_ms: unix * 1000,
            version: 1,
            permission: Some(permission.clone()),
            is_publisher: false,
            client_protocol,
            ..Default::default()
        };
        self.by_ufrag
            .insert(publisher.ufrag.clone(), (session, PcKind::Publisher));
        self.by_ufrag
            .insert(subscriber.ufrag.clone(), (session, PcKind::Subscriber));
        self.sessions.insert(session, room_name.clone());

        let mut participant = Participant {
            session,
            info: info.clone(),
            auto_subscribe: auto_subscribe && permission.can_subscribe,
            publisher,
            subscriber,
            tracks: Vec::new(),
            unbound_mids: Vec::new(),
            outs: Vec::new(),
            sub_pending: None,
            sub_offer_id: 0,
            sub_reliable: None,
            sub_lossy: None,
            pub_channels: HashMap::new(),
            joined_at: now,
            audio_level: 0.0,
            speaking: false,
        };

        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let others: Vec<lk::ParticipantInfo> = room
            .participants
            .values()
            .filter(|p| !p.info.permission.as_ref().is_some_and(|x| x.hidden))
            .map(|p| p.info.clone())
            .collect();

        let join = lk::JoinResponse {
            room: Some(lk::Room {
                sid: room_sid,
                name: room_name.clone(),
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
            ice_servers: Vec::new(),
            subscriber_primary: true,
            client_configuration: Some(lk::ClientConfiguration {
                resume_connection: lk::ClientConfigSetting::Disabled as i32,
                ..Default::default()
            }),
            ping_timeout: 15,
            ping_interval: 5,
            server_info: Some(lk::ServerInfo {
                edition: lk::server_info::Edition::Standard as i32,
                version: SERVER_VERSION.into(),
                protocol: PROTOCOL,
                debug_info: concat!("conclave ", env!("CARGO_PKG_VERSION")).into(),
                ..Default::default()
            }),
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
            for p in room.participants.values() {
                for t in &p.tracks {
                    if t.mid.is_some() {
                        participant.outs.push(new_out(p, t));
                    }
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
        room.participants.insert(session, participant);
        // The first subscriber offer: data channels plus existing tracks (fast start).
        self.renegotiate(now, session);
        let info = self
            .participant_mut(session)
            .map(|p| Box::new(p.info.clone()))
            .unwrap_or_default();
        self.out
            .push_back(Output::Event(SfuEvent::ParticipantJoined {
                room: room_name,
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

    fn leave(&mut self, now: Instant, session: SessionId, reason: i32, server_initiated: bool) {
        let Some(room_name) = self.sessions.remove(&session) else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let Some(mut p) = room.participants.remove(&session) else {
            return;
        };
        self.by_ufrag.remove(&p.publisher.ufrag);
        self.by_ufrag.remove(&p.subscriber.ufrag);
        self.by_addr.retain(|_, (s, _)| *s != session);
        if server_initiated {
            self.out.push_back(Output::Signal(
                session,
                msg(Msg::Leave(lk::LeaveRequest {
                    can_reconnect: false,
                    reason,
                    action: lk::leave_request::Action::Disconnect as i32,
                    regions: None,
                })),
            ));
        }
        self.out
            .push_back(Output::Signal(session, SignalOut::Close));
        p.publisher.rtc.disconnect();
        p.subscriber.rtc.disconnect();
        p.info.state = lk::participant_info::State::Disconnected as i32;
        p.info.version += 1;
        p.info.disconnect_reason = reason;
        for t in p.tracks.iter().filter(|t| t.mid.is_some()) {
            self.out
                .push_back(Output::Event(SfuEvent::TrackUnpublished {
                    room: room_name.clone(),
                    participant: Box::new(p.info.clone()),
                    track: Box::new(t.info.clone()),
                }));
        }
        p.info.tracks.clear();
        tracing::info!(room = %room_name, identity = %p.info.identity, reason, "participant left");
        let hidden = p.info.permission.as_ref().is_some_and(|x| x.hidden);
        let update = Msg::Update(lk::ParticipantUpdate {
            participants: vec![p.info.clone()],
        });
        let mut touched = Vec::new();
        for other in room.participants.values_mut() {
            if !hidden {
                self.out
                    .push_back(Output::Signal(other.session, msg(update.clone())));
            }
            let mut changed = false;
            for o in other.outs.iter_mut().filter(|o| o.publisher == session) {
                changed = true;
                o.state = match o.state {
                    OutState::Open(m) | OutState::Negotiating(m) => OutState::ToStop(m),
                    s => s,
                };
            }
            other
                .outs
                .retain(|o| !(o.publisher == session && o.state == OutState::ToOpen));
            if changed {
                touched.push(other.session);
            }
        }
        let finished = room.participants.is_empty().then(|| room.sid.clone());
        self.out.push_back(Output::Event(SfuEvent::ParticipantLeft {
            room: room_name.clone(),
            identity: p.info.identity.clone(),
            sid: p.info.sid.clone(),
            session,
            reason,
            ever_connected: p.publisher.connected || p.subscriber.connected,
            info: Box::new(p.info.clone()),
        }));
        if let Some(sid) = finished {
            self.rooms.remove(&room_name);
            self.out.push_back(Output::Event(SfuEvent::RoomFinished {
                room: room_name,
                sid,
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
                self.leave(
                    now,
                    session,
                    lk::DisconnectReason::ClientInitiated as i32,
                    false,
                );
                return;
            }
            Req::UpdateMetadata(u) => self.update_metadata(session, u),
            other => {
                tracing::debug!(session, request = ?std::mem::discriminant(&other), "ignored signal request");
            }
        }
        self.drain(now, session);
    }

    fn publisher_offer(&mut self, now: Instant, session: SessionId, sd: lk::SessionDescription) {
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        let offer = match SdpOffer::from_sdp_string(&sd.sdp) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(session, error = %e, "unparseable publisher offer");
                return;
            }
        };
        match p.publisher.rtc.sdp_api().accept_offer(offer) {
            Ok(answer) => {
                let answer = lk::SessionDescription {
                    r#type: "answer".into(),
                    sdp: answer.to_sdp_string(),
                    id: sd.id,
                    mid_to_track_id: HashMap::new(),
                };
                self.signal(session, Msg::Answer(answer));
            }
            Err(e) => tracing::warn!(session, error = %e, "publisher offer refused"),
        }
        self.drain(now, session);
    }

    fn subscriber_answer(&mut self, now: Instant, session: SessionId, sd: lk::SessionDescription) {
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        let Some((pending, id)) = p.sub_pending.take() else {
            tracing::debug!(session, "answer without a pending offer");
            return;
        };
        if sd.id != 0 && sd.id != id {
            tracing::debug!(session, got = sd.id, want = id, "stale subscriber answer");
            p.sub_pending = Some((pending, id));
            return;
        }
        let answer = match SdpAnswer::from_sdp_string(&sd.sdp) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(session, error = %e, "unparseable subscriber answer");
                return;
            }
        };
        if let Err(e) = p.subscriber.rtc.sdp_api().accept_answer(pending, answer) {
            tracing::warn!(session, error = %e, "subscriber answer refused");
            return;
        }
        for o in &mut p.outs {
            o.state = match o.state {
                OutState::Negotiating(m) => OutState::Open(m),
                s => s,
            };
        }
        p.outs
            .retain(|o| !matches!(o.state, OutState::NegotiatingStop(_)));
        // Newly open video needs a keyframe from its publisher.
        let wants: Vec<(SessionId, String)> = p
            .outs
            .iter()
            .filter(|o| o.kind == MediaKind::Video)
            .map(|o| (o.publisher, o.track_sid.clone()))
            .collect();
        for (publisher, track) in wants {
            self.request_keyframe(now, publisher, &track, None);
        }
        self.renegotiate(now, session);
        self.drain(now, session);
    }

    fn trickle(&mut self, session: SessionId, t: lk::TrickleRequest) {
        let kind = if t.target == lk::SignalTarget::Subscriber as i32 {
            PcKind::Subscriber
        } else {
            PcKind::Publisher
        };
        #[derive(serde::Deserialize)]
        struct Init {
            candidate: String,
        }
        let Ok(init) = serde_json::from_str::<Init>(&t.candidate_init) else {
            tracing::debug!(session, "unparseable trickle candidate");
            return;
        };
        if init.candidate.is_empty() {
            return; // end of candidates
        }
        let text = init.candidate.trim_start_matches("a=");
        match Candidate::from_sdp_string(text) {
            Ok(c) => {
                if let Some(pc) = self.pc_mut(session, kind) {
                    pc.rtc.add_remote_candidate(c);
                }
            }
            Err(e) => tracing::debug!(session, error = %e, "ignored remote candidate"),
        }
    }

    // Deprecated TrackInfo fields (layers, simulcast, stereo, disable_dtx) are still read by
    // older clients, so they are filled too.
    #[allow(deprecated)]
    fn add_track(&mut self, now: Instant, session: SessionId, req: lk::AddTrackRequest) {
        let track_sid = self.ids.sid(TRACK_PREFIX);
        let unix_now = self.unix_now;
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        let can_publish = p.info.permission.as_ref().is_some_and(|x| x.can_publish);
        if !can_publish {
            tracing::info!(session, cid = %req.cid, "add_track without canPublish refused");
            self.signal(
                session,
                Msg::RequestResponse(lk::RequestResponse {
                    reason: lk::request_response::Reason::NotAllowed as i32,
                    message: "no permission to publish".into(),
                    ..Default::default()
                }),
            );
            return;
        }
        if p.tracks.len() >= MAX_TRACKS_PER_PARTICIPANT || p.tracks.iter().any(|t| t.cid == req.cid)
        {
            tracing::warn!(session, cid = %req.cid, "add_track refused (limit or duplicate cid)");
            self.signal(
                session,
                Msg::RequestResponse(lk::RequestResponse {
                    reason: lk::request_response::Reason::LimitExceeded as i32,
                    message: "too many tracks or duplicate cid".into(),
                    ..Default::default()
                }),
            );
            return;
        }
        let kind = if req.r#type == lk::TrackType::Video as i32 {
            MediaKind::Video
        } else {
            MediaKind::Audio
        };
        let stream = if req.stream.is_empty() {
            match lk::TrackSource::try_from(req.source).unwrap_or(lk::TrackSource::Unknown) {
                lk::TrackSource::Camera | lk::TrackSource::Microphone => "camera".to_owned(),
                lk::TrackSource::ScreenShare | lk::TrackSource::ScreenShareAudio => {
                    "screen".to_owned()
                }
                _ => "unknown".to_owned(),
            }
        } else {
            req.stream.clone()
        };
        let mime = if kind == MediaKind::Video {
            "video/VP8"
        } else {
            "audio/opus"
        };
        let info = lk::TrackInfo {
            sid: track_sid,
            r#type: req.r#type,
            name: req.name.clone(),
            muted: req.muted,
            width: req.width,
            height: req.height,
            simulcast: req.layers.len() > 1
                || req.simulcast_codecs.iter().any(|c| c.layers.len() > 1),
            disable_dtx: req.disable_dtx,
            source: req.source,
            layers: req.layers.clone(),
            mime_type: mime.into(),
            codecs: vec![lk::SimulcastCodecInfo {
                mime_type: mime.into(),
                cid: req.cid.clone(),
                layers: req.layers.clone(),
                ..Default::default()
            }],
            stereo: req.stereo,
            disable_red: req.disable_red,
            encryption: req.encryption,
            stream,
            version: Some(lk::TimedVersion {
                unix_micro: unix_now * 1_000_000,
                ticks: 0,
            }),
            audio_features: req.audio_features.clone(),
            backup_codec_policy: req.backup_codec_policy,
            ..Default::default()
        };
        let mut track = Track {
            info: info.clone(),
            cid: req.cid.clone(),
            kind,
            mid: None,
            layers: Layers::from_request(if req.layers.is_empty() {
                req.simulcast_codecs
                    .first()
                    .map_or(&[][..], |c| c.layers.as_slice())
            } else {
                &req.layers
            }),
            sent_qualities: None,
            last_keyframe_request: None,
        };
        // Media may already be there (offer before add_track).
        if let Some(pos) = p
            .unbound_mids
            .iter()
            .position(|(_, _, tid)| *tid == req.cid)
            .or_else(|| p.unbound_mids.iter().position(|(_, k, _)| *k == kind))
        {
            let (mid, _, _) = p.unbound_mids.remove(pos);
            track.mid = Some(mid);
            track.info.mid = mid.to_string();
        }
        let bound = track.mid.is_some();
        let sid = track.info.sid.clone();
        p.tracks.push(track);
        p.info.is_publisher = true;
        tracing::info!(session, cid = %req.cid, track = %sid, "track published");
        self.signal(
            session,
            Msg::TrackPublished(lk::TrackPublishedResponse {
                cid: req.cid,
                track: Some(info),
            }),
        );
        self.broadcast_participant(session);
        if bound {
            self.subscribe_all_to(now, session, &sid);
        }
    }

    fn mute(&mut self, session: SessionId, track_sid: &str, muted: bool) {
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        let Some(t) = p.tracks.iter_mut().find(|t| t.info.sid == track_sid) else {
            return;
        };
        if t.info.muted == muted {
            return;
        }
        t.info.muted = muted;
        tracing::info!(session, track = track_sid, muted, "track mute changed");
        self.broadcast_participant(session);
    }

    fn update_metadata(&mut self, session: SessionId, u: lk::UpdateParticipantMetadata) {
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        let allowed = p
            .info
            .permission
            .as_ref()
            .is_some_and(|x| x.can_update_metadata);
        if !allowed {
            self.signal(
                session,
                Msg::RequestResponse(lk::RequestResponse {
                    request_id: u.request_id,
                    reason: lk::request_response::Reason::NotAllowed as i32,
                    message: "no permission to update metadata".into(),
                    ..Default::default()
                }),
            );
            return;
        }
        if !u.metadata.is_empty() {
            p.info.metadata = u.metadata;
        }
        if !u.name.is_empty() {
            p.info.name = u.name;
        }
        for (k, v) in u.attributes {
            if v.is_empty() {
                p.info.attributes.remove(&k);
            } else {
                p.info.attributes.insert(k, v);
            }
        }
        self.broadcast_participant(session);
        // The Rust SDK waits for this acknowledgement (JS waits for the echoed update).
        if u.request_id != 0 {
            self.signal(
                session,
                Msg::RequestResponse(lk::RequestResponse {
                    request_id: u.request_id,
                    reason: lk::request_response::Reason::Ok as i32,
                    ..Default::default()
                }),
            );
        }
    }

    fn subscription(&mut self, now: Instant, session: SessionId, s: lk::UpdateSubscription) {
        let mut sids = s.track_sids.clone();
        for pt in &s.participant_tracks {
            sids.extend(pt.track_sids.iter().cloned());
        }
        for sid in sids {
            if s.subscribe {
                self.subscribe(now, session, &sid);
            } else if let Some(p) = self.participant_mut(session) {
                for o in p.outs.iter_mut().filter(|o| o.track_sid == sid) {
                    o.state = match o.state {
                        OutState::Open(m) | OutState::Negotiating(m) => OutState::ToStop(m),
                        s => s,
                    };
                }
                p.outs
                    .retain(|o| !(o.track_sid == sid && o.state == OutState::ToOpen));
            }
        }
        self.renegotiate(now, session);
    }

    fn track_settings(&mut self, now: Instant, session: SessionId, s: lk::UpdateTrackSettings) {
        // Dimensions map to a quality through the publisher's announced layers.
        let mut wanted: Vec<(String, i32)> = Vec::new();
        for sid in &s.track_sids {
            let quality = if s.width > 0 || s.height > 0 {
                self.track(sid)
                    .map_or(simulcast::HIGH, |t| t.layers.quality_for(s.width, s.height))
            } else {
                s.quality.clamp(simulcast::LOW, simulcast::HIGH)
            };
            wanted.push((sid.clone(), quality));
        }
        tracing::debug!(session, settings = ?s, ?wanted, "track settings");
        #[allow(deprecated)]
        let off = s.disabled || s.quality == lk::VideoQuality::Off as i32;
        let mut keyframes = Vec::new();
        if let Some(p) = self.participant_mut(session) {
            for (sid, quality) in wanted {
                for o in p.outs.iter_mut().filter(|o| o.track_sid == sid) {
                    let was_disabled = o.disabled;
                    o.disabled = off;
                    let changed = o.max_quality != quality;
                    o.max_quality = quality;
                    if o.kind == MediaKind::Video && ((was_disabled && !off) || changed) {
                        if was_disabled {
                            o.waiting_keyframe = true;
                        }
                        keyframes.push((o.publisher, o.track_sid.clone()));
                    }
                }
            }
        }
        for (publisher, track) in keyframes {
            self.request_keyframe_for_subscribers(now, publisher, &track);
        }
        self.update_layers(now);
    }

    /// A published track by SID.
    fn track(&self, track_sid: &str) -> Option<&Track> {
        self.rooms.values().find_map(|r| {
            r.participants
                .values()
                .find_map(|p| p.tracks.iter().find(|t| t.info.sid == track_sid))
        })
    }

    /// Asks the publisher for keyframes of the layers its subscribers now want.
    fn request_keyframe_for_subscribers(&mut self, now: Instant, publisher: SessionId, sid: &str) {
        let mut rids: Vec<Option<Rid>> = Vec::new();
        if let Some(room_name) = self.sessions.get(&publisher).cloned() {
            if let Some(room) = self.rooms.get(&room_name) {
                let layers = room
                    .participants
                    .get(&publisher)
                    .and_then(|p| p.tracks.iter().find(|t| t.info.sid == sid))
                    .map(|t| &t.layers);
                for p in room.participants.values() {
                    for o in p.outs.iter().filter(|o| o.track_sid == sid && !o.disabled) {
                        let rid = layers.and_then(|l| l.choose(o.max_quality, now));
                        if !rids.contains(&rid) {
                            rids.push(rid);
                        }
                    }
                }
            }
        }
        for rid in rids {
            // Separate layers are separate requests; the throttle is per track, so clear it.
            if let Some(t) = self
                .participant_mut(publisher)
                .and_then(|p| p.tracks.iter_mut().find(|t| t.info.sid == sid))
            {
                t.last_keyframe_request = None;
            }
            self.request_keyframe(now, publisher, sid, rid);
        }
    }

    /// Dynacast and stream state: tells publishers which simulcast qualities anyone watches,
    /// and subscribers when a stream they get stopped or resumed.
    // `subscribed_qualities` is deprecated in favour of `subscribed_codecs` but older clients
    // still read it; both are filled.
    #[allow(deprecated)]
    fn update_layers(&mut self, now: Instant) {
        for room in self.rooms.values_mut() {
            // What subscribers want of each video track, and whether it is alive.
            let mut wants: Vec<(SessionId, String, Option<i32>, bool)> = Vec::new();
            for p in room.participants.values() {
                for t in p.tracks.iter().filter(|t| t.kind == MediaKind::Video) {
                    let max = room
                        .participants
                        .values()
                        .flat_map(|s| s.outs.iter())
                        .filter(|o| o.track_sid == t.info.sid && !o.disabled)
                        .map(|o| o.max_quality)
                        .max();
                    wants.push((p.session, t.info.sid.clone(), max, t.layers.any_alive(now)));
                }
            }
            for (publisher, sid, max, alive) in wants {
                let Some(p) = room.participants.get_mut(&publisher) else {
                    continue;
                };
                if let Some(t) = p.tracks.iter_mut().find(|t| t.info.sid == sid) {
                    let enabled = simulcast::enabled_qualities(max);
                    if t.layers.is_simulcast() && t.sent_qualities != Some(enabled) {
                        t.sent_qualities = Some(enabled);
                        let qualities: Vec<lk::SubscribedQuality> = enabled
                            .iter()
                            .enumerate()
                            .map(|(q, on)| lk::SubscribedQuality {
                                quality: q as i32,
                                enabled: *on,
                            })
                            .collect();
                        let codec = t
                            .info
                            .mime_type
                            .split('/')
                            .nth(1)
                            .unwrap_or("vp8")
                            .to_ascii_lowercase();
                        let update = Msg::SubscribedQualityUpdate(lk::SubscribedQualityUpdate {
                            track_sid: sid.clone(),
                            subscribed_qualities: qualities.clone(),
                            subscribed_codecs: vec![lk::SubscribedCodec { codec, qualities }],
                        });
                        tracing::info!(
                            track = %sid,
                            low = enabled[0],
                            medium = enabled[1],
                            high = enabled[2],
                            "dynacast: publisher told which layers to send"
                        );
                        self.out.push_back(Output::Signal(publisher, msg(update)));
                    }
                }
                let publisher_sid = p.info.sid.clone();
                for s in room.participants.values_mut() {
                    let session = s.session;
                    for o in s.outs.iter_mut().filter(|o| o.track_sid == sid) {
                        let paused = !alive || o.disabled;
                        if paused != o.paused && matches!(o.state, OutState::Open(_)) {
                            o.paused = paused;
                            let state = if paused {
                                lk::StreamState::Paused
                            } else {
                                lk::StreamState::Active
                            };
                            let m = Msg::StreamStateUpdate(lk::StreamStateUpdate {
                                stream_states: vec![lk::StreamStateInfo {
                                    participant_sid: publisher_sid.clone(),
                                    track_sid: sid.clone(),
                                    state: state as i32,
                                }],
                            });
                            self.out.push_back(Output::Signal(session, msg(m)));
                        }
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------------ subscriptions

    fn subscribe_all_to(&mut self, now: Instant, publisher: SessionId, track_sid: &str) {
        let Some(room_name) = self.sessions.get(&publisher).cloned() else {
            return;
        };
        // Media is bound: the track is published (webhooks).
        let published = self.participant_mut(publisher).and_then(|p| {
            let track = p.tracks.iter().find(|t| t.info.sid == track_sid)?;
            let mut info = p.info.clone();
            info.tracks = p.tracks.iter().map(|t| t.info.clone()).collect();
            Some((Box::new(info), Box::new(track.info.clone())))
        });
        if let Some((participant, track)) = published {
            self.out.push_back(Output::Event(SfuEvent::TrackPublished {
                room: room_name.clone(),
                participant,
                track,
            }));
        }
        let subscribers: Vec<SessionId> = self
            .rooms
            .get(&room_name)
            .map(|r| {
                r.participants
                    .values()
                    .filter(|p| p.session != publisher && p.auto_subscribe)
                    .map(|p| p.session)
                    .collect()
            })
            .unwrap_or_default();
        for s in subscribers {
            self.subscribe(now, s, track_sid);
            self.renegotiate(now, s);
            self.drain(now, s);
        }
    }

    fn subscribe(&mut self, _now: Instant, session: SessionId, track_sid: &str) {
        let Some(room_name) = self.sessions.get(&session).cloned() else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let found = room.participants.values().find_map(|p| {
            p.tracks
                .iter()
                .find(|t| t.info.sid == track_sid && t.mid.is_some())
                .map(|t| (p.session, new_out(p, t)))
        });
        let Some((publisher, out)) = found else {
            return;
        };
        if publisher == session {
            return;
        }
        let Some(p) = room.participants.get_mut(&session) else {
            return;
        };
        let may = p.info.permission.as_ref().is_some_and(|x| x.can_subscribe);
        if !may || p.outs.iter().any(|o| o.track_sid == track_sid) {
            return;
        }
        p.outs.push(out);
    }

    /// Sends a subscriber offer if changes are waiting and none is in flight.
    fn renegotiate(&mut self, _now: Instant, session: SessionId) {
        let id = {
            let Some(p) = self.participant_mut(session) else {
                return;
            };
            if p.sub_pending.is_some() {
                return;
            }
            p.sub_offer_id + 1
        };
        let Some(room_name) = self.sessions.get(&session).cloned() else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let Some(p) = room.participants.get_mut(&session) else {
            return;
        };
        let mut api = p.subscriber.rtc.sdp_api();
        if p.sub_reliable.is_none() {
            // Server-created channels on the subscriber PC (subscriber_primary): clients adopt
            // them by label.
            p.sub_reliable = Some(api.add_channel_with_config(ChannelConfig {
                label: "_reliable".into(),
                ordered: true,
                reliability: Reliability::Reliable,
                negotiated: None,
                protocol: String::new(),
            }));
            p.sub_lossy = Some(api.add_channel_with_config(ChannelConfig {
                label: "_lossy".into(),
                ordered: false,
                reliability: Reliability::MaxRetransmits { retransmits: 0 },
                negotiated: None,
                protocol: String::new(),
            }));
        }
        for o in &mut p.outs {
            match o.state {
                OutState::ToOpen => {
                    let mid = api.add_media(
                        o.kind,
                        Direction::SendOnly,
                        Some(o.stream_id.clone()),
                        Some(o.track_sid.clone()),
                        None,
                    );
                    o.state = OutState::Negotiating(mid);
                }
                OutState::ToStop(m) => {
                    api.stop_media(m);
                    o.state = OutState::NegotiatingStop(m);
                }
                _ => {}
            }
        }
        if !api.has_changes() {
            return;
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        let mut mid_to_track_id = HashMap::new();
        for o in &p.outs {
            if let Some(m) = o.mid() {
                mid_to_track_id.insert(m.to_string(), o.track_sid.clone());
            }
        }
        p.sub_offer_id = id;
        p.sub_pending = Some((pending, id));
        let sd = lk::SessionDescription {
            r#type: "offer".into(),
            sdp: offer.to_sdp_string(),
            id,
            mid_to_track_id,
        };
        self.signal(session, Msg::Offer(sd));
    }

    // ------------------------------------------------------------------ draining

    /// Drains both peer connections of `session` (and of anyone its media reached).
    fn drain(&mut self, now: Instant, session: SessionId) {
        let mut queue = VecDeque::from([session]);
        let mut rounds = 0;
        while let Some(s) = queue.pop_front() {
            rounds += 1;
            if rounds > 10_000 {
                tracing::error!("drain did not settle; giving up this round");
                break;
            }
            let forwards = self.drain_one(now, s);
            for f in forwards {
                for t in self.forward(now, f) {
                    if !queue.contains(&t) {
                        queue.push_back(t);
                    }
                }
            }
        }
    }

    fn drain_one(&mut self, now: Instant, session: SessionId) -> Vec<Forward> {
        let mut forwards = Vec::new();
        let mut keyframe_wanted = Vec::new();
        let mut data_out: Vec<(bool, Vec<u8>)> = Vec::new();
        let mut newly_bound = Vec::new();
        let mut renegotiate = false;
        let mut unpublished = Vec::new();
        let mut dead = false;
        {
            let Some(room_name) = self.sessions.get(&session).cloned() else {
                return forwards;
            };
            let Some(room) = self.rooms.get_mut(&room_name) else {
                return forwards;
            };
            let Some(p) = room.participants.get_mut(&session) else {
                return forwards;
            };
            for kind in [PcKind::Publisher, PcKind::Subscriber] {
                loop {
                    let pc = match kind {
                        PcKind::Publisher => &mut p.publisher,
                        PcKind::Subscriber => &mut p.subscriber,
                    };
                    let output = match pc.rtc.poll_output() {
                        Ok(o) => o,
                        Err(e) => {
                            tracing::info!(session, error = %e, "peer connection failed");
                            dead = true;
                            break;
                        }
                    };
                    match output {
                        RtcOutput::Timeout(t) => {
                            pc.next_timeout = t;
                            break;
                        }
                        RtcOutput::Transmit(t) => {
                            self.out.push_back(Output::Transmit(Transmit {
                                source: t.source,
                                destination: t.destination,
                                contents: t.contents.into(),
                            }));
                        }
                        RtcOutput::Event(e) => match e {
                            Event::Connected => {
                                tracing::debug!(session, ?kind, "peer connection connected");
                                pc.connected = true;
                                if kind == PcKind::Subscriber
                                    && p.info.state != lk::participant_info::State::Active as i32
                                {
                                    p.info.state = lk::participant_info::State::Active as i32;
                                }
                            }
                            Event::IceConnectionStateChange(state) => {
                                tracing::debug!(session, ?kind, ?state, "ICE state");
                            }
                            // Only media the client sends: v0 publisher offers may also carry
                            // recvonly transceivers (sendonly from here), which are no tracks.
                            Event::MediaAdded(added)
                                if kind == PcKind::Publisher
                                    && matches!(
                                        added.direction,
                                        Direction::RecvOnly | Direction::SendRecv
                                    ) =>
                            {
                                let tid = pc
                                    .rtc
                                    .media(added.mid)
                                    .map(|m| m.track_id().to_owned())
                                    .unwrap_or_default();
                                let pos = p
                                    .tracks
                                    .iter()
                                    .position(|t| t.mid.is_none() && t.cid == tid)
                                    .or_else(|| {
                                        p.tracks
                                            .iter()
                                            .position(|t| t.mid.is_none() && t.kind == added.kind)
                                    });
                                match pos {
                                    Some(i) => {
                                        p.tracks[i].mid = Some(added.mid);
                                        p.tracks[i].info.mid = added.mid.to_string();
                                        newly_bound.push(p.tracks[i].info.sid.clone());
                                    }
                                    None => p.unbound_mids.push((added.mid, added.kind, tid)),
                                }
                            }
                            Event::MediaChanged(ch) if kind == PcKind::Publisher => {
                                if matches!(ch.direction, Direction::Inactive | Direction::SendOnly)
                                {
                                    if let Some(i) =
                                        p.tracks.iter().position(|t| t.mid == Some(ch.mid))
                                    {
                                        let t = p.tracks.remove(i);
                                        self.out.push_back(Output::Event(
                                            SfuEvent::TrackUnpublished {
                                                room: room_name.clone(),
                                                participant: Box::new(p.info.clone()),
                                                track: Box::new(t.info.clone()),
                                            },
                                        ));
                                        unpublished.push(t.info.sid);
                                    }
                                }
                            }
                            Event::MediaData(data) if kind == PcKind::Publisher => {
                                if let Some(t) =
                                    p.tracks.iter_mut().find(|t| t.mid == Some(data.mid))
                                {
                                    match data.rid {
                                        Some(rid) => t.layers.saw(rid, now),
                                        None => t.layers.saw_plain(now),
                                    }
                                    if t.kind == MediaKind::Audio {
                                        if let Some(level) = data.ext_vals.audio_level {
                                            let l = ms_from_level(level);
                                            p.audio_level = p.audio_level.max(l);
                                        }
                                    }
                                    if !data.contiguous && t.kind == MediaKind::Video {
                                        keyframe_wanted.push((t.info.sid.clone(), data.rid));
                                    }
                                    let keyframe = data.is_keyframe();
                                    forwards.push(Forward {
                                        publisher: session,
                                        track_sid: t.info.sid.clone(),
                                        data,
                                        keyframe,
                                    });
                                }
                            }
                            Event::KeyframeRequest(req) if kind == PcKind::Subscriber => {
                                if let Some(o) = p.outs.iter().find(|o| o.mid() == Some(req.mid)) {
                                    keyframe_wanted.push((o.track_sid.clone(), o.current_rid));
                                }
                            }
                            Event::ChannelOpen(id, label) if kind == PcKind::Publisher => {
                                p.pub_channels.insert(id, label != "_lossy");
                            }
                            Event::ChannelData(d) if kind == PcKind::Publisher => {
                                let reliable = p.pub_channels.get(&d.id).copied().unwrap_or(true);
                                data_out.push((reliable, d.data));
                            }
                            _ => {}
                        },
                    }
                }
            }
            if !unpublished.is_empty() {
                renegotiate = true;
            }
        }
        if dead {
            self.leave(
                now,
                session,
                lk::DisconnectReason::MediaFailure as i32,
                true,
            );
            return Vec::new();
        }
        for (track, rid) in keyframe_wanted {
            // A subscriber's request goes to the track's publisher.
            let publisher = self.publisher_of(&track).unwrap_or(session);
            self.request_keyframe(now, publisher, &track, rid);
        }
        for sid in newly_bound {
            self.subscribe_all_to(now, session, &sid);
        }
        if renegotiate {
            for sid in &unpublished {
                self.unpublish(now, session, sid);
            }
            self.broadcast_participant(session);
        }
        for (reliable, bytes) in data_out {
            self.relay_data(session, reliable, &bytes);
        }
        forwards
    }

    fn publisher_of(&self, track_sid: &str) -> Option<SessionId> {
        self.rooms.values().find_map(|r| {
            r.participants
                .values()
                .find(|p| p.tracks.iter().any(|t| t.info.sid == track_sid))
                .map(|p| p.session)
        })
    }

    fn unpublish(&mut self, now: Instant, publisher: SessionId, track_sid: &str) {
        let Some(room_name) = self.sessions.get(&publisher).cloned() else {
            return;
        };
        let mut touched = Vec::new();
        if let Some(room) = self.rooms.get_mut(&room_name) {
            for p in room.participants.values_mut() {
                let mut hit = false;
                for o in p.outs.iter_mut().filter(|o| o.track_sid == track_sid) {
                    hit = true;
                    o.state = match o.state {
                        OutState::Open(m) | OutState::Negotiating(m) => OutState::ToStop(m),
                        s => s,
                    };
                }
                p.outs
                    .retain(|o| !(o.track_sid == track_sid && o.state == OutState::ToOpen));
                if hit {
                    touched.push(p.session);
                }
            }
        }
        for s in touched {
            self.renegotiate(now, s);
        }
    }

    /// Forwards one frame to every subscriber of its track; returns the sessions touched.
    fn forward(&mut self, now: Instant, f: Forward) -> Vec<SessionId> {
        let Some(room_name) = self.sessions.get(&f.publisher).cloned() else {
            return Vec::new();
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return Vec::new();
        };
        // Borrow the publisher's layer table while walking the subscribers (no copy).
        let mut layers = room
            .participants
            .get_mut(&f.publisher)
            .and_then(|p| p.tracks.iter_mut().find(|t| t.info.sid == f.track_sid))
            .map(|t| std::mem::take(&mut t.layers))
            .unwrap_or_default();
        let mut touched = Vec::new();
        let mut keyframe_of: Option<Option<Rid>> = None;
        let source_key = f.data.rid.map_or(0, |r| u64::from(rid_rank(&r))) + 1;
        for p in room.participants.values_mut() {
            if p.session == f.publisher {
                continue;
            }
            let Some(o) = p.outs.iter_mut().find(|o| o.track_sid == f.track_sid) else {
                continue;
            };
            let OutState::Open(mid) = o.state else {
                continue;
            };
            if o.disabled {
                continue;
            }
            if f.data.rid.is_some() {
                o.wanted_rid = layers.choose(o.max_quality, now);
                if o.current_rid != f.data.rid {
                    // Switch only onto a keyframe of the wanted layer; until then the current
                    // layer keeps flowing.
                    if f.data.rid == o.wanted_rid && f.keyframe {
                        tracing::debug!(
                            session = p.session,
                            track = %f.track_sid,
                            from = ?o.current_rid,
                            to = ?f.data.rid,
                            "simulcast layer switch"
                        );
                        o.current_rid = f.data.rid;
                        o.waiting_keyframe = false;
                    } else {
                        if f.data.rid == o.wanted_rid {
                            keyframe_of = Some(o.wanted_rid);
                        }
                        continue;
                    }
                }
            }
            if o.kind == MediaKind::Video && o.waiting_keyframe {
                if !f.keyframe {
                    keyframe_of = Some(f.data.rid);
                    continue;
                }
                o.waiting_keyframe = false;
            }
            let Some(writer) = p.subscriber.rtc.writer(mid) else {
                continue;
            };
            let Some(pt) = writer.match_params(f.data.params) else {
                tracing::debug!(session = p.session, track = %f.track_sid, "no matching payload type");
                continue;
            };
            let hz = f.data.time.frequency().get();
            let ts = o.timeline.map(source_key, f.data.time.numer(), hz, now);
            let time = str0m::media::MediaTime::new(ts, f.data.time.frequency());
            if let Err(e) = writer.write(pt, f.data.network_time, time, f.data.data.clone()) {
                tracing::debug!(session = p.session, error = %e, "write failed");
                continue;
            }
            touched.push(p.session);
        }
        if let Some(t) = room
            .participants
            .get_mut(&f.publisher)
            .and_then(|p| p.tracks.iter_mut().find(|t| t.info.sid == f.track_sid))
        {
            std::mem::swap(&mut t.layers, &mut layers);
        }
        if let Some(rid) = keyframe_of {
            self.request_keyframe(now, f.publisher, &f.track_sid, rid);
        }
        touched
    }

    fn request_keyframe(
        &mut self,
        now: Instant,
        publisher: SessionId,
        track_sid: &str,
        rid: Option<Rid>,
    ) {
        let Some(p) = self.participant_mut(publisher) else {
            return;
        };
        let Some(t) = p.tracks.iter_mut().find(|t| t.info.sid == track_sid) else {
            return;
        };
        if t.kind != MediaKind::Video {
            return;
        }
        if t.last_keyframe_request
            .is_some_and(|at| now.saturating_duration_since(at) < KEYFRAME_THROTTLE)
        {
            return;
        }
        let Some(mid) = t.mid else {
            return;
        };
        t.last_keyframe_request = Some(now);
        let rid = rid.or_else(|| t.layers.choose(simulcast::HIGH, now));
        if let Some(mut w) = p.publisher.rtc.writer(mid) {
            if let Err(e) = w.request_keyframe(rid, KeyframeRequestKind::Pli) {
                tracing::debug!(error = %e, "keyframe request failed");
            }
        }
    }

    fn relay_data(&mut self, sender: SessionId, reliable: bool, bytes: &[u8]) {
        let Ok(mut packet) = lk::DataPacket::decode(bytes) else {
            tracing::debug!(sender, "undecodable data packet dropped");
            return;
        };
        let Some(room_name) = self.sessions.get(&sender).cloned() else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let Some(from) = room.participants.get(&sender) else {
            return;
        };
        if !from
            .info
            .permission
            .as_ref()
            .is_some_and(|x| x.can_publish_data)
        {
            return;
        }
        packet.participant_identity = from.info.identity.clone();
        packet.participant_sid = from.info.sid.clone();
        #[allow(deprecated)]
        if let Some(lk::data_packet::Value::User(u)) = packet.value.as_mut() {
            u.participant_identity = from.info.identity.clone();
            u.participant_sid = from.info.sid.clone();
        }
        let destinations = std::mem::take(&mut packet.destination_identities);
        let encoded = packet.encode_to_vec();
        for p in room.participants.values_mut() {
            if p.session == sender {
                continue;
            }
            if !destinations.is_empty() && !destinations.contains(&p.info.identity) {
                continue;
            }
            let id = if reliable {
                p.sub_reliable
            } else {
                p.sub_lossy
            };
            if let Some(mut ch) = id.and_then(|id| p.subscriber.rtc.channel(id)) {
                if let Err(e) = ch.write(true, &encoded) {
                    tracing::debug!(session = p.session, error = %e, "data write failed");
                }
            }
        }
    }

    // ------------------------------------------------------------------ periodic

    fn update_speakers(&mut self, now: Instant) {
        self.next_speakers = Some(now + SPEAKER_INTERVAL);
        self.update_layers(now);
        for room in self.rooms.values_mut() {
            let mut changed = Vec::new();
            for p in room.participants.values_mut() {
                let level = p.audio_level;
                p.audio_level = 0.0;
                let speaking = level > 0.02;
                if speaking != p.speaking || speaking {
                    changed.push(lk::SpeakerInfo {
                        sid: p.info.sid.clone(),
                        level,
                        active: speaking,
                    });
                }
                p.speaking = speaking;
            }
            if changed.is_empty() {
                continue;
            }
            let m = Msg::SpeakersChanged(lk::SpeakersChanged { speakers: changed });
            for p in room.participants.values() {
                self.out
                    .push_back(Output::Signal(p.session, msg(m.clone())));
            }
        }
    }

    fn update_quality(&mut self, now: Instant) {
        self.next_quality = Some(now + QUALITY_INTERVAL);
        for room in self.rooms.values() {
            let updates: Vec<lk::ConnectionQualityInfo> = room
                .participants
                .values()
                .map(|p| lk::ConnectionQualityInfo {
                    participant_sid: p.info.sid.clone(),
                    quality: if p.subscriber.connected {
                        lk::ConnectionQuality::Excellent as i32
                    } else {
                        lk::ConnectionQuality::Poor as i32
                    },
                    score: if p.subscriber.connected { 5.0 } else { 1.0 },
                })
                .collect();
            let m = Msg::ConnectionQuality(lk::ConnectionQualityUpdate { updates });
            for p in room.participants.values() {
                self.out
                    .push_back(Output::Signal(p.session, msg(m.clone())));
            }
        }
    }

    // ------------------------------------------------------------------ helpers

    fn participant_mut(&mut self, session: SessionId) -> Option<&mut Participant> {
        let room = self.sessions.get(&session)?;
        self.rooms.get_mut(room)?.participants.get_mut(&session)
    }

    fn pc_mut(&mut self, session: SessionId, kind: PcKind) -> Option<&mut Pc> {
        let p = self.participant_mut(session)?;
        Some(match kind {
            PcKind::Publisher => &mut p.publisher,
            PcKind::Subscriber => &mut p.subscriber,
        })
    }

    /// Bumps the participant's version and sends its complete info to the whole room
    /// (including itself).
    fn broadcast_participant(&mut self, session: SessionId) {
        let Some(room_name) = self.sessions.get(&session).cloned() else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let Some(p) = room.participants.get_mut(&session) else {
            return;
        };
        p.info.version += 1;
        p.info.tracks = p.tracks.iter().map(|t| t.info.clone()).collect();
        let hidden = p.info.permission.as_ref().is_some_and(|x| x.hidden);
        let update = Msg::Update(lk::ParticipantUpdate {
            participants: vec![p.info.clone()],
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

fn new_out(publisher: &Participant, t: &Track) -> OutTrack {
    OutTrack {
        publisher: publisher.session,
        track_sid: t.info.sid.clone(),
        kind: t.kind,
        stream_id: format!("{}|{}", publisher.info.sid, t.info.sid),
        state: OutState::ToOpen,
        timeline: Timeline::default(),
        current_rid: None,
        wanted_rid: None,
        waiting_keyframe: t.kind == MediaKind::Video,
        disabled: false,
        max_quality: simulcast::HIGH,
        paused: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sfu(now: Instant) -> Sfu {
        Sfu::new(
            SfuConfig {
                candidates: vec!["127.0.0.1:7882".parse().unwrap()],
                seed: Some(42),
            },
            now,
        )
    }

    fn permission(publish: bool) -> lk::ParticipantPermission {
        lk::ParticipantPermission {
            can_subscribe: true,
            can_publish: publish,
            can_publish_data: publish,
            can_update_metadata: true,
            ..Default::default()
        }
    }

    fn join(s: &mut Sfu, now: Instant, session: SessionId, identity: &str) {
        s.handle_command(
            now,
            Command::Join(Join {
                session,
                room: "room".into(),
                identity: identity.into(),
                name: identity.into(),
                metadata: String::new(),
                permission: permission(true),
                auto_subscribe: true,
                client_protocol: 2,
            }),
        );
    }

    /// Drains outputs: signal messages per session, in order, and lifecycle events.
    fn drain(s: &mut Sfu) -> (Vec<(SessionId, Msg)>, Vec<SfuEvent>, usize) {
        let mut msgs = Vec::new();
        let mut events = Vec::new();
        let mut closes = 0;
        loop {
            match s.poll_output() {
                Output::Timeout(_) => return (msgs, events, closes),
                Output::Signal(id, SignalOut::Message(m)) => msgs.push((id, *m)),
                Output::Signal(_, SignalOut::Close) => closes += 1,
                Output::Event(e) => events.push(e),
                Output::Transmit(_) => {}
            }
        }
    }

    fn request(s: &mut Sfu, now: Instant, session: SessionId, m: lk::signal_request::Message) {
        s.handle_command(
            now,
            Command::Request {
                session,
                message: Box::new(m),
            },
        );
    }

    fn add_track(cid: &str, video: bool) -> lk::signal_request::Message {
        lk::signal_request::Message::AddTrack(lk::AddTrackRequest {
            cid: cid.into(),
            name: cid.into(),
            r#type: if video {
                lk::TrackType::Video as i32
            } else {
                lk::TrackType::Audio as i32
            },
            source: if video {
                lk::TrackSource::Camera as i32
            } else {
                lk::TrackSource::Microphone as i32
            },
            encryption: lk::encryption::Type::Gcm as i32,
            ..Default::default()
        })
    }

    /// A publisher offer from a str0m "client" sending one audio track whose msid track id is
    /// `cid`.
    fn publisher_offer(now: Instant, cid: &str) -> (Rtc, String) {
        let mut client = Rtc::builder().build(now);
        let mut api = client.sdp_api();
        api.add_media(
            MediaKind::Audio,
            Direction::SendOnly,
            Some("stream".into()),
            Some(cid.into()),
            None,
        );
        api.add_channel("_reliable".into());
        let (offer, _pending) = api.apply().unwrap();
        (client, offer.to_sdp_string())
    }

    fn versions_of(msgs: &[(SessionId, Msg)], to: SessionId, sid: &str) -> Vec<u32> {
        msgs.iter()
            .filter(|(id, _)| *id == to)
            .filter_map(|(_, m)| match m {
                Msg::Update(u) => u
                    .participants
                    .iter()
                    .find(|p| p.sid == sid)
                    .map(|p| p.version),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn join_response_comes_first_then_the_subscriber_offer() {
        let now = Instant::now();
        let mut s = sfu(now);
        join(&mut s, now, 1, "alice");
        let (msgs, events, _) = drain(&mut s);
        let mine: Vec<&Msg> = msgs
            .iter()
            .filter(|(id, _)| *id == 1)
            .map(|(_, m)| m)
            .collect();
        let Msg::Join(j) = mine[0] else {
            panic!("first message must be join, got {:?}", mine[0]);
        };
        let p = j.participant.as_ref().unwrap();
        assert!(p.sid.starts_with("PA_") && j.room.as_ref().unwrap().sid.starts_with("RM_"));
        assert!(p.permission.as_ref().unwrap().can_publish);
        assert!(!j.server_version.is_empty() && j.server_version != "0.15.1");
        assert_eq!(j.server_info.as_ref().unwrap().protocol, 17);
        assert!(j.subscriber_primary);
        assert!(j.ping_interval > 0 && j.ping_timeout > 0);
        assert_eq!(
            j.client_configuration.as_ref().unwrap().resume_connection,
            lk::ClientConfigSetting::Disabled as i32
        );
        let Msg::Offer(o) = mine[1] else {
            panic!("subscriber offer must follow join, got {:?}", mine[1]);
        };
        assert!(
            o.sdp.contains("m=application"),
            "offer carries data channels"
        );
        assert!(o.id > 0);
        assert!(matches!(events[0], SfuEvent::RoomStarted { .. }));
        assert!(matches!(events[1], SfuEvent::ParticipantJoined { .. }));
    }

    #[test]
    fn others_learn_of_joins_and_leaves_with_increasing_versions() {
        let now = Instant::now();
        let mut s = sfu(now);
        join(&mut s, now, 1, "alice");
        drain(&mut s);
        join(&mut s, now, 2, "bob");
        let (msgs, _, _) = drain(&mut s);
        let Msg::Join(j) = &msgs.iter().find(|(id, _)| *id == 2).unwrap().1 else {
            panic!("bob's first message is join");
        };
        assert_eq!(j.other_participants.len(), 1);
        assert_eq!(j.other_participants[0].identity, "alice");
        let bob_sid = j.participant.as_ref().unwrap().sid.clone();
        let alice_sid = j.other_participants[0].sid.clone();
        assert_eq!(
            versions_of(&msgs, 1, &bob_sid),
            vec![1],
            "alice hears of bob"
        );

        // alice publishes and mutes: every update about her has a higher version.
        request(&mut s, now, 1, add_track("mic", false));
        request(
            &mut s,
            now,
            1,
            lk::signal_request::Message::Mute(lk::MuteTrackRequest {
                sid: String::new(),
                muted: true,
            }),
        );
        let (msgs, _, _) = drain(&mut s);
        let published = msgs.iter().find_map(|(id, m)| match m {
            Msg::TrackPublished(t) if *id == 1 => Some(t.clone()),
            _ => None,
        });
        let published = published.expect("track_published to the publisher");
        assert_eq!(published.cid, "mic", "cid echoed");
        let track = published.track.unwrap();
        assert!(track.sid.starts_with("TR_"));
        assert_eq!(
            track.encryption,
            lk::encryption::Type::Gcm as i32,
            "encryption echoed"
        );
        let track_sid = track.sid.clone();
        request(
            &mut s,
            now,
            1,
            lk::signal_request::Message::Mute(lk::MuteTrackRequest {
                sid: track_sid,
                muted: true,
            }),
        );
        let (more, _, _) = drain(&mut s);
        let mut v_bob = versions_of(&msgs, 2, &alice_sid);
        v_bob.extend(versions_of(&more, 2, &alice_sid));
        assert!(
            v_bob.len() >= 2,
            "bob got alice's publish and mute: {v_bob:?}"
        );
        assert!(
            v_bob.windows(2).all(|w| w[1] > w[0]),
            "strictly increasing: {v_bob:?}"
        );
        let muted = more.iter().any(|(id, m)| {
            *id == 2
                && matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.tracks.iter().any(|t| t.muted)))
        });
        assert!(muted, "mute reflected to bob");

        // bob leaves: alice sees him disconnected, with a higher version.
        s.handle_command(
            now,
            Command::Disconnect {
                session: 2,
                reason: lk::DisconnectReason::ClientInitiated as i32,
            },
        );
        let (msgs, events, closes) = drain(&mut s);
        let gone = msgs.iter().find_map(|(id, m)| match m {
            Msg::Update(u) if *id == 1 => u.participants.iter().find(|p| p.sid == bob_sid).cloned(),
            _ => None,
        });
        let gone = gone.expect("alice told bob left");
        assert_eq!(gone.state, lk::participant_info::State::Disconnected as i32);
        assert!(gone.version > 1);
        assert_eq!(closes, 1);
        assert!(
            matches!(&events[0], SfuEvent::ParticipantLeft { identity, .. } if identity == "bob")
        );
        assert_eq!(s.participant_count("room"), 1);
    }

    #[test]
    fn duplicate_identity_replaces_the_old_session() {
        let now = Instant::now();
        let mut s = sfu(now);
        join(&mut s, now, 1, "alice");
        drain(&mut s);
        join(&mut s, now, 2, "alice");
        let (msgs, _, closes) = drain(&mut s);
        let leave = msgs.iter().find_map(|(id, m)| match m {
            Msg::Leave(l) if *id == 1 => Some(l.clone()),
            _ => None,
        });
        assert_eq!(
            leave.expect("old session told").reason,
            lk::DisconnectReason::DuplicateIdentity as i32
        );
        assert_eq!(closes, 1);
        assert_eq!(s.participant_count("room"), 1);
    }

    #[test]
    fn publishing_without_permission_is_refused() {
        let now = Instant::now();
        let mut s = sfu(now);
        s.handle_command(
            now,
            Command::Join(Join {
                session: 1,
                room: "room".into(),
                identity: "viewer".into(),
                name: String::new(),
                metadata: String::new(),
                permission: permission(false),
                auto_subscribe: true,
                client_protocol: 2,
            }),
        );
        drain(&mut s);
        request(&mut s, now, 1, add_track("cam", true));
        let (msgs, _, _) = drain(&mut s);
        assert!(!msgs
            .iter()
            .any(|(_, m)| matches!(m, Msg::TrackPublished(_))));
        assert!(msgs
            .iter()
            .any(|(_, m)| matches!(m, Msg::RequestResponse(r) if r.reason == lk::request_response::Reason::NotAllowed as i32)));
    }

    #[test]
    fn add_track_flood_is_bounded() {
        let now = Instant::now();
        let mut s = sfu(now);
        join(&mut s, now, 1, "alice");
        drain(&mut s);
        for i in 0..200 {
            request(&mut s, now, 1, add_track(&format!("c{i}"), i % 2 == 0));
        }
        let (msgs, _, _) = drain(&mut s);
        let published = msgs
            .iter()
            .filter(|(_, m)| matches!(m, Msg::TrackPublished(_)))
            .count();
        assert_eq!(published, MAX_TRACKS_PER_PARTICIPANT);
    }

    #[test]
    fn subscription_is_announced_before_the_offer_that_carries_it() {
        let now = Instant::now();
        let mut s = sfu(now);
        join(&mut s, now, 1, "alice");
        join(&mut s, now, 2, "bob");
        let (msgs, _, _) = drain(&mut s);
        // bob has not answered his initial offer yet.
        let first = msgs
            .iter()
            .find_map(|(id, m)| match m {
                Msg::Offer(o) if *id == 2 => Some(o.clone()),
                _ => None,
            })
            .expect("bob's initial offer");
        request(&mut s, now, 1, add_track("mic", false));
        let (_client, sdp) = publisher_offer(now, "mic");
        request(
            &mut s,
            now,
            1,
            lk::signal_request::Message::Offer(lk::SessionDescription {
                r#type: "offer".into(),
                sdp,
                id: 7,
                mid_to_track_id: HashMap::new(),
            }),
        );
        // Media events surface on the publisher connection's next tick.
        s.handle_timeout(now + Duration::from_millis(100));
        let (msgs, _, _) = drain(&mut s);
        let answer = msgs.iter().find_map(|(id, m)| match m {
            Msg::Answer(a) if *id == 1 => Some(a.clone()),
            _ => None,
        });
        assert_eq!(answer.expect("publisher offer answered").id, 7, "same id");
        // The subscription waits for bob's answer to his pending offer; the track's update
        // reached bob already.
        let track_update = msgs.iter().position(|(id, m)| {
            *id == 2 && matches!(m, Msg::Update(u) if u.participants.iter().any(|p| !p.tracks.is_empty()))
        });
        assert!(track_update.is_some(), "bob learns of alice's track");
        assert!(
            !msgs
                .iter()
                .any(|(id, m)| *id == 2 && matches!(m, Msg::Offer(_))),
            "one offer in flight at a time"
        );
        // The subscription itself (offer with PA_x|TR_y msid, media) needs connected peers:
        // see `trap_update_before_media_and_msid_through_a_virtual_network`.
        let _ = first;
    }

    /// A str0m peer acting as a LiveKit client on a virtual network.
    struct Peer {
        rtc: Rtc,
        addr: SocketAddr,
        events: Vec<Event>,
    }

    impl Peer {
        fn new(now: Instant, addr: &str) -> Self {
            let mut rtc = Rtc::builder().build(now);
            let addr: SocketAddr = addr.parse().unwrap();
            rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
            Self {
                rtc,
                addr,
                events: Vec::new(),
            }
        }
    }

    /// Moves packets between the engine and the peers until everything is quiet at `now`.
    fn pump(s: &mut Sfu, peers: &mut [&mut Peer], now: Instant, msgs: &mut Vec<(SessionId, Msg)>) {
        for _ in 0..1000 {
            let mut moved = false;
            loop {
                match s.poll_output() {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) => {
                        if let Some(p) = peers.iter_mut().find(|p| p.addr == t.destination) {
                            let r =
                                Receive::new(Protocol::Udp, t.source, t.destination, &t.contents)
                                    .unwrap();
                            let _ = p.rtc.handle_input(Input::Receive(now, r));
                            moved = true;
                        }
                    }
                    Output::Signal(id, SignalOut::Message(m)) => msgs.push((id, *m)),
                    _ => {}
                }
            }
            for p in peers.iter_mut() {
                loop {
                    match p.rtc.poll_output().unwrap() {
                        RtcOutput::Timeout(_) => break,
                        RtcOutput::Transmit(t) => {
                            s.handle_datagram(now, p.addr, t.destination, &t.contents);
                            moved = true;
                        }
                        RtcOutput::Event(e) => p.events.push(e),
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn answer_offer(peer: &mut Peer, o: &lk::SessionDescription) -> lk::signal_request::Message {
        let answer = peer
            .rtc
            .sdp_api()
            .accept_offer(SdpOffer::from_sdp_string(&o.sdp).unwrap())
            .unwrap();
        lk::signal_request::Message::Answer(lk::SessionDescription {
            r#type: "answer".into(),
            sdp: answer.to_sdp_string(),
            id: o.id,
            mid_to_track_id: HashMap::new(),
        })
    }

    /// Two str0m peers through the engine, no sockets: alice publishes audio, bob is offered
    /// the track only after the update announcing it, with msid `PA_alice|TR_x`, and receives
    /// alice's frames with continuous timestamps.
    #[test]
    fn trap_update_before_media_and_msid_through_a_virtual_network() {
        let mut now = Instant::now();
        let mut s = sfu(now);
        let mut alice = Peer::new(now, "10.0.0.1:5000");
        let mut bob = Peer::new(now, "10.0.0.2:5000");
        let mut msgs = Vec::new();
        join(&mut s, now, 1, "alice");
        join(&mut s, now, 2, "bob");
        pump(&mut s, &mut [&mut alice, &mut bob], now, &mut msgs);
        // Both answer their initial subscriber offers.
        for (id, peer) in [(1, &mut alice), (2, &mut bob)] {
            let o = msgs
                .iter()
                .find_map(|(sid, m)| match m {
                    Msg::Offer(o) if *sid == id => Some(o.clone()),
                    _ => None,
                })
                .unwrap();
            let a = answer_offer(peer, &o);
            request(&mut s, now, id, a);
        }
        // alice publishes one audio track on her publisher connection.
        let mut alice_pub = Peer::new(now, "10.0.0.1:5001");
        request(&mut s, now, 1, add_track("mic", false));
        let mut api = alice_pub.rtc.sdp_api();
        let mid = api.add_media(
            MediaKind::Audio,
            Direction::SendOnly,
            Some("s".into()),
            Some("mic".into()),
            None,
        );
        let (offer, pending) = api.apply().unwrap();
        request(
            &mut s,
            now,
            1,
            lk::signal_request::Message::Offer(lk::SessionDescription {
                r#type: "offer".into(),
                sdp: offer.to_sdp_string(),
                id: 1,
                mid_to_track_id: HashMap::new(),
            }),
        );
        pump(
            &mut s,
            &mut [&mut alice, &mut bob, &mut alice_pub],
            now,
            &mut msgs,
        );
        let mut all: Vec<(SessionId, Msg)> = msgs.clone();
        let answer = msgs
            .iter()
            .find_map(|(id, m)| match m {
                Msg::Answer(a) if *id == 1 => Some(a.clone()),
                _ => None,
            })
            .unwrap();
        alice_pub
            .rtc
            .sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer.sdp).unwrap())
            .unwrap();

        let mut sent = 0u64;
        let mut reoffer_answered = false;
        for _ in 0..300 {
            now += Duration::from_millis(10);
            s.handle_timeout(now);
            for p in [&mut alice, &mut bob, &mut alice_pub] {
                let _ = p.rtc.handle_input(Input::Timeout(now));
            }
            msgs.clear();
            pump(
                &mut s,
                &mut [&mut alice, &mut bob, &mut alice_pub],
                now,
                &mut msgs,
            );
            all.extend(msgs.iter().map(|(id, m)| (*id, m.clone())));
            if !reoffer_answered {
                if let Some(o) = msgs.iter().find_map(|(id, m)| match m {
                    Msg::Offer(o) if *id == 2 && o.sdp.contains("m=audio") => Some(o.clone()),
                    _ => None,
                }) {
                    let a = answer_offer(&mut bob, &o);
                    request(&mut s, now, 2, a);
                    reoffer_answered = true;
                }
            }
            // alice sends a 20 ms Opus-sized frame every other tick once connected.
            if let Some(w) = alice_pub.rtc.writer(mid) {
                let pt = w.payload_params().next().map(|p| p.pt());
                if let Some(pt) = pt {
                    let t = str0m::media::MediaTime::new(
                        1_000_000 + sent * 960,
                        str0m::media::Frequency::FORTY_EIGHT_KHZ,
                    );
                    if w.write(pt, now, t, vec![0x78u8; 60]).is_ok() {
                        sent += 1;
                    }
                }
            }
        }
        let offer_pos = all.iter().position(|(id, m)| {
            *id == 2 && matches!(m, Msg::Offer(o) if o.sdp.contains("m=audio"))
        });
        let update_pos = msgs_update_with_track_pos(&all, 2);
        let alice_sid = s.participants("room")[0].sid.clone();
        let (offer_pos, update_pos) = (offer_pos.expect("bob offered the track"), update_pos);
        let update_pos = update_pos.expect("bob told of alice's track");
        assert!(
            update_pos < offer_pos,
            "update {update_pos} before offer {offer_pos}"
        );
        let Msg::Offer(o) = &all[offer_pos].1 else {
            unreachable!()
        };
        assert!(
            o.sdp.contains(&format!("a=msid:{alice_sid}|TR_")),
            "{}",
            o.sdp
        );
        let received: Vec<&MediaData> = bob
            .events
            .iter()
            .filter_map(|e| match e {
                Event::MediaData(d) => Some(d),
                _ => None,
            })
            .collect();
        assert!(sent > 50, "alice sent {sent}");
        assert!(
            received.len() > 20,
            "bob received {} of {sent}",
            received.len()
        );
        // Outgoing timestamps advance by exactly one frame each time.
        let ts: Vec<u64> = received.iter().map(|d| d.time.numer()).collect();
        assert!(ts.windows(2).all(|w| w[1] - w[0] == 960), "{ts:?}");
    }

    fn msgs_update_with_track_pos(all: &[(SessionId, Msg)], to: SessionId) -> Option<usize> {
        all.iter().position(|(id, m)| {
            *id == to
                && matches!(m, Msg::Update(u) if u.participants.iter().any(|p| !p.tracks.is_empty()))
        })
    }

    /// Hostile media input: seeded random and mutated datagrams (garbage, truncated or
    /// oversized STUN/DTLS/RTP/RTCP, STUN with unknown and known ufrags, RTP from addresses that
    /// never did ICE) never panic and are counted.
    #[test]
    fn hostile_datagrams_are_dropped_and_counted() {
        use rand::{Rng, SeedableRng};
        let now = Instant::now();
        let mut s = sfu(now);
        join(&mut s, now, 1, "alice");
        let (msgs, _, _) = drain(&mut s);
        let ufrag = msgs
            .iter()
            .find_map(|(_, m)| match m {
                Msg::Offer(o) => o
                    .sdp
                    .lines()
                    .find_map(|l| l.strip_prefix("a=ice-ufrag:").map(str::to_owned)),
                _ => None,
            })
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let server: SocketAddr = "127.0.0.1:7882".parse().unwrap();
        let mut stun = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        stun.extend_from_slice(&[9; 12]);
        let user = format!("{ufrag}:evil");
        stun.extend_from_slice(&[0x00, 0x06, 0x00, user.len() as u8]);
        stun.extend_from_slice(user.as_bytes());
        while stun.len() % 4 != 0 {
            stun.push(0);
        }
        let len = (stun.len() - 20) as u16;
        stun[2..4].copy_from_slice(&len.to_be_bytes());
        for i in 0..100_000u32 {
            let source = SocketAddr::from(([10, 0, (i % 7) as u8, 1], 4000 + (i % 13) as u16));
            let mut packet: Vec<u8> = match i % 5 {
                0 => stun.clone(),
                1 => (0..rng.gen_range(0..1600)).map(|_| rng.gen()).collect(),
                2 => {
                    let mut p = vec![0x80u8, 96];
                    p.extend((0..rng.gen_range(0..300)).map(|_| rng.gen::<u8>()));
                    p
                }
                3 => {
                    let mut p = vec![22u8, 0xfe, 0xfd];
                    p.extend((0..rng.gen_range(0..200)).map(|_| rng.gen::<u8>()));
                    p
                }
                _ => vec![0x81, 200],
            };
            // Mutate a few bytes, and sometimes truncate.
            for _ in 0..rng.gen_range(0..4) {
                if !packet.is_empty() {
                    let at = rng.gen_range(0..packet.len());
                    packet[at] = rng.gen();
                }
            }
            if rng.gen_bool(0.1) {
                packet.truncate(rng.gen_range(0..=packet.len()));
            }
            s.handle_datagram(now, source, server, &packet);
            let _ = drain(&mut s);
        }
        let st = s.stats();
        assert_eq!(st.datagrams, 100_000);
        // Traffic from addresses that never sent STUN with a known ufrag is dropped before
        // any parsing; the rest reaches str0m, which ignores what does not verify.
        assert!(st.dropped_unknown_peer > 20_000, "{st:?}");
        assert!(st.dropped_invalid > 0, "{st:?}");
        assert_eq!(
            s.participant_count("room"),
            1,
            "the participant is unharmed"
        );
    }
}
