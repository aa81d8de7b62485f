//! Conclave: a Matrix application service, a LiveKit-compatible token service and an embedded
//! SFU in one binary. See `docs/ARCHITECTURE.md` for the data flow.

pub mod auth;
pub mod bridge;
pub mod calls;
pub mod cascade;
pub mod cli;
pub mod clock;
pub mod config;
pub mod http;
pub mod matrix;
pub mod metrics;
pub mod net;
pub mod plumbing;
pub mod secrets;
pub mod sfu;
pub mod signal;
pub mod store;
pub mod turn;
pub mod webhook;

pub mod serve;

pub use serve::{run, RunError};
