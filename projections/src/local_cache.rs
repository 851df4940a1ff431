//! The in-process cache in front of Redis: answers already read from Redis, kept in this
//! replica's memory so that a hot entitlement check costs no network round trip.
//!
//! Three things keep it from serving a stale answer:
//! - **Invalidation.** The Redis projection publishes, on one Redis channel, the keys it
//!   has just written, after writing them (standalone: in the same pipeline, so after them
//!   on the server; on a cluster: once every write has answered, and the cluster relays
//!   the message to every node); every replica's listener drops those keys. Redis pub/sub rather than
//!   Postgres `LISTEN/NOTIFY`: what this cache holds are Redis values, so the message must
//!   follow the Redis write; a notification sent at the Postgres commit would come before
//!   it (the Redis projection is applied beside the transaction), and a replica could read
//!   the old value again and keep it.
//! - **Liveness.** Until the listener is subscribed, and from the moment its connection
//!   fails (or its own heartbeats stop coming back), the cache is bypassed: every read goes
//!   to Redis and nothing is stored; when it is back, the cache starts empty.
//! - **A bound on age.** No entry is served older than `max_age`, whatever happened to
//!   the messages (a backstop, not the mechanism).
//!
//! A hot entry is read again before it is too old: the first read that finds it past
//! three quarters of `max_age` is still served from memory and is told to refresh it
//! ([`Lookup::Refresh`]), by reading Redis beside the answer and storing the value as a
//! miss would (under the same ticket rule). So an entry read often never expires on a
//! reader's path, and none is ever served older than `max_age`.
//!
//! A read that misses takes a [`Ticket`] before going to Redis, and stores what it read
//! only if no invalidation of that key (and no invalidation of everything, no change of
//! liveness) happened since, so a value read just before a write is never stored after
//! that write's invalidation went by. Each shard remembers when it last saw each key
//! invalidated for [`TICKET_LIFE`], and a ticket is good for that long: other keys'
//! invalidations, which come all the time while webhooks are processed, do not void it.
//!
//! Bounded by entries and by bytes (key and value); past either, the least recently used
//! half of a shard is dropped. It caches answers, never decisions: whoever reads through it
//! still judges access against the clock at read time. It must never be written except
//! with what Redis answered.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus::{register_int_counter_vec, register_int_gauge_vec, IntCounterVec, IntGaugeVec};

/// How the cache is sized and how old an entry may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalCacheConfig {
    /// Most entries held.
    pub max_entries: usize,
    /// Most bytes held (keys and values, plus a fixed overhead per entry).
    pub max_bytes: usize,
    /// No entry is served older than this. Zero turns the cache off.
    pub max_age: Duration,
}

impl LocalCacheConfig {
    pub fn enabled(&self) -> bool {
        !self.max_age.is_zero() && self.max_entries > 0 && self.max_bytes > 0
    }
}

/// What an entry costs beyond its key and value (the map's slot, the entry's fields).
const ENTRY_OVERHEAD: usize = 96;

/// Shards, each behind its own lock, so concurrent readers rarely wait for each other.
const SHARDS: usize = 16;

/// Reads of the in-process cache, by result (`hit`, `miss`, `bypass`).
pub static LOCAL_READS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let counter = register_int_counter_vec!(
        "subledger_local_cache_reads_total",
        "Reads of the in-process cache: hit, miss (read from Redis), bypass (invalidation channel down or cache off)",
        &["result"]
    )
    .expect("the metric is registered once");
    for result in Lookup::<()>::LABELS {
        counter.with_label_values(&[result]);
    }
    counter
});

/// The in-process cache's size and whether its invalidation channel is up.
pub static LOCAL_STATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let gauge = register_int_gauge_vec!(
        "subledger_local_cache",
        "The in-process cache: entries, bytes, and live (1 while its invalidation channel is up)",
        &["measure"]
    )
    .expect("the metric is registered once");
    for measure in ["entries", "bytes", "live"] {
        gauge.with_label_values(&[measure]);
    }
    gauge
});

/// The state of invalidations when a read missed: what it reads from Redis may be stored
/// only if its key was not invalidated since (nor everything), and within [`TICKET_LIFE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// [`LocalCache::epoch`] then.
    epoch: u64,
    /// [`LocalCache::stamp`] then: the invalidations it has seen.
    stamp: u64,
    taken: Instant,
}

