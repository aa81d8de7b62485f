//! Fuzz target for the token service's request bodies: arbitrary bytes as the JSON body of
//! `POST /get_token` (`TokenRequest`) and of the legacy `POST /sfu/get` (`LegacyRequest`).
//! Deserialising must fail cleanly, never panic.
//!
//! Run: `cd fuzz && cargo +nightly fuzz run token_request corpus/token_request seeds/token_request`.
#![no_main]

use conclave::auth::tokens::{LegacyRequest, TokenRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<TokenRequest>(data);
    let _ = serde_json::from_slice::<LegacyRequest>(data);
});
