//! The projection runner over any number of projections: one that fails drops out and
//! goes on alone without holding the others back, comes back when it recovers, a replay
//! rebuilds every one of them, and a request can wait for its events to be applied. A
//! third projection (kept in memory) stands beside the service's two; real Postgres and
//! Redis, no HTTP.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aggregates::{Fact, FactSource, OwnerFacts, StripeFacts, SubscriptionCommand};

use projections::{
    Events, EventualProjection, Member, PlatformTables, ProjectionError, Projections,
    TransactionalProjection, WhenBusy,
};
use subledger::Services;

use crate::support::helpers::{catch_up_fully, test_settings};
use crate::support::stripe_sim::{shuffle_with_duplicates, simulate};

/// An eventual projection in memory (each customer's newest version) that fails on demand,
/// as the Redis cache does when Redis is down: `down` fails its batches, `unreachable` its
/// preparation for a rebuild too (which clears it).
#[derive(Clone, Default)]
struct Flaky {
    down: Arc<AtomicBool>,
    unreachable: Arc<AtomicBool>,
    versions: Arc<Mutex<BTreeMap<String, u64>>>,
}

fn failure() -> ProjectionError {
    redis::RedisError::from((redis::ErrorKind::IoError, "down for the test")).into()
}

impl EventualProjection for Flaky {
    const NAME: &'static str = "test_flaky";

    async fn apply(&self, events: &Events<'_>) -> Result<(), ProjectionError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(failure());
        }
        let mut versions = self.versions.lock().unwrap();
        for event in events.iter() {
            let held = versions.entry(event.aggregate_id.clone()).or_default();
            *held = (*held).max(event.sequence);
        }
        Ok(())
    }

    async fn begin_rebuild(&self) -> Result<(), ProjectionError> {
        if self.unreachable.load(Ordering::Relaxed) {
            return Err(failure());
        }
        self.versions.lock().unwrap().clear();
        Ok(())
    }
}

/// A service whose log holds a simulated account's events (nothing projected yet), the
/// runner over its tables and `flaky`, and each customer's version in the log.
async fn logged(tag: &str, flaky: &Flaky) -> (Services, Projections, BTreeMap<String, u64>) {
    logged_beside(tag, |_| flaky.clone()).await
}

/// [`logged`], with the eventual projection `beside` makes (given the service's pool).
async fn logged_beside<P: EventualProjection>(
    tag: &str,
    beside: impl FnOnce(&sqlx::PgPool) -> P,
) -> (Services, Projections, BTreeMap<String, u64>) {
    let (settings, _, _) = test_settings(tag);
    let services = Services::connect(settings).await.unwrap();
    let sim = simulate(53, 9, 1_760_000_000);
    let lines: Vec<String> = shuffle_with_duplicates(&sim.events, 13, 0.1)
        .iter()
        .map(|event| event.body.to_string())
        .collect();
    subledger::import::import(&services.pool, &lines.join("\n"), |_, _| {})
        .await
        .unwrap();
    services.worker.drain().await.unwrap();
    let runner = Projections::new(
        services.pool.clone(),
        [
            Member::transactional(PlatformTables::new(services.catalog.clone())),
            Member::eventual(beside(&services.pool)),
        ],
    );
    let versions: Vec<(String, i64)> =
        sqlx::query_as("SELECT aggregate_id, max(sequence) FROM events GROUP BY aggregate_id")
            .fetch_all(&services.pool)
            .await
            .unwrap();
    let versions = versions
        .into_iter()
        .map(|(customer, version)| (customer, version as u64))
        .collect();
    (services, runner, versions)
}

async fn lag(runner: &Projections, name: &str) -> i64 {
    runner.lag(name).await.unwrap()
}

/// Catches up in batches of 7 until nothing lags.
async fn catch_up(runner: &Projections) -> Result<(), ProjectionError> {
    catch_up_fully(runner, 7).await.map(drop)
}

