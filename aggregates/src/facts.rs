//! The facts Stripe tells us, in the shape the domain needs (not Stripe's wire shape).
//!
//! `src/stripe` turns a webhook payload of any API version into these; the aggregate
//! decides on them and its events carry them to the projections. Everything here is
//! plain data: no parsing of Stripe's JSON and no IO may ever live in this module.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::status::SubscriptionStatus;

/// Which Stripe event told us a fact, and when Stripe says it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactSource {
    pub stripe_event_id: String,
    pub stripe_event_type: String,
    /// Stripe's `created` for the event (one-second resolution).
    #[serde(with = "crate::time::utc")]
    pub created: DateTime<Utc>,
}

/// A subscription as one Stripe snapshot describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionFacts {
    pub id: String,
    pub status: SubscriptionStatus,
    /// When Stripe created the subscription (not the event): orders a customer's
    /// subscriptions, newest first.
    #[serde(default, with = "crate::time::utc_option")]
    pub created: Option<DateTime<Utc>>,
    pub price_id: Option<String>,
    pub product_id: Option<String>,
    pub lookup_key: Option<String>,
    pub quantity: Option<u64>,
    #[serde(default, with = "crate::time::utc_option")]
    pub current_period_start: Option<DateTime<Utc>>,
    #[serde(default, with = "crate::time::utc_option")]
    pub current_period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    #[serde(default, with = "crate::time::utc_option")]
    pub cancel_at: Option<DateTime<Utc>>,
    #[serde(default, with = "crate::time::utc_option")]
    pub canceled_at: Option<DateTime<Utc>>,
    #[serde(default, with = "crate::time::utc_option")]
    pub ended_at: Option<DateTime<Utc>>,
    #[serde(default, with = "crate::time::utc_option")]
    pub trial_start: Option<DateTime<Utc>>,
    #[serde(default, with = "crate::time::utc_option")]
    pub trial_end: Option<DateTime<Utc>>,
    pub latest_invoice_id: Option<String>,
    pub currency: Option<String>,
    /// Every item of the subscription (`items.data[]`), in Stripe's order. Absent from
    /// facts recorded before items were read: [`SubscriptionFacts::all_items`] then makes
    /// one licensed item of the price fields above, which is what those facts meant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<ItemFacts>,
    /// Why a `paused` subscription is paused: `status_details.paused.subscription.type`
    /// (API 2026-09-30.endive: `first_payment_failure`, `final_payment_failure`, or a
    /// requested pause or a trial that ended without a payment method), as Stripe spells it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
}

impl SubscriptionFacts {
    /// The subscription's items; for facts recorded before items were read, one item made
    /// of the subscription's price fields (the first item's, as they were read then),
    /// counted as licensed as the answer then did.
    pub fn all_items(&self) -> Vec<ItemFacts> {
        if !self.items.is_empty()
            || self.price_id.is_none() && self.lookup_key.is_none() && self.product_id.is_none()
        {
            return self.items.clone();
        }
        vec![ItemFacts {
            id: None,
            price_id: self.price_id.clone(),
            product_id: self.product_id.clone(),
            lookup_key: self.lookup_key.clone(),
            quantity: self.quantity,
            usage_type: None,
            current_period_start: self.current_period_start,
            current_period_end: self.current_period_end,
        }]
    }
}

/// How a price charges: `price.recurring.usage_type` (or the legacy `plan.usage_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageType {
    /// Per seat: the item's `quantity` is the number of seats.
    Licensed,
    /// By reported usage: the quantity means nothing and the item never names the plan.
    Metered,
}

/// One subscription item: its price and how many.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ItemFacts {
    /// The item's id (`si_…`); `None` only for items made from legacy facts.
    pub id: Option<String>,
    pub price_id: Option<String>,
    pub product_id: Option<String>,
    pub lookup_key: Option<String>,
    pub quantity: Option<u64>,
    /// `None` when the payload does not say (a one-off price, an old shape): licensed.
    pub usage_type: Option<UsageType>,
    /// Since basil (2025-03-31) the period is per item.
    #[serde(default, with = "crate::time::utc_option")]
    pub current_period_start: Option<DateTime<Utc>>,
    #[serde(default, with = "crate::time::utc_option")]
    pub current_period_end: Option<DateTime<Utc>>,
}

impl ItemFacts {
    /// Whether the item counts seats (only a licensed item may name the plan).
    pub fn is_licensed(&self) -> bool {
        self.usage_type != Some(UsageType::Metered)
    }
}

