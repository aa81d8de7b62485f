//! Real browsers as LiveKit participants: headless Chromium running the unmodified npm
//! `livekit-client` (its UMD bundle), driven by `tests/clients/web/driver.mjs` through
//! `playwright-core`.
//!
//! * [`BrowserSpec`] / [`TabSpec`] say what each tab (1 or 2, each its own browser context)
//!   does: connect with a URL and token, publish the fake camera and microphone (simulcast on
//!   by default), and what it must observe (subscribed tracks, remote video playing with
//!   frames advancing, audio level, a video size after a requested simulcast layer).
//! * [`Browser::spawn`] starts the driver; [`Browser::wait_event`] follows its page events;
//!   [`Browser::terminate`] ends a `hold` run; [`Browser::wait`] returns the
//!   [`BrowserReport`] (the driver's one JSON summary line: per tab `connected`, `published`
//!   with per-layer outbound stats, `remote_tracks`, `videos` with `video_width`,
//!   `video_height`, `frames`, `frames_advancing`, `audios` with `level_max`, console errors
//!   and warnings, the console tail and all page events).
//!
//! Exit codes: 0 ok, 2 a tab failed to connect, 3 expectations unmet, 4 a tab was
//! disconnected by the server, 5 browser/driver error, 64 usage.
//!
//! Needs `CONCLAVE_WEB_CLIENTS` (node_modules with livekit-client + playwright-core) and
//! `CONCLAVE_CHROMIUM` (Debian's /usr/bin/chromium), both from `scripts/install-test-deps`;
//! tests fail with a hint when they are missing, they never skip. The driver is killed on
//! drop (SIGTERM first, so Chromium is closed too); when a test panics, its output is printed.
//!
//! CPU: one tab publishing simulcast video costs most of a core; at most two tabs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::lk_clients::{clients_dir, exit_code, read_stderr, read_stdout, Output};

const HINT: &str = "run `./scripts/test` (which installs it) or \
                    `eval \"$(scripts/install-test-deps)\"`";

// ---------------------------------------------------------------- locations

