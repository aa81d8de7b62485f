//! The servers under test as child processes: a Conclave (`conclave serve` on loopback with a
//! temporary data dir; by default the `conclave` binary next to `conclave-bench`, see
//! [`default_server_exe`]) and, in [`super::janus`], Janus. Both are optionally pinned to a
//! core with `taskset` and killed when dropped.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BenchError;
use conclave::auth::jwt::{Claims, TokenSigner, VideoGrant};
use conclave::config::Config;
use conclave::secrets::Secrets;

/// How long a server may take to answer its health check.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// File name of the server binary.
pub const SERVER_BIN: &str = "conclave";

/// The server under test by default: the `conclave` binary in the directory of the running
/// `conclave-bench` (cargo builds both into `target/<profile>/`). Fails, saying how to build
/// it, when it is not there.
pub fn default_server_exe() -> Result<PathBuf, BenchError> {
    let me = std::env::current_exe().map_err(|e| BenchError::io("locating conclave-bench", e))?;
    let dir = me.parent().unwrap_or_else(|| Path::new("."));
    let exe = dir.join(SERVER_BIN);
    if exe.is_file() {
        return Ok(exe);
    }
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "",
        _ => " --release",
    };
    Err(BenchError::MissingServer {
        path: exe,
        build: format!("cargo build{profile} -p conclave"),
    })
}

/// A free loopback TCP port (bound and released; good enough on a quiet loopback).
pub fn free_tcp_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::io("finding a free TCP port", e))
}

/// A free loopback UDP port.
pub fn free_udp_port() -> Result<u16, BenchError> {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::io("finding a free UDP port", e))
}

/// Whether `taskset` is on the PATH.
pub fn have_taskset() -> bool {
    Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A command that runs `program` pinned to `cpu` (through `taskset`, which execs, so the child
/// PID is the program's), or on every online core without `cpu`: a child inherits the bench's
/// own affinity, which is the clients' one core once the bench pinned itself, so "unpinned"
/// must be said explicitly. Without `taskset`, the program as is.
pub fn pinned_command(program: &Path, cpu: Option<usize>) -> Command {
    let cpus = match cpu {
        Some(cpu) => Some(cpu.to_string()),
        None => std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()),
    };
    match cpus {
        Some(list) if have_taskset() => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(list).arg(program);
            c
        }
        _ => Command::new(program),
    }
}

/// Pins every thread of this process to `cpu` (`taskset -a -p`). New threads inherit it.
pub fn pin_self(cpu: usize) -> Result<(), BenchError> {
    let status = Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| BenchError::io("running taskset", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(BenchError::Options(format!(
            "taskset could not pin the bench to CPU {cpu}"
        )))
    }
}

/// Waits until `GET url` answers 2xx, or fails after [`START_TIMEOUT`] or when `child` exits.
pub async fn wait_healthy(url: &str, child: &mut Child, log: &Path) -> Result<(), BenchError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .map_err(|e| BenchError::Server(e.to_string()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BenchError::Server(format!(
                "exited with {status} during start-up; log: {}",
                tail(log)
            )));
        }
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "{url} did not answer within {START_TIMEOUT:?}; log: {}",
                tail(log)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

/// Kills and reaps a child.
pub fn stop_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A Conclave server the benchmark talks to: a child it started, or a URL it was given.
pub struct ConclaveTarget {
    /// `http://127.0.0.1:<port>`.
    pub http_url: String,
    /// Mints tokens for the target's API key.
    pub signer: TokenSigner,
    /// PID of the child (for CPU and RSS), absent for an external server.
    pub pid: Option<u32>,
    child: Option<Child>,
    log: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

impl ConclaveTarget {
    /// Starts `exe serve` (default: [`default_server_exe`]) on free loopback ports with a
    /// temporary data dir, no homeserver, rooms created on first connect; pinned to `cpu` when
    /// given.
    pub async fn start(exe: Option<&Path>, cpu: Option<usize>) -> Result<Self, BenchError> {
        Self::start_with_env(exe, cpu, &[]).await
    }

