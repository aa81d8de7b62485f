//! `conclave-bench soak`: a bounded soak of a `conclave serve` child process. For a given
//! duration, synthetic LiveKit clients churn joins and leaves on signalling while a stand-in
//! homeserver task PUTs appservice transactions with MatrixRTC call memberships for the same
//! rooms; the server's RSS, open file descriptors, SFU rooms, participants and active calls are
//! sampled throughout. After the load stops and the server has had time to close empty rooms,
//! whatever remains is reported as leaked.
//!
//! The server runs with the calls' `m.notice`s off (there is no homeserver to post them to);
//! rooms are registered through the RoomService API (`CreateRoom`) before each join with short
//! empty and departure timeouts, so the settle period at the end stays short. Every loop is
//! bounded by the deadline and every request by a timeout; all traffic stays on loopback.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conclave::auth::jwt::{Claims, VideoGrant};
use conclave::matrix::naming::{room_name, LEGACY_SLOT};
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Msg;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use super::lk::{Incoming, LkSignal};
use super::server::{default_server_exe, ConclaveTarget};
use super::{proc_alive, proc_fd_count, proc_rss_kb, BenchError};

/// Bound on one signalling connect (WebSocket upgrade and join response).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one HTTP request (Twirp, appservice, admin, metrics).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a clean leave (leave request and close handshake).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client stays in a room, milliseconds (uniform).
const STAY_MS: std::ops::RangeInclusive<u64> = 100..=1500;
/// `empty_timeout` of the rooms the soak registers, seconds.
const ROOM_EMPTY_TIMEOUT_S: u32 = 5;
/// `departure_timeout` of the rooms the soak registers, seconds.
const ROOM_DEPARTURE_TIMEOUT_S: u32 = 2;
/// Longest wait for the server to drop empty rooms after the load: a room created by a join
/// alone (when its registration expired in between) keeps the default 20 s departure timeout.
const SETTLE_MAX: Duration = Duration::from_secs(45);
/// Longest wait for the clients to finish their last session after the deadline.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// Pause between two appservice transactions.
const TXN_INTERVAL: Duration = Duration::from_millis(50);
/// Matrix users per room whose call memberships the transactions toggle.
const USERS_PER_ROOM: usize = 6;
/// Every this many transactions, the previous one is sent again with the same txnId.
const REPLAY_EVERY: u64 = 10;
/// Events in one closing transaction.
const EVENTS_PER_CHUNK: usize = 100;
/// Server name of the Matrix ids the soak makes up.
const SERVER_NAME: &str = "localhost";

/// Soak settings.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// How long the load runs (the settle period comes after).
    pub duration: Duration,
    /// Signalling clients churning in parallel.
    pub concurrency: usize,
    /// Distinct rooms the clients and the call memberships cycle through.
    pub rooms: usize,
    /// Interval between two samples.
    pub sample_interval: Duration,
}

