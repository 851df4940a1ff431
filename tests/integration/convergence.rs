//! Issue 12's convergence test: one change (a subscription going `past_due` → `active`)
//! delivered every way Stripe can deliver it — the thin event on `/webhooks/stripe`, the
//! snapshot event on `/webhooks/stripe`, both through `/webhooks/eventbridge`, and the
//! snapshot recovered by the missed-event poller from Stripe's `GET /v1/events` — ends in
//! the answer of delivering it once, counted once: one inbox row per event id, each
//! processed once, the change once in the log, and the served process's own `/metrics`
//! counting each event once.
//!
//! The service under test is a real `subledger serve` process (so its `/metrics` are its
//! own, not shared with the tests running beside this one); the reference it is compared
//! with is an app in this process that got the snapshot event once. Both talk to one fake
//! Stripe (`support::fake_stripe`), which builds the payloads. Their shapes:
//! - the snapshot event: https://docs.stripe.com/api/events/object (`customer.subscription.updated`,
//!   with `data.previous_attributes`), the subscription at API version 2025-03-31.basil
//!   (https://docs.stripe.com/api/subscriptions/object: the period on the items);
//! - the thin event: https://docs.stripe.com/api/v2/core/events/object and stripe-node
//!   `src/resources/V2/Core/Events.ts` (`related_object {id, type, url}`, `context`), the
//!   `v1.` type names from
//!   https://docs.stripe.com/changelog/endive/2026-09-30/thin-events-for-api-v1-resources-generally-available;
//! - the EventBridge envelope: `deliveries::envelope_of` (AWS's event structure,
//!   https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-events-structure.html,
//!   and https://docs.stripe.com/event-destinations/eventbridge);
//! - the Events API list the poller reads: https://docs.stripe.com/api/events/list.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sqlx::PgPool;
use subledger::recovery::Recovery;
use subledger::stripe::client::StripeApi;

use crate::deliveries::envelope_of;
use crate::support::fake_stripe::FakeStripe;
use crate::support::helpers::{
    metrics_page, settle, spawn_with, test_settings, TestApp, SECRET, SERVED_PROJECTIONS, TOKEN,
};
use crate::support::procs::{scratch, serve_command, Served};
use crate::support::stripe_sim::sign;

const EB_HEADER: &str = "x-subledger-eventbridge-secret";
const EB_SECRET: &str = "eb-converge-secret";
const STRIPE_KEY: &str = "sk_test_converge";
const CUSTOMER: &str = "cus_conv";
const SNAPSHOT_TYPE: &str = "customer.subscription.updated";
const THIN_TYPE: &str = "v1.customer.subscription.updated";

/// One way the change reaches the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    WebhookSnapshot,
    WebhookThin,
    EventBridgeSnapshot,
    EventBridgeThin,
    /// A pass of the missed-event poller (`Recovery::poll_once`, what the served poller
    /// runs every `SUBLEDGER_RECOVERY_INTERVAL_SECS`) over the fake's `/v1/events`.
    Recovered,
}

impl Path {
    /// Whether this path carries the thin event (else the snapshot event).
    fn thin(self) -> bool {
        matches!(self, Path::WebhookThin | Path::EventBridgeThin)
    }
}

/// Every sample of a `/metrics` page: name, labels, value.
type Samples = Vec<(String, BTreeMap<String, String>, f64)>;

async fn scrape(client: &reqwest::Client, address: &str) -> Samples {
    let text = metrics_page(client, address).await;
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    Some((key.to_owned(), value.trim_matches('"').to_owned()))
                })
                .collect();
            Some((name.to_owned(), labels, value))
        })
        .collect()
}

/// The sum of `name`'s samples whose labels include every one of `labels`.
fn total(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, value)| value)
        .sum()
}

/// How much `name{labels}` grew between two scrapes.
fn grew(before: &Samples, after: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    total(after, name, labels) - total(before, name, labels)
}

