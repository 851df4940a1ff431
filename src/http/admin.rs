//! `/admin`: the operators' web page, rendered on the server (plain HTML and inline SVG,
//! no script, no front-end build, nothing fetched from elsewhere).
//!
//! It shows what [`crate::inspect`] reads: search by customer, org, user or subscription
//! id; the customer's state and event timeline; the transition diagram drawn from
//! `aggregates::TRANSITIONS` (through `transitions::edges`) with the customer's path
//! highlighted; the cache inspector (Redis vs table vs log); the inbox with outcomes and
//! the dead-letter queue with a re-drive button. The only thing it changes is a re-drive,
//! which puts a dead row back in the queue. It must never hold transition rules of its own
//! nor decide anything about a Stripe fact.
//!
//! Access needs `SUBLEDGER_ADMIN_TOKEN`: as a bearer token, or once as `?token=` (or the
//! login form), which sets an HttpOnly, SameSite=Strict cookie holding the token's SHA-256
//! and redirects to the same URL without it, so the token stays out of history and later
//! URLs. SameSite=Strict is also what keeps another site from posting a re-drive.

use std::collections::HashMap;
use std::fmt::Write as _;

use aggregates::{Move, SubscriptionStatus};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::inbox::{self, InboxEntry, InboxState, Redrive};
use crate::inspect::{self, CustomerReport};
use crate::transitions;

const COOKIE: &str = "subledger_admin";

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin", get(home))
        .route("/admin/customers/:customer_id", get(customer))
        .route("/admin/inbox/:event_id/redrive", post(redrive))
        .route_layer(axum::middleware::from_fn_with_state(state, require_admin))
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `presented` is the admin token, compared in constant time (on digests, so the
/// comparison does not depend on the lengths either).
fn token_matches(state: &AppState, presented: &str) -> bool {
    state
        .settings
        .admin_token
        .as_ref()
        .is_some_and(|expected| super::auth::token_matches(expected, presented))
}

fn cookie_matches(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(expected) = state.settings.admin_token.as_ref() else {
        return false;
    };
    let expected = digest(expected.expose_secret());
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .any(|value| bool::from(value.as_bytes().ct_eq(expected.as_bytes())))
}

/// Requires the admin token (bearer header, cookie, or a one-time `?token=`).
pub async fn require_admin(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = query.get("token") {
        if !token_matches(&state, token) {
            return login_page(&state, Some("That is not the admin token."));
        }
        // Trade the token for a cookie and drop it from the URL.
        let rest: Vec<&str> = request
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|part| !part.starts_with("token=") && !part.is_empty())
            .collect();
        let mut location = request.uri().path().to_owned();
        if !rest.is_empty() {
            location = format!("{location}?{}", rest.join("&"));
        }
        let mut response = Redirect::to(&location).into_response();
        let cookie = format!(
            "{COOKIE}={}; Path=/admin; HttpOnly; SameSite=Strict",
            digest(token)
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return response;
    }
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| token_matches(&state, t));
    if bearer || cookie_matches(&state, request.headers()) {
        return next.run(request).await;
    }
    login_page(&state, None)
}

fn login_page(state: &AppState, problem: Option<&str>) -> Response {
    let mut body = String::new();
    if state.settings.admin_token.is_none() {
        body.push_str("<p class=bad>SUBLEDGER_ADMIN_TOKEN is not set: the admin page refuses everyone until it is.</p>");
    }
    if let Some(problem) = problem {
        let _ = write!(body, "<p class=bad>{}</p>", esc(problem));
    }
    body.push_str(
        "<form method=get action=/admin><label>Admin token <input type=password name=token autofocus></label> \
         <button>Sign in</button></form>",
    );
    (StatusCode::UNAUTHORIZED, page("Sign in", &body)).into_response()
}

