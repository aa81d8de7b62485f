//! The deployment files: `docker-compose.yml`, everything it mounts from `deploy/`, and the
//! walkthrough `docs/element-call.md`. No Docker engine runs here, so the checks use the
//! parts that do not need one:
//!
//! * the compose file validates with `docker-compose config -q` (`CONCLAVE_COMPOSE`);
//! * the Synapse config holds what `conclave print-discovery` prints for the Conclave config;
//! * the Caddyfile, run by a real Caddy (`CONCLAVE_CADDY`) in front of stand-in upstreams,
//!   sends the public paths to Conclave and none of Conclave's internal routes;
//! * Element Call's `config.json` uses only keys Element Call documents;
//! * the `conclave` commands quoted in the walkthrough run.
//!
//! `CONCLAVE_COMPOSE` and `CONCLAVE_CADDY` come from `scripts/install-test-deps`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::support::conclave::binary;
use crate::support::synapse::free_ports;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const HINT: &str = "run `./scripts/test` (which installs it) or \
                    `eval \"$(scripts/install-test-deps)\"`";

fn root(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn yaml_as_json(rel: &str) -> Value {
    let yaml: serde_yaml::Value = serde_yaml::from_str(&read(rel)).unwrap();
    serde_json::to_value(yaml).unwrap()
}

fn compose() -> Value {
    yaml_as_json("docker-compose.yml")
}

fn synapse_config() -> Value {
    yaml_as_json("deploy/synapse/homeserver.yaml")
}

fn conclave_config() -> toml::Value {
    toml::from_str(&read("deploy/conclave/conclave.toml")).unwrap()
}

/// An executable named by `var` (set by `scripts/install-test-deps`), or a failure saying how
/// to get it.
fn tool(var: &str) -> PathBuf {
    let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
        panic!("{var} is not set: {HINT}");
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{var}={} does not exist: {HINT}",
        path.display()
    );
    path
}

/// `conclave print-discovery --json` for the compose stack's Conclave config.
/// Runs `conclave <args> --config deploy/conclave/conclave.toml` (no environment) and
/// asserts it succeeds; returns its stdout.
fn conclave_on_deploy_config(args: &[&str]) -> Vec<u8> {
    let out = Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(root("deploy/conclave/conclave.toml"))
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "conclave {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn discovery() -> Value {
    serde_json::from_slice(&conclave_on_deploy_config(&["print-discovery", "--json"])).unwrap()
}

/// The public origin: Synapse's `public_baseurl` without the trailing slash.
fn public_origin() -> String {
    synapse_config()["public_baseurl"]
        .as_str()
        .expect("public_baseurl")
        .trim_end_matches('/')
        .to_owned()
}

fn server_name() -> String {
    synapse_config()["server_name"]
        .as_str()
        .expect("server_name")
        .to_owned()
}

// ------------------------------------------------------------------------- compose

/// The compose tool accepts the file, and refuses a broken one (so a tool that accepts
/// anything cannot pass this test).
#[test]
fn compose_file_validates() {
    let exe = tool("CONCLAVE_COMPOSE");
    let out = Command::new(&exe)
        .current_dir(ROOT)
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} config -q: {}{}",
        exe.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("docker-compose.yml");
    std::fs::write(
        &broken,
        "services:\n  x:\n    image: busybox\n    depends_on:\n      y:\n        condition: service_healthy\n",
    )
    .unwrap();
    let out = Command::new(&exe)
        .arg("-f")
        .arg(&broken)
        .args(["config", "-q"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{} accepts a dependency on an undefined service: it does not validate",
        exe.display()
    );
}

