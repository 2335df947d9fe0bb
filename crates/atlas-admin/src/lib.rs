//! The control-plane API on `[api] address`, on its own thread and runtime
//! so it never competes with a worker. JSON over HTTP/1.1.
//!
//! | route | |
//! |---|---|
//! | `GET /` | the dashboard page (self-contained, refreshes itself) |
//! | `GET /health` | liveness: 200 while the process serves |
//! | `GET /ready` | readiness: 503 before the listeners are up and while draining |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /api/v1/status` | version, uptime, config file and last reload, driver, workers, listeners |
//! | `GET /api/v1/listeners` | per listener: connections, requests by class, bytes, latency, rejections |
//! | `GET /api/v1/upstreams` | per upstream: address, weight, health, in flight, requests, errors, latency quantiles |
//! | `GET /api/v1/events` | recent notable events (errors, health, reloads) |
//! | `GET /api/v1/skim`, `/api/v1/skim/rates` | the traffic tap (see `skim.rs`) |
//! | `POST /api/v1/upstreams/{name}/drain` | take it out of rotation (in-flight requests finish) |
//! | `POST /api/v1/upstreams/{name}/enable` | put it back |
//! | game routes (`/api/v1/servers...`, `/servers...`, `/transfer`, ...) | see `atlas_game::api` |
//!
//! Write endpoints need a source address in `[api] allow` (403 otherwise)
//! and, when `[api] token` is set, `Authorization: Bearer <token>` (401).
//! Read endpoints need a source in `[api] read_allow` (default: the same
//! list); `/health` and `/ready` are open to every source (probes).
//! `drain` and `enable` take an optional JSON body `{"reason": "..."}`
//! (recorded in the events); a body must come with `Content-Length` (at
//! most 64 KiB). Errors are JSON objects with an `error` message; an
//! unknown route is 404, a known route with the wrong method 405, a
//! malformed body 400 naming the problem.

mod api;
mod prometheus;
mod skim;

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
/// Largest JSON body a write endpoint reads.
const MAX_BODY: usize = 64 * 1024;

/// The dashboard: one page, its CSS and script inline (no CDN).
const DASHBOARD: &str = include_str!("dashboard.html");

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
    /// Listener name -> the address actually bound (a configured port 0
    /// becomes the port the kernel chose).
    pub bound: Vec<(String, SocketAddr)>,
}

