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
