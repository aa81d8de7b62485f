//! What WHIP and WHEP need to read in SDP text: the offer's media sections (direction, codecs,
//! track id), the SDP fragments of `PATCH` (RFC 8840 trickle and ICE restarts), and the
//! rewriting an ICE restart needs. Parsing for validity is str0m's; this only reads lines.

/// One `m=` section of an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// `audio`, `video`, `application`, …
    pub media: String,
    /// `a=mid:`.
    pub mid: String,
    /// `sendonly`, `recvonly`, `sendrecv` or `inactive` (`sendrecv` when absent).
    pub direction: String,
    /// Codec names of `a=rtpmap:` lines as written (`opus`, `VP8`, `rtx`, …).
    pub codecs: Vec<String>,
    /// The track id of `a=msid:<stream> <track>` (or of an `a=ssrc:… msid:` line).
    pub track_id: Option<String>,
    /// Port 0: a rejected or stopped section.
    pub stopped: bool,
    /// Simulcast: the `a=rid:<id> send` streams, in the order of `a=simulcast:send` when it
    /// lists them (alternatives `a|b` taken by their first), else of the `a=rid` lines.
    pub rids: Vec<String>,
}

impl Section {
    /// Sends media from the offerer.
    pub fn sends(&self) -> bool {
        !self.stopped && matches!(self.direction.as_str(), "sendonly" | "sendrecv")
    }

    /// Asks for media from the answerer.
    pub fn receives(&self) -> bool {
        !self.stopped && matches!(self.direction.as_str(), "recvonly" | "sendrecv")
    }

    /// Audio or video.
    pub fn is_av(&self) -> bool {
        matches!(self.media.as_str(), "audio" | "video")
    }

    /// Offers a codec the SFU forwards (Opus; VP8 or H.264).
    pub fn supported(&self) -> bool {
        let wanted: &[&str] = match self.media.as_str() {
            "audio" => &["opus"],
            "video" => &["vp8", "h264"],
            _ => &[],
        };
        self.codecs
            .iter()
            .any(|c| wanted.iter().any(|w| c.eq_ignore_ascii_case(w)))
    }

    /// The media codecs offered (no `rtx`, `red`, FEC), for error messages.
    pub fn media_codecs(&self) -> Vec<&str> {
        self.codecs
            .iter()
            .map(String::as_str)
            .filter(|c| {
                !["rtx", "red", "ulpfec", "flexfec-03"]
                    .iter()
                    .any(|x| c.eq_ignore_ascii_case(x))
            })
            .collect()
    }
}

/// The media sections of `sdp`, in order.
pub fn sections(sdp: &str) -> Vec<Section> {
    let mut out: Vec<Section> = Vec::new();
    for line in sdp.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(m) = line.strip_prefix("m=") {
            let mut fields = m.split(' ');
            let media = fields.next().unwrap_or_default().to_owned();
            let stopped = fields.next() == Some("0");
            out.push(Section {
                media,
                mid: String::new(),
                direction: "sendrecv".into(),
                codecs: Vec::new(),
                track_id: None,
                stopped,
                rids: Vec::new(),
            });
            continue;
        }
        let Some(s) = out.last_mut() else { continue };
        if let Some(mid) = line.strip_prefix("a=mid:") {
            s.mid = mid.trim().to_owned();
        } else if let Some(d) = ["sendonly", "recvonly", "sendrecv", "inactive"]
            .iter()
            .find(|d| line.strip_prefix("a=") == Some(**d))
        {
            s.direction = (*d).to_owned();
        } else if let Some(map) = line.strip_prefix("a=rtpmap:") {
            if let Some(name) = map
                .split_once(' ')
                .and_then(|(_, enc)| enc.split('/').next())
            {
                s.codecs.push(name.to_owned());
            }
        } else if let Some(rid) = line.strip_prefix("a=rid:") {
            let mut f = rid.split(' ');
            if let (Some(id), Some("send")) = (f.next(), f.next()) {
                if !s.rids.iter().any(|r| r == id) {
                    s.rids.push(id.to_owned());
                }
            }
        } else if let Some(order) = line.strip_prefix("a=simulcast:send ") {
            let listed: Vec<String> = order
                .split(' ')
                .next()
                .unwrap_or_default()
                .split(';')
                .filter_map(|alt| alt.split(',').next())
                .map(|r| r.trim_start_matches('~').to_owned())
                .filter(|r| !r.is_empty())
                .collect();
            let mut rest: Vec<String> = s.rids.drain(..).filter(|r| !listed.contains(r)).collect();
            s.rids = listed;
            s.rids.append(&mut rest);
        } else if let Some(msid) = line.strip_prefix("a=msid:") {
            s.track_id = msid.split(' ').nth(1).map(str::to_owned);
        } else if let Some((_, msid)) = line
            .strip_prefix("a=ssrc:")
            .and_then(|l| l.split_once(" msid:"))
        {
            if s.track_id.is_none() {
                s.track_id = msid.split(' ').nth(1).map(str::to_owned);
            }
        }
    }
    out
}