/// Escapes text for HTML content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt(value: Option<&str>) -> String {
    value.map_or("<span class=dim>-</span>".to_owned(), esc)
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}
main{padding:16px 24px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px;margin:0 0 16px}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f3;vertical-align:top}
th{color:#5b6475;font-weight:600}
code,.mono{font-family:ui-monospace,monospace;font-size:12px}
td.mono{overflow-wrap:anywhere}
.dim{color:#98a0ad}.bad{color:#b42318}.good{color:#067647}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;background:#eef0f3}
.b-applied{background:#d1fadf;color:#05603a}.b-duplicate{background:#eef0f3}
.b-stale,.b-ignored{background:#fef0c7;color:#93370d}.b-illegal,.b-failed,.b-dead{background:#fee4e2;color:#912018}
.verdict{font-size:15px;padding:8px 12px;border-radius:6px}
.v-yes{background:#ecfdf3;border:1px solid #a6f4c5}.v-no{background:#fef3f2;border:1px solid #fecdca}
tr.diff td{background:#fffaeb}
form.inline{display:inline}
input[type=search]{width:420px;padding:6px 8px}
button{padding:5px 12px;cursor:pointer}
";

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>{} · subledger admin</title>\
         <style>{STYLE}</style></head><body><header><a href=/admin>subledger admin</a>\
         <form method=get action=/admin><input type=search name=q placeholder=\"customer, org, user or subscription id\"> \
         <button>Search</button></form></header><main>{body}</main></body></html>",
        esc(title)
    ))
}

fn badge(text: &str) -> String {
    format!("<span class=\"badge b-{0}\">{0}</span>", esc(text))
}

#[derive(serde::Deserialize)]
pub struct HomeQuery {
    q: Option<String>,
    redriven: Option<String>,
}

/// `GET /admin[?q=…]`: search, or the dead-letter queue and the latest inbox rows.
pub async fn home(
    State(state): State<AppState>,
    Query(query): Query<HomeQuery>,
) -> Result<Html<String>, ApiError> {
    let mut body = String::new();
    if let Some(id) = &query.redriven {
        let _ = write!(
            body,
            "<section class=good>Re-drove <code>{}</code>: it is pending again and will be processed shortly.</section>",
            esc(id)
        );
    }
    let q = query.q.as_deref().map(str::trim).unwrap_or("");
    if !q.is_empty() {
        if q.len() > 255 {
            return Err(ApiError::InvalidParameter("q"));
        }
        let hits = inspect::search(&state.pool, q)
            .await
            .map_err(ApiError::Storage)?;
        let _ = write!(body, "<h1>Search: <code>{}</code></h1>", esc(q));
        match hits.as_slice() {
            [] => {
                let _ = write!(
                    body,
                    "<section>No customer, org, user or subscription has the id <code>{}</code>.</section>",
                    esc(q)
                );
            }
            [hit] => {
                let report = report(&state, &hit.customer_id).await?;
                let _ = write!(
                    body,
                    "<p class=dim>Found by {} id.</p>",
                    esc(&hit.matched_on)
                );
                body.push_str(&customer_body(&report));
                body.push_str(&sync_log(&state.pool, Some(&hit.customer_id)).await?);
            }
            hits => {
                body.push_str("<section><h2>Customers</h2><table><tr><th>customer</th><th>matched on</th><th>org</th><th>user</th><th>subscription</th><th>status</th></tr>");
                for hit in hits {
                    let _ = write!(
                        body,
                        "<tr><td><a href=\"/admin/customers/{0}\">{0}</a></td><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td><td>{5}</td></tr>",
                        esc(&hit.customer_id),
                        esc(&hit.matched_on),
                        opt(hit.org_id.as_deref()),
                        opt(hit.user_id.as_deref()),
                        opt(hit.subscription_id.as_deref()),
                        opt(hit.status.as_deref())
                    );
                }
                body.push_str("</table></section>");
            }
        }
        return Ok(page(&format!("Search {q}"), &body));
    }
    let dead = inbox::dead_letters(&state.pool, Some(100))
        .await
        .map_err(ApiError::Storage)?;
    let recent = inbox::recent(&state.pool, 50)
        .await
        .map_err(ApiError::Storage)?;
    let _ = write!(
        body,
        "<section><h2>Dead-letter queue ({})</h2>{}</section>",
        dead.len(),
        if dead.is_empty() {
            "<p class=dim>Empty: no inbox row has exhausted its attempts.</p>".to_owned()
        } else {
            inbox_table(&dead, true)
        }
    );
    let _ = write!(
        body,
        "<section><h2>Latest webhooks</h2>{}</section>",
        inbox_table(&recent, true)
    );
    body.push_str(&sync_log(&state.pool, None).await?);
    Ok(page("Overview", &body))
}

/// A `sync_attempts` row as the sync log shows it: customer, source, outcome, detail,
/// HTTP attempts, duration in ms, start.
type SyncRow = (
    String,
    String,
    String,
    Option<String>,
    i32,
    i32,
    chrono::DateTime<chrono::Utc>,
);

/// The latest syncs from Stripe's API (`sync_attempts`), for one customer or for all,
/// with the customers currently flagged (more than 3 failures in a row).
async fn sync_log(pool: &sqlx::PgPool, customer_id: Option<&str>) -> Result<String, ApiError> {
    let rows: Vec<SyncRow> = sqlx::query_as(
        "SELECT customer_id, source, outcome, detail, attempts, duration_ms, started_at FROM sync_attempts \
         WHERE $1::text IS NULL OR customer_id = $1 ORDER BY started_at DESC, id DESC LIMIT 50",
    )
    .bind(customer_id)
    .fetch_all(pool)
    .await
    .map_err(ApiError::Storage)?;
    let flagged: Vec<(String, i32, Option<String>)> = sqlx::query_as(
        "SELECT customer_id, consecutive_failures, last_error FROM sync_customers \
         WHERE flagged_at IS NOT NULL AND ($1::text IS NULL OR customer_id = $1) ORDER BY flagged_at DESC LIMIT 50",
    )
    .bind(customer_id)
    .fetch_all(pool)
    .await
    .map_err(ApiError::Storage)?;
    let mut b = format!("<section><h2>Sync log ({})</h2>", rows.len());
    for (customer, failures, error) in &flagged {
        let _ = write!(
            b,
            "<p class=bad>Flagged: {} failed {failures} syncs in a row ({}).</p>",
            esc(customer),
            opt(error.as_deref())
        );
    }
    if rows.is_empty() {
        b.push_str("<p class=dim>No sync from Stripe's API has been recorded here yet.</p>");
    } else {
        b.push_str("<table><tr><th>started</th><th>customer</th><th>source</th><th>outcome</th><th>attempts</th><th>duration</th><th>detail</th></tr>");
        for (customer, source, outcome, detail, attempts, duration_ms, started) in &rows {
            let _ = write!(
                b,
                "<tr><td class=mono>{}</td><td class=mono>{}</td><td>{}</td><td>{}</td><td>{attempts}</td><td>{duration_ms} ms</td><td>{}</td></tr>",
                started.to_rfc3339(),
                esc(customer),
                esc(source),
                esc(outcome),
                opt(detail.as_deref())
            );
        }
        b.push_str("</table>");
    }
    b.push_str("</section>");
    Ok(b)
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
        inspect::InspectError::Database(e) => ApiError::Storage(e),
        other => {
            tracing::error!(error = %crate::error_chain::error_chain(&other), "cannot inspect a customer");
            ApiError::NotFound(format!("a readable log for customer {customer_id}"))
        }
    })
}

/// `GET /admin/customers/{id}`.
pub async fn customer(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
) -> Result<Html<String>, ApiError> {
    let report = report(&state, &customer_id).await?;
    if report.is_unknown() {
        return Err(ApiError::NotFound(format!("customer {customer_id}")));
    }
    let mut body = customer_body(&report);
    body.push_str(&sync_log(&state.pool, Some(&customer_id)).await?);
    Ok(page(&customer_id, &body))
}

/// `POST /admin/inbox/{event_id}/redrive`: puts a dead-lettered row back in the queue.
pub async fn redrive(
    State(state): State<AppState>,
    Path(event_id): Path<String>,
) -> Result<Redirect, ApiError> {
    if inbox::redrive(&state.pool, &Redrive::One(event_id.clone()))
        .await
        .map_err(ApiError::Storage)?
        .is_empty()
    {
        return Err(ApiError::NotFound(format!(
            "dead-lettered event {event_id}"
        )));
    }
    tracing::info!(event_id, "dead-lettered event re-driven by an operator");
    state.inbox_wake.wake_all();
    Ok(Redirect::to(&format!(
        "/admin?redriven={}",
        if event_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            event_id.as_str()
        } else {
            ""
        }
    )))
}

