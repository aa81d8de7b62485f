//! `conclave-bench audio|video|livestream`: synthetic str0m clients against a Conclave the
//! bench starts (or a loopback URL), side by side with the raw-limit probe and Janus VideoRoom
//! under the same scenario, in one run.
//!
//! Sequence per server under test: publishers join and connect (no media yet); receivers join
//! (at most `join_concurrency` joining at once) until every one is connected with all its
//! tracks; RSS is read (idle participants); media starts; join probes join one by one while
//! media flows (token → first remote frame); then the measurement window: server and client
//! CPU from `/proc` (whole process and per thread), the server's per-loop-thread counters from
//! `/metrics`, RTP datagrams sent and received, frames sent and received (attributed by the
//! send time they carry), latency; then everyone leaves.
//!
//! Receivers count RTP at the socket; by default only witnesses (1 receiver in
//! `sample_every`) also feed it to str0m ([`ReceiveMode`]), so the clients' own decrypting and
//! depacketising does not cap what the server can show. Loss is then counted in datagrams:
//! `expected` = RTP datagrams the publishers handed to the kernel in the window × receivers
//! per publisher, `received` = RTP datagrams the receivers' sockets delivered in the same
//! window (both counters read at the window's start and end: datagrams in flight at the start
//! and at the end cancel out while the load is steady). With `full_receive` loss is counted in
//! frames, as before.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::client::{ClientSpec, MediaProfile, ReceiveMode, Shared};
use super::janus::JanusTarget;
use super::limit::{probe, LimitReport};
use super::metrics::{
    fetch_loop_metrics, loop_window, saturated, thread_loads, LoopThreadReport, ThreadLoad,
};
use super::server::{default_server_exe, have_taskset, pin_self, ConclaveTarget};
use super::{
    allowed_cores, proc_cpu_time, proc_rss_kb, proc_thread_cpu_times, udp_rcvbuf_errors, BenchError,
};

/// Threads listed per process in the JSON report (busiest first).
const TOP_THREADS: usize = 4;

/// Which scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// P audio publishers → S subscribers, Opus-sized packets at 50 pkt/s.
    Audio,
    /// N×N video conference, VP8-like frames.
    Video,
    /// One video publisher → S subscribers.
    Livestream,
}

impl Kind {
    /// The scenario's name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Audio => "audio",
            Kind::Video => "video",
            Kind::Livestream => "livestream",
        }
    }
}

/// Settings of one scenario run.
#[derive(Debug, Clone)]
pub struct MediaBenchOptions {
    /// The scenario.
    pub kind: Kind,
    /// Publishers (video: every participant publishes and receives the others).
    pub publishers: usize,
    /// Receive-only participants (besides the join probes).
    pub subscribers: usize,
    /// Receive-only participants that join one by one while media flows, for join time.
    pub join_probes: usize,
    /// Length of the measurement window.
    pub seconds: f64,
    /// Audio packet payload bytes.
    pub audio_bytes: usize,
    /// Video bitrate per publisher.
    pub video_kbps: u32,
    /// Video frames per second.
    pub fps: u32,
    /// Core for the server (and the limit probe's sender).
    pub server_cpu: Option<usize>,
    /// Core for the clients (this process).
    pub client_cpu: Option<usize>,
    /// Run the same scenario against Janus.
    pub janus: bool,
    /// Why Janus cannot run here (reported instead of its numbers).
    pub janus_unavailable: Option<String>,
    /// Run the raw-limit probe.
    pub limit: bool,
    /// Seconds per limit-probe method.
    pub limit_seconds: f64,
    /// An external Conclave: URL, API key, API secret (loopback only).
    pub url: Option<(String, String, String)>,
    /// The server binary (default: `conclave` next to `conclave-bench`).
    pub server_exe: Option<std::path::PathBuf>,
    /// Receivers joining at once.
    pub join_concurrency: usize,
    /// Hard bound on the whole run.
    pub max_duration: Duration,
    /// Every receiver feeds every datagram to str0m (the old mode); otherwise count-only.
    pub full_receive: bool,
    /// Count-only mode: 1 receiver in this many is a witness fed everything (0: none).
    pub sample_every: usize,
    /// Count-only mode: the other receivers feed 1 RTP datagram in this many to str0m (0:
    /// none), which keeps their RTCP feedback flowing.
    pub feed_every: u64,
    /// `rtc.threads` for the server the bench starts (unset: the server's default).
    pub threads: Option<usize>,
    /// Rooms the participants are split over (at least 1).
    pub rooms: usize,
    /// `rtc.congestion_control` of the server the bench starts.
    pub congestion_control: bool,
}

impl MediaBenchOptions {
    /// How receiver number `index` (in join order) treats RTP.
    fn receive_mode(&self, index: usize) -> ReceiveMode {
        if self.full_receive || (self.sample_every > 0 && index % self.sample_every == 0) {
            ReceiveMode::Full
        } else {
            ReceiveMode::CountOnly
        }
    }

    /// `full` or `count-only`.
    fn receive_mode_name(&self) -> &'static str {
        if self.full_receive {
            "full"
        } else {
            "count-only"
        }
    }
}

