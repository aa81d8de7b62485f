//! WHIP and WHEP (`docs/bridges.md`) with a third-party WebRTC stack: aiortc
//! (`tests/clients/whip_client.py`) publishes into a room and plays a participant out, real
//! LiveKit SDKs (Python, Chromium + livekit-client) on the other side; refusals carry the
//! RFC's status codes and leave the server healthy.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::conclave::{eventually, Conclave, ConclaveOptions};
use crate::support::lk_clients::{PyClient, PyClientSpec, WhipClient};
use crate::support::lk_ws::{expect_join, WsClient};
use crate::support::synapse::heavy_lock;
use crate::support::web::{Browser, BrowserSpec, TabSpec};
use livekit_protocol as lk;
use lk::signal_request::Message as Req;

const ADMIN_TOKEN: &str = "bridges-admin";

async fn sfu() -> Conclave {
    Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_ADMIN__TOKEN", ADMIN_TOKEN),
    )
    .await
    .unwrap()
}

/// `POST /_conclave/admin/v1/bridges/tokens` with `admin` as bearer: (status, body).
async fn mint(c: &Conclave, admin: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/_conclave/admin/v1/bridges/tokens", c.url))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn publish_args(url: &str, token: &str, seconds: f64) -> Vec<String> {
    [
        "publish",
        "--url",
        url,
        "--token",
        token,
        "--seconds",
        &seconds.to_string(),
        "--timeout",
        &(seconds + 20.0).to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

fn play_args(url: &str, token: &str, audio: u32, video: u32) -> Vec<String> {
    [
        "play",
        "--url",
        url,
        "--token",
        token,
        "--expect-audio-frames",
        &audio.to_string(),
        "--expect-video-frames",
        &video.to_string(),
        "--timeout",
        "40",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The participants of SFU room `room` (RoomService `ListParticipants`): identity and
/// tracks (`sid`, `kind`), empty when the room does not exist.
async fn participants(c: &Conclave, room: &str) -> Vec<(String, Vec<(String, String)>)> {
    let admin = c.token(room, "test-admin", json!({"roomAdmin": true}));
    let r = reqwest::Client::new()
        .post(format!(
            "{}/twirp/livekit.RoomService/ListParticipants",
            c.url
        ))
        .bearer_auth(admin)
        .json(&json!({"room": room}))
        .send()
        .await;
    let Ok(r) = r else { return Vec::new() };
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let kind = |t: &Value| match &t["type"] {
        Value::String(s) => s.to_ascii_lowercase(),
        Value::Number(n) if n.as_u64() == Some(1) => "video".into(),
        Value::Number(_) | Value::Null => "audio".into(),
        other => other.to_string(),
    };
    v["participants"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let tracks = p["tracks"]
                        .as_array()
                        .map(|ts| {
                            ts.iter()
                                .map(|t| (t["sid"].as_str().unwrap_or("?").to_owned(), kind(t)))
                                .collect()
                        })
                        .unwrap_or_default();
                    (p["identity"].as_str().unwrap_or("?").to_owned(), tracks)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The track kinds of `identity` in `room`, if it is there.
async fn kinds_of(c: &Conclave, room: &str, identity: &str) -> Option<Vec<String>> {
    participants(c, room)
        .await
        .into_iter()
        .find(|(who, _)| who == identity)
        .map(|(_, ts)| ts.into_iter().map(|(_, k)| k).collect())
}

/// aiortc publishes a sine and a test pattern over WHIP (no LiveKit code on that side): a
/// Python SDK participant and Chromium with livekit-client receive both (decoded frames,
/// video playing, audio level); the admin API shows the WHIP participant with its two
/// tracks; the client's `DELETE` takes it out of the room.
#[tokio::test]
async fn whip_publisher_reaches_python_and_browser_subscribers() {
    let _heavy = heavy_lock();
    let c = sfu().await;
    let room = "whip-room";
    let token = c.token(
        room,
        "encoder",
        json!({"canPublish": true, "canSubscribe": false}),
    );
    let mut whip = WhipClient::spawn(
        "encoder",
        &publish_args(&format!("{}/whip/v1/{room}", c.url), &token, 30.0),
    )
    .unwrap();
    let created = whip
        .wait_event("created", Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("WHIP session: {e:#}\n{}", c.logs()));
    assert!(
        created["location"]
            .as_str()
            .is_some_and(|l| l.starts_with("/whip/v1/resource/")),
        "{created}"
    );
    assert!(
        created["etag"].as_str().is_some_and(|e| e.starts_with('"')),
        "{created}"
    );
    assert_eq!(created["content_type"], "application/sdp", "{created}");
    let connected = whip
        .wait_event("connection", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(connected["state"], "connected", "{connected}\n{}", c.logs());

    let tracks = eventually(
        Duration::from_secs(10),
        "the WHIP participant's tracks",
        || async { Ok(kinds_of(&c, room, "encoder").await.filter(|k| k.len() == 2)) },
    )
    .await
    .unwrap();
    assert!(
        tracks.contains(&"audio".to_owned()) && tracks.contains(&"video".to_owned()),
        "{tracks:?}"
    );

    let viewer = c.token(
        room,
        "viewer",
        json!({"canPublish": false, "canSubscribe": true}),
    );
    let mut py = PyClientSpec::viewer(c.ws_url(), viewer, "viewer");
    py.expect_participants = 1;
    py.expect_audio_frames = 100;
    py.expect_video_frames = 30;
    py.timeout_s = 30.0;
    let py = PyClient::spawn(py).unwrap();

    let tab_token = c.token(
        room,
        "page",
        json!({"canPublish": false, "canSubscribe": true}),
    );
    let mut tab = TabSpec::new("page", c.ws_url(), tab_token);
    tab.publish_camera = false;
    tab.publish_microphone = false;
    tab.expect_video_playing = vec![("encoder".into(), 30)];
    tab.expect_remote_tracks = vec![("encoder".into(), Some("audio".into()))];
    tab.expect_audio_level = vec![("encoder".into(), 0.01)];
    let mut spec = BrowserSpec::new(vec![tab]);
    spec.timeout_s = 40.0;
    let report = Browser::run(spec).await.unwrap();
    assert!(
        report.exit_code == 0,
        "the page plays the WHIP participant\n{}\n{}",
        report.describe(),
        c.logs()
    );
    let videos = report.remote("page", "videos", "encoder");
    let v = videos.first().copied().cloned().unwrap_or(Value::Null);
    assert!(
        v["video_width"].as_u64() == Some(320) && v["frames_advancing"] == true,
        "the page sees aiortc's 320x240 test pattern: {v}"
    );

    let r = py.wait(Duration::from_secs(40)).await.unwrap();
    r.assert_exit(0);
    let remote = r.remote("encoder").cloned().unwrap_or(Value::Null);
    assert!(
        remote["audio_frames"].as_u64().unwrap_or(0) >= 100
            && remote["video_frames"].as_u64().unwrap_or(0) >= 30,
        "the Python SDK decodes the WHIP participant's audio and video: {remote}"
    );
    eprintln!(
        "WHIP -> python: {} audio, {} video frames; page: {}x{} {} frames",
        remote["audio_frames"],
        remote["video_frames"],
        v["video_width"],
        v["video_height"],
        v["frames"]
    );

    // The client's DELETE ends the session: the participant leaves the room.
    let report = whip.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!(report.exit_code, 0, "{}", report.describe());
    assert_eq!(report.summary["delete_status"], 200, "{}", report.summary);
    eventually(
        Duration::from_secs(5),
        "the WHIP participant gone",
        || async { Ok(kinds_of(&c, room, "encoder").await.is_none().then_some(())) },
    )
    .await
    .unwrap();
    assert_eq!(c.metric("conclave_whip_sessions_total").await.unwrap(), 1);
}

/// aiortc plays a Python SDK participant's audio and video over WHEP (by identity, then one
/// track by SID), frames decoded; the viewer received only what it asked for.
#[tokio::test]
async fn whep_player_plays_a_livekit_participant() {
    let _heavy = heavy_lock();
    let c = sfu().await;
    let room = "whep-room";
    let alice = c.token(
        room,
        "alice",
        json!({"canPublish": true, "canSubscribe": true}),
    );
    let mut a = PyClientSpec::new(c.ws_url(), alice, "alice");
    a.timeout_s = 60.0;
    a.min_duration_s = 60.0;
    let mut alice = PyClient::spawn(a).unwrap();
    alice
        .wait_event("connected", Duration::from_secs(20))
        .await
        .unwrap();
    let tracks = eventually(Duration::from_secs(15), "alice's two tracks", || async {
        let ps = participants(&c, room).await;
        let alice = ps.into_iter().find(|(who, _)| who == "alice");
        Ok(alice.map(|(_, ts)| ts).filter(|ts| ts.len() == 2))
    })
    .await
    .unwrap();

    // The viewer's token comes from the admin API (an operator's recorder).
    let (status, minted) = mint(
        &c,
        ADMIN_TOKEN,
        json!({"kind": "whep", "room": room, "identity": "recorder", "valid_for_secs": 600}),
    )
    .await;
    assert_eq!(status, 200, "{minted}");
    assert_eq!(
        minted["path"],
        format!("/whep/v1/{room}/<identity to play>")
    );
    let viewer = minted["token"].as_str().unwrap().to_owned();
    for (admin, body, want) in [
        (
            "wrong",
            json!({"kind": "whep", "room": room, "identity": "x"}),
            401,
        ),
        (
            ADMIN_TOKEN,
            json!({"kind": "sip", "room": room, "identity": "x"}),
            400,
        ),
        (
            ADMIN_TOKEN,
            json!({"kind": "whip", "room": room, "identity": "x", "valid_for_secs": 0}),
            400,
        ),
        (
            ADMIN_TOKEN,
            json!({"kind": "whip", "room": "", "identity": "x"}),
            400,
        ),
    ] {
        let (status, body) = mint(&c, admin, body).await;
        assert_eq!(status, want, "{body}");
    }
    // A WHEP token does not publish.
    let refused = reqwest::Client::new()
        .post(format!("{}/whip/v1/{room}", c.url))
        .bearer_auth(&viewer)
        .header("content-type", "application/sdp")
        .body("v=0\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let play = WhipClient::spawn(
        "recorder",
        &play_args(&format!("{}/whep/v1/{room}/alice", c.url), &viewer, 50, 20),
    )
    .unwrap();
    let r = play.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.exit_code, 0, "{}\n{}", r.describe(), c.logs());
    let frames = &r.summary["frames"];
    assert!(
        frames["audio"].as_u64().unwrap_or(0) >= 50 && frames["video"].as_u64().unwrap_or(0) >= 20,
        "{}",
        r.summary
    );
    assert!(
        r.summary["video_size"][0].as_u64().unwrap_or(0) > 0,
        "{}",
        r.summary
    );
    assert_eq!(r.summary["delete_status"], 200, "{}", r.summary);
    eprintln!("WHEP <- alice: {frames}, video {}", r.summary["video_size"]);

    // One track by SID: only video frames arrive.
    let video_sid = tracks
        .iter()
        .find(|(_, kind)| kind == "video")
        .map(|(sid, _)| sid.clone())
        .expect("video sid");
    let play = WhipClient::spawn(
        "recorder-video",
        &play_args(
            &format!("{}/whep/v1/{room}/track/{video_sid}", c.url),
            &viewer,
            0,
            20,
        ),
    )
    .unwrap();
    let r = play.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.exit_code, 0, "{}\n{}", r.describe(), c.logs());
    assert_eq!(r.summary["frames"]["audio"], 0, "{}", r.summary);
    assert!(
        r.summary["frames"]["video"].as_u64().unwrap_or(0) >= 20,
        "{}",
        r.summary
    );
    assert_eq!(c.metric("conclave_whep_sessions_total").await.unwrap(), 2);
    drop(alice);
}

const OFFER_VP9_ONLY: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
a=group:BUNDLE 0\r\na=msid-semantic: WMS\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 98\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:EsAw\r\na=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y\r\n\
a=fingerprint:sha-256 DA:7B:57:DC:28:CE:04:4F:31:79:85:C4:31:67:EB:27:58:29:ED:77:2A:0D:24:AE:ED:AD:30:BC:BD:F1:9C:02\r\n\
a=setup:actpass\r\na=mid:0\r\na=sendonly\r\na=msid:- v\r\na=rtcp-mux\r\n\
a=rtpmap:98 VP9/90000\r\n";

/// Every refusal of the issue, each with its status and a message that says why, then the
/// server still serves a good request.
#[tokio::test]
async fn whip_and_whep_refuse_bad_requests_with_the_rfc_status_codes() {
    let c = sfu().await;
    let http = reqwest::Client::new();
    let room = "bad-room";
    let good = c.token(room, "enc", json!({"canPublish": true}));
    let no_publish = c.token(room, "enc", json!({"canPublish": false}));
    let no_subscribe = c.token(room, "rec", json!({"canSubscribe": false}));
    let other_room = c.token("another-room", "enc", json!({"canPublish": true}));
    let forged = {
        let mut t = good.clone();
        t.push('x');
        t
    };
    let whip = format!("{}/whip/v1/{room}", c.url);
    let whep = format!("{}/whep/v1/{room}/alice", c.url);
    let offer = OFFER_VP9_ONLY.replace("VP9", "VP8");
    let post = |url: String, token: Option<String>, ctype: &'static str, body: Vec<u8>| {
        // A fresh connection each: a 413 closes its connection before the body is read.
        let mut r = reqwest::Client::new()
            .post(url)
            .header("content-type", ctype)
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move {
            let r = r.send().await.expect("send");
            let status = r.status().as_u16();
            let www = r.headers().get("www-authenticate").is_some();
            (status, r.text().await.unwrap_or_default(), www)
        }
    };
    let sdp = "application/sdp";
    // (what, wanted status, words the message must hold, (status, body, WWW-Authenticate)).
    type Case<'a> = (&'a str, u16, &'a str, (u16, String, bool));
    let cases: Vec<Case> = vec![
        (
            "no token",
            401,
            "no token",
            post(whip.clone(), None, sdp, offer.clone().into()).await,
        ),
        (
            "forged token",
            401,
            "token refused",
            post(whip.clone(), Some(forged), sdp, offer.clone().into()).await,
        ),
        (
            "token for another room",
            403,
            "another-room",
            post(
                whip.clone(),
                Some(other_room.clone()),
                sdp,
                offer.clone().into(),
            )
            .await,
        ),
        (
            "no publish grant",
            403,
            "canPublish",
            post(whip.clone(), Some(no_publish), sdp, offer.clone().into()).await,
        ),
        (
            "an identity over the limit in the token",
            400,
            "identity",
            post(
                whip.clone(),
                Some(c.token(room, &"x".repeat(300), json!({"canPublish": true}))),
                sdp,
                offer.clone().into(),
            )
            .await,
        ),
        (
            "no subscribe grant",
            403,
            "canSubscribe",
            post(
                whep.clone(),
                Some(no_subscribe),
                sdp,
                offer.replace("sendonly", "recvonly").into(),
            )
            .await,
        ),
        (
            "not SDP",
            415,
            "application/sdp",
            post(
                whip.clone(),
                Some(good.clone()),
                "application/json",
                b"{}".to_vec(),
            )
            .await,
        ),
        (
            "malformed SDP",
            400,
            "malformed SDP",
            post(
                whip.clone(),
                Some(good.clone()),
                sdp,
                b"v=0\r\nthis is not SDP\r\n".to_vec(),
            )
            .await,
        ),
        (
            "unsupported codec only",
            422,
            "VP9",
            post(
                whip.clone(),
                Some(good.clone()),
                sdp,
                OFFER_VP9_ONLY.as_bytes().to_vec(),
            )
            .await,
        ),
        (
            "WHIP offer that sends nothing",
            422,
            "sendonly",
            post(
                whip.clone(),
                Some(good.clone()),
                sdp,
                offer.replace("sendonly", "recvonly").into(),
            )
            .await,
        ),
        (
            "1 MB body",
            413,
            "length limit",
            post(whip.clone(), Some(good.clone()), sdp, vec![b'a'; 1 << 20]).await,
        ),
        (
            "WHEP in a room that does not exist",
            404,
            "does not exist",
            post(
                whep.clone(),
                Some(c.token(room, "rec", json!({}))),
                sdp,
                offer.replace("sendonly", "recvonly").into(),
            )
            .await,
        ),
    ];
    let mut failures = Vec::new();
    for (what, want, needle, (status, body, www)) in &cases {
        if status != want || !body.contains(needle) {
            failures.push(format!(
                "{what}: {status} {body:?} (want {want} with {needle:?})"
            ));
        }
        if *status == 401 && !www {
            failures.push(format!("{what}: 401 without WWW-Authenticate"));
        }
    }
    // Resources that do not exist: 404 for PATCH and DELETE, with a valid token.
    let unknown = format!("{}/whip/v1/resource/0123456789abcdef", c.url);
    let r = http
        .patch(&unknown)
        .bearer_auth(&good)
        .header("content-type", "application/trickle-ice-sdpfrag")
        .body("a=ice-ufrag:x\r\na=ice-pwd:yyyyyyyyyyyyyyyyyyyyyyyy\r\n")
        .send()
        .await
        .unwrap();
    let (st, body) = (r.status().as_u16(), r.text().await.unwrap());
    if st != 404 || !body.contains("no whip session") {
        failures.push(format!("PATCH unknown: {st} {body:?}"));
    }
    let r = http
        .delete(&unknown)
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    let (st, body) = (r.status().as_u16(), r.text().await.unwrap());
    if st != 404 || !body.contains("no whip session") {
        failures.push(format!("DELETE unknown: {st} {body:?}"));
    }
    // Other methods on the endpoint: 405; OPTIONS: CORS and Accept-Post.
    let r = http.get(&whip).send().await.unwrap();
    if r.status().as_u16() != 405 {
        failures.push(format!("GET endpoint: {}", r.status()));
    }
    let r = http
        .request(reqwest::Method::OPTIONS, &whip)
        .send()
        .await
        .unwrap();
    if r.headers().get("accept-post").and_then(|v| v.to_str().ok()) != Some("application/sdp")
        || r.headers().get("access-control-allow-origin").is_none()
    {
        failures.push(format!("OPTIONS: {} {:?}", r.status(), r.headers()));
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", c.logs());
    assert!(c.metric("conclave_bridge_refused_total").await.unwrap() >= cases.len() as u64 - 1);

    // Still healthy, and nothing was left behind: a good offer from a real client is served.
    let health = http.get(format!("{}/healthz", c.url)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        participants(&c, room).await.is_empty(),
        "a refused request left a participant"
    );
    let mut whip_client = WhipClient::spawn("enc", &publish_args(&whip, &good, 6.0)).unwrap();
    let created = whip_client
        .wait_event("created", Duration::from_secs(20))
        .await
        .unwrap();
    let connected = whip_client
        .wait_event("connection", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(connected["state"], "connected", "{connected}");

    // PATCH on the live session (RFC 9725 §4.3): each answer as the RFC says.
    let resource = format!("{}{}", c.url, created["location"].as_str().unwrap());
    let etag = created["etag"].as_str().unwrap().to_owned();
    let patch = |ctype: &'static str, if_match: Option<&str>, body: &str, token: &str| {
        let mut r = reqwest::Client::new()
            .patch(&resource)
            .bearer_auth(token)
            .header("content-type", ctype)
            .body(body.to_owned());
        if let Some(m) = if_match {
            r = r.header("if-match", m);
        }
        async move {
            let r = r.send().await.expect("send");
            let status = r.status().as_u16();
            let etag = r
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (status, etag, r.text().await.unwrap_or_default())
        }
    };
    let frag = "application/trickle-ice-sdpfrag";
    let candidate = "a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n";
    let someone_else = c.token(room, "intruder", json!({"canPublish": true}));
    let checks = [
        (
            "wrong content type",
            415,
            patch("text/plain", None, candidate, &good).await,
        ),
        (
            "malformed fragment",
            400,
            patch(frag, None, "garbage", &good).await,
        ),
        (
            "stale If-Match",
            412,
            patch(frag, Some("\"stale\""), candidate, &good).await,
        ),
        (
            "another participant's token",
            403,
            patch(frag, None, candidate, &someone_else).await,
        ),
        (
            "trickled candidate",
            204,
            patch(frag, Some(&etag), candidate, &good).await,
        ),
    ];
    for (what, want, (status, _, body)) in &checks {
        assert_eq!(status, want, "PATCH {what}: {body}");
    }
    let restart = "a=ice-ufrag:rstr\r\na=ice-pwd:restartedpasswordrestarted\r\n";
    let (status, new_etag, body) = patch(frag, Some("*"), restart, &good).await;
    assert_eq!(status, 200, "ICE restart: {body}");
    assert!(
        new_etag.as_ref().is_some_and(|e| *e != etag),
        "a new entity tag for the new ICE session: {new_etag:?}"
    );
    assert!(
        body.contains("a=ice-ufrag:") && body.contains("a=candidate:") && !body.contains("rstr"),
        "the answer's fragment: {body}"
    );
    let (status, _, body) = patch(frag, Some(&etag), candidate, &good).await;
    assert_eq!(status, 412, "the old entity tag after the restart: {body}");
    drop(whip_client);

    // End-to-end encrypted tracks: refused unless the viewer expects ciphertext.
    let secret_token = c.token(room, "secret", json!({"canPublish": true}));
    let mut secret = WsClient::connect(&c.ws_url(), &secret_token, "")
        .await
        .unwrap();
    expect_join(&mut secret).await.unwrap();
    secret
        .send(Req::AddTrack(lk::AddTrackRequest {
            cid: "enc-audio".into(),
            name: "mic".into(),
            r#type: lk::TrackType::Audio as i32,
            source: lk::TrackSource::Microphone as i32,
            encryption: lk::encryption::Type::Gcm as i32,
            ..Default::default()
        }))
        .await
        .unwrap();
    let viewer = c.token(room, "rec", json!({"canPublish": false}));
    let recv_offer = offer
        .replace("sendonly", "recvonly")
        .replace("m=video", "m=audio")
        .replace("VP8/90000", "opus/48000/2");
    let url = format!("{}/whep/v1/{room}/secret", c.url);
    let (status, body, _) = eventually(
        Duration::from_secs(5),
        "the encrypted track published",
        || {
            let (url, viewer, recv_offer) = (url.clone(), viewer.clone(), recv_offer.clone());
            async move {
                let r = post(url, Some(viewer), sdp, recv_offer.into_bytes()).await;
                Ok((r.0 != 404).then_some(r))
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("end-to-end encrypted"), "{body}");
    let (status, body, _) = post(
        format!("{url}?ciphertext=1"),
        Some(viewer),
        sdp,
        recv_offer.into_bytes(),
    )
    .await;
    assert_eq!(status, 201, "a viewer that expects ciphertext: {body}");
}

/// The admin API's view of the call in Matrix room `room`.
async fn call_view(c: &Conclave, admin_token: &str, room: &str) -> anyhow::Result<Value> {
    let r = reqwest::Client::new()
        .get(format!("{}/_conclave/admin/v1/calls/{room}", c.url))
        .bearer_auth(admin_token)
        .send()
        .await?;
    Ok(r.json::<Value>().await?)
}

/// The Matrix rules hold for whoever minted a WHIP token: a bridge's user (here a plain
/// Matrix user, as an appservice's would be) joined to the room gets its token from the token
/// service and publishes over WHIP into the call: the admin API's call view shows the WHIP
/// participant under that Matrix user, publishing two tracks, and the bot's call notice names
/// that user. When the user leaves the Matrix
/// room, the participant is removed (within 2 s), its WHIP session is gone (`DELETE` → 404)
/// and no new token is issued.
#[tokio::test]
async fn a_whip_participant_follows_the_matrix_membership_of_its_minting_user() {
    use crate::support::conclave::{get_token, pair_with_conclave_on_hs1, wait_joined};
    use crate::support::matrix_client::CALL_MEMBER;
    let _heavy = heavy_lock();
    let admin_token = "bridge-admin";
    let (hs1, _hs2, c) = pair_with_conclave_on_hs1(&[("CONCLAVE_ADMIN__TOKEN", admin_token)])
        .await
        .unwrap();
    let alice = hs1.register("alice", false).await.unwrap();
    let bridge = hs1.register("bridge", false).await.unwrap();
    let bot = format!("@conclave:{}", hs1.server_name);
    let room = alice
        .create_call_room(&[&bridge.user_id, &bot])
        .await
        .unwrap();
    bridge.join(&room, &[]).await.unwrap();
    wait_joined(&c, &room, &bridge.user_id).await;
    wait_joined(&c, &room, &bot).await;
    let membership = json!({
        "application": "m.call", "call_id": "", "scope": "m.room",
        "device_id": bridge.device_id, "expires": 14_400_000,
        "focus_active": {"type": "livekit", "focus_selection": "multi_sfu"},
        "foci_preferred": [{"type": "livekit", "livekit_service_url": c.url}],
    });
    bridge
        .send_state(
            &room,
            CALL_MEMBER,
            &bridge.call_member_state_key(),
            membership,
        )
        .await
        .unwrap();
    let (s, t) = get_token(&c, &bridge, &room).await;
    assert_eq!(s, 200, "{t}");
    let jwt = t["jwt"].as_str().unwrap().to_owned();

    // WHIP with the Matrix-issued token, into the token's room (`/whip/v1`, no room in the URL).
    let mut whip = WhipClient::spawn(
        "bridge",
        &publish_args(&format!("{}/whip/v1", c.url), &jwt, 40.0),
    )
    .unwrap();
    let created = whip
        .wait_event("created", Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("WHIP session: {e:#}\n{}", c.logs()));
    let location = created["location"].as_str().unwrap().to_owned();
    let connected = whip
        .wait_event("connection", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(connected["state"], "connected", "{connected}");
    let seen = eventually(
        Duration::from_secs(10),
        "the WHIP participant in the call view",
        || {
            let (c, room, user) = (&c, room.clone(), bridge.user_id.clone());
            async move {
                let v = call_view(c, admin_token, &room).await?;
                let p = v["sfu"]["participants"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["user_id"] == user.as_str()))
                    .cloned();
                Ok(p.filter(|p| p["tracks"] == 2 && p["publisher"] == true))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    assert_eq!(seen["device_id"], bridge.device_id.as_str(), "{seen}");
    // The call notice names the bridge's user, as for anyone who starts a call.
    let started = eventually(Duration::from_secs(10), "the call notice", || {
        let (alice, room, user) = (&alice, room.clone(), bridge.user_id.clone());
        async move {
            let n = crate::calls::notices(alice, &room).await;
            Ok(n.into_iter()
                .find(|t| t.contains("started a call") && t.contains(user.as_str())))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    eprintln!("notice: {started}");

    // The bridge's user leaves the Matrix room: the WHIP participant goes.
    let left = std::time::Instant::now();
    bridge.leave(&room).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the WHIP participant removed",
        || {
            let (c, room, user) = (&c, room.clone(), bridge.user_id.clone());
            async move {
                let v = call_view(c, admin_token, &room).await?;
                let there = v["sfu"]["participants"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["user_id"] == user.as_str()));
                Ok((!there).then_some(()))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let took = left.elapsed();
    eprintln!("WHIP participant removed {took:?} after its Matrix user left");
    assert!(took < Duration::from_secs(2), "removed after {took:?}");
    let gone = eventually(Duration::from_secs(3), "the WHIP session ended", || {
        let url = format!("{}{location}", c.url);
        let jwt = jwt.clone();
        async move {
            let r = reqwest::Client::new()
                .delete(url)
                .bearer_auth(jwt)
                .send()
                .await?;
            Ok((r.status() == 404).then_some(()))
        }
    })
    .await;
    assert!(gone.is_ok(), "the WHIP session outlived its participant");
    let (s, b) = get_token(&c, &bridge, &room).await;
    assert_eq!(s, 403, "{b}");
    drop(whip);
}

/// Chromium publishes its fake camera in three simulcast layers (rids q, h, f) and its
/// microphone with the npm `whip-whep` WHIP client (trickled candidates by `PATCH`), then
/// restarts ICE by `PATCH` (`If-Match: *`): the session stays connected, and afterwards a
/// Python SDK viewer gets the low layer when it asks for it and the high one after, without a
/// gap over 1 s.
#[tokio::test]
async fn chromium_whip_simulcast_with_trickle_and_ice_restart() {
    let _heavy = heavy_lock();
    // whip-whep 1.2.0 joins the candidates of an ICE restart's answer with commas
    // (`candidates.join()`), which Chromium refuses as soon as there are two: UDP only here
    // (no ICE-TCP candidate), as docs/bridges.md tells operators whose clients use it.
    let c = Conclave::start(
        ConclaveOptions::standalone()
            .env("CONCLAVE_RTC__AUTO_CREATE", "true")
            .env("CONCLAVE_RTC__TCP_PORT", "0"),
    )
    .await
    .unwrap();
    let room = "whip-sim";
    let token = c.token(
        room,
        "studio",
        json!({"canPublish": true, "canSubscribe": false}),
    );
    let args: Vec<String> = [
        "--mode",
        "publish",
        "--url",
        &format!("{}/whip/v1/{room}", c.url),
        "--token",
        &token,
        "--simulcast",
        "--seconds",
        "35",
        "--restart-after",
        "4",
        "--timeout",
        "70",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut page = WhipClient::spawn_in_chromium("studio", &args).unwrap();
    let published = page
        .wait_event("published", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    page.wait_event("connected", Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let restarted = page
        .wait_event("restarted", Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    assert_ne!(
        restarted["etag"], published["etag"],
        "a new ICE session's tag"
    );
    assert!(
        c.logs().contains("bridge ICE restart") && c.logs().contains("WHIP simulcast"),
        "{}",
        c.logs()
    );

    // After the restart: a viewer switches between the layers.
    let viewer = c.token(room, "viewer", json!({"canPublish": false}));
    let report =
        crate::support::lk_clients::simulcast_viewer(&c.ws_url(), &viewer, "--single-pc").await;
    assert!(report["error"].is_null(), "{report}\n{}", c.logs());
    let low = report["low"][0].as_u64().expect("low layer frames");
    let high = report["high"][0].as_u64().expect("high layer frames");
    assert!(low <= high, "low {low} <= high {high}: {report}");
    assert!(
        report["max_gap_ms"].as_u64().unwrap_or(u64::MAX) <= 1000,
        "{report}"
    );
    assert!(
        c.logs().contains("to=Some(Rid(q))"),
        "the SFU switched the viewer to the low layer"
    );
    eprintln!("WHIP simulcast from Chromium: viewer got low {low} px wide, high {high} px wide");
    let r = page.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.exit_code, 0, "{}", r.describe());
    assert_eq!(r.summary["state"], "connected", "{}", r.summary);
    let layers: Vec<&Value> = r.summary["outbound"]
        .as_array()
        .map(|o| o.iter().filter(|s| s["kind"] == "video").collect())
        .unwrap_or_default();
    assert_eq!(layers.len(), 3, "three layers sent: {}", r.summary);
}

/// Chromium plays a Python SDK participant's audio and video with the npm `whip-whep` WHEP
/// client: video painted in the page, audio packets received.
#[tokio::test]
async fn chromium_whep_player_plays_a_livekit_participant() {
    let _heavy = heavy_lock();
    let c = sfu().await;
    let room = "whep-page";
    let alice = c.token(room, "alice", json!({"canPublish": true}));
    let mut a = PyClientSpec::new(c.ws_url(), alice, "alice");
    a.timeout_s = 60.0;
    a.min_duration_s = 60.0;
    let mut alice = PyClient::spawn(a).unwrap();
    alice
        .wait_event("published", Duration::from_secs(20))
        .await
        .unwrap();
    let viewer = c.token(room, "screen", json!({"canPublish": false}));
    let args: Vec<String> = [
        "--mode",
        "play",
        "--url",
        &format!("{}/whep/v1/{room}/alice", c.url),
        "--token",
        &viewer,
        "--min-frames",
        "30",
        "--timeout",
        "45",
    ]
    .map(str::to_owned)
    .to_vec();
    let page = WhipClient::spawn_in_chromium("screen", &args).unwrap();
    let r = page.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.exit_code, 0, "{}\n{}", r.describe(), c.logs());
    assert!(
        r.summary["video_width"].as_u64().unwrap_or(0) > 0,
        "{}",
        r.summary
    );
    let audio_packets = r.summary["inbound"]
        .as_array()
        .and_then(|i| i.iter().find(|s| s["kind"] == "audio"))
        .and_then(|s| s["packets"].as_u64())
        .unwrap_or(0);
    assert!(audio_packets > 50, "audio received: {}", r.summary);
    eprintln!(
        "WHEP page <- alice: {}x{}, {} frames painted, {audio_packets} audio packets",
        r.summary["video_width"], r.summary["video_height"], r.summary["painted"]
    );
    drop(alice);
}
