//! Outbound federation requests against hostile homeservers started by the tests on loopback:
//! huge bodies, redirects elsewhere, loopback destinations with the default configuration,
//! floods of bogus server names, floods of token requests naming one server (rate limited),
//! and what a remote failure does to Conclave's own error count.
//!
//! Loopback is the only place tests may send to, so every Conclave here runs with
//! `auth.allow_private_federation = true` (the harness default) except the one checking that
//! the default refuses.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave::auth::openid::{OpenIdVerifier, DESTINATION_CAPACITY};
use conclave::auth::AuthError;
use conclave::plumbing::{DestinationPolicy, HttpClients};
use futures_util::StreamExt;
use reqwest::StatusCode;
use ruma::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::TlsAcceptor;

use crate::support::conclave::{free_port, post_json as post, Conclave, ConclaveOptions};
use crate::support::synapse::TestCa;

const MIB: u64 = 1024 * 1024;
/// Written into error bodies by hostile servers: must never reach Conclave's callers.
const UPSTREAM_SECRET: &str = "UPSTREAM-DETAIL-7f3a";

/// What a hostile homeserver answers to every request.
#[derive(Clone)]
enum Answer {
    /// 200 with a chunked body of this many bytes, generated while it is sent.
    Endless(u64),
    /// A redirect to this URL.
    Redirect(String),
    /// This status with a body naming [`UPSTREAM_SECRET`].
    Status(u16),
}

/// A hostile homeserver on a loopback port: counts the connections it accepted and the body
/// bytes it managed to send.
struct Hostile {
    port: u16,
    connections: Arc<AtomicUsize>,
    body_sent: Arc<AtomicU64>,
}

