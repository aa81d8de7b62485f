//! What LiveKit signalling, the RoomService API and webhooks use: the configuration, the
//! LiveKit key, the SFU room view and the running SFU loop.

use crate::auth::jwt::TokenSigner;
use crate::config::Config;
use crate::net::SfuHandle;
use crate::secrets::Secrets;
use crate::sfu::registry::RoomRegistry;
use std::sync::Arc;

/// The SFU side's shared state; cheap to clone through its `Arc`.
pub struct AppState {
    /// The loaded configuration.
    pub config: Config,
    /// Tokens and keys (configured or generated).
    pub secrets: Secrets,
    /// Signs and verifies LiveKit tokens with `livekit.key`/`livekit.secret`.
    pub signer: TokenSigner,
    /// The SFU's rooms.
    pub rooms: Arc<RoomRegistry>,
    /// The running SFU loop.
    pub sfu: Option<SfuHandle>,
}
