//! One participant: its peer connections (two with v0 signalling, one with v1), published
//! tracks, down-tracks and info, and what concerns only it (permissions, its own info and
//! versions, timers, data channels).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use livekit_protocol as lk;
use str0m::bwe::BweKind;
use str0m::change::SdpPendingOffer;
use str0m::channel::ChannelId;
use str0m::media::{Direction, MediaKind, Mid, Rid};
use str0m::rtp::RtpPacket;
use str0m::{Event, Input, Output as RtcOutput, Rtc};

use super::bandwidth::{jitter_ms, smooth, Link};
use super::downtrack::DownTrack;
use super::packet::{red_primary, source_id, starts_keyframe, OutStream};
use super::track::Track;
use super::{linear_audio_level, Forward, IpProto, Output, SessionId, Transmit, CONNECT_DEADLINE};
use crate::sfu::ids::{ParticipantIdentity, ParticipantSid, TrackSid};
use crate::sfu::limits::{self, LimitExceeded};
use crate::sfu::{quality, simulcast};

/// Most reliable data a participant may have waiting for its send buffer (see
/// [`Participant::send_data`]); LiveKit's own buffer is unbounded by default.
const MAX_DATA_BACKLOG_BYTES: usize = 4 * 1024 * 1024;

/// Which of a participant's two peer connections (v0 signalling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum PcKind {
    /// The client sends media on it; the client offers.
    Publisher,
    /// The client receives media on it; the SFU offers.
    Subscriber,
}

/// One peer connection.
pub(super) struct Pc {
    pub(super) rtc: Rtc,
    pub(super) ufrag: String,
    pub(super) next_timeout: Instant,
    pub(super) connected: bool,
    /// The protocol of the last DTLS or SRTP packet it accepted: the nominated path's.
    pub(super) proto: Option<IpProto>,
    /// The peer address of that packet.
    pub(super) remote: Option<SocketAddr>,
    /// The client restarted ICE and it has not connected again since.
    pub(super) restarting: bool,
}

/// A participant's peer connections (`docs/design/rtc-v1.md` §3, step 3).
pub(super) enum Transport {
    /// v0: the client offers on `publisher`, the SFU offers on `subscriber`. (Peer
    /// connections are boxed: an `Rtc` is large and the variants should be alike.)
    Dual {
        /// The client sends media on it; the client offers. Created at the client's first
        /// publisher offer: a client that only listens never connects it, and an unused
        /// connection (DTLS and SCTP state, ICE agent) is ~30 kB.
        publisher: Option<Box<Pc>>,
        /// The client receives media on it; the SFU offers.
        subscriber: Box<Pc>,
    },
    /// v1: one peer connection on which the client always offers.
    Single {
        /// The one peer connection (registered as [`PcKind::Publisher`]).
        pc: Box<Pc>,
        /// The client's `recvonly` m-lines, which we may send on, in the order offered.
        slots: Vec<Slot>,
        /// A `media_sections_requirement` was sent and the client has not offered since.
        reoffer_requested: bool,
        /// At least one client offer was answered (before that, nothing to ask for: the
        /// first offer picks up whatever waits).
        answered: bool,
    },
}

/// A client `recvonly` m-line on a single peer connection (design §3, step 3).
pub(super) struct Slot {
    pub(super) mid: Mid,
    pub(super) kind: MediaKind,
    pub(super) state: SlotState,
}

/// What a [`Slot`] carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SlotState {
    /// Nothing: answered `inactive`.
    Free,
    /// This track: answered `sendonly` with its msid.
    Assigned(TrackSid),
    /// Its track stopped: answered `inactive` once more, then `Free`.
    Releasing,
}

impl Transport {
    /// Whether it is a v1 single peer connection.
    pub(super) fn is_single(&self) -> bool {
        matches!(self, Self::Single { .. })
    }

    /// The peer connection the client publishes on (none before a v0 client offered one).
    pub(super) fn pub_pc(&self) -> Option<&Pc> {
        match self {
            Self::Dual { publisher, .. } => publisher.as_deref(),
            Self::Single { pc, .. } => Some(pc),
        }
    }

