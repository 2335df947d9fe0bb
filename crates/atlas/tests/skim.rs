//! Traffic skim: recent samples as JSON lines, `since`/`limit`, payload
//! prefixes, route-level taps, API errors, the server-sent event stream
//! (with `Last-Event-ID`), rates and top lists, drop accounting under load,
//! and TCP listeners.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;

/// How long a sample may take to reach the API (collected every 100 ms).
const SAMPLE_WAIT: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// One request on a fresh connection from `from` (a loopback address).
fn call_from(from: &str, api: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let (status, _head, body) = call_full(from, api, method, path, headers);
    (status, body)
}

fn call(api: SocketAddr, method: &str, path: &str) -> (u16, String) {
    call_from("127.0.0.1", api, method, path, "")
}

/// Like `call_from`, also returning the response head.
fn call_full(from: &str, api: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String, String) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    sock.connect(&api.into()).unwrap();
    let mut s: TcpStream = sock.into();
    set_timeouts(&s, Duration::from_secs(5));
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n{headers}\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").map(|(h, b)| (h.to_string(), b.to_string())).unwrap_or_default();
    (status, head, body)
}

/// The value of header `name` in a raw head.
fn header_of(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|l| l.split_once(':').filter(|(n, _)| n.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()))
}

/// `GET /api/v1/skim?{query}`: the samples, parsed.
fn samples(api: SocketAddr, query: &str) -> Vec<Value> {
    let (status, body) = call(api, "GET", &format!("/api/v1/skim?{query}"));
    assert_eq!(status, 200, "skim {query}: {body}");
    body.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"))).collect()
}

/// Polls until `GET /api/v1/skim?{query}` lists at least `n` samples.
fn wait_samples(api: SocketAddr, query: &str, n: usize) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = wait_until(SAMPLE_WAIT, || {
        last = samples(api, query);
        last.len() >= n
    });
    assert!(ok, "expected {n} sample(s) for {query}, got {}: {last:#?}", last.len());
    last
}

fn rates(api: SocketAddr, query: &str) -> Value {
    let (status, body) = call(api, "GET", &format!("/api/v1/skim/rates?{query}"));
    assert_eq!(status, 200, "rates {query}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("rates not JSON ({e}): {body}"))
}

/// `[[listeners]]` entries: (name, mode, extra keys), one worker in all,
/// one upstream `app1` at `backend`, the API, then `extra`.
fn config(backend: SocketAddr, listeners: &[(&str, &str, &str)], extra: &str) -> String {
    let mut s = String::from("[runtime]\nworkers = 1\n\n");
    for (name, mode, keys) in listeners {
        s.push_str(&format!("[[listeners]]\nname = \"{name}\"\naddress = \"127.0.0.1\"\nport = 0\nmode = \"{mode}\"\n{keys}\n\n"));
    }
    s.push_str(&format!(
        "[[upstreams]]\nname = \"app1\"\naddress = \"{}\"\nport = {}\n\n[api]\naddress = \"127.0.0.1:0\"\n\n{extra}",
        backend.ip(),
        backend.port()
    ));
    s
}

/// One skimmed HTTP listener `web` with `keys`, its tap up.
fn start_web(backend: SocketAddr, keys: &str) -> Atlas {
    let atlas = Atlas::start(&config(backend, &[("web", "http", &format!("skim = true\n{keys}"))], ""));
    wait_tap(atlas.api.unwrap(), "web");
    atlas
}

/// Waits until the workers have created the tap of `listener`: until then
/// the API answers 503 ("not running yet").
fn wait_tap(api: SocketAddr, listener: &str) {
    let mut last = (0, String::new());
    let ok = wait_until(Duration::from_secs(5), || {
        last = call(api, "GET", &format!("/api/v1/skim?listener={listener}&limit=1"));
        assert!(last.0 == 200 || (last.0 == 503 && last.1.contains("not running yet")), "skim of {listener}: {last:?}");
        last.0 == 200
    });
    assert!(ok, "the tap of {listener} never came up: {last:?}");
}

/// Sends `raw` on a fresh connection (ask for `Connection: close`) and
/// returns every byte received.
fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut c = Client::connect(addr);
    c.send(raw);
    c.read_to_close()
}

