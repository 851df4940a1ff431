//! What a database error means for whoever caused it: Postgres refused a value for its
//! content (permanent: the sender's problem, answered 4xx or dead-lettered at once, never
//! retried), or the database could not do the work right now (transient: answered 503 or
//! retried with backoff).
//!
//! Classified by SQLSTATE (<https://www.postgresql.org/docs/current/errcodes-appendix.html>):
//! - **Refused** (permanent): class 22, data exception (`22021` a NUL or an invalid byte in
//!   text, `22P05` `\u0000` in `jsonb`, `22003` a number out of range, `22007`/`22008` a
//!   date or time out of range, and the rest of the class); class 23, integrity constraint
//!   violation; class 54, program limit exceeded (`54000`: an index row too large, as a
//!   huge id makes); and a value sqlx cannot encode at all.
//! - **Transient**: everything else. Connection and IO errors, pool timeouts, class 08
//!   (connection exception), `57P01`/`57P02`/`57P03` (the server shutting down or starting),
//!   `57014` (a statement cancelled by a timeout), `25006` (a read-only server: a replica,
//!   or a failover in progress), class 53 (insufficient resources: disk full, out of
//!   memory, too many connections), `40001`/`40P01` (serialization failure, deadlock),
//!   class 58 and `XX000` (the server's own failures). An error we do not recognise is
//!   transient too: retrying it is always safe, and a bug still ends in the dead-letter
//!   queue after `SUBLEDGER_MAX_ATTEMPTS`.
//!
//! A leaf: it imports nothing of this crate, so every module may use it. It must never
//! log, retry or answer anything itself: it only says what an error is.

use sqlx::error::DatabaseError;

/// What a database error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Postgres refused a value for its content: sending it again can never succeed.
    Refused(Refusal),
    /// The database could not do it now; the same request may succeed later.
    Transient,
}

/// Why Postgres refused a value (the label of `subledger_webhooks_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Text Postgres cannot hold: a NUL character, or bytes that are not UTF-8.
    InvalidText,
    /// A number outside its column's range.
    OutOfRange,
    /// A date or time outside what Postgres holds (before 4713 BC, after 294276 AD).
    InvalidDatetime,
    /// Any other value Postgres refuses for its content.
    InvalidValue,
    /// A constraint refused the row (not null, check, foreign key, a unique key other
    /// than the ones the code expects and handles).
    Integrity,
    /// A value too large for Postgres's limits (an index row, as a huge id makes).
    TooLarge,
}

impl Refusal {
    pub const ALL: [Self; 6] = [
        Self::InvalidText,
        Self::OutOfRange,
        Self::InvalidDatetime,
        Self::InvalidValue,
        Self::Integrity,
        Self::TooLarge,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidText => "invalid_text",
            Self::OutOfRange => "out_of_range",
            Self::InvalidDatetime => "invalid_datetime",
            Self::InvalidValue => "invalid_value",
            Self::Integrity => "integrity",
            Self::TooLarge => "too_large",
        }
    }

    /// What was wrong, for an answer's message or a dead letter's reason.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::InvalidText => "text Postgres cannot hold (a NUL character or invalid bytes)",
            Self::OutOfRange => "a number out of range",
            Self::InvalidDatetime => "a date or time out of range",
            Self::InvalidValue => "a value Postgres refuses",
            Self::Integrity => "a value a constraint refuses",
            Self::TooLarge => "a value too large for Postgres (an index row over its limit)",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A value Postgres refuses (or would refuse) for its content, and where it was: what a
/// 400 or a dead letter says. The detail names the place and the reason, never the value
/// (which can be personal data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Refused {
    pub refusal: Refusal,
    pub detail: String,
}

impl Refused {
    pub fn new(refusal: Refusal, detail: impl Into<String>) -> Self {
        Self {
            refusal,
            detail: detail.into(),
        }
    }

