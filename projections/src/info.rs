//! `SubscriptionInfo`: the JSON the API answers and the Redis cache holds.
//!
//! Built from an event's `CustomerView` only; it must never look anything up.

use aggregates::{CustomerView, InvoiceFacts, PaymentMethodFacts, SubscriptionEvent};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::log::LoggedEvent;

/// The latest invoice of the current subscription.
/// The schema of `aggregates::PaymentMethodFacts` as `SubscriptionInfo` serializes it:
/// the domain crate carries no schema derive (it stays pure), so its shape is described
/// here; the committed OpenAPI document and the schema tests catch any drift.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PaymentMethod {
    pub id: String,
    /// `card.brand` (for example `visa`), or the method's `type` when it is not a card.
    pub brand: Option<String>,
    pub last4: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LatestInvoice {
    pub id: String,
    pub status: Option<String>,
    pub attempt_count: u32,
    pub next_payment_attempt: Option<DateTime<Utc>>,
}

impl From<&InvoiceFacts> for LatestInvoice {
    fn from(invoice: &InvoiceFacts) -> Self {
        Self {
            id: invoice.id.clone(),
            status: invoice.status.clone(),
            attempt_count: invoice.attempt_count,
            next_payment_attempt: invoice.next_payment_attempt,
        }
    }
}

/// A customer's subscription as the API answers it. Timestamps serialize as RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "customer_id": "cus_123", "subscription_id": "sub_123", "status": "active",
    "price_id": "price_pro_monthly", "product_id": "prod_pro", "lookup_key": "pro_monthly",
    "plan": "pro", "quantity": 1, "current_period_start": "2026-11-25T00:00:00Z",
    "current_period_end": "2026-12-25T00:00:00Z", "cancel_at_period_end": false,
    "cancel_at": null, "canceled_at": null, "ended_at": null, "trial_end": null,
    "org_id": "org_123", "user_id": "user_9",
    "latest_invoice": {"id": "in_123", "status": "paid", "attempt_count": 1, "next_payment_attempt": null},
    "payment_method": {"id": "pm_123", "brand": "visa", "last4": "4242"},
    "version": 3, "updated_at": "2026-11-25T00:00:05Z"
}))]
pub struct SubscriptionInfo {
    pub customer_id: String,
    pub subscription_id: Option<String>,
    /// Stripe's status, or `"none"` when the customer has no subscription.
    pub status: String,
    pub price_id: Option<String>,
    pub product_id: Option<String>,
    pub lookup_key: Option<String>,
    pub plan: Option<String>,
    pub quantity: Option<u64>,
    pub current_period_start: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    pub cancel_at: Option<DateTime<Utc>>,
    pub canceled_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub trial_end: Option<DateTime<Utc>>,
    pub org_id: Option<String>,
    pub user_id: Option<String>,
    pub latest_invoice: Option<LatestInvoice>,
    /// The current subscription's default payment method, as the last sync saw it
    /// (webhooks carry only its id). Absent from answers stored before syncs existed.
    #[serde(default)]
    #[schema(value_type = Option<PaymentMethod>)]
    pub payment_method: Option<PaymentMethodFacts>,
    /// The aggregate version (event sequence) this answer reflects.
    pub version: u64,
    /// Stripe's time for the newest fact behind this answer.
    pub updated_at: DateTime<Utc>,
}

impl SubscriptionInfo {
    pub const NO_SUBSCRIPTION: &'static str = "none";

    pub fn from_view(
        view: &CustomerView,
        version: u64,
        updated_at: DateTime<Utc>,
        catalog: &Catalog,
    ) -> Self {
        let sub = view.subscription.as_ref();
        let mut info = Self {
            customer_id: view.customer_id.clone(),
            subscription_id: sub.map(|s| s.id.clone()),
            status: sub
                .map_or(Self::NO_SUBSCRIPTION, |s| s.status.as_str())
                .to_owned(),
            price_id: sub.and_then(|s| s.price_id.clone()),
            product_id: sub.and_then(|s| s.product_id.clone()),
            lookup_key: sub.and_then(|s| s.lookup_key.clone()),
            plan: None,
            quantity: sub.and_then(|s| s.quantity),
            current_period_start: sub.and_then(|s| s.current_period_start),
            current_period_end: sub.and_then(|s| s.current_period_end),
            cancel_at_period_end: sub.is_some_and(|s| s.cancel_at_period_end),
            cancel_at: sub.and_then(|s| s.cancel_at),
            canceled_at: sub.and_then(|s| s.canceled_at),
            ended_at: sub.and_then(|s| s.ended_at),
            trial_end: sub.and_then(|s| s.trial_end),
            org_id: view.org_id.clone(),
            user_id: view.user_id.clone(),
            latest_invoice: view.latest_invoice.as_ref().map(LatestInvoice::from),
            payment_method: view.payment_method.clone(),
            version,
            updated_at,
        };
        info.resolve_plan(catalog);
        info
    }

    /// The answer as of an event: its view, at the aggregate version after it (the
    /// event's sequence), stamped with the view's time or else the event's. Every
    /// projection builds its answer here, and so does a request that answers from what it
    /// just decided, so both are equal.
    pub fn from_event(event: &SubscriptionEvent, version: u64, catalog: &Catalog) -> Self {
        let view = event.view();
        let updated_at = view.as_of.unwrap_or(event.source().created);
        Self::from_view(view, version, updated_at, catalog)
    }

    /// The answer as of a logged event (see [`SubscriptionInfo::from_event`]).
    pub fn from_logged(logged: &LoggedEvent, catalog: &Catalog) -> Self {
        Self::from_event(&logged.event, logged.sequence, catalog)
    }

    /// Names the plan from the catalogue. The API calls this again on every read, so a
    /// catalogue change shows at once, without a replay.
    pub fn resolve_plan(&mut self, catalog: &Catalog) {
        self.plan = catalog
            .plan_for(
                self.price_id.as_deref(),
                self.lookup_key.as_deref(),
                self.product_id.as_deref(),
            )
            .map(|plan| plan.name);
    }
}
