//! Fuzz target for what WHIP and WHEP read from a request body (`src/bridge/`): arbitrary
//! text as an offer (str0m's parser, then the sections, directions, codecs and simulcast rids
//! the bridge checks, both as WHIP and as WHEP) and as a `PATCH` fragment (trickle candidates
//! or an ICE restart, whose rewritten offer must keep every media section). Nothing may panic.
//!
//! Run: `cd fuzz && cargo +nightly fuzz run whip_sdp corpus/whip_sdp seeds/whip_sdp`.
#![no_main]

use conclave::bridge::{inspect_offer, sdp, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for kind in [Kind::Whip, Kind::Whep] {
        if let Ok((sections, usable)) = inspect_offer(kind, text) {
            assert!(!usable.is_empty() && usable.len() <= sections.len());
        }
    }
    if let Ok(f) = sdp::fragment(text) {
        if let (Some(ufrag), Some(pwd)) = (&f.ufrag, &f.pwd) {
            let restarted = sdp::restarted(text, ufrag, pwd);
            assert_eq!(sdp::sections(&restarted).len(), sdp::sections(text).len());
        }
    }
    let _ = sdp::answer_fragment(text);
});
