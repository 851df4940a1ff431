//! Prometheus metrics: what operators and the alert rules (`ops/alerts.yml`) watch.
//!
//! Every metric lives in prometheus' default registry (the `projections` crate registers
//! its cache stale-write counter there too) and is served as text by `GET /metrics`.
//! Counters and histograms are fed where things happen (webhook receipt, inbox
//! processing, cache reads, HTTP requests); gauges that describe stored state (inbox
//! depth, oldest pending row, projection lag, whether Redis answers) are read fresh from
//! Postgres and Redis at each scrape, so they are right even on a replica that processed
//! nothing. Every series an alert or the dashboard names is created at zero on first use
//! of this module, so a rule can be evaluated before the first event arrives; the lag of
//! each projection the runner names (`Projections::names`) is set at every scrape.
//!
//! This module only observes: it must never change what the service does, and a failure
//! to measure must never fail a request or a webhook.

use std::sync::LazyLock;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    exponential_buckets, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, Encoder, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, TextEncoder,
};
use sqlx::PgPool;

use crate::db_error::Refusal;
use crate::error_chain::error_chain;
use crate::http::AppState;
use crate::inbox::{self, InboxState, Outcome, Received};
use crate::stripe::StripeEvent;
use crate::sync_log::{SyncOutcome, SyncSource};

/// The outcomes a processed webhook can have (as the inbox records them).
pub const OUTCOMES: [&str; Outcome::ALL.len()] = {
    let mut labels = [""; Outcome::ALL.len()];
    let mut i = 0;
    while i < labels.len() {
        labels[i] = Outcome::ALL[i].as_str();
        i += 1;
    }
    labels
};

/// Where an event holding a value Postgres refuses was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedAt {
    /// At the webhook: answered 400, never stored.
    Receipt,
    /// In processing: stored, then dead-lettered at once without retrying.
    Processing,
}

impl RefusedAt {
    pub const ALL: [Self; 2] = [Self::Receipt, Self::Processing];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Receipt => "receipt",
            Self::Processing => "processing",
        }
    }
}

/// Which part of a request did not arrive in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadTimeout {
    Header,
    Body,
}

impl ReadTimeout {
    pub const ALL: [Self; 2] = [Self::Header, Self::Body];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Body => "body",
        }
    }
}

/// Which setting a presented bearer token was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// `SUBLEDGER_API_TOKEN`.
    Api,
    /// `SUBLEDGER_ADMIN_TOKEN`.
    Admin,
    /// `SUBLEDGER_ORG_TOKENS`.
    Org,
}

impl TokenKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Admin => "admin",
            Self::Org => "org",
        }
    }
}

/// The states of a connection the server counts.
const CONNECTION_STATES: [&str; 2] = ["open", "waiting"];

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register_int_counter_vec!(name, help, labels).expect("metric names are registered once")
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    register_histogram_vec!(name, help, labels, buckets).expect("metric names are registered once")
}

/// 1 ms … ~65 s, doubling: processing and request latencies.
fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 17).expect("valid buckets")
}

/// 0.1 s … ~3.6 h, quadrupling: delays between Stripe, our inbox and processing.
fn delay_buckets() -> Vec<f64> {
    exponential_buckets(0.1, 4.0, 9).expect("valid buckets")
}

pub struct Metrics {
    pub webhooks_received: IntCounterVec,
    pub webhooks_processed: IntCounterVec,
    pub webhook_processing_seconds: HistogramVec,
    pub webhook_delay_seconds: HistogramVec,
    pub webhook_event_age_seconds: HistogramVec,
    pub webhooks_out_of_order: IntCounterVec,
    pub webhook_retries: IntCounterVec,
    pub webhook_dead_letters: IntCounterVec,
    pub webhooks_refused: IntCounterVec,
    pub inbox_depth: IntGaugeVec,
    pub inbox_oldest_pending_age_seconds: IntGauge,
    pub syncs: IntCounterVec,
    pub sync_duration_seconds: HistogramVec,
    pub sync_flagged_customers: IntGauge,
    pub cache_requests: IntCounterVec,
    pub cache_write_failures: IntCounterVec,
    pub cache_up: IntGauge,
    pub projection_lag_events: IntGaugeVec,
    pub http_request_duration_seconds: HistogramVec,
    pub http_connections: IntGaugeVec,
    pub http_connections_shed: IntCounter,
    pub http_read_timeouts: IntCounterVec,
    pub token_uses: IntCounterVec,
}

