//! `SubscriptionInfo`: the JSON the API answers and the Redis cache holds for a customer.
//!
//! Built from an event's `CustomerView` only; it must never look anything up. It holds
//! every subscription of the customer with what deciding access needs (statuses, items,
//! periods, `cancel_at`, the latest invoice); what depends on the time or the catalogue
//! (plans, seats, features, access, `access_until`, which subscription is the primary one)
//! is filled in at read time by [`SubscriptionInfo::resolve`], so no stored answer
//! outlives a period or a catalogue change.

use aggregates::{
    CustomerView, InvoiceFacts, ItemFacts, PaymentMethodFacts, SubscriptionEvent,
    SubscriptionFacts, SubscriptionView, UsageType,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::log::LoggedEvent;

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

/// The latest invoice of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LatestInvoice {
    pub id: String,
    pub status: Option<String>,
    pub attempt_count: u32,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub next_payment_attempt: Option<DateTime<Utc>>,
    /// When Stripe created the invoice: the start of a `past_due` stretch (see the
    /// catalogue's `past_due_max_days`). Absent from answers stored before it was kept.
    #[serde(default, with = "aggregates::time::utc_option")]
    pub created: Option<DateTime<Utc>>,
}

impl From<&InvoiceFacts> for LatestInvoice {
    fn from(invoice: &InvoiceFacts) -> Self {
        Self {
            id: invoice.id.clone(),
            status: invoice.status.clone(),
            attempt_count: invoice.attempt_count,
            next_payment_attempt: invoice.next_payment_attempt,
            created: invoice.created,
        }
    }
}

/// One subscription item as the API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ItemInfo {
    pub id: Option<String>,
    pub price_id: Option<String>,
    pub product_id: Option<String>,
    pub lookup_key: Option<String>,
    pub quantity: Option<u64>,
    /// `licensed` or `metered`; `null` when Stripe did not say (counted as licensed).
    #[schema(value_type = Option<String>, example = "licensed")]
    pub usage_type: Option<UsageType>,
    /// The catalogue plan this item's price names (price id, then lookup key, then
    /// product); always `null` for a metered item. Filled at read time.
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub current_period_end: Option<DateTime<Utc>>,
}

impl From<&ItemFacts> for ItemInfo {
    fn from(item: &ItemFacts) -> Self {
        Self {
            id: item.id.clone(),
            price_id: item.price_id.clone(),
            product_id: item.product_id.clone(),
            lookup_key: item.lookup_key.clone(),
            quantity: item.quantity,
            usage_type: item.usage_type,
            plan: None,
            current_period_end: item.current_period_end,
        }
    }
}

/// One subscription of a customer as the API answers it. The stored fields come from the
/// log; `plan`, `seats`, `features`, `access` and `access_until` are judged at read time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubscriptionEntry {
    pub subscription_id: String,
    pub status: String,
    /// When Stripe created the subscription.
    #[serde(default, with = "aggregates::time::utc_option")]
    pub created: Option<DateTime<Utc>>,
    pub plan: Option<String>,
    /// The quantity of the licensed items naming `plan`.
    pub seats: Option<u64>,
    pub features: Vec<String>,
    pub access: bool,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub access_until: Option<DateTime<Utc>>,
    pub items: Vec<ItemInfo>,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub current_period_start: Option<DateTime<Utc>>,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub current_period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub cancel_at: Option<DateTime<Utc>>,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub canceled_at: Option<DateTime<Utc>>,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub ended_at: Option<DateTime<Utc>>,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub trial_end: Option<DateTime<Utc>>,
    /// `status_details.paused.subscription.type` of a paused subscription.
    pub pause_reason: Option<String>,
    pub latest_invoice: Option<LatestInvoice>,
    #[schema(value_type = Option<PaymentMethod>)]
    pub payment_method: Option<PaymentMethodFacts>,
}

impl SubscriptionEntry {
    fn from_view(view: &SubscriptionView) -> Self {
        let s: &SubscriptionFacts = &view.subscription;
        Self {
            subscription_id: s.id.clone(),
            status: s.status.as_str().to_owned(),
            created: s.created,
            plan: None,
            seats: None,
            features: vec![],
            access: false,
            access_until: None,
            items: s.all_items().iter().map(ItemInfo::from).collect(),
            current_period_start: s.current_period_start,
            current_period_end: s.current_period_end,
            cancel_at_period_end: s.cancel_at_period_end,
            cancel_at: s.cancel_at,
            canceled_at: s.canceled_at,
            ended_at: s.ended_at,
            trial_end: s.trial_end,
            pause_reason: s.pause_reason.clone(),
            latest_invoice: view.latest_invoice.as_ref().map(LatestInvoice::from),
            payment_method: view.payment_method.clone(),
        }
    }

