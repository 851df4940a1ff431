//! The lenient Stripe event parser.
//!
//! Stripe renders an event at the endpoint's pinned API version, so one deployment sees
//! several shapes: plans before prices, the billing period on the subscription (before
//! 2025-03-31) or on its items (basil and later), the invoice's subscription at
//! `subscription` or at `parent.subscription_details.subscription`, ids or expanded
//! objects. We read only the fields we need, tolerate every shape we know, and keep the
//! raw payload elsewhere (the inbox) so nothing is lost if we need more later.
//!
//! Parsing never fails on a field we don't need; it fails only when the payload is not a
//! Stripe event at all.
//!
//! Thin events (`"object": "v2.core.event"`, API 2026-09-30.endive onward) carry no
//! object: only which one changed (`related_object`) and the connected account it belongs
//! to (`context`). They parse into the same [`StripeEvent`] with [`StripeEvent::thin`] set
//! and an empty object; [`route`] answers [`Route::Fetch`] for a thin type whose snapshot
//! type we handle, and the worker fetches the object (see `worker`). Their shape:
//! <https://docs.stripe.com/api/v2/core/events/object>, stripe-node
//! `src/resources/V2/Core/Events.ts` (`EventBase`, `V2.Core.Events.RelatedObject`).

use aggregates::{
    Fact, FactSource, InvoiceFacts, ItemFacts, OwnerFacts, PaymentFacts, StripeFacts,
    SubscriptionCommand, SubscriptionFacts, SubscriptionStatus, UsageType,
};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value};

/// The envelope of a Stripe event, with the object it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct StripeEvent {
    pub id: String,
    pub event_type: String,
    pub created: DateTime<Utc>,
    pub api_version: Option<String>,
    pub livemode: bool,
    pub object: Map<String, Value>,
    pub previous_attributes: Option<Value>,
    /// What a thin event names instead of carrying an object; `None` for a snapshot event.
    pub thin: Option<ThinRef>,
    /// The connected account the event happened in (Connect): a snapshot event's
    /// `account` (<https://docs.stripe.com/api/events/object#event_object-account>), a thin
    /// event's `context` (<https://docs.stripe.com/api/v2/core/events/object>). `None` for
    /// the platform's own events.
    pub account: Option<String>,
}

/// The object a thin event is about and where to fetch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinRef {
    /// `related_object.id`, e.g. `sub_123`.
    pub id: String,
    /// `related_object.type`, the object's `object` tag, e.g. `subscription`.
    pub object_type: String,
    /// `context`: the connected account the object belongs to (`Stripe-Account` when
    /// fetching it), if any.
    pub context: Option<String>,
}

/// The prefix of a thin event type for an API v1 resource: `v1.customer.created` is the
/// thin twin of `customer.created`
/// (<https://docs.stripe.com/changelog/endive/2026-09-30/thin-events-for-api-v1-resources-generally-available>).
pub const THIN_V1_PREFIX: &str = "v1.";

/// The API path an object of `object_type` is retrieved at, for the types whose snapshot
/// events we handle. Built from the type and id rather than taken from
/// `related_object.url`, so that what we call never depends on a URL in a payload.
pub fn retrieve_path(object_type: &str, id: &str) -> Option<String> {
    let collection = match object_type {
        "subscription" => "subscriptions",
        "customer" => "customers",
        "invoice" => "invoices",
        "payment_intent" => "payment_intents",
        "checkout.session" => "checkout/sessions",
        _ => return None,
    };
    id_like(id).then(|| format!("/{collection}/{id}"))
}

/// Whether `id` is of Stripe's id alphabet: one path segment (never a path or a query),
/// and a valid header value.
fn id_like(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a body is not a Stripe event we can record.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a Stripe event: {0}")]
    NotAnEvent(&'static str),
}

/// What to do with a parsed event.
// Routed once per event and consumed at once: boxing the command would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Run this command on the customer's aggregate.
    Command {
        customer_id: String,
        command: SubscriptionCommand,
    },
    /// Acknowledge and record, but change nothing (unhandled type, no customer…).
    Ignore { reason: String },
    /// A thin event of a handled type: fetch the object it names, then route that as the
    /// snapshot event of the same type would be (`worker`).
    Fetch(ThinRef),
    /// Stripe failed to generate events for a while and says it is over
    /// ([`HEALTH_RESOLVED`]): what those events would have told us is unknown, so every
    /// customer is synced from the API (`worker` requests it through `sync_log`).
    ReconcileAll,
}

/// The thin event Stripe sends when a period in which it failed to generate events is over
/// (<https://docs.stripe.com/api/v2/core/events/event-types>, stripe-java
/// `V2CoreHealthEventGenerationFailureResolvedEvent`). Those events will never exist, so
/// neither a webhook retry nor the Events API can bring them: only a sync can.
pub const HEALTH_RESOLVED: &str = "v2.core.health.event_generation_failure.resolved";

