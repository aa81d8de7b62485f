//! "No ghost members": MSC4140 delayed leave events driven by the SFU connection.
//!
//! A client that asks for a token with `delay_id`/`delay_timeout`, or later posts them to
//! `/delegate_delayed_leave`, hands over its delayed leave event (an empty `call.member` state
//! event its homeserver sends when the timer runs out); the token service records it
//! ([`DelayedLeave`]). Conclave sees the SFU connection itself, so for
//! every participant with such a record it:
//!
//! * restarts the delayed event on the user's homeserver as soon as the participant joins and
//!   then every 80 % of `delay_timeout` while it stays connected
//!   (`POST {cs}/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{id}/restart`);
//! * sends it the moment the SFU connection ends, whatever the reason (`…/{id}/send`), so a
//!   crashed client's membership disappears at once instead of after the timeout.
//!
//! Both calls are unauthenticated: the delay ID is the capability. It is therefore never logged
//! in full (only a short prefix) and never appears in error messages (URLs are stripped).
//!
//! 404 on `send` means the event was already sent or cancelled; 404 on `restart` ends that
//! participant's job. 429 waits as long as the homeserver asks (`Retry-After` header or
//! `retry_after_ms`); other failures are retried a bounded number of times with backoff.
//!
//! The client-server API of the user's homeserver is `matrix.homeserver_url` for local users,
//! otherwise `m.homeserver.base_url` from `https://{server}/.well-known/matrix/client` (cached
//! 4 h, failures 1 min). There is one job per (LiveKit room, identity); a new join of the same
//! pair replaces the old job. A participant replaced by a newer session of the same identity
//! (`DUPLICATE_IDENTITY`) keeps its membership: the new session's job takes over.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livekit_protocol::DisconnectReason;
use reqwest::header::RETRY_AFTER;
use reqwest::{StatusCode, Url};
use ruma::{OwnedServerName, ServerName};
use serde_json::Value;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::Calls;
use super::CallsSettings;
use crate::net::SfuHandle;
use crate::plumbing::{
    error_cause, read_capped, Backoff, ClientOptions, DestinationPolicy, HttpClients,
    RedirectRefused, Redirects, RefusedDestination, TtlCache,
};
use crate::sfu::ids::{ParticipantIdentity, ParticipantSid, RoomName};
use crate::sfu::SfuEvent;
use crate::store::{AsyncStore, DelayedLeave, StoreError};

/// Path of the MSC4140 management endpoints under the client-server API base URL.
const DELAYED_EVENTS_PATH: [&str; 5] = [
    "_matrix",
    "client",
    "unstable",
    "org.matrix.msc4140",
    "delayed_events",
];
/// How long a discovered client-server API URL is trusted.
const DISCOVERY_TTL: Duration = Duration::from_secs(4 * 3600);
/// How long a failed discovery is remembered before trying again.
const DISCOVERY_FAILURE_TTL: Duration = Duration::from_secs(60);
/// Most servers remembered by the discovery cache.
const DISCOVERY_CACHE_MAX: usize = 4096;
/// Largest accepted `.well-known/matrix/client` body or error body.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Attempts per restart or send before giving up (404 ends at once).
const MAX_ATTEMPTS: u32 = 6;
/// First retry delay; doubles per attempt up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest retry delay chosen by Conclave.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest `Retry-After` honoured.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);
/// Shortest restart interval, whatever `delay_timeout` says.
const RESTART_INTERVAL_MIN: Duration = Duration::from_millis(250);
/// Timeout of one request to a homeserver.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects followed on another homeserver (same host, https only).
const MAX_REMOTE_REDIRECTS: usize = 3;
/// Characters of a delay ID shown in logs.
const DELAY_ID_PREFIX_CHARS: usize = 8;

/// Why a delayed-event call (or one of its preparations) failed.
#[derive(Debug, thiserror::Error)]
pub enum DelayedLeaveError {
    /// The homeserver does not know the delayed event: already sent, cancelled or expired.
    #[error("delayed event not found (already sent or cancelled)")]
    NotFound,
    /// The homeserver rate-limited the call.
    #[error("rate limited by the homeserver (retry after {retry_after:?})")]
    RateLimited {
        /// How long it asked to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// The homeserver answered with another error status.
    #[error("homeserver answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// `errcode: error` or the start of the body.
        message: String,
    },
    /// The homeserver could not be reached or did not answer in time (URL stripped).
    #[error("homeserver unreachable: {0}")]
    Unreachable(reqwest::Error),
    /// The client-server API of the user's homeserver could not be found.
    #[error("cannot discover the client-server API of {server}: {reason}")]
    Discovery {
        /// The server name.
        server: String,
        /// Why.
        reason: String,
    },
    /// A URL could not be built from the base URL.
    #[error("bad client-server API URL {0:?}")]
    BadUrl(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// Another homeserver's API is at an address or behind a redirect that is not allowed
    /// (loopback or private without `auth.allow_private_federation`, another host, `http`).
    #[error("destination refused: {0}")]
    Refused(String),
}

impl From<reqwest::Error> for DelayedLeaveError {
    fn from(e: reqwest::Error) -> Self {
        // The URL holds the delay ID, a capability: never let it reach a log line.
        Self::Unreachable(e.without_url())
    }
}

/// The two management actions Conclave uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Restart,
    Send,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Restart => "restart",
            Action::Send => "send",
        }
    }
}

