//! Runs the real `conclave` binary as a child process on a loopback port with its own data dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use conclave::store::{SqliteStore, Store};
use tempfile::TempDir;

/// Path of the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_conclave")
}

/// A free loopback TCP port (free for UDP too).
pub fn free_port() -> u16 {
    next_free_port().expect("free port")
}

/// A free loopback UDP port (free for TCP too).
pub fn free_udp_port() -> u16 {
    next_free_port().expect("free UDP port")
}

/// Hands out loopback ports *below* the kernel's ephemeral range, each once per test process.
///
/// Why: a port found by binding `:0` is an ephemeral port, and between releasing it and the
/// child binding it, any client's outgoing socket may take it (libwebrtc and Chromium bind
/// ephemeral UDP ports all the time; CI once lost a Conclave start to exactly that). Below the
/// range only explicit binds land, so the only contenders are other tests' picks, which the
/// counter keeps apart. The start is spread by PID for two test processes side by side.
pub fn next_free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static EPHEMERAL_LOW: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    const LOW: u32 = 10_000;
    let ephemeral_low = *EPHEMERAL_LOW.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32_768)
    });
    let high = ephemeral_low.min(65_535);
    if high < LOW + 1_000 {
        // An unusual range: fall back to what the kernel picks.
        return Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port());
    }
    let span = high - LOW;
    let start = (std::process::id().wrapping_mul(7_919)) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (start + n) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {LOW}..{high}")
}

/// How to start a Conclave.
#[derive(Clone, Debug)]
pub struct ConclaveOptions {
    /// Extra environment (`CONCLAVE_*` keys and others).
    pub env: Vec<(String, String)>,
    /// Homeserver client URL.
    pub homeserver_url: String,
    /// Homeserver server name.
    pub server_name: String,
    /// Extra CA (the test CA) for federation TLS.
    pub ca_file: Option<PathBuf>,
    /// Run inside this network namespace (`ip netns exec`), e.g. a lab's SFU namespace;
    /// `None` (the default): the test's own namespace.
    pub netns: Option<String>,
    /// The address the HTTP port binds and the ICE host candidate (`rtc.node_ips`) use;
    /// `None` (the default): 127.0.0.1.
    pub bind_ip: Option<std::net::IpAddr>,
}

impl ConclaveOptions {
    /// Options for a Conclave whose homeserver is not running (nothing listens there).
    pub fn standalone() -> Self {
        Self {
            env: Vec::new(),
            homeserver_url: format!("http://127.0.0.1:{}", free_port()),
            server_name: "localhost".into(),
            ca_file: None,
            netns: None,
            bind_ip: None,
        }
    }

    /// Options for a Conclave beside the given homeserver.
    pub fn for_homeserver(hs: &super::synapse::Homeserver) -> Self {
        Self {
            env: Vec::new(),
            homeserver_url: hs.client_url.clone(),
            server_name: hs.server_name.clone(),
            ca_file: Some(hs.ca.cert_path.clone()),
            netns: None,
            bind_ip: None,
        }
    }