fn inbox_table(rows: &[InboxEntry], with_customer: bool) -> String {
    let mut out = String::from("<table><tr><th>Stripe time</th><th>event</th><th>type</th>");
    if with_customer {
        out.push_str("<th>customer</th>");
    }
    out.push_str("<th>state</th><th>outcome</th><th>attempts</th><th>why</th><th></th></tr>");
    for row in rows {
        let _ = write!(
            out,
            "<tr><td class=mono>{}</td><td class=mono>{}</td><td>{}</td>",
            row.stripe_created.format("%Y-%m-%d %H:%M:%S"),
            esc(&row.event_id),
            esc(&row.event_type)
        );
        if with_customer {
            let _ = write!(
                out,
                "<td>{}</td>",
                row.customer_id
                    .as_deref()
                    .map_or("-".to_owned(), |c| format!(
                        "<a href=\"/admin/customers/{0}\">{0}</a>",
                        esc(c)
                    ))
            );
        }
        let why = [row.detail.as_deref(), row.last_error.as_deref()]
            .into_iter()
            .flatten()
            .map(esc)
            .collect::<Vec<_>>()
            .join("<br>");
        let action = if row.state == InboxState::Dead {
            format!(
                "<form class=inline method=post action=\"/admin/inbox/{}/redrive\"><button>Re-drive</button></form>",
                esc(&row.event_id)
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{action}</td></tr>",
            badge(row.state.as_str()),
            row.outcome
                .map_or(String::new(), |outcome| badge(outcome.as_str())),
            row.attempts,
            why
        );
    }
    out.push_str("</table>");
    out
}

fn customer_body(report: &CustomerReport) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Customer <code>{}</code></h1><p class=\"verdict {}\" id=verdict>{}</p>",
        esc(&report.customer_id),
        if report.entitlement.access {
            "v-yes"
        } else {
            "v-no"
        },
        esc(&report.explanation)
    );

    // State explorer.
    b.push_str("<section><h2>State (folded from the event log)</h2>");
    match &report.log {
        Some(info) => {
            let _ = write!(
                b,
                "<table><tr><th>status</th><th>subscription</th><th>plan</th><th>period end</th><th>org</th><th>user</th><th>version</th></tr>\
                 <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
                badge(&info.status),
                opt(info.subscription_id.as_deref()),
                opt(info.plan.as_deref()),
                info.current_period_end
                    .map_or("-".to_owned(), |t| t.to_rfc3339()),
                opt(info.org_id.as_deref()),
                opt(info.user_id.as_deref()),
                info.version
            );
        }
        None => b.push_str("<p class=dim>The log holds no event for this customer.</p>"),
    }
    if !report.state.subscriptions.is_empty() {
        b.push_str("<p>Every subscription id the customer has had:</p><table><tr><th>subscription</th><th>status</th><th>as of (Stripe)</th><th>by event</th></tr>");
        for (id, record) in &report.state.subscriptions {
            if let Some(snap) = &record.snapshot {
                let _ = write!(
                    b,
                    "<tr><td class=mono>{}</td><td>{}</td><td class=mono>{}</td><td class=mono>{}</td></tr>",
                    esc(id),
                    badge(snap.value.status.as_str()),
                    snap.observed_at.to_rfc3339(),
                    esc(&snap.stripe_event_id)
                );
            }
        }
        b.push_str("</table>");
    }
    b.push_str("</section>");

    let current = report
        .log
        .as_ref()
        .and_then(|i| i.status.parse::<SubscriptionStatus>().ok());
    let _ = write!(
        b,
        "<section><h2>Transition diagram (the table the aggregate runs; this customer's path highlighted)</h2>{}\
         <details><summary>The table as text</summary><pre class=mono>{}</pre></details></section>",
        diagram_svg(&report.path(), current),
        esc(&transitions::render(transitions::Format::Text))
    );

    // Timeline.
    let _ = write!(
        b,
        "<section><h2>Event timeline ({} events)</h2><table><tr><th>#</th><th>recorded</th><th>event</th><th>Stripe event</th><th>Stripe time</th><th>what it changed</th></tr>",
        report.timeline.len()
    );
    for t in &report.timeline {
        let _ = write!(
            b,
            "<tr><td>{}</td><td class=mono>{}</td><td>{}</td><td class=mono>{}<br><span class=dim>{}</span></td><td class=mono>{}</td><td>{}</td></tr>",
            t.sequence,
            t.recorded_at.format("%Y-%m-%d %H:%M:%S"),
            t.event_type,
            esc(&t.stripe_event_id),
            esc(&t.stripe_event_type),
            t.stripe_created.format("%Y-%m-%d %H:%M:%S"),
            esc(&t.change)
        );
    }
    b.push_str("</table></section>");

    // Cache inspector.
    b.push_str("<section><h2>Cache inspector: Redis vs table vs log</h2>");
    if let Some(error) = &report.cache_error {
        let _ = write!(b, "<p class=bad>Redis cannot be read: {}</p>", esc(error));
    }
    if report.differences.is_empty() {
        b.push_str("<p class=good id=cache-agree>The Redis value, the subscriptions row and the log agree.</p>");
    } else {
        b.push_str("<p class=bad id=cache-differ>They differ (highlighted):</p><table><tr><th>field</th><th>log</th><th>table</th><th>Redis</th></tr>");
        for d in &report.differences {
            let _ = write!(
                b,
                "<tr class=diff><td>{}</td><td class=mono>{}</td><td class=mono>{}</td><td class=mono>{}</td></tr>",
                esc(&d.field),
                opt(d.log.as_deref()),
                opt(d.table.as_deref()),
                opt(d.cache.as_deref())
            );
        }
        b.push_str("</table>");
    }
    b.push_str("<table><tr><th>Redis key</th><th>TTL</th><th>value</th></tr>");
    for key in &report.cache_keys {
        let _ = write!(
            b,
            "<tr><td class=mono>{}</td><td>{}</td><td class=mono>{}</td></tr>",
            esc(&key.key),
            key.ttl_text(),
            opt(key.value.as_deref())
        );
    }
    let _ = write!(
        b,
        "<tr><td class=mono>subscriptions row</td><td></td><td class=mono>{}</td></tr></table></section>",
        opt(report
            .table
            .as_ref()
            .and_then(|t| serde_json::to_string(t).ok())
            .as_deref())
    );

    let _ = write!(
        b,
        "<section><h2>Webhook inbox ({} Stripe events, with outcomes)</h2>{}</section>",
        report.inbox.len(),
        inbox_table(&report.inbox, false)
    );
    b
}

