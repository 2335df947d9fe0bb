//! Unit tests of head parsing and rewriting: framing decisions, rejected
//! shapes, hop-by-hop removal, forwarding headers, response framing.

use super::*;

fn ctx() -> RewriteCtx<'static> {
    RewriteCtx { client_ip: "10.1.2.3".parse().unwrap(), proto: "http", max_headers: 100, hash_key: None }
}

fn req(raw: &str) -> Result<(RequestInfo, String), HeadError> {
    let mut out = Vec::new();
    let info = rewrite_request(raw.as_bytes(), &mut out, &ctx())?.expect("complete head");
    Ok((info, String::from_utf8(out).unwrap()))
}

fn header_count(head: &str, name: &str) -> usize {
    head.lines().filter(|l| l.to_ascii_lowercase().starts_with(&format!("{}:", name.to_ascii_lowercase()))).count()
}

#[test]
fn plain_get_is_rewritten_with_forwarding_headers() {
    let (info, out) = req("GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n").unwrap();
    assert_eq!(info.body, BodyKind::None);
    assert!(info.keep_alive && info.http11 && info.idempotent && !info.upgrade);
    assert!(out.starts_with("GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n"), "{out}");
    assert!(out.contains("X-Forwarded-For: 10.1.2.3\r\n"));
    assert!(out.contains("X-Forwarded-Proto: http\r\n"));
    assert!(out.ends_with("\r\n\r\n"));
}

#[test]
fn partial_head_asks_for_more() {
    let mut out = Vec::new();
    assert!(rewrite_request(b"GET / HTTP/1.1\r\nHost: x\r\n", &mut out, &ctx()).unwrap().is_none());
}

#[test]
fn hop_by_hop_and_connection_named_headers_are_removed() {
    let (_, out) = req("GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\nX-Secret: 1\r\nProxy-Connection: x\r\nTE: trailers\r\nTrailer: x\r\nUpgrade: h2c\r\nX-Keep: yes\r\n\r\n").unwrap();
    for gone in ["connection", "keep-alive", "x-secret", "proxy-connection", "te", "trailer", "upgrade"] {
        assert_eq!(header_count(&out, gone), 0, "{gone} in {out}");
    }
    assert!(out.contains("X-Keep: yes"));
    // Found by fuzzing: `Connection` must not be able to strip Host.
    let (_, out) = req("GET / HTTP/1.1\r\nHost: h\r\nConnection: close, Host\r\n\r\n").unwrap();
    assert_eq!(header_count(&out, "host"), 1, "{out}");
}

#[test]
fn x_forwarded_for_is_merged_and_appended_proto_replaced() {
    let (_, out) = req("GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\nX-Forwarded-Proto: https\r\n\r\n").unwrap();
    assert_eq!(header_count(&out, "x-forwarded-for"), 1);
    assert!(out.contains("X-Forwarded-For: 1.1.1.1, 2.2.2.2, 10.1.2.3\r\n"), "{out}");
    assert_eq!(header_count(&out, "x-forwarded-proto"), 1);
    assert!(out.contains("X-Forwarded-Proto: http\r\n"));
}