    /// Runs in `lab`'s SFU namespace, on [`super::lab::Lab::sfu_ip`]: clients in the lab's
    /// client namespaces reach it at [`Conclave::ws_url`]; the test reaches its HTTP API
    /// through [`super::lab::http_get`] (used by the readiness check and
    /// [`Conclave::metrics`]; other helpers that use `reqwest` on [`Conclave::url`] do not
    /// work from the root namespace).
    pub fn in_lab(mut self, lab: &super::lab::Lab) -> Self {
        self.netns = Some(lab.sfu_ns().to_owned());
        self.bind_ip = Some(lab.sfu_ip().into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// A Conclave child process. Killed on drop; its log is printed if the test panicked.
pub struct Conclave {
    /// Keeps the data dir alive.
    _dir: TempDir,
    /// The data dir.
    pub data_dir: PathBuf,
    /// HTTP port.
    pub port: u16,
    /// Media (UDP) port.
    pub udp_port: u16,
    /// ICE-TCP media port (`rtc.tcp_port`).
    pub tcp_port: u16,
    /// `http://127.0.0.1:<port>` (`http://<bind_ip>:<port>` with [`ConclaveOptions::bind_ip`]).
    pub url: String,
    /// Options it was started with.
    pub opts: ConclaveOptions,
    child: Option<Child>,
    log_path: PathBuf,
    starts: u32,
}

impl Conclave {
    /// Prepares data dir and port without starting (so a registration can be written first).
    pub fn prepare(opts: ConclaveOptions) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        let port = free_port();
        let udp_port = free_udp_port();
        let tcp_port = free_port();
        Ok(Self {
            udp_port,
            tcp_port,
            log_path: dir.path().join("conclave.log"),
            _dir: dir,
            data_dir,
            port,
            url: format!("http://{}:{port}", host(&opts)),
            opts,
            child: None,
            starts: 0,
        })
    }

    /// Prepares and starts.
    pub async fn start(opts: ConclaveOptions) -> Result<Self> {
        let mut c = Self::prepare(opts)?;
        c.spawn().await?;
        Ok(c)
    }

    /// The environment the process runs with.
    pub fn command_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "CONCLAVE_DATA_DIR".to_owned(),
                self.data_dir.display().to_string(),
            ),
            (
                "CONCLAVE_HTTP__BIND".to_owned(),
                format!("{}:{}", host(&self.opts), self.port),
            ),
            (
                "CONCLAVE_MATRIX__HOMESERVER_URL".to_owned(),
                self.opts.homeserver_url.clone(),
            ),
            (
                "CONCLAVE_MATRIX__SERVER_NAME".to_owned(),
                self.opts.server_name.clone(),
            ),
            (
                "CONCLAVE_RTC__UDP_PORT".to_owned(),
                self.udp_port.to_string(),
            ),
            (
                "CONCLAVE_RTC__TCP_PORT".to_owned(),
                self.tcp_port.to_string(),
            ),
            (
                "CONCLAVE_RTC__NODE_IPS".to_owned(),
                format!("[\"{}\"]", host(&self.opts)),
            ),
            // Test homeservers federate on loopback, which Conclave refuses by default. A test
            // can set it back to false through `ConclaveOptions::env` (applied after this).
            (
                "CONCLAVE_AUTH__ALLOW_PRIVATE_FEDERATION".to_owned(),
                "true".to_owned(),
            ),
            // CONCLAVE_TEST_RUST_LOG overrides the filter for diagnosis, e.g.
            // `info,conclave=debug,str0m=trace` to see every RTP packet.
            (
                "RUST_LOG".to_owned(),
                std::env::var("CONCLAVE_TEST_RUST_LOG")
                    .unwrap_or_else(|_| "info,conclave=debug,tower_http=info".to_owned()),
            ),
        ];
        if let Some(ca) = &self.opts.ca_file {
            env.push((
                "CONCLAVE_MATRIX__EXTRA_CA_FILE".into(),
                ca.display().to_string(),
            ));
        }
        env.extend(self.opts.env.iter().cloned());
        env
    }

    /// A `conclave` command with this instance's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.opts.netns {
            Some(ns) => super::lab::netns_std_command(ns, binary()),
            None => Command::new(binary()),
        };
        cmd.args(args).env_clear();
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        for (k, v) in self.command_env() {
            cmd.env(k, v);
        }
        cmd
    }

    /// Writes the appservice registration for this instance and returns its path.
    pub fn write_registration(&self) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.data_dir)?;
        let path = self.data_dir.join("appservice.yaml");
        let out = self
            .command(&[
                "generate-registration",
                "--url",
                &self.url,
                "--output",
                path.to_str().context("utf-8 path")?,
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "generate-registration failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(path)
    }

    /// Starts the process (again) and waits until `/healthz` answers.
    pub async fn spawn(&mut self) -> Result<()> {
        self.spawn_with_env(&[]).await
    }

    /// Starts with extra environment for this run only.
    pub async fn spawn_with_env(&mut self, extra: &[(&str, &str)]) -> Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = self.command(&["serve"]);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning conclave")?;
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            if let Some(ns) = self.opts.netns.clone() {
                if self.netns_get(ns, "/healthz").await.is_ok() {
                    return Ok(());
                }
            } else if let Ok(r) = http.get(format!("{}/healthz", self.url)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "conclave exited with {status} during start:\n{}",
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                bail!("conclave did not become healthy in 30 s:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process ID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the process in kB (from /proc).
    pub fn rss_kb(&self) -> Option<u64> {
        self.proc_status_kb("VmRSS:")
    }

    /// Peak resident memory of the process so far in kB (`VmHWM`, from /proc).
    pub fn peak_rss_kb(&self) -> Option<u64> {
        self.proc_status_kb("VmHWM:")
    }

    fn proc_status_kb(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits (bounded) for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    self.child = None;
                    return Ok(status);
                }
            } else {
                bail!("not running");
            }
            if Instant::now() > deadline {
                bail!("conclave still running after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Graceful stop (SIGTERM), SIGKILL after 10 s.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    self.child = None;
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            self.child = None;
            bail!("conclave ignored SIGTERM for 10 s");
        }
        Ok(())
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `max` log lines containing any of `needles`, for failure messages: CI shows
    /// only the tail of a failed run's output, where a whole log would push them out.
    pub fn log_excerpt(&self, needles: &[&str], max: usize) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| needles.iter().any(|n| l.contains(n)))
            .collect();
        lines[lines.len().saturating_sub(max)..].join("\n")
    }

    /// [`Conclave::log_excerpt`]s of two federating Conclaves (40 lines each), each under
    /// its name, for the failure messages of two-ministry tests.
    pub fn two_log_excerpts(c1: &Conclave, c2: &Conclave, needles: &[&str]) -> String {
        format!(
            "--- Conclave-1\n{}\n--- Conclave-2\n{}",
            c1.log_excerpt(needles, 40),
            c2.log_excerpt(needles, 40)
        )
    }

    /// `GET path` from inside namespace `ns` (where this instance runs): the body of a 2xx.
    async fn netns_get(&self, ns: String, path: &str) -> Result<String> {
        self.netns_get_with(ns, path, None).await
    }

    /// The admin API's view of SFU room `room` (`/_conclave/admin/v1/sfu/rooms/{room}`); the
    /// name goes as one path segment (call rooms are base64: `/`, `+`, `=` escaped).
    pub async fn sfu_room_view(&self, room: &str, token: &str) -> Result<serde_json::Value> {
        let segment = room
            .replace('/', "%2F")
            .replace('+', "%2B")
            .replace('=', "%3D");
        self.admin_get(&format!("/_conclave/admin/v1/sfu/rooms/{segment}"), token)
            .await
    }

    /// `GET path` with the admin token `token` (`admin.token`), in the lab's namespace when
    /// Conclave runs in one: the JSON body of a 2xx answer.
    pub async fn admin_get(&self, path: &str, token: &str) -> Result<serde_json::Value> {
        let body = match self.opts.netns.clone() {
            Some(ns) => self.netns_get_with(ns, path, Some(token)).await?,
            None => {
                let r = reqwest::Client::new()
                    .get(format!("{}{path}", self.url))
                    .bearer_auth(token)
                    .send()
                    .await?;
                let status = r.status();
                let body = r.text().await?;
                if !status.is_success() {
                    bail!("HTTP {status} for {path}: {body}");
                }
                body
            }
        };
        Ok(serde_json::from_str(&body)?)
    }

    async fn netns_get_with(&self, ns: String, path: &str, bearer: Option<&str>) -> Result<String> {
        let ip = self
            .opts
            .bind_ip
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
        let addr = std::net::SocketAddr::new(ip, self.port);
        let path = path.to_owned();
        let bearer = bearer.map(str::to_owned);
        let (status, body) = tokio::task::spawn_blocking(move || {
            super::lab::http_get_with(&ns, addr, &path, bearer.as_deref(), Duration::from_secs(5))
        })
        .await??;
        if !(200..300).contains(&status) {
            bail!("HTTP {status} from {addr}: {body}");
        }
        Ok(body)
    }

    /// `GET /metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        if let Some(ns) = self.opts.netns.clone() {
            return self.netns_get(ns, "/metrics").await;
        }
        Ok(reqwest::get(format!("{}/metrics", self.url))
            .await?
            .text()
            .await?)
    }

    /// The value of one counter from `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<u64> {
        let text = self.metrics().await?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("metric {name} not found in:\n{text}"))
    }

    /// Signalling sessions so far per path, `(v0, v1)`, from
    /// `conclave_signal_sessions_total{signalling=…}`.
    pub async fn signal_sessions(&self) -> Result<(u64, u64)> {
        let v0 = self
            .metric("conclave_signal_sessions_total{signalling=\"v0\"}")
            .await?;
        let v1 = self
            .metric("conclave_signal_sessions_total{signalling=\"v1\"}")
            .await?;
        Ok((v0, v1))
    }

    /// Opens the instance's database (read alongside the running process; WAL allows it).
    pub fn store(&self) -> Result<SqliteStore> {
        Ok(SqliteStore::open(&self.data_dir.join("conclave.db"))?)
    }

    /// The persisted secrets file.
    pub fn secrets_text(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("secrets.toml")).unwrap_or_default()
    }

    /// `ws://127.0.0.1:<port>`, the SFU URL (`ws://<bind_ip>:<port>` with
    /// [`ConclaveOptions::bind_ip`], e.g. in a lab).
    pub fn ws_url(&self) -> String {
        format!("ws://{}:{}", host(&self.opts), self.port)
    }

    /// The LiveKit API key and secret from the persisted secrets.
    pub fn livekit_credentials(&self) -> (String, String) {
        let v: toml::Table = self.secrets_text().parse().expect("secrets toml");
        (
            v["livekit_key"].as_str().expect("key").to_owned(),
            v["livekit_secret"].as_str().expect("secret").to_owned(),
        )
    }

    /// Signs a LiveKit token with this instance's key for `identity` in `room`.
    pub fn token(&self, room: &str, identity: &str, grant: serde_json::Value) -> String {
        let (key, secret) = self.livekit_credentials();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut video = serde_json::json!({"room": room, "roomJoin": true});
        if let (Some(v), Some(extra)) = (video.as_object_mut(), grant.as_object()) {
            for (k, x) in extra {
                v.insert(k.clone(), x.clone());
            }
        }
        let claims = serde_json::json!({
            "iss": key, "sub": identity, "name": identity, "nbf": now, "exp": now + 3600,
            "video": video,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    }

    /// The hs_token from the persisted secrets.
    pub fn hs_token(&self) -> String {
        let v: toml::Table = self.secrets_text().parse().expect("secrets toml");
        v["hs_token"].as_str().expect("hs_token").to_owned()
    }

    /// The data dir path.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

impl Drop for Conclave {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- conclave log ({}) ----\n{}",
                self.log_path.display(),
                self.logs()
            );
        }
    }
}

