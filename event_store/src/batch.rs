//! Many aggregates at once, inside the caller's transaction: the inbox workers' path.
//!
//! [`load_many`] reads the histories of every aggregate of a batch with one query (only
//! the events after a version the caller already holds folded), and [`append`] writes
//! all the batch's new events with one multi-row insert. The rows are exactly those
//! postgres-es writes (same columns, sequence = the aggregate's version after the event,
//! `event_type`/`event_version` from `DomainEvent`, the payload and metadata as JSON), so
//! postgres-es loads them as its own (`tests/postgres_es_reads_batches.rs` proves it).
//! Rows are inserted in (aggregate, sequence) order so that concurrent batches lock keys
//! in the same order and never deadlock each other. Nothing here commits: the caller's
//! transaction decides whether the batch is kept.

use std::collections::HashMap;

use aggregates::{Subscription, SubscriptionEvent};
use cqrs_es::{Aggregate, DomainEvent};
use sqlx::{PgConnection, Row};

use crate::arguments::{fixed_array, optional_strings, presized, strings, text};
use crate::{decode_payload, Metadata, StoreError};

/// The histories of many aggregates after given versions. Each aggregate's events are
/// read by their own walk of the primary key (a `LATERAL` subquery, which its `ORDER BY`
/// keeps from being flattened into a join), whatever the planner believes of the table.
/// As a plain join, the generic plan a connection keeps, made while the log was nearly
/// empty and never analyzed, walked every event of the aggregate type (the whole key for
/// a merge join; a bitmap of `aggregate_type` under a hash join where bitmap scans are
/// on), and kept doing so as the log grew. In the benchmark's ingestion (26 000 events):
/// 0.74 → 0.41 ms a worker batch; 7–8 ms a batch in a transaction with bitmap scans on.
/// The walk starts at the version already held (its event is returned without its
/// payload), so that a version the log no longer holds is noticed: see [`load_many`].
pub const LOAD_MANY: &str = "SELECT k.aggregate_id, e.sequence, \
        CASE WHEN e.sequence > k.after THEN e.payload::text END AS payload \
     FROM unnest($2::text[], $3::int8[]) AS k(aggregate_id, after) \
     CROSS JOIN LATERAL (SELECT sequence, payload FROM events \
        WHERE aggregate_type = $1 AND aggregate_id = k.aggregate_id AND sequence >= k.after \
        ORDER BY sequence) e \
     ORDER BY k.aggregate_id, e.sequence";

/// Folds, for each of `ids`, the events stored after the version `known` holds for it
/// (after 0 when it holds nothing), with one query. `known` maps an aggregate id to a
/// (version, state) that is the fold of exactly its events 1..=version. Returns `known`
/// brought up to the newest stored version; an aggregate with no events and no entry in
/// `known` is absent. Events are decoded from the JSON the log holds, as a load by
/// postgres-es decodes them. [`StoreError::Behind`] when the log no longer holds a
/// version `known` holds: it lost its newest events under this process (a database
/// restored to an earlier point, or a failover to a replica that had not received
/// them), and writing after that version would leave a gap in the log.
pub async fn load_many(
    conn: &mut PgConnection,
    ids: &[String],
    mut known: HashMap<String, (i64, Subscription)>,
) -> Result<HashMap<String, (i64, Subscription)>, StoreError> {
    let after: Vec<i64> = ids
        .iter()
        .map(|id| known.get(id).map_or(0, |(version, _)| *version))
        .collect();
    let rows = sqlx::query(LOAD_MANY)
        .bind(Subscription::TYPE)
        .bind(ids)
        .bind(&after)
        .fetch_all(&mut *conn)
        .await?;
    let mut held: HashMap<&str, i64> = ids
        .iter()
        .zip(&after)
        .filter(|(_, after)| **after > 0)
        .map(|(id, after)| (id.as_str(), *after))
        .collect();
    for row in rows {
        let aggregate_id: String = row.get("aggregate_id");
        let sequence: i64 = row.get("sequence");
        let Some(payload) = row.get::<Option<&str>, _>("payload") else {
            // The version held, still in the log.
            held.remove(aggregate_id.as_str());
            continue;
        };
        if let Some(after) = held.get(aggregate_id.as_str()) {
            return Err(StoreError::Behind(aggregate_id, *after));
        }
        let (version, state) = known.entry(aggregate_id.clone()).or_default();
        if sequence != *version + 1 {
            return Err(StoreError::Gap(aggregate_id, sequence));
        }
        state.apply(decode_payload(payload, &aggregate_id, sequence)?);
        *version = sequence;
    }
    match held.into_iter().next() {
        Some((aggregate_id, after)) => Err(StoreError::Behind(aggregate_id.to_owned(), after)),
        None => Ok(known),
    }
}

