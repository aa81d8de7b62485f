//! LiveKit signalling at the protocol level: each trap of `livekit-signaling.md` section 7 has a
//! test named after it, run on both signalling paths (v0 `/rtc`, v1 `/rtc/v1`, see
//! `lk_ws::Path`), and hostile input never crashes or wedges the server.

use std::time::Duration;

use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Msg;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::support::conclave::{jwt_payload, Conclave, ConclaveOptions};
use crate::support::lk_ws::{
    expect_join, js_encode, js_join_request, plain_join_request, Path, WsClient,
};

const T: Duration = Duration::from_secs(5);

async fn sfu() -> Conclave {
    Conclave::start(ConclaveOptions::standalone().env("CONCLAVE_RTC__AUTO_CREATE", "true"))
        .await
        .unwrap()
}

/// `identity` joined to `room` on `path` (v1: a join request without an offer), with its join
/// response.
async fn join_on(
    c: &Conclave,
    path: Path,
    room: &str,
    identity: &str,
    grants: serde_json::Value,
) -> (WsClient, lk::JoinResponse) {
    let token = c.token(room, identity, grants);
    let mut ws = WsClient::connect_on(path, &c.ws_url(), &token, &plain_join_request(), "")
        .await
        .unwrap_or_else(|r| panic!("{path:?} connect of {identity} refused: {r:?}"));
    let join = expect_join(&mut ws).await.unwrap();
    (ws, join)
}

fn add_track(cid: &str, encryption: lk::encryption::Type) -> Req {
    Req::AddTrack(lk::AddTrackRequest {
        cid: cid.into(),
        name: "mic".into(),
        r#type: lk::TrackType::Audio as i32,
        source: lk::TrackSource::Microphone as i32,
        encryption: encryption as i32,
        ..Default::default()
    })
}

async fn ping_answered(c: &mut WsClient, ts: i64) -> bool {
    c.send(Req::PingReq(lk::Ping {
        timestamp: ts,
        rtt: 0,
    }))
    .await
    .unwrap();
    c.recv_until(
        T,
        |m| matches!(m, Msg::PongResp(p) if p.last_ping_timestamp == ts),
    )
    .await
    .is_ok()
}

