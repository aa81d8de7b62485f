//! LiveKit data through Conclave's SFU with the official Python SDK: RPC, text data streams,
//! addressed data packets, and the sender identity the server stamps (never the client's).

use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::support::conclave::{Conclave, ConclaveOptions};
use crate::support::lk_clients::{PyClient, PyClientSpec};
use crate::support::synapse::heavy_lock;

/// Bytes of bob's text stream: several 15 000-byte chunks.
const TEXT_BYTES: usize = 100_000;

/// A data-only Python client in `room`; `dual_pc`: v0 (`/rtc`, two peer connections) or v1
/// (`/rtc/v1`, one).
fn spec(c: &Conclave, room: &str, dual_pc: bool, who: &str, extra: &[&str]) -> PyClientSpec {
    let grants = json!({"canPublish": true, "canSubscribe": true, "canPublishData": true});
    let mut s = PyClientSpec::viewer(c.ws_url(), c.token(room, who, grants), who);
    s.dual_pc = Some(dual_pc);
    s.expect_participants = 2;
    s.timeout_s = 40.0;
    s.extra_args = extra.iter().map(|a| (*a).to_owned()).collect();
    s
}

/// The SHA-256 (hex) of `lk_client.py`'s `test_text(n)`, computed independently.
fn test_text_sha256(n: usize) -> String {
    let mut text = String::new();
    let mut i = 0;
    while text.len() < n {
        text.push_str(&format!(
            "{i:07} the quick brown fox jumps over the lazy dog\n"
        ));
        i += 1;
    }
    text.truncate(n);
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn entries<'a>(summary: &'a Value, key: &str) -> &'a Vec<Value> {
    summary[key].as_array().expect("an array")
}

/// Three Python SDK participants: alice serves RPC `echo` and reads text streams on `chat`
/// and `forged`; bob sends alice three packets addressed to her alone, calls `echo`, sends a
/// 100 KB text stream and one that claims to come from "mallory"; carol only listens.
/// alice sees caller "bob" and gets his answer back, reads the 100 KB exactly, sees the
/// forged stream as bob's; carol gets none of the packets addressed to alice. Once with every
/// client on v0 (two peer connections), once on v1 (one: the data channels share it with
/// media).
#[tokio::test]
async fn python_sdk_rpc_text_streams_and_addressed_data() {
    let _heavy = heavy_lock();
    let c = Conclave::start(ConclaveOptions::standalone().env("CONCLAVE_RTC__AUTO_CREATE", "true"))
        .await
        .unwrap();
    for (room, dual_pc) in [("data-v0", true), ("data-v1", false)] {
        rpc_text_streams_and_addressed_data(&c, room, dual_pc).await;
    }
    let (v0, v1) = c.signal_sessions().await.unwrap();
    assert_eq!((v0, v1), (3, 3), "three clients on each signalling path");
}

async fn rpc_text_streams_and_addressed_data(c: &Conclave, room: &str, dual_pc: bool) {
    let mut alice = spec(
        c,
        room,
        dual_pc,
        "alice",
        &[
            "--rpc-echo",
            "--text-handler",
            "chat",
            "--text-handler",
            "forged",
            "--expect-rpc-calls",
            "1",
            "--expect-text-streams",
            "2",
        ],
    );
    alice.min_duration_s = 3.0;
    let text_arg = format!("chat:{TEXT_BYTES}");
    let mut bob = spec(
        c,
        room,
        dual_pc,
        "bob",
        &[
            "--send-data-to",
            "alice",
            "--rpc-call",
            "alice:hello-rpc",
            "--send-text",
            &text_arg,
            "--forge-text",
            "forged",
        ],
    );
    bob.min_duration_s = 3.0;
    let mut carol = spec(c, room, dual_pc, "carol", &[]);
    // carol stays until alice and bob are done (they end within a few seconds of meeting).
    carol.min_duration_s = 12.0;
    carol.events_stdout = true;
    let pc = PyClient::spawn(carol).unwrap();
    let pa = PyClient::spawn(alice).unwrap();
    let pb = PyClient::spawn(bob).unwrap();
    let ra = pa.wait(Duration::from_secs(50)).await.unwrap();
    let rb = pb.wait(Duration::from_secs(50)).await.unwrap();
    let rc = pc.wait(Duration::from_secs(50)).await.unwrap();
    ra.assert_exit(0);
    rb.assert_exit(0);
    rc.assert_exit(0);

    // RPC: alice saw caller "bob"; bob got the payload reversed and that identity back.
    let served = entries(&ra.summary, "rpc_served");
    assert_eq!(
        served,
        &vec![json!({"caller": "bob", "payload": "hello-rpc"})],
        "{}",
        ra.describe()
    );
    assert_eq!(
        rb.summary["rpc_result"]["response"],
        json!("cpr-olleh|bob"),
        "{}",
        rb.describe()
    );

    // Text streams: the 100 KB one read completely and unchanged; the forged one arrived as
    // bob's, not "mallory"'s.
    let streams = entries(&ra.summary, "text_streams");
    let chat = streams
        .iter()
        .find(|s| s["topic"] == "chat")
        .unwrap_or_else(|| panic!("no chat stream: {}", ra.describe()));
    assert_eq!(chat["sender_identity"], "bob");
    assert_eq!(chat["length"], TEXT_BYTES);
    assert_eq!(chat["sha256"], test_text_sha256(TEXT_BYTES));
    let sent = entries(&rb.summary, "text_sent");
    assert!(
        sent.iter().any(|s| s["sha256"] == chat["sha256"]),
        "{sent:?}"
    );
    let forged = streams
        .iter()
        .find(|s| s["topic"] == "forged")
        .unwrap_or_else(|| panic!("no forged stream: {}", ra.describe()));
    assert_eq!(
        forged["sender_identity"], "bob",
        "the server stamps the real sender"
    );
    assert!(!ra.summary["remote"]
        .as_object()
        .unwrap()
        .contains_key("mallory"));

    // Addressed packets: alice got all three from bob, carol none.
    let to_alice: Vec<&Value> = ra.summary["remote"]["bob"]["data"]
        .as_array()
        .map(|d| d.iter().filter(|d| d["topic"] == "direct").collect())
        .unwrap_or_default();
    assert_eq!(to_alice.len(), 3, "{}", ra.describe());
    assert!(to_alice.iter().all(|d| d["sender_identity"] == "bob"));
    let carol_got = rc.summary["remote"]["bob"]["data"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        carol_got.iter().all(|d| d["topic"] != "direct"),
        "carol got a packet addressed to alice: {carol_got:?}"
    );
    let carol_bob_left = rc.summary["remote"]["bob"]["disconnected_at_ms"].as_u64();
    assert!(
        carol_bob_left.is_some(),
        "carol was still there when bob left: {}",
        rc.describe()
    );
}
