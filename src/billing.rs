//! Checkout and the billing portal: the rules around sending a customer to Stripe's
//! hosted pages and bringing what happened there back before its webhooks arrive.
//!
//! An org has one live subscription at a time (a checkout while one is live is a
//! conflict; the portal is where it is changed). An org's Stripe customer is found in the
//! `subscriptions` table or created once (an idempotency key derived from the request
//! makes a double click one customer and one session), and the ownership a created
//! customer or a completed checkout session carries is recorded in the log at once, so
//! the next lookup by org finds it. Pages that come back from Stripe redirect only to a
//! relative path or a configured origin.
//!
//! This module never judges a Stripe fact (the aggregate does, through the ledger) and
//! never reads Stripe's JSON itself (`stripe::objects` does). It knows no HTTP: the
//! handlers in `http::checkout` map [`BillingError`] to a status.

use std::sync::Arc;

use aggregates::{Fact, FactSource, OwnerFacts, StripeFacts, SubscriptionCommand};
use chrono::{DateTime, Utc};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use projections::SubscriptionInfo;
use sha2::{Digest, Sha256};

use crate::config::Settings;
use crate::ledger::{ExecuteError, Ledger};
use crate::reads::Reads;
use crate::stripe::client::{CheckoutParams, StripeApiError};
use crate::stripe::objects;
use crate::sync::{SyncError, SyncReport, Syncer};
use crate::sync_log::SyncSource;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The org already has a subscription that is not terminal.
    #[error("org {org_id} already has a subscription ({subscription_id}) that is {status}")]
    LiveSubscription {
        org_id: String,
        subscription_id: String,
        status: String,
    },
    #[error("no customer for org {0}")]
    NoCustomerForOrg(String),
    #[error("no customer for checkout session {0}")]
    NoCustomerForSession(String),
    /// A redirect that is neither a relative path nor a configured origin.
    #[error("redirect to an origin that is not allowed")]
    RedirectNotAllowed,
    #[error("cannot read Postgres")]
    Storage(#[source] sqlx::Error),
    #[error("calling Stripe failed")]
    Stripe(#[from] StripeApiError),
    #[error("syncing the customer failed")]
    Sync(#[from] SyncError),
    #[error("recording the owner failed")]
    RecordOwner(#[source] ExecuteError),
    #[error("reading the customer's log failed")]
    ReadLog(#[source] ExecuteError),
}

/// A checkout to start, its fields already checked by the caller.
#[derive(Debug, Clone)]
pub struct NewCheckout {
    pub org_id: String,
    pub user_id: String,
    pub email: Option<String>,
    pub price_id: String,
    pub success_url: String,
    pub cancel_url: String,
}

/// A Checkout Session made for a [`NewCheckout`].
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"url": "https://checkout.stripe.com/c/pay/cs_test_123", "session_id": "cs_test_123", "customer_id": "cus_123"}))]
pub struct CheckoutSession {
    pub url: Option<String>,
    pub session_id: Option<String>,
    pub customer_id: String,
}

/// Whose billing portal to open.
#[derive(Debug, Clone)]
pub enum PortalFor {
    Customer(String),
    /// The customer the `subscriptions` table holds for the org.
    Org(String),
}

/// A billing portal session.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"url": "https://billing.stripe.com/p/session/test_123"}))]
pub struct PortalSession {
    pub url: Option<String>,
}

/// Checkout and portal. Exists only when a Stripe key is configured (it needs a
/// [`Syncer`]). Cheap to clone.
#[derive(Clone)]
pub struct Billing {
    syncer: Syncer,
    ledger: Ledger,
    reads: Reads,
    settings: Arc<Settings>,
}

impl Billing {
    pub fn new(syncer: Syncer, ledger: Ledger, reads: Reads, settings: Arc<Settings>) -> Self {
        Self {
            syncer,
            ledger,
            reads,
            settings,
        }
    }

