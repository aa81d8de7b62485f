//! Bridges: WHIP ingest (RFC 9725) and WHEP egress (draft-ietf-wish-whep), so encoders,
//! recorders and other systems put media into a call and take it out with one HTTP `POST`
//! and no LiveKit signalling (`docs/bridges.md`).
//!
//! A WHIP or WHEP session is an SFU participant on one peer connection (the v1 model: the
//! client offers, the SFU answers) whose "client" is a task here instead of a WebSocket: it
//! joins with the token's identity and grants, announces the offer's media as tracks (WHIP) or
//! subscribes to the wanted participant's tracks (WHEP), passes the offer on and hands the
//! answer back as the HTTP response. Media never passes through this module. The participant
//! is like any other to the room, the admin API, webhooks and the Matrix call model, so the
//! rules that remove a participant (a ban, the minting Matrix user leaving, an operator) end a
//! bridge session too.
#![warn(missing_docs)]

pub mod sdp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Msg;
use rand::Rng;
use tokio::sync::mpsc;

use crate::auth::jwt::{Claims, TokenSigner};
use crate::metrics::Metrics;
use crate::net::{session_queue, SfuHandle, SignalQueue};
use crate::sfu::ids::{ParticipantIdentity, RoomName};
use crate::sfu::registry::{RoomOptions, RoomRegistry};
use crate::sfu::{CascadeRole, Command, Join, SessionId, SignalOut};

/// How long the SFU has to take a join and to answer an offer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Most bridge sessions at once (each holds a participant and a peer connection).
const MAX_SESSIONS: usize = 1024;

/// Why a WHIP or WHEP request is refused; each maps to the RFC's status code.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// 400: a malformed offer or SDP fragment.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token, or one that does not verify.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a valid token that does not allow this (another room, no publish grant, …).
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such room, participant, track or session.
    #[error("{0}")]
    NotFound(String),
    /// 412: `If-Match` names another ICE session.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 415: not `application/sdp` (or `application/trickle-ice-sdpfrag` for `PATCH`).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: a well-formed offer that cannot be served (codecs, directions, encrypted tracks).
    #[error("{0}")]
    Unprocessable(String),
    /// 503: the SFU is not running, full, or did not answer in time.
    #[error("{0}")]
    Unavailable(String),
}

impl BridgeError {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            BridgeError::BadRequest(_) => 400,
            BridgeError::Unauthorized(_) => 401,
            BridgeError::Forbidden(_) => 403,
            BridgeError::NotFound(_) => 404,
            BridgeError::PreconditionFailed(_) => 412,
            BridgeError::UnsupportedMediaType(_) => 415,
            BridgeError::Unprocessable(_) => 422,
            BridgeError::Unavailable(_) => 503,
        }
    }
}

/// WHIP (publish) or WHEP (play).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Ingest: the client's media become a participant's tracks.
    Whip,
    /// Egress: the client receives a participant's (or one track's) media.
    Whep,
}

impl Kind {
    /// `whip` or `whep` (the URL prefix).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Whip => "whip",
            Kind::Whep => "whep",
        }
    }
}

/// What a WHEP session plays.
#[derive(Debug, Clone)]
pub enum Source {
    /// A participant's audio and video (its camera and microphone first).
    Participant(String),
    /// One track.
    Track(String),
}

/// A created session: the HTTP `201 Created` response's parts.
#[derive(Debug, Clone)]
pub struct Created {
    /// The session's ID (the `Location` is `/{kind}/v1/resource/{id}`).
    pub id: String,
    /// The SDP answer.
    pub answer: String,
    /// The ICE session's entity tag (quoted).
    pub etag: String,
    /// ICE servers for `Link` headers: (url, username, credential).
    pub ice_servers: Vec<(String, String, String)>,
}

