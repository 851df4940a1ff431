//! Read models rebuilt from the event log alone: the Redis cache (with the in-process
//! cache in front of it, `local_cache`), the platform
//! `subscriptions` table and the `merchant_subscriptions` mirror, plus the catalogue that
//! maps prices to plans, features and access.
//!
//! A projection reads the log through [`runner`], never the aggregate, and applies each
//! event idempotently (by aggregate version), so it can be replayed from position 0 at
//! any time. Nothing here decides what a Stripe fact means: the events already say it.

// The OpenAPI examples are large `json!` literals.
#![recursion_limit = "256"]

pub mod batch;
pub mod catalog;
pub mod feature;
pub mod info;
pub mod local_cache;
pub mod log;
pub mod platform;
pub mod redis_cache;
pub mod redis_conn;
pub mod runner;

pub use batch::{Answer, Events};
pub use catalog::{AccessPolicy, Catalog, CatalogError, Entitlement, OwnedSubscription, Plan};
pub use feature::FeatureAccess;
pub use info::{ItemInfo, LatestInvoice, PaymentMethod, SubscriptionEntry, SubscriptionInfo};
pub use local_cache::{LocalCache, LocalCacheConfig, Lookup};
pub use log::{LoggedEvent, Position};
pub use platform::{PlatformTables, StatusCount};
pub use redis_cache::{CacheKeys, Cached, Owner, RedisCache};
pub use redis_conn::{LazyConnection, RedisConn, RedisTarget};
pub use runner::{
    CatchUp, EventualProjection, Member, ProjectionError, Projections, TransactionalProjection,
    WhenBusy,
};

#[cfg(test)]
mod tests {
    use super::{EventualProjection, PlatformTables, RedisCache, TransactionalProjection};

    /// A projection's name is stored (its checkpoint row) and published (the `projection`
    /// label of `subledger_projection_lag_events`, `/readyz`, the alert tests and the
    /// runbook): renaming one would apply the whole log again under the new name and blind
    /// whatever watches the old one. So the names are pinned here, and only here.
    #[test]
    fn projection_names_are_stored_and_published_so_they_never_change() {
        assert_eq!(PlatformTables::NAME, "platform_tables");
        assert_eq!(RedisCache::NAME, "redis_cache");
    }
}
