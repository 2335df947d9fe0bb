//! Zero-downtime operation: hot reload of the configuration file (file
//! watch and SIGHUP), graceful drain on signals, and socket takeover
//! (`atlas --takeover`), checked against the real binary under traffic.
//!
//! Every wait is bounded; every Atlas gets its own takeover socket from the
//! harness.

mod common;
#[path = "support/tls.rs"]
mod tls_support;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const RELOADED: &str = "configuration reloaded";
const REJECTED: &str = "reload rejected; the running configuration is unchanged";
const NEEDS_RESTART: &str = "needs a restart or a takeover";

/// Replaces `path` the way deploy tools do: write a temporary file in the
/// same directory, then rename it over the old one.
fn replace_file(path: &Path, text: &str) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write temp config");
    std::fs::rename(&tmp, path).expect("rename config into place");
}

/// GET `path` on a fresh connection; `Err` describes what went wrong.
fn try_get(addr: SocketAddr, path: &str) -> Result<Response, String> {
    let mut c = Client::try_connect(addr, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
    c.try_get(path).map_err(|e| format!("request: {e}"))
}

/// Body of a 200 answer to GET `path` on a fresh connection; panics otherwise.
fn body(addr: SocketAddr, path: &str) -> String {
    let r = try_get(addr, path).unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    assert_eq!(r.status, 200, "GET {path}: {}\n{}", r.head, r.text());
    r.text()
}

/// Polls fresh-connection GETs until the body is `want` (true) or `within`
/// passes (false).
fn wait_body(addr: SocketAddr, want: &str, within: Duration) -> bool {
    wait_until(within, || {
        let ok = try_get(addr, "/").map(|r| r.status == 200 && r.text() == want).unwrap_or(false);
        if !ok {
            thread::sleep(Duration::from_millis(20));
        }
        ok
    })
}

/// One HTTP listener on 127.0.0.1:0 (one worker) over `ups`, plus `extra`.
fn cfg(ups: &[SocketAddr], extra: &str) -> String {
    http_config(ups, extra)
}

/// Config in its own directory (so the watcher has a quiet directory), and
/// Atlas started on it.
fn start_in_dir(text: &str) -> (TempDir, std::path::PathBuf, Atlas) {
    let dir = TempDir::new();
    let path = dir.write("atlas.toml", text);
    let atlas = Atlas::start_file(&path, 1);
    (dir, path, atlas)
}

/// Polls until connecting to `addr` is refused (true) or `within` passes.
/// Connections that do get established are closed at once.
fn wait_refused(addr: SocketAddr, within: Duration) -> bool {
    wait_until(within, || match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
        Err(e) => e.kind() == ErrorKind::ConnectionRefused,
        Ok(_) => {
            thread::sleep(Duration::from_millis(20));
            false
        }
    })
}

fn last_lines(atlas: &Atlas, n: usize) -> String {
    let l = atlas.log_lines();
    l[l.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------
// Load generator for the takeover tests
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Load {
    stop: AtomicBool,
    ok: AtomicUsize,
    refused: AtomicUsize,
    failed: AtomicUsize,
    /// Distinct connections opened.
    conns: AtomicUsize,
    /// The first failures, described.
    failures: Mutex<Vec<String>>,
}

impl Load {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 30 {
            f.push(what);
        }
    }

    fn report(&self) -> String {
        format!(
            "ok={} failed={} refused={} conns={}; first failures:\n{}",
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
            self.conns.load(Ordering::SeqCst),
            self.failures.lock().unwrap().join("\n")
        )
    }
}

/// How a load thread opens a connection: plain TCP, or TLS (any certificate).
fn plain(addr: SocketAddr) -> io::Result<Client> {
    Client::try_connect(addr, Duration::from_secs(2))
}

fn over_tls(addr: SocketAddr) -> io::Result<Client<tls_support::Tls>> {
    tls_support::tls_connect(addr, "localhost", &tls_support::ClientOpts::default()).map(Client::over)
}

/// Client thread `id`: alternates a keep-alive connection (up to 20
/// requests, reconnecting when the server says `Connection: close`) and 5
/// requests on fresh connections, each opened with `open`. Every answer must
/// be 200 with body `ok <path>`. Stops on `load.stop` or after `max` (bounded).
fn load_thread<S: Read + Write + 'static>(
    open: fn(SocketAddr) -> io::Result<Client<S>>,
    addr: SocketAddr,
    id: usize,
    load: Arc<Load>,
    max: Duration,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let deadline = Instant::now() + max;
        let mut n = 0usize;
        let started = Instant::now();
        let check = |load: &Load, path: &str, r: &Response, how: &str| {
            let want = format!("ok {path}");
            if r.status == 200 && r.text() == want {
                load.ok.fetch_add(1, Ordering::SeqCst);
            } else {
                load.fail(format!("t{id} {how} GET {path} at {:?}: got {} {:?}", started.elapsed(), r.status, r.text()));
            }
        };
        let connect = |load: &Load, how: &str| -> Option<Client<S>> {
            match open(addr) {
                Ok(c) => {
                    load.conns.fetch_add(1, Ordering::SeqCst);
                    Some(c)
                }
                Err(e) => {
                    if e.kind() == ErrorKind::ConnectionRefused {
                        load.refused.fetch_add(1, Ordering::SeqCst);
                    }
                    load.fail(format!("t{id} {how} connect at {:?}: {e}", started.elapsed()));
                    thread::sleep(Duration::from_millis(10));
                    None
                }
            }
        };
        while !load.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            // Keep-alive phase.
            if let Some(mut c) = connect(&load, "keep-alive") {
                for k in 0..20 {
                    if load.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    n += 1;
                    let path = format!("/t{id}/{n}");
                    match c.try_get(&path) {
                        Ok(r) => {
                            check(&load, &path, &r, &format!("keep-alive #{k}"));
                            if r.has_token("connection", "close") {
                                break;
                            }
                        }
                        Err(e) => {
                            load.fail(format!(
                                "t{id} keep-alive GET {path} (request #{k} on its connection) at {:?}: {e} (kind {:?})",
                                started.elapsed(),
                                e.kind()
                            ));
                            break;
                        }
                    }
                }
            }
            // Fresh connections.
            for _ in 0..5 {
                if load.stop.load(Ordering::SeqCst) {
                    break;
                }
                n += 1;
                let path = format!("/t{id}/{n}");
                if let Some(mut c) = connect(&load, "fresh") {
                    match c.try_get(&path) {
                        Ok(r) => check(&load, &path, &r, "fresh"),
                        Err(e) => load.fail(format!("t{id} fresh GET {path} at {:?}: {e}", started.elapsed())),
                    }
                }
            }
        }
    })
}

