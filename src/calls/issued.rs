//! Who each SFU identity issued by the token service belongs to, so Matrix can decide who
//! stays in the SFU: when a user stops being joined to a room (leave, kick, ban) or their call
//! membership ends, every participant issued to them is removed.
//!
//! Bounded: an identity is kept while its participant is connected, and otherwise only until
//! its token expires (a LiveKit SDK may rejoin with the same token after a drop) or its call
//! ends, whichever comes first; never more than [`PENDING_CAPACITY`] unconnected identities.
//! Time is an input.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use crate::plumbing::TtlCache;
use crate::sfu::ids::{ParticipantIdentity, ParticipantSid, RoomName};

/// Most identities kept that are issued but not connected.
pub const PENDING_CAPACITY: usize = 50_000;

/// Who an issued SFU identity belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedParticipant {
    /// LiveKit room name.
    pub room_name: RoomName,
    /// LiveKit identity.
    pub identity: ParticipantIdentity,
    /// The Matrix room of the call.
    pub room_id: OwnedRoomId,
    /// The Matrix user.
    pub user_id: OwnedUserId,
    /// The (claimed) device.
    pub device_id: String,
}

type Key = (RoomName, ParticipantIdentity);

#[derive(Debug, Clone)]
struct Connected {
    participant: IssuedParticipant,
    sid: ParticipantSid,
    token_expires: Instant,
}

#[derive(Debug)]
struct Inner {
    connected: HashMap<Key, Connected>,
    /// Issued and not connected (yet, or any more), until the token expires.
    pending: TtlCache<Key, (IssuedParticipant, Instant)>,
}

/// The issued identities. Shared by the token service (writes at issue time) and the calls
/// service (follows SFU joins and leaves, reads for enforcement).
#[derive(Debug)]
pub struct IssuedParticipants {
    inner: Mutex<Inner>,
}

impl Default for IssuedParticipants {
    fn default() -> Self {
        Self::with_capacity(PENDING_CAPACITY)
    }
}

impl IssuedParticipants {
    /// A map keeping at most `pending_capacity` unconnected identities.
    pub fn with_capacity(pending_capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                connected: HashMap::new(),
                pending: TtlCache::new(pending_capacity),
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// A token for `p` was issued at `now`, valid until `token_expires`.
    pub fn record(&self, p: IssuedParticipant, token_expires: Instant, now: Instant) {
        let key = (p.room_name.clone(), p.identity.clone());
        self.with(|m| match m.connected.get_mut(&key) {
            Some(c) => {
                c.participant = p;
                c.token_expires = c.token_expires.max(token_expires);
            }
            None => m
                .pending
                .insert_until(key, (p, token_expires), token_expires, now),
        });
    }

    /// The SFU session `sid` of `identity` joined `room`.
    pub fn joined(&self, room: &RoomName, identity: &ParticipantIdentity, sid: &ParticipantSid) {
        let key = (room.clone(), identity.clone());
        self.with(|m| {
            if let Some(c) = m.connected.get_mut(&key) {
                c.sid = sid.clone();
            } else if let Some((participant, token_expires)) = m.pending.remove(&key) {
                m.connected.insert(
                    key,
                    Connected {
                        participant,
                        sid: sid.clone(),
                        token_expires,
                    },
                );
            }
        });
    }

    /// The SFU session `sid` of `identity` left `room` at `now`. A newer session of the same
    /// identity (which replaced it) keeps the entry.
    pub fn left(
        &self,
        room: &RoomName,
        identity: &ParticipantIdentity,
        sid: &ParticipantSid,
        now: Instant,
    ) {
        let key = (room.clone(), identity.clone());
        self.with(|m| {
            if m.connected.get(&key).is_some_and(|c| &c.sid == sid) {
                if let Some(c) = m.connected.remove(&key) {
                    m.pending.insert_until(
                        key,
                        (c.participant, c.token_expires),
                        c.token_expires,
                        now,
                    );
                }
            }
        });
    }

    /// The call in `room_id` ended: identities issued for it that are not connected go.
    pub fn call_ended(&self, room_id: &RoomId, now: Instant) {
        self.with(|m| m.pending.retain(now, |_, (p, _)| p.room_id != room_id));
    }

    /// The issued participants of `user_id` in `room_id` at `now`.
    pub fn of(&self, room_id: &RoomId, user_id: &UserId, now: Instant) -> Vec<IssuedParticipant> {
        let matches = |p: &IssuedParticipant| p.room_id == room_id && p.user_id == user_id;
        self.with(|m| {
            m.connected
                .values()
                .map(|c| &c.participant)
                .chain(m.pending.values(now).map(|(p, _)| p))
                .filter(|p| matches(p))
                .cloned()
                .collect()
        })
    }

    /// The issued participants of one device of `user_id` in `room_id` at `now`.
    pub fn of_device(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        device_id: &str,
        now: Instant,
    ) -> Vec<IssuedParticipant> {
        self.of(room_id, user_id, now)
            .into_iter()
            .filter(|p| p.device_id == device_id)
            .collect()
    }

    /// Who `identity` in `room` was issued to, if Conclave issued it.
    pub fn get(
        &self,
        room: &RoomName,
        identity: &ParticipantIdentity,
        now: Instant,
    ) -> Option<IssuedParticipant> {
        let key = (room.clone(), identity.clone());
        self.with(|m| {
            m.connected
                .get(&key)
                .map(|c| c.participant.clone())
                .or_else(|| m.pending.get(&key, now).map(|(p, _)| p))
        })
    }

    /// Identities held (connected plus pending, expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.with(|m| m.connected.len() + m.pending.len())
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn issued(room: &str, identity: &str, user: &OwnedUserId) -> IssuedParticipant {
        IssuedParticipant {
            room_name: room.into(),
            identity: identity.into(),
            room_id: ruma::owned_room_id!("!r:example.org"),
            user_id: user.clone(),
            device_id: "D".into(),
        }
    }

    #[test]
    fn issued_participants_are_found_by_room_and_user() {
        let t0 = Instant::now();
        let exp = t0 + Duration::from_secs(3600);
        let reg = IssuedParticipants::default();
        let room = ruma::owned_room_id!("!r:example.org");
        let alice = ruma::owned_user_id!("@alice:example.org");
        let bob = ruma::owned_user_id!("@bob:example.org");
        for (identity, user) in [("a1", &alice), ("a2", &alice), ("b1", &bob)] {
            reg.record(issued("sfu", identity, user), exp, t0);
        }
        reg.joined(&"sfu".into(), &"a2".into(), &"PA_1".into());
        let mut ids: Vec<String> = reg
            .of(&room, &alice, t0)
            .into_iter()
            .map(|p| p.identity.into_string())
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["a1", "a2"], "pending and connected both count");
        let b1 = reg.get(&"sfu".into(), &"b1".into(), t0).expect("b1");
        assert_eq!(b1.user_id, bob);
        assert!(reg
            .of(&ruma::owned_room_id!("!x:example.org"), &alice, t0)
            .is_empty());
        assert!(
            reg.get(&"sfu".into(), &"b1".into(), exp).is_none(),
            "an unused token's identity is gone when the token expires"
        );
    }

