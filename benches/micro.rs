//! Hot-path micro-benchmarks for `scripts/bench-micro`: each runs one hot
//! path ITERS times so valgrind can count its instructions (deterministic,
//! unlike wall time on this noisy 2-vCPU VM). Not a test, not shipped.
//!
//!   micro <bench> <iters>      benches: http_request, http_response,
//!                              ws_frames, firehose_tag
//!
//! The script runs each bench at two iteration counts under cachegrind and
//! divides the difference in instructions by the difference in iterations,
//! which cancels start-up and set-up.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

use atlas_balance::{GroupShared, Picker};
use atlas_config::{Group, HashKey, Strategy, Upstream};
use atlas_game::firehose::wire::{next_frame, parse_tagged, push_tagged};
use atlas_game::ws::frame::{encode_header, Chunk, Decoder, Opcode, Sender};
use atlas_proxy::http::codec::{rewrite_request, rewrite_response, ResponseCtx, RewriteCtx};

/// A browser-like GET as wrk and real clients send it.
const REQUEST: &[u8] = b"GET /api/v1/items?page=2&sort=name HTTP/1.1\r\n\
Host: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-GB,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Referer: https://shop.example.com/catalog\r\n\
Cookie: session=4f1c2a9e8b7d6c5e4f3a2b1c0d9e8f7a; theme=dark\r\n\
Connection: keep-alive\r\n\r\n";

/// What nginx answers for a 1 KiB body.
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Server: nginx/1.22.1\r\n\
Date: Sat, 21 Nov 2026 23:40:00 GMT\r\n\
Content-Type: application/octet-stream\r\n\
Content-Length: 1024\r\n\
Connection: keep-alive\r\n\r\n";

fn group(n: usize) -> Group {
    let upstreams = (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16));
            Upstream { name: format!("b{i}"), host: "127.0.0.1".into(), port: addr.port(), addr, weight: 1, max_conns: 0, tls: None }
        })
        .collect();
    Group { name: "bench".into(), upstreams }
}

/// Parse + route + rewrite of one request head, as the HTTP proxy does it.
fn http_request(iters: u64) {
    let g = group(4);
    let shared = GroupShared::new(&g, 1);
    let mut picker = Picker::new(Strategy::RoundRobin, &shared, 1);
    let key = HashKey::ClientIp;
    let ctx = RewriteCtx { client_ip: IpAddr::from([10, 1, 2, 3]), proto: "http", max_headers: 100, hash_key: Some(&key) };
    let mut out = Vec::with_capacity(2048);
    let mut sum = 0usize;
    for _ in 0..iters {
        out.clear();
        let info = rewrite_request(black_box(REQUEST), &mut out, &ctx).ok().flatten().expect("request parses");
        let up = picker.pick(&shared, info.hash, 0).expect("an upstream");
        sum = sum.wrapping_add(up + out.len());
    }
    black_box(sum);
}

/// Parse + rewrite of one upstream response head.
fn http_response(iters: u64) {
    let ctx = ResponseCtx { client_http11: true, client_keep_alive: true, request_is_head: false, request_upgrade: false };
    let mut out = Vec::with_capacity(2048);
    let mut sum = 0usize;
    for _ in 0..iters {
        out.clear();
        let (info, _) = rewrite_response(black_box(RESPONSE), &mut out, &ctx).ok().flatten().expect("response parses");
        sum = sum.wrapping_add(info.head_len + out.len());
    }
    black_box(sum);
}

/// Decoding of 64 masked 64-byte client frames per iteration (one read's
/// worth in the relay's pipe shape), counting message ends as the game
/// session does. Reported per frame by the script.
fn ws_frames(iters: u64) {
    let mut wire = Vec::new();
    for i in 0..64u8 {
        encode_header(&mut wire, true, 0, Opcode::Binary, Some([1, 2, 3, i]), 64);
        wire.extend_from_slice(&[i; 64]);
    }
    let mut dec = Decoder::new(Sender::Client, 0, 1 << 20);
    let mut ends = 0u64;
    for _ in 0..iters {
        dec.feed(black_box(&wire), |c| {
            if let Chunk::FrameEnd { message_end: true, .. } = c {
                ends += 1;
            }
        })
        .expect("frames decode");
    }
    assert_eq!(ends, iters * 64);
    black_box(ends);
}

/// Tagging one 64-byte client frame for the master link and reading it back.
fn firehose_tag(iters: u64) {
    let payload = [7u8; 64];
    let mut out = Vec::with_capacity(4096);
    let mut sum = 0u64;
    for i in 0..iters {
        out.clear();
        push_tagged(&mut out, black_box(i), 0, black_box(&payload));
        let (s, e) = next_frame(&out, 1 << 16).ok().flatten().expect("a frame");
        let t = parse_tagged(&out[s..e]).expect("a tagged packet");
        sum = sum.wrapping_add(t.id + t.data.len() as u64);
    }
    black_box(sum);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    match args.get(1).map(String::as_str) {
        Some("http_request") => http_request(iters),
        Some("http_response") => http_response(iters),
        Some("ws_frames") => ws_frames(iters),
        Some("firehose_tag") => firehose_tag(iters),
        _ => {
            eprintln!("usage: micro <http_request|http_response|ws_frames|firehose_tag> <iters>");
            std::process::exit(2);
        }
    }
}
