//! HTTP/1.1 reverse proxy: forwarding, bodies, response framing, keep-alive
//! and pooling, HTTP/1.0 clients, pipelining, upstream errors, Upgrade.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------
// 1. Forwarding
// ---------------------------------------------------------------------------

#[test]
fn forwards_method_target_and_host_unchanged() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());

    let r = c.request("DELETE /items/42?force=1&q=a%20b HTTP/1.1\r\nHost: example.test:8080\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
    let got = be.last();
    assert_eq!(got.method, "DELETE");
    assert_eq!(got.target, "/items/42?force=1&q=a%20b");
    assert_eq!(got.version, "HTTP/1.1");
    assert_eq!(got.header_all("host"), vec!["example.test:8080"], "upstream head:\n{}", got.head);

    let r = c.request("OPTIONS /x/y/?a=1&a=2 HTTP/1.1\r\nHost: other.example\r\nX-Custom: v 1\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
    let got = be.last();
    assert_eq!((got.method.as_str(), got.target.as_str()), ("OPTIONS", "/x/y/?a=1&a=2"));
    assert_eq!(got.header("host"), Some("other.example"));
    assert_eq!(got.header("x-custom"), Some("v 1"), "end-to-end header must be forwarded:\n{}", got.head);
}

#[test]
fn x_forwarded_for_is_appended_and_proto_is_http() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());

    assert_eq!(c.get("/plain").status, 200);
    let got = be.last();
    assert_eq!(got.header_all("x-forwarded-for"), vec!["127.0.0.1"], "upstream head:\n{}", got.head);
    assert_eq!(got.header_all("x-forwarded-proto"), vec!["http"], "upstream head:\n{}", got.head);

    let r = c.request("GET /chained HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n");
    assert_eq!(r.status, 200);
    let got = be.last();
    assert_eq!(got.header_all("x-forwarded-for"), vec!["1.2.3.4, 127.0.0.1"], "upstream head:\n{}", got.head);

    // A client cannot make the upstream believe it came over https.
    let r = c.request("GET /spoof HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\n\r\n");
    assert_eq!(r.status, 200);
    let got = be.last();
    assert_eq!(got.header_all("x-forwarded-proto"), vec!["http"], "upstream head:\n{}", got.head);
}

#[test]
fn hop_by_hop_headers_are_removed() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.request(
        "GET /hop HTTP/1.1\r\n\
         Host: h\r\n\
         Connection: keep-alive, X-Foo\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         TE: trailers\r\n\
         Trailer: X-Checksum\r\n\
         Upgrade: h2c\r\n\
         X-Foo: secret\r\n\
         X-Keep: yes\r\n\
         \r\n",
    );
    assert_eq!(r.status, 200, "{}", r.head);
    let got = be.last();
    for h in ["keep-alive", "proxy-connection", "te", "trailer", "upgrade", "x-foo"] {
        assert!(!got.has_header(h), "`{h}` must not reach the upstream; upstream head:\n{}", got.head);
    }
    for v in got.header_all("connection") {
        let v = v.to_ascii_lowercase();
        assert!(!v.contains("x-foo") && !v.contains("upgrade"), "client's Connection header forwarded: {v:?}\n{}", got.head);
    }
    assert_eq!(got.header("x-keep"), Some("yes"), "end-to-end header lost:\n{}", got.head);
    // The connection is still usable (keep-alive token honoured).
    assert_eq!(c.get("/again").text(), "/again");
}

#[test]
fn upstream_receives_http11_for_http10_client() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let r = one_shot(atlas.addr(), "GET /ten HTTP/1.0\r\nHost: h\r\n\r\n");
    assert_eq!(r.status, 200);
    let got = be.last();
    assert_eq!(got.version, "HTTP/1.1", "upstream head:\n{}", got.head);
    assert_eq!(got.header("host"), Some("h"));
}

// ---------------------------------------------------------------------------
// 2. Request bodies
// ---------------------------------------------------------------------------