    /// Postgres itself refused a statement: named by its SQLSTATE, not by its message,
    /// which can quote the value.
    pub fn by_postgres(refusal: Refusal, error: &sqlx::Error) -> Self {
        let sqlstate = sqlstate(error).unwrap_or_else(|| "none".to_owned());
        Self::new(
            refusal,
            format!(
                "Postgres refused a value in it: {} (SQLSTATE {sqlstate})",
                refusal.describe()
            ),
        )
    }
}

/// `text` with every NUL character written as `\0`: for text we compose ourselves
/// (details, error chains) that may carry a value from a payload into a text column.
pub fn storable_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\\0"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// What `error` is: refused for a value's content, or transient.
pub fn classify(error: &sqlx::Error) -> Failure {
    match error {
        sqlx::Error::Database(database) => match database.code() {
            Some(code) => by_sqlstate(&code),
            None => Failure::Transient,
        },
        // A value sqlx could not even encode for the wire: sending it again cannot help.
        sqlx::Error::Encode(_) => Failure::Refused(Refusal::InvalidValue),
        _ => Failure::Transient,
    }
}

/// The refusal `error` is, if Postgres refused a value for its content.
pub fn refusal(error: &sqlx::Error) -> Option<Refusal> {
    match classify(error) {
        Failure::Refused(refusal) => Some(refusal),
        Failure::Transient => None,
    }
}

/// The error's SQLSTATE, when Postgres gave one: what logs carry instead of the message,
/// which can quote the refused value.
pub fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(DatabaseError::code)
        .map(|code| code.into_owned())
}

/// Whether `error` is a serialization failure or a deadlock: a statement that lost a race
/// and may be run again at once.
pub fn lost_a_race(error: &sqlx::Error) -> bool {
    matches!(sqlstate(error).as_deref(), Some("40001" | "40P01"))
}

fn by_sqlstate(code: &str) -> Failure {
    let refused = match code {
        "22021" | "22P05" => Refusal::InvalidText,
        "22003" => Refusal::OutOfRange,
        "22007" | "22008" => Refusal::InvalidDatetime,
        _ if code.starts_with("22") => Refusal::InvalidValue,
        _ if code.starts_with("23") => Refusal::Integrity,
        _ if code.starts_with("54") => Refusal::TooLarge,
        _ => return Failure::Transient,
    };
    Failure::Refused(refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified_by_who_can_fix_them() {
        for (code, expected) in [
            ("22021", Some(Refusal::InvalidText)),
            ("22P05", Some(Refusal::InvalidText)),
            ("22003", Some(Refusal::OutOfRange)),
            ("22007", Some(Refusal::InvalidDatetime)),
            ("22008", Some(Refusal::InvalidDatetime)),
            ("22P02", Some(Refusal::InvalidValue)),
            ("23502", Some(Refusal::Integrity)),
            ("23514", Some(Refusal::Integrity)),
            ("54000", Some(Refusal::TooLarge)),
            ("08006", None),
            ("57P01", None),
            ("57P02", None),
            ("57P03", None),
            ("57014", None),
            ("25006", None),
            ("53100", None),
            ("53300", None),
            ("40001", None),
            ("40P01", None),
            ("58030", None),
            ("XX000", None),
            ("P0001", None),
            ("42P01", None),
        ] {
            let got = match by_sqlstate(code) {
                Failure::Refused(refusal) => Some(refusal),
                Failure::Transient => None,
            };
            assert_eq!(got, expected, "{code}");
        }
    }

    #[test]
    fn errors_without_a_sqlstate_are_transient() {
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), Failure::Transient);
        assert_eq!(classify(&sqlx::Error::PoolClosed), Failure::Transient);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(classify(&sqlx::Error::Io(io)), Failure::Transient);
        assert_eq!(
            classify(&sqlx::Error::Encode("no".into())),
            Failure::Refused(Refusal::InvalidValue)
        );
    }

    #[test]
    fn composed_text_is_made_storable() {
        assert_eq!(storable_text("a\0b"), "a\\0b");
        assert!(matches!(
            storable_text("ab"),
            std::borrow::Cow::Borrowed("ab")
        ));
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> =
            Refusal::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
    }
}
