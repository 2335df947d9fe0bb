//! Upstream health: active checks (`[health] check = "tcp" | "http"`) with
//! rise/fall thresholds on the checker thread, and passive ejection
//! (`max_fails`, `fail_timeout`) per worker. Backends answer `/health`
//! according to a shared [`Probe`] and every other path with their name, so
//! the tests can tell where each request went and what each check saw.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How one backend answers its health checks, and what it answered so far.
#[derive(Default)]
struct Probe {
    /// Every check fails (500).
    fail: AtomicBool,
    /// Every other check fails (the 2nd, 4th, ...).
    alternate: AtomicBool,
    /// Status of a good answer; 0 means 200.
    ok_status: AtomicUsize,
    checks: AtomicUsize,
    good: AtomicUsize,
    bad: AtomicUsize,
}

impl Probe {
    fn new() -> Arc<Probe> {
        Arc::new(Probe::default())
    }
    fn failing() -> Arc<Probe> {
        let p = Probe::new();
        p.fail.store(true, Ordering::SeqCst);
        p
    }
    fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }
    fn good(&self) -> usize {
        self.good.load(Ordering::SeqCst)
    }
    fn bad(&self) -> usize {
        self.bad.load(Ordering::SeqCst)
    }
    fn set_fail(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    fn answer(&self, r: &Request, name: &str) -> Reply {
        if r.target != "/health" {
            return Reply::ok(name);
        }
        let n = self.checks.fetch_add(1, Ordering::SeqCst);
        let fail = self.fail.load(Ordering::SeqCst) || (self.alternate.load(Ordering::SeqCst) && n % 2 == 1);
        if fail {
            self.bad.fetch_add(1, Ordering::SeqCst);
            return Reply::status(500, "Internal Server Error", "sick");
        }
        self.good.fetch_add(1, Ordering::SeqCst);
        match self.ok_status.load(Ordering::SeqCst) {
            0 | 200 => Reply::ok("healthy"),
            204 => Reply::raw("HTTP/1.1 204 No Content\r\n\r\n"),
            s => Reply::status(s as u16, "Whatever", "healthy"),
        }
    }
}

/// A backend answering `/health` through `probe` and anything else with `name`.
fn backend(name: &str, probe: &Arc<Probe>) -> Backend {
    let (name, probe) = (name.to_string(), probe.clone());
    Backend::http(move |r| probe.answer(r, &name))
}

/// Same, killable ([`Backend::kill`]).
fn backend_tracked(name: &str, probe: &Arc<Probe>) -> Backend {
    let (name, probe) = (name.to_string(), probe.clone());
    Backend::http_tracked(move |r| probe.answer(r, &name))
}

/// Same, on a given address (the port of a killed backend).
fn backend_at(addr: SocketAddr, name: &str, probe: &Arc<Probe>) -> Backend {
    let (name, probe) = (name.to_string(), probe.clone());
    Backend::http_at(addr, move |r| probe.answer(r, &name))
}

/// Proxied requests (not health checks) a backend received.
fn hits(b: &Backend) -> usize {
    b.requests().iter().filter(|r| r.target != "/health").count()
}

/// Round robin plus a `[health]` table with `lines`.
fn health(lines: &str) -> String {
    format!("[routing]\nstrategy = \"round_robin\"\n\n[health]\n{lines}\n")
}

/// `n` GETs of `/` on one keep-alive connection: (status, body) each.
fn get_n(atlas: &Atlas, n: usize) -> Vec<(u16, String)> {
    let mut c = Client::connect(atlas.addr());
    (0..n).map(|_| c.get("/")).map(|r| (r.status, r.text())).collect()
}

fn count_body(rs: &[(u16, String)], body: &str) -> usize {
    rs.iter().filter(|(_, b)| b == body).count()
}

/// The stderr lines containing `needle`.
fn lines_with(atlas: &Atlas, needle: &str) -> Vec<String> {
    atlas.log_lines().into_iter().filter(|l| l.contains(needle)).collect()
}

const DOWN: &str = "upstream DOWN after";
const UP: &str = "upstream UP after";
const EJECTED: &str = "upstream ejected after consecutive failures";

