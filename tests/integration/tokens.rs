//! The token service: lk-jwt-service's endpoints, OpenID over federation against two real
//! Synapses, the membership gate, bad input, CORS, and the validate endpoints' room check.

use std::time::{Duration, Instant};

use conclave::matrix::naming::{member_identity, room_name, LEGACY_SLOT};
use reqwest::StatusCode;
use ruma::events::room::member::MembershipState;
use serde_json::{json, Value};

use crate::support::conclave::{
    jwt_payload, pair_with_conclave_on_hs1, post_json as post, wait_membership, Conclave,
    ConclaveOptions,
};
use crate::support::matrix_client::TestUser;
use crate::support::synapse::heavy_lock;

async fn sfu_get(c: &Conclave, user: &TestUser, room: &str) -> (StatusCode, Value) {
    let openid = user.openid_token().await.unwrap();
    post(
        c,
        "/sfu/get",
        &json!({"room": room, "openid_token": openid, "device_id": user.device_id}),
    )
    .await
}

async fn get_token(
    c: &Conclave,
    user: &TestUser,
    room: &str,
    member_id: &str,
) -> (StatusCode, Value) {
    let openid = user.openid_token().await.unwrap();
    post(
        c,
        "/get_token",
        &json!({
            "room_id": room,
            "slot_id": LEGACY_SLOT,
            "openid_token": openid,
            "member": {
                "id": member_id,
                "claimed_user_id": user.user_id,
                "claimed_device_id": user.device_id,
            },
            "some_future_field": {"ignored": true},
        }),
    )
    .await
}

