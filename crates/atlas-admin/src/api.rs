//! JSON documents of the read API (status, listeners, upstreams, events)
//! and the operator's drain/enable action.

use atlas_observe::metrics::{self, HistogramSnapshot, ListenerSnapshot, Reject, UpstreamSnapshot, CLASSES};
use serde_json::{json, Map, Value};

use crate::{error, reply, AdminState, Reply};

fn by_class(counts: &[u64; 6]) -> Value {
    let mut m = Map::new();
    for (name, n) in CLASSES.iter().zip(counts) {
        m.insert((*name).to_string(), (*n).into());
    }
    Value::Object(m)
}

/// p50/p90/p99 and mean in milliseconds (null without observations).
fn latency(h: &HistogramSnapshot) -> Value {
    let ms = |q: f64| h.quantile_us(q).map(|us| (us / 10.0).round() / 100.0);
    let n = h.count();
    json!({
        "p50": ms(0.5),
        "p90": ms(0.9),
        "p99": ms(0.99),
        "mean": if n > 0 { Some(((h.sum_us as f64 / n as f64) / 10.0).round() / 100.0) } else { None },
        "count": n,
    })
}

pub fn status(state: &AdminState) -> Value {
    let g = state.current.load();
    let listeners: Vec<Value> = g
        .cfg
        .listeners
        .iter()
        .map(|l| json!({ "name": l.name, "address": state.bound_addr(&l.name, l.addr).to_string(), "mode": l.mode.as_str(), "tls": l.tls.is_some() }))
        .collect();
    let r = metrics::registry();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": state.started.elapsed().as_secs(),
        "config_file": state.config_path.as_ref().map(|p| p.display().to_string()),
        "config_version": g.version,
        "last_reload": state.last_reload.lock().map(|v| v.clone()).unwrap_or(Value::Null),
        "reloads": { "ok": r.reloads_ok.load(std::sync::atomic::Ordering::Relaxed), "failed": r.reloads_failed.load(std::sync::atomic::Ordering::Relaxed) },
        "driver": state.driver,
        "workers": g.cfg.workers,
        "draining": atlas_proxy::drain::process_drain_requested(),
        "listeners": listeners,
    })
}

pub fn listeners(state: &AdminState) -> Value {
    let g = state.current.load();
    let snaps = metrics::registry().listeners();
    let empty = ListenerSnapshot::default();
    let out: Vec<Value> = g
        .cfg
        .listeners
        .iter()
        .map(|l| {
            let s = snaps.iter().find(|(n, _)| *n == l.name).map(|x| &x.1).unwrap_or(&empty);
            let mut rejected = Map::new();
            for r in Reject::ALL {
                rejected.insert(r.as_str().into(), s.rejected[r as usize].into());
            }
            json!({
                "name": l.name,
                "address": state.bound_addr(&l.name, l.addr).to_string(),
                "mode": l.mode.as_str(),
                "tls": l.tls.is_some(),
                "access_log": l.access_log.as_ref().map(|a| a.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "stdout".into())),
                "skim": l.skim.enabled(),
                "connections_active": s.connections_active.max(0),
                "connections_total": s.connections_total,
                "requests_total": s.requests.iter().sum::<u64>(),
                "requests": by_class(&s.requests),
                "bytes_in": s.bytes_in,
                "bytes_out": s.bytes_out,
                "retries": s.retries,
                "rejected": rejected,
                "latency_ms": latency(&s.latency),
            })
        })
        .collect();
    json!({ "listeners": out })
}

pub fn upstreams(state: &AdminState) -> Value {
    let g = state.current.load();
    let snaps = metrics::registry().upstreams();
    let mut out = Vec::new();
    for group in &g.shared.groups {
        for i in 0..group.len() {
            let c = group.inflight.counters(i);
            // Summed over the listeners that send traffic to it.
            let mut s = UpstreamSnapshot::default();
            for (k, v) in &snaps {
                if k.group == group.name && k.upstream == group.names[i] {
                    s.add(v);
                }
            }
            out.push(json!({
                "name": group.names[i],
                "group": group.name,
                "address": group.addrs[i].to_string(),
                "weight": group.weights[i],
                "max_conns": group.max_conns[i],
                "health": if c.is_healthy() { "up" } else { "down" },
                "drained": c.is_drained(),
                "in_flight": c.total(),
                "requests": s.requests(),
                "responses": by_class(&s.responses),
                "errors": s.errors,
                "latency_ms": latency(&s.latency),
                "pool_hits": s.pool_hits,
                "pool_misses": s.pool_misses,
            }));
        }
    }
    json!({ "upstreams": out })
}

pub fn events(limit: usize) -> Value {
    let list: Vec<Value> = atlas_observe::events::recent(limit)
        .into_iter()
        .map(|e| json!({ "seq": e.seq, "time_ms": e.at_ms, "level": e.level, "kind": e.kind, "message": e.message }))
        .collect();
    json!({ "events": list, "dropped": atlas_observe::events::dropped() })
}

/// The optional JSON body of `drain` / `enable`: `{"reason": "..."}`,
/// recorded in the events and the log. Anything else is a 400 that names
/// the problem.
pub fn action_reason(body: &[u8]) -> Result<Option<String>, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| error(400, format!("malformed JSON body: {e}")))?;
    let Value::Object(map) = v else { return Err(error(400, "the JSON body must be an object such as {\"reason\": \"maintenance\"}")) };
    let mut reason = None;
    for (k, v) in map {
        match (k.as_str(), v) {
            ("reason", Value::String(r)) => reason = Some(r.chars().take(200).collect()),
            ("reason", Value::Null) => {}
            ("reason", _) => return Err(error(400, "`reason` must be a string")),
            (other, _) => return Err(error(400, format!("unknown field `{other}`; expected `reason`"))),
        }
    }
    Ok(reason)
}

/// Drains or enables every upstream called `name` (in any group).
pub fn set_drained(state: &AdminState, name: &str, drained: bool, reason: Option<&str>) -> Reply {
    let g = state.current.load();
    let mut found = 0;
    for group in &g.shared.groups {
        for i in 0..group.len() {
            if group.names[i] == name {
                found += 1;
                if group.inflight.counters(i).set_drained(drained) {
                    let verb = if drained { "drained" } else { "enabled" };
                    let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
                    tracing::info!(upstream = name, reason, "upstream {verb} by the admin API");
                    atlas_observe::events::record("info", "upstream", format!("{name} {verb} by the admin API{why}"));
                }
            }
        }
    }
    if found == 0 {
        return error(404, format!("no upstream named `{name}`"));
    }
    reply(200, json!({ "upstream": name, "drained": drained, "reason": reason }))
}
