//! `GET /rtc` and `GET /rtc/v1`: LiveKit signalling (protocol 17; v0 with two peer
//! connections, v1 with one, `docs/design/rtc-v1.md`) over WebSocket.
//!
//! Everything is checked and the participant joined *before* the upgrade; the first frame
//! after it is the `join` response. Binary frames carry protobuf `SignalRequest`s; text frames
//! protojson, answered in kind. Pings are answered here; everything else goes to the SFU loop.
//!
//! A client must keep up: an incoming message may be at most [`MAX_MESSAGE_BYTES`], a frame
//! that the client does not take within [`SEND_TIMEOUT`] ends the session, and so does a full
//! signal queue (the loop's side, [`crate::net::queue`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::validate::{check_connect, check_connect_v1};
use super::SignalState;
use crate::auth::jwt::Claims;
use crate::net::{session_queue, SfuHandle, SignalQueue, QUEUE_FULL_REASON};
use crate::sfu::ids::{ParticipantIdentity, RoomName};
use crate::sfu::registry::RoomOptions;
use crate::sfu::{Command, Join, SessionId, SignalOut};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Msg;
use prost::Message as _;

/// How long the SFU may take to produce the join response.
const JOIN_WAIT: Duration = Duration::from_secs(4);
/// WebSocket ping frames, as LiveKit (`wsprotocol.go`).
const WS_PING_EVERY: Duration = Duration::from_secs(10);
/// `refresh_token` cadence.
const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// Undecodable frames tolerated before the session is closed.
const MAX_BAD_FRAMES: u32 = 50;
/// Largest incoming WebSocket message (and frame), in bytes: far above any legitimate request
/// (an SDP offer, or a metadata update at the limits of [`crate::sfu::limits`], about 130 kB),
/// far below tungstenite's 64 MiB default. A larger one ends the session with close code 1009.
pub const MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;
/// Each session's WebSocket read buffer. Why not tungstenite's default: it allocates its read
/// buffer eagerly, 128 KiB per session, which was 38 % of the whole heap with 150 idle
/// participants (heaptrack, `docs/performance.md`). Signal messages are small (an SDP offer
/// of 10-15 KB takes a few reads); larger messages still arrive, up to [`MAX_MESSAGE_BYTES`].
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// How long one frame may take to go out: a client that does not take it in that time is
/// disconnected ([`QUEUE_FULL_REASON`]). The join response's `ping_timeout` (15 s): a client
/// that gets nothing for that long takes the server for dead anyway.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(15);

fn text(status: StatusCode, body: &str) -> Response {
    (status, body.to_owned()).into_response()
}

fn flag(query: &HashMap<String, String>, key: &str, default: bool) -> bool {
    match query.get(key).map(String::as_str) {
        Some("1") | Some("true") => true,
        Some("0") | Some("false") => false,
        _ => default,
    }
}

/// A peer Conclave's relay connections are hidden participants named `cascade:<server>` (its
/// roster) or `cascade:<server>|<identity>` (one participant's media), as only
/// [`crate::auth::tokens::TokenService::relay_grant`] mints them (`docs/cascade.md`).
fn cascade_role(claims: &Claims) -> crate::sfu::CascadeRole {
    use crate::auth::tokens::cascade::RELAY_IDENTITY_PREFIX;
    match claims.sub.strip_prefix(RELAY_IDENTITY_PREFIX) {
        Some(rest) if claims.video.hidden && claims.video.can_publish == Some(false) => {
            if rest.contains('|') {
                crate::sfu::CascadeRole::Relay
            } else {
                crate::sfu::CascadeRole::Roster
            }
        }
        _ => crate::sfu::CascadeRole::None,
    }
}

/// `GET /rtc/v1`: single peer connection signalling (`docs/design/rtc-v1.md`). Without
/// `rtc.single_pc`, a plain 404 (never mentioning rooms) that makes every current SDK fall back
/// to `/rtc` at once; with it, the v1 connect: the token and the `join_request` are checked,
/// the participant joins with one peer connection, and the request's track announcements and
/// publisher offer go to the SFU right after the join.
pub async fn get_rtc_v1(
    State(state): State<Arc<SignalState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !state.single_pc {
        return v1_not_served();
    }
    connect(state, headers, query, ws, Signalling::V1).await
}

