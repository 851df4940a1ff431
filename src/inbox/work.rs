//! What the inbox workers do to rows, always inside the worker's own transaction: claim
//! the due rows of a partition, then mark each done with its outcome or failed.
//!
//! Claimed rows stay locked (`FOR UPDATE SKIP LOCKED`) until that transaction ends, so no
//! row is processed twice at once, by any replica. A crash before the commit leaves them
//! pending, to be processed again (the aggregate answers what was already recorded as a
//! duplicate). This module never decides an outcome: the caller says what processing made
//! of each row.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, Row};

use super::{InboxState, Outcome, ParsedEvents};
use crate::backoff::Backoff;
use crate::db_error::storable_text;
use crate::stripe::{Route, StripeEvent};

/// When a failed row is due again: 2 s after its first failed attempt, doubling, at most an
/// hour (2^attempts seconds, attempts counting this one).
pub const RETRY: Backoff =
    Backoff::doubling(Duration::from_secs(2)).capped(Duration::from_secs(3600));

/// Which customers a worker claims rows of: those whose id hashes to `index` of `of`. A
/// row whose customer is not known yet (a thin event) hashes as the empty id.
/// Workers of one process take disjoint partitions, so their batches never race for a
/// customer; workers of other replicas may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub index: usize,
    pub of: usize,
}

/// A claimed row.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub event_id: String,
    pub event_type: String,
    pub customer_id: Option<String>,
    /// The Stripe event the row holds.
    pub event: ClaimedEvent,
    /// Attempts made before this one.
    pub attempts: i32,
    /// From receipt to claim.
    pub waited: Duration,
}

/// What a claimed row holds: the event as this process parsed it at receipt (its payload
/// is then not read back from Postgres: it is exactly the bytes that were parsed), else
/// the raw payload. A pending row always has one (the table's `inbox_payload_kept`
/// constraint: only processed rows lose it, see `retention`); `Pruned` says so rather than
/// fail on a row that somehow has none.
#[derive(Debug, Clone)]
pub enum ClaimedEvent {
    /// With the route the receipt gave it (`stripe::route` of it).
    Parsed(Arc<StripeEvent>, Box<Route>),
    Raw(String),
    Pruned,
}

/// The claim. Its state is a literal, not a parameter, because only a literal matches the
/// predicate of the partial index `inbox_pending` (`WHERE state = 'pending'`) in every
/// plan Postgres may cache for the statement; a test checks it names
/// [`InboxState::Pending`]. It reads no payload (see [`ClaimedEvent`]).
const CLAIM: &str = "SELECT event_id, event_type, customer_id, payload IS NULL AS pruned, attempts, \
        extract(epoch FROM now() - received_at)::float8 AS waited FROM inbox \
     WHERE state = 'pending' AND next_attempt_at <= now() \
       AND ($2::int8 IS NULL OR abs(hashtext(coalesce(customer_id, ''))::int8) % $3::int8 = $2::int8) \
     ORDER BY next_attempt_at, stripe_created LIMIT $1 FOR UPDATE SKIP LOCKED";

/// The planner settings of a worker's transaction, set by [`claim`]: every statement in it
/// (the claim, the payloads, the histories, the events, the outcomes) finds its rows by an
/// index. Bitmap scans are off so the claim walks `inbox_pending` in order (see
/// migrations/20261125200001): a bitmap scan, which the planner picks when it believes
/// few rows are pending, visits the heap page of every entry processed since the last
/// vacuum and never marks them dead, so each claim of a burst cost more than the one
/// before. Sequential scans are off because a connection keeps the generic plan it made
/// for a statement, and one made while the inbox was nearly empty (a fresh database, or
/// one never analyzed) marks a batch done by a hash join over the whole inbox.
pub const BATCH_PLANS: &str = "SELECT set_config('enable_bitmapscan', 'off', true), \
        set_config('enable_seqscan', 'off', true)";

/// Claims up to `limit` due rows (of one partition of the customers, if given), oldest due
/// first, locked for the rest of `tx`. Rows other transactions hold are skipped. A row
/// whose event `parsed` holds takes it from there; the payloads of the others are read
/// with one more query.
pub async fn claim(
    tx: &mut PgConnection,
    limit: i64,
    partition: Option<Partition>,
    parsed: &ParsedEvents,
) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query(BATCH_PLANS).execute(&mut *tx).await?;
    let rows = sqlx::query(CLAIM)
        .bind(limit)
        .bind(partition.map(|p| p.index as i64))
        .bind(partition.map_or(1, |p| p.of as i64))
        .fetch_all(&mut *tx)
        .await?;
    let mut claimed: Vec<Claimed> = rows
        .into_iter()
        .map(|row| {
            let event_id: String = row.get("event_id");
            let event = if row.get("pruned") {
                ClaimedEvent::Pruned
            } else {
                match parsed.take(&event_id) {
                    Some((event, routed)) => ClaimedEvent::Parsed(event, Box::new(routed)),
                    // Read below.
                    None => ClaimedEvent::Raw(String::new()),
                }
            };
            Claimed {
                event_id,
                event_type: row.get("event_type"),
                customer_id: row.get("customer_id"),
                event,
                attempts: row.get("attempts"),
                waited: Duration::from_secs_f64(row.get::<f64, _>("waited").max(0.0)),
            }
        })
        .collect();
    let unread: Vec<&str> = claimed
        .iter()
        .filter(|row| matches!(row.event, ClaimedEvent::Raw(_)))
        .map(|row| row.event_id.as_str())
        .collect();
    if !unread.is_empty() {
        let payloads: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT event_id, payload FROM inbox WHERE event_id = ANY($1)")
                .bind(&unread)
                .fetch_all(&mut *tx)
                .await?;
        let mut payloads: HashMap<String, Option<String>> = payloads.into_iter().collect();
        for row in &mut claimed {
            if let ClaimedEvent::Raw(raw) = &mut row.event {
                match payloads.remove(&row.event_id).flatten() {
                    Some(payload) => *raw = payload,
                    None => row.event = ClaimedEvent::Pruned,
                }
            }
        }
    }
    Ok(claimed)
}

