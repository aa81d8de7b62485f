//! Data packet tests on a virtual network with str0m clients: each client answers its
//! subscriber offers, opens `_reliable` on its publisher connection and sends LiveKit
//! `DataPacket`s. The server, not the client, says who sent a packet; `destination_identities`
//! decide who gets it; reliable packets arrive complete and in order, also through a stalled
//! link. No sockets, no sleeps.

use super::*;
use prost::Message as _;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::{Event, Output as RtcOutput};

/// One simulated tick of the virtual clock.
const TICK: Duration = Duration::from_millis(10);

/// A LiveKit-like client: a subscriber connection (server-offered, with the server's
/// `_reliable` / `_lossy` channels) and a publisher connection with its own `_reliable`.
struct Client {
    session: u64,
    identity: &'static str,
    sub: Rtc,
    sub_addr: SocketAddr,
    publ: Rtc,
    pub_addr: SocketAddr,
    pub_reliable: Option<ChannelId>,
    pub_pending: Option<SdpPendingOffer>,
    pub_open: bool,
    /// Labels of the subscriber connection's open channels.
    sub_labels: HashMap<ChannelId, String>,
    /// Data received on the subscriber connection: (channel label, bytes).
    received: Vec<(String, Vec<u8>)>,
}

impl Client {
    fn new(now: Instant, session: u64, identity: &'static str) -> Self {
        let peer = |port: u16| {
            let addr: SocketAddr = format!("10.0.0.{session}:{port}").parse().unwrap();
            let mut rtc = Rtc::builder().build(now);
            rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
            (rtc, addr)
        };
        let (sub, sub_addr) = peer(5000);
        let (publ, pub_addr) = peer(5001);
        Self {
            session,
            identity,
            sub,
            sub_addr,
            publ,
            pub_addr,
            pub_reliable: None,
            pub_pending: None,
            pub_open: false,
            sub_labels: HashMap::new(),
            received: Vec::new(),
        }
    }

    fn rtc_at(&mut self, addr: SocketAddr) -> Option<&mut Rtc> {
        if addr == self.sub_addr {
            Some(&mut self.sub)
        } else if addr == self.pub_addr {
            Some(&mut self.publ)
        } else {
            None
        }
    }

    /// Whether the server's `_reliable` reached the subscriber side and ours is open.
    fn ready(&self) -> bool {
        self.pub_open && self.sub_labels.values().any(|l| l == "_reliable")
    }

    /// Writes `packet` on the publisher `_reliable` channel; false if str0m's buffer is full.
    fn send(&mut self, packet: &lk::DataPacket) -> bool {
        let id = self.pub_reliable.expect("publisher channel created");
        let mut ch = self.publ.channel(id).expect("publisher channel open");
        ch.write(true, &packet.encode_to_vec()).expect("write")
    }

    /// Every `DataPacket` received over the server's `_reliable`, in order.
    fn reliable_packets(&self) -> Vec<lk::DataPacket> {
        self.received
            .iter()
            .filter(|(label, _)| label == "_reliable")
            .map(|(_, b)| lk::DataPacket::decode(b.as_slice()).expect("a DataPacket"))
            .collect()
    }
}

/// The engine, its clients and a clock; `stalled` addresses get no datagrams (a link down).
struct Net {
    s: Sfu,
    now: Instant,
    clients: Vec<Client>,
    stalled: Vec<SocketAddr>,
}

