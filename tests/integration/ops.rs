//! Operability: `/metrics`, the alert rules and dashboard naming only metrics we serve,
//! the per-webhook log span, `subledger inspect` / `explain`, and the admin page over HTTP
//! (the browser test is in `admin_browser.rs`).
//!
//! Metrics are process-wide and tests run in parallel, so counters are asserted to have
//! grown by at least what this test did, never to equal it.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use crate::cli::{run, subledger};
use crate::events::{sub_event, T0};
use crate::support::helpers::{spawn_app, spawn_with, test_settings, TestApp};

pub const ADMIN: &str = "test-admin-token";

/// One sample line of the Prometheus text format.
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').expect("label=value");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), HashMap::new()),
            };
            Sample {
                name,
                labels,
                value: value.parse().expect("a number"),
            }
        })
        .collect()
}

/// The sum of every sample of `name` carrying `labels` (`None` when there is none).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

async fn scrape(app: &TestApp) -> Vec<Sample> {
    let response = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    parse(&response.text().await.unwrap())
}

/// Every `subledger_*` metric name a file mentions, without histogram suffixes.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("subledger_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .map(|n| {
            ["_bucket", "_sum", "_count"].iter().fold(n, |n, suffix| {
                n.strip_suffix(suffix).map_or(n.clone(), str::to_owned)
            })
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn metrics_count_webhooks_by_type_and_outcome_and_describe_the_backlog() {
    let app = spawn_app("metrics").await;
    let before = scrape(&app).await;
    let count = |samples: &[Sample], ty: &str, outcome: &str| {
        value(
            samples,
            "subledger_webhooks_processed_total",
            &[("type", ty), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };

    let created = sub_event(
        "evt_m1",
        "customer.subscription.created",
        T0,
        "sub_m",
        "cus_m",
        "trialing",
        "org_m",
    );
    let updated = sub_event(
        "evt_m2",
        "customer.subscription.updated",
        T0 + 60,
        "sub_m",
        "cus_m",
        "active",
        "org_m",
    );
    let stale = sub_event(
        "evt_m0",
        "customer.subscription.updated",
        T0 - 60,
        "sub_m",
        "cus_m",
        "incomplete",
        "org_m",
    );
    let canceled = sub_event(
        "evt_m3",
        "customer.subscription.deleted",
        T0 + 120,
        "sub_m2",
        "cus_m2",
        "canceled",
        "org_m2",
    );
    let revived = sub_event(
        "evt_m4",
        "customer.subscription.updated",
        T0 + 180,
        "sub_m2",
        "cus_m2",
        "active",
        "org_m2",
    );
    for body in [&created, &updated, &updated, &stale, &canceled, &revived] {
        assert_eq!(app.post_webhook(body).await.status(), 200);
        app.settle().await;
    }
    let charge = serde_json::to_vec(&crate::events::envelope(
        "evt_m5",
        "charge.succeeded",
        T0,
        serde_json::json!({"id": "ch_1", "customer": "cus_m"}),
    ))
    .unwrap();
    app.post_webhook(&charge).await;
    app.settle().await;
    app.wipe_cache().await;
    app.get_json("/v1/orgs/org_m/entitlements").await; // miss, written back
    app.get_json("/v1/orgs/org_m/entitlements").await; // hit

    let after = scrape(&app).await;
    let grew = |ty: &str, outcome: &str, by: f64| {
        let d = count(&after, ty, outcome) - count(&before, ty, outcome);
        assert!(
            d >= by,
            "{ty} {outcome} grew by {d}, expected at least {by}"
        );
    };
    grew("customer.subscription.created", "applied", 1.0);
    grew("customer.subscription.updated", "applied", 1.0);
    grew("customer.subscription.updated", "stale", 1.0);
    grew("customer.subscription.updated", "illegal", 1.0);
    grew("charge.succeeded", "ignored", 1.0);
    let received = |s: &[Sample], result: &str| {
        value(
            s,
            "subledger_webhooks_received_total",
            &[
                ("type", "customer.subscription.updated"),
                ("result", result),
            ],
        )
        .unwrap_or(0.0)
    };
    assert!(received(&after, "duplicate") - received(&before, "duplicate") >= 1.0);
    assert!(received(&after, "stored") - received(&before, "stored") >= 3.0);
    let stale_ooo = |s: &[Sample]| {
        value(
            s,
            "subledger_webhooks_out_of_order_total",
            &[("kind", "stale")],
        )
        .unwrap()
    };
    assert!(stale_ooo(&after) - stale_ooo(&before) >= 1.0);
    assert!(
        value(
            &after,
            "subledger_webhook_processing_seconds_count",
            &[("type", "customer.subscription.created")]
        )
        .unwrap()
            >= 1.0
    );
    let hits = |s: &[Sample], r: &str| {
        value(s, "subledger_cache_requests_total", &[("result", r)]).unwrap()
    };
    assert!(hits(&after, "hit") - hits(&before, "hit") >= 1.0);
    assert!(hits(&after, "miss") - hits(&before, "miss") >= 1.0);
    assert!(
        value(
            &after,
            "subledger_http_request_duration_seconds_count",
            &[
                ("route", "/v1/orgs/:org_id/entitlements"),
                ("status", "200"),
                ("method", "GET")
            ]
        )
        .unwrap()
            >= 2.0
    );
    assert!(
        value(
            &after,
            "subledger_http_request_duration_seconds_bucket",
            &[("route", "/webhooks/stripe"), ("le", "+Inf")]
        )
        .unwrap()
            >= 7.0
    );
    // Gauges describe this app's database, read at the scrape.
    assert_eq!(
        value(&after, "subledger_inbox_depth", &[("state", "pending")]),
        Some(0.0)
    );
    assert_eq!(
        value(&after, "subledger_inbox_oldest_pending_age_seconds", &[]),
        Some(0.0)
    );
    for projection in app.services.projections.names() {
        assert_eq!(
            value(
                &after,
                "subledger_projection_lag_events",
                &[("projection", projection)]
            ),
            Some(0.0)
        );
    }
    assert_eq!(value(&after, "subledger_cache_up", &[]), Some(1.0));
    // Syncs do not exist yet; their series do, so alerts on them can be evaluated.
    assert_eq!(
        value(
            &after,
            "subledger_syncs_total",
            &[("source", "reconciler"), ("outcome", "failed")]
        )
        .map(|v| v >= 0.0),
        Some(true)
    );
    assert!(value(
        &after,
        "subledger_sync_duration_seconds_bucket",
        &[("source", "webhook"), ("le", "+Inf")]
    )
    .is_some());

    // A write the version guard refuses is counted.
    let stale_writes = |s: &[Sample]| {
        value(
            s,
            "subledger_cache_stale_writes_total",
            &[("writer", "read_through")],
        )
        .unwrap()
    };
    let mut old = projections::PlatformTables::customer(&app.pool, "cus_m")
        .await
        .unwrap()
        .unwrap();
    old.version -= 1;
    assert!(!app.services.cache.put(&old).await.unwrap());
    assert!(stale_writes(&scrape(&app).await) - stale_writes(&after) >= 1.0);

    // Every metric the alert rules and the dashboard use is served.
    let served: Vec<&str> = after.iter().map(|s| s.name.as_str()).collect();
    for file in ["ops/alerts.yml", "ops/grafana-dashboard.json"] {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/").to_owned() + file)
                .unwrap();
        let names = metric_names(&text);
        assert!(names.len() > 5, "{file} names metrics");
        for name in names {
            assert!(
                served.iter().any(|s| *s == name
                    || s.strip_prefix(name.as_str())
                        .is_some_and(|rest| ["_bucket", "_sum", "_count"].contains(&rest))),
                "{file} uses {name}, which /metrics does not serve"
            );
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_valid_grafana_json() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/ops/grafana-dashboard.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    for panel in panels {
        assert!(panel["title"].is_string());
        if panel["type"] != "row" {
            assert!(
                !panel["targets"].as_array().unwrap().is_empty(),
                "{}",
                panel["title"]
            );
        }
    }
}

/// Makes the event store fail every event of `customer` (a trigger raising an error
/// that may pass, SQLSTATE P0001), so processing its webhooks fails the way a storage
/// outage does and is retried. (A check constraint would be an integrity violation,
/// class 23: a refusal for content, dead-lettered at once without retries.)
async fn break_store_for(app: &TestApp, customer: &str) {
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION broken() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.aggregate_id = '{customer}' THEN RAISE EXCEPTION 'the store is broken'; END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER broken BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION broken();"
    ))
    .execute(&app.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_failing_webhook_is_retried_dead_lettered_counted_and_re_driven_from_the_admin_page() {
    let (mut settings, db, prefix) = test_settings("dlq");
    settings.max_attempts = 2;
    settings.admin_tokens = vec![ADMIN.to_owned().into()];
    let app = spawn_with(settings, db, prefix).await;
    break_store_for(&app, "cus_d").await;
    let before = scrape(&app).await;
    let body = sub_event(
        "evt_d1",
        "customer.subscription.created",
        T0,
        "sub_d",
        "cus_d",
        "active",
        "org_d",
    );
    assert_eq!(app.post_webhook(&body).await.status(), 200);
    // The first failure backs off 2 s before the second, final attempt.
    let mut state = String::new();
    for _ in 0..1200 {
        state = app.inbox_row("evt_d1").await.unwrap().0;
        if state == "dead" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, "dead");
    let after = scrape(&app).await;
    let ty = [("type", "customer.subscription.created")];
    let d = |name: &str| {
        value(&after, name, &ty).unwrap_or(0.0) - value(&before, name, &ty).unwrap_or(0.0)
    };
    assert!(d("subledger_webhook_retries_total") >= 1.0);
    assert!(d("subledger_webhook_dead_letters_total") >= 1.0);
    assert_eq!(
        value(&after, "subledger_inbox_depth", &[("state", "dead")]),
        Some(1.0)
    );

    // The overview lists it with a re-drive button.
    let page = admin_get(&app, "/admin").await;
    assert!(page.contains("Dead-letter queue (1)"), "{page}");
    assert!(page.contains("action=\"/admin/inbox/evt_d1/redrive\""));
    assert!(page.contains("broken"), "the last error is shown");

    // Fixed, then re-driven: processed at once.
    sqlx::query("DROP TRIGGER broken ON events")
        .execute(&app.pool)
        .await
        .unwrap();
    let response = app
        .client
        .post(format!("{}/admin/inbox/evt_d1/redrive", app.address))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(
        response.url().as_str().ends_with("/admin?redriven=evt_d1"),
        "{}",
        response.url()
    );
    app.settle().await;
    assert_eq!(
        app.inbox_row("evt_d1").await.unwrap().1.as_deref(),
        Some("applied")
    );
    // Only dead rows are re-driven.
    let again = app
        .client
        .post(format!("{}/admin/inbox/evt_d1/redrive", app.address))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    app.stop().await;
}

async fn admin_get(app: &TestApp, path: &str) -> String {
    let response = app
        .client
        .get(format!("{}{path}", app.address))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.text().await.unwrap()
}

pub async fn spawn_admin_app(tag: &str) -> TestApp {
    let (mut settings, db, prefix) = test_settings(tag);
    settings.admin_tokens = vec![ADMIN.to_owned().into()];
    spawn_with(settings, db, prefix).await
}

/// A customer with a trial, an activation, a duplicate, a stale and an illegal event.
pub async fn seed_customer(app: &TestApp, n: &str) {
    let (sub, cus, org) = (format!("sub_{n}"), format!("cus_{n}"), format!("org_{n}"));
    let events = [
        sub_event(
            &format!("evt_{n}1"),
            "customer.subscription.created",
            T0,
            &sub,
            &cus,
            "trialing",
            &org,
        ),
        sub_event(
            &format!("evt_{n}2"),
            "customer.subscription.updated",
            T0 + 60,
            &sub,
            &cus,
            "active",
            &org,
        ),
        sub_event(
            &format!("evt_{n}0"),
            "customer.subscription.updated",
            T0 - 60,
            &sub,
            &cus,
            "trialing",
            &org,
        ),
        sub_event(
            &format!("evt_{n}3"),
            "customer.subscription.updated",
            T0 + 120,
            &sub,
            &cus,
            "incomplete",
            &org,
        ),
    ];
    for body in &events {
        assert_eq!(app.post_webhook(body).await.status(), 200);
        app.settle().await;
    }
}

#[tokio::test]
async fn the_admin_page_needs_the_token_and_finds_customers_by_any_id() {
    let app = spawn_admin_app("admin").await;
    seed_customer(&app, "a").await;

    let anonymous = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = |path: &str| format!("{}{path}", app.address);
    let r = anonymous.get(url("/admin?q=org_a")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("name=\"token\""));
    let r = anonymous
        .get(url("/admin?q=org_a"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = anonymous
        .get(url("/admin?token=wrong&q=org_a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The token is traded for a cookie and dropped from the URL.
    let r = anonymous
        .get(url(&format!("/admin?token={ADMIN}&q=org_a")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/admin?q=org_a");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(ADMIN),
        "the cookie holds a digest, not the token"
    );
    let r = anonymous
        .get(url("/admin?q=org_a"))
        .header("cookie", cookie.split(';').next().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    for q in ["cus_a", "org_a", "user_of_org_a", "sub_a"] {
        let page = admin_get(&app, &format!("/admin?q={q}")).await;
        assert!(page.contains("Customer <code>cus_a</code>"), "{q}");
        assert!(
            page.contains("cus_a has access: subscription sub_a is active"),
            "{q}"
        );
    }
    let page = admin_get(&app, "/admin/customers/cus_a").await;
    assert!(page.contains("sub_a: trialing -&gt; active (step)"));
    assert!(page.contains("illegal transition for sub_a: active -&gt; incomplete"));
    assert!(page.contains("b-stale"));
    assert!(page.contains("id=\"cache-agree\""));
    assert!(page.contains("data-from=\"trialing\" data-to=\"active\" class=\"path\""));
    assert!(page.contains("Sync log"));
    assert!(admin_get(&app, "/admin?q=nobody")
        .await
        .contains("No customer, org, user or subscription"));
    let r = app
        .client
        .get(url("/admin/customers/cus_nobody"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn inspect_and_explain_tell_what_happened_and_flag_a_stale_cache() {
    let app = spawn_app("inspect").await;
    seed_customer(&app, "i").await;
    let settings = {
        let (mut s, _, _) = test_settings("unused");
        s.database_url = format!("postgres://postgres@127.0.0.1:5432/{}", app.db_name).into();
        s.redis_prefix = app.prefix.clone();
        s
    };
    // stdout of the binary, once it succeeded.
    let cli = |args: &'static [&'static str]| {
        let mut command = subledger(&settings);
        command.args(args);
        async move {
            let out = run(command).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        }
    };
    let text = cli(&["inspect", "cus_i"]).await;
    assert!(text.contains("sub_i: none -> trialing (first)"), "{text}");
    assert!(text.contains("sub_i: trialing -> active (step)"), "{text}");
    assert!(
        text.contains("stale  ") || text.contains("stale "),
        "{text}"
    );
    assert!(
        text.contains("why: illegal transition for sub_i: active -> incomplete"),
        "{text}"
    );
    assert!(
        text.contains("why: stale: sub_i was already updated"),
        "{text}"
    );
    assert!(text.contains("stripe:customer:cus_i (TTL "), "{text}");
    assert!(text.contains("log, table and cache agree"), "{text}");

    // An older value in Redis (as if a write had been lost) is flagged.
    let key = format!("{}stripe:customer:cus_i", app.prefix);
    let mut info = projections::PlatformTables::customer(&app.pool, "cus_i")
        .await
        .unwrap()
        .unwrap();
    info.status = "trialing".into();
    info.version -= 1;
    let _: () = redis::AsyncCommands::set(
        &mut app.redis.clone(),
        &key,
        serde_json::to_string(&info).unwrap(),
    )
    .await
    .unwrap();
    let text = cli(&["inspect", "cus_i"]).await;
    assert!(text.contains("DIFFERENCES"), "{text}");
    assert!(
        text.contains("! status: \"active\" | \"active\" | \"trialing\""),
        "{text}"
    );

    let text = cli(&["explain", "cus_i"]).await;
    assert!(text.starts_with("cus_i has access: subscription sub_i is active, which grants access, until its period ends at "), "{text}");
    assert!(
        text.contains("Note: the cache or the table differ from the log on status, version"),
        "{text}"
    );
    assert_eq!(
        cli(&["explain", "cus_unknown"]).await.trim(),
        "cus_unknown lacks access: subledger holds no event about this customer."
    );
    app.stop().await;
}

#[tokio::test]
async fn each_webhook_is_logged_in_a_json_span_with_its_event_customer_and_outcome() {
    let (settings, db_name, _) = test_settings("logs");
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let child = subledger(&settings)
        .arg("serve")
        .env("SUBLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("STRIPE_WEBHOOK_SECRET", crate::support::helpers::SECRET)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info,sqlx=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let body = sub_event(
        "evt_l1",
        "customer.subscription.created",
        T0,
        "sub_l",
        "cus_l",
        "active",
        "org_l",
    );
    let mut sent = false;
    for _ in 0..1200 {
        let signature = subledger::stripe::signature::sign(
            crate::support::helpers::SECRET,
            chrono::Utc::now().timestamp(),
            &body,
        );
        if let Ok(r) = client
            .post(format!("http://127.0.0.1:{port}/webhooks/stripe"))
            .header("stripe-signature", signature)
            .body(body.clone())
            .send()
            .await
        {
            assert_eq!(r.status(), 200);
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sent);
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap();
    for _ in 0..1200 {
        let state: String = sqlx::query_scalar("SELECT state FROM inbox WHERE event_id = 'evt_l1'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if state == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("a JSON log line: {l}")))
        .collect();
    let processed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "webhook processed")
        .unwrap_or_else(|| panic!("a 'webhook processed' line in {stderr}"));
    let span = &processed["span"];
    assert_eq!(span["name"], "webhook");
    assert_eq!(span["event_id"], "evt_l1");
    assert_eq!(span["event_type"], "customer.subscription.created");
    assert_eq!(span["customer_id"], "cus_l");
    assert_eq!(span["outcome"], "applied");
    let received = lines
        .iter()
        .find(|l| l["fields"]["message"] == "webhook received")
        .expect("a 'webhook received' line");
    assert_eq!(received["span"]["outcome"], "stored");
    assert_eq!(received["span"]["customer_id"], "cus_l");
}
