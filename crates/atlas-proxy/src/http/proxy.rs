//! One client connection of the HTTP/1.1 reverse proxy, from first byte to
//! close: read a request head, pick and reach an upstream (pool or connect,
//! with retries), stream the request body, stream the response back, return
//! the upstream connection to the pool, repeat for keep-alive and pipelined
//! requests in order. `Upgrade` requests that get `101` become a byte pipe.
//! Requests whose path matches a static route (or every request on a
//! static listener) are answered from files instead.
//!
//! Bodies are streamed through fixed buffers, never held whole. Every wait
//! has a timeout (header read, idle keep-alive, body reads, upstream
//! response head, upstream body reads). Errors before any response byte was
//! sent become a short 4xx/5xx reply; after that the connection is closed.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;

use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::time::{timeout, timeout_at, Instant};

use super::chunked::ChunkedScanner;
use super::codec::{self, BodyKind, HeadError, RequestInfo, ResponseCtx, RewriteCtx};
use super::record::{record, Details, Outcome};
use crate::drain::Drain;
use crate::error::{ProxyError, Side};
use crate::io::{give_buf, pipe_both, read_more, take_buf, write_range, write_vec, ClientStream, Metered, BUF_SIZE};
use crate::static_files::{self, StaticSite};
use crate::upstream::{self, InflightGuard, UpstreamConn};
use crate::{ListenerCtx, Target};
use atlas_observe::metrics::Reject;
use atlas_observe::skim;

/// How long an idle keep-alive connection may still send one request after
/// a drain starts (it then gets `Connection: close`).
const DRAIN_IDLE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

struct Bufs {
    /// Bytes from the client not yet consumed (next request, body).
    cbuf: Vec<u8>,
    /// Bytes from the upstream.
    ubuf: Vec<u8>,
    /// Rewritten heads (request, then response) plus body bytes to send.
    out: Vec<u8>,
}

enum Step {
    KeepAlive,
    Close,
    Upgrade(UpstreamConn),
}

/// Serves one client connection until it closes. `client_fd` is the
/// underlying socket, used to wake a tunnel when its other half fails.
pub async fn serve<S: ClientStream>(ctx: Rc<ListenerCtx>, client: S, peer: SocketAddr, client_fd: RawFd) {
    let drain = Drain::current();
    let _live = drain.connection();
    let mut ctx = ctx;
    let mut client = Metered::new(client);
    // Bytes read from the client but not yet consumed by a request.
    let mut carried = 0u64;
    let mut b = Bufs { cbuf: take_buf(), ubuf: Vec::new(), out: Vec::new() };
    loop {
        if b.cbuf.is_empty() {
            // Idle keep-alive: hand the scratch buffers back to the worker's
            // pool while waiting, so with many mostly-idle connections the
            // buffers in use stay few and warm in cache. A drain closes the
            // connection here, between requests.
            give_buf(std::mem::take(&mut b.ubuf));
            give_buf(std::mem::take(&mut b.out));
            let max = ctx.limits.max_header_bytes + BUF_SIZE;
            match timeout(ctx.timeouts.client_idle, client.read_idle(&mut b.cbuf, max, &drain)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) if drain.is_draining() => {
                    // Drained while idle. A client may be sending its next
                    // request right now: give it a moment; that request is
                    // answered with `Connection: close`, and only a silent
                    // connection is closed.
                    match timeout(DRAIN_IDLE_GRACE, read_more(&mut client, &mut b.cbuf, max)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => break,
                    }
                }
                _ => break,
            }
        }
        // A reload since the last request: use the new configuration.
        if let Some(newer) = ListenerCtx::latest(&ctx) {
            ctx = newer;
        }
        if b.out.capacity() == 0 {
            b.ubuf = take_buf();
            b.out = take_buf();
        }
        let started = std::time::Instant::now();
        let mut o = Outcome::default();
        let step = match ctx.timeouts.request {
            None => exchange(&ctx, &mut client, peer, &mut b, &mut o).await,
            Some(limit) => match timeout(limit, exchange(&ctx, &mut client, peer, &mut b, &mut o)).await {
                Ok(step) => step,
                Err(_) => {
                    tracing::debug!(%peer, ?limit, "client: request exceeded timeouts.request; closing");
                    Step::Close
                }
            },
        };
        let io = client.take_counts();
        let consumed = (io.0 + carried).saturating_sub(b.cbuf.len() as u64);
        carried = b.cbuf.len() as u64;
        record(&ctx, peer, started, io, consumed, o);
        match step {
            Step::KeepAlive => continue,
            Step::Close => break,
            Step::Upgrade(up) => {
                tunnel(&ctx, client.inner, up, client_fd, b).await;
                return;
            }
        }
    }
    // Bytes of a connection that ended between requests.
    let (bytes_in, bytes_out) = client.take_counts();
    ctx.stats().bytes_in.add(bytes_in);
    ctx.stats().bytes_out.add(bytes_out);
    give_buf(b.cbuf);
    give_buf(b.ubuf);
    give_buf(b.out);
}