    /// The top-level price fields: the first item's (as the answer always showed them).
    fn first_price(&self) -> (Option<String>, Option<String>, Option<String>, Option<u64>) {
        match self.items.first() {
            Some(item) => (
                item.price_id.clone(),
                item.product_id.clone(),
                item.lookup_key.clone(),
                item.quantity,
            ),
            None => (None, None, None, None),
        }
    }
}

/// A customer's subscriptions as the API answers them. Timestamps serialize as RFC 3339
/// UTC. The top-level subscription fields describe the primary subscription (see
/// [`Catalog::primary`]); `subscriptions` lists every one, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "customer_id": "cus_123", "subscription_id": "sub_123", "status": "active",
    "price_id": "price_pro_monthly", "product_id": "prod_pro", "lookup_key": "pro_monthly",
    "plan": "pro", "quantity": 5, "current_period_start": "2026-11-25T00:00:00Z",
    "current_period_end": "2026-12-25T00:00:00Z", "cancel_at_period_end": false,
    "cancel_at": null, "canceled_at": null, "ended_at": null, "trial_end": null,
    "org_id": "org_123", "user_id": "user_9",
    "latest_invoice": {"id": "in_123", "status": "paid", "attempt_count": 1, "next_payment_attempt": null,
        "created": "2026-11-25T00:00:00Z"},
    "payment_method": {"id": "pm_123", "brand": "visa", "last4": "4242"},
    "version": 3, "updated_at": "2026-11-25T00:00:05Z",
    "access": true, "access_until": "2026-12-26T00:00:00Z", "seats": 5, "pause_reason": null,
    "deleted": false, "stripe_features": [], "account": null,
    "subscriptions": [{
        "subscription_id": "sub_123", "status": "active", "created": "2026-10-25T00:00:00Z",
        "plan": "pro", "seats": 5, "features": ["projects:unlimited", "api", "priority_support"],
        "access": true, "access_until": "2026-12-26T00:00:00Z",
        "items": [
            {"id": "si_1", "price_id": "price_pro_monthly", "product_id": "prod_pro", "lookup_key": "pro_monthly",
             "quantity": 5, "usage_type": "licensed", "plan": "pro", "current_period_end": "2026-12-25T00:00:00Z"},
            {"id": "si_2", "price_id": "price_api_calls", "product_id": "prod_api", "lookup_key": null,
             "quantity": null, "usage_type": "metered", "plan": null, "current_period_end": "2026-12-25T00:00:00Z"}
        ],
        "current_period_start": "2026-11-25T00:00:00Z", "current_period_end": "2026-12-25T00:00:00Z",
        "cancel_at_period_end": false, "cancel_at": null, "canceled_at": null, "ended_at": null,
        "trial_end": null, "pause_reason": null,
        "latest_invoice": {"id": "in_123", "status": "paid", "attempt_count": 1, "next_payment_attempt": null,
            "created": "2026-11-25T00:00:00Z"},
        "payment_method": {"id": "pm_123", "brand": "visa", "last4": "4242"}
    }]
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
    #[serde(default, with = "aggregates::time::utc_option")]
    pub current_period_start: Option<DateTime<Utc>>,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub current_period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub cancel_at: Option<DateTime<Utc>>,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub canceled_at: Option<DateTime<Utc>>,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub ended_at: Option<DateTime<Utc>>,
    #[serde(default, with = "aggregates::time::utc_option")]
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
    #[serde(with = "aggregates::time::utc")]
    pub updated_at: DateTime<Utc>,
    /// Whether the primary subscription grants access now (judged at read time).
    #[serde(default)]
    pub access: bool,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub access_until: Option<DateTime<Utc>>,
    /// The primary subscription's seats: the quantity of its licensed items naming `plan`.
    #[serde(default)]
    pub seats: Option<u64>,
    #[serde(default)]
    pub pause_reason: Option<String>,
    /// Stripe deleted this customer: it belongs to no org or user any more.
    #[serde(default)]
    pub deleted: bool,
    /// The customer's active Stripe Entitlements features (lookup keys), newest summary.
    #[serde(default)]
    pub stripe_features: Vec<String>,
    /// Every subscription of the customer, newest first. Answers stored before this field
    /// existed are read as their one top-level subscription.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionEntry>,
    /// The Connect account the customer lives in (`acct_…`), as the newest event naming
    /// one said; `null` for the platform's own customers. Every call subledger makes to
    /// Stripe about the customer is made for it (`Stripe-Account`).
    #[serde(default)]
    pub account: Option<String>,
}

impl SubscriptionInfo {
    pub const NO_SUBSCRIPTION: &'static str = "none";