/// The full size (head, blank line, body) of a response read by `Client`.
fn wire_size(r: &Response) -> usize {
    assert!(!r.chunked, "sizes are computed for Content-Length bodies only");
    r.head.len() + 4 + r.body.len()
}

// ---------------------------------------------------------------------------
// Listing samples
// ---------------------------------------------------------------------------

#[test]
fn samples_are_json_lines_oldest_first_with_request_metadata() {
    let backend =
        Backend::http(|r| if r.target.starts_with("/missing") { Reply::status(404, "Not Found", "nope") } else { Reply::ok(format!("body of {}", r.target)) });
    let atlas = start_web(backend.addr, "");
    let api = atlas.api.unwrap();

    let mut c = Client::connect(atlas.addr());
    let local = c.stream.local_addr().unwrap();
    let mut sizes = Vec::new();
    for t in ["/s/1?q=a", "/s/2", "/missing"] {
        let req = format!("GET {t} HTTP/1.1\r\nHost: atlas.test\r\n\r\n");
        let r = c.request(&req);
        sizes.push((req.len(), wire_size(&r), r.status));
    }
    let (status, head, _) = call_full("127.0.0.1", api, "GET", "/api/v1/skim?listener=web", "");
    assert_eq!(status, 200);
    assert_eq!(header_of(&head, "content-type").as_deref(), Some("application/x-ndjson"), "{head}");

    let s = wait_samples(api, "listener=web", 3);
    assert_eq!(s.len(), 3, "{s:#?}");
    let targets: Vec<&str> = s.iter().map(|v| v["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["/s/1?q=a", "/s/2", "/missing"], "oldest first, target with its query");
    let seqs: Vec<u64> = s.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "consecutive sequence numbers: {seqs:?}");
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    for (v, (req_len, resp_len, status)) in s.iter().zip(&sizes) {
        for k in ["seq", "time_ms", "listener", "worker", "kind", "client", "upstream", "bytes_in", "bytes_out", "duration_us", "method", "target", "status"] {
            assert!(v.get(k).is_some(), "key {k} missing in {v}");
        }
        assert_eq!(v["listener"], "web");
        assert_eq!(v["kind"], "http");
        assert_eq!(v["worker"], 0, "one worker");
        assert_eq!(v["client"], local.to_string(), "the client's address and port");
        assert_eq!(v["upstream"], "app1");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["status"], *status);
        assert_eq!(v["bytes_in"], *req_len as u64, "{v}");
        assert_eq!(v["bytes_out"], *resp_len as u64, "{v}");
        assert!(v["duration_us"].as_u64().unwrap() < 10_000_000, "{v}");
        let t = v["time_ms"].as_u64().unwrap();
        assert!(t <= now_ms + 1000 && t + 60_000 > now_ms, "time_ms {t} is a recent Unix time in ms (now {now_ms})");
        assert!(v.get("request_payload").is_none() && v.get("response_payload").is_none(), "no payloads by default: {v}");
    }
}

#[test]
fn limit_and_since_select_samples() {
    let backend = Backend::echo_path();
    let atlas = start_web(backend.addr, "");
    let api = atlas.api.unwrap();
    let mut c = Client::connect(atlas.addr());
    for i in 0..6 {
        assert_eq!(c.get(&format!("/n/{i}")).status, 200);
    }
    let all = wait_samples(api, "listener=web", 6);
    assert_eq!(all.len(), 6);
    let seq = |v: &Value| v["seq"].as_u64().unwrap();
    let target = |v: &Value| v["target"].as_str().unwrap().to_string();

    let latest = samples(api, "listener=web&limit=2");
    assert_eq!(latest.iter().map(target).collect::<Vec<_>>(), ["/n/4", "/n/5"], "limit: the latest N, oldest first");

    let s3 = seq(&all[2]);
    let after = samples(api, &format!("listener=web&since={s3}"));
    assert_eq!(after.iter().map(target).collect::<Vec<_>>(), ["/n/3", "/n/4", "/n/5"], "since: only samples with seq > {s3}");
    assert!(after.iter().all(|v| seq(v) > s3));
    let after_limited = samples(api, &format!("listener=web&since={s3}&limit=1"));
    assert_eq!(after_limited.iter().map(target).collect::<Vec<_>>(), ["/n/3"], "since + limit: the oldest after since");
    let last = seq(&all[5]);
    assert!(samples(api, &format!("listener=web&since={last}")).is_empty(), "nothing after the newest");
}

