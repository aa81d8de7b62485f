//! Durable state: the [`Store`] trait of domain operations and its SQLite implementation.
//!
//! Reached only from `matrix` and `auth`. Operations are synchronous (rusqlite); async callers
//! run them with `tokio::task::spawn_blocking` and never hold a connection across an `.await`.

pub mod sqlite;

pub use sqlite::SqliteStore;

use ruma::events::room::member::MembershipState;
use ruma::{MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId};

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database file could not be opened or created.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The database was written by a newer Conclave.
    #[error("database schema version {found} is newer than this Conclave supports ({supported})")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this binary knows.
        supported: i64,
    },
    /// A stored value could not be parsed back.
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The store's lock was poisoned by a panic elsewhere.
    #[error("store lock poisoned")]
    Poisoned,
}

/// One change a transaction makes to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// An `m.room.member` event.
    Membership(MembershipRecord),
}

/// A user's membership of a room, from its latest `m.room.member` event.
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipRecord {
    /// The room.
    pub room_id: OwnedRoomId,
    /// The member (the event's state key).
    pub user_id: OwnedUserId,
    /// join, invite, leave, ban, knock.
    pub membership: MembershipState,
    /// The event that set it.
    pub event_id: OwnedEventId,
    /// When the event was created.
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
}

/// An SFU participant whose client handed over an MSC4140 delayed leave event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayedLeave {
    /// LiveKit room name.
    pub room_name: String,
    /// LiveKit participant identity.
    pub identity: String,
    /// The Matrix room of the call.
    pub matrix_room_id: OwnedRoomId,
    /// The Matrix user.
    pub user_id: OwnedUserId,
    /// The user's (claimed) device.
    pub device_id: String,
    /// The delayed event's ID on the user's homeserver.
    pub delay_id: String,
    /// Its timeout, in milliseconds.
    pub delay_timeout_ms: u64,
}

/// What happened to a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Its effects were committed now.
    Applied,
    /// Its txnId was already committed; nothing changed.
    Replayed,
}

/// Durable domain operations.
pub trait Store: Send + Sync + 'static {
    /// Applies `effects` and records `txn_id` in one database transaction; a txnId already
    /// recorded changes nothing.
    fn apply_transaction(&self, txn_id: &str, effects: &[Effect])
        -> Result<TxnOutcome, StoreError>;

    /// Whether `txn_id` was already applied.
    fn is_transaction_processed(&self, txn_id: &str) -> Result<bool, StoreError>;

    /// The current membership of `user_id` in `room_id`, if any event was seen.
    fn membership(
        &self,
        room_id: &ruma::RoomId,
        user_id: &ruma::UserId,
    ) -> Result<Option<MembershipRecord>, StoreError>;

    /// Whether any membership of `room_id` was ever seen.
    fn room_known(&self, room_id: &ruma::RoomId) -> Result<bool, StoreError>;

    /// Every user with a membership record in `room_id`, ordered by user ID.
    fn room_memberships(&self, room_id: &ruma::RoomId)
        -> Result<Vec<MembershipRecord>, StoreError>;

    /// Records (or replaces) the delayed leave of an issued SFU participant.
    fn record_delayed_leave(&self, leave: &DelayedLeave) -> Result<(), StoreError>;

    /// The delayed leave recorded for a participant, if any.
    fn delayed_leave(
        &self,
        room_name: &str,
        identity: &str,
    ) -> Result<Option<DelayedLeave>, StoreError>;

    /// How many times the membership event `event_id` was applied (0 or 1 unless a bug).
    fn membership_event_applications(&self, event_id: &ruma::EventId) -> Result<u64, StoreError>;

    /// Number of transactions applied so far.
    fn processed_transactions(&self) -> Result<u64, StoreError>;
}