/// The directory holding `node_modules/{livekit-client,playwright-core,whip-whep}`, from
/// `CONCLAVE_WEB_CLIENTS`.
pub fn web_clients_dir() -> Result<PathBuf> {
    let Some(dir) = std::env::var_os("CONCLAVE_WEB_CLIENTS").filter(|v| !v.is_empty()) else {
        bail!("CONCLAVE_WEB_CLIENTS is not set: {HINT}");
    };
    let dir = PathBuf::from(dir);
    for package in ["livekit-client", "playwright-core", "whip-whep"] {
        if !dir.join("node_modules").join(package).is_dir() {
            bail!(
                "CONCLAVE_WEB_CLIENTS={} has no node_modules/{package}: {HINT}",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// The Chromium executable from `CONCLAVE_CHROMIUM`.
pub fn chromium() -> Result<PathBuf> {
    let Some(exe) = std::env::var_os("CONCLAVE_CHROMIUM").filter(|v| !v.is_empty()) else {
        bail!(
            "CONCLAVE_CHROMIUM is not set: {HINT} (it installs Debian's chromium: \
             apt-get install --no-install-recommends chromium)"
        );
    };
    let exe = PathBuf::from(exe);
    if !exe.is_file() {
        bail!(
            "CONCLAVE_CHROMIUM={} does not exist: {HINT} (it installs Debian's chromium: \
             apt-get install --no-install-recommends chromium)",
            exe.display()
        );
    }
    Ok(exe)
}

/// `tests/clients/web/driver.mjs`.
pub fn driver_script() -> PathBuf {
    clients_dir().join("web/driver.mjs")
}

// ---------------------------------------------------------------- specs

/// One browser tab: a LiveKit participant in its own browser context.
#[derive(Clone, Debug)]
pub struct TabSpec {
    /// Label in events and the report (`tab` field); also the key of [`BrowserReport::tab`].
    pub label: String,
    /// Signalling URL, `ws://127.0.0.1:<port>`.
    pub url: String,
    /// The JWT (its identity is the participant's identity).
    pub token: String,
    /// `publishDefaults.simulcast` (default true).
    pub simulcast: bool,
    /// Room option `adaptiveStream` (default false).
    pub adaptive_stream: bool,
    /// Room option `dynacast` (default false).
    pub dynacast: bool,
    /// Room option `singlePeerConnection`: `None` keeps the SDK default (true in 2.x:
    /// `/rtc/v1` first, then v0 `/rtc` after the 404 from `/rtc/v1/validate`);
    /// `Some(false)` goes to v0 `/rtc` at once.
    pub single_pc: Option<bool>,
    /// Camera capture `(width, height, fps)` (default 640x360 at 24: two simulcast layers,
    /// q 320x180 and h 640x360; from 960 px up there are three).
    pub resolution: (u32, u32, u32),
    /// `publishDefaults.videoCodec` (default `vp8`).
    pub video_codec: String,
    /// End-to-end encryption with this shared passphrase (`ExternalE2EEKeyProvider` and the
    /// SDK's own E2EE worker, as Element Call does with per-participant keys); `None`: off.
    pub e2ee_key: Option<String>,
    /// Publish the fake camera (default true).
    pub publish_camera: bool,
    /// Publish the fake microphone (default true).
    pub publish_microphone: bool,
    /// `(identity, "low" | "medium" | "high")`: ask for that simulcast layer of the
    /// participant's video once subscribed (`RemoteTrackPublication.setVideoQuality`).
    pub video_quality: Vec<(String, String)>,
    /// At least this many of the own camera's simulcast layers have encoded frames (0: no
    /// check). Chrome turns layers on as its bandwidth estimate grows, which takes the SFU's
    /// congestion-control feedback and a few seconds.
    pub expect_sending_layers: u32,
    /// Rids (`"q"`, `"h"`, `"f"`) of the own camera's encodings that must be switched off
    /// (`active: false`), as dynacast does when the SFU says no subscriber needs them.
    pub expect_paused_layers: Vec<String>,
    /// `(identity, Some(kind))`: a subscribed remote track (`kind` `"audio"`/`"video"`, or
    /// `None` for any).
    pub expect_remote_tracks: Vec<(String, Option<String>)>,
    /// `(identity, min_frames)`: that participant's video plays: `videoWidth > 0`, at least
    /// `min_frames` painted (requestVideoFrameCallback), one in the last second.
    pub expect_video_playing: Vec<(String, u32)>,
    /// `(identity, min_rms)`: the Web Audio analyser on that participant's audio saw at
    /// least this RMS level (0..1).
    pub expect_audio_level: Vec<(String, f64)>,
    /// `(identity, width, height)`: that participant's video plays at exactly this size.
    pub expect_video_size: Vec<(String, u32, u32)>,
    /// When above 0, the page emits every this many ms a `video_stats` / `audio_stats` event
    /// per remote track (inbound-rtp counters: frame size, frames decoded, freezes, NACKs,
    /// retransmissions, loss; what the page painted and the longest gap between painted
    /// frames since the last sample) and an `outbound_stats` event for its own camera (per
    /// simulcast layer). 0 (the default): no such events.
    pub stats_interval_ms: u32,
    /// `publishDefaults.red`: publish the microphone with redundant audio (RED), the SDK's
    /// default (true), which about doubles its bitrate.
    pub red: bool,
}

impl TabSpec {
    /// A tab that connects through v0 `/rtc` (see [`TabSpec::single_pc`]), publishes camera
    /// and microphone with simulcast, and expects nothing.
    pub fn new(label: impl Into<String>, url: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            url: url.into(),
            token: token.into(),
            simulcast: true,
            adaptive_stream: false,
            dynacast: false,
            single_pc: Some(false),
            resolution: (640, 360, 24),
            video_codec: "vp8".into(),
            e2ee_key: None,
            publish_camera: true,
            publish_microphone: true,
            video_quality: Vec::new(),
            expect_sending_layers: 0,
            expect_paused_layers: Vec::new(),
            expect_remote_tracks: Vec::new(),
            expect_video_playing: Vec::new(),
            expect_audio_level: Vec::new(),
            expect_video_size: Vec::new(),
            stats_interval_ms: 0,
            red: true,
        }
    }

    /// The driver's JSON for this tab.
    pub fn config(&self) -> Value {
        let (width, height, fps) = self.resolution;
        json!({
            "label": self.label,
            "url": self.url,
            "token": self.token,
            "options": {
                "simulcast": self.simulcast,
                "adaptiveStream": self.adaptive_stream,
                "dynacast": self.dynacast,
                "singlePC": self.single_pc,
                "videoCodec": self.video_codec,
                "e2eeKey": self.e2ee_key,
                "resolution": {"width": width, "height": height, "frameRate": fps},
                "statsIntervalMs": self.stats_interval_ms,
                "red": self.red,
            },
            "publish": {"camera": self.publish_camera, "microphone": self.publish_microphone},
            "video_quality": self.video_quality.iter()
                .map(|(identity, quality)| json!({"identity": identity, "quality": quality}))
                .collect::<Vec<_>>(),
            "expect": {
                "sending_layers": self.expect_sending_layers,
                "paused_layers": self.expect_paused_layers,
                "remote_tracks": self.expect_remote_tracks.iter()
                    .map(|(identity, kind)| json!({"identity": identity, "kind": kind}))
                    .collect::<Vec<_>>(),
                "video_playing": self.expect_video_playing.iter()
                    .map(|(identity, n)| json!({"identity": identity, "min_frames": n}))
                    .collect::<Vec<_>>(),
                "audio_level": self.expect_audio_level.iter()
                    .map(|(identity, l)| json!({"identity": identity, "min_level": l}))
                    .collect::<Vec<_>>(),
                "video_size": self.expect_video_size.iter()
                    .map(|(identity, w, h)| json!({"identity": identity, "width": w, "height": h}))
                    .collect::<Vec<_>>(),
            },
        })
    }
}

/// One driver run: one Chromium with 1 or 2 tabs.
#[derive(Clone, Debug)]
pub struct BrowserSpec {
    /// The tabs (1 or 2).
    pub tabs: Vec<TabSpec>,
    /// Deadline in seconds from the driver's start, browser launch included (default 40).
    /// Unmet expectations by then: exit 3.
    pub timeout_s: f64,
    /// Stay at least this long after every tab connected (default 0).
    pub min_duration_s: f64,
    /// After the expectations are met, stay until [`Browser::terminate`] (or `timeout_s`)
    /// instead of ending at once (default false).
    pub hold: bool,
    /// Page console on the driver's stderr (default false; the report has the tail anyway).
    pub verbose: bool,
    /// Run the driver (and so Chromium) inside this network namespace, e.g. a lab client's
    /// ([`super::lab::Lab::client_ns`]); its page server is on that namespace's loopback.
    /// `None` (the default): the test's own namespace.
    pub netns: Option<String>,
    /// Chromium flags added to the driver's own (default none).
    pub chrome_args: Vec<String>,
}

impl BrowserSpec {
    /// A run with these tabs, 40 s deadline, ending as soon as the expectations are met.
    pub fn new(tabs: Vec<TabSpec>) -> Self {
        Self {
            tabs,
            timeout_s: 40.0,
            min_duration_s: 0.0,
            hold: false,
            verbose: false,
            netns: None,
            chrome_args: Vec::new(),
        }
    }

    /// The driver's JSON config.
    pub fn config(&self) -> Value {
        json!({
            "timeout_s": self.timeout_s,
            "min_duration_s": self.min_duration_s,
            "hold": self.hold,
            "verbose": self.verbose,
            "chrome_args": self.chrome_args,
            "tabs": self.tabs.iter().map(TabSpec::config).collect::<Vec<_>>(),
        })
    }
}

// ---------------------------------------------------------------- report

/// What a finished driver left behind.
#[derive(Clone, Debug)]
pub struct BrowserReport {
    /// Process exit code (128 + signal number when killed by a signal).
    pub exit_code: i32,
    /// The `{"type": "summary", ...}` line, or `Value::Null` if none was printed.
    pub summary: Value,
    /// Every `{"type": "event", ...}` line, in order of arrival.
    pub events: Vec<Value>,
    /// The last lines of the driver's stderr.
    pub stderr_tail: String,
    /// Other stdout lines.
    pub other_stdout: Vec<String>,
}

impl BrowserReport {
    /// The summary of the tab labelled `label` (`Value::Null` if absent).
    pub fn tab(&self, label: &str) -> &Value {
        self.summary["tabs"]
            .as_array()
            .and_then(|tabs| tabs.iter().find(|t| t["label"] == label))
            .unwrap_or(&Value::Null)
    }

    /// Entries of `tab.<list>` (e.g. `"videos"`, `"audios"`, `"remote_tracks"`) whose
    /// `identity` is `identity`.
    pub fn remote<'a>(&'a self, label: &str, list: &str, identity: &str) -> Vec<&'a Value> {
        self.tab(label)[list]
            .as_array()
            .map(|v| v.iter().filter(|x| x["identity"] == identity).collect())
            .unwrap_or_default()
    }

    /// The page events named `name` from the tab labelled `label`, in order.
    pub fn events_named<'a>(&'a self, label: &str, name: &str) -> Vec<&'a Value> {
        self.events
            .iter()
            .filter(|e| e["tab"] == label && e["event"] == name)
            .collect()
    }

    /// The tab's own published track of `kind` (`"video"`/`"audio"`).
    pub fn published<'a>(&'a self, label: &str, kind: &str) -> Option<&'a Value> {
        self.tab(label)["published"]
            .as_array()
            .and_then(|v| v.iter().find(|p| p["kind"] == kind))
    }

    /// Panics with the whole report unless the driver exited with `code`.
    #[track_caller]
    pub fn assert_exit(&self, code: i32) {
        assert_eq!(
            self.exit_code,
            code,
            "browser driver exited with {} (wanted {code}):\n{}",
            self.exit_code,
            self.describe()
        );
    }

    /// Human-readable dump for assertion messages: the summary without the event list, the
    /// console tails, the driver's stderr.
    pub fn describe(&self) -> String {
        let mut summary = self.summary.clone();
        let mut consoles = String::new();
        if let Some(tabs) = summary.get_mut("tabs").and_then(Value::as_array_mut) {
            for tab in tabs {
                let label = tab["label"].as_str().unwrap_or("?").to_owned();
                if let Some(obj) = tab.as_object_mut() {
                    let events = obj.remove("events");
                    let tail = obj.remove("console_tail");
                    consoles.push_str(&format!("---- tab {label}: console (tail) ----\n"));
                    for line in tail
                        .as_ref()
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        consoles.push_str(line.as_str().unwrap_or_default());
                        consoles.push('\n');
                    }
                    consoles.push_str(&format!("---- tab {label}: events ----\n"));
                    for e in events
                        .as_ref()
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        consoles.push_str(&e.to_string());
                        consoles.push('\n');
                    }
                }
            }
        }
        format!(
            "exit code: {}\nsummary: {}\n{consoles}other stdout:\n{}\ndriver stderr (tail):\n{}",
            self.exit_code,
            serde_json::to_string_pretty(&summary).unwrap_or_default(),
            self.other_stdout.join("\n"),
            self.stderr_tail
        )
    }
}

