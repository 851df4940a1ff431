//! What people and health checks read from the inbox: recent rows, one customer's rows,
//! whether a customer has any, one row's state and outcome, and the depth of the queue.
//! Only reads.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::{InboxState, Outcome};

/// One inbox row: a Stripe event we acknowledged and what processing made of it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InboxEntry {
    pub event_id: String,
    pub event_type: String,
    pub customer_id: Option<String>,
    pub stripe_created: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub state: InboxState,
    pub outcome: Option<Outcome>,
    pub detail: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// When retention dropped the row's raw payload (`None`: it still holds it).
    pub payload_pruned_at: Option<DateTime<Utc>>,
}

/// `SELECT`s every column of [`InboxEntry`], followed by `$tail` (filter, order, limit).
macro_rules! select_entries {
    ($tail:literal) => {
        concat!(
            "SELECT event_id, event_type, customer_id, stripe_created, received_at, state, outcome, \
                detail, attempts, last_error, payload_pruned_at FROM inbox ",
            $tail
        )
    };
}
pub(super) use select_entries;

/// The most recently received rows (at most `limit`), newest first.
pub async fn recent(pool: &PgPool, limit: i64) -> Result<Vec<InboxEntry>, sqlx::Error> {
    sqlx::query_as(select_entries!("ORDER BY received_at DESC LIMIT $1"))
        .bind(limit.max(0))
        .fetch_all(pool)
        .await
}

/// Every row of one customer, in Stripe's order.
pub async fn of_customer(pool: &PgPool, customer_id: &str) -> Result<Vec<InboxEntry>, sqlx::Error> {
    sqlx::query_as(select_entries!(
        "WHERE customer_id = $1 ORDER BY stripe_created, received_at"
    ))
    .bind(customer_id)
    .fetch_all(pool)
    .await
}

/// Whether any row names this customer.
pub async fn has_customer(pool: &PgPool, customer_id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM inbox WHERE customer_id = $1)")
        .bind(customer_id)
        .fetch_one(pool)
        .await
}

/// The state and outcome of one row once no attempt at it is in flight; `None` when no row
/// has that event id.
///
/// A worker holds the rows it claimed locked (`FOR UPDATE`) until it commits their
/// outcome, and a plain read would see such a row as still pending. `FOR SHARE` waits for
/// that transaction to end, so whoever took the row (this process or a running service's
/// worker, of any replica), the answer is what its attempt made of it.
pub async fn settled_state_of(
    pool: &PgPool,
    event_id: &str,
) -> Result<Option<(InboxState, Option<Outcome>)>, sqlx::Error> {
    sqlx::query_as("SELECT state, outcome FROM inbox WHERE event_id = $1 FOR SHARE")
        .bind(event_id)
        .fetch_optional(pool)
        .await
}

/// How much waits in the inbox: what `/readyz` reports and `/metrics` measures.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Depth {
    /// Rows waiting to be processed or retried.
    pub pending: i64,
    /// Dead-lettered rows.
    pub dead: i64,
    /// Age of the oldest pending row; `None` when none is pending.
    pub oldest_pending_age_secs: Option<f64>,
}

impl Depth {
    /// The states the depth counts: done rows are history, not depth.
    pub const STATES: [InboxState; 2] = [InboxState::Pending, InboxState::Dead];

    /// The rows in each of [`Depth::STATES`].
    pub fn by_state(&self) -> [(InboxState, i64); 2] {
        [
            (InboxState::Pending, self.pending),
            (InboxState::Dead, self.dead),
        ]
    }
}

/// The depth query. Its states are literals, not parameters, because only a literal
/// matches the predicates of the partial indexes `inbox_pending` and `inbox_dead` in every
/// plan Postgres may cache for the statement; with parameters it read every row the inbox
/// ever kept. A test checks the literals name [`Depth::STATES`], and another that the plan
/// walks those two indexes.
pub const DEPTH: &str = "SELECT p.pending, d.dead, \
        extract(epoch FROM now() - p.oldest)::float8 AS oldest_pending_age_secs \
     FROM (SELECT count(*) AS pending, min(received_at) AS oldest FROM inbox \
            WHERE state = 'pending') p, \
          (SELECT count(*) AS dead FROM inbox WHERE state = 'dead') d";

pub async fn depth(pool: &PgPool) -> Result<Depth, sqlx::Error> {
    sqlx::query_as(DEPTH).fetch_one(pool).await
}

/// Inbox rows received in one hour (UTC) from one source with one outcome (`pending` or
/// `dead` for rows not done).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HourlyCount {
    pub hour: DateTime<Utc>,
    pub source: String,
    pub outcome: String,
    pub count: i64,
}

/// Rows received since `since`, by hour, source and outcome (the admin overview's charts).
pub async fn hourly(pool: &PgPool, since: DateTime<Utc>) -> Result<Vec<HourlyCount>, sqlx::Error> {
    sqlx::query_as(
        "SELECT date_trunc('hour', received_at, 'UTC') AS hour, source, \
                CASE WHEN state = 'done' THEN coalesce(outcome, 'done') ELSE state END AS outcome, \
                count(*) AS count \
         FROM inbox WHERE received_at >= $1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .bind(since)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_depth_counts_its_states_by_literal() {
        for state in Depth::STATES {
            let filter = format!("WHERE state = '{}')", state.as_str());
            assert!(DEPTH.contains(&filter), "{state:?}: {DEPTH}");
        }
    }
}
