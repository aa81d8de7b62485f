//! OpenID token verification over federation:
//! `GET https://<server>/_matrix/federation/v1/openid/userinfo?access_token=…` on the server the
//! token names, found by [`discovery`](super::discovery). A homeserver vouches only for its own
//! users. Verified tokens are cached (bounded) until they expire; requests to one destination
//! are bounded in concurrency and time.
//!
//! Anyone may name any server, so every request is hardened: bodies are capped while they
//! stream ([`MAX_BODY_BYTES`]), redirects are followed only to `https` on the same host and
//! port (at most 3), loopback/private/link-local destinations are refused unless
//! `auth.allow_private_federation` (checked on the addresses actually connected to), and the
//! per-destination state is bounded and expires. Errors name the server, never what it
//! answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ruma::{OwnedUserId, ServerName, UserId};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::discovery::{self, Destination, NetLookup, SrvAwareResolver};
use super::AuthError;
use crate::plumbing::{
    error_cause, read_capped, BodyError, ClientOptions, DestinationPolicy, HttpClients,
    RedirectRefused, Redirects, RefusedDestination, TtlCache,
};

/// Most verified tokens kept in the cache.
pub const CACHE_CAPACITY: usize = 10_000;
/// Longest a verified token is trusted without asking again.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);
/// Concurrent userinfo requests per destination server.
pub const PER_DESTINATION_CONCURRENCY: usize = 8;
/// Largest accepted userinfo body (it holds one user ID).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Redirects followed (same host and port, `https` only).
pub const MAX_REDIRECTS: usize = 3;
/// How long a resolved destination is reused.
pub const DESTINATION_TTL: Duration = Duration::from_secs(3600);
/// Most resolved destinations kept.
pub const DESTINATION_CAPACITY: usize = 10_000;

/// Per-server concurrency limits. An entry exists only while a request to that server is in
/// flight or waiting: [`LimitGuard`] removes it when the last one ends.
type Limits = Mutex<HashMap<String, Arc<Semaphore>>>;

/// Verifies OpenID tokens against their issuing homeserver.
pub struct OpenIdVerifier {
    http: reqwest::Client,
    lookup: NetLookup,
    resolver: SrvAwareResolver,
    policy: DestinationPolicy,
    timeout: Duration,
    tokens: Mutex<TtlCache<[u8; 32], OwnedUserId>>,
    destinations: Mutex<TtlCache<String, Destination>>,
    limits: Limits,
}

/// A request's hold on its server's concurrency limit; the last one out removes the entry.
struct LimitGuard<'a> {
    limits: &'a Limits,
    key: String,
    semaphore: Arc<Semaphore>,
}

impl Drop for LimitGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut limits) = self.limits.lock() {
            // The map's reference and ours: nobody else holds or waits for this server.
            if Arc::strong_count(&self.semaphore) <= 2 {
                limits.remove(&self.key);
            }
        }
    }
}

