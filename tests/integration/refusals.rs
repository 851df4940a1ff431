//! Permanent versus transient database errors (issue 15): a value Postgres refuses for its
//! content is the sender's problem (a 400 with a reason, or a dead letter at once), never a
//! 503 or a retry, and it never fails the events stored or processed beside it. An outage
//! is still a 503 or a retry.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::{PgPool, Row};
use subledger::inbox::{self, InboxError, InboxWriter, NewEvent, Received, Source};
use subledger::stripe::{parse_event, StripeEvent};
use subledger::Services;

use crate::events::{envelope, subscription, T0};
use crate::support::helpers::{
    catch_up_fully, metrics_page, settle, test_settings, SERVED_PROJECTIONS,
};
use crate::support::procs::{scratch, serve_command, Served, ADMIN_TOKEN};

fn bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

/// A subscription event of `customer` with its `metadata.organizationId` set to `org`.
fn event_of(id: &str, customer: &str, created: i64, status: &str, org: &str) -> Value {
    envelope(
        id,
        "customer.subscription.updated",
        created,
        subscription(
            &format!("sub_{customer}"),
            customer,
            status,
            T0 + 40 * 86_400,
            org,
        ),
    )
}

/// The issue's cases against the real binary: a NUL character in `type`, `api_version` or
/// the customer, and ids no Stripe id is as long as, are each answered 400 with the reason
/// (not the 503 an outage gets), counted by reason, logged with the event id, and change
/// nothing; the well-formed events sent with them are stored and processed.
#[tokio::test]
async fn values_postgres_refuses_are_answered_400_with_a_reason_and_never_fail_their_neighbours() {
    let (settings, db_name, _) = test_settings("refusals");
    let dir = scratch("refusals");
    let log = dir.join("serve.log");
    let serve = Served::start(serve_command(&settings), &log).await;
    let base = serve.address.clone();
    let client = reqwest::Client::new();

    let good = |i: usize| {
        event_of(
            &format!("evt_good{i}"),
            &format!("cus_good{i}"),
            T0,
            "active",
            "org_good",
        )
    };
    let mut nul_type = good(100);
    nul_type["id"] = json!("evt_nul_type");
    nul_type["type"] = json!("customer.subscription.up\u{0}dated");
    let mut nul_version = good(101);
    nul_version["id"] = json!("evt_nul_version");
    nul_version["api_version"] = json!("2025-03-31\u{0}");
    let mut nul_customer = good(102);
    nul_customer["id"] = json!("evt_nul_customer");
    nul_customer["data"]["object"]["customer"] = json!("cus_\u{0}x");
    let mut long_id = good(103);
    long_id["id"] = json!(format!("evt_{}", "x".repeat(3000)));
    let mut long_customer = good(104);
    long_customer["id"] = json!("evt_long_customer");
    long_customer["data"]["object"]["customer"] = json!(format!("cus_{}", "y".repeat(3000)));
    let refused: Vec<(&str, Value, &str)> = vec![
        ("type", nul_type, "its type contains a NUL character"),
        (
            "api_version",
            nul_version,
            "its api_version contains a NUL character",
        ),
        (
            "customer",
            nul_customer,
            "its customer contains a NUL character",
        ),
        ("long id", long_id, "its id is 3004 bytes long"),
        (
            "long customer",
            long_customer,
            "its customer is 3004 bytes long",
        ),
    ];

    // Every refused event is sent among good ones, all at once, so that they share the
    // group commit's inserts.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (client, base, body) = (client.clone(), base.clone(), bytes(&good(i)));
        tasks.spawn(async move { (format!("good {i}"), send(&client, &base, &body).await) });
    }
    for (what, body, _) in &refused {
        let (client, base, body, what) =
            (client.clone(), base.clone(), bytes(body), what.to_string());
        tasks.spawn(async move { (what, send(&client, &base, &body).await) });
    }
    let mut answers = std::collections::HashMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (what, answer) = joined.unwrap();
        answers.insert(what, answer);
    }
    for i in 0..20 {
        assert_eq!(
            answers[&format!("good {i}")].0,
            200,
            "{:?}",
            answers[&format!("good {i}")]
        );
    }
    for (what, _, message) in &refused {
        let (status, body) = &answers[*what];
        assert_eq!(*status, 400, "{what}: {body}");
        assert_eq!(body["error"]["code"], "unstorable_event", "{what}: {body}");
        let text = body["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{what}: {text}");
    }

    // Only the good ones were stored, and they are processed.
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap();
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(60)).await;
    let stored: Vec<String> = sqlx::query_scalar("SELECT event_id FROM inbox ORDER BY event_id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 20, "{stored:?}");
    assert!(
        stored.iter().all(|id| id.starts_with("evt_good")),
        "{stored:?}"
    );

    // Counted by reason, where `/metrics` shows it.
    let metrics = metrics_page(&client, &base).await;
    for (reason, at_least) in [("invalid_text", 3.0), ("too_large", 2.0)] {
        let series =
            format!("subledger_webhooks_refused_total{{reason=\"{reason}\",stage=\"receipt\"}} ");
        let count: f64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .unwrap_or_else(|| panic!("{series} in {metrics}"))
            .parse()
            .unwrap();
        assert!(count >= at_least, "{series}{count}");
    }
    // A parameter Postgres refuses is a 400 too (the admin search with a NUL in it).
    let (status, body) = send_get(&client, &format!("{base}/admin?q=cus%00x"), ADMIN_TOKEN).await;
    assert_eq!(status, 400, "{body}");

    drop(serve);
    let logs = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let refusals: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                == "webhook refused: the event holds a value Postgres cannot store"
        })
        .collect();
    assert_eq!(refusals.len(), refused.len(), "{logs}");
    let logged: Vec<&str> = refusals
        .iter()
        .map(|l| l["fields"]["event_id"].as_str().unwrap())
        .collect();
    for id in [
        "evt_nul_type",
        "evt_nul_version",
        "evt_nul_customer",
        "evt_long_customer",
    ] {
        assert!(logged.contains(&id), "{id} in {logged:?}");
    }
    // An id no Stripe id looks like is logged by its length only.
    assert!(logged.contains(&"<not an id: 3004 bytes>"), "{logged:?}");
    assert!(
        refusals
            .iter()
            .all(|l| l["level"] == "WARN" && l["fields"]["reason"].is_string()),
        "{refusals:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l["fields"]["message"] == "request failed"),
        "no 5xx was logged: {logs}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

async fn send(client: &reqwest::Client, base: &str, body: &[u8]) -> (u16, Value) {
    let header = subledger::stripe::signature::sign(
        crate::support::helpers::SECRET,
        chrono::Utc::now().timestamp(),
        body,
    );
    let response = client
        .post(format!("{base}/webhooks/stripe"))
        .header("stripe-signature", header)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn send_get(client: &reqwest::Client, url: &str, token: &str) -> (u16, String) {
    let response = client.get(url).bearer_auth(token).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// A trigger on the inbox: `evt_slow` takes two seconds to insert (holding the writer's
/// only slot while the next batch gathers), `evt_pg_refuses…` is refused for its content
/// (SQLSTATE 22023, which the service's own check cannot foresee), `evt_pg_down…` as if the
/// server were shutting down (57P03).
const INBOX_FAULTS: &str = r#"
CREATE FUNCTION inbox_faults() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.event_id = 'evt_slow' THEN PERFORM pg_sleep(2); END IF;
  IF NEW.event_id LIKE 'evt_pg_refuses%' THEN
    RAISE EXCEPTION 'injected: a value refused' USING ERRCODE = '22023';
  END IF;
  IF NEW.event_id LIKE 'evt_pg_down%' THEN
    RAISE EXCEPTION 'injected: the database is starting up' USING ERRCODE = '57P03';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER inbox_faults BEFORE INSERT ON inbox FOR EACH ROW EXECUTE FUNCTION inbox_faults();
"#;

/// Stores `ids` through a group commit with one slot, all in the batch that queues while
/// `evt_slow` is being inserted; returns each one's answer.
async fn store_together(
    pool: &PgPool,
    writer: &InboxWriter,
    ids: &[&str],
) -> Vec<Result<Received, InboxError>> {
    let slow = {
        let writer = writer.clone();
        let (event, raw) = parsed(&event_of("evt_slow", "cus_slow", T0, "active", "org_s"));
        tokio::spawn(async move { writer.store(event, raw).await })
    };
    // Until its insert is under way (not a fixed pause: a loaded machine may take longer
    // to get there), so that the others queue behind it and form one batch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sleeping: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event = 'PgSleep'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if sleeping > 0 {
            break;
        }
        assert!(!slow.is_finished(), "evt_slow was stored without its pause");
        assert!(
            tokio::time::Instant::now() < deadline,
            "evt_slow never stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let writer = writer.clone();
        let (event, raw) = parsed(&event_of(id, &format!("cus_b{i}"), T0, "active", "org_b"));
        tasks.push(tokio::spawn(async move { writer.store(event, raw).await }));
    }
    assert!(slow.await.unwrap().is_ok());
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

fn parsed(value: &Value) -> (Arc<StripeEvent>, bytes::Bytes) {
    let raw = bytes(value);
    (Arc::new(parse_event(&raw).unwrap()), raw.into())
}

/// What the service's own check cannot foresee, Postgres refuses: the group commit then
/// stores the batch one event at a time, so only that event is refused and the others are
/// stored. A transient failure still fails the whole batch, to be retried (503).
#[tokio::test]
async fn the_group_commit_isolates_an_event_postgres_refuses_but_not_an_outage() {
    let (settings, _, _) = test_settings("groupcommit");
    let services = Services::connect(settings).await.unwrap();
    sqlx::raw_sql(INBOX_FAULTS)
        .execute(&services.pool)
        .await
        .unwrap();
    let writer = InboxWriter::start(services.pool.clone(), 1);

    let answers = store_together(
        &services.pool,
        &writer,
        &["evt_a1", "evt_pg_refuses1", "evt_a2", "evt_a3"],
    )
    .await;
    assert!(matches!(answers[0], Ok(Received::Stored)), "{answers:?}");
    match &answers[1] {
        Err(InboxError::Refused(refused)) => {
            assert_eq!(refused.refusal.as_str(), "invalid_value");
            assert!(refused.detail.contains("SQLSTATE 22023"), "{refused}");
            assert!(
                !refused.detail.contains("injected"),
                "the message is not quoted: {refused}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(answers[2], Ok(Received::Stored)), "{answers:?}");
    assert!(matches!(answers[3], Ok(Received::Stored)), "{answers:?}");

    let answers = store_together(
        &services.pool,
        &writer,
        &["evt_b1", "evt_pg_down1", "evt_b2"],
    )
    .await;
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Err(InboxError::Store(_)))),
        "an outage fails its whole batch: {answers:?}"
    );

    let stored: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM inbox WHERE event_id <> 'evt_slow' ORDER BY 1")
            .fetch_all(&services.pool)
            .await
            .unwrap();
    assert_eq!(stored, ["evt_a1", "evt_a2", "evt_a3"]);
}

/// A trigger on the log: an event recorded from `evt_log_refuses` is refused for its
/// content (SQLSTATE 22003, a number out of range), one from `evt_log_down` as if the
/// server were shutting down (57P01).
const LOG_FAULTS: &str = r#"
CREATE FUNCTION log_faults() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.metadata::text LIKE '%evt_log_refuses%' THEN
    RAISE EXCEPTION 'injected: out of range' USING ERRCODE = '22003';
  END IF;
  IF NEW.metadata::text LIKE '%evt_log_down%' THEN
    RAISE EXCEPTION 'injected: shutting down' USING ERRCODE = '57P01';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER log_faults BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION log_faults();
"#;

/// (state, outcome, attempts, last_error) of an inbox row.
async fn row(services: &Services, event_id: &str) -> (String, Option<String>, i32, Option<String>) {
    let row =
        sqlx::query("SELECT state, outcome, attempts, last_error FROM inbox WHERE event_id = $1")
            .bind(event_id)
            .fetch_one(&services.pool)
            .await
            .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// A row that can never be processed is dead-lettered at once with its reason (not retried
/// SUBLEDGER_MAX_ATTEMPTS times), whether the service's own check found it (a NUL character
/// in the org id, which the log's `json` column would take and the projections' tables
/// then refuse forever) or Postgres refused it; the same customer's other rows of the same
/// batch are recorded. A transient failure is still retried.
#[tokio::test]
async fn unprocessable_rows_are_dead_lettered_at_once_and_their_neighbours_recorded() {
    let (settings, _, _) = test_settings("unprocessable");
    let services = Services::connect(settings).await.unwrap();
    sqlx::raw_sql(LOG_FAULTS)
        .execute(&services.pool)
        .await
        .unwrap();
    let values = [
        event_of("evt_x1", "cus_x", T0, "trialing", "org_x"),
        event_of("evt_nul_org", "cus_x", T0 + 10, "active", "org_\u{0}x"),
        event_of("evt_x2", "cus_x", T0 + 20, "active", "org_x"),
        event_of("evt_y1", "cus_y", T0, "trialing", "org_y"),
        event_of("evt_log_refuses", "cus_y", T0 + 10, "past_due", "org_y"),
        event_of("evt_y2", "cus_y", T0 + 20, "active", "org_y"),
        event_of("evt_log_down", "cus_z", T0, "active", "org_z"),
    ];
    let raws: Vec<Vec<u8>> = values.iter().map(bytes).collect();
    let events: Vec<StripeEvent> = raws.iter().map(|raw| parse_event(raw).unwrap()).collect();
    let new: Vec<NewEvent> = events
        .iter()
        .zip(&raws)
        .map(|(event, raw)| NewEvent {
            event,
            raw,
            source: Source::Import,
        })
        .collect();
    let recorded = inbox::record_many(&services.pool, &new).await.unwrap();
    assert!(
        recorded.iter().all(|r| r == &Ok(Received::Stored)),
        "{recorded:?}"
    );

    // One batch: every row of it is claimed together.
    let processed = services.worker.process_batch(64, None).await.unwrap();
    assert_eq!(processed.len(), values.len());

    for id in ["evt_x1", "evt_x2", "evt_y1", "evt_y2"] {
        let (state, outcome, attempts, _) = row(&services, id).await;
        assert_eq!(
            (state.as_str(), outcome.as_deref(), attempts),
            ("done", Some("applied"), 1),
            "{id}"
        );
    }
    let (state, outcome, attempts, error) = row(&services, "evt_nul_org").await;
    assert_eq!(
        (state.as_str(), outcome.as_deref(), attempts),
        ("dead", Some("failed"), 1)
    );
    let error = error.unwrap();
    assert!(
        error.contains("unprocessable (invalid_text)")
            && error.contains("owner.org_id holds a NUL character"),
        "{error}"
    );
    let (state, outcome, attempts, error) = row(&services, "evt_log_refuses").await;
    assert_eq!(
        (state.as_str(), outcome.as_deref(), attempts),
        ("dead", Some("failed"), 1)
    );
    let error = error.unwrap();
    assert!(
        error.contains("unprocessable (out_of_range)") && error.contains("SQLSTATE 22003"),
        "{error}"
    );
    // Transient: retried later, not dead.
    let (state, _, attempts, error) = row(&services, "evt_log_down").await;
    assert_eq!((state.as_str(), attempts), ("pending", 1), "{error:?}");

    // Nothing unstorable reached the log, and its readers keep up with it.
    let nul_in_log: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE payload::text LIKE '%\\u0000%'")
            .fetch_one(&services.pool)
            .await
            .unwrap();
    assert_eq!(nul_in_log, 0);
    catch_up_fully(&services.projections, 100).await.unwrap();
    let org: String =
        sqlx::query_scalar("SELECT org_id FROM subscriptions WHERE customer_id = 'cus_x'")
            .fetch_one(&services.pool)
            .await
            .unwrap();
    assert_eq!(org, "org_x");
    let status: String =
        sqlx::query_scalar("SELECT status FROM subscriptions WHERE customer_id = 'cus_y'")
            .fetch_one(&services.pool)
            .await
            .unwrap();
    assert_eq!(status, "active");
}