impl SoakOptions {
    /// The load before the baseline sample: a tenth of the duration, 1 to 60 s.
    pub fn warm_up(&self) -> Duration {
        (self.duration / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    fn check(&self) -> Result<(), BenchError> {
        if self.duration.is_zero() || self.concurrency == 0 || self.rooms == 0 {
            return Err(BenchError::Options(
                "duration, concurrency and rooms must be positive".into(),
            ));
        }
        if self.sample_interval < Duration::from_millis(100) {
            return Err(BenchError::Options(
                "the sample interval must be at least 0.1 s".into(),
            ));
        }
        Ok(())
    }
}

/// One look at the server.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_s: f64,
    /// Resident set size, KiB (`VmRSS`); absent if the process is gone.
    pub rss_kb: Option<u64>,
    /// Open file descriptors (`/proc/<pid>/fd`).
    pub fds: Option<u64>,
    /// SFU rooms (RoomService `ListRooms`).
    pub rooms: Option<u64>,
    /// Participants in those rooms.
    pub participants: Option<u64>,
    /// Active Matrix calls (admin API).
    pub calls: Option<u64>,
    /// Bytes of the data dir's files (SQLite database, WAL, secrets).
    pub store_bytes: Option<u64>,
}

/// Results.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Always `soak`.
    pub scenario: &'static str,
    /// Load duration, seconds.
    pub duration_s: f64,
    /// Parallel clients.
    pub concurrency: usize,
    /// Distinct rooms.
    pub rooms: usize,
    /// Warm-up before the baseline (`*_start`) sample, seconds.
    pub warm_up_s: f64,
    /// Signalling sessions that got their join response.
    pub joins: u64,
    /// Sessions ended with a leave request and a close handshake.
    pub leaves_clean: u64,
    /// Sessions ended by dropping the socket (no leave, no close frame).
    pub leaves_abrupt: u64,
    /// Participant metadata updates sent.
    pub metadata_updates: u64,
    /// RoomService `CreateRoom` calls answered 200.
    pub rooms_created: u64,
    /// Appservice transactions answered 200 (replays included).
    pub transactions: u64,
    /// Of those, transactions sent again with an already used txnId.
    pub transactions_replayed: u64,
    /// The server's `conclave_appservice_transactions_replayed_total` at the end.
    pub server_transactions_replayed: Option<u64>,
    /// Call memberships joined in transactions.
    pub call_joins: u64,
    /// Call memberships left in transactions (closing ones included).
    pub call_leaves: u64,
    /// Failures, all kinds.
    pub errors: u64,
    /// Failures by kind.
    pub errors_by_kind: BTreeMap<String, u64>,
    /// RSS at the baseline sample, KiB.
    pub rss_start_kb: Option<u64>,
    /// RSS after the settle period, KiB.
    pub rss_end_kb: Option<u64>,
    /// Largest RSS sampled, KiB.
    pub rss_peak_kb: Option<u64>,
    /// `rss_end_kb − rss_start_kb`.
    pub rss_drift_kb: Option<i64>,
    /// Least-squares RSS slope over the second half of the load, KiB per hour.
    pub rss_slope_kb_per_h: Option<f64>,
    /// Data dir size at the baseline sample, bytes: the store keeps every processed txnId
    /// and every ended call and membership, so it grows with the load.
    pub store_bytes_start: Option<u64>,
    /// Data dir size after the settle period, bytes.
    pub store_bytes_end: Option<u64>,
    /// Open fds at the baseline sample.
    pub fds_start: Option<u64>,
    /// Open fds after the settle period.
    pub fds_end: Option<u64>,
    /// Most open fds sampled.
    pub fds_peak: Option<u64>,
    /// Most SFU rooms sampled.
    pub rooms_peak: Option<u64>,
    /// Most participants sampled.
    pub participants_peak: Option<u64>,
    /// Most active calls sampled.
    pub calls_peak: Option<u64>,
    /// How long the server took to drop every room after the load, seconds (up to 45).
    pub settle_s: f64,
    /// SFU rooms still there after the settle period (registered or with participants).
    pub leaked_rooms: u64,
    /// Participants still connected after the settle period.
    pub leaked_participants: u64,
    /// Matrix calls still active after every membership was left.
    pub leaked_calls: u64,
    /// Names of the leaked SFU rooms.
    pub leaked_room_names: Vec<String>,
    /// Whether the server was running and healthy at the end.
    pub server_alive: bool,
    /// Every sample, in order: before the load, from the warm-up on, at the end of the load,
    /// during the settle period and the final one.
    pub samples: Vec<Sample>,
}

