//! Inbox retention: a processed row's raw payload is dropped once it is older than the
//! configured age (`SUBLEDGER_INBOX_RETENTION_HOURS`), so the inbox stops growing by a
//! whole Stripe event per event received; the row itself stays, smaller, with when its
//! payload went (`payload_pruned_at`, which `inspect` shows).
//!
//! Why the row stays rather than being deleted: its event id is what makes a late
//! redelivery a duplicate at the door (Stripe retries for up to three days, and an
//! operator may replay older events by `subledger import`), and its outcome and detail
//! are the customer's history as `inspect` tells it. The facts the payload gave are in
//! the event log, which is never pruned.
//!
//! Pruning goes in small batches, each its own short transaction that skips rows another
//! transaction holds (`FOR UPDATE SKIP LOCKED`), so it never waits on, or makes wait, the
//! webhook's inserts or the workers' claims (which only touch pending rows). This module
//! must never touch a pending row (still to be processed) or a dead letter (kept until an
//! operator re-drives it); the table's `inbox_payload_kept` constraint refuses it too.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;

/// Rows whose payload one batch drops: small enough that its transaction lasts
/// milliseconds (a redelivery of one of these very events waits for it at the door).
pub const PRUNE_BATCH: i64 = 500;

/// The pause between two batches, so that pruning a large backlog (the first run after an
/// upgrade, or after retention was shortened) leaves the database to ingestion.
pub const PRUNE_PAUSE: Duration = Duration::from_millis(20);

/// How often the background pruner looks for rows that came of age.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// A prune batch. Its state is a literal, not a parameter, because only a literal matches
/// the predicate of the partial index `inbox_prunable` (`WHERE state = 'done' AND payload
/// IS NOT NULL`) in every plan Postgres may cache; a test checks it names
/// [`super::InboxState::Done`].
pub const PRUNE: &str = "UPDATE inbox SET payload = NULL, payload_pruned_at = now() \
     WHERE event_id IN ( \
        SELECT event_id FROM inbox \
        WHERE state = 'done' AND payload IS NOT NULL \
          AND processed_at < now() - make_interval(secs => $1) \
        ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
       AND state = 'done'";

/// Drops the payload of at most `limit` processed rows processed more than `older_than`
/// ago, oldest first, in the caller's transaction. Returns how many it pruned.
pub async fn prune_batch(
    conn: &mut PgConnection,
    older_than: Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let pruned = sqlx::query(PRUNE)
        .bind(older_than.as_secs_f64())
        .bind(limit.max(0))
        .execute(&mut *conn)
        .await?;
    Ok(pruned.rows_affected())
}

/// Prunes every row that came of age, batch by batch (each committed on its own, with a
/// pause between). Returns how many rows lost their payload.
pub async fn prune(pool: &PgPool, older_than: Duration) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let mut conn = pool.acquire().await?;
        let pruned = prune_batch(&mut conn, older_than, PRUNE_BATCH).await?;
        drop(conn);
        total += pruned;
        if pruned < PRUNE_BATCH as u64 {
            return Ok(total);
        }
        tokio::time::sleep(PRUNE_PAUSE).await;
    }
}

/// Prunes now and every [`PRUNE_EVERY`] until `stop`. Every replica may run it: batches
/// of two replicas skip each other's rows.
pub async fn run_pruner(pool: PgPool, older_than: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        match prune(&pool, older_than).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "inbox payloads past retention dropped"),
            Err(error) => tracing::warn!(
                error = %crate::error_chain::error_chain(&error),
                "inbox retention cannot reach the database; will retry"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::InboxState;

    #[test]
    fn a_prune_batch_reads_done_rows_by_literal() {
        let filter = format!(
            "WHERE state = '{}' AND payload IS NOT NULL",
            InboxState::Done.as_str()
        );
        assert!(PRUNE.contains(&filter), "{PRUNE}");
    }
}