/// Where each status is drawn. Only positions: every edge comes from the table.
fn position(status: Option<SubscriptionStatus>) -> (f64, f64) {
    use SubscriptionStatus::*;
    match status {
        None => (50.0, 200.0),
        Some(Incomplete) => (230.0, 70.0),
        Some(Trialing) => (230.0, 200.0),
        Some(IncompleteExpired) => (230.0, 330.0),
        Some(Active) => (450.0, 200.0),
        Some(Paused) => (450.0, 330.0),
        Some(PastDue) => (670.0, 70.0),
        Some(Unpaid) => (670.0, 200.0),
        Some(Canceled) => (670.0, 330.0),
    }
}

const NODE_W: f64 = 140.0;
const NODE_H: f64 = 34.0;

/// Moves `to` back towards `from` until it leaves the node box drawn at `to`.
fn clip(from: (f64, f64), to: (f64, f64), start_node: bool) -> (f64, f64) {
    let (dx, dy) = (to.0 - from.0, to.1 - from.1);
    let (hw, hh) = if start_node {
        (8.0, 8.0)
    } else {
        (NODE_W / 2.0 + 3.0, NODE_H / 2.0 + 3.0)
    };
    let t = (hw / dx.abs().max(1e-9))
        .min(hh / dy.abs().max(1e-9))
        .min(1.0);
    (to.0 - dx * t, to.1 - dy * t)
}

