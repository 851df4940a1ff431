//! Entitlements for real Stripe account shapes (issue 11), through signed webhooks against
//! the real stack: many subscriptions per customer, many customers per org and user, every
//! item of a subscription, late renewals and `cancel_at`, deleted customers, Stripe
//! Entitlements, pause reasons, and an old log replayed into the new answers.
//!
//! Payload shapes follow Stripe's API reference (docs.stripe.com/api/subscriptions/object
//! at 2025-03-31.basil: `items.data[].price.recurring.usage_type`, the period on each item,
//! `cancel_at`; docs.stripe.com/api/customers/object for `customer.*`), the changelog for
//! `status_details.paused.subscription.type`
//! (docs.stripe.com/changelog/endive/2026-09-30/pause-on-payment-failure), and
//! async-stripe's `EntitlementsActiveEntitlementSummary` (`customer`, `entitlements` list of
//! `entitlements.active_entitlement` with `lookup_key`) for the summary event.

use chrono::Utc;
use serde_json::{json, Value};
use subledger::config::OrgToken;

use crate::events::{envelope, T0};
use crate::support::helpers::{spawn_app, spawn_with, test_settings, TestApp};

fn now() -> i64 {
    Utc::now().timestamp()
}

/// A licensed or metered item (docs.stripe.com/api/subscription_items/object; the period
/// on the item since 2025-03-31.basil).
fn item(price: &str, quantity: u64, usage: &str, period_end: i64) -> Value {
    json!({
        "id": format!("si_{price}"), "object": "subscription_item", "quantity": quantity,
        "price": {"id": price, "object": "price", "product": format!("prod_{price}"), "lookup_key": null,
            "recurring": {"interval": "month", "usage_type": usage}},
        "current_period_start": period_end - 30 * 86_400, "current_period_end": period_end
    })
}

/// A basil-shaped subscription (docs.stripe.com/api/subscriptions/object).
fn subscription(
    sub: &str,
    customer: &str,
    status: &str,
    created: i64,
    org: &str,
    items: Vec<Value>,
) -> Value {
    json!({
        "id": sub, "object": "subscription", "customer": customer, "status": status, "created": created,
        "cancel_at_period_end": false, "cancel_at": null, "canceled_at": null, "ended_at": null,
        "trial_start": null, "trial_end": null, "latest_invoice": null,
        "metadata": {"organizationId": org, "userId": format!("user_of_{org}")},
        "items": {"object": "list", "data": items}
    })
}

fn pro(period_end: i64) -> Vec<Value> {
    vec![item("price_pro_monthly", 1, "licensed", period_end)]
}

fn basic(period_end: i64) -> Vec<Value> {
    vec![item("price_basic_monthly", 1, "licensed", period_end)]
}

/// A `customer.*` object (docs.stripe.com/api/customers/object) with its owner metadata.
fn customer(id: &str, org: &str, user: &str) -> Value {
    json!({"id": id, "object": "customer", "metadata": {"organizationId": org, "userId": user}})
}

async fn send(app: &TestApp, id: &str, event_type: &str, created: i64, object: Value) {
    let body = envelope(id, event_type, created, object).to_string();
    assert_eq!(
        app.post_webhook(body.as_bytes()).await.status(),
        200,
        "{id}"
    );
}

async fn org(app: &TestApp, org: &str) -> Value {
    app.get_json(&format!("/v1/orgs/{org}/entitlements")).await
}

