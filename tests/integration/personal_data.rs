//! No personal data in the logs at info level (issue 15): the real binary, logging JSON at
//! info, is sent every shared fixture (real payloads, with customers' emails, names,
//! addresses and phone numbers) and events that put personal data where the service does
//! read (the event id and type, the customer, a status, an org id, a subscription id, a
//! cached value that does not decode); none of it may appear in its log. At debug it may,
//! and does: the same run at debug shows a detail naming a value from the payload.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::AsyncCommands;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::events::{envelope, subscription, T0};
use crate::fixtures::load;
use crate::support::helpers::{test_settings, TOKEN};
use crate::support::procs::{post_event, scratch, serve_command, Served};

const EMAIL: &str = "jenny.rosen@example.com";
const NAME: &str = "Jenny Rosen";
const STREET: &str = "510 Townsend St";

/// The personal data in the shared fixtures: every string under a key that holds it in
/// Stripe's objects (customers, invoices, checkout sessions, charges, payment methods).
fn personal_data_in_fixtures() -> BTreeSet<String> {
    const KEYS: [&str; 10] = [
        "email",
        "customer_email",
        "receipt_email",
        "name",
        "customer_name",
        "line1",
        "line2",
        "phone",
        "customer_phone",
        "description",
    ];
    fn walk(value: &Value, out: &mut BTreeSet<String>) {
        match value {
            Value::Object(fields) => {
                for (key, item) in fields {
                    match item {
                        // Short values ("US", "1") would match anything; these are the
                        // ones that identify someone.
                        Value::String(text) if KEYS.contains(&key.as_str()) && text.len() >= 6 => {
                            out.insert(text.clone());
                        }
                        _ => walk(item, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| walk(item, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for fixture in load() {
        walk(&serde_json::from_slice(&fixture.body).unwrap(), &mut out);
    }
    out
}

/// A subscription event of `customer` whose subscription is `sub`, owned by `org`.
fn sub_event(id: &str, created: i64, sub: &str, customer: &str, status: &str, org: &str) -> Value {
    envelope(
        id,
        "customer.subscription.updated",
        created,
        subscription(sub, customer, status, T0 + 40 * 86_400, org),
    )
}

/// Events that carry personal data where the service reads, each a path the code takes.
fn hostile_events() -> Vec<Value> {
    let mut odd_type = sub_event("evt_pd_type", T0, "sub_pd1", "cus_pd1", "active", "org_pd");
    odd_type["type"] = json!(format!("{NAME} <{EMAIL}>"));
    let mut odd_status = sub_event(
        "evt_pd_status",
        T0,
        "sub_pd2",
        "cus_pd2",
        "active",
        "org_pd",
    );
    odd_status["data"]["object"]["status"] = json!(format!("{NAME}, {STREET}"));
    let mut odd_id = sub_event("evt_pd_id", T0, "sub_pd3", "cus_pd3", "active", "org_pd");
    odd_id["id"] = json!(format!("evt_{EMAIL}"));
    vec![
        odd_type,
        odd_status,
        odd_id,
        // The customer is an email: stored, processed, never logged as it is.
        sub_event("evt_pd_customer", T0, "sub_pd4", EMAIL, "active", "org_pd"),
        // The org an email: recorded, never logged.
        sub_event("evt_pd_org", T0, "sub_pd5", "cus_pd5", "active", EMAIL),
        // The org an email with a NUL: dead-lettered at once, the reason names the field.
        sub_event(
            "evt_pd_nul",
            T0,
            "sub_pd6",
            "cus_pd6",
            "active",
            &format!("{EMAIL}\u{0}"),
        ),
        // A canceled subscription, then an illegal move back to active: the rejection names
        // the subscription id, which here is personal data (its detail is debug only).
        sub_event(
            "evt_pd_cancel",
            T0,
            &format!("sub_{NAME} {STREET}"),
            "cus_pd7",
            "canceled",
            "org_pd",
        ),
        sub_event(
            "evt_pd_illegal",
            T0 + 10,
            &format!("sub_{NAME} {STREET}"),
            "cus_pd7",
            "active",
            "org_pd",
        ),
    ]
}

/// Runs the binary at `log_level` on a fresh database, sends every fixture (when
/// `fixtures`) and the hostile events, waits until each is processed, and returns its log.
async fn run_and_log(log_level: &str, fixtures: bool) -> String {
    let (settings, db_name, prefix) = test_settings("pii");
    let dir = scratch("pii");
    let log = dir.join("serve.log");
    let mut command = serve_command(&settings);
    command.env("RUST_LOG", log_level);
    let serve = Served::start(command, &log).await;
    let base = serve.address.clone();
    let client = reqwest::Client::new();
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    if fixtures {
        bodies.extend(load().into_iter().map(|f| f.body));
    }
    bodies.extend(
        hostile_events()
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap()),
    );
    for body in &bodies {
        let status = post_event(&client, &base, body).await;
        assert_eq!(status, Some(200), "{}", String::from_utf8_lossy(body));
    }
    // A cached value that does not decode, with an email where a number belongs: read
    // through, and the decode error is logged without the value.
    let mut redis = redis::aio::ConnectionManager::new(
        redis::Client::open(settings.redis_url.expose_secret()).unwrap(),
    )
    .await
    .unwrap();
    let key = format!("{prefix}stripe:customer:cus_pd_cached");
    let _: () = redis
        .set(
            &key,
            json!({"customer_id": "cus_pd_cached", "version": EMAIL}).to_string(),
        )
        .await
        .unwrap();
    let response = client
        .get(format!("{base}/v1/customers/cus_pd_cached/subscription"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
    let _: () = redis.del(&key).await.unwrap();

    let pool = PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap();
    for _ in 0..600 {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE state = 'pending'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let illegal: Option<String> =
        sqlx::query_scalar("SELECT outcome FROM inbox WHERE event_id = 'evt_pd_illegal'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(illegal.as_deref(), Some("illegal"));
    drop(serve);
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    text
}

#[tokio::test]
async fn logs_carry_no_personal_data_at_info_and_may_at_debug() {
    let personal = personal_data_in_fixtures();
    assert!(
        personal.iter().any(|p| p.contains('@')) && personal.len() >= 10,
        "the fixtures hold personal data to look for: {personal:?}"
    );
    let info = run_and_log("info,sqlx=warn", true).await;
    let lines: Vec<Value> = info
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("a JSON log line: {l}")))
        .collect();
    let message = |m: &str| lines.iter().any(|l| l["fields"]["message"] == m);
    // The paths that could have carried it were taken.
    assert!(message("webhook received") && message("webhook processed"));
    assert!(message(
        "webhook unprocessable: dead-lettered without retrying"
    ));
    assert!(message("undecodable cache value, reading through"));
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["customer_id"] == format!("<not an id: {} bytes>", EMAIL.len())),
        "the email as a customer id is logged by its length"
    );
    for text in personal
        .iter()
        .map(String::as_str)
        .chain([EMAIL, NAME, STREET])
    {
        assert!(
            !info.contains(text),
            "personal data at info: {text:?} in {}",
            info.lines().find(|l| l.contains(text)).unwrap_or_default()
        );
    }
    assert!(!info.contains("\"level\":\"DEBUG\""));

    // At debug, details may name values from payloads (docs/operations.md says so).
    let debug = run_and_log("debug,sqlx=warn,hyper=info,h2=info,tower=info", false).await;
    assert!(
        debug
            .lines()
            .any(|l| l.contains("webhook processed: detail") && l.contains(NAME)),
        "the illegal move's detail, naming the subscription, is at debug"
    );
}
