//! subledger: Stripe webhooks in, one trusted answer out.
//!
//! This crate is the only place that knows HTTP, Stripe's JSON, configuration, Postgres
//! and Redis wiring. The domain lives in the `aggregates` crate and the read models in
//! `projections`; see ARCHITECTURE.md for the map.

pub mod backoff;
pub mod billing;
pub mod config;
pub mod db;
pub mod db_error;
pub mod error_chain;
pub mod http;
pub mod import;
pub mod inbox;
pub mod inspect;
pub mod ledger;
pub mod metrics;
pub mod notify;
pub mod progress;
pub mod reads;
pub mod recovery;
pub mod setup;
pub mod startup;
pub mod stripe;
pub mod sync;
pub mod sync_log;
pub mod telemetry;
pub mod transitions;
pub mod worker;

pub use config::Settings;
pub use startup::{Application, Services};