    /// The peer connection the client publishes on, mutably.
    pub(super) fn pub_pc_mut(&mut self) -> Option<&mut Pc> {
        match self {
            Self::Dual { publisher, .. } => publisher.as_deref_mut(),
            Self::Single { pc, .. } => Some(pc),
        }
    }

    /// Whether it is a v0 transport whose publisher connection is not created yet.
    pub(super) fn lacks_publisher(&self) -> bool {
        matches!(
            self,
            Self::Dual {
                publisher: None,
                ..
            }
        )
    }

    /// Gives a v0 transport its publisher connection (see [`Transport::Dual`]).
    pub(super) fn set_publisher(&mut self, pc: Pc) {
        if let Self::Dual { publisher, .. } = self {
            *publisher = Some(Box::new(pc));
        }
    }

    /// The peer connection the client receives on.
    pub(super) fn sub_pc(&self) -> &Pc {
        match self {
            Self::Dual { subscriber, .. } => subscriber,
            Self::Single { pc, .. } => pc,
        }
    }

    /// The peer connection the client receives on, mutably.
    pub(super) fn sub_pc_mut(&mut self) -> &mut Pc {
        match self {
            Self::Dual { subscriber, .. } => subscriber,
            Self::Single { pc, .. } => pc,
        }
    }

    /// The peer connection of `kind`, if it exists; a single peer connection is both kinds.
    pub(super) fn pc_mut(&mut self, kind: PcKind) -> Option<&mut Pc> {
        match kind {
            PcKind::Publisher => self.pub_pc_mut(),
            PcKind::Subscriber => Some(self.sub_pc_mut()),
        }
    }

    /// Its peer connections (one or two), each with the kind it is registered as.
    pub(super) fn kinds(&self) -> &'static [PcKind] {
        match self {
            Self::Dual {
                publisher: Some(_), ..
            } => &[PcKind::Publisher, PcKind::Subscriber],
            Self::Dual {
                publisher: None, ..
            } => &[PcKind::Subscriber],
            Self::Single { .. } => &[PcKind::Publisher],
        }
    }

    /// Its peer connections (one or two), in the order of [`Transport::kinds`].
    pub(super) fn pcs(&self) -> impl Iterator<Item = &Pc> {
        let (first, second) = match self {
            Self::Dual {
                publisher,
                subscriber,
            } => (publisher.as_deref(), Some(&**subscriber)),
            Self::Single { pc, .. } => (Some(&**pc), None),
        };
        first.into_iter().chain(second)
    }

    /// The protocols and peer addresses of its connected peer connections (one or two).
    pub(super) fn paths(&self) -> Vec<(IpProto, SocketAddr)> {
        self.pcs()
            .filter(|pc| pc.connected)
            .filter_map(|pc| pc.proto.zip(pc.remote))
            .collect()
    }

    /// Its peer connections (one or two), mutably.
    pub(super) fn pcs_mut(&mut self) -> impl Iterator<Item = &mut Pc> {
        let (first, second) = match self {
            Self::Dual {
                publisher,
                subscriber,
            } => (publisher.as_deref_mut(), Some(&mut **subscriber)),
            Self::Single { pc, .. } => (Some(&mut **pc), None),
        };
        first.into_iter().chain(second)
    }
}

/// What draining a participant's peer connections produced for the rest of the room.
#[derive(Default)]
pub(super) struct Polled {
    /// Media to forward to subscribers.
    pub(super) forwards: Vec<Forward>,
    /// Keyframes wanted (track, layer): its own lost video, or its subscribers' requests.
    pub(super) keyframe_wanted: Vec<(TrackSid, Option<Rid>)>,
    /// Data packets it sent: (reliable, bytes).
    pub(super) data: Vec<(bool, Vec<u8>)>,
    /// NACKs its client sent since the last poll (lost packets it asked to be resent).
    pub(super) nacks: u64,
    /// Peer connections that just connected, by the protocol and peer they connected over.
    pub(super) connected: Vec<Option<(IpProto, SocketAddr)>>,
    /// Its tracks whose media just arrived.
    pub(super) newly_bound: Vec<TrackSid>,
    /// Its tracks whose media stopped (removed from it).
    pub(super) unpublished: Vec<Track>,
    /// A peer connection failed.
    pub(super) dead: bool,
}

