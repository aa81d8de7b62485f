//! Connection quality from measurements: packet loss, round-trip time and jitter of a
//! participant's peer connections, scored as a mean opinion score (MOS, 1–4.5) with a
//! simplified ITU-T G.107 E-model, as LiveKit does, and mapped to LiveKit's three levels.
//!
//! Why the E-model: it turns three unlike measurements into one number users' experience
//! follows (delay barely matters under 150 ms one way; loss matters at once), with published
//! constants instead of thresholds of our own. Opus conceals loss well, so its loss
//! robustness (`Bpl`) is high; a client sees the worst of its directions, so the participant
//! gets the worst of its upstream (what the SFU receives) and downstream (what its client
//! reports receiving).

use livekit_protocol as lk;

/// Loss robustness of the codec (G.113 `Bpl`; about 10 for Opus with loss concealment).
const LOSS_ROBUSTNESS: f64 = 10.0;

/// What was measured on one direction of a participant's connections.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Measured {
    /// Fraction of packets lost (0–1).
    pub loss: f64,
    /// Round-trip time, ms.
    pub rtt_ms: f64,
    /// Interarrival jitter, ms.
    pub jitter_ms: f64,
}

/// MOS (1–4.5) of a connection with these measurements.
pub fn mos(m: &Measured) -> f64 {
    // One-way delay: half the round trip, plus a jitter buffer of twice the jitter, plus the
    // codec's own 20 ms frame.
    let d = m.rtt_ms / 2.0 + 2.0 * m.jitter_ms + 20.0;
    let id = 0.024 * d + if d > 177.3 { 0.11 * (d - 177.3) } else { 0.0 };
    let ppl = (m.loss * 100.0).clamp(0.0, 100.0);
    let ie_eff = 95.0 * ppl / (ppl + LOSS_ROBUSTNESS);
    let r = (93.2 - id - ie_eff).clamp(0.0, 100.0);
    let mos = 1.0 + 0.035 * r + 7.0e-6 * r * (r - 60.0) * (100.0 - r);
    mos.clamp(1.0, 4.5)
}

/// LiveKit's level for a MOS: excellent from 4.0 (no noticeable impairment), good from 3.5,
/// poor below.
pub fn level(mos: f64) -> lk::ConnectionQuality {
    if mos >= 4.0 {
        lk::ConnectionQuality::Excellent
    } else if mos >= 3.5 {
        lk::ConnectionQuality::Good
    } else {
        lk::ConnectionQuality::Poor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(loss: f64, rtt_ms: f64, jitter_ms: f64) -> Measured {
        Measured {
            loss,
            rtt_ms,
            jitter_ms,
        }
    }

    #[test]
    fn a_clean_link_is_excellent() {
        let s = mos(&m(0.0, 20.0, 2.0));
        assert!(s > 4.3, "{s}");
        assert_eq!(level(s), lk::ConnectionQuality::Excellent);
    }

    #[test]
    fn loss_degrades_first_to_good_then_poor() {
        // Opus hides 1 % loss; 2 % is noticeable, 5 % is poor.
        assert_eq!(
            level(mos(&m(0.01, 40.0, 5.0))),
            lk::ConnectionQuality::Excellent
        );
        assert_eq!(level(mos(&m(0.02, 40.0, 5.0))), lk::ConnectionQuality::Good);
        assert_eq!(level(mos(&m(0.05, 40.0, 5.0))), lk::ConnectionQuality::Poor);
        assert!(mos(&m(0.01, 40.0, 5.0)) > mos(&m(0.02, 40.0, 5.0)));
    }

    #[test]
    fn long_delay_alone_makes_a_call_poor() {
        assert_eq!(
            level(mos(&m(0.0, 150.0, 5.0))),
            lk::ConnectionQuality::Excellent
        );
        assert_eq!(
            level(mos(&m(0.0, 900.0, 30.0))),
            lk::ConnectionQuality::Poor
        );
    }

    #[test]
    fn scores_stay_in_range() {
        assert_eq!(mos(&m(1.0, 10_000.0, 1_000.0)), 1.0);
        assert!(mos(&m(0.0, 0.0, 0.0)) <= 4.5);
    }
}