/// The address Conclave binds and announces: [`ConclaveOptions::bind_ip`] or 127.0.0.1.
fn host(opts: &ConclaveOptions) -> String {
    opts.bind_ip
        .map_or_else(|| "127.0.0.1".to_owned(), |ip| ip.to_string())
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Assert helper used by tests: a store query as a future-friendly closure.
pub fn store_has<F>(c: &Conclave, f: F) -> Result<bool>
where
    F: FnOnce(&dyn Store) -> Result<bool>,
{
    let store = c.store()?;
    f(&store)
}

/// Two federating homeservers with a Conclave registered on hs1 (started after hs1).
pub async fn pair_with_conclave_on_hs1(
    extra_env: &[(&str, &str)],
) -> Result<(
    super::synapse::Homeserver,
    super::synapse::Homeserver,
    Conclave,
)> {
    use super::synapse::{free_ports, start_pair_with, HsOptions, TestCa};
    let ca = TestCa::new()?;
    let ports = free_ports(2)?;
    let mut opts = ConclaveOptions::standalone();
    opts.homeserver_url = format!("http://127.0.0.1:{}", ports[0]);
    opts.server_name = format!("localhost:{}", ports[1]);
    opts.ca_file = Some(ca.cert_path.clone());
    for (k, v) in extra_env {
        opts.env.push(((*k).to_owned(), (*v).to_owned()));
    }
    let mut c = Conclave::prepare(opts)?;
    let reg = c.write_registration()?;
    let (hs1, hs2) = start_pair_with(
        HsOptions::new(ca.clone())
            .ports(ports[0], ports[1])
            .appservice(reg),
        HsOptions::new(ca),
    )
    .await?;
    c.spawn().await?;
    Ok((hs1, hs2, c))
}

/// Waits (10 s at most) until Conclave's store holds `want` for `user` in `room`.
pub async fn wait_membership(
    c: &Conclave,
    room: &str,
    user: &str,
    want: ruma::events::room::member::MembershipState,
) {
    let store = c.store().expect("store");
    let room_id = ruma::RoomId::parse(room).expect("room id");
    let user_id = ruma::UserId::parse(user).expect("user id");
    eventually(
        Duration::from_secs(10),
        "membership in Conclave's store",
        || async {
            Ok(store
                .membership(&room_id, &user_id)?
                .filter(|m| m.membership == want)
                .map(|_| ()))
        },
    )
    .await
    .expect("membership reached the store");
}

/// Waits until `user` is joined to `room` in Conclave's store.
pub async fn wait_joined(c: &Conclave, room: &str, user: &str) {
    wait_membership(
        c,
        room,
        user,
        ruma::events::room::member::MembershipState::Join,
    )
    .await;
}

/// Decodes a JWT's payload without verifying it.
pub fn jwt_payload(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let part = jwt.split('.').nth(1).expect("JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON payload")
}

/// `POST {c.url}{path}` with a JSON body: the status and the JSON answer (`null` if none).
pub async fn post_json(
    c: &Conclave,
    path: &str,
    body: &serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", c.url))
        .json(body)
        .send()
        .await
        .expect("POST to Conclave");
    let status = r.status();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// `POST /get_token` on `c` for `user`'s membership (`m-<device>`) in `room`'s call, with an
/// OpenID token from `user`'s homeserver: the status and the body.
pub async fn get_token(
    c: &Conclave,
    user: &super::matrix_client::TestUser,
    room: &str,
) -> (u16, serde_json::Value) {
    let openid = user.openid_token().await.unwrap_or_default();
    let r = reqwest::Client::new()
        .post(format!("{}/get_token", c.url))
        .json(&serde_json::json!({
            "room_id": room, "slot_id": conclave::matrix::naming::LEGACY_SLOT,
            "openid_token": openid,
            "member": {"id": format!("m-{}", user.device_id), "claimed_user_id": user.user_id,
                       "claimed_device_id": user.device_id},
        }))
        .send()
        .await;
    match r {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or_default()),
        Err(e) => (0, serde_json::json!({"error": e.to_string()})),
    }
}
