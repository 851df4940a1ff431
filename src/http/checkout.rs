//! The Stripe API side of the HTTP surface: sync a customer on demand, start a checkout,
//! the success page that syncs before the webhook arrives, the billing portal and its
//! return page.
//!
//! Handlers check their parameters and call [`crate::billing`] (checkout and portal
//! rules) or [`crate::sync`]; they never judge a Stripe fact nor call Stripe themselves.
//! The two browser pages (`/checkout/success`, `/portal/return`) always redirect, and only
//! to a relative path or a configured origin (no open redirect).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use projections::SubscriptionInfo;
use serde::Deserialize;

use super::error::ErrorBody;
use super::params::valid_id;
use super::{ApiError, AppState};
use crate::billing::{
    allowed_redirect, Billing, CheckoutSession, NewCheckout, PortalFor, PortalSession,
};
use crate::error_chain::error_chain;
use crate::sync::{SyncReport, Syncer};
use crate::sync_log::SyncSource;

fn syncer(state: &AppState) -> Result<&Syncer, ApiError> {
    state.sync.as_ref().ok_or(ApiError::StripeNotConfigured)
}

fn billing(state: &AppState) -> Result<&Billing, ApiError> {
    state.billing.as_ref().ok_or(ApiError::StripeNotConfigured)
}

/// `POST /v1/customers/{id}/sync`: sync now (source `operator`), answer the result.
#[utoipa::path(
    post, path = "/v1/customers/{customer_id}/sync", tag = "stripe",
    summary = "Sync a customer from Stripe's API now",
    description = "Asks Stripe for the customer's subscriptions, records what differs through the ledger, and answers the result.",
    params(("customer_id" = String, Path, description = "A Stripe customer id", example = "cus_123", pattern = "^[A-Za-z0-9_-]{1,255}$")),
    responses(
        (status = 200, description = "The subscription after the sync", body = SubscriptionInfo),
        (status = 400, description = "A malformed id (`invalid_parameter`) or Stripe refused the request (`stripe_refused`)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody), (status = 403, description = "An org-scoped token (it reads its own entitlements only: `forbidden`)", body = ErrorBody),
        (status = 404, description = "Neither Stripe nor the ledger knows the customer (`not_found`)", body = ErrorBody),
        (status = 502, description = "Stripe could not be reached or kept failing (`stripe_unavailable`); the sync is recorded and retried", body = ErrorBody), (status = 503, description = "`STRIPE_SECRET_KEY` unset (`stripe_not_configured`) or Postgres unavailable (`storage_unavailable`); retry", body = ErrorBody),
    ),
    security(("api_token" = [])),
)]
pub async fn sync_customer(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    let Path(customer_id) = path?;
    valid_id(&customer_id, "customer id")?;
    let report = syncer(&state)?
        .sync_customer(&customer_id, SyncSource::Operator)
        .await?;
    answer(&state, report).await
}

/// The customer's answer after a sync: the one the sync decided (what the projections will
/// hold), so nothing waits for them; read from them only when the sync could not build it
/// (a customer the log does not hold has none).
async fn answer(state: &AppState, report: SyncReport) -> Result<Json<SubscriptionInfo>, ApiError> {
    let customer_id = &report.customer_id;
    let mut info = match report.info {
        Some(info) => info,
        None => state
            .reads
            .customer(customer_id)
            .await
            .map_err(ApiError::storage)?
            .ok_or_else(|| ApiError::NotFound(format!("customer {customer_id}")))?,
    };
    info.resolve(state.reads.catalog(), chrono::Utc::now());
    Ok(Json(info))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "org_id": "org_123", "user_id": "user_9", "email": "ada@example.com",
    "price_id": "price_pro_monthly", "success_url": "https://app.example.com/billing/done",
    "cancel_url": "https://app.example.com/billing"
}))]
pub struct CheckoutRequest {
    pub org_id: Option<String>,
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub price_id: Option<String>,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
}

/// A parameter that must be present and not blank.
fn required(value: Option<String>, what: &'static str) -> Result<String, ApiError> {
    value
        .filter(|v| !v.trim().is_empty())
        .ok_or(ApiError::InvalidParameter(what))
}

impl CheckoutRequest {
    fn check(self) -> Result<NewCheckout, ApiError> {
        let new = NewCheckout {
            org_id: required(self.org_id, "org_id")?,
            user_id: required(self.user_id, "user_id")?,
            price_id: required(self.price_id, "price_id")?,
            success_url: required(self.success_url, "success_url")?,
            cancel_url: required(self.cancel_url, "cancel_url")?,
            email: self.email.filter(|e| !e.trim().is_empty()),
        };
        valid_id(&new.org_id, "org_id")?;
        valid_id(&new.user_id, "user_id")?;
        valid_id(&new.price_id, "price_id")?;
        Ok(new)
    }
}

