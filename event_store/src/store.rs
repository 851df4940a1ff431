//! One aggregate at a time, through postgres-es's own repository: load the history and
//! fold it, then commit new events with the version loaded (postgres-es inserts them in
//! one transaction; the primary key refuses them when another writer took a sequence
//! first). Never used for a batch of aggregates: see [`crate::batch`].

use std::sync::Arc;

use aggregates::{Subscription, SubscriptionEvent};
use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventStore};
use cqrs_es::{AggregateError, EventStore as _};
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;

use crate::{Metadata, StoreError};

/// The per-aggregate path to the log.
#[derive(Clone)]
pub struct EventStore {
    inner: Arc<PersistedEventStore<PostgresEventRepository, Subscription>>,
}

/// An aggregate as loaded: its state folded from the log and the version it is at. Hand
/// it back to [`EventStore::commit`] to append after exactly that version.
pub struct Loaded {
    context: EventStoreAggregateContext<Subscription>,
}

impl Loaded {
    pub fn state(&self) -> &Subscription {
        &self.context.aggregate
    }

    /// The sequence of the newest event folded in (0 for an aggregate with no events).
    pub fn version(&self) -> i64 {
        self.context.current_sequence as i64
    }
}

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        Self {
            inner: Arc::new(PersistedEventStore::new_event_store(
                PostgresEventRepository::new(pool),
            )),
        }
    }

    /// Loads one aggregate's whole history and folds it.
    pub async fn load(&self, aggregate_id: &str) -> Result<Loaded, StoreError> {
        let context = self
            .inner
            .load_aggregate(aggregate_id)
            .await
            .map_err(StoreError::Repository)?;
        Ok(Loaded { context })
    }

    /// Appends `events` after the version `loaded` is at, in one transaction.
    /// [`StoreError::Conflict`] when another writer appended first (nothing is written).
    pub async fn commit(
        &self,
        loaded: Loaded,
        events: Vec<SubscriptionEvent>,
        metadata: Metadata,
    ) -> Result<(), StoreError> {
        match self.inner.commit(events, loaded.context, metadata).await {
            Ok(_) => Ok(()),
            Err(AggregateError::AggregateConflict) => Err(StoreError::Conflict),
            Err(error) => Err(StoreError::Repository(error)),
        }
    }
}
