//! The Stripe API side (issue 3) against a fake Stripe: checkout with the org → customer
//! mapping, the success page before the webhook, the portal and its return, syncs that
//! fail, retry and flag, backfill over several pages, and a reconcile that repairs a
//! customer whose webhooks never came.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::Row;
use subledger::config::Token;

use crate::ops::ADMIN;
use crate::support::fake_stripe::{FakeStripe, Injection};
use crate::support::helpers::{spawn_with, test_settings, TestApp, TOKEN};

pub(crate) async fn spawn_with_stripe(tag: &str) -> (TestApp, FakeStripe) {
    let fake = FakeStripe::start().await;
    let (mut settings, db_name, prefix) = test_settings(tag);
    settings.stripe_secret_key = Some(SecretString::from("sk_test_fake".to_owned()));
    settings.stripe_api_base = fake.base_url.clone();
    // Generous: on a loaded machine even the local fake may be slow to answer, and a
    // timeout would be one more attempt than a test counts.
    settings.stripe_timeout = Duration::from_secs(5);
    settings.stripe_retries = 2;
    settings.stripe_backoff = Duration::from_millis(5);
    settings.sync_retry_base = Duration::from_millis(20);
    // The periodic reconciler stays off in tests.
    settings.reconcile_interval = None;
    // So does the missed-event poller: tests run recovery passes themselves.
    settings.recovery_interval = None;
    settings.public_url = Some("https://billing.example.test".to_owned());
    settings.redirect_origins = vec!["https://app.example.test".to_owned()];
    settings.admin_tokens = vec![Token::from(ADMIN)];
    (spawn_with(settings, db_name, prefix).await, fake)
}

pub(crate) async fn post_json(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.client
        .post(format!("{}{path}", app.address))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A browser that does not follow redirects, so the test sees them.
pub(crate) async fn browse(app: &TestApp, path: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}{path}", app.address))
        .send()
        .await
        .unwrap()
}

async fn deliver(app: &TestApp, events: &[Value]) {
    for event in events {
        let response = app.post_webhook(event.to_string().as_bytes()).await;
        assert_eq!(response.status(), 200);
    }
    app.settle().await;
}

fn checkout_body(org: &str) -> Value {
    json!({"org_id": org, "user_id": "user_1", "email": "a@example.test", "price_id": "price_pro",
        "success_url": "https://app.example.test/welcome", "cancel_url": "https://app.example.test/pricing"})
}

