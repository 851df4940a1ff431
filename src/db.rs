//! Postgres: connecting (creating the database when it is missing), migrating, and
//! checking that it answers.
//!
//! All schema lives in `migrations/`, the event store's tables included; an applied
//! migration is never edited.

use std::str::FromStr;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::Settings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid Postgres URL")]
    Url(#[source] sqlx::Error),
    #[error("cannot create database {0}")]
    Create(String, #[source] sqlx::Error),
    #[error("cannot connect to Postgres")]
    Connect(#[source] sqlx::Error),
    #[error("cannot apply migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Creates the database named in `url` if the server does not have it yet.
pub async fn create_database_if_missing(url: &str) -> Result<(), DbError> {
    let options = PgConnectOptions::from_str(url).map_err(DbError::Url)?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(DbError::Connect)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .map_err(DbError::Connect)?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        if let Err(error) = sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut admin)
            .await
        {
            // Another process may have created it between our check and our create.
            let raced = error
                .as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|c| c == "42P04");
            if !raced {
                return Err(DbError::Create(name, error));
            }
        }
    }
    admin.close().await.ok();
    Ok(())
}

/// A pool to the configured database, created if missing. Connections are made lazily,
/// so the service starts (and answers 503) while Postgres is down.
pub async fn connect(settings: &Settings) -> Result<PgPool, DbError> {
    let url = settings.database_url.expose_secret();
    create_database_if_missing(url).await?;
    let options = PgConnectOptions::from_str(url).map_err(DbError::Url)?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.db_pool_size)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy_with(options))
}

pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Whether Postgres answers: one round trip, no table read (what `/readyz` checks).
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(drop)
}
