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
    pub(super) details: Option<Box<Details>>,
}

/// The parts of a request the access log and the skim show.
pub(super) struct Details {
    pub(super) method: String,
    pub(super) target: String,
    pub(super) protocol: &'static str,
    pub(super) referer: String,
    pub(super) user_agent: String,
    /// The request is sampled by the skim.
    pub(super) skim: bool,
    pub(super) request_payload: Option<Box<[u8]>>,
    pub(super) response_payload: Option<Box<[u8]>>,
}

impl Details {
    /// Reads them from a request head that was already validated.
    pub(super) fn capture(head: &[u8], body: &[u8], skim: bool, payload_bytes: usize) -> Box<Details> {
        let mut h = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut h);
        let _ = req.parse(head);
        let header = |name: &str| {
            req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value).into_owned()).unwrap_or_default()
        };
        Box::new(Details {
            method: req.method.unwrap_or("").to_string(),
            target: req.path.unwrap_or("").to_string(),
            protocol: if req.version == Some(0) { "HTTP/1.0" } else { "HTTP/1.1" },
            referer: header("referer"),
            user_agent: header("user-agent"),
            skim,
            request_payload: if skim { skim::payload(body, payload_bytes) } else { None },
            response_payload: None,
        })
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
        let d = o.details.as_deref();
        log.write(&atlas_observe::access_log::Record {
            time: std::time::SystemTime::now(),
            listener: &ctx.name,
            client: peer.ip(),
            method: d.map_or("", |d| &d.method),
            target: d.map_or("", |d| &d.target),
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
            let d = *d;
            tap.tap.push(
                ctx.worker,
                skim::Sample {
                    at_ms: atlas_observe::now_ms(),
                    worker: ctx.worker as u16,
                    kind: skim::Kind::Http,
                    client: peer,
                    method: d.method.into_boxed_str(),
                    target: d.target.into_boxed_str(),
                    status: o.status,
                    upstream: upstream.into(),
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
