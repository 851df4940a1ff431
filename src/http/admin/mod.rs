//! `/admin`: the operators' web page, rendered on the server (plain HTML and inline SVG,
//! no script, no front-end build, nothing fetched from elsewhere).
//!
//! It shows what [`crate::inspect`] and [`crate::sync_log`] read: search by customer, org,
//! user or subscription id; the customer's state and event timeline; the transition
//! diagram drawn from `aggregates::TRANSITIONS` ([`diagram`]) with the customer's path
//! highlighted; the cache inspector (Redis vs table vs log); the inbox with outcomes, the
//! dead-letter queue with a re-drive button, and the sync log. The handlers here fetch;
//! [`pages`] draws (maud templates, which escape every value). The only thing the page
//! changes is a re-drive, which puts a dead row back in the queue. It must never hold
//! transition rules of its own, run SQL of its own, nor decide anything about a Stripe
//! fact.
//!
//! Access needs `SUBLEDGER_ADMIN_TOKEN`: as a bearer token, or once as `?token=` (the
//! login form), traded for a cookie (`auth::admin_access` decides; this page only shows the
//! login form when it says no).

mod charts;
mod diagram;
mod pages;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::Router;
use chrono::DurationRound;
use maud::{html, Markup};

use super::auth::{self, AdminAccess};
use super::error::ErrorBody;
use super::layers::{GuardLayer, Verdict};
use super::params::valid_id;
use super::{ApiError, AppState};
use crate::inbox::{self, Redrive};
use crate::inspect::{self, CustomerReport};
use crate::sync_log;

/// Rows each list on the page shows at most.
const DEAD_LETTERS_SHOWN: i64 = 100;
const RECENT_WEBHOOKS_SHOWN: i64 = 50;
const SYNCS_SHOWN: i64 = 50;
/// Hours the overview's charts cover.
const OVERVIEW_HOURS: i64 = 24;

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin", get(home))
        .route("/admin/customers/:customer_id", get(customer))
        .route("/admin/inbox/:event_id/redrive", post(redrive))
        .route_layer(GuardLayer::new(state, guard))
}

/// Requires the admin token (see [`auth::admin_access`]); shows the login page otherwise.
fn guard(state: &AppState, request: Request) -> Verdict {
    let problem = match auth::admin_access(&state.settings, request.uri(), request.headers()) {
        AdminAccess::Granted => return Verdict::Pass(request),
        AdminAccess::Traded(redirect) => return Verdict::Answer(redirect),
        AdminAccess::WrongToken => Some("That is not the admin token."),
        AdminAccess::Missing => None,
    };
    let login = pages::login(!state.settings.admin_tokens.is_empty(), problem);
    Verdict::Answer((StatusCode::UNAUTHORIZED, html_page(login)).into_response())
}

fn html_page(markup: Markup) -> Html<String> {
    Html(markup.into_string())
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
pub struct HomeQuery {
    /// Search by customer, org, user or subscription id (at most 255 characters).
    q: Option<String>,
    /// The event id a re-drive just put back (shown as a notice).
    redriven: Option<String>,
}

/// `GET /admin[?q=…]`: search, or the dead-letter queue, the latest inbox rows and syncs.
#[utoipa::path(
    get, path = "/admin", tag = "admin",
    summary = "The operators' page",
    description = "Server-rendered HTML, no script: search, the dead-letter queue, the latest webhooks and syncs. `?token=` with the admin token is traded once for a cookie (303 to the same URL without it).",
    params(HomeQuery),
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String),
        (status = 303, description = "The token was traded for the session cookie", headers(("location" = String), ("set-cookie" = String))),
        (status = 400, description = "`q` longer than 255 characters (`invalid_parameter`)", body = ErrorBody),
        (status = 401, description = "The login page: no admin token or cookie, or a wrong `?token=`", content_type = "text/html", body = String),
        (status = 503, description = "Postgres unavailable (`storage_unavailable`)", body = ErrorBody),
    ),
    security(("admin_token" = []), ("admin_cookie" = [])),
)]
pub async fn home(
    State(state): State<AppState>,
    query: Result<Query<HomeQuery>, QueryRejection>,
) -> Result<Html<String>, ApiError> {
    let Query(query) = query?;
    let notice = html! {
        @if let Some(event_id) = &query.redriven { (pages::redriven(event_id)) }
    };
    let q = query.q.as_deref().map(str::trim).unwrap_or("");
    if !q.is_empty() {
        if q.len() > 255 {
            return Err(ApiError::InvalidParameter("q"));
        }
        let hits = inspect::search(&state.pool, q)
            .await
            .map_err(ApiError::storage)?;
        let results = match hits.as_slice() {
            [] => pages::no_hits(q),
            [hit] => {
                let report = report(&state, &hit.customer_id).await?;
                let syncs = sync_section(&state, Some(&hit.customer_id)).await?;
                html! { (pages::found_by(hit)) (pages::customer(&report)) (syncs) }
            }
            hits => pages::hits(hits),
        };
        let body = html! { (notice) (pages::search_heading(q)) (results) };
        return Ok(html_page(pages::page(&format!("Search {q}"), body)));
    }
    let overview = overview(&state).await?;
    let dead = inbox::dead_letters(&state.pool, Some(DEAD_LETTERS_SHOWN))
        .await
        .map_err(ApiError::storage)?;
    let recent = inbox::recent(&state.pool, RECENT_WEBHOOKS_SHOWN)
        .await
        .map_err(ApiError::storage)?;
    let syncs = sync_section(&state, None).await?;
    let body = html! { (notice) (pages::overview(&overview)) (pages::inbox_overview(&dead, &recent)) (syncs) };
    Ok(html_page(pages::page("Overview", body)))
}

