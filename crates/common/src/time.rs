//! Wall-clock timestamps for logs, status output and alarms.
//!
//! Logic timers use tokio's clock; this module is only for instants an operator reads.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    unix_ms(SystemTime::now())
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// Broken-down UTC time.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    millis: u32,
}

fn civil(unix_ms: u64) -> Civil {
    let secs = (unix_ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-from-civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: ((rem % 3600) / 60) as u32,
        second: (rem % 60) as u32,
        millis: (unix_ms % 1000) as u32,
    }
}

/// `2020-07-21T20:16:50.321+00:00`: the syslog prefix of the seed's log lines.
pub fn iso8601(unix_ms: u64) -> String {
    let c = civil(unix_ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}+00:00",
        c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
    )
}

/// `2020-07-21 20:16:50,321`: the seed's `UTCTime="…"` value.
pub fn utc_time(unix_ms: u64) -> String {
    let c = civil(unix_ms);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02},{:03}",
        c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
    )
}

/// `2026-Dec-01, 10:15:02 UTC`: the MSE seed's events-log timestamps.
pub fn mse_time(unix_ms: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let c = civil(unix_ms);
    format!(
        "{:04}-{}-{:02}, {:02}:{:02}:{:02} UTC",
        c.year,
        MONTHS[(c.month as usize).saturating_sub(1) % 12],
        c.day,
        c.hour,
        c.minute,
        c.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mse_timestamp_has_the_seeds_shape() {
        // 2026-12-01 10:15:02 UTC
        assert_eq!(mse_time(1_796_120_102_000), "2026-Dec-01, 10:15:02 UTC");
    }

    #[test]
    fn formats_known_instants() {
        // 2020-07-21 20:16:50.321 UTC, the first line of the seed's replication log.
        let t = 1_595_362_610_321;
        assert_eq!(utc_time(t), "2020-07-21 20:16:50,321");
        assert_eq!(iso8601(t), "2020-07-21T20:16:50.321+00:00");
        assert_eq!(utc_time(0), "1970-01-01 00:00:00,000");
        // A leap day.
        assert_eq!(utc_time(1_709_164_800_000), "2024-02-29 00:00:00,000");
    }
}
