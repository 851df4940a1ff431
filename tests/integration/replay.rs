//! Replaying the log rebuilds exactly what live processing built.

use serde_json::Value;

use crate::events::{sub_event, T0};
use crate::helpers::spawn_app;

async fn snapshot(
    app: &crate::helpers::TestApp,
) -> (Vec<Value>, Vec<Value>, Vec<(String, Option<String>)>) {
    let subscriptions: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(s) - 'updated_at' FROM subscriptions s ORDER BY customer_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mirror: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(m) FROM merchant_subscriptions m ORDER BY subscription_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut cache = Vec::new();
    for key in app.redis_keys().await {
        let key = key.trim_start_matches(&app.prefix).to_owned();
        let value = app.redis_get(&key).await;
        cache.push((key, value));
    }
    (subscriptions, mirror, cache)
}

#[tokio::test]
async fn replay_equals_live() {
    let app = spawn_app("replay").await;
    let statuses = ["trialing", "active", "past_due", "active", "canceled"];
    for customer in 0..6 {
        for (i, status) in statuses.iter().enumerate().take(2 + customer % 4) {
            let body = sub_event(
                &format!("evt_{customer}_{i}"),
                "customer.subscription.updated",
                T0 + i as i64 * 10,
                &format!("sub_{customer}"),
                &format!("cus_{customer}"),
                status,
                &format!("org_{customer}"),
            );
            assert_eq!(app.post_webhook(&body).await.status(), 200);
        }
    }
    app.settle().await;
    let live = snapshot(&app).await;
    assert_eq!(live.0.len(), 6);
    assert_eq!(
        live.2.len(),
        18,
        "customer, org and user keys for 6 customers"
    );

    // Damage both read models, then rebuild them from the log alone.
    sqlx::query("UPDATE subscriptions SET status = 'garbage', version = 0")
        .execute(&app.pool)
        .await
        .unwrap();
    app.wipe_cache().await;
    let mut seen = Vec::new();
    let [platform, cache] = app
        .services
        .replay(|name, n| seen.push((name.to_owned(), n)))
        .await
        .unwrap();
    // The running server's own projection loop may apply some batches between ours (or
    // all of them: it may take the whole log between the reset and our catch-up, so a
    // count of zero here is not a failure); together they apply the whole log, and the
    // replay returns only when it is done, which the lag and snapshot checks below prove.
    assert!(
        platform.applied + cache.applied == 0 || !seen.is_empty(),
        "progress was reported for what the replay applied"
    );
    let events = app.count("SELECT count(*) FROM events").await as u64;
    assert!(platform.applied <= events && cache.applied <= events);
    assert_eq!(
        projections::runner::lag(&app.pool, "platform_tables")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        projections::runner::lag(&app.pool, "redis_cache")
            .await
            .unwrap(),
        0
    );
    assert_eq!(snapshot(&app).await, live);
    app.stop().await;
}
