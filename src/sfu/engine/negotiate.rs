//! SDP negotiation on both peer connections: answering publisher offers, the subscriber
//! connection offers (one in flight at a time), trickle, and which tracks each subscriber gets.

use std::collections::HashMap;
use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::channel::{ChannelConfig, Reliability};
use str0m::media::{Direction, MediaKind};
use str0m::Candidate;

use crate::sfu::ids::TrackSid;

use super::{new_out, OutState, Output, PcKind, SessionId, Sfu, SfuEvent};

impl Sfu {
    pub(super) fn publisher_offer(
        &mut self,
        now: Instant,
        session: SessionId,
        sd: lk::SessionDescription,
    ) {
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
        let offer = match SdpOffer::from_sdp_string(&sdp) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(%session, error = %e, "unparseable publisher offer");
                return;
            }
        };
        match p.publisher.rtc.sdp_api().accept_offer(offer) {
            Ok(answer) => {
                let answer = lk::SessionDescription {
                    r#type: "answer".into(),
                    sdp: answer.to_sdp_string(),
                    id: sd.id,
                    mid_to_track_id: HashMap::new(),
                };
                self.signal(session, Msg::Answer(answer));
            }
            Err(e) => tracing::warn!(%session, error = %e, "publisher offer refused"),
        }
        self.drain(now, session);
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
        if let Err(e) = p.subscriber.rtc.sdp_api().accept_answer(pending, answer) {
            tracing::warn!(%session, error = %e, "subscriber answer refused");
            return;
        }
        for o in &mut p.outs {
            if let OutState::Negotiating(m) = o.state {
                o.state = OutState::Open(m);
                if o.kind == MediaKind::Audio {
                    // A transceiver may carry a RED-less track after a RED one, or the reverse.
                    p.subscriber.rtc.direct_api().set_red_send(m, o.red);
                }
            }
        }
        p.outs
            .retain(|o| !matches!(o.state, OutState::NegotiatingStop(_)));
        // Newly open video needs a keyframe from its publisher.
        let wants: Vec<(SessionId, TrackSid)> = p
            .outs
            .iter()
            .filter(|o| o.kind == MediaKind::Video)
            .map(|o| (o.publisher, o.track_sid.clone()))
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
                if let Some(pc) = self.pc_mut(session, kind) {
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
        let Some(room_name) = self.sessions.get(&publisher).cloned() else {
            return;
        };
        // Media is bound: the track is published (webhooks).
        let published = self.participant_mut(publisher).and_then(|p| {
            let track = p.tracks.iter().find(|t| t.sid == *track_sid)?;
            let mut info = p.info.clone();
            info.tracks = p.tracks.iter().map(|t| t.info.clone()).collect();
            Some((Box::new(info), Box::new(track.info.clone())))
        });
        if let Some((participant, track)) = published {
            self.out.push_back(Output::Event(SfuEvent::TrackPublished {
                room: room_name.clone(),
                participant,
                track,
            }));
        }
        let subscribers: Vec<SessionId> = self
            .rooms
            .get(&room_name)
            .map(|r| {
                r.participants
                    .values()
                    .filter(|p| p.session != publisher && p.auto_subscribe)
                    .map(|p| p.session)
                    .collect()
            })
            .unwrap_or_default();
        for s in subscribers {
            self.subscribe(now, s, track_sid);
            self.renegotiate(now, s);
            self.drain(now, s);
        }
    }

    pub(super) fn subscribe(&mut self, _now: Instant, session: SessionId, track_sid: &TrackSid) {
        let Some(room_name) = self.sessions.get(&session).cloned() else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let found = room.participants.values().find_map(|p| {
            p.tracks
                .iter()
                .find(|t| t.sid == *track_sid && t.mid.is_some())
                .map(|t| (p.session, new_out(p, t)))
        });
        let Some((publisher, out)) = found else {
            return;
        };
        if publisher == session {
            return;
        }
        let Some(p) = room.participants.get_mut(&session) else {
            return;
        };
        let may = p.info.permission.as_ref().is_some_and(|x| x.can_subscribe);
        if !may || p.outs.iter().any(|o| o.track_sid == *track_sid) {
            return;
        }
        p.outs.push(out);
    }

    /// Sends a subscriber offer if changes are waiting and none is in flight.
    pub(super) fn renegotiate(&mut self, _now: Instant, session: SessionId) {
        let id = {
            let Some(p) = self.participant_mut(session) else {
                return;
            };
            if p.sub_pending.is_some() {
                return;
            }
            p.sub_offer_id + 1
        };
        let Some(room_name) = self.sessions.get(&session).cloned() else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let Some(p) = room.participants.get_mut(&session) else {
            return;
        };
        let mut api = p.subscriber.rtc.sdp_api();
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
        for o in &mut p.outs {
            match o.state {
                OutState::ToOpen => {
                    let mid = api.add_media(
                        o.kind,
                        Direction::SendOnly,
                        Some(o.stream_id.clone()),
                        Some(o.track_sid.to_string()),
                        None,
                    );
                    o.state = OutState::Negotiating(mid);
                }
                OutState::ToStop(m) => {
                    api.stop_media(m);
                    o.state = OutState::NegotiatingStop(m);
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
        for o in &p.outs {
            if let Some(m) = o.mid() {
                mid_to_track_id.insert(m.to_string(), o.track_sid.to_string());
            }
        }
        p.sub_offer_id = id;
        p.sub_pending = Some((pending, id));
        let sd = lk::SessionDescription {
            r#type: "offer".into(),
            sdp: offer.to_sdp_string(),
            id,
            mid_to_track_id,
        };
        self.signal(session, Msg::Offer(sd));
    }

    pub(super) fn unpublish(&mut self, now: Instant, publisher: SessionId, track_sid: &TrackSid) {
        let Some(room_name) = self.sessions.get(&publisher).cloned() else {
            return;
        };
        let mut touched = Vec::new();
        if let Some(room) = self.rooms.get_mut(&room_name) {
            for p in room.participants.values_mut() {
                let mut hit = false;
                for o in p.outs.iter_mut().filter(|o| o.track_sid == *track_sid) {
                    hit = true;
                    o.state = match o.state {
                        OutState::Open(m) | OutState::Negotiating(m) => OutState::ToStop(m),
                        s => s,
                    };
                }
                p.outs
                    .retain(|o| !(o.track_sid == *track_sid && o.state == OutState::ToOpen));
                if hit {
                    touched.push(p.session);
                }
            }
        }
        for s in touched {
            self.renegotiate(now, s);
        }
    }
}
