//! The HTTP surface: the Stripe webhook, the `/v1` API, health, metrics, the admin page. Handlers translate
//! between HTTP and the rest of the crate; they must never judge a Stripe fact
//! themselves.

pub mod admin;
pub mod api;
pub mod auth;
pub mod checkout;
pub mod error;
pub mod health;
pub mod metrics;
pub mod ops;
pub mod params;
pub mod serve;
pub mod webhook;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use projections::{Catalog, Projections, RedisCache};
use sqlx::PgPool;

use crate::config::Settings;

pub use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub cache: RedisCache,
    /// The read models' runner: their names and lag.
    pub projections: Projections,
    pub catalog: Arc<Catalog>,
    /// The read models (Redis first, then Postgres).
    pub reads: crate::reads::Reads,
    pub settings: Arc<Settings>,
    /// Wakes the inbox workers when a new event is stored.
    pub inbox_wake: Arc<crate::worker::WorkerWake>,
    /// Stores webhooks, many to a commit under load.
    pub inbox: crate::inbox::InboxWriter,
    /// Syncs with Stripe's API; `None` without `STRIPE_SECRET_KEY`.
    pub sync: Option<crate::sync::Syncer>,
    /// Checkout and the billing portal; `None` without `STRIPE_SECRET_KEY`.
    pub billing: Option<crate::billing::Billing>,
}

pub fn router(state: AppState) -> Router {
    let max_body = state.settings.max_body_bytes;
    let body_timeout = state.settings.body_timeout;
    let v1 = Router::new()
        .route(
            "/customers/:customer_id/subscription",
            get(api::customer_subscription),
        )
        .route("/orgs/:org_id/entitlements", get(api::org_entitlements))
        .route("/users/:user_id/entitlements", get(api::user_entitlements))
        .route("/orgs/:org_id/entitlements/:feature", get(api::org_feature))
        .route(
            "/users/:user_id/entitlements/:feature",
            get(api::user_feature),
        )
        .route(
            "/customers/:customer_id/sync",
            post(checkout::sync_customer),
        )
        .route(
            "/checkout/sessions",
            post(checkout::create_checkout_session),
        )
        .route(
            "/checkout/sessions/:session_id/sync",
            post(checkout::sync_checkout_session),
        )
        .route("/portal/sessions", post(checkout::create_portal_session))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_reader,
        ));
    let ops = Router::new()
        .route("/ops/dead-letters", get(ops::dead_letters))
        .route("/ops/dead-letters/retry", post(ops::retry_all))
        .route("/ops/dead-letters/:event_id/retry", post(ops::retry_one))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin_token,
        ));
    Router::new()
        .route(
            "/webhooks/stripe",
            post(webhook::receive).layer(DefaultBodyLimit::max(max_body)),
        )
        .route(
            "/webhooks/eventbridge",
            post(webhook::receive_eventbridge).layer(DefaultBodyLimit::max(max_body)),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/checkout/success", get(checkout::success_page))
        .route("/portal/return", get(checkout::portal_return))
        .route("/metrics", get(metrics::scrape))
        .merge(admin::router(state.clone()))
        .route("/readyz", get(health::readyz))
        .nest("/v1", v1)
        .merge(ops)
        .fallback(|| async { ApiError::NotFound("route".to_owned()) })
        .layer(axum::middleware::from_fn_with_state(
            body_timeout,
            serve::body_deadline,
        ))
        .layer(axum::middleware::from_fn(metrics::track_http))
        .with_state(state)
}
