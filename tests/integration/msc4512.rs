//! MSC4195's endpoints as a real Synapse forwards them to Conclave (MSC4512): two federating
//! Synapses with `msc4512_enabled` and `msc4502_enabled`, each with its own Conclave set up as
//! an operator would (`generate-registration`, `print-discovery --json --msc4512` merged into
//! homeserver.yaml). Tokens for local users without OpenID, the membership refusal, forged
//! identity headers sent straight to Conclave, a remote user's token through `fed_proxy` and
//! the federation twin, and the delegated delayed leave through the forwarded path.

use std::time::Duration;

use anyhow::Result;
use conclave::matrix::naming::{member_identity, room_name, LEGACY_SLOT};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::support::conclave::{jwt_payload, wait_joined, Conclave};
use crate::support::element_call::Ministries;
use crate::support::lk_ws::{expect_join, WsClient};
use crate::support::matrix_client::{TestUser, CALL_MEMBER};
use crate::support::synapse::heavy_lock;

const UNSTABLE: &[&str] = &["unstable", "io.element.msc4195"];
const V1: &[&str] = &["v1"];

/// Two federating Synapses forwarding `rtc/livekit` to their own Conclave, each configured
/// from Conclave's own output.
async fn start() -> Result<Ministries> {
    Ministries::start_with(true).await
}

/// `POST /_matrix/client/<version>/rtc/livekit/<endpoint>` on `user`'s homeserver.
async fn rtc_post(
    user: &TestUser,
    version: &[&str],
    endpoint: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let mut segments = vec!["_matrix", "client"];
    segments.extend_from_slice(version);
    segments.extend_from_slice(&["rtc", "livekit", endpoint]);
    user.request(Method::POST, user.url(&segments, &[]).unwrap(), Some(body))
        .await
        .unwrap()
}

/// The MSC4195 body Element Call sends for `user`'s membership `member` in `room`.
fn token_body(user: &TestUser, room: &str, member: &str, sfu: &Conclave) -> Value {
    json!({
        "room_id": room,
        "slot_id": LEGACY_SLOT,
        "url": sfu.ws_url(),
        "member": {"id": member, "claimed_device_id": user.device_id},
    })
}

