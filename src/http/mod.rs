//! The HTTP surface: the Stripe webhook, the `/v1` API, health, metrics, the admin page. Handlers translate
//! between HTTP and the rest of the crate; they must never judge a Stripe fact
//! themselves.
//!
//! The router and its OpenAPI 3.1 description ([`ApiDoc`], served at `GET /openapi.json`
//! and committed as `docs/openapi.json`) sit side by side here: every route is listed in
//! both, and the document is generated from the handlers' `#[utoipa::path]` annotations and
//! the answer types' schema derives, so a change to an answer's shape changes the document
//! (and fails the test that keeps the committed copy equal until it is regenerated).

pub mod admin;
pub mod api;
pub mod auth;
pub mod checkout;
pub mod error;
pub mod health;
pub mod layers;
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

/// The OpenAPI 3.1 document of everything [`router`] serves.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "subledger",
        description = "Stripe webhooks in, one trusted answer out: may this organisation or user use this product, and until when? `/v1` needs the API token (`SUBLEDGER_API_TOKEN`) or, for an org's own entitlements, an org-scoped token; `/ops` and `/admin` the admin token. Every error answers `ErrorBody`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    servers((url = "http://127.0.0.1:8080", description = "`SUBLEDGER_LISTEN`'s default")),
    paths(
        api::org_entitlements,
        api::org_feature,
        api::user_entitlements,
        api::user_feature,
        api::customer_subscription,
        checkout::sync_customer,
        checkout::create_checkout_session,
        checkout::sync_checkout_session,
        checkout::create_portal_session,
        webhook::receive,
        webhook::receive_eventbridge,
        checkout::success_page,
        checkout::portal_return,
        ops::dead_letters,
        ops::retry_all,
        ops::retry_one,
        healthz,
        health::readyz,
        metrics::scrape,
        openapi_json,
        admin::home,
        admin::customer,
        admin::redrive,
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "entitlements", description = "What an org or user may use: the platform's reads"),
        (name = "stripe", description = "Calls that ask Stripe's API (need `STRIPE_SECRET_KEY`)"),
        (name = "webhooks", description = "What Stripe sends"),
        (name = "pages", description = "Browser pages Stripe returns to"),
        (name = "operations", description = "The dead-letter queue (admin token)"),
        (name = "health", description = "Liveness, readiness, metrics, this document (no auth)"),
        (name = "admin", description = "The operators' HTML page"),
    ),
)]
pub struct ApiDoc;

/// The bearer tokens and the admin cookie, as the document's security schemes.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_token",
            bearer("One of `SUBLEDGER_API_TOKEN`'s tokens: reads everything under `/v1`."),
        );
        components.add_security_scheme(
            "org_token",
            bearer("An org-scoped token from `SUBLEDGER_ORG_TOKENS` (`token=org_id`): reads only `/v1/orgs/{its org}/entitlements` and its feature checks; 403 elsewhere."),
        );
        components.add_security_scheme(
            "admin_token",
            bearer("One of `SUBLEDGER_ADMIN_TOKEN`'s tokens: `/ops` and `/admin`."),
        );
        components.add_security_scheme(
            "admin_cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "subledger_admin",
                "The admin page's session, traded once for `?token=`.",
            ))),
        );
    }
}

/// The document as JSON, built once.
pub fn openapi_document() -> &'static serde_json::Value {
    static DOCUMENT: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| {
        serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi())
            .expect("the OpenAPI document serializes")
    })
}

/// `GET /openapi.json`.
#[utoipa::path(
    get, path = "/openapi.json", tag = "health",
    summary = "This document",
    description = "The OpenAPI 3.1 description of the service (the same as `docs/openapi.json` and `subledger openapi`). No auth.",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object)),
)]
async fn openapi_json() -> axum::Json<&'static serde_json::Value> {
    axum::Json(openapi_document())
}

/// `GET /healthz`.
#[utoipa::path(
    get, path = "/healthz", tag = "health",
    summary = "Liveness",
    description = "`ok` while the process is up. No auth.",
    responses((status = 200, description = "Alive", content_type = "text/plain", body = String, example = "ok")),
)]
async fn healthz() -> &'static str {
    "ok"
}

/// What every handler can reach: [`Shared`] behind one `Arc`, because axum clones the
/// state for every `State` extractor and every middleware of every request, and a clone
/// of the parts themselves (connection handles, settings, key prefixes) cost more than
/// the cached read it served.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    /// The last webhook endpoint check (`setup::run_checker`), for `/readyz`.
    pub endpoint_check: crate::setup::LastCheckCell,
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
    // The API's routes carry their whole path and are merged, not nested under `/v1`: a
    // nested router costs every read a prefix strip and a second route lookup, and reads
    // took about a tenth less CPU without them (BENCHMARKS.md, 2026-12-02).
    let v1 = Router::new()
        .route(
            "/v1/customers/:customer_id/subscription",
            get(api::customer_subscription),
        )
        .route("/v1/orgs/:org_id/entitlements", get(api::org_entitlements))
        .route(
            "/v1/users/:user_id/entitlements",
            get(api::user_entitlements),
        )
        .route(
            "/v1/orgs/:org_id/entitlements/:feature",
            get(api::org_feature),
        )
        .route(
            "/v1/users/:user_id/entitlements/:feature",
            get(api::user_feature),
        )
        .route(
            "/v1/customers/:customer_id/sync",
            post(checkout::sync_customer),
        )
        .route(
            "/v1/checkout/sessions",
            post(checkout::create_checkout_session),
        )
        .route(
            "/v1/checkout/sessions/:session_id/sync",
            post(checkout::sync_checkout_session),
        )
        .route("/v1/portal/sessions", post(checkout::create_portal_session))
        .route_layer(layers::GuardLayer::new(state.clone(), auth::reader));
    let ops = Router::new()
        .route("/ops/dead-letters", get(ops::dead_letters))
        .route("/ops/dead-letters/retry", post(ops::retry_all))
        .route("/ops/dead-letters/:event_id/retry", post(ops::retry_one))
        .route_layer(layers::GuardLayer::new(state.clone(), auth::admin));
    Router::new()
        .route(
            "/webhooks/stripe",
            post(webhook::receive).layer(DefaultBodyLimit::max(max_body)),
        )
        .route(
            "/webhooks/eventbridge",
            post(webhook::receive_eventbridge).layer(DefaultBodyLimit::max(max_body)),
        )
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi_json))
        .route("/checkout/success", get(checkout::success_page))
        .route("/portal/return", get(checkout::portal_return))
        .route("/metrics", get(metrics::scrape))
        .merge(admin::router(state.clone()))
        .route("/readyz", get(health::readyz))
        .merge(v1)
        .merge(ops)
        .fallback(|| async { ApiError::NotFound("route".to_owned()) })
        .layer(layers::ObserveLayer { body_timeout })
        .with_state(state)
}
