//! Operator endpoints (`/ops`, admin token): the dead-letter queue as JSON, and re-driving
//! it. They change no outcome themselves: a re-driven row goes back to the inbox workers.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::params::valid_id;
use super::{ApiError, AppState};
use crate::inbox::{self, DeadLetter, Redrive};

/// `GET /ops/dead-letters`.
pub async fn dead_letters(
    State(state): State<AppState>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let letters = inbox::dead_letters(&state.pool, None)
        .await
        .map_err(ApiError::storage)?;
    Ok(Json(letters.into_iter().map(DeadLetter::from).collect()))
}

async fn redrive(state: &AppState, which: Redrive) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({ "requeued": requeued })))
}

/// `POST /ops/dead-letters/{event_id}/retry`: 404 when that event is not dead-lettered.
pub async fn retry_one(
    State(state): State<AppState>,
    Path(event_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    valid_id(&event_id, "event id")?;
    redrive(&state, Redrive::One(event_id)).await
}

/// `POST /ops/dead-letters/retry`: every dead letter.
pub async fn retry_all(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    redrive(&state, Redrive::All).await
}
