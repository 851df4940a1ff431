//! The per-customer `Subscription` aggregate: its command, events, errors, `decide` and
//! `apply`.
//!
//! One aggregate per Stripe customer holds every subscription the customer has had,
//! who the customer belongs to, and the latest payment facts. `decide` is pure and is
//! the only place that judges a Stripe fact (newer, stale, legal, illegal); `apply` is
//! infallible and only folds an already-decided event into state. This module must never
//! do IO, read a clock, or look at Stripe's JSON.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::facts::{
    ApiSnapshot, Fact, FactSource, InvoiceFacts, OwnerFacts, PaymentFacts, PaymentMethodFacts,
    SubscriptionFacts,
};
use crate::status::{transition, Move, SubscriptionStatus};

/// The commands: record what one Stripe event says about a customer, or reconcile with
/// what Stripe's API answered when we asked.
// A command lives for one decision and is never stored, so its size costs nothing worth
// a box on every construction site.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubscriptionCommand {
    RecordStripeFacts(StripeFacts),
    /// Stripe's API is the truth as of the time the request was sent: each listed
    /// subscription that differs from what we hold is recorded as
    /// [`SubscriptionEvent::SubscriptionReconciled`], unless we hold a fact newer than the
    /// request (see [`decide`] for the ordering rule).
    Reconcile(ApiSnapshot),
}

/// Everything the domain needs from one Stripe event, already parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeFacts {
    pub customer_id: String,
    pub source: FactSource,
    pub owner: OwnerFacts,
    pub fact: Fact,
}

/// The customer's entitlement-relevant state after an event: what every projection
/// writes, so that no projection re-derives which subscription is current.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerView {
    pub customer_id: String,
    pub org_id: Option<String>,
    pub user_id: Option<String>,
    /// The current subscription: the newest non-terminal one, else the newest.
    pub subscription: Option<SubscriptionFacts>,
    /// The latest invoice of the current subscription.
    pub latest_invoice: Option<InvoiceFacts>,
    /// Stripe's time for the newest fact in this view (so it does not depend on the
    /// order in which facts arrived).
    #[serde(default, with = "crate::time::utc_option")]
    pub as_of: Option<DateTime<Utc>>,
    /// The current subscription's default payment method, as the last sync saw it.
    /// Absent from events written before syncs existed (and skipped when empty, so those
    /// events' JSON is unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_method: Option<PaymentMethodFacts>,
    /// Every subscription the customer has had, newest first (by Stripe's `created`,
    /// then id), each with its latest invoice: the answers are judged over all of them.
    /// Absent from events written before this field (one subscription per customer was
    /// all the answer showed); readers then take `subscription` alone (see
    /// [`CustomerView::all_subscriptions`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<SubscriptionView>,
    /// Stripe deleted the customer (`customer.deleted`): it belongs to no org or user any
    /// more, whatever `org_id`/`user_id` last said.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// The lookup keys of the customer's active Stripe Entitlements features, as the
    /// newest summary (webhook or sync) gave them; `None` when none was ever seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_features: Option<Vec<String>>,
    /// The Connect account the customer lives in, as the newest event that named one said
    /// (see [`OwnerFacts::account`]); absent for the platform's own customers and from
    /// events written before Connect was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

/// One subscription in a [`CustomerView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionView {
    pub subscription: SubscriptionFacts,
    pub latest_invoice: Option<InvoiceFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_method: Option<PaymentMethodFacts>,
}

impl CustomerView {
    /// Every subscription of the customer. A view stored before `subscriptions` existed
    /// (an old log replayed) gives its one current subscription: the upcast of that shape.
    /// Borrowed when the view holds `subscriptions` (every view written now).
    pub fn all_subscriptions(&self) -> Cow<'_, [SubscriptionView]> {
        if !self.subscriptions.is_empty() {
            return Cow::Borrowed(&self.subscriptions);
        }
        self.subscription
            .iter()
            .map(|subscription| SubscriptionView {
                subscription: subscription.clone(),
                latest_invoice: self.latest_invoice.clone(),
                payment_method: self.payment_method.clone(),
            })
            .collect()
    }
}

