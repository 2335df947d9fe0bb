//! Access log: the combined and JSON line formats, escaping of hostile
//! header values, error responses, standard output, reopening on SIGUSR1
//! (log rotation), flushing on graceful exit, configuration errors, and TCP
//! listeners.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use common::*;

/// How long a line may take to reach its file (written every ~100 ms).
const LOG_WAIT: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// One listener `web` (one worker) with `listener_keys`, over one upstream
/// named `app1`, then `extra` sections.
fn config(backend: SocketAddr, mode: &str, listener_keys: &str, extra: &str) -> String {
    format!(
        "[listen]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 0\nmode = \"{mode}\"\nworkers = 1\n{listener_keys}\n\n\
         [[upstreams]]\nname = \"app1\"\naddress = \"{}\"\nport = {}\n\n{extra}",
        backend.ip(),
        backend.port()
    )
}

/// An HTTP listener logging to `path` in `format`.
fn log_config(backend: SocketAddr, path: &Path, format: &str) -> String {
    config(backend, "http", &format!("access_log = \"{}\"\naccess_log_format = \"{format}\"\n", path.display()), "")
}

/// The complete lines of `path` so far (none if it does not exist yet).
fn lines_of(path: &Path) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8(text).expect("the access log is UTF-8 (hostile bytes are escaped)");
    // Only newline-terminated lines count: a line being written is not done.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete.lines().map(str::to_string).collect()
}

/// Waits until `path` holds at least `n` lines and returns them.
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let ok = wait_until(LOG_WAIT, || lines_of(path).len() >= n);
    let lines = lines_of(path);
    assert!(ok, "expected {n} line(s) in {}, got {}: {lines:#?}", path.display(), lines.len());
    lines
}

/// Sends `raw` on a fresh connection, reads until Atlas closes it, and
/// returns every byte received (so `raw` should ask for `Connection: close`).
fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut c = Client::connect(addr);
    c.send(raw);
    let got = c.read_to_close();
    assert!(!got.is_empty(), "no response to {}", show(raw));
    got
}

fn status_of(resp: &[u8]) -> u16 {
    std::str::from_utf8(&resp[..resp.len().min(12)]).ok().and_then(|s| s.get(9..12)).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// `21/Nov/2026:10:00:05 +0000` and `2026-11-21T10:00:05` for `t`, built
/// from the harness' own IMF-fixdate formatter.
fn stamps(t: SystemTime) -> (String, String) {
    let h = http_date(t); // "Sun, 06 Nov 1994 08:49:37 GMT"
    let (day, mon, year, hms) = (&h[5..7], &h[8..11], &h[12..16], &h[17..25]);
    const MON: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let m = MON.iter().position(|x| *x == mon).unwrap() + 1;
    (format!("{day}/{mon}/{year}:{hms} +0000"), format!("{year}-{m:02}-{day}T{hms}"))
}

/// Both stamps for every second of the last `back` seconds (and the next).
fn recent_stamps(back: u64) -> Vec<(String, String)> {
    let now = SystemTime::now();
    (0..=back + 1).map(|i| stamps(now + Duration::from_secs(1) - Duration::from_secs(i))).collect()
}

/// A combined-format line, split into its fields.
#[derive(Debug)]
struct Combined {
    client: String,
    time: String,
    request: String,
    status: u16,
    bytes: u64,
    referer: String,
    user_agent: String,
    duration: String,
    listener: String,
    upstream: String,
}

/// Parses `ip - - [time] "request" status bytes "referer" "agent" secs listener upstream`.
/// Quoted fields cannot contain `"` (it is escaped), so splitting on it is exact.
fn parse_combined(line: &str) -> Combined {
    let parts: Vec<&str> = line.split('"').collect();
    assert_eq!(parts.len(), 7, "a combined line has exactly three quoted fields: {line:?}");
    let (client, rest) = parts[0].split_once(" - - [").unwrap_or_else(|| panic!("no ` - - [` in {line:?}"));
    let time = rest.strip_suffix("] ").unwrap_or_else(|| panic!("no `] ` after the time in {line:?}"));
    let mid: Vec<&str> = parts[2].split(' ').collect();
    assert!(mid.len() == 4 && mid[0].is_empty() && mid[3].is_empty(), "bad status/bytes part {:?} in {line:?}", parts[2]);
    assert_eq!(parts[4], " ", "referer and agent are separated by one space: {line:?}");
    let tail: Vec<&str> = parts[6].split(' ').collect();
    assert!(tail.len() == 4 && tail[0].is_empty(), "bad tail {:?} in {line:?}", parts[6]);
    Combined {
        client: client.to_string(),
        time: time.to_string(),
        request: parts[1].to_string(),
        status: mid[1].parse().unwrap_or_else(|_| panic!("status in {line:?}")),
        bytes: mid[2].parse().unwrap_or_else(|_| panic!("bytes in {line:?}")),
        referer: parts[3].to_string(),
        user_agent: parts[5].to_string(),
        duration: tail[1].to_string(),
        listener: tail[2].to_string(),
        upstream: tail[3].to_string(),
    }
}

/// `secs.micros` with exactly six decimals.
fn assert_duration_format(d: &str) {
    let (s, us) = d.split_once('.').unwrap_or_else(|| panic!("duration {d:?} has no decimal point"));
    assert!(!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()), "duration {d:?}");
    assert!(us.len() == 6 && us.bytes().all(|b| b.is_ascii_digit()), "duration {d:?} must have 6 decimals");
    assert!(s.parse::<u64>().unwrap() < 10, "a local request takes well under 10 s: {d:?}");
}

