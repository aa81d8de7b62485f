//! Fuzz target for `/rtc/v1`'s `join_request` query parameter: arbitrary bytes decoded as the
//! parameter's text (base64 → `WrappedJoinRequest` → gunzip → `JoinRequest`) and, so that the
//! inner layers are reached without the base64 in the way, as the `WrappedJoinRequest`
//! protobuf itself. Decoding must fail cleanly, never panic, and never inflate past its 1 MiB
//! cap (a runaway inflate shows as a timeout or an out-of-memory finding).
//!
//! Run: `cd fuzz && cargo +nightly fuzz run join_request corpus/join_request seeds/join_request`.
#![no_main]

use conclave::signal::join_request::{decode, decode_wrapped};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // axum hands the handler the percent-decoded parameter as a `String`.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decode(text);
    }
    let _ = decode_wrapped(data);
});
