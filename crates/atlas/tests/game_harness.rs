//! Self-test of the game test harness (`support/game.rs`): a client talks
//! straight to a `GameServer`, no Atlas involved, so the harness is known
//! good before the gateway tests rely on it.

#[path = "support/game.rs"]
mod game;

use std::io::{Cursor, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use game::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Primitives
// ---------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn sha1_base64_and_accept_key_vectors() {
    assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    assert_eq!(hex(&sha1(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
    assert_eq!(hex(&sha1(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")), "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
    assert_eq!(hex(&sha1(&vec![b'a'; 1_000_000])), "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
    for (input, out) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")] {
        assert_eq!(base64_encode(input.as_bytes()), out, "base64 of {input:?}");
    }
    // RFC 6455 section 1.3.
    assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn frames_round_trip_with_all_length_forms() {
    for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        for mask in [None, Some(random_mask())] {
            let bytes = encode_frame(len % 2 == 0, OP_BINARY, &payload, mask);
            let header = match len {
                0..=125 => 2,
                126..=65535 => 4,
                _ => 10,
            } + if mask.is_some() { 4 } else { 0 };
            assert_eq!(bytes.len(), header + len, "encoded size, len {len}, mask {mask:?}");
            let frame = read_frame(&mut Cursor::new(&bytes)).expect("read_frame");
            assert_eq!(frame, Frame { fin: len % 2 == 0, opcode: OP_BINARY, payload: payload.clone() });
            let (parsed, used) = parse_frame(&bytes).unwrap().expect("complete frame");
            assert_eq!((parsed, used), (frame, bytes.len()));
            assert_eq!(parse_frame(&bytes[..bytes.len() - 1]).unwrap(), None, "incomplete frame, len {len}");
        }
    }
    // RFC 6455 section 5.7: a masked "Hello".
    let hello = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
    assert_eq!(read_frame(&mut Cursor::new(&hello[..])).unwrap(), Frame { fin: true, opcode: OP_TEXT, payload: b"Hello".to_vec() });
    assert_eq!(encode_frame(true, OP_TEXT, b"Hello", Some([0x37, 0xfa, 0x21, 0x3d])), hello);
    // Random masks differ.
    assert_ne!(random_mask(), random_mask());
    assert_eq!(move_msg(3, 1.5, -2.0, 0.0), r#"{"type":"move","x":1.5,"y":-2.0,"z":0.0,"seq":3}"#);
    let h: Value = serde_json::from_str(&horizon_move(4, 1.0, 2.0, 3.0)).unwrap();
    assert_eq!(h, json!({"namespace":"movement","event":"move_request","data":{"target_x":1.0,"target_y":2.0,"target_z":3.0},"seq":4}));
}

// ---------------------------------------------------------------------------
// Client <-> GameServer
// ---------------------------------------------------------------------------

#[test]
fn two_hundred_moves_are_acked_in_order() {
    let server = GameServer::start("alpha");
    let mut client = WsClient::connect(server.addr(), "/ws?room=1", &[("X-Atlas-Player-Id", "player-42")]).expect("connect");
    assert!(client.response_header("sec-websocket-accept").is_some());
    let conns = server.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].path, "/ws?room=1");
    assert_eq!(conns[0].header("x-atlas-player-id"), Some("player-42"));
    assert_eq!(server.header(0, "X-ATLAS-PLAYER-ID").as_deref(), Some("player-42"));
    assert_eq!(server.open_connections(), 1);

    let mut walker = Walker::new((0.0, 0.0, 0.0), (1.0, 0.5, 0.0));
    let mut sent = Vec::new();
    for _ in 0..200 {
        let (seq, msg) = walker.next_msg();
        if seq % 9 == 0 {
            client.send_text_fragmented(&msg, 3);
        } else if seq % 10 == 0 {
            // By hand: three frames, the middle one a continuation.
            let b = msg.as_bytes();
            client.send_frame(false, OP_TEXT, &b[..5], true);
            client.send_frame(false, OP_CONTINUATION, &b[5..12], true);
            client.send_frame(true, OP_CONTINUATION, &b[12..], true);
        } else {
            client.send_text(&msg);
        }
        sent.push(msg);
    }
    for i in 1..=200u64 {
        let ack = client.recv_json().unwrap_or_else(|e| panic!("ack {i}: {e}"));
        assert_eq!(ack, json!({"type":"ack","server":"alpha","seq":i,"n":i}));
    }
    let received = server.received();
    assert_eq!(received.len(), 200);
    for (r, msg) in received.iter().zip(&sent) {
        assert_eq!(r.conn, 0);
        assert_eq!(r.player.as_deref(), Some("player-42"));
        assert_eq!(&r.text, msg);
    }
    assert!(received.windows(2).all(|w| w[0].at <= w[1].at));
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn messages_without_seq_get_no_reply_and_counters_are_per_connection() {
    let server = GameServer::start("beta");
    let mut a = WsClient::connect(server.addr(), "/", &[]).unwrap();
    let mut b = WsClient::connect(server.addr(), "/", &[]).unwrap();
    a.send_text("not json");
    a.send_text(r#"{"type":"chat","text":"hi"}"#);
    a.send_text(r#"{"seq":"7"}"#);
    a.send_text(&move_msg(7, 1.0, 2.0, 3.0));
    b.send_text(&move_msg(100, 0.0, 0.0, 0.0));
    assert_eq!(a.recv_json().unwrap(), json!({"type":"ack","server":"beta","seq":7,"n":1}));
    assert_eq!(b.recv_json().unwrap(), json!({"type":"ack","server":"beta","seq":100,"n":1}));
    b.send_text(&horizon_move(101, 0.0, 0.0, 0.0));
    assert_eq!(b.recv_json().unwrap(), json!({"type":"ack","server":"beta","seq":101,"n":2}));
    assert!(server.wait_received(6, WAIT));
    let from_a: Vec<String> = server.received_from(0).into_iter().map(|r| r.text).collect();
    assert_eq!(from_a[0], "not json");
    assert_eq!(from_a.len(), 4);
    assert_eq!(server.received_from(1).len(), 2);
    assert!(server.received().iter().all(|r| r.player.is_none()));

    // Nothing else is pending for a.
    a.set_timeout(Duration::from_millis(200));
    let err = a.recv().unwrap_err();
    assert!(err.contains("timeout"), "{err}");
    a.set_timeout(WAIT);

    // Pushes.
    assert!(server.push(1, "only b"));
    assert_eq!(b.recv_text().unwrap(), "only b");
    assert_eq!(server.push_all(r#"{"type":"tick"}"#), 2);
    assert_eq!(a.recv_text().unwrap(), r#"{"type":"tick"}"#);
    assert_eq!(b.recv_text().unwrap(), r#"{"type":"tick"}"#);
    assert!(!server.push(99, "nobody"));
}

#[test]
fn ping_binary_and_close_handshake() {
    let server = GameServer::start("gamma");
    let mut client = WsClient::connect(server.addr(), "/", &[]).unwrap();
    client.send_ping(b"are you there");
    let pong = client.recv().unwrap();
    assert_eq!(pong, Frame { fin: true, opcode: OP_PONG, payload: b"are you there".to_vec() });

    let data: Vec<u8> = (0..70_000u32).map(|i| (i % 256) as u8).collect();
    client.send_binary(&data);
    let echo = client.recv().unwrap();
    assert_eq!((echo.opcode, echo.fin, echo.payload.len()), (OP_BINARY, true, data.len()));
    assert!(echo.payload == data);

    // recv_text answers pings on the way... from the server side there are
    // none, so just check it skips a pong.
    client.send_ping(b"x");
    client.send_text(&move_msg(1, 0.0, 0.0, 0.0));
    assert_eq!(client.recv_json().unwrap()["seq"], 1);

    client.send_close(1000, "bye");
    let close = client.recv().unwrap();
    assert_eq!(close.opcode, OP_CLOSE);
    assert_eq!(close.close_code(), Some(1000));
    let err = client.recv().unwrap_err();
    assert!(err.contains("EOF"), "{err}");
    assert_eq!(server.closes(), vec![(0, 1000)]);
    assert!(wait_for(WAIT, || server.open_connections() == 0));

    // recv_text reports the close.
    let mut c2 = WsClient::connect(server.addr(), "/", &[]).unwrap();
    c2.send_close(1001, "going away");
    let err = c2.recv_text().unwrap_err();
    assert!(err.starts_with("close 1001"), "{err}");
    assert_eq!(server.closes(), vec![(0, 1000), (1, 1001)]);

    // Server-initiated close.
    let mut c3 = WsClient::connect(server.addr(), "/", &[]).unwrap();
    assert!(server.close(2, 4000, "region moved"));
    assert_eq!(c3.recv_text().unwrap_err(), "close 4000 region moved");
    c3.send_close(4000, "");
    assert!(wait_for(WAIT, || server.open_connections() == 0));
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn protocol_violations_close_with_1002() {
    let server = GameServer::start("delta");
    // Unmasked client frame.
    let mut c = WsClient::connect(server.addr(), "/", &[]).unwrap();
    c.send_frame(true, OP_TEXT, b"{\"seq\":1}", false);
    assert!(c.recv_text().unwrap_err().starts_with("close 1002"));
    // Continuation without a start.
    let mut c = WsClient::connect(server.addr(), "/", &[]).unwrap();
    c.send_frame(true, OP_CONTINUATION, b"x", true);
    assert!(c.recv_text().unwrap_err().starts_with("close 1002"));
    // Fragmented ping.
    let mut c = WsClient::connect(server.addr(), "/", &[]).unwrap();
    c.send_frame(false, OP_PING, b"x", true);
    assert!(c.recv_text().unwrap_err().starts_with("close 1002"));
    // Garbage header (reserved bits).
    let mut c = WsClient::connect(server.addr(), "/", &[]).unwrap();
    c.send_raw(&[0xF1, 0x80, 0, 0, 0, 0]).unwrap();
    assert!(c.recv_text().unwrap_err().starts_with("close 1002"));
    // Invalid UTF-8.
    let mut c = WsClient::connect(server.addr(), "/", &[]).unwrap();
    c.send_frame(true, OP_TEXT, &[0xff, 0xfe], true);
    assert!(c.recv_text().unwrap_err().starts_with("close 1007"));
    assert_eq!(server.errors().len(), 5, "{:?}", server.errors());
    assert!(wait_for(WAIT, || server.open_connections() == 0));
    // The server still works.
    let mut c = WsClient::connect(server.addr(), "/", &[]).unwrap();
    c.send_text(&move_msg(5, 0.0, 0.0, 0.0));
    assert_eq!(c.recv_json().unwrap()["seq"], 5);
}

#[test]
fn bad_handshakes_are_rejected() {
    let server = GameServer::start("epsilon");
    let (status, head) = WsClient::raw_handshake(server.addr(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 400, "{head}");
    let (status, head) = WsClient::raw_handshake(
        server.addr(),
        "GET /ok HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(status, 101, "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    let err = WsClient::connect(server.addr(), "/", &[("Sec-WebSocket-Version", "8")]).err().expect("version 8 refused");
    assert!(err.contains("400"), "{err}");
    assert_eq!(server.errors().len(), 2);
    assert_eq!(server.connections().len(), 1);
    assert_eq!(server.connections()[0].path, "/ok");
}

/// A fake WebSocket server answering every request with `response`.
fn fake_ws_server(response: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.set_read_timeout(Some(WAIT));
            let mut buf = Vec::new();
            let mut tmp = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut tmp) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            let _ = s.write_all(response);
            thread::sleep(Duration::from_millis(200));
        }
    });
    addr
}

#[test]
fn connect_checks_status_and_accept_key() {
    let addr = fake_ws_server(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    );
    let err = WsClient::connect(addr, "/", &[]).err().expect("wrong accept key must fail");
    assert!(err.contains("Sec-WebSocket-Accept"), "{err}");

    let addr = fake_ws_server(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
    assert!(WsClient::connect(addr, "/", &[]).is_err());

    let addr = fake_ws_server(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
    let err = WsClient::connect(addr, "/", &[]).err().expect("403 must fail");
    assert!(err.contains("HTTP/1.1 403 Forbidden"), "{err}");

    // With the client's key fixed, the right accept key passes and bytes
    // sent right after the head are kept as frames.
    let addr = fake_ws_server(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi");
    let mut c = WsClient::connect(addr, "/", &[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]).expect("right accept key");
    assert_eq!(c.recv_text().unwrap(), "hi");
}

#[test]
fn kill_breaks_connections_and_refuses_new_ones() {
    let server = GameServer::start("zeta");
    let mut a = WsClient::connect(server.addr(), "/", &[]).unwrap();
    let mut b = WsClient::connect(server.addr(), "/", &[]).unwrap();
    a.send_text(&move_msg(1, 0.0, 0.0, 0.0));
    assert_eq!(a.recv_json().unwrap()["n"], 1);
    assert_eq!(server.open_connections(), 2);
    server.kill();
    assert!(server.is_killed());
    assert_eq!(server.open_connections(), 0);
    let err = a.recv().unwrap_err();
    assert!(!err.contains("timeout"), "{err}");
    let err = b.recv_text().unwrap_err();
    assert!(!err.contains("timeout"), "{err}");
    assert!(TcpStream::connect_timeout(&server.addr(), WAIT).is_err(), "connect after kill must be refused");
    assert!(WsClient::connect(server.addr(), "/", &[]).is_err());
}

// ---------------------------------------------------------------------------
// Registration with a fake Atlas API
// ---------------------------------------------------------------------------

struct Request {
    head: String,
    method: String,
    path: String,
    body: Value,
}

impl Request {
    fn header(&self, name: &str) -> Option<String> {
        self.head.split("\r\n").skip(1).filter_map(|l| l.split_once(':')).find(|(n, _)| n.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string())
    }
}

/// A fake Atlas API: each request goes to the channel; `answer` gives the
/// status and raw body for (method, path).
fn fake_api(answer: fn(&str, &str) -> (u16, &'static str, bool)) -> (SocketAddr, mpsc::Receiver<Request>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(WAIT));
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            let head_end = loop {
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(p + 4);
                }
                match s.read(&mut tmp) {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let len = head
                .split("\r\n")
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                match s.read(&mut tmp) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            let mut parts = head.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            let body = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
            let (status, text, chunked) = answer(&method, &path);
            let resp = if chunked {
                let (a, b) = text.split_at(text.len() / 2);
                format!("HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n", a.len(), b.len())
            } else {
                format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len())
            };
            let _ = s.write_all(resp.as_bytes());
            let _ = tx.send(Request { head, method, path, body });
        }
    });
    (addr, rx)
}

fn api_answers(method: &str, path: &str) -> (u16, &'static str, bool) {
    match (method, path) {
        ("POST", "/api/v1/servers/register") => (201, r#"{"server_id":"srv-123","status":"registered"}"#, false),
        ("PUT", "/api/v1/servers/srv-123/heartbeat") => (200, r#"{"ok":true,"commands":[{"type":"drain"}]}"#, false),
        ("DELETE", "/api/v1/servers/srv-123") => (204, "", false),
        ("GET", "/chunked") => (200, r#"{"chunked":[1,2,3]}"#, true),
        _ => (404, r#"{"error":"not found"}"#, false),
    }
}

#[test]
fn register_heartbeat_and_unregister_like_horizon() {
    let (api, requests) = fake_api(api_answers);
    let server = GameServer::start("eu-west-1");
    assert!(server.heartbeat(api).is_err(), "heartbeat before register");
    let resp = server.register(api, (1, -2, 0), (1000.0, -2000.0, 0.0), 500.0, 100).expect("register");
    assert_eq!(resp["status"], "registered");
    assert_eq!(server.server_id().as_deref(), Some("srv-123"));

    let req = requests.recv_timeout(WAIT).unwrap();
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/api/v1/servers/register"));
    assert_eq!(req.header("connection").as_deref(), Some("close"));
    assert_eq!(req.header("content-type").as_deref(), Some("application/json"));
    assert!(req.header("authorization").is_none());
    assert!(req.head.starts_with("POST /api/v1/servers/register HTTP/1.1\r\n"), "{}", req.head);
    let b = &req.body;
    assert_eq!(b["name"], "eu-west-1");
    assert_eq!(b["address"], format!("127.0.0.1:{}", server.addr().port()));
    assert_eq!(b["region_coord"], json!({"x":1,"y":-2,"z":0}));
    assert_eq!(b["center"], json!({"x":1000.0,"y":-2000.0,"z":0.0}));
    assert_eq!(b["bounds"], 500.0);
    assert_eq!(b["capacity"], 100);
    assert_eq!(b["version"], "0.3.1");
    assert_eq!(b["metadata"], json!({}));

    let _client = WsClient::connect(server.addr(), "/", &[]).unwrap();
    let hb = server.heartbeat(api).expect("heartbeat");
    assert_eq!(hb["ok"], true);
    let req = requests.recv_timeout(WAIT).unwrap();
    assert_eq!((req.method.as_str(), req.path.as_str()), ("PUT", "/api/v1/servers/srv-123/heartbeat"));
    assert_eq!(req.header("connection").as_deref(), Some("close"));
    assert_eq!(req.body, json!({"server_id":"srv-123","current_connections":1,"load":0.01,"accepting_connections":true,"avg_tick_ms":0.0,"memory_bytes":0}));
    assert_eq!(server.commands(), vec![json!({"type":"drain"})]);

    // Background heartbeats.
    server.start_heartbeats(api, Duration::from_millis(30));
    for _ in 0..3 {
        let req = requests.recv_timeout(WAIT).expect("background heartbeat");
        assert_eq!(req.path, "/api/v1/servers/srv-123/heartbeat");
    }
    server.stop_heartbeats();
    while requests.recv_timeout(Duration::from_millis(100)).is_ok() {}
    let count = server.heartbeat_count();
    assert!(count >= 4, "{count}");
    thread::sleep(Duration::from_millis(150));
    assert_eq!(server.heartbeat_count(), count, "heartbeats after stop_heartbeats");
    assert!(requests.try_recv().is_err());
    assert_eq!(server.commands().len(), count);

    assert_eq!(server.unregister(api), Ok(204));
    let req = requests.recv_timeout(WAIT).unwrap();
    assert_eq!((req.method.as_str(), req.path.as_str()), ("DELETE", "/api/v1/servers/srv-123"));

    // Failures and the plain helpers.
    let other = GameServer::start("nowhere");
    fn refuse(_: &str, _: &str) -> (u16, &'static str, bool) {
        (409, r#"{"error":"duplicate"}"#, false)
    }
    let (api2, _requests2) = fake_api(refuse);
    let err = other.register(api2, (0, 0, 0), (0.0, 0.0, 0.0), 1.0, 1).unwrap_err();
    assert!(err.contains("409") && err.contains("duplicate"), "{err}");
    assert_eq!(other.server_id(), None);

    assert_eq!(http_json(api, "GET", "/chunked", None, &[]).unwrap(), (200, json!({"chunked":[1,2,3]})));
    assert_eq!(http_json(api, "GET", "/missing", None, &[("X-Test", "1")]).unwrap(), (404, json!({"error":"not found"})));
    let (status, text) = http_raw(api, "GET /missing HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 404);
    assert!(text.ends_with(r#"{"error":"not found"}"#), "{text}");
}
