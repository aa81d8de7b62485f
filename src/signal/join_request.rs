//! The `join_request` query parameter of `/rtc/v1` and `/rtc/v1/validate`: a LiveKit
//! `JoinRequest` (client info, connection settings, metadata, attributes, the first publisher
//! offer) where v0 has separate query parameters.
//!
//! Layers, outermost first (`livekit_rtc.proto` `WrappedJoinRequest`):
//!
//! ```text
//! base64url( WrappedJoinRequest{ compression: NONE | GZIP, join_request: bytes } )
//! join_request = JoinRequest protobuf, gzip'd iff compression == GZIP
//! ```
//!
//! Every failure is a 400 whose text is LiveKit's (`rtcservice.go`), so a client's log reads
//! the same against Conclave as against LiveKit. The decoded request is at most
//! [`MAX_JOIN_REQUEST_BYTES`] long, gzip'd or not; a gzip stream is inflated through a
//! `take` and never past that bound.

use std::collections::HashMap;
use std::io::Read;

use axum::http::StatusCode;
use base64::alphabet::URL_SAFE;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use flate2::read::MultiGzDecoder;
use livekit_protocol as lk;
use lk::wrapped_join_request::Compression;
use prost::Message as _;

use super::validate::ConnectRefusal;

/// The query parameter's name.
pub const PARAM: &str = "join_request";

/// Largest `JoinRequest`, in bytes, after decompression: LiveKit's bound
/// (`http.DefaultMaxHeaderBytes`, 1 MiB), for NONE and GZIP alike. A real one is a few KB
/// gzip'd and 10-15 KB without (an SDP offer with seven m-lines).
pub const MAX_JOIN_REQUEST_BYTES: usize = 1 << 20;

/// URL-safe base64 that also takes unpadded input. JS sends the padding (`=`, percent-encoded
/// in the URL), Rust sends it, and other clients may not: LiveKit (Go `base64.URLEncoding`)
/// requires it, Conclave is lenient. Non-zero trailing bits are accepted, as Go does.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Why a `join_request` was refused; the message is LiveKit's text where LiveKit has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinRequestError {
    /// The parameter is absent or empty (v1 needs it).
    #[error("join_request is required")]
    Missing,
    /// Not base64, in either alphabet.
    #[error("cannot base64 decode wrapped join request")]
    Base64,
    /// The base64 decodes, but not to a `WrappedJoinRequest`.
    #[error("cannot unmarshal wrapped join request")]
    Wrapped,
    /// A compression other than NONE and GZIP.
    #[error("unknown join request compression")]
    UnknownCompression,
    /// GZIP, but the bytes are not a (complete) gzip stream.
    #[error("cannot read decompressed join request")]
    Gzip,
    /// More than [`MAX_JOIN_REQUEST_BYTES`] once decompressed.
    #[error("join request too large")]
    TooLarge,
    /// The (decompressed) bytes are not a `JoinRequest`.
    #[error("cannot unmarshal join request")]
    JoinRequest,
}

