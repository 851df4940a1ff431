//! The HTTP side of the metrics: `GET /metrics` (the gauges read fresh, then every metric
//! as Prometheus text) and the middleware that times each request by its matched route.
//!
//! What is measured and how it is labelled is [`crate::metrics`]; this module only
//! connects it to axum. Like the metrics, it must never change an answer: a failure to
//! measure is logged, never returned.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::metrics;

/// The route label of requests that matched no route, so that a scan of random paths
/// cannot create unbounded series.
const UNMATCHED: &str = "unmatched";

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

/// Axum middleware: request latency by matched route (requests that matched none are
/// counted under [`UNMATCHED`]).
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    metrics::http_request(
        &method,
        &route,
        response.status().as_str(),
        started.elapsed(),
    );
    response
}
