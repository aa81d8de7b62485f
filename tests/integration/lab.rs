//! The network lab (`support::lab`): namespaces, shaping and loss are real and torn down, and
//! real clients in lab namespaces talk to Conclave through shaped, lossy links.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::conclave::{Conclave, ConclaveOptions};
use crate::support::lab::{in_netns, lab_namespaces, list_namespaces, Lab, Shape, SFU_IP};
use crate::support::lk_clients::{ClientReport, PyClient, PyClientSpec};
use crate::support::synapse::{heavy_lock, TestCa};
use crate::support::web::{Browser, BrowserSpec, TabSpec};

fn assert_gone(names: &[String]) {
    let now = list_namespaces().unwrap();
    for ns in names {
        assert!(!now.contains(ns), "namespace {ns} left behind: {now:?}");
    }
}

/// Dropping a lab deletes its namespaces (and so its veth pairs), also when the drop happens
/// during a panic, and `teardown` is idempotent. No lab interface ever appears in the root
/// namespace.
#[test]
fn lab_teardown_removes_namespaces_even_when_dropped_early() {
    let lab = Lab::new(2).unwrap();
    let names = lab.namespaces();
    assert_eq!(names.len(), 5, "the SFU, two routers, two clients");
    let now = lab_namespaces().unwrap();
    for ns in &names {
        assert!(now.contains(ns), "{ns} missing from {now:?}");
    }
    lab.shape_downlink(1, 300).unwrap();
    lab.set_downlink_loss(1, 5).unwrap();
    lab.shape_uplink(0, 1000).unwrap();
    lab.set_uplink_loss(0, 3).unwrap();
    assert!(lab.downlink_stats(1).unwrap().shaped);
    assert!(!lab.downlink_stats(0).unwrap().shaped);
    assert!(lab.uplink_stats(0).unwrap().shaped);
    // The root namespace has none of the lab's addresses.
    let root_addrs = std::process::Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .unwrap();
    let root_addrs = String::from_utf8_lossy(&root_addrs.stdout);
    assert!(!root_addrs.contains("10.77."), "{root_addrs}");
    drop(lab);
    assert_gone(&names);

    // Dropped by unwinding from a panic in the middle of a test.
    let mut names = Vec::new();
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::new(1).unwrap();
        names = lab.namespaces();
        panic!("deliberate panic with a live lab (expected in this test's output)");
    }));
    assert!(unwound.is_err());
    assert_eq!(names.len(), 3, "the SFU, a router, a client");
    assert_gone(&names);

    // Explicit teardown, then the drop: both fine.
    let mut lab = Lab::new(1).unwrap();
    let names = lab.namespaces();
    lab.teardown().unwrap();
    lab.teardown().unwrap();
    assert_gone(&names);
}

/// Raw UDP through a shaped, lossy downlink: the tbf holds the rate (what arrives in 2 s of a
/// 4 Mbit/s flood is about 2 s × 500 kbit/s plus bucket and queue), drops the excess, and the
/// loss rule drops about its share of what the tbf let through. Unshaping and loss 0 restore
/// a clean link.
#[test]
fn lab_shapes_and_drops_udp() {
    let lab = Lab::new(1).unwrap();
    let shape = Shape::kbit(500);
    lab.shape_downlink_with(0, shape).unwrap();
    lab.set_downlink_loss(0, 10).unwrap();
    let client = SocketAddr::new(lab.client_ip(0).into(), 40000);

    let (received, sent) = flood(&lab, client, Duration::from_secs(2), 4_000);
    let stats = lab.downlink_stats(0).unwrap();
    eprintln!("received {received} B of {sent} B; {stats:?}");
    // 2 s at 500 kbit/s = 125 kB; + bucket + up to 200 ms of queue + loss drift.
    let ceiling = 125_000 + u64::from(shape.burst_bytes) + 12_500 + 20_000;
    assert!(
        received <= ceiling,
        "{received} B > {ceiling} B: not shaped"
    );
    assert!(
        received >= 70_000,
        "{received} B: shaped far below the rate"
    );
    assert!(stats.shaped);
    assert!(stats.shaper_dropped > 100, "{stats:?}");
    assert!(stats.shaper_overlimits > 0, "{stats:?}");
    let through = stats.shaper_sent_packets;
    let lost = stats.loss_dropped_packets;
    assert!(
        lost * 100 >= through * 3 && lost * 100 <= through * 18,
        "10 % loss dropped {lost} of {through}"
    );

    lab.unshape_downlink(0).unwrap();
    lab.set_downlink_loss(0, 0).unwrap();
    let stats = lab.downlink_stats(0).unwrap();
    assert!(
        !stats.shaped && stats.loss_dropped_packets == 0,
        "{stats:?}"
    );
    let (received, sent) = flood(&lab, client, Duration::from_millis(500), 4_000);
    assert!(
        received * 10 >= sent * 9,
        "clean link: {received} of {sent} B"
    );
}

