//! LiveKit-compatible webhooks: a receiver built on the official `livekit-api`
//! `WebhookReceiver` verifies every event's signature and body hash, and sees one call's
//! events in order, also across a failed first delivery.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::conclave::{eventually, Conclave, ConclaveOptions};
use crate::support::lk_clients::{clients_dir, lk_python, PyClient, PyClientSpec};
use crate::support::lk_ws::{expect_join, WsClient};
use crate::support::synapse::heavy_lock;

/// `webhook_receiver.py` as a child process; its output lines collected.
struct Receiver {
    _child: tokio::process::Child,
    port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start(key: &str, secret: &str, fail_first: u32) -> Result<Self> {
        let mut child = tokio::process::Command::new(lk_python()?)
            .arg(clients_dir().join("webhook_receiver.py"))
            .args(["--key", key, "--secret", secret])
            .args(["--fail-first", &fail_first.to_string()])
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning webhook_receiver.py")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("receiver did not start in 20 s")??
            .context("receiver ended")?;
        let first: Value = serde_json::from_str(&first)?;
        let Some(port) = first["port"].as_u64() else {
            bail!("unexpected first line {first}");
        };
        let collected = Arc::new(Mutex::new(Vec::new()));
        let sink = collected.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Ok(Self {
            _child: child,
            port: u16::try_from(port)?,
            lines: collected,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn all(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Verified events, in arrival order.
    fn events(&self) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|l| l["type"] == "event")
            .collect()
    }

    fn rejected(&self) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|l| l["type"] == "rejected")
            .collect()
    }

    /// Waits until an event named `name` (for `identity`, if given) arrived.
    async fn wait_for(&self, name: &str, identity: Option<&str>, timeout: Duration) -> Value {
        eventually(timeout, &format!("webhook {name}"), || async {
            Ok(self
                .events()
                .into_iter()
                .find(|e| e["event"] == name && identity.is_none_or(|i| e["identity"] == i)))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; received: {:#?}", self.all()))
    }
}

/// The secrets exist only after the first start: start, read them, restart with webhooks.
async fn conclave_with_webhooks(fail_first: u32) -> (Conclave, Receiver) {
    let mut c =
        Conclave::start(ConclaveOptions::standalone().env("CONCLAVE_RTC__AUTO_CREATE", "true"))
            .await
            .unwrap();
    let (key, secret) = c.livekit_credentials();
    let receiver = Receiver::start(&key, &secret, fail_first).await.unwrap();
    c.stop().await.unwrap();
    // Two URLs, comma-separated: a dead one must not hold up the live one.
    let urls = format!("http://127.0.0.1:9/dead,{}", receiver.url());
    c.spawn_with_env(&[("CONCLAVE_WEBHOOK__URLS", &urls)])
        .await
        .unwrap();
    (c, receiver)
}

fn summary(events: &[Value], room: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["room"] == room)
        .map(|e| {
            let who = e["identity"].as_str().unwrap_or("");
            if who.is_empty() {
                e["event"].as_str().unwrap_or("").to_owned()
            } else {
                format!("{}:{who}", e["event"].as_str().unwrap_or(""))
            }
        })
        .collect()
}

/// One call with the Python SDK: every event verifies with `WebhookReceiver`, and the
/// receiver sees room_started, the join, the publish, the unpublish, the leave and
/// room_finished in that order, though its first delivery failed (retried).
#[tokio::test]
async fn webhooks_of_one_call_are_signed_and_in_order() {
    let _heavy = heavy_lock();
    let (c, receiver) = conclave_with_webhooks(1).await;
    let grants = json!({"canPublish": true, "canSubscribe": true});
    let mut spec = PyClientSpec::new(c.ws_url(), c.token("hooks", "alice", grants), "alice");
    spec.publish_audio = true;
    spec.publish_video = false;
    spec.leave_after_s = Some(3.0);
    spec.timeout_s = 30.0;
    let mut alice = PyClient::spawn(spec).unwrap();
    alice
        .wait_event("published", Duration::from_secs(30))
        .await
        .unwrap();
    let report = alice.wait(Duration::from_secs(40)).await.unwrap();
    report.assert_exit(0);
    receiver
        .wait_for("room_finished", None, Duration::from_secs(20))
        .await;

    let events = receiver.events();
    assert!(receiver.rejected().is_empty(), "{:#?}", receiver.rejected());
    assert!(
        receiver
            .all()
            .iter()
            .any(|l| l["type"] == "failed_on_purpose"),
        "the first delivery was refused and retried"
    );
    assert_eq!(
        summary(&events, "hooks"),
        vec![
            "room_started",
            "participant_joined:alice",
            "track_published:alice",
            "track_unpublished:alice",
            "participant_left:alice",
            "room_finished",
        ],
        "{events:#?}"
    );
    let sid = events[0]["room_sid"].as_str().unwrap_or("");
    assert!(sid.starts_with("RM_"), "{events:#?}");
    let mut ids = Vec::new();
    for e in &events {
        assert_eq!(e["content_type"], "application/webhook+json");
        assert_eq!(e["authorization_has_bearer"], false);
        assert_eq!(e["room_sid"], sid, "one room SID throughout");
        assert!(e["id"].as_str().is_some_and(|i| i.starts_with("EV_")));
        assert!(e["created_at"].as_i64().is_some_and(|t| t > 1_600_000_000));
        ids.push(e["id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "unique event IDs");
    let published = events
        .iter()
        .find(|e| e["event"] == "track_published")
        .unwrap();
    assert!(published["track_sid"]
        .as_str()
        .is_some_and(|s| s.starts_with("TR_")));
    let left = events
        .iter()
        .find(|e| e["event"] == "participant_left")
        .unwrap();
    assert_eq!(left["disconnect_reason"], "CLIENT_INITIATED", "{left}");
}

/// A participant whose peer connections never connect: `participant_connection_aborted`.
#[tokio::test]
async fn a_participant_that_never_connects_is_reported_aborted() {
    let (c, receiver) = conclave_with_webhooks(0).await;
    let token = c.token("aborted", "ghost", json!({}));
    let mut ws = WsClient::connect(&c.ws_url(), &token, "")
        .await
        .map_err(|r| format!("{} {}", r.status, r.body))
        .unwrap();
    expect_join(&mut ws).await.unwrap();
    receiver
        .wait_for("participant_joined", Some("ghost"), Duration::from_secs(10))
        .await;
    drop(ws);
    receiver
        .wait_for(
            "participant_connection_aborted",
            Some("ghost"),
            Duration::from_secs(15),
        )
        .await;
    receiver
        .wait_for("room_finished", None, Duration::from_secs(10))
        .await;
    assert_eq!(
        summary(&receiver.events(), "aborted"),
        vec![
            "room_started",
            "participant_joined:ghost",
            "participant_connection_aborted:ghost",
            "room_finished",
        ]
    );
    assert!(receiver.rejected().is_empty(), "{:#?}", receiver.rejected());
}
