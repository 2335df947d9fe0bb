//! The game routes of the REST API (served by `atlas-admin` on `[api]
//! address`, under its access control): Horizon's registration calls
//! exactly as in the spec, the seed's older routes, and Atlas's own.
//!
//! | route | |
//! |---|---|
//! | `POST /api/v1/servers/register` | Horizon registration |
//! | `PUT /api/v1/servers/{id}/heartbeat` | heartbeat; the answer carries commands |
//! | `DELETE /api/v1/servers/{id}` | unregister |
//! | `GET /api/v1/servers`, `GET /api/v1/servers/{id}` | the registry |
//! | `POST /api/v1/servers/{id}/drain`, `/enable` | move players off a server / back |
//! | `GET /api/v1/players` | players, their server and position |
//! | `POST /api/v1/transfers` | `{"player_id", "server_id"}`: force a transfer |
//! | `GET /api/v1/world` | regions, servers, players, recent transfers (dashboard map) |
//! | `GET /servers`, `POST /servers/register`, `DELETE /servers/{id}`, `GET /servers/{id}/stats`, `POST /transfer` | seed 000's routes |
//!
//! Bodies are JSON; a malformed one gets a 400 naming the problem and
//! changes nothing. Horizon only treats 200/201 as success.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::position::Point;
use crate::registry::{registry, Beat, Registration};

/// Whether a route reads or changes state (for access control).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

#[derive(Deserialize)]
struct Xyz<T> {
    x: T,
    y: T,
    z: T,
}

#[derive(Deserialize)]
struct HorizonRegister {
    name: String,
    address: String,
    region_coord: Xyz<i64>,
    center: Xyz<f64>,
    bounds: f64,
    capacity: u32,
    #[serde(default)]
    version: String,
    #[serde(default)]
    metadata: Value,
}

#[derive(Deserialize)]
struct SeedRegister {
    server_id: String,
    address: String,
    region: Xyz<i64>,
    center: Xyz<f64>,
    bounds_size: f64,
    #[serde(default = "default_capacity")]
    capacity: u32,
}

fn default_capacity() -> u32 {
    1000
}

