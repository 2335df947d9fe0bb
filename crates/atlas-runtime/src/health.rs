//! Active health checks, off the workers' hot path: one thread with its own
//! monoio runtime checks every upstream of the current configuration each
//! `interval` (all checks of a round run concurrently), counts consecutive
//! results, and flips an upstream's published health only after `fall`
//! failures or `rise` successes, so one lost probe does not flap it. A
//! transition is logged once. Workers read the verdict from the upstream's
//! shared state on each pick.
//!
//! Checks: `tcp` (connect within `timeout`) or `http` (`GET path`, status
//! must equal `expect_status`). Upstreams reached over TLS are checked with
//! a TCP connect. With `check = "none"` every upstream is considered up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use atlas_balance::UpstreamCounters;
use atlas_config::{Health, HealthCheck};
use atlas_proxy::io::{read_more, write_vec};
use monoio::net::TcpStream;

use crate::Current;

struct Tracked {
    name: String,
    addr: SocketAddr,
    tls: bool,
    state: Arc<UpstreamCounters>,
}

#[derive(Default)]
struct Streak {
    ok: u32,
    fail: u32,
}

async fn probe(addr: SocketAddr, host: String, tls: bool, h: Health) -> Result<(), String> {
    let work = async {
        let mut s = TcpStream::connect_addr(addr).await.map_err(|e| format!("connect: {e}"))?;
        if h.check == HealthCheck::Tcp || tls {
            return Ok(());
        }
        let mut req = format!("GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: atlas-health\r\nConnection: close\r\n\r\n", h.path).into_bytes();
        write_vec(&mut s, &mut req).await.map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(_)) => {
                    let code = resp.code.unwrap_or(0);
                    return if code == h.expect_status { Ok(()) } else { Err(format!("status {code}, expected {}", h.expect_status)) };
                }
                Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => {}
                _ => return Err("malformed response".into()),
            }
            match read_more(&mut s, &mut buf, 17 * 1024).await {
                Ok(0) => return Err("closed before answering".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    };
    match monoio::time::timeout(h.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", h.timeout)),
    }
}

/// Starts the checker thread. It follows configuration reloads.
pub fn spawn(current: Current) {
    let started = std::thread::Builder::new().name("atlas-health".into()).spawn(move || {
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build();
        let mut rt = match rt {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "internal: cannot start the health checker");
                return;
            }
        };
        rt.block_on(run(current));
    });
    if let Err(e) = started {
        tracing::error!(error = %e, "internal: cannot start the health checker");
    }
}

async fn run(current: Current) {
    let mut streaks: HashMap<usize, Streak> = HashMap::new();
    loop {
        let gen = current.load_full();
        let h = gen.cfg.health.clone();
        let mut tracked: Vec<Tracked> = Vec::new();
        for (g, tls) in gen.shared.groups.iter().zip(&gen.shared.group_tls) {
            for i in 0..g.len() {
                let state = g.inflight.counters(i).clone();
                if tracked.iter().any(|t| Arc::ptr_eq(&t.state, &state)) {
                    continue;
                }
                tracked.push(Tracked { name: g.names[i].clone(), addr: g.addrs[i], tls: tls.get(i).is_some_and(Option::is_some), state });
            }
        }
        streaks.retain(|k, _| tracked.iter().any(|t| Arc::as_ptr(&t.state) as usize == *k));
        if h.check == HealthCheck::None {
            for t in &tracked {
                if t.state.set_healthy(true) {
                    tracing::info!(upstream = %t.name, addr = %t.addr, "upstream UP (health checks turned off)");
                }
            }
            monoio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let handles: Vec<_> = tracked.iter().map(|t| monoio::spawn(probe(t.addr, t.addr.to_string(), t.tls, h.clone()))).collect();
        for (t, handle) in tracked.iter().zip(handles) {
            let result = handle.await;
            let s = streaks.entry(Arc::as_ptr(&t.state) as usize).or_default();
            match result {
                Ok(()) => {
                    s.ok += 1;
                    s.fail = 0;
                    if s.ok >= h.rise && t.state.set_healthy(true) {
                        tracing::info!(upstream = %t.name, addr = %t.addr, "upstream UP after {} good checks", s.ok);
                        atlas_observe::events::record("info", "health", format!("{} ({}) UP after {} good checks", t.name, t.addr, s.ok));
                    }
                }
                Err(why) => {
                    s.fail += 1;
                    s.ok = 0;
                    if s.fail >= h.fall && t.state.set_healthy(false) {
                        tracing::warn!(upstream = %t.name, addr = %t.addr, reason = %why, "upstream DOWN after {} failed checks", s.fail);
                        atlas_observe::events::record("error", "health", format!("{} ({}) DOWN after {} failed checks: {why}", t.name, t.addr, s.fail));
                    }
                }
            }
        }
        monoio::time::sleep(h.interval).await;
    }
}
