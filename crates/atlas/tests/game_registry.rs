//! Game server registry end to end: real WebSocket game servers
//! (tests/support/game.rs) register with the Atlas API the way Horizon does
//! (and the way seed 000's servers did), heartbeat, miss heartbeats, get
//! drained and re-enabled; the registry survives a restart through its
//! snapshot; the API's access control guards it; the embedded default
//! config and the `ATLAS_*` environment overrides start a working gateway;
//! `--check` names every bad `[spatial]` key; `/metrics` reflects it all.
//!
//! Every test runs the real binary on ephemeral ports and talks plain
//! HTTP/1.1 and WebSocket to it.

mod common;
#[path = "support/game.rs"]
mod game;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Atlas;
use game::{http_json, http_raw, move_msg, wait_for, GameServer, WsClient};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A game listener and its API on ephemeral ports; `spatial` goes into
/// `[spatial]` (after `region_size`), `api` into `[api]`.
fn config_with(spatial: &str, api: &str) -> String {
    format!("[listen]\naddress = \"127.0.0.1:0\"\nmode = \"game\"\n\n[api]\naddress = \"127.0.0.1:0\"\n{api}\n\n[spatial]\nregion_size = 1000.0\n{spatial}\n")
}

fn config(spatial: &str) -> String {
    config_with(spatial, "")
}

fn api(atlas: &Atlas) -> SocketAddr {
    atlas.api.expect("the API address")
}

