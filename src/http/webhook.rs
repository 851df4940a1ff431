//! `POST /webhooks/stripe`: verify, parse, store in the inbox, then answer.
//!
//! The answer is 2xx only after the event is durably stored; processing happens after,
//! in the inbox workers. This handler must never answer 2xx for an event it did not store.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use secrecy::ExposeSecret;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::inbox::{InboxError, Received};
use crate::metrics::RefusedAt;
use crate::stripe::{parse_event, verify_signature};
use crate::telemetry::{loggable_id, loggable_word};

pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(state.settings.max_body_bytes),
        _ => ApiError::InvalidParameter("body"),
    })?;
    let secrets: Vec<&str> = state
        .settings
        .webhook_secrets
        .iter()
        .map(|s| s.expose_secret())
        .collect();
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    verify_signature(
        signature,
        &body,
        &secrets,
        chrono::Utc::now().timestamp(),
        state.settings.signature_tolerance_secs,
    )?;
    let event = Arc::new(parse_event(&body)?);
    let received = match state.inbox.store(event.clone(), body).await {
        Ok(received) => received,
        // Permanent: a 400 that says why, counted and logged with the event's id (never
        // the refused value), instead of the 503 an outage gets.
        Err(InboxError::Refused(refused)) => {
            crate::metrics::webhook_refused(RefusedAt::Receipt, refused.refusal);
            tracing::warn!(
                event_id = %loggable_id(&event.id),
                reason = refused.refusal.as_str(),
                detail = %refused,
                "webhook refused: the event holds a value Postgres cannot store"
            );
            return Err(ApiError::UnstorableEvent(refused));
        }
        Err(error) => return Err(ApiError::Inbox(error)),
    };
    if received == Received::Stored {
        state.inbox_wake.wake_all();
    }
    crate::metrics::webhook_received(&event, received);
    // Only what looks like an id or a Stripe word reaches a line at info: a hostile or
    // odd payload could put personal data anywhere (crate::telemetry).
    tracing::info_span!(
        "webhook",
        event_id = %loggable_id(&event.id),
        event_type = %loggable_word(&event.event_type),
        customer_id = event
            .customer_id()
            .map(|id| loggable_id(&id).into_owned())
            .unwrap_or_default(),
        outcome = received.as_str(),
    )
    .in_scope(|| tracing::info!("webhook received"));
    Ok((
        StatusCode::OK,
        Json(json!({"received": true, "event_id": event.id, "result": received})),
    ))
}
