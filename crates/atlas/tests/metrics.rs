//! Observability: `GET /metrics` (Prometheus text format 0.0.4, every
//! family with its labels), per-worker counters summed on scrape and moving
//! with traffic, rejections by reason, upstream errors, the connection
//! gauge, reload counters and events, and the JSON views
//! (`/api/v1/listeners`, `/api/v1/upstreams`, `/api/v1/events`) agreeing
//! with the metrics.
//!
//! The exposition is checked twice: by a strict line-by-line reader here
//! (every line is a HELP, a TYPE or a well-formed sample of a declared
//! family; no duplicate series; histograms cumulative and consistent) and by
//! the `prometheus-parse` crate, whose samples the assertions then read.

mod common;
#[path = "support/exposition.rs"]
mod exposition;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;
use exposition::*;
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::Value as Json;

/// How long figures that are updated after the response was sent may take
/// to show (a scrape can race the final bookkeeping of an exchange).
const SETTLE: Duration = Duration::from_secs(2);

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];
const REASONS: [&str; 8] =
    ["connection_limit", "rate_limit", "header_too_large", "body_too_large", "smuggling", "malformed", "header_timeout", "tls_handshake"];
/// Upper bounds of the latency buckets in seconds, as `le` values.
const BOUNDS_S: [f64; 19] = [0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

// ---------------------------------------------------------------------------
// API calls
// ---------------------------------------------------------------------------

struct HttpReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection (`Connection: close`), read to EOF.
fn call(api: SocketAddr, method: &str, path: &str) -> HttpReply {
    let mut s = TcpStream::connect_timeout(&api, Duration::from_secs(3)).unwrap_or_else(|e| panic!("connect to the API {api}: {e}"));
    set_timeouts(&s, Duration::from_secs(3));
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap_or_else(|e| panic!("{method} {path}: read: {e}"));
    let text = String::from_utf8(raw).unwrap_or_else(|e| panic!("{method} {path}: the reply is not UTF-8: {e}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{method} {path}: no complete head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.get(9..12)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_string(), v.trim().to_string())).collect();
    HttpReply { status, headers, body: body.to_string() }
}

/// GET `path`, expecting 200 and a JSON document.
fn json(api: SocketAddr, path: &str) -> Json {
    let r = call(api, "GET", path);
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"), "GET {path}");
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {}", r.body))
}

fn post(api: SocketAddr, path: &str) -> HttpReply {
    call(api, "POST", path)
}

// ---------------------------------------------------------------------------
// Scrapes
// ---------------------------------------------------------------------------

struct Metrics {
    text: String,
    scrape: Scrape,
    strict: Exposition,
}

struct Hist {
    /// (le, cumulative count), increasing le.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Hist {
    fn bucket(&self, le: f64) -> f64 {
        self.buckets.iter().find(|b| b.0 == le).unwrap_or_else(|| panic!("no bucket le={le} in {:?}", self.buckets)).1
    }
}

impl Metrics {
    /// The samples of `name` whose labels include `pairs`.
    fn find(&self, name: &str, pairs: &[(&str, &str)]) -> Vec<&Sample> {
        self.scrape.samples.iter().filter(|s| s.metric == name && pairs_match(&labels_of(s), pairs)).collect()
    }

    /// The value of the one series `name{pairs}` (exactly these labels).
    fn get(&self, name: &str, pairs: &[(&str, &str)]) -> f64 {
        self.try_get(name, pairs).unwrap_or_else(|| panic!("no series {name}{pairs:?} in the scrape:\n{}", self.text))
    }

    fn try_get(&self, name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self.find(name, pairs).into_iter().filter(|s| s.labels.len() == pairs.len()).collect();
        assert!(found.len() <= 1, "{name}{pairs:?} matches {} series", found.len());
        found.first().map(|s| scalar(&s.value).unwrap_or_else(|| panic!("{name}{pairs:?} is not a scalar: {:?}", s.value)))
    }

    /// The sum of every series of `name` whose labels include `pairs`.
    fn sum(&self, name: &str, pairs: &[(&str, &str)]) -> f64 {
        self.find(name, pairs).iter().map(|s| scalar(&s.value).unwrap_or_else(|| panic!("{name} is not a scalar"))).sum()
    }

    /// The histogram `name{pairs}` (exactly these labels besides `le`).
    fn hist(&self, name: &str, pairs: &[(&str, &str)]) -> Hist {
        let found: Vec<&Sample> = self.find(name, pairs).into_iter().filter(|s| s.labels.len() == pairs.len()).collect();
        assert_eq!(found.len(), 1, "histogram {name}{pairs:?}: {} series in\n{}", found.len(), self.text);
        let Value::Histogram(counts) = &found[0].value else { panic!("{name}{pairs:?} is not a histogram: {:?}", found[0].value) };
        let mut buckets: Vec<(f64, f64)> = counts.iter().map(|c| (c.less_than, c.count)).collect();
        buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        Hist { buckets, sum: self.get(&format!("{name}_sum"), pairs), count: self.get(&format!("{name}_count"), pairs) }
    }

    /// Label sets of the series of family `name` (buckets: without `le`).
    fn label_keys(&self, name: &str) -> BTreeSet<Vec<String>> {
        self.scrape.samples.iter().filter(|s| s.metric == name).map(|s| labels_of(s).into_keys().collect()).collect()
    }

    fn values_of(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.scrape.samples.iter().filter(|s| s.metric == name).filter_map(|s| s.labels.get(label).map(str::to_string)).collect()
    }
}

/// GET /metrics: checks status and content type, reads the exposition
/// strictly, parses it with prometheus-parse and checks both agree (no
/// line silently skipped by the parser).
fn scrape(api: SocketAddr) -> Metrics {
    let r = call(api, "GET", "/metrics");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"), "GET /metrics content type");
    let text = r.body;
    let strict = parse_strict(&text).unwrap_or_else(|e| panic!("/metrics is not valid text format 0.0.4: {e}\n{text}"));
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap_or_else(|e| panic!("prometheus-parse rejected /metrics: {e}\n{text}"));
    // Every sample line must be in the parsed scrape with the same value.
    let mut buckets_seen: BTreeSet<(String, LabelSet)> = BTreeSet::new();
    let mut expected_samples = 0;
    for s in &strict.series {
        let fam = family_of(&s.name, &strict.types).unwrap();
        if strict.type_of(fam) == Some("histogram") && s.name.ends_with("_bucket") {
            let mut l = s.labels.clone();
            let le = parse_value(&l.remove("le").unwrap()).unwrap();
            let parsed = scrape.samples.iter().find(|p| p.metric == fam && labels_of(p) == l);
            let ok = matches!(parsed.map(|p| &p.value), Some(Value::Histogram(h)) if h.iter().any(|c| c.less_than == le && c.count == s.value));
            assert!(ok, "prometheus-parse lost bucket {}{:?} = {}", s.name, s.labels, s.value);
            if buckets_seen.insert((fam.to_string(), l)) {
                expected_samples += 1;
            }
        } else {
            let parsed = scrape.samples.iter().find(|p| p.metric == s.name && labels_of(p) == s.labels);
            let v = parsed.and_then(|p| scalar(&p.value));
            assert!(v == Some(s.value), "prometheus-parse read {}{:?} as {v:?}, the text says {}", s.name, s.labels, s.value);
            expected_samples += 1;
        }
    }
    assert_eq!(scrape.samples.len(), expected_samples, "prometheus-parse found a different number of samples than the text has");
    Metrics { text, scrape, strict }
}

/// Scrapes until `ok` holds (at most `within`); returns the last scrape.
fn scrape_until(api: SocketAddr, within: Duration, mut ok: impl FnMut(&Metrics) -> bool) -> (bool, Metrics) {
    let mut last = None;
    let held = wait_until(within, || {
        let m = scrape(api);
        let held = ok(&m);
        last = Some(m);
        if !held {
            thread::sleep(Duration::from_millis(20));
        }
        held
    });
    (held, last.unwrap())
}

// ---------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------

/// An HTTP listener over `ups` with the API on 127.0.0.1:0, `workers`
/// workers, the listener table extended by `listen_extra`, plus `extra`.
fn config(ups: &[SocketAddr], workers: usize, listen_extra: &str, extra: &str) -> String {
    http_config(ups, &format!("[api]\naddress = \"127.0.0.1:0\"\n{extra}")).replacen("workers = 1\n", &format!("workers = {workers}\n{listen_extra}"), 1)
}

/// A GET on a keep-alive connection; returns (bytes sent, bytes received,
/// status). Responses here have a Content-Length, so the bytes on the wire
/// are the head, the blank line and the body.
fn get_counted(c: &mut Client, path: &str) -> (u64, u64, u16) {
    let req = get_req(path);
    c.send(&req);
    let r = c.read_response();
    assert!(!r.chunked, "a chunked response would make the byte count inexact");
    assert!(c.buf.is_empty(), "bytes after the response: {}", show(&c.buf));
    (req.len() as u64, (r.head.len() + 4 + r.body.len()) as u64, r.status)
}

/// Waits until every worker has registered its listeners and upstreams
/// (the API and the "listening" lines come before the workers build their
/// contexts, and a series only exists from then on): `ups` upstreams.
fn wait_registered(atlas: &Atlas, ups: usize) {
    let api = atlas.api.expect("api address");
    let (ok, m) = scrape_until(api, Duration::from_secs(5), |m| {
        m.try_get("atlas_connections_total", &[L]).is_some() && m.find("atlas_upstream_errors_total", &[L]).len() == ups
    });
    assert!(ok, "the listener and {ups} upstream series did not appear:\n{}", m.text);
}

/// Starts Atlas on `cfg` and waits for its series (`ups` upstreams).
fn start(cfg: &str, ups: usize) -> Atlas {
    let atlas = Atlas::start(cfg);
    wait_registered(&atlas, ups);
    atlas
}

/// An address that refuses connections for as long as the returned socket
/// lives: bound but not listening, so no other socket (the API on port 0,
/// say) can be given its port meanwhile, as could happen with
/// `refused_addr()`.
fn dead_addr() -> (socket2::Socket, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    let a = s.local_addr().unwrap().as_socket().unwrap();
    (s, a)
}

fn listener<'a>(doc: &'a Json, name: &str) -> &'a Json {
    doc["listeners"].as_array().expect("listeners array").iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("no listener {name} in {doc}"))
}

