//! The application service API the homeserver calls (spec: Application Service API).
//!
//! A transaction is acknowledged only after its effects and its txnId are committed in one
//! SQLite transaction: a replay changes nothing, and a crash before the commit is repaired by
//! the homeserver's retry. A malformed event is logged and skipped; it never blocks the queue.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use ruma::api::error::ErrorCode;
use ruma::events::{AnyStateEvent, AnyTimelineEvent};
use ruma::serde::Raw;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::http::error::MatrixErrorResponse;
use crate::metrics::inc;
use crate::store::{Effect, MembershipRecord, TxnOutcome};

/// Proof that the request carries the homeserver's `hs_token`.
///
/// Accepts `Authorization: Bearer <hs_token>` and the legacy `?access_token=`; when both are
/// present they must match. Missing → 401 `M_MISSING_TOKEN`; wrong → 403 `M_FORBIDDEN`.
pub struct AppserviceAuth;

impl FromRequestParts<Arc<AppState>> for AppserviceAuth {
    type Rejection = MatrixErrorResponse;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or("").trim().to_owned());
        let query = parts.uri.query().and_then(|q| {
            form_urlencoded_pairs(q)
                .into_iter()
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v)
        });
        let presented: Vec<String> = header.into_iter().chain(query).collect();
        if presented.is_empty() {
            inc(&state.metrics.transactions_rejected);
            return Err(MatrixErrorResponse::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::MissingToken,
                "Missing access token",
            ));
        }
        let expected = state.secrets.hs_token.expose().as_bytes();
        let all_match = presented
            .iter()
            .all(|t| bool::from(t.as_bytes().ct_eq(expected)));
        if !all_match {
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
    State(state): State<Arc<AppState>>,
    _auth: AppserviceAuth,
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

    let store = state.store.clone();
    let txn = txn_id.clone();
    let state2 = state.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        // Fast path for retries: skip parsing (and its logs) when already applied. The check is
        // repeated inside the database transaction, which is what guarantees exactly-once.
        if store.is_transaction_processed(&txn)? {
            return Ok((TxnOutcome::Replayed, Vec::new()));
        }
        let effects = events_to_effects(&state2, &parsed.events, crate::clock::unix_millis());
        store
            .apply_transaction(&txn, &effects)
            .map(|outcome| (outcome, effects))
    })
    .await
    .map_err(|e| reject(MatrixErrorResponse::internal(&e)))?
    .map_err(|e| reject(MatrixErrorResponse::internal(&e)))?;
    let (outcome, effects) = outcome;
    // Matrix decides who stays in the SFU: act on memberships that ended.
    for effect in &effects {
        if let Effect::Membership(m) = effect {
            if m.membership == ruma::events::room::member::MembershipState::Invite
                && m.user_id.as_str() == state.config.bot_user_id()
            {
                tokio::spawn(accept_invite(state.clone(), m.room_id.clone()));
            }
            if m.membership != ruma::events::room::member::MembershipState::Join {
                crate::matrix::enforce::membership_lost(
                    &state,
                    &m.room_id,
                    &m.user_id,
                    m.membership.as_str(),
                )
                .await;
            }
        }
    }
    match outcome {
        TxnOutcome::Applied(changes) => {
            crate::matrix::enforce::act_on_call_changes(&state, changes).await;
            inc(&state.metrics.transactions_applied);
            tracing::debug!(txn_id = %txn_id, "transaction applied");
        }
        TxnOutcome::Replayed => {
            inc(&state.metrics.transactions_replayed);
            tracing::info!(txn_id = %txn_id, "transaction already applied; acknowledged again");
        }
    }
    Ok(Json(serde_json::json!({})))
}

/// The bot joins rooms it is invited to, so it can post call notices there.
async fn accept_invite(state: Arc<AppState>, room_id: ruma::OwnedRoomId) {
    let request = ruma::api::client::membership::join_room_by_id::v3::Request::new(room_id.clone());
    match state.homeserver.send(request, None).await {
        Ok(_) => tracing::info!(room_id = %room_id, "bot accepted an invite"),
        Err(e) => tracing::warn!(room_id = %room_id, error = %e, "bot could not join"),
    }
}

/// Turns the events of a transaction into store effects, skipping what cannot be parsed.
/// For a non-membership event: its sender was joined to its room when it was sent (the
/// homeserver checked the room's auth rules before accepting it). `None` for `m.room.member`
/// events and for events missing a field.
fn sender_joined(event: &serde_json::Value) -> Option<MembershipRecord> {
    let field = |k: &str| event.get(k).and_then(serde_json::Value::as_str);
    if field("type")? == "m.room.member" {
        return None;
    }
    let ts = event
        .get("origin_server_ts")
        .and_then(serde_json::Value::as_u64)?;
    Some(MembershipRecord {
        room_id: ruma::RoomId::parse(field("room_id")?).ok()?,
        user_id: ruma::UserId::parse(field("sender")?).ok()?,
        membership: ruma::events::room::member::MembershipState::Join,
        event_id: ruma::EventId::parse(field("event_id")?).ok()?,
        origin_server_ts: ruma::MilliSecondsSinceUnixEpoch(ruma::UInt::try_from(ts).ok()?),
    })
}