/// The event types subledger acts on. Everything else is acknowledged and recorded as
/// ignored.
pub const HANDLED_TYPES: &[&str] = &[
    "checkout.session.completed",
    "customer.created",
    "customer.updated",
    "customer.deleted",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.pending_update_applied",
    "customer.subscription.pending_update_expired",
    "customer.subscription.trial_will_end",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "invoice.payment_action_required",
    "invoice.upcoming",
    "invoice.marked_uncollectible",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.canceled",
    "entitlements.active_entitlement_summary.updated",
];

/// Parses a webhook body. Fails only if the body is not JSON or not an event envelope
/// (`id`, `type`, `created`, `data.object`).
pub fn parse_event(body: &[u8]) -> Result<StripeEvent, ParseError> {
    let value: Value = serde_json::from_slice(body)?;
    event_from_value(value)
}

/// As [`parse_event`], for a value already decoded (the import command).
pub fn event_from_value(value: Value) -> Result<StripeEvent, ParseError> {
    let Value::Object(mut envelope) = value else {
        return Err(ParseError::NotAnEvent("the body is not a JSON object"));
    };
    if let Some(kind) = envelope.get("object") {
        match kind.as_str() {
            Some("event") => {}
            Some("v2.core.event") => return thin_event(envelope),
            _ => {
                return Err(ParseError::NotAnEvent(
                    "\"object\" is neither \"event\" nor \"v2.core.event\"",
                ))
            }
        }
    }
    let id = envelope
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or(ParseError::NotAnEvent("no \"id\""))?
        .to_owned();
    let event_type = envelope
        .get("type")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or(ParseError::NotAnEvent("no \"type\""))?
        .to_owned();
    let created = envelope
        .get("created")
        .and_then(Value::as_i64)
        .and_then(timestamp)
        .ok_or(ParseError::NotAnEvent("no valid \"created\""))?;
    let api_version = envelope
        .get("api_version")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let livemode = envelope
        .get("livemode")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(Value::Object(mut data)) = envelope.remove("data") else {
        return Err(ParseError::NotAnEvent("no \"data\" object"));
    };
    let Some(Value::Object(object)) = data.remove("object") else {
        return Err(ParseError::NotAnEvent("no \"data.object\" object"));
    };
    Ok(StripeEvent {
        id,
        event_type,
        created,
        api_version,
        livemode,
        object,
        previous_attributes: data.remove("previous_attributes"),
        thin: None,
        account: envelope
            .get("account")
            .and_then(Value::as_str)
            .and_then(account_id),
    })
}

/// A connected account's id (`acct_…`) as an event names it, if it can be one: every call
/// about the customer carries it as a header, so text that could not be an id (empty,
/// too long, not `[A-Za-z0-9_]`) is read as no account rather than kept.
fn account_id(text: &str) -> Option<String> {
    let valid = !text.is_empty()
        && text.len() <= 255
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    valid.then(|| text.to_owned())
}

/// A thin event: `id`, `type`, `created` as an RFC 3339 string, `livemode`, and, when it
/// names one, `related_object` `{id, type, url}` and `context`.
fn thin_event(envelope: Map<String, Value>) -> Result<StripeEvent, ParseError> {
    let text = |field: &str| {
        envelope
            .get(field)
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
    };
    let id = text("id").ok_or(ParseError::NotAnEvent("no \"id\""))?;
    let event_type = text("type").ok_or(ParseError::NotAnEvent("no \"type\""))?;
    let created = text("created")
        .and_then(|created| DateTime::parse_from_rfc3339(created).ok())
        .map(|created| created.with_timezone(&Utc))
        .filter(|created| created.timestamp() >= EARLIEST_UNIX_SECS)
        .ok_or(ParseError::NotAnEvent("no valid \"created\""))?;
    // The account the object belongs to travels as a header when it is fetched: anything
    // but an account id (`acct_…`), or a path of them (a Stripe context: stripe-node
    // `types/V2/EventMisc.d.ts`, `StripeContext` segments joined by `/`), is refused here,
    // where a 400 says so, rather than failing every fetch later.
    let context = text("context").map(str::to_owned);
    if context
        .as_deref()
        .is_some_and(|context| !context.split('/').all(id_like))
    {
        return Err(ParseError::NotAnEvent(
            "a \"context\" that is not an account id",
        ));
    }
    let thin = match envelope.get("related_object") {
        None | Some(Value::Null) => None,
        Some(Value::Object(related)) => Some(ThinRef {
            id: str_field(related, "id")
                .ok_or(ParseError::NotAnEvent("a \"related_object\" without an id"))?,
            object_type: str_field(related, "type").ok_or(ParseError::NotAnEvent(
                "a \"related_object\" without a type",
            ))?,
            context: context.clone(),
        }),
        Some(_) => {
            return Err(ParseError::NotAnEvent(
                "\"related_object\" is not an object",
            ))
        }
    };
    Ok(StripeEvent {
        id: id.to_owned(),
        event_type: event_type.to_owned(),
        created,
        // Thin payloads are unversioned.
        api_version: None,
        livemode: envelope
            .get("livemode")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        object: Map::new(),
        previous_attributes: None,
        // A thin event that names no object is kept as thin all the same: `route` ignores it.
        thin: Some(thin.unwrap_or_else(|| ThinRef {
            id: String::new(),
            object_type: String::new(),
            context,
        })),
        account: text("context").and_then(account_id),
    })
}