#[test]
fn active_http_check_marks_down_and_traffic_avoids_it() {
    let (pa, pb) = (Probe::new(), Probe::new());
    let (a, b) = (backend("A", &pa), backend("B", &pb));
    let cfg = http_config(&[a.addr, b.addr], &health("check = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 3\nrise = 2\n"));
    let atlas = Atlas::start(&cfg);
    assert!(wait_until(Duration::from_secs(3), || pa.checks() >= 2 && pb.checks() >= 2), "health checks did not start: A {} B {}", pa.checks(), pb.checks());
    let hc = b.requests().into_iter().find(|r| r.target == "/health").expect("a health check request");
    assert_eq!(hc.method, "GET", "health check request: {}", hc.head);

    let rs = get_n(&atlas, 10);
    assert!(rs.iter().all(|(s, _)| *s == 200), "{rs:?}");
    assert!(count_body(&rs, "A") >= 3 && count_body(&rs, "B") >= 3, "both upstreams serve while healthy: {rs:?}");

    // B's checks start failing.
    let t0 = Instant::now();
    pb.set_fail(true);
    assert!(atlas.wait_log(DOWN, 1, Duration::from_secs(3)), "B was not marked DOWN within 3 s of failing checks (B answered {} failing checks)", pb.bad());
    let took = t0.elapsed();
    let bad_at_down = pb.bad();
    assert!(bad_at_down >= 3, "DOWN after only {bad_at_down} failed checks, fall = 3");
    assert!(took >= Duration::from_millis(180), "DOWN after {took:?}: fall = 3 at interval 100ms needs >= 200ms");
    let down = lines_with(&atlas, DOWN);
    assert!(down[0].contains("upstream=u1") && !down[0].contains("upstream=u0"), "DOWN line names B (u1): {down:?}");
    eprintln!("B marked DOWN {took:?} after its checks started failing ({bad_at_down} failed checks)");

    let b_before = hits(&b);
    let rs = get_n(&atlas, 40);
    assert!(rs.iter().all(|(s, body)| *s == 200 && body == "A"), "with B DOWN every request goes to A: {rs:?}");
    assert_eq!(hits(&b), b_before, "B received proxied requests while DOWN");

    // The checks keep failing, but DOWN is logged once.
    assert!(wait_until(Duration::from_secs(2), || pb.bad() >= bad_at_down + 4), "checks of a DOWN upstream stopped");
    assert_eq!(atlas.count_log(DOWN), 1, "DOWN logged more than once: {:?}", lines_with(&atlas, DOWN));
    assert_eq!(atlas.count_log(UP), 0, "no UP while B keeps failing: {:?}", lines_with(&atlas, UP));

    // B recovers.
    let good_before = pb.good();
    let t1 = Instant::now();
    pb.set_fail(false);
    assert!(atlas.wait_log(UP, 1, Duration::from_secs(3)), "B did not come back UP within 3 s of passing checks");
    let took = t1.elapsed();
    let good = pb.good() - good_before;
    assert!(good >= 2, "UP after only {good} good checks, rise = 2");
    assert!(took >= Duration::from_millis(80), "UP after {took:?}: rise = 2 at interval 100ms needs >= 100ms");
    let up = lines_with(&atlas, UP);
    assert!(up[0].contains("upstream=u1"), "UP line names B (u1): {up:?}");
    eprintln!("B marked UP {took:?} after its checks passed again ({good} good checks)");

    let rs = get_n(&atlas, 20);
    assert!(rs.iter().all(|(s, _)| *s == 200), "{rs:?}");
    assert!(count_body(&rs, "A") >= 5 && count_body(&rs, "B") >= 5, "traffic goes to both again: {rs:?}");
    assert_eq!(atlas.count_log(DOWN), 1, "{:?}", lines_with(&atlas, DOWN));
    assert_eq!(atlas.count_log(UP), 1, "{:?}", lines_with(&atlas, UP));
}

