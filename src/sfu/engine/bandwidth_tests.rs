//! The downlink estimate and the allocator through the virtual network, in virtual time:
//! alice publishes three simulcast layers (about 110, 320 and 840 kbit/s on the wire); bob's
//! link is capped (a bottleneck queue draining at the cap, tail-dropping past 300 ms of
//! backlog, as a shaped router does), carol's never is. str0m's estimator on the SFU side
//! learns bob's capacity from his transport-cc feedback alone.

use std::collections::VecDeque;

use super::tests::{
    answer_for, answer_offer, join, request, sfu, simulcast_camera, simulcast_offer, Peer,
};
use super::*;
use crate::sfu::allocate::Grant;
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{MediaKind, MediaTime, Mid};
use str0m::Output as RtcOutput;

/// One virtual tick. Arrival times are quantized to it; at 5 ms the delay-based estimator
/// read the bursts as congestion and halved an unlimited link's estimate.
const TICK: Duration = Duration::from_millis(1);

/// alice's publishing peer connection in [`Call::peers`].
const ALICE_PUB: usize = 3;

/// Layers alice sends: rid and the bytes of each frame (30 frames a second; str0m packetizes
/// frames over 1200 bytes into several packets).
const LAYERS: [(&str, usize); 3] = [("q", 400), ("h", 1_200), ("f", 3_300)];

/// A bottleneck: datagrams leave at `rate` bits/s in order; one that would wait longer than
/// [`Link::MAX_BACKLOG`] is dropped. Without a rate, everything arrives at once.
struct Link {
    rate: Option<u64>,
    /// Loses every n-th datagram (random loss, deterministically).
    lose_every: Option<u64>,
    sent: u64,
    free_at: Option<Instant>,
    queue: VecDeque<(Instant, SocketAddr, Vec<u8>)>,
    dropped: u64,
}

impl Link {
    const MAX_BACKLOG: Duration = Duration::from_millis(300);

    fn new() -> Self {
        Self {
            rate: None,
            lose_every: None,
            sent: 0,
            free_at: None,
            queue: VecDeque::new(),
            dropped: 0,
        }
    }

    fn send(&mut self, now: Instant, source: SocketAddr, bytes: Vec<u8>) {
        self.sent += 1;
        if self.lose_every.is_some_and(|n| self.sent % n == 0) {
            self.dropped += 1;
            return;
        }
        let Some(rate) = self.rate else {
            self.queue.push_back((now, source, bytes));
            return;
        };
        let start = self.free_at.map_or(now, |f| f.max(now));
        if start.saturating_duration_since(now) > Self::MAX_BACKLOG {
            self.dropped += 1;
            return;
        }
        // Bytes on the wire: the datagram plus UDP and IP headers.
        let bits = (bytes.len() as u64 + 28) * 8;
        let done = start + Duration::from_nanos(bits * 1_000_000_000 / rate);
        self.free_at = Some(done);
        self.queue.push_back((done, source, bytes));
    }

    fn due(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|(at, ..)| *at <= now) {
            if let Some((_, source, bytes)) = self.queue.pop_front() {
                out.push((source, bytes));
            }
        }
        out
    }
}

/// The SFU and its three peers; datagrams to bob cross `link`.
struct Call {
    now: Instant,
    s: Sfu,
    peers: Vec<Peer>,
    link: Link,
    bob: SocketAddr,
    msgs: Vec<(u64, Msg)>,
    /// The last connection quality update alice's client got.
    quality: Option<lk::ConnectionQualityUpdate>,
    /// Loses every n-th RTP datagram alice's publishing peer sends (her uplink).
    uplink_lose_every: Option<u64>,
    uplink_rtp: u64,
    /// alice's publishing peer's egress stats events.
    egress_stats: Vec<str0m::Event>,
}

impl Call {
    fn peer_index(&self, addr: SocketAddr) -> Option<usize> {
        self.peers.iter().position(|p| p.addr == addr)
    }

