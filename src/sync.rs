//! Sync with Stripe's API: fetch the truth about a customer's subscriptions and record
//! what differs as a `Reconcile` command, so the log stays the one source of truth and
//! every projection follows. Around it: every attempt is recorded and failures are
//! retried with backoff (through [`crate::sync_log`], which flags a customer whose syncs
//! failed more than three times in a row), the sync worker runs the requests that ambiguous
//! webhooks and the periodic reconciler make, and `backfill` pages through the whole
//! account.
//!
//! This module never judges a fact: the aggregate's `decide` does. It never reads Stripe's
//! JSON itself either (`stripe::objects` does).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregates::{ApiSnapshot, Decision, Outcome, OwnerFacts, SubscriptionCommand};
use chrono::{DateTime, Utc};
use projections::{Catalog, ProjectionError, SubscriptionInfo, WhenBusy};
use sqlx::PgPool;
use tokio::sync::{watch, Notify};

use crate::config::Settings;
use crate::error_chain::error_chain;
use crate::ledger::{Decided, ExecuteError, Ledger};
use crate::reads::Reads;
use crate::stripe::client::{StripeApi, StripeApiError};
use crate::stripe::objects::{listed_subscription, ListedSubscription};
use crate::sync_log::{self, Attempt, Standing, SyncOutcome, SyncSource, FLAG_AFTER};
use crate::telemetry::loggable_id;

/// Subscriptions asked for per page (Stripe's maximum).
pub const PAGE_SIZE: i64 = 100;

/// Customers the reconciler requests per pass.
const RECONCILE_BATCH: i64 = 500;
/// How long a request waits for the projections to apply what it recorded before it
/// answers anyway. They usually take milliseconds; this bounds the case where a long
/// transaction on the database holds their reader back (see `projections::log`).
const READ_YOUR_WRITES: Duration = Duration::from_secs(2);

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
    /// The customer's aggregate version after this sync (0: the log holds nothing).
    #[serde(skip)]
    pub version: u64,
    /// The customer's answer as this sync left it (see [`decided_answer`]).
    #[serde(skip)]
    pub info: Option<SubscriptionInfo>,
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
    api: StripeApi,
    /// Records what Stripe answered (a `Reconcile` command).
    ledger: Ledger,
    /// Where attempts and requests are kept (through [`sync_log`]).
    pool: PgPool,
    /// Brought up to date after a sync, so the next read shows it.
    reads: Reads,
    /// The first retry's delay after a failed sync (doubling after that).
    retry_base: Duration,
    /// How often the sync worker looks for due requests when nobody wakes it.
    poll_interval: Duration,
}

impl Syncer {
    /// A syncer, or `None` when `STRIPE_SECRET_KEY` is not set.
    pub fn new(
        settings: &Settings,
        pool: PgPool,
        ledger: Ledger,
        reads: Reads,
    ) -> Result<Option<Self>, StripeApiError> {
        let Some(api) = StripeApi::from_settings(settings)? else {
            return Ok(None);
        };
        Ok(Some(Self {
            api,
            ledger,
            pool,
            reads,
            retry_base: settings.sync_retry_base,
            poll_interval: settings.poll_interval,
        }))
    }

    pub fn api(&self) -> &StripeApi {
        &self.api
    }

    /// Syncs one customer now, records the attempt, and schedules a retry on failure (and
    /// flags the customer after more than three in a row). The report carries the answer
    /// the sync decided (`info`), which the projections will hold once they have applied it
    /// ([`Syncer::wait_until_shown`] waits for that).
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
            Ok((decision, _)) => {
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
        let Standing {
            consecutive_failures,
            flagged,
        } = sync_log::record_attempt(
            &self.pool,
            &Attempt {
                sync_id: &sync_id,
                customer_id,
                source,
                outcome,
                detail: detail.as_deref(),
                attempts,
                duration,
                started_at,
            },
            self.retry_base,
        )
        .await?;
        crate::metrics::sync_finished(source, outcome, duration);
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
        let (decision, decided) = result?;
        Ok(SyncReport {
            sync_id,
            customer_id: customer_id.to_owned(),
            outcome,
            events,
            attempts,
            duration_ms: duration.as_millis() as u64,
            consecutive_failures,
            flagged,
            version: decided.version,
            info: decided_answer(&decision, &decided, self.reads.catalog()),
        })
    }