/// Delayed leaves handed over after the token request (`POST /delegate_delayed_leave`), for
/// the runner to pick up when the participant is connected already. Cheap to clone.
#[derive(Clone)]
pub struct Delegations(broadcast::Sender<Key>);

impl Default for Delegations {
    fn default() -> Self {
        Self(broadcast::channel(256).0)
    }
}

impl Delegations {
    /// The delayed leave of `identity` in LiveKit room `room` was just recorded.
    pub fn delegated(&self, room: &RoomName, identity: &ParticipantIdentity) {
        // No receiver only before the runner starts or after it stopped: the record is in the
        // store and a later join picks it up.
        let _ = self.0.send((room.clone(), identity.clone()));
    }

    /// The stream of delegations, for the runner.
    pub fn subscribe(&self) -> broadcast::Receiver<Key> {
        self.0.subscribe()
    }
}

/// One participant: its LiveKit room and identity.
type Key = (RoomName, ParticipantIdentity);

/// What the runner reacts to.
enum Input {
    Sfu(Result<SfuEvent, broadcast::error::RecvError>),
    Delegated(Result<Key, broadcast::error::RecvError>),
}

/// Runs forever: follows SFU joins and leaves and drives the delayed leave of each participant
/// that handed one over (with its token request, or later through a delegation). Returns only
/// when the SFU's event stream closes.
pub(super) async fn run(
    calls: Calls,
    mut events: broadcast::Receiver<SfuEvent>,
    mut delegations: broadcast::Receiver<Key>,
) {
    let ctx = match Ctx::new(&calls) {
        Ok(ctx) => Arc::new(ctx),
        Err(e) => {
            tracing::error!(error = %e, "delayed leaves disabled: no HTTP client");
            return;
        }
    };
    let mut jobs: HashMap<Key, Job> = HashMap::new();
    loop {
        let input = tokio::select! {
            ev = events.recv() => Input::Sfu(ev),
            d = delegations.recv() => Input::Delegated(d),
        };
        match input {
            Input::Sfu(Ok(SfuEvent::ParticipantJoined {
                room,
                identity,
                sid,
                ..
            })) => start_job(&ctx, &mut jobs, room, identity, sid),
            Input::Sfu(Ok(SfuEvent::ParticipantLeft {
                room,
                identity,
                sid,
                reason,
                ..
            })) => {
                let key = (room, identity);
                if jobs.get(&key).is_some_and(|j| j.sid == sid) {
                    if let Some(job) = jobs.remove(&key) {
                        job.end(reason);
                    }
                }
            }
            // Room and track events do not concern delayed leaves.
            Input::Sfu(Ok(_)) => {}
            Input::Sfu(Err(broadcast::error::RecvError::Lagged(missed))) => {
                tracing::warn!(
                    missed,
                    "missed SFU events; checking which participants are still connected"
                );
                reconcile(&ctx, &mut jobs).await;
            }
            Input::Sfu(Err(broadcast::error::RecvError::Closed)) => {
                tracing::info!("SFU event stream closed; delayed leaves stop");
                return;
            }
            Input::Delegated(Ok((room, identity))) => {
                // Connected already: start (or restart, for a newer record) its job now.
                // Not connected yet: its join will find the record.
                let present = ctx
                    .sfu
                    .participants(&room)
                    .await
                    .into_iter()
                    .find(|p| identity == p.identity.as_str());
                if let Some(p) = present {
                    let sid = ParticipantSid::from(p.sid);
                    start_job(&ctx, &mut jobs, room, identity, sid);
                }
            }
            Input::Delegated(Err(broadcast::error::RecvError::Lagged(missed))) => {
                tracing::warn!(
                    missed,
                    "missed delegations; their participants' next join picks them up"
                );
            }
            // The calls service holds the sender: never closed while the runner runs.
            Input::Delegated(Err(broadcast::error::RecvError::Closed)) => {}
        }
        // Jobs with nothing to do (no delayed leave, event gone) end by themselves.
        jobs.retain(|_, j| !j.task.is_finished());
    }
}

