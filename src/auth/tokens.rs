//! The token service, an lk-jwt-service drop-in: the bodies of `POST /sfu/get` (legacy) and
//! `POST /get_token` (MSC4195), both answered `{"url","jwt"}`, and `POST
//! /delegate_delayed_leave`. Unlike lk-jwt-service, a token is issued only to a user joined to
//! the Matrix room (config `auth.require_membership`). The HTTP edge (`http::tokens`) reads the
//! bodies and renders [`AuthError`]s.
//!
//! Unknown fields are ignored, missing ones are named.
//!
//! Rate limits (token buckets, [`RateLimiter`]): per homeserver named in the request, counted
//! before the OpenID lookup on it (so nobody floods a homeserver with lookups through us), and
//! per user, counted once the OpenID token is verified. Over either: [`AuthError::RateLimited`].

#[path = "cascade.rs"]
pub mod cascade;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ruma::{OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, ServerName, UserId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::jwt::{Claims, TokenSigner, VideoGrant};
use super::membership::MembershipGate;
use super::openid::OpenIdVerifier;
use super::AuthError;
use crate::calls::issued::IssuedParticipant;
use crate::calls::Calls;
use crate::config::{AuthConfig, CascadeConfig, Config};
use crate::matrix::client::HomeserverClient;
use crate::matrix::naming::{legacy_identity, member_identity, room_name, LEGACY_SLOT};
use crate::net::SfuHandle;
use crate::plumbing::RateLimiter;
use crate::sfu::ids::{ParticipantIdentity, RoomName};
use crate::sfu::registry::RoomOptions;
use crate::store::DelayedLeave;

/// Largest accepted token request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Most rate-limit buckets kept per kind (homeservers, users); when full, the buckets closest
/// to full are forgotten first.
pub const RATE_LIMIT_CAPACITY: usize = 10_000;

/// `openid_token` as Element Call sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenIdTokenBody {
    /// The token from `/_matrix/client/v3/user/{userId}/openid/request_token`.
    pub access_token: Option<String>,
    /// Always `Bearer`.
    pub token_type: Option<String>,
    /// The homeserver that issued it (and vouches for the user).
    pub matrix_server_name: Option<String>,
    /// Lifetime in seconds.
    pub expires_in: Option<u64>,
}

/// `POST /sfu/get` body.
#[derive(Debug, Deserialize)]
pub struct LegacyRequest {
    /// Matrix room ID.
    pub room: Option<String>,
    /// OpenID token.
    pub openid_token: Option<OpenIdTokenBody>,
    /// The caller's device.
    pub device_id: Option<String>,
    /// MSC4140 delayed leave event ID.
    pub delay_id: Option<String>,
    /// Its timeout in ms.
    pub delay_timeout: Option<u64>,
    /// Accepted and ignored (as lk-jwt-service does since 2026-06).
    pub delay_cs_api_url: Option<String>,
}

/// `member` of `/get_token`.
#[derive(Debug, Deserialize)]
pub struct MemberBody {
    /// The membership ID.
    pub id: Option<String>,
    /// The user the caller says it is (must match the OpenID subject).
    pub claimed_user_id: Option<String>,
    /// The device the caller says it uses.
    pub claimed_device_id: Option<String>,
}

/// `POST /get_token` body.
#[derive(Debug, Deserialize)]
pub struct TokenRequest {
    /// Matrix room ID.
    pub room_id: Option<String>,
    /// Call slot (`m.call#ROOM`).
    pub slot_id: Option<String>,
    /// OpenID token.
    pub openid_token: Option<OpenIdTokenBody>,
    /// The membership.
    pub member: Option<MemberBody>,
    /// MSC4140 delayed leave event ID.
    pub delay_id: Option<String>,
    /// Its timeout in ms.
    pub delay_timeout: Option<u64>,
    /// Accepted and ignored.
    pub delay_cs_api_url: Option<String>,
}

