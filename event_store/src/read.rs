//! Reading the log: in its gap-free global order (projections), and the few lookups
//! operators need.
//!
//! `global_seq` alone is not safe to checkpoint on: two transactions can take sequence
//! numbers 7 and 8 and commit 8 first, and a reader that saw 8 would never see 7. So each
//! event also stores the id of the transaction that wrote it (`tx_id`), and a reader only
//! reads events whose transaction is older than every transaction still running
//! ([`read_horizon`], `pg_snapshot_xmin`): those will never be joined by an older one.
//! Events are read in (`tx_id`, `global_seq`) order. Rows are handed out raw (their
//! payload as JSON text), so a reader decodes only what it keeps. Nothing here writes.

use aggregates::Subscription;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use futures_util::{Stream, TryStreamExt};
use sqlx::postgres::PgRow;
use sqlx::{Connection, PgConnection, PgPool, Row};

use crate::{decode_payload, LoggedEvent, Position, StoreError};

/// Settings that make the rest of a transaction read `events` in log order through
/// `events_read_order`, whatever the planner's statistics say: no bitmap scan, no sort
/// (so a plan must take the index that already gives the order), no JIT and no parallel
/// workers (the cost the planner then estimates for a large log would compile every read
/// and start workers for it: 8 ms for a read of 1 ms). Without them, a log
/// whose statistics were taken while it was small, or never (autovacuum off or behind),
/// was read through the primary key on `aggregate_type` and sorted: every read cost the
/// whole log (4.8 s for the last 1 000 of 550 000 events, 2 ms in order), and the live
/// projection fell further behind as the log grew.
const IN_LOG_ORDER: &str = "set_config('enable_bitmapscan', 'off', true), \
    set_config('enable_sort', 'off', true), set_config('jit', 'off', true), \
    set_config('max_parallel_workers_per_gather', '0', true)";

/// The newest transaction id every reader may read up to now: all transactions below it
/// have finished. Take it before the reading transaction writes anything.
///
/// Inside a transaction it also applies [`IN_LOG_ORDER`] to the rest of it, so that
/// [`read_after`] walks the log in order and stops at its limit. Outside a transaction
/// those settings end with the statement.
pub async fn read_horizon(conn: &mut PgConnection) -> Result<u64, StoreError> {
    let horizon: String = sqlx::query(&format!(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon, {IN_LOG_ORDER}"
    ))
    .fetch_one(conn)
    .await?
    .get("horizon");
    horizon.parse().map_err(|_| StoreError::TxId(horizon))
}

/// A stored event as read, not yet decoded.
pub struct RawEvent(PgRow);

impl RawEvent {
    pub fn aggregate_id(&self) -> &str {
        self.0.get("aggregate_id")
    }

    pub fn sequence(&self) -> i64 {
        self.0.get("sequence")
    }

    /// `DomainEvent::event_type` of the event (for example `SubscriptionChanged`).
    pub fn event_type(&self) -> &str {
        self.0.get("event_type")
    }

    /// The payload as the JSON text stored.
    pub fn payload(&self) -> &str {
        self.0.get("payload")
    }

    pub fn position(&self) -> Result<Position, StoreError> {
        position_of(&self.0)
    }

    /// The event, decoded.
    pub fn decode(&self) -> Result<LoggedEvent, StoreError> {
        let aggregate_id = self.aggregate_id();
        let sequence = self.sequence();
        Ok(LoggedEvent {
            aggregate_id: aggregate_id.to_owned(),
            sequence: sequence as u64,
            position: self.position()?,
            event: decode_payload(self.payload(), aggregate_id, sequence)?,
        })
    }
}

/// [`read_after`]'s statement: $1, $2 the position after which to read (transaction id as
/// text, global sequence), $3 the horizon (as text), $4 the limit, $5 the aggregate type.
pub const READ_AFTER: &str =
    "SELECT aggregate_id, sequence, event_type, payload::text AS payload, \
        tx_id::text AS tx_text, global_seq \
     FROM events \
     WHERE aggregate_type = $5 \
       AND (tx_id, global_seq) > ($1::text::xid8, $2) \
       AND tx_id < $3::text::xid8 \
     ORDER BY events.tx_id, events.global_seq \
     LIMIT $4";