/// Trap: a generic 404 on both validate paths makes client-sdk-js loop forever. With v1 switched
/// off (`rtc.single_pc = false`) only `/rtc/v1*` may 404, and never with the "room does not
/// exist" text; `/rtc/v1` is then never upgraded.
#[tokio::test]
async fn trap_v1_paths_answer_plain_404_and_are_never_upgraded() {
    let c = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_RTC__SINGLE_PC", "false"),
    )
    .await
    .unwrap();
    let token = c.token("r", "a", json!({}));
    let r = reqwest::get(format!(
        "{}/rtc/v1/validate?access_token={token}&join_request=x",
        c.url
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    // Browsers fetch it cross-origin: without CORS they never see the 404 and do not fall back.
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let body = r.text().await.unwrap();
    assert!(!body.contains("requested room does not exist"), "{body}");
    let url = format!("{}/rtc/v1?access_token={token}&join_request=x", c.ws_url());
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 404)
        }
        other => panic!("/rtc/v1 must not upgrade: {:?}", other.map(|_| ())),
    }
    // v0 validate succeeds for the same token.
    let r = reqwest::get(format!("{}/rtc/validate?access_token={token}", c.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
}

/// `rtc.single_pc = true` (the default): `/rtc/v1/validate` answers as `/rtc/validate` (200,
/// 401, 404 with the room text, CORS) and 400 with LiveKit's text for a missing or corrupt
/// `join_request`; the `/rtc/v1` WebSocket refuses what validate refuses.
#[tokio::test]
async fn v1_validate_checks_token_and_join_request_with_single_pc() {
    let c = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "false")
            .env("CONCLAVE_RTC__SINGLE_PC", "true"),
    )
    .await
    .unwrap();
    let validate = |token: &str, join_request: Option<&str>| {
        let mut url = format!("{}/rtc/v1/validate?access_token={token}", c.url);
        if let Some(j) = join_request {
            url.push_str(&format!("&join_request={j}"));
        }
        async move {
            let r = reqwest::get(url).await.unwrap();
            let status = r.status().as_u16();
            assert_eq!(r.headers()["access-control-allow-origin"], "*");
            (status, r.text().await.unwrap())
        }
    };
    let request = lk::JoinRequest {
        client_info: Some(lk::ClientInfo {
            sdk: lk::client_info::Sdk::Js as i32,
            protocol: 16,
            ..Default::default()
        }),
        connection_settings: Some(lk::ConnectionSettings {
            auto_subscribe: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let good = js_join_request(&request);
    let token = c.token("r", "alice", json!({}));

    // No room yet (auto-create is off): the text that stops client-sdk-js retrying.
    assert_eq!(
        validate(&token, Some(&good)).await,
        (404, "requested room does not exist".into())
    );
    let create = c.token("", "operator", json!({"roomCreate": true}));
    let r = reqwest::Client::new()
        .post(format!("{}/twirp/livekit.RoomService/CreateRoom", c.url))
        .bearer_auth(create)
        .json(&json!({"name": "r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    assert_eq!(validate(&token, Some(&good)).await, (200, "success".into()));
    assert_eq!(
        validate(&token, None).await,
        (400, "join_request is required".into())
    );
    assert_eq!(
        validate(&token, Some("%21%21%21")).await,
        (400, "cannot base64 decode wrapped join request".into())
    );
    // Valid base64 of something that is not a WrappedJoinRequest, and a GZIP one whose payload
    // is not gzip.
    assert_eq!(
        validate(&token, Some("____")).await,
        (400, "cannot unmarshal wrapped join request".into())
    );
    let corrupt = js_encode(lk::WrappedJoinRequest {
        compression: lk::wrapped_join_request::Compression::Gzip as i32,
        join_request: b"not gzip".to_vec(),
    });
    assert_eq!(
        validate(&token, Some(&corrupt)).await,
        (400, "cannot read decompressed join request".into())
    );
    // Metadata in the request needs canUpdateOwnMetadata.
    let with_meta = js_join_request(&lk::JoinRequest {
        metadata: "m".into(),
        ..request.clone()
    });
    assert_eq!(validate(&token, Some(&with_meta)).await.0, 401);
    let may_update = c.token("r", "bob", json!({"canUpdateOwnMetadata": true}));
    assert_eq!(validate(&may_update, Some(&with_meta)).await.0, 200);
    // A bad token is a 401 before the join_request is even looked at.
    assert_eq!(validate("not-a-jwt", Some(&good)).await.0, 401);
    assert_eq!(validate("not-a-jwt", None).await.0, 401);

    // The WebSocket refuses what validate refuses, with the same status and text.
    let url = format!("{}/rtc/v1?access_token={token}", c.ws_url());
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 400)
        }
        other => panic!(
            "/rtc/v1 without join_request must fail: {:?}",
            other.map(|_| ())
        ),
    }
}

/// `rtc.single_pc = true`: `/rtc/v1` with a client-sdk-js style `join_request` carrying a track
/// announcement and a str0m client's offer (3 audio + 3 video `recvonly` placeholders, a
/// microphone, data channels) is upgraded; the first frame is `join` without
/// `subscriber_primary`, then `track_published`, then the `answer` with the offer's id, which
/// the client accepts. The session is counted as v1 on `/metrics`; v0 keeps its own count.
#[tokio::test]
async fn v1_connect_answers_the_embedded_offer_after_join() {
    use str0m::change::SdpAnswer;
    use str0m::media::{Direction, MediaKind};

    let c = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_RTC__SINGLE_PC", "true"),
    )
    .await
    .unwrap();
    let mut rtc = str0m::Rtc::builder().build(std::time::Instant::now());
    let mut api = rtc.sdp_api();
    for label in ["_reliable", "_lossy", "_data_track"] {
        api.add_channel(label.into());
    }
    for kind in [MediaKind::Audio, MediaKind::Video] {
        for _ in 0..3 {
            api.add_media(kind, Direction::RecvOnly, None, None, None);
        }
    }
    api.add_media(
        MediaKind::Audio,
        Direction::SendOnly,
        Some("stream".into()),
        Some("mic-cid".into()),
        None,
    );
    let (offer, pending) = api.apply().unwrap();
    let Req::AddTrack(track) = add_track("mic-cid", lk::encryption::Type::None) else {
        unreachable!()
    };
    let request = lk::JoinRequest {
        add_track_requests: vec![track],
        publisher_offer: Some(lk::SessionDescription {
            r#type: "offer".into(),
            sdp: offer.to_sdp_string(),
            id: 1,
            mid_to_track_id: Default::default(),
        }),
        ..plain_join_request()
    };
    let token = c.token("r", "alice", json!({}));
    let url = format!(
        "{}/rtc/v1?access_token={token}&join_request={}",
        c.ws_url(),
        js_join_request(&request)
    );
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut a = WsClient::from_stream(ws);
    let join = expect_join(&mut a).await.unwrap();
    assert!(!join.subscriber_primary, "v1 is publisher-primary");
    let seen = a
        .recv_until(T, |m| matches!(m, Msg::Answer(_)))
        .await
        .unwrap();
    assert!(
        !seen.iter().any(|m| matches!(m, Msg::Offer(_))),
        "the server never offers in v1: {seen:?}"
    );
    let published = seen
        .iter()
        .position(|m| matches!(m, Msg::TrackPublished(t) if t.cid == "mic-cid"))
        .unwrap_or_else(|| panic!("track_published before the answer: {seen:?}"));
    assert!(published < seen.len() - 1);
    let Some(Msg::Answer(answer)) = seen.last() else {
        unreachable!()
    };
    assert_eq!(answer.id, 1, "the answer echoes the offer id");
    assert_eq!(answer.r#type, "answer");
    rtc.sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer.sdp).unwrap())
        .unwrap();

    // v0 on the same server, for the counts.
    let mut b = WsClient::connect(&c.ws_url(), &c.token("r", "bob", json!({})), "")
        .await
        .unwrap();
    assert!(expect_join(&mut b).await.unwrap().subscriber_primary);
    assert_eq!(c.signal_sessions().await.unwrap(), (1, 1));

    // `reconnect` in the join request: no resume, the client is told to rejoin in full.
    let again = lk::JoinRequest {
        reconnect: true,
        ..request
    };
    let url = format!(
        "{}/rtc/v1?access_token={token}&join_request={}",
        c.ws_url(),
        js_join_request(&again)
    );
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut r = WsClient::from_stream(ws);
    match r.recv(T).await {
        Some(Msg::Leave(l)) => {
            assert_eq!(l.action, lk::leave_request::Action::Reconnect as i32)
        }
        other => panic!("reconnect must get leave(RECONNECT): {other:?}"),
    }
    assert_eq!(c.signal_sessions().await.unwrap(), (1, 1));
}

