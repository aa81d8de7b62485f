//! Each subscriber's downlink: str0m's send-side bandwidth estimate (transport-wide congestion
//! control feedback, delay- and loss-based, with probing) split over the tracks it receives
//! (`sfu/allocate.rs`), and what its connections measured for connection quality
//! (`sfu/quality.rs`).
//!
//! Every [`super::SPEAKER_INTERVAL`] the engine turns the bytes each published layer carried
//! into bitrates, then, per subscriber with an estimate, caps each video down-track at the
//! layer that fits or pauses it ([`DownTrack::grant`]); `update_layers` then tells the client
//! of paused streams (`StreamStateUpdate`) in the same pass. The estimator is told what the
//! subscriber would like to receive (the best layers it asked for), so str0m probes for that
//! much when it is not there yet; the probes are what brings a stepped-down subscriber back
//! up once its link recovers.
//!
//! A subscriber without an estimate (its client did not negotiate transport-cc) is not
//! limited: it gets what it asks for, as before.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use str0m::bwe::Bitrate;
use str0m::media::{MediaKind, Mid, Rid};

use super::downtrack::DownState;
use super::{SessionId, Sfu};
use crate::sfu::allocate::{self, Grant, Priority, VideoWant};
use crate::sfu::ids::TrackSid;
use crate::sfu::quality::Measured;
use crate::sfu::simulcast;
use livekit_protocol as lk;

/// How often str0m reports loss, RTT and jitter per peer connection.
pub(super) const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// The estimate a subscriber connection starts from, before any feedback: enough for a
/// camera's top layer at 360p, so a new subscriber on a good link does not start blurry; the
/// delay-based estimator brings it down within a second or two on a link that cannot.
pub(super) const INITIAL_ESTIMATE: Bitrate = Bitrate::kbps(1_500);

/// Loss above which the estimate is discounted by it ([`Link::budget`]).
const HEAVY_LOSS: f64 = 0.1;

/// The estimator is reconfigured only when what it is told changes by more than this share.
const PROBE_RETUNE: f64 = 0.1;

/// What a participant's connections measured.
#[derive(Debug, Clone, Default)]
pub(super) struct Link {
    /// The downlink estimate (bits/s) while str0m can estimate (transport-cc negotiated and
    /// feedback possible).
    pub(super) estimate: Option<u64>,
    /// What the estimator was last told: (minimum, desired) bits/s.
    probe: Option<(u64, u64)>,
    /// What arrives from the client (its upstream).
    pub(super) up: Measured,
    /// What the client reports receiving (its downstream): loss from transport-cc feedback.
    pub(super) down: Measured,
    /// Downstream loss from the client's last RTCP receiver report (of any stream), for
    /// clients without transport-cc.
    pub(super) reported_loss: f64,
    /// NACKs received per outgoing stream so far (str0m's running count).
    pub(super) nacks_seen: HashMap<(Mid, Option<Rid>), u64>,
}

impl Link {
    /// What the allocator may spend: the estimate, discounted by the loss the client reports
    /// when it is heavy. Why: with a shaped link whose queue is full, the delay stops growing
    /// and only loss tells; str0m's estimate stayed at three times a 60 kbit/s link losing half
    /// of what was sent (the engine's virtual-link test), which would never pause the video
    /// that does not fit.
    pub(super) fn budget(&self) -> Option<u64> {
        let estimate = self.estimate?;
        let loss = self.down.loss.max(self.reported_loss);
        if loss > HEAVY_LOSS {
            Some((estimate as f64 * (1.0 - loss.min(1.0))) as u64)
        } else {
            Some(estimate)
        }
    }

    /// Whether (minimum, desired) differs enough from what the estimator was told.
    fn retune(&self, next: (u64, u64)) -> bool {
        let far = |a: u64, b: u64| (a as f64 - b as f64).abs() > PROBE_RETUNE * (b.max(1) as f64);
        self.probe
            .is_none_or(|(min, desired)| far(next.0, min) || far(next.1, desired))
    }
}

/// A loss figure smoothed over str0m's one-second samples (each weighs half): one second's
/// loss is noisy (a burst, a feedback report not in yet), the quality and the budget should
/// follow the trend.
pub(super) fn smooth(previous: f64, sample: f64) -> f64 {
    (previous + sample) / 2.0
}