impl SoakReport {
    /// Why the soak failed (leaked rooms, participants or calls; the server died), if it did.
    pub fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        if !self.server_alive {
            why.push("the server died or stopped answering".to_owned());
        }
        if self.leaked_rooms > 0 {
            why.push(format!(
                "{} SFU room(s) leaked: {}",
                self.leaked_rooms,
                self.leaked_room_names.join(", ")
            ));
        }
        if self.leaked_participants > 0 {
            why.push(format!(
                "{} participant(s) leaked",
                self.leaked_participants
            ));
        }
        if self.leaked_calls > 0 {
            why.push(format!("{} call(s) leaked", self.leaked_calls));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// The report as Markdown: a summary table and the samples (at most about 30 rows).
    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let opt = |v: Option<u64>| v.map_or_else(|| "–".to_owned(), |v| v.to_string());
        let mib = |v: Option<u64>| {
            v.map_or_else(|| "–".to_owned(), |v| format!("{:.1}", v as f64 / 1024.0))
        };
        let errors = if self.errors_by_kind.is_empty() {
            "0".to_owned()
        } else {
            let kinds: Vec<String> = self
                .errors_by_kind
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            format!("{} ({})", self.errors, kinds.join(", "))
        };
        let mut out = String::new();
        let _ = writeln!(out, "| soak | |\n|---|---|");
        let rows = [
            (
                "load",
                format!(
                    "{:.0} s, {} clients, {} rooms, warm-up {:.0} s",
                    self.duration_s, self.concurrency, self.rooms, self.warm_up_s
                ),
            ),
            (
                "joins / leaves clean / abrupt",
                format!(
                    "{} / {} / {}",
                    self.joins, self.leaves_clean, self.leaves_abrupt
                ),
            ),
            (
                "metadata updates / CreateRoom",
                format!("{} / {}", self.metadata_updates, self.rooms_created),
            ),
            (
                "transactions (replayed)",
                format!(
                    "{} ({} sent, {} counted by the server)",
                    self.transactions,
                    self.transactions_replayed,
                    opt(self.server_transactions_replayed)
                ),
            ),
            (
                "call joins / leaves",
                format!("{} / {}", self.call_joins, self.call_leaves),
            ),
            ("errors", errors),
            (
                "RSS start / end / peak (MiB)",
                format!(
                    "{} / {} / {}",
                    mib(self.rss_start_kb),
                    mib(self.rss_end_kb),
                    mib(self.rss_peak_kb)
                ),
            ),
            (
                "RSS drift end − start",
                self.rss_drift_kb
                    .map_or_else(|| "–".to_owned(), |d| format!("{d} KiB")),
            ),
            (
                "RSS slope, 2nd half of the load",
                self.rss_slope_kb_per_h
                    .map_or_else(|| "–".to_owned(), |s| format!("{s:.0} KiB/h")),
            ),
            (
                "fds start / end / peak",
                format!(
                    "{} / {} / {}",
                    opt(self.fds_start),
                    opt(self.fds_end),
                    opt(self.fds_peak)
                ),
            ),
            (
                "store start / end (MiB)",
                format!(
                    "{} / {}",
                    mib(self.store_bytes_start.map(|b| b / 1024)),
                    mib(self.store_bytes_end.map(|b| b / 1024))
                ),
            ),
            (
                "peak rooms / participants / calls",
                format!(
                    "{} / {} / {}",
                    opt(self.rooms_peak),
                    opt(self.participants_peak),
                    opt(self.calls_peak)
                ),
            ),
            ("settle", format!("{:.1} s", self.settle_s)),
            (
                "leaked rooms / participants / calls",
                format!(
                    "{} / {} / {}",
                    self.leaked_rooms, self.leaked_participants, self.leaked_calls
                ),
            ),
            (
                "server alive at the end",
                if self.server_alive { "yes" } else { "no" }.to_owned(),
            ),
        ];
        for (k, v) in rows {
            let _ = writeln!(out, "| {k} | {v} |");
        }
        let _ = writeln!(
            out,
            "\n| t (s) | RSS (MiB) | fds | rooms | participants | calls | store (MiB) |\n\
             |---|---|---|---|---|---|---|"
        );
        let step = self.samples.len().div_ceil(30).max(1);
        let last = self.samples.len().saturating_sub(1);
        for (i, s) in self.samples.iter().enumerate() {
            if i % step == 0 || i == last {
                let _ = writeln!(
                    out,
                    "| {:.0} | {} | {} | {} | {} | {} | {} |",
                    s.t_s,
                    mib(s.rss_kb),
                    opt(s.fds),
                    opt(s.rooms),
                    opt(s.participants),
                    opt(s.calls),
                    mib(s.store_bytes.map(|b| b / 1024))
                );
            }
        }
        out
    }
}

/// What the soak did, counted by every task.
#[derive(Debug, Default)]
struct Counters {
    joins: AtomicU64,
    leaves_clean: AtomicU64,
    leaves_abrupt: AtomicU64,
    metadata_updates: AtomicU64,
    rooms_created: AtomicU64,
    transactions: AtomicU64,
    transactions_replayed: AtomicU64,
    call_joins: AtomicU64,
    call_leaves: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn error(&self, kind: &'static str) {
        tracing::debug!(kind, "soak error");
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(kind).or_default() += 1;
        }
    }

    fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .map(|e| e.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
            .unwrap_or_default()
    }
}

/// Everything the tasks share.
struct Soak {
    server: ConclaveTarget,
    http: reqwest::Client,
    pid: String,
    hs_token: String,
    admin_token: String,
    /// Matrix room ids (`!soak-N:localhost`).
    room_ids: Vec<String>,
    /// The SFU room of each Matrix room's call (same index).
    sfu_rooms: Vec<String>,
    counters: Counters,
}