/// What processing made of one row: its outcome and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    pub event_id: String,
    pub outcome: Outcome,
    pub detail: Option<String>,
}

/// [`mark_done`]'s statement: claimed rows by event id, their outcome and detail, and the
/// done state.
pub const MARK_DONE: &str = "UPDATE inbox SET state = $4, outcome = u.outcome, detail = u.detail, \
        attempts = inbox.attempts + 1, last_error = NULL, processed_at = now() \
     FROM unnest($1::text[], $2::text[], $3::text[]) AS u(event_id, outcome, detail) \
     WHERE inbox.event_id = u.event_id";

/// Marks claimed rows done with their outcome and detail, in one statement: their attempt
/// is counted and any earlier error cleared.
pub async fn mark_done<'a>(
    tx: &mut PgConnection,
    rows: impl IntoIterator<Item = &'a Processed>,
) -> Result<(), sqlx::Error> {
    let (mut ids, mut outcomes, mut details) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        ids.push(row.event_id.as_str());
        outcomes.push(row.outcome);
        // A detail may name a value from the payload; one Postgres refused would fail the
        // whole batch's transaction, again and again.
        details.push(row.detail.as_deref().map(storable_text));
    }
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(MARK_DONE)
        .bind(&ids)
        .bind(&outcomes)
        .bind(&details)
        .bind(InboxState::Done)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// What became of a row whose processing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed {
    /// Attempts made, this one included.
    pub attempts: i32,
    /// It reached `max_attempts` and is dead-lettered (outcome `failed`) until an operator
    /// re-drives it; otherwise it stays pending, due again after a backoff.
    pub dead: bool,
}

/// Records a failed attempt on a claimed row with its error: it is due again after the
/// [`RETRY`] delay for its `attempts` (those made before this one, as [`Claimed`] says), or
/// dead-lettered once `max_attempts` attempts have failed. The error stays on the row
/// until processing succeeds. The claim holds the row locked for all of `tx`, so its
/// attempt count is still the one it was claimed with.
pub async fn mark_failed(
    tx: &mut PgConnection,
    event_id: &str,
    attempts: i32,
    error: &str,
    max_attempts: i32,
) -> Result<Failed, sqlx::Error> {
    record_failure(tx, event_id, attempts, error, max_attempts).await
}

/// Dead-letters a claimed row at once (outcome `failed`), with the reason it can never be
/// processed: retrying it would only fail the same way `SUBLEDGER_MAX_ATTEMPTS` times.
pub async fn mark_dead(
    tx: &mut PgConnection,
    event_id: &str,
    attempts: i32,
    reason: &str,
) -> Result<Failed, sqlx::Error> {
    record_failure(tx, event_id, attempts, reason, 0).await
}

async fn record_failure(
    tx: &mut PgConnection,
    event_id: &str,
    attempts: i32,
    error: &str,
    max_attempts: i32,
) -> Result<Failed, sqlx::Error> {
    let retry_in = RETRY.delay(u32::try_from(attempts).unwrap_or(0));
    let row = sqlx::query(
        "UPDATE inbox SET attempts = attempts + 1, last_error = $2, \
            next_attempt_at = now() + make_interval(secs => $6), \
            state = CASE WHEN attempts + 1 >= $3 THEN $4 ELSE state END, \
            outcome = CASE WHEN attempts + 1 >= $3 THEN $5 ELSE outcome END \
         WHERE event_id = $1 RETURNING attempts, state",
    )
    .bind(event_id)
    .bind(storable_text(error))
    .bind(max_attempts)
    .bind(InboxState::Dead)
    .bind(Outcome::Failed)
    .bind(retry_in.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    Ok(Failed {
        attempts: row.get("attempts"),
        dead: row.get::<InboxState, _>("state") == InboxState::Dead,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The delays the SQL used to compute, `least(power(2, least(attempts + 1, 12)), 3600)`
    /// seconds, for every attempt count.
    #[test]
    fn a_failed_row_waits_two_to_the_attempts_seconds_at_most_an_hour() {
        for attempts in 0..40u32 {
            let sql = 2f64.powi(((attempts + 1).min(12)) as i32).min(3600.0);
            assert_eq!(RETRY.delay(attempts).as_secs_f64(), sql, "{attempts}");
        }
    }

    #[test]
    fn the_claim_takes_pending_rows() {
        let pending = format!("WHERE state = '{}' ", InboxState::Pending.as_str());
        assert!(CLAIM.contains(&pending), "{CLAIM}");
    }
}
