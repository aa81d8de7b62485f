//! MatrixRTC call membership: `org.matrix.msc3401.call.member` state events (per-device state
//! keys like `_@user:server_DEVICE_m.call`; empty content = left; `expires` relative to
//! `created_ts`) and MSC4354 sticky `org.matrix.msc4143.rtc.member` events (Element Call's
//! `matrix_2_0` mode; stable `m.rtc.member` too), turned into store effects; and every event of
//! an appservice transaction turned into effects ([`transaction_effects`]).
//!
//! Malformed contents are reported as errors for the caller to log; they never stop the
//! transaction.

use serde_json::Value;

use ruma::events::{AnyStateEvent, AnyTimelineEvent};
use ruma::serde::Raw;

use crate::metrics::{inc, Metrics};
use crate::store::{CallMemberJoin, Effect, MembershipRecord};

/// Legacy/compat call membership state event type.
pub const CALL_MEMBER: &str = "org.matrix.msc3401.call.member";
/// MSC4143 sticky membership event type, as matrix-js-sdk sends it.
pub const RTC_MEMBER: &str = "org.matrix.msc4143.rtc.member";
/// Its stable name.
pub const RTC_MEMBER_STABLE: &str = "m.rtc.member";
/// Longest stickiness (MSC4354; matrix-js-sdk `MAX_STICKY_DURATION_MS`), also assumed when an
/// event does not say.
const MAX_STICKY_MS: i64 = 3_600_000;
/// Default lifetime of a `call.member` without `expires` (matrix-js-sdk: 4 h).
pub const DEFAULT_EXPIRES_MS: i64 = 4 * 3600 * 1000;
/// Longest state key accepted.
const MAX_STATE_KEY: usize = 512;
/// Slot of the room-wide call.
const ROOM_SLOT: &str = "m.call#ROOM";

/// Why an event was ignored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CallEventError {
    /// A required field is missing or has the wrong type.
    #[error("field `{0}` missing or of the wrong type")]
    Field(&'static str),
    /// The state key is unreasonably long.
    #[error("state key longer than {MAX_STATE_KEY} bytes")]
    StateKeyTooLong,
    /// An application Conclave does not host.
    #[error("unknown application {0:?}")]
    UnknownApplication(String),
    /// The membership names someone other than the sender.
    #[error("membership for {claimed} sent by {sender}")]
    NotSender {
        /// Claimed user.
        claimed: String,
        /// Sender.
        sender: String,
    },
    /// A format Conclave does not follow (legacy per-user arrays).
    #[error("unsupported legacy format")]
    Legacy,
}

fn str_field<'a>(v: &'a Value, key: &'static str) -> Result<&'a str, CallEventError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or(CallEventError::Field(key))
}

fn opt_i64(v: &Value, key: &'static str) -> Result<Option<i64>, CallEventError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_i64().map(Some).ok_or(CallEventError::Field(key)),
    }
}

/// Whether a content object says "left": empty, or only a leave reason / sticky key.
fn is_leave(content: &Value) -> bool {
    match content.as_object() {
        None => true,
        Some(o) => o.keys().all(|k| {
            matches!(
                k.as_str(),
                "leave_reason" | "msc4354_sticky_key" | "sticky_key" | "slot_id"
            )
        }),
    }
}

/// Effects of one timeline event (`None` if it is not a call membership event). `now_ms`
/// decides whether a membership has already expired on arrival.
pub fn effects(event: &Value, now_ms: i64) -> Option<Result<Vec<Effect>, CallEventError>> {
    let kind = event.get("type")?.as_str()?;
    match kind {
        CALL_MEMBER => Some(call_member(event, now_ms)),
        RTC_MEMBER | RTC_MEMBER_STABLE => Some(rtc_member(event, now_ms)),
        _ => None,
    }
}

struct Common<'a> {
    room_id: ruma::OwnedRoomId,
    sender: ruma::OwnedUserId,
    event_id: &'a str,
    ts: i64,
    content: &'a Value,
}

fn common(event: &Value) -> Result<Common<'_>, CallEventError> {
    let room_id = ruma::RoomId::parse(str_field(event, "room_id")?)
        .map_err(|_| CallEventError::Field("room_id"))?;
    let sender = ruma::UserId::parse(str_field(event, "sender")?)
        .map_err(|_| CallEventError::Field("sender"))?;
    Ok(Common {
        room_id,
        sender,
        event_id: str_field(event, "event_id")?,
        ts: opt_i64(event, "origin_server_ts")?.unwrap_or(0),
        content: event
            .get("content")
            .ok_or(CallEventError::Field("content"))?,
    })
}