#[tokio::test]
async fn an_older_active_subscription_outweighs_a_newer_incomplete_one() {
    let app = spawn_app("olderactive").await;
    let end = now() + 20 * 86_400;
    send(
        &app,
        "evt_a1",
        "customer.subscription.created",
        T0,
        subscription("sub_old", "cus_ai", "active", T0, "org_ai", pro(end)),
    )
    .await;
    // An abandoned upgrade: newer, incomplete.
    send(
        &app,
        "evt_a2",
        "customer.subscription.created",
        T0 + 100,
        subscription(
            "sub_new",
            "cus_ai",
            "incomplete",
            T0 + 100,
            "org_ai",
            basic(end),
        ),
    )
    .await;
    app.settle().await;
    let e = org(&app, "org_ai").await;
    assert_eq!(
        (e["access"].as_bool(), e["plan"].as_str()),
        (Some(true), Some("pro")),
        "{e}"
    );
    assert_eq!(e["subscription_id"], "sub_old");
    assert_eq!(e["status"], "active");
    assert_eq!(e["subscriptions"].as_array().unwrap().len(), 2);
    let c = app.get_json("/v1/customers/cus_ai/subscription").await;
    assert_eq!(c["subscription_id"], "sub_old", "{c}");
    assert_eq!(c["plan"], "pro");
    let subs = c["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 2);
    assert_eq!(subs[0]["subscription_id"], "sub_new", "newest first");
    assert_eq!(
        (subs[0]["access"].as_bool(), subs[1]["access"].as_bool()),
        (Some(false), Some(true))
    );
    app.stop().await;
}

#[tokio::test]
async fn an_org_and_a_user_are_the_union_of_their_customers_in_any_order_and_on_a_cache_miss() {
    let (mut settings, db, prefix) = test_settings("union");
    settings.org_tokens = vec![OrgToken {
        token: "tok_org_u".into(),
        org_id: "org_u".to_owned(),
    }];
    let app = spawn_with(settings, db, prefix).await;
    let end = now() + 20 * 86_400;
    // The old customer: canceled. The new one: active. Then a late `customer.updated` on
    // the old one (today's code let it flip the org back).
    let mut old = subscription(
        "sub_u_old",
        "cus_u_old",
        "canceled",
        T0,
        "org_u",
        basic(end),
    );
    old["metadata"]["userId"] = json!("user_u");
    let mut new = subscription(
        "sub_u_new",
        "cus_u_new",
        "active",
        T0 + 10,
        "org_u",
        pro(end),
    );
    new["metadata"]["userId"] = json!("user_u");
    send(&app, "evt_u1", "customer.subscription.deleted", T0, old).await;
    send(
        &app,
        "evt_u2",
        "customer.subscription.created",
        T0 + 10,
        new,
    )
    .await;
    app.settle().await;
    send(
        &app,
        "evt_u3",
        "customer.updated",
        T0 + 500,
        customer("cus_u_old", "org_u", "user_u"),
    )
    .await;
    // The same user in a second org, whose only customer is canceled, touched last.
    let mut other = subscription("sub_u_b", "cus_u_b", "canceled", T0, "org_u_b", basic(end));
    other["metadata"]["userId"] = json!("user_u");
    send(
        &app,
        "evt_u4",
        "customer.subscription.deleted",
        T0 + 600,
        other,
    )
    .await;
    send(
        &app,
        "evt_u5",
        "customer.updated",
        T0 + 700,
        customer("cus_u_b", "org_u_b", "user_u"),
    )
    .await;
    app.settle().await;

    let check = |e: &Value| {
        assert_eq!(e["access"], true, "{e}");
        assert_eq!(e["plan"], "pro", "{e}");
        assert_eq!(e["customer_id"], "cus_u_new", "{e}");
    };
    let first = org(&app, "org_u").await; // a miss: filled from Postgres
    check(&first);
    assert_eq!(first["customers"], json!(["cus_u_new", "cus_u_old"]));
    let cached = org(&app, "org_u").await; // a hit: the hash
    assert_eq!(cached, first);
    check(&app.get_json("/v1/users/user_u/entitlements").await);
    // The org-scoped token reads the same union.
    let scoped: Value = app
        .client
        .get(format!("{}/v1/orgs/org_u/entitlements", app.address))
        .bearer_auth("tok_org_u")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(scoped, first);
    // A cache miss everywhere, then reads of the old customer first: the same union.
    app.wipe_cache().await;
    let c = app.get_json("/v1/customers/cus_u_old/subscription").await;
    assert_eq!(c["status"], "canceled");
    send(
        &app,
        "evt_u6",
        "customer.updated",
        T0 + 800,
        customer("cus_u_old", "org_u", "user_u"),
    )
    .await;
    app.settle().await;
    check(&org(&app, "org_u").await);
    check(&app.get_json("/v1/users/user_u/entitlements").await);

    // A customer that moves to another org leaves this one.
    send(
        &app,
        "evt_u7",
        "customer.updated",
        T0 + 900,
        customer("cus_u_new", "org_elsewhere", "user_u"),
    )
    .await;
    app.settle().await;
    let moved = org(&app, "org_u").await;
    assert_eq!(moved["access"], false, "{moved}");
    assert_eq!(org(&app, "org_elsewhere").await["access"], true);
    app.stop().await;
}

#[tokio::test]
async fn every_item_counts_and_a_metered_add_on_never_names_the_plan() {
    let app = spawn_app("items").await;
    let end = now() + 20 * 86_400;
    let items = vec![
        item("price_api_calls", 0, "metered", end),
        item("price_pro_monthly", 5, "licensed", end),
    ];
    send(
        &app,
        "evt_i1",
        "customer.subscription.created",
        T0,
        subscription("sub_i", "cus_i", "active", T0, "org_i", items),
    )
    .await;
    app.settle().await;
    let e = org(&app, "org_i").await;
    assert_eq!(
        (e["plan"].as_str(), e["seats"].as_u64()),
        (Some("pro"), Some(5)),
        "{e}"
    );
    assert_eq!(
        e["features"],
        json!(["projects:unlimited", "api", "priority_support"])
    );
    let c = app.get_json("/v1/customers/cus_i/subscription").await;
    let items = c["subscriptions"][0]["items"].as_array().unwrap().clone();
    assert_eq!(items[0]["usage_type"], "metered");
    assert_eq!(items[0]["plan"], Value::Null);
    assert_eq!(items[1]["plan"], "pro");
    assert_eq!(c["seats"], 5);
    app.stop().await;
}

#[tokio::test]
async fn a_late_renewal_keeps_access_for_the_grace_and_cancel_at_ends_it_early() {
    let app = spawn_app("time").await;
    // The period ended five minutes ago; the renewal's webhook has not come.
    let ended = now() - 300;
    send(
        &app,
        "evt_t1",
        "customer.subscription.created",
        T0,
        subscription("sub_t", "cus_t", "active", T0, "org_t", pro(ended)),
    )
    .await;
    // cancel_at before the period end.
    let end = now() + 20 * 86_400;
    let cancel_at = now() + 86_400;
    let mut canceling = subscription("sub_c", "cus_c", "active", T0, "org_c", pro(end));
    canceling["cancel_at"] = json!(cancel_at);
    send(
        &app,
        "evt_t2",
        "customer.subscription.updated",
        T0,
        canceling,
    )
    .await;
    // cancel_at already passed (its deletion webhook is late).
    let mut passed = subscription("sub_p", "cus_p", "active", T0, "org_p", pro(end));
    passed["cancel_at"] = json!(now() - 60);
    send(&app, "evt_t3", "customer.subscription.updated", T0, passed).await;
    app.settle().await;

    let late = org(&app, "org_t").await;
    assert_eq!(late["access"], true, "{late}");
    let until =
        chrono::DateTime::parse_from_rfc3339(late["access_until"].as_str().unwrap()).unwrap();
    assert_eq!(
        until.timestamp(),
        ended + 24 * 3600,
        "the default grace is a day"
    );
    let c = org(&app, "org_c").await;
    let until = chrono::DateTime::parse_from_rfc3339(c["access_until"].as_str().unwrap()).unwrap();
    assert_eq!(until.timestamp(), cancel_at, "{c}");
    assert_eq!(org(&app, "org_p").await["access"], false);
    app.stop().await;
}

#[tokio::test]
async fn a_deleted_customer_leaves_its_org() {
    let app = spawn_app("deleted").await;
    let end = now() + 20 * 86_400;
    send(
        &app,
        "evt_d1",
        "customer.subscription.created",
        T0,
        subscription("sub_d", "cus_d", "active", T0, "org_d", pro(end)),
    )
    .await;
    app.settle().await;
    assert_eq!(org(&app, "org_d").await["access"], true);
    // docs.stripe.com/api/events/types#event_types-customer.deleted: data.object is the customer.
    send(
        &app,
        "evt_d2",
        "customer.deleted",
        T0 + 50,
        customer("cus_d", "org_d", "user_of_org_d"),
    )
    .await;
    app.settle().await;
    let e = org(&app, "org_d").await;
    assert_eq!(
        (e["access"].as_bool(), e["status"].as_str()),
        (Some(false), Some("none")),
        "{e}"
    );
    assert_eq!(e["customers"], json!([]));
    let c = app.get_json("/v1/customers/cus_d/subscription").await;
    assert_eq!(c["deleted"], true);
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'CustomerDeleted'")
            .await,
        1
    );
    app.wipe_cache().await;
    assert_eq!(org(&app, "org_d").await["access"], false);
    app.stop().await;
}

