//! Packet-level forwarding helpers: keyframe detection on one RTP payload, the rewriting of
//! one outgoing stream (sequence numbers, timestamps, VP8 picture ids) so it stays continuous
//! while its source changes, and RED (RFC 2198) unwrapping and wrapping.
//!
//! Why packets and not frames: str0m in frame mode depacketises every incoming frame and
//! repacketises it once per subscriber (a payload copy each). Forwarding RTP packets keeps the
//! publisher's packetisation; the SFU only rewrites what identifies the outgoing stream.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use str0m::format::Codec;
use str0m::media::Rid;
use str0m::rtp::{RedDecoder, RedEncoder, RedundantBlock, Vp8Descriptor, Vp8Patch};

use crate::sfu::ids::TrackSid;
use crate::sfu::rewrite::Timeline;

/// The identity of one source stream (a track's simulcast layer), as a number for the
/// rewriters: a change of it is a layer switch or a track change.
pub(super) fn source_id(track: &TrackSid, rid: Option<&Rid>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    track.as_str().hash(&mut h);
    rid.map(|r| &**r).hash(&mut h);
    h.finish()
}

/// Whether `payload` (one RTP payload of `codec`) is the first packet of a keyframe: where a
/// subscriber may start decoding, so where a layer switch may happen.
///
/// VP8: start of partition 0 (S=1, PID=0) with the P bit of the VP8 frame header clear
/// (RFC 7741). H264 (RFC 6184): an SPS or IDR slice as a single NAL unit, a STAP-A carrying
/// one, or the first fragment (FU-A, S bit) of an IDR slice. Chrome sends SPS and PPS in
/// front of the IDR, so the SPS packet is seen first and the switch happens there. End-to-end
/// encrypted payloads keep these headers in the clear (LiveKit's frame cryptor leaves the
/// VP8 frame header and the H264 NAL headers unencrypted).
pub(super) fn starts_keyframe(codec: Codec, payload: &[u8]) -> bool {
    match codec {
        Codec::Vp8 => Vp8Descriptor::parse(payload).is_ok_and(|d| d.starts_keyframe(payload)),
        Codec::H264 => h264_starts_keyframe(payload),
        _ => false,
    }
}

const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_STAP_A: u8 = 24;
const NAL_FU_A: u8 = 28;

fn h264_starts_keyframe(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    match first & 0x1f {
        NAL_IDR | NAL_SPS => true,
        NAL_STAP_A => {
            // STAP-A: (16-bit size, NAL unit)*
            let mut i = 1;
            while let (Some(&hi), Some(&lo), Some(&nal)) =
                (payload.get(i), payload.get(i + 1), payload.get(i + 2))
            {
                if matches!(nal & 0x1f, NAL_IDR | NAL_SPS) {
                    return true;
                }
                i += 2 + usize::from(u16::from_be_bytes([hi, lo]));
            }
            false
        }
        NAL_FU_A => payload
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && fu & 0x1f == NAL_IDR),
        _ => false,
    }
}

/// The primary block of a RED payload, or `None` if it is malformed.
pub(super) fn red_primary(payload: &[u8]) -> Option<Arc<[u8]>> {
    let blocks = RedDecoder::decode(payload).ok()?;
    blocks
        .iter()
        .find(|b| b.is_primary)
        .map(|b| Arc::from(b.payload))
}

/// A RED payload (primary type `pt`) re-encoded with the redundant blocks of `payload` that
/// carry `from_pt`, relabelled `pt`: for a subscriber whose Opus payload type differs from the
/// publisher's (the block headers name it).
pub(super) fn red_relabel(payload: &[u8], from_pt: u8, pt: u8) -> Option<Arc<[u8]>> {
    let blocks = RedDecoder::decode(payload).ok()?;
    let primary = blocks.iter().find(|b| b.is_primary)?;
    let redundant: Vec<RedundantBlock> = blocks
        .iter()
        .filter(|b| !b.is_primary && b.pt == from_pt)
        .map(|b| RedundantBlock {
            pt,
            timestamp_offset: b.timestamp_offset,
            payload: b.payload.to_vec(),
        })
        .collect();
    Some(Arc::from(RedEncoder::encode(
        pt,
        primary.payload,
        &redundant,
    )))
}

/// One outgoing stream of a subscriber connection (one mid): where its numbering stands, so
/// that whatever source feeds it, the subscriber sees one continuous stream.
///
/// Kept per mid, not per down-track: on a single peer connection a slot (mid, SSRC) may carry
/// one track after another, and the subscriber must see no gap or jump there either.
#[derive(Default)]
pub(super) struct OutStream {
    /// The source mapped now; `None` after an interruption (the next packet rebases).
    source: Option<u64>,
    /// First source sequence number forwarded since the last rebase, and its outgoing number.
    src_first: u64,
    out_first: u64,
    /// The next outgoing sequence number a rebase continues from (`None`: nothing sent yet).
    next_seq: Option<u64>,
    timeline: Timeline,
    /// VP8 picture id and TL0PICIDX rewriting (15 and 8 bits, wrapping).
    vp8: Vp8Rewrite,
    /// The previous Opus payload sent, with its outgoing timestamp: the redundancy of the next
    /// packet when this stream wraps plain Opus in RED.
    red_prev: Option<(u64, Arc<[u8]>)>,
}

