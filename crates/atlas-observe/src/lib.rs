//! What Atlas records about the traffic it carries, kept by the workers
//! without slowing them and read by the control plane (admin API,
//! `/metrics`, dashboard).
//!
//! - `metrics`: counters and latency histograms with one slot per worker.
//!   A worker only ever stores into its own slot; a scrape sums the slots.
//! - `access_log`: per-worker line buffers handed to one writer thread;
//!   never a write(2) on a worker, reopened on SIGUSR1.
//! - `skim`: the traffic tap, bounded per-worker rings drained by a
//!   collector thread that keeps recent samples and rates.
//! - `events`: a short list of recent notable events (errors, health
//!   transitions, reloads) for the dashboard.

pub mod access_log;
pub mod events;
pub mod metrics;
pub mod skim;
mod time;

pub use metrics::{Counter, Gauge, Histogram, HistogramSnapshot, PerWorker};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    time::unix_ms(std::time::SystemTime::now())
}
