//! Durations as text, the way Go (`time.ParseDuration`) and Prometheus write them: `250ms`,
//! `90s`, `1h30m`, `1.5h`, plus `d` (days) and `w` (weeks), which Go lacks. One parser for
//! every duration in the config file and for `--since`/`--until`.
//!
//! The arithmetic is humantime's; on top of it we keep to the units both ecosystems agree on
//! (humantime also reads `M` as months and `y` as 365.25 days, which Prometheus does not), read
//! Go's bare `0`, and say what went wrong in words that name the text.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The units a duration may use.
pub const UNITS: &[&str] = &["ns", "us", "µs", "ms", "s", "m", "h", "d", "w"];

/// What the error messages list as examples.
const EXAMPLES: &str = "for example 250ms, 90s, 1h30m, 1.5h, 7d";

/// Parses a duration (`1h30m`, `1.5h`, `90s`, `250ms`, `90d`).
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err(format!("empty duration ({EXAMPLES})"));
    }
    // Go: "0" is the one number that needs no unit.
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err(format!("duration {s:?} is negative"));
    }
    let body = s.strip_prefix('+').unwrap_or(s);
    check_units(s, body)?;
    humantime::parse_duration(body).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
            format!("duration {s:?} needs a unit (ms, s, m, h, d; {EXAMPLES})")
        }
        humantime::DurationError::NumberOverflow => format!("duration {s:?} is too large"),
        other => format!("duration {s:?}: {other} ({EXAMPLES})"),
    })
}

/// Every alphabetic run must be one of [`UNITS`].
fn check_units(s: &str, body: &str) -> Result<(), String> {
    let mut unit = String::new();
    let check = |unit: &mut String| -> Result<(), String> {
        if !unit.is_empty() && !UNITS.contains(&unit.as_str()) {
            return Err(format!(
                "duration {s:?}: unknown unit {unit:?} (ns, us, ms, s, m, h, d, w)"
            ));
        }
        unit.clear();
        Ok(())
    };
    for c in body.chars() {
        if c.is_alphabetic() {
            unit.push(c);
        } else {
            check(&mut unit)?;
        }
    }
    check(&mut unit)
}

/// Serde: a duration as text (`with = "duration_text"`).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse(&s).map_err(serde::de::Error::custom)
}

/// Serde: an optional duration as text; absent or null is `None`.
pub mod optional {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::parse(&s).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// Serde: a millisecond count written as a number (`batch_ms: 5`, the key's unit) or as a
/// duration (`batch_ms: 5ms`, `batch_ms: 0.5s`), for keys whose name carries the unit.
pub mod millis {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Millis {
        Count(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Millis::deserialize(d)? {
            Millis::Count(n) => Ok(n),
            Millis::Text(s) => {
                let d = super::parse(&s).map_err(serde::de::Error::custom)?;
                u64::try_from(d.as_millis())
                    .map_err(|_| serde::de::Error::custom(format!("duration {s:?} is too large")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn go_and_prometheus_forms() {
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("90s"), Duration::from_secs(90));
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("2h45m30s"), Duration::from_secs(2 * 3600 + 45 * 60 + 30));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1.25s"), Duration::from_millis(1250));
        assert_eq!(ok("300us"), Duration::from_micros(300));
        assert_eq!(ok("300µs"), Duration::from_micros(300));
        assert_eq!(ok("10ns"), Duration::from_nanos(10));
        assert_eq!(ok("+5m"), Duration::from_secs(300));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok(" 5m "), Duration::from_secs(300));
    }

    #[test]
    fn days_and_weeks_which_go_lacks() {
        assert_eq!(ok("90d"), Duration::from_secs(90 * 86_400));
        assert_eq!(ok("7d"), Duration::from_secs(7 * 86_400));
        assert_eq!(ok("1d12h"), Duration::from_secs(36 * 3600));
        assert_eq!(ok("2w"), Duration::from_secs(14 * 86_400));
    }

    #[test]
    fn mistakes_are_refused_with_the_text() {
        for (bad, want) in [
            ("", "empty"),
            ("5", "needs a unit"),
            ("5y", "unknown unit \"y\""),
            ("3M", "unknown unit \"M\""),
            ("5 minutes", "unknown unit \"minutes\""),
            ("-1h", "negative"),
            ("1h-30m", "\"1h-30m\""),
            ("h", "\"h\""),
            ("1..5h", "\"1..5h\""),
            ("99999999999999999999d", "too large"),
            ("0.5ns", "\"0.5ns\""),
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }
}