#[test]
fn content_length_and_chunked_framing() {
    let (info, out) = req("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello").unwrap();
    assert_eq!(info.body, BodyKind::Length(5));
    assert!(!info.idempotent);
    assert!(out.contains("Content-Length: 5\r\n"));
    let (info, _) = req("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").unwrap();
    assert_eq!(info.body, BodyKind::Length(5), "identical duplicates collapse");
    let (info, out) = req("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    assert_eq!(info.body, BodyKind::Chunked);
    assert_eq!(header_count(&out, "transfer-encoding"), 1);
    let (info, _) = req("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \tChunKed \r\n\r\n").unwrap();
    assert_eq!(info.body, BodyKind::Chunked, "case and whitespace are normalised");
    let (info, _) = req("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert_eq!(info.body, BodyKind::None);
}

#[test]
fn ambiguous_framing_is_rejected() {
    let bad = [
        ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 501),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("GET /\r\n\r\n", 400),
        ("GET / HTTP/2.0\r\nHost: h\r\n\r\n", 400),
        ("G\x01T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
        ("GET nothing HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        ("CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    ];
    for (raw, status) in bad {
        match req(raw) {
            Err(e) => assert_eq!(e.status(), status, "{raw:?}: {e:?}"),
            Ok((info, out)) => panic!("accepted {raw:?} as {info:?}\n{out}"),
        }
    }
}

#[test]
fn too_many_headers_is_431() {
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
    for i in 0..200 {
        raw.push_str(&format!("X-{i}: v\r\n"));
    }
    raw.push_str("\r\n");
    assert_eq!(req(&raw).unwrap_err(), HeadError::TooLarge);
}

#[test]
fn http10_keep_alive_rules_and_host() {
    let (info, out) = req("GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(!info.http11 && !info.keep_alive);
    assert!(out.starts_with("GET / HTTP/1.1\r\n"));
    assert!(out.contains("Host: localhost\r\n"), "upstream speaks 1.1 and needs a Host");
    let (info, _) = req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
    assert!(info.keep_alive);
    let (info, _) = req("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").unwrap();
    assert!(!info.keep_alive);
}

#[test]
fn absolute_form_becomes_origin_form_with_host() {
    let (_, out) = req("GET http://Example.org:8080/p?q HTTP/1.1\r\nHost: other\r\n\r\n").unwrap();
    assert!(out.starts_with("GET /p?q HTTP/1.1\r\nHost: Example.org:8080\r\n"), "{out}");
    assert_eq!(header_count(&out, "host"), 1);
    assert!(req("GET http:///p HTTP/1.1\r\nHost: h\r\n\r\n").is_err());
    // Found by the request_head fuzz target: no path after the authority.
    let raw = "GET http://h:1=p HTTP/1.1\r\nHost: x\r\n\r\n";
    let (info, out) = req(raw).unwrap();
    assert!(out.starts_with("GET / HTTP/1.1\r\nHost: h:1=p\r\n"), "{out}");
    assert!(info.target.0 <= info.target.1 && info.target.1 <= raw.len());
    assert!(req("GET http://user@h/p HTTP/1.1\r\nHost: h\r\n\r\n").is_err());
}

#[test]
fn upgrade_is_kept_only_with_connection_upgrade() {
    let (info, out) = req("GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
    assert!(info.upgrade);
    assert!(out.contains("Connection: upgrade\r\nUpgrade: websocket\r\n"), "{out}");
    let (info, out) = req("GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n").unwrap();
    assert!(!info.upgrade);
    assert_eq!(header_count(&out, "upgrade"), 0);
}

#[test]
fn expect_continue_is_answered_by_atlas() {
    let (info, out) = req("PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n").unwrap();
    assert!(info.expect_continue);
    assert_eq!(header_count(&out, "expect"), 0);
}

#[test]
fn hash_keys() {
    let key = HashKey::Header("x-user".into());
    let c = RewriteCtx { hash_key: Some(&key), ..ctx() };
    let mut out = Vec::new();
    let a = rewrite_request(b"GET /1 HTTP/1.1\r\nHost: h\r\nX-User: alice\r\n\r\n", &mut out, &c).unwrap().unwrap();
    let b = rewrite_request(b"GET /2 HTTP/1.1\r\nHost: h\r\nx-user:  alice \r\n\r\n", &mut out, &c).unwrap().unwrap();
    let d = rewrite_request(b"GET /1 HTTP/1.1\r\nHost: h\r\nX-User: bob\r\n\r\n", &mut out, &c).unwrap().unwrap();
    assert_eq!(a.hash, b.hash);
    assert_ne!(a.hash, d.hash);
    let key = HashKey::Path;
    let c = RewriteCtx { hash_key: Some(&key), ..ctx() };
    let a = rewrite_request(b"GET /p?x=1 HTTP/1.1\r\nHost: h\r\n\r\n", &mut out, &c).unwrap().unwrap();
    let b = rewrite_request(b"GET /p?x=2 HTTP/1.1\r\nHost: h\r\n\r\n", &mut out, &c).unwrap().unwrap();
    assert_eq!(a.hash, b.hash);
}

fn resp(raw: &str, rctx: ResponseCtx) -> (ResponseInfo, bool, String) {
    let mut out = Vec::new();
    let (info, keep) = rewrite_response(raw.as_bytes(), &mut out, &rctx).unwrap().unwrap();
    (info, keep, String::from_utf8(out).unwrap())
}

const C11: ResponseCtx = ResponseCtx { client_http11: true, client_keep_alive: true, request_is_head: false, request_upgrade: false };

#[test]
fn response_framing() {
    let (i, keep, out) = resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nabc", C11);
    assert_eq!(i.body, BodyKind::Length(3));
    assert!(keep && i.upstream_keep_alive);
    assert_eq!(header_count(&out, "keep-alive"), 0);
    assert_eq!(header_count(&out, "connection"), 0);
    let (i, _, out) = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", C11);
    assert_eq!(i.body, BodyKind::Chunked);
    assert_eq!(header_count(&out, "transfer-encoding"), 1);
    let (i, keep, out) = resp("HTTP/1.1 200 OK\r\n\r\n", C11);
    assert_eq!(i.body, BodyKind::UntilClose);
    assert!(!keep && !i.upstream_keep_alive);
    assert!(out.contains("Connection: close\r\n"));
    for s in ["204 No Content", "304 Not Modified"] {
        let (i, keep, _) = resp(&format!("HTTP/1.1 {s}\r\nContent-Length: 10\r\n\r\n"), C11);
        assert_eq!(i.body, BodyKind::None);
        assert!(keep);
    }
    let head = ResponseCtx { request_is_head: true, ..C11 };
    let (i, _, out) = resp("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", head);
    assert_eq!(i.body, BodyKind::None);
    assert!(out.contains("Content-Length: 10"), "HEAD keeps the length as metadata");
    let (i, _, _) = resp("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", C11);
    assert!(!i.upstream_keep_alive);
    let (i, _, _) = resp("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", C11);
    assert!(!i.upstream_keep_alive, "1.0 upstream without keep-alive");
}

#[test]
fn chunked_response_to_http10_client_is_dechunked_and_closed() {
    let c10 = ResponseCtx { client_http11: false, client_keep_alive: true, ..C11 };
    let (i, keep, out) = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", c10);
    assert_eq!(i.body, BodyKind::Chunked);
    assert!(!keep);
    assert_eq!(header_count(&out, "transfer-encoding"), 0);
    assert!(out.contains("Connection: close"));
    let (_, keep, out) = resp("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", c10);
    assert!(keep);
    assert!(out.contains("Connection: keep-alive"));
}

#[test]
fn bad_responses_are_errors() {
    for raw in [
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        "HTTZ/1.1 200 OK\r\n\r\n",
        "HTTP/1.1 20 OK\r\n\r\n",
    ] {
        let mut out = Vec::new();
        assert!(rewrite_response(raw.as_bytes(), &mut out, &C11).is_err(), "{raw:?}");
    }
}

#[test]
fn switching_protocols_keeps_upgrade_headers() {
    let up = ResponseCtx { request_upgrade: true, ..C11 };
    let (i, keep, out) = resp("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n", up);
    assert_eq!(i.status, 101);
    assert!(!keep && !i.upstream_keep_alive);
    assert!(out.contains("Connection: upgrade\r\nUpgrade: websocket\r\n"), "{out}");
    assert!(out.contains("Sec-WebSocket-Accept: x"));
}

/// Deterministic mutation smoke test: whatever bytes arrive, the parsers
/// return a verdict and never panic (the cargo-fuzz targets of the
/// hardening issue go further).
#[test]
fn mutated_heads_and_chunks_never_panic() {
    let seeds: [&[u8]; 4] = [
        b"POST http://h:1/p?q HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: x-a, close\r\nX-A: 1\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n5;e=\"q\"\r\nhello\r\n0\r\nT: v\r\n\r\n",
        b"GET / HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n1\r\na\r\n0\r\n\r\n",
        b"HTTP/1.0 101 Switching\r\nContent-Length: 7\r\nContent-Length: 7\r\nKeep-Alive: 1\r\n\r\n",
    ];
    let key = HashKey::Header("x-a".into());
    let mut rng = fastrand::Rng::with_seed(0xa71a5);
    let mut out = Vec::new();
    for round in 0..20_000 {
        let mut input = seeds[round % seeds.len()].to_vec();
        for _ in 0..rng.usize(1..6) {
            let i = rng.usize(..input.len());
            match rng.u8(..4) {
                0 => input[i] = rng.u8(..),
                1 => {
                    input.remove(i);
                }
                2 => input.insert(i, *rng.choice(b"\r\n:; ,\t\0\x80-0fF".iter()).unwrap()),
                _ => input.truncate(i),
            }
            if input.is_empty() {
                input.push(b'G');
            }
        }
        out.clear();
        let c = RewriteCtx { hash_key: Some(&key), max_headers: rng.usize(1..200), ..ctx() };
        if let Ok(Some(info)) = rewrite_request(&input, &mut out, &c) {
            assert!(info.head_len <= input.len());
            let mut sc = crate::http::chunked::ChunkedScanner::new();
            let _ = sc.scan(&input[info.head_len..], |r| assert!(r.end <= input.len() - info.head_len));
        }
        for rctx in [C11, ResponseCtx { client_http11: false, request_is_head: true, request_upgrade: true, ..C11 }] {
            out.clear();
            if let Ok(Some((info, _))) = rewrite_response(&input, &mut out, &rctx) {
                assert!(info.head_len <= input.len());
            }
        }
    }
}

#[test]
fn status_of_a_sent_head() {
    assert_eq!(head_status(b"HTTP/1.1 304 Not Modified\r\n\r\n"), Some(304));
    assert_eq!(head_status(b"HTTP/1.0 200 OK\r\n"), Some(200));
    assert_eq!(head_status(b"HTTP/1.1 20"), None);
    assert_eq!(head_status(b""), None);
    assert_eq!(head_status(b"garbage here"), None);
}

#[test]
fn addresses_and_numbers_are_written_as_display_would() {
    for ip in ["127.0.0.1", "0.0.0.0", "255.255.255.255", "10.20.3.4", "::1", "2001:db8::8a2e:370:7334", "::ffff:1.2.3.4"] {
        let ip: IpAddr = ip.parse().unwrap();
        let mut out = Vec::new();
        push_ip(&mut out, ip);
        assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
    }
    for n in [0u64, 7, 10, 1024, u64::MAX] {
        let mut out = b"x".to_vec();
        push_u64(&mut out, n);
        assert_eq!(out, format!("x{n}").into_bytes());
    }
}
