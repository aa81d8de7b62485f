//! Calls follow Matrix: a user who leaves, is kicked or is banned from the Matrix room loses
//! their SFU connection at once and gets no new token.

use std::time::{Duration, Instant};

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;
use serde_json::{json, Value};

use crate::support::conclave::{
    eventually, get_token, pair_with_conclave_on_hs1, wait_joined, Conclave,
};
use crate::support::lk_ws::{expect_join, WsClient};
use crate::support::matrix_client::TestUser;
use crate::support::synapse::heavy_lock;

#[tokio::test]
async fn leaving_kicked_and_banned_users_are_removed_from_the_sfu_within_2s() {
    let _heavy = heavy_lock();
    let (hs1, _hs2, c) = pair_with_conclave_on_hs1(&[]).await.unwrap();
    let alice = hs1.register("alice", false).await.unwrap();
    let others = [
        hs1.register("bob", false).await.unwrap(),
        hs1.register("carol", false).await.unwrap(),
        hs1.register("dave", false).await.unwrap(),
    ];
    let invites: Vec<&str> = others.iter().map(|u| u.user_id.as_str()).collect();
    let room = alice.create_call_room(&invites).await.unwrap();
    for u in &others {
        u.join(&room, &[]).await.unwrap();
        wait_joined(&c, &room, &u.user_id).await;
    }
    wait_joined(&c, &room, &alice.user_id).await;

    // Everybody joins the SFU with a token from the token service.
    let (s, t) = get_token(&c, &alice, &room).await;
    assert_eq!(s, 200, "{t}");
    let mut alice_ws = WsClient::connect(&c.ws_url(), t["jwt"].as_str().unwrap(), "")
        .await
        .unwrap();
    expect_join(&mut alice_ws).await.unwrap();
    let mut sockets = Vec::new();
    for u in &others {
        let (s, t) = get_token(&c, u, &room).await;
        assert_eq!(s, 200, "{t}");
        let mut ws = WsClient::connect(&c.ws_url(), t["jwt"].as_str().unwrap(), "")
            .await
            .unwrap();
        let sid = expect_join(&mut ws).await.unwrap().participant.unwrap().sid;
        sockets.push((ws, sid));
    }

    // bob is banned, carol kicked, dave leaves.
    for (i, action) in ["ban", "kick", "leave"].into_iter().enumerate() {
        let user = &others[i];
        let started = Instant::now();
        match action {
            "ban" => alice.ban(&room, &user.user_id, Some("test")).await.unwrap(),
            "kick" => alice
                .kick(&room, &user.user_id, Some("test"))
                .await
                .unwrap(),
            _ => user.leave(&room).await.unwrap(),
        }
        let (ws, sid) = &mut sockets[i];
        let seen = ws
            .recv_until(Duration::from_secs(2), |m| matches!(m, Msg::Leave(_)))
            .await
            .unwrap_or_else(|e| panic!("{action}: no leave within 2 s: {e}"));
        let Some(Msg::Leave(l)) = seen.last() else {
            unreachable!()
        };
        assert_eq!(
            l.reason,
            lk::DisconnectReason::ParticipantRemoved as i32,
            "{action}: the reason the client shows"
        );
        assert!(
            ws.closed_within(Duration::from_secs(2)).await,
            "{action}: socket closed"
        );
        eprintln!("{action}: removed after {:?}", started.elapsed());
        // The others see the participant leave.
        let sid = sid.clone();
        alice_ws
            .recv_until(Duration::from_secs(2), |m| {
                matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.sid == sid && p.state == lk::participant_info::State::Disconnected as i32))
            })
            .await
            .unwrap();
        // And no new token.
        let (s, b) = get_token(&c, user, &room).await;
        assert_eq!(s, 403, "{action}: {b}");
    }
    drop(hs1);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn call_member(user: &TestUser, expires: i64, created_ts: Option<i64>) -> Value {
    let mut c = json!({
        "application": "m.call", "call_id": "", "scope": "m.room",
        "device_id": user.device_id, "expires": expires,
        "focus_active": {"type": "livekit", "focus_selection": "multi_sfu"},
        "foci_preferred": [{"type": "livekit", "livekit_service_url": "http://127.0.0.1"}],
    });
    if let Some(ts) = created_ts {
        c["created_ts"] = json!(ts);
    }
    c
}

