//! v1 (single peer connection) tests on a virtual network with str0m clients, no sockets, no
//! sleeps (`docs/design/rtc-v1.md` §4). A [`SinglePeer`] is a LiveKit v1 client: one
//! connection, its own `_reliable`/`_lossy`/`_data_track` channels, 3 audio + 3 video `recvonly`
//! placeholders, and it always offers.

use super::tests::{ice_ufrag, write_frame};
use super::*;
use lk::signal_request::Message as Req;
use prost::Message as _;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::media::{Direction, MediaData, MediaKind, Mid};
use str0m::{Event, Output as RtcOutput};

/// One simulated tick of the virtual clock.
const TICK: Duration = Duration::from_millis(10);

/// A str0m client connection at a virtual address.
struct Peer {
    rtc: Rtc,
    addr: SocketAddr,
    /// UDP, or TCP for a client whose network drops UDP (its only candidate is TCP).
    proto: Protocol,
    events: Vec<Event>,
}

impl Peer {
    fn new(now: Instant, addr: &str) -> Self {
        Self::with(now, addr, Rtc::builder())
    }

    /// A peer that also reports every RTP packet it receives (`Event::RawPacket`).
    fn with_raw_packets(now: Instant, addr: &str) -> Self {
        Self::with(now, addr, Rtc::builder().enable_raw_packets(true))
    }

    fn with(now: Instant, addr: &str, config: str0m::RtcConfig) -> Self {
        let mut rtc = config.build(now);
        let addr: SocketAddr = addr.parse().unwrap();
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        Self {
            rtc,
            addr,
            proto: Protocol::Udp,
            events: Vec::new(),
        }
    }

    /// A peer whose only candidate is an active TCP one (RFC 6544): UDP is blocked for it.
    fn over_tcp(now: Instant, addr: &str) -> Self {
        let mut rtc = Rtc::builder().build(now);
        let addr: SocketAddr = addr.parse().unwrap();
        let tcp = Candidate::builder()
            .tcp()
            .host(addr)
            .tcptype(str0m::net::TcpType::Active)
            .build()
            .unwrap();
        rtc.add_local_candidate(tcp);
        Self {
            rtc,
            addr,
            proto: Protocol::Tcp,
            events: Vec::new(),
        }
    }

    /// Media frames received on `mid`.
    fn received_on(&self, mid: Mid) -> Vec<&MediaData> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::MediaData(d) if d.mid == mid => Some(d),
                _ => None,
            })
            .collect()
    }

    /// Writes a 20 ms Opus-sized frame on its published `mid`, if it can already.
    fn send_audio(&mut self, mid: Mid, seq: u64, now: Instant) -> bool {
        write_frame(&mut self.rtc, mid, now, seq)
    }

    /// Writes a VP8 frame (a keyframe when `key`: bit 0 of its first byte clear) on its
    /// published `mid`, if it can already.
    fn send_video(&mut self, mid: Mid, seq: u64, now: Instant, key: bool) -> bool {
        let Some(w) = self.rtc.writer(mid) else {
            return false;
        };
        let Some(pt) = w
            .payload_params()
            .find(|p| p.spec().codec == str0m::format::Codec::Vp8)
            .map(|p| p.pt())
        else {
            return false;
        };
        let t =
            str0m::media::MediaTime::new(90_000 + seq * 3000, str0m::media::Frequency::NINETY_KHZ);
        let first = if key { 0x10 } else { 0x11 };
        let mut frame = vec![first];
        frame.extend_from_slice(&[0x42; 199]);
        w.write(pt, now, t, frame).is_ok()
    }

    /// Media frames received on any mid.
    fn received(&self) -> Vec<&MediaData> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::MediaData(d) => Some(d),
                _ => None,
            })
            .collect()
    }
}

/// The engine and a clock; every signal message, in order.
struct Net {
    s: Sfu,
    now: Instant,
    msgs: Vec<(u64, Msg)>,
    /// Packets the engine sent, by protocol and destination.
    sent: HashMap<(IpProto, SocketAddr), usize>,
}

impl Net {
    fn new() -> Self {
        Self::with_config(SfuConfig {
            candidates: vec!["127.0.0.1:7882".parse().unwrap()],
            seed: Some(23),
            ..Default::default()
        })
    }

    /// An engine that also announces a passive ICE-TCP candidate.
    fn with_ice_tcp() -> Self {
        Self::with_config(SfuConfig {
            candidates: vec!["127.0.0.1:7882".parse().unwrap()],
            tcp_candidates: vec!["127.0.0.1:7881".parse().unwrap()],
            seed: Some(23),
            ..Default::default()
        })
    }

    fn with_config(config: SfuConfig) -> Self {
        let now = Instant::now();
        Self {
            s: Sfu::new(config, now),
            now,
            msgs: Vec::new(),
            sent: HashMap::new(),
        }
    }

    fn join(&mut self, session: u64, identity: &str, single_pc: bool) {
        let permission = super::tests::publish_permission();
        self.s.handle_command(
            self.now,
            super::tests::join_command(session, "room", identity, permission, single_pc),
        );
    }

    fn request(&mut self, session: u64, m: Req) {
        self.s.handle_command(
            self.now,
            Command::Request {
                session: SessionId(session),
                message: Box::new(m),
            },
        );
    }