/// The prefix of the `source` of every event a Stripe event destination puts on an
/// EventBridge bus: `aws.partner/stripe.com/{destination id}`.
pub const EVENTBRIDGE_SOURCE_PREFIX: &str = "aws.partner/stripe.com/";

/// Unwraps an Amazon EventBridge event (the envelope AWS puts around every event:
/// `version`, `id`, `detail-type`, `source`, `account`, `time`, `region`, `resources`,
/// `detail`; <https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-events-structure.html>)
/// whose `detail` is the Stripe event, snapshot or thin, exactly as a webhook would carry
/// it (<https://docs.stripe.com/event-destinations/eventbridge>; stripe-node
/// `test/CloudProviderEvent.spec.ts`, `EVENTBRIDGE_PAYLOAD` and `EVENTBRIDGE_V2_PAYLOAD`).
/// Returns the event and `detail`'s JSON, which is what the inbox keeps as the payload.
/// An envelope whose `source` is not a Stripe partner source is refused.
pub fn parse_eventbridge(body: &[u8]) -> Result<(StripeEvent, Vec<u8>), ParseError> {
    let value: Value = serde_json::from_slice(body)?;
    let Value::Object(mut envelope) = value else {
        return Err(ParseError::NotAnEvent("the body is not a JSON object"));
    };
    match envelope.get("source").and_then(Value::as_str) {
        Some(source) if source.starts_with(EVENTBRIDGE_SOURCE_PREFIX) => {}
        _ => {
            return Err(ParseError::NotAnEvent(
                "not an EventBridge event from Stripe (\"source\" is not aws.partner/stripe.com/…)",
            ))
        }
    }
    let Some(detail) = envelope.remove("detail").filter(Value::is_object) else {
        return Err(ParseError::NotAnEvent("no \"detail\" object"));
    };
    let raw = serde_json::to_vec(&detail)?;
    Ok((event_from_value(detail)?, raw))
}

impl StripeEvent {
    /// The snapshot event of the same change: a thin event's type without its `v1.` prefix,
    /// carrying `object` (fetched from the API, at `fetched_at` on Stripe's clock) in place
    /// of the reference. The id stays the thin event's.
    pub fn with_fetched(
        &self,
        object: Map<String, Value>,
        fetched_at: DateTime<Utc>,
    ) -> StripeEvent {
        StripeEvent {
            id: self.id.clone(),
            event_type: self
                .event_type
                .strip_prefix(THIN_V1_PREFIX)
                .unwrap_or(&self.event_type)
                .to_owned(),
            created: fetched_at,
            api_version: None,
            livemode: self.livemode,
            object,
            previous_attributes: None,
            thin: None,
            account: self.account.clone(),
        }
    }

    /// The connected account the event happened in (`account`, or a thin event's
    /// `context`).
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// The customer the event is about, when it names one.
    pub fn customer_id(&self) -> Option<String> {
        if self.thin.is_some() {
            // A thin event names an object, not its customer: known once fetched.
            return None;
        }
        if self.event_type.starts_with("customer.")
            && !self.event_type.starts_with("customer.subscription.")
        {
            return str_field(&self.object, "id");
        }
        customer_of(&self.object)
    }

    fn source(&self) -> FactSource {
        FactSource {
            stripe_event_id: self.id.clone(),
            stripe_event_type: self.event_type.clone(),
            created: self.created,
        }
    }
}

