//! The batch writer owns its SQL but writes postgres-es's table: this proves postgres-es's
//! own repository loads every row the batch writer wrote, as the same aggregate state and
//! version as folding the events decided, with the metadata written; that the batch
//! loader and postgres-es's commits see each other's rows; and that the primary key
//! refuses a batch decided against a stale version. Real Postgres (`DATABASE_URL`'s
//! server), a fresh database, the repository's migrations.

use std::collections::HashMap;
use std::str::FromStr;

use aggregates::{
    decide, Fact, FactSource, OwnerFacts, StripeFacts, Subscription, SubscriptionCommand,
    SubscriptionEvent, SubscriptionFacts, SubscriptionStatus,
};
use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, EventStore as _};
use event_store::batch::{self, NewEvents};
use event_store::{read, EventStore, Metadata, Position, StoreError};
use futures_util::TryStreamExt;
use postgres_es::PostgresEventRepository;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A fresh, migrated database on `DATABASE_URL`'s server, named like the integration
/// tests' so `scripts/test.sh` drops it once it is old.
async fn fresh_database() -> PgPool {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let options = PgConnectOptions::from_str(&url).expect("DATABASE_URL is a Postgres URL");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let name = format!(
        "subledger_test_{}_evstore_{}_{}",
        now.as_secs(),
        std::process::id(),
        now.subsec_nanos()
    );
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.database(&name))
        .await
        .unwrap();
    MIGRATOR.run(&pool).await.unwrap();
    pool
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_760_000_000 + secs, 0).unwrap()
}

/// A `customer.subscription.updated` fact: `customer`'s subscription in `status`, as of
/// `secs`.
fn snapshot(
    customer: &str,
    event_id: &str,
    secs: i64,
    status: SubscriptionStatus,
) -> SubscriptionCommand {
    SubscriptionCommand::RecordStripeFacts(StripeFacts {
        customer_id: customer.to_owned(),
        source: FactSource {
            stripe_event_id: event_id.to_owned(),
            stripe_event_type: "customer.subscription.updated".to_owned(),
            created: at(secs),
        },
        owner: OwnerFacts {
            org_id: Some(format!("org_{customer}")),
            user_id: None,
            account: None,
        },
        fact: Fact::Subscription(SubscriptionFacts {
            id: format!("sub_{customer}"),
            status,
            created: Some(at(0)),
            price_id: Some("price_pro".to_owned()),
            product_id: Some("prod_pro".to_owned()),
            lookup_key: None,
            quantity: Some(1),
            current_period_start: Some(at(secs)),
            current_period_end: Some(at(secs + 30 * 86_400)),
            cancel_at_period_end: false,
            cancel_at: None,
            canceled_at: None,
            ended_at: None,
            trial_start: None,
            trial_end: None,
            latest_invoice_id: None,
            currency: Some("usd".to_owned()),
            items: vec![],
            pause_reason: None,
        }),
    })
}

/// Decides `commands` in order against `state`, returning all their events.
fn decide_all(state: &Subscription, commands: &[SubscriptionCommand]) -> Vec<SubscriptionEvent> {
    let mut state = state.clone();
    let mut events = Vec::new();
    for command in commands {
        for event in decide(&state, command).unwrap().events {
            state.apply(event.clone());
            events.push(event);
        }
    }
    events
}

fn metadata(sources: &str) -> Metadata {
    HashMap::from([("sources".to_owned(), sources.to_owned())])
}

