//! `conclave-bench tokens`: `/get_token` requests per second and latency with a cached OpenID
//! verification, against a `conclave serve` child process on a loopback port.
//!
//! The bench drives the server only from outside, as a deployment does: the membership the
//! gate reads (SQLite) arrives in a real appservice transaction (an `m.room.member` join, sent
//! with the `hs_token` the bench gives the child), and the OpenID token is verified once over
//! federation against a stand-in homeserver in the bench ([`super::homeserver`]). The server
//! caches the verified token, so the measured requests take the cached path Element Call hits
//! when it refreshes tokens; JWT signing is real. Requests per CPU-second counts the server's
//! and the bench's (client) CPU together, so it is conservative for the server.

use std::ffi::OsString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::homeserver::OpenIdHomeserver;
use super::server::{default_server_exe, ConclaveTarget};
use super::{proc_cpu_time, process_cpu_time, quantile, BenchError};

/// The OpenID access token the clients present (the stand-in homeserver vouches for it).
const OPENID_TOKEN: &str = "bench-openid-token";
/// The Matrix room the bench user is joined to.
const ROOM_ID: &str = "!bench:localhost";

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct TokenBenchOptions {
    /// Total requests.
    pub requests: usize,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Hard time limit.
    pub max_duration: Duration,
}

/// Results.
#[derive(Debug, Clone, Serialize)]
pub struct TokenBenchReport {
    /// Always `tokens`.
    pub scenario: &'static str,
    /// Requests answered 200.
    pub ok: usize,
    /// Requests that failed.
    pub errors: usize,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// Requests per second (wall).
    pub requests_per_s: f64,
    /// CPU seconds used by the server process and the bench's clients together.
    pub cpu_s: f64,
    /// Requests per CPU-second of server and clients together: the per-core rate
    /// (conservative for the server).
    pub requests_per_cpu_s: f64,
    /// Median latency, ms.
    pub latency_p50_ms: f64,
    /// 99th percentile latency, ms.
    pub latency_p99_ms: f64,
    /// Target from the issue: ≥ 5 000 req/s per core.
    pub target_requests_per_cpu_s: f64,
    /// Target from the issue: p99 ≤ 5 ms.
    pub target_p99_ms: f64,
}

/// Tells the server, as the homeserver would, that `user_id` joined [`ROOM_ID`]: one
/// appservice transaction with an `m.room.member` event.
async fn seed_membership(
    client: &reqwest::Client,
    server: &ConclaveTarget,
    hs_token: &str,
    user_id: &str,
) -> Result<(), BenchError> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let transaction = serde_json::json!({"events": [{
        "type": "m.room.member",
        "state_key": user_id,
        "sender": user_id,
        "room_id": ROOM_ID,
        "event_id": "$bench-join",
        "origin_server_ts": now_ms,
        "content": {"membership": "join"},
    }]});
    let response = client
        .put(format!(
            "{}/_matrix/app/v1/transactions/bench-seed",
            server.http_url
        ))
        .bearer_auth(hs_token)
        .json(&transaction)
        .send()
        .await
        .map_err(|e| BenchError::Server(format!("appservice transaction: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(BenchError::Server(format!(
            "appservice transaction answered {status}: {body}; log: {}",
            server.log_tail()
        )));
    }
    Ok(())
}

/// CPU time of the server child and of this process (the clients) together.
fn cpu_time(server_pid: &str) -> Duration {
    process_cpu_time().unwrap_or_default() + proc_cpu_time(server_pid).unwrap_or_default()
}

