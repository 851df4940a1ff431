//! Integration tests: the real application over HTTP against real Postgres and Redis.

mod admin_browser;
mod api;
mod batches;
mod cli;
mod dead_letters;
mod events;
mod fake_stripe;
mod fixtures;
mod helpers;
mod lifecycle;
mod ops;
mod outages;
mod processes;
mod procs;
mod replay;
mod runner;
mod security;
mod stripe_api;
mod stripe_sim;
mod webhook;
