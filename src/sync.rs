//! Sync with Stripe's API: fetch the truth about a customer's subscriptions and record
//! what differs as a `Reconcile` command, so the log stays the one source of truth and
//! every projection follows. Also the bookkeeping around it: every attempt is recorded
//! (`sync_attempts`), failures are retried with backoff and a customer whose syncs failed
//! more than three times in a row is flagged (`sync_customers`), ambiguous webhooks and
//! the periodic reconciler request syncs, and `backfill` pages through the whole account.
//!
//! This module never judges a fact: the aggregate's `decide` does. It never reads Stripe's
//! JSON itself either (`stripe::objects` does).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregates::{
    ApiSnapshot, Decision, Outcome, OwnerFacts, SubscriptionCommand, SubscriptionEvent,
    SubscriptionStatus,
};
use chrono::{DateTime, Utc};
use projections::{ProjectionError, WhenBusy};
use secrecy::ExposeSecret;
use sqlx::{PgPool, Row};
use tokio::sync::{watch, Notify};

use crate::error_chain::error_chain;
use crate::ledger::ExecuteError;
use crate::startup::Services;
use crate::stripe::client::{ClientOptions, StripeApi, StripeApiError};
use crate::stripe::objects::{listed_subscription, ListedSubscription};

/// Subscriptions asked for per page (Stripe's maximum).
pub const PAGE_SIZE: i64 = 100;
/// Consecutive failures after which a customer is flagged ("more than three").
pub const FLAG_AFTER: i32 = 3;
/// How long a claimed sync request stays claimed (a crashed worker's claim expires).
const CLAIM_LEASE_SECS: f64 = 300.0;
/// Customers the reconciler requests per pass.
const RECONCILE_BATCH: i64 = 500;

/// Why a sync ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncSource {
    /// An ambiguous webhook (same-second tie, or `previous_attributes.status` that does
    /// not match what we held).
    Webhook,
    SuccessPage,
    PortalReturn,
    Reconciler,
    Operator,
}

impl SyncSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncSource::Webhook => "webhook",
            SyncSource::SuccessPage => "success_page",
            SyncSource::PortalReturn => "portal_return",
            SyncSource::Reconciler => "reconciler",
            SyncSource::Operator => "operator",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "webhook" => SyncSource::Webhook,
            "success_page" => SyncSource::SuccessPage,
            "portal_return" => SyncSource::PortalReturn,
            "reconciler" => SyncSource::Reconciler,
            _ => SyncSource::Operator,
        }
    }
}

/// How a sync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncOutcome {
    /// Something differed and was recorded.
    Applied,
    /// Stripe's answer matched what we held.
    Unchanged,
    /// A webhook in the same second as our request could not be ordered against the
    /// answer; another sync is scheduled.
    Ambiguous,
    Failed,
}