/// Sends 500-byte UDP datagrams from the SFU namespace to `to` at `kbit` for `secs`;
/// returns (bytes received in the client namespace, bytes sent).
fn flood(lab: &Lab, to: SocketAddr, secs: Duration, kbit: u64) -> (u64, u64) {
    let client_ns = lab.client_ns(0).to_owned();
    let sfu_ns = lab.sfu_ns().to_owned();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        in_netns(&client_ns, move || {
            let s = UdpSocket::bind(to).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            let mut total = 0u64;
            while let Ok(n) = s.recv(&mut buf) {
                total += n as u64;
            }
            total
        })
        .unwrap()
    });
    ready_rx.recv().unwrap();
    let sent = in_netns(&sfu_ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let payload = [7u8; 500];
        let interval = Duration::from_micros(4_000_000 / kbit);
        let start = Instant::now();
        let mut sent = 0u64;
        let mut next = start;
        while start.elapsed() < secs {
            // ENOBUFS from a full qdisc is a drop, as on a real link.
            if s.send_to(&payload, to).is_ok() {
                sent += 500;
            }
            next += interval;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        sent
    })
    .unwrap();
    (receiver.join().unwrap(), sent)
}

fn grants() -> serde_json::Value {
    json!({"canPublish": true, "canSubscribe": true, "canPublishData": true})
}

/// Conclave in the lab's SFU namespace, rooms created on first connect.
async fn conclave_in(lab: &Lab) -> Conclave {
    Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_ADMIN__TOKEN", ADMIN_TOKEN)
            .in_lab(lab),
    )
    .await
    .unwrap()
}

/// The lab Conclaves' `admin.token`.
const ADMIN_TOKEN: &str = "lab-admin-token";

/// Participant `a` (Python SDK, publishing audio and video) in client namespace 0, staying
/// `stay_s` seconds once it sees another participant.
fn python_a(c: &Conclave, lab: &Lab, room: &str, stay_s: f64) -> PyClientSpec {
    let mut a = PyClientSpec::new(c.ws_url(), c.token(room, "a", grants()), "a");
    a.netns = Some(lab.client_ns(0).to_owned());
    a.expect_participants = 1;
    a.min_duration_s = stay_s;
    a.timeout_s = stay_s + 10.0;
    a
}

/// A Chromium page `web` (livekit-client on one peer connection, publishing nothing) in
/// client namespace 1 that plays `a`'s video and samples it every 250 ms.
fn page_watching_a(c: &Conclave, lab: &Lab, room: &str) -> BrowserSpec {
    let mut tab = TabSpec::new("web", c.ws_url(), c.token(room, "web", grants()));
    tab.single_pc = Some(true);
    tab.publish_camera = false;
    tab.publish_microphone = false;
    tab.expect_video_playing = vec![("a".into(), 20)];
    tab.stats_interval_ms = 250;
    let mut spec = BrowserSpec::new(vec![tab]);
    spec.netns = Some(lab.client_ns(1).to_owned());
    spec
}

/// The samples of `a`'s video among a client's events, in order: (client clock ms, frames).
/// The page's `video_stats` count frames painted; the Python client's `progress`, frames
/// received.
fn video_samples(events: &[Value]) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter_map(|e| {
            let frames = if e["event"] == "video_stats" && e["identity"] == "a" {
                &e["frames"]
            } else if e["event"] == "progress" {
                &e["frames"]["a"]["video"]
            } else {
                return None;
            };
            Some((
                e["t_ms"].as_u64().unwrap_or(0),
                frames.as_u64().unwrap_or(0),
            ))
        })
        .collect()
}

/// The latest sample of `a`'s video among `events` (see [`video_samples`]).
fn latest_video(events: &[Value]) -> Option<(u64, u64)> {
    video_samples(events).last().copied()
}

/// How long after `since_ms` (client clock) the first sample with more than `frames` came.
fn advanced_after(events: &[Value], since_ms: u64, frames: u64) -> Option<u64> {
    video_samples(events)
        .into_iter()
        .find(|(t, f)| *t > since_ms && *f > frames)
        .map(|(t, _)| t - since_ms)
}

/// Waits, at most 10 s, until `events` (a live client's) show `a`'s video more than 5
/// frames past where it is now; whether it did.
async fn advances(events: impl Fn() -> Vec<Value>) -> bool {
    let frames = |events: &[Value]| latest_video(events).map_or(0, |(_, f)| f);
    let from = frames(&events());
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if frames(&events()) > from + 5 {
            return true;
        }
    }
    false
}

/// How many times `report`'s client saw `identity` join, and leave.
fn joins_and_leaves(report: &ClientReport, identity: &str) -> (usize, usize) {
    let count = |event: &str| {
        report
            .events
            .iter()
            .filter(|e| e["identity"] == identity && e["event"] == event)
            .count()
    };
    (
        count("participant_connected"),
        count("participant_disconnected"),
    )
}

