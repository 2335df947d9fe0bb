//! Limits: request body size (413), per-upstream max_conns with and without
//! queueing (503 "upstreams busy"), per-listener connection limit, and
//! per-client-IP connection and request-rate limits (429).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::*;

#[test]
fn content_length_over_max_body_bytes_is_413_and_never_forwarded() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "[limits]\nmax_body_bytes = 1000\n"));
    let mut c = Client::connect(atlas.addr());
    let r = c.request(format!("POST /small HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n{}", "a".repeat(1000)));
    assert_eq!(r.status, 200, "at the limit is fine");
    let mut c = Client::connect(atlas.addr());
    c.send("POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 413, "{}", r.head);
    assert_eq!(be.request_count(), 1, "the oversized request must not reach the backend");
}

#[test]
fn chunked_body_over_max_body_bytes_is_413() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "[limits]\nmax_body_bytes = 4096\n"));
    let mut c = Client::connect(atlas.addr());
    c.send("POST /chunks HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    let chunk = format!("400\r\n{}\r\n", "b".repeat(0x400));
    for _ in 0..8 {
        if c.try_send(chunk.as_bytes()).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let r = c.read_response();
    assert_eq!(r.status, 413, "{}", r.head);
    assert!(c.is_closed(Duration::from_secs(2)));
}

#[test]
fn upstream_max_conns_without_queue_gives_503_busy() {
    let be = Backend::http(|_| Reply::ok("slow").after(Duration::from_millis(600)));
    let ups = upstreams_toml(&[(be.addr, 1)], None).replace("weight = 1", "weight = 1\nmax_conns = 1");
    let atlas = Atlas::start(&format!("[listen]\naddress = \"127.0.0.1\"\nport = 0\nworkers = 1\n\n{ups}"));
    let addr = atlas.addr();
    let first = thread::spawn(move || Client::connect(addr).get("/1").status);
    thread::sleep(Duration::from_millis(150));
    let r = Client::connect(addr).get("/2");
    assert_eq!(r.status, 503, "{}", r.head);
    assert!(r.text().contains("busy"), "{}", r.text());
    assert_eq!(first.join().unwrap(), 200);
}

#[test]
fn upstream_max_conns_with_queue_timeout_waits_for_a_slot() {
    let be = Backend::http(|_| Reply::ok("slow").after(Duration::from_millis(300)));
    let ups = upstreams_toml(&[(be.addr, 1)], None).replace("weight = 1", "weight = 1\nmax_conns = 1");
    let atlas = Atlas::start(&format!("[listen]\naddress = \"127.0.0.1\"\nport = 0\nworkers = 1\n\n{ups}\n[limits]\nqueue_timeout = \"3s\"\n"));
    let addr = atlas.addr();
    let hs: Vec<_> = (0..3).map(|i| thread::spawn(move || Client::connect(addr).get(&format!("/{i}")).status)).collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), 200);
    }
    assert!(be.connections() >= 1);
}

#[test]
fn listener_max_connections_closes_the_extra_connection() {
    let be = Backend::echo_path();
    let cfg = http_config(&[be.addr], "").replace("workers = 1", "workers = 1\nmax_connections = 2");
    let atlas = Atlas::start(&cfg);
    let mut a = Client::connect(atlas.addr());
    let mut b = Client::connect(atlas.addr());
    assert_eq!(a.get("/a").status, 200);
    assert_eq!(b.get("/b").status, 200);
    let mut c = Client::connect(atlas.addr());
    assert!(c.is_closed(Duration::from_secs(2)), "the third connection must be closed");
    drop(a);
    thread::sleep(Duration::from_millis(200));
    let mut d = Client::connect(atlas.addr());
    assert_eq!(d.get("/d").status, 200, "a slot frees when a connection closes");
}

#[test]
fn per_ip_request_rate_gives_429_with_retry_after() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "[limits]\nper_ip_requests_per_sec = 2\nper_ip_burst = 5\n"));
    let mut c = Client::connect(atlas.addr());
    let statuses: Vec<u16> = (0..10).map(|i| c.get(&format!("/{i}")).status).collect();
    assert_eq!(&statuses[..5], &[200; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|&s| s == 429), "{statuses:?}");
    let r = c.get("/again");
    assert_eq!(r.header("retry-after"), Some("1"));
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(c.get("/later").status, 200, "tokens refill at the configured rate");
    assert_eq!(be.request_count(), 6);
}

#[test]
fn per_ip_connection_limit_closes_extra_connections_in_tcp_mode() {
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = echo.local_addr().unwrap();
    thread::spawn(move || {
        for s in echo.incoming().flatten() {
            thread::spawn(move || echo_stream(s));
        }
    });
    let atlas = Atlas::start(&tcp_config(&[addr], "[limits]\nper_ip_connections = 2\n"));
    let open = |n: u8| {
        let mut s = TcpStream::connect(atlas.addr()).unwrap();
        set_timeouts(&s, Duration::from_secs(2));
        let _ = s.write_all(&[n]);
        let mut b = [0u8; 1];
        s.read(&mut b).map(|got| (s, got == 1 && b[0] == n))
    };
    let (_a, ok_a) = open(1).unwrap();
    let (_b, ok_b) = open(2).unwrap();
    assert!(ok_a && ok_b);
    if let Ok((_, echoed)) = open(3) {
        assert!(!echoed, "a third connection from the same IP must be closed");
    }
}

fn echo_stream(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

#[test]
fn worker_max_connections_closes_connections_beyond_it() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "[limits]\nmax_connections = 2\n"));
    let mut a = Client::connect(atlas.addr());
    let mut b = Client::connect(atlas.addr());
    assert_eq!(a.get("/a").status, 200);
    assert_eq!(b.get("/b").status, 200);
    let mut c = Client::connect(atlas.addr());
    assert!(c.is_closed(Duration::from_secs(2)), "a connection beyond the worker limit must be closed");
    assert_eq!(a.get("/a2").status, 200, "existing connections are unaffected");
}

#[test]
fn per_ip_connection_limit_closes_extra_http_connections() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "[limits]\nper_ip_connections = 1\n"));
    let mut a = Client::connect(atlas.addr());
    assert_eq!(a.get("/a").status, 200);
    let mut b = Client::connect(atlas.addr());
    assert!(b.is_closed(Duration::from_secs(2)));
    drop(a);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(Client::connect(atlas.addr()).get("/c").status, 200);
}