    /// Waits until the projections show what `report`'s sync recorded (at once when it
    /// recorded nothing), so that the next read does: for pages that redirect to the app.
    pub async fn wait_until_shown(&self, report: &SyncReport) {
        if report.events > 0 {
            self.wait_for_projections(&report.customer_id, report.version)
                .await;
        }
    }

    /// Waits until the projections have applied the customer's events up to `version`
    /// (what the request committed), at most [`READ_YOUR_WRITES`]. It is woken by the
    /// projection runner (`Projections::wait_until_applied`), never polls. Running out of
    /// time or failing only costs freshness: the projections catch up on their own.
    pub async fn wait_for_projections(&self, customer_id: &str, version: u64) {
        let waited = self
            .reads
            .wait_until_applied(customer_id, version, READ_YOUR_WRITES)
            .await;
        match waited {
            Ok(true) => {}
            Ok(false) => tracing::info!(
                customer_id,
                version,
                "the projections did not apply a request's events in time; answering anyway"
            ),
            Err(error) => {
                tracing::warn!(customer_id, error = %error_chain(&error), "cannot wait for the projections")
            }
        }
    }

    /// Lists every subscription of the customer (all pages) and runs `Reconcile`.
    /// Returns the HTTP attempts made even when it fails.
    async fn fetch_and_record(
        &self,
        customer_id: &str,
        sync_id: &str,
    ) -> (Result<(Decision, Decided), SyncError>, u32) {
        // A customer of a connected account is only found in that account (Connect).
        let account = match self.ledger.account_of(customer_id).await {
            Ok(account) => account,
            Err(error) => return (Err(error.into()), 0),
        };
        let account = account.as_deref();
        // The answer is the truth as of the moment Stripe answered, on Stripe's clock (the
        // first page's `Date` header, whole seconds like Stripe's `created`; see
        // `aggregates::decide` for the ordering): our clock may run ahead of Stripe's, and
        // an answer stamped ahead would outrank the webhook of a change made just after
        // it. Only when Stripe sent no date is our clock at sending used.
        let sent_at = whole_second(Utc::now());
        let mut fetched_at: Option<DateTime<Utc>> = None;
        let mut attempts = 0;
        let mut listed = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = match self
                .api
                .list_subscriptions(Some(customer_id), cursor.as_deref(), PAGE_SIZE, account)
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    attempts += error.attempts();
                    return (Err(error.into()), attempts);
                }
            };
            attempts += page.attempts;
            fetched_at = fetched_at.or(page.stripe_time);
            for object in &page.value.data {
                match listed_subscription(object) {
                    Ok(sub) if sub.customer_id == customer_id => listed.push(sub),
                    Ok(_) => {}
                    // The reason can quote the payload (an unknown status): debug only.
                    Err(reason) => {
                        tracing::warn!(customer_id = %loggable_id(customer_id), "unreadable subscription");
                        tracing::debug!(reason, "unreadable subscription: why");
                    }
                }
            }
            match (page.value.has_more, page.value.last_id()) {
                (true, Some(last)) => cursor = Some(last.to_owned()),
                _ => break,
            }
        }
        let fetched_at = fetched_at.map_or(sent_at, whole_second);
        let mut snapshot = api_snapshot(customer_id, sync_id, fetched_at, listed);
        // Stripe Entitlements, when the account uses them. An account without the feature,
        // or an answer we cannot get, leaves what we hold alone: the subscriptions are
        // what the sync is for, and a webhook or the next sync brings the summary.
        match self
            .api
            .list_active_entitlements(customer_id, account)
            .await
        {
            Ok(answer) => {
                attempts += answer.attempts;
                snapshot.entitlements = Some(answer.value);
            }
            Err(error) => {
                attempts += error.attempts();
                tracing::warn!(
                    customer_id = %loggable_id(customer_id),
                    error = %error_chain(&error),
                    "active entitlements not listed; kept what we hold"
                );
            }
        }
        let result = self
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

    /// Claims one due sync request and runs it. `Ok(None)` when nothing is due.
    pub async fn run_next_due(&self) -> Result<Option<SyncReport>, SyncError> {
        let Some(due) = sync_log::claim_due(&self.pool).await? else {
            return Ok(None);
        };
        let customer_id = due.customer_id;
        let source = due.pending_source.unwrap_or(SyncSource::Reconciler);
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
                version: 0,
                info: None,
            })),
            Err(error) => Err(error),
        }
    }

    /// Runs due sync requests until `stop`: webhook-requested syncs, retries, and what
    /// the reconciler asked for.
    pub async fn run_worker(self, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        let poll = self.poll_interval;
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
        sync_log::request_stale(&self.pool, interval, RECONCILE_BATCH).await
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
    ///
    /// `account` pages a connected account instead of the platform's (`Stripe-Account`),
    /// and every customer listed is recorded as living in it. One customer's backfill
    /// without `account` is made in the account the customer's log names.
    pub async fn backfill(
        &self,
        customer_id: Option<&str>,
        account: Option<&str>,
        mut progress: impl FnMut(&BackfillReport),
    ) -> Result<BackfillReport, SyncError> {
        let account = match (account, customer_id) {
            (Some(account), _) => Some(account.to_owned()),
            (None, Some(customer_id)) => self.ledger.account_of(customer_id).await?,
            (None, None) => None,
        };
        let mut report = BackfillReport::default();
        let mut seen_customers = std::collections::HashSet::new();
        let mut cursor: Option<String> = None;
        loop {
            let sent_at = whole_second(Utc::now());
            let answer = self
                .api
                .list_subscriptions(
                    customer_id,
                    cursor.as_deref(),
                    PAGE_SIZE,
                    account.as_deref(),
                )
                .await?;
            // Each page is the truth as of Stripe's clock when it answered.
            let fetched_at = answer.stripe_time.map_or(sent_at, whole_second);
            let page = answer.value;
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
                        tracing::warn!("unreadable subscription in backfill");
                        tracing::debug!(reason, "unreadable subscription in backfill: why");
                    }
                }
            }
            for (customer, listed) in by_customer {
                let sync_id = format!("backfill_{}", uuid::Uuid::new_v4().simple());
                let mut snapshot = api_snapshot(&customer, &sync_id, fetched_at, listed);
                snapshot.owner.account = account.clone();
                let (decision, _) = self
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
        self.reads.catch_up(WhenBusy::Wait, |_, _| {}).await?;
        Ok(report)
    }
}

/// The customer's answer as `decision` left it, built as the projections build theirs
/// (from the newest event's view, `SubscriptionInfo::from_event`), so it is what they will
/// hold once they have applied it, and no read has to wait for them. When nothing was
/// recorded, the state's view at its version is what the newest event in the log carries.
/// `None` when the log holds nothing for the customer, and when nothing was recorded for a
/// customer whose view has no time (one known only from invoices or payments): the
/// projections stamp that answer with the newest event's time, which the aggregate does
/// not keep.
fn decided_answer(
    decision: &Decision,
    decided: &Decided,
    catalog: &Catalog,
) -> Option<SubscriptionInfo> {
    if let Some(newest) = decision.events.last() {
        return Some(SubscriptionInfo::from_event(
            newest,
            decided.version,
            catalog,
        ));
    }
    let view = decided.state.view();
    let as_of = view.as_of?;
    (decided.version > 0)
        .then(|| SubscriptionInfo::from_view(&view, decided.version, as_of, catalog))
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
        entitlements: None,
    }
}

fn whole_second(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(at.timestamp(), 0).unwrap_or(at)
}
