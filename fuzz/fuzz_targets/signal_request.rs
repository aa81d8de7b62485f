//! Fuzz target for the signalling entry point: arbitrary bytes decoded as a LiveKit
//! `SignalRequest`, as `signal` decodes a binary WebSocket frame (protobuf) or, failing that,
//! a text frame (protojson); if it carries a message, it is fed to the engine as
//! `Command::Request` from a joined session and the outputs are drained. The engine must never
//! panic, whatever the request. (`signal` answers `ping`/`ping_req`/`leave` itself; they go to
//! the engine here too, which must cope with them.)
//!
//! Run: `cd fuzz && cargo +nightly fuzz run signal_request corpus/signal_request seeds/signal_request`.
#![no_main]

mod common;

use std::time::Instant;

use conclave::sfu::{Command, Output, SessionId, Sfu};
use libfuzzer_sys::fuzz_target;
use livekit_protocol as lk;
use prost::Message as _;

/// One request may cause many outputs (signals, events), but not without bound.
const MAX_OUTPUTS: usize = 100_000;

/// Drains the engine until it asks for a timeout; panics (a finding) if it never does.
fn drain(sfu: &mut Sfu) {
    for _ in 0..MAX_OUTPUTS {
        if matches!(sfu.poll_output(), Output::Timeout(_)) {
            return;
        }
    }
    panic!("more than {MAX_OUTPUTS} outputs without a timeout");
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = lk::SignalRequest::decode(data)
        .or_else(|_| serde_json::from_slice::<lk::SignalRequest>(data).map_err(|_| ()))
    else {
        return;
    };
    let Some(message) = request.message else {
        return;
    };
    // A fresh engine per input with one participant that may publish, subscribe and send data.
    let now = Instant::now();
    let mut sfu = common::engine_with_participant(
        now,
        lk::ParticipantPermission {
            can_publish: true,
            can_subscribe: true,
            can_publish_data: true,
            can_update_metadata: true,
            ..Default::default()
        },
    );
    drain(&mut sfu);
    sfu.handle_command(
        now,
        Command::Request {
            session: SessionId(1),
            message: Box::new(message),
        },
    );
    drain(&mut sfu);
});
