//! Who may call what: bearer tokens for `/v1` (the API token, or an org-scoped token that
//! reads only its own org's entitlements and features) and for the operator endpoints (the admin token),
//! and the admin page's session: the admin token as a bearer token, or traded once (as
//! `?token=`, which the login form sends) for an HttpOnly, SameSite=Strict cookie holding
//! the token's SHA-256, with a redirect to the same URL without it, so the token stays out
//! of history and later URLs. SameSite=Strict is also what keeps another site from posting
//! a re-drive.
//!
//! Each setting may hold several tokens (comma-separated), all accepted, so that a token
//! is rotated by adding the new one, moving callers to it, then removing the old one
//! (docs/reliability.md). Tokens are compared in constant time, as SHA-256 digests so that
//! not even their length leaks through timing, and every configured token is compared
//! (no early exit), so the time taken does not say which one nearly matched. The configured
//! ones are hashed once, when the settings are read (`config::Token`), and a presented one
//! once per request. Which one matched is counted by its position
//! (`subledger_token_uses_total`), so an operator sees when an old token is no longer used.
//! This module must never log, echo or store a presented token; and an org-scoped token is
//! refused every route it is not explicitly allowed (deny by default), so a route added to
//! `/v1` later is closed to it until someone opens it here.

use std::future::Future;
use std::task::{Context, Poll, Waker};

use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use cookie::{Cookie, SameSite};
use subtle::ConstantTimeEq;
use url::form_urlencoded;

use super::layers::Verdict;
use super::{ApiError, AppState};
use crate::config::{Settings, Token};
use crate::metrics::TokenKind;

/// The cookie the admin page trades its token for.
const ADMIN_COOKIE: &str = "subledger_admin";
/// Where that cookie is sent.
const ADMIN_PATH: &str = "/admin";

/// The `/v1` routes an org-scoped token may call (for its own org), as axum names them:
/// its entitlements and the feature check on them.
const ORG_ROUTES: &[&str] = &[
    "/v1/orgs/:org_id/entitlements",
    "/v1/orgs/:org_id/entitlements/:feature",
];

/// Who a `/v1` request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reader {
    /// The API token: may read everything.
    Everything,
    /// An org-scoped token: may read this org's entitlements only.
    Org(String),
}

/// The position of the first of `tokens` that `presented` is, comparing every one in
/// constant time (no early exit). `presented` is hashed once ([`Token`]).
pub fn position_of(tokens: &[Token], presented: &str) -> Option<usize> {
    first_of(tokens, &Token::digest_of(presented))
}

/// [`position_of`] for a presented token already hashed.
fn first_of(tokens: &[Token], presented: &[u8; 32]) -> Option<usize> {
    let mut found = None;
    for (position, expected) in tokens.iter().enumerate() {
        if expected.is(presented) && found.is_none() {
            found = Some(position);
        }
    }
    found
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
    let presented = Token::digest_of(presented);
    let mut found = first_of(&state.settings.api_tokens, &presented)
        .map(|position| (Reader::Everything, TokenKind::Api, position));
    for (position, org) in state.settings.org_tokens.iter().enumerate() {
        if org.token.is(&presented) && found.is_none() {
            found = Some((Reader::Org(org.org_id.clone()), TokenKind::Org, position));
        }
    }
    found.map(|(reader, kind, position)| {
        crate::metrics::token_used(kind, position);
        reader
    })
}

/// `/v1`'s check (`layers::Guard`): requires the API token or an org-scoped token, and
/// lets an org-scoped token through only to its own org's entitlements (403 elsewhere).
pub fn reader(state: &AppState, request: Request) -> Verdict {
    reader_check(state, request).into()
}

fn reader_check(state: &AppState, request: Request) -> Result<Request, ApiError> {
    let reader = bearer(request.headers())
        .and_then(|token| reader_for(state, token))
        .ok_or(ApiError::Unauthorized)?;
    let Reader::Org(own) = &reader else {
        return Ok(request);
    };
    let route = request.extensions().get::<MatchedPath>();
    if !route.is_some_and(|route| ORG_ROUTES.contains(&route.as_str())) {
        return Err(ApiError::Forbidden);
    }
    let (mut parts, body) = request.into_parts();
    if org_asked(&mut parts).as_deref() != Some(own.as_str()) {
        return Err(ApiError::Forbidden);
    }
    Ok(Request::from_parts(parts, body))
}

/// The `org_id` the matched route's path names, decoded as the handler's `Path` sees it.
/// `RawPathParams` reads what the router left in the request's extensions, so it is ready
/// at once: it is polled a single time, and one that were not ready would find nothing
/// (and so refuse).
fn org_asked(parts: &mut Parts) -> Option<String> {
    let extract = RawPathParams::from_request_parts(parts, &());
    let mut context = Context::from_waker(Waker::noop());
    match std::pin::pin!(extract).poll(&mut context) {
        Poll::Ready(Ok(params)) => params
            .iter()
            .find(|(key, _)| *key == "org_id")
            .map(|(_, value)| value.to_owned()),
        Poll::Ready(Err(_)) | Poll::Pending => None,
    }
}

/// `/ops`' check (`layers::Guard`): requires `SUBLEDGER_ADMIN_TOKEN` as a bearer token.
/// Unset, it refuses everyone. (The `/admin` page also takes a cookie: [`admin_access`].)
pub fn admin(state: &AppState, request: Request) -> Verdict {
    let Some(position) = bearer(request.headers())
        .and_then(|presented| position_of(&state.settings.admin_tokens, presented))
    else {
        return Verdict::Answer(ApiError::Unauthorized.into_response());
    };
    crate::metrics::token_used(TokenKind::Admin, position);
    Verdict::Pass(request)
}

