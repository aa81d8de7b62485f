//! The admin API (`/_conclave/admin/v1/…`), for operators: active calls with the Matrix view
//! (call members from the store) and the SFU view (connected participants) side by side, and
//! removing a participant. Authorised by `admin.token` (Bearer); off (404) when unset.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use ruma::api::error::ErrorCode;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::auth::naming::{room_name, LEGACY_SLOT};
use crate::http::error::MatrixErrorResponse;
use crate::net::LoopRequest;
use crate::sfu::Command;
use crate::store::CallView;

/// Proof of the admin token.
pub struct AdminAuth;

impl FromRequestParts<Arc<AppState>> for AdminAuth {
    type Rejection = MatrixErrorResponse;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = &state.config.admin.token else {
            return Err(MatrixErrorResponse::unrecognized());
        };
        let presented = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            None => Err(MatrixErrorResponse::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::MissingToken,
                "Missing admin token",
            )),
            Some(t) if bool::from(t.trim().as_bytes().ct_eq(expected.expose().as_bytes())) => {
                Ok(AdminAuth)
            }
            Some(_) => Err(MatrixErrorResponse::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::UnknownToken,
                "Invalid admin token",
            )),
        }
    }
}

fn sfu_room_of(call: &CallView) -> String {
    let slot = if call.call_id.is_empty() {
        LEGACY_SLOT
    } else {
        call.call_id.as_str()
    };
    room_name(&call.room_id, slot)
}

async fn call_json(state: &AppState, call: CallView) -> Value {
    let sfu_room = sfu_room_of(&call);
    let participants = match &state.sfu {
        Some(sfu) => sfu.participants(&sfu_room.as_str().into()).await,
        None => Vec::new(),
    };
    let sfu_view: Vec<Value> = participants
        .iter()
        .map(|p| {
            let issued = state.issued.get(&sfu_room, &p.identity);
            json!({
                "identity": p.identity,
                "sid": p.sid,
                "user_id": issued.as_ref().map(|i| i.user_id.to_string()),
                "device_id": issued.as_ref().map(|i| i.device_id.clone()),
                "publisher": !p.tracks.is_empty(),
                "tracks": p.tracks.len(),
            })
        })
        .collect();
    json!({
        "room_id": call.room_id,
        "application": call.application,
        "call_id": call.call_id,
        "started_by": call.started_by,
        "started_ts": call.started_ts,
        "peak_members": call.peak_members,
        "matrix": {"members": call.members},
        "sfu": {"room": sfu_room, "participants": sfu_view},
    })
}

async fn active_calls(state: &AppState) -> Result<Vec<CallView>, MatrixErrorResponse> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.active_calls())
        .await
        .map_err(|e| MatrixErrorResponse::internal(&e))?
        .map_err(|e| MatrixErrorResponse::internal(&e))
}

/// `GET /_conclave/admin/v1/calls`: every active call, Matrix and SFU views.
pub async fn get_calls(
    State(state): State<Arc<AppState>>,
    _auth: AdminAuth,
) -> Result<Json<Value>, MatrixErrorResponse> {
    let mut out = Vec::new();
    for call in active_calls(&state).await? {
        out.push(call_json(&state, call).await);
    }
    Ok(Json(json!({ "calls": out })))
}

fn no_call(room_id: &str) -> MatrixErrorResponse {
    MatrixErrorResponse::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        format!("No active call in {room_id}"),
    )
}

/// `GET /_conclave/admin/v1/calls/{room_id}`.
pub async fn get_call(
    State(state): State<Arc<AppState>>,
    _auth: AdminAuth,
    Path(room_id): Path<String>,
) -> Result<Json<Value>, MatrixErrorResponse> {
    let call = active_calls(&state)
        .await?
        .into_iter()
        .find(|c| c.room_id == room_id)
        .ok_or_else(|| no_call(&room_id))?;
    Ok(Json(call_json(&state, call).await))
}

/// `POST /_conclave/admin/v1/calls/{room_id}/participants/{identity}/remove`.
pub async fn post_remove(
    State(state): State<Arc<AppState>>,
    _auth: AdminAuth,
    Path((room_id, identity)): Path<(String, String)>,
) -> Result<Json<Value>, MatrixErrorResponse> {
    let call = active_calls(&state)
        .await?
        .into_iter()
        .find(|c| c.room_id == room_id)
        .ok_or_else(|| no_call(&room_id))?;
    let sfu_room = sfu_room_of(&call);
    let Some(sfu) = &state.sfu else {
        return Err(no_call(&room_id));
    };
    let present = sfu
        .participants(&sfu_room.as_str().into())
        .await
        .iter()
        .any(|p| p.identity == identity);
    if !present {
        return Err(MatrixErrorResponse::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("No participant {identity} in the call"),
        ));
    }
    tracing::info!(room_id, identity, "admin removes a participant");
    sfu.send(LoopRequest::Sfu(Command::Remove {
        room: sfu_room.into(),
        identity: identity.into(),
        reason: livekit_protocol::DisconnectReason::ParticipantRemoved,
    }))
    .await;
    Ok(Json(json!({})))
}
