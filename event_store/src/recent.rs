//! Events this process committed, handed from the writer that decided them to this
//! process's projections, so that a projection reading them from the log takes them as
//! they were decided instead of decoding their JSON again (decoding was the largest cost
//! of a projection pass in a profile of the ingest benchmark).
//!
//! The log stays the one source: a projection reads every event from the log, in the
//! log's order and below its horizon, exactly as before; only the decoding of a payload
//! is skipped when the event with that (aggregate, sequence) is here. What is here is
//! what the log holds: an event is put only once the transaction that wrote it has
//! committed (a sequence of an aggregate is then that event forever: the log is never
//! updated), and an event reads back from its JSON as itself (`batch::NewEvents::push`
//! checks it in debug builds). An event written by another replica, or pushed out, is
//! decoded as before. Bounded: the oldest go first, so a process whose projections run
//! elsewhere (another replica holds their checkpoints) holds at most [`CAPACITY`], and so
//! does one whose projections read an event in the moment between its commit and its
//! hand-over (it is decoded, and what was handed over stays until pushed out).

use aggregates::SubscriptionEvent;

use crate::hand_over::HandOver;

/// Most events held at once (an event is a few KiB at most).
pub const CAPACITY: usize = 2048;

/// See the module header. Clones share the same events.
#[derive(Clone)]
pub struct RecentEvents(HandOver<(String, i64), SubscriptionEvent>);

impl Default for RecentEvents {
    fn default() -> Self {
        Self(HandOver::new(CAPACITY))
    }
}

impl RecentEvents {
    /// Holds the committed `events` of `aggregate_id`, the first of them at sequence
    /// `first`, the others after it in order.
    pub fn put(&self, aggregate_id: &str, first: i64, events: Vec<SubscriptionEvent>) {
        self.0.put(
            (first..)
                .zip(events)
                .map(|(sequence, event)| ((aggregate_id.to_owned(), sequence), event)),
        );
    }

    /// The event at `sequence` of `aggregate_id`, if this process committed it and it is
    /// still held; it is held no longer.
    pub fn take(&self, aggregate_id: &str, sequence: i64) -> Option<SubscriptionEvent> {
        // Checked first so that a reader with nothing handed over (a replay, another
        // replica's events) builds no key for each event it reads.
        if self.0.is_empty() {
            return None;
        }
        self.0.take(&(aggregate_id.to_owned(), sequence))
    }

    /// How many events are held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many events were taken since these were made.
    pub fn taken(&self) -> u64 {
        self.0.taken()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aggregates::{CustomerView, FactSource};

    fn deleted(id: &str) -> SubscriptionEvent {
        SubscriptionEvent::CustomerDeleted {
            source: FactSource {
                stripe_event_id: id.to_owned(),
                stripe_event_type: "customer.deleted".to_owned(),
                created: chrono::DateTime::UNIX_EPOCH,
            },
            view: CustomerView::default(),
        }
    }

    #[test]
    fn an_event_is_taken_once_by_its_aggregate_and_sequence() {
        let recent = RecentEvents::default();
        recent.put("cus_a", 3, vec![deleted("evt_3"), deleted("evt_4")]);
        assert_eq!(recent.take("cus_a", 2), None);
        assert_eq!(recent.take("cus_b", 3), None);
        assert_eq!(recent.take("cus_a", 4), Some(deleted("evt_4")));
        assert_eq!(recent.take("cus_a", 4), None);
        assert_eq!(recent.take("cus_a", 3), Some(deleted("evt_3")));
        assert!(recent.is_empty());
        assert_eq!(recent.taken(), 2);
    }

    #[test]
    fn the_oldest_go_first_past_the_capacity() {
        let recent = RecentEvents::default();
        for sequence in 1..=CAPACITY as i64 + 10 {
            recent.put("cus_a", sequence, vec![deleted(&format!("evt_{sequence}"))]);
        }
        assert_eq!(recent.len(), CAPACITY);
        assert_eq!(recent.take("cus_a", 10), None);
        assert_eq!(recent.take("cus_a", 11), Some(deleted("evt_11")));
    }
}
