//! Real LiveKit SDK clients as child processes, for tests against Conclave's SFU.
//!
//! * [`PyClient`] runs `tests/clients/lk_client.py` on the official LiveKit
//!   Python SDK (the Rust client core with libwebrtc): it publishes synthetic
//!   audio/video, subscribes, counts frames per remote participant, can send
//!   data, mute, set metadata and leave on a schedule, and ends with one JSON
//!   summary line ([`ClientReport::summary`]). Exit codes: 0 ok, 2 connect
//!   failed, 3 expectations unmet, 4 disconnected by the server.
//! * [`NodePublisher`] runs `tests/clients/node/publish.mjs` on
//!   `@livekit/rtc-node`: publishes audio and video for a while. Exit codes: 0
//!   ok, 2 connect failed, 3 publish failed, 4 disconnected by the server.
//! * [`mint_token`] makes the HS256 LiveKit access token both accept.
//!
//! The SDKs come from `scripts/install-test-deps` (`CONCLAVE_LK_VENV`,
//! `CONCLAVE_NODE_CLIENTS`); tests fail with a hint when they are missing,
//! they never skip. Children are killed on drop; when a test panics, the
//! output of its clients is printed.
//!
//! CPU: each publishing client costs up to about one core with video on; keep
//! two or three per test on a 2-core machine.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

const HINT: &str = "run `./scripts/test` (which installs it) or \
                    `eval \"$(scripts/install-test-deps)\"`";
/// Stderr lines kept per client (the SDK can print long backtraces at exit).
const STDERR_KEEP_LINES: usize = 400;
/// Lines of stderr in [`ClientReport::stderr_tail`] and in error messages.
const STDERR_TAIL_LINES: usize = 60;

// ---------------------------------------------------------------- locations

/// The LiveKit Python SDK venv from `CONCLAVE_LK_VENV`.
pub fn lk_venv() -> Result<PathBuf> {
    let Some(dir) = std::env::var_os("CONCLAVE_LK_VENV").filter(|v| !v.is_empty()) else {
        bail!("CONCLAVE_LK_VENV is not set: {HINT}");
    };
    let dir = PathBuf::from(dir);
    if !dir.join("bin/python").exists() {
        bail!(
            "CONCLAVE_LK_VENV={} has no bin/python: {HINT}",
            dir.display()
        );
    }
    Ok(dir)
}

/// The Python interpreter of the LiveKit client venv (`$CONCLAVE_LK_VENV/bin/python`).
pub fn lk_python() -> Result<PathBuf> {
    Ok(lk_venv()?.join("bin/python"))
}

/// The directory holding `node_modules/@livekit/rtc-node`, from `CONCLAVE_NODE_CLIENTS`.
pub fn node_clients_dir() -> Result<PathBuf> {
    let Some(dir) = std::env::var_os("CONCLAVE_NODE_CLIENTS").filter(|v| !v.is_empty()) else {
        bail!("CONCLAVE_NODE_CLIENTS is not set: {HINT}");
    };
    let dir = PathBuf::from(dir);
    if !dir.join("node_modules/@livekit/rtc-node").is_dir() {
        bail!(
            "CONCLAVE_NODE_CLIENTS={} has no node_modules/@livekit/rtc-node: {HINT}",
            dir.display()
        );
    }
    Ok(dir)
}

/// `tests/clients` in this checkout (the client scripts).
pub fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// `http://host:port/...` → `ws://host:port/...` (and https → wss); others unchanged.
pub fn ws_url(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        url.to_owned()
    }
}

// ---------------------------------------------------------------- tokens

/// A LiveKit access token (HS256, header `typ: JWT`) as `livekit-api` makes it.
///
/// Claims: `iss` = `key`, `sub` = `name` = `identity`, `nbf` = now, `exp` = now +
/// `ttl_s`, `video` = `{room, roomJoin: true}` with the fields of `grants` (a JSON
/// object, e.g. `json!({"canPublish": true, "canUpdateOwnMetadata": true})`)
/// merged in; `grants` may override `room`/`roomJoin`. Anything but an object
/// (e.g. `Value::Null`) adds nothing. LiveKit treats absent `canPublish`,
/// `canSubscribe`, `canPublishData` as allowed.
pub fn mint_token(
    key: &str,
    secret: &str,
    room: &str,
    identity: &str,
    grants: Value,
    ttl_s: i64,
) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut video = json!({ "room": room, "roomJoin": true });
    if let (Value::Object(extra), Some(video)) = (grants, video.as_object_mut()) {
        video.extend(extra);
    }
    let claims = json!({
        "iss": key,
        "sub": identity,
        "name": identity,
        "nbf": now,
        "exp": now + ttl_s,
        "video": video,
    });
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of a JSON object cannot fail")
}

