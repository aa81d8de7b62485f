//! SDP negotiation on both peer connections: answering publisher offers, the subscriber
//! connection offers (one in flight at a time), trickle, and which tracks each subscriber gets.
//! A single peer connection (v1) is answered and renegotiated by `engine/single.rs`.

use std::collections::HashMap;
use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::channel::{ChannelConfig, Reliability};
use str0m::media::{Direction, MediaKind, Simulcast, SimulcastLayer};
use str0m::Candidate;

use crate::sfu::ids::TrackSid;

use super::downtrack::{DownState, DownTrack};
use super::resume::swap_ice_credentials;
use super::{CascadeRole, Output, PcKind, SessionId, Sfu, SfuEvent};

impl Sfu {
    /// Creates a v0 participant's publisher connection at its first publisher offer (see
    /// `Transport::Dual`) and routes its STUN.
    fn ensure_publisher_pc(&mut self, now: Instant, session: SessionId) {
        if !self
            .participant_mut(session)
            .is_some_and(|p| p.transport.lacks_publisher())
        {
            return;
        }
        let role = self
            .participant_mut(session)
            .map(|p| p.cascade)
            .unwrap_or_default();
        let pc = match role {
            super::CascadeRole::Mirror(socket) => self.new_pc_with(now, false, false, socket),
            _ => self.new_pc(now, false),
        };
        let ufrag = pc.ufrag.clone();
        if let Some(p) = self.participant_mut(session) {
            p.transport.set_publisher(pc);
            self.by_ufrag.insert(ufrag, (session, PcKind::Publisher));
        }
    }

