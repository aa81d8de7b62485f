//! Packet forwarding through the virtual network: what a subscriber sees on the wire when
//! the source of its stream changes (simulcast layer switch).

use super::tests::{
    answer_for, answer_offer, join, join_command, publish_permission, pump, request, sfu,
    simulcast_camera, simulcast_offer, tick_dropping, Peer,
};
use super::*;
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::MediaTime;
use str0m::rtp::{RawPacket, RtpHeader, Vp8Descriptor};
use str0m::Event;

/// The simulcast layers alice sends: rid, the tag byte ending each of its frames, its RTP
/// timestamp base (each layer its own, as a browser's) and the frame its keyframes fall on.
const LAYERS: [(&str, u8, u64, u64); 3] = [
    ("q", 1, 1_000, 0),
    ("h", 2, 700_000, 10),
    ("f", 3, 9_000_000, 20),
];

/// The video RTP packets `peer` received (header, payload), in order.
fn video_packets(peer: &Peer) -> Vec<(RtpHeader, Vec<u8>)> {
    peer.events
        .iter()
        .filter_map(|e| match e {
            Event::RawPacket(p) => match p.as_ref() {
                RawPacket::RtpRx(h, payload) => Some((h.clone(), payload.clone())),
                _ => None,
            },
            _ => None,
        })
        .filter(|(h, _)| {
            peer.rtc
                .codec_config()
                .find(|p| p.pt() == h.payload_type)
                .is_some_and(|p| p.spec().codec == Codec::Vp8)
        })
        .collect()
}

fn quality(s: &mut Sfu, now: Instant, session: u64, track: &str, quality: lk::VideoQuality) {
    request(
        s,
        now,
        session,
        lk::signal_request::Message::TrackSetting(lk::UpdateTrackSettings {
            track_sids: vec![track.into()],
            quality: quality as i32,
            ..Default::default()
        }),
    );
}

/// alice publishes VP8 in three simulcast layers (one packet per frame, each layer with its
/// own timestamps, a keyframe every 30 frames at a different phase per layer); bob asks for
/// HIGH, then LOW, then HIGH again. `drop` sees every datagram to a peer (destination,
/// bytes) and may lose it. Returns bob (who reports every RTP packet he received) and the
/// frames alice sent.
fn simulcast_call(drop: impl FnMut(SocketAddr, &[u8]) -> bool) -> (Peer, u64) {
    simulcast_call_to(CascadeRole::None, drop).0
}

/// [`simulcast_call`] with bob in `role`; also returns bob's first subscriber offer and what
/// the engine says it relayed ([`Sfu::relayed`]) at the end.
fn simulcast_call_to(
    role: CascadeRole,
    mut drop: impl FnMut(SocketAddr, &[u8]) -> bool,
) -> ((Peer, u64), String, HashMap<String, Vec<RelayedTrack>>) {
    let mut now = Instant::now();
    let mut s = sfu(now);
    let mut alice = Peer::new(now, "10.0.0.1:5000");
    let config = Rtc::builder().enable_raw_packets(true);
    let mut bob = Peer::with(now, "10.0.0.2:5000", config);
    let mut alice_pub = Peer::new(now, "10.0.0.1:5001");
    let mut msgs = Vec::new();
    join(&mut s, now, 1, "alice");
    let Command::Join(mut bob_join) = join_command(2, "room", "bob", publish_permission(), false)
    else {
        unreachable!("join_command builds a join")
    };
    bob_join.cascade = role;
    s.handle_command(now, Command::Join(bob_join));
    pump(&mut s, &mut [&mut alice, &mut bob], now, &mut msgs);
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
    let add = simulcast_camera();
    request(&mut s, now, 1, lk::signal_request::Message::AddTrack(add));
    let rids = LAYERS.map(|(rid, ..)| rid);
    let (mid, pending, offer) = simulcast_offer(&mut alice_pub, &rids);
    request(&mut s, now, 1, offer);
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

    let mut frame = 0u64;
    let mut answered = 0;
    let mut bob_offer = None;
    for tick in 0..900 {
        now += Duration::from_millis(10);
        tick_dropping(
            &mut s,
            &mut [&mut alice, &mut bob, &mut alice_pub],
            now,
            &mut msgs,
            &mut drop,
        );
        for (id, m) in &msgs {
            match m {
                Msg::Offer(o) if *id == 2 && o.id > answered => {
                    answered = o.id;
                    bob_offer.get_or_insert_with(|| o.sdp.clone());
                    let a = answer_offer(&mut bob, o);
                    request(&mut s, now, 2, a);
                }
                _ => {}
            }
        }
        let wanted = match tick {
            400 => Some(lk::VideoQuality::Low),
            650 => Some(lk::VideoQuality::High),
            _ => None,
        };
        if let Some(q) = wanted {
            let room = s.participants(&"room".into());
            let alice = room.iter().find(|p| p.identity == "alice").unwrap();
            let track = alice.tracks[0].sid.clone();
            quality(&mut s, now, 2, &track, q);
        }
        // About 30 frames a second, on every layer.
        if tick % 3 != 0 {
            continue;
        }
        let mut wrote = false;
        for (rid, tag, base, phase) in LAYERS {
            let Some(w) = alice_pub.rtc.writer(mid) else {
                continue;
            };
            let Some(pt) = w
                .payload_params()
                .find(|p| p.spec().codec == Codec::Vp8)
                .map(|p| p.pt())
            else {
                continue;
            };
            let key = frame % 30 == phase;
            let mut data = vec![if key { 0x10 } else { 0x11 }];
            data.extend_from_slice(&[0x42; 80]);
            data.push(tag);
            let t = MediaTime::new(base + frame * 3000, str0m::media::Frequency::NINETY_KHZ);
            wrote |= w.rid(rid.into()).write(pt, now, t, data).is_ok();
        }
        if wrote {
            frame += 1;
        }
    }

    let relayed = s.relayed(&"room".into());
    ((bob, frame), bob_offer.unwrap_or_default(), relayed)
}