/// What a `PATCH` did.
#[derive(Debug, Clone)]
pub enum Patched {
    /// Candidates taken (`204 No Content`).
    Trickled,
    /// An ICE restart: the answer fragment and the new entity tag (`200 OK`).
    Restarted {
        /// `application/trickle-ice-sdpfrag` body.
        fragment: String,
        /// New entity tag (quoted).
        etag: String,
    },
}

/// One live session.
struct Session {
    kind: Kind,
    room: RoomName,
    identity: ParticipantIdentity,
    session: SessionId,
    /// The offer (an ICE restart rewrites it) and the current entity tag.
    ice: Mutex<(String, String)>,
    /// Messages from the SFU for the handlers (join, answers, refusals), in order.
    inbox: tokio::sync::Mutex<mpsc::Receiver<Msg>>,
}

/// The WHIP and WHEP service.
#[derive(Clone)]
pub struct Bridges {
    inner: Arc<Inner>,
}

struct Inner {
    signer: TokenSigner,
    sfu: SfuHandle,
    rooms: Arc<RoomRegistry>,
    auto_create: bool,
    ice_servers: Option<crate::turn::IceServers>,
    metrics: Arc<Metrics>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

/// The request's parts every operation checks.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `Authorization` header value, if any.
    pub authorization: Option<&'a str>,
    /// `Content-Type` header value, if any.
    pub content_type: Option<&'a str>,
    /// The body.
    pub body: &'a [u8],
}

impl Request<'_> {
    /// The body as text, if it is of `content_type` (`415` otherwise) and UTF-8 (`400`);
    /// `what` names it in the refusal.
    fn text(&self, content_type: &str, what: &str) -> Result<&str, BridgeError> {
        if !is_sdp(self.content_type, content_type) {
            return Err(BridgeError::UnsupportedMediaType(format!(
                "{what} must be `Content-Type: {content_type}`, not {:?}",
                self.content_type.unwrap_or("none")
            )));
        }
        std::str::from_utf8(self.body)
            .map_err(|_| BridgeError::BadRequest(format!("{what} is not UTF-8 text")))
    }
}

