//! The read models as the API reads them: a customer's subscription and an org's or
//! user's entitlement, from Redis first and, on a miss or a Redis error, from the Postgres
//! tables, with the answer written back to Redis for next time. Every read is counted as
//! a cache hit, miss or fallback. The same handle brings the read models up to the end of
//! the log (through the `projections` runner), for the projection loop and for a caller
//! that must see its own write.
//!
//! "Redis" here includes each replica's in-process cache in front of it (`projections::
//! local_cache`), which the Redis projection's writes invalidate.
//!
//! An org's or user's answer is the union over every customer linked to it: one Redis
//! round trip (`HGETALL` of the owner's hash, which holds each linked customer's answer)
//! or, when the hash is missing or incomplete, the `subscriptions` rows linked to it, with
//! the hash filled. Redis is never trusted over Postgres: a cached answer in an owner's
//! hash that no longer links the customer to it is ignored.
//!
//! An owner's answer, as the API sends it (JSON), is kept beside the cached answers it was
//! judged from (`Judged`) and sent again while those are still what the cache holds and
//! the judgement still holds (`Catalog::entitlement_until`: until the first end of
//! access ahead), so a read of an unchanged owner neither judges nor serializes again.
//! Access is still decided for the instant of the read.
//!
//! This module must never decide what a Stripe fact means nor write a read model by hand:
//! the write-back stores what Postgres already holds (version-guarded), and catching up
//! runs the projections' own runner.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use projections::{
    Catalog, CatchUp, Entitlement, Owner, PlatformTables, ProjectionError, Projections, RedisCache,
    SubscriptionInfo, WhenBusy,
};
use sqlx::PgPool;

use crate::error_chain::error_chain;
use crate::metrics::{self, CacheRead, CacheWrite};

/// Events applied per projection transaction.
pub const PROJECTION_BATCH: i64 = 5000;

/// The handle handlers, the syncer and billing read through. Cheap to clone.
#[derive(Clone)]
pub struct Reads {
    pool: PgPool,
    cache: RedisCache,
    catalog: Arc<Catalog>,
    projections: Projections,
    /// Owners' answers as sent, by owner kind and id (see the module's header).
    judged: Arc<Mutex<JudgedOwners>>,
}

/// Most owners' answers kept as sent, and the most memory they may take (their bodies,
/// ids and the allocations of the answers they were judged from, which their `Weak`s keep
/// until replaced); past either, they are all dropped, and each is judged again on its
/// next read.
const JUDGED_CAPACITY: usize = 100_000;
const JUDGED_BYTES: usize = 32 * 1024 * 1024;

/// Owners' answers as sent: orgs', then users', by id.
#[derive(Default)]
struct JudgedOwners {
    by_kind: [HashMap<String, Judged>; 2],
    bytes: usize,
}

/// An owner's answer as sent, and what it was judged from.
struct Judged {
    /// The cached answers it was judged from, compared by address: the cache hands out
    /// the same `Arc` until it drops or replaces the entry, and a `Weak` keeps the address
    /// from being reused meanwhile.
    from: Weak<[SubscriptionInfo]>,
    /// The judgement holds before this instant (`None`: for ever).
    holds_until: Option<DateTime<Utc>>,
    body: Bytes,
    /// What it counts towards [`JUDGED_BYTES`].
    size: usize,
}

impl Reads {
    pub fn new(
        pool: PgPool,
        cache: RedisCache,
        catalog: Arc<Catalog>,
        projections: Projections,
    ) -> Self {
        Self {
            pool,
            cache,
            catalog,
            projections,
            judged: Arc::default(),
        }
    }

    /// An org's or user's entitlement as the API sends it (JSON), judged at the instant of
    /// the read: [`Reads::org_entitlement`]'s answer, serialized, or the same bytes sent
    /// before when they were judged from the answers the cache still holds and the
    /// judgement still holds now.
    pub async fn entitlement_body(&self, owner: Owner, id: &str) -> Result<Bytes, sqlx::Error> {
        let infos = self.owner(owner, id).await?;
        let now = Utc::now();
        let kind = match owner {
            Owner::Org => 0,
            Owner::User => 1,
        };
        let same = |judged: &Judged| {
            std::ptr::eq(judged.from.as_ptr(), Arc::as_ptr(&infos))
                && judged.holds_until.is_none_or(|until| now < until)
        };
        if let Some(judged) = self.lock_judged().by_kind[kind].get(id).filter(|j| same(j)) {
            return Ok(judged.body.clone());
        }
        let (org_id, user_id) = match owner {
            Owner::Org => (Some(id), None),
            Owner::User => (None, Some(id)),
        };
        let (entitlement, holds_until) =
            self.catalog.entitlement_until(org_id, user_id, &infos, now);
        let body = Bytes::from(
            serde_json::to_vec(&entitlement).expect("an entitlement always serializes"),
        );
        let size = id.len() + body.len() + std::mem::size_of_val::<[SubscriptionInfo]>(&infos);
        let mut judged = self.lock_judged();
        let held = judged.by_kind.iter().map(HashMap::len).sum::<usize>();
        if held >= JUDGED_CAPACITY || judged.bytes + size > JUDGED_BYTES {
            *judged = JudgedOwners::default();
        }
        judged.bytes += size;
        let replaced = judged.by_kind[kind].insert(
            id.to_owned(),
            Judged {
                from: Arc::downgrade(&infos),
                holds_until,
                body: body.clone(),
                size,
            },
        );
        if let Some(replaced) = replaced {
            judged.bytes -= replaced.size;
        }
        Ok(body)
    }

