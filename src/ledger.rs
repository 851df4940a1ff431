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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aggregates::{
    decide, Decision, Move, Subscription, SubscriptionCommand, SubscriptionError,
    SubscriptionEvent, SubscriptionStatus,
};
use cqrs_es::Aggregate;
use event_store::batch::{self, NewEvents};
use event_store::{EventStore, Metadata, StoreError};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{watch, Notify};

use crate::error_chain::error_chain;
use crate::inbox::{self, Outcome};
use crate::stripe::{parse_event, route, Route};

// Workers of one process take disjoint partitions of the customers, so their batches
// never race for a customer; workers of other replicas may, and then the batch is
// retried per customer.
pub use crate::inbox::{Partition, Processed};

/// Inbox rows a worker claims at once.
const BATCH: i64 = 64;

/// How long a worker waits after a batch that was not full before claiming again.
const LINGER: Duration = Duration::from_millis(10);

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
    Store(#[source] StoreError),
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
    store: EventStore,
    max_attempts: i32,
    /// Woken whenever events are committed, so projections catch up at once.
    pub committed: Arc<Notify>,
    /// How many optimistic-concurrency conflicts this process lost and retried.
    pub conflicts_retried: Arc<AtomicU64>,
    /// Aggregates as of a version the log holds, so batches load only newer events.
    pub cache: Arc<AggregateCache>,
}

