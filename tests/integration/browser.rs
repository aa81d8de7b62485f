//! Chromium + the unmodified npm `livekit-client` through Conclave's SFU: a real browser's
//! WebRTC stack (ICE, DTLS, simulcast VP8, Opus, RTCP) and the JS SDK's signalling, against
//! the Python SDK and against a second browser tab. The browser side is
//! `tests/clients/web/` driven by `support::web`.
//!
//! Most tabs connect through v0 `/rtc` directly (`singlePeerConnection: false`). The SDK's
//! default path (`/rtc/v1`, one peer connection per tab, which Conclave serves by default) is
//! its own test, with E2EE too, and so is the SDK's v0 fallback when an operator switches v1
//! off (`rtc.single_pc = false`).

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::conclave::{Conclave, ConclaveOptions};
use crate::support::lk_clients::{PyClient, PyClientSpec};
use crate::support::synapse::heavy_lock;
use crate::support::web::{Browser, BrowserReport, BrowserSpec, TabSpec};

async fn sfu() -> Conclave {
    Conclave::start(ConclaveOptions::standalone().env("CONCLAVE_RTC__AUTO_CREATE", "true"))
        .await
        .unwrap()
}

fn grants() -> Value {
    json!({"canPublish": true, "canSubscribe": true, "canPublishData": true})
}

/// Panics (with the browser report and Conclave's log) unless `ok`.
#[track_caller]
fn check(ok: bool, what: &str, report: &BrowserReport, c: &Conclave) {
    assert!(
        ok,
        "{what}\n{}\n---- conclave log ----\n{}",
        report.describe(),
        c.logs()
    );
}

/// No uncaught page exceptions and no console errors in the tab.
#[track_caller]
fn check_clean_console(report: &BrowserReport, label: &str, c: &Conclave) {
    let tab = report.tab(label);
    let page_errors = tab["page_errors"].as_array().map_or(0, Vec::len);
    let console_errors = tab["console_errors"].as_array().map_or(0, Vec::len);
    check(
        page_errors == 0 && console_errors == 0,
        &format!(
            "tab {label}: page errors {} / console errors {}",
            tab["page_errors"], tab["console_errors"]
        ),
        report,
        c,
    );
}

/// The tab published its camera with simulcast: `want_layers` encodings (q, h[, f]) all
/// configured, at least two of them actually sending.
#[track_caller]
fn check_simulcast_camera(report: &BrowserReport, label: &str, want_layers: usize, c: &Conclave) {
    let video = report
        .published(label, "video")
        .cloned()
        .unwrap_or(Value::Null);
    let encodings = video["encodings"].as_array().map_or(0, Vec::len);
    let sending = video["outbound"]
        .as_array()
        .map(|layers| {
            layers
                .iter()
                .filter(|l| l["frames_encoded"].as_u64().unwrap_or(0) > 0)
                .count()
        })
        .unwrap_or(0);
    check(
        video["simulcasted"] == true && encodings == want_layers && sending >= 2,
        &format!(
            "tab {label}: camera published with {want_layers} simulcast layers, >= 2 sending \
             (simulcasted {}, {encodings} encodings, {sending} sending): {video}",
            video["simulcasted"]
        ),
        report,
        c,
    );
    let audio = report
        .published(label, "audio")
        .cloned()
        .unwrap_or(Value::Null);
    check(
        audio["sid"].is_string() && audio["mime"] == "audio/opus",
        &format!("tab {label}: microphone published as Opus: {audio}"),
        report,
        c,
    );
}