impl JoinRequestError {
    /// The HTTP status the connect is refused with: always 400, as LiveKit.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

impl From<JoinRequestError> for ConnectRefusal {
    fn from(e: JoinRequestError) -> Self {
        ConnectRefusal {
            status: e.status(),
            message: e.to_string(),
        }
    }
}

/// The `join_request` of a connect's query (already percent-decoded, as axum's `Query` gives
/// it), decoded; [`JoinRequestError::Missing`] when there is none.
pub fn from_query(query: &HashMap<String, String>) -> Result<lk::JoinRequest, JoinRequestError> {
    decode(query.get(PARAM).map(String::as_str).unwrap_or(""))
}

/// Decodes a `join_request` value: base64 (URL-safe or standard alphabet, padded or not), then
/// [`decode_wrapped`]. An empty value is [`JoinRequestError::Missing`] (LiveKit cannot tell
/// it from an absent one either).
pub fn decode(param: &str) -> Result<lk::JoinRequest, JoinRequestError> {
    if param.is_empty() {
        return Err(JoinRequestError::Missing);
    }
    // Both alphabets: the standard one's `+` and `/` become the URL-safe `-` and `_`. A `+`
    // sent without percent-encoding arrives as a space (form decoding), so a space is a `+`
    // too; none of the three is valid in the other alphabet, so nothing valid is changed.
    let url_safe: Vec<u8> = param
        .bytes()
        .map(|b| match b {
            b'+' | b' ' => b'-',
            b'/' => b'_',
            b => b,
        })
        .collect();
    let wrapped = BASE64
        .decode(url_safe)
        .map_err(|_| JoinRequestError::Base64)?;
    decode_wrapped(&wrapped)
}

/// Decodes a `WrappedJoinRequest`'s protobuf bytes: unwraps, decompresses (at most
/// [`MAX_JOIN_REQUEST_BYTES`]) and decodes the `JoinRequest`.
pub fn decode_wrapped(bytes: &[u8]) -> Result<lk::JoinRequest, JoinRequestError> {
    let wrapped = lk::WrappedJoinRequest::decode(bytes).map_err(|_| JoinRequestError::Wrapped)?;
    // Refused rather than read as NONE: LiveKit leaves the request empty (a join without the
    // client's settings or offer), which would fail later and less clearly.
    let compression = Compression::try_from(wrapped.compression)
        .map_err(|_| JoinRequestError::UnknownCompression)?;
    let plain = match compression {
        Compression::None => {
            if wrapped.join_request.len() > MAX_JOIN_REQUEST_BYTES {
                return Err(JoinRequestError::TooLarge);
            }
            wrapped.join_request
        }
        // Multi-member, as Go's `gzip.Reader` (LiveKit) reads by default; clients send one.
        Compression::Gzip => read_capped(MultiGzDecoder::new(wrapped.join_request.as_slice()))?,
    };
    lk::JoinRequest::decode(plain.as_slice()).map_err(|_| JoinRequestError::JoinRequest)
}

/// Reads `r` to its end, but never more than one byte past [`MAX_JOIN_REQUEST_BYTES`]: a gzip
/// bomb (a few KB inflating to gigabytes) costs at most that much memory and inflation work.
fn read_capped(r: impl Read) -> Result<Vec<u8>, JoinRequestError> {
    let mut out = Vec::new();
    r.take(MAX_JOIN_REQUEST_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| JoinRequestError::Gzip)?;
    if out.len() > MAX_JOIN_REQUEST_BYTES {
        return Err(JoinRequestError::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use base64::engine::general_purpose::{STANDARD, URL_SAFE as RUST_URL_SAFE, URL_SAFE_NO_PAD};
    use flate2::write::GzEncoder;

    use super::*;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn wrap(compression: Compression, join_request: Vec<u8>) -> Vec<u8> {
        lk::WrappedJoinRequest {
            compression: compression as i32,
            join_request,
        }
        .encode_to_vec()
    }

    /// A request like the SDKs' (client info, settings, metadata, an attribute, an offer).
    fn request(metadata: &str) -> lk::JoinRequest {
        lk::JoinRequest {
            client_info: Some(lk::ClientInfo {
                sdk: lk::client_info::Sdk::Js as i32,
                protocol: 16,
                client_protocol: 1,
                ..Default::default()
            }),
            connection_settings: Some(lk::ConnectionSettings {
                auto_subscribe: true,
                adaptive_stream: true,
                ..Default::default()
            }),
            metadata: metadata.to_owned(),
            participant_attributes: HashMap::from([("k".to_owned(), "v".to_owned())]),
            publisher_offer: Some(lk::SessionDescription {
                r#type: "offer".into(),
                sdp: "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n".into(),
                id: 1,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// What client-sdk-js sends: gzip, `btoa`, `+/` swapped for `-_`, padding kept.
    fn js_style(req: &lk::JoinRequest) -> String {
        let wrapped = wrap(Compression::Gzip, gzip(&req.encode_to_vec()));
        STANDARD.encode(wrapped).replace('+', "-").replace('/', "_")
    }

    #[test]
    fn js_style_gzip_padded_and_percent_encoded_in_the_url() {
        // Metadata lengths until the encoding needs padding.
        let (req, encoded) = (0..3)
            .map(|n| {
                let req = request(&"m".repeat(n));
                let encoded = js_style(&req);
                (req, encoded)
            })
            .find(|(_, e)| e.ends_with('='))
            .unwrap();
        assert_eq!(decode(&encoded).unwrap(), req);
        // Through the URL, as the browser sends it: `URLSearchParams` writes `=` as `%3D`.
        let uri: axum::http::Uri = format!(
            "/rtc/v1?access_token=t&{PARAM}={}",
            encoded.replace('=', "%3D")
        )
        .parse()
        .unwrap();
        let axum::extract::Query(query) =
            axum::extract::Query::<HashMap<String, String>>::try_from_uri(&uri).unwrap();
        assert_eq!(from_query(&query).unwrap(), req);
    }

    #[test]
    fn rust_style_url_safe_padded() {
        let req = request("rust");
        // The Rust SDK gzips only when that is smaller; both ways decode.
        for wrapped in [
            wrap(Compression::None, req.encode_to_vec()),
            wrap(Compression::Gzip, gzip(&req.encode_to_vec())),
        ] {
            assert_eq!(decode(&RUST_URL_SAFE.encode(wrapped)).unwrap(), req);
        }
    }

    #[test]
    fn unpadded_and_standard_alphabet() {
        let req = request("x");
        let wrapped = wrap(Compression::None, req.encode_to_vec());
        assert_eq!(decode(&URL_SAFE_NO_PAD.encode(&wrapped)).unwrap(), req);
        // The standard alphabet, percent-encoded (`+` arrives as `+`) or not (as a space).
        let (req, standard) = (0..200)
            .map(|n| {
                let req = request(&format!("{n}~~~??>>>"));
                let s = STANDARD.encode(wrap(Compression::None, req.encode_to_vec()));
                (req, s)
            })
            .find(|(_, s)| s.contains('+') && s.contains('/'))
            .unwrap();
        assert_eq!(decode(&standard).unwrap(), req);
        assert_eq!(decode(&standard.replace('+', " ")).unwrap(), req);
    }

    #[test]
    fn none_and_gzip_give_the_same_request() {
        let req = request("same");
        let none = decode_wrapped(&wrap(Compression::None, req.encode_to_vec())).unwrap();
        let gz = decode_wrapped(&wrap(Compression::Gzip, gzip(&req.encode_to_vec()))).unwrap();
        assert_eq!(none, req);
        assert_eq!(gz, req);
        // An empty JoinRequest is a valid one (every field has a default).
        let empty = decode_wrapped(&wrap(Compression::None, Vec::new())).unwrap();
        assert_eq!(empty, lk::JoinRequest::default());
    }

    /// A `JoinRequest` of exactly `len` protobuf bytes (its metadata filling it up).
    fn request_of_len(len: usize) -> Vec<u8> {
        let mut meta = len - 5;
        loop {
            let bytes = lk::JoinRequest {
                metadata: "m".repeat(meta),
                ..Default::default()
            }
            .encode_to_vec();
            match bytes.len().cmp(&len) {
                std::cmp::Ordering::Equal => return bytes,
                std::cmp::Ordering::Greater => meta -= 1,
                std::cmp::Ordering::Less => meta += 1,
            }
        }
    }

    #[test]
    fn one_mib_is_accepted_one_byte_more_is_too_large() {
        let max = request_of_len(MAX_JOIN_REQUEST_BYTES);
        let over = request_of_len(MAX_JOIN_REQUEST_BYTES + 1);
        for compression in [Compression::None, Compression::Gzip] {
            let w = |b: &[u8]| match compression {
                Compression::None => wrap(compression, b.to_vec()),
                Compression::Gzip => wrap(compression, gzip(b)),
            };
            assert!(decode_wrapped(&w(&max)).is_ok(), "{compression:?}");
            assert_eq!(
                decode_wrapped(&w(&over)),
                Err(JoinRequestError::TooLarge),
                "{compression:?}"
            );
        }
    }

    #[test]
    fn a_gzip_bomb_is_refused_after_one_mib() {
        // 64 MiB of zeros in about 64 KB (the most a URL carries to Conclave): refused.
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        let param = RUST_URL_SAFE.encode(wrap(Compression::Gzip, bomb));
        assert_eq!(decode(&param), Err(JoinRequestError::TooLarge));
    }

    #[test]
    fn an_endless_stream_is_read_only_to_the_cap() {
        // Were the read unbounded this would never return: the cap, not the input, ends it.
        assert_eq!(
            read_capped(std::io::repeat(0)),
            Err(JoinRequestError::TooLarge)
        );
    }

    #[test]
    fn garbage_at_each_layer() {
        let cases: Vec<(String, JoinRequestError)> = vec![
            (String::new(), JoinRequestError::Missing),
            ("!!!!".into(), JoinRequestError::Base64),
            ("a".into(), JoinRequestError::Base64),
            ("ab=c".into(), JoinRequestError::Base64),
            (
                RUST_URL_SAFE.encode([0xff, 0xff, 0xff]),
                JoinRequestError::Wrapped,
            ),
            (
                RUST_URL_SAFE.encode(wrap(Compression::None, vec![0x1a, 0x05, b'a'])),
                JoinRequestError::JoinRequest,
            ),
            (
                RUST_URL_SAFE.encode(wrap(Compression::Gzip, b"not gzip at all".to_vec())),
                JoinRequestError::Gzip,
            ),
            (
                RUST_URL_SAFE.encode(wrap(Compression::Gzip, {
                    let mut g = gzip(&request("cut").encode_to_vec());
                    g.truncate(g.len() - 6);
                    g
                })),
                JoinRequestError::Gzip,
            ),
            (
                RUST_URL_SAFE.encode(wrap(Compression::Gzip, gzip(&[0x1a, 0x05, b'a']))),
                JoinRequestError::JoinRequest,
            ),
            (
                RUST_URL_SAFE.encode(
                    lk::WrappedJoinRequest {
                        compression: 7,
                        join_request: request("x").encode_to_vec(),
                    }
                    .encode_to_vec(),
                ),
                JoinRequestError::UnknownCompression,
            ),
        ];
        for (param, want) in cases {
            assert_eq!(decode(&param), Err(want), "{param:?}");
        }
        assert_eq!(from_query(&HashMap::new()), Err(JoinRequestError::Missing));
    }

    /// The fuzz target's seeds (`fuzz/seeds/generate.py`) are valid requests, so that the
    /// fuzzer starts from inside every layer: text ones through [`decode`], `*.pb` ones (the
    /// wrapped protobuf) through [`decode_wrapped`].
    #[test]
    fn the_fuzz_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/join_request");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let decoded = if path.extension().is_some_and(|e| e == "pb") {
                decode_wrapped(&bytes)
            } else {
                decode(std::str::from_utf8(&bytes).unwrap())
            };
            assert!(decoded.is_ok(), "{}: {decoded:?}", path.display());
            seen += 1;
        }
        assert!(seen >= 4, "{seen} seeds in {}", dir.display());
    }

    #[test]
    fn every_error_is_a_400_with_livekits_text() {
        let r = ConnectRefusal::from(JoinRequestError::Base64);
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.message, "cannot base64 decode wrapped join request");
        for e in [
            JoinRequestError::Missing,
            JoinRequestError::Wrapped,
            JoinRequestError::UnknownCompression,
            JoinRequestError::Gzip,
            JoinRequestError::TooLarge,
            JoinRequestError::JoinRequest,
        ] {
            assert_eq!(ConnectRefusal::from(e).status, StatusCode::BAD_REQUEST);
        }
        assert_eq!(
            JoinRequestError::Missing.to_string(),
            "join_request is required"
        );
    }
}