/// The answer of `/rtc/v1` and (without `rtc.single_pc`) `/rtc/v1/validate`: a plain 404 with
/// CORS, on which client-sdk-js retries on `/rtc` and the Rust SDK too.
pub fn v1_not_served() -> Response {
    let mut r = text(
        StatusCode::NOT_FOUND,
        "v1 signalling is not supported by this server; use /rtc",
    );
    // Browsers call the validate URL with fetch from the page's origin: without CORS the SDK
    // never sees the 404 and does not fall back.
    r.headers_mut().insert(
        axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
        axum::http::HeaderValue::from_static("*"),
    );
    r
}

/// `GET /rtc`: validate, join, upgrade (v0, two peer connections).
pub async fn get_rtc(
    State(state): State<Arc<SignalState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    connect(state, headers, query, ws, Signalling::V0).await
}

/// The signalling version a connect asked for (by its path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signalling {
    /// `/rtc`: settings in the query, two peer connections.
    V0,
    /// `/rtc/v1`: settings in the `join_request`, one peer connection.
    V1,
}

/// What a connect asks for, from the query (v0) or the `join_request` (v1).
struct Settings {
    /// `reconnect=1` / `JoinRequest.reconnect`: a resume attempt.
    reconnect: bool,
    /// The participant SID a resume names (`sid=` / `JoinRequest.participant_sid`).
    sid: Option<String>,
    /// Subscribe to every track automatically.
    auto_subscribe: bool,
    /// The client's `client_protocol`.
    client_protocol: i32,
    /// Metadata replacing the token's, when set (v1 only; checked by `check_connect_v1`).
    metadata: Option<String>,
    /// Participant attributes (v1 only; checked by `check_connect_v1`; tokens carry none).
    attributes: HashMap<String, String>,
    /// Requests the SFU gets right after the join (v1: the `add_track_requests`, then the
    /// `publisher_offer`), in order.
    after_join: Vec<Req>,
}

impl Settings {
    /// v0: everything from the query parameters.
    fn v0(query: &HashMap<String, String>) -> Self {
        Settings {
            reconnect: flag(query, "reconnect", false),
            sid: query.get("sid").cloned(),
            auto_subscribe: flag(query, "auto_subscribe", true),
            client_protocol: query
                .get("client_protocol")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            metadata: None,
            attributes: HashMap::new(),
            after_join: Vec::new(),
        }
    }

    /// v1: everything from the `JoinRequest`, mapped as LiveKit does (`rtcservice.go`):
    /// an absent `connection_settings` means no auto-subscribe; `metadata` and
    /// `participant_attributes` (checked by `check_connect_v1`) become the participant's.
    fn v1(request: lk::JoinRequest) -> Self {
        let mut after_join: Vec<Req> = request
            .add_track_requests
            .into_iter()
            .map(Req::AddTrack)
            .collect();
        if let Some(offer) = request.publisher_offer {
            after_join.push(Req::Offer(offer));
        }
        Settings {
            reconnect: request.reconnect,
            sid: (!request.participant_sid.is_empty()).then_some(request.participant_sid),
            auto_subscribe: request
                .connection_settings
                .map(|c| c.auto_subscribe)
                .unwrap_or(false),
            client_protocol: request.client_info.map(|c| c.client_protocol).unwrap_or(0),
            metadata: (!request.metadata.is_empty()).then_some(request.metadata),
            attributes: request.participant_attributes,
            after_join,
        }
    }
}

