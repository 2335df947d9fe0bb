//! Per-worker counters, gauges and latency histograms, and the registry
//! that keeps them by listener and upstream across reloads.
//!
//! Every value is written by exactly one worker thread, into that worker's
//! own cache-line-aligned slot, with a relaxed load and a relaxed store (no
//! locked read-modify-write instruction, no line shared with another
//! writer). Readers (a scrape, the API) sum the slots; a reading taken while
//! a worker writes is at most one increment behind, never torn. Counters are
//! atomics only so that the cross-thread read is defined behaviour: on
//! x86-64 and AArch64 such a store compiles to a plain `mov`/`str`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

/// A monotonic counter with a single writer.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A gauge with a single writer (summed over workers, it may be negative
/// in one slot: a connection accepted on one context and closed on a newer
/// one of the same listener is still counted in the right slot because the
/// guard keeps its own slot).
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    #[inline]
    pub fn add(&self, d: i64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(d), Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Upper bounds of the latency buckets, in microseconds (a 1-2-5 series
/// from 50 µs to 60 s; one more bucket holds everything slower).
pub const LATENCY_BOUNDS_US: [u64; 19] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000, 5_000_000, 10_000_000, 30_000_000,
    60_000_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    buckets: [Counter; BUCKETS],
    sum_us: Counter,
}

impl Histogram {
    #[inline]
    pub fn observe_us(&self, us: u64) {
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].inc();
        self.sum_us.add(us);
    }
}

/// A histogram summed over workers (bucket counts are not cumulative).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: [u64; BUCKETS],
    pub sum_us: u64,
}

impl HistogramSnapshot {
    pub fn merge(&mut self, h: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&h.buckets) {
            *a += b.get();
        }
        self.sum_us += h.sum_us.get();
    }

    pub fn add(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The `q` quantile (0..=1) in microseconds, interpolated linearly
    /// inside its bucket (as Prometheus' `histogram_quantile` does). `None`
    /// without observations; the open last bucket reports its lower bound.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (seen + n) as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { LATENCY_BOUNDS_US[i - 1] as f64 };
                let Some(&upper) = LATENCY_BOUNDS_US.get(i) else { return Some(lower) };
                let within = ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
                return Some(lower + (upper as f64 - lower) * within);
            }
            seen += n;
        }
        Some(*LATENCY_BOUNDS_US.last().unwrap_or(&0) as f64)
    }
}

/// One slot per worker. Slots are cache-line aligned by their type.
pub struct PerWorker<T> {
    slots: Box<[T]>,
}

impl<T: Default> PerWorker<T> {
    pub fn new(workers: usize) -> Self {
        PerWorker { slots: (0..workers.max(1)).map(|_| T::default()).collect() }
    }
}

impl<T> PerWorker<T> {
    /// Worker `w`'s slot. (A worker index past the end shares the last
    /// slot: counts stay correct up to a lost increment; never a panic.)
    #[inline]
    pub fn slot(&self, w: usize) -> &T {
        &self.slots[w.min(self.slots.len() - 1)]
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter()
    }
}

/// HTTP status classes as metric labels; "none" for a status outside
/// 100..=599 (an upstream's odd code). A client that leaves before its
/// response is counted as 499, in 4xx, as nginx logs it.
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

#[inline]
pub fn class_index(status: u16) -> usize {
    match status {
        100..=599 => (status / 100 - 1) as usize,
        _ => 5,
    }
}

/// Why Atlas turned a connection or request away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// `max_connections` (worker, listener) or `per_ip_connections`.
    ConnectionLimit,
    /// `per_ip_requests_per_sec` (429).
    RateLimit,
    /// Head over `max_header_bytes` / `max_headers` (431).
    HeaderTooLarge,
    /// Body over `max_body_bytes` (413).
    BodyTooLarge,
    /// Ambiguous message framing: conflicting Content-Length, CL with TE,
    /// obfuscated Transfer-Encoding, bad chunk syntax (request smuggling).
    Smuggling,
    /// Any other malformed request (400).
    Malformed,
    /// The head did not arrive within `client_header` (408).
    HeaderTimeout,
    /// TLS handshake failed or timed out.
    TlsHandshake,
}

