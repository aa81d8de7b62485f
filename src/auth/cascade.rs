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
//! The grant is a LiveKit JWT for a hidden, subscribe-only participant: `cascade:<server>` for
//! the peer's roster connection, `cascade:<server>|<identity>` for the media of one origin
//! participant (one of each per peer and room: a new grant's join replaces the old session).
//!
//! [`PeerLink`] is the other direction: this Conclave's own requests to its peers. The calls service
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
    /// For the media of one origin participant (its identity): the grant is for
    /// `cascade:<server>|<identity>`. Absent: the roster connection, `cascade:<server>`.
    pub participant: Option<String>,
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
    /// Checks that `openid_token` is the OpenID token of a configured peer Conclave's bot
    /// (steps 1 to 3 of the module docs); the peer's entry and its bot.
    pub async fn verify_peer(
        &self,
        openid_token: Option<OpenIdTokenBody>,
    ) -> Result<(crate::config::CascadePeer, ruma::OwnedUserId), AuthError> {
        let (access_token, server, expires_in) = parse_openid(openid_token)?;
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
                "{user} is not the Conclave of {server} ({bot}): only its appservice bot may \
                 speak for it"
            )));
        }
        Ok((peer.clone(), bot))
    }

    /// A mirror request (`POST /_conclave/cascade/v1/mirror`) parsed, its sender verified as
    /// a peer; the peer and the request.
    pub async fn verify_mirror_request(
        &self,
        body: &[u8],
    ) -> Result<(crate::config::CascadePeer, MirrorRequest), AuthError> {
        let mut r: MirrorRequest = parse_body(body)?;
        let (peer, _) = self.verify_peer(r.openid_token.take()).await?;
        Ok((peer, r))
    }

    /// Succeeds if `user_id` is joined to `room_id` (the membership gate).
    pub async fn require_joined(
        &self,
        room_id: &ruma::RoomId,
        user_id: &ruma::UserId,
    ) -> Result<(), AuthError> {
        self.inner.gate.require_joined(room_id, user_id).await
    }

    /// A subscribe-only token of our user `user_id` (device `device_id`, membership
    /// `member_id` for `/get_token` identities) in the mirror room `mirror` of the call in
    /// `room_id`; recorded, so Matrix removes the user from the mirror as from any call.
    pub fn mirror_token(
        &self,
        room_id: &ruma::RoomId,
        mirror: &RoomName,
        user_id: &ruma::UserId,
        device_id: &str,
        member_id: Option<&str>,
    ) -> Result<String, AuthError> {
        let identity = match member_id {
            Some(m) => crate::matrix::naming::member_identity(user_id.as_str(), device_id, m),
            None => crate::matrix::naming::legacy_identity(user_id.as_str(), device_id),
        };
        let unix = crate::clock::unix_secs();
        let lifetime = self.inner.settings.auth.token_lifetime_secs;
        self.inner.calls.issued(
            IssuedParticipant {
                room_name: mirror.clone(),
                identity: ParticipantIdentity::from(identity.as_str()),
                room_id: room_id.to_owned(),
                user_id: user_id.to_owned(),
                device_id: device_id.to_owned(),
                relay: false,
            },
            Duration::from_secs(lifetime),
        );
        let claims = Claims {
            iss: self.inner.signer.key().to_owned(),
            sub: identity,
            nbf: unix,
            exp: unix + lifetime,
            name: String::new(),
            metadata: String::new(),
            video: VideoGrant {
                room: mirror.to_string(),
                room_join: true,
                can_publish: Some(false),
                can_subscribe: Some(true),
                can_publish_data: Some(false),
                can_update_own_metadata: Some(false),
                ..VideoGrant::default()
            },
        };
        self.inner.signer.sign(&claims)
    }

    /// For a user of a cascade peer with a `url`: a token from their own Conclave, for its
    /// mirror of our call (so their client connects only there). `None`, logged with the
    /// reason, when that fails in any way: the caller answers directly, as without a cascade.
    pub(super) async fn mirror_at_home(
        &self,
        req: &super::Normalized,
        who: &super::Authorized,
    ) -> Option<super::TokenResponse> {
        let server = who.user_id.server_name();
        let settings = &self.inner.settings;
        if server == settings.server_name {
            return None;
        }
        let peer = settings.cascade.peer(server).filter(|p| p.url.is_some())?;
        let (link, metrics) = self.inner.peers.as_ref()?;
        // Only where the call runs here: a mirror of nothing would be an empty room.
        self.inner.sfu.room_sid(&who.room).await?;
        let request = MirrorRequest {
            room_id: Some(req.room_id.to_string()),
            slot_id: Some(req.slot_id.clone()),
            user_id: Some(who.user_id.to_string()),
            device_id: Some(req.device_id.clone()),
            member_id: req.member_id.clone(),
            openid_token: None,
        };
        let outcome = tokio::time::timeout(MIRROR_PATIENCE, link.mirror(peer, &request)).await;
        let user_id = &who.user_id;
        match outcome {
            Ok(Ok(answer)) => {
                crate::metrics::inc(&metrics.cascade_mirrored);
                tracing::info!(%user_id, peer = %server, url = %answer.url, "sent to the mirror at home");
                Some(answer)
            }
            Ok(Err(e)) => {
                crate::metrics::inc(&metrics.cascade_fallbacks);
                tracing::warn!(%user_id, peer = %server, error = %e, "cascade mirror failed; answering directly");
                None
            }
            Err(_) => {
                crate::metrics::inc(&metrics.cascade_fallbacks);
                tracing::warn!(%user_id, peer = %server, "cascade mirror timed out; answering directly");
                None
            }
        }
    }

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
        let (peer, bot) = self.verify_peer(r.openid_token).await?;
        let server = peer.server_name;
        let settings = &self.inner.settings;
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
        let identity = match r.participant.as_deref().filter(|p| !p.is_empty()) {
            // A relay never relays a relay (no loops between Conclaves).
            Some(p) if p.starts_with(RELAY_IDENTITY_PREFIX) => {
                return Err(AuthError::InvalidParam(format!(
                    "`participant` {p:?} is a relay; relays are not relayed"
                )))
            }
            Some(p) => format!("{RELAY_IDENTITY_PREFIX}{server}|{p}"),
            None => format!("{RELAY_IDENTITY_PREFIX}{server}"),
        };
        let identity = ParticipantIdentity::from(identity.as_str());
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