/// The process's metrics, registered on first use.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = Metrics {
        webhooks_received: counter(
            "subledger_webhooks_received_total",
            "Stripe events accepted by POST /webhooks/stripe, by type and what the inbox made of them (stored, duplicate, ignored)",
            &["type", "result"],
        ),
        webhooks_processed: counter(
            "subledger_webhooks_processed_total",
            "Stripe events processed, by type and outcome (applied, duplicate, stale, illegal, ignored, failed)",
            &["type", "outcome"],
        ),
        webhook_processing_seconds: histogram(
            "subledger_webhook_processing_seconds",
            "Time to judge and commit one inbox row",
            &["type"],
            latency_buckets(),
        ),
        webhook_delay_seconds: histogram(
            "subledger_webhook_delay_seconds",
            "Time from storing an event in the inbox to finishing its processing (retries included)",
            &["type"],
            delay_buckets(),
        ),
        webhook_event_age_seconds: histogram(
            "subledger_webhook_event_age_seconds",
            "Age of an event (Stripe's created) when its webhook reached us",
            &["type"],
            delay_buckets(),
        ),
        webhooks_out_of_order: counter(
            "subledger_webhooks_out_of_order_total",
            "Events that arrived out of order: stale (older than what is held) or catch_up (a move whose intermediate events had not arrived)",
            &["kind"],
        ),
        webhook_retries: counter(
            "subledger_webhook_retries_total",
            "Processing attempts that failed and were scheduled again",
            &["type"],
        ),
        webhook_dead_letters: counter(
            "subledger_webhook_dead_letters_total",
            "Inbox rows dead-lettered after SUBLEDGER_MAX_ATTEMPTS failed attempts",
            &["type"],
        ),
        webhooks_refused: counter(
            "subledger_webhooks_refused_total",
            "Events holding a value Postgres refuses for its content (a NUL character, an id too long, a time or number out of range), by where they were stopped (receipt: answered 400; processing: dead-lettered at once) and why",
            &["stage", "reason"],
        ),
        inbox_depth: register_int_gauge_vec!(
            "subledger_inbox_depth",
            "Inbox rows by state (pending: waiting or retrying; dead: dead-lettered)",
            &["state"]
        )
        .expect("registered once"),
        inbox_oldest_pending_age_seconds: register_int_gauge!(
            "subledger_inbox_oldest_pending_age_seconds",
            "Age of the oldest pending inbox row (0 when none)"
        )
        .expect("registered once"),
        syncs: counter(
            "subledger_syncs_total",
            "Syncs from Stripe's API, by source and outcome (ok, failed)",
            &["source", "outcome"],
        ),
        sync_duration_seconds: histogram(
            "subledger_sync_duration_seconds",
            "Duration of one sync from Stripe's API",
            &["source"],
            latency_buckets(),
        ),
        sync_flagged_customers: register_int_gauge!(
            "subledger_sync_flagged_customers",
            "Customers whose sync failed more than 3 times in a row"
        )
        .expect("registered once"),
        cache_requests: counter(
            "subledger_cache_requests_total",
            "API reads by cache result: hit, miss (read from Postgres), fallback (Redis failed, read from Postgres)",
            &["result"],
        ),
        cache_write_failures: counter(
            "subledger_cache_write_failures_total",
            "Read-through writes to Redis that failed",
            &["op"],
        ),
        cache_up: register_int_gauge!(
            "subledger_cache_up",
            "1 when Redis answered PING at the last scrape, else 0"
        )
        .expect("registered once"),
        projection_lag_events: register_int_gauge_vec!(
            "subledger_projection_lag_events",
            "Events in the log that a projection has not applied yet",
            &["projection"]
        )
        .expect("registered once"),
        http_request_duration_seconds: histogram(
            "subledger_http_request_duration_seconds",
            "HTTP request latency by route (the matched pattern, never a raw path) and status",
            &["method", "route", "status"],
            latency_buckets(),
        ),
        http_connections: register_int_gauge_vec!(
            "subledger_http_connections",
            "HTTP connections: open (being served) and waiting (beyond SUBLEDGER_MAX_CONNECTIONS, waiting their turn)",
            &["state"]
        )
        .expect("registered once"),
        http_connections_shed: register_int_counter!(
            "subledger_http_connections_shed_total",
            "Connections answered 503 with Retry-After because every place, waiting ones included, was taken"
        )
        .expect("registered once"),
        http_read_timeouts: counter(
            "subledger_http_read_timeouts_total",
            "Requests whose head or body did not arrive within SUBLEDGER_HEADER_TIMEOUT_MS / SUBLEDGER_BODY_TIMEOUT_MS (the connection is closed)",
            &["part"],
        ),
        token_uses: counter(
            "subledger_token_uses_total",
            "Requests let in by a bearer token, by setting (api, admin, org) and the token's position in it (0 for the first): shows when a token being rotated out is no longer used",
            &["kind", "position"],
        ),
    };
    // Create the series the alert rules and the dashboard name, at zero.
    for outcome in OUTCOMES {
        m.webhooks_processed.with_label_values(&["none", outcome]);
    }
    // A stale outcome is an event that arrived after a newer one.
    for kind in [Outcome::Stale.as_str(), "catch_up"] {
        m.webhooks_out_of_order.with_label_values(&[kind]);
    }
    m.webhook_retries.with_label_values(&["none"]);
    m.webhook_dead_letters.with_label_values(&["none"]);
    for stage in RefusedAt::ALL {
        for reason in Refusal::ALL {
            m.webhooks_refused
                .with_label_values(&[stage.as_str(), reason.as_str()]);
        }
    }
    // Done rows are history, not depth.
    for state in [InboxState::Pending, InboxState::Dead] {
        m.inbox_depth.with_label_values(&[state.as_str()]);
    }
    for source in SyncSource::ALL {
        for outcome in SyncOutcome::ALL {
            m.syncs
                .with_label_values(&[source.as_str(), outcome.as_str()]);
        }
        m.sync_duration_seconds
            .with_label_values(&[source.as_str()]);
    }
    for result in ["hit", "miss", "fallback"] {
        m.cache_requests.with_label_values(&[result]);
    }
    m.cache_write_failures.with_label_values(&["read_through"]);
    for state in CONNECTION_STATES {
        m.http_connections.with_label_values(&[state]);
    }
    for part in ReadTimeout::ALL {
        m.http_read_timeouts.with_label_values(&[part.as_str()]);
    }
    LazyLock::force(&projections::redis_cache::STALE_WRITES);
    m
});

