//! Connection and request limits that need state: per-client-IP open
//! connections and request rate (token bucket), and the per-listener
//! connection count.
//!
//! Per-IP state is kept per worker (thread-local, no lock): a client's
//! connections may land on different workers (SO_REUSEPORT hashes each
//! one), so the process-wide ceiling for one IP is up to `workers` times
//! the configured value. The listener count is one shared atomic per
//! listener, touched once per connection, never per request.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use atlas_config::Limits;

struct IpState {
    conns: u32,
    tokens: f64,
    last: Instant,
}

thread_local! {
    static IPS: RefCell<HashMap<IpAddr, IpState>> = RefCell::new(HashMap::new());
}

fn per_ip_on(l: &Limits) -> bool {
    l.per_ip_connections > 0 || l.per_ip_requests_per_sec > 0.0
}

/// Holds one of a client IP's connections; released on drop.
pub struct IpGuard(Option<IpAddr>);

impl Drop for IpGuard {
    fn drop(&mut self) {
        if let Some(ip) = self.0 {
            IPS.with(|m| {
                if let Some(s) = m.borrow_mut().get_mut(&ip) {
                    s.conns = s.conns.saturating_sub(1);
                }
            });
        }
    }
}

/// Admits a new connection from `ip`, or `None` when it already has
/// `per_ip_connections` open on this worker.
pub fn admit_connection(ip: IpAddr, l: &Limits) -> Option<IpGuard> {
    if !per_ip_on(l) {
        return Some(IpGuard(None));
    }
    IPS.with(|m| {
        let mut m = m.borrow_mut();
        let s = m.entry(ip).or_insert(IpState { conns: 0, tokens: l.per_ip_burst.max(1) as f64, last: Instant::now() });
        if l.per_ip_connections > 0 && s.conns >= l.per_ip_connections {
            return None;
        }
        s.conns += 1;
        Some(IpGuard(Some(ip)))
    })
}

/// Takes one request token for `ip`; false when its rate is exceeded.
pub fn admit_request(ip: IpAddr, l: &Limits) -> bool {
    if l.per_ip_requests_per_sec <= 0.0 {
        return true;
    }
    IPS.with(|m| {
        let mut m = m.borrow_mut();
        let burst = l.per_ip_burst.max(1) as f64;
        let s = m.entry(ip).or_insert(IpState { conns: 0, tokens: burst, last: Instant::now() });
        let now = Instant::now();
        s.tokens = (s.tokens + now.duration_since(s.last).as_secs_f64() * l.per_ip_requests_per_sec).min(burst);
        s.last = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            false
        }
    })
}

/// Forgets IPs with no open connection and a full bucket (housekeeping).
pub fn sweep(l: &Limits) {
    let burst = l.per_ip_burst.max(1) as f64;
    let now = Instant::now();
    IPS.with(|m| m.borrow_mut().retain(|_, s| s.conns > 0 || s.tokens + now.duration_since(s.last).as_secs_f64() * l.per_ip_requests_per_sec < burst));
}

/// Open connections on one listener, across workers.
pub struct ListenerConns {
    pub count: Arc<AtomicUsize>,
    pub max: usize,
}

/// Holds a slot of a listener's connection limit.
pub struct ListenerGuard(Option<Arc<AtomicUsize>>);

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ListenerConns {
    /// Takes a slot, or `None` when the listener is at `max`.
    pub fn admit(&self) -> Option<ListenerGuard> {
        if self.max == 0 {
            return Some(ListenerGuard(None));
        }
        if self.count.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ListenerGuard(Some(self.count.clone())))
    }
}
