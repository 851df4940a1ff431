//! A statement's arguments with their buffer sized before the values go in.
//!
//! sqlx encodes every value bound to a statement into one buffer that starts empty and
//! doubles as it fills. The batch statements bind whole columns as arrays (a batch's
//! payloads, answers or webhook bodies: a hundred KiB and more), so each of them copied
//! its values through a dozen growing buffers, each one's memory freshly faulted in:
//! encoding the arguments took 5.3 % of the server's samples under ingestion, and 2.4 %
//! with the buffer sized once (BENCHMARKS.md). [`presized`] starts the buffer at the size
//! the values take, which [`strings`], [`optional_strings`], [`text_array`] and [`fixed_array`] add up (an
//! estimate too small only means one more growth, as before).

use sqlx::postgres::PgArguments;
use sqlx::Arguments;

/// What an array takes besides its elements: the value's length, then the array header
/// (dimensions, flags, element type, the dimension's length and lower bound).
const ARRAY_HEADER: usize = 4 + 20;

/// Arguments for `values` values that take about `bytes` encoded, the buffer sized for
/// them; bind to them with `sqlx::query_with(sql, presized(…)).bind(…)`.
pub fn presized(values: usize, bytes: usize) -> PgArguments {
    let mut arguments = PgArguments::default();
    arguments.reserve(values, bytes);
    arguments
}

/// The bytes one `text` value takes: its length and its bytes.
pub fn text(value: &str) -> usize {
    4 + value.len()
}

/// The bytes a `text[]` (or `json[]`) of `values` takes encoded: each element its length
/// and its bytes (a NULL only its length).
pub fn text_array<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> usize {
    ARRAY_HEADER
        + values
            .into_iter()
            .map(|value| value.map_or(4, text))
            .sum::<usize>()
}

/// [`text_array`] of a column of strings none of which is NULL.
pub fn strings(column: &[String]) -> usize {
    text_array(column.iter().map(|value| Some(value.as_str())))
}

/// [`text_array`] of a column of strings that may be NULL.
pub fn optional_strings(column: &[Option<String>]) -> usize {
    text_array(column.iter().map(Option::as_deref))
}

/// The bytes an array of `count` fixed-width elements of `width` bytes each takes encoded
/// (`bool` 1, `int8` and `timestamptz` 8).
pub fn fixed_array(count: usize, width: usize) -> usize {
    ARRAY_HEADER + count * (4 + width)
}

#[cfg(test)]
mod tests {
    use sqlx::encode::IsNull;
    use sqlx::postgres::PgArgumentBuffer;
    use sqlx::{Encode, Postgres};

    use super::*;

    /// What `value` takes in a statement's arguments: the encoder's bytes and the
    /// length the arguments write before them.
    fn encoded<'q, T: Encode<'q, Postgres>>(value: T) -> usize {
        let mut buffer = PgArgumentBuffer::default();
        let written = value.encode_by_ref(&mut buffer).unwrap();
        assert!(matches!(written, IsNull::No));
        4 + buffer.len()
    }

    /// The sizes are the encoder's own, so a buffer sized by them does not grow.
    #[test]
    fn sizes_are_what_the_encoder_writes() {
        let texts = vec![
            Some("abc".to_owned()),
            None,
            Some(String::new()),
            Some("é".to_owned()),
        ];
        assert_eq!(encoded(&texts), optional_strings(&texts));
        let empty: Vec<String> = Vec::new();
        assert_eq!(encoded(&empty), strings(&empty));
        let present = vec!["a".to_owned(), "bcd".to_owned()];
        assert_eq!(encoded(&present), strings(&present));
        let longs: Vec<i64> = vec![1, 2, 3, 4];
        assert_eq!(encoded(&longs), fixed_array(longs.len(), 8));
        let flags = vec![true, false];
        assert_eq!(encoded(&flags), fixed_array(flags.len(), 1));
        assert_eq!(encoded("état"), text("état"));
        let times = vec![chrono::Utc::now()];
        assert_eq!(encoded(&times), fixed_array(times.len(), 8));
    }
}
