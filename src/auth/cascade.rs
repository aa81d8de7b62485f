//! The origin side of the cascade (`docs/cascade.md`): `POST /_conclave/cascade/v1/relay`, a
//! peer Conclave asking for a grant to pull one call's tracks over a relay connection.
//!
//! Trust comes from Matrix only: the peer sends an OpenID token of its appservice bot, issued by
//! its own homeserver and verified there over federation like a user's. Checked in this order,
//! the cheapest and least revealing first:
//! 1. the token's homeserver is in `cascade.peers` (no federation request for anyone else);
//! 2. the homeserver's rate limit, then the OpenID token at that homeserver;
//! 3. the verified user is exactly that peer's Conclave bot (any user of the peer's server can
//!    get an OpenID token);
//! 4. a user of the peer's server is joined to the Matrix room, and the room's latest
//!    `m.room.server_acl` allows the server;
//! 5. the call exists on this Conclave (a grant never creates a room).
//!
//! The grant is a LiveKit JWT for the hidden, subscribe-only participant `cascade:<server>`
//! (one per peer and room: a new grant's join replaces the old session). The calls service
//! records it and cuts it when Matrix says the peer's server no longer belongs
//! (`calls::relays`).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{non_empty, parse_body, parse_openid, parse_room, OpenIdTokenBody, TokenService};
use crate::auth::jwt::{Claims, VideoGrant};
use crate::auth::AuthError;
use crate::calls::issued::IssuedParticipant;
use crate::matrix::naming::{room_name, LEGACY_SLOT};
use crate::sfu::ids::{ParticipantIdentity, RoomName};

/// Identities of relay participants start with this, followed by the peer's server name.
pub const RELAY_IDENTITY_PREFIX: &str = "cascade:";

/// The device recorded for a relay (it has no Matrix device).
const RELAY_DEVICE: &str = "cascade";

/// `POST /_conclave/cascade/v1/relay` body.
#[derive(Debug, Deserialize)]
pub struct RelayRequest {
    /// The Matrix room of the call.
    pub room_id: Option<String>,
    /// The call slot (`m.call#ROOM` when absent: legacy and compatibility mode).
    pub slot_id: Option<String>,
    /// An OpenID token of the peer Conclave's appservice bot.
    pub openid_token: Option<OpenIdTokenBody>,
}

/// The answer: where to connect and as whom.
#[derive(Debug, Serialize, Deserialize)]
pub struct RelayGrant {
    /// This Conclave's SFU WebSocket URL.
    pub url: String,
    /// The LiveKit JWT of the relay participant.
    pub jwt: String,
    /// The SFU room (as the origin names it).
    pub room: String,
    /// The relay participant's identity (`cascade:<peer server>`).
    pub identity: String,
}

impl TokenService {
    /// A relay grant for the peer Conclave that sent `body` (see the module docs for the
    /// checks); refusals name what failed.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn relay_grant(&self, body: &[u8]) -> Result<RelayGrant, AuthError> {
        let r: RelayRequest = parse_body(body)?;
        let room_id = parse_room(non_empty(r.room_id, "room_id")?, "room_id")?;
        let slot_id = r
            .slot_id
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| LEGACY_SLOT.to_owned());
        let (access_token, server, expires_in) = parse_openid(r.openid_token)?;
        let settings = &self.inner.settings;
        let Some(peer) = settings.cascade.peer(&server) else {
            return Err(AuthError::Forbidden(format!(
                "{server} is not a cascade peer of {} (cascade.peers)",
                settings.server_name
            )));
        };
        let bot = peer
            .bot_user_id()
            .map_err(|e| AuthError::Internal(format!("cascade peer {server}: {e}")))?;
        let now = Instant::now();
        self.limit_homeserver(&server, now)?;
        let user = self
            .inner
            .openid
            .verify(&server, &access_token, expires_in, now)
            .await?;
        if user != bot {
            return Err(AuthError::Forbidden(format!(
                "{user} is not the Conclave of {server} ({bot}): only its appservice bot may pull \
                 calls"
            )));
        }
        let calls = &self.inner.calls;
        if !calls.server_has_joined_member(&room_id, &server).await? {
            return Err(AuthError::Forbidden(format!(
                "no user of {server} is joined to {room_id}"
            )));
        }
        if !calls.server_acl_allows(&room_id, &server).await? {
            return Err(AuthError::Forbidden(format!(
                "the server ACL of {room_id} denies {server}"
            )));
        }
        let room = RoomName::from(room_name(room_id.as_str(), &slot_id));
        if self.inner.sfu.room_sid(&room).await.is_none() {
            return Err(AuthError::RoomUnknown(format!(
                "no call in {room_id} (slot {slot_id}) on this Conclave"
            )));
        }
        let identity =
            ParticipantIdentity::from(format!("{RELAY_IDENTITY_PREFIX}{server}").as_str());
        let unix = crate::clock::unix_secs();
        let lifetime = settings.auth.token_lifetime_secs;
        let claims = Claims {
            iss: self.inner.signer.key().to_owned(),
            sub: identity.to_string(),
            nbf: unix,
            exp: unix + lifetime,
            name: String::new(),
            metadata: String::new(),
            video: VideoGrant {
                room: room.to_string(),
                room_join: true,
                can_publish: Some(false),
                can_subscribe: Some(true),
                can_publish_data: Some(false),
                can_update_own_metadata: Some(false),
                hidden: true,
                ..VideoGrant::default()
            },
        };
        let jwt = self.inner.signer.sign(&claims)?;
        calls.issued(
            IssuedParticipant {
                room_name: room.clone(),
                identity: identity.clone(),
                room_id: room_id.clone(),
                user_id: bot,
                device_id: RELAY_DEVICE.to_owned(),
                relay: true,
            },
            Duration::from_secs(lifetime),
        );
        tracing::info!(%room_id, sfu_room = %room, peer = %server, "cascade relay granted");
        Ok(RelayGrant {
            url: settings.livekit_public_url.clone(),
            jwt,
            room: room.to_string(),
            identity: identity.to_string(),
        })
    }
}