/// `POST /v1/checkout/sessions`: a Checkout Session for the org (409 when it already has
/// a live subscription).
#[utoipa::path(
    post, path = "/v1/checkout/sessions", tag = "stripe",
    summary = "Start a Stripe Checkout for an org",
    description = "Creates (once per request, by idempotency key) a subscription Checkout Session whose metadata names the org and user. `org_id`, `user_id`, `price_id`, `success_url` and `cancel_url` are required.",
    request_body = CheckoutRequest,
    responses(
        (status = 200, description = "The session to redirect the browser to", body = CheckoutSession),
        (status = 400, description = "A missing or malformed field (`invalid_parameter`) or Stripe refused it (`stripe_refused`)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody), (status = 403, description = "An org-scoped token (it reads its own entitlements only: `forbidden`)", body = ErrorBody),
        (status = 409, description = "The org already has a subscription that is not terminal (`conflict`)", body = ErrorBody),
        (status = 502, description = "Stripe could not be reached or kept failing (`stripe_unavailable`); the sync is recorded and retried", body = ErrorBody), (status = 503, description = "`STRIPE_SECRET_KEY` unset (`stripe_not_configured`) or Postgres unavailable (`storage_unavailable`); retry", body = ErrorBody),
    ),
    security(("api_token" = [])),
)]
pub async fn create_checkout_session(
    State(state): State<AppState>,
    body: Result<Json<CheckoutRequest>, JsonRejection>,
) -> Result<Json<CheckoutSession>, ApiError> {
    let Json(request) = body?;
    let new = request.check()?;
    Ok(Json(billing(&state)?.checkout(&new).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct SuccessQuery {
    pub session_id: Option<String>,
    pub redirect: Option<String>,
    /// Whose session it is, when the customer lives in a connected account (subledger's
    /// own success URL says so): the session is read in that account.
    pub customer: Option<String>,
}

/// `GET /checkout/success?session_id=…&redirect=…`: sync the session's customer, then
/// redirect. A failed sync still redirects; it is recorded and retried.
#[utoipa::path(
    get, path = "/checkout/success", tag = "pages",
    summary = "Checkout's return page (browsers)",
    description = "Syncs the session's customer, waits (bounded) until the read models show it, then redirects. A failed sync still redirects (it is recorded and retried).",
    params(SuccessQuery),
    responses(
        (status = 303, description = "To `redirect` (default `/`)", headers(("location" = String, description = "Where the browser goes next"))),
        (status = 400, description = "No `session_id`, a malformed `session_id` or `customer`, or `redirect` to an origin not in `SUBLEDGER_REDIRECT_ORIGINS` (`invalid_parameter`)", body = ErrorBody),
        (status = 503, description = "`STRIPE_SECRET_KEY` unset (`stripe_not_configured`)", body = ErrorBody),
    ),
)]
pub async fn success_page(
    State(state): State<AppState>,
    query: Result<Query<SuccessQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let redirect = query.redirect.unwrap_or_else(|| "/".to_owned());
    allowed_redirect(&state.settings.redirect_origins, &redirect)?;
    let session_id = query
        .session_id
        .ok_or(ApiError::InvalidParameter("session_id"))?;
    valid_id(&session_id, "session_id")?;
    if let Some(customer) = &query.customer {
        valid_id(customer, "customer")?;
    }
    match sync_session(&state, &session_id, query.customer.as_deref()).await {
        // The app reads right after the redirect: it must see what the sync recorded.
        Ok(report) => syncer(&state)?.wait_until_shown(&report).await,
        Err(error) => {
            tracing::warn!(session_id, error = %error_chain(&error), "success-page sync failed; redirecting anyway")
        }
    }
    Ok(see_other(&redirect))
}

/// `POST /v1/checkout/sessions/{id}/sync`: the success page for SPAs.
#[utoipa::path(
    post, path = "/v1/checkout/sessions/{session_id}/sync", tag = "stripe",
    summary = "Checkout's success step for single-page apps",
    description = "Syncs the Checkout Session's customer and answers its subscription.",
    params(("session_id" = String, Path, description = "A Checkout Session id", example = "cs_test_123", pattern = "^[A-Za-z0-9_-]{1,255}$")),
    responses(
        (status = 200, description = "The subscription after the sync", body = SubscriptionInfo),
        (status = 400, description = "A malformed id (`invalid_parameter`) or Stripe refused the request (`stripe_refused`)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody), (status = 403, description = "An org-scoped token (it reads its own entitlements only: `forbidden`)", body = ErrorBody),
        (status = 404, description = "No customer for that session (`not_found`)", body = ErrorBody),
        (status = 502, description = "Stripe could not be reached or kept failing (`stripe_unavailable`); the sync is recorded and retried", body = ErrorBody), (status = 503, description = "`STRIPE_SECRET_KEY` unset (`stripe_not_configured`) or Postgres unavailable (`storage_unavailable`); retry", body = ErrorBody),
    ),
    security(("api_token" = [])),
)]
pub async fn sync_checkout_session(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    let Path(session_id) = path?;
    valid_id(&session_id, "session id")?;
    let report = sync_session(&state, &session_id, None).await?;
    answer(&state, report).await
}

