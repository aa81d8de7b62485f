//! The appservice API: authentication, bad input, idempotent transactions, and the real
//! Synapse feeding memberships, pings and retried transactions.

use std::time::Duration;

use conclave::store::Store;
use reqwest::StatusCode;
use ruma::events::room::member::MembershipState;
use serde_json::{json, Value};

use crate::support::conclave::{eventually, Conclave, ConclaveOptions};
use crate::support::synapse::{heavy_lock, Homeserver, HsOptions};

fn rid(s: &str) -> ruma::OwnedRoomId {
    ruma::RoomId::parse(s).unwrap()
}

fn uid(s: &str) -> ruma::OwnedUserId {
    ruma::UserId::parse(s).unwrap()
}

fn member_event(event_id: &str, room: &str, user: &str, membership: &str) -> Value {
    json!({
        "type": "m.room.member",
        "event_id": event_id,
        "room_id": room,
        "sender": user,
        "state_key": user,
        "origin_server_ts": 1_700_000_000_000u64,
        "content": { "membership": membership }
    })
}

async fn put_txn(
    c: &Conclave,
    txn: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .put(format!("{}/_matrix/app/v1/transactions/{txn}", c.url))
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn bad_requests_get_matrix_errors_and_change_nothing() {
    let c = Conclave::start(
        ConclaveOptions::standalone().env("CONCLAVE_HTTP__MAX_BODY_BYTES", "65536"),
    )
    .await
    .unwrap();
    let token = c.hs_token();
    let good = serde_json::to_vec(&json!({
        "events": [member_event("$e1", "!r:localhost", "@a:localhost", "join")]
    }))
    .unwrap();

    let (s, b) = put_txn(&c, "t1", None, good.clone()).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_MISSING_TOKEN"))
    );

    let (s, b) = put_txn(&c, "t1", Some("wrong"), good.clone()).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_FORBIDDEN"))
    );

    // Legacy query token, wrong.
    let r = reqwest::Client::new()
        .put(format!(
            "{}/_matrix/app/v1/transactions/t1?access_token=nope",
            c.url
        ))
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    let huge = vec![b' '; 70_000];
    let (s, b) = put_txn(&c, "t1", Some(&token), huge).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("M_TOO_LARGE"))
    );

    let (s, b) = put_txn(&c, "t1", Some(&token), b"{not json".to_vec()).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_NOT_JSON"))
    );

    let (s, b) = put_txn(&c, "t1", Some(&token), br#"{"events": 5}"#.to_vec()).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_BAD_JSON"))
    );

    let store = c.store().unwrap();
    assert_eq!(
        store.processed_transactions().unwrap(),
        0,
        "no rejected request touched the store"
    );
    assert!(store
        .membership(&rid("!r:localhost"), &uid("@a:localhost"))
        .unwrap()
        .is_none());
    assert_eq!(
        c.metric("conclave_appservice_transactions_rejected_total")
            .await
            .unwrap(),
        6
    );

    // The same txnId is still accepted afterwards with a good token.
    let (s, _) = put_txn(&c, "t1", Some(&token), good).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(store.processed_transactions().unwrap(), 1);

    // Unknown endpoints and methods are Matrix errors too.
    let r = reqwest::get(format!("{}/_matrix/app/v1/nothing", c.url))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errcode"],
        "M_UNRECOGNIZED"
    );
    let r = reqwest::get(format!("{}/_matrix/app/v1/transactions/x", c.url))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn replayed_transaction_is_applied_once_and_malformed_events_are_skipped() {
    let c = Conclave::start(ConclaveOptions::standalone())
        .await
        .unwrap();
    let token = c.hs_token();
    let body = serde_json::to_vec(&json!({
        "events": [
            { "type": "m.room.member", "garbage": true },
            member_event("$join1", "!room:localhost", "@bob:localhost", "join"),
            "not even an object",
            member_event("$bad", "!room:localhost", "not-a-user-id", "join"),
        ]
    }))
    .unwrap();
    for _ in 0..3 {
        let (s, b) = put_txn(&c, "replay-me", Some(&token), body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b, json!({}));
    }
    // The legacy unprefixed path shares the same txnId space.
    let r = reqwest::Client::new()
        .put(format!("{}/transactions/replay-me", c.url))
        .bearer_auth(&token)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let store = c.store().unwrap();
    assert_eq!(store.processed_transactions().unwrap(), 1);
    assert_eq!(
        store
            .membership_event_applications(&ruma::EventId::parse("$join1").unwrap())
            .unwrap(),
        1
    );
    let m = store
        .membership(&rid("!room:localhost"), &uid("@bob:localhost"))
        .unwrap()
        .unwrap();
    assert_eq!(m.membership, MembershipState::Join);
    assert_eq!(
        c.metric("conclave_appservice_transactions_replayed_total")
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        c.metric("conclave_appservice_events_malformed_total")
            .await
            .unwrap(),
        3
    );
}

