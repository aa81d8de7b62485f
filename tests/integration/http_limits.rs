//! The HTTP port under idle, slow and too many connections: timeouts close them, the caps
//! hold, and `/healthz` and the appservice API keep answering.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::conclave::{Conclave, ConclaveOptions};

/// Raises this process's open-files soft limit to its hard limit (2 000 client sockets).
fn raise_own_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn start(env: &[(&str, &str)]) -> Conclave {
    let mut opts = ConclaveOptions::standalone();
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    Conclave::start(opts).await.unwrap()
}

fn addr(c: &Conclave) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], c.port))
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends one request on a fresh connection and returns the whole answer (status line first).
async fn request_on(
    mut s: TcpStream,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> String {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n{headers}\r\n{body}"
    );
    // A refused connection may be closed before the request is written: the answer tells.
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "no answer to {method} {path} in 5 s");
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until `GET /metrics` on a fresh connection answers with `status` (a status line
/// prefix); panics after `within`.
async fn metrics_answers_eventually(c: &Conclave, status: &str, within: Duration) {
    crate::support::conclave::eventually(within, &format!("/metrics: {status}"), || async {
        let s = TcpStream::connect(addr(c)).await?;
        Ok(request_on(s, "GET", "/metrics", "", "")
            .await
            .starts_with(status)
            .then_some(()))
    })
    .await
    .unwrap();
}

/// `GET /healthz` on a new connection from 127.0.0.1: the status line.
async fn healthz(c: &Conclave) -> String {
    let s = TcpStream::connect(addr(c)).await.unwrap();
    let answer = request_on(s, "GET", "/healthz", "", "").await;
    answer.lines().next().unwrap_or_default().to_owned()
}

/// Whether the server closed `s` (EOF or reset) within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// 2 000 idle connections are closed after the idle timeout (2 s); `/healthz` answers on new
/// connections all the while.
#[tokio::test]
async fn idle_connections_are_closed_and_healthz_answers_throughout() {
    raise_own_fd_limit();
    let c = start(&[
        ("CONCLAVE_HTTP__IDLE_TIMEOUT_SECS", "2"),
        ("CONCLAVE_HTTP__MAX_CONNECTIONS_PER_IP", "5000"),
    ])
    .await;
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(2000);
    let mut polls = 0;
    for i in 0..2000 {
        idle.push(TcpStream::connect(addr(&c)).await.unwrap());
        if i % 250 == 0 {
            assert_eq!(healthz(&c).await, "HTTP/1.1 200 OK");
            polls += 1;
        }
    }
    let all_open = Instant::now();
    // /healthz answers while they are open, until after they should all be gone.
    while all_open.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        assert_eq!(healthz(&c).await, "HTTP/1.1 200 OK");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "/healthz took {:?}",
            t.elapsed()
        );
        polls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(polls > 10, "{polls} polls");
    let deadline = all_open + Duration::from_secs(8);
    for (i, s) in idle.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            closed_within(s, left.max(Duration::from_millis(10))).await,
            "idle connection {i} still open 8 s after the last was opened ({:?} after the first)",
            opened.elapsed()
        );
    }
    assert_eq!(healthz(&c).await, "HTTP/1.1 200 OK");
    assert!(c.logs().contains("open-files limit"), "fd limit logged");
    let timeouts = c
        .metric("conclave_http_connection_timeouts_total")
        .await
        .unwrap();
    assert!(timeouts >= 2000, "{timeouts} timeouts counted");
}

/// A connection that never finishes its request head is closed after the header timeout,
/// long before the idle timeout; one that sent nothing is not.
#[tokio::test]
async fn half_sent_headers_are_closed_after_the_header_timeout() {
    let c = start(&[
        ("CONCLAVE_HTTP__HEADER_TIMEOUT_SECS", "1"),
        ("CONCLAVE_HTTP__IDLE_TIMEOUT_SECS", "30"),
    ])
    .await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(addr(&c)).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-slow: 1")
            .await
            .unwrap();
        slow.push(s);
    }
    let mut quiet = TcpStream::connect(addr(&c)).await.unwrap();
    for (i, s) in slow.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "half-sent connection {i} still open"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(
        !closed_within(&mut quiet, Duration::from_millis(500)).await,
        "an idle connection lives until the idle timeout"
    );
    // Trickling a byte at a time does not extend the header timeout.
    let mut trickle = TcpStream::connect(addr(&c)).await.unwrap();
    let t = Instant::now();
    let mut closed = false;
    for b in b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaa" {
        if trickle.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(closed || closed_within(&mut trickle, Duration::from_secs(2)).await);
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert_eq!(healthz(&c).await, "HTTP/1.1 200 OK");
}