/// (a) The browser publishes camera (simulcast, 3 layers at 960x540) and microphone; the
/// Python SDK, publishing audio only, decodes >= 30 video and >= 100 audio frames of it;
/// the page sees the Python participant's audio track subscribed, with sound in it.
#[tokio::test]
async fn browser_publishes_simulcast_camera_and_mic_python_decodes_and_page_hears_python() {
    let _heavy = heavy_lock();
    let c = sfu().await;

    let mut tab = TabSpec::new("web", c.ws_url(), c.token("b1", "web", grants()));
    tab.resolution = (960, 540, 24);
    tab.expect_sending_layers = 2;
    tab.expect_remote_tracks = vec![("py".into(), Some("audio".into()))];
    tab.expect_audio_level = vec![("py".into(), 0.01)];
    let mut spec = BrowserSpec::new(vec![tab]);
    spec.hold = true; // stay published until the Python side has what it needs
    spec.timeout_s = 60.0;
    let mut browser = Browser::spawn(spec).unwrap();

    let mut p = PyClientSpec::new(c.ws_url(), c.token("b1", "py", grants()), "py");
    p.publish_audio = true;
    p.publish_video = false;
    p.expect_participants = 1;
    p.expect_audio_frames = 100;
    p.expect_video_frames = 30;
    p.timeout_s = 50.0;
    p.min_duration_s = 40.0; // ended by SIGTERM below, once both sides are satisfied
    let mut py = PyClient::spawn(p).unwrap();

    py.wait_event("expectations_met", Duration::from_secs(50))
        .await
        .unwrap();
    browser
        .wait_event("expectations_met", Duration::from_secs(50))
        .await
        .unwrap();

    browser.terminate().unwrap();
    let report = browser.wait(Duration::from_secs(30)).await.unwrap();
    py.terminate().unwrap();
    let rp = py.wait(Duration::from_secs(30)).await.unwrap();
    rp.assert_exit(0);
    report.assert_exit(0);

    // Python decoded the browser's media.
    let web = rp.remote("web").cloned().unwrap_or(Value::Null);
    let video_frames = web["video_frames"].as_u64().unwrap_or(0);
    let audio_frames = web["audio_frames"].as_u64().unwrap_or(0);
    check(
        video_frames >= 30 && audio_frames >= 100,
        &format!(
            "python decoded the browser's video ({video_frames} >= 30) and audio \
             ({audio_frames} >= 100): {web}\n{}",
            rp.describe()
        ),
        &report,
        &c,
    );
    let tracks = web["tracks"].as_array().map_or(0, Vec::len);
    assert_eq!(tracks, 2, "python saw camera and microphone: {web}");
    eprintln!(
        "browser -> python: video {video_frames} frames at {}, audio {audio_frames} frames",
        web["video_resolution"]
    );

    // The browser published with simulcast and sees the Python participant's audio.
    check_simulcast_camera(&report, "web", 3, &c);
    let py_audio = report.remote("web", "remote_tracks", "py");
    check(
        py_audio.len() == 1 && py_audio[0]["kind"] == "audio",
        &format!("page subscribed exactly py's audio track: {py_audio:?}"),
        &report,
        &c,
    );
    let heard = report.remote("web", "audios", "py");
    check(
        heard
            .first()
            .and_then(|a| a["level_max"].as_f64())
            .is_some_and(|l| l >= 0.01)
            && heard[0]["stats"]["packets_received"].as_u64().unwrap_or(0) > 50,
        &format!("page heard py's sine (analyser RMS >= 0.01, > 50 packets): {heard:?}"),
        &report,
        &c,
    );
    check(
        report.tab("web")["disconnected"].is_null(),
        "the tab stayed connected until the test ended",
        &report,
        &c,
    );
    check_clean_console(&report, "web", &c);
    eprintln!(
        "browser outbound layers: {}",
        report.published("web", "video").unwrap()["outbound"]
    );
}

/// (b) Two browser tabs in one room: each sees the other's video playing (`videoWidth > 0`,
/// frames advancing) and hears the other's microphone.
#[tokio::test]
async fn two_browser_tabs_see_each_others_video_playing() {
    let _heavy = heavy_lock();
    let c = sfu().await;
    let mut a = TabSpec::new("a", c.ws_url(), c.token("b2", "alice", grants()));
    a.expect_sending_layers = 2;
    a.expect_video_playing = vec![("bob".into(), 30)];
    a.expect_remote_tracks = vec![("bob".into(), Some("audio".into()))];
    a.expect_audio_level = vec![("bob".into(), 0.01)];
    let mut b = TabSpec::new("b", c.ws_url(), c.token("b2", "bob", grants()));
    b.expect_sending_layers = 2;
    b.expect_video_playing = vec![("alice".into(), 30)];
    b.expect_remote_tracks = vec![("alice".into(), Some("audio".into()))];
    b.expect_audio_level = vec![("alice".into(), 0.01)];
    let mut spec = BrowserSpec::new(vec![a, b]);
    spec.timeout_s = 45.0;
    spec.min_duration_s = 2.0;
    let report = Browser::run(spec).await.unwrap();
    check(
        report.exit_code == 0,
        "both tabs met their expectations",
        &report,
        &c,
    );
    for (label, other) in [("a", "bob"), ("b", "alice")] {
        let videos = report.remote(label, "videos", other);
        let v = videos.first().copied().cloned().unwrap_or(Value::Null);
        check(
            v["video_width"].as_u64().unwrap_or(0) > 0
                && v["video_height"].as_u64().unwrap_or(0) > 0
                && v["frames"].as_u64().unwrap_or(0) >= 30
                && v["frames_advancing"] == true
                && v["stats"]["frames_decoded"].as_u64().unwrap_or(0) >= 30,
            &format!("tab {label} sees {other}'s video playing: {v}"),
            &report,
            &c,
        );
        eprintln!(
            "tab {label} <- {other}: {}x{}, {} frames painted, {} fps",
            v["video_width"], v["video_height"], v["frames"], v["fps_1s"]
        );
        check_simulcast_camera(&report, label, 2, &c);
        check_clean_console(&report, label, &c);
    }
}

