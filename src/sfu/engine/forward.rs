//! The media path: frames from a publisher to each subscriber (layer choice, keyframe gating,
//! timestamp continuity), keyframe requests upstream, and data packets relayed with the
//! sender stamped.

use std::time::Instant;

use livekit_protocol as lk;
use prost::Message as _;
use str0m::media::{KeyframeRequestKind, MediaKind, Rid};

use super::{rid_rank, Forward, OutState, SessionId, Sfu, KEYFRAME_THROTTLE};
use crate::sfu::ids::TrackSid;
use crate::sfu::simulcast;

impl Sfu {
    /// Forwards one frame to every subscriber of its track; returns the sessions touched.
    pub(super) fn forward(&mut self, now: Instant, f: Forward) -> Vec<SessionId> {
        let Some(room_name) = self.sessions.get(&f.publisher).cloned() else {
            return Vec::new();
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return Vec::new();
        };
        // Borrow the publisher's layer table while walking the subscribers (no copy).
        let mut layers = room
            .participants
            .get_mut(&f.publisher)
            .and_then(|p| p.tracks.iter_mut().find(|t| t.sid == f.track_sid))
            .map(|t| std::mem::take(&mut t.layers))
            .unwrap_or_default();
        let mut touched = Vec::new();
        let mut keyframe_of: Option<Option<Rid>> = None;
        let source_key = f.data.rid.map_or(0, |r| u64::from(rid_rank(&r))) + 1;
        for p in room.participants.values_mut() {
            if p.session == f.publisher {
                continue;
            }
            let Some(o) = p.outs.iter_mut().find(|o| o.track_sid == f.track_sid) else {
                continue;
            };
            let OutState::Open(mid) = o.state else {
                continue;
            };
            if o.disabled {
                continue;
            }
            if f.data.rid.is_some() {
                o.wanted_rid = layers.choose(o.max_quality, now);
                if o.current_rid != f.data.rid {
                    // Switch only onto a keyframe of the wanted layer; until then the current
                    // layer keeps flowing.
                    if f.data.rid == o.wanted_rid && f.keyframe {
                        tracing::debug!(
                            session = %p.session,
                            track = %f.track_sid,
                            from = ?o.current_rid,
                            to = ?f.data.rid,
                            "simulcast layer switch"
                        );
                        o.current_rid = f.data.rid;
                        o.waiting_keyframe = false;
                    } else {
                        if f.data.rid == o.wanted_rid {
                            keyframe_of = Some(o.wanted_rid);
                        }
                        continue;
                    }
                }
            }
            if o.kind == MediaKind::Video && o.waiting_keyframe {
                if !f.keyframe {
                    keyframe_of = Some(f.data.rid);
                    continue;
                }
                o.waiting_keyframe = false;
            }
            let Some(writer) = p.subscriber.rtc.writer(mid) else {
                continue;
            };
            let Some(pt) = writer.match_params(f.data.params) else {
                tracing::debug!(session = %p.session, track = %f.track_sid, "no matching payload type");
                continue;
            };
            let hz = f.data.time.frequency().get();
            let ts = o.timeline.map(source_key, f.data.time.numer(), hz, now);
            let time = str0m::media::MediaTime::new(ts, f.data.time.frequency());
            if let Err(e) = writer.write(pt, f.data.network_time, time, f.data.data.clone()) {
                tracing::debug!(session = %p.session, error = %e, "write failed");
                continue;
            }
            touched.push(p.session);
        }
        if let Some(t) = room
            .participants
            .get_mut(&f.publisher)
            .and_then(|p| p.tracks.iter_mut().find(|t| t.sid == f.track_sid))
        {
            std::mem::swap(&mut t.layers, &mut layers);
        }
        if let Some(rid) = keyframe_of {
            self.request_keyframe(now, f.publisher, &f.track_sid, rid);
        }
        touched
    }

    pub(super) fn request_keyframe(
        &mut self,
        now: Instant,
        publisher: SessionId,
        track_sid: &TrackSid,
        rid: Option<Rid>,
    ) {
        let Some(p) = self.participant_mut(publisher) else {
            return;
        };
        let Some(t) = p.tracks.iter_mut().find(|t| t.sid == *track_sid) else {
            return;
        };
        if t.kind != MediaKind::Video {
            return;
        }
        if t.last_keyframe_request
            .is_some_and(|at| now.saturating_duration_since(at) < KEYFRAME_THROTTLE)
        {
            return;
        }
        let Some(mid) = t.mid else {
            return;
        };
        t.last_keyframe_request = Some(now);
        let rid = rid.or_else(|| t.layers.choose(simulcast::HIGH, now));
        if let Some(mut w) = p.publisher.rtc.writer(mid) {
            if let Err(e) = w.request_keyframe(rid, KeyframeRequestKind::Pli) {
                tracing::debug!(error = %e, "keyframe request failed");
            }
        }
    }

    pub(super) fn relay_data(&mut self, sender: SessionId, reliable: bool, bytes: &[u8]) {
        let Ok(mut packet) = lk::DataPacket::decode(bytes) else {
            tracing::debug!(%sender, "undecodable data packet dropped");
            return;
        };
        let Some(room_name) = self.sessions.get(&sender).cloned() else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let Some(from) = room.participants.get(&sender) else {
            return;
        };
        if !from
            .info
            .permission
            .as_ref()
            .is_some_and(|x| x.can_publish_data)
        {
            return;
        }
        packet.participant_identity = from.info.identity.clone();
        packet.participant_sid = from.info.sid.clone();
        #[allow(deprecated)]
        if let Some(lk::data_packet::Value::User(u)) = packet.value.as_mut() {
            u.participant_identity = from.info.identity.clone();
            u.participant_sid = from.info.sid.clone();
        }
        let destinations = std::mem::take(&mut packet.destination_identities);
        let encoded = packet.encode_to_vec();
        for p in room.participants.values_mut() {
            if p.session == sender {
                continue;
            }
            if !destinations.is_empty() && !destinations.contains(&p.info.identity) {
                continue;
            }
            let id = if reliable {
                p.sub_reliable
            } else {
                p.sub_lossy
            };
            if let Some(mut ch) = id.and_then(|id| p.subscriber.rtc.channel(id)) {
                if let Err(e) = ch.write(true, &encoded) {
                    tracing::debug!(session = %p.session, error = %e, "data write failed");
                }
            }
        }
    }
}
