//! The media path: RTP packets from a publisher to each subscriber's down-track, keyframe
//! requests upstream, and data packets relayed with the sender stamped.

use std::time::Instant;

use livekit_protocol as lk;
use prost::Message as _;
use str0m::media::Rid;

use super::downtrack::Forwarded;
use super::{Forward, SessionId, Sfu};
use crate::sfu::ids::TrackSid;

impl Sfu {
    /// Forwards one RTP packet to every subscriber of its track; returns the sessions touched.
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
        let mut relayed = (0u64, 0u64);
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
            let pc = p.transport.sub_pc_mut();
            if !pc.connected {
                // str0m would queue it until the connection is up: stale media.
                continue;
            }
            match d.forward(&mut pc.rtc, &mut p.out_streams, &f, &layers, now) {
                Forwarded::Written => {
                    if p.cascade == super::CascadeRole::Relay {
                        relayed.0 += 1;
                        relayed.1 += f.packet.payload.len() as u64;
                    }
                    touched.push(p.session)
                }
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
        self.stats.relayed_packets += relayed.0;
        self.stats.relayed_bytes += relayed.1;
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

    /// Relays a data packet from `sender` to the room, or to the participants it is addressed
    /// to; returns the sessions it was written to.
    ///
    /// The server is the authority on who sent it, as LiveKit's `handleReceivedDataMessage`:
    /// whatever the client put there, the sender identity and SID (top level and, for a user
    /// packet, inside it) are the sender's own, or empty for a hidden sender, and the kind is
    /// the channel's. Addressing follows LiveKit's `BroadcastDataPacketForRoom`: the top-level
    /// `destination_identities`, else the user packet's, plus the user packet's
    /// `destination_sids`; a participant named by either gets it, and nobody when none is set
    /// but everyone else. The addressing is stripped before relaying (receivers need not learn
    /// who else was addressed). Transcriptions (which name the speaker they transcribe; LiveKit
    /// forwards them only from agents, which Conclave does not have) and metrics (which LiveKit
    /// does not relay as data) are dropped.
    #[allow(deprecated)]
    pub(super) fn relay_data(
        &mut self,
        sender: SessionId,
        reliable: bool,
        bytes: &[u8],
    ) -> Vec<SessionId> {
        use lk::data_packet::{Kind, Value};
        let Ok(mut packet) = lk::DataPacket::decode(bytes) else {
            tracing::debug!(%sender, "undecodable data packet dropped");
            return Vec::new();
        };
        if matches!(
            packet.value,
            Some(Value::Transcription(_) | Value::Metrics(_))
        ) {
            tracing::debug!(%sender, "transcription or metrics data packet dropped");
            return Vec::new();
        }
        let Some(room) = self.room_of_mut(sender) else {
            return Vec::new();
        };
        let Some(from) = room.participants.get_mut(&sender) else {
            return Vec::new();
        };
        if !from.can_publish_data() {
            return Vec::new();
        }
        if reliable && packet.sequence != 0 {
            if packet.sequence <= from.reliable_seq {
                tracing::debug!(%sender, sequence = packet.sequence, "repeated reliable data packet dropped");
                return Vec::new();
            }
            from.reliable_seq = packet.sequence;
        }
        let (identity, sid) = if from.hidden() {
            (String::new(), String::new())
        } else {
            (from.identity.to_string(), from.sid.to_string())
        };
        packet.kind = if reliable {
            Kind::Reliable
        } else {
            Kind::Lossy
        } as i32;
        let mut identities = std::mem::take(&mut packet.destination_identities);
        let mut sids = Vec::new();
        if let Some(Value::User(u)) = packet.value.as_mut() {
            u.participant_identity.clone_from(&identity);
            u.participant_sid.clone_from(&sid);
            let inner = std::mem::take(&mut u.destination_identities);
            if identities.is_empty() {
                identities = inner;
            }
            sids = std::mem::take(&mut u.destination_sids);
        }
        packet.participant_identity = identity;
        packet.participant_sid = sid;
        let addressed = !identities.is_empty() || !sids.is_empty();
        let encoded = packet.encode_to_vec();
        let mut written = Vec::new();
        for p in room.participants.values_mut() {
            if p.session == sender {
                continue;
            }
            if addressed && !identities.contains(&p.info.identity) && !sids.contains(&p.info.sid) {
                continue;
            }
            // A peer Conclave's media relay of participant X (`cascade:<peer>|X`) carries X's
            // packets only: its mirror at the peer sends them on as X's, once (the peer's
            // relays of the others carry theirs).
            if p.cascade == super::CascadeRole::Relay
                && p.identity.as_str().split_once('|').map(|(_, x)| x)
                    != Some(packet.participant_identity.as_str())
            {
                continue;
            }
            if p.send_data(reliable, &encoded) {
                written.push(p.session);
            }
        }
        written
    }
}