#[test]
fn content_length_body_is_forwarded_exactly() {
    let be = Backend::http(|r| Reply::ok(format!("len={}", r.body.len())));
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let body = b"name=atlas&x=\x00\x01\xff\r\n\r\nend";
    let mut raw = format!("POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    raw.extend_from_slice(body);
    let r = c.request(&raw);
    assert_eq!(r.text(), format!("len={}", body.len()));
    let got = be.last();
    assert_eq!(got.method, "POST");
    assert_eq!(got.body, body);
    assert_eq!(got.header_all("content-length"), vec![body.len().to_string()]);
    assert!(!got.has_header("transfer-encoding"));
    // Next request on the same connection is framed correctly after the body.
    assert_eq!(c.get("/next").text(), "len=0");
    assert_eq!(be.last().target, "/next");
}

#[test]
fn large_content_length_body_is_streamed_intact() {
    const LEN: usize = 5 * 1024 * 1024;
    let be = Backend::http(|r| Reply::ok(format!("{} {:016x}", r.body.len(), fnv64(&r.body))));
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let body = pattern(LEN, 7);
    let want = format!("{LEN} {:016x}", fnv64(&body));
    let mut c = Client::connect(atlas.addr());
    c.send(format!("PUT /upload HTTP/1.1\r\nHost: h\r\nContent-Length: {LEN}\r\n\r\n"));
    for part in body.chunks(256 * 1024) {
        c.send(part);
    }
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), want, "backend saw a different body");
    assert!(be.last().body == body, "backend's recorded body differs");
}

#[test]
fn chunked_request_body_is_forwarded_chunked() {
    let be = Backend::http(|r| Reply::ok(&r.body));
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.request(
        "POST /chunks HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n7;ext=1\r\n, world\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "hello, worldabcdefghijklmnopqrstuvwxyz");
    let got = be.last();
    assert!(got.chunked, "upstream did not get chunked framing:\n{}", got.head);
    assert_eq!(got.header_all("transfer-encoding"), vec!["chunked"]);
    assert!(!got.has_header("content-length"), "{}", got.head);
    assert_eq!(got.body, b"hello, worldabcdefghijklmnopqrstuvwxyz");
    // Keep-alive after a chunked request body.
    assert_eq!(c.get("/after").status, 200);
    assert_eq!(be.last().target, "/after");
}

#[test]
fn chunked_request_body_sent_slowly_in_pieces_is_forwarded() {
    let be = Backend::http(|r| Reply::ok(&r.body));
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    c.send("POST /slow HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    for piece in ["3\r\nab", "c\r\n", "4\r", "\n1234\r\n", "0\r\n", "\r\n"] {
        thread::sleep(Duration::from_millis(20));
        c.send(piece);
    }
    let r = c.read_response();
    assert_eq!(r.text(), "abc1234");
    assert_eq!(be.last().body, b"abc1234");
}

#[test]
fn expect_100_continue_is_answered_by_atlas_then_body_forwarded() {
    let be = Backend::http(|r| Reply::ok(format!("got {}", String::from_utf8_lossy(&r.body))));
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    c.send("POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n");
    // The body is held back until the interim response arrives.
    c.stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let interim = c.try_read_response(false).unwrap_or_else(|e| panic!("no 100 Continue before the body was sent: {e}"));
    assert_eq!(interim.status, 100, "expected 100 Continue first, got:\n{}", interim.head);
    assert_eq!(interim.version, "HTTP/1.1");
    c.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.send("hello world");
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "got hello world");
    assert_eq!(be.last().body, b"hello world");
}

// ---------------------------------------------------------------------------
// 3. Response bodies
// ---------------------------------------------------------------------------

#[test]
fn content_length_response_is_relayed() {
    let be = Backend::http(|_| Reply::raw("HTTP/1.1 201 Created\r\nContent-Length: 7\r\nX-Up: 1\r\n\r\ncreated"));
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.get("/a");
    assert_eq!(r.status, 201);
    assert_eq!(r.reason, "Created");
    assert_eq!(r.header("content-length"), Some("7"));
    assert_eq!(r.header("x-up"), Some("1"));
    assert_eq!(r.body, b"created");
    let r = c.get("/b");
    assert_eq!(r.status, 201, "second response on the connection is corrupt:\n{}", r.head);
    assert_eq!(r.body, b"created");
}

#[test]
fn chunked_response_reaches_http11_client_chunked() {
    let be = Backend::http(|_| {
        Reply::raw("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5;x=y\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n")
    });
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    for _ in 0..2 {
        let r = c.get("/wiki");
        assert_eq!(r.status, 200);
        assert!(r.chunked, "expected Transfer-Encoding: chunked, got:\n{}", r.head);
        assert!(r.header("content-length").is_none());
        assert_eq!(r.text(), "Wikipedia in\r\n\r\nchunks.");
    }
    assert_eq!(be.connections(), 1, "the upstream connection should be reused after a complete chunked body");
}