/// The connect shared by `/rtc` and `/rtc/v1`: validate, join, feed the v1 requests, upgrade.
async fn connect(
    state: Arc<SignalState>,
    headers: HeaderMap,
    query: HashMap<String, String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    signalling: Signalling,
) -> Response {
    let Ok(ws) = ws else {
        // LiveKit answers a non-upgrade request to /rtc (and /rtc/v1) with 404.
        return text(StatusCode::NOT_FOUND, "WebSocket upgrade required");
    };
    let ws = ws
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .read_buffer_size(READ_BUFFER_BYTES);
    let sfu = state.sfu.clone();
    let checked = match signalling {
        Signalling::V0 => check_connect(
            &state,
            &headers,
            &query,
            Instant::now(),
            crate::clock::unix_secs(),
            state.auto_create,
        )
        .map(|claims| (claims, Settings::v0(&query))),
        Signalling::V1 => check_connect_v1(
            &state,
            &headers,
            &query,
            Instant::now(),
            crate::clock::unix_secs(),
            state.auto_create,
        )
        .map(|(claims, request)| (claims, Settings::v1(request))),
    };
    let (claims, mut settings) = match checked {
        Ok(c) => c,
        Err(r) => return text(r.status, &r.message),
    };
    let room = RoomName::from(claims.video.room.as_str());
    if state.auto_create && !state.rooms.exists(room.as_str(), Instant::now()) {
        // Auto-create (check_connect let a missing room through only then).
        sfu.create_room(&room, RoomOptions::default()).await;
    }
    let identity = ParticipantIdentity::from(claims.sub.as_str());
    if settings.reconnect {
        if let Some(sid) = settings.sid.take() {
            let (sink, events) = session_queue();
            let ice = ice_servers(&state);
            if let Some((session, epoch)) = sfu.resume(&room, &identity, &sid, ice, sink).await {
                let resumed = Resumed {
                    session,
                    epoch,
                    events,
                };
                return resume(state, sfu, ws, claims, settings, resumed).await;
            }
        }
        // Nothing to resume (unknown session, resume off, or a v0 client): the client must
        // rejoin in full, which a leave asking to reconnect makes every SDK do.
        return ws.on_upgrade(|mut socket| async move {
            let leave = Msg::Leave(lk::LeaveRequest {
                can_reconnect: true,
                reason: lk::DisconnectReason::StateMismatch as i32,
                action: lk::leave_request::Action::Reconnect as i32,
                regions: None,
            });
            let _ = send(&mut socket, encode(&leave, false)).await;
            let _ = send(&mut socket, close_frame()).await;
        });
    }
    let session = sfu.new_session(&room);
    let (sink, events) = session_queue();
    let join = Join {
        session,
        room,
        identity,
        name: claims.name.clone(),
        metadata: settings
            .metadata
            .take()
            .unwrap_or_else(|| claims.metadata.clone()),
        attributes: std::mem::take(&mut settings.attributes),
        permission: claims.permission(),
        auto_subscribe: settings.auto_subscribe,
        client_protocol: settings.client_protocol,
        single_pc: signalling == Signalling::V1,
        ice_servers: ice_servers(&state),
        cascade: cascade_role(&claims),
    };
    if !sfu.open(sink, join).await {
        return text(StatusCode::SERVICE_UNAVAILABLE, "SFU not running");
    }
    let is_join = |m: &Msg| matches!(m, Msg::Join(_));
    let failure = lk::DisconnectReason::JoinFailure;
    let (first, events) = match open_session(
        &sfu,
        (session, 0),
        events,
        is_join,
        failure,
        settings.after_join,
    )
    .await
    {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    crate::metrics::inc(match signalling {
        Signalling::V0 => &state.metrics.signal_sessions_v0,
        Signalling::V1 => &state.metrics.signal_sessions_v1,
    });
    let span =
        tracing::info_span!("signal", %session, identity = %claims.sub, room = %claims.video.room);
    ws.on_upgrade(move |socket| {
        let fut = run_session(state, sfu, socket, (session, 0), claims, first, events);
        tracing::Instrument::instrument(fut, span)
    })
}

/// Waits for a session's first message (`expected`: the join or the reconnect response),
/// then feeds the join request's requests (v1: its tracks, then its offer, as LiveKit's
/// `roommanager.go`): the SFU loop handles commands in order, so their answers queue after
/// that first message. On failure the session is hung up with `failure`.
async fn open_session(
    sfu: &SfuHandle,
    (session, epoch): (SessionId, u32),
    mut events: SignalQueue,
    expected: fn(&Msg) -> bool,
    failure: lk::DisconnectReason,
    after_join: Vec<Req>,
) -> Result<(Msg, SignalQueue), Response> {
    let first = match tokio::time::timeout(JOIN_WAIT, events.recv()).await {
        Ok(Some(SignalOut::Message(m))) if expected(&m) => *m,
        other => {
            tracing::warn!(%session, ?other, "join or resume did not complete");
            sfu.hang_up(session, epoch, failure, events).await;
            return Err(text(StatusCode::SERVICE_UNAVAILABLE, "join failed"));
        }
    };
    for message in after_join {
        let cmd = Command::Request {
            session,
            message: Box::new(message),
        };
        if !sfu.command(cmd).await {
            return Err(text(StatusCode::SERVICE_UNAVAILABLE, "SFU not running"));
        }
    }
    Ok((first, events))
}

/// One open signalling WebSocket in `conclave_signal_sessions_open`, for as long as it lives.
struct OpenSession(Arc<crate::metrics::Metrics>);

impl OpenSession {
    fn count(metrics: &Arc<crate::metrics::Metrics>) -> Self {
        crate::metrics::inc(&metrics.signal_sessions_open);
        OpenSession(metrics.clone())
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0
            .signal_sessions_open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A participant taken back by a new signalling connection.
struct Resumed {
    session: SessionId,
    epoch: u32,
    events: SignalQueue,
}

/// The rest of a resume: the `ReconnectResponse` first, then (v1) the join request's offer
/// (the client's ICE restart), then the session as usual on the new connection.
async fn resume(
    state: Arc<SignalState>,
    sfu: SfuHandle,
    ws: WebSocketUpgrade,
    claims: Claims,
    settings: Settings,
    resumed: Resumed,
) -> Response {
    let Resumed {
        session,
        epoch,
        events,
    } = resumed;
    let is_reconnect = |m: &Msg| matches!(m, Msg::Reconnect(_));
    let failure = lk::DisconnectReason::StateMismatch;
    let opened = open_session(
        &sfu,
        (session, epoch),
        events,
        is_reconnect,
        failure,
        settings.after_join,
    );
    let (first, events) = match opened.await {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    crate::metrics::inc(&state.metrics.signal_resumes);
    let span = tracing::info_span!("signal", %session, epoch, identity = %claims.sub, room = %claims.video.room);
    ws.on_upgrade(move |socket| {
        let fut = run_session(state, sfu, socket, (session, epoch), claims, first, events);
        tracing::Instrument::instrument(fut, span)
    })
}

fn close_frame() -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code: 1000,
        reason: "".into(),
    }))
}