    /// The org's customer (found, or created and recorded), a conflict when it already
    /// has a live subscription, then one Checkout Session per distinct request. With
    /// `SUBLEDGER_PUBLIC_URL` set, the session returns through `/checkout/success`, which
    /// syncs before redirecting to `success_url` (which must then be allowed).
    pub async fn checkout(&self, new: &NewCheckout) -> Result<CheckoutSession, BillingError> {
        let held = self
            .reads
            .org_in_table(&new.org_id)
            .await
            .map_err(BillingError::Storage)?;
        // Every customer linked to the org counts; a deleted one is never reused.
        let (deleted, linked): (Vec<&SubscriptionInfo>, Vec<&SubscriptionInfo>) =
            held.iter().partition(|info| info.deleted);
        for info in &linked {
            if let Some(live) = info.subscriptions.iter().find(|s| is_live(&s.status)) {
                return Err(BillingError::LiveSubscription {
                    org_id: new.org_id.clone(),
                    subscription_id: live.subscription_id.clone(),
                    status: live.status.clone(),
                });
            }
        }
        let customer_id = match linked.iter().max_by_key(|info| info.updated_at) {
            Some(info) => info.customer_id.clone(),
            None => {
                let deleted: Vec<&str> = deleted.iter().map(|i| i.customer_id.as_str()).collect();
                self.create_customer(new, &deleted).await?
            }
        };
        // A customer of a connected account is only found there (Connect).
        let account = self
            .ledger
            .account_of(&customer_id)
            .await
            .map_err(BillingError::ReadLog)?;
        let success = match &self.settings.public_url {
            Some(public) => {
                allowed_redirect(&self.settings.redirect_origins, &new.success_url)?;
                // Stripe fills in `{CHECKOUT_SESSION_ID}`, so only our value is encoded.
                // A connected account's session is read in that account on return: the page
                // is told whose it is, and finds the account in the customer's log.
                let customer = match &account {
                    Some(_) => format!("&customer={}", query_value(&customer_id)),
                    None => String::new(),
                };
                format!(
                    "{public}/checkout/success?session_id={{CHECKOUT_SESSION_ID}}{customer}&redirect={}",
                    query_value(&new.success_url)
                )
            }
            None => new.success_url.clone(),
        };
        let key = derived_key(
            "checkout",
            &[
                &customer_id,
                &new.org_id,
                &new.user_id,
                &new.price_id,
                &new.success_url,
                &new.cancel_url,
            ],
        );
        let session = self
            .syncer
            .api()
            .create_checkout_session(
                &CheckoutParams {
                    customer_id: &customer_id,
                    org_id: &new.org_id,
                    user_id: &new.user_id,
                    price_id: &new.price_id,
                    success_url: &success,
                    cancel_url: &new.cancel_url,
                    account: account.as_deref(),
                },
                &key,
            )
            .await?
            .value;
        Ok(CheckoutSession {
            url: objects::text(&session, "url"),
            session_id: objects::text(&session, "id"),
            customer_id,
        })
    }

    /// Creates the org's Stripe customer and records its owner. The same org, user and
    /// email always give the same idempotency key, so two concurrent first checkouts
    /// create one customer.
    ///
    /// Customers of the org that Stripe deleted (`deleted`) are part of the key, so that a
    /// checkout after a deletion creates a fresh customer rather than replaying the
    /// creation of the deleted one.
    async fn create_customer(
        &self,
        new: &NewCheckout,
        deleted: &[&str],
    ) -> Result<String, BillingError> {
        let email = new.email.as_deref();
        let mut parts = vec![
            new.org_id.as_str(),
            new.user_id.as_str(),
            email.unwrap_or(""),
        ];
        parts.extend_from_slice(deleted);
        let key = derived_key("customer", &parts);
        let customer = self
            .syncer
            .api()
            .create_customer(&new.org_id, &new.user_id, email, &key)
            .await?;
        // Stripe's clock, when the object carries no `created` of its own.
        let (customer, stripe_time) = (customer.value, customer.stripe_time);
        let customer_id = objects::text(&customer, "id")
            .ok_or_else(|| StripeApiError::Unexpected("a customer without an id".to_owned()))?;
        self.record_owner(
            &customer_id,
            OwnerFacts {
                org_id: Some(new.org_id.clone()),
                user_id: Some(new.user_id.clone()),
                // A customer we create lives in the platform's own account.
                account: None,
            },
            format!("api_customer_{customer_id}"),
            "api.customer.create",
            objects::created(&customer)
                .or(stripe_time)
                .unwrap_or_else(Utc::now),
        )
        .await?;
        Ok(customer_id)
    }

