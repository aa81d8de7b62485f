//! Fuzz target for appservice transactions: arbitrary bytes parsed as the body of
//! `PUT /_matrix/app/v1/transactions/{txnId}` exactly as `src/http/appservice.rs` does (JSON
//! value first, then `{"events": [Raw<AnyTimelineEvent>]}`), and the events turned into store
//! effects by `calls::events::transaction_effects`, which must skip what it cannot use and
//! never panic.
//!
//! Run: `cd fuzz && cargo +nightly fuzz run appservice_txn corpus/appservice_txn seeds/appservice_txn`.
#![no_main]

use conclave::calls::events::transaction_effects;
use conclave::metrics::Metrics;
use libfuzzer_sys::fuzz_target;
use ruma::events::AnyTimelineEvent;
use ruma::serde::Raw;
use serde::Deserialize;

/// The same shape as the (private) `TransactionBody` of `src/http/appservice.rs`.
#[derive(Deserialize)]
struct TransactionBody {
    #[serde(default)]
    events: Vec<Raw<AnyTimelineEvent>>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(body) = serde_json::from_value::<TransactionBody>(value) else {
        return;
    };
    // `now_ms` = 0: no membership has expired on arrival, so joins go all the way through.
    let _ = transaction_effects(&Metrics::default(), &body.events, 0);
});
