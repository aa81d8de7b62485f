//! The membership gate: only users joined to the Matrix room get an SFU token.
//!
//! Where the homeserver offers MSC4502 (`GET /_matrix/client/unstable/io.element.msc4502/
//! rooms/{roomId}/is_joined?mxid=…`, Synapse's `msc4502_enabled`, the registration's
//! `io.element.msc4502.scopes`), it answers; otherwise the store (fed by appservice
//! transactions) answers for rooms Conclave follows, and for a room it has never seen, the
//! homeserver's `m.room.member` state is read as the appservice bot.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ruma::api::client::state::get_state_event_for_key;
use ruma::events::room::member::MembershipState;
use ruma::events::StateEventType;
use ruma::{OwnedServerName, RoomId, UserId};

use super::AuthError;
use crate::matrix::client::{encode_path_segment, ClientError, HomeserverClient};
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
    /// Until when the homeserver is taken not to offer MSC4502 (asked again after that).
    no_is_joined_until: Arc<Mutex<Option<Instant>>>,
}

/// How long a homeserver without MSC4502 is not asked again.
const IS_JOINED_RECHECK: Duration = Duration::from_secs(300);

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
            no_is_joined_until: Arc::new(Mutex::new(None)),
        }
    }

    /// Succeeds if `user_id` is joined to `room_id`; otherwise says why not.
    pub async fn require_joined(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<(), AuthError> {
        match self.is_joined(room_id, user_id).await {
            Some(true) => return Ok(()),
            Some(false) => {
                return Err(AuthError::Forbidden(format!(
                    "{user_id} is not joined to {room_id}"
                )))
            }
            None => {}
        }
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

    /// MSC4502: the homeserver's answer, or `None` when it does not offer the endpoint (404,
    /// 405, `M_UNRECOGNIZED`, or 403 for a registration without the scope) or fails; then the
    /// endpoint is not asked again for [`IS_JOINED_RECHECK`].
    #[tracing::instrument(level = "debug", skip(self))]
    async fn is_joined(&self, room_id: &RoomId, user_id: &UserId) -> Option<bool> {
        {
            let until = self
                .no_is_joined_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if until.is_some_and(|t| Instant::now() < t) {
                return None;
            }
        }
        let path = format!(
            "/_matrix/client/unstable/io.element.msc4502/rooms/{}/is_joined",
            encode_path_segment(room_id.as_str())
        );
        let answer = self
            .homeserver
            .send_json(
                http::Method::GET,
                &path,
                &[("mxid", user_id.as_str())],
                None,
            )
            .await;
        match answer {
            Ok((200, body)) => {
                if let Some(joined) = body.get("joined").and_then(serde_json::Value::as_bool) {
                    return Some(joined);
                }
                tracing::warn!("MSC4502 is_joined answered without `joined`; using the store");
            }
            Ok((status, body)) => {
                let errcode = body.get("errcode").and_then(serde_json::Value::as_str);
                if matches!(status, 404 | 405) || errcode == Some("M_UNRECOGNIZED") {
                    tracing::debug!(status, "homeserver does not offer MSC4502 is_joined");
                } else {
                    tracing::warn!(
                        status,
                        errcode,
                        "MSC4502 is_joined refused; using the store"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "MSC4502 is_joined failed; using the store");
                return None;
            }
        }
        *self
            .no_is_joined_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + IS_JOINED_RECHECK);
        None
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
