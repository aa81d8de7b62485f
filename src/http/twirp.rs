//! The LiveKit RoomService API over Twirp: `POST /twirp/livekit.RoomService/{Method}`, as
//! server SDKs (server-sdk-go, Python `livekit-api`) and lk-jwt-service call it.
//!
//! Requests and replies are protobuf (`application/protobuf`) or protojson
//! (`application/json`, lowerCamel or proto field names accepted); the reply uses the
//! request's encoding. Callers authenticate with a LiveKit JWT (`Authorization: Bearer`)
//! signed with `livekit.key`/`livekit.secret`: `CreateRoom`/`DeleteRoom` need `roomCreate`,
//! `ListRooms` needs `roomList`, everything about one room needs `roomAdmin` with
//! `video.room` = that room. Errors are Twirp JSON (`{"code":"not_found","msg":"…"}`) with
//! Twirp's HTTP statuses. `rtc.twirp_enabled = false` turns every route into `bad_route`.
//!
//! Rooms are read from the [`crate::sfu::registry`] view (lifetimes, metadata) and changed
//! through [`crate::net::SfuHandle`] (the engine owns them), like participants and tracks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use livekit_protocol as lk;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::auth::jwt::Claims;
use crate::auth::jwt::TokenSigner;
use crate::net::SfuHandle;
use crate::sfu::ids::{ParticipantIdentity, RoomName, TrackSid};
use crate::sfu::limits::{self, LimitExceeded};
use crate::sfu::registry::RoomRegistry;
use crate::sfu::registry::{RegisteredRoom, RoomOptions};
use crate::sfu::Command;

/// The one Twirp service served.
pub const ROOM_SERVICE: &str = "livekit.RoomService";
/// Largest request body, in bytes (a `SendData` payload plus framing).
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest `SendData` payload, in bytes (one SCTP message towards every participant).
const MAX_DATA_BYTES: usize = 64 * 1024;

/// A Twirp error: code, HTTP status and a message for the caller.
#[derive(Debug, thiserror::Error)]
pub enum TwirpError {
    /// No or an invalid token (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// The token lacks the grant (403).
    #[error("{0}")]
    PermissionDenied(String),
    /// No such room, participant or track (404).
    #[error("{0}")]
    NotFound(String),
    /// A field has a bad value (400).
    #[error("{0}")]
    InvalidArgument(String),
    /// The body does not decode (400).
    #[error("{0}")]
    Malformed(String),
    /// Unknown service or method, wrong HTTP method or content type, or the API is off (404).
    #[error("{0}")]
    BadRoute(String),
    /// The operation is not allowed in this state (412).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The SFU is not running (503).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure (500); the caller sees a generic message.
    #[error("{0}")]
    Internal(String),
}

