//! Connect (issue 12 item 3): the account a connected account's event names is kept with
//! its customer, shown in the answer and by `inspect`, and every call subledger makes to
//! Stripe about that customer (sync, checkout, portal, backfill) is made for it with
//! `Stripe-Account`. The fake Stripe scopes each customer to its account, so a call made
//! without the header does not find it, as Stripe's does not
//! (https://docs.stripe.com/connect/authentication#stripe-account-header).
//!
//! Payload sources: a connected account's snapshot event names it in `account`
//! (https://docs.stripe.com/api/events/object#event_object-account; async-stripe-shared
//! `stripe_shared/event.rs`, `Event::account`); a thin event names it in `context`
//! (https://docs.stripe.com/api/v2/core/events/object). Both are built by
//! `FakeStripe::change_status`. A real Connect event carries it the same way:
//! `../shared/fixtures/stripe-events/bitwarden-server/16847f7223/.../customer.updated.json`
//! (`"account": "acct_19smIXIGBnsLynRr"` beside `"object": "event"`).

use serde_json::{json, Value};

use crate::cli::{run, subledger};
use crate::stripe_api::{browse, post_json, spawn_with_stripe};
use crate::support::helpers::TestApp;

async fn deliver(app: &TestApp, event: &Value) {
    let response = app.post_webhook(event.to_string().as_bytes()).await;
    assert_eq!(response.status(), 200, "{event}");
    app.settle().await;
}

/// The `Stripe-Account` of every request the fake received on a path starting with `prefix`.
fn accounts_on(
    fake: &crate::support::fake_stripe::FakeStripe,
    prefix: &str,
) -> Vec<Option<String>> {
    fake.requests_with_account()
        .into_iter()
        .filter(|(_, path, _)| path.starts_with(prefix))
        .map(|(_, _, account)| account)
        .collect()
}

