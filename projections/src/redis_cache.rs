//! The Redis cache: `stripe:customer:{customer_id}` holds the customer's
//! `SubscriptionInfo` JSON; `stripe:org:{org_id}` and `stripe:user:{user_id}` are hashes
//! holding the answer of every customer linked to that owner (field = customer id), plus
//! `~complete` once a fill from Postgres made it whole, so that an owner's read is one
//! `HGETALL` and the union is judged from what it returns; all with a TTL (24 h by
//! default). A hash without `~complete` (it expired and a write began it again) is read
//! as a miss: a union over part of the customers would be wrong.
//!
//! Redis is never the source of truth: every key can be dropped at any time and is
//! rebuilt from the log (or read through from Postgres). A write never replaces a value
//! of a newer version, so the cache never goes backwards.
//!
//! The connection is made on first use and again after a failure ([`LazyConnection`]), so
//! the service starts and serves without Redis and picks it up when it comes back.
//!
//! Reads go through the in-process cache first ([`crate::local_cache`]) when it is
//! turned on and its invalidation channel is up; every write here publishes the keys it
//! wrote on that channel, after writing them.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus::{register_int_counter_vec, IntCounterVec};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use crate::catalog::Catalog;
use crate::info::SubscriptionInfo;
use crate::local_cache::{self, LocalCache, LocalCacheConfig, Lookup};
use crate::log::{newest_per_aggregate, LoggedEvent};
use crate::runner::{EventualProjection, ProjectionError};

/// Sets the customer value unless the stored one has a newer version, and writes it into
/// the hash of each owner (org, user) the customer is linked to, dropping it from the
/// hashes of owners the stored value linked it to and this one does not (moved, deleted).
/// Returns 1 when written, 0 when the stored value was newer.
///
/// KEYS[1]: the customer key. ARGV: the answer's JSON, its version, the TTL, the customer
/// id, the key prefix, the linked org id and user id ('' for none), and the in-process
/// caches' invalidation channel (an owner's hash it drops the customer from is published
/// there: the caller publishes only the keys the new value names).
const PUT_SCRIPT: &str = r#"
local function version_of(raw)
  if not raw then return nil end
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then return decoded, tonumber(decoded['version']) end
  return nil
end
local new_version = tonumber(ARGV[2])
local old, old_version = version_of(redis.call('GET', KEYS[1]))
if old_version and old_version > new_version then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
local function owner_key(kind, id) return ARGV[5] .. 'stripe:' .. kind .. ':' .. id end
local function unlink(key)
  if redis.call('TYPE', key)['ok'] == 'hash' then
    redis.call('HDEL', key, ARGV[4])
    redis.call('PUBLISH', ARGV[8], key)
  end
end
local function link(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', key) end
  local _, held = version_of(redis.call('HGET', key, ARGV[4]))
  if not held or held <= new_version then redis.call('HSET', key, ARGV[4], ARGV[1]) end
  redis.call('EXPIRE', key, ARGV[3])
end
if old and old['deleted'] ~= true then
  if type(old['org_id']) == 'string' and old['org_id'] ~= ARGV[6] then unlink(owner_key('org', old['org_id'])) end
  if type(old['user_id']) == 'string' and old['user_id'] ~= ARGV[7] then unlink(owner_key('user', old['user_id'])) end
end
if ARGV[6] ~= '' then link(owner_key('org', ARGV[6])) end
if ARGV[7] ~= '' then link(owner_key('user', ARGV[7])) end
return 1
"#;

/// Fills an owner's hash from what Postgres holds (a read that found it missing or
/// incomplete), then marks it complete; a member's own customer key is written too when
/// Redis held an older one or none. Each member is written as the newest of what
/// Postgres gave, the customer key and the hash field hold, and only if that newest value
/// still links the customer to this owner, so a fill racing the projection never brings
/// back a customer that moved away nor drops one that just arrived.
///
/// KEYS[1]: the owner hash. ARGV: the TTL, the owner field (`org_id`/`user_id`), the owner
/// id, the key prefix, then (customer id, JSON, version) for each member.
const FILL_SCRIPT: &str = r#"
local function decode(raw)
  if not raw then return nil, nil end
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then return decoded, tonumber(decoded['version']) end
  return nil, nil
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
for i = 5, #ARGV, 3 do
  local id, value, version = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local customer_key = ARGV[4] .. 'stripe:customer:' .. id
  local _, cached = decode(redis.call('GET', customer_key) or nil)
  if cached and cached > version then
    value, version = redis.call('GET', customer_key), cached
  elseif not cached or cached < version then
    -- The customer's own key is read through too.
    redis.call('SET', customer_key, value, 'EX', ARGV[1])
  end
  local _, held = decode(redis.call('HGET', KEYS[1], id) or nil)
  if held and held > version then value, version = redis.call('HGET', KEYS[1], id), held end
  local decoded = decode(value)
  if decoded and decoded[ARGV[2]] == ARGV[3] and decoded['deleted'] ~= true then
    redis.call('HSET', KEYS[1], id, value)
  else
    redis.call('HDEL', KEYS[1], id)
  end
end
redis.call('HSET', KEYS[1], '~complete', '1')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"#;

/// The field that marks an owner's hash as holding every linked customer.
pub const COMPLETE_FIELD: &str = "~complete";

/// Which kind of owner a hash belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Org,
    User,
}

