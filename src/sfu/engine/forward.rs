//! The media path: frames from a publisher to each subscriber's down-track, keyframe
//! requests upstream, and data packets relayed with the sender stamped.

use std::time::Instant;

use livekit_protocol as lk;
use prost::Message as _;
use str0m::media::Rid;

use super::downtrack::Forwarded;
use super::{Forward, SessionId, Sfu};
use crate::sfu::ids::TrackSid;

impl Sfu {
    /// Forwards one frame to every subscriber of its track; returns the sessions touched.
    pub(super) fn forward(&mut self, now: Instant, f: Forward) -> Vec<SessionId> {
        let Some(room) = self.room_of_mut(f.publisher) else {
            return Vec::new();
        };
        // Borrow the publisher's layer table while walking the subscribers (no copy).
        let mut layers = room
            .participants
            .get_mut(&f.publisher)
            .and_then(|p| p.track_mut(&f.track_sid))
            .map(|t| std::mem::take(&mut t.layers))
            .unwrap_or_default();
        let mut touched = Vec::new();
        let mut keyframe_of: Option<Option<Rid>> = None;
        for p in room.participants.values_mut() {
            if p.session == f.publisher {
                continue;
            }
            let Some(d) = p
                .down_tracks
                .iter_mut()
                .find(|d| d.track_sid == f.track_sid)
            else {
                continue;
            };
            match d.forward(&mut p.subscriber.rtc, &f, &layers, now) {
                Forwarded::Written => touched.push(p.session),
                Forwarded::NeedsKeyframe(rid) => keyframe_of = Some(rid),
                Forwarded::Skipped => {}
            }
        }
        if let Some(t) = room
            .participants
            .get_mut(&f.publisher)
            .and_then(|p| p.track_mut(&f.track_sid))
        {
            std::mem::swap(&mut t.layers, &mut layers);
        }
        if let Some(rid) = keyframe_of {
            self.request_keyframe(now, f.publisher, &f.track_sid, rid);
        }
        touched
    }

    /// Asks `publisher` for a keyframe of its track `track_sid` (throttled per track).
    pub(super) fn request_keyframe(
        &mut self,
        now: Instant,
        publisher: SessionId,
        track_sid: &TrackSid,
        rid: Option<Rid>,
    ) {
        if let Some(p) = self.participant_mut(publisher) {
            p.request_keyframe(track_sid, now, rid);
        }
    }

    /// Relays a data packet from `sender` to the room (or its destination identities), with
    /// the sender's identity and SID stamped in.
    pub(super) fn relay_data(&mut self, sender: SessionId, reliable: bool, bytes: &[u8]) {
        let Ok(mut packet) = lk::DataPacket::decode(bytes) else {
            tracing::debug!(%sender, "undecodable data packet dropped");
            return;
        };
        let Some(room) = self.room_of_mut(sender) else {
            return;
        };
        let Some(from) = room.participants.get(&sender) else {
            return;
        };
        if !from.can_publish_data() {
            return;
        }
        packet.participant_identity = from.identity.to_string();
        packet.participant_sid = from.sid.to_string();
        #[allow(deprecated)]
        if let Some(lk::data_packet::Value::User(u)) = packet.value.as_mut() {
            u.participant_identity = from.identity.to_string();
            u.participant_sid = from.sid.to_string();
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
            p.send_data(reliable, &encoded);
        }
    }
}
