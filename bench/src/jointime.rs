//! `conclave-bench join-time`: how long a real LiveKit client (the official Python SDK driven by
//! `tests/clients/lk_client.py`) takes from the start of its connect (token already minted) to
//! the first decoded remote audio and video frame, with LiveKit signalling v1 (`/rtc/v1`, one
//! peer connection), v0 (`/rtc`, two peer connections) and v0 reached through the SDK's
//! fallback after `/rtc/v1` answered 404 — side by side, in one run, against one server build.
//!
//! Two `conclave serve` children run the same binary: one with `rtc.single_pc = true` (serving
//! `/rtc/v1` and `/rtc`) for the `v1` and `v0` modes, one with `rtc.single_pc = false` for
//! `v0-fallback`. Each mode has its own room with one long-lived publisher (audio and video).
//! Probes are fresh client processes that publish nothing, join, wait for the first remote
//! audio and video frames and leave; modes take turns, round-robin, so noise hits all of them.
//! The interval is measured inside the client from just before `room.connect`
//! (`connect_started_ms`), so the interpreter's start-up is not part of it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::server::{default_server_exe, ConclaveTarget};
use super::{quantile, BenchError};

/// How `scripts/install-test-deps` provides the LiveKit SDK venv.
const INSTALL_HINT: &str = "install the LiveKit Python SDK venv with \
     `eval \"$(scripts/install-test-deps)\"` (it exports CONCLAVE_LK_VENV), or pass --lk-venv";
/// `tests/clients/lk_client.py` of the checkout this bench was built from.
const DEFAULT_CLIENT_SCRIPT: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/clients/lk_client.py");
/// Bound on a publisher's connect and its two publications.
const PUBLISHER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Grace beyond a client's own deadline before it is killed.
const CLIENT_EXIT_GRACE: Duration = Duration::from_secs(15);
/// Bound on a publisher's graceful leave after SIGTERM.
const PUBLISHER_LEAVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Probe errors kept per mode.
const MAX_ERRORS: usize = 5;

/// One way of joining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/rtc/v1`, one peer connection (`--single-pc`) on a server with `single_pc = true`.
    V1,
    /// `/rtc`, two peer connections (`--dual-pc`) on the same server.
    V0,
    /// The SDK default (tries `/rtc/v1`) on a server with `single_pc = false`: a 404, then v0.
    V0Fallback,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 3] = [Mode::V1, Mode::V0, Mode::V0Fallback];

    /// The mode's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::V1 => "v1",
            Mode::V0 => "v0",
            Mode::V0Fallback => "v0-fallback",
        }
    }

    /// The client's signalling flag (`None`: the SDK default).
    fn client_flag(self) -> Option<&'static str> {
        match self {
            Mode::V1 => Some("--single-pc"),
            Mode::V0 => Some("--dual-pc"),
            Mode::V0Fallback => None,
        }
    }

    /// `rtc.single_pc` of the server this mode joins.
    fn server_single_pc(self) -> bool {
        self != Mode::V0Fallback
    }
}

/// Settings.
#[derive(Debug, Clone)]
pub struct JoinTimeOptions {
    /// Measured probes per mode.
    pub probes: usize,
    /// Unmeasured probes per mode first (first-run effects: page cache, the server's lazies).
    pub warmup: usize,
    /// A probe's deadline (the client's `--timeout`).
    pub probe_timeout: Duration,
    /// The whole run's bound: no probe starts after it.
    pub max_duration: Duration,
    /// The LiveKit SDK venv (`CONCLAVE_LK_VENV`).
    pub lk_venv: Option<PathBuf>,
    /// `lk_client.py` (default: the checkout's).
    pub client_script: Option<PathBuf>,
    /// The server binary (default: [`default_server_exe`]).
    pub server_exe: Option<PathBuf>,
    /// Publisher video width, height and frame rate.
    pub video: (u32, u32, u32),
}