/// Runs the benchmark.
pub async fn run(opts: TokenBenchOptions) -> Result<TokenBenchReport, BenchError> {
    let exe = default_server_exe()?;
    let homeserver = OpenIdHomeserver::start(OPENID_TOKEN, "bench").await?;
    let dir = tempfile::tempdir().map_err(|e| BenchError::io("creating a temporary dir", e))?;
    let ca_file = dir.path().join("bench-ca.pem");
    std::fs::write(&ca_file, &homeserver.ca_pem)
        .map_err(|e| BenchError::io("writing the stand-in homeserver's CA", e))?;
    let hs_token = format!("bench-hs-{:032x}", rand::random::<u128>());
    // The stand-in is the server's own homeserver, so the bench user is local with full
    // access (rooms created on demand), and the server logs at its default level.
    let env: [(&str, OsString); 7] = [
        (
            "CONCLAVE_MATRIX__SERVER_NAME",
            homeserver.server_name.clone().into(),
        ),
        ("CONCLAVE_MATRIX__EXTRA_CA_FILE", ca_file.into_os_string()),
        ("CONCLAVE_APPSERVICE__HS_TOKEN", hs_token.clone().into()),
        // The stand-in homeserver listens on loopback.
        ("CONCLAVE_AUTH__ALLOW_PRIVATE_FEDERATION", "true".into()),
        // One user asking as fast as it can is what the bench measures: no rate limits.
        ("CONCLAVE_AUTH__HOMESERVER_RATE_PER_SEC", "0".into()),
        ("CONCLAVE_AUTH__USER_RATE_PER_SEC", "0".into()),
        ("RUST_LOG", "info".into()),
    ];
    let server = ConclaveTarget::start_with_env(Some(&exe), None, &env).await?;
    let server_pid = server.pid.map(|p| p.to_string()).unwrap_or_default();

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.concurrency)
        .build()
        .map_err(|e| BenchError::Server(format!("HTTP client: {e}")))?;
    let user_id = homeserver.user_id().to_owned();
    seed_membership(&client, &server, &hs_token, &user_id).await?;

    let body = serde_json::to_vec(&serde_json::json!({
        "room_id": ROOM_ID,
        "slot_id": "m.call#ROOM",
        "openid_token": {"access_token": OPENID_TOKEN, "token_type": "Bearer",
                         "matrix_server_name": homeserver.server_name, "expires_in": 3600},
        "member": {"id": "member", "claimed_user_id": user_id, "claimed_device_id": "BENCH"},
    }))
    .map_err(|e| BenchError::Options(format!("request body: {e}")))?;
    let url = format!("{}/get_token", server.http_url);

    // The first request verifies the OpenID token over federation; it must succeed, or every
    // measured request would fail for the same reason.
    let first = client
        .post(&url)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .map_err(|e| BenchError::Server(format!("POST /get_token: {e}")))?;
    let status = first.status();
    if !status.is_success() {
        let answer = first.text().await.unwrap_or_default();
        return Err(BenchError::Server(format!(
            "the first /get_token answered {status}: {answer}; log: {}",
            server.log_tail()
        )));
    }
    // Warm up the other connections.
    for _ in 1..opts.concurrency.min(opts.requests) {
        let _ = client.post(&url).body(body.clone()).send().await;
    }

    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + opts.max_duration;
    let cpu0 = cpu_time(&server_pid);
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.max(1) {
        let (client, url, body, next) = (client.clone(), url.clone(), body.clone(), next.clone());
        let total = opts.requests;
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            while next.fetch_add(1, Ordering::Relaxed) < total && Instant::now() < deadline {
                let start = Instant::now();
                match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(start.elapsed());
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(opts.requests);
    let mut errors = 0;
    for w in workers {
        let (lat, e) = w
            .await
            .map_err(|e| BenchError::Options(format!("a client task failed: {e}")))?;
        latencies.extend(lat);
        errors += e;
    }
    let wall = t0.elapsed();
    let cpu = cpu_time(&server_pid).saturating_sub(cpu0);
    drop(server);
    let lookups = homeserver.lookups();
    if lookups != 1 {
        return Err(BenchError::Server(format!(
            "the server asked the homeserver {lookups} times instead of once: the measured \
             requests did not take the cached OpenID path"
        )));
    }
    latencies.sort();
    let ok = latencies.len();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(TokenBenchReport {
        scenario: "tokens",
        ok,
        errors,
        wall_s: wall.as_secs_f64(),
        requests_per_s: ok as f64 / wall.as_secs_f64().max(1e-9),
        cpu_s: cpu.as_secs_f64(),
        requests_per_cpu_s: ok as f64 / cpu.as_secs_f64().max(1e-3),
        latency_p50_ms: ms(quantile(&latencies, 0.50)),
        latency_p99_ms: ms(quantile(&latencies, 0.99)),
        target_requests_per_cpu_s: 5000.0,
        target_p99_ms: 5.0,
    })
}

impl TokenBenchReport {
    /// A Markdown table.
    pub fn markdown(&self) -> String {
        format!(
            "| scenario | ok | errors | req/s | req/CPU-s | p50 ms | p99 ms |\n\
             |---|---|---|---|---|---|---|\n\
             | {} | {} | {} | {:.0} | {:.0} (target ≥ {:.0}) | {:.2} | {:.2} (target ≤ {:.0}) |\n",
            self.scenario,
            self.ok,
            self.errors,
            self.requests_per_s,
            self.requests_per_cpu_s,
            self.target_requests_per_cpu_s,
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.target_p99_ms
        )
    }
}