/// How long a ticket is good for, and how long a shard remembers a key's invalidation. A
/// Redis read takes milliseconds; one that took longer is simply not stored.
const TICKET_LIFE: Duration = Duration::from_secs(5);

/// What the cache answers for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<V> {
    /// Held, and young enough.
    Hit(V),
    /// Held and young enough, but past three quarters of its age: serve it, and read
    /// Redis to [`LocalCache::insert`] it again with the ticket. One read is told so until
    /// it is stored again (or expires).
    Refresh(V, Ticket),
    /// Not held: read Redis, then [`LocalCache::insert`] with the ticket.
    Miss(Ticket),
    /// The cache is off or its invalidation channel is down: read Redis, store nothing.
    Bypass,
}

impl<V> Lookup<V> {
    const LABELS: [&'static str; 3] = ["hit", "miss", "bypass"];

    fn label(&self) -> &'static str {
        match self {
            Lookup::Hit(_) | Lookup::Refresh(..) => "hit",
            Lookup::Miss(_) => "miss",
            Lookup::Bypass => "bypass",
        }
    }
}

struct Entry<V> {
    value: V,
    bytes: usize,
    stored: Instant,
    used: u64,
    /// A read was told to refresh it ([`Lookup::Refresh`]).
    refreshing: bool,
}

struct Shard<V> {
    entries: HashMap<String, Entry<V>>,
    bytes: usize,
    /// Keys invalidated within about [`TICKET_LIFE`]: the stamp of their last
    /// invalidation, and when.
    invalidated: HashMap<String, (u64, Instant)>,
    /// When `invalidated` was last rid of what is older than [`TICKET_LIFE`].
    pruned: Instant,
}

/// See the module header.
pub struct LocalCache<V> {
    config: LocalCacheConfig,
    shards: Box<[Mutex<Shard<V>>]>,
    hasher: RandomState,
    /// Bumped by every invalidation of everything and every change of liveness: it voids
    /// every ticket.
    epoch: AtomicU64,
    /// Bumped by every invalidation of keys (one message).
    stamp: AtomicU64,
    live: AtomicBool,
    clock: AtomicU64,
}

