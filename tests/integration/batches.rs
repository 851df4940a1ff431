//! The batched write path of the inbox workers (issue 6): many webhooks stored by one
//! insert, a batch's events written in one statement and commit, and the aggregates
//! workers remember between batches. Real Postgres; no HTTP here.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use aggregates::{Subscription, SubscriptionEvent};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::EventStore;
use postgres_es::PostgresEventRepository;
use subledger::inbox::{self, NewEvent, Received, Source};
use subledger::reads::PROJECTION_BATCH;
use subledger::stripe::{parse_event, route, Route, StripeEvent};
use subledger::Services;

use crate::support::helpers::{catch_up_fully, test_settings};
use crate::support::stripe_sim::{shuffle_with_duplicates, simulate, SimEvent, Simulation};

async fn services(tag: &str) -> Services {
    let (settings, _, _) = test_settings(tag);
    Services::connect(settings)
        .await
        .expect("Postgres is running")
}

/// Stores `events` in the inbox with one `record_many`, and checks each id not in `seen`
/// (ids stored before) was stored once and every repeat answered `Duplicate`.
async fn store_all(services: &Services, events: &[SimEvent], seen: &mut HashSet<String>) {
    let bodies: Vec<Vec<u8>> = events.iter().map(SimEvent::to_bytes).collect();
    let parsed: Vec<StripeEvent> = bodies.iter().map(|b| parse_event(b).unwrap()).collect();
    let new: Vec<NewEvent> = parsed
        .iter()
        .zip(&bodies)
        .map(|(event, raw)| NewEvent {
            event,
            raw,
            source: Source::Import,
        })
        .collect();
    let received = inbox::record_many(&services.pool, &new).await.unwrap();
    for (event, received) in events.iter().zip(received) {
        let first = seen.insert(event.id.clone());
        assert_eq!(
            received == Ok(Received::Duplicate),
            !first,
            "{} answered {received:?}",
            event.id
        );
    }
}

/// Processes the inbox 5 rows at a time, so customers come back to the cache again and again.
async fn drain_in_small_batches(services: &Services) {
    while !services
        .worker
        .process_batch(5, None)
        .await
        .unwrap()
        .is_empty()
    {}
}

async fn count(services: &Services, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&services.pool)
        .await
        .unwrap()
}

/// A customer's log is gap-free: its sequences are 1..=n.
async fn assert_gap_free(services: &Services, customer_id: &str) {
    let sequences: Vec<i64> =
        sqlx::query_scalar("SELECT sequence FROM events WHERE aggregate_id = $1 ORDER BY sequence")
            .bind(customer_id)
            .fetch_all(&services.pool)
            .await
            .unwrap();
    assert_eq!(
        sequences,
        (1..=sequences.len() as i64).collect::<Vec<_>>(),
        "{customer_id}: the log has a gap"
    );
}

