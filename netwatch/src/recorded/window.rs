//! `--since` and `--until`: a stretch of recorded time, given as a time or as a duration
//! before now, and compared with each line's `time` as text.
use chrono::{
    DateTime, Datelike as _, Local, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, TimeZone,
    Utc,
};

use super::files::TIME_WIDTH;

/// How far out of time order a line may be written: records of one batch come from
/// several CPUs, and the agent's sweeps stamp what they find when they run. Reading starts
/// this much before `since`, and stops only this much after `until`.
pub const SLACK: chrono::Duration = chrono::Duration::seconds(60);

/// The times a reading keeps, both ends included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Window {
    pub fn contains(&self, time: DateTime<Utc>) -> bool {
        self.since.is_none_or(|s| time >= s) && self.until.is_none_or(|u| time <= u)
    }

    /// The ends as a line's `time` text, for comparing lines without parsing them.
    pub fn keys(&self) -> (Option<[u8; TIME_WIDTH]>, Option<[u8; TIME_WIDTH]>) {
        (self.since.map(key), self.until.map(key))
    }
}

/// `time` as the log writes it; after the year 9999 (which no line has), after every line.
pub fn key(time: DateTime<Utc>) -> [u8; TIME_WIDTH] {
    if time.year() > 9999 {
        return [b'9'; TIME_WIDTH];
    }
    let text = time.to_rfc3339_opts(SecondsFormat::Nanos, true);
    let mut key = [b'9'; TIME_WIDTH];
    let bytes = text.as_bytes();
    key[..bytes.len().min(TIME_WIDTH)].copy_from_slice(&bytes[..bytes.len().min(TIME_WIDTH)]);
    key
}

/// A point in time: a duration before now (`10m`, `2h`, `1d`, `90s`), an RFC 3339 time
/// (`2026-11-29T03:00:00Z`), or a local date and time (`2026-11-29T03:00`, `2026-11-29
/// 03:00:15`, `2026-11-29`), or a local time today (`03:00`).
pub fn parse_point(text: &str) -> Result<DateTime<Utc>, String> {
    parse_point_at(text, Utc::now())
}

fn parse_point_at(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Some(ago) = duration(text) {
        return now
            .checked_sub_signed(ago)
            .ok_or_else(|| format!("'{text}' ago is before any time"));
    }
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let local = |naive: NaiveDateTime| {
        Local.from_local_datetime(&naive).earliest().map(|t| t.with_timezone(&Utc))
    };
    for format in
        ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M"]
    {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, format) {
            return local(naive).ok_or_else(|| format!("'{text}' does not exist in local time"));
        }
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return local(date.and_time(NaiveTime::MIN))
            .ok_or_else(|| format!("'{text}' does not exist in local time"));
    }
    for format in ["%H:%M:%S%.f", "%H:%M"] {
        if let Ok(time) = NaiveTime::parse_from_str(text, format) {
            let today = now.with_timezone(&Local).date_naive();
            return local(today.and_time(time))
                .ok_or_else(|| format!("'{text}' does not exist in local time today"));
        }
    }
    Err(format!(
        "'{text}' is neither a time (2026-11-29T03:00, 2026-11-29 03:00:15, 03:00, RFC 3339) \
         nor a duration before now (10m, 2h, 1d)"
    ))
}

/// `90s` (or `90`), `10m`, `2h`, `1d`, `1w`: the one parser of durations.
pub fn duration(text: &str) -> Option<chrono::Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: i64 = digits.parse().ok()?;
    let seconds = match unit {
        "s" | "" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    chrono::Duration::try_seconds(number.checked_mul(seconds)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_parse_as_times_or_durations() {
        let now: DateTime<Utc> = "2026-11-29T12:00:00Z".parse().unwrap();
        assert_eq!(parse_point_at("10m", now).unwrap(), now - chrono::Duration::minutes(10));
        assert_eq!(parse_point_at("1d", now).unwrap(), now - chrono::Duration::days(1));
        assert_eq!(
            parse_point_at("2026-11-29T03:00:00Z", now).unwrap().to_rfc3339(),
            "2026-11-29T03:00:00+00:00"
        );
        let local = |text: &str| {
            let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").unwrap();
            Local.from_local_datetime(&naive).earliest().unwrap().with_timezone(&Utc)
        };
        assert_eq!(parse_point_at("2026-11-29T03:00", now).unwrap(), local("2026-11-29 03:00:00"));
        assert_eq!(
            parse_point_at("2026-11-29 03:00:15", now).unwrap(),
            local("2026-11-29 03:00:15")
        );
        assert_eq!(parse_point_at("2026-11-29", now).unwrap(), local("2026-11-29 00:00:00"));
        let today = now.with_timezone(&Local).date_naive();
        assert_eq!(parse_point_at("03:00", now).unwrap(), local(&format!("{today} 03:00:00")));
        let error = parse_point_at("yesterday", now).unwrap_err();
        assert!(error.contains("neither a time") && error.contains("'yesterday'"), "{error}");
        assert!(parse_point_at("10x", now).is_err());
        assert_eq!(parse_point_at("600", now).unwrap(), now - chrono::Duration::minutes(10));
        assert!(parse_point_at("99999999999d", now).is_err(), "no panic, an error");
        assert_eq!(key("+10000-01-01T00:00:00Z".parse().unwrap()), [b'9'; TIME_WIDTH]);
    }

    #[test]
    fn keys_sort_as_the_times_do() {
        let a: DateTime<Utc> = "2026-11-29T03:00:00.5Z".parse().unwrap();
        let b: DateTime<Utc> = "2026-11-29T03:00:01Z".parse().unwrap();
        assert_eq!(&key(a), b"2026-11-29T03:00:00.500000000Z");
        assert!(key(a) < key(b));
        let window = Window { since: Some(a), until: Some(b) };
        assert!(window.contains(a) && window.contains(b) && !window.contains(b + SLACK));
    }
}
