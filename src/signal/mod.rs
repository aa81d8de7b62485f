//! LiveKit signalling over WebSocket (`/rtc`) and the validate endpoints SDKs call around it.
#![warn(missing_docs)]

pub mod join_request;
pub mod validate;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use crate::auth::jwt::TokenSigner;
use crate::metrics::Metrics;
use crate::net::SfuHandle;
use crate::sfu::registry::RoomRegistry;

/// What signalling uses.
pub struct SignalState {
    /// Verifies access tokens and signs refreshed ones.
    pub signer: TokenSigner,
    /// The SFU loop.
    pub sfu: SfuHandle,
    /// The SFU's room view.
    pub rooms: Arc<RoomRegistry>,
    /// Rooms are created on first connect (`rtc.auto_create`).
    pub auto_create: bool,
    /// A session silent this long is closed (`rtc.signal_timeout_secs`, at least 1 s).
    pub signal_timeout: Duration,
    /// Lifetime of refreshed tokens (`auth.token_lifetime_secs`).
    pub token_lifetime_secs: u64,
    /// Single peer connection signalling is served (`rtc.single_pc`); when false, `/rtc/v1*`
    /// answer the plain 404 that makes SDKs fall back to `/rtc`.
    pub single_pc: bool,
    /// Process counters (`conclave_signal_sessions_total`).
    pub metrics: Arc<Metrics>,
    /// The embedded TURN server's URLs and credentials for join and reconnect responses,
    /// when it runs.
    pub ice_servers: Option<crate::turn::IceServers>,
}
