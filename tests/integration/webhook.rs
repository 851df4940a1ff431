//! The webhook's contract: signatures, bad input, duplicates, unhandled types, storage
//! failure.

use serde_json::{json, Value};
use subledger::stripe::signature::sign;

use crate::events::{envelope, sub_event, T0};
use crate::lifecycle::futures_like::join_all_limited;
use crate::support::helpers::{spawn_app, OLD_SECRET, SECRET};

#[tokio::test]
async fn signature_cases_are_answered_400_and_store_nothing() {
    let app = spawn_app("sig").await;
    let body = sub_event(
        "evt_sig",
        "customer.subscription.created",
        T0,
        "sub_1",
        "cus_1",
        "active",
        "org_1",
    );
    // Each header is built just before it is sent: a clock read once up front would drift
    // a second by the later cases and turn "301 s in the future" into 300 s.
    type Header = fn(i64, &[u8]) -> Option<String>;
    let cases: Vec<(&str, Header)> = vec![
        ("missing", |_, _| None),
        ("garbage", |_, _| Some("nonsense".to_owned())),
        ("wrong secret", |now, body| {
            Some(sign("whsec_wrong", now, body))
        }),
        ("other body", |now, _| Some(sign(SECRET, now, b"{}"))),
        ("stale", |now, body| Some(sign(SECRET, now - 301, body))),
        ("future", |now, body| Some(sign(SECRET, now + 301, body))),
        ("v0 only", |now, _| Some(format!("t={now},v0=abcdef"))),
    ];
    for (name, header) in cases {
        let header = header(chrono::Utc::now().timestamp(), &body);
        let response = app.post_webhook_with(&body, header.as_deref()).await;
        assert_eq!(response.status(), 400, "{name}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_signature", "{name}");
        assert!(!error.to_string().contains(SECRET), "no secret in the body");
    }
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 0);

    // Within tolerance, and signed by the secret being rotated out: accepted.
    let response = app
        .post_webhook_with(
            &body,
            Some(&sign(
                OLD_SECRET,
                chrono::Utc::now().timestamp() - 290,
                &body,
            )),
        )
        .await;
    assert_eq!(response.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_refused_with_clear_errors() {
    let app = spawn_app("bad").await;
    for (name, body) in [
        ("not json", b"{not json".to_vec()),
        ("array", b"[]".to_vec()),
        (
            "not an event",
            br#"{"id":"cus_1","object":"customer"}"#.to_vec(),
        ),
        (
            "no data.object",
            br#"{"id":"evt_1","object":"event","type":"x","created":1,"data":{}}"#.to_vec(),
        ),
    ] {
        let response = app.post_webhook(&body).await;
        assert_eq!(response.status(), 400, "{name}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_event", "{name}");
    }
    // The test app's limit is 64 KiB.
    let mut big = envelope("evt_big", "customer.updated", T0, json!({"id": "cus_1"}));
    big["padding"] = json!("x".repeat(70 * 1024));
    let response = app.post_webhook(&serde_json::to_vec(&big).unwrap()).await;
    assert_eq!(response.status(), 413);
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_duplicate_is_acknowledged_and_does_nothing() {
    let app = spawn_app("dup").await;
    let body = sub_event(
        "evt_dup",
        "customer.subscription.created",
        T0,
        "sub_1",
        "cus_dup",
        "active",
        "org_dup",
    );
    for expected in ["stored", "duplicate", "duplicate"] {
        let response = app.post_webhook(&body).await;
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["result"], expected);
    }
    app.settle().await;
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM events").await,
        2,
        "one OwnerLinked, one SubscriptionChanged"
    );
    let info = app.get_json("/v1/customers/cus_dup/subscription").await;
    assert_eq!(
        (info["status"].as_str(), info["version"].as_u64()),
        (Some("active"), Some(2))
    );
    app.stop().await;
}