    /// Moves packets between the engine and `peers` until everything is quiet.
    fn pump(&mut self, peers: &mut [&mut Peer]) {
        let now = self.now;
        for _ in 0..1000 {
            let mut moved = false;
            loop {
                match self.s.poll_output() {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) => {
                        *self.sent.entry((t.proto, t.destination)).or_default() += 1;
                        let proto = match t.proto {
                            IpProto::Udp => Protocol::Udp,
                            IpProto::Tcp => Protocol::Tcp,
                        };
                        // A packet over the other protocol does not reach the peer.
                        let to = |p: &&mut &mut Peer| p.addr == t.destination && p.proto == proto;
                        if let Some(p) = peers.iter_mut().find(to) {
                            let r =
                                Receive::new(proto, t.source, t.destination, &t.contents).unwrap();
                            let _ = p.rtc.handle_input(Input::Receive(now, r));
                            moved = true;
                        }
                    }
                    Output::Signal(id, SignalOut::Message(m)) => self.msgs.push((id.0, *m)),
                    _ => {}
                }
            }
            for p in peers.iter_mut() {
                loop {
                    match p.rtc.poll_output().unwrap() {
                        RtcOutput::Timeout(_) => break,
                        RtcOutput::Transmit(t) => {
                            let proto = match t.proto {
                                Protocol::Udp => IpProto::Udp,
                                _ => IpProto::Tcp,
                            };
                            self.s
                                .handle_packet(now, proto, p.addr, t.destination, &t.contents);
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

    /// Advances the clock one tick and pumps.
    fn tick(&mut self, peers: &mut [&mut Peer]) {
        self.now += TICK;
        self.s.handle_timeout(self.now);
        for p in peers.iter_mut() {
            let _ = p.rtc.handle_input(Input::Timeout(self.now));
        }
        self.pump(peers);
    }

    /// Messages sent to `session` so far.
    fn to(&self, session: u64) -> Vec<&Msg> {
        self.msgs
            .iter()
            .filter(|(id, _)| *id == session)
            .map(|(_, m)| m)
            .collect()
    }

    /// The last answer sent to `session` with offer id `id`.
    fn answer(&self, session: u64, id: u32) -> Option<lk::SessionDescription> {
        self.to(session).into_iter().rev().find_map(|m| match m {
            Msg::Answer(a) if a.id == id => Some(a.clone()),
            _ => None,
        })
    }

    fn state_of(&self, identity: &str) -> i32 {
        self.s
            .participant_info(&"room".into(), &identity.into())
            .map(|p| p.state)
            .unwrap_or(-1)
    }

    fn track_sids(&self, identity: &str) -> Vec<String> {
        self.s
            .participant_info(&"room".into(), &identity.into())
            .map(|p| p.tracks.iter().map(|t| t.sid.clone()).collect())
            .unwrap_or_default()
    }

    /// The SID of `identity`, in the room.
    fn sid_of(&self, identity: &str) -> String {
        self.s
            .participant_info(&"room".into(), &identity.into())
            .expect("in the room")
            .sid
    }

    /// One tick of the virtual network; then each of `peers` reacts, in order.
    fn step(&mut self, peers: &mut [&mut SinglePeer]) {
        let mut pcs: Vec<&mut Peer> = peers.iter_mut().map(|p| &mut p.peer).collect();
        self.tick(&mut pcs);
        for p in peers.iter_mut() {
            p.react(self);
        }
    }

    /// `ticks` steps.
    fn run(&mut self, peers: &mut [&mut SinglePeer], ticks: usize) {
        for _ in 0..ticks {
            self.step(peers);
        }
    }

    /// `ticks` steps, after each of which `peers[sender]` writes the next audio frame on its
    /// published `mic` if it can; `sent` counts the frames written.
    fn run_with_audio(
        &mut self,
        peers: &mut [&mut SinglePeer],
        sender: usize,
        mic: Mid,
        sent: &mut u64,
        ticks: usize,
    ) {
        for _ in 0..ticks {
            self.step(peers);
            if peers[sender].peer.send_audio(mic, *sent, self.now) {
                *sent += 1;
            }
        }
    }
}

/// A LiveKit v1 client on one str0m connection: it creates `_reliable` and `_lossy`,
/// `audio` + `video` `recvonly` placeholders, publishes what it was told to, and offers.
struct SinglePeer {
    session: u64,
    peer: Peer,
    /// Placeholders in its offers so far.
    placeholders: Vec<(Mid, MediaKind)>,
    /// Placeholders for the next offer (str0m keeps changes only within one `SdpApi`).
    to_add: Vec<MediaKind>,
    /// Tracks for the next offer (cid, kind).
    to_publish: Vec<(String, MediaKind)>,
    /// Mids it publishes on: (cid, mid).
    published: Vec<(String, Mid)>,
    /// Its channels (label, id), created with its first offer.
    channels: Vec<(String, ChannelId)>,
    pending: Option<(SdpPendingOffer, u32)>,
    next_id: u32,
    /// How many of the engine's messages it has looked at.
    seen: usize,
    /// Placeholders asked for by `media_sections_requirement`s not offered yet (audio,
    /// video); `Some` also means "offer again".
    asked: Option<(usize, usize)>,
    /// Placeholders to offer `inactive` next (a transceiver the client stopped using).
    to_withdraw: Vec<Mid>,
    /// The next offer restarts ICE (new credentials), as a resuming client's does.
    restart_ice: bool,
}

impl SinglePeer {
    fn new(now: Instant, session: u64, audio: usize, video: usize) -> Self {
        let to_add = std::iter::repeat_n(MediaKind::Audio, audio)
            .chain(std::iter::repeat_n(MediaKind::Video, video))
            .collect();
        Self {
            session,
            peer: Peer::new(now, &format!("10.0.1.{session}:5000")),
            placeholders: Vec::new(),
            to_add,
            to_publish: Vec::new(),
            published: Vec::new(),
            channels: Vec::new(),
            pending: None,
            next_id: 1,
            seen: 0,
            asked: None,
            to_withdraw: Vec::new(),
            restart_ice: false,
        }
    }

    /// The same, reachable over TCP only (its network drops UDP).
    fn over_tcp(mut self, now: Instant) -> Self {
        self.peer = Peer::over_tcp(now, &format!("10.0.1.{}:5000", self.session));
        self
    }

    /// The same, whose connection reports every RTP packet it receives.
    fn with_raw_packets(mut self, now: Instant) -> Self {
        self.peer = Peer::with_raw_packets(now, &format!("10.0.1.{}:5000", self.session));
        self
    }

    /// Offers placeholder `mid` `inactive` from the next offer on: no longer a slot.
    fn withdraw(&mut self, mid: Mid) {
        self.placeholders.retain(|(m, _)| *m != mid);
        self.to_withdraw.push(mid);
    }

    /// Publishes an audio track `cid` in the next offer.
    fn publish_audio(&mut self, cid: &str) {
        self.to_publish.push((cid.into(), MediaKind::Audio));
    }

    /// Publishes a video track `cid` in the next offer.
    fn publish_video(&mut self, cid: &str) {
        self.to_publish.push((cid.into(), MediaKind::Video));
    }

    /// Joins as `identity` (single PC), announces its audio track `cid` and offers it;
    /// returns the mid it publishes on.
    fn join_publishing_audio(&mut self, net: &mut Net, identity: &str, cid: &str) -> Mid {
        net.join(self.session, identity, true);
        net.request(self.session, add_track(cid));
        self.publish_audio(cid);
        let offer = self.offer();
        net.request(self.session, offer);
        self.published.last().expect("just published").1
    }

    /// Adds `n` more placeholders of `kind` to the next offer (a `media_sections_requirement`).
    fn add_placeholders(&mut self, kind: MediaKind, n: usize) {
        self.to_add.extend(std::iter::repeat_n(kind, n));
    }

    /// Builds an offer with every placeholder `recvonly` again (as a browser transceiver
    /// keeps its direction; str0m would otherwise re-offer what was answered `inactive` as
    /// `inactive`).
    fn offer(&mut self) -> Req {
        let mut api = self.peer.rtc.sdp_api();
        if self.channels.is_empty() {
            for label in ["_reliable", "_lossy", "_data_track"] {
                let id = api.add_channel(label.into());
                self.channels.push((label.into(), id));
            }
        }
        for (mid, _) in &self.placeholders {
            api.set_direction(*mid, Direction::RecvOnly);
        }
        for mid in self.to_withdraw.drain(..) {
            api.set_direction(mid, Direction::Inactive);
        }
        if std::mem::take(&mut self.restart_ice) {
            api.ice_restart(true);
        }
        for kind in self.to_add.drain(..) {
            let mid = api.add_media(kind, Direction::RecvOnly, None, None, None);
            self.placeholders.push((mid, kind));
        }
        for (cid, kind) in self.to_publish.drain(..) {
            let mid = api.add_media(
                kind,
                Direction::SendOnly,
                Some("stream".into()),
                Some(cid.clone()),
                None,
            );
            self.published.push((cid, mid));
        }
        if !api.has_changes() {
            // Nothing changed, and str0m offers only changes: one more placeholder.
            let mid = api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
            self.placeholders.push((mid, MediaKind::Audio));
        }
        let (offer, pending) = api.apply().expect("an offer");
        let id = self.next_id;
        self.next_id += 1;
        self.pending = Some((pending, id));
        Req::Offer(lk::SessionDescription {
            r#type: "offer".into(),
            sdp: offer.to_sdp_string(),
            id,
            mid_to_track_id: HashMap::new(),
        })
    }

    /// Applies the answer to its pending offer, if it arrived; returns it.
    fn take_answer(&mut self, net: &Net) -> Option<lk::SessionDescription> {
        let (_, id) = self.pending.as_ref()?;
        let answer = net.answer(self.session, *id)?;
        let (pending, _) = self.pending.take()?;
        self.peer
            .rtc
            .sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer.sdp).unwrap())
            .expect("the client accepts the answer");
        Some(answer)
    }

    /// Its channel `label`.
    fn channel(&self, label: &str) -> ChannelId {
        self.channels
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, id)| *id)
            .expect("channel created")
    }

    /// Whether its channel `label` is open.
    fn open(&self, label: &str) -> bool {
        let id = self.channel(label);
        self.peer
            .events
            .iter()
            .any(|e| matches!(e, Event::ChannelOpen(i, _) if *i == id))
    }

    /// The `DataPacket`s received on its channel `label`.
    fn packets_on(&self, label: &str) -> Vec<lk::DataPacket> {
        let id = self.channel(label);
        self.peer
            .events
            .iter()
            .filter_map(|e| match e {
                Event::ChannelData(d) if d.id == id => lk::DataPacket::decode(&d.data[..]).ok(),
                _ => None,
            })
            .collect()
    }

    /// What a LiveKit v1 client does with the engine's messages: applies an answer to its
    /// offer, and answers a `media_sections_requirement` with that many more placeholders and
    /// a new offer (once its previous offer is answered).
    fn react(&mut self, net: &mut Net) {
        self.take_answer(net);
        for (id, m) in &net.msgs[self.seen..] {
            if let (true, Msg::MediaSectionsRequirement(r)) = (*id == self.session, m) {
                let (a, v) = self.asked.unwrap_or_default();
                self.asked = Some((a + r.num_audios as usize, v + r.num_videos as usize));
            }
        }
        self.seen = net.msgs.len();
        if self.pending.is_none() {
            if let Some((a, v)) = self.asked.take() {
                self.add_placeholders(MediaKind::Audio, a);
                self.add_placeholders(MediaKind::Video, v);
                let offer = self.offer();
                net.request(self.session, offer);
            }
        }
    }
}

/// The lines of the m-section of `mid` in `sdp`.
fn section<'a>(sdp: &'a str, mid: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    for line in sdp.lines() {
        if line.starts_with("m=") {
            if current.contains(&format!("a=mid:{mid}").as_str()) {
                return current;
            }
            current = Vec::new();
        }
        current.push(line);
    }
    if current.contains(&format!("a=mid:{mid}").as_str()) {
        out = current;
    }
    out
}

