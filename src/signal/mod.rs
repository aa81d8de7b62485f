//! LiveKit signalling over WebSocket. For now the validate endpoints that SDKs call before and
//! after a failed WebSocket upgrade.
#![warn(missing_docs)]

pub mod validate;