/// A POST straight to Conclave, with the given headers.
async fn direct(c: &Conclave, path: &str, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", c.url))
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn msc4512_forwarded_tokens_for_local_and_remote_users() {
    let _heavy = heavy_lock();
    let Ministries { hs1, hs2, c1, c2 } = start().await.unwrap();
    let alice = hs1.register("alice", false).await.unwrap();
    let dave = hs1.register("dave", false).await.unwrap();
    let bob = hs2.register("bob", false).await.unwrap();
    let carol = hs2.register("carol", false).await.unwrap();
    let room = alice.create_call_room(&[&bob.user_id]).await.unwrap();
    bob.wait_for_invite(&room, Duration::from_secs(30))
        .await
        .unwrap();
    bob.join(&room, &[&hs1.server_name]).await.unwrap();

    // alice@hs1 through Synapse, both prefixes: a token as /get_token issues, no OpenID.
    for version in [UNSTABLE, V1] {
        let (s, b) = rtc_post(
            &alice,
            version,
            "get_token",
            &token_body(&alice, &room, "alicemember", &c1),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{version:?}: {b}");
        assert_eq!(b["url"], c1.ws_url());
        let p = jwt_payload(b["jwt"].as_str().unwrap());
        assert_eq!(
            p["sub"],
            member_identity(&alice.user_id, &alice.device_id, "alicemember")
        );
        assert_eq!(p["video"]["room"], room_name(&room, LEGACY_SLOT));
        assert_eq!(p["video"]["canPublish"], true);
        assert_eq!(p["video"]["canSubscribe"], true);
    }
    // Another SFU's URL under our server name: 400 M_INVALID_PARAM (MSC4195).
    let mut other_sfu = token_body(&alice, &room, "alicemember", &c1);
    other_sfu["url"] = json!("wss://sfu.elsewhere.example");
    let (s, b) = rtc_post(&alice, UNSTABLE, "get_token", &other_sfu).await;
    assert_eq!(
        (s.as_u16(), b["errcode"].as_str()),
        (400, Some("M_INVALID_PARAM")),
        "{b}"
    );
    // dave@hs1 is not in the room: the refusal /get_token gives.
    let (s, b) = rtc_post(
        &dave,
        UNSTABLE,
        "get_token",
        &token_body(&dave, &room, "davemember", &c1),
    )
    .await;
    assert_eq!(
        (s.as_u16(), b["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{b}"
    );

    // Forged identity headers sent straight to Conclave: 401 with a Matrix error, without
    // the hs_token or with a wrong one, on the client and the federation paths.
    let secrets: toml::Table = c1.secrets_text().parse().unwrap();
    let hs_token = secrets["hs_token"].as_str().unwrap();
    let forged_user = ("X-Matrix-User-Identifier", alice.user_id.as_str());
    let body = token_body(&alice, &room, "forged", &c1);
    for (path, identity) in [
        ("/_matrix/client/v1/rtc/livekit/get_token", forged_user),
        (
            "/_matrix/client/unstable/io.element.msc4195/rtc/livekit/delegate_delayed_leave",
            forged_user,
        ),
        (
            "/_matrix/federation/v1/rtc/livekit/get_token",
            ("X-Matrix-Origin", hs2.server_name.as_str()),
        ),
    ] {
        for auth in [None, Some("Bearer not-the-hs-token"), Some("Basic abc")] {
            let mut headers = vec![identity];
            if let Some(a) = auth {
                headers.push(("Authorization", a));
            }
            let (s, b) = direct(&c1, path, &headers, &body).await;
            assert_eq!(s, 401, "{path} {auth:?}: {b}");
            assert!(b["errcode"].is_string() && b["error"].is_string(), "{b}");
        }
    }
    // The hs_token with a user of another server: refused.
    let bearer = format!("Bearer {hs_token}");
    let (s, b) = direct(
        &c1,
        "/_matrix/client/v1/rtc/livekit/get_token",
        &[
            ("Authorization", &bearer),
            ("X-Matrix-User-Identifier", &bob.user_id),
        ],
        &body,
    )
    .await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{b}"
    );
    // The federation twin refuses a user who is not of the origin server.
    let mut claim = token_body(&alice, &room, "forged", &c1);
    claim["user_id"] = json!(alice.user_id);
    let (s, b) = direct(
        &c1,
        "/_matrix/federation/v1/rtc/livekit/get_token",
        &[
            ("Authorization", &bearer),
            ("X-Matrix-Origin", &hs2.server_name),
        ],
        &claim,
    )
    .await;
    assert_eq!(
        (s, b["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{b}"
    );

    // bob@hs2 asks his homeserver for a token on hs1's SFU: hs2 → Conclave-2 → fed_proxy →
    // hs1 → Conclave-1's federation twin. Subscribe only, as for any remote user.
    let mut remote = token_body(&bob, &room, "bobmember", &c1);
    remote["server_name"] = json!(hs1.server_name);
    let (s, b) = rtc_post(&bob, UNSTABLE, "get_token", &remote).await;
    assert_eq!(s, StatusCode::OK, "{b}\n{}", c2.logs());
    assert_eq!(b["url"], c1.ws_url());
    let p = jwt_payload(b["jwt"].as_str().unwrap());
    assert_eq!(
        p["sub"],
        member_identity(&bob.user_id, &bob.device_id, "bobmember")
    );
    assert_eq!(p["video"]["room"], room_name(&room, LEGACY_SLOT));
    assert_eq!(p["video"]["canPublish"], false);
    assert_eq!(p["video"]["canPublishData"], false);
    assert_eq!(p["video"]["canSubscribe"], true);
    // The token is Conclave-1's: its SFU lets bob in.
    let mut ws = WsClient::connect(&c1.ws_url(), b["jwt"].as_str().unwrap(), "")
        .await
        .unwrap();
    expect_join(&mut ws).await.unwrap();
    drop(ws);
    // carol@hs2 is not in the room: hs1's refusal is relayed.
    let mut remote = token_body(&carol, &room, "carolmember", &c1);
    remote["server_name"] = json!(hs1.server_name);
    let (s, b) = rtc_post(&carol, UNSTABLE, "get_token", &remote).await;
    assert_eq!(
        (s.as_u16(), b["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{b}"
    );

    // Membership came from MSC4502, which both homeservers offer.
    for c in [&c1, &c2] {
        let logs = c.logs();
        assert!(!logs.contains("does not offer MSC4502"), "{logs}");
        assert!(!logs.contains("is_joined refused"), "{logs}");
    }
    drop((hs2, c2));
}

#[tokio::test]
async fn msc4512_forwarded_delayed_leave_is_sent_on_crash() {
    let _heavy = heavy_lock();
    let Ministries { hs1, hs2, c1, c2 } = start().await.unwrap();
    drop((hs2, c2));
    let alice = hs1.register("alice", false).await.unwrap();
    let room = alice.create_call_room(&[]).await.unwrap();
    wait_joined(&c1, &room, &alice.user_id).await;
    let key = alice.call_member_state_key();
    alice
        .send_state(
            &room,
            CALL_MEMBER,
            &key,
            json!({"application": "m.call", "call_id": "", "scope": "m.room",
                   "device_id": alice.device_id, "expires": 14_400_000,
                   "focus_active": {"type": "livekit", "focus_selection": "multi_sfu"},
                   "foci_preferred": [{"type": "livekit", "url": c1.ws_url()}]}),
        )
        .await
        .unwrap();
    let delay_id = alice
        .send_delayed_state(&room, CALL_MEMBER, &key, json!({}), 600_000)
        .await
        .unwrap();

    // Without the delay: refused as /delegate_delayed_leave refuses it.
    let body = token_body(&alice, &room, "alicemember", &c1);
    let (s, b) = rtc_post(&alice, UNSTABLE, "delegate_delayed_leave", &body).await;
    assert_eq!(
        (s.as_u16(), b["errcode"].as_str()),
        (400, Some("M_BAD_JSON")),
        "{b}"
    );

    // Connect, then delegate through the forwarded path.
    let (s, t) = rtc_post(&alice, UNSTABLE, "get_token", &body).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let mut ws = WsClient::connect(&c1.ws_url(), t["jwt"].as_str().unwrap(), "")
        .await
        .unwrap();
    expect_join(&mut ws).await.unwrap();
    let mut delegate = body.clone();
    delegate["delay_id"] = json!(delay_id);
    delegate["delay_timeout"] = json!(600_000);
    let (s, b) = rtc_post(&alice, UNSTABLE, "delegate_delayed_leave", &delegate).await;
    assert_eq!((s.as_u16(), &b), (200, &json!({})));
    assert!(c1.logs().contains("delayed leave delegated"));

    // A crash: Conclave sends the delayed leave at once.
    drop(ws);
    alice
        .wait_for_state(&room, CALL_MEMBER, &key, Duration::from_secs(5), |c| {
            c.as_object().is_some_and(|o| o.is_empty())
        })
        .await
        .unwrap();
    assert!(c1.logs().contains("delayed leave sent"));
    drop(hs1);
}