/// Quantiles of one measure over a mode's successful probes, milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stats {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Fastest.
    pub min: f64,
    /// Slowest.
    pub max: f64,
}

impl Stats {
    fn of(samples: &[Duration]) -> Option<Self> {
        let mut v = samples.to_vec();
        v.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Some(Self {
            p50: ms(quantile(&v, 0.5)),
            p90: ms(quantile(&v, 0.9)),
            min: ms(*v.first()?),
            max: ms(*v.last()?),
        })
    }
}

/// One successful probe, milliseconds from just before `room.connect`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Probe {
    /// `room.connect` returned.
    pub connect_ms: u64,
    /// Both of the publisher's tracks were subscribed (`track_subscribed`).
    pub subscribed_ms: u64,
    /// First decoded remote audio frame.
    pub first_audio_ms: u64,
    /// First decoded remote video frame.
    pub first_video_ms: u64,
    /// What the measures above exclude, estimated: the probe process's wall time minus the
    /// client's own clock from `connect_started_ms` to its summary (interpreter start-up,
    /// imports and the exit).
    pub outside_ms: u64,
}

/// One mode's results.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// `v1`, `v0` or `v0-fallback`.
    pub mode: &'static str,
    /// `rtc.single_pc` of its server.
    pub server_single_pc: bool,
    /// The client's signalling flag, `default` for the SDK default.
    pub client: &'static str,
    /// Measured probes that succeeded.
    pub ok: usize,
    /// Measured probes that failed.
    pub failed: usize,
    /// The first few failures.
    pub errors: Vec<String>,
    /// Connect returned.
    pub connect_ms: Option<Stats>,
    /// Both remote tracks subscribed.
    pub subscribed_ms: Option<Stats>,
    /// First remote audio frame.
    pub first_audio_ms: Option<Stats>,
    /// First remote video frame.
    pub first_video_ms: Option<Stats>,
    /// Every successful probe in order.
    pub probes: Vec<Probe>,
}

/// p50 ratios of two modes (`None` where a side has no sample).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratios {
    /// Connect returned.
    pub connect: Option<f64>,
    /// First remote audio frame.
    pub first_audio: Option<f64>,
    /// First remote video frame.
    pub first_video: Option<f64>,
}

/// Results.
#[derive(Debug, Clone, Serialize)]
pub struct JoinTimeReport {
    /// Always `join-time`.
    pub scenario: &'static str,
    /// The LiveKit Python SDK version the clients ran.
    pub sdk_version: Option<String>,
    /// Measured probes per mode.
    pub probes_per_mode: usize,
    /// Unmeasured warm-up probes per mode.
    pub warmup_per_mode: usize,
    /// Publisher video `[width, height, fps]`.
    pub publisher_video: [u32; 3],
    /// Whether the run stopped at its time bound before every probe ran.
    pub truncated: bool,
    /// Wall time of the whole run, seconds.
    pub elapsed_s: f64,
    /// Per mode, in the order v1, v0, v0-fallback.
    pub modes: Vec<ModeReport>,
    /// v1 p50 / v0 p50.
    pub v1_over_v0: Ratios,
    /// v1 p50 / v0-fallback p50.
    pub v1_over_v0_fallback: Ratios,
}

impl JoinTimeReport {
    /// Why the run counts as failed (exit code 2), if it does.
    pub fn failure(&self) -> Option<String> {
        let failed: usize = self.modes.iter().map(|m| m.failed).sum();
        if failed > 0 {
            Some(format!("{failed} probe(s) failed"))
        } else if self.truncated {
            Some("stopped at --max-seconds before every probe ran".into())
        } else {
            None
        }
    }

