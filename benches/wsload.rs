//! WebSocket load tool for the game-gateway benchmarks (`scripts/bench-game`),
//! built as `cargo build --release -p atlas --example wsload`.
//!
//!   wsload echo   LISTEN [API NAME CX]   WS echo server; registers at API as a
//!                                         Horizon server for cell (CX,0,0) of 1000 units
//!   wsload relay  TARGET CONNS SECS SIZE WINDOW   echo round trips; prints msgs/s
//!   wsload idle   TARGET CONNS HOLD_SECS  opens CONNS idle sessions and holds them
//!   wsload walk   TARGET PLAYERS CROSSINGS  players walk across the border at
//!                                         x=1000 and back; checks every message is
//!                                         echoed exactly once, in order
//!
//! Only std: blocking sockets, a thread per connection (idle: one thread).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn frame(op: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut out = vec![0x80 | op];
    let m = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n < 65536 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key = [0x12, 0x34, 0x56, 0x78];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Parses whole frames from `buf`; returns (opcode, payload unmasked) and consumed bytes.
fn frames(buf: &[u8]) -> (Vec<(u8, Vec<u8>)>, usize) {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let b = &buf[i..];
        if b.len() < 2 {
            break;
        }
        let masked = b[1] & 0x80 != 0;
        let (len, mut h) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize, 10),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        let key = if masked {
            if b.len() < h + 4 {
                break;
            }
            h += 4;
            Some([b[h - 4], b[h - 3], b[h - 2], b[h - 1]])
        } else {
            None
        };
        if b.len() < h + len {
            break;
        }
        let mut p = b[h..h + len].to_vec();
        if let Some(k) = key {
            p.iter_mut().enumerate().for_each(|(j, x)| *x ^= k[j % 4]);
        }
        out.push((b[0] & 0x0f, p));
        i += h + len;
    }
    (out, i)
}

fn read_head(s: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(std::io::Error::other("closed during handshake"));
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(p + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
    }
}

fn connect(target: SocketAddr, path: &str) -> std::io::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(target)?;
    s.set_nodelay(true)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let (head, rest) = read_head(&mut s)?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(std::io::Error::other(format!("handshake refused: {}", head.lines().next().unwrap_or(""))));
    }
    Ok((s, rest))
}

