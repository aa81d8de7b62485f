//! The token endpoints at the edge: `POST /sfu/get`, `POST /get_token`, `POST
//! /delegate_delayed_leave` (the [`TokenService`] does the work), with lk-jwt-service's CORS
//! and statuses, and Matrix JSON errors (rate limits: 429 `M_LIMIT_EXCEEDED` with
//! `retry_after_ms` and `Retry-After`, CORS headers as on every answer).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::tokens::{TokenResponse, TokenService};
use crate::auth::AuthError;
use crate::http::error::MatrixErrorResponse;
use crate::metrics::{inc, Metrics};

pub use crate::auth::tokens::MAX_BODY_BYTES;

/// What the token endpoints use.
#[derive(Clone)]
pub struct TokenState {
    /// Issues tokens.
    pub tokens: TokenService,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

fn respond(state: &TokenState, result: Result<TokenResponse, AuthError>) -> Response {
    match result {
        Ok(r) => {
            inc(&state.metrics.tokens_issued);
            Json(r).into_response()
        }
        Err(e) => {
            inc(&state.metrics.tokens_refused);
            count_rate_limited(state, &e);
            log_refusal(&e, "SFU token refused");
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
    let body = match body {
        Ok(b) => b,
        Err(r) => {
            inc(&state.metrics.tokens_refused);
            return MatrixErrorResponse::from_body_rejection(&r).into_response();
        }
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
    match state.tokens.delegate_delayed_leave(&body).await {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => {
            count_rate_limited(&state, &e);
            log_refusal(&e, "delayed leave delegation refused");
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
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token, Authorization",
        ),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    // A browser client may read when to try again after a 429 (lk-jwt-service never sends one).
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Retry-After"),
    );
    response
}
