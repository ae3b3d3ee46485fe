//! The one mapping from domain errors to what clients see: an HTTP status with
//! `{"error": {"code", "message", "field"}}`, or a `tonic::Status`. Codes are stable strings.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::node::NodeError;
use crate::state::{Rejection, RejectionCode};
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The request field that is wrong, when one is.
    pub field: Option<String>,
    /// Seconds to wait before retrying (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, retry_after: None }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    /// A 400 about one field of the request.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self { field: Some(field.to_string()), ..Self::new(StatusCode::BAD_REQUEST, "invalid_field", message) }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

/// The error body every endpoint returns: `{"error": {"code", "message", "field"}}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code, e.g. `not_found`, `invalid_field`, `forbidden`.
    pub code: String,
    /// What was wrong and what to do about it.
    pub message: String,
    /// The request field at fault, if any.
    pub field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_string(), message: self.message, field: self.field } };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> Self {
        match error {
            NodeError::Unavailable(message) => {
                ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message) }
            }
            NodeError::Invalid(message) => ApiError::bad_request(message),
            NodeError::Internal(message) => ApiError::internal(message),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", error.to_string())
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        let (status, code) = match rejection.code {
            RejectionCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            RejectionCode::Conflict => (StatusCode::CONFLICT, "conflict"),
            RejectionCode::Invalid => (StatusCode::BAD_REQUEST, "invalid_request"),
            RejectionCode::StaleAttempt => (StatusCode::CONFLICT, "stale_attempt"),
            RejectionCode::Refused => (StatusCode::CONFLICT, "refused_by_environment"),
        };
        ApiError::new(status, code, rejection.message)
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        let code = match error.status {
            StatusCode::BAD_REQUEST => tonic::Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
            StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
            StatusCode::NOT_FOUND => tonic::Code::NotFound,
            StatusCode::CONFLICT => tonic::Code::AlreadyExists,
            StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
            StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        };
        tonic::Status::new(code, format!("{}: {}", error.code, error.message))
    }
}
