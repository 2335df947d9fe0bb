//! Traffic skim: a tap on a listener (or one of its routes) that copies the
//! metadata of live requests (and, if asked, the first bytes of their
//! payloads) for debugging, without ever slowing the proxy.
//!
//! Each worker pushes a [`Sample`] into its own bounded ring ([`RING`]
//! samples) with `try_lock`: if the collector holds that ring at the
//! instant, or the ring is full because the collector fell behind, the
//! sample is dropped and counted. A worker never waits. The collector
//! thread empties the rings every 100 ms (swapping the queue, O(1) under
//! the lock) into a per-listener history of the last [`HISTORY`] samples
//! and per-second buckets from which rates, top paths and top clients are
//! computed. The API reads only the collector's side.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::metrics::{class_index, Counter, PerWorker};
use crate::time::unix_ms;

/// Samples a worker's ring holds before new ones are dropped.
pub const RING: usize = 4096;
/// Samples kept per listener for `GET /api/v1/skim`.
pub const HISTORY: usize = 10_000;
/// Seconds of per-second rates kept (the longest window).
pub const WINDOW_MAX: u64 = 60;
/// Distinct paths / clients counted per second; the rest is `(other)`.
const TOP_KEYS: usize = 1000;
const COLLECT_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Http,
    Tcp,
}

/// One skimmed request (HTTP) or connection (TCP). Method, target and
/// upstream name share one allocation (`text`), so a sample costs the
/// worker one allocation besides any payload copies.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at_ms: u64,
    pub worker: u16,
    pub kind: Kind,
    pub client: SocketAddr,
    /// `method`, `target` and `upstream`, one after the other.
    pub text: String,
    pub method_len: usize,
    pub target_len: usize,
    /// 0 for TCP.
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_us: u64,
    /// First bytes of the request body (when `skim_payload_bytes` > 0).
    pub request_payload: Option<Box<[u8]>>,
    /// First bytes of the response body.
    pub response_payload: Option<Box<[u8]>>,
}

impl Sample {
    pub fn method(&self) -> &str {
        self.text.get(..self.method_len).unwrap_or("")
    }

    pub fn target(&self) -> &str {
        self.text.get(self.method_len..self.method_len + self.target_len).unwrap_or("")
    }

    pub fn upstream(&self) -> &str {
        self.text.get(self.method_len + self.target_len..).unwrap_or("")
    }

    /// One JSON object (no newline).
    pub fn to_json(&self, seq: u64, listener: &str) -> String {
        let mut v = serde_json::json!({
            "seq": seq,
            "time_ms": self.at_ms,
            "listener": listener,
            "worker": self.worker,
            "kind": if self.kind == Kind::Http { "http" } else { "tcp" },
            "client": self.client.to_string(),
            "upstream": self.upstream(),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_us": self.duration_us,
        });
        if self.kind == Kind::Http {
            v["method"] = self.method().into();
            v["target"] = self.target().into();
            v["status"] = self.status.into();
        }
        if let Some(p) = &self.request_payload {
            v["request_payload"] = String::from_utf8_lossy(p).into();
        }
        if let Some(p) = &self.response_payload {
            v["response_payload"] = String::from_utf8_lossy(p).into();
        }
        v.to_string()
    }
}

#[repr(align(64))]
#[derive(Default)]
struct Ring {
    q: Mutex<VecDeque<Sample>>,
    /// Written by the ring's worker only.
    taken: Counter,
    dropped: Counter,
}

/// Per-second aggregates.
#[derive(Default)]
struct Second {
    sec: u64,
    requests: u64,
    bytes_in: u64,
    bytes_out: u64,
    classes: [u64; 6],
    duration_us: u64,
    paths: HashMap<Box<str>, u64>,
    clients: HashMap<IpAddr, u64>,
}

#[derive(Default)]
struct History {
    next_seq: u64,
    samples: VecDeque<(u64, Sample)>,
    seconds: VecDeque<Second>,
}

/// A listener's tap: per-worker rings (written by workers) and the
/// collector's history (read by the API). Kept across reloads by name.
pub struct Tap {
    pub listener: String,
    rings: PerWorker<Ring>,
    history: Mutex<History>,
    /// The Unix second the tap was created in.
    created_sec: u64,
}

static TAPS: Mutex<BTreeMap<String, Arc<Tap>>> = Mutex::new(BTreeMap::new());
static COLLECTOR: OnceLock<()> = OnceLock::new();

