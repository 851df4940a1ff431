//! The dead-letter queue: rows whose processing failed `SUBLEDGER_MAX_ATTEMPTS` times in
//! a row (an error, not a rejected move), kept with their last error until an operator
//! re-drives them. One list serves `subledger dlq list`, `GET /ops/dead-letters` and the
//! admin page.
//!
//! Re-driving puts a row back to pending with a fresh attempt budget; the inbox workers
//! (of any replica) then process it as if it had just arrived, and the aggregate answers
//! what was already recorded as a duplicate. This module must never delete a row or mark
//! one done: only processing decides an outcome.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::read::{select_entries, InboxEntry};
use super::InboxState;

/// The dead-letter list, in the order of the partial index `inbox_dead`. Its state is a
/// literal, which (unlike a parameter) matches that index's predicate in every plan
/// Postgres may cache; a test checks it names [`InboxState::Dead`].
pub const DEAD_LETTERS: &str =
    select_entries!("WHERE state = 'dead' ORDER BY received_at, event_id LIMIT $1");

/// Dead-lettered rows, oldest first (at most `limit`, if given).
pub async fn dead_letters(
    pool: &PgPool,
    limit: Option<i64>,
) -> Result<Vec<InboxEntry>, sqlx::Error> {
    sqlx::query_as(DEAD_LETTERS)
        .bind(limit.map(|l| l.max(0)))
        .fetch_all(pool)
        .await
}

/// A dead letter as `GET /ops/dead-letters` and `subledger dlq list --json` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    pub event_id: String,
    pub event_type: String,
    pub customer_id: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub received_at: DateTime<Utc>,
}

impl From<InboxEntry> for DeadLetter {
    fn from(entry: InboxEntry) -> Self {
        Self {
            event_id: entry.event_id,
            event_type: entry.event_type,
            customer_id: entry.customer_id,
            attempts: entry.attempts,
            last_error: entry.last_error,
            received_at: entry.received_at,
        }
    }
}

/// Which dead letters to re-drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    One(String),
    All,
}

/// Puts dead letters back in the inbox, due now, with a fresh attempt budget. Returns the
/// event ids re-queued (empty when the id names no dead letter: a pending row is already
/// queued and a done one was judged). The last error stays on the row until processing
/// succeeds, so it is not lost if the retry fails again.
pub async fn redrive(pool: &PgPool, which: &Redrive) -> Result<Vec<String>, sqlx::Error> {
    let only = match which {
        Redrive::One(event_id) => Some(event_id.as_str()),
        Redrive::All => None,
    };
    sqlx::query_scalar(
        "UPDATE inbox SET state = $2, attempts = 0, outcome = NULL, next_attempt_at = now() \
         WHERE state = $3 AND ($1::text IS NULL OR event_id = $1) RETURNING event_id",
    )
    .bind(only)
    .bind(InboxState::Pending)
    .bind(InboxState::Dead)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_reads_dead_rows_by_literal() {
        let filter = format!("WHERE state = '{}' ", InboxState::Dead.as_str());
        assert!(DEAD_LETTERS.contains(&filter), "{DEAD_LETTERS}");
    }
}
