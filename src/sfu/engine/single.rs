//! v1 signalling on one peer connection (`docs/design/rtc-v1.md` §1.6, §2, §3 step 4): the
//! client always offers, the SFU only answers. Subscribed tracks go out on the client's
//! `recvonly` placeholder m-lines ("slots"); when none is free the client is asked, with
//! `media_sections_requirement`, to offer again.
//!
//! str0m answers every `recvonly` m-line `sendonly` with a random msid and offers no API to
//! change either for remote-created media (design §2, "msid" and "Limits"), so the answer is
//! rewritten as text here: `inactive` for a free slot, `sendonly` with `PA_x|TR_y` for an
//! assigned one.

use std::collections::HashMap;
use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;
use str0m::change::SdpOffer;
use str0m::media::{MediaKind, Mid};

use super::downtrack::DownState;
use super::participant::{PcKind, Slot, SlotState, Transport};
use super::{SessionId, Sfu};

use crate::sfu::ids::TrackSid;

/// Most slots one single-PC participant keeps (design §5, "m-line growth"); further
/// `recvonly` m-lines are answered `inactive` for good.
const MAX_SLOTS: usize = 64;

/// The `recvonly` audio and video m-lines of an offer (mid, kind): the slots it offers us.
/// A stopped transceiver (port 0) offers nothing.
///
/// Read from the text because `accept_offer` answers before str0m reports new media
/// (design §2, "New mids in a re-offer").
pub(super) fn offered_slots(sdp: &str) -> Vec<(Mid, MediaKind)> {
    let mut out = Vec::new();
    let mut flush = |kind: Option<MediaKind>, mid: Option<&str>, recvonly: bool| {
        if let (Some(kind), Some(mid), true) = (kind, mid, recvonly) {
            out.push((Mid::from(mid), kind));
        }
    };
    let (mut kind, mut mid, mut recvonly) = (None, None, false);
    for line in sdp.lines() {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            flush(kind, mid, recvonly);
            let mut fields = m.split(' ');
            let (media, port) = (fields.next(), fields.next());
            kind = match (media, port) {
                (_, Some("0")) => None,
                (Some("audio"), _) => Some(MediaKind::Audio),
                (Some("video"), _) => Some(MediaKind::Video),
                _ => None,
            };
            mid = None;
            recvonly = false;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m);
        } else if line == "a=recvonly" {
            recvonly = true;
        }
    }
    flush(kind, mid, recvonly);
    out
}

/// What one slot's m-section of the answer must say: `None` is `inactive`, `Some((stream,
/// track))` is `sendonly` with `a=msid:<stream> <track>`.
pub(super) type SlotAnswer = Option<(String, String)>;

/// Rewrites str0m's answer for the slots in `slots` (keyed by mid; other sections are left
/// alone). A free slot's `a=sendonly` becomes `a=inactive`, so the browser fires no `track`
/// event for it; an assigned slot keeps `a=sendonly` and gets the stream and track ids in
/// `a=msid:` and in every `a=ssrc:<n> msid:` line, which is how LiveKit clients learn the
/// publisher and the track (design §1.6, §2).
pub(super) fn rewrite_answer(sdp: &str, slots: &HashMap<String, SlotAnswer>) -> String {
    let mut out = String::with_capacity(sdp.len() + 256);
    let mut section: Vec<&str> = Vec::new();
    let emit = |section: &mut Vec<&str>, out: &mut String| {
        let slot = section
            .iter()
            .find_map(|l| l.strip_prefix("a=mid:"))
            .and_then(|mid| slots.get(mid));
        for line in section.drain(..) {
            match slot {
                Some(None) if line == "a=sendonly" => out.push_str("a=inactive"),
                Some(Some((stream, track))) if line.starts_with("a=msid:") => {
                    out.push_str(&format!("a=msid:{stream} {track}"));
                }
                Some(Some((stream, track))) if line.starts_with("a=ssrc:") => {
                    match line.split_once(" msid:") {
                        Some((head, _)) => out.push_str(&format!("{head} msid:{stream} {track}")),
                        None => out.push_str(line),
                    }
                }
                _ => out.push_str(line),
            }
            out.push_str("\r\n");
        }
    };
    for line in sdp.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("m=") {
            emit(&mut section, &mut out);
        }
        section.push(line);
    }
    emit(&mut section, &mut out);
    out
}