    /// What the success page does: reads the Checkout Session, records the ownership it
    /// carries and syncs its customer (so the subscription shows before its webhook).
    /// Returns the sync's report (its decided answer included).
    ///
    /// `customer` names whose session it is when subledger's success URL said so (a
    /// connected account's customer): the session is read in the account the customer's
    /// log names. A wrong name only makes the session not found.
    pub async fn sync_session(
        &self,
        session_id: &str,
        customer: Option<&str>,
        source: SyncSource,
    ) -> Result<SyncReport, BillingError> {
        let account = match customer {
            Some(customer) => self
                .ledger
                .account_of(customer)
                .await
                .map_err(BillingError::ReadLog)?,
            None => None,
        };
        let session = self
            .syncer
            .api()
            .retrieve_checkout_session(session_id, account.as_deref())
            .await?;
        let (session, stripe_time) = (session.value, session.stripe_time);
        let (customer_id, owner, created) = objects::checkout_session_owner(&session);
        let customer_id =
            customer_id.ok_or_else(|| BillingError::NoCustomerForSession(session_id.to_owned()))?;
        if !owner.is_empty() {
            self.record_owner(
                &customer_id,
                owner,
                format!("api_{session_id}"),
                "api.checkout.session.retrieve",
                created.or(stripe_time).unwrap_or_else(Utc::now),
            )
            .await?;
        }
        Ok(self.syncer.sync_customer(&customer_id, source).await?)
    }

    /// A billing portal session. With `SUBLEDGER_PUBLIC_URL` set, it returns through
    /// `/portal/return`, which syncs before redirecting to `return_url` (which must then be
    /// allowed).
    pub async fn portal(
        &self,
        whose: PortalFor,
        return_url: &str,
    ) -> Result<PortalSession, BillingError> {
        let customer_id = match whose {
            PortalFor::Customer(customer_id) => customer_id,
            PortalFor::Org(org_id) => {
                // The org's customer with a live subscription, else its newest one.
                let held = self
                    .reads
                    .org_in_table(&org_id)
                    .await
                    .map_err(BillingError::Storage)?;
                held.iter()
                    .filter(|info| !info.deleted)
                    .max_by_key(|info| {
                        (
                            info.subscriptions.iter().any(|s| is_live(&s.status)),
                            info.updated_at,
                        )
                    })
                    .map(|info| info.customer_id.clone())
                    .ok_or(BillingError::NoCustomerForOrg(org_id))?
            }
        };
        let back = match &self.settings.public_url {
            Some(public) => {
                allowed_redirect(&self.settings.redirect_origins, return_url)?;
                format!(
                    "{public}/portal/return?customer={customer_id}&redirect={}",
                    query_value(return_url)
                )
            }
            None => return_url.to_owned(),
        };
        // A customer of a connected account is only found there (Connect).
        let account = self
            .ledger
            .account_of(&customer_id)
            .await
            .map_err(BillingError::ReadLog)?;
        let session = self
            .syncer
            .api()
            .create_portal_session(&customer_id, &back, account.as_deref())
            .await?
            .value;
        Ok(PortalSession {
            url: objects::text(&session, "url"),
        })
    }

