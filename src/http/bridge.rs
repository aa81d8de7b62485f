//! WHIP (RFC 9725) and WHEP routes: HTTP in and out of [`crate::bridge::Bridges`], with the
//! RFC's headers (`Location`, `ETag`, `Link` for ICE servers, `Accept-Patch`) and CORS for
//! browser clients. Every refusal is `text/plain` with the reason.

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::bridge::{self, BridgeError, Bridges, Created, Kind, Patched, Source};

/// Largest offer or SDP fragment taken (offers with many candidates stay far below).
pub const MAX_BODY_BYTES: usize = 128 * 1024;

const SDP: &str = "application/sdp";
const SDP_FRAG: &str = "application/trickle-ice-sdpfrag";

fn header(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn request<'a>(headers: &'a HeaderMap, body: &'a Bytes) -> bridge::Request<'a> {
    bridge::Request {
        authorization: header(headers, header::AUTHORIZATION),
        content_type: header(headers, header::CONTENT_TYPE),
        body,
    }
}

fn refusal(e: BridgeError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, format!("{e}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// A `Link` header value for one ICE server (RFC 9725 §4.6).
fn link(url: &str, username: &str, credential: &str) -> Option<HeaderValue> {
    let quote = |s: &str| s.replace('"', "");
    HeaderValue::from_str(&format!(
        "<{url}>; rel=\"ice-server\"; username=\"{}\"; credential=\"{}\"; credential-type=\"password\"",
        quote(username),
        quote(credential)
    ))
    .ok()
}

fn created(kind: Kind, c: Created) -> Response {
    let mut r = (StatusCode::CREATED, c.answer).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(SDP));
    if let Ok(v) = HeaderValue::from_str(&format!("/{}/v1/resource/{}", kind.as_str(), c.id)) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&c.etag) {
        h.insert(header::ETAG, v);
    }
    h.insert("accept-patch", HeaderValue::from_static(SDP_FRAG));
    for (url, user, cred) in &c.ice_servers {
        if let Some(v) = link(url, user, cred) {
            h.append(header::LINK, v);
        }
    }
    r
}

/// `POST /whip/v1`: WHIP into the token's room.
pub async fn post_whip(
    State(bridges): State<Bridges>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match bridges.whip(None, request(&headers, &body)).await {
        Ok(c) => created(Kind::Whip, c),
        Err(e) => refusal(e),
    }
}

/// `POST /whip/v1/{room}`: WHIP into `room` (the token's room).
pub async fn post_whip_room(
    State(bridges): State<Bridges>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match bridges.whip(Some(&room), request(&headers, &body)).await {
        Ok(c) => created(Kind::Whip, c),
        Err(e) => refusal(e),
    }
}

/// The WHEP query: `?ciphertext=1` accepts end-to-end encrypted tracks.
#[derive(Debug, serde::Deserialize)]
pub struct WhepQuery {
    #[serde(default)]
    ciphertext: Option<String>,
}

impl WhepQuery {
    fn ciphertext(&self) -> bool {
        matches!(self.ciphertext.as_deref(), Some("1" | "true"))
    }
}

/// `POST /whep/v1/{room}/{identity}`: a participant's audio and video.
pub async fn post_whep_participant(
    State(bridges): State<Bridges>,
    Path((room, identity)): Path<(String, String)>,
    Query(q): Query<WhepQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let source = Source::Participant(identity);
    match bridges
        .whep(&room, source, q.ciphertext(), request(&headers, &body))
        .await
    {
        Ok(c) => created(Kind::Whep, c),
        Err(e) => refusal(e),
    }
}

/// `POST /whep/v1/{room}/track/{track_sid}`: one track.
pub async fn post_whep_track(
    State(bridges): State<Bridges>,
    Path((room, sid)): Path<(String, String)>,
    Query(q): Query<WhepQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match bridges
        .whep(
            &room,
            Source::Track(sid),
            q.ciphertext(),
            request(&headers, &body),
        )
        .await
    {
        Ok(c) => created(Kind::Whep, c),
        Err(e) => refusal(e),
    }
}

async fn patch(
    bridges: Bridges,
    kind: Kind,
    id: String,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let if_match = header(&headers, header::IF_MATCH);
    match bridges
        .patch(kind, &id, if_match, request(&headers, &body))
        .await
    {
        Ok(Patched::Trickled) => StatusCode::NO_CONTENT.into_response(),
        Ok(Patched::Restarted { fragment, etag }) => {
            let mut r = (StatusCode::OK, fragment).into_response();
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(SDP_FRAG));
            if let Ok(v) = HeaderValue::from_str(&etag) {
                h.insert(header::ETAG, v);
            }
            r
        }
        Err(e) => refusal(e),
    }
}

async fn delete(bridges: Bridges, kind: Kind, id: String, headers: HeaderMap) -> Response {
    match bridges
        .delete(kind, &id, header(&headers, header::AUTHORIZATION))
        .await
    {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => refusal(e),
    }
}

/// `PATCH /whip/v1/resource/{id}`: trickle ICE or an ICE restart.
pub async fn patch_whip(
    State(bridges): State<Bridges>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch(bridges, Kind::Whip, id, headers, body).await
}

/// `PATCH /whep/v1/resource/{id}`.
pub async fn patch_whep(
    State(bridges): State<Bridges>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch(bridges, Kind::Whep, id, headers, body).await
}

/// `DELETE /whip/v1/resource/{id}`: the session ends.
pub async fn delete_whip(
    State(bridges): State<Bridges>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    delete(bridges, Kind::Whip, id, headers).await
}

/// `DELETE /whep/v1/resource/{id}`.
pub async fn delete_whep(
    State(bridges): State<Bridges>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    delete(bridges, Kind::Whep, id, headers).await
}

/// CORS for browser WHIP/WHEP clients, and the `OPTIONS` answer (`Accept-Post`).
pub async fn cors(request: Request, next: Next) -> Response {
    let mut response = if request.method() == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        r.headers_mut()
            .insert("accept-post", HeaderValue::from_static(SDP));
        r
    } else {
        next.run(request).await
    };
    super::allow_any_origin(
        response.headers_mut(),
        "POST, PATCH, DELETE, OPTIONS",
        "Authorization, Content-Type, If-Match",
        "Location, ETag, Link, Accept-Patch",
    );
    response
}