/// Stored events. Their serialized shape is a persistence format: change it only together
/// with an upcaster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubscriptionEvent {
    OwnerLinked {
        source: FactSource,
        /// The org id, when this event changed it.
        org_id: Option<String>,
        /// The user id, when this event changed it.
        user_id: Option<String>,
        /// The Connect account, when this event changed it. Absent from events written
        /// before Connect was read (they changed no account).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        account: Option<String>,
        view: CustomerView,
    },
    SubscriptionChanged {
        source: FactSource,
        from: Option<SubscriptionStatus>,
        transition: Move,
        subscription: SubscriptionFacts,
        view: CustomerView,
    },
    InvoiceRecorded {
        source: FactSource,
        subscription_id: String,
        invoice: InvoiceFacts,
        view: CustomerView,
    },
    PaymentRecorded {
        source: FactSource,
        payment: PaymentFacts,
        view: CustomerView,
    },
    /// A subscription as Stripe's API showed it, recorded because it differed from what we
    /// held. `source` names the sync (`stripe_event_id` = our sync id, `stripe_event_type`
    /// = the API call) and `created` is when the request was sent.
    SubscriptionReconciled {
        source: FactSource,
        from: Option<SubscriptionStatus>,
        /// What the transition table calls this move. Recorded for the reader; the API's
        /// answer is taken even when the table calls it illegal, because it is the truth
        /// and what we held was not.
        transition: Move,
        subscription: SubscriptionFacts,
        payment_method: Option<PaymentMethodFacts>,
        view: CustomerView,
    },
    /// Stripe deleted the customer (`customer.deleted`): its links to an org and a user
    /// end. Stripe never revives a deleted customer id.
    CustomerDeleted {
        source: FactSource,
        view: CustomerView,
    },
    /// The customer's active Stripe Entitlements features (their lookup keys), the whole
    /// set, as a summary webhook or a sync of the active entitlements gave it.
    EntitlementsRecorded {
        source: FactSource,
        features: Vec<String>,
        view: CustomerView,
    },
}

impl SubscriptionEvent {
    pub fn source(&self) -> &FactSource {
        match self {
            Self::OwnerLinked { source, .. }
            | Self::SubscriptionChanged { source, .. }
            | Self::InvoiceRecorded { source, .. }
            | Self::PaymentRecorded { source, .. }
            | Self::SubscriptionReconciled { source, .. }
            | Self::CustomerDeleted { source, .. }
            | Self::EntitlementsRecorded { source, .. } => source,
        }
    }

    pub fn view(&self) -> &CustomerView {
        match self {
            Self::OwnerLinked { view, .. }
            | Self::SubscriptionChanged { view, .. }
            | Self::InvoiceRecorded { view, .. }
            | Self::PaymentRecorded { view, .. }
            | Self::SubscriptionReconciled { view, .. }
            | Self::CustomerDeleted { view, .. }
            | Self::EntitlementsRecorded { view, .. } => view,
        }
    }

    /// The subscription a snapshot event (`SubscriptionChanged`, `SubscriptionReconciled`)
    /// carries; `None` for the other events.
    pub fn snapshot_of(&self) -> Option<&str> {
        match self {
            Self::SubscriptionChanged { subscription, .. }
            | Self::SubscriptionReconciled { subscription, .. } => Some(&subscription.id),
            _ => None,
        }
    }

    fn view_mut(&mut self) -> &mut CustomerView {
        match self {
            Self::OwnerLinked { view, .. }
            | Self::SubscriptionChanged { view, .. }
            | Self::InvoiceRecorded { view, .. }
            | Self::PaymentRecorded { view, .. }
            | Self::SubscriptionReconciled { view, .. }
            | Self::CustomerDeleted { view, .. }
            | Self::EntitlementsRecorded { view, .. } => view,
        }
    }
}

