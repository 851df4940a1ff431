//! The inbox: every Stripe event we acknowledge, stored durably (keyed by Stripe's event
//! id) before we answer, with its raw payload and what processing made of it. This module
//! owns table `inbox`: every statement on it is here.
//!
//! - [`store`]: recording events (`record`, `record_many`, the webhook's group commit
//!   [`InboxWriter`], which hands what it stored, parsed, to this process's workers
//!   through [`ParsedEvents`]). An event holding a value Postgres refuses for its content is
//!   [`Refused`] on its own (a 400); any other failure here is a 5xx so Stripe retries:
//!   nothing is answered before the insert that stored it commits.
//! - [`work`]: what the inbox workers do to rows: claim due rows of a partition, mark them
//!   done with their outcome, or failed (retried with backoff, dead-lettered after the
//!   configured attempts), or dead at once when they can never be processed.
//! - [`dead_letters`]: the dead-letter queue, listed and re-driven.
//! - [`read`]: what operators and health checks read (recent rows, a customer's rows, the
//!   state and outcome of a row, the depth of the queue).
//! - [`retention`]: a processed row's payload is dropped past the configured age; the row
//!   stays (and says when its payload went).
//!
//! A row's state and outcome are the enums below, stored as text. This module never judges
//! an event (the aggregate does) and never deletes a row: only processing decides an
//! outcome.

pub mod dead_letters;
pub mod read;
pub mod retention;
pub mod store;
pub mod work;

use serde::Serialize;

pub use dead_letters::{dead_letters, redrive, DeadLetter, Redrive};
pub use read::{
    depth, has_customer, hourly, of_customer, recent, settled_state_of, Depth, HourlyCount,
    InboxEntry,
};
pub use store::{
    check, record, record_many, InboxError, InboxWriter, NewEvent, ParsedEvents, Received, Recorded,
};
pub use work::{
    claim, mark_dead, mark_done, mark_failed, Claimed, ClaimedEvent, Failed, Partition, Processed,
};

/// Where a row is in its life: waiting to be processed (or retried), processed, or given
/// up on until an operator re-drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum InboxState {
    Pending,
    Done,
    Dead,
}

impl InboxState {
    pub const ALL: [Self; 3] = [Self::Pending, Self::Done, Self::Dead];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Done => "done",
            Self::Dead => "dead",
        }
    }
}

impl std::fmt::Display for InboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What processing made of an event (recorded on its row, counted by the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The fact changed the customer's state.
    Applied,
    /// The fact was already held.
    Duplicate,
    /// Older than what is held (or lost a same-second tie).
    Stale,
    /// A move the transition table refuses.
    Illegal,
    /// Nothing in it for the aggregate (an event type we do not handle, or no fact).
    Ignored,
    /// Processing failed (an error, not a judgement); retried, then dead-lettered.
    Failed,
}

impl Outcome {
    pub const ALL: [Self; 6] = [
        Self::Applied,
        Self::Duplicate,
        Self::Stale,
        Self::Illegal,
        Self::Ignored,
        Self::Failed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::Illegal => "illegal",
            Self::Ignored => "ignored",
            Self::Failed => "failed",
        }
    }
}

impl From<&aggregates::Outcome> for Outcome {
    /// How the aggregate's judgement is recorded.
    fn from(outcome: &aggregates::Outcome) -> Self {
        use aggregates::{Outcome as Judged, Rejection};
        match outcome {
            Judged::Applied => Self::Applied,
            Judged::Duplicate => Self::Duplicate,
            Judged::Rejected(Rejection::IllegalTransition { .. }) => Self::Illegal,
            Judged::Rejected(_) => Self::Stale,
            Judged::NothingToRecord(_) => Self::Ignored,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Webhook,
    Import,
    /// `POST /webhooks/eventbridge`: an Amazon EventBridge event destination.
    #[sqlx(rename = "eventbridge")]
    #[serde(rename = "eventbridge")]
    EventBridge,
    /// Read from Stripe's Events API by the missed-event recovery poller.
    Recovery,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::Import => "import",
            Source::EventBridge => "eventbridge",
            Source::Recovery => "recovery",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorded outcome is the aggregate's own label for its judgement (the names the
    /// docs, the metrics and the alert rules use).
    #[test]
    fn outcomes_are_the_aggregates_labels() {
        use aggregates::{Outcome as Judged, Rejection, SubscriptionStatus};
        let judged = [
            Judged::Applied,
            Judged::Duplicate,
            Judged::Rejected(Rejection::StaleInvoice {
                invoice_id: "in_1".to_owned(),
            }),
            Judged::Rejected(Rejection::IllegalTransition {
                subscription_id: "sub_1".to_owned(),
                from: Some(SubscriptionStatus::Canceled),
                to: SubscriptionStatus::Active,
            }),
            Judged::NothingToRecord("nothing".to_owned()),
        ];
        for outcome in &judged {
            assert_eq!(Outcome::from(outcome).as_str(), outcome.label());
        }
        assert_eq!(format!("{:<9}|", Outcome::Applied), "applied  |");
        assert_eq!(format!("{:<7}|", InboxState::Dead), "dead   |");
    }
}
