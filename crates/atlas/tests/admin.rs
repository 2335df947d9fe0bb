//! Admin API: liveness, readiness, status, upstream listing, operator
//! drain/enable with the allow-list and the bearer token, JSON errors.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

/// One request on a fresh connection from `from` (a loopback address).
fn call_from(from: &str, api: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    sock.connect(&api.into()).unwrap();
    let mut s: TcpStream = sock.into();
    set_timeouts(&s, Duration::from_secs(3));
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n{headers}\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn call(api: SocketAddr, method: &str, path: &str) -> (u16, String) {
    call_from("127.0.0.1", api, method, path, "")
}

fn start(extra_api: &str) -> (Backend, Backend, Atlas) {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    let cfg = http_config(&[a.addr, b.addr], &format!("[api]\naddress = \"127.0.0.1:0\"\n{extra_api}"));
    let atlas = Atlas::start(&cfg);
    (a, b, atlas)
}

#[test]
fn health_ready_and_status() {
    let (_a, _b, atlas) = start("");
    let api = atlas.api.expect("api address");
    assert_eq!(call(api, "GET", "/health"), (200, "{\"status\":\"ok\"}".into()));
    assert!(wait_until(Duration::from_secs(2), || call(api, "GET", "/ready").0 == 200), "ready once listeners serve");
    let (s, body) = call(api, "GET", "/api/v1/status");
    assert_eq!(s, 200);
    for needle in ["\"version\":\"0.1.0\"", "\"uptime_secs\"", "\"driver\"", "\"workers\":1", "\"listeners\":[{", "\"mode\":\"http\"", "\"last_reload\":null"] {
        assert!(body.contains(needle), "{needle} missing in {body}");
    }
}

#[test]
fn upstreams_are_listed_with_health_and_in_flight() {
    let (a, b, atlas) = start("");
    let api = atlas.api.unwrap();
    let (s, body) = call(api, "GET", "/api/v1/upstreams");
    assert_eq!(s, 200);
    assert!(body.contains(&format!("\"address\":\"{}\"", a.addr)) && body.contains(&format!("\"address\":\"{}\"", b.addr)), "{body}");
    assert!(body.contains("\"health\":\"up\"") && body.contains("\"drained\":false") && body.contains("\"in_flight\":0"), "{body}");
}

#[test]
fn drain_takes_an_upstream_out_of_rotation_and_enable_brings_it_back() {
    let (_a, _b, atlas) = start("");
    let api = atlas.api.unwrap();
    let name = "u1"; // the second upstream, B
    let (s, body) = call(api, "POST", &format!("/api/v1/upstreams/{name}/drain"));
    assert_eq!(s, 200, "{body}");
    let mut c = Client::connect(atlas.addr());
    let texts: Vec<String> = (0..10).map(|i| c.get(&format!("/{i}")).text()).collect();
    assert!(texts.iter().all(|t| t == "A"), "{texts:?}");
    assert!(call(api, "GET", "/api/v1/upstreams").1.contains("\"drained\":true"));
    assert_eq!(call(api, "POST", &format!("/api/v1/upstreams/{name}/enable")).0, 200);
    let texts: Vec<String> = (0..10).map(|i| c.get(&format!("/e{i}")).text()).collect();
    assert!(texts.iter().any(|t| t == "B"), "{texts:?}");
}

#[test]
fn writes_from_outside_the_allow_list_are_refused_and_not_applied() {
    let (_a, _b, atlas) = start("allow = [\"127.0.0.1/32\"]\n");
    let api = atlas.api.unwrap();
    let name = "u1";
    let (s, body) = call_from("127.0.0.2", api, "POST", &format!("/api/v1/upstreams/{name}/drain"), "");
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    assert!(call(api, "GET", "/api/v1/upstreams").1.contains("\"drained\":false"), "the write must not be applied");
    // Reads follow the same list by default; probes stay open.
    assert_eq!(call_from("127.0.0.2", api, "GET", "/api/v1/status", "").0, 403);
    assert_eq!(call_from("127.0.0.2", api, "GET", "/metrics", "").0, 403);
    assert_eq!(call_from("127.0.0.2", api, "GET", "/health", "").0, 200);
}

#[test]
fn reads_can_be_opened_separately_from_writes() {
    let (_a, _b, atlas) = start("allow = [\"127.0.0.1/32\"]\nread_allow = [\"127.0.0.0/8\"]\n");
    let api = atlas.api.unwrap();
    for path in ["/api/v1/status", "/api/v1/upstreams", "/api/v1/listeners", "/metrics", "/"] {
        assert_eq!(call_from("127.0.0.2", api, "GET", path, "").0, 200, "{path}");
    }
    assert_eq!(call_from("127.0.0.2", api, "POST", "/api/v1/upstreams/u1/drain", "").0, 403);
    assert!(call(api, "GET", "/api/v1/upstreams").1.contains("\"drained\":false"));
}

#[test]
fn bearer_token_is_required_when_configured() {
    let (_a, _b, atlas) = start("token = \"s3cret\"\n");
    let api = atlas.api.unwrap();
    let path = "/api/v1/upstreams/u1/drain";
    assert_eq!(call(api, "POST", path).0, 401);
    assert_eq!(call_from("127.0.0.1", api, "POST", path, "Authorization: Bearer wrong\r\n").0, 401);
    assert!(call(api, "GET", "/api/v1/upstreams").1.contains("\"drained\":false"));
    assert_eq!(call_from("127.0.0.1", api, "POST", path, "Authorization: Bearer s3cret\r\n").0, 200);
    assert!(call(api, "GET", "/api/v1/upstreams").1.contains("\"drained\":true"));
}

#[test]
fn errors_are_json_with_the_right_status() {
    let (_a, _b, atlas) = start("");
    let api = atlas.api.unwrap();
    let (s, body) = call(api, "GET", "/nope");
    assert_eq!(s, 404);
    assert!(body.starts_with("{\"error\":"), "{body}");
    assert_eq!(call(api, "POST", "/api/v1/status").0, 405);
    assert_eq!(call(api, "GET", "/api/v1/upstreams/x/drain").0, 405);
    assert_eq!(call(api, "POST", "/api/v1/upstreams/nobody/drain").0, 404);
    // Chunked bodies are refused (411) rather than misread; oversized ones get 413.
    assert_eq!(call_from("127.0.0.1", api, "POST", "/api/v1/upstreams/u0/drain", "Transfer-Encoding: chunked\r\n").0, 411);
    assert_eq!(call_from("127.0.0.1", api, "POST", "/api/v1/upstreams/u0/drain", "Content-Length: 999999\r\n").0, 413);
    assert!(call(api, "GET", "/api/v1/upstreams").1.contains("\"drained\":false"), "refused writes are not applied");
}

/// POST with a JSON body, on a fresh connection.
fn post_json(api: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(api).unwrap();
    set_timeouts(&s, Duration::from_secs(3));
    let req =
        format!("POST {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[test]
fn malformed_json_bodies_get_400_naming_the_problem_and_change_nothing() {
    let (_a, _b, atlas) = start("");
    let api = atlas.api.unwrap();
    let path = "/api/v1/upstreams/u1/drain";
    let (s, body) = post_json(api, path, "{\"reason\": ");
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("malformed JSON") && body.contains("line 1 column"), "{body}");
    let (s, body) = post_json(api, path, "[1, 2]");
    assert_eq!(s, 400);
    assert!(body.contains("must be an object"), "{body}");
    let (s, body) = post_json(api, path, "{\"reason\": 5}");
    assert_eq!(s, 400);
    assert!(body.contains("`reason` must be a string"), "{body}");
    let (s, body) = post_json(api, path, "{\"why\": \"x\"}");
    assert_eq!(s, 400);
    assert!(body.contains("unknown field `why`"), "{body}");
    assert!(call(api, "GET", "/api/v1/upstreams").1.contains("\"drained\":false"), "no write applied");
    // A well-formed body: applied, and the reason is recorded.
    let (s, body) = post_json(api, path, "{\"reason\": \"kernel upgrade\"}");
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("\"reason\":\"kernel upgrade\""), "{body}");
    assert!(call(api, "GET", "/api/v1/upstreams").1.contains("\"drained\":true"));
    let events = call(api, "GET", "/api/v1/events").1;
    assert!(events.contains("u1 drained by the admin API: kernel upgrade"), "{events}");
}

#[test]
fn bad_allow_entry_is_a_config_error() {
    let path = write_config("[listen]\nport = 0\nmode = \"game\"\n[api]\nallow = [\"10.0.0.0/33\"]\n");
    let (code, _out, err) = run_cli(&["--check", path.to_str().unwrap()], &[]);
    assert_ne!(code, Some(0));
    assert!(err.contains("api.allow"), "{err}");
}
