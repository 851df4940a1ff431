//! The bookkeeping of syncs with Stripe's API, and the only code that names its two
//! tables: every attempt (`sync_attempts`: who asked, how it ended, how long it took) and,
//! per customer, the pending request and the run of failures (`sync_customers`: when the
//! next sync is due and why, how many failed in a row, whether the customer is flagged).
//!
//! It records and schedules; it never calls Stripe nor decides what an answer means
//! (`sync::Syncer` does both). Sources and outcomes are Rust enums stored as text, so no
//! other module spells them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::backoff::Backoff;

/// Consecutive failures after which a customer is flagged ("more than three").
pub const FLAG_AFTER: i32 = 3;

/// How long a claimed sync request stays claimed (a crashed worker's claim expires).
const CLAIM_LEASE: Duration = Duration::from_secs(300);

/// The longest a failed sync waits for its retry.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);

/// When a customer's failed sync runs again: `retry_base` after the first failure in a
/// row, doubling with each next one, at most [`MAX_RETRY_DELAY`].
pub fn retry_backoff(retry_base: Duration) -> Backoff {
    Backoff::doubling(retry_base).capped(MAX_RETRY_DELAY)
}

/// Why a sync ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum SyncSource {
    /// An ambiguous webhook (same-second tie, or `previous_attributes.status` that does
    /// not match what we held).
    Webhook,
    SuccessPage,
    PortalReturn,
    Reconciler,
    Operator,
}

impl SyncSource {
    pub const ALL: [SyncSource; 5] = [
        SyncSource::Webhook,
        SyncSource::SuccessPage,
        SyncSource::PortalReturn,
        SyncSource::Reconciler,
        SyncSource::Operator,
    ];

    /// The stored (and metric label) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncSource::Webhook => "webhook",
            SyncSource::SuccessPage => "success_page",
            SyncSource::PortalReturn => "portal_return",
            SyncSource::Reconciler => "reconciler",
            SyncSource::Operator => "operator",
        }
    }
}

/// How a sync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum SyncOutcome {
    /// Something differed and was recorded.
    Applied,
    /// Stripe's answer matched what we held.
    Unchanged,
    /// A webhook in the same second as our request could not be ordered against the
    /// answer; another sync is scheduled.
    Ambiguous,
    Failed,
}

impl SyncOutcome {
    pub const ALL: [SyncOutcome; 4] = [
        SyncOutcome::Applied,
        SyncOutcome::Unchanged,
        SyncOutcome::Ambiguous,
        SyncOutcome::Failed,
    ];

    /// The stored (and metric label) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncOutcome::Applied => "applied",
            SyncOutcome::Unchanged => "unchanged",
            SyncOutcome::Ambiguous => "ambiguous",
            SyncOutcome::Failed => "failed",
        }
    }
}

/// One finished sync, as it is recorded.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub sync_id: &'a str,
    pub customer_id: &'a str,
    pub source: SyncSource,
    pub outcome: SyncOutcome,
    /// Why it failed, or what was ambiguous.
    pub detail: Option<&'a str>,
    /// HTTP attempts made to Stripe.
    pub attempts: u32,
    pub duration: Duration,
    pub started_at: DateTime<Utc>,
}

/// Where a customer stands after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Standing {
    pub consecutive_failures: i32,
    pub flagged: bool,
}