fn upstream<'a>(doc: &'a Json, name: &str) -> &'a Json {
    doc["upstreams"].as_array().expect("upstreams array").iter().find(|u| u["name"] == name).unwrap_or_else(|| panic!("no upstream {name} in {doc}"))
}

fn n(v: &Json) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// p50 <= p90 <= p99, mean > 0, `count` as given; or all null when count is 0.
fn check_latency(lat: &Json, count: u64, what: &str) {
    assert_eq!(lat["count"].as_u64(), Some(count), "{what}: latency_ms {lat}");
    if count == 0 {
        for k in ["p50", "p90", "p99", "mean"] {
            assert!(lat[k].is_null(), "{what}: latency_ms.{k} must be null without observations: {lat}");
        }
    } else {
        let (p50, p90, p99, mean) = (n(&lat["p50"]), n(&lat["p90"]), n(&lat["p99"]), n(&lat["mean"]));
        assert!(p50 > 0.0 && p50 <= p90 && p90 <= p99, "{what}: quantiles out of order: {lat}");
        assert!(mean > 0.0, "{what}: mean: {lat}");
    }
}

const L: (&str, &str) = ("listener", "default");

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn metrics_endpoint_serves_every_family_in_prometheus_text_format() {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    let atlas = start(&config(&[a.addr, b.addr], 2, "skim = true\n", ""), 2);
    let api = atlas.api.expect("api address");
    // Some traffic first, so that the figures are not all zero.
    let mut c = Client::connect(atlas.addr());
    for i in 0..4 {
        assert_eq!(c.get(&format!("/{i}")).status, 200);
    }
    let m = scrape(api);

    let expect: &[(&str, &str, &[&str])] = &[
        ("atlas_build_info", "gauge", &["driver", "version"]),
        ("atlas_uptime_seconds", "gauge", &[]),
        ("atlas_workers", "gauge", &[]),
        ("atlas_config_version", "gauge", &[]),
        ("atlas_config_reloads_total", "counter", &["result"]),
        ("atlas_draining", "gauge", &[]),
        ("atlas_connections_active", "gauge", &["listener"]),
        ("atlas_connections_total", "counter", &["listener"]),
        ("atlas_received_bytes_total", "counter", &["listener"]),
        ("atlas_sent_bytes_total", "counter", &["listener"]),
        ("atlas_retries_total", "counter", &["listener"]),
        ("atlas_http_requests_total", "counter", &["class", "listener"]),
        ("atlas_http_request_duration_seconds", "histogram", &["listener"]),
        ("atlas_rejected_total", "counter", &["listener", "reason"]),
        ("atlas_upstream_responses_total", "counter", &["class", "group", "listener", "upstream"]),
        ("atlas_upstream_errors_total", "counter", &["group", "listener", "upstream"]),
        ("atlas_upstream_pool_hits_total", "counter", &["group", "listener", "upstream"]),
        ("atlas_upstream_pool_misses_total", "counter", &["group", "listener", "upstream"]),
        ("atlas_upstream_header_duration_seconds", "histogram", &["group", "listener", "upstream"]),
        ("atlas_upstream_up", "gauge", &["group", "upstream"]),
        ("atlas_upstream_drained", "gauge", &["group", "upstream"]),
        ("atlas_upstream_in_flight", "gauge", &["group", "upstream"]),
        ("atlas_access_log_lines_total", "counter", &[]),
        ("atlas_access_log_dropped_total", "counter", &[]),
        ("atlas_skim_samples_total", "counter", &["listener"]),
        ("atlas_skim_dropped_total", "counter", &["listener"]),
    ];
    for (name, kind, keys) in expect {
        assert_eq!(m.strict.type_of(name), Some(*kind), "family {name}: TYPE line\n{}", m.text);
        let want: BTreeSet<Vec<String>> = [keys.iter().map(|k| k.to_string()).collect()].into();
        assert_eq!(m.label_keys(name), want, "family {name}: label names of its series");
    }
    for (name, _, _) in expect {
        assert!(m.text.contains(&format!("# HELP {name} ")), "family {name} has no HELP line");
    }

    // Label values.
    let build = m.find("atlas_build_info", &[]);
    assert_eq!(scalar(&build[0].value), Some(1.0));
    let status = json(api, "/api/v1/status");
    assert_eq!(build[0].labels.get("version"), status["version"].as_str(), "build_info version vs /api/v1/status");
    assert_eq!(build[0].labels.get("driver"), status["driver"].as_str(), "build_info driver vs /api/v1/status");
    assert_eq!(build[0].labels.get("version"), Some("0.1.0"));
    assert_eq!(m.get("atlas_workers", &[]), 2.0);
    assert_eq!(Some(m.get("atlas_config_version", &[])), status["config_version"].as_f64());
    assert_eq!(m.get("atlas_config_reloads_total", &[("result", "ok")]), 0.0);
    assert_eq!(m.get("atlas_config_reloads_total", &[("result", "error")]), 0.0);
    assert_eq!(m.get("atlas_draining", &[]), 0.0);
    assert!(m.get("atlas_uptime_seconds", &[]) > 0.0);
    assert_eq!(m.values_of("atlas_http_requests_total", "class"), CLASSES.iter().map(|s| s.to_string()).collect());
    assert_eq!(m.values_of("atlas_upstream_responses_total", "class"), CLASSES.iter().map(|s| s.to_string()).collect());
    assert_eq!(m.values_of("atlas_rejected_total", "reason"), REASONS.iter().map(|s| s.to_string()).collect());
    for fam in ["atlas_connections_total", "atlas_http_requests_total", "atlas_rejected_total", "atlas_upstream_responses_total", "atlas_skim_samples_total"] {
        assert_eq!(m.values_of(fam, "listener"), ["default".to_string()].into(), "{fam}: listener names");
    }
    let ups: BTreeSet<String> = ["u0".to_string(), "u1".to_string()].into();
    for fam in [
        "atlas_upstream_responses_total",
        "atlas_upstream_errors_total",
        "atlas_upstream_header_duration_seconds",
        "atlas_upstream_up",
        "atlas_upstream_drained",
        "atlas_upstream_in_flight",
    ] {
        assert_eq!(m.values_of(fam, "upstream"), ups, "{fam}: upstream names");
        assert_eq!(m.values_of(fam, "group"), ["default".to_string()].into(), "{fam}: group names");
    }
    for u in ["u0", "u1"] {
        assert_eq!(m.get("atlas_upstream_up", &[("group", "default"), ("upstream", u)]), 1.0);
        assert_eq!(m.get("atlas_upstream_drained", &[("group", "default"), ("upstream", u)]), 0.0);
    }
    // In flight drops back to 0 once the exchanges are over (the client may
    // read a response a moment before Atlas finishes with the upstream).
    let idle = |m: &Metrics| ["u0", "u1"].iter().all(|u| m.get("atlas_upstream_in_flight", &[("group", "default"), ("upstream", u)]) == 0.0);
    let (ok, last) = scrape_until(api, SETTLE, idle);
    assert!(ok, "requests still in flight after they were answered:\n{}", last.text);
    // Histogram buckets: the documented 1-2-5 series, in seconds, then +Inf.
    for (name, pairs) in
        [("atlas_http_request_duration_seconds", vec![L]), ("atlas_upstream_header_duration_seconds", vec![L, ("group", "default"), ("upstream", "u0")])]
    {
        let h = m.hist(name, &pairs);
        let les: Vec<f64> = h.buckets.iter().map(|b| b.0).collect();
        let mut want = BOUNDS_S.to_vec();
        want.push(f64::INFINITY);
        assert_eq!(les, want, "{name}: bucket bounds");
    }
    // The gauge of operator drains.
    assert_eq!(post(api, "/api/v1/upstreams/u1/drain").status, 200);
    let m = scrape(api);
    assert_eq!(m.get("atlas_upstream_drained", &[("group", "default"), ("upstream", "u1")]), 1.0);
    assert_eq!(m.get("atlas_upstream_drained", &[("group", "default"), ("upstream", "u0")]), 0.0);
    // HEAD: the same head, no body.
    let h = call(api, "HEAD", "/metrics");
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    assert!(h.body.is_empty(), "HEAD /metrics sent a body");
}

