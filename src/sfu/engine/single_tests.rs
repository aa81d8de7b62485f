//! v1 (single peer connection) tests on a virtual network with str0m clients, no sockets, no
//! sleeps (`docs/design/rtc-v1.md` §4). A [`SinglePeer`] is a LiveKit v1 client: one
//! connection, its own `_reliable`/`_lossy` channels, 3 audio + 3 video `recvonly`
//! placeholders, and it always offers.

use super::*;
use lk::signal_request::Message as Req;
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::media::{Direction, MediaKind, Mid};
use str0m::{Event, Output as RtcOutput};

/// One simulated tick of the virtual clock.
const TICK: Duration = Duration::from_millis(10);

/// A str0m client connection at a virtual address.
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

/// The engine and a clock; every signal message, in order.
struct Net {
    s: Sfu,
    now: Instant,
    msgs: Vec<(u64, Msg)>,
}

impl Net {
    fn new() -> Self {
        let now = Instant::now();
        let s = Sfu::new(
            SfuConfig {
                candidates: vec!["127.0.0.1:7882".parse().unwrap()],
                seed: Some(23),
            },
            now,
        );
        Self {
            s,
            now,
            msgs: Vec::new(),
        }
    }

    fn join(&mut self, session: u64, identity: &str, single_pc: bool) {
        self.s.handle_command(
            self.now,
            Command::Join(Join {
                session: SessionId(session),
                room: "room".into(),
                identity: identity.into(),
                name: identity.into(),
                metadata: String::new(),
                permission: lk::ParticipantPermission {
                    can_subscribe: true,
                    can_publish: true,
                    can_publish_data: true,
                    ..Default::default()
                },
                auto_subscribe: true,
                client_protocol: 2,
                single_pc,
            }),
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
                        if let Some(p) = peers.iter_mut().find(|p| p.addr == t.destination) {
                            let r =
                                Receive::new(Protocol::Udp, t.source, t.destination, &t.contents)
                                    .unwrap();
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
                            self.s
                                .handle_datagram(now, p.addr, t.destination, &t.contents);
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
    channels: bool,
    pending: Option<(SdpPendingOffer, u32)>,
    next_id: u32,
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
            channels: false,
            pending: None,
            next_id: 1,
        }
    }

    /// Builds an offer with every placeholder `recvonly` again (as a browser transceiver
    /// keeps its direction; str0m would otherwise re-offer what was answered `inactive` as
    /// `inactive`).
    fn offer(&mut self) -> Req {
        let mut api = self.peer.rtc.sdp_api();
        if !self.channels {
            api.add_channel("_reliable".into());
            api.add_channel("_lossy".into());
            self.channels = true;
        }
        for (mid, _) in &self.placeholders {
            api.set_direction(*mid, Direction::RecvOnly);
        }
        for kind in self.to_add.drain(..) {
            let mid = api.add_media(kind, Direction::RecvOnly, None, None, None);
            self.placeholders.push((mid, kind));
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
}

/// A single-PC client joins and offers: `join` comes first with `subscriber_primary`
/// false, then the answer with the offer's id, never an `offer`; its one connection connects
/// and it becomes ACTIVE.
#[test]
fn single_pc_client_connects_and_becomes_active() {
    let mut net = Net::new();
    let mut bob = SinglePeer::new(net.now, 2, 3, 3);
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
        matches!(msgs[1], Msg::Answer(a) if a.id == 1),
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