#[test]
fn rise_and_fall_thresholds_prevent_flapping() {
    let (pa, pb) = (Probe::new(), Probe::new());
    pb.alternate.store(true, Ordering::SeqCst);
    let (a, b) = (backend("A", &pa), backend("B", &pb));
    let cfg = http_config(&[a.addr, b.addr], &health("check = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 3\nrise = 2\n"));
    let atlas = Atlas::start(&cfg);
    // ~1.4 s of checks, every other one failing.
    assert!(wait_until(Duration::from_secs(5), || pb.checks() >= 14), "only {} checks of B in 5 s", pb.checks());
    assert!(pb.bad() >= 6, "B failed only {} checks", pb.bad());
    assert_eq!(atlas.count_log(DOWN), 0, "B flapped DOWN although it never failed 2 checks in a row: {:?}", lines_with(&atlas, DOWN));
    let rs = get_n(&atlas, 10);
    assert!(rs.iter().all(|(s, _)| *s == 200), "{rs:?}");
    assert!(count_body(&rs, "B") >= 3, "B stays in rotation: {rs:?}");

    // Control: the same checker does mark B DOWN once it fails 3 in a row.
    pb.alternate.store(false, Ordering::SeqCst);
    pb.set_fail(true);
    assert!(atlas.wait_log(DOWN, 1, Duration::from_secs(3)), "B not marked DOWN after consecutive failures");
    assert_eq!(atlas.count_log(UP), 0, "{:?}", lines_with(&atlas, UP));
}

#[test]
fn tcp_check_detects_a_dead_upstream() {
    let (pa, pb) = (Probe::new(), Probe::new());
    let a = backend("A", &pa);
    let b = backend_tracked("B", &pb);
    let cfg = http_config(&[a.addr, b.addr], &health("check = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n"));
    let atlas = Atlas::start(&cfg);
    // TCP checks connect without a request: they show up as connections.
    assert!(wait_until(Duration::from_secs(3), || b.connections() >= 3), "no TCP checks reached B ({} connections)", b.connections());
    assert_eq!(pb.checks(), 0, "a tcp check sent an HTTP request");
    let rs = get_n(&atlas, 10);
    assert!(rs.iter().all(|(s, _)| *s == 200), "{rs:?}");
    assert!(count_body(&rs, "B") >= 3, "{rs:?}");

    // B's listener goes away; its (pooled) connections stay open.
    let t0 = Instant::now();
    b.stop_listening();
    assert!(atlas.wait_log(DOWN, 1, Duration::from_secs(3)), "B not marked DOWN within 3 s of its listener closing");
    let down = lines_with(&atlas, DOWN);
    assert!(down[0].contains("upstream=u1"), "{down:?}");
    eprintln!("B marked DOWN {:?} after its listener closed: {}", t0.elapsed(), down[0]);

    let b_before = hits(&b);
    let mut c = Client::connect(atlas.addr());
    for i in 0..30 {
        let r = c.try_get("/").unwrap_or_else(|e| panic!("request {i} after B was marked DOWN failed: {e}"));
        assert!(r.status == 200 && r.text() == "A", "request {i} after DOWN: {} {:?}", r.status, r.text());
    }
    assert_eq!(hits(&b), b_before, "B (DOWN) still got requests over pooled connections");
    assert_eq!(atlas.count_log(DOWN), 1, "{:?}", lines_with(&atlas, DOWN));

    // A new server on B's port: B comes back.
    b.kill();
    let pb2 = Probe::new();
    let b2 = backend_at(b.addr, "B2", &pb2);
    let t1 = Instant::now();
    assert!(atlas.wait_log(UP, 1, Duration::from_secs(3)), "B not UP within 3 s of a listener on its port again");
    assert!(lines_with(&atlas, UP)[0].contains("upstream=u1"));
    eprintln!("B marked UP {:?} after a new listener took its port", t1.elapsed());
    let rs: Vec<(u16, String)> = (0..10).map(|_| c.get("/")).map(|r| (r.status, r.text())).collect();
    assert!(rs.iter().all(|(s, _)| *s == 200), "{rs:?}");
    assert!(count_body(&rs, "B2") >= 3 && hits(&b2) >= 3, "the new B gets traffic: {rs:?}");
}