    /// Markdown tables: per mode and measure, then the ratios.
    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let stats = |s: Option<Stats>| {
            s.map_or_else(
                || "–".to_owned(),
                |s| format!("{:.0} / {:.0} / {:.0} / {:.0}", s.p50, s.p90, s.min, s.max),
            )
        };
        let ratio = |r: Option<f64>| r.map_or_else(|| "–".to_owned(), |r| format!("{r:.2}"));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "join time, ms from `room.connect` (p50 / p90 / min / max); LiveKit Python SDK {}, \
             {} probes per mode (+{} warm-up), publisher video {}×{} @ {} fps\n",
            self.sdk_version.as_deref().unwrap_or("?"),
            self.probes_per_mode,
            self.warmup_per_mode,
            self.publisher_video[0],
            self.publisher_video[1],
            self.publisher_video[2],
        );
        let _ = writeln!(
            out,
            "| mode | server `single_pc` | client | ok / failed | connect returned | \
             tracks subscribed | first audio frame | first video frame |\n\
             |---|---|---|---|---|---|---|---|"
        );
        for m in &self.modes {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} / {} | {} | {} | {} | {} |",
                m.mode,
                m.server_single_pc,
                m.client,
                m.ok,
                m.failed,
                stats(m.connect_ms),
                stats(m.subscribed_ms),
                stats(m.first_audio_ms),
                stats(m.first_video_ms),
            );
        }
        let _ = writeln!(
            out,
            "\n| p50 ratio | connect | first audio | first video |\n|---|---|---|---|"
        );
        for (name, r) in [
            ("v1 / v0", self.v1_over_v0),
            ("v1 / v0-fallback", self.v1_over_v0_fallback),
        ] {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} |",
                ratio(r.connect),
                ratio(r.first_audio),
                ratio(r.first_video)
            );
        }
        for m in self.modes.iter().filter(|m| !m.errors.is_empty()) {
            let _ = writeln!(out, "\n{} failures: {}", m.mode, m.errors.join("; "));
        }
        if self.truncated {
            let _ = writeln!(out, "\nstopped at --max-seconds before every probe ran");
        }
        let _ = writeln!(out, "\n(run took {:.0} s)", self.elapsed_s);
        out
    }
}

/// The client programs: the venv's interpreter and `lk_client.py`.
struct ClientEnv {
    python: PathBuf,
    script: PathBuf,
}

impl ClientEnv {
    fn find(opts: &JoinTimeOptions) -> Result<Self, BenchError> {
        let Some(venv) = opts.lk_venv.clone().filter(|v| !v.as_os_str().is_empty()) else {
            return Err(BenchError::Client(format!(
                "CONCLAVE_LK_VENV is not set: {INSTALL_HINT}"
            )));
        };
        let python = venv.join("bin/python");
        if !python.exists() {
            return Err(BenchError::Client(format!(
                "{} has no bin/python: {INSTALL_HINT}",
                venv.display()
            )));
        }
        let script = opts
            .client_script
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CLIENT_SCRIPT));
        if !script.is_file() {
            return Err(BenchError::Client(format!(
                "the client script {} does not exist (pass --client-script)",
                script.display()
            )));
        }
        Ok(Self { python, script })
    }

    /// `python lk_client.py --url … --token … <args>` with stdout and stderr piped.
    fn command(&self, url: &str, token: &str, label: &str, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script)
            .args(["--url", url, "--token", token, "--identity-label", label])
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }
}

/// A long-lived publishing client, SIGTERMed (a graceful leave) at the end.
struct Publisher {
    child: Child,
    label: String,
}

