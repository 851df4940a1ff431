//! The Redis cache: `stripe:customer:{customer_id}` holds the customer's
//! `SubscriptionInfo` JSON; `stripe:org:{org_id}` and `stripe:user:{user_id}` are hashes
//! holding the answer of every customer linked to that owner (field = customer id), plus
//! `~complete` once a fill from Postgres made it whole, so that an owner's read is one
//! `HGETALL` and the union is judged from what it returns. A customer key's TTL (24 h by
//! default) is set by every write of it; an owner's hash gets its TTL when it is made and
//! keeps it (a write to a hash that has one leaves it be), so no field outlives the
//! customer key written with it. A hash without `~complete` (it expired and a write began
//! it again) is read as a miss: a union over part of the customers would be wrong.
//!
//! Redis is never the source of truth: every key can be dropped at any time and is
//! rebuilt from the log (or read through from Postgres). A write never replaces a value
//! of a newer version, so the cache never goes backwards.
//!
//! **Every write touches one key**, so that the same code serves a Redis Cluster (which
//! refuses a script or a transaction over keys of different hash slots). Hash tags cannot
//! put a customer's key beside its owners' hashes: an owner has many customers and a
//! customer has up to two owners, which may change. So an answer is written in two
//! phases, each a batch of single-key scripts ([`crate::RedisConn::run`]: one pipeline
//! standalone, concurrent commands on a cluster):
//! 1. the customer key (`CUSTOMER_SCRIPT`), unless it holds a newer version; it answers
//!    the owners the value it replaced was linked to;
//! 2. if it was written, the customer's field in the hash of every owner the new value
//!    links **and** every owner the replaced value linked (`OWNER_SCRIPT`), each unless
//!    that field holds a newer version. A moved customer's old field is overwritten with
//!    the new value rather than deleted: readers ignore a field whose value no longer links
//!    the customer to that owner, and the field's version then keeps a late older write
//!    (still linking it there) out, which a deleted field could not.
//!
//! Each key's guard is its own version, so any interleaving of writers leaves each key
//! holding the newest answer written to it (`tests` below race them). Owner writes that
//! a failure left undone are kept and made by the next write (`keep_unfinished`): a retry
//! finds the customer key already written and could no longer name the owners it left.
//!
//! The connection is made on first use and again after a failure ([`LazyConnection`]), so
//! the service starts and serves without Redis and picks it up when it comes back.
//!
//! Reads go through the in-process cache first ([`crate::local_cache`]) when it is
//! turned on and its invalidation channel is up; every write here publishes the keys it
//! wrote on that channel, after writing them.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prometheus::{register_int_counter_vec, IntCounterVec};
use redis::AsyncCommands;

use crate::batch::{Answer, Events};
use crate::catalog::Catalog;
use crate::info::SubscriptionInfo;
use crate::local_cache::{self, LocalCache, LocalCacheConfig, Lookup, Ticket};
pub use crate::redis_conn::LazyConnection;
use crate::redis_conn::RedisConn;
use crate::runner::{EventualProjection, ProjectionError};

/// Decodes a stored answer: the table and its version, or nothing for a value that is
/// absent or does not decode. `version_of` gives the version alone without decoding the
/// whole answer (a cjson decode of its 2 KB was most of a script's cost): every answer
/// this cache writes is serde_json's compact `SubscriptionInfo`, which holds the key
/// `"version":` once, its own (`stored_answers_name_their_version_once` checks it), so
/// its first `"version":` (a plain search, a quarter of a pattern's cost on 3 KB) is
/// followed by the version's digits; a value in another shape is decoded. `owners_of`
/// reads the owners a replaced answer linked the same way: from the first `"org_id":`,
/// `"user_id":` and `"deleted":` of a compact answer (each a key of `SubscriptionInfo`
/// that no field written before it holds, which `stored_answers_name_their_version_once`
/// checks too; a key inside a string value has its quotes escaped, so it never matches),
/// decoding the answer only when one of them is not a plain string, `null` or a boolean
/// there. Shared by the scripts below.
const DECODE: &str = r#"
local function decode(raw)
  if not raw then return nil, nil end
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then return decoded, tonumber(decoded['version']) end
  return nil, nil
end
local function version_of(raw)
  if not raw then return nil end
  local at = string.find(raw, '"version":', 1, true)
  local version = at and string.match(raw, '^(%d+)[,}]', at + 10)
  if version then return tonumber(version) end
  local _, decoded = decode(raw)
  return decoded
end
local function compact_field(raw, key)
  local at = string.find(raw, '"' .. key .. '":', 1, true)
  if not at then return nil end
  local from = at + #key + 3
  local text = string.match(raw, '^"([^"\\]*)"[,}]', from)
  if text then return 'string', text end
  local word = string.match(raw, '^(%a+)[,}]', from)
  if word == 'null' or word == 'true' or word == 'false' then return word, word end
  return nil
end
local function owners_of(raw)
  if not raw then return '', '' end
  local org_kind, org = compact_field(raw, 'org_id')
  local user_kind, user = compact_field(raw, 'user_id')
  local deleted = compact_field(raw, 'deleted')
  if org_kind and user_kind and (deleted == 'true' or deleted == 'false') then
    if deleted == 'true' then return '', '' end
    if org_kind ~= 'string' then org = '' end
    if user_kind ~= 'string' then user = '' end
    return org, user
  end
  local old = decode(raw)
  if not old or old['deleted'] == true then return '', '' end
  org, user = '', ''
  if type(old['org_id']) == 'string' then org = old['org_id'] end
  if type(old['user_id']) == 'string' then user = old['user_id'] end
  return org, user
end
"#;

/// Sets the customer key unless it holds a newer version (or, for a read-through, the
/// same one: see [`Writer`]). Returns `{1, org, user}` when written, with the owners the
/// replaced value was linked to ('' for none; none when it was deleted), `{0, '', ''}`
/// when the held value was newer, or `{2, '', ''}` when a read-through found the same
/// version (the TTL of a value left is renewed, so that it lives as long as any hash field
/// written beside it).
///
/// KEYS[1]: the customer key. ARGV: the answer's JSON, its version, the TTL, '1' for a
/// read-through.
const CUSTOMER_SCRIPT: &str = r#"
local raw = redis.call('GET', KEYS[1])
local old_version = version_of(raw)
local version = tonumber(ARGV[2])
if old_version and (old_version > version or (old_version == version and ARGV[4] == '1')) then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  if old_version > version then return {0, '', ''} end
  return {2, '', ''}
end
local org, user = owners_of(raw)
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return {1, org, user}
"#;

/// Sets a customer's field in an owner's hash unless the field holds a newer version (or,
/// for a read-through, the same one), whether or not the value links the customer to this
/// owner (readers judge that); gives the hash the TTL when it has none. Returns 1 when
/// written.
///
/// KEYS[1]: the owner's hash. ARGV: the customer id, the answer's JSON, its version, the
/// TTL, '1' for a read-through.
const OWNER_SCRIPT: &str = r#"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
local held = version_of(redis.call('HGET', KEYS[1], ARGV[1]))
local version = tonumber(ARGV[3])
local written = 0
if not held or held < version or (held == version and ARGV[5] ~= '1') then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  written = 1
end
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return written
"#;

/// Fills an owner's hash from what Postgres holds (a read that found it missing or
/// incomplete), then marks it complete: each member's field as `OWNER_SCRIPT` would set
/// it for a read-through (unless it holds the same version or a newer one), so a fill
/// racing the projection never brings
/// back a customer that moved away nor drops one that just arrived. The members' own
/// keys, and the hashes of owners they left, are written before it like any answer.
///
/// KEYS[1]: the owner hash. ARGV: the TTL, then (customer id, JSON, version) for each member.
const FILL_SCRIPT: &str = r#"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
for i = 2, #ARGV, 3 do
  local held = version_of(redis.call('HGET', KEYS[1], ARGV[i]))
  if not held or held < tonumber(ARGV[i + 2]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('HSET', KEYS[1], '~complete', '1')
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return 1
"#;

/// Who writes an answer. The projection writes what the log says, replacing a value of
/// the same version (a replay rewrites every answer at the version it had, in the shape
/// and with the catalogue of now). A read-through writes what Postgres held when it read,
/// which a replay may have rebuilt since (it keeps the old rows readable until it
/// commits): it never replaces a value of the same version, so what a replay wrote stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    Projection,
    ReadThrough,
}

