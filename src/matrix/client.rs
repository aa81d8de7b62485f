//! The homeserver client: ruma request/response types over reqwest (rustls), authenticated with
//! the `as_token`, masquerading as namespaced users with `?user_id=`.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::time::Duration;

use ruma::api::auth_scheme::SendAccessToken;
use ruma::api::client::appservice::request_ping;
use ruma::api::AppserviceUserIdentity;
use ruma::api::{
    IncomingResponse, IncomingResponseExt, MatrixVersion, OutgoingRequestAppserviceExt,
    OutgoingRequestExt, SupportedVersions,
};
use ruma::{TransactionId, UserId};

use crate::config::Secret;

/// A failed call to the homeserver.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request could not be built.
    #[error("cannot build request: {0}")]
    Build(String),
    /// The homeserver could not be reached or did not answer in time.
    #[error("homeserver unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
    /// The homeserver answered with an error or an unexpected body.
    #[error("homeserver answered {status}: {message}")]
    Response {
        /// HTTP status.
        status: u16,
        /// Error body or parse failure.
        message: String,
    },
}

/// Client-server API access for the appservice.
#[derive(Clone)]
pub struct HomeserverClient {
    http: reqwest::Client,
    base_url: String,
    as_token: Secret,
    versions: SupportedVersions,
}

impl HomeserverClient {
    /// A client for `base_url` with the given HTTP client (timeouts, CA roots already set).
    pub fn new(http: reqwest::Client, base_url: &str, as_token: Secret) -> Self {
        let versions = SupportedVersions {
            versions: BTreeSet::from([MatrixVersion::V1_11]),
            features: BTreeSet::new(),
        };
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            as_token,
            versions,
        }
    }

    /// The homeserver's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `POST /_matrix/client/v1/appservice/{id}/ping`: the homeserver calls our `/ping` and
    /// reports the round trip; a success also makes Synapse retry queued transactions at once.
    pub async fn ping(&self, appservice_id: &str) -> Result<Duration, ClientError> {
        let mut req = request_ping::v1::Request::new(appservice_id.to_owned());
        req.transaction_id = Some(TransactionId::new());
        let http_req = req
            .try_into_http_request::<Vec<u8>>(
                &self.base_url,
                SendAccessToken::Always(self.as_token.expose()),
                Cow::Borrowed(&self.versions),
            )
            .map_err(|e| ClientError::Build(e.to_string()))?;
        let resp: request_ping::v1::Response = self.execute(http_req).await?;
        Ok(resp.duration)
    }

    /// Sends a client-server request as `user` (or the appservice bot when `None`).
    pub async fn send<R>(
        &self,
        request: R,
        user: Option<&UserId>,
    ) -> Result<R::IncomingResponse, ClientError>
    where
        R: OutgoingRequestAppserviceExt,
        for<'a> R::Authentication:
            ruma::api::auth_scheme::AuthScheme<Input<'a> = SendAccessToken<'a>>,
        for<'a> R::PathBuilder:
            ruma::api::path_builder::PathBuilder<Input<'a> = Cow<'a, SupportedVersions>>,
    {
        let identity = match user {
            Some(u) => AppserviceUserIdentity::new(u),
            None => AppserviceUserIdentity::default(),
        };
        let http_req = request
            .try_into_http_request_with_identity::<Vec<u8>>(
                &self.base_url,
                SendAccessToken::Always(self.as_token.expose()),
                identity,
                Cow::Borrowed(&self.versions),
            )
            .map_err(|e| ClientError::Build(e.to_string()))?;
        self.execute(http_req).await
    }

    /// Sends a JSON request to an endpoint ruma does not describe (MSC4502's `is_joined`,
    /// MSC4512's `fed_proxy`) as the appservice bot: `path` (already encoded) is appended to
    /// the base URL. Answers the status and the JSON body (`Null` when the body is not JSON).
    pub async fn send_json(
        &self,
        method: http::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .query(query)
            .bearer_auth(self.as_token.expose());
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    }

    async fn execute<T: IncomingResponse>(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (parts, body) = req.into_parts();
        let url = parts.uri.to_string();
        let resp = self
            .http
            .request(parts.method, url)
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let http_resp = http::Response::builder()
            .status(status)
            .body(bytes.as_ref())
            .map_err(|e| ClientError::Build(e.to_string()))?;
        T::try_from_http_response(http_resp).map_err(|e| ClientError::Response {
            status: status.as_u16(),
            message: if status.is_success() {
                e.to_string()
            } else {
                String::from_utf8_lossy(&bytes).chars().take(500).collect()
            },
        })
    }
}

/// Percent-encodes `segment` for a URL path: everything but unreserved characters and the
/// sigils and separators of Matrix IDs (`!`, `@`, `:`).
pub fn encode_path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!@:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_keep_matrix_sigils() {
        assert_eq!(encode_path_segment("!abc:example.org"), "!abc:example.org");
        assert_eq!(encode_path_segment("!a/b c:[::1]"), "!a%2Fb%20c:%5B::1%5D");
    }
}