impl TwirpError {
    /// The Twirp error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
            Self::NotFound(_) => "not_found",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::Malformed(_) => "malformed",
            Self::BadRoute(_) => "bad_route",
            Self::FailedPrecondition(_) => "failed_precondition",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// The HTTP status Twirp uses for the code.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) | Self::BadRoute(_) => StatusCode::NOT_FOUND,
            Self::InvalidArgument(_) | Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::FailedPrecondition(_) => StatusCode::PRECONDITION_FAILED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for TwirpError {
    fn into_response(self) -> Response {
        let msg = match &self {
            Self::Internal(cause) => {
                tracing::error!(%cause, "RoomService request failed");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let body = serde_json::json!({ "code": self.code(), "msg": msg });
        let mut r = (self.status(), body.to_string()).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

type TwirpResult = Result<Response, TwirpError>;

/// The request (and reply) encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn of(headers: &HeaderMap) -> Result<Self, TwirpError> {
        let raw = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = raw.split(';').next().unwrap_or("").trim();
        match essence.to_ascii_lowercase().as_str() {
            "application/protobuf" | "application/x-protobuf" => Ok(Self::Protobuf),
            "application/json" => Ok(Self::Json),
            _ => Err(TwirpError::BadRoute(format!(
                "unexpected Content-Type: {raw:?}"
            ))),
        }
    }

    fn decode<T: prost::Message + Default + DeserializeOwned>(
        self,
        body: &[u8],
    ) -> Result<T, TwirpError> {
        match self {
            Self::Protobuf => T::decode(body).map_err(|e| {
                TwirpError::Malformed(format!("the request is not valid protobuf: {e}"))
            }),
            Self::Json => serde_json::from_slice(body)
                .map_err(|e| TwirpError::Malformed(format!("the request is not valid JSON: {e}"))),
        }
    }

    fn reply<T: prost::Message + Serialize>(self, message: &T) -> TwirpResult {
        let (bytes, content_type) = match self {
            Self::Protobuf => (message.encode_to_vec(), "application/protobuf"),
            Self::Json => (
                serde_json::to_vec(message)
                    .map_err(|e| TwirpError::Internal(format!("encoding JSON reply: {e}")))?,
                "application/json",
            ),
        };
        let mut r = (StatusCode::OK, bytes).into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        Ok(r)
    }
}

/// What the RoomService API uses.
#[derive(Clone)]
pub struct TwirpState {
    /// `rtc.twirp_enabled`.
    pub enabled: bool,
    /// Verifies the callers' LiveKit tokens.
    pub signer: TokenSigner,
    /// The SFU loop, for every change and live snapshot.
    pub sfu: SfuHandle,
    /// The SFU's room view (lifetimes, metadata).
    pub rooms: Arc<RoomRegistry>,
}

/// `/twirp/{*path}` (any HTTP method): `path` is `{service}/{method}`.
pub async fn handle(
    State(state): State<TwirpState>,
    Path(path): Path<String>,
    request: Request,
) -> Response {
    let (service, method) = path.split_once('/').unwrap_or((path.as_str(), ""));
    match serve(&state, service, method, request).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve(state: &TwirpState, service: &str, method: &str, request: Request) -> TwirpResult {
    if !state.enabled {
        return Err(TwirpError::BadRoute(
            "the RoomService API is disabled (rtc.twirp_enabled)".into(),
        ));
    }
    let path = format!("/twirp/{service}/{method}");
    if service != ROOM_SERVICE || !METHODS.contains(&method) {
        return Err(TwirpError::BadRoute(format!(
            "no handler for path {path:?}"
        )));
    }
    if request.method() != Method::POST {
        return Err(TwirpError::BadRoute(format!(
            "unsupported method {} (only POST is allowed)",
            request.method()
        )));
    }
    let encoding = Encoding::of(request.headers())?;
    let claims = authenticate(state, request.headers())?;
    let body = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|e| TwirpError::Malformed(format!("cannot read the request body: {e}")))?;
    let call = Call {
        state,
        claims,
        encoding,
        body: &body,
    };
    tracing::debug!(method, "RoomService call");
    match method {
        "CreateRoom" => call.create_room().await,
        "ListRooms" => call.list_rooms().await,
        "DeleteRoom" => call.delete_room().await,
        "ListParticipants" => call.list_participants().await,
        "GetParticipant" => call.get_participant().await,
        "RemoveParticipant" => call.remove_participant().await,
        "MutePublishedTrack" => call.mute_published_track().await,
        "UpdateParticipant" => call.update_participant().await,
        "UpdateSubscriptions" => call.update_subscriptions().await,
        "SendData" => call.send_data().await,
        "UpdateRoomMetadata" => call.update_room_metadata().await,
        _ => Err(TwirpError::BadRoute(format!(
            "no handler for path {path:?}"
        ))),
    }
}

/// The RoomService methods served.
const METHODS: &[&str] = &[
    "CreateRoom",
    "ListRooms",
    "DeleteRoom",
    "ListParticipants",
    "GetParticipant",
    "RemoveParticipant",
    "MutePublishedTrack",
    "UpdateParticipant",
    "UpdateSubscriptions",
    "SendData",
    "UpdateRoomMetadata",
];

fn authenticate(state: &TwirpState, headers: &HeaderMap) -> Result<Claims, TwirpError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| TwirpError::Unauthenticated("no Authorization header".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TwirpError::Unauthenticated("Authorization is not a Bearer token".into()))?;
    state
        .signer
        .verify(token, crate::clock::unix_secs())
        .map_err(|e| TwirpError::Unauthenticated(format!("invalid token: {e}")))
}

/// One authenticated call.
struct Call<'a> {
    state: &'a TwirpState,
    claims: Claims,
    encoding: Encoding,
    body: &'a [u8],
}

impl Call<'_> {
    fn decode<T: prost::Message + Default + DeserializeOwned>(&self) -> Result<T, TwirpError> {
        self.encoding.decode(self.body)
    }

