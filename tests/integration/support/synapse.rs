//! Real Synapse homeservers for integration tests.
//!
//! Each [`Homeserver`] is a `python -m synapse.app.homeserver` child process
//! with its own temp dir (config, SQLite DB, logs, TLS cert), a plain-HTTP
//! client listener on `127.0.0.1:<http port>` and a TLS federation listener on
//! `<fed port>` whose certificate is issued by a per-test [`TestCa`]. The
//! server name is `localhost:<fed port>`, so two servers on one machine
//! federate with each other without DNS, SRV or `.well-known` lookups.
//!
//! Synapse comes from the venv that `scripts/install-test-deps` creates (see
//! [`venv`]); tests never skip when it is missing, they fail with a hint.
//!
//! Only one Synapse-using test should run at a time (2-core machines): take
//! [`heavy_lock`] first thing in the test and keep the guard alive until the
//! end (declare it before the servers so it is dropped after them).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::{Rng, RngCore};
use serde_json::{json, Value};
use tempfile::TempDir;

use super::matrix_client::TestUser;

/// How long [`Homeserver::start`] waits for both listeners to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Homeserver::stop`] waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- venv / lock

/// Path of the Synapse venv from `CONCLAVE_SYNAPSE_VENV` (set by
/// `eval "$(scripts/install-test-deps)"`). Errors, never skips, when it is
/// unset or has no `bin/python`.
pub fn venv() -> Result<PathBuf> {
    const HINT: &str = "run `./scripts/test` (which installs it) or \
                        `eval \"$(scripts/install-test-deps)\"`";
    let Some(dir) = std::env::var_os("CONCLAVE_SYNAPSE_VENV").filter(|v| !v.is_empty()) else {
        bail!("CONCLAVE_SYNAPSE_VENV is not set: {HINT}");
    };
    let dir = PathBuf::from(dir);
    if !dir.join("bin/python").exists() {
        bail!(
            "CONCLAVE_SYNAPSE_VENV={} has no bin/python: {HINT}",
            dir.display()
        );
    }
    Ok(dir)
}

static HEAVY: Mutex<()> = Mutex::new(());

/// Guard returned by [`heavy_lock`]; the lock is released when it is dropped.
pub struct HeavyGuard {
    _guard: MutexGuard<'static, ()>,
}

/// Process-wide lock serialising Synapse-using tests. Poison-tolerant: a test
/// that panicked while holding it does not break the following ones.
pub fn heavy_lock() -> HeavyGuard {
    HeavyGuard {
        _guard: HEAVY
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    }
}

// ---------------------------------------------------------------- test CA

/// A throw-away certificate authority (openssl CLI). Share one `Arc<TestCa>`
/// between servers that federate: each trusts exactly this CA for federation.
pub struct TestCa {
    /// PEM CA certificate: trust this in HTTP clients talking to federation ports.
    pub cert_path: PathBuf,
    /// PEM CA private key.
    pub key_path: PathBuf,
    cert_pem: Vec<u8>,
    _dir: TempDir,
}

