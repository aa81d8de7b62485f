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
