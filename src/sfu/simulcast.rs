//! Simulcast layers of one published video track, and the choice of the layer each subscriber
//! gets: the best layer that is alive (packets in the last second) and not above what the
//! subscriber asked for (`update_track_settings`: quality, or dimensions mapped to the smallest
//! layer that covers them).
//!
//! Allocation happens when a track is published, never per packet.

use std::time::{Duration, Instant};

use livekit_protocol as lk;
use str0m::media::Rid;

/// A layer that sent nothing for this long is considered stopped.
pub const LAYER_TIMEOUT: Duration = Duration::from_secs(1);

/// `VideoQuality` values.
pub const LOW: i32 = lk::VideoQuality::Low as i32;
/// Medium quality.
pub const MEDIUM: i32 = lk::VideoQuality::Medium as i32;
/// High quality.
pub const HIGH: i32 = lk::VideoQuality::High as i32;

/// One simulcast layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Its RTP stream id.
    pub rid: Rid,
    /// LOW, MEDIUM or HIGH.
    pub quality: i32,
    /// Announced width (0 = unknown).
    pub width: u32,
    /// Announced height (0 = unknown).
    pub height: u32,
    /// When its last packet arrived.
    pub last_seen: Option<Instant>,
}

/// Quality of a browser rid by LiveKit's convention (`q`, `h`, `f`).
pub fn quality_of_rid(rid: &str) -> i32 {
    match rid {
        "q" => LOW,
        "h" => MEDIUM,
        _ => HIGH,
    }
}

fn rid_for_quality(q: i32) -> &'static str {
    match q {
        x if x == LOW => "q",
        x if x == MEDIUM => "h",
        _ => "f",
    }
}

/// The layers of a track.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    layers: Vec<Layer>,
    /// Last packet without a rid (non-simulcast tracks).
    plain_last_seen: Option<Instant>,
}

impl Layers {
    /// Layers announced in `add_track` (`VideoLayer`s); rids default by quality.
    pub fn from_request(req: &[lk::VideoLayer]) -> Self {
        let layers = req
            .iter()
            .map(|l| {
                let rid = if l.rid.is_empty() {
                    rid_for_quality(l.quality)
                } else {
                    l.rid.as_str()
                };
                Layer {
                    rid: Rid::from(rid),
                    quality: l.quality,
                    width: l.width,
                    height: l.height,
                    last_seen: None,
                }
            })
            .collect();
        Self {
            layers,
            plain_last_seen: None,
        }
    }

    /// A packet without a rid arrived at `now`.
    pub fn saw_plain(&mut self, now: Instant) {
        self.plain_last_seen = Some(now);
    }

    /// Whether anything of the track arrived within [`LAYER_TIMEOUT`].
    pub fn any_alive(&self, now: Instant) -> bool {
        self.plain_last_seen
            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_TIMEOUT)
            || self.alive(now).next().is_some()
    }

    /// A packet of layer `rid` arrived at `now`.
    pub fn saw(&mut self, rid: Rid, now: Instant) {
        match self.layers.iter_mut().find(|l| l.rid == rid) {
            Some(l) => l.last_seen = Some(now),
            None => self.layers.push(Layer {
                quality: quality_of_rid(&rid),
                rid,
                width: 0,
                height: 0,
                last_seen: Some(now),
            }),
        }
    }

    /// Whether the track is simulcast at all (packets carry rids).
    pub fn is_simulcast(&self) -> bool {
        self.layers.iter().any(|l| l.last_seen.is_some())
    }

    fn alive(&self, now: Instant) -> impl Iterator<Item = &Layer> {
        self.layers.iter().filter(move |l| {
            l.last_seen
                .is_some_and(|t| now.saturating_duration_since(t) < LAYER_TIMEOUT)
        })
    }

    /// The layer to forward to a subscriber wanting at most `max_quality`: the best alive one
    /// not above it, else the lowest alive one; `None` when nothing is alive.
    pub fn choose(&self, max_quality: i32, now: Instant) -> Option<Rid> {
        let best = self
            .alive(now)
            .filter(|l| l.quality <= max_quality)
            .max_by_key(|l| l.quality);
        best.or_else(|| self.alive(now).min_by_key(|l| l.quality))
            .map(|l| l.rid)
    }

    /// Quality of `rid` (from the announced layers, else the rid convention).
    pub fn quality(&self, rid: &Rid) -> i32 {
        self.layers
            .iter()
            .find(|l| &l.rid == rid)
            .map_or_else(|| quality_of_rid(rid), |l| l.quality)
    }

    /// The quality needed to render at `width`×`height`: the smallest layer covering both,
    /// else HIGH. Unknown layer sizes count as HIGH.
    pub fn quality_for(&self, width: u32, height: u32) -> i32 {
        let mut sized: Vec<&Layer> = self.layers.iter().filter(|l| l.width > 0).collect();
        sized.sort_by_key(|l| l.width);
        sized
            .into_iter()
            .find(|l| l.width >= width && l.height >= height)
            .map_or(HIGH, |l| l.quality)
    }
}

