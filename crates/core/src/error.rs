//! The one error type that crosses the wire.
//!
//! Every failed request answers with a status code and
//! `{"error":{"code":"...","message":"..."}}`. The code says what a retry can expect:
//! `unavailable` guarantees the operation did **not** take effect, `timeout` means the
//! outcome is unknown (it may still take effect later). Anything else is final.

use serde::{Deserialize, Serialize};

/// What went wrong, as a stable machine-readable code (the `code` field of an error body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed path, body or query parameter. 400.
    BadRequest,
    /// Fault injection used on a node started without `--enable-faults`. 403.
    Forbidden,
    /// Unknown keyspace or key. 404.
    NotFound,
    /// A compare-and-set did not match, a keyspace already exists, or an
    /// `Idempotency-Key` was reused for a different request. 409.
    Conflict,
    /// A key or value is larger than the node accepts. 413.
    TooLarge,
    /// An internal error: a bug or a broken disk. 500.
    Internal,
    /// The operation exists in the API but this keyspace mode does not serve it yet. 501.
    NotImplemented,
    /// No quorum, no leader reachable, or not enough replicas: the operation did **not**
    /// take effect and may be retried. 503.
    Unavailable,
    /// The deadline passed with the outcome unknown: the operation may or may not have
    /// taken effect. 504.
    Timeout,
    /// No bearer token, or one no user holds, on a node with authentication on. 401.
    /// (Last: stored replies are bincode, which numbers variants in order.)
    Unauthorized,
}

impl ErrorCode {
    /// The HTTP status code this error is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::Internal => 500,
            ErrorCode::NotImplemented => 501,
            ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Unauthorized => 401,
        }
    }

    /// The code an HTTP status maps back to (used by the client for bodies it cannot parse).
    pub fn from_http_status(status: u16) -> ErrorCode {
        match status {
            400 => ErrorCode::BadRequest,
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            409 => ErrorCode::Conflict,
            413 => ErrorCode::TooLarge,
            501 => ErrorCode::NotImplemented,
            503 => ErrorCode::Unavailable,
            504 => ErrorCode::Timeout,
            _ => ErrorCode::Internal,
        }
    }

    /// True when the operation certainly did not take effect, so a blind retry is safe.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::Unavailable)
    }

    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::NotImplemented => "not_implemented",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it travels: between nodes, in a stored idempotent reply, and to clients.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error, utoipa::ToSchema,
)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Conflict, message)
    }
    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::TooLarge, message)
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Unavailable, message)
    }
    pub fn timeout(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Timeout, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Internal, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Unauthorized, message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Forbidden, message)
    }
}

/// The JSON body of every error response: `{"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ApiError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_matches_the_contract() {
        let body = ErrorBody {
            error: ApiError::unavailable("no quorum"),
        };
        let json = serde_json::to_string(&body).unwrap();
        assert_eq!(
            json,
            r#"{"error":{"code":"unavailable","message":"no quorum"}}"#
        );
    }

    #[test]
    fn status_codes_round_trip() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::TooLarge,
            ErrorCode::Internal,
            ErrorCode::NotImplemented,
            ErrorCode::Unavailable,
            ErrorCode::Timeout,
        ] {
            assert_eq!(ErrorCode::from_http_status(code.http_status()), code);
            let wire = serde_json::to_string(&code).unwrap();
            assert_eq!(wire, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn only_unavailable_is_safe_to_retry_blindly() {
        assert!(ErrorCode::Unavailable.is_retryable());
        assert!(!ErrorCode::Timeout.is_retryable());
        assert!(!ErrorCode::Conflict.is_retryable());
    }
}
