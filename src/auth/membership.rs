//! The membership gate: only users joined to the Matrix room get an SFU token.
//!
//! The store (fed by appservice transactions) answers for rooms Conclave follows; for a room it
//! has never seen, the homeserver is asked as the appservice bot.

use ruma::api::client::state::get_state_event_for_key;
use ruma::events::room::member::MembershipState;
use ruma::events::StateEventType;
use ruma::{RoomId, UserId};

use super::AuthError;
use crate::app::AppState;
use crate::matrix::client::ClientError;

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
            Ok(None) | Err(_) if known => wait_for_evidence(state, room_id, user_id).await?,
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

/// Polls the store for `auth.membership_wait_ms` until a membership of `user_id` in
/// `room_id` is recorded (an event of theirs reached the appservice); `None` if none did.
async fn wait_for_evidence(
    state: &AppState,
    room_id: &RoomId,
    user_id: &UserId,
) -> Result<Option<MembershipState>, AuthError> {
    let wait = std::time::Duration::from_millis(state.config.auth.membership_wait_ms);
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let store = state.store.clone();
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
