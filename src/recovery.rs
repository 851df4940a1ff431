//! Missed-event recovery: reads Stripe's Events API (`GET /v1/events`, which keeps 30
//! days) for the handled types and feeds what the inbox lacks into it, deduplicated by
//! event id, so an outage longer than Stripe's three days of retries, or a misconfigured
//! endpoint, no longer leaves state wrong until a reconcile happens to cover it.
//!
//! The poller reads from its checkpoint (table `recovery_checkpoint`, which this module
//! owns) minus an overlap, because Stripe may write an event a little after its `created`;
//! only events whose delivery has not succeeded (`delivery_success=false`). `subledger
//! events recover --since` reads every event of the handled types in a window, delivered
//! or not. Events recovered this way are counted (`subledger_events_recovered_total`): a
//! count that stays above zero means webhooks are not arriving.
//!
//! This module never judges an event: it stores it in the inbox (source `recovery`), and
//! the workers process it like any other.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::error_chain::error_chain;
use crate::inbox::{self, NewEvent, Received, Source};
use crate::stripe::client::{StripeApi, StripeApiError};
use crate::stripe::event::{event_from_value, HANDLED_TYPES};

/// How far before the checkpoint each pass reads again.
pub const OVERLAP: Duration = Duration::from_secs(10 * 60);

/// The checkpoint row's name.
const CHECKPOINT: &str = "stripe_events";

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("reading Stripe's events failed")]
    Stripe(#[from] StripeApiError),
    #[error("storage failed")]
    Database(#[from] sqlx::Error),
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Events Stripe listed.
    pub listed: u64,
    /// Of them, stored now: the inbox lacked them.
    pub recovered: u64,
    /// Listed events that could not be read or stored (logged).
    pub skipped: u64,
}

/// Reads Stripe's events into the inbox.
#[derive(Clone)]
pub struct Recovery {
    api: StripeApi,
    pool: PgPool,
    wake: Option<Arc<crate::worker::WorkerWake>>,
}

impl Recovery {
    pub fn new(api: StripeApi, pool: PgPool) -> Self {
        Self {
            api,
            pool,
            wake: None,
        }
    }

    /// Wakes these workers when something was recovered.
    pub fn waking(mut self, wake: Arc<crate::worker::WorkerWake>) -> Self {
        self.wake = Some(wake);
        self
    }

    /// Stores every handled event created since `since` that the inbox lacks (only the
    /// undelivered ones when `undelivered`). Returns what it did and the newest `created`
    /// listed.
    pub async fn recover_since(
        &self,
        since: DateTime<Utc>,
        undelivered: bool,
    ) -> Result<(RecoveryReport, Option<DateTime<Utc>>), RecoveryError> {
        let mut report = RecoveryReport::default();
        let mut newest: Option<DateTime<Utc>> = None;
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .api
                .list_events(
                    HANDLED_TYPES,
                    since.timestamp(),
                    undelivered,
                    cursor.as_deref(),
                )
                .await?
                .value;
            let mut events = Vec::with_capacity(page.data.len());
            for object in &page.data {
                report.listed += 1;
                let value = serde_json::Value::Object(object.clone());
                let raw = value.to_string().into_bytes();
                match event_from_value(value) {
                    Ok(event) => events.push((event, raw)),
                    Err(error) => {
                        report.skipped += 1;
                        tracing::warn!(error = %error, "unreadable event in Stripe's list");
                    }
                }
            }
            let new: Vec<NewEvent> = events
                .iter()
                .map(|(event, raw)| NewEvent {
                    event,
                    raw,
                    source: Source::Recovery,
                })
                .collect();
            for ((event, _), answer) in events
                .iter()
                .zip(inbox::record_many(&self.pool, &new).await?)
            {
                newest = newest.max(Some(event.created));
                match answer {
                    Ok(Received::Stored | Received::Ignored) => {
                        report.recovered += 1;
                        crate::metrics::event_recovered(&event.event_type);
                    }
                    Ok(Received::Duplicate) => {}
                    Err(refused) => {
                        report.skipped += 1;
                        tracing::warn!(
                            reason = refused.refusal.as_str(),
                            "a listed event cannot be stored"
                        );
                    }
                }
            }
            match (page.has_more, page.last_id()) {
                (true, Some(last)) => cursor = Some(last.to_owned()),
                _ => break,
            }
        }
        if report.recovered > 0 {
            tracing::warn!(
                recovered = report.recovered,
                "events recovered from Stripe's Events API"
            );
            if let Some(wake) = &self.wake {
                wake.wake_all();
            }
        }
        Ok((report, newest))
    }

    /// One poller pass: from the checkpoint (or, the first time, now) minus the overlap,
    /// undelivered events only; the checkpoint then moves to the newest event listed, or
    /// to when the pass began.
    pub async fn poll_once(&self) -> Result<RecoveryReport, RecoveryError> {
        let started = Utc::now();
        let checkpoint: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT created_through FROM recovery_checkpoint WHERE name = $1")
                .bind(CHECKPOINT)
                .fetch_optional(&self.pool)
                .await?;
        let from = checkpoint.unwrap_or(started) - OVERLAP;
        let (report, newest) = self.recover_since(from, true).await?;
        let through = newest.map_or(started, |newest| newest.max(started - OVERLAP));
        sqlx::query(
            "INSERT INTO recovery_checkpoint (name, created_through) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET created_through = \
                GREATEST(recovery_checkpoint.created_through, EXCLUDED.created_through), updated_at = now()",
        )
        .bind(CHECKPOINT)
        .bind(through)
        .execute(&self.pool)
        .await?;
        Ok(report)
    }

    /// Polls every `interval` until `stop`.
    pub async fn run_poller(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            if let Err(error) = self.poll_once().await {
                tracing::warn!(error = %error_chain(&error), "missed-event recovery pass failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}