impl Net {
    /// A room with `identities` joined (sessions 1, 2, ...), every client connected with its
    /// data channels open both ways.
    fn with(identities: &[&'static str]) -> Self {
        Self::build(identities, &[])
    }

    /// The same, with the participants in `hidden` joined hidden.
    fn build(identities: &[&'static str], hidden: &[&str]) -> Self {
        let now = Instant::now();
        let s = Sfu::new(
            SfuConfig {
                candidates: vec!["127.0.0.1:7882".parse().unwrap()],
                seed: Some(17),
                ..Default::default()
            },
            now,
        );
        let mut net = Self {
            s,
            now,
            clients: Vec::new(),
            stalled: Vec::new(),
        };
        for identity in identities {
            net.join(identity, hidden.contains(identity));
        }
        for _ in 0..500 {
            if net.clients.iter().all(Client::ready) {
                return net;
            }
            net.tick();
        }
        panic!("data channels never opened");
    }

    /// Joins `identity` as the next session and sends its publisher offer (data channel
    /// only, as a client that publishes no media yet); the rest happens as time goes on.
    fn join(&mut self, identity: &'static str, hidden: bool) {
        let session = self.clients.len() as u64 + 1;
        self.clients.push(Client::new(self.now, session, identity));
        let permission = lk::ParticipantPermission {
            hidden,
            ..super::tests::publish_permission()
        };
        let mut join = super::tests::join_command(session, "room", identity, permission, false);
        // A peer Conclave's media relay (`cascade:<peer>|<identity>`), as `signal` marks it.
        if let (Command::Join(j), Some(_)) = (&mut join, identity.strip_prefix("cascade:")) {
            j.cascade = super::CascadeRole::Relay;
        }
        self.s.handle_command(self.now, join);
        self.pump();
        let c = self.clients.last_mut().unwrap();
        let mut api = c.publ.sdp_api();
        c.pub_reliable = Some(api.add_channel("_reliable".into()));
        let (offer, pending) = api.apply().unwrap();
        c.pub_pending = Some(pending);
        self.request(
            session,
            super::tests::offer_message(offer.to_sdp_string(), 1),
        );
    }

    fn client(&mut self, identity: &str) -> &mut Client {
        self.clients
            .iter_mut()
            .find(|c| c.identity == identity)
            .unwrap()
    }

    fn sid_of(&self, identity: &str) -> String {
        self.s
            .participant_info(&"room".into(), &identity.into())
            .expect("joined")
            .sid
    }

    fn request(&mut self, session: u64, m: lk::signal_request::Message) {
        self.s.handle_command(
            self.now,
            Command::Request {
                session: SessionId(session),
                message: Box::new(m),
            },
        );
        self.pump();
    }

    /// Advances the clock one tick and moves everything due.
    fn tick(&mut self) {
        self.now += TICK;
        self.s.handle_timeout(self.now);
        for c in &mut self.clients {
            let _ = c.sub.handle_input(Input::Timeout(self.now));
            let _ = c.publ.handle_input(Input::Timeout(self.now));
        }
        self.pump();
    }

    /// Moves datagrams and signalling until nothing moves: answers subscriber offers and
    /// applies publisher answers as they come.
    fn pump(&mut self) {
        let now = self.now;
        for _ in 0..10_000 {
            let mut moved = false;
            let mut signals = Vec::new();
            loop {
                match self.s.poll_output() {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) => {
                        if self.stalled.contains(&t.destination) {
                            continue;
                        }
                        let Some(rtc) = self
                            .clients
                            .iter_mut()
                            .find_map(|c| c.rtc_at(t.destination))
                        else {
                            continue;
                        };
                        let r = Receive::new(Protocol::Udp, t.source, t.destination, &t.contents)
                            .unwrap();
                        let _ = rtc.handle_input(Input::Receive(now, r));
                        moved = true;
                    }
                    Output::Signal(id, SignalOut::Message(m)) => signals.push((id.0, *m)),
                    _ => {}
                }
            }
            for (session, m) in signals {
                moved = true;
                let Some(c) = self.clients.iter_mut().find(|c| c.session == session) else {
                    continue;
                };
                match m {
                    Msg::Offer(o) => {
                        let answer = c
                            .sub
                            .sdp_api()
                            .accept_offer(SdpOffer::from_sdp_string(&o.sdp).unwrap())
                            .unwrap();
                        let answer = lk::signal_request::Message::Answer(lk::SessionDescription {
                            r#type: "answer".into(),
                            sdp: answer.to_sdp_string(),
                            id: o.id,
                            mid_to_track_id: HashMap::new(),
                        });
                        self.s.handle_command(
                            now,
                            Command::Request {
                                session: SessionId(session),
                                message: Box::new(answer),
                            },
                        );
                    }
                    Msg::Answer(a) => {
                        if let Some(pending) = c.pub_pending.take() {
                            c.publ
                                .sdp_api()
                                .accept_answer(pending, SdpAnswer::from_sdp_string(&a.sdp).unwrap())
                                .unwrap();
                        }
                    }
                    _ => {}
                }
            }
            for c in &mut self.clients {
                for (is_sub, rtc) in [(true, &mut c.sub), (false, &mut c.publ)] {
                    let from = if is_sub { c.sub_addr } else { c.pub_addr };
                    loop {
                        match rtc.poll_output().unwrap() {
                            RtcOutput::Timeout(_) => break,
                            RtcOutput::Transmit(t) => {
                                self.s
                                    .handle_datagram(now, from, t.destination, &t.contents);
                                moved = true;
                            }
                            RtcOutput::Event(Event::ChannelOpen(id, label)) => {
                                if is_sub {
                                    c.sub_labels.insert(id, label);
                                } else {
                                    c.pub_open = true;
                                }
                            }
                            RtcOutput::Event(Event::ChannelData(d)) if is_sub => {
                                let label = c.sub_labels.get(&d.id).cloned().unwrap_or_default();
                                c.received.push((label, d.data));
                            }
                            RtcOutput::Event(_) => {}
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the virtual network never settled");
    }

    /// Ticks until `done` holds (at most `limit` of virtual time).
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Net) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.tick();
        }
        done(self)
    }
}

/// A packet claiming to come from "mallory".
fn forged(value: lk::data_packet::Value) -> lk::DataPacket {
    lk::DataPacket {
        participant_identity: "mallory".into(),
        participant_sid: "PA_mallory".into(),
        value: Some(value),
        ..Default::default()
    }
}

#[allow(deprecated)]
fn user_packet(payload: &[u8]) -> lk::UserPacket {
    lk::UserPacket {
        participant_sid: "PA_mallory".into(),
        participant_identity: "mallory".into(),
        payload: payload.to_vec(),
        topic: Some("t".into()),
        ..Default::default()
    }
}

/// (a) Every kind of packet a client may send, each claiming to be from "mallory" (at the top
/// level and, for a user packet, inside it), reaches bob stamped with alice's identity and SID.
/// A transcription, which names the speaker it transcribes, is dropped as LiveKit drops it
/// from anyone but an agent; metrics are not relayed as data either.
#[test]
#[allow(deprecated)]
fn forged_sender_identities_arrive_as_the_real_sender() {
    use lk::data_packet::Value;
    let mut net = Net::with(&["alice", "bob"]);
    let alice_sid = net.sid_of("alice");
    let sent = vec![
        Value::User(user_packet(b"hi")),
        Value::ChatMessage(lk::ChatMessage {
            id: "c1".into(),
            message: "hello".into(),
            ..Default::default()
        }),
        Value::RpcRequest(lk::RpcRequest {
            id: "r1".into(),
            method: "echo".into(),
            payload: "ping".into(),
            response_timeout_ms: 5000,
            version: 1,
            ..Default::default()
        }),
        Value::RpcAck(lk::RpcAck {
            request_id: "r0".into(),
        }),
        Value::RpcResponse(lk::RpcResponse {
            request_id: "r0".into(),
            value: Some(lk::rpc_response::Value::Payload("pong".into())),
        }),
        Value::StreamHeader(lk::data_stream::Header {
            stream_id: "s1".into(),
            topic: "chat".into(),
            mime_type: "text/plain".into(),
            ..Default::default()
        }),
        Value::StreamChunk(lk::data_stream::Chunk {
            stream_id: "s1".into(),
            content: b"chunk".to_vec(),
            ..Default::default()
        }),
        Value::StreamTrailer(lk::data_stream::Trailer {
            stream_id: "s1".into(),
            ..Default::default()
        }),
        Value::EncryptedPacket(lk::EncryptedPacket {
            encryption_type: lk::encryption::Type::Gcm as i32,
            iv: vec![1; 12],
            key_index: 0,
            encrypted_value: vec![7; 32],
        }),
        Value::SipDtmf(lk::SipDtmf {
            code: 1,
            digit: "1".into(),
        }),
    ];
    let dropped = [
        Value::Transcription(lk::Transcription {
            transcribed_participant_identity: "bob".into(),
            track_id: "TR_x".into(),
            segments: Vec::new(),
        }),
        Value::Metrics(lk::MetricsBatch::default()),
    ];
    let expected = sent.len();
    let alice = net.client("alice");
    for v in dropped.into_iter().chain(sent) {
        assert!(alice.send(&forged(v)));
    }
    assert!(
        net.run_until(Duration::from_secs(5), |n| {
            n.clients[1].reliable_packets().len() >= expected
        }),
        "bob got {} of {expected}",
        net.client("bob").reliable_packets().len()
    );
    net.run_until(Duration::from_millis(500), |_| false);
    let got = net.client("bob").reliable_packets();
    assert_eq!(got.len(), expected, "{got:?}");
    for p in &got {
        assert_eq!(p.participant_identity, "alice", "{p:?}");
        assert_eq!(p.participant_sid, alice_sid, "{p:?}");
        assert_eq!(
            p.kind,
            lk::data_packet::Kind::Reliable as i32,
            "the channel decides the kind: {p:?}"
        );
        assert!(
            !matches!(p.value, Some(Value::Transcription(_) | Value::Metrics(_))),
            "{p:?}"
        );
        if let Some(Value::User(u)) = &p.value {
            assert_eq!(u.participant_identity, "alice");
            assert_eq!(u.participant_sid, alice_sid);
            assert_eq!(u.payload, b"hi");
        }
    }
    assert!(net.client("alice").reliable_packets().is_empty(), "no echo");
}

/// (b) A packet for `destination_identities = ["bob"]` reaches bob and not carol, also when
/// an older client addresses it inside the user packet (identities or SIDs).
#[test]
#[allow(deprecated)]
fn destination_identities_reach_only_their_participants() {
    use lk::data_packet::Value;
    let mut net = Net::with(&["alice", "bob", "carol"]);
    let bob_sid = net.sid_of("bob");
    let top = lk::DataPacket {
        destination_identities: vec!["bob".into()],
        ..forged(Value::User(user_packet(b"top-level")))
    };
    let mut inner_identities = user_packet(b"in-user-identities");
    inner_identities.destination_identities = vec!["bob".into()];
    let mut inner_sids = user_packet(b"in-user-sids");
    inner_sids.destination_sids = vec![bob_sid];
    let rpc = lk::DataPacket {
        destination_identities: vec!["bob".into()],
        ..forged(Value::RpcRequest(lk::RpcRequest {
            id: "r1".into(),
            method: "m".into(),
            ..Default::default()
        }))
    };
    let everyone = forged(Value::User(user_packet(b"everyone")));
    let alice = net.client("alice");
    for p in [
        top,
        forged(Value::User(inner_identities)),
        forged(Value::User(inner_sids)),
        rpc,
        everyone,
    ] {
        assert!(alice.send(&p));
    }
    assert!(net.run_until(Duration::from_secs(5), |n| {
        n.clients[1].reliable_packets().len() >= 5 && !n.clients[2].reliable_packets().is_empty()
    }));
    net.run_until(Duration::from_millis(500), |_| false);
    let payload = |p: &lk::DataPacket| match &p.value {
        Some(Value::User(u)) => String::from_utf8_lossy(&u.payload).into_owned(),
        Some(Value::RpcRequest(r)) => format!("rpc:{}", r.id),
        other => panic!("unexpected {other:?}"),
    };
    let bob: Vec<String> = net
        .client("bob")
        .reliable_packets()
        .iter()
        .map(payload)
        .collect();
    let carol: Vec<String> = net
        .client("carol")
        .reliable_packets()
        .iter()
        .map(payload)
        .collect();
    assert_eq!(
        bob,
        [
            "top-level",
            "in-user-identities",
            "in-user-sids",
            "rpc:r1",
            "everyone"
        ]
    );
    assert_eq!(carol, ["everyone"]);
    // Who else a packet was addressed to is nobody's business.
    for p in net.client("bob").reliable_packets() {
        assert!(p.destination_identities.is_empty(), "{p:?}");
        if let Some(Value::User(u)) = &p.value {
            assert!(u.destination_identities.is_empty() && u.destination_sids.is_empty());
        }
    }
}

/// alice sends `n` reliable user packets of `size` bytes (payload: the index, padded), as
/// fast as her channel takes them; returns how many ticks that took.
fn send_numbered(net: &mut Net, n: u32, size: usize) {
    let mut next = 0u32;
    for _ in 0..20_000 {
        if next == n {
            return;
        }
        while next < n {
            let mut payload = next.to_be_bytes().to_vec();
            payload.resize(size, 0xAB);
            let p = lk::DataPacket {
                value: Some(lk::data_packet::Value::User(lk::UserPacket {
                    payload,
                    ..Default::default()
                })),
                ..Default::default()
            };
            if !net.client("alice").send(&p) {
                break;
            }
            next += 1;
        }
        net.tick();
    }
    panic!("alice could send only {next} of {n}");
}

/// The indices of the numbered packets `identity` received, in order.
fn numbers_at(net: &mut Net, identity: &str) -> Vec<u32> {
    net.client(identity)
        .reliable_packets()
        .iter()
        .filter_map(|p| match &p.value {
            Some(lk::data_packet::Value::User(u)) => {
                Some(u32::from_be_bytes(u.payload.get(..4)?.try_into().ok()?))
            }
            _ => None,
        })
        .collect()
}

/// (c) 500 reliable packets reach both receivers complete and in order.
#[test]
fn five_hundred_reliable_packets_arrive_in_order() {
    let mut net = Net::with(&["alice", "bob", "carol"]);
    send_numbered(&mut net, 500, 200);
    assert!(net.run_until(Duration::from_secs(10), |n| {
        n.clients[1..].iter().all(|c| c.received.len() >= 500)
    }));
    let want: Vec<u32> = (0..500).collect();
    assert_eq!(numbers_at(&mut net, "bob"), want);
    assert_eq!(numbers_at(&mut net, "carol"), want);
}

/// (c') A burst larger than str0m's SCTP send buffer (128 KiB) towards a subscriber whose
/// link stalls for a while is queued, not dropped: once the link is back, every packet arrives,
/// in order.
#[test]
fn a_stalled_subscriber_still_gets_every_reliable_packet_in_order() {
    let mut net = Net::with(&["alice", "bob"]);
    let bob_sub = net.client("bob").sub_addr;
    net.stalled.push(bob_sub);
    send_numbered(&mut net, 400, 1000);
    net.run_until(Duration::from_millis(500), |_| false);
    net.stalled.clear();
    assert!(
        net.run_until(Duration::from_secs(60), |n| n.clients[1].received.len()
            >= 400),
        "bob got {}",
        net.client("bob").received.len()
    );
    let want: Vec<u32> = (0..400).collect();
    assert_eq!(numbers_at(&mut net, "bob"), want);
}

/// A relayed packet leaves for its receivers at once, not at their connections' next timer:
/// with the clock standing still, bob has alice's packet.
#[test]
fn relayed_data_leaves_without_waiting_for_a_timer() {
    let mut net = Net::with(&["alice", "bob"]);
    net.run_until(Duration::from_secs(1), |_| false);
    let before = net.client("bob").received.len();
    assert!(net
        .client("alice")
        .send(&forged(lk::data_packet::Value::User(user_packet(b"now")))));
    net.pump();
    assert_eq!(net.client("bob").received.len(), before + 1);
}

/// A hidden sender stays hidden: its packets carry no identity or SID, whatever it claims.
#[test]
#[allow(deprecated)]
fn a_hidden_sender_is_not_revealed() {
    let mut net = Net::build(&["ghost", "bob"], &["ghost"]);
    assert!(net
        .client("ghost")
        .send(&forged(lk::data_packet::Value::User(user_packet(b"boo")))));
    assert!(net.run_until(Duration::from_secs(2), |n| !n.clients[1]
        .received
        .is_empty()));
    let got = net.client("bob").reliable_packets();
    assert_eq!(got.len(), 1);
    assert!(got[0].participant_identity.is_empty() && got[0].participant_sid.is_empty());
    let Some(lk::data_packet::Value::User(u)) = &got[0].value else {
        panic!("{got:?}");
    };
    assert!(u.participant_identity.is_empty() && u.participant_sid.is_empty());
    assert_eq!(u.payload, b"boo");
}

/// A peer Conclave's media relay of alice (`cascade:peer|alice`) gets alice's data packets and
/// no one else's: her mirror at the peer sends them on as hers, so each packet crosses once,
/// on the connection of its sender's mirror.
#[test]
fn a_cascade_relay_gets_only_the_data_of_the_participant_it_mirrors() {
    let mut net = Net::with(&["alice", "dave", "cascade:peer|alice"]);
    assert!(net
        .client("dave")
        .send(&forged(lk::data_packet::Value::User(user_packet(
            b"from-dave"
        )))));
    assert!(net
        .client("alice")
        .send(&forged(lk::data_packet::Value::User(user_packet(
            b"from-alice"
        )))));
    assert!(net.run_until(Duration::from_secs(2), |n| !n.clients[2]
        .received
        .is_empty()
        && !n.clients[0].received.is_empty()));
    net.run_until(Duration::from_millis(500), |_| false);
    let got = net.client("cascade:peer|alice").reliable_packets();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].participant_identity, "alice");
    // Everyone else gets everything as before.
    assert_eq!(net.client("alice").reliable_packets().len(), 1);
    assert_eq!(net.client("dave").reliable_packets().len(), 1);
}

/// A participant still connecting when a reliable packet is sent gets it once its channel
/// opens (LiveKit holds reliable data for joining participants too).
#[test]
fn a_joining_participant_gets_reliable_data_once_connected() {
    let mut net = Net::with(&["alice", "bob"]);
    net.join("carol", false);
    let carol_sub = net.client("carol").sub_addr;
    net.stalled.push(carol_sub);
    net.run_until(Duration::from_millis(200), |_| false);
    assert!(!net.client("carol").ready());
    assert!(net
        .client("alice")
        .send(&forged(lk::data_packet::Value::User(user_packet(b"early")))));
    net.run_until(Duration::from_millis(500), |_| false);
    net.stalled.clear();
    assert!(
        net.run_until(Duration::from_secs(30), |n| !n.clients[2]
            .received
            .is_empty()),
        "carol never got the packet"
    );
    let got = net.client("carol").reliable_packets();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].participant_identity, "alice");
    assert_eq!(net.client("bob").reliable_packets().len(), 1);
}