/// One worker batch: loads `groups`' customers after the versions in `known`, decides,
/// appends, commits; returns `known` with each customer's version and fold after it.
async fn write_batch(
    pool: &PgPool,
    groups: &[(&str, Vec<SubscriptionCommand>)],
    known: &mut HashMap<String, (i64, Subscription)>,
) {
    let ids: Vec<String> = groups.iter().map(|(id, _)| (*id).to_owned()).collect();
    let mut tx = pool.begin().await.unwrap();
    let held = ids
        .iter()
        .filter_map(|id| known.get(id).map(|v| (id.clone(), v.clone())))
        .collect();
    let mut loaded = batch::load_many(&mut tx, &ids, held).await.unwrap();
    let mut new = NewEvents::default();
    for (customer, commands) in groups {
        let (version, mut state) = loaded.remove(*customer).unwrap_or_default();
        let events = decide_all(&state, commands);
        let sources = format!("evt_{customer}_{version}");
        new.push(customer, version, &events, &metadata(&sources))
            .unwrap();
        for event in events.iter().cloned() {
            state.apply(event);
        }
        known.insert(
            (*customer).to_owned(),
            (version + events.len() as i64, state),
        );
    }
    batch::append(&mut tx, new).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn postgres_es_loads_every_row_the_batch_writer_wrote() {
    use SubscriptionStatus::*;
    let pool = fresh_database().await;
    let mut folded = HashMap::new();

    // Two batches: the second loads the first's rows after the versions it remembers
    // (one customer it does not remember at all, so its whole history is loaded).
    write_batch(
        &pool,
        &[
            (
                "cus_a",
                vec![
                    snapshot("cus_a", "evt_1", 1, Trialing),
                    snapshot("cus_a", "evt_2", 2, Active),
                ],
            ),
            ("cus_b", vec![snapshot("cus_b", "evt_3", 1, Incomplete)]),
            ("cus_c", vec![snapshot("cus_c", "evt_4", 1, Active)]),
        ],
        &mut folded,
    )
    .await;
    folded.remove("cus_c");
    write_batch(
        &pool,
        &[
            ("cus_a", vec![snapshot("cus_a", "evt_5", 5, PastDue)]),
            (
                "cus_b",
                vec![
                    snapshot("cus_b", "evt_6", 5, Active),
                    snapshot("cus_b", "evt_7", 6, Canceled),
                ],
            ),
            ("cus_c", vec![snapshot("cus_c", "evt_8", 5, Canceled)]),
        ],
        &mut folded,
    )
    .await;

    let store = PersistedEventStore::<PostgresEventRepository, Subscription>::new_event_store(
        PostgresEventRepository::new(pool.clone()),
    );
    for customer in ["cus_a", "cus_b", "cus_c"] {
        let (version, state) = &folded[customer];
        let context = store.load_aggregate(customer).await.unwrap();
        assert_eq!(context.current_sequence as i64, *version, "{customer}");
        assert_eq!(
            serde_json::to_value(&context.aggregate).unwrap(),
            serde_json::to_value(state).unwrap(),
            "{customer}: postgres-es folds what the batch writer decided"
        );
        let envelopes = store.load_events(customer).await.unwrap();
        assert_eq!(envelopes.len() as i64, *version);
        for (i, envelope) in envelopes.iter().enumerate() {
            assert_eq!(envelope.sequence, i + 1);
            assert_eq!(envelope.aggregate_id, customer);
            assert!(envelope.metadata["sources"].starts_with(&format!("evt_{customer}_")));
        }
    }
    // The log's global order holds every row, each aggregate's in sequence. The horizon
    // is the oldest transaction running anywhere on the server (other tests' too), so
    // the rows become readable once those older transactions end.
    let mut conn = pool.acquire().await.unwrap();
    let total: i64 = folded.values().map(|(v, _)| v).sum();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let rows = loop {
        let horizon = read::read_horizon(&mut conn).await.unwrap();
        let rows: Vec<_> = read::read_after(&mut conn, Position::default(), horizon, 1000)
            .try_collect()
            .await
            .unwrap();
        if rows.len() as i64 == total || std::time::Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(rows.len() as i64, total);
    assert_eq!(
        read::count_after(&mut conn, Position::default())
            .await
            .unwrap(),
        total
    );
    let mut seen: HashMap<String, i64> = HashMap::new();
    for row in &rows {
        let last = seen.entry(row.aggregate_id().to_owned()).or_default();
        assert_eq!(row.sequence(), *last + 1);
        *last = row.sequence();
        row.decode().unwrap();
    }
}

#[tokio::test]
async fn batches_and_postgres_es_commits_see_each_other_and_conflicts_are_refused() {
    use SubscriptionStatus::*;
    let pool = fresh_database().await;
    let mut folded = HashMap::new();
    write_batch(
        &pool,
        &[("cus_a", vec![snapshot("cus_a", "evt_1", 1, Trialing)])],
        &mut folded,
    )
    .await;
    let remembered = folded.clone();

    // postgres-es commits on top of the batch's rows...
    let store = EventStore::new(pool.clone());
    let loaded = store.load("cus_a").await.unwrap();
    assert_eq!(loaded.version(), folded["cus_a"].0);
    let events = decide_all(loaded.state(), &[snapshot("cus_a", "evt_2", 2, Active)]);
    store
        .commit(loaded, events, metadata("evt_2"))
        .await
        .unwrap();

    // ...and a batch that remembers the older version loads what it committed.
    let mut tx = pool.begin().await.unwrap();
    let loaded = batch::load_many(&mut tx, &["cus_a".to_owned()], remembered.clone())
        .await
        .unwrap();
    let (version, state) = &loaded["cus_a"];
    let fresh = EventStore::new(pool.clone()).load("cus_a").await.unwrap();
    assert_eq!(*version, fresh.version());
    assert_eq!(
        serde_json::to_value(state).unwrap(),
        serde_json::to_value(fresh.state()).unwrap()
    );
    tx.rollback().await.unwrap();

    // A batch decided against the remembered (stale) version is refused whole.
    let (version, state) = remembered["cus_a"].clone();
    let events = decide_all(&state, &[snapshot("cus_a", "evt_3", 3, Canceled)]);
    let mut new = NewEvents::default();
    new.push("cus_a", version, &events, &metadata("evt_3"))
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let refused = batch::append(&mut tx, new).await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    tx.rollback().await.unwrap();

    // And so is a commit through postgres-es against a stale load.
    let stale = store.load("cus_a").await.unwrap();
    let events = decide_all(stale.state(), &[snapshot("cus_a", "evt_4", 4, Canceled)]);
    let mut new = NewEvents::default();
    new.push("cus_a", stale.version(), &events, &metadata("evt_4"))
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    batch::append(&mut tx, new).await.unwrap();
    tx.commit().await.unwrap();
    let refused = store.commit(stale, events, metadata("evt_4")).await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    assert_eq!(
        read::aggregate_ids(&pool).await.unwrap(),
        vec!["cus_a".to_owned()]
    );
    assert!(read::aggregate_exists(&pool, "cus_a").await.unwrap());
    assert!(!read::aggregate_exists(&pool, "cus_b").await.unwrap());
    let history = read::history(&pool, "cus_a").await.unwrap();
    let newest = store.load("cus_a").await.unwrap();
    assert_eq!(history.len() as i64, newest.version());
    assert_eq!(
        history.last().unwrap().event.event.source().stripe_event_id,
        "evt_4",
        "the batch written after the stale load is the newest"
    );
}

/// Fills the log with `events` rows spread over `aggregates` customers (`cus_0`…), in
/// sequence order, straight into the table: their payloads are not events.
async fn seed_log(pool: &PgPool, aggregates: i64, events: i64) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'Subscription', 'cus_' || (n % $1), n / $1 + 1, 'OwnerLinked', '1', '{}', '{}' \
         FROM generate_series(0, $2 - 1) AS n",
    )
    .bind(aggregates)
    .bind(events)
    .execute(pool)
    .await
    .unwrap();
}

