//! Signed outbound notifications (`entitlements.updated`): a checkpointed reader of the
//! log that, for every org and user whose answer changed, writes one outbox row per
//! configured endpoint in the transaction that advances its checkpoint; the sender
//! (`send`) delivers those rows, signed per Standard Webhooks, at least once and in order
//! per owner and endpoint.
//!
//! The answer notified is the one the entitlements API gives: `Catalog::entitlement` over
//! the owner's linked customers as the platform tables hold them (issue 11's computation;
//! never a second way). The notifier reads the log only up to where the platform tables
//! stand, so the answer it computes already includes every event it read. It also
//! re-judges, on each pass, owners whose notified access had an end that has passed, so
//! access that ends by time alone is notified too.
//!
//! This module must never send anything itself (the sender does, outside any ingestion or
//! read path), never decide what a Stripe fact means, and never rewrite a notification
//! already in the outbox: a retry or a replay re-sends the same bytes under the same id.

pub mod send;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use projections::log::{self, LogError, Position};
use projections::{Catalog, Entitlement, Owner, PlatformTables};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};

/// Events read per notifier pass.
pub const NOTIFY_BATCH: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notification storage failed")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Projection(#[from] projections::ProjectionError),
    #[error("cannot encode a notification")]
    Encode(#[from] serde_json::Error),
}

/// What a notification says an owner may do: the fields of the answer that matter to a
/// platform (the rest of the entitlement is one `GET` away).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    pub access: bool,
    pub plan: Option<String>,
    pub features: Vec<String>,
    pub access_until: Option<DateTime<Utc>>,
}

impl From<&Entitlement> for Access {
    fn from(answer: &Entitlement) -> Self {
        Self {
            access: answer.access,
            plan: answer.plan.clone(),
            features: answer.features.clone(),
            access_until: answer.access_until,
        }
    }
}

/// Why a notification was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Events in the log changed the answer.
    Log,
    /// Time passed: the notified access ended with no event.
    Time,
}

/// The `data` of an `entitlements.updated` notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub org_id: Option<String>,
    pub user_id: Option<String>,
    /// `null` for the first notification about an owner.
    pub before: Option<Access>,
    pub after: Access,
    /// The Stripe event ids (or sync ids) of the events that caused the change, in log
    /// order; empty when the reason is `time`.
    pub stripe_event_ids: Vec<String>,
    pub reason: Reason,
    /// The `global_seq` of the last event read when the change was found: what
    /// `subledger notify replay --from` takes.
    pub log_position: i64,
}

/// The envelope Standard Webhooks recommends: `type`, `timestamp`, `data`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: String,
    pub timestamp: DateTime<Utc>,
    pub data: Change,
}

pub const EVENT_TYPE: &str = "entitlements.updated";

fn owner_of(kind: &str) -> Owner {
    if kind == "user" {
        Owner::User
    } else {
        Owner::Org
    }
}

/// The notifier: finds changed answers and writes them to the outbox.
#[derive(Clone)]
pub struct Notifier {
    pool: PgPool,
    catalog: Arc<Catalog>,
    endpoints: Arc<Vec<String>>,
}

impl Notifier {
    pub fn new(pool: PgPool, catalog: Arc<Catalog>, endpoints: Vec<String>) -> Self {
        Self {
            pool,
            catalog,
            endpoints: Arc::new(endpoints),
        }
    }

    /// Reads the log up to where the platform tables stand and writes every change it
    /// finds (and every access that ended by `now`) to the outbox, checkpoint and rows in
    /// one transaction. Returns the notifications written. Replicas take turns (the
    /// checkpoint row is locked for the pass).
    pub async fn pass(&self, now: DateTime<Utc>) -> Result<usize, NotifyError> {
        let mut written = 0;
        loop {
            let (count, more) = self.one_pass(now).await?;
            written += count;
            if !more {
                return Ok(written);
            }
        }
    }