/// (design §4, case 1) A single-PC client joins and offers: `join` comes first with
/// `subscriber_primary` false, then the answer with the offer's id (the Rust SDK's 0 too),
/// never an `offer`; its one connection connects and it becomes ACTIVE.
#[test]
fn single_pc_client_connects_and_becomes_active() {
    for first_id in [0, 1] {
        single_pc_client_connects(first_id);
    }
}

fn single_pc_client_connects(first_id: u32) {
    let mut net = Net::new();
    let mut bob = SinglePeer::new(net.now, 2, 3, 3);
    bob.next_id = first_id;
    net.join(2, "bob", true);
    let offer = bob.offer();
    net.request(2, offer);
    net.pump(&mut [&mut bob.peer]);
    let msgs = net.to(2);
    let Msg::Join(j) = msgs[0] else {
        panic!("join first, got {:?}", msgs[0]);
    };
    assert!(!j.subscriber_primary, "v1: subscriber_primary is false");
    assert!(
        matches!(msgs[1], Msg::Answer(a) if a.id == first_id),
        "then the answer: {:?}",
        msgs[1]
    );
    bob.take_answer(&net).expect("answer");
    for _ in 0..100 {
        net.tick(&mut [&mut bob.peer]);
        if net.state_of("bob") == lk::participant_info::State::Active as i32 {
            break;
        }
    }
    assert_eq!(
        net.state_of("bob"),
        lk::participant_info::State::Active as i32
    );
    assert!(
        !net.to(2).iter().any(|m| matches!(m, Msg::Offer(_))),
        "the SFU never offers on a single peer connection"
    );
    let open = |bob: &SinglePeer| {
        bob.peer
            .events
            .iter()
            .any(|e| matches!(e, Event::ChannelOpen(_, l) if l == "_reliable"))
    };
    for _ in 0..200 {
        if open(&bob) {
            break;
        }
        net.tick(&mut [&mut bob.peer]);
    }
    assert!(open(&bob), "the client's own _reliable opens");
}

fn add_track(cid: &str) -> Req {
    Req::AddTrack(lk::AddTrackRequest {
        cid: cid.into(),
        name: cid.into(),
        r#type: lk::TrackType::Audio as i32,
        source: lk::TrackSource::Microphone as i32,
        ..Default::default()
    })
}

fn add_video_track(cid: &str) -> Req {
    Req::AddTrack(lk::AddTrackRequest {
        cid: cid.into(),
        name: cid.into(),
        r#type: lk::TrackType::Video as i32,
        source: lk::TrackSource::Camera as i32,
        width: 640,
        height: 360,
        ..Default::default()
    })
}

