//! Runs Stripe facts through the `Subscription` aggregate and drains the inbox.
//!
//! `execute` loads the customer's aggregate from the event log (postgres-es), calls the
//! pure `decide`, and commits its events with optimistic concurrency, retrying when
//! another worker or replica committed first. Inbox workers claim rows with
//! `FOR UPDATE SKIP LOCKED`, so no row is processed twice at once, and mark each with its
//! outcome. A crash between commit and marking only means the row is processed again,
//! which `decide` answers as a duplicate. This module must never acknowledge anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregates::{
    decide, Decision, Move, Outcome, Subscription, SubscriptionCommand, SubscriptionError,
    SubscriptionEvent, SubscriptionStatus,
};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateContext, AggregateError, EventStore};
use postgres_es::PostgresEventRepository;
use sqlx::{PgPool, Row};
use tokio::sync::{watch, Notify};

use crate::stripe::{parse_event, route, Route};

/// Inbox rows a worker claims at once.
const BATCH: i64 = 64;

/// How many times a command is retried after losing an optimistic-concurrency race.
const CONFLICT_RETRIES: usize = 20;

/// How long after an ambiguous webhook its sync runs: long enough for the second a tie
/// happened in to pass, so the sync's answer is ordered after it.
const WEBHOOK_SYNC_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error("the aggregate refused the command")]
    Domain(#[from] SubscriptionError),
    #[error("the event store failed")]
    Store(#[source] AggregateError<SubscriptionError>),
    #[error("still conflicting after {0} retries")]
    Conflict(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("inbox storage failed")]
    Database(#[from] sqlx::Error),
}

/// Runs commands and drains the inbox.
#[derive(Clone)]
pub struct Ledger {
    pool: PgPool,
    store: Arc<PersistedEventStore<PostgresEventRepository, Subscription>>,
    max_attempts: i32,
    /// Woken whenever events are committed, so projections catch up at once.
    pub committed: Arc<Notify>,
    /// How many optimistic-concurrency conflicts this process lost and retried.
    pub conflicts_retried: Arc<AtomicU64>,
}

/// What processing one inbox row gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    pub event_id: String,
    pub outcome: String,
    pub detail: Option<String>,
}

impl Ledger {
    pub fn new(pool: PgPool, max_attempts: i32) -> Self {
        let store =
            PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone()));
        Self {
            pool,
            store: Arc::new(store),
            max_attempts,
            committed: Arc::new(Notify::new()),
            conflicts_retried: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Decides and commits one command, retrying optimistic-concurrency conflicts.
    pub async fn execute(
        &self,
        customer_id: &str,
        command: &SubscriptionCommand,
        source_id: &str,
    ) -> Result<Decision, ExecuteError> {
        let mut decisions = self
            .execute_many(customer_id, std::slice::from_ref(command), &[source_id])
            .await?;
        Ok(decisions.pop().expect("one decision per command"))
    }

    /// Decides several commands for one customer in order, against one load of its
    /// aggregate, and commits all their events in one transaction. On an
    /// optimistic-concurrency conflict the whole group is reloaded and decided again, so
    /// each decision is always made against the state the log really holds.
    pub async fn execute_many(
        &self,
        customer_id: &str,
        commands: &[SubscriptionCommand],
        source_ids: &[&str],
    ) -> Result<Vec<Decision>, ExecuteError> {
        // Which Stripe events (or API reads) the committed events came from.
        let metadata = HashMap::from([("sources".to_owned(), source_ids.join(","))]);
        for attempt in 0..CONFLICT_RETRIES {
            let mut context = self
                .store
                .load_aggregate(customer_id)
                .await
                .map_err(ExecuteError::Store)?;
            let mut state = context.aggregate().clone();
            let mut decisions = Vec::with_capacity(commands.len());
            let mut events = Vec::new();
            for command in commands {
                let decision = decide(&state, command)?;
                for event in &decision.events {
                    state.apply(event.clone());
                }
                events.extend(decision.events.iter().cloned());
                decisions.push(decision);
            }
            if events.is_empty() {
                return Ok(decisions);
            }
            match self.store.commit(events, context, metadata.clone()).await {
                Ok(_) => {
                    self.committed.notify_one();
                    return Ok(decisions);
                }
                Err(AggregateError::AggregateConflict) => {
                    // Someone else committed first: reload and decide again.
                    // A short random pause, growing with each loss, so that many
                    // writers of one hot customer (workers, replicas) stop colliding in
                    // lockstep instead of exhausting their retries together.
                    self.conflicts_retried.fetch_add(1, Ordering::Relaxed);
                    let spread = 1 + 2 * attempt as u64;
                    let pause = (uuid::Uuid::new_v4().as_u128() as u64) % spread;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(error) => return Err(ExecuteError::Store(error)),
            }
        }
        Err(ExecuteError::Conflict(CONFLICT_RETRIES))
    }

    /// Claims up to `limit` due inbox rows, processes them (grouped per customer: one
    /// aggregate load and one commit per customer) and records each row's outcome, all
    /// in the claiming transaction. Returns what each row gave; empty when nothing is due.
    pub async fn process_batch(&self, limit: i64) -> Result<Vec<Processed>, ProcessError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT event_id, event_type, customer_id, payload, attempts, \
                extract(epoch FROM now() - received_at)::float8 AS waited FROM inbox \
             WHERE state = 'pending' AND next_attempt_at <= now() \
             ORDER BY next_attempt_at, stripe_created LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }

        // Route every row; commands are grouped per customer, in the claimed order.
        let mut claimed: HashMap<String, Claimed> = HashMap::new();
        let mut results: Vec<RowResult> = Vec::new();
        let mut groups: Vec<(String, Vec<Item>)> = Vec::new();
        for row in rows {
            let event_id: String = row.get("event_id");
            let event_type: String = row.get("event_type");
            let attempt = row.get::<i32, _>("attempts") + 1;
            // One span per webhook processed: logs inside it carry the event, and its
            // outcome is recorded once known.
            let span = tracing::info_span!(
                "webhook",
                event_id = %event_id,
                event_type = %event_type,
                customer_id = row.get::<Option<String>, _>("customer_id").unwrap_or_default(),
                attempt,
                outcome = tracing::field::Empty,
            );
            claimed.insert(
                event_id.clone(),
                Claimed {
                    event_type,
                    waited: Duration::from_secs_f64(row.get::<f64, _>("waited").max(0.0)),
                    span,
                },
            );
            let payload: String = row.get("payload");
            let event = match parse_event(payload.as_bytes()) {
                Ok(event) => event,
                // Only parseable events are ever stored; say so rather than retry forever.
                Err(error) => {
                    let detail = format!("stored payload no longer parses: {error}");
                    results.push(RowResult::done(event_id, "ignored", Some(detail)));
                    continue;
                }
            };
            match route(&event) {
                Route::Ignore { reason } => {
                    results.push(RowResult::done(event_id, "ignored", Some(reason)))
                }
                Route::Command {
                    customer_id,
                    command,
                } => {
                    // What Stripe says the status was before this change, to notice a
                    // move from a state we never held (issue 3: ask for a sync).
                    let previous_status = event
                        .previous_attributes
                        .as_ref()
                        .and_then(|previous| previous.get("status"))
                        .and_then(serde_json::Value::as_str)
                        .and_then(|status| status.parse().ok());
                    let item = (event_id, command, previous_status);
                    match groups.iter_mut().find(|(c, _)| *c == customer_id) {
                        Some((_, items)) => items.push(item),
                        None => groups.push((customer_id, vec![item])),
                    }
                }
            }
        }
        for (customer_id, items) in groups {
            let commands: Vec<SubscriptionCommand> =
                items.iter().map(|(_, c, _)| c.clone()).collect();
            let ids: Vec<&str> = items.iter().map(|(id, _, _)| id.as_str()).collect();
            let started = Instant::now();
            let executed = self.execute_many(&customer_id, &commands, &ids).await;
            let took = started.elapsed();
            match executed {
                Ok(decisions) => {
                    for ((event_id, _, previous_status), decision) in
                        items.into_iter().zip(decisions)
                    {
                        self.sync_if_ambiguous(&event_id, &customer_id, &decision, previous_status)
                            .await;
                        // A catch-up move means events between the two states have not
                        // arrived (yet).
                        let catch_up = decision.events.iter().any(|e| {
                            matches!(
                                e,
                                SubscriptionEvent::SubscriptionChanged {
                                    transition: Move::CatchUp,
                                    ..
                                }
                            )
                        });
                        let mut result = RowResult::done(
                            event_id,
                            decision.outcome.label(),
                            detail_of(&decision),
                        );
                        (result.took, result.catch_up) = (took, catch_up);
                        results.push(result);
                    }
                }
                Err(error) => {
                    let chain = error_chain(&error);
                    for (event_id, _, _) in items {
                        results.push(RowResult {
                            event_id,
                            outcome: Err(chain.clone()),
                            took,
                            catch_up: false,
                        });
                    }
                }
            }
        }

        let mut processed = Vec::with_capacity(results.len());
        let (mut done_ids, mut done_outcomes, mut done_details) =
            (Vec::new(), Vec::new(), Vec::new());
        for RowResult {
            event_id,
            outcome,
            took,
            catch_up,
        } in results
        {
            let row = &claimed[&event_id];
            match outcome {
                Ok((outcome, detail)) => {
                    row.span.record("outcome", outcome.as_str());
                    row.span
                        .in_scope(|| tracing::info!(detail, "webhook processed"));
                    crate::metrics::webhook_processed(
                        &row.event_type,
                        &outcome,
                        took,
                        row.waited + took,
                        catch_up,
                    );
                    done_ids.push(event_id.clone());
                    done_outcomes.push(outcome.clone());
                    done_details.push(detail.clone());
                    processed.push(Processed {
                        event_id,
                        outcome,
                        detail,
                    });
                }
                Err(chain) => {
                    let attempts: i32 = sqlx::query_scalar(
                        "UPDATE inbox SET attempts = attempts + 1, last_error = $2, \
                            next_attempt_at = now() + make_interval(secs => least(power(2, least(attempts + 1, 12)), 3600)::float8) \
                         WHERE event_id = $1 RETURNING attempts",
                    )
                    .bind(&event_id)
                    .bind(&chain)
                    .fetch_one(&mut *tx)
                    .await?;
                    let dead = attempts >= self.max_attempts;
                    if dead {
                        sqlx::query("UPDATE inbox SET state = 'dead', outcome = 'failed' WHERE event_id = $1")
                            .bind(&event_id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    row.span.record("outcome", "failed");
                    row.span
                        .in_scope(|| tracing::warn!(attempts, dead, error = %chain, "webhook processing failed"));
                    crate::metrics::webhook_processed(
                        &row.event_type,
                        "failed",
                        took,
                        row.waited + took,
                        false,
                    );
                    crate::metrics::webhook_failed(&row.event_type, dead);
                    processed.push(Processed {
                        event_id,
                        outcome: "failed".to_owned(),
                        detail: Some(chain),
                    });
                }
            }
        }
        if !done_ids.is_empty() {
            sqlx::query(
                "UPDATE inbox SET state = 'done', outcome = u.outcome, detail = u.detail, \
                    attempts = inbox.attempts + 1, last_error = NULL, processed_at = now() \
                 FROM unnest($1::text[], $2::text[], $3::text[]) AS u(event_id, outcome, detail) \
                 WHERE inbox.event_id = u.event_id",
            )
            .bind(&done_ids)
            .bind(&done_outcomes)
            .bind(&done_details)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(processed)
    }

    /// An ambiguous move is not guessed at: ask Stripe's API for the truth (issue 3).
    async fn sync_if_ambiguous(
        &self,
        event_id: &str,
        customer_id: &str,
        decision: &Decision,
        previous_status: Option<SubscriptionStatus>,
    ) {
        let Some(reason) = crate::sync::webhook_needs_sync(decision, previous_status) else {
            return;
        };
        tracing::info!(event_id, customer_id, reason, "requesting a sync");
        if let Err(error) = crate::sync::request_sync(
            &self.pool,
            customer_id,
            crate::sync::SyncSource::Webhook,
            WEBHOOK_SYNC_DELAY,
        )
        .await
        {
            // The periodic reconciler will still get there.
            tracing::warn!(event_id, error = %error_chain(&error), "cannot request a sync");
        }
    }

    /// Processes due rows until none is left (for `import` and tests).
    pub async fn drain(&self) -> Result<u64, ProcessError> {
        let mut count = 0;
        loop {
            let batch = self.process_batch(BATCH).await?;
            if batch.is_empty() {
                return Ok(count);
            }
            count += batch.len() as u64;
        }
    }

    /// One inbox worker: processes rows while there are any, then sleeps until woken or
    /// `poll` passes (rows written by another replica wake nobody here).
    pub async fn run_worker(
        self,
        wake: Arc<Notify>,
        poll: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            if *stop.borrow() {
                return;
            }
            match self.process_batch(BATCH).await {
                Ok(batch) if !batch.is_empty() => continue,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "inbox worker cannot reach the database")
                }
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

fn detail_of(decision: &Decision) -> Option<String> {
    match &decision.outcome {
        Outcome::Applied | Outcome::Duplicate => None,
        Outcome::Rejected(rejection) if !decision.events.is_empty() => {
            Some(format!("{rejection} (ownership it carried was recorded)"))
        }
        Outcome::Rejected(rejection) => Some(rejection.to_string()),
        Outcome::NothingToRecord(reason) => Some(reason.clone()),
    }
}

/// A claimed inbox row's command, with the status Stripe says it moved from.
type Item = (String, SubscriptionCommand, Option<SubscriptionStatus>);

/// What processing needs to know about a claimed row besides its command.
struct Claimed {
    event_type: String,
    /// From receipt to claim.
    waited: Duration,
    span: tracing::Span,
}

/// One row's result: its outcome and detail, or the error chain of a failure.
struct RowResult {
    event_id: String,
    outcome: Result<(String, Option<String>), String>,
    took: Duration,
    catch_up: bool,
}

impl RowResult {
    fn done(event_id: String, outcome: &str, detail: Option<String>) -> Self {
        Self {
            event_id,
            outcome: Ok((outcome.to_owned(), detail)),
            took: Duration::ZERO,
            catch_up: false,
        }
    }
}

/// An error and its causes, one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
