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

/// The participant identity issued by `/get_token`: matrix-js-sdk's `computeRtcIdentityRaw`,
/// the identity of an `m.rtc.member` (Element Call `matrix_2_0`).
pub fn member_identity(user_id: &str, device_id: &str, member_id: &str) -> String {
    hash_parts(&[user_id, device_id, member_id])
}

/// The participant identity issued by the legacy `/sfu/get`: plain `user_id:device_id`.
pub fn legacy_identity(user_id: &str, device_id: &str) -> String {
    format!("{user_id}:{device_id}")
}

/// Our mirror of the SFU room `origin_room` of the peer Conclave of `origin` (the cascade,
/// `docs/cascade.md`). A call's SFU room has the same name on every Conclave (it is a hash of
/// the Matrix room and slot), so a call's mirror of a peer is `cascade:<peer>:<its room>`.
pub fn mirror_room_name(origin: &str, origin_room: &str) -> String {
    format!("cascade:{origin}:{origin_room}")
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

    /// Computed by matrix-js-sdk 43.0.0 (Element Call 0.26.1), `computeRtcIdentityRaw` in
    /// `src/matrixrtc/membershipData/rtc.ts`: the `matrix_2_0` LiveKit identity.
    #[test]
    fn matrix_js_sdk_vectors() {
        for (user, device, member, want) in [
            (
                "@alice:example.com",
                "ALICEDEVICE",
                "memberABC",
                "WulP/G0PPitjxR6gB3GRPsgWcg7TtNrJ7kzzDBG3S0g",
            ),
            (
                "@alice:localhost:8448",
                "ABCDEFGHIJ",
                "2b5f2c8e-5d64-4a3c-9b0e-0f4f7f6f2b1a",
                "4P0RGnNfIlIt9MBNjU/EUYacvo5+Uvwn39Wv2dGxpNo",
            ),
            (
                "@zoë:example.org",
                "DÉV<&>",
                "id\"\\/\u{2028}",
                "pwhLi4rPPJ0t6VHLqFUVa5YHW31cw9JKcjFNFBgUFRY",
            ),
        ] {
            assert_eq!(
                member_identity(user, device, member),
                want,
                "{user} {device}"
            );
        }
    }

    #[test]
    fn html_characters_are_not_escaped() {
        // Go would write \u003c; the JS client (and we) write '<' as is.
        let json = serde_json::to_string(&["<&>"]).unwrap();
        assert_eq!(json, r#"["<&>"]"#);
    }
}
