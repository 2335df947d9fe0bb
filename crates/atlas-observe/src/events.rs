//! Recent notable events (upstream failures, health transitions, reloads,
//! limits hit) for the dashboard and `GET /api/v1/events`: the last
//! [`KEEP`] in a process-wide list. Workers only record on paths that are
//! already rate-limited (one warning per second per worker) and never wait:
//! if the list is locked at that instant the event is dropped (and counted).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

pub const KEEP: usize = 200;

#[derive(Clone, Debug)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    /// `error`, `warn` or `info`.
    pub level: &'static str,
    /// What it concerns: `upstream`, `health`, `reload`, `limits`, ...
    pub kind: &'static str,
    pub message: String,
}

static EVENTS: Mutex<VecDeque<Event>> = Mutex::new(VecDeque::new());
static SEQ: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Records an event; never blocks.
pub fn record(level: &'static str, kind: &'static str, message: impl Into<String>) {
    let Ok(mut list) = EVENTS.try_lock() else {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let seq = SEQ.fetch_add(1, Ordering::Relaxed) + 1;
    if list.len() >= KEEP {
        list.pop_front();
    }
    list.push_back(Event { seq, at_ms: crate::time::unix_ms(SystemTime::now()), level, kind, message: message.into() });
}

/// The most recent `limit` events, oldest first.
pub fn recent(limit: usize) -> Vec<Event> {
    let list = EVENTS.lock().unwrap_or_else(|p| p.into_inner());
    list.iter().skip(list.len().saturating_sub(limit)).cloned().collect()
}

/// Events lost because the list was busy.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_the_last() {
        for i in 0..super::KEEP + 5 {
            super::record("info", "test", format!("e{i}"));
        }
        let r = super::recent(3);
        assert_eq!(r.len(), 3);
        assert_eq!(r[2].message, format!("e{}", super::KEEP + 4));
        assert!(r[0].seq < r[2].seq);
        assert!(super::recent(10_000).len() <= super::KEEP);
    }
}
