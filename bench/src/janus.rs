//! Janus VideoRoom (Debian package `janus`, installed by `scripts/install-janus`) as the peer
//! SFU of the side-by-side benchmark: a loopback-only instance with a private config, driven
//! through its HTTP API by the same synthetic str0m clients as Conclave.
//!
//! Per participant: one Janus session; a publisher handle (`join` as publisher, `publish` with
//! the str0m offer) and, when it receives, one multistream subscriber handle (`join` as
//! subscriber with every feed, `start` with the str0m answer). A signalling task per client
//! does the HTTP; the media loop runs in the client's task and takes SDP work over a channel,
//! so ICE and DTLS progress while signalling waits.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};

use super::client::{ClientSpec, MediaClient, Shared};
use super::server::{free_tcp_port, pinned_command, stop_child, wait_healthy};
use super::BenchError;

/// Where Debian (and a source build) put Janus's plugins and transports.
const LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/janus",
    "/usr/lib/aarch64-linux-gnu/janus",
    "/usr/lib/janus",
    "/opt/janus/lib/janus",
];

/// A running Janus with one VideoRoom for the benchmark.
pub struct JanusTarget {
    http: reqwest::Client,
    base: String,
    room: u64,
    /// PID (for CPU and RSS).
    pub pid: u32,
    child: Child,
    _dir: tempfile::TempDir,
    feeds: Mutex<Vec<(u32, u64)>>,
    published_tx: watch::Sender<bool>,
    log: PathBuf,
}

fn janus_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Janus(e.to_string())
}

fn transaction() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn find_janus() -> Result<PathBuf, BenchError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("janus"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BenchError::Janus(
                "the janus binary is not installed; run scripts/install-janus \
                 (apt-get install janus) or pass --no-janus"
                    .into(),
            )
        })
}

fn write(path: &Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|e| BenchError::io(format!("writing {}", path.display()), e))
}

