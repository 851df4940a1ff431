//! `subledger stripe setup` and `subledger stripe check`, and the server's periodic check
//! whose last result `/readyz` reports: the account's webhook endpoints against what
//! subledger handles (`stripe::endpoints`).
//!
//! Setup creates an endpoint only when none points at the URL, so it is safe to re-run;
//! the signing secret is printed once, by the caller, from the creation's answer (Stripe
//! never shows it again). This module never changes an existing endpoint: a wrong one is
//! reported for an operator to fix, because an endpoint may be shared with other systems.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{watch, RwLock};

use crate::error_chain::error_chain;
use crate::stripe::client::{StripeApi, StripeApiError};
use crate::stripe::endpoints::{check, CheckReport};
use crate::stripe::event::HANDLED_TYPES;
use crate::stripe::transport::API_VERSION;

/// What `setup` did.
#[derive(Debug)]
pub enum Setup {
    /// Created: its id and the signing secret (shown by Stripe this once).
    Created { id: String, secret: Option<String> },
    /// An endpoint already points at the URL: how it compares.
    Exists(CheckReport),
}

/// Creates the endpoint at `url` (exactly the handled types, the pinned version) unless
/// one points there already.
pub async fn setup(api: &StripeApi, url: &str) -> Result<Setup, StripeApiError> {
    let endpoints = api.list_webhook_endpoints().await?;
    let report = check(&endpoints, Some(url));
    if !report.endpoints.is_empty() {
        return Ok(Setup::Exists(report));
    }
    let created = api
        .create_webhook_endpoint(url, HANDLED_TYPES, API_VERSION)
        .await?;
    let text = |field: &str| {
        created
            .get(field)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    Ok(Setup::Created {
        id: text("id").unwrap_or_default(),
        secret: text("secret"),
    })
}

/// Lists the account's endpoints and judges them (`url`: only those pointing there).
pub async fn check_endpoints(
    api: &StripeApi,
    url: Option<&str>,
) -> Result<CheckReport, StripeApiError> {
    Ok(check(&api.list_webhook_endpoints().await?, url))
}

/// The last result of the server's check, as `/readyz` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LastCheck {
    pub checked_at: DateTime<Utc>,
    /// Every endpoint right and at least one present.
    pub ok: bool,
    /// What is wrong, one sentence each (or why the check could not run).
    pub problems: Vec<String>,
}

/// Shared between the checker and `/readyz`.
pub type LastCheckCell = Arc<RwLock<Option<LastCheck>>>;

/// Checks the endpoints now and every `interval` until `stop`, keeping the last result.
pub async fn run_checker(
    api: StripeApi,
    interval: Duration,
    cell: LastCheckCell,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let result = match check_endpoints(&api, None).await {
            Ok(report) => LastCheck {
                checked_at: Utc::now(),
                ok: report.ok(),
                problems: report.all_problems(),
            },
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "webhook endpoint check failed");
                LastCheck {
                    checked_at: Utc::now(),
                    ok: false,
                    problems: vec![format!(
                        "the endpoints could not be listed ({})",
                        match &error {
                            StripeApiError::Refused { status, .. } =>
                                format!("Stripe answered {status}"),
                            _ => "Stripe could not be reached".to_owned(),
                        }
                    )],
                }
            }
        };
        if !result.ok {
            tracing::warn!(
                problems = result.problems.len(),
                "webhook endpoint check found problems"
            );
        }
        *cell.write().await = Some(result);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}