impl Hostile {
    /// Speaks HTTPS with a certificate of `ca` (for `localhost`, `127.0.0.1`, `::1`).
    async fn tls(ca: &TestCa, answer: Answer) -> Hostile {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.issue_server_cert(dir.path(), "hostile").unwrap();
        let cert = rustls::pki_types::CertificateDer::from_pem_slice(&std::fs::read(cert).unwrap())
            .unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(&std::fs::read(key).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        Self::start(Some(TlsAcceptor::from(Arc::new(config))), answer).await
    }

    /// Accepts TCP and counts; answers nothing useful (for "was anything sent there?").
    async fn plain() -> Hostile {
        Self::start(None, Answer::Status(500)).await
    }

    async fn start(tls: Option<TlsAcceptor>, answer: Answer) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let body_sent = Arc::new(AtomicU64::new(0));
        let (seen, sent) = (connections.clone(), body_sent.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                let (tls, answer, sent) = (tls.clone(), answer.clone(), sent.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve(stream, answer, sent).await;
                            }
                        }
                        None => serve(tcp, answer, sent).await,
                    }
                });
            }
        });
        Hostile {
            port,
            connections,
            body_sent,
        }
    }

    fn server_name(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Reads one request head and answers it.
async fn serve<S>(mut stream: S, answer: Answer, sent: Arc<AtomicU64>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    match answer {
        Answer::Endless(total) => {
            let start = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         transfer-encoding: chunked\r\n\r\n";
            if stream.write_all(start.as_bytes()).await.is_err() {
                return;
            }
            // A JSON string that never ends: `{"sub":"xxxx…`.
            let first = b"{\"sub\":\"";
            let filler = vec![b'x'; 64 * 1024];
            let mut done = 0u64;
            while done < total {
                let n = (total - done).min(filler.len() as u64) as usize;
                let mut frame = format!("{n:x}\r\n").into_bytes();
                if done == 0 {
                    frame.extend_from_slice(first);
                    frame.extend_from_slice(&filler[first.len()..n]);
                } else {
                    frame.extend_from_slice(&filler[..n]);
                }
                frame.extend_from_slice(b"\r\n");
                if stream.write_all(&frame).await.is_err() {
                    return;
                }
                done += n as u64;
                sent.store(done, Ordering::SeqCst);
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
        Answer::Redirect(location) => {
            let answer =
                format!("HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n");
            let _ = stream.write_all(answer.as_bytes()).await;
        }
        Answer::Status(status) => {
            let body = format!("{{\"errcode\":\"M_UNKNOWN\",\"error\":\"{UPSTREAM_SECRET}\"}}");
            let answer = format!(
                "HTTP/1.1 {status} Whatever\r\ncontent-type: application/json\r\n\
                 connection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    }
    let _ = stream.shutdown().await;
}

/// A `/get_token` body whose OpenID token names `server`.
fn token_request(server: &str) -> Value {
    json!({
        "room_id": "!r:localhost", "slot_id": "m.call#ROOM",
        "openid_token": {"access_token": "t", "token_type": "Bearer",
                         "matrix_server_name": server, "expires_in": 3600},
        "member": {"id": "m", "claimed_user_id": format!("@u:{server}"),
                   "claimed_device_id": "D"},
    })
}

/// A Conclave trusting `ca` for federation, with private destinations allowed (the harness).
async fn conclave_trusting(ca: &TestCa) -> Conclave {
    let mut opts = ConclaveOptions::standalone();
    opts.ca_file = Some(ca.cert_path.clone());
    Conclave::start(opts).await.unwrap()
}

/// The caller learns which server failed, never what it said.
fn assert_no_upstream_detail(body: &Value) {
    let text = body.to_string();
    assert!(!text.contains(UPSTREAM_SECRET), "{text}");
    assert!(!text.contains("xxxxxxxx"), "{text}");
}

/// A remote failure is a gateway error of the remote's, not Conclave's internal error; a huge
/// userinfo body is cut off at the cap while it streams, without growing Conclave's memory.
#[tokio::test]
async fn hostile_userinfo_answers_are_cut_off_and_not_counted_as_internal_errors() {
    let ca = TestCa::new().unwrap();
    let c = conclave_trusting(&ca).await;
    let internal = "conclave_http_internal_errors_total";
    let upstream = "conclave_http_upstream_errors_total";

    // A homeserver failing with 500 (also warms up the federation client before measuring).
    let failing = Hostile::tls(&ca, Answer::Status(500)).await;
    let (s, b) = post(&c, "/get_token", &token_request(&failing.server_name())).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{b}");
    assert_eq!(b["errcode"], "M_CONNECTION_FAILED");
    assert!(b["error"]
        .as_str()
        .unwrap()
        .contains(&failing.server_name()));
    // (The server's name is in the error: its port may well contain "500".)
    let said = b["error"]
        .as_str()
        .unwrap()
        .replace(&failing.server_name(), "");
    assert!(!said.contains("500"), "{b}");
    assert_no_upstream_detail(&b);
    // One refusing the token with 401: the caller gets 401 without the server's words.
    let refusing = Hostile::tls(&ca, Answer::Status(401)).await;
    let (s, b) = post(&c, "/get_token", &token_request(&refusing.server_name())).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let said = b["error"]
        .as_str()
        .unwrap()
        .replace(&refusing.server_name(), "");
    assert!(!said.contains("401"), "{b}");
    assert_no_upstream_detail(&b);
    assert_eq!(c.metric(internal).await.unwrap(), 0);
    assert_eq!(c.metric(upstream).await.unwrap(), 1);

    // 100 MiB of userinfo, streamed.
    let huge = Hostile::tls(&ca, Answer::Endless(100 * MIB)).await;
    let peak_before = c.peak_rss_kb().unwrap();
    let started = Instant::now();
    let (s, b) = post(&c, "/get_token", &token_request(&huge.server_name())).await;
    let took = started.elapsed();
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{b}");
    assert_eq!(b["errcode"], "M_CONNECTION_FAILED");
    assert!(b["error"].as_str().unwrap().contains("larger"), "{b}");
    assert_no_upstream_detail(&b);
    let peak_after = c.peak_rss_kb().unwrap();
    let growth_mb = peak_after.saturating_sub(peak_before) / 1024;
    assert!(
        growth_mb < 20,
        "peak RSS grew by {growth_mb} MB ({peak_before} kB -> {peak_after} kB)"
    );
    // Conclave stopped reading long before the end (socket buffers hold a few MiB at most).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = huge.body_sent.load(Ordering::SeqCst);
    eprintln!(
        "100 MiB userinfo: refused in {took:?}, peak RSS {peak_before} kB -> {peak_after} kB, \
         {sent} bytes sent before Conclave hung up"
    );
    assert!(sent < 20 * MIB, "the hostile server sent {sent} bytes");
    assert!(took < Duration::from_secs(5), "{took:?}");

    assert_eq!(c.metric(internal).await.unwrap(), 0, "{}", c.logs());
    assert_eq!(c.metric(upstream).await.unwrap(), 2);
    assert!(c.metric("conclave_tokens_refused_total").await.unwrap() >= 3);
}

/// Redirects are followed only to `https` on the same host and port: a homeserver sending the
/// lookup to another host or to plain HTTP (an internal service, say) gets nothing sent there.
#[tokio::test]
async fn redirects_to_other_hosts_or_plain_http_are_refused() {
    let ca = TestCa::new().unwrap();
    let c = conclave_trusting(&ca).await;
    let target = Hostile::tls(&ca, Answer::Status(200)).await;
    let plain_target = Hostile::plain().await;
    let path = "/_matrix/federation/v1/openid/userinfo?access_token=t";
    for location in [
        // Another host (the certificate is valid for it too).
        format!("https://localhost:{}{path}", target.port),
        // Another port of the same host.
        format!("https://127.0.0.1:{}{path}", target.port),
        // Plain HTTP.
        format!("http://127.0.0.1:{}/internal", plain_target.port),
    ] {
        let redirecting = Hostile::tls(&ca, Answer::Redirect(location.clone())).await;
        let (s, b) = post(&c, "/get_token", &token_request(&redirecting.server_name())).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "{location}: {b}");
        assert!(b["error"].as_str().unwrap().contains("redirect"), "{b}");
        assert!(!b["error"].as_str().unwrap().contains(&location), "{b}");
        assert!(redirecting.connections() >= 1, "{location}");
    }
    assert_eq!(
        target.connections(),
        0,
        "followed a redirect to another destination"
    );
    assert_eq!(
        plain_target.connections(),
        0,
        "followed a redirect to http://"
    );
    assert_eq!(
        c.metric("conclave_http_internal_errors_total")
            .await
            .unwrap(),
        0
    );
}

/// By default loopback destinations are refused, whether named by IP literal or by a DNS name
/// resolving there, and nothing is sent to them.
#[tokio::test]
async fn loopback_destinations_are_refused_by_default() {
    let hostile = Hostile::plain().await;
    let c = Conclave::start(
        ConclaveOptions::standalone().env("CONCLAVE_AUTH__ALLOW_PRIVATE_FEDERATION", "false"),
    )
    .await
    .unwrap();
    for server in [
        format!("127.0.0.1:{}", hostile.port),
        format!("127.0.0.2:{}", hostile.port),
        format!("[::1]:{}", hostile.port),
        format!("localhost:{}", hostile.port),
        format!("[::ffff:127.0.0.1]:{}", hostile.port),
    ] {
        let (s, b) = post(&c, "/get_token", &token_request(&server)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{server}: {b}");
        assert_eq!(b["errcode"], "M_FORBIDDEN");
        assert!(
            b["error"]
                .as_str()
                .unwrap()
                .contains("not an allowed federation destination"),
            "{b}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        hostile.connections(),
        0,
        "a refused destination was contacted"
    );
    assert_eq!(
        c.metric("conclave_http_internal_errors_total")
            .await
            .unwrap(),
        0
    );
}

/// 100 000 different bogus homeservers (IP literals on a closed loopback port: connection
/// refused at once, no DNS, no real network) leave the per-server tables bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_homeservers_leave_the_per_server_state_bounded() {
    const SERVERS: u32 = 100_000;
    const IN_FLIGHT: usize = 64;
    let verifier = Arc::new(
        OpenIdVerifier::new(
            &HttpClients::default(),
            Duration::from_secs(2),
            DestinationPolicy::new(true),
        )
        .unwrap(),
    );
    let closed = free_port();
    let started = Instant::now();
    let most = Arc::new(AtomicUsize::new(0));
    let unreachable = Arc::new(AtomicUsize::new(0));
    futures_util::stream::iter(0..SERVERS)
        .map(|i| {
            let (verifier, most, unreachable) =
                (verifier.clone(), most.clone(), unreachable.clone());
            async move {
                let [_, a, b, c] = (0x7f00_0000 | (i + 1)).to_be_bytes();
                let name = format!("127.{a}.{b}.{c}:{closed}");
                let server = ServerName::parse(&name).unwrap();
                let result = verifier
                    .verify(&server, "t", None, std::time::Instant::now())
                    .await;
                if matches!(result, Err(AuthError::HomeserverUnreachable(_))) {
                    unreachable.fetch_add(1, Ordering::Relaxed);
                }
                most.fetch_max(verifier.destination_state_len(), Ordering::Relaxed);
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|()| async {})
        .await;
    let took = started.elapsed();
    let most = most.load(Ordering::Relaxed);
    let after = verifier.destination_state_len();
    eprintln!("{SERVERS} bogus servers in {took:?}; state at most {most}, after {after}");
    assert_eq!(unreachable.load(Ordering::Relaxed), SERVERS as usize);
    assert!(most <= DESTINATION_CAPACITY + IN_FLIGHT, "{most}");
    assert!(after <= DESTINATION_CAPACITY, "{after}");
    assert_eq!(verifier.cache_len(), 0);
    assert!(took < Duration::from_secs(180), "{took:?}");
}

/// A burst of token requests naming one homeserver: after `homeserver_burst` requests the rest
/// get 429 `M_LIMIT_EXCEEDED` with `Retry-After` (and CORS) without any lookup on that server,
/// which saw at most as many userinfo requests as passed; another homeserver is not affected.
#[tokio::test]
async fn token_requests_naming_one_homeserver_are_rate_limited() {
    const BURST: usize = 5;
    const REQUESTS: usize = 30;
    let ca = TestCa::new().unwrap();
    let mut opts = ConclaveOptions::standalone()
        .env("CONCLAVE_AUTH__HOMESERVER_RATE_PER_SEC", "1")
        .env("CONCLAVE_AUTH__HOMESERVER_BURST", &BURST.to_string());
    opts.ca_file = Some(ca.cert_path.clone());
    let c = Conclave::start(opts).await.unwrap();
    // Both refuse every OpenID token (401): each request that passes is one lookup, as
    // failures are not cached.
    let flooded = Hostile::tls(&ca, Answer::Status(401)).await;
    let other = Hostile::tls(&ca, Answer::Status(401)).await;

    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut passed = 0;
    let mut limited = Vec::new();
    for i in 0..REQUESTS {
        let r = client
            .post(format!("{}/get_token", c.url))
            .header("origin", "https://call.example.org")
            .json(&token_request(&flooded.server_name()))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(i >= BURST, "request {i} was limited within the burst");
            let headers = r.headers().clone();
            let body: Value = r.json().await.unwrap();
            limited.push((headers, body));
        } else {
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "request {i}");
            passed += 1;
        }
    }
    let took = started.elapsed();
    // 1 request per second refills while the loop runs (well under a second on loopback).
    let refilled = took.as_secs() as usize + 1;
    eprintln!(
        "{REQUESTS} requests in {took:?}: {passed} passed, {} limited",
        limited.len()
    );
    assert!(
        (BURST..=BURST + refilled).contains(&passed),
        "{passed} passed"
    );
    assert_eq!(passed + limited.len(), REQUESTS);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        flooded.connections() <= passed,
        "{} lookups for {passed} requests let through",
        flooded.connections()
    );
    let (headers, body) = &limited[0];
    assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED", "{body}");
    let retry_ms = body["retry_after_ms"].as_u64().unwrap();
    assert!((1..=1000).contains(&retry_ms), "{body}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry_after, retry_ms.div_ceil(1000), "{headers:?}");
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert_eq!(headers["access-control-expose-headers"], "Retry-After");
    assert!(
        body["error"].as_str().unwrap().contains("127.0.0.1"),
        "{body}"
    );

    // Another homeserver (another host: `localhost`, not `127.0.0.1`) still gets its lookups.
    let (s, b) = post(
        &c,
        "/get_token",
        &token_request(&format!("localhost:{}", other.port)),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert_eq!(other.connections(), 1);
    assert_eq!(
        c.metric("conclave_tokens_rate_limited_total")
            .await
            .unwrap(),
        limited.len() as u64
    );
    assert_eq!(
        c.metric("conclave_http_internal_errors_total")
            .await
            .unwrap(),
        0
    );
}
