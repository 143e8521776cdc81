//! Request failures and the one place that maps them to HTTP responses.
//!
//! Response bodies are fixed JSON messages: they name what failed in general words and never
//! carry a stored value, a key, a token or a path beyond the ids the client sent.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::ResponseBody;
use crate::auth::AuthError;
use crate::envelope;
use crate::ids::InvalidId;
use crate::keys::KeyError;
use crate::storage::StorageError;
use crate::webhook::signature::SignatureError;
use crate::webhook::spool::SpoolError;

/// Seconds a client should wait before retrying a request that failed for a passing reason.
const RETRY_AFTER_SECS: &str = "5";

/// The reason a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    #[error("the token is not allowed to access this practice")]
    Forbidden,
    #[error("{0}")]
    WebhookUnauthenticated(SignatureError),
    #[error("the event's agent is not on this practice's agent allowlist")]
    WebhookAgentNotAllowed,
    #[error("the gateway is busy; retry later")]
    Busy,
    /// An audit record could not be written, so the request was refused (fail closed).
    #[error("the audit log is unavailable; retry later")]
    AuditUnavailable,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("{0}")]
    BadRequest(String),
    #[error("the object already exists; objects are never overwritten")]
    AlreadyExists,
    #[error("the upload exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the range is outside the object")]
    RangeNotSatisfiable { length: u64 },
    /// The stored object failed authentication: tampered, truncated, extended or corrupted.
    #[error("the stored object failed authentication")]
    StoredObjectInvalid,
    /// The stored object's encryption context names another practice, call or artifact.
    #[error("the stored object does not belong to this path")]
    StoredObjectMisplaced,
    #[error("storage is unavailable")]
    StorageUnavailable(#[source] StorageError),
    /// Storage is unreachable and the webhook spool cannot take the event either.
    #[error("{0}")]
    Spool(#[source] SpoolError),
    #[error("the practice's key is unavailable")]
    KeyUnavailable(#[source] KeyError),
    /// KMS could not be reached or kept failing: retryable.
    #[error("the practice's key service is unavailable; retry later")]
    KeyServiceUnavailable(#[source] KeyError),
    /// The practice's KMS key is disabled, pending deletion or denies callseal: not retryable
    /// until the practice acts.
    #[error("{}", refusal_message(.0))]
    KeyRefused(#[source] KeyError),
    /// The client went away or sent a broken body, so no response reaches it.
    #[error("the request body could not be read")]
    ClientBody(#[source] hyper::Error),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated | ApiError::WebhookUnauthenticated(_) => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden | ApiError::WebhookAgentNotAllowed => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest(_) | ApiError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ApiError::AlreadyExists => StatusCode::CONFLICT,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::StoredObjectInvalid
            | ApiError::StoredObjectMisplaced
            | ApiError::KeyUnavailable(_)
            | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::StorageUnavailable(_)
            | ApiError::Spool(_)
            | ApiError::Busy
            | ApiError::AuditUnavailable
            | ApiError::KeyServiceUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::KeyRefused(_) => StatusCode::FORBIDDEN,
        }
    }

    /// A short, fixed reason for the audit log's completion record.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated | ApiError::WebhookUnauthenticated(_) => "unauthenticated",
            ApiError::Forbidden | ApiError::WebhookAgentNotAllowed => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::AlreadyExists => "already_exists",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            ApiError::StoredObjectInvalid => "stored_object_invalid",
            ApiError::StoredObjectMisplaced => "stored_object_misplaced",
            ApiError::StorageUnavailable(_) => "storage_unavailable",
            ApiError::Spool(error) => error.reason(),
            ApiError::KeyUnavailable(_) | ApiError::KeyServiceUnavailable(_) => "key_unavailable",
            ApiError::KeyRefused(_) => "key_refused",
            ApiError::Busy => "busy",
            ApiError::AuditUnavailable => "audit_unavailable",
            ApiError::ClientBody(_) => "client_body",
            ApiError::Internal(_) => "internal",
        }
    }

    /// Builds the response: the status, a JSON body with the message, and the headers some
    /// statuses require.
    pub fn into_response(self) -> Response<ResponseBody> {
        let status = self.status();
        let message = match &self {
            // Internal details go to the log, not to the client.
            ApiError::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        let body = serde_json::json!({ "error": message }).to_string();
        let mut response = Response::new(super::full_body(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match &self {
            ApiError::Unauthenticated => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::RangeNotSatisfiable { length } => {
                let value = format!("bytes */{length}");
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(header::CONTENT_RANGE, value);
                }
            }
            ApiError::StorageUnavailable(_)
            | ApiError::Spool(_)
            | ApiError::Busy
            | ApiError::AuditUnavailable
            | ApiError::KeyServiceUnavailable(_) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
            }
            _ => {}
        }
        response
    }
}

/// The client-facing message of a refused KMS key; the log line names the key id.
fn refusal_message(error: &KeyError) -> &'static str {
    match error {
        KeyError::KmsKeyDisabled { .. } => "the practice's KMS key is disabled",
        KeyError::KmsKeyState { .. } => "the practice's KMS key is pending deletion or unusable",
        KeyError::KmsAccessDenied { .. } => "callseal is not allowed to use the practice's KMS key",
        _ => "the practice's key refused the request",
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unauthenticated => ApiError::Unauthenticated,
            AuthError::Forbidden => ApiError::Forbidden,
        }
    }
}

impl From<InvalidId> for ApiError {
    fn from(error: InvalidId) -> Self {
        ApiError::BadRequest(error.to_string())
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::NotFound { .. } => ApiError::NotFound,
            StorageError::AlreadyExists { .. } => ApiError::AlreadyExists,
            // A stored size that disagrees with a range read means the object changed or was
            // cut underneath us: treat it like a failed authentication.
            StorageError::InvalidRange { .. } => ApiError::StoredObjectInvalid,
            other => ApiError::StorageUnavailable(other),
        }
    }
}

impl From<envelope::Error> for ApiError {
    fn from(error: envelope::Error) -> Self {
        match error {
            envelope::Error::ContextMismatch { .. } => ApiError::StoredObjectMisplaced,
            envelope::Error::Random => ApiError::Internal(error.to_string()),
            // Every other envelope error on the server side is about a stored object.
            _ => ApiError::StoredObjectInvalid,
        }
    }
}

impl From<KeyError> for ApiError {
    fn from(error: KeyError) -> Self {
        match error {
            // The stored data key does not unwrap under the practice's key: tampered header.
            KeyError::Unwrap | KeyError::MalformedEdk(_) | KeyError::NoMatchingKey => {
                ApiError::StoredObjectInvalid
            }
            KeyError::KmsUnavailable { .. } => ApiError::KeyServiceUnavailable(error),
            KeyError::KmsKeyDisabled { .. }
            | KeyError::KmsKeyState { .. }
            | KeyError::KmsAccessDenied { .. } => ApiError::KeyRefused(error),
            other => ApiError::KeyUnavailable(other),
        }
    }
}
