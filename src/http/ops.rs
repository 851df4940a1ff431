//! Operator endpoints (`/ops`, admin token): the dead-letter queue as JSON, and re-driving
//! it. They change no outcome themselves: a re-driven row goes back to the inbox workers.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;

use super::error::ErrorBody;
use super::params::valid_id;
use super::{ApiError, AppState};
use crate::inbox::{self, DeadLetter, Redrive};

/// What a re-drive put back in the inbox.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"requeued": ["evt_1NiQ6cL0xUzj0hVl"]}))]
pub struct Requeued {
    /// The Stripe event ids put back, oldest first.
    pub requeued: Vec<String>,
}

/// `GET /ops/dead-letters`.
#[utoipa::path(
    get, path = "/ops/dead-letters", tag = "operations",
    summary = "The dead-letter queue",
    description = "Inbox rows whose processing failed `SUBLEDGER_MAX_ATTEMPTS` times, oldest first, with their last error.",
    responses(
        (status = 200, description = "The dead letters", body = Vec<DeadLetter>),
        (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody),
        (status = 503, description = "Postgres unavailable (`storage_unavailable`)", body = ErrorBody),
    ),
    security(("admin_token" = [])),
)]
pub async fn dead_letters(
    State(state): State<AppState>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let letters = inbox::dead_letters(&state.pool, None)
        .await
        .map_err(ApiError::storage)?;
    Ok(Json(letters.into_iter().map(DeadLetter::from).collect()))
}

async fn redrive(state: &AppState, which: Redrive) -> Result<Json<Requeued>, ApiError> {
    let requeued = inbox::redrive(&state.pool, &which)
        .await
        .map_err(ApiError::storage)?;
    if let (Redrive::One(event_id), true) = (&which, requeued.is_empty()) {
        return Err(ApiError::NotFound(format!("dead letter {event_id}")));
    }
    if !requeued.is_empty() {
        state.inbox_wake.wake_all();
    }
    tracing::info!(count = requeued.len(), "dead letters re-driven");
    Ok(Json(Requeued { requeued }))
}

/// `POST /ops/dead-letters/{event_id}/retry`: 404 when that event is not dead-lettered.
#[utoipa::path(
    post, path = "/ops/dead-letters/{event_id}/retry", tag = "operations",
    summary = "Re-drive one dead letter",
    description = "Puts the row back in the inbox with a fresh attempt budget; the workers process it.",
    params(("event_id" = String, Path, description = "The dead letter's Stripe event id", example = "evt_1NiQ6cL0xUzj0hVl", pattern = "^[A-Za-z0-9_-]{1,255}$")),
    responses(
        (status = 200, description = "Re-queued", body = Requeued),
        (status = 400, description = "A malformed id (`invalid_parameter`)", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "That event is not a dead letter (`not_found`)", body = ErrorBody),
        (status = 503, description = "Postgres unavailable (`storage_unavailable`)", body = ErrorBody),
    ),
    security(("admin_token" = [])),
)]
pub async fn retry_one(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Requeued>, ApiError> {
    let Path(event_id) = path?;
    valid_id(&event_id, "event id")?;
    redrive(&state, Redrive::One(event_id)).await
}

/// `POST /ops/dead-letters/retry`: every dead letter.
#[utoipa::path(
    post, path = "/ops/dead-letters/retry", tag = "operations",
    summary = "Re-drive every dead letter",
    responses(
        (status = 200, description = "Re-queued (possibly none)", body = Requeued),
        (status = 401, description = "No token, or not a valid one (`unauthorized`)", body = ErrorBody),
        (status = 503, description = "Postgres unavailable (`storage_unavailable`)", body = ErrorBody),
    ),
    security(("admin_token" = [])),
)]
pub async fn retry_all(State(state): State<AppState>) -> Result<Json<Requeued>, ApiError> {
    redrive(&state, Redrive::All).await
}