#[test]
fn compose_services_images_and_mounts() {
    let doc = compose();
    let services = doc["services"].as_object().expect("services");
    for name in [
        "synapse-init",
        "synapse",
        "conclave",
        "caddy",
        "element-web",
        "element-call",
    ] {
        assert!(services.contains_key(name), "service {name}");
    }
    for (name, svc) in services {
        // Pinned images only.
        if let Some(image) = svc["image"].as_str() {
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                !tag.is_empty() && tag != "latest" && !tag.contains('/'),
                "{name}: image {image} is pinned to a version"
            );
        } else {
            assert!(svc.get("build").is_some(), "{name} has image or build");
        }
        // Every file or directory mounted from the repository exists.
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let spec = v.as_str().expect("short volume syntax");
            let source = spec.split(':').next().unwrap();
            if source.starts_with("./") {
                assert!(root(source).exists(), "{name}: mounted {source} exists");
            }
        }
    }
    let mounts = |svc: &str| -> Vec<String> {
        services[svc]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    for (svc, mount) in [
        (
            "conclave",
            "./deploy/conclave/conclave.toml:/etc/conclave/conclave.toml:ro",
        ),
        ("synapse", "./deploy/synapse:/config:ro"),
        ("caddy", "./deploy/caddy/Caddyfile:/etc/caddy/Caddyfile:ro"),
        (
            "element-web",
            "./deploy/element-web/config.json:/app/config.json:ro",
        ),
        (
            "element-call",
            "./deploy/element-call/config.json:/app/config.json:ro",
        ),
    ] {
        assert!(
            mounts(svc).iter().any(|m| m == mount),
            "{svc} mounts {mount}"
        );
    }
    let dockerfile = services["conclave"]["build"]["dockerfile"]
        .as_str()
        .expect("conclave is built from the Dockerfile");
    assert!(root(dockerfile).exists());

    // Element Call is the release the end-to-end test drives (npm element-call-embedded).
    let lock: Value = serde_json::from_str(&read("tests/element-call/package-lock.json")).unwrap();
    let embedded = lock["packages"]["node_modules/@element-hq/element-call-embedded"]["version"]
        .as_str()
        .expect("element-call-embedded in tests/element-call/package-lock.json");
    assert_eq!(
        services["element-call"]["image"].as_str(),
        Some(format!("ghcr.io/element-hq/element-call:v{embedded}").as_str())
    );

    // Conclave finds its own server's OpenID endpoint at Caddy: the server name is Caddy's
    // network alias, and Conclave trusts the CA root from Caddy's data volume.
    let aliases = &services["caddy"]["networks"]["default"]["aliases"];
    assert!(
        aliases
            .as_array()
            .is_some_and(|a| a.contains(&json!(server_name()))),
        "caddy has the network alias {}: {aliases}",
        server_name()
    );
    assert!(mounts("caddy").contains(&"caddy-data:/data".to_owned()));
    assert!(mounts("conclave").contains(&"caddy-data:/caddy-data:ro".to_owned()));
    assert_eq!(
        conclave_config()["matrix"]["extra_ca_file"].as_str(),
        Some("/caddy-data/caddy/pki/authorities/local/root.crt")
    );
}

#[test]
fn compose_conclave_config_is_valid() {
    conclave_on_deploy_config(&["check-config"]);
}

// ------------------------------------------------------------------------- Synapse

/// Where `homeserver.yaml` differs from the `synapse` block of `print-discovery`: every key it
/// prints must be there; a mapping must hold each of its entries with the same value (so
/// `experimental_features` may enable more flags than Conclave asks for).
fn discovery_mismatches(homeserver: &Value, synapse: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (key, want) in synapse.as_object().expect("synapse block") {
        let have = &homeserver[key];
        match want.as_object() {
            Some(entries) => {
                for (sub, v) in entries {
                    if &have[sub] != v {
                        out.push(format!("{key}.{sub}: want {v}, have {}", have[sub]));
                    }
                }
            }
            None if have != want => out.push(format!("{key}: want {want}, have {have}")),
            None => {}
        }
    }
    out
}

