//! Stripe's API: the few calls subledger makes (customers, subscriptions, checkout and
//! billing portal sessions), over async-stripe's client.
//!
//! Requests are built with async-stripe's typed request builders, so parameter names are
//! checked at compile time; answers are read as raw JSON and handed to the lenient parsers
//! in `stripe::event`, because async-stripe's typed parsing fails when a field it requires
//! is absent, and Stripe's answers vary by API version. Every attempt has a timeout;
//! a safe failure (429, 409 from a concurrent use of one idempotency key, 5xx, a network
//! error, a timeout) is retried with backoff, and every attempt of one POST carries the
//! same idempotency key, so a retry never does the work twice.
//!
//! This module must never touch the database or the cache, nor decide what a Stripe fact
//! means: it returns Stripe's JSON.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_billing::subscription::{ListSubscription, ListSubscriptionStatus};
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionSubscriptionData,
    RetrieveCheckoutSession,
};
use stripe_checkout::CheckoutSessionMode;
use stripe_client_core::{IdempotencyKey, RequestBuilder, StripeMethod, StripeRequest};
use stripe_core::customer::CreateCustomer;

use super::transport::{Transport, TransportError};
use crate::backoff::Backoff;
use crate::config::Settings;
use secrecy::ExposeSecret;
use sha2::Digest;

/// How the client talks to Stripe.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `STRIPE_API_BASE` (a local fake in tests).
    pub base_url: String,
    /// The timeout of each attempt.
    pub timeout: Duration,
    /// Attempts after the first one, on safe failures only.
    pub retries: u32,
    /// The first retry waits this long; each next one twice as long.
    pub backoff: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StripeApiError {
    /// Stripe answered with an error that retrying will not fix (4xx other than 409/429).
    #[error("Stripe refused the request ({status}, {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        attempts: u32,
    },
    /// Every attempt failed in a way worth retrying (429, 5xx, network, timeout).
    #[error("Stripe is unavailable after {attempts} attempts: {last}")]
    Unavailable { attempts: u32, last: String },
    /// Stripe answered 2xx with something that is not what the call returns.
    #[error("unexpected answer from Stripe: {0}")]
    Unexpected(String),
    /// The key or base URL cannot be used.
    #[error("the Stripe client is misconfigured: {0}")]
    Config(String),
}

impl StripeApiError {
    /// How many HTTP attempts were made before giving up.
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Refused { attempts, .. } | Self::Unavailable { attempts, .. } => *attempts,
            Self::Unexpected(_) | Self::Config(_) => 1,
        }
    }

    /// Stripe says the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Refused { status: 404, .. })
    }
}

/// One call's answer, how many HTTP attempts it took, and Stripe's clock when it
/// answered.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    pub value: T,
    pub attempts: u32,
    /// The answer's `Date` header: the time the answer is true as of, on Stripe's clock
    /// (whole seconds). `None` when Stripe (or a fake) sent none.
    pub stripe_time: Option<DateTime<Utc>>,
}

/// One page of a Stripe list.
#[derive(Debug, Clone)]
pub struct Page {
    pub data: Vec<Map<String, Value>>,
    pub has_more: bool,
}

impl Page {
    /// The cursor for the next page (the last object's id).
    pub fn last_id(&self) -> Option<&str> {
        self.data
            .last()
            .and_then(|object| object.get("id"))
            .and_then(Value::as_str)
    }
}

/// What a checkout session is created with.
#[derive(Debug, Clone)]
pub struct CheckoutParams<'a> {
    pub customer_id: &'a str,
    pub org_id: &'a str,
    pub user_id: &'a str,
    pub price_id: &'a str,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    /// The connected account the customer lives in (`Stripe-Account`), if any.
    pub account: Option<&'a str>,
}

/// The calls subledger makes to Stripe's API.
#[derive(Clone)]
pub struct StripeApi {
    transport: Transport,
    options: ClientOptions,
}

