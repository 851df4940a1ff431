//! The Stripe API side of the HTTP surface: sync a customer on demand, start a checkout,
//! the success page that syncs before the webhook arrives, the billing portal and its
//! return page.
//!
//! Handlers check their parameters and call [`crate::billing`] (checkout and portal
//! rules) or [`crate::sync`]; they never judge a Stripe fact nor call Stripe themselves.
//! The two browser pages (`/checkout/success`, `/portal/return`) always redirect, and only
//! to a relative path or a configured origin (no open redirect).

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use projections::SubscriptionInfo;
use serde::Deserialize;

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
pub async fn sync_customer(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
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

#[derive(Debug, Deserialize)]
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
pub async fn create_checkout_session(
    State(state): State<AppState>,
    Json(request): Json<CheckoutRequest>,
) -> Result<Json<CheckoutSession>, ApiError> {
    let new = request.check()?;
    Ok(Json(billing(&state)?.checkout(&new).await?))
}

#[derive(Debug, Deserialize)]
pub struct SuccessQuery {
    pub session_id: Option<String>,
    pub redirect: Option<String>,
}

/// `GET /checkout/success?session_id=…&redirect=…`: sync the session's customer, then
/// redirect. A failed sync still redirects; it is recorded and retried.
pub async fn success_page(
    State(state): State<AppState>,
    Query(query): Query<SuccessQuery>,
) -> Result<Response, ApiError> {
    let redirect = query.redirect.unwrap_or_else(|| "/".to_owned());
    allowed_redirect(&state.settings.redirect_origins, &redirect)?;
    let session_id = query
        .session_id
        .ok_or(ApiError::InvalidParameter("session_id"))?;
    valid_id(&session_id, "session_id")?;
    match sync_session(&state, &session_id).await {
        // The app reads right after the redirect: it must see what the sync recorded.
        Ok(report) => syncer(&state)?.wait_until_shown(&report).await,
        Err(error) => {
            tracing::warn!(session_id, error = %error_chain(&error), "success-page sync failed; redirecting anyway")
        }
    }
    Ok(see_other(&redirect))
}

/// `POST /v1/checkout/sessions/{id}/sync`: the success page for SPAs.
pub async fn sync_checkout_session(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    valid_id(&session_id, "session id")?;
    let report = sync_session(&state, &session_id).await?;
    answer(&state, report).await
}

/// What both success pages do (see `Billing::sync_session`); returns the sync's report.
async fn sync_session(state: &AppState, session_id: &str) -> Result<SyncReport, ApiError> {
    let billing = billing(state)?;
    Ok(billing
        .sync_session(session_id, SyncSource::SuccessPage)
        .await?)
}

#[derive(Debug, Deserialize)]
pub struct PortalRequest {
    pub org_id: Option<String>,
    pub customer_id: Option<String>,
    pub return_url: Option<String>,
}

/// `POST /v1/portal/sessions`: a billing portal session for the org's (or the named)
/// customer, returning through `/portal/return` when `SUBLEDGER_PUBLIC_URL` is set.
pub async fn create_portal_session(
    State(state): State<AppState>,
    Json(request): Json<PortalRequest>,
) -> Result<Json<PortalSession>, ApiError> {
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

#[derive(Debug, Deserialize)]
pub struct PortalReturnQuery {
    pub customer: Option<String>,
    pub redirect: Option<String>,
}

/// `GET /portal/return?customer=…&redirect=…`: sync, then redirect, so a change made in
/// the portal shows at once (before its webhooks). A failed sync still redirects.
pub async fn portal_return(
    State(state): State<AppState>,
    Query(query): Query<PortalReturnQuery>,
) -> Result<Response, ApiError> {
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