fn call_member(event: &Value, now_ms: i64) -> Result<Vec<Effect>, CallEventError> {
    let state_key = str_field(event, "state_key")?;
    if state_key.len() > MAX_STATE_KEY {
        return Err(CallEventError::StateKeyTooLong);
    }
    let c = common(event)?;
    let left = || Effect::CallMemberLeft {
        room_id: c.room_id.clone(),
        member_key: state_key.to_owned(),
        ts: c.ts,
    };
    if is_leave(c.content) {
        return Ok(vec![left()]);
    }
    if c.content.get("memberships").is_some() {
        return Err(CallEventError::Legacy);
    }
    // A per-device state key names its user; it must be the sender.
    if state_key.starts_with('@') || state_key.starts_with("_@") {
        let named = state_key.trim_start_matches('_');
        if !named.starts_with(c.sender.as_str()) {
            return Err(CallEventError::NotSender {
                claimed: named.chars().take(80).collect(),
                sender: c.sender.to_string(),
            });
        }
    }
    let application = str_field(c.content, "application")?;
    if application != "m.call" {
        return Err(CallEventError::UnknownApplication(
            application.chars().take(64).collect(),
        ));
    }
    let call_id = match c.content.get("call_id") {
        None => "",
        Some(v) => v.as_str().ok_or(CallEventError::Field("call_id"))?,
    };
    let device_id = str_field(c.content, "device_id")?;
    let expires = opt_i64(c.content, "expires")?.unwrap_or(DEFAULT_EXPIRES_MS);
    let created = opt_i64(c.content, "created_ts")?.unwrap_or(c.ts);
    let expires_ts = created.saturating_add(expires);
    if expires_ts <= now_ms {
        return Ok(vec![left()]);
    }
    let membership_id = match c.content.get("membershipID") {
        Some(v) => v
            .as_str()
            .ok_or(CallEventError::Field("membershipID"))?
            .to_owned(),
        None => format!("{}:{device_id}", c.sender),
    };
    Ok(vec![Effect::CallMemberJoined(CallMemberJoin {
        room_id: c.room_id.clone(),
        application: application.to_owned(),
        call_id: call_id.to_owned(),
        member_key: state_key.to_owned(),
        user_id: c.sender.clone(),
        device_id: device_id.to_owned(),
        membership_id,
        focus_active: c
            .content
            .get("focus_active")
            .map(Value::to_string)
            .unwrap_or_default(),
        foci_preferred: c
            .content
            .get("foci_preferred")
            .map(Value::to_string)
            .unwrap_or_default(),
        event_id: c.event_id.to_owned(),
        ts: c.ts,
        expires_ts: Some(expires_ts),
    })])
}

/// The sticky (MSC4354) expiry of an event as matrix-js-sdk computes it: the server's remaining
/// TTL from now if given, else `min(now, origin_server_ts) + duration` (capped at an hour).
fn sticky_expiry(event: &Value, ts: i64, now_ms: i64) -> i64 {
    let unsigned = event.get("unsigned");
    let ttl = ["msc4354_sticky_duration_ttl_ms", "sticky_duration_ttl_ms"]
        .iter()
        .find_map(|k| unsigned.and_then(|u| u.get(*k)).and_then(Value::as_i64));
    if let Some(ttl) = ttl {
        return now_ms.saturating_add(ttl.clamp(0, MAX_STICKY_MS));
    }
    let duration = ["msc4354_sticky", "sticky"]
        .iter()
        .find_map(|k| event.get(*k))
        .and_then(|s| s.get("duration_ms"))
        .and_then(Value::as_i64)
        .unwrap_or(MAX_STICKY_MS)
        .clamp(0, MAX_STICKY_MS);
    ts.min(now_ms).saturating_add(duration)
}