#[test]
fn payload_bytes_copy_the_first_bytes_of_request_and_response_bodies() {
    let backend = Backend::http(|r| if r.method == "POST" { Reply::ok("response-body") } else { Reply::ok("") });
    let atlas = start_web(backend.addr, "skim_payload_bytes = 5\n");
    let api = atlas.api.unwrap();
    let r = exchange(atlas.addr(), b"POST /upload HTTP/1.1\r\nHost: atlas.test\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world");
    assert!(r.starts_with(b"HTTP/1.1 200"), "{}", show(&r));
    assert!(backend.wait_for_requests(1, Duration::from_secs(2)));
    assert_eq!(backend.last().body, b"hello world", "the whole body still reaches the upstream");
    let r2 = exchange(atlas.addr(), b"GET /empty HTTP/1.1\r\nHost: atlas.test\r\nConnection: close\r\n\r\n");
    assert!(r2.starts_with(b"HTTP/1.1 200"), "{}", show(&r2));

    let s = wait_samples(api, "listener=web", 2);
    assert_eq!(s[0]["target"], "/upload");
    assert_eq!(s[0]["method"], "POST");
    assert_eq!(s[0]["request_payload"], "hello", "first 5 bytes of the request body: {}", s[0]);
    assert_eq!(s[0]["response_payload"], "respo", "first 5 bytes of the response body: {}", s[0]);
    assert_eq!(s[1]["target"], "/empty");
    assert!(s[1].get("request_payload").is_none() && s[1].get("response_payload").is_none(), "empty bodies: no payload fields: {}", s[1]);
}

