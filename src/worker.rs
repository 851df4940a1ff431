//! The inbox workers: claim due rows, parse and route each Stripe event to a command,
//! run the commands through the ledger, and mark every row with its outcome, all in the
//! claiming transaction, so a batch costs one claim, one history load, one insert of
//! events and one commit (BENCHMARKS.md says why each of those exists).
//!
//! Rows are claimed with `FOR UPDATE SKIP LOCKED`, so no row is processed twice at once.
//! A crash between committing events and marking a row only means the row is processed
//! again, which the aggregate answers as a duplicate. Each worker of a process takes its
//! own hash [`Partition`] of the customers, so they never race for a customer; a batch
//! that loses a race with another replica goes one customer at a time. A row that failed
//! for a reason that may pass is retried with backoff and dead-lettered after
//! `SUBLEDGER_MAX_ATTEMPTS`; one that can never be processed (it holds a value Postgres
//! refuses for its content) is dead-lettered at once with its reason, and never fails the
//! rows beside it, even of the same customer. An ambiguous webhook is not guessed at: a
//! sync from Stripe's API is requested (through `sync_log`; the syncer runs it). This
//! module never judges a fact (the aggregate does) and never writes the log itself (the
//! ledger does). It calls Stripe for one thing only: a thin event carries no object, so
//! the object it names is fetched (for its `context` account) and recorded as the API
//! answer it is, stamped with Stripe's clock; a fetch that fails fails the row, which is
//! retried and dead-lettered like any other.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregates::{
    ApiSnapshot, Decision, Move, OwnerFacts, SubscriptionCommand, SubscriptionEvent,
    SubscriptionStatus,
};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{watch, Notify};

use crate::config::StripeMode;
use crate::db_error::{Refusal, Refused};
use crate::error_chain::error_chain;
use crate::inbox::{self, ClaimedEvent, Outcome, ParsedEvents, Processed};
use crate::ledger::{check_storable, BatchAggregates, ExecuteError, Group, Ledger};
use crate::metrics::RefusedAt;
use crate::stripe::client::StripeApi;
use crate::stripe::event::{retrieve_path, ThinRef};
use crate::stripe::objects::listed_subscription;
use crate::stripe::{parse_event, route, Route, StripeEvent};
use crate::sync_log::{self, SyncSource};
use crate::telemetry::{loggable_id, loggable_word};

pub use crate::inbox::Partition;

/// Most inbox rows a worker claims at once. A batch that was not full is followed by
/// [`LINGER`], so under load a batch holds what arrived meanwhile, up to this. At 64, the
/// benchmark's ingestion filled most batches (55 rows on average), so workers claimed
/// again at once and each event bore more of a batch's fixed statements and commit; at
/// 256, 74 rows on average, and the machine's CPU per delivery was lower in 5 of 6
/// alternating pairs (236 against 245 µs on average; BENCHMARKS.md, 2026-12-02).
const BATCH: i64 = 256;

/// How long a worker waits after a batch that was not full before claiming again.
const LINGER: Duration = Duration::from_millis(10);

/// How long after an ambiguous webhook its sync runs: long enough for the second a tie
/// happened in to pass, so the sync's answer is ordered after it.
const WEBHOOK_SYNC_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("inbox storage failed")]
    Database(#[from] sqlx::Error),
}

/// Drains the inbox through the ledger.
#[derive(Clone)]
pub struct InboxWorker {
    pool: PgPool,
    ledger: Ledger,
    max_attempts: i32,
    /// The Stripe mode this deployment serves: an event of the other mode is ignored.
    mode: StripeMode,
    /// Fetches the objects thin events name; `None` without a Stripe key.
    stripe: Option<StripeApi>,
    /// Events this process's webhooks stored, already parsed (see [`ParsedEvents`]).
    parsed: ParsedEvents,
}

impl InboxWorker {
    /// `max_attempts`: failed attempts after which a row is dead-lettered; `mode`: the
    /// Stripe mode whose events count here.
    pub fn new(pool: PgPool, ledger: Ledger, max_attempts: i32, mode: StripeMode) -> Self {
        Self {
            pool,
            ledger,
            max_attempts,
            mode,
            stripe: None,
            parsed: ParsedEvents::default(),
        }
    }

