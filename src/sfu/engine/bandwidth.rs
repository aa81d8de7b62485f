//! Each subscriber's downlink: str0m's send-side bandwidth estimate (transport-wide congestion
//! control feedback, delay- and loss-based, with probing) split over the tracks it receives
//! (`sfu/allocate.rs`), and what its connections measured for connection quality
//! (`sfu/quality.rs`).
//!
//! Every [`super::SPEAKER_INTERVAL`] the engine turns the bytes each published layer carried
//! into bitrates, then, per subscriber with an estimate, caps each video down-track at the
//! layer that fits or pauses it ([`DownTrack::grant`]); `update_layers` then tells the client
//! of paused streams (`StreamStateUpdate`) in the same pass. Steps down need loss as well as
//! a short estimate, pauses need it for three seconds, steps up need room for a second (see
//! the constants: each is there because a run without it misbehaved). The estimator is told
//! what the subscriber would like to receive (the best layers it asked for), and probes for
//! it ([`Link::tune`]): the probes are what brings a stepped-down subscriber back up once its
//! link recovers. `docs/quality.md` has the whole picture and the measurements.
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

/// Loss above which the budget is at most what arrives ([`Link::budget`]).
const HEAVY_LOSS: f64 = 0.1;

/// The estimator is reconfigured only when what it is told changes by more than this share.
const PROBE_RETUNE: f64 = 0.1;

/// Budget below this share of what the current grants cost: the link is congested, step down
/// at once. (At 0.95 an unshaped subscriber's estimate, noisy on a loaded machine, stepped it
/// down now and then.)
const CONGESTED: f64 = 0.85;

/// Loss (latest sample) above which a budget short of what is sent at all means congestion.
const LOSING: f64 = 0.05;

/// Loss (smoothed or latest) that must come with a short budget for a step down. Why: the
/// delay-based estimate alone is not evidence enough: with the receivers' decoders busy on a
/// loaded machine it sank to 60 % of a loopback link, lossless, and paused a layer the
/// subscriber was receiving fine (the simulcast interop test).
const SOME_LOSS: f64 = 0.02;

/// A budget under this share of what is sent steps down without loss.
const COLLAPSED: f64 = 0.5;

/// Allocation passes in a row (500 ms apart) that must find no room for a track before it is
/// paused: the estimate undershoots for a second or two after congestion, and the loss of the
/// layers sent before a step down still shows in the next second's sample.
const PAUSE_VOTES: u8 = 6;

/// [`PAUSE_VOTES`] when the loss itself says the lowest layer does not fit ([`Link::budget`]
/// below the estimate): the estimate is not in doubt then, and every half second waited
/// loses audio too (a third of it on a 134 kbit/s link under the low layer).
const PAUSE_VOTES_LOSING: u8 = 3;

/// How long after a layer switch the loss measured is still that of the layer before: a
/// one-second stats sample, and the feedback's way back.
const LOSS_SETTLE: Duration = Duration::from_millis(1_500);

/// Allocation passes in a row that must find room before a track steps up.
const UP_VOTES: u8 = 2;

/// A track stepped down is not raised again before this.
const RAISE_HOLD: Duration = Duration::from_secs(2);

/// How long a grant that congested the link is remembered ([`Failed`]).
const FAILED_MEMORY: Duration = Duration::from_secs(20);

/// The budget a grant that congested the link needs, as a share of the budget it failed at,
/// before it is granted again within [`FAILED_MEMORY`].
const FAILED_MARGIN: f64 = 1.25;

/// A grant that congested the link: given at an estimate the link did not carry. Why: on a
/// 300 kbit/s shaped link a dip-and-raise probe measured 369–386 kbit/s (the shaper counts
/// Ethernet, IP and UDP headers, the estimate does not), the medium layer the subscriber had
/// been stepped down from seconds before (given at 370 kbit/s, failed at 259) was granted
/// again, the link congested and the video paused for 4 s or left the low layer (the Chromium
/// quality test, three times). Until [`FAILED_MEMORY`] has passed, that grant (or more) needs
/// [`FAILED_MARGIN`] times the budget it failed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Failed {
    /// The grant stepped down from.
    grant: Grant,
    /// The budget it had been given at.
    budget: u64,
    /// When it was stepped down.
    at: Instant,
}