impl Publisher {
    /// Starts a publisher in `room` and waits until both of its tracks are published.
    async fn start(
        env: &ClientEnv,
        target: &ConclaveTarget,
        room: &str,
        identity: &str,
        stay: Duration,
        video: (u32, u32, u32),
    ) -> Result<Self, BenchError> {
        let token = target.token(room, identity, true)?;
        let stay_s = stay.as_secs_f64();
        let args: Vec<String> = vec![
            "--publish-audio".into(),
            "--publish-video".into(),
            "--width".into(),
            video.0.to_string(),
            "--height".into(),
            video.1.to_string(),
            "--fps".into(),
            video.2.to_string(),
            "--leave-after".into(),
            format!("{stay_s:.0}"),
            "--timeout".into(),
            format!("{:.0}", stay_s + 60.0),
            "--events-stdout".into(),
        ];
        let mut child = env
            .command(&target.ws_url(), &token, identity, &args)
            .spawn()
            .map_err(|e| BenchError::io(format!("starting {}", env.python.display()), e))?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(BenchError::Client("publisher without pipes".into()));
        };
        let events: Arc<Mutex<Vec<String>>> = Arc::default();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        tokio::spawn(keep_lines(stdout, events.clone()));
        tokio::spawn(keep_lines(stderr, log.clone()));
        let deadline = Instant::now() + PUBLISHER_READY_TIMEOUT;
        loop {
            let published = lock(&events)
                .iter()
                .filter(|l| l.contains("\"event\":\"published\""))
                .count();
            if published >= 2 {
                break;
            }
            let failed = lock(&events)
                .iter()
                .any(|l| l.contains("\"type\":\"summary\"") || l.contains("publish_failed"));
            if failed || Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(BenchError::Client(format!(
                    "publisher {identity} did not publish audio and video within \
                     {PUBLISHER_READY_TIMEOUT:?}: {} | stderr: {}",
                    last_lines(&lock(&events), 3),
                    last_lines(&lock(&log), 5)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(publisher = identity, room, "publishing");
        Ok(Self {
            child,
            label: identity.to_owned(),
        })
    }

    /// SIGTERM, then kill if it does not leave in time.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on our own child's PID, which has not been reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(PUBLISHER_LEAVE_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(publisher = %self.label, "did not leave after SIGTERM; killed");
            let _ = self.child.kill().await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends the lines of `r` to `into` (at most 10 000) until EOF.
async fn keep_lines(r: impl tokio::io::AsyncRead + Unpin, into: Arc<Mutex<Vec<String>>>) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut v = lock(&into);
        if v.len() < 10_000 {
            v.push(line);
        }
    }
}

fn last_lines(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Runs one probe: a fresh client joins `room`, waits for the first audio and video frames of
/// `publisher` and leaves.
async fn probe(
    env: &ClientEnv,
    target: &ConclaveTarget,
    mode: Mode,
    room: &str,
    publisher: &str,
    identity: &str,
    timeout: Duration,
) -> Result<(Probe, Option<String>), String> {
    let token = target
        .token(room, identity, false)
        .map_err(|e| e.to_string())?;
    let mut args: Vec<String> = vec![
        "--no-publish-audio".into(),
        "--no-publish-video".into(),
        "--expect-participants".into(),
        "1".into(),
        "--expect-audio-frames".into(),
        "1".into(),
        "--expect-video-frames".into(),
        "1".into(),
        "--timeout".into(),
        format!("{:.1}", timeout.as_secs_f64()),
    ];
    if let Some(flag) = mode.client_flag() {
        args.push(flag.into());
    }
    let spawned = Instant::now();
    let child = env
        .command(&target.ws_url(), &token, identity, &args)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", env.python.display()))?;
    let out = tokio::time::timeout(timeout + CLIENT_EXIT_GRACE, child.wait_with_output())
        .await
        .map_err(|_| format!("{identity}: still running after {timeout:?}; killed"))?
        .map_err(|e| format!("{identity}: waiting: {e}"))?;
    let wall = spawned.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|v| v["type"] == "summary");
    let stderr_tail = || {
        let s = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    };
    let Some(summary) = summary else {
        return Err(format!(
            "{identity}: exit {:?}, no summary; stderr: {}",
            out.status.code(),
            stderr_tail()
        ));
    };
    if !out.status.success() {
        return Err(format!(
            "{identity}: exit {:?} ({}), error {}",
            out.status.code(),
            summary["result"],
            summary["error"]
        ));
    }
    let field = |v: &Value, key: &str| {
        v[key]
            .as_u64()
            .ok_or_else(|| format!("{identity}: no {key} in the summary"))
    };
    let started = field(&summary, "connect_started_ms")?;
    let returned = field(&summary, "connect_returned_ms")?;
    let remote = &summary["remote"][publisher];
    let audio = field(remote, "first_audio_ms")?;
    let video = field(remote, "first_video_ms")?;
    let subscribed = summary["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["event"] == "track_subscribed" && e["identity"] == publisher)
        .filter_map(|e| e["t_ms"].as_u64())
        .max()
        .ok_or_else(|| format!("{identity}: no track_subscribed event"))?;
    let elapsed = summary["elapsed_ms"].as_u64().unwrap_or(0);
    let outside = (wall.as_millis() as u64).saturating_sub(elapsed.saturating_sub(started));
    let since = |t: u64| t.saturating_sub(started);
    Ok((
        Probe {
            connect_ms: since(returned),
            subscribed_ms: since(subscribed),
            first_audio_ms: since(audio),
            first_video_ms: since(video),
            outside_ms: outside,
        },
        summary["sdk_version"].as_str().map(str::to_owned),
    ))
}

/// Measured probes and failures of one mode.
#[derive(Default)]
struct Tally {
    probes: Vec<Probe>,
    failed: usize,
    errors: Vec<String>,
}

impl Tally {
    fn report(&self, mode: Mode) -> ModeReport {
        let col = |f: fn(&Probe) -> u64| -> Option<Stats> {
            let v: Vec<Duration> = self
                .probes
                .iter()
                .map(|p| Duration::from_millis(f(p)))
                .collect();
            Stats::of(&v)
        };
        ModeReport {
            mode: mode.name(),
            server_single_pc: mode.server_single_pc(),
            client: mode.client_flag().unwrap_or("default"),
            ok: self.probes.len(),
            failed: self.failed,
            errors: self.errors.clone(),
            connect_ms: col(|p| p.connect_ms),
            subscribed_ms: col(|p| p.subscribed_ms),
            first_audio_ms: col(|p| p.first_audio_ms),
            first_video_ms: col(|p| p.first_video_ms),
            probes: self.probes.clone(),
        }
    }
}

fn ratios(a: &ModeReport, b: &ModeReport) -> Ratios {
    let r = |x: Option<Stats>, y: Option<Stats>| match (x, y) {
        (Some(x), Some(y)) if y.p50 > 0.0 => Some(x.p50 / y.p50),
        _ => None,
    };
    Ratios {
        connect: r(a.connect_ms, b.connect_ms),
        first_audio: r(a.first_audio_ms, b.first_audio_ms),
        first_video: r(a.first_video_ms, b.first_video_ms),
    }
}

/// Runs the benchmark.
pub async fn run(opts: JoinTimeOptions) -> Result<JoinTimeReport, BenchError> {
    if opts.probes == 0 {
        return Err(BenchError::Options("--probes must be positive".into()));
    }
    let env = ClientEnv::find(&opts)?;
    let exe = match opts.server_exe.clone() {
        Some(p) => p,
        None => default_server_exe()?,
    };
    let started = Instant::now();
    let deadline = started + opts.max_duration;
    let single = start_server(&exe, true).await?;
    let dual = start_server(&exe, false).await?;
    let target = |m: Mode| if m.server_single_pc() { &single } else { &dual };
    let room = |m: Mode| format!("join-{}", m.name());
    let publisher_id = |m: Mode| format!("publisher-{}", m.name());

    // Publishers stay until SIGTERM at the end, at most the run's bound plus a margin.
    let stay = opts.max_duration + Duration::from_secs(60);
    let mut publishers = Vec::new();
    for m in Mode::ALL {
        match Publisher::start(
            &env,
            target(m),
            &room(m),
            &publisher_id(m),
            stay,
            opts.video,
        )
        .await
        {
            Ok(p) => publishers.push(p),
            Err(e) => {
                for p in publishers {
                    p.stop().await;
                }
                return Err(e);
            }
        }
    }

    let mut tallies: Vec<Tally> = Mode::ALL.iter().map(|_| Tally::default()).collect();
    let mut sdk_version = None;
    let mut truncated = false;
    'rounds: for round in 0..opts.warmup + opts.probes {
        let measured = round >= opts.warmup;
        // Rotate the order every round so no mode always follows the same one.
        for k in 0..Mode::ALL.len() {
            let i = (round + k) % Mode::ALL.len();
            let m = Mode::ALL[i];
            if Instant::now() > deadline {
                truncated = true;
                break 'rounds;
            }
            let identity = format!("probe-{}-{round}", m.name());
            let result = probe(
                &env,
                target(m),
                m,
                &room(m),
                &publisher_id(m),
                &identity,
                opts.probe_timeout,
            )
            .await;
            match result {
                Ok((p, version)) => {
                    tracing::info!(
                        mode = m.name(),
                        round,
                        measured,
                        connect_ms = p.connect_ms,
                        audio_ms = p.first_audio_ms,
                        video_ms = p.first_video_ms,
                        outside_ms = p.outside_ms,
                        "probe"
                    );
                    sdk_version = sdk_version.or(version);
                    if measured {
                        tallies[i].probes.push(p);
                    }
                }
                Err(e) => {
                    tracing::warn!(mode = m.name(), round, measured, error = %e, "probe failed");
                    if measured {
                        tallies[i].failed += 1;
                        if tallies[i].errors.len() < MAX_ERRORS {
                            tallies[i].errors.push(e);
                        }
                    }
                }
            }
        }
    }
    for p in publishers {
        p.stop().await;
    }
    drop((single, dual));

    let modes: Vec<ModeReport> = Mode::ALL
        .iter()
        .zip(&tallies)
        .map(|(m, t)| t.report(*m))
        .collect();
    let (v1, v0, fallback) = (&modes[0], &modes[1], &modes[2]);
    Ok(JoinTimeReport {
        scenario: "join-time",
        sdk_version,
        probes_per_mode: opts.probes,
        warmup_per_mode: opts.warmup,
        publisher_video: [opts.video.0, opts.video.1, opts.video.2],
        truncated,
        elapsed_s: started.elapsed().as_secs_f64(),
        v1_over_v0: ratios(v1, v0),
        v1_over_v0_fallback: ratios(v1, fallback),
        modes,
    })
}

/// A `conclave serve` child with `rtc.single_pc` set.
async fn start_server(exe: &Path, single_pc: bool) -> Result<ConclaveTarget, BenchError> {
    ConclaveTarget::start_with_env(
        Some(exe),
        None,
        &[("CONCLAVE_RTC__SINGLE_PC", single_pc.to_string().into())],
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_ratios() {
        let v: Vec<Duration> = [30, 10, 20].map(Duration::from_millis).to_vec();
        let s = Stats::of(&v).expect("samples");
        assert_eq!((s.p50, s.min, s.max), (20.0, 10.0, 30.0));
        assert!(Stats::of(&[]).is_none());
        let mode = |p50| ModeReport {
            mode: "x",
            server_single_pc: true,
            client: "default",
            ok: 1,
            failed: 0,
            errors: vec![],
            connect_ms: Some(Stats {
                p50,
                ..Stats::default()
            }),
            subscribed_ms: None,
            first_audio_ms: None,
            first_video_ms: None,
            probes: vec![],
        };
        let r = ratios(&mode(50.0), &mode(100.0));
        assert_eq!(r.connect, Some(0.5));
        assert_eq!(r.first_audio, None);
    }
}
