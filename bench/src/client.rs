//! Synthetic WebRTC clients: str0m peer connections on loopback UDP sockets that publish
//! Opus-sized or VP8-like frames carrying their send time, and receive and account for the
//! frames an SFU forwards to them.
//!
//! One tokio task per participant owns its peer connections (one UDP socket each: the SFU
//! demultiplexes non-STUN traffic by source address, so peer connections cannot share one)
//! and its signalling. Everything that is measured goes into one [`Shared`] of atomics.
//!
//! Frame payload (little endian), after one VP8 payload-header byte for video (`0x00`
//! keyframe, `0x01` interframe: the P bit str0m's depacketizer reads):
//! `MAGIC u32 | publisher u32 | seq u32 | send time u64 (ns since the bench epoch) | zeros`.
//! str0m depacketizes and repacketizes frames, so the send time travels inside the frame.
//!
//! Receiving has two modes ([`ReceiveMode`]). *Full*: every datagram goes to str0m (SRTP
//! decrypt, depacketising), every frame is checked and timed. *Count-only*: a receiver feeds
//! everything to str0m for its first [`COUNT_ONLY_AFTER`] of media, then the non-RTP traffic
//! that keeps the connection alive (STUN consent checks, DTLS, RTCP) and 1 RTP datagram in
//! `feed_every`; every RTP datagram is counted at the socket (packets, bytes). The fed sample
//! keeps the receiver's RTCP feedback (transport-wide CC, receiver reports) flowing as a real
//! client's does: with none, the server sees silent subscribers, which it handles worse than
//! real ones (measured: a 4x drop in server packets per CPU-second). str0m sees the sample's
//! gaps as loss, so NACKs are suppressed on those streams (the server would otherwise
//! retransmit: load the full mode does not cause); its reports do show the loss, and its
//! depacketiser drops the broken frames. Latency and frame integrity therefore come from
//! *witnesses* (1 receiver in N, see the scenario), which stay in full mode all along.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

use super::BenchError;

/// Marks a benchmark frame.
pub const MAGIC: u32 = 0xC0C1_A7E0;
/// Bytes of the frame header after the optional VP8 byte.
const HEADER: usize = 20;
/// Histogram bucket width.
const BUCKET: Duration = Duration::from_micros(10);
/// Histogram range (later samples land in the last bucket).
const BUCKETS: usize = 50_000; // 500 ms
/// Datagrams read per socket wake-up before yielding.
const READ_BATCH: usize = 64;
/// A count-only receiver feeds RTP to str0m for this long after its first frame.
pub const COUNT_ONLY_AFTER: Duration = Duration::from_secs(1);

/// What a datagram on a WebRTC 5-tuple is, by its first bytes (RFC 7983 §7, RFC 5761 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    /// First byte 0–3.
    Stun,
    /// First byte 20–63.
    Dtls,
    /// First byte 128–191, payload type outside 64–95.
    Rtp,
    /// First byte 128–191, packet type 192–223 (payload type 64–95 with the marker bit).
    Rtcp,
    /// Anything else (TURN channels, ZRTP, garbage).
    Other,
}

/// Classifies a datagram (RFC 7983 demultiplexing, RTP/RTCP by RFC 5761).
pub fn classify(d: &[u8]) -> Datagram {
    match d.first() {
        Some(0..=3) => Datagram::Stun,
        Some(20..=63) => Datagram::Dtls,
        Some(128..=191) if d.len() >= 8 => {
            if (64..=95).contains(&(d[1] & 0x7f)) {
                Datagram::Rtcp
            } else if d.len() >= 12 {
                Datagram::Rtp
            } else {
                Datagram::Other
            }
        }
        _ => Datagram::Other,
    }
}

/// How a receiving peer connection treats RTP (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveMode {
    /// Every datagram goes to str0m; frames are checked and timed (a witness).
    Full,
    /// After [`COUNT_ONLY_AFTER`] of media, RTP is only counted at the socket.
    CountOnly,
}

