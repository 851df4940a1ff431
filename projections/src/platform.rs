//! The platform tables in Postgres: `subscriptions` (one row per customer, the answer the
//! API gives when Redis has no key; an org's or user's answer is the union over the rows
//! linked to it) and `merchant_subscriptions` (Stripe's subscription
//! fields, one row per subscription id).
//!
//! Rows only move forward: an upsert whose version is not newer than the row's changes
//! nothing, so replays and repeated batches are harmless. The reads of these tables (a
//! customer's answer, an owner's, the operators' search) are here too, beside the writes
//! they must agree with.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use aggregates::{FactSource, SubscriptionEvent, SubscriptionFacts};
use chrono::{DateTime, Utc};
use event_store::arguments::{fixed_array, presized, text_array};
use futures_util::TryStreamExt;
use sqlx::{PgConnection, PgPool};

use crate::batch::Events;
use crate::catalog::Catalog;
use crate::info::SubscriptionInfo;
use crate::log::{LogError, LoggedEvent};
use crate::redis_cache::Owner;
use crate::runner::{ProjectionError, TransactionalProjection};

/// The most customers [`PlatformTables::search`] returns.
pub const SEARCH_LIMIT: i64 = 50;

/// A customer a search found, by what, and what its `subscriptions` row holds (all `None`
/// for a customer without a row).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SearchHit {
    pub customer_id: String,
    /// `customer`, `org`, `user` or `subscription`.
    pub matched_on: String,
    pub org_id: Option<String>,
    pub user_id: Option<String>,
    pub subscription_id: Option<String>,
    pub status: Option<String>,
}

#[derive(Clone)]
pub struct PlatformTables {
    catalog: Arc<Catalog>,
}

/// How many customers hold one status, and how many of those stand within their current
/// period (which access needs as well as a granting status).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StatusCount {
    pub status: String,
    pub customers: i64,
    pub within_period: i64,
}

/// The upsert of `subscriptions` rows, from arrays unnested server-side as `u`, with
/// `$filter` between that and the conflict clause: a rebuild's keeps only the rows that
/// would change. (`ON CONFLICT … WHERE` locks every row it finds, even one its version
/// guard then leaves; most rows of a replay are found as they would be written.)
/// `$11`: a row of the same version that differs is replaced too.
macro_rules! upsert_subscriptions {
    ($filter:literal) => {
        concat!(
            "INSERT INTO subscriptions (customer_id, org_id, user_id, subscription_id, status, price_id, \
                current_period_end, info, version, updated_at) \
             SELECT u.customer_id, u.org_id, u.user_id, u.subscription_id, u.status, u.price_id, \
                u.current_period_end, u.info::json, u.version, u.updated_at \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                $7::timestamptz[], $8::text[], $9::int8[], $10::timestamptz[]) \
                AS u(customer_id, org_id, user_id, subscription_id, status, price_id, current_period_end, \
                info, version, updated_at) ",
            $filter,
            " ON CONFLICT (customer_id) DO UPDATE SET org_id = EXCLUDED.org_id, user_id = EXCLUDED.user_id, \
                subscription_id = EXCLUDED.subscription_id, status = EXCLUDED.status, price_id = EXCLUDED.price_id, \
                current_period_end = EXCLUDED.current_period_end, info = EXCLUDED.info, \
                version = EXCLUDED.version, updated_at = EXCLUDED.updated_at \
             WHERE subscriptions.version < EXCLUDED.version \
                OR ($11 AND subscriptions.version = EXCLUDED.version \
                    AND (subscriptions.org_id, subscriptions.user_id, subscriptions.subscription_id, \
                        subscriptions.status, subscriptions.price_id, subscriptions.current_period_end, \
                        subscriptions.info::text, subscriptions.updated_at) \
                    IS DISTINCT FROM (EXCLUDED.org_id, EXCLUDED.user_id, EXCLUDED.subscription_id, \
                        EXCLUDED.status, EXCLUDED.price_id, EXCLUDED.current_period_end, \
                        EXCLUDED.info::text, EXCLUDED.updated_at))"
        )
    };
}

