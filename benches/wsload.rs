//! WebSocket load tool for the game-gateway benchmarks (`scripts/bench-game`),
//! built as `cargo build --release -p atlas --example wsload`.
//!
//!   wsload echo   LISTEN [API NAME CX]   WS echo server; registers at API as a
//!                                         Horizon server for cell (CX,0,0) of 1000 units
//!   wsload relay  TARGET CONNS SECS SIZE WINDOW   echo round trips; prints msgs/s
//!                                         (each connection sends WINDOW messages in
//!                                         one write, then waits for all of them)
//!   wsload idle   TARGET CONNS HOLD_SECS  opens CONNS idle sessions and holds them
//!   wsload walk   TARGET PLAYERS CROSSINGS  players walk across the border at
//!                                         x=1000 and back; checks every message is
//!                                         echoed exactly once, in order
//!   wsload floor  LISTEN BACKEND [bufs]   the cheapest possible relay: one thread,
//!                                         level-triggered epoll, one recv and one
//!                                         send per readable event, no framing. Its
//!                                         CPU per message is the floor of any
//!                                         user-space proxy on this machine
//!                                         (`bufs`: a 16 KiB buffer per socket
//!                                         instead of one shared buffer)
//!
//! `echo` and `relay` run on one monoio (io_uring) thread each, so that the
//! load side stays cheap with thousands of connections and the proxy is what
//! gets measured; `idle` and `walk` use blocking std sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
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
/// The header of the first frame in `b` if it is all there: (header
/// length including any mask key, payload length, mask key).
fn frame_head(b: &[u8]) -> Option<(usize, usize, Option<[u8; 4]>)> {
    if b.len() < 2 {
        return None;
    }
    let (len, h) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if b[1] & 0x80 == 0 {
        return Some((h, len, None));
    }
    let k = b.get(h..h + 4)?;
    Some((h + 4, len, Some([k[0], k[1], k[2], k[3]])))
}

