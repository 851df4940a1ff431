//! One line for an error and every cause behind it, for logs and stored failure details.
//!
//! A value an error quotes never reaches the line: a JSON value that does not fit its type
//! (serde_json's "invalid type: string \"…\"") and a value Postgres refused for its content
//! (class 22, "invalid input syntax for type …: \"…\"") are spelled by where and what, not
//! by the value, which can be a customer's personal data (issue 15).
//!
//! A leaf: it imports nothing of this crate, so every module may use it. It must never
//! decide anything from an error (which status to answer, whether to retry): it only
//! spells one out.

/// An error and its causes, one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = spelled(error);
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&spelled(cause));
        source = cause.source();
    }
    text
}

/// One error of a chain, without any value it quotes.
fn spelled(error: &(dyn std::error::Error + 'static)) -> String {
    if let Some(json) = error.downcast_ref::<serde_json::Error>() {
        if json.classify() == serde_json::error::Category::Data {
            return format!(
                "a JSON value does not fit its type (line {}, column {}; the value is not shown)",
                json.line(),
                json.column()
            );
        }
    }
    if let Some(sqlx::Error::Database(database)) = error.downcast_ref::<sqlx::Error>() {
        if let Some(code) = database.code().filter(|code| code.starts_with("22")) {
            return format!("Postgres refused a value (SQLSTATE {code}; the value is not shown)");
        }
    }
    error.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the cache")]
    struct Outer(#[source] serde_json::Error);

    #[test]
    fn a_json_value_that_does_not_fit_is_not_quoted() {
        let json = serde_json::from_str::<u64>(r#""jenny.rosen@example.com""#).unwrap_err();
        assert!(
            json.to_string().contains("jenny.rosen"),
            "serde_json quotes it"
        );
        let line = error_chain(&Outer(json));
        assert!(
            line.starts_with("cannot read the cache: a JSON value does not fit"),
            "{line}"
        );
        assert!(!line.contains("jenny"), "{line}");
        // Syntax errors quote nothing, and are kept as they are.
        let syntax = serde_json::from_str::<u64>("x").unwrap_err();
        assert_eq!(error_chain(&syntax), syntax.to_string());
    }
}
