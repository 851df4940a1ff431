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
//! Every label value is spelled by the enum it labels (`inbox::Outcome`, `InboxState`,
//! `Received`, `sync_log::SyncSource`/`SyncOutcome`, [`CacheRead`], [`CacheWrite`],
//! [`OutOfOrder`], `db_error::Refusal`, [`RefusedAt`], [`ReadTimeout`],
//! [`ConnectionState`], [`TokenKind`]; a token's position is a number bounded by the
//! configured tokens), so the series created at zero and the series counted later can never
//! disagree; a test pins the spellings the alert rules and the dashboard name. The HTTP
//! side (`GET /metrics`, request latency) is `http::metrics`: this module knows no HTTP.
//!
//! This module only observes: it must never change what the service does, and a failure
//! to measure must never fail a request or a webhook.

use std::sync::LazyLock;
use std::time::Duration;

use projections::{Projections, RedisCache};
use prometheus::{
    exponential_buckets, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, Encoder, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, TextEncoder,
};
use sqlx::PgPool;

use crate::db_error::Refusal;
use crate::error_chain::error_chain;
use crate::inbox::{self, Depth, Outcome, Received};
use crate::stripe::StripeEvent;
use crate::sync_log::{SyncOutcome, SyncSource};

/// The event-type label of the series created at zero, before any event has a type.
const NO_EVENT_TYPE: &str = "none";

/// Why an event counts as out of order (label `kind` of
/// `subledger_webhooks_out_of_order_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutOfOrder {
    /// It arrived after a newer one (the inbox outcome `stale`).
    Stale,
    /// It made a `catch_up` move: the events between the two states had not arrived.
    CatchUp,
}

impl OutOfOrder {
    pub const ALL: [Self; 2] = [Self::Stale, Self::CatchUp];

    /// The outcome's and the move's own spellings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stale => Outcome::Stale.as_str(),
            Self::CatchUp => aggregates::Move::CatchUp.as_str(),
        }
    }
}

/// What an API read found in the cache (label `result` of
/// `subledger_cache_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheRead {
    Hit,
    /// Not in Redis: read from Postgres.
    Miss,
    /// Redis failed: read from Postgres.
    Fallback,
}

impl CacheRead {
    pub const ALL: [Self; 3] = [Self::Hit, Self::Miss, Self::Fallback];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Fallback => "fallback",
        }
    }
}

/// A write to Redis that failed (label `op` of `subledger_cache_write_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheWrite {
    /// Writing back what a read found in Postgres.
    ReadThrough,
}

impl CacheWrite {
    pub const ALL: [Self; 1] = [Self::ReadThrough];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ReadThrough => "read_through",
        }
    }
}

/// Where an event holding a value Postgres refuses was stopped (label `stage` of
/// `subledger_webhooks_refused_total`; its `reason` is the [`Refusal`]).
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

/// Which part of a request did not arrive in time (label `part` of
/// `subledger_http_read_timeouts_total`).
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

/// Where the server holds a connection (label `state` of `subledger_http_connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Being served.
    Open,
    /// Beyond `SUBLEDGER_MAX_CONNECTIONS`, waiting for a place.
    Waiting,
}

impl ConnectionState {
    pub const ALL: [Self; 2] = [Self::Open, Self::Waiting];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Waiting => "waiting",
        }
    }
}

/// Which setting a presented bearer token was found in (label `kind` of
/// `subledger_token_uses_total`).
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

