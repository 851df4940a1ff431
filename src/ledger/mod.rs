//! Runs commands through the `Subscription` aggregate and writes what it decides to the
//! event log, through `event_store` (the only code that touches the `events` table).
//!
//! Two ways in:
//! - [`Ledger::execute`] / [`Ledger::execute_many`]: one customer, on its own: load its
//!   aggregate, call the pure `decide`, commit with optimistic concurrency, and retry when
//!   another worker or replica committed first (syncs, checkout, and a worker batch that
//!   lost a race).
//! - [`Ledger::execute_batch`]: a worker batch, inside the transaction that claimed it:
//!   the histories of all its customers in one query (after the versions
//!   [`AggregateCache`] holds), every group decided, all their events in one insert,
//!   under a savepoint so that a lost race leaves the claim intact.
//!
//! Nothing reaches the log that its readers could not store: [`check_storable`] refuses a
//! command holding text Postgres cannot hold (a NUL character) or longer than any value
//! Stripe sends, because the log's `json` column takes such text and the projections'
//! tables would then refuse it forever, stalling every customer behind it.
//!
//! This module never touches the inbox, never acknowledges anything and never judges a
//! fact itself (the aggregate does).

mod aggregate_cache;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aggregates::{
    decide, Decision, Subscription, SubscriptionCommand, SubscriptionError, SubscriptionEvent,
};
use event_store::batch::{self, NewEvents};
use event_store::recent::RecentEvents;
use event_store::{EventStore, Metadata, StoreError};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;

pub use aggregate_cache::AggregateCache;

use crate::backoff::Backoff;
use crate::db_error::{self, Refusal, Refused};
use crate::error_chain::error_chain;

/// How many times a command is retried after losing an optimistic-concurrency race.
const CONFLICT_RETRIES: usize = 20;

/// The longest text a command may carry, in bytes. Stripe's ids are at most 255
/// characters (<https://stripe.com/docs/upgrades>) and its metadata values at most 500
/// (<https://docs.stripe.com/api/metadata>), which is at most 2000 bytes of UTF-8; longer
/// text is not Stripe's. The bound also keeps every key the projections index (org and
/// user ids, subscription ids) below the 2704-byte limit of a btree index row.
pub const MAX_TEXT_BYTES: usize = 2000;

/// The pause after losing a race, jittered below 1 ms, 3 ms, 5 ms … (one more step per
/// loss), so that many writers of one hot customer (workers, replicas) stop colliding in
/// lockstep instead of exhausting their retries together.
const CONFLICT_PAUSE: Backoff = Backoff::linear(Duration::from_millis(1), Duration::from_millis(2));

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error("the aggregate refused the command")]
    Domain(#[from] SubscriptionError),
    #[error("the event store failed")]
    Store(#[source] StoreError),
    #[error("still conflicting after {0} retries")]
    Conflict(usize),
    /// The command holds a value the log's readers could not store: it can never be
    /// executed, however often it is tried.
    #[error("unprocessable: {0}")]
    Unstorable(Refused),
}

impl ExecuteError {
    /// Why the command can never succeed, when that is the case: a value refused before
    /// the log ([`check_storable`]) or by Postgres itself. `None` for what may pass.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            ExecuteError::Unstorable(refused) => Some(refused.refusal),
            ExecuteError::Store(error) => error.database_error().and_then(db_error::refusal),
            ExecuteError::Domain(_) | ExecuteError::Conflict(_) => None,
        }
    }
}

