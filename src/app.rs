//! The shared application state handed to every HTTP handler.

use std::sync::Arc;

use crate::auth::jwt::TokenSigner;
use crate::auth::openid::OpenIdVerifier;
use crate::config::Config;
use crate::matrix::client::HomeserverClient;
use crate::matrix::enforce::IssuedParticipants;
use crate::metrics::Metrics;
use crate::net::SfuHandle;
use crate::secrets::Secrets;
use crate::sfu::registry::RoomRegistry;
use crate::store::Store;

/// Everything handlers need; cheap to clone through its `Arc`.
pub struct AppState {
    /// The loaded configuration.
    pub config: Config,
    /// Tokens and keys (configured or generated).
    pub secrets: Secrets,
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Client-server API access as the appservice.
    pub homeserver: HomeserverClient,
    /// Signs and verifies LiveKit tokens with `livekit.key`/`livekit.secret`.
    pub signer: TokenSigner,
    /// OpenID verification over federation.
    pub openid: OpenIdVerifier,
    /// The SFU's rooms.
    pub rooms: Arc<RoomRegistry>,
    /// The running SFU loop (absent in tools that only need the HTTP side).
    pub sfu: Option<SfuHandle>,
    /// SFU identities issued by the token service, and to whom.
    pub issued: IssuedParticipants,
    /// Delayed leaves delegated after the token request, for the delayed-leave runner.
    pub delegations: crate::matrix::delayed::Delegations,
}
