//! The Stripe API side of the HTTP surface: sync a customer on demand, start a checkout
//! (mapping the org to its Stripe customer), the success page that syncs before the
//! webhook arrives, the billing portal and its return page.
//!
//! Handlers translate between HTTP and `sync`/`stripe::client`; they never judge a Stripe
//! fact. The two browser pages (`/checkout/success`, `/portal/return`) always redirect,
//! and only to a relative path or a configured origin (no open redirect).

use aggregates::{Fact, FactSource, OwnerFacts, StripeFacts, SubscriptionCommand};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use projections::{PlatformTables, SubscriptionInfo};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::api::{read_customer, valid_id};
use super::{ApiError, AppState};
use crate::error_chain::error_chain;
use crate::stripe::client::CheckoutParams;
use crate::stripe::objects;
use crate::sync::{SyncSource, Syncer};

fn syncer(state: &AppState) -> Result<&Syncer, ApiError> {
    state.sync.as_ref().ok_or(ApiError::StripeNotConfigured)
}

/// `POST /v1/customers/{id}/sync`: sync now (source `operator`), answer the result.
pub async fn sync_customer(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    valid_id(&customer_id, "customer id")?;
    syncer(&state)?
        .sync_customer(&customer_id, SyncSource::Operator)
        .await?;
    answer(&state, &customer_id).await
}

/// The customer's answer after a sync (a customer Stripe lists nothing for has none).
async fn answer(state: &AppState, customer_id: &str) -> Result<Json<SubscriptionInfo>, ApiError> {
    // What this request (or a concurrent one) recorded must be visible to the read.
    if let Some(syncer) = &state.sync {
        syncer.settle_projections().await;
    }
    let info = read_customer(state, customer_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("customer {customer_id}")))?;
    let mut info = info;
    info.resolve_plan(&state.catalog);
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

/// `POST /v1/checkout/sessions`: the org's customer (found, or created and recorded), a
/// 409 when it already has a live subscription, then one Checkout Session per distinct
/// request (an idempotency key derived from it makes a double-click one session).
pub async fn create_checkout_session(
    State(state): State<AppState>,
    Json(request): Json<CheckoutRequest>,
) -> Result<Json<Value>, ApiError> {
    let required = |value: &Option<String>, what: &'static str| {
        value
            .as_deref()
            .filter(|v| !v.trim().is_empty())
            .map(str::to_owned)
            .ok_or(ApiError::InvalidParameter(what))
    };
    let org_id = required(&request.org_id, "org_id")?;
    let user_id = required(&request.user_id, "user_id")?;
    let price_id = required(&request.price_id, "price_id")?;
    let success_url = required(&request.success_url, "success_url")?;
    let cancel_url = required(&request.cancel_url, "cancel_url")?;
    valid_id(&org_id, "org_id")?;
    valid_id(&user_id, "user_id")?;
    valid_id(&price_id, "price_id")?;
    let email = request.email.filter(|e| !e.trim().is_empty());
    let syncer = syncer(&state)?;

    let held = PlatformTables::for_owner(&state.pool, Some(&org_id), None)
        .await
        .map_err(ApiError::Storage)?;
    if let Some(info) = &held {
        // One subscription per customer: a live one (anything not terminal) blocks a new
        // checkout; the portal is where it is changed.
        let terminal = info.status == SubscriptionInfo::NO_SUBSCRIPTION
            || info
                .status
                .parse::<aggregates::SubscriptionStatus>()
                .is_ok_and(|s| s.is_terminal());
        if !terminal {
            return Err(ApiError::Conflict(format!(
                "org {org_id} already has a subscription ({}) that is {}",
                info.subscription_id.as_deref().unwrap_or("?"),
                info.status
            )));
        }
    }
    let customer_id = match held {
        Some(info) => info.customer_id,
        None => {
            // The same org, user and email always give the same key, so two concurrent
            // first checkouts create one customer.
            let key = derived_key(
                "customer",
                &[&org_id, &user_id, email.as_deref().unwrap_or("")],
            );
            let customer = syncer
                .api()
                .create_customer(&org_id, &user_id, email.as_deref(), &key)
                .await?
                .value;
            let customer_id = objects::text(&customer, "id")
                .ok_or_else(|| ApiError::Sync(unexpected("a customer without an id")))?;
            record_owner(
                syncer,
                &customer_id,
                OwnerFacts {
                    org_id: Some(org_id.clone()),
                    user_id: Some(user_id.clone()),
                },
                format!("api_customer_{customer_id}"),
                "api.customer.create",
                objects::created(&customer).unwrap_or_else(Utc::now),
            )
            .await?;
            customer_id
        }
    };

    let success = match &state.settings.public_url {
        Some(public) => {
            allowed_redirect(&state, &success_url)?;
            format!(
                "{public}/checkout/success?session_id={{CHECKOUT_SESSION_ID}}&redirect={}",
                percent_encode(&success_url)
            )
        }
        None => success_url.clone(),
    };
    let key = derived_key(
        "checkout",
        &[
            &customer_id,
            &org_id,
            &user_id,
            &price_id,
            &success_url,
            &cancel_url,
        ],
    );
    let session = syncer
        .api()
        .create_checkout_session(
            &CheckoutParams {
                customer_id: &customer_id,
                org_id: &org_id,
                user_id: &user_id,
                price_id: &price_id,
                success_url: &success,
                cancel_url: &cancel_url,
            },
            &key,
        )
        .await?
        .value;
    Ok(Json(json!({
        "url": objects::text(&session, "url"),
        "session_id": objects::text(&session, "id"),
        "customer_id": customer_id,
    })))
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
    allowed_redirect(&state, &redirect)?;
    let session_id = query
        .session_id
        .ok_or(ApiError::InvalidParameter("session_id"))?;
    valid_id(&session_id, "session_id")?;
    if let Err(error) = sync_session(&state, &session_id, SyncSource::SuccessPage).await {
        tracing::warn!(session_id, error = %error_chain(&error), "success-page sync failed; redirecting anyway");
    }
    Ok(see_other(&redirect))
}