/// The `mid_to_track_id` entry of `track` in `answer`, checked against the SDP: that
/// section is `sendonly` with msid `PA_publisher|TR_track TR_track`, in `a=msid` and in
/// every `a=ssrc … msid:` line.
fn mid_carrying(answer: &lk::SessionDescription, publisher_sid: &str, track: &str) -> Mid {
    let (mid, _) = answer
        .mid_to_track_id
        .iter()
        .find(|(_, t)| *t == track)
        .unwrap_or_else(|| panic!("{track} in {:?}", answer.mid_to_track_id));
    let lines = section(&answer.sdp, mid);
    let msid = format!("{publisher_sid}|{track} {track}");
    assert!(lines.contains(&"a=sendonly"), "{lines:?}");
    assert!(
        lines.contains(&format!("a=msid:{msid}").as_str()),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.starts_with("a=ssrc:") && l.contains(" msid:"))
            .all(|l| l.ends_with(&format!(" msid:{msid}"))),
        "{lines:?}"
    );
    Mid::from(mid.as_str())
}

/// Every frame alice sent arrived unchanged with timestamps one frame apart.
fn assert_continuous(frames: &[&MediaData], sent: u64) {
    assert!(sent > 50, "sent {sent}");
    assert!(frames.len() > 20, "received {} of {sent}", frames.len());
    let ts: Vec<u64> = frames.iter().map(|d| d.time.numer()).collect();
    assert!(ts.windows(2).all(|w| w[1] - w[0] == 960), "{ts:?}");
    assert!(frames.iter().all(|d| d.data[..] == [0x78u8; 60]));
}

/// (design §4, cases 2 and 3) alice (single PC) publishes audio; bob (single PC) joins with
/// 3 + 3 placeholders and receives it on one of them, assigned in his first answer with
/// `PA_alice|TR_x` and in `mid_to_track_id`; every other placeholder is answered `inactive`.
#[test]
fn single_pc_audio_reaches_a_single_pc_subscriber() {
    let mut net = Net::new();
    let mut alice = SinglePeer::new(net.now, 1, 3, 3);
    let mut bob = SinglePeer::new(net.now, 2, 3, 3);
    let mic = alice.join_publishing_audio(&mut net, "alice", "mic");
    // alice connects: her track is bound (published) once her connection is up.
    net.run(&mut [&mut alice], 50);
    assert_eq!(
        net.state_of("alice"),
        lk::participant_info::State::Active as i32
    );
    net.join(2, "bob", true);
    let offer = bob.offer();
    net.request(2, offer);
    let mut sent = 0;
    net.run_with_audio(&mut [&mut alice, &mut bob], 0, mic, &mut sent, 300);
    let alice_sid = net.sid_of("alice");
    let track = net.track_sids("alice").pop().expect("alice's track");
    let first = net.answer(2, 1).expect("bob's first answer");
    let mid = mid_carrying(&first, &alice_sid, &track);
    for (m, _) in bob.placeholders.iter().filter(|(m, _)| *m != mid) {
        let lines = section(&first.sdp, m);
        assert!(lines.contains(&"a=inactive"), "{m}: {lines:?}");
    }
    assert_eq!(first.mid_to_track_id.len(), 1);
    assert!(
        !net.msgs.iter().any(|(_, m)| matches!(m, Msg::Offer(_))),
        "no server offer"
    );
    assert_continuous(&bob.peer.received_on(mid), sent);
    assert_eq!(bob.peer.received().len(), bob.peer.received_on(mid).len());
}

/// (design §4, cases 4 and 5) bob (single PC) is connected when alice publishes: he is told
/// of the track (`update`), then asked to offer again (`media_sections_requirement`,
/// `{0, 0}` with a free audio placeholder, `{1, 0}` without one), and only the answer to his
/// re-offer carries the track, which he then receives.
#[test]
fn a_mid_call_subscription_asks_for_a_reoffer() {
    for (audio_placeholders, want_audios) in [(3, 0), (0, 1)] {
        let mut net = Net::new();
        let mut alice = SinglePeer::new(net.now, 1, 3, 3);
        let mut bob = SinglePeer::new(net.now, 2, audio_placeholders, 1);
        net.join(1, "alice", true);
        net.join(2, "bob", true);
        for (session, peer) in [(1, &mut alice), (2, &mut bob)] {
            let offer = peer.offer();
            net.request(session, offer);
        }
        net.run(&mut [&mut alice, &mut bob], 50);
        assert_eq!(
            net.state_of("bob"),
            lk::participant_info::State::Active as i32
        );
        let before = net.msgs.len();
        net.request(1, add_track("mic"));
        alice.publish_audio("mic");
        let offer = alice.offer();
        net.request(1, offer);
        let mic = alice.published[0].1;
        let mut sent = 0;
        net.run_with_audio(&mut [&mut alice, &mut bob], 0, mic, &mut sent, 300);
        let alice_sid = net.sid_of("alice");
        let track = net.track_sids("alice").pop().expect("alice's track");
        let later: Vec<&Msg> = net.msgs[before..]
            .iter()
            .filter(|(id, _)| *id == 2)
            .map(|(_, m)| m)
            .collect();
        let update = later
            .iter()
            .position(|m| matches!(m, Msg::Update(u) if u.participants.iter().any(|p| !p.tracks.is_empty())))
            .expect("bob told of the track");
        let requirement = later
            .iter()
            .position(|m| matches!(m, Msg::MediaSectionsRequirement(_)))
            .expect("bob asked to offer again");
        let Msg::MediaSectionsRequirement(r) = later[requirement] else {
            unreachable!()
        };
        assert_eq!((r.num_audios, r.num_videos), (want_audios, 0));
        let answer = later
            .iter()
            .position(
                |m| matches!(m, Msg::Answer(a) if a.mid_to_track_id.values().any(|t| *t == track)),
            )
            .expect("an answer with the track");
        assert!(
            update < requirement && requirement < answer,
            "{update} {requirement} {answer}"
        );
        let Msg::Answer(a) = later[answer] else {
            unreachable!()
        };
        let mid = mid_carrying(a, &alice_sid, &track);
        assert_continuous(&bob.peer.received_on(mid), sent);
        assert!(
            !net.msgs.iter().any(|(_, m)| matches!(m, Msg::Offer(_))),
            "no server offer"
        );
    }
}