impl DomainEvent for SubscriptionEvent {
    fn event_type(&self) -> String {
        match self {
            Self::OwnerLinked { .. } => "OwnerLinked",
            Self::SubscriptionChanged { .. } => "SubscriptionChanged",
            Self::InvoiceRecorded { .. } => "InvoiceRecorded",
            Self::PaymentRecorded { .. } => "PaymentRecorded",
            Self::SubscriptionReconciled { .. } => "SubscriptionReconciled",
            Self::CustomerDeleted { .. } => "CustomerDeleted",
            Self::EntitlementsRecorded { .. } => "EntitlementsRecorded",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why a well-formed Stripe fact changed nothing. The webhook is still acknowledged; the
/// reason is recorded on the inbox row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejection {
    #[error("stale: {subscription_id} was already updated by a fact from {applied} (this one is from {created})")]
    Stale {
        subscription_id: String,
        #[serde(with = "crate::time::utc")]
        created: DateTime<Utc>,
        #[serde(with = "crate::time::utc")]
        applied: DateTime<Utc>,
    },
    #[error("stale: same second as the applied fact for {subscription_id}, which the table orders after this one ({from} -> {to} not taken)")]
    SameSecond {
        subscription_id: String,
        from: SubscriptionStatus,
        to: SubscriptionStatus,
    },
    #[error("illegal transition for {subscription_id}: {} -> {to}", from.map_or("none", |s| s.as_str()))]
    IllegalTransition {
        subscription_id: String,
        from: Option<SubscriptionStatus>,
        to: SubscriptionStatus,
    },
    #[error("stale: invoice {invoice_id} is older than the invoice facts already held")]
    StaleInvoice { invoice_id: String },
    #[error("stale: payment {payment_id} is older than the payment facts already held")]
    StalePayment { payment_id: String },
    #[error("stale: an entitlements summary from {applied} is already held (this one is from {created})")]
    StaleEntitlements {
        #[serde(with = "crate::time::utc")]
        created: DateTime<Utc>,
        #[serde(with = "crate::time::utc")]
        applied: DateTime<Utc>,
    },
}

/// The aggregate's error: a rejected fact, or a command sent to the wrong aggregate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("command for customer {got} sent to aggregate {expected}")]
    WrongCustomer { expected: String, got: String },
}

/// How `decide` judged a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The fact changed state.
    Applied,
    /// The same fact is already held (a duplicate delivery, or a re-run after a crash).
    Duplicate,
    /// The fact was judged and rejected; state is unchanged (but see [`Decision::events`]:
    /// ownership carried by the same Stripe event is still recorded).
    Rejected(Rejection),
    /// The event carries nothing to record.
    NothingToRecord(String),
}

impl Outcome {
    /// The short name the inbox, metrics and docs use.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected(Rejection::IllegalTransition { .. }) => "illegal",
            Outcome::Rejected(_) => "stale",
            Outcome::NothingToRecord(_) => "ignored",
        }
    }
}

/// The result of [`decide`]: the events to store and how the command was judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub events: Vec<SubscriptionEvent>,
    pub outcome: Outcome,
}

/// A value and the Stripe time it was observed at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed<T> {
    pub value: T,
    #[serde(with = "crate::time::utc")]
    pub observed_at: DateTime<Utc>,
    pub stripe_event_id: String,
}

impl<T> Observed<T> {
    fn new(value: T, source: &FactSource) -> Self {
        Self {
            value,
            observed_at: source.created,
            stripe_event_id: source.stripe_event_id.clone(),
        }
    }
}

/// What the aggregate holds about one subscription id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    /// The newest snapshot applied; `None` while we only know its invoices.
    pub snapshot: Option<Observed<SubscriptionFacts>>,
    pub latest_invoice: Option<Observed<InvoiceFacts>>,
    /// The default payment method the last sync that recorded this subscription saw.
    #[serde(default)]
    pub payment_method: Option<PaymentMethodFacts>,
}

