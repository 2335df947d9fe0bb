#![allow(dead_code)]
//! Test support for the game gateway integration tests: a game client and a
//! game server that plays Horizon, with nothing but std and `serde_json`.
//!
//! - WebSocket framing (RFC 6455) by hand: [`encode_frame`], [`read_frame`],
//!   [`parse_frame`], [`accept_key`] (with a small SHA-1 and base64).
//! - [`WsClient`]: a game client (upgrade handshake, masked frames, ping
//!   answers, fragment reassembly, raw frames for protocol-violation tests).
//! - [`GameServer`]: a game server on 127.0.0.1:0 that records connections
//!   and text messages, acks every JSON message with a numeric `"seq"`,
//!   echoes binary messages, answers pings and closes, can push messages,
//!   can be killed like a crashed process, registers / heartbeats with
//!   the Atlas API the way Horizon does, and answers `InitiateTransfer`
//!   with `TransferAccepted` carrying a player state (`last_seq`).
//! - [`http_json`] / [`http_raw`]: one-shot HTTP/1.1 requests.
//! - [`move_msg`] / [`horizon_move`] / [`Walker`]: movement messages.
//!
//! Blocking std::net, one thread per connection; every socket has read and
//! write timeouts so nothing can hang. Server threads never panic on bad
//! input: they log with `eprintln!` and close the connection.

use std::collections::HashMap;
use std::io::{self, Cursor, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Default read/write timeout of every test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Read timeout of a game server connection: game connections are idle for
/// long stretches, so this is longer than [`IO_TIMEOUT`]; `kill()` / drop end
/// the connection threads at once anyway.
pub const SERVER_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest frame payload / message / HTTP head accepted, so bad input cannot
/// make a thread allocate without bound.
pub const MAX_PAYLOAD: u64 = 64 << 20;
const MAX_HEAD: usize = 64 << 10;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `cond` every 5 ms until it is true or `timeout` passed; returns the
/// last value of `cond`.
pub fn wait_for<F: FnMut() -> bool>(timeout: Duration, mut cond: F) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        thread::sleep(Duration::from_millis(5));
    }
}

static RNG_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A pseudo-random u64 (xorshift64* seeded from the clock, the pid and a
/// counter). Not cryptographic; good enough for masks and handshake keys.
pub fn random_u64() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let n = RNG_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut x = nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((std::process::id() as u64) << 32);
    if x == 0 {
        x = 0x2545_F491_4F6C_DD1D;
    }
    for _ in 0..4 {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
    }
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// `len` pseudo-random bytes from [`random_u64`].
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&random_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-1 (FIPS 180-1) of `data`.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let (mut a, mut b, mut c, mut d, mut e) = (h[0], h[1], h[2], h[3], h[4]);
        for (i, &wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        h[0] = h[0].wrapping_add(a);
        h[1] = h[1].wrapping_add(b);
        h[2] = h[2].wrapping_add(c);
        h[3] = h[3].wrapping_add(d);
        h[4] = h[4].wrapping_add(e);
    }
    let mut out = [0u8; 20];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// Standard base64 with padding (RFC 4648).
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 { ALPHABET[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if chunk.len() > 2 { ALPHABET[n as usize & 63] as char } else { '=' });
    }
    out
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    base64_encode(&sha1(format!("{key}{WS_GUID}").as_bytes()))
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Header lines of a head (after its first line), names lowercased, values
/// trimmed.
fn parse_header_lines(head: &str) -> Vec<(String, String)> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_ascii_lowercase(), value.trim().to_string()))
        })
        .collect()
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Status code of a response status line ("HTTP/1.1 101 ..."), 0 if none.
fn status_of(head: &str) -> u16 {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code.parse().unwrap_or(0),
        _ => 0,
    }
}

fn io_err_text(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!("timeout after {timeout:?}"),
        _ => format!("io error: {e} ({:?})", e.kind()),
    }
}

// ---------------------------------------------------------------------------
// WebSocket framing (RFC 6455)
// ---------------------------------------------------------------------------

/// One WebSocket frame, unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Close code of a close frame (1005 when it has no payload).
    pub fn close_code(&self) -> Option<u16> {
        if self.opcode != OP_CLOSE {
            return None;
        }
        Some(if self.payload.len() >= 2 { u16::from_be_bytes([self.payload[0], self.payload[1]]) } else { 1005 })
    }

    /// Close reason of a close frame (lossy UTF-8).
    pub fn close_reason(&self) -> String {
        if self.opcode == OP_CLOSE && self.payload.len() > 2 {
            String::from_utf8_lossy(&self.payload[2..]).into_owned()
        } else {
            String::new()
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A random 4-byte masking key.
pub fn random_mask() -> [u8; 4] {
    (random_u64() as u32).to_le_bytes()
}

/// Encodes one frame (RSV bits zero). `mask: Some(key)` masks the payload.
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= 0xFFFF {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Close frame payload: code (big endian) then reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// Parses one frame from the start of `buf`: `Ok(None)` when more bytes are
/// needed, otherwise the frame, whether it was masked and the bytes used.
pub fn parse_frame_ext(buf: &[u8]) -> Result<Option<(Frame, bool, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[0] & 0x70 != 0 {
        return Err(format!("reserved bits set in first byte {:#04x}", buf[0]));
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let mut pos = 2;
    let len = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            pos = 4;
            u16::from_be_bytes([buf[2], buf[3]]) as u64
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            pos = 10;
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            u64::from_be_bytes(b)
        }
        n => n as u64,
    };
    if len > MAX_PAYLOAD {
        return Err(format!("frame payload length {len} over the limit {MAX_PAYLOAD}"));
    }
    let mut key = [0u8; 4];
    if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        key.copy_from_slice(&buf[pos..pos + 4]);
        pos += 4;
    }
    let end = pos + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let mut payload = buf[pos..end].to_vec();
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Ok(Some((Frame { fin, opcode, payload }, masked, end)))
}

/// [`parse_frame_ext`] without the masked flag.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    Ok(parse_frame_ext(buf)?.map(|(f, _, n)| (f, n)))
}