/// Every customer's log is gap-free (1..=n) and its newest event holds Stripe's newest facts.
async fn assert_log_matches(services: &Services, sim: &Simulation) {
    for truth in &sim.truth {
        assert_gap_free(services, &truth.customer_id).await;
        let last: sqlx::types::Json<SubscriptionEvent> = sqlx::query_scalar(
            "SELECT payload FROM events WHERE aggregate_id = $1 ORDER BY sequence DESC LIMIT 1",
        )
        .bind(&truth.customer_id)
        .fetch_one(&services.pool)
        .await
        .unwrap();
        let sub = last.0.view().subscription.clone().expect("a subscription");
        assert_eq!(sub.id, truth.subscription_id);
        assert_eq!(sub.status.as_str(), truth.status);
        assert_eq!(
            sub.current_period_end.map(|d| d.timestamp()),
            Some(truth.current_period_end)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_batches_fall_back_to_one_customer_at_a_time_and_lose_nothing() {
    let services = services("batchrace").await;
    let sim = simulate(41, 3, 1_760_000_000);
    let mut seen = HashSet::new();
    store_all(
        &services,
        &shuffle_with_duplicates(&sim.events, 3, 0.2),
        &mut seen,
    )
    .await;
    let pending = count(
        &services,
        "SELECT count(*) FROM inbox WHERE state = 'pending'",
    )
    .await;

    // Hold every write to the log until all four batches have claimed their rows and
    // loaded the same histories: then all but the first lose the race for some customer.
    let mut gate = services.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut *gate)
        .await
        .unwrap();
    let mut batches = Vec::new();
    for _ in 0..4 {
        let worker = services.worker.clone();
        batches.push(tokio::spawn(async move {
            worker.process_batch((pending + 3) / 4, None).await
        }));
    }
    let mut waiting = 0;
    for _ in 0..2400 {
        waiting = count(
            &services,
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'events'::regclass",
        )
        .await;
        if waiting >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(waiting >= 2, "only {waiting} batches reached the log");
    gate.commit().await.unwrap();
    let mut processed = 0;
    for batch in batches {
        processed += batch
            .await
            .unwrap()
            .expect("a batch never fails as a whole")
            .len();
    }
    assert_eq!(processed as i64, pending);
    assert!(
        services.ledger.conflicts_retried.load(Ordering::Relaxed) >= 1,
        "a batch lost the race and was retried per customer"
    );

    assert_eq!(services.worker.drain().await.unwrap(), 0);
    assert_eq!(
        count(
            &services,
            "SELECT count(*) FROM inbox WHERE state <> 'done'"
        )
        .await,
        0
    );
    assert_log_matches(&services, &sim).await;
}

#[tokio::test]
async fn remembered_aggregates_equal_the_log_folded_from_scratch() {
    let services = services("aggcache").await;
    let sim = simulate(43, 6, 1_760_000_000);
    let events = shuffle_with_duplicates(&sim.events, 5, 0.1);
    let (early, late) = events.split_at(events.len() * 3 / 5);
    let mut seen = HashSet::new();
    store_all(&services, early, &mut seen).await;
    drain_in_small_batches(&services).await;
    assert!(!services.ledger.cache.is_empty());

    // Another writer (the event store itself, as a sync does) moves one customer past the
    // version this process remembers; the next batches must load what it wrote.
    let (moved, rest): (Vec<&SimEvent>, Vec<&SimEvent>) = late
        .iter()
        .partition(|e| e.customer_id == sim.truth[0].customer_id);
    let mut written_elsewhere = 0;
    for event in &moved {
        let parsed = parse_event(&event.to_bytes()).unwrap();
        if let Route::Command {
            customer_id,
            command,
        } = route(&parsed)
        {
            let (decision, _) = services
                .ledger
                .execute(&customer_id, &command, &event.id)
                .await
                .unwrap();
            written_elsewhere += decision.events.len();
        }
    }
    assert!(written_elsewhere > 0, "the store wrote past the cache");
    let rest: Vec<SimEvent> = rest.into_iter().cloned().collect();
    // The moved customer's events come again (as Stripe retries), with everyone else's.
    let mut again: Vec<SimEvent> = moved.into_iter().cloned().collect();
    again.extend(rest);
    store_all(&services, &again, &mut seen).await;
    drain_in_small_batches(&services).await;

    let store = PersistedEventStore::<PostgresEventRepository, Subscription>::new_event_store(
        PostgresEventRepository::new(services.pool.clone()),
    );
    let remembered = services.ledger.cache.entries();
    assert_eq!(remembered.len(), sim.truth.len());
    for (customer_id, version, state) in remembered {
        let context = store.load_aggregate(&customer_id).await.unwrap();
        assert_eq!(version as usize, context.current_sequence, "{customer_id}");
        assert_eq!(
            serde_json::to_value(&state).unwrap(),
            serde_json::to_value(&context.aggregate).unwrap(),
            "{customer_id}: the remembered aggregate is the fold of its log"
        );
    }
    assert_log_matches(&services, &sim).await;
}

/// A log that lost its newest events under a running process (a database restored to an
/// earlier point, or a failover to a replica that had not received them) while the
/// process still remembers the aggregates it wrote: the next batches must decide against
/// what the log holds and append right after it, never past a version it no longer holds
/// (which left a gap: the sequences after it written, the ones before missing).
#[tokio::test]
async fn a_remembered_version_the_log_lost_is_not_written_past() {
    let services = services("aggahead").await;
    let sim = simulate(47, 4, 1_760_000_000);
    let (early, late) = sim.events.split_at(sim.events.len() / 2);
    let mut seen = HashSet::new();
    store_all(&services, early, &mut seen).await;
    drain_in_small_batches(&services).await;
    let remembered = services.ledger.cache.entries();
    assert_eq!(remembered.len(), sim.truth.len());
    // Every customer's newest event is gone from the log; the process still holds it.
    let lost = sqlx::query(
        "DELETE FROM events e WHERE sequence = \
            (SELECT max(sequence) FROM events WHERE aggregate_id = e.aggregate_id)",
    )
    .execute(&services.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(lost as usize, sim.truth.len());
    store_all(&services, late, &mut seen).await;
    drain_in_small_batches(&services).await;
    for truth in &sim.truth {
        assert_gap_free(&services, &truth.customer_id).await;
    }
    // What the process remembers of the customers written since is what the log holds.
    let written: HashSet<&str> = late.iter().map(|e| e.customer_id.as_str()).collect();
    assert!(!written.is_empty());
    let store = PersistedEventStore::<PostgresEventRepository, Subscription>::new_event_store(
        PostgresEventRepository::new(services.pool.clone()),
    );
    for (customer_id, version, _) in services.ledger.cache.entries() {
        if !written.contains(customer_id.as_str()) {
            continue;
        }
        let context = store.load_aggregate(&customer_id).await.unwrap();
        assert_eq!(version as usize, context.current_sequence, "{customer_id}");
    }
}

/// `subledger replay` rebuilds both projections from the whole log compacted at once
/// (`Projections::replay`): it must build what live, batch-by-batch catching up built.
#[tokio::test]
async fn a_rebuild_writes_what_catching_up_batch_by_batch_wrote() {
    let (settings, _, prefix) = test_settings("rebuild");
    let services = Services::connect(settings).await.unwrap();
    let sim = simulate(47, 12, 1_760_000_000);
    let mut seen = HashSet::new();
    store_all(
        &services,
        &shuffle_with_duplicates(&sim.events, 11, 0.1),
        &mut seen,
    )
    .await;
    services.worker.drain().await.unwrap();
    let events = count(&services, "SELECT count(*) FROM events").await as u64;
    // Live: many small batches.
    let live = catch_up_fully(&services.projections, PROJECTION_BATCH)
        .await
        .unwrap();
    assert!(live.iter().all(|&applied| applied == events), "{live:?}");
    let live = read_models(&services, &prefix).await;
    assert_eq!(live.0.len(), sim.truth.len());

    let rebuilt = services.replay(|_| {}, |_, _| {}).await.unwrap();
    let rest = catch_up_fully(&services.projections, PROJECTION_BATCH)
        .await
        .unwrap();
    for (done, more) in rebuilt.iter().zip(rest) {
        assert_eq!(done.applied + more, events, "{}", done.name);
    }
    assert_eq!(read_models(&services, &prefix).await, live);
}

/// A rebuild reads the events it needs grouped by customer (`log::newest_below`): each
/// customer's newest event and its subscriptions' newest snapshots side by side, at the
/// place of its newest event, in log order within, so that a chunk holds them together
/// and the customer's answer is written once. The payloads are the smallest text the key
/// scan reads a subscription id from; nothing here decodes them.
#[tokio::test]
async fn the_events_a_rebuild_needs_come_grouped_by_customer() {
    let services = services("grouped").await;
    let snapshot = |id: &str| {
        format!(r#"{{"SubscriptionChanged":{{"subscription":{{"id":"{id}"}},"view":{{}}}}}}"#)
    };
    let log = [
        ("cus_a", 1, "SubscriptionChanged", snapshot("sub_a1")),
        ("cus_b", 1, "SubscriptionChanged", snapshot("sub_b1")),
        ("cus_a", 2, "SubscriptionChanged", snapshot("sub_a2")),
        ("cus_b", 2, "OwnerLinked", "{}".to_owned()),
        ("cus_c", 1, "OwnerLinked", "{}".to_owned()),
        ("cus_a", 3, "OwnerLinked", "{}".to_owned()),
        // Superseded by cus_a's second snapshot of it: not needed.
        ("cus_a", 4, "SubscriptionChanged", snapshot("sub_a1")),
        ("cus_a", 5, "OwnerLinked", "{}".to_owned()),
    ];
    let mut global_seqs = Vec::new();
    for (customer, sequence, event_type, payload) in &log {
        let global_seq: i64 = sqlx::query_scalar(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             VALUES ('Subscription', $1, $2, $3, '1', $4::json, '{}') RETURNING global_seq",
        )
        .bind(customer)
        .bind(sequence)
        .bind(event_type)
        .bind(payload)
        .fetch_one(&services.pool)
        .await
        .unwrap();
        global_seqs.push(global_seq);
    }
    let mut tx = services.pool.begin().await.unwrap();
    // Every event here has committed; a horizon taken now could stand below them while
    // another test's transaction runs (it is the whole server's), so none is applied.
    let horizon = u64::MAX;
    let newest = projections::log::newest_below(&mut tx, horizon)
        .await
        .unwrap();
    let needed: Vec<String> = newest
        .global_seqs
        .iter()
        .map(|seq| {
            let i = global_seqs.iter().position(|s| s == seq).unwrap();
            format!("{}#{}", log[i].0, log[i].1)
        })
        .collect();
    assert_eq!(
        needed,
        ["cus_b#1", "cus_b#2", "cus_c#1", "cus_a#2", "cus_a#4", "cus_a#5"]
    );
    assert_eq!(newest.read, log.len());
}

async fn read_models(
    services: &Services,
    prefix: &str,
) -> (
    Vec<serde_json::Value>,
    Vec<serde_json::Value>,
    Vec<(String, String)>,
) {
    let subscriptions = sqlx::query_scalar(
        "SELECT to_jsonb(s) - 'updated_at' FROM subscriptions s ORDER BY customer_id",
    )
    .fetch_all(&services.pool)
    .await
    .unwrap();
    let mirror = sqlx::query_scalar(
        "SELECT to_jsonb(m) FROM merchant_subscriptions m ORDER BY subscription_id",
    )
    .fetch_all(&services.pool)
    .await
    .unwrap();
    let mut redis = redis::Client::open(
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
    )
    .unwrap()
    .get_multiplexed_async_connection()
    .await
    .unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    keys.sort();
    let mut cache = Vec::new();
    for key in keys {
        let value = crate::support::helpers::redis_value(&mut redis, &key)
            .await
            .unwrap();
        cache.push((key, value));
    }
    (subscriptions, mirror, cache)
}

/// The page (block number) of each inbox row.
async fn inbox_pages(services: &Services) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT event_id, ((ctid::text)::point)[0]::int8 FROM inbox")
        .fetch_all(&services.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Marking a row done writes its new version on the row's own page, so that Postgres logs
/// only the columns that changed rather than the whole row and its payload again
/// (migrations/20261205000001_inbox_fillfactor.sql). The events are the simulation's
/// (tests/integration/support/stripe_sim.rs, shapes from stripe/openapi spec3), stored
/// with the real insert and processed by the real worker, a batch at a time.
#[tokio::test]
async fn a_processed_inbox_row_stays_on_its_page() {
    let services = services("inboxpage").await;
    let sim = simulate(41, 40, 1_700_000_000);
    store_all(&services, &sim.events, &mut HashSet::new()).await;
    let before = inbox_pages(&services).await;
    drain_in_small_batches(&services).await;
    assert_eq!(
        count(&services, "SELECT count(*) FROM inbox WHERE state = 'done'").await,
        before.len() as i64
    );
    let after = inbox_pages(&services).await;
    let moved = before
        .iter()
        .filter(|(id, page)| after[*id] != **page)
        .count();
    let pages: HashSet<i64> = before.values().copied().collect();
    assert!(pages.len() > 10, "the rows fill {} pages", pages.len());
    assert!(
        moved * 10 <= before.len(),
        "{moved} of {} rows moved to another page when marked done",
        before.len()
    );
}
