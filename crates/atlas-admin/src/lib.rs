//! The control-plane API on `[api] address`, on its own thread and runtime
//! so it never competes with a worker. JSON over HTTP/1.1.
//!
//! | route | |
//! |---|---|
//! | `GET /health` | liveness: 200 while the process serves |
//! | `GET /ready` | readiness: 503 before the listeners are up and while draining |
//! | `GET /api/v1/status` | version, uptime, config file and last reload, driver, workers, listeners |
//! | `GET /api/v1/upstreams` | per upstream: group, address, weight, health, drained, in flight |
//! | `POST /api/v1/upstreams/{name}/drain` | take it out of rotation (in-flight requests finish) |
//! | `POST /api/v1/upstreams/{name}/enable` | put it back |
//!
//! Write endpoints need a source address in `[api] allow` (403 otherwise)
//! and, when `[api] token` is set, `Authorization: Bearer <token>` (401).
//! Errors are JSON objects with an `error` message; an unknown route is
//! 404, a known route with the wrong method 405.

use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atlas_proxy::io::{give_buf, read_more, take_buf, write_vec};
use atlas_runtime::Current;
use monoio::net::{TcpListener, TcpStream};
use serde_json::{json, Value};

const MAX_HEAD: usize = 16 * 1024;

/// What the API reports and steers.
pub struct AdminState {
    pub current: Current,
    pub started: Instant,
    pub driver: &'static str,
    pub config_path: Option<PathBuf>,
    /// The outcome of the last reload, for `/api/v1/status`.
    pub last_reload: Mutex<Value>,
    /// Set once the workers serve every listener.
    pub ready: AtomicBool,
}

/// Binds `addr` now (so a busy port fails start-up) and serves it on a thread.
pub fn start(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let std = StdListener::bind(addr)?;
    std.set_nonblocking(true)?;
    let local = std.local_addr()?;
    let h = std::thread::Builder::new().name("atlas-api".into()).spawn(move || {
        let mut rt = match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "internal: cannot start API runtime");
                return;
            }
        };
        rt.block_on(async move {
            let listener = match TcpListener::from_std(std) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "internal: cannot register API listener");
                    return;
                }
            };
            loop {
                match listener.accept().await {
                    Ok((s, peer)) => {
                        monoio::spawn(serve(s, peer, state.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "api accept failed");
                        monoio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    })?;
    Ok((local, h))
}

struct Reply {
    status: u16,
    body: Value,
    extra: &'static str,
}

fn reply(status: u16, body: Value) -> Reply {
    Reply { status, body, extra: "" }
}

fn error(status: u16, msg: impl Into<String>) -> Reply {
    reply(status, json!({ "error": msg.into() }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

fn encode(r: &Reply, keep: bool) -> Vec<u8> {
    let body = r.body.to_string();
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: {}\r\n{}\r\n{body}",
        r.status,
        reason(r.status),
        body.len(),
        if keep { "keep-alive" } else { "close" },
        r.extra
    )
    .into_bytes()
}

/// A parsed request: method, path, and the `Authorization` header.
struct Req {
    method: String,
    path: String,
    authorization: Option<String>,
}

fn status(state: &AdminState) -> Value {
    let g = state.current.load();
    let listeners: Vec<Value> =
        g.cfg.listeners.iter().map(|l| json!({ "name": l.name, "address": l.addr.to_string(), "mode": l.mode.as_str(), "tls": l.tls.is_some() })).collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": state.started.elapsed().as_secs(),
        "config_file": state.config_path.as_ref().map(|p| p.display().to_string()),
        "config_version": g.version,
        "last_reload": state.last_reload.lock().map(|v| v.clone()).unwrap_or(Value::Null),
        "driver": state.driver,
        "workers": g.cfg.workers,
        "draining": atlas_proxy::drain::process_drain_requested(),
        "listeners": listeners,
    })
}

fn upstreams(state: &AdminState) -> Value {
    let g = state.current.load();
    let mut out = Vec::new();
    for group in &g.shared.groups {
        for i in 0..group.len() {
            let c = group.inflight.counters(i);
            out.push(json!({
                "name": group.names[i],
                "group": group.name,
                "address": group.addrs[i].to_string(),
                "weight": group.weights[i],
                "max_conns": group.max_conns[i],
                "health": if c.is_healthy() { "up" } else { "down" },
                "drained": c.is_drained(),
                "in_flight": c.total(),
            }));
        }
    }
    json!({ "upstreams": out })
}

/// Drains or enables every upstream called `name` (in any group).
fn set_drained(state: &AdminState, name: &str, drained: bool) -> Reply {
    let g = state.current.load();
    let mut found = 0;
    for group in &g.shared.groups {
        for i in 0..group.len() {
            if group.names[i] == name {
                found += 1;
                if group.inflight.counters(i).set_drained(drained) {
                    tracing::info!(upstream = name, "upstream {} by the admin API", if drained { "drained" } else { "enabled" });
                }
            }
        }
    }
    if found == 0 {
        return error(404, format!("no upstream named `{name}`"));
    }
    reply(200, json!({ "upstream": name, "drained": drained }))
}

fn authorize(state: &AdminState, peer: IpAddr, req: &Req) -> Option<Reply> {
    let g = state.current.load();
    let Some(api) = &g.cfg.api else { return Some(error(403, "the API is not configured for writes")) };
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    if !api.allow.iter().any(|net| net.contains(&peer)) {
        return Some(error(403, format!("{peer} is not in [api] allow")));
    }
    if let Some(token) = &api.token {
        let given = req.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).map(str::trim);
        if given != Some(token.as_str()) {
            let mut r = error(401, "a valid bearer token is required");
            r.extra = "WWW-Authenticate: Bearer\r\n";
            return Some(r);
        }
    }
    None
}