#[test]
fn counters_summed_over_workers_move_exactly_with_traffic() {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    let atlas = start(&config(&[a.addr, b.addr], 2, "skim = true\n", ""), 2);
    let api = atlas.api.unwrap();
    let before = scrape(api);
    let h0 = before.hist("atlas_http_request_duration_seconds", &[L]);

    // Several connections at once, so that both workers serve some.
    const CONNS: usize = 4;
    const PER_CONN: usize = 10;
    const N: f64 = (CONNS * PER_CONN) as f64;
    let addr = atlas.addr();
    let (sent, received) = thread::scope(|s| {
        let hs: Vec<_> = (0..CONNS)
            .map(|k| {
                s.spawn(move || {
                    let mut c = Client::connect(addr);
                    let (mut sent, mut recv) = (0, 0);
                    for i in 0..PER_CONN {
                        let (s, r, status) = get_counted(&mut c, &format!("/c{k}/r{i}"));
                        assert_eq!(status, 200);
                        sent += s;
                        recv += r;
                    }
                    (sent, recv)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).fold((0u64, 0u64), |acc, x| (acc.0 + x.0, acc.1 + x.1))
    });
    let two_xx = |m: &Metrics| m.get("atlas_http_requests_total", &[L, ("class", "2xx")]);
    let (ok, after) = scrape_until(api, SETTLE, |m| two_xx(m) - two_xx(&before) >= N);
    let d = |name: &str, pairs: &[(&str, &str)]| after.get(name, pairs) - before.get(name, pairs);
    assert!(ok, "2xx grew by {} instead of {N}", two_xx(&after) - two_xx(&before));

    // Requests by class and the duration histogram.
    assert_eq!(d("atlas_http_requests_total", &[L, ("class", "2xx")]), N);
    for class in ["1xx", "3xx", "4xx", "5xx", "none"] {
        assert_eq!(d("atlas_http_requests_total", &[L, ("class", class)]), 0.0, "class {class}");
    }
    let h1 = after.hist("atlas_http_request_duration_seconds", &[L]);
    assert_eq!(h1.count - h0.count, N, "histogram _count");
    assert_eq!(h1.bucket(f64::INFINITY) - h0.bucket(f64::INFINITY), N, "+Inf bucket");
    assert!(h1.sum > h0.sum, "histogram _sum did not grow");
    // Bytes, exactly what the clients sent and received; connections.
    assert_eq!(d("atlas_received_bytes_total", &[L]), sent as f64, "bytes read from clients");
    assert_eq!(d("atlas_sent_bytes_total", &[L]), received as f64, "bytes written to clients");
    assert_eq!(d("atlas_connections_total", &[L]), CONNS as f64);
    assert_eq!(d("atlas_retries_total", &[L]), 0.0);
    for r in REASONS {
        assert_eq!(d("atlas_rejected_total", &[L, ("reason", r)]), 0.0, "reason {r}");
    }

    // Upstreams: the N responses split over u0 and u1, as the backends saw them.
    let up = |u: &'static str| [L, ("group", "default"), ("upstream", u)];
    let resp = |m: &Metrics, u: &'static str| m.get("atlas_upstream_responses_total", &[L, ("group", "default"), ("upstream", u), ("class", "2xx")]);
    let (r0, r1) = (resp(&after, "u0") - resp(&before, "u0"), resp(&after, "u1") - resp(&before, "u1"));
    assert_eq!(r0 + r1, N, "upstream 2xx responses u0={r0} u1={r1}");
    assert_eq!((r0 as usize, r1 as usize), (a.request_count(), b.request_count()), "responses per upstream vs requests the backends received");
    assert!(r0 > 0.0 && r1 > 0.0, "both upstreams should have served: u0={r0} u1={r1}");
    let mut hits = 0.0;
    let mut misses = 0.0;
    for (u, r) in [("u0", r0), ("u1", r1)] {
        assert_eq!(d("atlas_upstream_errors_total", &up(u)), 0.0, "{u} errors");
        let hb = before.hist("atlas_upstream_header_duration_seconds", &up(u));
        let ha = after.hist("atlas_upstream_header_duration_seconds", &up(u));
        assert_eq!(ha.count - hb.count, r, "{u}: header-time observations vs responses");
        hits += d("atlas_upstream_pool_hits_total", &up(u));
        misses += d("atlas_upstream_pool_misses_total", &up(u));
        // The in-flight guard is released before the exchange is counted,
        // so with every request counted nothing is in flight.
        assert_eq!(after.get("atlas_upstream_in_flight", &[("group", "default"), ("upstream", u)]), 0.0);
    }
    assert_eq!(hits + misses, N, "every request either reused a pooled connection or opened one (hits {hits}, misses {misses})");
    assert!(hits > 0.0, "keep-alive reuse must show as pool hits");
    assert_eq!(misses as usize, a.connections() + b.connections(), "pool misses vs connections the backends accepted");
    // The skim takes (or drops) one sample per request.
    let skim = |m: &Metrics| m.get("atlas_skim_samples_total", &[L]) + m.get("atlas_skim_dropped_total", &[L]);
    assert_eq!(skim(&after) - skim(&before), N, "skim samples taken + dropped");
}

#[test]
fn listeners_api_moves_with_traffic_and_matches_the_metrics() {
    let a = Backend::fixed("A");
    let atlas = start(&config(&[a.addr], 2, "", ""), 1);
    let api = atlas.api.unwrap();
    let l0 = json(api, "/api/v1/listeners");
    let l0 = listener(&l0, "default").clone();
    assert_eq!(l0["mode"], "http");
    assert_eq!(l0["requests_total"], 0);
    check_latency(&l0["latency_ms"], 0, "listener before traffic");

    let mut c = Client::connect(atlas.addr());
    let (mut sent, mut recv) = (0, 0);
    for i in 0..7 {
        let (s, r, status) = get_counted(&mut c, &format!("/{i}"));
        assert_eq!(status, 200);
        sent += s;
        recv += r;
    }
    // One refused request.
    let r = Client::connect(atlas.addr()).request("NOT-HTTP\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.head);

    let settled = wait_until(SETTLE, || {
        let doc = json(api, "/api/v1/listeners");
        let l = listener(&doc, "default");
        l["requests_total"] == 8 && l["rejected"]["malformed"] == 1
    });
    let doc = json(api, "/api/v1/listeners");
    let l = listener(&doc, "default");
    assert!(settled, "the listener figures did not reach 8 requests and 1 malformed: {l}");
    assert_eq!(l["address"].as_str().map(|a| a.starts_with("127.0.0.1:")), Some(true), "{l}");
    assert_eq!(l["requests"]["2xx"], 7);
    assert_eq!(l["requests"]["4xx"], 1);
    assert_eq!(l["connections_total"], 2);
    assert!(n(&l["bytes_in"]) >= sent as f64 && n(&l["bytes_out"]) >= recv as f64, "bytes: {l}");
    check_latency(&l["latency_ms"], 8, "listener");

    // The JSON view and the metrics agree.
    let m = scrape(api);
    let doc = json(api, "/api/v1/listeners");
    let l = listener(&doc, "default");
    assert_eq!(n(&l["connections_total"]), m.get("atlas_connections_total", &[L]));
    assert_eq!(n(&l["connections_active"]), m.get("atlas_connections_active", &[L]));
    assert_eq!(n(&l["bytes_in"]), m.get("atlas_received_bytes_total", &[L]));
    assert_eq!(n(&l["bytes_out"]), m.get("atlas_sent_bytes_total", &[L]));
    assert_eq!(n(&l["retries"]), m.get("atlas_retries_total", &[L]));
    let mut total = 0.0;
    for class in CLASSES {
        let v = m.get("atlas_http_requests_total", &[L, ("class", class)]);
        assert_eq!(n(&l["requests"][class]), v, "requests.{class}");
        total += v;
    }
    assert_eq!(n(&l["requests_total"]), total);
    for r in REASONS {
        assert_eq!(n(&l["rejected"][r]), m.get("atlas_rejected_total", &[L, ("reason", r)]), "rejected.{r}");
    }
    let h = m.hist("atlas_http_request_duration_seconds", &[L]);
    assert_eq!(n(&l["latency_ms"]["count"]), h.count);
    let mean_ms = h.sum / h.count * 1000.0;
    assert!((n(&l["latency_ms"]["mean"]) - mean_ms).abs() <= 0.01 + mean_ms * 0.01, "mean {} ms vs _sum/_count {mean_ms} ms", l["latency_ms"]["mean"]);
}

#[test]
fn listeners_api_reports_the_address_the_listener_is_bound_to() {
    // The listener is configured on port 0; the API should say where it
    // actually listens (the address clients can reach).
    let a = Backend::fixed("A");
    let atlas = start(&config(&[a.addr], 1, "", ""), 1);
    let doc = json(atlas.api.unwrap(), "/api/v1/listeners");
    let l = listener(&doc, "default");
    assert_eq!(
        l["address"].as_str(),
        Some(atlas.addr().to_string().as_str()),
        "/api/v1/listeners address (Atlas logged `listening addr={}`): {l}",
        atlas.addr()
    );
}

#[test]
fn smuggling_attempt_is_400_and_counted_as_smuggling() {
    let a = Backend::fixed("A");
    let atlas = start(&config(&[a.addr], 2, "", ""), 1);
    let api = atlas.api.unwrap();
    let before = scrape(api);
    let mut c = Client::connect(atlas.addr());
    let _ = c.try_send("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX");
    let r = c.read_response();
    assert_eq!(r.status, 400, "{}", r.head);
    assert_rejected_once(api, &before, "smuggling");
    assert_eq!(a.request_count(), 0);
}

#[test]
fn oversized_header_section_is_431_and_counted_as_header_too_large() {
    let a = Backend::fixed("A");
    let atlas = start(&config(&[a.addr], 2, "", "[limits]\nmax_header_bytes = 1024\n"), 1);
    let api = atlas.api.unwrap();
    let before = scrape(api);
    let big = format!("GET /big HTTP/1.1\r\nHost: h\r\nX-Filler: {}\r\n\r\n", "f".repeat(2000));
    let mut c = Client::connect(atlas.addr());
    let _ = c.try_send(big.as_bytes());
    let r = c.read_response();
    assert_eq!(r.status, 431, "{}", r.head);
    assert_rejected_once(api, &before, "header_too_large");
    // A head under the limit still passes.
    assert_eq!(Client::connect(atlas.addr()).get("/small").status, 200);
}

#[test]
fn garbage_request_line_is_400_and_counted_as_malformed() {
    let a = Backend::fixed("A");
    let atlas = start(&config(&[a.addr], 2, "", ""), 1);
    let api = atlas.api.unwrap();
    let before = scrape(api);
    let mut c = Client::connect(atlas.addr());
    let _ = c.try_send("THIS IS NOT HTTP\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 400, "{}", r.head);
    assert_rejected_once(api, &before, "malformed");
}

/// After one refused request: `reason` grew by exactly 1, no other reason
/// moved, and the refusal is counted as one 4xx request.
fn assert_rejected_once(api: SocketAddr, before: &Metrics, reason: &str) {
    let rej = |m: &Metrics, r: &str| m.get("atlas_rejected_total", &[L, ("reason", r)]);
    let (ok, after) = scrape_until(api, SETTLE, |m| rej(m, reason) - rej(before, reason) >= 1.0);
    assert!(ok, "atlas_rejected_total{{reason=\"{reason}\"}} did not move:\n{}", after.text);
    for r in REASONS {
        let want = if r == reason { 1.0 } else { 0.0 };
        assert_eq!(rej(&after, r) - rej(before, r), want, "atlas_rejected_total{{reason=\"{r}\"}} after one {reason} refusal");
    }
    let class = |m: &Metrics, c: &str| m.get("atlas_http_requests_total", &[L, ("class", c)]);
    assert_eq!(class(&after, "4xx") - class(before, "4xx"), 1.0, "the refusal is a 4xx answer");
    assert_eq!(class(&after, "2xx") - class(before, "2xx"), 0.0);
    let doc = json(api, "/api/v1/listeners");
    assert_eq!(n(&listener(&doc, "default")["rejected"][reason]), rej(&after, reason), "/api/v1/listeners rejected.{reason}");
}

#[test]
fn rate_limited_requests_are_429_and_counted_as_rate_limit() {
    let a = Backend::fixed("A");
    // One token every 5 s, burst 2: the third quick request is refused.
    let atlas = start(&config(&[a.addr], 1, "", "[limits]\nper_ip_requests_per_sec = 0.2\nper_ip_burst = 2\n"), 1);
    let api = atlas.api.unwrap();
    let before = scrape(api);
    let mut c = Client::connect(atlas.addr());
    let statuses: Vec<u16> = (0..6).map(|i| c.get(&format!("/{i}")).status).collect();
    let refused = statuses.iter().filter(|&&s| s == 429).count() as f64;
    let passed = statuses.iter().filter(|&&s| s == 200).count() as f64;
    assert_eq!(refused + passed, 6.0, "{statuses:?}");
    assert!(refused >= 3.0, "burst 2 at 0.2/s should refuse most of 6 quick requests: {statuses:?}");
    let rej = |m: &Metrics, r: &str| m.get("atlas_rejected_total", &[L, ("reason", r)]);
    let (ok, after) = scrape_until(api, SETTLE, |m| rej(m, "rate_limit") - rej(&before, "rate_limit") >= refused);
    assert!(ok, "rate_limit grew by {} for {refused} answers 429", rej(&after, "rate_limit") - rej(&before, "rate_limit"));
    for r in REASONS {
        let want = if r == "rate_limit" { refused } else { 0.0 };
        assert_eq!(rej(&after, r) - rej(&before, r), want, "reason {r}");
    }
    let class = |m: &Metrics, c: &str| m.get("atlas_http_requests_total", &[L, ("class", c)]);
    assert_eq!(class(&after, "4xx") - class(&before, "4xx"), refused);
    assert_eq!(class(&after, "2xx") - class(&before, "2xx"), passed);
    assert_eq!(a.request_count() as f64, passed, "refused requests must not reach the backend");
}

#[test]
fn refused_upstream_counts_errors_in_metrics_and_upstreams_api() {
    let a = Backend::fixed("A");
    let (_hold, dead) = dead_addr();
    let atlas = start(&config(&[a.addr, dead], 1, "", ""), 2);
    let api = atlas.api.unwrap();
    let mut c = Client::connect(atlas.addr());
    for i in 0..10 {
        let r = c.get(&format!("/{i}"));
        assert_eq!((r.status, r.text()), (200, "A".to_string()), "a refused connect falls over to the live upstream");
    }
    let up = |u: &'static str| [L, ("group", "default"), ("upstream", u)];
    let (ok, m) = scrape_until(api, SETTLE, |m| m.get("atlas_http_requests_total", &[L, ("class", "2xx")]) >= 10.0);
    assert!(ok);
    let errors = m.get("atlas_upstream_errors_total", &up("u1"));
    assert!(errors >= 1.0, "the refused upstream u1 has no errors:\n{}", m.text);
    assert_eq!(m.get("atlas_upstream_errors_total", &up("u0")), 0.0);
    assert_eq!(m.sum("atlas_upstream_responses_total", &up("u1")), 0.0, "u1 never answered");
    assert_eq!(m.get("atlas_upstream_responses_total", &[L, ("group", "default"), ("upstream", "u0"), ("class", "2xx")]), 10.0);
    assert_eq!(m.get("atlas_upstream_pool_misses_total", &up("u1")), errors, "every attempt on u1 needed a connection, and failed");
    assert_eq!(m.hist("atlas_upstream_header_duration_seconds", &up("u1")).count, 0.0);

    let doc = json(api, "/api/v1/upstreams");
    let u0 = upstream(&doc, "u0");
    let u1 = upstream(&doc, "u1");
    assert_eq!(u1["address"].as_str(), Some(dead.to_string().as_str()));
    assert_eq!(n(&u1["errors"]), errors, "JSON errors vs metric: {u1}");
    assert_eq!(n(&u1["requests"]), errors, "u1 requests = its failed attempts: {u1}");
    for class in CLASSES {
        assert_eq!(u1["responses"][class], 0, "u1 responses.{class}: {u1}");
    }
    check_latency(&u1["latency_ms"], 0, "u1");
    assert_eq!(u0["requests"], 10, "{u0}");
    assert_eq!(u0["errors"], 0, "{u0}");
    assert_eq!(u0["responses"]["2xx"], 10, "{u0}");
    check_latency(&u0["latency_ms"], 10, "u0");
    for (u, j) in [("u0", u0), ("u1", u1)] {
        assert_eq!(n(&j["pool_hits"]), m.get("atlas_upstream_pool_hits_total", &up(u)), "{u} pool_hits");
        assert_eq!(n(&j["pool_misses"]), m.get("atlas_upstream_pool_misses_total", &up(u)), "{u} pool_misses");
        assert_eq!(j["in_flight"], 0, "{j}");
        assert_eq!(j["drained"], false, "{j}");
        assert_eq!(j["group"], "default", "{j}");
        assert!(j["health"].is_string(), "{j}");
    }
    assert!(n(&u0["pool_hits"]) > 0.0, "keep-alive to u0 must reuse pooled connections: {u0}");
    let h = m.hist("atlas_upstream_header_duration_seconds", &up("u0"));
    assert_eq!(h.count, 10.0);
    assert_eq!(n(&u0["latency_ms"]["count"]), h.count);

    // The failure is in the recent events.
    let ev = json(api, "/api/v1/events");
    let events = ev["events"].as_array().expect("events array");
    assert!(
        events.iter().any(|e| e["kind"] == "upstream" && e["level"] == "error" && e["message"].as_str().is_some_and(|m| m.contains("u1"))),
        "no upstream error event for u1: {ev}"
    );
}

#[test]
fn slow_upstream_shows_in_flight_and_lands_in_the_right_latency_buckets() {
    let a = Backend::http(|_| Reply::ok("slow").after(Duration::from_millis(300)));
    let atlas = start(&config(&[a.addr], 2, "", ""), 1);
    let api = atlas.api.unwrap();
    let addr = atlas.addr();
    let t = thread::spawn(move || Client::connect(addr).get("/slow").status);
    let g = [("group", "default"), ("upstream", "u0")];
    let (seen, m) = scrape_until(api, SETTLE, |m| m.get("atlas_upstream_in_flight", &g) == 1.0);
    assert!(seen, "atlas_upstream_in_flight never showed the slow request:\n{}", m.text);
    let doc = json(api, "/api/v1/upstreams");
    // The request may have finished by now; it is 1 or already 0.
    assert!(upstream(&doc, "u0")["in_flight"].as_u64().is_some_and(|v| v <= 1), "{doc}");
    assert_eq!(t.join().unwrap(), 200);
    let (ok, m) =
        scrape_until(api, SETTLE, |m| m.get("atlas_upstream_in_flight", &g) == 0.0 && m.get("atlas_http_requests_total", &[L, ("class", "2xx")]) == 1.0);
    assert!(ok, "in flight did not return to 0 or the request was not counted:\n{}", m.text);

    // 300 ms: above the 0.2 s bound, whatever the machine's load.
    let uh = m.hist("atlas_upstream_header_duration_seconds", &[L, ("group", "default"), ("upstream", "u0")]);
    let lh = m.hist("atlas_http_request_duration_seconds", &[L]);
    for (what, h) in [("upstream header", &uh), ("request", &lh)] {
        assert_eq!(h.count, 1.0, "{what}");
        assert_eq!(h.bucket(0.2), 0.0, "{what}: a 300 ms observation is not <= 0.2 s: {:?}", h.buckets);
        assert_eq!(h.bucket(f64::INFINITY), 1.0, "{what}");
        assert!(h.sum >= 0.3 && h.sum < 5.0, "{what}: _sum is {} s for one 300 ms request (seconds expected)", h.sum);
    }
    let doc = json(api, "/api/v1/upstreams");
    let lat = &upstream(&doc, "u0")["latency_ms"];
    check_latency(lat, 1, "u0");
    assert!(n(&lat["mean"]) >= 300.0 && n(&lat["mean"]) < 5000.0, "u0 mean latency in ms: {lat}");
    assert!(n(&lat["p50"]) >= 200.0, "u0 p50 in ms: {lat}");
    let doc = json(api, "/api/v1/listeners");
    let lat = &listener(&doc, "default")["latency_ms"];
    check_latency(lat, 1, "listener");
    assert!(n(&lat["mean"]) >= 300.0 && n(&lat["mean"]) < 5000.0, "listener mean latency in ms: {lat}");
}

#[test]
fn active_connections_gauge_follows_open_client_connections() {
    let a = Backend::fixed("A");
    let atlas = start(&config(&[a.addr], 2, "", ""), 1);
    let api = atlas.api.unwrap();
    let active = |m: &Metrics| m.get("atlas_connections_active", &[L]);
    assert_eq!(active(&scrape(api)), 0.0);
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(atlas.addr())).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.get(&format!("/{i}")).status, 200);
    }
    let (ok, m) = scrape_until(api, SETTLE, |m| active(m) == 3.0);
    assert!(ok, "3 open connections, gauge says {}", active(&m));
    assert_eq!(m.get("atlas_connections_total", &[L]), 3.0);
    let doc = json(api, "/api/v1/listeners");
    assert_eq!(listener(&doc, "default")["connections_active"], 3);

    drop(clients.pop());
    let (ok, m) = scrape_until(api, SETTLE, |m| active(m) == 2.0);
    assert!(ok, "one closed, gauge says {}", active(&m));
    clients.clear();
    let (ok, m) = scrape_until(api, SETTLE, |m| active(m) == 0.0);
    assert!(ok, "all closed, gauge says {}", active(&m));
    assert_eq!(m.get("atlas_connections_total", &[L]), 3.0, "closing does not change the total");
    let doc = json(api, "/api/v1/listeners");
    assert_eq!(listener(&doc, "default")["connections_active"], 0);
}

/// Replaces `path` the way deploy tools do (write beside it, rename over).
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_file_name(".atlas.toml.tmp");
    std::fs::write(&tmp, text).expect("write temp config");
    std::fs::rename(&tmp, path).expect("rename config into place");
}

fn reload_events(api: SocketAddr) -> Vec<Json> {
    let doc = json(api, "/api/v1/events?limit=200");
    assert!(doc["dropped"].is_u64(), "events `dropped`: {doc}");
    doc["events"].as_array().expect("events array").iter().filter(|e| e["kind"] == "reload").cloned().collect()
}

#[test]
fn reloads_are_counted_by_result_bump_the_version_and_are_listed_as_events() {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    let dir = TempDir::new();
    let good = config(&[a.addr], 1, "", "");
    let path = dir.write("atlas.toml", &good);
    let atlas = Atlas::start_file(&path, 1);
    wait_registered(&atlas, 1);
    let api = atlas.api.unwrap();
    let m = scrape(api);
    let reloads = |m: &Metrics, r: &str| m.get("atlas_config_reloads_total", &[("result", r)]);
    let v0 = m.get("atlas_config_version", &[]);
    assert_eq!((reloads(&m, "ok"), reloads(&m, "error")), (0.0, 0.0));
    assert!(reload_events(api).is_empty());

    // A syntax error: rejected, counted, listed; the version stays.
    replace_file(&path, "[listen\nport = = 0\nthis is not toml ]]]\n");
    let (ok, m) = scrape_until(api, Duration::from_secs(4), |m| reloads(m, "error") >= 1.0);
    assert!(ok, "no failed reload counted:\n{}", m.text);
    thread::sleep(Duration::from_millis(300)); // a second (spurious) reload would show now
    let m = scrape(api);
    assert_eq!(reloads(&m, "error"), 1.0, "one rejected file, one failed reload");
    assert_eq!(reloads(&m, "ok"), 0.0);
    assert_eq!(m.get("atlas_config_version", &[]), v0, "a rejected reload must not change the version");
    let ev = reload_events(api);
    assert!(ev.iter().any(|e| e["level"] == "error"), "no reload error event: {ev:?}");
    for e in &ev {
        assert!(e["seq"].is_u64() && e["time_ms"].is_u64() && e["message"].is_string() && e["level"].is_string(), "event fields: {e}");
    }
    let st = json(api, "/api/v1/status");
    assert_eq!((st["reloads"]["ok"].as_u64(), st["reloads"]["failed"].as_u64()), (Some(0), Some(1)), "{st}");
    assert_eq!(st["last_reload"]["result"], "rejected", "{st}");
    assert_eq!(Client::connect(atlas.addr()).get("/").text(), "A", "the running configuration is unchanged");

    // A valid change (a second upstream): applied, counted, a newer version.
    replace_file(&path, &config(&[a.addr, b.addr], 1, "", ""));
    let (ok, m) = scrape_until(api, Duration::from_secs(4), |m| reloads(m, "ok") >= 1.0);
    assert!(ok, "no successful reload counted:\n{}", m.text);
    assert_eq!(reloads(&m, "error"), 1.0, "the failed count stays");
    let v1 = m.get("atlas_config_version", &[]);
    assert!(v1 > v0, "config version {v0} -> {v1}");
    assert_eq!(m.get("atlas_upstream_up", &[("group", "default"), ("upstream", "u1")]), 1.0, "the new upstream is in the metrics");
    let ev = reload_events(api);
    assert!(
        ev.iter().any(|e| e["level"] == "info" && e["message"].as_str().is_some_and(|msg| msg.contains(&format!("version {v1}")))),
        "no event for the applied reload to version {v1}: {ev:?}"
    );
    let seqs: Vec<u64> = ev.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "events oldest first, increasing seq: {seqs:?}");
    let st = json(api, "/api/v1/status");
    assert_eq!(st["config_version"].as_f64(), Some(v1), "{st}");
    assert_eq!(st["last_reload"]["result"], "applied", "{st}");
}

