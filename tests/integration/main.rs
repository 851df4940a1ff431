//! Integration tests: the real application over HTTP against real Postgres and Redis.

mod api;
mod events;
mod fixtures;
mod helpers;
mod replay;
mod webhook;
