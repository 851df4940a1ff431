//! Inbox retention (issue 13): processed rows past the retention age lose their raw
//! payload in small batches; the rows stay (a redelivery is still a duplicate), dead
//! letters and the log keep everything, `inspect` says when a payload went, and ingestion
//! goes on while a prune batch holds its rows.

use std::time::Duration;

use sqlx::Row;
use subledger::inbox::retention::{prune, prune_batch};

use crate::dead_letters::REFUSE_POISON;
use crate::events::{sub_event, T0};
use crate::support::helpers::{spawn_with, test_settings, TestApp};
use crate::support::procs::subledger_command;

const MONTH: Duration = Duration::from_secs(30 * 86_400);

/// (payload kept, pruned at set) of an inbox row.
async fn payload_of(app: &TestApp, event_id: &str) -> (bool, bool) {
    let row = sqlx::query(
        "SELECT payload IS NOT NULL AS kept, payload_pruned_at IS NOT NULL AS pruned \
         FROM inbox WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    (row.get("kept"), row.get("pruned"))
}

async fn wait_for(app: &TestApp, event_id: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let row = app.inbox_row(event_id).await;
        if row.as_ref().is_some_and(|(s, _, _)| s == state) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{event_id}: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pretends every row was processed `days` ago (the pruner's only clock).
async fn age_all(app: &TestApp, days: i32) {
    sqlx::query("UPDATE inbox SET processed_at = now() - make_interval(days => $1)")
        .bind(days)
        .execute(&app.pool)
        .await
        .unwrap();
}

// Payloads: tests/integration/events.rs (basil-shaped subscription events, fields from
// stripe/openapi spec3 `subscription`).
#[tokio::test]
async fn processed_payloads_past_retention_are_dropped_dead_letters_and_the_log_kept() {
    let (mut settings, db_name, prefix) = test_settings("retention");
    settings.max_attempts = 1;
    let app = spawn_with(settings.clone(), db_name, prefix).await;
    sqlx::raw_sql(REFUSE_POISON)
        .execute(&app.pool)
        .await
        .unwrap();

    let fine = |id: &str, t: i64, status: &str| {
        sub_event(
            id,
            "customer.subscription.updated",
            T0 + t,
            "sub_kept",
            "cus_kept",
            status,
            "org_kept",
        )
    };
    for (id, t, status) in [("evt_r1", 0, "trialing"), ("evt_r2", 10, "active")] {
        assert_eq!(app.post_webhook(&fine(id, t, status)).await.status(), 200);
        wait_for(&app, id, "done").await;
    }
    let poison = sub_event(
        "evt_rdead",
        "customer.subscription.updated",
        T0,
        "sub_poison",
        "cus_poison",
        "active",
        "org_poison",
    );
    assert_eq!(app.post_webhook(&poison).await.status(), 200);
    wait_for(&app, "evt_rdead", "dead").await;
    app.settle().await;
    let events_before = app.count("SELECT count(*) FROM events").await;

    // Nothing is young enough to go yet.
    assert_eq!(prune(&app.pool, MONTH).await.unwrap(), 0);
    // A month and a bit later: the processed rows lose their payload, the dead letter
    // keeps it (the test ages it too, so only its state protects it).
    age_all(&app, 31).await;
    // `subledger prune`, as an operator would run it (`serve` does the same every 10 min).
    let mut command = subledger_command(&settings);
    command.args(["prune", "--older-than-hours", "720"]);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("2 inbox payloads dropped"), "{stderr}");
    assert_eq!(payload_of(&app, "evt_r1").await, (false, true));
    assert_eq!(payload_of(&app, "evt_r2").await, (false, true));
    assert_eq!(payload_of(&app, "evt_rdead").await, (true, false));
    assert_eq!(prune(&app.pool, MONTH).await.unwrap(), 0, "already pruned");
    // The table refuses a pruned payload on a row that is not processed.
    let refused = sqlx::query("UPDATE inbox SET payload = NULL WHERE event_id = 'evt_rdead'")
        .execute(&app.pool)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("inbox_payload_kept"),
        "{refused}"
    );

    // The log is never pruned, and the answer is unchanged.
    assert_eq!(
        app.count("SELECT count(*) FROM events").await,
        events_before
    );
    let answer = app.get_json("/v1/customers/cus_kept/subscription").await;
    assert_eq!(answer["status"], "active");

    // A redelivery of a pruned event is still recognised at the door: nothing new.
    assert_eq!(
        app.post_webhook(&fine("evt_r2", 10, "active"))
            .await
            .status(),
        200
    );
    app.settle().await;
    assert_eq!(
        app.count("SELECT count(*) FROM events").await,
        events_before
    );
    assert_eq!(payload_of(&app, "evt_r2").await, (false, true));

    // `inspect` says which payloads went, and when.
    let report = subledger::inspect::inspect(
        &app.pool,
        &app.services.cache,
        &app.services.catalog,
        "cus_kept",
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    assert!(report
        .inbox
        .iter()
        .all(|row| row.payload_pruned_at.is_some()));
    let text = subledger::inspect::render_text(&report);
    assert_eq!(text.matches("payload pruned ").count(), 2, "{text}");

    // The dead letter, re-driven once the fault is gone, is processed from its payload.
    sqlx::raw_sql("DROP TRIGGER refuse_poison ON events")
        .execute(&app.pool)
        .await
        .unwrap();
    let requeued = subledger::inbox::redrive(&app.pool, &subledger::inbox::Redrive::All)
        .await
        .unwrap();
    assert_eq!(requeued, ["evt_rdead"]);
    wait_for(&app, "evt_rdead", "done").await;
    assert_eq!(
        app.inbox_row("evt_rdead").await.unwrap().1.as_deref(),
        Some("applied")
    );
    app.stop().await;
}

// Payloads: tests/integration/events.rs, as above.
#[tokio::test]
async fn ingestion_goes_on_while_a_prune_batch_holds_its_rows() {
    let (settings, db_name, prefix) = test_settings("retention_live");
    let app = spawn_with(settings, db_name, prefix).await;
    let event = |id: &str, t: i64, customer: &str, status: &str| {
        sub_event(
            id,
            "customer.subscription.updated",
            T0 + t,
            &format!("sub_{customer}"),
            customer,
            status,
            &format!("org_{customer}"),
        )
    };
    for (i, customer) in ["cus_old1", "cus_old2", "cus_live"].iter().enumerate() {
        let id = format!("evt_old{i}");
        assert_eq!(
            app.post_webhook(&event(&id, 0, customer, "trialing"))
                .await
                .status(),
            200
        );
        wait_for(&app, &id, "done").await;
    }
    age_all(&app, 31).await;

    // A prune batch takes its rows and holds them, uncommitted, while webhooks arrive: for
    // a customer whose old rows it holds and for a new one. Both are stored, processed and
    // written to the log before the batch ends. (Their answers wait for it: projections
    // read only what every older transaction has finished writing, which is why a batch is
    // small and commits in milliseconds.)
    let events_before = app.count("SELECT count(*) FROM events").await;
    let mut pruning = app.pool.begin().await.unwrap();
    assert_eq!(prune_batch(&mut pruning, MONTH, 10).await.unwrap(), 3);
    for (id, customer) in [("evt_new1", "cus_live"), ("evt_new2", "cus_fresh")] {
        let posted = tokio::time::timeout(
            Duration::from_secs(30),
            app.post_webhook(&event(id, 60, customer, "active")),
        )
        .await
        .expect("the webhook is not held up by pruning");
        assert_eq!(posted.status(), 200);
        wait_for(&app, id, "done").await;
        assert_eq!(
            app.inbox_row(id).await.unwrap().1.as_deref(),
            Some("applied")
        );
    }
    assert!(app.count("SELECT count(*) FROM events").await > events_before);
    // A second pruner (another replica) skips the held rows instead of waiting for them.
    let mut other = app.pool.begin().await.unwrap();
    let skipped = tokio::time::timeout(Duration::from_secs(30), prune_batch(&mut other, MONTH, 10))
        .await
        .expect("a second pruner skips held rows rather than waiting");
    assert_eq!(skipped.unwrap(), 0);
    other.commit().await.unwrap();
    pruning.commit().await.unwrap();
    for i in 0..3 {
        assert_eq!(
            payload_of(&app, &format!("evt_old{i}")).await,
            (false, true)
        );
    }
    assert_eq!(payload_of(&app, "evt_new1").await, (true, false));
    app.settle().await;
    for customer in ["cus_live", "cus_fresh"] {
        let answer = app
            .get_json(&format!("/v1/customers/{customer}/subscription"))
            .await;
        assert_eq!(answer["status"], "active", "{customer}");
    }
    app.stop().await;
}