#[test]
fn counters_keep_counting_across_a_reload() {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    let dir = TempDir::new();
    let path = dir.write("atlas.toml", config(&[a.addr, b.addr], 2, "", ""));
    let atlas = Atlas::start_file(&path, 1);
    wait_registered(&atlas, 2);
    let api = atlas.api.unwrap();
    let mut c = Client::connect(atlas.addr());
    for i in 0..6 {
        assert_eq!(c.get(&format!("/before{i}")).status, 200);
    }
    let two_xx = |m: &Metrics| m.get("atlas_http_requests_total", &[L, ("class", "2xx")]);
    let (ok, m) = scrape_until(api, SETTLE, |m| two_xx(m) == 6.0);
    assert!(ok, "2xx = {} before the reload", two_xx(&m));
    // Same listener and upstreams, another strategy.
    let text = config(&[a.addr, b.addr], 2, "", "[routing]\nstrategy = \"least_connections\"\n");
    replace_file(&path, &text);
    let (ok, m) = scrape_until(api, Duration::from_secs(4), |m| m.get("atlas_config_reloads_total", &[("result", "ok")]) == 1.0);
    assert!(ok, "the reload was not applied:\n{}", m.text);
    assert_eq!(two_xx(&m), 6.0, "a reload must not reset the counters");
    let mut c2 = Client::connect(atlas.addr());
    for i in 0..4 {
        assert_eq!(c.get(&format!("/after{i}")).status, 200);
        assert_eq!(c2.get(&format!("/fresh{i}")).status, 200);
    }
    let (ok, m) = scrape_until(api, SETTLE, |m| two_xx(m) == 14.0);
    assert!(ok, "2xx = {} after 6 + 8 requests across a reload", two_xx(&m));
    let ups = m.sum("atlas_upstream_responses_total", &[L, ("class", "2xx")]);
    assert_eq!(ups, 14.0, "upstream responses across the reload");
    assert_eq!(m.get("atlas_connections_total", &[L]), 2.0);
}