// ---------------------------------------------------------------- the driver process

/// A Node.js driver script started by [`spawn_node_driver`]: its process, its output as read
/// so far (stdout events, stderr tail) and the config file it reads (removed on drop).
pub(super) struct NodeDriver {
    pub child: Child,
    pub output: Arc<Mutex<Output>>,
    pub readers: Vec<JoinHandle<()>>,
    pub config: tempfile::NamedTempFile,
}

/// Starts `node SCRIPT --config FILE ARGS…` (FILE holding `config`) with `env` added, stdin,
/// stdout and stderr piped and read in the background; killed on drop. `CONCLAVE_NODE`
/// overrides the `node` binary.
pub(super) fn spawn_node_driver(
    script: &Path,
    config: &Value,
    args: &[&str],
    env: &[(&str, &Path)],
) -> Result<NodeDriver> {
    spawn_node_driver_in(None, script, config, args, env)
}

/// [`spawn_node_driver`] inside the network namespace `netns` (`ip netns exec`) if given.
pub(super) fn spawn_node_driver_in(
    netns: Option<&str>,
    script: &Path,
    config: &Value,
    args: &[&str],
    env: &[(&str, &Path)],
) -> Result<NodeDriver> {
    let mut file = tempfile::Builder::new()
        .prefix("conclave-driver-")
        .suffix(".json")
        .tempfile()?;
    std::io::Write::write_all(&mut file, config.to_string().as_bytes())?;
    let node = std::env::var("CONCLAVE_NODE").unwrap_or_else(|_| "node".to_owned());
    let mut cmd = match netns {
        Some(ns) => super::lab::netns_command(ns, &node),
        None => Command::new(&node),
    };
    cmd.arg(script).arg("--config").arg(file.path()).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!("spawning `{node}` (Node.js >= 18; set CONCLAVE_NODE to override)")
        })?;
    let output = Arc::new(Mutex::new(Output::default()));
    let stdout = child.stdout.take().context("driver stdout")?;
    let stderr = child.stderr.take().context("driver stderr")?;
    let readers = vec![
        tokio::spawn(read_stdout(stdout, output.clone())),
        tokio::spawn(read_stderr(stderr, output.clone())),
    ];
    Ok(NodeDriver {
        child,
        output,
        readers,
        config: file,
    })
}