/// The events of a batch, column by column, ready for [`append`].
#[derive(Default)]
pub struct NewEvents {
    aggregate_id: Vec<String>,
    sequence: Vec<i64>,
    event_type: Vec<String>,
    event_version: Vec<String>,
    payload: Vec<String>,
    metadata: Vec<String>,
    /// The subscription each snapshot event carries (`events.snapshot_of`).
    snapshot_of: Vec<Option<String>>,
}

impl NewEvents {
    /// Adds `events` of `aggregate_id`, decided against its state at `version`: they get
    /// the sequences after it, each carrying `metadata`. A caller folding the events it
    /// pushed holds what a later load of the log folds: an event's JSON decodes to the
    /// event itself (checked here in debug builds, so every test that writes a batch
    /// checks it; `serde_json` writes and reads back every value these events hold).
    pub fn push(
        &mut self,
        aggregate_id: &str,
        version: i64,
        events: &[SubscriptionEvent],
        metadata: &Metadata,
    ) -> Result<(), StoreError> {
        let metadata = serde_json::to_string(metadata).expect("a map of strings always serializes");
        let mut sequence = version;
        for event in events {
            sequence += 1;
            let payload = serde_json::to_string(event).map_err(|source| StoreError::Json {
                aggregate_id: aggregate_id.to_owned(),
                sequence,
                source,
            })?;
            #[cfg(debug_assertions)]
            {
                let logged: SubscriptionEvent = decode_payload(&payload, aggregate_id, sequence)?;
                assert_eq!(
                    &logged, event,
                    "an event must read back from its JSON as itself"
                );
            }
            self.aggregate_id.push(aggregate_id.to_owned());
            self.sequence.push(sequence);
            self.event_type.push(event.event_type());
            self.event_version.push(event.event_version());
            self.payload.push(payload);
            self.metadata.push(metadata.clone());
            self.snapshot_of
                .push(event.snapshot_of().map(str::to_owned));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.aggregate_id.is_empty()
    }

    /// Into (aggregate_id, sequence) order: the order concurrent writers lock keys in.
    fn sort(&mut self) {
        let mut order: Vec<usize> = (0..self.aggregate_id.len()).collect();
        order.sort_by(|&a, &b| {
            (&self.aggregate_id[a], self.sequence[a])
                .cmp(&(&self.aggregate_id[b], self.sequence[b]))
        });
        // Moves each value to its place (a payload is a few KiB: never copied).
        fn permute<T>(v: &mut Vec<T>, order: &[usize]) {
            let mut taken: Vec<Option<T>> = std::mem::take(v).into_iter().map(Some).collect();
            *v = order
                .iter()
                .map(|&i| taken[i].take().expect("an order names each index once"))
                .collect();
        }
        permute(&mut self.aggregate_id, &order);
        permute(&mut self.sequence, &order);
        permute(&mut self.event_type, &order);
        permute(&mut self.event_version, &order);
        permute(&mut self.payload, &order);
        permute(&mut self.metadata, &order);
        permute(&mut self.snapshot_of, &order);
    }
}

/// Inserts every event of `new` with one statement, in the caller's transaction, each
/// snapshot event with the subscription it carries in `snapshot_of` (what a rebuild's key
/// scan reads, [`crate::read::scan_keys`]).
/// [`StoreError::Conflict`] when another writer already holds one of their sequences
/// (the statement then wrote nothing, and the transaction must roll back to before it).
pub async fn append(conn: &mut PgConnection, mut new: NewEvents) -> Result<(), StoreError> {
    if new.is_empty() {
        return Ok(());
    }
    new.sort();
    let bytes = text(Subscription::TYPE)
        + strings(&new.aggregate_id)
        + fixed_array(new.sequence.len(), 8)
        + strings(&new.event_type)
        + strings(&new.event_version)
        + strings(&new.payload)
        + strings(&new.metadata)
        + optional_strings(&new.snapshot_of);
    sqlx::query_with(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
            snapshot_of) \
         SELECT $1, u.aggregate_id, u.sequence, u.event_type, u.event_version, u.payload::json, u.metadata::json, \
            u.snapshot_of \
         FROM unnest($2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[]) \
            AS u(aggregate_id, sequence, event_type, event_version, payload, metadata, snapshot_of)",
        presized(8, bytes),
    )
    .bind(Subscription::TYPE)
    .bind(&new.aggregate_id)
    .bind(&new.sequence)
    .bind(&new.event_type)
    .bind(&new.event_version)
    .bind(&new.payload)
    .bind(&new.metadata)
    .bind(&new.snapshot_of)
    .execute(conn)
    .await
    .map_err(StoreError::from_insert)?;
    Ok(())
}
