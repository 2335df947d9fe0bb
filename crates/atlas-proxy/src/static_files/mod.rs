//! Static files: GET and HEAD under a root, with conditional requests
//! (ETag / If-None-Match, Last-Modified / If-Modified-Since -> 304), single
//! byte ranges (206, 416), `index.html` for directories (301 to add the
//! slash), keep-alive, a per-worker cache of small files, and zero-copy
//! sendfile(2) for the rest on plain sockets, so memory stays flat whatever
//! the file size.
//!
//! File-system calls are synchronous on the worker (as nginx does without
//! `aio threads`): fine for files in the page cache, a stall otherwise.

pub mod fs;

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::SystemTime;

use atlas_config::StaticSettings;

use crate::http::codec::{self, HeadError};
use crate::io::{write_vec, ClientStream};
use fs::{Cached, FileCache, Opened, Refusal, Root};

/// One static root as served by one worker (a listener's root or a route's).
pub struct StaticSite {
    pub id: usize,
    pub root: Root,
    /// With `strip_prefix`, the route prefix removed before mapping.
    pub strip_prefix: Option<String>,
    pub settings: StaticSettings,
    pub cache: Rc<RefCell<FileCache>>,
}

/// The parts of a request a static response depends on.
#[derive(Debug, Default)]
pub struct StaticReq {
    pub head_len: usize,
    pub http11: bool,
    pub keep_alive: bool,
    pub method: Method,
    pub target: String,
    pub has_body: bool,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    pub range: Option<String>,
    pub if_range: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    #[default]
    Get,
    Head,
    Other,
}

/// Parses a request head for a static response. `Ok(None)`: incomplete.
pub fn parse(buf: &[u8], max_headers: usize) -> Result<Option<StaticReq>, HeadError> {
    let mut slots = codec::HeaderSlots::new();
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, slots.get(max_headers)) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad("malformed request")),
    };
    let http11 = req.version == Some(1);
    let mut r = StaticReq {
        head_len,
        http11,
        method: match req.method {
            Some("GET") => Method::Get,
            Some("HEAD") => Method::Head,
            _ => Method::Other,
        },
        target: req.path.unwrap_or("").to_string(),
        ..Default::default()
    };
    let (mut close, mut ka, mut hosts) = (false, false, 0);
    for h in req.headers.iter() {
        let v = || String::from_utf8_lossy(h.value).trim().to_string();
        let is = |n: &str| h.name.eq_ignore_ascii_case(n);
        match () {
            _ if is("connection") => {
                for t in h.value.split(|&c| c == b',') {
                    let t = String::from_utf8_lossy(t).trim().to_ascii_lowercase();
                    close |= t == "close";
                    ka |= t == "keep-alive";
                }
            }
            _ if is("host") => hosts += 1,
            _ if is("content-length") => r.has_body |= codec::parse_content_length(h.value).is_none_or(|n| n > 0),
            _ if is("transfer-encoding") => r.has_body = true,
            _ if is("if-none-match") => r.if_none_match = Some(v()),
            _ if is("if-modified-since") => r.if_modified_since = Some(v()),
            _ if is("range") => r.range = Some(v()),
            _ if is("if-range") => r.if_range = Some(v()),
            _ => {}
        }
    }
    if hosts > 1 || (http11 && hosts == 0) {
        return Err(HeadError::Bad("missing or duplicate Host"));
    }
    r.keep_alive = if http11 { !close } else { ka && !close };
    Ok(Some(r))
}

/// A requested byte range, resolved against the file size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeReq {
    /// No usable Range header (absent, several ranges, or malformed): 200.
    Full,
    /// Inclusive byte positions: 206.
    Part(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// Parses `bytes=a-b`, `bytes=a-`, `bytes=-n` against `size`.
pub fn parse_range(v: &str, size: u64) -> RangeReq {
    let Some(spec) = v.strip_prefix("bytes=") else { return RangeReq::Full };
    if spec.contains(',') {
        return RangeReq::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeReq::Full };
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.trim(), b.trim()) {
        ("", n) => match num(n) {
            Some(0) => RangeReq::Unsatisfiable,
            Some(n) if size == 0 => {
                let _ = n;
                RangeReq::Unsatisfiable
            }
            Some(n) => RangeReq::Part(size.saturating_sub(n), size - 1),
            None => RangeReq::Full,
        },
        (a, "") => match num(a) {
            Some(a) if a < size => RangeReq::Part(a, size - 1),
            Some(_) => RangeReq::Unsatisfiable,
            None => RangeReq::Full,
        },
        (a, b) => match (num(a), num(b)) {
            (Some(a), Some(b)) if a <= b => {
                if a >= size {
                    RangeReq::Unsatisfiable
                } else {
                    RangeReq::Part(a, b.min(size - 1))
                }
            }
            _ => RangeReq::Full,
        },
    }
}