impl Owner {
    /// The `SubscriptionInfo` field naming this kind of owner.
    pub fn field(self) -> &'static str {
        match self {
            Owner::Org => "org_id",
            Owner::User => "user_id",
        }
    }

    /// Whether `info` is linked to this owner now (named by it, and not deleted).
    pub fn links(self, info: &SubscriptionInfo, id: &str) -> bool {
        let (org, user) = info.linked_owners();
        match self {
            Owner::Org => org == Some(id),
            Owner::User => user == Some(id),
        }
    }
}

fn fill_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(FILL_SCRIPT))
}

fn put_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(PUT_SCRIPT))
}
/// Writes the version guard refused because Redis already held a newer answer, by writer
/// (`projection` or `read_through`). Registered in prometheus' default registry, which
/// `GET /metrics` serves. A steady trickle is normal (read-through writes racing the
/// projection); it only ever means an older answer was kept out.
pub static STALE_WRITES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let counter = register_int_counter_vec!(
        "subledger_cache_stale_writes_total",
        "Cache writes refused because Redis held a newer version",
        &["writer"]
    )
    .expect("the metric is registered once");
    for writer in ["projection", "read_through"] {
        counter.with_label_values(&[writer]);
    }
    counter
});

/// The key schema, with an optional prefix (tests give each run its own).
#[derive(Debug, Clone, Default)]
pub struct CacheKeys {
    pub prefix: String,
}

impl CacheKeys {
    pub fn customer(&self, customer_id: &str) -> String {
        format!("{}stripe:customer:{customer_id}", self.prefix)
    }
    pub fn org(&self, org_id: &str) -> String {
        format!("{}stripe:org:{org_id}", self.prefix)
    }
    pub fn user(&self, user_id: &str) -> String {
        format!("{}stripe:user:{user_id}", self.prefix)
    }
    /// Every key this cache owns, as SCAN patterns.
    pub fn patterns(&self) -> [String; 3] {
        [self.customer("*"), self.org("*"), self.user("*")]
    }
}

/// How long after a failed connection attempt callers get an error at once instead of a new
/// attempt: during an outage a request pays for at most one failed connect per interval.
const CONNECT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A Redis connection made on first use. Until one succeeds every use tries again (at most
/// once per [`CONNECT_RETRY_AFTER`]); once made, the `ConnectionManager` reconnects by
/// itself after Redis goes away and comes back.
#[derive(Clone)]
pub struct LazyConnection {
    client: redis::Client,
    config: ConnectionManagerConfig,
    conn: Arc<tokio::sync::OnceCell<ConnectionManager>>,
    failed_at: Arc<Mutex<Option<Instant>>>,
}

impl LazyConnection {
    /// The client it connects with (for a connection of another kind: a subscription).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }
}

impl LazyConnection {
    pub fn new(client: redis::Client, config: ConnectionManagerConfig) -> Self {
        Self {
            client,
            config,
            conn: Arc::new(tokio::sync::OnceCell::new()),
            failed_at: Arc::new(Mutex::new(None)),
        }
    }

    /// The connection, connecting first if there is none yet.
    pub async fn get(&self) -> Result<ConnectionManager, redis::RedisError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        let recently_failed = self
            .failed_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some_and(|at| at.elapsed() < CONNECT_RETRY_AFTER);
        if recently_failed {
            return Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "Redis is unreachable (the last connection attempt failed)",
            )));
        }
        let made = self
            .conn
            .get_or_try_init(|| {
                ConnectionManager::new_with_config(self.client.clone(), self.config.clone())
            })
            .await;
        match made {
            Ok(conn) => Ok(conn.clone()),
            Err(error) => {
                *self
                    .failed_at
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
                Err(error)
            }
        }
    }
}

