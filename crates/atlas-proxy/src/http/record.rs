//! What one HTTP exchange leaves behind: its figures in the listener's
//! per-worker metrics, its access log line and its skim sample. The proxy
//! fills an [`Outcome`] as the exchange goes and hands it to [`record`]
//! when the exchange ends; request details are captured only when a log or
//! a tap wants them, so plain traffic pays for two counter stores and a
//! histogram bucket.

use std::net::SocketAddr;

use atlas_observe::metrics::{class_index, Reject};
use atlas_observe::skim;

use crate::upstream::Upstreams;
use crate::ListenerCtx;

/// What one exchange did, for the metrics, the access log and the skim.
#[derive(Default)]
pub(super) struct Outcome<'c> {
    /// A request arrived (a connection closing between requests has none).
    pub(super) request: bool,
    /// The status sent to the client; 499 (as nginx logs it) when the
    /// client went away before a response.
    pub(super) status: u16,
    pub(super) reject: Option<Reject>,
    pub(super) retries: u32,
    pub(super) upstream: Option<(&'c Upstreams, usize)>,
    /// Captured only when the access log or the skim wants them.
    pub(super) details: Option<Details>,
}

/// The parts of a request the access log and the skim show.
pub(super) struct Details {
    /// The method then the target; the skim appends the upstream name and
    /// keeps the string as its sample's text (one allocation per sample).
    pub(super) text: String,
    pub(super) method_len: usize,
    pub(super) protocol: &'static str,
    /// Only read when the access log is on (empty otherwise).
    pub(super) referer: String,
    pub(super) user_agent: String,
    /// The request is sampled by the skim.
    pub(super) skim: bool,
    pub(super) request_payload: Option<Box<[u8]>>,
    pub(super) response_payload: Option<Box<[u8]>>,
}

impl Details {
    pub(super) fn method(&self) -> &str {
        &self.text[..self.method_len]
    }

    pub(super) fn target(&self) -> &str {
        &self.text[self.method_len..]
    }

    /// Reads them from a request head that was already validated. The
    /// request line is split by hand; the headers are looked at only for
    /// the access log (`headers`).
    pub(super) fn capture(head: &[u8], body: &[u8], skim: bool, payload_bytes: usize, headers: bool) -> Details {
        let line = head.split(|&c| c == b'\r' || c == b'\n').next().unwrap_or(b"");
        let mut parts = line.split(|&c| c == b' ').filter(|p| !p.is_empty());
        let method = String::from_utf8_lossy(parts.next().unwrap_or(b""));
        let target = String::from_utf8_lossy(parts.next().unwrap_or(b""));
        let protocol = if parts.next() == Some(b"HTTP/1.0") { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut text = String::with_capacity(method.len() + target.len() + 16);
        text.push_str(&method);
        text.push_str(&target);
        let (mut referer, mut user_agent) = (String::new(), String::new());
        if headers {
            let mut h = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut h);
            let _ = req.parse(head);
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("referer") {
                    referer = String::from_utf8_lossy(h.value).into_owned();
                } else if h.name.eq_ignore_ascii_case("user-agent") {
                    user_agent = String::from_utf8_lossy(h.value).into_owned();
                }
            }
        }
        Details {
            text,
            method_len: method.len(),
            protocol,
            referer,
            user_agent,
            skim,
            request_payload: if skim { skim::payload(body, payload_bytes) } else { None },
            response_payload: None,
        }
    }
}

/// Counts an exchange in the listener's figures and writes its access log
/// line and skim sample (the sample takes the captured strings over).
///
/// `io` is what the socket carried since the last exchange (the listener's
/// byte counters); `consumed` is the bytes of this request itself (its
/// head and body as parsed), which is what its log line and sample show:
/// with pipelining one read may carry several requests.
pub(super) fn record(ctx: &ListenerCtx, peer: SocketAddr, started: std::time::Instant, io: (u64, u64), consumed: u64, o: Outcome) {
    let (read, bytes_out) = io;
    let bytes_in = consumed;
    let st = ctx.stats();
    st.bytes_in.add(read);
    st.bytes_out.add(bytes_out);
    if let Some(r) = o.reject {
        st.reject(r);
    }
    if o.retries > 0 {
        st.retries.add(o.retries as u64);
    }
    if !o.request {
        return;
    }
    let us = started.elapsed().as_micros() as u64;
    st.requests[class_index(o.status)].inc();
    st.latency.observe_us(us);
    if ctx.access_log.is_none() && o.details.is_none() {
        return;
    }
    let upstream = o.upstream.map(|(u, i)| u.group.names[i].as_str()).unwrap_or("-");
    if let Some(log) = &ctx.access_log {
        let d = o.details.as_ref();
        log.write(&atlas_observe::access_log::Record {
            time: std::time::SystemTime::now(),
            listener: &ctx.name,
            client: peer.ip(),
            method: d.map_or("", |d| d.method()),
            target: d.map_or("", |d| d.target()),
            protocol: d.map_or("", |d| d.protocol),
            status: o.status,
            bytes_in,
            bytes_out,
            duration_us: us,
            upstream,
            referer: d.map_or("", |d| &d.referer),
            user_agent: d.map_or("", |d| &d.user_agent),
        });
    }
    if let (Some(tap), Some(d)) = (&ctx.skim, o.details) {
        if d.skim {
            let target_len = d.text.len() - d.method_len;
            let mut text = d.text;
            text.push_str(upstream);
            tap.tap.push(
                ctx.worker,
                skim::Sample {
                    at_ms: atlas_observe::now_ms(),
                    worker: ctx.worker as u16,
                    kind: skim::Kind::Http,
                    client: peer,
                    text,
                    method_len: d.method_len,
                    target_len,
                    status: o.status,
                    bytes_in,
                    bytes_out,
                    duration_us: us,
                    request_payload: d.request_payload,
                    response_payload: d.response_payload,
                },
            );
        }
    }
}