/// Sends a short response of Atlas' own; `head`: the request was HEAD.
async fn reply<S: AsyncWriteRent>(client: &mut S, b: &mut Bufs, o: &mut Outcome<'_>, status: u16, msg: &str, keep_alive: bool, head: bool) -> Step {
    o.status = status;
    b.out = codec::simple_response(status, msg, keep_alive, head, "");
    match write_vec(client, &mut b.out).await {
        Ok(()) if keep_alive => Step::KeepAlive,
        _ => Step::Close,
    }
}

enum Head<T> {
    Request(T),
    /// Client went away or stayed idle: close quietly.
    Gone,
    Refuse(u16, &'static str, Reject),
}

/// Reads until `parse` accepts a whole request head (or refuses it). The
/// first byte may take `client_idle`; the rest of the head must arrive
/// within `client_header` of it (slowloris), and it may not exceed
/// `max_header_bytes`.
async fn read_head<S: AsyncReadRent, T>(
    ctx: &ListenerCtx,
    client: &mut S,
    b: &mut Bufs,
    mut parse: impl FnMut(&[u8], &mut Vec<u8>) -> Result<Option<T>, HeadError>,
    head_len: impl Fn(&T) -> usize,
) -> Head<T> {
    let limits = &ctx.limits;
    if b.cbuf.is_empty() {
        match timeout(ctx.timeouts.client_idle, read_more(client, &mut b.cbuf, limits.max_header_bytes + BUF_SIZE)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Head::Gone,
        }
    }
    let deadline = Instant::now() + ctx.timeouts.client_header;
    loop {
        b.out.clear();
        match parse(&b.cbuf, &mut b.out) {
            Ok(Some(info)) if head_len(&info) > limits.max_header_bytes => return Head::Refuse(431, "request head too large", Reject::HeaderTooLarge),
            Ok(Some(info)) => return Head::Request(info),
            Ok(None) if b.cbuf.len() >= limits.max_header_bytes => return Head::Refuse(431, "request head too large", Reject::HeaderTooLarge),
            Ok(None) => match timeout_at(deadline, read_more(client, &mut b.cbuf, limits.max_header_bytes + BUF_SIZE)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Head::Gone,
                Err(_) => return Head::Refuse(408, "request header timeout", Reject::HeaderTimeout),
            },
            Err(e) => return Head::Refuse(e.status(), e.reason(), e.reject()),
        }
    }
}

/// Answers a request head that was refused (and counts why); closes.
async fn refuse<S: AsyncWriteRent>(client: &mut S, b: &mut Bufs, o: &mut Outcome<'_>, peer: SocketAddr, why: (u16, &'static str, Reject)) -> Step {
    let (status, reason, reject) = why;
    tracing::debug!(%peer, status, reason, "request refused");
    o.request = true;
    o.reject = Some(reject);
    reply(client, b, o, status, reason, false, false).await
}

