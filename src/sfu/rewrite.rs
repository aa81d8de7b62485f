//! Per-subscriber RTP timeline rewriting: when the source of a forwarded stream changes
//! (simulcast layer switch, republish), the outgoing RTP timestamps continue from where they
//! were, advanced by the wall-clock time that passed, instead of jumping to the new source's
//! random offset. Sequence numbers are rewritten alongside (`engine/packet.rs`); the SSRC is the
//! outgoing stream's own.

use std::time::Instant;

/// Maps source timestamps onto one continuous outgoing timeline.
#[derive(Debug, Default, Clone)]
pub struct Timeline {
    source: Option<u64>,
    offset: i64,
    last_out: Option<(u64, Instant)>,
}

impl Timeline {
    /// The outgoing timestamp for `ts` (ticks at `clock_hz`) from `source`, received at `now`.
    pub fn map(&mut self, source: u64, ts: u64, clock_hz: u32, now: Instant) -> u64 {
        if self.source != Some(source) {
            let target = match self.last_out {
                Some((last, at)) => {
                    let elapsed = now.saturating_duration_since(at);
                    let ticks = (elapsed.as_secs_f64() * f64::from(clock_hz)) as u64;
                    last + ticks.max(1)
                }
                None => ts,
            };
            self.offset = target as i64 - ts as i64;
            self.source = Some(source);
        }
        let out = (ts as i64 + self.offset).max(0) as u64;
        // Never go backwards within a source (reordered frames keep their relative order).
        self.last_out = Some(match self.last_out {
            Some((last, at)) if last > out => (last, at),
            _ => (out, now),
        });
        out
    }

    /// The source currently mapped.
    pub fn source(&self) -> Option<u64> {
        self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn continuous_across_a_source_change() {
        let t0 = Instant::now();
        let mut tl = Timeline::default();
        // Source A: 90 kHz, 30 fps → 3000 ticks per frame, starting at a random offset.
        let mut out = Vec::new();
        for i in 0..10u64 {
            out.push(tl.map(
                1,
                1_000_000 + i * 3000,
                90_000,
                t0 + Duration::from_millis(i * 33),
            ));
        }
        assert_eq!(out[0], 1_000_000, "first source passes through");
        assert!(out.windows(2).all(|w| w[1] - w[0] == 3000));
        // Switch to source B with a wildly different offset, 33 ms after the last frame.
        let b0 = 42;
        let at = t0 + Duration::from_millis(9 * 33 + 33);
        let first_b = tl.map(2, b0, 90_000, at);
        let step = first_b - out[9];
        assert!((2900..=3100).contains(&step), "continuity step {step}");
        // B's own spacing is preserved afterwards.
        let second_b = tl.map(2, b0 + 3000, 90_000, at + Duration::from_millis(33));
        assert_eq!(second_b - first_b, 3000);
        assert_eq!(tl.source(), Some(2));
    }

    #[test]
    fn switch_back_keeps_moving_forward() {
        let t0 = Instant::now();
        let mut tl = Timeline::default();
        let a = tl.map(1, 500, 48_000, t0);
        let b = tl.map(2, 10, 48_000, t0 + Duration::from_millis(20));
        let c = tl.map(1, 1460, 48_000, t0 + Duration::from_millis(40));
        assert!(a < b && b < c, "{a} {b} {c}");
    }
}
