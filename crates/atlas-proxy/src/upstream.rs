//! Choosing an upstream and getting a connection to it: from the worker's
//! pool when allowed, else a fresh connect under the connect timeout; a
//! failed connect moves on to another upstream (each tried at most once).

use std::net::SocketAddr;

use atlas_balance::GroupShared;
use monoio::net::TcpStream;

use crate::error::{ProxyError, Side};
use crate::ListenerCtx;

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
    pub conn: TcpStream,
    /// Came from the keep-alive pool (may have been closed by the upstream).
    pub reused: bool,
}

/// Picks an upstream not in `excluded` and connects. Failed upstreams are
/// added to `excluded`, so the caller can continue the same exclusion set.
pub async fn connect(ctx: &ListenerCtx, hash: u64, excluded: &mut u64, use_pool: bool) -> Result<Connected, ProxyError> {
    let (Some(group), Some(picker)) = (&ctx.group, &ctx.picker) else {
        return Err(ProxyError::new(Side::Config, false, "listener has no upstream group"));
    };
    let attempts = group.len().clamp(1, 3);
    let mut last = ProxyError::new(Side::Config, true, "no usable upstream");
    for _ in 0..attempts {
        let Some(idx) = picker.borrow_mut().pick(group, hash, *excluded) else {
            break;
        };
        let addr = group.addrs[idx];
        if use_pool {
            if let Some(conn) = ctx.pool.take(addr) {
                return Ok(Connected { idx, addr, conn, reused: true });
            }
        }
        match monoio::time::timeout(ctx.timeouts.connect, TcpStream::connect_addr(addr)).await {
            Ok(Ok(conn)) => {
                let _ = conn.set_nodelay(true);
                return Ok(Connected { idx, addr, conn, reused: false });
            }
            Ok(Err(e)) => {
                crate::log_limited(|| tracing::warn!(upstream = %group.names[idx], %addr, error = %e, "upstream connect failed"));
                last = ProxyError::io(Side::Upstream, true, "connect failed", e);
            }
            Err(_) => {
                crate::log_limited(|| tracing::warn!(upstream = %group.names[idx], %addr, "upstream connect timed out"));
                last = ProxyError::new(Side::Upstream, true, "connect timed out");
            }
        }
        if idx < 64 {
            *excluded |= 1 << idx;
        }
    }
    Err(last)
}