    /// Where this process's webhooks hand over the events they stored, parsed, so that a
    /// worker claiming one of their rows does not parse its payload again: give it to the
    /// [`inbox::InboxWriter`] (`InboxWriter::handing_over`).
    pub fn parsed_events(&self) -> ParsedEvents {
        self.parsed.clone()
    }

    /// Thin events are processed by fetching the object they name with `api`.
    pub fn with_stripe(mut self, api: Option<StripeApi>) -> Self {
        self.stripe = api;
        self
    }

    /// What a thin event means once the object it names is fetched (for its `context`
    /// account), as the API answer it is, stamped with Stripe's clock: a subscription is a
    /// `Reconcile` of that one subscription (as a sync records it); any other object is
    /// routed as the snapshot event of the same type would be, its time Stripe's at the
    /// fetch. `Err`: the fetch failed, and the row is retried like any failure, unless
    /// Stripe says the object does not exist: then it is dead-lettered at once.
    async fn fetch_thin(&self, event: &StripeEvent, thin: &ThinRef) -> Result<Route, RowFailure> {
        let Some(api) = &self.stripe else {
            return Err(RowFailure::retry(
                "a thin event names an object to fetch, and STRIPE_SECRET_KEY is not set"
                    .to_owned(),
            ));
        };
        let path = retrieve_path(&thin.object_type, &thin.id)
            .expect("route answers Fetch only for a fetchable object");
        let sent_at = Utc::now();
        let answer = api
            .retrieve(&path, thin.context.as_deref())
            .await
            .map_err(|error| {
                let chain = format!("fetching the thin event's object: {}", error_chain(&error));
                // Stripe says the object does not exist (for this account): asking again
                // gives the same answer, so the row is dead-lettered at once, kept for an
                // operator to look at (a wrong `context`?) and redrive.
                if error.is_not_found() {
                    RowFailure::permanent(chain, None)
                } else {
                    RowFailure::retry(chain)
                }
            })?;
        let fetched_at = answer.stripe_time.unwrap_or(sent_at);
        let fetched_at = DateTime::from_timestamp(fetched_at.timestamp(), 0).unwrap_or(fetched_at);
        if thin.object_type == "subscription" {
            let listed = listed_subscription(&answer.value).map_err(|reason| {
                RowFailure::retry(format!("the fetched subscription cannot be read: {reason}"))
            })?;
            let customer_id = listed.customer_id.clone();
            let snapshot = ApiSnapshot {
                customer_id: customer_id.clone(),
                sync_id: event.id.clone(),
                api_call: format!("api.subscriptions.retrieve ({})", event.event_type),
                fetched_at,
                // The object was fetched in the event's account: the customer lives there.
                owner: OwnerFacts {
                    account: event.account.clone(),
                    ..listed.owner
                },
                subscriptions: vec![(listed.facts, listed.payment_method)],
                // A subscription's fetch says nothing about the customer's entitlements.
                entitlements: None,
            };
            return Ok(Route::Command {
                customer_id,
                command: SubscriptionCommand::Reconcile(snapshot),
            });
        }
        Ok(match route(&event.with_fetched(answer.value, fetched_at)) {
            Route::Fetch(_) => unreachable!("a fetched event is not thin"),
            routed => routed,
        })
    }

    /// Claims up to `limit` due inbox rows (of one partition of the customers, if given),
    /// processes them and records each row's outcome, all in the claiming transaction:
    /// the histories of every customer in the batch are loaded by one query, and the
    /// events of the whole batch are written with the outcomes, in one commit. If that
    /// write loses a race with another writer of one of the customers, the batch is
    /// processed again one customer at a time (one load and commit each, with retries);
    /// and a customer whose commands Postgres refuses for a value's content, one command
    /// at a time, so only the row holding that value fails. A row that can never be
    /// processed is dead-lettered at once. Returns what each row gave; empty when nothing
    /// is due.
    pub async fn process_batch(
        &self,
        limit: i64,
        partition: Option<Partition>,
    ) -> Result<Vec<Processed>, ProcessError> {
        let mut tx = self.pool.begin().await?;
        let rows = inbox::claim(&mut tx, limit, partition, &self.parsed).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }

