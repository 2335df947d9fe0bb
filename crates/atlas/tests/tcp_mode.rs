//! Layer-4 mode (`mode = "tcp"`) and several listeners in one config.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use common::*;

#[test]
fn tcp_mode_relays_bytes_both_ways() {
    let be = Backend::raw(echo);
    let atlas = Atlas::start(&tcp_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    c.send("hello\n");
    assert_eq!(c.read_exact_bytes(6), b"hello\n");
    c.send("not http at all \x00\x01\x02");
    assert_eq!(c.read_exact_bytes(19), b"not http at all \x00\x01\x02");

    // 2 MiB in while reading it back.
    let data = pattern(2 * 1024 * 1024, 11);
    let mut w = c.stream.try_clone().unwrap();
    let d2 = data.clone();
    let writer = thread::spawn(move || w.write_all(&d2).and_then(|_| w.shutdown(Shutdown::Write)));
    let back = c.read_exact_bytes(data.len());
    writer.join().unwrap().expect("client write");
    assert!(back == data, "echoed bytes differ (fnv {:x} vs {:x})", fnv64(&back), fnv64(&data));
    // Client EOF -> echo backend EOF -> backend closes -> client EOF.
    assert!(c.is_closed(Duration::from_secs(3)), "connection not closed after both sides finished");
    assert_eq!(be.connections(), 1);
}

/// Small reads are copied, reads that fill the buffer switch the direction
/// to splice and a short splice switches it back: bytes must come out in
/// order across every switch, in both directions.
#[test]
fn tcp_mode_keeps_byte_order_across_copy_and_splice_switches() {
    let be = Backend::raw(echo);
    let atlas = Atlas::start(&tcp_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    for round in 0..3u8 {
        for i in 0..20u8 {
            let msg = format!("small {round} {i}\n");
            c.send(&msg);
            assert_eq!(c.read_exact_bytes(msg.len()), msg.as_bytes(), "round {round}: small message {i} garbled");
        }
        let data = pattern(3 * 1024 * 1024 + 777, 7 + round as u64);
        let mut w = c.stream.try_clone().unwrap();
        let d2 = data.clone();
        let writer = thread::spawn(move || w.write_all(&d2));
        let back = c.read_exact_bytes(data.len());
        writer.join().unwrap().expect("client write");
        assert!(back == data, "round {round}: bulk bytes differ (fnv {:x} vs {:x})", fnv64(&back), fnv64(&data));
    }
    c.send("last\n");
    assert_eq!(c.read_exact_bytes(5), b"last\n", "a small message after the bulk rounds was lost");
}

#[test]
fn tcp_half_close_lets_backend_reply_after_client_eof() {
    // Reads everything until EOF, only then answers and closes.
    let be = Backend::raw(|mut s| {
        let mut all = Vec::new();
        if s.read_to_end(&mut all).is_ok() {
            let _ = s.write_all(format!("got {} bytes {:016x}", all.len(), fnv64(&all)).as_bytes());
        }
        let _ = s.shutdown(Shutdown::Both);
    });
    let atlas = Atlas::start(&tcp_config(&[be.addr], ""));
    let data = pattern(300_000, 42);
    let mut c = Client::connect(atlas.addr());
    c.send(&data);
    c.stream.shutdown(Shutdown::Write).unwrap();
    let reply = c.read_to_close();
    assert_eq!(
        String::from_utf8_lossy(&reply),
        format!("got {} bytes {:016x}", data.len(), fnv64(&data)),
        "the reply sent after the client's half-close was lost or wrong"
    );
}

#[test]
fn tcp_upstream_refusing_closes_client_connection() {
    let atlas = Atlas::start(&tcp_config(&[refused_addr()], "[timeouts]\nconnect = \"1s\"\n"));
    let mut c = Client::connect(atlas.addr());
    let _ = c.stream.write_all(b"anyone there?");
    assert!(c.is_closed(Duration::from_secs(3)), "client connection left open although the only upstream refuses");
    assert!(c.buf.is_empty(), "unexpected bytes: {}", show(&c.buf));
}

#[test]
fn tcp_mode_balances_connections_round_robin() {
    let greeter = |name: &'static str| {
        Backend::raw(move |mut s| {
            let _ = s.write_all(name.as_bytes());
            echo(s);
        })
    };
    let (a, b) = (greeter("A"), greeter("B"));
    let atlas = Atlas::start(&tcp_config(&[a.addr, b.addr], "[routing]\nstrategy = \"round_robin\"\n"));
    let mut names = Vec::new();
    for _ in 0..6 {
        let mut c = Client::connect(atlas.addr());
        names.push(String::from_utf8(c.read_exact_bytes(1)).unwrap());
    }
    assert_eq!(names.iter().filter(|n| *n == "A").count(), 3, "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "B").count(), 3, "{names:?}");
}

#[test]
fn http_and_tcp_listeners_in_one_config_use_their_own_groups() {
    let web = Backend::fixed("from-web");
    let raw = Backend::raw(echo);
    let cfg = format!(
        "[runtime]\nworkers = 1\n\n\
         [[listeners]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 0\nmode = \"http\"\ngroup = \"web\"\n\n\
         [[listeners]]\nname = \"raw\"\naddress = \"127.0.0.1\"\nport = 0\nmode = \"tcp\"\ngroup = \"raw\"\n\n\
         {}{}",
        upstreams_toml(&[(web.addr, 1)], Some("web")),
        upstreams_toml(&[(raw.addr, 1)], Some("raw")),
    );
    let atlas = Atlas::start_n(&cfg, 2);
    assert_ne!(atlas.listeners[0], atlas.listeners[1]);
    let (http_addr, tcp_addr) = (atlas.listeners[0], atlas.listeners[1]);

    for i in 0..3 {
        let r = http_get(http_addr, &format!("/w{i}"));
        assert_eq!((r.status, r.text().as_str()), (200, "from-web"));
    }
    let mut c = Client::connect(tcp_addr);
    let req = b"GET /looks-like-http HTTP/1.1\r\nHost: h\r\n\r\n";
    c.send(req);
    assert_eq!(c.read_exact_bytes(req.len()), req, "tcp listener must relay bytes verbatim to its group");

    assert_eq!(web.request_count(), 3);
    assert!(web.requests().iter().all(|r| r.target.starts_with("/w")), "tcp bytes reached the web group");
    assert_eq!(raw.connections(), 1, "http requests reached the raw group");
}