/// A participant (one signalling session) in a room.
pub(super) struct Participant {
    /// What it is to the cascade (see [`super::CascadeRole`]).
    pub(super) cascade: super::CascadeRole,
    pub(super) session: SessionId,
    pub(super) identity: ParticipantIdentity,
    pub(super) sid: ParticipantSid,
    pub(super) info: lk::ParticipantInfo,
    pub(super) auto_subscribe: bool,
    /// Its peer connections.
    pub(super) transport: Transport,
    pub(super) tracks: Vec<Track>,
    /// Media the publisher PC announced before a matching `add_track`.
    pub(super) unbound_mids: Vec<(Mid, MediaKind, String)>,
    /// What it receives of the others' tracks.
    pub(super) down_tracks: Vec<DownTrack>,
    /// The rewriting state of each outgoing stream of its subscriber connection, by mid.
    pub(super) out_streams: HashMap<Mid, OutStream>,
    pub(super) sub_pending: Option<(SdpPendingOffer, u32)>,
    pub(super) sub_offer_id: u32,
    /// v0 resume: the next subscriber offer restarts ICE (the SFU offers on that connection).
    pub(super) sub_restart_wanted: bool,
    /// The (routable) ICE credentials of a subscriber ICE restart offered and not answered
    /// yet: str0m takes the restart's credentials from the answer, these replace them then.
    pub(super) sub_restart: Option<str0m::IceCreds>,
    pub(super) sub_reliable: Option<ChannelId>,
    pub(super) sub_lossy: Option<ChannelId>,
    /// The client's channels: relayed as reliable (`true`) or lossy (`_lossy`), or not
    /// relayed at all (`None`: `_data_track`, LiveKit's data-track channel, which carries
    /// no `DataPacket`s).
    pub(super) pub_channels: HashMap<ChannelId, Option<bool>>,
    /// Reliable data packets waiting for room in the subscriber connection's send buffer.
    pub(super) data_backlog: VecDeque<Vec<u8>>,
    /// Bytes in `data_backlog`.
    pub(super) data_backlog_bytes: usize,
    pub(super) joined_at: Instant,
    /// Which signalling connection is its own: 0 at the join, one more at every resume. A
    /// disconnect from an older connection (its WebSocket task ending late) changes nothing.
    pub(super) signal_epoch: u32,
    /// The highest `sequence` of the reliable data packets it sent (LiveKit clients number
    /// them from 1; 0: none numbered). A resuming client is told it
    /// (`ReconnectResponse.last_message_seq`) and resends only what came after; a packet
    /// numbered at or below it is a repeat and is dropped, so reliable data arrives once.
    pub(super) reliable_seq: u32,
    /// The deadline filed for it in the engine's timer heap (`engine/timers.rs`): never later
    /// than [`Participant::next_timeout`]; `None` while it has no live entry.
    pub(super) filed: Option<Instant>,
    pub(super) audio_level: f32,
    pub(super) speaking: bool,
    /// What its connections measured: downlink estimate, loss, RTT, jitter.
    pub(super) link: Link,
}

impl Participant {
    /// One of its peer connections, if it exists (a single peer connection is both kinds).
    pub(super) fn pc_mut(&mut self, kind: PcKind) -> Option<&mut Pc> {
        self.transport.pc_mut(kind)
    }

    fn permission(&self) -> Option<&lk::ParticipantPermission> {
        self.info.permission.as_ref()
    }

    /// Hidden participants are not announced to the others.
    pub(super) fn hidden(&self) -> bool {
        self.permission().is_some_and(|x| x.hidden)
    }

    /// May subscribe to tracks.
    pub(super) fn can_subscribe(&self) -> bool {
        self.permission().is_some_and(|x| x.can_subscribe)
    }

    /// May publish tracks.
    pub(super) fn can_publish(&self) -> bool {
        self.permission().is_some_and(|x| x.can_publish)
    }

    /// May send data packets.
    pub(super) fn can_publish_data(&self) -> bool {
        self.permission().is_some_and(|x| x.can_publish_data)
    }

    /// May change its own metadata, name and attributes.
    pub(super) fn can_update_metadata(&self) -> bool {
        self.permission().is_some_and(|x| x.can_update_metadata)
    }