/// Simulcast layer selection: tab b (v1, one peer connection) asks for the LOW layer of
/// alice's camera (`setVideoQuality`), so it must switch to alice at 320x180 (the q layer)
/// while tab a (v0) keeps bob's at 640x360 (h).
#[tokio::test]
async fn browser_subscriber_gets_the_simulcast_layer_it_asks_for() {
    let _heavy = heavy_lock();
    let c = sfu().await;
    let mut a = TabSpec::new("a", c.ws_url(), c.token("b3", "alice", grants()));
    a.publish_microphone = false;
    a.expect_video_size = vec![("bob".into(), 640, 360)];
    let mut b = TabSpec::new("b", c.ws_url(), c.token("b3", "bob", grants()));
    b.single_pc = None; // the SDK default: v1
    b.publish_microphone = false;
    b.video_quality = vec![("alice".into(), "low".into())];
    b.expect_video_size = vec![("alice".into(), 320, 180)];
    let mut spec = BrowserSpec::new(vec![a, b]);
    spec.timeout_s = 45.0;
    spec.min_duration_s = 3.0;
    let report = Browser::run(spec).await.unwrap();
    check(
        report.exit_code == 0,
        "alice at 320x180 in tab b (LOW), bob at 640x360 in tab a",
        &report,
        &c,
    );
    let asked = report
        .events
        .iter()
        .any(|e| e["tab"] == "b" && e["event"] == "set_video_quality");
    assert!(asked, "tab b requested LOW: {}", report.describe());
}

/// What Element Call turns on: `adaptiveStream` (the SDK asks for the size of the 320x180
/// `<video>` element) and `dynacast` (the publisher pauses layers nobody wants), with the
/// SDK's default signalling (v1) as Element Call has it. Each tab must get the other's q layer
/// (320x180) and stop encoding its own h layer.
#[tokio::test]
async fn adaptive_stream_and_dynacast_pick_and_pause_simulcast_layers() {
    let _heavy = heavy_lock();
    let c = sfu().await;
    let mut tabs = Vec::new();
    for (label, me, other) in [("a", "alice", "bob"), ("b", "bob", "alice")] {
        let mut t = TabSpec::new(label, c.ws_url(), c.token("b5", me, grants()));
        t.single_pc = None;
        t.adaptive_stream = true;
        t.dynacast = true;
        t.publish_microphone = false;
        t.expect_video_size = vec![(other.into(), 320, 180)];
        t.expect_paused_layers = vec!["h".into()];
        tabs.push(t);
    }
    let mut spec = BrowserSpec::new(tabs);
    spec.timeout_s = 45.0;
    spec.min_duration_s = 2.0;
    let report = Browser::run(spec).await.unwrap();
    check(
        report.exit_code == 0,
        "adaptive stream got the q layer (320x180) and dynacast paused h on both publishers",
        &report,
        &c,
    );
    for label in ["a", "b"] {
        check_clean_console(&report, label, &c);
    }
}

/// v1 switched off (`rtc.single_pc = false`): the SDK's default connect tries `/rtc/v1`
/// (Conclave answers 404), then fetches `/rtc/v1/validate` from the page's origin to decide on
/// the v0 fallback, and connects on v0.
#[tokio::test]
async fn browser_with_sdk_default_signalling_falls_back_to_v0() {
    let _heavy = heavy_lock();
    let c = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_RTC__SINGLE_PC", "false"),
    )
    .await
    .unwrap();
    let mut a = TabSpec::new("a", c.ws_url(), c.token("b4", "alice", grants()));
    a.single_pc = None; // SDK default: try v1 first
    a.publish_camera = false;
    a.publish_microphone = true;
    let mut spec = BrowserSpec::new(vec![a]);
    spec.timeout_s = 30.0;
    let report = Browser::run(spec).await.unwrap();
    check(
        report.exit_code == 0 && report.tab("a")["connected"] == true,
        "the tab connected with the SDK's default signalling",
        &report,
        &c,
    );
}