/// Conclave in the lab's SFU namespace, a Python SDK publisher (audio + video) in client
/// namespace 0, a Python subscriber in client namespace 1 behind a 500 kbit/s downlink that
/// loses 10 %: the subscriber connects and decodes audio and video, the publisher is
/// unaffected, and the lab's counters show the shaper and the loss rule at work on the
/// subscriber's link (and not on the publisher's). Nothing of the lab is left afterwards.
#[tokio::test]
async fn python_subscriber_behind_shaped_lossy_downlink_receives_media() {
    let _heavy = heavy_lock();
    let mut lab = Lab::new(2).unwrap();
    let names = lab.namespaces();
    lab.shape_downlink(1, 500).unwrap();
    lab.set_downlink_loss(1, 10).unwrap();
    let c = conclave_in(&lab).await;
    assert_eq!(c.ws_url(), format!("ws://10.77.0.1:{}", c.port));

    let mut publisher = PyClientSpec::new(c.ws_url(), c.token("lab", "pub", grants()), "pub");
    publisher.netns = Some(lab.client_ns(0).to_owned());
    publisher.expect_participants = 1;
    publisher.min_duration_s = 14.0;
    publisher.timeout_s = 40.0;
    let mut subscriber = PyClientSpec::viewer(c.ws_url(), c.token("lab", "sub", grants()), "sub");
    subscriber.netns = Some(lab.client_ns(1).to_owned());
    subscriber.expect_participants = 1;
    subscriber.expect_audio_frames = 200;
    subscriber.expect_video_frames = 30;
    subscriber.min_duration_s = 10.0;
    subscriber.timeout_s = 40.0;

    let p = PyClient::spawn(publisher).unwrap();
    let s = PyClient::spawn(subscriber).unwrap();
    let rs = s.wait(Duration::from_secs(50)).await.unwrap();
    let rp = p.wait(Duration::from_secs(50)).await.unwrap();
    rs.assert_exit(0);
    rp.assert_exit(0);
    let seen = rs.remote("pub").expect("subscriber saw the publisher");
    eprintln!("subscriber saw: {seen}");
    assert!(seen["audio_frames"].as_u64().unwrap() >= 200, "{seen}");
    assert!(seen["video_frames"].as_u64().unwrap() >= 30, "{seen}");

    let down = lab.downlink_stats(1).unwrap();
    let clean = lab.downlink_stats(0).unwrap();
    eprintln!("subscriber downlink: {down:?}\npublisher downlink: {clean:?}");
    assert!(down.shaped && down.shaper_sent_packets > 300, "{down:?}");
    assert!(down.loss_dropped_packets > 20, "{down:?}");
    // Roughly 10 % of what passed the shaper, never near all of it.
    assert!(
        down.loss_dropped_packets * 100 <= down.shaper_sent_packets * 20,
        "{down:?}"
    );
    assert!(
        !clean.shaped && clean.loss_dropped_packets == 0,
        "{clean:?}"
    );
    // The SFU's HTTP API is reachable through the namespace.
    assert!(c.metrics().await.unwrap().contains("conclave_"));

    drop(c);
    lab.teardown().unwrap();
    assert_gone(&names);
}

/// Chromium (livekit-client) in client namespace 1 behind a 1 Mbit/s downlink with 5 % loss
/// subscribes to a Python publisher in namespace 0 through Conclave in the SFU namespace:
/// ICE works with the lab's non-loopback addresses and the video plays.
#[tokio::test]
async fn browser_subscriber_in_lab_plays_video() {
    let _heavy = heavy_lock();
    let lab = Lab::new(2).unwrap();
    lab.shape_downlink(1, 1000).unwrap();
    lab.set_downlink_loss(1, 5).unwrap();
    let c = conclave_in(&lab).await;
    let mut publisher = PyClientSpec::new(c.ws_url(), c.token("lab", "pub", grants()), "pub");
    publisher.netns = Some(lab.client_ns(0).to_owned());
    publisher.min_duration_s = 25.0;
    publisher.timeout_s = 50.0;
    let p = PyClient::spawn(publisher).unwrap();

    let mut tab = TabSpec::new("web", c.ws_url(), c.token("lab", "web", grants()));
    tab.publish_camera = false;
    tab.publish_microphone = false;
    tab.expect_remote_tracks = vec![("pub".into(), Some("video".into()))];
    tab.expect_video_playing = vec![("pub".into(), 20)];
    let mut spec = BrowserSpec::new(vec![tab]);
    spec.netns = Some(lab.client_ns(1).to_owned());
    spec.timeout_s = 45.0;
    let b = Browser::spawn(spec).unwrap();
    let rb = b.wait(Duration::from_secs(60)).await.unwrap();
    rb.assert_exit(0);
    p.terminate().unwrap();
    let _ = p.wait(Duration::from_secs(15)).await;
    let down = lab.downlink_stats(1).unwrap();
    eprintln!("browser downlink: {down:?}");
    assert!(down.shaper_sent_packets > 100, "{down:?}");
    assert!(down.loss_dropped_packets > 0, "{down:?}");
}

/// ICE over TCP (RFC 6544): Chromium (livekit-client, one peer connection) in a client
/// namespace whose network drops every UDP packet it sends joins Conclave in the SFU
/// namespace through the passive TCP candidate on `rtc.tcp_port`, and media flows both ways
/// with a Python SDK participant on UDP: the browser plays its video, it decodes the
/// browser's camera. The browser did try UDP (the lab's counter), and Conclave counts the
/// TCP connection.
#[tokio::test]
async fn browser_without_udp_connects_over_ice_tcp() {
    let _heavy = heavy_lock();
    let lab = Lab::new(2).unwrap();
    lab.block_udp(1, true).unwrap();
    let c = conclave_in(&lab).await;
    let (metrics, blocked, transport) =
        browser_and_python_exchange_media(&c, &lab, "lab", &[]).await;
    assert_eq!(transport, "tcp", "the admin API's view of the browser");
    assert!(
        blocked > 0,
        "the browser tried UDP and its network dropped it"
    );
    let metric = |name| counter(&metrics, name);
    assert!(
        metric("conclave_media_tcp_accepted_total") >= 1,
        "Conclave accepted the browser's ICE-TCP connection:\n{metrics}"
    );
    assert_eq!(
        metric("conclave_media_tcp_closed_bad_total"),
        0,
        "{metrics}"
    );
    // Which transport each peer connection connected over.
    assert!(
        metric("conclave_media_connections_total{transport=\"tcp\"}") >= 1
            && metric("conclave_media_connections_total{transport=\"udp\"}") >= 1,
        "the browser over TCP, the Python participant over UDP:\n{metrics}"
    );
}