/// (design §4, case 8) A mixed room: v0 bob (two connections, the SFU offers on his
/// subscriber one) receives single-PC alice's audio, and alice receives bob's on a slot.
#[test]
fn a_mixed_room_v0_and_single_pc_hear_each_other() {
    let mut net = Net::new();
    let mut alice = SinglePeer::new(net.now, 1, 3, 3);
    net.join(1, "alice", true);
    net.request(1, add_track("amic"));
    alice.publish_audio("amic");
    let offer = alice.offer();
    net.request(1, offer);
    for _ in 0..50 {
        net.tick(&mut [&mut alice.peer]);
        alice.react(&mut net);
    }
    // v0 bob: answers every subscriber offer, publishes on his publisher connection.
    let mut bob_sub = Peer::new(net.now, "10.0.2.2:5000");
    let mut bob_pub = Peer::new(net.now, "10.0.2.2:5001");
    net.join(2, "bob", false);
    net.request(2, add_track("bmic"));
    let mut api = bob_pub.rtc.sdp_api();
    api.add_channel("_reliable".into());
    let bmic = api.add_media(
        MediaKind::Audio,
        Direction::SendOnly,
        Some("s".into()),
        Some("bmic".into()),
        None,
    );
    let (offer, pending) = api.apply().unwrap();
    let mut bob_pending = Some(pending);
    net.request(
        2,
        Req::Offer(lk::SessionDescription {
            r#type: "offer".into(),
            sdp: offer.to_sdp_string(),
            id: 1,
            mid_to_track_id: HashMap::new(),
        }),
    );
    let mut seen = 0;
    let amic = alice.published[0].1;
    let (mut sent_a, mut sent_b) = (0, 0);
    for _ in 0..300 {
        net.tick(&mut [&mut alice.peer, &mut bob_sub, &mut bob_pub]);
        alice.react(&mut net);
        let news: Vec<Msg> = net.msgs[seen..]
            .iter()
            .filter(|(id, _)| *id == 2)
            .map(|(_, m)| m.clone())
            .collect();
        seen = net.msgs.len();
        for m in news {
            match m {
                Msg::Offer(o) => {
                    let answer = bob_sub
                        .rtc
                        .sdp_api()
                        .accept_offer(SdpOffer::from_sdp_string(&o.sdp).unwrap())
                        .unwrap();
                    net.request(
                        2,
                        Req::Answer(lk::SessionDescription {
                            r#type: "answer".into(),
                            sdp: answer.to_sdp_string(),
                            id: o.id,
                            mid_to_track_id: HashMap::new(),
                        }),
                    );
                }
                Msg::Answer(a) => {
                    if let Some(pending) = bob_pending.take() {
                        bob_pub
                            .rtc
                            .sdp_api()
                            .accept_answer(pending, SdpAnswer::from_sdp_string(&a.sdp).unwrap())
                            .unwrap();
                    }
                }
                _ => {}
            }
        }
        if alice.peer.send_audio(amic, sent_a, net.now) {
            sent_a += 1;
        }
        if bob_pub.send_audio(bmic, sent_b, net.now) {
            sent_b += 1;
        }
    }
    // bob (v0) got alice's track in a subscriber offer, with her msid, and hears her.
    let alice_sid = net.sid_of("alice");
    assert!(net
        .to(2)
        .iter()
        .any(|m| matches!(m, Msg::Offer(o) if o.sdp.contains(&format!("a=msid:{alice_sid}|TR_")))));
    assert_continuous(&bob_sub.received(), sent_a);
    // alice (single PC) got bob's track on a slot, and hears him.
    let bob_sid = net.sid_of("bob");
    let track = net.track_sids("bob").pop().expect("bob's track");
    let answer = net
        .to(1)
        .into_iter()
        .find_map(|m| match m {
            Msg::Answer(a) if a.mid_to_track_id.values().any(|t| *t == track) => Some(a.clone()),
            _ => None,
        })
        .expect("alice's answer with bob's track");
    let mid = mid_carrying(&answer, &bob_sid, &track);
    assert_continuous(&alice.peer.received_on(mid), sent_b);
    assert!(
        !net.to(1).iter().any(|m| matches!(m, Msg::Offer(_))),
        "no server offer to the single-PC participant"
    );
}

/// alice (session 1) publishes audio; bob (session 2, one slot) joins and gets 100 ticks of it.
fn bob_hears_alice(net: &mut Net, alice: &mut SinglePeer, bob: &mut SinglePeer) {
    let amic = alice.join_publishing_audio(net, "alice", "amic");
    net.run(&mut [&mut *alice], 50);
    net.join(2, "bob", true);
    let offer = bob.offer();
    net.request(2, offer);
    let mut sent = 0;
    net.run_with_audio(&mut [alice, bob], 0, amic, &mut sent, 100);
}

/// alice (session 1) leaves; bob's connection runs 50 ticks after.
fn alice_leaves(net: &mut Net, bob: &mut SinglePeer) {
    net.s.handle_command(
        net.now,
        Command::Disconnect {
            session: SessionId(1),
            epoch: None,
            reason: lk::DisconnectReason::ClientInitiated,
        },
    );
    net.run(&mut [bob], 50);
}

/// (design §4, case 6) alice's track goes (she leaves): bob's next answer has its mid
/// `inactive` and no longer in `mid_to_track_id`; carol's track, published later, reuses
/// that mid in a later answer, never straight from one msid to the other, and arrives.
#[test]
fn a_released_slot_goes_inactive_before_it_is_reused() {
    let mut net = Net::new();
    let mut alice = SinglePeer::new(net.now, 1, 0, 0);
    let mut bob = SinglePeer::new(net.now, 2, 1, 0);
    let mut carol = SinglePeer::new(net.now, 3, 0, 0);
    bob_hears_alice(&mut net, &mut alice, &mut bob);
    let alice_sid = net.sid_of("alice");
    let alice_track = net.track_sids("alice").pop().expect("alice's track");
    let first = net.answer(2, 1).expect("bob's first answer");
    let mid = mid_carrying(&first, &alice_sid, &alice_track);
    assert!(bob.peer.received_on(mid).len() > 20);

    alice_leaves(&mut net, &mut bob);
    bob.peer.events.clear();
    let cmic = carol.join_publishing_audio(&mut net, "carol", "cmic");
    let mut sent = 0;
    net.run_with_audio(&mut [&mut bob, &mut carol], 1, cmic, &mut sent, 300);
    let carol_sid = net.sid_of("carol");
    let carol_track = net.track_sids("carol").pop().expect("carol's track");
    let answers: Vec<lk::SessionDescription> = net
        .to(2)
        .into_iter()
        .filter_map(|m| match m {
            Msg::Answer(a) => Some(a.clone()),
            _ => None,
        })
        .collect();
    let carried = |a: &lk::SessionDescription| a.mid_to_track_id.get(&mid.to_string()).cloned();
    let reused = answers
        .iter()
        .position(|a| carried(a).as_deref() == Some(carol_track.as_str()))
        .expect("carol's track on alice's old mid");
    assert_eq!(
        mid_carrying(&answers[reused], &carol_sid, &carol_track),
        mid
    );
    let released = answers
        .iter()
        .position(|a| carried(a).is_none() && section(&a.sdp, &mid).contains(&"a=inactive"))
        .expect("an answer releasing the mid");
    assert!(
        released < reused,
        "released in {released}, reused in {reused}"
    );
    for a in &answers[..reused] {
        assert_ne!(carried(a).as_deref(), Some(carol_track.as_str()));
    }
    assert!(answers[..released]
        .iter()
        .all(|a| carried(a).as_deref() == Some(alice_track.as_str())));
    assert_continuous(&bob.peer.received_on(mid), sent);
}