/// Decides what an event means for the domain. Pure.
pub fn route(event: &StripeEvent) -> Route {
    if let Some(thin) = &event.thin {
        if event.event_type == HEALTH_RESOLVED {
            return Route::ReconcileAll;
        }
        let snapshot_type = event.event_type.strip_prefix(THIN_V1_PREFIX);
        if !snapshot_type.is_some_and(|t| HANDLED_TYPES.contains(&t)) {
            return Route::Ignore {
                reason: format!("thin event type {} is not handled", event.event_type),
            };
        }
        if retrieve_path(&thin.object_type, &thin.id).is_none() {
            return Route::Ignore {
                reason: format!(
                    "thin event {} names no object subledger can fetch",
                    event.event_type
                ),
            };
        }
        return Route::Fetch(thin.clone());
    }
    if !HANDLED_TYPES.contains(&event.event_type.as_str()) {
        return Route::Ignore {
            reason: format!("event type {} is not handled", event.event_type),
        };
    }
    let Some(customer_id) = event.customer_id() else {
        return Route::Ignore {
            reason: "the event names no customer".to_owned(),
        };
    };
    let object = &event.object;
    let (owner, fact) = match event.event_type.split('.').next() {
        Some("checkout") => {
            let mut owner = owner_from_metadata(object.get("metadata"));
            if owner.org_id.is_none() {
                owner.org_id = str_field(object, "client_reference_id");
            }
            (owner, Fact::OwnerOnly)
        }
        Some("customer") if event.event_type == "customer.deleted" => (
            owner_from_metadata(object.get("metadata")),
            Fact::CustomerDeleted,
        ),
        Some("customer") if !event.event_type.starts_with("customer.subscription.") => {
            (owner_from_metadata(object.get("metadata")), Fact::OwnerOnly)
        }
        Some("entitlements") => (
            OwnerFacts::default(),
            Fact::Entitlements {
                features: entitlement_lookup_keys(object.get("entitlements")),
            },
        ),
        Some("customer") => match subscription_facts(object) {
            Ok(facts) => (
                owner_from_metadata(object.get("metadata")),
                Fact::Subscription(facts),
            ),
            Err(reason) => return Route::Ignore { reason },
        },
        Some("invoice") => invoice_fact(object),
        Some("payment_intent") => match str_field(object, "id") {
            Some(id) => (
                OwnerFacts::default(),
                Fact::Payment(PaymentFacts {
                    id,
                    status: str_field(object, "status")
                        .unwrap_or_else(|| event.event_type.replace("payment_intent.", "")),
                    amount: object.get("amount").and_then(Value::as_i64),
                    currency: str_field(object, "currency"),
                    invoice_id: id_of(object.get("invoice")),
                }),
            ),
            None => {
                return Route::Ignore {
                    reason: "payment intent without an id".to_owned(),
                }
            }
        },
        _ => unreachable!(
            "HANDLED_TYPES only lists checkout, customer, entitlements, invoice and payment_intent events"
        ),
    };
    // The account the event happened in is where the customer lives (Connect).
    let owner = OwnerFacts {
        account: event.account.clone(),
        ..owner
    };
    Route::Command {
        customer_id: customer_id.clone(),
        command: SubscriptionCommand::RecordStripeFacts(StripeFacts {
            customer_id,
            source: event.source(),
            owner,
            fact,
        }),
    }
}