fn etag_matches(list: &str, etag: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    list.trim() == "*" || list.split(',').any(|t| strip(t) == strip(etag))
}

fn not_modified(req: &StaticReq, etag: &str, mtime: SystemTime) -> bool {
    if let Some(inm) = &req.if_none_match {
        return etag_matches(inm, etag);
    }
    if let Some(ims) = req.if_modified_since.as_deref().and_then(|v| httpdate::parse_http_date(v).ok()) {
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        return secs(mtime) <= secs(ims);
    }
    false
}

fn connection_header(out: &mut Vec<u8>, req: &StaticReq) {
    if !req.keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if !req.http11 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
}

fn status_line(out: &mut Vec<u8>, status: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_bytes());
    out.extend_from_slice(b"\r\nServer: atlas\r\nDate: ");
    codec::with_http_date(|d| out.extend_from_slice(d.as_bytes()));
    out.extend_from_slice(b"\r\n");
}

enum Body {
    Cached(Rc<Cached>),
    File(Opened),
}

/// Answers one parsed request from `site`. Returns whether the client
/// connection may stay open. On return, `out` starts with the response
/// head that was sent (the proxy reads the status back from it).
pub async fn respond<S: ClientStream>(site: &StaticSite, client: &mut S, req: &StaticReq, out: &mut Vec<u8>) -> bool {
    out.clear();
    let head = req.method == Method::Head;
    let simple = |status: u16, msg: &str, keep: bool| codec::simple_response(status, msg, keep, head, "");
    if req.method == Method::Other {
        let keep = req.keep_alive && !req.has_body;
        *out = codec::simple_response(405, "only GET and HEAD are allowed here", keep, false, "Allow: GET, HEAD\r\n");
        return write_vec(client, out).await.is_ok() && keep;
    }
    if req.has_body {
        *out = simple(400, "a request body is not allowed here", false);
        let _ = write_vec(client, out).await;
        return false;
    }
    let raw: Cow<'_, str> = match &site.strip_prefix {
        Some(p) => match req.target.strip_prefix(p.as_str()) {
            Some(rest) if rest.starts_with('/') => Cow::Borrowed(rest),
            Some(rest) => Cow::Owned(format!("/{rest}")),
            None => Cow::Borrowed(&req.target),
        },
        None => Cow::Borrowed(&req.target),
    };
    let (rel, slash) = match fs::decode_path(&raw) {
        Ok(x) => x,
        Err(Refusal::BadPath) => {
            *out = simple(400, "bad path", false);
            let _ = write_vec(client, out).await;
            return false;
        }
        Err(_) => {
            *out = simple(404, "not found", req.keep_alive);
            return write_vec(client, out).await.is_ok() && req.keep_alive;
        }
    };
    let fresh = site.cache.borrow_mut().fresh(site.id, &rel, slash, site.settings.revalidate);
    let body = match fresh {
        Some(c) => Body::Cached(c),
        None => match fs::open(&site.root, &rel, slash, &site.settings.index) {
            Ok(mut opened) => {
                let mut cache = site.cache.borrow_mut();
                match cache.matching(site.id, &rel, slash, &opened).or_else(|| cache.load(site.id, &rel, slash, &mut opened)) {
                    Some(c) => Body::Cached(c),
                    None => Body::File(opened),
                }
            }
            Err(Refusal::AddSlash) => {
                let path = req.target.split('?').next().unwrap_or("/");
                let query = req.target.find('?').map(|i| &req.target[i..]).unwrap_or("");
                status_line(out, "301 Moved Permanently");
                out.extend_from_slice(format!("Location: {path}/{query}\r\nContent-Length: 0\r\n").as_bytes());
                connection_header(out, req);
                out.extend_from_slice(b"\r\n");
                return write_vec(client, out).await.is_ok() && req.keep_alive;
            }
            Err(Refusal::BadPath) => {
                *out = simple(400, "bad path", false);
                let _ = write_vec(client, out).await;
                return false;
            }
            Err(Refusal::NotFound) => {
                *out = simple(404, "not found", req.keep_alive);
                return write_vec(client, out).await.is_ok() && req.keep_alive;
            }
        },
    };
    let file_meta = match &body {
        Body::Cached(_) => None,
        Body::File(f) => {
            let etag = fs::etag(f.mtime, f.size);
            let h = fs::entity_headers(&f.rel, f.mtime, &etag);
            Some((etag, h))
        }
    };
    let (size, mtime, etag, headers): (u64, SystemTime, &str, Option<&str>) = match &body {
        Body::Cached(c) => (c.size, c.mtime, &c.etag, None),
        Body::File(f) => {
            let (e, h) = file_meta.as_ref().map(|(e, h)| (e.as_str(), Some(h.as_str()))).unwrap_or(("", None));
            (f.size, f.mtime, e, h)
        }
    };
    let entity = |out: &mut Vec<u8>| match (&body, headers) {
        (Body::Cached(c), _) => out.extend_from_slice(c.headers.as_bytes()),
        (_, Some(h)) => out.extend_from_slice(h.as_bytes()),
        _ => {}
    };
    if not_modified(req, etag, mtime) {
        status_line(out, "304 Not Modified");
        out.extend_from_slice(format!("ETag: {etag}\r\nLast-Modified: {}\r\n", httpdate::fmt_http_date(mtime)).as_bytes());
        connection_header(out, req);
        out.extend_from_slice(b"\r\n");
        return write_vec(client, out).await.is_ok() && req.keep_alive;
    }
    let range = match (&req.range, &req.if_range) {
        (Some(_), Some(ir)) if ir.starts_with('"') || ir.starts_with("W/") => {
            if etag_matches(ir, etag) {
                parse_range(req.range.as_deref().unwrap_or(""), size)
            } else {
                RangeReq::Full
            }
        }
        (Some(_), Some(ir)) => match httpdate::parse_http_date(ir) {
            Ok(t) if t >= mtime => parse_range(req.range.as_deref().unwrap_or(""), size),
            _ => RangeReq::Full,
        },
        (Some(r), None) => parse_range(r, size),
        (None, _) => RangeReq::Full,
    };
    let (start, len) = match range {
        RangeReq::Full => {
            status_line(out, "200 OK");
            codec::push_content_length(out, size);
            (0, size)
        }
        RangeReq::Part(a, b) => {
            status_line(out, "206 Partial Content");
            out.extend_from_slice(format!("Content-Range: bytes {a}-{b}/{size}\r\nContent-Length: {}\r\n", b - a + 1).as_bytes());
            (a, b - a + 1)
        }
        RangeReq::Unsatisfiable => {
            status_line(out, "416 Range Not Satisfiable");
            out.extend_from_slice(format!("Content-Range: bytes */{size}\r\nContent-Length: 0\r\n").as_bytes());
            connection_header(out, req);
            out.extend_from_slice(b"\r\n");
            return write_vec(client, out).await.is_ok() && req.keep_alive;
        }
    };
    entity(out);
    connection_header(out, req);
    out.extend_from_slice(b"\r\n");
    if req.method == Method::Head {
        return write_vec(client, out).await.is_ok() && req.keep_alive;
    }
    match body {
        Body::Cached(c) => {
            out.extend_from_slice(&c.body[start as usize..(start + len) as usize]);
            write_vec(client, out).await.is_ok() && req.keep_alive
        }
        Body::File(f) => {
            if write_vec(client, out).await.is_err() {
                return false;
            }
            match client.send_file(&f.file, start, len).await {
                Ok(()) => req.keep_alive,
                Err(e) => {
                    tracing::debug!(error = %e, "static: sending file failed");
                    false
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeReq::Part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), RangeReq::Part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), RangeReq::Part(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), RangeReq::Part(0, 99));
        assert_eq!(parse_range("bytes=50-5000", 100), RangeReq::Part(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), RangeReq::Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), RangeReq::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeReq::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), RangeReq::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), RangeReq::Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeReq::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeReq::Full);
        assert_eq!(parse_range("bytes=a-b", 100), RangeReq::Full);
        assert_eq!(parse_range("bytes=+1-2", 100), RangeReq::Full);
    }

    #[test]
    fn etags() {
        assert!(etag_matches("\"a\"", "\"a\""));
        assert!(etag_matches("W/\"a\", \"b\"", "\"a\""));
        assert!(etag_matches("*", "\"x\""));
        assert!(!etag_matches("\"b\"", "\"a\""));
    }

    #[test]
    fn parse_static_request() {
        let r = parse(b"GET /a?b HTTP/1.1\r\nHost: h\r\nRange: bytes=0-1\r\nIf-None-Match: \"x\"\r\n\r\n", 100).unwrap().unwrap();
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.target, "/a?b");
        assert_eq!(r.range.as_deref(), Some("bytes=0-1"));
        assert!(r.keep_alive && !r.has_body);
        let r = parse(b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", 100).unwrap().unwrap();
        assert!(r.method == Method::Other && r.has_body && !r.keep_alive);
        assert!(parse(b"GET / HTTP/1.1\r\n\r\n", 100).is_err());
        assert!(parse(b"GET / HTTP/1.1\r\nHost: h\r\n", 100).unwrap().is_none());
    }
}