/// A running `driver.mjs`. SIGTERM then SIGKILL on drop.
pub struct Browser {
    /// What it was started with.
    pub spec: BrowserSpec,
    child: Child,
    output: Arc<Mutex<Output>>,
    readers: Vec<JoinHandle<()>>,
    consumed: HashMap<String, usize>,
    finished: bool,
    _config: tempfile::NamedTempFile,
}

impl Browser {
    /// Starts the driver (returns at once; Chromium launches and the tabs connect in the
    /// background). `CONCLAVE_NODE` overrides the `node` binary.
    pub fn spawn(spec: BrowserSpec) -> Result<Browser> {
        if spec.tabs.is_empty() || spec.tabs.len() > 2 {
            bail!("a browser run has 1 or 2 tabs, not {}", spec.tabs.len());
        }
        let deps = web_clients_dir()?;
        let exe = chromium()?;
        // Our stdin stays open while we live; if the test process dies, the driver sees EOF,
        // leaves the room and closes Chromium.
        let driver = spawn_node_driver_in(
            spec.netns.as_deref(),
            &driver_script(),
            &spec.config(),
            &["--exit-on-stdin-eof"],
            &[("CONCLAVE_WEB_CLIENTS", &deps), ("CONCLAVE_CHROMIUM", &exe)],
        )?;
        Ok(Browser {
            spec,
            child: driver.child,
            output: driver.output,
            readers: driver.readers,
            consumed: HashMap::new(),
            finished: false,
            _config: driver.config,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Output> {
        self.output.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// OS process id of the driver, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Events received so far (page events carry `tab`; `expectations_met` does not).
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// Waits for the next not-yet-returned event `name` (e.g. `"connected"`,
    /// `"track_subscribed"`, `"video_resize"`, `"expectations_met"`). Events that happened
    /// before the call count. Fails when the driver ends without it or after `timeout`.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        self.wait_event_matching(name, |_| true, timeout).await
    }

    /// Like [`Browser::wait_event`], for events that also satisfy `pred`.
    pub async fn wait_event_matching(
        &mut self,
        name: &str,
        pred: impl Fn(&Value) -> bool,
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
                    .filter(|e| e["event"] == name && pred(e))
                    .nth(skip)
                    .cloned();
                if let Some(event) = found {
                    drop(out);
                    *self.consumed.entry(name.to_owned()).or_default() += 1;
                    return Ok(event);
                }
                if out.stdout_closed {
                    let summary = out.summary.clone().unwrap_or(Value::Null);
                    bail!(
                        "browser driver ended without event {name:?}; unmet: {}; error: {}\n\
                         events: {}\ndriver stderr (tail):\n{}",
                        summary["unmet"],
                        summary["error"],
                        event_names(&out.events),
                        out.stderr_tail()
                    );
                }
            }
            if Instant::now() >= deadline {
                let out = self.lock();
                bail!(
                    "browser driver did not report event {name:?} within {timeout:?}; events so \
                     far: {}\ndriver stderr (tail):\n{}",
                    event_names(&out.events),
                    out.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM: the driver takes a last look, leaves the room, closes Chromium and prints
    /// its summary (exit 0 if the expectations were met, else 3).
    pub fn terminate(&self) -> Result<()> {
        let pid = self.pid().context("browser driver already exited")?;
        signal(pid, libc::SIGTERM)
    }

    /// Waits for the exit (killing the driver after `timeout`, which is then an error) and
    /// returns its report. The driver ends by itself at its `timeout_s`; pass a little more.
    pub async fn wait(mut self, timeout: Duration) -> Result<BrowserReport> {
        // tokio's Child::wait closes the child's stdin first, which the driver would take as
        // "the test went away": keep it open until the driver has exited.
        let _stdin = self.child.stdin.take();
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.context("waiting for the browser driver")?,
            Err(_) => {
                self.stop_now();
                self.finish_readers().await;
                let report = self.report(-1);
                self.finished = true;
                bail!(
                    "browser driver still running after {timeout:?}; killed it.\n{}",
                    report.describe()
                );
            }
        };
        self.finish_readers().await;
        self.finished = true;
        Ok(self.report(exit_code(status)))
    }

    /// Runs `spec` to the end: [`Browser::spawn`] + [`Browser::wait`] with `timeout_s + 20 s`.
    pub async fn run(spec: BrowserSpec) -> Result<BrowserReport> {
        let limit = Duration::from_secs_f64(spec.timeout_s + 20.0);
        Browser::spawn(spec)?.wait(limit).await
    }

    /// SIGTERM, up to 10 s for the driver to close Chromium, then SIGKILL.
    fn stop_now(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = signal(pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.start_kill();
        }
    }

    async fn finish_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
    }

    fn report(&self, exit_code: i32) -> BrowserReport {
        let out = self.lock();
        BrowserReport {
            exit_code,
            summary: out.summary.clone().unwrap_or(Value::Null),
            events: out.events.clone(),
            stderr_tail: out.stderr_tail(),
            other_stdout: out.other_stdout.clone(),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.stop_now();
        if std::thread::panicking() {
            // The summary printed on SIGTERM may have been read by now; show what there is.
            std::thread::sleep(Duration::from_millis(200));
            let report = self.report(-1);
            eprintln!(
                "---- browser driver (pid {:?}) ----\nevents: {}\n{}",
                self.pid(),
                event_names(&report.events),
                report.describe()
            );
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) on a child we spawned; no memory is involved.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!(
            "kill({pid}, {sig}) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn event_names(events: &[Value]) -> String {
    let names: Vec<String> = events
        .iter()
        .map(|e| match (e["tab"].as_str(), e["event"].as_str()) {
            (Some(tab), Some(name)) => format!("{tab}:{name}"),
            (None, Some(name)) => name.to_owned(),
            _ => "?".to_owned(),
        })
        .collect();
    format!("[{}]", names.join(", "))
}