/// Records an attempt and, in the same transaction, what follows for the customer: a
/// failure schedules a retry with backoff ([`retry_backoff`]) and flags the customer after
/// more than [`FLAG_AFTER`] in a row; a success clears the run and the flag; an ambiguous
/// answer asks again after `retry_base`.
pub async fn record_attempt(
    pool: &PgPool,
    attempt: &Attempt<'_>,
    retry_base: Duration,
) -> Result<Standing, sqlx::Error> {
    // The detail quotes Stripe's answer, which could hold a NUL character that would fail
    // the statement on every retry.
    let detail = attempt.detail.map(crate::db_error::storable_text);
    let detail = detail.as_deref();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO sync_attempts (sync_id, customer_id, source, outcome, detail, attempts, duration_ms, started_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(attempt.sync_id)
    .bind(attempt.customer_id)
    .bind(attempt.source)
    .bind(attempt.outcome)
    .bind(detail)
    .bind(attempt.attempts as i32)
    .bind(attempt.duration.as_millis().min(i32::MAX as u128) as i32)
    .bind(attempt.started_at)
    .execute(&mut *tx)
    .await?;
    let standing = if attempt.outcome == SyncOutcome::Failed {
        // Retry with backoff. The delay depends on the failures already in a row, which
        // only the row holds, so the statement picks it from the whole schedule (the
        // delay before retry n is the nth, the cap past the end), in the same statement
        // that counts this failure. The source of the retry stays the one that asked
        // first.
        let schedule: Vec<f64> = retry_backoff(retry_base)
            .schedule()
            .iter()
            .map(Duration::as_secs_f64)
            .collect();
        sqlx::query_as(
            "INSERT INTO sync_customers AS c (customer_id, next_attempt_at, pending_source, requested_at, \
                consecutive_failures, last_outcome, last_error) \
             VALUES ($1, now() + make_interval(secs => $2[1]), $3, now(), 1, $6, $4) \
             ON CONFLICT (customer_id) DO UPDATE SET \
                consecutive_failures = c.consecutive_failures + 1, \
                next_attempt_at = now() + make_interval(secs => \
                    $2[least(c.consecutive_failures, cardinality($2) - 1) + 1]), \
                pending_source = COALESCE(c.pending_source, EXCLUDED.pending_source), \
                flagged_at = CASE WHEN c.consecutive_failures + 1 > $5 THEN COALESCE(c.flagged_at, now()) END, \
                last_outcome = EXCLUDED.last_outcome, last_error = EXCLUDED.last_error, updated_at = now() \
             RETURNING consecutive_failures, flagged_at IS NOT NULL AS flagged",
        )
        .bind(attempt.customer_id)
        .bind(&schedule)
        .bind(attempt.source)
        .bind(detail)
        .bind(FLAG_AFTER)
        .bind(SyncOutcome::Failed)
        .fetch_one(&mut *tx)
        .await?
    } else {
        // Success clears the failure run and the flag. A request made after this sync
        // started stays pending; an ambiguous answer asks again shortly.
        sqlx::query_as(
            "INSERT INTO sync_customers AS c (customer_id, next_attempt_at, pending_source, requested_at, \
                last_outcome, last_synced_at) \
             VALUES ($1, CASE WHEN $3 THEN now() + make_interval(secs => $4) END, \
                CASE WHEN $3 THEN $5 END, CASE WHEN $3 THEN now() END, $2, now()) \
             ON CONFLICT (customer_id) DO UPDATE SET \
                consecutive_failures = 0, flagged_at = NULL, last_error = NULL, \
                last_outcome = EXCLUDED.last_outcome, last_synced_at = now(), updated_at = now(), \
                next_attempt_at = CASE WHEN $3 THEN EXCLUDED.next_attempt_at \
                    WHEN c.requested_at > $6 THEN c.next_attempt_at END, \
                pending_source = CASE WHEN $3 THEN EXCLUDED.pending_source \
                    WHEN c.requested_at > $6 THEN c.pending_source END \
             RETURNING consecutive_failures, flagged_at IS NOT NULL AS flagged",
        )
        .bind(attempt.customer_id)
        .bind(attempt.outcome)
        .bind(attempt.outcome == SyncOutcome::Ambiguous)
        .bind(retry_base.as_secs_f64())
        .bind(attempt.source)
        .bind(attempt.started_at)
        .fetch_one(&mut *tx)
        .await?
    };
    tx.commit().await?;
    Ok(standing)
}

/// Asks for a sync of `customer_id` after `delay` (the earliest request wins). Used when
/// a webhook is ambiguous; works without a Stripe key too (the request waits for one).
pub async fn request_sync(
    pool: &PgPool,
    customer_id: &str,
    source: SyncSource,
    delay: Duration,
) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    request_syncs(&mut conn, &[customer_id], source, delay).await
}

/// [`request_sync`] for several customers at once, in the caller's transaction (the
/// inbox workers ask in the transaction of the batch whose webhooks were ambiguous: no
/// connection, statement and commit of its own for each). A customer named twice is
/// asked for once. The times are the clock's when the statement runs, not the start of
/// the caller's transaction, so the delay counts from the request.
pub async fn request_syncs(
    conn: &mut PgConnection,
    customer_ids: &[impl AsRef<str>],
    source: SyncSource,
    delay: Duration,
) -> Result<(), sqlx::Error> {
    // Sorted, so that concurrent requests lock their rows in the same order; once each,
    // because one statement cannot update a row twice.
    let mut ids: Vec<&str> = customer_ids.iter().map(AsRef::as_ref).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO sync_customers AS c (customer_id, next_attempt_at, pending_source, requested_at) \
         SELECT u.customer_id, clock_timestamp() + make_interval(secs => $2), $3, clock_timestamp() \
         FROM unnest($1::text[]) AS u(customer_id) \
         ON CONFLICT (customer_id) DO UPDATE SET \
            next_attempt_at = LEAST(COALESCE(c.next_attempt_at, 'infinity'), EXCLUDED.next_attempt_at), \
            pending_source = COALESCE(c.pending_source, EXCLUDED.pending_source), \
            requested_at = clock_timestamp(), updated_at = clock_timestamp()",
    )
    .bind(&ids)
    .bind(delay.as_secs_f64())
    .bind(source)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A sync request that was due, now claimed for [`CLAIM_LEASE`].
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DueSync {
    pub customer_id: String,
    /// Who asked; `None` only for a row no request ever named.
    pub pending_source: Option<SyncSource>,
}