fn events_to_effects(
    state: &AppState,
    events: &[Raw<AnyTimelineEvent>],
    now_ms: i64,
) -> Vec<Effect> {
    let mut effects = Vec::new();
    for raw in events {
        inc(&state.metrics.events_received);
        // MatrixRTC membership events are custom types: read them as JSON.
        if let Ok(value) = raw.deserialize_as::<serde_json::Value>() {
            if let Some(seen) = sender_joined(&value) {
                effects.push(Effect::SenderJoined(seen));
            }
            if let Some(result) = super::calls::effects(&value, now_ms) {
                match result {
                    Ok(e) => effects.extend(e),
                    Err(err) => {
                        inc(&state.metrics.events_malformed);
                        let id = value.get("event_id").and_then(|v| v.as_str()).unwrap_or("");
                        tracing::warn!(event_id = %id, error = %err, "ignoring call membership event");
                    }
                }
                continue;
            }
        }
        let event = match raw.deserialize() {
            Ok(e) => e,
            Err(e) => {
                inc(&state.metrics.events_malformed);
                let id = raw
                    .get_field::<String>("event_id")
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                tracing::warn!(event_id = %id, error = %e, "skipping malformed event");
                continue;
            }
        };
        if let AnyTimelineEvent::State(AnyStateEvent::RoomEncryption(enc)) = &event {
            tracing::info!(room_id = %enc.room_id(), "room is encrypted");
            let algorithm = match enc {
                ruma::events::StateEvent::Original(o) => o.content.algorithm.to_string(),
                ruma::events::StateEvent::Redacted(_) => String::new(),
            };
            effects.push(Effect::RoomEncrypted {
                room_id: enc.room_id().to_owned(),
                algorithm,
                event_id: enc.event_id().to_string(),
            });
            continue;
        }
        if let AnyTimelineEvent::State(AnyStateEvent::RoomMember(member)) = &event {
            let Ok(user_id) = ruma::UserId::parse(member.state_key().as_str()) else {
                inc(&state.metrics.events_malformed);
                tracing::warn!(event_id = %member.event_id(), "member event with a bad state key");
                continue;
            };
            tracing::info!(
                room_id = %member.room_id(),
                user_id = %user_id,
                membership = %member.membership(),
                "membership changed"
            );
            effects.push(Effect::Membership(MembershipRecord {
                room_id: member.room_id().to_owned(),
                user_id,
                membership: member.membership().clone(),
                event_id: member.event_id().to_owned(),
                origin_server_ts: member.origin_server_ts(),
            }));
        }
    }
    effects
}

/// `GET /_matrix/app/v1/users/{userId}`: only the bot exists; puppets are never provisioned.
pub async fn get_user(
    State(state): State<Arc<AppState>>,
    _auth: AppserviceAuth,
    Path(user_id): Path<String>,
) -> Result<Json<serde_json::Value>, MatrixErrorResponse> {
    if user_id == state.config.bot_user_id() {
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
pub async fn get_room_alias(
    _auth: AppserviceAuth,
    Path(_alias): Path<String>,
) -> MatrixErrorResponse {
    MatrixErrorResponse::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "No such room alias",
    )
}

/// `POST /_matrix/app/v1/ping`: the homeserver checks the link.
pub async fn post_ping(
    State(state): State<Arc<AppState>>,
    _auth: AppserviceAuth,
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

#[cfg(test)]
mod tests {
    use super::sender_joined;
    use ruma::events::room::member::MembershipState;
    use serde_json::json;

    fn call_member() -> serde_json::Value {
        json!({
            "type": "org.matrix.msc3401.call.member",
            "state_key": "_@bob:hs2.example_DEV_m.call",
            "room_id": "!call:hs2.example",
            "sender": "@bob:hs2.example",
            "event_id": "$member",
            "origin_server_ts": 1234,
            "content": {},
        })
    }

    #[test]
    fn any_non_membership_event_is_evidence_its_sender_was_joined() {
        let r = sender_joined(&call_member()).expect("evidence");
        assert_eq!(r.user_id.as_str(), "@bob:hs2.example");
        assert_eq!(r.room_id.as_str(), "!call:hs2.example");
        assert_eq!(r.membership, MembershipState::Join);
        assert_eq!(r.event_id.as_str(), "$member");
        assert_eq!(u64::from(r.origin_server_ts.0), 1234);
    }

    #[test]
    fn membership_events_and_incomplete_events_are_not() {
        let mut member = call_member();
        member["type"] = json!("m.room.member");
        assert!(
            sender_joined(&member).is_none(),
            "m.room.member speaks for itself"
        );
        for (field, bad) in [
            ("sender", json!("not a user id")),
            ("room_id", json!(42)),
            ("event_id", json!(null)),
            ("origin_server_ts", json!("yesterday")),
        ] {
            let mut e = call_member();
            e[field] = bad;
            assert!(sender_joined(&e).is_none(), "{field} invalid");
        }
    }
}
