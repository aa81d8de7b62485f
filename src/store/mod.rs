//! Durable state: the [`Store`] trait of domain operations, its SQLite implementation, and
//! [`AsyncStore`], the facade through which the services reach it.
//!
//! Reached only by its owners, the `calls` and `auth` services (and `serve`, which opens it).
//! Operations are synchronous (rusqlite); [`AsyncStore`] is the one place that runs them on the
//! blocking pool, so no caller sees a connection. The store never reads the clock: times are
//! arguments.

mod facade;
pub mod lifecycle;
pub mod sqlite;

pub use facade::AsyncStore;
pub use sqlite::SqliteStore;

use crate::sfu::ids::{ParticipantIdentity, RoomName};

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
    /// A blocking store task failed (panicked or was cancelled).
    #[error("store task failed: {0}")]
    Task(String),
}

/// One change a transaction makes to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// An `m.room.member` event. A membership other than `join` also ends the user's call
    /// memberships in that room.
    Membership(MembershipRecord),
    /// A MatrixRTC member joined or refreshed its membership.
    CallMemberJoined(CallMemberJoin),
    /// A user sent a non-membership event into the room. The homeserver only accepts such an
    /// event from a joined sender (room auth rules), so it proves the sender was joined when
    /// it was sent. Recorded as `join` only when no `m.room.member` event of that user is
    /// known: explicit membership always wins. This covers users who joined before this
    /// homeserver took part in the room (their join never reaches the appservice).
    SenderJoined(MembershipRecord),
    /// The room turned on encryption (`m.room.encryption`).
    RoomEncrypted {
        /// The room.
        room_id: OwnedRoomId,
        /// The algorithm.
        algorithm: String,
        /// The event.
        event_id: String,
    },
    /// The room's `m.room.server_acl` changed.
    ServerAcl {
        /// The room.
        room_id: OwnedRoomId,
        /// The event's content (JSON), as the homeserver sent it.
        content: String,
        /// The event.
        event_id: String,
    },
    /// A MatrixRTC membership ended (empty content, expired, or replaced by a leave).
    CallMemberLeft {
        /// The Matrix room.
        room_id: OwnedRoomId,
        /// Which membership (see [`CallMemberJoin::member_key`]).
        member_key: String,
        /// When (event time, ms).
        ts: i64,
    },
}

/// A call membership as the events describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallMemberJoin {
    /// The Matrix room.
    pub room_id: OwnedRoomId,
    /// `m.call` for Element Call.
    pub application: String,
    /// `""` for the room-wide call.
    pub call_id: String,
    /// Stable key of the membership's source: the `call.member` state key (plus device for
    /// legacy per-user arrays), or `rtc:<sender>|<sticky key>` for `rtc.member`.
    pub member_key: String,
    /// The member.
    pub user_id: OwnedUserId,
    /// Its device.
    pub device_id: String,
    /// Its membership ID (`membershipID`, or `user:device`).
    pub membership_id: String,
    /// `focus_active` as JSON text.
    pub focus_active: String,
    /// `foci_preferred` as JSON text.
    pub foci_preferred: String,
    /// The event.
    pub event_id: String,
    /// Event time (ms).
    pub ts: i64,
    /// When the membership expires (ms), if it says.
    pub expires_ts: Option<i64>,
}

/// What a change to calls means for the rest of the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallChange {
    /// The first member joined: a call started.
    Started {
        /// The Matrix room.
        room_id: OwnedRoomId,
        /// Who started it.
        started_by: OwnedUserId,
    },
    /// The last member left: the call ended.
    Ended {
        /// The Matrix room.
        room_id: OwnedRoomId,
        /// Who started it.
        started_by: String,
        /// Start (ms).
        started_ts: i64,
        /// End (ms).
        ended_ts: i64,
        /// Most members at once.
        peak_members: i64,
    },
    /// A member's membership ended.
    MemberLeft {
        /// The Matrix room.
        room_id: OwnedRoomId,
        /// The user.
        user_id: OwnedUserId,
        /// The device.
        device_id: String,
    },
}