/// v1: the join request's `metadata` and `participant_attributes` (allowed by
/// `canUpdateOwnMetadata`) are the participant's from its join response on, and the others
/// see them; without the grant the connect is refused with 401.
#[tokio::test]
async fn v1_join_request_metadata_and_attributes_are_applied() {
    let c = sfu().await;
    let (mut bob, _) = join_on(&c, Path::V0, "attrs", "bob", json!({})).await;
    let request = lk::JoinRequest {
        metadata: "from-request".into(),
        participant_attributes: [("role".to_owned(), "speaker".to_owned())].into(),
        ..plain_join_request()
    };
    let plain = c.token("attrs", "alice", json!({}));
    let refused = WsClient::connect_on(Path::V1, &c.ws_url(), &plain, &request, "").await;
    assert_eq!(refused.err().map(|r| r.status), Some(401));
    let token = c.token("attrs", "alice", json!({"canUpdateOwnMetadata": true}));
    let mut alice = WsClient::connect_on(Path::V1, &c.ws_url(), &token, &request, "")
        .await
        .unwrap();
    let me = expect_join(&mut alice).await.unwrap().participant.unwrap();
    assert_eq!(me.metadata, "from-request");
    assert_eq!(
        me.attributes.get("role").map(String::as_str),
        Some("speaker")
    );
    bob.recv_until(T, |m| {
        matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.identity == "alice"
            && p.metadata == "from-request"
            && p.attributes.get("role").map(String::as_str) == Some("speaker")))
    })
    .await
    .unwrap();
}

/// Traps: first message must be `join` within 5 s; empty server version; missing permission;
/// SIDs without exact prefixes; subscriber_primary without a subscriber offer. On both paths:
/// v0 is subscriber-primary and gets the subscriber offer; v1 is publisher-primary and the
/// server never offers.
#[tokio::test]
async fn trap_first_message_is_a_complete_join_then_the_subscriber_offer() {
    let c = sfu().await;
    for path in Path::BOTH {
        first_message_is_a_complete_join(&c, path).await;
    }
}

async fn first_message_is_a_complete_join(c: &Conclave, path: Path) {
    let room = format!("r-{path:?}");
    let (mut a, j) = join_on(c, path, &room, "alice", json!({})).await;
    let me = j.participant.as_ref().unwrap();
    assert!(me.sid.starts_with("PA_"), "{}", me.sid);
    assert_eq!(me.identity, "alice");
    assert!(me.permission.as_ref().unwrap().can_publish);
    assert!(j.room.as_ref().unwrap().sid.starts_with("RM_"));
    assert!(!j.server_version.is_empty() && j.server_version != "0.15.1");
    assert!(!j.server_info.as_ref().unwrap().version.is_empty());
    assert_eq!(j.subscriber_primary, path == Path::V0, "{path:?}");
    assert_eq!((j.ping_interval, j.ping_timeout), (5, 15));
    match path {
        Path::V0 => {
            let seen = a
                .recv_until(T, |m| matches!(m, Msg::Offer(_)))
                .await
                .unwrap();
            let Some(Msg::Offer(o)) = seen.last() else {
                unreachable!()
            };
            assert!(
                o.sdp.contains("m=application"),
                "data channels in the first offer"
            );
        }
        Path::V1 => {
            let offer = a
                .recv_until(Duration::from_secs(1), |m| matches!(m, Msg::Offer(_)))
                .await;
            assert!(offer.is_err(), "the server never offers on v1: {offer:?}");
        }
    }

    // A second participant sees alice in other_participants.
    let (_b, j) = join_on(c, path, &room, "bob", json!({})).await;
    assert_eq!(j.other_participants.len(), 1);
    assert_eq!(j.other_participants[0].identity, "alice");
}

/// Trap: no `pong_resp` within ping_timeout makes clients reconnect every 15 s. Both paths.
#[tokio::test]
async fn trap_pong_answers_ping_within_ping_timeout() {
    let c = sfu().await;
    for path in Path::BOTH {
        let (mut a, _) = join_on(&c, path, &format!("r-{path:?}"), "alice", json!({})).await;
        let started = std::time::Instant::now();
        assert!(ping_answered(&mut a, 123_456).await, "{path:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        a.send(Req::Ping(42)).await.unwrap();
        a.recv_until(T, |m| matches!(m, Msg::Pong(t) if *t > 0))
            .await
            .unwrap();
    }
}

/// Trap: 1 h lk-jwt-service tokens and no `refresh_token` strand a long call. Both paths.
#[tokio::test]
async fn trap_refresh_token_is_sent_and_outlives_the_original() {
    let c = sfu().await;
    for path in Path::BOTH {
        let room = format!("r-{path:?}");
        let token = c.token(&room, "alice", json!({}));
        let original_exp = jwt_payload(&token)["exp"].as_u64().unwrap();
        let mut a = WsClient::connect_on(path, &c.ws_url(), &token, &plain_join_request(), "")
            .await
            .unwrap();
        expect_join(&mut a).await.unwrap();
        let seen = a
            .recv_until(T, |m| matches!(m, Msg::RefreshToken(_)))
            .await
            .unwrap();
        let Some(Msg::RefreshToken(t)) = seen.last() else {
            unreachable!()
        };
        let p = jwt_payload(t);
        assert_eq!(p["sub"], "alice");
        assert_eq!(p["video"]["room"], room.as_str());
        assert!(p["exp"].as_u64().unwrap() >= original_exp);
        // The refreshed token is accepted for a new connection.
        let r = reqwest::get(format!("{}/rtc/validate?access_token={t}", c.url))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path:?}");
    }
}