/// The tap of `listener` (created on first use; starts the collector).
pub fn tap(listener: &str) -> Arc<Tap> {
    COLLECTOR.get_or_init(|| {
        if let Err(e) = std::thread::Builder::new().name("atlas-skim".into()).spawn(collector) {
            tracing::error!(error = %e, "internal: cannot start the skim collector; samples will be dropped");
        }
    });
    let workers = crate::metrics::registry_workers();
    let mut taps = TAPS.lock().unwrap_or_else(|p| p.into_inner());
    taps.entry(listener.to_string())
        .or_insert_with(|| {
            Arc::new(Tap {
                listener: listener.to_string(),
                rings: PerWorker::new(workers),
                history: Mutex::default(),
                created_sec: unix_ms(SystemTime::now()) / 1000,
            })
        })
        .clone()
}

/// The tap of `listener`, if one was ever created.
pub fn find(listener: &str) -> Option<Arc<Tap>> {
    TAPS.lock().unwrap_or_else(|p| p.into_inner()).get(listener).cloned()
}

fn collector() {
    let mut spare: VecDeque<Sample> = VecDeque::with_capacity(RING);
    loop {
        std::thread::sleep(COLLECT_EVERY);
        let taps: Vec<Arc<Tap>> = TAPS.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for t in taps {
            for ring in t.rings.iter() {
                {
                    let mut q = ring.q.lock().unwrap_or_else(|p| p.into_inner());
                    if q.is_empty() {
                        continue;
                    }
                    std::mem::swap(&mut *q, &mut spare);
                }
                t.absorb(spare.drain(..));
            }
        }
    }
}

impl Tap {
    /// Offers a sample from worker `w`; never waits.
    pub fn push(&self, w: usize, s: Sample) {
        let r = self.rings.slot(w);
        match r.q.try_lock() {
            Ok(mut q) if q.len() < RING => {
                q.push_back(s);
                drop(q);
                r.taken.inc();
            }
            _ => r.dropped.inc(),
        }
    }

    /// Samples taken and dropped, summed over workers.
    pub fn counts(&self) -> (u64, u64) {
        self.rings.iter().fold((0, 0), |(t, d), r| (t + r.taken.get(), d + r.dropped.get()))
    }

    fn absorb(&self, samples: impl Iterator<Item = Sample>) {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        for s in samples {
            let sec = s.at_ms / 1000;
            if h.seconds.back().is_none_or(|b| b.sec < sec) {
                h.seconds.push_back(Second { sec, ..Default::default() });
                while h.seconds.len() as u64 > WINDOW_MAX + 2 {
                    h.seconds.pop_front();
                }
            }
            // Samples from different workers arrive slightly out of order.
            if let Some(b) = h.seconds.iter_mut().rev().find(|b| b.sec == sec) {
                b.requests += 1;
                b.bytes_in += s.bytes_in;
                b.bytes_out += s.bytes_out;
                b.duration_us += s.duration_us;
                if s.kind == Kind::Http {
                    b.classes[class_index(s.status)] += 1;
                    let path = s.target().split('?').next().unwrap_or("");
                    // Only a path seen for the first time this second allocates.
                    if let Some(n) = b.paths.get_mut(path) {
                        *n += 1;
                    } else if b.paths.len() < TOP_KEYS {
                        b.paths.insert(path.into(), 1);
                    } else {
                        *b.paths.entry("(other)".into()).or_default() += 1;
                    }
                }
                let n = b.clients.len();
                if n < TOP_KEYS || b.clients.contains_key(&s.client.ip()) {
                    *b.clients.entry(s.client.ip()).or_default() += 1;
                }
            }
            h.next_seq += 1;
            let seq = h.next_seq;
            if h.samples.len() >= HISTORY {
                h.samples.pop_front();
            }
            h.samples.push_back((seq, s));
        }
    }