fn route(state: &AdminState, peer: IpAddr, req: &Req) -> Reply {
    let path = req.path.split('?').next().unwrap_or("");
    let get = req.method == "GET" || req.method == "HEAD";
    let only = |allowed: &'static str| {
        let mut r = error(405, format!("{} is not allowed on {path}; use {allowed}", req.method));
        r.extra = if allowed == "GET" { "Allow: GET, HEAD\r\n" } else { "Allow: POST\r\n" };
        r
    };
    match path {
        "/health" if get => reply(200, json!({ "status": "ok" })),
        "/ready" if get => {
            if atlas_proxy::drain::process_drain_requested() {
                reply(503, json!({ "ready": false, "reason": "draining" }))
            } else if !state.ready.load(Ordering::Relaxed) {
                reply(503, json!({ "ready": false, "reason": "starting" }))
            } else {
                reply(200, json!({ "ready": true }))
            }
        }
        "/api/v1/status" if get => reply(200, status(state)),
        "/api/v1/upstreams" if get => reply(200, upstreams(state)),
        "/health" | "/ready" | "/api/v1/status" | "/api/v1/upstreams" => only("GET"),
        _ => {
            let action = path.strip_prefix("/api/v1/upstreams/").and_then(|rest| rest.rsplit_once('/'));
            match action {
                Some((name, verb @ ("drain" | "enable"))) if !name.is_empty() && !name.contains('/') => {
                    if req.method != "POST" {
                        return only("POST");
                    }
                    if let Some(denied) = authorize(state, peer, req) {
                        return denied;
                    }
                    set_drained(state, name, verb == "drain")
                }
                _ => error(404, format!("no route for {} {path}", req.method)),
            }
        }
    }
}

async fn serve(mut s: TcpStream, peer: SocketAddr, state: Arc<AdminState>) {
    let mut buf = take_buf();
    loop {
        let parsed = loop {
            let mut h = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut h);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let keep = req.version == Some(1)
                        && !req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close"));
                    let has_body = req
                        .headers
                        .iter()
                        .any(|h| (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0") || h.name.eq_ignore_ascii_case("transfer-encoding"));
                    let r = Req {
                        method: req.method.unwrap_or("").to_string(),
                        path: req.path.unwrap_or("").to_string(),
                        authorization: req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                            .map(|h| String::from_utf8_lossy(h.value).into_owned()),
                    };
                    // None of our routes takes a body: refuse one rather than misread the stream.
                    let out = if has_body { error(400, "request bodies are not accepted here") } else { route(&state, peer.ip(), &r) };
                    let keep = keep && !has_body;
                    let mut bytes = encode(&out, keep);
                    if r.method == "HEAD" {
                        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                            bytes.truncate(end + 4);
                        }
                    }
                    break Some((n, bytes, keep));
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                _ => break Some((buf.len(), encode(&error(400, "malformed request"), false), false)),
            }
            match monoio::time::timeout(Duration::from_secs(10), read_more(&mut s, &mut buf, MAX_HEAD + 1024)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => break None,
            }
        };
        let Some((n, mut out, keep)) = parsed else { break };
        buf.drain(..n);
        if write_vec(&mut s, &mut out).await.is_err() || !keep {
            break;
        }
    }
    give_buf(buf);
}