#[test]
fn synapse_config_holds_print_discovery() {
    let discovery = discovery();
    let homeserver = synapse_config();
    let mismatches = discovery_mismatches(&homeserver, &discovery["synapse"]);
    assert!(
        mismatches.is_empty(),
        "deploy/synapse/homeserver.yaml differs from `conclave print-discovery --config \
         deploy/conclave/conclave.toml`:\n  {}",
        mismatches.join("\n  ")
    );
    // The comparison itself can fail.
    let mut changed = homeserver.clone();
    changed["rc_delayed_event_mgmt"]["per_second"] = json!(1);
    changed["experimental_features"]
        .as_object_mut()
        .unwrap()
        .remove("msc4143_enabled");
    assert_eq!(
        discovery_mismatches(&changed, &discovery["synapse"]).len(),
        2
    );

    // The transport is the public origin, where Caddy routes /sfu/get and /get_token.
    assert_eq!(
        discovery["synapse"]["matrix_rtc"]["transports"][0]["livekit_service_url"],
        json!(public_origin())
    );
    assert_eq!(
        homeserver["app_service_config_files"],
        json!(["/data/appservice.yaml"])
    );
    // Synapse serves the OpenID userinfo endpoint Conclave checks tokens with.
    let resources = &homeserver["listeners"][0]["resources"][0]["names"];
    assert!(
        resources.as_array().unwrap().contains(&json!("openid")),
        "{resources}"
    );

    // One server name and one public origin across the configs.
    let conclave = conclave_config();
    assert_eq!(
        conclave["matrix"]["server_name"].as_str(),
        Some(server_name().as_str())
    );
    assert_eq!(
        conclave["livekit"]["public_url"].as_str(),
        Some(public_origin().replacen("http", "ws", 1).as_str())
    );
    for client in [
        "deploy/element-web/config.json",
        "deploy/element-call/config.json",
    ] {
        let c: Value = serde_json::from_str(&read(client)).unwrap();
        let hs = &c["default_server_config"]["m.homeserver"];
        assert_eq!(hs["base_url"], json!(public_origin()), "{client}");
        assert_eq!(hs["server_name"], json!(server_name()), "{client}");
    }
}

// ------------------------------------------------------------------------- Element Call

/// Keys of Element Call's `config.json` as documented by `src/config/ConfigOptions.ts` (the
/// file its self-hosting guide points to), as `(path, allowed sub-keys)`; `None` allows any
/// value below.
const EC_KEYS: &[(&str, Option<&[&str]>)] = &[
    (
        "",
        Some(&[
            "posthog",
            "sentry",
            "rageshake",
            "opentelemetry",
            "default_server_config",
            "livekit",
            "features",
            "ssla",
            "media_quality",
            "media_devices",
            "sync_disconnect_grace_period_ms",
            "matrix_rtc_mode",
            "matrix_rtc_session",
        ]),
    ),
    ("default_server_config", Some(&["m.homeserver"])),
    (
        "default_server_config.m.homeserver",
        Some(&["base_url", "server_name"]),
    ),
    ("livekit", Some(&["livekit_service_url"])),
    (
        "matrix_rtc_session",
        Some(&[
            "wait_for_key_rotation_ms",
            "delayed_leave_event_delay_ms",
            "delayed_leave_event_restart_local_timeout_ms",
            "delayed_leave_event_restart_ms",
            "network_error_retry_ms",
            "membership_event_expiry_ms",
        ]),
    ),
    ("posthog", None),
    ("sentry", None),
    ("rageshake", None),
    ("opentelemetry", None),
    ("features", None),
    ("media_quality", None),
    ("media_devices", None),
];

/// Keys of `v` (at `path`) that Element Call does not document.
fn undocumented_ec_keys(v: &Value, path: &str) -> Vec<String> {
    let Some(obj) = v.as_object() else {
        return Vec::new();
    };
    let allowed = EC_KEYS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a);
    let mut out = Vec::new();
    match allowed {
        Some(None) => {}
        Some(Some(keys)) => {
            for (k, sub) in obj {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if keys.contains(&k.as_str()) {
                    out.extend(undocumented_ec_keys(sub, &child));
                } else {
                    out.push(child);
                }
            }
        }
        // A value with no schema of its own (a scalar key) must not be an object.
        None => out.push(format!("{path} (unexpected object)")),
    }
    out
}