/// An active (or ended) call with its current members.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CallView {
    /// The Matrix room.
    pub room_id: String,
    /// Application (`m.call`).
    pub application: String,
    /// Call ID (`""` = room call).
    pub call_id: String,
    /// Who started it.
    pub started_by: String,
    /// Start (ms).
    pub started_ts: i64,
    /// End (ms), if over.
    pub ended_ts: Option<i64>,
    /// Most members at once.
    pub peak_members: i64,
    /// Current members.
    pub members: Vec<CallMemberView>,
}

/// A current call member.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CallMemberView {
    /// The user.
    pub user_id: String,
    /// The device.
    pub device_id: String,
    /// The membership ID.
    pub membership_id: String,
    /// Joined (ms).
    pub joined_ts: i64,
    /// Expires (ms).
    pub expires_ts: Option<i64>,
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
    pub room_name: RoomName,
    /// LiveKit participant identity.
    pub identity: ParticipantIdentity,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Its effects were committed now, with these consequences for calls.
    Applied(Vec<CallChange>),
    /// Its txnId was already committed; nothing changed.
    Replayed,
}

/// Durable domain operations.
pub trait Store: Send + Sync + 'static {
    /// Applies `effects` and records `txn_id` (processed at `now_ms`) in one database
    /// transaction; a txnId already recorded changes nothing.
    fn apply_transaction(
        &self,
        txn_id: &str,
        effects: &[Effect],
        now_ms: i64,
    ) -> Result<TxnOutcome, StoreError>;

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

    /// Records (or replaces) the delayed leave of an issued SFU participant, handed over at
    /// `now_ms`.
    fn record_delayed_leave(&self, leave: &DelayedLeave, now_ms: i64) -> Result<(), StoreError>;

    /// The delayed leave recorded for a participant, if any.
    fn delayed_leave(
        &self,
        room_name: &RoomName,
        identity: &ParticipantIdentity,
    ) -> Result<Option<DelayedLeave>, StoreError>;

    /// Ends call memberships whose expiry is at or before `now_ms`.
    fn expire_call_members(&self, now_ms: i64) -> Result<Vec<CallChange>, StoreError>;

    /// Active calls with their members, by room.
    fn active_calls(&self) -> Result<Vec<CallView>, StoreError>;

    /// The content (JSON) of `room_id`'s latest `m.room.server_acl`, if one was seen.
    fn server_acl(&self, room_id: &ruma::RoomId) -> Result<Option<String>, StoreError>;

    /// Whether `room_id` is encrypted (its `rtc.member` events are unreadable).
    fn is_room_encrypted(&self, room_id: &ruma::RoomId) -> Result<bool, StoreError>;

    /// Whether `user_id`'s `device_id` is an active member of a call in `room_id`.
    fn is_call_member(
        &self,
        room_id: &ruma::RoomId,
        user_id: &ruma::UserId,
        device_id: &str,
    ) -> Result<bool, StoreError>;

    /// How many times the membership event `event_id` was applied (0 or 1 unless a bug).
    fn membership_event_applications(&self, event_id: &ruma::EventId) -> Result<u64, StoreError>;

    /// Number of transactions applied so far.
    fn processed_transactions(&self) -> Result<u64, StoreError>;

    /// Deletes history older than `before_ms`: processed transaction ids (and their membership
    /// log), calls that ended and their members. Current state (memberships, active calls,
    /// delayed leaves) is never touched.
    fn prune_history(&self, before_ms: i64) -> Result<Pruned, StoreError>;
}

/// What [`Store::prune_history`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Processed transaction ids.
    pub transactions: u64,
    /// Ended calls.
    pub calls: u64,
    /// Members of those calls.
    pub call_members: u64,
}

impl Pruned {
    /// Whether nothing was deleted.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
