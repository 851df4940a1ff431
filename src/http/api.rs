//! The `/v1` read API: a customer's subscription, an org's or user's entitlements, and
//! the feature check (one feature of those entitlements, from the same single read).
//!
//! The handlers check the id and answer what [`crate::reads`] finds (Redis first, then
//! Postgres). Who may call which route is decided before they run
//! (`auth::require_reader`); they must never read a table or the cache themselves.

use axum::extract::{Path, State};
use axum::Json;
use projections::{Entitlement, FeatureAccess, SubscriptionInfo};

use super::params::{valid_feature, valid_id};
use super::{ApiError, AppState};

pub async fn customer_subscription(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    valid_id(&customer_id, "customer id")?;
    let info = state
        .reads
        .customer(&customer_id)
        .await
        .map_err(ApiError::storage)?
        .ok_or_else(|| ApiError::NotFound(format!("customer {customer_id}")))?;
    Ok(Json(info))
}

pub async fn org_entitlements(
    State(state): State<AppState>,
    Path(org_id): Path<String>,
) -> Result<Json<Entitlement>, ApiError> {
    valid_id(&org_id, "org id")?;
    let entitlement = state
        .reads
        .org_entitlement(&org_id)
        .await
        .map_err(ApiError::storage)?;
    Ok(Json(entitlement))
}

pub async fn user_entitlements(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Json<Entitlement>, ApiError> {
    valid_id(&user_id, "user id")?;
    let entitlement = state
        .reads
        .user_entitlement(&user_id)
        .await
        .map_err(ApiError::storage)?;
    Ok(Json(entitlement))
}

/// `GET /v1/orgs/{org_id}/entitlements/{feature}`: the org's entitlement, read once as
/// [`org_entitlements`] reads it, narrowed to one feature.
pub async fn org_feature(
    State(state): State<AppState>,
    Path((org_id, feature)): Path<(String, String)>,
) -> Result<Json<FeatureAccess>, ApiError> {
    valid_id(&org_id, "org id")?;
    valid_feature(&feature)?;
    let entitlement = state
        .reads
        .org_entitlement(&org_id)
        .await
        .map_err(ApiError::storage)?;
    Ok(Json(entitlement.feature(&feature)))
}

/// `GET /v1/users/{user_id}/entitlements/{feature}`, as [`org_feature`].
pub async fn user_feature(
    State(state): State<AppState>,
    Path((user_id, feature)): Path<(String, String)>,
) -> Result<Json<FeatureAccess>, ApiError> {
    valid_id(&user_id, "user id")?;
    valid_feature(&feature)?;
    let entitlement = state
        .reads
        .user_entitlement(&user_id)
        .await
        .map_err(ApiError::storage)?;
    Ok(Json(entitlement.feature(&feature)))
}