impl Ledger {
    pub fn new(pool: PgPool, max_attempts: i32, cache_capacity: usize) -> Self {
        Self {
            store: EventStore::new(pool.clone()),
            pool,
            max_attempts,
            committed: Arc::new(Notify::new()),
            conflicts_retried: Arc::new(AtomicU64::new(0)),
            cache: Arc::new(AggregateCache::new(cache_capacity)),
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
        let metadata = sources_metadata(source_ids);
        for attempt in 0..CONFLICT_RETRIES {
            let loaded = self
                .store
                .load(customer_id)
                .await
                .map_err(ExecuteError::Store)?;
            let (decisions, events) = decide_all(loaded.state(), commands)?;
            if events.is_empty() {
                return Ok(decisions);
            }
            match self.store.commit(loaded, events, metadata.clone()).await {
                Ok(()) => {
                    self.committed.notify_one();
                    return Ok(decisions);
                }
                Err(StoreError::Conflict) => {
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

    /// Claims up to `limit` due inbox rows (of one partition of the customers, if given),
    /// processes them and records each row's outcome, all in the claiming transaction:
    /// the histories of every customer in the batch are loaded by one query, and the
    /// events of the whole batch are written with the outcomes, in one commit. If that
    /// write loses a race with another writer of one of the customers, the batch is
    /// processed again one customer at a time (one load and commit each, with retries).
    /// Returns what each row gave; empty when nothing is due.
    pub async fn process_batch(
        &self,
        limit: i64,
        partition: Option<Partition>,
    ) -> Result<Vec<Processed>, ProcessError> {
        let mut tx = self.pool.begin().await?;
        let rows = inbox::claim(&mut tx, limit, partition).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }

        // Route every row; commands are grouped per customer, in the claimed order.
        let mut claimed: HashMap<String, InFlight> = HashMap::new();
        let mut results: Vec<RowResult> = Vec::new();
        let mut groups: Vec<(String, Vec<Item>)> = Vec::new();
        for row in rows {
            let inbox::Claimed {
                event_id,
                event_type,
                customer_id,
                payload,
                attempts,
                waited,
            } = row;
            // One span per webhook processed: logs inside it carry the event, and its
            // outcome is recorded once known.
            let span = tracing::info_span!(
                "webhook",
                event_id = %event_id,
                event_type = %event_type,
                customer_id = customer_id.unwrap_or_default(),
                attempt = attempts + 1,
                outcome = tracing::field::Empty,
            );
            claimed.insert(
                event_id.clone(),
                InFlight {
                    event_type,
                    waited,
                    span,
                },
            );
            let event = match parse_event(payload.as_bytes()) {
                Ok(event) => event,
                // Only parseable events are ever stored; say so rather than retry forever.
                Err(error) => {
                    let detail = format!("stored payload no longer parses: {error}");
                    results.push(RowResult::done(event_id, Outcome::Ignored, Some(detail)));
                    continue;
                }
            };
            match route(&event) {
                Route::Ignore { reason } => {
                    results.push(RowResult::done(event_id, Outcome::Ignored, Some(reason)))
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
        let started = Instant::now();
        // Aggregates to remember once (and only if) the batch's events are committed.
        let mut remember = Vec::new();
        let executed: Vec<(Result<Vec<Decision>, ExecuteError>, Duration)> =
            match self.execute_batch(&mut tx, &groups).await? {
                Some(written) => {
                    let took = started.elapsed();
                    remember = written.aggregates;
                    written
                        .results
                        .into_iter()
                        .map(|result| (result, took))
                        .collect()
                }
                None => {
                    let mut all = Vec::with_capacity(groups.len());
                    for (customer_id, items) in &groups {
                        let (commands, ids) = commands_of(items);
                        let started = Instant::now();
                        let result = self.execute_many(customer_id, &commands, &ids).await;
                        all.push((result, started.elapsed()));
                    }
                    all
                }
            };
        for ((customer_id, items), (executed, took)) in groups.into_iter().zip(executed) {
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
                            Outcome::from(&decision.outcome),
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
                Err(chain) => {
                    let inbox::Failed { attempts, dead } =
                        inbox::mark_failed(&mut tx, &event_id, &chain, self.max_attempts).await?;
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
            }
        }
        // Every row that did not fail was processed to its outcome.
        inbox::mark_done(
            &mut tx,
            processed.iter().filter(|p| p.outcome != Outcome::Failed),
        )
        .await?;
        tx.commit().await?;
        self.cache.remember(remember);
        if !processed.is_empty() {
            self.committed.notify_one();
        }
        Ok(processed)
    }

    /// Decides every group against its customer's history and writes all their events,
    /// inside `tx` (the claiming transaction) under a savepoint. `None` when that could
    /// not be done (another writer committed to one of the customers first, or the log
    /// could not be read): the savepoint is rolled back and nothing was written.
    async fn execute_batch(
        &self,
        tx: &mut PgConnection,
        groups: &[(String, Vec<Item>)],
    ) -> Result<Option<Written>, sqlx::Error> {
        if groups.is_empty() {
            return Ok(Some(Written::default()));
        }
        sqlx::query("SAVEPOINT batch").execute(&mut *tx).await?;
        match decide_and_write(tx, groups, &self.cache).await {
            Ok(written) => {
                sqlx::query("RELEASE SAVEPOINT batch")
                    .execute(&mut *tx)
                    .await?;
                Ok(Some(written))
            }
            Err(error) => {
                sqlx::query("ROLLBACK TO SAVEPOINT batch")
                    .execute(&mut *tx)
                    .await?;
                if matches!(error, StoreError::Conflict) {
                    self.conflicts_retried.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        "a batch lost a race with another writer; one customer at a time"
                    );
                } else {
                    tracing::warn!(error = %error_chain(&error), "cannot write a batch; one customer at a time");
                }
                Ok(None)
            }
        }
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
            let batch = self.process_batch(BATCH, None).await?;
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

/// A group's commands, and the ids of the inbox rows they came from.
fn commands_of(items: &[Item]) -> (Vec<SubscriptionCommand>, Vec<&str>) {
    items
        .iter()
        .map(|(id, command, _)| (command.clone(), id.as_str()))
        .unzip()
}

/// The metadata every committed event carries: which Stripe events (or API reads) it
/// came from.
fn sources_metadata(source_ids: &[&str]) -> Metadata {
    HashMap::from([("sources".to_owned(), source_ids.join(","))])
}

/// Decides `commands` in order against `state`, each seeing the events of those before.
/// Returns every decision and all their events.
fn decide_all(
    state: &Subscription,
    commands: &[SubscriptionCommand],
) -> Result<(Vec<Decision>, Vec<SubscriptionEvent>), SubscriptionError> {
    let mut state = state.clone();
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
    Ok((decisions, events))
}

/// What a batch decided and wrote: each group's decisions (or error), and each
/// customer's aggregate after the batch with its version, to remember once committed.
#[derive(Default)]
struct Written {
    results: Vec<Result<Vec<Decision>, ExecuteError>>,
    aggregates: Vec<(String, i64, Subscription)>,
}

/// Loads the history of every customer in `groups` with one query (only the events after
/// the version the cache holds, if it holds the customer), decides each group against
/// its customer's state, and appends all the new events with one statement
/// (`event_store::batch`). The primary key refuses an event whose sequence another writer
/// took first: that is the optimistic-concurrency check ([`StoreError::Conflict`]).
async fn decide_and_write(
    tx: &mut PgConnection,
    groups: &[(String, Vec<Item>)],
    cache: &AggregateCache,
) -> Result<Written, StoreError> {
    let ids: Vec<String> = groups.iter().map(|(id, _)| id.clone()).collect();
    let mut loaded = batch::load_many(tx, &ids, cache.get(&ids)).await?;

    let mut written = Written::default();
    let mut new = NewEvents::default();
    for (customer_id, items) in groups {
        let (version, mut state) = loaded.remove(customer_id).unwrap_or_default();
        let (commands, sources) = commands_of(items);
        match decide_all(&state, &commands) {
            Ok((decisions, events)) => {
                // The remembered aggregate is folded from the JSON the log will hold,
                // exactly as a load from the log would fold it.
                for event in new.push(customer_id, version, &events, &sources_metadata(&sources))? {
                    state.apply(event);
                }
                let version = version + events.len() as i64;
                written
                    .aggregates
                    .push((customer_id.clone(), version, state));
                written.results.push(Ok(decisions));
            }
            Err(error) => {
                written
                    .aggregates
                    .push((customer_id.clone(), version, state));
                written.results.push(Err(ExecuteError::Domain(error)));
            }
        }
    }
    batch::append(tx, new).await?;
    Ok(written)
}

/// Customers' aggregates as of a version the log holds: each is the fold of exactly the
/// stored events 1..=version (decoded from the JSON the log holds), and is remembered
/// only after those events were committed. Events are never changed or removed, so
/// folding the events after `version` onto it gives the state a load of the whole
/// history gives, whoever wrote them (another worker, replica or the event store).
/// Bounded: past `capacity` customers, the least recently used half is forgotten.
pub struct AggregateCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    clock: u64,
    entries: HashMap<String, (i64, Subscription, u64)>,
}

impl AggregateCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The remembered (version, aggregate) of each of `ids` that is held.
    pub fn get(&self, ids: &[String]) -> HashMap<String, (i64, Subscription)> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        ids.iter()
            .filter_map(|id| {
                let (version, state, used) = inner.entries.get_mut(id)?;
                *used = now;
                Some((id.clone(), (*version, state.clone())))
            })
            .collect()
    }

    /// Remembers aggregates whose events up to their version are committed.
    fn remember(&self, aggregates: Vec<(String, i64, Subscription)>) {
        if self.capacity == 0 || aggregates.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        for (id, version, state) in aggregates {
            match inner.entries.get_mut(&id) {
                Some(held) if held.0 > version => held.2 = now,
                Some(held) => *held = (version, state, now),
                None => {
                    inner.entries.insert(id, (version, state, now));
                }
            }
        }
        if inner.entries.len() > self.capacity {
            let mut used: Vec<u64> = inner.entries.values().map(|e| e.2).collect();
            let keep = self.capacity / 2;
            let (_, cutoff, _) = used.select_nth_unstable_by(keep, |a, b| b.cmp(a));
            let cutoff = *cutoff;
            inner.entries.retain(|_, entry| entry.2 > cutoff);
        }
    }

    /// How many customers are remembered.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every remembered (customer, version, aggregate), for checking it against the log.
    pub fn entries(&self) -> Vec<(String, i64, Subscription)> {
        self.lock()
            .entries
            .iter()
            .map(|(id, (version, state, _))| (id.clone(), *version, state.clone()))
            .collect()
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

/// A claimed inbox row's command, with the status Stripe says it moved from.
type Item = (String, SubscriptionCommand, Option<SubscriptionStatus>);

/// What processing needs to know about a claimed row besides its command.
struct InFlight {
    event_type: String,
    /// From receipt to claim.
    waited: Duration,
    span: tracing::Span,
}

/// One row's result: its outcome and detail, or the error chain of a failure.
struct RowResult {
    event_id: String,
    outcome: Result<(Outcome, Option<String>), String>,
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
}