/// Reads one frame; also says whether it was masked.
pub fn read_frame_ext<R: Read>(r: &mut R) -> io::Result<(Frame, bool)> {
    let bad = |msg: String| io::Error::new(ErrorKind::InvalidData, msg);
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    if h[0] & 0x70 != 0 {
        return Err(bad(format!("reserved bits set in first byte {:#04x}", h[0])));
    }
    let fin = h[0] & 0x80 != 0;
    let opcode = h[0] & 0x0F;
    let masked = h[1] & 0x80 != 0;
    let len = match h[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u16::from_be_bytes(b) as u64
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => n as u64,
    };
    if len > MAX_PAYLOAD {
        return Err(bad(format!("frame payload length {len} over the limit {MAX_PAYLOAD}")));
    }
    let mut key = [0u8; 4];
    if masked {
        r.read_exact(&mut key)?;
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Ok((Frame { fin, opcode, payload }, masked))
}

/// Reads one frame (7/16/64-bit lengths, masked or not).
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Frame> {
    read_frame_ext(r).map(|(f, _)| f)
}

// ---------------------------------------------------------------------------
// WsClient: a game client
// ---------------------------------------------------------------------------

/// A WebSocket game client. Frames it sends are masked (except through
/// [`WsClient::send_frame`] with `masked: false`); frames it receives must
/// not be masked.
pub struct WsClient {
    stream: TcpStream,
    /// Bytes read but not yet parsed as frames (starts with whatever came
    /// after the handshake response head).
    buf: Vec<u8>,
    head: String,
    timeout: Duration,
    addr: SocketAddr,
}

impl WsClient {
    /// Connects and upgrades. `headers` are added to the request; one named
    /// like a default header (Host, Upgrade, Connection, Sec-WebSocket-Key,
    /// Sec-WebSocket-Version) replaces it. Err (with the status line) unless
    /// the answer is a 101 with the right `Sec-WebSocket-Accept`.
    pub fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<WsClient, String> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect to {addr}: {e}"))?;
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_nodelay(true);
        let mut key = base64_encode(&random_bytes(16));
        let host = addr.to_string();
        let mut defaults: Vec<(&str, String)> = vec![
            ("Host", host),
            ("Upgrade", "websocket".into()),
            ("Connection", "Upgrade".into()),
            ("Sec-WebSocket-Key", key.clone()),
            ("Sec-WebSocket-Version", "13".into()),
        ];
        for (name, value) in headers {
            if let Some(d) = defaults.iter_mut().find(|(d, _)| d.eq_ignore_ascii_case(name)) {
                d.1 = value.to_string();
                if name.eq_ignore_ascii_case("sec-websocket-key") {
                    key = value.to_string();
                }
            }
        }
        let mut req = format!("GET {path} HTTP/1.1\r\n");
        for (name, value) in &defaults {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        for (name, value) in headers {
            if !defaults.iter().any(|(d, _)| d.eq_ignore_ascii_case(name)) {
                req.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        req.push_str("\r\n");
        let mut client = WsClient { stream, buf: Vec::new(), head: String::new(), timeout: IO_TIMEOUT, addr };
        client.stream.write_all(req.as_bytes()).map_err(|e| format!("sending handshake to {addr}: {}", io_err_text(&e, IO_TIMEOUT)))?;

        let head_end = loop {
            if let Some(end) = find_head_end(&client.buf) {
                break end;
            }
            if client.buf.len() > MAX_HEAD {
                return Err(format!("handshake response head over {MAX_HEAD} bytes"));
            }
            let mut tmp = [0u8; 4096];
            match client.stream.read(&mut tmp) {
                Ok(0) => {
                    let got = String::from_utf8_lossy(&client.buf).into_owned();
                    return Err(if got.is_empty() {
                        "connection closed before any handshake response".to_string()
                    } else {
                        format!("connection closed inside the handshake response: {got:?}")
                    });
                }
                Ok(n) => client.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading handshake response: {}", io_err_text(&e, IO_TIMEOUT))),
            }
        };
        client.head = String::from_utf8_lossy(&client.buf[..head_end]).into_owned();
        client.buf.drain(..head_end);
        let status_line = client.head.lines().next().unwrap_or("").to_string();
        if status_of(&client.head) != 101 {
            return Err(format!("handshake rejected: {status_line}"));
        }
        let resp_headers = parse_header_lines(&client.head);
        let expected = accept_key(&key);
        match find_header(&resp_headers, "sec-websocket-accept") {
            Some(v) if v == expected => Ok(client),
            Some(v) => Err(format!("bad Sec-WebSocket-Accept {v:?}, expected {expected:?} ({status_line})")),
            None => Err(format!("no Sec-WebSocket-Accept in the 101 response ({status_line})")),
        }
    }

    /// Sends `request` as is and reads the answer head (until the blank
    /// line, EOF or the timeout). Returns the status code (0 when there was
    /// no answer) and the whole head.
    pub fn raw_handshake(addr: SocketAddr, request: &str) -> (u16, String) {
        let mut stream = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("raw_handshake: connect to {addr}: {e}");
                return (0, String::new());
            }
        };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        if let Err(e) = stream.write_all(request.as_bytes()) {
            eprintln!("raw_handshake: write to {addr}: {e}");
        }
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        while find_head_end(&buf).is_none() && buf.len() <= MAX_HEAD {
            match stream.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let end = find_head_end(&buf).unwrap_or(buf.len());
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        (status_of(&head), head)
    }

    /// The 101 response head.
    pub fn response_head(&self) -> &str {
        &self.head
    }

    /// A header of the 101 response (case-insensitive name).
    pub fn response_header(&self, name: &str) -> Option<String> {
        find_header(&parse_header_lines(&self.head), name).map(str::to_string)
    }

    pub fn peer(&self) -> SocketAddr {
        self.addr
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.stream.local_addr().ok()
    }

    /// Sets the read and write timeouts.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        let _ = self.stream.set_read_timeout(Some(timeout));
        let _ = self.stream.set_write_timeout(Some(timeout));
    }

    /// Shuts the socket down both ways (no close frame).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Sends one raw frame; Err instead of a panic when the write fails.
    pub fn try_send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Result<(), String> {
        let bytes = encode_frame(fin, opcode, payload, if masked { Some(random_mask()) } else { None });
        self.stream.write_all(&bytes).map_err(|e| format!("sending frame (opcode {opcode}): {}", io_err_text(&e, self.timeout)))
    }

    /// Sends one raw frame (for fragmentation and protocol-violation tests).
    /// Panics when the write fails.
    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        if let Err(e) = self.try_send_frame(fin, opcode, payload, masked) {
            panic!("WsClient to {}: {e}", self.addr);
        }
    }

    /// Sends raw bytes (half frames, garbage).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream.write_all(bytes).map_err(|e| io_err_text(&e, self.timeout))
    }

    pub fn send_text(&mut self, s: &str) {
        self.send_frame(true, OP_TEXT, s.as_bytes(), true);
    }

    pub fn send_binary(&mut self, data: &[u8]) {
        self.send_frame(true, OP_BINARY, data, true);
    }

    pub fn send_ping(&mut self, data: &[u8]) {
        self.send_frame(true, OP_PING, data, true);
    }

    pub fn send_pong(&mut self, data: &[u8]) {
        self.send_frame(true, OP_PONG, data, true);
    }

    pub fn send_close(&mut self, code: u16, reason: &str) {
        self.send_frame(true, OP_CLOSE, &close_payload(code, reason), true);
    }

    /// Sends `text` as a text message fragmented into `parts` frames.
    pub fn send_text_fragmented(&mut self, text: &str, parts: usize) {
        let bytes = text.as_bytes();
        let parts = parts.max(1);
        let size = bytes.len().div_ceil(parts).max(1);
        let chunks: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(size).collect() };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.iter().enumerate() {
            self.send_frame(i == last, if i == 0 { OP_TEXT } else { OP_CONTINUATION }, chunk, true);
        }
    }

    /// Receives one frame within the timeout. Err says whether it was a
    /// timeout, EOF, a read error or a protocol violation (masked frame from
    /// the server, bad header).
    pub fn recv(&mut self) -> Result<Frame, String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match parse_frame_ext(&self.buf) {
                Ok(Some((frame, masked, used))) => {
                    self.buf.drain(..used);
                    if masked {
                        return Err(format!("protocol violation: masked frame from the server (opcode {})", frame.opcode));
                    }
                    return Ok(frame);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("protocol violation: {e}")),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timeout after {:?} waiting for a frame ({} bytes buffered)", self.timeout, self.buf.len()));
            }
            let _ = self.stream.set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))));
            let mut tmp = [0u8; 16 << 10];
            let r = self.stream.read(&mut tmp);
            let _ = self.stream.set_read_timeout(Some(self.timeout));
            match r {
                Ok(0) => return Err(format!("EOF: connection closed by the peer ({} bytes of a partial frame buffered)", self.buf.len())),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(format!("timeout after {:?} waiting for a frame ({} bytes buffered)", self.timeout, self.buf.len()))
                }
                Err(e) => return Err(format!("read error: {e} ({:?})", e.kind())),
            }
        }
    }

    /// The next text message: pings are answered with a pong and skipped,
    /// pongs are skipped, fragments are reassembled. A close frame gives
    /// `Err("close <code> <reason>")`; a binary message, timeout or EOF also
    /// give an Err.
    pub fn recv_text(&mut self) -> Result<String, String> {
        let mut partial: Option<Vec<u8>> = None;
        loop {
            let frame = self.recv()?;
            match frame.opcode {
                OP_PING => self.try_send_frame(true, OP_PONG, &frame.payload, true)?,
                OP_PONG => {}
                OP_CLOSE => return Err(format!("close {} {}", frame.close_code().unwrap_or(1005), frame.close_reason())),
                OP_TEXT if partial.is_none() => {
                    if frame.fin {
                        return String::from_utf8(frame.payload).map_err(|e| format!("text message is not UTF-8: {e}"));
                    }
                    partial = Some(frame.payload);
                }
                OP_CONTINUATION if partial.is_some() => {
                    let mut data = partial.take().unwrap_or_default();
                    data.extend_from_slice(&frame.payload);
                    if frame.fin {
                        return String::from_utf8(data).map_err(|e| format!("text message is not UTF-8: {e}"));
                    }
                    partial = Some(data);
                }
                OP_BINARY => return Err(format!("unexpected binary message ({} bytes) while waiting for text", frame.payload.len())),
                op => return Err(format!("unexpected frame opcode {op} (fin {}, {} bytes) while waiting for text", frame.fin, frame.payload.len())),
            }
        }
    }

    /// [`WsClient::recv_text`] parsed as JSON.
    pub fn recv_json(&mut self) -> Result<Value, String> {
        let text = self.recv_text()?;
        serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text:?}"))
    }
}

