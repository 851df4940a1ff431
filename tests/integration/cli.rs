//! The `subledger` binary itself: import, replay, migrate, the threads it serves on, and a
//! clean stop on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::events::{envelope, subscription, T0};
use crate::support::helpers::{spawn_app, test_settings};
use crate::support::procs::{scratch, serve_command, Served};

/// Runs a command to completion off the test's runtime thread, so the in-process app keeps
/// serving while the binary works against its database.
pub(crate) async fn run(mut command: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

async fn run_subledger(
    settings: &subledger::Settings,
    args: &[&std::ffi::OsStr],
) -> std::process::Output {
    let mut command = subledger(settings);
    command.args(args);
    run(command).await
}

pub(crate) fn subledger(settings: &subledger::Settings) -> Command {
    let mut command = crate::support::procs::subledger_command(settings);
    command.env("RUST_LOG", "warn").env_remove("LOG_FORMAT");
    command
}

#[tokio::test]
async fn import_then_replay_through_the_binary() {
    let app = spawn_app("cli").await;
    let settings = {
        let (mut s, _, _) = test_settings("unused");
        s.database_url = format!("postgres://postgres@127.0.0.1:5432/{}", app.db_name).into();
        s.redis_prefix = app.prefix.clone();
        s
    };
    let far = chrono::Utc::now().timestamp() + 86_400;
    let events = [
        envelope(
            "evt_i1",
            "customer.subscription.created",
            T0,
            subscription("sub_i", "cus_i", "trialing", far, "org_i"),
        ),
        envelope(
            "evt_i2",
            "customer.subscription.updated",
            T0 + 60,
            subscription("sub_i", "cus_i", "active", far, "org_i"),
        ),
        envelope(
            "evt_i3",
            "charge.succeeded",
            T0 + 61,
            json!({"id": "ch_1", "customer": "cus_i"}),
        ),
    ];
    let lines: String = events.iter().map(|e| format!("{e}\n")).collect();
    let dir = std::env::temp_dir().join(app.prefix.replace(':', "_"));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("events.jsonl");
    std::fs::write(&good, &lines).unwrap();

    // A file with one bad event changes nothing.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, format!("{lines}{{\"id\": \"evt_x\"}}\n")).unwrap();
    let out = run_subledger(&settings, &["import".as_ref(), bad.as_os_str()]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 4"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 0);

    let out = run_subledger(&settings, &["import".as_ref(), good.as_os_str()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("imported 2 new events (1 ignored, 0 duplicates)"),
        "{stderr}"
    );
    app.settle().await;
    let info = app.get_json("/v1/customers/cus_i/subscription").await;
    assert_eq!(info["status"], "active");

    // Again: all duplicates.
    let out = run_subledger(&settings, &["import".as_ref(), good.as_os_str()]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 new events (0 ignored, 3 duplicates)"));

    app.wipe_cache().await;
    let out = run_subledger(&settings, &["replay".as_ref()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("replayed"), "{stderr}");
    assert!(
        app.redis_get("stripe:customer:cus_i").await.is_some(),
        "replay rebuilt the cache"
    );
    assert_eq!(app.get_json("/v1/customers/cus_i/subscription").await, info);
    std::fs::remove_dir_all(&dir).ok();
    app.stop().await;
}

/// Off a terminal (here a pipe), long commands print plain progress lines: a first one, one
/// per step when `SUBLEDGER_PROGRESS_SECS=0`, a last one at 100%; never a carriage return
/// or an escape code, which would garble a log.
#[tokio::test]
async fn long_commands_print_plain_progress_lines_off_a_terminal() {
    let app = spawn_app("cliprogress").await;
    let settings = {
        let (mut s, _, _) = test_settings("unused");
        s.database_url = format!("postgres://postgres@127.0.0.1:5432/{}", app.db_name).into();
        s.redis_prefix = app.prefix.clone();
        s
    };
    let far = chrono::Utc::now().timestamp() + 86_400;
    let lines: String = (0..4)
        .map(|i| {
            let customer = format!("cus_p{i}");
            let event = envelope(
                &format!("evt_p{i}"),
                "customer.subscription.created",
                T0 + i,
                subscription(
                    &format!("sub_p{i}"),
                    &customer,
                    "active",
                    far,
                    &format!("org_p{i}"),
                ),
            );
            format!("{event}\n")
        })
        .collect();
    let dir = std::env::temp_dir().join(app.prefix.replace(':', "_"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("events.jsonl");
    std::fs::write(&file, &lines).unwrap();

    let progress_of = |out: &std::process::Output| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        assert!(
            !stderr.contains('\r') && !stderr.contains('\x1b'),
            "plain lines only: {stderr:?}"
        );
        stderr
    };
    let mut import = subledger(&settings);
    import
        .env("SUBLEDGER_PROGRESS_SECS", "0")
        .args(["import".as_ref(), file.as_os_str()]);
    let stderr = progress_of(&run(import).await);
    for expected in [
        "import: 0/4 events (0%)",
        "import: 1/4 events (25%), ",
        "import: 4/4 events (100%), ",
        "4 new, 0 ignored, 0 duplicates",
        "imported 4 new events",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
    }
    // The app beside it may have processed some rows first: the count varies, the end not.
    let processed: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("process: "))
        .collect();
    assert!(
        processed
            .last()
            .is_some_and(|l| l.contains(" inbox rows (100%)")),
        "{stderr}"
    );

    let mut replay = subledger(&settings);
    replay.env("SUBLEDGER_PROGRESS_SECS", "0").arg("replay");
    let stderr = progress_of(&run(replay).await);
    let replay_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("replay: "))
        .collect();
    assert!(replay_lines[0].starts_with("replay: 0/"), "{stderr}");
    assert!(
        replay_lines.last().unwrap().contains(" events (100%), "),
        "{stderr}"
    );
    assert!(stderr.contains("replayed "), "{stderr}");

    // With the default interval a short run prints its first and last line only.
    let mut replay = subledger(&settings);
    replay.arg("replay");
    let stderr = progress_of(&run(replay).await);
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("replay: ")).count(),
        2,
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
    app.stop().await;
}

#[tokio::test]
async fn replay_fails_loudly_when_it_cannot_reach_redis() {
    let app = spawn_app("clifail").await;
    let (mut settings, _, _) = test_settings("unused");
    settings.database_url = format!("postgres://postgres@127.0.0.1:5432/{}", app.db_name).into();
    settings.redis_url = "redis://127.0.0.1:1".to_owned().into();
    let out = run_subledger(&settings, &["replay".as_ref()]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Redis"));
    app.stop().await;
}

#[tokio::test]
async fn serve_migrates_serves_and_stops_cleanly_on_sigterm() {
    let (settings, db_name, prefix) = test_settings("serve");
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut child = subledger(&settings)
        .arg("serve")
        .env("SUBLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("STRIPE_WEBHOOK_SECRET", "whsec_x")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let mut up = false;
    // Up to a minute (generous: a loaded machine starts and migrates slowly).
    for _ in 0..1200 {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
        {
            up = r.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "serve answered /healthz");
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap();
    let migrated: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(migrated >= 1);
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    let mut status = None;
    for _ in 0..1200 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("serve stopped after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let _ = prefix;
}

/// `SUBLEDGER_THREADS` sizes the runtime `serve` runs on (its "subledger serving" line
/// says how many threads it has); unset, one per CPU; a count that is not at least 1
/// stops the binary before it starts anything, naming the variable.
#[tokio::test]
async fn serve_runs_on_the_threads_it_is_given() {
    let (settings, _, _) = test_settings("threads");
    let dir = scratch("threads");
    let cpus = std::thread::available_parallelism().unwrap().get();
    for (i, (threads, expected)) in [(Some("1"), 1), (Some("3"), 3), (None, cpus)]
        .into_iter()
        .enumerate()
    {
        let mut command = serve_command(&settings);
        match threads {
            Some(threads) => command.env("SUBLEDGER_THREADS", threads),
            None => command.env_remove("SUBLEDGER_THREADS"),
        };
        let log = dir.join(format!("serve-{i}.log"));
        let mut served = Served::start(command, &log).await;
        served.kill();
        let said: Vec<serde_json::Value> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .filter(|line: &serde_json::Value| line["fields"]["message"] == "subledger serving")
            .collect();
        assert_eq!(said.len(), 1, "{said:?}");
        assert_eq!(said[0]["fields"]["threads"], expected, "{threads:?}");
    }
    for bad in ["0", "two"] {
        let mut command = serve_command(&settings);
        command.env("SUBLEDGER_THREADS", bad);
        let out = run(command).await;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("SUBLEDGER_THREADS is not valid"),
            "{stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