#[tokio::test]
async fn unhandled_types_are_acknowledged_and_recorded_as_ignored() {
    let app = spawn_app("ign").await;
    let body = serde_json::to_vec(&envelope(
        "evt_charge",
        "charge.succeeded",
        T0,
        json!({"id": "ch_1", "customer": "cus_1"}),
    ))
    .unwrap();
    let response = app.post_webhook(&body).await;
    assert_eq!(response.status(), 200);
    let (state, outcome, detail) = app.inbox_row("evt_charge").await.unwrap();
    assert_eq!(
        (state.as_str(), outcome.as_deref()),
        ("done", Some("ignored"))
    );
    assert!(detail.unwrap().contains("not handled"));
    assert_eq!(app.count("SELECT count(*) FROM events").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn stale_and_illegal_moves_are_acknowledged_and_recorded_with_their_outcome() {
    let app = spawn_app("rej").await;
    let active = sub_event(
        "evt_a",
        "customer.subscription.updated",
        T0 + 10,
        "sub_1",
        "cus_rej",
        "active",
        "org_rej",
    );
    let older = sub_event(
        "evt_b",
        "customer.subscription.updated",
        T0 + 5,
        "sub_1",
        "cus_rej",
        "past_due",
        "org_rej",
    );
    let backwards = sub_event(
        "evt_c",
        "customer.subscription.updated",
        T0 + 20,
        "sub_1",
        "cus_rej",
        "incomplete",
        "org_rej",
    );
    for body in [&active, &older, &backwards] {
        assert_eq!(app.post_webhook(body).await.status(), 200);
        app.settle().await;
    }
    assert_eq!(
        app.inbox_row("evt_a").await.unwrap().1.as_deref(),
        Some("applied")
    );
    let (_, outcome, detail) = app.inbox_row("evt_b").await.unwrap();
    assert_eq!(outcome.as_deref(), Some("stale"));
    assert!(detail.unwrap().contains("already updated"));
    let (_, outcome, detail) = app.inbox_row("evt_c").await.unwrap();
    assert_eq!(outcome.as_deref(), Some("illegal"));
    assert!(detail.unwrap().contains("active -> incomplete"));
    let info = app.get_json("/v1/customers/cus_rej/subscription").await;
    assert_eq!(info["status"], "active");
    app.stop().await;
}

#[tokio::test]
async fn when_postgres_cannot_store_the_webhook_answers_503_and_stripe_retries() {
    let app = spawn_app("down").await;
    let body = sub_event(
        "evt_down",
        "customer.subscription.created",
        T0,
        "sub_1",
        "cus_down",
        "active",
        "org_down",
    );
    // A real outage of this test's database: cut its connections and take it away.
    let admin = app.admin_pool().await;
    sqlx::query(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS false",
        app.db_name
    ))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&app.db_name)
        .execute(&admin)
        .await
        .unwrap();
    let response = app.post_webhook(&body).await;
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "storage_unavailable");
    // Stripe's retry succeeds once the database is back.
    sqlx::query(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS true",
        app.db_name
    ))
    .execute(&admin)
    .await
    .unwrap();
    let response = app.post_webhook(&body).await;
    assert_eq!(response.status(), 200);
    app.settle().await;
    assert_eq!(
        app.get_json("/v1/customers/cus_down/subscription").await["status"],
        "active"
    );
    app.stop().await;
}

/// The webhook's inserts keep their Postgres connection from one to the next. When that
/// connection dies while idle (Postgres ended it: a restart, an administrator, a proxy
/// that cut it), the next webhook is still stored and answered 200, on a fresh
/// connection: a connection that died between two webhooks is no outage.
#[tokio::test]
async fn a_webhook_is_stored_when_the_connection_the_inbox_kept_has_died() {
    let app = spawn_app("heldconn").await;
    let event = |id: &str, created: i64, status: &str| {
        sub_event(
            id,
            "customer.subscription.updated",
            created,
            "sub_held",
            "cus_held",
            status,
            "org_held",
        )
    };
    // One webhook after another, so that each of the inbox's inserts (taken in turn)
    // has stored one and keeps its connection.
    for n in 0..8 {
        let body = event(&format!("evt_held_a{n}"), T0 + n, "active");
        assert_eq!(app.post_webhook(&body).await.status(), 200);
    }
    // End every connection whose last statement was the inbox's insert, and wait until
    // they are gone.
    let admin = app.admin_pool().await;
    let ended: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'INSERT INTO inbox %' \
         AND pg_terminate_backend(pid)",
    )
    .bind(&app.db_name)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(!ended.is_empty(), "the inbox keeps a connection");
    for _ in 0..500 {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                .bind(&ended)
                .fetch_one(&admin)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let response = app
        .post_webhook(&event("evt_held_b", T0 + 10, "past_due"))
        .await;
    assert_eq!(response.status(), 200);
    assert!(app.inbox_row("evt_held_b").await.is_some());
    app.settle().await;
    assert_eq!(
        app.get_json("/v1/customers/cus_held/subscription").await["status"],
        "past_due"
    );
    admin.close().await;
    app.stop().await;
}

/// Webhooks are stored many to an insert (the inbox writer's group commit): deliveries
/// of one event that arrive together, in one batch or in several, store it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_of_one_event_store_it_once() {
    let app = spawn_app("concurrent_dups").await;
    let sim = crate::support::stripe_sim::simulate(17, 2, T0);
    let events: Vec<_> = sim.events.iter().take(10).collect();
    let bodies: Vec<Vec<u8>> = (0..5)
        .flat_map(|_| events.iter().map(|event| event.to_bytes()))
        .collect();
    let answers = join_all_limited(
        bodies.len(),
        bodies.iter().map(|body| async {
            let response = app.post_webhook(body).await;
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }),
    )
    .await;
    let mut first_time = std::collections::HashMap::<String, usize>::new();
    for answer in answers {
        let id = answer["event_id"].as_str().unwrap().to_owned();
        let counted = first_time.entry(id).or_default();
        if answer["result"] != "duplicate" {
            *counted += 1;
        }
    }
    assert_eq!(first_time.len(), events.len());
    assert!(
        first_time.values().all(|&n| n == 1),
        "each event stored exactly once: {first_time:?}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox").await,
        events.len() as i64
    );
    app.settle().await;
    assert_eq!(
        app.count("SELECT count(*) FROM inbox WHERE state <> 'done'")
            .await,
        0
    );
    app.stop().await;
}