/// `POST /_conclave/cascade/v1/mirror` body: the origin Conclave asks the peer Conclave of
/// `user_id` for a token of that user in the mirror of the origin's call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MirrorRequest {
    /// The Matrix room of the call.
    pub room_id: Option<String>,
    /// The call slot (`m.call#ROOM` when absent).
    pub slot_id: Option<String>,
    /// The user (of the peer's server) who asked the origin for a token.
    pub user_id: Option<String>,
    /// Their device.
    pub device_id: Option<String>,
    /// Their MatrixRTC membership ID (`/get_token`), absent for `/sfu/get`.
    pub member_id: Option<String>,
    /// An OpenID token of the origin Conclave's appservice bot.
    pub openid_token: Option<OpenIdTokenBody>,
}

/// Why a request to a peer Conclave failed (the caller falls back to the direct path).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer's entry has no `url`.
    #[error("cascade peer {0} has no url")]
    NoUrl(String),
    /// Our own homeserver gave no OpenID token for our bot.
    #[error("no OpenID token from our homeserver: {0}")]
    OpenId(String),
    /// The peer did not answer (in time).
    #[error("peer {peer} unreachable: {cause}")]
    Unreachable {
        /// The peer.
        peer: String,
        /// What failed.
        cause: String,
    },
    /// The peer refused.
    #[error("peer {peer} refused ({status}): {error}")]
    Refused {
        /// The peer.
        peer: String,
        /// Its status.
        status: u16,
        /// Its error message (shortened).
        error: String,
    },
    /// The peer answered something unusable.
    #[error("peer {0} answered an unusable body")]
    BadAnswer(String),
}

/// This Conclave's requests to its peers: an OpenID token of its own bot (from its own
/// homeserver, with the `as_token`) sent to a configured peer's URL, never to anyone else.
#[derive(Clone)]
pub struct PeerLink {
    http: reqwest::Client,
    homeserver: crate::matrix::client::HomeserverClient,
    bot_user_id: String,
}

