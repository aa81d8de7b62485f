//! Relays granted to peer Conclaves (`docs/cascade.md`). A peer's relay participant (identity
//! `cascade:<server>`, issued to the peer's bot user) belongs in a call only while its
//! homeserver has a joined member in the Matrix room and the room's `m.room.server_acl` allows
//! that homeserver. The Matrix events that end either (the last member's leave, kick or ban; an
//! ACL denying the server) cut it when their transaction arrives.

use std::time::Instant;

use ruma::events::room::server_acl::RoomServerAclEventContent;
use ruma::{RoomId, ServerName};

use super::issued::IssuedParticipant;
use super::{Calls, CallsError};
use crate::metrics::inc;

/// The relays among `relays` whose server `acl` denies.
fn denied_by(
    relays: Vec<IssuedParticipant>,
    acl: &RoomServerAclEventContent,
) -> Vec<IssuedParticipant> {
    relays
        .into_iter()
        .filter(|p| !acl.is_allowed(p.user_id.server_name()))
        .collect()
}

impl Calls {
    /// Whether a user of `server` is joined to `room_id` (as the events Conclave saw tell).
    pub async fn server_has_joined_member(
        &self,
        room_id: &RoomId,
        server: &ServerName,
    ) -> Result<bool, CallsError> {
        Ok(self
            .inner
            .store
            .has_joined_member_of(room_id, server)
            .await?)
    }

    /// A membership of a user of `server` in `room_id` ended: cuts that server's relays there
    /// if none of its users is joined any more.
    pub(super) async fn cut_relays_without_members(&self, room_id: &RoomId, server: &ServerName) {
        let relays: Vec<_> = self
            .inner
            .issued
            .relays_in(room_id, Instant::now())
            .into_iter()
            .filter(|p| p.user_id.server_name() == server)
            .collect();
        if relays.is_empty() {
            return;
        }
        match self.server_has_joined_member(room_id, server).await {
            Ok(true) => {}
            Ok(false) => {
                self.cut(relays, "the last member of its server left the room")
                    .await;
            }
            // Failing closed: without the store, nobody can show the server still belongs.
            Err(e) => {
                tracing::warn!(error = %e, %room_id, %server, "membership unknown; cutting relay");
                self.cut(relays, "its server's membership could not be read")
                    .await;
            }
        }
    }

    /// Whether `room_id`'s latest `m.room.server_acl` (if Conclave saw one) allows `server`.
    /// An ACL that cannot be read allows nobody.
    pub async fn server_acl_allows(
        &self,
        room_id: &RoomId,
        server: &ServerName,
    ) -> Result<bool, CallsError> {
        Ok(match self.inner.store.server_acl(room_id).await? {
            None => true,
            Some(content) => serde_json::from_str::<RoomServerAclEventContent>(&content)
                .is_ok_and(|acl| acl.is_allowed(server)),
        })
    }

    /// `room_id`'s `m.room.server_acl` is now `content`: cuts the relays of the servers it
    /// denies (all of them if it cannot be read).
    pub(super) async fn server_acl_changed(&self, room_id: &RoomId, content: &str) {
        let relays = self.inner.issued.relays_in(room_id, Instant::now());
        let cut = match serde_json::from_str::<RoomServerAclEventContent>(content) {
            Ok(acl) => denied_by(relays, &acl),
            Err(e) => {
                tracing::warn!(error = %e, %room_id, "unreadable server ACL; cutting every relay");
                relays
            }
        };
        self.cut(cut, "m.room.server_acl denies its server").await;
    }

    /// Removes relay participants from the SFU (counted).
    async fn cut(&self, relays: Vec<IssuedParticipant>, why: &str) {
        for _ in &relays {
            inc(&self.inner.metrics.cascade_relays_cut);
        }
        self.remove(relays, why).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(server: &str) -> IssuedParticipant {
        IssuedParticipant {
            room_name: "r".into(),
            identity: format!("cascade:{server}").as_str().into(),
            room_id: ruma::owned_room_id!("!r:hs1.example"),
            user_id: ruma::UserId::parse(format!("@conclave:{server}")).unwrap(),
            device_id: "cascade".into(),
            relay: true,
        }
    }

    #[test]
    fn an_acl_cuts_exactly_the_servers_it_denies() {
        let relays = vec![
            relay("hs2.example"),
            relay("hs3.example"),
            relay("hs4.example:8448"),
        ];
        let acl: RoomServerAclEventContent = serde_json::from_value(serde_json::json!({
            "allow": ["*"], "deny": ["hs2.example", "hs4.*"],
        }))
        .unwrap();
        let cut: Vec<_> = denied_by(relays.clone(), &acl)
            .into_iter()
            .map(|p| p.user_id.to_string())
            .collect();
        // The port is not part of an ACL match.
        assert_eq!(cut, ["@conclave:hs2.example", "@conclave:hs4.example:8448"]);
        let open: RoomServerAclEventContent =
            serde_json::from_value(serde_json::json!({"allow": ["*"]})).unwrap();
        assert!(denied_by(relays, &open).is_empty());
    }
}