/// Records one processed inbox row.
pub fn webhook_processed(
    event_type: &str,
    outcome: Outcome,
    took: Duration,
    since_received: Duration,
    catch_up: bool,
) {
    let m = &*METRICS;
    m.webhooks_processed
        .with_label_values(&[event_type, outcome.as_str()])
        .inc();
    m.webhook_processing_seconds
        .with_label_values(&[event_type])
        .observe(took.as_secs_f64());
    if outcome != Outcome::Failed {
        m.webhook_delay_seconds
            .with_label_values(&[event_type])
            .observe(since_received.as_secs_f64());
    }
    if outcome == Outcome::Stale {
        m.webhooks_out_of_order
            .with_label_values(&[Outcome::Stale.as_str()])
            .inc();
    }
    if catch_up {
        m.webhooks_out_of_order
            .with_label_values(&["catch_up"])
            .inc();
    }
}

/// Records a webhook the inbox accepted. An event type we do not handle is finished at
/// once (outcome `ignored`), so it is counted as processed here: it never reaches a worker.
pub fn webhook_received(event: &StripeEvent, received: Received) {
    let m = &*METRICS;
    let event_type = event.event_type.as_str();
    m.webhooks_received
        .with_label_values(&[event_type, received.as_str()])
        .inc();
    if received == Received::Ignored {
        m.webhooks_processed
            .with_label_values(&[event_type, Outcome::Ignored.as_str()])
            .inc();
    }
    if received != Received::Duplicate {
        let age = (chrono::Utc::now() - event.created)
            .num_milliseconds()
            .max(0);
        m.webhook_event_age_seconds
            .with_label_values(&[event_type])
            .observe(age as f64 / 1000.0);
    }
}

/// Records a failed attempt: a retry, or a dead letter when `dead`.
pub fn webhook_failed(event_type: &str, dead: bool) {
    let m = &*METRICS;
    if dead {
        m.webhook_dead_letters
            .with_label_values(&[event_type])
            .inc();
    } else {
        m.webhook_retries.with_label_values(&[event_type]).inc();
    }
}

