//! Security regression tests, one per request-smuggling / parsing attack.
//! Each sends the attack, then a marker request on the same connection, and
//! checks that the backend never sees a different message boundary than
//! Atlas did: either Atlas refuses the attack (and closes, so nothing after
//! it is interpreted), or it normalises it and the backend sees exactly the
//! request Atlas parsed followed by the marker as a separate request.

mod common;

use std::time::Duration;

use common::*;

const MARKER: &str = "GET /marker HTTP/1.1\r\nHost: h\r\n\r\n";

/// The attack is refused with `status`, the connection closes, and the
/// backend receives nothing at all (not the attack, not the marker).
fn refused(attack: &str, status: u16) {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "[limits]\nmax_header_bytes = 8192\n"));
    let mut c = Client::connect(atlas.addr());
    let _ = c.try_send(format!("{attack}{MARKER}").as_bytes());
    let r = c.read_response();
    assert_eq!(r.status, status, "attack {attack:?} got\n{}", r.head);
    assert!(c.is_closed(Duration::from_secs(2)), "the connection must close after a refused attack");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(be.request_count(), 0, "the backend saw: {}", show(&be.raw_bytes()));
}

/// The attack is normalised: the backend sees one request with `body`
/// framed unambiguously, then the marker as its own request.
fn normalised(attack: &str, path: &str, body: &[u8]) {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    c.send(format!("{attack}{MARKER}"));
    let first = c.read_response();
    assert_eq!(first.status, 200, "{}", first.head);
    let second = c.read_response();
    assert_eq!(second.status, 200, "{}", second.head);
    let reqs = be.requests();
    assert_eq!(reqs.len(), 2, "backend saw: {}", show(&be.raw_bytes()));
    assert_eq!(reqs[0].target, path);
    assert_eq!(reqs[0].body, body);
    assert!(!(reqs[0].has_header("content-length") && reqs[0].has_header("transfer-encoding")), "{}", reqs[0].head);
    assert!(reqs[0].header_all("content-length").len() <= 1 && reqs[0].header_all("transfer-encoding").len() <= 1, "{}", reqs[0].head);
    assert_eq!(reqs[1].target, "/marker");
}

#[test]
fn cl_te_content_length_then_transfer_encoding() {
    refused("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", 400);
}

#[test]
fn te_cl_transfer_encoding_then_content_length() {
    refused("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", 400);
}

#[test]
fn te_te_xchunked() {
    refused("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501);
}

#[test]
fn te_te_chunked_then_identity() {
    refused("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 501);
}

#[test]
fn te_te_two_transfer_encoding_headers() {
    refused("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n", 501);
}

#[test]
fn te_te_tab_and_case_are_normalised() {
    normalised("POST /tab HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\tChUnKeD \r\n\r\n3\r\nabc\r\n0\r\n\r\n", "/tab", b"abc");
}

#[test]
fn te_with_space_before_colon() {
    refused("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400);
}

#[test]
fn duplicate_content_length_differing() {
    refused("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", 400);
}

#[test]
fn duplicate_content_length_identical_is_normalised() {
    normalised("POST /dup HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", "/dup", b"abc");
}

#[test]
fn content_length_with_sign_or_list() {
    refused("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\nabc", 400);
    refused("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\nabc", 400);
}

#[test]
fn chunk_size_overflow() {
    refused("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400);
}

#[test]
fn chunk_size_with_bare_lf() {
    refused("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400);
}

#[test]
fn chunk_extensions_abuse() {
    let long = "a".repeat(5000);
    refused(&format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;{long}\r\nabc\r\n0\r\n\r\n"), 400);
}

/// The same abuse arriving after the head and a first chunk have already
/// gone upstream: the client still gets a 400 (not a silent close), the
/// connection closes, and the marker behind it never reaches the backend.
#[test]
fn chunk_extensions_abuse_after_the_head_has_gone_upstream() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    c.send("POST /late HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n");
    // Let Atlas forward the head and the first chunk.
    assert!(wait_until(Duration::from_secs(2), || !be.raw_bytes().is_empty()), "the head never reached the backend");
    let _ = c.try_send(format!("3;{}\r\nabc\r\n0\r\n\r\n{MARKER}", "a".repeat(5000)).as_bytes());
    let r = c.read_response();
    assert_eq!(r.status, 400, "got\n{}", r.head);
    assert!(r.has_token("connection", "close"), "{}", r.head);
    assert!(c.is_closed(Duration::from_secs(2)), "the connection must close after a refused body");
    std::thread::sleep(Duration::from_millis(100));
    let seen = be.raw_bytes();
    assert!(!String::from_utf8_lossy(&seen).contains("/marker"), "the marker reached the backend: {}", show(&seen));
}

#[test]
fn chunk_extension_with_quoted_string_is_forwarded_as_framed() {
    normalised("POST /ext HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;name=\"v;x\"\r\nabc\r\n0\r\n\r\n", "/ext", b"abc");
}

#[test]
fn bare_lf_line_endings_are_normalised() {
    normalised("GET /lf HTTP/1.1\nHost: h\nX-A: 1\n\n", "/lf", b"");
}

#[test]
fn header_name_with_invalid_bytes() {
    refused("GET / HTTP/1.1\r\nHost: h\r\nX\u{1}Bad: 1\r\n\r\n", 400);
    refused("GET / HTTP/1.1\r\nHost: h\r\nX(Bad): 1\r\n\r\n", 400);
}

#[test]
fn nul_byte_in_header_value() {
    refused("GET / HTTP/1.1\r\nHost: h\r\nX-A: a\0b\r\n\r\n", 400);
}

#[test]
fn obs_fold_header_continuation() {
    refused("GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n", 400);
}

#[test]
fn absolute_form_request_target_is_normalised() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.request("GET http://evil.example/abs?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n");
    assert_eq!(r.status, 200);
    let got = be.last();
    assert_eq!(got.target, "/abs?q=1", "origin-form upstream");
    assert_eq!(got.header_all("host"), vec!["evil.example"], "the authority replaces Host (RFC 9112 3.2.2)");
}

#[test]
fn absolute_form_without_a_path_is_the_root() {
    // Found by fuzzing: this used to crash the worker.
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.request("GET http://h:1=p HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(be.last().target, "/");
    assert_eq!(c.get("/still-served").status, 200);
}

#[test]
fn invalid_method_token() {
    refused("G@T / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
}

#[test]
fn invalid_http_version() {
    refused("GET / HTTP/1.2\r\nHost: h\r\n\r\n", 400);
    refused("GET / HTTP/2.0\r\nHost: h\r\n\r\n", 400);
}

#[test]
fn http09_request_line() {
    refused("GET /\r\n\r\n", 400);
}

#[test]
fn very_long_uri() {
    refused(&format!("GET /{} HTTP/1.1\r\nHost: h\r\n\r\n", "u".repeat(10_000)), 431);
}

#[test]
fn many_small_headers() {
    let mut attack = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
    for i in 0..150 {
        attack.push_str(&format!("X{i}: v\r\n"));
    }
    attack.push_str("\r\n");
    refused(&attack, 431);
}

#[test]
fn missing_or_duplicate_host() {
    refused("GET / HTTP/1.1\r\n\r\n", 400);
    refused("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400);
}

#[test]
fn connect_method_is_not_a_tunnel() {
    refused("CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n", 501);
}