/// A read of the log walks `events_read_order` in order and stops at its limit, whatever
/// the planner's statistics say: here the log was never analyzed (as with autovacuum off
/// or behind), which once made Postgres read every event through the primary key and sort
/// them (see `read::read_horizon`). The plan is asked for with the statement `read_after`
/// runs, in a transaction that took its horizon, from a position near the end.
#[tokio::test]
async fn reads_of_the_log_walk_it_in_order_whatever_the_statistics() {
    let pool = fresh_database().await;
    seed_log(&pool, 500, 50_000).await;
    let (tx_id, global_seq): (String, i64) = sqlx::query_as(
        "SELECT tx_id::text, global_seq FROM events ORDER BY global_seq DESC OFFSET 100 LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let horizon = read::read_horizon(&mut tx).await.unwrap();
    let plan: serde_json::Value =
        sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {}", read::READ_AFTER))
            .bind(tx_id.clone())
            .bind(global_seq)
            .bind(horizon.to_string())
            .bind(5000_i64)
            .bind(Subscription::TYPE)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let plan = plan.to_string();
    assert!(
        plan.contains(r#""Index Name":"events_read_order""#) && !plan.contains(r#""Sort""#),
        "{plan}"
    );
    // The lag count walks the same index from the same place.
    let after = Position {
        tx_id: tx_id.parse().unwrap(),
        global_seq,
    };
    tx.commit().await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(read::count_after(&mut conn, after).await.unwrap(), 100);
}

/// A batch's history load walks the primary key to each aggregate's events after its
/// version, whatever the planner believes of the log: here the plan is the generic one a
/// connection keeps, made while the log held a handful of events and was never analyzed
/// (a fresh database, or autovacuum off or behind). As a plain join, that plan read every
/// event of the aggregate type (a bitmap of `aggregate_type` under a hash join, as here;
/// a merge join over the whole key where bitmap scans are off), and kept doing so as the
/// log grew: up to 7–8 ms a batch at 26 000 events in the benchmark.
#[tokio::test]
async fn a_batch_load_walks_each_aggregates_key_whatever_the_statistics() {
    let pool = fresh_database().await;
    seed_log(&pool, 5, 10).await;
    let mut conn = pool.acquire().await.unwrap();
    // The plan for any parameters (PREPARE, then EXPLAIN EXECUTE), as a connection keeps
    // it: an EXPLAIN sent with bound parameters plans for their values instead.
    sqlx::raw_sql(&format!(
        "SET plan_cache_mode = force_generic_plan; \
         PREPARE load_many_plan(text, text[], int8[]) AS {}",
        batch::LOAD_MANY
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: serde_json::Value = sqlx::query_scalar(
        "EXPLAIN (FORMAT JSON) EXECUTE load_many_plan('Subscription', '{cus_1,cus_2}', '{0,1}')",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let plan = plan.to_string();
    assert!(
        plan.contains(r#""Node Type":"Nested Loop""#)
            && plan.contains(r#""Index Name":"events_pkey""#)
            && plan.contains("aggregate_id = k.aggregate_id")
            && !plan.contains("Hash Join")
            && !plan.contains("Merge Join")
            && !plan.contains("Bitmap")
            && !plan.contains("Seq Scan"),
        "{plan}"
    );
}

/// The rebuild's key scan reads a snapshot's subscription id in Postgres from the text
/// serde wrote (the first `"subscription":{"id":"` before the first `"view":`), and sends
/// the payload whole where it cannot. Here one snapshot event is stored as the batch
/// writer wrote it, then again under other customers with its `view` moved first and
/// naming another subscription, as jsonb's text (spaces, sorted keys), and with an escaped
/// quote in its id: each gives the snapshot's own id, one way or the other.
#[tokio::test]
async fn the_key_scan_reads_each_snapshots_subscription_id_whatever_its_texts_shape() {
    let pool = fresh_database().await;
    let mut known = HashMap::new();
    let commands = vec![snapshot("cus_a", "evt_1", 10, SubscriptionStatus::Active)];
    write_batch(&pool, &[("cus_a", commands)], &mut known).await;
    let written: String = sqlx::query_scalar(
        "SELECT payload::text FROM events WHERE event_type = 'SubscriptionChanged'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let inner = written
        .strip_prefix(r#"{"SubscriptionChanged":{"#)
        .and_then(|rest| rest.strip_suffix("}}"))
        .expect("serde's externally tagged form");
    let (fields, view) = inner
        .split_once(r#","view":"#)
        .expect("a view after the rest");
    let view_first = format!(
        r#"{{"SubscriptionChanged":{{"view":{},{fields}}}}}"#,
        view.replace("sub_cus_a", "sub_in_view")
    );
    let escaped = written.replacen(r#""id":"sub_cus_a""#, r#""id":"sub_\"q""#, 1);
    for (customer, payload) in [("cus_view", view_first.as_str()), ("cus_escaped", &escaped)] {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             VALUES ('Subscription', $1, 1, 'SubscriptionChanged', '1', $2::json, '{}')",
        )
        .bind(customer)
        .bind(payload)
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'Subscription', 'cus_jsonb', 1, event_type, event_version, payload::jsonb::json, metadata \
         FROM events WHERE aggregate_id = 'cus_a' AND event_type = 'SubscriptionChanged'",
    )
    .execute(&pool)
    .await
    .unwrap();

    let mut conn = pool.acquire().await.unwrap();
    // Every event here has committed; a horizon taken now could stand below them while
    // another test's transaction runs (it is the whole server's), so none is applied.
    let horizon = u64::MAX;
    let types = ["SubscriptionChanged", "SubscriptionReconciled"];
    let keys: Vec<_> = read::scan_keys(&mut conn, horizon, &types)
        .try_collect()
        .await
        .unwrap();
    // Each snapshot's (customer, id read in Postgres, id read from the payload sent).
    let mut read: Vec<(String, Option<String>, Option<String>)> = keys
        .iter()
        .filter(|key| key.subscription_id().is_some() || key.payload().is_some())
        .map(|key| {
            let from_payload = key.payload().map(|payload| {
                let event: serde_json::Value = serde_json::from_str(payload).unwrap();
                event["SubscriptionChanged"]["subscription"]["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            });
            (
                key.aggregate_id().to_owned(),
                key.subscription_id().map(str::to_owned),
                from_payload,
            )
        })
        .collect();
    read.sort();
    let some = |id: &str| Some(id.to_owned());
    assert_eq!(
        read,
        [
            ("cus_a".to_owned(), some("sub_cus_a"), None),
            ("cus_escaped".to_owned(), None, some("sub_\"q")),
            ("cus_jsonb".to_owned(), None, some("sub_cus_a")),
            ("cus_view".to_owned(), None, some("sub_cus_a")),
        ]
    );
    assert!(
        keys.len() > read.len(),
        "the other events of cus_a come with neither"
    );
}

/// The batch appender writes beside each snapshot event the subscription it carries
/// (`snapshot_of`, NULL for the other events), and the key scan reads the id from there,
/// never from the payload: a row whose payload the scan could not read an id from (jsonb's
/// text, `view` first) comes with the column's id and no payload.
#[tokio::test]
async fn the_appender_writes_each_snapshots_subscription_and_the_key_scan_reads_it() {
    let pool = fresh_database().await;
    let mut known = HashMap::new();
    let commands = vec![snapshot("cus_a", "evt_1", 10, SubscriptionStatus::Active)];
    write_batch(&pool, &[("cus_a", commands)], &mut known).await;
    let written: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_type, snapshot_of FROM events WHERE aggregate_id = 'cus_a' ORDER BY sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let snapshots: Vec<_> = written
        .iter()
        .filter(|(event_type, _)| event_type == "SubscriptionChanged")
        .collect();
    assert_eq!(snapshots.len(), 1, "{written:?}");
    assert_eq!(snapshots[0].1.as_deref(), Some("sub_cus_a"));
    assert!(
        written.len() > 1
            && written
                .iter()
                .all(|(event_type, id)| event_type == "SubscriptionChanged" || id.is_none()),
        "{written:?}"
    );

    // The same snapshot with its `view` first, naming another subscription (where the
    // payload search would take that one's id), its column set.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, \
            metadata, snapshot_of) \
         SELECT 'Subscription', 'cus_column', 1, event_type, event_version, \
            json_build_object('SubscriptionChanged', json_build_object('view', \
                replace((payload->'SubscriptionChanged'->'view')::text, 'sub_cus_a', 'sub_in_view')::json, \
                'subscription', \
                payload->'SubscriptionChanged'->'subscription')), metadata, snapshot_of \
         FROM events WHERE aggregate_id = 'cus_a' AND event_type = 'SubscriptionChanged'",
    )
    .execute(&pool)
    .await
    .unwrap();

    let mut conn = pool.acquire().await.unwrap();
    let types = ["SubscriptionChanged", "SubscriptionReconciled"];
    let keys: Vec<_> = read::scan_keys(&mut conn, u64::MAX, &types)
        .try_collect()
        .await
        .unwrap();
    let mut read: Vec<(&str, Option<&str>, bool)> = keys
        .iter()
        .filter(|key| key.subscription_id().is_some() || key.payload().is_some())
        .map(|key| {
            (
                key.aggregate_id(),
                key.subscription_id(),
                key.payload().is_some(),
            )
        })
        .collect();
    read.sort();
    assert_eq!(
        read,
        [
            ("cus_a", Some("sub_cus_a"), false),
            ("cus_column", Some("sub_cus_a"), false),
        ]
    );
}
