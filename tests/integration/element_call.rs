//! Element Call, unmodified, across two ministries: alice@hs1 and bob@hs2 in one call, each
//! publishing to their own ministry's Conclave (found through their own Synapse's MSC4143
//! transports) and subscribing at the other's (Element Call's multi-SFU mode). Without and
//! with per-participant E2EE; then alice is banned by the room's admin.
//!
//! Screenshots of both pages mid-call are written to `$CARGO_TARGET_TMPDIR/element-call/`;
//! with `CONCLAVE_UPDATE_SCREENSHOTS=1` they also replace `docs/element-call-*.png`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::conclave::Conclave;
use conclave::matrix::naming::{legacy_identity, member_identity};

use crate::support::conclave::eventually;
use crate::support::element_call::{
    admin_call, EcDriver, EcPage, Ministries, RtcMode, CONCLAVE_2_MEDIA_IP,
};
use crate::support::lk_clients::{PyClient, PyClientSpec};
use crate::support::matrix_client::TestUser;
use crate::support::matrix_client::CALL_MEMBER;
use crate::support::synapse::heavy_lock;

/// How long the pages get to start Element Call and exchange media (cold Chromium, two
/// Synapse round trips, two SFUs): bounded, so a broken setup fails instead of hanging.
const IN_CALL_TIMEOUT_S: u64 = 100;
/// Issue 17's target for the time from bob's ban to alice's media stopping at his page: her
/// home Conclave removes her when the ban has federated to her homeserver and reached it in an
/// appservice transaction. On v1 (one peer connection, Element Call's default): 0.4–0.8 s on a
/// quiet machine, 0.2–0.4 s with a busy core beside it; on v0 it was 1.5–2.1 s. Reported when
/// missed; [`BAN_MEDIA_STOP_BOUND_MS`] is asserted.
const BAN_MEDIA_STOP_MS: u64 = 2000;
/// What is asserted: the ban's trip through Synapse dominates and is not Conclave's. In the
/// E2EE `matrix_2_0` run, with two Synapses and two Chromiums on two cores, hs1 received bob's
/// ban over federation 2.4 s after hs2 had it (Conclave-1 then removed alice in 80 ms; bob's
/// own client had already left her SFU, 2.3 s after the ban), and 2.0 s once before.
const BAN_MEDIA_STOP_BOUND_MS: u64 = 5000;
/// Longest time from bob's ban to alice's Element Call leaving: her client, when its sync brings
/// the ban (after it crossed federation), not Conclave. 0.7–3.6 s usually; 6.6 s once in a full
/// run on the 2-core machine (matrix_2_0 E2EE: the ban reached hs1 2.1 s after it was sent).
const BAN_CLIENT_LEAVE_MS: u64 = 10_000;

/// The SFU room of a call in compatibility mode.
fn legacy_room_name(room: &str) -> String {
    conclave::matrix::naming::room_name(room, conclave::matrix::naming::LEGACY_SLOT)
}

fn screenshot_dir(run: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("element-call")
        .join(run)
}

/// A room created by bob (its admin) on hs2, alice@hs1 invited and joined over federation.
/// Element Call turns per-participant E2EE on exactly when the room is encrypted.
async fn shared_room(
    m: &Ministries,
    bob_admin: &TestUser,
    alice: &TestUser,
    encrypted: bool,
) -> String {
    let room = bob_admin
        .create_call_room_with(&[alice.user_id.as_str()], encrypted)
        .await
        .expect("bob creates the room");
    alice
        .wait_for_invite(&room, Duration::from_secs(20))
        .await
        .expect("alice's invite arrives over federation");
    alice
        .join(&room, &[m.hs2.server_name.as_str()])
        .await
        .expect("alice joins over federation");
    bob_admin
        .wait_for_membership(&room, &alice.user_id, "join", Duration::from_secs(20))
        .await
        .expect("hs2 sees alice joined");
    room
}