impl TestCa {
    pub fn new() -> Result<Arc<TestCa>> {
        let dir = tempfile::Builder::new()
            .prefix("conclave-test-ca-")
            .tempdir()
            .context("creating temp dir for the test CA")?;
        let cert_path = dir.path().join("ca.crt");
        let key_path = dir.path().join("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "3650",
            "-subj",
            "/CN=Conclave test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            path_str(&key_path)?,
            "-out",
            path_str(&cert_path)?,
        ])
        .context("generating the test CA")?;
        let cert_pem = std::fs::read(&cert_path)?;
        Ok(Arc::new(TestCa {
            cert_path,
            key_path,
            cert_pem,
            _dir: dir,
        }))
    }

    /// Issues a server certificate for `localhost`, `127.0.0.1` and `::1`
    /// into `dir/<name>.crt` + `dir/<name>.key`; returns (cert, key) paths.
    pub fn issue_server_cert(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
        self.issue_server_cert_for(dir, name, "DNS:localhost,IP:127.0.0.1,IP:::1")
    }

    /// Like [`TestCa::issue_server_cert`], for the names in `subject_alt_names` (openssl's
    /// syntax: `DNS:name,IP:address`).
    pub fn issue_server_cert_for(
        &self,
        dir: &Path,
        name: &str,
        subject_alt_names: &str,
    ) -> Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let csr = dir.join(format!("{name}.csr"));
        let ext = dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\n\
             subjectAltName={subject_alt_names}\n"
            ),
        )?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-subj",
            "/CN=localhost",
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&csr)?,
        ])
        .context("generating server key + CSR")?;
        // Random serial: no shared .srl file to race on.
        let serial = format!("0x{:016x}", rand::thread_rng().gen::<u64>() >> 1);
        openssl(&[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "3650",
            "-set_serial",
            &serial,
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&self.cert_path)?,
            "-CAkey",
            path_str(&self.key_path)?,
            "-extfile",
            path_str(&ext)?,
            "-out",
            path_str(&cert)?,
        ])
        .context("signing server certificate")?;
        let _ = std::fs::remove_file(&csr);
        let _ = std::fs::remove_file(&ext);
        Ok((cert, key))
    }

    /// The CA certificate in PEM form.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// The CA as a reqwest root certificate.
    pub fn reqwest_certificate(&self) -> Result<reqwest::Certificate> {
        reqwest::Certificate::from_pem(&self.cert_pem).context("parsing test CA PEM")
    }

    /// An HTTPS client that trusts this CA (in addition to the built-in roots).
    pub fn https_client(&self) -> Result<reqwest::Client> {
        reqwest::Client::builder()
            .add_root_certificate(self.reqwest_certificate()?)
            .timeout(Duration::from_secs(30))
            .build()
            .context("building HTTPS client for the test CA")
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `openssl` (is the openssl CLI installed?)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed ({}): {}",
            args.first().unwrap_or(&""),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path: {}", p.display()))
}

// ---------------------------------------------------------------- options

/// How to start a [`Homeserver`].
#[derive(Clone)]
pub struct HsOptions {
    /// Appservice registration files (`app_service_config_files`).
    pub appservice_files: Vec<PathBuf>,
    /// CA issuing this server's federation cert and trusted for outbound
    /// federation. Servers that federate must share it.
    pub ca: Arc<TestCa>,
    /// `matrix_rtc.transports[0].livekit_service_url` (MSC4143
    /// `rtc/transports`); none configured when `None`.
    pub rtc_transport_url: Option<String>,
    /// Fixed (client HTTP, federation TLS) ports; free ports when `None`.
    pub ports: Option<(u16, u16)>,
    /// Deep-merged over the generated config (objects merge, everything else
    /// replaces), for test-specific Synapse settings.
    pub extra_config: Value,
}

impl HsOptions {
    pub fn new(ca: Arc<TestCa>) -> HsOptions {
        HsOptions {
            appservice_files: Vec::new(),
            ca,
            rtc_transport_url: None,
            ports: None,
            extra_config: Value::Null,
        }
    }

    /// Options with a fresh CA of their own (for a server that does not federate).
    pub fn with_new_ca() -> Result<HsOptions> {
        Ok(HsOptions::new(TestCa::new()?))
    }

    pub fn appservice(mut self, registration: impl Into<PathBuf>) -> HsOptions {
        self.appservice_files.push(registration.into());
        self
    }

    pub fn rtc_transport_url(mut self, url: impl Into<String>) -> HsOptions {
        self.rtc_transport_url = Some(url.into());
        self
    }

    pub fn ports(mut self, http: u16, federation: u16) -> HsOptions {
        self.ports = Some((http, federation));
        self
    }

    pub fn extra_config(mut self, config: Value) -> HsOptions {
        self.extra_config = config;
        self
    }
}

/// Picks `n` distinct free loopback ports (see [`super::conclave::next_free_port`]).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    (0..n)
        .map(|_| super::conclave::next_free_port().context("finding a free port"))
        .collect()
}

// ---------------------------------------------------------------- homeserver