/// alice (who may update her metadata) and bob joined on `path` to room `r-<path>`; alice's
/// SID.
async fn alice_and_bob(c: &Conclave, path: Path) -> (WsClient, String, WsClient) {
    let room = format!("r-{path:?}");
    let (a, j) = join_on(
        c,
        path,
        &room,
        "alice",
        json!({"canUpdateOwnMetadata": true}),
    )
    .await;
    let alice_sid = j.participant.unwrap().sid;
    let (b, _) = join_on(c, path, &room, "bob", json!({})).await;
    (a, alice_sid, b)
}

/// Traps: `track_published` with another cid; `TrackInfo.encryption` not echoed;
/// non-increasing versions; partial track lists. Both paths.
#[tokio::test]
async fn trap_cid_and_encryption_echoed_and_versions_strictly_increase() {
    let c = sfu().await;
    for path in Path::BOTH {
        cid_and_encryption_echoed_and_versions_strictly_increase(&c, path).await;
    }
}

async fn cid_and_encryption_echoed_and_versions_strictly_increase(c: &Conclave, path: Path) {
    let (mut a, alice_sid, mut b) = alice_and_bob(c, path).await;

    a.send(add_track("local-cid-1", lk::encryption::Type::Gcm))
        .await
        .unwrap();
    let seen = a
        .recv_until(T, |m| matches!(m, Msg::TrackPublished(_)))
        .await
        .unwrap();
    let Some(Msg::TrackPublished(tp)) = seen.last() else {
        unreachable!()
    };
    assert_eq!(tp.cid, "local-cid-1");
    let track = tp.track.clone().unwrap();
    assert!(track.sid.starts_with("TR_"));
    assert_eq!(track.encryption, lk::encryption::Type::Gcm as i32);
    a.send(Req::Mute(lk::MuteTrackRequest {
        sid: track.sid.clone(),
        muted: true,
    }))
    .await
    .unwrap();
    a.send(Req::UpdateMetadata(lk::UpdateParticipantMetadata {
        metadata: "hello".into(),
        request_id: 9,
        ..Default::default()
    }))
    .await
    .unwrap();
    // bob sees alice's info three times (track, mute, metadata) with rising versions and
    // always the complete track list.
    let mut versions = Vec::new();
    let seen = b
        .recv_until(T, |m| match m {
            Msg::Update(u) => u
                .participants
                .iter()
                .any(|p| p.sid == alice_sid && p.metadata == "hello"),
            _ => false,
        })
        .await
        .unwrap();
    for m in &seen {
        if let Msg::Update(u) = m {
            for p in u.participants.iter().filter(|p| p.sid == alice_sid) {
                versions.push(p.version);
                if p.version > 1 {
                    assert_eq!(p.tracks.len(), 1, "complete track list: {p:?}");
                }
            }
        }
    }
    assert!(versions.len() >= 3, "{versions:?}");
    assert!(versions.windows(2).all(|w| w[1] > w[0]), "{versions:?}");
    // The metadata update is echoed to alice herself.
    a.recv_until(T, |m| {
        matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.sid == alice_sid && p.metadata == "hello"))
    })
    .await
    .unwrap();
}

/// Trap: resume is offered on both signalling versions (v0: the SFU restarts ICE on the
/// subscriber connection itself), and a reconnect (v0: `reconnect=1`; v1: `reconnect` in the
/// join request) naming a session the server does not hold (unknown, or never connected, or
/// after a restart) gets `leave{action: RECONNECT}` first so clients rejoin in full. Real
/// resumes: `lab::chromium_resumes_after_its_signalling_was_lost`,
/// `lab::python_sdk_on_two_peer_connections_resumes_after_its_signalling_was_lost`.
#[tokio::test]
async fn trap_resume_is_offered_and_an_unknown_session_gets_a_full_rejoin() {
    let c = sfu().await;
    for path in Path::BOTH {
        let token = c.token("r", "bob", json!({}));
        let mut b = WsClient::connect_on(path, &c.ws_url(), &token, &plain_join_request(), "")
            .await
            .unwrap();
        let Some(Msg::Join(join)) = b.recv(T).await else {
            panic!("{path:?}: a join response first");
        };
        assert_eq!(
            join.client_configuration.map(|c| c.resume_connection),
            Some(lk::ClientConfigSetting::Enabled as i32),
            "{path:?}"
        );
    }
    for path in Path::BOTH {
        let token = c.token("r", "alice", json!({}));
        let request = lk::JoinRequest {
            reconnect: true,
            participant_sid: "PA_unknown".into(),
            ..plain_join_request()
        };
        let mut a = WsClient::connect_on(
            path,
            &c.ws_url(),
            &token,
            &request,
            "reconnect=1&sid=PA_unknown",
        )
        .await
        .unwrap();
        match a.recv(T).await {
            Some(Msg::Leave(l)) => {
                assert_eq!(l.action, lk::leave_request::Action::Reconnect as i32)
            }
            other => panic!("{path:?}: expected leave, got {other:?}"),
        }
    }
}

