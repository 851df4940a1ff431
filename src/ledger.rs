//! Runs Stripe facts through the `Subscription` aggregate and drains the inbox.
//!
//! `execute` loads the customer's aggregate from the event log (postgres-es), calls the
//! pure `decide`, and commits its events with optimistic concurrency, retrying when
//! another worker or replica committed first. Inbox workers claim rows with
//! `FOR UPDATE SKIP LOCKED`, so no row is processed twice at once, and mark each with its
//! outcome. A crash between commit and marking only means the row is processed again,
//! which `decide` answers as a duplicate. This module must never acknowledge anything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aggregates::{
    decide, Decision, Move, Outcome, Subscription, SubscriptionCommand, SubscriptionError,
    SubscriptionEvent,
};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateContext, AggregateError, EventStore};
use postgres_es::PostgresEventRepository;
use sqlx::{PgPool, Row};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::stripe::{parse_event, route, Route};

/// How many times a command is retried after losing an optimistic-concurrency race.
const CONFLICT_RETRIES: usize = 20;

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
        }
    }

    /// Decides and commits one command, retrying optimistic-concurrency conflicts.
    pub async fn execute(
        &self,
        customer_id: &str,
        command: &SubscriptionCommand,
        stripe_event_id: &str,
    ) -> Result<Decision, ExecuteError> {
        for _ in 0..CONFLICT_RETRIES {
            let mut context = self
                .store
                .load_aggregate(customer_id)
                .await
                .map_err(ExecuteError::Store)?;
            let decision = decide(context.aggregate(), command)?;
            if decision.events.is_empty() {
                return Ok(decision);
            }
            let metadata =
                HashMap::from([("stripe_event_id".to_owned(), stripe_event_id.to_owned())]);
            match self
                .store
                .commit(decision.events.clone(), context, metadata)
                .await
            {
                Ok(_) => {
                    self.committed.notify_one();
                    return Ok(decision);
                }
                Err(AggregateError::AggregateConflict) => {
                    // Someone else committed first: reload and decide again.
                    tokio::task::yield_now().await;
                }
                Err(error) => return Err(ExecuteError::Store(error)),
            }
        }
        Err(ExecuteError::Conflict(CONFLICT_RETRIES))
    }

    /// Claims and processes one due inbox row. `Ok(None)` when nothing is due.
    pub async fn process_next(&self) -> Result<Option<Processed>, ProcessError> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT event_id, event_type, customer_id, payload, attempts, \
                extract(epoch FROM now() - received_at)::float8 AS waited FROM inbox \
             WHERE state = 'pending' AND next_attempt_at <= now() \
             ORDER BY next_attempt_at, stripe_created LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let event_id: String = row.get("event_id");
        let payload: String = row.get("payload");
        let attempts: i32 = row.get::<i32, _>("attempts") + 1;
        let event_type: String = row.get("event_type");
        let waited = Duration::from_secs_f64(row.get::<f64, _>("waited").max(0.0));
        // One span per webhook processed: logs inside it carry the event, and its outcome
        // is recorded once known.
        let span = tracing::info_span!(
            "webhook",
            event_id = %event_id,
            event_type = %event_type,
            customer_id = row.get::<Option<String>, _>("customer_id").unwrap_or_default(),
            attempt = attempts,
            outcome = tracing::field::Empty,
        );
        let started = std::time::Instant::now();

        let result = self
            .process_payload(&event_id, payload.as_bytes())
            .instrument(span.clone())
            .await;
        let took = started.elapsed();
        let processed = match result {
            Ok((outcome, detail, catch_up)) => {
                span.record("outcome", outcome.as_str());
                span.in_scope(|| tracing::info!(detail, "webhook processed"));
                crate::metrics::webhook_processed(
                    &event_type,
                    &outcome,
                    took,
                    waited + took,
                    catch_up,
                );
                sqlx::query(
                    "UPDATE inbox SET state = 'done', outcome = $2, detail = $3, attempts = $4, \
                        last_error = NULL, processed_at = now() WHERE event_id = $1",
                )
                .bind(&event_id)
                .bind(&outcome)
                .bind(&detail)
                .bind(attempts)
                .execute(&mut *tx)
                .await?;
                Processed {
                    event_id,
                    outcome,
                    detail,
                }
            }
            Err(error) => {
                let chain = error_chain(&error);
                let dead = attempts >= self.max_attempts;
                span.record("outcome", "failed");
                span.in_scope(|| tracing::warn!(dead, error = %chain, "webhook processing failed"));
                crate::metrics::webhook_processed(
                    &event_type,
                    "failed",
                    took,
                    waited + took,
                    false,
                );
                crate::metrics::webhook_failed(&event_type, dead);
                sqlx::query(
                    "UPDATE inbox SET state = CASE WHEN $3 THEN 'dead' ELSE 'pending' END, attempts = $2, \
                        last_error = $4, outcome = CASE WHEN $3 THEN 'failed' END, \
                        next_attempt_at = now() + make_interval(secs => $5) WHERE event_id = $1",
                )
                .bind(&event_id)
                .bind(attempts)
                .bind(dead)
                .bind(&chain)
                .bind(backoff(attempts).as_secs_f64())
                .execute(&mut *tx)
                .await?;
                Processed {
                    event_id,
                    outcome: "failed".to_owned(),
                    detail: Some(chain),
                }
            }
        };
        tx.commit().await?;
        Ok(Some(processed))
    }

    async fn process_payload(
        &self,
        event_id: &str,
        payload: &[u8],
    ) -> Result<(String, Option<String>, bool), ExecuteError> {
        let event = match parse_event(payload) {
            Ok(event) => event,
            // Only parseable events are ever stored; say so rather than retry forever.
            Err(error) => {
                return Ok((
                    "ignored".to_owned(),
                    Some(format!("stored payload no longer parses: {error}")),
                    false,
                ))
            }
        };
        let (customer_id, command) = match route(&event) {
            Route::Command {
                customer_id,
                command,
            } => (customer_id, command),
            Route::Ignore { reason } => return Ok(("ignored".to_owned(), Some(reason), false)),
        };
        let decision = self.execute(&customer_id, &command, event_id).await?;
        let detail = match &decision.outcome {
            Outcome::Applied | Outcome::Duplicate => None,
            Outcome::Rejected(rejection) if !decision.events.is_empty() => {
                Some(format!("{rejection} (ownership it carried was recorded)"))
            }
            Outcome::Rejected(rejection) => Some(rejection.to_string()),
            Outcome::NothingToRecord(reason) => Some(reason.clone()),
        };
        // A catch-up move means events between the two states have not arrived (yet).
        let catch_up = decision.events.iter().any(|e| {
            matches!(
                e,
                SubscriptionEvent::SubscriptionChanged {
                    transition: Move::CatchUp,
                    ..
                }
            )
        });
        Ok((decision.outcome.label().to_owned(), detail, catch_up))
    }

    /// Processes due rows until none is left (for `import` and tests).
    pub async fn drain(&self) -> Result<u64, ProcessError> {
        let mut count = 0;
        while self.process_next().await?.is_some() {
            count += 1;
        }
        Ok(count)
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
            match self.process_next().await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
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

/// Exponential backoff for failed processing: 1 s, 2 s, 4 s … capped at one hour.
pub fn backoff(attempts: i32) -> Duration {
    Duration::from_secs(1u64 << attempts.clamp(0, 12) as u32).min(Duration::from_secs(3600))
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