/// The per-customer aggregate (id = Stripe customer id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub customer_id: Option<String>,
    pub org: Option<Observed<String>>,
    pub user: Option<Observed<String>>,
    pub subscriptions: BTreeMap<String, SubscriptionRecord>,
    pub last_payment: Option<Observed<PaymentFacts>>,
    /// When Stripe deleted the customer, if it did.
    #[serde(default)]
    pub deleted: Option<Observed<()>>,
    /// The newest Stripe Entitlements summary (feature lookup keys, sorted).
    #[serde(default)]
    pub entitlements: Option<Observed<Vec<String>>>,
    /// The Connect account the customer lives in (a register like the owner's: the newest
    /// observation wins).
    #[serde(default)]
    pub account: Option<Observed<String>>,
}

impl Subscription {
    /// The current subscription: the newest (by Stripe's subscription `created`, then id)
    /// non-terminal one, else the newest.
    pub fn current(&self) -> Option<&Observed<SubscriptionFacts>> {
        let newest = |terminal_ok: bool| {
            self.subscriptions
                .values()
                .filter_map(|record| record.snapshot.as_ref())
                .filter(|snap| terminal_ok || !snap.value.status.is_terminal())
                .max_by(|a, b| (a.value.created, &a.value.id).cmp(&(b.value.created, &b.value.id)))
        };
        newest(false).or_else(|| newest(true))
    }

    /// The view every projection writes.
    pub fn view(&self) -> CustomerView {
        let current = self.current();
        let record = current.and_then(|snap| self.subscriptions.get(&snap.value.id));
        let latest_invoice = record.and_then(|record| record.latest_invoice.as_ref());
        let as_of = [
            self.subscriptions
                .values()
                .filter_map(|record| record.snapshot.as_ref())
                .map(|s| s.observed_at)
                .max(),
            self.subscriptions
                .values()
                .filter_map(|record| record.latest_invoice.as_ref())
                .map(|i| i.observed_at)
                .max(),
            self.org.as_ref().map(|o| o.observed_at),
            self.user.as_ref().map(|u| u.observed_at),
            self.deleted.as_ref().map(|d| d.observed_at),
            self.entitlements.as_ref().map(|e| e.observed_at),
            self.account.as_ref().map(|a| a.observed_at),
        ]
        .into_iter()
        .flatten()
        .max();
        let mut subscriptions: Vec<SubscriptionView> = self
            .subscriptions
            .values()
            .filter_map(|record| {
                record.snapshot.as_ref().map(|snap| SubscriptionView {
                    subscription: snap.value.clone(),
                    latest_invoice: record.latest_invoice.as_ref().map(|i| i.value.clone()),
                    payment_method: record.payment_method.clone(),
                })
            })
            .collect();
        subscriptions.sort_by(|a, b| {
            (b.subscription.created, &b.subscription.id)
                .cmp(&(a.subscription.created, &a.subscription.id))
        });
        CustomerView {
            customer_id: self.customer_id.clone().unwrap_or_default(),
            org_id: self.org.as_ref().map(|o| o.value.clone()),
            user_id: self.user.as_ref().map(|u| u.value.clone()),
            subscription: current.map(|snap| snap.value.clone()),
            latest_invoice: latest_invoice.map(|inv| inv.value.clone()),
            as_of,
            payment_method: record.and_then(|record| record.payment_method.clone()),
            subscriptions,
            deleted: self.deleted.is_some(),
            stripe_features: self.entitlements.as_ref().map(|e| e.value.clone()),
            account: self.account.as_ref().map(|a| a.value.clone()),
        }
    }
}

/// Orders two different snapshots of one subscription that share Stripe's `created`
/// second and status: the later period wins, then the remaining fields, so the winner
/// does not depend on delivery order.
fn same_second_key(facts: &SubscriptionFacts) -> impl Ord + '_ {
    (
        facts.current_period_end,
        facts.current_period_start,
        facts.ended_at,
        facts.canceled_at,
        facts.cancel_at,
        facts.cancel_at_period_end,
        facts.trial_end,
        (
            &facts.latest_invoice_id,
            &facts.price_id,
            &facts.product_id,
            &facts.lookup_key,
        ),
        (
            facts.quantity,
            facts.trial_start,
            facts.created,
            &facts.currency,
        ),
        (&facts.items, &facts.pause_reason),
    )
}