/// Two tabs, alice (a) and bob (b), in `room` with `single_pc` (see [`TabSpec::single_pc`])
/// and E2EE with `e2ee_key` if set, each publishing camera and microphone: each must see the
/// other's video playing and hear its audio. Panics (with the report) otherwise; prints what
/// each tab played.
async fn see_and_hear_each_other(
    c: &Conclave,
    room: &str,
    single_pc: Option<bool>,
    e2ee_key: Option<&str>,
) -> BrowserReport {
    let mut tabs = Vec::new();
    for (label, me, other) in [("a", "alice", "bob"), ("b", "bob", "alice")] {
        let mut t = TabSpec::new(label, c.ws_url(), c.token(room, me, grants()));
        t.single_pc = single_pc;
        t.e2ee_key = e2ee_key.map(str::to_owned);
        t.expect_video_playing = vec![(other.into(), 30)];
        t.expect_remote_tracks = vec![(other.into(), Some("audio".into()))];
        t.expect_audio_level = vec![(other.into(), 0.01)];
        tabs.push(t);
    }
    let mut spec = BrowserSpec::new(tabs);
    spec.timeout_s = 45.0;
    spec.min_duration_s = 2.0;
    let report = Browser::run(spec).await.unwrap();
    check(
        report.exit_code == 0,
        &format!("{room}: both tabs saw and heard each other (single_pc {single_pc:?})"),
        &report,
        c,
    );
    for (label, other) in [("a", "bob"), ("b", "alice")] {
        let videos = report.remote(label, "videos", other);
        let v = videos.first().copied().cloned().unwrap_or(Value::Null);
        eprintln!(
            "{room} tab {label} <- {other}: {}x{}, {} frames painted, {} decoded, {} fps",
            v["video_width"],
            v["video_height"],
            v["frames"],
            v["stats"]["frames_decoded"],
            v["fps_1s"]
        );
    }
    report
}

/// Conclave's defaults (`rtc.single_pc` on): two tabs with the SDK's default options
/// (`singlePeerConnection` on) connect through `/rtc/v1` with one peer connection each,
/// publish camera and microphone, and see and hear each other. `/metrics` counts both sessions
/// as v1 and none as v0: no fallback happened.
#[tokio::test]
async fn browser_with_sdk_default_signalling_uses_v1_with_single_pc() {
    let _heavy = heavy_lock();
    let c = sfu().await;
    let report = see_and_hear_each_other(&c, "b6", None, None).await;
    for label in ["a", "b"] {
        check_clean_console(&report, label, &c);
    }
    let (v0, v1) = c.signal_sessions().await.unwrap();
    check(
        (v1, v0) == (2, 0),
        &format!("both sessions on v1, none on v0: v1 {v1}, v0 {v0}"),
        &report,
        &c,
    );
}

/// End-to-end encryption (the SDK's E2EE worker with a shared key, what Element Call uses
/// with per-participant keys) through both signalling paths of one Conclave: a v0 pair
/// (`/rtc`, two peer connections each), then a v1 pair (`/rtc/v1`, one). The SFU cannot read
/// the frames; each tab must still see the other's video decoded and hear its audio, so the
/// SFU forwarded every encrypted frame intact on both paths.
#[tokio::test]
async fn e2ee_tabs_see_and_hear_each_other_on_v0_and_v1() {
    let _heavy = heavy_lock();
    let c = sfu().await;
    for (path, single_pc) in [("v0", Some(false)), ("v1", None)] {
        let room = format!("e2ee-{path}");
        let report =
            see_and_hear_each_other(&c, &room, single_pc, Some("conclave e2ee test key")).await;
        for label in ["a", "b"] {
            let encryption_errors = report.events_named(label, "encryption_error");
            check(
                encryption_errors.is_empty(),
                &format!("{path} tab {label}: no encryption errors: {encryption_errors:?}"),
                &report,
                &c,
            );
        }
    }
    let (v0, v1) = c.signal_sessions().await.unwrap();
    assert_eq!((v0, v1), (2, 2), "one pair on each signalling path");
}
