//! Retry rules and the remaining timeouts: idempotent requests move to
//! another upstream when one fails before answering, non-idempotent ones
//! do not, a retry budget caps retries, the total request timeout, and
//! upstream host names.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A backend that reads a request head and closes without answering.
fn black_hole() -> Backend {
    Backend::raw(|mut s| {
        let mut buf = Vec::new();
        let _ = read_head(&mut s, &mut buf);
    })
}

#[test]
fn idempotent_request_is_retried_on_another_upstream() {
    let bad = black_hole();
    let good = Backend::fixed("good");
    let atlas = Atlas::start(&http_config(&[bad.addr, good.addr], "[health]\nmax_fails = 0\n"));
    let mut c = Client::connect(atlas.addr());
    for i in 0..6 {
        let r = c.get(&format!("/g{i}"));
        assert_eq!((r.status, r.text()), (200, "good".to_string()), "GET {i}");
    }
    assert!(bad.connections() >= 1, "round robin must have tried the failing upstream");
}

#[test]
fn non_idempotent_request_is_not_retried() {
    let bad = black_hole();
    let good = Backend::fixed("good");
    let atlas = Atlas::start(&http_config(&[bad.addr, good.addr], "[health]\nmax_fails = 0\n"));
    let mut statuses = Vec::new();
    for i in 0..4 {
        let mut c = Client::connect(atlas.addr());
        let r = c.request(format!("POST /p{i} HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"));
        statuses.push(r.status);
    }
    assert!(statuses.contains(&502), "a POST the upstream dropped must fail, not be replayed: {statuses:?}");
    assert!(good.requests().iter().all(|r| r.method == "POST"), "{statuses:?}");
    assert_eq!(good.request_count() + statuses.iter().filter(|&&s| s == 502).count(), 4, "each POST reached exactly one upstream");
}

#[test]
fn retry_budget_caps_retries() {
    // Every upstream drops every request: without a budget each GET would
    // be tried on all three; with it, retries stop after the burst.
    let bads: Vec<Backend> = (0..3).map(|_| black_hole()).collect();
    let addrs: Vec<_> = bads.iter().map(|b| b.addr).collect();
    let atlas = Atlas::start(&http_config(&addrs, "[health]\nmax_fails = 0\n"));
    let mut c = Client::connect(atlas.addr());
    for i in 0..60 {
        let r = c.get(&format!("/x{i}"));
        assert_eq!(r.status, 502);
    }
    let attempts: usize = bads.iter().map(|b| b.connections()).sum();
    assert!(attempts < 60 + 40, "{attempts} upstream attempts for 60 requests: retries are not budgeted");
    assert!(attempts > 60, "some retries must happen ({attempts})");
}

#[test]
fn total_request_timeout_closes_a_too_long_exchange() {
    let be = Backend::raw(|mut s| {
        use std::io::Write;
        let mut buf = Vec::new();
        let _ = read_head(&mut s, &mut buf);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nslow");
        for _ in 0..40 {
            thread::sleep(Duration::from_millis(100));
            if s.write_all(b"x").is_err() {
                break;
            }
        }
    });
    let atlas = Atlas::start(&http_config(&[be.addr], "[timeouts]\nrequest = \"700ms\"\n"));
    let mut c = Client::connect(atlas.addr());
    c.send(get_req("/slow"));
    let t = Instant::now();
    assert!(c.is_closed(Duration::from_secs(3)), "the exchange must be cut");
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(500) && took < Duration::from_millis(2000), "cut after {took:?}, want ~700ms");
}

#[test]
fn upstream_host_names_are_resolved() {
    let be = Backend::fixed("by-name");
    let cfg = format!("[listen]\naddress = \"127.0.0.1\"\nport = 0\nworkers = 1\n\n[[upstreams]]\naddress = \"localhost\"\nport = {}\n", be.addr.port());
    let atlas = Atlas::start(&cfg);
    assert_eq!(Client::connect(atlas.addr()).get("/").text(), "by-name");
}