/// The upsert of `merchant_subscriptions` rows, as [`upsert_subscriptions`] (`$22` as its
/// `$11`); `u`'s columns are the table's, in its order.
macro_rules! upsert_merchant_subscriptions {
    ($filter:literal) => {
        concat!(
            "INSERT INTO merchant_subscriptions (subscription_id, customer_id, status, price_id, product_id, \
                lookup_key, quantity, currency, created, current_period_start, current_period_end, \
                cancel_at_period_end, cancel_at, canceled_at, ended_at, trial_start, trial_end, \
                latest_invoice_id, stripe_event_id, stripe_created, version) \
             SELECT u.* FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                $7::int8[], $8::text[], $9::timestamptz[], $10::timestamptz[], $11::timestamptz[], $12::bool[], \
                $13::timestamptz[], $14::timestamptz[], $15::timestamptz[], $16::timestamptz[], $17::timestamptz[], \
                $18::text[], $19::text[], $20::timestamptz[], $21::int8[]) \
                AS u(subscription_id, customer_id, status, price_id, product_id, lookup_key, quantity, currency, \
                created, current_period_start, current_period_end, cancel_at_period_end, cancel_at, canceled_at, \
                ended_at, trial_start, trial_end, latest_invoice_id, stripe_event_id, stripe_created, version) ",
            $filter,
            " ON CONFLICT (subscription_id) DO UPDATE SET customer_id = EXCLUDED.customer_id, \
                status = EXCLUDED.status, price_id = EXCLUDED.price_id, product_id = EXCLUDED.product_id, \
                lookup_key = EXCLUDED.lookup_key, quantity = EXCLUDED.quantity, currency = EXCLUDED.currency, \
                created = EXCLUDED.created, current_period_start = EXCLUDED.current_period_start, \
                current_period_end = EXCLUDED.current_period_end, \
                cancel_at_period_end = EXCLUDED.cancel_at_period_end, cancel_at = EXCLUDED.cancel_at, \
                canceled_at = EXCLUDED.canceled_at, ended_at = EXCLUDED.ended_at, \
                trial_start = EXCLUDED.trial_start, trial_end = EXCLUDED.trial_end, \
                latest_invoice_id = EXCLUDED.latest_invoice_id, stripe_event_id = EXCLUDED.stripe_event_id, \
                stripe_created = EXCLUDED.stripe_created, version = EXCLUDED.version \
             WHERE merchant_subscriptions.version < EXCLUDED.version \
                OR ($22 AND merchant_subscriptions.version = EXCLUDED.version \
                    AND ROW(merchant_subscriptions.*) IS DISTINCT FROM ROW(EXCLUDED.*))"
        )
    };
}