// ---------------------------------------------------------------------------
// GameServer: a game server playing Horizon
// ---------------------------------------------------------------------------

/// One accepted WebSocket connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub id: usize,
    pub path: String,
    /// Request headers, names lowercased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
}

impl Conn {
    /// First value of a request header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// One text message a game server received.
#[derive(Debug, Clone)]
pub struct Received {
    pub conn: usize,
    /// The connection's `x-atlas-player-id` header.
    pub player: Option<String>,
    pub text: String,
    pub at: Instant,
}

struct ConnHandle {
    writer: Mutex<TcpStream>,
    /// The server sent a close frame (through [`GameServer::close`]).
    closing: AtomicBool,
}

impl ConnHandle {
    fn send(&self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        lock(&self.writer).write_all(&encode_frame(true, opcode, payload, None))
    }
}

struct Inner {
    name: String,
    addr: SocketAddr,
    killed: AtomicBool,
    conns: Mutex<Vec<Conn>>,
    open: Mutex<HashMap<usize, Arc<ConnHandle>>>,
    received: Mutex<Vec<Received>>,
    closes: Mutex<Vec<(usize, u16)>>,
    errors: Mutex<Vec<String>>,
    server_id: Mutex<Option<String>>,
    capacity: AtomicU32,
    /// Answer Atlas's `InitiateTransfer` with `TransferAccepted` (default on).
    answer_transfers: AtomicBool,
    /// Bytes of padding in the player state of `TransferAccepted`.
    state_padding: AtomicUsize,
    commands: Mutex<Vec<Value>>,
    heartbeats_ok: AtomicUsize,
    heartbeat_stop: AtomicBool,
    heartbeat_thread: Mutex<Option<JoinHandle<()>>>,
    /// The `rooms` field of heartbeats (`{"<room_id>": players}`); `None`:
    /// heartbeats carry no `rooms` field at all.
    room_reports: Mutex<Option<Value>>,
    /// Overrides the `current_connections` heartbeats report (default: the
    /// open connections).
    reported_players: Mutex<Option<u64>>,
}

impl Inner {
    fn log(&self, msg: String) {
        eprintln!("[game {} {}] {msg}", self.name, self.addr);
    }

