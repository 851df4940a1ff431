//! Read models rebuilt from the event log alone: the Redis cache, the platform
//! `subscriptions` table and the `merchant_subscriptions` mirror, plus the catalogue that
//! maps prices to plans, features and access.
//!
//! A projection reads the log through [`runner`], never the aggregate, and applies each
//! event idempotently (by aggregate version), so it can be replayed from position 0 at
//! any time. Nothing here decides what a Stripe fact means: the events already say it.

pub mod catalog;
pub mod info;
pub mod log;
pub mod platform;
pub mod redis_cache;
pub mod runner;

pub use catalog::{Catalog, CatalogError, Entitlement};
pub use info::{LatestInvoice, SubscriptionInfo};
pub use log::{LoggedEvent, Position};
pub use platform::PlatformTables;
pub use redis_cache::{CacheKeys, LazyConnection, RedisCache};
pub use runner::{
    catch_up, catch_up_pair, rebuild_pair, replay, Projection, ProjectionError, WhenBusy,
};
