//! Postgres: connecting (creating the database when it is missing), migrating, and
//! checking that it answers.
//!
//! All schema lives in `migrations/`, the event store's tables included; an applied
//! migration is never edited.

use std::str::FromStr;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
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

/// The connect options `url` names. On a loopback host, a URL that names no `sslmode`
/// (neither in its query nor in `PGSSLMODE`) connects without TLS: the bytes never leave
/// the machine's kernel, so TLS there protects nothing from the network and costs both
/// ends CPU on every statement (sqlx's default, `prefer`, uses TLS whenever the server
/// offers it, and a Postgres with `ssl = on` does). Every other host keeps sqlx's default,
/// and an `sslmode` that is named is always honoured (a loopback server that only takes
/// TLS, `hostssl` in `pg_hba.conf`, needs `?sslmode=prefer` or stricter).
pub fn connect_options(url: &str) -> Result<PgConnectOptions, DbError> {
    let options = PgConnectOptions::from_str(url).map_err(DbError::Url)?;
    if names_ssl_mode(url) || std::env::var_os("PGSSLMODE").is_some() {
        return Ok(options);
    }
    if is_loopback(options.get_host()) {
        return Ok(options.ssl_mode(PgSslMode::Disable));
    }
    Ok(options)
}

/// Whether the URL's query names an SSL mode (`sslmode`, or sqlx's `ssl-mode`).
fn names_ssl_mode(url: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .filter_map(|pair| pair.split('=').next())
            .any(|key| key.eq_ignore_ascii_case("sslmode") || key.eq_ignore_ascii_case("ssl-mode"))
    })
}

/// Whether `host` is this machine over loopback: `localhost`, or a loopback address.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Creates the database named in `url` if the server does not have it yet.
pub async fn create_database_if_missing(url: &str) -> Result<(), DbError> {
    let options = connect_options(url)?;
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
    let options = connect_options(url)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_without_a_named_ssl_mode_connects_without_tls() {
        // PGSSLMODE, when set, is what the operator chose: these cases need it unset.
        if std::env::var_os("PGSSLMODE").is_some() {
            return;
        }
        let mode = |url: &str| connect_options(url).unwrap().get_ssl_mode();
        for url in [
            "postgres://postgres@127.0.0.1:5432/subledger",
            "postgres://postgres@localhost/subledger",
            "postgres://postgres@[::1]:5432/subledger",
            "postgres://postgres@127.0.0.2/subledger?application_name=x",
        ] {
            assert!(matches!(mode(url), PgSslMode::Disable), "{url}");
        }
        for url in [
            "postgres://postgres@db.internal:5432/subledger",
            "postgres://postgres@10.0.0.5/subledger",
        ] {
            assert!(matches!(mode(url), PgSslMode::Prefer), "{url}");
        }
        for (url, expected) in [
            (
                "postgres://postgres@127.0.0.1/subledger?sslmode=require",
                PgSslMode::Require,
            ),
            (
                "postgres://postgres@localhost/subledger?sslmode=prefer",
                PgSslMode::Prefer,
            ),
            (
                "postgres://postgres@db.internal/subledger?sslmode=verify-full",
                PgSslMode::VerifyFull,
            ),
        ] {
            assert_eq!(
                std::mem::discriminant(&mode(url)),
                std::mem::discriminant(&expected),
                "{url}"
            );
        }
    }
}