/// The card (or other method) a subscription charges by default, as Stripe's API shows it
/// when `default_payment_method` is expanded. Webhook payloads carry only its id, so only
/// a sync records this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentMethodFacts {
    pub id: String,
    /// `card.brand` (for example `visa`), or the method's `type` when it is not a card.
    pub brand: Option<String>,
    pub last4: Option<String>,
}

/// What Stripe's API answered when we asked it about a customer's subscriptions: the
/// truth as of `fetched_at`. Stripe stamps no `created` on an API answer, so the caller
/// stamps Stripe's clock from the answer's `Date` header (whole seconds, the resolution of
/// Stripe's own `created`; ours only when Stripe sent none), and the aggregate orders the
/// snapshot by it; it never reads a clock itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiSnapshot {
    pub customer_id: String,
    /// Our id for this sync (becomes the events' `stripe_event_id`, e.g. `sync_…`).
    pub sync_id: String,
    /// Which API call produced it (becomes the events' `stripe_event_type`, e.g.
    /// `api.subscriptions.list`).
    pub api_call: String,
    /// The time the answer is true as of, truncated to the second: Stripe's clock when it
    /// answered (the response's `Date` header), or the caller's when the request was sent
    /// if Stripe gave none.
    #[serde(with = "crate::time::utc")]
    pub fetched_at: DateTime<Utc>,
    /// Ownership the listed objects carry (their metadata).
    pub owner: OwnerFacts,
    /// Every subscription the answer listed, each with its default payment method when
    /// Stripe expanded it. Subscriptions we hold that the answer does not list are left
    /// alone: a page of a backfill lists only some of a customer's subscriptions.
    pub subscriptions: Vec<(SubscriptionFacts, Option<PaymentMethodFacts>)>,
    /// The lookup keys of the customer's active Stripe Entitlements features
    /// (`GET /v1/entitlements/active_entitlements`), when the sync asked for them.
    #[serde(default)]
    pub entitlements: Option<Vec<String>>,
}

/// An invoice's payment facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceFacts {
    pub id: String,
    pub status: Option<String>,
    pub attempt_count: u32,
    #[serde(default, with = "crate::time::utc_option")]
    pub next_payment_attempt: Option<DateTime<Utc>>,
    /// When Stripe created the invoice: the newest invoice is a subscription's latest.
    #[serde(default, with = "crate::time::utc_option")]
    pub created: Option<DateTime<Utc>>,
    pub amount_due: Option<i64>,
    pub currency: Option<String>,
}

impl InvoiceFacts {
    /// How settled an invoice is: a later fact about the same invoice never goes back.
    pub fn status_rank(&self) -> u8 {
        match self.status.as_deref() {
            Some("draft") | None => 0,
            Some("open") => 1,
            Some(_) => 2, // paid, uncollectible, void
        }
    }
}

/// A payment intent's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFacts {
    pub id: String,
    pub status: String,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub invoice_id: Option<String>,
}

/// Who a customer belongs to, as far as one Stripe object says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerFacts {
    pub org_id: Option<String>,
    pub user_id: Option<String>,
    /// The Connect account the customer lives in: `account` on a snapshot event, `context`
    /// on a thin one, or the account an API answer was asked for. Every later call to
    /// Stripe about the customer carries it (`Stripe-Account`). `None`: not said (the
    /// platform's own customers never say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

impl OwnerFacts {
    pub fn is_empty(&self) -> bool {
        self.org_id.is_none() && self.user_id.is_none() && self.account.is_none()
    }
}

/// What one Stripe event says, beyond who owns the customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fact {
    /// A full subscription snapshot (`customer.subscription.*`).
    Subscription(SubscriptionFacts),
    /// A subscription invoice's payment state (`invoice.*`).
    Invoice {
        subscription_id: String,
        invoice: InvoiceFacts,
    },
    /// A payment intent's outcome (`payment_intent.*`).
    Payment(PaymentFacts),
    /// Only ownership (`checkout.session.completed`, `customer.*`).
    OwnerOnly,
    /// The customer was deleted in Stripe (`customer.deleted`): its owner links end.
    CustomerDeleted,
    /// The lookup keys of every feature the customer is entitled to in Stripe
    /// Entitlements (`entitlements.active_entitlement_summary.updated`): the whole set.
    Entitlements { features: Vec<String> },
    /// A handled event that carries nothing the customer's state depends on (for example
    /// `invoice.upcoming`, whose invoice has no id yet). Recorded, changes nothing.
    Nothing { reason: String },
}
