//! Splitting one subscriber's downlink estimate over the video tracks it receives.
//!
//! Why this shape (LiveKit's stream allocator, simplified): audio is small and what a call
//! cannot lose, so it is reserved first and never paused; video then gets, in priority order
//! (screen share, the active speaker, the others), its lowest layer while the budget lasts, so
//! everyone stays visible before anyone gets sharper; what is left upgrades tracks in the same
//! order, each to the best layer that still fits. A track whose lowest layer does not fit is
//! paused rather than sent into a link that would drop it (a frozen picture is worse than a
//! paused one the client knows about).
//!
//! Upgrades need headroom ([`UPGRADE_HEADROOM`]) over the estimate that downgrades do not, so
//! an estimate hovering at a layer's bitrate does not flap between two layers.
//!
//! Pure: no clock, no engine state; the engine (`engine/bandwidth.rs`) gathers the inputs.

/// An upgrade (or a resume) must fit in the budget with this much to spare (1.15 = 15 %).
pub const UPGRADE_HEADROOM: f64 = 1.15;

/// Who gets bandwidth first: lower sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A screen share: text must stay readable.
    Screen,
    /// A camera of someone speaking now.
    Speaker,
    /// Any other video.
    Other,
}

/// One video track a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoWant {
    /// Its priority.
    pub priority: Priority,
    /// The layers it may get, as (quality, bits/s), lowest first (see
    /// [`crate::sfu::simulcast::Layers::options`]). Empty: nothing is arriving, nothing to
    /// allocate.
    pub layers: Vec<(i32, u64)>,
    /// What it got last time, to tell an upgrade from a downgrade.
    pub current: Grant,
}

/// What a video track gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Forward layers up to this quality.
    UpTo(i32),
    /// Nothing fits: paused.
    Paused,
}

/// The result for one subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    /// One grant per [`VideoWant`], in their order (unchanged for a track with nothing
    /// arriving).
    pub grants: Vec<Grant>,
    /// Bits/s the grants and the audio use.
    pub used: u64,
    /// Bits/s everything would use at the best layers wanted (what to probe for).
    pub ideal: u64,
    /// The smallest further step (bits/s) that would improve a track (upgrade or resume),
    /// if any: the probe target is `used + next_step`.
    pub next_step: Option<u64>,
    /// Bits/s the current grants (and the audio) cost at today's layer bitrates: what the
    /// link carries now.
    pub current: u64,
}

impl Grant {
    /// Whether `self` gives less than `other` (paused is the least).
    pub fn below(self, other: Grant) -> bool {
        match (self, other) {
            (Grant::Paused, Grant::UpTo(_)) => true,
            (Grant::UpTo(a), Grant::UpTo(b)) => a < b,
            _ => false,
        }
    }
}

/// What `audio` and the current grants of `video` cost (bits/s): each track's best layer not
/// above its grant (the lowest when all are), nothing for a paused one.
pub fn current_cost(audio: u64, video: &[VideoWant]) -> u64 {
    let mut cost = audio;
    for w in video {
        if let Grant::UpTo(q) = w.current {
            let layer = w
                .layers
                .iter()
                .rev()
                .find(|l| l.0 <= q)
                .or(w.layers.first());
            cost += layer.map_or(0, |l| l.1);
        }
    }
    cost
}