#[test]
fn all_upstreams_down_gives_503_quickly() {
    let (pa, pb) = (Probe::failing(), Probe::failing());
    let (a, b) = (backend("A", &pa), backend("B", &pb));
    let cfg = http_config(&[a.addr, b.addr], &health("check = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n"));
    let atlas = Atlas::start(&cfg);
    assert!(atlas.wait_log(DOWN, 2, Duration::from_secs(3)), "both upstreams not marked DOWN: {:?}", lines_with(&atlas, DOWN));
    let before = hits(&a) + hits(&b);

    let mut c = Client::connect(atlas.addr());
    for i in 0..2 {
        let t = Instant::now();
        let r = c.try_get("/").unwrap_or_else(|e| panic!("request {i} with every upstream DOWN: {e} after {:?}", t.elapsed()));
        let took = t.elapsed();
        assert_eq!(r.status, 503, "request {i}: {} {:?}", r.head, r.text());
        assert!(r.text().contains("no healthy upstream available"), "request {i} body: {:?}", r.text());
        assert!(took < Duration::from_secs(1), "request {i}: 503 took {took:?}");
        eprintln!("request {i}: 503 in {took:?}");
    }
    assert_eq!(hits(&a) + hits(&b), before, "a DOWN upstream got a proxied request");
}

#[test]
fn expect_status_is_configurable() {
    let (p200, p204) = (Probe::new(), Probe::new());
    p200.ok_status.store(204, Ordering::SeqCst);
    p204.ok_status.store(204, Ordering::SeqCst);
    let (b200, b204) = (backend("X", &p200), backend("Y", &p204));
    let lines = "check = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n";
    let strict = Atlas::start(&http_config(&[b200.addr], &health(&format!("{lines}expect_status = 200\n"))));
    let lenient = Atlas::start(&http_config(&[b204.addr], &health(&format!("{lines}expect_status = 204\n"))));

    assert!(strict.wait_log(DOWN, 1, Duration::from_secs(3)), "a 204 health answer with expect_status = 200 did not mark the upstream DOWN");
    eprintln!("expect_status = 200: {}", lines_with(&strict, DOWN)[0]);
    let r = http_get(strict.addr(), "/");
    assert_eq!(r.status, 503, "{} {:?}", r.head, r.text());

    assert!(wait_until(Duration::from_secs(3), || p204.checks() >= 8), "only {} checks with expect_status = 204", p204.checks());
    assert_eq!(lenient.count_log(DOWN), 0, "204 with expect_status = 204 marked DOWN: {:?}", lines_with(&lenient, DOWN));
    let r = http_get(lenient.addr(), "/");
    assert_eq!((r.status, r.text().as_str()), (200, "Y"), "{}", r.head);
}

#[test]
fn passive_ejection_after_consecutive_5xx() {
    let a = Backend::http(|r| if r.target == "/" { Reply::status(503, "Service Unavailable", "A-broken") } else { Reply::ok("A") });
    let b = Backend::fixed("B");
    let cfg = http_config(&[a.addr, b.addr], &health("check = \"none\"\nmax_fails = 2\nfail_timeout = \"1s\"\n"));
    let atlas = Atlas::start(&cfg);
    let mut c = Client::connect(atlas.addr());

    // Until A has failed twice, its 503s are relayed.
    let mut sent = Vec::new();
    for _ in 0..10 {
        let r = c.get("/");
        sent.push((r.status, r.text()));
        if hits(&a) >= 2 {
            break;
        }
    }
    let t_eject = Instant::now();
    assert_eq!(hits(&a), 2, "{sent:?}");
    assert_eq!(count_body(&sent, "A-broken"), 2, "A's 503s reach the client: {sent:?}");
    assert!(sent.iter().all(|(s, body)| (*s, body.as_str()) == (503, "A-broken") || (*s, body.as_str()) == (200, "B")), "{sent:?}");
    assert!(atlas.wait_log(EJECTED, 1, Duration::from_secs(1)), "no ejection logged after 2 consecutive 5xx from A");
    let ej = lines_with(&atlas, EJECTED);
    assert!(ej[0].contains("upstream=u0"), "{ej:?}");

    let rs: Vec<(u16, String)> = (0..10).map(|_| c.get("/")).map(|r| (r.status, r.text())).collect();
    let took = t_eject.elapsed();
    assert!(took < Duration::from_millis(900), "the ejected phase took {took:?}, longer than fail_timeout: the check below means nothing");
    assert!(rs.iter().all(|(s, body)| *s == 200 && body == "B"), "while A is ejected every request goes to B: {rs:?}");
    assert_eq!(hits(&a), 2, "A got requests while ejected");

    // After fail_timeout A is tried again.
    thread::sleep(Duration::from_millis(1200).saturating_sub(t_eject.elapsed()));
    let rs: Vec<(u16, String)> = (0..4).map(|_| c.get("/")).map(|r| (r.status, r.text())).collect();
    assert!(hits(&a) >= 3, "A was not tried again {:?} after its ejection: {rs:?}", t_eject.elapsed());
    assert!(count_body(&rs, "A-broken") >= 1, "{rs:?}");
}