/// One exchange on a listener that only serves static files.
async fn static_exchange<S: ClientStream>(ctx: &ListenerCtx, site: &StaticSite, client: &mut S, peer: SocketAddr, b: &mut Bufs, o: &mut Outcome<'_>) -> Step {
    let max_headers = ctx.limits.max_headers;
    let req = match read_head(ctx, client, b, |buf, _| static_files::parse(buf, max_headers), |r| r.head_len).await {
        Head::Request(r) => r,
        Head::Gone => return Step::Close,
        Head::Refuse(status, why, reject) => return refuse(client, b, o, peer, (status, why, reject)).await,
    };
    o.request = true;
    let skim = ctx.skim.as_ref().is_some_and(|s| s.all);
    if skim || ctx.access_log.is_some() {
        o.details = Some(Details::capture(&b.cbuf[..req.head_len], &[], skim, 0, ctx.access_log.is_some()));
    }
    b.cbuf.drain(..req.head_len);
    serve_static(site, client, &req, b, o).await
}

/// Answers from files; the status is read back from the head it sent.
async fn serve_static<S: ClientStream>(site: &StaticSite, client: &mut S, req: &static_files::StaticReq, b: &mut Bufs, o: &mut Outcome<'_>) -> Step {
    let keep = static_files::respond(site, client, req, &mut b.out).await;
    o.status = codec::head_status(&b.out).unwrap_or(499);
    if keep {
        Step::KeepAlive
    } else {
        Step::Close
    }
}

/// Request body still to be read from the client after the first buffer.
enum BodyLeft {
    Done,
    Length(u64),
    Chunked(ChunkedScanner),
}

/// Appends the body bytes already buffered to `out` and consumes the head
/// and those bytes from `cbuf`.
fn take_initial_body(info: &RequestInfo, b: &mut Bufs) -> Result<(BodyLeft, u64), &'static str> {
    let rest = &b.cbuf[info.head_len..];
    let (used, left) = match info.body {
        BodyKind::None | BodyKind::UntilClose => (0, BodyLeft::Done),
        BodyKind::Length(n) => {
            let avail = (rest.len() as u64).min(n) as usize;
            (avail, if avail as u64 == n { BodyLeft::Done } else { BodyLeft::Length(n - avail as u64) })
        }
        BodyKind::Chunked => {
            let mut sc = ChunkedScanner::new();
            let used = sc.scan(rest, |_| {}).map_err(|e| e.as_str())?;
            (used, if sc.is_done() { BodyLeft::Done } else { BodyLeft::Chunked(sc) })
        }
    };
    b.out.extend_from_slice(&rest[..used]);
    b.cbuf.drain(..info.head_len + used);
    Ok((left, used as u64))
}

/// Streams the rest of a request body from client to upstream.
async fn stream_request_body<S: AsyncReadRent>(
    ctx: &ListenerCtx,
    client: &mut S,
    up: &mut UpstreamConn,
    b: &mut Bufs,
    mut left: BodyLeft,
    mut sent: u64,
) -> Result<(), ProxyError> {
    loop {
        let need = match &left {
            BodyLeft::Done => return Ok(()),
            _ => b.cbuf.is_empty(),
        };
        if need {
            match timeout(ctx.timeouts.client_body, read_more(client, &mut b.cbuf, BUF_SIZE)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) => return Err(ProxyError::new(Side::Client, false, "client closed during request body")),
                Ok(Err(e)) => return Err(ProxyError::io(Side::Client, false, "client read failed", e)),
                Err(_) => return Err(ProxyError::new(Side::Client, false, "request body timed out")),
            }
        }
        let used = match &mut left {
            BodyLeft::Done => 0,
            BodyLeft::Length(n) => {
                let used = (b.cbuf.len() as u64).min(*n) as usize;
                *n -= used as u64;
                if *n == 0 {
                    left = BodyLeft::Done;
                }
                used
            }
            BodyLeft::Chunked(sc) => {
                let used = sc.scan(&b.cbuf, |_| {}).map_err(|e| ProxyError::new(Side::Client, false, e.as_str()))?;
                if sc.is_done() {
                    left = BodyLeft::Done;
                }
                used
            }
        };
        sent += used as u64;
        if ctx.limits.max_body_bytes > 0 && sent > ctx.limits.max_body_bytes {
            return Err(ProxyError::new(Side::Client, false, "request body too large"));
        }
        write_range(up, &mut b.cbuf, 0..used).await.map_err(|e| ProxyError::io(Side::Upstream, false, "upstream write failed", e))?;
        b.cbuf.drain(..used);
    }
}

