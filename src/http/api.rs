//! The `/v1` read API: a customer's subscription and an org's or user's entitlements.
//!
//! Reads go to Redis first and fall back to the Postgres projection when a key is
//! missing (or Redis is down), writing the answer back for next time. Redis is never
//! trusted over Postgres: a cached value that names another org is ignored. Who may call
//! which route is decided before these handlers run (`auth::require_reader`).

use axum::extract::{Path, State};
use axum::Json;
use projections::{Entitlement, PlatformTables, SubscriptionInfo};

use super::{ApiError, AppState};
use crate::metrics::{self, CacheRead};

/// Stripe-shaped ids: letters, digits, `_` and `-`, at most 255 characters.
pub(crate) fn valid_id(id: &str, what: &'static str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidParameter(what))
    }
}

pub async fn customer_subscription(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    valid_id(&customer_id, "customer id")?;
    let mut info = read_customer(&state, &customer_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("customer {customer_id}")))?;
    info.resolve_plan(&state.catalog);
    Ok(Json(info))
}

pub async fn org_entitlements(
    State(state): State<AppState>,
    Path(org_id): Path<String>,
) -> Result<Json<Entitlement>, ApiError> {
    valid_id(&org_id, "org id")?;
    let info = read_owner(&state, Some(&org_id), None).await?;
    Ok(Json(state.catalog.entitlement(
        Some(&org_id),
        None,
        info.as_ref(),
        chrono::Utc::now(),
    )))
}

pub async fn user_entitlements(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Json<Entitlement>, ApiError> {
    valid_id(&user_id, "user id")?;
    let info = read_owner(&state, None, Some(&user_id)).await?;
    Ok(Json(state.catalog.entitlement(
        None,
        Some(&user_id),
        info.as_ref(),
        chrono::Utc::now(),
    )))
}

/// Cache first, then the table (writing the answer back to the cache).
pub async fn read_customer(
    state: &AppState,
    customer_id: &str,
) -> Result<Option<SubscriptionInfo>, ApiError> {
    match state.cache.customer(customer_id).await {
        Ok(Some(info)) => {
            metrics::cache_read(CacheRead::Hit);
            return Ok(Some(info));
        }
        Ok(None) => metrics::cache_read(CacheRead::Miss),
        Err(error) => {
            metrics::cache_read(CacheRead::Fallback);
            tracing::warn!(%error, "cache read failed; reading Postgres")
        }
    }
    let info = PlatformTables::customer(&state.pool, customer_id)
        .await
        .map_err(ApiError::Storage)?;
    if let Some(info) = &info {
        write_back(state, info).await;
    }
    Ok(info)
}

async fn read_owner(
    state: &AppState,
    org_id: Option<&str>,
    user_id: Option<&str>,
) -> Result<Option<SubscriptionInfo>, ApiError> {
    let mut failed = false;
    let cached = match state.cache.customer_id_for(org_id, user_id).await {
        Ok(Some(customer_id)) => state
            .cache
            .customer(&customer_id)
            .await
            .unwrap_or_else(|error| {
                failed = true;
                tracing::warn!(%error, "cache read failed; reading Postgres");
                None
            }),
        Ok(None) => None,
        Err(error) => {
            failed = true;
            tracing::warn!(%error, "cache read failed; reading Postgres");
            None
        }
    };
    // A mapping key can outlive a change of owner: only trust a value that names the owner.
    if let Some(info) = cached {
        let matches = org_id.is_none_or(|org| info.org_id.as_deref() == Some(org))
            && user_id.is_none_or(|user| info.user_id.as_deref() == Some(user));
        if matches {
            metrics::cache_read(CacheRead::Hit);
            return Ok(Some(info));
        }
    }
    metrics::cache_read(if failed {
        CacheRead::Fallback
    } else {
        CacheRead::Miss
    });
    let info = PlatformTables::for_owner(&state.pool, org_id, user_id)
        .await
        .map_err(ApiError::Storage)?;
    if let Some(info) = &info {
        write_back(state, info).await;
    }
    Ok(info)
}

async fn write_back(state: &AppState, info: &SubscriptionInfo) {
    if let Err(error) = state.cache.put(info).await {
        metrics::METRICS
            .cache_write_failures
            .with_label_values(&["read_through"])
            .inc();
        tracing::warn!(error = %crate::error_chain::error_chain(&error), "cache write-back failed");
    }
}