// ---------------------------------------------------------------- reports

/// What a finished client left behind.
#[derive(Clone, Debug)]
pub struct ClientReport {
    /// Process exit code (128 + signal number when killed by a signal).
    pub exit_code: i32,
    /// The last `{"type": "summary", ...}` line, or `Value::Null` if none was printed.
    pub summary: Value,
    /// The last lines of stderr (SDK logs; a Rust panic backtrace at exit is normal noise).
    pub stderr_tail: String,
    /// Every `{"type": "event", ...}` line, in order.
    pub events: Vec<Value>,
    /// Other stdout lines (e.g. the Node SDK's pino logs).
    pub other_stdout: Vec<String>,
}

impl ClientReport {
    /// `summary.remote[identity]` of a Python client, if it saw that participant.
    pub fn remote(&self, identity: &str) -> Option<&Value> {
        self.summary.get("remote").and_then(|r| r.get(identity))
    }

    /// Panics with the whole report unless the client exited with `code`.
    #[track_caller]
    pub fn assert_exit(&self, code: i32) {
        assert_eq!(
            self.exit_code,
            code,
            "client exited with {} (wanted {code}):\n{}",
            self.exit_code,
            self.describe()
        );
    }

    /// Human-readable dump for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code: {}\nsummary: {}\nother stdout:\n{}\nstderr (tail):\n{}",
            self.exit_code,
            serde_json::to_string_pretty(&self.summary).unwrap_or_default(),
            self.other_stdout.join("\n"),
            self.stderr_tail
        )
    }
}

// ---------------------------------------------------------------- child process plumbing

/// What a client process printed (shared with `support::web`, whose driver prints the same
/// JSON-lines protocol).
#[derive(Default)]
pub(super) struct Output {
    pub(super) events: Vec<Value>,
    pub(super) summary: Option<Value>,
    pub(super) other_stdout: Vec<String>,
    pub(super) stderr: VecDeque<String>,
    pub(super) stdout_closed: bool,
}

