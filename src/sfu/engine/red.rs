//! Keeping RED (RFC 2198 redundant audio) off the tracks that must not use it.
//!
//! A browser builds RED in its audio encoder, *before* an end-to-end encryption transform runs,
//! so an encrypted RED payload has its block headers encrypted too: no SFU can split it, and the
//! SFU's subscribers could not decrypt what it re-packetises. LiveKit clients therefore mark such
//! tracks `disable_red` (and every E2EE track is one), and LiveKit's SFU answers them without
//! RED. Conclave does the same by removing RED from those tracks' m-sections of the publisher's
//! offer before answering it: the browser then sends plain Opus, which survives forwarding. On
//! the subscriber side the engine turns str0m's RED wrapping off for those tracks
//! (`set_red_send`), so the Opus frames arrive as the publisher encrypted them.

/// Returns `sdp` without the RED payload types in the audio m-sections whose `a=msid` track id
/// is in `track_ids`. Other sections, and sections where RED is the only format, are unchanged.
pub(super) fn strip_red(sdp: &str, track_ids: &[&str]) -> String {
    if track_ids.is_empty() {
        return sdp.to_owned();
    }
    let eol = if sdp.contains("\r\n") { "\r\n" } else { "\n" };
    let lines: Vec<&str> = sdp.split(eol).collect();
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    let mut start = 0;
    while start < lines.len() {
        let end = lines[start + 1..]
            .iter()
            .position(|l| l.starts_with("m="))
            .map_or(lines.len(), |i| start + 1 + i);
        let section = &lines[start..end];
        match section_without_red(section, track_ids) {
            Some(kept) => out.extend(kept),
            None => out.extend(section.iter().map(|l| (*l).to_owned())),
        }
        start = end;
    }
    out.join(eol)
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
    let red: Vec<&str> = section
        .iter()
        .filter_map(|l| l.strip_prefix("a=rtpmap:"))
        .filter_map(|v| v.split_once(' '))
        .filter(|(_, codec)| codec.to_ascii_lowercase().starts_with("red/"))
        .map(|(pt, _)| pt)
        .collect();
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
    use super::strip_red;

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
}
