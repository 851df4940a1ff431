//! One line for an error and every cause behind it, for logs and stored failure details.
//!
//! A leaf: it imports nothing of this crate, so every module may use it. It must never
//! decide anything from an error (which status to answer, whether to retry): it only
//! spells one out.

/// An error and its causes, one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
