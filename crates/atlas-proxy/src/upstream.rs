//! Upstream side of a request: the upstream connection type (plain TCP or
//! TLS), choosing an upstream, and getting a connection to it: from the
//! worker's pool when allowed, else a fresh connect (and TLS handshake)
//! under the connect timeout; a failed connect moves on to another upstream
//! (each tried at most once).

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use atlas_balance::{GroupShared, Picker};
use atlas_observe::metrics::{class_index, UpstreamStats};
use atlas_observe::PerWorker;
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, Split};
use monoio::net::TcpStream;
use monoio::BufResult;

use crate::error::{ProxyError, Side};
use crate::tls::ClientTls;
use crate::ListenerCtx;

/// A connection to an upstream.
pub enum UpstreamConn {
    Plain(TcpStream),
    /// The stream and the raw descriptor of the socket under it.
    Tls(Box<monoio_rustls::ClientTlsStream<TcpStream>>, RawFd),
}

impl UpstreamConn {
    pub fn raw_fd(&self) -> RawFd {
        match self {
            UpstreamConn::Plain(s) => s.as_raw_fd(),
            UpstreamConn::Tls(_, fd) => *fd,
        }
    }
}

// SAFETY: both variants are `Split` (TcpStream, and rustls' stream over it).
unsafe impl Split for UpstreamConn {}

impl AsyncReadRent for UpstreamConn {
    fn read<T: IoBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        async move {
            match self {
                UpstreamConn::Plain(s) => s.read(buf).await,
                UpstreamConn::Tls(s, _) => s.read(buf).await,
            }
        }
    }

    fn readv<T: IoVecBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        async move {
            match self {
                UpstreamConn::Plain(s) => s.readv(buf).await,
                UpstreamConn::Tls(s, _) => s.readv(buf).await,
            }
        }
    }
}

impl AsyncWriteRent for UpstreamConn {
    fn write<T: IoBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        async move {
            match self {
                UpstreamConn::Plain(s) => s.write(buf).await,
                UpstreamConn::Tls(s, _) => s.write(buf).await,
            }
        }
    }

    fn writev<T: IoVecBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        async move {
            match self {
                UpstreamConn::Plain(s) => s.writev(buf).await,
                UpstreamConn::Tls(s, _) => s.writev(buf).await,
            }
        }
    }

    fn flush(&mut self) -> impl Future<Output = std::io::Result<()>> {
        async move {
            match self {
                UpstreamConn::Plain(s) => s.flush().await,
                UpstreamConn::Tls(s, _) => s.flush().await,
            }
        }
    }

    fn shutdown(&mut self) -> impl Future<Output = std::io::Result<()>> {
        async move {
            match self {
                UpstreamConn::Plain(s) => s.shutdown().await,
                UpstreamConn::Tls(s, _) => s.shutdown().await,
            }
        }
    }
}

/// An upstream group as one worker's listener (or route) uses it.
pub struct Upstreams {
    pub group: Arc<GroupShared>,
    pub picker: RefCell<Picker>,
    /// Per upstream (same order as the group): TLS settings, if any.
    pub tls: Arc<Vec<Option<ClientTls>>>,
    pub passive: RefCell<Passive>,
    /// Per upstream (same order): its figures as this listener sees them.
    pub stats: Vec<Arc<PerWorker<UpstreamStats>>>,
}

/// Passive health (outlier detection), per worker: `max_fails`
/// consecutive failed requests (connect errors, resets, 5xx) eject an
/// upstream from this worker's rotation for `fail_timeout`; then it is
/// tried again. Worker-local, so no shared writes on the request path.
pub struct Passive {
    max_fails: u32,
    fail_timeout: std::time::Duration,
    fails: Vec<u32>,
    until: Vec<Option<std::time::Instant>>,
    /// Bit i set: upstream i is ejected (indexes past 63 are never ejected).
    mask: u64,
}