fn json_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    wait_lines(path, n).iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"))).collect()
}

// ---------------------------------------------------------------------------
// Formats
// ---------------------------------------------------------------------------

#[test]
fn combined_line_has_request_status_bytes_referer_agent_duration_listener_and_upstream() {
    let backend = Backend::http(|r| Reply::ok(format!("hello from {}", r.target)));
    let dir = TempDir::new();
    let log = dir.join("access.log");
    let atlas = Atlas::start(&log_config(backend.addr, &log, "combined"));

    let r1 = exchange(
        atlas.addr(),
        b"GET /a?b=1 HTTP/1.1\r\nHost: atlas.test\r\nUser-Agent: curl/8.0\r\nReferer: http://ref.example/page\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&r1), 200, "{}", show(&r1));
    let lines = wait_lines(&log, 1);
    // The second request carries neither Referer nor User-Agent.
    let r2 = exchange(atlas.addr(), b"GET /second HTTP/1.1\r\nHost: atlas.test\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&r2), 200);
    let lines2 = wait_lines(&log, 2);
    assert_eq!(lines2.len(), 2, "one line per request: {lines2:#?}");
    assert_eq!(lines2[0], lines[0], "a written line does not change");

    let a = parse_combined(&lines2[0]);
    assert_eq!(a.client, "127.0.0.1", "{a:?}");
    assert!(recent_stamps(10).iter().any(|(clf, _)| *clf == a.time), "time {:?} is not a recent `dd/Mon/yyyy:HH:MM:SS +0000` stamp", a.time);
    assert_eq!(a.request, "GET /a?b=1 HTTP/1.1", "the target keeps its query string");
    assert_eq!(a.status, 200);
    assert_eq!(a.bytes, r1.len() as u64, "bytes = the whole response the client received (head and body): {}", show(&r1));
    assert_eq!(a.referer, "http://ref.example/page");
    assert_eq!(a.user_agent, "curl/8.0");
    assert_duration_format(&a.duration);
    assert_eq!(a.listener, "web");
    assert_eq!(a.upstream, "app1");
    assert!(lines2[0].starts_with("127.0.0.1 - - ["), "{:?}", lines2[0]);

    let b = parse_combined(&lines2[1]);
    assert_eq!(b.request, "GET /second HTTP/1.1");
    assert_eq!(b.bytes, r2.len() as u64);
    assert_eq!(b.referer, "-", "no Referer is logged as -");
    assert_eq!(b.user_agent, "-", "no User-Agent is logged as -");
    assert_eq!((b.listener.as_str(), b.upstream.as_str()), ("web", "app1"));

    // HTTP/1.0 is logged as such.
    let r3 = exchange(atlas.addr(), b"GET /old HTTP/1.0\r\nHost: atlas.test\r\n\r\n");
    assert_eq!(status_of(&r3), 200, "{}", show(&r3));
    let lines3 = wait_lines(&log, 3);
    let c = parse_combined(&lines3[2]);
    assert_eq!(c.request, "GET /old HTTP/1.0");
    assert_eq!(c.bytes, r3.len() as u64);
}

#[test]
fn json_lines_carry_every_field() {
    let backend =
        Backend::http(|r| if r.method == "POST" { Reply::status(201, "Created", format!("stored {} bytes", r.body.len())) } else { Reply::ok("plain") });
    let dir = TempDir::new();
    let log = dir.join("access.json");
    let atlas = Atlas::start(&log_config(backend.addr, &log, "json"));

    let req = b"POST /items?id=7 HTTP/1.1\r\nHost: atlas.test\r\nUser-Agent: tester/1.0\r\nReferer: https://r.example/\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world";
    let resp = exchange(atlas.addr(), req);
    assert_eq!(status_of(&resp), 201, "{}", show(&resp));
    let req2 = b"GET /plain HTTP/1.1\r\nHost: atlas.test\r\nConnection: close\r\n\r\n";
    let resp2 = exchange(atlas.addr(), req2);
    let v = json_lines(&log, 2);
    assert_eq!(v.len(), 2, "{v:#?}");

    let keys =
        ["time", "listener", "client", "method", "target", "protocol", "status", "bytes_in", "bytes_out", "duration_us", "upstream", "referer", "user_agent"];
    for line in &v {
        let obj = line.as_object().unwrap_or_else(|| panic!("not an object: {line}"));
        for k in keys {
            assert!(obj.contains_key(k), "key {k} missing in {line}");
        }
    }
    let j = &v[0];
    let time = j["time"].as_str().unwrap();
    // 2026-11-21T10:00:05.042Z
    assert_eq!(time.len(), 24, "ISO 8601 with milliseconds: {time}");
    assert!(time.ends_with('Z') && &time[19..20] == "." && time[20..23].bytes().all(|b| b.is_ascii_digit()), "{time}");
    assert!(recent_stamps(10).iter().any(|(_, iso)| *iso == time[..19]), "time {time} is not a recent UTC stamp");
    assert_eq!(j["listener"], "web");
    assert_eq!(j["client"], "127.0.0.1");
    assert_eq!(j["method"], "POST");
    assert_eq!(j["target"], "/items?id=7");
    assert_eq!(j["protocol"], "HTTP/1.1");
    assert_eq!(j["status"], 201);
    assert_eq!(j["bytes_in"], req.len() as u64, "bytes_in = the whole request (head and body)");
    assert_eq!(j["bytes_out"], resp.len() as u64, "bytes_out = the whole response: {}", show(&resp));
    assert!(j["duration_us"].is_u64(), "{j}");
    assert!(j["duration_us"].as_u64().unwrap() < 10_000_000, "{j}");
    assert_eq!(j["upstream"], "app1");
    assert_eq!(j["referer"], "https://r.example/");
    assert_eq!(j["user_agent"], "tester/1.0");

    let k = &v[1];
    assert_eq!(k["method"], "GET");
    assert_eq!(k["target"], "/plain");
    assert_eq!(k["status"], 200);
    assert_eq!(k["bytes_in"], req2.len() as u64);
    assert_eq!(k["bytes_out"], resp2.len() as u64);
    assert!(k["referer"].is_string() && k["user_agent"].is_string(), "absent headers are still strings: {k}");
    assert_eq!(k["referer"].as_str().unwrap().trim_matches('-'), "", "{k}");
}

#[test]
fn pipelined_requests_each_log_their_own_bytes() {
    let backend = Backend::echo_path();
    let dir = TempDir::new();
    let log = dir.join("pipelined.json");
    let atlas = Atlas::start(&log_config(backend.addr, &log, "json"));
    let mut c = Client::connect(atlas.addr());
    // Three requests in one write: Atlas reads them together.
    let reqs: Vec<String> = ["/p/first", "/p/second-one", "/p/third-request"].iter().map(|t| get_req(t)).collect();
    c.send(reqs.concat());
    let resps: Vec<Response> = (0..3).map(|_| c.read_response()).collect();
    for (r, t) in resps.iter().zip(["/p/first", "/p/second-one", "/p/third-request"]) {
        assert_eq!((r.status, r.text()), (200, t.to_string()));
    }
    let v = json_lines(&log, 3);
    let got: Vec<(String, u64, u64)> =
        v.iter().map(|j| (j["target"].as_str().unwrap().to_string(), j["bytes_in"].as_u64().unwrap(), j["bytes_out"].as_u64().unwrap())).collect();
    let want: Vec<(String, u64, u64)> = reqs
        .iter()
        .zip(&resps)
        .zip(["/p/first", "/p/second-one", "/p/third-request"])
        .map(|((q, r), t)| (t.to_string(), q.len() as u64, (r.head.len() + 4 + r.body.len()) as u64))
        .collect();
    assert_eq!(got, want, "(target, bytes_in, bytes_out) per line: each request's own bytes");
}

#[test]
fn hostile_user_agent_is_escaped_so_each_request_is_exactly_one_line() {
    let backend = Backend::fixed("ok");
    let dir = TempDir::new();
    let log = dir.join("access.log");
    let atlas = Atlas::start(&log_config(backend.addr, &log, "combined"));

    // A quote to close the field early and forge the rest of a line, a
    // backslash, a tab and a non-ASCII byte.
    let req =
        b"GET /inject HTTP/1.1\r\nHost: atlas.test\r\nUser-Agent: evil\" 200 1 \"-\" \"forged\\agent\tx\xE9y\r\nReferer: a\"b\r\nConnection: close\r\n\r\n"
            .to_vec();
    let resp = exchange(atlas.addr(), &req);
    assert_eq!(status_of(&resp), 200, "{}", show(&resp));
    let resp2 = exchange(atlas.addr(), b"GET /after HTTP/1.1\r\nHost: atlas.test\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&resp2), 200);

    let lines = wait_lines(&log, 2);
    assert_eq!(lines.len(), 2, "two requests, two lines: {lines:#?}");
    let a = parse_combined(&lines[0]);
    assert_eq!(a.request, "GET /inject HTTP/1.1");
    assert_eq!(a.status, 200);
    assert!(
        a.user_agent.starts_with("evil\\x22 200 1 \\x22-\\x22 \\x22forged\\x5Cagent\\x09x"),
        "quote, backslash and tab are \\xHH-escaped: {:?}",
        a.user_agent
    );
    assert!(a.user_agent.ends_with('y'), "{:?}", a.user_agent);
    assert!(a.user_agent.bytes().all(|b| (0x20..0x7f).contains(&b)), "only printable ASCII in the field: {:?}", a.user_agent);
    assert_eq!(a.referer, "a\\x22b");
    assert_eq!((a.listener.as_str(), a.upstream.as_str()), ("web", "app1"), "the forged fields did not shift the real ones");
    assert_eq!(parse_combined(&lines[1]).request, "GET /after HTTP/1.1");
}

// ---------------------------------------------------------------------------
// Error responses
// ---------------------------------------------------------------------------

#[test]
fn error_responses_are_logged_too() {
    let dir = TempDir::new();
    let log = dir.join("errors.log");
    let atlas = Atlas::start(&log_config(refused_addr(), &log, "combined"));

    // The only upstream refuses connections.
    let r1 = exchange(atlas.addr(), b"GET /down HTTP/1.1\r\nHost: atlas.test\r\nUser-Agent: probe\r\nConnection: close\r\n\r\n");
    let s1 = status_of(&r1);
    assert_eq!(s1, 502, "a refused upstream is a 502: {}", show(&r1));
    let lines = wait_lines(&log, 1);
    let a = parse_combined(&lines[0]);
    assert_eq!(a.request, "GET /down HTTP/1.1");
    assert_eq!(a.status, s1);
    assert_eq!(a.bytes, r1.len() as u64, "{}", show(&r1));
    assert_eq!(a.user_agent, "probe");
    assert_eq!(a.listener, "web");
    assert!(a.upstream == "-" || a.upstream == "app1", "{a:?}");

    // A request head that does not parse: Atlas answers 400 and cannot
    // name a method or target.
    let r2 = exchange(atlas.addr(), b"THIS IS NOT HTTP\r\n\r\n");
    assert_eq!(status_of(&r2), 400, "{}", show(&r2));
    let lines = wait_lines(&log, 2);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let b = parse_combined(&lines[1]);
    assert_eq!(b.request, "-", "an unparsed request is logged as \"-\": {:?}", lines[1]);
    assert_eq!(b.status, 400);
    assert_eq!(b.bytes, r2.len() as u64);
    assert_eq!((b.referer.as_str(), b.user_agent.as_str()), ("-", "-"));
    assert_eq!(b.upstream, "-", "no upstream was involved");
    assert_eq!(b.client, "127.0.0.1");
}

#[test]
fn written_and_dropped_lines_are_counted_in_metrics() {
    let backend = Backend::fixed("m");
    let dir = TempDir::new();
    let log = dir.join("metrics.log");
    let cfg = config(backend.addr, "http", &format!("access_log = \"{}\"\n", log.display()), "[api]\naddress = \"127.0.0.1:0\"\n");
    let atlas = Atlas::start(&cfg);
    let api = atlas.api.expect("api address");
    let mut c = Client::connect(atlas.addr());
    for i in 0..7 {
        assert_eq!(c.get(&format!("/m/{i}")).status, 200);
    }
    wait_lines(&log, 7);
    let metric = |name: &str| -> Option<u64> {
        let mut s = TcpStream::connect(api).unwrap();
        set_timeouts(&s, IO_TIMEOUT);
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
    };
    let mut lines = None;
    let ok = wait_until(Duration::from_secs(3), || {
        lines = metric("atlas_access_log_lines_total");
        lines == Some(7)
    });
    assert!(ok, "atlas_access_log_lines_total counts the 7 lines written: {lines:?}");
    assert_eq!(metric("atlas_access_log_dropped_total"), Some(0));
}

// ---------------------------------------------------------------------------
// Standard output
// ---------------------------------------------------------------------------

/// An Atlas whose stdout (and stderr) the test reads; the harness sends
/// stdout to /dev/null, so this one is spawned here.
struct StdoutAtlas {
    child: Child,
    addr: SocketAddr,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    paths: Vec<PathBuf>,
}

impl StdoutAtlas {
    fn start(config: &str) -> StdoutAtlas {
        let cfg = write_config(config);
        let sock = temp_path("sock");
        let mut child = Command::new(BIN)
            .arg(&cfg)
            .arg("--takeover-socket")
            .arg(&sock)
            .env("ATLAS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn atlas");
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let o = stdout.clone();
        thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                o.lock().unwrap().push(l);
            }
        });
        let e = stderr.clone();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                e.lock().unwrap().push(l.clone());
                let _ = tx.send(l);
            }
        });
        let mut me = StdoutAtlas { child, addr: "0.0.0.0:0".parse().unwrap(), stdout, stderr, paths: vec![cfg, sock] };
        loop {
            let line = rx.recv_timeout(STARTUP_TIMEOUT).unwrap_or_else(|_| panic!("atlas did not start; stderr: {:#?}", me.stderr.lock().unwrap()));
            if line.contains("listening") && line.contains(" name=") {
                let i = line.find(" addr=").expect("addr field") + 6;
                me.addr = line[i..].split_whitespace().next().unwrap().trim_matches('"').parse().expect("listener address");
                return me;
            }
        }
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }
}