impl Soak {
    /// A LiveKit token: `grant` for `identity`, valid ten minutes.
    fn token(&self, identity: &str, grant: VideoGrant) -> Result<String, BenchError> {
        let now = conclave::clock::unix_secs();
        let claims = Claims {
            iss: self.server.signer.key().to_owned(),
            sub: identity.to_owned(),
            nbf: now.saturating_sub(10),
            exp: now + 600,
            name: identity.to_owned(),
            metadata: String::new(),
            video: grant,
        };
        self.server
            .signer
            .sign(&claims)
            .map_err(|e| BenchError::Signal(format!("signing a token: {e}")))
    }

    /// A RoomService call in protobuf; `Ok(None)` when the server answers 404 (no such room).
    async fn twirp<Q: prost::Message, A: prost::Message + Default>(
        &self,
        method: &str,
        grant: VideoGrant,
        request: &Q,
    ) -> Result<Option<A>, BenchError> {
        let token = self.token("soak-admin", grant)?;
        let response = self
            .http
            .post(format!(
                "{}/twirp/livekit.RoomService/{method}",
                self.server.http_url
            ))
            .bearer_auth(token)
            .header("content-type", "application/protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
            .map_err(|e| BenchError::Server(format!("{method}: {e}")))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| BenchError::Server(format!("{method}: {e}")))?;
        if !status.is_success() {
            return Err(BenchError::Server(format!(
                "{method} answered {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        A::decode(body.as_ref())
            .map(Some)
            .map_err(|e| BenchError::Server(format!("{method}: undecodable answer: {e}")))
    }

    /// Registers `room` with short timeouts (idempotent: an existing room keeps its own).
    async fn create_room(&self, room: &str) -> Result<(), BenchError> {
        let request = lk::CreateRoomRequest {
            name: room.to_owned(),
            empty_timeout: ROOM_EMPTY_TIMEOUT_S,
            departure_timeout: ROOM_DEPARTURE_TIMEOUT_S,
            ..Default::default()
        };
        let grant = VideoGrant {
            room_create: true,
            ..VideoGrant::default()
        };
        self.twirp::<_, lk::Room>("CreateRoom", grant, &request)
            .await
            .map(|_| ())
    }

    /// Registered SFU rooms and their participants (`ListRooms`).
    async fn list_rooms(&self) -> Result<Vec<lk::Room>, BenchError> {
        let grant = VideoGrant {
            room_list: true,
            ..VideoGrant::default()
        };
        let answer: Option<lk::ListRoomsResponse> = self
            .twirp("ListRooms", grant, &lk::ListRoomsRequest::default())
            .await?;
        Ok(answer.map(|a| a.rooms).unwrap_or_default())
    }

    /// Participants connected to `room`, registered or not (`ListParticipants`); `None` when
    /// the server knows no such room (neither a record nor live state in the SFU engine).
    async fn participants_of(&self, room: &str) -> Result<Option<u64>, BenchError> {
        let grant = VideoGrant {
            room: room.to_owned(),
            room_admin: true,
            ..VideoGrant::default()
        };
        let request = lk::ListParticipantsRequest {
            room: room.to_owned(),
        };
        let answer: Option<lk::ListParticipantsResponse> =
            self.twirp("ListParticipants", grant, &request).await?;
        Ok(answer.map(|a| a.participants.len() as u64))
    }

    /// Active Matrix calls (admin API).
    async fn active_calls(&self) -> Result<u64, BenchError> {
        let v: Value = self
            .http
            .get(format!("{}/_conclave/admin/v1/calls", self.server.http_url))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| BenchError::Server(format!("admin calls: {e}")))?
            .json()
            .await
            .map_err(|e| BenchError::Server(format!("admin calls: {e}")))?;
        v.get("calls")
            .and_then(Value::as_array)
            .map(|c| c.len() as u64)
            .ok_or_else(|| BenchError::Server(format!("admin calls: unexpected answer {v}")))
    }

    /// A counter from `/metrics`.
    async fn metric(&self, name: &str) -> Option<u64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.server.http_url))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Whether the process exists and `/healthz` answers 2xx.
    async fn healthy(&self) -> bool {
        proc_alive(&self.pid)
            && self
                .http
                .get(format!("{}/healthz", self.server.http_url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
    }

    /// Samples the server (`t0`: start of the load).
    async fn sample(&self, t0: Instant) -> Sample {
        let t_s = t0.elapsed().as_secs_f64();
        let (rooms, participants) = match self.list_rooms().await {
            Ok(rooms) => (
                Some(rooms.len() as u64),
                Some(rooms.iter().map(|r| u64::from(r.num_participants)).sum()),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "sampling rooms");
                self.counters.error("sample_rooms");
                (None, None)
            }
        };
        let calls = match self.active_calls().await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "sampling calls");
                self.counters.error("sample_calls");
                None
            }
        };
        Sample {
            t_s,
            rss_kb: proc_rss_kb(&self.pid),
            fds: proc_fd_count(&self.pid),
            rooms,
            participants,
            calls,
            store_bytes: self.server.data_dir().and_then(dir_bytes),
        }
    }

    /// What is left after the settle period: SFU rooms (registered, or still known to the
    /// SFU engine, which `ListParticipants` sees), participants, calls.
    async fn leftovers(&self) -> Result<(Vec<String>, u64, u64), BenchError> {
        let mut names: Vec<String> = self
            .list_rooms()
            .await?
            .into_iter()
            .map(|r| r.name)
            .collect();
        let mut participants = 0;
        for room in &self.sfu_rooms {
            if let Some(n) = self.participants_of(room).await? {
                participants += n;
                if !names.contains(room) {
                    names.push(room.clone());
                }
            }
        }
        names.sort();
        Ok((names, participants, self.active_calls().await?))
    }

    /// PUTs one appservice transaction.
    async fn put_transaction(&self, txn_id: &str, body: &[u8]) -> Result<(), &'static str> {
        let response = self
            .http
            .put(format!(
                "{}/_matrix/app/v1/transactions/{txn_id}",
                self.server.http_url
            ))
            .bearer_auth(&self.hs_token)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, txn_id, "transaction failed");
                "transaction_http"
            })?;
        if response.status().is_success() {
            Ok(())
        } else {
            tracing::warn!(status = %response.status(), txn_id, "transaction refused");
            Err("transaction_status")
        }
    }
}

