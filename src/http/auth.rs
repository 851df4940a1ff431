//! Who may call what: bearer tokens for `/v1` (the API token, or an org-scoped token that
//! reads only its own org's entitlements) and for the operator endpoints (the admin token).
//!
//! Tokens are compared in constant time, as SHA-256 digests so that not even their length
//! leaks through timing. This module must never log, echo or store a presented token; and
//! an org-scoped token is refused every route it is not explicitly allowed (deny by
//! default), so a route added to `/v1` later is closed to it until someone opens it here.

use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// The one `/v1` route an org-scoped token may call, as axum names it.
const ORG_ENTITLEMENTS_ROUTE: &str = "/v1/orgs/:org_id/entitlements";

/// Who a `/v1` request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reader {
    /// The API token: may read everything.
    Everything,
    /// An org-scoped token: may read this org's entitlements only.
    Org(String),
}

/// Constant-time equality of a configured secret and a presented token.
pub fn token_matches(expected: &SecretString, presented: &str) -> bool {
    let expected = Sha256::digest(expected.expose_secret().as_bytes());
    let presented = Sha256::digest(presented.as_bytes());
    bool::from(expected.ct_eq(&presented))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// The reader a presented token stands for. Every configured token is compared (no early
/// exit), so the time taken does not say which one nearly matched.
fn reader_for(state: &AppState, presented: &str) -> Option<Reader> {
    let mut found = state
        .settings
        .api_token
        .as_ref()
        .filter(|expected| token_matches(expected, presented))
        .map(|_| Reader::Everything);
    for org in &state.settings.org_tokens {
        if token_matches(&org.token, presented) && found.is_none() {
            found = Some(Reader::Org(org.org_id.clone()));
        }
    }
    found
}

/// `/v1`: requires the API token or an org-scoped token, and lets an org-scoped token
/// through only to its own org's entitlements (403 elsewhere). The reader is left in the
/// request's extensions.
pub async fn require_reader(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    params: Option<RawPathParams>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let reader = bearer(request.headers())
        .and_then(|token| reader_for(&state, token))
        .ok_or(ApiError::Unauthorized)?;
    if let Reader::Org(own) = &reader {
        let route = matched.as_ref().map(MatchedPath::as_str);
        let asked = params
            .as_ref()
            .and_then(|p| p.iter().find(|(key, _)| *key == "org_id"))
            .map(|(_, value)| value);
        if route != Some(ORG_ENTITLEMENTS_ROUTE) || asked != Some(own.as_str()) {
            return Err(ApiError::Forbidden);
        }
    }
    request.extensions_mut().insert(reader);
    Ok(next.run(request).await)
}

/// The operator endpoints (`/ops`): require `SUBLEDGER_ADMIN_TOKEN` as a bearer token.
/// Unset, they refuse everyone. (The `/admin` page has its own login, `admin::require_admin`,
/// which trades the same token for a cookie.)
pub async fn require_admin_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let ok = match (&state.settings.admin_token, bearer(request.headers())) {
        (Some(expected), Some(presented)) => token_matches(expected, presented),
        _ => false,
    };
    if !ok {
        return Err(ApiError::Unauthorized);
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_exactly() {
        let expected = SecretString::from("s3cret-token".to_owned());
        assert!(token_matches(&expected, "s3cret-token"));
        for wrong in [
            "",
            "s3cret-toke",
            "s3cret-token ",
            "S3cret-token",
            "s3cret-tokenx",
        ] {
            assert!(!token_matches(&expected, wrong), "{wrong:?}");
        }
    }
}