    /// Its info now, with its current tracks.
    pub(super) fn info_with_tracks(&self) -> lk::ParticipantInfo {
        let mut info = self.info.clone();
        info.tracks = self.tracks.iter().map(|t| t.info.clone()).collect();
        info
    }

    /// Bumps its info's version and returns the new info (with tracks) to broadcast.
    pub(super) fn next_version(&mut self) -> lk::ParticipantInfo {
        self.info.version += 1;
        self.info.tracks = self.tracks.iter().map(|t| t.info.clone()).collect();
        self.info.clone()
    }

    /// One of its published tracks.
    pub(super) fn track(&self, sid: &TrackSid) -> Option<&Track> {
        self.tracks.iter().find(|t| t.sid == *sid)
    }

    /// One of its published tracks, mutably.
    pub(super) fn track_mut(&mut self, sid: &TrackSid) -> Option<&mut Track> {
        self.tracks.iter_mut().find(|t| t.sid == *sid)
    }

    /// Its published tracks that subscribers can get.
    pub(super) fn bound_tracks(&self) -> impl Iterator<Item = &Track> {
        self.tracks.iter().filter(|t| t.is_bound())
    }

    /// Asks for a keyframe of its track `sid` (see [`Track::request_keyframe`]).
    pub(super) fn request_keyframe(
        &mut self,
        sid: &TrackSid,
        now: Instant,
        rid: Option<str0m::media::Rid>,
    ) {
        let Some(pc) = self.transport.pub_pc_mut() else {
            return;
        };
        if let Some(t) = self.tracks.iter_mut().find(|t| t.sid == *sid) {
            t.request_keyframe(&mut pc.rtc, now, rid);
        }
    }

    /// Whether it receives track `sid` already.
    pub(super) fn receives(&self, sid: &TrackSid) -> bool {
        self.down_tracks.iter().any(|d| d.track_sid == *sid)
    }

    /// Stops the down-tracks `which` selects (removed in the next subscriber offer, or at
    /// once if never offered); returns whether any matched.
    pub(super) fn stop_down_tracks(&mut self, which: impl Fn(&DownTrack) -> bool) -> bool {
        let mut hit = false;
        self.down_tracks.retain_mut(|d| {
            if !which(d) {
                return true;
            }
            hit = true;
            d.stop()
        });
        hit
    }

    /// Whether an update of its name, metadata and attributes stays within the limits
    /// ([`crate::sfu::limits`]), its attributes after the update included.
    pub(super) fn check_update(
        &self,
        name: &str,
        metadata: &str,
        attributes: &HashMap<String, String>,
    ) -> Result<(), LimitExceeded> {
        limits::check_participant_update(&self.info.attributes, name, metadata, attributes)
    }

    /// Applies a metadata update: empty strings keep a field, an empty attribute value
    /// deletes the attribute. The caller checked it ([`Participant::check_update`]).
    pub(super) fn update(
        &mut self,
        metadata: String,
        name: String,
        attributes: HashMap<String, String>,
    ) {
        if !metadata.is_empty() {
            self.info.metadata = metadata;
        }
        if !name.is_empty() {
            self.info.name = name;
        }
        for (k, v) in attributes {
            if v.is_empty() {
                self.info.attributes.remove(&k);
            } else {
                self.info.attributes.insert(k, v);
            }
        }
    }

    /// Whether either peer connection ever connected.
    pub(super) fn ever_connected(&self) -> bool {
        self.transport.pcs().any(|pc| pc.connected)
    }

    /// Why it must be dropped at `now`, if so: it never connected within the deadline, or a
    /// connection died.
    pub(super) fn connection_lost(&self, now: Instant) -> Option<lk::DisconnectReason> {
        if !self.ever_connected()
            && self.cascade != super::CascadeRole::Roster
            && now >= self.joined_at + CONNECT_DEADLINE
        {
            Some(lk::DisconnectReason::JoinFailure)
        } else if self.transport.pcs().any(|pc| !pc.rtc.is_alive()) {
            Some(lk::DisconnectReason::ConnectionTimeout)
        } else {
            None
        }
    }

    /// Whether a peer connection timer is due at `now`.
    pub(super) fn timers_due(&self, now: Instant) -> bool {
        self.transport.pcs().any(|pc| pc.next_timeout <= now)
    }