    fn require_create(&self) -> Result<(), TwirpError> {
        if self.claims.video.room_create {
            Ok(())
        } else {
            Err(TwirpError::PermissionDenied(
                "the token lacks the roomCreate grant".into(),
            ))
        }
    }

    fn require_list(&self) -> Result<(), TwirpError> {
        if self.claims.video.room_list {
            Ok(())
        } else {
            Err(TwirpError::PermissionDenied(
                "the token lacks the roomList grant".into(),
            ))
        }
    }

    fn require_admin(&self, room: &str) -> Result<(), TwirpError> {
        if room.is_empty() {
            return Err(TwirpError::InvalidArgument("room is required".into()));
        }
        if self.claims.video.room_admin && self.claims.video.room == room {
            Ok(())
        } else {
            Err(TwirpError::PermissionDenied(format!(
                "the token lacks the roomAdmin grant for room {room:?}"
            )))
        }
    }

    fn sfu(&self) -> Result<&SfuHandle, TwirpError> {
        Ok(&self.state.sfu)
    }

    async fn command(&self, command: Command) -> Result<(), TwirpError> {
        if self.sfu()?.command(command).await {
            Ok(())
        } else {
            Err(TwirpError::Unavailable("the SFU is not running".into()))
        }
    }

    /// The full room info: registry (SID, lifetimes, metadata, creation) plus the engine's
    /// live fields (counts). The SID is the room's from its creation, participants or not.
    async fn room(&self, reg: &RegisteredRoom) -> lk::Room {
        let live = self.state.sfu.room_info(&reg.name).await;
        let mut room = live.unwrap_or_default();
        let created = reg.created_unix;
        room.sid = reg.sid.to_string();
        room.name = reg.name.to_string();
        room.empty_timeout = secs(reg.options.empty_timeout);
        room.departure_timeout = secs(reg.options.departure_timeout);
        room.max_participants = reg.options.max_participants;
        room.metadata = reg.metadata.clone();
        room.creation_time = created;
        room.creation_time_ms = created * 1000;
        room.enabled_codecs = ["video/VP8", "video/H264", "audio/opus"]
            .into_iter()
            .map(|mime| lk::Codec {
                mime: mime.into(),
                fmtp_line: String::new(),
            })
            .collect();
        room
    }

    /// The registered room `name`, or whether the engine still has it (connected participants
    /// of a room the registry dropped).
    async fn existing_room(&self, name: &RoomName) -> Result<Option<RegisteredRoom>, TwirpError> {
        if let Some(reg) = self.state.rooms.get(name.as_str(), Instant::now()) {
            return Ok(Some(reg));
        }
        let live = self.state.sfu.room_info(name).await;
        match live {
            Some(_) => Ok(None),
            None => Err(room_not_found(name.as_str())),
        }
    }

    async fn participant(
        &self,
        room: &RoomName,
        identity: &ParticipantIdentity,
    ) -> Result<lk::ParticipantInfo, TwirpError> {
        if identity.is_empty() {
            return Err(TwirpError::InvalidArgument("identity is required".into()));
        }
        let sfu = self.sfu()?;
        match sfu.participant(room, identity).await {
            Some(p) => Ok(p),
            None => {
                // Distinguish an unknown room from an absent participant in the message.
                self.existing_room(room).await?;
                Err(TwirpError::NotFound(format!(
                    "participant {identity:?} is not in room {room:?}"
                )))
            }
        }
    }

    // ------------------------------------------------------------------ rooms

