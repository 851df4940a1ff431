//! Processing failures, injected for real (a trigger on the event log that refuses one
//! customer's events), are retried with backoff, dead-lettered after the configured
//! attempts with their last error, listed and re-driven by the CLI and the operator API.
//! And concurrent commands for one customer: conflicts are retried, nothing is lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aggregates::SubscriptionEvent;
use serde_json::Value;
use subledger::stripe::{parse_event, route, Route};

use crate::events::{sub_event, T0};
use crate::support::helpers::{spawn_app, spawn_with, test_settings, TestApp, TOKEN};
use crate::support::procs::{send_json, subledger_command, ADMIN_TOKEN};
use crate::support::stripe_sim::{simulate, SimEvent};

pub const REFUSE_POISON: &str = r#"
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.aggregate_id = 'cus_poison' THEN
    RAISE EXCEPTION 'injected fault: events of cus_poison refused';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"#;

/// Records every failed attempt at an inbox row as the row stood after it, with the time
/// of the transaction that recorded it (the `now()` its backoff counts from). The test
/// reads the backoff from this history rather than by catching the row between two
/// attempts: on a loaded machine the 2 s a row stays pending may pass unobserved.
const RECORD_FAILED_ATTEMPTS: &str = r#"
CREATE TABLE failed_attempts (event_id text, attempts int, state text, last_error text,
    next_attempt_at timestamptz, at timestamptz);
CREATE FUNCTION record_failed_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO failed_attempts
    VALUES (NEW.event_id, NEW.attempts, NEW.state, NEW.last_error, NEW.next_attempt_at, now());
  RETURN NEW;
END $$;
CREATE TRIGGER record_failed_attempt AFTER UPDATE ON inbox FOR EACH ROW
  WHEN (NEW.attempts > OLD.attempts AND NEW.last_error IS NOT NULL)
  EXECUTE FUNCTION record_failed_attempt();
"#;

