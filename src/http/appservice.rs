//! The application service API the homeserver calls (spec: Application Service API).
//!
//! A transaction is acknowledged only after its effects and its txnId are committed in one
//! SQLite transaction: a replay changes nothing, and a crash before the commit is repaired by
//! the homeserver's retry. A malformed event is logged and skipped; it never blocks the queue.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use ruma::api::error::ErrorCode;
use ruma::events::AnyTimelineEvent;
use ruma::serde::Raw;
use serde::Deserialize;

use super::bearer::{self, Bearer, BearerPolicy};
use crate::calls::{Applied, Calls};
use crate::config::Secret;
use crate::http::error::MatrixErrorResponse;
use crate::metrics::{inc, Metrics};

/// What the appservice endpoints use.
#[derive(Clone)]
pub struct AppserviceState {
    /// Applies transactions.
    pub calls: Calls,
    /// The token the homeserver presents.
    pub hs_token: Secret,
    /// The bot, the only user this appservice provides.
    pub bot_user_id: String,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// Proof that the request carries the homeserver's `hs_token`.
///
/// Accepts `Authorization: Bearer <hs_token>` and the legacy `?access_token=`; when both are
/// present they must match. Missing → 401 `M_MISSING_TOKEN`; wrong → 403 `M_FORBIDDEN`.
pub struct AppserviceAuth;

/// The appservice API's bearer extractor.
type Homeserver = Bearer<AppserviceAuth>;

impl BearerPolicy for AppserviceAuth {
    type State = AppserviceState;

    fn check(parts: &Parts, state: &AppserviceState) -> Result<Self, MatrixErrorResponse> {
        let query = parts.uri.query().and_then(|q| {
            form_urlencoded_pairs(q)
                .into_iter()
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v)
        });
        let presented: Vec<String> = bearer::presented(parts).into_iter().chain(query).collect();
        if presented.is_empty() {
            inc(&state.metrics.transactions_rejected);
            return Err(MatrixErrorResponse::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::MissingToken,
                "Missing access token",
            ));
        }
        let expected = state.hs_token.expose();
        if !presented.iter().all(|t| bearer::matches(t, expected)) {
            inc(&state.metrics.transactions_rejected);
            tracing::warn!(uri = %parts.uri.path(), "request with a wrong hs_token");
            return Err(MatrixErrorResponse::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "Invalid hs_token",
            ));
        }
        Ok(AppserviceAuth)
    }
}

/// Decodes `application/x-www-form-urlencoded` query pairs.
fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    match reqwest::Url::parse(&format!("http://x/?{q}")) {
        Ok(u) => u.query_pairs().into_owned().collect(),
        Err(_) => Vec::new(),
    }
}

#[derive(Deserialize)]
struct TransactionBody {
    #[serde(default)]
    events: Vec<Raw<AnyTimelineEvent>>,
}

/// `PUT /_matrix/app/v1/transactions/{txnId}` (and the legacy `/transactions/{txnId}`).
pub async fn put_transaction(
    State(state): State<AppserviceState>,
    _auth: Homeserver,
    Path(txn_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, MatrixErrorResponse> {
    let span = tracing::info_span!("transaction", txn_id = %txn_id);
    let _enter = span.enter();
    let reject = |e: MatrixErrorResponse| {
        inc(&state.metrics.transactions_rejected);
        e
    };
    let body = body.map_err(|r| reject(MatrixErrorResponse::from_body_rejection(&r)))?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        reject(MatrixErrorResponse::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NotJson,
            format!("Body is not JSON: {e}"),
        ))
    })?;
    let parsed: TransactionBody = serde_json::from_value(value).map_err(|e| {
        reject(MatrixErrorResponse::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadJson,
            format!("Body is not a transaction: {e}"),
        ))
    })?;
    drop(_enter);

    let applied = state
        .calls
        .apply_transaction(&txn_id, &parsed.events)
        .await
        .map_err(|e| reject(MatrixErrorResponse::from(e)))?;
    match applied {
        Applied::Now => {
            inc(&state.metrics.transactions_applied);
            tracing::debug!(txn_id = %txn_id, "transaction applied");
        }
        Applied::Replayed => {
            inc(&state.metrics.transactions_replayed);
            tracing::info!(txn_id = %txn_id, "transaction already applied; acknowledged again");
        }
    }
    Ok(Json(serde_json::json!({})))
}

/// `GET /_matrix/app/v1/users/{userId}`: only the bot exists; puppets are never provisioned.
pub async fn get_user(
    State(state): State<AppserviceState>,
    _auth: Homeserver,
    Path(user_id): Path<String>,
) -> Result<Json<serde_json::Value>, MatrixErrorResponse> {
    if user_id == state.bot_user_id {
        Ok(Json(serde_json::json!({})))
    } else {
        Err(MatrixErrorResponse::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "No such user",
        ))
    }
}

/// `GET /_matrix/app/v1/rooms/{roomAlias}`: Conclave manages no aliases.
pub async fn get_room_alias(_auth: Homeserver, Path(_alias): Path<String>) -> MatrixErrorResponse {
    MatrixErrorResponse::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "No such room alias",
    )
}

/// `POST /_matrix/app/v1/ping`: the homeserver checks the link.
pub async fn post_ping(
    State(state): State<AppserviceState>,
    _auth: Homeserver,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, MatrixErrorResponse> {
    let body = body.map_err(|r| MatrixErrorResponse::from_body_rejection(&r))?;
    let txn: Option<String> = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("transaction_id")
                .and_then(|t| t.as_str())
                .map(String::from)
        });
    inc(&state.metrics.pings_received);
    tracing::info!(transaction_id = ?txn, "ping from the homeserver");
    Ok(Json(serde_json::json!({})))
}