/// The body of MSC4195's `get_token` and `delegate_delayed_leave` as the homeserver forwards
/// them (MSC4512), and of the federation twin of `get_token`. No OpenID token: the homeserver
/// vouches for the caller.
#[derive(Debug, Deserialize)]
pub struct RtcRequest {
    /// Matrix room ID.
    pub room_id: Option<String>,
    /// Call slot (`m.call#ROOM`).
    pub slot_id: Option<String>,
    /// The server whose SFU the token is for (client endpoint; ours when absent).
    pub server_name: Option<String>,
    /// The SFU's WebSocket URL (must be ours when given).
    pub url: Option<String>,
    /// The remote user (federation endpoint only).
    pub user_id: Option<String>,
    /// The membership (`id`, `claimed_device_id`; `claimed_user_id` must be the caller).
    pub member: Option<MemberBody>,
    /// The membership ID in the MSC's flat form (when `member.id` is absent).
    pub member_id: Option<String>,
    /// MSC4140 delayed leave event ID.
    pub delay_id: Option<String>,
    /// Its timeout in ms.
    pub delay_timeout: Option<u64>,
}

/// The answer of both endpoints.
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    /// SFU WebSocket URL.
    pub url: String,
    /// LiveKit access token.
    pub jwt: String,
}

/// Who vouches for the caller.
enum Caller {
    /// An OpenID token, verified over federation at `server_name`.
    OpenId {
        server_name: OwnedServerName,
        access_token: String,
        expires_in: Option<u64>,
    },
    /// The homeserver (MSC4512: a request forwarded with the `hs_token`), for a local user, or
    /// for a user of the authenticated origin server of a federation request.
    Vouched(OwnedUserId),
}

/// A request, normalised from any endpoint.
pub(super) struct Normalized {
    room_id: OwnedRoomId,
    slot_id: String,
    caller: Caller,
    claimed_user: Option<String>,
    device_id: String,
    member_id: Option<String>,
    delay: Option<(String, u64)>,
    /// Never publish (MSC4195: a token asked through the federation twin is for a user who
    /// publishes on their own server's SFU), whatever `auth.remote_can_publish` says.
    subscribe_only: bool,
}

fn required<T>(v: Option<T>, name: &str) -> Result<T, AuthError> {
    v.ok_or_else(|| AuthError::BadJson(format!("The request body is missing `{name}`")))
}

fn non_empty(v: Option<String>, name: &str) -> Result<String, AuthError> {
    required(v.filter(|s| !s.is_empty()), name)
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, AuthError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| AuthError::NotJson(e.to_string()))?;
    serde_path_to_error::deserialize(value)
        .map_err(|e| AuthError::BadJson(format!("invalid field `{}`: {}", e.path(), e.inner())))
}

fn parse_openid(
    token: Option<OpenIdTokenBody>,
) -> Result<(String, OwnedServerName, Option<u64>), AuthError> {
    let token = required(token, "openid_token")?;
    let access = non_empty(token.access_token, "openid_token.access_token")?;
    let server = non_empty(token.matrix_server_name, "openid_token.matrix_server_name")?;
    let server = ServerName::parse(&server).map_err(|_| {
        AuthError::InvalidParam(format!(
            "openid_token.matrix_server_name {server:?} is not a valid server name"
        ))
    })?;
    Ok((access, server, token.expires_in))
}

fn parse_room(room: String, field: &str) -> Result<OwnedRoomId, AuthError> {
    RoomId::parse(&room)
        .map_err(|_| AuthError::InvalidParam(format!("`{field}` {room:?} is not a Matrix room ID")))
}

fn parse_delay(
    id: Option<String>,
    timeout: Option<u64>,
) -> Result<Option<(String, u64)>, AuthError> {
    match (id.filter(|s| !s.is_empty()), timeout) {
        (None, None) => Ok(None),
        (Some(id), Some(t)) if t > 0 => Ok(Some((id, t))),
        _ => Err(AuthError::BadJson(
            "`delay_id` and a positive `delay_timeout` must be given together".into(),
        )),
    }
}