/// What the in-process cache holds for a key: the answer Redis gave, decoded once, so a
/// hit costs no parse.
#[derive(Clone)]
pub enum Cached {
    /// A customer key's answer.
    Customer(Arc<SubscriptionInfo>),
    /// A complete owner hash: the answers in it that link their customer to the owner.
    Owner(Arc<[SubscriptionInfo]>),
}

#[derive(Clone)]
pub struct RedisCache {
    conn: LazyConnection,
    keys: CacheKeys,
    ttl_secs: u64,
    catalog: Arc<Catalog>,
    /// Values read from Redis, decoded, by full key (off unless
    /// [`RedisCache::with_local_cache`]).
    local: Arc<LocalCache<Cached>>,
}

impl RedisCache {
    pub fn new(
        conn: LazyConnection,
        keys: CacheKeys,
        ttl_secs: u64,
        catalog: Arc<Catalog>,
    ) -> Self {
        Self {
            conn,
            keys,
            ttl_secs,
            catalog,
            local: Arc::new(LocalCache::new(LocalCacheConfig {
                max_entries: 0,
                max_bytes: 0,
                max_age: Duration::ZERO,
            })),
        }
    }

    /// Puts an in-process cache in front of Redis. It serves nothing until
    /// [`RedisCache::listen_for_invalidations`] runs and is subscribed.
    pub fn with_local_cache(mut self, config: LocalCacheConfig) -> Self {
        self.local = Arc::new(LocalCache::new(config));
        self
    }

    pub fn keys(&self) -> &CacheKeys {
        &self.keys
    }

    /// The in-process cache (for its gauges).
    pub fn local(&self) -> &LocalCache<Cached> {
        &self.local
    }

    /// The channel this cache's writes are published on.
    fn channel(&self) -> String {
        local_cache::channel(&self.keys.prefix)
    }