impl<V: Clone> LocalCache<V> {
    /// A cache that bypasses every read until [`LocalCache::set_live`] says its
    /// invalidation channel is up.
    pub fn new(config: LocalCacheConfig) -> Self {
        Self {
            config,
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        entries: HashMap::new(),
                        bytes: 0,
                        invalidated: HashMap::new(),
                        pruned: Instant::now(),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            epoch: AtomicU64::new(0),
            stamp: AtomicU64::new(0),
            live: AtomicBool::new(false),
            clock: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &LocalCacheConfig {
        &self.config
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard<V>> {
        let index = (self.hasher.hash_one(key) as usize) % self.shards.len();
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether reads may be served from memory now.
    pub fn is_live(&self) -> bool {
        self.config.enabled() && self.live.load(Ordering::SeqCst)
    }

    /// Looks a key up (counted in [`LOCAL_READS`]).
    pub fn get(&self, key: &str) -> Lookup<V> {
        let lookup = self.lookup(key, Instant::now());
        LOCAL_READS.with_label_values(&[lookup.label()]).inc();
        lookup
    }

    /// The lookup of a read at `now`.
    fn lookup(&self, key: &str, now: Instant) -> Lookup<V> {
        if !self.is_live() {
            return Lookup::Bypass;
        }
        // Taken before the shard is read: an invalidation of the key after this point voids
        // the ticket, even one the shard did not hold yet. An invalidation whose stamp it
        // has seen began before: its write is already in Redis, which this read goes to
        // next. `taken` comes first, so a pruned invalidation (older than `TICKET_LIFE`
        // then) was seen.
        let taken = Instant::now();
        let ticket = Ticket {
            epoch: self.epoch.load(Ordering::SeqCst),
            stamp: self.stamp.load(Ordering::SeqCst),
            taken,
        };
        let mut shard = self.shard(key);
        let used = self.clock.fetch_add(1, Ordering::Relaxed);
        let max_age = self.config.max_age;
        match shard.entries.get_mut(key) {
            Some(entry) if now.saturating_duration_since(entry.stored) < max_age => {
                entry.used = used;
                let age = now.saturating_duration_since(entry.stored);
                if !entry.refreshing && age >= max_age - max_age / 4 {
                    entry.refreshing = true;
                    Lookup::Refresh(entry.value.clone(), ticket)
                } else {
                    Lookup::Hit(entry.value.clone())
                }
            }
            Some(_) => {
                if let Some(old) = shard.entries.remove(key) {
                    shard.bytes -= old.bytes;
                }
                Lookup::Miss(ticket)
            }
            None => Lookup::Miss(ticket),
        }
    }

    /// Stores what Redis answered for `key` after a [`Lookup::Miss`] or a
    /// [`Lookup::Refresh`] (replacing the entry), unless an
    /// invalidation or a change of liveness came since `ticket` was taken. `value_bytes`:
    /// what the value holds (its JSON's length is close enough).
    pub fn insert(&self, key: &str, value: V, value_bytes: usize, ticket: Ticket) {
        let bytes = key.len() + value_bytes + ENTRY_OVERHEAD;
        let per_shard_entries = self.config.max_entries.div_ceil(SHARDS);
        let per_shard_bytes = self.config.max_bytes.div_ceil(SHARDS);
        if bytes > per_shard_bytes {
            return;
        }
        let mut shard = self.shard(key);
        // Checked under the shard's lock: an invalidation records the key (and an
        // invalidation of everything bumps the epoch) before it takes this lock to remove
        // entries, so either this sees it, or the removal comes after this insert and
        // removes it.
        let voided = shard
            .invalidated
            .get(key)
            .is_some_and(|(stamp, _)| *stamp > ticket.stamp);
        if !self.is_live()
            || self.epoch.load(Ordering::SeqCst) != ticket.epoch
            || voided
            || ticket.taken.elapsed() >= TICKET_LIFE
        {
            return;
        }
        let used = self.clock.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            value,
            bytes,
            stored: Instant::now(),
            used,
            refreshing: false,
        };
        if let Some(old) = shard.entries.insert(key.to_owned(), entry) {
            shard.bytes -= old.bytes;
        }
        shard.bytes += bytes;
        if shard.entries.len() > per_shard_entries || shard.bytes > per_shard_bytes {
            evict_half(&mut shard);
        }
    }

    /// Drops these keys (the projection wrote them), and voids the tickets of reads of
    /// them that are at Redis now.
    pub fn invalidate<'k>(&self, keys: impl IntoIterator<Item = &'k str>) {
        let stamp = self.stamp.fetch_add(1, Ordering::SeqCst) + 1;
        let now = Instant::now();
        for key in keys {
            let mut shard = self.shard(key);
            if let Some(old) = shard.entries.remove(key) {
                shard.bytes -= old.bytes;
            }
            if now.saturating_duration_since(shard.pruned) >= TICKET_LIFE {
                shard
                    .invalidated
                    .retain(|_, (_, at)| now.saturating_duration_since(*at) < TICKET_LIFE);
                shard.pruned = now;
            }
            shard.invalidated.insert(key.to_owned(), (stamp, now));
        }
    }

    /// Drops everything (a rebuild cleared Redis, or messages may have been missed).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.entries.clear();
            shard.bytes = 0;
            // Every ticket taken before is void: what they recorded is of no more use.
            shard.invalidated.clear();
        }
    }

    /// Whether the invalidation channel is up. Either way the cache starts over empty:
    /// going down, its entries can no longer be invalidated; coming up, messages sent
    /// while it was down were missed.
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
        self.invalidate_all();
        LOCAL_STATE
            .with_label_values(&["live"])
            .set(i64::from(live && self.config.enabled()));
    }

    /// (entries, bytes) held now.
    pub fn size(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(entries, bytes), shard| {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            (entries + shard.entries.len(), bytes + shard.bytes)
        })
    }

    /// Publishes the size to the gauges (at each scrape).
    pub fn record_size(&self) {
        let (entries, bytes) = self.size();
        LOCAL_STATE
            .with_label_values(&["entries"])
            .set(entries as i64);
        LOCAL_STATE.with_label_values(&["bytes"]).set(bytes as i64);
    }
}

/// The channel the Redis projection publishes the keys it wrote on, one message per batch:
/// the keys separated by newlines, [`ALL_KEYS`] for "everything", or [`HEARTBEAT`].
pub fn channel(prefix: &str) -> String {
    format!("{prefix}subledger:invalidations")
}

