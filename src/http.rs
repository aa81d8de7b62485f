//! The axum router: every route of the one HTTP port, listed in one place.
//!
//! Layer order, outermost first: sensitive-header marking (so traces never record
//! `Authorization`), trace, catch panic, body limit. Route groups add their own layers (CORS on
//! the token and the WHIP/WHEP endpoints only, which browsers call from other origins).

pub mod admin;
pub mod appservice;
mod bearer;
pub mod bridge;
pub mod error;
pub mod server;
pub mod tokens;
pub mod twirp;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get, patch, post, put};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::metrics::Metrics;
use crate::net::SfuHandle;
use crate::signal::{validate, ws, SignalState};
use admin::AdminState;
use appservice::AppserviceState;
use error::{InternalCause, MatrixErrorResponse, UpstreamFailure};
use tokens::TokenState;
use twirp::TwirpState;

/// Everything the routes use, each handler taking only its part (`FromRef`).
#[derive(Clone)]
pub struct HttpState {
    /// The appservice API's part.
    pub appservice: AppserviceState,
    /// The token endpoints' part.
    pub tokens: TokenState,
    /// The admin API's part.
    pub admin: AdminState,
    /// Signalling's part.
    pub signal: Arc<SignalState>,
    /// The RoomService API's part.
    pub twirp: TwirpState,
    /// The SFU loop (for its counters).
    pub sfu: SfuHandle,
    /// Process counters.
    pub metrics: Arc<Metrics>,
    /// The TURN server's counters, when it runs.
    pub turn: Option<Arc<crate::turn::TurnStats>>,
    /// WHIP and WHEP (`docs/bridges.md`).
    pub bridges: crate::bridge::Bridges,
    /// `http.max_body_bytes`.
    pub max_body_bytes: usize,
}

impl FromRef<HttpState> for AppserviceState {
    fn from_ref(s: &HttpState) -> Self {
        s.appservice.clone()
    }
}

impl FromRef<HttpState> for TokenState {
    fn from_ref(s: &HttpState) -> Self {
        s.tokens.clone()
    }
}

impl FromRef<HttpState> for AdminState {
    fn from_ref(s: &HttpState) -> Self {
        s.admin.clone()
    }
}

impl FromRef<HttpState> for Arc<SignalState> {
    fn from_ref(s: &HttpState) -> Self {
        s.signal.clone()
    }
}

impl FromRef<HttpState> for crate::bridge::Bridges {
    fn from_ref(s: &HttpState) -> Self {
        s.bridges.clone()
    }
}

impl FromRef<HttpState> for TwirpState {
    fn from_ref(s: &HttpState) -> Self {
        s.twirp.clone()
    }
}

/// CORS for a route group browsers call from another origin: any origin, these methods and
/// request headers, these response headers readable by the page, preflights cached a day.
fn allow_any_origin(
    h: &mut axum::http::HeaderMap,
    methods: &'static str,
    request_headers: &'static str,
    exposed: &'static str,
) {
    use axum::http::HeaderValue;
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(request_headers),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(exposed),
    );
}

