//! A track published by a participant: its info, the publisher connection's mid it arrives
//! on, its simulcast layers and keyframe requests upstream.

use std::time::Instant;

use livekit_protocol as lk;
use str0m::media::{KeyframeRequestKind, MediaKind, Mid, Rid};
use str0m::Rtc;

use super::KEYFRAME_THROTTLE;
use crate::sfu::ids::TrackSid;
use crate::sfu::simulcast::{self, Layers};

/// A track published by a participant.
pub(super) struct Track {
    /// Its SID (also in `info.sid`).
    pub(super) sid: TrackSid,
    pub(super) info: lk::TrackInfo,
    pub(super) cid: String,
    pub(super) kind: MediaKind,
    /// The publisher connection's mid its media arrives on, once bound.
    pub(super) mid: Option<Mid>,
    pub(super) layers: Layers,
    /// Last dynacast state sent to the publisher (LOW, MEDIUM, HIGH enabled).
    pub(super) sent_qualities: Option<[bool; 3]>,
    /// When a keyframe of each layer (`None`: the track without simulcast) was last asked for.
    pub(super) keyframe_requests: Vec<(Option<Rid>, Instant)>,
}

impl Track {
    /// Whether RED may carry this track: audio whose publisher did not disable it. End-to-end
    /// encrypted tracks never: RED is built before encryption, so it cannot be unwrapped or
    /// rebuilt on the way (see `red.rs`).
    pub(super) fn red_allowed(&self) -> bool {
        self.kind == MediaKind::Audio
            && !self.info.disable_red
            && self.info.encryption == lk::encryption::Type::None as i32
    }

    /// Whether its media arrives (subscribers can get it).
    pub(super) fn is_bound(&self) -> bool {
        self.mid.is_some()
    }

    /// Binds the track to the publisher connection's `mid`.
    pub(super) fn bind(&mut self, mid: Mid) {
        self.mid = Some(mid);
        self.info.mid = mid.to_string();
    }

    /// Asks the publisher (connection `rtc`) for a keyframe of layer `rid` (or the best
    /// layer), at most once per [`KEYFRAME_THROTTLE`] and layer (a cascade relay starts every
    /// layer at once, each at its own keyframe). Audio never needs one.
    pub(super) fn request_keyframe(&mut self, rtc: &mut Rtc, now: Instant, rid: Option<Rid>) {
        if self.kind != MediaKind::Video {
            return;
        }
        let Some(mid) = self.mid else {
            return;
        };
        let rid = rid.or_else(|| self.layers.choose(simulcast::HIGH, now));
        self.keyframe_requests
            .retain(|(_, at)| now.saturating_duration_since(*at) < KEYFRAME_THROTTLE);
        if self.keyframe_requests.iter().any(|(r, _)| *r == rid) {
            return;
        }
        self.keyframe_requests.push((rid, now));
        // RTP mode: the request goes through the layer's receive stream (str0m sends the PLI).
        match rtc.direct_api().stream_rx_by_mid(mid, rid) {
            Some(rx) => rx.request_keyframe(KeyframeRequestKind::Pli),
            None => tracing::debug!(track = %self.sid, ?rid, "keyframe request: no such stream"),
        }
    }
}
