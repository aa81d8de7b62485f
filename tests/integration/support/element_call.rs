//! Element Call end to end: two ministries (hs1 + Conclave-1, hs2 + Conclave-2) federating on
//! loopback, and unmodified Element Call in headless Chromium inside the widget host of
//! `tests/element-call/` (driven by its `driver.mjs`).
//!
//! * [`Ministries::start`] sets up both ministries the way `docs/element-call.md` tells an
//!   operator to: `conclave generate-registration` for the appservice, `conclave
//!   print-discovery` merged into each Synapse's config (MSC4143 transports), each Conclave
//!   full-access only for its own server and subscribe-only for the other's users.
//! * [`EcDriver`] runs the pages and follows their events (`in_call`, `ban_observed`, …).
//!
//! Needs `CONCLAVE_EC_HOST` (node_modules with Element Call, matrix-js-sdk, matrix-widget-api,
//! esbuild, playwright-core) and `CONCLAVE_CHROMIUM`, both from `scripts/install-test-deps`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};
use tokio::task::JoinHandle;

use super::conclave::{Conclave, ConclaveOptions};
use super::lk_clients::Output;
use super::synapse::{free_ports, start_pair_with, Homeserver, HsOptions, TestCa};
use super::web::{chromium, spawn_node_driver};

const HINT: &str = "run `./scripts/test` (which installs it) or \
                    `eval \"$(scripts/install-test-deps)\"`";

/// Conclave-2's media address in cascading ministries (Conclave-1 keeps 127.0.0.1).
pub const CONCLAVE_2_MEDIA_IP: &str = "127.0.0.2";

/// The admin token both test Conclaves accept.
pub const ADMIN_TOKEN: &str = "ministry-admin";

