//! Room notices: when a call starts and ends, the appservice bot posts an `m.notice` in the
//! room (who started it, duration, peak participants), so chat bridged elsewhere sees calls too.
//! Config `calls.notices` (default on). The bot can only post where it is joined; it accepts
//! invites ([`accept_invite`]).

use ruma::api::client::message::send_message_event;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::{OwnedRoomId, RoomId, TransactionId};

use crate::matrix::client::HomeserverClient;

fn human_duration(ms: i64) -> String {
    let secs = (ms / 1000).max(0);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h} h {m:02} min")
    } else if m > 0 {
        format!("{m} min {s:02} s")
    } else {
        format!("{s} s")
    }
}

/// The text of the "call started" notice.
pub fn started_text(started_by: &str) -> String {
    format!("📞 {started_by} started a call.")
}

/// The text of the "call ended" notice.
pub fn ended_text(started_by: &str, duration_ms: i64, peak: i64) -> String {
    format!(
        "📞 Call ended after {} (started by {started_by}, up to {peak} participant{}).",
        human_duration(duration_ms),
        if peak == 1 { "" } else { "s" }
    )
}

/// Posts `text` as an `m.notice` in `room_id` as the bot; a room the bot is not in is skipped.
pub async fn post(homeserver: &HomeserverClient, room_id: &RoomId, text: String) {
    let content = RoomMessageEventContent::notice_plain(text);
    let request = match send_message_event::v3::Request::new(
        room_id.to_owned(),
        TransactionId::new(),
        &content,
    ) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the notice");
            return;
        }
    };
    match homeserver.send(request, None).await {
        Ok(_) => tracing::info!(room_id = %room_id, "call notice posted"),
        // Not in the room (never invited): nothing to announce there.
        Err(e) => tracing::debug!(room_id = %room_id, error = %e, "call notice not posted"),
    }
}

/// The bot joins rooms it is invited to, so it can post call notices there.
pub async fn accept_invite(homeserver: HomeserverClient, room_id: OwnedRoomId) {
    let request = ruma::api::client::membership::join_room_by_id::v3::Request::new(room_id.clone());
    match homeserver.send(request, None).await {
        Ok(_) => tracing::info!(room_id = %room_id, "bot accepted an invite"),
        Err(e) => tracing::warn!(room_id = %room_id, error = %e, "bot could not join"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notice_texts() {
        assert_eq!(started_text("@a:x"), "📞 @a:x started a call.");
        assert_eq!(
            ended_text("@a:x", 125_000, 3),
            "📞 Call ended after 2 min 05 s (started by @a:x, up to 3 participants)."
        );
        assert_eq!(human_duration(3_700_000), "1 h 01 min");
        assert!(ended_text("@a:x", 1000, 1).ends_with("1 participant)."));
    }
}