    /// Keeps the in-process cache subscribed to the invalidations of every replica's
    /// writes until `stop` (it is bypassed whenever it is not). Returns at once when the
    /// in-process cache is off.
    pub async fn listen_for_invalidations(&self, stop: tokio::sync::watch::Receiver<bool>) {
        let conn = self.conn.clone();
        let channel = self.channel();
        let publish = move || {
            let conn = conn.clone();
            let channel = channel.clone();
            async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(local_cache::HEARTBEAT)
                    .query_async::<i64>(&mut conn.get().await?)
                    .await
                    .map(|_| ())
            }
        };
        local_cache::listen(
            self.conn.client().clone(),
            self.channel(),
            self.local.clone(),
            publish,
            stop,
        )
        .await
    }

    /// The keys a write of `info` sets.
    fn keys_of(&self, info: &SubscriptionInfo) -> Vec<String> {
        let mut keys = vec![self.keys.customer(&info.customer_id)];
        keys.extend(info.org_id.as_deref().map(|org| self.keys.org(org)));
        keys.extend(info.user_id.as_deref().map(|user| self.keys.user(user)));
        keys
    }

    /// Publishes, after the writes before it in `pipe`, that these keys changed.
    fn publish_written(&self, pipe: &mut redis::Pipeline, keys: &[String]) {
        if !keys.is_empty() {
            pipe.cmd("PUBLISH")
                .arg(self.channel())
                .arg(keys.join("\n"))
                .ignore();
        }
    }

    /// The cached answer for a customer, from memory when the in-process cache holds it,
    /// else from Redis (and then kept in memory, decoded, if no invalidation came
    /// meanwhile); a value that does not decode counts as a miss.
    pub async fn customer(
        &self,
        customer_id: &str,
    ) -> Result<Option<SubscriptionInfo>, redis::RedisError> {
        let key = self.keys.customer(customer_id);
        let ticket = match self.local.get(&key) {
            Lookup::Hit(Cached::Customer(info)) => return Ok(Some((*info).clone())),
            Lookup::Miss(ticket) => Some(ticket),
            // A key holds one kind of value; anything else is read again.
            Lookup::Hit(Cached::Owner(_)) | Lookup::Bypass => None,
        };
        let raw: Option<String> = self.conn.get().await?.get(&key).await?;
        let Some(raw) = raw else { return Ok(None) };
        match serde_json::from_str::<SubscriptionInfo>(&raw) {
            Ok(info) => {
                if let Some(ticket) = ticket {
                    let cached = Cached::Customer(Arc::new(info.clone()));
                    self.local.insert(&key, cached, raw.len(), ticket);
                }
                Ok(Some(info))
            }
            Err(error) => {
                // serde_json's message can quote the value (an org or user id, which can
                // be personal data): at warn only where it failed; the message at debug.
                tracing::warn!(
                    customer_id,
                    line = error.line(),
                    column = error.column(),
                    "undecodable cache value, reading through"
                );
                tracing::debug!(customer_id, %error, "undecodable cache value: why");
                Ok(None)
            }
        }
    }

    /// The answers of the customers linked to an owner that its hash holds, and whether
    /// the hash is complete (holds every one). An incomplete or missing hash must be read
    /// from Postgres and filled ([`RedisCache::fill_owner`]); what it holds is only good
    /// for an outage of Postgres. One round trip. Values that no longer link the customer
    /// here are left out.
    pub async fn owner(
        &self,
        owner: Owner,
        id: &str,
    ) -> Result<(bool, Arc<[SubscriptionInfo]>), redis::RedisError> {
        let key = self.owner_key(owner, id);
        // The in-process cache holds a complete hash's answers, decoded, under the hash's
        // key (invalidated by every write that touches the hash).
        let ticket = match self.local.get(&key) {
            Lookup::Hit(Cached::Owner(infos)) => return Ok((true, infos)),
            Lookup::Miss(ticket) => Some(ticket),
            Lookup::Hit(Cached::Customer(_)) | Lookup::Bypass => None,
        };
        let fields: Result<Vec<(String, String)>, redis::RedisError> =
            self.conn.get().await?.hgetall(&key).await;
        let fields = match fields {
            Ok(fields) => fields,
            // A key of the old shape (a customer id as a string): a miss; the fill
            // replaces it.
            Err(error) if error.kind() == redis::ErrorKind::TypeError => {
                return Ok((false, Arc::from([])))
            }
            Err(error) => return Err(error),
        };
        let bytes = fields.iter().map(|(f, v)| f.len() + v.len()).sum();
        let (complete, infos) = Self::owner_fields(owner, id, fields);
        let infos: Arc<[SubscriptionInfo]> = infos.into();
        if let (Some(ticket), true) = (ticket, complete) {
            self.local
                .insert(&key, Cached::Owner(infos.clone()), bytes, ticket);
        }
        Ok((complete, infos))
    }

    /// What an owner's hash holds: whether it is complete, and the answers that still
    /// link their customer to it.
    fn owner_fields(
        owner: Owner,
        id: &str,
        fields: Vec<(String, String)>,
    ) -> (bool, Vec<SubscriptionInfo>) {
        let mut complete = false;
        let mut infos = Vec::with_capacity(fields.len());
        for (field, raw) in fields {
            if field == COMPLETE_FIELD {
                complete = true;
                continue;
            }
            match serde_json::from_str::<SubscriptionInfo>(&raw) {
                Ok(info) if owner.links(&info, id) => infos.push(info),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(
                        customer_id = field,
                        line = error.line(),
                        column = error.column(),
                        "undecodable cache value, reading through"
                    );
                    return (false, vec![]);
                }
            }
        }
        (complete, infos)
    }

    fn owner_key(&self, owner: Owner, id: &str) -> String {
        match owner {
            Owner::Org => self.keys.org(id),
            Owner::User => self.keys.user(id),
        }
    }

    /// Writes every linked customer's answer (as Postgres holds them) into the owner's
    /// hash and marks it complete (see `FILL_SCRIPT` for how it stays right while the
    /// projection writes at the same time).
    pub async fn fill_owner(
        &self,
        owner: Owner,
        id: &str,
        infos: &[SubscriptionInfo],
    ) -> Result<(), ProjectionError> {
        let mut invocation = fill_script().key(self.owner_key(owner, id));
        invocation
            .arg(self.ttl_secs)
            .arg(owner.field())
            .arg(id)
            .arg(&self.keys.prefix);
        for info in infos {
            invocation
                .arg(&info.customer_id)
                .arg(serde_json::to_string(info)?)
                .arg(info.version);
        }
        let _: i64 = invocation.invoke_async(&mut self.conn.get().await?).await?;
        // Every replica drops what it held of this hash (and of the customer keys the
        // fill may have written).
        let mut pipe = redis::pipe();
        let mut keys = vec![self.owner_key(owner, id)];
        keys.extend(
            infos
                .iter()
                .map(|info| self.keys.customer(&info.customer_id)),
        );
        self.publish_written(&mut pipe, &keys);
        let _: () = pipe.query_async(&mut self.conn.get().await?).await?;
        Ok(())
    }

    /// The script call that writes `info`, by the script's hash (`EVALSHA`): the script
    /// must have been loaded (every batch loads it first; `put` falls back by itself).
    fn put_command(&self, info: &SubscriptionInfo) -> Result<redis::Cmd, serde_json::Error> {
        let (org, user) = info.linked_owners();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(put_script().get_hash())
            .arg(1)
            .arg(self.keys.customer(&info.customer_id))
            .arg(serde_json::to_string(info)?)
            .arg(info.version)
            .arg(self.ttl_secs)
            .arg(&info.customer_id)
            .arg(&self.keys.prefix)
            .arg(org.unwrap_or(""))
            .arg(user.unwrap_or(""))
            .arg(self.channel());
        Ok(cmd)
    }

    /// Writes one answer (read-through after a miss). Returns false when the cache
    /// already held a newer version.
    pub async fn put(&self, info: &SubscriptionInfo) -> Result<bool, ProjectionError> {
        let mut pipe = redis::pipe();
        pipe.add_command(self.put_command(info)?);
        self.publish_written(&mut pipe, &self.keys_of(info));
        let (written,): (i64,) = pipe.query_async(&mut self.conn.get().await?).await?;
        if written != 1 {
            STALE_WRITES.with_label_values(&["read_through"]).inc();
        }
        Ok(written == 1)
    }

    /// Whether Redis answers at all (for metrics and health).
    pub async fn ping(&self) -> Result<(), redis::RedisError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.get().await?)
            .await
            .map(|_| ())
    }

    /// A key's raw value and its remaining TTL in seconds (-1: no TTL, -2: no key), for
    /// the operators' inspectors. `key` is the full key, prefix included; for an owner's
    /// hash the value is `customer_id`'s field in it.
    pub async fn inspect_key(
        &self,
        key: &str,
        customer_id: &str,
    ) -> Result<(Option<String>, i64), redis::RedisError> {
        let mut conn = self.conn.get().await?;
        let kind: String = redis::cmd("TYPE").arg(key).query_async(&mut conn).await?;
        let mut pipe = redis::pipe();
        if kind == "hash" {
            pipe.hget(key, customer_id);
        } else {
            pipe.get(key);
        }
        let (value, ttl): (Option<String>, i64) = pipe.ttl(key).query_async(&mut conn).await?;
        Ok((value, ttl))
    }

    /// Deletes every key this cache owns.
    pub async fn clear_all(&self) -> Result<u64, redis::RedisError> {
        let mut conn = self.conn.get().await?;
        let mut deleted = 0;
        for pattern in self.keys.patterns() {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                if !keys.is_empty() {
                    deleted += keys.len() as u64;
                    let _: () = conn.del(keys).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.channel())
            .arg(local_cache::ALL_KEYS)
            .query_async(&mut conn)
            .await?;
        Ok(deleted)
    }
}

