//! Starts the real application for a test: a fresh Postgres database (created on the
//! server named by `DATABASE_URL`, migrated, left behind for inspection and dropped by
//! the test command's next run), a fresh Redis key prefix, port 0, and quiet tracing
//! unless `TEST_LOG` is set.

use std::sync::Once;
use std::time::Duration;

use projections::{
    EventualProjection, PlatformTables, ProjectionError, Projections, RedisCache,
    TransactionalProjection, WhenBusy,
};
use redis::AsyncCommands;
use secrecy::SecretString;
use serde_json::Value;
use sqlx::{PgPool, Row};
use subledger::config::Token;
use subledger::stripe::signature::sign;
use subledger::{Application, Services, Settings};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &str = "whsec_test_secret";
pub const OLD_SECRET: &str = "whsec_rotated_out";
pub const TOKEN: &str = "test-api-token";

static TRACING: Once = Once::new();

fn base_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The projections a `subledger serve` started by a test keeps, for the tests that reach
/// it only through its database: as they name themselves, in the runner's order (the
/// served `/readyz` lists the runner's own, and a test compares them).
pub const SERVED_PROJECTIONS: [&str; 2] = [PlatformTables::NAME, RedisCache::NAME];

/// Waits (at most `within`) until the inbox has nothing pending and each of `projections`
/// has read the whole log. The tests' one settle: [`TestApp::settle`] for an app in this
/// process, called directly for a served binary. A failing query (a database being
/// restarted) only means "not yet".
pub async fn settle(pool: &PgPool, projections: &[&str], within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let pending: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM inbox WHERE state = 'pending'")
                .fetch_one(pool)
                .await;
        let mut lags = Vec::new();
        for &name in projections {
            lags.push((name, projections::runner::lag(pool, name).await));
        }
        if matches!(pending, Ok(0)) && lags.iter().all(|(_, lag)| matches!(lag, Ok(0))) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled: pending {pending:?}, lags {lags:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drives `runner` itself (for tests where no app runs one) until none of its projections
/// lags, in batches of `batch`; returns what each applied, in the runner's order. One pass
/// may stop short of the end of the log: the reader never passes a transaction still
/// running, and the tests beside this one keep some running on the same server.
pub async fn catch_up_fully(runner: &Projections, batch: i64) -> Result<Vec<u64>, ProjectionError> {
    let mut applied = vec![0; runner.names().count()];
    loop {
        let done = runner.catch_up(batch, WhenBusy::Wait, |_, _| {}).await?;
        for (total, done) in applied.iter_mut().zip(done) {
            *total += done.applied;
        }
        let mut behind = 0;
        for name in runner.names() {
            behind += runner.lag(name).await?;
        }
        if behind == 0 {
            return Ok(applied);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    pub db_name: String,
    pub prefix: String,
    pub redis: redis::aio::ConnectionManager,
    pub services: Services,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

/// Settings for a fresh database and prefix, as `spawn_app` uses them.
pub fn test_settings(tag: &str) -> (Settings, String, String) {
    TRACING.call_once(|| {
        if std::env::var("TEST_LOG").is_ok() {
            subledger::telemetry::init();
        }
    });
    // The creation time is in the names so that the test command can clear what earlier
    // runs left behind without touching a run still going on beside it.
    let id = uuid::Uuid::new_v4().simple().to_string();
    let now = chrono::Utc::now().timestamp();
    let db_name = format!("subledger_test_{now}_{tag}_{}", &id[..8]);
    let prefix = format!("test:{now}:{}:", &id[..8]);
    let mut url = base_database_url();
    let cut = url.rfind('/').expect("DATABASE_URL names a database");
    url.truncate(cut);
    let mut settings = Settings::from_env().expect("default settings");
    settings.database_url = SecretString::from(format!("{url}/{db_name}"));
    settings.redis_url = SecretString::from(redis_url());
    settings.redis_prefix = prefix.clone();
    settings.webhook_secrets = vec![
        SecretString::from(OLD_SECRET.to_owned()),
        SecretString::from(SECRET.to_owned()),
    ];
    settings.api_tokens = vec![Token::from(TOKEN)];
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings.catalog_path =
        Some(concat!(env!("CARGO_MANIFEST_DIR"), "/catalog.example.toml").into());
    settings.poll_interval = Duration::from_millis(50);
    settings.max_body_bytes = 64 * 1024;
    (settings, db_name, prefix)
}

pub async fn spawn_app(tag: &str) -> TestApp {
    let (settings, db_name, prefix) = test_settings(tag);
    spawn_with(settings, db_name, prefix).await
}

pub async fn spawn_with(settings: Settings, db_name: String, prefix: String) -> TestApp {
    let redis_client = redis::Client::open(redis_url()).unwrap();
    let redis = redis::aio::ConnectionManager::new(redis_client)
        .await
        .expect("Redis is running");
    let app = Application::build(settings)
        .await
        .expect("the application starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let services = app.services().clone();
    let pool = services.pool.clone();
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        address,
        client: reqwest::Client::new(),
        pool,
        db_name,
        prefix,
        redis,
        services,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestApp {
    /// Posts a body signed with the current secret, at the current time.
    pub async fn post_webhook(&self, body: &[u8]) -> reqwest::Response {
        let header = sign(SECRET, chrono::Utc::now().timestamp(), body);
        self.post_webhook_with(body, Some(&header)).await
    }

    pub async fn post_webhook_with(
        &self,
        body: &[u8],
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/webhooks/stripe", self.address))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("stripe-signature", signature);
        }
        request.send().await.expect("the request is sent")
    }

    /// GET with the API token.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("the request is sent")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    /// Waits until the inbox has nothing pending and every projection of the app's runner
    /// has read the whole log.
    pub async fn settle(&self) {
        let names: Vec<&str> = self.services.projections.names().collect();
        settle(&self.pool, &names, Duration::from_secs(60)).await;
    }

    /// (state, outcome, detail) of an inbox row.
    pub async fn inbox_row(
        &self,
        event_id: &str,
    ) -> Option<(String, Option<String>, Option<String>)> {
        sqlx::query("SELECT state, outcome, detail FROM inbox WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
            .map(|row| (row.get("state"), row.get("outcome"), row.get("detail")))
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }

    /// Every Redis key of this test, with its value.
    pub async fn redis_keys(&self) -> Vec<String> {
        let mut conn = self.redis.clone();
        let mut keys: Vec<String> = conn.keys(format!("{}*", self.prefix)).await.unwrap();
        keys.sort();
        keys
    }

    /// A key's value; an owner's hash (`stripe:org:…`, `stripe:user:…`) as its fields,
    /// sorted, one `field=value` a line.
    pub async fn redis_get(&self, key: &str) -> Option<String> {
        redis_value(&mut self.redis.clone(), &format!("{}{key}", self.prefix)).await
    }

    /// Deletes every key of this test behind the service's back, and tells the in-process
    /// caches so (as anyone who deletes keys must, or wait out their age bound).
    pub async fn wipe_cache(&self) {
        let keys = self.redis_keys().await;
        if !keys.is_empty() {
            let _: () = self.redis.clone().del(keys).await.unwrap();
        }
        let _: i64 = self
            .redis
            .clone()
            .publish(
                projections::local_cache::channel(&self.prefix),
                projections::local_cache::ALL_KEYS,
            )
            .await
            .unwrap();
    }

    /// A pool on the server's `postgres` database, for doing things to this test's database.
    pub async fn admin_pool(&self) -> PgPool {
        let mut url = base_database_url();
        url.truncate(url.rfind('/').unwrap());
        PgPool::connect(&format!("{url}/postgres")).await.unwrap()
    }

    /// Stops the server and waits for its workers.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
        self.wipe_cache().await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A key's value as text: a string as it is, a hash as its sorted `field=value` lines.
pub async fn redis_value(
    redis: &mut (impl redis::aio::ConnectionLike + Send),
    key: &str,
) -> Option<String> {
    let kind: String = redis::cmd("TYPE")
        .arg(key)
        .query_async(redis)
        .await
        .unwrap();
    match kind.as_str() {
        "none" => None,
        "hash" => {
            let mut fields: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(key)
                .query_async(redis)
                .await
                .unwrap();
            fields.sort();
            Some(
                fields
                    .into_iter()
                    .map(|(f, v)| format!("{f}={v}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        }
        _ => redis::cmd("GET").arg(key).query_async(redis).await.unwrap(),
    }
}

/// A running service's `GET /metrics` page, as text.
pub async fn metrics_page(client: &reqwest::Client, address: &str) -> String {
    client
        .get(format!("{address}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample whose name and labels are `series` on a `/metrics` page.
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}