impl SyncOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncOutcome::Applied => "applied",
            SyncOutcome::Unchanged => "unchanged",
            SyncOutcome::Ambiguous => "ambiguous",
            SyncOutcome::Failed => "failed",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("calling Stripe failed")]
    Stripe(#[from] StripeApiError),
    #[error("recording Stripe's answer failed")]
    Execute(#[from] ExecuteError),
    #[error("storage failed")]
    Database(#[from] sqlx::Error),
    #[error("updating projections failed")]
    Projection(#[from] ProjectionError),
}

/// What one sync did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncReport {
    pub sync_id: String,
    pub customer_id: String,
    pub outcome: SyncOutcome,
    /// Events recorded.
    pub events: usize,
    /// HTTP attempts made to Stripe.
    pub attempts: u32,
    pub duration_ms: u64,
    /// The customer's consecutive failures after this sync.
    pub consecutive_failures: i32,
    pub flagged: bool,
}

/// What a backfill did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackfillReport {
    pub pages: u64,
    pub subscriptions: u64,
    pub customers: u64,
    pub events: u64,
    /// Listed objects we could not read (logged).
    pub unreadable: u64,
}

/// Runs syncs. Exists only when a Stripe key is configured.
#[derive(Clone)]
pub struct Syncer {
    services: Services,
    api: StripeApi,
}

impl Syncer {
    /// A syncer for these services, or `None` when `STRIPE_SECRET_KEY` is not set.
    pub fn new(services: Services) -> Result<Option<Self>, StripeApiError> {
        let settings = &services.settings;
        let Some(key) = &settings.stripe_secret_key else {
            return Ok(None);
        };
        let api = StripeApi::new(
            key.expose_secret(),
            ClientOptions {
                base_url: settings.stripe_api_base.clone(),
                timeout: settings.stripe_timeout,
                retries: settings.stripe_retries,
                backoff: settings.stripe_backoff,
            },
        )?;
        Ok(Some(Self { services, api }))
    }

    pub fn api(&self) -> &StripeApi {
        &self.api
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Syncs one customer now, records the attempt, schedules a retry on failure (and
    /// flags the customer after more than three in a row), and brings the projections up
    /// to date so that the next read shows the result.
    pub async fn sync_customer(
        &self,
        customer_id: &str,
        source: SyncSource,
    ) -> Result<SyncReport, SyncError> {
        let sync_id = format!("sync_{}", uuid::Uuid::new_v4().simple());
        let started_at = Utc::now();
        let clock = Instant::now();
        let (result, attempts) = self.fetch_and_record(customer_id, &sync_id).await;
        let duration = clock.elapsed();
        let (outcome, events, detail) = match &result {
            Ok(decision) => {
                let outcome = match &decision.outcome {
                    Outcome::Rejected(_) if decision.events.is_empty() => SyncOutcome::Ambiguous,
                    _ if decision.events.is_empty() => SyncOutcome::Unchanged,
                    _ => SyncOutcome::Applied,
                };
                let detail = match &decision.outcome {
                    Outcome::Rejected(rejection) => Some(rejection.to_string()),
                    _ => None,
                };
                (outcome, decision.events.len(), detail)
            }
            Err(error) => (SyncOutcome::Failed, 0, Some(error_chain(error))),
        };
        let (consecutive_failures, flagged) = self
            .record_attempt(
                &sync_id,
                customer_id,
                source,
                outcome,
                detail.as_deref(),
                attempts,
                duration,
                started_at,
            )
            .await?;
        crate::metrics::sync_finished(source.as_str(), outcome.as_str(), duration);
        tracing::info!(
            customer_id,
            source = source.as_str(),
            outcome = outcome.as_str(),
            events,
            attempts,
            duration_ms = duration.as_millis() as u64,
            "sync"
        );
        if flagged && outcome == SyncOutcome::Failed {
            tracing::warn!(
                customer_id,
                consecutive_failures,
                "sync failed more than {FLAG_AFTER} times in a row; customer flagged"
            );
        }
        result?;
        if events > 0 {
            self.settle_projections().await;
        }
        Ok(SyncReport {
            sync_id,
            customer_id: customer_id.to_owned(),
            outcome,
            events,
            attempts,
            duration_ms: duration.as_millis() as u64,
            consecutive_failures,
            flagged,
        })
    }

    /// Brings the projections up to the end of the log, so that a read right after a sync
    /// shows it. A catch-up alone is not enough: the reader skips events of transactions
    /// younger than the oldest one still running (an inbox worker's, a concurrent
    /// request's), so this retries for up to two seconds. Failures only cost freshness:
    /// the projection loop catches up on its own.
    pub async fn settle_projections(&self) {
        use projections::Projection;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Err(error) = self
                .services
                .catch_up_projections(WhenBusy::Wait, |_, _| {})
                .await
            {
                tracing::warn!(error = %error_chain(&error), "projection catch-up after a sync failed");
                return;
            }
            let pool = &self.services.pool;
            let platform = projections::runner::lag(pool, self.services.platform.name()).await;
            let cache = projections::runner::lag(pool, self.services.cache.name()).await;
            if matches!((platform, cache), (Ok(0), Ok(0))) || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Lists every subscription of the customer (all pages) and runs `Reconcile`.
    /// Returns the HTTP attempts made even when it fails.
    async fn fetch_and_record(
        &self,
        customer_id: &str,
        sync_id: &str,
    ) -> (Result<Decision, SyncError>, u32) {
        // The answer is the truth as of the moment the request left: stamp that, in whole
        // seconds like Stripe's `created` (see `aggregates::decide` for the ordering).
        let fetched_at = whole_second(Utc::now());
        let mut attempts = 0;
        let mut listed = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = match self
                .api
                .list_subscriptions(Some(customer_id), cursor.as_deref(), PAGE_SIZE)
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    attempts += error.attempts();
                    return (Err(error.into()), attempts);
                }
            };
            attempts += page.attempts;
            for object in &page.value.data {
                match listed_subscription(object) {
                    Ok(sub) if sub.customer_id == customer_id => listed.push(sub),
                    Ok(_) => {}
                    Err(reason) => tracing::warn!(customer_id, reason, "unreadable subscription"),
                }
            }
            match (page.value.has_more, page.value.last_id()) {
                (true, Some(last)) => cursor = Some(last.to_owned()),
                _ => break,
            }
        }
        let snapshot = api_snapshot(customer_id, sync_id, fetched_at, listed);
        let result = self
            .services
            .ledger
            .execute(
                customer_id,
                &SubscriptionCommand::Reconcile(snapshot),
                sync_id,
            )
            .await
            .map_err(SyncError::from);
        (result, attempts)
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_attempt(
        &self,
        sync_id: &str,
        customer_id: &str,
        source: SyncSource,
        outcome: SyncOutcome,
        detail: Option<&str>,
        attempts: u32,
        duration: Duration,
        started_at: DateTime<Utc>,
    ) -> Result<(i32, bool), sqlx::Error> {
        let settings = &self.services.settings;
        let mut tx = self.services.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sync_attempts (sync_id, customer_id, source, outcome, detail, attempts, duration_ms, started_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(sync_id)
        .bind(customer_id)
        .bind(source.as_str())
        .bind(outcome.as_str())
        .bind(detail)
        .bind(attempts as i32)
        .bind(duration.as_millis().min(i32::MAX as u128) as i32)
        .bind(started_at)
        .execute(&mut *tx)
        .await?;
        let base = settings.sync_retry_base.as_secs_f64();
        let row = if outcome == SyncOutcome::Failed {
            // Retry with backoff: base, 2×base, 4×base … at most an hour. The source of
            // the retry stays the one that asked first.
            sqlx::query(
                "INSERT INTO sync_customers AS c (customer_id, next_attempt_at, pending_source, requested_at, \
                    consecutive_failures, last_outcome, last_error) \
                 VALUES ($1, now() + make_interval(secs => $2), $3, now(), 1, 'failed', $4) \
                 ON CONFLICT (customer_id) DO UPDATE SET \
                    consecutive_failures = c.consecutive_failures + 1, \
                    next_attempt_at = now() + make_interval(secs => LEAST(3600, $2 * power(2, c.consecutive_failures))), \
                    pending_source = COALESCE(c.pending_source, EXCLUDED.pending_source), \
                    flagged_at = CASE WHEN c.consecutive_failures + 1 > $5 THEN COALESCE(c.flagged_at, now()) END, \
                    last_outcome = 'failed', last_error = EXCLUDED.last_error, updated_at = now() \
                 RETURNING consecutive_failures, flagged_at IS NOT NULL AS flagged",
            )
            .bind(customer_id)
            .bind(base)
            .bind(source.as_str())
            .bind(detail)
            .bind(FLAG_AFTER)
            .fetch_one(&mut *tx)
            .await?
        } else {
            // Success clears the failure run and the flag. A request made after this sync
            // started stays pending; an ambiguous answer asks again shortly.
            sqlx::query(
                "INSERT INTO sync_customers AS c (customer_id, next_attempt_at, pending_source, requested_at, \
                    last_outcome, last_synced_at) \
                 VALUES ($1, CASE WHEN $3 THEN now() + make_interval(secs => $4) END, \
                    CASE WHEN $3 THEN $5 END, CASE WHEN $3 THEN now() END, $2, now()) \
                 ON CONFLICT (customer_id) DO UPDATE SET \
                    consecutive_failures = 0, flagged_at = NULL, last_error = NULL, \
                    last_outcome = EXCLUDED.last_outcome, last_synced_at = now(), updated_at = now(), \
                    next_attempt_at = CASE WHEN $3 THEN EXCLUDED.next_attempt_at \
                        WHEN c.requested_at > $6 THEN c.next_attempt_at END, \
                    pending_source = CASE WHEN $3 THEN EXCLUDED.pending_source \
                        WHEN c.requested_at > $6 THEN c.pending_source END \
                 RETURNING consecutive_failures, flagged_at IS NOT NULL AS flagged",
            )
            .bind(customer_id)
            .bind(outcome.as_str())
            .bind(outcome == SyncOutcome::Ambiguous)
            .bind(base)
            .bind(source.as_str())
            .bind(started_at)
            .fetch_one(&mut *tx)
            .await?
        };
        tx.commit().await?;
        Ok((row.get("consecutive_failures"), row.get("flagged")))
    }

    /// Claims one due sync request and runs it. `Ok(None)` when nothing is due.
    pub async fn run_next_due(&self) -> Result<Option<SyncReport>, SyncError> {
        let claimed = sqlx::query(
            "UPDATE sync_customers SET next_attempt_at = now() + make_interval(secs => $1), updated_at = now() \
             WHERE customer_id = (SELECT customer_id FROM sync_customers \
                WHERE next_attempt_at <= now() ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING customer_id, pending_source",
        )
        .bind(CLAIM_LEASE_SECS)
        .fetch_optional(&self.services.pool)
        .await?;
        let Some(row) = claimed else {
            return Ok(None);
        };
        let customer_id: String = row.get("customer_id");
        let source = SyncSource::parse(
            row.get::<Option<String>, _>("pending_source")
                .as_deref()
                .unwrap_or("reconciler"),
        );
        match self.sync_customer(&customer_id, source).await {
            Ok(report) => Ok(Some(report)),
            // Recorded and rescheduled already; the worker goes on.
            Err(SyncError::Stripe(_) | SyncError::Execute(_)) => Ok(Some(SyncReport {
                sync_id: String::new(),
                customer_id,
                outcome: SyncOutcome::Failed,
                events: 0,
                attempts: 0,
                duration_ms: 0,
                consecutive_failures: 0,
                flagged: false,
            })),
            Err(error) => Err(error),
        }
    }

    /// Runs due sync requests until `stop`: webhook-requested syncs, retries, and what
    /// the reconciler asked for.
    pub async fn run_worker(self, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        let poll = self.services.settings.poll_interval;
        loop {
            if *stop.borrow() {
                return;
            }
            match self.run_next_due().await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "sync worker failed; will retry")
                }
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One reconciler pass: requests a sync for every customer whose state and last sync
    /// are older than `interval`, unless one is pending already. Flagged customers are
    /// being retried with backoff already.
    pub async fn request_stale(&self, interval: Duration) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "INSERT INTO sync_customers AS c (customer_id, next_attempt_at, pending_source, requested_at) \
             SELECT s.customer_id, now(), 'reconciler', now() FROM subscriptions s \
             LEFT JOIN sync_customers k ON k.customer_id = s.customer_id \
             WHERE k.next_attempt_at IS NULL \
               AND s.updated_at < now() - make_interval(secs => $1) \
               AND COALESCE(k.last_synced_at, '-infinity') < now() - make_interval(secs => $1) \
             ORDER BY COALESCE(k.last_synced_at, '-infinity') LIMIT $2 \
             ON CONFLICT (customer_id) DO UPDATE SET next_attempt_at = now(), \
                pending_source = 'reconciler', requested_at = now(), updated_at = now() \
             WHERE c.next_attempt_at IS NULL",
        )
        .bind(interval.as_secs_f64())
        .bind(RECONCILE_BATCH)
        .execute(&self.services.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The periodic reconciler: every `interval`, requests syncs for stale customers
    /// (the sync worker runs them).
    pub async fn run_reconciler(
        self,
        interval: Duration,
        wake: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            match self.request_stale(interval).await {
                Ok(0) => {}
                Ok(requested) => {
                    tracing::info!(requested, "reconciler requested syncs");
                    wake.notify_one();
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "reconciler pass failed")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    /// Pages through every subscription in the account (or one customer's) and records
    /// what differs, customer by customer. Safe to re-run: an unchanged subscription
    /// records nothing. `progress` gets the report after each page.
    pub async fn backfill(
        &self,
        customer_id: Option<&str>,
        mut progress: impl FnMut(&BackfillReport),
    ) -> Result<BackfillReport, SyncError> {
        let mut report = BackfillReport::default();
        let mut seen_customers = std::collections::HashSet::new();
        let mut cursor: Option<String> = None;
        loop {
            let fetched_at = whole_second(Utc::now());
            let page = self
                .api
                .list_subscriptions(customer_id, cursor.as_deref(), PAGE_SIZE)
                .await?
                .value;
            report.pages += 1;
            let mut by_customer: BTreeMap<String, Vec<ListedSubscription>> = BTreeMap::new();
            for object in &page.data {
                report.subscriptions += 1;
                match listed_subscription(object) {
                    Ok(sub) => by_customer
                        .entry(sub.customer_id.clone())
                        .or_default()
                        .push(sub),
                    Err(reason) => {
                        report.unreadable += 1;
                        tracing::warn!(reason, "unreadable subscription in backfill");
                    }
                }
            }
            for (customer, listed) in by_customer {
                let sync_id = format!("backfill_{}", uuid::Uuid::new_v4().simple());
                let snapshot = api_snapshot(&customer, &sync_id, fetched_at, listed);
                let decision = self
                    .services
                    .ledger
                    .execute(
                        &customer,
                        &SubscriptionCommand::Reconcile(snapshot),
                        &sync_id,
                    )
                    .await?;
                report.events += decision.events.len() as u64;
                if seen_customers.insert(customer) {
                    report.customers += 1;
                }
            }
            progress(&report);
            match (page.has_more, page.last_id()) {
                (true, Some(last)) => cursor = Some(last.to_owned()),
                _ => break,
            }
        }
        self.services
            .catch_up_projections(WhenBusy::Wait, |_, _| {})
            .await?;
        Ok(report)
    }
}

/// Builds the command's snapshot: every listed subscription, and the ownership the newest
/// one that names an owner carries.
fn api_snapshot(
    customer_id: &str,
    sync_id: &str,
    fetched_at: DateTime<Utc>,
    mut listed: Vec<ListedSubscription>,
) -> ApiSnapshot {
    listed.sort_by(|a, b| (b.facts.created, &b.facts.id).cmp(&(a.facts.created, &a.facts.id)));
    let owner = listed
        .iter()
        .map(|sub| &sub.owner)
        .find(|owner| !owner.is_empty())
        .cloned()
        .unwrap_or_else(OwnerFacts::default);
    ApiSnapshot {
        customer_id: customer_id.to_owned(),
        sync_id: sync_id.to_owned(),
        api_call: "api.subscriptions.list".to_owned(),
        fetched_at,
        owner,
        subscriptions: listed
            .into_iter()
            .map(|sub| (sub.facts, sub.payment_method))
            .collect(),
    }
}

fn whole_second(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(at.timestamp(), 0).unwrap_or(at)
}

/// Asks for a sync of `customer_id` after `delay` (the earliest request wins). Used when
/// a webhook is ambiguous; runs without a Stripe key too (the request waits for one).
pub async fn request_sync(
    pool: &PgPool,
    customer_id: &str,
    source: SyncSource,
    delay: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sync_customers AS c (customer_id, next_attempt_at, pending_source, requested_at) \
         VALUES ($1, now() + make_interval(secs => $2), $3, now()) \
         ON CONFLICT (customer_id) DO UPDATE SET \
            next_attempt_at = LEAST(COALESCE(c.next_attempt_at, 'infinity'), EXCLUDED.next_attempt_at), \
            pending_source = COALESCE(c.pending_source, EXCLUDED.pending_source), \
            requested_at = now(), updated_at = now()",
    )
    .bind(customer_id)
    .bind(delay.as_secs_f64())
    .bind(source.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether a webhook's outcome is ambiguous enough that we should ask Stripe instead of
/// guessing: a same-second tie the table could not order, or a `previous_attributes.status`
/// that does not match the status we held before this event (we missed something).
pub fn webhook_needs_sync(
    decision: &Decision,
    previous_status: Option<SubscriptionStatus>,
) -> Option<String> {
    if let Outcome::Rejected(rejection @ aggregates::Rejection::SameSecond { .. }) =
        &decision.outcome
    {
        return Some(rejection.to_string());
    }
    let previous = previous_status?;
    decision.events.iter().find_map(|event| match event {
        SubscriptionEvent::SubscriptionChanged { from, .. } if *from != Some(previous) => {
            Some(format!(
                "previous_attributes.status is {previous} but we held {}",
                from.map_or("nothing", |s| s.as_str())
            ))
        }
        _ => None,
    })
}
