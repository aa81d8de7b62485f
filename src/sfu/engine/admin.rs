//! Server-side administration of rooms and participants (the RoomService API): snapshots for
//! queries and the operator [`Command`]s (mute, update, subscriptions, server data, room
//! updates, room deletion). A child of `engine`, so it works on the engine's own state.

use std::collections::HashMap;
use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;
use prost::Message as _;

use super::{msg, Command, Output, Sfu};
use crate::sfu::ids::{ParticipantIdentity, RoomName, TrackSid};

impl Sfu {
    /// The live part of a room's info (`sid`, `name`, creation time, participant and publisher
    /// counts), if the engine has the room (somebody is connected).
    pub fn room_info(&self, room: &RoomName) -> Option<lk::Room> {
        Some(self.rooms.get(room)?.info())
    }

    /// The info of participant `identity` in `room` now, with its current tracks.
    pub fn participant_info(
        &self,
        room: &RoomName,
        identity: &ParticipantIdentity,
    ) -> Option<lk::ParticipantInfo> {
        Some(
            self.rooms
                .get(room)?
                .by_identity(identity)?
                .info_with_tracks(),
        )
    }

    /// Carries out one of the RoomService commands.
    pub(super) fn admin_command(&mut self, now: Instant, command: Command) {
        match command {
            Command::MuteTrack {
                room,
                identity,
                track_sid,
                muted,
            } => self.server_mute(now, &room, &identity, track_sid, muted),
            Command::UpdateParticipant {
                room,
                identity,
                metadata,
                name,
                attributes,
                permission,
            } => self.server_update_participant(
                &room, &identity, metadata, name, attributes, permission,
            ),
            Command::UpdateSubscriptions {
                room,
                identity,
                track_sids,
                subscribe,
            } => {
                if let Some(session) = self.session_of(&room, &identity) {
                    let update = lk::UpdateSubscription {
                        track_sids: track_sids.into_iter().map(String::from).collect(),
                        subscribe,
                        participant_tracks: Vec::new(),
                    };
                    self.request(
                        now,
                        session,
                        lk::signal_request::Message::Subscription(update),
                    );
                }
            }
            Command::SendData {
                room,
                packet,
                reliable,
            } => self.server_data(now, &room, &packet, reliable),
            Command::UpdateRoom { room, info } => self.server_room_update(&room, *info),
            Command::DeleteRoom { room } => {
                self.delete_room(now, &room);
            }
            // The signalling commands are handled by `handle_command` itself.
            Command::Join(_)
            | Command::Request { .. }
            | Command::Disconnect { .. }
            | Command::Remove { .. }
            | Command::Shutdown => {}
        }
    }

    fn server_mute(
        &mut self,
        now: Instant,
        room: &RoomName,
        identity: &ParticipantIdentity,
        track_sid: TrackSid,
        muted: bool,
    ) {
        let Some(session) = self.session_of(room, identity) else {
            return;
        };
        let published = self
            .participant_info(room, identity)
            .is_some_and(|p| p.tracks.iter().any(|t| t.sid == track_sid.as_str()));
        if !published {
            return;
        }
        tracing::info!(%room, %identity, track = %track_sid, muted, "server-initiated mute");
        // Exactly what the publisher's own mute request does (track info, broadcast)...
        self.request(
            now,
            session,
            lk::signal_request::Message::Mute(lk::MuteTrackRequest {
                sid: track_sid.to_string(),
                muted,
            }),
        );
        // ...and the publisher's SDK is told to (un)mute its local track.
        self.out.push_back(Output::Signal(
            session,
            msg(Msg::Mute(lk::MuteTrackRequest {
                sid: track_sid.into_string(),
                muted,
            })),
        ));
    }

