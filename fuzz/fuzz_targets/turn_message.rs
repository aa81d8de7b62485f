//! Fuzz target for the embedded TURN server (`src/turn/`): arbitrary bytes as STUN/TURN
//! messages and ChannelData, parsed with every accessor (`turn::message`), framed as on a
//! stream, and handled by the server's request logic (`turn::fuzz_messages`) for a client
//! that already holds an allocation, a permission and a channel to the media address, so
//! mutated Refresh, CreatePermission, ChannelBind, Send and ChannelData reach their
//! handlers. The input is split at `0xFE 0xFE` into several messages. Must never panic.
//!
//! Run: `scripts/fuzz run turn_message -max_total_time=300` (see docs/fuzzing.md).
#![no_main]

use std::sync::OnceLock;

use conclave::turn::{self, message};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let messages: Vec<&[u8]> = split(data);
    for m in &messages {
        if let Ok(parsed) = message::Message::parse(m) {
            let _ = parsed.text(message::attr::USERNAME);
            let _ = parsed.u32(message::attr::LIFETIME);
            let _ = parsed.xor_addresses(message::attr::XOR_PEER_ADDRESS);
            let _ = parsed.unknown_required();
            let _ = parsed.integrity_ok(b"key");
        }
        let _ = message::parse_channel_data(m);
        let _ = message::stream_frame_len(m);
    }
    // On the runtime, which then runs the allocation's relay task to its end (the harness
    // ends the allocation): nothing of one input outlives it (no task, no socket).
    runtime().block_on(async {
        let _ = turn::fuzz_messages(&messages);
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    });
});

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == 0xFE && data[i + 1] == 0xFE {
            out.push(&data[start..i]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    out.push(&data[start..]);
    out
}
