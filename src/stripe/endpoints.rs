//! What a Stripe webhook endpoint must look like for subledger, and how far the account's
//! endpoints are from it: exactly the event types subledger handles
//! ([`super::event::HANDLED_TYPES`]), enabled, pinned to the API version subledger speaks
//! ([`super::transport::API_VERSION`]). Endpoint configuration is the most common
//! integration bug (issue 12): a missing type or an unexpected version fails silently.
//!
//! Pure: it reads the JSON of `GET /v1/webhook_endpoints` (fields `id`, `url`, `status`,
//! `enabled_events`, `api_version`: <https://docs.stripe.com/api/webhook_endpoints/object>)
//! and never calls Stripe itself (`subledger stripe setup|check` and the server's periodic
//! check do, through `client`).

use serde::Serialize;
use serde_json::{Map, Value};

use super::event::{str_field, HANDLED_TYPES};
use super::transport::API_VERSION;

/// How one endpoint differs from what subledger needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EndpointReport {
    pub id: String,
    pub url: String,
    /// `enabled` or `disabled`.
    pub status: String,
    /// The endpoint's pinned version (`None`: the account's default, whatever it becomes).
    pub api_version: Option<String>,
    /// Handled types the endpoint does not send.
    pub missing: Vec<String>,
    /// Types it sends that subledger ignores (harmless, but each costs a request).
    pub extra: Vec<String>,
    /// What is wrong, one sentence each; empty when the endpoint is right.
    pub problems: Vec<String>,
}

/// The whole account's endpoints against what subledger needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CheckReport {
    pub endpoints: Vec<EndpointReport>,
    /// Problems that concern no single endpoint (no endpoint at all).
    pub problems: Vec<String>,
}

impl CheckReport {
    /// Whether nothing is wrong anywhere.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.endpoints.iter().all(|e| e.problems.is_empty())
    }

    /// Every problem, prefixed by its endpoint.
    pub fn all_problems(&self) -> Vec<String> {
        let mut all = self.problems.clone();
        for endpoint in &self.endpoints {
            all.extend(
                endpoint
                    .problems
                    .iter()
                    .map(|p| format!("{} ({}): {p}", endpoint.id, endpoint.url)),
            );
        }
        all
    }
}

/// Judges one endpoint object. `*` (every event) counts as sending every handled type, and
/// as sending extra ones.
pub fn judge(endpoint: &Map<String, Value>) -> EndpointReport {
    let enabled: Vec<String> = endpoint
        .get("enabled_events")
        .and_then(Value::as_array)
        .map(|events| {
            events
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let everything = enabled.iter().any(|e| e == "*");
    let missing: Vec<String> = if everything {
        Vec::new()
    } else {
        HANDLED_TYPES
            .iter()
            .filter(|t| !enabled.iter().any(|e| e == *t))
            .map(|t| (*t).to_owned())
            .collect()
    };
    let extra: Vec<String> = enabled
        .iter()
        .filter(|e| !HANDLED_TYPES.contains(&e.as_str()))
        .cloned()
        .collect();
    let status = str_field(endpoint, "status").unwrap_or_else(|| "enabled".to_owned());
    let api_version = str_field(endpoint, "api_version");
    let mut problems = Vec::new();
    if status != "enabled" {
        problems.push(format!("the endpoint is {status}"));
    }
    if !missing.is_empty() {
        problems.push(format!("missing event types: {}", missing.join(", ")));
    }
    match api_version.as_deref() {
        Some(API_VERSION) => {}
        Some(other) => problems.push(format!("pinned to API version {other}, not {API_VERSION}")),
        None => problems.push(format!(
            "not pinned to an API version (the account's default applies); pin {API_VERSION}"
        )),
    }
    if !extra.is_empty() {
        // Not a problem: each costs a request and is recorded as ignored.
        tracing::debug!(
            extra = extra.len(),
            "endpoint sends types subledger ignores"
        );
    }
    EndpointReport {
        id: str_field(endpoint, "id").unwrap_or_default(),
        url: str_field(endpoint, "url").unwrap_or_default(),
        status,
        api_version,
        missing,
        extra,
        problems,
    }
}

/// Judges every endpoint listed (`url`: only those pointing there, when given).
pub fn check(endpoints: &[Map<String, Value>], url: Option<&str>) -> CheckReport {
    let endpoints: Vec<EndpointReport> = endpoints
        .iter()
        .map(judge)
        .filter(|e| url.is_none_or(|url| e.url == url))
        .collect();
    let problems = if endpoints.is_empty() {
        vec![match url {
            Some(url) => format!("no webhook endpoint points at {url}"),
            None => "the account has no webhook endpoint".to_owned(),
        }]
    } else {
        Vec::new()
    };
    CheckReport {
        endpoints,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Shaped as https://docs.stripe.com/api/webhook_endpoints/object.
    fn endpoint(events: Value, version: Value, status: &str) -> Map<String, Value> {
        json!({"id": "we_1", "object": "webhook_endpoint", "url": "https://example.test/webhooks/stripe",
            "enabled_events": events, "api_version": version, "status": status, "livemode": false})
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn missing_extra_version_and_status_are_reported() {
        let right = endpoint(json!(HANDLED_TYPES), json!(API_VERSION), "enabled");
        assert!(judge(&right).problems.is_empty());
        let mut events: Vec<&str> = HANDLED_TYPES[1..].to_vec();
        events.push("charge.succeeded");
        let wrong = judge(&endpoint(json!(events), json!("2024-06-20"), "disabled"));
        assert_eq!(wrong.missing, [HANDLED_TYPES[0]]);
        assert_eq!(wrong.extra, ["charge.succeeded"]);
        assert_eq!(wrong.problems.len(), 3, "{:?}", wrong.problems);
        let star = judge(&endpoint(json!(["*"]), Value::Null, "enabled"));
        assert!(star.missing.is_empty());
        assert_eq!(star.problems.len(), 1, "unpinned: {:?}", star.problems);
        assert!(!check(&[], None).ok());
        assert!(check(std::slice::from_ref(&right), None).ok());
        assert!(!check(&[right], Some("https://elsewhere.test")).ok());
    }
}