impl Drop for StdoutAtlas {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
        if thread::panicking() {
            eprintln!("----- atlas stderr -----\n{}\n-----", self.stderr.lock().unwrap().join("\n"));
        }
    }
}

#[test]
fn stdout_access_log_writes_lines_to_standard_output() {
    let backend = Backend::fixed("out");
    let atlas = StdoutAtlas::start(&config(backend.addr, "http", "access_log = \"stdout\"\n", ""));
    let mut sent = Vec::new();
    for i in 0..3 {
        let r = exchange(atlas.addr, format!("GET /out/{i} HTTP/1.1\r\nHost: atlas.test\r\nUser-Agent: ua{i}\r\nConnection: close\r\n\r\n").as_bytes());
        assert_eq!(status_of(&r), 200);
        sent.push(r);
    }
    let ok = wait_until(LOG_WAIT, || atlas.stdout().len() >= 3);
    let out = atlas.stdout();
    assert!(ok, "3 access log lines on stdout, got {out:#?}");
    thread::sleep(Duration::from_millis(300));
    let out = atlas.stdout();
    assert_eq!(out.len(), 3, "stdout carries the access log lines only: {out:#?}");
    for (i, line) in out.iter().enumerate() {
        let c = parse_combined(line);
        assert_eq!(c.request, format!("GET /out/{i} HTTP/1.1"));
        assert_eq!(c.status, 200);
        assert_eq!(c.bytes, sent[i].len() as u64);
        assert_eq!(c.user_agent, format!("ua{i}"));
        assert_eq!((c.listener.as_str(), c.upstream.as_str()), ("web", "app1"));
    }
}

