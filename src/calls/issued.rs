//! Who each SFU identity issued by the token service belongs to, so Matrix can decide who
//! stays in the SFU: when a user stops being joined to a room (leave, kick, ban) or their call
//! membership ends, every participant issued to them is removed.
//!
//! Bounded: an identity is kept while its participant is connected, and otherwise only while a
//! token for it may still be valid: until its token expires, or, once it has been connected,
//! for one token lifetime after it left (connected participants are sent refreshed tokens, and
//! a LiveKit SDK rejoins with the token it holds after a network drop: such a rejoin must stay
//! enforceable, and subject to the grace period). Never more than [`PENDING_CAPACITY`]
//! unconnected identities. Time is an input.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// A relay granted to a peer Conclave (`docs/cascade.md`): `user_id` is the peer's bot,
    /// and the relay belongs while a member of its server is joined to the room.
    pub relay: bool,
}

type Key = (RoomName, ParticipantIdentity);

/// An issued identity and how long its tokens are valid.
#[derive(Debug, Clone)]
struct Entry {
    participant: IssuedParticipant,
    /// When the latest token issued for it expires.
    token_expires: Instant,
    /// How long a token (and a refreshed one) is valid.
    lifetime: Duration,
}

#[derive(Debug)]
struct Inner {
    /// Connected now, with the SFU session's participant SID.
    connected: HashMap<Key, (Entry, ParticipantSid)>,
    /// Issued and not connected (yet, or any more), while a token may still be valid.
    pending: TtlCache<Key, Entry>,
}