/// A running Synapse. Killed (SIGKILL) on drop; its temp dir is removed then
/// too unless `CONCLAVE_KEEP_SYNAPSE_DIR=1`. If dropped while a test panics,
/// the tail of its log is printed to stderr.
pub struct Homeserver {
    /// `localhost:<fed port>`: the domain part of this server's user IDs.
    pub server_name: String,
    /// `http://127.0.0.1:<http port>`: client-server API (plain HTTP).
    pub client_url: String,
    /// `https://localhost:<fed port>`: federation API (TLS, test CA).
    pub fed_url: String,
    /// The server's directory (config, DB, logs, TLS cert).
    pub dir: PathBuf,
    pub http_port: u16,
    pub fed_port: u16,
    pub ca: Arc<TestCa>,
    /// `registration_shared_secret` of this server.
    pub registration_secret: String,
    python: PathBuf,
    config_path: PathBuf,
    child: Option<Child>,
    http: reqwest::Client,
    fed_http: reqwest::Client,
    tmp: Option<TempDir>,
}

impl Homeserver {
    /// Writes a fresh config into a new temp dir, starts Synapse and waits
    /// until its client and federation listeners answer.
    pub async fn start(opts: HsOptions) -> Result<Homeserver> {
        // Auto-picked ports can be taken between probing and Synapse binding
        // them; retry with new ones in that (rare) case.
        let attempts = if opts.ports.is_some() { 1 } else { 3 };
        let mut last_err = None;
        for _ in 0..attempts {
            match Homeserver::start_once(&opts).await {
                Ok(hs) => return Ok(hs),
                Err(e) if format!("{e:#}").contains("Address already in use") => {
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("Homeserver::start: no attempt made")))
    }

    async fn start_once(opts: &HsOptions) -> Result<Homeserver> {
        let python = venv()?.join("bin/python");
        let (http_port, fed_port) = match opts.ports {
            Some(p) => p,
            None => {
                let p = free_ports(2)?;
                (p[0], p[1])
            }
        };
        let tmp = tempfile::Builder::new()
            .prefix("conclave-synapse-")
            .tempdir()
            .context("creating Synapse temp dir")?;
        let dir = tmp.path().to_path_buf();
        let server_name = format!("localhost:{fed_port}");
        let registration_secret = random_hex(24);

        opts.ca.issue_server_cert(&dir, "tls")?;
        write_signing_key(&dir.join("signing.key"))?;
        std::fs::create_dir_all(dir.join("media_store"))?;
        std::fs::write(
            dir.join("log.config"),
            serde_json::to_string_pretty(&log_config(&dir))?,
        )?;
        let mut config = homeserver_config(
            &dir,
            &server_name,
            http_port,
            fed_port,
            opts,
            &registration_secret,
        )?;
        merge_json(&mut config, &opts.extra_config);
        let config_path = dir.join("homeserver.yaml");
        // JSON is valid YAML; Synapse reads it with yaml.safe_load.
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;

        let mut hs = Homeserver {
            server_name,
            client_url: format!("http://127.0.0.1:{http_port}"),
            fed_url: format!("https://localhost:{fed_port}"),
            dir,
            http_port,
            fed_port,
            ca: opts.ca.clone(),
            registration_secret,
            python,
            config_path,
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            fed_http: opts.ca.https_client()?,
            tmp: Some(tmp),
        };
        hs.spawn_and_wait().await?;
        Ok(hs)
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let started = Instant::now();
        self.spawn()?;
        let deadline = started + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "Synapse {} exited during startup ({status}).\n{}",
                    self.server_name,
                    self.diagnostics(40)
                );
            }
            if self.is_ready().await {
                eprintln!(
                    "synapse: {} ready in {:.1}s (client {}, federation {}, dir {})",
                    self.server_name,
                    started.elapsed().as_secs_f64(),
                    self.client_url,
                    self.fed_url,
                    self.dir.display()
                );
                return Ok(());
            }
            if Instant::now() >= deadline {
                let diag = self.diagnostics(40);
                self.kill_now();
                bail!(
                    "Synapse {} not ready after {}s.\n{diag}",
                    self.server_name,
                    READY_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))?;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stderr.log"))?;
        let child = Command::new(&self.python)
            .arg("-c")
            .arg(LAUNCHER)
            .arg("-c")
            .arg(&self.config_path)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", self.python.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// True when `/_matrix/client/versions` (HTTP) and
    /// `/_matrix/key/v2/server` (TLS, verified against the test CA) answer 200.
    pub async fn is_ready(&self) -> bool {
        let client = self
            .http
            .get(format!("{}/_matrix/client/versions", self.client_url))
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        if !matches!(client, Ok(r) if r.status().is_success()) {
            return false;
        }
        let fed = self
            .fed_http
            .get(format!("{}/_matrix/key/v2/server", self.fed_url))
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        matches!(fed, Ok(r) if r.status().is_success())
    }

