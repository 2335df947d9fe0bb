//! The Atlas data path: what happens to a connection after accept.
//!
//! - `http`: the HTTP/1.1 reverse proxy (codec, chunked scanner, session).
//! - `tcp`: layer-4 passthrough with half-close (bulk transfers spliced on plain sockets).
//! - `upstream`: picking and connecting to an upstream, in-flight accounting.
//! - `pool`: per-worker keep-alive pool of upstream connections.
//! - `io`: buffers and byte pipes over monoio's owned-buffer I/O.
//!
//! Handlers are generic over the client stream (`AsyncReadRent +
//! AsyncWriteRent + Split`), so the same code serves plain TCP and TLS.

pub mod drain;
pub mod error;
pub mod fuzzing;
pub mod handshake;
pub mod http;
pub mod io;
pub mod limits;
pub mod pool;
pub mod static_files;
pub mod tcp;
pub mod tls;
pub mod tls_stream;
pub mod upstream;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use atlas_config::{HashKey, Limits, Mode, Timeouts};
use atlas_observe::access_log::AccessLog;
use atlas_observe::metrics::ListenerStats;
use atlas_observe::skim::Tap;
use atlas_observe::PerWorker;

pub use error::{ProxyError, Side};
pub use upstream::Upstreams;

/// Where a request (or a TCP connection) goes.
pub enum Target {
    Upstreams(Upstreams),
    Static(static_files::StaticSite),
}

/// A `[[routes]]` entry as a worker uses it.
pub struct Route {
    pub prefix: String,
    pub target: Target,
    /// Requests on this route are skimmed.
    pub skim: bool,
}

/// A listener's traffic tap.
pub struct Skim {
    pub tap: Arc<Tap>,
    /// Every request is sampled (else only those of skimming routes).
    pub all: bool,
    pub payload_bytes: usize,
}

/// Everything a connection handler needs, built per worker and listener.
pub struct ListenerCtx {
    pub worker: usize,
    pub name: String,
    pub mode: Mode,
    /// `http` or `https`: the value of `X-Forwarded-Proto`.
    pub proto: &'static str,
    /// TLS termination for this listener.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Where requests go when no route matches (`None`: nowhere, 503).
    pub default: Option<Target>,
    /// `[[routes]]`, longest prefix first.
    pub routes: Vec<Route>,
    /// Set when a strategy is `hash`.
    pub hash_key: Option<HashKey>,
    pub pool: Rc<pool::ConnPool>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// This listener's open connections (all workers) and their limit.
    pub conns: limits::ListenerConns,
    /// The listener's figures, one slot per worker (kept across reloads).
    pub stats: Arc<PerWorker<ListenerStats>>,
    pub access_log: Option<AccessLog>,
    pub skim: Option<Skim>,
    /// Set by a reload: the context that replaces this one. Connections
    /// follow it at their next request; in-flight requests finish on the
    /// context they started with.
    pub next: RefCell<Option<Rc<ListenerCtx>>>,
}

impl ListenerCtx {
    /// The newest context that replaced `ctx`, if a reload happened.
    pub fn latest(ctx: &Rc<ListenerCtx>) -> Option<Rc<ListenerCtx>> {
        let mut cur = ctx.next.borrow().clone()?;
        loop {
            let next = cur.next.borrow().clone();
            match next {
                Some(n) => cur = n,
                None => return Some(cur),
            }
        }
    }

    /// The target for a request path (the longest matching route, else the
    /// default) and whether the request is skimmed.
    pub fn route(&self, path: &[u8]) -> Option<(&Target, bool)> {
        let all = self.skim.as_ref().is_some_and(|s| s.all);
        match self.routes.iter().find(|r| path.starts_with(r.prefix.as_bytes())) {
            Some(r) => Some((&r.target, all || r.skim)),
            None => self.default.as_ref().map(|t| (t, all)),
        }
    }

    /// This worker's slot of the listener's figures.
    #[inline]
    pub fn stats(&self) -> &ListenerStats {
        self.stats.slot(self.worker)
    }

    /// The listener's own upstreams (TCP mode), if any.
    pub fn upstreams(&self) -> Option<&Upstreams> {
        match &self.default {
            Some(Target::Upstreams(u)) => Some(u),
            _ => None,
        }
    }
}

thread_local! {
    static LAST_WARN: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    static SUPPRESSED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs `log` at most once per second per worker, so an outage produces a
/// steady trickle of warnings instead of one per request. The number of
/// warnings dropped since the last one is logged with the next.
pub fn log_limited(log: impl FnOnce()) {
    let now = std::time::Instant::now();
    let due = LAST_WARN.with(|l| l.get().is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1)));
    if due {
        LAST_WARN.with(|l| l.set(Some(now)));
        let dropped = SUPPRESSED.with(|s| s.replace(0));
        if dropped > 0 {
            tracing::warn!(dropped, "similar warnings suppressed in the last second");
        }
        log();
    } else {
        SUPPRESSED.with(|s| s.set(s.get() + 1));
    }
}