#[derive(Default)]
struct Vp8Rewrite {
    pid_offset: u16,
    tl0_offset: u8,
    /// A rebase happened: the next VP8 packet sets the offsets.
    rebased: bool,
    /// Last picture id and TL0PICIDX written (at the highest sequence number).
    last: Option<(Option<u16>, Option<u8>)>,
}

/// Where one packet goes in the outgoing stream.
pub(super) struct Mapped {
    /// Outgoing (extended) sequence number.
    pub(super) seq: u64,
    /// Outgoing (extended) RTP timestamp.
    pub(super) ts: u64,
    /// Whether it is the newest packet so far (not a late or retransmitted one).
    newest: bool,
}

impl OutStream {
    /// Whether packets of `source` flow now without a rebase.
    pub(super) fn is_on(&self, source: u64) -> bool {
        self.source == Some(source)
    }

    /// Packets of the current source were skipped: the next forwarded packet (a keyframe for
    /// video) rebases, so that the skipped ones leave no gap in the outgoing numbering.
    pub(super) fn interrupt(&mut self) {
        self.source = None;
    }

    /// Maps source packet `seq` (extended), timestamp `ts` (extended, at `hz`) of `source`
    /// onto the outgoing stream; a different source than the current one rebases here (the
    /// caller only lets a packet that may start a stream do that). `None`: the packet
    /// precedes the rebase point (a late or retransmitted packet of before the switch) and
    /// must not be sent.
    ///
    /// Why offsets: a source's own spacing (sequence numbers and timestamps) is kept, so its
    /// retransmissions and reordered packets land where they belong; only the start is moved
    /// to right after what the subscriber saw last, so a layer switch or a track change shows
    /// neither a gap (which a receiver would NACK, then wait for) nor a jump.
    pub(super) fn map(
        &mut self,
        source: u64,
        seq: u64,
        ts: u64,
        hz: u32,
        now: Instant,
    ) -> Option<Mapped> {
        if self.source != Some(source) {
            // Start below 2^16: a receiver assumes a rollover counter of 0 for a new SSRC.
            let start = self.next_seq.unwrap_or(seq & 0xffff);
            self.source = Some(source);
            self.src_first = seq;
            self.out_first = start;
            self.red_prev = None;
            self.vp8.rebased = true;
        }
        let delta = seq.checked_sub(self.src_first)?;
        let out = self.out_first + delta;
        let newest = self.next_seq.is_none_or(|n| out >= n);
        if newest {
            self.next_seq = Some(out + 1);
        }
        let ts = self.timeline.map(source, ts, hz, now);
        Some(Mapped {
            seq: out,
            ts,
            newest,
        })
    }

    /// The VP8 descriptor patch that keeps picture ids and TL0PICIDX continuous across
    /// rebases, for a packet mapped as `m`; `None` when nothing needs rewriting.
    pub(super) fn vp8_patch(&mut self, payload: &[u8], m: &Mapped) -> Option<Vp8Patch> {
        let d = Vp8Descriptor::parse(payload).ok()?;
        let (pid, tl0) = (d.picture_id(), d.tl0_pic_idx());
        let v = &mut self.vp8;
        if std::mem::take(&mut v.rebased) {
            // Continue right after the last ones written (the first source passes as is).
            let (last_pid, last_tl0) = v.last.unwrap_or((None, None));
            v.pid_offset = match (last_pid, pid) {
                (Some(l), Some(p)) => l.wrapping_add(1).wrapping_sub(p) & 0x7fff,
                _ => 0,
            };
            v.tl0_offset = match (last_tl0, tl0) {
                (Some(l), Some(t)) => l.wrapping_add(1).wrapping_sub(t),
                _ => 0,
            };
        }
        let pid_out = pid.map(|p| p.wrapping_add(v.pid_offset) & 0x7fff);
        let tl0_out = tl0.map(|t| t.wrapping_add(v.tl0_offset));
        if m.newest {
            v.last = Some((pid_out, tl0_out));
        }
        if v.pid_offset == 0 && v.tl0_offset == 0 {
            return None;
        }
        let mut b = d.patch();
        if let Some(p) = pid_out {
            b = b.picture_id(p);
        }
        if let Some(t) = tl0_out {
            b = b.tl0_pic_idx(t);
        }
        // A 7-bit picture id cannot take a 15-bit value: leave such a descriptor alone.
        b.build().ok()
    }

    /// `primary` (an Opus payload, outgoing timestamp `ts`) wrapped in RED with the previous
    /// payload as redundancy, as str0m's frame mode did for subscribers that negotiated RED.
    pub(super) fn wrap_red(&mut self, pt: u8, primary: &Arc<[u8]>, ts: u64) -> Arc<[u8]> {
        let redundant: Vec<RedundantBlock> = self
            .red_prev
            .as_ref()
            .and_then(|(prev_ts, prev)| {
                let offset = u32::try_from(ts.checked_sub(*prev_ts)?).ok()?;
                (offset > 0).then(|| RedundantBlock {
                    pt,
                    timestamp_offset: offset,
                    payload: prev.to_vec(),
                })
            })
            .into_iter()
            .collect();
        self.red_prev = Some((ts, primary.clone()));
        Arc::from(RedEncoder::encode(pt, primary, &redundant))
    }
}
