//! The subscriber side of one forwarded track: its transceiver's negotiation state, the
//! simulcast layer it forwards, keyframe gating, timestamp rewriting and the subscriber's
//! settings (quality, disabled, paused).

use std::collections::HashMap;
use std::time::Instant;

use str0m::format::Codec;
use str0m::media::{MediaKind, Mid, Rid};
use str0m::rtp::{ExtensionValues, RtpWrite};
use str0m::Rtc;

use super::bandwidth::Failed;
use super::packet::{red_relabel, OutStream};
use super::track::Track;
use super::{Forward, SessionId};
use crate::sfu::allocate::Grant;
use crate::sfu::ids::TrackSid;
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
    /// What the subscriber's downlink allows (`engine/bandwidth.rs`): layers up to a quality,
    /// or nothing (paused).
    pub(super) grant: Grant,
    /// Allocation passes in a row that found room for more than `grant`.
    pub(super) bw_votes: u8,
    /// Allocation passes in a row that found no room for it at all.
    pub(super) bw_pause_votes: u8,
    /// When `grant` was last lowered.
    pub(super) bw_lowered_at: Option<Instant>,
    /// The budget `grant` was given at (raised or stepped down to: what the link was believed
    /// to carry then).
    pub(super) bw_raised_budget: Option<u64>,
    /// A grant that congested the link: what it was, the budget it had been given at, and
    /// when it was stepped down (see `engine/bandwidth.rs`).
    pub(super) bw_failed: Option<Failed>,
    /// When the layer forwarded last changed.
    pub(super) switched_at: Option<Instant>,
    /// RTP packets written so far (the operator's view of a cascade relay: `Sfu::relayed`).
    pub(super) packets: u64,
    /// Their payload bytes.
    pub(super) payload_bytes: u64,
    /// `payload_bytes` at the last [`Self::measure`].
    measured_bytes: u64,
    /// Payload bits per second written, smoothed (measured for cascade relays).
    pub(super) bitrate: u64,
    /// For a cascade relay ([`super::CascadeRole::Relay`]) of a simulcast track: every layer
    /// up to `max_quality` goes out, each on its own stream of the transceiver
    /// (`a=simulcast:send`, these rids, with their qualities), so the receiving Conclave still
    /// chooses a layer per subscriber of its own, and asks (`max_quality`) only for what its
    /// subscribers want (its dynacast). Empty: one stream, the chosen layer (every other
    /// subscriber).
    pub(super) layer_rids: Vec<(Rid, i32)>,
    /// The rewriting state of each layer's stream in that mode (as `outs` by mid otherwise).
    layer_outs: HashMap<Rid, OutStream>,
}

impl DownTrack {
    /// A down-track of `track`, published by `publisher` (session and participant SID), for a
    /// cascade relay when `relay` (every simulcast layer of a video track announced with two
    /// or more).
    pub(super) fn new(
        publisher: SessionId,
        publisher_sid: &str,
        track: &Track,
        relay: bool,
    ) -> Self {
        let rids = track.layers.rid_qualities();
        let layer_rids = if relay && track.kind == MediaKind::Video && rids.len() > 1 {
            rids
        } else {
            Vec::new()
        };
        Self {
            publisher,
            track_sid: track.sid.clone(),
            kind: track.kind,
            stream_id: format!("{publisher_sid}|{}", track.sid),
            state: DownState::ToOpen,
            current_rid: None,
            wanted_rid: None,
            waiting_keyframe: track.kind == MediaKind::Video,
            disabled: false,
            max_quality: simulcast::HIGH,
            paused: false,
            red: track.red_allowed(),
            grant: Grant::UpTo(simulcast::HIGH),
            bw_votes: 0,
            bw_pause_votes: 0,
            bw_lowered_at: None,
            bw_raised_budget: None,
            bw_failed: None,
            switched_at: None,
            packets: 0,
            payload_bytes: 0,
            measured_bytes: 0,
            bitrate: 0,
            layer_rids,
            layer_outs: HashMap::new(),
        }
    }

