//! How Atlas runs server-side TLS handshakes (crates/atlas-proxy/src/handshake.rs):
//! - a burst of new handshakes does not hold back requests on connections
//!   that are already open;
//! - a client that stalls mid-handshake (slowloris on the handshake) holds
//!   nothing that others wait for;
//! - a ClientHello split over several reads still completes;
//! - a reply too large to write under the pacing permit (a long
//!   certificate) still completes;
//! - a request sent in the same write as the client's Finished is served.
//!
//! Clients are rustls, driven by hand where the test needs to control which
//! bytes go out when.

mod common;
#[path = "support/tls.rs"]
mod tls_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection};
use rustls_pki_types::ServerName;

use common::*;
use tls_support::*;

/// A one-worker static TLS listener serving `/a.txt`, with a long header
/// timeout so that a stalled handshake is not cut short while a test runs.
fn start() -> (Atlas, Ca, TempDir, TempDir) {
    start_with_names(&["localhost".to_string()])
}

fn start_with_names(names: &[String]) -> (Atlas, Ca, TempDir, TempDir) {
    let ca = Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let root = TempDir::new();
    root.write("a.txt", "served");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (cert, key) = ca.leaf(&names, "localhost", &rcgen::PKCS_ECDSA_P256_SHA256).write(&dir, "default");
    let cfg = format!(
        "[listen]\naddress = \"127.0.0.1\"\nport = 0\nmode = \"static\"\nworkers = 1\nroot = {:?}\n\n{}\n[timeouts]\nclient_header = \"60s\"\n",
        path_of(root.path()),
        tls_section(&cert, &key, &[])
    );
    (Atlas::start(&cfg), ca, dir, root)
}

fn name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// A TCP connection with a rustls client whose ClientHello is ready but not sent.
fn unsent_hello(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> (TcpStream, ClientConnection, Vec<u8>) {
    let tcp = TcpStream::connect(addr).expect("connect");
    set_timeouts(&tcp, IO_TIMEOUT);
    let _ = tcp.set_nodelay(true);
    let mut conn = ClientConnection::new(cfg.clone(), name()).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    (tcp, conn, hello)
}

/// Finishes a handshake whose ClientHello has been sent, then GETs /a.txt.
fn finish_and_get(mut tcp: TcpStream, mut conn: ClientConnection) -> Response {
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("handshake");
    }
    let mut c = Client::over(rustls::StreamOwned::new(conn, tcp));
    c.get("/a.txt")
}

fn answered(tcp: &TcpStream) -> bool {
    tcp.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let got = matches!(tcp.peek(&mut b), Ok(n) if n > 0);
    tcp.set_nonblocking(false).unwrap();
    got
}

#[test]
fn a_burst_of_handshakes_does_not_hold_back_requests_on_open_connections() {
    const BURST: usize = 200;
    let (atlas, ca, _dir, _root) = start();
    let addr = atlas.addr();
    let opts = ClientOpts { ca: Some(&ca), ..Default::default() };
    let mut open = Client::over(tls_connect(addr, "localhost", &opts).expect("handshake"));
    assert_eq!(open.get("/a.txt").text(), "served");

    let cfg = client_config(&opts);
    let mut burst: Vec<_> = (0..BURST).map(|_| unsent_hello(addr, &cfg)).collect();
    // Let the worker accept them all: each then waits for its hello.
    thread::sleep(Duration::from_millis(300));
    for (tcp, _, hello) in burst.iter_mut() {
        tcp.write_all(hello).unwrap();
    }
    // Every hello is now in the worker's sockets ahead of this request.
    open.send(get_req("/a.txt"));
    let r = open.read_response();
    let done = burst.iter().filter(|(tcp, _, _)| answered(tcp)).count();
    assert_eq!(r.text(), "served");
    eprintln!("handshakes answered before the open connection's request: {done} of {BURST}");
    // In plain FIFO order the request waits for all of them; the gate lets
    // it through after about one.
    assert!(done < BURST / 2, "{done} of {BURST} new handshakes were served before a request on an open connection");

    // And none of the handshakes was dropped.
    for (i, (tcp, conn, _)) in burst.into_iter().enumerate() {
        let r = finish_and_get(tcp, conn);
        assert_eq!(r.text(), "served", "connection {i} of the burst");
    }
}

