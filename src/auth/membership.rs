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
                // The join may be on its way (a remote user's, over federation).
                if self.joins_soon(room_id, user_id).await? {
                    return Ok(());
                }
                return Err(AuthError::Forbidden(format!(
                    "{user_id} is not joined to {room_id}"
                )));
            }
            None => {}
        }
        let (record, known) = self.store.membership(room_id, user_id).await?;
        let membership = match record {
            // Invited or gone, and asking for a token: their join may be on its way (a remote
            // user's join reaches this homeserver over federation, often after their client
            // asked; Element Call does not ask twice). A ban or a knock is final.
            Some(r)
                if matches!(
                    r.membership,
                    MembershipState::Invite | MembershipState::Leave
                ) =>
            {
                if self.joins_soon(room_id, user_id).await? {
                    Some(MembershipState::Join)
                } else {
                    Some(r.membership)
                }
            }
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

    /// Waits up to `auth.membership_wait_ms` for the transaction that records `user_id`'s join.
    async fn joins_soon(&self, room_id: &RoomId, user_id: &UserId) -> Result<bool, AuthError> {
        if self.wait.is_zero() {
            return Ok(false);
        }
        let joined = self
            .store
            .wait_for_join(room_id, user_id, self.wait)
            .await?;
        if joined {
            tracing::debug!(%room_id, %user_id, "the join arrived while the token request waited");
        }
        Ok(joined)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Effect, MembershipRecord};
    use ruma::{MilliSecondsSinceUnixEpoch, OwnedEventId, UInt};

    fn record(room: &RoomId, user: &UserId, m: MembershipState, n: u64) -> Effect {
        Effect::Membership(MembershipRecord {
            room_id: room.to_owned(),
            user_id: user.to_owned(),
            membership: m,
            event_id: OwnedEventId::try_from(format!("$e{n}")).expect("event id"),
            origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::from(n as u32)),
        })
    }

    /// A gate whose homeserver cannot be reached: only the store answers.
    fn gate(store: AsyncStore, wait: Duration) -> MembershipGate {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .expect("client");
        let homeserver =
            HomeserverClient::new(http, "http://127.0.0.1:9", crate::config::Secret::new("as"));
        let server = OwnedServerName::try_from("hs1.example").expect("server name");
        MembershipGate::new(
            store,
            homeserver,
            server,
            "@conclave:hs1.example".into(),
            wait,
        )
    }

    /// Found by Element Call under load: bob (another server) was invited, joined on his
    /// server, and asked for a token before his join had come over federation; the invite
    /// refused him at once and Element Call never asked again. Now the gate waits for the
    /// join, and still refuses at once for a ban and after the wait for an invite alone.
    #[tokio::test]
    async fn an_invited_user_whose_join_is_on_its_way_gets_in() {
        let store = AsyncStore::open_in_memory().expect("store");
        let room = ruma::room_id!("!r:hs1.example");
        let bob = ruma::user_id!("@bob:hs2.example");
        let eve = ruma::user_id!("@eve:hs2.example");
        let effects = vec![
            record(room, bob, MembershipState::Invite, 1),
            record(room, eve, MembershipState::Ban, 2),
        ];
        store
            .apply_transaction("t1".into(), effects, 0)
            .await
            .expect("txn");
        let g = gate(store.clone(), Duration::from_secs(3));

        let later = store.clone();
        let join = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let effects = vec![record(room, bob, MembershipState::Join, 3)];
            later
                .apply_transaction("t2".into(), effects, 0)
                .await
                .expect("txn");
        });
        let started = Instant::now();
        g.require_joined(room, bob)
            .await
            .expect("bob gets in once his join arrives");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
        join.await.expect("join task");

        let started = Instant::now();
        let err = g.require_joined(room, eve).await.expect_err("banned");
        assert!(err.to_string().contains("ban"), "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a ban is refused at once"
        );

        let carol = ruma::user_id!("@carol:hs2.example");
        let store2 = AsyncStore::open_in_memory().expect("store");
        store2
            .apply_transaction(
                "t3".into(),
                vec![record(room, carol, MembershipState::Invite, 4)],
                0,
            )
            .await
            .expect("txn");
        let g = gate(store2, Duration::from_millis(300));
        let started = Instant::now();
        let err = g
            .require_joined(room, carol)
            .await
            .expect_err("only invited");
        assert!(err.to_string().contains("invite"), "{err}");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "waited for a join first"
        );
    }
}