/// `values` as a help text lists them: `a, b, c`.
fn listed(values: impl IntoIterator<Item = &'static str>) -> String {
    values.into_iter().collect::<Vec<_>>().join(", ")
}

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
    pub webhooks_refused: IntCounterVec,
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
            &format!(
                "Stripe events accepted by POST /webhooks/stripe, by type and what the inbox made of them ({})",
                listed(Received::ALL.map(Received::as_str))
            ),
            &["type", "result"],
        ),
        webhooks_processed: counter(
            "subledger_webhooks_processed_total",
            &format!(
                "Stripe events processed, by type and outcome ({})",
                listed(Outcome::ALL.map(Outcome::as_str))
            ),
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
            &format!(
                "Syncs from Stripe's API, by source and outcome ({})",
                listed(SyncOutcome::ALL.map(SyncOutcome::as_str))
            ),
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
        webhooks_refused: counter(
            "subledger_webhooks_refused_total",
            &format!(
                "Events holding a value Postgres refuses for its content, by where they were stopped ({}: answered 400 at receipt, dead-lettered at once in processing) and why ({})",
                listed(RefusedAt::ALL.map(RefusedAt::as_str)),
                listed(Refusal::ALL.map(Refusal::as_str))
            ),
            &["stage", "reason"],
        ),
        http_connections: register_int_gauge_vec!(
            "subledger_http_connections",
            "HTTP connections: open (being served) and waiting (beyond SUBLEDGER_MAX_CONNECTIONS, waiting their turn)",
            &["state"]
        )
        .expect("registered once"),
        http_connections_shed: register_int_counter!(
            "subledger_http_connections_shed_total",
            "Connections answered 503 with Retry-After (or closed, past the shedding budget) because every place, waiting ones included, was taken"
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
    for outcome in Outcome::ALL {
        m.webhooks_processed
            .with_label_values(&[NO_EVENT_TYPE, outcome.as_str()]);
    }
    for kind in OutOfOrder::ALL {
        m.webhooks_out_of_order.with_label_values(&[kind.as_str()]);
    }
    m.webhook_retries.with_label_values(&[NO_EVENT_TYPE]);
    m.webhook_dead_letters.with_label_values(&[NO_EVENT_TYPE]);
    for state in Depth::STATES {
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
    for result in CacheRead::ALL {
        m.cache_requests.with_label_values(&[result.as_str()]);
    }
    for op in CacheWrite::ALL {
        m.cache_write_failures.with_label_values(&[op.as_str()]);
    }
    for stage in RefusedAt::ALL {
        for reason in Refusal::ALL {
            m.webhooks_refused
                .with_label_values(&[stage.as_str(), reason.as_str()]);
        }
    }
    for state in ConnectionState::ALL {
        m.http_connections.with_label_values(&[state.as_str()]);
    }
    for part in ReadTimeout::ALL {
        m.http_read_timeouts.with_label_values(&[part.as_str()]);
    }
    LazyLock::force(&projections::redis_cache::STALE_WRITES);
    m
});

/// The `type` label of an event: its type when it is shaped like one of Stripe's, else
/// `other`, so that a hostile payload can put neither personal data nor unbounded text
/// into `/metrics` (which needs no token).
fn type_label(event_type: &str) -> &str {
    if crate::telemetry::is_word_like(event_type) {
        event_type
    } else {
        "other"
    }
}

/// Records one processed inbox row.
pub fn webhook_processed(
    event_type: &str,
    outcome: Outcome,
    took: Duration,
    since_received: Duration,
    catch_up: bool,
) {
    let event_type = type_label(event_type);
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
        out_of_order(OutOfOrder::Stale);
    }
    if catch_up {
        out_of_order(OutOfOrder::CatchUp);
    }
}

fn out_of_order(kind: OutOfOrder) {
    METRICS
        .webhooks_out_of_order
        .with_label_values(&[kind.as_str()])
        .inc();
}

/// Records a webhook the inbox accepted. An event type we do not handle is finished at
/// once (outcome `ignored`), so it is counted as processed here: it never reaches a worker.
pub fn webhook_received(event: &StripeEvent, received: Received) {
    let m = &*METRICS;
    let event_type = type_label(&event.event_type);
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
    let event_type = type_label(event_type);
    let m = &*METRICS;
    if dead {
        m.webhook_dead_letters
            .with_label_values(&[event_type])
            .inc();
    } else {
        m.webhook_retries.with_label_values(&[event_type]).inc();
    }
}

/// Counts one API read by what it found in the cache.
pub fn cache_read(result: CacheRead) {
    METRICS
        .cache_requests
        .with_label_values(&[result.as_str()])
        .inc();
}

/// Counts one failed write to Redis.
pub fn cache_write_failed(op: CacheWrite) {
    METRICS
        .cache_write_failures
        .with_label_values(&[op.as_str()])
        .inc();
}

/// Records an event refused for a value Postgres cannot store.
pub fn webhook_refused(stage: RefusedAt, reason: Refusal) {
    METRICS
        .webhooks_refused
        .with_label_values(&[stage.as_str(), reason.as_str()])
        .inc();
}