    /// Drives the due peer connection timers.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        for pc in self.transport.pcs_mut() {
            if pc.next_timeout <= now {
                let _ = pc.rtc.handle_input(Input::Timeout(now));
            }
        }
    }

    /// Files its deadline in `timers` if it moved earlier than the filed one (or none is
    /// filed): the cheap check every poll makes (`engine/timers.rs`).
    pub(super) fn file_deadline(&mut self, timers: &mut super::timers::Timers) {
        let at = self.next_timeout();
        if self.filed.is_none_or(|filed| at < filed) {
            self.filed = Some(at);
            timers.push(self.session, at);
        }
    }

    /// Its earliest timer: peer connections and the connect deadline.
    pub(super) fn next_timeout(&self) -> Instant {
        let pcs = self
            .transport
            .pcs()
            .map(|pc| pc.next_timeout)
            .min()
            .unwrap_or(self.joined_at);
        // The connect deadline counts only until a connection is up; after that it lies in the
        // past and would wake the loop at once, forever.
        if self.ever_connected() {
            pcs
        } else {
            pcs.min(self.joined_at + CONNECT_DEADLINE)
        }
    }

    /// Ends its connections and marks its info disconnected with `reason`.
    pub(super) fn close(&mut self, reason: lk::DisconnectReason) {
        for pc in self.transport.pcs_mut() {
            pc.rtc.disconnect();
        }
        self.info.state = lk::participant_info::State::Disconnected as i32;
        self.info.version += 1;
        self.info.disconnect_reason = reason as i32;
    }

    /// Writes `bytes` to its `_reliable` or `_lossy` data channel (v0: the ones the SFU
    /// created on the subscriber connection; v1: the client's own); false if none is open, the write failed or the packet was dropped.
    ///
    /// str0m takes at most 128 KiB of unacknowledged data per connection. A reliable packet
    /// that does not fit, or comes before its channel is open, waits in the backlog (behind any packet already waiting, so the order
    /// holds) and is written by [`Participant::flush_data`] as the receiver acknowledges; past
    /// [`MAX_DATA_BACKLOG_BYTES`] it is dropped. A lossy packet that does not fit is dropped.
    pub(super) fn send_data(&mut self, reliable: bool, bytes: &[u8]) -> bool {
        let session = self.session;
        let id = if reliable {
            self.sub_reliable
        } else {
            self.sub_lossy
        };
        if reliable && !self.data_backlog.is_empty() {
            return self.queue_data(bytes);
        }
        let Some(mut ch) = id.and_then(|id| self.transport.sub_pc_mut().rtc.channel(id)) else {
            if reliable {
                // Still joining: it gets the packet once its channel opens (as in LiveKit,
                // which holds reliable data for joining participants).
                return self.queue_data(bytes);
            }
            tracing::debug!(%session, "no open data channel");
            return false;
        };
        match ch.write(true, bytes) {
            Ok(true) => true,
            Ok(false) if reliable => self.queue_data(bytes),
            Ok(false) => {
                tracing::debug!(%session, "lossy data dropped: send buffer full");
                false
            }
            Err(e) => {
                tracing::debug!(%session, error = %e, "data write failed");
                false
            }
        }
    }

    /// Puts a reliable packet at the end of the backlog; false (dropped) if it is full.
    fn queue_data(&mut self, bytes: &[u8]) -> bool {
        if self.data_backlog_bytes + bytes.len() > MAX_DATA_BACKLOG_BYTES {
            tracing::warn!(
                session = %self.session,
                backlog = self.data_backlog_bytes,
                "reliable data dropped: the receiver is not keeping up"
            );
            return false;
        }
        self.data_backlog_bytes += bytes.len();
        self.data_backlog.push_back(bytes.to_vec());
        true
    }

    /// Writes what the backlog holds, in order, as far as the send buffer takes it; true if
    /// it wrote anything.
    fn flush_data(&mut self) -> bool {
        let Some(mut ch) = self
            .sub_reliable
            .and_then(|id| self.transport.sub_pc_mut().rtc.channel(id))
        else {
            return false;
        };
        let mut wrote = false;
        while let Some(front) = self.data_backlog.front() {
            match ch.write(true, front) {
                Ok(true) => {
                    self.data_backlog_bytes -= front.len();
                    self.data_backlog.pop_front();
                    wrote = true;
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!(session = %self.session, error = %e, "data write failed");
                    break;
                }
            }
        }
        wrote
    }

    /// Its speaker state for the last interval, if worth telling (speaking, or stopped);
    /// resets the level.
    pub(super) fn speaker_update(&mut self) -> Option<lk::SpeakerInfo> {
        let level = self.audio_level;
        self.audio_level = 0.0;
        let speaking = level > 0.02;
        let changed = speaking != self.speaking || speaking;
        self.speaking = speaking;
        changed.then(|| lk::SpeakerInfo {
            sid: self.sid.to_string(),
            level,
            active: speaking,
        })
    }

    /// Its connection quality: the worse of what arrives from it and what its client reports
    /// receiving, scored from loss, RTT and jitter (`sfu/quality.rs`); poor while its
    /// subscriber connection is not connected.
    pub(super) fn connection_quality(&self) -> lk::ConnectionQualityInfo {
        let connected = self.transport.sub_pc().connected;
        let mos = if connected {
            let mut down = self.link.down;
            down.loss = down.loss.max(self.link.reported_loss);
            quality::mos(&self.link.up).min(quality::mos(&down))
        } else {
            1.0
        };
        let level = if connected {
            quality::level(mos)
        } else {
            lk::ConnectionQuality::Poor
        };
        lk::ConnectionQualityInfo {
            participant_sid: self.sid.to_string(),
            quality: level as i32,
            score: mos as f32,
        }
    }

    /// Notes what str0m measured on a connection (`publish_side`/`subscribe_side`: which
    /// directions it carries); returns the NACKs its client sent since the last report.
    fn measured(&mut self, e: &Event, publish_side: bool, subscribe_side: bool) -> u64 {
        let mut nacks = 0;
        match e {
            Event::EgressBitrateEstimate(BweKind::Twcc {
                estimate,
                can_probe,
            }) if subscribe_side => {
                self.link.estimate = can_probe.then(|| estimate.as_u64());
            }
            Event::PeerStats(s) => {
                let rtt = s.rtt.map(|r| r.as_secs_f64() * 1000.0);
                if subscribe_side {
                    // Nothing reported in the last second (nothing with transport-cc sent, e.g.
                    // video paused): no loss seen, the figures decay rather than stay stale.
                    let loss = s.egress_loss_fraction.map_or(0.0, f64::from);
                    self.link.down.loss = smooth(self.link.down.loss, loss);
                    self.link.latest_loss = loss;
                    if let Some(rtt) = rtt {
                        self.link.down.rtt_ms = rtt;
                    }
                }
                if publish_side {
                    if let Some(loss) = s.ingress_loss_fraction {
                        self.link.up.loss = smooth(self.link.up.loss, f64::from(loss));
                    }
                    if let Some(rtt) = rtt {
                        self.link.up.rtt_ms = rtt;
                    }
                }
            }
            Event::MediaIngressStats(s) if publish_side => {
                let kind = self
                    .tracks
                    .iter()
                    .find(|t| t.mid == Some(s.mid))
                    .map(|t| t.kind);
                if let Some(kind) = kind {
                    self.link.up.jitter_ms = jitter_ms(s.jitter, kind);
                }
            }
            Event::MediaEgressStats(s) if subscribe_side => {
                let kind = self
                    .down_tracks
                    .iter()
                    .find(|d| d.mid() == Some(s.mid))
                    .map(|d| d.kind);
                if let (Some(kind), Some(remote)) = (kind, &s.remote) {
                    self.link.down.jitter_ms = jitter_ms(remote.jitter, kind);
                }
                // No report since the last event: nothing lost that anyone saw (as above).
                let loss = s.loss.map_or(0.0, f64::from);
                self.link.reported_loss = smooth(self.link.reported_loss, loss);
                self.link.latest_reported_loss = loss;
                // str0m counts NACKs per outgoing stream since it began.
                let seen = self.link.nacks_seen.entry((s.mid, s.rid)).or_insert(0);
                nacks = s.nacks.saturating_sub(*seen);
                *seen = s.nacks;
            }
            _ => {}
        }
        nacks
    }

    /// Drains both peer connections: datagrams go to `out`, timers are stored, events change
    /// its state (connected, tracks bound or unpublished, audio level, data channels) and what
    /// concerns others is returned.
    pub(super) fn poll(&mut self, now: Instant, out: &mut VecDeque<Output>) -> Polled {
        let mut polled = Polled::default();
        if !self.data_backlog.is_empty() {
            self.flush_data();
        }
        for &kind in self.transport.kinds() {
            self.poll_pc(kind, now, out, &mut polled);
        }
        // A channel that just opened, or acknowledgements that made room: the backlog goes now.
        if !self.data_backlog.is_empty() && self.flush_data() {
            let kind = if self.transport.is_single() {
                PcKind::Publisher
            } else {
                PcKind::Subscriber
            };
            self.poll_pc(kind, now, out, &mut polled);
        }
        polled
    }

    /// Drains one peer connection (see [`Participant::poll`]).
    fn poll_pc(
        &mut self,
        kind: PcKind,
        now: Instant,
        out: &mut VecDeque<Output>,
        polled: &mut Polled,
    ) {
        while let Some(pc) = self.pc_mut(kind) {
            let output = match pc.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    tracing::info!(session = %self.session, error = %e, "peer connection failed");
                    polled.dead = true;
                    break;
                }
            };
            match output {
                RtcOutput::Timeout(t) => {
                    if let Some(pc) = self.pc_mut(kind) {
                        pc.next_timeout = t;
                    }
                    break;
                }
                RtcOutput::Transmit(t) => out.push_back(Output::Transmit(Transmit {
                    proto: match t.proto {
                        str0m::net::Protocol::Udp => IpProto::Udp,
                        _ => IpProto::Tcp,
                    },
                    source: t.source,
                    destination: t.destination,
                    contents: t.contents.into(),
                })),
                RtcOutput::Event(e) => self.event(kind, e, now, polled),
            }
        }
    }

    /// An RTP packet from the client: layer liveness and audio level are noted, and it goes to
    /// the room as a [`Forward`] with what every subscriber needs to know of it (computed once
    /// here, not per subscriber).
    fn rtp_packet(&mut self, packet: RtpPacket, now: Instant, polled: &mut Polled) {
        let Some(pc) = self.transport.pub_pc_mut() else {
            return;
        };
        let rtc = &mut pc.rtc;
        // The mid and rid are in the header extensions of the first packets only; str0m's
        // receive stream knows them for every packet.
        let Some((mid, rid)) = rtc
            .direct_api()
            .stream_rx(&packet.header.ssrc)
            .map(|s| (s.mid(), s.rid()))
        else {
            return;
        };
        let pt = packet.header.payload_type;
        let Some(params) = rtc
            .codec_config()
            .find(|p| p.pt() == pt || p.red() == Some(pt))
            .copied()
        else {
            return;
        };
        let Some(t) = self.tracks.iter_mut().find(|t| t.mid == Some(mid)) else {
            return;
        };
        let bytes = packet.payload.len() as u64 + simulcast::PACKET_OVERHEAD;
        let seq = *packet.seq_no;
        match rid {
            Some(rid) => t.layers.saw(rid, now, seq, bytes),
            None => t.layers.saw_plain(now, seq, bytes),
        }
        let mut primary = None;
        let mut keyframe = false;
        if t.kind == MediaKind::Audio {
            if let Some(level) = packet.header.ext_vals.audio_level {
                self.audio_level = self.audio_level.max(linear_audio_level(level));
            }
            if params.red() == Some(pt) {
                primary = red_primary(&packet.payload);
                if primary.is_none() {
                    return;
                }
            }
        } else {
            keyframe = starts_keyframe(params.spec().codec, &packet.payload);
        }
        polled.forwards.push(Forward {
            publisher: self.session,
            track_sid: t.sid.clone(),
            source: source_id(&t.sid, rid.as_ref()),
            rid,
            params,
            primary,
            keyframe,
            packet,
        });
    }

    fn event(&mut self, kind: PcKind, e: Event, now: Instant, polled: &mut Polled) {
        let session = self.session;
        // A single peer connection is both the publish and the subscribe side.
        let single = self.transport.is_single();
        let publish_side = kind == PcKind::Publisher || single;
        let subscribe_side = kind == PcKind::Subscriber || single;
        polled.nacks += self.measured(&e, publish_side, subscribe_side);
        match e {
            Event::Connected => {
                let path = self.pc_mut(kind).and_then(|pc| {
                    pc.connected = true;
                    pc.proto.zip(pc.remote)
                });
                tracing::debug!(%session, ?kind, single, ?path, "peer connection connected");
                polled.connected.push(path);
                if subscribe_side {
                    self.info.state = lk::participant_info::State::Active as i32;
                }
            }
            Event::IceConnectionStateChange(state) => {
                tracing::debug!(%session, ?kind, ?state, "ICE state");
                let connected = matches!(
                    state,
                    str0m::IceConnectionState::Connected | str0m::IceConnectionState::Completed
                );
                let restarted = self.pc_mut(kind).is_some_and(|pc| {
                    let done = pc.restarting && connected;
                    pc.restarting &= !done;
                    done
                });
                // Why: an ICE restart follows a lost path (a network change, a resume after a
                // cut); what was sent on the dead path is gone and the client's decoders wait
                // for a keyframe. Asking its publishers at once saves the round of NACKs that
                // fail and the client's own PLI (about a second in Chromium).
                if restarted && subscribe_side {
                    for d in self
                        .down_tracks
                        .iter()
                        .filter(|d| d.kind == MediaKind::Video)
                    {
                        polled
                            .keyframe_wanted
                            .push((d.track_sid.clone(), d.current_rid));
                    }
                }
            }
            // Only media the client sends: v0 publisher offers may also carry recvonly
            // transceivers (sendonly from here), which are no tracks.
            Event::MediaAdded(added)
                if publish_side
                    && matches!(added.direction, Direction::RecvOnly | Direction::SendRecv) =>
            {
                let tid = self
                    .transport
                    .pub_pc()
                    .and_then(|pc| pc.rtc.media(added.mid))
                    .map(|m| m.track_id().to_owned())
                    .unwrap_or_default();
                let pos = self
                    .tracks
                    .iter()
                    .position(|t| !t.is_bound() && t.cid == tid)
                    .or_else(|| {
                        self.tracks
                            .iter()
                            .position(|t| !t.is_bound() && t.kind == added.kind)
                    });
                match pos.and_then(|i| self.tracks.get_mut(i)) {
                    Some(t) => {
                        t.bind(added.mid);
                        polled.newly_bound.push(t.sid.clone());
                    }
                    None => self.unbound_mids.push((added.mid, added.kind, tid)),
                }
            }
            Event::MediaChanged(ch) if publish_side => {
                if matches!(ch.direction, Direction::Inactive | Direction::SendOnly) {
                    if let Some(i) = self.tracks.iter().position(|t| t.mid == Some(ch.mid)) {
                        polled.unpublished.push(self.tracks.remove(i));
                    }
                }
            }
            Event::RtpPacket(packet) if publish_side => self.rtp_packet(packet, now, polled),
            Event::KeyframeRequest(req) if subscribe_side => {
                if let Some(d) = self.down_tracks.iter().find(|d| d.mid() == Some(req.mid)) {
                    // A relay that gets every layer names the layer's stream.
                    polled
                        .keyframe_wanted
                        .push((d.track_sid.clone(), req.rid.or(d.current_rid)));
                }
            }
            Event::ChannelOpen(id, label) if publish_side => {
                if single {
                    // v1: the SFU creates no channels; it writes on the client's own.
                    match label.as_str() {
                        "_reliable" => self.sub_reliable = Some(id),
                        "_lossy" => self.sub_lossy = Some(id),
                        _ => {}
                    }
                }
                let relay = (label != "_data_track").then_some(label != "_lossy");
                self.pub_channels.insert(id, relay);
            }
            Event::ChannelData(d) if publish_side => {
                match self.pub_channels.get(&d.id).copied().unwrap_or(Some(true)) {
                    Some(reliable) => polled.data.push((reliable, d.data)),
                    None => tracing::debug!(%session, "data-track channel data not relayed"),
                }
            }
            _ => {}
        }
    }
}
