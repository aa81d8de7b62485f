//! Errors at the HTTP edge, rendered as Matrix JSON (`{"errcode","error"}`): the services'
//! error enums are converted here, and nowhere else.
//!
//! 5xx responses carry a generic message; the real cause travels in a response extension
//! ([`InternalCause`]) to the router's outermost layer, which logs it once and counts it.
//! Converting an error never logs.

use axum::http::StatusCode;
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
}

/// The cause of a 5xx response, for the router's logging layer.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

impl MatrixErrorResponse {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, errcode: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: message.into(),
            cause: None,
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
        let body = serde_json::json!({
            "errcode": self.errcode.as_str(),
            "error": self.message,
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(cause) = self.cause {
            response.extensions_mut().insert(InternalCause(cause));
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
            E::HomeserverUnreachable(_) | E::HomeserverBadResponse(_) => {
                (StatusCode::BAD_GATEWAY, ErrorCode::ConnectionFailed)
            }
            E::HomeserverTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, ErrorCode::ConnectionTimeout),
            E::Store(_) | E::Calls(_) | E::Internal(_) => return Self::internal(&e),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<crate::calls::CallsError> for MatrixErrorResponse {
    fn from(e: crate::calls::CallsError) -> Self {
        use crate::calls::CallsError as E;
        match &e {
            E::NoCall(_) | E::NoParticipant(_) => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
            }
            E::Store(_) | E::SfuGone => Self::internal(&e),
        }
    }
}
