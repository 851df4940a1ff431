//! The `/v1` read API: a customer's subscription, an org's or user's entitlements, and
//! the feature check (one feature of those entitlements, from the same single read).
//!
//! The handlers check the id and answer what [`crate::reads`] finds (Redis first, then
//! Postgres). Who may call which route is decided before they run
//! (`auth::reader`, in a `layers::Guard`); they must never read a table or the cache themselves.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use projections::{Entitlement, FeatureAccess, Owner, SubscriptionInfo};

use super::error::ErrorBody;
use super::params::{valid_feature, valid_id};
use super::{ApiError, AppState};

/// `GET /v1/customers/{customer_id}/subscription`.
#[utoipa::path(
    get, path = "/v1/customers/{customer_id}/subscription", tag = "entitlements",
    summary = "A Stripe customer's subscription",
    description = "The customer's current subscription as the ledger holds it (status `none` when the customer has none). Redis first, then Postgres.",
    params(("customer_id" = String, Path, description = "A Stripe customer id", example = "cus_123", pattern = "^[A-Za-z0-9_-]{1,255}$")),
    responses(
        (status = 200, description = "The subscription", body = SubscriptionInfo),
        (status = 400, description = "A malformed id or feature (`invalid_parameter`)", body = ErrorBody), (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody), (status = 403, description = "An org-scoped token asking about another org (`forbidden`)", body = ErrorBody),
        (status = 404, description = "A customer the ledger never saw (`not_found`)", body = ErrorBody),
        (status = 503, description = "Postgres unavailable and the cache could not answer (`storage_unavailable`); retry", body = ErrorBody),
    ),
    security(("api_token" = [])),
)]
pub async fn customer_subscription(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    let Path(customer_id) = path?;
    valid_id(&customer_id, "customer id")?;
    let info = state
        .reads
        .customer(&customer_id)
        .await
        .map_err(ApiError::storage)?
        .ok_or_else(|| ApiError::NotFound(format!("customer {customer_id}")))?;
    Ok(Json(info))
}

/// `GET /v1/orgs/{org_id}/entitlements`.
#[utoipa::path(
    get, path = "/v1/orgs/{org_id}/entitlements", tag = "entitlements",
    summary = "What an org may use now",
    description = "Status, plan, features and the end of access of the org's customer. An org never seen has `access: false`, status `none`.",
    params(("org_id" = String, Path, description = "The org id the checkout named", example = "org_123", pattern = "^[A-Za-z0-9_-]{1,255}$")),
    responses(
        (status = 200, description = "The entitlement", body = Entitlement),
        (status = 400, description = "A malformed id or feature (`invalid_parameter`)", body = ErrorBody), (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody), (status = 403, description = "An org-scoped token asking about another org (`forbidden`)", body = ErrorBody), (status = 503, description = "Postgres unavailable and the cache could not answer (`storage_unavailable`); retry", body = ErrorBody),
    ),
    security(("api_token" = []), ("org_token" = [])),
)]
pub async fn org_entitlements(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(org_id) = path?;
    valid_id(&org_id, "org id")?;
    let body = state
        .reads
        .entitlement_body(Owner::Org, &org_id)
        .await
        .map_err(ApiError::storage)?;
    Ok(json_body(body))
}

/// An answer already serialized as JSON (an [`Entitlement`]), sent as `Json` sends one.
fn json_body(body: bytes::Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// `GET /v1/users/{user_id}/entitlements`.
#[utoipa::path(
    get, path = "/v1/users/{user_id}/entitlements", tag = "entitlements",
    summary = "What an user may use now",
    description = "Status, plan, features and the end of access of the user's customer. An user never seen has `access: false`, status `none`.",
    params(("user_id" = String, Path, description = "The user id the checkout named", example = "user_9", pattern = "^[A-Za-z0-9_-]{1,255}$")),
    responses(
        (status = 200, description = "The entitlement", body = Entitlement),
        (status = 400, description = "A malformed id or feature (`invalid_parameter`)", body = ErrorBody), (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody), (status = 403, description = "An org-scoped token asking about another org (`forbidden`)", body = ErrorBody), (status = 503, description = "Postgres unavailable and the cache could not answer (`storage_unavailable`); retry", body = ErrorBody),
    ),
    security(("api_token" = [])),
)]
pub async fn user_entitlements(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(user_id) = path?;
    valid_id(&user_id, "user id")?;
    let body = state
        .reads
        .entitlement_body(Owner::User, &user_id)
        .await
        .map_err(ApiError::storage)?;
    Ok(json_body(body))
}

/// `GET /v1/orgs/{org_id}/entitlements/{feature}`: the org's entitlement, read once as
/// [`org_entitlements`] reads it, narrowed to one feature.
#[utoipa::path(
    get, path = "/v1/orgs/{org_id}/entitlements/{feature}", tag = "entitlements",
    summary = "May this org use this feature now?",
    description = "One feature of the org's entitlement, from the same single read: `access` is true exactly when the entitlement grants access and lists the feature. An unknown org or feature is `access: false`.",
    params(
        ("org_id" = String, Path, description = "The org id the checkout named", example = "org_123", pattern = "^[A-Za-z0-9_-]{1,255}$"),
        ("feature" = String, Path, description = "A feature name from the catalogue", example = "api", pattern = "^[A-Za-z0-9_.:-]{1,255}$"),
    ),
    responses(
        (status = 200, description = "The feature check", body = FeatureAccess),
        (status = 400, description = "A malformed id or feature (`invalid_parameter`)", body = ErrorBody), (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody), (status = 403, description = "An org-scoped token asking about another org (`forbidden`)", body = ErrorBody), (status = 503, description = "Postgres unavailable and the cache could not answer (`storage_unavailable`); retry", body = ErrorBody),
    ),
    security(("api_token" = []), ("org_token" = [])),
)]
pub async fn org_feature(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<FeatureAccess>, ApiError> {
    let Path((org_id, feature)) = path?;
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
#[utoipa::path(
    get, path = "/v1/users/{user_id}/entitlements/{feature}", tag = "entitlements",
    summary = "May this user use this feature now?",
    description = "One feature of the user's entitlement, from the same single read: `access` is true exactly when the entitlement grants access and lists the feature. An unknown user or feature is `access: false`.",
    params(
        ("user_id" = String, Path, description = "The user id the checkout named", example = "user_9", pattern = "^[A-Za-z0-9_-]{1,255}$"),
        ("feature" = String, Path, description = "A feature name from the catalogue", example = "api", pattern = "^[A-Za-z0-9_.:-]{1,255}$"),
    ),
    responses(
        (status = 200, description = "The feature check", body = FeatureAccess),
        (status = 400, description = "A malformed id or feature (`invalid_parameter`)", body = ErrorBody), (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody), (status = 403, description = "An org-scoped token asking about another org (`forbidden`)", body = ErrorBody), (status = 503, description = "Postgres unavailable and the cache could not answer (`storage_unavailable`); retry", body = ErrorBody),
    ),
    security(("api_token" = [])),
)]
pub async fn user_feature(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<FeatureAccess>, ApiError> {
    let Path((user_id, feature)) = path?;
    valid_id(&user_id, "user id")?;
    valid_feature(&feature)?;
    let entitlement = state
        .reads
        .user_entitlement(&user_id)
        .await
        .map_err(ApiError::storage)?;
    Ok(Json(entitlement.feature(&feature)))
}
