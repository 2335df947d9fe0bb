//! Per-worker keep-alive pool of upstream connections.
//!
//! Owned by one worker thread (no lock). Keyed by upstream address so that a
//! reload that keeps an upstream keeps its warm connections. Idle connections
//! are reused most-recent first (the warmest, least likely to have been
//! closed by the upstream's own idle timer); each is closed once older than
//! `idle_timeout`, and at most `max_idle` are kept per upstream. TLS and
//! plain connections to the same address are kept apart. A pooled
//! connection the upstream closed meanwhile is caught by the proxy's retry of
//! a replayable request on a fresh connection.
//!
//! The map is hashed with FxHash: its keys are upstream addresses from the
//! configuration, never chosen by a client, and SipHash on every take and
//! put was about 2 % of a proxied request's instructions.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::upstream::UpstreamConn;

pub struct ConnPool {
    idle: RefCell<HashMap<(SocketAddr, bool), Vec<(UpstreamConn, Instant)>, BuildHasherDefault<fxhash::FxHasher>>>,
    max_idle: Cell<usize>,
    idle_timeout: Cell<Duration>,
    /// Reuse counters (hits, misses), read by metrics later.
    pub hits: Cell<u64>,
    pub misses: Cell<u64>,
}

impl ConnPool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        ConnPool {
            idle: RefCell::new(HashMap::default()),
            max_idle: Cell::new(max_idle),
            idle_timeout: Cell::new(idle_timeout),
            hits: Cell::new(0),
            misses: Cell::new(0),
        }
    }

    /// New limits after a reload; existing idle connections stay.
    pub fn set_limits(&self, max_idle: usize, idle_timeout: Duration) {
        self.max_idle.set(max_idle);
        self.idle_timeout.set(idle_timeout);
    }

    /// A live-looking idle connection to `addr` (TLS or not), if any.
    pub fn take(&self, addr: SocketAddr, tls: bool) -> Option<UpstreamConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&(addr, tls))?;
        let now = Instant::now();
        while let Some((conn, since)) = list.pop() {
            if now.duration_since(since) < self.idle_timeout.get() {
                self.hits.set(self.hits.get() + 1);
                return Some(conn);
            }
            // The rest are older still.
            list.clear();
            drop(conn);
        }
        self.misses.set(self.misses.get() + 1);
        None
    }

    pub fn put(&self, addr: SocketAddr, tls: bool, conn: UpstreamConn) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry((addr, tls)).or_default();
        if list.len() >= self.max_idle.get() {
            // Drop the oldest: keep the warm end.
            if list.is_empty() {
                return;
            }
            list.remove(0);
        }
        list.push((conn, Instant::now()));
    }

    /// Closes connections idle for longer than the timeout.
    pub fn sweep(&self) {
        let now = Instant::now();
        let timeout = self.idle_timeout.get();
        self.idle.borrow_mut().retain(|_, list| {
            list.retain(|(_, since)| now.duration_since(*since) < timeout);
            !list.is_empty()
        });
    }

    pub fn idle_count(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum()
    }
}
