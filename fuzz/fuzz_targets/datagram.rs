//! Fuzz target for the media ports' entry point: `Sfu::handle_packet` with arbitrary bytes,
//! as a UDP datagram or as one ICE-TCP frame's payload, from a few source addresses, against
//! an engine with one joined participant.
//!
//! Random bytes from an address that never did ICE stop at the unknown-peer check, so the
//! harness first sends, from 10.0.0.1, a STUN binding request that passes the integrity check
//! (the ICE credentials are read from the engine's own subscriber offer). The first input byte
//! picks the source of the rest: 10.0.0.1 (a known peer: its bytes reach str0m's DTLS, SRTP and
//! STUN demultiplexing) or 10.0.0.{2,3,0} (unknown peers); its high bit, the protocol (TCP:
//! the binding request came over TCP too, to the engine's passive TCP candidate).
//!
//! Run: `scripts/fuzz run datagram -max_total_time=300` (see docs/fuzzing.md).
#![no_main]

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use conclave::sfu::{IpProto, Output, Sfu, SignalOut};
use libfuzzer_sys::fuzz_target;
use livekit_protocol::signal_response::Message as Msg;
use sha1::{Digest, Sha1};

/// HMAC-SHA1 (RFC 2104), what STUN's MESSAGE-INTEGRITY is.
fn hmac_sha1(key: &[u8], message: &[u8]) -> [u8; 20] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..20].copy_from_slice(&Sha1::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner_hash = Sha1::new()
        .chain_update(&inner)
        .chain_update(message)
        .finalize();
    Sha1::new()
        .chain_update(&outer)
        .chain_update(inner_hash)
        .finalize()
        .into()
}

/// A STUN binding request for `username` with PRIORITY and MESSAGE-INTEGRITY keyed with
/// `password` (RFC 8489 §14.5: the length field covers the integrity attribute).
fn binding_request(username: &str, password: &str) -> Vec<u8> {
    let mut attrs = vec![0x00, 0x06];
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff]);
    let mut packet = vec![0x00, 0x01];
    packet.extend_from_slice(&((attrs.len() + 24) as u16).to_be_bytes());
    packet.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    packet.extend_from_slice(&[5; 12]);
    packet.extend_from_slice(&attrs);
    let tag = hmac_sha1(password.as_bytes(), &packet);
    packet.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    packet.extend_from_slice(&tag);
    packet
}

/// Drains the engine's outputs; returns the ICE ufrag and password of the first offer seen.
fn drain(sfu: &mut Sfu) -> Option<(String, String)> {
    let mut creds = None;
    loop {
        match sfu.poll_output() {
            Output::Timeout(_) => return creds,
            Output::Signal(_, SignalOut::Message(m)) => {
                if let (None, Msg::Offer(o)) = (&creds, *m) {
                    let attr = |name: &str| {
                        o.sdp
                            .lines()
                            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                    };
                    creds = attr("a=ice-ufrag:").zip(attr("a=ice-pwd:"));
                }
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let server = common::server();
    let mut sfu = common::engine_with_participant(
        now,
        livekit_protocol::ParticipantPermission {
            can_publish: true,
            can_subscribe: true,
            ..Default::default()
        },
    );
    let (ufrag, pwd) = drain(&mut sfu).expect("a join sends the subscriber offer");
    // The first byte picks a source and a protocol; the rest is the packet.
    let (src, packet) = data.split_first().map_or((1, &[][..]), |(s, p)| (*s, p));
    let (proto, local) = if src & 0x80 != 0 {
        (IpProto::Tcp, common::server_tcp())
    } else {
        (IpProto::Udp, server)
    };
    let known = SocketAddr::from(([10, 0, 0, 1], 5000));
    let stun = binding_request(&format!("{ufrag}:fuzz"), &pwd);
    sfu.handle_packet(now, proto, known, local, &stun);
    drain(&mut sfu);
    let source = SocketAddr::from(([10, 0, 0, src % 4], 5000));
    sfu.handle_packet(now, proto, source, local, packet);
    drain(&mut sfu);
});
