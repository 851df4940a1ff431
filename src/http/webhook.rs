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
use crate::inbox::Received;
use crate::stripe::{parse_event, verify_signature};

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
    let received = state
        .inbox
        .store(event.clone(), body)
        .await
        .map_err(ApiError::Inbox)?;
    if received == Received::Stored {
        state.inbox_wake.wake_all();
    }
    crate::metrics::webhook_received(&event, received);
    tracing::info_span!(
        "webhook",
        event_id = event.id,
        event_type = event.event_type,
        customer_id = event.customer_id().unwrap_or_default(),
        outcome = received.as_str(),
    )
    .in_scope(|| tracing::info!("webhook received"));
    Ok((
        StatusCode::OK,
        Json(json!({"received": true, "event_id": event.id, "result": received})),
    ))
}