// ---------------------------------------------------------------------------
// Rotation and exit
// ---------------------------------------------------------------------------

/// Paths (request targets) of the combined lines of `path`.
fn targets_in(path: &Path) -> Vec<String> {
    lines_of(path).iter().map(|l| parse_combined(l).request.split(' ').nth(1).unwrap_or("").to_string()).collect()
}

#[test]
fn sigusr1_reopens_the_log_after_rotation_without_losing_lines() {
    let backend = Backend::fixed("r");
    let dir = TempDir::new();
    let log = dir.join("access.log");
    let rotated = dir.join("access.log.1");
    let atlas = Atlas::start(&log_config(backend.addr, &log, "combined"));
    let mut c = Client::connect(atlas.addr());

    for i in 0..5 {
        assert_eq!(c.get(&format!("/before/{i}")).status, 200);
    }
    wait_lines(&log, 5);
    std::fs::rename(&log, &rotated).unwrap();
    // Until the signal these may still go to the renamed file (or, if still
    // buffered, to the new one): only their total is checked.
    for i in 0..3 {
        assert_eq!(c.get(&format!("/between/{i}")).status, 200);
    }
    atlas.signal("USR1");
    assert!(atlas.wait_log("access log reopened", 1, Duration::from_secs(5)), "Atlas logs the reopen");
    assert!(log.exists(), "the reopen creates a new file at the original path");
    for i in 0..4 {
        assert_eq!(c.get(&format!("/after/{i}")).status, 200);
    }
    let total = 12;
    let ok = wait_until(LOG_WAIT, || lines_of(&log).len() + lines_of(&rotated).len() >= total);
    thread::sleep(Duration::from_millis(300)); // no extra (duplicated) line comes later
    let (new, old) = (targets_in(&log), targets_in(&rotated));
    assert!(ok, "12 requests, lines: new {new:?}, rotated {old:?}");
    assert_eq!(new.len() + old.len(), total, "no line lost or duplicated: new {new:?}, rotated {old:?}");
    for i in 0..5 {
        assert!(old.contains(&format!("/before/{i}")), "lines written before the rename stay in the rotated file: {old:?}");
    }
    for i in 0..4 {
        let t = format!("/after/{i}");
        assert!(new.contains(&t), "{t} goes to the new file after the reopen: new {new:?}, rotated {old:?}");
        assert!(!old.contains(&t), "{t} must not go to the rotated file after the reopen: {old:?}");
    }
    for i in 0..3 {
        let t = format!("/between/{i}");
        assert_eq!(new.iter().chain(&old).filter(|x| **x == t).count(), 1, "{t} is logged exactly once: new {new:?}, rotated {old:?}");
    }
}

