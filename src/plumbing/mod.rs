//! Plumbing written once for the whole service: the outbound HTTP client factory (one CA
//! policy), the capped response body reader, a bounded TTL cache, and exponential backoff. No
//! module above reimplements these.
//!
//! Imports nothing from the rest of the crate.

pub mod backoff;
pub mod body;
pub mod http_client;
pub mod ttl_cache;

pub use backoff::Backoff;
pub use body::{read_capped, BodyError};
pub use http_client::{ClientOptions, HttpClientError, HttpClients};
pub use ttl_cache::TtlCache;
