//! `GET /rtc/validate` and `GET /rtc/v1/validate`: the same checks as the WebSocket connect,
//! without upgrading. Errors are plain text with the statuses client-sdk-js maps
//! (`SignalClient.handleConnectionError`): 401 for a bad token, 404 with exactly
//! `requested room does not exist` for a room nobody with full access started.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use livekit_protocol as lk;

use super::{join_request, SignalState};
use crate::auth::jwt::Claims;
use crate::sfu::limits;

/// The text LiveKit clients look for to stop retrying.
pub const ROOM_DOES_NOT_EXIST: &str = "requested room does not exist";

/// Why a connect is refused: status and plain-text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRefusal {
    /// HTTP status.
    pub status: StatusCode,
    /// Plain-text body.
    pub message: String,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> ConnectRefusal {
    ConnectRefusal {
        status,
        message: message.into(),
    }
}

/// Extracts the token (header first, then `access_token`) and checks it, the grant and the
/// room. A missing room is no error when `create` is set: the caller creates it (auto-create,
/// through the SFU loop).
pub fn check_connect(
    state: &SignalState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    now: Instant,
    unix_now: u64,
    create: bool,
) -> Result<Claims, ConnectRefusal> {
    let token = match headers.get(header::AUTHORIZATION) {
        Some(v) => {
            let v = v.to_str().unwrap_or("");
            match v.strip_prefix("Bearer ") {
                Some(t) => t.trim().to_owned(),
                None => {
                    return Err(refuse(
                        StatusCode::UNAUTHORIZED,
                        "invalid authorization header. Must start with Bearer ",
                    ))
                }
            }
        }
        None => query.get("access_token").cloned().ok_or_else(|| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "no authorization header or access_token",
            )
        })?,
    };
    let claims = state
        .signer
        .verify(&token, unix_now)
        .map_err(|e| refuse(StatusCode::UNAUTHORIZED, e.to_string()))?;
    if !claims.video.room_join || claims.video.room.is_empty() {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "permissions denied: token has no roomJoin grant for a room",
        ));
    }
    if claims.sub.is_empty() {
        return Err(refuse(StatusCode::UNAUTHORIZED, "token has no identity"));
    }
    // LiveKit checks identity and room name here (400); name and metadata too, so that every
    // participant's info is within the limits from its join on.
    limits::check_join(
        &claims.sub,
        &claims.video.room,
        &claims.name,
        &claims.metadata,
    )
    .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("token {e}")))?;
    if !create && !state.rooms.exists(&claims.video.room, now) {
        return Err(refuse(StatusCode::NOT_FOUND, ROOM_DOES_NOT_EXIST));
    }
    Ok(claims)
}

/// [`check_connect`] for v1 (`/rtc/v1`): the token, then the `join_request` (400 when absent
/// or undecodable), then what it asks for, then the room (no error for a missing one when
/// `create` is set, as in [`check_connect`]). The order is LiveKit's: its auth middleware
/// refuses a bad token before the handler decodes anything, and the handler decodes the join
/// request before it looks for the room.
///
/// The request's `metadata` and `participant_attributes` replace or extend the token's, so they
/// need the grant `canUpdateOwnMetadata` (else 401, as LiveKit) and must be within
/// [`limits`] (else 400).
pub fn check_connect_v1(
    state: &SignalState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    now: Instant,
    unix_now: u64,
    create: bool,
) -> Result<(Claims, lk::JoinRequest), ConnectRefusal> {
    // The room is checked last, below.
    let claims = check_connect(state, headers, query, now, unix_now, true)?;
    let request = join_request::from_query(query)?;
    let overrides = !request.metadata.is_empty() || !request.participant_attributes.is_empty();
    if overrides && !claims.video.can_update_own_metadata.unwrap_or(false) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "permissions denied: metadata or attributes in join_request need canUpdateOwnMetadata",
        ));
    }
    // The token carries no attributes (Conclave's claims have none): the request's are all.
    limits::check_participant_update(
        &HashMap::new(),
        &claims.name,
        &request.metadata,
        &request.participant_attributes,
    )
    .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("join_request {e}")))?;
    if !create && !state.rooms.exists(&claims.video.room, now) {
        return Err(refuse(StatusCode::NOT_FOUND, ROOM_DOES_NOT_EXIST));
    }
    Ok((claims, request))
}

fn text(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

/// `GET /rtc/validate` (v0).
pub async fn get_validate(
    State(state): State<Arc<SignalState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    // Validation never creates a room, but with auto-create a missing room is no error.
    let auto = state.auto_create;
    let result = check_connect(
        &state,
        &headers,
        &query,
        Instant::now(),
        crate::clock::unix_secs(),
        false,
    );
    let result = match result {
        Err(r) if auto && r.message == ROOM_DOES_NOT_EXIST => Ok(Claims::default()),
        other => other,
    };
    answer(result.map(|_| ()))
}

/// `GET /rtc/v1/validate`: as [`get_validate`], with the `join_request` checked too
/// ([`check_connect_v1`]). Without `rtc.single_pc` the plain 404 that makes SDKs use v0.
pub async fn get_validate_v1(
    State(state): State<Arc<SignalState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !state.single_pc {
        return super::ws::v1_not_served();
    }
    let result = check_connect_v1(
        &state,
        &headers,
        &query,
        Instant::now(),
        crate::clock::unix_secs(),
        // As v0: never creates a room, and with auto-create a missing room is no error.
        state.auto_create,
    );
    answer(result.map(|_| ()))
}

/// The validate answer: 200 `success`, or the refusal; with CORS either way (browsers fetch
/// it from the page's origin).
fn answer(result: Result<(), ConnectRefusal>) -> Response {
    match result {
        Ok(()) => text(StatusCode::OK, "success".into()),
        Err(r) => text(r.status, r.message),
    }
}