fn rtc_member(event: &Value, now_ms: i64) -> Result<Vec<Effect>, CallEventError> {
    let c = common(event)?;
    let sticky_key = match c
        .content
        .get("msc4354_sticky_key")
        .or_else(|| c.content.get("sticky_key"))
    {
        None => None,
        Some(v) => Some(v.as_str().ok_or(CallEventError::Field("sticky_key"))?),
    };
    let member = c.content.get("member");
    let member_id = member.and_then(|m| m.get("id")).and_then(Value::as_str);
    // Sticky events are keyed per sender: nobody can end someone else's membership.
    let key = sticky_key
        .or(member_id)
        .ok_or(CallEventError::Field("sticky_key"))?;
    if key.len() > MAX_STATE_KEY {
        return Err(CallEventError::StateKeyTooLong);
    }
    let member_key = format!("rtc:{}|{key}", c.sender);
    let left = || {
        Ok(vec![Effect::CallMemberLeft {
            room_id: c.room_id.clone(),
            member_key: member_key.clone(),
            ts: c.ts,
        }])
    };
    // A leave is `{slot_id, msc4354_sticky_key}` (matrix-js-sdk `isLeftMembershipContent`).
    if member.is_none() || is_leave(c.content) {
        return left();
    }
    let member = member.ok_or(CallEventError::Field("member"))?;
    let member_id = member_id.ok_or(CallEventError::Field("member.id"))?;
    let user = str_field(member, "user_id")?;
    if user != c.sender.as_str() {
        return Err(CallEventError::NotSender {
            claimed: user.chars().take(80).collect(),
            sender: c.sender.to_string(),
        });
    }
    let device_id = str_field(member, "device_id")?;
    let application = match c.content.get("application") {
        Some(Value::Object(o)) => o
            .get("type")
            .and_then(Value::as_str)
            .ok_or(CallEventError::Field("application.type"))?,
        _ => return Err(CallEventError::Field("application")),
    };
    if application != "m.call" {
        return Err(CallEventError::UnknownApplication(
            application.chars().take(64).collect(),
        ));
    }
    let slot = str_field(c.content, "slot_id")?;
    if !slot.starts_with("m.call#") {
        return Err(CallEventError::Field("slot_id"));
    }
    let call_id = if slot == ROOM_SLOT { "" } else { slot };
    let expires_ts = sticky_expiry(event, c.ts, now_ms);
    if expires_ts <= now_ms {
        return left();
    }
    Ok(vec![Effect::CallMemberJoined(CallMemberJoin {
        room_id: c.room_id.clone(),
        application: application.to_owned(),
        call_id: call_id.to_owned(),
        member_key,
        user_id: c.sender.clone(),
        device_id: device_id.to_owned(),
        membership_id: member_id.to_owned(),
        focus_active: c
            .content
            .get("transports")
            .map(Value::to_string)
            .unwrap_or_default(),
        foci_preferred: String::new(),
        event_id: c.event_id.to_owned(),
        ts: c.ts,
        expires_ts: Some(expires_ts),
    })])
}

/// For a non-membership event: its sender was joined to its room when it was sent (the
/// homeserver checked the room's auth rules before accepting it). `None` for `m.room.member`
/// events and for events missing a field.
fn sender_joined(event: &serde_json::Value) -> Option<MembershipRecord> {
    let field = |k: &str| event.get(k).and_then(serde_json::Value::as_str);
    if field("type")? == "m.room.member" {
        return None;
    }
    let ts = event
        .get("origin_server_ts")
        .and_then(serde_json::Value::as_u64)?;
    Some(MembershipRecord {
        room_id: ruma::RoomId::parse(field("room_id")?).ok()?,
        user_id: ruma::UserId::parse(field("sender")?).ok()?,
        membership: ruma::events::room::member::MembershipState::Join,
        event_id: ruma::EventId::parse(field("event_id")?).ok()?,
        origin_server_ts: ruma::MilliSecondsSinceUnixEpoch(ruma::UInt::try_from(ts).ok()?),
    })
}