impl std::fmt::Debug for StripeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the client: it holds the secret key.
        f.debug_struct("StripeApi")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl StripeApi {
    /// The client the settings describe, or `None` when `STRIPE_SECRET_KEY` is not set.
    pub fn from_settings(settings: &Settings) -> Result<Option<Self>, StripeApiError> {
        let Some(key) = &settings.stripe_secret_key else {
            return Ok(None);
        };
        Self::new(
            key.expose_secret(),
            ClientOptions {
                base_url: settings.stripe_api_base.clone(),
                timeout: settings.stripe_timeout,
                retries: settings.stripe_retries,
                backoff: settings.stripe_backoff,
            },
        )
        .map(Some)
    }

    pub fn new(secret_key: &str, options: ClientOptions) -> Result<Self, StripeApiError> {
        let transport = Transport::new(secret_key, &options.base_url)
            .map_err(|error| StripeApiError::Config(error.to_string()))?;
        Ok(Self { transport, options })
    }

    /// Every subscription (any status, newest first, with the default payment method
    /// expanded), of one customer or of the whole account, one page at a time; of the
    /// connected `account` (`Stripe-Account`) when given, else of the platform's.
    pub async fn list_subscriptions(
        &self,
        customer_id: Option<&str>,
        starting_after: Option<&str>,
        limit: i64,
        account: Option<&str>,
    ) -> Result<Answer<Page>, StripeApiError> {
        let mut request = ListSubscription::new()
            .status(ListSubscriptionStatus::All)
            .limit(limit)
            .expand(vec!["data.default_payment_method".to_owned()]);
        if let Some(customer_id) = customer_id {
            request = request.customer(customer_id);
        }
        if let Some(cursor) = starting_after {
            request = request.starting_after(cursor);
        }
        let answer = self.send_as(request.build(), None, account).await?;
        let mut object = answer.value;
        let data = match object.remove("data") {
            Some(Value::Array(items)) => items
                .into_iter()
                .filter_map(|item| match item {
                    Value::Object(object) => Some(object),
                    _ => None,
                })
                .collect(),
            _ => return Err(StripeApiError::Unexpected("a list without data".to_owned())),
        };
        let has_more = object
            .get("has_more")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Answer {
            value: Page { data, has_more },
            attempts: answer.attempts,
            stripe_time: answer.stripe_time,
        })
    }

    /// The lookup keys of a customer's active Stripe Entitlements features
    /// (`GET /v1/entitlements/active_entitlements?customer=…`, every page).
    pub async fn list_active_entitlements(
        &self,
        customer_id: &str,
        account: Option<&str>,
    ) -> Result<Answer<Vec<String>>, StripeApiError> {
        let mut keys = Vec::new();
        let mut attempts = 0;
        let mut cursor: Option<String> = None;
        loop {
            // A map serializes as `key=value` pairs (a list of tuples would not).
            let mut query = std::collections::BTreeMap::from([
                ("customer", customer_id.to_owned()),
                ("limit", "100".to_owned()),
            ]);
            if let Some(after) = &cursor {
                query.insert("starting_after", after.clone());
            }
            let request =
                RequestBuilder::new(StripeMethod::Get, "/entitlements/active_entitlements")
                    .query(&query);
            let answer = self.send_as(request, None, account).await?;
            attempts += answer.attempts;
            let page = Value::Object(answer.value);
            keys.extend(super::event::entitlement_lookup_keys(Some(&page)));
            let last = page
                .get("data")
                .and_then(Value::as_array)
                .and_then(|data| data.last())
                .and_then(|last| last.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            match (page.get("has_more").and_then(Value::as_bool), last) {
                (Some(true), Some(last)) => cursor = Some(last),
                _ => break,
            }
        }
        keys.sort();
        keys.dedup();
        Ok(Answer {
            value: keys,
            attempts,
            // A list of several pages is not one moment of Stripe's clock.
            stripe_time: None,
        })
    }

    /// Creates a customer owned by an org and a user (metadata `organizationId`,
    /// `userId`). `idempotency_key` makes a repeated request return the same customer.
    pub async fn create_customer(
        &self,
        org_id: &str,
        user_id: &str,
        email: Option<&str>,
        idempotency_key: &str,
    ) -> Result<Answer<Map<String, Value>>, StripeApiError> {
        let metadata = owner_metadata(org_id, user_id);
        let mut request = CreateCustomer::new().metadata(metadata);
        if let Some(email) = email {
            request = request.email(email);
        }
        self.send(request.build(), Some(idempotency_key)).await
    }

    /// Creates a subscription Checkout Session for an existing customer.
    pub async fn create_checkout_session(
        &self,
        params: &CheckoutParams<'_>,
        idempotency_key: &str,
    ) -> Result<Answer<Map<String, Value>>, StripeApiError> {
        let metadata = owner_metadata(params.org_id, params.user_id);
        let mut item = CreateCheckoutSessionLineItems::new();
        item.price = Some(params.price_id.to_owned());
        item.quantity = Some(1);
        let mut subscription_data = CreateCheckoutSessionSubscriptionData::new();
        subscription_data.metadata = Some(metadata.clone());
        let request = CreateCheckoutSession::new()
            .mode(CheckoutSessionMode::Subscription)
            .customer(params.customer_id)
            .client_reference_id(params.org_id)
            .line_items(vec![item])
            .metadata(metadata)
            .subscription_data(subscription_data)
            .success_url(params.success_url)
            .cancel_url(params.cancel_url);
        self.send_as(request.build(), Some(idempotency_key), params.account)
            .await
    }

    /// Retrieves a Checkout Session, of the connected `account` when given.
    pub async fn retrieve_checkout_session(
        &self,
        session_id: &str,
        account: Option<&str>,
    ) -> Result<Answer<Map<String, Value>>, StripeApiError> {
        self.send_as(
            RetrieveCheckoutSession::new(session_id).build(),
            None,
            account,
        )
        .await
    }

    /// Creates a billing portal session for a customer (of the connected `account` when
    /// given); a random idempotency key covers its retries.
    pub async fn create_portal_session(
        &self,
        customer_id: &str,
        return_url: &str,
        account: Option<&str>,
    ) -> Result<Answer<Map<String, Value>>, StripeApiError> {
        let request = CreateBillingPortalSession::new()
            .customer(customer_id)
            .return_url(return_url);
        self.send_as(request.build(), None, account).await
    }

    /// Retrieves one object by its API path (`/subscriptions/sub_1`, see
    /// `stripe::event::retrieve_path`), for `account` (`Stripe-Account`) when it belongs to
    /// a connected account. A subscription comes with its default payment method expanded,
    /// as a sync lists it.
    pub async fn retrieve(
        &self,
        path: &str,
        account: Option<&str>,
    ) -> Result<Answer<Map<String, Value>>, StripeApiError> {
        let mut request = RequestBuilder::new(StripeMethod::Get, path);
        if path.starts_with("/subscriptions/") {
            request.query = Some("expand[0]=default_payment_method".to_owned());
        }
        self.send_as(request, None, account).await
    }

    /// One page of Stripe's events (`GET /v1/events`, newest first, kept 30 days) of the
    /// given `types` (at most 20) created at or after `created_gte`; only those whose
    /// webhook delivery has not succeeded when `undelivered`.
    pub async fn list_events(
        &self,
        types: &[&str],
        created_gte: i64,
        undelivered: bool,
        starting_after: Option<&str>,
    ) -> Result<Answer<Page>, StripeApiError> {
        let mut query = format!("limit=100&created[gte]={created_gte}");
        for (i, kind) in types.iter().enumerate() {
            query.push_str(&format!("&types[{i}]={kind}"));
        }
        if undelivered {
            query.push_str("&delivery_success=false");
        }
        if let Some(after) = starting_after {
            query.push_str(&format!("&starting_after={after}"));
        }
        let mut request = RequestBuilder::new(StripeMethod::Get, "/events");
        request.query = Some(query);
        let answer = self.send(request, None).await?;
        let mut object = answer.value;
        let Some(Value::Array(items)) = object.remove("data") else {
            return Err(StripeApiError::Unexpected("a list without data".to_owned()));
        };
        let data = items
            .into_iter()
            .filter_map(|item| match item {
                Value::Object(object) => Some(object),
                _ => None,
            })
            .collect();
        Ok(Answer {
            value: Page {
                data,
                has_more: object.get("has_more").and_then(Value::as_bool) == Some(true),
            },
            attempts: answer.attempts,
            stripe_time: answer.stripe_time,
        })
    }

    /// Every webhook endpoint of the account (`GET /v1/webhook_endpoints`, all pages).
    pub async fn list_webhook_endpoints(&self) -> Result<Vec<Map<String, Value>>, StripeApiError> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut request = RequestBuilder::new(StripeMethod::Get, "/webhook_endpoints");
            request.query = Some(match &cursor {
                Some(after) => format!("limit=100&starting_after={after}"),
                None => "limit=100".to_owned(),
            });
            let mut page = self.send(request, None).await?.value;
            let has_more = page.get("has_more").and_then(Value::as_bool) == Some(true);
            let Some(Value::Array(data)) = page.remove("data") else {
                return Err(StripeApiError::Unexpected("a list without data".to_owned()));
            };
            all.extend(data.into_iter().filter_map(|item| match item {
                Value::Object(object) => Some(object),
                _ => None,
            }));
            cursor = all
                .last()
                .and_then(|last| last.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            if !has_more || cursor.is_none() {
                return Ok(all);
            }
        }
    }

    /// Creates a webhook endpoint at `url` sending exactly `events`, pinned to
    /// `api_version` (`POST /v1/webhook_endpoints`; its answer holds the signing `secret`,
    /// which Stripe shows only here). One idempotency key per URL and set of events, so a
    /// retried setup creates one endpoint.
    pub async fn create_webhook_endpoint(
        &self,
        url: &str,
        events: &[&str],
        api_version: &str,
    ) -> Result<Map<String, Value>, StripeApiError> {
        #[derive(serde::Serialize)]
        struct Params<'a> {
            url: &'a str,
            enabled_events: &'a [&'a str],
            api_version: &'a str,
            description: &'a str,
        }
        let request = RequestBuilder::new(StripeMethod::Post, "/webhook_endpoints").form(&Params {
            url,
            enabled_events: events,
            api_version,
            description: "subledger",
        });
        let key = format!(
            "subledger-endpoint-{}",
            hex::encode(
                &sha2::Sha256::digest(
                    format!("{url}|{}|{api_version}", events.join(",")).as_bytes()
                )[..16]
            )
        );
        Ok(self.send(request, Some(&key)).await?.value)
    }

    /// Sends one request, retrying safe failures. A POST carries `idempotency_key` (or a
    /// random one) on every attempt.
    async fn send(
        &self,
        request: RequestBuilder,
        idempotency_key: Option<&str>,
    ) -> Result<Answer<Map<String, Value>>, StripeApiError> {
        self.send_as(request, idempotency_key, None).await
    }

    /// As [`StripeApi::send`], made for a connected `account` (`Stripe-Account`) if given.
    async fn send_as(
        &self,
        request: RequestBuilder,
        idempotency_key: Option<&str>,
        account: Option<&str>,
    ) -> Result<Answer<Map<String, Value>>, StripeApiError> {
        let key = match (request.method, idempotency_key) {
            (StripeMethod::Post, Some(key)) => Some(
                IdempotencyKey::new(key)
                    .map_err(|e| StripeApiError::Config(e.to_string()))?
                    .into_inner(),
            ),
            (StripeMethod::Post, None) => Some(IdempotencyKey::new_uuid_v4().into_inner()),
            // Stripe ignores idempotency keys on GET and DELETE.
            _ => None,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let result = self
                .transport
                .send(&request, key.as_deref(), account, self.options.timeout)
                .await;
            let described = match result {
                Ok(response) if (200..300).contains(&response.status) => {
                    return match serde_json::from_slice(&response.body) {
                        Ok(Value::Object(object)) => Ok(Answer {
                            value: object,
                            attempts,
                            stripe_time: response.date,
                        }),
                        _ => Err(StripeApiError::Unexpected(
                            "the answer is not a JSON object".to_owned(),
                        )),
                    };
                }
                Ok(response) => {
                    let (code, message) = error_of(&response.body);
                    // 409: a concurrent request with the same idempotency key; 429 and
                    // 5xx: Stripe or a proxy in front of it is overloaded or failing.
                    if !matches!(response.status, 409 | 429 | 500..=599) {
                        return Err(StripeApiError::Refused {
                            status: response.status,
                            code,
                            message,
                            attempts,
                        });
                    }
                    format!("{} {message}", response.status)
                }
                Err(TransportError::Build(reason)) => return Err(StripeApiError::Config(reason)),
                Err(error) => error.to_string(),
            };
            if attempts > self.options.retries {
                return Err(StripeApiError::Unavailable {
                    attempts,
                    last: described,
                });
            }
            tracing::warn!(
                path = request.path,
                attempts,
                error = described,
                "Stripe call failed; retrying"
            );
            tokio::time::sleep(retry_delay(self.options.backoff, attempts)).await;
        }
    }
}