#[test]
fn element_call_config_uses_documented_keys() {
    let config: Value = serde_json::from_str(&read("deploy/element-call/config.json")).unwrap();
    let bad = undocumented_ec_keys(&config, "");
    assert!(bad.is_empty(), "undocumented Element Call keys: {bad:?}");
    assert!(
        ["legacy", "compatibility", "matrix_2_0"].contains(
            &config["matrix_rtc_mode"]
                .as_str()
                .unwrap_or("compatibility")
        ),
        "matrix_rtc_mode: {}",
        config["matrix_rtc_mode"]
    );
    // The check can fail.
    let mut wrong = config.clone();
    wrong["livekit"] = json!({"livekit_service_url": "x", "url": "y"});
    wrong["matrix_rtc_node"] = json!("compatibility");
    assert_eq!(
        undocumented_ec_keys(&wrong, ""),
        vec!["livekit.url".to_owned(), "matrix_rtc_node".to_owned()]
    );
}

// ------------------------------------------------------------------------- Caddy

/// What every route of Conclave's router is, from `src/http.rs`: the path templates of its
/// `.route(...)` calls.
fn conclave_routes() -> Vec<String> {
    let src = read("src/http.rs");
    let mut routes = Vec::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        let start = rest.find('"').unwrap() + 1;
        let end = start + rest[start..].find('"').unwrap();
        routes.push(rest[start..end].to_owned());
    }
    routes
}

/// Conclave's routes a browser needs; everything else stays off the public origin.
const PUBLIC_CONCLAVE: &[&str] = &[
    "/sfu/get",
    "/get_token",
    "/delegate_delayed_leave",
    "/healthz",
    "/rtc",
    "/rtc/validate",
    "/rtc/v1",
    "/rtc/v1/validate",
];

/// A stand-in upstream: answers every request with `x-upstream: <name>` and
/// `<name> <method> <path>`; `/rtc` and `/rtc/v1` accept a WebSocket and send the same line.
async fn upstream(name: &'static str) -> u16 {
    async fn tag(name: &'static str, req: Request) -> Response {
        let line = format!("{name} {} {}", req.method(), req.uri().path());
        ([("x-upstream", name)], line).into_response()
    }
    let ws = move |ws: WebSocketUpgrade, req: Request| async move {
        let line = format!("{name} WS {}", req.uri().path());
        ws.on_upgrade(move |mut socket| async move {
            let _ = socket.send(WsMessage::Text(line.into())).await;
        })
    };
    let mut app = Router::new();
    if name == "conclave" {
        app = app.route("/rtc", get(ws)).route("/rtc/v1", get(ws));
    }
    let app = app.fallback(move |req: Request| tag(name, req));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// A Caddy child process; killed on drop, its log printed if the test failed.
struct Caddy {
    child: Child,
    log: PathBuf,
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- caddy log ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// `text` with `from` replaced by `to`; `from` must occur.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "deploy/caddy/Caddyfile no longer contains {from:?}"
    );
    text.replace(from, to)
}