/// Posts a signed webhook; its status and acknowledgement.
async fn post_webhook(client: &reqwest::Client, address: &str, event: &Value) -> (u16, Value) {
    let body = event.to_string().into_bytes();
    let header = sign(SECRET, chrono::Utc::now().timestamp(), &body);
    let response = client
        .post(format!("{address}/webhooks/stripe"))
        .header("stripe-signature", header)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Posts the EventBridge envelope around `event` with the header secret.
async fn post_eventbridge(client: &reqwest::Client, address: &str, event: &Value) -> (u16, Value) {
    let response = client
        .post(format!("{address}/webhooks/eventbridge"))
        .header(EB_HEADER, EB_SECRET)
        .header("content-type", "application/json")
        .body(envelope_of(event).to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn served_answer(client: &reqwest::Client, address: &str) -> Value {
    let response = client
        .get(format!("{address}/v1/customers/{CUSTOMER}/subscription"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// (all events, status-bearing events) of the customer's log.
async fn log_counts(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE event_type IN \
         ('SubscriptionChanged', 'SubscriptionReconciled')) FROM events WHERE aggregate_id = $1",
    )
    .bind(CUSTOMER)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Settings for a service talking to `fake`, with no periodic reconcile or recovery (the
/// test runs the recovery pass itself, where it wants it in the order).
fn stripe_settings(tag: &str, fake: &FakeStripe) -> (subledger::Settings, String, String) {
    let (mut settings, db, prefix) = test_settings(tag);
    settings.stripe_secret_key = Some(SecretString::from(STRIPE_KEY.to_owned()));
    settings.stripe_api_base = fake.base_url.clone();
    settings.reconcile_interval = None;
    settings.recovery_interval = None;
    (settings, db, prefix)
}

/// Delivers the change along `order`, one path after the other, to a served process, and
/// checks it converged to the reference (the snapshot delivered once) and was counted once.
async fn converge(tag: &str, order: [Path; 5]) {
    let fake = FakeStripe::start().await;
    let sub = fake.add_subscription(CUSTOMER, "org_conv", "past_due", "price_pro", 3_600);
    let sub_id = sub["id"].as_str().unwrap().to_owned();

    // The reference: an app in this process.
    let (settings, db, prefix) = stripe_settings(&format!("{tag}ref"), &fake);
    let reference: TestApp = spawn_with(settings, db, prefix).await;

    // The service under test: `subledger serve`, with the EventBridge secret.
    let (settings, _, _) = stripe_settings(&format!("{tag}srv"), &fake);
    let mut command = serve_command(&settings);
    command
        .env("STRIPE_SECRET_KEY", STRIPE_KEY)
        .env("SUBLEDGER_EVENTBRIDGE_SECRET", EB_SECRET)
        .env("SUBLEDGER_EVENTBRIDGE_HEADER", EB_HEADER)
        .env("SUBLEDGER_RECOVERY_INTERVAL_SECS", "0")
        .env("SUBLEDGER_RECONCILE_INTERVAL_SECS", "0");
    let dir = scratch(tag);
    let log = dir.join("serve.log");
    let served = Served::start(command, &log).await;
    let address = served.address.clone();
    let pool = PgPool::connect(settings.database_url.expose_secret())
        .await
        .unwrap();
    let client = reqwest::Client::new();

    // Both know the subscription as past_due first, from a thin event fetched a minute
    // ago by Stripe's clock (so the change below is unambiguously newer, never a
    // same-second tie), which records the card only the API shows.
    fake.set_clock_offset(-60);
    let known = fake.thin_event(
        "v1.customer.subscription.created",
        Some(("subscription", &sub_id)),
        None,
    );
    assert_eq!(
        reference
            .post_webhook(known.to_string().as_bytes())
            .await
            .status(),
        200
    );
    reference.settle().await;
    assert_eq!(post_webhook(&client, &address, &known).await.0, 200);
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(60)).await;
    fake.set_clock_offset(0);
    // (Not read from the service yet: a cached answer would have to wait for its
    // invalidation, which `settle` does not cover.)
    assert_eq!(log_counts(&pool).await.1, 1);
    let before = scrape(&client, &address).await;

    // The change, as Stripe makes it: one snapshot event (listed by `/v1/events`, its
    // delivery not yet successful) and its thin twin.
    let (snapshot, thin) = fake.change_status(&sub_id, "active", None);
    let (snapshot_id, thin_id) = (
        snapshot["id"].as_str().unwrap().to_owned(),
        thin["id"].as_str().unwrap().to_owned(),
    );

    // Delivered once to the reference.
    assert_eq!(
        reference
            .post_webhook(snapshot.to_string().as_bytes())
            .await
            .status(),
        200
    );
    reference.settle().await;
    let expected = reference
        .get_json(&format!("/v1/customers/{CUSTOMER}/subscription"))
        .await;
    assert_eq!(expected["status"], "active", "{expected}");
    assert_eq!(expected["payment_method"]["brand"], "visa", "{expected}");

    // Delivered every way to the service, in `order`.
    let api = StripeApi::from_settings(&settings).unwrap().unwrap();
    let recovery = Recovery::new(api, pool.clone());
    let (mut snapshot_first, mut thin_first): (Option<Path>, Option<Path>) = (None, None);
    let mut recovered = 0;
    for path in order {
        let first = if path.thin() {
            &mut thin_first
        } else {
            &mut snapshot_first
        };
        let is_first = first.is_none();
        if is_first {
            *first = Some(path);
        }
        let event = if path.thin() { &thin } else { &snapshot };
        let (status, ack) = match path {
            Path::WebhookSnapshot | Path::WebhookThin => {
                post_webhook(&client, &address, event).await
            }
            Path::EventBridgeSnapshot | Path::EventBridgeThin => {
                post_eventbridge(&client, &address, event).await
            }
            Path::Recovered => {
                let report = recovery.poll_once().await.unwrap();
                assert_eq!(report.listed, 1, "{path:?}: {report:?}");
                assert_eq!(
                    report.recovered,
                    u64::from(is_first),
                    "{path:?}: {report:?}"
                );
                recovered += report.recovered;
                (200, Value::Null)
            }
        };
        assert_eq!(status, 200, "{path:?}: {ack}");
        if path != Path::Recovered {
            let result = if is_first { "stored" } else { "duplicate" };
            assert_eq!(ack["result"], result, "{path:?}: {ack}");
        }
        settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(60)).await;
    }

    // One answer: the reference's. When the thin event came first, the change is held as
    // observed when Stripe answered the fetch (a second later, perhaps), not at the
    // snapshot's `created`; nothing else may differ.
    let mut answer = served_answer(&client, &address).await;
    let thin_came_first =
        order.iter().position(|p| p.thin()) < order.iter().position(|p| !p.thin());
    let mut expected = expected;
    if thin_came_first {
        let (held, reference_time) = (
            answer["updated_at"].as_str().unwrap().to_owned(),
            expected["updated_at"].as_str().unwrap().to_owned(),
        );
        let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap();
        assert!(
            parse(&held) >= parse(&reference_time),
            "{held} < {reference_time}"
        );
        answer.as_object_mut().unwrap().remove("updated_at");
        expected.as_object_mut().unwrap().remove("updated_at");
    }
    assert_eq!(answer, expected, "{order:?}");

    // One inbox row per event id, stored by the first path that carried it, processed once.
    let rows: Vec<(String, String, String, Option<String>, i32)> = sqlx::query_as(
        "SELECT event_id, source::text, state::text, outcome::text, attempts FROM inbox \
         WHERE event_id IN ($1, $2) ORDER BY event_id",
    )
    .bind(&snapshot_id)
    .bind(&thin_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let source_of = |path: Option<Path>| match path.unwrap() {
        Path::WebhookSnapshot | Path::WebhookThin => "webhook",
        Path::EventBridgeSnapshot | Path::EventBridgeThin => "eventbridge",
        Path::Recovered => "recovery",
    };
    for (event_id, source, state, outcome, attempts) in &rows {
        let first = if *event_id == thin_id {
            thin_first
        } else {
            snapshot_first
        };
        assert_eq!(source, source_of(first), "{event_id}: {rows:?}");
        assert_eq!((state.as_str(), *attempts), ("done", 1), "{rows:?}");
        assert!(
            matches!(outcome.as_deref(), Some("applied" | "duplicate" | "stale")),
            "{rows:?}"
        );
    }
    // The one processed first applied the change.
    let applied_first = if thin_came_first {
        &thin_id
    } else {
        &snapshot_id
    };
    assert!(
        rows.iter()
            .any(|(id, _, _, outcome, _)| id == applied_first
                && outcome.as_deref() == Some("applied")),
        "{rows:?}"
    );

    // The log holds the change once: as many events as the reference's, one status change
    // after the first.
    let served_log = log_counts(&pool).await;
    let reference_log = log_counts(&reference.pool).await;
    assert_eq!(served_log, reference_log, "{order:?}");
    assert_eq!(served_log.1, 2, "{order:?}");

    // The served process counted each event once: every HTTP delivery received (the first
    // stored, the rest duplicates), each event processed once; the poller's pass stored
    // the snapshot only when it came first.
    let after = scrape(&client, &address).await;
    let received = "subledger_webhooks_received_total";
    let processed = "subledger_webhooks_processed_total";
    for (kind, first) in [(SNAPSHOT_TYPE, snapshot_first), (THIN_TYPE, thin_first)] {
        let by_http = order
            .iter()
            .filter(|p| **p != Path::Recovered && p.thin() == (kind == THIN_TYPE))
            .count() as f64;
        let stored_by_http = if first == Some(Path::Recovered) {
            0.0
        } else {
            1.0
        };
        assert_eq!(
            grew(&before, &after, received, &[("type", kind)]),
            by_http,
            "{kind}"
        );
        assert_eq!(
            grew(
                &before,
                &after,
                received,
                &[("type", kind), ("result", "stored")]
            ),
            stored_by_http,
            "{kind}"
        );
        assert_eq!(
            grew(
                &before,
                &after,
                received,
                &[("type", kind), ("result", "duplicate")]
            ),
            by_http - stored_by_http,
            "{kind}"
        );
        assert_eq!(
            grew(&before, &after, processed, &[("type", kind)]),
            1.0,
            "{kind}"
        );
    }
    let recovered_expected = u64::from(snapshot_first == Some(Path::Recovered));
    assert_eq!(recovered, recovered_expected);

    drop(served);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!logs.contains("panicked"), "{logs}");
    std::fs::remove_dir_all(&dir).ok();
    reference.stop().await;
}

/// The poller finds the change first (its webhooks never arrived); then the thin event and
/// the snapshot arrive late, by both routes.
#[tokio::test]
async fn a_change_recovered_first_then_delivered_every_way_converges_counted_once() {
    converge(
        "convrec",
        [
            Path::Recovered,
            Path::WebhookThin,
            Path::WebhookSnapshot,
            Path::EventBridgeSnapshot,
            Path::EventBridgeThin,
        ],
    )
    .await;
}

/// The thin event through EventBridge first: the change is fetched from Stripe; the
/// snapshot, the poller and the other routes add nothing.
#[tokio::test]
async fn a_change_fetched_from_a_thin_eventbridge_event_first_converges_counted_once() {
    converge(
        "convthin",
        [
            Path::EventBridgeThin,
            Path::WebhookSnapshot,
            Path::Recovered,
            Path::WebhookThin,
            Path::EventBridgeSnapshot,
        ],
    )
    .await;
}

/// The snapshot webhook first, as most deployments see it; the thin fetch then finds
/// nothing new.
#[tokio::test]
async fn a_change_delivered_as_a_snapshot_webhook_first_converges_counted_once() {
    converge(
        "convsnap",
        [
            Path::WebhookSnapshot,
            Path::EventBridgeThin,
            Path::Recovered,
            Path::EventBridgeSnapshot,
            Path::WebhookThin,
        ],
    )
    .await;
}
