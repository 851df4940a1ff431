//! The event log: the only code in the repository whose SQL names the `events` table.
//!
//! The table is postgres-es's own (same columns, same primary key, same JSON), plus
//! `global_seq`, `tx_id` and `recorded_at`, which postgres-es never names and the database
//! fills in. Three ways in:
//! - [`EventStore`]: one aggregate at a time through postgres-es itself (load, then commit
//!   with the version loaded), for commands that arrive one by one (syncs, checkout).
//! - [`batch`]: many aggregates inside a caller's transaction: their histories after known
//!   versions in one query, and all their new events in one multi-row insert, written
//!   exactly as postgres-es writes them. postgres-es commits one aggregate per
//!   transaction; the inbox workers need one insert per batch inside the transaction that
//!   claimed the batch, so this path owns its SQL, and a test proves postgres-es loads
//!   every row it writes as its own.
//! - [`read`]: the log in its gap-free global order for projections, and the few lookups
//!   operators need (one customer's history, every aggregate id).
//!
//! The primary key (aggregate type, id, sequence) is the optimistic-concurrency check on
//! every path: an event whose sequence another writer took first is refused, and that is
//! reported as [`StoreError::Conflict`]. This crate must never decide anything (that is
//! the aggregate's `decide`), never update or delete an event, and never hold a position
//! that could skip an event committed late (see [`read`]).

pub mod arguments;
pub mod batch;
pub mod hand_over;
pub mod read;
pub mod recent;
mod store;

use aggregates::{SubscriptionError, SubscriptionEvent};
use cqrs_es::AggregateError;
use serde::{Deserialize, Serialize};

pub use store::{EventStore, Loaded};

/// What every stored event carries besides its payload: which Stripe events (or API
/// reads) it came from.
pub type Metadata = std::collections::HashMap<String, String>;

/// A place in the log: the (`tx_id`, `global_seq`) of an event. `Position::default()` is
/// before the first event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub tx_id: u64,
    pub global_seq: i64,
}

/// One stored event with its place in the log.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub aggregate_id: String,
    /// The aggregate version after this event (cqrs-es sequence, from 1).
    pub sequence: u64,
    pub position: Position,
    pub event: SubscriptionEvent,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to one of the aggregates first: the events decided here
    /// were decided against a state that is no longer the newest. Nothing was written.
    #[error("another writer appended to the aggregate first")]
    Conflict,
    #[error("the event log failed")]
    Database(#[from] sqlx::Error),
    /// postgres-es failed (its connection, or an event it could not read back).
    #[error(transparent)]
    Repository(AggregateError<SubscriptionError>),
    #[error("event {aggregate_id}#{sequence} cannot be encoded or decoded")]
    Json {
        aggregate_id: String,
        sequence: i64,
        #[source]
        source: serde_json::Error,
    },
    #[error("the history of {0} has a gap at #{1}")]
    Gap(String, i64),
    /// This process holds {0} at version {1}, which the log no longer holds (see
    /// `batch::load_many`): nothing was written.
    #[error("the log no longer holds {0}#{1}, which this process held: it lost its newest events (a restore or a failover)")]
    Behind(String, i64),
    #[error("the log returned a malformed transaction id {0:?}")]
    TxId(String),
}

impl StoreError {
    /// The Postgres error behind this one, if there is one (postgres-es boxes its own), so
    /// that a caller can tell a refused value from an outage.
    pub fn database_error(&self) -> Option<&sqlx::Error> {
        match self {
            StoreError::Database(error) => Some(error),
            StoreError::Repository(
                AggregateError::DatabaseConnectionError(error)
                | AggregateError::UnexpectedError(error),
            ) => error.downcast_ref::<sqlx::Error>(),
            _ => None,
        }
    }

    /// A Postgres error, with a primary-key violation on `events` read as a conflict.
    fn from_insert(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(e) if e.is_unique_violation() => StoreError::Conflict,
            _ => StoreError::Database(error),
        }
    }
}

/// Decodes a stored payload (JSON text), naming the event when it cannot.
pub fn decode_payload<T: serde::de::DeserializeOwned>(
    payload: &str,
    aggregate_id: &str,
    sequence: i64,
) -> Result<T, StoreError> {
    serde_json::from_str(payload).map_err(|source| StoreError::Json {
        aggregate_id: aggregate_id.to_owned(),
        sequence,
        source,
    })
}
