//! Client requests that change a participant: publishing (`add_track`), mute, metadata and
//! explicit subscriptions.

use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;
use str0m::media::MediaKind;

use super::track::Track;
use super::{SessionId, Sfu, MAX_TRACKS_PER_PARTICIPANT, TRACK_PREFIX};
use crate::sfu::ids::TrackSid;
use crate::sfu::simulcast::Layers;

impl Sfu {
    // Deprecated TrackInfo fields (layers, simulcast, stereo, disable_dtx) are still read by
    // older clients, so they are filled too.
    #[allow(deprecated)]
    pub(super) fn add_track(&mut self, now: Instant, session: SessionId, req: lk::AddTrackRequest) {
        let track_sid = TrackSid::new(self.ids.sid(TRACK_PREFIX));
        let unix_now = self.unix_now;
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        let can_publish = p.can_publish();
        if !can_publish {
            tracing::info!(%session, cid = %req.cid, "add_track without canPublish refused");
            self.signal(
                session,
                Msg::RequestResponse(lk::RequestResponse {
                    reason: lk::request_response::Reason::NotAllowed as i32,
                    message: "no permission to publish".into(),
                    ..Default::default()
                }),
            );
            return;
        }
        if p.tracks.len() >= MAX_TRACKS_PER_PARTICIPANT || p.tracks.iter().any(|t| t.cid == req.cid)
        {
            tracing::warn!(%session, cid = %req.cid, "add_track refused (limit or duplicate cid)");
            self.signal(
                session,
                Msg::RequestResponse(lk::RequestResponse {
                    reason: lk::request_response::Reason::LimitExceeded as i32,
                    message: "too many tracks or duplicate cid".into(),
                    ..Default::default()
                }),
            );
            return;
        }
        let kind = if req.r#type == lk::TrackType::Video as i32 {
            MediaKind::Video
        } else {
            MediaKind::Audio
        };
        let stream = if req.stream.is_empty() {
            match lk::TrackSource::try_from(req.source).unwrap_or(lk::TrackSource::Unknown) {
                lk::TrackSource::Camera | lk::TrackSource::Microphone => "camera".to_owned(),
                lk::TrackSource::ScreenShare | lk::TrackSource::ScreenShareAudio => {
                    "screen".to_owned()
                }
                _ => "unknown".to_owned(),
            }
        } else {
            req.stream.clone()
        };
        let mime = if kind == MediaKind::Video {
            "video/VP8"
        } else {
            "audio/opus"
        };
        let info = lk::TrackInfo {
            sid: track_sid.to_string(),
            r#type: req.r#type,
            name: req.name.clone(),
            muted: req.muted,
            width: req.width,
            height: req.height,
            simulcast: req.layers.len() > 1
                || req.simulcast_codecs.iter().any(|c| c.layers.len() > 1),
            disable_dtx: req.disable_dtx,
            source: req.source,
            layers: req.layers.clone(),
            mime_type: mime.into(),
            codecs: vec![lk::SimulcastCodecInfo {
                mime_type: mime.into(),
                cid: req.cid.clone(),
                layers: req.layers.clone(),
                ..Default::default()
            }],
            stereo: req.stereo,
            disable_red: req.disable_red,
            encryption: req.encryption,
            stream,
            version: Some(lk::TimedVersion {
                unix_micro: unix_now * 1_000_000,
                ticks: 0,
            }),
            audio_features: req.audio_features.clone(),
            backup_codec_policy: req.backup_codec_policy,
            ..Default::default()
        };
        let mut track = Track {
            sid: track_sid,
            info: info.clone(),
            cid: req.cid.clone(),
            kind,
            mid: None,
            layers: Layers::from_request(if req.layers.is_empty() {
                req.simulcast_codecs
                    .first()
                    .map_or(&[][..], |c| c.layers.as_slice())
            } else {
                &req.layers
            }),
            sent_qualities: None,
            keyframe_requests: Vec::new(),
        };
        // Media may already be there (offer before add_track).
        if let Some(pos) = p
            .unbound_mids
            .iter()
            .position(|(_, _, tid)| *tid == req.cid)
            .or_else(|| p.unbound_mids.iter().position(|(_, k, _)| *k == kind))
        {
            let (mid, _, _) = p.unbound_mids.remove(pos);
            track.mid = Some(mid);
            track.info.mid = mid.to_string();
        }
        let bound = track.mid.is_some();
        let sid = track.sid.clone();
        p.tracks.push(track);
        p.info.is_publisher = true;
        tracing::info!(%session, cid = %req.cid, track = %sid, "track published");
        self.signal(
            session,
            Msg::TrackPublished(lk::TrackPublishedResponse {
                cid: req.cid,
                track: Some(info),
            }),
        );
        self.broadcast_participant(session);
        if bound {
            self.subscribe_all_to(now, session, &sid);
        }
    }

    pub(super) fn mute(&mut self, session: SessionId, track_sid: &str, muted: bool) {
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        let Some(t) = p.tracks.iter_mut().find(|t| t.info.sid == track_sid) else {
            return;
        };
        if t.info.muted == muted {
            return;
        }
        t.info.muted = muted;
        tracing::info!(%session, track = track_sid, muted, "track mute changed");
        self.broadcast_participant(session);
    }

    pub(super) fn update_metadata(&mut self, session: SessionId, u: lk::UpdateParticipantMetadata) {
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        if !p.can_update_metadata() {
            self.signal(
                session,
                Msg::RequestResponse(lk::RequestResponse {
                    request_id: u.request_id,
                    reason: lk::request_response::Reason::NotAllowed as i32,
                    message: "no permission to update metadata".into(),
                    ..Default::default()
                }),
            );
            return;
        }
        if let Err(e) = p.check_update(&u.name, &u.metadata, &u.attributes) {
            // Refused whole, like LiveKit; the oversized request is not echoed back.
            tracing::info!(%session, error = %e, "metadata update over the limits refused");
            self.signal(
                session,
                Msg::RequestResponse(lk::RequestResponse {
                    request_id: u.request_id,
                    reason: lk::request_response::Reason::LimitExceeded as i32,
                    message: e.to_string(),
                    ..Default::default()
                }),
            );
            return;
        }
        p.update(u.metadata, u.name, u.attributes);
        self.broadcast_participant(session);
        // The Rust SDK waits for this acknowledgement (JS waits for the echoed update).
        if u.request_id != 0 {
            self.signal(
                session,
                Msg::RequestResponse(lk::RequestResponse {
                    request_id: u.request_id,
                    reason: lk::request_response::Reason::Ok as i32,
                    ..Default::default()
                }),
            );
        }
    }

    pub(super) fn subscription(
        &mut self,
        now: Instant,
        session: SessionId,
        s: lk::UpdateSubscription,
    ) {
        let mut sids = s.track_sids.clone();
        for pt in &s.participant_tracks {
            sids.extend(pt.track_sids.iter().cloned());
        }
        for sid in sids.into_iter().map(TrackSid::from) {
            if s.subscribe {
                self.subscribe(now, session, &sid);
            } else if let Some(p) = self.participant_mut(session) {
                p.stop_down_tracks(|d| d.track_sid == sid);
            }
        }
        self.renegotiate(now, session);
    }
}
