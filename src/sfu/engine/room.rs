//! A room inside the engine: its participants, keyed by session.

use std::collections::BTreeMap;

use std::collections::VecDeque;

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;

use super::participant::Participant;
use super::track::Track;
use super::{msg, Output, SessionId};
use crate::sfu::ids::{ParticipantIdentity, RoomName, RoomSid, TrackSid};

/// A room with connected participants.
pub(super) struct Room {
    pub(super) name: RoomName,
    pub(super) sid: RoomSid,
    pub(super) created_unix: i64,
    pub(super) participants: BTreeMap<SessionId, Participant>,
}

impl Room {
    /// An empty room.
    pub(super) fn new(name: RoomName, sid: RoomSid, created_unix: i64) -> Self {
        Self {
            name,
            sid,
            created_unix,
            participants: BTreeMap::new(),
        }
    }

    /// The participant with `identity`.
    pub(super) fn by_identity(&self, identity: &ParticipantIdentity) -> Option<&Participant> {
        self.participants.values().find(|p| p.identity == *identity)
    }

    /// Every session in the room.
    pub(super) fn sessions(&self) -> Vec<SessionId> {
        self.participants.keys().copied().collect()
    }

    /// The published track `sid` and its publisher.
    pub(super) fn track(&self, sid: &TrackSid) -> Option<(&Participant, &Track)> {
        self.participants
            .values()
            .find_map(|p| p.track(sid).map(|t| (p, t)))
    }

    /// The live part of its info: SID, name, creation time, participant and publisher counts.
    pub(super) fn info(&self) -> lk::Room {
        let publishers = self
            .participants
            .values()
            .filter(|p| !p.tracks.is_empty())
            .count();
        lk::Room {
            sid: self.sid.to_string(),
            name: self.name.to_string(),
            creation_time: self.created_unix,
            creation_time_ms: self.created_unix * 1000,
            num_participants: u32::try_from(self.participants.len()).unwrap_or(u32::MAX),
            num_publishers: u32::try_from(publishers).unwrap_or(u32::MAX),
            ..Default::default()
        }
    }

    /// Queues `m` for every participant that `to` selects.
    pub(super) fn broadcast(
        &self,
        out: &mut VecDeque<Output>,
        m: &Msg,
        to: impl Fn(&Participant) -> bool,
    ) {
        for p in self.participants.values().filter(|p| to(p)) {
            out.push_back(Output::Signal(p.session, msg(m.clone())));
        }
    }
}