/// At most this much of a peer's error message is kept.
const PEER_ERROR_CHARS: usize = 200;

impl PeerLink {
    /// Requests go out with `http` (its timeout bounds each); OpenID tokens come from
    /// `homeserver` for `bot_user_id`.
    pub fn new(
        http: reqwest::Client,
        homeserver: crate::matrix::client::HomeserverClient,
        bot_user_id: String,
    ) -> Self {
        Self {
            http,
            homeserver,
            bot_user_id,
        }
    }

    /// An OpenID token of our bot, as the body field `openid_token`.
    pub async fn openid_token(&self) -> Result<serde_json::Value, PeerError> {
        let path = format!(
            "/_matrix/client/v3/user/{}/openid/request_token",
            crate::matrix::client::encode_path_segment(&self.bot_user_id)
        );
        match self
            .homeserver
            .send_json(http::Method::POST, &path, &[], Some(&serde_json::json!({})))
            .await
        {
            Ok((200, body)) if body.get("access_token").is_some() => Ok(body),
            Ok((status, body)) => Err(PeerError::OpenId(format!("{status} {body}"))),
            Err(e) => Err(PeerError::OpenId(e.to_string())),
        }
    }

    /// POSTs `body` (with our OpenID token added) to `path` on `peer`; its JSON answer.
    async fn post(
        &self,
        peer: &crate::config::CascadePeer,
        path: &str,
        mut body: serde_json::Value,
    ) -> Result<serde_json::Value, PeerError> {
        let name = peer.server_name.to_string();
        let base = peer
            .url
            .as_deref()
            .ok_or_else(|| PeerError::NoUrl(name.clone()))?;
        body["openid_token"] = self.openid_token().await?;
        let unreachable = |e: reqwest::Error| PeerError::Unreachable {
            peer: name.clone(),
            cause: e.without_url().to_string(),
        };
        let resp = self
            .http
            .post(format!("{}{path}", base.trim_end_matches('/')))
            .json(&body)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status().as_u16();
        let answer: serde_json::Value = resp.json().await.unwrap_or_default();
        if status != 200 {
            let error = answer
                .get("error")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .chars()
                .take(PEER_ERROR_CHARS)
                .collect();
            return Err(PeerError::Refused {
                peer: name,
                status,
                error,
            });
        }
        Ok(answer)
    }

    /// A relay grant of `peer` for the call in `room_id`/`slot_id`; for `participant` (one
    /// origin participant's media) or for the roster connection (`None`).
    pub async fn relay_grant(
        &self,
        peer: &crate::config::CascadePeer,
        room_id: &str,
        slot_id: &str,
        participant: Option<&str>,
    ) -> Result<RelayGrant, PeerError> {
        let body = serde_json::json!({
            "room_id": room_id, "slot_id": slot_id, "participant": participant,
        });
        let answer = self.post(peer, RELAY_PATH, body).await?;
        serde_json::from_value(answer)
            .map_err(|_| PeerError::BadAnswer(peer.server_name.to_string()))
    }

    /// A token of `peer`'s user in its mirror of our call (see [`MirrorRequest`]).
    pub async fn mirror(
        &self,
        peer: &crate::config::CascadePeer,
        request: &MirrorRequest,
    ) -> Result<super::TokenResponse, PeerError> {
        let body = serde_json::to_value(request)
            .map_err(|_| PeerError::BadAnswer(peer.server_name.to_string()))?;
        let answer = self.post(peer, MIRROR_PATH, body).await?;
        serde_json::from_value(answer)
            .map_err(|_| PeerError::BadAnswer(peer.server_name.to_string()))
    }
}

/// How long a token request waits for the user's own Conclave's mirror before it is
/// answered directly (Element Call gives a token request about 10 s).
const MIRROR_PATIENCE: Duration = Duration::from_secs(6);

/// The origin's relay grant endpoint.
pub const RELAY_PATH: &str = "/_conclave/cascade/v1/relay";
/// The receiving side's mirror endpoint.
pub const MIRROR_PATH: &str = "/_conclave/cascade/v1/mirror";