#[test]
fn route_level_tap_samples_only_that_route() {
    let backend = Backend::echo_path();
    let cfg = config(backend.addr, &[("web", "http", "")], "[[routes]]\nprefix = \"/api\"\ngroup = \"default\"\nskim = true\n");
    let atlas = Atlas::start(&cfg);
    let api = atlas.api.unwrap();
    wait_tap(api, "web");
    let mut c = Client::connect(atlas.addr());
    for t in ["/api/x", "/other", "/api/y?z=1", "/other/2", "/"] {
        let r = c.get(t);
        assert_eq!((r.status, r.text()), (200, t.to_string()), "both routes reach the upstream");
    }
    // A marker after the unsampled ones: once it is listed, the others would be too.
    assert_eq!(c.get("/api/last").status, 200);
    let s = wait_samples(api, "listener=web", 3);
    thread::sleep(Duration::from_millis(300));
    let s2 = samples(api, "listener=web");
    assert_eq!(s2.len(), s.len(), "{s2:#?}");
    let targets: Vec<&str> = s2.iter().map(|v| v["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["/api/x", "/api/y?z=1", "/api/last"], "only requests of the skimmed route are sampled");
    let r = rates(api, "listener=web");
    assert_eq!(r["samples_taken"], 3, "{r}");
}

// ---------------------------------------------------------------------------
// API errors
// ---------------------------------------------------------------------------

#[test]
fn skim_api_errors_name_the_problem() {
    let backend = Backend::echo_path();
    let cfg = config(backend.addr, &[("web", "http", "skim = true\n"), ("plain", "http", "")], "");
    let atlas = Atlas::start_n(&cfg, 2);
    let api = atlas.api.unwrap();
    wait_tap(api, "web");
    let json = |body: &str| -> Value { serde_json::from_str(body).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body}")) };

    let (s, head, body) = call_full("127.0.0.1", api, "GET", "/api/v1/skim", "");
    assert_eq!(s, 400, "{body}");
    assert_eq!(header_of(&head, "content-type").as_deref(), Some("application/json"));
    let msg = json(&body)["error"].as_str().unwrap().to_string();
    assert!(msg.contains("listener"), "{msg}");
    assert!(msg.contains("web") && !msg.contains("plain"), "lists the listeners that have a tap: {msg}");

    let (s, body) = call(api, "GET", "/api/v1/skim?listener=nosuch");
    assert_eq!(s, 404, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("nosuch"), "{body}");

    let (s, body) = call(api, "GET", "/api/v1/skim?listener=plain");
    assert_eq!(s, 404, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("skim = true"), "{body}");

    let (s, body) = call(api, "GET", "/api/v1/skim?listener=web&limit=abc");
    assert_eq!(s, 400, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("limit"), "{body}");
    let (s, body) = call(api, "GET", "/api/v1/skim?listener=web&since=-1");
    assert_eq!(s, 400, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("since"), "{body}");

    // The rates endpoint checks the same way.
    assert_eq!(call(api, "GET", "/api/v1/skim/rates").0, 400);
    assert_eq!(call(api, "GET", "/api/v1/skim/rates?listener=nosuch").0, 404);
    assert_eq!(call(api, "GET", "/api/v1/skim/rates?listener=plain").0, 404);
    let (s, body) = call(api, "GET", "/api/v1/skim/rates?listener=web&window=abc");
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("window"), "{body}");
    // Read-only endpoints.
    assert_eq!(call(api, "POST", "/api/v1/skim?listener=web").0, 405);

    // A good request still works.
    assert_eq!(call(api, "GET", "/api/v1/skim?listener=web").0, 200);
    assert_eq!(call(api, "GET", "/api/v1/skim/rates?listener=web").0, 200);
}

#[test]
fn skim_payload_bytes_out_of_range_is_a_config_error() {
    let text = config(refused_addr(), &[("web", "http", "skim = true\nskim_payload_bytes = 5000\n")], "");
    let path = write_config(&text);
    let (code, _out, err) = run_cli(&["--check", path.to_str().unwrap()], &[]);
    let _ = std::fs::remove_file(&path);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("skim_payload_bytes"), "{err}");
}

// ---------------------------------------------------------------------------
// Follow (server-sent events)
// ---------------------------------------------------------------------------

/// An open SSE stream on the API.
struct Sse {
    s: TcpStream,
    buf: Vec<u8>,
    head: String,
}

impl Sse {
    fn open(api: SocketAddr, path: &str, headers: &str) -> Sse {
        Self::open_with(api, path, headers, None)
    }

    /// `rcvbuf`: a small receive buffer, so that a reader that stops
    /// reading backs the stream up quickly.
    fn open_with(api: SocketAddr, path: &str, headers: &str, rcvbuf: Option<usize>) -> Sse {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if let Some(n) = rcvbuf {
            sock.set_recv_buffer_size(n).unwrap();
        }
        sock.connect(&api.into()).unwrap();
        let mut s: TcpStream = sock.into();
        set_timeouts(&s, Duration::from_millis(200));
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: api\r\n{headers}\r\n").as_bytes()).unwrap();
        let mut sse = Sse { s, buf: Vec::new(), head: String::new() };
        let deadline = Instant::now() + Duration::from_secs(5);
        let end = loop {
            if let Some(p) = find(&sse.buf, b"\r\n\r\n") {
                break p;
            }
            assert!(Instant::now() < deadline, "no response head: {}", show(&sse.buf));
            sse.fill();
        };
        sse.head = String::from_utf8_lossy(&sse.buf[..end]).into_owned();
        sse.buf.drain(..end + 4);
        sse
    }

    fn fill(&mut self) {
        let mut tmp = [0u8; 16 * 1024];
        match self.s.read(&mut tmp) {
            Ok(0) => panic!("the event stream closed; got {}", show(&self.buf)),
            Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading the event stream: {e}"),
        }
    }

