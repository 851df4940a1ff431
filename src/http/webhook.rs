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
use serde::Serialize;

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::inbox::{InboxError, Received};
use crate::metrics::RefusedAt;
use crate::stripe::{parse_event, verify_signature};
use crate::telemetry::{loggable_id, loggable_word};

/// The acknowledgement Stripe gets once the event is stored.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"received": true, "event_id": "evt_1NiQ6cL0xUzj0hVl", "result": "stored"}))]
pub struct WebhookAck {
    /// Always `true`: the event is durably stored (or was already).
    pub received: bool,
    pub event_id: String,
    pub result: Received,
}

#[utoipa::path(
    post, path = "/webhooks/stripe", tag = "webhooks",
    summary = "Stripe's webhook endpoint",
    description = "Verifies the `Stripe-Signature` (any of `STRIPE_WEBHOOK_SECRET`'s secrets, within the tolerance), stores the event in the inbox and answers; processing happens after. 2xx only once the event is stored; duplicates are acknowledged too.",
    params(("stripe-signature" = String, Header, description = "Stripe's signature header: `t=<unix time>,v1=<hex HMAC-SHA256 of \"t.body\">`", example = "t=1764000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd")),
    request_body(content = Object, content_type = "application/json", description = "A Stripe event, as Stripe sends it",
        example = json!({"id": "evt_1NiQ6cL0xUzj0hVl", "object": "event", "type": "customer.subscription.updated", "created": 1764000000, "api_version": "2025-03-31.basil", "data": {"object": {"id": "sub_123", "object": "subscription", "customer": "cus_123", "status": "active"}}})),
    responses(
        (status = 200, description = "Stored (`stored`, `ignored`) or already held (`duplicate`)", body = WebhookAck),
        (status = 400, description = "A missing, stale or wrong signature (`invalid_signature`), a body that is not a Stripe event (`invalid_event`), or a value Postgres refuses (`unstorable_event`)", body = ErrorBody),
        (status = 408, description = "The body did not arrive within `SUBLEDGER_BODY_TIMEOUT_MS` (`body_timeout`)", body = ErrorBody),
        (status = 413, description = "Larger than `SUBLEDGER_MAX_BODY_BYTES` (`payload_too_large`)", body = ErrorBody),
        (status = 500, description = "No signing secret configured (`not_configured`); Stripe retries", body = ErrorBody),
        (status = 503, description = "The inbox could not store it (`storage_unavailable`) or too many connections; Stripe retries", body = ErrorBody),
    ),
)]
pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<WebhookAck>), ApiError> {
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
        Json(WebhookAck {
            received: true,
            event_id: event.id.clone(),
            result: received,
        }),
    ))
}