/// Total size of the regular files directly in `dir`.
fn dir_bytes(dir: &std::path::Path) -> Option<u64> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(
        entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len())
            .sum(),
    )
}

/// A Matrix user of the soak.
fn user_id(user: usize) -> String {
    format!("@soak-{user}:{SERVER_NAME}")
}

/// An `org.matrix.msc3401.call.member` state event: `user` joins the call in `room_id`
/// (legacy slot) or, with `join` false, leaves it (empty content).
fn call_member(room_id: &str, user: usize, join: bool, event_id: &str, now_ms: u64) -> Value {
    let sender = user_id(user);
    let device = format!("SOAK{user}");
    let content = if join {
        json!({
            "application": "m.call",
            "call_id": "",
            "scope": "m.room",
            "device_id": device,
            "expires": 3_600_000,
            "created_ts": now_ms,
            "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
            "foci_preferred": [{"type": "livekit", "livekit_alias": room_id,
                                "livekit_service_url": "http://127.0.0.1/livekit/jwt"}],
        })
    } else {
        json!({})
    };
    json!({
        "type": "org.matrix.msc3401.call.member",
        "event_id": event_id,
        "room_id": room_id,
        "sender": sender,
        "state_key": format!("_{sender}_{device}_m.call"),
        "origin_server_ts": now_ms,
        "content": content,
    })
}

fn now_ms() -> u64 {
    u64::try_from(conclave::clock::unix_millis()).unwrap_or_default()
}

/// One signalling session of a churning client: join `room`, maybe update the metadata, stay
/// a short random time answering nothing, leave cleanly or drop the socket. Returns the error
/// kind on failure.
async fn session(
    soak: &Soak,
    room: &str,
    identity: &str,
    clean: bool,
    rng: &mut StdRng,
) -> Result<(), &'static str> {
    let grant = VideoGrant {
        room: room.to_owned(),
        room_join: true,
        can_publish: Some(false),
        can_subscribe: Some(true),
        can_publish_data: Some(true),
        can_update_own_metadata: Some(true),
        ..VideoGrant::default()
    };
    let token = soak.token(identity, grant).map_err(|_| "token")?;
    let (mut signal, _join) = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        LkSignal::connect(&soak.server.ws_url(), &token, true),
    )
    .await
    {
        Err(_) => return Err("join_timeout"),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, room, identity, "join failed");
            return Err("join_failed");
        }
        Ok(Ok(joined)) => joined,
    };
    Counters::bump(&soak.counters.joins);
    if rng.gen_bool(0.5) {
        let update = Req::UpdateMetadata(lk::UpdateParticipantMetadata {
            metadata: format!("{{\"soak\":{}}}", rng.gen::<u32>()),
            request_id: rng.gen(),
            ..Default::default()
        });
        signal.send(update).await.map_err(|_| "send_failed")?;
        Counters::bump(&soak.counters.metadata_updates);
    }
    let until = tokio::time::Instant::now() + Duration::from_millis(rng.gen_range(STAY_MS));
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => break,
            incoming = signal.recv() => match incoming {
                Incoming::Closed => return Err("closed_by_server"),
                Incoming::Message(m) if matches!(*m, Msg::Leave(_)) => {
                    return Err("left_by_server")
                }
                Incoming::Message(_) | Incoming::Nothing => {}
            },
        }
    }
    if clean {
        if tokio::time::timeout(LEAVE_TIMEOUT, signal.leave())
            .await
            .is_err()
        {
            return Err("leave_timeout");
        }
        Counters::bump(&soak.counters.leaves_clean);
    } else {
        drop(signal);
        Counters::bump(&soak.counters.leaves_abrupt);
    }
    Ok(())
}

