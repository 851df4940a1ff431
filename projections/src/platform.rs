//! The platform tables in Postgres: `subscriptions` (one row per customer, the answer the
//! API gives when Redis has no key) and `merchant_subscriptions` (Stripe's subscription
//! fields, one row per subscription id).
//!
//! Rows only move forward: an upsert whose version is not newer than the row's changes
//! nothing, so replays and repeated batches are harmless.

use std::collections::HashMap;
use std::sync::Arc;

use aggregates::SubscriptionEvent;
use sqlx::{PgConnection, PgPool};

use crate::catalog::Catalog;
use crate::info::SubscriptionInfo;
use crate::log::{newest_per_aggregate, LoggedEvent};
use crate::runner::{Projection, ProjectionError};

#[derive(Clone)]
pub struct PlatformTables {
    catalog: Arc<Catalog>,
}

impl PlatformTables {
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

    /// The stored answer for the customer an org (or else a user) belongs to; the most
    /// recently updated one if several customers name it.
    pub async fn for_owner(
        pool: &PgPool,
        org_id: Option<&str>,
        user_id: Option<&str>,
    ) -> Result<Option<SubscriptionInfo>, sqlx::Error> {
        match (org_id, user_id) {
            (Some(org), _) => {
                Self::one(pool, "SELECT info FROM subscriptions WHERE org_id = $1 ORDER BY updated_at DESC LIMIT 1", org).await
            }
            (None, Some(user)) => {
                Self::one(pool, "SELECT info FROM subscriptions WHERE user_id = $1 ORDER BY updated_at DESC LIMIT 1", user).await
            }
            (None, None) => Ok(None),
        }
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
}

impl Projection for PlatformTables {
    fn name(&self) -> &'static str {
        "platform_tables"
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[LoggedEvent],
    ) -> Result<(), ProjectionError> {
        for logged in newest_per_aggregate(events) {
            let info = SubscriptionInfo::from_logged(logged, &self.catalog);
            sqlx::query(
                "INSERT INTO subscriptions (customer_id, org_id, user_id, subscription_id, status, price_id, \
                    current_period_end, info, version, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (customer_id) DO UPDATE SET org_id = EXCLUDED.org_id, user_id = EXCLUDED.user_id, \
                    subscription_id = EXCLUDED.subscription_id, status = EXCLUDED.status, price_id = EXCLUDED.price_id, \
                    current_period_end = EXCLUDED.current_period_end, info = EXCLUDED.info, \
                    version = EXCLUDED.version, updated_at = EXCLUDED.updated_at \
                 WHERE subscriptions.version < EXCLUDED.version",
            )
            .bind(&info.customer_id)
            .bind(&info.org_id)
            .bind(&info.user_id)
            .bind(&info.subscription_id)
            .bind(&info.status)
            .bind(&info.price_id)
            .bind(info.current_period_end)
            .bind(sqlx::types::Json(&info))
            .bind(info.version as i64)
            .bind(info.updated_at)
            .execute(&mut *tx)
            .await?;
        }

        // The mirror: the newest snapshot of each subscription in the batch.
        let mut newest: HashMap<&str, &LoggedEvent> = HashMap::new();
        for logged in events {
            // A reconciled snapshot (from Stripe's API) is a snapshot like any other here.
            if let SubscriptionEvent::SubscriptionChanged { subscription, .. }
            | SubscriptionEvent::SubscriptionReconciled { subscription, .. } = &logged.event
            {
                let slot = newest.entry(subscription.id.as_str()).or_insert(logged);
                if logged.sequence > slot.sequence {
                    *slot = logged;
                }
            }
        }
        for logged in newest.into_values() {
            let (SubscriptionEvent::SubscriptionChanged {
                subscription: s,
                source,
                ..
            }
            | SubscriptionEvent::SubscriptionReconciled {
                subscription: s,
                source,
                ..
            }) = &logged.event
            else {
                continue;
            };
            sqlx::query(
                "INSERT INTO merchant_subscriptions (subscription_id, customer_id, status, price_id, product_id, \
                    lookup_key, quantity, currency, created, current_period_start, current_period_end, \
                    cancel_at_period_end, cancel_at, canceled_at, ended_at, trial_start, trial_end, \
                    latest_invoice_id, stripe_event_id, stripe_created, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21) \
                 ON CONFLICT (subscription_id) DO UPDATE SET customer_id = EXCLUDED.customer_id, \
                    status = EXCLUDED.status, price_id = EXCLUDED.price_id, product_id = EXCLUDED.product_id, \
                    lookup_key = EXCLUDED.lookup_key, quantity = EXCLUDED.quantity, currency = EXCLUDED.currency, \
                    created = EXCLUDED.created, current_period_start = EXCLUDED.current_period_start, \
                    current_period_end = EXCLUDED.current_period_end, \
                    cancel_at_period_end = EXCLUDED.cancel_at_period_end, cancel_at = EXCLUDED.cancel_at, \
                    canceled_at = EXCLUDED.canceled_at, ended_at = EXCLUDED.ended_at, \
                    trial_start = EXCLUDED.trial_start, trial_end = EXCLUDED.trial_end, \
                    latest_invoice_id = EXCLUDED.latest_invoice_id, stripe_event_id = EXCLUDED.stripe_event_id, \
                    stripe_created = EXCLUDED.stripe_created, version = EXCLUDED.version \
                 WHERE merchant_subscriptions.version < EXCLUDED.version",
            )
            .bind(&s.id)
            .bind(&logged.aggregate_id)
            .bind(s.status.as_str())
            .bind(&s.price_id)
            .bind(&s.product_id)
            .bind(&s.lookup_key)
            .bind(s.quantity.map(|q| q as i64))
            .bind(&s.currency)
            .bind(s.created)
            .bind(s.current_period_start)
            .bind(s.current_period_end)
            .bind(s.cancel_at_period_end)
            .bind(s.cancel_at)
            .bind(s.canceled_at)
            .bind(s.ended_at)
            .bind(s.trial_start)
            .bind(s.trial_end)
            .bind(&s.latest_invoice_id)
            .bind(&source.stripe_event_id)
            .bind(source.created)
            .bind(logged.sequence as i64)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    async fn clear(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("TRUNCATE subscriptions, merchant_subscriptions")
            .execute(tx)
            .await?;
        Ok(())
    }
}