/// An SDP fragment (`application/trickle-ice-sdpfrag`, RFC 8840) of a `PATCH`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    /// `a=ice-ufrag:` (a new one means an ICE restart).
    pub ufrag: Option<String>,
    /// `a=ice-pwd:`.
    pub pwd: Option<String>,
    /// `a=candidate:` attributes (without `a=`), with the `a=mid:` of their section.
    pub candidates: Vec<(Option<String>, String)>,
    /// `a=end-of-candidates` was present.
    pub end_of_candidates: bool,
}

/// Reads a fragment; `Err` says what is wrong with it.
pub fn fragment(body: &str) -> Result<Fragment, String> {
    let mut f = Fragment::default();
    let mut mid: Option<String> = None;
    let mut lines = 0;
    for line in body.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        lines += 1;
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("not an SDP line: {line:?}"));
        };
        if key.len() != 1 {
            return Err(format!("not an SDP line: {line:?}"));
        }
        if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
            f.ufrag = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
            f.pwd = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("a=mid:") {
            mid = Some(v.trim().to_owned());
        } else if let Some(c) = line.strip_prefix("a=") {
            if c.starts_with("candidate:") {
                // foundation component transport priority address port "typ" type
                if c.split(' ').count() < 8 {
                    return Err(format!("malformed candidate: {line:?}"));
                }
                f.candidates.push((mid.clone(), c.to_owned()));
            } else if c == "end-of-candidates" {
                f.end_of_candidates = true;
            }
        } else if key == "m" {
            mid = None;
        }
        let _ = value;
    }
    if lines == 0 {
        return Err("empty SDP fragment".into());
    }
    if f.ufrag.is_some() != f.pwd.is_some() {
        return Err("an ICE restart needs both a=ice-ufrag and a=ice-pwd".into());
    }
    Ok(f)
}