impl Sfu {
    /// Answers an offer on a single peer connection (design §3, step 4): learns the offered
    /// slots, puts waiting down-tracks on free ones, releases the stopped ones, answers with
    /// the rewritten SDP and the mid → track map, then asks for another offer if tracks are
    /// still waiting.
    pub(super) fn single_offer(
        &mut self,
        now: Instant,
        session: SessionId,
        sd: &lk::SessionDescription,
        sdp: &str,
    ) {
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        let Transport::Single {
            pc,
            slots,
            reoffer_requested,
            answered,
        } = &mut p.transport
        else {
            return;
        };
        // Any client offer is the re-offer a requirement asked for, answered or not: a new
        // requirement may follow (design §5, "Renegotiation latency").
        *reoffer_requested = false;
        tracing::trace!(%session, %sdp, "single-PC offer");
        let offer = match SdpOffer::from_sdp_string(sdp) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(%session, error = %e, "unparseable offer");
                return;
            }
        };
        let offered = offered_slots(sdp);
        // A slot the client no longer offers `recvonly` (it stopped the transceiver, port 0,
        // or turned it to another direction) is no longer ours to send on: its track goes
        // back to waiting for a slot, and the slot is forgotten (offered `recvonly` again, it
        // comes back free).
        slots.retain(|s| {
            let still = offered.iter().any(|(m, _)| *m == s.mid);
            if !still {
                for d in p.down_tracks.iter_mut().filter(|d| d.mid() == Some(s.mid)) {
                    d.state = match d.state {
                        DownState::ToStop(_) | DownState::NegotiatingStop(_) => {
                            DownState::ToStop(s.mid)
                        }
                        _ => DownState::ToOpen,
                    };
                }
                tracing::debug!(%session, mid = %s.mid, "slot withdrawn by the client");
            }
            still
        });
        for (mid, kind) in &offered {
            if !slots.iter().any(|s| s.mid == *mid) && slots.len() < MAX_SLOTS {
                slots.push(Slot {
                    mid: *mid,
                    kind: *kind,
                    state: SlotState::Free,
                });
            }
        }
        // Waiting down-tracks take free offered slots of their kind, oldest first.
        let mut plan: Vec<(usize, usize)> = Vec::new();
        for (i, d) in p.down_tracks.iter().enumerate() {
            if d.state != DownState::ToOpen {
                continue;
            }
            let free = slots.iter().enumerate().position(|(j, s)| {
                s.state == SlotState::Free
                    && s.kind == d.kind
                    && offered.iter().any(|(m, _)| *m == s.mid)
                    && !plan.iter().any(|(_, k)| *k == j)
            });
            if let Some(j) = free {
                plan.push((i, j));
            }
        }
        let answer = match pc.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%session, error = %e, "offer refused");
                return;
            }
        };
        // Stopped down-tracks free their slot, but only after one `inactive` answer: a mid
        // never goes from one msid straight to another (design §1.6).
        for d in &p.down_tracks {
            if let DownState::ToStop(m) = d.state {
                if let Some(s) = slots.iter_mut().find(|s| s.mid == m) {
                    s.state = SlotState::Releasing;
                }
            }
        }
        for &(i, j) in &plan {
            if let (Some(d), Some(s)) = (p.down_tracks.get_mut(i), slots.get_mut(j)) {
                s.state = SlotState::Assigned(d.track_sid.clone());
                d.state = DownState::Open(s.mid);
                if d.kind == MediaKind::Audio {
                    // A slot may carry a RED-less track after a RED one, or the reverse;
                    // and RED only where the client offered it on this slot.
                    let red = d.red && super::red::offers_red(sdp, &s.mid.to_string());
                    d.red = red;
                }
            }
        }
        // Every offered `recvonly` m-line is answered `inactive` unless a track is on it:
        // str0m's `sendonly` with a random msid would make a browser fire a `track` event
        // that LiveKit clients drop, and that mid would be dead (design §1.6).
        let mut sections: HashMap<String, SlotAnswer> = offered
            .iter()
            .map(|(mid, _)| (mid.to_string(), None))
            .collect();
        let mut mid_to_track_id = HashMap::new();
        for s in slots.iter() {
            let assigned = match &s.state {
                SlotState::Assigned(t) => p
                    .down_tracks
                    .iter()
                    .find(|d| d.track_sid == *t && d.mid() == Some(s.mid)),
                _ => None,
            };
            if let Some(d) = assigned {
                mid_to_track_id.insert(s.mid.to_string(), d.track_sid.to_string());
            }
            sections.insert(
                s.mid.to_string(),
                assigned.map(|d| (d.stream_id.clone(), d.track_sid.to_string())),
            );
        }
        let sdp = rewrite_answer(
            &super::red::only_offered_formats(&answer.to_sdp_string(), sdp),
            &sections,
        );
        tracing::trace!(%session, %sdp, "single-PC answer");
        // Released slots (and any whose down-track is gone) were just answered `inactive`:
        // free for the next offer.
        for s in slots.iter_mut() {
            let live = p
                .down_tracks
                .iter()
                .any(|d| d.mid() == Some(s.mid) && matches!(d.state, DownState::Open(_)));
            if s.state == SlotState::Releasing || !live {
                s.state = SlotState::Free;
            }
        }
        // Newly open video needs a keyframe from its publisher (`plan` holds indices: read
        // them before the `retain`).
        let wants: Vec<(SessionId, TrackSid)> = plan
            .iter()
            .filter_map(|&(i, _)| p.down_tracks.get(i))
            .filter(|d| d.kind == MediaKind::Video)
            .map(|d| (d.publisher, d.track_sid.clone()))
            .collect();
        p.down_tracks
            .retain(|d| !matches!(d.state, DownState::ToStop(_)));
        *answered = true;
        let sdp = self.routable_ice_credentials(session, PcKind::Publisher, sdp);
        self.signal(
            session,
            Msg::Answer(lk::SessionDescription {
                r#type: "answer".into(),
                sdp,
                id: sd.id,
                mid_to_track_id,
            }),
        );
        for (publisher, track) in wants {
            self.request_keyframe(now, publisher, &track, None);
        }
        self.renegotiate(now, session);
    }

    /// Asks a single-PC client to offer again if down-tracks wait for a slot or for their
    /// slot's release: `media_sections_requirement` with the placeholders still missing per
    /// kind (`{0, 0}` just means "offer again"), once per client offer (design §1.6).
    /// Returns false for a v0 participant.
    pub(super) fn single_renegotiate(&mut self, session: SessionId) -> bool {
        let Some(p) = self.participant_mut(session) else {
            return false;
        };
        let Transport::Single {
            slots,
            reoffer_requested,
            answered,
            ..
        } = &mut p.transport
        else {
            return false;
        };
        if !*answered || *reoffer_requested {
            return true;
        }
        let waiting = |kind: MediaKind| {
            p.down_tracks
                .iter()
                .filter(|d| d.kind == kind && d.state == DownState::ToOpen)
                .count()
        };
        let free = |kind: MediaKind| {
            slots
                .iter()
                .filter(|s| s.kind == kind && s.state == SlotState::Free)
                .count()
        };
        let changes = p
            .down_tracks
            .iter()
            .any(|d| matches!(d.state, DownState::ToOpen | DownState::ToStop(_)));
        if !changes {
            return true;
        }
        let missing = |kind| waiting(kind).saturating_sub(free(kind)) as u32;
        let requirement = lk::MediaSectionsRequirement {
            num_audios: missing(MediaKind::Audio),
            num_videos: missing(MediaKind::Video),
        };
        *reoffer_requested = true;
        self.signal(session, Msg::MediaSectionsRequirement(requirement));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\n\
        a=msid:s0 t0\r\na=ssrc:1 cname:x\r\na=ssrc:1 msid:s0 t0\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=sendonly\r\na=msid:s1 t1\r\n\
        a=ssrc:2 msid:s1 t1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:2\r\na=recvonly\r\n";

    #[test]
    fn free_slots_go_inactive_and_assigned_ones_get_the_msid() {
        let slots = HashMap::from([
            ("0".to_owned(), None),
            (
                "1".to_owned(),
                Some(("PA_a|TR_b".to_owned(), "TR_b".to_owned())),
            ),
        ]);
        let out = rewrite_answer(ANSWER, &slots);
        let want = ANSWER
            .replacen("a=sendonly", "a=inactive", 1)
            .replace("a=msid:s1 t1", "a=msid:PA_a|TR_b TR_b")
            .replace("a=ssrc:2 msid:s1 t1", "a=ssrc:2 msid:PA_a|TR_b TR_b");
        assert_eq!(out, want);
    }

    #[test]
    fn only_recvonly_audio_and_video_are_slots() {
        let offer = "v=0\r\nm=audio 9 x 111\r\na=mid:0\r\na=recvonly\r\nm=video 9 x 96\r\n\
            a=recvonly\r\na=mid:1\r\nm=audio 9 x 111\r\na=mid:2\r\na=sendonly\r\n\
            m=application 9 x\r\na=mid:3\r\nm=audio 0 x 111\r\na=mid:4\r\na=recvonly\r\n\
            m=video 9 x 96\r\na=mid:5\r\na=inactive\r\n";
        // A stopped transceiver (port 0) and an `inactive` one are no slots.
        assert_eq!(
            offered_slots(offer),
            vec![
                (Mid::from("0"), MediaKind::Audio),
                (Mid::from("1"), MediaKind::Video)
            ]
        );
        for junk in ["", "m=", "m=audio", "a=recvonly\r\nm=audio 9\r\n"] {
            assert!(offered_slots(junk).is_empty(), "{junk:?}");
        }
    }
}