/// Invalid, expired, `alg: none`, wrong-key and grant-less tokens: 401 at validate and the
/// WebSocket refused; a room nobody started: 404 with LiveKit's text (auto-create off).
#[tokio::test]
async fn bad_tokens_are_refused_before_the_upgrade() {
    let c = Conclave::start(ConclaveOptions::standalone())
        .await
        .unwrap();
    let (key, _) = c.livekit_credentials();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |claims: serde_json::Value, secret: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let (_, secret) = c.livekit_credentials();
    let video = json!({"room": "r", "roomJoin": true});
    let expired = sign(
        json!({"iss": key, "sub": "a", "nbf": now - 7200, "exp": now - 3600, "video": video}),
        &secret,
    );
    let wrong_key = sign(
        json!({"iss": key, "sub": "a", "nbf": now, "exp": now + 60, "video": video}),
        "some-other-secret-some-other-secret",
    );
    let no_grant = sign(
        json!({"iss": key, "sub": "a", "nbf": now, "exp": now + 60, "video": {"room": "r"}}),
        &secret,
    );
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"iss": key, "sub": "a", "nbf": now, "exp": now + 60, "video": video}))
    );
    for (name, token) in [
        ("garbage", "not-a-jwt".to_owned()),
        ("expired", expired),
        ("wrong key", wrong_key),
        ("alg none", alg_none),
        ("no roomJoin", no_grant),
    ] {
        let r = reqwest::get(format!("{}/rtc/validate?access_token={token}", c.url))
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{name} at validate");
        let refused = WsClient::connect(&c.ws_url(), &token, "").await.err();
        assert_eq!(refused.map(|r| r.status), Some(401), "{name} on /rtc");
    }
    // Valid token, but the room was never started by a full-access user.
    let token = c.token("never-started", "a", json!({}));
    let refused = WsClient::connect(&c.ws_url(), &token, "")
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 404);
    assert_eq!(refused.body, "requested room does not exist");
    // Over the limits (identity or room name longer than 256 bytes): 400 before the upgrade,
    // the limit named. A token with metadata over 512 KiB does not even fit in an HTTP
    // header: 431 from the HTTP layer (the connect check would say 400, `sfu::limits` tests).
    let long = "x".repeat(300);
    let fat = sign(
        json!({"iss": key, "sub": "a", "nbf": now, "exp": now + 60, "video": video,
               "metadata": "m".repeat(512 * 1024 + 1)}),
        &secret,
    );
    for (what, token) in [
        ("identity", c.token("r", &long, json!({}))),
        ("room name", c.token(&long, "a", json!({}))),
    ] {
        let refused = WsClient::connect(&c.ws_url(), &token, "")
            .await
            .err()
            .unwrap();
        assert_eq!(refused.status, 400, "{what}: {}", refused.body);
        assert!(refused.body.contains(what), "{what}: {}", refused.body);
    }
    // (Too long for a URL: in the header, at validate, which makes the same checks.)
    let r = reqwest::Client::new()
        .get(format!("{}/rtc/validate", c.url))
        .bearer_auth(fat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    // Bearer header works like the query parameter (rust/python SDKs use it).
    let r = reqwest::Client::new()
        .get(format!("{}/rtc/validate", c.url))
        .bearer_auth("garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A non-upgrade GET of /rtc is a 404, like LiveKit.
    let r = reqwest::get(format!("{}/rtc", c.url)).await.unwrap();
    assert_eq!(r.status(), 404);
}

/// Publishing without `canPublish`, garbage frames, unknown messages and an `add_track` flood:
/// the session keeps answering, the server stays up.
#[tokio::test]
async fn hostile_signalling_never_wedges_the_session() {
    let c = sfu().await;
    let mut viewer = WsClient::connect(
        &c.ws_url(),
        &c.token("r", "viewer", json!({"canPublish": false})),
        "",
    )
    .await
    .unwrap();
    let j = expect_join(&mut viewer).await.unwrap();
    assert!(!j.participant.unwrap().permission.unwrap().can_publish);
    viewer
        .send(add_track("c", lk::encryption::Type::None))
        .await
        .unwrap();
    let seen = viewer
        .recv_until(T, |m| matches!(m, Msg::RequestResponse(_)))
        .await
        .unwrap();
    assert!(!seen.iter().any(|m| matches!(m, Msg::TrackPublished(_))));

    let mut a = WsClient::connect(&c.ws_url(), &c.token("r", "alice", json!({})), "")
        .await
        .unwrap();
    expect_join(&mut a).await.unwrap();
    // Not protobuf, not JSON, an unknown field number, an empty request.
    a.send_raw(WsMessage::Binary(vec![0xff, 0x00, 0x13, 0x37].into()))
        .await
        .unwrap();
    a.send_raw(WsMessage::Text("{{{ not json".into()))
        .await
        .unwrap();
    a.send_raw(WsMessage::Binary(vec![0xf8, 0x06, 0x01].into()))
        .await
        .unwrap();
    a.send_raw(WsMessage::Binary(Vec::new().into()))
        .await
        .unwrap();
    assert!(
        ping_answered(&mut a, 1).await,
        "session alive after garbage"
    );
    // A flood of add_track: bounded, answered, no wedge.
    for i in 0..300 {
        a.send(add_track(&format!("flood-{i}"), lk::encryption::Type::None))
            .await
            .unwrap();
    }
    assert!(
        ping_answered(&mut a, 2).await,
        "session alive after the flood"
    );
    // JSON text frames are answered in kind.
    a.send_raw(WsMessage::Text(
        json!({"pingReq": {"timestamp": "77", "rtt": "0"}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    a.recv_until(
        T,
        |m| matches!(m, Msg::PongResp(p) if p.last_ping_timestamp == 77),
    )
    .await
    .unwrap();
    let h = reqwest::get(format!("{}/healthz", c.url)).await.unwrap();
    assert_eq!(h.status(), 200);
    // Forged tokens and garbage UDP on the media port, on the same server.
    for bad in ["garbage", "a.b.c"] {
        assert_eq!(
            WsClient::connect(&c.ws_url(), bad, "")
                .await
                .err()
                .map(|r| r.status),
            Some(401)
        );
    }
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..500u32 {
        let junk: Vec<u8> = (0..(i % 300))
            .map(|b| (b as u8).wrapping_mul(31) ^ i as u8)
            .collect();
        let _ = udp.send_to(&junk, ("127.0.0.1", c.udp_port));
    }
    drop((a, viewer));

    // After all that, a fresh pair of real clients still exchanges media.
    let _heavy = crate::support::synapse::heavy_lock();
    let mut clients = Vec::new();
    for who in ["fresh-a", "fresh-b"] {
        let mut spec = crate::support::lk_clients::PyClientSpec::new(
            c.ws_url(),
            c.token("r", who, json!({})),
            who,
        );
        spec.expect_participants = 1;
        spec.expect_audio_frames = 50;
        spec.expect_video_frames = 10;
        // Both stay until the end, so neither leaves before the other met its expectations.
        spec.min_duration_s = 8.0;
        spec.timeout_s = 25.0;
        clients.push(crate::support::lk_clients::PyClient::spawn(spec).unwrap());
    }
    for client in clients {
        let report = client.wait(Duration::from_secs(40)).await.unwrap();
        report.assert_exit(0);
    }
}

/// A client that stops talking (no pings) is dropped after `rtc.signal_timeout_secs`, and the
/// others see it leave.
#[tokio::test]
async fn silent_client_is_disconnected_and_others_see_it_leave() {
    let c = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_RTC__SIGNAL_TIMEOUT_SECS", "2"),
    )
    .await
    .unwrap();
    let mut quiet = WsClient::connect(&c.ws_url(), &c.token("r", "quiet", json!({})), "")
        .await
        .unwrap();
    let quiet_sid = expect_join(&mut quiet)
        .await
        .unwrap()
        .participant
        .unwrap()
        .sid;
    let mut chatty = WsClient::connect(&c.ws_url(), &c.token("r", "chatty", json!({})), "")
        .await
        .unwrap();
    expect_join(&mut chatty).await.unwrap();
    // chatty keeps pinging; quiet says nothing.
    let mut gone = false;
    for i in 0..12 {
        chatty
            .send(Req::PingReq(lk::Ping {
                timestamp: i,
                rtt: 0,
            }))
            .await
            .unwrap();
        if let Ok(_seen) = chatty
            .recv_until(Duration::from_millis(500), |m| {
                matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.sid == quiet_sid && p.state == lk::participant_info::State::Disconnected as i32))
            })
            .await
        {
            gone = true;
            break;
        }
    }
    assert!(gone, "chatty saw quiet leave");
    assert!(quiet.closed_within(T).await, "quiet's socket was closed");
}

/// Trap: an unanswered publisher offer (or an answer with another id) makes clients time out
/// negotiation after 15 s and reconnect. Both paths (v1: the offer on the one peer
/// connection, sent after a join request that carried none).
#[tokio::test]
async fn trap_publisher_offer_is_answered_with_the_same_id() {
    let c = sfu().await;
    for path in Path::BOTH {
        publisher_offer_is_answered_with_the_same_id(&c, path).await;
    }
}

async fn publisher_offer_is_answered_with_the_same_id(c: &Conclave, path: Path) {
    let (mut a, _) = join_on(c, path, &format!("r-{path:?}"), "alice", json!({})).await;
    let mut client = str0m::Rtc::builder().build(std::time::Instant::now());
    let mut api = client.sdp_api();
    api.add_media(
        str0m::media::MediaKind::Audio,
        str0m::media::Direction::SendOnly,
        None,
        Some("cid-audio".into()),
        None,
    );
    api.add_channel("_reliable".into());
    let (offer, _pending) = api.apply().unwrap();
    a.send(Req::AddTrack(lk::AddTrackRequest {
        cid: "cid-audio".into(),
        r#type: lk::TrackType::Audio as i32,
        ..Default::default()
    }))
    .await
    .unwrap();
    a.send(Req::Offer(lk::SessionDescription {
        r#type: "offer".into(),
        sdp: offer.to_sdp_string(),
        id: 41,
        mid_to_track_id: Default::default(),
    }))
    .await
    .unwrap();
    let seen = a
        .recv_until(T, |m| matches!(m, Msg::Answer(_)))
        .await
        .unwrap();
    let Some(Msg::Answer(answer)) = seen.last() else {
        unreachable!()
    };
    assert_eq!(answer.id, 41, "{path:?}");
    assert_eq!(answer.r#type, "answer");
    assert!(answer.sdp.contains("a=ice-lite"));
    // A garbage SDP is refused without killing the session.
    a.send(Req::Offer(lk::SessionDescription {
        r#type: "offer".into(),
        sdp: "v=0 garbage".into(),
        id: 42,
        mid_to_track_id: Default::default(),
    }))
    .await
    .unwrap();
    assert!(ping_answered(&mut a, 3).await);
}

/// Trap: lk-jwt-service room names and identities contain `+` and `/`; they must round-trip
/// through URLs and the join untouched. Both paths.
#[tokio::test]
async fn trap_room_names_with_plus_and_slash_round_trip() {
    let c = sfu().await;
    for (path, room) in [
        (Path::V0, "F4oOprKFBq6JHqy2qYpq6UQQmR7hCvxkQQoUrd0+SbI"),
        (Path::V1, "G5pPqsLGCr7KIrz3rZqr7VRRnS8iDwylRRpVse1+TcJ"),
    ] {
        let identity = "WulP/G0PPitjxR6gB3GRPsgWcg7TtNrJ7kzzDBG3S0g";
        let (_a, j) = join_on(&c, path, room, identity, json!({})).await;
        assert_eq!(j.room.unwrap().name, room, "{path:?}");
        assert_eq!(j.participant.unwrap().identity, identity);
    }
}

/// A signal message over 2 MiB ends that session with close code 1009 (Message Too Big) and
/// the reason; the others see it leave and the server goes on.
#[tokio::test]
async fn a_message_over_2_mib_closes_with_1009() {
    let c = sfu().await;
    let (mut a, alice_sid, mut b) = alice_and_bob(&c, Path::V0).await;
    // The server stops reading at the frame's header and closes. When the kernel has not
    // taken the whole 3 MiB by then (a busy machine), the rest of the write meets the reset
    // of a socket closed with unread data; the close frame sent before it is still read.
    if let Err(e) = a
        .send_raw(WsMessage::Binary(vec![0u8; 3 * 1024 * 1024].into()))
        .await
    {
        eprintln!("the 3 MiB write was cut short: {e:#}");
    }
    let (code, reason) = a
        .close_frame_within(T)
        .await
        .expect("the server closes with a close frame");
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("2 MiB"), "{reason}");
    b.recv_until(T, |m| {
        matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.sid == alice_sid
            && p.state == lk::participant_info::State::Disconnected as i32))
    })
    .await
    .unwrap();
    // The server still takes new sessions.
    let token = c.token("r-after-big", "carol", json!({}));
    let mut carol = WsClient::connect(&c.ws_url(), &token, "").await.unwrap();
    expect_join(&mut carol).await.unwrap();
}