    /// The next `n` `sample` events as (id, data), waiting up to `within`;
    /// other blocks (retry, comments) are skipped.
    fn events(&mut self, n: usize, within: Duration) -> Vec<(u64, Value)> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            if let Some(p) = find(&self.buf, b"\n\n") {
                let block = String::from_utf8(self.buf.drain(..p + 2).collect()).unwrap();
                let mut id = None;
                let mut event = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse::<u64>().unwrap_or_else(|_| panic!("bad id in {block:?}")));
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str::<Value>(v).unwrap_or_else(|e| panic!("bad data ({e}) in {block:?}")));
                    }
                }
                if event.as_deref() == Some("sample") {
                    let (id, data) = (id.expect("id line"), data.expect("data line"));
                    assert_eq!(data["seq"], id, "the event id is the sample's seq");
                    out.push((id, data));
                } else {
                    assert!(event.is_none() && data.is_none(), "unexpected block {block:?}");
                }
                continue;
            }
            assert!(Instant::now() < deadline, "expected {n} sample event(s), got {}; pending {}", out.len(), show(&self.buf));
            self.fill();
        }
        out
    }

    /// No complete `sample` event arrives within `within`.
    fn quiet_for(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            self.fill();
        }
        !String::from_utf8_lossy(&self.buf).contains("event: sample")
    }
}

