//! Reads the objects Stripe's API answers with (subscriptions with their expanded default
//! payment method, customers, checkout sessions) as leniently as webhook payloads, with
//! the same field readers: an API answer and a webhook of one object give the same facts.
//!
//! Pure: values in, values out.

use aggregates::{OwnerFacts, PaymentMethodFacts, SubscriptionFacts};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::event::{customer_of, owner_from_metadata, str_field, subscription_facts, ts_field};

/// One subscription as the API listed it.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedSubscription {
    pub customer_id: String,
    pub facts: SubscriptionFacts,
    pub payment_method: Option<PaymentMethodFacts>,
    pub owner: OwnerFacts,
}

/// A subscription object from `GET /v1/subscriptions` (any API version).
pub fn listed_subscription(object: &Map<String, Value>) -> Result<ListedSubscription, String> {
    let customer_id = customer_of(object).ok_or("subscription without a customer")?;
    Ok(ListedSubscription {
        customer_id,
        facts: subscription_facts(object)?,
        payment_method: payment_method(object.get("default_payment_method")),
        owner: owner_from_metadata(object.get("metadata")),
    })
}

/// An expanded payment method: a card's brand and last four digits, or the method's type.
/// An unexpanded id gives only the id.
pub fn payment_method(value: Option<&Value>) -> Option<PaymentMethodFacts> {
    match value? {
        Value::String(id) if !id.is_empty() => Some(PaymentMethodFacts {
            id: id.clone(),
            brand: None,
            last4: None,
        }),
        Value::Object(object) => {
            let card = object.get("card").and_then(Value::as_object);
            Some(PaymentMethodFacts {
                id: str_field(object, "id")?,
                brand: card
                    .and_then(|card| str_field(card, "brand"))
                    .or_else(|| str_field(object, "type")),
                last4: card.and_then(|card| str_field(card, "last4")).or_else(|| {
                    // Bank debits show their last four too (`sepa_debit.last4`, …).
                    let kind = str_field(object, "type")?;
                    object
                        .get(&kind)
                        .and_then(Value::as_object)
                        .and_then(|details| str_field(details, "last4"))
                }),
            })
        }
        _ => None,
    }
}

/// A checkout session's customer and the ownership it carries (metadata, else
/// `client_reference_id` as the org), with its `created`.
pub fn checkout_session_owner(
    object: &Map<String, Value>,
) -> (Option<String>, OwnerFacts, Option<DateTime<Utc>>) {
    let mut owner = owner_from_metadata(object.get("metadata"));
    if owner.org_id.is_none() {
        owner.org_id = str_field(object, "client_reference_id");
    }
    (customer_of(object), owner, ts_field(object, "created"))
}

/// A string field of an API answer (`id`, `url`).
pub fn text(object: &Map<String, Value>, field: &str) -> Option<String> {
    str_field(object, field)
}

/// `created` of an API answer.
pub fn created(object: &Map<String, Value>) -> Option<DateTime<Utc>> {
    ts_field(object, "created")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_listed_subscription_reads_like_its_webhook_and_carries_its_card() {
        let object = json!({"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
            "metadata": {"organizationId": "org_1"},
            "default_payment_method": {"id": "pm_1", "type": "card", "card": {"brand": "visa", "last4": "4242"}},
            "items": {"data": [{"price": {"id": "price_a"}, "current_period_start": 100, "current_period_end": 200}]}});
        let listed = listed_subscription(object.as_object().unwrap()).unwrap();
        assert_eq!(listed.customer_id, "cus_1");
        assert_eq!(listed.owner.org_id.as_deref(), Some("org_1"));
        assert_eq!(
            listed.payment_method,
            Some(PaymentMethodFacts {
                id: "pm_1".into(),
                brand: Some("visa".into()),
                last4: Some("4242".into())
            })
        );
        assert_eq!(
            listed.facts,
            subscription_facts(object.as_object().unwrap()).unwrap()
        );
        let sepa = json!({"id": "pm_2", "type": "sepa_debit", "sepa_debit": {"last4": "3000"}});
        let method = payment_method(Some(&sepa)).unwrap();
        assert_eq!(
            (method.brand.as_deref(), method.last4.as_deref()),
            (Some("sepa_debit"), Some("3000"))
        );
    }
}