/// The simulcast call, lossless: on the wire bob sees one SSRC whose sequence numbers
/// step by exactly one, whose timestamps never jump, and whose layer changes only ever
/// happen on a packet that starts a keyframe.
#[test]
fn a_simulcast_layer_switch_is_seamless_on_the_wire() {
    let (bob, frame) = simulcast_call(|_, _| false);
    let packets = video_packets(&bob);
    assert!(frame > 250, "alice sent {frame} frames");
    assert!(packets.len() > 150, "bob received {}", packets.len());
    let ssrc = packets[0].0.ssrc;
    assert!(packets.iter().all(|(h, _)| h.ssrc == ssrc), "one SSRC");
    let tags: Vec<u8> = packets.iter().map(|(_, p)| *p.last().unwrap()).collect();
    for w in packets.windows(2) {
        let (a, b) = (&w[0].0, &w[1].0);
        assert_eq!(
            b.sequence_number,
            a.sequence_number.wrapping_add(1),
            "sequence numbers step by one"
        );
        let step = b.timestamp.wrapping_sub(a.timestamp);
        assert!((1..=6000).contains(&step), "timestamp step {step}");
        // (str0m's packetiser sends no picture ids: their rewriting is unit-tested in
        // `packet.rs`.)
        let pid = |p: &[u8]| Vp8Descriptor::parse(p).unwrap().picture_id();
        if let (Some(pa), Some(pb)) = (pid(&w[0].1), pid(&w[1].1)) {
            assert_eq!(pb, (pa + 1) & 0x7fff, "picture ids step by one");
        }
    }
    let starts_key = |p: &[u8]| Vp8Descriptor::parse(p).unwrap().starts_keyframe(p);
    assert!(starts_key(&packets[0].1), "the stream starts at a keyframe");
    let mut switches = Vec::new();
    for (i, w) in tags.windows(2).enumerate() {
        if w[0] != w[1] {
            assert!(
                starts_key(&packets[i + 1].1),
                "switch {} → {} at a keyframe",
                w[0],
                w[1]
            );
            switches.push((w[0], w[1]));
        }
    }
    // The first layer alive is the first forwarded; HIGH once it is alive, then LOW and
    // HIGH again as asked.
    assert_eq!(
        switches,
        vec![(1, 3), (3, 1), (1, 3)],
        "first {}, then HIGH, LOW, HIGH",
        tags[0]
    );
}