/// Limits: a 1 MiB metadata update is refused with `LIMIT_EXCEEDED` and nobody else ever sees
/// it; a client's leave reaches the others as `CLIENT_INITIATED`.
#[tokio::test]
async fn oversized_updates_are_refused_and_a_leave_is_client_initiated() {
    let c = sfu().await;
    let (mut a, alice_sid, mut b) = alice_and_bob(&c, Path::V0).await;

    a.send(Req::UpdateMetadata(lk::UpdateParticipantMetadata {
        metadata: "x".repeat(1024 * 1024),
        request_id: 42,
        ..Default::default()
    }))
    .await
    .unwrap();
    let seen = a
        .recv_until(
            T,
            |m| matches!(m, Msg::RequestResponse(r) if r.request_id == 42),
        )
        .await
        .unwrap();
    let Some(Msg::RequestResponse(r)) = seen.last() else {
        unreachable!()
    };
    assert_eq!(
        r.reason,
        lk::request_response::Reason::LimitExceeded as i32,
        "{r:?}"
    );
    assert!(r.message.contains("metadata"), "{r:?}");
    // A small update after it goes through; bob sees that one and nothing large before it.
    a.send(Req::UpdateMetadata(lk::UpdateParticipantMetadata {
        metadata: "small".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    let seen = b
        .recv_until(T, |m| {
            matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.sid == alice_sid && p.metadata == "small"))
        })
        .await
        .unwrap();
    assert!(
        seen.iter().all(|m| m.encoded_len() < 10_000),
        "bob got a large message"
    );

    // alice leaves: bob sees her go as CLIENT_INITIATED.
    a.send(Req::Leave(lk::LeaveRequest::default()))
        .await
        .unwrap();
    b.recv_until(T, |m| {
        matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.sid == alice_sid
            && p.state == lk::participant_info::State::Disconnected as i32
            && p.disconnect_reason == lk::DisconnectReason::ClientInitiated as i32))
    })
    .await
    .unwrap();
    assert!(a.closed_within(T).await, "alice's socket was closed");
}

