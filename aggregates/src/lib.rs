//! subledger's domain: the per-customer `Subscription` aggregate and the transition table
//! over Stripe's subscription statuses.
//!
//! This crate is pure. It must never depend on an IO crate (sqlx, redis, axum, hyper,
//! reqwest) nor read a clock: everything it judges arrives in the command, so replaying the
//! same events always rebuilds the same state. `cargo tree -p aggregates -e normal` shows it.

pub mod facts;
pub mod status;
pub mod subscription;
pub mod time;

pub use facts::{
    ApiSnapshot, Fact, FactSource, InvoiceFacts, ItemFacts, OwnerFacts, PaymentFacts,
    PaymentMethodFacts, SubscriptionFacts, UsageType,
};
pub use status::{transition, Move, SubscriptionStatus, TRANSITIONS};
pub use subscription::{
    decide, CustomerView, Decision, Observed, Outcome, Rejection, StripeFacts, Subscription,
    SubscriptionCommand, SubscriptionError, SubscriptionEvent, SubscriptionRecord,
    SubscriptionView,
};

#[cfg(test)]
mod tests;
