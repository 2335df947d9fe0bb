//! The game gateway as a WebSocket proxy, end to end: the real Atlas binary
//! (`common::Atlas`) in front of real WebSocket game servers that register
//! like Horizon (`support/game.rs`).
//!
//! Covered here:
//! - handshake refusals Atlas answers itself (405, 426, 400s, 503, 502);
//! - what reaches the game server in the upgrade request (Atlas's own
//!   headers are never taken from the client; extensions are not offered);
//! - control frames, fragmentation, binary messages and both close
//!   handshakes through the proxy;
//! - client protocol violations (unmasked, too large, RSV bits, reserved
//!   opcodes) fail the session and never reach the server;
//! - failover when a server dies or misses its heartbeats;
//! - operator transfers (`/api/v1/transfers`, seed `/transfer`), exactly
//!   once and in order, with the old server's in-flight messages first;
//! - predictive pre-connect (hits, cancellation, hit rate);
//! - auto-scale requests to a fake Maestro;
//! - keepalive pings and idle timeouts;
//! - 5000 pipelined messages each way, and messages pipelined through a
//!   transfer or a border crossing;
//! - backpressure: a server flooding a player who does not read is held
//!   back, and nothing is lost;
//! - the game listener over TLS.
//!
//! Every wait is a bounded poll (`game::wait_for`) or a socket timeout. The
//! prediction tests (timing-sensitive) and the heaviest test run one at a
//! time (`serial()`).
//!
//! `a_good_message_in_the_same_segment_as_a_bad_frame_is_delivered` guards
//! a bug this file found (fixed in 4d6440b): a complete, valid client
//! message read in the same buffer as a following bad frame was dropped
//! instead of forwarded before the session failed.

mod common;
#[path = "support/game.rs"]
mod game;

