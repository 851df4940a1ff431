//! Every way Stripe delivers an event (issue 12): thin events on the webhook, fetched
//! with their `context` account and recorded as the API answer they are, converging with
//! the snapshot event of the same change.

use serde_json::Value;

use crate::stripe_api::spawn_with_stripe;
use crate::support::helpers::TestApp;

async fn deliver(app: &TestApp, event: &Value) {
    let response = app.post_webhook(event.to_string().as_bytes()).await;
    assert_eq!(response.status(), 200, "{event}");
    app.settle().await;
}

async fn events_of(app: &TestApp, customer: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(customer)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// The thin events' shapes are built by `FakeStripe::thin_event` (see its sources:
/// https://docs.stripe.com/api/v2/core/events/object, stripe-node
/// `src/resources/V2/Core/Events.ts`).
#[tokio::test]
async fn a_thin_event_is_fetched_and_converges_with_its_snapshot_twin() {
    let (app, fake) = spawn_with_stripe("thin").await;
    let sub = fake.add_subscription("cus_thin", "org_thin", "active", "price_pro", 3_600);
    let sub_id = sub["id"].as_str().unwrap();
    let (snapshot, thin) = fake.change_status(sub_id, "past_due", None);

    // Thin first: stored (no customer known yet), then fetched and recorded.
    deliver(&app, &thin).await;
    let thin_id = thin["id"].as_str().unwrap();
    let (state, outcome, detail) = app.inbox_row(thin_id).await.expect("stored");
    assert_eq!(
        (state.as_str(), outcome.as_deref()),
        ("done", Some("applied")),
        "{detail:?}"
    );
    assert!(
        fake.requests()
            .iter()
            .any(|(method, path, _)| method == "GET"
                && path == &format!("/v1/subscriptions/{sub_id}"))
    );
    let info = app.get_json("/v1/customers/cus_thin/subscription").await;
    assert_eq!(info["status"], "past_due", "{info}");
    assert_eq!(info["org_id"], "org_thin");
    assert_eq!(info["payment_method"]["brand"], "visa", "{info}");
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM events WHERE aggregate_id = 'cus_thin'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert!(
        kinds.contains(&"SubscriptionReconciled".to_owned()),
        "{kinds:?}"
    );
    let recorded = events_of(&app, "cus_thin").await;

    // The same change as a snapshot, and the thin event again: nothing more is recorded.
    deliver(&app, &snapshot).await;
    let response = app.post_webhook(thin.to_string().as_bytes()).await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["result"], "duplicate", "{body}");
    app.settle().await;
    assert_eq!(events_of(&app, "cus_thin").await, recorded);
    assert_eq!(
        app.get_json("/v1/customers/cus_thin/subscription").await["status"],
        "past_due"
    );
    let org = app.get_json("/v1/orgs/org_thin/entitlements").await;
    assert_eq!(org["status"], "past_due", "{org}");
    app.stop().await;
}

#[tokio::test]
async fn a_thin_event_is_fetched_for_its_context_account() {
    let (app, fake) = spawn_with_stripe("thinctx").await;
    let sub = fake.add_subscription("cus_ctx", "org_ctx", "active", "price_pro", 3_600);
    fake.connect("cus_ctx", "acct_1Connected");
    let sub_id = sub["id"].as_str().unwrap();
    let (_, thin) = fake.change_status(sub_id, "canceled", Some("acct_1Connected"));
    deliver(&app, &thin).await;
    let fetched: Vec<_> = fake
        .requests_with_account()
        .into_iter()
        .filter(|(_, path, _)| path == &format!("/v1/subscriptions/{sub_id}"))
        .collect();
    assert!(!fetched.is_empty());
    assert!(
        fetched
            .iter()
            .all(|(_, _, account)| account.as_deref() == Some("acct_1Connected")),
        "{fetched:?}"
    );
    let info = app.get_json("/v1/customers/cus_ctx/subscription").await;
    assert_eq!(info["status"], "canceled");
    // The customer lives in the event's account (Connect), and the answer says so.
    assert_eq!(info["account"], "acct_1Connected", "{info}");
    app.stop().await;
}

