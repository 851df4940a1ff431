//! A bounded hand-over from a writer to the reader that comes after it in the same
//! process: values put by key, each taken at most once. It only ever saves work (the
//! reader that finds nothing does what it would have done without it), so it may forget:
//! past its capacity the oldest go first, which bounds what a reader that never comes
//! leaves behind. Used for the events the webhooks stored, parsed (`subledger`'s
//! `inbox::ParsedEvents`), and for the events the batches committed ([`crate::recent`]).

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// See the module header. Clones share the same values.
pub struct HandOver<K, V> {
    inner: Arc<Mutex<Held<K, V>>>,
    capacity: usize,
}

impl<K, V> Clone for HandOver<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            capacity: self.capacity,
        }
    }
}

struct Held<K, V> {
    by_key: HashMap<K, V>,
    /// Keys in the order they were put; some may have been taken already.
    order: VecDeque<K>,
    /// How many were taken, ever.
    taken: u64,
}

impl<K: Eq + Hash + Clone, V> HandOver<K, V> {
    /// Holding at most `capacity` values at once.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Held {
                by_key: HashMap::new(),
                order: VecDeque::new(),
                taken: 0,
            })),
            capacity,
        }
    }

    /// Holds each value under its key, in order, pushing out the oldest past the capacity.
    /// A key already held keeps its place and takes the new value.
    pub fn put(&self, values: impl IntoIterator<Item = (K, V)>) {
        let mut held = self.inner.lock().expect("never poisoned: no panics inside");
        for (key, value) in values {
            if let Some(slot) = held.by_key.get_mut(&key) {
                *slot = value;
                continue;
            }
            while held.order.len() >= self.capacity {
                let Some(oldest) = held.order.pop_front() else {
                    break;
                };
                held.by_key.remove(&oldest);
            }
            held.order.push_back(key.clone());
            held.by_key.insert(key, value);
        }
    }

    /// The value held under `key`, if it is still held; it is held no longer.
    pub fn take<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let mut held = self.inner.lock().expect("never poisoned: no panics inside");
        if held.by_key.is_empty() {
            return None;
        }
        let value = held.by_key.remove(key);
        held.taken += u64::from(value.is_some());
        if held.by_key.is_empty() {
            // Nothing left to find: forget the keys of what was taken.
            held.order.clear();
        }
        value
    }

    /// How many values are held.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("never poisoned: no panics inside")
            .by_key
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many values were taken since this was made.
    pub fn taken(&self) -> u64 {
        self.inner
            .lock()
            .expect("never poisoned: no panics inside")
            .taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_put_again_keeps_its_place_and_takes_the_new_value() {
        let hand_over = HandOver::new(3);
        hand_over.put([("a", 1), ("a", 2), ("b", 3), ("c", 4)]);
        // Had "a" been queued twice, the fourth put would have pushed its first place out,
        // and its value with it.
        assert_eq!(hand_over.len(), 3);
        assert_eq!(hand_over.take("a"), Some(2));
        // "d" pushes out the place "a" kept (taken already), "e" the oldest held.
        hand_over.put([("d", 5), ("e", 6)]);
        assert_eq!(hand_over.take("b"), None);
        assert_eq!(
            [
                hand_over.take("c"),
                hand_over.take("d"),
                hand_over.take("e")
            ],
            [Some(4), Some(5), Some(6)]
        );
        assert_eq!(hand_over.taken(), 4);
    }
}
