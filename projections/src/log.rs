//! Reading the event log in a gap-free global order.
//!
//! `global_seq` alone is not safe to checkpoint on: two transactions can take sequence
//! numbers 7 and 8 and commit 8 first, and a reader that saw 8 would never see 7. So each
//! event also stores the id of the transaction that wrote it (`tx_id`), and a reader only
//! reads events whose transaction is older than every transaction still running
//! (`pg_snapshot_xmin`): those will never be joined by an older one. Events are read in
//! (`tx_id`, `global_seq`) order. This module only reads; it must never write the log.

use aggregates::SubscriptionEvent;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row};

/// A place in the log: the (`tx_id`, `global_seq`) of an event. `Position::default()` is
/// before the first event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub tx_id: u64,
    pub global_seq: i64,
}

/// One stored event with its place in the log.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub aggregate_id: String,
    /// The aggregate version after this event (cqrs-es sequence, from 1).
    pub sequence: u64,
    pub position: Position,
    pub event: SubscriptionEvent,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot read the event log")]
    Database(#[from] sqlx::Error),
    #[error("event {aggregate_id}#{sequence} in the log cannot be decoded")]
    Decode {
        aggregate_id: String,
        sequence: i64,
        #[source]
        source: serde_json::Error,
    },
    #[error("the log returned a malformed transaction id {0:?}")]
    TxId(String),
}

/// The newest transaction id every reader may read up to now: all transactions below it
/// have finished. Take it before the reading transaction writes anything.
pub async fn read_horizon(conn: &mut PgConnection) -> Result<u64, LogError> {
    let horizon: String =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
            .fetch_one(conn)
            .await?;
    horizon.parse().map_err(|_| LogError::TxId(horizon))
}

/// Up to `limit` events after `after` whose transaction is below `horizon`.
pub async fn read_after(
    conn: &mut PgConnection,
    after: Position,
    horizon: u64,
    limit: i64,
) -> Result<Vec<LoggedEvent>, LogError> {
    let rows = sqlx::query(
        "SELECT aggregate_id, sequence, payload::text AS payload, tx_id::text AS tx_text, global_seq \
         FROM events \
         WHERE aggregate_type = 'Subscription' \
           AND (tx_id, global_seq) > ($1::text::xid8, $2) \
           AND tx_id < $3::text::xid8 \
         ORDER BY events.tx_id, events.global_seq \
         LIMIT $4",
    )
    .bind(after.tx_id.to_string())
    .bind(after.global_seq)
    .bind(horizon.to_string())
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            let aggregate_id: String = row.get("aggregate_id");
            let sequence: i64 = row.get("sequence");
            let payload: &str = row.get("payload");
            let tx_id: String = row.get("tx_text");
            let event = serde_json::from_str(payload).map_err(|source| LogError::Decode {
                aggregate_id: aggregate_id.clone(),
                sequence,
                source,
            })?;
            Ok(LoggedEvent {
                aggregate_id,
                sequence: sequence as u64,
                position: Position {
                    tx_id: tx_id.parse().map_err(|_| LogError::TxId(tx_id.clone()))?,
                    global_seq: row.get("global_seq"),
                },
                event,
            })
        })
        .collect()
}

/// How many events the log holds after `after` (for progress and lag).
pub async fn count_after(conn: &mut PgConnection, after: Position) -> Result<i64, LogError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Subscription' AND (tx_id, global_seq) > ($1::text::xid8, $2)",
    )
    .bind(after.tx_id.to_string())
    .bind(after.global_seq)
    .fetch_one(conn)
    .await?)
}

/// Keeps, for each aggregate, only its newest event of `events`: every event carries the
/// whole view, so older ones in the same batch are superseded.
pub fn newest_per_aggregate(events: &[LoggedEvent]) -> Vec<&LoggedEvent> {
    let mut newest: std::collections::HashMap<&str, &LoggedEvent> =
        std::collections::HashMap::new();
    for event in events {
        let slot = newest.entry(event.aggregate_id.as_str()).or_insert(event);
        if event.sequence > slot.sequence {
            *slot = event;
        }
    }
    let mut out: Vec<_> = newest.into_values().collect();
    out.sort_by_key(|e| e.position);
    out
}