/// `entitlements.active_entitlement_summary.updated` (async-stripe
/// `EntitlementsActiveEntitlementSummary`: `customer`, `entitlements.data[].lookup_key`).
fn summary(customer: &str, keys: &[&str]) -> Value {
    json!({
        "object": "entitlements.active_entitlement_summary", "customer": customer, "livemode": false,
        "entitlements": {"object": "list", "has_more": false, "url": "/v1/entitlements/active_entitlements",
            "data": keys.iter().map(|k| json!({"id": format!("ent_{k}"), "object": "entitlements.active_entitlement",
                "feature": format!("feat_{k}"), "livemode": false, "lookup_key": k})).collect::<Vec<_>>()}
    })
}

#[tokio::test]
async fn stripe_entitlements_add_their_features_and_a_stale_summary_does_not_win() {
    let app = spawn_app("stripeent").await;
    let end = now() + 20 * 86_400;
    send(
        &app,
        "evt_s1",
        "customer.subscription.created",
        T0,
        subscription("sub_s", "cus_s", "active", T0, "org_s", basic(end)),
    )
    .await;
    send(
        &app,
        "evt_s2",
        "entitlements.active_entitlement_summary.updated",
        T0 + 20,
        summary("cus_s", &["sso", "audit_log"]),
    )
    .await;
    app.settle().await;
    // An older summary arriving late changes nothing.
    send(
        &app,
        "evt_s3",
        "entitlements.active_entitlement_summary.updated",
        T0 + 10,
        summary("cus_s", &["sso"]),
    )
    .await;
    app.settle().await;
    let e = org(&app, "org_s").await;
    assert_eq!(
        e["features"],
        json!(["projects:3", "audit_log", "sso"]),
        "{e}"
    );
    let row = app.inbox_row("evt_s3").await.unwrap();
    assert_eq!(row.1.as_deref(), Some("stale"), "{row:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_paused_subscription_records_its_reason_and_denies_by_default() {
    let app = spawn_app("paused").await;
    let end = now() + 20 * 86_400;
    let mut paused = subscription("sub_pz", "cus_pz", "paused", T0, "org_pz", pro(end));
    paused["status_details"] = json!({"paused": {"type": "subscription", "transitioned_at": T0,
        "subscription": {"type": "first_payment_failure"}}});
    send(&app, "evt_pz1", "customer.subscription.paused", T0, paused).await;
    // pause_collection keeps the status (and so access).
    let mut collection = subscription("sub_pc", "cus_pc", "active", T0, "org_pc", pro(end));
    collection["pause_collection"] = json!({"behavior": "keep_as_draft", "resumes_at": null});
    send(
        &app,
        "evt_pc1",
        "customer.subscription.updated",
        T0,
        collection,
    )
    .await;
    app.settle().await;
    let e = org(&app, "org_pz").await;
    assert_eq!(e["access"], false, "{e}");
    assert_eq!(
        e["subscriptions"][0]["pause_reason"],
        "first_payment_failure"
    );
    assert_eq!(org(&app, "org_pc").await["access"], true);
    app.stop().await;
}

#[tokio::test]
async fn a_catalogue_may_grant_a_paused_subscription_by_its_reason() {
    let dir = crate::support::procs::scratch("pausecatalog");
    let path = dir.join("catalog.toml");
    let sample =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/catalog.example.toml"))
            .unwrap();
    std::fs::write(
        &path,
        sample.replace(
            "paused_grant_reasons = []",
            "paused_grant_reasons = [\"first_payment_failure\"]",
        ),
    )
    .unwrap();
    let (mut settings, db, prefix) = test_settings("pausegrant");
    settings.catalog_path = Some(path);
    let app = spawn_with(settings, db, prefix).await;
    let end = now() + 20 * 86_400;
    let mut paused = subscription("sub_pg", "cus_pg", "paused", T0, "org_pg", pro(end));
    paused["status_details"] = json!({"paused": {"type": "subscription", "transitioned_at": T0,
        "subscription": {"type": "first_payment_failure"}}});
    send(
        &app,
        "evt_pg1",
        "customer.subscription.paused",
        T0,
        paused.clone(),
    )
    .await;
    paused["id"] = json!("sub_pg2");
    paused["customer"] = json!("cus_pg2");
    paused["metadata"]["organizationId"] = json!("org_pg2");
    paused["status_details"]["paused"]["subscription"]["type"] = json!("final_payment_failure");
    send(&app, "evt_pg2", "customer.subscription.paused", T0, paused).await;
    app.settle().await;
    assert_eq!(org(&app, "org_pg").await["access"], true);
    assert_eq!(org(&app, "org_pg2").await["access"], false);
    app.stop().await;
}

/// Events exactly as main wrote them before this change (6482bbc: a view with one current
/// subscription, no items), for a customer with two subscriptions.
fn old_shaped_rows(end: &str) -> Vec<(i64, &'static str, String)> {
    let sub = |id: &str, status: &str, price: &str, created: &str| {
        format!(
            r#"{{"id": "{id}", "status": "{status}", "created": "{created}", "currency": "usd", "ended_at": null,
            "price_id": "{price}", "quantity": 3, "cancel_at": null, "trial_end": null, "lookup_key": null,
            "product_id": null, "canceled_at": null, "trial_start": null, "latest_invoice_id": null,
            "current_period_end": "{end}", "cancel_at_period_end": false, "current_period_start": "2025-11-01T00:00:00Z"}}"#
        )
    };
    let pro = sub(
        "sub_legacy_pro",
        "active",
        "price_pro_monthly",
        "2025-10-01T00:00:00Z",
    );
    let basic = sub(
        "sub_legacy_basic",
        "incomplete",
        "price_basic_monthly",
        "2025-10-05T00:00:00Z",
    );
    let view = |current: &str| {
        format!(
            r#"{{"as_of": "2025-11-01T00:00:00Z", "org_id": "org_legacy", "user_id": null,
            "customer_id": "cus_legacy", "subscription": {current}, "latest_invoice": null}}"#
        )
    };
    let source = |n: u32| {
        format!(
            r#"{{"created": "2025-11-01T00:00:0{n}Z", "stripe_event_id": "evt_legacy_{n}", "stripe_event_type": "customer.subscription.updated"}}"#
        )
    };
    vec![
        (
            1,
            "OwnerLinked",
            format!(
                r#"{{"OwnerLinked": {{"view": {}, "org_id": "org_legacy", "source": {}, "user_id": null}}}}"#,
                view("null"),
                source(1)
            ),
        ),
        (
            2,
            "SubscriptionChanged",
            format!(
                r#"{{"SubscriptionChanged": {{"from": null, "view": {}, "source": {}, "transition": "first", "subscription": {pro}}}}}"#,
                view(&pro),
                source(1)
            ),
        ),
        (
            3,
            "SubscriptionChanged",
            format!(
                r#"{{"SubscriptionChanged": {{"from": null, "view": {}, "source": {}, "transition": "first", "subscription": {basic}}}}}"#,
                view(&basic),
                source(2)
            ),
        ),
    ]
}

