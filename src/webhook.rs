//! LiveKit-compatible webhooks: SFU lifecycle events (`room_started`, `room_finished`,
//! `participant_joined`, `participant_left` / `participant_connection_aborted`,
//! `track_published`, `track_unpublished`) POSTed to every `webhook.urls` entry.
//!
//! Wire format as LiveKit's (`livekit/protocol` `webhook/`): body = protojson `WebhookEvent`
//! (lowerCamel keys, int64 as strings, enums by name), `Content-Type:
//! application/webhook+json`, header `Authorization: <jwt>` (no `Bearer `), an HS256 token
//! with `iss` = `webhook.api_key` (default `livekit.key`), signed with `livekit.secret`, valid
//! for 5 minutes, whose claim `sha256` is the standard base64 SHA-256 of the exact body.
//!
//! Events come from the SFU loop's broadcast ([`crate::net::SfuHandle::subscribe_events`]);
//! this task turns them into bodies and puts them on one bounded queue per URL (full: the
//! oldest event is dropped and counted). One worker per URL delivers its queue in order, so
//! every receiver sees a room's events in the order they happened; failed deliveries are
//! retried a bounded number of times with backoff. Nothing here runs on the media path.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use livekit_protocol as lk;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, Notify};

use crate::config::Secret;
use crate::plumbing::{Backoff, ClientOptions, HttpClients};
use crate::sfu::ids::{Ids, RoomName};
use crate::sfu::registry::RegisteredRoom;
use crate::sfu::registry::RoomRegistry;
use crate::sfu::SfuEvent;

/// Events waiting per URL; beyond this the oldest is dropped.
pub const QUEUE_CAPACITY: usize = 1024;
/// Delivery attempts per event and URL.
const MAX_ATTEMPTS: u32 = 4;
/// Wait before the first retry; doubled for each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Timeout of one POST.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Validity of the signature token (LiveKit: 5 minutes).
const TOKEN_VALIDITY_SECS: u64 = 300;
/// The webhook body's content type.
pub const CONTENT_TYPE: &str = "application/webhook+json";

/// A webhook failure.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The event could not be encoded.
    #[error("encoding webhook event: {0}")]
    Encode(String),
    /// The signature token could not be made.
    #[error("signing webhook: {0}")]
    Sign(String),
    /// The HTTP client could not be built.
    #[error("building the webhook HTTP client: {0}")]
    Client(String),
    /// The request failed (connection, timeout).
    #[error("POST {url} failed: {message}")]
    Transport {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The receiver answered with a non-2xx status.
    #[error("POST {url} answered HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
}

