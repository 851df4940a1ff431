//! `GET /readyz`: can this replica do its job right now, and how far behind is it?
//!
//! Checks Postgres, Redis and Stripe's API (a TCP connection to `STRIPE_API_BASE`'s host)
//! at once, each bounded by [`CHECK_TIMEOUT`], and reports the inbox depth and projection
//! lag. 503 when Postgres cannot be reached (nothing can be acknowledged); 200 `degraded`
//! when only Redis or Stripe cannot (webhooks are still stored, reads fall back to
//! Postgres). It must stay cheap (no Stripe request, no TLS) and never put an error's text
//! in its body: errors can carry connection details, so they are logged, not shown.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::AppState;

/// The longest any one check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ok`, `degraded` (Redis or Stripe unreachable) or `unavailable` (Postgres unreachable).
    #[schema(value_type = String, example = "ok")]
    pub status: &'static str,
    pub checks: Checks,
    /// Absent when Postgres cannot be reached.
    pub inbox: Option<crate::inbox::Depth>,
    /// Events each projection has still to apply; absent when Postgres cannot be reached.
    pub projections: Option<Vec<ProjectionLag>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Checks {
    pub postgres: Check,
    pub redis: Check,
    pub stripe: Check,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Check {
    pub reachable: bool,
    pub latency_ms: f64,
    /// `timeout` or `error` when not reachable (the detail is in the log).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub error: Option<&'static str>,
    /// What was checked, when it helps (Stripe's `host:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectionLag {
    #[schema(value_type = String)]
    pub name: &'static str,
    pub lag: i64,
}

/// Runs `check` within [`CHECK_TIMEOUT`], timing it and logging (never returning) its error.
async fn timed<E: std::error::Error + 'static>(
    what: &'static str,
    check: impl std::future::Future<Output = Result<(), E>>,
) -> Check {
    let start = Instant::now();
    let result = tokio::time::timeout(CHECK_TIMEOUT, check).await;
    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(error)) => {
            tracing::warn!(check = what, error = %crate::error_chain::error_chain(&error), "readiness check failed");
            Some("error")
        }
        Err(_) => {
            tracing::warn!(check = what, "readiness check timed out");
            Some("timeout")
        }
    };
    Check {
        reachable: error.is_none(),
        latency_ms,
        error,
        target: None,
    }
}

/// `host:port` of an `http(s)://` base URL (user info and path dropped); `None` when it is
/// not one.
pub fn host_port(base: &str) -> Option<(String, u16)> {
    let url = url::Url::parse(base).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    // The bare address for an IPv6 host (`Url::host_str` keeps its brackets).
    let host = match url.host()? {
        url::Host::Domain(name) => name.to_owned(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    };
    Some((host, url.port_or_known_default()?))
}

#[derive(Debug, thiserror::Error)]
#[error("STRIPE_API_BASE is not an http(s) URL")]
struct BadBase;

#[derive(Debug, thiserror::Error)]
enum StripeCheckError {
    #[error(transparent)]
    Base(#[from] BadBase),
    #[error("cannot connect")]
    Connect(#[from] std::io::Error),
}

#[utoipa::path(
    get, path = "/readyz", tag = "health",
    summary = "Can this replica do its job now?",
    description = "Postgres, Redis and Stripe reachability with latency, inbox depth and projection lag. No auth.",
    responses(
        (status = 200, description = "`ok`, or `degraded` when Redis or Stripe cannot be reached", body = Readiness),
        (status = 503, description = "Postgres cannot be reached (`unavailable`)", body = Readiness),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let target = host_port(&state.settings.stripe_api_base);
    let (postgres, redis, mut stripe) = tokio::join!(
        timed("postgres", crate::db::ping(&state.pool)),
        timed("redis", state.cache.ping()),
        timed("stripe", async {
            let (host, port) = target.clone().ok_or(BadBase)?;
            tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, StripeCheckError>(())
        }),
    );
    stripe.target = target.map(|(host, port)| format!("{host}:{port}"));

    let (inbox, projections) = if postgres.reachable {
        let depth = tokio::time::timeout(CHECK_TIMEOUT, crate::inbox::depth(&state.pool)).await;
        let mut lags = Vec::new();
        for name in state.projections.names() {
            if let Ok(Ok(lag)) =
                tokio::time::timeout(CHECK_TIMEOUT, state.projections.lag(name)).await
            {
                lags.push(ProjectionLag { name, lag });
            }
        }
        (depth.ok().and_then(Result::ok), Some(lags))
    } else {
        (None, None)
    };
    let (code, status) = if !postgres.reachable {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    } else if !redis.reachable || !stripe.reachable {
        (StatusCode::OK, "degraded")
    } else {
        (StatusCode::OK, "ok")
    };
    (
        code,
        Json(Readiness {
            status,
            checks: Checks {
                postgres,
                redis,
                stripe,
            },
            inbox,
            projections,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn stripe_base_urls_give_host_and_port() {
        let hp = |s| host_port(s).map(|(h, p)| format!("{h}:{p}"));
        assert_eq!(
            hp("https://api.stripe.com").as_deref(),
            Some("api.stripe.com:443")
        );
        assert_eq!(
            hp("http://127.0.0.1:12111/v1").as_deref(),
            Some("127.0.0.1:12111")
        );
        assert_eq!(
            hp("https://user:pw@host:8443/x").as_deref(),
            Some("host:8443")
        );
        assert_eq!(hp("http://[::1]:9/").as_deref(), Some("::1:9"));
        assert_eq!(hp("ftp://x"), None);
        assert_eq!(hp("api.stripe.com"), None);
        assert_eq!(hp("http://host:notaport"), None);
    }
}