    /// PID of the Synapse process, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops Synapse: SIGTERM, then SIGKILL if it has not exited after 15 s.
    /// No-op when already stopped.
    pub async fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            let term_sent = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            let deadline = if term_sent {
                Instant::now() + STOP_TIMEOUT
            } else {
                Instant::now() // no `kill` binary: go straight to SIGKILL
            };
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() >= deadline {
                    eprintln!(
                        "synapse: {} did not stop after SIGTERM, sending SIGKILL",
                        self.server_name
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.child = None;
    }

    /// Stops and starts again: same dir, ports, config, database and keys.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.spawn_and_wait().await
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Last `lines` lines of `homeserver.log`.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.dir.join("homeserver.log"), lines)
    }

    fn diagnostics(&self, lines: usize) -> String {
        let mut s = String::new();
        for f in ["stderr.log", "stdout.log", "homeserver.log"] {
            let path = self.dir.join(f);
            if !path.exists() {
                continue;
            }
            let t = tail_file(&path, lines);
            if !t.trim().is_empty() {
                let _ = write!(s, "--- {} (tail) ---\n{t}\n", path.display());
            }
        }
        if s.is_empty() {
            s.push_str("(no Synapse output)");
        }
        s
    }

    /// `@localpart:server_name`.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// Registers `localpart` through the shared-secret admin API
    /// (`/_synapse/admin/v1/register`). If the user exists, logs in with the
    /// same password instead (a new device). Password: `pw-<localpart>`.
    pub async fn register(&self, localpart: &str, admin: bool) -> Result<TestUser> {
        let url = format!("{}/_synapse/admin/v1/register", self.client_url);
        let nonce_resp: Value = self
            .http
            .get(&url)
            .send()
            .await?
            .error_for_status()
            .context("GET register nonce")?
            .json()
            .await?;
        let nonce = nonce_resp["nonce"]
            .as_str()
            .ok_or_else(|| anyhow!("no nonce in {nonce_resp}"))?;
        let password = password_for(localpart);
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(self.registration_secret.as_bytes())
            .expect("HMAC accepts any key length");
        mac.update(nonce.as_bytes());
        mac.update(b"\0");
        mac.update(localpart.as_bytes());
        mac.update(b"\0");
        mac.update(password.as_bytes());
        mac.update(b"\0");
        mac.update(if admin { b"admin" } else { b"notadmin" });
        let body = json!({
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": hex::encode(mac.finalize().into_bytes()),
        });
        let resp = self.http.post(&url).json(&body).send().await?;
        let status = resp.status();
        let j: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return user_from_login(&self.client_url, &j);
        }
        if j["errcode"] == "M_USER_IN_USE" {
            return self.login(localpart).await;
        }
        bail!(
            "registering {localpart} on {}: {status} {j}",
            self.server_name
        )
    }

    /// Password login for a user created by [`Homeserver::register`]; every
    /// call creates a new device.
    pub async fn login(&self, localpart: &str) -> Result<TestUser> {
        let resp = self
            .http
            .post(format!("{}/_matrix/client/v3/login", self.client_url))
            .json(&json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": localpart},
                "password": password_for(localpart),
            }))
            .send()
            .await?;
        let status = resp.status();
        let j: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("login {localpart} on {}: {status} {j}", self.server_name);
        }
        user_from_login(&self.client_url, &j)
    }

    /// Validates an OpenID token the way a remote server does:
    /// `GET <fed_url>/_matrix/federation/v1/openid/userinfo` over TLS (test
    /// CA). Returns the JSON body (`{"sub": "@user:server"}`) on 2xx.
    pub async fn openid_userinfo(&self, openid_access_token: &str) -> Result<Value> {
        let mut url = reqwest::Url::parse(&self.fed_url)?;
        url.path_segments_mut()
            .map_err(|_| anyhow!("bad fed url"))?
            .extend(["_matrix", "federation", "v1", "openid", "userinfo"]);
        url.query_pairs_mut()
            .append_pair("access_token", openid_access_token);
        let resp = self.fed_http.get(url).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("openid userinfo at {}: {status} {text}", self.fed_url);
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// HTTPS client trusting this server's test CA.
    pub fn federation_client(&self) -> reqwest::Client {
        self.fed_http.clone()
    }
}