/// `POST /v1/checkout/sessions/{id}/sync`: the success page for SPAs.
pub async fn sync_checkout_session(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    valid_id(&session_id, "session id")?;
    let customer_id = sync_session(&state, &session_id, SyncSource::SuccessPage).await?;
    answer(&state, &customer_id).await
}

/// Reads the session, records the ownership it carries, syncs its customer.
async fn sync_session(
    state: &AppState,
    session_id: &str,
    source: SyncSource,
) -> Result<String, ApiError> {
    let syncer = syncer(state)?;
    let session = syncer
        .api()
        .retrieve_checkout_session(session_id)
        .await?
        .value;
    let (customer_id, owner, created) = objects::checkout_session_owner(&session);
    let customer_id = customer_id
        .ok_or_else(|| ApiError::NotFound(format!("a customer for session {session_id}")))?;
    if !owner.is_empty() {
        record_owner(
            syncer,
            &customer_id,
            owner,
            format!("api_{session_id}"),
            "api.checkout.session.retrieve",
            created.unwrap_or_else(Utc::now),
        )
        .await?;
    }
    syncer.sync_customer(&customer_id, source).await?;
    Ok(customer_id)
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
) -> Result<Json<Value>, ApiError> {
    let return_url = request
        .return_url
        .filter(|url| !url.trim().is_empty())
        .ok_or(ApiError::InvalidParameter("return_url"))?;
    let syncer = syncer(&state)?;
    let customer_id = match (request.customer_id, request.org_id) {
        (Some(customer_id), _) => {
            valid_id(&customer_id, "customer_id")?;
            customer_id
        }
        (None, Some(org_id)) => {
            valid_id(&org_id, "org_id")?;
            PlatformTables::for_owner(&state.pool, Some(&org_id), None)
                .await
                .map_err(ApiError::Storage)?
                .ok_or_else(|| ApiError::NotFound(format!("a customer for org {org_id}")))?
                .customer_id
        }
        (None, None) => return Err(ApiError::InvalidParameter("org_id or customer_id")),
    };
    let back = match &state.settings.public_url {
        Some(public) => {
            allowed_redirect(&state, &return_url)?;
            format!(
                "{public}/portal/return?customer={customer_id}&redirect={}",
                percent_encode(&return_url)
            )
        }
        None => return_url,
    };
    let session = syncer
        .api()
        .create_portal_session(&customer_id, &back)
        .await?
        .value;
    Ok(Json(json!({ "url": objects::text(&session, "url") })))
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
    allowed_redirect(&state, &redirect)?;
    let customer_id = query
        .customer
        .ok_or(ApiError::InvalidParameter("customer"))?;
    valid_id(&customer_id, "customer")?;
    match syncer(&state) {
        Ok(syncer) => {
            if let Err(error) = syncer
                .sync_customer(&customer_id, SyncSource::PortalReturn)
                .await
            {
                tracing::warn!(customer_id, error = %error_chain(&error), "portal-return sync failed; redirecting anyway");
            }
        }
        Err(_) => tracing::warn!("portal return without STRIPE_SECRET_KEY: nothing synced"),
    }
    Ok(see_other(&redirect))
}

