//! Storing events in the inbox: one at a time, many in one statement, and the webhook's
//! group commit.
//!
//! Recording is the only thing the webhook does before answering 2xx; a failure here is a
//! 5xx so Stripe retries. This module must never answer for an event it has not stored.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{InboxState, Outcome, Source};
use crate::stripe::{route, Route, StripeEvent};

/// Whether the event was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Received {
    /// Stored now, for the workers to process.
    Stored,
    /// Stored now and already finished: nothing in it for the aggregate (for example an
    /// event type we don't handle).
    Ignored,
    /// We already had this event id; nothing was done.
    Duplicate,
}

impl Received {
    /// In the order the metrics' help text lists them.
    pub const ALL: [Self; 3] = [Self::Stored, Self::Duplicate, Self::Ignored];

    pub const fn as_str(self) -> &'static str {
        match self {
            Received::Stored => "stored",
            Received::Ignored => "ignored",
            Received::Duplicate => "duplicate",
        }
    }
}

/// One event to store: the parsed event and the raw body it came in.
pub struct NewEvent<'a> {
    pub event: &'a StripeEvent,
    pub raw: &'a [u8],
    pub source: Source,
}

/// Stores an event. Idempotent on Stripe's event id.
pub async fn record(
    pool: &PgPool,
    event: &StripeEvent,
    raw: &[u8],
    source: Source,
) -> Result<Received, sqlx::Error> {
    let mut received = record_many(pool, &[NewEvent { event, raw, source }]).await?;
    Ok(received.pop().expect("one answer per event"))
}

/// Stores several events in one statement and one commit, answering for each in order.
/// Idempotent on Stripe's event id: an id already stored, or met earlier in `events`,
/// is a `Duplicate`. Either every event is stored or none is (the error).
pub async fn record_many(
    pool: &PgPool,
    events: &[NewEvent<'_>],
) -> Result<Vec<Received>, sqlx::Error> {
    let mut columns = Columns::default();
    // The answer each event gets if it is inserted; `None` for a repeat within `events`.
    let mut planned: Vec<Option<Received>> = Vec::with_capacity(events.len());
    let mut seen = HashSet::with_capacity(events.len());
    for NewEvent { event, raw, source } in events {
        if !seen.insert(event.id.as_str()) {
            planned.push(None);
            continue;
        }
        let (customer_id, state, outcome, detail) = match route(event) {
            Route::Command { customer_id, .. } => {
                (Some(customer_id), InboxState::Pending, None, None)
            }
            Route::Ignore { reason } => (
                event.customer_id(),
                InboxState::Done,
                Some(Outcome::Ignored),
                Some(reason),
            ),
        };
        planned.push(Some(match state {
            InboxState::Done => Received::Ignored,
            _ => Received::Stored,
        }));
        columns.event_id.push(event.id.clone());
        columns.event_type.push(event.event_type.clone());
        columns.api_version.push(event.api_version.clone());
        columns.livemode.push(event.livemode);
        columns.stripe_created.push(event.created);
        columns.customer_id.push(customer_id);
        columns
            .payload
            .push(String::from_utf8_lossy(raw).into_owned());
        columns.source.push(*source);
        columns.state.push(state);
        columns.outcome.push(outcome);
        columns.detail.push(detail);
    }
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO inbox (event_id, event_type, api_version, livemode, stripe_created, customer_id, payload, \
            source, state, outcome, detail, processed_at) \
         SELECT u.*, CASE WHEN u.state = $12 THEN now() END \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::timestamptz[], $6::text[], \
            $7::text[], $8::text[], $9::text[], $10::text[], $11::text[]) \
            AS u(event_id, event_type, api_version, livemode, stripe_created, customer_id, payload, \
            source, state, outcome, detail) \
         ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
    )
    .bind(&columns.event_id)
    .bind(&columns.event_type)
    .bind(&columns.api_version)
    .bind(&columns.livemode)
    .bind(&columns.stripe_created)
    .bind(&columns.customer_id)
    .bind(&columns.payload)
    .bind(&columns.source)
    .bind(&columns.state)
    .bind(&columns.outcome)
    .bind(&columns.detail)
    .bind(InboxState::Done)
    .fetch_all(pool)
    .await?;
    let inserted: HashSet<&str> = inserted.iter().map(String::as_str).collect();
    Ok(events
        .iter()
        .zip(planned)
        .map(|(new, planned)| match planned {
            Some(received) if inserted.contains(new.event.id.as_str()) => received,
            _ => Received::Duplicate,
        })
        .collect())
}