/// Spreads `estimate` (bits/s) over `audio` (bits/s, always kept) and `video`.
pub fn allocate(estimate: u64, audio: u64, video: &[VideoWant]) -> Allocation {
    let mut order: Vec<usize> = (0..video.len()).collect();
    order.sort_by_key(|&i| video[i].priority);
    let mut left = estimate.saturating_sub(audio) as f64;
    let mut grants = vec![Grant::Paused; video.len()];
    // The layer index each track got, for the upgrade pass.
    let mut got: Vec<Option<usize>> = vec![None; video.len()];
    let cost = |w: &VideoWant, layer: usize, from: Option<usize>| -> f64 {
        let rate = w.layers[layer].1 as f64;
        let before = from.map_or(0.0, |f| w.layers[f].1 as f64);
        let step = (rate - before).max(0.0);
        // Above what it had last time: an upgrade, which needs headroom.
        let above = match w.current {
            Grant::UpTo(q) => w.layers[layer].0 > q,
            Grant::Paused => true,
        };
        if above {
            step * UPGRADE_HEADROOM
        } else {
            step
        }
    };
    for &i in &order {
        let w = &video[i];
        if w.layers.is_empty() {
            continue;
        }
        let c = cost(w, 0, None);
        if c <= left {
            left -= w.layers[0].1 as f64;
            got[i] = Some(0);
        }
    }
    for &i in &order {
        let w = &video[i];
        let Some(mut at) = got[i] else {
            continue;
        };
        while at + 1 < w.layers.len() && cost(w, at + 1, Some(at)) <= left {
            left -= (w.layers[at + 1].1 as f64 - w.layers[at].1 as f64).max(0.0);
            at += 1;
        }
        got[i] = Some(at);
    }
    let mut used = audio;
    let mut ideal = audio;
    let current = current_cost(audio, video);
    let mut next_step: Option<u64> = None;
    for (i, w) in video.iter().enumerate() {
        let Some(best) = w.layers.last() else {
            // Nothing arriving: nothing to decide (the stream is shown paused as stopped).
            grants[i] = w.current;
            continue;
        };
        ideal += best.1;
        let step = match got[i] {
            Some(at) => {
                grants[i] = Grant::UpTo(w.layers[at].0);
                used += w.layers[at].1;
                w.layers
                    .get(at + 1)
                    .map(|up| up.1.saturating_sub(w.layers[at].1))
            }
            None => Some(w.layers[0].1),
        };
        if let Some(step) = step {
            next_step = Some(next_step.map_or(step, |n| n.min(step)));
        }
    }
    Allocation {
        grants,
        used,
        ideal,
        next_step,
        current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOW: i32 = 0;
    const MEDIUM: i32 = 1;
    const HIGH: i32 = 2;

    /// A camera sending three layers: 100, 300 and 900 kbit/s.
    fn camera(priority: Priority, current: Grant) -> VideoWant {
        VideoWant {
            priority,
            layers: vec![(LOW, 100_000), (MEDIUM, 300_000), (HIGH, 900_000)],
            current,
        }
    }

    #[test]
    fn plenty_gives_every_track_its_best_layer() {
        let a = allocate(
            5_000_000,
            64_000,
            &[
                camera(Priority::Other, Grant::UpTo(HIGH)),
                camera(Priority::Other, Grant::UpTo(HIGH)),
            ],
        );
        assert_eq!(a.grants, vec![Grant::UpTo(HIGH); 2]);
        assert_eq!(a.used, 64_000 + 1_800_000);
        assert_eq!(a.ideal, a.used);
        assert_eq!(a.current, a.used);
        assert_eq!(a.next_step, None);
    }

    #[test]
    fn a_narrow_link_steps_down_to_the_layer_that_fits() {
        // 300 kbit/s: audio 40, low layer 100; medium would need 300.
        let a = allocate(
            300_000,
            40_000,
            &[camera(Priority::Other, Grant::UpTo(HIGH))],
        );
        assert_eq!(a.grants, vec![Grant::UpTo(LOW)]);
        assert_eq!(a.used, 140_000);
        assert_eq!(a.ideal, 940_000);
        assert_eq!(a.current, 940_000, "what the top layer costs now");
        assert!(Grant::UpTo(LOW).below(Grant::UpTo(HIGH)));
        assert!(Grant::Paused.below(Grant::UpTo(LOW)));
        assert!(!Grant::UpTo(HIGH).below(Grant::UpTo(HIGH)));
        assert_eq!(a.next_step, Some(200_000), "medium is the next step");
    }

    #[test]
    fn below_the_lowest_layer_video_pauses_and_audio_stays() {
        let a = allocate(90_000, 40_000, &[camera(Priority::Other, Grant::UpTo(LOW))]);
        assert_eq!(a.grants, vec![Grant::Paused]);
        assert_eq!(a.used, 40_000, "audio is kept");
        assert_eq!(a.next_step, Some(100_000), "resuming needs the low layer");
    }

    #[test]
    fn everyone_visible_before_anyone_sharp_and_the_speaker_first() {
        // 500 kbit/s for two cameras: both low (200), then the speaker medium (+200), the
        // other stays low (medium would need +200 more).
        let video = [
            camera(Priority::Other, Grant::UpTo(LOW)),
            camera(Priority::Speaker, Grant::UpTo(LOW)),
        ];
        let a = allocate(500_000, 0, &video);
        assert_eq!(a.grants, vec![Grant::UpTo(LOW), Grant::UpTo(MEDIUM)]);
        // Too little for two: the screen share keeps its low layer, the camera pauses.
        let video = [
            camera(Priority::Other, Grant::UpTo(LOW)),
            camera(Priority::Screen, Grant::UpTo(LOW)),
        ];
        let a = allocate(150_000, 0, &video);
        assert_eq!(a.grants, vec![Grant::Paused, Grant::UpTo(LOW)]);
    }

    #[test]
    fn upgrades_need_headroom_that_keeping_a_layer_does_not() {
        // Exactly enough for medium (300 kbit/s): kept when already there, not taken when
        // coming from low, so an estimate at the boundary does not flap.
        let keep = allocate(300_000, 0, &[camera(Priority::Other, Grant::UpTo(MEDIUM))]);
        assert_eq!(keep.grants, vec![Grant::UpTo(MEDIUM)]);
        let up = allocate(300_000, 0, &[camera(Priority::Other, Grant::UpTo(LOW))]);
        assert_eq!(up.grants, vec![Grant::UpTo(LOW)]);
        let up = allocate(340_000, 0, &[camera(Priority::Other, Grant::UpTo(LOW))]);
        assert_eq!(up.grants, vec![Grant::UpTo(MEDIUM)]);
        // A paused track resumes only with headroom over its lowest layer.
        let paused = allocate(105_000, 0, &[camera(Priority::Other, Grant::Paused)]);
        assert_eq!(paused.grants, vec![Grant::Paused]);
        let resumed = allocate(120_000, 0, &[camera(Priority::Other, Grant::Paused)]);
        assert_eq!(resumed.grants, vec![Grant::UpTo(LOW)]);
    }

    #[test]
    fn a_track_with_nothing_arriving_costs_nothing() {
        let idle = VideoWant {
            priority: Priority::Screen,
            layers: Vec::new(),
            current: Grant::UpTo(HIGH),
        };
        let a = allocate(
            150_000,
            0,
            &[idle, camera(Priority::Other, Grant::UpTo(LOW))],
        );
        assert_eq!(a.grants, vec![Grant::UpTo(HIGH), Grant::UpTo(LOW)]);
        assert_eq!(a.ideal, 900_000);
    }
}
