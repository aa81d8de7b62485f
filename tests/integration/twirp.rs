//! The LiveKit RoomService API (Twirp): the official Python `livekit-api` package manages
//! rooms and participants of a running call through Conclave; protojson and protobuf, grants
//! and Twirp errors at the HTTP level; raw signalling sees server-side changes.

use std::time::Duration;

use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Msg;
use prost::Message as _;
use serde_json::{json, Value};

use crate::support::conclave::{Conclave, ConclaveOptions};
use crate::support::lk_clients::{clients_dir, lk_python, PyClient, PyClientSpec};
use crate::support::lk_ws::{expect_join, WsClient};
use crate::support::synapse::heavy_lock;

/// Runs `room_service.py` (Python `livekit-api`) with `ops`; one result per operation.
pub async fn room_service(c: &Conclave, ops: Value) -> Vec<Value> {
    let (key, secret) = c.livekit_credentials();
    let out = tokio::process::Command::new(lk_python().unwrap())
        .arg(clients_dir().join("room_service.py"))
        .args(["--url", &c.url, "--key", &key, "--secret", &secret])
        .arg(ops.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .await
        .expect("running room_service.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "room_service.py failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(
        results.len(),
        ops.as_array().map_or(0, Vec::len),
        "{stdout}"
    );
    results
}

/// One operation; panics with the result unless it succeeded.
async fn ok(c: &Conclave, op: Value) -> Value {
    let r = room_service(c, json!([op])).await.remove(0);
    assert_eq!(r["ok"], true, "{op} failed: {r}");
    r["result"].clone()
}

/// One operation that must fail with Twirp `code` and HTTP `status`.
async fn fails(c: &Conclave, op: Value, code: &str, status: u16) {
    let r = room_service(c, json!([op])).await.remove(0);
    assert_eq!(r["ok"], false, "{op} succeeded: {r}");
    assert_eq!(r["code"], code, "{op}: {r}");
    assert_eq!(r["status"], status, "{op}: {r}");
}

fn identities(list: &Value) -> Vec<String> {
    let mut v: Vec<String> = list["participants"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["identity"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn room_names(list: &Value) -> Vec<String> {
    list["rooms"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Without a homeserver-free auto-create, rooms exist only once created through the API.
async fn conclave() -> Conclave {
    Conclave::start(ConclaveOptions::standalone().env("CONCLAVE_RTC__AUTO_CREATE", "false"))
        .await
        .unwrap()
}

fn participant(c: &Conclave, room: &str, who: &str, publish: bool) -> PyClientSpec {
    let grants = json!({"canPublish": publish, "canSubscribe": true, "canPublishData": true});
    let mut s = PyClientSpec::new(c.ws_url(), c.token(room, who, grants), who);
    s.publish_audio = publish;
    s.publish_video = false;
    s.timeout_s = 90.0;
    s.min_duration_s = 80.0;
    s
}

/// The acceptance path: `livekit-api` creates, lists and deletes rooms, lists participants,
/// mutes, updates, sends data and removes a participant from a running call; the clients
/// (the Python SDK) see each change, the removed one with reason PARTICIPANT_REMOVED.
#[tokio::test]
async fn python_livekit_api_manages_a_running_call() {
    let _heavy = heavy_lock();
    let c = conclave().await;

    // Create (idempotent) and list.
    let room = ok(
        &c,
        json!({"op": "create_room", "name": "call", "empty_timeout": 120,
               "departure_timeout": 10, "max_participants": 5, "metadata": "m1"}),
    )
    .await;
    assert_eq!(room["name"], "call");
    assert_eq!(room["empty_timeout"], 120);
    assert_eq!(room["departure_timeout"], 10);
    assert_eq!(room["max_participants"], 5);
    assert_eq!(room["metadata"], "m1");
    let again = ok(
        &c,
        json!({"op": "create_room", "name": "call", "metadata": "other"}),
    )
    .await;
    assert_eq!(
        again["metadata"], "m1",
        "an existing room is returned unchanged"
    );
    assert_eq!(again["creation_time"], room["creation_time"]);
    assert_eq!(again["empty_timeout"], 120);
    ok(&c, json!({"op": "create_room", "name": "spare"})).await;
    let listed = ok(&c, json!({"op": "list_rooms"})).await;
    assert_eq!(room_names(&listed), vec!["call", "spare"]);
    let filtered = ok(&c, json!({"op": "list_rooms", "names": ["spare", "nope"]})).await;
    assert_eq!(room_names(&filtered), vec!["spare"]);

    // A running call: alice publishes audio, bob listens.
    let mut alice = PyClient::spawn(participant(&c, "call", "alice", true)).unwrap();
    let mut bob = PyClient::spawn(participant(&c, "call", "bob", false)).unwrap();
    alice
        .wait_event("connected", Duration::from_secs(30))
        .await
        .unwrap();
    bob.wait_event("connected", Duration::from_secs(30))
        .await
        .unwrap();
    alice
        .wait_event("published", Duration::from_secs(15))
        .await
        .unwrap();
    bob.wait_event_matching(
        "track_subscribed",
        |e| e["identity"] == "alice",
        Duration::from_secs(15),
    )
    .await
    .unwrap();

    let list = ok(&c, json!({"op": "list_participants", "room": "call"})).await;
    assert_eq!(identities(&list), vec!["alice", "bob"]);
    let a = ok(
        &c,
        json!({"op": "get_participant", "room": "call", "identity": "alice"}),
    )
    .await;
    assert_eq!(a["identity"], "alice");
    let track = a["tracks"][0]["sid"]
        .as_str()
        .expect("alice's track")
        .to_owned();
    let live = ok(&c, json!({"op": "list_rooms", "names": ["call"]})).await;
    assert_eq!(live["rooms"][0]["num_participants"], 2, "{live}");
    assert!(live["rooms"][0]["sid"]
        .as_str()
        .is_some_and(|s| s.starts_with("RM_")));

    // Server data to bob only, on the reliable channel, with a topic and no sender.
    ok(
        &c,
        json!({"op": "send_data", "room": "call", "data": "hello-from-server",
               "kind": "RELIABLE", "destination_identities": ["bob"], "topic": "srv"}),
    )
    .await;
    let got = bob
        .wait_event("data_received", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got["payload"], "hello-from-server", "{got}");
    assert_eq!(got["topic"], "srv");
    assert_eq!(got["kind"], "reliable");
    assert!(got["sender_identity"].is_null(), "{got}");

    // Server-initiated mute: alice's own SDK mutes, bob sees it.
    let muted = ok(
        &c,
        json!({"op": "mute_published_track", "room": "call", "identity": "alice",
               "track_sid": track, "muted": true}),
    )
    .await;
    assert_eq!(muted["track"]["muted"], true, "{muted}");
    bob.wait_event_matching(
        "track_muted",
        |e| e["identity"] == "alice",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    alice
        .wait_event_matching(
            "track_muted",
            |e| e["local"] == true,
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    // Metadata and name set by the server reach the others.
    let updated = ok(
        &c,
        json!({"op": "update_participant", "room": "call", "identity": "bob",
               "metadata": "set-by-admin", "attributes": {"role": "listener"}}),
    )
    .await;
    assert_eq!(updated["metadata"], "set-by-admin");
    assert_eq!(updated["attributes"]["role"], "listener");
    alice
        .wait_event_matching(
            "participant_metadata_changed",
            |e| e["identity"] == "bob" && e["metadata"] == "set-by-admin",
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    // Errors: wrong key, missing grant, grant for another room, unknown room/participant.
    fails(
        &c,
        json!({"op": "list_rooms", "key": "APIwrongkey"}),
        "unauthenticated",
        401,
    )
    .await;
    fails(
        &c,
        json!({"op": "list_rooms", "secret": "a-wrong-secret-a-wrong-secret-xx"}),
        "unauthenticated",
        401,
    )
    .await;
    fails(
        &c,
        json!({"op": "create_room", "name": "x", "grants": {"room_list": true}}),
        "permission_denied",
        403,
    )
    .await;
    fails(
        &c,
        json!({"op": "list_rooms", "grants": {"room_create": true}}),
        "permission_denied",
        403,
    )
    .await;
    fails(
        &c,
        json!({"op": "list_participants", "room": "call",
               "grants": {"room_admin": true, "room": "spare"}}),
        "permission_denied",
        403,
    )
    .await;
    fails(
        &c,
        json!({"op": "list_participants", "room": "nope"}),
        "not_found",
        404,
    )
    .await;
    fails(
        &c,
        json!({"op": "delete_room", "room": "nope"}),
        "not_found",
        404,
    )
    .await;
    fails(
        &c,
        json!({"op": "get_participant", "room": "call", "identity": "carol"}),
        "not_found",
        404,
    )
    .await;
    fails(
        &c,
        json!({"op": "mute_published_track", "room": "call", "identity": "alice",
               "track_sid": "TR_none", "muted": true}),
        "not_found",
        404,
    )
    .await;

    // Remove bob: his client is told why; alice sees him go.
    ok(
        &c,
        json!({"op": "remove_participant", "room": "call", "identity": "bob"}),
    )
    .await;
    let d = bob
        .wait_event("disconnected", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(d["reason"], "PARTICIPANT_REMOVED", "{d}");
    alice
        .wait_event_matching(
            "participant_disconnected",
            |e| e["identity"] == "bob",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let list = ok(&c, json!({"op": "list_participants", "room": "call"})).await;
    assert_eq!(identities(&list), vec!["alice"]);
    fails(
        &c,
        json!({"op": "remove_participant", "room": "call", "identity": "bob"}),
        "not_found",
        404,
    )
    .await;

    // Delete the room with alice in it.
    ok(&c, json!({"op": "delete_room", "room": "call"})).await;
    let d = alice
        .wait_event("disconnected", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(d["reason"], "ROOM_DELETED", "{d}");
    let listed = ok(&c, json!({"op": "list_rooms"})).await;
    assert_eq!(room_names(&listed), vec!["spare"]);
    let rb = bob.wait(Duration::from_secs(20)).await.unwrap();
    rb.assert_exit(4);
    let ra = alice.wait(Duration::from_secs(20)).await.unwrap();
    ra.assert_exit(4);
}

// ---------------------------------------------------------------- raw HTTP + signalling

fn admin_token(c: &Conclave, room: &str, grant: Value) -> String {
    // `Conclave::token` adds roomJoin; server API calls ignore it.
    c.token(room, "admin", grant)
}

async fn post(
    c: &Conclave,
    method: &str,
    content_type: &str,
    body: Vec<u8>,
    token: Option<&str>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{}/twirp/livekit.RoomService/{method}", c.url))
        .header("Content-Type", content_type)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn json_call(c: &Conclave, method: &str, body: Value, token: &str) -> (u16, Value) {
    let r = post(
        c,
        method,
        "application/json",
        body.to_string().into_bytes(),
        Some(token),
    )
    .await;
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(ct.starts_with("application/json"), "content type {ct}");
    (status, r.json().await.unwrap())
}

async fn join(c: &Conclave, room: &str, who: &str) -> (WsClient, lk::JoinResponse) {
    let token = c.token(room, who, json!({"canPublish": true}));
    let mut ws = WsClient::connect(&c.ws_url(), &token, "auto_subscribe=1")
        .await
        .map_err(|r| format!("{} {}", r.status, r.body))
        .unwrap();
    let j = expect_join(&mut ws).await.unwrap();
    (ws, j)
}

/// protojson (both field name styles) and protobuf, Twirp errors on the wire, room and
/// participant updates seen by raw signalling clients, `max_participants` enforced.
#[tokio::test]
async fn twirp_wire_format_errors_and_signalled_updates() {
    let c = conclave().await;
    let create = admin_token(&c, "", json!({"roomCreate": true}));
    let list = admin_token(&c, "", json!({"roomList": true}));
    let admin = admin_token(&c, "j", json!({"roomAdmin": true}));

    // JSON with proto names in, lowerCamel out; int64 as strings.
    let (status, room) = json_call(
        &c,
        "CreateRoom",
        json!({"name": "j", "empty_timeout": 30, "metadata": "x"}),
        &create,
    )
    .await;
    assert_eq!(status, 200, "{room}");
    assert_eq!(room["name"], "j");
    assert_eq!(room["emptyTimeout"], 30);
    assert_eq!(room["departureTimeout"], 20, "default departure timeout");
    assert!(room["creationTime"].is_string(), "{room}");
    // lowerCamel in works too.
    let (status, _) = json_call(
        &c,
        "CreateRoom",
        json!({"name": "one", "maxParticipants": 1}),
        &create,
    )
    .await;
    assert_eq!(status, 200);

    // Protobuf in and out.
    let r = post(
        &c,
        "ListRooms",
        "application/protobuf",
        lk::ListRoomsRequest::default().encode_to_vec(),
        Some(&list),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers().get("content-type").unwrap(),
        "application/protobuf"
    );
    let rooms = lk::ListRoomsResponse::decode(r.bytes().await.unwrap()).unwrap();
    let mut names: Vec<&str> = rooms.rooms.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["j", "one"]);

    // Errors.
    let (s, e) = json_call(&c, "ListRooms", json!({}), "not-a-jwt").await;
    assert_eq!((s, e["code"].as_str()), (401, Some("unauthenticated")));
    let r = post(&c, "ListRooms", "application/json", b"{}".to_vec(), None).await;
    assert_eq!(r.status(), 401);
    let (s, e) = json_call(&c, "ListRooms", json!({}), &create).await;
    assert_eq!((s, e["code"].as_str()), (403, Some("permission_denied")));
    let (s, e) = json_call(
        &c,
        "GetParticipant",
        json!({"room": "j", "identity": "x"}),
        &admin,
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (404, Some("not_found")), "{e}");
    let (s, e) = json_call(&c, "NoSuchMethod", json!({}), &admin).await;
    assert_eq!((s, e["code"].as_str()), (404, Some("bad_route")));
    let r = post(&c, "ListRooms", "text/plain", b"{}".to_vec(), Some(&list)).await;
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["code"], "bad_route");
    let r = post(
        &c,
        "ListRooms",
        "application/json",
        b"{nope".to_vec(),
        Some(&list),
    )
    .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["code"], "malformed");
    let r = reqwest::get(format!("{}/twirp/livekit.RoomService/ListRooms", c.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["code"], "bad_route");
    let (s, e) = json_call(&c, "CreateRoom", json!({"name": ""}), &create).await;
    assert_eq!((s, e["code"].as_str()), (400, Some("invalid_argument")));

    // Two raw signalling clients in "j".
    let (mut alice, _) = join(&c, "j", "alice").await;
    let (mut bob, _) = join(&c, "j", "bob").await;
    alice
        .recv_until(
            Duration::from_secs(5),
            |m| matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.identity == "bob")),
        )
        .await
        .unwrap();

    // Room metadata: stored, and both clients get room_update.
    let (s, room) = json_call(
        &c,
        "UpdateRoomMetadata",
        json!({"room": "j", "metadata": "new-meta"}),
        &admin,
    )
    .await;
    assert_eq!(s, 200, "{room}");
    assert_eq!(room["metadata"], "new-meta");
    assert_eq!(room["numParticipants"], 2);
    for ws in [&mut alice, &mut bob] {
        ws.recv_until(Duration::from_secs(5), |m| {
            matches!(m, Msg::RoomUpdate(u) if u.room.as_ref().is_some_and(|r| r.metadata == "new-meta" && r.sid.starts_with("RM_")))
        })
        .await
        .unwrap();
    }

    // Participant update reaches the other client.
    let (s, p) = json_call(
        &c,
        "UpdateParticipant",
        json!({"room": "j", "identity": "bob", "name": "Bob B.", "metadata": "m"}),
        &admin,
    )
    .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["name"], "Bob B.");
    alice
        .recv_until(Duration::from_secs(5), |m| {
            matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.identity == "bob" && p.name == "Bob B." && p.metadata == "m"))
        })
        .await
        .unwrap();

    // Over the limits (512 KiB of metadata, 64 000 bytes of attributes, 256 of name):
    // invalid_argument, nothing changes.
    let big = "x".repeat(100_000);
    let huge = "x".repeat(600_000);
    for (method, body) in [
        (
            "UpdateParticipant",
            json!({"room": "j", "identity": "bob", "metadata": huge}),
        ),
        (
            "UpdateParticipant",
            json!({"room": "j", "identity": "bob", "name": "n".repeat(300)}),
        ),
        (
            "UpdateParticipant",
            json!({"room": "j", "identity": "bob", "attributes": {"k": big}}),
        ),
        ("UpdateRoomMetadata", json!({"room": "j", "metadata": huge})),
    ] {
        let (s, e) = json_call(&c, method, body, &admin).await;
        assert_eq!(
            (s, e["code"].as_str()),
            (400, Some("invalid_argument")),
            "{method}: {e}"
        );
    }
    let (s, p) = json_call(
        &c,
        "GetParticipant",
        json!({"room": "j", "identity": "bob"}),
        &admin,
    )
    .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(
        (p["name"].as_str(), p["metadata"].as_str()),
        (Some("Bob B."), Some("m"))
    );

    // Server mute of a track announced by add_track: the publisher is told, bob sees it.
    alice
        .send(Req::AddTrack(lk::AddTrackRequest {
            cid: "mic".into(),
            name: "mic".into(),
            r#type: lk::TrackType::Audio as i32,
            source: lk::TrackSource::Microphone as i32,
            ..Default::default()
        }))
        .await
        .unwrap();
    let seen = alice
        .recv_until(Duration::from_secs(5), |m| {
            matches!(m, Msg::TrackPublished(_))
        })
        .await
        .unwrap();
    let Some(Msg::TrackPublished(published)) = seen.last() else {
        unreachable!()
    };
    let track_sid = published.track.as_ref().unwrap().sid.clone();
    let (s, e) = json_call(
        &c,
        "MutePublishedTrack",
        json!({"room": "j", "identity": "alice", "trackSid": track_sid, "muted": false}),
        &admin,
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str()),
        (412, Some("failed_precondition")),
        "{e}"
    );
    let (s, r) = json_call(
        &c,
        "MutePublishedTrack",
        json!({"room": "j", "identity": "alice", "track_sid": track_sid, "muted": true}),
        &admin,
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["track"]["muted"], true);
    alice
        .recv_until(
            Duration::from_secs(5),
            |m| matches!(m, Msg::Mute(x) if x.muted && x.sid == track_sid),
        )
        .await
        .unwrap();
    bob.recv_until(Duration::from_secs(5), |m| {
        matches!(m, Msg::Update(u) if u.participants.iter().any(|p| p.identity == "alice" && p.tracks.iter().any(|t| t.muted)))
    })
    .await
    .unwrap();

    // List, remove (the client is told PARTICIPANT_REMOVED and closed), list again.
    let (s, l) = json_call(&c, "ListParticipants", json!({"room": "j"}), &admin).await;
    assert_eq!(s, 200);
    assert_eq!(l["participants"].as_array().map(Vec::len), Some(2));
    let (s, _) = json_call(
        &c,
        "RemoveParticipant",
        json!({"room": "j", "identity": "bob"}),
        &admin,
    )
    .await;
    assert_eq!(s, 200);
    bob.recv_until(Duration::from_secs(5), |m| {
        matches!(m, Msg::Leave(l) if l.reason == lk::DisconnectReason::ParticipantRemoved as i32)
    })
    .await
    .unwrap();
    assert!(bob.closed_within(Duration::from_secs(5)).await);

    // max_participants = 1: the second participant is refused.
    let (_one, _) = join(&c, "one", "first").await;
    let token = c.token("one", "second", json!({}));
    let refused = WsClient::connect(&c.ws_url(), &token, "").await;
    assert!(refused.is_err(), "second participant joined a full room");

    // Delete with a participant in it: ROOM_DELETED, and the room is gone.
    let (s, _) = json_call(&c, "DeleteRoom", json!({"room": "j"}), &create).await;
    assert_eq!(s, 200);
    alice
        .recv_until(
            Duration::from_secs(5),
            |m| matches!(m, Msg::Leave(l) if l.reason == lk::DisconnectReason::RoomDeleted as i32),
        )
        .await
        .unwrap();
    let (s, e) = json_call(&c, "ListParticipants", json!({"room": "j"}), &admin).await;
    assert_eq!((s, e["code"].as_str()), (404, Some("not_found")));
}

/// The room's SID from creation (issue 17): `livekit-api`'s `create_room` answers a room with
/// an `RM_` SID before anybody joined, `list_rooms` shows the same one, and so do a Python SDK
/// participant (`Room.sid`) and a raw signalling client (its join response); deleted and
/// created again, the room gets a new SID.
#[tokio::test]
async fn python_livekit_api_room_sid_from_creation() {
    let _heavy = heavy_lock();
    let c = conclave().await;

    let created = ok(&c, json!({"op": "create_room", "name": "sid-room"})).await;
    let sid = created["sid"].as_str().unwrap_or_default().to_owned();
    assert!(sid.starts_with("RM_") && sid.len() > 3, "{created}");
    let again = ok(&c, json!({"op": "create_room", "name": "sid-room"})).await;
    assert_eq!(
        again["sid"],
        sid.as_str(),
        "an idempotent create keeps the SID"
    );
    let listed = ok(&c, json!({"op": "list_rooms", "names": ["sid-room"]})).await;
    assert_eq!(listed["rooms"][0]["sid"], sid.as_str(), "{listed}");

    // A participant with the Python SDK: `await room.sid` is the same SID.
    let mut spec = participant(&c, "sid-room", "alice", false);
    spec.timeout_s = 30.0;
    spec.min_duration_s = 0.0;
    spec.leave_after_s = Some(60.0);
    let alice = PyClient::spawn(spec);
    let mut alice = alice.unwrap();
    let connected = alice
        .wait_event("connected", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(connected["room_sid"], sid.as_str(), "{connected}");
    // A raw signalling client's join response: the same.
    let (_ws, j) = join(&c, "sid-room", "bob").await;
    assert_eq!(j.room.map(|r| r.sid).unwrap_or_default(), sid);
    let listed = ok(&c, json!({"op": "list_rooms", "names": ["sid-room"]})).await;
    assert_eq!(listed["rooms"][0]["sid"], sid.as_str(), "{listed}");
    assert_eq!(listed["rooms"][0]["num_participants"], 2, "{listed}");
    alice.terminate().unwrap();
    alice.wait(Duration::from_secs(15)).await.unwrap();

    // A room created again after it ended is a new room: a new SID.
    ok(&c, json!({"op": "delete_room", "room": "sid-room"})).await;
    let recreated = ok(&c, json!({"op": "create_room", "name": "sid-room"})).await;
    let new_sid = recreated["sid"].as_str().unwrap_or_default();
    assert!(new_sid.starts_with("RM_"), "{recreated}");
    assert_ne!(new_sid, sid);
}

/// `rtc.twirp_enabled = false`: every RoomService route is Twirp `bad_route`.
#[tokio::test]
async fn twirp_can_be_disabled() {
    let c =
        Conclave::start(ConclaveOptions::standalone().env("CONCLAVE_RTC__TWIRP_ENABLED", "false"))
            .await
            .unwrap();
    let list = admin_token(&c, "", json!({"roomList": true}));
    let (s, e) = json_call(&c, "ListRooms", json!({}), &list).await;
    assert_eq!((s, e["code"].as_str()), (404, Some("bad_route")), "{e}");
}