/// One JSON call; panics on a transport error.
fn call(api: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    http_json(api, method, path, body, &[]).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// `GET /api/v1/servers` → the `servers` list.
fn servers(api: SocketAddr) -> Vec<Value> {
    let (status, v) = call(api, "GET", "/api/v1/servers", None);
    assert_eq!(status, 200, "GET /api/v1/servers: {v}");
    v["servers"].as_array().unwrap_or_else(|| panic!("no servers list in {v}")).clone()
}

/// The listing entry of server `id`, if it is listed.
fn listed(api: SocketAddr, id: &str) -> Option<Value> {
    servers(api).into_iter().find(|s| s["server_id"].as_str() == Some(id))
}

/// The `status` of server `id` in the listing ("" when not listed).
fn status_of(api: SocketAddr, id: &str) -> String {
    listed(api, id).and_then(|s| s["status"].as_str().map(str::to_string)).unwrap_or_default()
}

/// Horizon's registration body for a server at `port`.
fn horizon_body(name: &str, port: u16, region: (i64, i64, i64), bounds: f64) -> Value {
    let c = |i: i64| i as f64 * 1000.0 + 500.0;
    json!({
        "name": name,
        "address": format!("127.0.0.1:{port}"),
        "region_coord": {"x": region.0, "y": region.1, "z": region.2},
        "center": {"x": c(region.0), "y": c(region.1), "z": c(region.2)},
        "bounds": bounds,
        "capacity": 100,
    })
}

/// A game server registered for grid cell `region` of 1000-unit regions.
fn region_server(api: SocketAddr, name: &str, region: (i64, i64, i64)) -> (GameServer, Value) {
    let s = GameServer::start(name);
    let c = |i: i64| i as f64 * 1000.0 + 500.0;
    let answer = s.register(api, region, (c(region.0), c(region.1), c(region.2)), 500.0, 100).unwrap_or_else(|e| panic!("register {name}: {e}"));
    (s, answer)
}

/// The whole `/metrics` text.
fn metrics_text(api: SocketAddr) -> String {
    let (status, text) = http_raw(api, "GET /metrics HTTP/1.1\r\nHost: atlas\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200, "GET /metrics: {text}");
    text
}

/// The value of one series (`name` or `name{labels}` exactly as printed).
fn metric(api: SocketAddr, series: &str) -> Option<f64> {
    let text = metrics_text(api);
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Sends a move with `seq` at (x, 500, 500) and returns the server that
/// acked it.
fn acked_by(c: &mut WsClient, seq: u64, x: f64) -> String {
    c.send_text(&move_msg(seq, x, 500.0, 500.0));
    let v = c.recv_json().unwrap_or_else(|e| panic!("ack {seq}: {e}"));
    assert_eq!(v["type"], "ack", "{v}");
    assert_eq!(v["seq"].as_u64(), Some(seq), "acks in order: {v}");
    v["server"].as_str().unwrap_or_default().to_string()
}

/// A free local port (bound once, then released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

/// One HTTP request with an optional body from source address `from` (a
/// loopback address); returns the status and the body text.
fn call_from(from: &str, api: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    sock.connect(&api.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The part of an error body: its `error` string (empty if none).
fn error_text(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------
// 1. Registration
// ---------------------------------------------------------------------------

#[test]
fn horizon_registration_returns_an_id_the_interval_and_the_adjacent_servers() {
    let atlas = Atlas::start(&config("heartbeat_interval = \"3s\""));
    let api = api(&atlas);
    let (_far, far) = region_server(api, "far", (5, 5, 5));
    assert_eq!(far["adjacent_servers"], json!([]), "nothing near (5,5,5): {far}");
    let (n1, _) = region_server(api, "n1", (1, 0, 0));
    let (n2, _) = region_server(api, "n2", (-1, 1, -1));
    let (_n3, _) = region_server(api, "n3", (2, 0, 0));

    let me = GameServer::start("me");
    let v = me.register(api, (0, 0, 0), (500.0, 500.0, 500.0), 500.0, 64).expect("register me");
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["message"], "registered", "{v}");
    let id = v["server_id"].as_str().unwrap_or_default().to_string();
    assert!(id.starts_with("srv-") && id.len() > 4, "server_id {id:?}");
    assert_eq!(v["heartbeat_interval_secs"].as_u64(), Some(3), "{v}");
    // Adjacent: differs by at most 1 on each axis, never itself.
    let mut adj: Vec<(String, String, Value)> = v["adjacent_servers"]
        .as_array()
        .unwrap_or_else(|| panic!("no adjacent_servers in {v}"))
        .iter()
        .map(|a| (a["server_id"].as_str().unwrap_or("").to_string(), a["address"].as_str().unwrap_or("").to_string(), a["region_coord"].clone()))
        .collect();
    adj.sort_by(|x, y| x.0.cmp(&y.0));
    let mut want = vec![
        (n1.server_id().unwrap(), format!("127.0.0.1:{}", n1.addr().port()), json!({"x": 1, "y": 0, "z": 0})),
        (n2.server_id().unwrap(), format!("127.0.0.1:{}", n2.addr().port()), json!({"x": -1, "y": 1, "z": -1})),
    ];
    want.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(adj, want, "{v}");

    // Same name and address again: same id, "re-registered", still not its own neighbour.
    let again = me.register(api, (0, 0, 0), (500.0, 500.0, 500.0), 500.0, 64).expect("re-register");
    assert_eq!(again["server_id"].as_str(), Some(id.as_str()), "{again}");
    assert_eq!(again["message"], "re-registered", "{again}");
    assert!(!again["adjacent_servers"].as_array().unwrap().iter().any(|a| a["server_id"].as_str() == Some(id.as_str())), "{again}");

    // The listing has it once, with what it registered.
    let list = servers(api);
    assert_eq!(list.len(), 5, "{list:?}");
    assert_eq!(list.iter().filter(|s| s["server_id"].as_str() == Some(id.as_str())).count(), 1);
    let s = listed(api, &id).unwrap();
    assert_eq!(s["name"], "me");
    assert_eq!(s["address"].as_str(), Some(format!("127.0.0.1:{}", me.addr().port()).as_str()));
    assert_eq!(s["region_coord"], json!({"x": 0, "y": 0, "z": 0}));
    assert_eq!(s["center"], json!({"x": 500.0, "y": 500.0, "z": 500.0}));
    assert_eq!(s["bounds"].as_f64(), Some(500.0));
    assert_eq!(s["capacity"].as_u64(), Some(64));
    assert_eq!(s["status"], "up");
    assert_eq!(s["players"].as_i64(), Some(0));
    assert_eq!(s["heartbeats"].as_u64(), Some(0));
}

#[test]
fn heartbeat_interval_below_a_second_is_announced_as_one_second() {
    let atlas = Atlas::start(&config("heartbeat_interval = \"200ms\""));
    let (_s, v) = region_server(api(&atlas), "quick", (0, 0, 0));
    assert_eq!(v["heartbeat_interval_secs"].as_u64(), Some(1), "{v}");
}

#[test]
fn heartbeats_are_acknowledged_and_counted_and_unknown_ids_get_404() {
    let atlas = Atlas::start(&config(""));
    let api = api(&atlas);
    let (s, _) = region_server(api, "beater", (0, 0, 0));
    let id = s.server_id().unwrap();
    for _ in 0..2 {
        let v = s.heartbeat(api).expect("heartbeat");
        assert_eq!(v, json!({"success": true, "message": "ok", "commands": []}));
    }
    assert_eq!(listed(api, &id).unwrap()["heartbeats"].as_u64(), Some(2));

    // A full Horizon heartbeat body, figures shown in the listing.
    let body = json!({"server_id": id, "current_connections": 7, "load": 0.25, "accepting_connections": true, "avg_tick_ms": 16.5, "memory_bytes": 1234});
    let (status, v) = call(api, "PUT", &format!("/api/v1/servers/{id}/heartbeat"), Some(&body));
    assert_eq!((status, v["success"].clone()), (200, json!(true)), "{v}");
    let e = listed(api, &id).unwrap();
    assert_eq!(e["heartbeats"].as_u64(), Some(3), "{e}");
    assert_eq!(e["reported_connections"].as_u64(), Some(7), "{e}");
    assert_eq!(e["load"].as_f64(), Some(0.25), "{e}");

    let unknown = json!({"server_id": "srv-nope", "current_connections": 0, "load": 0.0, "accepting_connections": true});
    let (status, v) = call(api, "PUT", "/api/v1/servers/srv-nope/heartbeat", Some(&unknown));
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["success"], false, "{v}");
    // Wrong method on the heartbeat route.
    let (status, v) = call(api, "GET", &format!("/api/v1/servers/{id}/heartbeat"), None);
    assert_eq!(status, 405, "{v}");
    assert_eq!(listed(api, &id).unwrap()["heartbeats"].as_u64(), Some(3), "neither the 404 nor the 405 counts for this server");
}

#[test]
fn unregistering_removes_the_server_and_a_second_delete_is_404() {
    let atlas = Atlas::start(&config(""));
    let api = api(&atlas);
    let (a, _) = region_server(api, "a", (0, 0, 0));
    let (b, _) = region_server(api, "b", (1, 0, 0));
    assert_eq!(servers(api).len(), 2);
    assert_eq!(a.unregister(api), Ok(200));
    let left: Vec<String> = servers(api).iter().map(|s| s["server_id"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(left, vec![b.server_id().unwrap()]);
    let (status, v) = call(api, "DELETE", &format!("/api/v1/servers/{}", a.server_id().unwrap()), None);
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["success"], false, "{v}");
    // Its heartbeats are now unknown: it must register again.
    let err = a.heartbeat(api).expect_err("heartbeat after unregister");
    assert!(err.contains("HTTP 404"), "{err}");
}

#[test]
fn seed_routes_register_list_show_stats_and_delete() {
    let atlas = Atlas::start(&config(""));
    let api = api(&atlas);
    let gs = GameServer::start("seed");
    let body = json!({
        "server_id": "seed-1",
        "address": format!("127.0.0.1:{}", gs.addr().port()),
        "region": {"x": 0, "y": 0, "z": 0},
        "center": {"x": 500, "y": 500, "z": 500},
        "bounds_size": 1000.0,
        "capacity": 50,
    });
    let (status, v) = call(api, "POST", "/servers/register", Some(&body));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["server_id"], "seed-1", "{v}");

    let (status, list) = call(api, "GET", "/servers", None);
    assert_eq!(status, 200);
    let arr = list.as_array().unwrap_or_else(|| panic!("GET /servers is not an array: {list}"));
    let s = arr.iter().find(|s| s["server_id"] == "seed-1").unwrap_or_else(|| panic!("seed-1 not in {list}"));
    assert_eq!(s["bounds"].as_f64(), Some(500.0), "bounds is half the edge: {s}");
    assert_eq!(s["capacity"].as_u64(), Some(50), "{s}");
    assert_eq!(s["status"], "up", "{s}");

    let (status, st) = call(api, "GET", "/servers/seed-1/stats", None);
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["server_id"], "seed-1", "{st}");
    // The seed-registered server takes players.
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=seedling&x=100&y=500&z=500", &[]).expect("connect");
    assert_eq!(acked_by(&mut c, 1, 100.0), "seed");
    drop(c);

    let (status, v) = call(api, "DELETE", "/servers/seed-1", None);
    assert_eq!(status, 200, "{v}");
    assert!(!call(api, "GET", "/servers", None).1.as_array().unwrap().iter().any(|s| s["server_id"] == "seed-1"));
    assert_eq!(call(api, "GET", "/servers/seed-1/stats", None).0, 404);
    assert_eq!(call(api, "GET", "/health", None).0, 200);
}

#[test]
fn malformed_registrations_get_400_and_register_nothing() {
    let atlas = Atlas::start(&config(""));
    let api = api(&atlas);
    let good = horizon_body("ok", 7777, (0, 0, 0), 500.0);
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    let bodies: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("not JSON", "this is not json".into()),
        ("truncated", "{\"name\":\"x\",".into()),
        ("an array", "[1,2,3]".into()),
        ("missing name", without("name").to_string()),
        ("missing address", without("address").to_string()),
        ("missing region_coord", without("region_coord").to_string()),
        ("missing center", without("center").to_string()),
        ("missing bounds", without("bounds").to_string()),
        ("missing capacity", without("capacity").to_string()),
        ("capacity a string", with("capacity", json!("lots")).to_string()),
        ("capacity negative", with("capacity", json!(-1)).to_string()),
        ("region_coord floats", with("region_coord", json!({"x": 0.5, "y": 0, "z": 0})).to_string()),
        ("center a string", with("center", json!("middle")).to_string()),
        ("center missing z", with("center", json!({"x": 1.0, "y": 2.0})).to_string()),
        ("bounds a string", with("bounds", json!("big")).to_string()),
        ("name a number", with("name", json!(42)).to_string()),
        ("bounds zero", with("bounds", json!(0.0)).to_string()),
        ("bounds negative", with("bounds", json!(-5.0)).to_string()),
        ("address empty", with("address", json!("")).to_string()),
    ];
    for (what, body) in &bodies {
        let req = format!(
            "POST /api/v1/servers/register HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, text) = http_raw(api, &req);
        assert_eq!(status, 400, "{what}: {text}");
        let json: Value = serde_json::from_str(text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("")).unwrap_or(Value::Null);
        assert!(!error_text(&json).is_empty(), "{what}: a non-empty error string expected in {text}");
    }
    // Seed shape: missing server_id, bounds_size zero.
    for body in [
        json!({"address": "127.0.0.1:1", "region": {"x":0,"y":0,"z":0}, "center": {"x":0,"y":0,"z":0}, "bounds_size": 10.0}),
        json!({"server_id": "s", "address": "127.0.0.1:1", "region": {"x":0,"y":0,"z":0}, "center": {"x":0,"y":0,"z":0}, "bounds_size": 0.0}),
    ] {
        let (status, v) = call(api, "POST", "/servers/register", Some(&body));
        assert_eq!(status, 400, "{body} -> {v}");
        assert!(!error_text(&v).is_empty(), "{v}");
    }
    assert_eq!(servers(api), Vec::<Value>::new(), "nothing may be registered by a malformed body");

    // A chunked body is refused with 411, and registers nothing either.
    let b = good.to_string();
    let req = format!(
        "POST /api/v1/servers/register HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        b.len()
    );
    let (status, text) = http_raw(api, &req);
    assert_eq!(status, 411, "{text}");
    assert_eq!(servers(api), Vec::<Value>::new());

    // The same good body with a Content-Length does register (the checks above could fail).
    let (status, v) = call(api, "POST", "/api/v1/servers/register", Some(&good));
    assert_eq!(status, 200, "{v}");
    assert_eq!(servers(api).len(), 1);
}

// ---------------------------------------------------------------------------
// 6. Heartbeat misses
// ---------------------------------------------------------------------------

#[test]
fn a_silent_server_is_marked_down_and_a_heartbeat_brings_it_back() {
    let atlas = Atlas::start(&config("heartbeat_interval = \"200ms\"\nheartbeat_misses = 3"));
    let api = api(&atlas);
    let (steady, _) = region_server(api, "steady", (1, 0, 0));
    steady.start_heartbeats(api, Duration::from_millis(100));
    let registered = Instant::now();
    let (silent, _) = region_server(api, "silent", (0, 0, 0));
    let id = silent.server_id().unwrap();
    assert_eq!(status_of(api, &id), "up", "up right after registering");
    assert!(wait_for(Duration::from_secs(4), || status_of(api, &id) == "down"), "still {:?} after 4 s", status_of(api, &id));
    let took = registered.elapsed();
    assert!(took >= Duration::from_millis(550), "marked down after {took:?}, before 3 x 200ms had passed");
    assert!(took <= Duration::from_millis(2500), "marked down only after {took:?}");
    assert_eq!(status_of(api, &steady.server_id().unwrap()), "up", "the heartbeating server stays up");

    assert_eq!(metric(api, "atlas_game_servers{status=\"down\"}"), Some(1.0), "{}", metrics_text(api));
    assert_eq!(metric(api, "atlas_game_servers{status=\"up\"}"), Some(1.0));
    assert!(metric(api, "atlas_game_servers_marked_down_total").is_some_and(|v| v >= 1.0), "{}", metrics_text(api));

    // A down server gets no new players.
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=newbie&x=100&y=500&z=500", &[]).expect("connect");
    assert_eq!(acked_by(&mut c, 1, 100.0), "steady", "a down server must not get new players");

    let v = silent.heartbeat(api).expect("heartbeat of a down server");
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(status_of(api, &id), "up");
    assert_eq!(metric(api, "atlas_game_servers{status=\"down\"}"), Some(0.0));
    assert_eq!(metric(api, "atlas_game_servers{status=\"up\"}"), Some(2.0));
}

// ---------------------------------------------------------------------------
// 7. Drain
// ---------------------------------------------------------------------------

#[test]
fn drain_sends_prepare_shutdown_and_moves_players_off_and_enable_brings_it_back() {
    let atlas = Atlas::start(&config("predict_horizon = \"0s\""));
    let api = api(&atlas);
    let (a, _) = region_server(api, "a", (0, 0, 0));
    let (b, _) = region_server(api, "b", (1, 0, 0));
    let id = a.server_id().unwrap();
    assert_eq!(a.heartbeat(api).expect("heartbeat")["commands"], json!([]), "no command before the drain");

    let mut p1 = WsClient::connect(atlas.addr(), "/play?player_id=p1&x=100&y=500&z=500", &[]).expect("connect p1");
    assert_eq!(acked_by(&mut p1, 1, 100.0), "a", "p1 starts in a's region");

    let (status, v) = call(api, "POST", &format!("/api/v1/servers/{id}/drain"), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "draining", "{v}");
    assert_eq!(status_of(api, &id), "draining");
    assert_eq!(metric(api, "atlas_game_servers{status=\"draining\"}"), Some(1.0));

    let hb = a.heartbeat(api).expect("heartbeat while draining");
    let cmds = hb["commands"].as_array().unwrap_or_else(|| panic!("{hb}"));
    assert!(cmds.contains(&json!({"type": "PrepareShutdown", "deadline_secs": 30})), "{hb}");
    assert_eq!(status_of(api, &id), "draining", "a heartbeat does not undo a drain");

    // New players in a's region go to b.
    let mut p2 = WsClient::connect(atlas.addr(), "/play?player_id=p2&x=200&y=500&z=500", &[]).expect("connect p2");
    assert_eq!(acked_by(&mut p2, 1, 200.0), "b", "a draining server must not get new players");
    assert!(b.connections().iter().any(|c| c.header("x-atlas-player-id") == Some("p2")));

    // p1 is moved off a without having to say anything, and keeps its
    // connection: its next messages are answered by b.
    let b_id = b.server_id().unwrap();
    let p1_server = || {
        let (_, v) = call(api, "GET", "/api/v1/players", None);
        v["players"].as_array().and_then(|l| l.iter().find(|p| p["player_id"] == "p1").and_then(|p| p["server_id"].as_str().map(str::to_string)))
    };
    assert!(wait_for(Duration::from_secs(2), || p1_server().as_deref() == Some(b_id.as_str())), "p1 still on {:?}", p1_server());
    assert_eq!(acked_by(&mut p1, 2, 110.0), "b", "p1 must be moved off the draining server");
    assert_eq!(acked_by(&mut p1, 3, 120.0), "b");
    assert!(
        wait_for(Duration::from_secs(3), || listed(api, &id).is_some_and(|s| s["players"].as_i64() == Some(0))),
        "a still counts players: {:?}",
        listed(api, &id)
    );

    let (status, v) = call(api, "POST", &format!("/api/v1/servers/{id}/enable"), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "up", "{v}");
    assert_eq!(status_of(api, &id), "up");
    let mut p3 = WsClient::connect(atlas.addr(), "/play?player_id=p3&x=300&y=500&z=500", &[]).expect("connect p3");
    assert_eq!(acked_by(&mut p3, 1, 300.0), "a", "an enabled server takes players in its region again");
    assert_eq!(a.heartbeat(api).expect("heartbeat")["commands"], json!([]), "no more PrepareShutdown after enable");

    let (status, _) = call(api, "POST", "/api/v1/servers/srv-nobody/drain", None);
    assert_eq!(status, 404);
}

#[test]
fn each_heartbeat_while_draining_carries_prepare_shutdown_once() {
    let atlas = Atlas::start(&config(""));
    let api = api(&atlas);
    let (a, _) = region_server(api, "a", (0, 0, 0));
    let id = a.server_id().unwrap();
    assert_eq!(call(api, "POST", &format!("/api/v1/servers/{id}/drain"), None).0, 200);
    let prepare = json!({"type": "PrepareShutdown", "deadline_secs": 30});
    for n in 1..=3 {
        let hb = a.heartbeat(api).expect("heartbeat while draining");
        assert_eq!(hb["commands"], json!([prepare]), "heartbeat {n} after the drain: {hb}");
    }
}

// ---------------------------------------------------------------------------
// 8. Access control
// ---------------------------------------------------------------------------

#[test]
fn registration_from_outside_the_allow_list_is_refused_and_not_applied() {
    let atlas = Atlas::start(&config_with("", "allow = [\"10.0.0.0/8\"]"));
    let api = api(&atlas);
    let gs = GameServer::start("outsider");
    let body = horizon_body("outsider", gs.addr().port(), (0, 0, 0), 500.0);
    let (status, v) = call(api, "POST", "/api/v1/servers/register", Some(&body));
    assert_eq!(status, 403, "{v}");
    assert!(!error_text(&v).is_empty(), "{v}");
    let err = gs.register(api, (0, 0, 0), (500.0, 500.0, 500.0), 500.0, 10).expect_err("register from 127.0.0.1");
    assert!(err.contains("HTTP 403"), "{err}");
    // Reads follow the same list by default.
    assert_eq!(call(api, "GET", "/api/v1/servers", None).0, 403);
    assert_eq!(call(api, "GET", "/servers", None).0, 403);
    assert_eq!(call(api, "GET", "/health", None).0, 200, "probes stay open");
    // Nothing registered: a player finds no server.
    assert!(WsClient::connect(atlas.addr(), "/play?player_id=p&x=100&y=500&z=500", &[]).is_err(), "no server may have been registered");
    assert!(gs.connections().is_empty());
}

#[test]
fn registration_needs_the_bearer_token_when_one_is_set() {
    let atlas = Atlas::start(&config_with("", "token = \"s3cret\""));
    let api = api(&atlas);
    let gs = GameServer::start("tokened");
    let body = horizon_body("tokened", gs.addr().port(), (0, 0, 0), 500.0);
    let (status, v) = call(api, "POST", "/api/v1/servers/register", Some(&body));
    assert_eq!(status, 401, "{v}");
    let (status, v) = http_json(api, "POST", "/api/v1/servers/register", Some(&body), &[("Authorization", "Bearer wrong")]).unwrap();
    assert_eq!(status, 401, "{v}");
    assert_eq!(servers(api), Vec::<Value>::new(), "a 401 registers nothing");
    let (status, v) = http_json(api, "POST", "/api/v1/servers/register", Some(&body), &[("Authorization", "Bearer s3cret")]).unwrap();
    assert_eq!(status, 200, "{v}");
    let id = v["server_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(servers(api).iter().map(|s| s["server_id"].as_str().unwrap_or("").to_string()).collect::<Vec<_>>(), vec![id.clone()]);
    // Heartbeats are writes too.
    let hb = json!({"server_id": id, "current_connections": 0, "load": 0.0, "accepting_connections": true});
    assert_eq!(call(api, "PUT", &format!("/api/v1/servers/{id}/heartbeat"), Some(&hb)).0, 401);
    let (status, _) = http_json(api, "PUT", &format!("/api/v1/servers/{id}/heartbeat"), Some(&hb), &[("Authorization", "Bearer s3cret")]).unwrap();
    assert_eq!(status, 200);
}

#[test]
fn other_loopback_sources_may_register_by_default() {
    let atlas = Atlas::start(&config(""));
    let api = api(&atlas);
    let gs = GameServer::start("from-127-0-0-2");
    let body = horizon_body("from-127-0-0-2", gs.addr().port(), (0, 0, 0), 500.0).to_string();
    let (status, text) = call_from("127.0.0.2", api, "POST", "/api/v1/servers/register", "", &body);
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let id = v["server_id"].as_str().unwrap_or_else(|| panic!("no server_id in {text}"));
    let (status, text) = call_from("127.0.0.2", api, "GET", "/api/v1/servers", "", "");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(id), "{text}");
}

// ---------------------------------------------------------------------------
// 9. Snapshot
// ---------------------------------------------------------------------------

#[test]
fn the_registry_survives_a_restart_through_its_snapshot() {
    let snap = common::temp_path("json");
    let cfg = config(&format!("snapshot = {:?}", snap.display().to_string()));
    let atlas = Atlas::start(&cfg);
    let first_api = api(&atlas);
    let (a, _) = region_server(first_api, "a", (0, 0, 0));
    let (b, _) = region_server(first_api, "b", (1, 0, 0));
    let mut ids = vec![a.server_id().unwrap(), b.server_id().unwrap()];
    ids.sort();
    assert!(snap.exists(), "the snapshot is written on registration");
    drop(atlas);

    let atlas = Atlas::start(&cfg);
    let api = api(&atlas);
    let list = servers(api);
    let mut got: Vec<String> = list.iter().map(|s| s["server_id"].as_str().unwrap_or("").to_string()).collect();
    got.sort();
    assert_eq!(got, ids, "{list:?}");
    for s in &list {
        assert_eq!(s["status"], "up", "{s}");
    }
    let restored_b = list.iter().find(|s| s["name"] == "b").unwrap();
    assert_eq!(restored_b["address"].as_str(), Some(format!("127.0.0.1:{}", b.addr().port()).as_str()));
    assert_eq!(restored_b["region_coord"], json!({"x": 1, "y": 0, "z": 0}));
    // Routable right away, and the old ids heartbeat fine.
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=back&x=1500&y=500&z=500", &[]).expect("connect after restart");
    assert_eq!(acked_by(&mut c, 1, 1500.0), "b");
    assert_eq!(a.heartbeat(api).expect("heartbeat with the restored id")["success"], true);
    let _ = std::fs::remove_file(&snap);
}

#[test]
fn a_garbage_snapshot_is_ignored_with_a_warning() {
    let snap = common::temp_path("json");
    std::fs::write(&snap, "{{{ this is not a registry snapshot").unwrap();
    let atlas = Atlas::start(&config(&format!("snapshot = {:?}", snap.display().to_string())));
    let api = api(&atlas);
    assert_eq!(servers(api), Vec::<Value>::new());
    assert!(atlas.log_lines().iter().any(|l| l.contains("WARN") && l.contains("snapshot")), "a warning about the snapshot expected:\n{}", atlas.logs());
    // The registry works and the snapshot is rewritten from it.
    let (_s, _) = region_server(api, "fresh", (0, 0, 0));
    assert_eq!(servers(api).len(), 1);
    let text = std::fs::read_to_string(&snap).unwrap_or_default();
    assert!(serde_json::from_str::<Value>(&text).is_ok_and(|v| v["servers"].as_array().is_some_and(|a| a.len() == 1)), "snapshot now: {text:?}");
    let _ = std::fs::remove_file(&snap);
}

// ---------------------------------------------------------------------------
// 10. Embedded default and the environment
// ---------------------------------------------------------------------------

/// Runs `atlas` with no CONFIG on free ports, with `envs`.
fn start_embedded(envs: &[(&str, &str)]) -> Atlas {
    let proxy = format!("127.0.0.1:{}", free_port());
    let api = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(common::BIN);
    for k in ["ATLAS_REGION_SIZE", "ATLAS_AUTO_SCALE", "ATLAS_MAESTRO_URL"] {
        cmd.env_remove(k);
    }
    cmd.env("ATLAS_PROXY_ADDR", &proxy).env("ATLAS_API_ADDR", &api);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let atlas = Atlas::spawn(cmd, None, 1, true);
    assert_eq!(atlas.addr().to_string(), proxy, "the proxy listens on ATLAS_PROXY_ADDR");
    assert_eq!(atlas.api.map(|a| a.to_string()), Some(api), "the API listens on ATLAS_API_ADDR");
    atlas
}

#[test]
fn without_a_config_the_embedded_game_gateway_runs_on_the_env_addresses() {
    let atlas = start_embedded(&[]);
    let api = api(&atlas);
    let (_gs, v) = region_server(api, "embedded", (0, 0, 0));
    assert_eq!(v["heartbeat_interval_secs"].as_u64(), Some(30), "the default interval: {v}");
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=p1&x=100&y=500&z=500", &[]).expect("connect to the embedded gateway");
    assert_eq!(acked_by(&mut c, 1, 100.0), "embedded");
    assert_eq!(acked_by(&mut c, 2, 101.0), "embedded");
    let (status, w) = call(api, "GET", "/api/v1/world", None);
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["region_size"].as_f64(), Some(1000.0), "{w}");
}

#[test]
fn atlas_region_size_overrides_the_region_size() {
    let atlas = start_embedded(&[("ATLAS_REGION_SIZE", "250")]);
    let (status, w) = call(api(&atlas), "GET", "/api/v1/world", None);
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["region_size"].as_f64(), Some(250.0), "{w}");
}

#[test]
fn bad_atlas_env_values_stop_the_start_with_a_message_naming_them() {
    let sock = common::temp_path("sock");
    let sock = sock.display().to_string();
    let proxy = format!("127.0.0.1:{}", free_port());
    let api_addr = format!("127.0.0.1:{}", free_port());
    for (key, value) in [("ATLAS_REGION_SIZE", "abc"), ("ATLAS_REGION_SIZE", "-5"), ("ATLAS_AUTO_SCALE", "maybe")] {
        let envs = [("ATLAS_PROXY_ADDR", proxy.as_str()), ("ATLAS_API_ADDR", api_addr.as_str()), (key, value)];
        let (code, out, err) = common::run_cli(&["--takeover-socket", &sock], &envs);
        assert!(code.is_some_and(|c| c != 0), "{key}={value}: exit {code:?}, stderr {err:?}");
        assert!(err.contains(key), "{key}={value}: stderr must name {key}: {err:?} (stdout {out:?})");
    }
    let _ = std::fs::remove_file(&sock);
}

// ---------------------------------------------------------------------------
// 11. --check
// ---------------------------------------------------------------------------

/// `atlas --check` on a game config whose `[spatial]` holds `spatial`:
/// (exit code, stdout, stderr).
fn check_spatial(spatial: &str) -> (Option<i32>, String, String) {
    let text = format!("[listen]\naddress = \"127.0.0.1:0\"\nmode = \"game\"\n\n[api]\naddress = \"127.0.0.1:0\"\n\n[spatial]\n{spatial}\n");
    let path = common::write_config(&text);
    let p = path.display().to_string();
    let r = common::run_cli(&["--check", &p], &[]);
    let _ = std::fs::remove_file(&path);
    r
}

#[test]
fn check_names_every_bad_spatial_value() {
    let (code, out, err) = check_spatial("region_size = -1\nheartbeat_interval = \"soon\"\nmaestro_url = \"https://x:1\"\nheartbeat_misses = 0");
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {out}{err}");
    for key in ["spatial.region_size", "spatial.heartbeat_interval", "spatial.maestro_url", "spatial.heartbeat_misses"] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }
    assert!(err.contains("4 error(s)"), "{err}");
    // One at a time, the unknown key included.
    for (line, key) in [
        ("region_size = -1", "spatial.region_size"),
        ("region_size = 0.0", "spatial.region_size"),
        ("heartbeat_interval = \"soon\"", "spatial.heartbeat_interval"),
        ("heartbeat_interval = \"0s\"", "spatial.heartbeat_interval"),
        ("maestro_url = \"https://x:1\"", "spatial.maestro_url"),
        ("foo = 1", "spatial.foo"),
    ] {
        let (code, out, err) = check_spatial(line);
        assert!(code.is_some_and(|c| c != 0), "{line}: exit {code:?}: {out}{err}");
        assert!(err.contains(key), "{line}: {key} not named in:\n{err}");
    }
    // A good [spatial] passes.
    let (code, out, err) = check_spatial("region_size = 500.0\nheartbeat_interval = \"200ms\"\nheartbeat_misses = 3\nmaestro_url = \"http://127.0.0.1:1\"");
    assert_eq!(code, Some(0), "{out}{err}");
}