impl Failed {
    /// Whether raising to `grant` with `budget` (bits/s) at `now` must wait: it reaches the
    /// grant that failed, recently, without a budget clearly above the one it failed at.
    pub(super) fn blocks(&self, grant: Grant, budget: u64, now: Instant) -> bool {
        now.saturating_duration_since(self.at) < FAILED_MEMORY
            && !grant.below(self.grant)
            && (budget as f64) < FAILED_MARGIN * self.budget as f64
    }
}

/// Loss (latest sample) under which the link counts as quiet enough to probe.
const QUIET_LOSS: f64 = 0.02;

/// No desired bitrate is set below this (bits/s): see [`Link::tune`].
const DESIRED_FLOOR: u64 = 64_000;

/// Waits between probes for more bandwidth (see [`Link::tune`]).
const PROBE_BACKOFF_MIN: Duration = Duration::from_secs(1);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(4);

/// What a participant's connections measured.
#[derive(Debug, Clone, Default)]
pub(super) struct Link {
    /// The downlink estimate (bits/s) while str0m can estimate (transport-cc negotiated and
    /// feedback possible).
    pub(super) estimate: Option<u64>,
    /// The desired bitrate the estimator was last told (bits/s).
    desired: Option<u64>,
    /// When the next probe for more may start, and the wait after it (doubling while probes
    /// find nothing, from [`PROBE_BACKOFF_MIN`] to [`PROBE_BACKOFF_MAX`]).
    probe_due: Option<Instant>,
    probe_backoff: Duration,
    /// Whether the desired bitrate dipped in the last pass (the next one raises it: a probe).
    dipped: bool,
    /// The estimate when the last probe was started.
    probed_at_estimate: Option<u64>,
    /// Whether the pause in the making was preceded by a restart already.
    restarted_for_pause: bool,
    /// What arrives from the client (its upstream).
    pub(super) up: Measured,
    /// What the client reports receiving (its downstream): loss from transport-cc feedback.
    pub(super) down: Measured,
    /// Downstream loss from the client's last RTCP receiver report (of any stream), for
    /// clients without transport-cc.
    pub(super) reported_loss: f64,
    /// The latest one-second samples of the two losses above, unsmoothed.
    pub(super) latest_loss: f64,
    pub(super) latest_reported_loss: f64,
    /// NACKs received per outgoing stream so far (str0m's running count).
    pub(super) nacks_seen: HashMap<(Mid, Option<Rid>), u64>,
}

impl Link {
    /// What the allocator may spend, given that what is sent now costs `sent`: the
    /// estimate, or under heavy loss what actually arrives (`sent` less the loss) when
    /// that is less. Why: with a shaped link whose queue is full, the delay stops growing and
    /// only loss tells; str0m's estimate stayed at three to five times a 60 kbit/s link losing
    /// half of what was sent (the engine's virtual-link test), which would never pause the
    /// video that does not fit. The loss must be heavy both smoothed and in the latest
    /// sample: right after a step down the smoothed loss still remembers the layer before.
    /// `sent` is what the layers *forwarded* cost, not what the grants do: after a step down
    /// the layer before flows until the new one has a keyframe, and its loss counted against
    /// the smaller granted layer paused a low layer that fitted a 300 kbit/s link (the
    /// Chromium quality test).
    pub(super) fn budget(&self, sent: u64) -> Option<u64> {
        let estimate = self.estimate?;
        let smoothed = self.down.loss.max(self.reported_loss);
        let latest = self.latest_loss.max(self.latest_reported_loss);
        let loss = smoothed.min(latest).min(1.0);
        if loss > HEAVY_LOSS && sent > 0 {
            let delivered = (sent as f64 * (1.0 - loss)) as u64;
            Some(estimate.min(delivered))
        } else {
            Some(estimate)
        }
    }