/// What one server under test did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SutReport {
    /// Participants in the window (publishers, subscribers, probes).
    pub participants: usize,
    /// Receiving peer connections.
    pub receivers: usize,
    /// `full` (every datagram through str0m) or `count-only` (RTP counted at the socket,
    /// witnesses fed to str0m).
    pub receive_mode: &'static str,
    /// Receivers that fed every datagram to str0m (latency, frame integrity).
    pub witnesses: usize,
    /// Clients that failed (join, signalling, connect).
    pub failed_clients: usize,
    /// First failure messages.
    pub failures: Vec<String>,
    /// Window length, s.
    pub window_s: f64,
    /// RTP datagrams/s delivered to subscribers.
    pub forwarded_pps: f64,
    /// Their bits/s (UDP payload).
    pub forwarded_bps: f64,
    /// Average forwarded datagram, bytes.
    pub avg_packet_bytes: f64,
    /// Server CPU seconds in the window.
    pub server_cpu_s: Option<f64>,
    /// Forwarded packets per server CPU-second.
    pub pkts_per_cpu_s: Option<f64>,
    /// Busiest server threads (CPU / window; 1.0 = a whole core), from `/proc`.
    pub server_threads: Vec<ThreadLoad>,
    /// Server media loop threads from `/metrics`; `None`: per-thread metrics not available.
    pub loop_threads: Option<Vec<LoopThreadReport>>,
    /// Client (this process) CPU seconds in the window.
    pub client_cpu_s: Option<f64>,
    /// Cores the client may run on (1 when pinned).
    pub client_cores: usize,
    /// Client CPU / window (1.0 = one core).
    pub client_cpu_ratio: Option<f64>,
    /// Busiest client threads (CPU / window).
    pub client_threads: Vec<ThreadLoad>,
    /// The client side was saturated (busiest thread ≥ 90 % of a core, or all threads ≥ 90 %
    /// of the client's cores): the result may be limited by the clients, not the server.
    pub client_saturated: bool,
    /// RTP datagrams the publishers sent in the window × receivers per publisher.
    pub datagrams_expected: u64,
    /// RTP datagrams the receivers' sockets delivered in the window.
    pub datagrams_received: u64,
    /// Share of the received RTP datagrams fed to str0m (1.0 in full mode).
    pub fed_ratio: Option<f64>,
    /// Frames sent in the window × their intended witnesses.
    pub frames_expected: u64,
    /// Frames witnesses received (sent in the window).
    pub frames_received: u64,
    /// Frames witnesses received that failed the integrity check (magic, publisher, seq order).
    pub bad_frames: u64,
    /// Loss: count-only mode 1 − datagrams received / expected (see the module
    /// documentation); full mode 1 − frames received / expected (a video frame is lost if any
    /// of its packets is).
    pub loss_ratio: Option<f64>,
    /// 1 − frames received / expected over the witnesses.
    pub frame_loss_ratio: Option<f64>,
    /// 1 − datagrams received / expected.
    pub datagram_loss_ratio: Option<f64>,
    /// Send → receive through the SFU, including both client stacks, p50 ms.
    pub latency_p50_ms: Option<f64>,
    /// p99 ms.
    pub latency_p99_ms: Option<f64>,
    /// Token → first remote frame of the join probes, p50 ms.
    pub join_p50_ms: Option<f64>,
    /// p99 ms.
    pub join_p99_ms: Option<f64>,
    /// Server RSS growth per connected idle participant, KiB.
    pub rss_per_participant_kb: Option<f64>,
    /// Datagrams dropped in the window because a UDP receive buffer was full (the bench's
    /// network namespace when Janus runs, else the whole machine): clients not keeping up.
    pub udp_rcvbuf_drops: Option<u64>,
    /// Datagrams the clients' sockets refused to send.
    pub client_tx_drops: u64,
    /// Frames str0m refused to send (whole run).
    pub client_write_errors: u64,
    /// Publisher schedule restarts after falling five frames behind (whole run).
    pub client_send_stalls: u64,
}

/// One scenario's results: Conclave, the limit, Janus, and the ratios.
#[derive(Debug, Clone, Serialize)]
pub struct MediaBenchReport {
    /// `audio`, `video` or `livestream`.
    pub scenario: &'static str,
    /// Publishers.
    pub publishers: usize,
    /// Receive-only participants (with the probes).
    pub subscribers: usize,
    /// Whether server and clients ran on separate pinned cores.
    pub pinned: bool,
    /// `full` or `count-only` receiving.
    pub receive_mode: &'static str,
    /// `rtc.threads` given to the server, if any.
    pub threads: Option<usize>,
    /// Rooms the participants were split over.
    pub rooms: usize,
    /// `rtc.congestion_control` of the server.
    pub congestion_control: bool,
    /// Conclave run: the clients were saturated (see [`SutReport::client_saturated`]).
    pub client_saturated: bool,
    /// Conclave: forwarded packets/s.
    pub forwarded_pps: f64,
    /// Conclave: forwarded bits/s.
    pub forwarded_bps: f64,
    /// Conclave: server CPU seconds in the window.
    pub server_cpu_s: Option<f64>,
    /// Conclave: clients' CPU seconds in the window.
    pub client_cpu_s: Option<f64>,
    /// Conclave: packets per server CPU-second.
    pub pkts_per_cpu_s: Option<f64>,
    /// Conclave: loss.
    pub loss_ratio: Option<f64>,
    /// Conclave: latency p50, ms.
    pub latency_p50_ms: Option<f64>,
    /// Conclave: latency p99, ms.
    pub latency_p99_ms: Option<f64>,
    /// Conclave: join p50, ms.
    pub join_p50_ms: Option<f64>,
    /// Conclave: join p99, ms.
    pub join_p99_ms: Option<f64>,
    /// Conclave: RSS per idle participant, KiB.
    pub rss_per_participant_kb: Option<f64>,
    /// Limit probe: `sendto` datagrams per CPU-second.
    pub limit_sendto_pps: Option<f64>,
    /// Limit probe: `sendmmsg`.
    pub limit_sendmmsg_pps: Option<f64>,
    /// Limit probe: UDP GSO.
    pub limit_gso_pps: Option<f64>,
    /// Conclave packets per CPU-second / sendmmsg limit.
    pub ratio_to_limit: Option<f64>,
    /// Janus: forwarded packets/s.
    pub janus_forwarded_pps: Option<f64>,
    /// Janus: packets per CPU-second.
    pub janus_pkts_per_cpu_s: Option<f64>,
    /// Janus: loss.
    pub janus_loss_ratio: Option<f64>,
    /// Janus: latency p50, ms.
    pub janus_latency_p50_ms: Option<f64>,
    /// Janus: latency p99, ms.
    pub janus_latency_p99_ms: Option<f64>,
    /// Janus: join p50, ms.
    pub janus_join_p50_ms: Option<f64>,
    /// Janus: RSS per idle participant, KiB.
    pub janus_rss_per_participant_kb: Option<f64>,
    /// Conclave / Janus packets per CPU-second.
    pub ratio_to_janus: Option<f64>,
    /// Why Janus did not run, when asked to.
    pub janus_error: Option<String>,
    /// Everything measured on Conclave.
    pub conclave: SutReport,
    /// The limit probe.
    pub limit: Option<LimitReport>,
    /// Everything measured on Janus.
    pub janus: Option<SutReport>,
}

