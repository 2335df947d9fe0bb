//! The same data paths on both I/O drivers: `auto` normally picks io_uring,
//! so without these the epoll driver would go untested. Each run checks the
//! log line naming the driver, keep-alive reuse, a streamed body both ways,
//! the same over TLS, and TCP mode with half-close.

mod common;
#[path = "support/tls.rs"]
mod tls_support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::*;

fn exercise(driver: &str) {
    let be = Backend::http(|req| Reply::ok(format!("{} {} {}", req.method, req.target, req.body.len())));
    let atlas = Atlas::start(&http_config(&[be.addr], &format!("[runtime]\ndriver = \"{driver}\"\n")));
    assert!(atlas.logs().contains(&format!("driver=\"{driver}\"")), "driver not logged:\n{}", atlas.logs());

    let mut c = Client::connect(atlas.addr());
    for i in 0..20 {
        assert_eq!(c.get(&format!("/k{i}")).text(), format!("GET /k{i} 0"));
    }
    assert_eq!(be.connections(), 1, "keep-alive reuse on {driver}");
    let body = pattern(3 << 20, 9);
    let r = c.request([format!("PUT /big HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), &body[..]].concat());
    assert_eq!(r.text(), format!("PUT /big {}", body.len()));

    // The same over TLS: the TLS stream's reads and writes on this driver.
    let ca = tls_support::Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let (cert, key) = ca.leaf(&["localhost"], "localhost", &rcgen::PKCS_ECDSA_P256_SHA256).write(&dir, "default");
    let tls_section = tls_support::tls_section(&cert, &key, &[]);
    let tls = Atlas::start(&tls_support::tls_config("http", &[be.addr], &tls_section, &format!("[runtime]\ndriver = \"{driver}\"\n")));
    let opts = tls_support::ClientOpts { ca: Some(&ca), ..Default::default() };
    let mut t = Client::over(tls_support::tls_connect(tls.addr(), "localhost", &opts).expect("TLS handshake"));
    for i in 0..5 {
        assert_eq!(t.get(&format!("/t{i}")).text(), format!("GET /t{i} 0"), "over TLS on {driver}");
    }
    let r = t.request([format!("PUT /big-tls HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), &body[..]].concat());
    assert_eq!(r.text(), format!("PUT /big-tls {}", body.len()), "3 MiB body over TLS on {driver}");

    // TCP mode with half-close on the same driver.
    let echo_be = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo_be.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = echo_be.accept() {
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all);
            let _ = s.write_all(format!("got {}", all.len()).as_bytes());
        }
    });
    let tcp = Atlas::start(&tcp_config(&[echo_addr], &format!("[runtime]\ndriver = \"{driver}\"\n")));
    let mut s = TcpStream::connect(tcp.addr()).unwrap();
    set_timeouts(&s, Duration::from_secs(5));
    s.write_all(&pattern(100_000, 3)).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "got 100000");
}

#[test]
fn epoll_driver_serves_http_and_tcp() {
    exercise("epoll");
}

#[test]
fn io_uring_driver_serves_http_and_tcp() {
    if !std::path::Path::new("/proc/sys/kernel/io_uring_disabled").exists()
        || std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|v| v.trim() == "0")
    {
        exercise("io_uring");
    } else {
        eprintln!("io_uring disabled by sysctl on this machine: skipped");
    }
}