/// A latency histogram with 10 µs buckets, shared by every client.
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Adds one sample.
    pub fn record(&self, d: Duration) {
        let i = (d.as_nanos() / BUCKET.as_nanos()).min(BUCKETS as u128 - 1) as usize;
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `q`-quantile (upper edge of its bucket; 500 ms means "500 ms or more"), `None`
    /// without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(BUCKET * (i as u32 + 1));
            }
        }
        Some(BUCKET * BUCKETS as u32)
    }
}

/// Counters and switches shared by the orchestrator and every client of one run.
pub struct Shared {
    epoch: Instant,
    /// Publishers send frames only while this is set.
    pub media_on: AtomicBool,
    /// Measurement window, ns since the epoch (frames are attributed by their send time).
    pub window_start_ns: AtomicU64,
    /// End of the window (exclusive).
    pub window_end_ns: AtomicU64,
    /// RTP datagrams received by subscriber peer connections (counted at the socket).
    pub rx_rtp: AtomicU64,
    /// Their bytes (UDP payload).
    pub rx_rtp_bytes: AtomicU64,
    /// RTP datagrams receivers fed to str0m (all of them in full mode).
    pub rx_rtp_fed: AtomicU64,
    /// RTP datagrams publishers handed to the kernel.
    pub tx_rtp: AtomicU64,
    /// Media frames a witness received that are not benchmark frames (bad magic or
    /// publisher, or a sequence number not above the last one from that publisher).
    pub rx_bad_frames: AtomicU64,
    /// Frames witnesses received whose send time is inside the window.
    pub rx_frames_window: AtomicU64,
    /// Frames each publisher sent inside the window.
    pub sent_window: Vec<AtomicU64>,
    /// Publishers whose track is negotiated and connected.
    pub pub_ready: AtomicUsize,
    /// Receivers connected with every expected track negotiated.
    pub sub_ready: AtomicUsize,
    /// Clients that failed.
    pub failed: AtomicUsize,
    /// The first failure messages.
    pub failures: Mutex<Vec<String>>,
    /// Datagrams the kernel would not take from a client.
    pub tx_drops: AtomicU64,
    /// Frames str0m refused to send.
    pub write_errors: AtomicU64,
    /// Times a publisher fell more than five frames behind and restarted its schedule.
    pub send_stalls: AtomicU64,
    /// Latency of frames sent inside the window.
    pub latency: Histogram,
    /// Join times (token → first remote frame) of the join probes.
    pub joins: Mutex<Vec<Duration>>,
}

