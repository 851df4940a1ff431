//! Integration tests: the real application over HTTP against real Postgres and Redis.

mod api;
mod cli;
mod events;
mod fake_stripe;
mod fixtures;
mod helpers;
mod lifecycle;
mod replay;
mod stripe_api;
mod stripe_sim;
mod webhook;