/// The issued identities. Written by the token service at issue time; the calls service keeps
/// it in step with SFU joins and leaves and reads it for enforcement.
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

    /// A token for `p`, valid for `lifetime`, was issued at `now`.
    pub fn record(&self, p: IssuedParticipant, lifetime: Duration, now: Instant) {
        let key = (p.room_name.clone(), p.identity.clone());
        let token_expires = now + lifetime;
        self.with(|m| match m.connected.get_mut(&key) {
            Some((entry, _)) => {
                entry.participant = p;
                entry.token_expires = entry.token_expires.max(token_expires);
                entry.lifetime = lifetime;
            }
            None => {
                let entry = Entry {
                    participant: p,
                    token_expires,
                    lifetime,
                };
                m.pending.insert_until(key, entry, token_expires, now);
            }
        });
    }

    /// The SFU session `sid` of `identity` joined `room`.
    pub fn joined(&self, room: &RoomName, identity: &ParticipantIdentity, sid: &ParticipantSid) {
        let key = (room.clone(), identity.clone());
        self.with(|m| {
            if let Some((_, current)) = m.connected.get_mut(&key) {
                *current = sid.clone();
            } else if let Some(entry) = m.pending.remove(&key) {
                m.connected.insert(key, (entry, sid.clone()));
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
            if m.connected
                .get(&key)
                .is_some_and(|(_, current)| current == sid)
            {
                if let Some((entry, _)) = m.connected.remove(&key) {
                    // It may hold a token refreshed while connected: valid up to one lifetime
                    // from now.
                    let until = entry.token_expires.max(now + entry.lifetime);
                    m.pending.insert_until(key, entry, until, now);
                }
            }
        });
    }

    /// Drops the identities whose tokens can no longer be valid at `now`.
    pub fn prune(&self, now: Instant) {
        self.with(|m| m.pending.purge(now));
    }

    /// The issued participants of `user_id` in `room_id` at `now`.
    pub fn of(&self, room_id: &RoomId, user_id: &UserId, now: Instant) -> Vec<IssuedParticipant> {
        let matches = |p: &IssuedParticipant| p.room_id == room_id && p.user_id == user_id;
        self.with(|m| {
            m.connected
                .values()
                .map(|(e, _)| &e.participant)
                .chain(m.pending.values(now).map(|e| &e.participant))
                .filter(|p| matches(p))
                .cloned()
                .collect()
        })
    }

    /// The relays granted in `room_id` (connected or whose grant may still be used) at `now`.
    pub fn relays_in(&self, room_id: &RoomId, now: Instant) -> Vec<IssuedParticipant> {
        self.with(|m| {
            m.connected
                .values()
                .map(|(e, _)| &e.participant)
                .chain(m.pending.values(now).map(|e| &e.participant))
                .filter(|p| p.relay && p.room_id == room_id)
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
                .map(|(e, _)| e.participant.clone())
                .or_else(|| m.pending.get(&key, now).map(|e| e.participant))
        })
    }

    /// Identities held (connected plus unconnected, expired ones not yet dropped included).
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

    const HOUR: Duration = Duration::from_secs(3600);

    fn issued(room: &str, identity: &str, user: &OwnedUserId) -> IssuedParticipant {
        IssuedParticipant {
            room_name: room.into(),
            identity: identity.into(),
            room_id: ruma::owned_room_id!("!r:example.org"),
            user_id: user.clone(),
            device_id: "D".into(),
            relay: false,
        }
    }

    #[test]
    fn issued_participants_are_found_by_room_and_user() {
        let t0 = Instant::now();
        let reg = IssuedParticipants::default();
        let room = ruma::owned_room_id!("!r:example.org");
        let alice = ruma::owned_user_id!("@alice:example.org");
        let bob = ruma::owned_user_id!("@bob:example.org");
        for (identity, user) in [("a1", &alice), ("a2", &alice), ("b1", &bob)] {
            reg.record(issued("sfu", identity, user), HOUR, t0);
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
            reg.get(&"sfu".into(), &"b1".into(), t0 + HOUR).is_none(),
            "an unused token's identity is gone when the token expires"
        );
    }

    #[test]
    fn a_replaced_session_leaving_keeps_the_new_one() {
        let t0 = Instant::now();
        let reg = IssuedParticipants::default();
        let alice = ruma::owned_user_id!("@alice:example.org");
        reg.record(issued("sfu", "a", &alice), Duration::from_secs(60), t0);
        let (room, id) = (RoomName::from("sfu"), ParticipantIdentity::from("a"));
        reg.joined(&room, &id, &"PA_old".into());
        reg.joined(&room, &id, &"PA_new".into());
        reg.left(&room, &id, &"PA_old".into(), t0);
        // Far past the token's expiry: only a connected entry can still be there.
        let later = t0 + HOUR;
        assert!(
            reg.get(&room, &id, later).is_some(),
            "the new session is connected"
        );
        reg.left(&room, &id, &"PA_new".into(), later);
        assert!(
            reg.get(&room, &id, later + Duration::from_secs(59))
                .is_some(),
            "a refreshed token may let it rejoin for one lifetime after it left"
        );
        assert!(reg
            .get(&room, &id, later + Duration::from_secs(60))
            .is_none());
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
            reg.record(issued("sfu-room", identity.as_str(), &user), lifetime, now);
            reg.joined(&room, &identity, &sid);
            reg.left(&room, &identity, &sid, now);
            peak = peak.max(reg.len());
        }
        peak
    }

    /// The acceptance check of the owned-services issue: 10 000 participants churn through one
    /// room (token, join, leave) and the map comes back to its resting size once their tokens
    /// can no longer be valid, never above its bound meanwhile; enforcement still finds a
    /// participant that left until then.
    #[test]
    fn churning_ten_thousand_participants_returns_to_the_resting_size() {
        let t0 = Instant::now();
        let reg = IssuedParticipants::with_capacity(1_000);
        let room = RoomName::from("sfu-room");
        let host = ruma::owned_user_id!("@host:example.org");
        // Resting state: one participant who stays connected throughout.
        reg.record(issued("sfu-room", "host", &host), HOUR, t0);
        reg.joined(&room, &"host".into(), &"PA_host".into());
        let resting = reg.len();
        assert_eq!(resting, 1);

        let peak = churn(&reg, t0, HOUR);
        assert!(
            peak <= resting + 1_000,
            "bounded while churning: peak {peak}"
        );
        let last = ParticipantIdentity::from("id9999");
        assert!(
            reg.get(&room, &last, t0 + Duration::from_secs(60))
                .is_some(),
            "a participant that just left can still be enforced"
        );

        let after = t0 + HOUR + Duration::from_secs(10);
        reg.prune(after);
        assert_eq!(reg.len(), resting, "back at the resting size");
        assert!(
            reg.get(&room, &"host".into(), after).is_some(),
            "the connected host stays"
        );
    }
}
