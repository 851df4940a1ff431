//! The HTTP transport under async-stripe's request builders: one attempt of one request
//! to Stripe's API, answered with the status, Stripe's own clock (the `Date` header) and
//! the raw body.
//!
//! async-stripe's client hands back only the body, and a sync must be stamped with the
//! time Stripe answered, not ours (issue 11: our clock can be ahead of Stripe's, and an
//! answer stamped ahead of a change Stripe made in the meantime would outrank that
//! change's webhook). So requests are still built by async-stripe's typed builders
//! (`RequestBuilder`: method, path, query, form body) and sent here, over the same hyper
//! and rustls stack async-stripe itself uses.
//!
//! This module must never retry, interpret an answer or log a header: the secret key is in
//! one of them. Retrying and reading answers is `client`'s.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, DATE, USER_AGENT};
use hyper::{Method, Request};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use stripe_client_core::{RequestBuilder, StripeMethod};

/// The API version every request pins (`Stripe-Version`): the one async-stripe's request
/// builders and our lenient parsers were written for. Webhook endpoints created by
/// `subledger stripe setup` pin the same one.
pub const API_VERSION: &str = "2026-09-30.endive";

/// Who we say we are (`User-Agent`).
const USER_AGENT_VALUE: &str = concat!("subledger/", env!("CARGO_PKG_VERSION"));

/// One attempt's answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Stripe's clock when it answered (the `Date` header, whole seconds); `None` when the
    /// header is missing or unreadable.
    pub date: Option<DateTime<Utc>>,
    /// `Stripe-Should-Retry`, when Stripe says.
    pub should_retry: Option<bool>,
    pub body: Bytes,
}

/// Why an attempt got no answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The request could not be built (a header value that is not one).
    #[error("the request cannot be built: {0}")]
    Build(String),
    /// Connecting, sending or reading failed.
    #[error("network: {0}")]
    Network(String),
    #[error("timed out")]
    Timeout,
}

/// A connection pool to Stripe's API with the key and version every request carries.
#[derive(Clone)]
pub struct Transport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base_url: String,
    authorization: HeaderValue,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the authorization header.
        f.debug_struct("Transport")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// `base_url` without a trailing slash (`https://api.stripe.com`, or a local fake).
    pub fn new(secret_key: &str, base_url: &str) -> Result<Self, TransportError> {
        let mut authorization = HeaderValue::try_from(format!("Bearer {secret_key}"))
            .map_err(|_| TransportError::Build("the key is not a valid header value".into()))?;
        authorization.set_sensitive(true);
        let connector = HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base_url: base_url.trim_end_matches('/').to_owned(),
            authorization,
        })
    }

    /// Sends one attempt. `idempotency_key` goes on a POST; `account` is the connected
    /// account the request is made for (`Stripe-Account`, Connect).
    pub async fn send(
        &self,
        request: &RequestBuilder,
        idempotency_key: Option<&str>,
        account: Option<&str>,
        timeout: Duration,
    ) -> Result<Response, TransportError> {
        let mut uri = format!("{}/v1{}", self.base_url, request.path);
        if let Some(query) = request.query.as_deref().filter(|q| !q.is_empty()) {
            uri.push('?');
            uri.push_str(query);
        }
        let method = match request.method {
            StripeMethod::Get => Method::GET,
            StripeMethod::Post => Method::POST,
            StripeMethod::Delete => Method::DELETE,
        };
        let header = |value: &str, what: &str| {
            HeaderValue::try_from(value)
                .map_err(|_| TransportError::Build(format!("{what} is not a valid header value")))
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE))
            .header(
                HeaderName::from_static("stripe-version"),
                HeaderValue::from_static(API_VERSION),
            );
        if let Some(key) = idempotency_key {
            builder = builder.header(
                HeaderName::from_static("idempotency-key"),
                header(key, "the idempotency key")?,
            );
        }
        if let Some(account) = account {
            builder = builder.header(
                HeaderName::from_static("stripe-account"),
                header(account, "the account id")?,
            );
        }
        let body = match &request.body {
            Some(body) => {
                builder = builder.header(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                );
                Bytes::from(body.clone())
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(body))
            .map_err(|error| TransportError::Build(error.to_string()))?;
        let attempt = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| TransportError::Network(error_text(&error)))?;
            let status = response.status().as_u16();
            let headers = response.headers();
            let date = headers
                .get(DATE)
                .and_then(|value| value.to_str().ok())
                .and_then(http_date);
            let should_retry = headers
                .get("stripe-should-retry")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok());
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|error| TransportError::Network(error.to_string()))?
                .to_bytes();
            Ok(Response {
                status,
                date,
                should_retry,
                body,
            })
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or(Err(TransportError::Timeout))
    }
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110's IMF-fixdate, which RFC 2822
/// parsing reads).
pub fn http_date(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc2822(text.trim())
        .ok()
        .map(|date| date.with_timezone(&Utc))
}

/// A client error with its source (hyper's outer message alone is "client error").
fn error_text(error: &hyper_util::client::legacy::Error) -> String {
    match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_are_read_in_utc() {
        assert_eq!(
            http_date("Sun, 06 Nov 1994 08:49:37 GMT").map(|d| d.timestamp()),
            Some(784_111_777)
        );
        assert_eq!(http_date("yesterday"), None);
    }
}
