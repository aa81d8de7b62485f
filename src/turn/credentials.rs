//! Short-lived TURN credentials (the "TURN REST API" scheme coturn and LiveKit use): the
//! username is `<expiry unix seconds>:<random tag>`, the password base64(HMAC-SHA1(key,
//! username)), so the server checks a credential without storing it. The key is derived from
//! the LiveKit API secret (HMAC-SHA256 with a fixed label), never the secret itself. The tag
//! is random, not the user's identity: TURN usernames cross the network in clear over UDP.
//!
//! Nonces are stateless too (an unauthenticated request must not make the server keep
//! anything): `<expiry hex>-<HMAC of expiry and the client's IP>`.

use std::net::IpAddr;

use base64::Engine;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use sha2::Sha256;

/// The realm every credential belongs to.
pub const REALM: &str = "conclave";
/// How long a nonce stays valid (then 438 Stale Nonce, and the client retries with a new one).
pub const NONCE_LIFETIME_SECS: u64 = 3600;

/// Mints and checks credentials and nonces.
#[derive(Clone)]
pub struct Credentials {
    key: [u8; 32],
    ttl_secs: u64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

/// Why a username is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not `<expiry>:<tag>`.
    Malformed,
    /// Its expiry has passed.
    Expired,
}

impl Credentials {
    /// Credentials keyed by `livekit_secret`, valid `ttl_secs` after they are minted.
    pub fn new(livekit_secret: &str, ttl_secs: u64) -> Self {
        let mut mac = match Hmac::<Sha256>::new_from_slice(livekit_secret.as_bytes()) {
            Ok(mac) => mac,
            // HMAC takes keys of any length; unreachable, but never a panic.
            Err(_) => {
                return Credentials {
                    key: [0; 32],
                    ttl_secs,
                }
            }
        };
        mac.update(b"conclave turn credentials v1");
        let key = mac.finalize().into_bytes().into();
        Credentials { key, ttl_secs }
    }

    /// A fresh (username, password) valid until `now_unix + ttl`.
    pub fn mint(&self, now_unix: u64) -> (String, String) {
        let tag: [u8; 9] = rand::random();
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag);
        let username = format!("{}:{tag}", now_unix + self.ttl_secs);
        let password = self.password(&username);
        (username, password)
    }

    /// The password that goes with `username`.
    pub fn password(&self, username: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.hmac_sha1(username.as_bytes()))
    }

    fn hmac_sha1(&self, data: &[u8]) -> [u8; 20] {
        match Hmac::<Sha1>::new_from_slice(&self.key) {
            Ok(mut mac) => {
                mac.update(data);
                mac.finalize().into_bytes().into()
            }
            Err(_) => [0; 20],
        }
    }

    /// Whether `username` may still open allocations at `now_unix`.
    pub fn check_username(&self, username: &str, now_unix: u64) -> Result<(), Refusal> {
        let expiry = username
            .split_once(':')
            .and_then(|(e, tag)| (!tag.is_empty()).then_some(e))
            .and_then(|e| e.parse::<u64>().ok())
            .ok_or(Refusal::Malformed)?;
        if expiry <= now_unix {
            return Err(Refusal::Expired);
        }
        Ok(())
    }

    /// The long-term credential key of `username` (RFC 8489 §9.2.2: MD5 of
    /// `username:realm:password`), which MESSAGE-INTEGRITY is made with.
    pub fn integrity_key(&self, username: &str) -> [u8; 16] {
        let password = self.password(username);
        let mut md5 = Md5::new();
        md5.update(format!("{username}:{REALM}:{password}").as_bytes());
        md5.finalize().into()
    }

    /// A nonce for `client`, valid [`NONCE_LIFETIME_SECS`].
    pub fn nonce(&self, client: IpAddr, now_unix: u64) -> String {
        let expiry = now_unix + NONCE_LIFETIME_SECS;
        format!("{expiry:x}-{}", self.nonce_mac(client, expiry))
    }

    fn nonce_mac(&self, client: IpAddr, expiry: u64) -> String {
        let mut data = expiry.to_be_bytes().to_vec();
        data.extend_from_slice(client.to_string().as_bytes());
        let mac = self.hmac_sha1(&data);
        mac[..12].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `nonce` was made by [`Credentials::nonce`] for `client` and is still valid.
    pub fn nonce_ok(&self, nonce: &str, client: IpAddr, now_unix: u64) -> bool {
        let Some((expiry, mac)) = nonce.split_once('-') else {
            return false;
        };
        let Ok(expiry) = u64::from_str_radix(expiry, 16) else {
            return false;
        };
        expiry > now_unix
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                mac.as_bytes(),
                self.nonce_mac(client, expiry).as_bytes(),
            ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_minted_credential_checks_until_it_expires() {
        let c = Credentials::new("secret", 3600);
        let (user, pass) = c.mint(NOW);
        assert_eq!(c.password(&user), pass);
        assert!(user.starts_with(&format!("{}:", NOW + 3600)));
        assert_eq!(c.check_username(&user, NOW + 3599), Ok(()));
        assert_eq!(c.check_username(&user, NOW + 3600), Err(Refusal::Expired));
        assert_eq!(c.check_username("nope", NOW), Err(Refusal::Malformed));
        assert_eq!(
            c.check_username("99999999999:", NOW),
            Err(Refusal::Malformed)
        );
        // Another secret, another password; two mints, two usernames.
        assert_ne!(Credentials::new("other", 3600).password(&user), pass);
        assert_ne!(c.mint(NOW).0, user);
    }

    #[test]
    fn the_integrity_key_is_md5_of_user_realm_password() {
        let c = Credentials::new("secret", 60);
        let user = "1800000060:abc";
        let expected: [u8; 16] =
            Md5::digest(format!("{user}:conclave:{}", c.password(user)).as_bytes()).into();
        assert_eq!(c.integrity_key(user), expected);
    }

    #[test]
    fn nonces_are_bound_to_the_client_and_expire() {
        let c = Credentials::new("secret", 60);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let nonce = c.nonce(ip, NOW);
        assert!(c.nonce_ok(&nonce, ip, NOW + 10));
        assert!(!c.nonce_ok(&nonce, "10.0.0.2".parse().unwrap(), NOW));
        assert!(!c.nonce_ok(&nonce, ip, NOW + NONCE_LIFETIME_SECS));
        assert!(!c.nonce_ok("garbage", ip, NOW));
        assert!(!c.nonce_ok("ffffffffffffffff-00", ip, NOW));
    }
}
