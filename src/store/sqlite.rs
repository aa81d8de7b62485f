//! [`Store`] on SQLite: WAL, `synchronous=FULL`, numbered migrations tracked by
//! `PRAGMA user_version`, one connection behind a mutex.

use std::path::Path;
use std::sync::Mutex;

use crate::sfu::ids::{ParticipantIdentity, RoomName};
use ruma::events::room::member::MembershipState;
use ruma::{EventId, MilliSecondsSinceUnixEpoch, RoomId, UInt, UserId};
use rusqlite::{params, Connection, OptionalExtension};

use super::lifecycle::{self, ActiveMember, CallLedger, CallSummary};
use super::{
    CallChange, CallMemberJoin, CallMemberView, CallView, DelayedLeave, Effect, MembershipRecord,
    Pruned, Store, StoreError, TxnOutcome,
};

/// Migrations, applied in order; migration `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_issued_participants.sql"),
    include_str!("migrations/0003_calls.sql"),
    include_str!("migrations/0004_room_encryption.sql"),
    include_str!("migrations/0005_room_server_acl.sql"),
];

/// Fault injection for crash-safety tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// No fault.
    #[default]
    None,
    /// Abort the process after a transaction's effects are written but before the commit.
    AbortBeforeCommit,
}

/// The SQLite store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    fault: Fault,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::init(conn)
    }

    /// An in-memory database, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    /// Sets a fault to inject (tests only).
    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            fault: Fault::None,
        })
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        f(&mut guard)
    }
}