    fn error(&self, msg: String) {
        self.log(msg.clone());
        lock(&self.errors).push(msg);
    }
}

/// A game server on 127.0.0.1:0 playing Horizon. See the module docs.
pub struct GameServer {
    inner: Arc<Inner>,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
    /// Stop flag of the current heartbeat thread.
    heartbeat_flag: Mutex<Arc<AtomicBool>>,
}

impl GameServer {
    pub fn start(name: &str) -> GameServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind game server");
        let addr = listener.local_addr().expect("game server address");
        let inner = Arc::new(Inner {
            name: name.to_string(),
            addr,
            killed: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            open: Mutex::new(HashMap::new()),
            received: Mutex::new(Vec::new()),
            closes: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
            server_id: Mutex::new(None),
            capacity: AtomicU32::new(0),
            answer_transfers: AtomicBool::new(true),
            state_padding: AtomicUsize::new(0),
            commands: Mutex::new(Vec::new()),
            heartbeats_ok: AtomicUsize::new(0),
            heartbeat_stop: AtomicBool::new(false),
            heartbeat_thread: Mutex::new(None),
            room_reports: Mutex::new(None),
            reported_players: Mutex::new(None),
        });
        let acceptor = inner.clone();
        let handle = thread::Builder::new()
            .name(format!("game-{name}-accept"))
            .spawn(move || {
                // The listener lives in this thread only: when it returns the
                // port is closed and new connects are refused.
                for stream in listener.incoming() {
                    if acceptor.killed.load(Ordering::SeqCst) {
                        break;
                    }
                    match stream {
                        Ok(stream) => {
                            let conn_inner = acceptor.clone();
                            let spawned = thread::Builder::new().name(format!("game-{}-conn", acceptor.name)).spawn(move || serve_conn(conn_inner, stream));
                            if let Err(e) = spawned {
                                acceptor.log(format!("cannot spawn a connection thread: {e}"));
                            }
                        }
                        Err(e) => {
                            acceptor.log(format!("accept: {e}"));
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .expect("spawn game server accept thread");
        GameServer { inner, accept_thread: Mutex::new(Some(handle)), heartbeat_flag: Mutex::new(Arc::new(AtomicBool::new(false))) }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Every connection that completed the handshake, in order (`id` is the
    /// index).
    pub fn connections(&self) -> Vec<Conn> {
        lock(&self.inner.conns).clone()
    }

    /// A request header of connection `conn`.
    pub fn header(&self, conn: usize, name: &str) -> Option<String> {
        lock(&self.inner.conns).get(conn).and_then(|c| c.header(name)).map(str::to_string)
    }

    /// Every text message received, in order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.inner.received).clone()
    }

    /// Text messages received from connection `conn`.
    pub fn received_from(&self, conn: usize) -> Vec<Received> {
        lock(&self.inner.received).iter().filter(|r| r.conn == conn).cloned().collect()
    }

    /// Waits until at least `n` text messages were received (false on
    /// timeout).
    pub fn wait_received(&self, n: usize, timeout: Duration) -> bool {
        wait_for(timeout, || lock(&self.inner.received).len() >= n)
    }

    /// Close frames received from peers: (connection, code; 1005 if none).
    pub fn closes(&self) -> Vec<(usize, u16)> {
        lock(&self.inner.closes).clone()
    }

    /// Protocol violations and failed handshakes seen (each also logged).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.inner.errors).clone()
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        lock(&self.inner.open).len()
    }

    /// Ids of the connections currently open, sorted.
    pub fn open_ids(&self) -> Vec<usize> {
        let mut ids: Vec<usize> = lock(&self.inner.open).keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    fn handle(&self, conn: usize) -> Option<Arc<ConnHandle>> {
        lock(&self.inner.open).get(&conn).cloned()
    }

    /// Sends an unsolicited text message; false if the connection is not
    /// open or the write failed.
    pub fn push(&self, conn: usize, text: &str) -> bool {
        match self.handle(conn) {
            Some(h) => match h.send(OP_TEXT, text.as_bytes()) {
                Ok(()) => true,
                Err(e) => {
                    self.inner.log(format!("push to connection {conn}: {e}"));
                    false
                }
            },
            None => false,
        }
    }

    /// Pushes to every open connection; returns how many got it.
    pub fn push_all(&self, text: &str) -> usize {
        self.open_ids().into_iter().filter(|&id| self.push(id, text)).count()
    }

    /// Server-initiated close: sends a close frame; the connection ends when
    /// the peer answers (or after the read timeout).
    pub fn close(&self, conn: usize, code: u16, reason: &str) -> bool {
        match self.handle(conn) {
            Some(h) => {
                h.closing.store(true, Ordering::SeqCst);
                h.send(OP_CLOSE, &close_payload(code, reason)).is_ok()
            }
            None => false,
        }
    }

    /// Like a crashed process: stops accepting (the listening socket is
    /// closed when this returns, so new connects are refused), shuts every
    /// open connection down abruptly and stops the heartbeats.
    pub fn kill(&self) {
        self.inner.killed.store(true, Ordering::SeqCst);
        self.inner.heartbeat_stop.store(true, Ordering::SeqCst);
        if let Some(handle) = lock(&self.accept_thread).take() {
            // Wake the blocking accept so the thread sees the flag and drops
            // the listener.
            let _ = TcpStream::connect_timeout(&self.inner.addr, Duration::from_secs(1));
            let _ = handle.join();
        }
        let open: Vec<Arc<ConnHandle>> = lock(&self.inner.open).drain().map(|(_, h)| h).collect();
        for h in open {
            let _ = lock(&h.writer).shutdown(Shutdown::Both);
        }
    }

    /// Whether to answer `InitiateTransfer` (a silent source lets a test
    /// check Atlas's timeout).
    pub fn set_answer_transfers(&self, on: bool) {
        self.inner.answer_transfers.store(on, Ordering::SeqCst);
    }

    /// Pads the player state of `TransferAccepted` to about `bytes`.
    pub fn set_state_padding(&self, bytes: usize) {
        self.inner.state_padding.store(bytes, Ordering::SeqCst);
    }

    pub fn is_killed(&self) -> bool {
        self.inner.killed.load(Ordering::SeqCst)
    }

    // -- registration with Atlas, as Horizon does it --------------------------

    /// POST `/api/v1/servers/register`; stores `server_id` from the answer.
    /// Err (with status and body) unless 200/201 with a `server_id`.
    pub fn register(&self, api: SocketAddr, region_coord: (i64, i64, i64), center: (f64, f64, f64), bounds: f64, capacity: u32) -> Result<Value, String> {
        self.register_with_metadata(api, region_coord, center, bounds, capacity, json!({}))
    }

    /// [`GameServer::register`] with a registration `metadata` value (e.g.
    /// `{"region": "eu"}` for the room gateway's region preference).
    pub fn register_with_metadata(
        &self,
        api: SocketAddr,
        region_coord: (i64, i64, i64),
        center: (f64, f64, f64),
        bounds: f64,
        capacity: u32,
        metadata: Value,
    ) -> Result<Value, String> {
        self.inner.capacity.store(capacity, Ordering::SeqCst);
        let body = json!({
            "name": self.inner.name,
            "address": format!("127.0.0.1:{}", self.inner.addr.port()),
            "region_coord": {"x": region_coord.0, "y": region_coord.1, "z": region_coord.2},
            "center": {"x": center.0, "y": center.1, "z": center.2},
            "bounds": bounds,
            "capacity": capacity,
            "version": "0.3.1",
            "metadata": metadata,
        });
        let (status, _head, raw) = http_request(api, "POST", "/api/v1/servers/register", Some(&body), &[])?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        if status != 200 && status != 201 {
            return Err(format!("register {}: HTTP {status}: {text}", self.inner.name));
        }
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let id = match value.get("server_id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(format!("register {}: HTTP {status} without a server_id: {text}", self.inner.name)),
        };
        *lock(&self.inner.server_id) = Some(id);
        Ok(value)
    }

    pub fn server_id(&self) -> Option<String> {
        lock(&self.inner.server_id).clone()
    }

    /// PUT `/api/v1/servers/{server_id}/heartbeat`; returns the answer JSON
    /// and stores its `commands`. Err if not registered or not 2xx.
    pub fn heartbeat(&self, api: SocketAddr) -> Result<Value, String> {
        heartbeat_once(&self.inner, api)
    }

    /// Heartbeats every `every` in a background thread until
    /// [`GameServer::stop_heartbeats`], [`GameServer::kill`] or drop (a
    /// previous heartbeat thread is stopped first).
    pub fn start_heartbeats(&self, api: SocketAddr, every: Duration) {
        self.stop_heartbeats();
        // kill() sets the shared flag, stop_heartbeats() this thread's own
        // one; the thread checks both.
        let stop = Arc::new(AtomicBool::new(false));
        let inner = self.inner.clone();
        let my_stop = stop.clone();
        let handle = thread::Builder::new()
            .name(format!("game-{}-heartbeat", self.inner.name))
            .spawn(move || {
                let stopped = || my_stop.load(Ordering::SeqCst) || inner.heartbeat_stop.load(Ordering::SeqCst);
                while !stopped() {
                    if let Err(e) = heartbeat_once(&inner, api) {
                        inner.log(format!("heartbeat: {e}"));
                    }
                    let until = Instant::now() + every;
                    while !stopped() && Instant::now() < until {
                        thread::sleep(Duration::from_millis(5).min(every));
                    }
                }
            })
            .expect("spawn heartbeat thread");
        *lock(&self.inner.heartbeat_thread) = Some(handle);
        *lock(&self.heartbeat_flag) = stop;
    }

    /// Stops the heartbeat thread and waits for it (an in-flight heartbeat
    /// finishes first).
    pub fn stop_heartbeats(&self) {
        lock(&self.heartbeat_flag).store(true, Ordering::SeqCst);
        if let Some(handle) = lock(&self.inner.heartbeat_thread).take() {
            let _ = handle.join();
        }
    }

    /// Sets the `rooms` field of the following heartbeats: `Some(map)` sends
    /// `"rooms": {"<room_id>": players, ...}`, `None` (the default) sends no
    /// `rooms` field.
    pub fn set_room_reports(&self, rooms: Option<&[(&str, u64)]>) {
        let value = rooms.map(|list| Value::Object(list.iter().map(|(id, n)| (id.to_string(), json!(n))).collect()));
        *lock(&self.inner.room_reports) = value;
    }

    /// Makes the following heartbeats report `players` as
    /// `current_connections` (`None`: the open connections, the default).
    pub fn set_reported_players(&self, players: Option<u64>) {
        *lock(&self.inner.reported_players) = players;
    }

    /// Commands received in heartbeat answers, in order.
    pub fn commands(&self) -> Vec<Value> {
        lock(&self.inner.commands).clone()
    }

    /// Successful heartbeats so far.
    pub fn heartbeat_count(&self) -> usize {
        self.inner.heartbeats_ok.load(Ordering::SeqCst)
    }

    /// DELETE `/api/v1/servers/{server_id}`; returns the status.
    pub fn unregister(&self, api: SocketAddr) -> Result<u16, String> {
        let id = self.server_id().ok_or_else(|| format!("unregister {}: not registered", self.inner.name))?;
        let (status, _, _) = http_request(api, "DELETE", &format!("/api/v1/servers/{id}"), None, &[])?;
        Ok(status)
    }
}

impl Drop for GameServer {
    fn drop(&mut self) {
        self.kill();
        self.stop_heartbeats();
    }
}

fn heartbeat_once(inner: &Inner, api: SocketAddr) -> Result<Value, String> {
    let id = lock(&inner.server_id).clone().ok_or_else(|| format!("heartbeat {}: not registered", inner.name))?;
    let open = lock(&inner.open).len();
    let open = lock(&inner.reported_players).map_or(open, |n| n as usize);
    let capacity = inner.capacity.load(Ordering::SeqCst);
    let load = if capacity == 0 { 0.0 } else { open as f64 / capacity as f64 };
    let mut body = json!({
        "server_id": id,
        "current_connections": open,
        "load": load,
        "accepting_connections": true,
        "avg_tick_ms": 0.0,
        "memory_bytes": 0,
    });
    if let Some(rooms) = lock(&inner.room_reports).clone() {
        body["rooms"] = rooms;
    }
    let (status, _, raw) = http_request(api, "PUT", &format!("/api/v1/servers/{id}/heartbeat"), Some(&body), &[])?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    if !(200..300).contains(&status) {
        return Err(format!("heartbeat {}: HTTP {status}: {text}", inner.name));
    }
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if let Some(Value::Array(cmds)) = value.get("commands") {
        lock(&inner.commands).extend(cmds.iter().cloned());
    }
    inner.heartbeats_ok.fetch_add(1, Ordering::SeqCst);
    Ok(value)
}

// -- connection threads -----------------------------------------------------

fn serve_conn(inner: Arc<Inner>, stream: TcpStream) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    if inner.killed.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = serve_conn_inner(&inner, stream) {
        if !inner.killed.load(Ordering::SeqCst) {
            inner.log(format!("connection from {peer}: {e}"));
        }
    }
}

/// Sends a close frame, half-closes and drains the peer's bytes briefly so
/// the close frame is not lost to a reset.
fn close_with(handle: &ConnHandle, stream: &TcpStream, code: u16, reason: &str) {
    let _ = handle.send(OP_CLOSE, &close_payload(code, reason));
    linger_close(stream);
}

fn linger_close(mut stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut tmp = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut tmp) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn serve_conn_inner(inner: &Arc<Inner>, mut stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);

    // Handshake head.
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            let _ = stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return Err(format!("handshake head over {MAX_HEAD} bytes"));
        }
        let mut tmp = [0u8; 4096];
        match stream.read(&mut tmp) {
            Ok(0) if buf.is_empty() => return Ok(()), // e.g. the wake-up connect of kill()
            Ok(0) => return Err(format!("EOF inside the handshake head ({} bytes)", buf.len())),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the handshake head: {}", io_err_text(&e, IO_TIMEOUT))),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let leftover = buf[head_end..].to_vec();
    let request_line = head.lines().next().unwrap_or("").to_string();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("").to_string();
    let headers = parse_header_lines(&head);
    let has_token =
        |name: &str, token: &str| headers.iter().filter(|(n, _)| n == name).any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)));
    let key = find_header(&headers, "sec-websocket-key").unwrap_or("").to_string();
    let problem = if method != "GET" {
        Some(format!("method {method:?} is not GET"))
    } else if !has_token("upgrade", "websocket") {
        Some("no Upgrade: websocket".to_string())
    } else if !has_token("connection", "upgrade") {
        Some("no Connection: Upgrade".to_string())
    } else if key.is_empty() {
        Some("no Sec-WebSocket-Key".to_string())
    } else if find_header(&headers, "sec-websocket-version") != Some("13") {
        Some("Sec-WebSocket-Version is not 13".to_string())
    } else {
        None
    };
    if let Some(problem) = problem {
        inner.error(format!("bad handshake ({request_line:?}): {problem}"));
        let body = format!("bad websocket handshake: {problem}");
        let _ = stream.write_all(
            format!("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
        );
        linger_close(&stream);
        return Ok(());
    }

    let writer = stream.try_clone().map_err(|e| format!("clone stream: {e}"))?;
    let handle = Arc::new(ConnHandle { writer: Mutex::new(writer), closing: AtomicBool::new(false) });
    let player = find_header(&headers, "x-atlas-player-id").map(str::to_string);
    let id;
    {
        // Hold the writer while registering and answering, so a push cannot
        // overtake the 101, and the connection is visible as soon as the
        // client has its 101.
        let mut w = lock(&handle.writer);
        {
            let mut conns = lock(&inner.conns);
            id = conns.len();
            conns.push(Conn { id, path, headers });
            lock(&inner.open).insert(id, handle.clone());
        }
        // kill() sets the flag before it shuts the open connections down, so
        // a connection registered after that sees the flag here.
        if inner.killed.load(Ordering::SeqCst) {
            lock(&inner.open).remove(&id);
            let _ = w.shutdown(Shutdown::Both);
            return Ok(());
        }
        let resp =
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n", accept_key(&key));
        if let Err(e) = w.write_all(resp.as_bytes()) {
            lock(&inner.open).remove(&id);
            return Err(format!("connection {id}: writing the 101: {e}"));
        }
    }
    let result = serve_frames(inner, &stream, leftover, id, &handle, player);
    lock(&inner.open).remove(&id);
    result
}

fn serve_frames(inner: &Arc<Inner>, stream: &TcpStream, leftover: Vec<u8>, id: usize, handle: &ConnHandle, player: Option<String>) -> Result<(), String> {
    let _ = stream.set_read_timeout(Some(SERVER_READ_TIMEOUT));
    let mut reader = Cursor::new(leftover).chain(stream);
    let mut replies: u64 = 0;
    let mut last_seq = Value::Null;
    let mut partial: Option<(u8, Vec<u8>)> = None;
    let protocol_error = |code: u16, msg: String| -> Result<(), String> {
        inner.error(format!("connection {id}: {msg}"));
        lock(&inner.open).remove(&id);
        close_with(handle, stream, code, &msg.chars().take(100).collect::<String>());
        Ok(())
    };
    loop {
        let (frame, masked) = match read_frame_ext(&mut reader) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()), // peer went away without a close frame
            Err(e) if e.kind() == ErrorKind::InvalidData => return protocol_error(1002, format!("bad frame: {e}")),
            Err(e) => return Err(format!("connection {id}: reading a frame: {}", io_err_text(&e, SERVER_READ_TIMEOUT))),
        };
        if !masked {
            return protocol_error(1002, format!("unmasked client frame (opcode {})", frame.opcode));
        }
        let message = match frame.opcode {
            OP_PING | OP_PONG | OP_CLOSE if !frame.fin || frame.payload.len() > 125 => {
                return protocol_error(1002, format!("bad control frame (opcode {}, fin {}, {} bytes)", frame.opcode, frame.fin, frame.payload.len()));
            }
            OP_PING => {
                handle.send(OP_PONG, &frame.payload).map_err(|e| format!("connection {id}: sending a pong: {e}"))?;
                continue;
            }
            OP_PONG => continue,
            OP_CLOSE => {
                if frame.payload.len() == 1 {
                    return protocol_error(1002, "close frame with a 1-byte payload".into());
                }
                let code = frame.close_code().unwrap_or(1005);
                lock(&inner.closes).push((id, code));
                lock(&inner.open).remove(&id);
                if handle.closing.load(Ordering::SeqCst) {
                    // Answer to our own close.
                    let _ = stream.shutdown(Shutdown::Both);
                } else {
                    let echo = if code == 1005 { Vec::new() } else { code.to_be_bytes().to_vec() };
                    let _ = handle.send(OP_CLOSE, &echo);
                    linger_close(stream);
                }
                return Ok(());
            }
            OP_TEXT | OP_BINARY => {
                if partial.is_some() {
                    return protocol_error(1002, format!("new data frame (opcode {}) inside a fragmented message", frame.opcode));
                }
                if frame.fin {
                    (frame.opcode, frame.payload)
                } else {
                    partial = Some((frame.opcode, frame.payload));
                    continue;
                }
            }
            OP_CONTINUATION => match partial.take() {
                None => return protocol_error(1002, "continuation frame without a message to continue".into()),
                Some((op, mut data)) => {
                    if data.len() as u64 + frame.payload.len() as u64 > MAX_PAYLOAD {
                        return protocol_error(1009, "message too big".into());
                    }
                    data.extend_from_slice(&frame.payload);
                    if frame.fin {
                        (op, data)
                    } else {
                        partial = Some((op, data));
                        continue;
                    }
                }
            },
            op => return protocol_error(1002, format!("unknown opcode {op}")),
        };
        match message {
            (OP_TEXT, data) => {
                let text = match String::from_utf8(data) {
                    Ok(t) => t,
                    Err(_) => return protocol_error(1007, "text message is not UTF-8".into()),
                };
                let parsed = serde_json::from_str::<Value>(&text).ok();
                let seq = parsed.as_ref().and_then(|v| v.get("seq").filter(|s| s.is_number()).cloned());
                let initiate = parsed.as_ref().is_some_and(|v| v["type"] == "InitiateTransfer");
                lock(&inner.received).push(Received { conn: id, player: player.clone(), text, at: Instant::now() });
                if initiate && inner.answer_transfers.load(Ordering::SeqCst) {
                    // Horizon's answer, with the player's state for the next server.
                    let token_id = parsed.as_ref().and_then(|v| v["payload"]["token"].as_str().map(|t| t.len())).unwrap_or(0);
                    let answer = json!({"type": "TransferAccepted", "payload": {"player_id": player, "token_id": format!("len-{token_id}"),
                        "player_state": {"server": inner.name, "last_seq": last_seq, "acked": replies,
                            "pad": "x".repeat(inner.state_padding.load(Ordering::SeqCst))}}});
                    handle.send(OP_TEXT, answer.to_string().as_bytes()).map_err(|e| format!("connection {id}: sending TransferAccepted: {e}"))?;
                }
                if let Some(s) = &seq {
                    last_seq = s.clone();
                }
                if let Some(seq) = seq {
                    replies += 1;
                    let ack = format!(r#"{{"type":"ack","server":{},"seq":{},"n":{}}}"#, Value::String(inner.name.clone()), seq, replies);
                    handle.send(OP_TEXT, ack.as_bytes()).map_err(|e| format!("connection {id}: sending an ack: {e}"))?;
                }
            }
            (_, data) => handle.send(OP_BINARY, &data).map_err(|e| format!("connection {id}: echoing binary: {e}"))?,
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------

/// Decodes a chunked body: `Some((body, complete))`, `None` if malformed.
fn decode_chunked(mut data: &[u8]) -> Option<(Vec<u8>, bool)> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else { return Some((body, false)) };
        let line = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers (ignored) end with an empty line.
            let complete = data.starts_with(b"\r\n") || data.windows(4).any(|w| w == b"\r\n\r\n");
            return Some((body, complete));
        }
        if data.len() < size + 2 {
            body.extend_from_slice(&data[..data.len().min(size)]);
            return Some((body, false));
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// What was read of one HTTP response.
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
    /// The whole response was read (by its framing, or EOF for a
    /// close-delimited body).
    complete: bool,
    /// Why reading stopped early, if it did.
    problem: Option<String>,
}

/// Reads one response until it is complete, EOF or the timeout.
fn read_response(stream: &mut TcpStream, request_method: &str) -> RawResponse {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16 << 10];
    let mut problem = None;
    let mut eof = false;
    loop {
        if let Some(end) = find_head_end(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = status_of(&head);
            let headers = parse_header_lines(&head);
            let raw_body = &buf[end..];
            let chunked = find_header(&headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            let length = find_header(&headers, "content-length").and_then(|v| v.parse::<usize>().ok());
            let no_body = request_method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
            let (body, complete) = if no_body {
                (Vec::new(), true)
            } else if chunked {
                match decode_chunked(raw_body) {
                    Some((b, c)) => (b, c),
                    None => {
                        problem = Some("malformed chunked body".into());
                        (raw_body.to_vec(), true)
                    }
                }
            } else if let Some(len) = length {
                (raw_body[..raw_body.len().min(len)].to_vec(), raw_body.len() >= len)
            } else {
                (raw_body.to_vec(), eof)
            };
            if complete || eof || problem.is_some() {
                if !complete && problem.is_none() {
                    problem = Some(format!("connection closed before the end of the body ({} bytes)", body.len()));
                }
                return RawResponse { status, head, body, complete, problem };
            }
        } else if eof || problem.is_some() || buf.len() > MAX_HEAD {
            let text = String::from_utf8_lossy(&buf).into_owned();
            let problem = problem
                .or_else(|| Some(if buf.is_empty() { "connection closed without a response".into() } else { format!("incomplete response head: {text:?}") }));
            return RawResponse { status: status_of(&text), head: text, body: Vec::new(), complete: false, problem };
        }
        match stream.read(&mut tmp) {
            Ok(0) => eof = true,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                problem = Some(io_err_text(&e, IO_TIMEOUT));
                eof = true;
            }
        }
    }
}

/// One request with `Connection: close` and a Content-Length; returns
/// status, response head and body bytes.
fn http_request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> Result<(u16, String, Vec<u8>), String> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("{method} {path}: connect to {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let body_bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n", body_bytes.len()));
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(&body_bytes);
    stream.write_all(&bytes).map_err(|e| format!("{method} {path}: sending: {e}"))?;
    let r = read_response(&mut stream, method);
    if r.status == 0 || !r.complete {
        return Err(format!("{method} {path}: {} (status {}, head {:?})", r.problem.unwrap_or_default(), r.status, r.head));
    }
    Ok((r.status, r.head, r.body))
}