#[test]
fn passive_ejection_of_refusing_upstream_and_fail_open() {
    // A refusing upstream next to a good one: connect errors are retried on
    // the good one, and the refusing one is ejected.
    let refused = refused_addr();
    let good = Backend::fixed("good");
    let atlas = Atlas::start(&http_config(&[refused, good.addr], &health("check = \"none\"\nmax_fails = 1\n")));
    let rs = get_n(&atlas, 20);
    assert!(rs.iter().all(|(s, body)| *s == 200 && body == "good"), "{rs:?}");
    assert_eq!(hits(&good), 20);
    assert!(atlas.wait_log(EJECTED, 1, Duration::from_secs(1)), "the refusing upstream was not ejected");
    let ej = lines_with(&atlas, EJECTED);
    assert!(ej.iter().all(|l| l.contains("upstream=u0")), "only the refusing upstream is ejected: {ej:?}");
    drop(atlas);

    // A single upstream answering 500: ejected, yet still used (fail open),
    // so the client keeps getting the backend's 500 and never Atlas's 503.
    let bad = Backend::http(|_| Reply::status(500, "Internal Server Error", "backend-500"));
    let mut atlas = Atlas::start(&http_config(&[bad.addr], &health("check = \"none\"\nmax_fails = 1\nfail_timeout = \"10s\"\n")));
    let mut c = Client::connect(atlas.addr());
    set_timeouts(&c.stream, Duration::from_secs(2));
    for i in 0..5 {
        let r = match c.try_get("/") {
            Ok(r) => r,
            Err(e) => {
                // Is Atlas still there, and does a fresh connection get an answer?
                let fresh = Client::try_connect(atlas.addr(), Duration::from_secs(1)).and_then(|mut f| {
                    set_timeouts(&f.stream, Duration::from_secs(1));
                    f.try_get("/")
                });
                panic!(
                    "request {i} to the ejected single upstream got no response within 2 s ({e}); the backend received {} request(s); \
                     atlas running: {}; a fresh connection then got: {:?}",
                    hits(&bad),
                    atlas.is_running(),
                    fresh.map(|r| (r.status, r.text()))
                );
            }
        };
        assert_eq!((r.status, r.text().as_str()), (500, "backend-500"), "request {i}: {}", r.head);
        if i == 0 {
            assert!(atlas.wait_log(EJECTED, 1, Duration::from_secs(1)), "a 500 with max_fails = 1 did not eject");
        }
    }
    assert_eq!(hits(&bad), 5, "the ejected (only) upstream kept receiving requests");
}