/// Waits for the first bytes of the upstream's response. Failing here,
/// with nothing received, is what makes a replayable request safe to retry.
async fn first_response_bytes(ctx: &ListenerCtx, up: &mut UpstreamConn, b: &mut Bufs) -> Result<Instant, ProxyError> {
    let deadline = Instant::now() + ctx.timeouts.upstream_response;
    match timeout_at(deadline, read_more(up, &mut b.ubuf, MAX_RESPONSE_HEAD + BUF_SIZE)).await {
        Ok(Ok(n)) if n > 0 => Ok(deadline),
        Ok(Ok(_)) => Err(ProxyError::new(Side::Upstream, true, "upstream closed before responding")),
        Ok(Err(e)) => Err(ProxyError::io(Side::Upstream, true, "upstream read failed", e)),
        Err(_) => Err(ProxyError::new(Side::Upstream, false, "upstream response timed out")),
    }
}

/// Reads more of a response head that is not complete yet.
async fn more_response_head(up: &mut UpstreamConn, b: &mut Bufs, deadline: Instant) -> Result<(), ProxyError> {
    if b.ubuf.len() > MAX_RESPONSE_HEAD {
        return Err(ProxyError::new(Side::Upstream, false, "response head too large"));
    }
    match timeout_at(deadline, read_more(up, &mut b.ubuf, MAX_RESPONSE_HEAD + BUF_SIZE)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err(ProxyError::new(Side::Upstream, false, "upstream closed inside the response head")),
        Ok(Err(e)) => Err(ProxyError::io(Side::Upstream, false, "upstream read failed", e)),
        Err(_) => Err(ProxyError::new(Side::Upstream, false, "upstream response timed out")),
    }
}

