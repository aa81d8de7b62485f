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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A VP8 payload: descriptor with a 15-bit picture id and TL0PICIDX (S bit set when
    /// `start`), then a frame header byte whose bit 0 (P) is clear for a keyframe.
    fn vp8(start: bool, key: bool, pid: u16, tl0: u8) -> Vec<u8> {
        let s = if start { 0x10 } else { 0 };
        vec![
            0x80 | s,
            0xc0 | 0x20,
            0x80 | (pid >> 8) as u8,
            pid as u8,
            tl0,
            0x00,
            if key { 0x10 } else { 0x11 },
            0xaa,
        ]
    }

    #[test]
    fn vp8_keyframe_starts() {
        assert!(starts_keyframe(Codec::Vp8, &vp8(true, true, 5, 1)));
        assert!(!starts_keyframe(Codec::Vp8, &vp8(false, true, 5, 1)));
        assert!(!starts_keyframe(Codec::Vp8, &vp8(true, false, 5, 1)));
        // Minimal descriptor, no extensions.
        assert!(starts_keyframe(Codec::Vp8, &[0x10, 0x10, 0x00]));
        assert!(!starts_keyframe(Codec::Vp8, &[0x10, 0x11, 0x00]));
        for junk in [&[][..], &[0x10], &[0x90, 0x80]] {
            assert!(!starts_keyframe(Codec::Vp8, junk));
        }
        assert!(!starts_keyframe(Codec::Opus, &[0x10, 0x10]));
    }

    #[test]
    fn h264_keyframe_starts() {
        let h = |p: &[u8]| starts_keyframe(Codec::H264, p);
        assert!(h(&[0x67, 0x42]), "SPS");
        assert!(h(&[0x65, 0x88]), "IDR slice");
        assert!(!h(&[0x68, 0xce]), "PPS alone");
        assert!(!h(&[0x41, 0x9a]), "non-IDR slice");
        // STAP-A: SPS (2 bytes) then PPS (2 bytes).
        assert!(h(&[0x78, 0, 2, 0x67, 0x42, 0, 2, 0x68, 0xce]));
        // STAP-A: PPS then IDR.
        assert!(h(&[0x78, 0, 2, 0x68, 0xce, 0, 2, 0x65, 0x88]));
        assert!(!h(&[0x78, 0, 2, 0x68, 0xce, 0, 2, 0x41, 0x9a]));
        // A size pointing past the end stops the walk.
        assert!(!h(&[0x78, 0xff, 0xff, 0x68]));
        // FU-A of an IDR slice: only the start fragment.
        assert!(h(&[0x7c, 0x85, 0x88]));
        assert!(!h(&[0x7c, 0x05, 0x88]));
        assert!(!h(&[0x7c, 0x81, 0x9a]), "FU-A start of a non-IDR slice");
        assert!(!h(&[]) && !h(&[0x7c]) && !h(&[0x78, 0]));
    }

    /// Source A, then a switch to B (other sequence numbers and timestamps), then back to A:
    /// the outgoing numbers step by one and the timestamps by about the elapsed time; late
    /// packets of before a switch are refused; A's spacing is kept.
    #[test]
    fn a_source_change_continues_the_numbering() {
        let t0 = Instant::now();
        let mut out = OutStream::default();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut seqs = Vec::new();
        let mut tss = Vec::new();
        for i in 0..5u64 {
            let m = out
                .map(1, 70_000 + i, 5_000 + i * 3000, 90_000, ms(i * 33))
                .unwrap();
            seqs.push(m.seq);
            tss.push(m.ts);
        }
        // The first source starts below 2^16 (rollover counter 0).
        assert_eq!(seqs[0], 70_000 & 0xffff);
        assert!(out.is_on(1) && !out.is_on(2));
        // Switch to B at 33 ms after A's last packet.
        let b = out.map(2, 12, 9_000_000, 90_000, ms(5 * 33)).unwrap();
        assert_eq!(b.seq, seqs[4] + 1);
        let step = b.ts - tss[4];
        assert!((2900..=3100).contains(&step), "{step}");
        // B's next packet keeps B's own spacing; one of before B's start is refused.
        let b2 = out.map(2, 14, 9_003_000, 90_000, ms(6 * 33)).unwrap();
        assert_eq!((b2.seq, b2.ts), (b.seq + 2, b.ts + 3000));
        let b1 = out.map(2, 13, 9_000_000, 90_000, ms(6 * 33)).unwrap();
        assert_eq!(b1.seq, b.seq + 1, "a reordered packet lands in its place");
        assert!(!b1.newest);
        assert!(out.map(2, 11, 8_997_000, 90_000, ms(6 * 33)).is_none());
        // Back to A (a later packet of it): continues after B's highest.
        let a = out
            .map(1, 70_100, 5_000 + 100 * 3000, 90_000, ms(7 * 33))
            .unwrap();
        assert_eq!(a.seq, b2.seq + 1);
        assert!(a.ts > b2.ts);
    }

    /// Skipped packets of the current source (a disabled track, waiting for a keyframe) leave
    /// no gap: after an interruption the next packet continues the numbering.
    #[test]
    fn an_interruption_leaves_no_gap() {
        let t0 = Instant::now();
        let mut out = OutStream::default();
        let a = out.map(1, 100, 0, 48_000, t0).unwrap();
        out.interrupt();
        assert!(!out.is_on(1));
        let later = t0 + Duration::from_secs(1);
        let b = out.map(1, 150, 48_000, 48_000, later).unwrap();
        assert_eq!(b.seq, a.seq + 1);
        // Same source: its timestamps keep their own meaning (a second later).
        assert_eq!(b.ts, a.ts + 48_000);
    }

    #[test]
    fn vp8_picture_ids_continue_across_a_switch() {
        let t0 = Instant::now();
        let mut out = OutStream::default();
        let expect = |p: &[u8], pid: u16, tl0: u8| {
            let d = Vp8Descriptor::parse(p).unwrap();
            d.patch().picture_id(pid).tl0_pic_idx(tl0).build().ok()
        };
        for i in 0..3u16 {
            // Picture ids 0x7ffe, 0x7fff, 0 (wrapping at 15 bits).
            let p = vp8(true, i == 0, (0x7ffe + i) & 0x7fff, 9);
            let m = out
                .map(1, u64::from(i), u64::from(i) * 3000, 90_000, t0)
                .unwrap();
            assert_eq!(
                out.vp8_patch(&p, &m),
                None,
                "the first source passes as it is"
            );
        }
        // Switch: B's picture ids and TL0PICIDX continue right after A's last ones.
        let p = vp8(true, true, 500, 77);
        let m = out.map(2, 40, 0, 90_000, t0).unwrap();
        assert_eq!(out.vp8_patch(&p, &m), expect(&p, 1, 10));
        let p = vp8(true, false, 501, 78);
        let m = out.map(2, 41, 3000, 90_000, t0).unwrap();
        assert_eq!(out.vp8_patch(&p, &m), expect(&p, 2, 11));
    }

    #[test]
    fn red_is_unwrapped_relabelled_and_built() {
        let redundant = RedundantBlock {
            pt: 111,
            timestamp_offset: 960,
            payload: vec![1, 2, 3],
        };
        let red = RedEncoder::encode(111, &[7, 8, 9, 10], &[redundant]);
        assert_eq!(&*red_primary(&red).unwrap(), &[7, 8, 9, 10]);
        assert!(red_primary(&[0x80]).is_none(), "malformed");
        let relabelled = red_relabel(&red, 111, 109).unwrap();
        let blocks = RedDecoder::decode(&relabelled).unwrap();
        assert_eq!(blocks.len(), 2);
        assert!(blocks.iter().all(|b| b.pt == 109));
        assert_eq!(blocks[0].payload, &[1, 2, 3]);
        assert_eq!(blocks[0].timestamp_offset, 960);

        let mut out = OutStream::default();
        let first: Arc<[u8]> = Arc::from(&[1u8, 1][..]);
        let second: Arc<[u8]> = Arc::from(&[2u8, 2][..]);
        let w1 = out.wrap_red(111, &first, 1000);
        let b1 = RedDecoder::decode(&w1).unwrap();
        assert_eq!(b1.len(), 1, "nothing to repeat yet");
        let w2 = out.wrap_red(111, &second, 1960);
        let b2 = RedDecoder::decode(&w2).unwrap();
        assert_eq!(
            (b2[0].payload, b2[0].timestamp_offset),
            (&[1u8, 1][..], 960)
        );
        assert_eq!(b2[1].payload, &[2, 2]);
    }
}