use std::io::{BufReader, Cursor, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::Atlas;
use game::{fake_maestro, http_json, http_raw, move_msg, wait_for, Frame, GameServer, MaestroLog, WsClient, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A game listener and its API on ephemeral ports; `spatial` lines go into
/// `[spatial]` (prediction is off unless they set `predict_horizon`).
fn config(spatial: &str) -> String {
    config_with("", spatial)
}

/// Like [`config`], with extra tables right after `[listen]` (e.g. `[listen.tls]`).
fn config_with(listen_extra: &str, spatial: &str) -> String {
    let mut sp = String::from("region_size = 1000.0\nhysteresis = 5.0\n");
    if !spatial.contains("predict_horizon") {
        sp.push_str("predict_horizon = \"0s\"\n");
    }
    sp.push_str(spatial);
    format!("[listen]\naddress = \"127.0.0.1:0\"\nmode = \"game\"\n{listen_extra}\n[api]\naddress = \"127.0.0.1:0\"\n\n[spatial]\n{sp}\n")
}

fn api(atlas: &Atlas) -> SocketAddr {
    atlas.api.expect("the config has an [api] table")
}

/// A registered server for grid cell (x, 0, 0) of 1000-unit regions.
fn region_server(atlas: &Atlas, name: &str, x: i64) -> GameServer {
    let s = GameServer::start(name);
    let c = x as f64 * 1000.0 + 500.0;
    s.register(api(atlas), (x, 0, 0), (c, 500.0, 500.0), 500.0, 1000).unwrap_or_else(|e| panic!("register {name}: {e}"));
    s
}

/// A message with a seq and no position (so it never moves the player).
fn chat(seq: u64) -> String {
    format!(r#"{{"type":"chat","seq":{seq}}}"#)
}

/// Reads the next text message, which must be an ack; returns (server, seq).
fn ack(c: &mut WsClient, what: &str) -> (String, u64) {
    let v = c.recv_json().unwrap_or_else(|e| panic!("{what}: waiting for an ack: {e}"));
    assert_eq!(v["type"], "ack", "{what}: expected an ack, got {v}");
    (v["server"].as_str().unwrap_or("").to_string(), v["seq"].as_u64().unwrap_or(u64::MAX))
}

/// Seqs of the JSON text messages a server received, in order.
fn seqs(s: &GameServer) -> Vec<u64> {
    s.received().iter().filter_map(|r| serde_json::from_str::<Value>(&r.text).ok()?.get("seq")?.as_u64()).collect()
}

/// Seqs received by all of `servers`, in the order they were received.
fn seqs_by_time(servers: &[&GameServer]) -> Vec<u64> {
    let mut all: Vec<(Instant, u64)> =
        servers.iter().flat_map(|s| s.received()).filter_map(|r| Some((r.at, serde_json::from_str::<Value>(&r.text).ok()?.get("seq")?.as_u64()?))).collect();
    all.sort();
    all.into_iter().map(|(_, s)| s).collect()
}

/// The Prometheus text of `GET /metrics`.
fn metrics(atlas: &Atlas) -> String {
    let (status, text) = http_raw(api(atlas), "GET /metrics HTTP/1.1\r\nHost: atlas\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200, "GET /metrics: {text}");
    text
}

/// The value of the sample `key` (name plus labels, exactly as printed).
fn metric(text: &str, key: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == key).then(|| v.trim().parse::<f64>().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no sample {key} in /metrics:\n{text}"))
}

fn m(atlas: &Atlas, key: &str) -> f64 {
    metric(&metrics(atlas), key)
}

/// Reads frames until a close frame and returns its code; Err (with the
/// frames seen) on EOF, timeout or error first.
fn recv_close(c: &mut WsClient) -> Result<(u16, String), String> {
    let mut seen = Vec::new();
    loop {
        match c.recv() {
            Ok(f) if f.opcode == OP_CLOSE => return Ok((f.close_code().unwrap_or(1005), f.close_reason())),
            Ok(f) => seen.push(format!("opcode {} {:?}", f.opcode, f.text().chars().take(80).collect::<String>())),
            Err(e) => return Err(format!("{e} (frames before: {seen:?})")),
        }
    }
}

/// True if the connection ends (EOF or reset, not a timeout) within `within`;
/// frames that arrive meanwhile are skipped.
fn connection_ends(c: &mut WsClient, within: Duration) -> bool {
    c.set_timeout(within);
    loop {
        match c.recv() {
            Ok(_) => continue,
            Err(e) => return !e.starts_with("timeout"),
        }
    }
}

const GOOD_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A valid upgrade request for the raw-handshake tests.
fn good_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: atlas.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {GOOD_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Sends an upgrade request over `s` and reads the answer head. Returns
/// (status line + headers, bytes read past the head).
fn upgrade<S: Read + Write>(s: &mut S, host: &str, path: &str) -> (String, Vec<u8>, String) {
    let key = game::base64_encode(&game::random_bytes(16));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).expect("send the upgrade request");
    s.flush().expect("flush the upgrade request");
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut tmp).expect("read the upgrade answer");
        assert!(n > 0, "EOF before the upgrade answer: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    (head, buf[end..].to_vec(), key)
}

fn header_of(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

type Reader = BufReader<std::io::Chain<Cursor<Vec<u8>>, TcpStream>>;

/// A plain-TCP WebSocket client as a separate writer and reader (for
/// pipelining from two threads).
fn raw_client(addr: SocketAddr, path: &str) -> (TcpStream, Reader) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.set_nodelay(true);
    let (head, leftover, key) = upgrade(&mut s, "atlas.test", path);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(header_of(&head, "sec-websocket-accept"), Some(game::accept_key(&key)));
    let w = s.try_clone().unwrap();
    (w, BufReader::new(Cursor::new(leftover).chain(s)))
}

/// A game server played by the test itself: a listener registered for
/// grid cell (0, 0, 0), whose connections `accept_upgrade` takes.
fn raw_server(atlas: &Atlas, name: &str) -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = json!({"name": name, "address": format!("127.0.0.1:{port}"), "region_coord": {"x": 0, "y": 0, "z": 0},
        "center": {"x": 500.0, "y": 500.0, "z": 500.0}, "bounds": 500.0, "capacity": 10});
    let (status, _) = http_json(api(atlas), "POST", "/api/v1/servers/register", Some(&body), &[]).unwrap();
    assert!(status == 200 || status == 201, "register: {status}");
    listener
}

/// Accepts Atlas's connection to a `raw_server` and answers its upgrade
/// (the head is read byte by byte, so nothing after it is consumed).
fn accept_upgrade(listener: &std::net::TcpListener) -> TcpStream {
    let (mut s, _) = listener.accept().unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let key =
        head.lines().find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-key")).map(|(_, v)| v.trim().to_string())).unwrap();
    write!(s, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n", game::accept_key(&key))
        .unwrap();
    s
}

fn masked_text(text: &str) -> Vec<u8> {
    game::encode_frame(true, OP_TEXT, text.as_bytes(), Some(game::random_mask()))
}

/// Reads `n` acks (skipping pings); returns (server, seq) in order.
fn read_acks(r: &mut Reader, n: usize) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = game::read_frame(r).unwrap_or_else(|e| panic!("after {} acks: {e}", out.len()));
        if f.opcode == OP_PING {
            continue;
        }
        assert_eq!(f.opcode, OP_TEXT, "after {} acks: {f:?}", out.len());
        let v: Value = serde_json::from_slice(&f.payload).expect("JSON");
        assert_eq!(v["type"], "ack", "{v}");
        out.push((v["server"].as_str().unwrap_or("").to_string(), v["seq"].as_u64().unwrap()));
    }
    out
}

// ---------------------------------------------------------------------------
// 1. Handshake refusals
// ---------------------------------------------------------------------------

#[test]
fn malformed_handshakes_are_refused_by_atlas_itself() {
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    let good = good_request("/play?player_id=h1&x=100&y=500&z=500");
    // The valid request is accepted (so the refusals below are about what changed).
    let (status, head) = WsClient::raw_handshake(atlas.addr(), &good);
    assert_eq!(status, 101, "{head}");
    assert!(wait_for(Duration::from_secs(2), || a.connections().len() == 1), "the valid handshake reached a");

    let cases: Vec<(&str, String, u16)> = vec![
        ("POST", good.replacen("GET ", "POST ", 1), 405),
        ("version 8", good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"), 426),
        ("no Upgrade", good.replace("Upgrade: websocket\r\n", ""), 400),
        ("Upgrade: h2c", good.replace("Upgrade: websocket\r\n", "Upgrade: h2c\r\n"), 400),
        ("no Connection header", good.replace("Connection: Upgrade\r\n", ""), 400),
        ("Connection: keep-alive", good.replace("Connection: Upgrade\r\n", "Connection: keep-alive\r\n"), 400),
        ("short key", good.replace(GOOD_KEY, "c2hvcnQ="), 400),
        ("key not base64", good.replace(GOOD_KEY, "!!!!not-base64!!!!!!!!=="), 400),
        ("no Host", good.replace("Host: atlas.test\r\n", ""), 400),
        ("garbage", "\u{1}\u{2}\u{3} garbage \u{7f}\r\n\r\n".to_string(), 400),
        ("not HTTP", "HELLO THERE FRIEND\r\n\r\n".to_string(), 400),
    ];
    let mut failures = Vec::new();
    for (what, req, want) in &cases {
        let (status, head) = WsClient::raw_handshake(atlas.addr(), req);
        if status != *want {
            failures.push(format!("{what}: expected {want}, got {status}: {head:?}"));
        }
        if *want == 426 && header_of(&head, "sec-websocket-version").as_deref() != Some("13") {
            failures.push(format!("{what}: the 426 has no `Sec-WebSocket-Version: 13`: {head:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // None of the refused handshakes reached the game server.
    thread::sleep(Duration::from_millis(100));
    assert_eq!(a.connections().len(), 1, "refused handshakes must not reach the server: {:?}", a.connections());
    assert!(a.errors().is_empty(), "{:?}", a.errors());
}

#[test]
fn no_game_server_registered_is_503() {
    let atlas = Atlas::start(&config(""));
    let (status, head) = WsClient::raw_handshake(atlas.addr(), &good_request("/play?player_id=x&x=100&y=500&z=500"));
    assert_eq!(status, 503, "{head}");
    // Without a position too.
    let (status, head) = WsClient::raw_handshake(atlas.addr(), &good_request("/play"));
    assert_eq!(status, 503, "{head}");
}

#[test]
fn a_backend_that_refuses_gives_502() {
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    a.kill(); // registered, but its port now refuses connections
    let (status, head) = WsClient::raw_handshake(atlas.addr(), &good_request("/play?player_id=x&x=100&y=500&z=500"));
    assert!(status == 502 || status == 503, "expected 502 (or 503), got {status}: {head}");
    assert!(WsClient::connect(atlas.addr(), "/play?player_id=y", &[]).is_err());
}

// ---------------------------------------------------------------------------
// 2. Headers towards the game server
// ---------------------------------------------------------------------------

#[test]
fn atlas_headers_from_the_client_are_stripped_others_pass() {
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    let c = WsClient::connect(
        atlas.addr(),
        "/play?player_id=p1&x=100&y=500&z=500",
        &[
            ("X-Atlas-Player-Id", "evil"),
            ("X-Atlas-Transfer-Token", "forged.token"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Custom", "1"),
            ("Cookie", "session=abc"),
            ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ],
    )
    .expect("connect");
    assert!(c.response_header("sec-websocket-extensions").is_none(), "the 101 must not negotiate an extension: {}", c.response_head());
    assert!(wait_for(Duration::from_secs(2), || a.connections().len() == 1));
    let conn = &a.connections()[0];
    let all = |name: &str| conn.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    assert_eq!(all("x-atlas-player-id"), vec!["p1"], "headers: {:?}", conn.headers);
    assert!(all("x-atlas-transfer-token").is_empty(), "a client's token must not reach the server: {:?}", conn.headers);
    assert_eq!(all("x-forwarded-for"), vec!["127.0.0.1"], "headers: {:?}", conn.headers);
    assert_eq!(all("x-custom"), vec!["1"]);
    assert_eq!(all("cookie"), vec!["session=abc"]);
    assert!(all("sec-websocket-extensions").is_empty(), "extensions must not be offered to the server: {:?}", conn.headers);
    assert!(conn.path.starts_with("/play?player_id=p1"), "path {:?}", conn.path);
}

#[test]
fn start_position_from_query_or_header_else_the_least_filled_server() {
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let first = |c: &mut WsClient, seq: u64| {
        c.send_text(&chat(seq));
        ack(c, "first message").0
    };
    let mut q = WsClient::connect(atlas.addr(), "/play?player_id=q&x=1500&y=500&z=500", &[]).expect("connect");
    assert_eq!(first(&mut q, 1), "b", "?x=1500 is in b's region");
    let mut h = WsClient::connect(atlas.addr(), "/play?player_id=h", &[("X-Atlas-Position", "100,500,500")]).expect("connect");
    assert_eq!(first(&mut h, 1), "a", "X-Atlas-Position: 100,500,500 is in a's region");
    let mut h2 = WsClient::connect(atlas.addr(), "/play?player_id=h2", &[("X-Atlas-Position", "1900, 10, 10")]).expect("connect");
    assert_eq!(first(&mut h2, 1), "b");
    // b has two players, a one: a player without a position goes to a.
    let mut n = WsClient::connect(atlas.addr(), "/play?player_id=n", &[]).expect("connect");
    assert_eq!(first(&mut n, 1), "a", "no position: the least-filled server");
    assert_eq!(a.connections().len(), 2);
    assert_eq!(b.connections().len(), 2);
}

// ---------------------------------------------------------------------------
// 3. Control frames, fragmentation, binary, close handshakes
// ---------------------------------------------------------------------------

/// Atlas, server a (cell 0) and a client on it (already acked once).
fn one_player(extra: &str, player: &str) -> (Atlas, GameServer, WsClient) {
    let atlas = Atlas::start(&config(extra));
    let a = region_server(&atlas, "a", 0);
    let mut c = WsClient::connect(atlas.addr(), &format!("/play?player_id={player}&x=100&y=500&z=500"), &[]).expect("connect");
    c.send_text(&chat(1));
    assert_eq!(ack(&mut c, "first message"), ("a".to_string(), 1));
    (atlas, a, c)
}

#[test]
fn client_ping_gets_the_servers_pong_with_the_same_payload() {
    let (_atlas, _a, mut c) = one_player("", "pinger");
    for payload in [&b"hello-ping"[..], b"", &[0xffu8; 125][..]] {
        c.send_ping(payload);
        let f = c.recv().expect("pong");
        assert_eq!((f.opcode, f.fin, f.payload.as_slice()), (OP_PONG, true, payload));
    }
    // The session still works.
    c.send_text(&chat(2));
    assert_eq!(ack(&mut c, "after pings"), ("a".to_string(), 2));
}

#[test]
fn fragmented_text_arrives_reassembled_at_the_server() {
    let (_atlas, a, mut c) = one_player("", "frag");
    let msg = format!(r#"{{"type":"chat","seq":2,"text":"{}"}}"#, "fragmented ".repeat(30));
    c.send_text_fragmented(&msg, 7);
    assert_eq!(ack(&mut c, "fragmented message"), ("a".to_string(), 2));
    // A ping between fragments is allowed (RFC 6455 §5.4).
    let msg3 = r#"{"type":"chat","seq":3,"text":"split around a ping"}"#;
    c.send_frame(false, OP_TEXT, &msg3.as_bytes()[..10], true);
    c.send_ping(b"mid");
    c.send_frame(true, game::OP_CONTINUATION, &msg3.as_bytes()[10..], true);
    let f = c.recv().expect("pong");
    assert_eq!((f.opcode, f.payload.as_slice()), (OP_PONG, &b"mid"[..]));
    assert_eq!(ack(&mut c, "fragmented message 3"), ("a".to_string(), 3));
    let texts: Vec<String> = a.received().into_iter().map(|r| r.text).collect();
    assert_eq!(texts, vec![chat(1), msg, msg3.to_string()]);
    assert!(a.errors().is_empty(), "{:?}", a.errors());
}

#[test]
fn binary_messages_are_echoed_intact() {
    let (_atlas, _a, mut c) = one_player("", "bin");
    for len in [0usize, 1, 125, 126, 65535, 65536, 200_000] {
        let data = game::random_bytes(len);
        c.send_binary(&data);
        let f = c.recv().unwrap_or_else(|e| panic!("echo of {len} bytes: {e}"));
        assert_eq!(f.opcode, OP_BINARY, "len {len}");
        assert!(f.fin);
        assert!(f.payload == data, "echo of {len} bytes differs");
    }
}

#[test]
fn client_close_1000_completes_the_close_handshake() {
    let (_atlas, a, mut c) = one_player("", "closer");
    c.send_close(1000, "done");
    let (code, _) = recv_close(&mut c).expect("the server's close answer");
    assert_eq!(code, 1000);
    assert!(wait_for(Duration::from_secs(2), || a.closes().contains(&(0, 1000))), "server closes {:?}", a.closes());
    assert!(connection_ends(&mut c, Duration::from_secs(3)), "the connection should end after the close handshake");
}

#[test]
fn server_close_4000_reaches_the_client() {
    let (_atlas, a, mut c) = one_player("", "closed");
    assert!(a.close(0, 4000, "bye"));
    let (code, reason) = recv_close(&mut c).expect("the server's close");
    assert_eq!((code, reason.as_str()), (4000, "bye"));
    // The client answers; the server sees the answer.
    c.send_close(4000, "");
    assert!(wait_for(Duration::from_secs(2), || a.closes().contains(&(0, 4000))), "server closes {:?}", a.closes());
    assert!(connection_ends(&mut c, Duration::from_secs(3)), "the connection should end after the close handshake");
}

// ---------------------------------------------------------------------------
// 4. Client protocol violations
// ---------------------------------------------------------------------------

/// Sends `bad` (raw bytes) after one good message; expects close `code`,
/// the end of the connection, and nothing of `bad` at the server.
fn violation(extra: &str, bad: &[u8], code: u16) {
    let (atlas, a, mut c) = one_player(extra, "bad");
    c.send_raw(bad).expect("send the bad frame");
    let got = recv_close(&mut c);
    assert_eq!(got.as_ref().map(|(c, _)| *c), Ok(code), "close after the violation; Atlas logs:\n{}", atlas.logs());
    assert!(connection_ends(&mut c, Duration::from_secs(3)), "the connection should end after a protocol error");
    thread::sleep(Duration::from_millis(100));
    assert_eq!(seqs(&a), vec![1], "only the good message reached the server: {:?}", a.received());
    assert!(a.errors().is_empty(), "the server must not see the bad frame: {:?}", a.errors());
    assert!(wait_for(Duration::from_secs(3), || a.open_connections() == 0), "the server's connection is closed too");
}

#[test]
fn unmasked_client_frame_is_closed_1002() {
    violation("", &game::encode_frame(true, OP_TEXT, chat(2).as_bytes(), None), 1002);
}

#[test]
fn frame_over_max_frame_bytes_is_closed_1009() {
    let big = format!(r#"{{"type":"chat","seq":2,"pad":"{}"}}"#, "x".repeat(1000));
    violation("max_frame_bytes = 1000\n", &game::encode_frame(true, OP_TEXT, big.as_bytes(), Some(game::random_mask())), 1009);
}

#[test]
fn frame_of_exactly_max_frame_bytes_passes() {
    let (_atlas, a, mut c) = one_player("max_frame_bytes = 1000\n", "edge");
    let head = r#"{"type":"chat","seq":2,"pad":""#;
    let msg = format!("{head}{}\"}}", "x".repeat(1000 - head.len() - 2));
    assert_eq!(msg.len(), 1000);
    c.send_text(&msg);
    assert_eq!(ack(&mut c, "1000-byte message"), ("a".to_string(), 2));
    assert_eq!(a.received().last().map(|r| r.text.len()), Some(1000));
}

#[test]
fn rsv_bits_are_closed_1002() {
    for rsv in [0x40u8, 0x20, 0x10] {
        let mut f = game::encode_frame(true, OP_TEXT, chat(2).as_bytes(), Some(game::random_mask()));
        f[0] |= rsv;
        violation("", &f, 1002);
    }
}

#[test]
fn reserved_opcodes_are_closed_1002() {
    for op in [3u8, 7, 0xB, 0xF] {
        violation("", &game::encode_frame(true, op, b"x", Some(game::random_mask())), 1002);
    }
}

#[test]
fn bad_control_frames_and_fragment_sequences_are_closed_1002() {
    let mk = |fin: bool, op: u8, payload: &[u8]| game::encode_frame(fin, op, payload, Some(game::random_mask()));
    // A ping of 126 bytes; a fragmented ping.
    violation("", &mk(true, OP_PING, &[b'x'; 126]), 1002);
    violation("", &mk(false, OP_PING, b"x"), 1002);
    // A continuation with no message open.
    violation("", &mk(true, game::OP_CONTINUATION, chat(2).as_bytes()), 1002);
    // A new text frame inside a fragmented message.
    let mut two = mk(false, OP_TEXT, b"{\"seq\":");
    two.extend(mk(true, OP_TEXT, chat(2).as_bytes()));
    violation("", &two, 1002);
    // A 5-byte payload with a 16-bit length (not the minimal form).
    let mut long = vec![0x81u8, 0x80 | 126, 0, 5];
    let key = game::random_mask();
    long.extend_from_slice(&key);
    long.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    violation("", &long, 1002);
}

#[test]
fn a_good_message_in_the_same_segment_as_a_bad_frame_is_delivered() {
    // Message 2 is complete and valid; the frame after it is not. Whether
    // both arrive in one read must not decide whether message 2 is lost.
    let (atlas, a, mut c) = one_player("", "seg");
    let mut bytes = game::encode_frame(true, OP_TEXT, chat(2).as_bytes(), Some(game::random_mask()));
    bytes.extend(game::encode_frame(true, OP_TEXT, chat(3).as_bytes(), None));
    c.send_raw(&bytes).expect("send");
    let _ = recv_close(&mut c);
    assert!(
        wait_for(Duration::from_secs(2), || seqs(&a) == vec![1, 2]),
        "message 2 (valid, before the bad frame) should reach the server; it got {:?}; Atlas logs:\n{}",
        seqs(&a),
        atlas.logs()
    );
}

// ---------------------------------------------------------------------------
// 5. Server death mid-session
// ---------------------------------------------------------------------------

#[test]
fn server_death_moves_the_player_to_the_next_server() {
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=surv&x=900&y=500&z=500", &[]).expect("connect");
    c.send_text(&move_msg(1, 900.0, 500.0, 500.0));
    assert_eq!(ack(&mut c, "before the kill"), ("a".to_string(), 1));
    a.kill();
    // Sent right after the kill: may be lost (a died with it), never duplicated.
    c.send_text(&move_msg(2, 900.0, 500.0, 500.0));
    assert!(wait_for(Duration::from_secs(3), || b.connections().len() == 1), "Atlas did not open a connection to b; logs:\n{}", atlas.logs());
    for seq in 3..=22 {
        c.send_text(&move_msg(seq, 900.0, 500.0, 500.0));
    }
    let mut acks = Vec::new();
    c.set_timeout(Duration::from_secs(5));
    while acks.last().map(|(_, s)| *s) != Some(22) {
        match c.recv_json() {
            Ok(v) => acks.push((v["server"].as_str().unwrap_or("").to_string(), v["seq"].as_u64().unwrap_or(0))),
            Err(e) => panic!("after the failover: {e}; acks so far {acks:?}; Atlas logs:\n{}", atlas.logs()),
        }
    }
    let got: Vec<u64> = acks.iter().map(|(_, s)| *s).collect();
    let want_from: u64 = if got.first() == Some(&2) { 2 } else { 3 };
    assert_eq!(got, (want_from..=22).collect::<Vec<_>>(), "acks in order, exactly once");
    assert!(acks.iter().all(|(s, _)| s == "b"), "{acks:?}");
    let at_b = seqs(&b);
    assert_eq!(at_b, (want_from..=22).collect::<Vec<_>>());
    assert!(m(&atlas, "atlas_game_failovers_total") >= 1.0);
    // The API shows the player on b.
    let (_, players) = http_json(api(&atlas), "GET", "/api/v1/players", None, &[]).unwrap();
    assert_eq!(players["players"][0]["server_id"].as_str(), b.server_id().as_deref(), "{players}");
}

#[test]
fn death_of_the_only_server_closes_the_client_1012() {
    let (atlas, a, mut c) = one_player("", "alone");
    a.kill();
    let got = recv_close(&mut c);
    assert!(matches!(got, Ok((1012 | 1011, _))), "expected close 1012 (or 1011), got {got:?}; logs:\n{}", atlas.logs());
    assert!(connection_ends(&mut c, Duration::from_secs(3)));
}

// ---------------------------------------------------------------------------
// 6. Heartbeat miss failover
// ---------------------------------------------------------------------------

#[test]
fn missed_heartbeats_move_the_player_without_closing_the_client() {
    let atlas = Atlas::start(&config("heartbeat_interval = \"100ms\"\nheartbeat_misses = 3\n"));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    a.start_heartbeats(api(&atlas), Duration::from_millis(100));
    b.start_heartbeats(api(&atlas), Duration::from_millis(100));
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=hb&x=900&y=500&z=500", &[]).expect("connect");
    c.send_text(&chat(1));
    assert_eq!(ack(&mut c, "before"), ("a".to_string(), 1));
    // Still on a after several heartbeat periods while a beats.
    thread::sleep(Duration::from_millis(500));
    c.send_text(&chat(2));
    assert_eq!(ack(&mut c, "while a heartbeats"), ("a".to_string(), 2));
    let stopped = Instant::now();
    a.stop_heartbeats();
    assert!(
        wait_for(Duration::from_secs(2), || a.closes().iter().any(|&(id, code)| id == 0 && code == 1001)),
        "a's connection should get a 1001 within 2 s; closes {:?}; logs:\n{}",
        a.closes(),
        atlas.logs()
    );
    let moved_after = stopped.elapsed();
    assert!(moved_after >= Duration::from_millis(150), "moved after {moved_after:?}, before 3 missed heartbeats");
    for seq in 3..=22 {
        c.send_text(&chat(seq));
        assert_eq!(ack(&mut c, "after the move"), ("b".to_string(), seq));
    }
    assert_eq!(seqs(&a), vec![1, 2]);
    assert_eq!(seqs(&b), (3..=22).collect::<Vec<_>>());
    assert_eq!(m(&atlas, "atlas_game_servers_marked_down_total"), 1.0);
    eprintln!("moved {moved_after:?} after a's heartbeats stopped");
}

// ---------------------------------------------------------------------------
// 7. Forced transfers
// ---------------------------------------------------------------------------

/// Sends chats `from..=to` one at a time (15 ms apart), POSTing `transfer`
/// before the first; returns the acking servers.
fn chats_around(c: &mut WsClient, from: u64, to: u64, transfer: impl FnOnce()) -> Vec<String> {
    let mut who = Vec::new();
    let mut transfer = Some(transfer);
    for seq in from..=to {
        if let Some(t) = transfer.take() {
            t();
        }
        c.send_text(&chat(seq));
        let (srv, s) = ack(c, &format!("chat {seq}"));
        assert_eq!(s, seq, "acks in order");
        who.push(srv);
        thread::sleep(Duration::from_millis(15));
    }
    who
}

fn switches(who: &[String]) -> usize {
    who.windows(2).filter(|w| w[0] != w[1]).count()
}

#[test]
fn forced_transfer_moves_the_player_exactly_once_in_order() {
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let api = api(&atlas);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=p1&x=100&y=500&z=500", &[]).expect("connect");
    let before = chats_around(&mut c, 1, 20, || {});
    assert!(before.iter().all(|s| s == "a"), "{before:?}");
    let b_id = b.server_id().unwrap();
    let who = chats_around(&mut c, 21, 50, || {
        let (status, v) = http_json(api, "POST", "/api/v1/transfers", Some(&json!({"player_id": "p1", "server_id": b_id})), &[]).unwrap();
        assert_eq!(status, 202, "{v}");
    });
    assert_eq!(who.last().map(String::as_str), Some("b"), "the transfer did not happen within 30 messages: {who:?}");
    assert_eq!(switches(&who), 1, "{who:?}");
    assert_eq!(seqs_by_time(&[&a, &b]), (1..=50).collect::<Vec<_>>(), "a got {:?}, b got {:?}", seqs(&a), seqs(&b));
    let conn = &b.connections()[0];
    assert_eq!(conn.header("x-atlas-player-id"), Some("p1"));
    assert!(conn.header("x-atlas-transfer-token").is_some_and(|t| !t.is_empty()), "{:?}", conn.headers);
    assert!(wait_for(Duration::from_secs(3), || a.closes().contains(&(0, 1001))), "a closes {:?}", a.closes());

    // The seed's route, with `target_server`, back to a.
    let a_id = a.server_id().unwrap();
    let who = chats_around(&mut c, 51, 80, || {
        let (status, v) = http_json(api, "POST", "/transfer", Some(&json!({"player_id": "p1", "target_server": a_id})), &[]).unwrap();
        assert_eq!(status, 202, "{v}");
    });
    assert_eq!(who.first().map(String::as_str), Some("b"));
    assert_eq!(who.last().map(String::as_str), Some("a"), "{who:?}");
    assert_eq!(switches(&who), 1, "{who:?}");
    assert_eq!(seqs_by_time(&[&a, &b]), (1..=80).collect::<Vec<_>>());
    assert_eq!(m(&atlas, "atlas_game_transfers_total{result=\"ok\"}"), 2.0);
}

#[test]
fn forced_transfer_with_pipelined_messages_in_flight_keeps_order() {
    const N: u64 = 300;
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let (mut w, mut r) = raw_client(atlas.addr(), "/play?player_id=pipe&x=100&y=500&z=500");
    // Messages keep flowing (one every ~2 ms, acks unread meanwhile) while
    // the operator moves the player.
    let writer = thread::spawn(move || {
        for seq in 1..=N {
            w.write_all(&masked_text(&chat(seq))).expect("send");
            thread::sleep(Duration::from_millis(2));
        }
        w
    });
    assert!(wait_for(Duration::from_secs(3), || a.received().len() >= 50));
    let (status, v) =
        http_json(api(&atlas), "POST", "/api/v1/transfers", Some(&json!({"player_id": "pipe", "server_id": b.server_id().unwrap()})), &[]).unwrap();
    assert_eq!(status, 202, "{v}");
    let acks = read_acks(&mut r, N as usize);
    let _w = writer.join().unwrap();
    let got: Vec<u64> = acks.iter().map(|(_, s)| *s).collect();
    assert_eq!(got, (1..=N).collect::<Vec<_>>(), "acks exactly once, in order");
    let who: Vec<String> = acks.iter().map(|(s, _)| s.clone()).collect();
    assert_eq!(switches(&who), 1, "{who:?}");
    assert_eq!(who.last().map(String::as_str), Some("b"), "the transfer did not happen while the messages flowed");
    let (sa, sb) = (seqs(&a), seqs(&b));
    let k = sa.len() as u64;
    assert_eq!(sa, (1..=k).collect::<Vec<_>>());
    assert_eq!(sb, (k + 1..=N).collect::<Vec<_>>());
}

#[test]
fn pipelined_walk_across_a_border_switches_between_two_messages() {
    // 400 moves 1 unit apart, sent without waiting for acks: the crossing
    // (x > 1005) is read mid-stream and the stream is cut there.
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let (mut w, mut r) = raw_client(atlas.addr(), "/play?player_id=runner&x=800&y=500&z=500");
    let writer = thread::spawn(move || {
        for i in 1..=400u64 {
            w.write_all(&masked_text(&move_msg(i, 800.0 + i as f64, 500.0, 500.0))).expect("send");
            if i % 4 == 0 {
                thread::sleep(Duration::from_millis(3));
            }
        }
        w
    });
    let acks = read_acks(&mut r, 400);
    let mut w = writer.join().unwrap();
    // A few more at the end, one by one: the player must be on b by now.
    for i in 401..=405u64 {
        w.write_all(&masked_text(&move_msg(i, 1200.0, 500.0, 500.0))).unwrap();
        let ack = read_acks(&mut r, 1).remove(0);
        assert_eq!(ack, ("b".to_string(), i));
    }
    let got: Vec<u64> = acks.iter().map(|(_, s)| *s).collect();
    assert_eq!(got, (1..=400).collect::<Vec<_>>(), "acks exactly once, in order");
    let who: Vec<String> = acks.iter().map(|(s, _)| s.clone()).collect();
    assert!(switches(&who) <= 1, "{who:?}");
    let (sa, sb) = (seqs(&a), seqs(&b));
    let k = sa.len() as u64;
    assert_eq!(sa, (1..=k).collect::<Vec<_>>(), "a got a prefix");
    assert_eq!(sb, (k + 1..=405).collect::<Vec<_>>(), "b got the rest");
    assert!(k >= 205, "b got seq {} (x={}) before the crossing at 1005", k + 1, 800 + k + 1);
    eprintln!("switched after seq {k} (x={})", 800 + k);
}

#[test]
fn transfer_waits_for_the_end_of_a_fragmented_message() {
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=frag&x=100&y=500&z=500", &[]).expect("connect");
    c.send_text(&chat(1));
    assert_eq!(ack(&mut c, "first"), ("a".to_string(), 1));
    let msg = r#"{"type":"chat","seq":2,"text":"a message in three fragments"}"#.as_bytes();
    c.send_frame(false, OP_TEXT, &msg[..12], true);
    let (status, v) =
        http_json(api(&atlas), "POST", "/api/v1/transfers", Some(&json!({"player_id": "frag", "server_id": b.server_id().unwrap()})), &[]).unwrap();
    assert_eq!(status, 202, "{v}");
    // Atlas connects to b, but must not switch inside the message.
    assert!(wait_for(Duration::from_secs(3), || b.connections().len() == 1), "no connection to b");
    thread::sleep(Duration::from_millis(250));
    c.send_frame(false, game::OP_CONTINUATION, &msg[12..30], true);
    c.send_ping(b"between fragments");
    thread::sleep(Duration::from_millis(150));
    c.send_frame(true, game::OP_CONTINUATION, &msg[30..], true);
    let f = c.recv().expect("pong");
    assert_eq!((f.opcode, f.payload.as_slice()), (OP_PONG, &b"between fragments"[..]));
    assert_eq!(ack(&mut c, "the fragmented message"), ("a".to_string(), 2), "the whole message goes to a");
    c.send_text(&chat(3));
    assert_eq!(ack(&mut c, "after the message"), ("b".to_string(), 3));
    assert_eq!(a.received().iter().map(|r| r.text.as_bytes()).collect::<Vec<_>>(), vec![chat(1).as_bytes(), msg]);
    assert_eq!(seqs(&b), vec![3]);
    assert!(a.errors().is_empty() && b.errors().is_empty(), "a {:?} b {:?}", a.errors(), b.errors());
}

#[test]
fn forced_transfer_of_unknown_player_or_server_is_404() {
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    let _c = WsClient::connect(atlas.addr(), "/play?player_id=p1&x=100&y=500&z=500", &[]).expect("connect");
    let a_id = a.server_id().unwrap();
    assert!(wait_for(Duration::from_secs(2), || http_json(api(&atlas), "GET", "/api/v1/players", None, &[]).unwrap().1["players"][0]["player_id"] == "p1"));
    for (path, body) in [
        ("/api/v1/transfers", json!({"player_id": "nobody", "server_id": a_id})),
        ("/api/v1/transfers", json!({"player_id": "p1", "server_id": "no-such-server"})),
        ("/transfer", json!({"player_id": "nobody", "target_server": a_id})),
        ("/transfer", json!({"player_id": "p1", "target_server": "no-such-server"})),
    ] {
        let (status, v) = http_json(api(&atlas), "POST", path, Some(&body), &[]).unwrap();
        assert_eq!(status, 404, "{path} {body}: {v}");
    }
}

// ---------------------------------------------------------------------------
// 8. The old server's in-flight messages come first
// ---------------------------------------------------------------------------

#[test]
fn old_servers_in_flight_messages_arrive_before_the_new_servers() {
    let atlas = Atlas::start(&config(""));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    // A client with a small receive buffer that does not read: most of a's
    // burst stays in flight (in Atlas and in a's socket) across the switch.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect_timeout(&atlas.addr().into(), Duration::from_secs(5)).expect("connect");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let (head, leftover, _) = upgrade(&mut s, "atlas.test", "/play?player_id=p8&x=100&y=500&z=500");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(Cursor::new(leftover).chain(s));
    let mut send = |seq: u64| w.write_all(&game::encode_frame(true, OP_TEXT, chat(seq).as_bytes(), Some(game::random_mask()))).expect("send");
    let mut recv = || -> Value {
        let f = game::read_frame(&mut r).expect("read a frame");
        assert_eq!(f.opcode, OP_TEXT, "{f:?}");
        serde_json::from_slice(&f.payload).expect("JSON")
    };
    send(1);
    let v = recv();
    assert_eq!((v["server"].as_str(), v["seq"].as_u64()), (Some("a"), Some(1)), "{v}");
    const PUSHES: u64 = 200;
    let pad = "p".repeat(1000);
    for i in 0..PUSHES {
        assert!(a.push(0, &format!(r#"{{"type":"push","i":{i},"pad":"{pad}"}}"#)), "push {i}");
    }
    let (status, v) = http_json(api(&atlas), "POST", "/api/v1/transfers", Some(&json!({"player_id": "p8", "server_id": b.server_id().unwrap()})), &[]).unwrap();
    assert_eq!(status, 202, "{v}");
    // The switch is done once a got Atlas's close (a's answer is still
    // behind the pushes on its socket).
    assert!(wait_for(Duration::from_secs(3), || a.closes().contains(&(0, 1001))), "a closes {:?}", a.closes());
    send(2);
    // b has acked before the client reads anything: its ack competes with
    // the ~200 KB of a's messages still in flight.
    assert!(wait_for(Duration::from_secs(3), || seqs(&b) == vec![2]), "b got {:?}", seqs(&b));
    let mut pushes = Vec::new();
    let first_ack = loop {
        let v = recv();
        match v["type"].as_str() {
            Some("push") => pushes.push(v["i"].as_u64().unwrap()),
            Some("ack") => break v,
            _ => panic!("unexpected message {v}"),
        }
    };
    assert_eq!(pushes, (0..PUSHES).collect::<Vec<_>>(), "all of a's messages, in order, before the new server's first");
    assert_eq!((first_ack["server"].as_str(), first_ack["seq"].as_u64()), (Some("b"), Some(2)), "{first_ack}");
    assert_eq!(seqs(&a), vec![1]);
}

// ---------------------------------------------------------------------------
// 9. Predictive pre-connect
// ---------------------------------------------------------------------------

/// Walks from x0 to x1 (inclusive) in `step` units every 20 ms (paced on
/// a fixed schedule), reading each ack; calls `each(x)` after each step.
/// Returns (seq, x, server) per step, and the longest gap between two sends
/// while approaching the border at 1000 (x in 700..1000): the jitter the
/// prediction saw.
fn walk_timed(c: &mut WsClient, seq0: u64, x0: f64, x1: f64, step: f64, mut each: impl FnMut(f64)) -> (Vec<(u64, f64, String)>, Duration) {
    let n = ((x1 - x0) / step).round() as i64;
    let mut out = Vec::new();
    let start = Instant::now();
    let mut last_send: Option<Instant> = None;
    let mut max_gap = Duration::ZERO;
    for i in 0..=n {
        let due = start + Duration::from_millis(20) * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let x = x0 + step * i as f64;
        let seq = seq0 + i as u64;
        let now = Instant::now();
        if let Some(prev) = last_send.filter(|_| (700.0..1000.0).contains(&x)) {
            max_gap = max_gap.max(now - prev);
        }
        last_send = Some(now);
        c.send_text(&move_msg(seq, x, 500.0, 500.0));
        let (srv, s) = ack(c, &format!("move to x={x}"));
        assert_eq!(s, seq, "acks in order");
        out.push((seq, x, srv));
        each(x);
    }
    (out, max_gap)
}

fn walk(c: &mut WsClient, seq0: u64, x0: f64, x1: f64, step: f64, each: impl FnMut(f64)) -> Vec<(u64, f64, String)> {
    walk_timed(c, seq0, x0, x1, step, each).0
}

/// The prediction tests' figures depend on timing, and the heaviest tests
/// disturb timing: these run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PREDICT: &str = "predict_horizon = \"500ms\"\n";

#[test]
fn predicted_crossing_preconnects_the_next_server() {
    let _serial = serial();
    let atlas = Atlas::start(&config(PREDICT));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=walker&x=600&y=500&z=500", &[]).expect("connect");
    // When (and at which x) each of b's connections was first seen.
    let mut b_conns: Vec<(Instant, f64)> = Vec::new();
    let steps = walk(&mut c, 1, 600.0, 1400.0, 10.0, |x| {
        while b_conns.len() < b.connections().len() {
            b_conns.push((Instant::now(), x));
        }
    });
    let who: Vec<String> = steps.iter().map(|(_, _, s)| s.clone()).collect();
    assert_eq!(switches(&who), 1, "{who:?}");
    assert_eq!(who.last().map(String::as_str), Some("b"));
    let crossed_at = steps.iter().find(|(_, _, s)| s == "b").map(|(_, x, _)| *x).unwrap();
    assert!(crossed_at > 1005.0 && crossed_at <= 1020.0, "switched at x={crossed_at}");
    // The connection b's messages came on was open before the crossing.
    let first = b.received().first().cloned().expect("b received nothing");
    let (seen_at, seen_x) = *b_conns.get(first.conn).expect("b's connection was never seen during the walk");
    assert!(seen_x < 1000.0, "b's connection {} opened at x={seen_x}, not ahead of the crossing at {crossed_at}", first.conn);
    let lead = first.at.saturating_duration_since(seen_at);
    let text = metrics(&atlas);
    eprintln!(
        "b pre-connected (connection {} of {}) at x={seen_x}, {lead:?} before its first message (crossed at x={crossed_at}); pre-connects {}, hits {}, cancelled {}",
        first.conn,
        b_conns.len(),
        metric(&text, "atlas_game_preconnects_total"),
        metric(&text, "atlas_game_preconnect_hits_total"),
        metric(&text, "atlas_game_preconnect_cancelled_total"),
    );
    assert!(lead >= Duration::from_millis(60), "pre-connect only {lead:?} ahead (a step is ~20 ms)");
    if first.conn == 0 {
        assert!(lead >= Duration::from_millis(200), "the first pre-connect was only {lead:?} ahead");
    }
    assert!(b.open_connections() == 1, "b has {} open connections", b.open_connections());
    assert_eq!(seqs_by_time(&[&a, &b]), (1..=81).collect::<Vec<_>>());
    assert!(metric(&text, "atlas_game_preconnects_total") >= 1.0, "{text}");
    assert!(metric(&text, "atlas_game_preconnect_hits_total") >= 1.0, "{text}");
    assert_eq!(metric(&text, "atlas_game_transfers_total{result=\"ok\"}"), 1.0);
}

#[test]
fn turning_back_cancels_the_preconnect_without_a_transfer() {
    let _serial = serial();
    let atlas = Atlas::start(&config(PREDICT));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let ok_before = m(&atlas, "atlas_game_transfers_total{result=\"ok\"}");
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=shy&x=600&y=500&z=500", &[]).expect("connect");
    let mut out = walk(&mut c, 1, 600.0, 960.0, 10.0, |_| {});
    assert!(!b.connections().is_empty(), "walking towards b at 500 u/s should pre-connect it");
    out.extend(walk(&mut c, 38, 950.0, 600.0, -10.0, |_| {}));
    assert!(out.iter().all(|(_, _, s)| s == "a"), "the player never crossed: {out:?}");
    let text = metrics(&atlas);
    assert!(metric(&text, "atlas_game_preconnects_total") >= 1.0, "{text}");
    assert!(metric(&text, "atlas_game_preconnect_cancelled_total") >= 1.0, "{text}");
    assert_eq!(metric(&text, "atlas_game_preconnect_hits_total"), 0.0);
    assert_eq!(metric(&text, "atlas_game_transfers_total{result=\"ok\"}"), ok_before);
    assert!(b.received().is_empty(), "b must not get messages: {:?}", b.received());
    assert!(wait_for(Duration::from_secs(2), || b.open_connections() == 0), "the cancelled pre-connect is closed");
    assert_eq!(seqs(&a).len(), out.len());
}

#[test]
fn preconnect_hit_rate_over_ten_walking_players() {
    let _serial = serial();
    let atlas = Atlas::start(&config(PREDICT));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let addr = atlas.addr();
    let players: Vec<_> = (0..10)
        .map(|p| {
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(p * 37));
                let mut c = WsClient::connect(addr, &format!("/play?player_id=w{p}&x=600&y=500&z=500"), &[]).expect("connect");
                let (steps, gap) = walk_timed(&mut c, 1, 600.0, 1400.0, 10.0, |_| {});
                (steps.last().map(|(_, _, s)| s.clone()), gap)
            })
        })
        .collect();
    let mut gaps = Vec::new();
    for h in players {
        let (last, gap) = h.join().expect("player thread");
        assert_eq!(last.as_deref(), Some("b"));
        gaps.push(gap.as_millis());
    }
    let text = metrics(&atlas);
    let pre = metric(&text, "atlas_game_preconnects_total");
    let hits = metric(&text, "atlas_game_preconnect_hits_total");
    let cancelled = metric(&text, "atlas_game_preconnect_cancelled_total");
    let rate = if pre > 0.0 { hits / pre } else { 0.0 };
    eprintln!(
        "pre-connect hit rate: {hits} hits / {pre} pre-connects = {rate:.2} ({cancelled} cancelled; longest step per player near the border, ms: {gaps:?})"
    );
    assert!(pre >= 1.0 && rate >= 0.5, "hit rate {rate:.2} ({hits}/{pre}, {cancelled} cancelled; longest step per player near the border, ms: {gaps:?})");
    assert_eq!(metric(&text, "atlas_game_transfers_total{result=\"ok\"}"), 10.0);
    assert_eq!(a.received().len() + b.received().len(), 810);
}

// ---------------------------------------------------------------------------
// 10. Auto-scale
// ---------------------------------------------------------------------------

#[test]
fn uncovered_region_asks_maestro_once_then_uses_the_new_server() {
    let (maestro, log) = fake_maestro();
    let atlas = Atlas::start(&config(&format!("auto_scale = true\nmaestro_url = \"http://{maestro}\"\nscale_cooldown = \"60s\"\n")));
    let a = region_server(&atlas, "a", 0);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=explorer&x=100&y=500&z=500", &[]).expect("connect");
    c.send_text(&move_msg(1, 100.0, 500.0, 500.0));
    assert_eq!(ack(&mut c, "in cell 0"), ("a".to_string(), 1));
    thread::sleep(Duration::from_millis(400));
    assert!(log.lock().unwrap().is_empty(), "a covered position must not ask Maestro: {:?}", log.lock().unwrap());
    c.send_text(&move_msg(2, 1500.0, 500.0, 500.0));
    assert_eq!(ack(&mut c, "in cell 1 (uncovered: stays on a)"), ("a".to_string(), 2));
    assert!(wait_for(Duration::from_secs(2), || !log.lock().unwrap().is_empty()), "no request to Maestro within 2 s; logs:\n{}", atlas.logs());
    // More positions in that cell, and another player connecting there: no second request.
    for seq in 3..=10 {
        c.send_text(&move_msg(seq, 1500.0 + 20.0 * seq as f64, 500.0, 500.0));
        assert_eq!(ack(&mut c, "still uncovered"), ("a".to_string(), seq));
        thread::sleep(Duration::from_millis(50));
    }
    let _other = WsClient::connect(atlas.addr(), "/play?player_id=other&x=1600&y=500&z=500", &[]).expect("connect a second player");
    thread::sleep(Duration::from_millis(800));
    let reqs = log.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1, "exactly one request within the cooldown: {reqs:?}");
    let (method, path, body) = &reqs[0];
    assert_eq!((method.as_str(), path.as_str()), ("POST", "/instances"));
    assert!(body["name"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
    assert!(body["image"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
    let ports = body["ports"].as_array().unwrap_or_else(|| panic!("ports: {body}"));
    assert!(!ports.is_empty());
    for p in ports {
        assert!(p["host_port"].is_u64() && p["container_port"].is_u64() && p["protocol"].is_string(), "port {p}");
    }
    assert_eq!(body["environment"]["HORIZON_REGION_X"], "1", "{body}");
    assert_eq!(body["environment"]["HORIZON_REGION_Y"], "0", "{body}");
    assert_eq!(body["environment"]["HORIZON_REGION_Z"], "0", "{body}");
    assert!(body["volumes"].is_array(), "{body}");
    assert_eq!(m(&atlas, "atlas_game_scale_requests_total{result=\"ok\"}"), 1.0);

    // The new server comes up and registers for cell 1: the player moves there.
    let nb = region_server(&atlas, "new", 1);
    let mut seq = 10;
    let mut who = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while who.last().map(String::as_str) != Some("new") && Instant::now() < deadline {
        seq += 1;
        c.send_text(&move_msg(seq, 1500.0, 500.0, 500.0));
        let (srv, s) = ack(&mut c, "after the new server registered");
        assert_eq!(s, seq);
        who.push(srv);
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(who.last().map(String::as_str), Some("new"), "{who:?}");
    for _ in 0..5 {
        seq += 1;
        c.send_text(&move_msg(seq, 1500.0, 500.0, 500.0));
        assert_eq!(ack(&mut c, "on the new server"), ("new".to_string(), seq));
    }
    assert_eq!(seqs_by_time(&[&a, &nb]), (1..=seq).collect::<Vec<_>>());
    assert_eq!(log.lock().unwrap().len(), 1);
}

/// Starts Atlas on `config` with the auto-scale variables removed from (or
/// set in) its environment.
fn atlas_with_env(config_text: &str, env: &[(&str, &str)]) -> Atlas {
    let path = common::write_config(config_text);
    let mut cmd = Command::new(common::BIN);
    cmd.arg(&path).env_remove("ATLAS_AUTO_SCALE").env_remove("ATLAS_MAESTRO_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Atlas::spawn(cmd, Some(path), 1, true)
}

/// A player at x=100 walks to the uncovered x=1500; returns how many
/// requests Maestro got within `wait`.
fn uncovered_walk(atlas: &Atlas, log: &MaestroLog, wait: Duration) -> usize {
    let _a = region_server(atlas, "a", 0);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=x1&x=100&y=500&z=500", &[]).expect("connect");
    for (seq, x) in [(1, 500.0), (2, 1500.0), (3, 1510.0)] {
        c.send_text(&move_msg(seq, x, 500.0, 500.0));
        assert_eq!(ack(&mut c, "walk").1, seq);
    }
    let _c2 = WsClient::connect(atlas.addr(), "/play?player_id=x2&x=1600&y=500&z=500", &[]).expect("connect");
    wait_for(wait, || !log.lock().unwrap().is_empty());
    thread::sleep(Duration::from_millis(300));
    let n = log.lock().unwrap().len();
    n
}

#[test]
fn auto_scale_off_by_default_sends_no_request() {
    let (maestro, log) = fake_maestro();
    let atlas = atlas_with_env(&config(&format!("maestro_url = \"http://{maestro}\"\nscale_cooldown = \"60s\"\n")), &[]);
    assert_eq!(uncovered_walk(&atlas, &log, Duration::from_millis(1200)), 0, "{:?}", log.lock().unwrap());
}

#[test]
fn atlas_auto_scale_environment_turns_it_on() {
    let (maestro, log) = fake_maestro();
    let maestro_url = format!("http://{maestro}");
    let atlas = atlas_with_env(&config(""), &[("ATLAS_AUTO_SCALE", "true"), ("ATLAS_MAESTRO_URL", &maestro_url)]);
    assert_eq!(uncovered_walk(&atlas, &log, Duration::from_secs(2)), 1, "{:?}; logs:\n{}", log.lock().unwrap(), atlas.logs());
}

// ---------------------------------------------------------------------------
// 11. Keepalive
// ---------------------------------------------------------------------------

#[test]
fn idle_client_gets_a_keepalive_ping() {
    let (_atlas, _a, mut c) = one_player("ping_interval = \"200ms\"\n", "idle");
    let start = Instant::now();
    c.set_timeout(Duration::from_secs(1));
    let f = c.recv().expect("a ping within 1 s");
    assert_eq!(f.opcode, OP_PING, "{f:?}");
    eprintln!("ping after {:?}", start.elapsed());
    c.send_pong(&f.payload);
    c.set_timeout(Duration::from_secs(5));
    c.send_text(&chat(2));
    assert_eq!(ack(&mut c, "after the pong"), ("a".to_string(), 2));
}

#[test]
fn no_ping_when_ping_interval_is_0s() {
    let (_atlas, _a, mut c) = one_player("ping_interval = \"0s\"\n", "quiet");
    c.set_timeout(Duration::from_millis(800));
    let r = c.recv();
    assert!(r.as_ref().is_err_and(|e| e.starts_with("timeout")), "expected nothing, got {r:?}");
}

#[test]
fn idle_timeout_closes_an_idle_client_but_not_an_active_one() {
    let atlas = Atlas::start(&config("idle_timeout = \"500ms\"\nping_interval = \"0s\"\n"));
    let _a = region_server(&atlas, "a", 0);
    let addr = atlas.addr();
    // An active player, in parallel: one message every 150 ms for 1.5 s.
    let active = thread::spawn(move || {
        let mut c = WsClient::connect(addr, "/play?player_id=busy&x=100&y=500&z=500", &[]).expect("connect");
        for seq in 1..=10 {
            c.send_text(&chat(seq));
            let (_, s) = ack(&mut c, "active player");
            assert_eq!(s, seq);
            thread::sleep(Duration::from_millis(150));
        }
    });
    let mut c = WsClient::connect(addr, "/play?player_id=sleepy&x=100&y=500&z=500", &[]).expect("connect");
    let start = Instant::now();
    c.set_timeout(Duration::from_millis(2500));
    let first = c.recv();
    let at = start.elapsed();
    match &first {
        Ok(f) => assert_eq!(f.close_code(), Some(1001), "expected a close 1001, got {f:?}"),
        Err(e) => assert!(e.starts_with("EOF") || e.starts_with("read error"), "expected close or EOF within 2 s, got {e}"),
    }
    assert!(at >= Duration::from_millis(400), "closed after {at:?}, before the idle timeout");
    eprintln!("idle client closed after {at:?}: {first:?}");
    assert!(connection_ends(&mut c, Duration::from_secs(2)));
    active.join().expect("the active player must not be closed");
}

// ---------------------------------------------------------------------------
// 12. Pipelining
// ---------------------------------------------------------------------------

#[test]
fn five_thousand_pipelined_messages_each_way_exactly_once_in_order() {
    let _serial = serial();
    const N: u64 = 5000;
    const PUSHES: u64 = 2000;
    let atlas = Atlas::start(&config(""));
    let a = Arc::new(region_server(&atlas, "a", 0));
    let (mut w, mut r) = raw_client(atlas.addr(), "/play?player_id=pipe&x=100&y=500&z=500");
    assert!(wait_for(Duration::from_secs(2), || a.open_connections() == 1));
    // Client -> server: all frames in one write, from another thread.
    let writer = thread::spawn(move || {
        let mut all = Vec::new();
        for seq in 1..=N {
            all.extend(game::encode_frame(true, OP_TEXT, chat(seq).as_bytes(), Some(game::random_mask())));
        }
        w.write_all(&all).expect("write the pipelined messages");
    });
    // Server -> client, at the same time: pushes.
    let a2 = a.clone();
    let pusher = thread::spawn(move || {
        for i in 0..PUSHES {
            assert!(a2.push(0, &format!(r#"{{"type":"push","i":{i}}}"#)), "push {i}");
        }
    });
    let (mut acks, mut pushes) = (Vec::new(), Vec::new());
    while (acks.len() as u64) < N || (pushes.len() as u64) < PUSHES {
        let f: Frame = game::read_frame(&mut r).unwrap_or_else(|e| panic!("after {} acks and {} pushes: {e}", acks.len(), pushes.len()));
        match f.opcode {
            OP_PING => continue,
            OP_TEXT => {}
            op => panic!("unexpected opcode {op}: {:?}", f.text()),
        }
        let v: Value = serde_json::from_slice(&f.payload).expect("JSON");
        match v["type"].as_str() {
            Some("ack") => acks.push((v["seq"].as_u64().unwrap(), v["n"].as_u64().unwrap())),
            Some("push") => pushes.push(v["i"].as_u64().unwrap()),
            _ => panic!("unexpected {v}"),
        }
    }
    writer.join().unwrap();
    pusher.join().unwrap();
    assert!(acks.iter().enumerate().all(|(i, &(seq, n))| seq == i as u64 + 1 && n == i as u64 + 1), "acks out of order");
    assert_eq!(pushes, (0..PUSHES).collect::<Vec<_>>());
    assert_eq!(seqs(&a), (1..=N).collect::<Vec<_>>());
    let text = metrics(&atlas);
    assert_eq!(metric(&text, "atlas_game_messages_total{direction=\"client_to_server\"}"), N as f64);
    assert_eq!(metric(&text, "atlas_game_messages_total{direction=\"server_to_client\"}"), (N + PUSHES) as f64);
}

/// A game server that floods a player who does not read: Atlas must not
/// buffer the flood (its writes to the client are one at a time, so the
/// backend reader stops and the server's socket fills) and, once the
/// player reads, every frame arrives whole and in order.
#[test]
fn a_flooding_server_is_held_back_by_a_client_that_does_not_read() {
    let _serial = serial();
    let atlas = Atlas::start(&config(""));
    let listener = raw_server(&atlas, "flood");
    const FRAME: usize = 16 * 1024;
    // The server: handshake, then 16 KiB binary frames (sequence number
    // first) until a write has been stuck for a second; returns how many
    // whole frames it wrote.
    let server = thread::spawn(move || {
        let mut s = accept_upgrade(&listener);
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut frames = 0u64;
        while Instant::now() < deadline {
            let mut payload = vec![0x5a; FRAME];
            payload[..8].copy_from_slice(&frames.to_be_bytes());
            if s.write_all(&game::encode_frame(true, OP_BINARY, &payload, None)).is_err() {
                return (frames, true, s);
            }
            frames += 1;
        }
        (frames, false, s)
    });
    let (_w, mut r) = raw_client(atlas.addr(), "/play?player_id=sleepy&x=100&y=500&z=500");
    let (frames, stuck, _keep) = server.join().unwrap();
    assert!(stuck, "the server wrote {frames} frames for 20 s without ever being held back");
    // What sits in socket buffers on the way (kernel autotuning can reach a
    // few MiB per socket) plus a read buffer in Atlas: far below what an
    // unbounded queue would have taken in.
    let held = frames * FRAME as u64;
    assert!(held < 48 << 20, "{} MiB went out before the server was held back", held >> 20);
    // Now read: every whole frame the server wrote, in order.
    for want in 0..frames {
        let f = game::read_frame(&mut r).unwrap_or_else(|e| panic!("frame {want} of {frames}: {e}"));
        assert_eq!(f.opcode, OP_BINARY);
        assert_eq!(f.payload.len(), FRAME);
        assert_eq!(u64::from_be_bytes(f.payload[..8].try_into().unwrap()), want);
    }
}

/// A reload gives every session new settings (the ticker swaps them in).
/// A client reader waiting on a held-back server write used to hold a
/// borrow of its settings across that wait, so the swap panicked the worker.
#[test]
fn a_reload_while_a_client_write_is_held_back_keeps_the_session_and_the_worker() {
    let _serial = serial();
    let atlas = Atlas::start(&config(""));
    let listener = raw_server(&atlas, "sleepy-server");
    const FRAME: usize = 16 * 1024;
    // The server: handshake, then reads nothing until told to, then checks
    // `n` whole frames arrive in order.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<u64>();
    let server = thread::spawn(move || {
        let w = accept_upgrade(&listener);
        let mut r = BufReader::new(w.try_clone().unwrap());
        let n = go_rx.recv().unwrap();
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for want in 0..n {
            let f = game::read_frame(&mut r).unwrap_or_else(|e| panic!("frame {want} of {n}: {e}"));
            assert_eq!(f.payload.len(), FRAME);
            assert_eq!(u64::from_be_bytes(f.payload[..8].try_into().unwrap()), want, "frames out of order");
        }
        n
    });
    let (mut w, _r) = raw_client(atlas.addr(), "/play?player_id=pusher&x=100&y=500&z=500");
    // Flood until Atlas stops taking the client's bytes: its reader is then
    // waiting on the server write.
    w.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut sent = 0u64;
    loop {
        let mut payload = vec![0x5a; FRAME];
        payload[..8].copy_from_slice(&sent.to_be_bytes());
        if w.write_all(&game::encode_frame(true, OP_BINARY, &payload, Some(game::random_mask()))).is_err() {
            break;
        }
        sent += 1;
        assert!(sent < 20_000, "the client was never held back");
    }
    // Reload (same file, new settings object) and give the ticker a few ticks.
    atlas.signal("HUP");
    assert!(atlas.wait_log("reload", 1, Duration::from_secs(5)), "no reload logged:\n{}", atlas.logs());
    thread::sleep(Duration::from_millis(500));
    go_tx.send(sent).unwrap();
    assert_eq!(server.join().expect("the server saw its frames"), sent);
    assert!(!atlas.logs().contains("panicked"), "a worker panicked:\n{}", atlas.logs());
    // The worker still takes new players.
    let s2 = region_server(&atlas, "after-reload", 1);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=later&x=1500&y=500&z=500", &[]).expect("a new session after the reload");
    c.send_text("hello");
    assert!(s2.wait_received(1, Duration::from_secs(5)), "the new session relays nothing");
    assert_eq!(s2.received()[0].text, "hello");
}

// ---------------------------------------------------------------------------
// 13. TLS
// ---------------------------------------------------------------------------

#[test]
fn websocket_over_a_tls_game_listener() {
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

    let dir = common::TempDir::new();
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).expect("self-signed cert");
    let cert_path = dir.write("cert.pem", cert.pem());
    let key_path = dir.write("key.pem", key.serialize_pem());
    let tls = format!("\n[listen.tls]\ncert = {:?}\nkey = {:?}\n", common::path_of(&cert_path), common::path_of(&key_path));
    let atlas = Atlas::start(&config_with(&tls, ""));
    let a = region_server(&atlas, "a", 0);

    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(cert.der().to_vec())).unwrap();
    let cfg = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(atlas.addr()).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut t = StreamOwned::new(conn, tcp);
    let (head, leftover, key) = upgrade(&mut t, "localhost", "/play?player_id=secure&x=100&y=500&z=500");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(header_of(&head, "sec-websocket-accept"), Some(game::accept_key(&key)));
    assert!(leftover.is_empty());
    let mut frames = Vec::new();
    frames.extend(game::encode_frame(true, OP_TEXT, move_msg(1, 100.0, 500.0, 500.0).as_bytes(), Some(game::random_mask())));
    frames.extend(game::encode_frame(true, OP_PING, b"tls", Some(game::random_mask())));
    t.write_all(&frames).unwrap();
    t.flush().unwrap();
    let f = game::read_frame(&mut t).expect("ack over TLS");
    let v: Value = serde_json::from_slice(&f.payload).expect("JSON ack");
    assert_eq!((f.opcode, v["type"].as_str(), v["server"].as_str(), v["seq"].as_u64()), (OP_TEXT, Some("ack"), Some("a"), Some(1)), "{v}");
    let f = game::read_frame(&mut t).expect("pong over TLS");
    assert_eq!((f.opcode, f.payload.as_slice()), (OP_PONG, &b"tls"[..]));
    // The server saw a plain WebSocket with the usual headers.
    let conn = &a.connections()[0];
    assert_eq!(conn.header("x-atlas-player-id"), Some("secure"));
    assert_eq!(conn.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seqs(&a), vec![1]);
    // Clean close over TLS.
    t.write_all(&game::encode_frame(true, OP_CLOSE, &game::close_payload(1000, ""), Some(game::random_mask()))).unwrap();
    let f = game::read_frame(&mut t).expect("close answer over TLS");
    assert_eq!(f.close_code(), Some(1000));
}
