//! Size limits on what clients and operators may put into a participant's or a room's info,
//! with LiveKit's default values (`limit` in `livekit.yaml`).
//!
//! Everything in a participant's info goes to everyone in the room on every change and to every
//! late joiner in its join response, so one participant's fields multiply by the room's size:
//! these bounds keep a single update and a join response proportionate. Sizes are bytes of
//! UTF-8, as LiveKit counts them.

use std::collections::HashMap;

/// Longest participant display name, in bytes (LiveKit `max_participant_name_length`).
pub const MAX_PARTICIPANT_NAME_BYTES: usize = 256;
/// Largest participant metadata, in bytes (LiveKit `max_metadata_size`: 512 KiB).
pub const MAX_METADATA_BYTES: usize = 512 * 1024;
/// Largest total of a participant's attributes, keys plus values, in bytes (LiveKit
/// `max_attributes_size`).
pub const MAX_ATTRIBUTES_BYTES: usize = 64_000;
/// Largest room metadata, in bytes (LiveKit applies `max_metadata_size` to rooms too).
pub const MAX_ROOM_METADATA_BYTES: usize = MAX_METADATA_BYTES;
/// Longest participant identity, in bytes (LiveKit `max_participant_identity_length`).
pub const MAX_PARTICIPANT_IDENTITY_BYTES: usize = 256;
/// Longest room name, in bytes (LiveKit `max_room_name_length`).
pub const MAX_ROOM_NAME_BYTES: usize = 256;

/// Which limit a value broke; the message is what the client or operator is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    /// The participant name is longer than [`MAX_PARTICIPANT_NAME_BYTES`].
    #[error("exceeds name length limit ({MAX_PARTICIPANT_NAME_BYTES} bytes)")]
    Name,
    /// The participant metadata is larger than [`MAX_METADATA_BYTES`].
    #[error("exceeds metadata size limit ({MAX_METADATA_BYTES} bytes)")]
    Metadata,
    /// The attributes (in the update, or all of them after it) are larger than
    /// [`MAX_ATTRIBUTES_BYTES`].
    #[error("exceeds attributes size limit ({MAX_ATTRIBUTES_BYTES} bytes, keys plus values)")]
    Attributes,
    /// The room metadata is larger than [`MAX_ROOM_METADATA_BYTES`].
    #[error("exceeds room metadata size limit ({MAX_ROOM_METADATA_BYTES} bytes)")]
    RoomMetadata,
    /// The identity is longer than [`MAX_PARTICIPANT_IDENTITY_BYTES`].
    #[error("exceeds identity length limit ({MAX_PARTICIPANT_IDENTITY_BYTES} bytes)")]
    Identity,
    /// The room name is longer than [`MAX_ROOM_NAME_BYTES`].
    #[error("exceeds room name length limit ({MAX_ROOM_NAME_BYTES} bytes)")]
    RoomName,
}

fn within(value: &str, max: usize, err: LimitExceeded) -> Result<(), LimitExceeded> {
    if value.len() <= max {
        Ok(())
    } else {
        Err(err)
    }
}