/// Records ownership learned from an API answer (a created customer, a checkout session)
/// as the facts of a Stripe object at its `created`.
async fn record_owner(
    syncer: &Syncer,
    customer_id: &str,
    owner: OwnerFacts,
    source_id: String,
    source_type: &str,
    created: DateTime<Utc>,
) -> Result<(), ApiError> {
    let command = SubscriptionCommand::RecordStripeFacts(StripeFacts {
        customer_id: customer_id.to_owned(),
        source: FactSource {
            stripe_event_id: source_id.clone(),
            stripe_event_type: source_type.to_owned(),
            created,
        },
        owner,
        fact: Fact::OwnerOnly,
    });
    let decision = syncer
        .services()
        .ledger
        .execute(customer_id, &command, &source_id)
        .await
        .map_err(|e| ApiError::Sync(e.into()))?;
    if !decision.events.is_empty() {
        // So that the next lookup by org (a second click) finds the mapping.
        syncer.settle_projections().await;
    }
    Ok(())
}

/// Only a relative path or a configured origin: never an open redirect.
fn allowed_redirect(state: &AppState, url: &str) -> Result<(), ApiError> {
    let relative = url.starts_with('/') && !url.starts_with("//") && !url.starts_with("/\\");
    let configured = state.settings.redirect_origins.iter().any(|origin| {
        url == origin
            || url
                .strip_prefix(origin.as_str())
                .is_some_and(|rest| rest.starts_with(['/', '?', '#']))
    });
    if relative || configured {
        Ok(())
    } else {
        Err(ApiError::InvalidParameter(
            "redirect (not an allowed origin)",
        ))
    }
}

fn see_other(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(value) => (StatusCode::SEE_OTHER, [(header::LOCATION, value)]).into_response(),
        Err(_) => ApiError::InvalidParameter("redirect").into_response(),
    }
}

/// An idempotency key from a request's identifying fields: the same request gives the
/// same key (Stripe keeps keys for at least 24 hours).
fn derived_key(kind: &str, parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    format!("subledger-{kind}-{}", hex::encode(&hash.finalize()[..16]))
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters pass).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn unexpected(what: &str) -> crate::sync::SyncError {
    crate::stripe::client::StripeApiError::Unexpected(what.to_owned()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(derived_key("a", &["x", "y"]), derived_key("a", &["x", "y"]));
        assert_ne!(derived_key("a", &["xy", ""]), derived_key("a", &["x", "y"]));
        assert!(derived_key("checkout", &["x"]).len() < 255);
    }

    #[test]
    fn percent_encoding_keeps_unreserved_characters() {
        assert_eq!(
            percent_encode("https://a.b/c?d=e&f"),
            "https%3A%2F%2Fa.b%2Fc%3Fd%3De%26f"
        );
    }
}
