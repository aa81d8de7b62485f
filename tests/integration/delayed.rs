//! "No ghost members": a client hands its MSC4140 delayed leave to the token service; Conclave
//! keeps it alive while the SFU connection lasts and sends it the moment the connection ends.

use std::time::{Duration, Instant};

use conclave::matrix::naming::LEGACY_SLOT;
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::conclave::{
    pair_with_conclave_on_hs1, post_json as post, wait_joined, Conclave,
};
use crate::support::lk_ws::{expect_join, WsClient};
use crate::support::matrix_client::{TestUser, CALL_MEMBER};
use crate::support::synapse::heavy_lock;

/// The `/get_token` body for `user` in `room`, with a delayed leave if `delay` is given.
async fn token_body(user: &TestUser, room: &str, delay: Option<(&str, u64)>) -> Value {
    let openid = user.openid_token().await.unwrap();
    let mut body = json!({
        "room_id": room, "slot_id": LEGACY_SLOT, "openid_token": openid,
        "member": {"id": format!("m-{}", user.device_id), "claimed_user_id": user.user_id,
                   "claimed_device_id": user.device_id},
    });
    if let Some((id, timeout)) = delay {
        body["delay_id"] = json!(id);
        body["delay_timeout"] = json!(timeout);
        body["delay_cs_api_url"] = json!(user.client_url);
    }
    body
}

/// `/get_token`, handing over a delayed leave if `delay` is given.
async fn get_token(
    c: &Conclave,
    user: &TestUser,
    room: &str,
    delay: Option<(&str, u64)>,
) -> (StatusCode, Value) {
    post(c, "/get_token", &token_body(user, room, delay).await).await
}

/// The `call.member` content Element Call sends for a room call.
fn call_member(user: &TestUser, c: &Conclave) -> Value {
    json!({
        "application": "m.call",
        "call_id": "",
        "scope": "m.room",
        "device_id": user.device_id,
        "membershipID": format!("{}:{}", user.user_id, user.device_id),
        "expires": 14_400_000,
        "m.call.intent": "video",
        "focus_active": {"type": "livekit", "focus_selection": "multi_sfu"},
        "foci_preferred": [{"type": "livekit", "livekit_service_url": c.url}],
    })
}

fn is_empty(content: &Value) -> bool {
    content.as_object().is_some_and(|o| o.is_empty())
}

/// alice in a fresh call room with her call.member sent and a delayed leave scheduled; returns
/// (room, state key, delay_id).
async fn join_call_with_delayed_leave(
    c: &Conclave,
    alice: &TestUser,
    delay_ms: u64,
) -> (String, String, String) {
    let room = alice.create_call_room(&[]).await.unwrap();
    wait_joined(c, &room, &alice.user_id).await;
    let key = alice.call_member_state_key();
    alice
        .send_state(&room, CALL_MEMBER, &key, call_member(alice, c))
        .await
        .unwrap();
    let delay_id = alice
        .send_delayed_state(&room, CALL_MEMBER, &key, json!({}), delay_ms)
        .await
        .unwrap();
    (room, key, delay_id)
}

/// Connects to the SFU with a token that hands over a delayed leave if `delay` is given.
async fn connect(
    c: &Conclave,
    alice: &TestUser,
    room: &str,
    delay: Option<(&str, u64)>,
) -> WsClient {
    let (s, t) = get_token(c, alice, room, delay).await;
    assert_eq!(s, 200, "{t}");
    let mut ws = WsClient::connect(&c.ws_url(), t["jwt"].as_str().unwrap(), "")
        .await
        .unwrap();
    expect_join(&mut ws).await.unwrap();
    ws
}

/// Drops `ws` (a crash: the socket just goes away) and checks that Conclave sends the
/// delayed leave at once: `call.member` is empty within 5 s, and the delay ID (a capability)
/// never appears in the log in full.
async fn crash_clears_call_member(
    ws: WsClient,
    c: &Conclave,
    alice: &TestUser,
    room: &str,
    key: &str,
    delay_id: &str,
) {
    drop(ws);
    let crashed = Instant::now();
    alice
        .wait_for_state(room, CALL_MEMBER, key, Duration::from_secs(5), is_empty)
        .await
        .unwrap();
    eprintln!(
        "call.member cleared {:?} after the crash",
        crashed.elapsed()
    );
    let logs = c.logs();
    assert!(logs.contains("delayed leave sent"), "{logs}");
    assert!(!logs.contains(delay_id), "delay_id leaked into the log");
}

#[tokio::test]
async fn crashed_client_call_member_is_cleared_within_5s() {
    let _heavy = heavy_lock();
    let (hs1, _hs2, c) = pair_with_conclave_on_hs1(&[]).await.unwrap();
    let alice = hs1.register("alice", false).await.unwrap();
    let (room, key, delay_id) = join_call_with_delayed_leave(&c, &alice, 600_000).await;
    let ws = connect(&c, &alice, &room, Some((&delay_id, 600_000))).await;
    // The membership is there while she is connected.
    let content = alice.get_state(&room, CALL_MEMBER, &key).await.unwrap();
    assert_eq!(content["application"], "m.call", "{content}");

    // The client crashes: the socket just goes away.
    crash_clears_call_member(ws, &c, &alice, &room, &key, &delay_id).await;
    drop(hs1);
}

