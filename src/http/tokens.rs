//! The token endpoints at the edge: `POST /sfu/get`, `POST /get_token`, `POST
//! /delegate_delayed_leave` (the [`TokenService`] does the work), with lk-jwt-service's CORS
//! and statuses, and Matrix JSON errors (rate limits: 429 `M_LIMIT_EXCEEDED` with
//! `retry_after_ms` and `Retry-After`, CORS headers as on every answer).
//!
//! The same endpoints as the homeserver forwards them (MSC4512, see `docs/design/msc4195.md`):
//! `…/rtc/livekit/get_token` and `…/rtc/livekit/delegate_delayed_leave` under
//! `/_matrix/client/{v1,unstable/io.element.msc4195}`, and the federation twin
//! `/_matrix/federation/{v1,unstable/io.element.msc4195}/rtc/livekit/get_token`. They trust
//! `X-Matrix-User-Identifier` / `X-Matrix-Origin` only with the `hs_token`.
//!
//! And the cascade's server-to-server grant, `POST /_conclave/cascade/v1/relay`
//! (`docs/cascade.md`), which authenticates peers by OpenID like the token endpoints.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use ruma::api::error::ErrorCode;
use ruma::{OwnedServerName, OwnedUserId, ServerName, UserId};

use super::bearer::{self, Bearer, BearerPolicy};
use crate::auth::tokens::{TokenResponse, TokenService};
use crate::auth::AuthError;
use crate::config::Secret;
use crate::http::error::MatrixErrorResponse;
use crate::metrics::{inc, Metrics};

pub use crate::auth::tokens::MAX_BODY_BYTES;

/// What the token endpoints use.
#[derive(Clone)]
pub struct TokenState {
    /// Issues tokens.
    pub tokens: TokenService,
    /// Mirrors peer Conclaves' calls (`docs/cascade.md`).
    pub cascade: crate::cascade::Cascade,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The token the homeserver presents on requests it forwards (MSC4512).
    pub hs_token: Secret,
    /// This homeserver's name (forwarded client requests are for its users only).
    pub server_name: OwnedServerName,
}

/// The header naming the authenticated user of a forwarded client request (MSC4512).
const USER_HEADER: &str = "x-matrix-user-identifier";
/// The header naming the authenticated origin of a forwarded federation request (MSC4512).
const ORIGIN_HEADER: &str = "x-matrix-origin";

/// Proof that a request was forwarded by the homeserver: `Authorization: Bearer <hs_token>`
/// (the query-string form is not accepted: Synapse strips it). Missing or wrong: 401.
pub struct ForwardedByHomeserver;

impl BearerPolicy for ForwardedByHomeserver {
    type State = TokenState;

    fn check(parts: &Parts, state: &TokenState) -> Result<Self, MatrixErrorResponse> {
        match bearer::presented(parts) {
            None => Err(MatrixErrorResponse::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::MissingToken,
                "Missing access token: this endpoint is served to the homeserver only",
            )),
            Some(t) if bearer::matches(&t, state.hs_token.expose()) => Ok(ForwardedByHomeserver),
            Some(_) => {
                tracing::warn!(uri = %parts.uri.path(), "forwarded request with a wrong hs_token");
                Err(MatrixErrorResponse::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::UnknownToken,
                    "Invalid hs_token",
                ))
            }
        }
    }
}

/// The homeserver-vouched header `name`, or 401.
fn vouched_header<'a>(parts: &'a Parts, name: &str) -> Result<&'a str, MatrixErrorResponse> {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            MatrixErrorResponse::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                format!("Missing {name} header"),
            )
        })
}

/// The local user a forwarded client request is for.
fn forwarded_user(parts: &Parts, state: &TokenState) -> Result<OwnedUserId, MatrixErrorResponse> {
    let value = vouched_header(parts, USER_HEADER)?;
    let user = UserId::parse(value).map_err(|_| {
        MatrixErrorResponse::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            format!("{USER_HEADER} is not a user ID"),
        )
    })?;
    if user.server_name() != state.server_name {
        return Err(MatrixErrorResponse::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("{user} is not a user of {}", state.server_name),
        ));
    }
    Ok(user)
}

/// The origin server of a forwarded federation request.
fn forwarded_origin(parts: &Parts) -> Result<OwnedServerName, MatrixErrorResponse> {
    let value = vouched_header(parts, ORIGIN_HEADER)?;
    ServerName::parse(value).map_err(|_| {
        MatrixErrorResponse::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            format!("{ORIGIN_HEADER} is not a server name"),
        )
    })
}

fn respond(state: &TokenState, result: Result<TokenResponse, AuthError>) -> Response {
    let m = &state.metrics;
    answer(
        state,
        result,
        [&m.tokens_issued, &m.tokens_refused],
        "SFU token refused",
    )
}

/// The JSON answer, or the refusal (logged as `refused`); `counts` are bumped for each
/// (granted, refused), rate limits counted apart.
fn answer<T: serde::Serialize>(
    state: &TokenState,
    result: Result<T, AuthError>,
    counts: [&std::sync::atomic::AtomicU64; 2],
    refused: &'static str,
) -> Response {
    match result {
        Ok(r) => {
            inc(counts[0]);
            Json(r).into_response()
        }
        Err(e) => {
            inc(counts[1]);
            count_rate_limited(state, &e);
            log_refusal(&e, refused);
            MatrixErrorResponse::from(e).into_response()
        }
    }
}

/// Counts a refusal by a rate limit (429, `Retry-After`).
fn count_rate_limited(state: &TokenState, e: &AuthError) {
    if matches!(e, AuthError::RateLimited { .. }) {
        inc(&state.metrics.tokens_rate_limited);
    }
}