fn frames(buf: &[u8]) -> (Vec<(u8, Vec<u8>)>, usize) {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some((h, len, key)) = frame_head(&buf[i..]) {
        let b = &buf[i..];
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

/// An io_uring runtime with COOP_TASKRUN, as Atlas's workers use: without
/// it every completion the proxy causes here costs the proxy's CPU an IPI,
/// which would be charged to the proxy under test.
fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>> {
    let mut tuned = io_uring::IoUring::builder();
    tuned.setup_coop_taskrun().setup_single_issuer();
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().uring_builder(tuned).with_entries(4096).enable_timer().build().expect("io_uring runtime")
}

/// Reads into `buf` (appending) and returns it with the byte count.
async fn read_more(s: &mut monoio::net::TcpStream, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
    use monoio::buf::IoBufMut;
    use monoio::io::AsyncReadRent;
    let mut buf = buf;
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    let len = buf.len();
    let (r, slice) = s.read(buf.slice_mut(len..)).await;
    (r, slice.into_inner())
}

/// Server side of the handshake on a monoio stream; returns what followed it.
async fn accept_ws(s: &mut monoio::net::TcpStream) -> Option<Vec<u8>> {
    use monoio::io::AsyncWriteRentExt;
    let mut buf = Vec::with_capacity(4096);
    let p = loop {
        let (r, b) = read_more(s, buf).await;
        buf = b;
        if !matches!(r, Ok(n) if n > 0) {
            return None;
        }
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    let rest = buf.split_off(p + 4);
    let head = String::from_utf8_lossy(&buf).into_owned();
    let key =
        head.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ").or_else(|| l.strip_prefix("sec-websocket-key: "))).unwrap_or("").trim().to_string();
    let resp = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n", accept_key(&key));
    let (r, _) = s.write_all(resp.into_bytes()).await;
    r.ok().map(|_| rest)
}

async fn echo_conn(mut s: monoio::net::TcpStream) {
    use monoio::io::AsyncWriteRentExt;
    let _ = s.set_nodelay(true);
    let Some(mut buf) = accept_ws(&mut s).await else { return };
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        let (fs, used) = frames(&buf);
        buf.drain(..used);
        let mut close = false;
        for (op, p) in fs {
            match op {
                1 | 2 => out.extend(frame(op, &p, false)),
                9 => out.extend(frame(10, &p, false)),
                8 => {
                    out.extend(frame(8, &p, false));
                    close = true;
                    break;
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            let (r, b) = s.write_all(out).await;
            out = b;
            out.clear();
            if r.is_err() {
                return;
            }
        }
        if close {
            return;
        }
        let (r, b) = read_more(&mut s, buf).await;
        buf = b;
        if !matches!(r, Ok(n) if n > 0) {
            return;
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
    l.set_nonblocking(true).expect("nonblocking");
    let mut rt = runtime();
    rt.block_on(async move {
        let l = monoio::net::TcpListener::from_std(l).expect("listener");
        loop {
            if let Ok((s, _)) = l.accept().await {
                monoio::spawn(echo_conn(s));
            }
        }
    });
}

/// Length of the first whole frame in `b`, if there is one.
fn whole_frame(b: &[u8]) -> Option<usize> {
    let (h, len, _) = frame_head(b)?;
    (b.len() >= h + len).then_some(h + len)
}

/// Client side of the handshake on a monoio stream; returns what followed it.
async fn connect_ws(target: SocketAddr, path: &str) -> std::io::Result<(monoio::net::TcpStream, Vec<u8>)> {
    use monoio::io::AsyncWriteRentExt;
    let mut s = monoio::net::TcpStream::connect(target).await?;
    s.set_nodelay(true)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    s.write_all(req.into_bytes()).await.0?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let (r, b) = read_more(&mut s, buf).await;
        buf = b;
        if r? == 0 {
            return Err(std::io::Error::other("closed during handshake"));
        }
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                return Err(std::io::Error::other("handshake refused"));
            }
            return Ok((s, buf.split_off(p + 4)));
        }
    }
}

fn relay(args: &[String]) {
    use std::cell::Cell;
    use std::rc::Rc;
    let target: SocketAddr = args[0].parse().expect("target");
    let conns: usize = args[1].parse().unwrap();
    let secs: f64 = args[2].parse().unwrap();
    let size: usize = args[3].parse().unwrap();
    let window: usize = args[4].parse().unwrap();
    let mut rt = runtime();
    rt.block_on(async move {
        let total = Rc::new(Cell::new(0u64));
        let stop = Rc::new(Cell::new(false));
        let payload = vec![b'x'; size];
        let batch: Rc<Vec<u8>> = Rc::new((0..window).flat_map(|_| frame(2, &payload, true)).collect());
        let mut tasks = Vec::new();
        for i in 0..conns {
            let (total, stop, batch) = (total.clone(), stop.clone(), batch.clone());
            tasks.push(monoio::spawn(async move {
                use monoio::io::AsyncWriteRentExt;
                let (mut s, mut buf) = connect_ws(target, &format!("/bench?player_id=b{i}")).await.expect("connect");
                let mut out = Vec::with_capacity(batch.len());
                while !stop.get() {
                    out.clear();
                    out.extend_from_slice(&batch);
                    let (r, b) = s.write_all(out).await;
                    out = b;
                    r.expect("send");
                    let mut got = 0;
                    let mut at = 0;
                    while got < window {
                        while let Some(n) = whole_frame(&buf[at..]) {
                            at += n;
                            got += 1;
                        }
                        if got >= window {
                            break;
                        }
                        buf.drain(..at);
                        at = 0;
                        let (r, b) = read_more(&mut s, buf).await;
                        buf = b;
                        assert!(r.expect("recv") > 0, "closed");
                    }
                    buf.drain(..at);
                    total.set(total.get() + got as u64);
                }
            }));
        }
        // Warm-up then measure.
        monoio::time::sleep(Duration::from_secs_f64(secs * 0.1)).await;
        let (t0, n0) = (Instant::now(), total.get());
        monoio::time::sleep(Duration::from_secs_f64(secs)).await;
        let (t1, n1) = (Instant::now(), total.get());
        stop.set(true);
        println!("msgs {} secs {:.3} msgs_per_sec {:.0}", n1 - n0, (t1 - t0).as_secs_f64(), (n1 - n0) as f64 / (t1 - t0).as_secs_f64());
        std::process::exit(0);
    });
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

/// The cheapest relay a user-space proxy can be: one thread, level-triggered
/// epoll, for each readable socket one `recv` and one `send` to its peer
/// (a short message never fills the send buffer here; a failed or short
/// send closes the pair). No framing, no timers, no allocation per message.
/// Measured against nginx and Atlas by `benches/game.py` (FLOOR=1).
fn floor(args: &[String]) {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let listener = TcpListener::bind(&args[0]).expect("bind");
    let backend: SocketAddr = args[1].parse().expect("backend address");
    listener.set_nonblocking(true).expect("nonblocking");
    let lfd = listener.as_raw_fd();
    // SAFETY: plain epoll and socket calls on descriptors this function owns.
    unsafe {
        let ep = libc::epoll_create1(0);
        let add = |fd: i32| {
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev);
        };
        add(lfd);
        let mut peer: Vec<i32> = vec![-1; 1 << 16];
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        let mut buf = vec![0u8; 16 * 1024];
        // `bufs`: a 16 KiB buffer of its own per socket, like a proxy that
        // keeps per-connection buffers, to measure what one shared (cache-hot)
        // buffer saves.
        let own = args.get(2).map(String::as_str) == Some("bufs");
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        loop {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1);
            for ev in events.iter().take(n.max(0) as usize) {
                let fd = ev.u64 as i32;
                if fd == lfd {
                    while let Ok((c, _)) = listener.accept() {
                        let Ok(b) = TcpStream::connect(backend) else { continue };
                        let _ = c.set_nodelay(true);
                        let _ = b.set_nodelay(true);
                        let _ = c.set_nonblocking(true);
                        let _ = b.set_nonblocking(true);
                        let (c, b) = (c.into_raw_fd(), b.into_raw_fd());
                        if c as usize >= peer.len() || b as usize >= peer.len() {
                            libc::close(c);
                            libc::close(b);
                            continue;
                        }
                        peer[c as usize] = b;
                        peer[b as usize] = c;
                        if own {
                            let top = c.max(b) as usize + 1;
                            if bufs.len() < top {
                                bufs.resize_with(top, Vec::new);
                            }
                            bufs[c as usize] = vec![0u8; 16 * 1024];
                            bufs[b as usize] = vec![0u8; 16 * 1024];
                        }
                        add(c);
                        add(b);
                    }
                    continue;
                }
                let other = peer[fd as usize];
                if other < 0 {
                    continue;
                }
                let buf = if own { &mut bufs[fd as usize] } else { &mut buf };
                let got = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                if got < 0 && *libc::__errno_location() == libc::EAGAIN {
                    continue;
                }
                let sent = if got > 0 { libc::send(other, buf.as_ptr().cast(), got as usize, libc::MSG_NOSIGNAL) } else { -1 };
                if got <= 0 || sent != got {
                    peer[fd as usize] = -1;
                    peer[other as usize] = -1;
                    libc::close(fd);
                    libc::close(other);
                }
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("echo") => echo(&args[1..]),
        Some("relay") if args.len() >= 6 => relay(&args[1..]),
        Some("idle") if args.len() >= 4 => idle(&args[1..]),
        Some("walk") if args.len() >= 4 => walk(&args[1..]),
        Some("floor") if args.len() >= 3 => floor(&args[1..]),
        _ => {
            eprintln!("usage: see the header of benches/wsload.rs");
            std::process::exit(2);
        }
    }
}
