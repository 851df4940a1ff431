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

use serde_json::{Map, Value};
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_billing::subscription::{ListSubscription, ListSubscriptionStatus};
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionSubscriptionData,
    RetrieveCheckoutSession,
};
use stripe_checkout::CheckoutSessionMode;
use stripe_client_core::{RequestBuilder, StripeMethod, StripeRequest};
use stripe_core::customer::CreateCustomer;

use crate::backoff::Backoff;

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

/// One call's answer and how many HTTP attempts it took.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    pub value: T,
    pub attempts: u32,
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
}

/// The calls subledger makes to Stripe's API.
#[derive(Clone)]
pub struct StripeApi {
    client: Client,
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
    pub fn new(secret_key: &str, options: ClientOptions) -> Result<Self, StripeApiError> {
        let client = ClientBuilder::new(secret_key)
            .url(options.base_url.trim_end_matches('/'))
            .timeout(options.timeout)
            .build()
            .map_err(|error| StripeApiError::Config(error.to_string()))?;
        Ok(Self { client, options })
    }

    /// Every subscription (any status, newest first, with the default payment method
    /// expanded), of one customer or of the whole account, one page at a time.
    pub async fn list_subscriptions(
        &self,
        customer_id: Option<&str>,
        starting_after: Option<&str>,
        limit: i64,
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
        let answer = self.send(request.build(), None).await?;
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
        })
    }

    /// The lookup keys of a customer's active Stripe Entitlements features
    /// (`GET /v1/entitlements/active_entitlements?customer=…`, every page).
    pub async fn list_active_entitlements(
        &self,
        customer_id: &str,
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
            let answer = self.send(request, None).await?;
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
        self.send(request.build(), Some(idempotency_key)).await
    }

    pub async fn retrieve_checkout_session(
        &self,
        session_id: &str,
    ) -> Result<Answer<Map<String, Value>>, StripeApiError> {
        self.send(RetrieveCheckoutSession::new(session_id).build(), None)
            .await
    }

    /// Creates a billing portal session; a random idempotency key covers its retries.
    pub async fn create_portal_session(
        &self,
        customer_id: &str,
        return_url: &str,
    ) -> Result<Answer<Map<String, Value>>, StripeApiError> {
        let request = CreateBillingPortalSession::new()
            .customer(customer_id)
            .return_url(return_url);
        self.send(request.build(), None).await
    }

    /// Sends one request, retrying safe failures. A POST carries `idempotency_key` (or a
    /// random one) on every attempt.
    async fn send(
        &self,
        request: RequestBuilder,
        idempotency_key: Option<&str>,
    ) -> Result<Answer<Map<String, Value>>, StripeApiError> {
        let key = match (request.method, idempotency_key) {
            (StripeMethod::Post, Some(key)) => {
                Some(IdempotencyKey::new(key).map_err(|e| StripeApiError::Config(e.to_string()))?)
            }
            (StripeMethod::Post, None) => Some(IdempotencyKey::new_uuid_v4()),
            // Stripe ignores idempotency keys on GET and DELETE.
            _ => None,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let attempt = RequestBuilder {
                query: request.query.clone(),
                body: request.body.clone(),
                path: request.path.clone(),
                method: request.method,
            };
            // The client's own strategies either retry with a fresh random key or never
            // retry; we retry here so that one key covers every attempt.
            let strategy = key
                .clone()
                .map_or(RequestStrategy::Once, RequestStrategy::Idempotent);
            let result = attempt
                .customize::<miniserde::json::Value>()
                .request_strategy(strategy)
                .timeout(self.options.timeout)
                .send(&self.client)
                .await;
            let error = match result {
                Ok(value) => {
                    let text = miniserde::json::to_string(&value);
                    return match serde_json::from_str(&text) {
                        Ok(Value::Object(object)) => Ok(Answer {
                            value: object,
                            attempts,
                        }),
                        _ => Err(StripeApiError::Unexpected(
                            "the answer is not a JSON object".to_owned(),
                        )),
                    };
                }
                Err(error) => error,
            };
            let (retryable, described) = classify(&error);
            if !retryable {
                let StripeError::Stripe(details, status) = error else {
                    return Err(StripeApiError::Unexpected(described));
                };
                return Err(StripeApiError::Refused {
                    status,
                    code: details.code.as_ref().map_or_else(
                        || details.type_.as_str().to_owned(),
                        |c| c.as_str().to_owned(),
                    ),
                    message: details.message.clone().unwrap_or_default(),
                    attempts,
                });
            }
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

/// The pause after the `attempts`th attempt failed: `backoff`, then twice as long each time.
fn retry_delay(backoff: Duration, attempts: u32) -> Duration {
    Backoff::doubling(backoff).delay(attempts.saturating_sub(1))
}

/// Whether a failure is worth retrying, and a one-line description without secrets.
fn classify(error: &StripeError) -> (bool, String) {
    match error {
        StripeError::Stripe(details, status) => (
            matches!(status, 409 | 429 | 500..=599),
            format!(
                "{status} {}",
                details.message.as_deref().unwrap_or("(no message)")
            ),
        ),
        // A non-2xx whose body is not Stripe's error format (a proxy's 502 page) ends up
        // here without its status: treat it as transient.
        StripeError::JSONDeserialize(message) if message.contains("Stripe error") => {
            (true, message.clone())
        }
        StripeError::JSONDeserialize(message) => (false, message.clone()),
        StripeError::ClientError(message) => (true, format!("network: {message}")),
        StripeError::Timeout => (true, "timed out".to_owned()),
        StripeError::ConfigError(message) => (false, message.clone()),
    }
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
