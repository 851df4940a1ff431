//! The dead-letter queue: inbox rows whose processing failed `SUBLEDGER_MAX_ATTEMPTS` times
//! in a row (an error, not a rejected move), kept with their last error until an operator
//! re-drives them.
//!
//! Re-driving puts a row back to `pending` with a fresh attempt budget; the inbox workers
//! (of any replica) then process it as if it had just arrived, and `decide` answers what
//! was already recorded as a duplicate. This module must never delete a row or mark one
//! done: only processing decides an outcome.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// One dead-lettered inbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub event_id: String,
    pub event_type: String,
    pub customer_id: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// Which dead letters to re-drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    One(String),
    All,
}

/// Every dead letter, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, event_type, customer_id, attempts, last_error, received_at \
         FROM inbox WHERE state = 'dead' ORDER BY received_at, event_id",
    )
    .fetch_all(pool)
    .await
}

/// Puts dead letters back in the inbox, due now, with a fresh attempt budget. Returns the
/// event ids re-queued (empty when the id names no dead letter). The last error stays on
/// the row until processing succeeds, so it is not lost if the retry fails again.
pub async fn retry(pool: &PgPool, which: &Redrive) -> Result<Vec<String>, sqlx::Error> {
    let only = match which {
        Redrive::One(event_id) => Some(event_id.as_str()),
        Redrive::All => None,
    };
    sqlx::query_scalar(
        "UPDATE inbox SET state = 'pending', attempts = 0, outcome = NULL, next_attempt_at = now() \
         WHERE state = 'dead' AND ($1::text IS NULL OR event_id = $1) RETURNING event_id",
    )
    .bind(only)
    .fetch_all(pool)
    .await
}
