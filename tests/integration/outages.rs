//! Outages, injected for real against the real binary: Redis killed and brought back,
//! Postgres stopped and started, each without restarting subledger. Every log line and
//! body is checked for secrets along the way.

use std::time::Duration;

use projections::{EventualProjection, PlatformTables, RedisCache, TransactionalProjection};
use serde_json::Value;

use crate::events::{sub_event, T0};
use crate::support::helpers::{settle, test_settings, SERVED_PROJECTIONS, TOKEN};
use crate::support::procs::{
    assert_no_secret, post_event, scratch, serve_command, Served, ThrowawayPostgres, ThrowawayRedis,
};

/// A local stand-in for Stripe's API: `/readyz` only needs to reach it.
async fn fake_stripe() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let handle = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    (base, handle)
}

async fn get(client: &reqwest::Client, url: String) -> (u16, String) {
    let response = client
        .get(url)
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn readyz(client: &reqwest::Client, address: &str) -> (u16, Value) {
    let (status, body) = get(client, format!("{address}/readyz")).await;
    assert_no_secret("/readyz", &body);
    (status, serde_json::from_str(&body).unwrap())
}

#[tokio::test]
async fn with_redis_down_webhooks_are_stored_reads_use_postgres_and_the_cache_catches_up() {
    let mut redis = ThrowawayRedis::start("redis-pass-5a4b3c2d");
    let (stripe_base, _stripe) = fake_stripe().await;
    let (mut settings, db_name, _) = test_settings("redisdown");
    settings.redis_url = redis.url().into();
    settings.stripe_api_base = stripe_base;
    let dir = scratch("redisdown");
    let log = dir.join("serve.log");
    let serve = Served::start(serve_command(&settings), &log).await;
    let client = reqwest::Client::new();
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap();

    let (status, ready) = readyz(&client, &serve.address).await;
    assert_eq!(
        (status, ready["status"].as_str()),
        (200, Some("ok")),
        "{ready}"
    );
    for check in ["postgres", "redis", "stripe"] {
        assert_eq!(ready["checks"][check]["reachable"], true, "{ready}");
        assert!(ready["checks"][check]["latency_ms"].is_f64(), "{ready}");
    }
    let stripe_target = settings.stripe_api_base.trim_start_matches("http://");
    assert_eq!(
        ready["checks"]["stripe"]["target"], stripe_target,
        "{ready}"
    );
    let lags: Vec<&str> = ready["projections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(lags, SERVED_PROJECTIONS, "{ready}");
    let body = sub_event(
        "evt_r1",
        "customer.subscription.created",
        T0,
        "sub_r1",
        "cus_r1",
        "active",
        "org_r1",
    );
    assert_eq!(post_event(&client, &serve.address, &body).await, Some(200));
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(30)).await;

    redis.kill();
    let (status, ready) = readyz(&client, &serve.address).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["checks"]["redis"]["reachable"], false, "{ready}");
    assert_eq!(ready["checks"]["postgres"]["reachable"], true, "{ready}");
    assert_eq!(ready["checks"]["stripe"]["reachable"], true, "{ready}");

    // Webhooks are acknowledged and recorded; processing goes on.
    let events = [
        sub_event(
            "evt_r2",
            "customer.subscription.updated",
            T0 + 10,
            "sub_r1",
            "cus_r1",
            "past_due",
            "org_r1",
        ),
        sub_event(
            "evt_r3",
            "customer.subscription.created",
            T0 + 20,
            "sub_r3",
            "cus_r3",
            "trialing",
            "org_r3",
        ),
    ];
    for body in &events {
        assert_eq!(post_event(&client, &serve.address, body).await, Some(200));
    }
    // The tables settle without the cache.
    settle(&pool, &[PlatformTables::NAME], Duration::from_secs(30)).await;
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE state = 'done'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(done, 3, "processed while Redis is down");
    assert!(
        projections::runner::lag(&pool, RedisCache::NAME)
            .await
            .unwrap()
            > 0
    );
    // Reads answer from Postgres, correctly.
    let (status, body) = get(
        &client,
        format!("{}/v1/customers/cus_r1/subscription", serve.address),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "past_due"
    );
    let (status, body) = get(
        &client,
        format!("{}/v1/orgs/org_r3/entitlements", serve.address),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let entitlement: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            entitlement["status"].as_str(),
            entitlement["access"].as_bool()
        ),
        (Some("trialing"), Some(true))
    );

    // Redis comes back (empty): the cache projection catches up without a restart.
    redis.restart();
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(30)).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let cached: Option<String> = redis::AsyncCommands::get(
        &mut conn,
        format!("{}stripe:customer:cus_r3", settings.redis_prefix),
    )
    .await
    .unwrap();
    let cached: Value =
        serde_json::from_str(&cached.expect("the missed write reached Redis")).unwrap();
    assert_eq!(cached["status"], "trialing");
    let (status, ready) = readyz(&client, &serve.address).await;
    assert_eq!(
        (status, ready["status"].as_str()),
        (200, Some("ok")),
        "{ready}"
    );
    assert_eq!(ready["inbox"]["pending"], 0, "{ready}");

    drop(serve);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("redis"), "the outage was logged");
    assert_no_secret("the log", &logs);
    assert!(
        !logs.contains("redis-pass-5a4b3c2d"),
        "the Redis password leaked"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn with_postgres_down_webhooks_get_503_cached_reads_answer_and_all_resumes() {
    let postgres = ThrowawayPostgres::create();
    let (stripe_base, _stripe) = fake_stripe().await;
    let (mut settings, _, _) = test_settings("pgdown");
    settings.database_url = postgres.url("subledger").into();
    settings.stripe_api_base = stripe_base;
    let dir = scratch("pgdown");
    let log = dir.join("serve.log");
    let serve = Served::start(serve_command(&settings), &log).await;
    let client = reqwest::Client::new();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(3))
        .connect(&postgres.url("subledger"))
        .await
        .unwrap();

    let first = sub_event(
        "evt_p1",
        "customer.subscription.created",
        T0,
        "sub_p1",
        "cus_p1",
        "active",
        "org_p1",
    );
    assert_eq!(post_event(&client, &serve.address, &first).await, Some(200));
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(30)).await;
    let (status, cached) = get(
        &client,
        format!("{}/v1/customers/cus_p1/subscription", serve.address),
    )
    .await;
    assert_eq!(status, 200);

    postgres.stop();
    let second = sub_event(
        "evt_p2",
        "customer.subscription.updated",
        T0 + 10,
        "sub_p1",
        "cus_p1",
        "canceled",
        "org_p1",
    );
    // Never a 2xx without a durable record.
    let status = post_event(&client, &serve.address, &second).await;
    assert_eq!(status, Some(503));
    let (status, ready) = readyz(&client, &serve.address).await;
    assert_eq!(
        (status, ready["status"].as_str()),
        (503, Some("unavailable")),
        "{ready}"
    );
    // Reads answer from the cache where it has the key ...
    let (status, body) = get(
        &client,
        format!("{}/v1/customers/cus_p1/subscription", serve.address),
    )
    .await;
    assert_eq!((status, &body), (200, &cached));
    let (status, body) = get(
        &client,
        format!("{}/v1/orgs/org_p1/entitlements", serve.address),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // ... and say so honestly where it has not (never a 404 for what may exist).
    let (status, body) = get(
        &client,
        format!("{}/v1/customers/cus_unknown/subscription", serve.address),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_no_secret("an error body", &body);

    // Postgres comes back: Stripe's retry is stored and processed, no restart needed.
    postgres.start();
    let mut stored = None;
    // Up to a minute or more: a loaded machine may restart Postgres slowly.
    for _ in 0..600 {
        stored = post_event(&client, &serve.address, &second).await;
        if stored == Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored, Some(200));
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(60)).await;
    let (status, body) = get(
        &client,
        format!("{}/v1/customers/cus_p1/subscription", serve.address),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "canceled"
    );
    let (status, ready) = readyz(&client, &serve.address).await;
    assert_eq!(
        (status, ready["status"].as_str()),
        (200, Some("ok")),
        "{ready}"
    );

    drop(serve);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("storage is unavailable"),
        "the outage was logged"
    );
    assert_no_secret("the log", &logs);
    pool.close().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn readyz_is_degraded_when_stripe_cannot_be_reached() {
    // A port nothing listens on: connection refused at once.
    let (mut settings, db_name, prefix) = test_settings("nostripe");
    settings.stripe_api_base = format!("http://127.0.0.1:{}", crate::support::procs::free_port());
    // Only a configured Stripe degrades the deployment (without a key it is "not
    // configured"); its background callers stay off.
    settings.stripe_secret_key = Some(secrecy::SecretString::from("sk_test_fake".to_owned()));
    settings.reconcile_interval = None;
    settings.recovery_interval = None;
    let app = crate::support::helpers::spawn_with(settings, db_name, prefix).await;
    let (status, ready) = readyz(&app.client, &app.address).await;
    assert_eq!(
        (status, ready["status"].as_str()),
        (200, Some("degraded")),
        "{ready}"
    );
    assert_eq!(ready["checks"]["stripe"]["reachable"], false, "{ready}");
    assert_eq!(ready["checks"]["stripe"]["error"], "error", "{ready}");
    assert_eq!(ready["checks"]["redis"]["reachable"], true, "{ready}");
    assert_eq!(ready["inbox"]["pending"], 0, "{ready}");
    app.stop().await;
}
