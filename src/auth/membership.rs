//! The membership gate: only users joined to the Matrix room get an SFU token.
//!
//! The store (fed by appservice transactions) answers for rooms Conclave follows; for a room it
//! has never seen, the homeserver is asked as the appservice bot.

use std::sync::Arc;
use std::time::Duration;

use ruma::api::client::state::get_state_event_for_key;
use ruma::events::room::member::MembershipState;
use ruma::events::StateEventType;
use ruma::{RoomId, UserId};

use super::AuthError;
use crate::app::AppState;
use crate::matrix::client::ClientError;
use crate::store::Store;

/// How often [`wait_for_evidence`] looks at the store.
const EVIDENCE_POLL: Duration = Duration::from_millis(100);

/// Succeeds if `user_id` is joined to `room_id`; otherwise says why not.
pub async fn require_joined(
    state: &AppState,
    room_id: &RoomId,
    user_id: &UserId,
) -> Result<(), AuthError> {
    let store = state.store.clone();
    let (room, user) = (room_id.to_owned(), user_id.to_owned());
    let (record, known) = tokio::task::spawn_blocking(move || {
        let record = store.membership(&room, &user)?;
        let known = record.is_some() || store.room_known(&room)?;
        Ok::<_, AuthError>((record, known))
    })
    .await
    .map_err(|e| AuthError::Internal(e.to_string()))??;

    let membership = match record {
        Some(r) => Some(r.membership),
        // No event seen for this user: they may have joined before Conclave was registered.
        None => match ask_homeserver(state, room_id, user_id).await {
            Ok(Some(m)) => Some(m),
            // The homeserver cannot tell us, but Conclave follows this room: the user may have
            // joined before this server took part, with their first event here in flight.
            Ok(None) | Err(_) if known => {
                let wait = Duration::from_millis(state.config.auth.membership_wait_ms);
                wait_for_evidence(state.store.clone(), room_id, user_id, wait).await?
            }
            Ok(None) => None,
            Err(e) => return Err(e),
        },
    };
    match membership {
        Some(MembershipState::Join) => Ok(()),
        Some(other) => Err(AuthError::Forbidden(format!(
            "{user_id} is not joined to {room_id} (membership: {other})"
        ))),
        None => Err(AuthError::Forbidden(format!(
            "{user_id} is not a member of {room_id}"
        ))),
    }
}

/// Polls `store` for up to `wait` until a membership of `user_id` in `room_id` is recorded
/// (an event of theirs reached the appservice); `None` if none was.
async fn wait_for_evidence(
    store: Arc<dyn Store>,
    room_id: &RoomId,
    user_id: &UserId,
    wait: Duration,
) -> Result<Option<MembershipState>, AuthError> {
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(EVIDENCE_POLL.min(wait)).await;
        let store = store.clone();
        let (room, user) = (room_id.to_owned(), user_id.to_owned());
        let record = tokio::task::spawn_blocking(move || store.membership(&room, &user))
            .await
            .map_err(|e| AuthError::Internal(e.to_string()))??;
        if let Some(r) = record {
            tracing::debug!(%room_id, %user_id, membership = %r.membership, "membership evidence arrived");
            return Ok(Some(r.membership));
        }
    }
    Ok(None)
}

/// Reads `m.room.member` for `user_id` from the homeserver as the bot.
async fn ask_homeserver(
    state: &AppState,
    room_id: &RoomId,
    user_id: &UserId,
) -> Result<Option<MembershipState>, AuthError> {
    let request = get_state_event_for_key::v3::Request::new(
        room_id.to_owned(),
        StateEventType::RoomMember,
        user_id.to_string(),
    );
    match state.homeserver.send(request, None).await {
        Ok(resp) => {
            #[derive(serde::Deserialize)]
            struct Content {
                membership: MembershipState,
            }
            let content: Content = serde_json::from_str(resp.event_or_content.get())
                .map_err(|_| AuthError::HomeserverBadResponse("local homeserver".into()))?;
            Ok(Some(content.membership))
        }
        Err(ClientError::Response { status: 404, .. }) => Ok(None),
        Err(ClientError::Response { status: 403, .. }) => Err(AuthError::RoomUnknown(format!(
            "Conclave does not know room {room_id}: this homeserver is not in it, or the room \
             predates Conclave's registration (invite {} to the room)",
            state.config.bot_user_id()
        ))),
        Err(ClientError::Unreachable(e)) => {
            tracing::warn!(error = %e, "local homeserver unreachable for a membership check");
            Err(AuthError::HomeserverUnreachable(
                state.config.matrix.server_name.to_string(),
            ))
        }
        Err(e) => {
            tracing::warn!(error = %e, "membership check at the homeserver failed");
            Err(AuthError::HomeserverBadResponse(
                state.config.matrix.server_name.to_string(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Effect, MembershipRecord, SqliteStore};
    use ruma::events::room::member::MembershipState;
    use ruma::{owned_event_id, owned_room_id, owned_user_id, uint, MilliSecondsSinceUnixEpoch};

    fn sender_joined() -> Effect {
        Effect::SenderJoined(MembershipRecord {
            room_id: owned_room_id!("!call:hs2.example"),
            user_id: owned_user_id!("@bob:hs2.example"),
            membership: MembershipState::Join,
            event_id: owned_event_id!("$callmember"),
            origin_server_ts: MilliSecondsSinceUnixEpoch(uint!(1000)),
        })
    }

    #[tokio::test]
    async fn late_evidence_is_found_within_the_wait() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().expect("store"));
        let writer = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            tokio::task::spawn_blocking(move || writer.apply_transaction("t1", &[sender_joined()]))
                .await
                .expect("join")
                .expect("apply");
        });
        let found = wait_for_evidence(
            store,
            &owned_room_id!("!call:hs2.example"),
            &owned_user_id!("@bob:hs2.example"),
            Duration::from_secs(10),
        )
        .await
        .expect("wait");
        assert_eq!(found, Some(MembershipState::Join));
    }

    #[tokio::test]
    async fn no_evidence_means_no_membership_after_the_wait() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().expect("store"));
        store
            .apply_transaction("t1", &[sender_joined()])
            .expect("apply");
        let started = std::time::Instant::now();
        let found = wait_for_evidence(
            store,
            &owned_room_id!("!call:hs2.example"),
            &owned_user_id!("@mallory:hs2.example"),
            Duration::from_millis(300),
        )
        .await
        .expect("wait");
        assert_eq!(found, None, "another user's evidence is not mallory's");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "waited the full time"
        );
    }
}
