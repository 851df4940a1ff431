//! Serde for `DateTime<Utc>`: exactly the RFC 3339 text chrono's own serde writes and
//! reads, with the common shape written and read directly rather than through chrono's
//! general formatter and parser.
//!
//! Every timestamp of this crate's and `projections`' types goes through here (the log's
//! events, the read models and the answers built from them; fields say `#[serde(with =
//! "aggregates::time::utc")]`, or `utc_option` with `default` for an `Option`). Written: what chrono writes (`SecondsFormat::AutoSi` with `Z`: no fraction,
//! or 3, 6 or 9 digits), byte for byte; a year outside 0..=9999 is left to chrono. Read:
//! `YYYY-MM-DDTHH:MM:SS[.1 to 9 digits]Z` directly; anything else (an offset, a leap
//! second, a lower-case `t`, …) goes to chrono's parser, as before, with its errors. A
//! replay decodes and writes several timestamps per event: through chrono's formatter
//! (`collect_str`, one escaped `write_char` at a time) and its general parser they were
//! about a quarter of the replay's own CPU (BENCHMARKS.md). The tests compare both ways
//! with chrono on every shape.

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveTime, Timelike, Utc};
use serde::de::{self, Deserializer, Visitor};
use serde::ser::{Serialize, Serializer};

/// The longest text written: `9999-12-31T23:59:60.123456789Z`.
const LONGEST: usize = 30;

/// A timestamp's text, on the stack.
struct Text {
    bytes: [u8; LONGEST],
    len: usize,
}

impl Text {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("only ASCII is written")
    }
}

/// Writes `n` as decimal digits filling `out` (zero-padded; `n` fits).
fn digits(out: &mut [u8], mut n: u32) {
    for byte in out.iter_mut().rev() {
        *byte = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// What chrono writes for `at`, or `None` for a year it writes with a sign.
fn format(at: &DateTime<Utc>) -> Option<Text> {
    let naive = at.naive_utc();
    let year = naive.year();
    if !(0..=9999).contains(&year) {
        return None;
    }
    // A leap second is held as second 59 with a fraction of a second or more.
    let (mut second, mut nano) = (naive.second(), naive.nanosecond());
    if nano >= 1_000_000_000 {
        second += 1;
        nano -= 1_000_000_000;
    }
    let mut bytes = [0u8; LONGEST];
    digits(&mut bytes[0..4], year as u32);
    bytes[4] = b'-';
    digits(&mut bytes[5..7], naive.month());
    bytes[7] = b'-';
    digits(&mut bytes[8..10], naive.day());
    bytes[10] = b'T';
    digits(&mut bytes[11..13], naive.hour());
    bytes[13] = b':';
    digits(&mut bytes[14..16], naive.minute());
    bytes[16] = b':';
    digits(&mut bytes[17..19], second);
    let mut len = 19;
    let (fraction, width) = if nano == 0 {
        (0, 0)
    } else if nano % 1_000_000 == 0 {
        (nano / 1_000_000, 3)
    } else if nano % 1_000 == 0 {
        (nano / 1_000, 6)
    } else {
        (nano, 9)
    };
    if width > 0 {
        bytes[len] = b'.';
        digits(&mut bytes[len + 1..len + 1 + width], fraction);
        len += 1 + width;
    }
    bytes[len] = b'Z';
    Some(Text {
        bytes,
        len: len + 1,
    })
}

/// The common shape read directly; `None` for anything else (left to chrono).
fn parse(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    if b.len() < 20 || b[b.len() - 1] != b'Z' {
        return None;
    }
    let number = |digits: &[u8]| -> Option<u32> {
        digits.iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    for (at, separator) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')] {
        if b[at] != separator {
            return None;
        }
    }
    let nano = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            number(fraction)? * 10u32.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    let date = NaiveDate::from_ymd_opt(
        number(&b[0..4])? as i32,
        number(&b[5..7])?,
        number(&b[8..10])?,
    )?;
    let time = NaiveTime::from_hms_nano_opt(
        number(&b[11..13])?,
        number(&b[14..16])?,
        // Below 60: a leap second is chrono's to read.
        number(&b[17..19])?,
        nano,
    )?;
    Some(date.and_time(time).and_utc())
}

struct TimeVisitor;

impl Visitor<'_> for TimeVisitor {
    type Value = DateTime<Utc>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("an RFC 3339 formatted date and time string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        match parse(text) {
            Some(at) => Ok(at),
            // What chrono's `Deserialize for DateTime<Utc>` does.
            None => text
                .parse::<DateTime<FixedOffset>>()
                .map(|at| at.with_timezone(&Utc))
                .map_err(E::custom),
        }
    }
}