    /// Moves everything that can move at `now`.
    fn pump(&mut self) {
        let now = self.now;
        for _ in 0..1000 {
            let mut moved = false;
            loop {
                match self.s.poll_output() {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) => {
                        if t.destination == self.bob {
                            self.link.send(now, t.source, t.contents.to_vec());
                            continue;
                        }
                        if let Some(i) = self.peer_index(t.destination) {
                            let r =
                                Receive::new(Protocol::Udp, t.source, t.destination, &t.contents)
                                    .unwrap();
                            let _ = self.peers[i].rtc.handle_input(Input::Receive(now, r));
                            moved = true;
                        }
                    }
                    Output::Signal(id, SignalOut::Message(m)) => self.msgs.push((id.0, *m)),
                    _ => {}
                }
            }
            let bob = self.bob;
            if let Some(i) = self.peer_index(bob) {
                for (source, bytes) in self.link.due(now) {
                    let r = Receive::new(Protocol::Udp, source, bob, &bytes).unwrap();
                    let _ = self.peers[i].rtc.handle_input(Input::Receive(now, r));
                    moved = true;
                }
            }
            for (i, p) in self.peers.iter_mut().enumerate() {
                loop {
                    match p.rtc.poll_output().unwrap() {
                        RtcOutput::Timeout(_) => break,
                        RtcOutput::Transmit(t) => {
                            // SRTP keeps the RTP header in the clear (RTCP: PT 72–79).
                            let d = &t.contents;
                            let rtp = d.len() > 12
                                && d[0] >> 6 == 2
                                && !(72..=79).contains(&(d[1] & 0x7f));
                            if i == ALICE_PUB && rtp {
                                self.uplink_rtp += 1;
                                if self
                                    .uplink_lose_every
                                    .is_some_and(|n| self.uplink_rtp % n == 0)
                                {
                                    continue;
                                }
                            }
                            self.s
                                .handle_datagram(now, p.addr, t.destination, &t.contents);
                            moved = true;
                        }
                        RtcOutput::Event(e) => {
                            if i == ALICE_PUB {
                                p.events.push(e);
                            }
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn tick(&mut self) {
        self.now += TICK;
        self.s.handle_timeout(self.now);
        for p in &mut self.peers {
            let _ = p.rtc.handle_input(Input::Timeout(self.now));
        }
        self.pump();
        // Subscribers answer every new offer.
        let mut offers = Vec::new();
        for (id, m) in self.msgs.drain(..) {
            match m {
                Msg::Offer(o) => offers.push((id, o)),
                Msg::ConnectionQuality(q) if id == 1 => self.quality = Some(q),
                _ => {}
            }
        }
        for (id, o) in offers {
            let i = (id - 1) as usize;
            let a = answer_offer(&mut self.peers[i], &o);
            request(&mut self.s, self.now, id, a);
        }
    }

    /// The down-track of alice's camera at `session`: (layer forwarded, grant, paused as told).
    fn down(&self, session: u64) -> (Option<Rid>, Grant, bool) {
        let p = self
            .s
            .rooms
            .values()
            .flat_map(|r| r.participants.values())
            .find(|p| p.session == SessionId(session))
            .unwrap();
        let d = p
            .down_tracks
            .iter()
            .find(|d| d.kind == MediaKind::Video)
            .unwrap();
        (d.current_rid, d.grant, d.paused)
    }

    fn estimate(&self, session: u64) -> Option<u64> {
        self.s
            .rooms
            .values()
            .flat_map(|r| r.participants.values())
            .find(|p| p.session == SessionId(session))
            .and_then(|p| p.link.estimate)
    }
}

/// alice (session 1, publishing on a second peer: `peers[ALICE_PUB]`), bob (2) and carol (3)
/// in a call; alice's camera is announced with three layers. Returns the call and the mid of
/// her camera.
fn call() -> (Call, Mid) {
    call_with(|_| {})
}

/// [`call`] on an engine whose settings `configure` changed first.
fn call_with(configure: impl FnOnce(&mut SfuConfig)) -> (Call, Mid) {
    // `RUST_LOG=conclave=debug` shows the allocations of a failed run.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let now = Instant::now();
    let mut s = sfu(now);
    configure(&mut s.config);
    let peers = vec![
        Peer::new(now, "10.0.0.1:5000"),
        Peer::new(now, "10.0.0.2:5000"),
        Peer::new(now, "10.0.0.3:5000"),
    ];
    for (id, name) in [(1, "alice"), (2, "bob"), (3, "carol")] {
        join(&mut s, now, id, name);
    }
    let mut c = Call {
        now,
        s,
        peers,
        link: Link::new(),
        bob: "10.0.0.2:5000".parse().unwrap(),
        msgs: Vec::new(),
        quality: None,
        uplink_lose_every: None,
        uplink_rtp: 0,
        egress_stats: Vec::new(),
    };
    c.tick();
    let add = simulcast_camera();
    request(
        &mut c.s,
        c.now,
        1,
        lk::signal_request::Message::AddTrack(add),
    );
    let config = Rtc::builder().set_stats_interval(Some(Duration::from_secs(1)));
    c.peers.push(Peer::with(c.now, "10.0.0.1:5001", config));
    let rids = LAYERS.map(|(rid, _)| rid);
    let (mid, pending, offer) = simulcast_offer(&mut c.peers[ALICE_PUB], &rids);
    request(&mut c.s, c.now, 1, offer);
    c.pump();
    let answer = answer_for(&c.msgs, 1).unwrap();
    c.peers[ALICE_PUB]
        .rtc
        .sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer.sdp).unwrap())
        .unwrap();
    (c, mid)
}

/// Runs the call for `duration`, alice sending 30 frames a second on every layer (a keyframe
/// every 2 s); `check` sees the call after every tick and may end the run early (true).
fn run(
    c: &mut Call,
    mid: Mid,
    frame: &mut u64,
    duration: Duration,
    mut check: impl FnMut(&Call) -> bool,
) -> Duration {
    let start = c.now;
    let mut next_frame = c.now;
    while c.now.duration_since(start) < duration {
        if c.now >= next_frame {
            next_frame += Duration::from_micros(33_333);
            // Keyframes every 2 s, and on request (PLI), as a browser's encoder.
            let mut asked = Vec::new();
            for e in c.peers[ALICE_PUB].events.drain(..) {
                match e {
                    str0m::Event::KeyframeRequest(r) => asked.push(r.rid),
                    e @ str0m::Event::MediaEgressStats(_) => c.egress_stats.push(e),
                    _ => {}
                }
            }
            for (rid, size) in LAYERS {
                let Some(w) = c.peers[ALICE_PUB].rtc.writer(mid) else {
                    continue;
                };
                let Some(pt) = w
                    .payload_params()
                    .find(|p| p.spec().codec == Codec::Vp8)
                    .map(|p| p.pt())
                else {
                    continue;
                };
                let key = *frame % 60 == 0 || asked.contains(&Some(Rid::from(rid)));
                let mut data = vec![if key { 0x10 } else { 0x11 }];
                data.resize(size, 0x42);
                let t = MediaTime::new(*frame * 3000, str0m::media::Frequency::NINETY_KHZ);
                let _ = w.rid(rid.into()).write(pt, c.now, t, data);
            }
            *frame += 1;
        }
        c.tick();
        if check(c) {
            break;
        }
    }
    c.now.duration_since(start)
}

/// bob's link is capped at 300 kbit/s mid-call: within 5 s he is on the low layer while carol
/// keeps the top one; the cap lifted, he is back on the top layer within 10 s; capped below the
/// low layer (60 kbit/s), his video is paused and he is told; restored, it resumes.
#[test]
fn a_capped_subscriber_steps_down_pauses_and_recovers_without_starving_another() {
    let (mut c, mid) = call();
    let mut frame = 0;
    let f = Some(Rid::from("f"));
    let q = Some(Rid::from("q"));
    // Unlimited: both on the top layer.
    run(&mut c, mid, &mut frame, Duration::from_secs(6), |_| false);
    assert_eq!(
        c.down(2).0,
        f,
        "bob on the top layer: {:?}, estimate {:?}",
        c.down(2),
        c.estimate(2)
    );
    assert_eq!(c.down(3).0, f, "carol on the top layer");

    c.link.rate = Some(300_000);
    let took = run(&mut c, mid, &mut frame, Duration::from_secs(5), |c| {
        c.down(2).0 == q
    });
    assert_eq!(
        c.down(2).0,
        q,
        "bob on the low layer within 5 s of the cap (after {took:?}): {:?}, estimate {:?}",
        c.down(2),
        c.estimate(2)
    );
    // Settled under the cap: still low, still receiving (not paused), carol untouched.
    run(&mut c, mid, &mut frame, Duration::from_secs(5), |_| false);
    let (layer, grant, paused) = c.down(2);
    assert_eq!(layer, q, "bob stays on the low layer: {grant:?}");
    assert!(!paused, "the low layer fits: not paused");
    assert_eq!(c.down(3).0, f, "carol keeps the top layer");
    let estimate = c.estimate(2).unwrap();
    assert!(
        (100_000..=400_000).contains(&estimate),
        "bob's estimate {estimate} is near his 300 kbit/s"
    );

    c.link.rate = None;
    let took = run(&mut c, mid, &mut frame, Duration::from_secs(10), |c| {
        c.down(2).0 == f
    });
    assert_eq!(
        c.down(2).0,
        f,
        "bob back on the top layer within 10 s (after {took:?}), estimate {:?}",
        c.estimate(2)
    );

    c.link.rate = Some(60_000);
    run(&mut c, mid, &mut frame, Duration::from_secs(8), |c| {
        c.down(2).2
    });
    assert!(c.link.dropped > 0, "the cap dropped packets");
    let stats = c.s.stats();
    assert!(
        stats.bandwidth_downgrades >= 2,
        "f → q, then f → … : {stats:?}"
    );
    assert!(stats.bandwidth_pauses >= 1, "{stats:?}");
    assert!(
        stats.nacks_received > 0,
        "bob asked for lost packets: {stats:?}"
    );
    assert_eq!(c.down(2).1, Grant::Paused, "estimate {:?}", c.estimate(2));
    assert!(c.down(2).2, "bob was told his video is paused");
    assert_eq!(c.down(3).0, f, "carol keeps the top layer");

    c.link.rate = None;
    run(&mut c, mid, &mut frame, Duration::from_secs(10), |c| {
        !c.down(2).2
    });
    assert!(
        matches!(c.down(2).1, Grant::UpTo(_)) && !c.down(2).2,
        "bob's video resumed: {:?}, estimate {:?}",
        c.down(2),
        c.estimate(2)
    );
}

/// `rtc.congestion_control = false`: no estimate, so bob keeps the top layer he asked for
/// even on a link capped below the low layer (it loses what does not fit), and nothing is
/// paused or stepped down.
#[test]
fn without_congestion_control_a_capped_subscriber_keeps_the_layer_he_asked_for() {
    let (mut c, mid) = call_with(|config| config.congestion_control_off = true);
    let mut frame = 0;
    let f = Some(Rid::from("f"));
    run(&mut c, mid, &mut frame, Duration::from_secs(6), |_| false);
    assert_eq!(c.down(2).0, f, "bob on the top layer: {:?}", c.down(2));
    c.link.rate = Some(60_000);
    run(&mut c, mid, &mut frame, Duration::from_secs(8), |_| false);
    assert!(c.link.dropped > 0, "the cap dropped packets");
    assert_eq!(
        c.estimate(2),
        None,
        "no estimate without congestion control"
    );
    let (layer, _, paused) = c.down(2);
    assert_eq!(layer, f, "bob still on the top layer");
    assert!(!paused, "nothing paused");
    let stats = c.s.stats();
    assert_eq!(
        (stats.bandwidth_pauses, stats.bandwidth_downgrades),
        (0, 0),
        "{stats:?}"
    );
}

/// bob's link loses 5 % of what the SFU sends him: his client's NACKs are counted, his
/// connection quality (from the loss his transport-cc feedback shows) is no longer
/// excellent, while carol's clean link stays excellent; 5 % is below the loss that discounts
/// the estimate, so he keeps the top layer.
#[test]
fn a_lossy_link_shows_in_connection_quality_and_nacks() {
    let (mut c, mid) = call();
    let mut frame = 0;
    run(&mut c, mid, &mut frame, Duration::from_secs(3), |_| false);
    c.link.lose_every = Some(20);
    run(&mut c, mid, &mut frame, Duration::from_secs(12), |_| false);
    let q = c.quality.clone().expect("connection quality updates");
    let sid = |identity: &str| {
        c.s.participants(&"room".into())
            .into_iter()
            .find(|p| p.identity == identity)
            .map(|p| p.sid)
            .unwrap()
    };
    let of = |identity: &str| {
        let sid = sid(identity);
        q.updates
            .iter()
            .find(|u| u.participant_sid == sid)
            .cloned()
            .unwrap()
    };
    let (bob, carol) = (of("bob"), of("carol"));
    assert_ne!(
        bob.quality,
        lk::ConnectionQuality::Excellent as i32,
        "bob loses 5 %: {bob:?}"
    );
    assert!(bob.score < 4.0, "{bob:?}");
    assert_eq!(
        carol.quality,
        lk::ConnectionQuality::Excellent as i32,
        "{carol:?}"
    );
    assert!(c.s.stats().nacks_received > 10, "{:?}", c.s.stats());
    assert_eq!(
        c.down(2).0,
        Some(Rid::from("f")),
        "5 % loss keeps the layer"
    );
}

/// alice's uplink loses 2 % of her RTP: the SFU's receive streams ask her for the missing
/// packets (NACK; str0m's sender resends them over RTX), as LiveKit's do, and bob keeps the
/// top layer.
#[test]
fn a_publisher_is_asked_for_what_its_uplink_lost() {
    let (mut c, mid) = call();
    let mut frame = 0;
    c.uplink_lose_every = Some(50);
    run(&mut c, mid, &mut frame, Duration::from_secs(6), |_| false);
    // str0m reports a running count per outgoing stream (layer): the last one of each.
    let mut last = HashMap::new();
    for e in &c.egress_stats {
        if let str0m::Event::MediaEgressStats(s) = e {
            last.insert(s.rid, s.nacks);
        }
    }
    let nacks: u64 = last.values().sum();
    assert!(
        nacks > 10,
        "alice was asked for her lost packets: {nacks} NACKs"
    );
    assert_eq!(c.down(2).0, Some(Rid::from("f")));
}