/// Orders facts about invoices: a newer invoice replaces an older one; for the same
/// invoice, a later or more settled fact wins.
fn invoice_key<'a>(invoice: &'a InvoiceFacts, observed_at: DateTime<Utc>) -> impl Ord + 'a {
    (
        invoice.created,
        &invoice.id,
        observed_at,
        invoice.status_rank(),
        invoice.attempt_count,
        (
            invoice.next_payment_attempt,
            &invoice.status,
            invoice.amount_due,
            &invoice.currency,
        ),
    )
}

fn payment_key(payment: &PaymentFacts, observed_at: DateTime<Utc>) -> impl Ord + '_ {
    (
        observed_at,
        &payment.id,
        &payment.status,
        payment.amount,
        &payment.invoice_id,
        &payment.currency,
    )
}

impl ApiSnapshot {
    /// The source its events carry: our sync id, the API call, and the request's time.
    pub fn source(&self) -> FactSource {
        FactSource {
            stripe_event_id: self.sync_id.clone(),
            stripe_event_type: self.api_call.clone(),
            created: self.fetched_at,
        }
    }
}

/// Judges one Stripe fact (or one API answer) against the state. Pure: the same state and
/// command always give the same decision, which is what makes replays and retries safe.
///
/// An API answer is ordered against webhook facts by the time its request was sent, `T`,
/// per subscription, by the same rule as two webhooks: a held fact with `created > T` is
/// newer than the answer and is kept (the answer may predate that change); with `created
/// < T` the answer is newer and is taken, even where the table would call the move
/// illegal (what we held was wrong); in the same second the table and the rank decide,
/// exactly as for two webhooks, and a loss is answered as the rejection so that the
/// caller asks again later. Once taken, the snapshot is held as observed at `T`, so a
/// webhook older than `T` that arrives late is stale and cannot undo it.
pub fn decide(
    state: &Subscription,
    command: &SubscriptionCommand,
) -> Result<Decision, SubscriptionError> {
    let (customer_id, source, owner) = match command {
        SubscriptionCommand::RecordStripeFacts(facts) => {
            (&facts.customer_id, facts.source.clone(), &facts.owner)
        }
        SubscriptionCommand::Reconcile(snapshot) => {
            (&snapshot.customer_id, snapshot.source(), &snapshot.owner)
        }
    };
    if let Some(expected) = &state.customer_id {
        if expected != customer_id {
            return Err(SubscriptionError::WrongCustomer {
                expected: expected.clone(),
                got: customer_id.clone(),
            });
        }
    }
    let source = &source;
    let mut drafts = Vec::new();

    // Ownership is its own register (the newest observation wins, ties by value), judged
    // apart from the main fact so that the result does not depend on which of two
    // events that both carry it is accepted.
    // An API answer records only what differs (like its subscriptions); a webhook also
    // advances the observation time of an unchanged owner.
    let only_changes = matches!(command, SubscriptionCommand::Reconcile(_));
    let newer =
        |held: &Option<Observed<String>>, candidate: &Option<String>| match (held, candidate) {
            (_, None) => None,
            (None, Some(value)) => Some(value.clone()),
            (Some(held), Some(value)) if only_changes && held.value == *value => None,
            (Some(held), Some(value)) => {
                ((source.created, value) > (held.observed_at, &held.value)).then(|| value.clone())
            }
        };
    let org_id = newer(&state.org, &owner.org_id);
    let user_id = newer(&state.user, &owner.user_id);
    // The Connect account is a register of the same kind, carried by the same event.
    let account = newer(&state.account, &owner.account);
    if org_id.is_some() || user_id.is_some() || account.is_some() {
        drafts.push(SubscriptionEvent::OwnerLinked {
            source: source.clone(),
            org_id,
            user_id,
            account,
            view: CustomerView::default(),
        });
    }

    let facts = match command {
        SubscriptionCommand::RecordStripeFacts(facts) => facts,
        SubscriptionCommand::Reconcile(snapshot) => {
            let mut outcome = judge_api_snapshot(state, source, snapshot, &mut drafts);
            if let Some(features) = &snapshot.entitlements {
                if judge_entitlements(state, source, features, true, &mut drafts)
                    == Outcome::Applied
                {
                    outcome = Outcome::Applied;
                }
            }
            return Ok(finish(state, customer_id, drafts, outcome));
        }
    };
    let outcome = match &facts.fact {
        Fact::Subscription(subscription) => {
            judge_snapshot(state, source, subscription, &mut drafts)
        }
        Fact::Invoice {
            subscription_id,
            invoice,
        } => {
            let held = state
                .subscriptions
                .get(subscription_id)
                .and_then(|record| record.latest_invoice.as_ref());
            let candidate = invoice_key(invoice, source.created);
            match held.map(|h| invoice_key(&h.value, h.observed_at).cmp(&candidate)) {
                Some(std::cmp::Ordering::Equal) => Outcome::Duplicate,
                Some(std::cmp::Ordering::Greater) => Outcome::Rejected(Rejection::StaleInvoice {
                    invoice_id: invoice.id.clone(),
                }),
                None | Some(std::cmp::Ordering::Less) => {
                    drafts.push(SubscriptionEvent::InvoiceRecorded {
                        source: source.clone(),
                        subscription_id: subscription_id.clone(),
                        invoice: invoice.clone(),
                        view: CustomerView::default(),
                    });
                    Outcome::Applied
                }
            }
        }
        Fact::Payment(payment) => {
            let candidate = payment_key(payment, source.created);
            match state
                .last_payment
                .as_ref()
                .map(|h| payment_key(&h.value, h.observed_at).cmp(&candidate))
            {
                Some(std::cmp::Ordering::Equal) => Outcome::Duplicate,
                Some(std::cmp::Ordering::Greater) => Outcome::Rejected(Rejection::StalePayment {
                    payment_id: payment.id.clone(),
                }),
                None | Some(std::cmp::Ordering::Less) => {
                    drafts.push(SubscriptionEvent::PaymentRecorded {
                        source: source.clone(),
                        payment: payment.clone(),
                        view: CustomerView::default(),
                    });
                    Outcome::Applied
                }
            }
        }
        Fact::CustomerDeleted if state.deleted.is_some() => {
            if drafts.is_empty() {
                Outcome::Duplicate
            } else {
                Outcome::Applied
            }
        }
        Fact::CustomerDeleted => {
            drafts.push(SubscriptionEvent::CustomerDeleted {
                source: source.clone(),
                view: CustomerView::default(),
            });
            Outcome::Applied
        }
        Fact::Entitlements { features } => {
            judge_entitlements(state, source, features, false, &mut drafts)
        }
        Fact::OwnerOnly if drafts.is_empty() && facts.owner.is_empty() => {
            Outcome::NothingToRecord("the event names no org or user".to_owned())
        }
        Fact::OwnerOnly if drafts.is_empty() => Outcome::Duplicate,
        Fact::OwnerOnly => Outcome::Applied,
        Fact::Nothing { reason } => Outcome::NothingToRecord(reason.clone()),
    };
    Ok(finish(state, customer_id, drafts, outcome))
}

