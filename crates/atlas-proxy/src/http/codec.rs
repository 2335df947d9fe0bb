//! HTTP/1.1 message heads: parse (httparse), validate framing, and rewrite.
//!
//! Everything here is synchronous and pure so it can be unit tested and
//! fuzzed. A request head is parsed and, in the same pass, rewritten into the
//! head Atlas sends upstream: hop-by-hop headers removed (including those the
//! `Connection` header names), `X-Forwarded-For` appended, `X-Forwarded-Proto`
//! set, `Host` kept, and the body framing decided exactly once here. The
//! upstream always receives framing Atlas itself decided (a single
//! `Content-Length` or `Transfer-Encoding: chunked`), so it cannot see a
//! different message boundary than Atlas did (request smuggling).

use std::mem::MaybeUninit;
use std::net::IpAddr;

use atlas_balance::hash64;
use atlas_config::HashKey;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Responses only: the body ends when the upstream closes.
    UntilClose,
}

/// Why a request head was refused; maps to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Malformed: 400.
    Bad(&'static str),
    /// Ambiguous message framing, the stuff of request smuggling
    /// (conflicting lengths, CL with TE, TE in HTTP/1.0): 400.
    Framing(&'static str),
    /// Too many headers or too large: 431.
    TooLarge,
    /// A transfer coding we do not implement: 501.
    NotImplemented(&'static str),
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::Bad(_) | HeadError::Framing(_) => 400,
            HeadError::TooLarge => 431,
            HeadError::NotImplemented(_) => 501,
        }
    }
    /// How the refusal is counted (`atlas_rejected_total{reason}`). An
    /// unsupported transfer coding counts as smuggling: obfuscated
    /// `Transfer-Encoding` values are the classic vector.
    pub fn reject(self) -> atlas_observe::metrics::Reject {
        use atlas_observe::metrics::Reject;
        match self {
            HeadError::Bad(_) => Reject::Malformed,
            HeadError::Framing(_) | HeadError::NotImplemented(_) => Reject::Smuggling,
            HeadError::TooLarge => Reject::HeaderTooLarge,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            HeadError::Bad(r) | HeadError::Framing(r) | HeadError::NotImplemented(r) => r,
            HeadError::TooLarge => "request header fields too large",
        }
    }
}

/// What the proxy needs to know about a parsed request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo {
    /// Bytes of the head in the input buffer (body starts here).
    pub head_len: usize,
    pub body: BodyKind,
    /// HTTP/1.0 (`false`) or HTTP/1.1 (`true`).
    pub http11: bool,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    pub is_head: bool,
    /// GET, HEAD, OPTIONS, TRACE, PUT, DELETE: safe to replay.
    pub idempotent: bool,
    /// The client asked to switch protocols (`Connection: upgrade` + `Upgrade`).
    pub upgrade: bool,
    pub expect_continue: bool,
    /// Hash of the configured key (only when asked for).
    pub hash: u64,
    /// Where the (origin-form) request target lies in the input buffer;
    /// empty for an absolute-form target without a path (that is `/`).
    pub target: (usize, usize),
}

/// Per-request inputs of the rewrite.
pub struct RewriteCtx<'a> {
    pub client_ip: IpAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    pub max_headers: usize,
    /// Compute `RequestInfo::hash` from this key.
    pub hash_key: Option<&'a HashKey>,
}

const MAX_HEADERS_STACK: usize = 128;

/// Header slots for httparse, left uninitialised: httparse writes each slot
/// before it hands it back. An initialised `[EMPTY_HEADER; 128]` is 4 KiB
/// of stores per parse, about 600 instructions per request.
pub struct HeaderSlots<'b> {
    stack: [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS_STACK],
    heap: Vec<MaybeUninit<httparse::Header<'b>>>,
}