/// The close frame for a message over [`MAX_MESSAGE_BYTES`]: RFC 6455's 1009, "Message Too
/// Big", with the limit, so the client's log says what happened.
fn too_big_close_frame() -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code: 1009,
        reason: "signal message larger than 2 MiB".into(),
    }))
}

/// Whether a WebSocket read failed because the message exceeded [`MAX_MESSAGE_BYTES`]
/// (tungstenite's `CapacityError::MessageTooLong`/`Space limit exceeded`; axum wraps it and
/// does not export the type, so its text is what is left to look at).
fn is_too_big(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Message too long") || text.contains("Space limit exceeded")
}

/// Writes one frame, waiting at most [`SEND_TIMEOUT`]; the error is why the session ends
/// (`SIGNAL_CLOSE` when the socket failed, [`QUEUE_FULL_REASON`] when the client did not take
/// the frame in time).
async fn send(socket: &mut WebSocket, frame: WsMessage) -> Result<(), lk::DisconnectReason> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(lk::DisconnectReason::SignalClose),
        Err(_) => {
            tracing::info!("client did not take a frame in time; closing its session");
            Err(QUEUE_FULL_REASON)
        }
    }
}

fn encode(m: &Msg, json: bool) -> WsMessage {
    let resp = lk::SignalResponse {
        message: Some(m.clone()),
    };
    if json {
        WsMessage::Text(serde_json::to_string(&resp).unwrap_or_default().into())
    } else {
        WsMessage::Binary(resp.encode_to_vec().into())
    }
}

fn decode(frame: &WsMessage) -> Option<Result<(lk::SignalRequest, bool), ()>> {
    match frame {
        WsMessage::Binary(b) => Some(
            lk::SignalRequest::decode(b.as_ref())
                .map(|r| (r, false))
                .map_err(|_| ()),
        ),
        WsMessage::Text(t) => Some(
            serde_json::from_str::<lk::SignalRequest>(t.as_str())
                .map(|r| (r, true))
                .map_err(|_| ()),
        ),
        _ => None,
    }
}