    /// Turns the payload bytes written over the last `elapsed` into [`Self::bitrate`],
    /// smoothed as the layers' ([`simulcast::smoothed`]).
    pub(super) fn measure(&mut self, elapsed: std::time::Duration) {
        let bytes = self.payload_bytes - self.measured_bytes;
        self.measured_bytes = self.payload_bytes;
        let now = simulcast::bits_per_second(bytes, elapsed);
        self.bitrate = if self.bitrate == 0 {
            now
        } else {
            simulcast::smoothed(self.bitrate, now)
        };
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

    /// Applies what the downlink allows; returns whether it changed. Video resumed after a
    /// bandwidth pause restarts at a keyframe.
    pub(super) fn set_grant(&mut self, grant: Grant) -> bool {
        if grant == self.grant {
            return false;
        }
        if self.grant == Grant::Paused && self.kind == MediaKind::Video {
            self.waiting_keyframe = true;
        }
        self.grant = grant;
        true
    }

    /// The best quality it may forward now: what the subscriber asked for, within what its
    /// downlink allows.
    fn quality_cap(&self) -> i32 {
        match self.grant {
            Grant::UpTo(q) => self.max_quality.min(q),
            Grant::Paused => simulcast::LOW,
        }
    }

    /// Whether the stream should be shown as paused (source gone, disabled, or no bandwidth
    /// for it), if that is news to the subscriber; updates what it was told.
    pub(super) fn pause_changed(&mut self, source_alive: bool) -> Option<bool> {
        let paused = !source_alive || self.disabled || self.grant == Grant::Paused;
        if paused != self.paused && matches!(self.state, DownState::Open(_)) {
            self.paused = paused;
            return Some(paused);
        }
        None
    }

    /// Writes packet `f` to the subscriber connection `rtc` if this down-track takes it now:
    /// open, enabled, on the chosen simulcast layer (switching only at the start of a keyframe
    /// of the wanted one), and from a keyframe on for video. `outs` holds the rewriting state
    /// of the subscriber's outgoing streams, by mid (see [`OutStream`]): sequence numbers,
    /// timestamps and VP8 picture ids stay continuous
    /// whatever the source; RED is unwrapped for subscribers that do not take it and added
    /// for those that do.
    pub(super) fn forward(
        &mut self,
        rtc: &mut Rtc,
        outs: &mut HashMap<Mid, OutStream>,
        f: &Forward,
        layers: &Layers,
        now: Instant,
    ) -> Forwarded {
        let DownState::Open(mid) = self.state else {
            return Forwarded::Skipped;
        };
        if !self.layer_rids.is_empty() {
            return self.forward_layer(rtc, mid, f, now);
        }
        let out = outs.entry(mid).or_default();
        if self.disabled || self.grant == Grant::Paused {
            if out.is_on(f.source) {
                out.interrupt();
            }
            return Forwarded::Skipped;
        }
        if f.rid.is_some() {
            self.wanted_rid = layers.choose(self.quality_cap(), now);
            if self.current_rid != f.rid {
                // Switch only onto a keyframe of the wanted layer; until then the current
                // layer keeps flowing.
                if f.rid == self.wanted_rid && f.keyframe {
                    tracing::debug!(
                        track = %f.track_sid,
                        from = ?self.current_rid,
                        to = ?f.rid,
                        "simulcast layer switch"
                    );
                    self.current_rid = f.rid;
                    self.switched_at = Some(now);
                    self.waiting_keyframe = false;
                } else {
                    if f.rid == self.wanted_rid {
                        return Forwarded::NeedsKeyframe(self.wanted_rid);
                    }
                    return Forwarded::Skipped;
                }
            }
        }
        let video = self.kind == MediaKind::Video;
        if video && (self.waiting_keyframe || !out.is_on(f.source)) && !f.keyframe {
            // Nothing of this source may go out before a keyframe: the subscriber could not
            // decode it, and the outgoing stream would have a gap where it was skipped.
            self.waiting_keyframe = true;
            out.interrupt();
            return Forwarded::NeedsKeyframe(f.rid);
        }
        self.waiting_keyframe = false;
        self.write(rtc, out, mid, None, f, now)
    }

    /// [`Self::forward`] for a cascade relay that gets every layer (up to the quality it asks
    /// for): each layer on its own stream (a packet without a rid on the top one), each
    /// stream started at a keyframe of its layer and rewritten on its own.
    fn forward_layer(&mut self, rtc: &mut Rtc, mid: Mid, f: &Forward, now: Instant) -> Forwarded {
        let Some(&top) = self.layer_rids.last() else {
            return Forwarded::Skipped;
        };
        let (rid, quality) = match f.rid {
            Some(r) => match self.layer_rids.iter().find(|(x, _)| *x == r) {
                Some(&layer) => layer,
                None => return Forwarded::Skipped,
            },
            None => top,
        };
        // Moved out while `write` borrows the down-track (a move, no copy).
        let mut outs = std::mem::take(&mut self.layer_outs);
        let out = outs.entry(rid).or_default();
        // A layer above what the relay asks for stops (and restarts at a keyframe).
        let done = if self.disabled || quality > self.max_quality {
            if out.is_on(f.source) {
                out.interrupt();
            }
            Forwarded::Skipped
        } else if !out.is_on(f.source) && !f.keyframe {
            out.interrupt();
            Forwarded::NeedsKeyframe(f.rid)
        } else {
            self.write(rtc, out, mid, Some(rid), f, now)
        };
        self.layer_outs = outs;
        done
    }

    /// Writes `f` to the stream (`mid`, `rid`) of `rtc`, rewritten by `out`.
    fn write(
        &mut self,
        rtc: &mut Rtc,
        out: &mut OutStream,
        mid: Mid,
        rid: Option<Rid>,
        f: &Forward,
        now: Instant,
    ) -> Forwarded {
        let Some(params) = rtc.codec_config().match_params(f.params).copied() else {
            tracing::debug!(track = %f.track_sid, "no matching payload type");
            return Forwarded::Skipped;
        };
        let mut api = rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, rid) else {
            return Forwarded::Skipped;
        };
        // Forwarded media is not paced by str0m (as LiveKit's default pacer, which passes
        // packets through): paced at the estimate, the packets of a layer written before a
        // step down queued in str0m's pacer and flowed for seconds after the switch, four
        // times the new layer's rate into the congested link (the engine's virtual-link test
        // counted them), and that loss paused a low layer that fitted. Probes and padding
        // are still paced. (One store per packet: str0m keeps the flag per stream.)
        tx.set_unpaced(true);
        let p = &f.packet;
        let hz = p.time.frequency().get();
        let Some(m) = out.map(f.source, *p.seq_no, p.time.numer(), hz, now) else {
            // From before the point this source was started at (late or resent).
            return Forwarded::Skipped;
        };
        let mut pt = params.pt();
        let mut payload = p.payload.clone();
        let mut vp8 = None;
        if self.kind == MediaKind::Audio {
            // RED (RFC 2198) where this down-track may carry it and the subscriber negotiated
            // it (see `red.rs` for why encrypted tracks never do): RED from the publisher passes
            // (its block headers name the Opus payload type, relabelled if the subscriber's
            // differs), plain Opus gets the previous packet as redundancy. Everyone else gets
            // the primary payload. Encrypted payloads never change: no RED on either side.
            match (self.red, params.red(), &f.primary) {
                (true, Some(red_pt), None) => {
                    payload = out.wrap_red(*pt, &payload, m.ts);
                    pt = red_pt;
                }
                (true, Some(red_pt), Some(_)) => {
                    if f.params.pt() != params.pt() {
                        let Some(relabelled) = red_relabel(&payload, *f.params.pt(), *params.pt())
                        else {
                            return Forwarded::Skipped;
                        };
                        payload = relabelled;
                    }
                    pt = red_pt;
                }
                (_, _, Some(primary)) => payload = primary.clone(),
                (_, _, None) => {}
            }
        } else if params.spec().codec == Codec::Vp8 {
            vp8 = out.vp8_patch(&payload, &m);
        }
        let ext = ExtensionValues {
            audio_level: p.header.ext_vals.audio_level,
            voice_activity: p.header.ext_vals.voice_activity,
            video_orientation: p.header.ext_vals.video_orientation,
            ..Default::default()
        };
        // Only the low 32 bits of the rewritten timestamp go on the wire.
        let mut write = RtpWrite::new(pt, m.seq.into(), m.ts as u32, p.timestamp, payload)
            .marker(p.header.marker)
            .ext_vals(ext)
            // str0m keeps it for NACKs where RTX is negotiated (not for RED, which carries
            // its own redundancy).
            .nackable(true);
        if let Some(patch) = vp8 {
            write = write.vp8_patch(patch);
        }
        self.packets += 1;
        self.payload_bytes += p.payload.len() as u64;
        tx.write_rtp(write);
        Forwarded::Written
    }
}