impl Shared {
    /// Fresh counters for `publishers` publishers.
    pub fn new(publishers: usize) -> Self {
        Self {
            epoch: Instant::now(),
            media_on: AtomicBool::new(false),
            window_start_ns: AtomicU64::new(u64::MAX),
            window_end_ns: AtomicU64::new(u64::MAX),
            rx_rtp: AtomicU64::new(0),
            rx_rtp_bytes: AtomicU64::new(0),
            rx_rtp_fed: AtomicU64::new(0),
            tx_rtp: AtomicU64::new(0),
            rx_bad_frames: AtomicU64::new(0),
            rx_frames_window: AtomicU64::new(0),
            sent_window: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
            pub_ready: AtomicUsize::new(0),
            sub_ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            failures: Mutex::new(Vec::new()),
            tx_drops: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            send_stalls: AtomicU64::new(0),
            latency: Histogram::default(),
            joins: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the epoch.
    pub fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Sets the measurement window.
    pub fn set_window(&self, start: Instant, end: Instant) {
        self.window_start_ns.store(self.ns(start), Ordering::SeqCst);
        self.window_end_ns.store(self.ns(end), Ordering::SeqCst);
    }

    fn in_window(&self, ns: u64) -> bool {
        ns >= self.window_start_ns.load(Ordering::Relaxed)
            && ns < self.window_end_ns.load(Ordering::Relaxed)
    }

    /// Records a client failure.
    pub fn fail(&self, who: &str, e: &BenchError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.failures.lock() {
            if f.len() < 5 {
                f.push(format!("{who}: {e}"));
            }
        }
    }
}

/// What a publisher sends.
#[derive(Debug, Clone, Copy)]
pub struct MediaProfile {
    /// Audio (Opus-sized packets) or video (VP8-like frames).
    pub kind: MediaKind,
    /// Time between frames.
    pub frame_interval: Duration,
    /// Bytes per frame.
    pub frame_bytes: usize,
    /// Bytes per keyframe (video).
    pub keyframe_bytes: usize,
    /// A keyframe at least this often (video), besides every keyframe request.
    pub keyframe_every: Duration,
}

impl MediaProfile {
    /// Opus-sized: `bytes` per packet, 50 packets/s.
    pub fn audio(bytes: usize) -> Self {
        Self {
            kind: MediaKind::Audio,
            frame_interval: Duration::from_millis(20),
            frame_bytes: bytes.max(HEADER),
            keyframe_bytes: bytes.max(HEADER),
            keyframe_every: Duration::MAX,
        }
    }

    /// VP8-like frames at `kbps` and `fps`; keyframes are 3× larger, every 2 s and on request.
    pub fn video(kbps: u32, fps: u32) -> Self {
        let fps = fps.clamp(1, 120);
        let bytes = (kbps as usize * 1000 / 8 / fps as usize).max(HEADER + 1);
        Self {
            kind: MediaKind::Video,
            frame_interval: Duration::from_secs(1) / fps,
            frame_bytes: bytes,
            keyframe_bytes: (bytes * 3).min(200_000),
            keyframe_every: Duration::from_secs(2),
        }
    }

    fn is_video(&self) -> bool {
        self.kind == MediaKind::Video
    }
}

/// What one synthetic participant does.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Identity (LiveKit) or display name (Janus).
    pub identity: String,
    /// Publisher index when it publishes one track.
    pub publish: Option<u32>,
    /// How many remote tracks it must receive to count as ready (0: receives nothing).
    pub receive_tracks: usize,
    /// Record token → first remote frame.
    pub join_probe: bool,
    /// What it sends.
    pub profile: MediaProfile,
    /// Loopback address its sockets bind to.
    pub local_ip: std::net::IpAddr,
    /// How its subscriber peer connection treats RTP.
    pub receive: ReceiveMode,
    /// Count-only: feed 1 RTP datagram in this many to str0m (0: none).
    pub feed_every: u64,
}

/// Builds a benchmark frame.
pub fn build_frame(
    profile: &MediaProfile,
    publisher: u32,
    seq: u32,
    ns: u64,
    key: bool,
) -> Vec<u8> {
    let len = if key {
        profile.keyframe_bytes
    } else {
        profile.frame_bytes
    };
    let mut f = Vec::with_capacity(len + 1);
    if profile.is_video() {
        f.push(if key { 0x00 } else { 0x01 });
    }
    f.extend_from_slice(&MAGIC.to_le_bytes());
    f.extend_from_slice(&publisher.to_le_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&ns.to_le_bytes());
    f.resize(len.max(f.len()), 0);
    f
}

/// Parses a benchmark frame: publisher, seq, send time.
pub fn parse_frame(data: &[u8], video: bool) -> Option<(u32, u32, u64)> {
    let off = usize::from(video);
    let h = data.get(off..off + HEADER)?;
    let word =
        |i: usize| -> Option<u32> { Some(u32::from_le_bytes(h.get(i..i + 4)?.try_into().ok()?)) };
    if word(0)? != MAGIC {
        return None;
    }
    let ns = u64::from_le_bytes(h.get(12..20)?.try_into().ok()?);
    Some((word(4)?, word(8)?, ns))
}

/// Whether a datagram is RTP (not STUN, DTLS or RTCP; RFC 7983, RFC 5761).
pub fn is_rtp(d: &[u8]) -> bool {
    classify(d) == Datagram::Rtp
}

/// Integrity of a witness's frame: a benchmark frame from a known publisher whose seq is
/// above the last one seen from it (str0m delivers in order; gaps are loss, not damage).
/// Records the seq in `last_seq` (indexed by publisher).
fn frame_in_order(last_seq: &mut Vec<Option<u32>>, frame: Option<(u32, u32, u64)>) -> bool {
    let Some((publisher, seq, _)) = frame else {
        return false;
    };
    let i = publisher as usize;
    if last_seq.len() <= i {
        last_seq.resize(i + 1, None);
    }
    let ok = last_seq[i].is_none_or(|last| seq > last);
    last_seq[i] = Some(seq);
    ok
}

/// One peer connection on its own loopback UDP socket.
pub struct Peer {
    /// The str0m instance.
    pub rtc: Rtc,
    sock: UdpSocket,
    local: SocketAddr,
    next_timeout: Instant,
    /// ICE + DTLS done.
    pub connected: bool,
}

/// The bench clients' initial STUN retransmission timeout (see [`Peer::new`]).
const CLIENT_STUN_RTO: std::time::Duration = std::time::Duration::from_millis(50);

impl Peer {
    /// A full-ICE client peer connection on a fresh `ip:0` socket.
    pub fn new(now: Instant, ip: std::net::IpAddr) -> Result<Self, BenchError> {
        let std_sock = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|e| BenchError::io("binding a client socket", e))?;
        let local = std_sock
            .local_addr()
            .map_err(|e| BenchError::io("client socket address", e))?;
        let sock = UdpSocket::from_std(std_sock).map_err(|e| BenchError::io("client socket", e))?;
        let mut cfg = Rtc::builder().set_stats_interval(None);
        // Why: str0m's ICE agent (the client here is the controlling side) schedules its
        // nomination one STUN RTO after the first successful check in about half of the
        // joins; with the default 250 ms that RTO, not the server, was the join time
        // (bimodal 15–70 ms / 270–310 ms at half load). On loopback 50 ms is ample.
        cfg.set_initial_stun_rto(CLIENT_STUN_RTO);
        let mut rtc = cfg.build(now);
        let cand = Candidate::host(local, "udp")
            .map_err(|e| BenchError::Rtc(format!("candidate: {e}")))?;
        rtc.add_local_candidate(cand);
        Ok(Self {
            rtc,
            sock,
            local,
            next_timeout: now,
            connected: false,
        })
    }