impl Normalized {
    fn from_legacy(r: LegacyRequest) -> Result<Self, AuthError> {
        let room_id = parse_room(non_empty(r.room, "room")?, "room")?;
        let (access_token, server_name, expires_in) = parse_openid(r.openid_token)?;
        Ok(Self {
            room_id,
            slot_id: LEGACY_SLOT.to_owned(),
            caller: Caller::OpenId {
                server_name,
                access_token,
                expires_in,
            },
            claimed_user: None,
            device_id: non_empty(r.device_id, "device_id")?,
            member_id: None,
            delay: parse_delay(r.delay_id, r.delay_timeout)?,
            subscribe_only: false,
        })
    }

    fn from_token_request(r: TokenRequest) -> Result<Self, AuthError> {
        let room_id = parse_room(non_empty(r.room_id, "room_id")?, "room_id")?;
        let slot_id = non_empty(r.slot_id, "slot_id")?;
        let member = required(r.member, "member")?;
        let member_id = non_empty(member.id, "member.id")?;
        let claimed_user = non_empty(member.claimed_user_id, "member.claimed_user_id")?;
        let device_id = non_empty(member.claimed_device_id, "member.claimed_device_id")?;
        let (access_token, server_name, expires_in) = parse_openid(r.openid_token)?;
        Ok(Self {
            room_id,
            slot_id,
            caller: Caller::OpenId {
                server_name,
                access_token,
                expires_in,
            },
            claimed_user: Some(claimed_user),
            device_id,
            member_id: Some(member_id),
            delay: parse_delay(r.delay_id, r.delay_timeout)?,
            subscribe_only: false,
        })
    }
}

impl Normalized {
    /// A forwarded request of `user_id`, vouched for by the homeserver.
    fn from_rtc(r: RtcRequest, user_id: OwnedUserId) -> Result<Self, AuthError> {
        let room_id = parse_room(non_empty(r.room_id, "room_id")?, "room_id")?;
        let slot_id = non_empty(r.slot_id, "slot_id")?;
        let member = required(r.member, "member")?;
        let member_id = non_empty(member.id.or(r.member_id), "member.id")?;
        let device_id = non_empty(member.claimed_device_id, "member.claimed_device_id")?;
        Ok(Self {
            room_id,
            slot_id,
            caller: Caller::Vouched(user_id),
            claimed_user: member.claimed_user_id.filter(|s| !s.is_empty()),
            device_id,
            member_id: Some(member_id),
            delay: parse_delay(r.delay_id, r.delay_timeout)?,
            subscribe_only: false,
        })
    }
}

/// `fed_proxy` (MSC4512) on the homeserver: it signs and sends a federation request for us.
const FED_PROXY_PATH: &str = "/_matrix/client/unstable/io.element.msc4512/appservice/fed_proxy";
/// The federation twin of `get_token` on the remote server (MSC4195, unstable prefix).
const FEDERATION_GET_TOKEN_PATH: &str =
    "/_matrix/federation/unstable/io.element.msc4195/rtc/livekit/get_token";

/// At most this much of a remote server's error message is relayed to the client.
const RELAYED_ERROR_CHARS: usize = 200;

/// What the token service needs of the configuration.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// `[auth]`.
    pub auth: AuthConfig,
    /// This homeserver's name.
    pub server_name: OwnedServerName,
    /// The SFU URL handed to clients.
    pub livekit_public_url: String,
    /// `[cascade]`: the peer Conclaves that may ask for relays.
    pub cascade: CascadeConfig,
}

impl TokenSettings {
    /// The settings from the configuration.
    pub fn from_config(config: &Config) -> Self {
        Self {
            auth: config.auth.clone(),
            server_name: config.matrix.server_name.clone(),
            livekit_public_url: config.livekit_public_url(),
            cascade: config.cascade.clone(),
        }
    }
}

