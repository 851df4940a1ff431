//! `subledger import FILE`: Stripe events from a file (JSON lines, a JSON array, or the
//! `{"object": "list", "data": [...]}` page that `stripe events list` prints) fed through
//! the same inbox as webhooks, without signatures.
//!
//! The whole file is checked before anything is stored: one bad event refuses the import
//! and changes nothing.

use serde::Serialize;
use serde_json::Value;

use crate::inbox::{self, Received, Source};
use crate::stripe::event::event_from_value;
use crate::stripe::StripeEvent;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the file is not JSON lines, a JSON array or a Stripe list: {0}")]
    Format(#[source] serde_json::Error),
    #[error("{} event(s) are not valid Stripe events; nothing was imported:\n{}", .0.len(), .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("cannot store events")]
    Storage(#[from] sqlx::Error),
    /// Postgres refused a value that `inbox::check` let through (the events before it
    /// were stored).
    #[error(transparent)]
    Refused(#[from] crate::db_error::Refused),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub stored: u64,
    pub ignored: u64,
    pub duplicates: u64,
}

/// The events in `text`, each with its raw bytes; every invalid one is reported.
pub fn parse_file(text: &str) -> Result<Vec<(StripeEvent, Vec<u8>)>, ImportError> {
    let trimmed = text.trim_start();
    let values: Vec<(String, Value)> =
        if trimmed.starts_with('[') || trimmed.starts_with('{') && !looks_like_lines(text) {
            let value: Value = serde_json::from_str(text).map_err(ImportError::Format)?;
            let list = match value {
                Value::Array(items) => items,
                Value::Object(mut object)
                    if object.get("object").and_then(Value::as_str) == Some("list") =>
                {
                    match object.remove("data") {
                        Some(Value::Array(items)) => items,
                        _ => vec![],
                    }
                }
                single => vec![single],
            };
            list.into_iter()
                .enumerate()
                .map(|(i, v)| (format!("item {}", i + 1), v))
                .collect()
        } else {
            let mut values = Vec::new();
            let mut invalid = Vec::new();
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                match serde_json::from_str(line) {
                    Ok(value) => values.push((format!("line {}", i + 1), value)),
                    Err(error) => invalid.push(format!("line {}: {error}", i + 1)),
                }
            }
            if !invalid.is_empty() {
                return Err(ImportError::Invalid(invalid));
            }
            values
        };
    let mut events = Vec::new();
    let mut invalid = Vec::new();
    for (place, value) in values {
        let raw = serde_json::to_vec(&value).expect("a Value always serializes");
        match event_from_value(value) {
            // What the inbox would refuse to store refuses the file like any bad event.
            Ok(event) => match inbox::check(&event, &raw) {
                Ok(()) => events.push((event, raw)),
                Err(refused) => invalid.push(format!("{place}: {refused}")),
            },
            Err(error) => invalid.push(format!("{place}: {error}")),
        }
    }
    if invalid.is_empty() {
        Ok(events)
    } else {
        Err(ImportError::Invalid(invalid))
    }
}

/// More than one non-empty line, each a whole JSON value.
fn looks_like_lines(text: &str) -> bool {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next();
    let second = lines.next();
    second.is_some() && first.is_some_and(|l| serde_json::from_str::<Value>(l).is_ok())
}

/// Stores every event of the file in the inbox (idempotent on event ids). `progress` is
/// told the file's event count once it is read, then the report after each event.
pub async fn import(
    pool: &sqlx::PgPool,
    text: &str,
    mut progress: impl FnMut(u64, &ImportReport),
) -> Result<ImportReport, ImportError> {
    let events = parse_file(text)?;
    let total = events.len() as u64;
    let mut report = ImportReport::default();
    progress(total, &report);
    for (event, raw) in events {
        match inbox::record(pool, &event, &raw, Source::Import).await?? {
            Received::Stored => report.stored += 1,
            Received::Ignored => report.ignored += 1,
            Received::Duplicate => report.duplicates += 1,
        }
        progress(total, &report);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"id":"evt_1","object":"event","type":"customer.updated","created":1,"data":{"object":{"id":"cus_1"}}}"#;

    #[test]
    fn reads_lines_arrays_and_lists() {
        let lines = format!("{EVENT}\n\n{}\n", EVENT.replace("evt_1", "evt_2"));
        assert_eq!(parse_file(&lines).unwrap().len(), 2);
        assert_eq!(parse_file(&format!("[{EVENT}, {EVENT}]")).unwrap().len(), 2);
        assert_eq!(
            parse_file(&format!(
                r#"{{"object":"list","data":[{EVENT}],"has_more":false}}"#
            ))
            .unwrap()
            .len(),
            1
        );
        assert_eq!(parse_file(&format!("{EVENT}\n")).unwrap().len(), 1);
    }

    #[test]
    fn an_event_the_inbox_cannot_store_refuses_the_file() {
        let nul = EVENT.replace("customer.updated", "customer.up\\u0000dated");
        let Err(ImportError::Invalid(errors)) = parse_file(&format!("{EVENT}\n{nul}\n")) else {
            panic!()
        };
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("line 2") && errors[0].contains("NUL"),
            "{errors:?}"
        );
    }

    #[test]
    fn one_bad_event_refuses_the_file() {
        let text = format!("{EVENT}\n{{\"id\":\"evt_2\"}}\nnot json\n");
        let Err(ImportError::Invalid(errors)) = parse_file(&text) else {
            panic!()
        };
        assert_eq!(errors.len(), 1, "{errors:?}");
        let Err(ImportError::Invalid(errors)) =
            parse_file(&format!("{EVENT}\n{{\"id\":\"evt_2\"}}\n"))
        else {
            panic!()
        };
        assert!(errors[0].starts_with("line 2"), "{errors:?}");
    }
}