/// The transition diagram as inline SVG: every legal status change of
/// `aggregates::TRANSITIONS` (solid: step, dashed: catch-up, dotted: first fact), with
/// the moves in `path` and the `current` status highlighted.
pub fn diagram_svg(
    path: &[(Option<SubscriptionStatus>, SubscriptionStatus)],
    current: Option<SubscriptionStatus>,
) -> String {
    let mut svg = String::from(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 760 400\" width=\"760\" height=\"400\" id=transitions role=img>\
         <defs><marker id=arrow viewBox=\"0 0 10 10\" refX=9 refY=5 markerWidth=7 markerHeight=7 orient=auto-start-reverse>\
         <path d=\"M0,0 L10,5 L0,10 z\" fill=\"#aab2bf\"/></marker>\
         <marker id=arrow-hot viewBox=\"0 0 10 10\" refX=9 refY=5 markerWidth=6 markerHeight=6 orient=auto-start-reverse>\
         <path d=\"M0,0 L10,5 L0,10 z\" fill=\"#d92d20\"/></marker></defs>",
    );
    let mut hot_edges = String::new();
    for (from, to, mv) in transitions::edges() {
        let hot = path.contains(&(from, to));
        let (a, b) = (position(from), position(Some(to)));
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len = (dx * dx + dy * dy).sqrt();
        // Bend every edge to its own left, so a -> b and b -> a do not overlap.
        let bend = if from.is_none() { 0.0 } else { 0.12 * len };
        let ctrl = (
            (a.0 + b.0) / 2.0 - dy / len * bend,
            (a.1 + b.1) / 2.0 + dx / len * bend,
        );
        let start = clip(ctrl, a, from.is_none());
        let end = clip(ctrl, b, false);
        let dash = match mv {
            Move::Step => "",
            Move::CatchUp => " stroke-dasharray=\"6 4\"",
            _ => " stroke-dasharray=\"2 4\"",
        };
        let edge = format!(
            "<path d=\"M{:.1},{:.1} Q{:.1},{:.1} {:.1},{:.1}\" fill=none stroke=\"{}\" stroke-width=\"{}\"{dash} marker-end=\"url(#{})\" data-from=\"{}\" data-to=\"{}\"{}/>",
            start.0,
            start.1,
            ctrl.0,
            ctrl.1,
            end.0,
            end.1,
            if hot { "#d92d20" } else { "#c4cad3" },
            if hot { 3 } else { 1 },
            if hot { "arrow-hot" } else { "arrow" },
            from.map_or("none", |s| s.as_str()),
            to.as_str(),
            if hot { " class=\"path\"" } else { "" }
        );
        // Highlighted edges are drawn last, above the others.
        if hot {
            hot_edges.push_str(&edge);
        } else {
            svg.push_str(&edge);
        }
    }
    svg.push_str(&hot_edges);
    let (x, y) = position(None);
    let _ = write!(
        svg,
        "<circle cx=\"{x}\" cy=\"{y}\" r=\"8\" fill=\"#1d2330\"/><text x=\"{x}\" y=\"{}\" text-anchor=middle font-size=11 fill=\"#5b6475\">start</text>",
        y + 24.0
    );
    for status in SubscriptionStatus::ALL {
        let (x, y) = position(Some(status));
        let visited = path.iter().any(|(f, t)| *t == status || *f == Some(status));
        let (fill, stroke, text) = if current == Some(status) {
            ("#d92d20", "#912018", "#fff")
        } else if visited {
            ("#fee4e2", "#d92d20", "#1d2330")
        } else {
            ("#fff", "#98a0ad", "#1d2330")
        };
        let _ = write!(
            svg,
            "<g data-status=\"{name}\"><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{NODE_W}\" height=\"{NODE_H}\" rx=8 fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"{}\"/>\
             <text x=\"{x}\" y=\"{:.1}\" text-anchor=middle font-size=13 font-family=\"system-ui,sans-serif\" fill=\"{text}\">{name}</text></g>",
            x - NODE_W / 2.0,
            y - NODE_H / 2.0,
            if visited || current == Some(status) { 2 } else { 1 },
            y + 4.5,
            name = status.as_str()
        );
    }
    svg.push_str(
        "<text x=10 y=392 font-size=11 fill=\"#5b6475\">solid: step · dashed: catch-up (intermediate events missing) · dotted: first fact · red: this customer's path, filled: current status</text></svg>",
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diagram_draws_every_edge_of_the_table_and_highlights_the_path() {
        use SubscriptionStatus::*;
        let path = [(None, Trialing), (Some(Trialing), Active)];
        let svg = diagram_svg(&path, Some(Active));
        assert_eq!(
            svg.matches(" data-from=").count(),
            transitions::edges().len(),
            "one curve per legal move"
        );
        assert_eq!(svg.matches("class=\"path\"").count(), 2);
        assert!(svg.contains("data-from=\"trialing\" data-to=\"active\" class=\"path\""));
        // Illegal moves are never drawn.
        assert!(!svg.contains("data-from=\"canceled\" data-to=\"active\""));
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
