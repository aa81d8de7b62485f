//! The SFU: a sans-IO engine for rooms, participants, published tracks, subscriptions and
//! forwarding, plus the room registry the token service fills.
//!
//! # Contract (str0m's single-mutation invariant, one level up)
//!
//! The engine never reads the clock and never touches a socket. Its caller:
//! 1. feeds one input: [`Sfu::handle_command`], [`Sfu::handle_datagram`] (or
//!    [`Sfu::handle_packet`] for ICE-TCP frames) or [`Sfu::handle_timeout`], each with `now`;
//!    or several datagrams in a row (those already waiting): the sending connection of each
//!    is polled at once, the connections their media and data were written to once, at the
//!    next [`Sfu::poll_output`] (a subscriber's poll then serves every packet of the batch);
//! 2. drains [`Sfu::poll_output`] until it returns [`Output::Timeout`] (always before
//!    waiting: until then, written media has not left);
//! 3. sends every [`Output::Transmit`] and routes every [`Output::Signal`] to its session;
//! 4. waits for the next datagram, command or the returned timeout, and starts again.
//!
//! Signal messages are LiveKit protobuf *values* (`livekit_protocol` types are the data model
//! for participant and track info); framing, WebSockets and JWTs belong to `signal`.
#![warn(missing_docs)]

pub mod allocate;
mod engine;
pub mod ids;
pub mod limits;
pub mod quality;
pub mod registry;
pub mod relays;
pub mod rewrite;
pub mod simulcast;
pub mod stun;

pub use relays::{RelayAddresses, RelayVia};

pub use engine::{
    CascadeRole, Command, IpProto, Join, Output, Ping, RelayedTrack, SessionId, Sfu, SfuConfig,
    SfuEvent, SfuStats, SignalOut, Transmit,
};
