//! Crash safety and many replicas, with the real `subledger serve` binary: SIGKILL during
//! a shuffled load (resending only what was never acknowledged), and three replicas on one
//! Postgres and one Redis sharing a load. Both must end where an in-order run does; the
//! replicas must never process one inbox row twice; no log line may hold a secret.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use rand_like::Lcg;
use serde_json::Value;
use sqlx::PgPool;

use crate::support::helpers::{settle, spawn_app, test_settings, SERVED_PROJECTIONS};
use crate::support::procs::{
    answers, assert_no_secret, post_all, scratch, serve_command, Served, DB_PASSWORD,
};
use crate::support::stripe_sim::{shuffle_with_duplicates, simulate, SimEvent};

const START: i64 = 1_760_000_000;

/// What an in-order delivery to a fresh in-process app answers for every customer.
async fn in_order_answers(events: &[SimEvent], customers: &[String]) -> BTreeMap<String, Value> {
    let app = spawn_app("inorder").await;
    let bodies: Vec<Vec<u8>> = events.iter().map(SimEvent::to_bytes).collect();
    for body in &bodies {
        assert_eq!(app.post_webhook(body).await.status(), 200);
    }
    app.settle().await;
    let expected = answers(&app.address, customers).await;
    app.stop().await;
    expected
}

/// Settings for processes on a fresh database, reached with a password (the test server
/// trusts local connections and ignores it) so the logs can be checked for it.
fn process_settings(tag: &str) -> (subledger::Settings, String) {
    let (mut settings, db_name, _) = test_settings(tag);
    let url = secrecy::ExposeSecret::expose_secret(&settings.database_url).replacen(
        "://postgres@",
        &format!("://postgres:{DB_PASSWORD}@"),
        1,
    );
    assert!(
        url.contains(DB_PASSWORD),
        "DATABASE_URL has the expected shape"
    );
    settings.database_url = url.into();
    (settings, db_name)
}

async fn no_failures(pool: &PgPool) {
    let bad: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT event_id, state, last_error FROM inbox WHERE state <> 'done' OR outcome = 'failed'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(bad.is_empty(), "{bad:?}");
}

#[tokio::test]
async fn sigkill_during_a_shuffled_load_loses_nothing_acknowledged() {
    let sim = simulate(4242, 24, START);
    let customers: Vec<String> = sim.truth.iter().map(|t| t.customer_id.clone()).collect();
    let shuffled = shuffle_with_duplicates(&sim.events, 7, 0.2);
    let expected = in_order_answers(&sim.events, &customers).await;

    let (settings, db_name) = process_settings("crash");
    let dir = scratch("crash");
    let log = dir.join("serve.log");
    let mut pending: Vec<Vec<u8>> = shuffled.iter().map(SimEvent::to_bytes).collect();
    let total = pending.len();
    let mut rng = Lcg(0x5eed);
    let mut kills = 0;
    let mut killed_mid_load = 0;
    let mut lost_answers = 0;
    // Each round: start, send what was never acknowledged, SIGKILL at a random moment
    // (mid-request, mid-command or mid-projection), then send again what got no 2xx.
    for round in 0..8 {
        let mut serve = Served::start(serve_command(&settings), &log).await;
        let addresses = [serve.address.clone()];
        let kill_after = Duration::from_millis(20 + rng.below(380));
        let acked = {
            let sending = post_all(&addresses, &pending, 8);
            tokio::pin!(sending);
            tokio::select! {
            acked = &mut sending => {
                // Everything was sent before the kill: kill while it is still processing.
                tokio::time::sleep(Duration::from_millis(rng.below(100))).await;
                acked
            }
            _ = tokio::time::sleep(kill_after) => {
                serve.kill();
                killed_mid_load += 1;
                sending.await
            }
            }
        };
        serve.kill();
        kills += 1;
        lost_answers += pending.len() - acked.len();
        let acked: BTreeSet<usize> = acked.into_iter().collect();
        pending = pending
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !acked.contains(i))
            .map(|(_, body)| body)
            .collect();
        eprintln!(
            "round {round}: killed after {kill_after:?}; {} unacknowledged",
            pending.len()
        );
    }
    // The last start: the inbox drains, projections catch up from their checkpoints, and
    // whatever was never acknowledged is sent once more.
    let serve = Served::start(serve_command(&settings), &log).await;
    let acked = post_all(std::slice::from_ref(&serve.address), &pending, 8).await;
    assert_eq!(acked.len(), pending.len());
    let pool = PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap();
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(60)).await;
    eprintln!(
        "{total} deliveries, {kills} SIGKILLs ({killed_mid_load} while sending), \
         {lost_answers} deliveries resent"
    );
    assert!(killed_mid_load > 0, "no kill landed during the load");

    assert_eq!(answers(&serve.address, &customers).await, expected);
    no_failures(&pool).await;
    drop(serve);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert_no_secret("the log", &logs);
    std::fs::remove_dir_all(&dir).ok();
}

