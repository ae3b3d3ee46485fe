//! The one mapping from domain errors to what clients see: an HTTP status with
//! `{"error": {"code", "message"}}`, or a `tonic::Status`. Codes are stable strings.

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
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> Self {
        match error {
            NodeError::Unavailable(message) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            NodeError::Invalid(message) => ApiError::bad_request(message),
            NodeError::Internal(message) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage",
            error.to_string(),
        )
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        let (status, code) = match rejection.code {
            RejectionCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            RejectionCode::Conflict => (StatusCode::CONFLICT, "conflict"),
            RejectionCode::Invalid => (StatusCode::BAD_REQUEST, "invalid_request"),
            RejectionCode::StaleAttempt => (StatusCode::CONFLICT, "stale_attempt"),
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
            StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        };
        tonic::Status::new(code, format!("{}: {}", error.code, error.message))
    }
}