/// Refuses a command holding text the log's readers could not store: a NUL character
/// (Postgres's text and `jsonb` refuse it, SQLSTATE 22021/22P05) or more than
/// [`MAX_TEXT_BYTES`]. Every string of the command is checked, field names included, so
/// a fact added later is covered without a change here. Times need no check: the
/// parser reads only those Postgres can hold. The detail names the field, never its value.
pub fn check_storable(command: &SubscriptionCommand) -> Result<(), Refused> {
    // Nearly every command passes: a serialisation that builds nothing (into a sink,
    // measuring each string as it goes) says so at a fraction of the cost of the tree
    // below, which only a command it doubts is walked to name the field.
    use serde::Serialize;
    let mut scan = TextScan::default();
    command
        .serialize(&mut serde_json::Serializer::with_formatter(
            std::io::sink(),
            &mut scan,
        ))
        .expect("a command always serializes");
    if !scan.nul && scan.longest <= MAX_TEXT_BYTES {
        return Ok(());
    }
    let value = serde_json::to_value(command).expect("a command always serializes");
    let mut path = String::new();
    check_value(&value, &mut path)
}

fn check_value(value: &serde_json::Value, path: &mut String) -> Result<(), Refused> {
    use serde_json::Value;
    match value {
        Value::String(text) => check_text(text, path),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                check_value(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(fields) => {
            for (name, item) in fields {
                check_text(name, path)?;
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(name);
                check_value(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// What [`check_storable`]'s quick pass measures of every string (values and field names)
/// a serialisation writes: the longest, in bytes of the text itself, and whether any holds
/// a NUL. An escape stands for one byte of text (every character JSON escapes is ASCII).
#[derive(Default)]
struct TextScan {
    current: usize,
    longest: usize,
    nul: bool,
}

impl serde_json::ser::Formatter for &mut TextScan {
    fn begin_string<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.current = 0;
        Ok(())
    }

    fn end_string<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.longest = self.longest.max(self.current);
        Ok(())
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        _: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        self.current += fragment.len();
        Ok(())
    }

    fn write_char_escape<W: ?Sized + std::io::Write>(
        &mut self,
        _: &mut W,
        escape: serde_json::ser::CharEscape,
    ) -> std::io::Result<()> {
        self.nul |= matches!(escape, serde_json::ser::CharEscape::AsciiControl(0));
        self.current += 1;
        Ok(())
    }
}

fn check_text(text: &str, path: &str) -> Result<(), Refused> {
    let place = if path.is_empty() { "the command" } else { path };
    if text.contains('\0') {
        return Err(Refused::new(
            Refusal::InvalidText,
            format!("{place} holds a NUL character"),
        ));
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(Refused::new(
            Refusal::TooLarge,
            format!(
                "{place} holds {} bytes of text (at most {MAX_TEXT_BYTES})",
                text.len()
            ),
        ));
    }
    Ok(())
}

/// Runs commands and writes their events.
#[derive(Clone)]
pub struct Ledger {
    store: EventStore,
    /// Woken whenever events are committed, so projections catch up at once.
    pub committed: Arc<Notify>,
    /// How many optimistic-concurrency conflicts this process lost and retried.
    pub conflicts_retried: Arc<AtomicU64>,
    /// Aggregates as of a version the log holds, so batches load only newer events.
    pub cache: Arc<AggregateCache>,
    /// The events batches committed, for this process's projections (give them to
    /// `Projections::taking_recent`).
    pub recent: RecentEvents,
}

/// One customer's share of a worker batch: its commands, in order, each with the id of
/// what it came from (the Stripe event id of its inbox row).
#[derive(Debug, Clone)]
pub struct Group {
    pub customer_id: String,
    pub commands: Vec<SubscriptionCommand>,
    pub sources: Vec<String>,
}

impl Group {
    pub fn new(customer_id: String) -> Self {
        Self {
            customer_id,
            commands: Vec::new(),
            sources: Vec::new(),
        }
    }

    pub fn source_ids(&self) -> Vec<&str> {
        self.sources.iter().map(String::as_str).collect()
    }
}

/// What [`Ledger::execute_batch`] decided and wrote in the caller's transaction.
#[derive(Default)]
pub struct BatchWritten {
    /// Each group's decisions, in the order given (or why its aggregate refused them).
    pub results: Vec<Result<Vec<Decision>, ExecuteError>>,
    /// Each customer's aggregate after the batch: hand it to [`Ledger::batch_committed`]
    /// once (and only if) the transaction commits.
    pub aggregates: BatchAggregates,
}

/// Customers' aggregates as a batch left them, with their versions (see
/// [`AggregateCache`]), and the events it wrote (for [`RecentEvents`]); not yet known to
/// be committed.
#[derive(Default)]
pub struct BatchAggregates {
    aggregates: Vec<(String, i64, Subscription)>,
    /// Each customer's new events, with the sequence of the first.
    events: Vec<(String, i64, Vec<SubscriptionEvent>)>,
}

/// A customer's aggregate as a command left it: what loading it from the log now gives.
#[derive(Debug, Clone)]
pub struct Decided {
    pub state: Subscription,
    /// The aggregate version: the sequence of its newest event (0: the log holds none).
    pub version: u64,
}

impl Ledger {
    pub fn new(pool: PgPool, cache_capacity: usize) -> Self {
        Self {
            store: EventStore::new(pool),
            committed: Arc::new(Notify::new()),
            conflicts_retried: Arc::new(AtomicU64::new(0)),
            cache: Arc::new(AggregateCache::new(cache_capacity)),
            recent: RecentEvents::default(),
        }
    }

    /// The Connect account the customer lives in, as its log says (`None`: the
    /// platform's own customer, or one we know nothing of). Every call made to Stripe about
    /// the customer is made for it (`Stripe-Account`); the log, not a projection, is asked,
    /// so that a call never goes to the wrong account because a read model lags.
    pub async fn account_of(&self, customer_id: &str) -> Result<Option<String>, ExecuteError> {
        let loaded = self
            .store
            .load(customer_id)
            .await
            .map_err(ExecuteError::Store)?;
        Ok(loaded.state().account.as_ref().map(|a| a.value.clone()))
    }

    /// Decides and commits one command, retrying optimistic-concurrency conflicts.
    /// Returns the decision and the customer's aggregate as it left it.
    pub async fn execute(
        &self,
        customer_id: &str,
        command: &SubscriptionCommand,
        source_id: &str,
    ) -> Result<(Decision, Decided), ExecuteError> {
        let (mut decisions, decided) = self
            .execute_many(customer_id, std::slice::from_ref(command), &[source_id])
            .await?;
        Ok((decisions.pop().expect("one decision per command"), decided))
    }

    /// Decides several commands for one customer in order, against one load of its
    /// aggregate, and commits all their events in one transaction. On an
    /// optimistic-concurrency conflict the whole group is reloaded and decided again, so
    /// each decision is always made against the state the log really holds. Returns the
    /// decisions and the customer's aggregate as they left it (also when they recorded
    /// nothing).
    pub async fn execute_many(
        &self,
        customer_id: &str,
        commands: &[SubscriptionCommand],
        source_ids: &[&str],
    ) -> Result<(Vec<Decision>, Decided), ExecuteError> {
        for command in commands {
            check_storable(command).map_err(ExecuteError::Unstorable)?;
        }
        let metadata = sources_metadata(source_ids);
        for attempt in 0..CONFLICT_RETRIES {
            let loaded = self
                .store
                .load(customer_id)
                .await
                .map_err(ExecuteError::Store)?;
            let (decisions, events, state) = decide_all(loaded.state(), commands)?;
            let decided = Decided {
                state,
                version: loaded.version() as u64 + events.len() as u64,
            };
            if events.is_empty() {
                return Ok((decisions, decided));
            }
            match self.store.commit(loaded, events, metadata.clone()).await {
                Ok(()) => {
                    self.committed.notify_one();
                    return Ok((decisions, decided));
                }
                Err(StoreError::Conflict) => {
                    // Someone else committed first: reload and decide again, after a
                    // short random pause.
                    self.conflicts_retried.fetch_add(1, Ordering::Relaxed);
                    let random = uuid::Uuid::new_v4().as_u128() as u64;
                    tokio::time::sleep(CONFLICT_PAUSE.jittered(attempt as u32, random)).await;
                }
                Err(error) => return Err(ExecuteError::Store(error)),
            }
        }
        Err(ExecuteError::Conflict(CONFLICT_RETRIES))
    }

    /// Decides every group against its customer's history and writes all their events,
    /// inside `tx` (the caller's transaction, which claimed the batch) under a savepoint:
    /// one query loads the histories (after the versions the cache holds), one insert
    /// writes the events. `None` when that could not be done (another writer committed to
    /// one of the customers first, or the log could not be read): the savepoint is rolled
    /// back, nothing was written, and the caller goes one customer at a time through
    /// [`Ledger::execute_many`]. The caller has put every command through
    /// [`check_storable`] (the inbox workers do, row by row, as they route).
    pub async fn execute_batch(
        &self,
        tx: &mut PgConnection,
        groups: &[Group],
    ) -> Result<Option<BatchWritten>, sqlx::Error> {
        if groups.is_empty() {
            return Ok(Some(BatchWritten::default()));
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

    /// The transaction a batch was written in has committed: remembers the aggregates it
    /// decided, hands the events it wrote to this process's projections ([`RecentEvents`])
    /// and wakes them.
    pub fn batch_committed(&self, written: BatchAggregates) {
        self.cache.remember(written.aggregates);
        for (customer_id, first, events) in written.events {
            self.recent.put(&customer_id, first, events);
        }
        self.committed.notify_one();
    }
}

/// The metadata every committed event carries: which Stripe events (or API reads) it
/// came from.
fn sources_metadata(source_ids: &[&str]) -> Metadata {
    HashMap::from([("sources".to_owned(), source_ids.join(","))])
}

/// Decides `commands` in order against `state`, each seeing the events of those before.
/// Returns every decision, all their events and the state after them.
fn decide_all(
    state: &Subscription,
    commands: &[SubscriptionCommand],
) -> Result<(Vec<Decision>, Vec<SubscriptionEvent>, Subscription), SubscriptionError> {
    let mut state = state.clone();
    let mut decisions = Vec::with_capacity(commands.len());
    let mut events = Vec::new();
    for command in commands {
        let decision = decide(&state, command)?;
        for event in &decision.events {
            state.apply_event(event);
        }
        events.extend(decision.events.iter().cloned());
        decisions.push(decision);
    }
    Ok((decisions, events, state))
}

/// As [`decide_all`], without the state after them: a lone command (most groups of a
/// batch) is decided against `state` itself, with no copy of the customer's aggregate.
fn decide_group(
    state: &Subscription,
    commands: &[SubscriptionCommand],
) -> Result<(Vec<Decision>, Vec<SubscriptionEvent>), SubscriptionError> {
    match commands {
        [command] => {
            let decision = decide(state, command)?;
            let events = decision.events.clone();
            Ok((vec![decision], events))
        }
        _ => decide_all(state, commands).map(|(decisions, events, _)| (decisions, events)),
    }
}

/// Loads the history of every customer in `groups` with one query (only the events after
/// the version the cache holds, if it holds the customer), decides each group against
/// its customer's state, and appends all the new events with one statement
/// (`event_store::batch`). The primary key refuses an event whose sequence another writer
/// took first: that is the optimistic-concurrency check ([`StoreError::Conflict`]).
async fn decide_and_write(
    tx: &mut PgConnection,
    groups: &[Group],
    cache: &AggregateCache,
) -> Result<BatchWritten, StoreError> {
    let ids: Vec<String> = groups.iter().map(|g| g.customer_id.clone()).collect();
    let mut loaded = batch::load_many(tx, &ids, cache.take(&ids)).await?;

    let mut written = BatchWritten::default();
    let mut new = NewEvents::default();
    for group in groups {
        let customer_id = &group.customer_id;
        let (version, mut state) = loaded.remove(customer_id).unwrap_or_default();
        match decide_group(&state, &group.commands) {
            Ok((decisions, events)) => {
                let metadata = sources_metadata(&group.source_ids());
                // The remembered aggregate folds what the log will hold (`NewEvents::push`).
                new.push(customer_id, version, &events, &metadata)?;
                for event in &events {
                    state.apply_event(event);
                }
                let first = version + 1;
                let version = version + events.len() as i64;
                written
                    .aggregates
                    .aggregates
                    .push((customer_id.clone(), version, state));
                if !events.is_empty() {
                    written
                        .aggregates
                        .events
                        .push((customer_id.clone(), first, events));
                }
                written.results.push(Ok(decisions));
            }
            Err(error) => {
                written
                    .aggregates
                    .aggregates
                    .push((customer_id.clone(), version, state));
                written.results.push(Err(ExecuteError::Domain(error)));
            }
        }
    }
    batch::append(tx, new).await?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::{parse_event, route, Route};

    fn command(object: serde_json::Value) -> SubscriptionCommand {
        let body = serde_json::json!({"id": "evt_1", "object": "event", "type": "customer.subscription.updated",
            "created": 1_700_000_000, "data": {"object": object}});
        match route(&parse_event(body.to_string().as_bytes()).unwrap()) {
            Route::Command { command, .. } => command,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn commands_holding_text_postgres_refuses_are_named_by_field_not_value() {
        let fine = command(
            serde_json::json!({"id": "sub_1", "customer": "cus_1", "status": "active",
            "metadata": {"org_id": "org_é"}}),
        );
        assert_eq!(check_storable(&fine), Ok(()));

        let nul = command(
            serde_json::json!({"id": "sub_1", "customer": "cus_1", "status": "active",
            "metadata": {"org_id": "org\u{0}secret"}}),
        );
        let refused = check_storable(&nul).unwrap_err();
        assert_eq!(refused.refusal, Refusal::InvalidText);
        assert!(refused.detail.contains("owner.org_id"), "{refused}");
        assert!(!refused.detail.contains("secret"), "{refused}");

        let long = command(
            serde_json::json!({"id": "s".repeat(MAX_TEXT_BYTES + 1), "customer": "cus_1",
            "status": "active"}),
        );
        let refused = check_storable(&long).unwrap_err();
        assert_eq!(refused.refusal, Refusal::TooLarge);
        assert!(
            refused
                .detail
                .ends_with("fact.id holds 2001 bytes of text (at most 2000)"),
            "{refused}"
        );
    }

    /// The quick pass measures a string as its text, not as its JSON: an escaped
    /// character is one byte of text, a multibyte one its bytes. Measuring short lets a
    /// refused value through, so each kind is tried one byte over the limit.
    #[test]
    fn text_is_measured_in_its_own_bytes_whatever_json_makes_of_it() {
        let id = |text: String| {
            command(serde_json::json!({"id": text, "customer": "cus_1", "status": "active"}))
        };
        for unit in ["\n", "\"", "\u{1}", "é"] {
            let at_limit = unit.repeat(MAX_TEXT_BYTES / unit.len());
            assert_eq!(check_storable(&id(at_limit.clone())), Ok(()), "{unit:?}");
            let over = check_storable(&id(format!("{at_limit}x"))).unwrap_err();
            assert_eq!(over.refusal, Refusal::TooLarge, "{unit:?}");
            assert!(over.detail.contains("holds 2001 bytes"), "{unit:?}: {over}");
        }
    }

    /// The pause it replaced: `random % (1 + 2 × attempt)` milliseconds.
    #[test]
    fn a_lost_race_pauses_below_one_more_step_each_time() {
        for attempt in 0..CONFLICT_RETRIES as u64 {
            for random in [0, 1, 2, 7, 12_345, u64::MAX - 3, u64::MAX] {
                assert_eq!(
                    CONFLICT_PAUSE.jittered(attempt as u32, random),
                    Duration::from_millis(random % (1 + 2 * attempt)),
                    "attempt {attempt}, random {random}"
                );
            }
        }
    }
}