async fn wait_for_port(port: u16, caddy: &mut Caddy) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        if let Some(status) = caddy.child.try_wait().unwrap() {
            panic!("caddy exited with {status}");
        }
        assert!(Instant::now() < deadline, "caddy did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The request's upstream (`x-upstream`, or `-` when Caddy answered itself) and status.
async fn send(client: &reqwest::Client, method: &str, url: &str) -> (String, u16, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = client.request(method, url).send().await.unwrap();
    let upstream = r
        .headers()
        .get("x-upstream")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let status = r.status().as_u16();
    (upstream, status, r.text().await.unwrap_or_default())
}

/// Fills a route template (`{param}`, `{*rest}`) with sample values.
fn sample_path(template: &str) -> String {
    template
        .split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// deploy/caddy/Caddyfile, run by a real Caddy with the compose upstreams replaced by
/// stand-ins: the public paths reach Conclave (WebSockets included), nothing else of
/// Conclave's does, and the well-known and federation answers match the configs.
#[tokio::test]
async fn caddy_routes_public_paths_only() {
    let exe = tool("CONCLAVE_CADDY");
    let (conclave, synapse, web, call) = (
        upstream("conclave").await,
        upstream("synapse").await,
        upstream("element-web").await,
        upstream("element-call").await,
    );
    // Three distinct ports (free_port() thrice may return one port twice).
    let ports = free_ports(3).unwrap();
    let (public, ec, tls) = (ports[0], ports[1], ports[2]);
    let server = server_name();

    let mut text = read("deploy/caddy/Caddyfile");
    for (from, to) in [
        ("reverse_proxy conclave:8080", conclave),
        ("reverse_proxy synapse:8008", synapse),
        ("reverse_proxy element-web:80", web),
        ("reverse_proxy element-call:8080", call),
    ] {
        let verb = from.split(' ').next().unwrap();
        text = substitute(&text, from, &format!("{verb} 127.0.0.1:{to}"));
    }
    // Tests listen on loopback only.
    text = substitute(
        &text,
        "\tskip_install_trust\n",
        "\tskip_install_trust\n\tdefault_bind 127.0.0.1\n",
    );
    // Site addresses: the compose stack publishes 8080 and 8082 from the caddy container.
    text = substitute(&text, "\n:8080 {", &format!("\n:{public} {{"));
    text = substitute(&text, "\n:8082 {", &format!("\n:{ec} {{"));
    text = substitute(
        &text,
        &format!("\n{server} {{"),
        &format!("\n{server}:{tls} {{"),
    );

    let dir = tempfile::tempdir().unwrap();
    let caddyfile = dir.path().join("Caddyfile");
    std::fs::write(&caddyfile, text).unwrap();
    let log = dir.path().join("caddy.log");
    let data = dir.path().join("data");
    let child = Command::new(&exe)
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&caddyfile)
        .env_clear()
        .env("HOME", dir.path())
        // The caddy image's XDG_DATA_HOME is /data, the caddy-data volume.
        .env("XDG_DATA_HOME", &data)
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Caddy logs to stderr.
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut caddy = Caddy { child, log };
    for port in [public, ec, tls] {
        wait_for_port(port, &mut caddy).await;
    }

    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{public}");

    // Public Conclave paths reach Conclave with their path unchanged.
    let routes = conclave_routes();
    for want in ["/_conclave/admin/v1/calls", "/twirp/{*path}", "/metrics"] {
        assert!(routes.iter().any(|r| r == want), "{want} in {routes:?}");
    }
    for path in PUBLIC_CONCLAVE {
        assert!(
            routes.iter().any(|r| r == path),
            "{path} is a route of src/http.rs"
        );
    }
    for (method, path) in [
        ("POST", "/sfu/get"),
        ("OPTIONS", "/sfu/get"),
        ("POST", "/get_token"),
        ("OPTIONS", "/get_token"),
        ("POST", "/delegate_delayed_leave"),
        ("GET", "/healthz"),
        ("GET", "/rtc/validate"),
        ("GET", "/rtc/v1/validate"),
    ] {
        let (up, _, body) = send(&client, method, &format!("{base}{path}")).await;
        assert_eq!(up, "conclave", "{method} {path}");
        assert_eq!(body, format!("conclave {method} {path}"));
    }
    for path in ["/rtc", "/rtc/v1"] {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!(
            "ws://127.0.0.1:{public}{path}?access_token=t"
        ))
        .await
        .unwrap_or_else(|e| panic!("WebSocket {path} through caddy: {e}"));
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message")
            .expect("open")
            .unwrap();
        assert_eq!(
            msg.into_text().unwrap().as_str(),
            format!("conclave WS {path}")
        );
    }

    // Every other route of Conclave's router is unreachable from the public origin.
    let internal: Vec<&String> = routes
        .iter()
        .filter(|r| !PUBLIC_CONCLAVE.contains(&r.as_str()))
        .collect();
    assert!(internal.len() >= 10, "{internal:?}");
    for template in internal {
        let path = sample_path(template);
        for method in ["GET", "POST", "PUT"] {
            let (up, _, _) = send(&client, method, &format!("{base}{path}")).await;
            assert_ne!(up, "conclave", "{method} {path} must not reach Conclave");
        }
    }
    for path in [
        "/_conclave/admin/v1/calls",
        "/twirp/livekit.RoomService/ListRooms",
        "/metrics",
    ] {
        let (up, status, _) = send(&client, "POST", &format!("{base}{path}")).await;
        assert_eq!((up.as_str(), status), ("-", 404), "{path}");
    }

    // Synapse's client API (not its admin API), Element Web, Element Call.
    for path in ["/_matrix/client/versions", "/_synapse/client/pick_idp"] {
        assert_eq!(
            send(&client, "GET", &format!("{base}{path}")).await.0,
            "synapse"
        );
    }
    let admin = send(
        &client,
        "GET",
        &format!("{base}/_synapse/admin/v1/server_version"),
    )
    .await;
    assert_eq!((admin.0.as_str(), admin.1), ("-", 404));
    assert_eq!(
        send(&client, "GET", &format!("{base}/")).await.0,
        "element-web"
    );
    assert_eq!(
        send(&client, "GET", &format!("http://127.0.0.1:{ec}/room/x"))
            .await
            .0,
        "element-call"
    );

    // /.well-known/matrix/client: the homeserver plus print-discovery's well-known key.
    let r = client
        .get(format!("{base}/.well-known/matrix/client"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("*")
    );
    let served: Value = r.json().await.unwrap();
    let mut want = discovery()["well_known_client"].clone();
    want["m.homeserver"] = json!({"base_url": public_origin()});
    assert_eq!(served, want);

    // The TLS site of the server name, as Conclave's OpenID check meets it: a certificate from
    // the CA root at matrix.extra_ca_file, the well-known delegation, then userinfo.
    let ca_file = conclave_config()["matrix"]["extra_ca_file"]
        .as_str()
        .unwrap()
        .to_owned();
    let ca_path = data.join(ca_file.strip_prefix("/caddy-data/").unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ca_path.exists() {
        assert!(
            Instant::now() < deadline,
            "caddy wrote no {}",
            ca_path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_path).unwrap()).unwrap();
    let tls_client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve(&server, ([127, 0, 0, 1], tls).into())
        .build()
        .unwrap();
    let fed = format!("https://{server}:{tls}");
    let wk: Value = tls_client
        .get(format!("{fed}/.well-known/matrix/server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(wk, json!({"m.server": format!("{server}:443")}));
    let userinfo = send(
        &tls_client,
        "GET",
        &format!("{fed}/_matrix/federation/v1/openid/userinfo?access_token=t"),
    )
    .await;
    assert_eq!(userinfo.0, "synapse");
    assert_eq!(
        send(
            &tls_client,
            "GET",
            &format!("{fed}/_matrix/client/versions")
        )
        .await
        .0,
        "-"
    );
    drop(caddy);
}

// ------------------------------------------------------------------------- walkthrough

/// The shell commands in the fenced code blocks of `markdown`, continuation lines joined.
fn shell_commands(markdown: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut current = String::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            current.clear();
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.trim();
        if let Some(cont) = line.strip_suffix('\\') {
            current.push_str(cont);
            current.push(' ');
        } else {
            current.push_str(line);
            if !current.starts_with('#') && !current.is_empty() {
                commands.push(std::mem::take(&mut current));
            }
            current.clear();
        }
    }
    commands
}

/// The `conclave` arguments of a walkthrough command (after the `conclave` binary or compose
/// service name), up to a comment or shell operator.
fn conclave_args(command: &str, subcommand: &str) -> Option<Vec<String>> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let at = words
        .windows(2)
        .position(|w| w[0] == "conclave" && w[1] == subcommand)?;
    Some(
        words[at + 1..]
            .iter()
            .take_while(|w| !["#", "|", ">", "&&", ";"].contains(w))
            .map(|w| w.to_string())
            .collect(),
    )
}

/// The walkthrough's `generate-registration` and `print-discovery` commands, run against the
/// compose stack's files (container paths mapped to the repository and a temp data dir, as
/// the image's `CONCLAVE_DATA_DIR` does).
#[test]
fn walkthrough_commands_run() {
    let doc = read("docs/element-call.md");
    let commands = shell_commands(&doc);
    let data = tempfile::tempdir().unwrap();
    let map = |arg: &str| -> String {
        if arg == "/etc/conclave/conclave.toml" {
            root("deploy/conclave/conclave.toml").display().to_string()
        } else if let Some(rest) = arg.strip_prefix("/var/lib/conclave") {
            format!("{}{rest}", data.path().display())
        } else {
            arg.to_owned()
        }
    };
    let run = |args: &[String]| {
        let out = Command::new(binary())
            .args(args.iter().map(|a| map(a)))
            .env_clear()
            .env("CONCLAVE_DATA_DIR", data.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "conclave {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };

    let registrations: Vec<Vec<String>> = commands
        .iter()
        .filter_map(|c| conclave_args(c, "generate-registration"))
        .collect();
    assert!(
        !registrations.is_empty(),
        "docs/element-call.md quotes `conclave generate-registration`"
    );
    for args in &registrations {
        run(args);
        let flag = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .unwrap_or_else(|| panic!("{} without {name}", args.join(" ")))
                .clone()
        };
        // Synapse reaches Conclave on the compose network, not at the public origin.
        let url = flag("--url");
        assert_eq!(url, "http://conclave:8080");
        let written: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(map(&flag("--output"))).unwrap())
                .unwrap();
        assert_eq!(written["url"].as_str(), Some(url.as_str()));
    }

    let discoveries: Vec<Vec<String>> = commands
        .iter()
        .filter_map(|c| conclave_args(c, "print-discovery"))
        .collect();
    assert!(
        discoveries.iter().any(|a| a.contains(&"--json".to_owned())),
        "docs/element-call.md quotes `conclave print-discovery --json`: {discoveries:?}"
    );
    for args in &discoveries {
        let stdout = String::from_utf8(run(args)).unwrap();
        if args.contains(&"--json".to_owned()) {
            let printed: Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(printed, discovery());
        } else {
            assert!(stdout.contains("matrix_rtc:"), "{stdout}");
        }
    }
}

#[test]
fn shell_commands_parse_continuations() {
    let md = "text\n```sh\n# comment\ndocker compose run --rm conclave \\\n    print-discovery --json  # c\n```\n";
    let commands = shell_commands(md);
    assert_eq!(commands.len(), 1);
    assert_eq!(
        conclave_args(&commands[0], "print-discovery"),
        Some(vec!["print-discovery".to_owned(), "--json".to_owned()])
    );
}

// ------------------------------------------------------------------------- registration

#[test]
fn example_registration_matches_generated_shape() {
    let example: serde_yaml::Value = serde_yaml::from_str(&read("appservice.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["generate-registration", "--output", "-"])
        .env_clear()
        .env("CONCLAVE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let keys = |v: &serde_yaml::Value| -> BTreeSet<String> {
        v.as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(keys(&example), keys(&generated));
    assert_eq!(example["namespaces"], generated["namespaces"]);
}