/// The jitter of a stream in ms, from RTP timestamp units.
pub(super) fn jitter_ms(units: u32, kind: MediaKind) -> f64 {
    let hz = if kind == MediaKind::Audio {
        48_000.0
    } else {
        90_000.0
    };
    f64::from(units) * 1000.0 / hz
}

/// One subscriber's allocation, computed with the room borrowed immutably.
struct Decision {
    subscriber: SessionId,
    /// Down-track index → grant; `None`: no estimate, nothing is capped.
    grants: Option<Vec<(usize, Grant)>>,
    estimate: u64,
    /// (minimum, desired) for the estimator.
    probe: (u64, u64),
}

impl Sfu {
    /// Measures the layers' bitrates over the last `elapsed` and allocates every subscriber's
    /// estimate (see the module docs).
    pub(super) fn allocate_bandwidth(&mut self, now: Instant, elapsed: Duration) {
        let mut retuned = Vec::new();
        for room in self.rooms.values_mut() {
            for p in room.participants.values_mut() {
                for t in &mut p.tracks {
                    t.layers.measure(elapsed);
                }
            }
            let mut decisions = Vec::new();
            {
                let mut tracks = HashMap::new();
                for p in room.participants.values() {
                    for t in &p.tracks {
                        let screen = t.info.source == lk::TrackSource::ScreenShare as i32;
                        let priority = if screen {
                            Priority::Screen
                        } else if p.speaking {
                            Priority::Speaker
                        } else {
                            Priority::Other
                        };
                        tracks.insert(&t.sid, (priority, t));
                    }
                }
                for s in room.participants.values() {
                    let Some(estimate) = s.link.budget() else {
                        decisions.push(Decision {
                            subscriber: s.session,
                            grants: None,
                            estimate: 0,
                            probe: (0, 0),
                        });
                        continue;
                    };
                    let mut audio = 0;
                    let mut wants = Vec::new();
                    let mut index = Vec::new();
                    for (i, d) in s.down_tracks.iter().enumerate() {
                        if !matches!(d.state, DownState::Open(_)) || d.disabled {
                            continue;
                        }
                        let Some(&(priority, t)) = tracks.get(&d.track_sid) else {
                            continue;
                        };
                        if t.kind == MediaKind::Audio {
                            audio += t.layers.plain_bitrate();
                            continue;
                        }
                        wants.push(VideoWant {
                            priority,
                            layers: t.layers.options(d.max_quality, now),
                            current: d.grant,
                        });
                        index.push(i);
                    }
                    let a = allocate::allocate(estimate, audio, &wants);
                    decisions.push(Decision {
                        subscriber: s.session,
                        grants: Some(index.into_iter().zip(a.grants).collect()),
                        estimate,
                        probe: (a.used, a.ideal.max(a.used)),
                    });
                }
            }
            for d in decisions {
                let Some(s) = room.participants.get_mut(&d.subscriber) else {
                    continue;
                };
                let session = s.session;
                match d.grants {
                    None => {
                        for t in &mut s.down_tracks {
                            t.set_grant(Grant::UpTo(simulcast::HIGH));
                        }
                    }
                    Some(grants) => {
                        for (i, grant) in grants {
                            let Some(t) = s.down_tracks.get_mut(i) else {
                                continue;
                            };
                            let from = t.grant;
                            if t.set_grant(grant) {
                                log_change(session, &t.track_sid, from, grant, d.estimate);
                                match (from, grant) {
                                    (_, Grant::Paused) => self.stats.bandwidth_pauses += 1,
                                    (Grant::UpTo(a), Grant::UpTo(b)) if b < a => {
                                        self.stats.bandwidth_downgrades += 1;
                                    }
                                    _ => {}
                                }
                            }
                        }
                        if s.link.retune(d.probe) {
                            s.link.probe = Some(d.probe);
                            s.transport
                                .sub_pc_mut()
                                .rtc
                                .bwe()
                                .set_bitrate(Bitrate::bps(d.probe.0), Bitrate::bps(d.probe.1));
                            retuned.push(session);
                        }
                    }
                }
            }
        }
        // The estimator re-armed its timers: poll so the loop learns the new deadline.
        for session in retuned {
            self.drain(now, session);
        }
    }
}

fn log_change(subscriber: SessionId, track: &TrackSid, from: Grant, to: Grant, estimate: u64) {
    tracing::info!(
        %subscriber,
        %track,
        ?from,
        ?to,
        estimate_kbps = estimate / 1000,
        "bandwidth: video track re-allocated"
    );
}
