//! Authentication and authorisation: the token service (the lk-jwt-service drop-in), OpenID
//! verification over federation, the Matrix membership gate and LiveKit JWTs.
#![warn(missing_docs)]

pub mod discovery;
pub mod jwt;
pub mod membership;
pub mod openid;
pub mod tokens;

use crate::calls::CallsError;
use crate::store::StoreError;

/// Why a token request (or a LiveKit token) was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The body is not JSON (400 `M_NOT_JSON`).
    #[error("request body is not JSON: {0}")]
    NotJson(String),
    /// A field is missing or has the wrong type (400 `M_BAD_JSON`).
    #[error("{0}")]
    BadJson(String),
    /// A field has an invalid value (400 `M_INVALID_PARAM`).
    #[error("{0}")]
    InvalidParam(String),
    /// The OpenID token was not accepted, or belongs to someone else (401 `M_UNAUTHORIZED`).
    #[error("the request could not be authorised: {0}")]
    Unauthorized(String),
    /// The user may not join this room's call (403 `M_FORBIDDEN`).
    #[error("{0}")]
    Forbidden(String),
    /// The room is unknown to this homeserver or to Conclave (404 `M_NOT_FOUND`).
    #[error("{0}")]
    RoomUnknown(String),
    /// The user's homeserver could not be reached (502).
    #[error("homeserver {0} is unreachable")]
    HomeserverUnreachable(String),
    /// The user's homeserver did not answer in time (504).
    #[error("homeserver {0} did not answer in time")]
    HomeserverTimeout(String),
    /// The user's homeserver answered something unusable (502).
    #[error("homeserver {0} answered with an invalid response")]
    HomeserverBadResponse(String),
    /// The user's homeserver answered with a body over Conclave's cap (502).
    #[error("homeserver {0} answered with a response larger than Conclave accepts")]
    HomeserverResponseTooLarge(String),
    /// The user's homeserver redirected to another host, to plain HTTP, or too often (502).
    #[error("homeserver {0} redirected to a destination Conclave does not follow")]
    HomeserverRedirected(String),
    /// The homeserver's addresses are ones Conclave does not send federation requests to
    /// (loopback, private, link-local...; `auth.allow_private_federation`) (403).
    #[error("homeserver {0} is not an allowed federation destination")]
    HomeserverNotAllowed(String),
    /// Too many token requests naming one homeserver, or of one user (429
    /// `M_LIMIT_EXCEEDED`, `auth.homeserver_rate_per_sec`, `auth.user_rate_per_sec`).
    #[error("too many token requests {what}; try again in {} ms", .retry_after.as_millis())]
    RateLimited {
        /// Whose limit: `naming homeserver …` or `of user …`.
        what: String,
        /// How long until a request may pass.
        retry_after: std::time::Duration,
    },
    /// A LiveKit JWT is invalid or expired (401).
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The store failed (500).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The calls service failed (500).
    #[error("calls: {0}")]
    Calls(#[from] CallsError),
    /// Anything else that is our fault (500).
    #[error("internal error: {0}")]
    Internal(String),
}