impl<'b> HeaderSlots<'b> {
    pub fn new() -> Self {
        HeaderSlots { stack: [const { MaybeUninit::uninit() }; MAX_HEADERS_STACK], heap: Vec::new() }
    }

    /// `n` slots: on the stack up to 128, else on the heap.
    pub fn get(&mut self, n: usize) -> &mut [MaybeUninit<httparse::Header<'b>>] {
        if n <= MAX_HEADERS_STACK {
            &mut self.stack[..n]
        } else {
            self.heap.resize_with(n, MaybeUninit::uninit);
            &mut self.heap
        }
    }
}

impl Default for HeaderSlots<'_> {
    fn default() -> Self {
        Self::new()
    }
}

/// Headers removed on every hop (RFC 9110 §7.6.1), plus the legacy ones.
fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 7] = [b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Comma-separated list elements with optional whitespace trimmed.
fn list_items(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim_ows).filter(|t| !t.is_empty())
}

/// A strict Content-Length: ASCII digits only, no sign, no list, no overflow.
pub fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &d| acc.checked_mul(10)?.checked_add((d - b'0') as u64))
}

/// Framing headers seen in a head, shared by requests and responses.
#[derive(Default)]
struct Framing {
    content_length: Option<u64>,
    cl_conflict: bool,
    te_seen: bool,
    /// Every transfer coding listed, last one is `chunked`, exactly once.
    te_chunked_final: bool,
    te_other: bool,
}

impl Framing {
    fn content_length(&mut self, v: &[u8]) -> bool {
        match parse_content_length(v) {
            Some(n) => {
                if self.content_length.is_some_and(|old| old != n) {
                    self.cl_conflict = true;
                }
                self.content_length = Some(n);
                true
            }
            None => false,
        }
    }

    fn transfer_encoding(&mut self, v: &[u8]) {
        self.te_seen = true;
        for item in list_items(v) {
            if self.te_chunked_final {
                // Anything after `chunked` (including a second `chunked`).
                self.te_chunked_final = false;
                self.te_other = true;
            }
            if item.eq_ignore_ascii_case(b"chunked") {
                self.te_chunked_final = !self.te_other;
            } else {
                self.te_other = true;
            }
        }
    }
}

fn connection_tokens<'h>(headers: &[httparse::Header<'h>], names: &mut Vec<&'h [u8]>) -> (bool, bool, bool) {
    let (mut close, mut keep_alive, mut upgrade) = (false, false, false);
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")) {
        for t in list_items(h.value) {
            if t.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                keep_alive = true;
            } else {
                if t.eq_ignore_ascii_case(b"upgrade") {
                    upgrade = true;
                }
                names.push(t);
            }
        }
    }
    (close, keep_alive, upgrade)
}

fn named_by_connection(name: &str, names: &[&[u8]]) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The address as text, for `X-Forwarded-For`. IPv4 (nearly every
/// request) is written octet by octet: `Display` through `fmt` cost about
/// 1,000 instructions per request, a fifth of parsing and rewriting a head.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = itoa::Buffer::new();
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(b.format(o).as_bytes());
            }
        }
        IpAddr::V6(_) => {
            use std::io::Write;
            let _ = write!(out, "{ip}");
        }
    }
}