/// Event ids each process logged as processed, counted across processes.
fn processed_counts(logs: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for text in logs {
        for line in text.lines() {
            let Ok(line) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if line["fields"]["message"] == "webhook processed" {
                // The event id is a field of the `webhook` span the line is logged in.
                let id = line["span"]["event_id"].as_str().unwrap().to_owned();
                *counts.entry(id).or_insert(0) += 1;
            }
        }
    }
    counts
}

#[tokio::test]
async fn three_replicas_share_a_load_and_converge_like_one() {
    let sim = simulate(31337, 16, START);
    let customers: Vec<String> = sim.truth.iter().map(|t| t.customer_id.clone()).collect();
    let shuffled = shuffle_with_duplicates(&sim.events, 11, 0.25);
    let expected = in_order_answers(&sim.events, &customers).await;

    let (settings, db_name) = process_settings("replicas");
    let dir = scratch("replicas");
    // Start one first, so that only one creates the database and migrates.
    let logs: Vec<_> = (0..3).map(|i| dir.join(format!("serve-{i}.log"))).collect();
    let mut replicas = vec![Served::start(serve_command(&settings), &logs[0]).await];
    for log in &logs[1..] {
        replicas.push(Served::start(serve_command(&settings), log).await);
    }
    let addresses: Vec<String> = replicas.iter().map(|r| r.address.clone()).collect();
    // Round-robin: one customer's events reach different replicas at the same moment.
    let bodies: Vec<Vec<u8>> = shuffled.iter().map(SimEvent::to_bytes).collect();
    let acked = post_all(&addresses, &bodies, 12).await;
    assert_eq!(acked.len(), bodies.len());
    let pool = PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap();
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(60)).await;

    for address in &addresses {
        assert_eq!(answers(address, &customers).await, expected, "{address}");
    }
    no_failures(&pool).await;
    drop(replicas);

    // Every row the workers took was processed exactly once, by one replica.
    let texts: Vec<String> = logs
        .iter()
        .map(|log| std::fs::read_to_string(log).unwrap())
        .collect();
    let counts = processed_counts(&texts);
    let worked: Vec<String> = sqlx::query_scalar("SELECT event_id FROM inbox WHERE attempts > 0")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(!worked.is_empty());
    for event_id in &worked {
        assert_eq!(counts.get(event_id), Some(&1), "{event_id}");
    }
    assert_eq!(counts.len(), worked.len());
    let per_replica: Vec<usize> = texts
        .iter()
        .map(|text| processed_counts(std::slice::from_ref(text)).len())
        .collect();
    eprintln!("rows processed per replica: {per_replica:?}");
    assert!(
        per_replica.iter().filter(|n| **n > 0).count() >= 2,
        "{per_replica:?}"
    );
    for text in &texts {
        assert_no_secret("a replica's log", text);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A tiny deterministic generator, to keep the dependency tree lean.
mod rand_like {
    pub struct Lcg(pub u64);

    impl Lcg {
        pub fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }
}

/// Whether transparent huge pages are on for the process `pid` (`THP_enabled` in its
/// `/proc` status: 0 once `prctl(PR_SET_THP_DISABLE)` turned them off).
fn huge_pages_enabled(pid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| panic!("no THP_enabled in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The service turns transparent huge pages off for itself (mimalloc's purged spans were
/// faulted back in as whole zeroed 2 MiB pages, `main.rs`), unless `MIMALLOC_ALLOW_THP`
/// is set, which mimalloc obeys: 1 leaves them as the process found them.
#[tokio::test]
async fn the_service_runs_without_transparent_huge_pages_unless_told() {
    let (settings, _) = process_settings("hugepages");
    let log = scratch("hugepages").join("serve.log");
    let served = Served::start(serve_command(&settings), &log).await;
    assert_eq!(huge_pages_enabled(&served.pid().to_string()), "0");
    drop(served);
    let mut command = serve_command(&settings);
    command.env("MIMALLOC_ALLOW_THP", "1");
    let served = Served::start(command, &log).await;
    assert_eq!(
        huge_pages_enabled(&served.pid().to_string()),
        huge_pages_enabled("self")
    );
}