/// With `turn.enabled`, every join response carries the embedded TURN server's URLs and a
/// fresh credential of its own (two joins, two usernames), and that credential opens an
/// allocation on the TURN server (a raw TURN client: challenge, then a signed Allocate).
#[tokio::test]
async fn join_responses_carry_turn_credentials_the_turn_server_accepts() {
    use conclave::turn::message::{attr, Builder, Class, Message, ALLOCATE};
    let turn_port = crate::support::synapse::free_ports(1).unwrap()[0];
    let c = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_TURN__ENABLED", "true")
            .env("CONCLAVE_TURN__UDP_PORT", &turn_port.to_string())
            .env("CONCLAVE_TURN__TCP_PORT", "0"),
    )
    .await
    .unwrap();
    let (_a, join) = join_on(&c, Path::V1, "turn", "alice", json!({})).await;
    let (_b, other) = join_on(&c, Path::V0, "turn", "bob", json!({})).await;
    assert_eq!(join.ice_servers.len(), 1, "{:?}", join.ice_servers);
    let ice = &join.ice_servers[0];
    assert_ne!(ice.username, other.ice_servers[0].username);
    assert_eq!(
        ice.urls.len(),
        1,
        "UDP only (TCP 0, no TLS): {:?}",
        ice.urls
    );
    let url = &ice.urls[0];
    assert_eq!(url, &format!("turn:127.0.0.1:{turn_port}?transport=udp"));
    let port = turn_port;

    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let allocate = |signed: Option<(&str, &[u8; 16])>| {
        let mut b = Builder::new(ALLOCATE, Class::Request, rand::random())
            .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        if let Some((nonce, key)) = signed {
            b = b
                .attr(attr::USERNAME, ice.username.as_bytes())
                .attr(attr::REALM, b"conclave")
                .attr(attr::NONCE, nonce.as_bytes())
                .integrity(key);
        }
        b.finish()
    };
    let mut buf = vec![0u8; 2048];
    let mut exchange = async |bytes: Vec<u8>| {
        sock.send_to(&bytes, server).await.unwrap();
        let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
            .await
            .expect("a TURN answer")
            .unwrap();
        buf[..n].to_vec()
    };
    let challenge = exchange(allocate(None)).await;
    let m = Message::parse(&challenge).unwrap();
    assert_eq!(m.class, Class::Error);
    let nonce = m.text(attr::NONCE).unwrap().to_owned();
    let text = format!("{}:conclave:{}", ice.username, ice.credential);
    let key: [u8; 16] = <md5::Md5 as md5::Digest>::digest(text.as_bytes()).into();
    let answer = exchange(allocate(Some((&nonce, &key)))).await;
    let m = Message::parse(&answer).unwrap();
    assert_eq!(m.class, Class::Success, "the join's credential allocates");
    assert!(m.integrity_ok(&key));
    let metrics = c.metrics().await.unwrap();
    assert!(
        metrics.contains("conclave_turn_allocations 1\n"),
        "{metrics}"
    );
}