    async fn one_pass(&self, now: DateTime<Utc>) -> Result<(usize, bool), NotifyError> {
        let mut tx = self.pool.begin().await?;
        let horizon = log::read_horizon(&mut tx).await?;
        let row = sqlx::query(
            "SELECT tx_id::text AS tx, global_seq FROM notification_checkpoint FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await?;
        let at = position(row.get("tx"), row.get("global_seq"));
        let platform = projections::runner::checkpoint(
            &mut tx,
            <PlatformTables as projections::TransactionalProjection>::NAME,
        )
        .await?;
        let read = if platform > at {
            log::read_after(&mut tx, at, horizon, NOTIFY_BATCH).await?
        } else {
            vec![]
        };
        let more = read.len() as i64 == NOTIFY_BATCH;
        let events: Vec<_> = read
            .into_iter()
            .filter(|e| e.position <= platform)
            .collect();
        let more = more && !events.is_empty();
        // Which customers changed, and the Stripe events that changed them, in log order.
        let mut caused: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for event in &events {
            let ids = caused.entry(event.aggregate_id.clone()).or_default();
            let id = &event.event.source().stripe_event_id;
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        // Owners to judge: those the changed customers name now, those they were part of
        // when last notified, and those whose notified access has ended by `now`.
        let mut owners: BTreeSet<(String, String)> = BTreeSet::new();
        let customers: Vec<String> = caused.keys().cloned().collect();
        for customer in &customers {
            if let Some(info) = PlatformTables::customer(&self.pool, customer).await? {
                if let Some(org) = info.org_id {
                    owners.insert(("org".into(), org));
                }
                if let Some(user) = info.user_id {
                    owners.insert(("user".into(), user));
                }
            }
        }
        let earlier: Vec<(String, String)> = sqlx::query_as(
            "SELECT owner_kind, owner_id FROM notification_state WHERE customers && $1",
        )
        .bind(&customers)
        .fetch_all(&mut *tx)
        .await?;
        owners.extend(earlier);
        let ended: Vec<(String, String)> = sqlx::query_as(
            "SELECT owner_kind, owner_id FROM notification_state \
             WHERE access AND access_until <= $1",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let ended: BTreeSet<(String, String)> = ended.into_iter().collect();
        owners.extend(ended.iter().cloned());
        let last = events.last().map(|e| e.position).unwrap_or(at);

        let mut written = 0;
        for (kind, id) in owners {
            let owner = owner_of(&kind);
            let infos = PlatformTables::linked_to(&self.pool, owner, &id).await?;
            let (org, user) = match owner {
                Owner::Org => (Some(id.as_str()), None),
                Owner::User => (None, Some(id.as_str())),
            };
            let answer = self.catalog.entitlement(org, user, &infos, now);
            let after = Access::from(&answer);
            let stored: Option<(sqlx::types::Json<Access>, Vec<String>)> = sqlx::query_as(
                "SELECT answer, customers FROM notification_state \
                 WHERE owner_kind = $1 AND owner_id = $2",
            )
            .bind(&kind)
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
            let (before, before_customers) = match stored {
                Some((json, customers)) => (Some(json.0), customers),
                None => (None, vec![]),
            };
            if before.as_ref() == Some(&after) {
                // Unchanged; keep the customers current so a later unlink is found.
                sqlx::query(
                    "UPDATE notification_state SET customers = $3, updated_at = now() \
                     WHERE owner_kind = $1 AND owner_id = $2 AND customers <> $3",
                )
                .bind(&kind)
                .bind(&id)
                .bind(&answer.customers)
                .execute(&mut *tx)
                .await?;
                continue;
            }
            let mut stripe_event_ids = vec![];
            for customer in answer.customers.iter().chain(&before_customers) {
                for event_id in caused.get(customer).into_iter().flatten() {
                    if !stripe_event_ids.contains(event_id) {
                        stripe_event_ids.push(event_id.clone());
                    }
                }
            }
            let reason =
                if stripe_event_ids.is_empty() && ended.contains(&(kind.clone(), id.clone())) {
                    Reason::Time
                } else {
                    Reason::Log
                };
            let envelope = Envelope {
                kind: EVENT_TYPE.to_owned(),
                timestamp: now,
                data: Change {
                    org_id: org.map(str::to_owned),
                    user_id: user.map(str::to_owned),
                    before,
                    after: after.clone(),
                    stripe_event_ids,
                    reason,
                    log_position: last.global_seq,
                },
            };
            let body = serde_json::to_string(&envelope)?;
            let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
            for endpoint in self.endpoints.iter() {
                sqlx::query(
                    "INSERT INTO notifications (msg_id, endpoint, owner_kind, owner_id, log_position, body) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&msg_id)
                .bind(endpoint)
                .bind(&kind)
                .bind(&id)
                .bind(last.global_seq)
                .bind(&body)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO notification_state (owner_kind, owner_id, answer, customers, access, access_until) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (owner_kind, owner_id) DO UPDATE SET answer = $3, customers = $4, \
                   access = $5, access_until = $6, updated_at = now()",
            )
            .bind(&kind)
            .bind(&id)
            .bind(sqlx::types::Json(&after))
            .bind(&answer.customers)
            .bind(after.access)
            .bind(after.access_until)
            .execute(&mut *tx)
            .await?;
            written += 1;
        }
        if last != at {
            sqlx::query(
                "UPDATE notification_checkpoint SET tx_id = $1::text::xid8, global_seq = $2, \
                 updated_at = now()",
            )
            .bind(last.tx_id.to_string())
            .bind(last.global_seq)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if written > 0 {
            tracing::info!(written, "notifications written to the outbox");
        }
        Ok((written, more))
    }
}

fn position(tx: String, global_seq: i64) -> Position {
    Position {
        tx_id: tx.parse().unwrap_or(0),
        global_seq,
    }
}

/// One row of the outbox, as `subledger notify list` prints it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Outboxed {
    pub id: i64,
    pub msg_id: String,
    pub endpoint: String,
    pub owner_kind: String,
    pub owner_id: String,
    pub log_position: i64,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// The outbox, oldest first: every row, or only the dead letters.
pub async fn list(pool: &PgPool, dead_only: bool) -> Result<Vec<Outboxed>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, msg_id, endpoint, owner_kind, owner_id, log_position, state, attempts, last_error \
         FROM notifications WHERE ($1 = false OR state = 'dead') ORDER BY id",
    )
    .bind(dead_only)
    .fetch_all(pool)
    .await
}

/// Re-drives dead notifications (one by outbox id, or all) with a fresh attempt budget.
/// Returns the ids put back.
pub async fn retry(pool: &PgPool, id: Option<i64>) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE notifications SET state = 'pending', attempts = 0, next_attempt_at = now() \
         WHERE state = 'dead' AND ($1::bigint IS NULL OR id = $1) RETURNING id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}

/// Sends again every notification written at or after log position `from` (a
/// `global_seq`), delivered or not, with the same id and bytes: receivers that dedupe by
/// `webhook-id` see a retry. Returns how many were put back.
pub async fn replay(pool: &PgPool, from: i64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE notifications SET state = 'pending', attempts = 0, next_attempt_at = now(), \
         delivered_at = NULL WHERE log_position >= $1",
    )
    .bind(from)
    .execute(pool)
    .await?
    .rows_affected())
}