    async fn create_room(&self) -> TwirpResult {
        self.require_create()?;
        let req: lk::CreateRoomRequest = self.decode()?;
        let name = req.name.trim();
        if name.is_empty() || name != req.name {
            return Err(TwirpError::InvalidArgument(
                "name is required (no surrounding spaces)".into(),
            ));
        }
        limits::check_room_name(name).map_err(over_limit)?;
        limits::check_room_metadata(&req.metadata).map_err(over_limit)?;
        let defaults = RoomOptions::default();
        let options = RoomOptions {
            empty_timeout: nonzero_secs(req.empty_timeout, defaults.empty_timeout),
            departure_timeout: nonzero_secs(req.departure_timeout, defaults.departure_timeout),
            max_participants: req.max_participants,
        };
        let room_name = RoomName::from(name);
        let sfu = self.sfu()?;
        let created = sfu.create_room(&room_name, options).await;
        if created && !req.metadata.is_empty() {
            sfu.set_room_metadata(&room_name, &req.metadata).await;
        }
        tracing::info!(room = name, created, "RoomService CreateRoom");
        let reg =
            self.state.rooms.get(name, Instant::now()).ok_or_else(|| {
                TwirpError::Internal(format!("room {name:?} vanished on creation"))
            })?;
        let room = self.room(&reg).await;
        self.encoding.reply(&room)
    }

    async fn list_rooms(&self) -> TwirpResult {
        self.require_list()?;
        let req: lk::ListRoomsRequest = self.decode()?;
        let mut rooms = Vec::new();
        for reg in self.state.rooms.list(Instant::now()) {
            if req.names.is_empty() || req.names.iter().any(|n| reg.name == n.as_str()) {
                rooms.push(self.room(&reg).await);
            }
        }
        self.encoding.reply(&lk::ListRoomsResponse { rooms })
    }

    async fn delete_room(&self) -> TwirpResult {
        self.require_create()?;
        let req: lk::DeleteRoomRequest = self.decode()?;
        if req.room.is_empty() {
            return Err(TwirpError::InvalidArgument("room is required".into()));
        }
        let room = RoomName::from(req.room.as_str());
        if !self.sfu()?.delete_room(&room).await {
            return Err(room_not_found(&req.room));
        }
        tracing::info!(%room, "RoomService DeleteRoom");
        self.encoding.reply(&lk::DeleteRoomResponse {})
    }

    async fn update_room_metadata(&self) -> TwirpResult {
        let req: lk::UpdateRoomMetadataRequest = self.decode()?;
        self.require_admin(&req.room)?;
        limits::check_room_metadata(&req.metadata).map_err(over_limit)?;
        let name = RoomName::from(req.room.as_str());
        if !self.sfu()?.set_room_metadata(&name, &req.metadata).await {
            return Err(room_not_found(&req.room));
        }
        let reg = self
            .state
            .rooms
            .get(&req.room, Instant::now())
            .ok_or_else(|| room_not_found(&req.room))?;
        let room = self.room(&reg).await;
        self.command(Command::UpdateRoom {
            room: name,
            info: Box::new(room.clone()),
        })
        .await?;
        self.encoding.reply(&room)
    }

    // ------------------------------------------------------------------ participants

    async fn list_participants(&self) -> TwirpResult {
        let req: lk::ListParticipantsRequest = self.decode()?;
        self.require_admin(&req.room)?;
        let room = RoomName::from(req.room);
        self.existing_room(&room).await?;
        let participants = self.sfu()?.participants(&room).await;
        self.encoding
            .reply(&lk::ListParticipantsResponse { participants })
    }

    async fn get_participant(&self) -> TwirpResult {
        let req: lk::RoomParticipantIdentity = self.decode()?;
        self.require_admin(&req.room)?;
        let (room, identity) = ids(req.room, req.identity);
        let p = self.participant(&room, &identity).await?;
        self.encoding.reply(&p)
    }

    async fn remove_participant(&self) -> TwirpResult {
        let req: lk::RoomParticipantIdentity = self.decode()?;
        self.require_admin(&req.room)?;
        let (room, identity) = ids(req.room, req.identity);
        self.participant(&room, &identity).await?;
        tracing::info!(%room, %identity, "RoomService RemoveParticipant");
        if !self
            .sfu()?
            .remove(&room, &identity, lk::DisconnectReason::ParticipantRemoved)
            .await
        {
            return Err(TwirpError::Unavailable("the SFU is not running".into()));
        }
        self.encoding.reply(&lk::RemoveParticipantResponse {})
    }