    /// The stored answer for a view. `catalog` and `now` only fill the read-time fields
    /// as a read at `now` would; every reader resolves again on the way out.
    pub fn from_view(
        view: &CustomerView,
        version: u64,
        updated_at: DateTime<Utc>,
        catalog: &Catalog,
    ) -> Self {
        let subscriptions: Vec<SubscriptionEntry> = view
            .all_subscriptions()
            .iter()
            .map(SubscriptionEntry::from_view)
            .collect();
        let mut info = Self {
            customer_id: view.customer_id.clone(),
            subscription_id: None,
            status: Self::NO_SUBSCRIPTION.to_owned(),
            price_id: None,
            product_id: None,
            lookup_key: None,
            plan: None,
            quantity: None,
            current_period_start: None,
            current_period_end: None,
            cancel_at_period_end: false,
            cancel_at: None,
            canceled_at: None,
            ended_at: None,
            trial_end: None,
            org_id: view.org_id.clone(),
            user_id: view.user_id.clone(),
            latest_invoice: None,
            payment_method: None,
            version,
            updated_at,
            access: false,
            access_until: None,
            seats: None,
            pause_reason: None,
            deleted: view.deleted,
            stripe_features: view.stripe_features.clone().unwrap_or_default(),
            subscriptions,
            account: view.account.clone(),
        };
        // Stored as the view's current subscription would be judged at its own time, so
        // that what is stored does not depend on when the projection ran.
        info.resolve(catalog, updated_at);
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

    /// The org and user this customer belongs to now: none once Stripe deleted it.
    pub fn linked_owners(&self) -> (Option<&str>, Option<&str>) {
        if self.deleted {
            return (None, None);
        }
        (self.org_id.as_deref(), self.user_id.as_deref())
    }

    /// Judges every subscription against the catalogue at `now` (plans, seats, features,
    /// access, `access_until`) and fills the top-level fields from the primary one. Every
    /// read calls it, so a catalogue change or the passing of a period end shows at once,
    /// without a replay. An answer stored before `subscriptions` existed is first read as
    /// its one top-level subscription.
    pub fn resolve(&mut self, catalog: &Catalog, now: DateTime<Utc>) {
        if self.subscriptions.is_empty() {
            if let Some(id) = self.subscription_id.clone() {
                self.subscriptions.push(self.legacy_entry(id));
            }
        }
        for entry in &mut self.subscriptions {
            catalog.judge(entry, now);
        }
        let primary = catalog
            .primary(self.subscriptions.iter().collect())
            .cloned();
        self.set_top_level(primary.as_ref());
    }

    fn set_top_level(&mut self, primary: Option<&SubscriptionEntry>) {
        let Some(p) = primary else {
            self.subscription_id = None;
            self.status = Self::NO_SUBSCRIPTION.to_owned();
            (
                self.price_id,
                self.product_id,
                self.lookup_key,
                self.quantity,
            ) = (None, None, None, None);
            self.plan = None;
            self.access = false;
            self.access_until = None;
            self.seats = None;
            return;
        };
        let (price_id, product_id, lookup_key, quantity) = p.first_price();
        self.subscription_id = Some(p.subscription_id.clone());
        self.status = p.status.clone();
        self.price_id = price_id;
        self.product_id = product_id;
        self.lookup_key = lookup_key;
        self.quantity = quantity;
        self.plan = p.plan.clone();
        self.current_period_start = p.current_period_start;
        self.current_period_end = p.current_period_end;
        self.cancel_at_period_end = p.cancel_at_period_end;
        self.cancel_at = p.cancel_at;
        self.canceled_at = p.canceled_at;
        self.ended_at = p.ended_at;
        self.trial_end = p.trial_end;
        self.latest_invoice = p.latest_invoice.clone();
        self.payment_method = p.payment_method.clone();
        self.access = p.access;
        self.access_until = p.access_until;
        self.seats = p.seats;
        self.pause_reason = p.pause_reason.clone();
    }

    /// The one subscription an answer stored before `subscriptions` existed describes.
    fn legacy_entry(&self, subscription_id: String) -> SubscriptionEntry {
        let item =
            (self.price_id.is_some() || self.lookup_key.is_some() || self.product_id.is_some())
                .then(|| ItemInfo {
                    id: None,
                    price_id: self.price_id.clone(),
                    product_id: self.product_id.clone(),
                    lookup_key: self.lookup_key.clone(),
                    quantity: self.quantity,
                    usage_type: None,
                    plan: None,
                    current_period_end: self.current_period_end,
                });
        SubscriptionEntry {
            subscription_id,
            status: self.status.clone(),
            created: None,
            plan: None,
            seats: None,
            features: vec![],
            access: false,
            access_until: None,
            items: item.into_iter().collect(),
            current_period_start: self.current_period_start,
            current_period_end: self.current_period_end,
            cancel_at_period_end: self.cancel_at_period_end,
            cancel_at: self.cancel_at,
            canceled_at: self.canceled_at,
            ended_at: self.ended_at,
            trial_end: self.trial_end,
            pause_reason: None,
            latest_invoice: self.latest_invoice.clone(),
            payment_method: self.payment_method.clone(),
        }
    }
}