/// The failed attempts at a row so far, in order: (attempts, state, last_error, seconds
/// from the attempt to the next one it scheduled, seconds from the first failed attempt).
async fn failed_attempts(
    app: &TestApp,
    event_id: &str,
) -> Vec<(i32, String, Option<String>, f64, f64)> {
    sqlx::query_as(
        "SELECT attempts, state, last_error, \
            extract(epoch FROM next_attempt_at - at)::float8, \
            extract(epoch FROM at - first_value(at) OVER (ORDER BY at, attempts))::float8 \
         FROM failed_attempts WHERE event_id = $1 ORDER BY at, attempts",
    )
    .bind(event_id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// (state, attempts) of an inbox row.
async fn attempt_row(app: &TestApp, event_id: &str) -> (String, i32) {
    sqlx::query_as("SELECT state, attempts FROM inbox WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Waits (generously: the machine may be loaded) until the row is in `state` after
/// `attempts` attempts.
async fn wait_for_state(app: &TestApp, event_id: &str, state: &str, attempts: i32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let row = attempt_row(app, event_id).await;
        if row.0 == state && row.1 == attempts {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{event_id}: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(command: std::process::Command) -> (bool, String, String) {
    let mut command = command;
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn failing_rows_back_off_dead_letter_and_are_re_driven() {
    let (mut settings, db_name, prefix) = test_settings("dlq");
    settings.max_attempts = 2;
    settings.admin_tokens = vec![ADMIN_TOKEN.to_owned().into()];
    let app = spawn_with(settings.clone(), db_name, prefix).await;
    sqlx::raw_sql(REFUSE_POISON)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::raw_sql(RECORD_FAILED_ATTEMPTS)
        .execute(&app.pool)
        .await
        .unwrap();

    let poison = |id, t, status| {
        sub_event(
            id,
            "customer.subscription.updated",
            T0 + t,
            "sub_poison",
            "cus_poison",
            status,
            "org_poison",
        )
    };
    assert_eq!(
        app.post_webhook(&poison("evt_poison1", 0, "active"))
            .await
            .status(),
        200
    );
    let fine = sub_event(
        "evt_fine",
        "customer.subscription.created",
        T0,
        "sub_fine",
        "cus_fine",
        "active",
        "org_fine",
    );
    assert_eq!(app.post_webhook(&fine).await.status(), 200);

    // Another customer is not held up by the failing one.
    wait_for_state(&app, "evt_fine", "done", 1).await;
    // The first failure: kept pending, its error recorded, due again 2 s later
    // (`inbox::work::RETRY`). The second (the configured maximum), no earlier than that:
    // dead-lettered, the error kept.
    wait_for_state(&app, "evt_poison1", "dead", 2).await;
    let attempts = failed_attempts(&app, "evt_poison1").await;
    let [(1, first_state, first_error, backoff, _), (2, second_state, second_error, _, retried_after)] =
        attempts.as_slice()
    else {
        panic!("{attempts:?}");
    };
    assert_eq!(first_state, "pending", "{attempts:?}");
    assert_eq!(*backoff, 2.0, "{attempts:?}");
    assert!(*retried_after >= 2.0, "{attempts:?}");
    assert_eq!(second_state, "dead", "{attempts:?}");
    for error in [first_error, second_error] {
        assert!(
            error.as_deref().unwrap_or("").contains("injected fault"),
            "{attempts:?}"
        );
    }
    let (_, outcome, _) = app.inbox_row("evt_poison1").await.unwrap();
    assert_eq!(outcome.as_deref(), Some("failed"));
    assert_eq!(
        app.post_webhook(&poison("evt_poison2", 10, "past_due"))
            .await
            .status(),
        200
    );
    wait_for_state(&app, "evt_poison2", "dead", 2).await;

    // The operator API needs the admin token, not the API token.
    let url = format!("{}/ops/dead-letters", app.address);
    for (token, status) in [
        (None, 401),
        (Some(TOKEN), 401),
        (Some("admin"), 401),
        (Some(ADMIN_TOKEN), 200),
    ] {
        let mut request = app.client.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.unwrap().status(), status, "{token:?}");
    }
    let listed = send_json(app.client.get(&url).bearer_auth(ADMIN_TOKEN)).await;
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["evt_poison1", "evt_poison2"]);
    assert!(listed[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("injected fault"));

    // `subledger dlq list`.
    let mut list = subledger_command(&settings);
    list.args(["dlq", "list"]);
    let (ok, stdout, stderr) = run(list).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("2 dead letters"), "{stderr}");
    assert!(
        stdout
            .lines()
            .next()
            .unwrap()
            .starts_with("evt_poison1\tcustomer.subscription.updated\tcus_poison\t2 attempts"),
        "{stdout}"
    );

    // Re-driving while the fault is still there fails again, and it stays dead-lettered
    // after its attempts, never silently dropped.
    let mut retry = subledger_command(&settings);
    retry.args(["dlq", "retry", "evt_poison1"]);
    let (ok, _, stderr) = run(retry).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("1 failed again"), "{stderr}");
    wait_for_state(&app, "evt_poison1", "dead", 2).await;

    // The fault is repaired: re-drive one by the CLI, the rest through the operator API.
    sqlx::raw_sql("DROP TRIGGER refuse_poison ON events")
        .execute(&app.pool)
        .await
        .unwrap();
    let mut retry = subledger_command(&settings);
    retry.args(["dlq", "retry", "evt_poison1"]);
    let (ok, stdout, stderr) = run(retry).await;
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "evt_poison1\tdone\tapplied", "{stderr}");
    let redriven = send_json(
        app.client
            .post(format!("{}/ops/dead-letters/retry", app.address))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(redriven["requeued"], serde_json::json!(["evt_poison2"]));
    app.settle().await;
    assert_eq!(
        app.inbox_row("evt_poison2").await.unwrap().1.as_deref(),
        Some("applied")
    );
    let info = app.get_json("/v1/customers/cus_poison/subscription").await;
    assert_eq!(info["status"], "past_due");

    // Nothing left; naming a row that is not dead-lettered is an error, not a no-op.
    let missing = app
        .client
        .post(format!(
            "{}/ops/dead-letters/evt_poison1/retry",
            app.address
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let mut retry = subledger_command(&settings);
    retry.args(["dlq", "retry", "evt_nope"]);
    let (ok, _, stderr) = run(retry).await;
    assert!(
        !ok && stderr.contains("evt_nope is not a dead letter"),
        "{stderr}"
    );
    let mut retry_all = subledger_command(&settings);
    retry_all.args(["dlq", "retry", "--all"]);
    let (ok, _, stderr) = run(retry_all).await;
    assert!(
        ok && stderr.contains("re-queued 0 dead letters"),
        "{stderr}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_for_one_customer_retry_conflicts_and_lose_nothing() {
    let app = spawn_app("conflicts").await;
    let sim = simulate(99, 1, 1_760_000_000);
    let truth = &sim.truth[0];
    // Every event twice (as Stripe retries), all released at the same moment.
    let events: Vec<SimEvent> = sim
        .events
        .iter()
        .chain(sim.events.iter())
        .cloned()
        .collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(events.len()));
    let mut tasks = Vec::new();
    for event in events {
        let (ledger, barrier) = (app.services.ledger.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let parsed = parse_event(&event.to_bytes()).unwrap();
            let Route::Command {
                customer_id,
                command,
            } = route(&parsed)
            else {
                return 0;
            };
            barrier.wait().await;
            let (decision, _) = ledger
                .execute(&customer_id, &command, &event.id)
                .await
                .expect("no conflict is given up on");
            decision.events.len()
        }));
    }
    let mut committed = 0;
    for task in tasks {
        committed += task.await.unwrap();
    }
    let retried = app
        .services
        .ledger
        .conflicts_retried
        .load(Ordering::Relaxed);
    eprintln!(
        "{} commands, {committed} events committed, {retried} conflicts retried",
        sim.events.len() * 2
    );
    assert!(retried > 0, "the commands did race");

    // Every event a decision committed is in the log, and the last one holds Stripe's newest facts.
    let logged: Vec<Value> = sqlx::query_scalar(
        "SELECT payload::jsonb FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(&truth.customer_id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(logged.len(), committed);
    let last: SubscriptionEvent = serde_json::from_value(logged.last().unwrap().clone()).unwrap();
    let sub = last.view().subscription.clone().unwrap();
    assert_eq!(sub.status.as_str(), truth.status);
    assert_eq!(
        sub.current_period_end.map(|d| d.timestamp()),
        Some(truth.current_period_end)
    );
    app.stop().await;
}

/// What reads the queue's depth (`/readyz`, `/metrics`), the dead-letter list and the
/// retention's batches walk only their partial indexes (`inbox_pending`, `inbox_dead`,
/// `inbox_prunable`), in every plan Postgres may cache, never the rows the inbox keeps
/// for good: asked for under a generic plan (what a prepared statement may be given after
/// a few runs, where a parameter for the state could not match an index's predicate), with
/// sequential scans off so that a plan that could use no index says so.
#[tokio::test]
async fn the_queue_and_the_dead_letters_are_read_through_their_own_indexes() {
    let app = spawn_app("depth_plans").await;
    let mut tx = app.pool.begin().await.unwrap();
    for setting in [
        "SET LOCAL plan_cache_mode = force_generic_plan",
        "SET LOCAL enable_seqscan = off",
    ] {
        sqlx::query(setting).execute(&mut *tx).await.unwrap();
    }
    let explain = |sql: &str| format!("EXPLAIN (FORMAT JSON) {sql}");
    let depth: Value = sqlx::query_scalar(&explain(subledger::inbox::read::DEPTH))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let listed: Value = sqlx::query_scalar(&explain(subledger::inbox::dead_letters::DEAD_LETTERS))
        .bind(Some(10_i64))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let pruned: Value = sqlx::query_scalar(&explain(subledger::inbox::retention::PRUNE))
        .bind(3600.0_f64)
        .bind(500_i64)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let (depth, listed, pruned) = (depth.to_string(), listed.to_string(), pruned.to_string());
    for index in ["inbox_pending", "inbox_dead"] {
        assert!(
            depth.contains(&format!(r#""Index Name":"{index}""#)),
            "{index}: {depth}"
        );
    }
    assert!(listed.contains(r#""Index Name":"inbox_dead""#), "{listed}");
    assert!(
        pruned.contains(r#""Index Name":"inbox_prunable""#),
        "{pruned}"
    );
    for plan in [&depth, &listed, &pruned] {
        assert!(!plan.contains(r#""Node Type":"Seq Scan""#), "{plan}");
    }
    app.stop().await;
}

/// A worker's transaction marks its batch done through the inbox's key, whatever plan a
/// connection made while the inbox was nearly empty: here a handful of rows, never
/// analyzed, and the generic plan a connection keeps. Without the batch's planner settings
/// (`inbox::work::BATCH_PLANS`, set by the claim) that plan is a hash join over a
/// sequential scan of the whole inbox, every batch, as the inbox grows.
#[tokio::test]
async fn a_batch_is_marked_done_through_the_inbox_key_whatever_the_statistics() {
    let app = spawn_app("mark_done_plan").await;
    for n in 0..10 {
        let event = sub_event(
            &format!("evt_plan_{n}"),
            "customer.subscription.created",
            T0,
            &format!("sub_plan_{n}"),
            &format!("cus_plan_{n}"),
            "active",
            "org_plan",
        );
        assert_eq!(app.post_webhook(&event).await.status(), 200);
    }
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query(subledger::inbox::work::BATCH_PLANS)
        .execute(&mut *tx)
        .await
        .unwrap();
    // A plan for any parameters (PREPARE, then EXPLAIN EXECUTE), as a connection keeps it:
    // an EXPLAIN sent with bound parameters plans for their values instead.
    sqlx::raw_sql(&format!(
        "SET LOCAL plan_cache_mode = force_generic_plan; \
         PREPARE mark_done_plan(text[], text[], text[], text) AS {}",
        subledger::inbox::work::MARK_DONE
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    let plan: Value = sqlx::query_scalar(
        "EXPLAIN (FORMAT JSON) EXECUTE mark_done_plan('{evt_plan_1}', '{applied}', '{NULL}', 'done')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let plan = plan.to_string();
    assert!(plan.contains(r#""Index Name":"inbox_pkey""#), "{plan}");
    assert!(!plan.contains(r#""Node Type":"Seq Scan""#), "{plan}");
    app.stop().await;
}