impl Output {
    pub(super) fn stderr_tail(&self) -> String {
        let skip = self.stderr.len().saturating_sub(STDERR_TAIL_LINES);
        self.stderr
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A client child process with its stdout parsed into events/summary and its stderr kept.
struct ClientProcess {
    name: String,
    child: Child,
    output: Arc<Mutex<Output>>,
    readers: Vec<JoinHandle<()>>,
    /// How many matches of each event name `wait_event` already returned.
    consumed: HashMap<String, usize>,
    finished: bool,
}

impl ClientProcess {
    fn spawn(name: String, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning client {name}: {cmd:?}"))?;
        let output = Arc::new(Mutex::new(Output::default()));
        let stdout = child.stdout.take().context("child stdout")?;
        let stderr = child.stderr.take().context("child stderr")?;
        let readers = vec![
            tokio::spawn(read_stdout(stdout, output.clone())),
            tokio::spawn(read_stderr(stderr, output.clone())),
        ];
        Ok(Self {
            name,
            child,
            output,
            readers,
            consumed: HashMap::new(),
            finished: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Output> {
        self.output.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM (a graceful leave for both clients).
    fn terminate(&self) -> Result<()> {
        let pid = self.pid().context("client already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
        Ok(())
    }

    async fn wait_event_matching(
        &mut self,
        name: &str,
        pred: &dyn Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let skip = self.consumed.get(name).copied().unwrap_or(0);
        loop {
            {
                let out = self.lock();
                let found = out
                    .events
                    .iter()
                    .filter(|e| e.get("event").and_then(Value::as_str) == Some(name) && pred(e))
                    .nth(skip)
                    .cloned();
                if let Some(event) = found {
                    drop(out);
                    *self.consumed.entry(name.to_owned()).or_default() += 1;
                    return Ok(event);
                }
                if out.stdout_closed {
                    bail!(
                        "client {} ended without event {name:?}; events: {}\nsummary: {}\nstderr (tail):\n{}",
                        self.name,
                        event_names(&out.events),
                        out.summary.clone().unwrap_or(Value::Null),
                        out.stderr_tail()
                    );
                }
            }
            if Instant::now() >= deadline {
                let out = self.lock();
                bail!(
                    "client {} did not report event {name:?} within {timeout:?}; events so far: {}\nstderr (tail):\n{}",
                    self.name,
                    event_names(&out.events),
                    out.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait(mut self, timeout: Duration) -> Result<ClientReport> {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.with_context(|| format!("waiting for client {}", self.name))?,
            Err(_) => {
                let _ = self.child.kill().await;
                self.finish_readers().await;
                let report = self.report(-1);
                self.finished = true;
                bail!(
                    "client {} still running after {timeout:?}; killed it.\n{}",
                    self.name,
                    report.describe()
                );
            }
        };
        self.finish_readers().await;
        self.finished = true;
        Ok(self.report(exit_code(status)))
    }

    async fn finish_readers(&mut self) {
        for reader in self.readers.drain(..) {
            // EOF follows the exit unless a grandchild kept the pipe: don't hang on that.
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
    }

    fn report(&self, exit_code: i32) -> ClientReport {
        let out = self.lock();
        ClientReport {
            exit_code,
            summary: out.summary.clone().unwrap_or(Value::Null),
            stderr_tail: out.stderr_tail(),
            events: out.events.clone(),
            other_stdout: out.other_stdout.clone(),
        }
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        // kill_on_drop kills the child; print what it said if the test is failing.
        if std::thread::panicking() && !self.finished {
            let report = self.report(-1);
            eprintln!(
                "---- client {} (pid {:?}) ----\nevents: {}\n{}",
                self.name,
                self.pid(),
                event_names(&report.events),
                report.describe()
            );
        }
    }
}

fn event_names(events: &[Value]) -> String {
    let names: Vec<&str> = events
        .iter()
        .filter_map(|e| e.get("event").and_then(Value::as_str))
        .collect();
    format!("[{}]", names.join(", "))
}

pub(super) fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Most events kept per process (a runaway client cannot fill memory).
const MAX_EVENTS: usize = 20_000;

/// Reads JSON lines: `{"type":"event"}` into events, `{"type":"summary"}` into the summary,
/// anything else into other stdout.
pub(super) async fn read_stdout(stdout: impl AsyncRead + Unpin, output: Arc<Mutex<Output>>) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let parsed: Option<Value> = serde_json::from_str(&line).ok();
        let kind = parsed
            .as_ref()
            .and_then(|v| v.get("type"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut out = output.lock().unwrap_or_else(|p| p.into_inner());
        match (kind.as_deref(), parsed) {
            (Some("event"), Some(v)) => {
                if out.events.len() < MAX_EVENTS {
                    out.events.push(v);
                }
            }
            (Some("summary"), Some(v)) => out.summary = Some(v),
            _ => {
                if out.other_stdout.len() < 2000 {
                    out.other_stdout.push(line);
                }
            }
        }
    }
    output
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .stdout_closed = true;
}

/// Keeps the last lines of stderr.
pub(super) async fn read_stderr(stderr: impl AsyncRead + Unpin, output: Arc<Mutex<Output>>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut out = output.lock().unwrap_or_else(|p| p.into_inner());
        if out.stderr.len() == STDERR_KEEP_LINES {
            out.stderr.pop_front();
        }
        out.stderr.push_back(line);
    }
}

// ---------------------------------------------------------------- Python client

/// How to run one `lk_client.py` participant. Build with [`PyClientSpec::new`],
/// then set fields.
#[derive(Clone, Debug)]
pub struct PyClientSpec {
    /// Signalling URL, `ws://127.0.0.1:<port>` (see [`ws_url`]).
    pub url: String,
    /// The JWT (see [`mint_token`]).
    pub token: String,
    /// Label for logs, events and data payloads (`hello-from-<label>-<kind>`).
    pub label: String,
    /// Publish the sine audio track (default true).
    pub publish_audio: bool,
    /// Publish the moving-bar video track (default true).
    pub publish_video: bool,
    /// Remote participants to see (default 0).
    pub expect_participants: u32,
    /// Decoded audio frames (10 ms each) from each expected remote participant (default 0).
    pub expect_audio_frames: u32,
    /// Decoded video frames from each expected remote participant (default 0).
    pub expect_video_frames: u32,
    /// Data packets (repeats count) from each expected remote participant (default 0).
    pub expect_data: u32,
    /// Client deadline in seconds from process start, connect included (default 30).
    pub timeout_s: f64,
    /// Stay at least this long after connecting (default 0).
    pub min_duration_s: f64,
    /// `Some(true)`: `--dual-pc` (v0 `/rtc`); `Some(false)`: `--single-pc` (v1
    /// `/rtc/v1`); `None`: the SDK default (single PC).
    pub dual_pc: Option<bool>,
    /// `"reliable"`, `"lossy"` or `"both"`: send data every 500 ms until the end.
    pub send_data: Option<String>,
    /// Mute the own audio track this many seconds after connecting.
    pub mute_after_s: Option<f64>,
    /// Set the own metadata after connecting (needs the `canUpdateOwnMetadata`
    /// grant); success then also requires the server's echo.
    pub set_metadata: Option<String>,
    /// Stay until this many seconds after connecting, then leave.
    pub leave_after_s: Option<f64>,
    /// Stream events on stdout (`--events-stdout`, default true; needed by
    /// [`PyClient::wait_event`]).
    pub events_stdout: bool,
    /// SDK logs on stderr (`-v`, default false).
    pub verbose: bool,
    /// Any further arguments (e.g. `--width 160 --height 120 --fps 10`).
    pub extra_args: Vec<String>,
    /// Run inside this network namespace (`ip netns exec`), e.g. a lab client's
    /// ([`super::lab::Lab::client_ns`]); `None` (the default): the test's own namespace.
    pub netns: Option<String>,
}

impl PyClientSpec {
    /// A participant that publishes audio and video and expects nothing.
    pub fn new(url: impl Into<String>, token: impl Into<String>, label: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: token.into(),
            label: label.into(),
            publish_audio: true,
            publish_video: true,
            expect_participants: 0,
            expect_audio_frames: 0,
            expect_video_frames: 0,
            expect_data: 0,
            timeout_s: 30.0,
            min_duration_s: 0.0,
            dual_pc: None,
            send_data: None,
            mute_after_s: None,
            set_metadata: None,
            leave_after_s: None,
            events_stdout: true,
            verbose: false,
            extra_args: Vec::new(),
            netns: None,
        }
    }

    /// A participant that publishes nothing (a viewer, a listener) and expects nothing.
    pub fn viewer(
        url: impl Into<String>,
        token: impl Into<String>,
        label: impl Into<String>,
    ) -> Self {
        Self {
            publish_audio: false,
            publish_video: false,
            ..Self::new(url, token, label)
        }
    }

    /// Publishes the camera at 640x360, 15 fps, in simulcast layers (the Python SDK announces
    /// two at that size, q and h).
    pub fn simulcast_camera(&mut self) {
        self.extra_args = [
            "--simulcast",
            "--width",
            "640",
            "--height",
            "360",
            "--fps",
            "15",
        ]
        .map(String::from)
        .to_vec();
    }

    /// The command-line arguments for `lk_client.py`.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--url".into(),
            self.url.clone(),
            "--token".into(),
            self.token.clone(),
            "--identity-label".into(),
            self.label.clone(),
            if self.publish_audio {
                "--publish-audio"
            } else {
                "--no-publish-audio"
            }
            .into(),
            if self.publish_video {
                "--publish-video"
            } else {
                "--no-publish-video"
            }
            .into(),
            "--expect-participants".into(),
            self.expect_participants.to_string(),
            "--expect-audio-frames".into(),
            self.expect_audio_frames.to_string(),
            "--expect-video-frames".into(),
            self.expect_video_frames.to_string(),
            "--expect-data".into(),
            self.expect_data.to_string(),
            "--timeout".into(),
            self.timeout_s.to_string(),
            "--min-duration".into(),
            self.min_duration_s.to_string(),
        ];
        match self.dual_pc {
            Some(true) => a.push("--dual-pc".into()),
            Some(false) => a.push("--single-pc".into()),
            None => {}
        }
        if let Some(kind) = &self.send_data {
            a.extend(["--send-data".into(), kind.clone()]);
        }
        if let Some(s) = self.mute_after_s {
            a.extend(["--mute-after".into(), s.to_string()]);
        }
        if let Some(text) = &self.set_metadata {
            // `=` form: the metadata may start with `-`.
            a.push(format!("--set-metadata={text}"));
        }
        if let Some(s) = self.leave_after_s {
            a.extend(["--leave-after".into(), s.to_string()]);
        }
        if self.events_stdout {
            a.push("--events-stdout".into());
        }
        if self.verbose {
            a.push("-v".into());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A running `lk_client.py` participant. Killed on drop.
pub struct PyClient {
    /// What it was started with.
    pub spec: PyClientSpec,
    proc: ClientProcess,
}

impl PyClient {
    /// Starts the client (returns at once; it connects in the background).
    pub fn spawn(spec: PyClientSpec) -> Result<PyClient> {
        let python = lk_python()?;
        let script = clients_dir().join("lk_client.py");
        let mut cmd = match &spec.netns {
            Some(ns) => super::lab::netns_command(ns, &python),
            None => Command::new(&python),
        };
        cmd.arg(&script)
            .args(spec.args())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        let proc = ClientProcess::spawn(format!("py:{}", spec.label), cmd)
            .with_context(|| format!("is {} a working venv? {HINT}", python.display()))?;
        Ok(PyClient { spec, proc })
    }

    /// OS process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Waits for the next not-yet-returned event called `name` (e.g.
    /// `"connected"`, `"track_subscribed"`, `"first_video_frame"`,
    /// `"participant_disconnected"`, `"data_received"`, `"expectations_met"`).
    /// Events that happened before the call count. Fails when the client ends
    /// without it or after `timeout`. Needs `spec.events_stdout` (the default).
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        self.wait_event_matching(name, |_| true, timeout).await
    }

    /// Like [`PyClient::wait_event`], for events that also satisfy `pred`
    /// (e.g. `|e| e["identity"] == "bob"`).
    pub async fn wait_event_matching(
        &mut self,
        name: &str,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        if !self.spec.events_stdout {
            bail!("wait_event needs PyClientSpec::events_stdout = true");
        }
        self.proc.wait_event_matching(name, &pred, timeout).await
    }

    /// Events received so far.
    pub fn events(&self) -> Vec<Value> {
        self.proc.lock().events.clone()
    }

    /// SIGTERM: the client leaves gracefully, prints its summary and exits
    /// (0 if its expectations were met, else 3; 2 if still connecting).
    pub fn terminate(&self) -> Result<()> {
        self.proc.terminate()
    }

    /// Waits for the exit (killing the client after `timeout`, which is then an
    /// error) and returns its report. The client ends by itself at its own
    /// `timeout_s`, so pass a little more than that.
    pub async fn wait(self, timeout: Duration) -> Result<ClientReport> {
        self.proc.wait(timeout).await
    }
}

// ---------------------------------------------------------------- Node publisher

/// How to run `publish.mjs`.
#[derive(Clone, Debug)]
pub struct NodePublishSpec {
    /// Signalling URL.
    pub url: String,
    /// The JWT.
    pub token: String,
    /// Label for logs and events.
    pub label: String,
    /// Seconds to stay published after connecting (default 10).
    pub duration_s: f64,
    /// Connect deadline in seconds (default 20).
    pub connect_timeout_s: f64,
    /// Publish audio (default true).
    pub publish_audio: bool,
    /// Publish video (default true).
    pub publish_video: bool,
    /// As [`PyClientSpec::dual_pc`].
    pub dual_pc: Option<bool>,
    /// As [`PyClientSpec::netns`].
    pub netns: Option<String>,
}

impl NodePublishSpec {
    /// Audio and video for 10 s.
    pub fn new(url: impl Into<String>, token: impl Into<String>, label: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: token.into(),
            label: label.into(),
            duration_s: 10.0,
            connect_timeout_s: 20.0,
            publish_audio: true,
            publish_video: true,
            dual_pc: None,
            netns: None,
        }
    }

    /// The command-line arguments for `publish.mjs`.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--url".into(),
            self.url.clone(),
            "--token".into(),
            self.token.clone(),
            "--label".into(),
            self.label.clone(),
            "--duration".into(),
            self.duration_s.to_string(),
            "--timeout".into(),
            self.connect_timeout_s.to_string(),
        ];
        if !self.publish_audio {
            a.push("--no-audio".into());
        }
        if !self.publish_video {
            a.push("--no-video".into());
        }
        match self.dual_pc {
            Some(true) => a.push("--dual-pc".into()),
            Some(false) => a.push("--single-pc".into()),
            None => {}
        }
        a
    }
}

/// A running `@livekit/rtc-node` publisher. Killed on drop.
pub struct NodePublisher {
    /// What it was started with.
    pub spec: NodePublishSpec,
    proc: ClientProcess,
}

impl NodePublisher {
    /// Starts the publisher. `CONCLAVE_NODE` overrides the `node` binary.
    pub fn spawn(spec: NodePublishSpec) -> Result<NodePublisher> {
        let dir = node_clients_dir()?;
        let node = std::env::var("CONCLAVE_NODE").unwrap_or_else(|_| "node".to_owned());
        let mut cmd = match &spec.netns {
            Some(ns) => super::lab::netns_command(ns, &node),
            None => Command::new(&node),
        };
        cmd.arg(clients_dir().join("node/publish.mjs"))
            .args(spec.args())
            .env("CONCLAVE_NODE_CLIENTS", &dir)
            // The SDK logs pino JSON to stdout; production level drops its debug lines.
            .env("NODE_ENV", "production");
        let proc =
            ClientProcess::spawn(format!("node:{}", spec.label), cmd).with_context(|| {
                format!("is `{node}` (Node.js >= 18) on PATH? set CONCLAVE_NODE to override")
            })?;
        Ok(NodePublisher { spec, proc })
    }

    /// OS process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Waits for the next not-yet-returned event `name` (`"connected"`, `"published"`, ...).
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        self.proc
            .wait_event_matching(name, &|_| true, timeout)
            .await
    }

    /// SIGTERM: stops publishing early and leaves (exit 0).
    pub fn terminate(&self) -> Result<()> {
        self.proc.terminate()
    }

    /// Waits for the exit (killing it after `timeout`, an error) and returns its report.
    pub async fn wait(self, timeout: Duration) -> Result<ClientReport> {
        self.proc.wait(timeout).await
    }
}

// ---------------------------------------------------------------- WHIP / WHEP

/// A running third-party WHIP publisher or WHEP player: aiortc (`tests/clients/whip_client.py`)
/// or headless Chromium with the npm `whip-whep` clients in its page
/// (`tests/clients/web/whip.mjs`). Killed on drop.
pub struct WhipClient {
    proc: ClientProcess,
}

impl WhipClient {
    /// Starts `whip_client.py <args>` (aiortc; e.g. `["publish", "--url", …]`).
    pub fn spawn(label: &str, args: &[String]) -> Result<WhipClient> {
        let python = lk_python()?;
        let mut cmd = Command::new(&python);
        cmd.arg(clients_dir().join("whip_client.py"))
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        let proc = ClientProcess::spawn(format!("whip:{label}"), cmd).with_context(|| {
            format!("is {} a working venv with aiortc? {HINT}", python.display())
        })?;
        Ok(WhipClient { proc })
    }

    /// Starts `node whip.mjs <args>` (Chromium; e.g. `["--mode", "publish", "--url", …]`).
    pub fn spawn_in_chromium(label: &str, args: &[String]) -> Result<WhipClient> {
        let dir = super::web::web_clients_dir()?;
        let exe = super::web::chromium()?;
        let node = std::env::var("CONCLAVE_NODE").unwrap_or_else(|_| "node".to_owned());
        let mut cmd = Command::new(&node);
        cmd.arg(clients_dir().join("web/whip.mjs"))
            .args(args)
            .env("CONCLAVE_WEB_CLIENTS", &dir)
            .env("CONCLAVE_CHROMIUM", &exe);
        let proc = ClientProcess::spawn(format!("whip-page:{label}"), cmd)
            .with_context(|| format!("is `{node}` (Node.js >= 18) on PATH?"))?;
        Ok(WhipClient { proc })
    }

    /// Waits for the next not-yet-returned event `name` (`"created"`, `"connected"`, …).
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        self.proc
            .wait_event_matching(name, &|_| true, timeout)
            .await
    }

    /// Waits for the exit (killing it after `timeout`, an error) and returns its report.
    pub async fn wait(self, timeout: Duration) -> Result<ClientReport> {
        self.proc.wait(timeout).await
    }
}

/// Runs `tests/clients/simulcast_sub.py` (the Python SDK) to its end with `token` on `url`,
/// `path` choosing the signalling (`--single-pc` or `--dual-pc`): its one-line report (frame
/// sizes after asking for the low and the high layer, the longest gap, frames after
/// unsubscribing). Panics with its output when it prints none.
pub async fn simulcast_viewer(url: &str, token: &str, path: &str) -> Value {
    let python = lk_python().unwrap_or_else(|e| panic!("{e:#}"));
    let out = Command::new(python)
        .arg(clients_dir().join("simulcast_sub.py"))
        .args(["--url", url, "--token", token, path])
        .output()
        .await
        .unwrap_or_else(|e| panic!("simulcast_sub.py: {e}"));
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("{e}: {line}\n{}", String::from_utf8_lossy(&out.stderr)))
}