#[test]
fn buffered_lines_are_written_before_a_graceful_exit() {
    let backend = Backend::fixed("bye");
    let dir = TempDir::new();
    let log = dir.join("exit.log");
    let mut atlas = Atlas::start(&log_config(backend.addr, &log, "json"));
    let n_keepalive = 20;
    let mut c = Client::connect(atlas.addr());
    for i in 0..n_keepalive {
        assert_eq!(c.get(&format!("/k/{i}")).status, 200);
    }
    let n_oneshot = 5;
    for i in 0..n_oneshot {
        let r = exchange(atlas.addr(), format!("GET /o/{i} HTTP/1.1\r\nHost: atlas.test\r\nConnection: close\r\n\r\n").as_bytes());
        assert_eq!(status_of(&r), 200);
    }
    // At once: most lines are still in the worker's buffer.
    atlas.signal("TERM");
    let st = atlas.wait_exit(Duration::from_secs(15));
    assert!(st.is_some(), "Atlas exits after SIGTERM (the idle keep-alive connection is closed by the drain)");
    drop(c);
    assert!(st.unwrap().success(), "a graceful exit: {st:?}");
    let lines = lines_of(&log);
    assert_eq!(lines.len(), n_keepalive + n_oneshot, "every request is in the log once Atlas has exited: {lines:#?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
        assert_eq!(v["status"], 200, "{l}");
    }
}