/// Fills each drafted event with the view as it stands after that event.
fn finish(
    state: &Subscription,
    customer_id: &str,
    mut drafts: Vec<SubscriptionEvent>,
    outcome: Outcome,
) -> Decision {
    let mut next = state.clone();
    next.customer_id = Some(customer_id.to_owned());
    for draft in &mut drafts {
        next.apply_event(draft);
        *draft.view_mut() = next.view();
    }
    Decision {
        events: drafts,
        outcome,
    }
}

/// Orders two different snapshots of one subscription observed in the same second: the
/// table first (an illegal move loses), then the status rank, then the snapshot's fields,
/// so that the winner never depends on which arrived first.
fn same_second_order(
    held: &SubscriptionFacts,
    candidate: &SubscriptionFacts,
) -> Result<(), Rejection> {
    let (from, to) = (held.status, candidate.status);
    if !transition(Some(from), to).is_legal() {
        return Err(Rejection::IllegalTransition {
            subscription_id: candidate.id.clone(),
            from: Some(from),
            to,
        });
    }
    let (held_rank, rank) = (from.same_second_rank(), to.same_second_rank());
    let wins = rank > held_rank
        || (rank == held_rank && same_second_key(candidate) > same_second_key(held));
    if wins {
        Ok(())
    } else {
        Err(Rejection::SameSecond {
            subscription_id: candidate.id.clone(),
            from,
            to,
        })
    }
}

