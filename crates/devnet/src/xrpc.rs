//! XRPC plumbing shared by the PDS and the relay: the `{error, message}` error body and
//! extractors that turn malformed requests into that body instead of axum's plain text.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// An XRPC error response.
#[derive(Debug, Clone)]
pub(crate) struct XrpcError {
    pub(crate) status: StatusCode,
    pub(crate) error: &'static str,
    pub(crate) message: String,
}

impl XrpcError {
    pub(crate) fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        XrpcError {
            status,
            error,
            message: message.into(),
        }
    }

    /// 400 with a named error, the usual shape of an XRPC failure.
    pub(crate) fn bad(error: &'static str, message: impl Into<String>) -> Self {
        XrpcError::new(StatusCode::BAD_REQUEST, error, message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        XrpcError::bad("InvalidRequest", message)
    }

    pub(crate) fn auth(message: impl Into<String>) -> Self {
        XrpcError::new(StatusCode::UNAUTHORIZED, "AuthenticationRequired", message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        XrpcError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            message,
        )
    }
}

impl IntoResponse for XrpcError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"error": self.error, "message": self.message})),
        )
            .into_response()
    }
}

pub(crate) type XrpcResult<T> = Result<T, XrpcError>;

/// Query parameters, rejected as `InvalidRequest`.
pub(crate) struct Params<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = XrpcError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| Params(query.0))
            .map_err(|rejection| XrpcError::invalid(rejection.body_text()))
    }
}

/// A JSON body, rejected as `InvalidRequest`.
pub(crate) struct Body<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = XrpcError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        Json::<T>::from_request(request, state)
            .await
            .map(|json| Body(json.0))
            .map_err(|rejection| XrpcError::invalid(rejection.body_text()))
    }
}

/// Parses a string parameter with the core's syntax checks.
pub(crate) fn parse<T: std::str::FromStr>(name: &str, value: &str) -> XrpcResult<T>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|err| XrpcError::invalid(format!("{name}: {err}")))
}

/// `limit` within `1..=max`, `default` when absent.
pub(crate) fn limit(value: Option<i64>, default: usize, max: usize) -> XrpcResult<usize> {
    match value {
        None => Ok(default),
        Some(limit) if limit >= 1 && limit as u64 <= max as u64 => Ok(limit as usize),
        Some(limit) => Err(XrpcError::invalid(format!(
            "limit {limit} is outside 1..={max}"
        ))),
    }
}