async fn run_session(
    state: Arc<SignalState>,
    sfu: SfuHandle,
    mut socket: WebSocket,
    (session, epoch): (SessionId, u32),
    claims: Claims,
    first: Msg,
    mut events: SignalQueue,
) {
    let _open = OpenSession::count(&state.metrics);
    let mut json = false;
    if let Err(reason) = send(&mut socket, encode(&first, json)).await {
        sfu.hang_up(session, epoch, reason, events).await;
        return;
    }
    if let Some(t) = refresh_token(&state, &claims) {
        if let Err(reason) = send(&mut socket, encode(&Msg::RefreshToken(t), json)).await {
            sfu.hang_up(session, epoch, reason, events).await;
            return;
        }
    }
    let mut ws_ping = tokio::time::interval(WS_PING_EVERY);
    ws_ping.tick().await;
    let mut refresh = tokio::time::interval(REFRESH_EVERY);
    refresh.tick().await;
    let mut last_heard = Instant::now();
    let mut bad_frames = 0u32;
    let mut reason = lk::DisconnectReason::SignalClose;
    let mut closed_by_server = false;
    let mut too_big = false;
    let silence_limit = state.signal_timeout;
    loop {
        let silence =
            tokio::time::sleep_until(tokio::time::Instant::from_std(last_heard + silence_limit));
        tokio::select! {
            frame = socket.recv() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) if is_too_big(&e) => {
                        tracing::warn!(%session, limit = MAX_MESSAGE_BYTES, "signal message too big; closing");
                        too_big = true;
                        break;
                    }
                    _ => break,
                };
                if matches!(frame, WsMessage::Close(_)) {
                    break;
                }
                // Only signal messages count as a live client; automatic WebSocket pongs do not.
                if matches!(frame, WsMessage::Binary(_) | WsMessage::Text(_)) {
                    last_heard = Instant::now();
                }
                let Some(decoded) = decode(&frame) else { continue };
                let Ok((req, is_json)) = decoded else {
                    bad_frames += 1;
                    tracing::debug!(%session, bad_frames, "undecodable signal frame");
                    if bad_frames > MAX_BAD_FRAMES {
                        tracing::warn!(%session, "too many undecodable frames; closing");
                        break;
                    }
                    continue;
                };
                json = is_json;
                let Some(message) = req.message else { continue };
                match message {
                    Req::Ping(ts) => {
                        let _ = ts;
                        let pong = Msg::Pong(crate::clock::unix_millis());
                        if let Err(r) = send(&mut socket, encode(&pong, json)).await {
                            reason = r;
                            break;
                        }
                    }
                    Req::PingReq(p) => {
                        let pong = Msg::PongResp(lk::Pong {
                            last_ping_timestamp: p.timestamp,
                            timestamp: crate::clock::unix_millis(),
                        });
                        if let Err(r) = send(&mut socket, encode(&pong, json)).await {
                            reason = r;
                            break;
                        }
                    }
                    Req::Leave(_) => {
                        reason = lk::DisconnectReason::ClientInitiated;
                        break;
                    }
                    other => {
                        let cmd = Command::Request { session, message: Box::new(other) };
                        if !sfu.command(cmd).await {
                            break;
                        }
                    }
                }
            }
            out = events.recv() => match out {
                Some(SignalOut::Message(m)) => {
                    if let Err(r) = send(&mut socket, encode(&m, json)).await {
                        reason = r;
                        break;
                    }
                }
                Some(SignalOut::Close) | None => {
                    closed_by_server = true;
                    break;
                }
            },
            _ = ws_ping.tick() => {
                if let Err(r) = send(&mut socket, WsMessage::Ping(Vec::new().into())).await {
                    reason = r;
                    break;
                }
            }
            _ = refresh.tick() => {
                if let Some(t) = refresh_token(&state, &claims) {
                    if let Err(r) = send(&mut socket, encode(&Msg::RefreshToken(t), json)).await {
                        reason = r;
                        break;
                    }
                }
            }
            () = silence => {
                tracing::info!(%session, "client silent too long; closing its session");
                reason = lk::DisconnectReason::ConnectionTimeout;
                let leave = Msg::Leave(lk::LeaveRequest {
                    can_reconnect: false,
                    reason: reason as i32,
                    action: lk::leave_request::Action::Disconnect as i32,
                    regions: None,
                });
                let _ = send(&mut socket, encode(&leave, json)).await;
                break;
            }
        }
    }
    if !closed_by_server {
        // Others and webhooks learn `reason`; the queue stays open until the loop took it.
        sfu.hang_up(session, epoch, reason, events).await;
    } else {
        // Flush what the SFU queued before closing (the leave message).
        while let Some(SignalOut::Message(m)) = events.try_recv() {
            if send(&mut socket, encode(&m, json)).await.is_err() {
                break;
            }
        }
    }
    let close = if too_big {
        too_big_close_frame()
    } else {
        close_frame()
    };
    let _ = send(&mut socket, close).await;
}

/// A new token with the same identity and grants, valid for `auth.token_lifetime_secs`.
/// The embedded TURN server with fresh credentials, for a join or reconnect response.
fn ice_servers(state: &SignalState) -> Vec<lk::IceServer> {
    state
        .ice_servers
        .as_ref()
        .map(|s| s.mint())
        .unwrap_or_default()
}

fn refresh_token(state: &SignalState, claims: &Claims) -> Option<String> {
    let now = crate::clock::unix_secs();
    let mut c = claims.clone();
    c.nbf = now;
    c.exp = (now + state.token_lifetime_secs).max(claims.exp);
    state.signer.sign(&c).ok()
}
