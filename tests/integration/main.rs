//! Integration tests: the real application over HTTP against real Postgres and Redis.

mod admin_browser;
mod api;
mod batches;
mod cli;
mod dead_letters;
mod events;
mod fixtures;
mod freshness;
mod lifecycle;
mod mutants;
mod notifications;
mod openapi;
mod ops;
mod outages;
mod personal_data;
mod processes;
mod refusals;
mod replay;
mod retention;
mod runner;
mod security;
mod shapes;
mod slow_clients;
mod stripe_api;
mod support;
mod webhook;
