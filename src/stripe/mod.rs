//! Everything that knows Stripe's wire formats: webhook signatures, the lenient event
//! parser that turns a payload of any API version into a domain command, the lenient
//! reading of API answers (`objects`), and the API client (`client`, the only part that
//! does network IO).
//!
//! This module must never touch the database or the cache: it reads bytes (or calls
//! Stripe) and returns values, so it can be fuzzed and tested against real fixtures.

pub mod client;
pub mod endpoints;
pub mod event;
pub mod objects;
pub mod signature;
pub mod transport;

pub use event::{parse_event, parse_eventbridge, route, ParseError, Route, StripeEvent};
pub use signature::{verify_signature, SignatureError};