// ---------------------------------------------------------------------------
// Configuration errors
// ---------------------------------------------------------------------------

/// `atlas --check` on `text`: (exit code, stderr).
fn check(text: &str) -> (Option<i32>, String, PathBuf) {
    let path = write_config(text);
    let (code, _out, err) = run_cli(&["--check", path.to_str().unwrap()], &[]);
    (code, err, path)
}

/// 1-based number of the line of `text` that contains `needle`.
fn line_no(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect("needle in config") + 1
}

#[test]
fn access_log_in_a_missing_directory_is_a_config_error_naming_the_key_and_line() {
    let text = config(refused_addr(), "http", "access_log = \"/nonexistent-dir-atlas-test/x.log\"\n", "");
    let (code, err, path) = check(&text);
    assert_ne!(code, Some(0), "{err}");
    let line = line_no(&text, "access_log =");
    assert!(err.contains(&format!("{}:{line}:", path.display())), "the error names the file and line {line}: {err}");
    assert!(err.contains("listen.access_log"), "the error names the key: {err}");
    assert!(err.contains("/nonexistent-dir-atlas-test"), "the error names the directory: {err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn access_log_that_is_a_directory_is_a_config_error() {
    let dir = TempDir::new();
    let text = config(refused_addr(), "http", &format!("access_log = \"{}\"\n", dir.path().display()), "");
    let (code, err, path) = check(&text);
    assert_ne!(code, Some(0), "{err}");
    let line = line_no(&text, "access_log =");
    assert!(err.contains(&format!("{}:{line}:", path.display())) && err.contains("listen.access_log"), "{err}");
    assert!(err.contains("is a directory"), "{err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn access_log_file_that_cannot_be_created_is_a_config_error() {
    // /proc exists, but no file can be created in it (not even by root).
    let text = config(refused_addr(), "http", "access_log = \"/proc/atlas-test-access.log\"\n", "");
    let (code, err, path) = check(&text);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("/proc/atlas-test-access.log") && err.contains("access log"), "the error names the file: {err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn unknown_access_log_format_is_a_config_error_naming_the_key() {
    let dir = TempDir::new();
    let text = config(refused_addr(), "http", &format!("access_log = \"{}\"\naccess_log_format = \"xml\"\n", dir.join("x.log").display()), "");
    let (code, err, path) = check(&text);
    assert_ne!(code, Some(0), "{err}");
    let line = line_no(&text, "access_log_format");
    assert!(err.contains("listen.access_log_format") && err.contains(&format!(":{line}:")), "{err}");
    assert!(err.contains("xml"), "{err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn valid_access_log_config_passes_check() {
    let dir = TempDir::new();
    for fmt in ["combined", "json"] {
        let text = config(refused_addr(), "http", &format!("access_log = \"{}\"\naccess_log_format = \"{fmt}\"\n", dir.join("ok.log").display()), "");
        let (code, err, path) = check(&text);
        assert_eq!(code, Some(0), "{fmt}: {err}");
        let _ = std::fs::remove_file(path);
    }
}

// ---------------------------------------------------------------------------
// TCP listeners
// ---------------------------------------------------------------------------

#[test]
fn tcp_connections_are_logged_once_each_with_protocol_tcp_and_byte_counts() {
    let backend = Backend::raw(echo);
    let dir = TempDir::new();
    let log = dir.join("tcp.json");
    let keys = format!("access_log = \"{}\"\naccess_log_format = \"json\"\n", log.display());
    let atlas = Atlas::start(&config(backend.addr, "tcp", &keys, ""));

    let sizes = [1000usize, 70_000];
    for (i, &n) in sizes.iter().enumerate() {
        let data = pattern(n, i as u64 + 1);
        let mut s = TcpStream::connect(atlas.addr()).unwrap();
        set_timeouts(&s, IO_TIMEOUT);
        let writer = {
            let mut w = s.try_clone().unwrap();
            let data = data.clone();
            thread::spawn(move || {
                w.write_all(&data).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            })
        };
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back.len(), n, "echoed");
        assert!(back == data, "echoed bytes differ");
    }
    let v = json_lines(&log, sizes.len());
    thread::sleep(Duration::from_millis(300));
    assert_eq!(lines_of(&log).len(), sizes.len(), "one line per connection: {:#?}", lines_of(&log));
    for (j, &n) in v.iter().zip(&sizes) {
        assert_eq!(j["protocol"], "TCP", "{j}");
        assert_eq!(j["status"], 0, "{j}");
        assert_eq!(j["upstream"], "app1", "{j}");
        assert_eq!(j["listener"], "web", "{j}");
        assert_eq!(j["client"], "127.0.0.1", "{j}");
        assert_eq!(j["bytes_in"], n as u64, "bytes from the client: {j}");
        assert_eq!(j["bytes_out"], n as u64, "bytes to the client: {j}");
        assert_eq!(j["method"], "", "{j}");
        assert!(j["duration_us"].is_u64(), "{j}");
    }
}

#[test]
fn tcp_connections_in_combined_format_show_no_request_line() {
    let backend = Backend::raw(echo);
    let dir = TempDir::new();
    let log = dir.join("tcp.log");
    let atlas = Atlas::start(&config(backend.addr, "tcp", &format!("access_log = \"{}\"\n", log.display()), ""));
    let mut s = TcpStream::connect(atlas.addr()).unwrap();
    set_timeouts(&s, IO_TIMEOUT);
    s.write_all(b"ping").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"ping");
    let lines = wait_lines(&log, 1);
    let c = parse_combined(&lines[0]);
    assert_eq!(c.request, "-", "{:?}", lines[0]);
    assert_eq!((c.status, c.bytes), (0, 4), "{:?}", lines[0]);
    assert_eq!((c.listener.as_str(), c.upstream.as_str()), ("web", "app1"));
}