/// Starts the job of the participant `sid`, replacing any job of the same room and identity.
fn start_job(
    ctx: &Arc<Ctx>,
    jobs: &mut HashMap<Key, Job>,
    room: RoomName,
    identity: ParticipantIdentity,
    sid: ParticipantSid,
) {
    let key = (room.clone(), identity.clone());
    if let Some(old) = jobs.remove(&key) {
        tracing::debug!(room = %room, identity = %identity, "the delayed-leave job is replaced");
        old.task.abort();
    }
    let (ended_tx, ended_rx) = oneshot::channel();
    let span = tracing::info_span!("delayed_leave", room = %room, identity = %identity);
    let task = tokio::spawn(
        participant_job(ctx.clone(), room, identity, sid.clone(), ended_rx).instrument(span),
    );
    jobs.insert(
        key,
        Job {
            sid,
            ended: ended_tx,
            task,
        },
    );
}

/// A running per-participant job.
struct Job {
    /// The participant (one SFU session) it follows.
    sid: ParticipantSid,
    ended: oneshot::Sender<DisconnectReason>,
    task: JoinHandle<()>,
}

impl Job {
    /// The participant's connection ended with `reason`.
    fn end(self, reason: DisconnectReason) {
        if reason == DisconnectReason::DuplicateIdentity {
            // A newer session of the same identity took over: it is still in the call.
            self.task.abort();
        } else {
            // An already finished job (nothing to send) just drops the value.
            let _ = self.ended.send(reason);
        }
    }
}

/// After lost events: ends the jobs whose participant is no longer in the SFU.
async fn reconcile(ctx: &Ctx, jobs: &mut HashMap<Key, Job>) {
    let rooms: HashSet<RoomName> = jobs.keys().map(|(room, _)| room.clone()).collect();
    let mut present: HashMap<RoomName, HashMap<ParticipantIdentity, ParticipantSid>> =
        HashMap::new();
    for room in rooms {
        let participants = ctx.sfu.participants(&room).await;
        present.insert(
            room,
            participants
                .into_iter()
                .map(|p| (p.identity.into(), p.sid.into()))
                .collect(),
        );
    }
    let gone: Vec<Key> = jobs
        .iter()
        .filter(|((room, identity), job)| {
            present
                .get(room)
                .and_then(|m| m.get(identity))
                .is_none_or(|sid| *sid != job.sid)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for key in gone {
        if let Some(job) = jobs.remove(&key) {
            let replaced = present.get(&key.0).is_some_and(|m| m.contains_key(&key.1));
            let reason = if replaced {
                DisconnectReason::DuplicateIdentity
            } else {
                DisconnectReason::UnknownReason
            };
            job.end(reason);
        }
    }
}

/// Shared by the jobs: the store, the SFU and the way to the users' homeservers.
struct Ctx {
    store: AsyncStore,
    sfu: SfuHandle,
    apis: CsApis,
}

/// Where a user's client-server API is and how it may be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CsApi {
    /// Base URL, no trailing slash.
    base: String,
    /// Another homeserver's (found through its `.well-known`): only `https`, only same-host
    /// redirects, only destinations the federation policy allows.
    remote: bool,
}

/// The client-server APIs of the users' homeservers: the configured one for local users
/// (trusted, any address: often `http://localhost:8008`), discovered ones for remote users
/// (whatever a `.well-known` names, so held to the federation rules: a remote server must not
/// make Conclave post to internal addresses).
struct CsApis {
    /// This homeserver's name and client-server API, for local users.
    server_name: OwnedServerName,
    homeserver_url: String,
    local_http: reqwest::Client,
    remote_http: reqwest::Client,
    policy: DestinationPolicy,
    /// Client-server API base URLs (or why discovery failed) by server name.
    discovery: Mutex<TtlCache<OwnedServerName, Result<String, String>>>,
}

/// Why a keep-alive loop stopped without the participant's leave event.
enum KeepAlive {
    /// The delayed event is gone (404 on restart): nothing more to do.
    EventGone,
    /// The participant is no longer in the SFU (its leave event was missed).
    ParticipantGone,
    /// Another session of the same identity is in the SFU now.
    Replaced,
}

/// One participant: keep its delayed leave alive while connected, send it when it leaves.
async fn participant_job(
    ctx: Arc<Ctx>,
    room: RoomName,
    identity: ParticipantIdentity,
    sid: ParticipantSid,
    mut ended: oneshot::Receiver<DisconnectReason>,
) {
    let mut leave = match ctx.lookup(&room, &identity).await {
        Ok(Some(leave)) => leave,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the participant's delayed leave");
            return;
        }
    };
    tracing::info!(
        user_id = %leave.user_id,
        room_id = %leave.matrix_room_id,
        delay_id = %short_id(&leave.delay_id),
        delay_timeout_ms = leave.delay_timeout_ms,
        "keeping the delayed leave alive while the participant is connected"
    );
    let connected_since = Instant::now();
    let reason = tokio::select! {
        biased;
        r = &mut ended => match r {
            Ok(reason) => reason,
            // The job was replaced (the sender is gone): the new job owns the event.
            Err(_) => return,
        },
        outcome = ctx.keep_alive(&mut leave, &room, &identity, &sid) => match outcome {
            KeepAlive::EventGone | KeepAlive::Replaced => return,
            KeepAlive::ParticipantGone => DisconnectReason::UnknownReason,
        },
    };
    // The last delayed leave seen while connected: a record written later may belong to a
    // newer session of this identity and must not be sent.
    let delay = short_id(&leave.delay_id);
    match ctx.call_with_retries(&leave, Action::Send).await {
        Ok(()) => tracing::info!(
            delay_id = %delay,
            reason = reason.as_str_name(),
            connected_ms = connected_since.elapsed().as_millis() as u64,
            "participant left the SFU; delayed leave sent"
        ),
        Err(DelayedLeaveError::NotFound) => tracing::debug!(
            delay_id = %delay,
            reason = reason.as_str_name(),
            "participant left the SFU; its delayed leave was already sent or cancelled"
        ),
        Err(e) => tracing::warn!(
            delay_id = %delay,
            error = %e,
            "participant left the SFU but its delayed leave could not be sent; \
             the homeserver sends it when the delay runs out"
        ),
    }
}