    fn lock_judged(&self) -> std::sync::MutexGuard<'_, JudgedOwners> {
        self.judged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The catalogue answers are judged against.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Brings every read model up to the end of the log through the projections' runner
    /// (those whose checkpoints stand together read each batch once). `progress` is
    /// called with a projection's name and the events it applied so far.
    pub async fn catch_up(
        &self,
        when_busy: WhenBusy,
        progress: impl FnMut(&str, u64) + Send,
    ) -> Result<Vec<CatchUp>, ProjectionError> {
        self.projections
            .catch_up(PROJECTION_BATCH, when_busy, progress)
            .await
    }

    /// Waits until the read models have applied `customer_id`'s events up to `version`,
    /// at most `within`; woken by the runner's published progress, never on a fixed
    /// interval. `Ok(false)` when time ran out.
    pub async fn wait_until_applied(
        &self,
        customer_id: &str,
        version: u64,
        within: std::time::Duration,
    ) -> Result<bool, ProjectionError> {
        self.projections
            .wait_until_applied(customer_id, version, within)
            .await
    }

    /// A customer's subscription (its plan named from the catalogue), or `None` when we
    /// hold nothing for that customer. Fails only when Postgres has to be read and cannot.
    pub async fn customer(
        &self,
        customer_id: &str,
    ) -> Result<Option<SubscriptionInfo>, sqlx::Error> {
        let info = match self.cache.customer(customer_id).await {
            Ok(Some(info)) => {
                metrics::cache_read(CacheRead::Hit);
                Some(info)
            }
            Ok(None) => {
                metrics::cache_read(CacheRead::Miss);
                self.customer_in_table(customer_id).await?
            }
            Err(error) => {
                metrics::cache_read(CacheRead::Fallback);
                tracing::warn!(%error, "cache read failed; reading Postgres");
                self.customer_in_table(customer_id).await?
            }
        };
        Ok(info.map(|mut info| {
            info.resolve(&self.catalog, chrono::Utc::now());
            info
        }))
    }

    async fn customer_in_table(
        &self,
        customer_id: &str,
    ) -> Result<Option<SubscriptionInfo>, sqlx::Error> {
        let info = PlatformTables::customer(&self.pool, customer_id).await?;
        Ok(self.read_through(info).await)
    }

    /// What an org is entitled to now: the union over every customer linked to it.
    pub async fn org_entitlement(&self, org_id: &str) -> Result<Entitlement, sqlx::Error> {
        let infos = self.owner(Owner::Org, org_id).await?;
        Ok(self
            .catalog
            .entitlement(Some(org_id), None, &infos, chrono::Utc::now()))
    }

    /// What a user is entitled to now: the union over every customer linked to it.
    pub async fn user_entitlement(&self, user_id: &str) -> Result<Entitlement, sqlx::Error> {
        let infos = self.owner(Owner::User, user_id).await?;
        Ok(self
            .catalog
            .entitlement(None, Some(user_id), &infos, chrono::Utc::now()))
    }

    /// Every customer that ever named the org, deleted ones included, as the
    /// `subscriptions` table holds them, Redis skipped: for decisions that must not rest
    /// on a cached value (billing's one live subscription per org, and never reusing a
    /// deleted customer).
    pub async fn org_in_table(&self, org_id: &str) -> Result<Vec<SubscriptionInfo>, sqlx::Error> {
        let mut infos = PlatformTables::named_by_org(&self.pool, org_id).await?;
        for info in &mut infos {
            info.resolve(&self.catalog, chrono::Utc::now());
        }
        Ok(infos)
    }

    /// The answers of every customer linked to an owner: one Redis round trip (the
    /// owner's hash) when it is complete; otherwise Postgres, and the hash filled. Only
    /// when Postgres cannot be read is an incomplete hash answered (better than no answer
    /// during an outage, and counted as a fallback); with nothing cached the error stands.
    async fn owner(&self, owner: Owner, id: &str) -> Result<Arc<[SubscriptionInfo]>, sqlx::Error> {
        let (failed, partial) = match self.cache.owner(owner, id).await {
            Ok((true, infos)) => {
                metrics::cache_read(CacheRead::Hit);
                return Ok(infos);
            }
            Ok((false, partial)) => (false, partial),
            Err(error) => {
                tracing::warn!(%error, "cache read failed; reading Postgres");
                (true, Arc::from([]))
            }
        };
        let infos = match PlatformTables::linked_to(&self.pool, owner, id).await {
            Ok(infos) => infos,
            Err(error) if !partial.is_empty() => {
                metrics::cache_read(CacheRead::Fallback);
                tracing::warn!(
                    error = %error_chain(&error),
                    "Postgres unavailable; answering from an incomplete cached owner"
                );
                return Ok(partial);
            }
            Err(error) => return Err(error),
        };
        metrics::cache_read(if failed {
            CacheRead::Fallback
        } else {
            CacheRead::Miss
        });
        if !failed {
            if let Err(error) = self.cache.fill_owner(owner, id, &infos).await {
                metrics::cache_write_failed(CacheWrite::ReadThrough);
                tracing::warn!(error = %error_chain(&error), "cache write-back failed");
            }
        }
        Ok(infos.into())
    }

    /// Writes what Postgres answered back to Redis. A failure only costs the next read a
    /// trip to Postgres, so it is counted and logged, never returned.
    async fn read_through(&self, info: Option<SubscriptionInfo>) -> Option<SubscriptionInfo> {
        if let Some(info) = &info {
            if let Err(error) = self.cache.put(info).await {
                metrics::cache_write_failed(CacheWrite::ReadThrough);
                tracing::warn!(error = %error_chain(&error), "cache write-back failed");
            }
        }
        info
    }
}