#[test]
fn follow_streams_new_samples_as_server_sent_events() {
    let backend = Backend::echo_path();
    let atlas = start_web(backend.addr, "");
    let api = atlas.api.unwrap();
    let mut c = Client::connect(atlas.addr());
    // An old sample: a stream starts after the newest one.
    assert_eq!(c.get("/old").status, 200);
    wait_samples(api, "listener=web", 1);

    let mut sse = Sse::open(api, "/api/v1/skim?listener=web&follow=1", "");
    assert!(sse.head.starts_with("HTTP/1.1 200"), "{}", sse.head);
    assert_eq!(header_of(&sse.head, "content-type").as_deref(), Some("text/event-stream"), "{}", sse.head);
    assert!(sse.quiet_for(Duration::from_millis(400)), "no event before new traffic: {}", show(&sse.buf));

    for i in 0..3 {
        assert_eq!(c.get(&format!("/live/{i}")).status, 200);
    }
    let ev = sse.events(3, SAMPLE_WAIT);
    let targets: Vec<&str> = ev.iter().map(|(_, d)| d["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["/live/0", "/live/1", "/live/2"]);
    assert!(ev.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{ev:?}");
    assert!(ev.iter().all(|(_, d)| d["listener"] == "web" && d["kind"] == "http" && d["status"] == 200));

    // More traffic keeps coming on the same stream.
    assert_eq!(c.get("/live/3").status, 200);
    let more = sse.events(1, SAMPLE_WAIT);
    assert_eq!(more[0].1["target"], "/live/3");
    assert_eq!(more[0].0, ev[2].0 + 1);
    drop(sse);

    // The API still answers after the client went away.
    assert_eq!(call(api, "GET", "/health").0, 200);
}

#[test]
fn accept_event_stream_header_also_follows() {
    let backend = Backend::echo_path();
    let atlas = start_web(backend.addr, "");
    let api = atlas.api.unwrap();
    let mut sse = Sse::open(api, "/api/v1/skim?listener=web", "Accept: text/event-stream\r\n");
    assert_eq!(header_of(&sse.head, "content-type").as_deref(), Some("text/event-stream"), "{}", sse.head);
    let mut c = Client::connect(atlas.addr());
    assert_eq!(c.get("/via-accept").status, 200);
    let ev = sse.events(1, SAMPLE_WAIT);
    assert_eq!(ev[0].1["target"], "/via-accept");
}

#[test]
fn last_event_id_resumes_after_that_sequence() {
    let backend = Backend::echo_path();
    let atlas = start_web(backend.addr, "");
    let api = atlas.api.unwrap();
    let mut c = Client::connect(atlas.addr());
    for i in 0..5 {
        assert_eq!(c.get(&format!("/r/{i}")).status, 200);
    }
    let all = wait_samples(api, "listener=web", 5);
    let second = all[1]["seq"].as_u64().unwrap();

    // A reconnecting EventSource sends the last id it saw.
    let mut sse = Sse::open(api, "/api/v1/skim?listener=web&follow=1", &format!("Last-Event-ID: {second}\r\n"));
    let ev = sse.events(3, SAMPLE_WAIT);
    let targets: Vec<&str> = ev.iter().map(|(_, d)| d["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["/r/2", "/r/3", "/r/4"], "resumes right after id {second}");
    assert_eq!(ev[0].0, second + 1);
    assert!(sse.quiet_for(Duration::from_millis(400)), "nothing replayed twice: {}", show(&sse.buf));
    // And then follows new traffic.
    assert_eq!(c.get("/r/new").status, 200);
    assert_eq!(sse.events(1, SAMPLE_WAIT)[0].1["target"], "/r/new");

    // `since` does the same without the header.
    let mut sse2 = Sse::open(api, &format!("/api/v1/skim?listener=web&follow=1&since={second}"), "");
    let ev2 = sse2.events(4, SAMPLE_WAIT);
    assert_eq!(ev2[0].0, second + 1);
    assert_eq!(ev2[3].1["target"], "/r/new");
}

// ---------------------------------------------------------------------------
// Rates
// ---------------------------------------------------------------------------

/// Sleeps until just after the next whole second of wall-clock time.
fn sleep_to_second_start() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into = now.subsec_millis() as u64;
    thread::sleep(Duration::from_millis(1000 - into + 20));
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn rates_report_requests_bytes_status_classes_top_paths_and_clients() {
    let backend = Backend::http(|r| if r.target.starts_with("/missing") { Reply::status(404, "Not Found", "") } else { Reply::ok("0123456789") });
    let atlas = start_web(backend.addr, "");
    let api = atlas.api.unwrap();
    let mut c = Client::connect(atlas.addr());

    // All the traffic within one wall-clock second, so that one complete
    // second holds all of it.
    let plan: Vec<String> =
        (0..6).map(|i| format!("/hot?i={i}")).chain((0..3).map(|i| format!("/warm?i={i}"))).chain(["/cold".to_string(), "/missing".to_string()]).collect();
    sleep_to_second_start();
    let sec = unix_secs();
    let (mut bytes_in, mut bytes_out) = (0usize, 0usize);
    for t in &plan {
        let req = get_req(t);
        let r = c.request(&req);
        bytes_in += req.len();
        bytes_out += wire_size(&r);
    }
    assert_eq!(unix_secs(), sec, "the traffic did not fit in one second (machine too slow?)");

    // Rates only count complete seconds: wait for the next one.
    let mut r = Value::Null;
    let ok = wait_until(SAMPLE_WAIT, || {
        r = rates(api, "listener=web&window=5");
        r["requests"].as_u64().unwrap_or(0) > 0
    });
    assert!(ok, "rates never counted the traffic: {r}");
    let n = plan.len() as u64;
    assert_eq!(r["requests"], n, "{r}");
    assert_eq!(r["listener"], "web");
    let span = r["window_secs"].as_u64().unwrap();
    assert!((1..=5).contains(&span), "{r}");
    let per = |x: u64| x as f64 / span as f64;
    let close = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-6;
    assert!(close(&r["requests_per_sec"], per(n)), "{r}");
    assert!(close(&r["bytes_in_per_sec"], per(bytes_in as u64)), "bytes in: {bytes_in} in {span} s: {r}");
    assert!(close(&r["bytes_out_per_sec"], per(bytes_out as u64)), "bytes out: {bytes_out} in {span} s: {r}");
    assert!(close(&r["status_per_sec"]["2xx"], per(n - 1)), "{r}");
    assert!(close(&r["status_per_sec"]["4xx"], per(1)), "{r}");
    assert!(close(&r["status_per_sec"]["5xx"], 0.0), "{r}");

    let top = r["top_paths"].as_array().unwrap();
    assert_eq!(top[0]["key"], "/hot", "the most requested path first, without its query string: {r}");
    assert_eq!(top[0]["count"], 6);
    assert!(close(&top[0]["per_sec"], per(6)), "{r}");
    assert_eq!(top[1]["key"], "/warm");
    assert_eq!(top[1]["count"], 3);
    let keys: Vec<&str> = top.iter().map(|p| p["key"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), 4, "four distinct paths: {keys:?}");
    assert!(keys.contains(&"/cold") && keys.contains(&"/missing"), "{keys:?}");

    let clients = r["top_clients"].as_array().unwrap();
    assert_eq!(clients.len(), 1, "{r}");
    assert_eq!(clients[0]["key"], "127.0.0.1");
    assert_eq!(clients[0]["count"], n);
    assert_eq!(r["samples_taken"], n, "{r}");
    assert_eq!(r["samples_dropped"], 0, "{r}");
}

/// Traffic from the second in which a listener's tap was created must be
/// counted like any other while it is inside the window.
#[test]
fn rates_keep_counting_traffic_from_the_taps_first_second() {
    let backend = Backend::fixed("x");
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Start Atlas early in a second, so that the tap is created, and the
        // traffic sent, in that same second with room to spare.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        if !(150..400).contains(&now.subsec_millis()) {
            let to = (1150 + 1000 - now.subsec_millis() as u64) % 1000;
            thread::sleep(Duration::from_millis(to));
        }
        let sec = unix_secs();
        let atlas = start_web(backend.addr, "");
        let api = atlas.api.unwrap();
        let mut c = Client::connect(atlas.addr());
        for i in 0..5 {
            assert_eq!(c.get(&format!("/first/{i}")).status, 200);
        }
        if unix_secs() != sec {
            assert!(attempt < 4, "Atlas start-up and 5 requests never fit in one second");
            continue;
        }
        wait_samples(api, "listener=web", 5);
        // Now watch the 10-second window for the next 2.5 seconds: all five
        // requests are in it (in a complete second) the whole time.
        let until = Instant::now() + Duration::from_millis(2500);
        let mut seen = Vec::new();
        while Instant::now() < until {
            let r = rates(api, "listener=web&window=10");
            let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            if at.as_secs() > sec {
                seen.push((at.as_millis() as u64 - sec * 1000, r["requests"].as_u64().unwrap(), r["window_secs"].as_u64().unwrap()));
            }
            thread::sleep(Duration::from_millis(50));
        }
        let wrong: Vec<_> = seen.iter().filter(|(_, req, _)| *req != 5).collect();
        assert!(
            wrong.is_empty(),
            "the 5 requests of the tap's first second dropped out of the 10 s window at times; \
             (ms after that second began, requests, window_secs): {wrong:?} of {} readings",
            seen.len()
        );
        return;
    }
}

// ---------------------------------------------------------------------------
// Load: drops are counted, the proxy never blocks
// ---------------------------------------------------------------------------

#[test]
fn every_request_is_sampled_or_counted_as_dropped_and_the_proxy_never_waits_for_the_skim() {
    let backend = Backend::fixed("ok");
    let atlas = start_web(backend.addr, "skim_payload_bytes = 64\n");
    let api = atlas.api.unwrap();
    let addr = atlas.addr();
    // A follower that stops reading (after the head): its stream backs up,
    // nothing else may.
    let stalled = Sse::open_with(api, "/api/v1/skim?listener=web&follow=1", "", Some(4096));
    let threads = 4;
    let per_thread = 3000; // 12 000 in all: more than the history keeps
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut ok = 0;
                // Pipelined in small batches to push the rate up.
                for batch in 0..per_thread / 10 {
                    let mut reqs = String::new();
                    for i in 0..10 {
                        reqs.push_str(&get_req(&format!("/load/{t}/{}", batch * 10 + i)));
                    }
                    c.send(reqs);
                    for _ in 0..10 {
                        if c.read_response().status == 200 {
                            ok += 1;
                        }
                    }
                }
                ok
            })
        })
        .collect();
    let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let took = started.elapsed();
    let sent = threads * per_thread;
    assert_eq!(ok, sent, "every request got a 200");
    assert_eq!(call(api, "GET", "/health").0, 200, "the API still answers beside the stalled follower");

    let mut r = Value::Null;
    let settled = wait_until(SAMPLE_WAIT, || {
        r = rates(api, "listener=web&window=60");
        r["samples_taken"].as_u64().unwrap() + r["samples_dropped"].as_u64().unwrap() >= sent as u64
    });
    let (taken, dropped) = (r["samples_taken"].as_u64().unwrap(), r["samples_dropped"].as_u64().unwrap());
    assert!(settled, "taken {taken} + dropped {dropped} never reached {sent} requests");
    thread::sleep(Duration::from_millis(300));
    let r2 = rates(api, "listener=web&window=60");
    assert_eq!((r2["samples_taken"].as_u64(), r2["samples_dropped"].as_u64()), (Some(taken), Some(dropped)), "nothing counted twice");
    eprintln!("{sent} requests in {took:?}: {taken} samples taken, {dropped} dropped");
    assert_eq!(taken + dropped, sent as u64, "every request is sampled or counted as dropped");

    // Every sample taken reached the history, which keeps the newest 10 000
    // with contiguous sequence numbers.
    let keep = taken.min(10_000);
    let s = wait_samples(api, "listener=web&limit=10000", keep as usize);
    assert_eq!(s.len() as u64, keep);
    let first = s[0]["seq"].as_u64().unwrap();
    assert_eq!(first, taken - keep + 1, "the oldest samples are the ones evicted");
    for (i, v) in s.iter().enumerate() {
        assert_eq!(v["seq"], first + i as u64, "contiguous seqs");
    }
    assert_eq!(s.last().unwrap()["seq"], taken);
    // The Prometheus counters agree.
    let (_, metrics) = call(api, "GET", "/metrics");
    assert!(metrics.lines().any(|l| l == format!("atlas_skim_samples_total{{listener=\"web\"}} {taken}")), "{metrics}");
    assert!(metrics.lines().any(|l| l == format!("atlas_skim_dropped_total{{listener=\"web\"}} {dropped}")), "{metrics}");
    drop(stalled);
}