/// A Python SDK participant `py` (client namespace 0, publishing) and a Chromium page `web`
/// (namespace 1, one peer connection, camera and microphone, `chrome_args` added) in `room`:
/// both must see each other's video (the page plays `py`'s; `py` decodes 30 frames of the
/// page's camera). Returns Conclave's metrics after, the packets namespace 1's network
/// dropped, and the browser's transport as the admin API showed it while it was connected.
async fn browser_and_python_exchange_media(
    c: &Conclave,
    lab: &Lab,
    room: &str,
    chrome_args: &[&str],
) -> (String, u64, String) {
    let mut peer = PyClientSpec::new(c.ws_url(), c.token(room, "py", grants()), "py");
    peer.netns = Some(lab.client_ns(0).to_owned());
    peer.expect_participants = 1;
    peer.expect_video_frames = 30;
    peer.min_duration_s = 20.0;
    peer.timeout_s = 60.0;
    let p = PyClient::spawn(peer).unwrap();

    let mut tab = TabSpec::new("web", c.ws_url(), c.token(room, "web", grants()));
    tab.single_pc = Some(true);
    tab.expect_remote_tracks = vec![("py".into(), Some("video".into()))];
    tab.expect_video_playing = vec![("py".into(), 20)];
    let mut spec = BrowserSpec::new(vec![tab]);
    spec.netns = Some(lab.client_ns(1).to_owned());
    spec.timeout_s = 45.0;
    // Long enough for the Python participant to decode its 30 frames of the camera.
    spec.min_duration_s = 10.0;
    spec.chrome_args = chrome_args.iter().map(|a| a.to_string()).collect();
    let b = Browser::spawn(spec).unwrap();
    // The operator's view while the call is on.
    let path = format!("/_conclave/admin/v1/sfu/rooms/{room}");
    let mut transport = String::new();
    let mut last = None;
    for _ in 0..80 {
        let got = c.admin_get(&path, ADMIN_TOKEN).await;
        if let Ok(view) = &got {
            let web = view["participants"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["identity"] == "web");
            if let Some(t) = web.and_then(|p| p["transport"].as_str()) {
                transport = t.to_owned();
                break;
            }
        }
        last = Some(got);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if transport.is_empty() {
        eprintln!("the admin API never showed the browser's transport; last answer: {last:?}");
    }
    let rb = b.wait(Duration::from_secs(60)).await.unwrap();
    let rp = p.wait(Duration::from_secs(60)).await.unwrap();
    let metrics = c.metrics().await.unwrap();
    let blocked = lab.udp_blocked_packets(1).unwrap();
    eprintln!("packets the browser's network dropped: {blocked}");
    rb.assert_exit(0);
    rp.assert_exit(0);
    let seen = rp
        .remote("web")
        .expect("the Python participant saw the browser");
    assert!(
        seen["video_frames"].as_u64().unwrap_or(0) >= 30,
        "the browser's camera reached the Python participant: {seen}"
    );
    (metrics, blocked, transport)
}

/// The value of the unlabelled (or fully labelled) series `name` in a `/metrics` text; 0
/// when absent.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// Where the lab's Conclave serves TURN over TLS (its own namespace: no clash).
const TURN_TLS_PORT: u16 = 5349;

/// TURN over TLS (issue 20): Chromium + livekit-client in a lab namespace whose network lets
/// out nothing but TCP to two ports of Conclave's host (as a proxy passing HTTPS only): the
/// signalling port and the TURN/TLS port. Every UDP packet and the ICE-TCP port are dropped.
/// It joins through the embedded TURN server over TLS (certificate from the test CA for the
/// SFU's IP; Chromium is told to accept it, having no way to trust a CA here) and exchanges
/// media with a Python SDK participant on UDP. The admin API shows the browser's transport
/// as `turn/tls`, the metrics count its peer connection so, and TURN relayed both ways.
#[tokio::test]
async fn browser_on_a_tls_only_network_connects_through_turn_over_tls() {
    let _heavy = heavy_lock();
    let lab = Lab::new(2).unwrap();
    let ca = TestCa::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca
        .issue_server_cert_for(dir.path(), "turn", &format!("IP:{SFU_IP}"))
        .unwrap();
    let c = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_TURN__ENABLED", "true")
            .env("CONCLAVE_TURN__UDP_PORT", "0")
            .env("CONCLAVE_TURN__TCP_PORT", "0")
            .env("CONCLAVE_TURN__TLS_PORT", &TURN_TLS_PORT.to_string())
            .env("CONCLAVE_TURN__CERT_FILE", &cert.display().to_string())
            .env("CONCLAVE_TURN__KEY_FILE", &key.display().to_string())
            .env("CONCLAVE_TURN__DOMAIN", &SFU_IP.to_string())
            .env("CONCLAVE_ADMIN__TOKEN", ADMIN_TOKEN)
            .in_lab(&lab),
    )
    .await
    .unwrap();
    lab.allow_only_tcp_to_sfu(1, &[c.port, TURN_TLS_PORT])
        .unwrap();
    let (metrics, blocked, transport) =
        browser_and_python_exchange_media(&c, &lab, "turn", &["--ignore-certificate-errors"]).await;
    assert_eq!(transport, "turn/tls", "the admin API's view of the browser");
    assert!(
        blocked > 0,
        "the browser tried other paths and they were dropped"
    );
    let metric = |name| counter(&metrics, name);
    assert!(
        metric("conclave_media_connections_total{transport=\"turn/tls\"}") >= 1
            && metric("conclave_media_connections_total{transport=\"udp\"}") >= 1,
        "the browser through TURN over TLS, the Python participant over UDP:\n{metrics}"
    );
    assert_eq!(
        metric("conclave_media_connections_total{transport=\"tcp\"}"),
        0,
        "{metrics}"
    );
    assert!(
        metric("conclave_turn_allocations_total") >= 1
            && metric("conclave_turn_relayed_to_media_total") > 100
            && metric("conclave_turn_relayed_to_clients_total") > 100,
        "TURN relayed media both ways:\n{metrics}"
    );
    assert_eq!(metric("conclave_turn_refused_peer_total"), 0, "{metrics}");
}