impl JanusTarget {
    /// Starts Janus on a free loopback HTTP port (ICE on `lo` only), pinned to `cpu`, and
    /// creates a VideoRoom for `publishers` publishers.
    pub async fn start(cpu: Option<usize>, publishers: usize) -> Result<Self, BenchError> {
        let exe = find_janus()?;
        let lib = LIB_DIRS
            .iter()
            .map(Path::new)
            .find(|d| d.join("plugins/libjanus_videoroom.so").is_file())
            .ok_or_else(|| {
                BenchError::Janus(format!(
                    "libjanus_videoroom.so not found under {LIB_DIRS:?}; reinstall janus"
                ))
            })?;
        let dir = tempfile::tempdir().map_err(|e| BenchError::io("janus work dir", e))?;
        let d = dir.path();
        for sub in ["plugins", "transports", "events", "loggers"] {
            std::fs::create_dir_all(d.join(sub))
                .map_err(|e| BenchError::io("janus work dir", e))?;
        }
        let link = |from: PathBuf, to: PathBuf| {
            std::os::unix::fs::symlink(&from, &to)
                .map_err(|e| BenchError::io(format!("linking {}", from.display()), e))
        };
        link(
            lib.join("plugins/libjanus_videoroom.so"),
            d.join("plugins/libjanus_videoroom.so"),
        )?;
        link(
            lib.join("transports/libjanus_http.so"),
            d.join("transports/libjanus_http.so"),
        )?;
        let port = free_tcp_port()?;
        let ds = d.display();
        write(
            &d.join("janus.jcfg"),
            &format!(
                "general: {{\n\tconfigs_folder = \"{ds}\"\n\tplugins_folder = \"{ds}/plugins\"\n\
                 \ttransports_folder = \"{ds}/transports\"\n\tevents_folder = \"{ds}/events\"\n\
                 \tloggers_folder = \"{ds}/loggers\"\n\tdebug_level = 3\n\tsession_timeout = 0\n\
                 \tadmin_secret = \"{}\"\n}}\ncertificates: {{\n}}\n\
                 media: {{\n\trtp_port_range = \"20000-60000\"\n}}\n\
                 nat: {{\n\tice_enforce_list = \"{}\"\n\tnice_debug = false\n}}\n\
                 plugins: {{\n}}\ntransports: {{\n}}\nloggers: {{\n}}\n\
                 events: {{\n\tbroadcast = false\n}}\n",
                transaction(),
                super::scenario::JANUS_IFACE
            ),
        )?;
        write(
            &d.join("janus.transport.http.jcfg"),
            &format!(
                "general: {{\n\tjson = \"compact\"\n\tbase_path = \"/janus\"\n\thttp = true\n\
                 \tport = {port}\n\tip = \"127.0.0.1\"\n\thttps = false\n}}\n\
                 admin: {{\n\tadmin_http = false\n\tadmin_https = false\n}}\ncors: {{\n}}\n\
                 certificates: {{\n}}\n"
            ),
        )?;
        write(&d.join("janus.plugin.videoroom.jcfg"), "general: {\n}\n")?;
        let log = d.join("janus.log");
        let mut cmd = pinned_command(&exe, cpu);
        cmd.arg("-F")
            .arg(d)
            .arg("-C")
            .arg(d.join("janus.jcfg"))
            .arg("-L")
            .arg(&log)
            .args(["-N", "-o"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .map_err(|e| BenchError::io(format!("starting {}", exe.display()), e))?;
        let base = format!("http://127.0.0.1:{port}/janus");
        if let Err(e) = wait_healthy(&format!("{base}/info"), &mut child, &log).await {
            stop_child(&mut child);
            return Err(BenchError::Janus(e.to_string()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(janus_err)?;
        let (published_tx, _) = watch::channel(false);
        let mut me = Self {
            http,
            base,
            room: 0,
            pid: child.id(),
            child,
            _dir: dir,
            feeds: Mutex::new(Vec::new()),
            published_tx,
            log,
        };
        me.room = me.create_room(publishers).await?;
        Ok(me)
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, BenchError> {
        let url = format!("{}{path}", self.base);
        let v: Value = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(janus_err)?
            .json()
            .await
            .map_err(janus_err)?;
        if v["janus"] == "error" {
            return Err(BenchError::Janus(format!("{path}: {}", v["error"])));
        }
        Ok(v)
    }

    async fn create_room(&self, publishers: usize) -> Result<u64, BenchError> {
        let sid = self.create_session().await?;
        let hid = self.attach(sid).await?;
        let room = 4242 + u64::from(rand::random::<u16>());
        let r = self
            .post(
                &format!("/{sid}/{hid}"),
                json!({"janus": "message", "transaction": transaction(), "body": {
                    "request": "create", "room": room, "publishers": publishers + 1,
                    "audiocodec": "opus", "videocodec": "vp8", "bitrate": 0,
                    "fir_freq": 0, "notify_joining": false, "permanent": false,
                    "description": "conclave-bench"}}),
            )
            .await?;
        let data = &r["plugindata"]["data"];
        if data["videoroom"] != "created" {
            return Err(BenchError::Janus(format!("create room: {data}")));
        }
        Ok(room)
    }

    async fn create_session(&self) -> Result<u64, BenchError> {
        let r = self
            .post("", json!({"janus": "create", "transaction": transaction()}))
            .await?;
        r["data"]["id"]
            .as_u64()
            .ok_or_else(|| BenchError::Janus(format!("create session: {r}")))
    }

    async fn attach(&self, sid: u64) -> Result<u64, BenchError> {
        let r = self
            .post(
                &format!("/{sid}"),
                json!({"janus": "attach", "plugin": "janus.plugin.videoroom",
                       "transaction": transaction()}),
            )
            .await?;
        r["data"]["id"]
            .as_u64()
            .ok_or_else(|| BenchError::Janus(format!("attach: {r}")))
    }

    /// The last lines of Janus's log (for error messages).
    pub fn log_tail(&self) -> String {
        super::server::tail(&self.log)
    }

    /// Tells subscribers that every publisher is in (they subscribe to all feeds at once).
    pub fn all_published(&self) {
        self.published_tx.send_replace(true);
    }
}

impl Drop for JanusTarget {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// SDP work the signalling task hands to the media loop.
enum Work {
    PublisherOffer(oneshot::Sender<Result<String, BenchError>>),
    PublisherAnswer(String),
    SubscriberOffer(String, oneshot::Sender<Result<String, BenchError>>),
    Candidate(bool, String),
}

/// One Janus session seen by one client: requests plus a long-poll event queue.
struct Session {
    target: Arc<JanusTarget>,
    sid: u64,
    queue: VecDeque<Value>,
}

impl Session {
    async fn poll(&mut self) -> Result<(), BenchError> {
        let url = format!("{}/{}?maxev=10", self.target.base, self.sid);
        let v: Value = self
            .target
            .http
            .get(&url)
            .send()
            .await
            .map_err(janus_err)?
            .json()
            .await
            .map_err(janus_err)?;
        match v {
            Value::Array(a) => self.queue.extend(a),
            other => self.queue.push_back(other),
        }
        Ok(())
    }

    /// Sends a plugin message; returns the synchronous answer or the event it caused.
    async fn message(
        &mut self,
        hid: u64,
        body: Value,
        jsep: Option<Value>,
        work: &mpsc::Sender<Work>,
        handles: &[(u64, bool)],
    ) -> Result<Value, BenchError> {
        let tx = transaction();
        let mut req = json!({"janus": "message", "transaction": tx, "body": body});
        if let Some(j) = jsep {
            req["jsep"] = j;
        }
        let r = self
            .target
            .post(&format!("/{}/{hid}", self.sid), req)
            .await?;
        if r["janus"] != "ack" {
            return Ok(r);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            while let Some(ev) = self.queue.pop_front() {
                if ev["transaction"] == tx.as_str() && ev["janus"] == "event" {
                    if let Some(err) = ev["plugindata"]["data"].get("error") {
                        return Err(BenchError::Janus(format!("{body}: {err}")));
                    }
                    return Ok(ev);
                }
                forward_trickle(&ev, work, handles).await;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout(format!("janus event for {body}")));
            }
            self.poll().await?;
        }
    }
}

async fn forward_trickle(ev: &Value, work: &mpsc::Sender<Work>, handles: &[(u64, bool)]) {
    if ev["janus"] != "trickle" {
        return;
    }
    let Some(line) = ev["candidate"]["candidate"].as_str() else {
        return;
    };
    let sender = ev["sender"].as_u64().unwrap_or_default();
    if let Some((_, subscriber)) = handles.iter().find(|(h, _)| *h == sender) {
        let _ = work
            .send(Work::Candidate(*subscriber, line.to_owned()))
            .await;
    }
}

async fn ask<T>(
    work: &mpsc::Sender<Work>,
    make: impl FnOnce(oneshot::Sender<Result<T, BenchError>>) -> Work,
) -> Result<T, BenchError> {
    let (tx, rx) = oneshot::channel();
    work.send(make(tx))
        .await
        .map_err(|_| BenchError::Janus("media loop ended".into()))?;
    rx.await
        .map_err(|_| BenchError::Janus("media loop ended".into()))?
}

fn jsep_sdp(ev: &Value) -> Result<String, BenchError> {
    ev["jsep"]["sdp"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| BenchError::Janus(format!("no jsep in {ev}")))
}

async fn signalling(
    target: Arc<JanusTarget>,
    spec: ClientSpec,
    work: mpsc::Sender<Work>,
    mut stop: watch::Receiver<bool>,
) -> Result<u64, BenchError> {
    let sid = target.create_session().await?;
    let mut s = Session {
        target: target.clone(),
        sid,
        queue: VecDeque::new(),
    };
    let mut handles: Vec<(u64, bool)> = Vec::new();
    let mut own_feed = None;
    if let Some(idx) = spec.publish {
        let hid = target.attach(sid).await?;
        handles.push((hid, false));
        let joined = s
            .message(
                hid,
                json!({"request": "join", "ptype": "publisher", "room": target.room,
                       "display": spec.identity}),
                None,
                &work,
                &handles,
            )
            .await?;
        let feed = joined["plugindata"]["data"]["id"]
            .as_u64()
            .ok_or_else(|| BenchError::Janus(format!("publisher join: {joined}")))?;
        own_feed = Some(feed);
        tracing::debug!(client = %spec.identity, feed, "janus: joined as publisher");
        let offer = ask(&work, Work::PublisherOffer).await?;
        let ev = s
            .message(
                hid,
                json!({"request": "publish"}),
                Some(json!({"type": "offer", "sdp": offer, "trickle": false})),
                &work,
                &handles,
            )
            .await?;
        let answer = jsep_sdp(&ev)?;
        tracing::debug!(client = %spec.identity, answer = %answer, "janus: publisher answer");
        let _ = work.send(Work::PublisherAnswer(answer)).await;
        if let Ok(mut f) = target.feeds.lock() {
            f.push((idx, feed));
        }
    }
    if spec.receive_tracks > 0 {
        let mut published = target.published_tx.subscribe();
        while !*published.borrow_and_update() {
            tokio::select! {
                r = published.changed() => if r.is_err() { return Ok(sid) },
                _ = stop.changed() => return Ok(sid),
            }
        }
        let feeds: Vec<Value> = target
            .feeds
            .lock()
            .map(|f| {
                f.iter()
                    .filter(|(_, feed)| Some(*feed) != own_feed)
                    .map(|(_, feed)| json!({"feed": feed}))
                    .collect()
            })
            .unwrap_or_default();
        let hid = target.attach(sid).await?;
        handles.push((hid, true));
        let ev = s
            .message(
                hid,
                json!({"request": "join", "ptype": "subscriber", "room": target.room,
                       "streams": feeds}),
                None,
                &work,
                &handles,
            )
            .await?;
        let offer = jsep_sdp(&ev)?;
        let answer = ask(&work, |tx| Work::SubscriberOffer(offer, tx)).await?;
        s.message(
            hid,
            json!({"request": "start"}),
            Some(json!({"type": "answer", "sdp": answer, "trickle": false})),
            &work,
            &handles,
        )
        .await?;
    }
    // Keep forwarding trickled candidates until every handle is up (or the run ends).
    let mut up = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while up < handles.len() && Instant::now() < deadline && !*stop.borrow() {
        while let Some(ev) = s.queue.pop_front() {
            if ev["janus"] == "webrtcup" {
                up += 1;
            }
            forward_trickle(&ev, &work, &handles).await;
        }
        if up >= handles.len() {
            break;
        }
        tokio::select! {
            r = s.poll() => r?,
            _ = stop.changed() => break,
        }
    }
    Ok(sid)
}

/// Runs one synthetic participant against Janus until `stop` flips. Failures are recorded in
/// `shared`.
pub async fn run_client(
    target: Arc<JanusTarget>,
    spec: ClientSpec,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let who = spec.identity.clone();
    if let Err(e) = client_loop(target, spec, shared.clone(), stop, permit).await {
        tracing::debug!(client = %who, error = %e, "janus bench client failed");
        shared.fail(&who, &e);
    }
}

async fn client_loop(
    target: Arc<JanusTarget>,
    spec: ClientSpec,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    mut permit: Option<OwnedSemaphorePermit>,
) -> Result<(), BenchError> {
    let started = Instant::now();
    let (work_tx, mut work_rx) = mpsc::channel(64);
    let mut sig = Some(tokio::spawn(signalling(
        target.clone(),
        spec.clone(),
        work_tx,
        stop.clone(),
    )));
    let mut sid = None;
    let mut client = MediaClient::new(spec, shared, started);
    let mut sig_done = false;
    loop {
        tokio::select! {
            wake = client.wait() => client.on_wake(wake),
            w = work_rx.recv(), if !sig_done => {
                match w {
                    Some(Work::PublisherOffer(reply)) => {
                        let _ = reply.send(client.publisher_offer(Instant::now(), "bench-track"));
                    }
                    Some(Work::PublisherAnswer(sdp)) => client.publisher_answer(&sdp)?,
                    Some(Work::SubscriberOffer(sdp, reply)) => {
                        let _ = reply.send(client.subscriber_offer(Instant::now(), &sdp));
                    }
                    Some(Work::Candidate(sub, line)) => client.remote_candidate(sub, &line),
                    None => sig_done = true,
                }
                client.flush();
            }
            _ = stop.changed() => break,
        }
        if sig.as_ref().is_some_and(|h| h.is_finished()) {
            if let Some(h) = sig.take() {
                match h.await {
                    Ok(Ok(s)) => sid = Some(s),
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(BenchError::Janus(format!("signalling task: {e}"))),
                }
            }
        }
        if permit.is_some() && client.ready() {
            permit = None;
        }
    }
    if let Some(h) = sig.take() {
        h.abort();
    }
    if let Some(sid) = sid {
        let _ = target
            .post(
                &format!("/{sid}"),
                json!({"janus": "destroy", "transaction": transaction()}),
            )
            .await;
    }
    Ok(())
}