/// One HTTP/1.1 request (`Connection: close`, Content-Length, JSON body if
/// any); returns the status and the body parsed as JSON (`Value::Null` when
/// empty or not JSON).
pub fn http_json(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> Result<(u16, Value), String> {
    let (status, _, raw) = http_request(addr, method, path, body, headers)?;
    Ok((status, serde_json::from_slice(&raw).unwrap_or(Value::Null)))
}

/// The value of the sample `key` (name plus labels, exactly as printed) in
/// `GET /metrics` on `api`; panics when it is missing.
pub fn metric(api: SocketAddr, key: &str) -> f64 {
    let (status, text) = http_raw(api, "GET /metrics HTTP/1.1\r\nHost: atlas\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200, "GET /metrics: {text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(k, _)| *k == key).and_then(|(_, v)| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {key} in /metrics:\n{text}"))
}

/// Sends `request` as is; returns the status (0 if no answer) and the whole
/// response as text (head + body as received), read until the response is
/// complete, EOF or the timeout.
pub fn http_raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("http_raw: connect to {addr}: {e}");
            return (0, String::new());
        }
    };
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    if let Err(e) = stream.write_all(request.as_bytes()) {
        eprintln!("http_raw: write to {addr}: {e}");
    }
    let method = request.split_whitespace().next().unwrap_or("");
    let r = read_response(&mut stream, method);
    let mut text = r.head;
    text.push_str(&String::from_utf8_lossy(&r.body));
    (r.status, text)
}

