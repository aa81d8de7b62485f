//! [`AsyncStore`]: the only way into the store from async code, and the only place that calls
//! `spawn_blocking`. It also tells waiters when a transaction wrote memberships, so the
//! membership gate is woken by the write instead of polling.

use std::sync::Arc;
use std::time::Duration;

use ruma::events::room::member::MembershipState;
use ruma::{RoomId, UserId};
use tokio::sync::Notify;

use super::{
    CallChange, CallView, DelayedLeave, Effect, MembershipRecord, Pruned, SqliteStore, Store,
    StoreError, TxnOutcome,
};
use crate::sfu::ids::{ParticipantIdentity, RoomName};

/// The async store facade. Cheap to clone.
#[derive(Clone)]
pub struct AsyncStore {
    inner: Arc<dyn Store>,
    /// Notified after every applied transaction.
    written: Arc<Notify>,
}

impl AsyncStore {
    /// Wraps a store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            inner: store,
            written: Arc::new(Notify::new()),
        }
    }

    /// A fresh in-memory SQLite store (tests, tools).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Ok(Self::new(Arc::new(SqliteStore::open_in_memory()?)))
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.inner.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Applies a transaction's effects exactly once (see [`Store::apply_transaction`]); a
    /// txnId already recorded is answered without work. Wakes membership waiters.
    pub async fn apply_transaction(
        &self,
        txn_id: String,
        effects: Vec<Effect>,
        now_ms: i64,
    ) -> Result<TxnOutcome, StoreError> {
        let outcome = self
            .run(move |s| s.apply_transaction(&txn_id, &effects, now_ms))
            .await?;
        if matches!(outcome, TxnOutcome::Applied(_)) {
            self.written.notify_waiters();
        }
        Ok(outcome)
    }

    /// Whether `txn_id` was already applied.
    pub async fn is_transaction_processed(&self, txn_id: String) -> Result<bool, StoreError> {
        self.run(move |s| s.is_transaction_processed(&txn_id)).await
    }

    /// The recorded membership of `user_id` in `room_id`, and whether the room is known at all.
    pub async fn membership(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<(Option<MembershipRecord>, bool), StoreError> {
        let (room, user) = (room_id.to_owned(), user_id.to_owned());
        self.run(move |s| {
            let record = s.membership(&room, &user)?;
            let known = record.is_some() || s.room_known(&room)?;
            Ok((record, known))
        })
        .await
    }

    /// Waits up to `wait` until a membership of `user_id` in `room_id` is recorded (woken by
    /// each applied transaction, not by polling); `None` if none was by then.
    pub async fn wait_for_membership(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        wait: Duration,
    ) -> Result<Option<MembershipState>, StoreError> {
        self.wait_until(room_id, user_id, wait, |_| true).await
    }

    /// Waits up to `wait` until `user_id`'s recorded membership in `room_id` is `join` (woken
    /// by each applied transaction); false if it was not by then.
    pub async fn wait_for_join(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        wait: Duration,
    ) -> Result<bool, StoreError> {
        let found = self
            .wait_until(room_id, user_id, wait, |m| *m == MembershipState::Join)
            .await?;
        Ok(found.is_some())
    }

    /// Waits up to `wait` until a recorded membership of `user_id` in `room_id` satisfies
    /// `wanted`, re-reading after each applied transaction.
    async fn wait_until(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        wait: Duration,
        wanted: fn(&MembershipState) -> bool,
    ) -> Result<Option<MembershipState>, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register before reading, so a write between the read and the wait is not missed.
            let written = self.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if let (Some(r), _) = self.membership(room_id, user_id).await? {
                if wanted(&r.membership) {
                    return Ok(Some(r.membership));
                }
            }
            if tokio::time::timeout_at(deadline, written).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// Whether a user of `server` is joined to `room_id`, as far as the events seen tell.
    pub async fn has_joined_member_of(
        &self,
        room_id: &RoomId,
        server: &ruma::ServerName,
    ) -> Result<bool, StoreError> {
        let (room, server) = (room_id.to_owned(), server.to_owned());
        self.run(move |s| {
            Ok(s.room_memberships(&room)?.iter().any(|m| {
                m.membership == MembershipState::Join && m.user_id.server_name() == server
            }))
        })
        .await
    }

    /// The content (JSON) of `room_id`'s latest `m.room.server_acl`, if one was seen.
    pub async fn server_acl(&self, room_id: &RoomId) -> Result<Option<String>, StoreError> {
        let room = room_id.to_owned();
        self.run(move |s| s.server_acl(&room)).await
    }

    /// Records the delayed leave handed over at `now_ms`.
    pub async fn record_delayed_leave(
        &self,
        leave: DelayedLeave,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.run(move |s| s.record_delayed_leave(&leave, now_ms))
            .await
    }

    /// The delayed leave of a participant, if one was handed over.
    pub async fn delayed_leave(
        &self,
        room: &RoomName,
        identity: &ParticipantIdentity,
    ) -> Result<Option<DelayedLeave>, StoreError> {
        let (room, identity) = (room.clone(), identity.clone());
        self.run(move |s| s.delayed_leave(&room, &identity)).await
    }

    /// Ends call memberships expired at `now_ms`.
    pub async fn expire_call_members(&self, now_ms: i64) -> Result<Vec<CallChange>, StoreError> {
        self.run(move |s| s.expire_call_members(now_ms)).await
    }

    /// Deletes history older than `before_ms` (see [`Store::prune_history`]).
    pub async fn prune_history(&self, before_ms: i64) -> Result<Pruned, StoreError> {
        self.run(move |s| s.prune_history(before_ms)).await
    }

    /// Active calls with their members.
    pub async fn active_calls(&self) -> Result<Vec<CallView>, StoreError> {
        self.run(|s| s.active_calls()).await
    }

    /// Whether `device_id` of `user_id` may stay in the SFU after the grace period: it holds a
    /// call membership in `room_id`, or the room is encrypted (its `rtc.member` events are
    /// unreadable, so Matrix room membership alone decides).
    pub async fn call_membership_or_encrypted(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        device_id: &str,
    ) -> Result<bool, StoreError> {
        let (room, user, device) = (room_id.to_owned(), user_id.to_owned(), device_id.to_owned());
        self.run(move |s| {
            Ok(s.is_room_encrypted(&room)? || s.is_call_member(&room, &user, &device)?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{owned_event_id, owned_room_id, uint, MilliSecondsSinceUnixEpoch};

    fn joined(user: &str) -> Effect {
        Effect::SenderJoined(MembershipRecord {
            room_id: owned_room_id!("!call:hs2.example"),
            user_id: ruma::UserId::parse(user).expect("user"),
            membership: MembershipState::Join,
            event_id: owned_event_id!("$callmember"),
            origin_server_ts: MilliSecondsSinceUnixEpoch(uint!(1000)),
        })
    }

    async fn wait_for(store: &AsyncStore, user: &str, wait: Duration) -> Option<MembershipState> {
        store
            .wait_for_membership(
                &owned_room_id!("!call:hs2.example"),
                &ruma::UserId::parse(user).expect("user"),
                wait,
            )
            .await
            .expect("wait")
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_the_write_not_by_a_poll() {
        let store = AsyncStore::open_in_memory().expect("store");
        let writer = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            writer
                .apply_transaction("t1".into(), vec![joined("@bob:hs2.example")], 0)
                .await
                .expect("apply");
        });
        let started = std::time::Instant::now();
        let found = wait_for(&store, "@bob:hs2.example", Duration::from_secs(10)).await;
        assert_eq!(found, Some(MembershipState::Join));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "woken at the write"
        );
    }

    #[tokio::test]
    async fn no_evidence_means_no_membership_after_the_wait() {
        let store = AsyncStore::open_in_memory().expect("store");
        store
            .apply_transaction("t1".into(), vec![joined("@bob:hs2.example")], 0)
            .await
            .expect("apply");
        let started = std::time::Instant::now();
        let found = wait_for(&store, "@mallory:hs2.example", Duration::from_millis(300)).await;
        assert_eq!(found, None, "another user's evidence is not mallory's");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "waited the full time"
        );
    }
}
