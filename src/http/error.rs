//! Errors at the HTTP edge, rendered as Matrix JSON (`{"errcode","error"}`): the services'
//! error enums are converted here, and nowhere else.
//!
//! 5xx responses carry a generic message; the real cause travels in a response extension
//! ([`InternalCause`]) to the router's outermost layer, which logs it once and counts it.
//! A 502/504 because another server failed (a user's homeserver) is not Conclave's own error:
//! it is marked [`UpstreamFailure`] and counted apart. Converting an error never logs.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ruma::api::error::ErrorCode;

/// An error response in the Matrix format.
#[derive(Debug, Clone)]
pub struct MatrixErrorResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Matrix error code.
    pub errcode: ErrorCode,
    /// Human-readable message, safe to show to the caller.
    pub message: String,
    /// For 5xx: what really went wrong (logged by the router, never sent).
    pub cause: Option<String>,
    /// Another server failed, not Conclave (a 502/504 counted apart from internal errors).
    pub upstream: bool,
    /// For 429: when to try again (`retry_after_ms` in the body, `Retry-After` in seconds,
    /// rounded up).
    pub retry_after: Option<Duration>,
}

/// The cause of a 5xx response, for the router's logging layer.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

/// Marks a 5xx response caused by another server's failure (a user's homeserver unreachable,
/// slow or answering nonsense), so the router counts it as such and not as an internal error.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamFailure;

impl MatrixErrorResponse {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, errcode: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: message.into(),
            cause: None,
            upstream: false,
            retry_after: None,
        }
    }

    /// 429 `M_LIMIT_EXCEEDED`: try again after `retry_after`.
    pub fn limit_exceeded(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::LimitExceeded,
                message,
            )
        }
    }

    /// The same error, marked as another server's failure ([`UpstreamFailure`]).
    pub fn upstream(self) -> Self {
        Self {
            upstream: true,
            ..self
        }
    }

    /// 500 with a generic message; `cause` is kept for the log, not returned.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        Self {
            cause: Some(cause.to_string()),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Unknown,
                "Internal Server Error",
            )
        }
    }

    /// 404 `M_UNRECOGNIZED` for unknown endpoints.
    pub fn unrecognized() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::Unrecognized,
            "Unrecognized request",
        )
    }

    /// Maps a body extraction failure: too large → 413 `M_TOO_LARGE`, otherwise 400.
    pub fn from_body_rejection(rejection: &axum::extract::rejection::BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                "Request body too large",
            )
        } else {
            Self::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::NotJson,
                format!("Cannot read request body: {rejection}"),
            )
        }
    }
}

impl IntoResponse for MatrixErrorResponse {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({
            "errcode": self.errcode.as_str(),
            "error": self.message,
        });
        let retry_after_ms = self
            .retry_after
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
        if let Some(ms) = retry_after_ms {
            body["retry_after_ms"] = serde_json::json!(ms);
        }
        let mut response = (self.status, Json(body)).into_response();
        if let Some(ms) = retry_after_ms {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
        }
        if let Some(cause) = self.cause {
            response.extensions_mut().insert(InternalCause(cause));
        }
        if self.upstream {
            response.extensions_mut().insert(UpstreamFailure);
        }
        response
    }
}

impl From<crate::auth::AuthError> for MatrixErrorResponse {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError as E;
        let (status, code) = match &e {
            E::NotJson(_) => (StatusCode::BAD_REQUEST, ErrorCode::NotJson),
            E::BadJson(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadJson),
            E::InvalidParam(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidParam),
            E::Unauthorized(_) | E::InvalidToken(_) => {
                (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized)
            }
            E::Forbidden(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            E::RoomUnknown(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            E::HomeserverNotAllowed(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            E::HomeserverUnreachable(_)
            | E::HomeserverBadResponse(_)
            | E::HomeserverResponseTooLarge(_)
            | E::HomeserverRedirected(_) => {
                return Self::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::ConnectionFailed,
                    e.to_string(),
                )
                .upstream()
            }
            E::HomeserverTimeout(_) => {
                return Self::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorCode::ConnectionTimeout,
                    e.to_string(),
                )
                .upstream()
            }
            E::RateLimited { retry_after, .. } => {
                return Self::limit_exceeded(e.to_string(), *retry_after)
            }
            E::Store(_) | E::Calls(_) | E::Internal(_) => return Self::internal(&e),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<crate::calls::CallsError> for MatrixErrorResponse {
    fn from(e: crate::calls::CallsError) -> Self {
        use crate::calls::CallsError as E;
        match &e {
            E::NoCall(_) | E::NoParticipant(_) | E::NoSfuRoom(_) => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
            }
            E::Store(_) | E::SfuGone => Self::internal(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthError;

    #[test]
    fn a_homeserver_failure_is_a_marked_gateway_error_naming_only_the_server() {
        let cases = [
            (AuthError::HomeserverUnreachable("hs.example".into()), 502),
            (AuthError::HomeserverBadResponse("hs.example".into()), 502),
            (
                AuthError::HomeserverResponseTooLarge("hs.example".into()),
                502,
            ),
            (AuthError::HomeserverRedirected("hs.example".into()), 502),
            (AuthError::HomeserverTimeout("hs.example".into()), 504),
        ];
        for (e, status) in cases {
            let r = MatrixErrorResponse::from(e);
            assert_eq!(r.status.as_u16(), status);
            assert!(r.upstream && r.cause.is_none(), "{r:?}");
            assert!(r.message.contains("hs.example"), "{r:?}");
            let response = r.into_response();
            assert!(response.extensions().get::<UpstreamFailure>().is_some());
            assert!(response.extensions().get::<InternalCause>().is_none());
        }
        let refused = MatrixErrorResponse::from(AuthError::HomeserverNotAllowed("10.0.0.1".into()));
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(!refused.upstream);
        let ours = MatrixErrorResponse::from(AuthError::Internal("boom".into()));
        assert_eq!(ours.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!ours.upstream && ours.cause.is_some());
        assert!(!ours.message.contains("boom"));
    }

    #[tokio::test]
    async fn a_rate_limit_is_a_429_with_retry_after_rounded_up() {
        let e = AuthError::RateLimited {
            what: "naming homeserver hs.example".into(),
            retry_after: Duration::from_millis(1500),
        };
        let response = MatrixErrorResponse::from(e).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert!(response.extensions().get::<InternalCause>().is_none());
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED");
        assert_eq!(body["retry_after_ms"], 1500);
        assert!(body["error"].as_str().unwrap().contains("hs.example"));
        let short = MatrixErrorResponse::limit_exceeded("x", Duration::from_micros(10));
        let response = short.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