    fn server_update_participant(
        &mut self,
        room: &RoomName,
        identity: &ParticipantIdentity,
        metadata: String,
        name: String,
        attributes: HashMap<String, String>,
        permission: Option<lk::ParticipantPermission>,
    ) {
        let Some(session) = self.session_of(room, identity) else {
            return;
        };
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        // The RoomService checks first (and answers `invalid_argument`); this holds the line
        // for every other caller and for a race with the participant's own update.
        if let Err(e) = p.check_update(&name, &metadata, &attributes) {
            tracing::warn!(%room, %identity, error = %e, "server update over the limits ignored");
            return;
        }
        p.update(metadata, name, attributes);
        if let Some(permission) = permission {
            p.auto_subscribe = p.auto_subscribe && permission.can_subscribe;
            p.info.permission = Some(permission);
        }
        tracing::info!(%room, %identity, "participant updated by the server");
        self.broadcast_participant(session);
    }

    fn server_data(
        &mut self,
        now: Instant,
        room: &RoomName,
        packet: &lk::DataPacket,
        reliable: bool,
    ) {
        let encoded = packet.encode_to_vec();
        let destinations = &packet.destination_identities;
        let mut touched = Vec::new();
        if let Some(r) = self.rooms.get_mut(room) {
            for p in r.participants.values_mut() {
                if !destinations.is_empty() && !destinations.contains(&p.info.identity) {
                    continue;
                }
                if p.send_data(reliable, &encoded) {
                    touched.push(p.session);
                }
            }
        }
        for session in touched {
            self.drain(now, session);
        }
    }