        // Route every row; commands are grouped per customer, in the claimed order.
        let mut claimed: HashMap<String, InFlight> = HashMap::new();
        let mut results: Vec<RowResult> = Vec::new();
        // Customers an ambiguous webhook asks a sync of.
        let mut syncs: Vec<String> = Vec::new();
        let mut groups: Vec<Group> = Vec::new();
        // What Stripe says the status was before each change, by event id, to notice a
        // move from a state we never held (issue 3: ask for a sync).
        let mut previous: HashMap<String, SubscriptionStatus> = HashMap::new();
        for row in rows {
            let inbox::Claimed {
                event_id,
                event_type,
                customer_id,
                event,
                attempts,
                waited,
            } = row;
            // One span per webhook processed: logs inside it carry the event, and its
            // outcome is recorded once known. Only what looks like an id or a Stripe word
            // is in it (crate::telemetry: no personal data at info).
            let span = tracing::info_span!(
                "webhook",
                event_id = %loggable_id(&event_id),
                event_type = %loggable_word(&event_type),
                customer_id = customer_id
                    .map(|id| loggable_id(&id).into_owned())
                    .unwrap_or_default(),
                attempt = attempts + 1,
                outcome = tracing::field::Empty,
            );
            claimed.insert(
                event_id.clone(),
                InFlight {
                    event_type,
                    attempts,
                    waited,
                    span,
                },
            );
            // Parsed and routed at receipt if this process stored it; otherwise parsed
            // from the payload, which is exactly the bytes the receipt parsed, and routed
            // below (`route` is a function of the event alone).
            let mut routed_at_receipt = None;
            let parsed = match event {
                ClaimedEvent::Parsed(event, routed) => {
                    routed_at_receipt = Some(*routed);
                    Ok(event)
                }
                ClaimedEvent::Raw(payload) => parse_event(payload.as_bytes()).map(Arc::new),
                // Only processed rows lose their payload (a constraint of the table); say
                // so rather than fail on a row that somehow has none.
                ClaimedEvent::Pruned => {
                    let detail = "its payload was pruned before it was processed".to_owned();
                    results.push(RowResult::done(event_id, Outcome::Ignored, Some(detail)));
                    continue;
                }
            };
            let event = match parsed {
                Ok(event) => event,
                // Only parseable events are ever stored; say so rather than retry forever.
                Err(error) => {
                    let detail = format!("stored payload no longer parses: {error}");
                    results.push(RowResult::done(event_id, Outcome::Ignored, Some(detail)));
                    continue;
                }
            };
            // Live and test never mix (issue 11): the other mode's event is kept in the
            // inbox with why, counted, and changes nothing.
            if !self.mode.accepts(event.livemode) {
                crate::metrics::webhook_wrong_mode(event.livemode);
                let reason = format!(
                    "a {} mode event reached a {} mode deployment",
                    if event.livemode { "live" } else { "test" },
                    self.mode.as_str()
                );
                results.push(RowResult::done(event_id, Outcome::Ignored, Some(reason)));
                continue;
            }
            let routed = match routed_at_receipt.unwrap_or_else(|| route(&event)) {
                Route::Fetch(thin) => match self.fetch_thin(&event, &thin).await {
                    Ok(routed) => routed,
                    Err(failure) => {
                        results.push(RowResult::failed(event_id, failure));
                        continue;
                    }
                },
                routed => routed,
            };
            match routed {
                Route::Fetch(_) => unreachable!("fetched above"),
                Route::ReconcileAll => {
                    // Every customer with a subscription is synced soon (the sync worker
                    // runs them, at its pace); the row is done once they are requested.
                    let result = match sync_log::request_stale(&self.pool, Duration::ZERO, i64::MAX).await {
                        Ok(requested) => RowResult::done(
                            event_id,
                            Outcome::Ignored,
                            Some(format!(
                                "Stripe failed to generate events for a while: a sync of {requested} customers requested"
                            )),
                        ),
                        Err(error) => RowResult::failed(
                            event_id,
                            RowFailure::retry(format!(
                                "requesting syncs: {}",
                                error_chain(&error)
                            )),
                        ),
                    };
                    results.push(result);
                }
                Route::Ignore { reason } => {
                    results.push(RowResult::done(event_id, Outcome::Ignored, Some(reason)))
                }
                Route::Command {
                    customer_id,
                    command,
                } => {
                    // A value the log's readers could not store: never retried, and never
                    // grouped with the customer's other rows, which go on without it.
                    if let Err(refused) = check_storable(&command) {
                        results.push(RowResult::failed(event_id, RowFailure::refused(refused)));
                        continue;
                    }
                    if let Some(status) = event
                        .previous_attributes
                        .as_ref()
                        .and_then(|previous| previous.get("status"))
                        .and_then(serde_json::Value::as_str)
                        .and_then(|status| status.parse().ok())
                    {
                        previous.insert(event_id.clone(), status);
                    }
                    let group = match groups.iter().position(|g| g.customer_id == customer_id) {
                        Some(index) => &mut groups[index],
                        None => {
                            groups.push(Group::new(customer_id));
                            groups.last_mut().expect("just pushed")
                        }
                    };
                    group.commands.push(command);
                    group.sources.push(event_id);
                }
            }
        }
        let started = Instant::now();
        // Aggregates to remember once (and only if) the batch's events are committed.
        let mut aggregates = BatchAggregates::default();
        // Each group's result: all its commands' decisions, or one result per command when
        // the group had to be split.
        let executed: Vec<(GroupResult, Duration)> =
            match self.ledger.execute_batch(&mut tx, &groups).await? {
                Some(written) => {
                    let took = started.elapsed();
                    aggregates = written.aggregates;
                    written
                        .results
                        .into_iter()
                        .map(|result| (GroupResult::Together(result), took))
                        .collect()
                }
                None => {
                    let mut all = Vec::with_capacity(groups.len());
                    for group in &groups {
                        let started = Instant::now();
                        let result = self.execute_alone(group).await;
                        all.push((result, started.elapsed()));
                    }
                    all
                }
            };
        for (group, (executed, took)) in groups.into_iter().zip(executed) {
            let each: Vec<Result<Decision, RowFailure>> = match executed {
                GroupResult::Together(Ok(decisions)) => decisions.into_iter().map(Ok).collect(),
                GroupResult::Together(Err(error)) => {
                    let failure = RowFailure::of(&error);
                    vec![Err(failure); group.sources.len()]
                }
                GroupResult::OneByOne(each) => each
                    .into_iter()
                    .map(|result| result.map_err(|error| RowFailure::of(&error)))
                    .collect(),
            };
            for (event_id, decided) in group.sources.into_iter().zip(each) {
                let decision = match decided {
                    Ok(decision) => decision,
                    Err(failure) => {
                        let mut result = RowResult::failed(event_id, failure);
                        result.took = took;
                        results.push(result);
                        continue;
                    }
                };
                let previous_status = previous.get(&event_id).copied();
                if asks_for_sync(&event_id, &group.customer_id, &decision, previous_status) {
                    syncs.push(group.customer_id.clone());
                }
                // A catch-up move means events between the two states have not arrived
                // (yet).
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
                    Outcome::from(&decision.outcome),
                    detail_of(&decision),
                );
                (result.took, result.catch_up) = (took, catch_up);
                results.push(result);
            }
        }

        let mut processed = Vec::with_capacity(results.len());
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
                    // The detail (why it was stale, illegal or ignored) can name values from
                    // the payload: debug only. It is on the inbox row for `inspect`.
                    row.span.in_scope(|| {
                        tracing::info!("webhook processed");
                        tracing::debug!(detail, "webhook processed: detail");
                    });
                    crate::metrics::webhook_processed(
                        &row.event_type,
                        outcome,
                        took,
                        row.waited + took,
                        catch_up,
                    );
                    processed.push(Processed {
                        event_id,
                        outcome,
                        detail,
                    });
                }
                Err(RowFailure {
                    chain,
                    refusal: _,
                    permanent: false,
                }) => {
                    let inbox::Failed { attempts, dead } = inbox::mark_failed(
                        &mut tx,
                        &event_id,
                        row.attempts,
                        &chain,
                        self.max_attempts,
                    )
                    .await?;
                    row.span.record("outcome", Outcome::Failed.as_str());
                    row.span
                        .in_scope(|| tracing::warn!(attempts, dead, error = %chain, "webhook processing failed"));
                    crate::metrics::webhook_processed(
                        &row.event_type,
                        Outcome::Failed,
                        took,
                        row.waited + took,
                        false,
                    );
                    crate::metrics::webhook_failed(&row.event_type, dead);
                    processed.push(Processed {
                        event_id,
                        outcome: Outcome::Failed,
                        detail: Some(chain),
                    });
                }
                // It can never be processed: dead-lettered now, with why, not retried.
                Err(RowFailure {
                    chain,
                    refusal,
                    permanent: true,
                }) => {
                    let reason = format!("{chain}; dead-lettered without retrying");
                    let inbox::Failed { attempts, .. } =
                        inbox::mark_dead(&mut tx, &event_id, row.attempts, &reason).await?;
                    row.span.record("outcome", Outcome::Failed.as_str());
                    row.span.in_scope(|| {
                        tracing::warn!(
                            attempts,
                            dead = true,
                            reason = refusal.map_or("not_found", Refusal::as_str),
                            error = %chain,
                            "webhook unprocessable: dead-lettered without retrying"
                        )
                    });
                    crate::metrics::webhook_processed(
                        &row.event_type,
                        Outcome::Failed,
                        took,
                        row.waited + took,
                        false,
                    );
                    crate::metrics::webhook_failed(&row.event_type, true);
                    if let Some(refusal) = refusal {
                        crate::metrics::webhook_refused(RefusedAt::Processing, refusal);
                    }
                    processed.push(Processed {
                        event_id,
                        outcome: Outcome::Failed,
                        detail: Some(reason),
                    });
                }
            }
        }
        // The syncs the ambiguous webhooks ask for, committed with their outcomes.
        sync_log::request_syncs(&mut tx, &syncs, SyncSource::Webhook, WEBHOOK_SYNC_DELAY).await?;
        // Every row that did not fail was processed to its outcome.
        inbox::mark_done(
            &mut tx,
            processed.iter().filter(|p| p.outcome != Outcome::Failed),
        )
        .await?;
        tx.commit().await?;
        self.ledger.batch_committed(aggregates);
        Ok(processed)
    }

    /// One customer's group on its own (after the batch's joint write failed). When
    /// Postgres refuses a value of the group for its content, each command is tried alone,
    /// in order, so only the one holding that value fails and the others are recorded.
    async fn execute_alone(&self, group: &Group) -> GroupResult {
        let result = self
            .ledger
            .execute_many(&group.customer_id, &group.commands, &group.source_ids())
            .await
            .map(|(decisions, _)| decisions);
        match result {
            Err(error) if error.refusal().is_some() && group.commands.len() > 1 => {
                let mut each = Vec::with_capacity(group.commands.len());
                for (command, source) in group.commands.iter().zip(&group.sources) {
                    each.push(
                        self.ledger
                            .execute(&group.customer_id, command, source)
                            .await
                            .map(|(decision, _)| decision),
                    );
                }
                GroupResult::OneByOne(each)
            }
            other => GroupResult::Together(other),
        }
    }

    /// Processes due rows until none is left (for `import` and tests).
    pub async fn drain(&self) -> Result<u64, ProcessError> {
        self.drain_with(|_| {}).await
    }

    /// [`InboxWorker::drain`], telling `progress` the rows processed after each batch.
    pub async fn drain_with(&self, mut progress: impl FnMut(u64)) -> Result<u64, ProcessError> {
        let mut count = 0;
        loop {
            let batch = self.process_batch(BATCH, None).await?;
            if batch.is_empty() {
                return Ok(count);
            }
            count += batch.len() as u64;
            progress(count);
        }
    }

    /// One inbox worker: processes rows while there are any, then sleeps until woken or
    /// `poll` passes (rows written by another replica wake nobody here).
    pub async fn run_worker(
        self,
        partition: Partition,
        wake: Arc<WorkerWake>,
        poll: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            if *stop.borrow() {
                return;
            }
            match self.process_batch(BATCH, Some(partition)).await {
                Ok(batch) if batch.len() as i64 == BATCH => continue,
                Ok(batch) if !batch.is_empty() => {
                    // Under load, let the next rows gather for a moment: fewer, larger
                    // batches cost the database far less than many small ones.
                    tokio::time::sleep(LINGER).await;
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "inbox worker cannot reach the database")
                }
            }
            tokio::select! {
                _ = wake.worker(partition.index).notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// Whether the webhook's decision asks for a sync of its customer (logged with why): an
/// ambiguous move is not guessed at, Stripe's API is asked for the truth (issue 3).
fn asks_for_sync(
    event_id: &str,
    customer_id: &str,
    decision: &Decision,
    previous_status: Option<SubscriptionStatus>,
) -> bool {
    let Some(reason) = webhook_needs_sync(decision, previous_status) else {
        return false;
    };
    tracing::info!(
        event_id = %loggable_id(event_id),
        customer_id = %loggable_id(customer_id),
        "requesting a sync"
    );
    tracing::debug!(reason, "requesting a sync: why");
    true
}

/// Whether a webhook's outcome is ambiguous enough that we should ask Stripe instead of
/// guessing: a same-second tie the table could not order, or a `previous_attributes.status`
/// that does not match the status we held before this event (we missed something).
fn webhook_needs_sync(
    decision: &Decision,
    previous_status: Option<SubscriptionStatus>,
) -> Option<String> {
    if let aggregates::Outcome::Rejected(rejection @ aggregates::Rejection::SameSecond { .. }) =
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

fn detail_of(decision: &Decision) -> Option<String> {
    use aggregates::Outcome as Judged;
    match &decision.outcome {
        Judged::Applied | Judged::Duplicate => None,
        Judged::Rejected(rejection) if !decision.events.is_empty() => {
            Some(format!("{rejection} (ownership it carried was recorded)"))
        }
        Judged::Rejected(rejection) => Some(rejection.to_string()),
        Judged::NothingToRecord(reason) => Some(reason.clone()),
    }
}

/// Wakes the inbox workers of this process. Each worker has its own permit, so one wake
/// reaches every partition, and a wake that comes while a worker is busy is kept for it.
pub struct WorkerWake {
    workers: Vec<Notify>,
}

impl WorkerWake {
    pub fn new(workers: usize) -> Self {
        Self {
            workers: (0..workers.max(1)).map(|_| Notify::new()).collect(),
        }
    }

    pub fn wake_all(&self) {
        for worker in &self.workers {
            worker.notify_one();
        }
    }

    fn worker(&self, index: usize) -> &Notify {
        &self.workers[index % self.workers.len()]
    }
}

/// What processing needs to know about a claimed row besides its command.
struct InFlight {
    event_type: String,
    /// Attempts made before this one.
    attempts: i32,
    /// From receipt to claim.
    waited: Duration,
    span: tracing::Span,
}

/// What the ledger made of a group: every command's decision together (or the one error
/// that failed them all), or each command's own result once the group was split.
enum GroupResult {
    Together(Result<Vec<Decision>, ExecuteError>),
    OneByOne(Vec<Result<Decision, ExecuteError>>),
}

/// Why a row failed: the error chain, whether it can never be processed (dead-lettered at
/// once rather than retried), and the refusal that says so when it is a value Postgres
/// refuses.
#[derive(Debug, Clone)]
struct RowFailure {
    chain: String,
    refusal: Option<Refusal>,
    permanent: bool,
}

impl RowFailure {
    fn of(error: &ExecuteError) -> Self {
        match error.refusal() {
            // Named by its reason and SQLSTATE, not Postgres's message, which can quote
            // the refused value (and so a payload's personal data) into logs.
            Some(refusal) => match error {
                ExecuteError::Unstorable(refused) => Self::refused(refused.clone()),
                ExecuteError::Store(store) => {
                    let refused = match store.database_error() {
                        Some(database) => Refused::by_postgres(refusal, database),
                        None => Refused::new(refusal, refusal.describe()),
                    };
                    Self::refused(refused)
                }
                _ => Self::refused(Refused::new(refusal, refusal.describe())),
            },
            None => Self::retry(error_chain(error)),
        }
    }

    /// A failure another attempt may not meet (an outage, a missing key).
    fn retry(chain: String) -> Self {
        Self {
            chain,
            refusal: None,
            permanent: false,
        }
    }

    /// A failure every attempt would meet.
    fn permanent(chain: String, refusal: Option<Refusal>) -> Self {
        Self {
            chain,
            refusal,
            permanent: true,
        }
    }

    fn refused(refused: Refused) -> Self {
        Self::permanent(
            format!("unprocessable ({}): {refused}", refused.refusal),
            Some(refused.refusal),
        )
    }
}

/// One row's result: its outcome and detail, or why it failed.
struct RowResult {
    event_id: String,
    outcome: Result<(Outcome, Option<String>), RowFailure>,
    took: Duration,
    catch_up: bool,
}

impl RowResult {
    fn done(event_id: String, outcome: Outcome, detail: Option<String>) -> Self {
        Self {
            event_id,
            outcome: Ok((outcome, detail)),
            took: Duration::ZERO,
            catch_up: false,
        }
    }

    fn failed(event_id: String, failure: RowFailure) -> Self {
        Self {
            event_id,
            outcome: Err(failure),
            took: Duration::ZERO,
            catch_up: false,
        }
    }
}