#[test]
fn events_api_validates_limit() {
    let (_hold, dead) = dead_addr();
    let atlas = start(&config(&[dead], 1, "", ""), 1);
    let api = atlas.api.unwrap();
    // Two failures on separate connections make at least one upstream event.
    for _ in 0..2 {
        assert_eq!(Client::connect(atlas.addr()).get("/").status / 100, 5);
    }
    assert!(wait_until(SETTLE, || json(api, "/api/v1/events")["events"].as_array().is_some_and(|e| !e.is_empty())), "no event recorded");
    for bad in ["abc", "-1", "1.5"] {
        let r = call(api, "GET", &format!("/api/v1/events?limit={bad}"));
        assert_eq!(r.status, 400, "limit={bad:?}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"), "limit={bad:?}");
        let j: Json = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("limit={bad:?}: error is not JSON ({e}): {}", r.body));
        assert!(j["error"].is_string(), "limit={bad:?}: {j}");
    }
    let none = json(api, "/api/v1/events?limit=0");
    assert_eq!(none["events"].as_array().map(Vec::len), Some(0), "{none}");
    let one = json(api, "/api/v1/events?limit=1");
    assert_eq!(one["events"].as_array().map(Vec::len), Some(1), "{one}");
    let all = json(api, "/api/v1/events");
    let all = all["events"].as_array().unwrap();
    assert_eq!(one["events"][0], *all.last().unwrap(), "limit=1 gives the most recent event");
}