/// Up to `limit` events after `after` whose transaction is below `horizon`, in log
/// order, streamed.
pub fn read_after(
    conn: &mut PgConnection,
    after: Position,
    horizon: u64,
    limit: i64,
) -> impl Stream<Item = Result<RawEvent, StoreError>> + Send + '_ {
    sqlx::query(READ_AFTER)
        .bind(after.tx_id.to_string())
        .bind(after.global_seq)
        .bind(horizon.to_string())
        .bind(limit)
        .bind(Subscription::TYPE)
        .fetch(conn)
        .map_ok(RawEvent)
        .map_err(StoreError::from)
}

/// One event's keys, as the rebuild's scan reads them.
pub struct EventKey(PgRow);

impl EventKey {
    pub fn aggregate_id(&self) -> &str {
        self.0.get("aggregate_id")
    }

    pub fn sequence(&self) -> i64 {
        self.0.get("sequence")
    }

    /// The payload (JSON text), only for an event of the types the scan was asked about
    /// whose subscription id it could not read where serde writes it (see [`scan_keys`]).
    pub fn payload(&self) -> Option<&str> {
        self.0.get("payload")
    }

    /// The subscription id of an event of the types the scan was asked about, read from
    /// the payload in Postgres where serde writes it (see [`scan_keys`]); `None` for
    /// other events and where it could not be read so ([`EventKey::payload`] then holds
    /// the payload).
    pub fn subscription_id(&self) -> Option<&str> {
        self.0.get("subscription_id")
    }

    pub fn position(&self) -> Result<Position, StoreError> {
        position_of(&self.0)
    }
}

/// The keys of every event whose transaction is below `horizon`, in no particular order
/// (a plain scan, no sort of the whole log), with, for the events whose type is in
/// `snapshots` (each holding a `subscription` object and, after it, a `view`), the id of
/// that subscription: a rebuild chooses what to read from the keys alone.
///
/// The id is the row's `snapshot_of`, which the batch appender writes
/// ([`crate::batch::append`]): read from a column, no payload is decompressed. Where that
/// is NULL (rows written before the column existed, or by postgres-es's own insert), it is
/// read in Postgres from the payload's text where serde writes it: the first
/// `"subscription":{"id":"` before the first `"view":` (every payload subledger writes is
/// serde_json's compact text, with the fields in their declared order, `id` first in a
/// snapshot). Neither can match inside a string value (its quotes would be escaped). A
/// payload where that is not found (another writer's spacing or key order), or where the
/// id holds an escape, is sent whole instead, for the caller to decode: sending every
/// snapshot's payload (about 3 KB each) and decoding it on the client was most of the
/// scan's cost.
pub fn scan_keys<'c>(
    conn: &'c mut PgConnection,
    horizon: u64,
    snapshots: &[&str],
) -> impl Stream<Item = Result<EventKey, StoreError>> + Send + 'c {
    let snapshots: Vec<String> = snapshots.iter().map(|t| (*t).to_owned()).collect();
    // `OFFSET 0` keeps the inner query apart, so that each payload is decompressed once
    // for its id (and again only when it is sent whole).
    sqlx::query(
        "SELECT aggregate_id, sequence, tx_text, global_seq, \
            CASE WHEN read_id THEN subscription_id END AS subscription_id, \
            CASE WHEN NOT read_id THEN payload::text END AS payload \
         FROM (SELECT *, subscription_id <> '' AND strpos(subscription_id, '\\') = 0 AS read_id \
         FROM (SELECT aggregate_id, sequence, tx_id::text AS tx_text, global_seq, payload, \
                 CASE WHEN event_type = ANY($2) THEN coalesce(snapshot_of, split_part(split_part(split_part( \
                     payload::text, '\"view\":', 1), '\"subscription\":{\"id\":\"', 2), '\"', 1)) \
                 END AS subscription_id \
               FROM events \
               WHERE aggregate_type = $3 AND tx_id < $1::text::xid8 OFFSET 0) AS scanned) AS keys",
    )
    .bind(horizon.to_string())
    .bind(snapshots)
    .bind(Subscription::TYPE)
    .fetch(conn)
    .map_ok(EventKey)
    .map_err(StoreError::from)
}

