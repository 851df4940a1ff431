//! Replaying the log rebuilds exactly what live processing built.

use redis::AsyncCommands;
use serde_json::Value;

use crate::events::{sub_event, T0};
use crate::support::helpers::spawn_app;

async fn snapshot(
    app: &crate::support::helpers::TestApp,
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

    // Damage both read models, then rebuild them from the log alone. The replay
    // rebuilds Redis over what it holds: a customer's answer replaced with another of a
    // newer version, an org's hash holding a customer that is not its own, keys the log
    // knows nothing of, and the rest of the keys as they were.
    sqlx::query("UPDATE subscriptions SET status = 'garbage', version = 0")
        .execute(&app.pool)
        .await
        .unwrap();
    {
        let mut redis = app.redis.clone();
        let key = |name: &str| format!("{}stripe:{name}", app.prefix);
        let garbage = r#"{"customer_id":"cus_0","status":"garbage","version":99}"#;
        let _: () = redis.set(key("customer:cus_0"), garbage).await.unwrap();
        let _: () = redis
            .hset(key("org:org_1"), "cus_0", garbage)
            .await
            .unwrap();
        let _: () = redis
            .set(key("customer:cus_unlogged"), garbage)
            .await
            .unwrap();
        let _: () = redis
            .hset(key("org:org_unlogged"), "cus_unlogged", garbage)
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let done = app
        .services
        .replay(|_| {}, |name, n| seen.push((name.to_owned(), n)))
        .await
        .unwrap();
    // The running server's own projection loop may apply some batches between ours (or
    // all of them: it may take the whole log between the reset and our catch-up, so a
    // count of zero here is not a failure); together they apply the whole log, and the
    // replay returns only when it is done, which the lag and snapshot checks below prove.
    assert!(
        done.iter().all(|d| d.applied == 0) || !seen.is_empty(),
        "progress was reported for what the replay applied"
    );
    let events = app.count("SELECT count(*) FROM events").await as u64;
    assert!(done.iter().all(|d| d.applied <= events));
    for name in app.services.projections.names() {
        assert_eq!(
            app.services.projections.lag(name).await.unwrap(),
            0,
            "{name}"
        );
    }
    assert_eq!(snapshot(&app).await, live);
    app.stop().await;
}

#[tokio::test]
async fn the_log_is_read_in_transaction_order_across_a_digit_boundary() {
    // Transaction ids 99 and 100 sort the other way round as text: a reader ordering by
    // the text would checkpoint past tx 99 and never read it.
    let app = spawn_app("txorder").await;
    app.post_webhook(&sub_event(
        "evt_t",
        "customer.subscription.updated",
        T0,
        "sub_t",
        "cus_t",
        "active",
        "org_t",
    ))
    .await;
    app.settle().await;
    for (customer, tx) in [("cus_t100", "100"), ("cus_t99", "99")] {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, tx_id) \
             SELECT aggregate_type, $1, sequence, event_type, event_version, payload, metadata, $2::text::xid8 \
             FROM events WHERE aggregate_id = 'cus_t' ORDER BY sequence DESC LIMIT 1",
        )
        .bind(customer)
        .bind(tx)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let mut conn = app.pool.acquire().await.unwrap();
    let horizon = projections::log::read_horizon(&mut conn).await.unwrap();
    let mut at = projections::Position::default();
    let mut read = Vec::new();
    // One event per batch, so every batch boundary is a checkpoint.
    while let Some(event) = projections::log::read_after(&mut conn, at, horizon, 1)
        .await
        .unwrap()
        .pop()
    {
        at = event.position;
        read.push((event.position.tx_id, event.aggregate_id));
    }
    let copies: Vec<_> = read.iter().filter(|(tx, _)| *tx <= 100).collect();
    assert_eq!(
        copies,
        [&(99, "cus_t99".to_owned()), &(100, "cus_t100".to_owned())],
        "{read:?}"
    );
    assert_eq!(
        read.len(),
        app.count("SELECT count(*) FROM events").await as usize
    );
    app.stop().await;
}