/// The newest schema version this binary knows.
pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let supported = schema_version();
    if current > supported {
        return Err(StoreError::TooNew {
            found: current,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied database migration");
    }
    Ok(())
}

fn ts_to_i64(ts: MilliSecondsSinceUnixEpoch) -> i64 {
    i64::try_from(u64::from(ts.0)).unwrap_or(i64::MAX)
}

fn apply_membership(
    tx: &rusqlite::Transaction<'_>,
    txn_id: &str,
    m: &MembershipRecord,
) -> Result<(), StoreError> {
    let ts = ts_to_i64(m.origin_server_ts);
    tx.execute(
        "INSERT INTO room_user_membership
           (room_id, user_id, membership, event_id, origin_server_ts)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (room_id, user_id) DO UPDATE SET
           membership = excluded.membership,
           event_id = excluded.event_id,
           origin_server_ts = excluded.origin_server_ts",
        params![
            m.room_id.as_str(),
            m.user_id.as_str(),
            m.membership.as_str(),
            m.event_id.as_str(),
            ts
        ],
    )?;
    tx.execute(
        "INSERT INTO membership_event_log
           (txn_id, event_id, room_id, user_id, membership, origin_server_ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            txn_id,
            m.event_id.as_str(),
            m.room_id.as_str(),
            m.user_id.as_str(),
            m.membership.as_str(),
            ts
        ],
    )?;
    Ok(())
}

/// The lifecycle rules' reads and writes on one SQLite transaction.
struct TxLedger<'a, 'c>(&'a rusqlite::Transaction<'c>);

impl CallLedger for TxLedger<'_, '_> {
    fn active_member(
        &mut self,
        room_id: &RoomId,
        member_key: &str,
    ) -> Result<Option<ActiveMember>, StoreError> {
        Ok(self
            .0
            .query_row(
                "SELECT call_key, user_id, device_id FROM rtc_call_member
                 WHERE room_id = ?1 AND member_key = ?2 AND left_ts IS NULL",
                params![room_id.as_str(), member_key],
                |r| {
                    Ok(ActiveMember {
                        call_key: r.get(0)?,
                        user_id: r.get(1)?,
                        device_id: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    fn active_call(
        &mut self,
        room_id: &RoomId,
        application: &str,
        call_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        Ok(self
            .0
            .query_row(
                "SELECT call_key FROM rtc_call
                 WHERE room_id = ?1 AND application = ?2 AND call_id = ?3 AND ended_ts IS NULL",
                params![room_id.as_str(), application, call_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn insert_call(&mut self, j: &CallMemberJoin) -> Result<i64, StoreError> {
        self.0.execute(
            "INSERT INTO rtc_call (room_id, application, call_id, started_by, started_ts)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                j.room_id.as_str(),
                j.application,
                j.call_id,
                j.user_id.as_str(),
                j.ts
            ],
        )?;
        Ok(self.0.last_insert_rowid())
    }

    fn upsert_member(&mut self, call_key: i64, j: &CallMemberJoin) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO rtc_call_member
               (call_key, room_id, member_key, user_id, device_id, membership_id, focus_active,
                foci_preferred, event_id, joined_ts, expires_ts, left_ts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL)
             ON CONFLICT (call_key, member_key) DO UPDATE SET
               user_id = excluded.user_id, device_id = excluded.device_id,
               membership_id = excluded.membership_id, focus_active = excluded.focus_active,
               foci_preferred = excluded.foci_preferred, event_id = excluded.event_id,
               expires_ts = excluded.expires_ts,
               joined_ts = CASE WHEN rtc_call_member.left_ts IS NULL
                                THEN rtc_call_member.joined_ts ELSE excluded.joined_ts END,
               left_ts = NULL",
            params![
                call_key,
                j.room_id.as_str(),
                j.member_key,
                j.user_id.as_str(),
                j.device_id,
                j.membership_id,
                j.focus_active,
                j.foci_preferred,
                j.event_id,
                j.ts,
                j.expires_ts
            ],
        )?;
        Ok(())
    }

    fn mark_left(&mut self, call_key: i64, member_key: &str, ts: i64) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE rtc_call_member SET left_ts = ?3 WHERE call_key = ?1 AND member_key = ?2",
            params![call_key, member_key, ts],
        )?;
        Ok(())
    }

    fn active_count(&mut self, call_key: i64) -> Result<i64, StoreError> {
        Ok(self.0.query_row(
            "SELECT COUNT(*) FROM rtc_call_member WHERE call_key = ?1 AND left_ts IS NULL",
            [call_key],
            |r| r.get(0),
        )?)
    }

    fn summary(&mut self, call_key: i64) -> Result<CallSummary, StoreError> {
        Ok(self.0.query_row(
            "SELECT started_by, started_ts, peak_members FROM rtc_call WHERE call_key = ?1",
            [call_key],
            |r| {
                Ok(CallSummary {
                    started_by: r.get(0)?,
                    started_ts: r.get(1)?,
                    peak_members: r.get(2)?,
                })
            },
        )?)
    }

    fn set_peak(&mut self, call_key: i64, peak: i64) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE rtc_call SET peak_members = ?2 WHERE call_key = ?1",
            params![call_key, peak],
        )?;
        Ok(())
    }

    fn end_call(&mut self, call_key: i64, ended_ts: i64) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE rtc_call SET ended_ts = ?2 WHERE call_key = ?1",
            params![call_key, ended_ts],
        )?;
        Ok(())
    }

    fn active_keys_of(
        &mut self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT member_key FROM rtc_call_member
             WHERE room_id = ?1 AND user_id = ?2 AND left_ts IS NULL",
        )?;
        let rows = stmt.query_map(params![room_id.as_str(), user_id.as_str()], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn row_to_membership(row: &rusqlite::Row<'_>) -> Result<MembershipRecord, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        table: "room_user_membership",
        message,
    };
    let room_id: String = row.get(0)?;
    let user_id: String = row.get(1)?;
    let membership: String = row.get(2)?;
    let event_id: String = row.get(3)?;
    let ts: i64 = row.get(4)?;
    Ok(MembershipRecord {
        room_id: RoomId::parse(&room_id).map_err(|e| corrupt(format!("{room_id}: {e}")))?,
        user_id: UserId::parse(&user_id).map_err(|e| corrupt(format!("{user_id}: {e}")))?,
        membership: MembershipState::from(membership.as_str()),
        event_id: EventId::parse(&event_id).map_err(|e| corrupt(format!("{event_id}: {e}")))?,
        origin_server_ts: MilliSecondsSinceUnixEpoch(
            UInt::try_from(ts.max(0) as u64).unwrap_or(UInt::MAX),
        ),
    })
}

impl Store for SqliteStore {
    fn apply_transaction(
        &self,
        txn_id: &str,
        effects: &[Effect],
        now_ms: i64,
    ) -> Result<TxnOutcome, StoreError> {
        let fault = self.fault;
        self.with_conn(|conn| {
            let tx = conn.transaction()?;
            let seen: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM appservice_txn_processed WHERE txn_id = ?1",
                    [txn_id],
                    |r| r.get(0),
                )
                .optional()?;
            if seen.is_some() {
                return Ok(TxnOutcome::Replayed);
            }
            let mut changes = Vec::new();
            for effect in effects {
                match effect {
                    Effect::Membership(m) => {
                        apply_membership(&tx, txn_id, m)?;
                        changes.extend(lifecycle::membership_changed(&mut TxLedger(&tx), m)?);
                    }
                    Effect::SenderJoined(m) => {
                        tx.execute(
                            "INSERT INTO room_user_membership
                               (room_id, user_id, membership, event_id, origin_server_ts)
                             VALUES (?1, ?2, 'join', ?3, ?4)
                             ON CONFLICT (room_id, user_id) DO NOTHING",
                            params![
                                m.room_id.as_str(),
                                m.user_id.as_str(),
                                m.event_id.as_str(),
                                ts_to_i64(m.origin_server_ts)
                            ],
                        )?;
                    }
                    Effect::CallMemberJoined(j) => {
                        changes.extend(lifecycle::member_joined(&mut TxLedger(&tx), j)?)
                    }
                    Effect::RoomEncrypted {
                        room_id,
                        algorithm,
                        event_id,
                    } => {
                        tx.execute(
                            "INSERT INTO room_encryption (room_id, algorithm, event_id)
                             VALUES (?1, ?2, ?3)
                             ON CONFLICT (room_id) DO UPDATE SET algorithm = excluded.algorithm,
                               event_id = excluded.event_id",
                            params![room_id.as_str(), algorithm, event_id],
                        )?;
                    }
                    Effect::ServerAcl {
                        room_id,
                        content,
                        event_id,
                    } => {
                        tx.execute(
                            "INSERT INTO room_server_acl (room_id, content, event_id)
                             VALUES (?1, ?2, ?3)
                             ON CONFLICT (room_id) DO UPDATE SET content = excluded.content,
                               event_id = excluded.event_id",
                            params![room_id.as_str(), content, event_id],
                        )?;
                    }
                    Effect::CallMemberLeft {
                        room_id,
                        member_key,
                        ts,
                    } => changes.extend(lifecycle::member_left(
                        &mut TxLedger(&tx),
                        room_id,
                        member_key,
                        *ts,
                    )?),
                }
            }
            tx.execute(
                "INSERT INTO appservice_txn_processed (txn_id, event_count, processed_ts)
                 VALUES (?1, ?2, ?3)",
                params![txn_id, effects.len() as i64, now_ms],
            )?;
            if fault == Fault::AbortBeforeCommit {
                tracing::error!(txn_id, "fault injection: aborting before commit");
                std::process::abort();
            }
            tx.commit()?;
            Ok(TxnOutcome::Applied(changes))
        })
    }

    fn is_transaction_processed(&self, txn_id: &str) -> Result<bool, StoreError> {
        self.with_conn(|conn| {
            let seen: Option<i64> = conn
                .query_row(
                    "SELECT 1 FROM appservice_txn_processed WHERE txn_id = ?1",
                    [txn_id],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(seen.is_some())
        })
    }

    fn membership(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Option<MembershipRecord>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT room_id, user_id, membership, event_id, origin_server_ts
                 FROM room_user_membership WHERE room_id = ?1 AND user_id = ?2",
            )?;
            let mut rows = stmt.query(params![room_id.as_str(), user_id.as_str()])?;
            match rows.next()? {
                Some(row) => Ok(Some(row_to_membership(row)?)),
                None => Ok(None),
            }
        })
    }

    fn room_known(&self, room_id: &RoomId) -> Result<bool, StoreError> {
        self.with_conn(|conn| {
            let seen: Option<i64> = conn
                .query_row(
                    "SELECT 1 FROM room_user_membership WHERE room_id = ?1 LIMIT 1",
                    [room_id.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(seen.is_some())
        })
    }

    fn room_memberships(&self, room_id: &RoomId) -> Result<Vec<MembershipRecord>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT room_id, user_id, membership, event_id, origin_server_ts
                 FROM room_user_membership WHERE room_id = ?1 ORDER BY user_id",
            )?;
            let mut rows = stmt.query([room_id.as_str()])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(row_to_membership(row)?);
            }
            Ok(out)
        })
    }

    fn record_delayed_leave(&self, d: &DelayedLeave, now_ms: i64) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            conn.execute(
                "INSERT INTO sfu_participant_delayed_leave
                   (room_name, identity, matrix_room_id, user_id, device_id, delay_id,
                    delay_timeout_ms, issued_ts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (room_name, identity) DO UPDATE SET
                   matrix_room_id = excluded.matrix_room_id, user_id = excluded.user_id,
                   device_id = excluded.device_id, delay_id = excluded.delay_id,
                   delay_timeout_ms = excluded.delay_timeout_ms, issued_ts = excluded.issued_ts",
                params![
                    d.room_name.as_str(),
                    d.identity.as_str(),
                    d.matrix_room_id.as_str(),
                    d.user_id.as_str(),
                    d.device_id,
                    d.delay_id,
                    i64::try_from(d.delay_timeout_ms).unwrap_or(i64::MAX),
                    now_ms
                ],
            )?;
            Ok(())
        })
    }

    fn delayed_leave(
        &self,
        room_name: &RoomName,
        identity: &ParticipantIdentity,
    ) -> Result<Option<DelayedLeave>, StoreError> {
        self.with_conn(|conn| {
            let row = conn
                .query_row(
                    "SELECT matrix_room_id, user_id, device_id, delay_id, delay_timeout_ms
                     FROM sfu_participant_delayed_leave WHERE room_name = ?1 AND identity = ?2",
                    params![room_name.as_str(), identity.as_str()],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, i64>(4)?,
                        ))
                    },
                )
                .optional()?;
            let Some((room, user, device, delay_id, timeout)) = row else {
                return Ok(None);
            };
            let corrupt = |message: String| StoreError::Corrupt {
                table: "sfu_participant_delayed_leave",
                message,
            };
            Ok(Some(DelayedLeave {
                room_name: room_name.clone(),
                identity: identity.clone(),
                matrix_room_id: RoomId::parse(&room).map_err(|e| corrupt(e.to_string()))?,
                user_id: UserId::parse(&user).map_err(|e| corrupt(e.to_string()))?,
                device_id: device,
                delay_id,
                delay_timeout_ms: timeout.max(0) as u64,
            }))
        })
    }

    fn expire_call_members(&self, now_ms: i64) -> Result<Vec<CallChange>, StoreError> {
        self.with_conn(|conn| {
            let tx = conn.transaction()?;
            let expired: Vec<(String, String, i64)> = {
                let mut stmt = tx.prepare(
                    "SELECT room_id, member_key, expires_ts FROM rtc_call_member
                     WHERE left_ts IS NULL AND expires_ts IS NOT NULL AND expires_ts <= ?1",
                )?;
                let rows = stmt.query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut changes = Vec::new();
            for (room, key, at) in expired {
                let Ok(room_id) = RoomId::parse(&room) else {
                    continue;
                };
                changes.extend(lifecycle::member_left(
                    &mut TxLedger(&tx),
                    &room_id,
                    &key,
                    at,
                )?);
            }
            tx.commit()?;
            Ok(changes)
        })
    }

    fn active_calls(&self) -> Result<Vec<CallView>, StoreError> {
        self.with_conn(|conn| {
            let mut calls: Vec<(i64, CallView)> = {
                let mut stmt = conn.prepare(
                    "SELECT call_key, room_id, application, call_id, started_by, started_ts,
                            ended_ts, peak_members
                     FROM rtc_call WHERE ended_ts IS NULL ORDER BY room_id, call_key",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        CallView {
                            room_id: r.get(1)?,
                            application: r.get(2)?,
                            call_id: r.get(3)?,
                            started_by: r.get(4)?,
                            started_ts: r.get(5)?,
                            ended_ts: r.get(6)?,
                            peak_members: r.get(7)?,
                            members: Vec::new(),
                        },
                    ))
                })?;
                rows.collect::<Result<_, _>>()?
            };
            let mut stmt = conn.prepare(
                "SELECT user_id, device_id, membership_id, joined_ts, expires_ts
                 FROM rtc_call_member WHERE call_key = ?1 AND left_ts IS NULL
                 ORDER BY user_id, device_id",
            )?;
            for (key, call) in &mut calls {
                let rows = stmt.query_map([*key], |r| {
                    Ok(CallMemberView {
                        user_id: r.get(0)?,
                        device_id: r.get(1)?,
                        membership_id: r.get(2)?,
                        joined_ts: r.get(3)?,
                        expires_ts: r.get(4)?,
                    })
                })?;
                call.members = rows.collect::<Result<_, _>>()?;
            }
            Ok(calls.into_iter().map(|(_, c)| c).collect())
        })
    }

    fn server_acl(&self, room_id: &RoomId) -> Result<Option<String>, StoreError> {
        self.with_conn(|conn| {
            Ok(conn
                .query_row(
                    "SELECT content FROM room_server_acl WHERE room_id = ?1",
                    [room_id.as_str()],
                    |r| r.get(0),
                )
                .optional()?)
        })
    }

    fn is_room_encrypted(&self, room_id: &RoomId) -> Result<bool, StoreError> {
        self.with_conn(|conn| {
            let hit: Option<i64> = conn
                .query_row(
                    "SELECT 1 FROM room_encryption WHERE room_id = ?1",
                    [room_id.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(hit.is_some())
        })
    }

    fn is_call_member(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        device_id: &str,
    ) -> Result<bool, StoreError> {
        self.with_conn(|conn| {
            let hit: Option<i64> = conn
                .query_row(
                    "SELECT 1 FROM rtc_call_member
                     WHERE room_id = ?1 AND user_id = ?2 AND device_id = ?3 AND left_ts IS NULL
                     LIMIT 1",
                    params![room_id.as_str(), user_id.as_str(), device_id],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(hit.is_some())
        })
    }

    fn membership_event_applications(&self, event_id: &EventId) -> Result<u64, StoreError> {
        self.with_conn(|conn| {
            let n: i64 = conn.query_row(
                "SELECT COUNT(*) FROM membership_event_log WHERE event_id = ?1",
                [event_id.as_str()],
                |r| r.get(0),
            )?;
            Ok(n.max(0) as u64)
        })
    }

    fn processed_transactions(&self) -> Result<u64, StoreError> {
        self.with_conn(|conn| {
            let n: i64 =
                conn.query_row("SELECT COUNT(*) FROM appservice_txn_processed", [], |r| {
                    r.get(0)
                })?;
            Ok(n.max(0) as u64)
        })
    }

    fn prune_history(&self, before_ms: i64) -> Result<Pruned, StoreError> {
        self.with_conn(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM membership_event_log WHERE txn_id IN
                   (SELECT txn_id FROM appservice_txn_processed WHERE processed_ts < ?1)",
                [before_ms],
            )?;
            let transactions = tx.execute(
                "DELETE FROM appservice_txn_processed WHERE processed_ts < ?1",
                [before_ms],
            )?;
            let ended =
                "SELECT call_key FROM rtc_call WHERE ended_ts IS NOT NULL AND ended_ts < ?1";
            let call_members = tx.execute(
                &format!("DELETE FROM rtc_call_member WHERE call_key IN ({ended})"),
                [before_ms],
            )?;
            let calls = tx.execute(
                &format!("DELETE FROM rtc_call WHERE call_key IN ({ended})"),
                [before_ms],
            )?;
            tx.commit()?;
            Ok(Pruned {
                transactions: transactions as u64,
                calls: calls as u64,
                call_members: call_members as u64,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{owned_event_id, owned_room_id, owned_user_id, uint};

    fn member(event: &str, membership: MembershipState) -> Effect {
        Effect::Membership(MembershipRecord {
            room_id: owned_room_id!("!room:example.org"),
            user_id: owned_user_id!("@alice:example.org"),
            membership,
            event_id: EventId::parse(event).expect("event id"),
            origin_server_ts: MilliSecondsSinceUnixEpoch(uint!(1000)),
        })
    }

    #[test]
    fn replayed_txn_is_applied_once() {
        let store = SqliteStore::open_in_memory().expect("open");
        let effects = [member("$a", MembershipState::Join)];
        assert_eq!(
            store.apply_transaction("t1", &effects, 0).expect("apply"),
            TxnOutcome::Applied(Vec::new())
        );
        assert_eq!(
            store.apply_transaction("t1", &effects, 0).expect("replay"),
            TxnOutcome::Replayed
        );
        assert_eq!(
            store
                .membership_event_applications(&owned_event_id!("$a"))
                .expect("count"),
            1
        );
        assert_eq!(store.processed_transactions().expect("count"), 1);
    }

    #[test]
    fn latest_membership_wins() {
        let store = SqliteStore::open_in_memory().expect("open");
        store
            .apply_transaction("t1", &[member("$a", MembershipState::Join)], 0)
            .expect("apply");
        store
            .apply_transaction("t2", &[member("$b", MembershipState::Ban)], 0)
            .expect("apply");
        let m = store
            .membership(
                &owned_room_id!("!room:example.org"),
                &owned_user_id!("@alice:example.org"),
            )
            .expect("query")
            .expect("present");
        assert_eq!(m.membership, MembershipState::Ban);
        assert_eq!(m.event_id, owned_event_id!("$b"));
    }

    #[test]
    fn sender_evidence_never_overrides_explicit_membership() {
        let store = SqliteStore::open_in_memory().expect("open");
        let room = owned_room_id!("!room:example.org");
        let alice = owned_user_id!("@alice:example.org");
        let bob = owned_user_id!("@bob:example.org");
        let membership_of = |user: &ruma::UserId| {
            store
                .membership(&room, user)
                .expect("query")
                .expect("present")
        };
        let evidence = |user: &ruma::UserId, event: &str| {
            Effect::SenderJoined(MembershipRecord {
                room_id: room.clone(),
                user_id: user.to_owned(),
                membership: MembershipState::Join,
                event_id: EventId::parse(event).expect("event id"),
                origin_server_ts: MilliSecondsSinceUnixEpoch(uint!(2000)),
            })
        };
        // alice was banned; a later event of hers (sent before the ban reached us) must not
        // bring her back.
        store
            .apply_transaction("t1", &[member("$ban", MembershipState::Ban)], 0)
            .expect("apply");
        store
            .apply_transaction("t2", &[evidence(&alice, "$late")], 0)
            .expect("apply");
        let m = membership_of(&alice);
        assert_eq!(
            (m.membership, m.event_id),
            (MembershipState::Ban, owned_event_id!("$ban"))
        );
        // bob joined before this server took part: his first event is the evidence...
        store
            .apply_transaction("t3", &[evidence(&bob, "$callmember")], 0)
            .expect("apply");
        let m = membership_of(&bob);
        assert_eq!(m.membership, MembershipState::Join);
        // ...until an explicit membership event replaces it.
        let leave = Effect::Membership(MembershipRecord {
            room_id: room.clone(),
            user_id: bob.clone(),
            membership: MembershipState::Leave,
            event_id: owned_event_id!("$leave"),
            origin_server_ts: MilliSecondsSinceUnixEpoch(uint!(3000)),
        });
        store.apply_transaction("t4", &[leave], 0).expect("apply");
        store
            .apply_transaction("t5", &[evidence(&bob, "$stale")], 0)
            .expect("apply");
        let m = membership_of(&bob);
        assert_eq!(m.membership, MembershipState::Leave);
    }

    fn call_join(key: &str, room: &str, ts: i64) -> Effect {
        Effect::CallMemberJoined(CallMemberJoin {
            room_id: RoomId::parse(room).expect("room id"),
            application: "m.call".into(),
            call_id: String::new(),
            member_key: key.into(),
            user_id: owned_user_id!("@alice:example.org"),
            device_id: "DEV".into(),
            membership_id: key.into(),
            focus_active: "{}".into(),
            foci_preferred: "[]".into(),
            event_id: format!("$join-{key}"),
            ts,
            expires_ts: None,
        })
    }

    fn call_leave(key: &str, room: &str, ts: i64) -> Effect {
        Effect::CallMemberLeft {
            room_id: RoomId::parse(room).expect("room id"),
            member_key: key.into(),
            ts,
        }
    }

    /// History older than the cut-off goes (transaction ids with their membership log, ended
    /// calls with their members); current state and newer history stay, and a pruned
    /// transaction id is still answered once applied again (it is new to the store).
    #[test]
    fn prune_history_deletes_old_history_only() {
        let store = SqliteStore::open_in_memory().expect("open");
        let (old_room, live_room) = ("!old:example.org", "!live:example.org");
        store
            .apply_transaction("t-old", &[member("$a", MembershipState::Join)], 1_000)
            .expect("apply");
        store
            .apply_transaction("t-call", &[call_join("k1", old_room, 1_000)], 1_000)
            .expect("apply");
        store
            .apply_transaction("t-end", &[call_leave("k1", old_room, 2_000)], 2_000)
            .expect("apply");
        store
            .apply_transaction("t-live", &[call_join("k2", live_room, 1_500)], 1_500)
            .expect("apply");
        store
            .apply_transaction("t-new", &[member("$b", MembershipState::Leave)], 9_000)
            .expect("apply");
        assert_eq!(store.active_calls().expect("calls").len(), 1);

        let pruned = store.prune_history(5_000).expect("prune");
        assert_eq!(
            pruned,
            Pruned {
                transactions: 4,
                calls: 1,
                call_members: 1,
            }
        );
        assert_eq!(store.processed_transactions().expect("count"), 1);
        assert!(store.is_transaction_processed("t-new").expect("query"));
        assert!(!store.is_transaction_processed("t-old").expect("query"));
        assert_eq!(
            store
                .membership_event_applications(&owned_event_id!("$a"))
                .expect("count"),
            0
        );
        // Current state stays: the latest membership and the call still going.
        let m = store
            .membership(
                &owned_room_id!("!room:example.org"),
                &owned_user_id!("@alice:example.org"),
            )
            .expect("query")
            .expect("present");
        assert_eq!(m.event_id, owned_event_id!("$b"));
        let calls = store.active_calls().expect("calls");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].room_id, live_room);
        assert_eq!(calls[0].members.len(), 1);
        assert!(store.prune_history(5_000).expect("again").is_empty());
    }

    #[test]
    fn reopen_keeps_data_and_schema_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        {
            let store = SqliteStore::open(&path).expect("open");
            store
                .apply_transaction("t1", &[member("$a", MembershipState::Join)], 0)
                .expect("apply");
        }
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.processed_transactions().expect("count"), 1);
        let conn = Connection::open(&path).expect("raw");
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(v, schema_version());
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let conn = Connection::open(&path).expect("raw");
        conn.pragma_update(None, "user_version", 99).expect("set");
        drop(conn);
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