/// The ICE credentials of `sdp` (the first ones found).
pub fn credentials(sdp: &str) -> Option<(String, String)> {
    let find = |key: &str| {
        sdp.lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    Some((find("a=ice-ufrag:")?, find("a=ice-pwd:")?))
}

/// `offer` with new ICE credentials and without its old candidates: the offer an ICE
/// restart by `PATCH` stands for (WHIP renegotiates nothing else).
pub fn restarted(offer: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(offer.len());
    for line in offer.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("a=ice-ufrag:") {
            out.push_str(&format!("a=ice-ufrag:{ufrag}"));
        } else if line.starts_with("a=ice-pwd:") {
            out.push_str(&format!("a=ice-pwd:{pwd}"));
        } else if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

/// The fragment answering an ICE restart: the answer's credentials and candidates, under
/// its first media section's mid (RFC 9725 §4.3.2: with max-bundle, only that one gathers).
pub fn answer_fragment(answer: &str) -> String {
    let mut out = String::new();
    if answer.lines().any(|l| l.trim_end() == "a=ice-lite") {
        out.push_str("a=ice-lite\r\n");
    }
    if let Some((ufrag, pwd)) = credentials(answer) {
        out.push_str(&format!("a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n"));
    }
    let first = sections(answer).into_iter().next();
    if let Some(s) = first {
        out.push_str(&format!(
            "m={} 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:{}\r\n",
            s.media, s.mid
        ));
    }
    let mut in_first = false;
    let mut seen = 0;
    for line in answer.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("m=") {
            seen += 1;
            in_first = seen == 1;
        } else if in_first && line.starts_with("a=candidate:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("a=end-of-candidates\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
        a=group:BUNDLE 0 1\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:EsAw\r\n\
        a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y\r\na=mid:0\r\na=sendonly\r\n\
        a=msid:- d46fb922\r\na=rtpmap:111 opus/48000/2\r\n\
        a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 98 96 97\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=sendonly\r\n\
        a=ssrc:1 msid:s v-track\r\na=rtpmap:98 VP9/90000\r\na=rtpmap:96 VP8/90000\r\n\
        a=rtpmap:97 rtx/90000\r\n\
        m=video 0 UDP/TLS/RTP/SAVPF 100\r\na=mid:2\r\na=recvonly\r\na=rtpmap:100 AV1/90000\r\n";

    #[test]
    fn sections_read_direction_codecs_and_track() {
        let s = sections(OFFER);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].media, "audio");
        assert_eq!(s[0].track_id.as_deref(), Some("d46fb922"));
        assert!(s[0].sends() && s[0].supported());
        assert_eq!(s[1].codecs, ["VP9", "VP8", "rtx"]);
        assert_eq!(s[1].track_id.as_deref(), Some("v-track"));
        assert!(s[1].supported());
        assert_eq!(s[1].media_codecs(), ["VP9", "VP8"]);
        assert!(s[2].stopped && !s[2].receives() && !s[2].supported());
    }

    #[test]
    fn simulcast_streams_in_their_listed_order() {
        let offer = "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na=sendonly\r\n\
            a=rtpmap:96 VP8/90000\r\na=rid:f send\r\na=rid:q send\r\na=rid:h send\r\n\
            a=rid:x recv\r\na=simulcast:send q;h;~f\r\n";
        assert_eq!(sections(offer)[0].rids, ["q", "h", "f"]);
        let unlisted = "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rid:a send\r\na=rid:b send\r\n";
        assert_eq!(sections(unlisted)[0].rids, ["a", "b"]);
    }

    #[test]
    fn fragments_carry_candidates_or_a_restart() {
        let f = fragment(
            "a=ice-options:trickle\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\n\
             a=candidate:1 1 udp 2130706431 10.0.0.1 5000 typ host\r\na=end-of-candidates\r\n",
        )
        .expect("trickle");
        assert_eq!(f.ufrag, None);
        assert_eq!(f.candidates.len(), 1);
        assert_eq!(f.candidates[0].0.as_deref(), Some("0"));
        assert!(f.end_of_candidates);
        let r =
            fragment("a=ice-ufrag:new\r\na=ice-pwd:newpasswordnewpassword12\r\n").expect("restart");
        assert_eq!(r.ufrag.as_deref(), Some("new"));
        for bad in [
            "",
            "hello",
            "a=ice-ufrag:only\r\n",
            "a=candidate:1 1 udp\r\n",
            "xx=1\r\n",
        ] {
            assert!(fragment(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_restart_offer_swaps_credentials_and_drops_candidates() {
        let r = restarted(OFFER, "nu", "npw");
        assert!(r.contains("a=ice-ufrag:nu\r\n") && r.contains("a=ice-pwd:npw\r\n"));
        assert!(!r.contains("EsAw") && !r.contains("a=candidate"));
        assert_eq!(sections(&r), sections(OFFER));
    }

    #[test]
    fn the_answer_fragment_has_credentials_and_first_section_candidates() {
        let f = answer_fragment(OFFER);
        assert!(f.starts_with("a=ice-ufrag:EsAw\r\na=ice-pwd:"), "{f}");
        assert!(f.contains("a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n"));
        assert!(f.ends_with("a=end-of-candidates\r\n"));
    }
}
