//! Confluent Schema Registry's error codes and JSON shape, so clients see the same failures.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// A failed registry request, mapped to Confluent's `error_code` and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 40401
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    /// 40402
    #[error("Version {0} not found.")]
    VersionNotFound(String),
    /// 40403, by id
    #[error("Schema {0} not found")]
    SchemaNotFound(u32),
    /// 40403, by lookup under a subject
    #[error("Schema not found")]
    SchemaNotFoundInSubject,
    /// 40408
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectCompatibilityNotConfigured(String),
    /// 42201
    #[error("Invalid schema: {0}")]
    InvalidSchema(String),
    /// 42202
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    /// 42203
    #[error("Invalid compatibility level: {0}")]
    InvalidCompatibility(String),
    /// 409
    #[error("Schema being registered is incompatible with an earlier schema for subject; {0}")]
    Incompatible(String),
    /// 400: the request body is not what the endpoint takes.
    #[error("Bad request: {0}")]
    BadRequest(String),
    /// 404 for paths the registry does not serve.
    #[error("HTTP 404 Not Found")]
    NoSuchPath,
    /// 50001
    #[error("Error in the backend data store: {0}")]
    Storage(String),
}

impl ApiError {
    /// Confluent's `error_code` and the HTTP status it comes with.
    pub fn codes(&self) -> (u32, StatusCode) {
        match self {
            ApiError::SubjectNotFound(_) => (40401, StatusCode::NOT_FOUND),
            ApiError::VersionNotFound(_) => (40402, StatusCode::NOT_FOUND),
            ApiError::SchemaNotFound(_) | ApiError::SchemaNotFoundInSubject => {
                (40403, StatusCode::NOT_FOUND)
            }
            ApiError::SubjectCompatibilityNotConfigured(_) => (40408, StatusCode::NOT_FOUND),
            ApiError::InvalidSchema(_) => (42201, StatusCode::UNPROCESSABLE_ENTITY),
            ApiError::InvalidVersion(_) => (42202, StatusCode::UNPROCESSABLE_ENTITY),
            ApiError::InvalidCompatibility(_) => (42203, StatusCode::UNPROCESSABLE_ENTITY),
            ApiError::Incompatible(_) => (409, StatusCode::CONFLICT),
            ApiError::BadRequest(_) => (400, StatusCode::BAD_REQUEST),
            ApiError::NoSuchPath => (404, StatusCode::NOT_FOUND),
            ApiError::Storage(_) => (50001, StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, status) = self.codes();
        let body = serde_json::json!({ "error_code": code, "message": self.to_string() });
        (status, json_headers(), body.to_string()).into_response()
    }
}

/// Confluent's content type, on every response (errors too).
pub(crate) fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.schemaregistry.v1+json"),
    );
    h
}