#[tokio::test]
async fn a_failing_projection_goes_on_alone_and_never_holds_the_others_back() {
    let flaky = Flaky::default();
    let (services, runner, versions) = logged("runnerfail", &flaky).await;
    let tables = PlatformTables::NAME;
    let events = services.projections.lag(tables).await.unwrap();
    assert!(events > 7, "several batches");

    flaky.down.store(true, Ordering::Relaxed);
    let mut failures = 0;
    while lag(&runner, tables).await > 0 {
        if runner.catch_up(7, WhenBusy::Wait, |_, _| {}).await.is_err() {
            failures += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The tables went on without it to the end of the log; its failure was reported.
    assert!(failures > 0);
    assert_eq!(
        lag(&runner, Flaky::NAME).await,
        events,
        "the failing one stayed"
    );
    assert!(flaky.versions.lock().unwrap().is_empty());

    // It recovers: it catches up alone, then goes with the others again.
    flaky.down.store(false, Ordering::Relaxed);
    catch_up(&runner).await.unwrap();
    assert_eq!(*flaky.versions.lock().unwrap(), versions);
    let subscriptions: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions")
        .fetch_one(&services.pool)
        .await
        .unwrap();
    assert_eq!(subscriptions as usize, versions.len());
}

#[tokio::test]
async fn a_replay_rebuilds_every_projection_and_one_that_fails_is_caught_up_after() {
    let flaky = Flaky::default();
    let (services, runner, versions) = logged("runnerreplay", &flaky).await;
    let tables = PlatformTables::NAME;
    catch_up(&runner).await.unwrap();
    let read_tables = || read_tables(&services.pool);
    let live = read_tables().await;

    // Unreachable: nothing is cleared, the replay fails.
    flaky.down.store(true, Ordering::Relaxed);
    flaky.unreachable.store(true, Ordering::Relaxed);
    assert!(runner.replay(7, |_| {}, |_, _| {}).await.is_err());
    assert_eq!(
        *flaky.versions.lock().unwrap(),
        versions,
        "nothing was cleared"
    );

    // Cleared, then failing while the log is applied: it drops out, the tables are
    // rebuilt without it, the failure is reported, and it stays at position 0.
    flaky.unreachable.store(false, Ordering::Relaxed);
    assert!(runner.replay(7, |_| {}, |_, _| {}).await.is_err());
    while lag(&runner, tables).await > 0 {
        let _ = runner.catch_up(7, WhenBusy::Wait, |_, _| {}).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(read_tables().await, live);
    assert!(flaky.versions.lock().unwrap().is_empty());
    let events = lag(&runner, Flaky::NAME).await;
    assert_eq!(events, versions.values().sum::<u64>() as i64);

    // Up: everything is rebuilt together, the third projection with the others.
    flaky.down.store(false, Ordering::Relaxed);
    let mut seen = Vec::new();
    let done = runner
        .replay(7, |_| {}, |name, n| seen.push((name.to_owned(), n)))
        .await
        .unwrap();
    assert_eq!(
        done.iter().map(|d| d.name).collect::<Vec<_>>(),
        runner.names().collect::<Vec<_>>()
    );
    assert!(seen.iter().any(|(name, _)| name == Flaky::NAME), "{seen:?}");
    catch_up(&runner).await.unwrap();
    assert_eq!(*flaky.versions.lock().unwrap(), versions);
    assert_eq!(read_tables().await, live);
}

/// The platform tables as a reader finds them (all but `updated_at`), in a stable order.
async fn read_tables(pool: &sqlx::PgPool) -> Vec<serde_json::Value> {
    let mut rows: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT to_jsonb(s) - 'updated_at' FROM subscriptions s ORDER BY customer_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.extend(
        sqlx::query_scalar::<_, serde_json::Value>(
            "SELECT to_jsonb(m) - 'updated_at' FROM merchant_subscriptions m \
             ORDER BY subscription_id",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
    );
    rows
}

/// An eventual projection that writes nothing: each chunk a rebuild gives it, it reads the
/// platform tables on a connection of its own, as a reader would meanwhile.
#[derive(Clone)]
struct Reader {
    pool: sqlx::PgPool,
    seen: Arc<Mutex<Vec<Vec<serde_json::Value>>>>,
}

impl EventualProjection for Reader {
    const NAME: &'static str = "test_reader";

    async fn apply(&self, _: &Events<'_>) -> Result<(), ProjectionError> {
        Ok(())
    }

    async fn apply_rebuilding(&self, _: &Events<'_>) -> Result<(), ProjectionError> {
        let tables = read_tables(&self.pool).await;
        self.seen.lock().unwrap().push(tables);
        Ok(())
    }

    async fn begin_rebuild(&self) -> Result<(), ProjectionError> {
        Ok(())
    }
}

/// A replay clears the tables in the transaction that rebuilds them: a reader meanwhile
/// finds every row as it was (never an empty table, which reads as a customer never
/// seen), then the rebuilt ones.
#[tokio::test]
async fn while_a_replay_rebuilds_the_tables_readers_find_them_as_they_were() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (services, runner, _) = logged_beside("runnerreaders", |pool| Reader {
        pool: pool.clone(),
        seen: seen.clone(),
    })
    .await;
    catch_up(&runner).await.unwrap();
    let live = read_tables(&services.pool).await;
    assert!(!live.is_empty());
    runner.replay(7, |_| {}, |_, _| {}).await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(!seen.is_empty(), "the rebuild gave the reader its chunks");
    for tables in &seen {
        assert_eq!(tables, &live, "a reader during the rebuild");
    }
    assert_eq!(read_tables(&services.pool).await, live, "after it");
}

/// A replay rebuilds the tables over the rows it finds: a row it finds as it would write
/// it is not written again, nor even locked (its `xmin` and `xmax` stay as they were; an
/// `ON CONFLICT … DO UPDATE … WHERE` locks each row it finds, even one its `WHERE` then
/// leaves), one of the same version that differs (an answer of another catalogue or
/// shape) is written again, and the rows of a customer the log holds nothing of are
/// deleted, from both tables.
#[tokio::test]
async fn a_replay_rewrites_what_differs_and_forgets_what_the_log_does_not_hold() {
    let flaky = Flaky::default();
    let (services, runner, _) = logged("runnerrewrite", &flaky).await;
    let pool = &services.pool;
    catch_up(&runner).await.unwrap();
    let live = read_tables(pool).await;
    let customers: Vec<String> =
        sqlx::query_scalar("SELECT customer_id FROM subscriptions ORDER BY customer_id LIMIT 2")
            .fetch_all(pool)
            .await
            .unwrap();
    let (changed, untouched) = (&customers[0], &customers[1]);
    // Each row's transaction stamps, in both tables.
    let stamps = |customer: String| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(stamp, ' ' ORDER BY stamp) FROM ( \
                SELECT 's ' || xmin::text || ' ' || xmax::text AS stamp FROM subscriptions \
                WHERE customer_id = $1 \
                UNION ALL SELECT 'm ' || subscription_id || ' ' || xmin::text || ' ' || xmax::text \
                FROM merchant_subscriptions WHERE customer_id = $1) AS rows",
        )
        .bind(customer)
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let untouched_at = stamps(untouched.clone()).await;
    assert!(
        untouched_at.contains("m "),
        "{untouched} has a mirrored subscription"
    );
    for statement in [
        "UPDATE subscriptions SET status = 'other', \
            info = json_build_object('customer_id', customer_id, 'status', 'other') \
         WHERE customer_id = $1",
        "UPDATE merchant_subscriptions SET status = 'other' WHERE customer_id = $1",
        "INSERT INTO subscriptions (customer_id, status, info, version, updated_at) \
         VALUES ($1 || '_unlogged', 'active', '{}', 1, now())",
        "INSERT INTO merchant_subscriptions (subscription_id, customer_id, status, \
            cancel_at_period_end, stripe_event_id, stripe_created, version) \
         VALUES ('sub_unlogged', $1 || '_unlogged', 'active', false, 'evt_unlogged', now(), 1)",
    ] {
        sqlx::query(statement)
            .bind(changed)
            .execute(pool)
            .await
            .unwrap();
    }
    assert_ne!(read_tables(pool).await, live);

    runner.replay(7, |_| {}, |_, _| {}).await.unwrap();
    assert_eq!(read_tables(pool).await, live);
    assert_eq!(
        stamps(untouched.clone()).await,
        untouched_at,
        "neither written again nor locked"
    );
}

/// Records that `customer_id` belongs to `org_id` (as the checkout does) and returns the
/// customer's version after it.
async fn record_owner(services: &Services, customer_id: &str, org_id: &str) -> u64 {
    let source = format!("api_test_{customer_id}_{org_id}");
    let command = SubscriptionCommand::RecordStripeFacts(StripeFacts {
        customer_id: customer_id.to_owned(),
        source: FactSource {
            stripe_event_id: source.clone(),
            stripe_event_type: "api.customer.create".to_owned(),
            created: chrono::Utc::now(),
        },
        owner: OwnerFacts {
            org_id: Some(org_id.to_owned()),
            user_id: None,
            account: None,
        },
        fact: Fact::OwnerOnly,
    });
    let (_, decided) = services
        .ledger
        .execute(customer_id, &command, &source)
        .await
        .unwrap();
    let version: i64 =
        sqlx::query_scalar("SELECT max(sequence) FROM events WHERE aggregate_id = $1")
            .bind(customer_id)
            .fetch_one(&services.pool)
            .await
            .unwrap();
    assert_eq!(
        decided.version, version as u64,
        "the version the command left"
    );
    decided.version
}

#[tokio::test]
async fn a_request_waits_until_the_projections_applied_its_events_and_no_longer() {
    let (settings, _, _) = test_settings("runnerwait");
    let services = Services::connect(settings).await.unwrap();
    let version = record_owner(&services, "cus_w", "org_w").await;

    // Nothing runs the projections: the wait ends at its deadline, unfulfilled.
    let projections = &services.projections;
    let started = std::time::Instant::now();
    let applied = projections
        .wait_until_applied("cus_w", version, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(!applied);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // The runner runs (polling only every hour, far beyond the waits' deadlines, so a
    // wait fulfilled in time was not served by a poll): the wait asks it for a pass, is
    // woken by it, and ends once the tables and the cache hold the version.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn({
        let projections = projections.clone();
        async move {
            projections
                .run(
                    100,
                    Arc::new(tokio::sync::Notify::new()),
                    Duration::from_secs(3600),
                    stopped,
                    |error| panic!("{error}"),
                )
                .await
        }
    });
    let applied = projections
        .wait_until_applied("cus_w", version, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(applied, "not the hour's poll");
    let table = PlatformTables::customer(&services.pool, "cus_w")
        .await
        .unwrap()
        .expect("the tables hold the customer");
    assert_eq!(
        (table.version, table.org_id.as_deref()),
        (version, Some("org_w"))
    );
    let cached = services
        .cache
        .customer("cus_w")
        .await
        .unwrap()
        .expect("cached");
    assert_eq!(cached.version, version);

    // Another write: the runner is woken by the wait (not by its hour's poll).
    let version = record_owner(&services, "cus_w", "org_w2").await;
    assert!(
        projections
            .wait_until_applied("cus_w", version, Duration::from_secs(60))
            .await
            .unwrap(),
        "not the hour's poll"
    );
    let cached = services
        .cache
        .customer("cus_w")
        .await
        .unwrap()
        .expect("cached");
    assert_eq!(cached.org_id.as_deref(), Some("org_w2"));

    stop.send_replace(true);
    runner.await.unwrap();
    services.cache.clear_all().await.unwrap();
}