#[derive(Deserialize)]
struct Heartbeat {
    #[serde(default)]
    current_connections: u64,
    #[serde(default)]
    load: f64,
    #[serde(default = "yes")]
    accepting_connections: bool,
    #[serde(default)]
    avg_tick_ms: f64,
    #[serde(default)]
    memory_bytes: u64,
    /// Room gateway: players per room on this server.
    #[serde(default)]
    rooms: Option<std::collections::HashMap<String, u32>>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct TransferReq {
    player_id: String,
    #[serde(alias = "target_server", alias = "server")]
    server_id: String,
}

/// The route's access class, or `None` when `path` is not a game route.
pub fn access(method: &str, path: &str) -> Option<Access> {
    let game = path == "/servers"
        || path.starts_with("/servers/")
        || path == "/transfer"
        || path == "/api/v1/servers"
        || path.starts_with("/api/v1/servers/")
        || path == "/api/v1/players"
        || path == "/api/v1/transfers"
        || path == "/api/v1/world";
    game.then_some(if method == "GET" || method == "HEAD" { Access::Read } else { Access::Write })
}

fn bad(msg: impl Into<String>) -> (u16, Value) {
    (400, json!({"success": false, "error": msg.into(), "message": "bad request"}))
}

fn not_found(msg: impl Into<String>) -> (u16, Value) {
    let m = msg.into();
    (404, json!({"success": false, "error": m, "message": m}))
}

fn method_not_allowed(method: &str, path: &str, allowed: &str) -> (u16, Value) {
    (405, json!({"success": false, "error": format!("{method} is not allowed on {path}; use {allowed}")}))
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, (u16, Value)> {
    if body.is_empty() {
        return Err(bad("a JSON body is required"));
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

fn point(p: &Xyz<f64>) -> Point {
    Point { x: p.x, y: p.y, z: p.z }
}

/// Serves a game route (call [`access`] first).
pub fn handle(method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let reg = registry();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        (m, ["api", "v1", "servers", "register"] | ["servers", "register"]) if m != "POST" => method_not_allowed(method, path, "POST"),
        ("POST", ["api", "v1", "servers", "register"]) => {
            let r: HorizonRegister = match parse(body) {
                Ok(r) => r,
                Err(e) => return e,
            };
            let reg_in = Registration {
                id: None,
                name: r.name,
                address: r.address,
                region: [r.region_coord.x, r.region_coord.y, r.region_coord.z],
                center: point(&r.center),
                bounds: r.bounds,
                capacity: r.capacity,
                version: r.version,
                metadata: r.metadata,
            };
            match reg.register(reg_in) {
                Ok((s, renewed)) => (
                    200,
                    json!({
                        "success": true, "server_id": s.id,
                        "message": if renewed { "re-registered" } else { "registered" },
                        "heartbeat_interval_secs": reg.settings().spatial.heartbeat_interval.as_secs().max(1),
                        "adjacent_servers": reg.adjacent(&s),
                    }),
                ),
                Err(e) => bad(e),
            }
        }
        ("POST", ["servers", "register"]) => {
            let r: SeedRegister = match parse(body) {
                Ok(r) => r,
                Err(e) => return e,
            };
            if r.server_id.is_empty() || r.server_id.contains('/') {
                return bad("`server_id` must be non-empty and contain no `/`");
            }
            let reg_in = Registration {
                id: Some(r.server_id.clone()),
                name: r.server_id,
                address: r.address,
                region: [r.region.x, r.region.y, r.region.z],
                center: point(&r.center),
                // The seed's `bounds_size` is the cube's edge.
                bounds: r.bounds_size / 2.0,
                capacity: r.capacity,
                version: String::new(),
                metadata: Value::Null,
            };
            match reg.register(reg_in) {
                Ok((s, _)) => (200, json!({"success": true, "server_id": s.id, "message": "registered"})),
                Err(e) => bad(e),
            }
        }
        ("PUT" | "POST", ["api", "v1", "servers", id, "heartbeat"]) => {
            let hb: Heartbeat = if body.is_empty() {
                Heartbeat { current_connections: 0, load: 0.0, accepting_connections: true, avg_tick_ms: 0.0, memory_bytes: 0, rooms: None }
            } else {
                match parse(body) {
                    Ok(h) => h,
                    Err(e) => return e,
                }
            };
            let beat = Beat {
                current_connections: hb.current_connections,
                load: hb.load,
                accepting: hb.accepting_connections,
                avg_tick_ms: hb.avg_tick_ms,
                memory_bytes: hb.memory_bytes,
            };
            match reg.heartbeat(id, &beat) {
                Some(mut commands) => {
                    let r = crate::rooms::rooms();
                    if let Some(rooms) = &hb.rooms {
                        if let Err(e) = r.store().report(id, rooms, atlas_observe::now_ms()) {
                            tracing::debug!(server = %id, error = %e, "store: room report not recorded");
                        }
                    }
                    commands.extend(r.announcements(id));
                    (200, json!({"success": true, "message": "ok", "commands": commands}))
                }
                None => not_found(format!("unknown server `{id}`: register again")),
            }
        }
        (_, ["api", "v1", "servers", _, "heartbeat"]) => method_not_allowed(method, path, "PUT"),
        ("DELETE", ["api", "v1", "servers", id] | ["servers", id]) => {
            if reg.unregister(id) {
                // The fleet forgets it now, not when its lease runs out, and
                // its rooms move now.
                let r = crate::rooms::rooms();
                let _ = r.store().remove_server(id);
                r.migrate_from(id);
                (200, json!({"success": true, "message": "unregistered"}))
            } else {
                not_found(format!("unknown server `{id}`"))
            }
        }
        ("GET" | "HEAD", ["api", "v1", "servers"]) => (200, json!({"servers": reg.servers_json()})),
        ("GET" | "HEAD", ["servers"]) => (200, Value::Array(reg.servers_json())),
        ("GET" | "HEAD", ["api", "v1", "servers", id] | ["servers", id, "stats"]) => match reg.server_json(id) {
            Some(v) => (200, v),
            None => not_found(format!("unknown server `{id}`")),
        },
        ("POST", ["api", "v1", "servers", id, verb @ ("drain" | "enable")]) => {
            if reg.set_draining(id, *verb == "drain") {
                (200, json!({"success": true, "server_id": id, "status": if *verb == "drain" { "draining" } else { "up" }}))
            } else {
                not_found(format!("unknown server `{id}`"))
            }
        }
        ("GET" | "HEAD", ["api", "v1", "players"]) => (200, json!({"players": players_json()})),
        ("POST", ["api", "v1", "transfers"] | ["transfer"]) => {
            let t: TransferReq = match parse(body) {
                Ok(t) => t,
                Err(e) => return e,
            };
            match reg.force_transfer(&t.player_id, &t.server_id) {
                Ok(()) => (202, json!({"success": true, "message": "transfer requested", "player_id": t.player_id, "server_id": t.server_id})),
                Err(e) => not_found(e),
            }
        }
        ("GET" | "HEAD", ["api", "v1", "world"]) => (200, world_json()),
        (_, ["api", "v1", "transfers"] | ["transfer"]) => method_not_allowed(method, path, "POST"),
        _ => not_found(format!("no route for {method} {path}")),
    }
}

fn num(f: f64) -> Value {
    if f.is_finite() {
        json!(f)
    } else {
        Value::Null
    }
}

fn players_json() -> Vec<Value> {
    let mut list: Vec<Value> = registry()
        .players()
        .iter()
        .map(|p| {
            let pos = p.position();
            json!({"player_id": p.id, "server_id": p.server(), "position": {"x": num(pos.x), "y": num(pos.y), "z": num(pos.z)}, "since_ms": p.since_ms})
        })
        .collect();
    list.sort_by(|a, b| a["player_id"].as_str().cmp(&b["player_id"].as_str()));
    list
}

/// Everything the dashboard's map draws.
pub fn world_json() -> Value {
    let reg = registry();
    let transfers: Vec<Value> = reg
        .recent_transfers(30)
        .iter()
        .map(|t| json!({"at_ms": t.at_ms, "player_id": t.player, "from": t.from, "to": t.to, "switch_us": t.switch_us, "ok": t.ok, "reason": t.reason}))
        .collect();
    let s = reg.settings();
    let st = crate::stats::stats();
    let sum = |f: &dyn Fn(&crate::stats::GameStats) -> u64| st.iter().map(f).sum::<u64>();
    let mut h = atlas_observe::metrics::HistogramSnapshot::default();
    st.iter().for_each(|x| h.merge(&x.switch_time));
    let ms = |q: f64| h.quantile_us(q).map(|us| us / 1000.0);
    json!({
        "region_size": s.spatial.region_size,
        "servers": reg.servers_json(),
        "players": players_json(),
        "transfers": transfers,
        "totals": {
            "players": st.iter().map(|x| x.sessions.get()).sum::<i64>(),
            "transfers_ok": sum(&|x| x.transfers_ok.get()),
            "transfers_failed": sum(&|x| x.transfers_failed.get()),
            "switch_ms": {"p50": ms(0.5), "p99": ms(0.99)},
            "preconnects": sum(&|x| x.preconnects.get()),
            "preconnect_hits": sum(&|x| x.preconnect_hits.get()),
            "heartbeats": reg.heartbeats.load(std::sync::atomic::Ordering::Relaxed),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_classes() {
        assert_eq!(access("GET", "/servers"), Some(Access::Read));
        assert_eq!(access("PUT", "/api/v1/servers/x/heartbeat"), Some(Access::Write));
        assert_eq!(access("POST", "/transfer"), Some(Access::Write));
        assert_eq!(access("GET", "/api/v1/upstreams"), None);
        assert_eq!(access("GET", "/serversx"), None);
    }

    #[test]
    fn malformed_bodies_change_nothing() {
        let before = registry().servers_json().len();
        for body in [
            &b""[..],
            b"{",
            b"[]",
            br#"{"name":"x"}"#,
            br#"{"name":"x","address":"127.0.0.1:1","region_coord":{"x":0,"y":0,"z":0},"center":{"x":0,"y":0,"z":0},"bounds":-1,"capacity":1}"#,
        ] {
            let (status, v) = handle("POST", "/api/v1/servers/register", body);
            assert_eq!(status, 400, "{v}");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        assert_eq!(registry().servers_json().len(), before);
        assert_eq!(handle("PUT", "/api/v1/servers/nope/heartbeat", b"{}").0, 404);
        assert_eq!(handle("GET", "/api/v1/servers/register", b"").0, 405);
    }
}