impl Reject {
    pub const ALL: [Reject; 8] = [
        Reject::ConnectionLimit,
        Reject::RateLimit,
        Reject::HeaderTooLarge,
        Reject::BodyTooLarge,
        Reject::Smuggling,
        Reject::Malformed,
        Reject::HeaderTimeout,
        Reject::TlsHandshake,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::ConnectionLimit => "connection_limit",
            Reject::RateLimit => "rate_limit",
            Reject::HeaderTooLarge => "header_too_large",
            Reject::BodyTooLarge => "body_too_large",
            Reject::Smuggling => "smuggling",
            Reject::Malformed => "malformed",
            Reject::HeaderTimeout => "header_timeout",
            Reject::TlsHandshake => "tls_handshake",
        }
    }
}

/// One worker's figures for one listener.
#[repr(align(64))]
#[derive(Default)]
pub struct ListenerStats {
    /// Responses by status class ([`CLASSES`]).
    pub requests: [Counter; 6],
    /// Time from a request's first byte to its last response byte.
    pub latency: Histogram,
    pub connections_active: Gauge,
    pub connections_total: Counter,
    /// Bytes read from and written to clients.
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub rejected: [Counter; Reject::ALL.len()],
    /// Requests sent again to another upstream (budgeted retries) or on a
    /// fresh connection after a stale pooled one.
    pub retries: Counter,
}

impl ListenerStats {
    #[inline]
    pub fn reject(&self, why: Reject) {
        self.rejected[why as usize].inc();
    }
}

/// One worker's figures for one upstream, as seen from one listener.
#[repr(align(64))]
#[derive(Default)]
pub struct UpstreamStats {
    /// Responses received, by status class.
    pub responses: [Counter; 6],
    /// Attempts that got no valid response: connect failure or timeout,
    /// reset, response timeout, malformed response.
    pub errors: Counter,
    /// Time from sending the request to having the response head (what
    /// nginx calls `$upstream_header_time`).
    pub latency: Histogram,
    pub pool_hits: Counter,
    pub pool_misses: Counter,
}

/// Listener figures summed over workers.
#[derive(Clone, Debug, Default)]
pub struct ListenerSnapshot {
    pub requests: [u64; 6],
    pub latency: HistogramSnapshot,
    pub connections_active: i64,
    pub connections_total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub rejected: [u64; Reject::ALL.len()],
    pub retries: u64,
}

impl ListenerSnapshot {
    pub fn of(p: &PerWorker<ListenerStats>) -> Self {
        let mut s = ListenerSnapshot::default();
        for w in p.iter() {
            for (a, b) in s.requests.iter_mut().zip(&w.requests) {
                *a += b.get();
            }
            s.latency.merge(&w.latency);
            s.connections_active += w.connections_active.get();
            s.connections_total += w.connections_total.get();
            s.bytes_in += w.bytes_in.get();
            s.bytes_out += w.bytes_out.get();
            for (a, b) in s.rejected.iter_mut().zip(&w.rejected) {
                *a += b.get();
            }
            s.retries += w.retries.get();
        }
        s
    }
}

/// Upstream figures summed over workers (and, with `add`, over listeners).
#[derive(Clone, Debug, Default)]
pub struct UpstreamSnapshot {
    pub responses: [u64; 6],
    pub errors: u64,
    pub latency: HistogramSnapshot,
    pub pool_hits: u64,
    pub pool_misses: u64,
}

impl UpstreamSnapshot {
    pub fn of(p: &PerWorker<UpstreamStats>) -> Self {
        let mut s = UpstreamSnapshot::default();
        for w in p.iter() {
            for (a, b) in s.responses.iter_mut().zip(&w.responses) {
                *a += b.get();
            }
            s.errors += w.errors.get();
            s.latency.merge(&w.latency);
            s.pool_hits += w.pool_hits.get();
            s.pool_misses += w.pool_misses.get();
        }
        s
    }

    pub fn add(&mut self, o: &UpstreamSnapshot) {
        for (a, b) in self.responses.iter_mut().zip(&o.responses) {
            *a += b;
        }
        self.errors += o.errors;
        self.latency.add(&o.latency);
        self.pool_hits += o.pool_hits;
        self.pool_misses += o.pool_misses;
    }