/// (design §4, case 7) Data on a single peer connection goes both ways on the client's own
/// channels: alice's packet on her `_reliable` reaches bob on his `_reliable`, stamped as
/// hers, and `_data_track` is not relayed.
#[test]
fn single_pc_data_uses_the_client_channels_and_not_data_track() {
    let mut net = Net::new();
    let mut alice = SinglePeer::new(net.now, 1, 0, 0);
    let mut bob = SinglePeer::new(net.now, 2, 0, 0);
    net.join(1, "alice", true);
    net.join(2, "bob", true);
    for (session, peer) in [(1, &mut alice), (2, &mut bob)] {
        let offer = peer.offer();
        net.request(session, offer);
    }
    for _ in 0..300 {
        net.step(&mut [&mut alice, &mut bob]);
        if [&alice, &bob]
            .iter()
            .all(|p| ["_reliable", "_data_track"].iter().all(|l| p.open(l)))
        {
            break;
        }
    }
    let packet = |text: &str| lk::DataPacket {
        value: Some(lk::data_packet::Value::User(lk::UserPacket {
            payload: text.as_bytes().to_vec(),
            topic: Some("t".into()),
            ..Default::default()
        })),
        ..Default::default()
    };
    for (label, text) in [("_data_track", "not relayed"), ("_reliable", "hello")] {
        let id = alice.channel(label);
        let mut ch = alice.peer.rtc.channel(id).expect("open");
        assert!(ch.write(true, &packet(text).encode_to_vec()).unwrap());
    }
    for _ in 0..50 {
        net.tick(&mut [&mut alice.peer, &mut bob.peer]);
    }
    let got = bob.packets_on("_reliable");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].participant_identity, "alice");
    let Some(lk::data_packet::Value::User(u)) = &got[0].value else {
        panic!("a user packet: {got:?}");
    };
    assert_eq!(u.payload, b"hello");
    assert!(bob.packets_on("_data_track").is_empty());
    assert!(bob.packets_on("_lossy").is_empty());
}

/// alice publishes a VP8 camera on one peer connection, sending delta frames until the SFU
/// asks her for a keyframe (then one); bob, with three audio and three video placeholders,
/// subscribes.
struct CameraCall {
    alice: SinglePeer,
    bob: SinglePeer,
    cam: Mid,
    /// Frames alice sent, and keyframes among them.
    sent: u64,
    keyframes: u64,
    /// Keyframe requests alice had seen at her last frame.
    asked: usize,
}

impl CameraCall {
    fn start(net: &mut Net) -> Self {
        let mut alice = SinglePeer::new(net.now, 1, 0, 0);
        let mut bob = SinglePeer::new(net.now, 2, 3, 3);
        net.join(1, "alice", true);
        net.request(1, add_video_track("cam"));
        alice.publish_video("cam");
        let offer = alice.offer();
        net.request(1, offer);
        net.run(&mut [&mut alice], 50);
        net.join(2, "bob", true);
        let offer = bob.offer();
        net.request(2, offer);
        let cam = alice.published[0].1;
        CameraCall {
            alice,
            bob,
            cam,
            sent: 0,
            keyframes: 0,
            asked: 0,
        }
    }

    /// Keyframe requests alice received.
    fn requests(&self) -> usize {
        self.alice
            .peer
            .events
            .iter()
            .filter(|e| matches!(e, Event::KeyframeRequest(_)))
            .count()
    }

    /// `steps` ticks, alice sending a frame at each (a keyframe after a new request).
    fn run(&mut self, net: &mut Net, steps: usize) {
        for _ in 0..steps {
            net.step(&mut [&mut self.alice, &mut self.bob]);
            let requests = self.requests();
            let key = requests > self.asked;
            self.asked = requests;
            if self
                .alice
                .peer
                .send_video(self.cam, self.sent, net.now, key)
            {
                self.sent += 1;
                self.keyframes += u64::from(key);
            }
        }
    }
}

/// Video on single peer connections: bob's first answer puts alice's camera on a video
/// placeholder; nothing reaches him before a keyframe, which the SFU asks alice for (she
/// sends only delta frames until asked), then her frames flow.
#[test]
fn single_pc_video_waits_for_a_keyframe_the_sfu_asks_for() {
    let mut net = Net::new();
    let mut call = CameraCall::start(&mut net);
    call.run(&mut net, 300);
    let CameraCall {
        bob,
        sent,
        keyframes,
        ..
    } = call;
    let alice_sid = net.sid_of("alice");
    let track = net.track_sids("alice").pop().expect("alice's track");
    let first = net.answer(2, 1).expect("bob's first answer");
    let mid = mid_carrying(&first, &alice_sid, &track);
    assert!(bob
        .placeholders
        .iter()
        .any(|(m, k)| *m == mid && *k == MediaKind::Video));
    assert!(keyframes > 0, "the SFU asked alice for a keyframe");
    let frames = bob.peer.received_on(mid);
    assert!(
        frames.len() > 100,
        "bob received {} of {sent}",
        frames.len()
    );
    assert!(
        frames[0].is_keyframe(),
        "the first frame bob gets is a keyframe"
    );
    let ts: Vec<u64> = frames.iter().map(|d| d.time.numer()).collect();
    assert!(ts.windows(2).all(|w| w[1] - w[0] == 3000), "{ts:?}");
}

/// After a client's ICE restart connects (a network change, a resume after a cut), the SFU
/// asks the publishers of the video it receives for a keyframe at once: what was sent on the
/// dead path is lost, and the client's decoder would otherwise wait for its own PLI. (Also
/// the regression test of a restart answer whose candidate lines kept str0m's ufrag: the
/// client dropped them and never connected again.)
#[test]
fn an_ice_restart_asks_the_publishers_for_a_keyframe() {
    let mut net = Net::with_config(SfuConfig {
        candidates: vec!["127.0.0.1:7882".parse().unwrap()],
        seed: Some(37),
        ..Default::default()
    });
    let mut call = CameraCall::start(&mut net);
    call.run(&mut net, 300);
    let before = call.requests();
    assert!(before > 0, "bob's subscription asked for a first keyframe");
    // Nothing asks for one while the path is fine.
    call.run(&mut net, 100);
    assert_eq!(
        call.requests(),
        before,
        "no keyframe request while nothing happens"
    );
    call.bob.restart_ice = true;
    let offer = call.bob.offer();
    net.request(2, offer);
    call.run(&mut net, 1500);
    // The restart's answer names its new ufrag on the candidate lines too (a client drops
    // candidates of another ufrag), and the client's ICE completes again.
    let answer = net.answer(2, 2).expect("the restart answered");
    let ufrag = ice_ufrag(&answer.sdp);
    let candidates: Vec<&str> = answer
        .sdp
        .lines()
        .filter(|l| l.starts_with("a=candidate"))
        .collect();
    assert!(
        !candidates.is_empty()
            && candidates
                .iter()
                .all(|l| l.ends_with(&format!(" ufrag {ufrag}"))),
        "{ufrag}: {candidates:?}"
    );
    let states: Vec<_> = call
        .bob
        .peer
        .events
        .iter()
        .filter_map(|e| match e {
            Event::IceConnectionStateChange(s) => Some(*s),
            _ => None,
        })
        .collect();
    assert_eq!(
        states.last(),
        Some(&str0m::IceConnectionState::Completed),
        "{states:?}"
    );
    assert!(
        call.requests() > before,
        "the restart asked alice for a keyframe ({before} before)"
    );
}

