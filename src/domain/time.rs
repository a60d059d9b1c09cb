//! Time: Unix seconds and the one RFC 3339 formatter of the crate (UTC, `Z`).
//!
//! Audit records use microseconds (`2023-11-14T22:13:20.123456Z`), certificates of destruction
//! whole seconds (`2023-11-14T22:13:20Z`); both come from the same calendar code here, which is
//! checked against the `time` crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` as RFC 3339 UTC with microseconds: `2023-11-14T22:13:20.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let mut b = Vec::with_capacity(27);
    push_rfc3339(&mut b, t);
    String::from_utf8(b).unwrap_or_default()
}

/// A Unix timestamp as RFC 3339 UTC in whole seconds: `2023-11-14T22:13:20Z`.
pub fn rfc3339_secs(unix: i64) -> String {
    let mut out = *b"0000-00-00T00:00:00Z";
    civil(&mut out, unix.max(0) as u64);
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends `t` as RFC 3339 UTC with microseconds, like [`rfc3339`], without allocating: the
/// audit writer's hot path.
pub fn push_rfc3339(buf: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    civil(&mut out, d.as_secs());
    put(&mut out, 20, 6, u64::from(d.subsec_micros()));
    buf.extend_from_slice(&out);
}

/// Writes the date and time of `secs` since the epoch into the first 19 bytes of `out`
/// (`YYYY-MM-DDTHH:MM:SS`), with H. Hinnant's civil-from-days algorithm.
fn civil(out: &mut [u8], secs: u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    put(out, 0, 4, year.clamp(0, 9999) as u64);
    put(out, 5, 2, month as u64);
    put(out, 8, 2, day as u64);
    put(out, 11, 2, rem / 3600);
    put(out, 14, 2, rem / 60 % 60);
    put(out, 17, 2, rem % 60);
}

fn put(out: &mut [u8], at: usize, width: usize, mut v: u64) {
    for i in (at..at + width).rev() {
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn with_time_crate(t: SystemTime) -> String {
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        time::OffsetDateTime::from(t).format(&fmt).unwrap()
    }

    #[test]
    fn microseconds_equal_the_time_crate() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let check = |micros: u64| {
            let t = UNIX_EPOCH + Duration::from_micros(micros);
            assert_eq!(rfc3339(t), with_time_crate(t));
        };
        for m in [
            0,
            951_782_400_000_000,   // 2000-02-29
            4_107_542_399_999_999, // 2100-02-28T23:59:59.999999
            4_107_542_400_000_000, // 2100-03-01
            253_402_300_799_999_999,
        ] {
            check(m);
        }
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            check(x % 253_402_300_800_000_000);
        }
    }

    #[test]
    fn seconds_equal_the_time_crate() {
        for s in [
            0i64,
            1_700_000_000,
            951_782_400,
            4_107_542_399,
            253_402_300_799,
        ] {
            let want = time::OffsetDateTime::from_unix_timestamp(s)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            assert_eq!(rfc3339_secs(s), want);
        }
        assert_eq!(rfc3339_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456)),
            "2023-11-14T22:13:20.123456Z"
        );
    }
}
