//! The aggregates the ledger remembers between worker batches, so a batch loads only the
//! events after a version it already folded instead of whole histories.
//!
//! Only what the log holds is remembered, and only once it is committed: a wrong entry
//! would make every later decision about that customer wrong, so this must never hold a
//! state that is not exactly the fold of the stored events up to its version.

use std::collections::HashMap;
use std::sync::Mutex;

use aggregates::Subscription;

/// Customers' aggregates as of a version the log holds: each is the fold of exactly the
/// stored events 1..=version (decoded from the JSON the log holds), and is remembered
/// only after those events were committed. Events are never changed or removed, so
/// folding the events after `version` onto it gives the state a load of the whole
/// history gives, whoever wrote them (another worker, replica or the event store).
/// Bounded: past `capacity` customers, the least recently used half is forgotten.
pub struct AggregateCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    clock: u64,
    entries: HashMap<String, (i64, Subscription, u64)>,
}

impl AggregateCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The remembered (version, aggregate) of each of `ids` that is held, taken out of
    /// the cache rather than copied (an aggregate holds every subscription of its
    /// customer): the batch that takes them gives them back, brought up to date, through
    /// [`AggregateCache::remember`] once it has committed. A batch that does not commit
    /// gives nothing back, and the next load of those customers reads their whole
    /// history from the log, which is only slower.
    pub fn take(&self, ids: &[String]) -> HashMap<String, (i64, Subscription)> {
        let mut inner = self.lock();
        ids.iter()
            .filter_map(|id| {
                let (id, (version, state, _)) = inner.entries.remove_entry(id)?;
                Some((id, (version, state)))
            })
            .collect()
    }

    /// Remembers aggregates whose events up to their version are committed.
    pub(super) fn remember(&self, aggregates: Vec<(String, i64, Subscription)>) {
        if self.capacity == 0 || aggregates.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        for (id, version, state) in aggregates {
            match inner.entries.get_mut(&id) {
                Some(held) if held.0 > version => held.2 = now,
                Some(held) => *held = (version, state, now),
                None => {
                    inner.entries.insert(id, (version, state, now));
                }
            }
        }
        if inner.entries.len() > self.capacity {
            let mut used: Vec<u64> = inner.entries.values().map(|e| e.2).collect();
            let keep = self.capacity / 2;
            let (_, cutoff, _) = used.select_nth_unstable_by(keep, |a, b| b.cmp(a));
            let cutoff = *cutoff;
            inner.entries.retain(|_, entry| entry.2 > cutoff);
        }
    }

    /// How many customers are remembered.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every remembered (customer, version, aggregate), for checking it against the log.
    pub fn entries(&self) -> Vec<(String, i64, Subscription)> {
        self.lock()
            .entries
            .iter()
            .map(|(id, (version, state, _))| (id.clone(), *version, state.clone()))
            .collect()
    }
}
