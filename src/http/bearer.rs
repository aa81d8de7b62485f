//! The one bearer-token check of the HTTP edge: `Authorization: Bearer <token>` compared in
//! constant time. Used by the appservice API (`hs_token`) and the admin API (`admin.token`).

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::error::MatrixErrorResponse;

/// How one API checks its bearer token against its part of the router's state.
pub trait BearerPolicy: Sized {
    /// The part of the state the check reads.
    type State;
    /// Accepts the request (returning the proof) or says why not.
    fn check(parts: &Parts, state: &Self::State) -> Result<Self, MatrixErrorResponse>;
}

/// The one bearer-token extractor: proof `P` that the request passed `P`'s check.
pub struct Bearer<P>(pub P);

impl<S, P> FromRequestParts<S> for Bearer<P>
where
    S: Send + Sync,
    P: BearerPolicy,
    P::State: FromRef<S>,
{
    type Rejection = MatrixErrorResponse;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        P::check(parts, &P::State::from_ref(state)).map(Bearer)
    }
}

/// The token of an `Authorization: Bearer …` header: `None` without the header, `Some("")`
/// for another scheme.
pub fn presented(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or("").trim().to_owned())
}

/// Whether `presented` equals `expected`, in constant time.
pub fn matches(presented: &str, expected: &str) -> bool {
    bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(header: Option<&str>) -> Parts {
        let mut b = axum::http::Request::builder();
        if let Some(h) = header {
            b = b.header("authorization", h);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn bearer_tokens_are_read_and_compared() {
        assert_eq!(presented(&parts(None)), None);
        assert_eq!(
            presented(&parts(Some("Bearer abc "))).as_deref(),
            Some("abc")
        );
        assert_eq!(presented(&parts(Some("Basic abc"))).as_deref(), Some(""));
        assert!(matches("abc", "abc"));
        assert!(!matches("abd", "abc"));
        assert!(!matches("", "abc"));
    }
}