#[tokio::test]
async fn a_connected_accounts_customer_shows_its_account_and_every_call_carries_it() {
    let (app, fake) = spawn_with_stripe("connect").await;
    const ACCOUNT: &str = "acct_1Connected";
    let sub = fake.add_subscription("cus_conn", "org_conn", "active", "price_pro", 3_600);
    fake.connect("cus_conn", ACCOUNT);
    let sub_id = sub["id"].as_str().unwrap();

    // The connected account's snapshot event (`account` set) reaches the platform's webhook.
    let (snapshot, _) = fake.change_status(sub_id, "past_due", Some(ACCOUNT));
    assert_eq!(snapshot["account"], ACCOUNT);
    deliver(&app, &snapshot).await;
    let info = app.get_json("/v1/customers/cus_conn/subscription").await;
    assert_eq!(info["status"], "past_due", "{info}");
    assert_eq!(info["account"], ACCOUNT, "{info}");

    // `inspect` shows it.
    let report = subledger::inspect::inspect(
        &app.pool,
        &app.services.cache,
        &app.services.catalog,
        "cus_conn",
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    let text = subledger::inspect::render_text(&report);
    assert!(text.contains(&format!("account {ACCOUNT}")), "{text}");
    assert!(
        text.contains(&format!("Connect account {ACCOUNT}")),
        "{text}"
    );

    // A sync is made for the account (the fake would not find the customer otherwise),
    // and what it finds agrees.
    let response = post_json(&app, "/v1/customers/cus_conn/sync", json!({})).await;
    assert_eq!(response.status(), 200);
    let listed = accounts_on(&fake, "/v1/subscriptions");
    assert!(!listed.is_empty());
    assert!(
        listed.iter().all(|a| a.as_deref() == Some(ACCOUNT)),
        "{listed:?}"
    );
    let entitlements = accounts_on(&fake, "/v1/entitlements/active_entitlements");
    assert!(!entitlements.is_empty());
    assert!(
        entitlements.iter().all(|a| a.as_deref() == Some(ACCOUNT)),
        "{entitlements:?}"
    );
    let info = app.get_json("/v1/customers/cus_conn/subscription").await;
    assert_eq!(
        (info["status"].as_str(), info["account"].as_str()),
        (Some("past_due"), Some(ACCOUNT)),
        "{info}"
    );

    // The billing portal is opened in the account, by customer and by org.
    for body in [
        json!({"customer_id": "cus_conn", "return_url": "https://app.example.test/account"}),
        json!({"org_id": "org_conn", "return_url": "https://app.example.test/account"}),
    ] {
        let portal = post_json(&app, "/v1/portal/sessions", body).await;
        assert_eq!(portal.status(), 200);
    }
    let portals = accounts_on(&fake, "/v1/billing_portal/sessions");
    assert_eq!(
        portals,
        [Some(ACCOUNT.to_owned()), Some(ACCOUNT.to_owned())]
    );
    app.stop().await;
}

#[tokio::test]
async fn a_checkout_for_a_connected_accounts_customer_is_made_in_its_account() {
    let (app, fake) = spawn_with_stripe("connectco").await;
    const ACCOUNT: &str = "acct_1Checkout";
    // The org's customer lives in a connected account; its subscription ended, so the org
    // may check out again, with the same customer.
    let sub = fake.add_subscription("cus_co", "org_co", "active", "price_pro", 3_600);
    fake.connect("cus_co", ACCOUNT);
    let (snapshot, _) = fake.change_status(sub["id"].as_str().unwrap(), "canceled", Some(ACCOUNT));
    deliver(&app, &snapshot).await;
    let info = app.get_json("/v1/customers/cus_co/subscription").await;
    assert_eq!(info["account"], ACCOUNT, "{info}");

    let response = post_json(
        &app,
        "/v1/checkout/sessions",
        json!({"org_id": "org_co", "user_id": "user_1", "price_id": "price_pro",
            "success_url": "https://app.example.test/welcome",
            "cancel_url": "https://app.example.test/pricing"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let session: Value = response.json().await.unwrap();
    assert_eq!(session["customer_id"], "cus_co", "{session}");
    assert_eq!(
        accounts_on(&fake, "/v1/checkout/sessions"),
        [Some(ACCOUNT.to_owned())]
    );
    // No customer was made on the platform for it.
    assert_eq!(
        accounts_on(&fake, "/v1/customers"),
        Vec::<Option<String>>::new()
    );

    // The customer pays and comes back through the success URL subledger gave Stripe:
    // the session is read in the account, and the new subscription shows at once.
    let session_id = session["session_id"].as_str().unwrap();
    let completed = fake.complete_checkout(session_id);
    let success_url = completed[0]["data"]["object"]["success_url"]
        .as_str()
        .unwrap()
        .replace("https://billing.example.test", "")
        .replace("{CHECKOUT_SESSION_ID}", session_id);
    assert!(success_url.contains("customer=cus_co"), "{success_url}");
    let response = browse(&app, &success_url).await;
    assert_eq!(response.status(), 303);
    let retrieved = accounts_on(&fake, "/v1/checkout/sessions/");
    assert_eq!(retrieved, [Some(ACCOUNT.to_owned())]);
    let info = app.get_json("/v1/customers/cus_co/subscription").await;
    assert_eq!(
        (info["status"].as_str(), info["account"].as_str()),
        (Some("active"), Some(ACCOUNT)),
        "{info}"
    );
    app.stop().await;
}

#[tokio::test]
async fn backfill_with_an_account_pages_that_account_only() {
    let (app, fake) = spawn_with_stripe("connectbf").await;
    fake.add_subscription("cus_platform", "org_p", "active", "price_pro", 3_600);
    for customer in ["cus_a1", "cus_a2"] {
        fake.add_subscription(customer, "org_a", "active", "price_pro", 3_600);
        fake.connect(customer, "acct_A");
    }
    fake.add_subscription("cus_b", "org_b", "active", "price_pro", 3_600);
    fake.connect("cus_b", "acct_B");

    let mut command = subledger(&app.services.settings);
    command
        .env("STRIPE_SECRET_KEY", "sk_test_fake")
        .args(["backfill", "--account", "acct_A"]);
    let output = run(command).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed = accounts_on(&fake, "/v1/subscriptions");
    assert!(!listed.is_empty());
    assert!(
        listed.iter().all(|a| a.as_deref() == Some("acct_A")),
        "{listed:?}"
    );
    app.settle().await;
    for customer in ["cus_a1", "cus_a2"] {
        let info = app
            .get_json(&format!("/v1/customers/{customer}/subscription"))
            .await;
        assert_eq!(
            (info["status"].as_str(), info["account"].as_str()),
            (Some("active"), Some("acct_A")),
            "{info}"
        );
    }
    for customer in ["cus_platform", "cus_b"] {
        let response = app
            .get(&format!("/v1/customers/{customer}/subscription"))
            .await;
        assert_eq!(response.status(), 404, "{customer}");
    }
    assert_eq!(
        app.count("SELECT count(DISTINCT aggregate_id) FROM events")
            .await,
        2
    );
    app.stop().await;
}