/// Bytes of `attributes`, keys plus values (LiveKit's measure).
pub fn attributes_size(attributes: &HashMap<String, String>) -> usize {
    attributes.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Bytes of `current` after `update` is applied (an empty value deletes its key).
fn attributes_size_after(
    current: &HashMap<String, String>,
    update: &HashMap<String, String>,
) -> usize {
    let mut total = attributes_size(current);
    for (k, v) in update {
        if let Some(old) = current.get(k) {
            total = total.saturating_sub(k.len() + old.len());
        }
        if !v.is_empty() {
            total += k.len() + v.len();
        }
    }
    total
}

/// Checks a participant update (empty name or metadata: unchanged; an empty attribute value
/// deletes the attribute) against the limits: the name, the metadata, the attributes of the
/// update (as LiveKit) and all attributes once it is applied to `current` (so that many small
/// updates cannot add up past the limit either).
pub fn check_participant_update(
    current: &HashMap<String, String>,
    name: &str,
    metadata: &str,
    attributes: &HashMap<String, String>,
) -> Result<(), LimitExceeded> {
    within(name, MAX_PARTICIPANT_NAME_BYTES, LimitExceeded::Name)?;
    within(metadata, MAX_METADATA_BYTES, LimitExceeded::Metadata)?;
    if attributes_size(attributes) > MAX_ATTRIBUTES_BYTES
        || attributes_size_after(current, attributes) > MAX_ATTRIBUTES_BYTES
    {
        return Err(LimitExceeded::Attributes);
    }
    Ok(())
}

/// Checks what a joining participant's token carries: identity, room name, display name and
/// metadata.
pub fn check_join(
    identity: &str,
    room: &str,
    name: &str,
    metadata: &str,
) -> Result<(), LimitExceeded> {
    within(
        identity,
        MAX_PARTICIPANT_IDENTITY_BYTES,
        LimitExceeded::Identity,
    )?;
    within(room, MAX_ROOM_NAME_BYTES, LimitExceeded::RoomName)?;
    within(name, MAX_PARTICIPANT_NAME_BYTES, LimitExceeded::Name)?;
    within(metadata, MAX_METADATA_BYTES, LimitExceeded::Metadata)
}

/// Checks room metadata.
pub fn check_room_metadata(metadata: &str) -> Result<(), LimitExceeded> {
    within(
        metadata,
        MAX_ROOM_METADATA_BYTES,
        LimitExceeded::RoomMetadata,
    )
}

/// Checks a room name.
pub fn check_room_name(name: &str) -> Result<(), LimitExceeded> {
    within(name, MAX_ROOM_NAME_BYTES, LimitExceeded::RoomName)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, usize)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, n)| ((*k).to_owned(), "v".repeat(*n)))
            .collect()
    }

    #[test]
    fn bounds_are_inclusive_and_each_field_is_named() {
        let none = HashMap::new();
        let at = |n| "x".repeat(n);
        assert_eq!(
            check_participant_update(&none, &at(256), &at(MAX_METADATA_BYTES), &none),
            Ok(())
        );
        assert_eq!(
            check_participant_update(&none, &at(257), "", &none),
            Err(LimitExceeded::Name)
        );
        assert_eq!(
            check_participant_update(&none, "", &at(MAX_METADATA_BYTES + 1), &none),
            Err(LimitExceeded::Metadata)
        );
        // Bytes, not characters: 128 two-byte characters are 256 bytes.
        assert_eq!(
            check_participant_update(&none, &"é".repeat(129), "", &none),
            Err(LimitExceeded::Name)
        );
        assert_eq!(check_room_metadata(&at(MAX_ROOM_METADATA_BYTES)), Ok(()));
        assert_eq!(
            check_room_metadata(&at(MAX_ROOM_METADATA_BYTES + 1)),
            Err(LimitExceeded::RoomMetadata)
        );
        assert_eq!(check_join(&at(256), &at(256), "", ""), Ok(()));
        assert_eq!(
            check_join(&at(257), "r", "", ""),
            Err(LimitExceeded::Identity)
        );
        assert_eq!(
            check_join("i", &at(257), "", ""),
            Err(LimitExceeded::RoomName)
        );
        assert_eq!(
            check_join("i", "r", "", &at(MAX_METADATA_BYTES + 1)),
            Err(LimitExceeded::Metadata)
        );
        assert!(LimitExceeded::Metadata.to_string().contains("524288 bytes"));
    }

    #[test]
    fn attributes_count_keys_and_values_before_and_after_the_update() {
        let none = HashMap::new();
        // Key (1 byte) plus value: 64 000 in total is fine, one more is not.
        assert_eq!(
            check_participant_update(&none, "", "", &attrs(&[("a", 63_999)])),
            Ok(())
        );
        assert_eq!(
            check_participant_update(&none, "", "", &attrs(&[("a", 64_000)])),
            Err(LimitExceeded::Attributes)
        );
        // Small updates do not add up past the limit...
        let current = attrs(&[("a", 40_000)]);
        assert_eq!(
            check_participant_update(&current, "", "", &attrs(&[("b", 30_000)])),
            Err(LimitExceeded::Attributes)
        );
        // ...but replacing or deleting a key frees its bytes.
        assert_eq!(
            check_participant_update(&current, "", "", &attrs(&[("a", 60_000)])),
            Ok(())
        );
        let mut swap = attrs(&[("b", 60_000)]);
        swap.insert("a".into(), String::new());
        assert_eq!(check_participant_update(&current, "", "", &swap), Ok(()));
        assert_eq!(attributes_size(&current), 40_001);
    }
}