impl Ctx {
    fn new(calls: &Calls) -> Result<Self, DelayedLeaveError> {
        let inner = &calls.inner;
        Ok(Self {
            store: inner.store.clone(),
            sfu: inner.sfu.clone(),
            apis: CsApis::new(&inner.http, &inner.settings)?,
        })
    }

    /// The recorded delayed leave of a participant.
    async fn lookup(
        &self,
        room: &RoomName,
        identity: &ParticipantIdentity,
    ) -> Result<Option<DelayedLeave>, DelayedLeaveError> {
        Ok(self.store.delayed_leave(room, identity).await?)
    }

    /// Restarts the delayed event now and every 80 % of its timeout until something ends it.
    /// Picks up a delayed leave handed over again for the same participant (a new token
    /// request while connected) before each restart.
    async fn keep_alive(
        &self,
        leave: &mut DelayedLeave,
        room: &RoomName,
        identity: &ParticipantIdentity,
        sid: &ParticipantSid,
    ) -> KeepAlive {
        loop {
            // The first restart is immediate: time passed between scheduling the event and
            // joining the SFU.
            let started = Instant::now();
            let delay = short_id(&leave.delay_id);
            match self.call_with_retries(leave, Action::Restart).await {
                Ok(()) => tracing::debug!(delay_id = %delay, "delayed leave restarted"),
                Err(DelayedLeaveError::NotFound) => {
                    tracing::info!(
                        delay_id = %delay,
                        "delayed leave no longer exists on the homeserver (sent or cancelled); \
                         stop keeping it alive"
                    );
                    return KeepAlive::EventGone;
                }
                Err(e) => tracing::warn!(
                    delay_id = %delay,
                    error = %e,
                    "cannot restart the delayed leave; trying again at the next interval"
                ),
            }
            tokio::time::sleep_until(started + restart_interval(leave.delay_timeout_ms)).await;
            // A missed leave event must not keep a ghost alive: ask the SFU.
            let participants = self.sfu.participants(room).await;
            match participants
                .iter()
                .find(|p| identity == p.identity.as_str())
            {
                Some(p) if sid == p.sid.as_str() => {}
                Some(_) => return KeepAlive::Replaced,
                None => {
                    tracing::info!("participant no longer in the SFU (leave event missed)");
                    return KeepAlive::ParticipantGone;
                }
            }
            match self.lookup(room, identity).await {
                Ok(Some(fresh)) if fresh.delay_id != leave.delay_id => {
                    tracing::info!(
                        delay_id = %short_id(&fresh.delay_id),
                        delay_timeout_ms = fresh.delay_timeout_ms,
                        "a new delayed leave was handed over; keeping that one alive"
                    );
                    *leave = fresh;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot re-read the delayed leave"),
            }
        }
    }

    /// One management call, retried on failures other than 404.
    async fn call_with_retries(
        &self,
        leave: &DelayedLeave,
        action: Action,
    ) -> Result<(), DelayedLeaveError> {
        let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        let mut attempt = 1;
        loop {
            let result = match self.apis.cs_api(leave.user_id.server_name()).await {
                Ok(api) => self.apis.post_action(&api, &leave.delay_id, action).await,
                Err(e) => Err(e),
            };
            let err = match result {
                Ok(()) => return Ok(()),
                Err(DelayedLeaveError::NotFound) => return Err(DelayedLeaveError::NotFound),
                // The policy will not change between attempts.
                Err(e @ DelayedLeaveError::Refused(_)) => return Err(e),
                Err(e) if attempt >= MAX_ATTEMPTS => return Err(e),
                Err(e) => e,
            };
            let wait = retry_delay(&err, backoff.next_delay());
            tracing::warn!(
                action = action.as_str(),
                attempt,
                error = %err,
                retry_in_ms = wait.as_millis() as u64,
                "delayed event call failed; retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

impl CsApis {
    fn new(clients: &HttpClients, settings: &CallsSettings) -> Result<Self, DelayedLeaveError> {
        let local_http = clients
            .client(ClientOptions::with_timeout(REQUEST_TIMEOUT))
            .map_err(|e| DelayedLeaveError::Client(e.to_string()))?;
        let remote_http = clients
            .client(ClientOptions {
                connect_timeout: REQUEST_TIMEOUT.min(Duration::from_secs(5)),
                read_timeout: Some(REQUEST_TIMEOUT),
                timeout: REQUEST_TIMEOUT,
                redirects: Redirects::SameHostHttps(MAX_REMOTE_REDIRECTS),
                https_only: true,
                destinations: Some(settings.federation_destinations),
            })
            .map_err(|e| DelayedLeaveError::Client(e.to_string()))?;
        Ok(Self {
            server_name: settings.server_name.clone(),
            homeserver_url: settings.homeserver_url.clone(),
            local_http,
            remote_http,
            policy: settings.federation_destinations,
            discovery: Mutex::new(TtlCache::new(DISCOVERY_CACHE_MAX)),
        })
    }

    /// The client for `api`, after checking an IP-literal remote URL against the policy (the
    /// resolver checks names).
    fn client_for(&self, api: &CsApi, url: &Url) -> Result<&reqwest::Client, DelayedLeaveError> {
        if !api.remote {
            return Ok(&self.local_http);
        }
        self.policy
            .check_url(url)
            .map_err(|e| DelayedLeaveError::Refused(e.to_string()))?;
        Ok(&self.remote_http)
    }

    /// `POST {base}/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{id}/{action}`.
    async fn post_action(
        &self,
        api: &CsApi,
        delay_id: &str,
        action: Action,
    ) -> Result<(), DelayedLeaveError> {
        let url = action_url(&api.base, delay_id, action)?;
        let resp = self
            .client_for(api, &url)?
            .post(url)
            .json(&serde_json::json!({}))
            .send()
            .await
            .map_err(refused_or_unreachable)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let header = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_capped(resp, MAX_BODY_BYTES).await.unwrap_or_default();
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Err(match status {
            StatusCode::NOT_FOUND => DelayedLeaveError::NotFound,
            StatusCode::TOO_MANY_REQUESTS => DelayedLeaveError::RateLimited {
                retry_after: parse_retry_after(header.as_deref(), &json),
            },
            _ => DelayedLeaveError::Status {
                status: status.as_u16(),
                message: error_message(&json, &body),
            },
        })
    }

    /// The client-server API of `server`'s users (discovery cached).
    async fn cs_api(&self, server: &ServerName) -> Result<CsApi, DelayedLeaveError> {
        if let Some(base) = local_cs_base(&self.server_name, &self.homeserver_url, server) {
            return Ok(CsApi {
                base,
                remote: false,
            });
        }
        let now = Instant::now().into_std();
        let cached = self.discovery.lock().ok().and_then(|m| m.get(server, now));
        let result = match cached {
            Some(result) => result,
            None => {
                let result = self.discover(server).await;
                let ttl = if result.is_ok() {
                    DISCOVERY_TTL
                } else {
                    DISCOVERY_FAILURE_TTL
                };
                match &result {
                    Ok(base) => {
                        tracing::debug!(server = %server, base, "client-server API discovered")
                    }
                    Err(e) => {
                        tracing::warn!(server = %server, error = %e, "client-server API discovery failed")
                    }
                }
                if let Ok(mut m) = self.discovery.lock() {
                    m.insert(server.to_owned(), result.clone(), ttl, now);
                }
                result
            }
        };
        result
            .map(|base| CsApi { base, remote: true })
            .map_err(|reason| DelayedLeaveError::Discovery {
                server: server.to_string(),
                reason,
            })
    }

    /// `GET https://{server}/.well-known/matrix/client` → `m.homeserver.base_url` (https only).
    async fn discover(&self, server: &ServerName) -> Result<String, String> {
        let url = Url::parse(&format!("https://{server}/.well-known/matrix/client"))
            .map_err(|e| format!("bad server name: {e}"))?;
        self.policy.check_url(&url).map_err(|e| e.to_string())?;
        let resp =
            self.remote_http.get(url.clone()).send().await.map_err(
                |e| match refused_or_unreachable(e) {
                    DelayedLeaveError::Refused(reason) => reason,
                    other => other.to_string(),
                },
            )?;
        match resp.status() {
            s if s.is_success() => {
                let body = read_capped(resp, MAX_BODY_BYTES)
                    .await
                    .map_err(|e| e.to_string())?;
                remote_base_url(&body)
            }
            // No well-known: the server name itself serves the API (client discovery's fallback).
            StatusCode::NOT_FOUND => Ok(format!("https://{server}")),
            s => Err(format!("{url} answered {s}")),
        }
    }
}

/// A failed request's error: [`DelayedLeaveError::Refused`] when the destination policy or
/// the redirect rule stopped it, else unreachable (URL stripped: it holds the delay ID).
fn refused_or_unreachable(e: reqwest::Error) -> DelayedLeaveError {
    if let Some(refused) = error_cause::<RefusedDestination>(&e) {
        return DelayedLeaveError::Refused(refused.to_string());
    }
    if let Some(refused) = error_cause::<RedirectRefused>(&e) {
        return DelayedLeaveError::Refused(refused.to_string());
    }
    DelayedLeaveError::from(e)
}

/// The local homeserver's client-server API for its own users; `None` for other servers.
fn local_cs_base(
    local_server: &ServerName,
    homeserver_url: &str,
    user_server: &ServerName,
) -> Option<String> {
    (local_server == user_server).then(|| homeserver_url.trim_end_matches('/').to_owned())
}

/// `m.homeserver.base_url` of a `.well-known/matrix/client` body, checked to be an http(s) URL.
fn base_url_from_well_known(body: &[u8]) -> Result<String, String> {
    let json: Value =
        serde_json::from_slice(body).map_err(|e| format!("well-known is not JSON: {e}"))?;
    let base = json
        .get("m.homeserver")
        .and_then(|h| h.get("base_url"))
        .and_then(Value::as_str)
        .ok_or("well-known has no m.homeserver.base_url")?;
    let url = Url::parse(base).map_err(|e| format!("m.homeserver.base_url {base:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(format!(
            "m.homeserver.base_url {base:?} is not an http(s) URL"
        ));
    }
    Ok(base.trim_end_matches('/').to_owned())
}

/// `m.homeserver.base_url` of another homeserver's `.well-known/matrix/client`: as
/// [`base_url_from_well_known`], and `https` only.
fn remote_base_url(body: &[u8]) -> Result<String, String> {
    let base = base_url_from_well_known(body)?;
    if !base.starts_with("https://") {
        return Err(format!(
            "m.homeserver.base_url {base:?} is not https (another homeserver's API is only \
             reached over https)"
        ));
    }
    Ok(base)
}

/// The management URL of `delay_id` for `action` (the ID percent-encoded as one segment).
fn action_url(base: &str, delay_id: &str, action: Action) -> Result<Url, DelayedLeaveError> {
    let mut url = Url::parse(base).map_err(|_| DelayedLeaveError::BadUrl(base.to_owned()))?;
    url.path_segments_mut()
        .map_err(|()| DelayedLeaveError::BadUrl(base.to_owned()))?
        .pop_if_empty()
        .extend(DELAYED_EVENTS_PATH)
        .push(delay_id)
        .push(action.as_str());
    Ok(url)
}

/// How long to wait after a 429: `retry_after_ms` in the body, else the `Retry-After` header
/// (delta-seconds; an HTTP date is not honoured).
fn parse_retry_after(header: Option<&str>, body: &Value) -> Option<Duration> {
    if let Some(ms) = body.get("retry_after_ms").and_then(Value::as_u64) {
        return Some(Duration::from_millis(ms));
    }
    let secs: f64 = header?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// The wait before the next attempt after `err`.
fn retry_delay(err: &DelayedLeaveError, backoff: Duration) -> Duration {
    match err {
        DelayedLeaveError::RateLimited {
            retry_after: Some(d),
        } => (*d).min(RETRY_AFTER_MAX),
        _ => backoff,
    }
}

/// Restart period: 80 % of the delay, at least [`RESTART_INTERVAL_MIN`].
fn restart_interval(delay_timeout_ms: u64) -> Duration {
    Duration::from_millis(delay_timeout_ms - delay_timeout_ms / 5).max(RESTART_INTERVAL_MIN)
}

/// A delay ID as logs show it: a short prefix (the full ID is a capability).
fn short_id(delay_id: &str) -> String {
    let prefix: String = delay_id.chars().take(DELAY_ID_PREFIX_CHARS).collect();
    if prefix.len() < delay_id.len() {
        format!("{prefix}…")
    } else {
        prefix
    }
}

/// `errcode: error` of a Matrix error body, else the start of the body.
fn error_message(json: &Value, body: &[u8]) -> String {
    match (
        json.get("errcode").and_then(Value::as_str),
        json.get("error").and_then(Value::as_str),
    ) {
        (Some(code), Some(error)) => format!("{code}: {error}"),
        (Some(code), None) => code.to_owned(),
        _ => String::from_utf8_lossy(body).chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(s: &str) -> OwnedServerName {
        ServerName::parse(s).unwrap()
    }

    #[test]
    fn retry_after_prefers_the_body_then_the_header() {
        let body = json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 1500});
        assert_eq!(
            parse_retry_after(Some("7"), &body),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after(Some(" 7 "), &Value::Null),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after(Some("0.5"), &json!({})),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT"), &json!({})),
            None
        );
        assert_eq!(parse_retry_after(Some("-3"), &json!({})), None);
        assert_eq!(
            parse_retry_after(None, &json!({"retry_after_ms": "x"})),
            None
        );
        assert_eq!(parse_retry_after(None, &Value::Null), None);
    }

    #[test]
    fn retry_delay_honours_rate_limits_within_bounds() {
        let backoff = Duration::from_secs(2);
        let limited = |d| DelayedLeaveError::RateLimited { retry_after: d };
        assert_eq!(
            retry_delay(&limited(Some(Duration::from_millis(300))), backoff),
            Duration::from_millis(300)
        );
        assert_eq!(
            retry_delay(&limited(Some(Duration::from_secs(3600))), backoff),
            RETRY_AFTER_MAX
        );
        assert_eq!(retry_delay(&limited(None), backoff), backoff);
        let other = DelayedLeaveError::Status {
            status: 502,
            message: String::new(),
        };
        assert_eq!(retry_delay(&other, backoff), backoff);
    }

    #[test]
    fn restarts_at_80_percent_of_the_delay() {
        assert_eq!(restart_interval(10_000), Duration::from_millis(8_000));
        assert_eq!(restart_interval(4_000), Duration::from_millis(3_200));
        assert_eq!(restart_interval(600_000), Duration::from_secs(480));
        assert_eq!(restart_interval(1), RESTART_INTERVAL_MIN);
        assert_eq!(restart_interval(0), RESTART_INTERVAL_MIN);
        // No overflow at the extreme.
        assert!(restart_interval(u64::MAX) > Duration::from_secs(1));
    }

    #[test]
    fn local_users_use_the_configured_homeserver() {
        let local = server("example.org");
        assert_eq!(
            local_cs_base(&local, "http://127.0.0.1:8008/", &server("example.org")),
            Some("http://127.0.0.1:8008".to_owned())
        );
        assert_eq!(
            local_cs_base(&local, "http://127.0.0.1:8008", &server("other.org")),
            None
        );
        // Server names with ports are distinct servers.
        assert_eq!(
            local_cs_base(&local, "http://127.0.0.1:8008", &server("example.org:8448")),
            None
        );
    }

    #[test]
    fn well_known_base_url_is_read_and_checked() {
        let body = br#"{"m.homeserver": {"base_url": "https://matrix.example.org/"}}"#;
        assert_eq!(
            base_url_from_well_known(body),
            Ok("https://matrix.example.org".to_owned())
        );
        let body = br#"{"m.homeserver": {"base_url": "https://example.org/matrix"}}"#;
        assert_eq!(
            base_url_from_well_known(body),
            Ok("https://example.org/matrix".to_owned())
        );
        assert!(base_url_from_well_known(b"nope").is_err());
        assert!(base_url_from_well_known(br#"{"m.homeserver": {}}"#).is_err());
        assert!(base_url_from_well_known(br#"{"m.homeserver": {"base_url": 5}}"#).is_err());
        assert!(
            base_url_from_well_known(br#"{"m.homeserver": {"base_url": "ftp://x.org"}}"#).is_err()
        );
        assert!(
            base_url_from_well_known(br#"{"m.homeserver": {"base_url": "not a url"}}"#).is_err()
        );
    }

    #[test]
    fn remote_base_urls_must_be_https() {
        let body = br#"{"m.homeserver": {"base_url": "https://matrix.example.org/"}}"#;
        assert_eq!(
            remote_base_url(body),
            Ok("https://matrix.example.org".to_owned())
        );
        let body = br#"{"m.homeserver": {"base_url": "http://10.0.0.1:8008"}}"#;
        let err = remote_base_url(body).unwrap_err();
        assert!(err.contains("not https"), "{err}");
    }

    fn apis(allow_private: bool) -> CsApis {
        let settings = CallsSettings {
            server_name: server("local.example"),
            homeserver_url: "http://127.0.0.1:8008/".into(),
            bot_user_id: "@conclave:local.example".into(),
            notices: false,
            grace_period: Duration::ZERO,
            history: None,
            federation_destinations: DestinationPolicy::new(allow_private),
            cascade_peers: Vec::new(),
        };
        CsApis::new(&HttpClients::default(), &settings).unwrap()
    }

    /// A remote user's homeserver on loopback (by IP literal or by a name resolving there) is
    /// never contacted with the default policy; the local homeserver is, whatever its address.
    #[tokio::test]
    async fn remote_apis_on_private_addresses_are_refused_by_default() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let strict = apis(false);

        let local = strict.cs_api(&server("local.example")).await.unwrap();
        assert_eq!(
            local,
            CsApi {
                base: "http://127.0.0.1:8008".into(),
                remote: false
            }
        );
        for name in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            let err = strict.cs_api(&server(&name)).await.unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, DelayedLeaveError::Discovery { .. }) && text.contains("refused"),
                "{name}: {text}"
            );
        }
        // A base URL discovered earlier (or cached) at a private address is refused too.
        let api = CsApi {
            base: format!("https://127.0.0.1:{port}"),
            remote: true,
        };
        let err = strict
            .post_action(&api, "syd_abc", Action::Send)
            .await
            .unwrap_err();
        assert!(matches!(err, DelayedLeaveError::Refused(_)), "{err}");
        // Nothing connected.
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "a refused destination was connected to");
        drop(listener);

        // With `allow_private_federation` the same destination is tried (and fails: nothing
        // listens there any more).
        let open = apis(true);
        let err = open
            .post_action(&api, "syd_abc", Action::Send)
            .await
            .unwrap_err();
        assert!(matches!(err, DelayedLeaveError::Unreachable(_)), "{err}");
    }

    #[test]
    fn action_urls_encode_the_delay_id() {
        let url = action_url("http://127.0.0.1:8008/", "syd_abc", Action::Restart).unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8008/_matrix/client/unstable/org.matrix.msc4140/delayed_events/syd_abc/restart"
        );
        let url = action_url("https://example.org/matrix", "a/b?c", Action::Send).unwrap();
        assert_eq!(
            url.as_str(),
            "https://example.org/matrix/_matrix/client/unstable/org.matrix.msc4140/delayed_events/a%2Fb%3Fc/send"
        );
        assert!(action_url("not a url", "x", Action::Send).is_err());
    }

    #[test]
    fn delay_ids_are_shortened_for_logs() {
        assert_eq!(short_id("syd_abcdefghijklmnop"), "syd_abcd…");
        assert_eq!(short_id("short"), "short");
        assert!(!short_id("syd_abcdefghijklmnop").contains("efgh"));
    }

    #[test]
    fn error_messages_prefer_matrix_errors() {
        let j = json!({"errcode": "M_FORBIDDEN", "error": "no"});
        assert_eq!(error_message(&j, b""), "M_FORBIDDEN: no");
        assert_eq!(
            error_message(&Value::Null, b"<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
    }

    #[test]
    fn reqwest_errors_lose_their_url() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(async {
            reqwest::Client::new()
                .post("http://127.0.0.1:1/_matrix/client/unstable/org.matrix.msc4140/delayed_events/syd_secret/send")
                .send()
                .await
                .unwrap_err()
        });
        let e = DelayedLeaveError::from(err);
        assert!(!e.to_string().contains("syd_secret"), "{e}");
        assert!(!format!("{e:?}").contains("syd_secret"), "{e:?}");
    }
}