    /// Records ownership learned from an API answer (a created customer, a checkout
    /// session) as the facts of a Stripe object at its `created`.
    async fn record_owner(
        &self,
        customer_id: &str,
        owner: OwnerFacts,
        source_id: String,
        source_type: &str,
        created: DateTime<Utc>,
    ) -> Result<(), BillingError> {
        let command = SubscriptionCommand::RecordStripeFacts(StripeFacts {
            customer_id: customer_id.to_owned(),
            source: FactSource {
                stripe_event_id: source_id.clone(),
                stripe_event_type: source_type.to_owned(),
                created,
            },
            owner,
            fact: Fact::OwnerOnly,
        });
        let (decision, decided) = self
            .ledger
            .execute(customer_id, &command, &source_id)
            .await
            .map_err(BillingError::RecordOwner)?;
        if !decision.events.is_empty() {
            // So that the next lookup by org (a second click) finds the mapping.
            self.syncer
                .wait_for_projections(customer_id, decided.version)
                .await;
        }
        Ok(())
    }
}

/// Only a relative path or one of `origins` (`SUBLEDGER_REDIRECT_ORIGINS`): never an open
/// redirect. (A free function: the pages that come back from Stripe check it, and
/// redirect, even where no Stripe key is configured.)
pub fn allowed_redirect(origins: &[String], url: &str) -> Result<(), BillingError> {
    let relative = url.starts_with('/') && !url.starts_with("//") && !url.starts_with("/\\");
    let configured = origins.iter().any(|origin| {
        url == origin
            || url
                .strip_prefix(origin.as_str())
                .is_some_and(|rest| rest.starts_with(['/', '?', '#']))
    });
    if relative || configured {
        Ok(())
    } else {
        Err(BillingError::RedirectNotAllowed)
    }
}

/// Whether the org's subscription blocks a new checkout: anything but none or a terminal
/// status (one subscription per customer).
fn is_live(status: &str) -> bool {
    status
        .parse::<aggregates::SubscriptionStatus>()
        .is_ok_and(|s| !s.is_terminal())
}

/// An idempotency key from a request's identifying fields: the same request gives the
/// same key (Stripe keeps keys for at least 24 hours).
fn derived_key(kind: &str, parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    format!("subledger-{kind}-{}", hex::encode(&hash.finalize()[..16]))
}

/// What a query parameter's value may hold unencoded: RFC 3986's unreserved characters.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a query parameter's value.
fn query_value(text: &str) -> String {
    utf8_percent_encode(text, UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(derived_key("a", &["x", "y"]), derived_key("a", &["x", "y"]));
        assert_ne!(derived_key("a", &["xy", ""]), derived_key("a", &["x", "y"]));
        assert!(derived_key("checkout", &["x"]).len() < 255);
    }

    #[test]
    fn only_relative_paths_and_configured_origins_are_redirected_to() {
        let origins = ["https://app.example.test".to_owned()];
        for ok in [
            "/",
            "/welcome?x=1",
            "https://app.example.test",
            "https://app.example.test/welcome",
            "https://app.example.test?x",
            "https://app.example.test#top",
        ] {
            assert!(allowed_redirect(&origins, ok).is_ok(), "{ok}");
        }
        for refused in [
            "//evil.test/",
            "/\\evil.test/",
            "https://evil.test/",
            "https://app.example.test.evil.test/",
            "https://app.example.test@evil.test/",
            "welcome",
            "",
        ] {
            assert!(allowed_redirect(&origins, refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn percent_encoding_keeps_unreserved_characters() {
        assert_eq!(
            query_value("https://a.b/c?d=e&f"),
            "https%3A%2F%2Fa.b%2Fc%3Fd%3De%26f"
        );
        assert_eq!(query_value("a-b._~ é"), "a-b._~%20%C3%A9");
    }
}