/// A client that re-offers the slot carrying a track as anything but `recvonly` takes it back:
/// the track moves to another free slot of its kind (answered `sendonly` with its msid there)
/// and keeps flowing; the withdrawn mid is no longer in `mid_to_track_id`.
#[test]
fn a_withdrawn_slot_moves_its_track_to_a_free_one() {
    let mut net = Net::new();
    let mut alice = SinglePeer::new(net.now, 1, 0, 0);
    let mut bob = SinglePeer::new(net.now, 2, 2, 0);
    let mic = alice.join_publishing_audio(&mut net, "alice", "mic");
    net.run(&mut [&mut alice], 50);
    net.join(2, "bob", true);
    let offer = bob.offer();
    net.request(2, offer);
    let mut sent = 0;
    net.run_with_audio(&mut [&mut alice, &mut bob], 0, mic, &mut sent, 100);
    let alice_sid = net.sid_of("alice");
    let track = net.track_sids("alice").pop().expect("alice's track");
    let first = net.answer(2, 1).expect("bob's first answer");
    let old = mid_carrying(&first, &alice_sid, &track);
    assert!(bob.peer.received_on(old).len() > 20);

    bob.withdraw(old);
    let offer = bob.offer();
    let Req::Offer(sd) = &offer else {
        unreachable!()
    };
    let id = sd.id;
    net.request(2, offer);
    net.run_with_audio(&mut [&mut alice, &mut bob], 0, mic, &mut sent, 100);
    let answer = net.answer(2, id).expect("the answer to the re-offer");
    let new = mid_carrying(&answer, &alice_sid, &track);
    assert_ne!(new, old);
    assert!(!answer.mid_to_track_id.contains_key(&old.to_string()));
    assert!(
        bob.peer.received_on(new).len() > 20,
        "audio flows on the new slot"
    );
}

