//! The skim endpoints: recent samples as JSON lines, a live stream of them
//! as server-sent events, and rates computed from them.
//!
//! - `GET /api/v1/skim?listener=NAME[&limit=N][&since=SEQ]`: JSON lines
//!   (`application/x-ndjson`), oldest first: the latest `limit` (default
//!   100, at most 10 000) or those after sequence number `since`.
//! - the same with `follow=1` or `Accept: text/event-stream`: an SSE
//!   stream (`event: sample`, `id:` the sequence number, so a reconnecting
//!   EventSource resumes with `Last-Event-ID`) until the client goes.
//! - `GET /api/v1/skim/rates?listener=NAME[&window=SECS]`: requests and
//!   bytes per second, status classes, top paths and top clients over the
//!   last `window` seconds (default 10, at most 60), and the counts of
//!   samples taken and dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atlas_observe::skim::{self, Tap};
use monoio::net::TcpStream;

use crate::{error, param, AdminState, Body, Reply, Req};

/// The tap a request names, or the error to answer.
fn tap_for(state: &AdminState, req: &Req) -> Result<Arc<Tap>, Reply> {
    let g = state.current.load();
    let skimmed: Vec<&str> = g.cfg.listeners.iter().filter(|l| l.skim.enabled()).map(|l| l.name.as_str()).collect();
    let Some(name) = param(req, "listener") else {
        return Err(error(
            400,
            format!("`listener` is required; listeners with a skim tap: {}", if skimmed.is_empty() { "none".into() } else { skimmed.join(", ") }),
        ));
    };
    if !g.cfg.listeners.iter().any(|l| l.name == name) {
        return Err(error(404, format!("no listener named `{name}`")));
    }
    if !skimmed.contains(&name.as_str()) {
        return Err(error(404, format!("listener `{name}` has no skim tap: set `skim = true` on it (or on one of its routes) and reload")));
    }
    skim::find(&name).ok_or_else(|| error(503, format!("the skim tap of `{name}` is not running yet")))
}

fn number(req: &Req, key: &str, default: u64) -> Result<u64, Reply> {
    match param(req, key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| error(400, format!("`{key}` must be a non-negative integer, got `{v}`"))),
    }
}

pub fn samples(state: &AdminState, req: &Req) -> Reply {
    let tap = match tap_for(state, req) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let (since, limit) = match (number(req, "since", 0), number(req, "limit", 100)) {
        (Ok(s), Ok(l)) => (s, l.clamp(1, skim::HISTORY as u64) as usize),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let follow = param(req, "follow").is_some_and(|v| v == "1" || v == "true") || req.accept.as_deref().is_some_and(|a| a.contains("text/event-stream"));
    if follow {
        let since = req.last_event_id.or(param(req, "since").and_then(|v| v.parse().ok())).unwrap_or_else(|| tap.last_seq());
        return Reply { status: 200, body: Body::Sse(tap, since), extra: "" };
    }
    let mut out = String::new();
    for (seq, s) in tap.samples(since, limit) {
        out.push_str(&s.to_json(seq, &tap.listener));
        out.push('\n');
    }
    Reply { status: 200, body: Body::Raw("application/x-ndjson", out.into_bytes()), extra: "" }
}

pub fn rates(state: &AdminState, req: &Req) -> Reply {
    let tap = match tap_for(state, req) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match number(req, "window", 10) {
        Ok(w) => crate::reply(200, tap.rates(w)),
        Err(r) => r,
    }
}

/// Streams samples after `since` as server-sent events until the client
/// goes away or the process drains.
pub async fn stream(s: &mut TcpStream, tap: Arc<Tap>, mut since: u64) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\n\r\nretry: 1000\n\n";
    let mut out = head.as_bytes().to_vec();
    if atlas_proxy::io::write_vec(s, &mut out).await.is_err() {
        return;
    }
    let mut quiet_since = Instant::now();
    loop {
        out.clear();
        for (seq, sample) in tap.samples(since, 500) {
            out.extend_from_slice(format!("id: {seq}\nevent: sample\ndata: {}\n\n", sample.to_json(seq, &tap.listener)).as_bytes());
            since = seq;
        }
        if out.is_empty() && quiet_since.elapsed() >= Duration::from_secs(10) {
            // A comment line: keeps proxies from timing out, and finds a gone client.
            out.extend_from_slice(b": keep-alive\n\n");
        }
        if !out.is_empty() {
            quiet_since = Instant::now();
            if atlas_proxy::io::write_vec(s, &mut out).await.is_err() {
                return;
            }
        }
        if atlas_proxy::drain::process_drain_requested() {
            return;
        }
        monoio::time::sleep(Duration::from_millis(200)).await;
    }
}
