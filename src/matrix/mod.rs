//! The link to Matrix: the client Conclave uses to call its homeserver, the registration the
//! homeserver loads, and lk-jwt-service's naming of SFU rooms and identities after Matrix
//! rooms and users. Holds no state; the appservice endpoints are in `http`, what follows from
//! them in `calls`.

pub mod client;
pub mod naming;
pub mod registration;