// ---------------------------------------------------------------------------
// TCP listeners
// ---------------------------------------------------------------------------

#[test]
fn tcp_listener_samples_one_entry_per_connection_with_byte_counts() {
    let backend = Backend::raw(echo);
    let atlas = Atlas::start(&config(backend.addr, &[("game", "tcp", "skim = true\n")], ""));
    let api = atlas.api.unwrap();
    wait_tap(api, "game");
    let sizes = [100usize, 50_000];
    let mut locals = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let data = pattern(n, 7 + i as u64);
        let mut s = TcpStream::connect(atlas.addr()).unwrap();
        set_timeouts(&s, IO_TIMEOUT);
        locals.push(s.local_addr().unwrap());
        let mut w = s.try_clone().unwrap();
        let d2 = data.clone();
        let writer = thread::spawn(move || {
            w.write_all(&d2).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == data, "echo of {n} bytes came back with {} bytes", back.len());
    }
    let s = wait_samples(api, "listener=game", 2);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(samples(api, "listener=game").len(), 2, "one sample per connection");
    for ((v, &n), local) in s.iter().zip(&sizes).zip(&locals) {
        assert_eq!(v["kind"], "tcp", "{v}");
        assert_eq!(v["listener"], "game");
        assert_eq!(v["upstream"], "app1");
        assert_eq!(v["client"], local.to_string());
        assert_eq!(v["bytes_in"], n as u64, "{v}");
        assert_eq!(v["bytes_out"], n as u64, "{v}");
        assert!(v["duration_us"].is_u64());
        assert!(v.get("method").is_none() && v.get("target").is_none() && v.get("status").is_none(), "HTTP fields only on http samples: {v}");
    }
    let r = rates(api, "listener=game");
    assert_eq!(r["samples_taken"], 2, "{r}");
    assert!(r["top_paths"].as_array().unwrap().is_empty(), "TCP samples have no path: {r}");
}
