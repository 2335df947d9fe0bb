//! Upstream selection: round robin (smooth weighted), random (weighted),
//! least in-flight requests across the whole process, and consistent hash.
//!
//! Two halves:
//! - [`GroupShared`] is built once per upstream group and configuration and
//!   shared by every worker (`Arc`): the upstream list, the hash ring and the
//!   in-flight counters. Each upstream's counter has one cache line per
//!   worker; a worker only ever *stores* into its own line (no
//!   read-modify-write, no lock, no line bouncing on the write side), and
//!   `least_connections` sums the lines when it picks. That is the only
//!   cross-thread memory a request touches. Counters survive a reload for
//!   upstreams that remain.
//! - [`Picker`] is per worker and per listener: round-robin cursor, smooth
//!   weighted round-robin weights, and the random number generator.
//!
//! The hash function for the ring is written here (FNV-1a folded through the
//! murmur3 64-bit finaliser) because it must be stable across processes and
//! versions so that several Atlas instances map a key to the same upstream;
//! std's `DefaultHasher` makes no such promise and pulling a crate for twelve
//! lines is not worth it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

use atlas_config::{Group, Strategy};

/// Stable 64-bit hash (FNV-1a + murmur3 fmix64).
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[repr(align(64))]
#[derive(Default)]
struct Line(AtomicU32);

/// One upstream's in-flight count: one cache line per worker. A worker
/// only ever *stores* into its own line; readers sum the lines. It is held
/// by `Arc` so a reload that keeps an upstream keeps its counts (requests
/// started before the reload finish against the same counters).
///
/// It also carries the upstream's health as the active checker last
/// published it, and whether an operator drained it: read on every pick
/// (a read-mostly byte that only changes on a transition).
pub struct UpstreamCounters {
    lines: Box<[Line]>,
    /// Bit 0: marked DOWN by the health checker. Bit 1: drained by an
    /// operator (admin API). Usable only when zero: one load per pick.
    flags: AtomicU8,
}

const DOWN: u8 = 1;
const DRAINED: u8 = 2;

impl UpstreamCounters {
    pub fn new(workers: usize) -> Self {
        UpstreamCounters { lines: (0..workers.max(1)).map(|_| Line::default()).collect(), flags: AtomicU8::new(0) }
    }

    /// Neither down nor drained.
    pub fn is_usable(&self) -> bool {
        self.flags.load(Ordering::Relaxed) == 0
    }

    pub fn is_healthy(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & DOWN == 0
    }

    pub fn is_drained(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & DRAINED != 0
    }

    fn set_flag(&self, flag: u8, on: bool) -> bool {
        let old = if on { self.flags.fetch_or(flag, Ordering::Relaxed) } else { self.flags.fetch_and(!flag, Ordering::Relaxed) };
        (old & flag != 0) != on
    }

    /// Publishes a health verdict; returns whether it changed.
    pub fn set_healthy(&self, up: bool) -> bool {
        self.set_flag(DOWN, !up)
    }

    /// Takes the upstream out of rotation (or back); returns whether it changed.
    pub fn set_drained(&self, drained: bool) -> bool {
        self.set_flag(DRAINED, drained)
    }

    /// Called only by `worker` itself: a plain store, never contended.
    pub fn add(&self, worker: usize, delta: i32) {
        if let Some(l) = self.lines.get(worker) {
            l.0.store(l.0.load(Ordering::Relaxed).wrapping_add_signed(delta), Ordering::Relaxed);
        }
    }

    pub fn total(&self) -> u32 {
        self.lines.iter().map(|l| l.0.load(Ordering::Relaxed)).fold(0u32, u32::wrapping_add)
    }
}

/// In-flight request counts of a group's upstreams.
pub struct InflightTable {
    upstreams: Vec<Arc<UpstreamCounters>>,
}

impl InflightTable {
    pub fn new(workers: usize, upstreams: usize) -> Self {
        InflightTable { upstreams: (0..upstreams).map(|_| Arc::new(UpstreamCounters::new(workers))).collect() }
    }

    pub fn add(&self, worker: usize, upstream: usize, delta: i32) {
        self.upstreams[upstream].add(worker, delta);
    }

    /// In-flight requests to `upstream` summed over all workers.
    pub fn total(&self, upstream: usize) -> u32 {
        self.upstreams[upstream].total()
    }

    pub fn upstreams(&self) -> usize {
        self.upstreams.len()
    }

    pub fn counters(&self, upstream: usize) -> &Arc<UpstreamCounters> {
        &self.upstreams[upstream]
    }
}

/// A consistent-hash ring: `100 × weight` points per upstream, placed by the
/// upstream's *name*, so adding or removing one upstream moves only its keys.
pub struct HashRing {
    points: Vec<(u64, u32)>,
}