/// Who a verified request is for and where its participant lives.
pub(super) struct Authorized {
    user_id: ruma::OwnedUserId,
    full_access: bool,
    room: RoomName,
    identity: ParticipantIdentity,
}

/// The token service. Cheap to clone.
#[derive(Clone)]
pub struct TokenService {
    inner: Arc<Inner>,
}

struct Inner {
    settings: TokenSettings,
    /// Per homeserver host (lower case, without port: one machine, whatever the spelling).
    homeserver_limits: Mutex<RateLimiter<String>>,
    /// Per verified user.
    user_limits: Mutex<RateLimiter<OwnedUserId>>,
    openid: OpenIdVerifier,
    signer: TokenSigner,
    gate: MembershipGate,
    calls: Calls,
    sfu: SfuHandle,
    homeserver: HomeserverClient,
    /// Requests to peer Conclaves (`docs/cascade.md`), once set, and the counters of what
    /// they answered.
    peers: Option<(cascade::PeerLink, Arc<crate::metrics::Metrics>)>,
}

impl TokenService {
    /// The service: verifies with `openid`, checks membership through `gate`, signs with
    /// `signer`, records what it issues with `calls`, creates rooms in the SFU `sfu`, relays
    /// token requests for remote SFUs through `homeserver` (MSC4512 `fed_proxy`).
    pub fn new(
        settings: TokenSettings,
        openid: OpenIdVerifier,
        signer: TokenSigner,
        gate: MembershipGate,
        calls: Calls,
        sfu: SfuHandle,
        homeserver: HomeserverClient,
    ) -> Self {
        let auth = &settings.auth;
        let homeserver_limits = Mutex::new(RateLimiter::new(
            auth.homeserver_rate_per_sec,
            auth.homeserver_burst,
            RATE_LIMIT_CAPACITY,
        ));
        let user_limits = Mutex::new(RateLimiter::new(
            auth.user_rate_per_sec,
            auth.user_burst,
            RATE_LIMIT_CAPACITY,
        ));
        Self {
            inner: Arc::new(Inner {
                settings,
                homeserver_limits,
                user_limits,
                openid,
                signer,
                gate,
                calls,
                sfu,
                homeserver,
                peers: None,
            }),
        }
    }

