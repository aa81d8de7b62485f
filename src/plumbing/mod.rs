//! Plumbing written once for the whole service: the outbound HTTP client factory (one CA
//! policy, one redirect policy, one destination policy), the capped response body reader, a
//! bounded TTL cache, a token-bucket rate limiter, and exponential backoff. No module above
//! reimplements these.
//!
//! Imports nothing from the rest of the crate.

pub mod backoff;
pub mod body;
pub mod destination;
pub mod http_client;
pub mod rate_limit;
pub mod ttl_cache;

pub use backoff::Backoff;
pub use body::{read_capped, BodyError};
pub use destination::{DestinationPolicy, RefusedDestination};
pub use http_client::{
    error_cause, ClientOptions, HttpClientError, HttpClients, RedirectRefused, Redirects,
};
pub use rate_limit::RateLimiter;
pub use ttl_cache::TtlCache;

/// Raises this process's soft open-file limit to its hard limit: tests that hold both ends
/// of hundreds of connections need a thousand descriptors (a soft limit may be 1024).
#[cfg(test)]
pub(crate) fn raise_fd_limit() {
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