/// A churning client: sessions one after the other, in random rooms with fresh identities,
/// clean and abrupt leaves alternating, until `deadline`.
async fn churn(soak: Arc<Soak>, client: usize, deadline: Instant) {
    let mut rng = StdRng::from_entropy();
    let mut n: u64 = 0;
    while Instant::now() < deadline {
        n += 1;
        let room = &soak.sfu_rooms[rng.gen_range(0..soak.sfu_rooms.len())];
        match soak.create_room(room).await {
            Ok(()) => Counters::bump(&soak.counters.rooms_created),
            Err(e) => {
                tracing::debug!(error = %e, "CreateRoom failed");
                soak.counters.error("create_room");
            }
        }
        let identity = format!("soak-{client}-{n}");
        if let Err(kind) = session(&soak, room, &identity, n % 2 == 0, &mut rng).await {
            soak.counters.error(kind);
            // Do not spin on a failing server.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The stand-in homeserver: until `deadline`, a transaction every [`TXN_INTERVAL`] with one to
/// four call memberships toggled (join if not in the call, else leave), every
/// [`REPLAY_EVERY`]th a replay of the previous one; then every membership left.
async fn transactions(soak: Arc<Soak>, deadline: Instant) {
    let mut rng = StdRng::from_entropy();
    let rooms = soak.room_ids.len();
    let mut in_call = vec![false; rooms * USERS_PER_ROOM];
    let mut last: Option<(String, Vec<u8>)> = None;
    let mut tick = tokio::time::interval(TXN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    while Instant::now() < deadline {
        tick.tick().await;
        seq += 1;
        if seq % REPLAY_EVERY == 0 {
            if let Some((txn_id, body)) = &last {
                match soak.put_transaction(txn_id, body).await {
                    Ok(()) => {
                        Counters::bump(&soak.counters.transactions);
                        Counters::bump(&soak.counters.transactions_replayed);
                    }
                    Err(kind) => soak.counters.error(kind),
                }
                continue;
            }
        }
        let now = now_ms();
        let mut events = Vec::new();
        let (mut joins, mut leaves) = (0, 0);
        for i in 0..rng.gen_range(1..=4) {
            let slot = rng.gen_range(0..in_call.len());
            let (room, user) = (slot / USERS_PER_ROOM, slot % USERS_PER_ROOM);
            let join = !in_call[slot];
            in_call[slot] = join;
            if join {
                joins += 1;
            } else {
                leaves += 1;
            }
            let event_id = format!("$soak-{seq}-{i}");
            events.push(call_member(
                &soak.room_ids[room],
                user,
                join,
                &event_id,
                now,
            ));
        }
        let txn_id = format!("soak-{seq}");
        let body = json!({ "events": events }).to_string().into_bytes();
        match soak.put_transaction(&txn_id, &body).await {
            Ok(()) => {
                Counters::bump(&soak.counters.transactions);
                soak.counters.call_joins.fetch_add(joins, Ordering::Relaxed);
                soak.counters
                    .call_leaves
                    .fetch_add(leaves, Ordering::Relaxed);
            }
            Err(kind) => soak.counters.error(kind),
        }
        last = Some((txn_id, body));
    }
    // Everyone leaves, whatever the soak believes (a failed transaction leaves it unsure).
    let now = now_ms();
    let leaves: Vec<Value> = (0..in_call.len())
        .map(|slot| {
            let (room, user) = (slot / USERS_PER_ROOM, slot % USERS_PER_ROOM);
            let event_id = format!("$soak-end-{slot}");
            call_member(&soak.room_ids[room], user, false, &event_id, now)
        })
        .collect();
    for (i, chunk) in leaves.chunks(EVENTS_PER_CHUNK).enumerate() {
        let body = json!({ "events": chunk }).to_string().into_bytes();
        match soak.put_transaction(&format!("soak-end-{i}"), &body).await {
            Ok(()) => Counters::bump(&soak.counters.transactions),
            Err(kind) => soak.counters.error(kind),
        }
    }
    let still = in_call.iter().filter(|c| **c).count() as u64;
    soak.counters
        .call_leaves
        .fetch_add(still, Ordering::Relaxed);
}

/// The room memberships the call members need: every soak user joins every soak room.
async fn seed_memberships(soak: &Soak) -> Result<(), BenchError> {
    let now = now_ms();
    let mut events = Vec::new();
    for (r, room_id) in soak.room_ids.iter().enumerate() {
        for user in 0..USERS_PER_ROOM {
            let uid = user_id(user);
            events.push(json!({
                "type": "m.room.member",
                "event_id": format!("$soak-member-{r}-{user}"),
                "room_id": room_id,
                "sender": uid,
                "state_key": uid,
                "origin_server_ts": now,
                "content": {"membership": "join"},
            }));
        }
    }
    for (i, chunk) in events.chunks(EVENTS_PER_CHUNK).enumerate() {
        let body = json!({ "events": chunk }).to_string().into_bytes();
        soak.put_transaction(&format!("soak-seed-{i}"), &body)
            .await
            .map_err(|kind| {
                BenchError::Server(format!(
                    "seeding room memberships: {kind}; log: {}",
                    soak.server.log_tail()
                ))
            })?;
    }
    Ok(())
}

/// Least-squares slope of `(t_s, rss_kb)` points, KiB per hour; `None` under two points or
/// without spread in time.
fn slope_per_hour(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx * 3600.0)
}

/// Runs the soak.
pub async fn run(opts: SoakOptions) -> Result<SoakReport, BenchError> {
    opts.check()?;
    let exe = default_server_exe()?;
    let hs_token = format!("soak-hs-{:032x}", rand::random::<u128>());
    let admin_token = format!("soak-admin-{:032x}", rand::random::<u128>());
    let env: [(&str, OsString); 3] = [
        ("CONCLAVE_APPSERVICE__HS_TOKEN", hs_token.clone().into()),
        ("CONCLAVE_ADMIN__TOKEN", admin_token.clone().into()),
        // No homeserver to post call notices to.
        ("CONCLAVE_CALLS__NOTICES", "false".into()),
    ];
    let server = ConclaveTarget::start_with_env(Some(&exe), None, &env).await?;
    let pid = server
        .pid
        .map(|p| p.to_string())
        .ok_or_else(|| BenchError::Server("the child has no PID".into()))?;
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(opts.concurrency + 4)
        .build()
        .map_err(|e| BenchError::Server(format!("HTTP client: {e}")))?;
    let room_ids: Vec<String> = (0..opts.rooms)
        .map(|i| format!("!soak-{i}:{SERVER_NAME}"))
        .collect();
    let sfu_rooms = room_ids.iter().map(|r| room_name(r, LEGACY_SLOT)).collect();
    let soak = Arc::new(Soak {
        server,
        http,
        pid,
        hs_token,
        admin_token,
        room_ids,
        sfu_rooms,
        counters: Counters::default(),
    });
    seed_memberships(&soak).await?;

    let t0 = Instant::now();
    let deadline = t0 + opts.duration;
    let mut samples = vec![soak.sample(t0).await];
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..opts.concurrency {
        tasks.spawn(churn(soak.clone(), client, deadline));
    }
    tasks.spawn(transactions(soak.clone(), deadline));

    // Samples at the end of the warm-up (the baseline), then every interval, then at the
    // deadline; stops early if the server dies.
    let warm_up = opts.warm_up().min(opts.duration);
    let mut next = t0 + warm_up;
    let mut baseline = None;
    let mut died = false;
    loop {
        tokio::time::sleep_until(next.min(deadline).into()).await;
        if baseline.is_none() {
            baseline = Some(samples.len());
        }
        samples.push(soak.sample(t0).await);
        if !proc_alive(&soak.pid) {
            died = true;
            tracing::error!(log = %soak.server.log_tail(), "the server died during the soak");
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        next += opts.sample_interval;
    }
    let load_end = samples.len();

    // The clients finish their current session (bounded).
    let drained = tokio::time::timeout(DRAIN_MAX, async {
        while let Some(joined) = tasks.join_next().await {
            if joined.is_err() {
                soak.counters.error("task_panicked");
            }
        }
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
        soak.counters.error("drain_timeout");
    }

    // Settle: wait (bounded) until the server has dropped every room and call.
    let settle_start = Instant::now();
    if !died {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s = soak.sample(t0).await;
            let empty = s.rooms == Some(0) && s.participants == Some(0) && s.calls == Some(0);
            samples.push(s);
            if empty || settle_start.elapsed() >= SETTLE_MAX || !proc_alive(&soak.pid) {
                break;
            }
        }
    }
    let settle_s = settle_start.elapsed().as_secs_f64();
    let server_alive = soak.healthy().await;
    let (leaked_room_names, leaked_participants, leaked_calls) = if server_alive {
        soak.leftovers().await?
    } else {
        (Vec::new(), 0, 0)
    };
    let start = baseline.and_then(|i| samples.get(i));
    let end = samples.last();
    let rss_start_kb = start.and_then(|s| s.rss_kb);
    let rss_end_kb = end.and_then(|s| s.rss_kb);
    let peak = |f: fn(&Sample) -> Option<u64>| samples.iter().filter_map(f).max();
    let half = opts.duration.as_secs_f64() / 2.0;
    let second_half: Vec<(f64, f64)> = samples[..load_end]
        .iter()
        .filter(|s| s.t_s >= half)
        .filter_map(|s| s.rss_kb.map(|r| (s.t_s, r as f64)))
        .collect();
    let c = &soak.counters;
    let errors_by_kind = c.errors();
    Ok(SoakReport {
        scenario: "soak",
        duration_s: opts.duration.as_secs_f64(),
        concurrency: opts.concurrency,
        rooms: opts.rooms,
        warm_up_s: warm_up.as_secs_f64(),
        joins: Counters::get(&c.joins),
        leaves_clean: Counters::get(&c.leaves_clean),
        leaves_abrupt: Counters::get(&c.leaves_abrupt),
        metadata_updates: Counters::get(&c.metadata_updates),
        rooms_created: Counters::get(&c.rooms_created),
        transactions: Counters::get(&c.transactions),
        transactions_replayed: Counters::get(&c.transactions_replayed),
        server_transactions_replayed: soak
            .metric("conclave_appservice_transactions_replayed_total")
            .await,
        call_joins: Counters::get(&c.call_joins),
        call_leaves: Counters::get(&c.call_leaves),
        errors: errors_by_kind.values().sum(),
        errors_by_kind,
        rss_start_kb,
        rss_end_kb,
        rss_peak_kb: peak(|s| s.rss_kb),
        rss_drift_kb: rss_start_kb
            .zip(rss_end_kb)
            .map(|(a, b)| b as i64 - a as i64),
        rss_slope_kb_per_h: slope_per_hour(&second_half),
        store_bytes_start: start.and_then(|s| s.store_bytes),
        store_bytes_end: end.and_then(|s| s.store_bytes),
        fds_start: start.and_then(|s| s.fds),
        fds_end: end.and_then(|s| s.fds),
        fds_peak: peak(|s| s.fds),
        rooms_peak: peak(|s| s.rooms),
        participants_peak: peak(|s| s.participants),
        calls_peak: peak(|s| s.calls),
        settle_s,
        leaked_rooms: leaked_room_names.len() as u64,
        leaked_participants,
        leaked_calls,
        leaked_room_names,
        server_alive,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_per_hour() {
        let points: Vec<(f64, f64)> = (0..10)
            .map(|t| (t as f64, 100.0 + 2.0 * t as f64))
            .collect();
        let s = slope_per_hour(&points).unwrap_or_default();
        assert!((s - 7200.0).abs() < 1e-6, "{s}");
        assert_eq!(slope_per_hour(&points[..1]), None);
        assert_eq!(slope_per_hour(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn call_member_join_and_leave() {
        let join = call_member("!r:localhost", 3, true, "$e", 1);
        assert_eq!(join["state_key"], "_@soak-3:localhost_SOAK3_m.call");
        assert_eq!(join["content"]["device_id"], "SOAK3");
        let leave = call_member("!r:localhost", 3, false, "$f", 1);
        assert_eq!(leave["content"], json!({}));
    }

    #[test]
    fn warm_up_is_a_tenth_within_bounds() {
        let o = |secs| SoakOptions {
            duration: Duration::from_secs(secs),
            concurrency: 1,
            rooms: 1,
            sample_interval: Duration::from_secs(1),
        };
        assert_eq!(o(5).warm_up(), Duration::from_secs(1));
        assert_eq!(o(300).warm_up(), Duration::from_secs(30));
        assert_eq!(o(3600).warm_up(), Duration::from_secs(60));
    }
}
