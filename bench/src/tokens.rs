//! `conclave bench tokens`: `/get_token` requests per second and latency with a cached OpenID
//! verification, against an in-process Conclave on a loopback port.
//!
//! The membership gate reads the real SQLite store; JWT signing is real. The client runs in the
//! same process, so requests per CPU-second is conservative (it includes the client's cost).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ruma::events::room::member::MembershipState;
use ruma::{MilliSecondsSinceUnixEpoch, UInt};
use serde::Serialize;

use super::{process_cpu_time, quantile};
use conclave::auth::lk_jwt::prime_openid_cache;
use conclave::config::Config;
use conclave::serve::{build_state, RunError};
use conclave::store::sqlite::Fault;
use conclave::store::{Effect, MembershipRecord};

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
    /// Process CPU seconds used (server and client together).
    pub cpu_s: f64,
    /// Requests per CPU-second: the per-core rate.
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

fn bench_err(e: impl std::fmt::Display) -> RunError {
    RunError::HttpClient(format!("bench: {e}"))
}

/// Runs the benchmark.
pub async fn run(opts: TokenBenchOptions) -> Result<TokenBenchReport, RunError> {
    let dir = tempfile::tempdir().map_err(|source| RunError::Io {
        context: "creating a temporary data dir".into(),
        source,
    })?;
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.http.bind = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.appservice.ping_on_start = false;
    let listener = conclave::serve::bind(&config).await?;
    let addr = listener.local_addr().map_err(bench_err)?;
    let rooms = std::sync::Arc::new(conclave::sfu::registry::RoomRegistry::default());
    let state = build_state(config, Fault::None, rooms, None)?;

    let server_name = state.config.matrix.server_name.clone();
    let room_id = ruma::RoomId::parse("!bench:localhost").map_err(bench_err)?;
    let user_id = ruma::UserId::parse(format!("@bench:{server_name}")).map_err(bench_err)?;
    let store = state.store.clone();
    let record = MembershipRecord {
        room_id: room_id.clone(),
        user_id: user_id.clone(),
        membership: MembershipState::Join,
        event_id: ruma::EventId::parse("$bench").map_err(bench_err)?,
        origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::MIN),
    };
    store
        .apply_transaction("bench-seed", &[Effect::Membership(record)])
        .map_err(bench_err)?;
    prime_openid_cache(&state, &server_name, "bench-openid-token", user_id.clone());

    let app = conclave::http::router(state);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let body = serde_json::to_vec(&serde_json::json!({
        "room_id": room_id,
        "slot_id": "m.call#ROOM",
        "openid_token": {"access_token": "bench-openid-token", "token_type": "Bearer",
                         "matrix_server_name": server_name, "expires_in": 3600},
        "member": {"id": "member", "claimed_user_id": user_id, "claimed_device_id": "BENCH"},
    }))
    .map_err(bench_err)?;
    let url = format!("http://{addr}/get_token");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.concurrency)
        .build()
        .map_err(bench_err)?;

    // Warm up connections and caches.
    for _ in 0..opts.concurrency.min(opts.requests) {
        let _ = client.post(&url).body(body.clone()).send().await;
    }

    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + opts.max_duration;
    let cpu0 = process_cpu_time().unwrap_or_default();
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
        let (lat, e) = w.await.map_err(bench_err)?;
        latencies.extend(lat);
        errors += e;
    }
    let wall = t0.elapsed();
    let cpu = process_cpu_time().unwrap_or_default().saturating_sub(cpu0);
    server.abort();
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