    /// The service sending users of cascade peers to their own Conclave's mirror of the call
    /// through `peers`, counted in `metrics` (`docs/cascade.md`). Call right after
    /// [`TokenService::new`].
    pub fn with_peers(
        mut self,
        peers: cascade::PeerLink,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.peers = Some((peers, metrics)),
            None => tracing::error!("with_peers called on a shared token service; ignored"),
        }
        self
    }

    /// `POST /sfu/get`: a legacy token request body (room = hash of `[room, "m.call#ROOM"]`,
    /// identity = `user_id:device_id`).
    pub async fn legacy_token(&self, body: &[u8]) -> Result<TokenResponse, AuthError> {
        let req = Normalized::from_legacy(parse_body::<LegacyRequest>(body)?)?;
        self.issue(req).await
    }

    /// `POST /get_token`: an MSC4195 token request body (identity = hash of
    /// `[user_id, claimed_device_id, member.id]`).
    pub async fn token(&self, body: &[u8]) -> Result<TokenResponse, AuthError> {
        let req = Normalized::from_token_request(parse_body::<TokenRequest>(body)?)?;
        self.issue(req).await
    }

    /// `POST /delegate_delayed_leave`: lk-jwt-service's hand-over of the delayed leave after
    /// the token request (the `/get_token` body with `delay_id` and `delay_timeout` required;
    /// `delay_cs_api_url` is accepted and ignored). Same checks as `/get_token`; the
    /// participant's delayed leave is then kept alive and sent as with `/get_token` (see
    /// `calls::delayed`), including when the participant is connected already.
    pub async fn delegate_delayed_leave(&self, body: &[u8]) -> Result<(), AuthError> {
        let req = Normalized::from_token_request(parse_body::<TokenRequest>(body)?)?;
        self.delegate(req).await
    }

    /// MSC4195 `get_token` forwarded by the homeserver (MSC4512) for its local user `user_id`:
    /// for our SFU, a token as `/get_token` issues (no OpenID round trip); for another
    /// server's (`server_name`), the request relayed through the homeserver's `fed_proxy`.
    #[tracing::instrument(level = "debug", skip(self, body))]
    pub async fn proxied_token(
        &self,
        user_id: &UserId,
        body: &[u8],
    ) -> Result<TokenResponse, AuthError> {
        let raw: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| AuthError::NotJson(e.to_string()))?;
        let r: RtcRequest = parse_body(body)?;
        if let Some(server) = r.server_name.as_deref().filter(|s| !s.is_empty()) {
            let server = ServerName::parse(server).map_err(|_| {
                AuthError::InvalidParam(format!("`server_name` {server:?} is not a server name"))
            })?;
            if server != self.inner.settings.server_name {
                return self.relay(user_id, &server, raw).await;
            }
        }
        self.check_url(r.url.as_deref())?;
        self.issue(Normalized::from_rtc(r, user_id.to_owned())?)
            .await
    }

    /// MSC4195 `delegate_delayed_leave` forwarded by the homeserver (MSC4512) for its local
    /// user `user_id`: as `/delegate_delayed_leave`.
    #[tracing::instrument(level = "debug", skip(self, body))]
    pub async fn proxied_delegate(&self, user_id: &UserId, body: &[u8]) -> Result<(), AuthError> {
        let r: RtcRequest = parse_body(body)?;
        self.check_url(r.url.as_deref())?;
        self.delegate(Normalized::from_rtc(r, user_id.to_owned())?)
            .await
    }

    /// The federation twin of `get_token`, forwarded by the homeserver (MSC4512) after it
    /// checked the X-Matrix signature of `origin`: a token for `user_id` of the body, who must
    /// belong to `origin`. Always subscribe-only (MSC4195: remote users publish at home).
    #[tracing::instrument(level = "debug", skip(self, body))]
    pub async fn federated_token(
        &self,
        origin: &ServerName,
        body: &[u8],
    ) -> Result<TokenResponse, AuthError> {
        let r: RtcRequest = parse_body(body)?;
        let user = non_empty(r.user_id.clone(), "user_id")?;
        let user_id = UserId::parse(&user)
            .map_err(|_| AuthError::InvalidParam(format!("`user_id` {user:?} is not a user ID")))?;
        if user_id.server_name() != origin || origin == self.inner.settings.server_name {
            return Err(AuthError::Forbidden(format!(
                "{user_id} does not belong to the requesting server {origin}"
            )));
        }
        self.check_url(r.url.as_deref())?;
        let mut req = Normalized::from_rtc(r, user_id)?;
        req.subscribe_only = true;
        self.issue(req).await
    }

    /// MSC4195: a `url` naming another SFU than ours is refused (400 `M_INVALID_PARAM`).
    fn check_url(&self, url: Option<&str>) -> Result<(), AuthError> {
        let ours = self.inner.settings.livekit_public_url.trim_end_matches('/');
        match url {
            Some(u) if !u.is_empty() && u.trim_end_matches('/') != ours => Err(
                AuthError::InvalidParam(format!("`url` {u:?} is not this server's SFU ({ours})")),
            ),
            _ => Ok(()),
        }
    }

    /// Relays `body` (the client's request) for `user_id` to `destination`'s federation
    /// endpoint through the homeserver's MSC4512 `fed_proxy`; the remote server's 403 and 400
    /// are relayed, anything else is a 502.
    async fn relay(
        &self,
        user_id: &UserId,
        destination: &ServerName,
        mut body: serde_json::Value,
    ) -> Result<TokenResponse, AuthError> {
        self.limit_user(&user_id.to_owned(), Instant::now())?;
        if let Some(o) = body.as_object_mut() {
            o.remove("server_name");
            o.insert("user_id".into(), serde_json::json!(user_id));
        }
        let request = serde_json::json!({
            "destination": destination,
            "method": "POST",
            "path": FEDERATION_GET_TOKEN_PATH,
            "body": body,
        });
        let (status, answer) = self
            .inner
            .homeserver
            .send_json(http::Method::POST, FED_PROXY_PATH, &[], Some(&request))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "homeserver fed_proxy unreachable");
                AuthError::HomeserverUnreachable(self.inner.settings.server_name.to_string())
            })?;
        if status != 200 {
            tracing::warn!(status, %answer, %destination, "homeserver fed_proxy refused");
            return Err(AuthError::HomeserverUnreachable(destination.to_string()));
        }
        let remote_status = answer.get("status").and_then(serde_json::Value::as_u64);
        let content = answer.get("content").cloned().unwrap_or_default();
        let text = |k: &str| content.get(k).and_then(serde_json::Value::as_str);
        let message = || {
            let error: String = text("error")
                .unwrap_or("")
                .chars()
                .take(RELAYED_ERROR_CHARS)
                .collect();
            format!("{destination} refused the token request: {error}")
        };
        match remote_status {
            Some(200) => match text("jwt") {
                Some(jwt) => {
                    tracing::info!(%user_id, %destination, "SFU token relayed");
                    Ok(TokenResponse {
                        url: text("url")
                            .or(body.get("url").and_then(serde_json::Value::as_str))
                            .unwrap_or_default()
                            .to_owned(),
                        jwt: jwt.to_owned(),
                    })
                }
                None => Err(AuthError::HomeserverBadResponse(destination.to_string())),
            },
            Some(403) => Err(AuthError::Forbidden(message())),
            Some(400) => Err(AuthError::InvalidParam(message())),
            _ => Err(AuthError::HomeserverBadResponse(destination.to_string())),
        }
    }

    /// The delegation of `req`'s delayed leave, checked as a token request.
    async fn delegate(&self, req: Normalized) -> Result<(), AuthError> {
        if req.delay.is_none() {
            return Err(AuthError::BadJson(
                "The request body is missing `delay_id` or `delay_timeout`".into(),
            ));
        }
        let who = self.authorize(&req, Instant::now()).await?;
        self.hand_over_delay(&req, &who, true).await?;
        tracing::info!(
            user_id = %who.user_id,
            room_id = %req.room_id,
            sfu_room = %who.room,
            identity = %who.identity,
            "delayed leave delegated"
        );
        Ok(())
    }

    /// Whether users of `server` may create SFU rooms.
    fn is_full_access(&self, server: &ServerName) -> bool {
        let list = &self.inner.settings.auth.full_access_homeservers;
        if list.is_empty() {
            return server == self.inner.settings.server_name;
        }
        list.iter().any(|s| s == "*" || s == server.as_str())
    }

    /// Takes a request from `server`'s bucket at `now` (before anything is asked of it).
    fn limit_homeserver(&self, server: &ServerName, now: Instant) -> Result<(), AuthError> {
        let host = server.host().to_ascii_lowercase();
        let mut limits = self
            .inner
            .homeserver_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        limits
            .check(&host, now)
            .map_err(|retry_after| AuthError::RateLimited {
                what: format!("naming homeserver {host}"),
                retry_after,
            })
    }

    /// Takes a request from `user`'s bucket at `now`.
    fn limit_user(&self, user: &OwnedUserId, now: Instant) -> Result<(), AuthError> {
        let mut limits = self
            .inner
            .user_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        limits
            .check(user, now)
            .map_err(|retry_after| AuthError::RateLimited {
                what: format!("of user {user}"),
                retry_after,
            })
    }

    /// The checks both token issuing and delegation make: the homeserver's rate limit, the
    /// OpenID token over federation, the user's rate limit, the claimed user, room membership,
    /// and that delegation is for full-access users only.
    async fn authorize(&self, req: &Normalized, now: Instant) -> Result<Authorized, AuthError> {
        let user_id = match &req.caller {
            Caller::OpenId {
                server_name,
                access_token,
                expires_in,
            } => {
                self.limit_homeserver(server_name, now)?;
                self.inner
                    .openid
                    .verify(server_name, access_token, *expires_in, now)
                    .await?
            }
            Caller::Vouched(user_id) => {
                if user_id.server_name() != self.inner.settings.server_name {
                    self.limit_homeserver(user_id.server_name(), now)?;
                }
                user_id.clone()
            }
        };
        // The lookup may have taken a while: the clock of the request is not the clock now.
        self.limit_user(&user_id, Instant::now())?;
        if let Some(claimed) = &req.claimed_user {
            if claimed != user_id.as_str() {
                return Err(AuthError::Unauthorized(format!(
                    "member.claimed_user_id {claimed} is not the token's user"
                )));
            }
        }
        if self.inner.settings.auth.require_membership {
            self.inner
                .gate
                .require_joined(&req.room_id, &user_id)
                .await?;
        }
        let full_access = self.is_full_access(match &req.caller {
            Caller::OpenId { server_name, .. } => server_name,
            Caller::Vouched(user_id) => user_id.server_name(),
        });
        if req.delay.is_some() && !full_access {
            return Err(AuthError::BadJson(
                "Delegation of delayed events is only supported for full access users".into(),
            ));
        }
        let room = RoomName::from(room_name(req.room_id.as_str(), &req.slot_id));
        let identity = ParticipantIdentity::from(match &req.member_id {
            Some(member) => member_identity(user_id.as_str(), &req.device_id, member),
            None => legacy_identity(user_id.as_str(), &req.device_id),
        });
        Ok(Authorized {
            user_id,
            full_access,
            room,
            identity,
        })
    }

    /// Hands the request's delayed leave (if any) for `who`'s participant to the calls service.
    async fn hand_over_delay(
        &self,
        req: &Normalized,
        who: &Authorized,
        delegated: bool,
    ) -> Result<(), AuthError> {
        let Some((delay_id, delay_timeout_ms)) = req.delay.clone() else {
            return Ok(());
        };
        let leave = DelayedLeave {
            room_name: who.room.clone(),
            identity: who.identity.clone(),
            matrix_room_id: req.room_id.clone(),
            user_id: who.user_id.clone(),
            device_id: req.device_id.clone(),
            delay_id,
            delay_timeout_ms,
        };
        Ok(self
            .inner
            .calls
            .hand_over_delayed_leave(leave, delegated)
            .await?)
    }

    async fn issue(&self, req: Normalized) -> Result<TokenResponse, AuthError> {
        let now = Instant::now();
        let who = self.authorize(&req, now).await?;
        if !req.subscribe_only {
            if let Some(mirrored) = self.mirror_at_home(&req, &who).await {
                return Ok(mirrored);
            }
        }
        let Authorized {
            user_id,
            full_access,
            room,
            identity,
        } = &who;
        let unix = crate::clock::unix_secs();
        if *full_access {
            self.inner
                .sfu
                .create_room(room, RoomOptions::default())
                .await;
        }
        let settings = &self.inner.settings;
        let local = user_id.server_name() == settings.server_name;
        let auth = &settings.auth;
        let can_publish = !req.subscribe_only && (local || auth.remote_can_publish);
        let claims = Claims {
            iss: self.inner.signer.key().to_owned(),
            sub: identity.to_string(),
            nbf: unix,
            exp: unix + auth.token_lifetime_secs,
            name: String::new(),
            metadata: String::new(),
            video: VideoGrant {
                room: room.to_string(),
                room_join: true,
                can_publish: Some(can_publish),
                can_subscribe: Some(local || auth.remote_can_subscribe),
                can_publish_data: Some(can_publish),
                can_update_own_metadata: Some(true),
                ..VideoGrant::default()
            },
        };
        let jwt = self.inner.signer.sign(&claims)?;
        self.inner.calls.issued(
            IssuedParticipant {
                room_name: room.clone(),
                identity: identity.clone(),
                room_id: req.room_id.clone(),
                user_id: user_id.clone(),
                device_id: req.device_id.clone(),
                relay: false,
            },
            Duration::from_secs(auth.token_lifetime_secs),
        );
        self.hand_over_delay(&req, &who, false).await?;
        tracing::info!(
            user_id = %user_id,
            room_id = %req.room_id,
            sfu_room = %room,
            identity = %identity,
            full_access,
            "SFU token issued"
        );
        Ok(TokenResponse {
            url: settings.livekit_public_url.clone(),
            jwt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_are_named() {
        let r: TokenRequest = parse_body(br#"{"room_id":"!a:b","extra":1}"#).unwrap();
        let err = Normalized::from_token_request(r).err().unwrap();
        assert_eq!(err.to_string(), "The request body is missing `slot_id`");
        let r: TokenRequest = parse_body(
            br#"{"room_id":"!a:b","slot_id":"m.call#ROOM","member":{"id":"x","claimed_user_id":"@u:b"}}"#,
        )
        .unwrap();
        let err = Normalized::from_token_request(r).err().unwrap();
        assert!(
            err.to_string().contains("member.claimed_device_id"),
            "{err}"
        );
        let r: LegacyRequest = parse_body(br#"{"room":"!a:b","device_id":"D"}"#).unwrap();
        let err = Normalized::from_legacy(r).err().unwrap();
        assert!(err.to_string().contains("openid_token"), "{err}");
    }

    #[test]
    fn wrong_types_and_non_json() {
        assert!(matches!(
            parse_body::<LegacyRequest>(b"{nope"),
            Err(AuthError::NotJson(_))
        ));
        let err = parse_body::<LegacyRequest>(br#"{"room": 5}"#).unwrap_err();
        assert!(err.to_string().contains("room"), "{err}");
    }

    #[test]
    fn forwarded_bodies_need_a_member_and_its_device() {
        let user = OwnedUserId::try_from("@a:b").unwrap();
        let r: RtcRequest = parse_body(
            br#"{"room_id":"!r:b","slot_id":"m.call#ROOM","url":"ws://x","member":{"id":"m"}}"#,
        )
        .unwrap();
        let err = Normalized::from_rtc(r, user.clone()).err().unwrap();
        assert!(
            err.to_string().contains("member.claimed_device_id"),
            "{err}"
        );
        // The MSC's flat `member_id` stands for `member.id`.
        let r: RtcRequest = parse_body(
            br#"{"room_id":"!r:b","slot_id":"s","member_id":"m","member":{"claimed_device_id":"D"}}"#,
        )
        .unwrap();
        let n = Normalized::from_rtc(r, user).unwrap();
        assert_eq!(n.member_id.as_deref(), Some("m"));
        assert_eq!(n.device_id, "D");
        assert!(matches!(n.caller, Caller::Vouched(_)));
        assert!(!n.subscribe_only);
    }

    #[test]
    fn delay_fields_come_in_pairs() {
        assert!(parse_delay(Some("d".into()), None).is_err());
        assert!(parse_delay(None, Some(5)).is_err());
        assert!(parse_delay(Some("d".into()), Some(0)).is_err());
        assert_eq!(
            parse_delay(Some("d".into()), Some(5)).unwrap(),
            Some(("d".into(), 5))
        );
    }
}
