//! LiveKit signalling over WebSocket (`/rtc`) and the validate endpoints SDKs call around it.
#![warn(missing_docs)]

pub mod validate;
pub mod ws;