/// Builds the router for `state`.
pub fn router(state: HttpState) -> Router {
    let body_limit = state.max_body_bytes;
    let appservice_routes = Router::new()
        .route(
            "/_matrix/app/v1/transactions/{txn_id}",
            put(appservice::put_transaction),
        )
        .route("/_matrix/app/v1/users/{user_id}", get(appservice::get_user))
        .route(
            "/_matrix/app/v1/rooms/{alias}",
            get(appservice::get_room_alias),
        )
        .route("/_matrix/app/v1/ping", post(appservice::post_ping))
        // Legacy unprefixed paths, still described by the spec as a homeserver fallback.
        .route("/transactions/{txn_id}", put(appservice::put_transaction))
        .route("/users/{user_id}", get(appservice::get_user))
        .route("/rooms/{alias}", get(appservice::get_room_alias))
        .method_not_allowed_fallback(method_not_allowed);

    let token_routes = Router::new()
        .route("/sfu/get", post(tokens::post_sfu_get))
        .route("/get_token", post(tokens::post_get_token))
        .route(
            "/delegate_delayed_leave",
            post(tokens::post_delegate_delayed_leave),
        )
        .layer(DefaultBodyLimit::max(tokens::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(tokens::cors));

    // MSC4195's endpoints as the homeserver forwards them (MSC4512): no CORS (browsers talk
    // to the homeserver), the hs_token in every handler.
    let mut forwarded_routes = Router::new();
    for prefix in ["v1", "unstable/io.element.msc4195"] {
        forwarded_routes = forwarded_routes
            .route(
                &format!("/_matrix/client/{prefix}/rtc/livekit/get_token"),
                post(tokens::post_forwarded_get_token),
            )
            .route(
                &format!("/_matrix/client/{prefix}/rtc/livekit/delegate_delayed_leave"),
                post(tokens::post_forwarded_delegate_delayed_leave),
            )
            .route(
                &format!("/_matrix/federation/{prefix}/rtc/livekit/get_token"),
                post(tokens::post_forwarded_federation_get_token),
            );
    }
    let forwarded_routes = forwarded_routes
        .layer(DefaultBodyLimit::max(tokens::MAX_BODY_BYTES))
        .method_not_allowed_fallback(method_not_allowed);

    // Server to server (`docs/cascade.md`): peer Conclaves, not browsers (no CORS).
    let cascade_routes = Router::new()
        .route(
            "/_conclave/cascade/v1/relay",
            post(tokens::post_cascade_relay),
        )
        .route(
            "/_conclave/cascade/v1/mirror",
            post(tokens::post_cascade_mirror),
        )
        .layer(DefaultBodyLimit::max(tokens::MAX_BODY_BYTES))
        .method_not_allowed_fallback(method_not_allowed);

    let signal_routes = Router::new()
        .route("/rtc", get(ws::get_rtc))
        .route("/rtc/validate", get(validate::get_validate))
        .route("/rtc/v1", get(ws::get_rtc_v1))
        .route("/rtc/v1/validate", get(validate::get_validate_v1));

    // WHIP (RFC 9725) and WHEP: encoders, recorders, other systems (`docs/bridges.md`).
    let bridge_routes = Router::new()
        .route("/whip/v1", post(bridge::post_whip))
        .route("/whip/v1/{room}", post(bridge::post_whip_room))
        .route(
            "/whip/v1/resource/{id}",
            patch(bridge::patch_whip).delete(bridge::delete_whip),
        )
        .route(
            "/whep/v1/{room}/{identity}",
            post(bridge::post_whep_participant),
        )
        .route(
            "/whep/v1/{room}/track/{track_sid}",
            post(bridge::post_whep_track),
        )
        .route(
            "/whep/v1/resource/{id}",
            patch(bridge::patch_whep).delete(bridge::delete_whep),
        )
        .layer(DefaultBodyLimit::max(bridge::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(bridge::cors));

    let admin_routes = Router::new()
        .route("/_conclave/admin/v1/calls", get(admin::get_calls))
        .route("/_conclave/admin/v1/calls/{room_id}", get(admin::get_call))
        .route(
            "/_conclave/admin/v1/sfu/rooms/{room}",
            get(admin::get_sfu_room),
        )
        .route(
            "/_conclave/admin/v1/calls/{room_id}/participants/{identity}/remove",
            post(admin::post_remove),
        )
        .route(
            "/_conclave/admin/v1/bridges/tokens",
            post(admin::post_bridge_token),
        );

    // LiveKit RoomService (Twirp); Twirp JSON errors, `bad_route` when off.
    let twirp_routes = Router::new().route("/twirp/{*path}", any(twirp::handle));

    Router::new()
        .merge(appservice_routes)
        .merge(twirp_routes)
        .merge(admin_routes)
        .merge(token_routes)
        .merge(forwarded_routes)
        .merge(cascade_routes)
        .merge(signal_routes)
        .merge(bridge_routes)
        .route("/healthz", get(healthz).head(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::map_response_with_state(
            state.metrics.clone(),
            count_server_errors,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(|_| {
            MatrixErrorResponse::internal(&"handler panicked").into_response()
        }))
        .layer(TraceLayer::new_for_http())
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        .with_state(state)
}

/// `GET`/`HEAD /healthz`: 200 with an empty body while the process serves.
async fn healthz() -> StatusCode {
    StatusCode::OK
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], {
        let mut text = state.metrics.render();
        text.push_str(&state.sfu.stats.render());
        if let Some(turn) = &state.turn {
            text.push_str(&turn.render());
        }
        text
    })
}

/// Counts 5xx responses for `/metrics` and logs their cause: the one place internal errors
/// are logged. A 502/504 marked [`UpstreamFailure`] (a user's homeserver failed) is counted
/// apart and not logged here (the token service logs its refusals).
async fn count_server_errors(
    State(metrics): State<Arc<Metrics>>,
    response: axum::response::Response,
) -> axum::response::Response {
    if response.extensions().get::<UpstreamFailure>().is_some() {
        crate::metrics::inc(&metrics.upstream_errors);
    } else if response.status().is_server_error() {
        crate::metrics::inc(&metrics.internal_errors);
        match response.extensions().get::<InternalCause>() {
            Some(InternalCause(cause)) => tracing::error!(error = %cause, "internal error"),
            None => tracing::error!(status = %response.status(), "server error"),
        }
    }
    response
}

async fn not_found() -> MatrixErrorResponse {
    MatrixErrorResponse::unrecognized()
}

async fn method_not_allowed() -> MatrixErrorResponse {
    MatrixErrorResponse::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ruma::api::error::ErrorCode::Unrecognized,
        "Method not allowed",
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::auth::AuthError;

    #[tokio::test]
    async fn a_homeserver_failure_is_not_counted_as_an_internal_error() {
        let metrics = Arc::new(Metrics::default());
        let count = |e: AuthError| {
            let metrics = metrics.clone();
            async move {
                count_server_errors(State(metrics), MatrixErrorResponse::from(e).into_response())
                    .await
                    .status()
            }
        };
        let s = count(AuthError::HomeserverBadResponse("hs.example".into())).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY);
        let s = count(AuthError::HomeserverTimeout("hs.example".into())).await;
        assert_eq!(s, StatusCode::GATEWAY_TIMEOUT);
        count(AuthError::HomeserverNotAllowed("hs.example".into())).await;
        assert_eq!(metrics.internal_errors.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.upstream_errors.load(Ordering::Relaxed), 2);
        let s = count(AuthError::Internal("ours".into())).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(metrics.internal_errors.load(Ordering::Relaxed), 1);
    }
}