/// One request/response exchange on a client connection.
async fn exchange<'c, S: ClientStream>(ctx: &'c ListenerCtx, client: &mut S, peer: SocketAddr, b: &mut Bufs, o: &mut Outcome<'c>) -> Step {
    if let (Some(Target::Static(site)), true) = (&ctx.default, ctx.routes.is_empty()) {
        return static_exchange(ctx, site, client, peer, b, o).await;
    }
    let rctx = RewriteCtx { client_ip: peer.ip(), proto: ctx.proto, max_headers: ctx.limits.max_headers, hash_key: ctx.hash_key.as_ref() };
    let info = match read_head(ctx, client, b, |buf, out| codec::rewrite_request(buf, out, &rctx), |i| i.head_len).await {
        Head::Request(info) => info,
        Head::Gone => return Step::Close,
        Head::Refuse(status, why, reject) => return refuse(client, b, o, peer, (status, why, reject)).await,
    };
    o.request = true;
    o.status = 499;
    let path: &[u8] = if info.target.0 == info.target.1 { b"/" } else { &b.cbuf[info.target.0..info.target.1] };
    let routed = ctx.route(path);
    let skim = routed.is_some_and(|r| r.1);
    if skim || ctx.access_log.is_some() {
        let payload_bytes = ctx.skim.as_ref().map_or(0, |s| s.payload_bytes);
        o.details = Some(Details::capture(&b.cbuf[..info.head_len], &b.cbuf[info.head_len..], skim, payload_bytes, ctx.access_log.is_some()));
    }
    let up = match routed {
        Some((Target::Upstreams(up), _)) => up,
        Some((Target::Static(site), _)) => {
            // A static route on a proxying listener: the head was validated
            // by the proxy parser; read what a static answer needs from it.
            let req = match static_files::parse(&b.cbuf[..info.head_len], ctx.limits.max_headers) {
                Ok(Some(r)) => r,
                _ => return reply(client, b, o, 400, "malformed request", false, info.is_head).await,
            };
            b.cbuf.drain(..info.head_len);
            return serve_static(site, client, &req, b, o).await;
        }
        None => return reply(client, b, o, 503, "no route for this path", false, info.is_head).await,
    };
    if !crate::limits::admit_request(peer.ip(), &ctx.limits) {
        let keep = info.keep_alive && info.body == BodyKind::None;
        o.status = 429;
        o.reject = Some(Reject::RateLimit);
        b.out = codec::simple_response(429, "too many requests from this address", keep, info.is_head, "Retry-After: 1\r\n");
        return match write_vec(client, &mut b.out).await {
            Ok(()) if keep => {
                b.cbuf.drain(..info.head_len);
                Step::KeepAlive
            }
            _ => Step::Close,
        };
    }
    let max_body = ctx.limits.max_body_bytes;
    if let (BodyKind::Length(n), true) = (info.body, max_body > 0) {
        if n > max_body {
            o.reject = Some(Reject::BodyTooLarge);
            return reply(client, b, o, 413, "request body too large", false, info.is_head).await;
        }
    }
    let (left, initial_body) = match take_initial_body(&info, b) {
        Ok(l) => l,
        Err(why) => {
            o.reject = Some(Reject::Smuggling);
            return reply(client, b, o, 400, why, false, info.is_head).await;
        }
    };
    let replayable = matches!(left, BodyLeft::Done);
    if info.expect_continue && !replayable {
        let mut cont = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        if write_vec(client, &mut cont).await.is_err() {
            return Step::Close;
        }
    }
    let group = &*up.group;
    upstream::retry_budget_deposit();
    let mut left = Some(left);
    let mut excluded = 0u64;
    let mut use_pool = true;
    let mut tries = 0;
    loop {
        tries += 1;
        let mut c = match upstream::connect(ctx, up, info.hash, &mut excluded, use_pool).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "no upstream");
                let keep = replayable && info.keep_alive;
                let msg = match e.side {
                    Side::Config if e.what.contains("max_conns") => "upstreams busy",
                    Side::Config => "no healthy upstream available",
                    _ => "upstream unavailable",
                };
                return reply(client, b, o, e.status(), msg, keep, info.is_head).await;
            }
        };
        o.upstream = Some((up, c.idx));
        let _inflight = InflightGuard::new(group, ctx.worker, c.idx);
        let sent_at = std::time::Instant::now();
        let sent = match write_vec(&mut c.conn, &mut b.out).await {
            Ok(()) => match left.take() {
                Some(l) => stream_request_body(ctx, client, &mut c.conn, b, l, initial_body).await,
                None => Ok(()),
            },
            Err(e) => Err(ProxyError::io(Side::Upstream, true, "upstream write failed", e)),
        };
        b.ubuf.clear();
        let result = match sent {
            Ok(()) => first_response_bytes(ctx, &mut c.conn, b).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(deadline) => return respond(ctx, client, up, c, b, &info, deadline, sent_at, o).await,
            Err(e) if e.side == Side::Upstream && e.retry_safe && replayable && c.reused && tries < 3 => {
                // A pooled connection the upstream had closed: once more, fresh.
                tracing::debug!(error = %e, "stale pooled connection, retrying on a fresh one");
                o.retries += 1;
                use_pool = false;
                left = Some(BodyLeft::Done);
                continue;
            }
            Err(e) if e.side == Side::Upstream && e.retry_safe && replayable && info.idempotent && tries < 3 && upstream::retry_budget_take() => {
                // The upstream failed before answering an idempotent request
                // we still hold whole: try another upstream (budgeted).
                o.retries += 1;
                up.failed(c.idx, ctx.worker);
                tracing::debug!(error = %e, upstream = %group.names[c.idx], "retrying an idempotent request on another upstream");
                if c.idx < 64 {
                    excluded |= 1 << c.idx;
                }
                left = Some(BodyLeft::Done);
                continue;
            }
            Err(e) if e.side == Side::Client && e.status() == 413 => {
                o.reject = Some(Reject::BodyTooLarge);
                return reply(client, b, o, 413, "request body too large", false, info.is_head).await;
            }
            Err(e) if e.side == Side::Client => {
                tracing::debug!(%peer, error = %e, "client failed during the request");
                if e.client_gone() {
                    return Step::Close;
                }
                // Nothing of a response has reached the client: say why,
                // then close (the upstream connection, which got part of
                // the request, is dropped). A malformed chunked body is
                // 400 and counted with the framing attacks; a body that
                // stopped coming is 408.
                if e.status() == 400 {
                    o.reject = Some(Reject::Smuggling);
                }
                return reply(client, b, o, e.status(), e.what, false, info.is_head).await;
            }
            Err(e) => {
                up.failed(c.idx, ctx.worker);
                crate::log_limited(|| {
                    tracing::warn!(%peer, upstream = %group.names[c.idx], error = %e, "request failed");
                    atlas_observe::events::record("error", "upstream", format!("{}: {e}", group.names[c.idx]));
                });
                let keep = info.keep_alive && replayable;
                let msg = if e.status() == 504 { "upstream timed out" } else { "upstream failed" };
                return reply(client, b, o, e.status(), msg, keep, info.is_head).await;
            }
        }
    }
}