impl Drop for Homeserver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "synapse: {} (dir {}) at test failure:\n{}",
                self.server_name,
                self.dir.display(),
                self.diagnostics(30)
            );
        }
        self.kill_now();
        let keep = std::env::var("CONCLAVE_KEEP_SYNAPSE_DIR").is_ok_and(|v| v == "1");
        if let Some(tmp) = self.tmp.take() {
            if keep {
                let path = tmp.keep();
                eprintln!("synapse: kept {}", path.display());
            }
        }
    }
}

/// Starts two federating servers sharing one new CA; hs1 gets the appservice
/// registrations.
pub async fn start_pair(appservice_files_hs1: Vec<PathBuf>) -> Result<(Homeserver, Homeserver)> {
    let ca = TestCa::new()?;
    let mut opts1 = HsOptions::new(ca.clone());
    opts1.appservice_files = appservice_files_hs1;
    start_pair_with(opts1, HsOptions::new(ca)).await
}

/// Starts two servers concurrently with their own options. They federate
/// only if both options carry the same [`TestCa`] (checked).
pub async fn start_pair_with(
    opts1: HsOptions,
    opts2: HsOptions,
) -> Result<(Homeserver, Homeserver)> {
    if !Arc::ptr_eq(&opts1.ca, &opts2.ca) {
        bail!("start_pair_with: both servers must share one Arc<TestCa> to federate");
    }
    let (hs1, hs2) = tokio::join!(Homeserver::start(opts1), Homeserver::start(opts2));
    Ok((hs1.context("starting hs1")?, hs2.context("starting hs2")?))
}

// ---------------------------------------------------------------- helpers

/// Runs `python -m synapse.app.homeserver` (argv follows), plus a watchdog
/// thread that exits the server when the test process that started it dies
/// without running `Drop` (SIGKILL, `process::exit`, a leaked value), so no
/// orphaned Synapse outlives the test binary.
const LAUNCHER: &str = r#"
import os, runpy, sys, threading, time
parent = os.getppid()
def watchdog():
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)
threading.Thread(target=watchdog, name="conclave-watchdog", daemon=True).start()
sys.argv[0] = "synapse.app.homeserver"
runpy.run_module("synapse.app.homeserver", run_name="__main__", alter_sys=True)
"#;

fn password_for(localpart: &str) -> String {
    format!("pw-{localpart}")
}

fn user_from_login(client_url: &str, j: &Value) -> Result<TestUser> {
    let field = |k: &str| {
        j[k].as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no {k} in login/register response {j}"))
    };
    Ok(TestUser::new(
        client_url,
        &field("user_id")?,
        &field("access_token")?,
        &field("device_id")?,
    ))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Writes a Synapse signing key (`ed25519 <key id> <unpadded base64 seed>`),
/// the same format `--generate-keys` produces, without a Python start-up.
fn write_signing_key(path: &Path) -> Result<()> {
    let mut seed = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut seed);
    let key_id = format!("a_{}", &random_hex(2));
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(seed);
    std::fs::write(path, format!("ed25519 {key_id} {b64}\n"))
        .with_context(|| format!("writing {}", path.display()))
}