/// What to tell a publisher (dynacast): qualities LOW ..= `max_wanted` are enabled, the rest
/// paused. LOW always stays on, so a new subscriber gets video at once (and a keyframe of a
/// running layer) instead of waiting for a stopped encoder to restart.
pub fn enabled_qualities(max_wanted: Option<i32>) -> [bool; 3] {
    let max = max_wanted.unwrap_or(LOW).max(LOW);
    let mut out = [false; 3];
    for (q, slot) in out.iter_mut().enumerate() {
        *slot = q as i32 <= max;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Layers {
        Layers::from_request(&[
            lk::VideoLayer {
                quality: LOW,
                width: 160,
                height: 90,
                ..Default::default()
            },
            lk::VideoLayer {
                quality: MEDIUM,
                width: 320,
                height: 180,
                ..Default::default()
            },
            lk::VideoLayer {
                quality: HIGH,
                width: 640,
                height: 360,
                ..Default::default()
            },
        ])
    }

    #[test]
    fn chooses_best_alive_layer_within_the_limit() {
        let t0 = Instant::now();
        let mut l = layers();
        assert_eq!(l.choose(HIGH, t0), None, "nothing alive yet");
        for rid in ["q", "h", "f"] {
            l.saw(Rid::from(rid), t0);
        }
        assert_eq!(l.choose(HIGH, t0), Some(Rid::from("f")));
        assert_eq!(l.choose(MEDIUM, t0), Some(Rid::from("h")));
        assert_eq!(l.choose(LOW, t0), Some(Rid::from("q")));
        // f stops (dynacast or congestion): HIGH subscribers fall back to h.
        let t1 = t0 + Duration::from_millis(1500);
        l.saw(Rid::from("q"), t1);
        l.saw(Rid::from("h"), t1);
        assert_eq!(l.choose(HIGH, t1), Some(Rid::from("h")));
        // Only h alive and LOW wanted: the lowest alive is better than nothing.
        let t2 = t1 + Duration::from_millis(1500);
        l.saw(Rid::from("h"), t2);
        assert_eq!(l.choose(LOW, t2), Some(Rid::from("h")));
    }

    #[test]
    fn dimensions_map_to_the_smallest_covering_layer() {
        let l = layers();
        assert_eq!(l.quality_for(100, 50), LOW);
        assert_eq!(l.quality_for(300, 170), MEDIUM);
        assert_eq!(l.quality_for(640, 360), HIGH);
        assert_eq!(l.quality_for(1920, 1080), HIGH);
        assert_eq!(l.quality(&Rid::from("h")), MEDIUM);
    }

    #[test]
    fn dynacast_enables_up_to_the_wanted_quality() {
        assert_eq!(enabled_qualities(None), [true, false, false]);
        assert_eq!(enabled_qualities(Some(LOW)), [true, false, false]);
        assert_eq!(enabled_qualities(Some(HIGH)), [true, true, true]);
    }
}
