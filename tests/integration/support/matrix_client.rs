//! A small Matrix client-server API client for tests: plain JSON over reqwest.
//!
//! Every method that expects success returns an error containing the method,
//! path, status and response body on a non-2xx answer. Use
//! [`TestUser::request`] to look at failing responses (e.g. an expected 403).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Value};

/// MatrixRTC call membership (legacy MSC3401 name used by Element Call).
pub const CALL_MEMBER: &str = "org.matrix.msc3401.call.member";
/// MatrixRTC membership (MSC4143).
pub const RTC_MEMBER: &str = "org.matrix.msc4143.rtc.member";

static TXN: AtomicU64 = AtomicU64::new(0);

/// A logged-in user on one homeserver.
#[derive(Clone, Debug)]
pub struct TestUser {
    pub user_id: String,
    pub access_token: String,
    pub device_id: String,
    /// Client-server API base, e.g. `http://127.0.0.1:8008`.
    pub client_url: String,
    http: reqwest::Client,
}

impl TestUser {
    pub fn new(client_url: &str, user_id: &str, access_token: &str, device_id: &str) -> TestUser {
        TestUser {
            user_id: user_id.to_owned(),
            access_token: access_token.to_owned(),
            device_id: device_id.to_owned(),
            client_url: client_url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("building reqwest client"),
        }
    }

    /// `_@user:server_DEVICE_m.call`: the state key Element Call uses for this
    /// user's device in `org.matrix.msc3401.call.member`.
    pub fn call_member_state_key(&self) -> String {
        format!("_{}_{}_m.call", self.user_id, self.device_id)
    }

    // ------------------------------------------------------------ plumbing

