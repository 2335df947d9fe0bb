//! Requests Atlas must refuse itself (400/501/431/408) without ever
//! reaching the upstream, and the slowloris header timeout.

mod common;

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Sends `raw` in one write on a fresh connection and checks that Atlas
/// answers `status`, closes the connection, and that the backend received
/// nothing but a later marker request.
fn assert_refused(raw: &str, status: u16, extra_config: &str) {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], extra_config));
    let mut c = Client::connect(atlas.addr());
    c.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.send(raw);
    let r = c.try_read_response(false).unwrap_or_else(|e| panic!("no response to {raw:?}: {e}"));
    assert_eq!(r.status, status, "request {raw:?} got:\n{}\n{}", r.head, r.text());
    assert!(c.is_closed(Duration::from_secs(2)), "connection left open after {status} for {raw:?}");

    // Atlas still serves, and the refused request never reached the backend.
    let m = http_get(atlas.addr(), "/marker");
    assert_eq!(m.status, 200);
    let targets: Vec<String> = be.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, vec!["/marker"], "the backend saw more than the marker request");
    let bytes = be.raw_bytes();
    assert!(bytes.starts_with(b"GET /marker "), "backend received bytes of the refused request: {}", show(&bytes));
    assert_eq!(be.connections(), 1, "the refused request opened an upstream connection");
}

#[test]
fn content_length_with_transfer_encoding_is_400() {
    assert_refused("POST /smuggle HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "");
}

#[test]
fn two_different_content_lengths_is_400() {
    assert_refused("POST /cl HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400, "");
}

#[test]
fn invalid_chunk_size_is_400() {
    assert_refused("POST /chunk HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400, "");
}

#[test]
fn obs_fold_header_is_400() {
    assert_refused("GET /fold HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n  continued\r\n\r\n", 400, "");
}

#[test]
fn whitespace_between_header_name_and_colon_is_400() {
    assert_refused("GET /ws HTTP/1.1\r\nHost : h\r\n\r\n", 400, "");
}

#[test]
fn http09_request_line_is_400() {
    assert_refused("GET /\r\n\r\n", 400, "");
}

#[test]
fn request_line_without_target_is_400() {
    assert_refused("GET\r\nHost: h\r\n\r\n", 400, "");
}

#[test]
fn invalid_method_token_is_400() {
    assert_refused("G@T / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "");
}

#[test]
fn missing_host_in_http11_is_400() {
    assert_refused("GET /nohost HTTP/1.1\r\nAccept: */*\r\n\r\n", 400, "");
}

#[test]
fn transfer_encoding_xchunked_is_501() {
    assert_refused("POST /te HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 501, "");
}

#[test]
fn transfer_encoding_gzip_is_501() {
    assert_refused("POST /te HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\nabc", 501, "");
}

#[test]
fn head_larger_than_max_header_bytes_is_431() {
    let limits = "[limits]\nmax_header_bytes = 2048\n";
    // Control: a head under the limit passes.
    {
        let be = Backend::echo_path();
        let atlas = Atlas::start(&http_config(&[be.addr], limits));
        let r = one_shot(atlas.addr(), format!("GET /small HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\n\r\n", "a".repeat(1000)));
        assert_eq!(r.status, 200, "a 1 KiB head must pass a 2048-byte limit:\n{}", r.head);
    }
    assert_refused(&format!("GET /big HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\n\r\n", "a".repeat(4096)), 431, limits);
}

#[test]
fn more_headers_than_max_headers_is_431() {
    let limits = "[limits]\nmax_headers = 20\n";
    let headers = |n: usize| (0..n).map(|i| format!("X-H{i}: v{i}\r\n")).collect::<String>();
    {
        let be = Backend::echo_path();
        let atlas = Atlas::start(&http_config(&[be.addr], limits));
        let r = one_shot(atlas.addr(), format!("GET /few HTTP/1.1\r\nHost: h\r\n{}\r\n", headers(10)));
        assert_eq!(r.status, 200, "11 headers must pass max_headers = 20:\n{}", r.head);
    }
    assert_refused(&format!("GET /many HTTP/1.1\r\nHost: h\r\n{}\r\n", headers(40)), 431, limits);
}

#[test]
fn too_many_headers_under_default_limit_is_431() {
    let headers: String = (0..150).map(|i| format!("X-{i}: {i}\r\n")).collect();
    assert_refused(&format!("GET /many HTTP/1.1\r\nHost: h\r\n{headers}\r\n"), 431, "");
}

// ---------------------------------------------------------------------------
// 9. Slowloris
// ---------------------------------------------------------------------------

#[test]
fn slowloris_client_gets_408_and_is_closed_while_others_are_served() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "[timeouts]\nclient_header = \"500ms\"\n"));
    let addr = atlas.addr();

    let slow = thread::spawn(move || {
        let mut c = Client::connect(addr);
        let start = Instant::now();
        c.send("GET /slow HTTP/1.1\r\nHost: h\r\nX-Slow: ");
        // One header byte every 100 ms from a second handle, until the
        // connection breaks or 3 s pass.
        let mut w = c.stream.try_clone().unwrap();
        let dripper = thread::spawn(move || {
            for _ in 0..30 {
                thread::sleep(Duration::from_millis(100));
                if w.write_all(b"a").is_err() {
                    break;
                }
            }
        });
        c.stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let raw = c.read_to_close();
        let closed_after = start.elapsed();
        let _ = dripper.join();
        (raw, closed_after)
    });

    // Meanwhile a normal client is served promptly.
    thread::sleep(Duration::from_millis(150));
    let mut c = Client::connect(addr);
    for i in 0..3 {
        let t = Instant::now();
        let r = c.get(&format!("/normal{i}"));
        assert_eq!(r.text(), format!("/normal{i}"));
        assert!(t.elapsed() < Duration::from_millis(400), "normal request took {:?} during slowloris", t.elapsed());
    }
    assert!(!slow.is_finished(), "the slow client was cut off before 500 ms");

    let (raw, closed_after) = slow.join().unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 408") || raw.starts_with(b"HTTP/1.0 408"), "slow client got: {}", show(&raw));
    assert!(closed_after < Duration::from_millis(1500), "slow client closed only after {closed_after:?}");
    assert!(closed_after >= Duration::from_millis(450), "408 came too early ({closed_after:?}) for client_header = 500ms");
    assert!(be.requests().iter().all(|r| r.target != "/slow"), "the incomplete request reached the backend");
}
