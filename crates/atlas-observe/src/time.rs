//! Timestamps for log lines, formatted once per second per thread. The
//! calendar arithmetic is left to `httpdate` (already used for `Date`
//! headers): its fixed-width RFC 7231 form is rearranged into the common
//! log format and ISO 8601.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Stamp {
    secs: u64,
    /// `21/Nov/2026:10:00:00 +0000`
    pub clf: String,
    /// `2026-11-21T10:00:00` (the caller appends milliseconds and `Z`)
    pub iso: String,
}

thread_local! {
    static STAMP: RefCell<Stamp> = const { RefCell::new(Stamp { secs: u64::MAX, clf: String::new(), iso: String::new() }) };
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn month_number(m: &str) -> &'static str {
    match m {
        "Jan" => "01",
        "Feb" => "02",
        "Mar" => "03",
        "Apr" => "04",
        "May" => "05",
        "Jun" => "06",
        "Jul" => "07",
        "Aug" => "08",
        "Sep" => "09",
        "Oct" => "10",
        "Nov" => "11",
        _ => "12",
    }
}

fn format(t: SystemTime) -> (String, String) {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let h = httpdate::fmt_http_date(t);
    let (day, mon, year, hms) = (&h[5..7], &h[8..11], &h[12..16], &h[17..25]);
    (format!("{day}/{mon}/{year}:{hms} +0000"), format!("{year}-{}-{day}T{hms}", month_number(mon)))
}

/// Runs `f` with the formatted time `t` (UTC).
pub fn with_stamp<R>(t: SystemTime, f: impl FnOnce(&Stamp) -> R) -> R {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    STAMP.with(|s| {
        let mut s = s.borrow_mut();
        if s.secs != secs {
            let (clf, iso) = format(UNIX_EPOCH + std::time::Duration::from_secs(secs));
            *s = Stamp { secs, clf, iso };
        }
        f(&s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        // 2026-11-21 10:00:05 UTC
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_255_205);
        with_stamp(t, |s| {
            assert_eq!(s.clf, "21/Nov/2026:10:00:05 +0000");
            assert_eq!(s.iso, "2026-11-21T10:00:05");
        });
        let t = UNIX_EPOCH + std::time::Duration::from_secs(0);
        with_stamp(t, |s| assert_eq!(s.iso, "1970-01-01T00:00:00"));
    }
}