/// Turns the events of a transaction into store effects, skipping (and counting) what cannot
/// be parsed: one malformed event never blocks the queue.
pub fn transaction_effects(
    metrics: &Metrics,
    events: &[Raw<AnyTimelineEvent>],
    now_ms: i64,
) -> Vec<Effect> {
    let mut out = Vec::new();
    for raw in events {
        inc(&metrics.events_received);
        // MatrixRTC membership events are custom types: read them as JSON.
        if let Ok(value) = raw.deserialize_as::<serde_json::Value>() {
            if let Some(seen) = sender_joined(&value) {
                out.push(Effect::SenderJoined(seen));
            }
            if let Some(result) = effects(&value, now_ms) {
                match result {
                    Ok(e) => out.extend(e),
                    Err(err) => {
                        inc(&metrics.events_malformed);
                        let id = value.get("event_id").and_then(|v| v.as_str()).unwrap_or("");
                        tracing::warn!(event_id = %id, error = %err, "ignoring call membership event");
                    }
                }
                continue;
            }
        }
        let event = match raw.deserialize() {
            Ok(e) => e,
            Err(e) => {
                inc(&metrics.events_malformed);
                let id = raw
                    .get_field::<String>("event_id")
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                tracing::warn!(event_id = %id, error = %e, "skipping malformed event");
                continue;
            }
        };
        if let AnyTimelineEvent::State(AnyStateEvent::RoomEncryption(enc)) = &event {
            tracing::info!(room_id = %enc.room_id(), "room is encrypted");
            let algorithm = match enc {
                ruma::events::StateEvent::Original(o) => o.content.algorithm.to_string(),
                ruma::events::StateEvent::Redacted(_) => String::new(),
            };
            out.push(Effect::RoomEncrypted {
                room_id: enc.room_id().to_owned(),
                algorithm,
                event_id: enc.event_id().to_string(),
            });
            continue;
        }
        if let AnyTimelineEvent::State(AnyStateEvent::RoomServerAcl(
            ruma::events::StateEvent::Original(acl),
        )) = &event
        {
            tracing::info!(room_id = %acl.room_id, "server ACL changed");
            match serde_json::to_string(&acl.content) {
                Ok(content) => out.push(Effect::ServerAcl {
                    room_id: acl.room_id.clone(),
                    content,
                    event_id: acl.event_id.to_string(),
                }),
                Err(e) => tracing::warn!(error = %e, "server ACL not recorded"),
            }
            continue;
        }
        if let AnyTimelineEvent::State(AnyStateEvent::RoomMember(member)) = &event {
            let Ok(user_id) = ruma::UserId::parse(member.state_key().as_str()) else {
                inc(&metrics.events_malformed);
                tracing::warn!(event_id = %member.event_id(), "member event with a bad state key");
                continue;
            };
            tracing::info!(
                room_id = %member.room_id(),
                user_id = %user_id,
                membership = %member.membership(),
                "membership changed"
            );
            out.push(Effect::Membership(MembershipRecord {
                room_id: member.room_id().to_owned(),
                user_id,
                membership: member.membership().clone(),
                event_id: member.event_id().to_owned(),
                origin_server_ts: member.origin_server_ts(),
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(kind: &str, state_key: Option<&str>, content: Value) -> Value {
        let mut e = json!({
            "type": kind, "room_id": "!r:example.org", "sender": "@alice:example.org",
            "event_id": "$e", "origin_server_ts": 1_000_000, "content": content,
        });
        if let Some(k) = state_key {
            e["state_key"] = json!(k);
        }
        e
    }

    const KEY: &str = "_@alice:example.org_DEV_m.call";

    #[test]
    fn join_with_expiry_and_leave() {
        let e = ev(
            CALL_MEMBER,
            Some(KEY),
            json!({"application": "m.call", "call_id": "", "scope": "m.room", "device_id": "DEV",
                   "expires": 60_000, "focus_active": {"type": "livekit"}, "foci_preferred": []}),
        );
        let out = effects(&e, 1_000_000).unwrap().unwrap();
        let Effect::CallMemberJoined(j) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(j.expires_ts, Some(1_060_000));
        assert_eq!(j.device_id, "DEV");
        assert_eq!(j.membership_id, "@alice:example.org:DEV");
        assert_eq!(j.member_key, KEY);
        // The same event seen after its expiry is a leave.
        let out = effects(&e, 1_060_000).unwrap().unwrap();
        assert!(matches!(out[0], Effect::CallMemberLeft { .. }));
        // Empty content = left.
        let out = effects(&ev(CALL_MEMBER, Some(KEY), json!({})), 0)
            .unwrap()
            .unwrap();
        assert!(matches!(&out[0], Effect::CallMemberLeft { member_key, .. } if member_key == KEY));
    }

    #[test]
    fn malformed_contents_are_errors_not_panics() {
        let bad = [
            json!({"application": 5, "device_id": "D"}),
            json!({"application": "m.call", "device_id": 7}),
            json!({"application": "m.call", "device_id": "D", "expires": "soon"}),
            json!({"application": "m.call", "device_id": "D", "call_id": []}),
            json!({"application": "org.example.game", "device_id": "D"}),
            json!({"memberships": []}),
        ];
        for content in bad {
            assert!(
                effects(&ev(CALL_MEMBER, Some(KEY), content.clone()), 0)
                    .unwrap()
                    .is_err(),
                "{content}"
            );
        }
        let huge = "_@alice:example.org_".to_owned() + &"x".repeat(5000);
        assert_eq!(
            effects(&ev(CALL_MEMBER, Some(&huge), json!({})), 0).unwrap(),
            Err(CallEventError::StateKeyTooLong)
        );
        let spoof = ev(
            CALL_MEMBER,
            Some("_@bob:example.org_DEV_m.call"),
            json!({"application": "m.call", "device_id": "DEV"}),
        );
        assert!(matches!(
            effects(&spoof, 0).unwrap(),
            Err(CallEventError::NotSender { .. })
        ));
        assert!(effects(&json!({"type": "m.room.message"}), 0).is_none());
        assert!(effects(&json!({"type": CALL_MEMBER}), 0).unwrap().is_err());
    }

    /// What Element Call 0.26.1 (matrix-js-sdk 43, `StickyEventMembershipManager`) sends.
    fn ec_join(member_id: &str) -> Value {
        json!({"slot_id": "m.call#ROOM",
               "application": {"type": "m.call", "m.call.intent": "video"},
               "transports": {"published": [{"type": "livekit",
                                             "livekit_service_url": "https://c1.example"}],
                              "can_subscribe": ["livekit"]},
               "member": {"device_id": "DEV", "user_id": "@alice:example.org", "id": member_id},
               "versions": [],
               "msc4354_sticky_key": member_id})
    }

    fn sticky(kind: &str, content: Value) -> Value {
        let mut e = ev(kind, None, content);
        e["msc4354_sticky"] = json!({"duration_ms": 3_600_000});
        e
    }

    fn left_key(out: &[Effect]) -> &str {
        match &out[0] {
            Effect::CallMemberLeft { member_key, .. } => member_key,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rtc_member_join_and_leave() {
        for kind in [RTC_MEMBER, RTC_MEMBER_STABLE] {
            let out = effects(&sticky(kind, ec_join("mem1")), 1_000_000)
                .unwrap()
                .unwrap();
            let Effect::CallMemberJoined(j) = &out[0] else {
                panic!("{out:?}")
            };
            assert_eq!(j.call_id, "");
            assert_eq!(j.member_key, "rtc:@alice:example.org|mem1");
            assert_eq!(
                (j.device_id.as_str(), j.membership_id.as_str()),
                ("DEV", "mem1")
            );
            assert_eq!(j.expires_ts, Some(4_600_000));
            assert!(j.focus_active.contains("https://c1.example"));
            // matrix-js-sdk's leave: the slot and the sticky key, nothing else.
            let leave = ev(
                kind,
                None,
                json!({"slot_id": "m.call#ROOM", "msc4354_sticky_key": "mem1"}),
            );
            let out = effects(&leave, 0).unwrap().unwrap();
            assert_eq!(left_key(&out), "rtc:@alice:example.org|mem1");
        }
    }

    #[test]
    fn rtc_member_leave_is_scoped_to_its_sender() {
        let mut leave = ev(
            RTC_MEMBER,
            None,
            json!({"slot_id": "m.call#ROOM", "msc4354_sticky_key": "mem1"}),
        );
        leave["sender"] = json!("@mallory:example.org");
        let out = effects(&leave, 0).unwrap().unwrap();
        assert_eq!(left_key(&out), "rtc:@mallory:example.org|mem1");
    }

    #[test]
    fn rtc_member_expiry_follows_stickiness() {
        // The server's remaining TTL wins; else min(now, ts) + duration, capped at an hour.
        let mut e = sticky(RTC_MEMBER, ec_join("m"));
        e["unsigned"] = json!({"msc4354_sticky_duration_ttl_ms": 5_000});
        let out = effects(&e, 2_000_000).unwrap().unwrap();
        assert!(matches!(&out[0], Effect::CallMemberJoined(j) if j.expires_ts == Some(2_005_000)));
        let mut e = ev(RTC_MEMBER, None, ec_join("m"));
        e["sticky"] = json!({"duration_ms": 99_999_999});
        let out = effects(&e, 500_000).unwrap().unwrap();
        assert!(matches!(&out[0], Effect::CallMemberJoined(j) if j.expires_ts == Some(4_100_000)));
        // Past its stickiness it is a leave.
        let out = effects(&sticky(RTC_MEMBER, ec_join("m")), 4_600_000)
            .unwrap()
            .unwrap();
        assert_eq!(left_key(&out), "rtc:@alice:example.org|m");
    }

    #[test]
    fn rtc_member_malformed_is_an_error() {
        let mut spoof = ec_join("m");
        spoof["member"]["user_id"] = json!("@bob:example.org");
        let mut no_slot = ec_join("m");
        no_slot.as_object_mut().unwrap().remove("slot_id");
        let mut other_app = ec_join("m");
        other_app["application"]["type"] = json!("org.example.game");
        other_app["slot_id"] = json!("org.example.game#ROOM");
        let mut bad_key = ec_join("m");
        bad_key["msc4354_sticky_key"] = json!(5);
        for content in [spoof, no_slot, other_app, bad_key] {
            assert!(
                effects(&ev(RTC_MEMBER, None, content.clone()), 0)
                    .unwrap()
                    .is_err(),
                "{content}"
            );
        }
    }
}

#[cfg(test)]
mod sender_evidence_tests {
    use super::sender_joined;
    use ruma::events::room::member::MembershipState;
    use serde_json::json;

    fn call_member() -> serde_json::Value {
        json!({
            "type": "org.matrix.msc3401.call.member",
            "state_key": "_@bob:hs2.example_DEV_m.call",
            "room_id": "!call:hs2.example",
            "sender": "@bob:hs2.example",
            "event_id": "$member",
            "origin_server_ts": 1234,
            "content": {},
        })
    }

    #[test]
    fn any_non_membership_event_is_evidence_its_sender_was_joined() {
        let r = sender_joined(&call_member()).expect("evidence");
        assert_eq!(r.user_id.as_str(), "@bob:hs2.example");
        assert_eq!(r.room_id.as_str(), "!call:hs2.example");
        assert_eq!(r.membership, MembershipState::Join);
        assert_eq!(r.event_id.as_str(), "$member");
        assert_eq!(u64::from(r.origin_server_ts.0), 1234);
    }

    #[test]
    fn membership_events_and_incomplete_events_are_not() {
        let mut member = call_member();
        member["type"] = json!("m.room.member");
        assert!(
            sender_joined(&member).is_none(),
            "m.room.member speaks for itself"
        );
        for (field, bad) in [
            ("sender", json!("not a user id")),
            ("room_id", json!(42)),
            ("event_id", json!(null)),
            ("origin_server_ts", json!("yesterday")),
        ] {
            let mut e = call_member();
            e[field] = bad;
            assert!(sender_joined(&e).is_none(), "{field} invalid");
        }
    }
}

#[cfg(test)]
mod server_acl_tests {
    use super::transaction_effects;
    use crate::metrics::Metrics;
    use crate::store::Effect;
    use ruma::events::room::server_acl::RoomServerAclEventContent;
    use ruma::events::AnyTimelineEvent;
    use ruma::serde::Raw;
    use serde_json::{json, Value};

    fn raw(v: Value) -> Raw<AnyTimelineEvent> {
        Raw::from_json(serde_json::value::to_raw_value(&v).unwrap())
    }

    fn acl(room: &str, state_key: &str, content: Value) -> Value {
        json!({
            "type": "m.room.server_acl", "state_key": state_key, "room_id": room,
            "sender": "@a:hs1.example", "event_id": "$acl", "origin_server_ts": 1,
            "content": content,
        })
    }

    #[test]
    fn acls_become_effects_and_bad_ones_are_skipped() {
        let metrics = Metrics::default();
        let events = [
            raw(acl(
                "!r:hs1.example",
                "",
                json!({"allow": ["*"], "deny": ["hs2.example"]}),
            )),
            raw(acl("!r:hs1.example", "not-empty", json!({"allow": ["*"]}))),
            raw(acl("not a room", "", json!({"allow": ["*"]}))),
            raw(acl("!r:hs1.example", "", json!({"allow": "everyone"}))),
            raw(acl("!s:hs1.example", "", json!({}))),
        ];
        let acls: Vec<(String, RoomServerAclEventContent)> =
            transaction_effects(&metrics, &events, 0)
                .into_iter()
                .filter_map(|e| match e {
                    Effect::ServerAcl {
                        room_id, content, ..
                    } => Some((room_id.to_string(), serde_json::from_str(&content).unwrap())),
                    _ => None,
                })
                .collect();
        assert_eq!(acls.len(), 2, "{acls:?}");
        assert_eq!(acls[0].0, "!r:hs1.example");
        assert!(!acls[0].1.is_allowed(ruma::server_name!("hs2.example")));
        assert!(acls[0].1.is_allowed(ruma::server_name!("hs3.example")));
        // No `allow`: every server is denied (the spec's default).
        assert_eq!(acls[1].0, "!s:hs1.example");
        assert!(!acls[1].1.is_allowed(ruma::server_name!("hs2.example")));
    }
}