/// A TURN certificate that cannot be read stops Conclave at start with a message naming the
/// file, not later at the first TLS client.
#[tokio::test]
async fn an_unreadable_turn_certificate_is_a_clear_start_error() {
    let turn_port = crate::support::synapse::free_ports(1).unwrap()[0];
    let err = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_TURN__ENABLED", "true")
            .env("CONCLAVE_TURN__UDP_PORT", &turn_port.to_string())
            .env("CONCLAVE_TURN__TCP_PORT", "0")
            .env("CONCLAVE_TURN__TLS_PORT", &turn_port.to_string())
            .env("CONCLAVE_TURN__CERT_FILE", "/nonexistent/turn.crt")
            .env("CONCLAVE_TURN__KEY_FILE", "/nonexistent/turn.key")
            .env("CONCLAVE_TURN__DOMAIN", "turn.example"),
    )
    .await
    .err()
    .expect("Conclave must not start");
    let text = format!("{err:#}");
    assert!(
        text.contains("TURN TLS: certificate /nonexistent/turn.crt"),
        "{text}"
    );
}

/// The admin API's SFU room view (`/_conclave/admin/v1/sfu/rooms/{room}`, standalone SFUs'
/// rooms too): refused without the admin token, 404 for a room the SFU does not have, the
/// connected participants with their transport otherwise (`lab::browser_*` show `tcp` and
/// `turn/tls`).
#[tokio::test]
async fn the_admin_sfu_room_view_needs_the_token_and_a_known_room() {
    let c = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_ADMIN__TOKEN", "admin-secret"),
    )
    .await
    .unwrap();
    let (_a, join) = join_on(&c, Path::V1, "view", "alice", json!({})).await;
    let url = |room: &str| format!("{}/_conclave/admin/v1/sfu/rooms/{room}", c.url);
    let http = reqwest::Client::new();
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(http.get(url("view")).send().await.unwrap()), 401);
    let wrong = http
        .get(url("view"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(status(wrong), 401);
    let unknown = http
        .get(url("nowhere"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(status(unknown), 404);
    let view: serde_json::Value = http
        .get(url("view"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let alice = join.participant.expect("alice's info");
    assert_eq!(view["room"], "view", "{view}");
    assert_eq!(view["participants"][0]["sid"], alice.sid.as_str(), "{view}");
    // Not connected over media: no transport yet.
    assert!(view["participants"][0]["transport"].is_null(), "{view}");
}
