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
use serde::Serialize;

use super::auth::position_of;
use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::inbox::{InboxError, Received, Source};
use crate::metrics::RefusedAt;
use crate::stripe::{parse_event, parse_eventbridge, verify_signature, StripeEvent};
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
    description = "Verifies the `Stripe-Signature` (any of `STRIPE_WEBHOOK_SECRET`'s secrets, within the tolerance), stores the event in the inbox and answers; processing happens after. 2xx only once the event is stored; duplicates are acknowledged too. Snapshot events (`\"object\": \"event\"`) and thin events (`\"object\": \"v2.core.event\"`, `v1.*` types, whose object is fetched when processed) alike.",
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
#[utoipa::path(
    post, path = "/webhooks/eventbridge", tag = "webhooks",
    summary = "Amazon EventBridge API destination",
    description = "An EventBridge event from a Stripe event destination (`source` `aws.partner/stripe.com/…`), its `detail` the Stripe event (snapshot or thin). Authenticated by the header named by `SUBLEDGER_EVENTBRIDGE_HEADER` (default `x-subledger-eventbridge-secret`) holding one of `SUBLEDGER_EVENTBRIDGE_SECRET`'s secrets, compared in constant time. `detail` is stored in the same inbox as the webhook's events (deduplicated by event id). Nothing is stored on any refusal.",
    params(("x-subledger-eventbridge-secret" = String, Header, description = "The API destination connection's secret (the header's name is `SUBLEDGER_EVENTBRIDGE_HEADER`)", example = "eb-secret")),
    request_body(content = Object, content_type = "application/json", description = "An EventBridge event whose `detail` is a Stripe event",
        example = json!({"version": "0", "id": "17e8dff5-d6cd-3770-ace9-aeac02b6ac3f", "detail-type": "customer.subscription.updated", "source": "aws.partner/stripe.com/ed_test_61Sub", "account": "506417113029", "time": "2026-10-01T12:00:00Z", "region": "us-west-2", "resources": [], "detail": {"id": "evt_1NiQ6cL0xUzj0hVl", "object": "event", "type": "customer.subscription.updated", "created": 1764000000, "api_version": "2025-03-31.basil", "data": {"object": {"id": "sub_123", "object": "subscription", "customer": "cus_123", "status": "active"}}}})),
    responses(
        (status = 200, description = "Stored (`stored`, `ignored`) or already held (`duplicate`)", body = WebhookAck),
        (status = 400, description = "Not JSON, not Stripe's EventBridge event, or `detail` not a Stripe event (`invalid_event`), or a value Postgres refuses (`unstorable_event`)", body = ErrorBody),
        (status = 401, description = "The secret header is missing or matches no configured secret (`unauthorized`)", body = ErrorBody),
        (status = 408, description = "The body did not arrive within `SUBLEDGER_BODY_TIMEOUT_MS` (`body_timeout`)", body = ErrorBody),
        (status = 413, description = "Larger than `SUBLEDGER_MAX_BODY_BYTES` (`payload_too_large`)", body = ErrorBody),
        (status = 500, description = "No EventBridge secret configured (`not_configured`); EventBridge retries", body = ErrorBody),
        (status = 503, description = "The inbox could not store it (`storage_unavailable`) or too many connections; EventBridge retries", body = ErrorBody),
    ),
)]
pub async fn receive_eventbridge(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<WebhookAck>), ApiError> {
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
) -> Result<(StatusCode, Json<WebhookAck>), ApiError> {
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
        Json(WebhookAck {
            received: true,
            event_id: event.id.clone(),
            result: received,
        }),
    ))
}
