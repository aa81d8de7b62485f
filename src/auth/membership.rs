//! The membership gate: only users joined to the Matrix room get an SFU token.
//!
//! The store (fed by appservice transactions) answers for rooms Conclave follows; for a room it
//! has never seen, the homeserver is asked as the appservice bot.

use std::time::Duration;

use ruma::api::client::state::get_state_event_for_key;
use ruma::events::room::member::MembershipState;
use ruma::events::StateEventType;
use ruma::{OwnedServerName, RoomId, UserId};

use super::AuthError;
use crate::matrix::client::{ClientError, HomeserverClient};
use crate::store::AsyncStore;

/// The gate: the store first, then the homeserver, then a short wait for evidence.
#[derive(Clone)]
pub struct MembershipGate {
    store: AsyncStore,
    homeserver: HomeserverClient,
    /// This homeserver's name (for errors).
    server_name: OwnedServerName,
    /// The appservice bot (named in the error for rooms Conclave cannot see).
    bot_user_id: String,
    /// How long to wait for a followed room's membership evidence (`auth.membership_wait_ms`).
    wait: Duration,
}

impl MembershipGate {
    /// A gate reading `store` and asking `homeserver` as the bot.
    pub fn new(
        store: AsyncStore,
        homeserver: HomeserverClient,
        server_name: OwnedServerName,
        bot_user_id: String,
        wait: Duration,
    ) -> Self {
        Self {
            store,
            homeserver,
            server_name,
            bot_user_id,
            wait,
        }
    }

    /// Succeeds if `user_id` is joined to `room_id`; otherwise says why not.
    pub async fn require_joined(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<(), AuthError> {
        let (record, known) = self.store.membership(room_id, user_id).await?;
        let membership = match record {
            Some(r) => Some(r.membership),
            // No event seen for this user: they may have joined before Conclave was registered.
            None => match self.ask_homeserver(room_id, user_id).await {
                Ok(Some(m)) => Some(m),
                // The homeserver cannot tell us, but Conclave follows this room: the user may
                // have joined before this server took part, with their first event here in
                // flight. The transaction that records it wakes the wait.
                Ok(None) | Err(_) if known => {
                    let found = self
                        .store
                        .wait_for_membership(room_id, user_id, self.wait)
                        .await?;
                    if let Some(m) = &found {
                        tracing::debug!(%room_id, %user_id, membership = %m, "membership evidence arrived");
                    }
                    found
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

    /// Reads `m.room.member` for `user_id` from the homeserver as the bot.
    async fn ask_homeserver(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Option<MembershipState>, AuthError> {
        let request = get_state_event_for_key::v3::Request::new(
            room_id.to_owned(),
            StateEventType::RoomMember,
            user_id.to_string(),
        );
        match self.homeserver.send(request, None).await {
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
                self.bot_user_id
            ))),
            Err(ClientError::Unreachable(e)) => {
                tracing::warn!(error = %e, "local homeserver unreachable for a membership check");
                Err(AuthError::HomeserverUnreachable(
                    self.server_name.to_string(),
                ))
            }
            Err(e) => {
                tracing::warn!(error = %e, "membership check at the homeserver failed");
                Err(AuthError::HomeserverBadResponse(
                    self.server_name.to_string(),
                ))
            }
        }
    }
}