/// A server under test.
enum Sut {
    Conclave(Arc<ConclaveTarget>),
    Janus(Arc<JanusTarget>),
}

impl Sut {
    /// Conclave's base URL (for `/metrics`).
    fn http_url(&self) -> Option<&str> {
        match self {
            Sut::Conclave(c) => Some(&c.http_url),
            Sut::Janus(_) => None,
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Sut::Conclave(c) => c.pid,
            Sut::Janus(j) => Some(j.pid),
        }
    }

    fn spawn(
        &self,
        room: &str,
        spec: ClientSpec,
        shared: &Arc<Shared>,
        stop: &watch::Receiver<bool>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> JoinHandle<()> {
        match self {
            Sut::Conclave(c) => tokio::spawn(super::lk::run_client(
                c.clone(),
                room.to_owned(),
                spec,
                shared.clone(),
                stop.clone(),
                permit,
            )),
            Sut::Janus(j) => tokio::spawn(super::janus::run_client(
                j.clone(),
                spec,
                shared.clone(),
                stop.clone(),
                permit,
            )),
        }
    }

    /// Janus gathers on the private namespace's veth end (127.0.0.2) and pairs only with
    /// candidates there; Conclave listens on 127.0.0.1.
    fn local_ip(&self) -> std::net::IpAddr {
        match self {
            Sut::Conclave(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            Sut::Janus(_) => std::net::Ipv4Addr::new(127, 0, 0, 2).into(),
        }
    }

    fn all_published(&self) {
        if let Sut::Janus(j) = self {
            j.all_published();
        }
    }
}

/// Counters and CPU readings at one edge of the measurement window.
struct Snapshot {
    at: Instant,
    server_cpu: Option<f64>,
    server_threads: Vec<(u32, String, Duration)>,
    client_cpu: Option<f64>,
    client_threads: Vec<(u32, String, Duration)>,
    drops: Option<u64>,
    rx_rtp: u64,
    rx_bytes: u64,
    rx_fed: u64,
    tx_rtp: u64,
}

impl Snapshot {
    /// Reads everything now; `pid` is the server's.
    fn take(shared: &Shared, pid: Option<&str>) -> Self {
        Self {
            at: Instant::now(),
            rx_rtp: shared.rx_rtp.load(Ordering::Relaxed),
            rx_bytes: shared.rx_rtp_bytes.load(Ordering::Relaxed),
            rx_fed: shared.rx_rtp_fed.load(Ordering::Relaxed),
            tx_rtp: shared.tx_rtp.load(Ordering::Relaxed),
            server_cpu: pid.and_then(proc_cpu_time).map(|d| d.as_secs_f64()),
            client_cpu: proc_cpu_time("self").map(|d| d.as_secs_f64()),
            drops: udp_rcvbuf_errors(),
            server_threads: pid.and_then(proc_thread_cpu_times).unwrap_or_default(),
            client_threads: proc_thread_cpu_times("self").unwrap_or_default(),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until `done()` or `deadline`; returns whether it got done.
async fn wait_for(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn profile(opts: &MediaBenchOptions) -> MediaProfile {
    match opts.kind {
        Kind::Audio => MediaProfile::audio(opts.audio_bytes),
        Kind::Video | Kind::Livestream => MediaProfile::video(opts.video_kbps, opts.fps),
    }
}

async fn run_sut(sut: &Sut, opts: &MediaBenchOptions) -> Result<SutReport, BenchError> {
    let base = format!("bench-{}-{:08x}", opts.kind.name(), rand::random::<u32>());
    let rooms = opts.rooms.max(1);
    // Publisher i, subscriber j and probe k are in room i, j and k modulo `rooms`.
    let room_name = |n: usize| format!("{base}-{}", n % rooms);
    let p = opts.publishers.max(1);
    let pubs_in = |r: usize| (0..p).filter(|i| i % rooms == r).count();
    let profile = profile(opts);
    let video_conf = opts.kind == Kind::Video;
    let shared = Arc::new(Shared::new(p));
    let (stop_tx, stop_rx) = watch::channel(false);
    let pid = sut.pid();
    let pid_s = pid.map(|p| p.to_string());
    let rss0 = pid_s.as_deref().and_then(proc_rss_kb);
    let mut tasks = Vec::new();
    let sem = Arc::new(Semaphore::new(opts.join_concurrency.max(1)));

    // 1. Publishers (video: each also receives the others).
    for i in 0..p {
        let spec = ClientSpec {
            identity: format!("pub-{i}"),
            publish: Some(i as u32),
            receive_tracks: if video_conf {
                pubs_in(i % rooms).saturating_sub(1)
            } else {
                0
            },
            join_probe: false,
            profile,
            local_ip: sut.local_ip(),
            receive: opts.receive_mode(i),
            feed_every: opts.feed_every,
        };
        tasks.push(sut.spawn(&room_name(i), spec, &shared, &stop_rx, None));
    }
    let deadline = Instant::now() + Duration::from_secs(20) + Duration::from_millis(50) * p as u32;
    let all_pub = wait_for(deadline, || {
        shared.pub_ready.load(Ordering::SeqCst) >= p || shared.failed.load(Ordering::SeqCst) > 0
    })
    .await;
    if !all_pub || shared.failed.load(Ordering::SeqCst) > 0 {
        let _ = stop_tx.send(true);
        let f = shared
            .failures
            .lock()
            .map(|f| f.join("; "))
            .unwrap_or_default();
        return Err(BenchError::Timeout(format!(
            "{} of {p} publishers ready; failures: {f}",
            shared.pub_ready.load(Ordering::SeqCst)
        )));
    }
    sut.all_published();

    // 2. Receivers.
    // Every receiver gets every track published in its room (video: publishers get the
    // others of their room).
    // Receivers are numbered in join order for the witness choice: publishers (video), then
    // subscribers, then join probes.
    let sub_index0 = if video_conf { p } else { 0 };
    for j in 0..opts.subscribers {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| BenchError::Options(e.to_string()))?;
        let spec = ClientSpec {
            identity: format!("sub-{j}"),
            publish: None,
            receive_tracks: pubs_in(j % rooms),
            join_probe: false,
            profile,
            local_ip: sut.local_ip(),
            receive: opts.receive_mode(sub_index0 + j),
            feed_every: opts.feed_every,
        };
        tasks.push(sut.spawn(&room_name(j), spec, &shared, &stop_rx, Some(permit)));
    }
    let receivers0 = if video_conf { p } else { 0 } + opts.subscribers;
    let deadline =
        Instant::now() + Duration::from_secs(30) + Duration::from_millis(30) * receivers0 as u32;
    wait_for(deadline, || {
        shared.sub_ready.load(Ordering::SeqCst) + shared.failed.load(Ordering::SeqCst) >= receivers0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss1 = pid_s.as_deref().and_then(proc_rss_kb);
    let joined = p + opts.subscribers;
    let rss_per = match (rss0, rss1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / joined.max(1) as f64),
        _ => None,
    };

    // 3. Media on; warm up (keyframes, str0m buffers).
    shared.media_on.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // 4. Join probes, one at a time.
    for k in 0..opts.join_probes {
        let before = shared.sub_ready.load(Ordering::SeqCst);
        let failed = shared.failed.load(Ordering::SeqCst);
        let spec = ClientSpec {
            identity: format!("probe-{k}"),
            publish: None,
            receive_tracks: pubs_in(k % rooms),
            join_probe: true,
            profile,
            local_ip: sut.local_ip(),
            receive: opts.receive_mode(sub_index0 + opts.subscribers + k),
            feed_every: opts.feed_every,
        };
        tasks.push(sut.spawn(&room_name(k), spec, &shared, &stop_rx, None));
        wait_for(Instant::now() + Duration::from_secs(5), || {
            shared.sub_ready.load(Ordering::SeqCst) > before
                || shared.failed.load(Ordering::SeqCst) > failed
        })
        .await;
    }

    // 5. The window.
    let start = Instant::now() + Duration::from_millis(300);
    let end = start + Duration::from_secs_f64(opts.seconds.max(0.2));
    shared.set_window(start, end);
    tokio::time::sleep_until(tokio::time::Instant::from_std(start)).await;
    let snap0 = Snapshot::take(&shared, pid_s.as_deref());
    let loop0 = match sut.http_url() {
        Some(u) => fetch_loop_metrics(u).await.map(|m| (Instant::now(), m)),
        None => None,
    };
    tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
    let snap1 = Snapshot::take(&shared, pid_s.as_deref());
    let loop1 = match (sut.http_url(), &loop0) {
        (Some(u), Some(_)) => fetch_loop_metrics(u).await.map(|m| (Instant::now(), m)),
        _ => None,
    };
    let window = snap1.at.saturating_duration_since(snap0.at).as_secs_f64();
    // Frames sent at the end of the window still travel.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shared.media_on.store(false, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(3), t)
            .await
            .is_err()
        {
            tracing::debug!("bench client did not stop in time");
        }
    }

    // 6. Numbers.
    // The receivers of publisher i: subscribers and probes of its room, and (video) the other
    // publishers of its room; each with its receive index (publishers, subscribers, probes).
    let receivers_of = |i: usize| {
        let r = i % rooms;
        let subs = (0..opts.subscribers)
            .filter(move |j| j % rooms == r)
            .map(move |j| sub_index0 + j);
        let probes = (0..opts.join_probes)
            .filter(move |k| k % rooms == r)
            .map(move |k| sub_index0 + opts.subscribers + k);
        let pubs = (0..p).filter(move |&o| video_conf && o != i && o % rooms == r);
        subs.chain(probes).chain(pubs)
    };
    let witness = |r: usize| opts.receive_mode(r) == ReceiveMode::Full;
    let witnesses_of = |i: usize| receivers_of(i).filter(|&r| witness(r)).count();
    // Publishers send at the same rate: each sent 1/p of the window's RTP.
    let receivers_total: usize = (0..p).map(|i| receivers_of(i).count()).sum();
    let frames_expected: u64 = shared
        .sent_window
        .iter()
        .enumerate()
        .map(|(i, c)| c.load(Ordering::Relaxed) * witnesses_of(i) as u64)
        .sum();
    let frames_received = shared.rx_frames_window.load(Ordering::Relaxed);
    let pkts = snap1.rx_rtp.saturating_sub(snap0.rx_rtp);
    let bytes = snap1.rx_bytes.saturating_sub(snap0.rx_bytes);
    let fed = snap1.rx_fed.saturating_sub(snap0.rx_fed);
    let datagrams_expected =
        snap1.tx_rtp.saturating_sub(snap0.tx_rtp) * receivers_total as u64 / p as u64;
    let ratio = |got: u64, want: u64| (want > 0).then(|| (1.0 - got as f64 / want as f64).max(0.0));
    let frame_loss = ratio(frames_received, frames_expected);
    let datagram_loss = ratio(pkts, datagrams_expected);
    let delta = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let server_cpu = delta(snap0.server_cpu, snap1.server_cpu);
    let client_cpu = delta(snap0.client_cpu, snap1.client_cpu);
    let client_threads = thread_loads(&snap0.client_threads, &snap1.client_threads, window);
    let client_cores = allowed_cores();
    let client_cpu_ratio = client_cpu.map(|c| c / window.max(1e-9));
    let client_saturated = saturated(
        client_threads.first().map(|t| t.cpu_ratio),
        client_cpu_ratio,
        client_cores,
    );
    let mut server_threads = thread_loads(&snap0.server_threads, &snap1.server_threads, window);
    server_threads.truncate(TOP_THREADS);
    let loop_threads = match (loop0, loop1) {
        (Some((t0, a)), Some((t1, b))) => {
            let w = loop_window(&a, &b, t1.saturating_duration_since(t0).as_secs_f64());
            (!w.is_empty()).then_some(w)
        }
        _ => None,
    };
    let mut joins = shared.joins.lock().map(|j| j.clone()).unwrap_or_default();
    joins.sort();
    let failures = shared
        .failures
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    Ok(SutReport {
        participants: p + opts.subscribers + opts.join_probes,
        receivers: receivers0 + opts.join_probes,
        receive_mode: opts.receive_mode_name(),
        witnesses: (0..sub_index0 + opts.subscribers + opts.join_probes)
            .filter(|&r| witness(r))
            .count(),
        failed_clients: shared.failed.load(Ordering::SeqCst),
        failures,
        window_s: window,
        forwarded_pps: pkts as f64 / window,
        forwarded_bps: bytes as f64 * 8.0 / window,
        avg_packet_bytes: if pkts > 0 {
            bytes as f64 / pkts as f64
        } else {
            0.0
        },
        server_cpu_s: server_cpu,
        pkts_per_cpu_s: server_cpu.map(|c| pkts as f64 / c.max(0.01)),
        server_threads,
        loop_threads,
        client_cpu_s: client_cpu,
        client_cores,
        client_cpu_ratio,
        client_threads: client_threads.into_iter().take(TOP_THREADS).collect(),
        client_saturated,
        datagrams_expected,
        datagrams_received: pkts,
        fed_ratio: (pkts > 0).then(|| fed as f64 / pkts as f64),
        frames_expected,
        frames_received,
        bad_frames: shared.rx_bad_frames.load(Ordering::Relaxed),
        loss_ratio: if opts.full_receive {
            frame_loss
        } else {
            datagram_loss
        },
        frame_loss_ratio: frame_loss,
        datagram_loss_ratio: datagram_loss,
        latency_p50_ms: shared.latency.quantile(0.50).map(ms),
        latency_p99_ms: shared.latency.quantile(0.99).map(ms),
        join_p50_ms: (!joins.is_empty()).then(|| ms(super::quantile(&joins, 0.50))),
        join_p99_ms: (!joins.is_empty()).then(|| ms(super::quantile(&joins, 0.99))),
        rss_per_participant_kb: rss_per,
        udp_rcvbuf_drops: match (snap0.drops, snap1.drops) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
        client_tx_drops: shared.tx_drops.load(Ordering::Relaxed),
        client_write_errors: shared.write_errors.load(Ordering::Relaxed),
        client_send_stalls: shared.send_stalls.load(Ordering::Relaxed),
    })
}

/// Runs one scenario: Conclave, then the limit probe, then Janus.
pub async fn run(opts: MediaBenchOptions) -> Result<MediaBenchReport, BenchError> {
    let bound = opts.max_duration;
    tokio::time::timeout(bound, run_inner(opts))
        .await
        .map_err(|_| BenchError::Timeout(format!("the whole run exceeded {bound:?}")))?
}

async fn run_inner(opts: MediaBenchOptions) -> Result<MediaBenchReport, BenchError> {
    let pinned = match (opts.server_cpu, opts.client_cpu) {
        (Some(_), Some(c)) if have_taskset() => pin_self(c).is_ok(),
        _ => false,
    };
    // Several loop threads need several cores: then the server is not pinned to one.
    let one_core = opts.threads.is_none_or(|t| t == 1);
    let server_cpu = if pinned && one_core {
        opts.server_cpu
    } else {
        None
    };
    let conclave = match &opts.url {
        Some((url, key, secret)) => ConclaveTarget::external(url, key, secret)?,
        None => {
            let mut env: Vec<(&str, std::ffi::OsString)> = opts
                .threads
                .map(|n| ("CONCLAVE_RTC__THREADS", n.to_string().into()))
                .into_iter()
                .collect();
            // Only when off (on is the default): builds from before the setting still start.
            if !opts.congestion_control {
                env.push(("CONCLAVE_RTC__CONGESTION_CONTROL", "false".into()));
            }
            ConclaveTarget::start_with_env(opts.server_exe.as_deref(), server_cpu, &env).await?
        }
    };
    let sut = Sut::Conclave(Arc::new(conclave));
    let c = run_sut(&sut, &opts).await?;
    drop(sut);

    let limit = if opts.limit {
        let size = if c.avg_packet_bytes > 0.0 {
            c.avg_packet_bytes.round() as usize
        } else {
            opts.audio_bytes + 40
        };
        Some(probe(size, c.receivers, opts.limit_seconds, server_cpu).await?)
    } else {
        None
    };

    let (janus, janus_error) = if opts.janus {
        match JanusTarget::start(server_cpu, opts.publishers).await {
            Ok(j) => {
                let j = Arc::new(j);
                let sut = Sut::Janus(j.clone());
                match run_sut(&sut, &opts).await {
                    Ok(r) => (Some(r), None),
                    Err(e) => (None, Some(format!("{e}; janus log: {}", j.log_tail()))),
                }
            }
            Err(e) => return Err(e),
        }
    } else {
        (None, opts.janus_unavailable.clone())
    };

    let ratio_to_limit = match (c.pkts_per_cpu_s, limit.map(|l| l.sendmmsg_pps)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let ratio_to_janus = match (
        c.pkts_per_cpu_s,
        janus.as_ref().and_then(|j| j.pkts_per_cpu_s),
    ) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    Ok(MediaBenchReport {
        scenario: opts.kind.name(),
        publishers: opts.publishers,
        subscribers: opts.subscribers + opts.join_probes,
        pinned,
        receive_mode: opts.receive_mode_name(),
        threads: opts.threads,
        rooms: opts.rooms,
        congestion_control: opts.congestion_control,
        client_saturated: c.client_saturated,
        forwarded_pps: c.forwarded_pps,
        forwarded_bps: c.forwarded_bps,
        server_cpu_s: c.server_cpu_s,
        client_cpu_s: c.client_cpu_s,
        pkts_per_cpu_s: c.pkts_per_cpu_s,
        loss_ratio: c.loss_ratio,
        latency_p50_ms: c.latency_p50_ms,
        latency_p99_ms: c.latency_p99_ms,
        join_p50_ms: c.join_p50_ms,
        join_p99_ms: c.join_p99_ms,
        rss_per_participant_kb: c.rss_per_participant_kb,
        limit_sendto_pps: limit.map(|l| l.sendto_pps),
        limit_sendmmsg_pps: limit.map(|l| l.sendmmsg_pps),
        limit_gso_pps: limit.and_then(|l| l.gso_pps),
        ratio_to_limit,
        janus_forwarded_pps: janus.as_ref().map(|j| j.forwarded_pps),
        janus_pkts_per_cpu_s: janus.as_ref().and_then(|j| j.pkts_per_cpu_s),
        janus_loss_ratio: janus.as_ref().and_then(|j| j.loss_ratio),
        janus_latency_p50_ms: janus.as_ref().and_then(|j| j.latency_p50_ms),
        janus_latency_p99_ms: janus.as_ref().and_then(|j| j.latency_p99_ms),
        janus_join_p50_ms: janus.as_ref().and_then(|j| j.join_p50_ms),
        janus_rss_per_participant_kb: janus.as_ref().and_then(|j| j.rss_per_participant_kb),
        ratio_to_janus,
        janus_error,
        conclave: c,
        limit,
        janus,
    })
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |x| format!("{x:.digits$}"))
}

/// Latency quantiles at the histogram's ceiling mean "at least that".
fn lat(v: Option<f64>) -> String {
    match v {
        Some(x) if x >= 500.0 => "> 500".to_owned(),
        other => f(other, 2),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |x| format!("{:.2} %", x * 100.0))
}

impl MediaBenchReport {
    /// The Markdown table header (one row per scenario follows).
    pub fn markdown_header() -> &'static str {
        "| scenario | server | fwd pkt/s | fwd Mbit/s | server CPU s | client CPU s | client busiest thread | pkt/CPU-s | loss | latency p50 / p99 ms | join p50 / p99 ms | RSS/participant kB | rcvbuf drops | failed |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    }

    fn row(&self, server: &str, r: &SutReport) -> String {
        format!(
            "| {} ({}→{}) | {} | {:.0} | {:.2} | {} | {} | {}{} | {} | {} | {} / {} | {} / {} | {} | {} | {} |\n",
            self.scenario,
            self.publishers,
            self.subscribers,
            server,
            r.forwarded_pps,
            r.forwarded_bps / 1e6,
            f(r.server_cpu_s, 2),
            f(r.client_cpu_s, 2),
            pct(r.client_threads.first().map(|t| t.cpu_ratio)),
            if r.client_saturated { " ⚠" } else { "" },
            f(r.pkts_per_cpu_s, 0),
            pct(r.loss_ratio),
            lat(r.latency_p50_ms),
            lat(r.latency_p99_ms),
            f(r.join_p50_ms, 0),
            f(r.join_p99_ms, 0),
            f(r.rss_per_participant_kb, 1),
            r.udp_rcvbuf_drops
                .map_or_else(|| "–".to_owned(), |d| d.to_string()),
            r.failed_clients,
        )
    }

    /// Rows for Conclave and Janus, then the limit and the ratios as a short list.
    pub fn markdown_rows(&self) -> String {
        let mut s = self.row("Conclave", &self.conclave);
        if let Some(j) = &self.janus {
            s.push_str(&self.row("Janus", j));
        }
        s
    }

    /// The limit probe and the ratios, one line.
    pub fn markdown_summary(&self) -> String {
        let mut s = format!("- **{}**: ", self.scenario);
        if let Some(l) = &self.limit {
            s.push_str(&format!(
                "limit ({} B × {} sockets) sendto {:.0}, sendmmsg {:.0}, GSO {} pkt/CPU-s; ",
                l.packet_bytes,
                l.sockets,
                l.sendto_pps,
                l.sendmmsg_pps,
                f(l.gso_pps, 0)
            ));
        }
        s.push_str(&format!(
            "Conclave/sendmmsg = {}, Conclave/Janus = {}",
            f(self.ratio_to_limit, 2),
            f(self.ratio_to_janus, 2)
        ));
        if let Some(e) = &self.janus_error {
            s.push_str(&format!(" (Janus failed: {e})"));
        }
        if !self.conclave.failures.is_empty() {
            s.push_str(&format!(
                " (client failures: {})",
                self.conclave.failures.join("; ")
            ));
        }
        s.push_str(if self.pinned {
            " [server and clients pinned to separate cores]\n"
        } else {
            " [not pinned]\n"
        });
        s
    }

    /// How a run received and how loaded both sides were: the receive mode, a warning when
    /// the clients were saturated, the server's threads and loop threads. One line each.
    pub fn markdown_load(&self, server: &str, r: &SutReport) -> String {
        let mut s = match r.receive_mode {
            "full" => format!(
                "- {} {server}: receive mode full (every datagram through str0m; loss in frames)",
                self.scenario
            ),
            _ => format!(
                "- {} {server}: receive mode count-only (RTP counted at the socket; {} witness \
                 receivers fed to str0m for latency and integrity; {} of the datagrams fed; \
                 loss = 1 − received / expected datagrams = 1 − {} / {}; witness frame loss {})",
                self.scenario,
                r.witnesses,
                pct(r.fed_ratio),
                r.datagrams_received,
                r.datagrams_expected,
                pct(r.frame_loss_ratio),
            ),
        };
        if r.bad_frames > 0 {
            s.push_str(&format!("; {} damaged frames", r.bad_frames));
        }
        s.push('\n');
        let threads = |t: &[ThreadLoad]| {
            t.iter()
                .map(|t| format!("{} {}", t.name, pct(Some(t.cpu_ratio))))
                .collect::<Vec<_>>()
                .join(", ")
        };
        s.push_str(&format!(
            "- {} {server}: client CPU {} of {} core(s), busiest threads {}\n",
            self.scenario,
            pct(r.client_cpu_ratio),
            r.client_cores,
            threads(&r.client_threads),
        ));
        if r.client_saturated {
            s.push_str(&format!(
                "- **{} {server}: CLIENT SATURATED** (a thread ≥ 90 % of a core or all \
                 threads ≥ 90 % of the client's cores): this result may be limited by the \
                 bench's clients, not by the server\n",
                self.scenario
            ));
        }
        if !r.server_threads.is_empty() {
            s.push_str(&format!(
                "- {} {server}: busiest server threads {}\n",
                self.scenario,
                threads(&r.server_threads)
            ));
        }
        if server == "Conclave" {
            let given = self.threads.map_or_else(
                || "server default".to_owned(),
                |n| format!("rtc.threads = {n}, {} room(s)", self.rooms),
            );
            let given = format!(
                "{given}, congestion control {}",
                if self.congestion_control { "on" } else { "off" }
            );
            match &r.loop_threads {
                None => s.push_str(&format!(
                    "- {} Conclave loop threads ({given}): per-thread metrics not available\n",
                    self.scenario
                )),
                Some(l) => {
                    let each = l
                        .iter()
                        .map(|t| {
                            format!(
                                "#{} busy {} at {} dgram/s, {} participant polls/s, queue {}→{}",
                                t.thread,
                                pct(t.busy_ratio),
                                f(t.datagrams_per_s, 0),
                                f(t.polls_per_s, 0),
                                f(t.queue_depth_start, 0),
                                f(t.queue_depth_end, 0)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                    s.push_str(&format!(
                        "- {} Conclave loop threads ({given}): {each}\n",
                        self.scenario
                    ));
                }
            }
        }
        s
    }

    /// Header, rows and summary.
    pub fn markdown(&self) -> String {
        let mut load = self.markdown_load("Conclave", &self.conclave);
        if let Some(j) = &self.janus {
            load.push_str(&self.markdown_load("Janus", j));
        }
        format!(
            "{}{}\n{}{}",
            Self::markdown_header(),
            self.markdown_rows(),
            self.markdown_summary(),
            load
        )
    }
}

/// Options shared by `conclave-bench audio|video|livestream`.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Length of the measurement window, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Receive-only participants that join one by one while media flows (join time).
    #[arg(long, default_value_t = 10)]
    pub join_probes: usize,
    /// Receivers joining at once during set-up.
    #[arg(long, default_value_t = 16)]
    pub join_concurrency: usize,
    /// Skip the Janus comparison (smoke runs; the documented full run includes it).
    #[arg(long)]
    pub no_janus: bool,
    /// Skip the raw-limit probe.
    #[arg(long)]
    pub no_limit: bool,
    /// Seconds per raw-limit probe method.
    #[arg(long, default_value_t = 2.0)]
    pub limit_seconds: f64,
    /// Core for the server (and the probe's sender).
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// Core for the synthetic clients (this process).
    #[arg(long, default_value_t = 1)]
    pub client_cpu: usize,
    /// Do not pin server and clients to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// An already running Conclave (loopback only) instead of a child process; needs
    /// --api-key and --api-secret. Server CPU and RSS are then not measured.
    #[arg(long, requires_all = ["api_key", "api_secret"])]
    pub url: Option<String>,
    /// LiveKit API key of --url.
    #[arg(long)]
    pub api_key: Option<String>,
    /// LiveKit API secret of --url.
    #[arg(long)]
    pub api_secret: Option<String>,
    /// The `conclave` binary to start as the server (default: the one next to
    /// `conclave-bench`), e.g. to compare two builds with the same load generator.
    #[arg(long)]
    pub server_exe: Option<std::path::PathBuf>,
    /// Stop after this many seconds whatever happens.
    #[arg(long, default_value_t = 600)]
    pub max_seconds: u64,
    /// Print one JSON object instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
    /// Feed every received datagram to str0m (decrypt, depacketise, check and time every
    /// frame) instead of counting RTP at the socket and feeding only the witnesses.
    #[arg(long)]
    pub full_receive: bool,
    /// Count-only mode: 1 receiver in this many is a witness fed every datagram, for latency
    /// and frame integrity (0: no witness, no latency).
    #[arg(long, default_value_t = 10)]
    pub sample_every: usize,
    /// Count-only mode: the other receivers still feed 1 RTP datagram in this many to str0m,
    /// so they keep sending RTCP feedback (transport-wide CC, receiver reports) as real
    /// clients do (0: none: the server then sees silent subscribers).
    #[arg(long, default_value_t = 10)]
    pub feed_every: u64,
    /// Media loop threads for the server the bench starts (`rtc.threads`; 0 = one per
    /// core). With more than one, the server is not pinned to one core (its loops need one
    /// each); the clients stay pinned.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Split the participants over this many rooms (publisher i, subscriber j and probe k go
    /// to room i, j and k modulo this): rooms are what the server's media loop threads share
    /// out, one room stays on one thread.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// `rtc.congestion_control` of the server the bench starts. Default: on for audio and
    /// livestream, off for video: its count-only receivers feed 1 datagram in `feed_every`
    /// to str0m, so their transport-cc feedback reports the rest lost and the server's
    /// estimate would pause the video it is to forward (and 10×10 at 1 Mbit/s is 9 Mbit/s per
    /// receiver, above the 1.5 Mbit/s initial estimate).
    #[arg(long)]
    pub congestion_control: Option<bool>,
}

impl CommonArgs {
    /// The run's options for `kind` with its sizes.
    pub fn options(
        &self,
        kind: Kind,
        publishers: usize,
        subscribers: usize,
        audio_bytes: usize,
        video_kbps: u32,
        fps: u32,
    ) -> MediaBenchOptions {
        let url = match (&self.url, &self.api_key, &self.api_secret) {
            (Some(u), Some(k), Some(s)) => Some((u.clone(), k.clone(), s.clone())),
            _ => None,
        };
        MediaBenchOptions {
            kind,
            publishers,
            subscribers,
            join_probes: self.join_probes,
            seconds: self.seconds,
            audio_bytes,
            video_kbps,
            fps,
            server_cpu: (!self.no_pin).then_some(self.server_cpu),
            client_cpu: (!self.no_pin).then_some(self.client_cpu),
            janus: !self.no_janus,
            janus_unavailable: None,
            limit: !self.no_limit,
            limit_seconds: self.limit_seconds,
            url,
            server_exe: self.server_exe.clone(),
            join_concurrency: self.join_concurrency,
            max_duration: Duration::from_secs(self.max_seconds),
            full_receive: self.full_receive,
            sample_every: self.sample_every,
            feed_every: self.feed_every,
            threads: Some(self.threads),
            rooms: self.rooms.max(1),
            congestion_control: self.congestion_control.unwrap_or(kind != Kind::Video),
        }
    }
}

/// Set in the re-executed bench inside its private network namespace.
const NETNS_ENV: &str = "CONCLAVE_BENCH_NETNS";
/// The veth end in the private namespace that carries 127.0.0.2 for Janus.
pub const JANUS_IFACE: &str = "conclave-b0";

fn netns_script() -> String {
    format!(
        "ip link set lo up && ip link add {i} type veth peer name {i}p && ip link set {i}p up \
         && ip link set {i} up && ip addr add 127.0.0.2/32 dev {i}",
        i = JANUS_IFACE
    )
}

/// Janus gathers ICE candidates only on non-loopback interfaces, so the Janus comparison runs
/// in a private network namespace (`unshare -n`, root) where a veth end carries 127.0.0.2: a
/// loopback address, in a namespace nothing else can reach. The whole bench re-executes itself
/// there (Conclave too, so both get the same kernel paths). Returns its stdout.
async fn rerun_in_private_netns() -> Result<String, BenchError> {
    let probe = tokio::process::Command::new("unshare")
        .args(["-n", "--", "sh", "-c", &netns_script()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .map_err(|e| BenchError::Janus(format!("unshare: {e}")))?;
    if !probe.success() {
        return Err(BenchError::Janus(
            "cannot create a private network namespace with a veth pair (needs root, \
             unshare and ip)"
                .into(),
        ));
    }
    let exe = std::env::current_exe().map_err(|e| BenchError::io("locating conclave-bench", e))?;
    let out = tokio::process::Command::new("unshare")
        .args(["-n", "--", "sh", "-c"])
        .arg(format!("{} && exec \"$0\" \"$@\"", netns_script()))
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(NETNS_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        // Its errors reach our stderr (tokio's `output()` would capture and drop them).
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError::io("re-running the bench in a network namespace", e))?
        .wait_with_output()
        .await
        .map_err(|e| BenchError::io("re-running the bench in a network namespace", e))?;
    if !out.status.success() {
        return Err(BenchError::Server(format!(
            "the bench in its private network namespace failed ({})",
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a scenario and renders it: one JSON object, or the Markdown table and summary.
pub async fn run_to_text(mut opts: MediaBenchOptions, json: bool) -> Result<String, BenchError> {
    // Before any re-execution: a missing server binary is reported here, once.
    if opts.url.is_none() && opts.server_exe.is_none() {
        opts.server_exe = Some(default_server_exe()?);
    }
    if opts.janus && opts.url.is_none() && std::env::var_os(NETNS_ENV).is_none() {
        match rerun_in_private_netns().await {
            Ok(text) => return Ok(text),
            Err(e @ BenchError::Janus(_)) => {
                opts.janus = false;
                opts.janus_unavailable = Some(e.to_string());
            }
            Err(e) => return Err(e),
        }
    }
    let report = run(opts).await?;
    Ok(if json {
        format!("{}\n", serde_json::to_string(&report).unwrap_or_default())
    } else {
        report.markdown()
    })
}