    /// Samples after `since` (oldest first, at most `limit`); with
    /// `since == 0`, the latest `limit`.
    pub fn samples(&self, since: u64, limit: usize) -> Vec<(u64, Sample)> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if since == 0 {
            let skip = h.samples.len().saturating_sub(limit);
            return h.samples.iter().skip(skip).cloned().collect();
        }
        h.samples.iter().filter(|(s, _)| *s > since).take(limit).cloned().collect()
    }

    /// The newest sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).next_seq
    }

    /// Rates over the last `window` complete seconds.
    pub fn rates(&self, window: u64) -> serde_json::Value {
        let window = window.clamp(1, WINDOW_MAX);
        let now = unix_ms(SystemTime::now()) / 1000;
        // A young tap has not seen a whole window yet: count from the
        // second it was created in (that second included).
        let span = window.min(now.saturating_sub(self.created_sec).max(1));
        let from = now.saturating_sub(span);
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let (mut req, mut bin, mut bout, mut dur) = (0u64, 0u64, 0u64, 0u64);
        let mut classes = [0u64; 6];
        let mut paths: HashMap<&str, u64> = HashMap::new();
        let mut clients: HashMap<IpAddr, u64> = HashMap::new();
        for b in h.seconds.iter().filter(|b| b.sec >= from && b.sec < now) {
            req += b.requests;
            bin += b.bytes_in;
            bout += b.bytes_out;
            dur += b.duration_us;
            for (a, c) in classes.iter_mut().zip(&b.classes) {
                *a += c;
            }
            for (p, n) in &b.paths {
                *paths.entry(p).or_default() += n;
            }
            for (c, n) in &b.clients {
                *clients.entry(*c).or_default() += n;
            }
        }
        let top = |mut v: Vec<(String, u64)>| -> serde_json::Value {
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v.truncate(10);
            v.into_iter().map(|(k, n)| serde_json::json!({ "key": k, "count": n, "per_sec": n as f64 / span as f64 })).collect()
        };
        let (taken, dropped) = self.counts();
        let mut by_class = serde_json::Map::new();
        for (i, name) in crate::metrics::CLASSES.iter().enumerate() {
            by_class.insert((*name).to_string(), (classes[i] as f64 / span as f64).into());
        }
        serde_json::json!({
            "listener": self.listener,
            "window_secs": span,
            "requests": req,
            "requests_per_sec": req as f64 / span as f64,
            "bytes_in_per_sec": bin as f64 / span as f64,
            "bytes_out_per_sec": bout as f64 / span as f64,
            "mean_duration_us": dur.checked_div(req).unwrap_or(0),
            "status_per_sec": by_class,
            "top_paths": top(paths.into_iter().map(|(k, n)| (k.to_string(), n)).collect()),
            "top_clients": top(clients.into_iter().map(|(k, n)| (k.to_string(), n)).collect()),
            "samples_taken": taken,
            "samples_dropped": dropped,
        })
    }
}

/// Copies at most `n` bytes of `bytes` for a payload field.
pub fn payload(bytes: &[u8], n: usize) -> Option<Box<[u8]>> {
    (n > 0 && !bytes.is_empty()).then(|| bytes[..bytes.len().min(n)].into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(path: &str, client: &str, at_ms: u64) -> Sample {
        Sample {
            at_ms,
            worker: 0,
            kind: Kind::Http,
            client: client.parse().unwrap(),
            text: format!("GET{path}u"),
            method_len: 3,
            target_len: path.len(),
            status: 200,
            bytes_in: 100,
            bytes_out: 1000,
            duration_us: 10,
            request_payload: payload(b"hello world", 5),
            response_payload: None,
        }
    }

    #[test]
    fn full_ring_drops_and_counts() {
        let t = tap("skim-test-full");
        // Fill worker 0's ring past its bound without a collector pass in
        // between (hold the history lock so `absorb` cannot run... the
        // collector only swaps rings, so push fast and check the sum).
        for i in 0..(RING as u64 + 50) {
            t.push(0, sample("/a", "1.2.3.4:1", i));
        }
        let (taken, dropped) = t.counts();
        assert_eq!(taken + dropped, RING as u64 + 50);
        assert!(taken >= RING as u64, "the ring takes at least its capacity: {taken}");
    }

    #[test]
    fn history_rates_and_top() {
        let t = tap("skim-test-rates");
        let now = unix_ms(SystemTime::now());
        let prev = (now / 1000 - 1) * 1000;
        let mut batch = Vec::new();
        for i in 0..30 {
            batch.push(sample(if i % 3 == 0 { "/b?x=1" } else { "/a" }, if i % 2 == 0 { "10.0.0.1:5" } else { "10.0.0.2:6" }, prev + i));
        }
        t.absorb(batch.into_iter());
        let r = t.rates(1);
        assert_eq!(r["requests"], 30);
        assert_eq!(r["top_paths"][0]["key"], "/a");
        assert_eq!(r["top_paths"][0]["count"], 20);
        assert_eq!(r["top_paths"][1]["key"], "/b");
        assert_eq!(r["top_clients"][0]["count"], 15);
        let s = t.samples(0, 5);
        assert_eq!(s.len(), 5);
        assert_eq!(s[4].0, 30);
        let after = t.samples(28, 100);
        assert_eq!(after.iter().map(|x| x.0).collect::<Vec<_>>(), vec![29, 30]);
        let j: serde_json::Value = serde_json::from_str(&s[0].1.to_json(s[0].0, "l")).unwrap();
        assert_eq!(j["request_payload"], "hello");
        assert_eq!(j["method"], "GET");
    }
}