fn echo_backend() -> Backend {
    Backend::http(|r| Reply::ok(format!("ok {}", r.target)))
}

// ---------------------------------------------------------------------------
// Hot reload
// ---------------------------------------------------------------------------

/// What a client thread saw: each answer's body, or what went wrong.
type Seen = Arc<Mutex<Vec<Result<String, String>>>>;

#[test]
fn reload_changes_upstreams_under_traffic() {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    let (_dir, path, atlas) = start_in_dir(&cfg(&[a.addr], ""));
    let addr = atlas.addr();
    let stop = Arc::new(AtomicBool::new(false));

    // One keep-alive connection, never reopened.
    let ka_seen: Seen = Arc::default();
    let ka = {
        let (stop, seen) = (stop.clone(), ka_seen.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut c = match Client::try_connect(addr, Duration::from_secs(2)) {
                Ok(c) => c,
                Err(e) => {
                    seen.lock().unwrap().push(Err(format!("connect: {e}")));
                    return;
                }
            };
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                match c.try_get("/ka") {
                    Ok(r) if r.status == 200 && !r.has_token("connection", "close") => seen.lock().unwrap().push(Ok(r.text())),
                    Ok(r) => {
                        seen.lock().unwrap().push(Err(format!("{} {:?} (head {:?})", r.status, r.text(), r.head)));
                        return;
                    }
                    Err(e) => {
                        seen.lock().unwrap().push(Err(format!("keep-alive request: {e}")));
                        return;
                    }
                }
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // New connections.
    let fresh_seen: Seen = Arc::default();
    let fresh = {
        let (stop, seen) = (stop.clone(), fresh_seen.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let r = try_get(addr, "/fresh").and_then(|r| if r.status == 200 { Ok(r.text()) } else { Err(format!("{} {:?}", r.status, r.text())) });
                seen.lock().unwrap().push(r);
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let saw = |seen: &Seen, want: &str| seen.lock().unwrap().iter().any(|r| r.as_deref() == Ok(want));
    assert!(wait_until(Duration::from_secs(3), || saw(&ka_seen, "A") && saw(&fresh_seen, "A")), "no answer from A before the reload");

    let t0 = Instant::now();
    replace_file(&path, &cfg(&[b.addr], ""));
    let ka_switched = wait_until(Duration::from_secs(2), || saw(&ka_seen, "B"));
    let ka_after = t0.elapsed();
    let fresh_switched = wait_until(Duration::from_secs(2), || saw(&fresh_seen, "B"));
    // A little more traffic on the new configuration.
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    ka.join().unwrap();
    fresh.join().unwrap();

    let ka_seen = ka_seen.lock().unwrap().clone();
    let fresh_seen = fresh_seen.lock().unwrap().clone();
    let errors = |s: &[Result<String, String>]| s.iter().filter_map(|r| r.as_ref().err().cloned()).collect::<Vec<_>>();
    assert!(errors(&ka_seen).is_empty(), "keep-alive connection failed: {:?}", errors(&ka_seen));
    assert!(errors(&fresh_seen).is_empty(), "fresh connections failed: {:?}", errors(&fresh_seen));
    assert!(atlas.count_log(RELOADED) >= 1, "no `{RELOADED}` line:\n{}", last_lines(&atlas, 20));
    assert!(ka_switched, "the keep-alive connection still got A 2 s after the config was replaced ({} answers)", ka_seen.len());
    assert!(fresh_switched, "new connections still got A 2 s after the config was replaced");
    // On one connection (one worker): A...A then B...B, never back to A.
    for (name, seen) in [("keep-alive", &ka_seen), ("fresh", &fresh_seen)] {
        let bodies: Vec<&str> = seen.iter().map(|r| r.as_deref().unwrap()).collect();
        let first_b = bodies.iter().position(|b| *b == "B").unwrap();
        assert!(bodies[..first_b].iter().all(|b| *b == "A"), "{name}: unexpected body before the switch: {bodies:?}");
        assert!(bodies[first_b..].iter().all(|b| *b == "B"), "{name}: A answered after B already had: {bodies:?}");
    }
    eprintln!("keep-alive connection switched to B {ka_after:?} after the rename; {} + {} answers", ka_seen.len(), fresh_seen.len());
}

#[test]
fn reload_changes_strategy() {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    let (_dir, path, atlas) = start_in_dir(&cfg(&[a.addr, b.addr], "[routing]\nstrategy = \"round_robin\"\n"));
    let addr = atlas.addr();
    let count = |paths: &mut dyn FnMut(usize) -> String, n: usize| {
        let mut na = 0;
        for i in 0..n {
            match body(addr, &paths(i)).as_str() {
                "A" => na += 1,
                "B" => {}
                other => panic!("unexpected body {other:?}"),
            }
        }
        na
    };

    // 1:1 round robin.
    let na = count(&mut |i| format!("/r{i}"), 20);
    assert!((8..=12).contains(&na), "round robin over A,B (1:1) sent {na} of 20 to A");

    // Weights 3:1.
    replace_file(&path, &config_weighted("http", &[(a.addr, 3), (b.addr, 1)], "[routing]\nstrategy = \"round_robin\"\n"));
    assert!(atlas.wait_log(RELOADED, 1, Duration::from_secs(3)), "weights change not reloaded:\n{}", last_lines(&atlas, 20));
    thread::sleep(Duration::from_millis(300));
    let na = count(&mut |i| format!("/w{i}"), 40);
    assert!((27..=33).contains(&na), "after the reload to weights 3:1, A got {na} of 40 (want ~30)");

    // Hash on the path: one path always goes to the same upstream.
    replace_file(&path, &cfg(&[a.addr, b.addr], "[routing]\nstrategy = \"hash\"\nhash_key = \"path\"\n"));
    assert!(atlas.wait_log(RELOADED, 2, Duration::from_secs(3)), "strategy change not reloaded:\n{}", last_lines(&atlas, 20));
    thread::sleep(Duration::from_millis(300));
    let na = count(&mut |_| "/same/path".to_string(), 20);
    assert!(na == 0 || na == 20, "hash on path sent /same/path {na} times of 20 to A, the rest to B");
    let spread = count(&mut |i| format!("/spread/{i}"), 40);
    assert!(spread > 0 && spread < 40, "hash on path sent {spread} of 40 distinct paths to A (both should get some)");

    // Back to a single upstream.
    replace_file(&path, &cfg(&[b.addr], ""));
    assert!(atlas.wait_log(RELOADED, 3, Duration::from_secs(3)), "single upstream not reloaded:\n{}", last_lines(&atlas, 20));
    thread::sleep(Duration::from_millis(300));
    let na = count(&mut |i| format!("/s{i}"), 10);
    assert_eq!(na, 0, "A still answered after the reload to B alone");
}

#[test]
fn broken_toml_keeps_old_config() {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    let (_dir, path, atlas) = start_in_dir(&cfg(&[a.addr], ""));
    let addr = atlas.addr();
    assert_eq!(body(addr, "/"), "A");

    // Not TOML at all (pointing nowhere near B, but it must not matter).
    replace_file(&path, "[listen\nport = = 0\nthis is not toml ]]]\n");
    assert!(atlas.wait_log(REJECTED, 1, Duration::from_secs(3)), "garbage config: no `{REJECTED}` line within 3 s:\n{}", last_lines(&atlas, 20));
    let config_errors = atlas.log_lines().iter().filter(|l| l.contains("config:") && !l.contains(REJECTED)).count();
    assert!(config_errors >= 1, "the parse error itself was not logged with `config:`:\n{}", last_lines(&atlas, 20));
    for _ in 0..5 {
        assert_eq!(body(addr, "/"), "A", "traffic left A after a rejected (garbage) reload");
    }

    // Valid TOML, invalid meaning: unknown strategy, and it points to B.
    replace_file(&path, &cfg(&[b.addr], "[routing]\nstrategy = \"fastest\"\n"));
    assert!(atlas.wait_log(REJECTED, 2, Duration::from_secs(3)), "unknown strategy: no second `{REJECTED}` line within 3 s:\n{}", last_lines(&atlas, 20));
    assert!(
        atlas.log_lines().iter().any(|l| l.contains("config:") && (l.contains("fastest") || l.contains("routing.strategy"))),
        "the unknown strategy error was not logged:\n{}",
        last_lines(&atlas, 20)
    );
    thread::sleep(Duration::from_millis(200));
    for _ in 0..5 {
        assert_eq!(body(addr, "/"), "A", "a rejected config (upstream B, unknown strategy) was partly applied");
    }
    assert_eq!(atlas.count_log(RELOADED), 0, "a rejected config was reported as reloaded:\n{}", last_lines(&atlas, 20));

    // A valid file applies.
    replace_file(&path, &cfg(&[b.addr], ""));
    assert!(atlas.wait_log(RELOADED, 1, Duration::from_secs(3)), "valid config not reloaded:\n{}", last_lines(&atlas, 20));
    assert!(wait_body(addr, "B", Duration::from_secs(2)), "B does not answer 2 s after a valid reload");
}

/// Signals are for the main thread alone (it takes them with sigtimedwait):
/// every other thread must block them. A thread started before they were
/// blocked (the rooms thread was) let the kernel deliver a SIGTERM or
/// SIGHUP there whenever the main thread was not waiting, with the default
/// action: the process died (seen as a flaky `second_signal_forces_exit`).
#[test]
fn every_thread_but_the_main_one_blocks_the_signals_atlas_handles() {
    // SIGHUP 1, SIGINT 2, SIGQUIT 3, SIGUSR1 10, SIGTERM 15: bits n-1.
    const HANDLED: u64 = 1 << 0 | 1 << 1 | 1 << 2 | 1 << 9 | 1 << 14;
    let a = Backend::fixed("A");
    let atlas = Atlas::start(&cfg(&[a.addr], ""));
    assert_eq!(body(atlas.addr(), "/"), "A");
    let pid = atlas.pid();
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads") {
        let tid: u32 = entry.unwrap().file_name().to_string_lossy().parse().unwrap();
        if tid == pid {
            continue; // Inside sigtimedwait the waited-for signals are unblocked.
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("").to_string();
        let blocked = u64::from_str_radix(&field("SigBlk:"), 16).unwrap_or(0);
        checked.push(field("Name:"));
        assert_eq!(blocked & HANDLED, HANDLED, "thread {tid} `{}` does not block the handled signals (SigBlk {blocked:x})", field("Name:"));
    }
    assert!(checked.len() >= 2, "too few threads to check: {checked:?}");
}

#[test]
fn sighup_reloads() {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    // The config Atlas is given is a symlink; it is switched to another
    // target by renaming a new symlink over it. The running watcher follows
    // the first target's directory, so (today) only SIGHUP notices; should a
    // future watcher notice too, the test still checks SIGHUP reloads.
    let link_dir = TempDir::new();
    let targets = TempDir::new();
    let t1 = targets.write("v1.toml", cfg(&[a.addr], ""));
    let other = TempDir::new();
    let t2 = other.write("v2.toml", cfg(&[b.addr], ""));
    let link = link_dir.join("atlas.toml");
    std::os::unix::fs::symlink(&t1, &link).unwrap();
    let mut atlas = Atlas::start_file(&link, 1);
    let addr = atlas.addr();
    assert_eq!(body(addr, "/"), "A");

    let tmp_link = link_dir.join("atlas.toml.new");
    std::os::unix::fs::symlink(&t2, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, &link).unwrap();
    thread::sleep(Duration::from_millis(600));
    let before = atlas.count_log(RELOADED);
    if before == 0 {
        assert_eq!(body(addr, "/"), "A", "the config changed to B without any `{RELOADED}` line");
    }

    atlas.signal("HUP");
    assert!(atlas.wait_log(RELOADED, before + 1, Duration::from_secs(2)), "no new `{RELOADED}` line within 2 s of SIGHUP:\n{}", last_lines(&atlas, 20));
    assert!(wait_body(addr, "B", Duration::from_secs(2)), "B does not answer after SIGHUP");

    // SIGHUP with an unchanged file: still a reload, a newer version.
    let versions = |atlas: &Atlas| -> Vec<u64> {
        atlas
            .log_lines()
            .iter()
            .filter(|l| l.contains(RELOADED))
            .filter_map(|l| l.split("version=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .collect()
    };
    let n = atlas.count_log(RELOADED);
    atlas.signal("HUP");
    assert!(atlas.wait_log(RELOADED, n + 1, Duration::from_secs(2)), "second SIGHUP: no reload:\n{}", last_lines(&atlas, 20));
    let v = versions(&atlas);
    assert!(v.len() >= 2 && v.windows(2).all(|w| w[1] > w[0]), "reload versions should increase: {v:?}");
    assert!(atlas.is_running(), "Atlas exited on SIGHUP");
    assert_eq!(body(addr, "/"), "B");
}

#[test]
fn in_flight_request_survives_reload() {
    let a = Backend::http(|_| Reply::ok("A").after(Duration::from_millis(1500)));
    let b = Backend::fixed("B");
    let (_dir, path, atlas) = start_in_dir(&cfg(&[a.addr], ""));
    let addr = atlas.addr();

    // A slow request on a keep-alive connection, and another on a fresh one.
    let mut ka = Client::connect(addr);
    let t0 = Instant::now();
    ka.send(get_req("/slow-ka"));
    let other = thread::spawn(move || try_get(addr, "/slow-fresh"));
    assert!(a.wait_for_requests(2, Duration::from_secs(2)), "the slow requests did not reach A");

    replace_file(&path, &cfg(&[b.addr], ""));
    assert!(atlas.wait_log(RELOADED, 1, Duration::from_secs(2)), "no reload:\n{}", last_lines(&atlas, 20));
    let reloaded_at = t0.elapsed();
    assert!(reloaded_at < Duration::from_millis(1300), "the reload came too late ({reloaded_at:?}) to overlap the 1.5 s requests");

    let r = ka.try_read_response(false).unwrap_or_else(|e| panic!("in-flight keep-alive request failed across the reload: {e}"));
    assert_eq!((r.status, r.text().as_str()), (200, "A"), "in-flight request: {}", r.head);
    let r2 = other.join().unwrap().unwrap_or_else(|e| panic!("in-flight request on its own connection failed across the reload: {e}"));
    assert_eq!((r2.status, r2.text().as_str()), (200, "A"), "in-flight request: {}", r2.head);
    assert!(t0.elapsed() >= Duration::from_millis(1400));

    // The next request on the same connection uses the new config.
    thread::sleep(Duration::from_millis(150));
    let r = ka.try_get("/next").unwrap_or_else(|e| panic!("keep-alive connection unusable after the reload: {e}"));
    assert_eq!((r.status, r.text().as_str()), (200, "B"), "next request on the same connection: {}", r.head);
}

#[test]
fn reload_logs_changes_needing_restart() {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    let listen = |port: u16, workers: usize, up: SocketAddr| {
        format!(
            "[listen]\nname = \"main\"\naddress = \"127.0.0.1\"\nport = {port}\nmode = \"http\"\nworkers = {workers}\n\n{}",
            upstreams_toml(&[(up, 1)], None)
        )
    };
    let (_dir, path, atlas) = start_in_dir(&listen(0, 1, a.addr));
    let addr = atlas.addr();
    assert_eq!(body(addr, "/"), "A");

    // Another port, two workers, and upstream B (the part that can apply).
    let new_port = refused_addr().port();
    replace_file(&path, &listen(new_port, 2, b.addr));
    assert!(atlas.wait_log(RELOADED, 1, Duration::from_secs(3)), "no reload:\n{}", last_lines(&atlas, 20));
    let lines: Vec<String> = atlas.log_lines().into_iter().filter(|l| l.contains(NEEDS_RESTART)).collect();
    assert!(!lines.is_empty(), "no `{NEEDS_RESTART}` line:\n{}", last_lines(&atlas, 20));
    assert!(lines.iter().any(|l| l.contains("workers")), "the workers change is not named: {lines:#?}");
    assert!(lines.iter().any(|l| l.contains(&new_port.to_string()) || l.contains("address")), "the address change is not named: {lines:#?}");

    // Still on the old address, with the rest applied.
    assert!(wait_body(addr, "B", Duration::from_secs(2)), "the old listener does not serve B after the reload");
    let refused = matches!(TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], new_port)), Duration::from_secs(1)), Err(e) if e.kind() == ErrorKind::ConnectionRefused);
    assert!(refused, "Atlas started listening on the new port {new_port} although that needs a restart");
    assert_eq!(body(addr, "/"), "B");
}

// ---------------------------------------------------------------------------
// Graceful drain
// ---------------------------------------------------------------------------

#[test]
fn drain_slow_in_flight_request_completes_after_sigterm() {
    let a = Backend::http(|_| Reply::ok("slow").after(Duration::from_millis(1500)));
    let mut atlas = Atlas::start(&cfg(&[a.addr], "[runtime]\ndrain_timeout = \"5s\"\n"));
    let addr = atlas.addr();
    let mut c = Client::connect(addr);
    let t0 = Instant::now();
    c.send(get_req("/slow"));
    assert!(a.wait_for_requests(1, Duration::from_secs(2)), "the request did not reach the backend");

    atlas.signal("TERM");
    let t_sig = Instant::now();
    // The responses must wait: read them in a thread while we probe.
    let reader = thread::spawn(move || {
        let r = c.try_read_response(false);
        (r, Instant::now())
    });
    let refused = wait_refused(addr, Duration::from_secs(1));
    let refused_after = t_sig.elapsed();
    assert!(atlas.wait_log("draining", 1, Duration::from_secs(1)), "no `draining` line:\n{}", last_lines(&atlas, 20));

    let (r, t_resp) = reader.join().unwrap();
    let r = r.unwrap_or_else(|e| panic!("the in-flight request failed after SIGTERM: {e}"));
    assert_eq!((r.status, r.text().as_str()), (200, "slow"), "{}", r.head);
    assert!(r.has_token("connection", "close"), "the response finished during the drain lacks `Connection: close`: {}", r.head);
    let status = atlas.wait_exit(Duration::from_secs(3));
    let t_exit = Instant::now();
    assert!(
        refused,
        "new TCP connections to {addr} were still established (not refused) for 1 s after SIGTERM, while the drain was \
         under way: the listening socket stays open in the draining process, so such clients sit in the accept queue \
         and are reset at exit. Atlas exited afterwards: {}\n{}",
        status.is_some(),
        last_lines(&atlas, 10)
    );
    let status = status.unwrap_or_else(|| panic!("Atlas still running 3 s after the in-flight request ended:\n{}", last_lines(&atlas, 20)));
    assert_eq!(status.code(), Some(0), "exit status after a drain: {status}");
    assert!(t_resp - t0 >= Duration::from_millis(1400), "the response came too early ({:?})", t_resp - t0);
    assert!(t_exit - t_resp < Duration::from_millis(1500), "exit {:?} after the last response", t_exit - t_resp);
    assert!(atlas.wait_log("drained; exiting", 1, Duration::from_secs(1)), "no `drained; exiting` line:\n{}", last_lines(&atlas, 20));
    eprintln!("refused {refused_after:?} after SIGTERM; exit {:?} after the response", t_exit - t_resp);
}

#[test]
fn drain_closes_idle_keepalive_connections() {
    let a = Backend::fixed("A");
    let mut atlas = Atlas::start(&cfg(&[a.addr], "[runtime]\ndrain_timeout = \"20s\"\n"));
    let mut idle = Client::connect(atlas.addr());
    let r = idle.get("/");
    assert_eq!(r.status, 200);
    assert!(!r.has_token("connection", "close"), "{}", r.head);
    let mut idle2 = Client::connect(atlas.addr());
    assert_eq!(idle2.get("/").status, 200);

    let t = Instant::now();
    atlas.signal("TERM");
    assert!(idle.is_closed(Duration::from_secs(2)), "an idle keep-alive connection is still open 2 s after SIGTERM");
    assert!(idle.buf.is_empty(), "bytes on an idle connection during the drain: {}", show(&idle.buf));
    assert!(idle2.is_closed(Duration::from_secs(1)), "the second idle keep-alive connection is still open after SIGTERM");
    let status = atlas.wait_exit(Duration::from_secs(3)).unwrap_or_else(|| panic!("still running 3 s after SIGTERM with only idle connections"));
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(took < Duration::from_secs(3), "took {took:?} (drain_timeout is 20 s)");
    assert!(atlas.count_log("drained; exiting") >= 1, "{}", last_lines(&atlas, 20));
}

#[test]
fn second_signal_forces_exit() {
    let a = Backend::http(|_| Reply::ok("late").after(Duration::from_secs(10)));
    let mut atlas = Atlas::start(&cfg(&[a.addr], "[runtime]\ndrain_timeout = \"20s\"\n"));
    let mut c = Client::connect(atlas.addr());
    c.send(get_req("/slow"));
    assert!(a.wait_for_requests(1, Duration::from_secs(2)));

    atlas.signal("TERM");
    assert!(atlas.wait_log("draining", 1, Duration::from_secs(2)), "no `draining` line:\n{}", last_lines(&atlas, 20));
    thread::sleep(Duration::from_millis(200));
    assert!(atlas.is_running(), "exited after one SIGTERM with a 10 s request in flight:\n{}", last_lines(&atlas, 20));
    let t = Instant::now();
    atlas.signal("TERM");
    let status = atlas.wait_exit(Duration::from_secs(2)).unwrap_or_else(|| panic!("still running 2 s after the second SIGTERM:\n{}", last_lines(&atlas, 20)));
    assert_eq!(status.code(), Some(1), "forced exit status: {status}");
    assert!(t.elapsed() < Duration::from_millis(1200), "forced exit took {:?}", t.elapsed());
}

#[test]
fn drain_timeout_exits_zero() {
    let a = Backend::http(|_| Reply::ok("late").after(Duration::from_secs(10)));
    let mut atlas = Atlas::start(&cfg(&[a.addr], "[runtime]\ndrain_timeout = \"1s\"\n"));
    let mut c = Client::connect(atlas.addr());
    c.send(get_req("/slow"));
    assert!(a.wait_for_requests(1, Duration::from_secs(2)));

    let t = Instant::now();
    atlas.signal("TERM");
    let status =
        atlas.wait_exit(Duration::from_secs(4)).unwrap_or_else(|| panic!("still running 4 s after SIGTERM with drain_timeout 1s:\n{}", last_lines(&atlas, 20)));
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "exit status at the drain timeout: {status}");
    assert!(took >= Duration::from_millis(900), "exited after {took:?}, before the 1 s drain timeout, with a request in flight");
    assert!(took < Duration::from_millis(2500), "exited after {took:?} with drain_timeout 1s");
    // The client's connection is gone with the process.
    assert!(c.is_closed(Duration::from_secs(1)));
}

// ---------------------------------------------------------------------------
// Socket takeover
// ---------------------------------------------------------------------------

#[test]
fn takeover_under_load_three_times_zero_failures() {
    let backend = echo_backend();
    takeover_three_times_under_load(&cfg(&[backend.addr], "[runtime]\ndrain_timeout = \"5s\"\n"), plain);
}

/// The same over TLS: handshakes and keep-alive TLS connections through
/// three takeovers, nothing refused and no request failed.
#[test]
fn takeover_under_tls_load_three_times_zero_failures() {
    let backend = echo_backend();
    let ca = tls_support::Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let (cert, key) = ca.leaf(&["localhost"], "localhost", &rcgen::PKCS_ECDSA_P256_SHA256).write(&dir, "default");
    let config = tls_support::tls_config("http", &[backend.addr], &tls_support::tls_section(&cert, &key, &[]), "[runtime]\ndrain_timeout = \"5s\"\n");
    takeover_three_times_under_load(&config, over_tls);
}

/// Three takeovers in a row while 3 load threads (see [`load_thread`]) run
/// against the listener: no refused connection, no failed request.
fn takeover_three_times_under_load<S: Read + Write + 'static>(config: &str, open: fn(SocketAddr) -> io::Result<Client<S>>) {
    let config = config.to_string();
    let mut current = Atlas::start(&config);
    let addr = current.addr();
    let load = Arc::new(Load::default());
    let threads: Vec<_> = (0..3).map(|i| load_thread(open, addr, i, load.clone(), Duration::from_secs(20))).collect();
    thread::sleep(Duration::from_millis(400));
    let mut old_ones = Vec::new();
    let mut report = Vec::new();
    for gen in 2..=4 {
        let before = load.ok.load(Ordering::SeqCst);
        let t = Instant::now();
        let next = Atlas::start_takeover(&current, &config, 1);
        assert_eq!(next.addr(), addr, "v{gen} listens on {} instead of the taken-over {addr}", next.addr());
        assert!(next.wait_log("takeover: complete", 1, Duration::from_secs(3)), "v{gen}: no `takeover: complete`:\n{}", next.logs());
        assert!(next.count_log("takeover: received") >= 1, "v{gen}: {}", next.logs());
        let mut old = std::mem::replace(&mut current, next);
        let status = old.wait_exit(Duration::from_secs(4));
        let exited_after = t.elapsed();
        let status = status.unwrap_or_else(|| panic!("v{}: still running 4 s after v{gen} took over:\n{}", gen - 1, last_lines(&old, 20)));
        assert_eq!(status.code(), Some(0), "v{} exit status after the takeover: {status}\n{}", gen - 1, last_lines(&old, 20));
        assert!(old.count_log("successor took over") >= 1, "v{}: {}", gen - 1, last_lines(&old, 20));
        assert!(old.count_log("drained; exiting") >= 1, "v{}: {}", gen - 1, last_lines(&old, 20));
        old_ones.push(old);
        // Traffic keeps flowing on the new one before the next takeover.
        let moved = wait_until(Duration::from_secs(2), || load.ok.load(Ordering::SeqCst) > before + 50);
        assert!(moved, "traffic stalled after the takeover by v{gen}: {}", load.report());
        report.push(format!("v{gen}: old exited {exited_after:?} after the takeover started"));
        thread::sleep(Duration::from_millis(300));
    }
    thread::sleep(Duration::from_millis(300));
    load.stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    eprintln!("{}\n{}", report.join("\n"), load.report());
    assert_eq!(load.refused.load(Ordering::SeqCst), 0, "refused connections: {}", load.report());
    assert_eq!(load.failed.load(Ordering::SeqCst), 0, "failed requests: {}", load.report());
    assert!(load.ok.load(Ordering::SeqCst) > 300, "too little traffic to mean anything: {}", load.report());
    assert!(current.is_running());
    let mut last = open(addr).expect("connect after the takeovers");
    assert_eq!(last.get("/final").text(), "ok /final");
}