impl PlatformTables {
    /// Customers by status at `now`, most numerous first (the admin overview).
    pub async fn status_counts(
        pool: &PgPool,
        now: DateTime<Utc>,
    ) -> Result<Vec<StatusCount>, sqlx::Error> {
        sqlx::query_as(
            "SELECT status, count(*) AS customers, \
                    count(*) FILTER (WHERE current_period_end IS NULL OR current_period_end > $1) \
                      AS within_period \
             FROM subscriptions GROUP BY status ORDER BY count(*) DESC, status",
        )
        .bind(now)
        .fetch_all(pool)
        .await
    }

    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self { catalog }
    }

    /// The stored answer for a customer.
    pub async fn customer(
        pool: &PgPool,
        customer_id: &str,
    ) -> Result<Option<SubscriptionInfo>, sqlx::Error> {
        Self::one(
            pool,
            "SELECT info FROM subscriptions WHERE customer_id = $1",
            customer_id,
        )
        .await
    }

    /// The stored answers of every customer linked to an owner now: named by it and not
    /// deleted (a customer that moved to another owner names that one). The owner's answer
    /// is the union over these, so it never depends on which was written last.
    pub async fn linked_to(
        pool: &PgPool,
        owner: Owner,
        id: &str,
    ) -> Result<Vec<SubscriptionInfo>, sqlx::Error> {
        let sql = match owner {
            Owner::Org => "SELECT info FROM subscriptions WHERE org_id = $1 \
                           AND NOT coalesce((info->>'deleted')::boolean, false) ORDER BY customer_id",
            Owner::User => "SELECT info FROM subscriptions WHERE user_id = $1 \
                            AND NOT coalesce((info->>'deleted')::boolean, false) ORDER BY customer_id",
        };
        Self::all(pool, sql, id).await
    }

    /// The stored answers of every customer that ever named the org, deleted ones
    /// included (billing must not reuse a deleted customer, and must know it existed).
    pub async fn named_by_org(
        pool: &PgPool,
        org_id: &str,
    ) -> Result<Vec<SubscriptionInfo>, sqlx::Error> {
        Self::all(
            pool,
            "SELECT info FROM subscriptions WHERE org_id = $1 ORDER BY customer_id",
            org_id,
        )
        .await
    }

    async fn all(
        pool: &PgPool,
        sql: &str,
        key: &str,
    ) -> Result<Vec<SubscriptionInfo>, sqlx::Error> {
        let infos: Vec<sqlx::types::Json<SubscriptionInfo>> =
            sqlx::query_scalar(sql).bind(key).fetch_all(pool).await?;
        Ok(infos.into_iter().map(|json| json.0).collect())
    }

    /// The customers whose row names `q` (as customer, org, user or subscription id), or
    /// whose subscription mirror names it as a subscription id, and the customers in
    /// `known` (found by `q` elsewhere: the log, the inbox; matched as `customer`), each
    /// with what its row holds. One per customer (by the first of `customer`, `org`,
    /// `subscription`, `user` it matched on), at most [`SEARCH_LIMIT`], by customer id.
    pub async fn search(
        pool: &PgPool,
        q: &str,
        known: &[&str],
    ) -> Result<Vec<SearchHit>, sqlx::Error> {
        sqlx::query_as(
            "WITH found AS ( \
                SELECT customer_id, CASE WHEN customer_id = $1 THEN 'customer' WHEN org_id = $1 THEN 'org' \
                       WHEN user_id = $1 THEN 'user' ELSE 'subscription' END AS matched_on \
                  FROM subscriptions WHERE $1 IN (customer_id, org_id, user_id, subscription_id) \
                UNION SELECT customer_id, 'subscription' FROM merchant_subscriptions WHERE subscription_id = $1 \
                UNION SELECT unnest($2::text[]), 'customer' \
             ) \
             SELECT DISTINCT ON (f.customer_id) f.customer_id, f.matched_on, s.org_id, s.user_id, s.subscription_id, s.status \
               FROM found f LEFT JOIN subscriptions s ON s.customer_id = f.customer_id \
              ORDER BY f.customer_id, f.matched_on LIMIT $3",
        )
        .bind(q)
        .bind(known)
        .bind(SEARCH_LIMIT)
        .fetch_all(pool)
        .await
    }

    async fn one(
        pool: &PgPool,
        sql: &str,
        key: &str,
    ) -> Result<Option<SubscriptionInfo>, sqlx::Error> {
        let info: Option<sqlx::types::Json<SubscriptionInfo>> = sqlx::query_scalar(sql)
            .bind(key)
            .fetch_optional(pool)
            .await?;
        Ok(info.map(|json| json.0))
    }

    /// Upserts each customer's newest answer in `events` and each subscription's newest
    /// snapshot, each replacing a row of an older version; `rebuilding`, also a row of the
    /// same version that differs (a replay writes every answer again, in the shape and
    /// with the catalogue of now, over the rows it finds). A rebuild's upsert first leaves
    /// out, by a lookup of each row, those it would not change, so they are not locked.
    async fn upsert(
        &self,
        tx: &mut PgConnection,
        events: &Events<'_>,
        rebuilding: bool,
    ) -> Result<(), ProjectionError> {
        // One multi-row upsert per table and batch (arrays unnested server-side): a replay
        // of a million events is a few hundred statements, not a million.
        let answers = events.answers(&self.catalog)?;
        if !answers.is_empty() {
            let infos: Vec<&SubscriptionInfo> = answers.iter().map(|a| &a.info).collect();
            let json: Vec<&str> = answers.iter().map(|a| a.json.as_str()).collect();
            let statement = if rebuilding {
                upsert_subscriptions!(
                    "LEFT JOIN LATERAL (SELECT s.* FROM subscriptions s WHERE s.customer_id = u.customer_id \
                        LIMIT 1) s ON true \
                     WHERE s.customer_id IS NULL OR s.version < u.version \
                        OR (s.version = u.version \
                            AND (s.org_id, s.user_id, s.subscription_id, s.status, s.price_id, \
                                s.current_period_end, s.info::text, s.updated_at) \
                            IS DISTINCT FROM (u.org_id, u.user_id, u.subscription_id, u.status, u.price_id, \
                                u.current_period_end, u.info, u.updated_at))"
                )
            } else {
                upsert_subscriptions!("")
            };
            // Borrowed, not copied: the arrays are encoded from the answers.
            let text = |f: fn(&SubscriptionInfo) -> Option<&str>| {
                infos.iter().map(|i| f(i)).collect::<Vec<_>>()
            };
            // The answers' JSON is most of the arguments; the other columns are ids.
            let rows = infos.len();
            let bytes = text_array(json.iter().map(|j| Some(*j))) + 9 * fixed_array(rows, 40);
            sqlx::query_with(statement, presized(11, bytes))
                .bind(text(|i| Some(&i.customer_id)))
                .bind(text(|i| i.org_id.as_deref()))
                .bind(text(|i| i.user_id.as_deref()))
                .bind(text(|i| i.subscription_id.as_deref()))
                .bind(text(|i| Some(&i.status)))
                .bind(text(|i| i.price_id.as_deref()))
                .bind(
                    infos
                        .iter()
                        .map(|i| i.current_period_end)
                        .collect::<Vec<_>>(),
                )
                .bind(json)
                .bind(infos.iter().map(|i| i.version as i64).collect::<Vec<_>>())
                .bind(infos.iter().map(|i| i.updated_at).collect::<Vec<_>>())
                .bind(rebuilding)
                .execute(&mut *tx)
                .await?;
        }

        // The mirror: the newest snapshot of each subscription in the batch.
        let mut newest: HashMap<&str, (&LoggedEvent, &SubscriptionFacts, &FactSource)> =
            HashMap::new();
        for logged in events.iter() {
            // A reconciled snapshot (from Stripe's API) is a snapshot like any other here.
            if let SubscriptionEvent::SubscriptionChanged {
                subscription,
                source,
                ..
            }
            | SubscriptionEvent::SubscriptionReconciled {
                subscription,
                source,
                ..
            } = &logged.event
            {
                let slot = newest.entry(subscription.id.as_str()).or_insert((
                    logged,
                    subscription,
                    source,
                ));
                if logged.sequence > slot.0.sequence {
                    *slot = (logged, subscription, source);
                }
            }
        }
        if newest.is_empty() {
            return Ok(());
        }
        let rows: Vec<_> = newest.into_values().collect();
        let text = |f: fn(&SubscriptionFacts) -> Option<&str>| {
            rows.iter().map(|(_, s, _)| f(s)).collect::<Vec<_>>()
        };
        let time = |f: fn(&SubscriptionFacts) -> Option<DateTime<Utc>>| {
            rows.iter().map(|(_, s, _)| f(s)).collect::<Vec<_>>()
        };
        let statement = if rebuilding {
            upsert_merchant_subscriptions!(
                "LEFT JOIN LATERAL (SELECT m.* FROM merchant_subscriptions m \
                    WHERE m.subscription_id = u.subscription_id LIMIT 1) m ON true \
                 WHERE m.subscription_id IS NULL OR m.version < u.version \
                    OR (m.version = u.version AND ROW(m.*) IS DISTINCT FROM ROW(u.*))"
            )
        } else {
            upsert_merchant_subscriptions!("")
        };
        sqlx::query(statement)
            .bind(text(|s| Some(&s.id)))
            .bind(
                rows.iter()
                    .map(|(l, _, _)| l.aggregate_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(text(|s| Some(s.status.as_str())))
            .bind(text(|s| s.price_id.as_deref()))
            .bind(text(|s| s.product_id.as_deref()))
            .bind(text(|s| s.lookup_key.as_deref()))
            .bind(
                rows.iter()
                    .map(|(_, s, _)| s.quantity.map(|q| q as i64))
                    .collect::<Vec<_>>(),
            )
            .bind(text(|s| s.currency.as_deref()))
            .bind(time(|s| s.created))
            .bind(time(|s| s.current_period_start))
            .bind(time(|s| s.current_period_end))
            .bind(
                rows.iter()
                    .map(|(_, s, _)| s.cancel_at_period_end)
                    .collect::<Vec<_>>(),
            )
            .bind(time(|s| s.cancel_at))
            .bind(time(|s| s.canceled_at))
            .bind(time(|s| s.ended_at))
            .bind(time(|s| s.trial_start))
            .bind(time(|s| s.trial_end))
            .bind(text(|s| s.latest_invoice_id.as_deref()))
            .bind(
                rows.iter()
                    .map(|(_, _, src)| src.stripe_event_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|(_, _, src)| src.created)
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|(l, _, _)| l.sequence as i64)
                    .collect::<Vec<_>>(),
            )
            .bind(rebuilding)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

impl TransactionalProjection for PlatformTables {
    const NAME: &'static str = "platform_tables";

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &Events<'_>,
    ) -> Result<(), ProjectionError> {
        self.upsert(tx, events, false).await
    }

    async fn apply_rebuilding(
        &self,
        tx: &mut PgConnection,
        events: &Events<'_>,
    ) -> Result<(), ProjectionError> {
        self.upsert(tx, events, true).await
    }

    /// Deletes the rows of customers other than `rebuilt` that the log holds no event of
    /// (usually there are none: only rows written by hand, or a log restored to an
    /// earlier point, leave any). The rows' customer ids are streamed and looked up here:
    /// sending every rebuilt id to Postgres as an array to compare there took 1.1 s of a
    /// replay that rebuilt 262 000 customers.
    async fn retain(
        &self,
        tx: &mut PgConnection,
        rebuilt: &HashSet<String>,
    ) -> Result<(), ProjectionError> {
        let mut others: Vec<String> = Vec::new();
        {
            let mut held = sqlx::query_scalar::<_, String>(
                "SELECT customer_id FROM subscriptions UNION ALL SELECT customer_id FROM merchant_subscriptions",
            )
            .fetch(&mut *tx);
            while let Some(customer_id) = held.try_next().await? {
                if !rebuilt.contains(&customer_id) {
                    others.push(customer_id);
                }
            }
        }
        others.sort_unstable();
        others.dedup();
        if others.is_empty() {
            return Ok(());
        }
        let logged: HashSet<String> = event_store::read::logged_among(&mut *tx, &others)
            .await
            .map_err(LogError::from)?
            .into_iter()
            .collect();
        let unlogged: Vec<&String> = others.iter().filter(|id| !logged.contains(*id)).collect();
        if !unlogged.is_empty() {
            sqlx::query("DELETE FROM subscriptions WHERE customer_id = ANY($1)")
                .bind(&unlogged)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM merchant_subscriptions WHERE customer_id = ANY($1)")
                .bind(&unlogged)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}
