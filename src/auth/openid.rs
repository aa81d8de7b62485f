//! OpenID token verification over federation:
//! `GET https://<server>/_matrix/federation/v1/openid/userinfo?access_token=…` on the server the
//! token names, found by [`discovery`](super::discovery). A homeserver vouches only for its own
//! users. Verified tokens are cached (bounded) until they expire; requests to one destination
//! are bounded in concurrency and time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ruma::{OwnedUserId, ServerName, UserId};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::discovery::{self, Destination, NetLookup, SrvAwareResolver};
use super::AuthError;

/// Most verified tokens kept in the cache.
pub const CACHE_CAPACITY: usize = 10_000;
/// Longest a verified token is trusted without asking again.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);
/// Concurrent userinfo requests per destination server.
pub const PER_DESTINATION_CONCURRENCY: usize = 8;
/// How long a resolved destination is reused.
const DESTINATION_TTL: Duration = Duration::from_secs(3600);

struct CacheEntry {
    user_id: OwnedUserId,
    expires: Instant,
}

/// Verifies OpenID tokens against their issuing homeserver.
pub struct OpenIdVerifier {
    http: reqwest::Client,
    lookup: NetLookup,
    resolver: SrvAwareResolver,
    timeout: Duration,
    tokens: Mutex<HashMap<[u8; 32], CacheEntry>>,
    destinations: Mutex<HashMap<String, (Destination, Instant)>>,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl OpenIdVerifier {
    /// A verifier whose HTTPS trusts the system roots plus `extra_ca` (PEM bundle), giving up
    /// on a server after `timeout`.
    pub fn new(extra_ca: Option<&[u8]>, timeout: Duration) -> Result<Self, AuthError> {
        let resolver = SrvAwareResolver::default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .dns_resolver(Arc::new(resolver.clone()))
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("conclave/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = extra_ca {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| AuthError::Internal(format!("extra CA is not PEM: {e}")))?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| AuthError::Internal(format!("HTTP client: {e}")))?;
        Ok(Self {
            lookup: NetLookup::new(http.clone()),
            http,
            resolver,
            timeout,
            tokens: Mutex::new(HashMap::new()),
            destinations: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
        })
    }

    fn cache_key(server_name: &ServerName, access_token: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(server_name.as_bytes());
        h.update([0]);
        h.update(access_token.as_bytes());
        h.finalize().into()
    }

    /// Records a verified token.
    pub fn remember(
        &self,
        server_name: &ServerName,
        access_token: &str,
        user_id: OwnedUserId,
        ttl: Duration,
        now: Instant,
    ) {
        let key = Self::cache_key(server_name, access_token);
        let Ok(mut cache) = self.tokens.lock() else {
            return;
        };
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= CACHE_CAPACITY {
                // Still full of live entries: drop the ones closest to expiry.
                let mut by_expiry: Vec<_> = cache.iter().map(|(k, e)| (e.expires, *k)).collect();
                by_expiry.sort();
                for (_, k) in by_expiry.into_iter().take(CACHE_CAPACITY / 10 + 1) {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            CacheEntry {
                user_id,
                expires: now + ttl.min(MAX_CACHE_TTL),
            },
        );
    }

    fn cached(
        &self,
        server_name: &ServerName,
        access_token: &str,
        now: Instant,
    ) -> Option<OwnedUserId> {
        let key = Self::cache_key(server_name, access_token);
        let cache = self.tokens.lock().ok()?;
        cache
            .get(&key)
            .filter(|e| e.expires > now)
            .map(|e| e.user_id.clone())
    }

    /// Number of cached tokens (for tests and metrics).
    pub fn cache_len(&self) -> usize {
        self.tokens.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Verifies `access_token` at `server_name`; returns the user it belongs to.
    ///
    /// `expires_in` (seconds, from the token) bounds how long the answer is cached.
    pub async fn verify(
        &self,
        server_name: &ServerName,
        access_token: &str,
        expires_in: Option<u64>,
        now: Instant,
    ) -> Result<OwnedUserId, AuthError> {
        if let Some(user) = self.cached(server_name, access_token, now) {
            return Ok(user);
        }
        let user = tokio::time::timeout(self.timeout, self.query(server_name, access_token, now))
            .await
            .map_err(|_| AuthError::HomeserverTimeout(server_name.to_string()))??;
        if user.server_name() != server_name {
            tracing::warn!(%server_name, user = %user, "homeserver vouched for a user of another server");
            return Err(AuthError::Unauthorized(
                "the homeserver vouched for a user of another server".into(),
            ));
        }
        let ttl = Duration::from_secs(expires_in.unwrap_or(300));
        self.remember(server_name, access_token, user.clone(), ttl, now);
        Ok(user)
    }

    async fn destination(&self, server_name: &ServerName, now: Instant) -> Destination {
        let key = server_name.to_string();
        if let Some((d, exp)) = self
            .destinations
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        {
            if exp > now {
                return d;
            }
        }
        let d = discovery::resolve(&self.lookup, server_name).await;
        if let Some(target) = &d.connect_host {
            self.resolver.set_override(&d.host, target);
        }
        if let Ok(mut m) = self.destinations.lock() {
            m.insert(key, (d.clone(), now + DESTINATION_TTL));
        }
        d
    }

    fn limit_for(&self, server_name: &ServerName) -> Arc<Semaphore> {
        let Ok(mut limits) = self.limits.lock() else {
            return Arc::new(Semaphore::new(PER_DESTINATION_CONCURRENCY));
        };
        limits
            .entry(server_name.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(PER_DESTINATION_CONCURRENCY)))
            .clone()
    }

    async fn query(
        &self,
        server_name: &ServerName,
        access_token: &str,
        now: Instant,
    ) -> Result<OwnedUserId, AuthError> {
        let dest = self.destination(server_name, now).await;
        let limit = self.limit_for(server_name);
        let _permit = limit
            .acquire()
            .await
            .map_err(|_| AuthError::Internal("semaphore closed".into()))?;
        let mut url = reqwest::Url::parse(&format!(
            "{}/_matrix/federation/v1/openid/userinfo",
            dest.base_url()
        ))
        .map_err(|e| AuthError::Internal(format!("userinfo URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("access_token", access_token);
        let resp = self.http.get(url).send().await.map_err(|e| {
            if e.is_timeout() {
                AuthError::HomeserverTimeout(server_name.to_string())
            } else {
                // The URL carries the OpenID token: never log it.
                tracing::warn!(%server_name, error = %e.without_url(), "OpenID userinfo request failed");
                AuthError::HomeserverUnreachable(server_name.to_string())
            }
        })?;
        let status = resp.status();
        if status.is_success() {
            #[derive(serde::Deserialize)]
            struct UserInfo {
                sub: String,
            }
            let body = resp
                .bytes()
                .await
                .map_err(|_| AuthError::HomeserverUnreachable(server_name.to_string()))?;
            let info: UserInfo = serde_json::from_slice(&body)
                .map_err(|_| AuthError::HomeserverBadResponse(server_name.to_string()))?;
            UserId::parse(&info.sub)
                .map_err(|_| AuthError::HomeserverBadResponse(server_name.to_string()))
        } else if status.is_client_error() {
            Err(AuthError::Unauthorized(format!(
                "{server_name} rejected the OpenID token ({status})"
            )))
        } else {
            Err(AuthError::HomeserverBadResponse(server_name.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cache_is_bounded_and_expires() {
        let v = OpenIdVerifier::new(None, Duration::from_secs(1)).unwrap();
        let server = ServerName::parse("example.org").unwrap();
        let user = UserId::parse("@a:example.org").unwrap();
        let t0 = Instant::now();
        v.remember(&server, "tok", user.clone(), Duration::from_secs(10), t0);
        assert_eq!(v.cached(&server, "tok", t0), Some(user.clone()));
        assert_eq!(v.cached(&server, "tok", t0 + Duration::from_secs(11)), None);
        assert_eq!(
            v.cached(&ServerName::parse("other.org").unwrap(), "tok", t0),
            None
        );
        for i in 0..(CACHE_CAPACITY + 50) {
            v.remember(
                &server,
                &format!("t{i}"),
                user.clone(),
                Duration::from_secs(10),
                t0,
            );
        }
        assert!(v.cache_len() <= CACHE_CAPACITY);
        // A claimed lifetime longer than the cap is cut to the cap.
        v.remember(
            &server,
            "long",
            user.clone(),
            Duration::from_secs(99_999),
            t0,
        );
        assert_eq!(
            v.cached(&server, "long", t0 + MAX_CACHE_TTL + Duration::from_secs(1)),
            None
        );
    }

    #[tokio::test]
    async fn unreachable_server_fails_fast_with_gateway_error() {
        // Nothing listens on this loopback port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let v = OpenIdVerifier::new(None, Duration::from_secs(2)).unwrap();
        let server = ServerName::parse(format!("127.0.0.1:{port}")).unwrap();
        let started = Instant::now();
        let err = v
            .verify(&server, "tok", None, Instant::now())
            .await
            .unwrap_err();
        assert!(
            matches!(err, AuthError::HomeserverUnreachable(_)),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
