//! Keeping RED (RFC 2198 redundant audio) off the tracks that must not use it.
//!
//! A browser builds RED in its audio encoder, *before* an end-to-end encryption transform runs,
//! so an encrypted RED payload has its block headers encrypted too: no SFU can split it, and the
//! SFU's subscribers could not decrypt what it re-packetises. LiveKit clients therefore mark such
//! tracks `disable_red` (and every E2EE track is one), and LiveKit's SFU answers them without
//! RED. Conclave does the same by removing RED from those tracks' m-sections of the publisher's
//! offer before answering it: the browser then sends plain Opus, which survives forwarding. On
//! the subscriber side the engine never wraps those tracks in RED (`DownTrack::red`), so the Opus frames arrive as the publisher encrypted them. Every answer
//! also goes through [`only_offered_formats`], because str0m would otherwise put RED back.

/// Returns `sdp` without the RED payload types in the audio m-sections whose `a=msid` track id
/// is in `track_ids`. Other sections, and sections where RED is the only format, are unchanged.
pub(super) fn strip_red(sdp: &str, track_ids: &[&str]) -> String {
    if track_ids.is_empty() {
        return sdp.to_owned();
    }
    rewrite_sections(sdp, |section| section_without_red(section, track_ids))
}

/// The section's lines without RED, or `None` when the section is to stay as it is.
fn section_without_red(section: &[&str], track_ids: &[&str]) -> Option<Vec<String>> {
    let m_line = section.first()?.strip_prefix("m=audio ")?;
    let track = section
        .iter()
        .find_map(|l| l.strip_prefix("a=msid:"))
        .and_then(|v| v.split_whitespace().nth(1))?;
    if !track_ids.contains(&track) {
        return None;
    }
    let red = red_payload_types(section);
    if red.is_empty() {
        return None;
    }
    // m=audio <port> <proto> <fmt>...
    let mut fields = m_line.split(' ');
    let (port, proto) = (fields.next()?, fields.next()?);
    let formats: Vec<&str> = fields.filter(|f| !red.contains(f)).collect();
    if formats.is_empty() {
        return None;
    }
    let mut kept = vec![format!("m=audio {port} {proto} {}", formats.join(" "))];
    kept.extend(
        section[1..]
            .iter()
            .filter(|l| !names_payload_type(l, &red))
            .map(|l| (*l).to_owned()),
    );
    Some(kept)
}

/// Returns `answer` with, in each m-section, only the payload formats that the offer's
/// section with the same mid listed (RFC 3264 §6.1: an answer must not add formats).
///
/// Why: str0m folds RED onto Opus for the whole session, so once one audio m-line of a peer
/// connection negotiates RED, its answer adds the RED payload type to *every* audio m-line,
/// even one whose offer left RED out. On a single peer connection (v1) that is the rule, not
/// the exception: the client's `recvonly` slots offer RED, and its E2EE microphone is offered
/// without it. Chrome then sends the microphone as RED, built before the encryption
/// transform, which no SFU can unwrap: the subscribers heard nothing. Sections of unknown
/// mids, and sections that would be left with no format, are kept as they are.
pub(super) fn only_offered_formats(answer: &str, offer: &str) -> String {
    let offered = formats_by_mid(offer);
    rewrite_sections(answer, |section| {
        section_mid(section)
            .and_then(|mid| offered.get(mid))
            .and_then(|formats| section_with_formats(section, formats))
    })
}

/// Whether the m-section of `mid` in `sdp` lists RED among its formats. A client's
/// `recvonly` slot offered without RED must never get str0m's RED wrapping (str0m would use
/// the RED payload type another section negotiated, which this one does not know).
pub(super) fn offers_red(sdp: &str, mid: &str) -> bool {
    sections(sdp)
        .into_iter()
        .find(|section| section_mid(section) == Some(mid))
        .is_some_and(|section| {
            let formats = m_line_formats(&section);
            red_payload_types(&section)
                .iter()
                .any(|pt| formats.contains(pt))
        })
}

/// The line ending `sdp` uses.
fn eol(sdp: &str) -> &'static str {
    if sdp.contains("\r\n") {
        "\r\n"
    } else {
        "\n"
    }
}

/// The m-sections of `sdp` (the session part first), as lines.
fn sections(sdp: &str) -> Vec<Vec<&str>> {
    let mut out: Vec<Vec<&str>> = vec![Vec::new()];
    for line in sdp.split(eol(sdp)) {
        if line.starts_with("m=") {
            out.push(Vec::new());
        }
        if let Some(last) = out.last_mut() {
            last.push(line);
        }
    }
    out
}