/// What a request to the admin page presents.
pub enum AdminAccess {
    /// The admin token as a bearer token, or the cookie it was traded for.
    Granted,
    /// The admin token as `?token=`: this response sets the cookie and redirects to the
    /// same URL without the token.
    Traded(Response),
    /// A `?token=` that is not the admin token.
    WrongToken,
    /// Nothing that grants access (or no admin token is configured).
    Missing,
}

/// Whether `presented` is one of the admin tokens (never, when none is configured).
fn admin_token_matches(settings: &Settings, presented: &str) -> bool {
    let position = position_of(&settings.admin_tokens, presented);
    if let Some(position) = position {
        crate::metrics::token_used(TokenKind::Admin, position);
    }
    position.is_some()
}

/// What the cookie holds: a token's SHA-256 (`digest`), so the token itself is never stored.
fn cookie_value(digest: &[u8; 32]) -> String {
    hex::encode(digest)
}

/// Whether a cookie holds what one of the admin tokens was traded for (so a session made
/// with a token ends when that token is removed).
fn admin_cookie_matches(settings: &Settings, headers: &HeaderMap) -> bool {
    let expected: Vec<String> = settings
        .admin_tokens
        .iter()
        .map(|token| cookie_value(token.digest()))
        .collect();
    if expected.is_empty() {
        return false;
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(|cookie| cookie.name() == ADMIN_COOKIE)
        .any(|cookie| {
            // Every configured token is compared, in constant time.
            expected.iter().fold(false, |matched, value| {
                matched | bool::from(cookie.value().as_bytes().ct_eq(value.as_bytes()))
            })
        })
}

/// Decides what a request to the admin page may do: a `?token=` is checked (and traded for
/// the cookie) first, then the bearer token, then the cookie.
pub fn admin_access(settings: &Settings, uri: &Uri, headers: &HeaderMap) -> AdminAccess {
    let query = uri.query().unwrap_or("");
    let presented = form_urlencoded::parse(query.as_bytes())
        .filter(|(key, _)| key == "token")
        .map(|(_, value)| value)
        .last();
    if let Some(token) = presented {
        if !admin_token_matches(settings, &token) {
            return AdminAccess::WrongToken;
        }
        return AdminAccess::Traded(trade_for_cookie(uri.path(), query, &token));
    }
    let bearer = bearer(headers).is_some_and(|token| admin_token_matches(settings, token));
    if bearer || admin_cookie_matches(settings, headers) {
        AdminAccess::Granted
    } else {
        AdminAccess::Missing
    }
}

/// The redirect that sets the admin cookie and drops `token` from the URL (the rest of
/// the query is kept).
fn trade_for_cookie(path: &str, query: &str, token: &str) -> Response {
    let rest = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form_urlencoded::parse(query.as_bytes()).filter(|(key, _)| key != "token"))
        .finish();
    let location = if rest.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{rest}")
    };
    let cookie = Cookie::build((ADMIN_COOKIE, cookie_value(&Token::digest_of(token))))
        .path(ADMIN_PATH)
        .http_only(true)
        .same_site(SameSite::Strict)
        .build();
    let mut response = Redirect::to(&location).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie.to_string()) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_is_traded_for_a_cookie_and_dropped_from_the_url() {
        let response = trade_for_cookie("/admin", "q=org_a&token=t0k&x=a%20b", "t0k");
        assert_eq!(response.status(), 303);
        assert_eq!(response.headers()[header::LOCATION], "/admin?q=org_a&x=a+b");
        let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
        let cookie = Cookie::parse(cookie).unwrap();
        assert_eq!(cookie.name(), ADMIN_COOKIE);
        assert_eq!(cookie.value(), hex::encode(Token::digest_of("t0k")));
        assert_eq!(cookie.http_only(), Some(true));
        assert_eq!(cookie.same_site(), Some(SameSite::Strict));
        assert_eq!(cookie.path(), Some("/admin"));
        let response = trade_for_cookie("/admin/customers/cus_a", "token=t0k", "t0k");
        assert_eq!(
            response.headers()[header::LOCATION],
            "/admin/customers/cus_a"
        );
    }

    #[test]
    fn any_configured_token_matches_and_its_position_is_told() {
        let tokens: Vec<Token> = ["old-token", "new-token"].map(Token::from).into();
        assert_eq!(position_of(&tokens, "old-token"), Some(0));
        assert_eq!(position_of(&tokens, "new-token"), Some(1));
        assert_eq!(position_of(&tokens, "new-toke"), None);
        assert_eq!(position_of(&[], "new-token"), None);
    }

    #[test]
    fn tokens_match_only_exactly() {
        let expected = [Token::from("s3cret-token")];
        assert_eq!(position_of(&expected, "s3cret-token"), Some(0));
        for wrong in [
            "",
            "s3cret-toke",
            "s3cret-token ",
            "S3cret-token",
            "s3cret-tokenx",
        ] {
            assert_eq!(position_of(&expected, wrong), None, "{wrong:?}");
        }
    }

    #[test]
    fn a_token_is_never_printed() {
        let printed = format!("{:?}", Token::from("s3cret-token"));
        assert_eq!(printed, "Token([REDACTED])");
    }

    #[test]
    fn the_cookie_of_a_configured_token_is_its_digest() {
        let token = Token::from(String::from("t0k"));
        // `printf t0k | sha256sum`
        let expected = "98e4e27695754ae0d421e3a5a48b69d8fab2b3af4383a5c318201f8a92eb9fd0";
        assert_eq!(cookie_value(token.digest()), expected);
        assert_eq!(cookie_value(&Token::digest_of("t0k")), expected);
    }
}