/// A 5 s drop of the link (a Wi-Fi that drops out; issue 20): the Python SDK client B in a lab
/// namespace loses every packet both ways for 5 s while A keeps publishing media and numbered
/// reliable data. Once the link is back, B is the same participant (same SID: no rejoin), A
/// never saw it leave or join again, B's video advances again within 2 s, and every reliable
/// packet A sent reached B exactly once.
#[tokio::test]
async fn a_five_second_link_cut_is_survived_without_a_rejoin() {
    let _heavy = heavy_lock();
    let lab = Lab::new(2).unwrap();
    let c = conclave_in(&lab).await;
    let mut a = PyClientSpec::new(c.ws_url(), c.token("cut", "a", grants()), "a");
    a.netns = Some(lab.client_ns(0).to_owned());
    a.expect_participants = 1;
    a.send_data = Some("reliable".into());
    a.extra_args = ["--number-data", "--send-data-for", "20"]
        .map(String::from)
        .to_vec();
    // A leaves first: everything it saw of B is from B's whole stay.
    a.min_duration_s = 26.0;
    a.timeout_s = 60.0;
    let mut b = PyClientSpec::viewer(c.ws_url(), c.token("cut", "b", grants()), "b");
    b.netns = Some(lab.client_ns(1).to_owned());
    b.expect_participants = 1;
    b.expect_video_frames = 30;
    b.extra_args = ["--progress-ms", "250"].map(String::from).to_vec();
    b.min_duration_s = 30.0;
    b.timeout_s = 60.0;
    let pa = PyClient::spawn(a).unwrap();
    let mut pb = PyClient::spawn(b).unwrap();
    pb.wait_event("first_video_frame", Duration::from_secs(30))
        .await
        .expect("B receives A's video");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The latest progress sample: (client clock ms, A's video frames received by B).
    let latest = |pb: &PyClient| latest_video(&pb.events()).expect("progress events");
    lab.cut(1, true).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, frames_early_in_cut) = latest(&pb);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (restored_ms, frames_at_restore) = latest(&pb);
    // (Restoring flushes the rules and their counters.)
    let (cut_in, cut_out) = lab.cut_packets(1).unwrap();
    lab.cut(1, false).unwrap();

    let ra = pa.wait(Duration::from_secs(70)).await.unwrap();
    let rb = pb.wait(Duration::from_secs(70)).await.unwrap();
    eprintln!("cut dropped {cut_in} packets to B and {cut_out} from it");
    assert!(cut_in > 20 && cut_out > 0, "the cut was real");
    assert_eq!(
        frames_early_in_cut, frames_at_restore,
        "no video reached B during the cut"
    );
    // Media again: the first progress sample after the link came back with more frames.
    let back = advanced_after(&rb.events, restored_ms, frames_at_restore);
    eprintln!("B's video advanced again {back:?} ms after the link came back (±250 ms sampling)");
    assert!(
        back.is_some_and(|ms| ms <= 2250),
        "video again within 2 s of the link coming back: {back:?} ms"
    );

    // The same participant: B's SID never changed, A saw B join once and never leave.
    let b_sid = rb.summary["local_sid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let names = |r: &crate::support::lk_clients::ClientReport| -> Vec<String> {
        r.events
            .iter()
            .filter_map(|e| e["event"].as_str().map(String::from))
            .collect()
    };
    let b_events = names(&rb);
    assert!(
        !b_events
            .iter()
            .any(|e| e == "reconnecting" || e == "reconnected"),
        "B never reconnected: {b_events:?}"
    );
    let a_saw_b: Vec<&Value> = ra
        .events
        .iter()
        .filter(|e| e["identity"] == "b")
        .filter(|e| {
            e["event"] == "participant_connected" || e["event"] == "participant_disconnected"
        })
        .collect();
    // (B may have been in the room before A: then A learnt of it when it joined.)
    assert!(
        a_saw_b.len() <= 1
            && a_saw_b
                .iter()
                .all(|e| e["event"] == "participant_connected"),
        "A saw B join at most once and never leave: {a_saw_b:?}"
    );
    let b_at_a = ra.remote("b").expect("A knew B");
    assert_eq!(b_at_a["sid"], b_sid.as_str(), "{b_at_a}");
    assert!(b_at_a["disconnected_at_ms"].is_null(), "{b_at_a}");

    // Reliable data sent before, during and after the cut: each packet once, none missing.
    assert_each_reliable_packet_once(&ra, &rb);
    ra.assert_exit(0);
    rb.assert_exit(0);
}