impl Passive {
    pub fn new(upstreams: usize, max_fails: u32, fail_timeout: std::time::Duration) -> Self {
        Passive { max_fails, fail_timeout, fails: vec![0; upstreams], until: vec![None; upstreams], mask: 0 }
    }

    /// Upstreams currently ejected, as an exclusion mask.
    pub fn mask(&mut self) -> u64 {
        if self.mask != 0 {
            let now = std::time::Instant::now();
            for i in 0..self.until.len().min(64) {
                if self.until[i].is_some_and(|t| now >= t) {
                    self.until[i] = None;
                    self.mask &= !(1 << i);
                }
            }
        }
        self.mask
    }

    /// Records a request's outcome; returns true when it ejects the upstream.
    pub fn record(&mut self, idx: usize, ok: bool) -> bool {
        let Some(f) = self.fails.get_mut(idx) else { return false };
        if ok {
            *f = 0;
            return false;
        }
        *f += 1;
        if self.max_fails == 0 || *f < self.max_fails || idx >= 64 {
            return false;
        }
        *f = 0;
        self.until[idx] = Some(std::time::Instant::now() + self.fail_timeout);
        self.mask |= 1 << idx;
        true
    }
}

impl Upstreams {
    /// Records the outcome of a request to upstream `idx` (passive health).
    pub fn record(&self, idx: usize, ok: bool) {
        if self.passive.borrow_mut().record(idx, ok) {
            let (name, addr) = (&self.group.names[idx], self.group.addrs[idx]);
            tracing::warn!(upstream = %name, %addr, "upstream ejected after consecutive failures (passive health check)");
            atlas_observe::events::record("warn", "upstream", format!("{name} ({addr}) ejected after consecutive failures (passive check)"));
        }
    }

    /// Worker `w`'s figures for upstream `idx`.
    #[inline]
    pub fn stats(&self, idx: usize, w: usize) -> Option<&UpstreamStats> {
        self.stats.get(idx).map(|s| s.slot(w))
    }

    /// An attempt on `idx` got no valid response.
    pub fn failed(&self, idx: usize, w: usize) {
        self.record(idx, false);
        if let Some(s) = self.stats(idx, w) {
            s.errors.inc();
        }
    }

    /// `idx` answered with `status` after `head_us` microseconds.
    pub fn responded(&self, idx: usize, w: usize, status: u16, head_us: u64) {
        self.record(idx, status < 500);
        if let Some(s) = self.stats(idx, w) {
            s.responses[class_index(status)].inc();
            s.latency.observe_us(head_us);
        }
    }
}

/// Counts a request in flight on one upstream for as long as it lives.
pub struct InflightGuard<'a> {
    group: &'a GroupShared,
    worker: usize,
    idx: usize,
}

impl<'a> InflightGuard<'a> {
    pub fn new(group: &'a GroupShared, worker: usize, idx: usize) -> Self {
        group.inflight.add(worker, idx, 1);
        InflightGuard { group, worker, idx }
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.group.inflight.add(self.worker, self.idx, -1);
    }
}

pub struct Connected {
    pub idx: usize,
    pub addr: SocketAddr,
    pub tls: bool,
    pub conn: UpstreamConn,
    /// Came from the keep-alive pool (may have been closed by the upstream).
    pub reused: bool,
}

async fn dial(ctx: &ListenerCtx, addr: SocketAddr, tls: Option<&ClientTls>) -> Result<UpstreamConn, ProxyError> {
    let attempt = async {
        let tcp = TcpStream::connect_addr(addr).await.map_err(|e| ProxyError::io(Side::Upstream, true, "connect failed", e))?;
        let _ = tcp.set_nodelay(true);
        let fd = tcp.as_raw_fd();
        match tls {
            None => Ok(UpstreamConn::Plain(tcp)),
            Some(t) => match t.connector.connect(t.name.clone(), tcp).await {
                Ok(s) => Ok(UpstreamConn::Tls(Box::new(s), fd)),
                Err(e) => Err(ProxyError::io(Side::Upstream, true, "TLS handshake with upstream failed", e.into())),
            },
        }
    };
    match monoio::time::timeout(ctx.timeouts.connect, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::new(Side::Upstream, true, "connect timed out")),
    }
}