impl Writer {
    /// The scripts' last argument.
    fn flag(self) -> &'static str {
        match self {
            Writer::Projection => "0",
            Writer::ReadThrough => "1",
        }
    }
}

/// The cache's scripts, each with the shared decoder in front.
struct Scripts {
    customer: redis::Script,
    owner: redis::Script,
    fill: redis::Script,
    sources: [String; 3],
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let sources = [CUSTOMER_SCRIPT, OWNER_SCRIPT, FILL_SCRIPT].map(|s| format!("{DECODE}{s}"));
        Scripts {
            customer: redis::Script::new(&sources[0]),
            owner: redis::Script::new(&sources[1]),
            fill: redis::Script::new(&sources[2]),
            sources,
        }
    })
}

/// Most owner writes kept for the next write after Redis failed between the phases.
const MAX_UNFINISHED: usize = 100_000;

/// What the second phase of a write has to do.
#[derive(Default)]
struct OwnerWrites {
    /// Single-key commands on owners' hashes.
    cmds: Vec<redis::Cmd>,
    /// Every key written, in both phases (to publish).
    keys: Vec<String>,
    /// Whether each answer's customer key was written.
    written: Vec<bool>,
    /// Whether `cmds` holds a fill (`FILL_SCRIPT`).
    fill: bool,
}

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
    /// A `SCAN` pattern matching every key this cache owns, and maybe other keys under
    /// `stripe:` (an app's own): [`CacheKeys::kinds`] tells them apart.
    pub fn scan_pattern(&self) -> String {
        format!("{}stripe:*", self.prefix)
    }

    /// What every key this cache owns starts with: a customer's key, an org's or a user's
    /// hash.
    pub fn kinds(&self) -> [String; 3] {
        [self.customer(""), self.org(""), self.user("")]
    }
}

/// Runs an in-process cache entry's refresh (a Redis read that stores what it reads) beside
/// the read that asked for it. A failure costs nothing but the refresh: the entry is
/// served until its age bound, then read again like any miss.
fn refresh_in_background(
    refresh: impl std::future::Future<Output = Result<(), redis::RedisError>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(error) = refresh.await {
            tracing::debug!(%error, "in-process cache refresh failed");
        }
    });
}