    pub fn requests(&self) -> u64 {
        self.responses.iter().sum::<u64>() + self.errors
    }
}

/// Identifies an upstream's figures: the listener that sent the traffic,
/// the group and the upstream's name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UpstreamKey {
    pub listener: String,
    pub group: String,
    pub upstream: String,
}

/// Where the per-worker figures live, by name, for the life of the process
/// (a reload finds the figures of listeners and upstreams it keeps).
pub struct Registry {
    workers: usize,
    listeners: Mutex<BTreeMap<String, Arc<PerWorker<ListenerStats>>>>,
    upstreams: Mutex<BTreeMap<UpstreamKey, Arc<PerWorker<UpstreamStats>>>>,
    /// Control-plane counters (shared atomics are fine off the data path).
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// Sets the number of workers; call once before the workers start.
pub fn init(workers: usize) {
    let _ = REGISTRY.set(Registry::new(workers));
}

/// Workers the registry sizes per-worker slots for.
pub fn registry_workers() -> usize {
    registry().workers
}

/// The process' registry (sized for the available CPUs if `init` was not called).
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init(|| Registry::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)))
}

impl Registry {
    fn new(workers: usize) -> Self {
        Registry {
            workers: workers.max(1),
            listeners: Mutex::default(),
            upstreams: Mutex::default(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }
    }

    pub fn listener(&self, name: &str) -> Arc<PerWorker<ListenerStats>> {
        let mut m = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(name.to_string()).or_insert_with(|| Arc::new(PerWorker::new(self.workers))).clone()
    }

    pub fn upstream(&self, key: UpstreamKey) -> Arc<PerWorker<UpstreamStats>> {
        let mut m = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key).or_insert_with(|| Arc::new(PerWorker::new(self.workers))).clone()
    }

    /// Every listener's figures, by name.
    pub fn listeners(&self) -> Vec<(String, ListenerSnapshot)> {
        let m = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), ListenerSnapshot::of(v))).collect()
    }

    /// Every (listener, group, upstream)'s figures.
    pub fn upstreams(&self) -> Vec<(UpstreamKey, UpstreamSnapshot)> {
        let m = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), UpstreamSnapshot::of(v))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = Histogram::default();
        for us in [10, 60, 60, 150, 400, 900] {
            h.observe_us(us);
        }
        h.observe_us(100_000_000);
        let mut s = HistogramSnapshot::default();
        s.merge(&h);
        assert_eq!(s.count(), 7);
        assert_eq!(s.buckets[0], 1); // <= 50
        assert_eq!(s.buckets[1], 2); // <= 100
        assert_eq!(s.buckets[BUCKETS - 1], 1); // > 60 s
        assert_eq!(s.sum_us, 10 + 60 + 60 + 150 + 400 + 900 + 100_000_000);
        // The median (rank 3.5, the 4th value: 150) is in the 100..200 bucket.
        let p50 = s.quantile_us(0.5).unwrap();
        assert!((100.0..=200.0).contains(&p50), "{p50}");
        assert_eq!(s.quantile_us(1.0), Some(60_000_000.0));
        assert_eq!(HistogramSnapshot::default().quantile_us(0.5), None);
    }

    #[test]
    fn boundaries_are_inclusive_upper() {
        let h = Histogram::default();
        h.observe_us(50);
        h.observe_us(51);
        let mut s = HistogramSnapshot::default();
        s.merge(&h);
        assert_eq!((s.buckets[0], s.buckets[1]), (1, 1));
    }

    #[test]
    fn per_worker_sums_and_clamps() {
        let p: PerWorker<ListenerStats> = PerWorker::new(2);
        p.slot(0).requests[class_index(200)].inc();
        p.slot(1).requests[class_index(204)].add(2);
        p.slot(7).requests[class_index(503)].inc(); // past the end: last slot
        p.slot(0).connections_active.add(1);
        p.slot(1).connections_active.add(-1);
        let s = ListenerSnapshot::of(&p);
        assert_eq!(s.requests[1], 3);
        assert_eq!(s.requests[4], 1);
        assert_eq!(s.connections_active, 0);
        assert_eq!(class_index(0), 5);
        assert_eq!(class_index(999), 5);
        assert_eq!(std::mem::align_of::<ListenerStats>(), 64);
    }
}