#[tokio::test]
async fn unknown_thin_types_are_stored_and_ignored() {
    let (app, fake) = spawn_with_stripe("thinunknown").await;
    let cases = [
        // A v2 type (stripe-node's `V2CoreEventDestinationPingEvent`), naming nothing.
        fake.thin_event("v2.core.event_destination.ping", None, None),
        // A v1 resource subledger does not act on.
        fake.thin_event("v1.charge.succeeded", Some(("charge", "ch_1")), None),
        // A handled type naming an object of a type we cannot fetch.
        fake.thin_event(
            "v1.customer.subscription.updated",
            Some(("plan", "plan_1")),
            None,
        ),
    ];
    for event in &cases {
        deliver(&app, event).await;
        let (state, outcome, detail) = app
            .inbox_row(event["id"].as_str().unwrap())
            .await
            .expect("stored");
        assert_eq!(
            (state.as_str(), outcome.as_deref()),
            ("done", Some("ignored")),
            "{event}"
        );
        assert!(detail.is_some());
    }
    assert_eq!(app.count("SELECT count(*) FROM events").await, 0);
    // Nothing was fetched (the server's own endpoint check and recovery poller aside).
    let fetched: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|(_, path, _)| {
            !path.starts_with("/v1/webhook_endpoints") && !path.starts_with("/v1/events")
        })
        .collect();
    assert!(fetched.is_empty(), "{fetched:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_failed_fetch_is_retried_and_dead_lettered_then_redriven() {
    let (app, fake) = spawn_with_stripe("thinfail").await;
    let sub = fake.add_subscription("cus_tf", "org_tf", "active", "price_pro", 3_600);
    let sub_id = sub["id"].as_str().unwrap().to_owned();
    let (_, thin) = fake.change_status(&sub_id, "past_due", None);
    let thin_id = thin["id"].as_str().unwrap().to_owned();
    fake.fail_always("/v1/subscriptions/", 500);
    let response = app.post_webhook(thin.to_string().as_bytes()).await;
    assert_eq!(response.status(), 200);
    // The failure is recorded on the row and scheduled again.
    wait_for(&app, &thin_id, |attempts, last_error| {
        attempts >= 1 && last_error.is_some_and(|e| e.contains("fetching"))
    })
    .await;
    // Dead-lettered once the attempts run out (here: pushed to its last attempt now).
    sqlx::query("UPDATE inbox SET attempts = $2 - 1, next_attempt_at = now() WHERE event_id = $1")
        .bind(&thin_id)
        .bind(app.services.settings.max_attempts)
        .execute(&app.pool)
        .await
        .unwrap();
    // This or one of the app's own workers (whichever claims it) makes the last attempt.
    app.services.worker.process_batch(64, None).await.unwrap();
    for _ in 0..2400 {
        if app.inbox_row(&thin_id).await.unwrap().0 == "dead" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let (state, _, _) = app.inbox_row(&thin_id).await.unwrap();
    assert_eq!(state, "dead");
    assert_eq!(events_of(&app, "cus_tf").await, 0);

    // Stripe recovers; the dead letter is redriven and recorded.
    fake.heal();
    subledger::inbox::redrive(&app.pool, &subledger::inbox::Redrive::One(thin_id.clone()))
        .await
        .unwrap();
    app.services.worker.process_batch(64, None).await.unwrap();
    app.settle().await;
    let (state, outcome, _) = app.inbox_row(&thin_id).await.unwrap();
    assert_eq!(
        (state.as_str(), outcome.as_deref()),
        ("done", Some("applied"))
    );
    let info = app.get_json("/v1/customers/cus_tf/subscription").await;
    assert_eq!(info["status"], "past_due");
    app.stop().await;
}

/// A thin event naming an object Stripe does not have (for that account) is answered 404
/// (`invalid_request_error`, "No such subscription": https://docs.stripe.com/api/errors),
/// and asking again gets the same answer: the row is dead-lettered at once, not retried. A
/// `context` that is not an account id (it would be a `Stripe-Account` header) is refused
/// at the door. Thin shapes: `FakeStripe::thin_event` (see its sources).
#[tokio::test]
async fn a_thin_event_naming_what_stripe_does_not_have_is_dead_lettered_at_once() {
    let (app, fake) = spawn_with_stripe("thin404").await;
    let thin = fake.thin_event(
        "v1.customer.subscription.updated",
        Some(("subscription", "sub_nowhere")),
        None,
    );
    let thin_id = thin["id"].as_str().unwrap();
    deliver(&app, &thin).await;
    let (state, attempts, last_error): (String, i32, Option<String>) =
        sqlx::query_as("SELECT state::text, attempts, last_error FROM inbox WHERE event_id = $1")
            .bind(thin_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempts), ("dead", 1), "{last_error:?}");
    assert!(
        last_error.as_deref().is_some_and(|e| e.contains("404")),
        "{last_error:?}"
    );
    assert_eq!(app.count("SELECT count(*) FROM events").await, 0);

    let bad = fake.thin_event(
        "v1.customer.subscription.updated",
        Some(("subscription", "sub_nowhere")),
        Some("acct_1\r\nX-Injected: 1"),
    );
    let response = app.post_webhook(bad.to_string().as_bytes()).await;
    assert_eq!(response.status(), 400);
    let stored = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM inbox WHERE event_id = $1")
        .bind(bad["id"].as_str().unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    app.stop().await;
}

/// Waits (bounded) until the row's attempts and last error satisfy `done`.
async fn wait_for(app: &TestApp, event_id: &str, done: impl Fn(i32, Option<&str>) -> bool) {
    for _ in 0..2400 {
        let (attempts, last_error): (i32, Option<String>) =
            sqlx::query_as("SELECT attempts, last_error FROM inbox WHERE event_id = $1")
                .bind(event_id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if done(attempts, last_error.as_deref()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{event_id} never reached the expected state");
}

const EB_HEADER: &str = "x-subledger-eventbridge-secret";
const EB_SECRET: &str = "eb-secret-current";
const EB_OLD: &str = "eb-secret-rotated-out";

async fn eventbridge_app(
    tag: &str,
    secrets: &[&str],
) -> (TestApp, crate::support::fake_stripe::FakeStripe) {
    let fake = crate::support::fake_stripe::FakeStripe::start().await;
    let (mut settings, db, prefix) = crate::support::helpers::test_settings(tag);
    settings.eventbridge_secrets = secrets.iter().map(|s| (*s).into()).collect();
    settings.stripe_secret_key = Some(secrecy::SecretString::from("sk_test_fake".to_owned()));
    settings.stripe_api_base = fake.base_url.clone();
    settings.reconcile_interval = None;
    // The missed-event poller would store the fake's events itself.
    settings.recovery_interval = None;
    (
        crate::support::helpers::spawn_with(settings, db, prefix).await,
        fake,
    )
}

async fn post_eventbridge(app: &TestApp, body: &[u8], secret: Option<&str>) -> reqwest::Response {
    let mut request = app
        .client
        .post(format!("{}/webhooks/eventbridge", app.address))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(secret) = secret {
        request = request.header(EB_HEADER, secret);
    }
    request.send().await.unwrap()
}

/// The EventBridge envelope around a Stripe event, as AWS delivers it: `version`, `id`,
/// `detail-type`, `source` (`aws.partner/stripe.com/{event destination}`), `account`,
/// `time`, `region`, `resources`, `detail` (the Stripe event). Shapes:
/// https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-events-structure.html,
/// https://docs.stripe.com/event-destinations/eventbridge, and stripe-node
/// `test/CloudProviderEvent.spec.ts` (`EVENTBRIDGE_PAYLOAD`, `EVENTBRIDGE_V2_PAYLOAD`).
pub(crate) fn envelope_of(detail: &Value) -> Value {
    serde_json::json!({
        "version": "0", "id": "17e8dff5-d6cd-3770-ace9-aeac02b6ac3f",
        "detail-type": detail["type"], "source": "aws.partner/stripe.com/ed_test_61Sub",
        "account": "506417113029", "time": "2026-10-01T12:00:00Z", "region": "us-west-2",
        "resources": [], "detail": detail
    })
}

#[tokio::test]
async fn eventbridge_delivers_snapshot_and_thin_events_into_the_same_inbox() {
    let (app, fake) = eventbridge_app("eb", &[EB_OLD, EB_SECRET]).await;
    let sub = fake.add_subscription("cus_eb", "org_eb", "active", "price_pro", 3_600);
    let sub_id = sub["id"].as_str().unwrap().to_owned();
    let (snapshot, thin) = fake.change_status(&sub_id, "past_due", None);
    for (event, secret) in [(&thin, EB_SECRET), (&snapshot, EB_OLD)] {
        let response = post_eventbridge(
            &app,
            envelope_of(event).to_string().as_bytes(),
            Some(secret),
        )
        .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["result"], "stored", "{body}");
    }
    app.settle().await;
    for event in [&thin, &snapshot] {
        let id = event["id"].as_str().unwrap();
        let (source, payload): (String, String) =
            sqlx::query_as("SELECT source, payload FROM inbox WHERE event_id = $1")
                .bind(id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(source, "eventbridge");
        // The inbox keeps the Stripe event itself, not AWS's envelope.
        assert_eq!(serde_json::from_str::<Value>(&payload).unwrap(), *event);
    }
    let info = app.get_json("/v1/customers/cus_eb/subscription").await;
    assert_eq!(info["status"], "past_due", "{info}");
    // The same event again through the webhook is a duplicate.
    let again = app.post_webhook(snapshot.to_string().as_bytes()).await;
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["result"], "duplicate");
    app.stop().await;
}

#[tokio::test]
async fn eventbridge_bad_input_is_refused_and_stores_nothing() {
    let (app, fake) = eventbridge_app("ebbad", &[EB_SECRET]).await;
    let sub = fake.add_subscription("cus_ebb", "org_ebb", "active", "price_pro", 3_600);
    let (snapshot, _) = fake.change_status(sub["id"].as_str().unwrap(), "past_due", None);
    let good = envelope_of(&snapshot).to_string().into_bytes();
    let mut not_stripe = envelope_of(&snapshot);
    not_stripe["source"] = serde_json::json!("aws.partner/example.com/x");
    let mut no_detail = envelope_of(&snapshot);
    no_detail.as_object_mut().unwrap().remove("detail");
    let not_an_event = envelope_of(&serde_json::json!({"id": "cus_1", "object": "customer"}));
    let huge = envelope_of(&serde_json::json!({"padding": "x".repeat(70 * 1024)}));
    let cases: Vec<(&str, Vec<u8>, Option<&str>, u16)> = vec![
        ("missing secret", good.clone(), None, 401),
        ("wrong secret", good.clone(), Some("nope"), 401),
        ("empty secret", good.clone(), Some(""), 401),
        ("malformed", b"{not json".to_vec(), Some(EB_SECRET), 400),
        (
            "not a Stripe source",
            not_stripe.to_string().into_bytes(),
            Some(EB_SECRET),
            400,
        ),
        (
            "no detail",
            no_detail.to_string().into_bytes(),
            Some(EB_SECRET),
            400,
        ),
        (
            "detail not an event",
            not_an_event.to_string().into_bytes(),
            Some(EB_SECRET),
            400,
        ),
        (
            "oversized",
            huge.to_string().into_bytes(),
            Some(EB_SECRET),
            413,
        ),
    ];
    for (name, body, secret, status) in cases {
        let response = post_eventbridge(&app, &body, secret).await;
        assert_eq!(response.status().as_u16(), status, "{name}");
        let text = response.text().await.unwrap();
        assert!(!text.contains(EB_SECRET), "{name}: {text}");
    }
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 0);
    app.stop().await;

    // With no secret configured, everything is refused.
    let (app, _fake) = eventbridge_app("ebunset", &[]).await;
    let response = post_eventbridge(&app, &good, Some(EB_SECRET)).await;
    assert_eq!(response.status(), 500);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_configured");
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 0);
    app.stop().await;
}

/// Accounts v2 (API 2025-12-15 onward): a subscription whose customer is an Account names
/// it as `customer_account`, with `customer` null
/// (https://docs.stripe.com/accounts-v2/use-accounts-as-customers).
#[tokio::test]
async fn a_subscription_naming_its_customer_account_is_attributed_to_it() {
    let app = crate::support::helpers::spawn_app("custacct").await;
    let far = chrono::Utc::now().timestamp() + 30 * 86_400;
    let mut sub = crate::events::subscription("sub_ca", "cus_unused", "active", far, "org_ca");
    sub["customer"] = Value::Null;
    sub["customer_account"] = serde_json::json!("acct_1CustAcct");
    let event = crate::events::envelope(
        "evt_ca",
        "customer.subscription.created",
        crate::events::T0,
        sub,
    );
    deliver(&app, &event).await;
    let info = app
        .get_json("/v1/customers/acct_1CustAcct/subscription")
        .await;
    assert_eq!(info["status"], "active", "{info}");
    let org = app.get_json("/v1/orgs/org_ca/entitlements").await;
    assert_eq!(
        (org["access"].as_bool(), org["customer_id"].as_str()),
        (Some(true), Some("acct_1CustAcct")),
        "{org}"
    );
    app.stop().await;
}

/// `subledger stripe setup` / `check` (issue 12 item 5), through the library functions the
/// commands call, against the fake's `/v1/webhook_endpoints` (shapes:
/// https://docs.stripe.com/api/webhook_endpoints/object); and `/readyz` reporting the
/// server's own check.
#[tokio::test]
async fn setup_creates_the_endpoint_once_and_check_reports_what_is_wrong() {
    use subledger::setup::{check_endpoints, setup, Setup};
    use subledger::stripe::event::HANDLED_TYPES;
    use subledger::stripe::transport::API_VERSION;
    let (app, fake) = spawn_with_stripe("setup").await;
    let api = app.services.syncer().unwrap().unwrap().api().clone();
    let url = "https://billing.example.test/webhooks/stripe";
    let Setup::Created { id, secret } = setup(&api, url).await.unwrap() else {
        panic!("created");
    };
    assert!(secret.unwrap().starts_with("whsec_"));
    let endpoints = fake.endpoints();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["id"], id.as_str());
    assert_eq!(
        endpoints[0]["enabled_events"],
        serde_json::json!(HANDLED_TYPES)
    );
    assert_eq!(endpoints[0]["api_version"], API_VERSION);
    // Again: nothing is created, and the endpoint checks out.
    let Setup::Exists(report) = setup(&api, url).await.unwrap() else {
        panic!("exists");
    };
    assert!(report.ok(), "{report:?}");
    assert_eq!(fake.endpoints().len(), 1);

    // An endpoint made by hand, missing a type and unpinned, with an extra one.
    let mut events: Vec<&str> = HANDLED_TYPES[1..].to_vec();
    events.push("charge.succeeded");
    fake.add_endpoint("https://old.example.test/hook", &events, None);
    let report = check_endpoints(&api, None).await.unwrap();
    assert!(!report.ok());
    let old = report
        .endpoints
        .iter()
        .find(|e| e.url == "https://old.example.test/hook")
        .unwrap();
    assert_eq!(old.missing, [HANDLED_TYPES[0]]);
    assert_eq!(old.extra, ["charge.succeeded"]);
    assert_eq!(old.problems.len(), 2, "{:?}", old.problems);

    // The server checks at start; /readyz shows its result (once it has one) and Stripe
    // as configured.
    let mut ready = Value::Null;
    for _ in 0..2400 {
        ready = app
            .client
            .get(format!("{}/readyz", app.address))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !ready["checks"]["stripe"]["endpoints"].is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(ready["checks"]["stripe"]["configured"], true, "{ready}");
    assert!(
        ready["checks"]["stripe"]["endpoints"]["ok"].is_boolean(),
        "{ready}"
    );
    app.stop().await;
}

/// With no Stripe key, Stripe is "not configured", never a degradation.
#[tokio::test]
async fn without_a_key_stripe_is_not_configured_and_not_degraded() {
    let (mut settings, db, prefix) = crate::support::helpers::test_settings("nokey");
    settings.stripe_secret_key = None;
    // Nothing listens there.
    settings.stripe_api_base = "http://127.0.0.1:9".to_owned();
    let app = crate::support::helpers::spawn_with(settings, db, prefix).await;
    let ready: Value = app
        .client
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["stripe"]["configured"], false, "{ready}");
    assert_eq!(ready["status"], "ok", "{ready}");
    app.stop().await;
}

