//! The one HTTP error type. Each variant's doc names its status. Internal errors are
//! logged with their cause chain and answered without detail; no secret ever reaches a
//! response body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::billing::BillingError;
use crate::db_error::{self, Failure, Refusal, Refused};
use crate::error_chain::error_chain;
use crate::stripe::{ParseError, SignatureError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the `Stripe-Signature` header is missing, malformed, stale or wrong.
    #[error("invalid Stripe signature: {0}")]
    Signature(SignatureError),
    /// 500: no webhook signing secret is configured (Stripe will retry once it is).
    #[error("the webhook signing secret is not configured")]
    NoWebhookSecret,
    /// 500: no EventBridge header secret is configured, so `POST /webhooks/eventbridge`
    /// refuses everything (EventBridge retries once it is).
    #[error("the EventBridge secret is not configured")]
    NoEventBridgeSecret,
    /// 400: the body is not JSON, or not a Stripe event.
    #[error(transparent)]
    Payload(#[from] ParseError),
    /// 400: a request parameter is not valid.
    #[error("invalid {0}")]
    InvalidParameter(&'static str),
    /// 408: the body did not arrive whole within `SUBLEDGER_BODY_TIMEOUT_MS` of the
    /// request head (the connection is closed).
    #[error("the request body did not arrive within {} ms", .0.as_millis())]
    BodyTimeout(std::time::Duration),
    /// 413: the body is larger than the configured limit.
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 401: the bearer token is missing or wrong.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// 403: the token is valid but may not read this (an org-scoped token, another org).
    #[error("this token may not read that")]
    Forbidden,
    /// 404: nothing by that id (or no such route).
    #[error("{0} not found")]
    NotFound(String),
    /// 503: Postgres is unreachable or could not do it now (see `db_error`); nothing was
    /// stored, retry later. Built by [`ApiError::storage`], which makes a refused value a
    /// [`ApiError::RefusedValue`] instead.
    #[error("storage is unavailable")]
    Storage(#[source] sqlx::Error),
    /// 400: a request parameter holds a value Postgres refuses for its content (a NUL
    /// character, say): the same request can never succeed.
    #[error("a parameter holds {}", .0.describe())]
    RefusedValue(Refusal),
    /// 503: the inbox could not store the webhook; nothing was stored, Stripe retries.
    #[error("storage is unavailable")]
    Inbox(#[source] crate::inbox::InboxError),
    /// 400: the event holds a value Postgres refuses for its content (a NUL character, an
    /// id longer than any Stripe id, a time out of range): permanent, so never a 503
    /// (Stripe would retry it for three days, and alerts would say Postgres is down).
    #[error("the event cannot be stored: {0}")]
    UnstorableEvent(Refused),
    /// 409: the request conflicts with what we hold (the org already has a subscription
    /// that is not terminal: `BillingError::LiveSubscription`).
    #[error("{0}")]
    Conflict(String),
    /// 503: `STRIPE_SECRET_KEY` is not configured, so nothing can be asked of Stripe.
    #[error("Stripe's API is not configured")]
    StripeNotConfigured,
    /// 400: Stripe refused the request (its message is passed on: it names the parameter,
    /// never a secret).
    #[error("Stripe refused the request: {0}")]
    StripeRefused(String),
    /// 502: Stripe could not be reached, kept failing, or answered unexpectedly; or what
    /// it answered could not be recorded.
    #[error("syncing with Stripe failed")]
    Sync(#[source] crate::sync::SyncError),
}

impl From<crate::sync::SyncError> for ApiError {
    fn from(error: crate::sync::SyncError) -> Self {
        match error {
            crate::sync::SyncError::Database(error) => ApiError::storage(error),
            crate::sync::SyncError::Stripe(crate::stripe::client::StripeApiError::Refused {
                message,
                ..
            }) => ApiError::StripeRefused(message),
            other => ApiError::Sync(other),
        }
    }
}

impl From<BillingError> for ApiError {
    fn from(error: BillingError) -> Self {
        match error {
            live @ BillingError::LiveSubscription { .. } => ApiError::Conflict(live.to_string()),
            BillingError::NoCustomerForOrg(org_id) => {
                ApiError::NotFound(format!("a customer for org {org_id}"))
            }
            BillingError::NoCustomerForSession(session_id) => {
                ApiError::NotFound(format!("a customer for session {session_id}"))
            }
            BillingError::RedirectNotAllowed => {
                ApiError::InvalidParameter("redirect (not an allowed origin)")
            }
            BillingError::Storage(error) => ApiError::storage(error),
            BillingError::Stripe(error) => error.into(),
            BillingError::Sync(error) => error.into(),
            BillingError::RecordOwner(error) | BillingError::ReadLog(error) => {
                ApiError::Sync(error.into())
            }
        }
    }
}

impl From<crate::stripe::client::StripeApiError> for ApiError {
    fn from(error: crate::stripe::client::StripeApiError) -> Self {
        crate::sync::SyncError::from(error).into()
    }
}

impl From<SignatureError> for ApiError {
    fn from(error: SignatureError) -> Self {
        match error {
            SignatureError::NoSecret => ApiError::NoWebhookSecret,
            other => ApiError::Signature(other),
        }
    }
}

impl ApiError {
    /// A database error as the caller should see it: 400 when Postgres refused a value of
    /// the request for its content, 503 when it is unavailable.
    pub fn storage(error: sqlx::Error) -> Self {
        match db_error::classify(&error) {
            Failure::Refused(refusal) => ApiError::RefusedValue(refusal),
            Failure::Transient => ApiError::Storage(error),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Signature(_)
            | ApiError::Payload(_)
            | ApiError::InvalidParameter(_)
            | ApiError::RefusedValue(_)
            | ApiError::UnstorableEvent(_) => StatusCode::BAD_REQUEST,
            ApiError::NoWebhookSecret | ApiError::NoEventBridgeSecret => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Storage(_) | ApiError::Inbox(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::StripeNotConfigured => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::StripeRefused(_) => StatusCode::BAD_REQUEST,
            ApiError::Sync(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Signature(_) => "invalid_signature",
            ApiError::NoWebhookSecret | ApiError::NoEventBridgeSecret => "not_configured",
            ApiError::Payload(_) => "invalid_event",
            ApiError::InvalidParameter(_) => "invalid_parameter",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Storage(_) | ApiError::Inbox(_) => "storage_unavailable",
            ApiError::RefusedValue(_) => "invalid_parameter",
            ApiError::UnstorableEvent(_) => "unstorable_event",
            ApiError::Conflict(_) => "conflict",
            ApiError::StripeNotConfigured => "stripe_not_configured",
            ApiError::StripeRefused(_) => "stripe_refused",
            ApiError::Sync(_) => "stripe_unavailable",
        }
    }
}

/// Every error's body: `{"error": {"code", "message"}}` (the OpenAPI document's
/// `ErrorBody`; each operation lists the statuses it can answer).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"error": {"code": "invalid_parameter", "message": "invalid org id"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable word to branch on: `invalid_signature`, `invalid_event`,
    /// `invalid_parameter`, `unstorable_event`, `payload_too_large`, `body_timeout`,
    /// `unauthorized`, `forbidden`, `not_found`, `conflict`, `stripe_refused`,
    /// `stripe_unavailable`, `stripe_not_configured`, `storage_unavailable`,
    /// `not_configured`.
    pub code: &'static str,
    /// For people; never holds a secret.
    pub message: String,
}

/// A path segment that is not valid UTF-8 once decoded (or of the wrong type).
impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(_: axum::extract::rejection::PathRejection) -> Self {
        ApiError::InvalidParameter("path parameter")
    }
}

/// A body that is not JSON, not of the documented shape, or sent without
/// `Content-Type: application/json`.
impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(_: axum::extract::rejection::JsonRejection) -> Self {
        ApiError::InvalidParameter("JSON body")
    }
}

/// A query string that cannot be decoded.
impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(_: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::InvalidParameter("query string")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %error_chain(&self), "request failed");
        }
        let body = Json(ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        });
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("5"));
        }
        response
    }
}