impl WebhookError {
    /// Whether another attempt may succeed (transport errors, 5xx, 408, 429).
    fn retryable(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}

/// The signature header value for `body`: an HS256 JWT with `iss` = `api_key`, `nbf` =
/// `now`, `exp` = `now` + 5 min and `sha256` = base64(SHA-256(`body`)).
pub fn sign(api_key: &str, secret: &str, body: &[u8], now: u64) -> Result<String, WebhookError> {
    let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
    let claims = serde_json::json!({
        "iss": api_key,
        "nbf": now,
        "exp": now + TOKEN_VALIDITY_SECS,
        "sha256": digest,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| WebhookError::Sign(e.to_string()))
}

/// Turns SFU events into `WebhookEvent`s, remembering participant counts. The room SID is
/// the one every event carries (the engine's, the same as `CreateRoom`'s and `ListRooms`').
#[derive(Debug)]
pub struct EventBuilder {
    ids: Ids,
    counts: HashMap<RoomName, u32>,
}

impl Default for EventBuilder {
    fn default() -> Self {
        Self {
            ids: Ids::from_entropy(),
            counts: HashMap::new(),
        }
    }
}

impl EventBuilder {
    /// A builder with deterministic event IDs (tests).
    pub fn with_ids(ids: Ids) -> Self {
        Self {
            ids,
            ..Self::default()
        }
    }

    /// The webhook for `event`; `registered` is the room's registry entry (lifetimes,
    /// metadata), `unix_now` the time in Unix seconds.
    pub fn build(
        &mut self,
        event: &SfuEvent,
        registered: Option<&RegisteredRoom>,
        unix_now: i64,
    ) -> lk::WebhookEvent {
        let (name, room, participant, track) = match event {
            SfuEvent::RoomStarted { room, .. } => {
                self.counts.insert(room.clone(), 0);
                ("room_started", room, None, None)
            }
            SfuEvent::RoomFinished { room, .. } => ("room_finished", room, None, None),
            SfuEvent::ParticipantJoined { room, info, .. } => {
                *self.counts.entry(room.clone()).or_default() += 1;
                (
                    "participant_joined",
                    room,
                    Some(info.as_ref().clone()),
                    None,
                )
            }
            SfuEvent::ParticipantLeft {
                room,
                info,
                ever_connected,
                ..
            } => {
                let count = self.counts.entry(room.clone()).or_default();
                *count = count.saturating_sub(1);
                let name = if *ever_connected {
                    "participant_left"
                } else {
                    "participant_connection_aborted"
                };
                (name, room, Some(info.as_ref().clone()), None)
            }
            SfuEvent::TrackPublished {
                room,
                participant,
                track,
                ..
            } => (
                "track_published",
                room,
                Some(participant.as_ref().clone()),
                Some(track.as_ref().clone()),
            ),
            SfuEvent::TrackUnpublished {
                room,
                participant,
                track,
                ..
            } => (
                "track_unpublished",
                room,
                Some(participant.as_ref().clone()),
                Some(track.as_ref().clone()),
            ),
        };
        let mut info = lk::Room {
            sid: event.room_sid().to_string(),
            name: room.to_string(),
            num_participants: self.counts.get(room).copied().unwrap_or(0),
            ..Default::default()
        };
        if let Some(reg) = registered {
            info.empty_timeout = u32::try_from(reg.options.empty_timeout.as_secs()).unwrap_or(0);
            info.departure_timeout =
                u32::try_from(reg.options.departure_timeout.as_secs()).unwrap_or(0);
            info.max_participants = reg.options.max_participants;
            info.metadata = reg.metadata.clone();
        }
        if matches!(event, SfuEvent::RoomFinished { .. }) {
            self.counts.remove(room);
        }
        #[allow(deprecated)] // num_dropped: LiveKit leaves it 0 too
        lk::WebhookEvent {
            event: name.to_owned(),
            room: Some(info),
            participant,
            track,
            id: self.ids.sid("EV_"),
            created_at: unix_now,
            ..Default::default()
        }
    }
}

/// The protojson body of `event`.
pub fn encode(event: &lk::WebhookEvent) -> Result<Vec<u8>, WebhookError> {
    serde_json::to_vec(event).map_err(|e| WebhookError::Encode(e.to_string()))
}

/// One event waiting for delivery.
#[derive(Debug)]
struct Pending {
    name: String,
    room: RoomName,
    body: Arc<Vec<u8>>,
}

/// A bounded FIFO of events for one URL, dropping the oldest when full.
#[derive(Debug, Default)]
struct Queue {
    items: Mutex<VecDeque<Pending>>,
    notify: Notify,
    closed: AtomicBool,
    dropped: AtomicU64,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `p`; returns the event dropped to make room, if any.
    fn push(&self, p: Pending) -> Option<Pending> {
        let dropped = {
            let mut items = self.lock();
            let dropped = if items.len() >= QUEUE_CAPACITY {
                items.pop_front()
            } else {
                None
            };
            items.push_back(p);
            dropped
        };
        if dropped.is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.notify.notify_one();
        dropped
    }

    /// The next event, waiting for one; `None` once closed and empty.
    async fn pop(&self) -> Option<Pending> {
        loop {
            if let Some(p) = self.lock().pop_front() {
                return Some(p);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            self.notify.notified().await;
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// Delivery counters, for logs.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Events delivered (2xx).
    pub delivered: AtomicU64,
    /// Events given up after every attempt (or refused by the receiver).
    pub failed: AtomicU64,
    /// Events dropped before delivery (queue full, or the event stream lagged).
    pub dropped: AtomicU64,
}

/// Where and how to deliver.
#[derive(Clone)]
struct Target {
    client: reqwest::Client,
    url: String,
    api_key: String,
    secret: String,
    stats: Arc<WebhookStats>,
}

impl Target {
    async fn post(&self, body: &Arc<Vec<u8>>) -> Result<(), WebhookError> {
        let token = sign(&self.api_key, &self.secret, body, crate::clock::unix_secs())?;
        let response = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(reqwest::header::AUTHORIZATION, token)
            .body(body.as_ref().clone())
            .send()
            .await
            .map_err(|e| WebhookError::Transport {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(WebhookError::Status {
                url: self.url.clone(),
                status: status.as_u16(),
            })
        }
    }

    async fn deliver(&self, p: &Pending) {
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        for attempt in 1..=MAX_ATTEMPTS {
            match self.post(&p.body).await {
                Ok(()) => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        url = %self.url,
                        event = %p.name,
                        room = %p.room,
                        "webhook delivered"
                    );
                    return;
                }
                Err(e) if e.retryable() && attempt < MAX_ATTEMPTS => {
                    tracing::debug!(
                        error = %e,
                        attempt,
                        event = %p.name,
                        "webhook failed; retrying"
                    );
                    backoff.wait().await;
                }
                Err(e) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = %e,
                        attempt,
                        event = %p.name,
                        room = %p.room,
                        "webhook not delivered"
                    );
                    return;
                }
            }
        }
    }

    async fn work(self, queue: Arc<Queue>) {
        while let Some(p) = queue.pop().await {
            self.deliver(&p).await;
        }
    }
}

/// Where webhooks go and how they are signed.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// `webhook.urls`.
    pub urls: Vec<String>,
    /// The key named in the signature (`webhook.api_key`, default the LiveKit key).
    pub api_key: String,
    /// The LiveKit secret that signs them.
    pub secret: Secret,
}

/// What the webhook notifier needs: where to send, how to reach it, the SFU's room view.
pub struct Webhooks {
    /// Where and how signed.
    pub settings: WebhookSettings,
    /// The client factory (one CA policy).
    pub clients: HttpClients,
    /// Room records for the events' room info.
    pub rooms: Arc<RoomRegistry>,
}

/// Runs the webhook notifier until the event stream ends; returns at once when no URL is
/// configured.
pub async fn run(webhooks: Webhooks, mut events: broadcast::Receiver<SfuEvent>) {
    let Webhooks {
        settings,
        clients,
        rooms,
    } = webhooks;
    let WebhookSettings {
        urls,
        api_key,
        secret,
    } = settings;
    if urls.is_empty() {
        return;
    }
    let client = match clients.client(ClientOptions::with_timeout(REQUEST_TIMEOUT)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %WebhookError::Client(e.to_string()), "webhooks disabled");
            return;
        }
    };
    let stats = Arc::new(WebhookStats::default());
    let mut queues = Vec::new();
    for url in &urls {
        let queue = Arc::new(Queue::default());
        let target = Target {
            client: client.clone(),
            url: url.clone(),
            api_key: api_key.clone(),
            secret: secret.expose().to_owned(),
            stats: stats.clone(),
        };
        tokio::spawn(target.work(queue.clone()));
        queues.push(queue);
    }
    tracing::info!(urls = urls.len(), "webhooks on");
    let mut builder = EventBuilder::default();
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(missed = n, "webhook notifier fell behind; events lost");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        let room_name = event.room().clone();
        let registered = rooms.get(room_name.as_str(), Instant::now());
        let now = i64::try_from(crate::clock::unix_secs()).unwrap_or(0);
        let hook = builder.build(&event, registered.as_ref(), now);
        let body = match encode(&hook) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                tracing::error!(error = %e, "webhook event dropped");
                continue;
            }
        };
        for (queue, url) in queues.iter().zip(&urls) {
            let dropped = queue.push(Pending {
                name: hook.event.clone(),
                room: room_name.clone(),
                body: body.clone(),
            });
            if let Some(old) = dropped {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    %url,
                    event = %old.name,
                    room = %old.room,
                    dropped_total = queue.dropped.load(Ordering::Relaxed),
                    "webhook queue full; oldest event dropped"
                );
            }
        }
    }
    for queue in &queues {
        queue.close();
    }
    tracing::info!(
        delivered = stats.delivered.load(Ordering::Relaxed),
        failed = stats.failed.load(Ordering::Relaxed),
        dropped = stats.dropped.load(Ordering::Relaxed),
        "webhook notifier stopped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sfu::SessionId;

    fn info(identity: &str) -> Box<lk::ParticipantInfo> {
        Box::new(lk::ParticipantInfo {
            sid: format!("PA_{identity}"),
            identity: identity.into(),
            joined_at: 1_700_000_000,
            ..Default::default()
        })
    }

    #[test]
    fn events_are_protojson_with_names_counts_and_sids() {
        let mut b = EventBuilder::with_ids(Ids::from_seed(1));
        let started = b.build(
            &SfuEvent::RoomStarted {
                room: "r".into(),
                sid: "RM_x".into(),
            },
            None,
            1_700_000_000,
        );
        assert_eq!(started.event, "room_started");
        assert!(started.id.starts_with("EV_"));
        let joined = b.build(
            &SfuEvent::ParticipantJoined {
                room: "r".into(),
                room_sid: "RM_x".into(),
                identity: "a".into(),
                sid: "PA_a".into(),
                session: SessionId(1),
                info: info("a"),
            },
            None,
            1_700_000_001,
        );
        let body: serde_json::Value = serde_json::from_slice(&encode(&joined).unwrap()).unwrap();
        assert_eq!(body["event"], "participant_joined");
        assert_eq!(body["room"]["sid"], "RM_x");
        assert_eq!(body["room"]["numParticipants"], 1);
        assert_eq!(body["participant"]["identity"], "a");
        assert_eq!(body["createdAt"], "1700000001", "int64 as a string");
        assert_eq!(body["participant"]["joinedAt"], "1700000000");
        let mut gone = info("a");
        gone.disconnect_reason = lk::DisconnectReason::ClientInitiated as i32;
        let aborted = b.build(
            &SfuEvent::ParticipantLeft {
                room: "r".into(),
                room_sid: "RM_x".into(),
                identity: "a".into(),
                sid: "PA_a".into(),
                session: SessionId(1),
                reason: lk::DisconnectReason::ClientInitiated,
                info: gone.clone(),
                ever_connected: false,
            },
            None,
            1_700_000_002,
        );
        assert_eq!(aborted.event, "participant_connection_aborted");
        assert_eq!(aborted.room.as_ref().unwrap().sid, "RM_x");
        let left = b.build(
            &SfuEvent::ParticipantLeft {
                room: "r".into(),
                room_sid: "RM_x".into(),
                identity: "a".into(),
                sid: "PA_a".into(),
                session: SessionId(1),
                reason: lk::DisconnectReason::ClientInitiated,
                info: gone,
                ever_connected: true,
            },
            None,
            1_700_000_002,
        );
        let body: serde_json::Value = serde_json::from_slice(&encode(&left).unwrap()).unwrap();
        assert_eq!(body["event"], "participant_left");
        assert_eq!(
            body["participant"]["disconnectReason"], "CLIENT_INITIATED",
            "enums by name"
        );
        let finished = b.build(
            &SfuEvent::RoomFinished {
                room: "r".into(),
                sid: "RM_x".into(),
            },
            None,
            1_700_000_003,
        );
        assert_eq!(finished.event, "room_finished");
        assert_eq!(finished.room.unwrap().sid, "RM_x");
        assert!(b.counts.is_empty());
    }

    /// Webhooks of a room made by `CreateRoom`, driven through the engine: `room_started`,
    /// `participant_joined`, `participant_left` and `room_finished` carry the SID the room got
    /// at creation (the one `CreateRoom`, `ListRooms` and the join response show).
    #[test]
    fn webhooks_carry_the_sid_the_room_got_at_creation() {
        use crate::sfu::registry::RoomOptions;
        use crate::sfu::{Command, Join, Output, Sfu, SfuConfig};

        let t0 = Instant::now();
        let mut sfu = Sfu::new(
            SfuConfig {
                candidates: vec!["127.0.0.1:7882".parse().unwrap()],
                seed: Some(3),
                ..Default::default()
            },
            t0,
        );
        let room = RoomName::from("r");
        assert!(sfu.create_room(t0, &room, RoomOptions::default()));
        let record = sfu.registered_rooms().next().cloned().unwrap();
        assert!(record.sid.as_str().starts_with("RM_"));
        sfu.handle_command(
            t0,
            Command::Join(Join {
                session: SessionId(1),
                room: room.clone(),
                identity: "alice".into(),
                name: "alice".into(),
                metadata: String::new(),
                attributes: Default::default(),
                permission: lk::ParticipantPermission::default(),
                auto_subscribe: false,
                client_protocol: 2,
                single_pc: false,
                ice_servers: Vec::new(),
                cascade: crate::sfu::CascadeRole::None,
            }),
        );
        sfu.handle_command(
            t0 + Duration::from_millis(1),
            Command::Disconnect {
                session: SessionId(1),
                epoch: None,
                reason: lk::DisconnectReason::ClientInitiated,
            },
        );
        let mut events = Vec::new();
        loop {
            match sfu.poll_output() {
                Output::Event(e) => events.push(e),
                Output::Timeout(_) => break,
                _ => {}
            }
        }
        let mut b = EventBuilder::with_ids(Ids::from_seed(1));
        let hooks: Vec<lk::WebhookEvent> = events
            .iter()
            .map(|e| b.build(e, Some(&record), 1_700_000_000))
            .collect();
        let names: Vec<&str> = hooks.iter().map(|h| h.event.as_str()).collect();
        assert_eq!(
            names,
            [
                "room_started",
                "participant_joined",
                "participant_connection_aborted",
                "room_finished"
            ]
        );
        for h in &hooks {
            let body: serde_json::Value = serde_json::from_slice(&encode(h).unwrap()).unwrap();
            assert_eq!(body["room"]["sid"], record.sid.as_str(), "{body}");
            assert_eq!(body["room"]["name"], "r");
        }
    }

    #[test]
    fn signature_carries_the_body_hash() {
        let body = br#"{"event":"room_started"}"#;
        let jwt = sign("APIkey", "0123456789abcdef0123456789abcdef", body, 1000).unwrap();
        assert!(!jwt.starts_with("Bearer"));
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.validate_exp = false;
        v.set_issuer(&["APIkey"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &jwt,
            &jsonwebtoken::DecodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
            &v,
        )
        .unwrap();
        let expected = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
        assert_eq!(data.claims["sha256"], expected);
        assert_eq!(data.claims["exp"], 1300);
    }

    #[test]
    fn full_queue_drops_the_oldest() {
        let q = Queue::default();
        for i in 0..QUEUE_CAPACITY + 2 {
            q.push(Pending {
                name: i.to_string(),
                room: "r".into(),
                body: Arc::new(Vec::new()),
            });
        }
        assert_eq!(q.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(q.lock().front().map(|p| p.name.as_str()), Some("2"));
        assert_eq!(q.lock().len(), QUEUE_CAPACITY);
    }
}