impl HashRing {
    pub fn new(names_weights: &[(&str, u32)]) -> Self {
        let mut points = Vec::new();
        for (i, (name, weight)) in names_weights.iter().enumerate() {
            let n = (*weight as usize * 100).min(10_000);
            for v in 0..n {
                points.push((hash64(format!("{name}#{v}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        HashRing { points }
    }

    /// The upstream owning `key`, skipping any for which `skip` is true.
    pub fn lookup(&self, key: u64, skip: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|p| p.0 < key);
        let n = self.points.len();
        (0..n).map(|i| self.points[(start + i) % n].1 as usize).find(|&u| !skip(u))
    }
}

/// What is shared by all workers for one upstream group.
pub struct GroupShared {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
    pub names: Vec<String>,
    pub weights: Vec<u32>,
    /// Per upstream: most requests in flight across the process (0: no limit).
    pub max_conns: Vec<u32>,
    pub inflight: InflightTable,
    pub ring: HashRing,
}

impl GroupShared {
    pub fn new(group: &Group, workers: usize) -> Self {
        Self::carrying(group, workers, &[])
    }

    /// Builds a group for a new configuration, reusing the in-flight
    /// counters of upstreams (same name and address) found in `previous`.
    pub fn carrying(group: &Group, workers: usize, previous: &[Arc<GroupShared>]) -> Self {
        let nw: Vec<(&str, u32)> = group.upstreams.iter().map(|u| (u.name.as_str(), u.weight)).collect();
        let counters = group
            .upstreams
            .iter()
            .map(|u| {
                previous
                    .iter()
                    .find_map(|g| g.names.iter().zip(&g.addrs).position(|(n, a)| *n == u.name && *a == u.addr).map(|i| g.inflight.counters(i).clone()))
                    .unwrap_or_else(|| Arc::new(UpstreamCounters::new(workers)))
            })
            .collect();
        GroupShared {
            name: group.name.clone(),
            addrs: group.upstreams.iter().map(|u| u.addr).collect(),
            names: group.upstreams.iter().map(|u| u.name.clone()).collect(),
            weights: group.upstreams.iter().map(|u| u.weight).collect(),
            max_conns: group.upstreams.iter().map(|u| u.max_conns).collect(),
            inflight: InflightTable { upstreams: counters },
            ring: HashRing::new(&nw),
        }
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Upstreams at their `max_conns`, as an exclusion mask (first 64).
    pub fn full_mask(&self) -> u64 {
        let mut mask = 0;
        for (i, &m) in self.max_conns.iter().enumerate().take(64) {
            if m > 0 && self.inflight.total(i) >= m {
                mask |= 1 << i;
            }
        }
        mask
    }

    pub fn has_limits(&self) -> bool {
        self.max_conns.iter().any(|&m| m > 0)
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

/// Per-worker selection state for one listener.
pub struct Picker {
    strategy: Strategy,
    cursor: usize,
    equal_weights: bool,
    total_weight: i64,
    current: Vec<i64>,
    rng: fastrand::Rng,
}

impl Picker {
    pub fn new(strategy: Strategy, group: &GroupShared, seed: u64) -> Self {
        let w0 = group.weights.first().copied().unwrap_or(1);
        Picker {
            strategy,
            cursor: seed as usize % group.len().max(1),
            equal_weights: group.weights.iter().all(|&w| w == w0 && w > 0),
            total_weight: group.weights.iter().map(|&w| w as i64).sum(),
            current: vec![0; group.len()],
            rng: fastrand::Rng::with_seed(seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    /// Picks an upstream index. `hash` is the request's hash key (used by the
    /// hash strategy only); `excluded` is a bit set of upstreams already
    /// tried for this request (retry); indexes past 63 are never excluded.
    pub fn pick(&mut self, group: &GroupShared, hash: u64, excluded: u64) -> Option<usize> {
        let n = group.len();
        let usable = |i: usize| group.weights[i] > 0 && (i >= 64 || excluded & (1u64 << i) == 0) && group.inflight.counters(i).is_usable();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return usable(0).then_some(0);
        }
        let pick = match self.strategy {
            Strategy::RoundRobin if self.equal_weights => {
                self.cursor = (self.cursor + 1) % n;
                self.cursor
            }
            Strategy::RoundRobin => {
                // nginx's smooth weighted round robin.
                let mut best = usize::MAX;
                let mut total = 0i64;
                for i in 0..n {
                    if !usable(i) {
                        continue;
                    }
                    total += group.weights[i] as i64;
                    self.current[i] += group.weights[i] as i64;
                    if best == usize::MAX || self.current[i] > self.current[best] {
                        best = i;
                    }
                }
                if best == usize::MAX {
                    return None;
                }
                self.current[best] -= total;
                best
            }
            Strategy::Random if self.equal_weights => self.rng.usize(..n),
            Strategy::Random => {
                if self.total_weight <= 0 {
                    return None;
                }
                let mut r = self.rng.i64(0..self.total_weight);
                let mut chosen = n - 1;
                for i in 0..n {
                    r -= group.weights[i] as i64;
                    if r < 0 {
                        chosen = i;
                        break;
                    }
                }
                chosen
            }
            Strategy::LeastConnections => {
                // Fewest in-flight per unit of weight; ties rotate so equal
                // loads spread instead of piling on the first upstream.
                self.cursor = (self.cursor + 1) % n;
                let mut best: Option<(usize, u64)> = None;
                for k in 0..n {
                    let i = (self.cursor + k) % n;
                    if !usable(i) {
                        continue;
                    }
                    let load = group.inflight.total(i) as u64;
                    let better = match best {
                        None => true,
                        Some((b, bload)) => load * (group.weights[b] as u64) < bload * (group.weights[i] as u64),
                    };
                    if better {
                        best = Some((i, load));
                    }
                }
                return best.map(|b| b.0);
            }
            Strategy::Hash => return group.ring.lookup(hash, |i| !usable(i)),
        };
        if usable(pick) {
            Some(pick)
        } else {
            // Excluded (retry): the next usable one in order.
            (1..n).map(|k| (pick + k) % n).find(|&i| usable(i))
        }
    }
}

#[cfg(test)]
mod tests;