#[test]
fn takeover_without_running_atlas_fails_cleanly() {
    let backend = Backend::fixed("A");
    let config = cfg(&[backend.addr], "");
    let cfg_path = write_config(&config);
    let nowhere = temp_path("sock");
    let (code, out, err) = run_cli(&["--takeover", "--takeover-socket", &path_of(&nowhere), &path_of(&cfg_path)], &[]);
    assert!(code.is_some() && code != Some(0), "--takeover with nobody at the socket exited {code:?}\nstdout: {out}\nstderr: {err}");
    assert!(err.to_lowercase().contains("takeover"), "the error should mention takeover: {err}");

    // A running Atlas on another socket path is left alone.
    let mut running = Atlas::start(&config);
    let own = running.takeover_socket().unwrap().to_path_buf();
    assert!(wait_until(Duration::from_secs(2), || own.exists()), "the running Atlas did not create {}", own.display());
    let (code, out, err) = run_cli(&["--takeover", "--takeover-socket", &path_of(&nowhere), &path_of(&cfg_path)], &[]);
    assert!(code.is_some() && code != Some(0), "--takeover at the wrong path exited {code:?}\nstdout: {out}\nstderr: {err}");
    assert!(err.to_lowercase().contains("takeover"), "the error should mention takeover: {err}");
    thread::sleep(Duration::from_millis(200));
    assert!(running.is_running(), "the running Atlas exited after a failed takeover elsewhere");
    assert_eq!(running.count_log("draining"), 0, "the running Atlas drains:\n{}", last_lines(&running, 20));
    for _ in 0..5 {
        assert_eq!(body(running.addr(), "/"), "A");
    }
    assert!(own.exists(), "the running Atlas' takeover socket disappeared");
    let _ = std::fs::remove_file(&cfg_path);
}