async fn validate(c: &Conclave, jwt: &str) -> (StatusCode, String) {
    let r = reqwest::Client::new()
        .get(format!("{}/rtc/validate", c.url))
        .query(&[("access_token", jwt)])
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Acceptance of the token service with two federating homeservers.
#[tokio::test]
async fn tokens_over_federation_only_for_joined_members() {
    let _heavy = heavy_lock();
    let (hs1, hs2, c) = pair_with_conclave_on_hs1(&[]).await.unwrap();
    let secrets: toml::Table = c.secrets_text().parse().unwrap();
    let api_key = secrets["livekit_key"].as_str().unwrap().to_owned();

    let alice = hs1.register("alice", false).await.unwrap();
    let dave = hs1.register("dave", false).await.unwrap();
    let eve = hs1.register("eve", false).await.unwrap();
    let bob = hs2.register("bob", false).await.unwrap();
    let carol = hs2.register("carol", false).await.unwrap();

    let room = alice
        .create_call_room(&[&bob.user_id, &dave.user_id, &eve.user_id])
        .await
        .unwrap();
    bob.wait_for_invite(&room, Duration::from_secs(30))
        .await
        .unwrap();
    bob.join(&room, &[&hs1.server_name]).await.unwrap();
    eve.join(&room, &[]).await.unwrap();
    alice.ban(&room, &eve.user_id, Some("test")).await.unwrap();
    wait_membership(&c, &room, &bob.user_id, MembershipState::Join).await;
    wait_membership(&c, &room, &eve.user_id, MembershipState::Ban).await;
    wait_membership(&c, &room, &dave.user_id, MembershipState::Invite).await;

    // A second room where bob (remote, not full access) asks first.
    let room2 = alice.create_call_room(&[&bob.user_id]).await.unwrap();
    bob.wait_for_invite(&room2, Duration::from_secs(30))
        .await
        .unwrap();
    bob.join(&room2, &[&hs1.server_name]).await.unwrap();
    wait_membership(&c, &room2, &bob.user_id, MembershipState::Join).await;
    let (s, b) = get_token(&c, &bob, &room2, "bobmember").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let bob_jwt2 = b["jwt"].as_str().unwrap().to_owned();
    let (s, text) = validate(&c, &bob_jwt2).await;
    assert_eq!(
        (s, text.as_str()),
        (StatusCode::NOT_FOUND, "requested room does not exist")
    );

    // alice@hs1 (full access) through both endpoints.
    let t = unix_now();
    let (s, b) = sfu_get(&c, &alice, &room).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["url"], format!("ws://127.0.0.1:{}", c.port));
    let p = jwt_payload(b["jwt"].as_str().unwrap());
    assert_eq!(p["sub"], format!("{}:{}", alice.user_id, alice.device_id));
    assert_eq!(p["iss"], api_key.as_str());
    assert_eq!(p["video"]["room"], room_name(&room, LEGACY_SLOT));
    assert_eq!(p["video"]["roomJoin"], true);
    assert_eq!(p["video"]["canPublish"], true);
    assert_eq!(p["video"]["canSubscribe"], true);
    assert_eq!(p["video"]["canPublishData"], true);
    assert!(p["video"].get("roomCreate").is_none_or(|v| v == false));
    let (nbf, exp) = (p["nbf"].as_u64().unwrap(), p["exp"].as_u64().unwrap());
    assert!(nbf >= t && nbf <= t + 5, "nbf {nbf} now {t}");
    assert_eq!(exp - nbf, 3600);
    let (s, text) = validate(&c, b["jwt"].as_str().unwrap()).await;
    assert_eq!(
        (s, text.as_str()),
        (StatusCode::OK, "success"),
        "full access created the room"
    );

    let (s, b) = get_token(&c, &alice, &room, "alicemember").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let p = jwt_payload(b["jwt"].as_str().unwrap());
    assert_eq!(
        p["sub"],
        member_identity(&alice.user_id, &alice.device_id, "alicemember")
    );
    assert_eq!(p["video"]["room"], room_name(&room, LEGACY_SLOT));

    // bob@hs2, verified over federation at hs2.
    let (s, b) = get_token(&c, &bob, &room, "bobmember").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let p = jwt_payload(b["jwt"].as_str().unwrap());
    assert_eq!(
        p["sub"],
        member_identity(&bob.user_id, &bob.device_id, "bobmember")
    );
    let (s, b) = sfu_get(&c, &bob, &room).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // Room 2 exists once a full-access member asks: bob's earlier token now validates.
    let (s, b) = get_token(&c, &alice, &room2, "a2").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(validate(&c, &bob_jwt2).await.0, StatusCode::OK);

    // Not joined: carol (never in the room), dave (invited), eve (banned).
    for (who, user) in [("carol", &carol), ("dave", &dave), ("eve", &eve)] {
        let (s, b) = get_token(&c, user, &room, "m").await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{who}: {b}");
        assert_eq!(b["errcode"], "M_FORBIDDEN", "{who}");
        let (s, _) = sfu_get(&c, user, &room).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{who} on /sfu/get");
    }

    // An expired OpenID token → 401: Synapse's tokens live an hour, so age one in its database.
    let expired = alice.openid_token().await.unwrap();
    {
        let db = rusqlite::Connection::open(hs1.dir.join("homeserver.db")).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        let n = db
            .execute(
                "UPDATE open_id_tokens SET ts_valid_until_ms = 1 WHERE token = ?1",
                [expired["access_token"].as_str().unwrap()],
            )
            .unwrap();
        assert_eq!(n, 1, "the token row exists");
    }
    let (s, b) = post(
        &c,
        "/sfu/get",
        &json!({"room": room2, "openid_token": expired, "device_id": alice.device_id}),
    )
    .await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_UNAUTHORIZED")),
        "{b}"
    );

    // Forged OpenID token → 401.
    let forged = json!({
        "access_token": "forged-token", "token_type": "Bearer",
        "matrix_server_name": hs1.server_name, "expires_in": 3600
    });
    let (s, b) = post(
        &c,
        "/sfu/get",
        &json!({"room": room, "openid_token": forged, "device_id": "X"}),
    )
    .await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_UNAUTHORIZED"))
    );

    // bob's token presented as alice's → 401; bob's token claimed to be from hs1 → 401.
    let bob_openid = bob.openid_token().await.unwrap();
    let (s, b) = post(
        &c,
        "/get_token",
        &json!({
            "room_id": room, "slot_id": LEGACY_SLOT, "openid_token": bob_openid,
            "member": {"id": "m", "claimed_user_id": alice.user_id, "claimed_device_id": alice.device_id}
        }),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let mut wrong_server = bob.openid_token().await.unwrap();
    wrong_server["matrix_server_name"] = json!(hs1.server_name);
    let (s, b) = post(
        &c,
        "/sfu/get",
        &json!({"room": room, "openid_token": wrong_server, "device_id": bob.device_id}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");

    // alice leaves: no more tokens.
    alice.leave(&room).await.unwrap();
    wait_membership(&c, &room, &alice.user_id, MembershipState::Leave).await;
    let (s, b) = get_token(&c, &alice, &room, "alicemember").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");

    // A room Conclave has never seen: a clear 404 from the homeserver check.
    let (s, b) = sfu_get(&c, &alice, "!unknownroomid1234567890:elsewhere.example").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert!(
        b["error"].as_str().unwrap().contains("does not know room"),
        "{b}"
    );

    assert!(c.metric("conclave_tokens_issued_total").await.unwrap() >= 6);
    drop((hs1, hs2));
}

/// Bad input, CORS and unreachable homeservers, without Synapse.
#[tokio::test]
async fn token_endpoints_reject_bad_input_clearly() {
    // A homeserver that accepts TCP but never answers: the timeout path.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let closed_port = crate::support::conclave::free_port();
    let c = Conclave::start(
        ConclaveOptions::standalone().env("CONCLAVE_AUTH__FEDERATION_TIMEOUT_MS", "1500"),
    )
    .await
    .unwrap();
    let valid = |server: &str| {
        json!({
            "room_id": "!r:localhost", "slot_id": LEGACY_SLOT,
            "openid_token": {"access_token": "t", "token_type": "Bearer",
                             "matrix_server_name": server, "expires_in": 3600},
            "member": {"id": "m", "claimed_user_id": "@u:localhost", "claimed_device_id": "D"},
        })
    };

    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/get_token", c.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "*",
        "CORS on errors too"
    );
    assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_NOT_JSON");

    let r = http
        .post(format!("{}/sfu/get", c.url))
        .body(vec![b' '; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let mut missing = valid("localhost");
    missing.as_object_mut().unwrap().remove("slot_id");
    let (s, b) = post(&c, "/get_token", &missing).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_BAD_JSON"))
    );
    assert!(b["error"].as_str().unwrap().contains("slot_id"), "{b}");
    let (s, b) = post(
        &c,
        "/sfu/get",
        &json!({"room": "!r:localhost", "device_id": "D"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["error"].as_str().unwrap().contains("openid_token"), "{b}");
    let (s, b) = post(&c, "/sfu/get", &json!({"room": 42})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["error"].as_str().unwrap().contains("room"), "{b}");
    let mut half_delay = valid("localhost");
    half_delay["delay_id"] = json!("d1");
    let (s, b) = post(&c, "/get_token", &half_delay).await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_BAD_JSON"))
    );

    // Unreachable homeserver: 502 quickly; silent homeserver: 504 within the timeout.
    let started = Instant::now();
    let (s, b) = post(
        &c,
        "/get_token",
        &valid(&format!("127.0.0.1:{closed_port}")),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{b}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let started = Instant::now();
    let (s, b) = post(
        &c,
        "/get_token",
        &valid(&format!("127.0.0.1:{silent_port}")),
    )
    .await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{b}");
    assert_eq!(b["errcode"], "M_CONNECTION_TIMEOUT");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    drop(silent);

    // CORS preflight from an arbitrary origin.
    for path in ["/sfu/get", "/get_token", "/delegate_delayed_leave"] {
        let r = http
            .request(reqwest::Method::OPTIONS, format!("{}{path}", c.url))
            .header("origin", "https://call.ministry.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()["access-control-allow-origin"], "*");
        assert!(r.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("Content-Type"));
    }

    // Element Call's probe of the delegation endpoint (an empty POST): not a 404, so it
    // delegates its delayed leave; readable cross-origin.
    let r = http
        .post(format!("{}/delegate_delayed_leave", c.url))
        .header("origin", "https://call.ministry.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errcode"], "M_NOT_JSON");

    // Wrong method: 405. Health: GET and HEAD.
    let r = http
        .get(format!("{}/get_token", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let r = http
        .head(format!("{}/healthz", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Validate endpoints: bad or missing tokens are 401 text on v0 and v1.
    let r = http
        .get(format!("{}/rtc/validate?access_token=garbage", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http
        .get(format!("{}/rtc/v1/validate", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(!r.text().await.unwrap().contains("room"));
}
