//! Typed settings, read from the environment. Defaults work against a local Postgres and
//! Redis, so `subledger serve` needs nothing else to start.
//!
//! Secrets are `SecretString`s, or [`Token`]s (a token's SHA-256 alone): they print as
//! `[REDACTED]` and must never be logged.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// Stripe's own API base: `STRIPE_API_BASE` unless set (a local fake in tests).
pub const DEFAULT_STRIPE_API_BASE: &str = "https://api.stripe.com";

/// A configured bearer token or shared secret that callers present (the API, admin and
/// org-scoped tokens, the EventBridge secret), kept as its SHA-256 alone: taken when the
/// settings are read, so a check hashes only what was presented, once, and compares the
/// digests in constant time (equal-length digests, so not even a token's length leaks
/// through timing). The digest is what the admin page's cookie holds, so it is as secret as
/// the token: it prints as `[REDACTED]` and is zeroed when dropped.
#[derive(Clone)]
pub struct Token([u8; 32]);

impl Token {
    /// The SHA-256 of what a caller presented, to compare with configured tokens.
    pub fn digest_of(presented: &str) -> [u8; 32] {
        Sha256::digest(presented.as_bytes()).into()
    }

    /// Whether `presented` (a [`Token::digest_of`]) is this token, in constant time.
    pub fn is(&self, presented: &[u8; 32]) -> bool {
        bool::from(self.0.ct_eq(presented))
    }