/// `#[serde(with = "aggregates::time::utc")]` for a `DateTime<Utc>`.
pub mod utc {
    use super::*;

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        match format(at) {
            Some(text) => serializer.serialize_str(text.as_str()),
            None => at.serialize(serializer),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        deserializer.deserialize_str(TimeVisitor)
    }
}

/// `#[serde(default, with = "aggregates::time::utc_option")]` for an `Option<DateTime<Utc>>`
/// (`default`: a missing field is `None`, as it is without `with`).
pub mod utc_option {
    use super::*;

    /// A present timestamp, through [`utc`].
    struct Present<'a>(&'a DateTime<Utc>);

    impl Serialize for Present<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            utc::serialize(self.0, serializer)
        }
    }

    pub fn serialize<S: Serializer>(
        at: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => serializer.serialize_some(&Present(at)),
            None => serializer.serialize_none(),
        }
    }

    struct OptionVisitor;

    impl<'de> Visitor<'de> for OptionVisitor {
        type Value = Option<DateTime<Utc>>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("an RFC 3339 formatted date and time string, or null")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            utc::deserialize(deserializer).map(Some)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        deserializer.deserialize_option(OptionVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::SecondsFormat;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ours {
        #[serde(with = "utc")]
        at: DateTime<Utc>,
        #[serde(default, with = "utc_option")]
        maybe: Option<DateTime<Utc>>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Chrono {
        at: DateTime<Utc>,
        maybe: Option<DateTime<Utc>>,
    }

    /// Timestamps of every shape: each fraction width, a leap second, the ends of the
    /// years written without a sign and some beyond them, from a fixed pseudo-random walk.
    fn samples() -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let fractions = [
            0,
            1,
            120_000_000,
            123_000_000,
            123_456_000,
            123_456_789,
            999_999_999,
            1_000,
        ];
        for i in 0..4000 {
            // Years 0 to 9999.
            let secs = (next() % 315_569_520_000) as i64 - 62_167_219_200;
            let nano = fractions[i % fractions.len()];
            out.push(DateTime::from_timestamp(secs, nano).unwrap());
        }
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        out.push(leap);
        for (secs, nano) in [
            (-62_167_219_200, 0),           // 0000-01-01
            (253_402_300_799, 999_999_999), // 9999-12-31T23:59:59.999999999
            (253_402_300_800, 0),           // 10000-01-01: chrono writes +10000
            (-62_167_219_201, 0),           // -0001-12-31
            (0, 0),
        ] {
            out.push(DateTime::from_timestamp(secs, nano).unwrap());
        }
        out
    }

    #[test]
    fn writes_what_chrono_writes() {
        for at in samples() {
            for maybe in [None, Some(at)] {
                let ours = serde_json::to_string(&Ours { at, maybe }).unwrap();
                let chrono = serde_json::to_string(&Chrono { at, maybe }).unwrap();
                assert_eq!(ours, chrono, "{at:?}");
            }
        }
    }

    /// Every text chrono writes, and the same instants written with 1 to 9 fraction
    /// digits, with an offset, with lower-case letters and as a leap second, read as chrono
    /// reads them; and what chrono refuses is refused.
    #[test]
    fn reads_what_chrono_reads() {
        let mut texts: Vec<String> = Vec::new();
        for at in samples() {
            texts.push(at.to_rfc3339_opts(SecondsFormat::AutoSi, true));
            let plain = at.format("%Y-%m-%dT%H:%M:%S").to_string();
            let nano = format!("{:09}", at.timestamp_subsec_nanos() % 1_000_000_000);
            for width in 1..=10 {
                texts.push(format!("{plain}.{}Z", &format!("{nano}0")[..width]));
            }
            texts.push(at.to_rfc3339_opts(SecondsFormat::Secs, false));
            texts.push(format!("{plain}+02:00"));
            texts.push(format!("{plain}z"));
            texts.push(format!("{plain}Z").replace('T', "t"));
        }
        texts.extend(
            [
                "2016-12-31T23:59:60Z",
                "2016-12-31T23:59:60.5Z",
                "2026-02-30T00:00:00Z",
                "2026-13-01T00:00:00Z",
                "2026-01-01T24:00:00Z",
                "2026-01-01T00:60:00Z",
                "2026-01-01T00:00:00.Z",
                "2026-01-01T00:00:00",
                "2026-01-01 00:00:00Z",
                "2026-1-01T00:00:00Z",
                "+2026-01-01T00:00:00Z",
                "2026-01-01T00:00:00ZZ",
                "2026-01-01T0a:00:00Z",
                "2026-01-01T00:00:00.12a4Z",
                "",
                "Z",
            ]
            .map(String::from),
        );
        let mut read = 0;
        for text in &texts {
            let json = serde_json::json!({ "at": text, "maybe": text }).to_string();
            let ours = serde_json::from_str::<Ours>(&json).map_err(|e| e.to_string());
            let chrono = serde_json::from_str::<Chrono>(&json).map_err(|e| e.to_string());
            match (&ours, &chrono) {
                (Ok(ours), Ok(chrono)) => {
                    assert_eq!((ours.at, ours.maybe), (chrono.at, chrono.maybe), "{text}");
                    read += 1;
                }
                (Err(ours), Err(chrono)) => assert_eq!(ours, chrono, "{text}"),
                _ => panic!("{text}: ours {ours:?}, chrono's {chrono:?}"),
            }
            // From a `Value` too (the log's events are decoded from one).
            let value: serde_json::Value = serde_json::from_str(&json).unwrap();
            let ours = serde_json::from_value::<Ours>(value.clone()).map_err(|e| e.to_string());
            let chrono = serde_json::from_value::<Chrono>(value).map_err(|e| e.to_string());
            assert_eq!(
                ours.map(|o| (o.at, o.maybe)),
                chrono.map(|c| (c.at, c.maybe)),
                "{text}"
            );
        }
        assert!(read > 40_000, "only {read} texts read");
    }

    /// The shapes the log and the read models hold take the direct path (the tests above
    /// would pass with chrono alone).
    #[test]
    fn the_common_shape_is_written_and_read_directly() {
        let at = NaiveDate::from_ymd_opt(2026, 12, 1)
            .unwrap()
            .and_hms_milli_opt(8, 0, 7, 250)
            .unwrap()
            .and_utc();
        assert_eq!(format(&at).unwrap().as_str(), "2026-12-01T08:00:07.250Z");
        assert_eq!(parse("2026-12-01T08:00:07.25Z"), Some(at));
        assert_eq!(parse("2026-12-01T08:00:07.250000Z"), Some(at));
        assert_eq!(parse("2026-12-01T08:00:07+00:00"), None);
    }

    #[test]
    fn a_missing_or_null_option_is_none() {
        let at = "2026-12-01T08:00:00Z";
        for json in [
            format!(r#"{{"at":"{at}"}}"#),
            format!(r#"{{"at":"{at}","maybe":null}}"#),
        ] {
            let ours: Ours = serde_json::from_str(&json).unwrap();
            assert_eq!(ours.maybe, None, "{json}");
        }
    }
}