/// The inbox columns of a multi-row insert.
#[derive(Default)]
struct Columns {
    event_id: Vec<String>,
    event_type: Vec<String>,
    api_version: Vec<Option<String>>,
    livemode: Vec<bool>,
    stripe_created: Vec<DateTime<Utc>>,
    customer_id: Vec<Option<String>>,
    payload: Vec<String>,
    source: Vec<Source>,
    state: Vec<InboxState>,
    outcome: Vec<Option<Outcome>>,
    detail: Vec<Option<String>>,
}

/// Why the inbox could not store an event (answered 503, so Stripe retries).
#[derive(Debug, Clone, thiserror::Error)]
pub enum InboxError {
    /// The insert failed; every event of its batch gets this error.
    #[error("the inbox could not store the event")]
    Store(#[source] Arc<sqlx::Error>),
    /// The writer has stopped (the service is shutting down).
    #[error("the inbox writer has stopped")]
    Closed,
}

/// Most events stored by one insert.
const WRITE_BATCH: usize = 256;

/// Group commit for webhooks: requests hand their event to [`InboxWriter::store`], which
/// waits until the event is committed. Events that arrive while earlier inserts are
/// committing are stored together by the next insert, so under load many webhooks share
/// one statement and one WAL flush; alone, an event is stored at once. Nothing is
/// answered before its commit.
#[derive(Clone)]
pub struct InboxWriter {
    queue: mpsc::Sender<Queued>,
}

struct Queued {
    event: Arc<StripeEvent>,
    raw: bytes::Bytes,
    reply: oneshot::Sender<Result<Received, InboxError>>,
}

impl InboxWriter {
    /// Starts the writer with at most `concurrent` inserts in flight. It stops once every
    /// clone of the returned writer is dropped and the queued events are stored.
    pub fn start(pool: PgPool, concurrent: usize) -> Self {
        let (queue, mut incoming) = mpsc::channel::<Queued>(WRITE_BATCH * concurrent.max(1));
        let slots = Arc::new(Semaphore::new(concurrent.max(1)));
        tokio::spawn(async move {
            while let Some(first) = incoming.recv().await {
                // Wait for a free slot first: what queues meanwhile joins this batch.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < WRITE_BATCH {
                    match incoming.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let pool = pool.clone();
                tokio::spawn(async move {
                    let events: Vec<NewEvent> = batch
                        .iter()
                        .map(|q| NewEvent {
                            event: &q.event,
                            raw: &q.raw,
                            source: Source::Webhook,
                        })
                        .collect();
                    let stored = record_many(&pool, &events).await;
                    drop(events);
                    match stored {
                        Ok(received) => {
                            for (queued, received) in batch.into_iter().zip(received) {
                                let _ = queued.reply.send(Ok(received));
                            }
                        }
                        Err(error) => {
                            let error = InboxError::Store(Arc::new(error));
                            for queued in batch {
                                let _ = queued.reply.send(Err(error.clone()));
                            }
                        }
                    }
                    drop(slot);
                });
            }
        });
        Self { queue }
    }

    /// Stores a webhook's event; returns once it is committed (or could not be).
    pub async fn store(
        &self,
        event: Arc<StripeEvent>,
        raw: bytes::Bytes,
    ) -> Result<Received, InboxError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued { event, raw, reply })
            .await
            .map_err(|_| InboxError::Closed)?;
        answer.await.map_err(|_| InboxError::Closed)?
    }
}