/// A video packet lost on its way to bob: his connection asks for it again (NACK) and the
/// SFU's send buffer answers with an RTX resend of exactly that packet (the engine writes
/// packets nackable; str0m keeps them).
#[test]
fn a_lost_packet_is_resent_from_the_send_buffer() {
    let bob_addr: SocketAddr = "10.0.0.2:5000".parse().unwrap();
    let mut seen = 0;
    let mut dropped = None;
    let mut media_pt = None;
    let (bob, _) = simulcast_call(|to, d| {
        // SRTP keeps the RTP header in the clear: version 2, payload type, sequence number.
        let rtp = d.len() > 12 && d[0] >> 6 == 2 && !(72..=79).contains(&(d[1] & 0x7f));
        if to != bob_addr || !rtp || dropped.is_some() {
            return false;
        }
        // Only media: the first RTP packet bob gets is VP8 (alice sends nothing else); the
        // estimator's probes and padding go out on the RTX payload type and are never resent.
        let pt = d[1] & 0x7f;
        if *media_pt.get_or_insert(pt) != pt {
            return false;
        }
        seen += 1;
        if seen == 150 {
            dropped = Some(u16::from_be_bytes([d[2], d[3]]));
            return true;
        }
        false
    });
    let dropped = dropped.expect("a packet to bob was dropped");
    let rtx_pt = bob
        .rtc
        .codec_config()
        .find(|p| p.spec().codec == Codec::Vp8)
        .and_then(|p| p.resend())
        .expect("VP8 with RTX negotiated");
    let resent: Vec<u16> = bob
        .events
        .iter()
        .filter_map(|e| match e {
            Event::RawPacket(p) => match p.as_ref() {
                RawPacket::RtpRx(h, payload) if h.payload_type == rtx_pt && payload.len() > 2 => {
                    Some(u16::from_be_bytes([payload[0], payload[1]]))
                }
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert!(
        resent.contains(&dropped),
        "RTX resends {resent:?}, lost {dropped}"
    );
}

/// The same call to a peer Conclave's media relay: every layer goes out at once, each on its
/// own stream (`a=simulcast:send`, one SSRC and rid each), so the peer still chooses per
/// subscriber of its own; layers above the quality the relay asks for (the peer's dynacast:
/// LOW from tick 400, HIGH again from 650) stop and restart. Each stream starts, and
/// restarts, at a keyframe of its layer and its sequence numbers step by one.
#[test]
fn a_cascade_relay_gets_every_simulcast_layer_on_its_own_stream() {
    let ((bob, frame), offer, relayed) = simulcast_call_to(CascadeRole::Relay, |_, _| false);
    let video = offer
        .split("m=")
        .find(|m| m.starts_with("video"))
        .expect("a video section in the relay's offer");
    assert!(video.contains("a=simulcast:send q;h;f"), "{video}");
    let packets = video_packets(&bob);
    assert!(frame > 250, "alice sent {frame} frames");
    // Each stream's packets, with their place among all the packets bob received.
    type Stream<'a> = (u32, Vec<(usize, &'a (RtpHeader, Vec<u8>))>);
    let mut streams: Vec<Stream> = Vec::new();
    for (i, p) in packets.iter().enumerate() {
        match streams.iter_mut().find(|(ssrc, _)| *ssrc == *p.0.ssrc) {
            Some((_, v)) => v.push((i, p)),
            None => streams.push((*p.0.ssrc, vec![(i, p)])),
        }
    }
    let starts_key = |p: &[u8]| Vp8Descriptor::parse(p).unwrap().starts_keyframe(p);
    let mut seen = Vec::new();
    for (ssrc, stream) in &streams {
        let tag = *stream[0].1 .1.last().unwrap();
        let (rid, ..) = LAYERS
            .iter()
            .find(|(_, t, ..)| *t == tag)
            .expect("a layer's tag");
        assert!(
            stream.iter().all(|(_, (_, p))| *p.last().unwrap() == tag),
            "stream {ssrc} carries layer {rid} only"
        );
        assert!(
            stream
                .iter()
                .all(|(_, (h, _))| h.ext_vals.rid.as_deref() == Some(*rid)),
            "stream {ssrc} is named {rid}"
        );
        assert!(
            starts_key(&stream[0].1 .1),
            "layer {rid} starts at a keyframe"
        );
        for w in stream.windows(2) {
            assert_eq!(
                w[1].1 .0.sequence_number,
                w[0].1 .0.sequence_number.wrapping_add(1),
                "layer {rid}: sequence numbers step by one"
            );
        }
        // Three layers interleave: a layer missing for more than a few packets stopped. Only
        // the layers above LOW stop (once), and resume at a keyframe.
        let stops: Vec<usize> = stream
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[1].0 - w[0].0 > 20)
            .map(|(k, _)| k + 1)
            .collect();
        if *rid == "q" {
            assert!(stops.is_empty(), "the low layer never stops: {stops:?}");
            // Alice's keyframes fall 0, 10 and 20 frames into each 30: at most 30 frames wait.
            assert!(
                stream.len() as u64 + 30 >= frame,
                "layer q: {} of {frame} frames",
                stream.len()
            );
        } else {
            assert_eq!(
                stops.len(),
                1,
                "layer {rid} stops once (LOW asked): {stops:?}"
            );
            assert!(
                starts_key(&stream[stops[0]].1 .1),
                "layer {rid} resumes at a keyframe"
            );
            // Stopped from tick 400 to 650: about 83 of alice's frames, and a keyframe's wait.
            let missing = frame - stream.len() as u64;
            assert!(
                (60..=150).contains(&missing),
                "layer {rid}: {missing} of {frame} frames not relayed"
            );
        }
        seen.push(*rid);
    }
    seen.sort();
    assert_eq!(seen, ["f", "h", "q"], "every layer, each on one stream");
    // The operator's view: the layers, and the rate (82-byte payloads, 33⅓ frames a second
    // on each of three layers: 65.6 kbit/s).
    let video = &relayed["bob"][0];
    assert_eq!(video.layers, ["q", "h", "f"]);
    assert!(
        (50_000..80_000).contains(&video.bitrate),
        "relayed at {} bit/s",
        video.bitrate
    );
}