/// Judges a customer's Stripe Entitlements summary: a register like ownership, the newest
/// observation wins (ties by value), so a stale summary never replaces a newer one. An API
/// answer records only a set that differs from the one held.
fn judge_entitlements(
    state: &Subscription,
    source: &FactSource,
    features: &[String],
    only_changes: bool,
    drafts: &mut Vec<SubscriptionEvent>,
) -> Outcome {
    let mut features = features.to_vec();
    features.sort();
    features.dedup();
    // An API answer of no entitlements for a customer of whom we hold none says nothing new
    // (most accounts do not use Stripe Entitlements): nothing to record.
    if only_changes && state.entitlements.is_none() && features.is_empty() {
        return Outcome::Duplicate;
    }
    if let Some(held) = &state.entitlements {
        let same = held.value == features;
        if same && (only_changes || held.observed_at == source.created) {
            return Outcome::Duplicate;
        }
        if (source.created, &features) < (held.observed_at, &held.value) {
            return Outcome::Rejected(Rejection::StaleEntitlements {
                created: source.created,
                applied: held.observed_at,
            });
        }
    }
    drafts.push(SubscriptionEvent::EntitlementsRecorded {
        source: source.clone(),
        features,
        view: CustomerView::default(),
    });
    Outcome::Applied
}

/// Judges an API answer, subscription by subscription (see [`decide`] for the rule).
/// Only what differs is recorded: an answer equal to what we hold records nothing.
fn judge_api_snapshot(
    state: &Subscription,
    source: &FactSource,
    snapshot: &ApiSnapshot,
    drafts: &mut Vec<SubscriptionEvent>,
) -> Outcome {
    let owner_recorded = !drafts.is_empty();
    let mut recorded = false;
    let mut lost_tie = None;
    for (subscription, payment_method) in &snapshot.subscriptions {
        let record = state.subscriptions.get(&subscription.id);
        let held = record.and_then(|record| record.snapshot.as_ref());
        let held_method = record.and_then(|record| record.payment_method.as_ref());
        let same = held.is_some_and(|held| held.value == *subscription);
        if same && held_method == payment_method.as_ref() {
            continue;
        }
        if let Some(held) = held {
            // A webhook fact newer than our request: the answer may predate it.
            if held.observed_at > source.created {
                continue;
            }
            if held.observed_at == source.created && !same {
                if let Err(rejection) = same_second_order(&held.value, subscription) {
                    lost_tie.get_or_insert(rejection);
                    continue;
                }
            }
        }
        let from = held.map(|held| held.value.status);
        drafts.push(SubscriptionEvent::SubscriptionReconciled {
            source: source.clone(),
            from,
            transition: transition(from, subscription.status),
            subscription: subscription.clone(),
            payment_method: payment_method.clone(),
            view: CustomerView::default(),
        });
        recorded = true;
    }
    match lost_tie {
        _ if recorded || owner_recorded => Outcome::Applied,
        Some(rejection) => Outcome::Rejected(rejection),
        None => Outcome::Duplicate,
    }
}