// ---------------------------------------------------------------------------
// 12. Metrics
// ---------------------------------------------------------------------------

#[test]
fn metrics_count_heartbeats_and_connected_players() {
    let atlas = Atlas::start(&config(""));
    let api = api(&atlas);
    let (a, _) = region_server(api, "a", (0, 0, 0));
    let before = metric(api, "atlas_game_heartbeats_total").unwrap_or_else(|| panic!("no atlas_game_heartbeats_total in\n{}", metrics_text(api)));
    for _ in 0..3 {
        a.heartbeat(api).expect("heartbeat");
    }
    assert_eq!(metric(api, "atlas_game_heartbeats_total"), Some(before + 3.0));
    assert_eq!(metric(api, "atlas_game_players"), Some(0.0), "{}", metrics_text(api));

    let mut c1 = WsClient::connect(atlas.addr(), "/play?player_id=m1&x=100&y=500&z=500", &[]).expect("connect m1");
    let mut c2 = WsClient::connect(atlas.addr(), "/play?player_id=m2&x=200&y=500&z=500", &[]).expect("connect m2");
    assert_eq!(acked_by(&mut c1, 1, 100.0), "a");
    assert_eq!(acked_by(&mut c2, 1, 200.0), "a");
    assert!(wait_for(Duration::from_secs(3), || metric(api, "atlas_game_players") == Some(2.0)), "{}", metrics_text(api));
    let per_server = format!("atlas_game_server_players{{server=\"{}\",name=\"a\"}}", a.server_id().unwrap());
    assert_eq!(metric(api, &per_server), Some(2.0), "{}", metrics_text(api));
    assert_eq!(metric(api, "atlas_game_servers{status=\"up\"}"), Some(1.0));

    c2.send_close(1000, "bye");
    drop(c2);
    assert!(wait_for(Duration::from_secs(3), || metric(api, "atlas_game_players") == Some(1.0)), "{}", metrics_text(api));
    drop(c1);
    assert!(wait_for(Duration::from_secs(3), || metric(api, "atlas_game_players") == Some(0.0)), "{}", metrics_text(api));
}
