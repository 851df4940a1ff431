//! Delivers the outbox: each pending notification POSTed to its endpoint, signed per
//! Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature` =
//! `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, key = the base64 after
//! `whsec_`), with exponential backoff between attempts and a dead-letter state after
//! `SUBLEDGER_NOTIFY_MAX_ATTEMPTS`.
//!
//! At least once: a row is marked delivered only after a 2xx; it is claimed with a lease
//! (see [`Sender::deliver_once`]), so a crash (SIGKILL) at any point leaves it pending and
//! it is sent again when the lease ends. In order per owner and endpoint: only the oldest
//! pending row of each (endpoint, owner) is ever claimed.
//! This module must never run on a request or ingestion path: a slow or failing endpoint
//! only delays other notifications (each send is bounded by `SUBLEDGER_NOTIFY_TIMEOUT_MS`).

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox};
use sha2::Sha256;
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::error_chain::error_chain;

/// Rows claimed per round.
const CLAIM: i64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("a notification secret must start with `whsec_` followed by base64")]
    Format,
}

/// The signing key: the bytes of the base64 after `whsec_`.
pub struct SigningKey(SecretBox<Vec<u8>>);

impl SigningKey {
    pub fn parse(secret: &str) -> Result<Self, SecretError> {
        let encoded = secret.strip_prefix("whsec_").ok_or(SecretError::Format)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::Format)?;
        if bytes.is_empty() {
            return Err(SecretError::Format);
        }
        Ok(Self(SecretBox::new(Box::new(bytes))))
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose_secret())
            .expect("HMAC takes a key of any length");
        mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
        mac.update(body.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag)
        )
    }
}

/// The sender's settings.
pub struct Sender {
    pool: PgPool,
    key: SigningKey,
    client: reqwest::Client,
    backoff: Backoff,
    max_attempts: i32,
    timeout: Duration,
}

impl Sender {
    pub fn new(
        pool: PgPool,
        key: SigningKey,
        timeout: Duration,
        backoff: Backoff,
        max_attempts: i32,
    ) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a reqwest client with rustls builds");
        Self {
            pool,
            key,
            client,
            backoff,
            max_attempts,
            timeout,
        }
    }

    /// Claims the oldest pending notification of each (endpoint, owner) that is due, sends
    /// them together, and records each outcome. Returns how many were attempted.
    ///
    /// The claim is a lease, not a held transaction: it counts the attempt and moves the
    /// row's `next_attempt_at` past the send's timeout, in a short transaction. An open
    /// transaction would hold back the log's read horizon (`pg_snapshot_xmin`) and so
    /// stall every projection while an endpoint hangs. A claimed row stays `pending`, so
    /// it still holds back the owner's later notifications (order), another replica
    /// cannot claim it before the lease ends, and a crash mid-send leaves it to be sent
    /// again when the lease ends (at least once).
    pub async fn deliver_once(&self) -> Result<usize, sqlx::Error> {
        let lease = self.timeout + Duration::from_secs(1);
        let rows = sqlx::query(
            "UPDATE notifications SET attempts = attempts + 1, \
                 next_attempt_at = now() + make_interval(secs => $2) \
             WHERE id IN (SELECT id FROM notifications n \
                 WHERE state = 'pending' AND next_attempt_at <= now() \
                   AND NOT EXISTS (SELECT 1 FROM notifications e WHERE e.state = 'pending' \
                       AND e.endpoint = n.endpoint AND e.owner_kind = n.owner_kind \
                       AND e.owner_id = n.owner_id AND e.id < n.id) \
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, msg_id, endpoint, body, attempts",
        )
        .bind(CLAIM)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        let mut sends = tokio::task::JoinSet::new();
        for row in &rows {
            let id: i64 = row.get("id");
            let tried: i32 = row.get("attempts");
            let msg_id: String = row.get("msg_id");
            let endpoint: String = row.get("endpoint");
            let body: String = row.get("body");
            let timestamp = chrono::Utc::now().timestamp();
            let signature = self.key.sign(&msg_id, timestamp, &body);
            let request = self
                .client
                .post(&endpoint)
                .header("content-type", "application/json")
                .header("webhook-id", &msg_id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(body);
            sends.spawn(async move {
                let outcome = match request.send().await {
                    Ok(response) if response.status().is_success() => Ok(()),
                    Ok(response) => Err(format!("endpoint answered {}", response.status())),
                    Err(error) => Err(error_chain(&error)),
                };
                (id, tried, outcome)
            });
        }
        let count = rows.len();
        while let Some(joined) = sends.join_next().await {
            let Ok((id, tried, outcome)) = joined else {
                continue;
            };
            match outcome {
                Ok(()) => {
                    sqlx::query(
                        "UPDATE notifications SET state = 'delivered', delivered_at = now(), \
                         last_error = NULL WHERE id = $1",
                    )
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                }
                Err(error) => {
                    let dead = tried >= self.max_attempts;
                    let delay = self.backoff.delay((tried - 1).max(0) as u32);
                    tracing::warn!(id, tried, dead, error = %error, "notification not delivered");
                    sqlx::query(
                        "UPDATE notifications SET last_error = $2, \
                         state = CASE WHEN $3 THEN 'dead' ELSE 'pending' END, \
                         next_attempt_at = now() + make_interval(secs => $4) WHERE id = $1",
                    )
                    .bind(id)
                    .bind(error)
                    .bind(dead)
                    .bind(delay.as_secs_f64())
                    .execute(&self.pool)
                    .await?;
                }
            }
        }
        Ok(count)
    }
}

/// Runs the notifier and the sender until `stop`: a pass whenever the projections moved
/// (or `every` passed, for the time-based ends, other replicas' writes and retries that
/// came due), then sends until nothing is due.
pub async fn run(
    notifier: super::Notifier,
    sender: Sender,
    mut applied: watch::Receiver<Vec<projections::Position>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        if let Err(error) = notifier.pass(chrono::Utc::now()).await {
            tracing::warn!(error = %error_chain(&error), "notifier pass failed; will retry");
        }
        loop {
            match sender.deliver_once().await {
                Ok(0) => break,
                Ok(_) => {
                    if *stop.borrow() {
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "notification delivery failed; will retry");
                    break;
                }
            }
        }
        tokio::select! {
            changed = applied.changed() => {
                if changed.is_err() {
                    // The runner is gone (shutting down): fall back to the interval.
                    tokio::time::sleep(every).await;
                }
            }
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_standard_webhooks_reference_does() {
        // The test vector published with the Standard Webhooks specification (Svix's
        // example secret, id and timestamp), which its implementations test against.
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_must_be_whsec_base64() {
        assert!(SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(SigningKey::parse("whsec_not base64!").is_err());
        assert!(SigningKey::parse("whsec_").is_err());
    }
}