/// Reads a subscription object of any API version.
pub fn subscription_facts(object: &Map<String, Value>) -> Result<SubscriptionFacts, String> {
    let id = str_field(object, "id").ok_or("subscription without an id")?;
    let status_text = str_field(object, "status").ok_or("subscription without a status")?;
    let status: SubscriptionStatus = status_text
        .parse()
        .map_err(|_| format!("unknown subscription status {status_text:?}"))?;
    let items: Vec<&Map<String, Value>> = object
        .get("items")
        .and_then(|items| items.get("data"))
        .and_then(Value::as_array)
        .map(|data| data.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default();
    let first_item = items.first().copied();
    // The price: on the first item (`price`, or `plan` before prices existed), else the
    // subscription's own legacy `plan`.
    let price = first_item
        .and_then(|item| item.get("price").or_else(|| item.get("plan")))
        .or_else(|| object.get("plan"))
        .and_then(Value::as_object);
    // The period: on the subscription before basil, on each item since.
    let period = |field: &str, pick: fn(i64, i64) -> i64| {
        ts_field(object, field).or_else(|| {
            items
                .iter()
                .filter_map(|item| item.get(field).and_then(Value::as_i64))
                .reduce(pick)
                .and_then(timestamp)
        })
    };
    Ok(SubscriptionFacts {
        id,
        status,
        created: ts_field(object, "created").or_else(|| ts_field(object, "start_date")),
        price_id: price.and_then(|p| str_field(p, "id")),
        product_id: price.and_then(|p| id_of(p.get("product"))),
        lookup_key: price.and_then(|p| str_field(p, "lookup_key")),
        quantity: first_item
            .and_then(|item| item.get("quantity"))
            .or_else(|| object.get("quantity"))
            .and_then(Value::as_u64),
        current_period_start: period("current_period_start", i64::min),
        current_period_end: period("current_period_end", i64::max),
        cancel_at_period_end: object
            .get("cancel_at_period_end")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        cancel_at: ts_field(object, "cancel_at"),
        canceled_at: ts_field(object, "canceled_at"),
        ended_at: ts_field(object, "ended_at"),
        trial_start: ts_field(object, "trial_start"),
        trial_end: ts_field(object, "trial_end"),
        latest_invoice_id: id_of(object.get("latest_invoice")),
        currency: str_field(object, "currency")
            .or_else(|| price.and_then(|p| str_field(p, "currency"))),
        // Before basil the period is the subscription's, and so every item's.
        items: items
            .iter()
            .map(|item| {
                let mut facts = item_facts(item);
                facts.current_period_start = facts
                    .current_period_start
                    .or_else(|| ts_field(object, "current_period_start"));
                facts.current_period_end = facts
                    .current_period_end
                    .or_else(|| ts_field(object, "current_period_end"));
                facts
            })
            .collect(),
        pause_reason: object
            .get("status_details")
            .and_then(|details| details.get("paused"))
            .and_then(|paused| paused.get("subscription"))
            .and_then(Value::as_object)
            .and_then(|pause| str_field(pause, "type")),
    })
}

/// One `items.data[]` entry: its price (`price`, or the legacy `plan`), quantity, usage
/// type (`price.recurring.usage_type`, or the legacy `plan.usage_type`) and, since basil,
/// its own period.
fn item_facts(item: &Map<String, Value>) -> ItemFacts {
    let price = item
        .get("price")
        .or_else(|| item.get("plan"))
        .and_then(Value::as_object);
    let usage_type = price
        .and_then(|p| {
            p.get("recurring")
                .and_then(|recurring| recurring.get("usage_type"))
                .or_else(|| p.get("usage_type"))
        })
        .and_then(Value::as_str)
        .and_then(|usage| match usage {
            "metered" => Some(UsageType::Metered),
            "licensed" => Some(UsageType::Licensed),
            _ => None,
        });
    ItemFacts {
        id: str_field(item, "id"),
        price_id: price.and_then(|p| str_field(p, "id")),
        product_id: price.and_then(|p| id_of(p.get("product"))),
        lookup_key: price.and_then(|p| str_field(p, "lookup_key")),
        quantity: item.get("quantity").and_then(Value::as_u64),
        usage_type,
        current_period_start: ts_field(item, "current_period_start"),
        current_period_end: ts_field(item, "current_period_end"),
    }
}

/// The feature lookup keys of an active entitlements list (`{"data": [{"lookup_key": …}]}`,
/// the summary's `entitlements` or `GET /v1/entitlements/active_entitlements`' answer).
pub(crate) fn entitlement_lookup_keys(list: Option<&Value>) -> Vec<String> {
    let mut keys: Vec<String> = list
        .and_then(|list| list.get("data"))
        .and_then(Value::as_array)
        .map(|data| {
            data.iter()
                .filter_map(Value::as_object)
                .filter_map(|entitlement| {
                    str_field(entitlement, "lookup_key").or_else(|| {
                        entitlement
                            .get("feature")
                            .and_then(Value::as_object)
                            .and_then(|feature| str_field(feature, "lookup_key"))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    keys.dedup();
    keys
}

fn invoice_fact(object: &Map<String, Value>) -> (OwnerFacts, Fact) {
    let parent_details = object
        .get("parent")
        .and_then(|parent| parent.get("subscription_details"))
        .and_then(Value::as_object);
    let legacy_details = object
        .get("subscription_details")
        .and_then(Value::as_object);
    let owner = owner_from_metadata(
        parent_details
            .or(legacy_details)
            .and_then(|details| details.get("metadata")),
    );
    let subscription_id = id_of(object.get("subscription"))
        .or_else(|| parent_details.and_then(|d| id_of(d.get("subscription"))));
    let Some(subscription_id) = subscription_id else {
        return (
            owner,
            Fact::Nothing {
                reason: "the invoice belongs to no subscription".to_owned(),
            },
        );
    };
    let Some(id) = str_field(object, "id") else {
        return (
            owner,
            Fact::Nothing {
                reason: "an upcoming invoice has no id yet; nothing to record".to_owned(),
            },
        );
    };
    let invoice = InvoiceFacts {
        id,
        status: str_field(object, "status"),
        attempt_count: object
            .get("attempt_count")
            .and_then(Value::as_u64)
            .unwrap_or(0) as u32,
        next_payment_attempt: ts_field(object, "next_payment_attempt"),
        created: ts_field(object, "created").or_else(|| ts_field(object, "date")),
        amount_due: object.get("amount_due").and_then(Value::as_i64),
        currency: str_field(object, "currency"),
    };
    (
        owner,
        Fact::Invoice {
            subscription_id,
            invoice,
        },
    )
}

/// `metadata.organizationId`/`org_id`/`organization_id` and `metadata.userId`/`user_id`.
pub(crate) fn owner_from_metadata(metadata: Option<&Value>) -> OwnerFacts {
    let Some(metadata) = metadata.and_then(Value::as_object) else {
        return OwnerFacts::default();
    };
    let pick = |keys: &[&str]| keys.iter().find_map(|key| str_field(metadata, key));
    OwnerFacts {
        org_id: pick(&["organizationId", "org_id", "organization_id"]),
        user_id: pick(&["userId", "user_id"]),
        account: None,
    }
}

/// A non-empty string field.
pub(crate) fn str_field(object: &Map<String, Value>, field: &str) -> Option<String> {
    object
        .get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The customer an object belongs to: `customer`, else `customer_account` (API 2025-12-15
/// onward, Accounts v2: a customer represented by an Account names it there, and
/// `customer` is null; <https://docs.stripe.com/accounts-v2/use-accounts-as-customers>).
/// Either way it is the id the customer's aggregate is keyed by.
pub(crate) fn customer_of(object: &Map<String, Value>) -> Option<String> {
    id_of(object.get("customer")).or_else(|| id_of(object.get("customer_account")))
}

/// An id given either as a string or as an expanded object with an `id`.
pub(crate) fn id_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(id) if !id.is_empty() => Some(id.clone()),
        Value::Object(object) => str_field(object, "id"),
        _ => None,
    }
}

pub(crate) fn ts_field(object: &Map<String, Value>, field: &str) -> Option<DateTime<Utc>> {
    object
        .get(field)
        .and_then(Value::as_i64)
        .and_then(timestamp)
}

/// The earliest time a fact may carry, in unix seconds: 4714-11-24 00:00:00 UTC BC, the
/// earliest Postgres's `timestamptz` holds (its latest, in 294276 AD, is past anything
/// chrono represents). No Stripe time is anywhere near it; a time before it is read as
/// absent, as any other unreadable field is, so that no fact ever carries a time the
/// projections' tables would refuse (SQLSTATE 22008) and stall on.
pub const EARLIEST_UNIX_SECS: i64 = -210_866_803_200;

fn timestamp(secs: i64) -> Option<DateTime<Utc>> {
    if secs < EARLIEST_UNIX_SECS {
        return None;
    }
    Utc.timestamp_opt(secs, 0).single()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(event_type: &str, object: Value) -> StripeEvent {
        let body = json!({"id": "evt_1", "object": "event", "type": event_type, "created": 1_700_000_000,
            "data": {"object": object}});
        parse_event(body.to_string().as_bytes()).unwrap()
    }

    fn facts(route: Route) -> StripeFacts {
        match route {
            Route::Command {
                command: SubscriptionCommand::RecordStripeFacts(facts),
                ..
            } => facts,
            other => panic!("expected a command, got {other:?}"),
        }
    }

    #[test]
    fn times_postgres_cannot_hold_are_read_as_absent() {
        assert!(timestamp(EARLIEST_UNIX_SECS).is_some());
        assert!(timestamp(EARLIEST_UNIX_SECS - 1).is_none());
        assert!(timestamp(i64::MAX).is_none());
        let body = json!({"id": "evt_1", "object": "event", "type": "x", "created": EARLIEST_UNIX_SECS - 1,
            "data": {"object": {}}});
        assert!(matches!(
            parse_event(body.to_string().as_bytes()),
            Err(ParseError::NotAnEvent(_))
        ));
        let sub = json!({"id": "sub_1", "customer": "cus_1", "status": "active",
            "current_period_end": -300_000_000_000_000i64, "trial_end": 1_700_000_000});
        let f = facts(route(&event("customer.subscription.updated", sub)));
        let Fact::Subscription(s) = f.fact else {
            panic!()
        };
        assert_eq!(s.current_period_end, None);
        assert_eq!(s.trial_end, timestamp(1_700_000_000));
    }

    /// A connected account's snapshot event names it in `account`
    /// (https://docs.stripe.com/api/events/object#event_object-account, "the connected
    /// account that originates the event", since
    /// https://docs.stripe.com/changelog/2017-05-25/events-connect-specify-originating-account;
    /// async-stripe-shared `stripe_shared/event.rs`, `Event::account`): the customer's facts
    /// carry it. The platform's own events carry none.
    #[test]
    fn a_connected_accounts_event_carries_its_account() {
        let body = json!({"id": "evt_1", "object": "event", "type": "customer.subscription.updated",
            "created": 1_700_000_000, "account": "acct_1Connected",
            "data": {"object": {"id": "sub_1", "customer": "cus_1", "status": "active"}}});
        let connected = parse_event(body.to_string().as_bytes()).unwrap();
        assert_eq!(connected.account(), Some("acct_1Connected"));
        let f = facts(route(&connected));
        assert_eq!(f.owner.account.as_deref(), Some("acct_1Connected"));
        let own = facts(route(&event(
            "customer.subscription.updated",
            json!({"id": "sub_1", "customer": "cus_1", "status": "active"}),
        )));
        assert_eq!(own.owner.account, None);
    }

    /// A thin event, shaped as https://docs.stripe.com/api/v2/core/events/object and
    /// stripe-node `src/resources/V2/Core/Events.ts` (`EventBase`, `RelatedObject`).
    fn thin(event_type: &str, related: Value, context: Value) -> Value {
        json!({"id": "evt_thin_1", "object": "v2.core.event", "type": event_type,
            "created": "2026-10-01T12:00:00.000Z", "livemode": true, "context": context,
            "related_object": related, "reason": {"type": "request", "request": {"id": "req_1", "idempotency_key": null}}})
    }

    #[test]
    fn a_thin_event_routes_to_a_fetch_with_its_account() {
        let body = thin(
            "v1.customer.subscription.updated",
            json!({"id": "sub_1", "type": "subscription", "url": "/v1/subscriptions/sub_1"}),
            json!("acct_1"),
        );
        let event = parse_event(body.to_string().as_bytes()).unwrap();
        assert_eq!(event.created.timestamp(), 1_790_856_000);
        assert!(event.livemode);
        assert_eq!(event.customer_id(), None);
        assert_eq!(event.account(), Some("acct_1"));
        let Route::Fetch(related) = route(&event) else {
            panic!("a fetch")
        };
        assert_eq!(
            retrieve_path(&related.object_type, &related.id).as_deref(),
            Some("/subscriptions/sub_1")
        );
        // Once fetched, it reads as the snapshot type, at the fetch's time.
        let at = timestamp(1_790_856_100).unwrap();
        let fetched = event.with_fetched(Map::new(), at);
        assert_eq!(
            (fetched.event_type.as_str(), fetched.created, fetched.thin),
            ("customer.subscription.updated", at, None)
        );
    }

    #[test]
    fn thin_events_we_cannot_use_are_ignored_and_broken_ones_refused() {
        for (event_type, related) in [
            ("v2.core.event_destination.ping", Value::Null),
            (
                "v1.charge.succeeded",
                json!({"id": "ch_1", "type": "charge", "url": "/v1/charges/ch_1"}),
            ),
            (
                "v1.invoice.paid",
                json!({"id": "in_1/../x", "type": "invoice", "url": "/v1/invoices/in_1"}),
            ),
        ] {
            let event = parse_event(
                thin(event_type, related, Value::Null)
                    .to_string()
                    .as_bytes(),
            )
            .unwrap();
            assert!(
                matches!(route(&event), Route::Ignore { .. }),
                "{event_type}"
            );
        }
        let mut no_created = thin("v1.invoice.paid", Value::Null, Value::Null);
        no_created["created"] = json!(1_790_856_000);
        assert!(parse_event(no_created.to_string().as_bytes()).is_err());
        let bad_related = thin("v1.invoice.paid", json!("in_1"), Value::Null);
        assert!(parse_event(bad_related.to_string().as_bytes()).is_err());
        // A `context` becomes a `Stripe-Account` header: only an account id is taken.
        let related = json!({"id": "in_1", "type": "invoice", "url": "/v1/invoices/in_1"});
        for context in [
            "acct_1\nX-Evil: 1",
            "acct 1",
            "../acct",
            "acct_1/",
            "\u{0}",
            "é",
        ] {
            let body = thin("v1.invoice.paid", related.clone(), json!(context));
            assert!(
                parse_event(body.to_string().as_bytes()).is_err(),
                "{context:?}"
            );
        }
        for context in ["acct_1Connected", "acct_1Parent/acct_1Child"] {
            let body = thin("v1.invoice.paid", related.clone(), json!(context));
            assert!(
                parse_event(body.to_string().as_bytes()).is_ok(),
                "{context}"
            );
        }
    }

    /// Accounts v2 (API 2025-12-15 onward): `customer` is null and `customer_account`
    /// names the Account that represents the customer
    /// (https://docs.stripe.com/accounts-v2/use-accounts-as-customers).
    #[test]
    fn an_object_naming_its_customer_as_customer_account_is_attributed_to_it() {
        let sub = json!({"id": "sub_1", "object": "subscription", "customer": null,
            "customer_account": "acct_1Cust", "status": "active"});
        let f = facts(route(&event("customer.subscription.created", sub.clone())));
        assert_eq!(f.customer_id, "acct_1Cust");
        let invoice = json!({"id": "in_1", "object": "invoice", "customer": null,
            "customer_account": "acct_1Cust", "status": "paid", "subscription": "sub_1"});
        assert_eq!(
            facts(route(&event("invoice.paid", invoice))).customer_id,
            "acct_1Cust"
        );
        let listed = crate::stripe::objects::listed_subscription(sub.as_object().unwrap()).unwrap();
        assert_eq!(listed.customer_id, "acct_1Cust");
        // `customer` wins when both are given.
        let both = json!({"id": "sub_2", "customer": "cus_1", "customer_account": "acct_1Cust", "status": "active"});
        assert_eq!(
            facts(route(&event("customer.subscription.updated", both))).customer_id,
            "cus_1"
        );
    }

    #[test]
    fn not_an_event_is_refused() {
        assert!(matches!(parse_event(b"{"), Err(ParseError::Json(_))));
        assert!(matches!(parse_event(b"[]"), Err(ParseError::NotAnEvent(_))));
        assert!(matches!(
            parse_event(br#"{"id":"evt_1","type":"x","created":1}"#),
            Err(ParseError::NotAnEvent(_))
        ));
        assert!(matches!(
            parse_event(br#"{"id":"cus_1","object":"customer","type":"x","created":1,"data":{"object":{}}}"#),
            Err(ParseError::NotAnEvent(_))
        ));
    }

    #[test]
    fn the_period_is_read_from_the_subscription_or_its_items() {
        let legacy = json!({"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
            "current_period_start": 100, "current_period_end": 200,
            "items": {"data": [{"price": {"id": "price_a", "product": "prod_a", "lookup_key": "a"}, "quantity": 2}]}});
        let basil = json!({"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
            "items": {"data": [{"price": {"id": "price_a", "product": {"id": "prod_a"}, "lookup_key": "a"}, "quantity": 2,
                "current_period_start": 100, "current_period_end": 200}]}});
        let a = facts(route(&event("customer.subscription.updated", legacy)));
        let b = facts(route(&event("customer.subscription.updated", basil)));
        assert_eq!(a.fact, b.fact);
        let Fact::Subscription(s) = a.fact else {
            panic!()
        };
        assert_eq!(s.current_period_end, timestamp(200));
        assert_eq!(
            (s.price_id.as_deref(), s.product_id.as_deref(), s.quantity),
            (Some("price_a"), Some("prod_a"), Some(2))
        );
    }

    #[test]
    fn the_invoice_subscription_is_read_from_both_places() {
        let legacy = json!({"id": "in_1", "customer": "cus_1", "subscription": "sub_1", "status": "paid", "attempt_count": 1});
        let basil = json!({"id": "in_1", "customer": "cus_1", "status": "paid", "attempt_count": 1,
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1", "metadata": {"org_id": "org_9"}}}});
        let a = facts(route(&event("invoice.paid", legacy)));
        let b = facts(route(&event("invoice.paid", basil)));
        assert_eq!(a.fact, b.fact);
        assert_eq!(b.owner.org_id.as_deref(), Some("org_9"));
    }

    #[test]
    fn ownership_comes_from_metadata_or_client_reference_id() {
        let session = json!({"id": "cs_1", "customer": "cus_1", "client_reference_id": "org_1",
            "metadata": {"userId": "user_1"}});
        let f = facts(route(&event("checkout.session.completed", session)));
        assert_eq!(
            f.owner,
            OwnerFacts {
                org_id: Some("org_1".into()),
                user_id: Some("user_1".into()),
                account: None,
            }
        );
        let customer =
            json!({"id": "cus_2", "object": "customer", "metadata": {"organizationId": "org_2"}});
        let f = facts(route(&event("customer.updated", customer)));
        assert_eq!(
            (f.customer_id.as_str(), f.owner.org_id.as_deref()),
            ("cus_2", Some("org_2"))
        );
    }

    #[test]
    fn unhandled_or_customerless_events_are_ignored() {
        assert!(matches!(
            route(&event("charge.succeeded", json!({"customer": "cus_1"}))),
            Route::Ignore { .. }
        ));
        assert!(matches!(
            route(&event(
                "checkout.session.completed",
                json!({"customer": null})
            )),
            Route::Ignore { .. }
        ));
        let upcoming = facts(route(&event(
            "invoice.upcoming",
            json!({"customer": "cus_1", "subscription": "sub_1"}),
        )));
        assert!(matches!(upcoming.fact, Fact::Nothing { .. }));
    }
}