impl AdminState {
    /// The address listener `name` is reachable on.
    pub(crate) fn bound_addr(&self, name: &str, configured: SocketAddr) -> SocketAddr {
        self.bound.iter().find(|(n, _)| n == name).map(|(_, a)| *a).unwrap_or(configured)
    }
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

pub(crate) enum Body {
    Json(Value),
    Raw(&'static str, Vec<u8>),
    /// A server-sent event stream of a skim tap, after a sequence number.
    Sse(Arc<atlas_observe::skim::Tap>, u64),
}

pub(crate) struct Reply {
    status: u16,
    body: Body,
    extra: &'static str,
}

pub(crate) fn reply(status: u16, body: Value) -> Reply {
    Reply { status, body: Body::Json(body), extra: "" }
}

pub(crate) fn error(status: u16, msg: impl Into<String>) -> Reply {
    reply(status, json!({ "error": msg.into() }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

fn encode(status: u16, content_type: &str, body: &[u8], extra: &str, keep: bool, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: {}\r\n{extra}\r\n",
        reason(status),
        body.len(),
        if keep { "keep-alive" } else { "close" },
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// A parsed request.
pub(crate) struct Req {
    method: String,
    /// Path without the query.
    path: String,
    /// Decoded query parameters.
    query: Vec<(String, String)>,
    authorization: Option<String>,
    accept: Option<String>,
    last_event_id: Option<u64>,
    /// The request body (JSON on write endpoints; empty when none was sent).
    body: Vec<u8>,
}

/// A query parameter (the first of that name).
pub(crate) fn param(req: &Req, key: &str) -> Option<String> {
    req.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn unmapped(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Reads need a source in `[api] read_allow`.
fn authorize_read(state: &AdminState, peer: IpAddr) -> Option<Reply> {
    let g = state.current.load();
    let api = g.cfg.api.as_ref()?;
    let peer = unmapped(peer);
    if api.read_allow.iter().any(|net| net.contains(&peer)) {
        None
    } else {
        Some(error(403, format!("{peer} is not in [api] read_allow")))
    }
}

fn authorize_write(state: &AdminState, peer: IpAddr, req: &Req) -> Option<Reply> {
    let g = state.current.load();
    let Some(api) = &g.cfg.api else { return Some(error(403, "the API is not configured for writes")) };
    let peer = unmapped(peer);
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

const GET_ROUTES: [&str; 10] =
    ["/", "/health", "/ready", "/metrics", "/api/v1/status", "/api/v1/listeners", "/api/v1/upstreams", "/api/v1/events", "/api/v1/skim", "/api/v1/skim/rates"];

fn route(state: &AdminState, peer: IpAddr, req: &Req) -> Reply {
    let path = req.path.as_str();
    if let Some(access) = atlas_game::api::access(&req.method, path) {
        let denied = match access {
            atlas_game::api::Access::Read => authorize_read(state, peer),
            atlas_game::api::Access::Write => authorize_write(state, peer, req),
        };
        if let Some(d) = denied {
            return d;
        }
        let (status, body) = atlas_game::api::handle(&req.method, path, &req.body);
        return reply(status, body);
    }
    if let Some(access) = atlas_game::rooms::api::access(&req.method, path) {
        let denied = match access {
            atlas_game::api::Access::Read => authorize_read(state, peer),
            atlas_game::api::Access::Write => authorize_write(state, peer, req),
        };
        if let Some(d) = denied {
            return d;
        }
        let (status, body) = atlas_game::rooms::api::handle(&req.method, path, &req.query, &req.body, unmapped(peer));
        let mut r = reply(status, body);
        if status == 429 || status == 503 {
            r.extra = "Retry-After: 1\r\n";
        }
        return r;
    }
    let get = req.method == "GET" || req.method == "HEAD";
    let only = |allowed: &'static str| {
        let mut r = error(405, format!("{} is not allowed on {path}; use {allowed}", req.method));
        r.extra = if allowed == "GET" { "Allow: GET, HEAD\r\n" } else { "Allow: POST\r\n" };
        r
    };
    if GET_ROUTES.contains(&path) {
        if !get {
            return only("GET");
        }
        match path {
            "/health" => return reply(200, json!({ "status": "ok" })),
            "/ready" => {
                return if atlas_proxy::drain::process_drain_requested() {
                    reply(503, json!({ "ready": false, "reason": "draining" }))
                } else if !state.ready.load(Ordering::Relaxed) {
                    reply(503, json!({ "ready": false, "reason": "starting" }))
                } else {
                    reply(200, json!({ "ready": true }))
                };
            }
            _ => {}
        }
        if let Some(denied) = authorize_read(state, peer) {
            return denied;
        }
        return match path {
            "/" => Reply { status: 200, body: Body::Raw("text/html; charset=utf-8", DASHBOARD.as_bytes().to_vec()), extra: "" },
            "/metrics" => Reply { status: 200, body: Body::Raw("text/plain; version=0.0.4; charset=utf-8", prometheus::render(state).into_bytes()), extra: "" },
            "/api/v1/status" => reply(200, api::status(state)),
            "/api/v1/listeners" => reply(200, api::listeners(state)),
            "/api/v1/upstreams" => reply(200, api::upstreams(state)),
            "/api/v1/events" => match param(req, "limit").map(|v| v.parse::<usize>()) {
                None => reply(200, api::events(50)),
                Some(Ok(n)) => reply(200, api::events(n)),
                Some(Err(_)) => error(400, "`limit` must be a non-negative integer"),
            },
            "/api/v1/skim" => skim::samples(state, req),
            _ => skim::rates(state, req),
        };
    }
    let action = path.strip_prefix("/api/v1/upstreams/").and_then(|rest| rest.rsplit_once('/'));
    match action {
        Some((name, verb @ ("drain" | "enable"))) if !name.is_empty() && !name.contains('/') => {
            if req.method != "POST" {
                return only("POST");
            }
            if let Some(denied) = authorize_write(state, peer, req) {
                return denied;
            }
            let reason = match api::action_reason(&req.body) {
                Ok(r) => r,
                Err(e) => return e,
            };
            api::set_drained(state, &percent_decode(name), verb == "drain", reason.as_deref())
        }
        _ => error(404, format!("no route for {} {path}", req.method)),
    }
}

/// How the body of a request is framed.
enum Framing {
    None,
    Length(usize),
    /// Refused: the reply to send (and then close).
    Refused(Reply),
}

/// Reads the request's parts from a complete head, and how its body is framed.
fn parse(req: &httparse::Request) -> (Req, bool, Framing) {
    let keep = req.version == Some(1) && !req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close"));
    let lengths: Vec<&[u8]> = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length")).map(|h| h.value).collect();
    let framing = if req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("transfer-encoding")) {
        Framing::Refused(error(411, "send the body with Content-Length (Transfer-Encoding is not accepted here)"))
    } else {
        match lengths.as_slice() {
            [] => Framing::None,
            [v] => match std::str::from_utf8(v).ok().and_then(|t| t.trim().parse::<usize>().ok()) {
                Some(0) => Framing::None,
                Some(n) if n <= MAX_BODY => Framing::Length(n),
                Some(_) => Framing::Refused(error(413, format!("request bodies are limited to {MAX_BODY} bytes"))),
                None => Framing::Refused(error(400, "invalid Content-Length")),
            },
            _ => Framing::Refused(error(400, "more than one Content-Length")),
        }
    };
    let header = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value).into_owned());
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let r = Req {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: parse_query(query),
        authorization: header("authorization"),
        accept: header("accept"),
        last_event_id: header("last-event-id").and_then(|v| v.trim().parse().ok()),
        body: Vec::new(),
    };
    (r, keep, framing)
}

async fn serve(mut s: TcpStream, peer: SocketAddr, state: Arc<AdminState>) {
    let mut buf = take_buf();
    loop {
        let parsed = loop {
            let mut h = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut h);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let (mut r, keep, framing) = parse(&req);
                    let len = match framing {
                        Framing::None => 0,
                        Framing::Length(len) => len,
                        Framing::Refused(reply) => break Some((buf.len(), reply, false, false)),
                    };
                    // The body follows the head: wait for all of it.
                    while buf.len() < n + len {
                        match monoio::time::timeout(Duration::from_secs(10), read_more(&mut s, &mut buf, MAX_HEAD + MAX_BODY + 1024)).await {
                            Ok(Ok(got)) if got > 0 => {}
                            _ => break,
                        }
                    }
                    if buf.len() < n + len {
                        break None;
                    }
                    r.body = buf[n..n + len].to_vec();
                    let out = route(&state, peer.ip(), &r);
                    break Some((n + len, out, keep, r.method == "HEAD"));
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                _ => break Some((buf.len(), error(400, "malformed request"), false, false)),
            }
            match monoio::time::timeout(Duration::from_secs(10), read_more(&mut s, &mut buf, MAX_HEAD + 1024)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => break None,
            }
        };
        let Some((n, out, keep, head_only)) = parsed else { break };
        buf.drain(..n);
        let mut bytes = match out.body {
            Body::Json(v) => encode(out.status, "application/json", v.to_string().as_bytes(), out.extra, keep, head_only),
            Body::Raw(ct, b) => encode(out.status, ct, &b, out.extra, keep, head_only),
            Body::Sse(tap, since) => {
                if !head_only {
                    skim::stream(&mut s, tap, since).await;
                }
                break;
            }
        };
        if write_vec(&mut s, &mut bytes).await.is_err() || !keep {
            break;
        }
    }
    give_buf(buf);
}

/// Entry points for the `admin_request` fuzz target (`fuzz/`).
pub mod fuzzing {
    /// Parses `data` as an API request head and decodes its query; never
    /// panics. What it accepts: a path without `?`, at most one parameter
    /// per `&`-separated piece, and text without `%`/`+` decoded as itself.
    pub fn check_request(data: &[u8]) {
        let mut h = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut h);
        if let Ok(httparse::Status::Complete(_)) = req.parse(data) {
            let (r, _, _framing) = super::parse(&req);
            assert!(!r.path.contains('?'));
            let query = req.path.unwrap_or("").split_once('?').map(|x| x.1).unwrap_or("");
            assert!(r.query.len() <= query.split('&').count());
            for (k, v) in &r.query {
                let _ = super::param(&r, k);
                let _ = v.parse::<u64>();
            }
        }
        if let Ok(text) = std::str::from_utf8(data) {
            let decoded = super::percent_decode(text);
            if !text.contains('%') && !text.contains('+') {
                assert_eq!(decoded, text);
            }
            let _ = super::parse_query(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = parse_query("listener=web%20a&limit=5&x&b=%zz&c=a+b&d=%4");
        assert_eq!(q[0], ("listener".into(), "web a".into()));
        assert_eq!(q[1], ("limit".into(), "5".into()));
        assert_eq!(q[2], ("x".into(), "".into()));
        assert_eq!(q[3], ("b".into(), "%zz".into()));
        assert_eq!(q[4], ("c".into(), "a b".into()));
        assert_eq!(q[5], ("d".into(), "%4".into()));
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%e2%82%ac"), "€");
    }
}