    #[test]
    fn a_replaced_session_leaving_keeps_the_new_one() {
        let t0 = Instant::now();
        let reg = IssuedParticipants::default();
        let alice = ruma::owned_user_id!("@alice:example.org");
        reg.record(issued("sfu", "a", &alice), t0 + Duration::from_secs(60), t0);
        let (room, id) = (RoomName::from("sfu"), ParticipantIdentity::from("a"));
        reg.joined(&room, &id, &"PA_old".into());
        reg.joined(&room, &id, &"PA_new".into());
        reg.left(&room, &id, &"PA_old".into(), t0);
        // Far past the token's expiry: only a connected entry can still be there.
        let later = t0 + Duration::from_secs(3600);
        assert!(
            reg.get(&room, &id, later).is_some(),
            "the new session is connected"
        );
        reg.left(&room, &id, &"PA_new".into(), later);
        assert!(reg.get(&room, &id, later).is_none());
    }

    /// 10 000 participants, one per millisecond from `t0`: token, join, leave. Returns the
    /// largest size the map reached.
    fn churn(reg: &IssuedParticipants, t0: Instant, lifetime: Duration) -> usize {
        let room = RoomName::from("sfu-room");
        let mut peak = 0;
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            let user = ruma::UserId::parse(format!("@u{i}:example.org")).expect("user");
            let identity = ParticipantIdentity::from(format!("id{i}"));
            let sid = ParticipantSid::from(format!("PA_{i}"));
            reg.record(
                issued("sfu-room", identity.as_str(), &user),
                now + lifetime,
                now,
            );
            reg.joined(&room, &identity, &sid);
            reg.left(&room, &identity, &sid, now);
            peak = peak.max(reg.len());
        }
        peak
    }

    /// The acceptance check of the owned-services issue: 10 000 participants churn through one
    /// room (token, join, leave) and the map comes back to its resting size: at once for the
    /// ones whose call ended, after their tokens expire for the others, and never above its
    /// bound meanwhile.
    #[test]
    fn churning_ten_thousand_participants_returns_to_the_resting_size() {
        let t0 = Instant::now();
        let lifetime = Duration::from_secs(3600);
        let reg = IssuedParticipants::with_capacity(1_000);
        let room = RoomName::from("sfu-room");
        let host = ruma::owned_user_id!("@host:example.org");
        // Resting state: one participant who stays connected throughout.
        reg.record(issued("sfu-room", "host", &host), t0 + lifetime, t0);
        reg.joined(&room, &"host".into(), &"PA_host".into());
        let resting = reg.len();
        assert_eq!(resting, 1);

        let peak = churn(&reg, t0, lifetime);
        assert!(
            peak <= resting + 1_000,
            "bounded while churning: peak {peak}"
        );
        let after = t0 + Duration::from_secs(10);
        // Their call ends: every identity that is not connected goes at once.
        reg.call_ended(&ruma::owned_room_id!("!r:example.org"), after);
        assert_eq!(
            reg.len(),
            resting,
            "back at the resting size after the call ends"
        );
        assert!(
            reg.get(&room, &"host".into(), after).is_some(),
            "the host stays"
        );

        // Without the call ending, the tokens' expiry brings it back too.
        let reg = IssuedParticipants::with_capacity(1_000);
        assert!(churn(&reg, t0, lifetime) <= 1_000);
        reg.call_ended(
            &ruma::owned_room_id!("!other:example.org"),
            t0 + lifetime * 2,
        );
        assert_eq!(reg.len(), 0, "expired tokens' identities are dropped");
    }
}
