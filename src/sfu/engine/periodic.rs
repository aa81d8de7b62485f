//! Periodic room work and per-subscriber video settings: speakers, connection quality,
//! dynacast (`subscribed_quality_update`), stream state, and `update_track_settings`.

use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;
use str0m::media::{MediaKind, Rid};

use super::track::Track;
use super::{msg, Output, SessionId, Sfu, QUALITY_INTERVAL, SPEAKER_INTERVAL};
use crate::sfu::ids::TrackSid;
use crate::sfu::simulcast;

impl Sfu {
    pub(super) fn update_speakers(&mut self, now: Instant) {
        // The time since the last pass (due one interval ago, maybe run late).
        let elapsed = self.next_speakers.map_or(SPEAKER_INTERVAL, |due| {
            (now + SPEAKER_INTERVAL).saturating_duration_since(due)
        });
        self.next_speakers = Some(now + SPEAKER_INTERVAL);
        // Bandwidth first: its pauses reach the clients in `update_layers`' stream states.
        self.allocate_bandwidth(now, elapsed);
        self.update_layers(now);
        // What each cascade relay's tracks carry (the operator's view, `Sfu::relayed`).
        for room in self.rooms.values_mut() {
            for p in room.participants.values_mut() {
                if p.cascade == super::CascadeRole::Relay {
                    for d in &mut p.down_tracks {
                        d.measure(elapsed);
                    }
                }
            }
        }
        for room in self.rooms.values_mut() {
            let changed: Vec<lk::SpeakerInfo> = room
                .participants
                .values_mut()
                .filter_map(|p| p.speaker_update())
                .collect();
            if changed.is_empty() {
                continue;
            }
            let m = Msg::SpeakersChanged(lk::SpeakersChanged { speakers: changed });
            room.broadcast(&mut self.out, &m, |_| true);
        }
    }

    pub(super) fn update_quality(&mut self, now: Instant) {
        self.next_quality = Some(now + QUALITY_INTERVAL);
        for room in self.rooms.values() {
            let updates: Vec<lk::ConnectionQualityInfo> = room
                .participants
                .values()
                .map(|p| p.connection_quality())
                .collect();
            let m = Msg::ConnectionQuality(lk::ConnectionQualityUpdate { updates });
            room.broadcast(&mut self.out, &m, |_| true);
        }
    }

    /// Dynacast and stream state: tells publishers which simulcast qualities anyone watches,
    /// and subscribers when a stream they get stopped or resumed.
    // `subscribed_qualities` is deprecated in favour of `subscribed_codecs` but older clients
    // still read it; both are filled.
    #[allow(deprecated)]
    fn update_layers(&mut self, now: Instant) {
        for room in self.rooms.values_mut() {
            // What subscribers want of each video track, and whether it is alive.
            let mut wants: Vec<(SessionId, TrackSid, Option<i32>, bool)> = Vec::new();
            for p in room.participants.values() {
                for t in p.tracks.iter().filter(|t| t.kind == MediaKind::Video) {
                    let max = room
                        .participants
                        .values()
                        .flat_map(|s| s.down_tracks.iter())
                        .filter(|d| d.track_sid == t.sid && !d.disabled)
                        .map(|d| d.max_quality)
                        .max();
                    wants.push((p.session, t.sid.clone(), max, t.layers.any_alive(now)));
                }
            }
            for (publisher, sid, max, alive) in wants {
                let Some(p) = room.participants.get_mut(&publisher) else {
                    continue;
                };
                if let Some(t) = p.tracks.iter_mut().find(|t| t.sid == sid) {
                    let enabled = simulcast::enabled_qualities(max);
                    if t.layers.is_simulcast() && t.sent_qualities != Some(enabled) {
                        t.sent_qualities = Some(enabled);
                        let qualities: Vec<lk::SubscribedQuality> = enabled
                            .iter()
                            .enumerate()
                            .map(|(q, on)| lk::SubscribedQuality {
                                quality: q as i32,
                                enabled: *on,
                            })
                            .collect();
                        let codec = t
                            .info
                            .mime_type
                            .split('/')
                            .nth(1)
                            .unwrap_or("vp8")
                            .to_ascii_lowercase();
                        let update = Msg::SubscribedQualityUpdate(lk::SubscribedQualityUpdate {
                            track_sid: sid.to_string(),
                            subscribed_qualities: qualities.clone(),
                            subscribed_codecs: vec![lk::SubscribedCodec { codec, qualities }],
                        });
                        tracing::info!(
                            track = %sid,
                            low = enabled[0],
                            medium = enabled[1],
                            high = enabled[2],
                            "dynacast: publisher told which layers to send"
                        );
                        self.out.push_back(Output::Signal(publisher, msg(update)));
                    }
                }
                let publisher_sid = p.info.sid.clone();
                for s in room.participants.values_mut() {
                    let session = s.session;
                    for d in s.down_tracks.iter_mut().filter(|d| d.track_sid == sid) {
                        if let Some(paused) = d.pause_changed(alive) {
                            let state = if paused {
                                lk::StreamState::Paused
                            } else {
                                lk::StreamState::Active
                            };
                            let m = Msg::StreamStateUpdate(lk::StreamStateUpdate {
                                stream_states: vec![lk::StreamStateInfo {
                                    participant_sid: publisher_sid.clone(),
                                    track_sid: sid.to_string(),
                                    state: state as i32,
                                }],
                            });
                            self.out.push_back(Output::Signal(session, msg(m)));
                        }
                    }
                }
            }
        }
    }

