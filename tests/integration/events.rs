//! Small hand-built Stripe events for focused tests (the simulator builds whole lives).

use serde_json::{json, Value};

pub const T0: i64 = 1_764_000_000;

pub fn envelope(id: &str, event_type: &str, created: i64, object: Value) -> Value {
    json!({
        "id": id, "object": "event", "api_version": "2025-03-31.basil", "created": created,
        "livemode": false, "pending_webhooks": 1, "type": event_type,
        "data": {"object": object}
    })
}

/// A basil-shaped subscription snapshot.
pub fn subscription(sub: &str, customer: &str, status: &str, period_end: i64, org: &str) -> Value {
    json!({
        "id": sub, "object": "subscription", "customer": customer, "status": status, "created": T0,
        "cancel_at_period_end": false, "cancel_at": null, "canceled_at": null, "ended_at": null,
        "trial_start": null, "trial_end": null, "latest_invoice": null,
        "metadata": {"organizationId": org, "userId": format!("user_of_{org}")},
        "items": {"object": "list", "data": [{
            "id": format!("si_{sub}"), "object": "subscription_item", "quantity": 1,
            "price": {"id": "price_pro_monthly", "object": "price", "product": "prod_pro", "lookup_key": "pro_monthly"},
            "current_period_start": period_end - 30 * 86_400, "current_period_end": period_end
        }]}
    })
}

pub fn sub_event(
    id: &str,
    event_type: &str,
    created: i64,
    sub: &str,
    customer: &str,
    status: &str,
    org: &str,
) -> Vec<u8> {
    let far = chrono::Utc::now().timestamp() + 30 * 86_400;
    serde_json::to_vec(&envelope(
        id,
        event_type,
        created,
        subscription(sub, customer, status, far, org),
    ))
    .unwrap()
}