/// LiveKit clients number their reliable packets (`sequence`, from 1). A repeat (a resuming
/// client resends what it is not sure arrived) is dropped, so bob gets each packet once;
/// unnumbered packets (SDKs that do not number) always pass. A resume tells alice's client
/// the last number the server took (`ReconnectResponse.last_message_seq`), from which it
/// resends.
#[test]
fn repeated_reliable_packets_are_dropped_and_a_resume_names_the_last() {
    let mut net = Net::with(&["alice", "bob"]);
    net.s.config.resume_window = Some(Duration::from_secs(30));
    let numbered = |sequence: u32| lk::DataPacket {
        sequence,
        value: Some(lk::data_packet::Value::User(user_packet(b"n"))),
        ..Default::default()
    };
    for sequence in [1, 2, 3, 2, 3, 4, 0, 0] {
        assert!(net.client("alice").send(&numbered(sequence)));
        net.pump();
    }
    net.run_until(Duration::from_secs(1), |_| false);
    let got: Vec<u32> = net
        .client("bob")
        .reliable_packets()
        .iter()
        .map(|p| p.sequence)
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4, 0, 0]);

    let room: RoomName = "room".into();
    let sid = net
        .s
        .participant_info(&room, &"alice".into())
        .map(|p| p.sid)
        .expect("alice");
    net.s.handle_command(
        net.now,
        Command::Disconnect {
            session: SessionId(1),
            epoch: Some(0),
            reason: lk::DisconnectReason::SignalClose,
        },
    );
    let now = net.now;
    assert!(net
        .s
        .resume(now, &room, &"alice".into(), &sid, Vec::new())
        .is_some());
    let mut last = None;
    loop {
        match net.s.poll_output() {
            Output::Timeout(_) => break,
            Output::Signal(SessionId(1), SignalOut::Message(m)) => {
                if let Msg::Reconnect(r) = *m {
                    last = Some(r.last_message_seq);
                }
            }
            _ => {}
        }
    }
    assert_eq!(last, Some(4));
}