#[test]
fn strict_exposition_reader_rejects_what_prometheus_parse_would_skip() {
    // prometheus-parse ignores lines it cannot read, so the scrape checks
    // rely on this reader to fail on a broken exposition: make sure it does.
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n\
              # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
    parse_strict(ok).unwrap_or_else(|e| panic!("a valid exposition was refused: {e}"));
    let bad = [
        ("no final newline", ok.trim_end().to_string()),
        ("garbage line", format!("{ok}this is not a sample\n")),
        ("sample without TYPE", format!("{ok}b 1\n")),
        ("bad value", ok.replace("} 3", "} three")),
        ("unquoted label", ok.replace("x=\"1\"", "x=1")),
        ("duplicate series", ok.replace("a_total{x=\"1\"} 3\n", "a_total{x=\"1\"} 3\na_total{x=\"1\"} 4\n")),
        ("buckets not cumulative", ok.replace("h_bucket{le=\"+Inf\"} 2", "h_bucket{le=\"+Inf\"} 0").replace("h_count 2", "h_count 0")),
        ("no +Inf bucket", ok.replace("h_bucket{le=\"+Inf\"} 2\n", "")),
        ("_count differs from +Inf", ok.replace("h_count 2", "h_count 5")),
        ("no _sum", ok.replace("h_sum 0.3\n", "")),
        ("family split", format!("{ok}a_total{{x=\"2\"}} 1\n")),
        ("second TYPE", format!("{ok}# TYPE a_total gauge\n")),
    ];
    for (what, text) in bad {
        assert!(parse_strict(&text).is_err(), "{what}: accepted\n{text}");
    }
}
