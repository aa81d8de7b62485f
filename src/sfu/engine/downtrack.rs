//! The subscriber side of one forwarded track: its transceiver's negotiation state, the
//! simulcast layer it forwards, keyframe gating, timestamp rewriting and the subscriber's
//! settings (quality, disabled, paused).

use std::time::Instant;

use str0m::media::{MediaKind, MediaTime, Mid, Rid};
use str0m::Rtc;

use super::track::Track;
use super::{rid_rank, Forward, SessionId};
use crate::sfu::ids::TrackSid;
use crate::sfu::rewrite::Timeline;
use crate::sfu::simulcast::{self, Layers};

/// Negotiation state of a down-track's transceiver on the subscriber connection (v0), or of
/// its slot on a single peer connection (v1: `ToOpen` → `Open` → `ToStop`, see
/// `engine/single.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DownState {
    /// Waiting for the next subscriber offer (v1: for a free slot in the client's next offer).
    ToOpen,
    /// Offered, not answered yet (v0 only).
    Negotiating(Mid),
    /// Answered: media flows (v1: from the answer that put it on its slot).
    Open(Mid),
    /// To be stopped in the next offer (v1: its slot is answered `inactive` next).
    ToStop(Mid),
    /// Stop offered, not answered yet (v0 only).
    NegotiatingStop(Mid),
}

/// What [`DownTrack::forward`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Forwarded {
    /// Written to the subscriber connection.
    Written,
    /// Not for this subscriber now.
    Skipped,
    /// Held back until a keyframe of this layer arrives: ask the publisher for one.
    NeedsKeyframe(Option<Rid>),
}

/// A published track forwarded to one subscriber (LiveKit's down-track).
pub(super) struct DownTrack {
    pub(super) publisher: SessionId,
    pub(super) track_sid: TrackSid,
    pub(super) kind: MediaKind,
    pub(super) stream_id: String,
    pub(super) state: DownState,
    timeline: Timeline,
    /// Simulcast layer forwarded now, and the one wanted (switch on its keyframe).
    pub(super) current_rid: Option<Rid>,
    wanted_rid: Option<Rid>,
    waiting_keyframe: bool,
    pub(super) disabled: bool,
    /// Highest quality the subscriber asked for (`update_track_settings`).
    pub(super) max_quality: i32,
    /// Whether the subscriber was told the stream is paused.
    pub(super) paused: bool,
    /// Whether the subscriber connection may wrap this track in RED ([`Track::red_allowed`]).
    pub(super) red: bool,
}

impl DownTrack {
    /// A down-track of `track`, published by `publisher` (session and participant SID).
    pub(super) fn new(publisher: SessionId, publisher_sid: &str, track: &Track) -> Self {
        Self {
            publisher,
            track_sid: track.sid.clone(),
            kind: track.kind,
            stream_id: format!("{publisher_sid}|{}", track.sid),
            state: DownState::ToOpen,
            timeline: Timeline::default(),
            current_rid: None,
            wanted_rid: None,
            waiting_keyframe: track.kind == MediaKind::Video,
            disabled: false,
            max_quality: simulcast::HIGH,
            paused: false,
            red: track.red_allowed(),
        }
    }

    /// The transceiver's mid, once offered.
    pub(super) fn mid(&self) -> Option<Mid> {
        match self.state {
            DownState::ToOpen => None,
            DownState::Negotiating(m)
            | DownState::Open(m)
            | DownState::ToStop(m)
            | DownState::NegotiatingStop(m) => Some(m),
        }
    }

    /// Marks the down-track for removal; returns whether it must be kept until the next
    /// offer stops its transceiver (false: never offered, drop it now).
    pub(super) fn stop(&mut self) -> bool {
        self.state = match self.state {
            DownState::Open(m) | DownState::Negotiating(m) => DownState::ToStop(m),
            s => s,
        };
        self.state != DownState::ToOpen
    }

    /// Applies the subscriber's `update_track_settings`; returns whether the publisher
    /// should be asked for a keyframe (video turned back on, or another quality).
    pub(super) fn set_settings(&mut self, off: bool, quality: i32) -> bool {
        let was_disabled = self.disabled;
        self.disabled = off;
        let changed = self.max_quality != quality;
        self.max_quality = quality;
        if self.kind == MediaKind::Video && ((was_disabled && !off) || changed) {
            if was_disabled {
                self.waiting_keyframe = true;
            }
            return true;
        }
        false
    }

    /// Whether the stream should be shown as paused (source gone or disabled), if that is
    /// news to the subscriber; updates what it was told.
    pub(super) fn pause_changed(&mut self, source_alive: bool) -> Option<bool> {
        let paused = !source_alive || self.disabled;
        if paused != self.paused && matches!(self.state, DownState::Open(_)) {
            self.paused = paused;
            return Some(paused);
        }
        None
    }

    /// Writes frame `f` to the subscriber connection `rtc` if this down-track takes it now:
    /// open, enabled, on the chosen simulcast layer (switching only on a keyframe of the
    /// wanted one), and after a keyframe for video. Timestamps are rewritten so a layer
    /// switch stays continuous.
    pub(super) fn forward(
        &mut self,
        rtc: &mut Rtc,
        f: &Forward,
        layers: &Layers,
        now: Instant,
    ) -> Forwarded {
        let DownState::Open(mid) = self.state else {
            return Forwarded::Skipped;
        };
        if self.disabled {
            return Forwarded::Skipped;
        }
        let mut need = Forwarded::Skipped;
        if f.data.rid.is_some() {
            self.wanted_rid = layers.choose(self.max_quality, now);
            if self.current_rid != f.data.rid {
                // Switch only onto a keyframe of the wanted layer; until then the current
                // layer keeps flowing.
                if f.data.rid == self.wanted_rid && f.keyframe {
                    tracing::debug!(
                        track = %f.track_sid,
                        from = ?self.current_rid,
                        to = ?f.data.rid,
                        "simulcast layer switch"
                    );
                    self.current_rid = f.data.rid;
                    self.waiting_keyframe = false;
                } else {
                    if f.data.rid == self.wanted_rid {
                        need = Forwarded::NeedsKeyframe(self.wanted_rid);
                    }
                    return need;
                }
            }
        }
        if self.kind == MediaKind::Video && self.waiting_keyframe {
            if !f.keyframe {
                return Forwarded::NeedsKeyframe(f.data.rid);
            }
            self.waiting_keyframe = false;
        }
        let Some(writer) = rtc.writer(mid) else {
            return Forwarded::Skipped;
        };
        let Some(pt) = writer.match_params(f.data.params) else {
            tracing::debug!(track = %f.track_sid, "no matching payload type");
            return Forwarded::Skipped;
        };
        let source_key = f.data.rid.map_or(0, |r| u64::from(rid_rank(&r))) + 1;
        let hz = f.data.time.frequency().get();
        let ts = self.timeline.map(source_key, f.data.time.numer(), hz, now);
        let time = MediaTime::new(ts, f.data.time.frequency());
        if let Err(e) = writer.write(pt, f.data.network_time, time, f.data.data.clone()) {
            tracing::debug!(error = %e, "write failed");
            return Forwarded::Skipped;
        }
        Forwarded::Written
    }
}