/// Sends the response whose head is in `ubuf` to the client, then the body.
#[allow(clippy::too_many_arguments)]
async fn respond<S: ClientStream>(
    ctx: &ListenerCtx,
    client: &mut S,
    up: &upstream::Upstreams,
    mut c: upstream::Connected,
    b: &mut Bufs,
    req: &RequestInfo,
    deadline: Instant,
    sent_at: std::time::Instant,
    o: &mut Outcome<'_>,
) -> Step {
    // While draining, answer with `Connection: close` so the client goes elsewhere.
    let keep = req.keep_alive && !Drain::current().is_draining();
    let rctx = ResponseCtx { client_http11: req.http11, client_keep_alive: keep, request_is_head: req.is_head, request_upgrade: req.upgrade };
    // Interim (1xx) responses are relayed, then the final one is read.
    let (res, client_keep) = loop {
        b.out.clear();
        match codec::rewrite_response(&b.ubuf, &mut b.out, &rctx) {
            Ok(Some((res, keep))) if (100..200).contains(&res.status) && !(res.status == 101 && req.upgrade) => {
                let _ = keep;
                if write_vec(client, &mut b.out).await.is_err() {
                    return Step::Close;
                }
                b.ubuf.drain(..res.head_len);
                if b.ubuf.is_empty() {
                    if let Err(e) = more_response_head(&mut c.conn, b, deadline).await {
                        tracing::debug!(error = %e, "after an interim response");
                        return Step::Close;
                    }
                }
            }
            Ok(Some(x)) => break x,
            Ok(None) => {
                if let Err(e) = more_response_head(&mut c.conn, b, deadline).await {
                    up.failed(c.idx, ctx.worker);
                    crate::log_limited(|| tracing::warn!(upstream = %c.addr, error = %e, "response head failed"));
                    return reply(client, b, o, e.status(), "upstream failed", false, req.is_head).await;
                }
            }
            Err(why) => {
                up.failed(c.idx, ctx.worker);
                crate::log_limited(|| {
                    tracing::warn!(upstream = %c.addr, why, "malformed upstream response");
                    atlas_observe::events::record("error", "upstream", format!("{}: malformed response: {why}", up.group.names[c.idx]));
                });
                return reply(client, b, o, 502, "invalid upstream response", false, req.is_head).await;
            }
        }
    };
    up.responded(c.idx, ctx.worker, res.status, sent_at.elapsed().as_micros() as u64);
    o.status = res.status;
    let rest_start = res.head_len;
    if let Some(d) = o.details.as_mut().filter(|d| d.skim) {
        d.response_payload = skim::payload(&b.ubuf[rest_start..], ctx.skim.as_ref().map_or(0, |s| s.payload_bytes));
    }
    if res.status == 101 {
        // Switching protocols: head now, leftovers in `tunnel`.
        if write_vec(client, &mut b.out).await.is_err() {
            return Step::Close;
        }
        b.ubuf.drain(..rest_start);
        return Step::Upgrade(c.conn);
    }
    let idle = ctx.timeouts.upstream_idle;
    let mut upstream_clean = res.upstream_keep_alive;
    let ok = match res.body {
        BodyKind::None => {
            upstream_clean &= b.ubuf.len() == rest_start;
            write_vec(client, &mut b.out).await.is_ok()
        }
        BodyKind::Length(n) => {
            let avail = ((b.ubuf.len() - rest_start) as u64).min(n) as usize;
            upstream_clean &= b.ubuf.len() - rest_start <= avail;
            b.out.extend_from_slice(&b.ubuf[rest_start..rest_start + avail]);
            let mut left = n - avail as u64;
            let mut ok = write_vec(client, &mut b.out).await.is_ok();
            while ok && left > 0 {
                b.ubuf.clear();
                match timeout(idle, read_more(&mut c.conn, &mut b.ubuf, BUF_SIZE)).await {
                    Ok(Ok(got)) if got > 0 => {
                        let take = (got as u64).min(left) as usize;
                        upstream_clean &= take == got;
                        left -= take as u64;
                        ok = write_range(client, &mut b.ubuf, 0..take).await.is_ok();
                    }
                    _ => {
                        tracing::warn!("upstream body ended early or stalled");
                        ok = false;
                    }
                }
            }
            ok
        }
        BodyKind::Chunked => {
            let dechunk = !req.http11;
            let mut sc = ChunkedScanner::new();
            let mut ok = true;
            let mut start = rest_start;
            loop {
                let chunk = &b.ubuf[start..];
                let mut scratch = std::mem::take(&mut b.out);
                let used = match sc.scan(chunk, |r| {
                    if dechunk {
                        scratch.extend_from_slice(&chunk[r]);
                    }
                }) {
                    Ok(used) => used,
                    Err(e) => {
                        tracing::warn!(error = e.as_str(), "bad chunked response from upstream");
                        b.out = scratch;
                        ok = false;
                        break;
                    }
                };
                if !dechunk {
                    scratch.extend_from_slice(&chunk[..used]);
                }
                b.out = scratch;
                upstream_clean &= used == chunk.len();
                if write_vec(client, &mut b.out).await.is_err() {
                    ok = false;
                    break;
                }
                if sc.is_done() {
                    break;
                }
                b.out.clear();
                b.ubuf.clear();
                start = 0;
                match timeout(idle, read_more(&mut c.conn, &mut b.ubuf, BUF_SIZE)).await {
                    Ok(Ok(got)) if got > 0 => {}
                    _ => {
                        tracing::warn!("upstream chunked body ended early or stalled");
                        ok = false;
                        break;
                    }
                }
            }
            ok
        }
        BodyKind::UntilClose => {
            b.out.extend_from_slice(&b.ubuf[rest_start..]);
            let mut ok = write_vec(client, &mut b.out).await.is_ok();
            while ok {
                b.ubuf.clear();
                match timeout(idle, read_more(&mut c.conn, &mut b.ubuf, BUF_SIZE)).await {
                    Ok(Ok(got)) if got > 0 => ok = write_vec(client, &mut b.ubuf).await.is_ok(),
                    Ok(Ok(_)) => break,
                    _ => ok = false,
                }
            }
            upstream_clean = false;
            ok
        }
    };
    if ok && upstream_clean {
        ctx.pool.put(c.addr, c.tls, c.conn);
    }
    if ok && client_keep {
        Step::KeepAlive
    } else {
        Step::Close
    }
}

/// After `101 Switching Protocols`: a byte pipe both ways until both close.
async fn tunnel<S: ClientStream>(ctx: &ListenerCtx, mut client: S, mut up: UpstreamConn, client_fd: RawFd, mut b: Bufs) {
    let up_fd = up.raw_fd();
    // Bytes that arrived with the heads belong to the new protocol.
    let early_ok = write_vec(&mut client, &mut b.ubuf).await.is_ok() && write_vec(&mut up, &mut b.cbuf).await.is_ok();
    give_buf(b.cbuf);
    give_buf(b.ubuf);
    give_buf(b.out);
    if !early_ok {
        return;
    }
    let (sent, received) = pipe_both(client, up, [client_fd, up_fd], ctx.timeouts.tcp_idle).await;
    ctx.stats().bytes_in.add(sent);
    ctx.stats().bytes_out.add(received);
}