/// Every numbered reliable packet A sent (`--number-data`) reached B exactly once, and
/// nothing else did.
fn assert_each_reliable_packet_once(ra: &ClientReport, rb: &ClientReport) {
    let sent: Vec<u64> = ra.summary["data_numbers_sent"]["reliable"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    let received: Vec<(String, u64)> = rb.remote("a").expect("B knew A")["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            (
                d["payload"].as_str().unwrap_or_default().to_owned(),
                d["count"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(sent.len() >= 30, "A sent {} reliable packets", sent.len());
    for n in &sent {
        let payload = format!("a-reliable-{n}");
        let count = received
            .iter()
            .find(|(p, _)| *p == payload)
            .map_or(0, |(_, c)| *c);
        assert_eq!(
            count, 1,
            "{payload} arrived {count} times (of {received:?})"
        );
    }
    assert_eq!(
        received.len(),
        sent.len(),
        "nothing else arrived: {received:?}"
    );
}

/// The same 5 s cut for Chromium (livekit-client, one peer connection) in the lab: its page
/// never reconnects, the Python participant never sees it leave or join again, and the page
/// paints A's video again within 2 s of the link coming back.
#[tokio::test]
async fn a_five_second_link_cut_is_survived_by_chromium() {
    let _heavy = heavy_lock();
    let lab = Lab::new(2).unwrap();
    let c = conclave_in(&lab).await;
    // A stays until the page has left (then it is stopped).
    let pa = PyClient::spawn(python_a(&c, &lab, "cut", 55.0)).unwrap();
    let mut spec = page_watching_a(&c, &lab, "cut");
    spec.min_duration_s = 22.0;
    spec.timeout_s = 60.0;
    let mut b = Browser::spawn(spec).unwrap();
    b.wait_event("video_playing", Duration::from_secs(40))
        .await
        .expect("the page plays A's video");
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.cut(1, true).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let painted = |b: &Browser| latest_video(&b.events()).unwrap_or_default();
    let (_, early) = painted(&b);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (restored_ms, at_restore) = painted(&b);
    let (cut_in, _) = lab.cut_packets(1).unwrap();
    lab.cut(1, false).unwrap();
    let rb = b.wait(Duration::from_secs(70)).await.unwrap();
    pa.terminate().unwrap();
    let ra = pa.wait(Duration::from_secs(30)).await.unwrap();
    assert!(cut_in > 20, "the cut was real ({cut_in} packets dropped)");
    assert_eq!(early, at_restore, "nothing painted during the cut");
    let back = advanced_after(&rb.events, restored_ms, at_restore);
    eprintln!("the page painted A's video again {back:?} ms after the link came back (±250 ms)");
    assert!(
        back.is_some_and(|ms| ms <= 2250),
        "video again within 2 s of the link coming back: {back:?} ms"
    );
    for name in ["reconnecting", "signal_reconnecting", "reconnected"] {
        let seen = rb.events_named("web", name);
        assert!(seen.is_empty(), "the page never went {name}: {seen:?}");
    }
    // A saw the page join at most once (it may have been there first) and leave once, at
    // its end: a rejoin would show as a leave and a join in between.
    let (joins, leaves) = joins_and_leaves(&ra, "web");
    assert!(
        joins <= 1 && leaves <= 1,
        "A saw the page join {joins} and leave {leaves} times"
    );
    rb.assert_exit(0);
    ra.assert_exit(0);
}

/// Pings of the move test: every second, dead after 4 s (`rtc.ping_*_secs`).
const FAST_PING: (u32, u32) = (1, 4);

/// ICE restart on an address change (issue 20): Chromium's namespace gets a new link and
/// address and loses its old one (Wi-Fi to 4G). Its old connections die silently; livekit-
/// client notices when its signalling ping times out (`rtc.ping_timeout_secs`, 4 s here),
/// resumes on a new signalling connection from the new address and restarts ICE. Conclave
/// takes the same participant back (the Python participant sees no leave and no join), asks
/// A for a keyframe as soon as the restarted path connects, and A's video is painted again.
/// Target: within 2 s of the page noticing (0.3 s measured alone, 3.3 s once in a loaded
/// full run; reported, `TARGET MISSED` past 2 s); asserted: within 5 s, the noticing within
/// the ping timeout + interval + 1 s.
#[tokio::test]
async fn chromium_moved_to_a_new_address_restarts_ice_and_plays_again() {
    let _heavy = heavy_lock();
    let lab = Lab::new(2).unwrap();
    let (interval, timeout) = FAST_PING;
    let c = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_RTC__PING_INTERVAL_SECS", &interval.to_string())
            .env("CONCLAVE_RTC__PING_TIMEOUT_SECS", &timeout.to_string())
            .in_lab(&lab),
    )
    .await
    .unwrap();
    let pa = PyClient::spawn(python_a(&c, &lab, "move", 60.0)).unwrap();
    let mut spec = page_watching_a(&c, &lab, "move");
    spec.hold = true;
    spec.timeout_s = 60.0;
    let mut b = Browser::spawn(spec).unwrap();
    b.wait_event("video_playing", Duration::from_secs(40))
        .await
        .expect("the page plays A's video");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (moved_ms, at_move) = latest_video(&b.events()).unwrap_or_default();
    let moved = Instant::now();
    let new_ip = lab.move_client(1).unwrap();
    // Media is back once frames advance after the page noticed the move: until then it may
    // still paint what its jitter buffer held (5 frames within 0.5 s of the move, once in a
    // full run, before anything reconnected).
    let notice = |events: &[Value]| {
        events
            .iter()
            .filter(|e| e["event"] == "signal_reconnecting" || e["event"] == "reconnecting")
            .filter_map(|e| e["t_ms"].as_u64())
            .find(|t| *t > moved_ms)
    };
    let mut back = None;
    while back.is_none() && moved.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let events = b.events();
        if let Some(n) = notice(&events) {
            let at_notice = video_samples(&events)
                .into_iter()
                .rfind(|(t, _)| *t <= n)
                .map_or(at_move, |(_, f)| f);
            back = advanced_after(&events, n, at_notice + 5).map(|ms| ms + (n - moved_ms));
        }
    }
    let logs = c.logs();
    let events = b.events();
    b.terminate().unwrap();
    b.wait(Duration::from_secs(30)).await.unwrap();
    pa.terminate().unwrap();
    let ra = pa.wait(Duration::from_secs(30)).await.unwrap();
    // The page's connection events after the move, at their time since it (ms).
    let since_move: Vec<String> = events
        .iter()
        .filter(|e| e["t_ms"].as_u64().is_some_and(|t| t > moved_ms))
        .filter_map(|e| {
            let name = e["event"].as_str()?;
            (name.contains("reconnect") || name == "connection_state").then(|| {
                let t = e["t_ms"].as_u64().unwrap_or(0) - moved_ms;
                format!("{t} {name} {}", e.get("state").unwrap_or(&Value::Null))
            })
        })
        .collect();
    eprintln!(
        "moved to {new_ip}; A's video painted again {back:?} ms after the move (±250 ms); \
         the page then: {since_move:?}"
    );
    assert!(
        logs.contains("participant resumed") && logs.contains("ICE restarted by the client"),
        "a resume with an ICE restart from the new address"
    );
    // When the page noticed (its signalling ping timed out), and how long media took after.
    let noticed = notice(&events).map(|t| t - moved_ms);
    let after_notice = back.zip(noticed).map(|(b, n)| b.saturating_sub(n));
    let missed = if after_notice.is_some_and(|ms| ms > 2000) {
        " TARGET MISSED"
    } else {
        ""
    };
    eprintln!("media again {after_notice:?} ms after the page noticed (target 2 s){missed}");
    let ping_bound = u64::from(timeout + interval) * 1000 + 1000;
    assert!(
        noticed.is_some_and(|ms| ms <= ping_bound),
        "the page noticed within its ping timeout: {noticed:?} ms"
    );
    assert!(
        after_notice.is_some_and(|ms| ms <= 5000),
        "A's video painted again within 5 s of the page noticing: {after_notice:?} ms"
    );
    let (joins, leaves) = joins_and_leaves(&ra, "web");
    assert!(
        joins <= 1 && leaves <= 1,
        "A saw the page join {joins} and leave {leaves} times: a move is no rejoin"
    );
}

/// Resume (issue 20): Chromium's link is cut for 20 s, longer than its signalling ping
/// timeout (15 s), so livekit-client gives its signalling connection up and, once the link is
/// back, resumes on a new one (`reconnect=1` with its SID) and restarts ICE. Conclave takes
/// the same participant back: the Python participant never sees it leave or join again, the
/// page paints A's video again, and Conclave counts the resume.
#[tokio::test]
async fn chromium_resumes_after_its_signalling_was_lost() {
    let _heavy = heavy_lock();
    let lab = Lab::new(2).unwrap();
    let c = conclave_in(&lab).await;
    let pa = PyClient::spawn(python_a(&c, &lab, "resume", 90.0)).unwrap();
    let mut spec = page_watching_a(&c, &lab, "resume");
    spec.hold = true;
    spec.timeout_s = 90.0;
    let mut b = Browser::spawn(spec).unwrap();
    b.wait_event("video_playing", Duration::from_secs(40))
        .await
        .expect("the page plays A's video");
    lab.cut(1, true).unwrap();
    b.wait_event("signal_reconnecting", Duration::from_secs(30))
        .await
        .expect("the page noticed its signalling was lost");
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.cut(1, false).unwrap();
    let restored = std::time::Instant::now();
    let reconnected = b.wait_event("reconnected", Duration::from_secs(40)).await;
    let took = restored.elapsed();
    // A's video painted again: a sample with more frames than at the reconnect.
    let again = advances(|| b.events()).await.then(|| restored.elapsed());
    let resumes = c.metric("conclave_signal_resumes_total").await.unwrap_or(0);
    let logs = c.logs();
    b.terminate().unwrap();
    b.wait(Duration::from_secs(30)).await.unwrap();
    pa.terminate().unwrap();
    let ra = pa.wait(Duration::from_secs(30)).await.unwrap();
    eprintln!(
        "reconnected {took:?} after the link came back, video painted again after {again:?}; \
         resumes {resumes}"
    );
    reconnected.expect("the page reconnected");
    assert!(resumes >= 1, "Conclave resumed the participant");
    assert!(
        logs.contains("participant resumed") && logs.contains("ICE restarted by the client"),
        "a resume with an ICE restart"
    );
    assert!(again.is_some(), "A's video plays again after the resume");
    let (joins, leaves) = joins_and_leaves(&ra, "web");
    assert!(
        joins <= 1 && leaves <= 1,
        "A saw the page join {joins} and leave {leaves} times: a resume is no rejoin"
    );
}

/// Resume with the Python SDK on one peer connection (`--single-pc`, v1): B's link is cut
/// for 20 s, past its 15 s ping timeout; once it is back, B resumes on a new signalling
/// connection: its SID is the same, A never saw it leave, its video advances again.
#[tokio::test]
async fn python_sdk_resumes_after_its_signalling_was_lost() {
    python_sdk_resumes(false).await;
}

/// The same with the Python SDK's default signalling, v0 (two peer connections): the SFU
/// restarts ICE on B's subscriber connection with an offer of its own.
#[tokio::test]
async fn python_sdk_on_two_peer_connections_resumes_after_its_signalling_was_lost() {
    python_sdk_resumes(true).await;
}

async fn python_sdk_resumes(dual_pc: bool) {
    let _heavy = heavy_lock();
    let lab = Lab::new(2).unwrap();
    let c = conclave_in(&lab).await;
    let mut a = python_a(&c, &lab, "resume-py", 70.0);
    // Numbered reliable data for the first 25 s: before, during and after B's cut.
    a.send_data = Some("reliable".into());
    a.extra_args = ["--number-data", "--send-data-for", "25"]
        .map(String::from)
        .to_vec();
    let pa = PyClient::spawn(a).unwrap();
    let mut b = PyClientSpec::viewer(c.ws_url(), c.token("resume-py", "b", grants()), "b");
    b.netns = Some(lab.client_ns(1).to_owned());
    b.dual_pc = Some(dual_pc);
    b.expect_participants = 1;
    b.extra_args = ["--progress-ms", "250"].map(String::from).to_vec();
    b.min_duration_s = 60.0;
    b.timeout_s = 70.0;
    let mut pb = PyClient::spawn(b).unwrap();
    pb.wait_event("first_video_frame", Duration::from_secs(30))
        .await
        .expect("B receives A's video");
    lab.cut(1, true).unwrap();
    pb.wait_event("reconnecting", Duration::from_secs(30))
        .await
        .expect("B noticed its signalling was lost");
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.cut(1, false).unwrap();
    let reconnected = pb.wait_event("reconnected", Duration::from_secs(40)).await;
    // A's video advances again: a progress sample with more frames than at the reconnect.
    let advanced = advances(|| pb.events()).await;
    let resumes = c.metric("conclave_signal_resumes_total").await.unwrap_or(0);
    // The reliable data A sent during the cut waits in Conclave's SCTP association for B
    // until its retransmission timer, backed off during the cut, fires again (str0m has no
    // way to hurry it): wait (at most 70 s) until some arrived after the resume and then
    // nothing new for 5 s.
    let last_at = |name: &str| {
        pb.events()
            .iter()
            .rev()
            .filter(|e| e["event"] == name)
            .find_map(|e| e["t_ms"].as_u64())
    };
    let resumed_ms = last_at("reconnected").unwrap_or(u64::MAX);
    let waiting = Instant::now();
    let mut quiet_since = Instant::now();
    let mut seen = last_at("data_received");
    while waiting.elapsed() < Duration::from_secs(70) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now_seen = last_at("data_received");
        if now_seen != seen {
            (seen, quiet_since) = (now_seen, Instant::now());
        }
        let after_resume = seen.is_some_and(|t| t > resumed_ms);
        if after_resume && quiet_since.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    if let Some(t) = seen.filter(|t| *t > resumed_ms) {
        eprintln!(
            "the last reliable packet reached B {} ms after its resume",
            t - resumed_ms
        );
    }
    pb.terminate().unwrap();
    let rb = pb.wait(Duration::from_secs(30)).await.unwrap();
    pa.terminate().unwrap();
    let ra = pa.wait(Duration::from_secs(30)).await.unwrap();
    reconnected.expect("B reconnected");
    eprintln!("resumes {resumes}");
    assert!(resumes >= 1, "Conclave resumed B");
    if dual_pc {
        assert!(
            c.logs().contains("subscriber ICE restart offered"),
            "v0: the SFU restarted ICE on B's subscriber connection"
        );
    }
    assert!(advanced, "A's video reaches B again after the resume");
    let (joins, leaves) = joins_and_leaves(&ra, "b");
    assert!(
        joins <= 1 && leaves <= 1,
        "A saw B join {joins} and leave {leaves} times: a resume is no rejoin"
    );
    let b_sid = rb.summary["local_sid"].as_str().unwrap_or_default();
    assert_eq!(ra.remote("b").expect("A knew B")["sid"], b_sid);
    // The reliable data A sent while B's link was cut reached B after the resume, once.
    assert_each_reliable_packet_once(&ra, &rb);
}