#[tokio::test]
async fn a_double_click_checkout_makes_one_customer_and_one_session() {
    let (app, fake) = spawn_with_stripe("dblclick").await;
    let (a, b) = tokio::join!(
        post_json(&app, "/v1/checkout/sessions", checkout_body("org_dbl")),
        post_json(&app, "/v1/checkout/sessions", checkout_body("org_dbl")),
    );
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let (a, b): (Value, Value) = (a.json().await.unwrap(), b.json().await.unwrap());
    assert_eq!(a["session_id"], b["session_id"]);
    assert_eq!(a["customer_id"], b["customer_id"]);
    assert!(a["url"]
        .as_str()
        .unwrap()
        .starts_with("https://checkout.stripe.test/"));
    assert_eq!((fake.count("customers"), fake.count("sessions")), (1, 1));
    // A third click, after the mapping is recorded, finds the customer in our log.
    let c: Value = post_json(&app, "/v1/checkout/sessions", checkout_body("org_dbl"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(c["session_id"], a["session_id"]);
    assert_eq!(fake.count("customers"), 1);
    // The session carries what the webhooks and the success page need.
    let requests = fake.requests();
    assert!(requests
        .iter()
        .filter(|(method, _, _)| method == "POST")
        .all(|(_, _, key)| key.as_deref().is_some_and(|k| k.starts_with("subledger-"))));
    let session = post_json(
        &app,
        &format!(
            "/v1/checkout/sessions/{}/sync",
            a["session_id"].as_str().unwrap()
        ),
        json!({}),
    )
    .await;
    assert_eq!(session.status(), 200);
    let info: Value = session.json().await.unwrap();
    assert_eq!(info["status"], "none");
    assert_eq!(info["org_id"], "org_dbl");
    app.stop().await;
}

#[tokio::test]
async fn checkout_requires_org_and_user() {
    let (app, _fake) = spawn_with_stripe("required").await;
    let mut body = checkout_body("org_x");
    body.as_object_mut().unwrap().remove("user_id");
    assert_eq!(
        post_json(&app, "/v1/checkout/sessions", body)
            .await
            .status(),
        400
    );
    let mut body = checkout_body("org_x");
    body["org_id"] = json!("");
    assert_eq!(
        post_json(&app, "/v1/checkout/sessions", body)
            .await
            .status(),
        400
    );
    app.stop().await;
}

#[tokio::test]
async fn the_success_page_shows_the_subscription_before_its_webhook_and_a_second_is_refused() {
    let (app, fake) = spawn_with_stripe("success").await;
    let session: Value = post_json(&app, "/v1/checkout/sessions", checkout_body("org_s"))
        .await
        .json()
        .await
        .unwrap();
    let session_id = session["session_id"].as_str().unwrap();
    let webhooks = fake.complete_checkout(session_id);

    let response = browse(
        &app,
        &format!(
            "/checkout/success?session_id={session_id}&redirect=https://app.example.test/welcome"
        ),
    )
    .await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"],
        "https://app.example.test/welcome"
    );
    // No webhook yet, and the org has access, with the card the sync saw.
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 0);
    let entitlement = app.get_json("/v1/orgs/org_s/entitlements").await;
    assert_eq!(entitlement["access"], true, "{entitlement}");
    assert_eq!(entitlement["status"], "active");
    let info = app
        .get_json(&format!(
            "/v1/customers/{}/subscription",
            session["customer_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(info["payment_method"]["last4"], "4242");
    assert_eq!(info["user_id"], "user_1");

    // The webhooks arrive late: nothing changes.
    deliver(&app, &webhooks).await;
    let after = app
        .get_json(&format!(
            "/v1/customers/{}/subscription",
            session["customer_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(after["status"], "active");
    assert_eq!(after["subscription_id"], info["subscription_id"]);

    // One subscription per customer.
    let second = post_json(&app, "/v1/checkout/sessions", checkout_body("org_s")).await;
    assert_eq!(second.status(), 409);
    let attempts = app
        .count("SELECT count(*) FROM sync_attempts WHERE source = 'success_page' AND outcome = 'applied'")
        .await;
    assert_eq!(attempts, 1);
    // An open redirect is refused.
    let evil = browse(
        &app,
        &format!("/checkout/success?session_id={session_id}&redirect=https://evil.test/"),
    )
    .await;
    assert_eq!(evil.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn a_portal_cancellation_shows_on_return_before_its_webhook() {
    let (app, fake) = spawn_with_stripe("portal").await;
    let session: Value = post_json(&app, "/v1/checkout/sessions", checkout_body("org_p"))
        .await
        .json()
        .await
        .unwrap();
    let customer = session["customer_id"].as_str().unwrap().to_owned();
    let created = fake.complete_checkout(session["session_id"].as_str().unwrap());
    deliver(&app, &created).await;
    let info = app
        .get_json(&format!("/v1/customers/{customer}/subscription"))
        .await;
    assert_eq!(info["status"], "active");

    let portal = post_json(
        &app,
        "/v1/portal/sessions",
        json!({"org_id": "org_p", "return_url": "https://app.example.test/account"}),
    )
    .await;
    assert_eq!(portal.status(), 200);
    let portal: Value = portal.json().await.unwrap();
    assert!(portal["url"]
        .as_str()
        .unwrap()
        .starts_with("https://billing.stripe.test/"));
    let cancel_webhook = fake.cancel_in_portal(info["subscription_id"].as_str().unwrap());

    let response = browse(
        &app,
        &format!("/portal/return?customer={customer}&redirect=%2Faccount"),
    )
    .await;
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()["location"], "/account");
    let entitlement = app.get_json("/v1/orgs/org_p/entitlements").await;
    assert_eq!(entitlement["status"], "canceled");
    assert_eq!(entitlement["access"], false);

    deliver(&app, &[cancel_webhook]).await;
    let entitlement = app.get_json("/v1/orgs/org_p/entitlements").await;
    assert_eq!(entitlement["status"], "canceled");
    app.stop().await;
}

#[tokio::test]
async fn a_failing_sync_is_recorded_retried_and_flagged_after_three_failures() {
    let (app, fake) = spawn_with_stripe("flag").await;
    fake.add_subscription("cus_flaky", "org_f", "active", "price_pro", 600);
    fake.fail_always("/v1/subscriptions", 500);

    let response = post_json(&app, "/v1/customers/cus_flaky/sync", json!({})).await;
    assert_eq!(response.status(), 502);
    // The worker retries with backoff until the customer is flagged.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let flagged: Option<i32> = sqlx::query_scalar(
            "SELECT consecutive_failures FROM sync_customers WHERE customer_id = 'cus_flaky' AND flagged_at IS NOT NULL",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        if let Some(failures) = flagged {
            assert!(failures > 3);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never flagged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows = sqlx::query(
        "SELECT source, outcome, attempts FROM sync_attempts WHERE customer_id = 'cus_flaky' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(rows.len() >= 4);
    assert_eq!(rows[0].get::<String, _>("source"), "operator");
    for row in &rows {
        assert_eq!(row.get::<String, _>("outcome"), "failed");
        // One try and two retries of the 500, each time.
        assert_eq!(row.get::<i32, _>("attempts"), 3);
    }
    // The retries keep the source that asked first.
    assert!(rows[1..]
        .iter()
        .all(|row| row.get::<String, _>("source") == "operator"));
    // Operators see it: the metrics the alert reads, and the admin page's sync log.
    let metrics = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failed_syncs: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("subledger_syncs_total{")
                && l.contains("outcome=\"failed\"")
                && l.contains("source=\"operator\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the failed operator syncs are counted");
    assert!(failed_syncs >= 4.0, "{failed_syncs}");
    let page = app
        .client
        .get(format!("{}/admin", app.address))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Flagged: cus_flaky failed"), "{page}");
    assert!(page.contains("<td>operator</td><td>failed</td><td>3</td>"));

    // Stripe recovers: the next retry succeeds and the flag is cleared.
    fake.heal();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let row = sqlx::query(
            "SELECT consecutive_failures, flagged_at IS NOT NULL AS flagged, last_outcome FROM sync_customers WHERE customer_id = 'cus_flaky'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if row.get::<Option<String>, _>("last_outcome").as_deref() == Some("applied") {
            assert_eq!(row.get::<i32, _>("consecutive_failures"), 0);
            assert!(!row.get::<bool, _>("flagged"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.settle().await;
    let entitlement = app.get_json("/v1/orgs/org_f/entitlements").await;
    assert_eq!(entitlement["access"], true);
    app.stop().await;
}

#[tokio::test]
async fn transient_failures_are_retried_with_one_idempotency_key() {
    let (app, fake) = spawn_with_stripe("transient").await;
    fake.inject(
        "/v1/checkout/sessions",
        vec![
            Injection::Status(500),
            Injection::Delay(Duration::from_secs(15)),
        ],
    );
    fake.inject("/v1/customers", vec![Injection::Status(429)]);
    let response = post_json(&app, "/v1/checkout/sessions", checkout_body("org_t")).await;
    assert_eq!(response.status(), 200);
    assert_eq!((fake.count("customers"), fake.count("sessions")), (1, 1));
    let keys = |path: &str| -> Vec<String> {
        fake.requests()
            .into_iter()
            .filter(|(method, p, _)| method == "POST" && p == path)
            .map(|(_, _, key)| key.expect("every POST carries an idempotency key"))
            .collect()
    };
    // 500, then a timeout (15 s answer, 5 s timeout), then success: one key throughout.
    let sessions = keys("/v1/checkout/sessions");
    assert_eq!(sessions.len(), 3);
    assert!(sessions.iter().all(|k| *k == sessions[0]));
    let customers = keys("/v1/customers");
    assert_eq!(customers.len(), 2);
    assert_eq!(customers[0], customers[1]);
    // A 4xx is not retried and is passed on.
    let mut body = checkout_body("org_t2");
    body["price_id"] = json!("price_pro");
    fake.inject("/v1/checkout/sessions", vec![Injection::Status(400)]);
    let refused = post_json(&app, "/v1/checkout/sessions", body).await;
    assert_eq!(refused.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn reconcile_repairs_a_customer_whose_webhooks_never_came() {
    let (app, fake) = spawn_with_stripe("repair").await;
    let sub = fake.add_subscription("cus_lost", "org_lost", "active", "price_pro", 3_600);
    // Webhooks told us only that the subscription was incomplete, long ago.
    let mut old = sub.clone();
    old["status"] = json!("incomplete");
    old["default_payment_method"] = json!(null);
    let created = sub["created"].as_i64().unwrap();
    let stale_event = |id: &str, at: i64| {
        json!({"id": id, "object": "event", "type": "customer.subscription.updated", "created": at,
            "data": {"object": old.clone()}})
    };
    deliver(&app, &[stale_event("evt_first", created)]).await;
    let info = app.get_json("/v1/customers/cus_lost/subscription").await;
    assert_eq!(info["status"], "incomplete");

    let response = post_json(&app, "/v1/customers/cus_lost/sync", json!({})).await;
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    assert_eq!(info["status"], "active", "{info}");
    assert_eq!(info["payment_method"]["brand"], "visa");
    assert_eq!(info["org_id"], "org_lost");
    // The answer is the view the sync decided: what the projections hold once applied.
    app.settle().await;
    assert_eq!(
        app.get_json("/v1/customers/cus_lost/subscription").await,
        info
    );
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_id = 'cus_lost' ORDER BY sequence",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(
        kinds.contains(&"SubscriptionReconciled".to_owned()),
        "{kinds:?}"
    );

    // A late webhook from before the sync cannot undo it.
    deliver(&app, &[stale_event("evt_late", created + 60)]).await;
    let (_, outcome, _) = app.inbox_row("evt_late").await.unwrap();
    assert_eq!(outcome.as_deref(), Some("stale"));
    let info = app.get_json("/v1/customers/cus_lost/subscription").await;
    assert_eq!(info["status"], "active");

    // Asking again records nothing, and answers what the projections hold.
    let before = app.count("SELECT count(*) FROM events").await;
    let again: Value = post_json(&app, "/v1/customers/cus_lost/sync", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(app.count("SELECT count(*) FROM events").await, before);
    assert_eq!(
        again,
        app.get_json("/v1/customers/cus_lost/subscription").await
    );
    let outcomes: Vec<String> = sqlx::query_scalar(
        "SELECT outcome FROM sync_attempts WHERE customer_id = 'cus_lost' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(outcomes, ["applied", "unchanged"]);
    app.stop().await;
}

#[tokio::test]
async fn a_webhook_whose_previous_status_we_never_held_asks_for_a_sync() {
    let (app, fake) = spawn_with_stripe("prevstatus").await;
    let sub = fake.add_subscription("cus_gap", "org_gap", "past_due", "price_pro", 600);
    let mut active = sub.clone();
    active["status"] = json!("active");
    let created = sub["created"].as_i64().unwrap();
    deliver(
        &app,
        &[
            json!({"id": "evt_a", "object": "event", "type": "customer.subscription.created",
            "created": created, "data": {"object": active}}),
        ],
    )
    .await;
    // Stripe says it moved from past_due, which we never saw: sync instead of guessing.
    let mut unpaid = sub.clone();
    unpaid["status"] = json!("past_due");
    deliver(
        &app,
        &[json!({"id": "evt_b", "object": "event", "type": "customer.subscription.updated",
            "created": created + 1, "data": {"object": unpaid, "previous_attributes": {"status": "trialing"}}})],
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let synced = app
            .count("SELECT count(*) FROM sync_attempts WHERE customer_id = 'cus_gap' AND source = 'webhook'")
            .await;
        if synced > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sync was requested"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn backfill_pages_through_hundreds_of_subscriptions_and_is_safe_to_rerun() {
    let (app, fake) = spawn_with_stripe("backfill").await;
    for i in 0..260 {
        // 130 customers with two subscriptions each: one canceled long ago, one live.
        let customer = format!("cus_bf{:04}", i / 2);
        let status = if i % 2 == 0 { "canceled" } else { "active" };
        fake.add_subscription(
            &customer,
            &format!("org_bf{}", i / 2),
            status,
            "price_pro",
            10_000 - i,
        );
    }
    let syncer = app.services.syncer().unwrap().unwrap();
    let mut pages_seen = Vec::new();
    let report = syncer
        .backfill(None, None, |r| pages_seen.push(r.pages))
        .await
        .unwrap();
    assert_eq!(report.pages, 3);
    assert_eq!(pages_seen, [1, 2, 3]);
    assert_eq!(report.subscriptions, 260);
    assert_eq!(report.customers, 130);
    assert_eq!(
        report.events,
        260 + 130,
        "a subscription each, and each owner once"
    );
    app.settle().await;
    assert_eq!(
        app.count("SELECT count(*) FROM merchant_subscriptions")
            .await,
        260
    );
    assert_eq!(
        app.count("SELECT count(*) FROM subscriptions WHERE status = 'active'")
            .await,
        130
    );
    let again = syncer.backfill(None, None, |_| {}).await.unwrap();
    assert_eq!((again.subscriptions, again.events), (260, 0));
    app.stop().await;
}

/// Issue 11 item 7: a sync's facts are stamped with Stripe's clock (its answer's `Date`
/// header), not ours. The fake's clock runs an hour behind ours: the recorded event's
/// time is the fake's, to the second.
#[tokio::test]
async fn a_sync_is_stamped_with_stripes_clock() {
    let (app, fake) = spawn_with_stripe("stripeclock").await;
    fake.set_clock_offset(-3_600);
    fake.add_subscription("cus_clock", "org_clock", "active", "price_pro", 7_200);
    let before = chrono::Utc::now().timestamp() - 3_600;
    let response = post_json(&app, "/v1/customers/cus_clock/sync", json!({})).await;
    assert_eq!(response.status(), 200);
    let after = chrono::Utc::now().timestamp() - 3_600;
    let stamped: Vec<i64> = sqlx::query_scalar(
        "SELECT (payload->'SubscriptionReconciled'->'source'->>'created')::timestamptz \
         FROM events WHERE aggregate_id = 'cus_clock' AND event_type = 'SubscriptionReconciled'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|at: chrono::DateTime<chrono::Utc>| at.timestamp())
    .collect();
    assert_eq!(stamped.len(), 1, "{stamped:?}");
    assert!(
        (before..=after).contains(&stamped[0]),
        "stamped {} outside Stripe's clock [{before}, {after}]",
        stamped[0]
    );
    app.stop().await;
}

#[tokio::test]
async fn after_customer_deleted_checkout_creates_a_fresh_customer() {
    let (app, fake) = spawn_with_stripe("deletedcus").await;
    let first: Value = post_json(&app, "/v1/checkout/sessions", checkout_body("org_gone"))
        .await
        .json()
        .await
        .unwrap();
    let deleted = first["customer_id"].as_str().unwrap().to_owned();
    assert_eq!(fake.count("customers"), 1);
    // docs.stripe.com/api/events/types#event_types-customer.deleted: data.object is the
    // customer (docs.stripe.com/api/customers/object) as it was.
    let event = crate::events::envelope(
        "evt_cus_deleted",
        "customer.deleted",
        chrono::Utc::now().timestamp(),
        json!({"id": deleted, "object": "customer", "deleted": true,
            "metadata": {"organizationId": "org_gone", "userId": "user_1"}}),
    );
    deliver(&app, &[event]).await;
    let second = post_json(&app, "/v1/checkout/sessions", checkout_body("org_gone")).await;
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.unwrap();
    assert_ne!(second["customer_id"].as_str(), Some(deleted.as_str()));
    assert_eq!(
        fake.count("customers"),
        2,
        "Stripe saw a second customer create"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_sync_records_the_customers_stripe_entitlements() {
    let (app, fake) = spawn_with_stripe("entsync").await;
    fake.add_subscription("cus_ent", "org_ent", "active", "price_basic_monthly", 60);
    fake.set_entitlements("cus_ent", &["sso", "audit_log"]);
    let response = post_json(&app, "/v1/customers/cus_ent/sync", json!({})).await;
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    assert_eq!(
        info["stripe_features"],
        json!(["audit_log", "sso"]),
        "{info}"
    );
    app.settle().await;
    let e = app.get_json("/v1/orgs/org_ent/entitlements").await;
    assert_eq!(
        e["features"],
        json!(["projects:3", "audit_log", "sso"]),
        "{e}"
    );
    // A second sync with the same answer records nothing; a changed one replaces the set.
    post_json(&app, "/v1/customers/cus_ent/sync", json!({})).await;
    fake.set_entitlements("cus_ent", &["sso"]);
    // Stripe stamps whole seconds: the next answer must be a later second to be newer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let info: Value = post_json(&app, "/v1/customers/cus_ent/sync", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(info["stripe_features"], json!(["sso"]), "{info}");
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'EntitlementsRecorded'")
            .await,
        2
    );
    app.stop().await;
}