// ---------------------------------------------------------------------------
// Movement messages
// ---------------------------------------------------------------------------

fn num(v: f64) -> String {
    Value::from(v).to_string()
}

/// `{"type":"move","x":..,"y":..,"z":..,"seq":seq}`
pub fn move_msg(seq: u64, x: f64, y: f64, z: f64) -> String {
    format!(r#"{{"type":"move","x":{},"y":{},"z":{},"seq":{seq}}}"#, num(x), num(y), num(z))
}

/// Horizon's movement event:
/// `{"namespace":"movement","event":"move_request","data":{"target_x":x,"target_y":y,"target_z":z},"seq":seq}`
pub fn horizon_move(seq: u64, x: f64, y: f64, z: f64) -> String {
    format!(r#"{{"namespace":"movement","event":"move_request","data":{{"target_x":{},"target_y":{},"target_z":{}}},"seq":{seq}}}"#, num(x), num(y), num(z))
}

/// A player walking in a straight line (e.g. across region borders): each
/// step gives the next position and message, with seq counting from 1.
#[derive(Debug, Clone)]
pub struct Walker {
    pub pos: (f64, f64, f64),
    pub step: (f64, f64, f64),
    pub seq: u64,
    /// Use [`horizon_move`] instead of [`move_msg`].
    pub horizon: bool,
}

impl Walker {
    pub fn new(start: (f64, f64, f64), step: (f64, f64, f64)) -> Walker {
        Walker { pos: start, step, seq: 0, horizon: false }
    }

    pub fn horizon(mut self) -> Walker {
        self.horizon = true;
        self
    }

    /// Moves one step; returns (seq, message).
    pub fn next_msg(&mut self) -> (u64, String) {
        self.seq += 1;
        self.pos = (self.pos.0 + self.step.0, self.pos.1 + self.step.1, self.pos.2 + self.step.2);
        let (x, y, z) = self.pos;
        (self.seq, if self.horizon { horizon_move(self.seq, x, y, z) } else { move_msg(self.seq, x, y, z) })
    }
}

// ---------------------------------------------------------------------------
// Maestro
// ---------------------------------------------------------------------------

/// A request to a fake Maestro: method, path, JSON body.
pub type MaestroLog = Arc<Mutex<Vec<(String, String, Value)>>>;

/// A fake Maestro: answers every request with `201 {"id":"x"}` and records it.
pub fn fake_maestro() -> (SocketAddr, MaestroLog) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind fake maestro");
    let addr = l.local_addr().unwrap();
    let log: MaestroLog = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            let head_end = loop {
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(p + 4);
                }
                match s.read(&mut tmp) {
                    Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                    _ => break None,
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let len: usize = head
                .split("\r\n")
                .skip(1)
                .find_map(|l| l.split_once(':').filter(|(n, _)| n.trim().eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.trim().parse().ok()))
                .unwrap_or(0);
            while buf.len() < head_end + len {
                match s.read(&mut tmp) {
                    Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                    _ => break,
                }
            }
            let mut parts = head.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            let body = serde_json::from_slice(&buf[head_end..(head_end + len).min(buf.len())]).unwrap_or(Value::Null);
            log2.lock().unwrap().push((method, path, body));
            let _ = s.write_all(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{\"id\":\"x\"}");
        }
    });
    (addr, log)
}