impl OpenIdVerifier {
    /// A verifier whose HTTPS trusts the roots of `clients`, giving up on a server after
    /// `timeout` and connecting only to the addresses `policy` allows.
    pub fn new(
        clients: &HttpClients,
        timeout: Duration,
        policy: DestinationPolicy,
    ) -> Result<Self, AuthError> {
        let resolver = SrvAwareResolver::default();
        let options = ClientOptions {
            connect_timeout: timeout,
            read_timeout: Some(timeout),
            timeout,
            redirects: Redirects::SameHostHttps(MAX_REDIRECTS),
            https_only: true,
            destinations: Some(policy),
        };
        let http = clients
            .client_with_resolver(options, Arc::new(resolver.clone()))
            .map_err(|e| AuthError::Internal(format!("HTTP client: {e}")))?;
        Ok(Self {
            lookup: NetLookup::new(http.clone()),
            http,
            resolver,
            policy,
            timeout,
            tokens: Mutex::new(TtlCache::new(CACHE_CAPACITY)),
            destinations: Mutex::new(TtlCache::new(DESTINATION_CAPACITY)),
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

    /// Records a verified token for `ttl` (at most [`MAX_CACHE_TTL`]).
    fn remember(
        &self,
        server_name: &ServerName,
        access_token: &str,
        user_id: OwnedUserId,
        ttl: Duration,
        now: Instant,
    ) {
        let key = Self::cache_key(server_name, access_token);
        if let Ok(mut cache) = self.tokens.lock() {
            cache.insert(key, user_id, ttl.min(MAX_CACHE_TTL), now);
        }
    }

    fn cached(
        &self,
        server_name: &ServerName,
        access_token: &str,
        now: Instant,
    ) -> Option<OwnedUserId> {
        let key = Self::cache_key(server_name, access_token);
        self.tokens.lock().ok()?.get(&key, now)
    }

    /// Number of cached tokens (for tests and metrics).
    pub fn cache_len(&self) -> usize {
        self.tokens.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Entries held in every table keyed by server or host name: resolved destinations, SRV
    /// targets and per-server concurrency limits (for tests and bounds checks). At most
    /// [`DESTINATION_CAPACITY`] + [`discovery::OVERRIDE_CAPACITY`] + the requests in flight.
    pub fn destination_state_len(&self) -> usize {
        let destinations = self.destinations.lock().map(|m| m.len()).unwrap_or(0);
        let limits = self.limits.lock().map(|m| m.len()).unwrap_or(0);
        destinations + limits + self.resolver.len()
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
        let cached = self.destinations.lock().ok().and_then(|m| m.get(&key, now));
        let d = match cached {
            Some(d) => d,
            None => {
                let d = discovery::resolve(&self.lookup, server_name).await;
                if let Ok(mut m) = self.destinations.lock() {
                    m.insert(key, d.clone(), DESTINATION_TTL, now);
                }
                d
            }
        };
        // Set on every use: the SRV table may have dropped it (bounded) before the destination
        // expired.
        if let Some(target) = &d.connect_host {
            self.resolver.set_override(&d.host, target, now);
        }
        d
    }

    /// `server_name`'s concurrency limit, held until the guard drops.
    fn limit_for(&self, server_name: &ServerName) -> LimitGuard<'_> {
        let key = server_name.to_string();
        let semaphore = match self.limits.lock() {
            Ok(mut limits) => limits
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(PER_DESTINATION_CONCURRENCY)))
                .clone(),
            Err(_) => Arc::new(Semaphore::new(PER_DESTINATION_CONCURRENCY)),
        };
        LimitGuard {
            limits: &self.limits,
            key,
            semaphore,
        }
    }

    /// Maps a failed request to the caller's error (naming the server only) and logs why.
    fn request_error(server_name: &ServerName, e: reqwest::Error) -> AuthError {
        let server = server_name.to_string();
        if let Some(refused) = error_cause::<RefusedDestination>(&e) {
            tracing::info!(%server_name, reason = %refused, "federation destination refused");
            AuthError::HomeserverNotAllowed(server)
        } else if let Some(refused) = error_cause::<RedirectRefused>(&e) {
            tracing::info!(%server_name, reason = %refused, "homeserver redirect not followed");
            AuthError::HomeserverRedirected(server)
        } else if e.is_timeout() {
            AuthError::HomeserverTimeout(server)
        } else {
            // The URL carries the OpenID token: never log it.
            tracing::warn!(%server_name, error = %e.without_url(), "OpenID userinfo request failed");
            AuthError::HomeserverUnreachable(server)
        }
    }

    async fn query(
        &self,
        server_name: &ServerName,
        access_token: &str,
        now: Instant,
    ) -> Result<OwnedUserId, AuthError> {
        let dest = self.destination(server_name, now).await;
        let mut url = reqwest::Url::parse(&format!(
            "{}/_matrix/federation/v1/openid/userinfo",
            dest.base_url()
        ))
        .map_err(|e| AuthError::Internal(format!("userinfo URL: {e}")))?;
        // reqwest connects to IP literals without the resolver, which checks names.
        if let Err(refused) = self.policy.check_url(&url) {
            tracing::info!(%server_name, reason = %refused, "federation destination refused");
            return Err(AuthError::HomeserverNotAllowed(server_name.to_string()));
        }
        url.query_pairs_mut()
            .append_pair("access_token", access_token);
        let limit = self.limit_for(server_name);
        // Declared after the guard, so released before the guard checks who still needs it.
        let _permit = limit
            .semaphore
            .acquire()
            .await
            .map_err(|_| AuthError::Internal("semaphore closed".into()))?;
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| Self::request_error(server_name, e))?;
        let status = resp.status();
        if status.is_success() {
            #[derive(serde::Deserialize)]
            struct UserInfo {
                sub: String,
            }
            let server = server_name.to_string();
            let body = read_capped(resp, MAX_BODY_BYTES)
                .await
                .map_err(|e| match e {
                    BodyError::TooLarge { limit } => {
                        tracing::info!(%server_name, limit, "OpenID userinfo body over the cap");
                        AuthError::HomeserverResponseTooLarge(server.clone())
                    }
                    BodyError::Timeout => AuthError::HomeserverTimeout(server.clone()),
                    BodyError::Read(_) => AuthError::HomeserverUnreachable(server.clone()),
                })?;
            let info: UserInfo = serde_json::from_slice(&body)
                .map_err(|_| AuthError::HomeserverBadResponse(server.clone()))?;
            UserId::parse(&info.sub).map_err(|_| AuthError::HomeserverBadResponse(server))
        } else if status.is_client_error() {
            tracing::info!(%server_name, %status, "homeserver did not accept the OpenID token");
            Err(AuthError::Unauthorized(format!(
                "{server_name} did not accept the OpenID token"
            )))
        } else {
            tracing::info!(%server_name, %status, "OpenID userinfo failed on the homeserver");
            Err(AuthError::HomeserverBadResponse(server_name.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cache_is_bounded_and_expires() {
        let v = OpenIdVerifier::new(
            &HttpClients::default(),
            Duration::from_secs(1),
            DestinationPolicy::default(),
        )
        .unwrap();
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
        let v = OpenIdVerifier::new(
            &HttpClients::default(),
            Duration::from_secs(2),
            DestinationPolicy::new(true),
        )
        .unwrap();
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
        // Only the resolved destination is kept; the per-server limit left with the request.
        assert_eq!(v.destination_state_len(), 1);
    }

    #[tokio::test]
    async fn private_destinations_are_refused_by_default_without_connecting() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let v = OpenIdVerifier::new(
            &HttpClients::default(),
            Duration::from_secs(2),
            DestinationPolicy::default(),
        )
        .unwrap();
        for name in [
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
            format!("localhost:{port}"),
        ] {
            let server = ServerName::parse(&name).unwrap();
            let err = v
                .verify(&server, "tok", None, Instant::now())
                .await
                .unwrap_err();
            assert!(
                matches!(err, AuthError::HomeserverNotAllowed(_)),
                "{name}: {err:?}"
            );
        }
        assert!(listener.accept().is_err(), "nothing connected");
    }

    #[tokio::test]
    async fn concurrency_limits_exist_only_while_requests_are_in_flight() {
        let v = OpenIdVerifier::new(
            &HttpClients::default(),
            Duration::from_secs(1),
            DestinationPolicy::default(),
        )
        .unwrap();
        let a = ServerName::parse("a.example").unwrap();
        let first = v.limit_for(&a);
        let second = v.limit_for(&a);
        assert!(Arc::ptr_eq(&first.semaphore, &second.semaphore));
        assert_eq!(v.limits.lock().unwrap().len(), 1);
        drop(first);
        assert_eq!(
            v.limits.lock().unwrap().len(),
            1,
            "still held by the second"
        );
        drop(second);
        assert_eq!(v.limits.lock().unwrap().len(), 0);
    }
}