/// Missed-event recovery (issue 12 item 4): events whose webhooks never arrived are read
/// from Stripe's Events API (the fake serves `GET /v1/events` with `delivery_success`,
/// `types[]` and `created[gte]`: https://docs.stripe.com/api/events/list), stored once,
/// and processed like any other.
#[tokio::test]
async fn missed_events_are_recovered_from_the_events_api_once() {
    use subledger::recovery::Recovery;
    let (app, fake) = spawn_with_stripe("recover").await;
    let sub = fake.add_subscription("cus_rec", "org_rec", "active", "price_pro", 3_600);
    let sub_id = sub["id"].as_str().unwrap().to_owned();
    // The change happens; its webhook never reaches us.
    let (snapshot, _thin) = fake.change_status(&sub_id, "past_due", None);
    let api = app.services.syncer().unwrap().unwrap().api().clone();
    let recovery = Recovery::new(api, app.pool.clone());
    let report = recovery.poll_once().await.unwrap();
    assert_eq!(report.recovered, 1, "{report:?}");
    app.services.worker.process_batch(64, None).await.unwrap();
    app.settle().await;
    let (source,): (String,) = sqlx::query_as("SELECT source FROM inbox WHERE event_id = $1")
        .bind(snapshot["id"].as_str().unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(source, "recovery");
    let info = app.get_json("/v1/customers/cus_rec/subscription").await;
    assert_eq!(info["status"], "past_due", "{info}");
    // The change is recorded once (a sync the webhook asked for may add what only the
    // API shows, like the card, at its own pace: not counted here).
    let changes = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE aggregate_id = 'cus_rec' AND event_type = 'SubscriptionChanged'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let recorded = changes().await;
    assert_eq!(recorded, 1);

    // Again (the overlap reads it again), by hand, and the late webhook: nothing new.
    assert_eq!(recovery.poll_once().await.unwrap().recovered, 0);
    let since = chrono::Utc::now() - chrono::Duration::hours(2);
    let (report, _) = recovery.recover_since(since, false).await.unwrap();
    assert_eq!((report.listed, report.recovered), (1, 0), "{report:?}");
    let late = app.post_webhook(snapshot.to_string().as_bytes()).await;
    let body: Value = late.json().await.unwrap();
    assert_eq!(body["result"], "duplicate");
    app.settle().await;
    assert_eq!(changes().await, recorded);
    app.stop().await;
}

/// `v2.core.health.event_generation_failure.resolved` (a thin event: its shape is every
/// thin event's, https://docs.stripe.com/api/v2/core/events/event-types): the events Stripe
/// failed to generate will never come, so every customer is synced.
#[tokio::test]
async fn the_event_generation_failure_resolved_event_requests_a_sync_of_every_customer() {
    let (app, fake) = spawn_with_stripe("health").await;
    for (customer, org) in [("cus_h1", "org_h1"), ("cus_h2", "org_h2")] {
        let sub = fake.add_subscription(customer, org, "active", "price_pro", 3_600);
        let sub_id = sub["id"].as_str().unwrap().to_owned();
        let (snapshot, _) = fake.change_status(&sub_id, "active", None);
        deliver(&app, &snapshot).await;
    }
    let health = fake.thin_event(
        "v2.core.health.event_generation_failure.resolved",
        None,
        None,
    );
    deliver(&app, &health).await;
    let (state, outcome, detail) = app.inbox_row(health["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(
        (state.as_str(), outcome.as_deref()),
        ("done", Some("ignored"))
    );
    // Customers whose sync is pending already are not requested twice.
    let detail = detail.unwrap();
    assert!(detail.contains("customers requested"), "{detail}");
    // The sync worker runs them: each customer's attempt is recorded.
    for _ in 0..2400 {
        if app
            .count("SELECT count(DISTINCT customer_id) FROM sync_attempts")
            .await
            >= 2
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        app.count("SELECT count(DISTINCT customer_id) FROM sync_attempts WHERE customer_id IN ('cus_h1', 'cus_h2')")
            .await,
        2
    );
    app.stop().await;
}
