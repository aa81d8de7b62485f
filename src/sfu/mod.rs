//! The SFU: room registry now; the sans-IO media core lands here next.
#![warn(missing_docs)]

pub mod registry;
