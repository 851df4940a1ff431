//! The inbox: every Stripe event we acknowledge, stored durably (keyed by Stripe's event
//! id) before we answer, with its raw payload and what processing made of it.
//!
//! Recording is the only thing the webhook does before answering 2xx; a failure here is a
//! 5xx so Stripe retries. This module must never answer for an event it has not stored.

use serde::Serialize;
use sqlx::PgPool;

use crate::stripe::{route, Route, StripeEvent};

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Webhook,
    Import,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::Import => "import",
        }
    }
}

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
    pub fn as_str(self) -> &'static str {
        match self {
            Received::Stored => "stored",
            Received::Ignored => "ignored",
            Received::Duplicate => "duplicate",
        }
    }
}

/// Stores an event. Idempotent on Stripe's event id.
pub async fn record(
    pool: &PgPool,
    event: &StripeEvent,
    raw: &[u8],
    source: Source,
) -> Result<Received, sqlx::Error> {
    let (customer_id, state, outcome, detail) = match route(event) {
        Route::Command { customer_id, .. } => (Some(customer_id), "pending", None, None),
        Route::Ignore { reason } => (event.customer_id(), "done", Some("ignored"), Some(reason)),
    };
    let inserted = sqlx::query(
        "INSERT INTO inbox (event_id, event_type, api_version, livemode, stripe_created, customer_id, payload, \
            source, state, outcome, detail, processed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, CASE WHEN $9 = 'done' THEN now() END) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(&event.api_version)
    .bind(event.livemode)
    .bind(event.created)
    .bind(&customer_id)
    .bind(String::from_utf8_lossy(raw).as_ref())
    .bind(source.as_str())
    .bind(state)
    .bind(outcome)
    .bind(detail)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(match (inserted, state) {
        (0, _) => Received::Duplicate,
        (_, "done") => Received::Ignored,
        _ => Received::Stored,
    })
}
