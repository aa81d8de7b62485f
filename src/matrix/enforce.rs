//! Matrix decides who stays in the SFU: when a user stops being joined to a room (leave, kick,
//! ban), every SFU participant issued to them for that room is removed at once.
//!
//! The link between a Matrix user and an SFU identity is recorded when the token service issues
//! a token ([`IssuedParticipants`]); `/sfu/get` identities (`user:device`) are also parsed.

use std::collections::HashMap;
use std::sync::Mutex;

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use crate::app::AppState;
use crate::net::LoopRequest;
use crate::sfu::Command;
use crate::store::CallChange;

/// Who an issued SFU identity belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedParticipant {
    /// LiveKit room name.
    pub room_name: String,
    /// LiveKit identity.
    pub identity: String,
    /// The Matrix room of the call.
    pub room_id: OwnedRoomId,
    /// The Matrix user.
    pub user_id: OwnedUserId,
    /// The (claimed) device.
    pub device_id: String,
}

/// Every identity the token service issued since start, by (room name, identity).
#[derive(Debug, Default)]
pub struct IssuedParticipants {
    map: Mutex<HashMap<(String, String), IssuedParticipant>>,
}

impl IssuedParticipants {
    /// Records an issued token.
    pub fn record(&self, p: IssuedParticipant) {
        if let Ok(mut m) = self.map.lock() {
            m.insert((p.room_name.clone(), p.identity.clone()), p);
        }
    }

    /// The issued participants of `user_id` in `room_id`.
    pub fn of(&self, room_id: &RoomId, user_id: &UserId) -> Vec<IssuedParticipant> {
        self.map
            .lock()
            .map(|m| {
                m.values()
                    .filter(|p| p.room_id == room_id && p.user_id == user_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The issued participants of one device of `user_id` in `room_id`.
    pub fn of_device(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        device_id: &str,
    ) -> Vec<IssuedParticipant> {
        self.of(room_id, user_id)
            .into_iter()
            .filter(|p| p.device_id == device_id)
            .collect()
    }

    /// Who `identity` in `room_name` was issued to, if Conclave issued it.
    pub fn get(&self, room_name: &str, identity: &str) -> Option<IssuedParticipant> {
        self.map
            .lock()
            .ok()
            .and_then(|m| m.get(&(room_name.to_owned(), identity.to_owned())).cloned())
    }
}

/// `user_id` is no longer joined to `room_id`: remove their SFU participants.
pub async fn membership_lost(state: &AppState, room_id: &RoomId, user_id: &UserId, why: &str) {
    remove(state, state.issued.of(room_id, user_id), why).await;
}

/// Acts on call changes: a member whose call membership ended leaves the SFU; calls that
/// start or end are announced in the room.
pub async fn act_on_call_changes(state: &AppState, changes: Vec<CallChange>) {
    for change in changes {
        match change {
            CallChange::MemberLeft {
                room_id,
                user_id,
                device_id,
            } => {
                let issued = state.issued.of_device(&room_id, &user_id, &device_id);
                remove(state, issued, "call membership ended").await;
            }
            CallChange::Started {
                room_id,
                started_by,
            } => {
                tracing::info!(room_id = %room_id, started_by = %started_by, "call started");
                super::notices::call_started(state, &room_id, &started_by).await;
            }
            CallChange::Ended {
                room_id,
                started_by,
                started_ts,
                ended_ts,
                peak_members,
            } => {
                tracing::info!(room_id = %room_id, peak_members, "call ended");
                super::notices::call_ended(
                    state,
                    &room_id,
                    &started_by,
                    ended_ts - started_ts,
                    peak_members,
                )
                .await;
            }
        }
    }
}

async fn remove(state: &AppState, participants: Vec<IssuedParticipant>, why: &str) {
    let Some(sfu) = &state.sfu else {
        return;
    };
    for p in participants {
        let (room_id, user_id) = (p.room_id.clone(), p.user_id.clone());
        tracing::info!(
            room_id = %room_id,
            user_id = %user_id,
            identity = %p.identity,
            why,
            "removing SFU participant: Matrix says it no longer belongs to the call"
        );
        let cmd = Command::Remove {
            room: p.room_name.into(),
            identity: p.identity.into(),
            reason: livekit_protocol::DisconnectReason::ParticipantRemoved,
        };
        if !sfu.send(LoopRequest::Sfu(cmd)).await {
            tracing::warn!("SFU loop gone; cannot remove participant");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_participants_are_found_by_room_and_user() {
        let reg = IssuedParticipants::default();
        let room = ruma::RoomId::parse("!r:example.org").unwrap();
        let alice = ruma::UserId::parse("@alice:example.org").unwrap();
        let bob = ruma::UserId::parse("@bob:example.org").unwrap();
        for (identity, user) in [("a1", &alice), ("a2", &alice), ("b1", &bob)] {
            reg.record(IssuedParticipant {
                room_name: "sfu".into(),
                identity: identity.into(),
                room_id: room.clone(),
                user_id: user.clone(),
                device_id: "D".into(),
            });
        }
        let mut ids: Vec<String> = reg
            .of(&room, &alice)
            .into_iter()
            .map(|p| p.identity)
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["a1", "a2"]);
        assert_eq!(reg.get("sfu", "b1").unwrap().user_id, bob);
        assert!(reg
            .of(&ruma::RoomId::parse("!x:example.org").unwrap(), &alice)
            .is_empty());
    }
}
