//! The real-client tooling itself, without an SFU: the Python and Node LiveKit
//! clients start, talk to loopback endpoints that refuse them, report through
//! JSON and exit codes, and the Rust token minter makes tokens `livekit-api`
//! accepts. Each test takes a second or less. (Media through the SFU: media.rs.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::conclave::free_port;
use crate::support::lk_clients::{
    lk_python, mint_token, NodePublishSpec, NodePublisher, PyClient, PyClientSpec,
};

const KEY: &str = "devkey";
const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";
/// Generous bounds: the clients fail within a second here, but CI may be busy.
const CLIENT_DEADLINE: Duration = Duration::from_secs(30);
const FAST: Duration = Duration::from_secs(10);

/// A loopback HTTP server that records each request head and answers with
/// `status` (or, with `None`, accepts and never answers).
struct FakeSignalServer {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeSignalServer {
    async fn start(status: Option<&'static str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            let mut held: Vec<TcpStream> = Vec::new();
            while let Ok((mut sock, _)) = listener.accept().await {
                let Some(status) = status else {
                    held.push(sock); // hang: no HTTP answer at all
                    continue;
                };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let head = read_head(&mut sock).await;
                    recorded.lock().unwrap().push(head);
                    let body = "unauthorized";
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(response.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Self {
            port,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeSignalServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_head(sock: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn token(identity: &str) -> String {
    mint_token(KEY, SECRET, "tooling-room", identity, json!({}), 600)
}

#[tokio::test]
async fn py_client_reports_connect_refused_with_exit_2() {
    let url = format!("ws://127.0.0.1:{}", free_port());
    let mut spec = PyClientSpec::new(url, token("alice"), "alice");
    spec.timeout_s = 15.0;
    let started = Instant::now();
    let mut client = PyClient::spawn(spec).unwrap();

    // The client streams events; one that never comes is an error naming what did.
    let err = client
        .wait_event("connected", CLIENT_DEADLINE)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ended without event"), "{err}");
    assert!(err.contains("connect_failed"), "{err}");

    let report = client.wait(CLIENT_DEADLINE).await.unwrap();
    report.assert_exit(2);
    assert_eq!(report.summary["connected"], false, "{}", report.describe());
    assert_eq!(report.summary["result"], "connect_failed");
    assert_eq!(report.summary["exit_code"], 2);
    assert_eq!(report.summary["label"], "alice");
    assert!(report.summary["error"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    assert_eq!(report.summary["remote"], json!({}));
    assert!(
        started.elapsed() < FAST,
        "took {:?}: a refused connect should fail fast",
        started.elapsed()
    );
}

#[tokio::test]
async fn py_client_sends_bearer_token_on_both_signalling_paths_and_exits_2_on_401() {
    // (dual_pc, first request path, signalling label in the summary)
    for (dual_pc, path, signalling) in [
        (None, "/rtc/v1?", "default"),
        (Some(false), "/rtc/v1?", "single-pc"),
        (Some(true), "/rtc?", "dual-pc"),
    ] {
        let server = FakeSignalServer::start(Some("401 Unauthorized")).await;
        let jwt = token("bob");
        let mut spec = PyClientSpec::new(server.url(), jwt.clone(), "bob");
        spec.dual_pc = dual_pc;
        spec.timeout_s = 15.0;
        let started = Instant::now();
        let mut client = PyClient::spawn(spec).unwrap();
        let connecting = client
            .wait_event("connecting", CLIENT_DEADLINE)
            .await
            .unwrap();
        assert_eq!(connecting["label"], "bob");
        assert_eq!(connecting["signalling"], signalling);

        let report = client.wait(CLIENT_DEADLINE).await.unwrap();
        report.assert_exit(2);
        let error = report.summary["error"].as_str().unwrap_or_default();
        assert!(error.contains("401"), "{}", report.describe());
        assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
        let names: Vec<&str> = report
            .events
            .iter()
            .filter_map(|e| e["event"].as_str())
            .collect();
        assert_eq!(names, ["connecting", "connect_failed"]);

        let requests = server.requests();
        let first = requests.first().expect("the client made a request");
        assert!(
            first.starts_with(&format!("GET {path}")),
            "{signalling}: first request was {first}"
        );
        assert_eq!(
            header(first, "authorization"),
            Some(format!("Bearer {jwt}").as_str()),
            "{first}"
        );
    }
}

#[tokio::test]
async fn py_client_leaves_on_sigterm_while_connecting() {
    let server = FakeSignalServer::start(None).await;
    let mut spec = PyClientSpec::new(server.url(), token("carol"), "carol");
    spec.timeout_s = 60.0;
    let mut client = PyClient::spawn(spec).unwrap();
    client
        .wait_event("connecting", CLIENT_DEADLINE)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    client.terminate().unwrap();
    let report = client.wait(CLIENT_DEADLINE).await.unwrap();
    report.assert_exit(2);
    assert_eq!(report.summary["error"], "interrupted by a signal");
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn py_client_rejects_bad_usage_with_exit_64() {
    let mut spec = PyClientSpec::new("ws://127.0.0.1:9", token("dave"), "dave");
    spec.send_data = Some("sometimes".into());
    let report = PyClient::spawn(spec)
        .unwrap()
        .wait(CLIENT_DEADLINE)
        .await
        .unwrap();
    report.assert_exit(64);
    assert_eq!(report.summary, Value::Null);
    assert!(
        report.stderr_tail.contains("--send-data"),
        "{}",
        report.describe()
    );
}

#[tokio::test]
async fn node_publisher_sends_bearer_token_and_exits_2_on_401() {
    let server = FakeSignalServer::start(Some("401 Unauthorized")).await;
    let jwt = token("erin");
    let mut spec = NodePublishSpec::new(server.url(), jwt.clone(), "erin");
    spec.duration_s = 2.0;
    let started = Instant::now();
    let mut publisher = NodePublisher::spawn(spec).unwrap();
    let connecting = publisher
        .wait_event("connecting", CLIENT_DEADLINE)
        .await
        .unwrap();
    assert_eq!(connecting["label"], "erin");
    let report = publisher.wait(CLIENT_DEADLINE).await.unwrap();
    report.assert_exit(2);
    assert_eq!(report.summary["event"], "done");
    assert_eq!(report.summary["connected"], false);
    assert_eq!(report.summary["result"], "connect_failed");
    let error = report.summary["error"].as_str().unwrap_or_default();
    assert!(error.contains("401"), "{}", report.describe());
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());

    let requests = server.requests();
    let first = requests.first().expect("the publisher made a request");
    assert!(first.starts_with("GET /rtc/v1?"), "{first}");
    assert_eq!(
        header(first, "authorization"),
        Some(format!("Bearer {jwt}").as_str())
    );
}

#[tokio::test]
async fn node_publisher_reports_connect_refused_with_exit_2() {
    let url = format!("ws://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let report = NodePublisher::spawn(NodePublishSpec::new(url, token("frank"), "frank"))
        .unwrap()
        .wait(CLIENT_DEADLINE)
        .await
        .unwrap();
    report.assert_exit(2);
    assert_eq!(report.summary["result"], "connect_failed");
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn minted_tokens_verify_with_livekit_api() {
    let jwt = mint_token(
        KEY,
        SECRET,
        "room-a",
        "@alice:example.org:DEVICE",
        json!({"canPublish": false, "canUpdateOwnMetadata": true}),
        600,
    );

    // Header and claims as the official minter writes them.
    let header = jsonwebtoken::decode_header(&jwt).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&[KEY]);
    let claims = jsonwebtoken::decode::<Value>(
        &jwt,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], "@alice:example.org:DEVICE");
    assert_eq!(claims["name"], "@alice:example.org:DEVICE");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["nbf"].as_i64().unwrap(),
        600
    );
    assert_eq!(
        claims["video"],
        json!({"room": "room-a", "roomJoin": true, "canPublish": false, "canUpdateOwnMetadata": true})
    );

    // And livekit-api's own verifier (what the SDKs' server side uses) accepts it.
    let out = tokio::process::Command::new(lk_python().unwrap())
        .args([
            "-c",
            "import dataclasses, json, sys\n\
             from livekit import api\n\
             c = api.TokenVerifier(sys.argv[1], sys.argv[2]).verify(sys.argv[3])\n\
             print(json.dumps(dataclasses.asdict(c)))",
            KEY,
            SECRET,
            &jwt,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "TokenVerifier failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verified["identity"], "@alice:example.org:DEVICE");
    assert_eq!(verified["video"]["room"], "room-a");
    assert_eq!(verified["video"]["room_join"], true);
    assert_eq!(verified["video"]["can_publish"], false);
    assert_eq!(verified["video"]["can_update_own_metadata"], true);
}
