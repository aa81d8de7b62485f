//! Fuzz target for RoomService (Twirp) request bodies: arbitrary bytes decoded as every
//! request type `src/http/twirp.rs` accepts, both as protobuf (`application/protobuf`, prost)
//! and as protojson (`application/json`, the pbjson serde impls of `livekit-protocol`), the
//! two ways `Encoding::decode` reads a body. Decoding must fail cleanly, never panic.
//!
//! Run: `cd fuzz && cargo +nightly fuzz run twirp_body corpus/twirp_body seeds/twirp_body`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livekit_protocol as lk;
use serde::de::DeserializeOwned;

/// Both decodings of `T`, as `Encoding::decode` in `src/http/twirp.rs` does them.
fn decode<T: prost::Message + Default + DeserializeOwned>(data: &[u8]) {
    let _ = T::decode(data);
    let _ = serde_json::from_slice::<T>(data);
}

fuzz_target!(|data: &[u8]| {
    decode::<lk::CreateRoomRequest>(data);
    decode::<lk::ListRoomsRequest>(data);
    decode::<lk::DeleteRoomRequest>(data);
    decode::<lk::UpdateRoomMetadataRequest>(data);
    decode::<lk::ListParticipantsRequest>(data);
    decode::<lk::RoomParticipantIdentity>(data); // GetParticipant, RemoveParticipant
    decode::<lk::MuteRoomTrackRequest>(data);
    decode::<lk::UpdateParticipantRequest>(data);
    decode::<lk::UpdateSubscriptionsRequest>(data);
    decode::<lk::SendDataRequest>(data);
});