/// A request whose body never completes (or trickles in a byte at a time) is cut off after
/// `http.request_timeout_secs`; other requests are not disturbed.
#[tokio::test]
async fn slow_request_bodies_are_cut_off_after_the_request_timeout() {
    let c = start(&[("CONCLAVE_HTTP__REQUEST_TIMEOUT_SECS", "2")]).await;
    let head = "POST /get_token HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                content-length: 1000\r\n\r\n";
    // Half a body, then nothing.
    let mut stalled = TcpStream::connect(addr(&c)).await.unwrap();
    stalled
        .write_all(format!("{head}{{\"room_id\": ").as_bytes())
        .await
        .unwrap();
    // A byte every 200 ms: the deadline is from the head, not from the last byte.
    let mut trickle = TcpStream::connect(addr(&c)).await.unwrap();
    trickle.write_all(head.as_bytes()).await.unwrap();
    let t = Instant::now();
    let mut trickle_closed = false;
    for _ in 0..40 {
        if trickle.write_all(b" ").await.is_err() {
            trickle_closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if t.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    assert!(
        trickle_closed || closed_within(&mut trickle, Duration::from_secs(2)).await,
        "a trickled body outlived the request timeout"
    );
    assert!(
        closed_within(&mut stalled, Duration::from_secs(2)).await,
        "a stalled body outlived the request timeout"
    );
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
    assert_eq!(healthz(&c).await, "HTTP/1.1 200 OK");
}

/// With `http.max_connections` reached by idle connections, `/healthz` and the appservice
/// API still answer (reserved slots); other routes get 503 there.
#[tokio::test]
async fn healthz_and_the_appservice_api_answer_when_the_cap_is_reached() {
    let c = start(&[
        ("CONCLAVE_HTTP__MAX_CONNECTIONS", "50"),
        ("CONCLAVE_HTTP__RESERVED_CONNECTIONS", "8"),
    ])
    .await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(addr(&c)).await.unwrap());
    }
    // Until the server accepted them all, a probe may still take an ordinary slot (300 ms of
    // sleep were not enough on a loaded CI machine), and an idle connection accepted while the
    // probe held it lands on a reserved slot; the probe's ordinary slot is free again once it
    // is answered. So: until three probes in a row are refused, each answered probe means a
    // free ordinary slot, which one more idle connection takes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut refused_in_a_row = 0;
    while refused_in_a_row < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "ordinary slots never all taken"
        );
        let s = TcpStream::connect(addr(&c)).await.unwrap();
        if request_on(s, "GET", "/metrics", "", "")
            .await
            .starts_with("HTTP/1.1 503")
        {
            refused_in_a_row += 1;
        } else {
            refused_in_a_row = 0;
            idle.push(TcpStream::connect(addr(&c)).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        assert_eq!(healthz(&c).await, "HTTP/1.1 200 OK");
    }
    let token = c.hs_token();
    let body = r#"{"transaction_id":"x"}"#;
    let s = TcpStream::connect(addr(&c)).await.unwrap();
    let headers = format!(
        "authorization: Bearer {token}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n",
        body.len()
    );
    let answer = request_on(s, "POST", "/_matrix/app/v1/ping", &headers, body).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let s = TcpStream::connect(addr(&c)).await.unwrap();
    let answer = request_on(s, "GET", "/metrics", "", "").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // Once the idle ones are gone, everything is served again.
    drop(idle);
    metrics_answers_eventually(&c, "HTTP/1.1 200", Duration::from_secs(5)).await;
    let reserved = c
        .metric("conclave_http_connections_reserved_total")
        .await
        .unwrap();
    assert!(reserved >= 7, "{reserved} reserved connections counted");
}

/// `http.max_connections_per_ip` holds for one source (127.0.0.2) and not for another
/// (127.0.0.1); with no reserved slots the next connection from the full source is refused.
#[tokio::test]
async fn the_per_address_cap_holds_per_address() {
    let c = start(&[
        ("CONCLAVE_HTTP__MAX_CONNECTIONS_PER_IP", "20"),
        ("CONCLAVE_HTTP__RESERVED_CONNECTIONS", "0"),
    ])
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(connect_from([127, 0, 0, 2], addr(&c)).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Refused: answered 503 at once and closed, before any request.
    let mut s = connect_from([127, 0, 0, 2], addr(&c)).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert_eq!(healthz(&c).await, "HTTP/1.1 200 OK");
    let refused = c
        .metric("conclave_http_connections_refused_total")
        .await
        .unwrap();
    assert_eq!(refused, 1);
    let s = connect_from([127, 0, 0, 1], addr(&c)).await;
    assert!(request_on(s, "GET", "/metrics", "", "")
        .await
        .starts_with("HTTP/1.1 200"));
    held.pop();
    crate::support::conclave::eventually(Duration::from_secs(5), "a free slot", || async {
        let s = connect_from([127, 0, 0, 2], addr(&c)).await;
        Ok(request_on(s, "GET", "/healthz", "", "")
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(()))
    })
    .await
    .unwrap();
}