#[test]
fn takeover_socket_is_private() {
    let backend = Backend::fixed("A");
    let config = cfg(&[backend.addr], "[runtime]\ndrain_timeout = \"3s\"\n");
    let v1 = Atlas::start(&config);
    let sock = v1.takeover_socket().unwrap().to_path_buf();
    let check = |who: &str| {
        assert!(wait_until(Duration::from_secs(3), || sock.exists()), "{who}: no takeover socket at {}", sock.display());
        let meta = std::fs::symlink_metadata(&sock).unwrap();
        assert!(meta.file_type().is_socket(), "{who}: {} is not a socket", sock.display());
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{who}: takeover socket mode is {mode:o}, want 600");
    };
    check("v1");
    // The successor re-creates it at the same path, also private.
    let mut v1 = v1;
    let v2 = Atlas::start_takeover(&v1, &config, 1);
    assert!(v2.wait_log("takeover: complete", 1, Duration::from_secs(3)), "{}", v2.logs());
    let st = v1.wait_exit(Duration::from_secs(4)).expect("v1 still running after the takeover");
    assert_eq!(st.code(), Some(0));
    assert!(v2.wait_log("offering our sockets", 1, Duration::from_secs(3)), "v2 does not offer its sockets:\n{}", v2.logs());
    check("v2");
    assert_eq!(body(v2.addr(), "/"), "A");
}