    /// What to tell the estimator after an allocation (see [`Tune`]).
    ///
    /// The desired bitrate is everything the subscriber wants (with the upgrade headroom):
    /// str0m probes towards it (initial, exponential and periodic probes). That is not enough:
    /// str0m's estimate (as libwebrtc's) never rises above 1.5 times what is actually sent,
    /// and it answers only a *raised* desired bitrate with an allocation probe. So while a
    /// track could get more and the link loses nothing now, the desired bitrate dips to what
    /// is sent for one pass and is raised again the next: str0m then probes, short bursts
    /// whose arrival rate measures the link (a capped link measures as capped, a free one as
    /// free). Probes that find nothing come less and less often. (Restarting the estimator
    /// instead, whose fresh probes are stronger, sank the estimate of subscribers that want no
    /// more than they get: each restart started from an estimate clamped to what they were
    /// sent.)
    ///
    /// Three exceptions restart it. A paused video, while the link is quiet (see the comment
    /// in the body: probes from a paused link's estimate are too weak). And two where str0m's
    /// loss-based estimator holds the estimate after congestion in its loss-limited state, in
    /// which it never probes and grows only with what is acknowledged, which a stepped-down
    /// subscriber never raises:
    /// - a pause half decided (`pausing`) while the link loses little: the estimate alone
    ///   argues for it, and it sank to half of a 300 kbit/s link that carried the low layer
    ///   fine (the Chromium quality test); the restart starts from what is granted;
    /// - a probe that leaves the estimate exactly where it was, on a quiet link: it stayed
    ///   bit-for-bit the same for ten seconds after a cap was lifted (half of the engine's
    ///   virtual-link runs).
    ///
    /// The restarted estimator's initial probes measure the link. Nothing is set before
    /// video is measured: a desired bitrate of almost nothing would waste str0m's one initial
    /// probe.
    fn tune(&mut self, now: Instant, raised: bool, pause: PauseState, d: &Decision) -> Tune {
        let pausing = pause == PauseState::Pausing;
        let wanted = (d.ideal as f64 * allocate::UPGRADE_HEADROOM) as u64;
        if wanted < DESIRED_FLOOR {
            return Tune::Keep;
        }
        if raised || self.probe_backoff.is_zero() {
            self.probe_backoff = PROBE_BACKOFF_MIN;
        }
        let estimate = self.estimate.unwrap_or(0);
        let due = self.probe_due.is_none_or(|at| now >= at);
        let latest = self.latest_loss.max(self.latest_reported_loss);
        let quiet = latest < QUIET_LOSS;
        // A pause the estimate alone argues for (the link loses little): the estimate may be
        // str0m's loss-based one holding low after the congestion of the step down, in which
        // state it does not probe. Measure the link afresh from what is granted, once per
        // pause in the making, without waiting for the probe backoff (the pause would not).
        if !pausing {
            self.restarted_for_pause = false;
        } else if latest <= HEAVY_LOSS && !self.restarted_for_pause && !raised {
            self.restarted_for_pause = true;
            self.probe_due = Some(now + self.probe_backoff);
            return self.restart(estimate.max(d.current), wanted, "before a pause");
        }
        // Video paused for want of bandwidth: only audio flows, which carries no
        // transport-cc, so the estimator sees nothing but its probes, and str0m's allocation
        // probes reach at most twice the estimate. From the 25–40 kbit/s a paused link sinks
        // to, finding the 200 kbit/s the lowest layer needs took three to five probes, 10 s
        // after the link was restored (the Chromium quality test). A restart probes at three
        // and six times what is sent at once: two short bursts, which a still narrow link
        // answers with its own rate (the video stays paused) and a restored one with room.
        if pause == PauseState::Paused && due && quiet && !raised {
            self.probe_due = Some(now + self.probe_backoff);
            self.probe_backoff = (self.probe_backoff * 2).min(PROBE_BACKOFF_MAX);
            return self.restart(estimate.max(d.current), wanted, "paused: measure the link");
        }
        if (d.wants_more || pausing) && due && !raised {
            // The last probe found room (the estimate grew by a fifth since): probe again
            // soon, the link may have more.
            if self
                .probed_at_estimate
                .is_some_and(|before| estimate as f64 > 1.2 * before as f64)
            {
                self.probe_backoff = PROBE_BACKOFF_MIN;
            }
            self.probe_due = Some(now + self.probe_backoff);
            self.probe_backoff = (self.probe_backoff * 2).min(PROBE_BACKOFF_MAX);
            if self.probed_at_estimate == Some(estimate) && quiet && estimate > 0 {
                return self.restart(estimate, wanted, "frozen: a probe left it unchanged");
            }
            if (quiet || pausing) && estimate > 0 && !self.dipped {
                self.probed_at_estimate = Some(estimate);
                self.dipped = true;
                let dip = d.current.max(1);
                self.desired = Some(dip);
                return Tune::Desired(dip);
            }
        }
        self.dipped = false;
        let far =
            |last: u64| (wanted as f64 - last as f64).abs() > PROBE_RETUNE * (last.max(1) as f64);
        if self.desired.is_some_and(|last| !far(last)) {
            return Tune::Keep;
        }
        self.desired = Some(wanted);
        Tune::Desired(wanted)
    }