/// `node_modules` of `tests/element-call/package-lock.json`, from `CONCLAVE_EC_HOST`.
pub fn ec_host_dir() -> Result<PathBuf> {
    let Some(dir) = std::env::var_os("CONCLAVE_EC_HOST").filter(|v| !v.is_empty()) else {
        bail!("CONCLAVE_EC_HOST is not set: {HINT}");
    };
    let dir = PathBuf::from(dir);
    for package in [
        "@element-hq/element-call-embedded",
        "matrix-js-sdk",
        "matrix-widget-api",
        "esbuild",
        "playwright-core",
    ] {
        if !dir.join("node_modules").join(package).is_dir() {
            bail!(
                "CONCLAVE_EC_HOST={} has no node_modules/{package}: {HINT}",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// `tests/element-call/driver.mjs`.
pub fn driver_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/element-call/driver.mjs")
}

/// Two ministries: each a Synapse with its own Conclave as appservice and RTC transport.
pub struct Ministries {
    pub hs1: Homeserver,
    pub hs2: Homeserver,
    pub c1: Conclave,
    pub c2: Conclave,
}

impl Ministries {
    /// Starts hs1 + hs2 (federating, one test CA) and Conclave-1 + Conclave-2, with tokens
    /// from Conclave's own endpoints (`livekit_service_url`).
    pub async fn start() -> Result<Ministries> {
        Self::start_with(false).await
    }

    /// As [`Ministries::start`]; with `msc4512`, each Synapse forwards MSC4195's
    /// `rtc/livekit` endpoints to its Conclave (`print-discovery --msc4512` merged into
    /// homeserver.yaml), and remote users keep the default `auth.remote_can_publish`, so that
    /// the federation twin alone must keep them from publishing.
    pub async fn start_with(msc4512: bool) -> Result<Ministries> {
        Self::start_opts(msc4512, false, None).await
    }

    /// As [`Ministries::start`], each Conclave listing the other ministry in `cascade.peers`
    /// with its URL (`docs/cascade.md`); Conclave-2's media on [`CONCLAVE_2_MEDIA_IP`].
    pub async fn start_cascading() -> Result<Ministries> {
        Self::start_opts(false, true, None).await
    }

    /// As [`Ministries::start_cascading`], Conclave-2 ending a relay whose mirror had no
    /// local subscriber for `secs` (`cascade.mirror_idle_secs`).
    pub async fn start_cascading_idle(secs: u64) -> Result<Ministries> {
        Self::start_opts(false, true, Some(secs)).await
    }

    async fn start_opts(
        msc4512: bool,
        cascade: bool,
        mirror_idle_secs: Option<u64>,
    ) -> Result<Ministries> {
        let ca = TestCa::new()?;
        let ports = free_ports(4)?;
        let prepare = |http: u16, fed: u16| -> Result<Conclave> {
            let server = format!("localhost:{fed}");
            let mut opts = ConclaveOptions::standalone();
            opts.homeserver_url = format!("http://127.0.0.1:{http}");
            opts.server_name = server.clone();
            opts.ca_file = Some(ca.cert_path.clone());
            let mut opts = opts
                // Full access (may create SFU rooms, publish) for this ministry's users only;
                // the other ministry's users may subscribe here and nothing else.
                .env(
                    "CONCLAVE_AUTH__FULL_ACCESS_HOMESERVERS",
                    &format!("[\"{server}\"]"),
                )
                .env("CONCLAVE_AUTH__REMOTE_CAN_SUBSCRIBE", "true")
                .env("CONCLAVE_ADMIN__TOKEN", ADMIN_TOKEN);
            if !msc4512 {
                opts = opts.env("CONCLAVE_AUTH__REMOTE_CAN_PUBLISH", "false");
            }
            Conclave::prepare(opts)
        };
        let mut c1 = prepare(ports[0], ports[1])?;
        let mut c2 = prepare(ports[2], ports[3])?;
        let hs_options = |c: &Conclave, http: u16, fed: u16| -> Result<HsOptions> {
            // What the walkthrough has the operator run: the registration, and the discovery
            // block pasted into homeserver.yaml.
            let registration = c.write_registration()?;
            let args: &[&str] = if msc4512 {
                &["print-discovery", "--json", "--msc4512"]
            } else {
                &["print-discovery", "--json"]
            };
            let out = c
                .command(args)
                .output()
                .context("running conclave print-discovery")?;
            if !out.status.success() {
                bail!(
                    "conclave print-discovery failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let discovery: Value = serde_json::from_slice(&out.stdout)
                .context("conclave print-discovery --json output")?;
            let transports = &discovery["synapse"]["matrix_rtc"]["transports"];
            if !msc4512 && transports[0]["livekit_service_url"] != json!(c.url) {
                bail!(
                    "print-discovery advertises {transports}, not this Conclave ({})",
                    c.url
                );
            }
            Ok(HsOptions::new(ca.clone())
                .ports(http, fed)
                .appservice(registration)
                .extra_config(discovery["synapse"].clone()))
        };
        let o1 = hs_options(&c1, ports[0], ports[1])?;
        let o2 = hs_options(&c2, ports[2], ports[3])?;
        let (hs1, hs2) = start_pair_with(o1, o2).await?;
        // Each lists the other as a cascade peer, with its URL (known once both are prepared).
        let peer_of = |c: &Conclave, fed: u16| {
            format!(
                "[{{server_name = \"localhost:{fed}\", url = \"{}\"}}]",
                c.url
            )
        };
        let (p1, p2) = if cascade {
            (peer_of(&c2, ports[3]), peer_of(&c1, ports[1]))
        } else {
            (String::new(), String::new())
        };
        let env = |p: &str| -> Vec<(&'static str, String)> {
            if p.is_empty() {
                Vec::new()
            } else {
                vec![("CONCLAVE_CASCADE__PEERS", p.to_owned())]
            }
        };
        let (e1, mut e2) = (env(&p1), env(&p2));
        if cascade {
            // Different loopback media addresses, so a page's selected candidate pairs say
            // which Conclave its media goes to.
            e2.push(("CONCLAVE_RTC__NODE_IPS", CONCLAVE_2_MEDIA_IP.to_owned()));
            if let Some(secs) = mirror_idle_secs {
                e2.push(("CONCLAVE_CASCADE__MIRROR_IDLE_SECS", secs.to_string()));
            }
        }
        let r1: Vec<(&str, &str)> = e1.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r2: Vec<(&str, &str)> = e2.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (r1, r2) = tokio::join!(c1.spawn_with_env(&r1), c2.spawn_with_env(&r2));
        r1.context("starting Conclave-1")?;
        r2.context("starting Conclave-2")?;
        Ok(Ministries { hs1, hs2, c1, c2 })
    }

    /// One line per Conclave: up (healthz answers) or down, for failure messages.
    pub async fn health(&self) -> String {
        let client = reqwest::Client::new();
        let mut out = Vec::new();
        for (name, c) in [
            ("Conclave-1 (hs1)", &self.c1),
            ("Conclave-2 (hs2)", &self.c2),
        ] {
            let r = client
                .get(format!("{}/healthz", c.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            out.push(match r {
                Ok(r) if r.status().is_success() => format!("{name} at {} is up", c.url),
                Ok(r) => format!("{name} at {} answers healthz with {}", c.url, r.status()),
                Err(e) => format!("{name} at {} is DOWN ({e})", c.url),
            });
        }
        out.join("; ")
    }
}

/// `GET /_conclave/admin/v1/calls/{room}` on `c`: the call's Matrix and SFU views.
pub async fn admin_call(c: &Conclave, room: &str) -> Result<Value> {
    let r = reqwest::Client::new()
        .get(format!("{}/_conclave/admin/v1/calls/{room}", c.url))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await?;
    if !status.is_success() {
        bail!("admin API of {} for {room}: {status} {body}", c.url);
    }
    Ok(body)
}

/// One page of the driver's config.
#[derive(Clone, Debug)]
pub struct EcPage {
    pub label: String,
    pub hs: String,
    pub token: String,
    pub user: String,
    pub device: String,
    pub room: String,
    pub intent: String,
    pub e2ee: bool,
}

/// Element Call's MatrixRTC mode (its config.json `matrix_rtc_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RtcMode {
    /// The default: `org.matrix.msc3401.call.member` state events, `/sfu/get`.
    Compatibility,
    /// MSC4354 sticky `rtc.member` events, `/get_token`, hashed identities.
    Matrix20,
}

impl RtcMode {
    /// The config.json value.
    pub fn as_str(self) -> &'static str {
        match self {
            RtcMode::Compatibility => "compatibility",
            RtcMode::Matrix20 => "matrix_2_0",
        }
    }
}

/// A running `driver.mjs`: Chromium with one Element Call page per user. Killed on drop.
pub struct EcDriver {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<Mutex<Output>>,
    _readers: Vec<JoinHandle<()>>,
    consumed: usize,
    _config: tempfile::NamedTempFile,
}

impl EcDriver {
    /// Starts the driver: it serves the host and Element Call, opens the pages in order (the
    /// first starts the call) and reports `in_call` once every page plays the other's media.
    pub fn spawn(
        pages: &[EcPage],
        mode: RtcMode,
        timeout_s: u64,
        screenshot_dir: &std::path::Path,
    ) -> Result<Self> {
        let deps = ec_host_dir()?;
        let exe = chromium()?;
        let config = json!({
            "timeout_s": timeout_s,
            "screenshot_dir": screenshot_dir,
            "matrix_rtc_mode": mode.as_str(),
            "pages": pages.iter().map(|p| json!({
                "label": p.label, "hs": p.hs, "token": p.token, "user": p.user,
                "device": p.device, "room": p.room, "intent": p.intent, "e2ee": p.e2ee,
            })).collect::<Vec<_>>(),
        });
        let mut driver = spawn_node_driver(
            &driver_script(),
            &config,
            &[],
            &[("CONCLAVE_EC_HOST", &deps), ("CONCLAVE_CHROMIUM", &exe)],
        )?;
        Ok(EcDriver {
            stdin: driver.child.stdin.take(),
            child: driver.child,
            output: driver.output,
            _readers: driver.readers,
            consumed: 0,
            _config: driver.config,
        })
    }

    /// Sends one command line (`{"cmd": …}`).
    pub async fn send(&mut self, cmd: Value) -> Result<()> {
        let stdin = self.stdin.as_mut().context("driver stdin closed")?;
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .context("writing to the driver")?;
        stdin.flush().await?;
        Ok(())
    }

    /// Waits for the next event `name`. An `error` event from the driver, its exit, or the
    /// timeout fail with what the driver said.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let out = self.output.lock().unwrap_or_else(|p| p.into_inner());
                let mut seen = out.events.iter().enumerate().skip(self.consumed);
                if let Some((i, e)) =
                    seen.find(|(_, e)| e["event"] == name || e["event"] == "error")
                {
                    let e = e.clone();
                    drop(out);
                    self.consumed = i + 1;
                    if e["event"] == "error" && name != "error" {
                        bail!(
                            "Element Call driver failed while waiting for {name:?}: {}\n{}",
                            e["message"],
                            serde_json::to_string_pretty(&e).unwrap_or_default()
                        );
                    }
                    return Ok(e);
                }
                if out.stdout_closed {
                    bail!(
                        "Element Call driver exited without {name:?}; stderr tail:\n{}",
                        out.stderr_tail()
                    );
                }
            }
            if Instant::now() >= deadline {
                let out = self.output.lock().unwrap_or_else(|p| p.into_inner());
                bail!(
                    "Element Call driver did not report {name:?} within {timeout:?}; events: {}\nstderr tail:\n{}",
                    Value::Array(out.events.clone()),
                    out.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks the driver to close Chromium and exit (bounded; killed otherwise).
    pub async fn quit(mut self) {
        let _ = self.send(json!({"cmd": "quit"})).await;
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
    }
}
