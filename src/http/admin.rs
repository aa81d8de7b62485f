//! The admin API (`/_conclave/admin/v1/…`), for operators: active calls with the Matrix view
//! (call members) and the SFU view (connected participants) side by side, and removing a
//! participant. Authorised by `admin.token` (Bearer); off (404) when unset. The calls service
//! builds the views; this is only the edge.

use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use ruma::api::error::ErrorCode;
use serde_json::{json, Value};

use super::bearer::{self, Bearer, BearerPolicy};
use crate::calls::Calls;
use crate::config::Secret;
use crate::http::error::MatrixErrorResponse;
use crate::sfu::ids::ParticipantIdentity;

/// What the admin endpoints use.
#[derive(Clone)]
pub struct AdminState {
    /// The calls.
    pub calls: Calls,
    /// `admin.token`; `None` turns the API off.
    pub token: Option<Secret>,
}

/// Proof of the admin token (`Authorization: Bearer`); 404 when the API is off.
pub struct AdminAuth;

/// The admin API's bearer extractor.
type Admin = Bearer<AdminAuth>;

impl BearerPolicy for AdminAuth {
    type State = AdminState;

    fn check(parts: &Parts, state: &AdminState) -> Result<Self, MatrixErrorResponse> {
        let Some(expected) = &state.token else {
            return Err(MatrixErrorResponse::unrecognized());
        };
        match bearer::presented(parts).filter(|t| !t.is_empty()) {
            None => Err(MatrixErrorResponse::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::MissingToken,
                "Missing admin token",
            )),
            Some(t) if bearer::matches(&t, expected.expose()) => Ok(AdminAuth),
            Some(_) => Err(MatrixErrorResponse::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::UnknownToken,
                "Invalid admin token",
            )),
        }
    }
}

/// `GET /_conclave/admin/v1/calls`: every active call, Matrix and SFU views.
pub async fn get_calls(
    State(state): State<AdminState>,
    _auth: Admin,
) -> Result<Json<Value>, MatrixErrorResponse> {
    let calls = state.calls.reports().await?;
    Ok(Json(json!({ "calls": calls })))
}

/// `GET /_conclave/admin/v1/calls/{room_id}`.
pub async fn get_call(
    State(state): State<AdminState>,
    _auth: Admin,
    Path(room_id): Path<String>,
) -> Result<Json<Value>, MatrixErrorResponse> {
    let call = state.calls.report_of(&room_id).await?;
    Ok(Json(json!(call)))
}

/// `GET /_conclave/admin/v1/sfu/rooms/{room}`: an SFU room by its LiveKit name, whether or
/// not a Matrix call uses it (a standalone SFU's rooms too).
pub async fn get_sfu_room(
    State(state): State<AdminState>,
    _auth: Admin,
    Path(room): Path<String>,
) -> Result<Json<Value>, MatrixErrorResponse> {
    let view = state.calls.sfu_room_report(&room).await?;
    Ok(Json(json!(view)))
}

/// `POST /_conclave/admin/v1/calls/{room_id}/participants/{identity}/remove`.
pub async fn post_remove(
    State(state): State<AdminState>,
    _auth: Admin,
    Path((room_id, identity)): Path<(String, String)>,
) -> Result<Json<Value>, MatrixErrorResponse> {
    state
        .calls
        .remove_from_call(&room_id, &ParticipantIdentity::from(identity))
        .await?;
    Ok(Json(json!({})))
}

/// The body of `POST /_conclave/admin/v1/bridges/tokens`.
#[derive(Debug, serde::Deserialize)]
pub struct BridgeTokenRequest {
    /// `whip` or `whep`.
    pub kind: String,
    /// The SFU room (a call's: the admin call view's `sfu.room`).
    pub room: String,
    /// The participant's identity.
    pub identity: String,
    /// Its display name (default: the identity).
    #[serde(default)]
    pub name: Option<String>,
    /// Lifetime in seconds (default 3600, at most 86400).
    #[serde(default)]
    pub valid_for_secs: Option<u64>,
}

/// `POST /_conclave/admin/v1/bridges/tokens`: an operator's WHIP (publish-only) or WHEP
/// (subscribe-only) token for one session, with the URL to use it on (`docs/bridges.md`).
pub async fn post_bridge_token(
    State(bridges): State<crate::bridge::Bridges>,
    _auth: Admin,
    body: axum::body::Bytes,
) -> Result<Json<Value>, MatrixErrorResponse> {
    let bad =
        |msg: String| MatrixErrorResponse::new(StatusCode::BAD_REQUEST, ErrorCode::BadJson, msg);
    let req: BridgeTokenRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("invalid body: {e}")))?;
    let kind = match req.kind.as_str() {
        "whip" => crate::bridge::Kind::Whip,
        "whep" => crate::bridge::Kind::Whep,
        other => {
            return Err(bad(format!(
                "kind must be \"whip\" or \"whep\", not {other:?}"
            )))
        }
    };
    let name = req.name.unwrap_or_else(|| req.identity.clone());
    let token = bridges
        .mint(
            kind,
            &req.room,
            &req.identity,
            &name,
            req.valid_for_secs.unwrap_or(3600),
        )
        .map_err(|e| bad(e.to_string()))?;
    let room = crate::matrix::client::encode_path_segment(&req.room);
    let path = match kind {
        crate::bridge::Kind::Whip => format!("/whip/v1/{room}"),
        crate::bridge::Kind::Whep => format!("/whep/v1/{room}/<identity to play>"),
    };
    Ok(Json(json!({"token": token, "path": path})))
}
