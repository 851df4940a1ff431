//! The HTTP side of the metrics: `GET /metrics` (the gauges read fresh, then every metric
//! as Prometheus text). Each request is timed by its matched route in `layers::Observe`.
//!
//! What is measured and how it is labelled is [`crate::metrics`]; this module only
//! connects it to axum. Like the metrics, it must never change an answer: a failure to
//! measure is logged, never returned.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

use super::AppState;
use crate::metrics;

/// `GET /metrics`.
#[utoipa::path(
    get, path = "/metrics", tag = "health",
    summary = "Prometheus metrics",
    description = "Every metric in Prometheus' text format (docs/operations.md). No auth.",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain", body = String)),
)]
pub async fn scrape(State(state): State<AppState>) -> impl IntoResponse {
    metrics::refresh_gauges(&state.pool, &state.projections, &state.cache).await;
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(),
    )
}