    fn server_room_update(&mut self, room: &RoomName, mut info: lk::Room) {
        let Some(live) = self.room_info(room) else {
            return;
        };
        info.sid = live.sid;
        info.name = live.name;
        info.creation_time = live.creation_time;
        info.creation_time_ms = live.creation_time_ms;
        info.num_participants = live.num_participants;
        info.num_publishers = live.num_publishers;
        let update = Msg::RoomUpdate(lk::RoomUpdate { room: Some(info) });
        if let Some(r) = self.rooms.get(room) {
            r.broadcast(&mut self.out, &update, |_| true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{SessionId, SfuConfig, SignalOut};
    use super::*;

    fn sfu(now: Instant) -> Sfu {
        Sfu::new(
            SfuConfig {
                candidates: vec!["127.0.0.1:7882".parse().unwrap()],
                seed: Some(7),
                ..Default::default()
            },
            now,
        )
    }

    fn join(s: &mut Sfu, now: Instant, session: u64, identity: &str) {
        let permission = crate::sfu::engine::tests::publish_permission();
        s.handle_command(
            now,
            crate::sfu::engine::tests::join_command(session, "room", identity, permission, false),
        );
    }

    fn drain(s: &mut Sfu) -> Vec<(u64, Option<Msg>)> {
        let mut out = Vec::new();
        loop {
            match s.poll_output() {
                Output::Timeout(_) => return out,
                Output::Signal(id, SignalOut::Message(m)) => out.push((id.0, Some(*m))),
                Output::Signal(id, SignalOut::Close) => out.push((id.0, None)),
                _ => {}
            }
        }
    }

    #[test]
    fn snapshots_updates_mute_and_deletion() {
        let now = Instant::now();
        let mut s = sfu(now);
        s.set_unix_time(1_700_000_000);
        join(&mut s, now, 1, "alice");
        join(&mut s, now, 2, "bob");
        drain(&mut s);
        let room = s.room_info(&"room".into()).expect("room");
        assert!(room.sid.starts_with("RM_"));
        assert_eq!(room.num_participants, 2);
        assert_eq!(room.creation_time, 1_700_000_000);
        assert!(s.room_info(&"other".into()).is_none());
        assert_eq!(
            s.participant_info(&"room".into(), &"bob".into())
                .expect("bob")
                .identity,
            "bob"
        );
        assert!(s
            .participant_info(&"room".into(), &"carol".into())
            .is_none());

        // Metadata, name and attributes: everyone (bob too) gets bob's new info.
        s.handle_command(
            now,
            Command::UpdateParticipant {
                room: "room".into(),
                identity: "bob".into(),
                metadata: "meta".into(),
                name: "Bob".into(),
                attributes: HashMap::from([("k".into(), "v".into())]),
                permission: None,
            },
        );
        let msgs = drain(&mut s);
        for to in [1, 2] {
            assert!(
                msgs.iter().any(|(id, m)| *id == to
                    && matches!(m, Some(Msg::Update(u)) if u.participants.iter().any(|p| p.metadata == "meta" && p.name == "Bob" && p.attributes.get("k").map(String::as_str) == Some("v")))),
                "{to} told: {msgs:?}"
            );
        }

        // Over the limits: ignored whole (the RoomService refuses it first), nobody is told.
        for (metadata, name, attributes) in [
            (
                "m".repeat(crate::sfu::limits::MAX_METADATA_BYTES + 1),
                String::new(),
                HashMap::new(),
            ),
            (String::new(), "n".repeat(257), HashMap::new()),
            (
                String::new(),
                String::new(),
                HashMap::from([("k".to_owned(), "v".repeat(64_000))]),
            ),
        ] {
            s.handle_command(
                now,
                Command::UpdateParticipant {
                    room: "room".into(),
                    identity: "bob".into(),
                    metadata,
                    name,
                    attributes,
                    permission: Some(lk::ParticipantPermission::default()),
                },
            );
            assert!(drain(&mut s).is_empty());
        }
        let bob = s
            .participant_info(&"room".into(), &"bob".into())
            .expect("bob");
        assert_eq!((bob.metadata.as_str(), bob.name.as_str()), ("meta", "Bob"));
        assert!(bob.permission.is_some_and(|p| p.can_publish));

        // Room update reaches everyone with the live fields filled in.
        s.handle_command(
            now,
            Command::UpdateRoom {
                room: "room".into(),
                info: Box::new(lk::Room {
                    metadata: "room-meta".into(),
                    ..Default::default()
                }),
            },
        );
        let msgs = drain(&mut s);
        let updates: Vec<&lk::Room> = msgs
            .iter()
            .filter_map(|(_, m)| match m {
                Some(Msg::RoomUpdate(u)) => u.room.as_ref(),
                _ => None,
            })
            .collect();
        assert_eq!(updates.len(), 2);
        assert!(updates
            .iter()
            .all(|r| r.metadata == "room-meta" && r.sid == room.sid && r.name == "room"));

        // Server mute: an unknown track changes nothing; a published one is muted for
        // everyone and the publisher is told.
        s.handle_command(
            now,
            Command::Request {
                session: SessionId(1),
                message: Box::new(lk::signal_request::Message::AddTrack(lk::AddTrackRequest {
                    cid: "mic".into(),
                    r#type: lk::TrackType::Audio as i32,
                    ..Default::default()
                })),
            },
        );
        drain(&mut s);
        let track = s
            .participant_info(&"room".into(), &"alice".into())
            .expect("alice")
            .tracks[0]
            .sid
            .clone();
        let mute = |sid: &str| Command::MuteTrack {
            room: "room".into(),
            identity: "alice".into(),
            track_sid: sid.into(),
            muted: true,
        };
        s.handle_command(now, mute("TR_none"));
        assert!(drain(&mut s).is_empty());
        s.handle_command(now, mute(&track));
        let msgs = drain(&mut s);
        assert!(msgs.iter().any(
            |(id, m)| *id == 1 && matches!(m, Some(Msg::Mute(x)) if x.muted && x.sid == track)
        ));
        assert!(msgs.iter().any(|(id, m)| *id == 2
            && matches!(m, Some(Msg::Update(u)) if u.participants.iter().any(|p| p.tracks.iter().any(|t| t.muted)))));
        assert!(
            s.participant_info(&"room".into(), &"alice".into())
                .expect("alice")
                .tracks[0]
                .muted
        );

        // Deleting the room removes both with ROOM_DELETED and drops the room.
        s.handle_command(
            now,
            Command::DeleteRoom {
                room: "room".into(),
            },
        );
        let msgs = drain(&mut s);
        for to in [1, 2] {
            assert!(msgs.iter().any(|(id, m)| *id == to
                && matches!(m, Some(Msg::Leave(l)) if l.reason == lk::DisconnectReason::RoomDeleted as i32)));
            assert!(
                msgs.iter().any(|(id, m)| *id == to && m.is_none()),
                "closed"
            );
        }
        assert!(s.room_info(&"room".into()).is_none());
    }
}