#[test]
fn kill_an_upstream_under_load() {
    let probes: Vec<Arc<Probe>> = (0..3).map(|_| Probe::new()).collect();
    let bes: Vec<Backend> = (0..3).map(|i| backend_tracked(&format!("b{i}"), &probes[i])).collect();
    let addrs: Vec<SocketAddr> = bes.iter().map(|b| b.addr).collect();
    let cfg = http_config(
        &addrs,
        &health("check = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\nfail_timeout = \"500ms\"\n"),
    );
    let atlas = Atlas::start(&cfg);
    assert!(wait_until(Duration::from_secs(3), || probes.iter().all(|p| p.checks() >= 2)), "health checks did not start");

    const CLIENTS: usize = 4;
    let addr = atlas.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let served = Arc::new(Mutex::new(Vec::<(Instant, String)>::new()));
    let hard_deadline = Instant::now() + Duration::from_secs(8);
    let threads: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let (stop, failures, errors, served) = (stop.clone(), failures.clone(), errors.clone(), served.clone());
            thread::spawn(move || {
                let mut client: Option<Client> = None;
                while !stop.load(Ordering::SeqCst) && Instant::now() < hard_deadline {
                    if client.is_none() {
                        match Client::try_connect(addr, Duration::from_secs(1)) {
                            Ok(c) => {
                                set_timeouts(&c.stream, Duration::from_secs(2));
                                client = Some(c);
                            }
                            Err(e) => {
                                failures.fetch_add(1, Ordering::SeqCst);
                                errors.lock().unwrap().push(format!("client {t}: connect: {e}"));
                                thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                        }
                    }
                    let c = client.as_mut().unwrap();
                    match c.try_get("/") {
                        Ok(r) if r.status == 200 => served.lock().unwrap().push((Instant::now(), r.text())),
                        Ok(r) => {
                            failures.fetch_add(1, Ordering::SeqCst);
                            errors.lock().unwrap().push(format!("client {t}: {} {:?}", r.status, r.text()));
                            client = None;
                        }
                        Err(e) => {
                            failures.fetch_add(1, Ordering::SeqCst);
                            errors.lock().unwrap().push(format!("client {t}: {e}"));
                            client = None;
                        }
                    }
                }
            })
        })
        .collect();
    let finish = |threads: Vec<thread::JoinHandle<()>>| {
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
    };

    thread::sleep(Duration::from_millis(700));
    let warm: Vec<String> = served.lock().unwrap().iter().map(|(_, b)| b.clone()).collect();
    let t_kill = Instant::now();
    bes[2].kill();
    let killed_closed = wait_until(Duration::from_secs(1), || bes[2].active() == 0);
    let down = atlas.wait_log(DOWN, 1, Duration::from_secs(3));
    let t_down = Instant::now();

    // A server on the killed port whose checks fail: reachable, but DOWN,
    // so it must get no traffic.
    let p_new = Probe::failing();
    let b2_new = backend_at(addrs[2], "b2-new", &p_new);
    thread::sleep(Duration::from_millis(600));
    let hits_while_down = hits(&b2_new);
    let checks_while_down = p_new.checks();

    // Its checks pass: it rejoins after `rise` checks.
    let t_flip = Instant::now();
    p_new.set_fail(false);
    let up = atlas.wait_log(UP, 1, Duration::from_secs(3));
    thread::sleep(Duration::from_millis(500));
    finish(threads);

    let failures = failures.load(Ordering::SeqCst);
    let served = served.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    eprintln!(
        "kill_an_upstream_under_load: {failures} failed request(s), {} served; DOWN {:?} after the kill; errors: {errors:?}",
        served.len(),
        t_down - t_kill
    );
    for name in ["b0", "b1", "b2"] {
        assert!(warm.iter().any(|b| b == name), "{name} served nothing before the kill: {} responses", warm.len());
    }
    assert!(killed_closed, "the killed backend still has {} open connection(s)", bes[2].active());
    assert!(down, "the killed upstream was not marked DOWN within 3 s");
    let down_lines = lines_with(&atlas, DOWN);
    assert!(down_lines.len() == 1 && down_lines[0].contains("upstream=u2"), "{down_lines:?}");
    assert!(failures <= CLIENTS, "{failures} failed requests (at most {CLIENTS}, one in flight per client, may fail): {errors:?}");
    assert!(served.len() >= 100, "only {} requests served", served.len());
    assert!(checks_while_down >= 3, "the new server on the killed port got only {checks_while_down} checks");
    assert_eq!(hits_while_down, 0, "a DOWN upstream (listening, failing its checks) received proxied requests");
    assert!(up, "the revived upstream was not marked UP within 3 s");
    assert!(lines_with(&atlas, UP)[0].contains("upstream=u2"));
    let back = served.iter().filter(|(_, b)| b == "b2-new").count();
    assert!(back > 0 && hits(&b2_new) > 0, "the revived upstream got no traffic after UP");
    assert!(served.iter().filter(|(_, b)| b == "b2-new").all(|(t, _)| *t > t_flip), "b2-new served before its checks passed");
    let after_up = served.iter().filter(|(t, _)| *t > t_flip).count();
    eprintln!("after UP: b2-new served {back} of {after_up} requests");
}