/// What both success pages do (see `Billing::sync_session`); returns the sync's report.
async fn sync_session(
    state: &AppState,
    session_id: &str,
    customer: Option<&str>,
) -> Result<SyncReport, ApiError> {
    let billing = billing(state)?;
    Ok(billing
        .sync_session(session_id, customer, SyncSource::SuccessPage)
        .await?)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"org_id": "org_123", "return_url": "https://app.example.com/billing"}))]
pub struct PortalRequest {
    pub org_id: Option<String>,
    pub customer_id: Option<String>,
    pub return_url: Option<String>,
}

/// `POST /v1/portal/sessions`: a billing portal session for the org's (or the named)
/// customer, returning through `/portal/return` when `SUBLEDGER_PUBLIC_URL` is set.
#[utoipa::path(
    post, path = "/v1/portal/sessions", tag = "stripe",
    summary = "Open Stripe's billing portal",
    description = "A billing portal session for the org's customer (or the named customer). `return_url` and one of `org_id`, `customer_id` are required.",
    request_body = PortalRequest,
    responses(
        (status = 200, description = "The portal URL", body = PortalSession),
        (status = 400, description = "A missing or malformed field (`invalid_parameter`) or Stripe refused it (`stripe_refused`)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody), (status = 403, description = "An org-scoped token (it reads its own entitlements only: `forbidden`)", body = ErrorBody),
        (status = 404, description = "No customer for that org (`not_found`)", body = ErrorBody),
        (status = 502, description = "Stripe could not be reached or kept failing (`stripe_unavailable`); the sync is recorded and retried", body = ErrorBody), (status = 503, description = "`STRIPE_SECRET_KEY` unset (`stripe_not_configured`) or Postgres unavailable (`storage_unavailable`); retry", body = ErrorBody),
    ),
    security(("api_token" = [])),
)]
pub async fn create_portal_session(
    State(state): State<AppState>,
    body: Result<Json<PortalRequest>, JsonRejection>,
) -> Result<Json<PortalSession>, ApiError> {
    let Json(request) = body?;
    let return_url = required(request.return_url, "return_url")?;
    let billing = billing(&state)?;
    let whose = match (request.customer_id, request.org_id) {
        (Some(customer_id), _) => {
            valid_id(&customer_id, "customer_id")?;
            PortalFor::Customer(customer_id)
        }
        (None, Some(org_id)) => {
            valid_id(&org_id, "org_id")?;
            PortalFor::Org(org_id)
        }
        (None, None) => return Err(ApiError::InvalidParameter("org_id or customer_id")),
    };
    Ok(Json(billing.portal(whose, &return_url).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct PortalReturnQuery {
    pub customer: Option<String>,
    pub redirect: Option<String>,
}

/// `GET /portal/return?customer=…&redirect=…`: sync, then redirect, so a change made in
/// the portal shows at once (before its webhooks). A failed sync still redirects.
#[utoipa::path(
    get, path = "/portal/return", tag = "pages",
    summary = "The billing portal's return page (browsers)",
    description = "Syncs the customer (when Stripe is configured), then redirects, so a change made in the portal shows at once. A failed sync still redirects.",
    params(PortalReturnQuery),
    responses(
        (status = 303, description = "To `redirect` (default `/`)", headers(("location" = String, description = "Where the browser goes next"))),
        (status = 400, description = "No `customer`, or `redirect` to an origin not allowed (`invalid_parameter`)", body = ErrorBody),
    ),
)]
pub async fn portal_return(
    State(state): State<AppState>,
    query: Result<Query<PortalReturnQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let redirect = query.redirect.unwrap_or_else(|| "/".to_owned());
    allowed_redirect(&state.settings.redirect_origins, &redirect)?;
    let customer_id = query
        .customer
        .ok_or(ApiError::InvalidParameter("customer"))?;
    valid_id(&customer_id, "customer")?;
    match syncer(&state) {
        Ok(syncer) => {
            match syncer
                .sync_customer(&customer_id, SyncSource::PortalReturn)
                .await
            {
                // The app reads right after the redirect: it must see what the sync recorded.
                Ok(report) => syncer.wait_until_shown(&report).await,
                Err(error) => {
                    tracing::warn!(customer_id, error = %error_chain(&error), "portal-return sync failed; redirecting anyway")
                }
            }
        }
        Err(_) => tracing::warn!("portal return without STRIPE_SECRET_KEY: nothing synced"),
    }
    Ok(see_other(&redirect))
}

fn see_other(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(value) => (StatusCode::SEE_OTHER, [(header::LOCATION, value)]).into_response(),
        Err(_) => ApiError::InvalidParameter("redirect").into_response(),
    }
}