    async fn readable(p: Option<&Peer>) {
        match p {
            Some(p) => {
                if p.sock.readable().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

/// Drives a peer connection's clock after an SDP or candidate change: str0m 0.25 caches its
/// next timeout, and accepting an answer does not always re-arm it (seen with Janus answers
/// applied right after the offer was polled), which left ICE waiting forever.
fn kick(p: &mut Peer) {
    let now = Instant::now();
    let _ = p.rtc.handle_input(Input::Timeout(now));
    p.next_timeout = now;
}

/// Why a client woke up.
#[derive(Debug, Clone, Copy)]
pub enum Wake {
    /// The publisher socket has data.
    Publisher,
    /// The subscriber socket has data.
    Subscriber,
    /// A timer is due.
    Timer,
}

/// The media side of one participant: up to two peer connections, what it sends and what it
/// received. Signalling lives in the driver ([`super::scenario`] for LiveKit, [`super::janus`]).
pub struct MediaClient {
    spec: ClientSpec,
    shared: Arc<Shared>,
    /// Sends the participant's track.
    pub publisher: Option<Peer>,
    /// Receives remote tracks.
    pub subscriber: Option<Peer>,
    pub_mid: Option<Mid>,
    pub_pending: Option<SdpPendingOffer>,
    pub_answered: bool,
    seq: u32,
    next_frame: Option<Instant>,
    want_keyframe: bool,
    last_keyframe: Option<Instant>,
    tracks_in: HashSet<Mid>,
    started: Instant,
    first_media: bool,
    pub_ready: bool,
    sub_ready: bool,
    /// When the first benchmark frame arrived.
    first_media_at: Option<Instant>,
    /// Count-only receiver past its warm-up: RTP is only sampled into str0m.
    counting: bool,
    /// RTP datagrams seen while counting (for the 1-in-`feed_every` sample).
    counted: u64,
    /// Last frame seq per publisher (witness integrity check).
    last_seq: Vec<Option<u32>>,
    buf: Vec<u8>,
}

impl MediaClient {
    /// A client whose join started at `started`.
    pub fn new(spec: ClientSpec, shared: Arc<Shared>, started: Instant) -> Self {
        Self {
            spec,
            shared,
            publisher: None,
            subscriber: None,
            pub_mid: None,
            pub_pending: None,
            pub_answered: false,
            seq: 0,
            next_frame: None,
            want_keyframe: true,
            last_keyframe: None,
            tracks_in: HashSet::new(),
            started,
            first_media: false,
            pub_ready: false,
            sub_ready: false,
            first_media_at: None,
            counting: false,
            counted: 0,
            last_seq: Vec::new(),
            buf: vec![0u8; 2048],
        }
    }

    /// The spec.
    pub fn spec(&self) -> &ClientSpec {
        &self.spec
    }

    /// Whether every role of this client is ready (published / receiving all its tracks).
    pub fn ready(&self) -> bool {
        (self.spec.publish.is_none() || self.pub_ready)
            && (self.spec.receive_tracks == 0 || self.sub_ready)
    }

    /// Creates the publisher peer connection and its offer (one send-only track).
    pub fn publisher_offer(&mut self, now: Instant, track_id: &str) -> Result<String, BenchError> {
        let mut peer = Peer::new(now, self.spec.local_ip)?;
        let mut api = peer.rtc.sdp_api();
        let mid = api.add_media(
            self.spec.profile.kind,
            Direction::SendOnly,
            Some(format!("{}-stream", self.spec.identity)),
            Some(track_id.to_owned()),
            None,
        );
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| BenchError::Rtc("empty publisher offer".into()))?;
        self.pub_mid = Some(mid);
        self.pub_pending = Some(pending);
        self.publisher = Some(peer);
        Ok(offer.to_sdp_string())
    }

    /// Applies the answer to the publisher offer.
    pub fn publisher_answer(&mut self, sdp: &str) -> Result<(), BenchError> {
        let (Some(peer), Some(pending)) = (self.publisher.as_mut(), self.pub_pending.take()) else {
            return Ok(()); // a stale or duplicate answer
        };
        let answer = SdpAnswer::from_sdp_string(sdp)
            .map_err(|e| BenchError::Rtc(format!("publisher answer: {e}")))?;
        peer.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| BenchError::Rtc(format!("publisher answer refused: {e}")))?;
        kick(peer);
        self.pub_answered = true;
        Ok(())
    }

    /// Answers an offer on the subscriber peer connection (created on first use).
    pub fn subscriber_offer(&mut self, now: Instant, sdp: &str) -> Result<String, BenchError> {
        if self.subscriber.is_none() {
            self.subscriber = Some(Peer::new(now, self.spec.local_ip)?);
        }
        let Some(peer) = self.subscriber.as_mut() else {
            return Err(BenchError::Rtc("no subscriber peer".into()));
        };
        let offer = SdpOffer::from_sdp_string(sdp)
            .map_err(|e| BenchError::Rtc(format!("subscriber offer: {e}")))?;
        let answer = peer
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| BenchError::Rtc(format!("subscriber offer refused: {e}")))?;
        kick(peer);
        Ok(answer.to_sdp_string())
    }

    /// Adds a trickled remote candidate (`candidate:…` or `a=candidate:…`).
    pub fn remote_candidate(&mut self, subscriber: bool, sdp_line: &str) {
        let peer = if subscriber {
            self.subscriber.as_mut()
        } else {
            self.publisher.as_mut()
        };
        if let (Some(p), Ok(c)) = (
            peer,
            Candidate::from_sdp_string(sdp_line.trim_start_matches("a=")),
        ) {
            p.rtc.add_remote_candidate(c);
            kick(p);
        }
    }

    fn deadline(&self) -> Instant {
        let mut t = self.started + Duration::from_secs(3600);
        for p in [&self.publisher, &self.subscriber].into_iter().flatten() {
            t = t.min(p.next_timeout);
        }
        if let Some(f) = self.next_frame {
            t = t.min(f);
        }
        t
    }

    /// Waits for a socket or the next timer (cancel-safe).
    pub async fn wait(&self) -> Wake {
        let deadline = tokio::time::Instant::from_std(self.deadline());
        tokio::select! {
            () = Peer::readable(self.publisher.as_ref()) => Wake::Publisher,
            () = Peer::readable(self.subscriber.as_ref()) => Wake::Subscriber,
            () = tokio::time::sleep_until(deadline) => Wake::Timer,
        }
    }

    /// Handles a wake-up, then runs both peer connections until they wait again.
    pub fn on_wake(&mut self, wake: Wake) {
        let now = Instant::now();
        match wake {
            Wake::Publisher => self.read(false, now),
            Wake::Subscriber => self.read(true, now),
            Wake::Timer => {
                for p in [&mut self.publisher, &mut self.subscriber]
                    .into_iter()
                    .flatten()
                {
                    if p.next_timeout <= now {
                        let _ = p.rtc.handle_input(Input::Timeout(now));
                    }
                }
                self.maybe_send(now);
            }
        }
        self.flush();
    }

    fn read(&mut self, subscriber: bool, now: Instant) {
        let Some(p) = (if subscriber {
            self.subscriber.as_mut()
        } else {
            self.publisher.as_mut()
        }) else {
            return;
        };
        if subscriber && !self.counting && self.spec.receive == ReceiveMode::CountOnly {
            self.counting = self
                .first_media_at
                .is_some_and(|t| now.saturating_duration_since(t) >= COUNT_ONLY_AFTER);
            if self.counting {
                // The sample has gaps: no NACKs for them.
                let mut api = p.rtc.direct_api();
                for mid in &self.tracks_in {
                    if let Some(rx) = api.stream_rx_by_mid(*mid, None) {
                        rx.suppress_nack(true);
                    }
                }
            }
        }
        let feed_every = self.spec.feed_every;
        let (mut rtp, mut rtp_bytes, mut fed) = (0u64, 0u64, 0u64);
        for _ in 0..READ_BATCH {
            let (n, source) = match p.sock.try_recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(_) => break,
            };
            let data = &self.buf[..n];
            if subscriber && is_rtp(data) {
                rtp += 1;
                rtp_bytes += n as u64;
                if self.counting {
                    self.counted += 1;
                    if feed_every == 0 || self.counted % feed_every != 0 {
                        continue;
                    }
                }
                fed += 1;
            }
            if let Ok(r) = Receive::new(Protocol::Udp, source, p.local, data) {
                let _ = p.rtc.handle_input(Input::Receive(now, r));
            }
        }
        if rtp > 0 {
            self.shared.rx_rtp_fed.fetch_add(fed, Ordering::Relaxed);
            self.shared.rx_rtp.fetch_add(rtp, Ordering::Relaxed);
            self.shared
                .rx_rtp_bytes
                .fetch_add(rtp_bytes, Ordering::Relaxed);
        }
    }