/// The events a worker batch commits are handed to this process's projections
/// (`event_store::recent`), which take each as it was decided when they read it from the
/// log instead of decoding its payload: once the webhooks are projected, the projections
/// have taken events handed over (all but any they read in the moment between a commit
/// and its hand-over), and a read takes the handed event for its (aggregate, sequence)
/// rather than the payload's. (That the two are the same event is checked by every batch
/// written in a debug build: `NewEvents::push`.)
#[tokio::test]
async fn projections_take_the_events_this_process_committed_instead_of_decoding_them() {
    let app = spawn_app("handed").await;
    let sim = crate::support::stripe_sim::simulate(31, 4, T0);
    for event in &sim.events {
        assert_eq!(app.post_webhook(&event.to_bytes()).await.status(), 200);
    }
    app.settle().await;
    let recent = &app.services.ledger.recent;
    let committed = app.count("SELECT count(*) FROM events").await as u64;
    assert!(committed > 0);
    assert!(
        recent.taken() > 0 && recent.taken() + recent.len() as u64 <= committed,
        "the projections took {} of the {committed} events committed ({} left)",
        recent.taken(),
        recent.len()
    );

    let mut conn = app.pool.acquire().await.unwrap();
    let horizon = projections::log::read_horizon(&mut conn).await.unwrap();
    let all = projections::log::read_after(&mut conn, Default::default(), horizon, i64::MAX)
        .await
        .unwrap();
    let (first, last) = (all.first().unwrap(), all.last().unwrap());
    assert_ne!(first.event, last.event);
    // Handed over under the last event's key: another event, so that which one the read
    // gives shows where it came from.
    let recent = event_store::recent::RecentEvents::default();
    recent.put(
        &last.aggregate_id,
        last.sequence as i64,
        vec![first.event.clone()],
    );
    let batch =
        projections::log::read_batch(&mut conn, Default::default(), horizon, i64::MAX, &recent)
            .await
            .unwrap();
    let read = batch
        .events
        .iter()
        .find(|e| e.aggregate_id == last.aggregate_id && e.sequence == last.sequence)
        .expect("the newest event of its aggregate is kept");
    assert_eq!(read.event, first.event);
    assert!(recent.is_empty());
    app.stop().await;
}

/// A batch is read compacted (`log::read_batch`: each customer's newest event and each
/// subscription's newest snapshot are decoded, the rest skipped). Applying it must build
/// exactly what applying every event of the log one at a time builds.
#[tokio::test]
async fn a_compacted_batch_builds_what_every_event_one_at_a_time_builds() {
    use projections::{EventualProjection, TransactionalProjection};

    let app = spawn_app("compacted").await;
    let sim = crate::support::stripe_sim::simulate(23, 8, T0);
    for event in crate::support::stripe_sim::shuffle_with_duplicates(&sim.events, 9, 0.1) {
        assert_eq!(app.post_webhook(&event.to_bytes()).await.status(), 200);
    }
    app.settle().await;
    let live = snapshot(&app).await;
    assert_eq!(live.0.len(), 8);

    let platform = &projections::PlatformTables::new(app.services.catalog.clone());
    let cache = &app.services.cache;
    let mut conn = app.pool.acquire().await.unwrap();
    let horizon = projections::log::read_horizon(&mut conn).await.unwrap();
    let events = app.count("SELECT count(*) FROM events").await;

    // Every event, one at a time, in log order.
    sqlx::query("TRUNCATE subscriptions, merchant_subscriptions")
        .execute(&app.pool)
        .await
        .unwrap();
    app.wipe_cache().await;
    let all = projections::log::read_after(&mut conn, Default::default(), horizon, events)
        .await
        .unwrap();
    assert_eq!(all.len() as i64, events);
    for event in &all {
        platform
            .apply(&mut conn, &std::slice::from_ref(event).into())
            .await
            .unwrap();
        cache
            .apply(&std::slice::from_ref(event).into())
            .await
            .unwrap();
    }
    let one_at_a_time = snapshot(&app).await;

    // The whole log as one compacted batch.
    sqlx::query("TRUNCATE subscriptions, merchant_subscriptions")
        .execute(&app.pool)
        .await
        .unwrap();
    app.wipe_cache().await;
    let batch = projections::log::read_batch(
        &mut conn,
        Default::default(),
        horizon,
        events,
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(batch.read as i64, events);
    assert!(
        batch.events.len() < all.len() / 2,
        "compaction skipped most events ({} of {})",
        batch.events.len(),
        all.len()
    );
    platform
        .apply(&mut conn, &batch.events[..].into())
        .await
        .unwrap();
    cache.apply(&batch.events[..].into()).await.unwrap();
    let compacted = snapshot(&app).await;

    assert_eq!(one_at_a_time, live);
    assert_eq!(compacted, live);
    app.stop().await;
}
