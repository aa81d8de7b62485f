//! What the engine targets share: a fresh engine (fixed seed: reproducible IDs and ICE
//! credentials) with one joined participant, session 1, identity `a` in room `r`.
#![allow(dead_code)] // each target uses only part of it

use std::net::SocketAddr;
use std::time::Instant;

use conclave::sfu::{Command, Join, SessionId, Sfu, SfuConfig};
use livekit_protocol::ParticipantPermission;

/// The engine's one media address.
pub fn server() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7882))
}

/// The engine's ICE-TCP address (RFC 4571 frames arrive there, one packet each).
pub fn server_tcp() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7881))
}

/// A fresh engine at `now` with participant `a` (session 1, v0 signalling) joined with
/// `permission`; its outputs are not drained yet.
pub fn engine_with_participant(now: Instant, permission: ParticipantPermission) -> Sfu {
    let mut sfu = Sfu::new(
        SfuConfig {
            candidates: vec![server()],
            tcp_candidates: vec![server_tcp()],
            seed: Some(1),
            ..Default::default()
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
            attributes: Default::default(),
            permission,
            auto_subscribe: true,
            client_protocol: 2,
            single_pc: false,
            ice_servers: Vec::new(),
            cascade: conclave::sfu::CascadeRole::None,
        }),
    );
    sfu
}