impl EventualProjection for RedisCache {
    const NAME: &'static str = "redis_cache";

    async fn apply(&self, events: &[LoggedEvent]) -> Result<(), ProjectionError> {
        let mut pipe = redis::pipe();
        // Loading is idempotent and cheap; it makes every EVALSHA below find the script,
        // even on a Redis that restarted since the last batch.
        pipe.cmd("SCRIPT").arg("LOAD").arg(PUT_SCRIPT).ignore();
        let mut written_keys = Vec::new();
        for logged in newest_per_aggregate(events) {
            let info = SubscriptionInfo::from_logged(logged, &self.catalog);
            pipe.add_command(self.put_command(&info)?);
            written_keys.extend(self.keys_of(&info));
        }
        // Last in the pipeline, so every replica hears of the keys after they are written.
        self.publish_written(&mut pipe, &written_keys);
        let written: Vec<i64> = pipe.query_async(&mut self.conn.get().await?).await?;
        let refused = written.iter().filter(|w| **w == 0).count();
        if refused > 0 {
            STALE_WRITES
                .with_label_values(&["projection"])
                .inc_by(refused as u64);
            tracing::debug!(refused, "cache held newer versions; older writes skipped");
        }
        Ok(())
    }

    async fn clear(&self) -> Result<(), ProjectionError> {
        self.clear_all().await?;
        Ok(())
    }
}