fn tail_file(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Objects merge key by key; anything else in `overlay` (except null) replaces.
fn merge_json(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (_, Value::Null) => {}
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge_json(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn log_config(dir: &Path) -> Value {
    let level = std::env::var("CONCLAVE_SYNAPSE_LOG_LEVEL").unwrap_or_else(|_| "INFO".into());
    json!({
        "version": 1,
        "formatters": {"precise": {
            "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"
        }},
        "handlers": {"file": {
            "class": "logging.FileHandler",
            "formatter": "precise",
            "filename": dir.join("homeserver.log"),
            "encoding": "utf8",
        }},
        "loggers": {
            "synapse.storage.SQL": {"level": "WARNING"},
            "twisted": {"level": "WARNING"},
        },
        "root": {"level": level, "handlers": ["file"]},
        "disable_existing_loggers": false,
    })
}

fn homeserver_config(
    dir: &Path,
    server_name: &str,
    http_port: u16,
    fed_port: u16,
    opts: &HsOptions,
    registration_secret: &str,
) -> Result<Value> {
    let limit = json!({"per_second": 1000, "burst_count": 1000});
    let mut config = json!({
        "server_name": server_name,
        "public_baseurl": format!("http://127.0.0.1:{http_port}/"),
        "report_stats": false,
        "enable_metrics": false,
        "log_config": dir.join("log.config"),
        "signing_key_path": dir.join("signing.key"),
        "media_store_path": dir.join("media_store"),
        "database": {"name": "sqlite3", "args": {"database": dir.join("homeserver.db")}},
        "listeners": [
            // Client-server API: plain HTTP on loopback.
            {
                "port": http_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": false,
                "x_forwarded": false,
                "resources": [{"names": ["client"], "compress": false}],
            },
            // Federation API over TLS (test CA). The server name carries this
            // port, so peers connect here directly (no SRV / .well-known).
            // "openid" serves /_matrix/federation/v1/openid/userinfo.
            {
                "port": fed_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": true,
                "resources": [{"names": ["federation", "openid"], "compress": false}],
            },
        ],
        "tls_certificate_path": dir.join("tls.crt"),
        "tls_private_key_path": dir.join("tls.key"),
        "federation_verify_certificates": true,
        "federation_custom_ca_list": [&opts.ca.cert_path],
        // Outbound requests to loopback are blocked by default.
        "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
        // Fetch signing keys from the origin server, never from matrix.org.
        "trusted_key_servers": [],
        "suppress_key_server_warning": true,
        "enable_registration": false,
        "registration_shared_secret": registration_secret,
        "macaroon_secret_key": random_hex(24),
        "form_secret": random_hex(24),
        "presence": {"enabled": false},
        "url_preview_enabled": false,
        "rc_message": limit,
        "rc_registration": limit,
        "rc_login": {"address": limit, "account": limit, "failed_attempts": limit},
        "rc_joins": {"local": limit, "remote": limit},
        "rc_joins_per_room": limit,
        "rc_invites": {"per_room": limit, "per_user": limit, "per_issuer": limit},
        "rc_room_creation": limit,
        "rc_delayed_event_mgmt": limit,
        "rc_admin_redaction": limit,
        "rc_federation": {
            "window_size": 1000,
            "sleep_limit": 1000,
            "sleep_delay": 0,
            "reject_limit": 10000,
            "concurrent": 100,
        },
        // Default backoff for an unreachable destination is 10 min (doubling
        // up to 7 days); keep it short so restarting a server mid-test is fine.
        "federation": {
            "destination_min_retry_interval": "1s",
            "destination_max_retry_interval": "10s",
        },
        // Enables MSC4140 delayed events (there is no experimental flag).
        "max_event_delay_duration": "24h",
        "experimental_features": {
            // GET /_matrix/client/unstable/org.matrix.msc4143/rtc/transports
            "msc4143_enabled": true,
            // What Element Call's self-hosting guide enables: room summary,
            // sync state_after, sticky events ("matrix_2_0" membership).
            "msc3266_enabled": true,
            "msc4222_enabled": true,
            "msc4354_enabled": true,
        },
        "app_service_config_files": opts.appservice_files,
    });
    if let Some(url) = &opts.rtc_transport_url {
        config["matrix_rtc"] = json!({
            "transports": [{"type": "livekit", "livekit_service_url": url}]
        });
    }
    for f in &opts.appservice_files {
        if !f.is_absolute() || !f.exists() {
            bail!(
                "appservice registration must be an existing absolute path: {}",
                f.display()
            );
        }
    }
    Ok(config)
}
