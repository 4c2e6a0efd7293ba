//! One error type for the whole API, rendered as RFC 9457 `application/problem+json`.

use crate::store::append::{is_unavailable, AppendError};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ledger_events::DomainError;
use serde_json::json;
use std::sync::Arc;

/// Seconds a client is asked to wait before retrying when the database is unreachable: a
/// restart or failover usually takes a few.
const UNAVAILABLE_RETRY_AFTER: u64 = 2;

/// Every way a request can fail. Rejections (4xx) are answers, not failures; the 503s say "try
/// again later"; only [`ApiError::Unexpected`] is a failure (500) and is logged as an error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `400` for a body that is not the expected JSON, `422` for values that break a rule.
    #[error("{field}: {detail}")]
    Validation {
        status: StatusCode,
        field: String,
        detail: String,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    VersionConflict(String),
    #[error("{0}")]
    SlotUnavailable(String),
    #[error("{0}")]
    InvalidTransition(String),
    #[error("the Idempotency-Key was already used with a different request")]
    IdempotencyKeyReuse,
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    RateLimited { retry_after: u64, detail: String },
    #[error("{detail}")]
    ProjectionLagging { retry_after: u64, detail: String },
    /// `503`: Postgres is unreachable (restarting, failing over, out of connections). For a
    /// command the outcome is unknown: it may have committed, so clients retry with the same
    /// `Idempotency-Key`, which answers the first outcome if there was one.
    #[error("{detail}")]
    Unavailable { retry_after: u64, detail: String },
    /// An internal failure; one whose cause is an unreachable database answers as
    /// [`ApiError::Unavailable`] (see [`ApiError::unavailable_cause`]).
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad_request(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::Validation {
            status: StatusCode::BAD_REQUEST,
            field: field.into(),
            detail: detail.into(),
        }
    }

    pub fn unprocessable(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::Validation {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: field.into(),
            detail: detail.into(),
        }
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        ApiError::Forbidden(detail.into())
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::NotFound(what.into())
    }

    /// The database is unreachable: try again shortly.
    pub fn database_unavailable() -> Self {
        ApiError::Unavailable {
            retry_after: UNAVAILABLE_RETRY_AFTER,
            detail: "the database is unavailable; retry shortly (a command may or may not have \
                     been applied: retry it with the same Idempotency-Key)"
                .into(),
        }
    }

    /// Whether an internal failure was caused by the database (or the append pipeline) being
    /// unreachable rather than by a bug: those answer `503 service-unavailable`, not `500`.
    fn unavailable_cause(e: &anyhow::Error) -> bool {
        e.chain().any(|cause| {
            if let Some(e) = cause.downcast_ref::<sqlx::Error>() {
                return is_unavailable(e);
            }
            if let Some(e) = cause.downcast_ref::<Arc<sqlx::Error>>() {
                return is_unavailable(e);
            }
            matches!(
                cause.downcast_ref::<AppendError>(),
                Some(AppendError::Closed)
            )
        })
    }

    /// `Unexpected` errors caused by an unreachable database, made `Unavailable`.
    fn classified(self) -> Self {
        match self {
            ApiError::Unexpected(e) if Self::unavailable_cause(&e) => {
                tracing::warn!(error = format!("{e:#}"), "database unavailable");
                ApiError::database_unavailable()
            }
            other => other,
        }
    }

    fn is_unavailable(&self) -> bool {
        match self {
            ApiError::Unavailable { .. } => true,
            ApiError::Unexpected(e) => Self::unavailable_cause(e),
            _ => false,
        }
    }

    /// The stable slug the problem `type` ends in.
    pub fn slug(&self) -> &'static str {
        if self.is_unavailable() {
            return "service-unavailable";
        }
        match self {
            ApiError::Validation { .. } => "validation",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::VersionConflict(_) => "version-conflict",
            ApiError::SlotUnavailable(_) => "slot-unavailable",
            ApiError::InvalidTransition(_) => "invalid-transition",
            ApiError::IdempotencyKeyReuse => "idempotency-key-reuse",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::RateLimited { .. } => "rate-limited",
            ApiError::ProjectionLagging { .. } => "projection-lagging",
            ApiError::Unavailable { .. } => "service-unavailable",
            ApiError::Unexpected(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        if self.is_unavailable() {
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        match self {
            ApiError::Validation { status, .. } => *status,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::VersionConflict(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::SlotUnavailable(_) | ApiError::InvalidTransition(_) => StatusCode::CONFLICT,
            ApiError::IdempotencyKeyReuse => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ProjectionLagging { .. } | ApiError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Validation { .. } => "The request is not valid",
            ApiError::Unauthorized(_) => "Authentication required",
            ApiError::Forbidden(_) => "Not allowed for this role",
            ApiError::NotFound(_) => "Not found",
            ApiError::VersionConflict(_) => "The stream has moved on",
            ApiError::SlotUnavailable(_) => "The slot is not available",
            ApiError::InvalidTransition(_) => "Not possible in the current state",
            ApiError::IdempotencyKeyReuse => "Idempotency key reused",
            ApiError::PayloadTooLarge(_) => "Payload too large",
            ApiError::UnsupportedMediaType(_) => "Unsupported media type",
            ApiError::RateLimited { .. } => "Too many requests",
            ApiError::ProjectionLagging { .. } => "The read model is behind",
            ApiError::Unavailable { .. } => "Temporarily unavailable",
            ApiError::Unexpected(_) => "Internal error",
        }
    }

    /// A rejection an authenticated caller could be audited for (everything but 5xx).
    pub fn is_refusal(&self) -> bool {
        !self.status().is_server_error()
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::Validation { field, detail } => ApiError::unprocessable(field, detail),
            DomainError::InvalidTransition(d) => ApiError::InvalidTransition(d),
            DomainError::NotFound(what) => ApiError::NotFound(what.into()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Unexpected(anyhow::Error::new(e).context("database")).classified()
    }
}

impl From<ledger_replay::ReadError> for ApiError {
    fn from(e: ledger_replay::ReadError) -> Self {
        ApiError::Unexpected(anyhow::Error::new(e))
    }
}

pub const PROBLEM_JSON: &str = "application/problem+json";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let this = self.classified();
        this.render()
    }
}

impl ApiError {
    fn render(self) -> Response {
        let status = self.status();
        let detail = match &self {
            // Internal details stay in the log (with the request id), not in the answer.
            ApiError::Unexpected(e) => {
                tracing::error!(error = format!("{e:#}"), "request failed");
                "an unexpected error occurred; it has been logged".to_owned()
            }
            other => other.to_string(),
        };
        let mut body = json!({
            "type": format!("/problems/{}", self.slug()),
            "title": self.title(),
            "status": status.as_u16(),
            "detail": detail,
        });
        if let ApiError::Validation { field, .. } = &self {
            body["field"] = json!(field);
        }
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let ApiError::RateLimited { retry_after, .. }
        | ApiError::ProjectionLagging { retry_after, .. }
        | ApiError::Unavailable { retry_after, .. } = &self
        {
            if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
