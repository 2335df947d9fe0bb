//! Slowloris and slow-body clients are cut at their timeouts while a normal
//! client keeps being served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn many_slow_header_and_slow_body_clients_are_cut_while_a_normal_client_is_served() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "[timeouts]\nclient_header = \"600ms\"\nclient_body = \"600ms\"\n"));
    let addr = atlas.addr();
    let start = Instant::now();
    let mut slow = Vec::new();
    for i in 0..60 {
        slow.push(thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            set_timeouts(&s, Duration::from_secs(5));
            let (head, drip): (String, &[u8]) = if i % 2 == 0 {
                // Slowloris: a head that never ends.
                ("GET / HTTP/1.1\r\nHost: h\r\n".to_string(), b"X-a: b\r\n")
            } else {
                // Slow body: the head is fine, the body trickles.
                ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n".to_string(), b"z")
            };
            let _ = s.write_all(head.as_bytes());
            let t0 = Instant::now();
            // Drip more slowly than the timeout allows, until Atlas hangs up.
            while t0.elapsed() < Duration::from_secs(4) {
                thread::sleep(Duration::from_millis(700));
                if s.write_all(drip).is_err() {
                    break;
                }
            }
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            t0.elapsed()
        }));
    }
    // Meanwhile a normal client is served promptly, again and again.
    let mut c = Client::connect(addr);
    for i in 0..20 {
        let t = Instant::now();
        assert_eq!(c.get(&format!("/normal{i}")).status, 200);
        assert!(t.elapsed() < Duration::from_millis(300), "a normal request took {:?}", t.elapsed());
        thread::sleep(Duration::from_millis(50));
    }
    for h in slow {
        let took = h.join().unwrap();
        assert!(took < Duration::from_millis(3000), "a slow client was kept for {took:?}");
    }
    assert!(start.elapsed() < Duration::from_secs(8));
    assert!(be.requests().iter().all(|r| r.target.starts_with("/normal") || r.method == "POST"), "slow headers must never reach the backend");
}

#[test]
fn a_body_that_stops_coming_is_answered_408() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "[timeouts]\nclient_body = \"300ms\"\n"));
    let mut c = Client::connect(atlas.addr());
    let t = Instant::now();
    c.send("POST /stalled HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc");
    let r = c.read_response();
    assert_eq!(r.status, 408, "got\n{}", r.head);
    assert!(r.has_token("connection", "close"), "{}", r.head);
    assert!(t.elapsed() < Duration::from_secs(2), "answered after {:?} (client_body is 300 ms)", t.elapsed());
    assert!(c.is_closed(Duration::from_secs(2)), "the connection must close after a stalled body");
}