#[tokio::test]
async fn connected_client_keeps_its_call_member_alive() {
    let _heavy = heavy_lock();
    let (hs1, _hs2, c) = pair_with_conclave_on_hs1(&[]).await.unwrap();
    let alice = hs1.register("alice", false).await.unwrap();
    let (room, key, delay_id) = join_call_with_delayed_leave(&c, &alice, 4_000).await;
    let mut ws = connect(&c, &alice, &room, Some((&delay_id, 4_000))).await;

    // Stay connected (a well-behaved client pings) for more than twice the delay.
    let joined = Instant::now();
    while joined.elapsed() < Duration::from_secs(9) {
        ws.send(Req::Ping(0)).await.unwrap();
        // Reading keeps the socket serviced; `recv` returns on timeout.
        let deadline = Instant::now() + Duration::from_millis(1000);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if ws.recv(left).await.is_none() {
                break;
            }
        }
        let content = alice.get_state(&room, CALL_MEMBER, &key).await.unwrap();
        assert_eq!(
            content["application"],
            "m.call",
            "call.member gone {:?} after joining with a 4 s delayed leave: {content}",
            joined.elapsed()
        );
    }

    // A clean leave clears it at once.
    ws.send(Req::Leave(lk::LeaveRequest {
        can_reconnect: false,
        reason: lk::DisconnectReason::ClientInitiated as i32,
        action: lk::leave_request::Action::Disconnect as i32,
        regions: None,
    }))
    .await
    .unwrap();
    drop(ws);
    let left = Instant::now();
    alice
        .wait_for_state(&room, CALL_MEMBER, &key, Duration::from_secs(3), is_empty)
        .await
        .unwrap();
    eprintln!("call.member cleared {:?} after the leave", left.elapsed());
    assert!(c.logs().contains("delayed leave sent"), "{}", c.logs());
    drop(hs1);
}

#[tokio::test]
async fn reconnecting_client_keeps_its_call_member() {
    let _heavy = heavy_lock();
    let (hs1, _hs2, c) = pair_with_conclave_on_hs1(&[]).await.unwrap();
    let alice = hs1.register("alice", false).await.unwrap();
    let (room, key, delay_id) = join_call_with_delayed_leave(&c, &alice, 600_000).await;
    let (s, t) = get_token(&c, &alice, &room, Some((&delay_id, 600_000))).await;
    assert_eq!(s, 200, "{t}");
    let jwt = t["jwt"].as_str().unwrap();
    let mut first = WsClient::connect(&c.ws_url(), jwt, "").await.unwrap();
    expect_join(&mut first).await.unwrap();

    // The same identity joins again (a full reconnect): the old session is replaced with
    // DUPLICATE_IDENTITY, which must not count as leaving the call.
    let mut second = WsClient::connect(&c.ws_url(), jwt, "").await.unwrap();
    expect_join(&mut second).await.unwrap();
    assert!(first.closed_within(Duration::from_secs(2)).await);
    drop(first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let content = alice.get_state(&room, CALL_MEMBER, &key).await.unwrap();
    assert_eq!(content["application"], "m.call", "{content}");

    // The new session's connection ending does clear it.
    drop(second);
    alice
        .wait_for_state(&room, CALL_MEMBER, &key, Duration::from_secs(5), is_empty)
        .await
        .unwrap();
    drop(hs1);
}

/// lk-jwt-service's separate delegation (what Element Call does when the token service
/// supports it): the token request carries no delayed leave; once connected, the client hands
/// it over with `POST /delegate_delayed_leave`, and a crash still clears its membership at once.
#[tokio::test]
async fn delayed_leave_delegated_after_connecting_is_sent_on_crash() {
    let _heavy = heavy_lock();
    let (hs1, _hs2, c) = pair_with_conclave_on_hs1(&[]).await.unwrap();
    let alice = hs1.register("alice", false).await.unwrap();
    let (room, key, delay_id) = join_call_with_delayed_leave(&c, &alice, 600_000).await;

    // Bad delegations are refused clearly: Element Call's empty probe, no delay, a forged
    // OpenID token.
    let r = reqwest::Client::new()
        .post(format!("{}/delegate_delayed_leave", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let (s, b) = post(
        &c,
        "/delegate_delayed_leave",
        &token_body(&alice, &room, None).await,
    )
    .await;
    assert_eq!(
        (s.as_u16(), b["errcode"].as_str()),
        (400, Some("M_BAD_JSON")),
        "{b}"
    );
    let mut forged = token_body(&alice, &room, Some((&delay_id, 600_000))).await;
    forged["openid_token"]["access_token"] = json!("forged");
    let (s, b) = post(&c, "/delegate_delayed_leave", &forged).await;
    assert_eq!(s, 401, "{b}");

    // Connect with a plain token, then delegate.
    let ws = connect(&c, &alice, &room, None).await;
    let body = token_body(&alice, &room, Some((&delay_id, 600_000))).await;
    let (s, b) = post(&c, "/delegate_delayed_leave", &body).await;
    assert_eq!((s.as_u16(), &b), (200, &json!({})));
    let content = alice.get_state(&room, CALL_MEMBER, &key).await.unwrap();
    assert_eq!(content["application"], "m.call", "{content}");

    crash_clears_call_member(ws, &c, &alice, &room, &key, &delay_id).await;
    assert!(c.logs().contains("delayed leave delegated"));
    drop(hs1);
}
