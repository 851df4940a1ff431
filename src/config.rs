//! Typed settings, read from the environment. Defaults work against a local Postgres and
//! Redis, so `subledger serve` needs nothing else to start.
//!
//! Secrets are `SecretString`s: they print as `[REDACTED]` and must never be logged.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is not valid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Everything subledger can be configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/subledger`); the
    /// database is created if missing.
    pub database_url: SecretString,
    /// `REDIS_URL` (default `redis://127.0.0.1:6379`).
    pub redis_url: SecretString,
    /// `SUBLEDGER_REDIS_PREFIX`: put before every key (default empty).
    pub redis_prefix: String,
    /// `SUBLEDGER_CACHE_TTL_SECS` (default 86400).
    pub cache_ttl: Duration,
    /// `STRIPE_WEBHOOK_SECRET`: one or more signing secrets, comma-separated.
    pub webhook_secrets: Vec<SecretString>,
    /// `SUBLEDGER_SIGNATURE_TOLERANCE_SECS` (default 300).
    pub signature_tolerance_secs: i64,
    /// `SUBLEDGER_API_TOKEN`: the bearer token for `/v1`. Unset: `/v1` refuses everyone.
    pub api_token: Option<SecretString>,
    /// `SUBLEDGER_ADMIN_TOKEN`: the token for `/admin`. Unset: `/admin` refuses everyone.
    pub admin_token: Option<SecretString>,
    /// `SUBLEDGER_CATALOG`: the catalogue TOML (default: no plans, the default policy).
    pub catalog_path: Option<PathBuf>,
    /// `SUBLEDGER_LISTEN` (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// `SUBLEDGER_MAX_BODY_BYTES` (default 1 MiB).
    pub max_body_bytes: usize,
    /// `SUBLEDGER_WORKERS`: inbox workers (default 4).
    pub workers: usize,
    /// `SUBLEDGER_MAX_ATTEMPTS`: processing attempts before an inbox row is dead-lettered
    /// (default 8).
    pub max_attempts: i32,
    /// `SUBLEDGER_DB_POOL`: Postgres connections (default 16).
    pub db_pool_size: u32,
    /// `SUBLEDGER_POLL_MS`: how often workers and projections look for work they were not
    /// told about (another replica's) (default 500).
    pub poll_interval: Duration,
}

fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parsed<T: std::str::FromStr>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|e: T::Err| ConfigError::Invalid {
                name,
                reason: e.to_string(),
            }),
    }
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let secrets = var("STRIPE_WEBHOOK_SECRET")
            .map(|raw| {
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| SecretString::from(s.to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let settings = Self {
            database_url: var("DATABASE_URL")
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/subledger".to_owned())
                .into(),
            redis_url: var("REDIS_URL")
                .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
                .into(),
            redis_prefix: var("SUBLEDGER_REDIS_PREFIX").unwrap_or_default(),
            cache_ttl: Duration::from_secs(parsed("SUBLEDGER_CACHE_TTL_SECS", 86_400)?),
            webhook_secrets: secrets,
            signature_tolerance_secs: parsed("SUBLEDGER_SIGNATURE_TOLERANCE_SECS", 300)?,
            api_token: var("SUBLEDGER_API_TOKEN").map(SecretString::from),
            admin_token: var("SUBLEDGER_ADMIN_TOKEN").map(SecretString::from),
            catalog_path: var("SUBLEDGER_CATALOG").map(PathBuf::from),
            listen: parsed("SUBLEDGER_LISTEN", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            max_body_bytes: parsed("SUBLEDGER_MAX_BODY_BYTES", 1024 * 1024)?,
            workers: parsed("SUBLEDGER_WORKERS", 4)?,
            max_attempts: parsed("SUBLEDGER_MAX_ATTEMPTS", 8)?,
            db_pool_size: parsed("SUBLEDGER_DB_POOL", 16)?,
            poll_interval: Duration::from_millis(parsed("SUBLEDGER_POLL_MS", 500)?),
        };
        if settings.workers == 0 {
            return Err(ConfigError::Invalid {
                name: "SUBLEDGER_WORKERS",
                reason: "must be at least 1".into(),
            });
        }
        if settings.max_attempts < 1 {
            return Err(ConfigError::Invalid {
                name: "SUBLEDGER_MAX_ATTEMPTS",
                reason: "must be at least 1".into(),
            });
        }
        Ok(settings)
    }
}