    async fn mute_published_track(&self) -> TwirpResult {
        let req: lk::MuteRoomTrackRequest = self.decode()?;
        self.require_admin(&req.room)?;
        let (room, identity) = ids(req.room.clone(), req.identity.clone());
        let p = self.participant(&room, &identity).await?;
        if !p.tracks.iter().any(|t| t.sid == req.track_sid) {
            return Err(TwirpError::NotFound(format!(
                "track {:?} is not published by {:?}",
                req.track_sid, req.identity
            )));
        }
        if !req.muted {
            // LiveKit's default (`room.enable_remote_unmute: false`): only the publisher unmutes.
            return Err(TwirpError::FailedPrecondition(
                "remote unmute not enabled".into(),
            ));
        }
        self.command(Command::MuteTrack {
            room: room.clone(),
            identity: identity.clone(),
            track_sid: TrackSid::from(req.track_sid.as_str()),
            muted: req.muted,
        })
        .await?;
        let track = self
            .sfu()?
            .participant(&room, &identity)
            .await
            .and_then(|p| p.tracks.into_iter().find(|t| t.sid == req.track_sid));
        self.encoding.reply(&lk::MuteRoomTrackResponse { track })
    }

    async fn update_participant(&self) -> TwirpResult {
        let req: lk::UpdateParticipantRequest = self.decode()?;
        self.require_admin(&req.room)?;
        let (room, identity) = ids(req.room, req.identity);
        let current = self.participant(&room, &identity).await?;
        check_update_participant(&current, &req.name, &req.metadata, &req.attributes)?;
        self.command(Command::UpdateParticipant {
            room: room.clone(),
            identity: identity.clone(),
            metadata: req.metadata,
            name: req.name,
            attributes: req.attributes,
            permission: req.permission,
        })
        .await?;
        let p = self.participant(&room, &identity).await?;
        self.encoding.reply(&p)
    }

    async fn update_subscriptions(&self) -> TwirpResult {
        let req: lk::UpdateSubscriptionsRequest = self.decode()?;
        self.require_admin(&req.room)?;
        let (room, identity) = ids(req.room, req.identity);
        self.participant(&room, &identity).await?;
        let mut track_sids: Vec<TrackSid> =
            req.track_sids.into_iter().map(TrackSid::from).collect();
        for pt in req.participant_tracks {
            track_sids.extend(pt.track_sids.into_iter().map(TrackSid::from));
        }
        self.command(Command::UpdateSubscriptions {
            room,
            identity,
            track_sids,
            subscribe: req.subscribe,
        })
        .await?;
        self.encoding.reply(&lk::UpdateSubscriptionsResponse {})
    }

    async fn send_data(&self) -> TwirpResult {
        let req: lk::SendDataRequest = self.decode()?;
        self.require_admin(&req.room)?;
        if req.data.len() > MAX_DATA_BYTES {
            return Err(TwirpError::InvalidArgument(format!(
                "data is larger than {MAX_DATA_BYTES} bytes"
            )));
        }
        let kind = lk::data_packet::Kind::try_from(req.kind)
            .map_err(|_| TwirpError::InvalidArgument(format!("unknown kind {}", req.kind)))?;
        let room = RoomName::from(req.room);
        self.existing_room(&room).await?;
        #[allow(deprecated)] // `kind` and the user packet's destinations are what clients read
        let packet = lk::DataPacket {
            kind: kind as i32,
            destination_identities: req.destination_identities.clone(),
            value: Some(lk::data_packet::Value::User(lk::UserPacket {
                payload: req.data,
                destination_identities: req.destination_identities,
                topic: req.topic,
                nonce: req.nonce,
                ..Default::default()
            })),
            ..Default::default()
        };
        self.command(Command::SendData {
            room,
            packet: Box::new(packet),
            reliable: kind == lk::data_packet::Kind::Reliable,
        })
        .await?;
        self.encoding.reply(&lk::SendDataResponse {})
    }
}

/// A request's room name and identity as typed ids.
fn ids(room: String, identity: String) -> (RoomName, ParticipantIdentity) {
    (RoomName::from(room), ParticipantIdentity::from(identity))
}

