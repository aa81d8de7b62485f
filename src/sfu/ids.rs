//! Typed identifiers of the SFU, and the LiveKit identifiers (`RM_`, `PA_`, `TR_`) and ICE
//! credentials drawn from one seedable RNG, so a simulation with a fixed seed is reproducible.
//!
//! Room names, SIDs, identities and session ids are distinct types: a room name can never be
//! passed where an identity is expected, and maps are keyed by what they mean.

use std::borrow::Borrow;
use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Declares a string newtype with the conversions every id needs.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a string.
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
            /// The id's text, owned.
            pub fn into_string(self) -> String {
                self.0
            }
            /// Whether the id is empty (absent in protocol messages).
            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_id!(
    /// A LiveKit room name (the JWT's `video.room`; lk-jwt-service derives it from the Matrix
    /// room and call slot).
    RoomName
);
string_id!(
    /// A room's server-assigned SID (`RM_…`).
    RoomSid
);
string_id!(
    /// A participant's identity (the JWT's `sub`): stable across reconnects.
    ParticipantIdentity
);
string_id!(
    /// One participant session's server-assigned SID (`PA_…`).
    ParticipantSid
);
string_id!(
    /// A published track's SID (`TR_…`).
    TrackSid
);

/// One signalling session (one WebSocket) inside the SFU loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// short-uuid's base57 alphabet, as LiveKit's `guid` package uses.
const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Room SID prefix.
pub const ROOM_PREFIX: &str = "RM_";
/// Participant SID prefix.
pub const PARTICIPANT_PREFIX: &str = "PA_";
/// Track SID prefix.
pub const TRACK_PREFIX: &str = "TR_";

/// The source of every random identifier of the SFU.
#[derive(Debug)]
pub struct Ids {
    rng: StdRng,
}

impl Ids {
    /// Deterministic identifiers from `seed`.
    pub fn from_seed(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Identifiers from the OS's entropy.
    pub fn from_entropy() -> Self {
        Self {
            rng: StdRng::from_entropy(),
        }
    }

    fn chars(&mut self, n: usize, alphabet: &[u8]) -> String {
        (0..n)
            .map(|_| alphabet[self.rng.gen_range(0..alphabet.len())] as char)
            .collect()
    }

    /// `prefix` + 12 base57 characters, e.g. `PA_x7Kq2b9ZpLmN`.
    pub fn sid(&mut self, prefix: &str) -> String {
        format!("{prefix}{}", self.chars(12, ALPHABET))
    }

    /// ICE ufrag (8 chars) and password (24 chars), alphanumeric (RFC 8839 ice-char subset).
    pub fn ice_credentials(&mut self) -> (String, String) {
        const ICE: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        (self.chars(8, ICE), self.chars(24, ICE))
    }

    /// A random u64 (SSRC-like values, seeds).
    pub fn next_u64(&mut self) -> u64 {
        self.rng.gen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_determinism() {
        let mut a = Ids::from_seed(7);
        let mut b = Ids::from_seed(7);
        let sid = a.sid(PARTICIPANT_PREFIX);
        assert!(sid.starts_with("PA_"));
        assert_eq!(sid.len(), 15);
        assert_eq!(sid, b.sid(PARTICIPANT_PREFIX));
        assert_eq!(a.ice_credentials(), b.ice_credentials());
        assert_ne!(a.sid(TRACK_PREFIX), a.sid(TRACK_PREFIX));
    }
}