#[test]
fn slowloris_on_the_handshake_holds_back_no_other_handshake() {
    let (atlas, ca, _dir, _root) = start();
    let addr = atlas.addr();
    let cfg = client_config(&ClientOpts { ca: Some(&ca), ..Default::default() });
    // Fifty clients send a third of their ClientHello and stall.
    let stalled: Vec<_> = (0..50)
        .map(|_| {
            let (mut tcp, _conn, hello) = unsent_hello(addr, &cfg);
            tcp.write_all(&hello[..hello.len() / 3]).unwrap();
            tcp
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    // Others still get through at once, well within the 60 s header timeout.
    let started = Instant::now();
    for i in 0..5 {
        let (mut tcp, conn, hello) = unsent_hello(addr, &cfg);
        tcp.write_all(&hello).unwrap();
        assert_eq!(finish_and_get(tcp, conn).text(), "served", "client {i} behind the stalled handshakes");
    }
    assert!(started.elapsed() < Duration::from_secs(3), "five handshakes took {:?} behind stalled ones", started.elapsed());
    // The stalled ones are still open, waiting (their timeout is 60 s).
    for mut tcp in stalled {
        tcp.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut b = [0u8; 1];
        let r = tcp.read(&mut b);
        assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut), "{r:?}");
    }
}

#[test]
fn a_client_hello_split_over_several_writes_completes() {
    let (atlas, ca, _dir, _root) = start();
    let cfg = client_config(&ClientOpts { ca: Some(&ca), ..Default::default() });
    let (mut tcp, conn, hello) = unsent_hello(atlas.addr(), &cfg);
    for part in hello.chunks(hello.len() / 4 + 1) {
        tcp.write_all(part).unwrap();
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(finish_and_get(tcp, conn).text(), "served");
}

#[test]
fn a_request_sent_with_the_client_finished_is_served() {
    let (atlas, ca, _dir, _root) = start();
    for ver in [Ver::V13, Ver::V12] {
        let cfg = client_config(&ClientOpts { ca: Some(&ca), ver, ..Default::default() });
        let (mut tcp, mut conn, hello) = unsent_hello(atlas.addr(), &cfg);
        tcp.write_all(&hello).unwrap();
        // Read the server's flight(s) until the client has its last
        // handshake message to send, without sending it yet.
        loop {
            conn.read_tls(&mut tcp).expect("read server flight");
            conn.process_new_packets().expect("server flight");
            if !conn.is_handshaking() || conn.wants_write() {
                break;
            }
        }
        if ver == Ver::V12 {
            // TLS 1.2: ClientKeyExchange..Finished go first; the request
            // follows the server's Finished.
            conn.complete_io(&mut tcp).expect("handshake");
        }
        // Queue the request behind the client's Finished: one write.
        conn.writer().write_all(get_req("/a.txt").as_bytes()).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        tcp.write_all(&out).unwrap();
        let mut c = Client::over(rustls::StreamOwned::new(conn, tcp));
        let r = c.read_response();
        assert_eq!(r.text(), "served", "{ver:?}");
    }
}

#[test]
fn a_certificate_too_large_to_write_under_the_permit_still_completes() {
    // About 16 KiB of names: the server's first flight is over the 8 KiB
    // that is written while the pacing permit is held.
    let mut names: Vec<String> = (0..600).map(|i| format!("host-{i:04}.example.test")).collect();
    names.push("localhost".into());
    let (atlas, ca, _dir, _root) = start_with_names(&names);
    let opts = ClientOpts { ca: Some(&ca), ..Default::default() };
    let t = tls_connect(atlas.addr(), "localhost", &opts).expect("handshake with a long certificate");
    let cert_len = peer_leaf(&t).len();
    assert!(cert_len > 12 * 1024, "the certificate is only {cert_len} bytes");
    let mut c = Client::over(t);
    assert_eq!(c.get("/a.txt").text(), "served");
}