/// Refusals are logged with their reason; internal failures are logged by the router.
fn log_refusal(e: &AuthError, what: &'static str) {
    match e {
        AuthError::Internal(_) | AuthError::Store(_) | AuthError::Calls(_) => {}
        _ => tracing::info!(error = %e, "{what}"),
    }
}

/// `POST /sfu/get`: legacy token endpoint.
pub async fn post_sfu_get(
    State(state): State<TokenState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    token_endpoint(state, body, true).await
}

/// `POST /get_token`: MSC4195 token endpoint.
pub async fn post_get_token(
    State(state): State<TokenState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    token_endpoint(state, body, false).await
}

async fn token_endpoint(
    state: TokenState,
    body: Result<Bytes, BytesRejection>,
    legacy: bool,
) -> Response {
    let body = match read_body(&state, body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let result = if legacy {
        state.tokens.legacy_token(&body).await
    } else {
        state.tokens.token(&body).await
    };
    respond(&state, result)
}

/// `POST /delegate_delayed_leave`: answers `{}` once the delayed leave is handed over.
pub async fn post_delegate_delayed_leave(
    State(state): State<TokenState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return MatrixErrorResponse::from_body_rejection(&r).into_response(),
    };
    let result = state.tokens.delegate_delayed_leave(&body).await;
    delegated(&state, result)
}

/// The answer to a delegation: `{}`, or the refusal (rate limits counted, refusals logged).
fn delegated(state: &TokenState, result: Result<(), AuthError>) -> Response {
    match result {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => {
            count_rate_limited(state, &e);
            log_refusal(&e, "delayed leave delegation refused");
            MatrixErrorResponse::from(e).into_response()
        }
    }
}

/// The body, or the refusal of it (counted as a refused token request).
fn read_body(
    state: &TokenState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, Box<Response>> {
    body.map_err(|r| {
        inc(&state.metrics.tokens_refused);
        Box::new(MatrixErrorResponse::from_body_rejection(&r).into_response())
    })
}

/// `POST /_matrix/client/{v1,unstable/io.element.msc4195}/rtc/livekit/get_token`, forwarded by
/// the homeserver (MSC4512): a token for the user of `X-Matrix-User-Identifier`.
pub async fn post_forwarded_get_token(
    _: Bearer<ForwardedByHomeserver>,
    State(state): State<TokenState>,
    parts: Parts,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let user = match forwarded_user(&parts, &state) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let body = match read_body(&state, body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let result = state.tokens.proxied_token(&user, &body).await;
    respond(&state, result)
}

/// `POST /_matrix/client/{v1,unstable/io.element.msc4195}/rtc/livekit/delegate_delayed_leave`,
/// forwarded by the homeserver (MSC4512): as `POST /delegate_delayed_leave`.
pub async fn post_forwarded_delegate_delayed_leave(
    _: Bearer<ForwardedByHomeserver>,
    State(state): State<TokenState>,
    parts: Parts,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let user = match forwarded_user(&parts, &state) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let body = match body {
        Ok(b) => b,
        Err(r) => return MatrixErrorResponse::from_body_rejection(&r).into_response(),
    };
    let result = state.tokens.proxied_delegate(&user, &body).await;
    delegated(&state, result)
}

/// `POST /_matrix/federation/{v1,unstable/io.element.msc4195}/rtc/livekit/get_token`,
/// forwarded by the homeserver (MSC4512) once it checked the origin's signature: a token for
/// a user of `X-Matrix-Origin`.
pub async fn post_forwarded_federation_get_token(
    _: Bearer<ForwardedByHomeserver>,
    State(state): State<TokenState>,
    parts: Parts,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let origin = match forwarded_origin(&parts) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let body = match read_body(&state, body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let result = state.tokens.federated_token(&origin, &body).await;
    respond(&state, result)
}

/// `POST /_conclave/cascade/v1/relay`: a peer Conclave asks for a grant to relay one call
/// (`docs/cascade.md`); `{url, jwt, room, identity}` or a Matrix error naming what failed.
pub async fn post_cascade_relay(
    State(state): State<TokenState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let m = &state.metrics;
    let counts = [&m.cascade_relays_granted, &m.cascade_relays_refused];
    let result = match body {
        Ok(body) => state.tokens.relay_grant(&body).await,
        Err(r) => {
            inc(counts[1]);
            return MatrixErrorResponse::from_body_rejection(&r).into_response();
        }
    };
    answer(&state, result, counts, "cascade relay refused")
}

/// `POST /_conclave/cascade/v1/mirror`: a peer Conclave asks for one of our users' token in
/// our mirror of its call (`docs/cascade.md`); `{url, jwt}` or a Matrix error.
pub async fn post_cascade_mirror(
    State(state): State<TokenState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return MatrixErrorResponse::from_body_rejection(&r).into_response(),
    };
    match state.cascade.mirror(&body).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => {
            log_refusal(&e, "cascade mirror refused");
            MatrixErrorResponse::from(e).into_response()
        }
    }
}

/// CORS as lk-jwt-service (plus `Retry-After` exposed): every response carries it; `OPTIONS`
/// answers 200 at once.
pub async fn cors(request: Request, next: Next) -> Response {
    let mut response = if request.method() == Method::OPTIONS {
        StatusCode::OK.into_response()
    } else {
        next.run(request).await
    };
    // A browser client may read when to try again after a 429 (lk-jwt-service never sends one).
    super::allow_any_origin(
        response.headers_mut(),
        "POST",
        "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token, Authorization",
        "Retry-After",
    );
    response
}
