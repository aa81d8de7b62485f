//! The call lifecycle rules, in Rust: SQL only stores and queries (see [`CallLedger`]).
//!
//! - A membership that moves to another call leaves the old one first.
//! - The first member of a call starts it ([`CallChange::Started`]).
//! - A call's peak is the most members it had at once.
//! - A member leaving says so ([`CallChange::MemberLeft`]); the last one ends the call
//!   ([`CallChange::Ended`]), never before it started.
//! - A room membership other than `join` ends that user's call memberships in the room.

use ruma::events::room::member::MembershipState;
use ruma::{OwnedUserId, RoomId, UserId};

use super::{CallChange, CallMemberJoin, MembershipRecord, StoreError};

/// An active call member as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveMember {
    /// Its call.
    pub call_key: i64,
    /// The member.
    pub user_id: String,
    /// Its device.
    pub device_id: String,
}

/// A call's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSummary {
    /// Who started it.
    pub started_by: String,
    /// Start (ms).
    pub started_ts: i64,
    /// Most members at once.
    pub peak_members: i64,
}

/// The reads and writes the rules need, each one statement; the SQLite transaction implements
/// it, tests use a map.
pub trait CallLedger {
    /// The active membership of `member_key` in `room_id`.
    fn active_member(
        &mut self,
        room_id: &RoomId,
        member_key: &str,
    ) -> Result<Option<ActiveMember>, StoreError>;
    /// The active call of `(room, application, call_id)`.
    fn active_call(
        &mut self,
        room_id: &RoomId,
        application: &str,
        call_id: &str,
    ) -> Result<Option<i64>, StoreError>;
    /// Records a new call started by `j`'s member at `j.ts`; returns its key.
    fn insert_call(&mut self, j: &CallMemberJoin) -> Result<i64, StoreError>;
    /// Records (or refreshes) `j` as an active member of `call_key`.
    fn upsert_member(&mut self, call_key: i64, j: &CallMemberJoin) -> Result<(), StoreError>;
    /// Marks `member_key` of `call_key` as left at `ts`.
    fn mark_left(&mut self, call_key: i64, member_key: &str, ts: i64) -> Result<(), StoreError>;
    /// Active members of `call_key`.
    fn active_count(&mut self, call_key: i64) -> Result<i64, StoreError>;
    /// The call's summary.
    fn summary(&mut self, call_key: i64) -> Result<CallSummary, StoreError>;
    /// Sets the call's peak.
    fn set_peak(&mut self, call_key: i64, peak: i64) -> Result<(), StoreError>;
    /// Ends the call at `ended_ts`.
    fn end_call(&mut self, call_key: i64, ended_ts: i64) -> Result<(), StoreError>;
    /// Member keys of `user_id`'s active memberships in `room_id`.
    fn active_keys_of(
        &mut self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Vec<String>, StoreError>;
}

/// A member joined (or refreshed) a call.
pub fn member_joined(
    ledger: &mut impl CallLedger,
    j: &CallMemberJoin,
) -> Result<Vec<CallChange>, StoreError> {
    let mut changes = Vec::new();
    let current = ledger.active_member(&j.room_id, &j.member_key)?;
    let existing = ledger.active_call(&j.room_id, &j.application, &j.call_id)?;
    if let Some(cur) = current {
        if Some(cur.call_key) != existing {
            changes.extend(member_left(ledger, &j.room_id, &j.member_key, j.ts)?);
        }
    }
    let call_key = match existing {
        Some(k) => k,
        None => {
            changes.push(CallChange::Started {
                room_id: j.room_id.clone(),
                started_by: j.user_id.clone(),
            });
            ledger.insert_call(j)?
        }
    };
    ledger.upsert_member(call_key, j)?;
    let members = ledger.active_count(call_key)?;
    if members > ledger.summary(call_key)?.peak_members {
        ledger.set_peak(call_key, members)?;
    }
    Ok(changes)
}

/// A membership ended at `ts` (leave event, expiry, room membership lost).
pub fn member_left(
    ledger: &mut impl CallLedger,
    room_id: &RoomId,
    member_key: &str,
    ts: i64,
) -> Result<Vec<CallChange>, StoreError> {
    let Some(member) = ledger.active_member(room_id, member_key)? else {
        return Ok(Vec::new());
    };
    ledger.mark_left(member.call_key, member_key, ts)?;
    let mut changes = Vec::new();
    if let Ok(user_id) = OwnedUserId::try_from(member.user_id.as_str()) {
        changes.push(CallChange::MemberLeft {
            room_id: room_id.to_owned(),
            user_id,
            device_id: member.device_id,
        });
    }
    if ledger.active_count(member.call_key)? == 0 {
        let call = ledger.summary(member.call_key)?;
        let ended_ts = ts.max(call.started_ts);
        ledger.end_call(member.call_key, ended_ts)?;
        changes.push(CallChange::Ended {
            room_id: room_id.to_owned(),
            started_by: call.started_by,
            started_ts: call.started_ts,
            ended_ts,
            peak_members: call.peak_members,
        });
    }
    Ok(changes)
}

/// A room membership changed: anything but `join` ends the user's call memberships there.
pub fn membership_changed(
    ledger: &mut impl CallLedger,
    m: &MembershipRecord,
) -> Result<Vec<CallChange>, StoreError> {
    if m.membership == MembershipState::Join {
        return Ok(Vec::new());
    }
    let ts = i64::try_from(u64::from(m.origin_server_ts.0)).unwrap_or(i64::MAX);
    let mut changes = Vec::new();
    for key in ledger.active_keys_of(&m.room_id, &m.user_id)? {
        changes.extend(member_left(ledger, &m.room_id, &key, ts)?);
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{owned_room_id, owned_user_id, OwnedRoomId};
    use std::collections::BTreeMap;

    /// The ledger as plain maps: what the rules decide, without SQL.
    #[derive(Default)]
    struct MapLedger {
        calls: BTreeMap<i64, (OwnedRoomId, String, String, CallSummary, Option<i64>)>,
        /// (call, member key) → (user, device, left)
        members: BTreeMap<(i64, String), (String, String, Option<i64>)>,
    }

    impl CallLedger for MapLedger {
        fn active_member(
            &mut self,
            room_id: &RoomId,
            member_key: &str,
        ) -> Result<Option<ActiveMember>, StoreError> {
            Ok(self
                .members
                .iter()
                .find(|((call, key), (_, _, left))| {
                    key == member_key && left.is_none() && self.calls[call].0 == room_id
                })
                .map(|((call, _), (user, device, _))| ActiveMember {
                    call_key: *call,
                    user_id: user.clone(),
                    device_id: device.clone(),
                }))
        }
        fn active_call(
            &mut self,
            room_id: &RoomId,
            application: &str,
            call_id: &str,
        ) -> Result<Option<i64>, StoreError> {
            Ok(self
                .calls
                .iter()
                .find(|(_, (r, a, c, _, ended))| {
                    r == room_id && a == application && c == call_id && ended.is_none()
                })
                .map(|(k, _)| *k))
        }
        fn insert_call(&mut self, j: &CallMemberJoin) -> Result<i64, StoreError> {
            let key = self.calls.len() as i64 + 1;
            let summary = CallSummary {
                started_by: j.user_id.to_string(),
                started_ts: j.ts,
                peak_members: 0,
            };
            self.calls.insert(
                key,
                (
                    j.room_id.clone(),
                    j.application.clone(),
                    j.call_id.clone(),
                    summary,
                    None,
                ),
            );
            Ok(key)
        }
        fn upsert_member(&mut self, call_key: i64, j: &CallMemberJoin) -> Result<(), StoreError> {
            self.members.insert(
                (call_key, j.member_key.clone()),
                (j.user_id.to_string(), j.device_id.clone(), None),
            );
            Ok(())
        }
        fn mark_left(&mut self, call_key: i64, key: &str, ts: i64) -> Result<(), StoreError> {
            if let Some(m) = self.members.get_mut(&(call_key, key.to_owned())) {
                m.2 = Some(ts);
            }
            Ok(())
        }
        fn active_count(&mut self, call_key: i64) -> Result<i64, StoreError> {
            Ok(self
                .members
                .iter()
                .filter(|((c, _), (_, _, left))| *c == call_key && left.is_none())
                .count() as i64)
        }
        fn summary(&mut self, call_key: i64) -> Result<CallSummary, StoreError> {
            Ok(self.calls[&call_key].3.clone())
        }
        fn set_peak(&mut self, call_key: i64, peak: i64) -> Result<(), StoreError> {
            if let Some(c) = self.calls.get_mut(&call_key) {
                c.3.peak_members = peak;
            }
            Ok(())
        }
        fn end_call(&mut self, call_key: i64, ended_ts: i64) -> Result<(), StoreError> {
            if let Some(c) = self.calls.get_mut(&call_key) {
                c.4 = Some(ended_ts);
            }
            Ok(())
        }
        fn active_keys_of(
            &mut self,
            room_id: &RoomId,
            user_id: &UserId,
        ) -> Result<Vec<String>, StoreError> {
            Ok(self
                .members
                .iter()
                .filter(|((c, _), (u, _, left))| {
                    u == user_id.as_str() && left.is_none() && self.calls[c].0 == room_id
                })
                .map(|((_, k), _)| k.clone())
                .collect())
        }
    }

    fn join(user: &str, key: &str, call_id: &str, ts: i64) -> CallMemberJoin {
        CallMemberJoin {
            room_id: owned_room_id!("!r:x"),
            application: "m.call".into(),
            call_id: call_id.into(),
            member_key: key.into(),
            user_id: OwnedUserId::try_from(user).unwrap(),
            device_id: "D".into(),
            membership_id: key.into(),
            focus_active: "{}".into(),
            foci_preferred: "[]".into(),
            event_id: format!("${key}{ts}"),
            ts,
            expires_ts: None,
        }
    }

    #[test]
    fn first_member_starts_last_member_ends_with_the_peak() {
        let mut l = MapLedger::default();
        let room = owned_room_id!("!r:x");
        let started = member_joined(&mut l, &join("@a:x", "ka", "", 100)).unwrap();
        assert!(
            matches!(&started[..], [CallChange::Started { started_by, .. }] if started_by == "@a:x")
        );
        assert!(member_joined(&mut l, &join("@b:x", "kb", "", 200))
            .unwrap()
            .is_empty());
        // A refresh is not a new member.
        assert!(member_joined(&mut l, &join("@b:x", "kb", "", 250))
            .unwrap()
            .is_empty());
        let left = member_left(&mut l, &room, "ka", 300).unwrap();
        assert!(matches!(&left[..], [CallChange::MemberLeft { .. }]));
        let ended = member_left(&mut l, &room, "kb", 400).unwrap();
        assert!(
            matches!(
                &ended[..],
                [
                    CallChange::MemberLeft { .. },
                    CallChange::Ended {
                        started_ts: 100,
                        ended_ts: 400,
                        peak_members: 2,
                        ..
                    }
                ]
            ),
            "{ended:?}"
        );
        assert!(
            member_left(&mut l, &room, "kb", 500).unwrap().is_empty(),
            "left once"
        );
    }

    #[test]
    fn moving_to_another_call_leaves_the_old_one_and_ends_never_precede_starts() {
        let mut l = MapLedger::default();
        member_joined(&mut l, &join("@a:x", "ka", "", 1000)).unwrap();
        let moved = member_joined(&mut l, &join("@a:x", "ka", "other", 500)).unwrap();
        assert!(
            matches!(
                &moved[..],
                [
                    CallChange::MemberLeft { .. },
                    CallChange::Ended {
                        started_ts: 1000,
                        ended_ts: 1000,
                        ..
                    },
                    CallChange::Started { .. }
                ]
            ),
            "{moved:?}"
        );
    }

    #[test]
    fn losing_room_membership_ends_call_memberships() {
        let mut l = MapLedger::default();
        member_joined(&mut l, &join("@a:x", "ka", "", 1)).unwrap();
        member_joined(&mut l, &join("@a:x", "ka2", "", 2)).unwrap();
        member_joined(&mut l, &join("@b:x", "kb", "", 3)).unwrap();
        let ban = MembershipRecord {
            room_id: owned_room_id!("!r:x"),
            user_id: owned_user_id!("@a:x"),
            membership: MembershipState::Ban,
            event_id: ruma::owned_event_id!("$ban"),
            origin_server_ts: ruma::MilliSecondsSinceUnixEpoch(ruma::uint!(10)),
        };
        let changes = membership_changed(&mut l, &ban).unwrap();
        let left = changes
            .iter()
            .filter(|c| matches!(c, CallChange::MemberLeft { user_id, .. } if user_id == "@a:x"))
            .count();
        assert_eq!(left, 2, "{changes:?}");
        assert!(
            !changes
                .iter()
                .any(|c| matches!(c, CallChange::Ended { .. })),
            "bob stays"
        );
        let mut join_again = ban.clone();
        join_again.membership = MembershipState::Join;
        assert!(membership_changed(&mut l, &join_again).unwrap().is_empty());
    }
}