/// `n` in decimal, without a `String` on the way.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A `Content-Length: n` header line.
pub fn push_content_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"Content-Length: ");
    push_u64(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Parses the request head at the start of `buf` and appends the rewritten
/// upstream head to `out`. `Ok(None)` means the head is not complete yet.
pub fn rewrite_request(buf: &[u8], out: &mut Vec<u8>, ctx: &RewriteCtx<'_>) -> Result<Option<RequestInfo>, HeadError> {
    let mut slots = HeaderSlots::new();
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, slots.get(ctx.max_headers)) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Bad("unsupported HTTP version")),
        Err(httparse::Error::HeaderName) => return Err(HeadError::Bad("invalid header name")),
        Err(httparse::Error::HeaderValue) => return Err(HeadError::Bad("invalid header value")),
        Err(httparse::Error::Token) => return Err(HeadError::Bad("invalid method or header token")),
        Err(_) => return Err(HeadError::Bad("malformed request")),
    };
    let method = req.method.unwrap_or("");
    let mut target = req.path.unwrap_or("");
    let http11 = req.version == Some(1);
    let headers = &*req.headers;

    // Absolute-form target: the authority replaces Host (RFC 9112 §3.2.2).
    let mut authority: Option<&str> = None;
    // `http://host` with no path: the target is `/`, written by Atlas (the
    // input has no such byte, so `target` stays an empty slice of `buf`).
    let mut root = false;
    for scheme in ["http://", "https://"] {
        let matches = target.as_bytes().get(..scheme.len()).is_some_and(|p| p.eq_ignore_ascii_case(scheme.as_bytes()));
        if matches && target.len() > scheme.len() {
            // The prefix is ASCII, so this index is a char boundary.
            let rest = &target[scheme.len()..];
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            if end == 0 || rest[..end].contains('@') {
                return Err(HeadError::Bad("invalid absolute-form target"));
            }
            authority = Some(&rest[..end]);
            root = end == rest.len();
            target = &rest[end..];
        }
    }
    if method == "CONNECT" {
        return Err(HeadError::NotImplemented("CONNECT is not supported"));
    }
    if !(root || target.starts_with('/') || (target == "*" && method == "OPTIONS")) {
        return Err(HeadError::Bad("invalid request target"));
    }

    let mut framing = Framing::default();
    let mut hosts = 0usize;
    let mut upgrade_value: Option<&[u8]> = None;
    let mut expect_continue = false;
    for h in headers {
        let n = h.name;
        if n.eq_ignore_ascii_case("content-length") {
            if !framing.content_length(h.value) {
                return Err(HeadError::Framing("invalid Content-Length"));
            }
        } else if n.eq_ignore_ascii_case("transfer-encoding") {
            framing.transfer_encoding(h.value);
        } else if n.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if n.eq_ignore_ascii_case("upgrade") {
            upgrade_value = Some(h.value);
        } else if n.eq_ignore_ascii_case("expect") {
            expect_continue = trim_ows(h.value).eq_ignore_ascii_case(b"100-continue");
        }
    }
    if framing.cl_conflict {
        return Err(HeadError::Framing("conflicting Content-Length headers"));
    }
    if hosts > 1 || (http11 && hosts == 0 && authority.is_none()) {
        return Err(HeadError::Bad("missing or duplicate Host"));
    }
    let body = if framing.te_seen {
        if framing.content_length.is_some() {
            return Err(HeadError::Framing("both Content-Length and Transfer-Encoding"));
        }
        if !http11 {
            return Err(HeadError::Framing("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !framing.te_chunked_final || framing.te_other {
            return Err(HeadError::NotImplemented("only Transfer-Encoding: chunked is supported"));
        }
        BodyKind::Chunked
    } else {
        match framing.content_length {
            Some(0) | None => BodyKind::None,
            Some(n) => BodyKind::Length(n),
        }
    };

    let mut conn_names: Vec<&[u8]> = Vec::new();
    let (close, keep_alive_token, conn_upgrade) = connection_tokens(headers, &mut conn_names);
    let upgrade = conn_upgrade && upgrade_value.is_some() && http11;
    let keep_alive = if http11 { !close } else { keep_alive_token && !close };

    // Request line.
    let start = out.len();
    let path = if root { "/" } else { target };
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(a) = authority {
        push_header(out, b"Host", a.as_bytes());
    }
    let mut xff_done = false;
    for h in headers {
        let n = h.name;
        // `Connection` may name hop-by-hop extensions, never `Host` (found
        // by fuzzing: a client could otherwise strip Host upstream).
        if is_hop_by_hop(n.as_bytes()) || (named_by_connection(n, &conn_names) && !n.eq_ignore_ascii_case("host")) {
            continue;
        }
        if n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("x-forwarded-proto") {
            continue;
        }
        if authority.is_some() && n.eq_ignore_ascii_case("host") {
            continue;
        }
        if expect_continue && n.eq_ignore_ascii_case("expect") {
            // Atlas answers `100 Continue` itself, as nginx does.
            continue;
        }
        if n.eq_ignore_ascii_case("x-forwarded-for") {
            if xff_done {
                continue;
            }
            // Merge every X-Forwarded-For in order, then append the client.
            out.extend_from_slice(b"X-Forwarded-For: ");
            for x in headers.iter().filter(|x| x.name.eq_ignore_ascii_case("x-forwarded-for")) {
                out.extend_from_slice(trim_ows(x.value));
                out.extend_from_slice(b", ");
            }
            push_ip(out, ctx.client_ip);
            out.extend_from_slice(b"\r\n");
            xff_done = true;
            continue;
        }
        push_header(out, n.as_bytes(), h.value);
    }
    if hosts == 0 && authority.is_none() {
        // HTTP/1.0 without Host: upstream speaks 1.1 and needs one.
        out.extend_from_slice(b"Host: localhost\r\n");
    }
    if !xff_done {
        out.extend_from_slice(b"X-Forwarded-For: ");
        push_ip(out, ctx.client_ip);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-Proto: ");
    out.extend_from_slice(ctx.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    match body {
        BodyKind::Length(n) => {
            push_content_length(out, n);
        }
        BodyKind::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        _ => {}
    }
    if upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
        push_header(out, b"Upgrade", upgrade_value.unwrap_or_default());
    }
    out.extend_from_slice(b"\r\n");
    debug_assert!(out.len() > start);

    let hash = match ctx.hash_key {
        None => 0,
        Some(key) => {
            let by_ip = || match ctx.client_ip {
                IpAddr::V4(v4) => hash64(&v4.octets()),
                IpAddr::V6(v6) => hash64(&v6.octets()),
            };
            match key {
                HashKey::ClientIp => by_ip(),
                HashKey::Uri => hash64(path.as_bytes()),
                HashKey::Path => hash64(path.split('?').next().unwrap_or("").as_bytes()),
                HashKey::Header(name) => headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| hash64(trim_ows(h.value))).unwrap_or_else(by_ip),
            }
        }
    };
    let idempotent = matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE");
    let target_at = target.as_ptr() as usize - buf.as_ptr() as usize;
    Ok(Some(RequestInfo {
        head_len,
        body,
        http11,
        keep_alive,
        is_head: method == "HEAD",
        idempotent,
        upgrade,
        expect_continue,
        hash,
        target: (target_at, target_at + target.len()),
    }))
}

/// What the proxy needs to know about an upstream response head.
#[derive(Debug, Clone, Copy)]
pub struct ResponseInfo {
    pub head_len: usize,
    pub status: u16,
    pub body: BodyKind,
    /// The upstream connection may be reused after this response.
    pub upstream_keep_alive: bool,
}

/// Client-side facts that shape the response head.
#[derive(Debug, Clone, Copy)]
pub struct ResponseCtx {
    pub client_http11: bool,
    pub client_keep_alive: bool,
    pub request_is_head: bool,
    pub request_upgrade: bool,
}

/// Parses an upstream response head and appends the head for the client to
/// `out`. Returns the response facts and whether the client connection stays
/// open after it. `Ok(None)`: incomplete.
pub fn rewrite_response(buf: &[u8], out: &mut Vec<u8>, ctx: &ResponseCtx) -> Result<Option<(ResponseInfo, bool)>, &'static str> {
    let mut slots = HeaderSlots::new();
    let mut res = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut res, buf, slots.get(MAX_HEADERS_STACK)) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many response headers"),
        Err(_) => return Err("malformed response head"),
    };
    let status = res.code.unwrap_or(0);
    if !(100..=999).contains(&status) {
        return Err("invalid status code");
    }
    let up11 = res.version == Some(1);
    let headers = &*res.headers;
    let mut framing = Framing::default();
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            if !framing.content_length(h.value) {
                return Err("invalid Content-Length in response");
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            framing.transfer_encoding(h.value);
        }
    }
    if framing.cl_conflict {
        return Err("conflicting Content-Length in response");
    }
    let mut conn_names: Vec<&[u8]> = Vec::new();
    let (close, ka_token, _) = connection_tokens(headers, &mut conn_names);
    let switching = status == 101 && ctx.request_upgrade;
    let body = if (100..200).contains(&status) || status == 204 || status == 304 || ctx.request_is_head {
        BodyKind::None
    } else if framing.te_seen {
        if framing.te_chunked_final && !framing.te_other {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        }
    } else {
        match framing.content_length {
            Some(n) => BodyKind::Length(n),
            None => BodyKind::UntilClose,
        }
    };
    let upstream_keep_alive = !switching && body != BodyKind::UntilClose && !close && (up11 || ka_token);
    // The client connection survives when it asked to and the body has an
    // end it can see: a chunked body cannot go to an HTTP/1.0 client framed,
    // so it is de-chunked and the connection closed instead.
    let client_keep = ctx.client_keep_alive
        && !switching
        && match body {
            BodyKind::UntilClose => false,
            BodyKind::Chunked => ctx.client_http11,
            _ => true,
        };

    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in headers {
        if is_hop_by_hop(h.name.as_bytes()) || named_by_connection(h.name, &conn_names) {
            continue;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            if let (BodyKind::Length(n), false) = (body, framing.te_seen) {
                push_content_length(out, n);
            } else if ctx.request_is_head || status == 304 {
                // Kept as metadata: no body follows.
                push_header(out, h.name.as_bytes(), h.value);
            }
            continue;
        }
        push_header(out, h.name.as_bytes(), h.value);
    }
    if switching {
        out.extend_from_slice(b"Connection: upgrade\r\n");
        if let Some(u) = headers.iter().find(|h| h.name.eq_ignore_ascii_case("upgrade")) {
            push_header(out, b"Upgrade", u.value);
        }
    } else if (100..200).contains(&status) {
        // Interim response: no connection semantics.
    } else {
        if body == BodyKind::Chunked && ctx.client_http11 {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        if !client_keep {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if !ctx.client_http11 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some((ResponseInfo { head_len, status, body, upstream_keep_alive }, client_keep)))
}

/// A short plain-text response Atlas generates itself (errors, redirects):
/// `msg` plus a newline as the body, which a HEAD request does not get
/// (its `Content-Length` still says how long the body would be).
/// `extra_headers` are whole `Name: value\r\n` lines.
pub fn simple_response(status: u16, msg: &str, keep_alive: bool, head_only: bool, extra_headers: &str) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(160 + msg.len());
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nServer: atlas\r\nDate: {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: {}\r\n{extra_headers}\r\n",
        status_reason(status),
        with_http_date(str::to_owned),
        msg.len() + 1,
        if keep_alive { "keep-alive" } else { "close" }
    );
    if !head_only {
        out.extend_from_slice(msg.as_bytes());
        out.push(b'\n');
    }
    out
}

thread_local! {
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

/// Runs `f` with the current `Date` header value, formatted once per
/// second per thread.
pub fn with_http_date<R>(f: impl FnOnce(&str) -> R) -> R {
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs || d.1.is_empty() {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        f(&d.1)
    })
}

/// The status code of the response head at the start of `out`
/// (`HTTP/1.x NNN ...`), if there is one.
pub fn head_status(out: &[u8]) -> Option<u16> {
    let code = out.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

pub fn status_reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        301 => "Moved Permanently",
        304 => "Not Modified",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