/// `sdp` with each section replaced by what `rewrite` makes of it (`None`: kept as it is),
/// in `sdp`'s own line endings.
fn rewrite_sections(sdp: &str, rewrite: impl Fn(&[&str]) -> Option<Vec<String>>) -> String {
    let mut out: Vec<String> = Vec::new();
    for section in sections(sdp) {
        match rewrite(&section) {
            Some(kept) => out.extend(kept),
            None => out.extend(section.iter().map(|l| (*l).to_owned())),
        }
    }
    out.join(eol(sdp))
}

/// The section's `a=mid`.
fn section_mid<'a>(section: &[&'a str]) -> Option<&'a str> {
    section.iter().find_map(|l| l.strip_prefix("a=mid:"))
}

/// The payload formats on the section's `m=` line (`m=<media> <port> <proto> <fmt>...`).
fn m_line_formats<'a>(section: &[&'a str]) -> Vec<&'a str> {
    section
        .first()
        .and_then(|l| l.strip_prefix("m="))
        .map(|m| m.split(' ').skip(3).collect())
        .unwrap_or_default()
}

/// The payload types the section's `a=rtpmap` lines name RED.
fn red_payload_types<'a>(section: &[&'a str]) -> Vec<&'a str> {
    section
        .iter()
        .filter_map(|l| l.strip_prefix("a=rtpmap:"))
        .filter_map(|v| v.split_once(' '))
        .filter(|(_, codec)| codec.to_ascii_lowercase().starts_with("red/"))
        .map(|(pt, _)| pt)
        .collect()
}

/// mid → the payload formats of that m-section's `m=` line.
fn formats_by_mid(sdp: &str) -> std::collections::HashMap<String, Vec<String>> {
    sections(sdp)
        .iter()
        .filter(|section| section.first().is_some_and(|l| l.starts_with("m=")))
        .filter_map(|section| {
            let formats = m_line_formats(section)
                .into_iter()
                .map(str::to_owned)
                .collect();
            section_mid(section).map(|mid| (mid.to_owned(), formats))
        })
        .collect()
}

/// The section with only `formats` on its `m=` line and their attributes, or `None` when it
/// already has no other format or would be left with none.
fn section_with_formats(section: &[&str], formats: &[String]) -> Option<Vec<String>> {
    let m_line = section.first()?.strip_prefix("m=")?;
    let fields: Vec<&str> = m_line.split(' ').collect();
    if fields.len() < 4 {
        return None;
    }
    let (head, own) = fields.split_at(3);
    let extra: Vec<&str> = own
        .iter()
        .copied()
        .filter(|f| !formats.iter().any(|o| o == f))
        .collect();
    if extra.is_empty() || extra.len() == own.len() {
        return None;
    }
    let kept: Vec<&str> = own.iter().copied().filter(|f| !extra.contains(f)).collect();
    let mut lines = vec![format!("m={} {}", head.join(" "), kept.join(" "))];
    lines.extend(
        section[1..]
            .iter()
            .filter(|l| !names_payload_type(l, &extra))
            .map(|l| (*l).to_owned()),
    );
    Some(lines)
}

/// Whether `line` is an rtpmap, fmtp or rtcp-fb attribute of one of `pts`.
fn names_payload_type(line: &str, pts: &[&str]) -> bool {
    ["a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"].iter().any(|attr| {
        line.strip_prefix(attr)
            .and_then(|v| v.split(' ').next())
            .is_some_and(|pt| pts.contains(&pt))
    })
}

#[cfg(test)]
mod tests {
    use super::{offers_red, only_offered_formats, strip_red};

    const OFFER: &str = "v=0\r\n\
        o=- 1 2 IN IP4 127.0.0.1\r\n\
        s=-\r\n\
        t=0 0\r\n\
        a=group:BUNDLE 0 1\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9\r\n\
        a=mid:0\r\n\
        a=msid:stream-a mic-track\r\n\
        a=rtpmap:111 opus/48000/2\r\n\
        a=rtcp-fb:111 transport-cc\r\n\
        a=fmtp:111 minptime=10;useinbandfec=1\r\n\
        a=rtpmap:63 red/48000/2\r\n\
        a=fmtp:63 111/111\r\n\
        a=rtpmap:9 G722/8000\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
        a=mid:1\r\n\
        a=msid:stream-a cam-track\r\n\
        a=rtpmap:96 VP8/90000\r\n";

    #[test]
    fn removes_red_from_the_named_audio_track_only() {
        let out = strip_red(OFFER, &["mic-track"]);
        assert!(
            out.contains("m=audio 9 UDP/TLS/RTP/SAVPF 111 9\r\n"),
            "{out}"
        );
        assert!(!out.contains("a=rtpmap:63"), "{out}");
        assert!(!out.contains("a=fmtp:63"), "{out}");
        // Everything else is kept, in order, with the offer's line endings.
        assert!(out
            .contains("a=fmtp:111 minptime=10;useinbandfec=1\r\na=rtpmap:9 G722/8000\r\nm=video"));
        assert!(out.contains("a=rtpmap:96 VP8/90000\r\n"));
        assert_eq!(
            out.len(),
            OFFER.len() - "a=rtpmap:63 red/48000/2\r\na=fmtp:63 111/111\r\n 63".len()
        );
    }