fn pages(m: &Ministries, room: &str, alice: &TestUser, bob: &TestUser, e2ee: bool) -> Vec<EcPage> {
    let page = |label: &str, hs: &str, u: &TestUser, intent: &str| EcPage {
        label: label.into(),
        hs: hs.into(),
        token: u.access_token.clone(),
        user: u.user_id.clone(),
        device: u.device_id.clone(),
        room: room.into(),
        intent: intent.into(),
        e2ee,
    };
    vec![
        page("alice", &m.hs1.client_url, alice, "start_call"),
        page("bob", &m.hs2.client_url, bob, "join_existing"),
    ]
}

/// The SFU participants of `room` on `c` as (user_id, publisher) pairs. None when Conclave
/// knows no call there: in an encrypted `matrix_2_0` room it only knows the SFU's.
async fn sfu_view(c: &Conclave, room: &str) -> Vec<(String, bool)> {
    let call = match admin_call(c, room).await {
        Ok(call) => call,
        Err(e) if e.to_string().contains("No active call") => return Vec::new(),
        Err(e) => panic!("admin API: {e:#}"),
    };
    let mut v: Vec<(String, bool)> = call["sfu"]["participants"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p["user_id"].as_str().unwrap_or("?").to_owned(),
                p["publisher"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    v.sort();
    v
}

/// What the failure of [`assert_media_stays_home`] quotes from each Conclave's log.
const PARTICIPANT_LOG: &[&str] = &[
    "participant joined",
    "participant left",
    "removing SFU participant",
    "token issued",
    " WARN ",
    " ERROR ",
];

/// Each ministry's SFU holds its own user as the publisher and the other ministry's user as
/// a subscriber only.
async fn assert_media_stays_home(m: &Ministries, room: &str, alice: &str, bob: &str) {
    let want1 = {
        let mut v = vec![(alice.to_owned(), true), (bob.to_owned(), false)];
        v.sort();
        v
    };
    let want2 = {
        let mut v = vec![(alice.to_owned(), false), (bob.to_owned(), true)];
        v.sort();
        v
    };
    // The admin view follows the SFU; subscriptions settle within a moment of media flowing.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (v1, v2) = (sfu_view(&m.c1, room).await, sfu_view(&m.c2, room).await);
        if v1 == want1 && v2 == want2 {
            break;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "SFU views: Conclave-1 {v1:?} (want {want1:?}), Conclave-2 {v2:?} (want {want2:?})\n\
                 Conclave-1: {}\nConclave-2: {}\n\
                 ---- Conclave-1 participants and warnings ----\n{}\n\
                 ---- Conclave-2 participants and warnings ----\n{}",
                admin_call(&m.c1, room).await.unwrap_or(Value::Null),
                admin_call(&m.c2, room).await.unwrap_or(Value::Null),
                m.c1.log_excerpt(PARTICIPANT_LOG, 40),
                m.c2.log_excerpt(PARTICIPANT_LOG, 40),
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report_transports(m, room).await;
}

/// The operator's view of how each page connected: UDP is expected where it is open (ICE over
/// TCP is offered too, ranked far below it). Which pair is used is the browser's choice (the
/// SFU is ICE-lite and takes the pair the browser nominates): on a loaded 2-core CI machine
/// Chromium once nominated TCP first and kept it for over 10 s. The test waits up to 30 s
/// for UDP and reports a miss with the transports seen, without failing on the browser's
/// choice; the engine tests assert the SFU's side (UDP ranked first in every answer).
async fn report_transports(m: &Ministries, room: &str) {
    let start = std::time::Instant::now();
    let mut transports = Vec::new();
    while start.elapsed() < Duration::from_secs(30) {
        transports.clear();
        for c in [&m.c1, &m.c2] {
            let call = admin_call(c, room).await.unwrap_or(Value::Null);
            for p in call["sfu"]["participants"].as_array().into_iter().flatten() {
                transports.push((p["user_id"].clone(), p["transport"].clone()));
            }
        }
        if !transports.is_empty() && transports.iter().all(|(_, t)| *t == "udp") {
            if start.elapsed() > Duration::from_secs(1) {
                eprintln!(
                    "element_call: every page on UDP after {} ms",
                    start.elapsed().as_millis()
                );
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "TARGET MISSED: not every page on UDP after 30 s (the browser nominated another \
         pair): {transports:?}"
    );
}

/// Copies the latest screenshots into docs/ when asked to.
fn update_docs_screenshots(dir: &Path) {
    if std::env::var("CONCLAVE_UPDATE_SCREENSHOTS").as_deref() != Ok("1") {
        return;
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for who in ["alice", "bob"] {
        std::fs::copy(
            dir.join(format!("{who}.png")),
            docs.join(format!("element-call-{who}.png")),
        )
        .expect("copying a screenshot into docs/");
    }
}

fn assert_in_call(ev: &Value) {
    for who in ["alice", "bob"] {
        let p = &ev["pages"][who];
        assert!(
            p["remote_video_width"].as_u64().unwrap_or(0) > 0,
            "{who} plays remote video: {p}"
        );
        // Decoded energy since the call began, not the level of the last sample: Chrome's
        // fake microphone beeps, and one last sample fell between beeps (level 0.00095,
        // energy 0.58, in a full-suite run).
        assert!(
            p["audio_energy"].as_f64().unwrap_or(0.0) > 0.01,
            "{who} hears non-silent remote audio: {p}"
        );
        assert!(
            p["host"]["errors"].as_array().is_some_and(|e| e.is_empty()),
            "{who}'s widget host reported no error: {p}"
        );
    }
}

/// What each Conclave knows of the call, by Element Call's mode. Compatibility: every
/// `call.member` is readable and identities are `user:device`. `matrix_2_0`: identities are
/// matrix-js-sdk's hashes of each `rtc.member`'s (user, device, member id), readable in an
/// unencrypted room: each Conclave lists both members, and its home publisher's identity is
/// that of its membership. Encrypted, Conclave sees no member at all (room membership alone
/// gates the call). (Subscribers' identities vary: Element Call asks a remote SFU with
/// `/get_token`, then `/sfu/get` if refused.)
async fn assert_matrix_view(
    m: &Ministries,
    room: &str,
    mode: RtcMode,
    e2ee: bool,
    users: [&str; 2],
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for (c, home) in [(&m.c1, users[0]), (&m.c2, users[1])] {
        loop {
            let call = admin_call(c, room).await.expect("admin API");
            let members = call["matrix"]["members"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let publisher = call["sfu"]["participants"]
                .as_array()
                .and_then(|ps| {
                    ps.iter()
                        .find(|p| p["user_id"] == home && p["publisher"] == true)
                        .cloned()
                })
                .unwrap_or_default();
            let listed = |u: &str| members.iter().find(|mem| mem["user_id"] == u);
            let ok = match (mode, e2ee) {
                (RtcMode::Matrix20, true) => members.is_empty(),
                _ => {
                    users.iter().all(|u| listed(u).is_some())
                        && listed(home).is_some_and(|mem| {
                            let (d, id) = (
                                mem["device_id"].as_str().unwrap_or(""),
                                mem["membership_id"].as_str().unwrap_or(""),
                            );
                            let want = match mode {
                                RtcMode::Compatibility => legacy_identity(home, d),
                                RtcMode::Matrix20 => member_identity(home, d, id),
                            };
                            publisher["identity"] == want.as_str()
                        })
                }
            };
            if ok {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} ({mode:?}, e2ee {e2ee}) knows {call}",
                c.url
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A call being started: alice@hs1 and bob@hs2 (the room's admin), their room, the run's
/// screenshot directory and the driver of their two pages.
struct Call {
    alice: TestUser,
    bob: TestUser,
    room: String,
    dir: PathBuf,
    driver: EcDriver,
}

/// Registers alice and bob (fresh devices for every run: the widget host keeps its crypto
/// store in memory), creates their room and starts Element Call on both pages.
async fn start_call(m: &Ministries, mode: RtcMode, e2ee: bool, run: &str) -> Call {
    let bob = m.hs2.register("bob", true).await.expect("bob");
    let alice = m.hs1.register("alice", false).await.expect("alice");
    let room = shared_room(m, &bob, &alice, e2ee).await;
    let dir = screenshot_dir(run);
    let driver = EcDriver::spawn(
        &pages(m, &room, &alice, &bob, e2ee),
        mode,
        IN_CALL_TIMEOUT_S,
        &dir,
    )
    .expect("starting the Element Call driver");
    Call {
        alice,
        bob,
        room,
        dir,
        driver,
    }
}

/// bob bans alice; the driver's observation (when her media stopped at bob's page, when her
/// page left). Reports the 2 s target with `logs` when missed, asserts the bound.
async fn ban_alice(
    driver: &mut EcDriver,
    call: (&TestUser, &TestUser, &str),
    logs: impl Fn() -> String,
) -> Value {
    let (alice, bob, room) = call;
    driver
        .send(json!({"cmd": "watch_ban", "victim": "alice", "observer": "bob", "timeout_s": 10}))
        .await
        .expect("watch_ban");
    bob.ban(room, &alice.user_id, Some("end-to-end test"))
        .await
        .expect("bob bans alice");
    let seen = driver
        .wait_event("ban_observed", Duration::from_secs(20))
        .await
        .expect("ban observed");
    let stopped = seen["media_stopped_ms"].as_u64();
    if stopped.is_none_or(|ms| ms > BAN_MEDIA_STOP_MS) {
        eprintln!(
            "TARGET MISSED: alice's media stopped at bob's page after {stopped:?} ms \
             (target {BAN_MEDIA_STOP_MS} ms)\n{}",
            logs()
        );
    }
    assert!(
        stopped.is_some_and(|ms| ms <= BAN_MEDIA_STOP_BOUND_MS),
        "alice's media stops at bob's page within {BAN_MEDIA_STOP_BOUND_MS} ms of the ban: {seen}"
    );
    seen
}

async fn run_call(m: &Ministries, mode: RtcMode, e2ee: bool, ban: bool) {
    let run = match (mode, e2ee) {
        (RtcMode::Compatibility, false) => "plain",
        (RtcMode::Compatibility, true) => "e2ee",
        (RtcMode::Matrix20, false) => "m2-plain",
        (RtcMode::Matrix20, true) => "m2-e2ee",
    };
    let Call {
        alice,
        bob,
        room,
        dir,
        mut driver,
    } = start_call(m, mode, e2ee, run).await;
    let in_call = match driver
        .wait_event("in_call", Duration::from_secs(IN_CALL_TIMEOUT_S + 30))
        .await
    {
        Ok(ev) => ev,
        Err(e) => panic!("{run}: {e:#}\nministries: {}", m.health().await),
    };
    assert_in_call(&in_call);
    // Each Element Call found its own ministry's Conclave through its own Synapse (MSC4143).
    for (who, c) in [("alice", &m.c1), ("bob", &m.c2)] {
        let transports = &in_call["pages"][who]["host"]["transports"];
        assert_eq!(
            transports[0]["livekit_service_url"],
            json!(c.url),
            "{who}'s homeserver advertises {transports}"
        );
    }
    if e2ee {
        for who in ["alice", "bob"] {
            let host = &in_call["pages"][who]["host"];
            assert!(
                host["toDeviceSentEncrypted"].as_u64().unwrap_or(0) > 0
                    && host["toDeviceReceived"].as_u64().unwrap_or(0) > 0,
                "{who}'s Element Call exchanged its media key as encrypted to-device messages: {host}"
            );
        }
    }
    assert_media_stays_home(m, &room, &alice.user_id, &bob.user_id).await;
    assert_matrix_view(m, &room, mode, e2ee, [&alice.user_id, &bob.user_id]).await;
    if mode == RtcMode::Compatibility {
        update_docs_screenshots(&dir);
    }

    if ban {
        let ban_log = || {
            format!(
                "---- Conclave-1 (alice's home) ----\n{}\n---- Conclave-2 ----\n{}",
                m.c1.log_excerpt(&["membership=ban", "removing SFU", "participant left"], 10),
                m.c2.log_excerpt(&["membership=ban", "removing SFU", "participant left"], 10),
            )
        };
        let seen = ban_alice(&mut driver, (&alice, &bob, &room), ban_log).await;
        eprintln!(
            "ban observed: media stopped after {} ms, alice left after {} ms; her page shows {:?}, \
             her Element Call asked its host for {}",
            seen["media_stopped_ms"],
            seen["victim_left_ms"],
            seen["victim"]["text"],
            seen["victim_host"]["widgetActions"]
        );
        // Seconds, not a token lifetime. Media stops when Conclave's appservice learns of the
        // ban; her page leaves when her client syncs it, 0.7–1.2 s after the ban on v1 (on v0
        // 2.3–3.6 s was seen on a loaded 2-core machine: two Synapses, two Chromiums, builds).
        let left = seen["victim_left_ms"].as_u64();
        assert!(
            left.is_some_and(|ms| ms <= BAN_CLIENT_LEAVE_MS),
            "alice's Element Call left the call within {BAN_CLIENT_LEAVE_MS} ms of the ban: {seen}"
        );
        // Both ministries removed her: her publisher at home, her subscription at hs2.
        for (name, c) in [("Conclave-1", &m.c1), ("Conclave-2", &m.c2)] {
            let v = sfu_view(c, &room).await;
            assert!(
                !v.iter().any(|(u, _)| u == &alice.user_id),
                "alice is gone from {name}: {v:?}"
            );
        }
    }
    driver.quit().await;
}

/// The product as ministries' users get it: Element Call, two Synapses, two Conclaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_call_two_ministries() {
    let _heavy = heavy_lock();
    let m = Ministries::start().await.expect("two ministries");
    run_call(&m, RtcMode::Compatibility, false, false).await;
    run_call(&m, RtcMode::Compatibility, true, true).await;
    // Element Call 0.26 (livekit-client's single peer connection) joined every time through
    // `/rtc/v1`, Conclave's default: one peer connection per page, never the v0 fallback.
    for (name, c) in [("Conclave-1", &m.c1), ("Conclave-2", &m.c2)] {
        let (v0, v1) = c.signal_sessions().await.expect("metrics");
        assert!(
            v1 >= 2 && v0 == 0,
            "{name}: Element Call joined on v1 only (v1 {v1}, v0 {v0})"
        );
    }
}

/// The same in Element Call's `matrix_2_0` mode (MSC4354 sticky `rtc.member` events,
/// `/get_token`, hashed identities): Conclave follows the memberships of the unencrypted room;
/// in the encrypted room it cannot read them and room membership alone decides, ban included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_call_two_ministries_matrix_2_0() {
    let _heavy = heavy_lock();
    let m = Ministries::start().await.expect("two ministries");
    run_call(&m, RtcMode::Matrix20, false, false).await;
    run_call(&m, RtcMode::Matrix20, true, true).await;
}

/// The sovereign cascade (`docs/cascade.md`) with unmodified Element Call: each page's media
/// connections go only to its own ministry's Conclave (selected candidate pairs; the two
/// Conclaves' media on different loopback addresses), each Conclave relays its user's tracks
/// to the other once, plain and with per-participant E2EE (frames pass untouched, keys stay
/// between the clients); then bob bans alice and her media stops at his page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_call_two_ministries_cascade() {
    let _heavy = heavy_lock();
    let m = Ministries::start_cascading().await.expect("two ministries");
    run_cascade_call(&m, RtcMode::Compatibility, false, false).await;
    run_cascade_call(&m, RtcMode::Compatibility, true, true).await;
    run_cascade_call(&m, RtcMode::Matrix20, true, false).await;
}

/// A second hs2 member beside bob's page: a Python SDK viewer that asks Conclave-1 (alice's
/// focus) for a token as Element Call does in compatibility mode, and is sent home.
async fn second_hs2_viewer(m: &Ministries, bob: &TestUser, room: &str) -> PyClient {
    let carol = m.hs2.register("carol", false).await.expect("carol");
    bob.invite(room, &carol.user_id)
        .await
        .expect("invite carol");
    carol.join(room, &[]).await.expect("carol joins");
    // A call membership, as Element Call would send (Conclave's grace period wants one).
    let content = json!({
        "application": "m.call", "call_id": "", "scope": "m.room",
        "device_id": carol.device_id, "expires": 14_400_000,
        "focus_active": {"type": "livekit", "focus_selection": "multi_sfu"},
        "foci_preferred": [{"type": "livekit", "livekit_service_url": m.c2.url}],
    });
    carol
        .send_state(room, CALL_MEMBER, &carol.call_member_state_key(), content)
        .await
        .expect("carol's call membership");
    let answer = eventually(
        Duration::from_secs(20),
        "carol's token from Conclave-1",
        || async {
            let openid = carol.openid_token().await?;
            let r = reqwest::Client::new()
                .post(format!("{}/sfu/get", m.c1.url))
                .json(&json!({"room": room, "openid_token": openid, "device_id": carol.device_id}))
                .send()
                .await?;
            let ok = r.status() == 200;
            let body: Value = r.json().await?;
            Ok(ok.then_some(body))
        },
    )
    .await
    .expect("carol's token");
    assert_eq!(
        answer["url"],
        m.c2.ws_url(),
        "carol is sent to her own Conclave: {answer}"
    );
    let mut spec = PyClientSpec::viewer(m.c2.ws_url(), answer["jwt"].as_str().unwrap(), "carol");
    spec.expect_participants = 1;
    spec.expect_video_frames = 20;
    spec.timeout_s = 90.0;
    spec.min_duration_s = 90.0;
    PyClient::spawn(spec).expect("carol's client")
}

async fn run_cascade_call(m: &Ministries, mode: RtcMode, e2ee: bool, ban: bool) {
    let run = match (mode, e2ee) {
        (RtcMode::Compatibility, false) => "cascade-plain",
        (RtcMode::Compatibility, true) => "cascade-e2ee",
        (RtcMode::Matrix20, _) => "cascade-m2",
    };
    let Call {
        alice,
        bob,
        room,
        dir,
        mut driver,
    } = start_call(m, mode, e2ee, run).await;
    let logs =
        || Conclave::two_log_excerpts(&m.c1, &m.c2, &["cascade", "mirror", "relay", " WARN "]);
    let in_call = match driver
        .wait_event("in_call", Duration::from_secs(IN_CALL_TIMEOUT_S + 30))
        .await
    {
        Ok(ev) => ev,
        Err(e) => {
            // Both Conclaves' whole logs beside the screenshots, for the diagnosis.
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join("conclave-1.log"), m.c1.logs());
            let _ = std::fs::write(dir.join("conclave-2.log"), m.c2.logs());
            // The Conclaves' lines first: CI keeps the head and the tail of a failure's
            // output, and the driver's report (pages, consoles) is long.
            let report = format!("{e:#}");
            let headline: String = report
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            panic!(
                "{run}: {headline}\n{}\nministries: {}\n(whole logs in {})\n{report}",
                logs(),
                m.health().await,
                dir.display()
            )
        }
    };
    assert_in_call(&in_call);
    // Every media connection of a page goes to its own Conclave's media address.
    for (who, ip) in [("alice", "127.0.0.1"), ("bob", CONCLAVE_2_MEDIA_IP)] {
        let remotes = in_call["pages"][who]["media_remotes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            !remotes.is_empty()
                && remotes
                    .iter()
                    .all(|r| r.as_str().is_some_and(|r| r.starts_with(&format!("{ip}:")))),
            "{run}: {who}'s media goes to {remotes:?}, not only to {ip}\n{}",
            logs()
        );
    }
    // Neither Conclave serves the other ministry's user.
    for (c, stranger) in [(&m.c1, &bob.user_id), (&m.c2, &alice.user_id)] {
        let v = sfu_view(c, &room).await;
        assert!(
            !v.iter().any(|(u, _)| u == stranger),
            "{run}: {} serves {stranger}: {v:?}",
            c.url
        );
    }
    if mode == RtcMode::Compatibility && !e2ee {
        // A second hs2 member watches too: still one relay of alice's tracks at Conclave-1
        // (the roster and one media connection for alice), none per hs2 subscriber.
        let mut carol = second_hs2_viewer(m, &bob, &room).await;
        carol
            .wait_event("expectations_met", Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{run}: carol sees alice's video: {e}\n{}", logs()));
        let origin =
            m.c1.sfu_room_view(
                &legacy_room_name(&room),
                crate::support::element_call::ADMIN_TOKEN,
            )
            .await
            .expect("Conclave-1's SFU room");
        let relays: Vec<String> = origin["participants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["identity"].as_str())
            .filter(|i| i.starts_with("cascade:"))
            .map(str::to_owned)
            .collect();
        let roster = format!("cascade:{}", m.hs2.server_name);
        // Conclave-2's admin API shows its mirror of the call: alice's mirror and the local
        // participants receiving it.
        let call2 = admin_call(&m.c2, &room).await.expect("Conclave-2's call");
        let mirror = &call2["mirrors"][0];
        let users: Vec<&str> = mirror["participants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["user_id"].as_str())
            .collect();
        assert!(
            users.contains(&bob.user_id.as_str()) && users.iter().any(|u| u.starts_with("@carol")),
            "{run}: Conclave-2's mirror view: {call2}"
        );
        assert!(
            mirror["participants"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["identity"]
                    .as_str()
                    .is_some_and(|i| i.starts_with(&alice.user_id))
                    && p["publisher"] == true),
            "{run}: alice's mirror publishes at Conclave-2: {call2}"
        );
        assert_eq!(
            relays.len(),
            2,
            "{run}: relays at Conclave-1: {relays:?}\n{origin}"
        );
        assert!(relays.contains(&roster), "{run}: {relays:?}");
        assert!(
            relays
                .iter()
                .any(|r| r.starts_with(&format!("{roster}|{}", alice.user_id))),
            "{run}: {relays:?}"
        );
        // Element Call publishes its camera in simulcast layers: all of them cross, each
        // once, so Conclave-2 chooses per viewer.
        let video_layers: Vec<Value> = origin["participants"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["relayed"].as_array().cloned().unwrap_or_default())
            .filter(|t| t["kind"] == "video")
            .map(|t| t["layers"].clone())
            .collect();
        eprintln!("{run}: alice's camera relayed in layers {video_layers:?}");
        assert!(
            video_layers
                .iter()
                .any(|l| l.as_array().is_some_and(|l| l.len() >= 2)),
            "{run}: every simulcast layer relayed: {origin}"
        );
        drop(carol);
    }
    if ban {
        let seen = ban_alice(&mut driver, (&alice, &bob, &room), logs).await;
        eprintln!(
            "cascade ban: alice's media stopped at bob's page after {} ms",
            seen["media_stopped_ms"]
        );
    }
    driver.quit().await;
}

/// With either ministry's Conclave down, the test says so within its bounded wait (not a
/// hang) and names the Conclave that is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_call_reports_a_conclave_down() {
    let _heavy = heavy_lock();
    for down in [1, 2] {
        let mut m = Ministries::start().await.expect("two ministries");
        let (gone, up) = if down == 1 {
            (&mut m.c1, m.c2.url.clone())
        } else {
            (&mut m.c2, m.c1.url.clone())
        };
        let gone_url = gone.url.clone();
        gone.stop().await.expect("stopping a Conclave");
        let bob = m.hs2.register("bob", true).await.expect("bob");
        let alice = m.hs1.register("alice", false).await.expect("alice");
        let room = shared_room(&m, &bob, &alice, false).await;
        let started = std::time::Instant::now();
        let mut driver = EcDriver::spawn(
            &pages(&m, &room, &alice, &bob, false),
            RtcMode::Compatibility,
            DOWN_TIMEOUT_S,
            &screenshot_dir(&format!("down-{down}")),
        )
        .expect("driver");
        let err = driver
            .wait_event("in_call", Duration::from_secs(DOWN_TIMEOUT_S + 30))
            .await
            .expect_err("no call without one ministry's SFU");
        let health = m.health().await;
        let message = format!("{err:#}\nministries: {health}");
        assert!(
            started.elapsed() < Duration::from_secs(DOWN_TIMEOUT_S + 35),
            "bounded: {message}"
        );
        assert!(
            message.contains(&format!("no two-way media within {DOWN_TIMEOUT_S} s")),
            "the driver names what did not happen: {message}"
        );
        let other = 3 - down;
        assert!(
            health.contains(&format!("Conclave-{down} (hs{down}) at {gone_url} is DOWN"))
                && health.contains(&format!("Conclave-{other} (hs{other}) at {up} is up")),
            "the failure names the Conclave that is down: {health}"
        );
        driver.quit().await;
    }
}

/// The driver's bound on reaching two-way media in the Conclave-down test.
const DOWN_TIMEOUT_S: u64 = 30;
