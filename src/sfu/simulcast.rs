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
    /// Bytes arrived since the last [`Layers::measure`].
    pub bytes: u64,
    /// Highest RTP sequence number counted (retransmissions and the publisher's RTX padding
    /// repeat older ones and are not counted: they are not what the layer costs).
    pub max_seq: u64,
    /// Its bitrate (bits/s, smoothed over the last measurements; kept while it is stopped, as
    /// what it would cost once it resumes).
    pub bitrate: u64,
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

/// Bits per second of `bytes` over `elapsed`.
pub fn bits_per_second(bytes: u64, elapsed: Duration) -> u64 {
    bytes * 8 * 1000 / elapsed.as_millis().max(1) as u64
}

/// A bitrate `previous` moved towards the new `sample`, which weighs 30 % (keyframes make
/// single windows jumpy).
pub fn smoothed(previous: u64, sample: u64) -> u64 {
    (previous * 7 + sample * 3) / 10
}

/// The bitrate of a layer seen for one window only (1 bit/s: not free, not known yet).
const UNMEASURED: u64 = 1;

/// Bytes a packet costs on the wire beyond its RTP payload: RTP header with the usual
/// extensions (~24), SRTP tag (10), UDP and IPv4 headers (28).
pub const PACKET_OVERHEAD: u64 = 62;

/// The layers of a track.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    layers: Vec<Layer>,
    /// Last packet without a rid (non-simulcast tracks).
    plain_last_seen: Option<Instant>,
    /// Bytes and bitrate of the packets without a rid, as [`Layer::bytes`] and
    /// [`Layer::bitrate`].
    plain_bytes: u64,
    plain_bitrate: u64,
    plain_max_seq: u64,
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
                    bytes: 0,
                    bitrate: 0,
                    max_seq: 0,
                }
            })
            .collect();
        Self {
            layers,
            ..Self::default()
        }
    }

    /// A packet without a rid, of `bytes` on the wire and RTP sequence number `seq`
    /// (extended), arrived at `now`.
    pub fn saw_plain(&mut self, now: Instant, seq: u64, bytes: u64) {
        self.plain_last_seen = Some(now);
        if seq > self.plain_max_seq {
            self.plain_max_seq = seq;
            self.plain_bytes += bytes;
        }
    }

    /// Whether anything of the track arrived within [`LAYER_TIMEOUT`].
    pub fn any_alive(&self, now: Instant) -> bool {
        self.plain_last_seen
            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_TIMEOUT)
            || self.alive(now).next().is_some()
    }

    /// A packet of layer `rid`, of `bytes` on the wire and RTP sequence number `seq`
    /// (extended), arrived at `now`.
    pub fn saw(&mut self, rid: Rid, now: Instant, seq: u64, bytes: u64) {
        match self.layers.iter_mut().find(|l| l.rid == rid) {
            Some(l) => {
                l.last_seen = Some(now);
                if seq > l.max_seq {
                    l.max_seq = seq;
                    l.bytes += bytes;
                }
            }
            None => self.layers.push(Layer {
                quality: quality_of_rid(&rid),
                rid,
                width: 0,
                height: 0,
                last_seen: Some(now),
                bytes,
                bitrate: 0,
                max_seq: seq,
            }),
        }
    }

    /// Turns the bytes counted over the last `elapsed` into bitrates. A layer that sent
    /// nothing keeps its last bitrate (what it will cost when it resumes); otherwise the new
    /// rate weighs 30 % (keyframes make single windows jumpy). A layer's first window is
    /// not counted: it starts with a keyframe, several times a normal frame.
    pub fn measure(&mut self, elapsed: Duration) {
        let smooth = |bytes: u64, bitrate: u64| -> u64 {
            let now = bits_per_second(bytes, elapsed);
            if bitrate == UNMEASURED {
                now
            } else {
                smoothed(bitrate, now)
            }
        };
        let update = |bytes: &mut u64, bitrate: &mut u64| {
            if *bytes > 0 {
                *bitrate = if *bitrate == 0 {
                    UNMEASURED
                } else {
                    smooth(*bytes, *bitrate)
                };
                *bytes = 0;
            }
        };
        for l in &mut self.layers {
            update(&mut l.bytes, &mut l.bitrate);
        }
        update(&mut self.plain_bytes, &mut self.plain_bitrate);
    }

    /// The bitrate of layer `rid` (0 before it is measured).
    pub fn bitrate_of(&self, rid: &Rid) -> u64 {
        self.layers
            .iter()
            .find(|l| &l.rid == rid)
            .map_or(0, |l| l.bitrate)
    }

    /// The bitrate of the stream without rids (audio, non-simulcast video).
    pub fn plain_bitrate(&self) -> u64 {
        self.plain_bitrate
    }

    /// The alive layers a subscriber wanting at most `max_quality` may get, as (quality,
    /// bitrate), lowest first: those not above it, else the lowest alive one. Without
    /// simulcast, the one plain stream (quality HIGH) when alive.
    pub fn options(&self, max_quality: i32, now: Instant) -> Vec<(i32, u64)> {
        if !self.is_simulcast() {
            let alive = self
                .plain_last_seen
                .is_some_and(|t| now.saturating_duration_since(t) < LAYER_TIMEOUT);
            return if alive {
                vec![(HIGH, self.plain_bitrate)]
            } else {
                Vec::new()
            };
        }
        let mut out: Vec<(i32, u64)> = self
            .alive(now)
            .filter(|l| l.quality <= max_quality)
            .map(|l| (l.quality, l.bitrate))
            .collect();
        if out.is_empty() {
            out.extend(
                self.alive(now)
                    .min_by_key(|l| l.quality)
                    .map(|l| (l.quality, l.bitrate)),
            );
        }
        out.sort_by_key(|&(q, _)| q);
        out
    }

    /// The layers announced or seen as (rid, quality), lowest quality first.
    pub fn rid_qualities(&self) -> Vec<(Rid, i32)> {
        let mut layers: Vec<(Rid, i32)> = self.layers.iter().map(|l| (l.rid, l.quality)).collect();
        layers.sort_by_key(|&(_, q)| q);
        layers
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
            l.saw(Rid::from(rid), t0, 1, 100);
        }
        assert_eq!(l.choose(HIGH, t0), Some(Rid::from("f")));
        assert_eq!(l.choose(MEDIUM, t0), Some(Rid::from("h")));
        assert_eq!(l.choose(LOW, t0), Some(Rid::from("q")));
        // f stops (dynacast or congestion): HIGH subscribers fall back to h.
        let t1 = t0 + Duration::from_millis(1500);
        l.saw(Rid::from("q"), t1, 1, 100);
        l.saw(Rid::from("h"), t1, 1, 100);
        assert_eq!(l.choose(HIGH, t1), Some(Rid::from("h")));
        // Only h alive and LOW wanted: the lowest alive is better than nothing.
        let t2 = t1 + Duration::from_millis(1500);
        l.saw(Rid::from("h"), t2, 1, 100);
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
