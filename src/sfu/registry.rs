//! The SFU room registry, with lk-jwt-service / LiveKit semantics: rooms are created
//! explicitly (by a full-access user's token request or the RoomService API), idempotently;
//! a room nobody joins closes after `empty_timeout`, and one everybody left closes after
//! `departure_timeout`. Time is an input.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    pub name: String,
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
    fn expired(&self, now: Instant) -> bool {
        if self.participants > 0 {
            return false;
        }
        match self.emptied_at {
            Some(t) => now >= t + self.options.departure_timeout,
            None => now >= self.created_at + self.options.empty_timeout,
        }
    }
}

/// All rooms of this SFU.
#[derive(Debug, Default)]
pub struct RoomRegistry {
    rooms: Mutex<BTreeMap<String, RegisteredRoom>>,
}

impl RoomRegistry {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, RegisteredRoom>) -> T) -> T {
        let mut guard = match self.rooms.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Creates `name` unless it exists; returns true if it was created now. `unix_now` (seconds)
    /// is kept as its creation time.
    pub fn create(&self, name: &str, options: RoomOptions, now: Instant, unix_now: i64) -> bool {
        self.with(|rooms| {
            rooms.retain(|_, r| !r.expired(now));
            if rooms.contains_key(name) {
                return false;
            }
            rooms.insert(
                name.to_owned(),
                RegisteredRoom {
                    name: name.to_owned(),
                    created_at: now,
                    created_unix: unix_now,
                    options,
                    participants: 0,
                    emptied_at: None,
                    metadata: String::new(),
                },
            );
            tracing::info!(room = name, "SFU room created");
            true
        })
    }

    /// Whether `name` exists (not expired) at `now`.
    pub fn exists(&self, name: &str, now: Instant) -> bool {
        self.get(name, now).is_some()
    }

    /// The room, if it exists at `now`.
    pub fn get(&self, name: &str, now: Instant) -> Option<RegisteredRoom> {
        self.with(|rooms| rooms.get(name).filter(|r| !r.expired(now)).cloned())
    }

    /// Removes expired rooms; returns their names.
    pub fn expire(&self, now: Instant) -> Vec<String> {
        self.with(|rooms| {
            let gone: Vec<String> = rooms
                .values()
                .filter(|r| r.expired(now))
                .map(|r| r.name.clone())
                .collect();
            for name in &gone {
                rooms.remove(name);
                tracing::info!(room = %name, "SFU room closed");
            }
            gone
        })
    }

    /// Deletes a room now; returns whether it existed.
    pub fn delete(&self, name: &str) -> bool {
        self.with(|rooms| rooms.remove(name).is_some())
    }

    /// Sets the metadata of `name`; returns whether the room exists.
    pub fn set_metadata(&self, name: &str, metadata: &str) -> bool {
        self.with(|rooms| match rooms.get_mut(name) {
            Some(r) => {
                r.metadata = metadata.to_owned();
                true
            }
            None => false,
        })
    }

    /// A participant connected to `name`.
    pub fn participant_joined(&self, name: &str) {
        self.with(|rooms| {
            if let Some(r) = rooms.get_mut(name) {
                r.participants += 1;
                r.emptied_at = None;
            }
        });
    }

    /// A participant left `name`.
    pub fn participant_left(&self, name: &str, now: Instant) {
        self.with(|rooms| {
            if let Some(r) = rooms.get_mut(name) {
                r.participants = r.participants.saturating_sub(1);
                if r.participants == 0 {
                    r.emptied_at = Some(now);
                }
            }
        });
    }

    /// Every live room at `now`, ordered by name.
    pub fn list(&self, now: Instant) -> Vec<RegisteredRoom> {
        self.with(|rooms| {
            rooms
                .values()
                .filter(|r| !r.expired(now))
                .cloned()
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_is_idempotent_and_rooms_expire() {
        let reg = RoomRegistry::default();
        let t0 = Instant::now();
        assert!(reg.create("a", RoomOptions::default(), t0, 0));
        assert!(!reg.create("a", RoomOptions::default(), t0 + Duration::from_secs(1), 1));
        assert!(reg.exists("a", t0 + Duration::from_secs(299)));
        assert!(
            !reg.exists("a", t0 + Duration::from_secs(300)),
            "empty timeout"
        );

        assert!(reg.create("b", RoomOptions::default(), t0, 0));
        reg.participant_joined("b");
        assert!(
            reg.exists("b", t0 + Duration::from_secs(1000)),
            "occupied rooms stay"
        );
        reg.participant_left("b", t0 + Duration::from_secs(1000));
        assert!(reg.exists("b", t0 + Duration::from_secs(1019)));
        assert_eq!(reg.expire(t0 + Duration::from_secs(1020)), vec!["a", "b"]);
        assert!(reg.list(t0 + Duration::from_secs(1020)).is_empty());
    }
}