    pub(super) fn publisher_offer(
        &mut self,
        now: Instant,
        session: SessionId,
        sd: lk::SessionDescription,
    ) {
        self.ensure_publisher_pc(now, session);
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        // Audio tracks announced without RED (every E2EE track is): answer them without it.
        let no_red: Vec<&str> = p
            .tracks
            .iter()
            .filter(|t| t.kind == MediaKind::Audio && !t.red_allowed())
            .map(|t| t.cid.as_str())
            .collect();
        let sdp = super::red::strip_red(&sd.sdp, &no_red);
        if p.transport.is_single() {
            self.single_offer(now, session, &sd, &sdp);
            self.drain(now, session);
            return;
        }
        let offer = match SdpOffer::from_sdp_string(&sdp) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(%session, error = %e, "unparseable publisher offer");
                return;
            }
        };
        let Some(pc) = p.transport.pub_pc_mut() else {
            return;
        };
        match pc.rtc.sdp_api().accept_offer(offer) {
            Ok(answer) => {
                if let super::CascadeRole::Mirror(socket) = p.cascade {
                    self.learn_offered_candidates(session, socket, &sdp);
                }
                let text = super::red::only_offered_formats(&answer.to_sdp_string(), &sdp);
                let text = self.routable_ice_credentials(session, PcKind::Publisher, text);
                let answer = lk::SessionDescription {
                    r#type: "answer".into(),
                    sdp: text,
                    id: sd.id,
                    mid_to_track_id: HashMap::new(),
                };
                self.signal(session, Msg::Answer(answer));
            }
            Err(e) => tracing::warn!(%session, error = %e, "publisher offer refused"),
        }
        self.drain(now, session);
    }

    /// A cascade mirror's publisher connection checks the peer's candidates itself (full
    /// ICE): their STUN responses name no ufrag, so the UDP host candidates of the peer's offer
    /// are mapped to the connection now: with its own socket (the net loop binds one), by
    /// that socket and the peer's address; without (one mirror per peer, as in engine tests),
    /// by the peer's address.
    fn learn_offered_candidates(
        &mut self,
        session: SessionId,
        socket: Option<std::net::SocketAddr>,
        sdp: &str,
    ) {
        for addr in offered_udp_candidates(sdp) {
            if let Some(local) = socket {
                // Its own socket, read by this engine's loop: no routing needed.
                self.by_local
                    .insert((local, addr), (session, PcKind::Publisher));
                continue;
            }
            self.by_addr
                .entry((super::IpProto::Udp, addr))
                .or_insert((session, PcKind::Publisher));
        }
    }

    pub(super) fn subscriber_answer(
        &mut self,
        now: Instant,
        session: SessionId,
        sd: lk::SessionDescription,
    ) {
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        if p.transport.is_single() {
            // v1: the SFU never offers, so a client answer means nothing (design §1.6).
            tracing::debug!(%session, "answer on a single peer connection ignored");
            return;
        }
        let Some((pending, id)) = p.sub_pending.take() else {
            tracing::debug!(%session, "answer without a pending offer");
            return;
        };
        if sd.id != 0 && sd.id != id {
            tracing::debug!(%session, got = sd.id, want = id, "stale subscriber answer");
            p.sub_pending = Some((pending, id));
            return;
        }
        let answer = match SdpAnswer::from_sdp_string(&sd.sdp) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%session, error = %e, "unparseable subscriber answer");
                return;
            }
        };
        if let Err(e) = p
            .transport
            .sub_pc_mut()
            .rtc
            .sdp_api()
            .accept_answer(pending, answer)
        {
            tracing::warn!(%session, error = %e, "subscriber answer refused");
            return;
        }
        if let Some(creds) = p.sub_restart.take() {
            self.use_restart_creds(session, PcKind::Subscriber, creds);
        }
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        for d in &mut p.down_tracks {
            if let DownState::Negotiating(m) = d.state {
                // RED or not is the down-track's (`red`), per packet: str0m's send-side RED
                // wrapping is for frame mode only.
                d.state = DownState::Open(m);
            }
        }
        p.down_tracks
            .retain(|d| !matches!(d.state, DownState::NegotiatingStop(_)));
        // v0: a stopped transceiver's mid never carries media again; its rewriting state goes.
        // (v1 keeps it: a single-PC slot is reused, see `OutStream`.)
        let down_tracks = &p.down_tracks;
        p.out_streams
            .retain(|mid, _| down_tracks.iter().any(|d| d.mid() == Some(*mid)));
        // Newly open video needs a keyframe from its publisher.
        let wants: Vec<(SessionId, TrackSid)> = p
            .down_tracks
            .iter()
            .filter(|d| d.kind == MediaKind::Video)
            .map(|d| (d.publisher, d.track_sid.clone()))
            .collect();
        for (publisher, track) in wants {
            self.request_keyframe(now, publisher, &track, None);
        }
        self.renegotiate(now, session);
        self.drain(now, session);
    }

    pub(super) fn trickle(&mut self, session: SessionId, t: lk::TrickleRequest) {
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
            tracing::debug!(%session, "unparseable trickle candidate");
            return;
        };
        if init.candidate.is_empty() {
            return; // end of candidates
        }
        let text = init.candidate.trim_start_matches("a=");
        match Candidate::from_sdp_string(text) {
            Ok(c) => {
                if let Some(pc) = self.participant_mut(session).and_then(|p| p.pc_mut(kind)) {
                    pc.rtc.add_remote_candidate(c);
                }
            }
            Err(e) => tracing::debug!(%session, error = %e, "ignored remote candidate"),
        }
    }

    pub(super) fn subscribe_all_to(
        &mut self,
        now: Instant,
        publisher: SessionId,
        track_sid: &TrackSid,
    ) {
        let Some((room, p)) = self.locate(publisher) else {
            return;
        };
        // Media is bound: the track is published (webhooks).
        if let Some(track) = p.track(track_sid) {
            let event = SfuEvent::TrackPublished {
                room: room.name.clone(),
                room_sid: room.sid.clone(),
                participant: Box::new(p.info_with_tracks()),
                track: Box::new(track.info.clone()),
            };
            self.out.push_back(Output::Event(event));
        }
        let Some(room) = self.room_of(publisher) else {
            return;
        };
        let subscribers: Vec<SessionId> = room
            .participants
            .values()
            .filter(|p| p.session != publisher && p.auto_subscribe)
            .map(|p| p.session)
            .collect();
        for s in subscribers {
            self.subscribe(now, s, track_sid);
            self.renegotiate(now, s);
            self.drain(now, s);
        }
    }

    pub(super) fn subscribe(&mut self, _now: Instant, session: SessionId, track_sid: &TrackSid) {
        let Some(room) = self.room_of_mut(session) else {
            return;
        };
        let relay = room
            .participants
            .get(&session)
            .is_some_and(|p| p.cascade == CascadeRole::Relay);
        let down = match room.track(track_sid) {
            Some((p, t)) if t.is_bound() && p.session != session => {
                DownTrack::new(p.session, p.sid.as_str(), t, relay)
            }
            _ => return,
        };
        let Some(p) = room.participants.get_mut(&session) else {
            return;
        };
        if !p.can_subscribe() || p.receives(track_sid) {
            return;
        }
        p.down_tracks.push(down);
    }

    /// Sends a subscriber offer if changes are waiting and none is in flight; on a single
    /// peer connection, asks the client for an offer instead (see
    /// [`Sfu::single_renegotiate`]).
    pub(super) fn renegotiate(&mut self, _now: Instant, session: SessionId) {
        if self.single_renegotiate(session) {
            return;
        }
        // A v0 resume restarts ICE with this offer, with credentials of ours (routable).
        let restart = match self.participant_mut(session) {
            Some(p) if p.sub_restart_wanted && p.sub_pending.is_none() => {
                Some(self.routable_creds())
            }
            _ => None,
        };
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        if p.sub_pending.is_some() {
            return;
        }
        let id = p.sub_offer_id + 1;
        let mut api = p.transport.sub_pc_mut().rtc.sdp_api();
        let minted = restart.as_ref().map(|_| api.ice_restart(true));
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
        for d in &mut p.down_tracks {
            match d.state {
                DownState::ToOpen => {
                    // A cascade relay's simulcast track: every layer, each its own stream.
                    let simulcast = (!d.layer_rids.is_empty()).then(|| {
                        let mut s = Simulcast::new();
                        for (rid, _) in &d.layer_rids {
                            s.add_send_layer(SimulcastLayer::new(rid));
                        }
                        s
                    });
                    let mid = api.add_media(
                        d.kind,
                        Direction::SendOnly,
                        Some(d.stream_id.clone()),
                        Some(d.track_sid.to_string()),
                        simulcast,
                    );
                    d.state = DownState::Negotiating(mid);
                }
                DownState::ToStop(m) => {
                    api.stop_media(m);
                    d.state = DownState::NegotiatingStop(m);
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
        for d in &p.down_tracks {
            if let Some(m) = d.mid() {
                mid_to_track_id.insert(m.to_string(), d.track_sid.to_string());
            }
        }
        p.sub_offer_id = id;
        p.sub_pending = Some((pending, id));
        let mut sdp = offer.to_sdp_string();
        if let (Some(ours), Some(minted)) = (&restart, &minted) {
            sdp = swap_ice_credentials(&sdp, minted, ours);
            p.sub_restart_wanted = false;
            p.sub_restart = Some(ours.clone());
            tracing::info!(%session, "subscriber ICE restart offered");
        }
        let sd = lk::SessionDescription {
            r#type: "offer".into(),
            sdp,
            id,
            mid_to_track_id,
        };
        self.signal(session, Msg::Offer(sd));
        if let Some(ours) = restart {
            // Checks with the new ufrag may come before the answer: routed already, accepted
            // once the answer is in.
            self.by_ufrag
                .insert(ours.ufrag, (session, PcKind::Subscriber));
        }
    }

    pub(super) fn unpublish(&mut self, now: Instant, publisher: SessionId, track_sid: &TrackSid) {
        let mut touched = Vec::new();
        if let Some(room) = self.room_of_mut(publisher) {
            for p in room.participants.values_mut() {
                if p.stop_down_tracks(|d| d.track_sid == *track_sid) {
                    touched.push(p.session);
                }
            }
        }
        for s in touched {
            self.renegotiate(now, s);
        }
    }
}

/// The addresses of the UDP candidates (`a=candidate:` lines) of an SDP.
fn offered_udp_candidates(sdp: &str) -> Vec<std::net::SocketAddr> {
    sdp.lines()
        .filter_map(|l| l.trim_end().strip_prefix("a=candidate:"))
        .filter_map(|c| {
            // foundation component transport priority address port typ …
            let f: Vec<&str> = c.split_whitespace().collect();
            let (transport, ip, port) = (f.get(2)?, f.get(4)?, f.get(5)?);
            if !transport.eq_ignore_ascii_case("udp") {
                return None;
            }
            Some(std::net::SocketAddr::new(
                ip.parse().ok()?,
                port.parse().ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod candidate_tests {
    #[test]
    fn udp_candidates_are_read_and_others_skipped() {
        let sdp = "v=0\r\n\
                   a=candidate:1 1 udp 2130706175 127.0.0.1 7882 typ host\r\n\
                   a=candidate:2 1 tcp 1000 127.0.0.1 7881 typ host tcptype passive\r\n\
                   a=candidate:3 1 UDP 1 ::1 9 typ host\r\n\
                   a=candidate:junk\r\n\
                   a=candidate:4 1 udp 1 not-an-ip 9 typ host\r\n";
        let found = super::offered_udp_candidates(sdp);
        assert_eq!(
            found,
            [
                "127.0.0.1:7882".parse().unwrap(),
                "[::1]:9".parse().unwrap()
            ]
        );
    }
}