#[tokio::test]
async fn an_old_log_replays_into_the_new_answers_and_its_next_event_shows_every_subscription() {
    let app = spawn_app("oldlog").await;
    let end = (Utc::now() + chrono::Duration::days(20))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    for (sequence, event_type, payload) in old_shaped_rows(&end) {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             VALUES ('Subscription', 'cus_legacy', $1, $2, '1', $3::json, '{}'::json)",
        )
        .bind(sequence)
        .bind(event_type)
        .bind(payload)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    app.services.replay(|_| {}, |_, _| {}).await.unwrap();
    app.settle().await;
    app.wipe_cache().await;
    let c = app.get_json("/v1/customers/cus_legacy/subscription").await;
    // The old view named the newest live subscription only: that is what it replays to.
    assert_eq!(c["subscriptions"].as_array().unwrap().len(), 1, "{c}");
    assert_eq!(
        c["subscriptions"][0]["items"][0]["price_id"],
        "price_basic_monthly"
    );
    // The aggregate folds the old events whole: the next event's view has both, and the
    // older active pro subscription is the answer.
    let mut basil = subscription(
        "sub_legacy_basic",
        "cus_legacy",
        "incomplete",
        T0,
        "org_legacy",
        basic(now() + 20 * 86_400),
    );
    basil["created"] = json!(chrono::DateTime::parse_from_rfc3339("2025-10-05T00:00:00Z")
        .unwrap()
        .timestamp());
    send(
        &app,
        "evt_legacy_3",
        "customer.subscription.updated",
        now(),
        basil,
    )
    .await;
    app.settle().await;
    let e = org(&app, "org_legacy").await;
    assert_eq!(
        (
            e["access"].as_bool(),
            e["plan"].as_str(),
            e["seats"].as_u64()
        ),
        (Some(true), Some("pro"), Some(3)),
        "{e}"
    );
    assert_eq!(e["subscriptions"].as_array().unwrap().len(), 2);
    // And a replay of the mixed log gives the same answers.
    let before = app.get_json("/v1/customers/cus_legacy/subscription").await;
    app.services.replay(|_| {}, |_, _| {}).await.unwrap();
    app.settle().await;
    app.wipe_cache().await;
    assert_eq!(
        app.get_json("/v1/customers/cus_legacy/subscription").await,
        before
    );
    app.stop().await;
}
