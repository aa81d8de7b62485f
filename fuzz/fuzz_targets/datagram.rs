//! Fuzz target for the media port's entry point: `Sfu::handle_datagram` with arbitrary bytes,
//! from a few source addresses, against an engine with one joined participant.
//!
//! Run: `cargo install cargo-fuzz && cd fuzz && cargo +nightly fuzz run datagram -- -max_total_time=300`.
#![no_main]

use std::net::SocketAddr;
use std::time::Instant;

use conclave::sfu::{Command, Join, Output, SessionId, Sfu, SfuConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let server: SocketAddr = "127.0.0.1:7882".parse().unwrap();
    let mut sfu = Sfu::new(
        SfuConfig {
            candidates: vec![server],
            seed: Some(1),
        },
        now,
    );
    sfu.handle_command(
        now,
        Command::Join(Join {
            session: SessionId(1),
            room: "r".into(),
            identity: "a".into(),
            name: String::new(),
            metadata: String::new(),
            permission: livekit_protocol::ParticipantPermission {
                can_publish: true,
                can_subscribe: true,
                ..Default::default()
            },
            auto_subscribe: true,
            client_protocol: 2,
        }),
    );
    while !matches!(sfu.poll_output(), Output::Timeout(_)) {}
    // The first byte picks a source; the rest is the datagram.
    let (src, packet) = data.split_first().map_or((0, &[][..]), |(s, p)| (*s, p));
    let source = SocketAddr::from(([10, 0, 0, src % 4], 5000));
    sfu.handle_datagram(now, source, server, packet);
    while !matches!(sfu.poll_output(), Output::Timeout(_)) {}
});
