//! LiveKit identifiers (`RM_`, `PA_`, `TR_`) and ICE credentials from one seedable RNG, so a
//! simulation with a fixed seed is reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
