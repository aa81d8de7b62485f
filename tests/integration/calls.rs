//! Calls follow Matrix: a user who leaves, is kicked or is banned from the Matrix room loses
//! their SFU connection at once and gets no new token.

use std::time::{Duration, Instant};

use conclave::auth::naming::LEGACY_SLOT;
use livekit_protocol as lk;
use lk::signal_response::Message as Msg;
use ruma::events::room::member::MembershipState;
use serde_json::{json, Value};

use crate::support::conclave::{eventually, pair_with_conclave_on_hs1, Conclave};
use crate::support::lk_ws::{expect_join, WsClient};
use crate::support::matrix_client::TestUser;
use crate::support::synapse::heavy_lock;

async fn get_token(c: &Conclave, user: &TestUser, room: &str) -> (u16, Value) {
    let openid = user.openid_token().await.unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/get_token", c.url))
        .json(&json!({
            "room_id": room, "slot_id": LEGACY_SLOT, "openid_token": openid,
            "member": {"id": format!("m-{}", user.device_id), "claimed_user_id": user.user_id,
                       "claimed_device_id": user.device_id},
        }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn wait_joined(c: &Conclave, room: &str, user: &str) {
    use conclave::store::Store;
    let store = c.store().unwrap();
    let (r, u) = (
        ruma::RoomId::parse(room).unwrap(),
        ruma::UserId::parse(user).unwrap(),
    );
    eventually(Duration::from_secs(10), "join in the store", || async {
        Ok(store
            .membership(&r, &u)?
            .filter(|m| m.membership == MembershipState::Join)
            .map(|_| ()))
    })
    .await
    .unwrap();
}

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