    /// [`ConclaveTarget::start`] with more environment for the child (`CONCLAVE_*`
    /// configuration, `RUST_LOG`), set after and over the defaults.
    pub async fn start_with_env(
        exe: Option<&Path>,
        cpu: Option<usize>,
        env: &[(&str, OsString)],
    ) -> Result<Self, BenchError> {
        let exe = match exe {
            Some(p) => p.to_path_buf(),
            None => default_server_exe()?,
        };
        let dir = tempfile::tempdir().map_err(|e| BenchError::io("creating a data dir", e))?;
        let data_dir = dir.path().join("data");
        let port = free_tcp_port()?;
        let udp_port = free_udp_port()?;
        let log = dir.path().join("conclave.log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| BenchError::io("creating the log", e))?;
        let mut cmd = pinned_command(&exe, cpu);
        cmd.arg("serve").env_clear();
        for keep in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(keep) {
                cmd.env(keep, v);
            }
        }
        cmd.env("CONCLAVE_DATA_DIR", &data_dir)
            .env("CONCLAVE_HTTP__BIND", format!("127.0.0.1:{port}"))
            .env("CONCLAVE_RTC__UDP_PORT", udp_port.to_string())
            // The bench's clients speak UDP only; servers run side by side, so no fixed port.
            .env("CONCLAVE_RTC__TCP_PORT", "0")
            .env("CONCLAVE_RTC__NODE_IPS", "[\"127.0.0.1\"]")
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_APPSERVICE__PING_ON_START", "false")
            // Every simulated participant connects from 127.0.0.1: one address, many clients.
            .env("CONCLAVE_HTTP__MAX_CONNECTIONS_PER_IP", "10000")
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let mut child = cmd
            .spawn()
            .map_err(|e| BenchError::io(format!("starting {}", exe.display()), e))?;
        let http_url = format!("http://127.0.0.1:{port}");
        if let Err(e) = wait_healthy(&format!("{http_url}/healthz"), &mut child, &log).await {
            stop_child(&mut child);
            return Err(e);
        }
        let config = Config {
            data_dir: data_dir.clone(),
            ..Config::default()
        };
        let secrets = Secrets::load_or_create(&config)
            .map_err(|e| BenchError::Server(format!("reading the child's secrets: {e}")))?;
        let signer = TokenSigner::new(&secrets.livekit_key, secrets.livekit_secret.expose());
        Ok(Self {
            http_url,
            signer,
            pid: Some(child.id()),
            child: Some(child),
            log: Some(log),
            data_dir: Some(data_dir),
            _dir: Some(dir),
        })
    }

    /// An external server at `url` (loopback only) with the given API key and secret.
    pub fn external(url: &str, key: &str, secret: &str) -> Result<Self, BenchError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| BenchError::Options(format!("--url {url}: {e}")))?;
        let host = parsed.host_str().unwrap_or_default();
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(BenchError::Options(format!(
                "--url {url}: the benchmark sends load to loopback addresses only"
            )));
        }
        Ok(Self {
            http_url: url.trim_end_matches('/').to_owned(),
            signer: TokenSigner::new(key, secret),
            pid: None,
            child: None,
            log: None,
            data_dir: None,
            _dir: None,
        })
    }

    /// The last lines of the child's log (empty for an external server), for error messages.
    pub fn log_tail(&self) -> String {
        self.log.as_deref().map(tail).unwrap_or_default()
    }

    /// The child's data dir (store, secrets); absent for an external server.
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// The WebSocket base (`ws://…`).
    pub fn ws_url(&self) -> String {
        self.http_url.replacen("http", "ws", 1)
    }

    /// A token for `identity` in `room`, valid for an hour.
    pub fn token(&self, room: &str, identity: &str, publish: bool) -> Result<String, BenchError> {
        let now = conclave::clock::unix_secs();
        let claims = Claims {
            iss: self.signer.key().to_owned(),
            sub: identity.to_owned(),
            nbf: now.saturating_sub(10),
            exp: now + 3600,
            name: identity.to_owned(),
            metadata: String::new(),
            video: VideoGrant {
                room: room.to_owned(),
                room_join: true,
                can_publish: Some(publish),
                can_subscribe: Some(true),
                can_publish_data: Some(false),
                ..VideoGrant::default()
            },
        };
        self.signer
            .sign(&claims)
            .map_err(|e| BenchError::Signal(format!("signing a token: {e}")))
    }
}

impl Drop for ConclaveTarget {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            stop_child(c);
        }
    }
}