/// What the overview draws: customers by status and access (the catalogue's policy judges
/// which statuses grant it), the last 24 hours of the inbox by hour, its depth, and each
/// projection's lag.
async fn overview(state: &AppState) -> Result<pages::Overview, ApiError> {
    let now = chrono::Utc::now();
    let policy = &state.catalog.access;
    let statuses = projections::PlatformTables::status_counts(&state.pool, now)
        .await
        .map_err(ApiError::storage)?
        .into_iter()
        .map(|count| {
            let access = if policy.grants(&count.status) {
                count.within_period
            } else {
                0
            };
            (count.status, count.customers, access)
        })
        .collect();
    let this_hour = now
        .duration_trunc(chrono::TimeDelta::hours(1))
        .unwrap_or(now);
    let hours: Vec<_> = (0..OVERVIEW_HOURS)
        .rev()
        .map(|back| this_hour - chrono::TimeDelta::hours(back))
        .collect();
    let hourly = inbox::hourly(&state.pool, hours[0])
        .await
        .map_err(ApiError::storage)?;
    let depth = inbox::depth(&state.pool).await.map_err(ApiError::storage)?;
    let mut lag = Vec::new();
    for name in state.projections.names() {
        // Like /readyz: a lag that cannot be read is shown as unknown, not as an error page.
        let behind = match state.projections.lag(name).await {
            Ok(behind) => Some(behind),
            Err(error) => {
                tracing::warn!(error = %crate::error_chain::error_chain(&error), "cannot read a projection's lag");
                None
            }
        };
        lag.push((name, behind));
    }
    Ok(pages::Overview {
        statuses,
        hours,
        hourly,
        depth,
        lag,
    })
}

/// The latest syncs from Stripe's API, for one customer or for all, with the customers
/// currently flagged (more than 3 failures in a row).
async fn sync_section(state: &AppState, customer_id: Option<&str>) -> Result<Markup, ApiError> {
    let rows = sync_log::recent_attempts(&state.pool, customer_id, SYNCS_SHOWN)
        .await
        .map_err(ApiError::storage)?;
    let flagged = sync_log::flagged(&state.pool, customer_id, SYNCS_SHOWN)
        .await
        .map_err(ApiError::storage)?;
    Ok(pages::sync_log(&rows, &flagged))
}

async fn report(state: &AppState, customer_id: &str) -> Result<CustomerReport, ApiError> {
    inspect::inspect(
        &state.pool,
        &state.cache,
        &state.catalog,
        customer_id,
        chrono::Utc::now(),
    )
    .await
    .map_err(|error| match error {
        inspect::InspectError::Database(e) => ApiError::storage(e),
        other => {
            tracing::error!(error = %crate::error_chain::error_chain(&other), "cannot inspect a customer");
            ApiError::NotFound(format!("a readable log for customer {customer_id}"))
        }
    })
}

/// `GET /admin/customers/{id}`.
#[utoipa::path(
    get, path = "/admin/customers/{customer_id}", tag = "admin",
    summary = "One customer on the operators' page",
    params(("customer_id" = String, Path, description = "A Stripe customer id", example = "cus_123")),
    responses(
        (status = 200, description = "State, event timeline, diagram, cache inspector, syncs", content_type = "text/html", body = String),
        (status = 401, description = "The login page: no admin token or cookie, or a wrong `?token=`", content_type = "text/html", body = String),
        (status = 404, description = "A customer the ledger never saw (`not_found`)", body = ErrorBody),
        (status = 503, description = "Postgres unavailable (`storage_unavailable`)", body = ErrorBody),
    ),
    security(("admin_token" = []), ("admin_cookie" = [])),
)]
pub async fn customer(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Html<String>, ApiError> {
    let Path(customer_id) = path?;
    let report = report(&state, &customer_id).await?;
    if report.is_unknown() {
        return Err(ApiError::NotFound(format!("customer {customer_id}")));
    }
    let syncs = sync_section(&state, Some(&customer_id)).await?;
    let body = html! { (pages::customer(&report)) (syncs) };
    Ok(html_page(pages::page(&customer_id, body)))
}

/// `POST /admin/inbox/{event_id}/redrive`: puts a dead-lettered row back in the queue.
#[utoipa::path(
    post, path = "/admin/inbox/{event_id}/redrive", tag = "admin",
    summary = "The page's re-drive button",
    params(("event_id" = String, Path, description = "A dead letter's Stripe event id", example = "evt_1NiQ6cL0xUzj0hVl")),
    responses(
        (status = 303, description = "Back to the page with a notice", headers(("location" = String))),
        (status = 401, description = "The login page: no admin token or cookie, or a wrong `?token=`", content_type = "text/html", body = String),
        (status = 404, description = "That event is not a dead letter (`not_found`)", body = ErrorBody),
        (status = 503, description = "Postgres unavailable (`storage_unavailable`)", body = ErrorBody),
    ),
    security(("admin_token" = []), ("admin_cookie" = [])),
)]
pub async fn redrive(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Redirect, ApiError> {
    let Path(event_id) = path?;
    if inbox::redrive(&state.pool, &Redrive::One(event_id.clone()))
        .await
        .map_err(ApiError::storage)?
        .is_empty()
    {
        return Err(ApiError::NotFound(format!(
            "dead-lettered event {event_id}"
        )));
    }
    tracing::info!(event_id, "dead-lettered event re-driven by an operator");
    state.inbox_wake.wake_all();
    // The notice names the event only when its id is Stripe-shaped (it goes into a URL).
    let shown = if valid_id(&event_id, "event id").is_ok() {
        event_id.as_str()
    } else {
        ""
    };
    Ok(Redirect::to(&format!("/admin?redriven={shown}")))
}
