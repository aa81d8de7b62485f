//! Room lifetimes with lk-jwt-service / LiveKit semantics, and the read-only view of them the
//! rest of the service reads.
//!
//! Rooms are created explicitly (by a full-access user's token request, auto-create, or the
//! RoomService API), idempotently; a room nobody joins closes after `empty_timeout`, and one
//! everybody left closes after `departure_timeout`. The engine owns these records (creation,
//! metadata, participant counts, expiry: time is an input there); the net loop publishes a
//! snapshot into [`RoomRegistry`] after every change, and everybody else only reads it.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::ids::{RoomName, RoomSid};

/// Per-room lifetime settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomOptions {
    /// Kept this long if nobody ever joins (LiveKit `empty_timeout`, lk-jwt-service: 300 s).
    pub empty_timeout: Duration,
    /// Kept this long after the last participant left (`departure_timeout`, 20 s).
    pub departure_timeout: Duration,
    /// Participant limit; 0 = none.
    pub max_participants: u32,
}

impl Default for RoomOptions {
    fn default() -> Self {
        Self {
            empty_timeout: Duration::from_secs(300),
            departure_timeout: Duration::from_secs(20),
            max_participants: 0,
        }
    }
}

/// A registered room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredRoom {
    /// LiveKit room name.
    pub name: RoomName,
    /// Its SID (`RM_…`): given when the room came to exist (`CreateRoom`, a token request or
    /// the first join) and kept until it closes; the engine's live room carries the same one.
    pub sid: RoomSid,
    /// When it was created.
    pub created_at: Instant,
    /// When it was created, Unix seconds (RoomService `creation_time`).
    pub created_unix: i64,
    /// Lifetime settings.
    pub options: RoomOptions,
    /// Participants connected now.
    pub participants: u32,
    /// When the last participant left, if the room is empty after having had participants.
    pub emptied_at: Option<Instant>,
    /// Free-form metadata (RoomService `UpdateRoomMetadata`).
    pub metadata: String,
}

impl RegisteredRoom {
    /// A new, empty room `sid` created at `now` (`unix_now` in Unix seconds).
    pub fn new(
        name: RoomName,
        sid: RoomSid,
        options: RoomOptions,
        now: Instant,
        unix_now: i64,
    ) -> Self {
        Self {
            name,
            sid,
            created_at: now,
            created_unix: unix_now,
            options,
            participants: 0,
            emptied_at: None,
            metadata: String::new(),
        }
    }

    /// When it closes if nobody joins (none while occupied).
    pub fn expires_at(&self) -> Option<Instant> {
        if self.participants > 0 {
            return None;
        }
        Some(match self.emptied_at {
            Some(t) => t + self.options.departure_timeout,
            None => self.created_at + self.options.empty_timeout,
        })
    }

    /// Whether it is closed at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at().is_some_and(|t| now >= t)
    }

    /// A participant connected.
    pub fn participant_joined(&mut self) {
        self.participants += 1;
        self.emptied_at = None;
    }

    /// A participant left at `now`.
    pub fn participant_left(&mut self, now: Instant) {
        self.participants = self.participants.saturating_sub(1);
        if self.participants == 0 {
            self.emptied_at = Some(now);
        }
    }
}

/// The rooms of this SFU as the net loop last published them: a read-only view (expired
/// rooms are hidden at once, even before the loop drops them).
#[derive(Debug, Default)]
pub struct RoomRegistry {
    /// Per media loop thread (each owns its rooms), by loop index.
    rooms: RwLock<BTreeMap<usize, BTreeMap<RoomName, RegisteredRoom>>>,
}

impl RoomRegistry {
    fn read<T>(
        &self,
        f: impl FnOnce(&BTreeMap<usize, BTreeMap<RoomName, RegisteredRoom>>) -> T,
    ) -> T {
        let guard = match self.rooms.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&guard)
    }

    /// Replaces the view of media loop `index`'s rooms with `rooms` (its engine's records).
    /// Only that loop calls this.
    pub fn publish_from(&self, index: usize, rooms: impl IntoIterator<Item = RegisteredRoom>) {
        let rooms: BTreeMap<RoomName, RegisteredRoom> =
            rooms.into_iter().map(|r| (r.name.clone(), r)).collect();
        let mut guard = match self.rooms.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.insert(index, rooms);
    }

    /// Whether `name` exists (not expired) at `now`.
    pub fn exists(&self, name: &str, now: Instant) -> bool {
        self.get(name, now).is_some()
    }

    /// The room, if it exists at `now`.
    pub fn get(&self, name: &str, now: Instant) -> Option<RegisteredRoom> {
        self.read(|loops| {
            loops
                .values()
                .find_map(|rooms| rooms.get(name))
                .filter(|r| !r.expired(now))
                .cloned()
        })
    }

    /// Every live room at `now`, ordered by name.
    pub fn list(&self, now: Instant) -> Vec<RegisteredRoom> {
        let mut all: Vec<RegisteredRoom> = self.read(|loops| {
            loops
                .values()
                .flat_map(|rooms| rooms.values())
                .filter(|r| !r.expired(now))
                .cloned()
                .collect()
        });
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_and_the_view() {
        let t0 = Instant::now();
        let mut a = RegisteredRoom::new("a".into(), "RM_a".into(), RoomOptions::default(), t0, 0);
        assert!(!a.expired(t0 + Duration::from_secs(299)));
        assert!(a.expired(t0 + Duration::from_secs(300)), "empty timeout");
        a.participant_joined();
        assert!(
            !a.expired(t0 + Duration::from_secs(1000)),
            "occupied rooms stay"
        );
        a.participant_left(t0 + Duration::from_secs(1000));
        assert!(!a.expired(t0 + Duration::from_secs(1019)));
        assert!(
            a.expired(t0 + Duration::from_secs(1020)),
            "departure timeout"
        );

        let reg = RoomRegistry::default();
        reg.publish_from(1, [a]);
        reg.publish_from(
            0,
            [RegisteredRoom::new(
                "b".into(),
                "RM_b".into(),
                RoomOptions::default(),
                t0,
                0,
            )],
        );
        assert!(reg.exists("b", t0));
        let names: Vec<String> = reg
            .list(t0)
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b"], "both loops, by name");
        assert_eq!(reg.list(t0 + Duration::from_secs(1019)).len(), 1);
        assert!(reg.get("a", t0 + Duration::from_secs(1020)).is_none());
    }
}
