//! LiveKit room names and participant identities, bit-exact with `lk-jwt-service`
//! (`helper.go`): unpadded standard-alphabet base64 of SHA-256 of a compact JSON array of
//! strings. Element Call recomputes them to map LiveKit participants to Matrix members, so any
//! difference means nobody's media is shown.

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// The slot used by the legacy `/sfu/get` endpoint (and Element Call's only slot).
pub const LEGACY_SLOT: &str = "m.call#ROOM";

/// `b64(SHA256(JSON([parts...])))`.
pub fn hash_parts(parts: &[&str]) -> String {
    // serde_json's compact output of a string array equals JS `JSON.stringify` (no HTML
    // escaping, unlike Go's json.Marshal) and Matrix canonical JSON.
    let json = serde_json::to_string(parts).unwrap_or_default();
    STANDARD_NO_PAD.encode(Sha256::digest(json.as_bytes()))
}

/// The SFU room name of a Matrix room's call slot.
pub fn room_name(room_id: &str, slot_id: &str) -> String {
    hash_parts(&[room_id, slot_id])
}

/// The participant identity issued by `/get_token`.
pub fn member_identity(user_id: &str, device_id: &str, member_id: &str) -> String {
    hash_parts(&[user_id, device_id, member_id])
}

/// The participant identity issued by the legacy `/sfu/get`: plain `user_id:device_id`.
pub fn legacy_identity(user_id: &str, device_id: &str) -> String {
    format!("{user_id}:{device_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from lk-jwt-service / MSC4195.
    #[test]
    fn pinned_vectors() {
        assert_eq!(
            room_name("!roomid:example.com", "slot1234"),
            "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"
        );
        assert_eq!(
            room_name("!roomid:example.com", LEGACY_SLOT),
            "F4oOprKFBq6JHqy2qYpq6UQQmR7hCvxkQQoUrd0+SbI"
        );
        assert_eq!(
            member_identity("@alice:example.com", "ALICEDEVICE", "memberABC"),
            "WulP/G0PPitjxR6gB3GRPsgWcg7TtNrJ7kzzDBG3S0g"
        );
        assert_eq!(
            hash_parts(&["@alice:example.com", "memberABC"]),
            "M3VnsLXrkbxIDINXO64u8PZzFyD9ZYFiQULR2dshWYs"
        );
        assert_eq!(
            legacy_identity("@alice:example.com", "DEV"),
            "@alice:example.com:DEV"
        );
    }

    #[test]
    fn html_characters_are_not_escaped() {
        // Go would write \u003c; the JS client (and we) write '<' as is.
        let json = serde_json::to_string(&["<&>"]).unwrap();
        assert_eq!(json, r#"["<&>"]"#);
    }
}