/// The message that drops every entry (a rebuild cleared Redis).
pub const ALL_KEYS: &str = "*";

/// What each listener publishes on the channel to prove it still hears it.
pub const HEARTBEAT: &str = "~heartbeat";

/// How often a listener publishes a heartbeat; hearing nothing on the channel (its own
/// heartbeats included) for three of these means the subscription is dead even if its
/// socket is not closed, and the cache is bypassed until a new one is made.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

/// The wait before subscribing again after the channel was lost: short, since reads
/// bypass the cache (to Redis) meanwhile.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(100);

/// Drops the keys a message names.
pub fn apply_message<V: Clone>(cache: &LocalCache<V>, payload: &str) {
    match payload {
        HEARTBEAT => {}
        ALL_KEYS => cache.invalidate_all(),
        keys => cache.invalidate(keys.split('\n').filter(|k| !k.is_empty())),
    }
}

/// Keeps `cache` subscribed to its invalidations until `stop`: live while subscribed and
/// hearing the channel, bypassed otherwise. Each attempt subscribes on the next of
/// `clients` (a cluster's nodes: any one hears every message). `publish` sends a heartbeat (through the
/// service's ordinary Redis connection).
pub async fn listen<V, P, F>(
    clients: Vec<redis::Client>,
    channel: String,
    cache: std::sync::Arc<LocalCache<V>>,
    publish: P,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    V: Clone + Send + Sync + 'static,
    P: Fn() -> F,
    F: std::future::Future<Output = Result<(), redis::RedisError>>,
{
    use futures_util::StreamExt;
    if !cache.config().enabled() {
        return;
    }
    let mut quiet = false;
    // The servers it may subscribe on, tried in turn: one, or each configured node of a
    // cluster (a cluster delivers every message to every node).
    let mut next = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let Some(client) = clients.get(next % clients.len().max(1)) else {
            return;
        };
        next += 1;
        let subscribed = tokio::time::timeout(Duration::from_secs(2), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match subscribed {
            Ok(Ok(pubsub)) => {
                // The sink is kept: dropping it would end the subscription.
                let (_sink, mut messages) = pubsub.split();
                cache.set_live(true);
                tracing::info!("invalidation channel subscribed; in-process cache in use");
                quiet = false;
                let mut heard = Instant::now();
                let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let stopped = loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(message) => {
                                heard = Instant::now();
                                let payload: String = message.get_payload().unwrap_or_default();
                                apply_message(&cache, &payload);
                            }
                            None => break false,
                        },
                        _ = beat.tick() => {
                            if heard.elapsed() > HEARTBEAT_EVERY * 3 {
                                break false;
                            }
                            if let Err(error) = publish().await {
                                tracing::debug!(%error, "invalidation heartbeat not sent");
                            }
                        }
                        _ = stop.changed() => break true,
                    }
                };
                cache.set_live(false);
                if stopped {
                    return;
                }
                tracing::warn!(
                    "invalidation channel lost; in-process cache bypassed until it is back"
                );
            }
            Ok(Err(error)) if !quiet => {
                quiet = true;
                tracing::warn!(%error, "cannot subscribe to the invalidation channel; in-process cache bypassed");
            }
            Err(_) if !quiet => {
                quiet = true;
                tracing::warn!(
                    "subscribing to the invalidation channel timed out; in-process cache bypassed"
                );
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Drops the least recently used half of a shard's entries.
fn evict_half<V>(shard: &mut Shard<V>) {
    let mut uses: Vec<u64> = shard.entries.values().map(|e| e.used).collect();
    let middle = uses.len() / 2;
    let (_, cut, _) = uses.select_nth_unstable(middle);
    let cut = *cut;
    shard.entries.retain(|_, entry| entry.used >= cut);
    shard.bytes = shard.entries.values().map(|e| e.bytes).sum();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_entries: usize, max_bytes: usize) -> LocalCache<u32> {
        let cache = LocalCache::new(LocalCacheConfig {
            max_entries,
            max_bytes,
            max_age: Duration::from_secs(60),
        });
        cache.set_live(true);
        cache
    }

    fn fill(cache: &LocalCache<u32>, key: &str, value: u32) {
        match cache.get(key) {
            Lookup::Miss(ticket) => cache.insert(key, value, 4, ticket),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn a_stored_answer_is_served_until_invalidated() {
        let cache = cache(1000, 1 << 20);
        fill(&cache, "k", 1);
        assert_eq!(cache.get("k"), Lookup::Hit(1));
        cache.invalidate(["k"]);
        assert!(matches!(cache.get("k"), Lookup::Miss(_)));
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_stored() {
        let cache = cache(1000, 1 << 20);
        let Lookup::Miss(ticket) = cache.get("k") else {
            panic!()
        };
        // The projection writes and invalidates while the read is at Redis (with the
        // old value): the message finds nothing to drop, and the old value is refused.
        cache.invalidate(["k"]);
        cache.insert("k", 1, 4, ticket);
        assert!(matches!(cache.get("k"), Lookup::Miss(_)));
        // Other keys' invalidations (the projection writes all the time) do not void it,
        // before or after its own key's.
        let Lookup::Miss(ticket) = cache.get("k") else {
            panic!()
        };
        cache.invalidate(["other", "another"]);
        cache.insert("k", 1, 4, ticket);
        assert_eq!(cache.get("k"), Lookup::Hit(1));
        let Lookup::Miss(ticket) = cache.get("j") else {
            panic!()
        };
        cache.invalidate(["j"]);
        cache.invalidate(["other"]);
        cache.insert("j", 2, 4, ticket);
        assert!(matches!(cache.get("j"), Lookup::Miss(_)));
        // An invalidation of everything voids every ticket.
        let Lookup::Miss(ticket) = cache.get("j") else {
            panic!()
        };
        cache.invalidate_all();
        cache.insert("j", 2, 4, ticket);
        assert!(matches!(cache.get("j"), Lookup::Miss(_)));
        // A ticket that was at Redis longer than a shard remembers invalidations is void.
        let Lookup::Miss(mut ticket) = cache.get("j") else {
            panic!()
        };
        ticket.taken -= TICKET_LIFE;
        cache.insert("j", 2, 4, ticket);
        assert!(matches!(cache.get("j"), Lookup::Miss(_)));
    }

    /// A shard remembers invalidations for about `TICKET_LIFE`, not for ever.
    #[test]
    fn invalidations_are_remembered_only_while_a_ticket_could_need_them() {
        let cache = cache(1000, 1 << 20);
        for i in 0..1000 {
            cache.invalidate([format!("key{i}").as_str()]);
        }
        let remembered = |cache: &LocalCache<u32>| -> usize {
            cache
                .shards
                .iter()
                .map(|s| s.lock().unwrap().invalidated.len())
                .sum()
        };
        assert_eq!(remembered(&cache), 1000);
        for shard in cache.shards.iter() {
            let mut shard = shard.lock().unwrap();
            shard.pruned -= TICKET_LIFE;
            for (_, at) in shard.invalidated.values_mut() {
                *at -= TICKET_LIFE;
            }
        }
        // 1000 keys reach every shard, which then forgets what is older.
        for i in 0..1000 {
            cache.invalidate([format!("fresh{i}").as_str()]);
        }
        assert_eq!(remembered(&cache), 1000);
    }

    #[test]
    fn while_the_channel_is_down_every_read_bypasses_and_it_comes_back_empty() {
        let cache = cache(1000, 1 << 20);
        fill(&cache, "k", 1);
        let Lookup::Miss(ticket) = cache.get("j") else {
            panic!()
        };
        cache.set_live(false);
        assert_eq!(cache.get("k"), Lookup::Bypass);
        cache.insert("j", 2, 4, ticket);
        cache.set_live(true);
        assert!(matches!(cache.get("k"), Lookup::Miss(_)));
        assert!(matches!(cache.get("j"), Lookup::Miss(_)));
        assert_eq!(cache.size(), (0, 0));
        // A cache that was never told its channel is up serves nothing.
        let fresh = LocalCache::<u32>::new(*cache.config());
        assert_eq!(fresh.get("k"), Lookup::Bypass);
    }

    #[test]
    fn no_entry_is_served_past_its_age() {
        let cache = LocalCache::new(LocalCacheConfig {
            max_entries: 10,
            max_bytes: 1 << 20,
            max_age: Duration::from_millis(1),
        });
        cache.set_live(true);
        fill(&cache, "k", 1);
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(cache.get("k"), Lookup::Miss(_)));
        assert_eq!(cache.size().0, 0);
        let off = LocalCache::<u32>::new(LocalCacheConfig {
            max_age: Duration::ZERO,
            ..*cache.config()
        });
        off.set_live(true);
        assert_eq!(off.get("k"), Lookup::Bypass);
    }

    /// A hot entry is read again before it is too old: the first read past three quarters
    /// of its age is served and told to refresh it, later ones are plain hits until the
    /// refresh is stored, which renews the entry. A refresh that raced an invalidation is
    /// not stored, and the entry still ends at its age.
    #[test]
    fn a_hot_entry_is_refreshed_before_it_is_too_old() {
        let cache = cache(1000, 1 << 20); // max_age: 60 s
        fill(&cache, "k", 1);
        let later = |secs| Instant::now() + Duration::from_secs(secs);
        assert_eq!(cache.lookup("k", later(44)), Lookup::Hit(1));
        let Lookup::Refresh(1, ticket) = cache.lookup("k", later(46)) else {
            panic!("no refresh past three quarters of the age")
        };
        assert_eq!(cache.lookup("k", later(50)), Lookup::Hit(1));
        cache.insert("k", 2, 4, ticket);
        assert_eq!(cache.lookup("k", later(44)), Lookup::Hit(2));
        assert!(matches!(cache.lookup("k", later(61)), Lookup::Miss(_)));
        assert_eq!(cache.size().0, 0);
        // A refresh that raced its key's invalidation is not stored.
        fill(&cache, "k", 4);
        let Lookup::Refresh(4, ticket) = cache.lookup("k", later(46)) else {
            panic!()
        };
        cache.invalidate(["k"]);
        cache.insert("k", 5, 4, ticket);
        assert!(matches!(cache.get("k"), Lookup::Miss(_)));
    }

    #[test]
    fn it_stays_within_its_entries_and_bytes() {
        let cache = cache(SHARDS * 8, 1 << 20);
        for i in 0..10_000 {
            fill(&cache, &format!("key{i}"), i);
        }
        let (entries, bytes) = cache.size();
        assert!(entries <= SHARDS * 8, "{entries}");
        assert!(entries >= SHARDS * 2, "{entries}");
        assert_eq!(
            bytes,
            cache
                .shards
                .iter()
                .flat_map(|s| s
                    .lock()
                    .unwrap()
                    .entries
                    .iter()
                    .map(|(k, e)| {
                        assert_eq!(e.bytes, k.len() + 4 + ENTRY_OVERHEAD);
                        e.bytes
                    })
                    .collect::<Vec<_>>())
                .sum::<usize>()
        );
        let small = cache_with_bytes(SHARDS * 1000);
        for i in 0..10_000 {
            fill(&small, &format!("key{i}"), i);
        }
        assert!(small.size().1 <= SHARDS * 1000, "{:?}", small.size());
        // A value larger than a shard's share is never stored.
        let Lookup::Miss(ticket) = small.get("huge") else {
            panic!()
        };
        small.insert("huge", 1, 100_000, ticket);
        assert!(matches!(small.get("huge"), Lookup::Miss(_)));
    }

    fn cache_with_bytes(max_bytes: usize) -> LocalCache<u32> {
        cache(1_000_000, max_bytes)
    }

    #[test]
    fn messages_name_keys_or_everything() {
        let cache = cache(1000, 1 << 20);
        for key in ["a", "b", "c"] {
            fill(&cache, key, 1);
        }
        apply_message(&cache, HEARTBEAT);
        assert_eq!(cache.size().0, 3);
        apply_message(&cache, "a\nb");
        assert_eq!(cache.get("c"), Lookup::Hit(1));
        assert!(matches!(cache.get("a"), Lookup::Miss(_)));
        apply_message(&cache, ALL_KEYS);
        assert_eq!(cache.size().0, 0);
    }

    #[test]
    fn the_most_recently_used_survive_eviction() {
        let cache = cache(SHARDS * 4, 1 << 20);
        fill(&cache, "hot", 0);
        for i in 0..1000 {
            assert_eq!(cache.get("hot"), Lookup::Hit(0), "{i}");
            let key = format!("cold{i}");
            fill(&cache, &key, i);
        }
    }
}