/// Claims the request that has been due the longest (skipping those another replica holds).
/// `None` when nothing is due.
pub async fn claim_due(pool: &PgPool) -> Result<Option<DueSync>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE sync_customers SET next_attempt_at = now() + make_interval(secs => $1), updated_at = now() \
         WHERE customer_id = (SELECT customer_id FROM sync_customers \
            WHERE next_attempt_at <= now() ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING customer_id, pending_source",
    )
    .bind(CLAIM_LEASE.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Requests a sync (source `reconciler`, due now) of at most `limit` customers whose row in
/// `subscriptions` and whose last sync are both older than `interval`, oldest sync first,
/// unless one is pending already. Returns how many were requested.
pub async fn request_stale(
    pool: &PgPool,
    interval: Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO sync_customers AS c (customer_id, next_attempt_at, pending_source, requested_at) \
         SELECT s.customer_id, now(), $3, now() FROM subscriptions s \
         LEFT JOIN sync_customers k ON k.customer_id = s.customer_id \
         WHERE k.next_attempt_at IS NULL \
           AND s.updated_at < now() - make_interval(secs => $1) \
           AND COALESCE(k.last_synced_at, '-infinity') < now() - make_interval(secs => $1) \
         ORDER BY COALESCE(k.last_synced_at, '-infinity') LIMIT $2 \
         ON CONFLICT (customer_id) DO UPDATE SET next_attempt_at = now(), \
            pending_source = EXCLUDED.pending_source, requested_at = now(), updated_at = now() \
         WHERE c.next_attempt_at IS NULL",
    )
    .bind(interval.as_secs_f64())
    .bind(limit)
    .bind(SyncSource::Reconciler)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// A recorded attempt, as the admin page lists it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub customer_id: String,
    pub source: SyncSource,
    pub outcome: SyncOutcome,
    pub detail: Option<String>,
    pub attempts: i32,
    pub duration_ms: i32,
    pub started_at: DateTime<Utc>,
}

/// The latest attempts, newest first, of one customer or of all (at most `limit`).
pub async fn recent_attempts(
    pool: &PgPool,
    customer_id: Option<&str>,
    limit: i64,
) -> Result<Vec<AttemptRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT customer_id, source, outcome, detail, attempts, duration_ms, started_at FROM sync_attempts \
         WHERE $1::text IS NULL OR customer_id = $1 ORDER BY started_at DESC, id DESC LIMIT $2",
    )
    .bind(customer_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A customer whose syncs failed more than [`FLAG_AFTER`] times in a row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Flagged {
    pub customer_id: String,
    pub consecutive_failures: i32,
    pub last_error: Option<String>,
}

/// The flagged customers, most recently flagged first, one or all (at most `limit`).
pub async fn flagged(
    pool: &PgPool,
    customer_id: Option<&str>,
    limit: i64,
) -> Result<Vec<Flagged>, sqlx::Error> {
    sqlx::query_as(
        "SELECT customer_id, consecutive_failures, last_error FROM sync_customers \
         WHERE flagged_at IS NOT NULL AND ($1::text IS NULL OR customer_id = $1) ORDER BY flagged_at DESC LIMIT $2",
    )
    .bind(customer_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// How many customers are flagged (a gauge at each scrape).
pub async fn flagged_count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM sync_customers WHERE flagged_at IS NOT NULL")
        .fetch_one(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The delays the SQL used to compute: `base` for the first failure in a row, then
    /// `LEAST(3600, base * power(2, failures before))` seconds.
    #[test]
    fn a_failed_sync_waits_the_base_doubling_at_most_an_hour() {
        for base_ms in [20u64, 250, 5_000, 3_600_000, 7_200_000] {
            let base = Duration::from_millis(base_ms);
            let retry = retry_backoff(base);
            let schedule = retry.schedule();
            for before in 0..40i32 {
                let sql = (base.as_secs_f64() * 2f64.powi(before)).min(3600.0);
                assert_eq!(
                    retry.delay(before as u32).as_secs_f64(),
                    sql,
                    "{base_ms} ms, {before}"
                );
                // What the statement picks: 1-based, the last entry past the end.
                let picked = schedule[(before as usize).min(schedule.len() - 1)];
                assert_eq!(picked.as_secs_f64(), sql, "{base_ms} ms, {before}");
            }
        }
    }

    #[test]
    fn spellings_are_distinct_and_snake_case() {
        let sources: Vec<&str> = SyncSource::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            sources,
            [
                "webhook",
                "success_page",
                "portal_return",
                "reconciler",
                "operator"
            ]
        );
        let outcomes: Vec<&str> = SyncOutcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(outcomes, ["applied", "unchanged", "ambiguous", "failed"]);
        // serde and `as_str` agree (the JSON of a sync report uses serde's).
        for outcome in SyncOutcome::ALL {
            assert_eq!(
                serde_json::to_value(outcome).unwrap(),
                serde_json::json!(outcome.as_str())
            );
        }
    }
}