/// A track change on one outgoing stream: bob's audio slot carries alice's track, then
/// (after she left and the slot was released) carol's. On the wire bob sees one SSRC whose
/// sequence numbers step by exactly one across the change and whose timestamps move forward
/// by about the time that passed, not to carol's own random offset.
#[test]
fn a_track_change_on_a_slot_is_continuous_on_the_wire() {
    let mut net = Net::new();
    let mut alice = SinglePeer::new(net.now, 1, 0, 0);
    let mut bob = SinglePeer::new(net.now, 2, 1, 0).with_raw_packets(net.now);
    let mut carol = SinglePeer::new(net.now, 3, 0, 0);
    bob_hears_alice(&mut net, &mut alice, &mut bob);
    alice_leaves(&mut net, &mut bob);
    let cmic = carol.join_publishing_audio(&mut net, "carol", "cmic");
    // carol's frames start at another timestamp than alice's.
    let mut sent = 5_000;
    net.run_with_audio(&mut [&mut bob, &mut carol], 1, cmic, &mut sent, 300);

    let packets: Vec<&str0m::rtp::RtpHeader> = bob
        .peer
        .events
        .iter()
        .filter_map(|e| match e {
            Event::RawPacket(p) => match p.as_ref() {
                str0m::rtp::RawPacket::RtpRx(h, _) => Some(h),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert!(packets.len() > 100, "bob received {}", packets.len());
    let ssrc = packets[0].ssrc;
    assert!(packets.iter().all(|h| h.ssrc == ssrc), "one SSRC");
    let mut changes = 0;
    for w in packets.windows(2) {
        assert_eq!(
            w[1].sequence_number,
            w[0].sequence_number.wrapping_add(1),
            "sequence numbers step by one"
        );
        let step = w[1].timestamp.wrapping_sub(w[0].timestamp);
        if step != 960 {
            // The track change: forward by the time that passed (under ten seconds here).
            assert!((1..480_000).contains(&step), "timestamp step {step}");
            changes += 1;
        }
    }
    assert_eq!(changes, 1, "one track change");
}

/// ICE over TCP (RFC 6544): bob's network drops UDP, his only candidate is TCP. He connects
/// through the engine's passive TCP candidate (announced after the UDP one) and hears alice,
/// who is on UDP; everything the engine sends him goes over TCP, everything to her over UDP.
#[test]
fn a_client_without_udp_connects_over_ice_tcp() {
    let mut net = Net::with_ice_tcp();
    let mut alice = SinglePeer::new(net.now, 1, 0, 0);
    let mut bob = SinglePeer::new(net.now, 2, 1, 0).over_tcp(net.now);
    bob_hears_alice(&mut net, &mut alice, &mut bob);
    let first = net.answer(2, 1).expect("bob's first answer");
    let candidates: Vec<&str> = first
        .sdp
        .lines()
        .filter(|l| l.starts_with("a=candidate"))
        .collect();
    assert_eq!(candidates.len(), 2, "{candidates:?}");
    assert!(
        candidates[0].contains(" udp ") && candidates[0].contains("127.0.0.1 7882"),
        "UDP first: {candidates:?}"
    );
    assert!(
        candidates[1].contains(" tcp ")
            && candidates[1].contains("127.0.0.1 7881")
            && candidates[1].contains("tcptype passive"),
        "then a passive TCP candidate: {candidates:?}"
    );
    let mid = mid_carrying(&first, &net.sid_of("alice"), &net.track_sids("alice")[0]);
    assert!(
        bob.peer.received_on(mid).len() > 20,
        "bob hears alice over TCP"
    );
    let (alice_addr, bob_addr) = (alice.peer.addr, bob.peer.addr);
    let sent = |proto, addr| net.sent.get(&(proto, addr)).copied().unwrap_or(0);
    assert!(sent(IpProto::Tcp, bob_addr) > 20 && sent(IpProto::Udp, bob_addr) == 0);
    assert!(sent(IpProto::Udp, alice_addr) > 0 && sent(IpProto::Tcp, alice_addr) == 0);
    assert!(net.s.knows_address(IpProto::Tcp, &bob_addr));
    assert!(!net.s.knows_address(IpProto::Udp, &bob_addr));
    // The operator's view: who uses which transport.
    let transports = net.s.transports(&"room".into());
    assert_eq!(transports.get("bob").map(String::as_str), Some("tcp"));
    assert_eq!(transports.get("alice").map(String::as_str), Some("udp"));
    let stats = net.s.stats();
    assert_eq!(
        (stats.connected_udp, stats.connected_tcp),
        (1, 1),
        "{stats:?}"
    );
}

/// A client behind Conclave's own TURN relay (`turn/`): the engine sees its media come from
/// the relay socket like any UDP peer's, and the operator view names how the client reaches
/// the relay.
#[test]
fn a_client_behind_conclaves_turn_relay_is_shown_as_turn() {
    let relays = crate::sfu::RelayAddresses::default();
    let mut net = Net::with_config(SfuConfig {
        candidates: vec!["127.0.0.1:7882".parse().unwrap()],
        seed: Some(31),
        relays: relays.clone(),
        ..Default::default()
    });
    let mut alice = SinglePeer::new(net.now, 1, 0, 0);
    let mut bob = SinglePeer::new(net.now, 2, 1, 0);
    relays.insert(bob.peer.addr, crate::sfu::RelayVia::Tls);
    bob_hears_alice(&mut net, &mut alice, &mut bob);
    let transports = net.s.transports(&"room".into());
    assert_eq!(transports.get("bob").map(String::as_str), Some("turn/tls"));
    assert_eq!(transports.get("alice").map(String::as_str), Some("udp"));
    let stats = net.s.stats();
    assert_eq!(
        (
            stats.connected_udp,
            stats.connected_tcp,
            stats.connected_turn
        ),
        (1, 0, [0, 0, 1]),
        "{stats:?}"
    );
}

/// Resume (v1): bob's signalling connection is lost; he stays (alice sees no leave) and
/// alice's audio keeps reaching him. His client resumes with his SID on a new connection: a
/// `ReconnectResponse`, then the room. A late disconnect of his old connection changes
/// nothing. His ICE restart offer is answered with new credentials of the engine's own (the
/// loop's ufrag prefix, indexed for routing), and media flows on the restarted connection.
/// Past the window, a participant that did not resume leaves.
#[test]
fn a_lost_signalling_connection_resumes_the_same_participant() {
    let mut net = Net::with_config(SfuConfig {
        candidates: vec!["127.0.0.1:7882".parse().unwrap()],
        seed: Some(23),
        ufrag_prefix: "01".into(),
        resume_window: Some(Duration::from_secs(30)),
        ..Default::default()
    });
    let mut alice = SinglePeer::new(net.now, 1, 0, 0);
    let mut bob = SinglePeer::new(net.now, 2, 1, 0);
    let amic = alice.join_publishing_audio(&mut net, "alice", "amic");
    net.run(&mut [&mut alice], 50);
    net.join(2, "bob", true);
    let offer = bob.offer();
    net.request(2, offer);
    let mut sent = 0;
    net.run_with_audio(&mut [&mut alice, &mut bob], 0, amic, &mut sent, 100);
    let join = net
        .to(2)
        .into_iter()
        .find_map(|m| match m {
            Msg::Join(j) => Some(j.clone()),
            _ => None,
        })
        .expect("bob's join response");
    assert_eq!(
        join.client_configuration.map(|c| c.resume_connection),
        Some(lk::ClientConfigSetting::Enabled as i32),
        "v1 clients are offered resume"
    );
    let bob_sid = net.sid_of("bob");
    let first = net.answer(2, 1).expect("bob's first answer");
    let mid = mid_carrying(&first, &net.sid_of("alice"), &net.track_sids("alice")[0]);
    let before = net.msgs.len();

    let lost = |epoch| Command::Disconnect {
        session: SessionId(2),
        epoch: Some(epoch),
        reason: lk::DisconnectReason::SignalClose,
    };
    net.s.handle_command(net.now, lost(0));
    let heard = bob.peer.received_on(mid).len();
    net.run_with_audio(&mut [&mut alice, &mut bob], 0, amic, &mut sent, 200);
    assert!(
        bob.peer.received_on(mid).len() > heard + 50,
        "media goes on while his signalling is away"
    );
    assert_eq!(net.sid_of("bob"), bob_sid);
    let left = net.msgs[before..].iter().any(|(to, m)| {
        *to == 1
            && matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.identity == "bob"))
    });
    assert!(!left, "alice heard nothing of bob");

    let resumed = net
        .s
        .resume(net.now, &"room".into(), &"bob".into(), &bob_sid, Vec::new());
    assert_eq!(resumed, Some((SessionId(2), 1)));
    let after = net.msgs.len();
    net.pump(&mut []);
    let to_bob: Vec<&Msg> = net.msgs[after..]
        .iter()
        .filter(|(to, _)| *to == 2)
        .map(|(_, m)| m)
        .collect();
    assert!(
        matches!(to_bob.first(), Some(Msg::Reconnect(_))),
        "the reconnect response first: {to_bob:?}"
    );
    assert!(
        to_bob.iter().any(|m| matches!(m,
            Msg::Update(u) if u.participants.iter().any(|p| p.identity == "alice"))),
        "then the room as it is: {to_bob:?}"
    );
    // A wrong SID or an unknown identity resumes nothing.
    assert_eq!(
        net.s.resume(
            net.now,
            &"room".into(),
            &"bob".into(),
            "PA_other",
            Vec::new()
        ),
        None
    );
    // The old connection's task ends late: its disconnect is not the new connection's.
    net.s.handle_command(net.now, lost(0));
    assert_eq!(
        net.state_of("bob"),
        lk::participant_info::State::Active as i32
    );

    // The client restarts ICE with its next offer.
    bob.restart_ice = true;
    let offer = bob.offer();
    let offered_ufrag = match &offer {
        Req::Offer(o) => ice_ufrag(&o.sdp),
        _ => unreachable!(),
    };
    net.request(2, offer);
    let heard = bob.peer.received_on(mid).len();
    net.run_with_audio(&mut [&mut alice, &mut bob], 0, amic, &mut sent, 300);
    let restarted = net.answer(2, 2).expect("the ICE restart answered");
    let (old_ufrag, new_ufrag) = (ice_ufrag(&first.sdp), ice_ufrag(&restarted.sdp));
    assert_ne!(new_ufrag, old_ufrag, "new credentials");
    assert!(
        new_ufrag.starts_with("01"),
        "the loop's prefix: {new_ufrag}"
    );
    assert_ne!(new_ufrag, offered_ufrag);
    assert!(
        bob.peer.received_on(mid).len() > heard + 50,
        "media flows on the restarted connection"
    );

    // Lost again, never resumed: he leaves when the window ends, and alice hears of it.
    net.s.handle_command(net.now, lost(1));
    let before = net.msgs.len();
    for _ in 0..31 {
        net.now += Duration::from_secs(1);
        net.s.handle_timeout(net.now);
        net.pump(&mut []);
    }
    assert_eq!(net.state_of("bob"), -1, "gone after the window");
    assert!(net.msgs[before..].iter().any(|(to, m)| *to == 1
        && matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.identity == "bob"))));
}