fn echo_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let Ok((head, mut buf)) = read_head(&mut s) else { return };
    let key =
        head.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ").or_else(|| l.strip_prefix("sec-websocket-key: "))).unwrap_or("").trim().to_string();
    let accept = accept_key(&key);
    let resp = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
    if s.write_all(resp.as_bytes()).is_err() {
        return;
    }
    let mut tmp = vec![0u8; 64 * 1024];
    loop {
        let (fs, used) = frames(&buf);
        buf.drain(..used);
        let mut out = Vec::new();
        for (op, p) in fs {
            match op {
                1 | 2 => out.extend(frame(op, &p, false)),
                9 => out.extend(frame(10, &p, false)),
                8 => {
                    out.extend(frame(8, &p, false));
                    let _ = s.write_all(&out);
                    return;
                }
                _ => {}
            }
        }
        if !out.is_empty() && s.write_all(&out).is_err() {
            return;
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

// SHA-1 (for the accept key; the tool has no dependencies).
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(chunk[i * 4..i * 4 + 4].try_into().unwrap());
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn accept_key(key: &str) -> String {
    let d = sha1(format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes());
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in d.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn http(api: &str, method: &str, path: &str, body: &str) -> String {
    let Ok(mut s) = TcpStream::connect(api) else { return String::new() };
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: atlas\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn echo(args: &[String]) {
    let l = TcpListener::bind(&args[0]).expect("bind");
    let addr = l.local_addr().unwrap();
    if let (Some(api), Some(name), Some(cx)) = (args.get(1), args.get(2), args.get(3).and_then(|c| c.parse::<i64>().ok())) {
        let c = cx as f64 * 1000.0 + 500.0;
        let body = format!(
            "{{\"name\":\"{name}\",\"address\":\"{addr}\",\"region_coord\":{{\"x\":{cx},\"y\":0,\"z\":0}},\"center\":{{\"x\":{c},\"y\":500.0,\"z\":500.0}},\"bounds\":500.0,\"capacity\":100000}}"
        );
        let r = http(api, "POST", "/api/v1/servers/register", &body);
        let id = r.split("\"server_id\":\"").last().and_then(|s| s.split('"').next()).unwrap_or("").to_string();
        println!("registered {name} as {id}");
        let api = api.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            http(&api, "PUT", &format!("/api/v1/servers/{id}/heartbeat"), "{\"current_connections\":0,\"load\":0.0,\"accepting_connections\":true}");
        });
    }
    println!("echo listening on {addr}");
    for s in l.incoming().flatten() {
        std::thread::spawn(move || echo_conn(s));
    }
}

fn relay(args: &[String]) {
    let target: SocketAddr = args[0].parse().expect("target");
    let conns: usize = args[1].parse().unwrap();
    let secs: f64 = args[2].parse().unwrap();
    let size: usize = args[3].parse().unwrap();
    let window: usize = args[4].parse().unwrap();
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let hs: Vec<_> = (0..conns)
        .map(|i| {
            let (total, stop) = (total.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut s, mut buf) = connect(target, &format!("/bench?player_id=b{i}")).expect("connect");
                let payload = vec![b'x'; size];
                let batch: Vec<u8> = (0..window).flat_map(|_| frame(2, &payload, true)).collect();
                let mut tmp = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&batch).expect("send");
                    let mut got = 0;
                    while got < window {
                        let (fs, used) = frames(&buf);
                        buf.drain(..used);
                        got += fs.len();
                        if got >= window {
                            break;
                        }
                        let n = s.read(&mut tmp).expect("recv");
                        assert!(n > 0, "closed");
                        buf.extend_from_slice(&tmp[..n]);
                    }
                    total.fetch_add(got as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Warm-up then measure.
    std::thread::sleep(Duration::from_secs_f64(secs * 0.1));
    let (t0, n0) = (Instant::now(), total.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (t1, n1) = (Instant::now(), total.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    let _ = start;
    println!("msgs {} secs {:.3} msgs_per_sec {:.0}", n1 - n0, (t1 - t0).as_secs_f64(), (n1 - n0) as f64 / (t1 - t0).as_secs_f64());
}

fn idle(args: &[String]) {
    let target: SocketAddr = args[0].parse().expect("target");
    let conns: usize = args[1].parse().unwrap();
    let hold: u64 = args[2].parse().unwrap();
    let mut held = Vec::with_capacity(conns);
    for i in 0..conns {
        match connect(target, &format!("/idle?player_id=i{i}")) {
            Ok((s, _)) => held.push(s),
            Err(e) => {
                eprintln!("connection {i}: {e}");
                break;
            }
        }
    }
    println!("idle sessions open {}", held.len());
    std::thread::sleep(Duration::from_secs(hold));
}

/// Players walk x = 900 -> 1100 -> 900 ... (border at 1000); every message
/// carries a sequence number and is echoed; each must come back once, in order.
fn walk(args: &[String]) {
    let target: SocketAddr = args[0].parse().expect("target");
    let players: usize = args[1].parse().unwrap();
    let crossings: usize = args[2].parse().unwrap();
    let lost = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..players)
        .map(|p| {
            let (lost, sent) = (lost.clone(), sent.clone());
            std::thread::spawn(move || {
                let (mut s, mut buf) = connect(target, &format!("/walk?player_id=w{p}&x=900&y=500&z=500")).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut tmp = vec![0u8; 64 * 1024];
                let mut seq = 0u64;
                for c in 0..crossings {
                    for i in 0..=40 {
                        seq += 1;
                        let x = if c % 2 == 0 { 900.0 + 5.0 * i as f64 } else { 1100.0 - 5.0 * i as f64 };
                        let msg = format!("{{\"type\":\"move\",\"x\":{x},\"y\":500,\"z\":500,\"seq\":{seq}}}");
                        s.write_all(&frame(1, msg.as_bytes(), true)).expect("send");
                        sent.fetch_add(1, Ordering::Relaxed);
                        // Wait for its echo (in order).
                        loop {
                            let (fs, used) = frames(&buf);
                            buf.drain(..used);
                            if let Some((_, body)) = fs.into_iter().find(|(op, _)| *op == 1) {
                                let text = String::from_utf8_lossy(&body);
                                let got: u64 = text.split("\"seq\":").nth(1).and_then(|t| t.trim_end_matches('}').parse().ok()).unwrap_or(0);
                                if got != seq {
                                    lost.fetch_add(1, Ordering::Relaxed);
                                    eprintln!("player {p}: expected echo {seq}, got {got}");
                                }
                                break;
                            }
                            match s.read(&mut tmp) {
                                Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                                _ => {
                                    lost.fetch_add(1, Ordering::Relaxed);
                                    eprintln!("player {p}: no echo for {seq}");
                                    return;
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for h in hs {
        let _ = h.join();
    }
    println!("sent {} lost_or_wrong {}", sent.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("echo") => echo(&args[1..]),
        Some("relay") if args.len() >= 6 => relay(&args[1..]),
        Some("idle") if args.len() >= 4 => idle(&args[1..]),
        Some("walk") if args.len() >= 4 => walk(&args[1..]),
        _ => {
            eprintln!("usage: see the header of benches/wsload.rs");
            std::process::exit(2);
        }
    }
}