fn judge_snapshot(
    state: &Subscription,
    source: &FactSource,
    subscription: &SubscriptionFacts,
    drafts: &mut Vec<SubscriptionEvent>,
) -> Outcome {
    let held = state
        .subscriptions
        .get(&subscription.id)
        .and_then(|record| record.snapshot.as_ref());
    let from = held.map(|h| h.value.status);
    let to = subscription.status;
    let id = || subscription.id.clone();
    let mv = transition(from, to);
    if let Some(held) = held {
        if source.created < held.observed_at {
            return Outcome::Rejected(Rejection::Stale {
                subscription_id: id(),
                created: source.created,
                applied: held.observed_at,
            });
        }
        if source.created == held.observed_at {
            if held.value == *subscription {
                return Outcome::Duplicate;
            }
            if let Err(rejection) = same_second_order(&held.value, subscription) {
                return Outcome::Rejected(rejection);
            }
        }
    }
    if !mv.is_legal() {
        return Outcome::Rejected(Rejection::IllegalTransition {
            subscription_id: id(),
            from,
            to,
        });
    }
    drafts.push(SubscriptionEvent::SubscriptionChanged {
        source: source.clone(),
        from,
        transition: mv,
        subscription: subscription.clone(),
        view: CustomerView::default(),
    });
    Outcome::Applied
}

impl Subscription {
    /// Folds one decided event into state. Infallible: every judgement was made in
    /// [`decide`]. What `Aggregate::apply` does, without taking the event: a caller that
    /// keeps its events (to store them) folds them without copying each.
    pub fn apply_event(&mut self, event: &SubscriptionEvent) {
        if self.customer_id.is_none() && !event.view().customer_id.is_empty() {
            self.customer_id = Some(event.view().customer_id.clone());
        }
        match event {
            SubscriptionEvent::OwnerLinked {
                source,
                org_id,
                user_id,
                account,
                ..
            } => {
                if let Some(org) = org_id {
                    self.org = Some(Observed::new(org.clone(), source));
                }
                if let Some(account) = account {
                    self.account = Some(Observed::new(account.clone(), source));
                }
                if let Some(user) = user_id {
                    self.user = Some(Observed::new(user.clone(), source));
                }
            }
            SubscriptionEvent::SubscriptionChanged {
                source,
                subscription,
                ..
            } => {
                self.subscriptions
                    .entry(subscription.id.clone())
                    .or_default()
                    .snapshot = Some(Observed::new(subscription.clone(), source));
            }
            SubscriptionEvent::InvoiceRecorded {
                source,
                subscription_id,
                invoice,
                ..
            } => {
                self.subscriptions
                    .entry(subscription_id.clone())
                    .or_default()
                    .latest_invoice = Some(Observed::new(invoice.clone(), source));
            }
            SubscriptionEvent::PaymentRecorded {
                source, payment, ..
            } => {
                self.last_payment = Some(Observed::new(payment.clone(), source));
            }
            SubscriptionEvent::SubscriptionReconciled {
                source,
                subscription,
                payment_method,
                ..
            } => {
                let record = self
                    .subscriptions
                    .entry(subscription.id.clone())
                    .or_default();
                record.snapshot = Some(Observed::new(subscription.clone(), source));
                record.payment_method = payment_method.clone();
            }
            SubscriptionEvent::CustomerDeleted { source, .. } => {
                self.deleted = Some(Observed::new((), source));
            }
            SubscriptionEvent::EntitlementsRecorded {
                source, features, ..
            } => {
                self.entitlements = Some(Observed::new(features.clone(), source));
            }
        }
    }
}

impl Aggregate for Subscription {
    const TYPE: &'static str = "Subscription";
    type Command = SubscriptionCommand;
    type Event = SubscriptionEvent;
    type Error = SubscriptionError;
    type Services = ();

    /// Only calls [`decide`] and writes its events. A command that records nothing and
    /// was rejected answers the rejection as an error, as cqrs-es expects.
    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let decision = decide(self, &command)?;
        if decision.events.is_empty() {
            if let Outcome::Rejected(rejection) = decision.outcome {
                return Err(rejection.into());
            }
        }
        for event in decision.events {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.apply_event(&event);
    }
}