async fn admin(c: &Conclave, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{}/_conclave/admin/v1/{path}", c.url))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The bot's `m.notice` texts in `room`, as `user` reads them.
pub async fn notices(user: &TestUser, room: &str) -> Vec<String> {
    let url = user
        .url(
            &["_matrix", "client", "v3", "rooms", room, "messages"],
            &[("dir", "b"), ("limit", "100")],
        )
        .unwrap();
    let v = user.call(reqwest::Method::GET, url, None).await.unwrap();
    v["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["content"]["msgtype"] == "m.notice")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// call.member events drive the call model: two members with real Python clients show in both
/// admin views; notices announce start and end; clearing a membership or sending an expired one
/// removes the participant; a participant without membership goes after the grace period;
/// malformed memberships are ignored without blocking the queue.
#[tokio::test]
async fn call_membership_drives_the_sfu() {
    let _heavy = heavy_lock();
    let (hs1, _hs2, c) = pair_with_conclave_on_hs1(&[
        ("CONCLAVE_ADMIN__TOKEN", "admin-secret"),
        ("CONCLAVE_CALLS__GRACE_PERIOD_SECS", "3"),
    ])
    .await
    .unwrap();
    let bot = format!("@conclave:{}", hs1.server_name);
    let alice = hs1.register("alice", false).await.unwrap();
    let bob = hs1.register("bob", false).await.unwrap();
    let carol = hs1.register("carol", false).await.unwrap();
    let room = alice
        .create_call_room(&[&bob.user_id, &carol.user_id, &bot])
        .await
        .unwrap();
    bob.join(&room, &[]).await.unwrap();
    carol.join(&room, &[]).await.unwrap();
    wait_joined(&c, &room, &carol.user_id).await;
    wait_joined(&c, &room, &bot).await;

    // Malformed memberships first: logged, ignored, the queue keeps flowing.
    let key = alice.call_member_state_key();
    for bad in [
        json!({"application": 5, "device_id": alice.device_id}),
        json!({"application": "m.call", "device_id": ["x"]}),
        json!({"application": "org.example.unknown", "device_id": alice.device_id}),
    ] {
        alice
            .send_state(&room, crate::support::matrix_client::CALL_MEMBER, &key, bad)
            .await
            .unwrap();
    }
    // (Synapse itself refuses state keys over 255 bytes; huge keys arriving in a transaction
    // are covered by `appservice::malformed_call_members_never_block_the_queue`.)

    // alice and bob join the call: membership, token, Python client publishing audio.
    let mut clients = Vec::new();
    for u in [&alice, &bob] {
        u.send_state(
            &room,
            crate::support::matrix_client::CALL_MEMBER,
            &u.call_member_state_key(),
            call_member(u, 14_400_000, None),
        )
        .await
        .unwrap();
    }
    // Calls appear in the admin API once the events arrived.
    eventually(Duration::from_secs(10), "two call members", || async {
        let (s, v) = admin(&c, "calls").await;
        Ok(
            (s == 200 && v["calls"][0]["matrix"]["members"].as_array().map(Vec::len) == Some(2))
                .then_some(()),
        )
    })
    .await
    .unwrap();
    assert!(
        c.metric("conclave_appservice_events_malformed_total")
            .await
            .unwrap()
            >= 3
    );
    for u in [&alice, &bob] {
        let (s, t) = get_token(&c, u, &room).await;
        assert_eq!(s, 200, "{t}");
        let mut spec = crate::support::lk_clients::PyClientSpec::new(
            c.ws_url(),
            t["jwt"].as_str().unwrap(),
            u.user_id.as_str(),
        );
        spec.publish_video = false;
        spec.timeout_s = 40.0;
        spec.min_duration_s = 40.0;
        clients.push(crate::support::lk_clients::PyClient::spawn(spec).unwrap());
    }
    for client in &mut clients {
        client
            .wait_event("published", Duration::from_secs(20))
            .await
            .unwrap();
    }
    let (s, v) = admin(&c, &format!("calls/{room}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["matrix"]["members"].as_array().unwrap().len(), 2, "{v}");
    // The SFU room's SID: the one the participants got in their join response.
    let sid = v["sfu"]["sid"].as_str().unwrap_or_default();
    assert!(sid.starts_with("RM_"), "{v}");
    for client in &clients {
        let connected = client
            .events()
            .into_iter()
            .find(|e| e["event"] == "connected")
            .expect("a connected event");
        assert_eq!(connected["room_sid"], sid, "{connected}");
    }
    let sfu: Vec<&Value> = v["sfu"]["participants"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(sfu.len(), 2, "{v}");
    assert!(sfu.iter().all(|p| p["publisher"] == true), "{v}");
    let mut users: Vec<&str> = sfu.iter().map(|p| p["user_id"].as_str().unwrap()).collect();
    users.sort();
    let mut want = vec![alice.user_id.as_str(), bob.user_id.as_str()];
    want.sort();
    assert_eq!(users, want);
    // Wrong or missing admin token; unknown room.
    let r = reqwest::get(format!("{}/_conclave/admin/v1/calls", c.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (s, _) = admin(&c, "calls/!nope:example.org").await;
    assert_eq!(s, 404);

    // carol takes a token and connects without any call membership: gone after the grace.
    let (s, t) = get_token(&c, &carol, &room).await;
    assert_eq!(s, 200);
    let mut carol_ws = WsClient::connect(&c.ws_url(), t["jwt"].as_str().unwrap(), "")
        .await
        .unwrap();
    expect_join(&mut carol_ws).await.unwrap();
    let started = Instant::now();
    carol_ws
        .recv_until(Duration::from_secs(6), |m| matches!(m, Msg::Leave(_)))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not before the grace period"
    );

    // alice clears her membership: removed within 2 s.
    alice
        .send_state(
            &room,
            crate::support::matrix_client::CALL_MEMBER,
            &alice.call_member_state_key(),
            json!({}),
        )
        .await
        .unwrap();
    let mut alice_client = clients.remove(0);
    alice_client
        .wait_event("disconnected", Duration::from_secs(3))
        .await
        .unwrap();
    // bob sends a membership that expired long ago: treated as left, removed.
    bob.send_state(
        &room,
        crate::support::matrix_client::CALL_MEMBER,
        &bob.call_member_state_key(),
        call_member(&bob, 3_600_000, Some(now_ms() - 10 * 3_600_000)),
    )
    .await
    .unwrap();
    let mut bob_client = clients.remove(0);
    bob_client
        .wait_event("disconnected", Duration::from_secs(3))
        .await
        .unwrap();
    // The call ended; notices tell the room (the bot accepted its invite).
    eventually(Duration::from_secs(10), "call ended", || async {
        let (_, v) = admin(&c, "calls").await;
        Ok(v["calls"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(()))
    })
    .await
    .unwrap();
    let texts = eventually(Duration::from_secs(10), "notices", || async {
        let n = notices(&alice, &room).await;
        Ok((n.iter().any(|t| t.contains("started a call"))
            && n.iter().any(|t| t.contains("Call ended")))
        .then_some(n))
    })
    .await
    .unwrap();
    assert!(
        texts.iter().any(|t| t.contains("up to 2 participants")),
        "{texts:?}"
    );
    drop(hs1);
}

/// Call state survives a restart, and a member who left while Conclave was down is closed
/// once Synapse redelivers what it queued.
#[tokio::test]
async fn call_state_survives_restart_and_reconciles() {
    let _heavy = heavy_lock();
    let (hs1, _hs2, mut c) =
        pair_with_conclave_on_hs1(&[("CONCLAVE_ADMIN__TOKEN", "admin-secret")])
            .await
            .unwrap();
    let alice = hs1.register("alice", false).await.unwrap();
    let bob = hs1.register("bob", false).await.unwrap();
    let room = alice.create_call_room(&[&bob.user_id]).await.unwrap();
    bob.join(&room, &[]).await.unwrap();
    for u in [&alice, &bob] {
        u.send_state(
            &room,
            crate::support::matrix_client::CALL_MEMBER,
            &u.call_member_state_key(),
            call_member(u, 14_400_000, None),
        )
        .await
        .unwrap();
    }
    eventually(Duration::from_secs(10), "two members", || async {
        let (_, v) = admin(&c, "calls").await;
        Ok((v["calls"][0]["matrix"]["members"].as_array().map(Vec::len) == Some(2)).then_some(()))
    })
    .await
    .unwrap();
    c.stop().await.unwrap();
    // bob leaves the call while Conclave is down.
    bob.send_state(
        &room,
        crate::support::matrix_client::CALL_MEMBER,
        &bob.call_member_state_key(),
        json!({}),
    )
    .await
    .unwrap();
    c.spawn().await.unwrap();
    let members = eventually(Duration::from_secs(20), "reconciled call", || async {
        let (_, v) = admin(&c, "calls").await;
        let m = v["calls"][0]["matrix"]["members"].clone();
        Ok((m.as_array().map(Vec::len) == Some(1)).then_some(m))
    })
    .await
    .unwrap();
    assert_eq!(members[0]["user_id"], alice.user_id.as_str());
    drop(hs1);
}

/// In an encrypted room the appservice cannot read `rtc.member`: Matrix room membership alone
/// decides, so a joined user's SFU participant is not removed for lacking a call membership.
/// The admin API shows such a call from its SFU side.
#[tokio::test]
async fn encrypted_rooms_rely_on_room_membership_alone() {
    let _heavy = heavy_lock();
    let (hs1, _hs2, c) = pair_with_conclave_on_hs1(&[
        ("CONCLAVE_CALLS__GRACE_PERIOD_SECS", "2"),
        ("CONCLAVE_ADMIN__TOKEN", "admin-secret"),
    ])
    .await
    .unwrap();
    let alice = hs1.register("alice", false).await.unwrap();
    let room = alice
        .create_room(json!({
            "preset": "private_chat",
            "initial_state": [{"type": "m.room.encryption", "state_key": "",
                               "content": {"algorithm": "m.megolm.v1.aes-sha2"}}],
        }))
        .await
        .unwrap();
    wait_joined(&c, &room, &alice.user_id).await;
    use conclave::store::Store;
    let store = c.store().unwrap();
    let rid = ruma::RoomId::parse(&room).unwrap();
    eventually(Duration::from_secs(10), "encryption seen", || async {
        Ok(store.is_room_encrypted(&rid)?.then_some(()))
    })
    .await
    .unwrap();
    let (s, t) = get_token(&c, &alice, &room).await;
    assert_eq!(s, 200, "{t}");
    let mut ws = WsClient::connect(&c.ws_url(), t["jwt"].as_str().unwrap(), "")
        .await
        .unwrap();
    expect_join(&mut ws).await.unwrap();
    // Well past the grace period: still connected (pings answered).
    tokio::time::sleep(Duration::from_secs(4)).await;
    ws.send(lk::signal_request::Message::PingReq(lk::Ping {
        timestamp: 5,
        rtt: 0,
    }))
    .await
    .unwrap();
    let seen = ws
        .recv_until(Duration::from_secs(3), |m| {
            matches!(m, Msg::PongResp(_) | Msg::Leave(_))
        })
        .await
        .unwrap();
    assert!(matches!(seen.last(), Some(Msg::PongResp(_))), "{seen:?}");
    let path = format!("calls/{room}");
    let (status, call) = admin(&c, &path).await;
    assert_eq!(status, 200, "{call}");
    assert_eq!(call["matrix"]["members"], json!([]), "{call}");
    assert_eq!(
        call["sfu"]["participants"][0]["user_id"],
        alice.user_id.as_str(),
        "{call}"
    );
    let (_, all) = admin(&c, "calls").await;
    assert!(!all.to_string().contains(&room), "not listed: {all}");
    drop(ws);
    eventually(Duration::from_secs(10), "SFU room empty", || async {
        Ok((admin(&c, &path).await.0 == 404).then_some(()))
    })
    .await
    .unwrap();
    drop(hs1);
}