#[test]
fn takeover_with_changed_listeners() {
    let backend = echo_backend();
    let listener = |name: &str| format!("[[listeners]]\nname = \"{name}\"\naddress = \"127.0.0.1\"\nport = 0\nmode = \"http\"\n\n");
    let tail = format!("[runtime]\nworkers = 1\ndrain_timeout = \"5s\"\n\n{}", upstreams_toml(&[(backend.addr, 1)], None));
    let c1 = format!("{}{}{tail}", listener("a"), listener("b"));
    let c2 = format!("{}{}{tail}", listener("a"), listener("c"));
    let mut v1 = Atlas::start_n(&c1, 2);
    let (a_addr, b_addr) = (v1.listeners[0], v1.listeners[1]);
    assert_eq!(body(a_addr, "/a"), "ok /a");
    assert_eq!(body(b_addr, "/b"), "ok /b");

    let load = Arc::new(Load::default());
    let threads: Vec<_> = (0..2).map(|i| load_thread(plain, a_addr, i, load.clone(), Duration::from_secs(15))).collect();
    thread::sleep(Duration::from_millis(300));
    let v2 = Atlas::start_takeover(&v1, &c2, 2);
    let (a2, c_addr) = (v2.listeners[0], v2.listeners[1]);
    assert_eq!(a2, a_addr, "listener `a` moved from {a_addr} to {a2}");
    assert_ne!(c_addr, b_addr, "the new listener `c` got `b`'s socket");
    assert!(v2.wait_log("takeover: complete", 1, Duration::from_secs(3)), "{}", v2.logs());
    assert_eq!(body(c_addr, "/c"), "ok /c", "new listener `c` does not serve");

    let st = v1.wait_exit(Duration::from_secs(4)).unwrap_or_else(|| panic!("v1 still running after the takeover:\n{}", last_lines(&v1, 20)));
    assert_eq!(st.code(), Some(0), "v1: {st}");
    assert!(wait_refused(b_addr, Duration::from_secs(2)), "`b`'s port {b_addr} still accepts connections after v1 exited");
    let before = load.ok.load(Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(2), || load.ok.load(Ordering::SeqCst) > before + 30), "traffic on `a` stalled: {}", load.report());
    load.stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    eprintln!("{}", load.report());
    assert_eq!(load.refused.load(Ordering::SeqCst), 0, "refused on `a`: {}", load.report());
    assert_eq!(load.failed.load(Ordering::SeqCst), 0, "failures on `a`: {}", load.report());
    assert_eq!(body(a_addr, "/a-after"), "ok /a-after");
    assert_eq!(body(c_addr, "/c-after"), "ok /c-after");
}