    #[test]
    fn leaves_other_tracks_and_odd_sections_alone() {
        assert_eq!(strip_red(OFFER, &[]), OFFER);
        assert_eq!(strip_red(OFFER, &["cam-track", "someone-else"]), OFFER);
        // RED as the only format: nothing sensible to remove.
        let only_red =
            "m=audio 9 UDP/TLS/RTP/SAVPF 63\r\na=msid:s t\r\na=rtpmap:63 red/48000/2\r\n";
        assert_eq!(strip_red(only_red, &["t"]), only_red);
        // Not SDP at all: returned unchanged, never a panic.
        for junk in ["", "m=", "m=audio", "m=audio 9\r\na=msid:x\r\n", "\n\n\r\n"] {
            assert_eq!(strip_red(junk, &["t"]), junk);
        }
    }

    /// What str0m answered a single-PC offer whose E2EE microphone (mid 8) was offered
    /// without RED while a `recvonly` slot (mid 0) offered it: RED added to mid 8.
    #[test]
    fn answer_keeps_only_the_formats_each_section_offered() {
        let offer = "v=0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9\r\n\
            a=mid:0\r\n\
            a=recvonly\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111 9 0\r\n\
            a=mid:8\r\n\
            a=sendonly\r\n";
        let answer = "v=0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 63 111\r\n\
            a=mid:0\r\n\
            a=sendonly\r\n\
            a=rtpmap:111 opus/48000/2\r\n\
            a=rtpmap:63 red/48000/2\r\n\
            a=fmtp:63 111/111\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 63 111\r\n\
            a=mid:8\r\n\
            a=recvonly\r\n\
            a=rtpmap:111 opus/48000/2\r\n\
            a=rtcp-fb:111 transport-cc\r\n\
            a=rtpmap:63 red/48000/2\r\n\
            a=fmtp:63 111/111\r\n";
        let out = only_offered_formats(answer, offer);
        let (slot, mic) = out.split_once("a=mid:8").expect("mid 8 kept");
        // The slot offered RED: its answer is untouched.
        assert!(
            slot.contains("m=audio 9 UDP/TLS/RTP/SAVPF 63 111\r\n"),
            "{out}"
        );
        assert!(slot.contains("a=rtpmap:63 red/48000/2\r\n"), "{out}");
        // The microphone did not: RED and its attributes are gone, Opus stays.
        assert!(
            out.contains("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:8"),
            "{out}"
        );
        assert!(!mic.contains(":63 "), "{out}");
        assert!(mic.contains("a=rtcp-fb:111 transport-cc\r\n"), "{out}");
        assert_eq!(
            out.len(),
            answer.len() - " 63".len() - "a=rtpmap:63 red/48000/2\r\na=fmtp:63 111/111\r\n".len()
        );
    }

    #[test]
    fn offers_red_reads_the_named_section_only() {
        let offer = "v=0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111 63\r\na=mid:0\r\n\
            a=rtpmap:111 opus/48000/2\r\na=rtpmap:63 red/48000/2\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=rtpmap:111 opus/48000/2\r\n\
            a=rtpmap:63 red/48000/2\r\n";
        assert!(offers_red(offer, "0"));
        // An rtpmap for a format the m= line does not list does not count.
        assert!(!offers_red(offer, "1"));
        assert!(!offers_red(offer, "2"));
        assert!(!offers_red("", "0"));
    }

    #[test]
    fn answer_sections_without_a_match_stay_as_they_are() {
        let answer = "v=0\r\nm=audio 9 RTP/SAVPF 63 111\r\na=mid:3\r\na=rtpmap:63 red/48000/2\r\n";
        // Unknown mid, no mids at all, or nothing offered in common: unchanged.
        assert_eq!(only_offered_formats(answer, "v=0\r\n"), answer);
        let other_mid = "m=audio 9 RTP/SAVPF 111\r\na=mid:4\r\n";
        assert_eq!(only_offered_formats(answer, other_mid), answer);
        let disjoint = "m=audio 9 RTP/SAVPF 0\r\na=mid:3\r\n";
        assert_eq!(only_offered_formats(answer, disjoint), answer);
        for junk in ["", "m=", "m=audio", "m=audio 9\r\na=mid:3\r\n", "\n\n\r\n"] {
            assert_eq!(only_offered_formats(junk, answer), junk);
            assert_eq!(only_offered_formats(answer, junk), answer);
        }
    }
}