    /// `client_url` + the given path segments (each percent-encoded as one
    /// segment) + query pairs.
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Url> {
        let mut url = Url::parse(&self.client_url)
            .with_context(|| format!("bad client_url {}", self.client_url))?;
        url.path_segments_mut()
            .map_err(|_| anyhow!("client_url cannot be a base: {}", self.client_url))?
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// Sends an authenticated request; returns status and JSON body (`Null`
    /// for an empty or non-JSON body) whatever the status.
    pub async fn request(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut req = self
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(&self.access_token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {}", url.path()))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(if text.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        });
        Ok((status, json))
    }

    /// Like [`TestUser::request`] but errors on non-2xx.
    pub async fn call(&self, method: Method, url: Url, body: Option<&Value>) -> Result<Value> {
        let path = url.path().to_owned();
        let (status, json) = self.request(method.clone(), url, body).await?;
        if !status.is_success() {
            bail!("{} {method} {path}: {status} {json}", self.user_id);
        }
        Ok(json)
    }

    async fn get(&self, segments: &[&str]) -> Result<Value> {
        self.call(Method::GET, self.url(segments, &[])?, None).await
    }

    async fn post(&self, segments: &[&str], body: Value) -> Result<Value> {
        self.call(Method::POST, self.url(segments, &[])?, Some(&body))
            .await
    }

    async fn put(&self, segments: &[&str], body: Value) -> Result<Value> {
        self.call(Method::PUT, self.url(segments, &[])?, Some(&body))
            .await
    }

    fn txn_id() -> String {
        format!(
            "t{}-{}",
            std::process::id(),
            TXN.fetch_add(1, Ordering::Relaxed)
        )
    }

    // ------------------------------------------------------------ account

    /// `GET /account/whoami` → `{"user_id", "device_id", ...}`.
    pub async fn whoami(&self) -> Result<Value> {
        self.get(&["_matrix", "client", "v3", "account", "whoami"])
            .await
    }

    /// `POST /user/{userId}/openid/request_token` → the whole object
    /// (`access_token`, `token_type`, `matrix_server_name`, `expires_in`).
    pub async fn openid_token(&self) -> Result<Value> {
        self.post(
            &[
                "_matrix",
                "client",
                "v3",
                "user",
                &self.user_id,
                "openid",
                "request_token",
            ],
            json!({}),
        )
        .await
    }

    /// MSC4143 `GET /_matrix/client/unstable/org.matrix.msc4143/rtc/transports`.
    pub async fn rtc_transports(&self) -> Result<Value> {
        self.get(&[
            "_matrix",
            "client",
            "unstable",
            "org.matrix.msc4143",
            "rtc",
            "transports",
        ])
        .await
    }

    // ------------------------------------------------------------ rooms

    /// `POST /createRoom` with `body`; returns the room id.
    pub async fn create_room(&self, body: Value) -> Result<String> {
        let j = self
            .post(&["_matrix", "client", "v3", "createRoom"], body)
            .await?;
        str_field(&j, "room_id")
    }

    /// A private room inviting `invite`, where ordinary members (power 0) may
    /// send `org.matrix.msc3401.call.member` and `org.matrix.msc4143.rtc.member`.
    pub async fn create_call_room(&self, invite: &[&str]) -> Result<String> {
        self.create_call_room_with(invite, false).await
    }

    /// [`Self::create_call_room`], end-to-end encrypted (`m.room.encryption`) if `encrypted`:
    /// Element Call turns per-participant E2EE on exactly in encrypted rooms.
    pub async fn create_call_room_with(&self, invite: &[&str], encrypted: bool) -> Result<String> {
        let mut body = json!({
            "preset": "private_chat",
            "name": "conclave test call",
            "invite": invite,
            "power_level_content_override": {
                "events": {CALL_MEMBER: 0, RTC_MEMBER: 0}
            },
        });
        if encrypted {
            body["initial_state"] = json!([{
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }]);
        }
        self.create_room(body).await
    }

    pub async fn invite(&self, room_id: &str, user_id: &str) -> Result<()> {
        self.membership_op(room_id, "invite", user_id, None).await
    }

    /// `POST /join/{roomIdOrAlias}?via=..`; returns the joined room id.
    pub async fn join(&self, room: &str, via: &[&str]) -> Result<String> {
        let query: Vec<(&str, &str)> = via
            .iter()
            .flat_map(|s| [("via", *s), ("server_name", *s)])
            .collect();
        let url = self.url(&["_matrix", "client", "v3", "join", room], &query)?;
        let j = self.call(Method::POST, url, Some(&json!({}))).await?;
        str_field(&j, "room_id")
    }

    pub async fn leave(&self, room_id: &str) -> Result<()> {
        self.post(
            &["_matrix", "client", "v3", "rooms", room_id, "leave"],
            json!({}),
        )
        .await?;
        Ok(())
    }

    pub async fn kick(&self, room_id: &str, user_id: &str, reason: Option<&str>) -> Result<()> {
        self.membership_op(room_id, "kick", user_id, reason).await
    }

    pub async fn ban(&self, room_id: &str, user_id: &str, reason: Option<&str>) -> Result<()> {
        self.membership_op(room_id, "ban", user_id, reason).await
    }

    pub async fn unban(&self, room_id: &str, user_id: &str) -> Result<()> {
        self.membership_op(room_id, "unban", user_id, None).await
    }

    async fn membership_op(
        &self,
        room_id: &str,
        op: &str,
        user_id: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        let mut body = json!({"user_id": user_id});
        if let Some(r) = reason {
            body["reason"] = json!(r);
        }
        self.post(&["_matrix", "client", "v3", "rooms", room_id, op], body)
            .await?;
        Ok(())
    }

    /// `PUT /rooms/{roomId}/state/{type}/{stateKey}`; returns the event id.
    pub async fn send_state(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
    ) -> Result<String> {
        let j = self
            .put(
                &[
                    "_matrix", "client", "v3", "rooms", room_id, "state", event_type, state_key,
                ],
                content,
            )
            .await?;
        str_field(&j, "event_id")
    }

    /// MSC4140: schedules a state event `delay_ms` from now; returns the
    /// `delay_id`.
    pub async fn send_delayed_state(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
        delay_ms: u64,
    ) -> Result<String> {
        let delay = delay_ms.to_string();
        let url = self.url(
            &[
                "_matrix", "client", "v3", "rooms", room_id, "state", event_type, state_key,
            ],
            &[("org.matrix.msc4140.delay", &delay)],
        )?;
        let j = self.call(Method::PUT, url, Some(&content)).await?;
        str_field(&j, "delay_id")
    }

    /// MSC4140: `action` is `restart`, `cancel` or `send`.
    pub async fn update_delayed_event(&self, delay_id: &str, action: &str) -> Result<()> {
        self.post(
            &[
                "_matrix",
                "client",
                "unstable",
                "org.matrix.msc4140",
                "delayed_events",
                delay_id,
            ],
            json!({"action": action}),
        )
        .await?;
        Ok(())
    }

    /// `PUT /rooms/{roomId}/send/{type}/{txnId}`; returns the event id.
    pub async fn send_event(
        &self,
        room_id: &str,
        event_type: &str,
        content: Value,
    ) -> Result<String> {
        let txn = Self::txn_id();
        let j = self
            .put(
                &[
                    "_matrix", "client", "v3", "rooms", room_id, "send", event_type, &txn,
                ],
                content,
            )
            .await?;
        str_field(&j, "event_id")
    }

    /// Sends an `m.text` message; returns the event id.
    pub async fn send_message(&self, room_id: &str, body: &str) -> Result<String> {
        self.send_event(
            room_id,
            "m.room.message",
            json!({"msgtype": "m.text", "body": body}),
        )
        .await
    }

    /// Content of one state event (error if absent or not visible).
    pub async fn get_state(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Value> {
        self.get(&[
            "_matrix", "client", "v3", "rooms", room_id, "state", event_type, state_key,
        ])
        .await
    }

    /// Content of one state event, `None` on 404 (absent).
    pub async fn try_get_state(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Value>> {
        let url = self.url(
            &[
                "_matrix", "client", "v3", "rooms", room_id, "state", event_type, state_key,
            ],
            &[],
        )?;
        let (status, j) = self.request(Method::GET, url, None).await?;
        match status {
            s if s.is_success() => Ok(Some(j)),
            StatusCode::NOT_FOUND => Ok(None),
            s => bail!(
                "{} GET state {event_type}/{state_key} in {room_id}: {s} {j}",
                self.user_id
            ),
        }
    }

    /// All current state events of the room (full events).
    pub async fn room_state(&self, room_id: &str) -> Result<Vec<Value>> {
        let j = self
            .get(&["_matrix", "client", "v3", "rooms", room_id, "state"])
            .await?;
        match j {
            Value::Array(events) => Ok(events),
            other => bail!("room state is not an array: {other}"),
        }
    }

    /// `membership` of `user_id` in the room as this user sees it, `None` if
    /// there is no member event.
    pub async fn membership(&self, room_id: &str, user_id: &str) -> Result<Option<String>> {
        Ok(self
            .try_get_state(room_id, "m.room.member", user_id)
            .await?
            .and_then(|c| c["membership"].as_str().map(str::to_owned)))
    }

    /// Polls until `user_id`'s membership (as seen by this user) is `membership`.
    pub async fn wait_for_membership(
        &self,
        room_id: &str,
        user_id: &str,
        membership: &str,
        timeout: Duration,
    ) -> Result<()> {
        wait_until(
            &format!(
                "{user_id} membership={membership} in {room_id} seen by {}",
                self.user_id
            ),
            timeout,
            move || async move {
                Ok(self.membership(room_id, user_id).await?.as_deref() == Some(membership))
            },
        )
        .await
    }

    /// Polls a state event until `pred(content)` holds; returns that content.
    pub async fn wait_for_state(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_get_state(room_id, event_type, state_key).await {
                Ok(Some(c)) if pred(&c) => return Ok(c),
                Ok(other) => format!("last seen: {other:?}"),
                Err(e) => format!("last error: {e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {event_type}/{state_key} in \
                     {room_id} as seen by {} ({})",
                    self.user_id,
                    last
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // ------------------------------------------------------------ sync

    /// One `GET /sync` (`since` = previous `next_batch`, long-poll `timeout_ms`).
    pub async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> Result<Value> {
        let t = timeout_ms.to_string();
        let mut query = vec![("timeout", t.as_str())];
        if let Some(s) = since {
            query.push(("since", s));
        }
        let url = self.url(&["_matrix", "client", "v3", "sync"], &query)?;
        self.call(Method::GET, url, None).await
    }

    /// Syncs (initial sync first, then incremental long-polls) until
    /// `pred(response)` holds for one response; returns that response. The
    /// predicate sees the initial sync, then only deltas.
    pub async fn sync_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut since: Option<String> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "sync_until: condition not met for {} within {timeout:?}",
                    self.user_id
                );
            }
            let poll_ms = if since.is_none() {
                0
            } else {
                left.as_millis().min(5_000) as u64
            };
            let resp = self.sync(since.as_deref(), poll_ms).await?;
            if pred(&resp) {
                return Ok(resp);
            }
            since = resp["next_batch"].as_str().map(str::to_owned);
        }
    }

    /// Waits until `room_id` shows up under `rooms.invite` in this user's sync.
    pub async fn wait_for_invite(&self, room_id: &str, timeout: Duration) -> Result<()> {
        self.sync_until(timeout, |r| r["rooms"]["invite"].get(room_id).is_some())
            .await
            .map(|_| ())
    }
}

fn str_field(j: &Value, key: &str) -> Result<String> {
    j[key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no {key} in response {j}"))
}

/// Polls `check` every 200 ms until it returns `Ok(true)`; errors (with
/// `what` and the last error, if any) after `timeout`. Errors from `check`
/// are retried, not returned early.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
