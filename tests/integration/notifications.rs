//! Signed outbound notifications (`entitlements.updated`): delivered to a receiver in
//! this test, signed per Standard Webhooks and verified by an independent implementation
//! (the `standardwebhooks` npm package), in order per owner, retried with backoff into a
//! dead-letter state, re-driven and replayed, notified when access ends by time alone,
//! and never lost across a SIGKILL of the real binary while a delivery is in flight.
//!
//! Stripe payloads: `crate::events` (basil subscription shapes, sources cited there) and
//! `support::stripe_sim` (the simulated lifecycles).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use subledger::backoff::Backoff;
use subledger::notify::send::{Sender, SigningKey};
use subledger::notify::{self, Notifier};

use crate::events::{envelope, sub_event, subscription, T0};
use crate::support::helpers::{settle, spawn_with, test_settings, SERVED_PROJECTIONS};
use crate::support::procs::{post_all, scratch, serve_command, Served};
use crate::support::stripe_sim::simulate;

/// 32 bytes, base64: the shape Standard Webhooks secrets have.
const NOTIFY_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

/// A notification endpoint: records every request; answers `status` (0: never answers).
#[derive(Clone)]
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    async fn start(status: u16) -> Self {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let status = Arc::new(AtomicU16::new(status));
        let (g, s) = (got.clone(), status.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (g, s) = (g.clone(), s.clone());
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    g.lock().unwrap().push(Received {
                        id: header("webhook-id"),
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        body,
                    });
                    let code = s.load(Ordering::SeqCst);
                    if code == 0 {
                        std::future::pending::<()>().await;
                    }
                    axum::http::StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, got, status }
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// Verifies every request with the `standardwebhooks` npm package (clients/typescript's
/// dev dependency), and checks that it refuses a tampered body: returns how many passed.
fn verified_by_standardwebhooks(received: &[Received]) -> usize {
    let dir = scratch("notify-verify");
    let input = dir.join("received.json");
    let list: Vec<Value> = received
        .iter()
        .map(|r| {
            serde_json::json!({"headers": {"webhook-id": r.id, "webhook-timestamp": r.timestamp,
                "webhook-signature": r.signature}, "body": r.body})
        })
        .collect();
    std::fs::write(&input, serde_json::to_vec(&list).unwrap()).unwrap();
    let script = r#"
        const { Webhook } = require(process.argv[1] + "/node_modules/standardwebhooks");
        const list = JSON.parse(require("fs").readFileSync(process.argv[2], "utf8"));
        const hook = new Webhook(process.argv[3]);
        let ok = 0;
        for (const { headers, body } of list) {
          hook.verify(body, headers);
          let refused = false;
          try { hook.verify(body + " ", headers); } catch (e) { refused = true; }
          if (!refused) throw new Error("a tampered body verified");
          ok += 1;
        }
        console.log(ok);
    "#;
    let output = std::process::Command::new("node")
        .arg("-e")
        .arg(script)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/typescript"))
        .arg(&input)
        .arg(NOTIFY_SECRET)
        .output()
        .expect("node runs (scripts/test.sh installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

/// The notifications received, first delivery of each id, grouped by owner in the order
/// they arrived.
fn by_owner(received: &[Received]) -> BTreeMap<String, Vec<Value>> {
    let mut seen = BTreeSet::new();
    let mut owners: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in received {
        if !seen.insert(r.id.clone()) {
            continue;
        }
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["type"], "entitlements.updated");
        let data = &body["data"];
        let owner = match (data["org_id"].as_str(), data["user_id"].as_str()) {
            (Some(org), None) => format!("orgs/{org}"),
            (None, Some(user)) => format!("users/{user}"),
            other => panic!("one owner per notification: {other:?}"),
        };
        owners.entry(owner).or_default().push(data.clone());
    }
    owners
}

/// Each owner's notifications chain (every `before` is the `after` before it, the first
/// `before` is null): nothing lost, nothing out of order.
fn assert_chained(owners: &BTreeMap<String, Vec<Value>>) {
    for (owner, changes) in owners {
        let mut previous = Value::Null;
        for change in changes {
            assert_eq!(change["before"], previous, "{owner}: {changes:#?}");
            assert_ne!(change["before"], change["after"], "{owner}");
            previous = change["after"].clone();
        }
    }
}

/// The notified fields of the API's answer.
fn notified_fields(answer: &Value) -> Value {
    serde_json::json!({
        "access": answer["access"], "plan": answer["plan"], "features": answer["features"],
        "access_until": answer["access_until"],
    })
}

async fn pending(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM notifications WHERE state <> 'delivered'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until every notification the notifier has written so far is delivered and the
/// notifier has read what the platform tables hold.
async fn delivered_all(pool: &PgPool) {
    for _ in 0..1200 {
        let behind: bool = sqlx::query_scalar(
            "SELECT (SELECT global_seq FROM notification_checkpoint) \
                 < (SELECT global_seq FROM projection_checkpoints WHERE name = 'platform_tables')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if !behind && pending(pool).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = notify::list(pool, false).await.unwrap();
    panic!("notifications still pending: {rows:#?}");
}

#[tokio::test]
async fn notifications_are_signed_chained_per_owner_and_match_the_api() {
    let receiver = Receiver::start(200).await;
    let (mut settings, db_name, prefix) = test_settings("notify");
    settings.notify_urls = vec![receiver.url.clone()];
    settings.notify_secret = Some(NOTIFY_SECRET.to_owned().into());
    let app = spawn_with(settings, db_name, prefix).await;
    // trialing → active → past_due → unpaid → canceled, then a new subscription.
    let steps = [
        (
            "evt_n1",
            "customer.subscription.created",
            "sub_n",
            "trialing",
        ),
        ("evt_n2", "customer.subscription.updated", "sub_n", "active"),
        ("evt_n3", "customer.subscription.updated", "sub_n", "unpaid"),
        (
            "evt_n4",
            "customer.subscription.deleted",
            "sub_n",
            "canceled",
        ),
        (
            "evt_n5",
            "customer.subscription.created",
            "sub_n2",
            "active",
        ),
    ];
    for (i, (id, kind, sub, status)) in steps.iter().enumerate() {
        let body = sub_event(id, kind, T0 + 10 * i as i64, sub, "cus_n", status, "org_n");
        assert_eq!(app.post_webhook(&body).await.status(), 200);
        app.settle().await;
        delivered_all(&app.pool).await;
    }
    let received = receiver.got();
    assert_eq!(verified_by_standardwebhooks(&received), received.len());
    let owners = by_owner(&received);
    assert_eq!(
        owners.keys().cloned().collect::<Vec<_>>(),
        ["orgs/org_n", "users/user_of_org_n"]
    );
    assert_chained(&owners);
    for (owner, changes) in &owners {
        let answer = app.get_json(&format!("/v1/{owner}/entitlements")).await;
        assert_eq!(changes.last().unwrap()["after"], notified_fields(&answer));
        // Every notification names the Stripe events that caused it, all of them ours.
        for change in changes {
            let ids = change["stripe_event_ids"].as_array().unwrap();
            assert!(!ids.is_empty(), "{change}");
            assert!(ids
                .iter()
                .all(|id| id.as_str().unwrap().starts_with("evt_n")));
            assert_eq!(change["reason"], "log");
        }
        // Access was granted, lost and granted again: at least three changes.
        let access: Vec<bool> = changes
            .iter()
            .map(|c| c["after"]["access"].as_bool().unwrap())
            .collect();
        assert!(access.windows(2).any(|w| w == [true, false]), "{access:?}");
        assert_eq!(access.last(), Some(&true));
    }
    app.stop().await;
}

/// A notifier and sender over `pool` built by hand, so that the test drives time.
fn by_hand(
    app: &crate::support::helpers::TestApp,
    url: &str,
    max_attempts: i32,
) -> (Notifier, Sender) {
    (
        Notifier::new(
            app.pool.clone(),
            app.services.catalog.clone(),
            vec![url.to_owned()],
        ),
        Sender::new(
            app.pool.clone(),
            SigningKey::parse(NOTIFY_SECRET).unwrap(),
            Duration::from_secs(10),
            Backoff::doubling(Duration::ZERO),
            max_attempts,
        ),
    )
}

#[tokio::test]
async fn failures_back_off_into_dead_letters_that_re_drive_and_replay_in_order() {
    let receiver = Receiver::start(503).await;
    // No endpoint configured in the app: the test runs the notifier and sender itself.
    let app = crate::support::helpers::spawn_app("notifydlq").await;
    let (notifier, sender) = by_hand(&app, &receiver.url, 2);
    let now = chrono::Utc::now();
    for (i, status) in ["active", "unpaid"].iter().enumerate() {
        let body = sub_event(
            &format!("evt_d{i}"),
            "customer.subscription.updated",
            T0 + i as i64,
            "sub_d",
            "cus_d",
            status,
            "org_d",
        );
        assert_eq!(app.post_webhook(&body).await.status(), 200);
        app.settle().await;
        // One pass per change, so each is its own notification.
        assert_eq!(notifier.pass(now).await.unwrap(), 2, "org and user");
    }
    // Two owners, two notifications each; only the first of each owner is ever sent
    // while it is pending.
    assert_eq!(sender.deliver_once().await.unwrap(), 2);
    let first: BTreeSet<String> = receiver.got().iter().map(|r| r.id.clone()).collect();
    assert_eq!(
        sender.deliver_once().await.unwrap(),
        2,
        "the same two again"
    );
    let second: BTreeSet<String> = receiver.got().iter().map(|r| r.id.clone()).collect();
    assert_eq!(first, second);
    // Dead after two attempts; the next of each owner goes.
    let dead = notify::list(&app.pool, true).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:#?}");
    assert!(dead.iter().all(|d| d.attempts == 2
        && d.last_error.as_deref() == Some("endpoint answered 503 Service Unavailable")));
    receiver.status.store(200, Ordering::SeqCst);
    assert_eq!(sender.deliver_once().await.unwrap(), 2);
    assert_eq!(sender.deliver_once().await.unwrap(), 0);
    // Re-drive: the dead letters are sent again, same ids.
    let retried = notify::retry(&app.pool, None).await.unwrap();
    assert_eq!(retried.len(), 2);
    assert_eq!(sender.deliver_once().await.unwrap(), 2);
    assert_eq!(pending(&app.pool).await, 0);
    let ids: Vec<String> = receiver.got().iter().map(|r| r.id.clone()).collect();
    for d in &dead {
        assert_eq!(
            ids.iter().filter(|id| **id == d.msg_id).count(),
            3,
            "{ids:?}"
        );
    }
    // Replay from the second change's log position: only what was written there again,
    // same ids and bytes, in order per owner.
    let rows = notify::list(&app.pool, false).await.unwrap();
    let last_position = rows.iter().map(|r| r.log_position).max().unwrap();
    let before = receiver.got().len();
    assert_eq!(notify::replay(&app.pool, last_position).await.unwrap(), 2);
    while sender.deliver_once().await.unwrap() > 0 {}
    let replayed = &receiver.got()[before..];
    assert_eq!(replayed.len(), 2);
    for r in replayed {
        let row = rows.iter().find(|row| row.msg_id == r.id).unwrap();
        assert_eq!(row.log_position, last_position);
        let first_time = receiver
            .got()
            .iter()
            .find(|x| x.id == r.id)
            .unwrap()
            .body
            .clone();
        assert_eq!(r.body, first_time);
    }
    assert_eq!(
        verified_by_standardwebhooks(&receiver.got()),
        receiver.got().len()
    );
    app.stop().await;
}

#[tokio::test]
async fn access_that_ends_by_time_alone_is_notified() {
    let receiver = Receiver::start(200).await;
    let app = crate::support::helpers::spawn_app("notifytime").await;
    let (notifier, sender) = by_hand(&app, &receiver.url, 3);
    let now = chrono::Utc::now();
    let period_end = now.timestamp() + 86_400;
    let body = serde_json::to_vec(&envelope(
        "evt_t1",
        "customer.subscription.created",
        T0,
        subscription("sub_t", "cus_t", "active", period_end, "org_t"),
    ))
    .unwrap();
    assert_eq!(app.post_webhook(&body).await.status(), 200);
    app.settle().await;
    assert_eq!(notifier.pass(now).await.unwrap(), 2);
    // Nothing happens in the log; a pass a while later changes nothing…
    assert_eq!(
        notifier
            .pass(now + chrono::Duration::hours(1))
            .await
            .unwrap(),
        0
    );
    // …and a pass after the period (and any grace) ended notifies the loss of access.
    let later = now + chrono::Duration::days(30);
    assert_eq!(notifier.pass(later).await.unwrap(), 2);
    assert_eq!(notifier.pass(later).await.unwrap(), 0, "once");
    while sender.deliver_once().await.unwrap() > 0 {}
    let owners = by_owner(&receiver.got());
    assert_chained(&owners);
    let org = &owners["orgs/org_t"];
    assert_eq!(org.len(), 2);
    assert_eq!(org[0]["after"]["access"], true);
    assert_eq!(org[1]["after"]["access"], false);
    assert_eq!(org[1]["reason"], "time");
    assert_eq!(org[1]["stripe_event_ids"], serde_json::json!([]));
    app.stop().await;
}

#[tokio::test]
async fn no_notification_is_lost_when_the_sender_is_killed_mid_delivery() {
    // The receiver never answers at first: a delivery is in flight when the kill comes.
    let receiver = Receiver::start(0).await;
    let (mut settings, db_name, _) = test_settings("notifykill");
    let log = scratch("notify-kill").join("serve.log");
    let command = |settings: &subledger::Settings| {
        let mut command = serve_command(settings);
        command
            .env("SUBLEDGER_NOTIFY_URLS", &receiver.url)
            .env("SUBLEDGER_NOTIFY_SECRET", NOTIFY_SECRET)
            .env("SUBLEDGER_NOTIFY_TIMEOUT_MS", "2000")
            .env("SUBLEDGER_NOTIFY_BACKOFF_MS", "10");
        command
    };
    settings.max_attempts = 8;
    let sim = simulate(14, 6, 1_760_000_000);
    let bodies: Vec<Vec<u8>> = sim.events.iter().map(|e| e.to_bytes()).collect();
    let mut served = Served::start(command(&settings), &log).await;
    let acked = post_all(std::slice::from_ref(&served.address), &bodies, 1).await;
    assert_eq!(acked.len(), bodies.len(), "every event acknowledged");
    // Wait until a delivery is in flight, then SIGKILL.
    for _ in 0..1200 {
        if !receiver.got().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!receiver.got().is_empty(), "a delivery started");
    // An endpoint that hangs holds back neither ingestion nor the read models.
    let pool = PgPool::connect(secrecy::ExposeSecret::expose_secret(&settings.database_url))
        .await
        .unwrap();
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(120)).await;
    served.kill();
    let in_flight: BTreeSet<String> = receiver.got().iter().map(|r| r.id.clone()).collect();
    receiver.status.store(204, Ordering::SeqCst);
    let served = Served::start(command(&settings), &log).await;
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(120)).await;
    delivered_all(&pool).await;
    // Every notification in the outbox reached the receiver (those in flight at the kill
    // again), each owner's chain is whole, and ends at what the API answers now.
    let received = receiver.got();
    let got: BTreeSet<String> = received.iter().map(|r| r.id.clone()).collect();
    let outbox = notify::list(&pool, false).await.unwrap();
    assert!(!outbox.is_empty());
    for row in &outbox {
        assert!(got.contains(&row.msg_id), "{row:?} never arrived");
        assert_eq!(row.state, "delivered");
    }
    for id in &in_flight {
        assert!(
            received.iter().filter(|r| &r.id == id).count() >= 2,
            "{id} resent"
        );
    }
    let owners = by_owner(&received);
    assert_chained(&owners);
    let client = reqwest::Client::new();
    for (owner, changes) in &owners {
        let answer: Value = client
            .get(format!("{}/v1/{owner}/entitlements", served.address))
            .bearer_auth(crate::support::helpers::TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            changes.last().unwrap()["after"],
            notified_fields(&answer),
            "{owner}"
        );
    }
    assert_eq!(verified_by_standardwebhooks(&received), received.len());
    drop(served);
    pool.close().await;
    let _ = db_name;
}
