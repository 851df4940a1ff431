//! Everything that knows Stripe's wire formats: webhook signatures and the lenient event
//! parser that turns a payload of any API version into a domain command.
//!
//! This module must never touch the database or the cache: it only reads bytes and
//! returns values, so it can be fuzzed and tested against real fixtures.

pub mod event;
pub mod signature;

pub use event::{parse_event, route, ParseError, Route, StripeEvent};
pub use signature::{verify_signature, SignatureError};
