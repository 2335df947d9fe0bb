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

#[test]
fn client_idle_timeout_closes_an_idle_keepalive_connection() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "[timeouts]\nclient_idle = \"300ms\"\n"));
    let mut c = Client::connect(atlas.addr());
    assert_eq!(c.get("/once").status, 200);
    let t = Instant::now();
    assert!(c.is_closed(Duration::from_secs(3)));
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(200) && took < Duration::from_millis(1500), "closed after {took:?}, want ~300ms");
}

#[test]
fn upstream_idle_timeout_cuts_a_stalled_response_body() {
    let be = Backend::raw(|mut s| {
        use std::io::Write;
        let mut buf = Vec::new();
        let _ = read_head(&mut s, &mut buf);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part");
        thread::sleep(Duration::from_secs(5));
    });
    let atlas = Atlas::start(&http_config(&[be.addr], "[timeouts]\nupstream_idle = \"300ms\"\n"));
    let mut c = Client::connect(atlas.addr());
    c.send(get_req("/stall"));
    let t = Instant::now();
    assert!(c.is_closed(Duration::from_secs(3)), "a stalled body must be cut");
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1500), "cut after {took:?}, want ~300ms");
}

#[test]
fn connect_timeout_gives_504() {
    // A listener that never accepts, with its queue full: further SYNs are
    // dropped, so a connect hangs until Atlas' connect timeout.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    let atlas = Atlas::start(&http_config(&[addr], "[timeouts]\nconnect = \"300ms\"\n[health]\nmax_fails = 0\n"));
    let mut c = Client::connect(atlas.addr());
    let t = Instant::now();
    let r = c.get("/");
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{}", r.head);
    assert!(took >= Duration::from_millis(250) && took < Duration::from_millis(2000), "504 after {took:?}, want ~300ms");
    drop(sock);
}

#[test]
fn tcp_idle_timeout_closes_a_quiet_tcp_connection() {
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = echo.local_addr().unwrap();
    thread::spawn(move || {
        for s in echo.incoming().flatten() {
            thread::spawn(move || {
                let mut s = s;
                let mut b = [0u8; 64];
                use std::io::{Read, Write};
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let atlas = Atlas::start(&tcp_config(&[addr], "[timeouts]\ntcp_idle = \"300ms\"\n"));
    let mut s = std::net::TcpStream::connect(atlas.addr()).unwrap();
    set_timeouts(&s, Duration::from_secs(3));
    use std::io::{Read, Write};
    s.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).unwrap();
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1500), "a quiet TCP connection was kept {took:?}, want ~300ms");
}