#[test]
fn response_without_length_is_read_until_close_and_client_closed() {
    let be = Backend::http(|_| Reply::raw("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close").then_close());
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.get("/eof");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "body until close");
    assert!(c.is_closed(Duration::from_secs(3)), "Atlas kept the client connection open after a read-until-close body");
}

#[test]
fn large_response_is_streamed_intact() {
    const LEN: usize = 10 * 1024 * 1024;
    let body = Arc::new(pattern(LEN, 99));
    let b2 = body.clone();
    let be = Backend::http(move |_| Reply::ok(&*b2));
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.get("/big");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), LEN);
    assert_eq!(fnv64(&r.body), fnv64(&body), "10 MiB body corrupted");
    // And the connection is still usable.
    assert_eq!(c.get("/big").body.len(), LEN);
}

#[test]
fn large_chunked_response_is_streamed_intact() {
    const LEN: usize = 3 * 1024 * 1024;
    let body = Arc::new(pattern(LEN, 5));
    let b2 = body.clone();
    let be = Backend::http(move |_| {
        let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for part in b2.chunks(100_000) {
            out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        Reply::raw(out)
    });
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.get("/bigchunks");
    assert_eq!(r.body.len(), LEN);
    assert_eq!(fnv64(&r.body), fnv64(&body));
    assert_eq!(c.get("/bigchunks").body.len(), LEN);
}

#[test]
fn head_response_has_no_body_even_with_content_length() {
    let be = Backend::http(|r| if r.method == "HEAD" { Reply::raw("HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n") } else { Reply::ok("second") });
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    c.send("HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n");
    let r = c.read_head_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1234"), "HEAD keeps Content-Length as metadata");
    let r = c.get("/g");
    assert_eq!(r.status, 200, "next response after HEAD is broken:\n{}", r.head);
    assert_eq!(r.text(), "second");
}

#[test]
fn status_204_and_304_have_no_body_even_with_content_length() {
    let be = Backend::http(|r| match r.target.as_str() {
        "/204" => Reply::raw("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
        "/304" => Reply::raw("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: \"x\"\r\n\r\n"),
        p => Reply::ok(p),
    });
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    c.stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let r = c.get("/204");
    assert_eq!(r.status, 204);
    c.send(get_req("/304"));
    let r = c.try_read_response(false).unwrap_or_else(|e| panic!("no response after a 204 on the same connection: {e}"));
    assert_eq!(r.status, 304, "{}", r.head);
    assert_eq!(r.header("etag"), Some("\"x\""));
    c.send(get_req("/after"));
    let r = c.try_read_response(false).unwrap_or_else(|e| panic!("no response after a 304 on the same connection: {e}"));
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "/after");
    assert!(c.buf.is_empty(), "stray bytes after the responses: {}", show(&c.buf));
}

// ---------------------------------------------------------------------------
// 4. Keep-alive and the upstream pool
// ---------------------------------------------------------------------------

#[test]
fn fifty_requests_on_one_client_connection_use_one_upstream_connection() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    for i in 0..50 {
        let r = c.get(&format!("/req/{i}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("/req/{i}"));
    }
    assert_eq!(be.request_count(), 50);
    assert_eq!(be.connections(), 1, "expected every request on one pooled upstream connection");
}

#[test]
fn second_client_connection_reuses_pooled_upstream_connection() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    {
        let mut c = Client::connect(atlas.addr());
        assert_eq!(c.get("/first").status, 200);
        c.stream.shutdown(Shutdown::Both).ok();
    }
    thread::sleep(Duration::from_millis(50));
    let mut c = Client::connect(atlas.addr());
    assert_eq!(c.get("/second").text(), "/second");
    let r = one_shot(atlas.addr(), "GET /third HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    assert_eq!(r.text(), "/third");
    assert_eq!(be.connections(), 1, "later client connections should reuse the pooled upstream connection");
}

#[test]
fn upstream_closing_idle_keepalive_connection_does_not_fail_next_get() {
    // Answers with Content-Length and no `Connection: close`, then closes.
    let be = Backend::http(|r| Reply::ok(&r.target).then_close());
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    for i in 0..10 {
        // Alternate: the FIN has arrived at Atlas, or is racing the request.
        if i % 2 == 1 {
            thread::sleep(Duration::from_millis(40));
        }
        let r = c.get(&format!("/r{i}"));
        assert_eq!(r.status, 200, "request {i} failed after the upstream closed its idle connection:\n{}\n{}", r.head, r.text());
        assert_eq!(r.text(), format!("/r{i}"));
    }
    let targets: Vec<String> = be.requests().iter().map(|r| r.target.clone()).collect();
    let want: Vec<String> = (0..10).map(|i| format!("/r{i}")).collect();
    assert_eq!(targets, want, "each request must reach the upstream exactly once");
}

#[test]
fn two_workers_share_the_listener_and_serve_concurrent_clients() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], "").replace("workers = 1", "workers = 2"));
    let addr = atlas.addr();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            thread::spawn(move || {
                for i in 0..5 {
                    let r = http_get(addr, &format!("/w{t}/{i}"));
                    assert_eq!(r.text(), format!("/w{t}/{i}"));
                    let mut c = Client::connect(addr);
                    for j in 0..3 {
                        assert_eq!(c.get(&format!("/k{t}/{i}/{j}")).text(), format!("/k{t}/{i}/{j}"));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(be.request_count(), 4 * 5 * 4);
    // Each worker keeps its own pool: at most a few upstream connections.
    assert!(be.connections() <= 8, "{} upstream connections for 4 sequential-ish clients", be.connections());
}

// ---------------------------------------------------------------------------
// 5. HTTP/1.0 clients and Connection: close
// ---------------------------------------------------------------------------

#[test]
fn http10_request_without_host_is_served_then_closed() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.request("GET /old HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "/old");
    assert!(c.is_closed(Duration::from_secs(3)), "HTTP/1.0 connection without keep-alive must be closed after the response");
    let got = be.last();
    assert_eq!(got.version, "HTTP/1.1");
    assert_eq!(got.header_all("host").len(), 1, "upstream (HTTP/1.1) needs exactly one Host:\n{}", got.head);
}

#[test]
fn http10_keep_alive_keeps_connection_open() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    for p in ["/ka1", "/ka2", "/ka3"] {
        let r = c.request(format!("GET {p} HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), p);
        assert!(r.has_token("connection", "keep-alive"), "HTTP/1.0 keep-alive response must say Connection: keep-alive:\n{}", r.head);
        assert!(r.header("content-length").is_some(), "a 1.0 keep-alive response needs a length:\n{}", r.head);
    }
}

#[test]
fn chunked_upstream_response_is_dechunked_for_http10_client() {
    let be = Backend::http(|_| Reply::raw("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n6\r\nworld!\r\n0\r\n\r\n"));
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    for req in ["GET /c HTTP/1.0\r\n\r\n", "GET /c HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"] {
        let mut c = Client::connect(atlas.addr());
        c.send(req);
        let raw = c.read_to_close();
        let end = find(&raw, b"\r\n\r\n").unwrap_or_else(|| panic!("no response head for {req:?}: {}", show(&raw)));
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200") || head.starts_with("http/1.0 200"), "{head}");
        assert!(!head.contains("transfer-encoding"), "HTTP/1.0 client must not get chunked framing:\n{head}");
        assert_eq!(&raw[end + 4..], b"hello world!", "body must be de-chunked for {req:?}");
    }
}

#[test]
fn connection_close_from_http11_client_is_honoured() {
    let be = Backend::echo_path();
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.request("GET /bye HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    assert_eq!(r.text(), "/bye");
    assert!(r.has_token("connection", "close"), "response must carry Connection: close:\n{}", r.head);
    assert!(c.is_closed(Duration::from_secs(3)), "Atlas must close after Connection: close");
}

// ---------------------------------------------------------------------------
// 6. Pipelining
// ---------------------------------------------------------------------------

#[test]
fn pipelined_requests_are_answered_in_order() {
    let be = Backend::http(|r| {
        let delay = if r.target == "/one" { Duration::from_millis(100) } else { Duration::ZERO };
        Reply::ok(format!("{}:{}", r.target, String::from_utf8_lossy(&r.body))).after(delay)
    });
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    c.send(format!("{}POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyz{}", get_req("/one"), get_req("/three")));
    let bodies: Vec<String> = (0..3).map(|_| c.read_response().text()).collect();
    assert_eq!(bodies, vec!["/one:", "/two:xyz", "/three:"]);
    let r = c.get("/four");
    assert_eq!(r.text(), "/four:");
}

// ---------------------------------------------------------------------------
// 7. Upstream failures
// ---------------------------------------------------------------------------

#[test]
fn refused_upstream_gives_502_with_a_body() {
    let atlas = Atlas::start(&http_config(&[refused_addr()], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.get("/");
    assert_eq!(r.status, 502, "{}", r.head);
    assert!(!r.body.is_empty(), "502 must have a short body");
}

#[test]
fn error_reply_to_head_has_no_body_and_keeps_the_connection_in_step() {
    let atlas = Atlas::start(&http_config(&[refused_addr()], ""));
    let mut c = Client::connect(atlas.addr());
    c.send(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n");
    let r = c.read_head_response();
    assert_eq!(r.status, 502, "{}", r.head);
    assert_ne!(r.header("content-length"), Some("0"), "Content-Length says how long the body would be");
    // If a body had been sent anyway, this next response would be misread.
    let r = c.get("/y");
    assert_eq!(r.status, 502, "{}", r.head);
    assert!(r.head.starts_with("HTTP/1.1 502"), "{}", r.head);
}

#[test]
fn silent_upstream_gives_504_after_upstream_response_timeout() {
    let be = Backend::raw(|mut s| {
        let mut buf = Vec::new();
        let _ = read_head(&mut s, &mut buf);
        thread::sleep(Duration::from_secs(4));
    });
    let atlas = Atlas::start(&http_config(&[be.addr], "[timeouts]\nupstream_response = \"300ms\"\n"));
    let mut c = Client::connect(atlas.addr());
    let t = Instant::now();
    let r = c.get("/slow");
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{}", r.head);
    assert!(!r.body.is_empty(), "504 must have a short body");
    assert!(took >= Duration::from_millis(250) && took < Duration::from_millis(2500), "504 after {took:?}, want about 300ms");
}

#[test]
fn connect_failure_retries_another_upstream() {
    let be = Backend::fixed("good");
    let atlas = Atlas::start(&http_config(&[refused_addr(), be.addr], ""));
    for i in 0..10 {
        let r = http_get(atlas.addr(), &format!("/fresh{i}"));
        assert_eq!((r.status, r.text().as_str()), (200, "good"), "fresh connection request {i}:\n{}", r.head);
    }
    let mut c = Client::connect(atlas.addr());
    for i in 0..10 {
        let r = c.get(&format!("/ka{i}"));
        assert_eq!((r.status, r.text().as_str()), (200, "good"), "keep-alive request {i}:\n{}", r.head);
    }
    assert_eq!(be.request_count(), 20);
}

// ---------------------------------------------------------------------------
// 10. Upgrade
// ---------------------------------------------------------------------------

#[test]
fn upgrade_101_tunnels_bytes_both_ways() {
    let seen = Arc::new(Mutex::new(String::new()));
    let s2 = seen.clone();
    let be = Backend::raw(move |mut s| {
        let mut buf = Vec::new();
        let Ok(n) = read_head(&mut s, &mut buf) else { return };
        *s2.lock().unwrap() = String::from_utf8_lossy(&buf[..n]).into_owned();
        // 101 and the first bytes of the new protocol in one write.
        if s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nserver-hello").is_err() {
            return;
        }
        if buf.len() > n && s.write_all(&buf[n..]).is_err() {
            return;
        }
        echo(s);
    });
    let atlas = Atlas::start(&http_config(&[be.addr], ""));
    let mut c = Client::connect(atlas.addr());
    let r = c.request("GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n");
    assert_eq!(r.status, 101, "{}", r.head);
    assert!(r.header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")), "{}", r.head);
    let head = seen.lock().unwrap().to_ascii_lowercase();
    assert!(head.contains("upgrade: websocket"), "upstream did not get Upgrade:\n{head}");
    assert!(head.lines().any(|l| l.starts_with("connection:") && l.contains("upgrade")), "upstream did not get Connection: upgrade:\n{head}");

    assert_eq!(c.read_exact_bytes(12), b"server-hello", "bytes sent with the 101 were lost");
    c.send("ping-1");
    assert_eq!(c.read_exact_bytes(6), b"ping-1");

    // A bigger payload both ways at once.
    let data = pattern(300_000, 3);
    let mut w = c.stream.try_clone().unwrap();
    let d2 = data.clone();
    let writer = thread::spawn(move || w.write_all(&d2).and_then(|_| w.shutdown(Shutdown::Write)));
    let back = c.read_exact_bytes(data.len());
    writer.join().unwrap().expect("write through tunnel");
    assert!(back == data, "tunnelled bytes corrupted");
    assert!(c.is_closed(Duration::from_secs(3)), "tunnel not closed after both sides finished");
}
