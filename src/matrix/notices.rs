//! Room notices: when a call starts and ends, the appservice bot posts an `m.notice` in the
//! room (who started it, duration, peak participants), so chat bridged elsewhere sees calls too.
//! Config `calls.notices` (default on). The bot can only post where it is joined; it accepts
//! invites (see `appservice`).

use ruma::api::client::message::send_message_event;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::{RoomId, TransactionId, UserId};

use crate::app::AppState;

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

async fn post(state: &AppState, room_id: &RoomId, text: String) {
    if !state.config.calls.notices {
        return;
    }
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
    match state.homeserver.send(request, None).await {
        Ok(_) => tracing::info!(room_id = %room_id, "call notice posted"),
        // Not in the room (never invited): nothing to announce there.
        Err(e) => tracing::debug!(room_id = %room_id, error = %e, "call notice not posted"),
    }
}

/// Announces a call start.
pub async fn call_started(state: &AppState, room_id: &RoomId, started_by: &UserId) {
    post(state, room_id, started_text(started_by.as_str())).await;
}

/// Announces a call end.
pub async fn call_ended(
    state: &AppState,
    room_id: &RoomId,
    started_by: &str,
    duration_ms: i64,
    peak: i64,
) {
    post(state, room_id, ended_text(started_by, duration_ms, peak)).await;
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
