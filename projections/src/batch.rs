//! A batch of the log as the runner hands it to every projection it applies together:
//! its events, and each customer's answer built from them once for all.
//!
//! Both projections that write answers (the platform `subscriptions` table and the Redis
//! cache) write, for each customer in a batch, the answer as of its newest event there,
//! and both store it as JSON. Building it ([`SubscriptionInfo::from_logged`], which judges
//! it against the catalogue) and encoding it were a fifth of a rebuild's work in this
//! process, done once per projection; now the first projection to ask builds them and the
//! others reuse them.

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use crate::catalog::Catalog;
use crate::info::SubscriptionInfo;
use crate::log::{newest_per_aggregate, LoggedEvent};
use crate::runner::ProjectionError;

/// One customer's answer with its JSON, as every projection stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub info: SubscriptionInfo,
    pub json: String,
}

impl Answer {
    pub fn new(info: SubscriptionInfo) -> Result<Self, serde_json::Error> {
        let json = serde_json::to_string(&info)?;
        Ok(Self { info, json })
    }
}

/// A batch of the log, in log order (see [`crate::runner::TransactionalProjection`] for
/// what a batch holds). It dereferences to its events.
pub struct Events<'a> {
    events: &'a [LoggedEvent],
    /// The answers, once built, with the address of the catalogue they were judged by.
    answers: OnceLock<(usize, Vec<Answer>)>,
}

impl<'a> Events<'a> {
    pub fn new(events: &'a [LoggedEvent]) -> Self {
        Self {
            events,
            answers: OnceLock::new(),
        }
    }

    /// Each customer's answer as of its newest event in the batch, in log order, judged
    /// by `catalog`: built on the first call, and shared by every later one with the same
    /// catalogue (another catalogue gets answers of its own, not kept).
    pub fn answers(&self, catalog: &Arc<Catalog>) -> Result<Answers<'_>, ProjectionError> {
        let address = Arc::as_ptr(catalog) as usize;
        if let Some((held, answers)) = self.answers.get() {
            if *held == address {
                return Ok(Answers::Shared(answers));
            }
            return Ok(Answers::Own(self.build(catalog)?));
        }
        let built = self.build(catalog)?;
        // The projections of a batch are applied in one task: nobody else sets it meanwhile.
        match self.answers.set((address, built)) {
            Ok(()) => Ok(Answers::Shared(&self.answers.get().expect("just set").1)),
            Err((_, built)) => Ok(Answers::Own(built)),
        }
    }

    fn build(&self, catalog: &Catalog) -> Result<Vec<Answer>, serde_json::Error> {
        newest_per_aggregate(self.events)
            .into_iter()
            .map(|logged| Answer::new(SubscriptionInfo::from_logged(logged, catalog)))
            .collect()
    }
}

impl<'a> From<&'a [LoggedEvent]> for Events<'a> {
    fn from(events: &'a [LoggedEvent]) -> Self {
        Self::new(events)
    }
}

impl Deref for Events<'_> {
    type Target = [LoggedEvent];

    fn deref(&self) -> &[LoggedEvent] {
        self.events
    }
}

/// A batch's answers ([`Events::answers`]): shared with the other projections, or built
/// for this one alone.
pub enum Answers<'a> {
    Shared(&'a [Answer]),
    Own(Vec<Answer>),
}

impl Deref for Answers<'_> {
    type Target = [Answer];

    fn deref(&self) -> &[Answer] {
        match self {
            Answers::Shared(answers) => answers,
            Answers::Own(answers) => answers,
        }
    }
}

#[cfg(test)]
mod tests {
    use aggregates::{CustomerView, FactSource, SubscriptionEvent};
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::log::Position;

    fn linked(customer: &str, org: &str, sequence: u64, global_seq: i64) -> LoggedEvent {
        let view = CustomerView {
            customer_id: customer.to_owned(),
            org_id: Some(org.to_owned()),
            ..CustomerView::default()
        };
        LoggedEvent {
            aggregate_id: customer.to_owned(),
            sequence,
            position: Position {
                tx_id: 1,
                global_seq,
            },
            event: SubscriptionEvent::OwnerLinked {
                source: FactSource {
                    stripe_event_id: format!("evt_{global_seq}"),
                    stripe_event_type: "customer.updated".to_owned(),
                    created: Utc.timestamp_opt(1_700_000_000 + global_seq, 0).unwrap(),
                },
                org_id: Some(org.to_owned()),
                user_id: None,
                account: None,
                view,
            },
        }
    }

    /// Each customer's newest answer, as `from_logged` builds it, with its JSON, in log
    /// order; built once for every caller with the same catalogue.
    #[test]
    fn answers_are_each_customers_newest_built_once_per_catalogue() {
        let events = [
            linked("cus_a", "org_1", 1, 1),
            linked("cus_b", "org_2", 1, 2),
            linked("cus_a", "org_3", 2, 3),
        ];
        let catalog = Arc::new(Catalog::default());
        let batch = Events::new(&events);
        let first = batch.answers(&catalog).unwrap();
        let expected: Vec<Answer> = [&events[1], &events[2]]
            .into_iter()
            .map(|logged| Answer::new(SubscriptionInfo::from_logged(logged, &catalog)).unwrap())
            .collect();
        assert_eq!(&*first, expected.as_slice());
        assert_eq!(first[1].info.org_id.as_deref(), Some("org_3"));
        assert_eq!(
            serde_json::from_str::<SubscriptionInfo>(&first[1].json).unwrap(),
            first[1].info
        );
        // The same catalogue again: the very answers built first.
        let again = batch.answers(&catalog).unwrap();
        assert!(matches!(again, Answers::Shared(_)));
        assert!(std::ptr::eq(again.as_ptr(), first.as_ptr()));
        // Another catalogue: answers of its own, judged by it.
        let other = Arc::new(Catalog::default());
        let own = batch.answers(&other).unwrap();
        assert!(matches!(own, Answers::Own(_)));
        assert_eq!(&*own, expected.as_slice());
        assert_eq!(batch.len(), 3);
    }
}