    /// The token's SHA-256.
    pub fn digest(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<&str> for Token {
    fn from(token: &str) -> Self {
        Self(Self::digest_of(token))
    }
}

impl From<String> for Token {
    fn from(mut token: String) -> Self {
        let digested = Self::from(token.as_str());
        token.zeroize();
        digested
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token([REDACTED])")
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is not valid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Everything subledger can be configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/subledger`); the
    /// database is created if missing. A loopback host connects without TLS unless the URL
    /// or `PGSSLMODE` names an `sslmode` (`db::connect_options`).
    pub database_url: SecretString,
    /// `REDIS_URL` (default `redis://127.0.0.1:6379`). With `redis_cluster`, one or more
    /// of the cluster's nodes, comma-separated (the client learns the rest from them).
    pub redis_url: SecretString,
    /// `SUBLEDGER_REDIS_CLUSTER` (`true`/`false`, default `false`): `REDIS_URL` names
    /// nodes of a Redis Cluster rather than one server.
    pub redis_cluster: bool,
    /// `SUBLEDGER_REDIS_PREFIX`: put before every key (default empty).
    pub redis_prefix: String,
    /// `SUBLEDGER_CACHE_TTL_SECS` (default 86400).
    pub cache_ttl: Duration,
    /// `SUBLEDGER_LOCAL_CACHE_ENTRIES` (default 100000), `SUBLEDGER_LOCAL_CACHE_BYTES`
    /// (default 64 MiB), `SUBLEDGER_LOCAL_CACHE_MAX_AGE_MS` (default 10000; 0 turns it
    /// off), `SUBLEDGER_LOCAL_CACHE_REFRESH_MS` (default half the age): the in-process
    /// cache in front of Redis. Invalidated by every replica's writes; the age is only the
    /// backstop for a message that never came (docs/operations.md says why 10 s); an answer
    /// read past its refresh point (from four fifths of the refresh setting on) is served
    /// and read again from Redis in the background.
    pub local_cache: projections::LocalCacheConfig,
    /// `STRIPE_WEBHOOK_SECRET`: one or more signing secrets, comma-separated.
    pub webhook_secrets: Vec<SecretString>,
    /// `SUBLEDGER_EVENTBRIDGE_SECRET`: the secrets an EventBridge API destination sends in
    /// its header (comma-separated, each accepted, for rotation). Unset:
    /// `POST /webhooks/eventbridge` refuses everything.
    pub eventbridge_secrets: Vec<Token>,
    /// `SUBLEDGER_EVENTBRIDGE_HEADER`: the header that carries it (default
    /// `x-subledger-eventbridge-secret`), as configured on the API destination's
    /// connection (API key authorization: a header name and value of the operator's choice).
    pub eventbridge_header: String,
    /// `SUBLEDGER_SIGNATURE_TOLERANCE_SECS` (default 300).
    pub signature_tolerance_secs: i64,
    /// `SUBLEDGER_API_TOKEN`: the bearer tokens for `/v1`, comma-separated; any of them
    /// is accepted, so a token is rotated by adding the new one before removing the old.
    /// Unset: `/v1` refuses everyone.
    pub api_tokens: Vec<Token>,
    /// `SUBLEDGER_ADMIN_TOKEN`: the bearer tokens for `/admin` and the operator endpoints,
    /// comma-separated, as `api_tokens`. Unset: they refuse everyone.
    pub admin_tokens: Vec<Token>,
    /// `SUBLEDGER_ORG_TOKENS`: org-scoped bearer tokens, `token=org_id` pairs separated by
    /// commas. Each may read only `/v1/orgs/{its org}/entitlements`; an org may have
    /// several (to rotate one).
    pub org_tokens: Vec<OrgToken>,
    /// `SUBLEDGER_CATALOG`: the catalogue TOML (default: no plans, the default policy).
    pub catalog_path: Option<PathBuf>,
    /// `SUBLEDGER_LISTEN` (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// `SUBLEDGER_MAX_BODY_BYTES` (default 1 MiB).
    pub max_body_bytes: usize,
    /// `SUBLEDGER_HEADER_TIMEOUT_MS`: a request head must arrive whole within it; also how
    /// long a kept-alive connection may wait idle (default 5000). Stripe sends a whole
    /// request at once, in milliseconds; a client that takes seconds is slow or hostile.
    pub header_timeout: Duration,
    /// `SUBLEDGER_BODY_TIMEOUT_MS`: a request body must arrive whole within it of the head
    /// (default 10000: a 1 MiB body at under 1 Mbit/s; Stripe's are kilobytes, sent at once).
    pub body_timeout: Duration,
    /// `SUBLEDGER_MAX_CONNECTIONS`: connections served at once (default: four fifths of the
    /// open-file limit left after a reserve of 128 for Postgres, Redis and the log).
    pub max_connections: Option<usize>,
    /// `SUBLEDGER_WORKERS`: inbox workers (default [`default_workers`]: the CPUs this
    /// process may use, at least 2 and at most 4).
    pub workers: usize,
    /// `SUBLEDGER_AGGREGATE_CACHE`: customers whose aggregate the inbox workers keep in
    /// memory between batches, so a batch loads only the events after it (default 4096;
    /// 0 turns it off).
    pub aggregate_cache: usize,
    /// `SUBLEDGER_MAX_ATTEMPTS`: processing attempts before an inbox row is dead-lettered
    /// (default 8).
    pub max_attempts: i32,
    /// `SUBLEDGER_INBOX_RETENTION_HOURS`: a processed inbox row's raw payload is dropped
    /// this long after it was processed (default 720, 30 days: ten times Stripe's three
    /// days of retries, and as long as Stripe's own Events API keeps an event, so an
    /// operator can compare the two for a month; 0 keeps payloads forever). The row stays;
    /// dead letters and pending rows keep theirs; the log is never pruned.
    pub inbox_retention: Option<Duration>,
    /// `SUBLEDGER_DB_POOL`: Postgres connections (default 16).
    pub db_pool_size: u32,
    /// `SUBLEDGER_POLL_MS`: how often workers and projections look for work they were not
    /// told about (another replica's) (default 500).
    pub poll_interval: Duration,
    /// `STRIPE_SECRET_KEY`: the API key. Unset: no sync, checkout, portal or reconciler
    /// (their endpoints answer 503).
    pub stripe_secret_key: Option<SecretString>,
    /// Which of Stripe's modes this deployment serves: `SUBLEDGER_STRIPE_MODE` (`live` or
    /// `test`), else the key's prefix (`sk_live_`/`rk_live_` or `sk_test_`/`rk_test_`), else
    /// both (startup says so). An event of the other mode is stored and ignored.
    pub stripe_mode: StripeMode,
    /// `STRIPE_API_BASE` (default `https://api.stripe.com`); `/readyz` also checks that it
    /// can be reached.
    pub stripe_api_base: String,
    /// `SUBLEDGER_STRIPE_TIMEOUT_MS`: timeout of each Stripe HTTP attempt (default 10000).
    pub stripe_timeout: Duration,
    /// `SUBLEDGER_STRIPE_RETRIES`: retries of a safe Stripe failure (default 2).
    pub stripe_retries: u32,
    /// `SUBLEDGER_STRIPE_BACKOFF_MS`: wait before the first retry, doubled each time
    /// (default 250).
    pub stripe_backoff: Duration,
    /// `SUBLEDGER_SYNC_RETRY_MS`: wait before retrying a failed sync, doubled after each
    /// further failure, at most one hour (default 5000).
    pub sync_retry_base: Duration,
    /// `SUBLEDGER_RECONCILE_INTERVAL_SECS`: the periodic reconciler syncs customers whose
    /// state is older than this, and flagged ones (default 3600; 0 turns it off).
    pub reconcile_interval: Option<Duration>,
    /// `SUBLEDGER_RECOVERY_INTERVAL_SECS`: how often the missed-event recovery poller reads
    /// Stripe's Events API for undelivered events (default 300; 0 turns it off; needs a key).
    pub recovery_interval: Option<Duration>,
    /// `SUBLEDGER_PUBLIC_URL`: where browsers reach subledger. When set, checkout and
    /// portal sessions return through `/checkout/success` and `/portal/return` (which sync
    /// before redirecting to the caller's URL).
    pub public_url: Option<String>,
    /// `SUBLEDGER_REDIRECT_ORIGINS`: comma-separated origins (`https://app.example.com`)
    /// the success and portal-return pages may redirect to; relative paths always may.
    pub redirect_origins: Vec<String>,
    /// `SUBLEDGER_PROGRESS_SECS`: how often a long command (replay, import, backfill)
    /// prints a progress line when standard error is not a terminal (default 5; 0 prints
    /// one at every step). On a terminal it draws a bar instead.
    pub progress_every: Duration,
    /// `SUBLEDGER_NOTIFY_URLS`: comma-separated endpoints that receive the signed
    /// `entitlements.updated` notifications (none: nothing is notified).
    pub notify_urls: Vec<String>,
    /// `SUBLEDGER_NOTIFY_SECRET`: the Standard Webhooks signing secret, `whsec_<base64>`;
    /// required when `SUBLEDGER_NOTIFY_URLS` is set.
    pub notify_secret: Option<SecretString>,
    /// `SUBLEDGER_NOTIFY_MAX_ATTEMPTS`: attempts before a notification is a dead letter
    /// (default 12).
    pub notify_max_attempts: i32,
    /// `SUBLEDGER_NOTIFY_TIMEOUT_MS`: the longest one delivery may take (default 5000).
    pub notify_timeout: Duration,
    /// `SUBLEDGER_NOTIFY_BACKOFF_MS`: the delay before the first retry, doubled after each
    /// failure up to an hour (default 1000).
    pub notify_backoff: Duration,
}

/// The Stripe mode a deployment serves. Live and test objects share no ids, and an event
/// of the other mode must never grant anything here (issue 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeMode {
    Live,
    Test,
    /// Neither `SUBLEDGER_STRIPE_MODE` nor the key's prefix says: events of both modes
    /// are accepted (startup warns).
    Both,
}

impl StripeMode {
    /// Whether an event with this `livemode` belongs to the deployment.
    pub fn accepts(self, livemode: bool) -> bool {
        match self {
            Self::Live => livemode,
            Self::Test => !livemode,
            Self::Both => true,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
            Self::Both => "both",
        }
    }

    /// The mode a key's prefix names (secret `sk_` or restricted `rk_` keys).
    pub fn of_key(key: &str) -> Option<Self> {
        if key.starts_with("sk_live_") || key.starts_with("rk_live_") {
            Some(Self::Live)
        } else if key.starts_with("sk_test_") || key.starts_with("rk_test_") {
            Some(Self::Test)
        } else {
            None
        }
    }

    /// `SUBLEDGER_STRIPE_MODE` if set, else the key's mode, else both. A setting that
    /// contradicts the key is refused: the key could only ever read the other mode's
    /// objects, so every sync would disagree with every accepted event.
    pub fn resolve(setting: Option<&str>, key: Option<&str>) -> Result<Self, ConfigError> {
        let of_key = key.and_then(Self::of_key);
        let invalid = |reason: String| ConfigError::Invalid {
            name: "SUBLEDGER_STRIPE_MODE",
            reason,
        };
        let set = match setting.map(str::trim) {
            None => return Ok(of_key.unwrap_or(Self::Both)),
            Some("live") => Self::Live,
            Some("test") => Self::Test,
            Some(_) => return Err(invalid("must be `live` or `test`".into())),
        };
        match of_key {
            Some(key_mode) if key_mode != set => Err(invalid(format!(
                "is {} but STRIPE_SECRET_KEY is a {} key",
                set.as_str(),
                key_mode.as_str()
            ))),
            _ => Ok(set),
        }
    }
}

/// One org-scoped token: whoever presents `token` may read `org_id`'s entitlements only.
#[derive(Debug, Clone)]
pub struct OrgToken {
    pub token: Token,
    pub org_id: String,
}

/// Parses `token=org_id,token=org_id`. The error never repeats a token.
fn org_tokens(raw: &str) -> Result<Vec<OrgToken>, ConfigError> {
    raw.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .enumerate()
        .map(|(i, pair)| match pair.split_once('=') {
            Some((token, org)) if !token.trim().is_empty() && !org.trim().is_empty() => {
                Ok(OrgToken {
                    token: Token::from(token.trim()),
                    org_id: org.trim().to_owned(),
                })
            }
            _ => Err(ConfigError::Invalid {
                name: "SUBLEDGER_ORG_TOKENS",
                reason: format!("entry {} is not `token=org_id`", i + 1),
            }),
        })
        .collect()
}

fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The inbox workers a process runs unless told: one per CPU it may use, at least 2 (one
/// worker alone waits for each of its round trips with nothing else claimed) and at most 4
/// (the default before this was measured). Workers split the backlog by customer, so
/// more workers than CPUs only make each batch smaller, and every batch costs the same
/// fixed statements and commit: on 2 cores (Postgres on the same machine), 2 workers used
/// about 12 % less Postgres CPU per event than 4, and 1 worker more than either
/// (`./bench/run.sh --only ingest --customers 2000`, `SUBLEDGER_WORKERS` 1, 2 and 4).
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(4, std::num::NonZeroUsize::get)
        .clamp(2, 4)
}

/// `SUBLEDGER_THREADS`: the threads that run the service's tasks (HTTP, inbox workers,
/// projections); unset, one per CPU the process may use. Read before anything else
/// starts, since the runtime those tasks run on is built from it. On cores shared with
/// something busy (a sidecar beside its app, a load generator), fewer threads than cores
/// keep a thread from being descheduled with requests in hand: on 2 cores shared with
/// `wrk`, 1 thread answered more reads than 2, with a shorter tail (docs/operations.md).
pub fn runtime_threads() -> Result<Option<std::num::NonZeroUsize>, ConfigError> {
    threads_setting(var("SUBLEDGER_THREADS").as_deref())
}

fn threads_setting(raw: Option<&str>) -> Result<Option<std::num::NonZeroUsize>, ConfigError> {
    raw.map(|raw| {
        raw.trim().parse().map_err(|_| ConfigError::Invalid {
            name: "SUBLEDGER_THREADS",
            reason: format!("must be a whole number of at least 1, not {:?}", raw.trim()),
        })
    })
    .transpose()
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

/// Secrets separated by commas (blank entries dropped): every one is accepted, which is
/// how a secret is rotated without a moment where neither works.
fn secrets<T: for<'a> From<&'a str>>(name: &'static str) -> Vec<T> {
    var(name)
        .map(|raw| {
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(T::from)
                .collect()
        })
        .unwrap_or_default()
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let max_age_ms: u64 = parsed("SUBLEDGER_LOCAL_CACHE_MAX_AGE_MS", 10_000)?;
        let settings = Self {
            database_url: var("DATABASE_URL")
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/subledger".to_owned())
                .into(),
            redis_url: var("REDIS_URL")
                .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
                .into(),
            redis_cluster: parsed("SUBLEDGER_REDIS_CLUSTER", false)?,
            redis_prefix: var("SUBLEDGER_REDIS_PREFIX").unwrap_or_default(),
            cache_ttl: Duration::from_secs(parsed("SUBLEDGER_CACHE_TTL_SECS", 86_400)?),
            local_cache: projections::LocalCacheConfig {
                max_entries: parsed("SUBLEDGER_LOCAL_CACHE_ENTRIES", 100_000)?,
                max_bytes: parsed("SUBLEDGER_LOCAL_CACHE_BYTES", 64 * 1024 * 1024)?,
                max_age: Duration::from_millis(max_age_ms),
                refresh_after: Duration::from_millis(parsed(
                    "SUBLEDGER_LOCAL_CACHE_REFRESH_MS",
                    max_age_ms / 2,
                )?),
            },
            webhook_secrets: secrets("STRIPE_WEBHOOK_SECRET"),
            eventbridge_secrets: secrets("SUBLEDGER_EVENTBRIDGE_SECRET"),
            eventbridge_header: var("SUBLEDGER_EVENTBRIDGE_HEADER")
                .map(|name| name.trim().to_ascii_lowercase())
                .unwrap_or_else(|| "x-subledger-eventbridge-secret".to_owned()),
            signature_tolerance_secs: parsed("SUBLEDGER_SIGNATURE_TOLERANCE_SECS", 300)?,
            api_tokens: secrets("SUBLEDGER_API_TOKEN"),
            admin_tokens: secrets("SUBLEDGER_ADMIN_TOKEN"),
            org_tokens: org_tokens(&var("SUBLEDGER_ORG_TOKENS").unwrap_or_default())?,
            catalog_path: var("SUBLEDGER_CATALOG").map(PathBuf::from),
            listen: parsed("SUBLEDGER_LISTEN", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            max_body_bytes: parsed("SUBLEDGER_MAX_BODY_BYTES", 1024 * 1024)?,
            header_timeout: Duration::from_millis(parsed("SUBLEDGER_HEADER_TIMEOUT_MS", 5_000)?),
            body_timeout: Duration::from_millis(parsed("SUBLEDGER_BODY_TIMEOUT_MS", 10_000)?),
            max_connections: var("SUBLEDGER_MAX_CONNECTIONS")
                .map(|_| parsed("SUBLEDGER_MAX_CONNECTIONS", 0usize))
                .transpose()?,
            workers: parsed("SUBLEDGER_WORKERS", default_workers())?,
            aggregate_cache: parsed("SUBLEDGER_AGGREGATE_CACHE", 4096)?,
            max_attempts: parsed("SUBLEDGER_MAX_ATTEMPTS", 8)?,
            inbox_retention: match parsed("SUBLEDGER_INBOX_RETENTION_HOURS", 720u64)? {
                0 => None,
                hours => Some(Duration::from_secs(hours * 3600)),
            },
            db_pool_size: parsed("SUBLEDGER_DB_POOL", 16)?,
            poll_interval: Duration::from_millis(parsed("SUBLEDGER_POLL_MS", 500)?),
            stripe_mode: StripeMode::resolve(
                var("SUBLEDGER_STRIPE_MODE").as_deref(),
                var("STRIPE_SECRET_KEY").as_deref(),
            )?,
            stripe_secret_key: var("STRIPE_SECRET_KEY").map(SecretString::from),
            stripe_api_base: var("STRIPE_API_BASE")
                .unwrap_or_else(|| DEFAULT_STRIPE_API_BASE.to_owned()),
            stripe_timeout: Duration::from_millis(parsed("SUBLEDGER_STRIPE_TIMEOUT_MS", 10_000)?),
            stripe_retries: parsed("SUBLEDGER_STRIPE_RETRIES", 2)?,
            stripe_backoff: Duration::from_millis(parsed("SUBLEDGER_STRIPE_BACKOFF_MS", 250)?),
            sync_retry_base: Duration::from_millis(parsed("SUBLEDGER_SYNC_RETRY_MS", 5_000)?),
            reconcile_interval: match parsed("SUBLEDGER_RECONCILE_INTERVAL_SECS", 3_600u64)? {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            recovery_interval: match parsed("SUBLEDGER_RECOVERY_INTERVAL_SECS", 300u64)? {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            public_url: var("SUBLEDGER_PUBLIC_URL").map(|url| url.trim_end_matches('/').to_owned()),
            progress_every: Duration::from_secs(parsed("SUBLEDGER_PROGRESS_SECS", 5)?),
            notify_urls: var("SUBLEDGER_NOTIFY_URLS")
                .map(|raw| {
                    raw.split(',')
                        .map(|url| url.trim().to_owned())
                        .filter(|url| !url.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            notify_secret: var("SUBLEDGER_NOTIFY_SECRET").map(SecretString::from),
            notify_max_attempts: parsed("SUBLEDGER_NOTIFY_MAX_ATTEMPTS", 12)?,
            notify_timeout: Duration::from_millis(parsed("SUBLEDGER_NOTIFY_TIMEOUT_MS", 5_000)?),
            notify_backoff: Duration::from_millis(parsed("SUBLEDGER_NOTIFY_BACKOFF_MS", 1_000)?),
            redirect_origins: var("SUBLEDGER_REDIRECT_ORIGINS")
                .map(|raw| {
                    raw.split(',')
                        .map(|origin| origin.trim().trim_end_matches('/').to_owned())
                        .filter(|origin| !origin.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        };
        // The secret's format is checked where the key is built (`startup`).
        if !settings.notify_urls.is_empty() && settings.notify_secret.is_none() {
            return Err(ConfigError::Invalid {
                name: "SUBLEDGER_NOTIFY_SECRET",
                reason: "must be set when SUBLEDGER_NOTIFY_URLS is".into(),
            });
        }
        if settings.notify_max_attempts < 1 {
            return Err(ConfigError::Invalid {
                name: "SUBLEDGER_NOTIFY_MAX_ATTEMPTS",
                reason: "must be at least 1".into(),
            });
        }
        if settings.workers == 0 {
            return Err(ConfigError::Invalid {
                name: "SUBLEDGER_WORKERS",
                reason: "must be at least 1".into(),
            });
        }
        if settings.header_timeout.is_zero() || settings.body_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                name: "SUBLEDGER_HEADER_TIMEOUT_MS / SUBLEDGER_BODY_TIMEOUT_MS",
                reason: "must be at least 1".into(),
            });
        }
        if settings.max_connections == Some(0) {
            return Err(ConfigError::Invalid {
                name: "SUBLEDGER_MAX_CONNECTIONS",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_a_positive_count_or_the_runtime_default() {
        assert_eq!(threads_setting(None).unwrap(), None);
        assert_eq!(
            threads_setting(Some(" 3 ")).unwrap().map(|n| n.get()),
            Some(3)
        );
        for bad in ["0", "-1", "two", ""] {
            let error = threads_setting(Some(bad)).unwrap_err().to_string();
            assert!(
                error.starts_with("SUBLEDGER_THREADS is not valid"),
                "{error}"
            );
        }
    }

    #[test]
    fn org_tokens_parse_and_bad_entries_are_named_without_their_token() {
        let tokens = org_tokens(" tok_a=org_a, tok_b = org_b ,").unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens[1].token.is(&Token::digest_of("tok_b")));
        assert_eq!(tokens[1].org_id, "org_b");
        let error = org_tokens("tok_a=org_a,sekrit_without_org").unwrap_err();
        assert!(error.to_string().contains("entry 2"), "{error}");
        assert!(!error.to_string().contains("sekrit"), "{error}");
        assert!(org_tokens("").unwrap().is_empty());
    }

    #[test]
    fn the_mode_comes_from_the_setting_else_the_key_else_both() {
        use StripeMode::*;
        assert_eq!(StripeMode::resolve(None, Some("sk_live_x")).unwrap(), Live);
        assert_eq!(StripeMode::resolve(None, Some("rk_live_x")).unwrap(), Live);
        assert_eq!(StripeMode::resolve(None, Some("sk_test_x")).unwrap(), Test);
        assert_eq!(StripeMode::resolve(None, Some("rk_test_x")).unwrap(), Test);
        assert_eq!(StripeMode::resolve(None, Some("whatever")).unwrap(), Both);
        assert_eq!(StripeMode::resolve(None, None).unwrap(), Both);
        assert_eq!(StripeMode::resolve(Some("live"), None).unwrap(), Live);
        assert_eq!(
            StripeMode::resolve(Some("test"), Some("rk_test_x")).unwrap(),
            Test
        );
        assert!(StripeMode::resolve(Some("live"), Some("sk_test_x")).is_err());
        assert!(StripeMode::resolve(Some("both"), None).is_err());
        assert!(Live.accepts(true) && !Live.accepts(false));
        assert!(Test.accepts(false) && !Test.accepts(true));
        assert!(Both.accepts(true) && Both.accepts(false));
    }
}