/// Picks an upstream not in `excluded` and connects. Failed upstreams are
/// added to `excluded`, so the caller can continue the same exclusion set.
pub async fn connect(ctx: &ListenerCtx, up: &Upstreams, hash: u64, excluded: &mut u64, use_pool: bool) -> Result<Connected, ProxyError> {
    let group = &up.group;
    let attempts = group.len().clamp(1, 3);
    let mut last = ProxyError::new(Side::Config, true, "no healthy upstream");
    let queue_until = std::time::Instant::now() + ctx.limits.queue_timeout;
    for _ in 0..attempts {
        let picked = loop {
            let ejected = up.passive.borrow_mut().mask();
            let full = if group.has_limits() { group.full_mask() } else { 0 };
            // (Each borrow of the picker ends with its statement.)
            let first = up.picker.borrow_mut().pick(group, hash, *excluded | ejected | full);
            let picked = match first {
                // Everything left is ejected: fail open rather than refuse.
                None if ejected != 0 => up.picker.borrow_mut().pick(group, hash, *excluded | full),
                p => p,
            };
            if picked.is_none() && full != 0 {
                // Every candidate is at its max_conns: queue a while, or give up.
                if std::time::Instant::now() < queue_until {
                    monoio::time::sleep(std::time::Duration::from_millis(2)).await;
                    continue;
                }
                last = ProxyError::new(Side::Config, true, "every upstream is at its max_conns");
            }
            break picked;
        };
        let Some(idx) = picked else {
            break;
        };
        let addr = group.addrs[idx];
        let tls = up.tls.get(idx).and_then(Option::as_ref);
        let stats = up.stats(idx, ctx.worker);
        if use_pool {
            if let Some(conn) = ctx.pool.take(addr, tls.is_some()) {
                if let Some(s) = stats {
                    s.pool_hits.inc();
                }
                return Ok(Connected { idx, addr, tls: tls.is_some(), conn, reused: true });
            }
            if let Some(s) = stats {
                s.pool_misses.inc();
            }
        }
        match dial(ctx, addr, tls).await {
            Ok(conn) => return Ok(Connected { idx, addr, tls: tls.is_some(), conn, reused: false }),
            Err(e) => {
                crate::log_limited(|| {
                    tracing::warn!(upstream = %group.names[idx], %addr, error = %e, "upstream connect failed");
                    atlas_observe::events::record("error", "upstream", format!("{} ({addr}): {e}", group.names[idx]));
                });
                up.failed(idx, ctx.worker);
                last = e;
            }
        }
        if idx < 64 {
            *excluded |= 1 << idx;
        }
    }
    Err(last)
}

thread_local! {
    /// Retry tokens of this worker: every request adds 0.2, a retry of a
    /// failed idempotent request takes 1, so retries stay under ~20% of
    /// the traffic (plus a burst of 20) and cannot multiply load when an
    /// upstream fleet is failing. Connect failures and stale pooled
    /// connections are retried outside this budget (nothing reached an
    /// upstream).
    static RETRY_TOKENS: std::cell::Cell<f64> = const { std::cell::Cell::new(20.0) };
}

const RETRY_BURST: f64 = 20.0;
const RETRY_RATIO: f64 = 0.2;

pub fn retry_budget_deposit() {
    RETRY_TOKENS.with(|t| t.set((t.get() + RETRY_RATIO).min(RETRY_BURST)));
}

/// Takes a retry token; false when the budget is spent.
pub fn retry_budget_take() -> bool {
    RETRY_TOKENS.with(|t| {
        if t.get() >= 1.0 {
            t.set(t.get() - 1.0);
            true
        } else {
            false
        }
    })
}