/// What the in-process cache holds for a key: the answer Redis gave, decoded once, so a
/// hit costs no parse.
#[derive(Clone, PartialEq)]
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
    /// Owner writes a failed write left undone, made by the next one (see
    /// `keep_unfinished`).
    unfinished: Arc<Mutex<OwnerWrites>>,
    /// During a rebuild, the keys this cache held when it began that the rebuild has not
    /// written yet (see `begin_rebuild`).
    rebuilding: Arc<Mutex<Option<HashSet<String>>>>,
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
                refresh_after: Duration::ZERO,
            })),
            unfinished: Arc::default(),
            rebuilding: Arc::default(),
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
            self.conn.subscribers(),
            self.channel(),
            self.local.clone(),
            publish,
            stop,
        )
        .await
    }

    /// The message that tells every replica these keys changed (sent after they were
    /// written).
    fn publish_command(&self, keys: &[String]) -> Vec<redis::Cmd> {
        if keys.is_empty() {
            return vec![];
        }
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.channel()).arg(keys.join("\n"));
        vec![cmd]
    }

    /// Writes answers as the module header says: their customer keys, then the fields of
    /// the owners' hashes (with `fill`, one more command on an owner's hash, and its key),
    /// then the invalidation of every key written. Returns, for each answer, whether its
    /// customer key now holds its version (false: it held a newer one).
    async fn write(
        &self,
        answers: &[Answer],
        fill: Option<(redis::Cmd, String)>,
        writer: Writer,
    ) -> Result<Vec<bool>, ProjectionError> {
        let mut conn = self.conn.get().await?;
        let mut rest = self.write_customers(&mut conn, answers, writer).await?;
        if let Some((cmd, key)) = fill {
            rest.cmds.push(cmd);
            rest.keys.push(key);
            rest.fill = true;
        }
        self.write_owners(&mut conn, rest).await
    }

    /// The first phase of [`RedisCache::write`]: the customer keys. Returns what the
    /// second has to do.
    async fn write_customers(
        &self,
        conn: &mut RedisConn,
        infos: &[Answer],
        writer: Writer,
    ) -> Result<OwnerWrites, ProjectionError> {
        let scripts = scripts();
        let mut customer_writes = Vec::with_capacity(infos.len());
        for Answer { info, json } in infos {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(scripts.customer.get_hash())
                .arg(1)
                .arg(self.keys.customer(&info.customer_id))
                .arg(json)
                .arg(info.version)
                .arg(self.ttl_secs)
                .arg(writer.flag());
            customer_writes.push(cmd);
        }
        let answers = if infos.is_empty() {
            vec![]
        } else {
            conn.run_each(&[&scripts.sources[0]], customer_writes, vec![])
                .await?
        };
        let mut rest = OwnerWrites::default();
        let mut failed = None;
        for (Answer { info, json: value }, answer) in infos.iter().zip(answers) {
            let answer = match answer {
                Ok(answer) => answer,
                Err(error) => {
                    failed.get_or_insert(error);
                    continue;
                }
            };
            let (done, old_org, old_user): (i64, String, String) =
                redis::from_owned_redis_value(answer)?;
            rest.keys.push(self.keys.customer(&info.customer_id));
            rest.written.push(done != 0);
            if done != 1 {
                // A newer answer is held (or, for a read-through, this version); its
                // writer writes (or wrote) the hashes.
                continue;
            }
            let (org, user) = info.linked_owners();
            let mut owners = Vec::with_capacity(4);
            owners.extend(org.map(|org| self.keys.org(org)));
            owners.extend(user.map(|user| self.keys.user(user)));
            if !old_org.is_empty() && org != Some(old_org.as_str()) {
                owners.push(self.keys.org(&old_org));
            }
            if !old_user.is_empty() && user != Some(old_user.as_str()) {
                owners.push(self.keys.user(&old_user));
            }
            for owner in owners {
                rest.cmds
                    .push(self.owner_script(&owner, info, value, writer));
                rest.keys.push(owner);
            }
        }
        if let Some(error) = failed {
            // Some customer keys were written (on the nodes that answered): their owners'
            // writes are kept for the next write, since a retry finds those keys already
            // holding the new value and could not tell which owners they left.
            self.keep_unfinished(rest);
            return Err(error.into());
        }
        Ok(rest)
    }

    /// `OWNER_SCRIPT` on `owner`'s hash for `info` (its JSON: `value`).
    fn owner_script(
        &self,
        owner: &str,
        info: &SubscriptionInfo,
        value: &str,
        writer: Writer,
    ) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(scripts().owner.get_hash())
            .arg(1)
            .arg(owner)
            .arg(&info.customer_id)
            .arg(value)
            .arg(info.version)
            .arg(self.ttl_secs)
            .arg(writer.flag());
        cmd
    }

    /// [`RedisCache::write`] for a rebuild, without scripts where it knows what it finds
    /// (`begin_rebuild` noted every key the cache held; none are noted outside a rebuild).
    /// A customer key it noted is replaced with a plain `SET` (the log is the truth, and
    /// the catch-up after the rebuild writes any newer answer over it); one it did not is
    /// most likely absent and is set with `SET … NX` (which, on an absent key, does what
    /// `CUSTOMER_SCRIPT` would: there is no newer version and no owner it was linked to).
    /// An owner's hash it noted is deleted before its first field is written, so that it
    /// ends holding the customers the log links to it, not a stale field or the
    /// `~complete` mark of before; then each owner's field is set with `HSETNX` and the
    /// hash's TTL with `EXPIRE … NX` (what `OWNER_SCRIPT` does on an absent field).
    /// Whatever was present unexpectedly (a key another writer made meanwhile, a field,
    /// a value of another type) goes the scripts' way, as does everything of a phase
    /// whose commands failed, so the end state is the one [`RedisCache::write`] leaves
    /// into an empty cache. A script costs Redis about ten times a plain command.
    async fn write_rebuilding(&self, infos: &[Answer]) -> Result<Vec<bool>, ProjectionError> {
        // Which customer keys to replace, and which owners' hashes to delete first: those
        // noted and not written yet (each is taken off the note as it is written).
        let mut replace = vec![false; infos.len()];
        let mut resets: Vec<String> = Vec::new();
        if let Some(held) = self
            .rebuilding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_mut()
        {
            for (i, Answer { info, .. }) in infos.iter().enumerate() {
                replace[i] = held.remove(&self.keys.customer(&info.customer_id));
                let (org, user) = info.linked_owners();
                let owners = org
                    .map(|org| self.keys.org(org))
                    .into_iter()
                    .chain(user.map(|user| self.keys.user(user)));
                resets.extend(owners.filter(|owner| held.remove(owner)));
            }
        }
        let mut conn = self.conn.get().await?;
        let mut sets = Vec::with_capacity(resets.len() + infos.len());
        for owner in &resets {
            let mut cmd = redis::cmd("DEL");
            cmd.arg(owner);
            sets.push(cmd);
        }
        for (Answer { info, json }, &replace) in infos.iter().zip(&replace) {
            let mut cmd = redis::cmd("SET");
            cmd.arg(self.keys.customer(&info.customer_id))
                .arg(json)
                .arg("EX")
                .arg(self.ttl_secs);
            if !replace {
                cmd.arg("NX");
            }
            sets.push(cmd);
        }
        let mut answers = if sets.is_empty() {
            vec![]
        } else {
            conn.run_each(&[], sets, vec![]).await?
        };
        // A hash whose `DEL` failed fails the chunk, as a failed `SET` does below.
        let mut failed = answers.drain(..resets.len()).find_map(Result::err);
        let mut rest = OwnerWrites {
            written: vec![false; infos.len()],
            ..OwnerWrites::default()
        };
        // Owner writes of the customers set here: (owner's hash, answer's index).
        let mut fields: Vec<(String, usize)> = Vec::new();
        let mut present: Vec<usize> = Vec::new();
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(redis::Value::Nil) => present.push(i),
                Ok(_) => {
                    let info = &infos[i].info;
                    rest.written[i] = true;
                    rest.keys.push(self.keys.customer(&info.customer_id));
                    let (org, user) = info.linked_owners();
                    fields.extend(org.map(|org| (self.keys.org(org), i)));
                    fields.extend(user.map(|user| (self.keys.user(user), i)));
                }
                Err(error) => {
                    failed.get_or_insert(error);
                }
            }
        }
        let as_scripts = |rest: &mut OwnerWrites, fields: &[(String, usize)]| {
            for (owner, i) in fields {
                rest.cmds.push(self.owner_script(
                    owner,
                    &infos[*i].info,
                    &infos[*i].json,
                    Writer::Projection,
                ));
                rest.keys.push(owner.clone());
            }
        };
        if let Some(error) = failed {
            // As in `write_customers`: the keys set keep their owner writes for later.
            as_scripts(&mut rest, &fields);
            self.keep_unfinished(rest);
            return Err(error.into());
        }
        if !present.is_empty() {
            let others: Vec<Answer> = present.iter().map(|&i| infos[i].clone()).collect();
            match self
                .write_customers(&mut conn, &others, Writer::Projection)
                .await
            {
                Ok(more) => {
                    for (&i, written) in present.iter().zip(more.written) {
                        rest.written[i] = written;
                    }
                    rest.cmds.extend(more.cmds);
                    rest.keys.extend(more.keys);
                }
                Err(error) => {
                    as_scripts(&mut rest, &fields);
                    self.keep_unfinished(rest);
                    return Err(error);
                }
            }
        }
        let mut plain = Vec::with_capacity(2 * fields.len());
        for (owner, i) in &fields {
            let Answer { info, json } = &infos[*i];
            let mut cmd = redis::cmd("HSETNX");
            cmd.arg(owner).arg(&info.customer_id).arg(json);
            plain.push(cmd);
            let mut cmd = redis::cmd("EXPIRE");
            cmd.arg(owner).arg(self.ttl_secs).arg("NX");
            plain.push(cmd);
        }
        let answers = if fields.is_empty() {
            Ok(vec![])
        } else {
            conn.run_each(&[], plain, vec![]).await
        };
        match answers {
            Ok(answers) => {
                for (field, answer) in fields.iter().zip(answers.chunks(2)) {
                    // Set (1), and its hash given a TTL or already holding one: done.
                    let done =
                        matches!(answer, [Ok(redis::Value::Int(1)), Ok(redis::Value::Int(_))]);
                    if !done {
                        as_scripts(&mut rest, std::slice::from_ref(field));
                    } else {
                        rest.keys.push(field.0.clone());
                    }
                }
            }
            Err(_) => as_scripts(&mut rest, &fields),
        }
        self.write_owners(&mut conn, rest).await
    }

    /// Keeps owner writes that could not be made (Redis failed between the phases), to
    /// be made by the next write of this cache. Each is guarded by its field's version,
    /// so making it late never undoes a newer one. Bounded: past
    /// [`MAX_UNFINISHED`] the oldest are dropped (those customers' old owners may then
    /// keep their field until the hash expires, as after a crash between the phases).
    fn keep_unfinished(&self, rest: OwnerWrites) {
        let mut unfinished = self
            .unfinished
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let OwnerWrites { cmds, keys, .. } = rest;
        // `keys` also lists the customer keys written; they are published with these.
        unfinished.keys.extend(keys);
        unfinished.cmds.extend(cmds);
        if unfinished.cmds.len() > MAX_UNFINISHED {
            let excess = unfinished.cmds.len() - MAX_UNFINISHED;
            unfinished.cmds.drain(..excess);
            tracing::warn!(
                dropped = excess,
                "too many unfinished cache writes kept; the oldest dropped"
            );
        }
        if unfinished.keys.len() > 4 * MAX_UNFINISHED {
            let excess = unfinished.keys.len() - 4 * MAX_UNFINISHED;
            unfinished.keys.drain(..excess);
        }
    }

    /// The second phase of [`RedisCache::write`]: the owners' hashes, then the
    /// invalidation of every key written.
    async fn write_owners(
        &self,
        conn: &mut RedisConn,
        rest: OwnerWrites,
    ) -> Result<Vec<bool>, ProjectionError> {
        let scripts = scripts();
        let mut rest = rest;
        let earlier = std::mem::take(
            &mut *self
                .unfinished
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let fill = rest.fill;
        let written = std::mem::take(&mut rest.written);
        // The earlier ones first, so that a fill stays last.
        let OwnerWrites {
            cmds: mut earlier_cmds,
            keys: mut earlier_keys,
            ..
        } = earlier;
        earlier_cmds.append(&mut rest.cmds);
        earlier_keys.append(&mut rest.keys);
        rest.cmds = earlier_cmds;
        rest.keys = earlier_keys;
        let mut loads: Vec<&str> = Vec::with_capacity(2);
        if !rest.cmds.is_empty() {
            loads.push(&scripts.sources[1]);
        }
        if fill {
            loads.push(&scripts.sources[2]);
        }
        let answers = conn
            .run_each(&loads, rest.cmds.clone(), self.publish_command(&rest.keys))
            .await;
        let failed = match answers {
            Ok(answers) => answers.into_iter().find_map(Result::err),
            Err(error) => Some(error),
        };
        if let Some(error) = failed {
            // Kept to be made again by the next write, except a fill: made late, it could
            // mark complete a hash that lost (expired meanwhile) a customer its read missed.
            if fill {
                rest.cmds.pop();
                rest.keys.pop();
            }
            self.keep_unfinished(rest);
            return Err(error.into());
        }
        Ok(written)
    }

    /// The cached answer for a customer, from memory when the in-process cache holds it,
    /// else from Redis (and then kept in memory, decoded, if no invalidation came
    /// meanwhile); a value that does not decode counts as a miss. A held answer due for
    /// its refresh is served and read again in the background.
    pub async fn customer(
        &self,
        customer_id: &str,
    ) -> Result<Option<SubscriptionInfo>, redis::RedisError> {
        let key = self.keys.customer(customer_id);
        let ticket = match self.local.get(&key) {
            Lookup::Hit(Cached::Customer(info)) => return Ok(Some((*info).clone())),
            Lookup::Refresh(Cached::Customer(info), ticket) => {
                let (this, customer_id) = (self.clone(), customer_id.to_owned());
                refresh_in_background(async move {
                    this.customer_in_redis(&customer_id, key, Some(ticket))
                        .await
                        .map(drop)
                });
                return Ok(Some((*info).clone()));
            }
            Lookup::Miss(ticket) => Some(ticket),
            // A key holds one kind of value; anything else is read again.
            Lookup::Hit(Cached::Owner(_))
            | Lookup::Refresh(Cached::Owner(_), _)
            | Lookup::Bypass => None,
        };
        self.customer_in_redis(customer_id, key, ticket).await
    }

    /// A customer's answer as Redis holds it, kept in memory with `ticket`.
    async fn customer_in_redis(
        &self,
        customer_id: &str,
        key: String,
        ticket: Option<Ticket>,
    ) -> Result<Option<SubscriptionInfo>, redis::RedisError> {
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
            Lookup::Refresh(Cached::Owner(infos), ticket) => {
                let (this, id) = (self.clone(), id.to_owned());
                refresh_in_background(async move {
                    this.owner_in_redis(owner, &id, key, Some(ticket))
                        .await
                        .map(drop)
                });
                return Ok((true, infos));
            }
            Lookup::Miss(ticket) => Some(ticket),
            Lookup::Hit(Cached::Customer(_))
            | Lookup::Refresh(Cached::Customer(_), _)
            | Lookup::Bypass => None,
        };
        self.owner_in_redis(owner, id, key, ticket).await
    }

    /// What an owner's hash holds in Redis, kept in memory with `ticket` when complete.
    async fn owner_in_redis(
        &self,
        owner: Owner,
        id: &str,
        key: String,
        ticket: Option<Ticket>,
    ) -> Result<(bool, Arc<[SubscriptionInfo]>), redis::RedisError> {
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

    /// Writes every linked customer's answer (as Postgres holds them) like any answer,
    /// then fills the owner's hash with them and marks it complete (see `FILL_SCRIPT` for
    /// how it stays right while the projection writes at the same time).
    pub async fn fill_owner(
        &self,
        owner: Owner,
        id: &str,
        infos: &[SubscriptionInfo],
    ) -> Result<(), ProjectionError> {
        let key = self.owner_key(owner, id);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(scripts().fill.get_hash())
            .arg(1)
            .arg(&key)
            .arg(self.ttl_secs);
        let answers = infos
            .iter()
            .map(|info| Answer::new(info.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        for Answer { info, json } in &answers {
            cmd.arg(&info.customer_id).arg(json).arg(info.version);
        }
        let written = self
            .write(&answers, Some((cmd, key)), Writer::ReadThrough)
            .await?;
        let refused = written.iter().filter(|written| !**written).count();
        if refused > 0 {
            STALE_WRITES
                .with_label_values(&["read_through"])
                .inc_by(refused as u64);
        }
        Ok(())
    }

    /// Writes one answer (read-through after a miss; see [`Writer`]). Returns false when
    /// the cache already held a newer version.
    pub async fn put(&self, info: &SubscriptionInfo) -> Result<bool, ProjectionError> {
        let written = self
            .write(&[Answer::new(info.clone())?], None, Writer::ReadThrough)
            .await?;
        let written = written.first().copied().unwrap_or(false);
        if !written {
            STALE_WRITES.with_label_values(&["read_through"]).inc();
        }
        Ok(written)
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

    /// Every key this cache owns: one `SCAN` of each master node of a cluster (the
    /// standalone server) for every key under `stripe:`, keeping those of its own kinds.
    /// One pass, not one per kind of key: each pass walks the node's whole keyspace
    /// (three passes were 879 `SCAN`s for 425 000 keys in the benchmark's replay). `page`
    /// is given each page's keys.
    async fn scan_own<F, Fut>(&self, conn: &mut RedisConn, mut page: F) -> redis::RedisResult<()>
    where
        F: FnMut(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<()>>,
    {
        let (pattern, kinds) = (self.keys.scan_pattern(), self.keys.kinds());
        for mut node in conn.masters().await? {
            let mut cursor: u64 = 0;
            loop {
                let (next, mut keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_PAGE)
                    .query_async(&mut node)
                    .await?;
                keys.retain(|key| kinds.iter().any(|kind| key.starts_with(kind.as_str())));
                if !keys.is_empty() {
                    page(keys).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    /// Every key this cache owns ([`RedisCache::scan_own`]).
    async fn held_keys(&self) -> Result<HashSet<String>, redis::RedisError> {
        let mut conn = self.conn.get().await?;
        let mut held = HashSet::new();
        self.scan_own(&mut conn, |keys| {
            held.extend(keys);
            std::future::ready(Ok(()))
        })
        .await?;
        Ok(held)
    }

    /// Deletes every key this cache owns ([`RedisCache::scan_own`]; the cluster client
    /// splits a `DEL` by slot), then tells every replica's in-process cache.
    pub async fn clear_all(&self) -> Result<u64, redis::RedisError> {
        let mut conn = self.conn.get().await?;
        let mut deleted = 0;
        let deleting = conn.clone();
        self.scan_own(&mut conn, |keys| {
            deleted += keys.len() as u64;
            let mut conn = deleting.clone();
            async move { conn.del(keys).await }
        })
        .await?;
        self.publish_all(&mut conn).await?;
        Ok(deleted)
    }

    /// Tells every replica's in-process cache that every key may have changed.
    async fn publish_all(&self, conn: &mut RedisConn) -> Result<(), redis::RedisError> {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.channel())
            .arg(local_cache::ALL_KEYS)
            .query_async(conn)
            .await?;
        Ok(())
    }
}

/// Keys asked for by each `SCAN` of the cache's keys, and deleted by each `DEL` of them.
const SCAN_PAGE: usize = 1000;

/// Counts the projection's writes the version guard refused (`written` false).
fn count_refused(written: &[bool]) {
    let refused = written.iter().filter(|written| !**written).count();
    if refused > 0 {
        STALE_WRITES
            .with_label_values(&["projection"])
            .inc_by(refused as u64);
        tracing::debug!(refused, "cache held newer versions; older writes skipped");
    }
}

impl EventualProjection for RedisCache {
    const NAME: &'static str = "redis_cache";

    async fn apply(&self, events: &Events<'_>) -> Result<(), ProjectionError> {
        let answers = events.answers(&self.catalog)?;
        let written = self.write(&answers, None, Writer::Projection).await?;
        count_refused(&written);
        Ok(())
    }

    /// A rebuild writes into the cache it cleared: the plain commands where keys are
    /// noted ([`RedisCache::write_rebuilding`]).
    async fn apply_rebuilding(&self, events: &Events<'_>) -> Result<(), ProjectionError> {
        let answers = events.answers(&self.catalog)?;
        let written = self.write_rebuilding(&answers).await?;
        count_refused(&written);
        Ok(())
    }

    /// Notes every key this cache holds ([`RedisCache::held_keys`]); deletes nothing, so
    /// that readers find the old answers until the rebuild writes the new ones.
    async fn begin_rebuild(&self) -> Result<(), ProjectionError> {
        let held = self.held_keys().await?;
        tracing::info!(keys = held.len(), "rebuild: noted the keys the cache holds");
        *self
            .rebuilding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(held);
        Ok(())
    }

    /// Deletes the keys noted that the rebuild did not write again (those of customers and
    /// owners the log no longer gives an answer), then tells every replica's in-process
    /// cache to drop what it holds.
    async fn end_rebuild(&self, rebuilt: bool) -> Result<(), ProjectionError> {
        let held = self
            .rebuilding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(held) = held.filter(|_| rebuilt) else {
            return Ok(());
        };
        let mut conn = self.conn.get().await?;
        let stale: Vec<String> = held.into_iter().collect();
        for keys in stale.chunks(SCAN_PAGE) {
            let _: () = conn.del(keys).await?;
        }
        tracing::info!(
            keys = stale.len(),
            "rebuild: deleted the keys noted that it did not write again"
        );
        self.publish_all(&mut conn).await?;
        Ok(())
    }
}

/// Writers racing each other, against a real standalone Redis (`REDIS_URL`) and a real
/// Redis Cluster (`REDIS_CLUSTER_URLS`, which the test command starts): whatever the
/// interleaving of their phases, every key ends holding the newest answer written to it,
/// and an owner's read never counts a customer that moved away.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_conn::RedisTarget;
    use std::collections::HashMap;

    fn caches() -> Vec<(&'static str, RedisCache)> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let prefix = |mode: &str| {
            format!(
                "test:{}:unit{}{mode}{}:",
                nanos.as_secs(),
                std::process::id(),
                nanos.subsec_nanos()
            )
        };
        let single = std::env::var("REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
        let nodes = std::env::var("REDIS_CLUSTER_URLS").unwrap_or(
            "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103".into(),
        );
        let nodes: Vec<redis::Client> = nodes
            .split(',')
            .map(|url| redis::Client::open(url).unwrap())
            .collect();
        let cluster = redis::cluster::ClusterClientBuilder::new(
            nodes.iter().map(|node| node.get_connection_info().clone()),
        )
        .build()
        .unwrap();
        let cache = |target, mode: &str| {
            let keys = CacheKeys {
                prefix: prefix(mode),
            };
            RedisCache::new(
                LazyConnection::to(target),
                keys,
                600,
                Arc::new(Catalog::default()),
            )
        };
        vec![
            (
                "standalone",
                cache(
                    RedisTarget::Single {
                        client: redis::Client::open(single).unwrap(),
                        config: Default::default(),
                    },
                    "s",
                ),
            ),
            (
                "cluster",
                cache(
                    RedisTarget::Cluster {
                        client: cluster,
                        nodes,
                    },
                    "c",
                ),
            ),
        ]
    }

    /// [`info`]'s answer with its JSON, as the projection writes it.
    fn answer(customer: &str, version: u64, org: Option<&str>, deleted: bool) -> Answer {
        Answer::new(info(customer, version, org, deleted)).unwrap()
    }

    fn info(customer: &str, version: u64, org: Option<&str>, deleted: bool) -> SubscriptionInfo {
        serde_json::from_value(serde_json::json!({
            "customer_id": customer,
            "status": "active",
            "cancel_at_period_end": false,
            "org_id": org,
            "user_id": null,
            "version": version,
            "updated_at": "2026-11-25T00:00:00Z",
            "deleted": deleted,
        }))
        .unwrap()
    }

    /// The customers an org's hash counts (fields linking them there).
    async fn members(cache: &RedisCache, org: &str) -> Vec<String> {
        let (_, infos) = cache.owner(Owner::Org, org).await.unwrap();
        let mut ids: Vec<String> = infos.iter().map(|info| info.customer_id.clone()).collect();
        ids.sort();
        ids
    }

    async fn version(cache: &RedisCache, customer: &str) -> Option<u64> {
        cache
            .customer(customer)
            .await
            .unwrap()
            .map(|info| info.version)
    }

    /// A replay rewrites every answer at the version it had (with the catalogue and shape
    /// of now), while a read-through may still write what Postgres held before the
    /// replay's commit: the same version, the old content. The projection's write replaces
    /// a read-through's of the same version, and never the other way round: not at the
    /// customer key, not in the owner's hash, not by a fill.
    #[tokio::test]
    async fn a_read_through_never_replaces_the_same_version_and_the_projection_does() {
        let answer = |status: &str| {
            let mut info = info("cus_r", 4, Some("org_r"), false);
            info.status = status.to_owned();
            info
        };
        let (old, new) = (answer("past_due"), answer("active"));
        for (mode, cache) in caches() {
            let seen = || async {
                let key = cache.customer("cus_r").await.unwrap().unwrap().status;
                let (complete, infos) = cache.owner(Owner::Org, "org_r").await.unwrap();
                let field = infos.iter().map(|i| i.status.clone()).collect::<Vec<_>>();
                (key, complete, field)
            };
            let active = "active".to_owned();
            assert!(cache.put(&old).await.unwrap(), "{mode}");
            let written = cache
                .write(
                    &[Answer::new(new.clone()).unwrap()],
                    None,
                    Writer::Projection,
                )
                .await
                .unwrap();
            assert_eq!(written, [true], "{mode}");
            let (key, _, field) = seen().await;
            assert_eq!(
                (key, field),
                (active.clone(), vec![active.clone()]),
                "{mode}"
            );

            // Later read-throughs of the old content leave it (and say the version is held).
            assert!(cache.put(&old).await.unwrap(), "{mode}");
            cache
                .fill_owner(Owner::Org, "org_r", std::slice::from_ref(&old))
                .await
                .unwrap();
            assert_eq!(
                seen().await,
                (active.clone(), true, vec![active.clone()]),
                "{mode}"
            );

            // The customer key gone (expired), a read-through makes it again but leaves the
            // owner's field of the same version.
            let mut conn = cache.conn.get().await.unwrap();
            let _: i64 = redis::cmd("DEL")
                .arg(cache.keys.customer("cus_r"))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(cache.put(&old).await.unwrap(), "{mode}");
            let (key, _, field) = seen().await;
            assert_eq!(
                (key, field),
                ("past_due".to_owned(), vec![active.clone()]),
                "{mode}"
            );
            cache.clear_all().await.unwrap();
        }
    }

    #[tokio::test]
    async fn an_older_write_never_wins_whatever_the_interleaving() {
        for (mode, cache) in caches() {
            let mut conn = cache.conn.get().await.unwrap();
            // cus_1 starts in org_a, beside cus_2.
            cache
                .put(&info("cus_1", 1, Some("org_a"), false))
                .await
                .unwrap();
            cache
                .put(&info("cus_2", 1, Some("org_a"), false))
                .await
                .unwrap();
            assert_eq!(members(&cache, "org_a").await, ["cus_1", "cus_2"], "{mode}");

            // X (v2: to org_b) writes the customer key; Y (v3: to org_c) then writes
            // everything; X's hash writes come last.
            let x = [answer("cus_1", 2, Some("org_b"), false)];
            let x_rest = cache
                .write_customers(&mut conn, &x, Writer::Projection)
                .await
                .unwrap();
            assert_eq!(x_rest.written, [true], "{mode}");
            assert!(cache
                .put(&info("cus_1", 3, Some("org_c"), false))
                .await
                .unwrap());
            cache.write_owners(&mut conn, x_rest).await.unwrap();
            assert_eq!(version(&cache, "cus_1").await, Some(3), "{mode}");
            assert_eq!(
                members(&cache, "org_a").await,
                ["cus_2"],
                "{mode}: left org_a"
            );
            assert!(
                members(&cache, "org_b").await.is_empty(),
                "{mode}: X's late link"
            );
            assert_eq!(members(&cache, "org_c").await, ["cus_1"], "{mode}");

            // A late older write, whole: refused at the customer key, touching no hash.
            assert!(!cache
                .put(&info("cus_1", 2, Some("org_b"), false))
                .await
                .unwrap());
            assert!(!cache
                .put(&info("cus_1", 1, Some("org_a"), false))
                .await
                .unwrap());
            assert_eq!(version(&cache, "cus_1").await, Some(3), "{mode}");
            assert_eq!(members(&cache, "org_a").await, ["cus_2"], "{mode}");
            assert!(members(&cache, "org_b").await.is_empty(), "{mode}");

            // An older writer whose customer write came first, and whose hash write comes
            // after a newer writer moved the customer back: its field stays the newer one.
            let old = [answer("cus_2", 2, Some("org_d"), false)];
            let old_rest = cache
                .write_customers(&mut conn, &old, Writer::Projection)
                .await
                .unwrap();
            assert!(cache
                .put(&info("cus_2", 3, Some("org_a"), false))
                .await
                .unwrap());
            cache.write_owners(&mut conn, old_rest).await.unwrap();
            assert_eq!(members(&cache, "org_a").await, ["cus_2"], "{mode}");
            assert!(members(&cache, "org_d").await.is_empty(), "{mode}");

            // A fill from a Postgres read older than the projection's last write: the
            // customer moved to org_c (v3) and the fill of org_a still lists it (v1).
            cache
                .fill_owner(
                    Owner::Org,
                    "org_a",
                    &[
                        info("cus_1", 1, Some("org_a"), false),
                        info("cus_2", 3, Some("org_a"), false),
                    ],
                )
                .await
                .unwrap();
            let (complete, _) = cache.owner(Owner::Org, "org_a").await.unwrap();
            assert!(complete, "{mode}");
            assert_eq!(members(&cache, "org_a").await, ["cus_2"], "{mode}: fill");
            assert_eq!(version(&cache, "cus_1").await, Some(3), "{mode}");

            // Deleted: it leaves its org, and an older write does not bring it back.
            assert!(cache
                .put(&info("cus_2", 4, Some("org_a"), true))
                .await
                .unwrap());
            assert!(members(&cache, "org_a").await.is_empty(), "{mode}: deleted");
            assert!(!cache
                .put(&info("cus_2", 3, Some("org_a"), false))
                .await
                .unwrap());
            assert!(members(&cache, "org_a").await.is_empty(), "{mode}");

            // The scripts are gone (a node restarted): the next writes load them again.
            // (A standalone server is sent them before every batch; it is shared with
            // other test runs, so its scripts are left alone.)
            let flush = || async {
                if mode == "cluster" {
                    let _: () = redis::cmd("SCRIPT")
                        .arg("FLUSH")
                        .query_async(&mut cache.conn.get().await.unwrap())
                        .await
                        .unwrap();
                }
            };
            flush().await;
            assert!(cache
                .put(&info("cus_3", 1, Some("org_a"), false))
                .await
                .unwrap());
            flush().await;
            cache
                .fill_owner(
                    Owner::Org,
                    "org_e",
                    &[info("cus_4", 1, Some("org_e"), false)],
                )
                .await
                .unwrap();
            assert_eq!(members(&cache, "org_a").await, ["cus_3"], "{mode}");
            assert_eq!(members(&cache, "org_e").await, ["cus_4"], "{mode}");

            // An app's own keys beside ours, under the same prefix and `stripe:`.
            let theirs = [
                format!("{}stripe:customers_seen", cache.keys.prefix),
                format!("{}stripe:webhook:lock", cache.keys.prefix),
            ];
            {
                let mut conn = cache.conn.get().await.unwrap();
                for key in &theirs {
                    let _: () = conn.set(key, "theirs").await.unwrap();
                }
            }

            // Every key is found and deleted, on whichever node it lives; only ours.
            let deleted = cache.clear_all().await.unwrap();
            assert!(deleted >= 9, "{mode}: {deleted}");
            assert_eq!(version(&cache, "cus_1").await, None, "{mode}");
            assert_eq!(cache.clear_all().await.unwrap(), 0, "{mode}");
            let mut conn = cache.conn.get().await.unwrap();
            for key in &theirs {
                let kept: Option<String> = conn.get(key).await.unwrap();
                assert_eq!(kept.as_deref(), Some("theirs"), "{mode}: {key}");
                let _: () = conn.del(key).await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_write_stopped_between_its_phases_is_finished_by_the_next_one() {
        for (mode, cache) in caches() {
            let mut conn = cache.conn.get().await.unwrap();
            for customer in ["cus_1", "cus_2"] {
                cache
                    .put(&info(customer, 1, Some("org_a"), false))
                    .await
                    .unwrap();
            }
            // Both move to org_b; Redis fails after their customer keys were written.
            // cus_1's owner writes are kept (as a failed write keeps them); cus_2's are
            // lost (as after a crash).
            let moved = |customer| [answer(customer, 2, Some("org_b"), false)];
            let rest = cache
                .write_customers(&mut conn, &moved("cus_1"), Writer::Projection)
                .await
                .unwrap();
            cache.keep_unfinished(rest);
            drop(
                cache
                    .write_customers(&mut conn, &moved("cus_2"), Writer::Projection)
                    .await
                    .unwrap(),
            );
            // The projection applies the batch again: the customer keys already hold it,
            // so only what was kept can tell that they left org_a.
            for customer in ["cus_1", "cus_2"] {
                let written = cache
                    .write(&moved(customer), None, Writer::Projection)
                    .await
                    .unwrap();
                assert_eq!(written, [true], "{mode}");
            }
            assert_eq!(members(&cache, "org_b").await, ["cus_1", "cus_2"], "{mode}");
            assert_eq!(
                members(&cache, "org_a").await,
                ["cus_2"],
                "{mode}: the lost one is the known limit; the kept one left"
            );
            cache.clear_all().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_hash_keeps_the_ttl_it_was_made_with() {
        for (mode, cache) in caches() {
            let mut conn = cache.conn.get().await.unwrap();
            cache
                .put(&info("cus_1", 1, Some("org_a"), false))
                .await
                .unwrap();
            let key = cache.keys.org("org_a");
            let _: () = redis::cmd("EXPIRE")
                .arg(&key)
                .arg(100)
                .query_async(&mut conn)
                .await
                .unwrap();
            cache
                .put(&info("cus_2", 1, Some("org_a"), false))
                .await
                .unwrap();
            let ttl: i64 = redis::cmd("TTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!((1..=100).contains(&ttl), "{mode}: {ttl}");
            let customer_ttl: i64 = redis::cmd("TTL")
                .arg(cache.keys.customer("cus_2"))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(customer_ttl > 100, "{mode}: {customer_ttl}");
            cache.clear_all().await.unwrap();
        }
    }

    /// The scripts read a stored answer's version from its first `"version":` key
    /// (`version_of`), so the answers written must hold that key once: every field of
    /// `SubscriptionInfo` set (nested subscriptions, items, invoices, payment method) and a
    /// string value that spells the key, which serde_json escapes.
    #[test]
    fn stored_answers_name_their_version_once() {
        let full: SubscriptionInfo = serde_json::from_value(serde_json::json!({
            "customer_id": "cus_123", "subscription_id": "sub_123", "status": "active",
            "price_id": "price_pro_monthly", "product_id": "prod_pro", "lookup_key": "pro_monthly",
            "plan": "pro", "quantity": 5, "current_period_start": "2026-11-25T00:00:00Z",
            "current_period_end": "2026-12-25T00:00:00Z", "cancel_at_period_end": false,
            "cancel_at": "2026-12-25T00:00:00Z", "canceled_at": "2026-11-26T00:00:00Z",
            "ended_at": null, "trial_end": "2026-11-01T00:00:00Z",
            "org_id": "org_123", "user_id": "user_9",
            "latest_invoice": {"id": "in_123", "status": "paid", "attempt_count": 1,
                "next_payment_attempt": "2026-11-27T00:00:00Z", "created": "2026-11-25T00:00:00Z"},
            "payment_method": {"id": "pm_123", "brand": "visa", "last4": "4242"},
            "version": 77, "updated_at": "2026-11-25T00:00:05Z",
            "access": true, "access_until": "2026-12-26T00:00:00Z", "seats": 5,
            "pause_reason": "\"version\":1", "deleted": false, "stripe_features": ["api"],
            "account": "acct_1",
            "subscriptions": [{
                "subscription_id": "sub_123", "status": "active", "created": "2026-10-25T00:00:00Z",
                "plan": "pro", "seats": 5, "features": ["api"],
                "access": true, "access_until": "2026-12-26T00:00:00Z",
                "items": [{"id": "si_1", "price_id": "price_pro_monthly", "product_id": "prod_pro",
                    "lookup_key": "pro_monthly", "quantity": 5, "usage_type": "licensed", "plan": "pro",
                    "current_period_end": "2026-12-25T00:00:00Z"}],
                "current_period_start": "2026-11-25T00:00:00Z", "current_period_end": "2026-12-25T00:00:00Z",
                "cancel_at_period_end": false, "cancel_at": null, "canceled_at": null, "ended_at": null,
                "trial_end": null, "pause_reason": "\"version\":2",
                "latest_invoice": {"id": "in_123", "status": "paid", "attempt_count": 1,
                    "next_payment_attempt": null, "created": "2026-11-25T00:00:00Z"},
                "payment_method": {"id": "pm_123", "brand": "visa", "last4": "4242"}
            }]
        }))
        .unwrap();
        let stored = serde_json::to_string(&full).unwrap();
        assert_eq!(stored.matches("\"version\":").count(), 1, "{stored}");
        assert!(stored.contains("\"version\":77,"), "{stored}");
        // `owners_of` reads the first of each: the answer's own.
        for key in ["org_id", "user_id", "deleted"] {
            let pattern = format!("\"{key}\":");
            assert_eq!(stored.matches(&pattern).count(), 1, "{key}: {stored}");
        }
        assert!(stored.contains("\"org_id\":\"org_123\",\"user_id\":\"user_9\","));
        assert!(stored.contains("\"deleted\":false,"));
    }

    /// A replaced answer names the owners it linked, whatever its shape: serde's compact
    /// JSON (read without decoding), an owner id holding characters JSON escapes, and
    /// another writer's spacing (both decoded). The owner it left then no longer counts
    /// the customer, and the new owner does.
    #[tokio::test]
    async fn a_replaced_answer_names_the_owners_it_linked_whatever_its_shape() {
        for (mode, cache) in caches() {
            let mut conn = cache.conn.get().await.unwrap();
            // (the old owner, whether its answer is spaced as another writer's would be)
            let shapes = [
                ("org_plain", false),
                ("org_\"quoted\\", false),
                ("org_spaced", true),
            ];
            for (i, (old_org, spaced)) in shapes.into_iter().enumerate() {
                let customer = format!("cus_{i}");
                let compact =
                    serde_json::to_string(&info(&customer, 3, Some(old_org), false)).unwrap();
                let old = if spaced {
                    compact.replace("\":", "\": ")
                } else {
                    compact
                };
                let _: () = redis::cmd("SET")
                    .arg(cache.keys.customer(&customer))
                    .arg(&old)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let _: () = redis::cmd("HSET")
                    .arg(cache.keys.org(old_org))
                    .arg(&customer)
                    .arg(&old)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert_eq!(
                    members(&cache, old_org).await,
                    vec![customer.clone()],
                    "{mode}"
                );
                assert!(cache
                    .put(&info(&customer, 5, Some("org_new"), false))
                    .await
                    .unwrap());
                assert!(
                    members(&cache, old_org).await.is_empty(),
                    "{mode}: {old_org} still counts {customer} after it moved"
                );
                assert!(
                    members(&cache, "org_new").await.contains(&customer),
                    "{mode}"
                );
            }
            cache.clear_all().await.unwrap();
        }
    }

    /// A value in another shape than the one written here (Postgres's jsonb text, with a
    /// space after each colon) is decoded whole: its version still guards it, in a
    /// customer key and in an owner's hash.
    #[tokio::test]
    async fn a_value_of_another_shape_still_guards_its_version() {
        for (mode, cache) in caches() {
            let mut conn = cache.conn.get().await.unwrap();
            let spaced = |customer: &str| {
                let mut newer =
                    serde_json::to_value(info(customer, 9, Some("org_a"), false)).unwrap();
                newer["status"] = "past_due".into();
                newer.to_string().replace("\":", "\": ")
            };
            // An owner's field: the customer key is written, the field is not.
            let _: () = redis::cmd("HSET")
                .arg(cache.keys.org("org_a"))
                .arg("cus_1")
                .arg(spaced("cus_1"))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(cache
                .put(&info("cus_1", 5, Some("org_a"), false))
                .await
                .unwrap());
            let held: String = redis::cmd("HGET")
                .arg(cache.keys.org("org_a"))
                .arg("cus_1")
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(
                held,
                spaced("cus_1"),
                "{mode}: an older field replaced a newer one"
            );
            // A customer key.
            let _: () = redis::cmd("SET")
                .arg(cache.keys.customer("cus_2"))
                .arg(spaced("cus_2"))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(
                !cache
                    .put(&info("cus_2", 5, Some("org_a"), false))
                    .await
                    .unwrap(),
                "{mode}: an older answer replaced a newer one"
            );
            assert!(cache
                .put(&info("cus_2", 10, Some("org_a"), false))
                .await
                .unwrap());
            assert_eq!(version(&cache, "cus_2").await, Some(10), "{mode}");
            let held: String = redis::cmd("HGET")
                .arg(cache.keys.org("org_a"))
                .arg("cus_2")
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(held.contains("\"version\":10,"), "{mode}: {held}");
            cache.clear_all().await.unwrap();
        }
    }

    /// Every key a test below looks at: (key, whether a hash), as two caches name them.
    async fn dump(cache: &RedisCache, keys: &[(String, bool)]) -> Vec<(String, String, bool)> {
        let mut conn = cache.conn.get().await.unwrap();
        let mut out = Vec::new();
        for (key, hash) in keys {
            let value = if *hash {
                let kind: String = redis::cmd("TYPE")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if kind == "hash" {
                    let mut fields: Vec<(String, String)> = conn
                        .hgetall::<_, HashMap<String, String>>(key)
                        .await
                        .unwrap()
                        .into_iter()
                        .collect();
                    fields.sort();
                    format!("{fields:?}")
                } else {
                    format!(
                        "{kind}: {:?}",
                        conn.get::<_, Option<String>>(key).await.unwrap()
                    )
                }
            } else {
                format!("{:?}", conn.get::<_, Option<String>>(key).await.unwrap())
            };
            let ttl: i64 = conn.ttl(key).await.unwrap();
            // Name the key without the cache's prefix, so that both caches' dumps compare.
            let name = key.strip_prefix(&cache.keys.prefix).unwrap().to_owned();
            out.push((name, value, ttl > 0));
        }
        out
    }

    /// Another cache on the same connection, under `cache`'s prefix followed by `name`,
    /// with a rebuild's note of its own.
    fn beside(cache: &RedisCache, name: &str) -> RedisCache {
        let mut other = cache.clone();
        other.keys = CacheKeys {
            prefix: format!("{}{name}:", cache.keys.prefix),
        };
        other.rebuilding = Arc::default();
        other
    }

    /// A rebuild's write into keys it did not note (`write_rebuilding` outside a rebuild:
    /// no scripts where the keys are absent) leaves what the scripted write leaves,
    /// whatever it finds: for each mode, two caches under their own prefixes start alike,
    /// one writes one way, one the other.
    #[tokio::test]
    async fn a_write_into_absent_keys_leaves_what_the_scripts_leave() {
        for (mode, scripted) in caches() {
            let plain = beside(&scripted, "plain");
            let batches = [
                vec![
                    // Absent everywhere, its owner's hash too.
                    answer("cus_new", 1, Some("org_n"), false),
                    // Held at v1 in org_a: moves to org_b.
                    answer("cus_moved", 2, Some("org_b"), false),
                    // Held at v3: refused.
                    answer("cus_newer", 1, Some("org_a"), false),
                    // Its key absent (expired), its field in org_f held at v5.
                    answer("cus_field", 1, Some("org_f"), false),
                    // Its key absent, its field in org_f held at v1: replaced.
                    answer("cus_stale", 2, Some("org_f"), false),
                    // Deleted: linked to no owner.
                    answer("cus_gone", 1, Some("org_a"), true),
                ],
                // An owner key of another type (`OWNER_SCRIPT` replaces it).
                vec![answer("cus_typed", 1, Some("org_t"), false)],
                // Written twice in one rebuild: the second write finds the first.
                vec![answer("cus_moved", 3, Some("org_b"), false)],
            ];
            let mut keys: Vec<(String, bool)> = Vec::new();
            let mut results = Vec::new();
            for cache in [&scripted, &plain] {
                cache
                    .put(&info("cus_moved", 1, Some("org_a"), false))
                    .await
                    .unwrap();
                cache
                    .put(&info("cus_newer", 3, Some("org_a"), false))
                    .await
                    .unwrap();
                cache
                    .put(&info("cus_field", 5, Some("org_f"), false))
                    .await
                    .unwrap();
                cache
                    .put(&info("cus_stale", 1, Some("org_f"), false))
                    .await
                    .unwrap();
                let mut conn = cache.conn.get().await.unwrap();
                for customer in ["cus_field", "cus_stale"] {
                    let _: () = conn.del(cache.keys.customer(customer)).await.unwrap();
                }
                let _: () = conn
                    .set(cache.keys.org("org_t"), "not a hash")
                    .await
                    .unwrap();
                let mut written = Vec::new();
                for batch in &batches {
                    written.push(if std::ptr::eq(cache, &scripted) {
                        cache.write(batch, None, Writer::Projection).await.unwrap()
                    } else {
                        cache.write_rebuilding(batch).await.unwrap()
                    });
                }
                keys = [
                    "cus_new",
                    "cus_moved",
                    "cus_newer",
                    "cus_field",
                    "cus_stale",
                    "cus_gone",
                    "cus_typed",
                ]
                .iter()
                .map(|c| (cache.keys.customer(c), false))
                .chain(
                    ["org_a", "org_b", "org_f", "org_n", "org_t"]
                        .iter()
                        .map(|o| (cache.keys.org(o), true)),
                )
                .collect();
                results.push((written, dump(cache, &keys).await));
            }
            assert_eq!(
                results[0].0,
                [
                    vec![true, true, false, true, true, true],
                    vec![true],
                    vec![true]
                ],
                "{mode}"
            );
            assert_eq!(results[0], results[1], "{mode}");
            assert_eq!(members(&plain, "org_b").await, ["cus_moved"], "{mode}");
            assert_eq!(members(&plain, "org_n").await, ["cus_new"], "{mode}");
            assert_eq!(
                members(&plain, "org_f").await,
                ["cus_field", "cus_stale"],
                "{mode}"
            );
            assert_eq!(keys.len(), 12);
            scripted.clear_all().await.unwrap();
            plain.clear_all().await.unwrap();
        }
    }

    /// A rebuild over a full cache (`begin_rebuild` notes its keys, `write_rebuilding`
    /// writes the log's answers, `end_rebuild` deletes what it did not write again) leaves
    /// what the scripted write leaves in an empty cache, whatever the cache held: an answer
    /// of a newer version, a key of another type, a field of a customer that moved away, a
    /// hash marked complete, the keys of a customer and an owner the log no longer gives,
    /// while a key of the app's own under `stripe:` stays. An owner written by two chunks
    /// keeps both customers.
    #[tokio::test]
    async fn a_rebuild_over_what_the_cache_holds_leaves_what_one_into_an_empty_cache_leaves() {
        for (mode, empty) in caches() {
            let full = beside(&empty, "full");
            let batches = [
                vec![
                    answer("cus_moved", 2, Some("org_b"), false),
                    answer("cus_stay", 1, Some("org_a"), false),
                    answer("cus_newer", 1, Some("org_c"), false),
                    answer("cus_typed", 1, Some("org_t"), false),
                    answer("cus_new", 1, Some("org_n"), false),
                ],
                vec![answer("cus_other", 1, Some("org_a"), false)],
            ];
            for (customer, version, org) in [
                ("cus_moved", 1, "org_a"),
                ("cus_stay", 1, "org_a"),
                ("cus_newer", 3, "org_c"),
                ("cus_unlogged", 1, "org_x"),
            ] {
                full.put(&info(customer, version, Some(org), false))
                    .await
                    .unwrap();
            }
            let mut conn = full.conn.get().await.unwrap();
            let _: () = conn
                .hset(full.keys.org("org_a"), COMPLETE_FIELD, "1")
                .await
                .unwrap();
            let _: () = conn
                .hset(full.keys.customer("cus_typed"), "a", "hash")
                .await
                .unwrap();
            let _: () = conn
                .set(full.keys.org("org_t"), "not a hash")
                .await
                .unwrap();
            let app_key = format!("{}stripe:app_own", full.keys.prefix);
            let _: () = conn.set(&app_key, "the app's").await.unwrap();

            full.begin_rebuild().await.unwrap();
            for batch in &batches {
                empty.write(batch, None, Writer::Projection).await.unwrap();
                full.write_rebuilding(batch).await.unwrap();
            }
            full.end_rebuild(true).await.unwrap();

            let customers = [
                "cus_moved",
                "cus_stay",
                "cus_newer",
                "cus_typed",
                "cus_new",
                "cus_other",
                "cus_unlogged",
            ];
            let owners = ["org_a", "org_b", "org_c", "org_n", "org_t", "org_x"];
            let keys = |cache: &RedisCache| -> Vec<(String, bool)> {
                customers
                    .iter()
                    .map(|c| (cache.keys.customer(c), false))
                    .chain(owners.iter().map(|o| (cache.keys.org(o), true)))
                    .collect()
            };
            let rebuilt = dump(&full, &keys(&full)).await;
            assert_eq!(rebuilt, dump(&empty, &keys(&empty)).await, "{mode}");
            assert!(
                rebuilt.iter().any(|(key, value, _)| key.ends_with("org_a")
                    && value.contains("cus_other")
                    && value.contains("cus_stay")
                    && !value.contains("cus_moved")),
                "{mode}: {rebuilt:?}"
            );
            assert_eq!(
                members(&full, "org_a").await,
                ["cus_other", "cus_stay"],
                "{mode}"
            );
            // Six customers and five owners: the unlogged customer and its org are gone.
            assert_eq!(full.held_keys().await.unwrap().len(), 11, "{mode}");
            let kept: Option<String> = conn.get(&app_key).await.unwrap();
            assert_eq!(kept.as_deref(), Some("the app's"), "{mode}");
            let _: () = conn.del(&app_key).await.unwrap();
            empty.clear_all().await.unwrap();
            full.clear_all().await.unwrap();
        }
    }
}