/// Stripe's error body (`{"error": {"type", "code", "message"}}`): the code (else the
/// type) and the message. A body in another format (a proxy's error page) gives neither.
fn error_of(body: &[u8]) -> (String, String) {
    let error = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| value.get("error").cloned());
    let field = |name: &str| {
        error
            .as_ref()
            .and_then(|error| error.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    (
        field("code")
            .or_else(|| field("type"))
            .unwrap_or_else(|| "unknown".to_owned()),
        field("message").unwrap_or_else(|| "(no message)".to_owned()),
    )
}

/// The pause after the `attempts`th attempt failed: `backoff`, then twice as long each time.
fn retry_delay(backoff: Duration, attempts: u32) -> Duration {
    Backoff::doubling(backoff).delay(attempts.saturating_sub(1))
}

fn owner_metadata(org_id: &str, user_id: &str) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([
        ("organizationId".to_owned(), org_id.to_owned()),
        ("userId".to_owned(), user_id.to_owned()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pause it replaced: `backoff * 2^(attempts - 1)`.
    #[test]
    fn retries_wait_the_backoff_doubling() {
        let backoff = Duration::from_millis(250);
        for attempts in 1..=12u32 {
            assert_eq!(
                retry_delay(backoff, attempts),
                backoff * 2u32.pow(attempts - 1),
                "{attempts}"
            );
        }
    }
}