/// A connection started (`1`) or stopped (`-1`) being in `state`.
pub fn http_connections(state: ConnectionState, delta: i64) {
    METRICS
        .http_connections
        .with_label_values(&[state.as_str()])
        .add(delta);
}

/// A connection was answered 503 (or closed) for want of a place.
pub fn http_connection_shed() {
    METRICS.http_connections_shed.inc();
}

/// A request's head or body did not arrive in time.
pub fn http_read_timeout(part: ReadTimeout) {
    METRICS
        .http_read_timeouts
        .with_label_values(&[part.as_str()])
        .inc();
}

/// A request was let in by the token at `position` of the `kind` setting.
pub fn token_used(kind: TokenKind, position: usize) {
    METRICS
        .token_uses
        .with_label_values(&[kind.as_str(), &position.to_string()])
        .inc();
}

/// Records one HTTP request's latency under its route pattern (never a raw path).
pub fn http_request(method: &str, route: &str, status: &str, took: Duration) {
    METRICS
        .http_request_duration_seconds
        .with_label_values(&[method, route, status])
        .observe(took.as_secs_f64());
}

/// Reads the gauges that describe stored state, fresh (at each scrape): the inbox, the
/// flagged syncs, each projection's lag and whether Redis answers. A failure to read one
/// is logged and leaves that gauge as it was.
pub async fn refresh_gauges(pool: &PgPool, projections: &Projections, cache: &RedisCache) {
    let m = &*METRICS;
    if let Err(error) = refresh_inbox(pool).await {
        tracing::warn!(error = %error_chain(&error), "cannot measure the inbox");
    }
    for projection in projections.names() {
        match projections.lag(projection).await {
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
        tokio::time::timeout(Duration::from_secs(2), cache.ping()).await,
        Ok(Ok(()))
    );
    m.cache_up.set(i64::from(up));
    cache.local().record_size();
}

async fn refresh_inbox(pool: &PgPool) -> Result<(), sqlx::Error> {
    let m = &*METRICS;
    let depth = inbox::depth(pool).await?;
    for (state, rows) in depth.by_state() {
        m.inbox_depth.with_label_values(&[state.as_str()]).set(rows);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The alert rules (`ops/alerts.yml`) and the dashboard select series by these label
    /// values: a variant spelled differently must fail here before it silently empties a
    /// panel or an alert.
    #[test]
    fn label_values_are_the_ones_operators_select() {
        assert_eq!(
            Outcome::ALL.map(Outcome::as_str),
            [
                "applied",
                "duplicate",
                "stale",
                "illegal",
                "ignored",
                "failed"
            ]
        );
        assert_eq!(
            Received::ALL.map(Received::as_str),
            ["stored", "duplicate", "ignored"]
        );
        assert_eq!(Depth::STATES.map(|s| s.as_str()), ["pending", "dead"]);
        assert_eq!(
            OutOfOrder::ALL.map(OutOfOrder::as_str),
            ["stale", "catch_up"]
        );
        assert_eq!(
            CacheRead::ALL.map(CacheRead::as_str),
            ["hit", "miss", "fallback"]
        );
        assert_eq!(CacheWrite::ALL.map(CacheWrite::as_str), ["read_through"]);
        // `sync_log`'s own test pins the sources and outcomes.
    }

    /// Every series an alert may be evaluated on exists at zero before anything happened.
    #[test]
    fn zero_series_exist_for_every_label_value() {
        let text = render();
        for outcome in Outcome::ALL {
            let series = format!(
                "subledger_webhooks_processed_total{{outcome=\"{}\",type=\"{NO_EVENT_TYPE}\"}} 0",
                outcome.as_str()
            );
            assert!(text.contains(&series), "{series}");
        }
        for source in SyncSource::ALL {
            for outcome in SyncOutcome::ALL {
                let series = format!(
                    "subledger_syncs_total{{outcome=\"{}\",source=\"{}\"}}",
                    outcome.as_str(),
                    source.as_str()
                );
                assert!(text.contains(&series), "{series}");
            }
        }
        for kind in OutOfOrder::ALL {
            let series = format!(
                "subledger_webhooks_out_of_order_total{{kind=\"{}\"}}",
                kind.as_str()
            );
            assert!(text.contains(&series), "{series}");
        }
    }
}