/// The events with these `global_seq`s, in no particular order (sorting is left to the
/// caller, so the server never spills their payloads to disk for it).
pub async fn read_by_global_seq(
    conn: &mut PgConnection,
    global_seqs: &[i64],
) -> Result<Vec<RawEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT aggregate_id, sequence, event_type, payload::text AS payload, tx_id::text AS tx_text, global_seq \
         FROM events WHERE global_seq = ANY($1)",
    )
    .bind(global_seqs)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(RawEvent).collect())
}

/// How many events the log holds after `after` (for progress and lag). Counted in log
/// order ([`IN_LOG_ORDER`], in a transaction of its own), so that a projection standing
/// near the end of a large log costs a short walk of `events_read_order` whatever the
/// planner's statistics say (`/metrics` and `/readyz` ask it).
pub async fn count_after(conn: &mut PgConnection, after: Position) -> Result<i64, StoreError> {
    let mut tx = conn.begin().await?;
    sqlx::query(&format!("SELECT {IN_LOG_ORDER}"))
        .execute(&mut *tx)
        .await?;
    let count = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events WHERE aggregate_type = $3 \
            AND (tx_id, global_seq) > ($1::text::xid8, $2) ORDER BY tx_id, global_seq) AS after",
    )
    .bind(after.tx_id.to_string())
    .bind(after.global_seq)
    .bind(Subscription::TYPE)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(count)
}

/// Where the event that brought `aggregate_id` to `version` stands in the log; `None`
/// when the log holds no such event.
pub async fn position_of_version(
    conn: &mut PgConnection,
    aggregate_id: &str,
    version: u64,
) -> Result<Option<Position>, StoreError> {
    let row = sqlx::query(
        "SELECT tx_id::text AS tx_text, global_seq FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
    )
    .bind(Subscription::TYPE)
    .bind(aggregate_id)
    .bind(version as i64)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(position_of).transpose()
}

/// Which of `ids` the log holds any event of: one probe of the primary key for each (for
/// a replay, which keeps only what the log names).
pub async fn logged_among(
    conn: &mut PgConnection,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let logged = sqlx::query_scalar(
        "SELECT i.id FROM unnest($2::text[]) AS i(id) \
         WHERE (SELECT e.sequence FROM events e \
                WHERE e.aggregate_type = $1 AND e.aggregate_id = i.id LIMIT 1) IS NOT NULL",
    )
    .bind(Subscription::TYPE)
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(logged)
}

/// One event of an aggregate's history, with when it was stored.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub event: LoggedEvent,
    pub recorded_at: DateTime<Utc>,
}

/// One aggregate's whole history, in sequence order, decoded.
pub async fn history(pool: &PgPool, aggregate_id: &str) -> Result<Vec<Recorded>, StoreError> {
    let rows = sqlx::query(
        "SELECT aggregate_id, sequence, event_type, payload::text AS payload, tx_id::text AS tx_text, \
            global_seq, recorded_at \
         FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(Subscription::TYPE)
    .bind(aggregate_id)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            let recorded_at = row.get("recorded_at");
            Ok(Recorded {
                event: RawEvent(row).decode()?,
                recorded_at,
            })
        })
        .collect()
}

/// Every aggregate id the log holds, sorted. (Only Postgres can fail here.)
pub async fn aggregate_ids(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = $1 ORDER BY aggregate_id",
    )
    .bind(Subscription::TYPE)
    .fetch_all(pool)
    .await
}

/// Whether the log holds any event of `aggregate_id`. (Only Postgres can fail here.)
pub async fn aggregate_exists(pool: &PgPool, aggregate_id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2)",
    )
    .bind(Subscription::TYPE)
    .bind(aggregate_id)
    .fetch_one(pool)
    .await
}

fn position_of(row: &PgRow) -> Result<Position, StoreError> {
    let tx_id: &str = row.get("tx_text");
    Ok(Position {
        tx_id: tx_id
            .parse()
            .map_err(|_| StoreError::TxId(tx_id.to_owned()))?,
        global_seq: row.get("global_seq"),
    })
}