    /// A restart of the estimator from `from` (bits/s): the probe in progress is forgotten,
    /// the fresh estimator's initial probes take its place. They aim at `wanted`: str0m caps
    /// a probe at twice the desired bitrate, and one left dipped to what is sent (a paused
    /// link's audio) capped the probes below the lowest layer, so the restart found nothing.
    fn restart(&mut self, from: u64, wanted: u64, why: &'static str) -> Tune {
        self.probed_at_estimate = None;
        self.dipped = false;
        self.desired = Some(wanted);
        Tune::Restart(from, wanted, why)
    }
}

/// Whether a subscriber's video is paused for want of bandwidth, or about to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PauseState {
    /// Nothing paused, no pause in the making.
    None,
    /// A pause half decided (half of its votes).
    Pausing,
    /// A video track is paused.
    Paused,
}

/// What [`Link::tune`] asks of the estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tune {
    /// Nothing changes.
    Keep,
    /// Probe towards this desired bitrate (bits/s).
    Desired(u64),
    /// Restart the estimator from this estimate, probing towards this desired bitrate (bits/s),
    /// and why.
    Restart(u64, u64, &'static str),
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
    /// Down-track index → grant, and whether the loss measured is not yet that of the layer
    /// forwarded (a step down waiting for its keyframe, or just switched); `None`: no
    /// estimate, nothing is capped.
    grants: Option<Vec<(usize, Grant, bool)>>,
    budget: u64,
    /// What the current grants cost, what everything wanted would.
    current: u64,
    ideal: u64,
    /// Whether any track could get more (see [`allocate::Allocation::next_step`]).
    wants_more: bool,
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
                    // A peer Conclave's relay takes every layer it asks for: its own subscribers
                    // are allocated there.
                    if s.link.estimate.is_none() || s.cascade == super::CascadeRole::Relay {
                        decisions.push(Decision {
                            subscriber: s.session,
                            grants: None,
                            budget: 0,
                            current: 0,
                            ideal: 0,
                            wants_more: false,
                        });
                        continue;
                    }
                    let mut audio = 0;
                    // What the forwarded layers cost, which differs from what the grants
                    // cost until the layer granted has its keyframe.
                    let mut forwarded_video = 0;
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
                        if !d.paused {
                            forwarded_video += match &d.current_rid {
                                Some(rid) => t.layers.bitrate_of(rid),
                                None => t.layers.plain_bitrate(),
                            };
                        }
                        // Whether the loss measured now is still that of another layer:
                        // the one granted waits for its keyframe, or flows since too short
                        // a time for a loss sample of its own.
                        let above_grant = match (&d.current_rid, d.grant) {
                            (Some(rid), Grant::UpTo(q)) => t.layers.quality(rid) > q,
                            _ => false,
                        };
                        let settling = above_grant
                            || d.switched_at
                                .is_some_and(|at| now.saturating_duration_since(at) < LOSS_SETTLE);
                        wants.push(VideoWant {
                            priority,
                            layers: t.layers.options(d.max_quality, now),
                            current: d.grant,
                        });
                        index.push((i, settling));
                    }
                    let current = allocate::current_cost(audio, &wants);
                    let forwarded = audio + forwarded_video;
                    let budget = s.link.budget(current.max(forwarded)).unwrap_or(0);
                    let a = allocate::allocate(budget, audio, &wants);
                    tracing::debug!(
                        subscriber = %s.session,
                        estimate_kbps = s.link.estimate.unwrap_or(0) / 1000,
                        loss = s.link.down.loss,
                        budget_kbps = budget / 1000,
                        audio_kbps = audio / 1000,
                        layers = ?wants.iter().map(|w| &w.layers).collect::<Vec<_>>(),
                        grants = ?a.grants,
                        "bandwidth allocation"
                    );
                    decisions.push(Decision {
                        subscriber: s.session,
                        grants: Some(
                            index
                                .into_iter()
                                .zip(a.grants)
                                .map(|((i, settling), g)| (i, g, settling))
                                .collect(),
                        ),
                        budget,
                        current: a.current,
                        ideal: a.ideal,
                        wants_more: a.next_step.is_some(),
                    });
                }
            }
            for mut d in decisions {
                let Some(s) = room.participants.get_mut(&d.subscriber) else {
                    continue;
                };
                let session = s.session;
                let Some(grants) = d.grants.take() else {
                    for t in &mut s.down_tracks {
                        t.set_grant(Grant::UpTo(simulcast::HIGH));
                    }
                    continue;
                };
                // Hysteresis both ways, against noisy estimates and bitrates: step down only
                // when the link no longer carries what is sent (the budget 15 % short of what
                // the current layers cost while packets are being lost, or half short, or
                // short at all while losing over 5 %), pause only when no room lasted three
                // seconds; step up only when two passes in a row
                // (a second apart) find room, so one optimistic probe result does not send a
                // layer into a link that cannot take it, and not within a few seconds of a
                // step down.
                let latest = s.link.latest_loss.max(s.link.latest_reported_loss);
                let recent = latest.max(s.link.down.loss).max(s.link.reported_loss);
                let short = (d.budget as f64) < CONGESTED * d.current as f64;
                let congested = (short && recent >= SOME_LOSS)
                    || (d.budget as f64) < COLLAPSED * d.current as f64
                    || (latest > LOSING && d.budget < d.current);
                let loss_says = s.link.estimate.is_some_and(|e| d.budget < e);
                let pause_votes = if loss_says {
                    PAUSE_VOTES_LOSING
                } else {
                    PAUSE_VOTES
                };
                let mut raised = false;
                for (i, grant, settling) in grants {
                    let Some(t) = s.down_tracks.get_mut(i) else {
                        continue;
                    };
                    let from = t.grant;
                    if grant != Grant::Paused {
                        t.bw_pause_votes = 0;
                    }
                    if grant == from {
                        t.bw_votes = 0;
                        continue;
                    }
                    if grant.below(from) {
                        t.bw_votes = 0;
                        // Pausing takes longer evidence: the estimate undershoots for a second
                        // or two after congestion, and a pause costs a keyframe and a gap.
                        if !congested {
                            t.bw_pause_votes = 0;
                            continue;
                        }
                        if grant == Grant::Paused {
                            // The evidence for a pause is gathered while the lowest layer
                            // granted flows: until it has its keyframe, and for a loss sample
                            // after, the loss is that of the layer before, which flooded the
                            // link (its loss counted against the low layer paused a low layer
                            // that fitted 300 kbit/s, the Chromium quality test).
                            if !settling {
                                t.bw_pause_votes = t.bw_pause_votes.saturating_add(1);
                            }
                            if t.bw_pause_votes < pause_votes {
                                continue;
                            }
                        }
                        t.bw_lowered_at = Some(now);
                        // Congestion: the grant before was more than the link carries, at
                        // the budget it was given at (raised to, or stepped down to: a step
                        // from the top layer at 370 kbit/s gives the medium one at 370) or,
                        // for the first grant, at this one. The new grant is given at this.
                        let given_at = t.bw_raised_budget.replace(d.budget).unwrap_or(0);
                        t.bw_failed = Some(Failed {
                            grant: from,
                            budget: given_at.max(d.budget),
                            at: now,
                        });
                        if grant == Grant::Paused {
                            self.stats.bandwidth_pauses += 1;
                        } else {
                            self.stats.bandwidth_downgrades += 1;
                        }
                    } else {
                        t.bw_votes = t.bw_votes.saturating_add(1);
                        let held = t
                            .bw_lowered_at
                            .is_some_and(|at| now.saturating_duration_since(at) < RAISE_HOLD);
                        let failed = t.bw_failed.is_some_and(|f| f.blocks(grant, d.budget, now));
                        if failed && !held && t.bw_votes >= UP_VOTES {
                            tracing::debug!(
                                subscriber = %session,
                                track = %t.track_sid,
                                to = ?grant,
                                budget_kbps = d.budget / 1000,
                                "bandwidth: raise held back: that grant congested the link lately"
                            );
                        }
                        if held || failed || t.bw_votes < UP_VOTES {
                            continue;
                        }
                        raised = true;
                        t.bw_raised_budget = Some(d.budget);
                    }
                    t.bw_votes = 0;
                    t.set_grant(grant);
                    log_change(session, &t.track_sid, from, grant, d.budget);
                }
                // A pause half decided: measure the link first (the estimate may only be
                // undershooting after congestion; a probe restarts it).
                let pausing = s
                    .down_tracks
                    .iter()
                    .any(|t| t.grant != Grant::Paused && t.bw_pause_votes >= PAUSE_VOTES / 2);
                let pause = if pausing {
                    PauseState::Pausing
                } else if s
                    .down_tracks
                    .iter()
                    .any(|t| t.grant == Grant::Paused && !t.disabled)
                {
                    PauseState::Paused
                } else {
                    PauseState::None
                };
                let tune = s.link.tune(now, raised, pause, &d);
                if tune != Tune::Keep {
                    tracing::debug!(subscriber = %session, ?tune, "bandwidth: estimator retuned");
                }
                let mut bwe = s.transport.sub_pc_mut().rtc.bwe();
                match tune {
                    Tune::Keep => continue,
                    Tune::Desired(desired) => {
                        bwe.set_bitrate(Bitrate::ZERO, Bitrate::bps(desired));
                    }
                    Tune::Restart(from, desired, why) => {
                        tracing::info!(
                            subscriber = %session,
                            estimate_kbps = from / 1000,
                            why,
                            "bandwidth: estimator restarted"
                        );
                        bwe.reset(Bitrate::bps(from));
                        bwe.set_bitrate(Bitrate::ZERO, Bitrate::bps(desired));
                    }
                }
                retuned.push(session);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn wanting_more(current: u64) -> Decision {
        Decision {
            subscriber: SessionId(1),
            grants: None,
            budget: 250_000,
            current,
            ideal: 900_000,
            wants_more: true,
        }
    }

    /// A grant that congested the link is not given again on the budget it failed at (the
    /// estimate that overshot a shaped link), only on clearly more, or once it is forgotten;
    /// lower grants are not held back by it.
    #[test]
    fn a_grant_that_congested_the_link_needs_more_budget_for_a_while() {
        let t0 = Instant::now();
        let failed = Failed {
            grant: Grant::UpTo(simulcast::MEDIUM),
            budget: 369_000,
            at: t0,
        };
        let soon = t0 + Duration::from_secs(5);
        let medium = Grant::UpTo(simulcast::MEDIUM);
        let high = Grant::UpTo(simulcast::HIGH);
        assert!(
            failed.blocks(medium, 369_000, soon),
            "the same estimate again"
        );
        assert!(
            failed.blocks(high, 400_000, soon),
            "more than it, on little more"
        );
        assert!(!failed.blocks(medium, 470_000, soon), "a quarter more");
        assert!(
            !failed.blocks(Grant::UpTo(simulcast::LOW), 300_000, soon),
            "below it"
        );
        assert!(
            !failed.blocks(medium, 369_000, t0 + FAILED_MEMORY),
            "forgotten after a while"
        );
    }

    /// A probe is a dip of the desired bitrate then a raise; a probe after which the estimate
    /// has not moved at all restarts the estimator, one after which it moved does not.
    #[test]
    fn a_probe_that_moves_nothing_restarts_the_estimator() {
        let t0 = Instant::now();
        let d = wanting_more(111_000);
        let wanted = (900_000.0 * allocate::UPGRADE_HEADROOM) as u64;
        for moved in [false, true] {
            let mut link = Link {
                estimate: Some(245_895),
                ..Link::default()
            };
            assert_eq!(
                link.tune(t0, false, PauseState::None, &d),
                Tune::Desired(111_000),
                "dip"
            );
            let half = t0 + Duration::from_millis(500);
            assert_eq!(
                link.tune(half, false, PauseState::None, &d),
                Tune::Desired(wanted),
                "raise"
            );
            if moved {
                link.estimate = Some(245_896);
            }
            let due = t0 + PROBE_BACKOFF_MIN;
            let tune = link.tune(due, false, PauseState::None, &d);
            if moved {
                assert_eq!(
                    tune,
                    Tune::Desired(111_000),
                    "the estimator works: probe again"
                );
            } else {
                assert!(matches!(tune, Tune::Restart(245_895, ..)), "{tune:?}");
            }
        }
        // Not while losing: a frozen estimate on a lossy link is the estimator at work.
        let mut link = Link {
            estimate: Some(245_895),
            ..Link::default()
        };
        link.tune(t0, false, PauseState::None, &d);
        link.latest_loss = 0.1;
        let tune = link.tune(t0 + PROBE_BACKOFF_MIN, false, PauseState::None, &d);
        assert!(!matches!(tune, Tune::Restart(..)), "{tune:?}");
    }
}
