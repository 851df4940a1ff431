//! `POST /webhooks/stripe` and `POST /webhooks/eventbridge`: authenticate, parse, store in
//! the inbox, then answer.
//!
//! The answer is 2xx only after the event is durably stored; processing happens after,
//! in the inbox workers. A Stripe webhook is authenticated by its `Stripe-Signature`; an
//! EventBridge API destination carries no Stripe signature, so it is authenticated by a
//! header secret of the operator's choice, compared in constant time, and refused while
//! none is configured. Both paths store the Stripe event (snapshot or thin) the same way.
//! This handler must never answer 2xx for an event it did not store, and never stores
//! anything for a request it refuses.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use secrecy::ExposeSecret;
use serde_json::{json, Value};

use super::auth::position_of;
use super::{ApiError, AppState};
use crate::inbox::{InboxError, Received, Source};
use crate::metrics::RefusedAt;
use crate::stripe::{parse_event, parse_eventbridge, verify_signature, StripeEvent};
use crate::telemetry::{loggable_id, loggable_word};

pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = whole_body(&state, body)?;
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
    accept(&state, event, body, Source::Webhook).await
}

/// `POST /webhooks/eventbridge`: an Amazon EventBridge API destination delivering the
/// events of a Stripe event destination. 500 while `SUBLEDGER_EVENTBRIDGE_SECRET` is unset
/// (as the webhook without its secret); 401 when the header is missing or matches none of
/// the secrets; 400 when the body is not an EventBridge event from Stripe whose `detail`
/// is a Stripe event; 413 too large. Only `detail` is stored.
pub async fn receive_eventbridge(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if state.settings.eventbridge_secrets.is_empty() {
        return Err(ApiError::NoEventBridgeSecret);
    }
    let presented = headers
        .get(state.settings.eventbridge_header.as_str())
        .and_then(|v| v.to_str().ok());
    // Every configured secret is compared, each in constant time (`auth::position_of`).
    if presented
        .and_then(|presented| position_of(&state.settings.eventbridge_secrets, presented))
        .is_none()
    {
        return Err(ApiError::Unauthorized);
    }
    let body = whole_body(&state, body)?;
    let (event, detail) = parse_eventbridge(&body)?;
    accept(
        &state,
        Arc::new(event),
        Bytes::from(detail),
        Source::EventBridge,
    )
    .await
}

/// The body, or the error its rejection deserves (413 past the limit).
fn whole_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(state.settings.max_body_bytes),
        _ => ApiError::InvalidParameter("body"),
    })
}

/// Stores an authenticated, parsed event (`raw` is the Stripe event's own JSON) and
/// answers once it is committed.
async fn accept(
    state: &AppState,
    event: Arc<StripeEvent>,
    raw: Bytes,
    source: Source,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let received = match state.inbox.store_from(event.clone(), raw, source).await {
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
        source = source.as_str(),
        outcome = received.as_str(),
    )
    .in_scope(|| tracing::info!("webhook received"));
    Ok((
        StatusCode::OK,
        Json(json!({"received": true, "event_id": event.id, "result": received})),
    ))
}