    pub(super) fn track_settings(
        &mut self,
        now: Instant,
        session: SessionId,
        s: lk::UpdateTrackSettings,
    ) {
        // Dimensions map to a quality through the publisher's announced layers.
        let mut wanted: Vec<(TrackSid, i32)> = Vec::new();
        for sid in s.track_sids.iter().map(|s| TrackSid::from(s.as_str())) {
            let quality = if s.width > 0 || s.height > 0 {
                self.track(&sid)
                    .map_or(simulcast::HIGH, |t| t.layers.quality_for(s.width, s.height))
            } else {
                s.quality.clamp(simulcast::LOW, simulcast::HIGH)
            };
            wanted.push((sid, quality));
        }
        tracing::debug!(%session, settings = ?s, ?wanted, "track settings");
        #[allow(deprecated)]
        let off = s.disabled || s.quality == lk::VideoQuality::Off as i32;
        let mut keyframes = Vec::new();
        if let Some(p) = self.participant_mut(session) {
            for (sid, quality) in wanted {
                for d in p.down_tracks.iter_mut().filter(|d| d.track_sid == sid) {
                    if d.set_settings(off, quality) {
                        keyframes.push((d.publisher, d.track_sid.clone()));
                    }
                }
            }
        }
        for (publisher, track) in keyframes {
            self.request_keyframe_for_subscribers(now, publisher, &track);
        }
        self.update_layers(now);
    }

    /// A published track by SID.
    fn track(&self, track_sid: &TrackSid) -> Option<&Track> {
        self.rooms
            .values()
            .find_map(|r| r.track(track_sid).map(|(_, t)| t))
    }

    /// Asks the publisher for keyframes of the layers its subscribers now want.
    fn request_keyframe_for_subscribers(
        &mut self,
        now: Instant,
        publisher: SessionId,
        sid: &TrackSid,
    ) {
        let mut rids: Vec<Option<Rid>> = Vec::new();
        if let Some((room, p)) = self.locate(publisher) {
            let layers = p.track(sid).map(|t| &t.layers);
            for s in room.participants.values() {
                for d in s
                    .down_tracks
                    .iter()
                    .filter(|d| d.track_sid == *sid && !d.disabled)
                {
                    let rid = layers.and_then(|l| l.choose(d.max_quality, now));
                    if !rids.contains(&rid) {
                        rids.push(rid);
                    }
                }
            }
        }
        // Separate layers are separate requests (the throttle is per layer).
        for rid in rids {
            self.request_keyframe(now, publisher, sid, rid);
        }
    }
}
