//! Engine tests: join/leave ordering, versions, subscriptions, a virtual-network media
//! simulation with str0m peers, and hostile datagrams. No sockets, no sleeps.

use super::*;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaData, MediaKind};
use str0m::{Event, Output as RtcOutput};

pub(super) fn sfu(now: Instant) -> Sfu {
    Sfu::new(
        SfuConfig {
            candidates: vec!["127.0.0.1:7882".parse().unwrap()],
            seed: Some(42),
            ..Default::default()
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

/// Subscribe, publish and send data: what most engine tests grant.
pub(super) fn publish_permission() -> lk::ParticipantPermission {
    lk::ParticipantPermission {
        can_subscribe: true,
        can_publish: true,
        can_publish_data: true,
        ..Default::default()
    }
}

/// The `Join` command the engine tests send: `identity` (also its name) joins `room` as
/// `session` with `permission`, auto-subscribing, protocol 2, on one or two peer connections.
pub(super) fn join_command(
    session: u64,
    room: &str,
    identity: &str,
    permission: lk::ParticipantPermission,
    single_pc: bool,
) -> Command {
    Command::Join(Join {
        session: SessionId(session),
        room: room.into(),
        identity: identity.into(),
        name: identity.into(),
        metadata: String::new(),
        attributes: Default::default(),
        permission,
        auto_subscribe: true,
        client_protocol: 2,
        single_pc,
        ice_servers: Vec::new(),
        cascade: crate::sfu::CascadeRole::None,
    })
}

pub(super) fn join(s: &mut Sfu, now: Instant, session: u64, identity: &str) {
    s.handle_command(
        now,
        join_command(session, "room", identity, permission(true), false),
    );
}

/// Drains outputs: signal messages per session, in order, and lifecycle events.
pub(super) fn drain(s: &mut Sfu) -> (Vec<(u64, Msg)>, Vec<SfuEvent>, usize) {
    let mut msgs = Vec::new();
    let mut events = Vec::new();
    let mut closes = 0;
    loop {
        match s.poll_output() {
            Output::Timeout(_) => return (msgs, events, closes),
            Output::Signal(id, SignalOut::Message(m)) => msgs.push((id.0, *m)),
            Output::Signal(_, SignalOut::Close) => closes += 1,
            Output::Event(e) => events.push(e),
            Output::Transmit(_) => {}
        }
    }
}

pub(super) fn request(s: &mut Sfu, now: Instant, session: u64, m: lk::signal_request::Message) {
    s.handle_command(
        now,
        Command::Request {
            session: SessionId(session),
            message: Box::new(m),
        },
    );
}

pub(super) fn add_track(cid: &str, video: bool) -> lk::signal_request::Message {
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
/// `add_track` of an unencrypted camera `cam` announced with three simulcast layers (q, h, f:
/// 160, 320 and 640 wide).
pub(super) fn simulcast_camera() -> lk::AddTrackRequest {
    let lk::signal_request::Message::AddTrack(mut add) = add_track("cam", true) else {
        unreachable!("add_track builds an AddTrack request")
    };
    add.encryption = lk::encryption::Type::None as i32;
    add.layers = [("q", 0, 160), ("h", 1, 320), ("f", 2, 640)]
        .iter()
        .map(|&(rid, q, w)| lk::VideoLayer {
            quality: q,
            width: w,
            height: w * 9 / 16,
            rid: rid.into(),
            ..Default::default()
        })
        .collect();
    add
}

/// `peer` offers its camera `cam` (stream `s`) sendonly in the simulcast layers `rids`:
/// the mid, the pending offer and the offer as a signal request (id 1).
pub(super) fn simulcast_offer(
    peer: &mut Peer,
    rids: &[&str],
) -> (
    str0m::media::Mid,
    str0m::change::SdpPendingOffer,
    lk::signal_request::Message,
) {
    let mut api = peer.rtc.sdp_api();
    let mut simulcast = str0m::media::Simulcast::new();
    for rid in rids {
        simulcast.add_send_layer(str0m::media::SimulcastLayer::new(rid));
    }
    let mid = api.add_media(
        MediaKind::Video,
        Direction::SendOnly,
        Some("s".into()),
        Some("cam".into()),
        Some(simulcast),
    );
    let (offer, pending) = api.apply().unwrap();
    (mid, pending, offer_message(offer.to_sdp_string(), 1))
}

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

fn versions_of(msgs: &[(u64, Msg)], to: u64, sid: &str) -> Vec<u32> {
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
    assert_eq!(
        (j.ping_interval, j.ping_timeout),
        (5, 15),
        "the engine's default ping"
    );
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
            session: SessionId(2),
            epoch: None,
            reason: lk::DisconnectReason::ClientInitiated,
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
    assert!(matches!(&events[0], SfuEvent::ParticipantLeft { identity, .. } if identity == "bob"));
    assert_eq!(s.participant_count(&"room".into()), 1);
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
    assert_eq!(s.participant_count(&"room".into()), 1);
}

/// A graceful shutdown tells every participant to reconnect (the SDKs rejoin the restarted
/// server), closes its signalling, and empties the engine.
#[test]
fn shutdown_tells_everyone_to_reconnect() {
    let now = Instant::now();
    let mut s = sfu(now);
    join(&mut s, now, 1, "alice");
    join(&mut s, now, 2, "bob");
    drain(&mut s);
    assert_eq!(s.session_count(), 2);
    s.handle_command(now, Command::Shutdown);
    let (msgs, events, closes) = drain(&mut s);
    for session in [1, 2] {
        let leave = msgs.iter().find_map(|(id, m)| match m {
            Msg::Leave(l) if *id == session => Some(l.clone()),
            _ => None,
        });
        let leave = leave.expect("every participant is told");
        assert_eq!(
            leave.action,
            lk::leave_request::Action::Reconnect as i32,
            "{leave:?}"
        );
        assert_eq!(leave.reason, lk::DisconnectReason::ServerShutdown as i32);
        assert!(leave.can_reconnect);
    }
    assert_eq!(closes, 2);
    assert_eq!(s.session_count(), 0);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SfuEvent::ParticipantLeft { .. })),
        "{events:?}"
    );
}

#[test]
fn publishing_without_permission_is_refused() {
    let now = Instant::now();
    let mut s = sfu(now);
    s.handle_command(
        now,
        Command::Join(Join {
            session: SessionId(1),
            room: "room".into(),
            identity: "viewer".into(),
            name: String::new(),
            metadata: String::new(),
            attributes: Default::default(),
            permission: permission(false),
            auto_subscribe: true,
            client_protocol: 2,
            single_pc: false,
            ice_servers: Vec::new(),
            cascade: crate::sfu::CascadeRole::None,
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

/// The limits (`sfu::limits`): a 1 MiB metadata, name or attributes update is refused with
/// `LIMIT_EXCEEDED`, changes nothing and reaches nobody else; one at the limit goes through.
#[test]
fn updates_over_the_limits_are_refused_and_reach_nobody() {
    use lk::signal_request::Message as Req;
    let now = Instant::now();
    let mut s = sfu(now);
    join(&mut s, now, 1, "alice");
    join(&mut s, now, 2, "bob");
    drain(&mut s);
    let mib = "x".repeat(1024 * 1024);
    let cases = [
        (
            "metadata",
            lk::UpdateParticipantMetadata {
                metadata: mib.clone(),
                request_id: 7,
                ..Default::default()
            },
        ),
        (
            "name",
            lk::UpdateParticipantMetadata {
                name: mib.clone(),
                request_id: 8,
                ..Default::default()
            },
        ),
        (
            "attributes",
            lk::UpdateParticipantMetadata {
                attributes: HashMap::from([("k".to_owned(), mib.clone())]),
                request_id: 9,
                ..Default::default()
            },
        ),
        (
            "name",
            lk::UpdateParticipantMetadata {
                name: "n".repeat(257),
                metadata: "small".into(),
                ..Default::default()
            },
        ),
    ];
    for (what, u) in cases {
        let id = u.request_id;
        request(&mut s, now, 1, Req::UpdateMetadata(u));
        let (msgs, _, _) = drain(&mut s);
        assert!(
            msgs.iter().any(|(to, m)| *to == 1
                && matches!(m, Msg::RequestResponse(r) if r.request_id == id
                    && r.reason == lk::request_response::Reason::LimitExceeded as i32
                    && r.message.contains(what))),
            "{what}: alice is told: {msgs:?}"
        );
        assert!(
            !msgs.iter().any(|(to, _)| *to == 2),
            "{what}: bob hears nothing"
        );
        assert!(
            msgs.iter().all(|(_, m)| m.encoded_len() < 1024),
            "{what}: nothing big is sent back"
        );
    }
    let alice = s
        .participant_info(&"room".into(), &"alice".into())
        .expect("alice");
    assert!(alice.metadata.is_empty() && alice.name == "alice" && alice.attributes.is_empty());

    // At the limits: accepted, acknowledged and sent to everyone.
    request(
        &mut s,
        now,
        1,
        Req::UpdateMetadata(lk::UpdateParticipantMetadata {
            metadata: "m".repeat(crate::sfu::limits::MAX_METADATA_BYTES),
            name: "n".repeat(crate::sfu::limits::MAX_PARTICIPANT_NAME_BYTES),
            request_id: 10,
            ..Default::default()
        }),
    );
    let (msgs, _, _) = drain(&mut s);
    assert!(msgs.iter().any(|(to, m)| *to == 1
        && matches!(m, Msg::RequestResponse(r) if r.request_id == 10
            && r.reason == lk::request_response::Reason::Ok as i32)));
    assert!(msgs.iter().any(|(to, m)| *to == 2
        && matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.metadata.len() == crate::sfu::limits::MAX_METADATA_BYTES))));

    // A late joiner's join response stays proportionate.
    join(&mut s, now, 3, "carol");
    let (msgs, _, _) = drain(&mut s);
    let join_len = msgs
        .iter()
        .find(|(to, m)| *to == 3 && matches!(m, Msg::Join(_)))
        .map(|(_, m)| m.encoded_len())
        .expect("carol's join");
    // (alice's metadata at the limit, her name, and a few hundred bytes of the rest)
    let bound = crate::sfu::limits::MAX_METADATA_BYTES
        + crate::sfu::limits::MAX_PARTICIPANT_NAME_BYTES
        + 4096;
    assert!(join_len < bound, "join response of {join_len} bytes");
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
    request(&mut s, now, 1, offer_message(sdp, 7));
    // Media events surface on the publisher connection's next tick.
    s.handle_timeout(now + Duration::from_millis(100));
    let (msgs, _, _) = drain(&mut s);
    let answer = answer_for(&msgs, 1);
    assert_eq!(answer.expect("publisher offer answered").id, 7, "same id");
    // The subscription waits for bob's answer to his pending offer; the track's update
    // reached bob already.
    let track_update = msgs.iter().position(|(id, m)| {
        *id == 2
            && matches!(m, Msg::Update(u) if u.participants.iter().any(|p| !p.tracks.is_empty()))
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
pub(super) struct Peer {
    pub(super) rtc: Rtc,
    pub(super) addr: SocketAddr,
    pub(super) events: Vec<Event>,
}

impl Peer {
    pub(super) fn new(now: Instant, addr: &str) -> Self {
        Self::with(now, addr, Rtc::builder())
    }

    /// A peer that accepts Opus with RED and reports every RTP packet it receives.
    fn red_capable(now: Instant, addr: &str) -> Self {
        let config = Rtc::builder()
            .enable_opus(true, true)
            .enable_raw_packets(true);
        Self::with(now, addr, config)
    }

    pub(super) fn with(now: Instant, addr: &str, config: str0m::RtcConfig) -> Self {
        let mut rtc = config.build(now);
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
pub(super) fn pump(s: &mut Sfu, peers: &mut [&mut Peer], now: Instant, msgs: &mut Vec<(u64, Msg)>) {
    pump_dropping(s, peers, now, msgs, &mut |_, _| false);
}

/// [`pump`], losing the datagrams to peers that `drop` picks.
pub(super) fn pump_dropping(
    s: &mut Sfu,
    peers: &mut [&mut Peer],
    now: Instant,
    msgs: &mut Vec<(u64, Msg)>,
    drop: &mut impl FnMut(SocketAddr, &[u8]) -> bool,
) {
    for _ in 0..1000 {
        let mut moved = false;
        loop {
            match s.poll_output() {
                Output::Timeout(_) => break,
                Output::Transmit(t) => {
                    if drop(t.destination, &t.contents) {
                        continue;
                    }
                    if let Some(p) = peers.iter_mut().find(|p| p.addr == t.destination) {
                        let r = Receive::new(Protocol::Udp, t.source, t.destination, &t.contents)
                            .unwrap();
                        let _ = p.rtc.handle_input(Input::Receive(now, r));
                        moved = true;
                    }
                }
                Output::Signal(id, SignalOut::Message(m)) => msgs.push((id.0, *m)),
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

pub(super) fn answer_offer(
    peer: &mut Peer,
    o: &lk::SessionDescription,
) -> lk::signal_request::Message {
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

/// A client's offer as a signal request.
pub(super) fn offer_message(sdp: String, id: u32) -> lk::signal_request::Message {
    lk::signal_request::Message::Offer(lk::SessionDescription {
        r#type: "offer".into(),
        sdp,
        id,
        mid_to_track_id: HashMap::new(),
    })
}

/// The engine's answer to `session` among `msgs`, if any.
pub(super) fn answer_for(msgs: &[(u64, Msg)], session: u64) -> Option<lk::SessionDescription> {
    msgs.iter().find_map(|(id, m)| match m {
        Msg::Answer(a) if *id == session => Some(a.clone()),
        _ => None,
    })
}

/// One tick of the virtual network at `now`: the engine's and every peer's timers, then
/// [`pump_dropping`] (`msgs` holds this tick's messages).
pub(super) fn tick_dropping(
    s: &mut Sfu,
    peers: &mut [&mut Peer],
    now: Instant,
    msgs: &mut Vec<(u64, Msg)>,
    drop: &mut impl FnMut(SocketAddr, &[u8]) -> bool,
) {
    s.handle_timeout(now);
    for p in peers.iter_mut() {
        let _ = p.rtc.handle_input(Input::Timeout(now));
    }
    msgs.clear();
    pump_dropping(s, peers, now, msgs, drop);
}

/// Two str0m peers through the engine, no sockets: alice publishes (end-to-end encrypted)
/// audio, bob is offered the track only after the update announcing it, with msid
/// `PA_alice|TR_x`, and receives alice's frames unchanged, with continuous timestamps, never
/// wrapped in RED although his connection accepts RED.
#[test]
fn trap_update_before_media_and_msid_through_a_virtual_network() {
    let bob = alice_audio_to_bob(lk::encryption::Type::Gcm);
    let (opus, red) = rx_payload_types(&bob);
    assert!(opus > 20 && red == 0, "{opus} Opus and {red} RED packets");
}

/// The same with plain audio: the subscriber connection may carry it in RED.
#[test]
fn plain_audio_may_reach_a_subscriber_in_red() {
    let bob = alice_audio_to_bob(lk::encryption::Type::None);
    let (_, red) = rx_payload_types(&bob);
    assert!(red > 20, "{red} RED packets");
}

/// Counts the Opus and the RED packets `peer` received.
fn rx_payload_types(peer: &Peer) -> (usize, usize) {
    let (mut opus, mut red) = (0, 0);
    for e in &peer.events {
        if let Event::RawPacket(p) = e {
            if let str0m::rtp::RawPacket::RtpRx(header, _) = p.as_ref() {
                let params = peer.rtc.codec_config().find(|p| {
                    p.pt() == header.payload_type || p.red() == Some(header.payload_type)
                });
                match params {
                    Some(p) if p.red() == Some(header.payload_type) => red += 1,
                    Some(p) if p.spec().codec == str0m::format::Codec::Opus => opus += 1,
                    _ => {}
                }
            }
        }
    }
    (opus, red)
}

/// alice publishes one audio track with `encryption` and sends 20 ms frames; bob (RED-capable)
/// subscribes. Checks the signalling order and what bob receives; returns bob's peer.
/// alice (session 1) and bob (2) joined, their subscriber offers answered; alice's
/// publisher connection has offered one audio track (`mic`), and the engine's answer is
/// applied. `msgs` holds every message so far.
struct AudioCall {
    s: Sfu,
    now: Instant,
    alice: Peer,
    bob: Peer,
    alice_pub: Peer,
    mid: str0m::media::Mid,
    msgs: Vec<(u64, Msg)>,
    /// Frames alice wrote.
    sent: u64,
    /// Whether bob answered the re-offer that carries alice's track.
    answered: bool,
}

impl AudioCall {
    /// 10 ms of the call: a tick of the virtual network (`msgs` holds its messages), bob
    /// answers the re-offer with alice's track, alice writes a frame once she can.
    fn step(&mut self) {
        self.now += Duration::from_millis(10);
        tick_dropping(
            &mut self.s,
            &mut [&mut self.alice, &mut self.bob, &mut self.alice_pub],
            self.now,
            &mut self.msgs,
            &mut |_, _| false,
        );
        if !self.answered {
            if let Some(o) = self.msgs.iter().find_map(|(id, m)| match m {
                Msg::Offer(o) if *id == 2 && o.sdp.contains("m=audio") => Some(o.clone()),
                _ => None,
            }) {
                let a = answer_offer(&mut self.bob, &o);
                request(&mut self.s, self.now, 2, a);
                self.answered = true;
            }
        }
        if write_frame(&mut self.alice_pub.rtc, self.mid, self.now, self.sent) {
            self.sent += 1;
        }
    }
}

fn audio_call(encryption: lk::encryption::Type) -> AudioCall {
    let now = Instant::now();
    let mut s = sfu(now);
    let mut alice = Peer::new(now, "10.0.0.1:5000");
    let mut bob = Peer::red_capable(now, "10.0.0.2:5000");
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
    let lk::signal_request::Message::AddTrack(mut add) = add_track("mic", false) else {
        unreachable!("add_track builds an AddTrack request")
    };
    add.encryption = encryption as i32;
    request(&mut s, now, 1, lk::signal_request::Message::AddTrack(add));
    let mut api = alice_pub.rtc.sdp_api();
    let mid = api.add_media(
        MediaKind::Audio,
        Direction::SendOnly,
        Some("s".into()),
        Some("mic".into()),
        None,
    );
    let (offer, pending) = api.apply().unwrap();
    request(&mut s, now, 1, offer_message(offer.to_sdp_string(), 1));
    pump(
        &mut s,
        &mut [&mut alice, &mut bob, &mut alice_pub],
        now,
        &mut msgs,
    );
    let answer = answer_for(&msgs, 1).unwrap();
    alice_pub
        .rtc
        .sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer.sdp).unwrap())
        .unwrap();
    AudioCall {
        s,
        now,
        alice,
        bob,
        alice_pub,
        mid,
        msgs,
        sent: 0,
        answered: false,
    }
}

/// alice's audio as bob receives it (RED-capable), after checks of the signalling order.
fn alice_audio_to_bob(encryption: lk::encryption::Type) -> Peer {
    let mut c = audio_call(encryption);
    let mut all: Vec<(u64, Msg)> = c.msgs.clone();
    for _ in 0..300 {
        c.step();
        all.extend(c.msgs.iter().map(|(id, m)| (*id, m.clone())));
    }
    let AudioCall { s, bob, sent, .. } = c;
    let offer_pos = all
        .iter()
        .position(|(id, m)| *id == 2 && matches!(m, Msg::Offer(o) if o.sdp.contains("m=audio")));
    let update_pos = msgs_update_with_track_pos(&all, 2);
    let alice_sid = s.participants(&"room".into())[0].sid.clone();
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
    // Outgoing timestamps advance by exactly one frame each time; payloads are untouched.
    let ts: Vec<u64> = received.iter().map(|d| d.time.numer()).collect();
    assert!(ts.windows(2).all(|w| w[1] - w[0] == 960), "{ts:?}");
    assert!(received.iter().all(|d| d.data[..] == [0x78u8; 60]));
    bob
}

/// Audio frames bob's connection decoded so far.
fn media_received(peer: &Peer) -> usize {
    peer.events
        .iter()
        .filter(|e| matches!(e, Event::MediaData(_)))
        .count()
}

/// Writes the `n`th 20 ms Opus-sized frame on `rtc`'s published `mid`, if it can already.
pub(super) fn write_frame(rtc: &mut Rtc, mid: str0m::media::Mid, now: Instant, n: u64) -> bool {
    let Some(w) = rtc.writer(mid) else {
        return false;
    };
    let Some(pt) = w.payload_params().next().map(|p| p.pt()) else {
        return false;
    };
    let t = str0m::media::MediaTime::new(
        1_000_000 + n * 960,
        str0m::media::Frequency::FORTY_EIGHT_KHZ,
    );
    w.write(pt, now, t, vec![0x78u8; 60]).is_ok()
}

/// Datagrams handed to the engine in a row (what the media loop reads when several wait):
/// the publisher's connection is polled for each, the subscriber's once for all of them,
/// and every packet still reaches the subscriber.
#[test]
fn datagrams_handed_in_a_row_poll_each_subscriber_once() {
    let mut c = audio_call(lk::encryption::Type::None);
    for _ in 0..300 {
        c.step();
        if media_received(&c.bob) >= 5 {
            break;
        }
    }
    let AudioCall {
        mut s,
        mut now,
        mut bob,
        mut alice_pub,
        mid,
        mut sent,
        ..
    } = c;
    assert!(
        media_received(&bob) >= 5,
        "bob receives alice before the batch"
    );

    // Five frames, 2 ms apart; their datagrams wait (the engine is busy) and are handed in
    // in a row before it is polled.
    let mut datagrams = Vec::new();
    for _ in 0..5 {
        now += Duration::from_millis(2);
        assert!(write_frame(&mut alice_pub.rtc, mid, now, sent));
        sent += 1;
        alice_pub.rtc.handle_input(Input::Timeout(now)).unwrap();
        loop {
            match alice_pub.rtc.poll_output().unwrap() {
                RtcOutput::Timeout(_) => break,
                RtcOutput::Transmit(t) => datagrams.push(t),
                RtcOutput::Event(e) => alice_pub.events.push(e),
            }
        }
    }
    assert!(datagrams.len() >= 5, "{} datagrams", datagrams.len());
    let polls = s.stats().participant_polls;
    let before = media_received(&bob);
    for t in &datagrams {
        s.handle_datagram(now, alice_pub.addr, t.destination, &t.contents);
    }
    // What the media loop does: outputs until the timeout, then the timers when due (bob's
    // connection paces what it sends: 50 ms of them).
    let mut to_bob = 0;
    let mut batch_polls = None;
    let end = now + Duration::from_millis(50);
    for _ in 0..1000 {
        let due = loop {
            match s.poll_output() {
                Output::Timeout(t) => break t,
                Output::Transmit(t) if t.destination == bob.addr => {
                    let r =
                        Receive::new(Protocol::Udp, t.source, t.destination, &t.contents).unwrap();
                    bob.rtc.handle_input(Input::Receive(now, r)).unwrap();
                    to_bob += 1;
                }
                _ => {}
            }
        };
        batch_polls.get_or_insert(s.stats().participant_polls - polls);
        if due > end {
            break;
        }
        now = now.max(due);
        s.handle_timeout(now);
    }
    assert_eq!(
        batch_polls,
        Some(datagrams.len() as u64 + 1),
        "alice once per datagram, bob once ({} datagrams)",
        datagrams.len()
    );
    assert!(to_bob >= 5, "{to_bob} datagrams to bob");
    loop {
        match bob.rtc.poll_output().unwrap() {
            RtcOutput::Timeout(_) => break,
            RtcOutput::Event(e) => bob.events.push(e),
            RtcOutput::Transmit(_) => {}
        }
    }
    // (A frame written before the batch may still have been on its way.)
    let got = media_received(&bob) - before;
    assert!((5..=6).contains(&got), "{got} frames reached bob of the 5");
}

fn msgs_update_with_track_pos(all: &[(u64, Msg)], to: u64) -> Option<usize> {
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
        s.participant_count(&"room".into()),
        1,
        "the participant is unharmed"
    );
}

/// The ICE ufrag and password of the subscriber offer sent to session `to`.
fn offered_ice_credentials(msgs: &[(u64, Msg)], to: u64) -> (String, String) {
    let sdp = msgs
        .iter()
        .find_map(|(id, m)| match m {
            Msg::Offer(o) if *id == to => Some(o.sdp.clone()),
            _ => None,
        })
        .unwrap();
    let attr = |name: &str| {
        sdp.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap()
    };
    (attr("a=ice-ufrag:"), attr("a=ice-pwd:"))
}

/// A STUN binding request (RFC 8489) for `username` (`local:remote`) with PRIORITY and a
/// MESSAGE-INTEGRITY keyed with `password` (HMAC-SHA1 over the message up to that attribute,
/// its length field covering the attribute, RFC 8489 §14.5).
fn binding_request(username: &str, password: &str) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&[0x00, 0x06]);
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff]);
    let mut packet = vec![0x00, 0x01];
    packet.extend_from_slice(&((attrs.len() + 24) as u16).to_be_bytes());
    packet.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    packet.extend_from_slice(&[5; 12]);
    packet.extend_from_slice(&attrs);
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(password.as_bytes()).unwrap();
    mac.update(&packet);
    let tag = mac.finalize().into_bytes();
    packet.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    packet.extend_from_slice(&tag);
    packet
}

/// STUN carrying a live connection's ufrag but a MESSAGE-INTEGRITY not made with its ICE
/// password teaches the engine nothing: later media from that address is dropped as from an
/// unknown peer. The same request with the right password does teach it the address.
#[test]
fn stun_with_a_wrong_message_integrity_teaches_no_address() {
    let now = Instant::now();
    let mut s = sfu(now);
    join(&mut s, now, 1, "alice");
    let (msgs, _, _) = drain(&mut s);
    let (ufrag, pwd) = offered_ice_credentials(&msgs, 1);
    let server: SocketAddr = "127.0.0.1:7882".parse().unwrap();
    let evil: SocketAddr = "10.9.9.9:5000".parse().unwrap();
    let good: SocketAddr = "10.9.9.10:5000".parse().unwrap();
    let user = format!("{ufrag}:peer");
    let rtp = [0x80u8, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 7, 1, 2, 3, 4];

    let forged = binding_request(&user, "not-the-ice-password-at-all");
    s.handle_datagram(now, evil, server, &forged);
    drain(&mut s);
    let after_forged = s.stats();
    assert_eq!(after_forged.rejected_by_peer, 1, "{after_forged:?}");
    assert_eq!(after_forged.dropped_unknown_peer, 0, "{after_forged:?}");
    s.handle_datagram(now, evil, server, &rtp);
    drain(&mut s);
    let st = s.stats();
    assert_eq!(
        st.dropped_unknown_peer, 1,
        "media from the forger's address is from an unknown peer: {st:?}"
    );
    assert_eq!(st.rejected_by_peer, 1, "{st:?}");

    let genuine = binding_request(&user, &pwd);
    s.handle_datagram(now, good, server, &genuine);
    drain(&mut s);
    s.handle_datagram(now, good, server, &rtp);
    drain(&mut s);
    let after = s.stats();
    assert_eq!(
        after.dropped_unknown_peer, 1,
        "an address that passed the integrity check is known: {after:?}"
    );
    // The forger's address stays unknown.
    s.handle_datagram(now, evil, server, &rtp);
    assert_eq!(s.stats().dropped_unknown_peer, 2);
    assert_eq!(s.participant_count(&"room".into()), 1);
}

/// RED stays off end-to-end encrypted audio and off tracks that disable it: a browser builds
/// RED before it encrypts, so such a payload could not be split here. Plain audio keeps it.
#[test]
fn encrypted_or_red_less_audio_is_answered_without_red() {
    let none = lk::encryption::Type::None as i32;
    let gcm = lk::encryption::Type::Gcm as i32;
    for (encryption, disable_red, want_red) in [
        (gcm, false, false),
        (none, true, false),
        (none, false, true),
    ] {
        let now = Instant::now();
        let mut s = sfu(now);
        join(&mut s, now, 1, "alice");
        drain(&mut s);
        let lk::signal_request::Message::AddTrack(mut add) = add_track("mic", false) else {
            unreachable!("add_track builds an AddTrack request")
        };
        add.encryption = encryption;
        add.disable_red = disable_red;
        request(&mut s, now, 1, lk::signal_request::Message::AddTrack(add));
        // A client that offers Opus with RED, as browsers do.
        let mut client = Rtc::builder()
            .clear_codecs()
            .enable_opus(true, true)
            .build(now);
        let mut api = client.sdp_api();
        api.add_media(
            MediaKind::Audio,
            Direction::SendOnly,
            Some("stream".into()),
            Some("mic".into()),
            None,
        );
        let (offer, pending) = api.apply().unwrap();
        let offer = offer.to_sdp_string();
        assert!(
            offer.contains("red/48000"),
            "the client offers RED: {offer}"
        );
        request(&mut s, now, 1, offer_message(offer, 1));
        let (msgs, _, _) = drain(&mut s);
        let answer = answer_for(&msgs, 1)
            .expect("the publisher offer is answered")
            .sdp;
        assert_eq!(
            answer.contains("red/48000"),
            want_red,
            "encryption {encryption}, disable_red {disable_red}: {answer}"
        );
        client
            .sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
            .expect("the client accepts the answer");
    }
}

/// Once a participant is connected, its connect deadline no longer counts: the engine must not
/// ask to be woken in the past (which made the net loop spin on a core for every call older
/// than the deadline).
#[test]
fn a_connected_participant_does_not_keep_the_loop_awake() {
    let mut now = Instant::now();
    let mut s = sfu(now);
    let mut alice = Peer::new(now, "10.0.0.1:5000");
    let mut msgs = Vec::new();
    join(&mut s, now, 1, "alice");
    pump(&mut s, &mut [&mut alice], now, &mut msgs);
    let offer = msgs
        .iter()
        .find_map(|(sid, m)| match m {
            Msg::Offer(o) if *sid == 1 => Some(o.clone()),
            _ => None,
        })
        .expect("subscriber offer");
    let answer = answer_offer(&mut alice, &offer);
    request(&mut s, now, 1, answer);
    let start = now;
    while now < start + CONNECT_DEADLINE + Duration::from_secs(5) {
        now += Duration::from_millis(100);
        s.handle_timeout(now);
        let _ = alice.rtc.handle_input(Input::Timeout(now));
        pump(&mut s, &mut [&mut alice], now, &mut msgs);
    }
    assert_eq!(
        s.participant_count(&"room".into()),
        1,
        "alice connected and stayed past the connect deadline"
    );
    s.handle_timeout(now);
    let next = loop {
        if let Output::Timeout(t) = s.poll_output() {
            break t;
        }
    };
    assert!(
        next > now,
        "the engine asks to be woken {:?} in the past",
        now - next
    );
}

/// A participant whose connection never comes up is removed at the connect deadline, and the
/// engine's own deadlines lead there: driving time only by the `Output::Timeout`s it returns
/// (as the net loop does) must reach it, the engine never asking to be woken later than that.
#[test]
fn a_participant_that_never_connects_is_removed_at_the_connect_deadline() {
    let mut now = Instant::now();
    let mut s = sfu(now);
    join(&mut s, now, 1, "alice");
    let start = now;
    let deadline = start + CONNECT_DEADLINE;
    let mut wakeups = 0;
    while s.participant_count(&"room".into()) == 1 && wakeups < 10_000 {
        let next = loop {
            if let Output::Timeout(t) = s.poll_output() {
                break t;
            }
        };
        assert!(
            next <= deadline,
            "asked to be woken {:?} after the connect deadline",
            next - deadline
        );
        now = now.max(next);
        s.handle_timeout(now);
        wakeups += 1;
    }
    assert_eq!(s.participant_count(&"room".into()), 0, "{wakeups} wake-ups");
    assert!(now >= deadline, "removed {:?} early", deadline - now);
}

/// v0 resume: bob (two peer connections, subscribing) loses his signalling connection and
/// stays; his client resumes with his SID and gets a `ReconnectResponse`, then a subscriber
/// offer of the engine's that restarts ICE with credentials of its own (its loop's ufrag
/// prefix, on the candidate lines too). Checks with the new ufrag are routed to his
/// connection from the offer on; his answer puts the credentials in use and his ICE
/// completes again; the old ufrag is forgotten.
#[test]
fn a_v0_resume_restarts_ice_on_the_subscriber_connection() {
    let mut now = Instant::now();
    let mut s = Sfu::new(
        SfuConfig {
            candidates: vec!["127.0.0.1:7882".parse().unwrap()],
            seed: Some(43),
            resume_window: Some(Duration::from_secs(30)),
            ufrag_prefix: "0a".into(),
            ..Default::default()
        },
        now,
    );
    let mut bob = Peer::new(now, "10.0.0.2:5000");
    let mut msgs = Vec::new();
    join(&mut s, now, 2, "bob");
    pump(&mut s, &mut [&mut bob], now, &mut msgs);
    let offer_to_bob = |msgs: &[(u64, Msg)]| {
        msgs.iter().find_map(|(id, m)| match m {
            Msg::Offer(o) if *id == 2 => Some(o.clone()),
            _ => None,
        })
    };
    let first = offer_to_bob(&msgs).expect("bob's subscriber offer");
    let a = answer_offer(&mut bob, &first);
    request(&mut s, now, 2, a);
    let run = |s: &mut Sfu, bob: &mut Peer, now: &mut Instant| {
        for _ in 0..200 {
            *now += Duration::from_millis(10);
            tick_dropping(s, &mut [bob], *now, &mut Vec::new(), &mut |_, _| false);
        }
    };
    run(&mut s, &mut bob, &mut now);
    let completed = |bob: &Peer| {
        bob.events.iter().any(|e| {
            matches!(
                e,
                Event::IceConnectionStateChange(str0m::IceConnectionState::Completed)
            )
        })
    };
    assert!(completed(&bob), "bob connected: {:?}", bob.events);
    let old_ufrag = ice_ufrag(&first.sdp);
    let sid = s.participants(&"room".into())[0].sid.clone();

    s.handle_command(
        now,
        Command::Disconnect {
            session: SessionId(2),
            epoch: Some(0),
            reason: lk::DisconnectReason::SignalClose,
        },
    );
    let (_, events, closes) = drain(&mut s);
    assert_eq!(closes, 1, "the lost connection's queue ends");
    assert!(events.is_empty(), "bob stays: {events:?}");
    let resumed = s.resume(now, &"room".into(), &"bob".into(), &sid, Vec::new());
    assert_eq!(resumed, Some((SessionId(2), 1)));
    let (msgs, _, _) = drain(&mut s);
    assert!(
        matches!(msgs.first(), Some((2, Msg::Reconnect(_)))),
        "{msgs:?}"
    );
    let restart = offer_to_bob(&msgs).expect("a subscriber offer restarting ICE");
    let new_ufrag = ice_ufrag(&restart.sdp);
    assert!(
        new_ufrag.starts_with("0a") && new_ufrag != old_ufrag,
        "{new_ufrag}"
    );
    assert!(restart
        .sdp
        .lines()
        .filter(|l| l.starts_with("a=candidate"))
        .all(|l| l.ends_with(&format!(" ufrag {new_ufrag}"))));
    assert!(
        s.by_ufrag.contains_key(&new_ufrag),
        "routed from the offer on"
    );

    bob.events.clear();
    let a = answer_offer(&mut bob, &restart);
    request(&mut s, now, 2, a);
    run(&mut s, &mut bob, &mut now);
    assert!(completed(&bob), "ICE completes again: {:?}", bob.events);
    assert!(
        !s.by_ufrag.contains_key(&old_ufrag),
        "the old ufrag is forgotten"
    );
    assert_eq!(
        s.participants(&"room".into())[0].sid,
        sid,
        "the same participant"
    );
}

/// The `a=ice-ufrag` of an SDP.
pub(super) fn ice_ufrag(sdp: &str) -> String {
    sdp.lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .expect("an ice-ufrag")
        .to_owned()
}
