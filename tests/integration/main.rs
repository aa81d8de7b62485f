//! Conclave's integration tests: one binary, real Synapse, real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// Shared harness: Synapse processes, a Matrix test client, Conclave processes.
mod support;

// The appservice API against direct requests and against a real Synapse.
mod appservice;
// The command line: defaults, secrets, config errors, exit codes.
mod cli;
// The HTTP port under idle, slow and too many connections: timeouts, caps, reserved slots.
mod http_limits;
// The module layering rule of docs/ARCHITECTURE.md, on the source text.
mod layering;
// The test harness itself: two federating Synapses, OpenID over federation.
mod harness;
// The token service: lk-jwt-service endpoints, OpenID over federation, membership gate.
mod tokens;
// Outbound federation requests against hostile homeservers: caps, redirects, destinations.
mod federation;
// LiveKit signalling at the protocol level: the traps and hostile input.
mod signal;
// Deployment files: docker-compose.yml, deploy/, the example registration.
mod deploy;
// The real LiveKit client tooling (Python SDK, rtc-node, token minting), without an SFU.
mod lk_tooling;
// Calls follow Matrix: membership changes act on SFU participants.
mod calls;
// Real LiveKit SDKs (Python, Node) exchanging media through the SFU.
mod media;
// LiveKit data with the Python SDK: RPC, text streams, addressed packets, stamped senders.
mod data;
// MSC4140 delayed leaves driven by the SFU connection.
mod delayed;
// MSC4195's endpoints as Synapse forwards them (MSC4512), the federation twin, MSC4502.
mod msc4512;
// Chromium + livekit-client through the SFU.
mod browser;
// WHIP and WHEP with a third-party WebRTC stack (aiortc), LiveKit SDKs on the other side.
mod bridges;
// Quality on real links: Chromium through the network lab's shaped and lossy downlinks.
mod quality;
// The LiveKit RoomService API (Twirp) through the Python `livekit-api` and raw HTTP.
mod twirp;
// LiveKit-compatible webhooks, verified by `livekit-api`'s WebhookReceiver.
mod webhooks;
// The cascade's origin side: relay grants to peer Conclaves, refused and cut by Matrix.
mod cascade;
// Unmodified Element Call in Chromium across two ministries (two Synapses, two Conclaves).
mod element_call;
// The network lab: namespaces, shaped and lossy links, real clients and Conclave inside.
mod lab;
