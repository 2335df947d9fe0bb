//! The properties the fuzz targets check (`fuzz/`), kept here so the seed
//! corpus is also replayed by an ordinary test (`tests/fuzz_seeds.rs`) on
//! stable Rust in `scripts/test`.

use std::net::IpAddr;

use atlas_config::HashKey;

use crate::http::chunked::ChunkedScanner;
use crate::http::codec::{rewrite_request, rewrite_response, BodyKind, ResponseCtx, RewriteCtx};

/// Request heads: no panic; an accepted head lies inside the input, and the
/// head Atlas would send upstream parses again as one complete request
/// with at most one framing header, agreeing on the body framing.
pub fn check_request_head(data: &[u8]) {
    let Some((&first, input)) = data.split_first() else { return };
    let key = match first % 4 {
        0 => HashKey::ClientIp,
        1 => HashKey::Uri,
        2 => HashKey::Path,
        _ => HashKey::Header("x-user".into()),
    };
    let ctx = RewriteCtx { client_ip: IpAddr::from([10, 0, 0, 1]), proto: "http", max_headers: 8 + (first as usize % 120), hash_key: Some(&key) };
    let mut out = Vec::new();
    let Ok(Some(info)) = rewrite_request(input, &mut out, &ctx) else { return };
    assert!(info.head_len <= input.len());
    assert!(info.target.0 <= info.target.1 && info.target.1 <= input.len());
    // What goes upstream is itself a well-formed head with the same framing.
    let mut again = Vec::new();
    let ctx2 = RewriteCtx { max_headers: 1000, hash_key: None, ..ctx };
    match rewrite_request(&out, &mut again, &ctx2) {
        Ok(Some(info2)) => {
            assert_eq!(info2.head_len, out.len(), "the rewritten head is exactly one head");
            assert_eq!(info2.body, info.body, "framing must not change on the way upstream");
        }
        other => panic!("rewritten head does not parse: {other:?}\n{}", String::from_utf8_lossy(&out)),
    }
    let framing = |name: &str| out.split(|&b| b == b'\n').filter(|l| l.len() > name.len() && l[..name.len()].eq_ignore_ascii_case(name.as_bytes())).count();
    assert!(framing("content-length:") + framing("transfer-encoding:") <= 1);
    if info.body == BodyKind::Chunked {
        let _ = ChunkedScanner::new().scan(&input[info.head_len..], |_| {});
    }
}

/// Response heads, for every shape of client: no panic, head inside input.
pub fn check_response_head(data: &[u8]) {
    for bits in 0..16u8 {
        let ctx =
            ResponseCtx { client_http11: bits & 1 != 0, client_keep_alive: bits & 2 != 0, request_is_head: bits & 4 != 0, request_upgrade: bits & 8 != 0 };
        let mut out = Vec::new();
        if let Ok(Some((info, _))) = rewrite_response(data, &mut out, &ctx) {
            assert!(info.head_len <= data.len());
            assert!(out.ends_with(b"\r\n\r\n"));
        }
    }
}

/// Chunked bodies: no panic; scanning in pieces agrees with scanning whole.
pub fn check_chunked(data: &[u8]) {
    let Some((&split, input)) = data.split_first() else { return };
    let mut whole = ChunkedScanner::new();
    let mut whole_payload = Vec::new();
    let r1 = whole.scan(input, |r| whole_payload.extend_from_slice(&input[r]));
    let mut pieces = ChunkedScanner::new();
    let mut piece_payload = Vec::new();
    let step = 1 + split as usize % 7;
    let mut consumed = 0;
    let mut r2 = Ok(0);
    for chunk in input.chunks(step) {
        match pieces.scan(chunk, |r| piece_payload.extend_from_slice(&chunk[r])) {
            Ok(n) => {
                consumed += n;
                if pieces.is_done() {
                    break;
                }
            }
            Err(e) => {
                r2 = Err(e);
                break;
            }
        }
    }
    match (r1, r2) {
        (Ok(n), Ok(_)) => {
            assert_eq!(whole.is_done(), pieces.is_done());
            if whole.is_done() {
                assert_eq!(n, consumed);
            }
            assert_eq!(whole_payload, piece_payload);
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("whole {a:?} vs pieces {b:?}"),
    }
}