/// An over-the-limit value as LiveKit answers it: `invalid_argument`.
fn over_limit(e: LimitExceeded) -> TwirpError {
    TwirpError::InvalidArgument(e.to_string())
}

/// `UpdateParticipant`'s name, metadata and attributes against the limits, the participant's
/// attributes after the update included.
fn check_update_participant(
    current: &lk::ParticipantInfo,
    name: &str,
    metadata: &str,
    attributes: &std::collections::HashMap<String, String>,
) -> Result<(), TwirpError> {
    limits::check_participant_update(&current.attributes, name, metadata, attributes)
        .map_err(over_limit)
}

fn room_not_found(room: &str) -> TwirpError {
    TwirpError::NotFound(format!("requested room {room:?} does not exist"))
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn nonzero_secs(v: u32, default: Duration) -> Duration {
    if v == 0 {
        default
    } else {
        Duration::from_secs(u64::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_and_statuses() {
        let cases = [
            (
                TwirpError::Unauthenticated(String::new()),
                "unauthenticated",
                401,
            ),
            (
                TwirpError::PermissionDenied(String::new()),
                "permission_denied",
                403,
            ),
            (TwirpError::NotFound(String::new()), "not_found", 404),
            (
                TwirpError::InvalidArgument(String::new()),
                "invalid_argument",
                400,
            ),
            (TwirpError::Malformed(String::new()), "malformed", 400),
            (TwirpError::BadRoute(String::new()), "bad_route", 404),
            (TwirpError::Internal(String::new()), "internal", 500),
        ];
        for (e, code, status) in cases {
            assert_eq!(e.code(), code);
            assert_eq!(e.status().as_u16(), status);
        }
    }

    #[test]
    fn json_accepts_camel_and_proto_names_and_protobuf_round_trips() {
        let camel: lk::CreateRoomRequest = Encoding::Json
            .decode(br#"{"name":"r","emptyTimeout":5,"departureTimeout":7,"maxParticipants":2}"#)
            .unwrap();
        let proto: lk::CreateRoomRequest = Encoding::Json
            .decode(br#"{"name":"r","empty_timeout":5,"departure_timeout":7,"max_participants":2}"#)
            .unwrap();
        assert_eq!(camel, proto);
        assert_eq!(camel.max_participants, 2);
        let bytes = prost::Message::encode_to_vec(&camel);
        let back: lk::CreateRoomRequest = Encoding::Protobuf.decode(&bytes).unwrap();
        assert_eq!(back, camel);
        assert!(matches!(
            Encoding::Json.decode::<lk::CreateRoomRequest>(b"nope"),
            Err(TwirpError::Malformed(_))
        ));
    }

    #[test]
    fn values_over_the_limits_are_invalid_arguments() {
        let mib = "x".repeat(1024 * 1024);
        let current = lk::ParticipantInfo {
            attributes: [("a".to_owned(), "v".repeat(40_000))].into(),
            ..Default::default()
        };
        let none = std::collections::HashMap::new();
        let big = [("k".to_owned(), mib.clone())].into();
        let adds_up = [("b".to_owned(), "v".repeat(30_000))].into();
        for (name, metadata, attributes, what) in [
            ("", mib.as_str(), &none, "metadata"),
            (mib.as_str(), "", &none, "name"),
            ("", "", &big, "attributes"),
            ("", "", &adds_up, "attributes"),
        ] {
            let e = check_update_participant(&current, name, metadata, attributes).expect_err(what);
            assert_eq!(e.code(), "invalid_argument");
            assert_eq!(e.status().as_u16(), 400);
            assert!(e.to_string().contains(what), "{e}");
        }
        assert!(check_update_participant(&current, "Bob", "meta", &none).is_ok());
        let e = limits::check_room_metadata(&mib)
            .map_err(over_limit)
            .unwrap_err();
        assert_eq!(e.code(), "invalid_argument");
        assert!(e.to_string().contains("room metadata"), "{e}");
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(matches!(Encoding::of(&h), Err(TwirpError::BadRoute(_))));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert_eq!(Encoding::of(&h).unwrap(), Encoding::Json);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/protobuf"),
        );
        assert_eq!(Encoding::of(&h).unwrap(), Encoding::Protobuf);
    }
}