/// Records an event refused for a value Postgres cannot store.
pub fn webhook_refused(stage: RefusedAt, reason: Refusal) {
    METRICS
        .webhooks_refused
        .with_label_values(&[stage.as_str(), reason.as_str()])
        .inc();
}

/// A connection started (`1`) or stopped (`-1`) being served.
pub fn http_connection_open(delta: i64) {
    METRICS
        .http_connections
        .with_label_values(&["open"])
        .add(delta);
}

/// A connection started (`1`) or stopped (`-1`) waiting for a place.
pub fn http_connection_waiting(delta: i64) {
    METRICS
        .http_connections
        .with_label_values(&["waiting"])
        .add(delta);
}

/// A connection was answered 503 for want of a place.
pub fn http_connection_shed() {
    METRICS.http_connections_shed.inc();
}

/// A request was let in by the token at `position` of the `kind` setting.
pub fn token_used(kind: TokenKind, position: usize) {
    METRICS
        .token_uses
        .with_label_values(&[kind.as_str(), &position.to_string()])
        .inc();
}

/// A request's head or body did not arrive in time.
pub fn http_read_timeout(part: ReadTimeout) {
    METRICS
        .http_read_timeouts
        .with_label_values(&[part.as_str()])
        .inc();
}

/// What an API read found in the cache.
#[derive(Debug, Clone, Copy)]
pub enum CacheRead {
    Hit,
    Miss,
    Fallback,
}

pub fn cache_read(result: CacheRead) {
    let label = match result {
        CacheRead::Hit => "hit",
        CacheRead::Miss => "miss",
        CacheRead::Fallback => "fallback",
    };
    METRICS.cache_requests.with_label_values(&[label]).inc();
}

/// Axum middleware: request latency by matched route. Requests that matched no route are
/// counted under `unmatched`, so a scan of random paths cannot create unbounded series.
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    METRICS
        .http_request_duration_seconds
        .with_label_values(&[&method, &route, response.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Reads the gauges that describe stored state.
async fn refresh_gauges(state: &AppState) {
    let m = &*METRICS;
    if let Err(error) = refresh_inbox(&state.pool).await {
        tracing::warn!(error = %error_chain(&error), "cannot measure the inbox");
    }
    for projection in state.projections.names() {
        match state.projections.lag(projection).await {
            Ok(lag) => m
                .projection_lag_events
                .with_label_values(&[projection])
                .set(lag),
            Err(error) => {
                tracing::warn!(projection, error = %error_chain(&error), "cannot measure projection lag")
            }
        }
    }
    // A bounded wait: a hung Redis must not hang the scrape (it then counts as down).
    let up = matches!(
        tokio::time::timeout(Duration::from_secs(2), state.cache.ping()).await,
        Ok(Ok(()))
    );
    m.cache_up.set(i64::from(up));
}

async fn refresh_inbox(pool: &PgPool) -> Result<(), sqlx::Error> {
    let m = &*METRICS;
    let depth = inbox::depth(pool).await?;
    m.inbox_depth
        .with_label_values(&[InboxState::Pending.as_str()])
        .set(depth.pending);
    m.inbox_depth
        .with_label_values(&[InboxState::Dead.as_str()])
        .set(depth.dead);
    m.inbox_oldest_pending_age_seconds
        .set(depth.oldest_pending_age_secs.unwrap_or(0.0).max(0.0) as i64);
    m.sync_flagged_customers
        .set(crate::sync_log::flagged_count(pool).await?);
    Ok(())
}

/// One sync from Stripe's API finished.
pub fn sync_finished(source: SyncSource, outcome: SyncOutcome, duration: Duration) {
    let m = &*METRICS;
    m.syncs
        .with_label_values(&[source.as_str(), outcome.as_str()])
        .inc();
    m.sync_duration_seconds
        .with_label_values(&[source.as_str()])
        .observe(duration.as_secs_f64());
}

/// The metrics as Prometheus text.
pub fn render() -> String {
    LazyLock::force(&METRICS);
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&prometheus::gather(), &mut out)
        .expect("the text encoder writes to memory");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// `GET /metrics`.
pub async fn scrape(State(state): State<AppState>) -> impl IntoResponse {
    refresh_gauges(&state).await;
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(),
    )
}