#[tokio::test]
async fn user_and_alias_queries() {
    let c = Conclave::start(ConclaveOptions::standalone())
        .await
        .unwrap();
    let token = c.hs_token();
    let http = reqwest::Client::new();
    let r = http
        .get(format!(
            "{}/_matrix/app/v1/users/@conclave:localhost",
            c.url
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http
        .get(format!(
            "{}/_matrix/app/v1/users/@_conclave_x:localhost",
            c.url
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = http
        .get(format!("{}/_matrix/app/v1/rooms/%23a:localhost", c.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_NOT_FOUND");
    let r = http
        .post(format!("{}/_matrix/app/v1/ping", c.url))
        .bearer_auth(&token)
        .json(&json!({"transaction_id": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// Starts Synapse with Conclave registered, then Conclave.
async fn synapse_with_conclave(extra: &[(&str, &str)]) -> (Homeserver, Conclave) {
    let ca = crate::support::synapse::TestCa::new().unwrap();
    let ports = crate::support::synapse::free_ports(2).unwrap();
    let server_name = format!("localhost:{}", ports[1]);
    let mut opts = ConclaveOptions::standalone();
    opts.homeserver_url = format!("http://127.0.0.1:{}", ports[0]);
    opts.server_name = server_name;
    opts.ca_file = Some(ca.cert_path.clone());
    let mut c = Conclave::prepare(opts).unwrap();
    let reg = c.write_registration().unwrap();
    let hs = Homeserver::start(HsOptions::new(ca).ports(ports[0], ports[1]).appservice(reg))
        .await
        .unwrap();
    c.spawn_with_env(extra).await.unwrap();
    (hs, c)
}

/// Real Synapse → Conclave: memberships land in the store, the ping round trip works.
#[tokio::test]
async fn synapse_memberships_reach_the_store() {
    let _heavy = heavy_lock();
    let (hs, c) = synapse_with_conclave(&[]).await;

    eventually(Duration::from_secs(15), "ping round trip", || async {
        Ok((c.metric("conclave_homeserver_pings_ok_total").await? >= 1).then_some(()))
    })
    .await
    .unwrap();
    assert!(
        c.metric("conclave_appservice_pings_received_total")
            .await
            .unwrap()
            >= 1
    );
    assert!(c
        .logs()
        .contains("ping round trip through the homeserver succeeded"));

    let alice = hs.register("alice", false).await.unwrap();
    let bob = hs.register("bob", false).await.unwrap();
    let room = alice
        .create_room(json!({"preset": "public_chat"}))
        .await
        .unwrap();
    bob.join(&room, &[]).await.unwrap();
    let started = std::time::Instant::now();
    let room_id = rid(&room);
    let store = c.store().unwrap();
    eventually(
        Duration::from_secs(5),
        "both memberships in the store",
        || async {
            let members = store.room_memberships(&room_id)?;
            let joined: Vec<String> = members
                .iter()
                .filter(|m| m.membership == MembershipState::Join)
                .map(|m| m.user_id.to_string())
                .collect();
            Ok((joined.contains(&alice.user_id) && joined.contains(&bob.user_id)).then_some(()))
        },
    )
    .await
    .unwrap();
    eprintln!(
        "memberships visible {:?} after bob's join",
        started.elapsed()
    );

    bob.leave(&room).await.unwrap();
    eventually(Duration::from_secs(5), "bob's leave", || async {
        let m = store.membership(&room_id, &uid(&bob.user_id))?;
        Ok(m.filter(|m| m.membership == MembershipState::Leave)
            .map(|_| ()))
    })
    .await
    .unwrap();
    drop(hs);
}

/// A transaction interrupted mid-handling (process aborted before commit) is redelivered by
/// Synapse after restart and every event ends up applied exactly once.
#[tokio::test]
async fn interrupted_transaction_is_applied_exactly_once_after_restart() {
    let _heavy = heavy_lock();
    let (hs, mut c) =
        synapse_with_conclave(&[("CONCLAVE_TEST_FAULT", "abort-before-commit")]).await;
    let alice = hs.register("alice", false).await.unwrap();
    let bob = hs.register("bob", false).await.unwrap();
    let room = alice
        .create_room(json!({"preset": "public_chat"}))
        .await
        .unwrap();
    bob.join(&room, &[]).await.unwrap();

    // The first transaction aborts the process before its commit.
    let status = c.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(!status.success(), "the fault aborts the process");
    assert!(c.logs().contains("fault injection: aborting before commit"));
    let room_id = rid(&room);
    assert!(
        c.store()
            .unwrap()
            .room_memberships(&room_id)
            .unwrap()
            .is_empty(),
        "nothing of the aborted transaction was committed"
    );

    c.spawn().await.unwrap();
    let store = c.store().unwrap();
    let members = eventually(
        Duration::from_secs(20),
        "redelivered memberships",
        || async {
            let members = store.room_memberships(&room_id)?;
            let joined = members
                .iter()
                .filter(|m| m.membership == MembershipState::Join)
                .count();
            Ok((joined == 2).then_some(members))
        },
    )
    .await
    .unwrap();
    for m in &members {
        assert_eq!(
            store.membership_event_applications(&m.event_id).unwrap(),
            1,
            "{} applied exactly once",
            m.event_id
        );
    }
    // Let Synapse deliver anything else it had queued, then check again: still once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for m in &members {
        assert_eq!(store.membership_event_applications(&m.event_id).unwrap(), 1);
    }
    drop(hs);
}

/// Malformed call memberships (wrong types, huge state keys, unknown application) inside a
/// transaction are skipped; the rest of it is applied.
#[tokio::test]
async fn malformed_call_members_never_block_the_queue() {
    let c = Conclave::start(ConclaveOptions::standalone())
        .await
        .unwrap();
    let token = c.hs_token();
    let call = |key: String, content: Value| {
        json!({"type": "org.matrix.msc3401.call.member", "event_id": "$c", "room_id": "!r:localhost",
               "sender": "@a:localhost", "state_key": key, "origin_server_ts": 1, "content": content})
    };
    let body = serde_json::to_vec(&json!({"events": [
        call(format!("_@a:localhost_{}", "X".repeat(100_000)), json!({"application": "m.call", "device_id": "D"})),
        call("_@a:localhost_D_m.call".into(), json!({"application": {"nested": true}, "device_id": "D"})),
        call("_@a:localhost_D_m.call".into(), json!({"application": "org.example.game", "device_id": "D"})),
        call("_@a:localhost_D_m.call".into(), json!({"application": "m.call", "device_id": "D", "expires": "never"})),
        member_event("$ok", "!r:localhost", "@a:localhost", "join"),
    ]}))
    .unwrap();
    let (s, b) = put_txn(&c, "calls-1", Some(&token), body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        c.metric("conclave_appservice_events_malformed_total")
            .await
            .unwrap(),
        4
    );
    let store = c.store().unwrap();
    assert!(store.active_calls().unwrap().is_empty());
    assert_eq!(
        store
            .membership(&rid("!r:localhost"), &uid("@a:localhost"))
            .unwrap()
            .unwrap()
            .membership,
        MembershipState::Join
    );
}