    fn maybe_send(&mut self, now: Instant) {
        let (Some(idx), Some(mid)) = (self.spec.publish, self.pub_mid) else {
            return;
        };
        let Some(p) = self.publisher.as_mut() else {
            return;
        };
        if !p.connected || !self.pub_answered || !self.shared.media_on.load(Ordering::Relaxed) {
            self.next_frame = None;
            return;
        }
        let due = *self.next_frame.get_or_insert(now);
        if due > now {
            return;
        }
        let profile = self.spec.profile;
        let Some(writer) = p.rtc.writer(mid) else {
            return;
        };
        let want = if profile.is_video() {
            Codec::Vp8
        } else {
            Codec::Opus
        };
        let Some(pt) = writer
            .payload_params()
            .find(|pp| pp.spec().codec == want)
            .map(|pp| pp.pt())
        else {
            return;
        };
        let key = profile.is_video()
            && (self.want_keyframe
                || self
                    .last_keyframe
                    .is_none_or(|t| now.saturating_duration_since(t) >= profile.keyframe_every));
        let ns = self.shared.ns(now);
        let frame = build_frame(&profile, idx, self.seq, ns, key);
        let ticks = if profile.is_video() {
            (self.seq as u64) * 90_000 * profile.frame_interval.as_micros() as u64 / 1_000_000
        } else {
            (self.seq as u64) * 960
        };
        let freq = if profile.is_video() {
            Frequency::NINETY_KHZ
        } else {
            Frequency::FORTY_EIGHT_KHZ
        };
        if writer
            .write(pt, now, MediaTime::new(ticks, freq), frame)
            .is_ok()
        {
            if self.shared.in_window(ns) {
                if let Some(c) = self.shared.sent_window.get(idx as usize) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.seq = self.seq.wrapping_add(1);
            if key {
                self.want_keyframe = false;
                self.last_keyframe = Some(now);
            }
        } else {
            self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        // Next frame on schedule; after a stall, restart the schedule instead of bursting.
        let mut next = due + profile.frame_interval;
        if next + profile.frame_interval * 5 < now {
            self.shared.send_stalls.fetch_add(1, Ordering::Relaxed);
            next = now + profile.frame_interval;
        }
        self.next_frame = Some(next);
    }

    /// Runs both peer connections until they only wait: sends datagrams, handles events.
    pub fn flush(&mut self) {
        for subscriber in [false, true] {
            let Some(p) = (if subscriber {
                self.subscriber.as_mut()
            } else {
                self.publisher.as_mut()
            }) else {
                continue;
            };
            loop {
                let out = match p.rtc.poll_output() {
                    Ok(o) => o,
                    Err(_) => break,
                };
                match out {
                    Output::Timeout(t) => {
                        p.next_timeout = t;
                        break;
                    }
                    Output::Transmit(t) => {
                        if p.sock.try_send_to(&t.contents, t.destination).is_err() {
                            self.shared.tx_drops.fetch_add(1, Ordering::Relaxed);
                        } else if !subscriber && is_rtp(&t.contents) {
                            self.shared.tx_rtp.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Output::Event(e) => match e {
                        Event::Connected => p.connected = true,
                        Event::IceConnectionStateChange(state) => {
                            tracing::debug!(client = %self.spec.identity, subscriber, ?state, "ICE");
                        }
                        Event::MediaAdded(m)
                            if subscriber
                                && matches!(
                                    m.direction,
                                    Direction::RecvOnly | Direction::SendRecv
                                ) =>
                        {
                            self.tracks_in.insert(m.mid);
                        }
                        Event::KeyframeRequest(_) if !subscriber => self.want_keyframe = true,
                        Event::MediaData(d) if subscriber => {
                            let now = Instant::now();
                            let video = d.params.spec().codec != Codec::Opus;
                            let witness = self.spec.receive == ReceiveMode::Full;
                            let frame = parse_frame(&d.data, video).filter(|&(publisher, _, _)| {
                                (publisher as usize) < self.shared.sent_window.len()
                            });
                            if witness && !frame_in_order(&mut self.last_seq, frame) {
                                self.shared.rx_bad_frames.fetch_add(1, Ordering::Relaxed);
                            }
                            if let Some((_, _, sent)) = frame {
                                let ns = self.shared.ns(now);
                                if witness && self.shared.in_window(sent) {
                                    self.shared.rx_frames_window.fetch_add(1, Ordering::Relaxed);
                                    self.shared
                                        .latency
                                        .record(Duration::from_nanos(ns.saturating_sub(sent)));
                                }
                                if !self.first_media {
                                    self.first_media = true;
                                    self.first_media_at = Some(now);
                                    if self.spec.join_probe {
                                        if let Ok(mut j) = self.shared.joins.lock() {
                                            j.push(now.saturating_duration_since(self.started));
                                        }
                                    }
                                }
                            }
                        }
                        _ => {}
                    },
                }
            }
        }
        self.update_ready();
    }

    fn update_ready(&mut self) {
        if self.spec.publish.is_some() && !self.pub_ready {
            let ok = self.pub_answered && self.publisher.as_ref().is_some_and(|p| p.connected);
            if ok {
                self.pub_ready = true;
                self.shared.pub_ready.fetch_add(1, Ordering::SeqCst);
            }
        }
        if self.spec.receive_tracks > 0 && !self.sub_ready {
            let connected = self.subscriber.as_ref().is_some_and(|p| p.connected);
            let ok = connected
                && self.tracks_in.len() >= self.spec.receive_tracks
                && (!self.spec.join_probe || self.first_media);
            if ok {
                self.sub_ready = true;
                self.shared.sub_ready.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let a = MediaProfile::audio(80);
        let f = build_frame(&a, 3, 7, 123_456, false);
        assert_eq!(f.len(), 80);
        assert_eq!(parse_frame(&f, false), Some((3, 7, 123_456)));
        let v = MediaProfile::video(1000, 30);
        let k = build_frame(&v, 1, 2, 99, true);
        assert_eq!(k[0], 0x00, "VP8 keyframe P bit clear");
        assert_eq!(k.len(), v.keyframe_bytes);
        assert_eq!(parse_frame(&k, true), Some((1, 2, 99)));
        let d = build_frame(&v, 1, 3, 100, false);
        assert_eq!(d[0], 0x01);
        assert_eq!(parse_frame(&d[..10], true), None);
    }

    #[test]
    fn frame_integrity() {
        let mut last = Vec::new();
        assert!(frame_in_order(&mut last, Some((2, 5, 0))));
        assert!(
            frame_in_order(&mut last, Some((2, 9, 0))),
            "a gap is loss, not damage"
        );
        assert!(!frame_in_order(&mut last, Some((2, 9, 0))), "duplicate");
        assert!(!frame_in_order(&mut last, Some((2, 3, 0))), "out of order");
        assert!(frame_in_order(&mut last, Some((0, 0, 0))));
        assert!(!frame_in_order(&mut last, None), "not a benchmark frame");
    }

    #[test]
    fn datagram_classification() {
        let pad = |mut v: Vec<u8>| {
            v.resize(20, 0);
            v
        };
        assert_eq!(classify(&pad(vec![0x00, 0x01])), Datagram::Stun);
        assert_eq!(classify(&pad(vec![0x01, 0x01])), Datagram::Stun);
        assert_eq!(classify(&pad(vec![22, 0xfe])), Datagram::Dtls);
        assert_eq!(classify(&pad(vec![63, 0])), Datagram::Dtls);
        // RTP: payload types outside 64–95, with or without the marker bit.
        for pt in [0u8, 96, 111, 127, 0x80 | 96, 0x80 | 111] {
            assert_eq!(classify(&pad(vec![0x80, pt])), Datagram::Rtp, "pt {pt}");
        }
        // RTCP: SR, RR, SDES, BYE, APP, RTPFB, PSFB, XR (192..=223).
        for pt in [200u8, 201, 202, 203, 204, 205, 206, 207, 192, 223] {
            assert_eq!(classify(&pad(vec![0x81, pt])), Datagram::Rtcp, "pt {pt}");
        }
        // Padding/extension/CSRC bits set: still RTP (first byte up to 191).
        assert_eq!(classify(&pad(vec![0xbf, 96])), Datagram::Rtp);
        assert_eq!(classify(&pad(vec![0xc0, 96])), Datagram::Other);
        assert_eq!(classify(&[0x80, 96, 0, 0, 0, 0, 0, 0]), Datagram::Other);
        assert_eq!(classify(&[0x80, 200, 0, 1, 0, 0, 0, 0]), Datagram::Rtcp);
        assert_eq!(classify(&pad(vec![70, 0])), Datagram::Other, "TURN channel");
        assert_eq!(classify(&[]), Datagram::Other);
    }

    #[test]
    fn rtp_classification() {
        let mut rtp = vec![0x80u8, 111];
        rtp.resize(20, 0);
        assert!(is_rtp(&rtp));
        let mut rtcp = vec![0x80u8, 200];
        rtcp.resize(20, 0);
        assert!(!is_rtp(&rtcp));
        assert!(!is_rtp(&[0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), "STUN");
        assert!(!is_rtp(&[22u8; 20]), "DTLS");
    }

    #[test]
    fn histogram_quantiles() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us * 10));
        }
        assert_eq!(h.quantile(0.5), Some(Duration::from_micros(510)));
        assert_eq!(h.quantile(0.99), Some(Duration::from_micros(1000)));
    }
}
