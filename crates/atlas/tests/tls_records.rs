//! The TLS record layer after the handshake (crates/atlas-proxy/src/tls_stream.rs):
//! - a client's key update (with "update requested") is taken, and the
//!   server's own goes out in front of the next response, on TLS 1.3;
//! - a forged record after the handshake (record tampering) gets an alert
//!   and a close, and the process keeps serving;
//! - an idle keep-alive connection over TLS is closed at once by a drain;
//! - a request spread over many small records, and one record split over
//!   many TCP writes, are both served.
//!
//! Clients are rustls, driven by hand where the test needs to control the
//! bytes on the wire.

mod common;
#[path = "support/tls.rs"]
mod tls_support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use tls_support::*;

struct Setup {
    atlas: Atlas,
    ca: Ca,
    _dir: TempDir,
    _be: Backend,
}

fn start(extra: &str) -> Setup {
    let ca = Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let (cert, key) = ca.leaf(&["localhost"], "localhost", &rcgen::PKCS_ECDSA_P256_SHA256).write(&dir, "default");
    let be = Backend::echo_path();
    let atlas = Atlas::start(&tls_config("http", &[be.addr], &tls_section(&cert, &key, &[]), extra));
    Setup { atlas, ca, _dir: dir, _be: be }
}

fn connect(s: &Setup, ver: Ver) -> Client<Tls> {
    Client::over(tls_connect(s.atlas.addr(), "localhost", &ClientOpts { ca: Some(&s.ca), ver, ..Default::default() }).expect("handshake"))
}

#[test]
fn a_client_key_update_is_answered_before_the_next_response() {
    let s = start("");
    let mut c = connect(&s, Ver::V13);
    assert_eq!(c.get("/before").text(), "/before");
    // rustls sends KeyUpdate(update_requested): the server must switch its
    // receiving keys, and send its own KeyUpdate before anything encrypted
    // with its new sending keys (rustls queues it in front of the next
    // record the stream encrypts). Had it been lost or sent late, this
    // client could not decrypt the response.
    for round in 0..3 {
        c.stream.conn.refresh_traffic_keys().expect("queue a key update");
        let path = format!("/after-{round}");
        assert_eq!(c.get(&path).text(), path, "request {round} after a key update");
    }
}

#[test]
fn a_forged_record_after_the_handshake_gets_an_alert_and_a_close() {
    let s = start("");
    for ver in [Ver::V13, Ver::V12] {
        let mut c = connect(&s, ver);
        assert_eq!(c.get("/ok").text(), "/ok");
        // An application-data record whose bytes are not the client's: the
        // AEAD check fails (bad_record_mac).
        let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x40];
        forged.extend((0..0x40u32).map(|i| (i * 37 + 11) as u8));
        c.stream.sock.write_all(&forged).unwrap();
        let mut got = Vec::new();
        let mut tmp = [0u8; 1024];
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(Instant::now() < deadline, "{ver:?}: connection still open 5 s after a forged record");
            match c.stream.sock.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{ver:?}: reading after the forged record: {e}"),
            }
        }
        // What came back, decrypted by the client: the server's alert.
        let mut rd = &got[..];
        while !rd.is_empty() {
            c.stream.conn.read_tls(&mut rd).unwrap();
        }
        let err = c.stream.conn.process_new_packets().expect_err("the server must answer a forged record with an alert");
        assert!(format!("{err:?}").contains("BadRecordMac"), "{ver:?}: alert {err:?}");
    }
    // The process is fine.
    let mut c = connect(&s, Ver::V13);
    assert_eq!(c.get("/still").text(), "/still");
}

#[test]
fn an_idle_tls_keepalive_connection_is_closed_at_once_by_a_drain() {
    let mut s = start("[runtime]\ndrain_timeout = \"20s\"\n");
    let mut idle = connect(&s, Ver::V13);
    assert_eq!(idle.get("/x").text(), "/x");
    let t = Instant::now();
    s.atlas.signal("TERM");
    let status = s.atlas.wait_exit(Duration::from_secs(3)).unwrap_or_else(|| panic!("still running 3 s after SIGTERM with only an idle TLS connection"));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?} (drain_timeout is 20 s)", t.elapsed());
    // The server closed the connection: end of stream (with or without
    // close_notify), not a response.
    idle.stream.sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut tmp = [0u8; 256];
    let n = idle.stream.read(&mut tmp).unwrap_or(0);
    assert_eq!(n, 0, "bytes on an idle TLS connection during the drain");
}

#[test]
fn a_request_in_many_small_records_and_a_record_in_many_writes_are_served() {
    let s = start("");
    // One record per byte of the request.
    let mut c = connect(&s, Ver::V13);
    let req = get_req("/tiny-records");
    for b in req.as_bytes() {
        c.stream.conn.writer().write_all(std::slice::from_ref(b)).unwrap();
        let mut out = Vec::new();
        while c.stream.conn.wants_write() {
            c.stream.conn.write_tls(&mut out).unwrap();
        }
        c.stream.sock.write_all(&out).unwrap();
    }
    assert_eq!(c.read_response().text(), "/tiny-records");

    // One record, its bytes sent a few at a time.
    let mut c = connect(&s, Ver::V13);
    c.stream.conn.writer().write_all(get_req("/split-record").as_bytes()).unwrap();
    let mut out = Vec::new();
    while c.stream.conn.wants_write() {
        c.stream.conn.write_tls(&mut out).unwrap();
    }
    for part in out.chunks(7) {
        c.stream.sock.write_all(part).unwrap();
        c.stream.sock.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(c.read_response().text(), "/split-record");
}