impl Bridges {
    /// The service, joining participants through `sfu`.
    pub fn new(
        signer: TokenSigner,
        sfu: SfuHandle,
        rooms: Arc<RoomRegistry>,
        auto_create: bool,
        ice_servers: Option<crate::turn::IceServers>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Bridges {
            inner: Arc::new(Inner {
                signer,
                sfu,
                rooms,
                auto_create,
                ice_servers,
                metrics,
                sessions: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.sessions().len()
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn refused(&self, e: BridgeError) -> BridgeError {
        crate::metrics::inc(&self.inner.metrics.bridge_refused);
        tracing::info!(status = e.status(), reason = %e, "bridge request refused");
        e
    }

    /// `POST /whip/v1[/{room}]`: publishes the offer's audio and video as the token's
    /// participant in the token's room (`room`, when the URL names one, must be that room).
    pub async fn whip(&self, room: Option<&str>, req: Request<'_>) -> Result<Created, BridgeError> {
        self.create(Kind::Whip, room, None, false, req)
            .await
            .map_err(|e| self.refused(e))
    }

    /// `POST /whep/v1/{room}/…`: plays `source` to the offer's `recvonly` sections. Tracks
    /// Conclave knows to be end-to-end encrypted are refused unless `ciphertext` (the viewer
    /// says it expects ciphertext).
    pub async fn whep(
        &self,
        room: &str,
        source: Source,
        ciphertext: bool,
        req: Request<'_>,
    ) -> Result<Created, BridgeError> {
        self.create(Kind::Whep, Some(room), Some(source), ciphertext, req)
            .await
            .map_err(|e| self.refused(e))
    }

    /// An operator's token for one WHIP or WHEP session (the admin API's
    /// `POST /_conclave/admin/v1/bridges/tokens`): `identity` in `room`, publish-only for
    /// WHIP, subscribe-only for WHEP, valid `valid_for_secs` (1 s to 24 h). Such a token does
    /// not pass through Matrix: the operator vouches for whoever gets it.
    pub fn mint(
        &self,
        kind: Kind,
        room: &str,
        identity: &str,
        name: &str,
        valid_for_secs: u64,
    ) -> Result<String, BridgeError> {
        if room.is_empty() || identity.is_empty() {
            return Err(BridgeError::BadRequest(
                "a room and an identity are required".into(),
            ));
        }
        crate::sfu::limits::check_join(identity, room, name, "")
            .map_err(|e| BridgeError::BadRequest(e.to_string()))?;
        if !(1..=86_400).contains(&valid_for_secs) {
            return Err(BridgeError::BadRequest(
                "valid_for_secs must be between 1 and 86400".into(),
            ));
        }
        let now = crate::clock::unix_secs();
        let claims = Claims {
            iss: self.inner.signer.key().to_owned(),
            sub: identity.to_owned(),
            nbf: now.saturating_sub(1),
            exp: now + valid_for_secs,
            name: name.to_owned(),
            metadata: String::new(),
            video: crate::auth::jwt::VideoGrant {
                room: room.to_owned(),
                room_join: true,
                can_publish: Some(kind == Kind::Whip),
                can_subscribe: Some(kind == Kind::Whep),
                can_publish_data: Some(false),
                ..Default::default()
            },
        };
        self.inner
            .signer
            .sign(&claims)
            .map_err(|e| BridgeError::Unavailable(format!("cannot sign a token: {e}")))
    }

    /// Checks the bearer token: verifies, a room-join grant for a room, an identity.
    fn claims(&self, authorization: Option<&str>) -> Result<Claims, BridgeError> {
        let Some(value) = authorization else {
            return Err(BridgeError::Unauthorized(
                "no token: send `Authorization: Bearer <LiveKit access token>`".into(),
            ));
        };
        let Some(token) = value.strip_prefix("Bearer ") else {
            return Err(BridgeError::Unauthorized(
                "the Authorization header must be `Bearer <token>`".into(),
            ));
        };
        let claims = self
            .inner
            .signer
            .verify(token.trim(), crate::clock::unix_secs())
            .map_err(|e| BridgeError::Unauthorized(format!("token refused: {e}")))?;
        if !claims.video.room_join || claims.video.room.is_empty() {
            return Err(BridgeError::Forbidden(
                "the token has no roomJoin grant for a room".into(),
            ));
        }
        if claims.sub.is_empty() {
            return Err(BridgeError::Forbidden("the token has no identity".into()));
        }
        // As for a LiveKit client's join: names and metadata within the limits.
        crate::sfu::limits::check_join(
            &claims.sub,
            &claims.video.room,
            &claims.name,
            &claims.metadata,
        )
        .map_err(|e| BridgeError::BadRequest(format!("token {e}")))?;
        Ok(claims)
    }

    async fn create(
        &self,
        kind: Kind,
        room: Option<&str>,
        source: Option<Source>,
        ciphertext: bool,
        req: Request<'_>,
    ) -> Result<Created, BridgeError> {
        let claims = self.claims(req.authorization)?;
        if let Some(room) = room {
            if room != claims.video.room {
                return Err(BridgeError::Forbidden(format!(
                    "the token is for room {:?}, not {room:?}",
                    claims.video.room
                )));
            }
        }
        let permission = claims.permission();
        match kind {
            Kind::Whip if !permission.can_publish => {
                return Err(BridgeError::Forbidden(
                    "the token does not allow publishing (canPublish)".into(),
                ))
            }
            Kind::Whep if !permission.can_subscribe => {
                return Err(BridgeError::Forbidden(
                    "the token does not allow subscribing (canSubscribe)".into(),
                ))
            }
            _ => {}
        }
        let offer = req.text("application/sdp", "the offer")?.to_owned();
        let (sections, usable) = inspect_offer(kind, &offer)?;
        let room_name = RoomName::from(claims.video.room.as_str());
        if !self.inner.rooms.exists(room_name.as_str(), Instant::now()) {
            // A WHEP viewer of a room that does not exist has nothing to play.
            if !self.inner.auto_create || kind == Kind::Whep {
                return Err(BridgeError::NotFound(format!(
                    "room {:?} does not exist",
                    claims.video.room
                )));
            }
            self.inner
                .sfu
                .create_room(&room_name, RoomOptions::default())
                .await;
        }
        // WHEP: what to play, before anyone joins.
        let mut play = Vec::new();
        if let Some(source) = &source {
            let everyone = self.inner.sfu.participants(&room_name).await;
            play = pick(&everyone, source, &sections)?;
            if !ciphertext {
                if let Some(t) = play.iter().find(|t| t.encryption != 0) {
                    return Err(BridgeError::Unprocessable(format!(
                        "track {} is end-to-end encrypted: a viewer without the keys gets \
                         ciphertext; add `?ciphertext=1` if that is what you want",
                        t.sid
                    )));
                }
            }
        }
        if self.sessions().len() >= MAX_SESSIONS {
            return Err(BridgeError::Unavailable(
                "too many WHIP/WHEP sessions; try again later".into(),
            ));
        }
        let id = random_hex(16);
        let etag = new_etag();
        let span = tracing::info_span!("bridge", kind = kind.as_str(), %id, room = %room_name, identity = %claims.sub);
        let sfu = &self.inner.sfu;
        let session_id = sfu.new_session(&room_name);
        let (sink, queue) = session_queue();
        let (tx, inbox) = mpsc::channel(64);
        let session = Arc::new(Session {
            kind,
            room: room_name.clone(),
            identity: ParticipantIdentity::from(claims.sub.as_str()),
            session: session_id,
            ice: Mutex::new((offer.clone(), etag.clone())),
            inbox: tokio::sync::Mutex::new(inbox),
        });
        self.sessions().insert(id.clone(), session.clone());
        tokio::spawn(tracing::Instrument::instrument(
            pump(self.clone(), id.clone(), queue, tx),
            span.clone(),
        ));
        let mut permission = permission;
        match kind {
            // A WHIP participant only publishes; a WHEP viewer only receives.
            Kind::Whip => permission.can_subscribe = false,
            Kind::Whep => {
                permission.can_publish = false;
                permission.can_publish_data = false;
            }
        }
        let join = Join {
            session: session_id,
            room: room_name.clone(),
            identity: session.identity.clone(),
            name: claims.name.clone(),
            metadata: claims.metadata.clone(),
            attributes: HashMap::new(),
            permission,
            auto_subscribe: false,
            client_protocol: 0,
            single_pc: true,
            ice_servers: Vec::new(),
            cascade: CascadeRole::None,
        };
        let result = tracing::Instrument::instrument(
            async {
                if !sfu.open(sink, join).await {
                    return Err(BridgeError::Unavailable("the SFU is not running".into()));
                }
                let mut inbox = session.inbox.lock().await;
                loop {
                    match next(&mut inbox).await? {
                        Msg::Join(_) => break,
                        Msg::Leave(_) => {
                            return Err(BridgeError::Unavailable("join refused".into()))
                        }
                        _ => {}
                    }
                }
                match kind {
                    Kind::Whip => {
                        for s in &usable {
                            let video = s.media == "video";
                            let layers = if video { layers(&s.rids) } else { Vec::new() };
                            if layers.len() > 1 {
                                tracing::info!(rids = ?s.rids, "WHIP simulcast");
                            }
                            let add = lk::AddTrackRequest {
                                layers,
                                cid: s.track_id.clone().unwrap_or_else(|| s.mid.clone()),
                                name: format!("{} {}", kind.as_str(), s.media),
                                r#type: if video {
                                    lk::TrackType::Video
                                } else {
                                    lk::TrackType::Audio
                                } as i32,
                                source: if video {
                                    lk::TrackSource::Camera
                                } else {
                                    lk::TrackSource::Microphone
                                } as i32,
                                ..Default::default()
                            };
                            self.request(session_id, Req::AddTrack(add)).await?;
                        }
                    }
                    Kind::Whep => {
                        let sids: Vec<String> = play.iter().map(|t| t.sid.clone()).collect();
                        tracing::info!(tracks = ?sids, "WHEP plays");
                        self.request(
                            session_id,
                            Req::Subscription(lk::UpdateSubscription {
                                track_sids: sids,
                                subscribe: true,
                                participant_tracks: Vec::new(),
                            }),
                        )
                        .await?;
                    }
                }
                let answer = self.offer(session_id, &offer, &mut inbox).await?;
                Ok(answer)
            },
            span.clone(),
        )
        .await;
        match result {
            Ok(answer) => {
                crate::metrics::inc(match kind {
                    Kind::Whip => &self.inner.metrics.whip_sessions,
                    Kind::Whep => &self.inner.metrics.whep_sessions,
                });
                tracing::info!(parent: &span, "bridge session created");
                Ok(Created {
                    id,
                    answer,
                    etag,
                    ice_servers: self.ice_servers(),
                })
            }
            Err(e) => {
                self.end(&id).await;
                Err(e)
            }
        }
    }

    /// Sends `offer` and waits for its answer (the SFU answers requests in order).
    async fn offer(
        &self,
        session: SessionId,
        offer: &str,
        inbox: &mut mpsc::Receiver<Msg>,
    ) -> Result<String, BridgeError> {
        while inbox.try_recv().is_ok() {}
        self.request(
            session,
            Req::Offer(lk::SessionDescription {
                r#type: "offer".into(),
                sdp: offer.to_owned(),
                ..Default::default()
            }),
        )
        .await?;
        loop {
            match next(inbox).await? {
                Msg::Answer(a) => return Ok(a.sdp),
                Msg::Leave(_) => {
                    return Err(BridgeError::Unavailable("the SFU ended the session".into()))
                }
                Msg::RequestResponse(r) if r.reason != lk::request_response::Reason::Ok as i32 => {
                    return Err(BridgeError::Unprocessable(format!(
                        "the SFU refused: {}",
                        r.message
                    )))
                }
                _ => {}
            }
        }
    }

    async fn request(&self, session: SessionId, m: Req) -> Result<(), BridgeError> {
        let cmd = Command::Request {
            session,
            message: Box::new(m),
        };
        if self.inner.sfu.command(cmd).await {
            Ok(())
        } else {
            Err(BridgeError::Unavailable("the SFU is not running".into()))
        }
    }

    fn ice_servers(&self) -> Vec<(String, String, String)> {
        let Some(servers) = &self.inner.ice_servers else {
            return Vec::new();
        };
        servers
            .mint()
            .into_iter()
            .flat_map(|s| {
                s.urls
                    .into_iter()
                    .map(move |u| (u, s.username.clone(), s.credential.clone()))
            })
            .collect()
    }

    /// The session `id` of `kind`, if the token is its participant's.
    fn session(
        &self,
        kind: Kind,
        id: &str,
        authorization: Option<&str>,
    ) -> Result<Arc<Session>, BridgeError> {
        let claims = self.claims(authorization)?;
        let found = self.sessions().get(id).filter(|s| s.kind == kind).cloned();
        let Some(session) = found else {
            return Err(BridgeError::NotFound(format!(
                "no {} session {id:?} (ended, or never created)",
                kind.as_str()
            )));
        };
        if claims.video.room != session.room.as_str() || claims.sub != session.identity.as_str() {
            return Err(BridgeError::Forbidden(
                "the token is not this session's participant".into(),
            ));
        }
        Ok(session)
    }

    /// `PATCH` on a session: trickled candidates (`204`) or an ICE restart (`200` with the
    /// answer's fragment and a new entity tag).
    pub async fn patch(
        &self,
        kind: Kind,
        id: &str,
        if_match: Option<&str>,
        req: Request<'_>,
    ) -> Result<Patched, BridgeError> {
        self.patch_inner(kind, id, if_match, req)
            .await
            .map_err(|e| self.refused(e))
    }

    async fn patch_inner(
        &self,
        kind: Kind,
        id: &str,
        if_match: Option<&str>,
        req: Request<'_>,
    ) -> Result<Patched, BridgeError> {
        let session = self.session(kind, id, req.authorization)?;
        let body = req.text("application/trickle-ice-sdpfrag", "the SDP fragment")?;
        let frag = sdp::fragment(body)
            .map_err(|e| BridgeError::BadRequest(format!("malformed SDP fragment: {e}")))?;
        let (offer, etag) = session
            .ice
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // New credentials (not the current ones, which trickle fragments repeat): a restart.
        let restart = match (&frag.ufrag, &frag.pwd, sdp::credentials(&offer)) {
            (Some(u), Some(p), Some((ou, op))) if *u != ou || *p != op => Some((u, p)),
            _ => None,
        };
        if let Some(m) = if_match.map(str::trim) {
            if m != "*" && m != etag {
                return Err(BridgeError::PreconditionFailed(format!(
                    "If-Match {m} is not the current ICE session {etag}"
                )));
            }
        }
        if let Some((ufrag, pwd)) = restart {
            let offer = sdp::restarted(&offer, ufrag, pwd);
            let mut inbox = session.inbox.lock().await;
            let answer = self.offer(session.session, &offer, &mut inbox).await?;
            let etag = new_etag();
            *session.ice.lock().unwrap_or_else(PoisonError::into_inner) = (offer, etag.clone());
            tracing::info!(%id, "bridge ICE restart");
            return Ok(Patched::Restarted {
                fragment: sdp::answer_fragment(&answer),
                etag,
            });
        }
        for (mid, candidate) in frag.candidates {
            let init = serde_json::json!({
                "candidate": candidate,
                "sdpMid": mid,
            });
            self.request(
                session.session,
                Req::Trickle(lk::TrickleRequest {
                    candidate_init: init.to_string(),
                    target: lk::SignalTarget::Publisher as i32,
                    r#final: false,
                }),
            )
            .await?;
        }
        Ok(Patched::Trickled)
    }

    /// `DELETE` on a session: the participant leaves.
    pub async fn delete(
        &self,
        kind: Kind,
        id: &str,
        authorization: Option<&str>,
    ) -> Result<(), BridgeError> {
        self.session(kind, id, authorization)
            .map_err(|e| self.refused(e))?;
        tracing::info!(kind = kind.as_str(), %id, "bridge session deleted by its client");
        self.end(id).await;
        Ok(())
    }

    /// Ends session `id`: forgets it and takes its participant out.
    async fn end(&self, id: &str) {
        let removed = self.sessions().remove(id);
        if let Some(s) = removed {
            self.inner
                .sfu
                .disconnect(s.session, 0, lk::DisconnectReason::ClientInitiated)
                .await;
        }
    }
}

/// Reads the SFU's messages for one session until it closes; then the session is forgotten
/// (a ban, an operator, the client's connection timing out).
async fn pump(bridges: Bridges, id: String, mut queue: SignalQueue, tx: mpsc::Sender<Msg>) {
    while let Some(out) = queue.recv().await {
        match out {
            SignalOut::Message(m) => {
                if let m @ (Msg::Join(_)
                | Msg::Answer(_)
                | Msg::Leave(_)
                | Msg::RequestResponse(_)) = *m
                {
                    // Nobody reads between requests: what is not awaited is stale.
                    let _ = tx.try_send(m);
                }
            }
            SignalOut::Close => break,
        }
    }
    if bridges.sessions().remove(&id).is_some() {
        tracing::info!("bridge session ended by the SFU");
    }
}

/// The next message for a handler, within [`ANSWER_WAIT`].
async fn next(inbox: &mut mpsc::Receiver<Msg>) -> Result<Msg, BridgeError> {
    match tokio::time::timeout(ANSWER_WAIT, inbox.recv()).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(BridgeError::Unavailable("the SFU ended the session".into())),
        Err(_) => Err(BridgeError::Unavailable(
            "the SFU did not answer in time".into(),
        )),
    }
}

/// `content_type` is `want` (parameters such as `; charset=` allowed).
fn is_sdp(content_type: Option<&str>, want: &str) -> bool {
    content_type
        .and_then(|c| c.split(';').next())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case(want))
}

/// `bytes` random bytes as lower-case hex (session IDs are unguessable: 128 bits).
fn random_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

fn new_etag() -> String {
    format!("\"{}\"", random_hex(8))
}

/// Reads a WHIP or WHEP offer: all its sections, and the ones the session uses. Malformed SDP
/// is `400` (str0m's parser decides), an offer that cannot be served `422`.
pub fn inspect_offer(
    kind: Kind,
    offer: &str,
) -> Result<(Vec<sdp::Section>, Vec<sdp::Section>), BridgeError> {
    str0m::change::SdpOffer::from_sdp_string(offer)
        .map_err(|e| BridgeError::BadRequest(format!("malformed SDP offer: {e}")))?;
    let sections = sdp::sections(offer);
    let usable = check_offer(kind, &sections)?;
    Ok((sections, usable))
}

/// The sections a session uses; refuses offers that cannot be served.
fn check_offer(kind: Kind, sections: &[sdp::Section]) -> Result<Vec<sdp::Section>, BridgeError> {
    let av: Vec<&sdp::Section> = sections.iter().filter(|s| s.is_av()).collect();
    let wanted: Vec<&sdp::Section> = av
        .iter()
        .copied()
        .filter(|s| match kind {
            Kind::Whip => s.sends(),
            Kind::Whep => s.receives(),
        })
        .collect();
    if wanted.is_empty() {
        return Err(BridgeError::Unprocessable(match kind {
            Kind::Whip => "the offer sends no audio or video (WHIP offers are sendonly)".into(),
            Kind::Whep => "the offer receives no audio or video (WHEP offers are recvonly)".into(),
        }));
    }
    let usable: Vec<sdp::Section> = wanted
        .iter()
        .filter(|s| s.supported())
        .map(|s| (*s).clone())
        .collect();
    if usable.is_empty() {
        let offered: Vec<String> = wanted
            .iter()
            .map(|s| format!("{}: {}", s.media, s.media_codecs().join(", ")))
            .collect();
        return Err(BridgeError::Unprocessable(format!(
            "no supported codec offered ({}); Conclave forwards Opus audio and VP8 or H.264 \
             video without transcoding",
            offered.join("; ")
        )));
    }
    Ok(usable)
}

/// Simulcast layers for an offer's send rids. LiveKit's names (`q`, `h`, `f`) and `low`,
/// `mid`, `high` say their quality; other names are taken lowest first in the offer's
/// order (at most three layers: the SFU knows low, medium and high).
fn layers(rids: &[String]) -> Vec<lk::VideoLayer> {
    use lk::VideoQuality::{High, Low, Medium};
    if rids.len() < 2 {
        return Vec::new();
    }
    let named = |r: &str| match r {
        "q" | "low" | "l" => Some(Low),
        "h" | "mid" | "medium" | "m" => Some(Medium),
        "f" | "high" | "hi" => Some(High),
        _ => None,
    };
    let all_named = rids.iter().all(|r| named(r).is_some());
    let by_order = [Low, Medium, High];
    rids.iter()
        .take(3)
        .enumerate()
        .map(|(i, r)| {
            let quality = match (all_named, named(r)) {
                (true, Some(q)) => q,
                _ => by_order[i.min(2)],
            };
            lk::VideoLayer {
                quality: quality as i32,
                rid: r.clone(),
                ..Default::default()
            }
        })
        .collect()
}

/// The tracks a WHEP session plays from the room's participants: one audio and one
/// video (camera and microphone first) for a participant, or the one track.
fn pick(
    everyone: &[lk::ParticipantInfo],
    source: &Source,
    sections: &[sdp::Section],
) -> Result<Vec<lk::TrackInfo>, BridgeError> {
    match source {
        Source::Track(sid) => everyone
            .iter()
            .flat_map(|p| p.tracks.iter())
            .find(|t| t.sid == *sid)
            .cloned()
            .map(|t| vec![t])
            .ok_or_else(|| BridgeError::NotFound(format!("no track {sid:?} in this room"))),
        Source::Participant(identity) => {
            let Some(p) = everyone.iter().find(|p| p.identity == *identity) else {
                return Err(BridgeError::NotFound(format!(
                    "no participant {identity:?} in this room"
                )));
            };
            let mut out = Vec::new();
            for (kind, first) in [
                (lk::TrackType::Audio, lk::TrackSource::Microphone),
                (lk::TrackType::Video, lk::TrackSource::Camera),
            ] {
                let media = if kind == lk::TrackType::Audio {
                    "audio"
                } else {
                    "video"
                };
                if !sections.iter().any(|s| s.media == media && s.receives()) {
                    continue;
                }
                let of_kind = p.tracks.iter().filter(|t| t.r#type == kind as i32);
                let chosen = of_kind
                    .clone()
                    .find(|t| t.source == first as i32)
                    .or_else(|| of_kind.clone().next());
                out.extend(chosen.cloned());
            }
            if out.is_empty() {
                return Err(BridgeError::NotFound(format!(
                    "participant {identity:?} publishes no audio or video the offer can receive"
                )));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qualities(rids: &[&str]) -> Vec<(String, i32)> {
        let rids: Vec<String> = rids.iter().map(|r| (*r).to_owned()).collect();
        layers(&rids)
            .into_iter()
            .map(|l| (l.rid, l.quality))
            .collect()
    }

    #[test]
    fn simulcast_rids_become_layers() {
        use lk::VideoQuality::{High, Low, Medium};
        let (l, m, h) = (Low as i32, Medium as i32, High as i32);
        assert_eq!(
            qualities(&["f", "q", "h"]),
            [("f".into(), h), ("q".into(), l), ("h".into(), m)]
        );
        assert_eq!(
            qualities(&["0", "1", "2", "3"]),
            [("0".into(), l), ("1".into(), m), ("2".into(), h)]
        );
        assert!(qualities(&["only"]).is_empty());
    }

    #[test]
    fn offers_are_checked_for_direction_and_codecs() {
        let offer = |dir: &str, codec: &str| {
            sdp::sections(&format!(
                "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na={dir}\r\na=rtpmap:96 {codec}/90000\r\n"
            ))
        };
        assert_eq!(
            check_offer(Kind::Whip, &offer("sendonly", "H264"))
                .map(|s| s.len())
                .ok(),
            Some(1)
        );
        assert_eq!(
            check_offer(Kind::Whep, &offer("recvonly", "VP8"))
                .map(|s| s.len())
                .ok(),
            Some(1)
        );
        for (kind, dir, codec, status) in [
            (Kind::Whip, "recvonly", "VP8", 422),
            (Kind::Whep, "sendonly", "VP8", 422),
            (Kind::Whip, "sendonly", "AV1", 422),
        ] {
            let e = check_offer(kind, &offer(dir, codec)).expect_err("refused");
            assert_eq!(e.status(), status, "{kind:?} {dir} {codec}: {e}");
        }
    }

    #[test]
    fn content_types_allow_parameters() {
        assert!(is_sdp(Some("application/sdp"), "application/sdp"));
        assert!(is_sdp(
            Some("Application/SDP; charset=utf-8"),
            "application/sdp"
        ));
        assert!(!is_sdp(Some("application/json"), "application/sdp"));
        assert!(!is_sdp(None, "application/sdp"));
    }
}
