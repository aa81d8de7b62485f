//! The Matrix side: the appservice API the homeserver calls, the client Conclave uses to call
//! the homeserver, and the registration that links the two.

pub mod appservice;
pub mod calls;
pub mod client;
pub mod delayed;
pub mod enforce;
pub mod notices;
pub mod registration;
pub mod supervise;
