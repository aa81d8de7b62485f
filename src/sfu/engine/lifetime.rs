//! Room records and lifetimes (the engine is their one home): creation, metadata, deletion,
//! participant counts, the `max_participants` limit and expiry after `empty_timeout` /
//! `departure_timeout`. The net loop publishes them as [`crate::sfu::registry::RoomRegistry`].

use std::time::Instant;

use livekit_protocol as lk;

use super::{SessionId, Sfu, SignalOut};
use crate::sfu::ids::{ParticipantIdentity, RoomName, RoomSid, ROOM_PREFIX};
use crate::sfu::registry::{RegisteredRoom, RoomOptions};
use crate::sfu::Output;

impl Sfu {
    /// Creates room `name` unless it exists (idempotent, as lk-jwt-service and `CreateRoom`);
    /// returns true if it was created now.
    ///
    /// A new room gets its SID now (or keeps the one of the participants already connected to
    /// it); it keeps that SID until it closes, and a room created again after that gets a new
    /// one, as in LiveKit.
    pub fn create_room(&mut self, now: Instant, name: &RoomName, options: RoomOptions) -> bool {
        self.last_now = now;
        self.expire_rooms(now);
        if self.registered.contains_key(name) {
            return false;
        }
        let sid = match self.rooms.get(name) {
            Some(live) => live.sid.clone(),
            None => RoomSid::new(self.ids.sid(ROOM_PREFIX)),
        };
        let mut room = RegisteredRoom::new(name.clone(), sid, options, now, self.unix_now);
        room.participants = u32::try_from(self.participant_count(name)).unwrap_or(u32::MAX);
        tracing::info!(room = %name, sid = %room.sid, "SFU room created");
        self.registered.insert(name.clone(), room);
        self.rooms_changed = true;
        true
    }

    /// The SID of room `name`: its record's, or (a room without one) its live room's; `None`
    /// when it exists neither way.
    pub fn room_sid(&self, name: &RoomName) -> Option<RoomSid> {
        self.registered
            .get(name)
            .map(|r| r.sid.clone())
            .or_else(|| self.rooms.get(name).map(|r| r.sid.clone()))
    }

    /// Sets the metadata of room `name`; returns whether the room exists.
    pub fn set_room_metadata(&mut self, now: Instant, name: &RoomName, metadata: &str) -> bool {
        match self.registered.get_mut(name).filter(|r| !r.expired(now)) {
            Some(r) => {
                r.metadata = metadata.to_owned();
                self.rooms_changed = true;
                true
            }
            None => false,
        }
    }

    /// Deletes room `name` now: its record goes and every participant is removed with
    /// `ROOM_DELETED`. Returns whether the room was registered or had participants.
    pub fn delete_room(&mut self, now: Instant, name: &RoomName) -> bool {
        self.last_now = now;
        let registered = self.registered.remove(name).is_some();
        self.rooms_changed |= registered;
        let sessions = self.rooms.get(name).map(|r| r.sessions());
        let live = sessions.is_some();
        let sessions = sessions.unwrap_or_default();
        if live {
            tracing::info!(room = %name, participants = sessions.len(), "room deleted");
        }
        for session in sessions {
            self.leave(now, session, lk::DisconnectReason::RoomDeleted, true);
        }
        registered || live
    }

    /// The room records (the registry's content).
    pub fn registered_rooms(&self) -> impl Iterator<Item = &RegisteredRoom> {
        self.registered.values()
    }

    /// Whether the room records changed since the last call (the loop then republishes them).
    pub fn take_rooms_changed(&mut self) -> bool {
        std::mem::take(&mut self.rooms_changed)
    }

    /// Drops the rooms whose lifetime ended at `now`.
    pub(super) fn expire_rooms(&mut self, now: Instant) {
        let before = self.registered.len();
        self.registered.retain(|name, r| {
            let keep = !r.expired(now);
            if !keep {
                tracing::info!(room = %name, "SFU room closed");
            }
            keep
        });
        self.rooms_changed |= self.registered.len() != before;
    }

    /// The earliest room expiry.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.registered
            .values()
            .filter_map(|r| r.expires_at())
            .min()
    }

    /// Refuses `session`'s join if `room` is at its `max_participants` (an identity already
    /// in the room replaces itself and always fits): the session is closed without a join.
    pub(super) fn refuse_if_full(
        &mut self,
        session: SessionId,
        room: &RoomName,
        identity: &ParticipantIdentity,
    ) -> bool {
        let max = self
            .registered
            .get(room)
            .map_or(0, |r| r.options.max_participants);
        let full = max > 0
            && self.participant_count(room) >= max as usize
            && self.session_of(room, identity).is_none();
        if full {
            tracing::info!(%session, %room, "room full (max_participants); join refused");
            self.out
                .push_back(Output::Signal(session, SignalOut::Close));
        }
        full
    }

    /// Counts a participant in (`joined`) or out of `room`'s record.
    pub(super) fn count_participant(&mut self, now: Instant, room: &RoomName, joined: bool) {
        if let Some(r) = self.registered.get_mut(room) {
            if joined {
                r.participant_joined();
            } else {
                r.participant_left(now);
            }
            self.rooms_changed = true;
        }
    }
}
