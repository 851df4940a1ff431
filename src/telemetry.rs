//! Logging setup: human-readable by default, JSON lines with `LOG_FORMAT=json`, filtered by
//! `RUST_LOG` (default `info`); and how a value from a payload may appear in a log line.
//!
//! **No personal data at info level.** Stripe's payloads carry customers' emails, names,
//! addresses and phone numbers. A log line at info or above may carry only identifiers
//! that look like ids ([`loggable_id`]), words that look like Stripe's own vocabulary
//! (event types, statuses: [`loggable_word`]), outcomes, counts and texts of our own;
//! reasons and details composed from payload values go to debug, which may carry personal
//! data (docs/operations.md says so). Error chains never quote a refused value
//! (`error_chain`). This module must never log anything itself.

use std::borrow::Cow;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

/// An id from a payload as a log line at info may carry it: as it is when it is shaped
/// like a Stripe id (letters, digits, `_` and `-`, at most 255: `evt_…`, `cus_…`), else
/// only its length. An email, a name with a space, or text with control characters is
/// never an id.
pub fn loggable_id(text: &str) -> Cow<'_, str> {
    if is_id_like(text) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(format!("<not an id: {} bytes>", text.len()))
    }
}

/// A word from a payload (an event type, a status) as a log line at info may carry it: as
/// it is when it is shaped like Stripe's vocabulary (lower-case letters, digits, `_` and
/// `.`, at most 100), else only its length.
pub fn loggable_word(text: &str) -> Cow<'_, str> {
    if is_word_like(text) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(format!("<not a word: {} bytes>", text.len()))
    }
}

/// Shaped like a Stripe id: letters, digits, `_` and `-`, 1 to 255 bytes.
pub fn is_id_like(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 255
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Shaped like Stripe's vocabulary: lower-case letters, digits, `_` and `.`, 1 to 100
/// bytes.
pub fn is_word_like(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 100
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_words_pass_and_personal_data_does_not() {
        for id in ["evt_1NkRz2Abc", "cus_J7Mkgr8mvbl1eK", "sub_0-x"] {
            assert_eq!(loggable_id(id), id);
        }
        for word in ["customer.subscription.updated", "past_due", "invoice.paid"] {
            assert_eq!(loggable_word(word), word);
        }
        for personal in [
            "jenny.rosen@example.com",
            "Jenny Rosen",
            "510 Townsend St",
            "+1 555 0100",
            "",
            "evt\u{0}1",
        ] {
            assert!(
                loggable_id(personal).starts_with("<not an id"),
                "{personal}"
            );
            assert!(
                loggable_word(personal).starts_with("<not a word"),
                "{personal}"
            );
        }
        assert_eq!(loggable_id(&"x".repeat(256)), "<not an id: 256 bytes>");
    }
}
