#![allow(dead_code)]
//! Test support for the firehose listener (connserver protocol v2), written
//! from `specs/firehose-protocol.md` alone, not from Atlas' code:
//!
//! - [`Control`]: the client control messages in bincode 2 "standard"
//!   encoding, with the varint done by hand ([`put_varint`], [`get_varint`]).
//! - crypto of the reconnect challenge (§3.3): [`shared_key`], [`seal`],
//!   [`open`] (k256 ECDH, HKDF-SHA256, XChaCha20-Poly1305 with the wire layout
//!   `ciphertext || tag || nonce`).
//! - [`FirehoseClient`]: a client over TCP or WebSocket ([`Transport`]) that
//!   does the new-client handshake ([`FirehoseClient::connect_new`]), the
//!   reconnect with the challenge ([`FirehoseClient::reconnect`], or a wrong
//!   answer with [`FirehoseClient::reconnect_with`]), data frames, and raw
//!   bytes for malformed-input tests.
//! - [`TestMaster`]: a master server Atlas dials: counts Atlas' connections,
//!   records every tagged packet (id, flag, data, connection, time) in order,
//!   sends data / kicks / raw bytes on the current connection, can close that
//!   connection, stop listening and listen again on the same port, and can
//!   echo every data packet back to its client.
//!
//! Blocking std::net and threads; every socket has timeouts and every length
//! read from the wire is bounded, so nothing can hang or allocate without
//! bound. Server threads never panic on bad input: they record an error and
//! close the connection.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use k256::{PublicKey, SecretKey};
use sha2::Sha256;

/// Default read/write timeout of every test socket: only there so that
/// nothing hangs.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest frame payload the test client and master accept from Atlas.
pub const MAX_TEST_FRAME: usize = 16 << 20;
/// The protocol version of the firehose (connserver v2).
pub const VERSION: u32 = 2;

/// Master link flags (§2 plus the Atlas extensions of the interface).
pub const FLAG_DATA: u8 = 0x00;
pub const FLAG_FAILURE: u8 = 0x01;
pub const FLAG_KICK: u8 = 0x02;
pub const FLAG_RECONNECT: u8 = 0x03;
pub const FLAG_CONNECT: u8 = 0x10;
pub const FLAG_DISCONNECT: u8 = 0x11;

/// HKDF salt and info (§3.3).
const KDF_LABEL: &[u8] = b"VOLTLANE.NET";
/// A challenge: 32 bytes sealed are 32 + 16 (tag) + 24 (nonce).
pub const CHALLENGE_LEN: usize = 72;

/// The example key of RFC 6455 §1.3 and its accept value: lets the client
/// check `Sec-WebSocket-Accept` without a SHA-1.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls a condition every 5 ms until it holds or the time is up (the
/// shared harness helper).
pub use crate::common::wait_until as wait_for;

/// True for the errors that mean "the peer closed or reset the socket".
pub fn is_closed_error(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe)
}

fn eof(what: &str) -> io::Error {
    io::Error::new(ErrorKind::UnexpectedEof, format!("peer closed {what}"))
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, msg.into())
}

/// `len` random bytes from the OS.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    OsRng.fill_bytes(&mut v);
    v
}

/// A printable excerpt of bytes for assertion messages.
pub fn show(bytes: &[u8]) -> String {
    const MAX: usize = 80;
    let s = format!("{:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]));
    if bytes.len() > MAX {
        format!("{s}... ({} bytes)", bytes.len())
    } else {
        s
    }
}

/// A u32 LE length prefix followed by `payload` (§1).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

// ---------------------------------------------------------------------------
// bincode 2 "standard" varints and control messages (§3)
// ---------------------------------------------------------------------------

/// Appends `v` as a bincode varint: one byte below 251, else a marker 0xFB /
/// 0xFC / 0xFD and the value as u16 / u32 / u64 LE.
pub fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v < 251 {
        out.push(v as u8);
    } else if v <= u16::MAX as u64 {
        out.push(0xFB);
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v <= u32::MAX as u64 {
        out.push(0xFC);
        out.extend_from_slice(&(v as u32).to_le_bytes());
    } else {
        out.push(0xFD);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Reads a varint at `*pos`, advancing it.
pub fn get_varint(b: &[u8], pos: &mut usize) -> Result<u64, String> {
    let take = |pos: &mut usize, n: usize| -> Result<Vec<u8>, String> {
        let s = b.get(*pos..*pos + n).ok_or_else(|| format!("varint truncated at byte {}", *pos))?.to_vec();
        *pos += n;
        Ok(s)
    };
    let first = take(pos, 1)?[0];
    Ok(match first {
        0..=250 => first as u64,
        0xFB => u16::from_le_bytes(take(pos, 2)?.try_into().unwrap()) as u64,
        0xFC => u32::from_le_bytes(take(pos, 4)?.try_into().unwrap()) as u64,
        0xFD => u64::from_le_bytes(take(pos, 8)?.try_into().unwrap()),
        m => return Err(format!("bad varint marker 0x{m:02X}")),
    })
}

/// A client control message (§3 table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    Ping,
    ProtocolVersion(u32),
    PubKey(Vec<u8>),
    ClientId(u64),
    Challenge(Vec<u8>),
    ChallengeResponse(Vec<u8>),
}

impl Control {
    /// The frame payload: variant index, then the fields.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Control::Ping => put_varint(&mut out, 0),
            Control::ProtocolVersion(v) => {
                put_varint(&mut out, 1);
                put_varint(&mut out, *v as u64);
            }
            Control::ClientId(id) => {
                put_varint(&mut out, 3);
                put_varint(&mut out, *id);
            }
            Control::PubKey(b) => Self::put_bytes(&mut out, 2, b),
            Control::Challenge(b) => Self::put_bytes(&mut out, 4, b),
            Control::ChallengeResponse(b) => Self::put_bytes(&mut out, 5, b),
        }
        out
    }

    fn put_bytes(out: &mut Vec<u8>, index: u64, b: &[u8]) {
        put_varint(out, index);
        put_varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }

    /// Parses a whole frame payload (trailing bytes are an error).
    pub fn decode(b: &[u8]) -> Result<Control, String> {
        let mut pos = 0;
        let msg = match get_varint(b, &mut pos)? {
            0 => Control::Ping,
            1 => Control::ProtocolVersion(u32::try_from(get_varint(b, &mut pos)?).map_err(|_| "version above u32".to_string())?),
            2 => Control::PubKey(Self::get_bytes(b, &mut pos)?),
            3 => Control::ClientId(get_varint(b, &mut pos)?),
            4 => Control::Challenge(Self::get_bytes(b, &mut pos)?),
            5 => Control::ChallengeResponse(Self::get_bytes(b, &mut pos)?),
            i => return Err(format!("unknown control variant {i}")),
        };
        if pos != b.len() {
            return Err(format!("{} trailing byte(s) after {msg:?}", b.len() - pos));
        }
        Ok(msg)
    }

    fn get_bytes(b: &[u8], pos: &mut usize) -> Result<Vec<u8>, String> {
        let n = get_varint(b, pos)? as usize;
        let s = b.get(*pos..pos.saturating_add(n)).ok_or_else(|| format!("byte vector of {n} truncated"))?.to_vec();
        *pos += n;
        Ok(s)
    }
}

// ---------------------------------------------------------------------------
// Crypto of the challenge (§3.3)
// ---------------------------------------------------------------------------

/// A fresh client key pair.
pub fn new_secret() -> SecretKey {
    SecretKey::random(&mut OsRng)
}

/// SEC1 compressed public key (33 bytes) of `secret`.
pub fn public_bytes(secret: &SecretKey) -> Vec<u8> {
    secret.public_key().to_sec1_bytes().to_vec()
}

/// HKDF-SHA256(ECDH(secret, peer)), salt = info = `VOLTLANE.NET`, 32 bytes.
pub fn shared_key(secret: &SecretKey, peer_sec1: &[u8]) -> Result<[u8; 32], String> {
    let peer = PublicKey::from_sec1_bytes(peer_sec1).map_err(|e| format!("Atlas' PubKey is not a secp256k1 point: {e}"))?;
    let shared = k256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), peer.as_affine());
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(KDF_LABEL), shared.raw_secret_bytes()).expand(KDF_LABEL, &mut key).map_err(|e| format!("hkdf: {e}"))?;
    Ok(key)
}

/// Encrypts with a fresh random nonce: `ciphertext || tag || nonce`.
pub fn seal(key: &[u8; 32], plain: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let mut out = cipher.encrypt(&nonce, plain).expect("xchacha20poly1305 encrypt");
    out.extend_from_slice(&nonce);
    out
}

/// Decrypts `ciphertext || tag || nonce`.
pub fn open(key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, String> {
    if sealed.len() < 24 + 16 {
        return Err(format!("sealed message of {} bytes is too short", sealed.len()));
    }
    let (body, nonce) = sealed.split_at(sealed.len() - 24);
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher.decrypt(XNonce::from_slice(nonce), body).map_err(|_| "challenge does not decrypt with the ECDH key".to_string())
}

// ---------------------------------------------------------------------------
// WebSocket framing (RFC 6455), client side
// ---------------------------------------------------------------------------

/// A masked client frame with `opcode` (FIN set).
fn ws_encode(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let mask = random_bytes(4);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// One WebSocket frame parsed from the start of `buf`: (fin, opcode,
/// payload, bytes used), or `None` when incomplete.
fn ws_parse(buf: &[u8]) -> io::Result<Option<(bool, u8, Vec<u8>, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (fin, opcode, masked) = (buf[0] & 0x80 != 0, buf[0] & 0x0F, buf[1] & 0x80 != 0);
    let (len, mut pos) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10),
        126 | 127 => return Ok(None),
        n => (n as u64, 2),
    };
    if len > MAX_TEST_FRAME as u64 {
        return Err(invalid(format!("WebSocket frame of {len} bytes from Atlas")));
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        pos += 4;
        Some([buf[pos - 4], buf[pos - 3], buf[pos - 2], buf[pos - 1]])
    } else {
        None
    };
    let end = pos + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let mut payload = buf[pos..end].to_vec();
    if let Some(m) = mask {
        payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= m[i % 4]);
    }
    Ok(Some((fin, opcode, payload, end)))
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/// How the client reaches the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP, u32 LE length-prefixed frames.
    Tcp,
    /// A WebSocket upgrade, then one frame payload per binary message.
    Ws,
}

/// How [`FirehoseClient::reconnect_with`] answers the challenge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The spec's answer: the same 32 bytes, re-sealed with a new nonce.
    Correct,
    /// Other 32 bytes, sealed correctly with the right key.
    WrongPlaintext,
    /// 72 random bytes.
    Garbage,
}

/// Why a handshake did not complete.
#[derive(Debug)]
pub struct HandshakeError {
    /// What the client was doing: "connect", "upgrade", "version", "pubkey",
    /// "client-id", "challenge", "response", "ping".
    pub step: &'static str,
    /// Atlas closed (or reset) the socket.
    pub closed: bool,
    pub detail: String,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.closed { "Atlas closed the socket" } else { "failed" };
        write!(f, "handshake {how} at step {:?}: {}", self.step, self.detail)
    }
}

/// What a client needs to reconnect: its id, its key pair and Atlas' key.
#[derive(Clone)]
pub struct Identity {
    pub id: u64,
    pub secret: SecretKey,
    pub atlas_key: Vec<u8>,
}

/// A firehose client (blocking).
pub struct FirehoseClient {
    pub stream: TcpStream,
    pub transport: Transport,
    /// Received bytes not yet parsed into frames.
    buf: Vec<u8>,
    /// Reassembly of a fragmented WebSocket message.
    partial: Vec<u8>,
    /// The id Atlas gave (0 before the handshake).
    pub id: u64,
    /// The key pair sent as PubKey in the first handshake.
    pub secret: SecretKey,
    /// Atlas' PubKey (SEC1 compressed), empty before the handshake.
    pub atlas_key: Vec<u8>,
}

impl FirehoseClient {
    /// Connects (and upgrades, for [`Transport::Ws`]) without any handshake.
    pub fn open(addr: SocketAddr, transport: Transport) -> io::Result<FirehoseClient> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let _ = stream.set_nodelay(true);
        let mut c = FirehoseClient { stream, transport, buf: Vec::new(), partial: Vec::new(), id: 0, secret: new_secret(), atlas_key: Vec::new() };
        if transport == Transport::Ws {
            c.upgrade(addr)?;
        }
        Ok(c)
    }

    /// Like [`FirehoseClient::open`] over TCP; panics on failure.
    pub fn raw(addr: SocketAddr) -> FirehoseClient {
        Self::open(addr, Transport::Tcp).unwrap_or_else(|e| panic!("connect to the firehose listener {addr}: {e}"))
    }

    /// The WebSocket upgrade: `GET /firehose`, expects a 101 with the right
    /// `Sec-WebSocket-Accept`. Bytes after the head stay buffered.
    fn upgrade(&mut self, addr: SocketAddr) -> io::Result<()> {
        let req = format!(
            "GET /firehose HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        self.stream.write_all(req.as_bytes())?;
        let deadline = Instant::now() + IO_TIMEOUT;
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if self.buf.len() > 16 * 1024 {
                return Err(invalid("WebSocket upgrade response head over 16 KiB"));
            }
            self.fill(deadline)?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end);
        let status_ok = head.starts_with("HTTP/1.1 101");
        let accept_ok =
            head.lines().any(|l| l.split_once(':').is_some_and(|(n, v)| n.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == WS_ACCEPT));
        if !status_ok || !accept_ok {
            return Err(invalid(format!("bad WebSocket upgrade response (want 101 with Sec-WebSocket-Accept {WS_ACCEPT}): {head:?}")));
        }
        Ok(())
    }

    /// A new client over TCP: version, PubKey exchange, ClientId (§3.1).
    pub fn connect_new(addr: SocketAddr) -> Result<FirehoseClient, HandshakeError> {
        Self::connect_new_over(addr, Transport::Tcp)
    }

    /// A new client over `transport`.
    pub fn connect_new_over(addr: SocketAddr, transport: Transport) -> Result<FirehoseClient, HandshakeError> {
        let mut c = Self::open(addr, transport).map_err(|e| herr("connect", e))?;
        c.handshake_new()?;
        Ok(c)
    }

    /// The §3.1 handshake on an opened connection (fresh key pair).
    pub fn handshake_new(&mut self) -> Result<(), HandshakeError> {
        self.atlas_key = self.hello()?;
        self.secret = new_secret();
        let pk = public_bytes(&self.secret);
        self.send_control(&Control::PubKey(pk)).map_err(|e| herr("pubkey", e))?;
        match self.recv_control("client-id")? {
            Control::ClientId(id) => self.id = id,
            other => return Err(unexpected("client-id", &other)),
        }
        Ok(())
    }

    /// Sends ProtocolVersion(2) and returns Atlas' PubKey (33 bytes).
    fn hello(&mut self) -> Result<Vec<u8>, HandshakeError> {
        self.send_control(&Control::ProtocolVersion(VERSION)).map_err(|e| herr("version", e))?;
        match self.recv_control("pubkey")? {
            Control::PubKey(k) if k.len() == 33 && (k[0] == 2 || k[0] == 3) => Ok(k),
            Control::PubKey(k) => Err(HandshakeError { step: "pubkey", closed: false, detail: format!("PubKey is not a SEC1 compressed point: {k:02x?}") }),
            other => Err(unexpected("pubkey", &other)),
        }
    }

    /// The reconnect of §3.2 over TCP with the correct challenge answer.
    pub fn reconnect(addr: SocketAddr, old_id: u64, old_secret: &SecretKey, expected_pubkey: &[u8]) -> Result<FirehoseClient, HandshakeError> {
        Self::reconnect_with(addr, Transport::Tcp, old_id, old_secret, expected_pubkey, Answer::Correct)
    }

    /// [`FirehoseClient::reconnect`] from an [`Identity`].
    pub fn resume(addr: SocketAddr, who: &Identity) -> Result<FirehoseClient, HandshakeError> {
        Self::reconnect(addr, who.id, &who.secret, &who.atlas_key)
    }

    /// The reconnect of §3.2: version, PubKey check, ClientId(old), the
    /// challenge answered as `answer`, then the Ping exchange. On success
    /// the buffered packets are the next frames [`FirehoseClient::recv`]
    /// returns.
    pub fn reconnect_with(
        addr: SocketAddr,
        transport: Transport,
        old_id: u64,
        old_secret: &SecretKey,
        expected_pubkey: &[u8],
        answer: Answer,
    ) -> Result<FirehoseClient, HandshakeError> {
        let mut c = Self::open(addr, transport).map_err(|e| herr("connect", e))?;
        c.secret = old_secret.clone();
        c.atlas_key = c.hello()?;
        if c.atlas_key != expected_pubkey {
            return Err(HandshakeError {
                step: "pubkey",
                closed: false,
                detail: format!("Atlas' PubKey changed: {:02x?} != {expected_pubkey:02x?}", c.atlas_key),
            });
        }
        c.send_control(&Control::ClientId(old_id)).map_err(|e| herr("client-id", e))?;
        let challenge = match c.recv_control("challenge")? {
            Control::Challenge(b) if b.len() == CHALLENGE_LEN => b,
            Control::Challenge(b) => {
                return Err(HandshakeError { step: "challenge", closed: false, detail: format!("challenge of {} bytes, want {CHALLENGE_LEN}", b.len()) })
            }
            other => return Err(unexpected("challenge", &other)),
        };
        let response = c.answer(&challenge, answer)?;
        c.send_control(&Control::ChallengeResponse(response)).map_err(|e| herr("response", e))?;
        c.send_control(&Control::Ping).map_err(|e| herr("ping", e))?;
        match c.recv_control("ping")? {
            Control::Ping => {}
            other => return Err(unexpected("ping", &other)),
        }
        c.id = old_id;
        Ok(c)
    }

    /// The ChallengeResponse payload for `challenge`.
    fn answer(&self, challenge: &[u8], answer: Answer) -> Result<Vec<u8>, HandshakeError> {
        let fail = |detail: String| HandshakeError { step: "challenge", closed: false, detail };
        let key = shared_key(&self.secret, &self.atlas_key).map_err(fail)?;
        let plain = open(&key, challenge).map_err(fail)?;
        if plain.len() != 32 {
            return Err(fail(format!("challenge plaintext of {} bytes, want 32", plain.len())));
        }
        Ok(match answer {
            Answer::Correct => seal(&key, &plain),
            Answer::WrongPlaintext => seal(&key, &plain.iter().map(|b| !b).collect::<Vec<u8>>()),
            Answer::Garbage => random_bytes(CHALLENGE_LEN),
        })
    }

    /// What a reconnect needs later.
    pub fn identity(&self) -> Identity {
        Identity { id: self.id, secret: self.secret.clone(), atlas_key: self.atlas_key.clone() }
    }

    // -- frames --------------------------------------------------------------

    /// Sends one frame with `payload` (length-prefixed, or one binary
    /// WebSocket message).
    pub fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        let bytes = match self.transport {
            Transport::Tcp => frame(payload),
            Transport::Ws => ws_encode(0x2, payload),
        };
        self.stream.write_all(&bytes)
    }

    /// Sends `payload`; panics with the client id on failure.
    pub fn send_ok(&mut self, payload: &[u8]) {
        let id = self.id;
        self.send(payload).unwrap_or_else(|e| panic!("client {id}: send {}: {e}", show(payload)));
    }

    /// Sends raw bytes as they are (no framing).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn send_control(&mut self, m: &Control) -> io::Result<()> {
        self.send(&m.encode())
    }

    /// The next frame payload, waiting at most `timeout`. EOF / reset is an
    /// error for which [`is_closed_error`] holds.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.take_frame()? {
                return Ok(p);
            }
            if self.fill(deadline)? == 0 {
                return Err(eof(&format!("the connection of client {}", self.id)));
            }
        }
    }

    /// The next frame payload within [`IO_TIMEOUT`]; panics on failure.
    pub fn recv_ok(&mut self) -> Vec<u8> {
        let id = self.id;
        self.recv(IO_TIMEOUT).unwrap_or_else(|e| panic!("client {id}: recv: {e}"))
    }

    fn recv_control(&mut self, step: &'static str) -> Result<Control, HandshakeError> {
        let p = self.recv(IO_TIMEOUT).map_err(|e| herr(step, e))?;
        Control::decode(&p).map_err(|e| HandshakeError { step, closed: false, detail: format!("undecodable control message {p:02x?}: {e}") })
    }

    /// One complete frame from the buffer, if any.
    fn take_frame(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self.transport {
            Transport::Tcp => {
                if self.buf.len() < 4 {
                    return Ok(None);
                }
                let n = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if n > MAX_TEST_FRAME {
                    return Err(invalid(format!("frame of {n} bytes from Atlas")));
                }
                if self.buf.len() < 4 + n {
                    return Ok(None);
                }
                let p = self.buf[4..4 + n].to_vec();
                self.buf.drain(..4 + n);
                Ok(Some(p))
            }
            Transport::Ws => self.take_ws_message(),
        }
    }

    /// One complete binary WebSocket message; answers pings, treats a close
    /// frame as EOF, rejects text messages.
    fn take_ws_message(&mut self) -> io::Result<Option<Vec<u8>>> {
        while let Some((fin, opcode, payload, used)) = ws_parse(&self.buf)? {
            self.buf.drain(..used);
            match opcode {
                0x9 => self.stream.write_all(&ws_encode(0xA, &payload))?,
                0xA => {}
                0x8 => return Err(eof("with a WebSocket close frame")),
                0x0 | 0x2 => {
                    self.partial.extend_from_slice(&payload);
                    if fin {
                        return Ok(Some(std::mem::take(&mut self.partial)));
                    }
                }
                op => return Err(invalid(format!("unexpected WebSocket opcode 0x{op:X} from Atlas"))),
            }
        }
        Ok(None)
    }

    /// One read into the buffer, waiting until `deadline`. `Ok(0)` at EOF.
    fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(ErrorKind::TimedOut, "timed out waiting for a frame"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut tmp = [0u8; 64 * 1024];
        match self.stream.read(&mut tmp) {
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(n)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(io::Error::new(ErrorKind::TimedOut, "timed out waiting for a frame"))
            }
            Err(e) => Err(e),
        }
    }

    /// True if Atlas closes (EOF or reset) within `within`. Bytes that arrive
    /// meanwhile are kept (see [`FirehoseClient::pending`]).
    pub fn is_closed(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            match self.fill(deadline) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return is_closed_error(&e),
            }
        }
    }

    /// Bytes received but not consumed (e.g. what Atlas sent before closing).
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Closes with a TCP reset instead of a FIN (SO_LINGER 0).
    pub fn close_abruptly(self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        drop(self);
    }
}

fn herr(step: &'static str, e: io::Error) -> HandshakeError {
    HandshakeError { step, closed: is_closed_error(&e), detail: e.to_string() }
}

fn unexpected(step: &'static str, m: &Control) -> HandshakeError {
    HandshakeError { step, closed: false, detail: format!("unexpected control message {m:?}") }
}

// ---------------------------------------------------------------------------
// The master
// ---------------------------------------------------------------------------

/// One tagged packet Atlas sent to the master.
#[derive(Clone, Debug)]
pub struct Packet {
    /// Which of Atlas' connections (0-based, in accept order) carried it.
    pub conn: usize,
    pub id: u64,
    pub flag: u8,
    pub data: Vec<u8>,
    pub at: Instant,
}

impl Packet {
    pub fn is(&self, id: u64, flag: u8) -> bool {
        self.id == id && self.flag == flag
    }
    pub fn is_data(&self, id: u64, data: &[u8]) -> bool {
        self.id == id && self.flag == FLAG_DATA && self.data == data
    }
}

impl std::fmt::Display for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[conn {} id {} flag 0x{:02X} {}]", self.conn, self.id, self.flag, show(&self.data))
    }
}

/// One of Atlas' connections to the master.
struct Conn {
    writer: Mutex<TcpStream>,
    closed: AtomicBool,
}

struct MasterState {
    port: u16,
    /// The accept thread runs while this holds.
    listening: AtomicBool,
    /// Set on drop: every thread ends.
    dropped: AtomicBool,
    echo: AtomicBool,
    conns: Mutex<Vec<Arc<Conn>>>,
    packets: Mutex<Vec<Packet>>,
    /// Protocol errors seen on the link (bad frames from Atlas).
    errors: Mutex<Vec<String>>,
}

/// A master server on 127.0.0.1 that Atlas dials (see the module doc).
pub struct TestMaster {
    state: Arc<MasterState>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

/// Formats a list of packets for assertion messages (the last 40).
pub fn show_packets(p: &[Packet]) -> String {
    let skip = p.len().saturating_sub(40);
    let body: Vec<String> = p[skip..].iter().map(|p| p.to_string()).collect();
    format!("{} packet(s){}: {}", p.len(), if skip > 0 { ", last 40" } else { "" }, body.join(" "))
}

impl TestMaster {
    /// A master on a free port.
    pub fn start() -> TestMaster {
        Self::start_on(0)
    }

    /// A master on `port` (0: a free one).
    pub fn start_on(port: u16) -> TestMaster {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("master: bind 127.0.0.1:{port}: {e}"));
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(MasterState {
            port,
            listening: AtomicBool::new(true),
            dropped: AtomicBool::new(false),
            echo: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            packets: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
        });
        let m = TestMaster { state, acceptor: Mutex::new(None) };
        m.spawn_acceptor(listener);
        m
    }

    /// A master that echoes every data packet back to its client id.
    pub fn start_echo() -> TestMaster {
        let m = Self::start();
        m.set_echo(true);
        m
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.state.port))
    }

    pub fn port(&self) -> u16 {
        self.state.port
    }

    /// Echo each 0x00 packet back to the same client id (on the connection
    /// it came from).
    pub fn set_echo(&self, on: bool) {
        self.state.echo.store(on, Ordering::SeqCst);
    }

    fn spawn_acceptor(&self, listener: TcpListener) {
        listener.set_nonblocking(true).expect("nonblocking listener");
        self.state.listening.store(true, Ordering::SeqCst);
        let st = self.state.clone();
        *lock(&self.acceptor) = Some(thread::spawn(move || accept_loop(listener, st)));
    }

    // -- connections ------------------------------------------------------

    /// How many connections Atlas opened so far.
    pub fn accepts(&self) -> usize {
        lock(&self.state.conns).len()
    }

    /// Waits until Atlas opened at least `n` connections.
    pub fn wait_accepts(&self, n: usize, timeout: Duration) -> bool {
        wait_for(timeout, || self.accepts() >= n)
    }

    /// True once connection `i` (0-based) ended (EOF, reset, or closed here).
    pub fn conn_closed(&self, i: usize) -> bool {
        lock(&self.state.conns).get(i).is_some_and(|c| c.closed.load(Ordering::SeqCst))
    }

    /// Waits until connection `i` ended.
    pub fn wait_conn_closed(&self, i: usize, timeout: Duration) -> bool {
        wait_for(timeout, || self.conn_closed(i))
    }

    /// Connections not closed yet.
    pub fn open_conns(&self) -> usize {
        lock(&self.state.conns).iter().filter(|c| !c.closed.load(Ordering::SeqCst)).count()
    }

    fn current(&self) -> io::Result<Arc<Conn>> {
        lock(&self.state.conns).last().cloned().ok_or_else(|| io::Error::new(ErrorKind::NotConnected, "Atlas has not connected to this master"))
    }

    /// Closes Atlas' current connection (a master that drops the link).
    pub fn close_conn(&self) {
        if let Ok(c) = self.current() {
            c.closed.store(true, Ordering::SeqCst);
            let _ = lock(&c.writer).shutdown(Shutdown::Both);
        }
    }

    /// Stops listening and closes every connection (a dead master).
    pub fn stop(&self) {
        self.state.listening.store(false, Ordering::SeqCst);
        if let Some(h) = lock(&self.acceptor).take() {
            let _ = h.join();
        }
        for c in lock(&self.state.conns).iter() {
            c.closed.store(true, Ordering::SeqCst);
            let _ = lock(&c.writer).shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same port after [`TestMaster::stop`].
    pub fn restart(&self) {
        let port = self.state.port;
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("master: bind 127.0.0.1:{port} again: {e}"));
        self.spawn_acceptor(listener);
    }

    // -- sending to Atlas ---------------------------------------------------

    /// Sends a tagged packet on the current connection.
    pub fn send_packet(&self, id: u64, flag: u8, data: &[u8]) -> io::Result<()> {
        let mut p = Vec::with_capacity(9 + data.len());
        p.extend_from_slice(&id.to_le_bytes());
        p.push(flag);
        p.extend_from_slice(data);
        self.send_raw(&frame(&p))
    }

    /// Sends a 0x00 data packet for client `id`; panics on failure.
    pub fn send_data(&self, id: u64, data: &[u8]) {
        self.send_packet(id, FLAG_DATA, data).unwrap_or_else(|e| panic!("master: send data to client {id}: {e}"));
    }

    /// Sends a 0x02 kick for client `id`; panics on failure.
    pub fn kick(&self, id: u64) {
        self.send_packet(id, FLAG_KICK, &[]).unwrap_or_else(|e| panic!("master: kick client {id}: {e}"));
    }

    /// Writes raw bytes on the current connection.
    pub fn send_raw(&self, bytes: &[u8]) -> io::Result<()> {
        let c = self.current()?;
        let mut w = lock(&c.writer);
        w.write_all(bytes)
    }

    // -- what Atlas sent ------------------------------------------------------

    /// Every packet so far, in arrival order.
    pub fn packets(&self) -> Vec<Packet> {
        lock(&self.state.packets).clone()
    }

    /// Packets matching `pred`.
    pub fn filter(&self, pred: impl Fn(&Packet) -> bool) -> Vec<Packet> {
        lock(&self.state.packets).iter().filter(|p| pred(p)).cloned().collect()
    }

    /// Data payloads received from client `id`, in order.
    pub fn data_from(&self, id: u64) -> Vec<Vec<u8>> {
        self.filter(|p| p.id == id && p.flag == FLAG_DATA).into_iter().map(|p| p.data).collect()
    }

    /// How many packets match `pred`.
    pub fn count(&self, pred: impl Fn(&Packet) -> bool) -> usize {
        lock(&self.state.packets).iter().filter(|p| pred(p)).count()
    }

    /// The first packet matching `pred`, waiting up to `timeout`.
    pub fn wait_packet(&self, timeout: Duration, pred: impl Fn(&Packet) -> bool) -> Option<Packet> {
        let mut found = None;
        wait_for(timeout, || {
            found = lock(&self.state.packets).iter().find(|p| pred(p)).cloned();
            found.is_some()
        });
        found
    }

    /// Waits until at least `n` packets match `pred`; returns all matching
    /// ones (fewer than `n` on timeout).
    pub fn wait_count(&self, n: usize, timeout: Duration, pred: impl Fn(&Packet) -> bool) -> Vec<Packet> {
        wait_for(timeout, || self.count(&pred) >= n);
        self.filter(pred)
    }

    /// Protocol errors seen on the link.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.state.errors).clone()
    }
}

impl Drop for TestMaster {
    fn drop(&mut self) {
        self.state.dropped.store(true, Ordering::SeqCst);
        self.stop();
    }
}

/// Accepts Atlas' connections until `listening` goes false (the listener is
/// then dropped: the port refuses connections).
fn accept_loop(listener: TcpListener, st: Arc<MasterState>) {
    while st.listening.load(Ordering::SeqCst) && !st.dropped.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let Ok(w) = s.try_clone() else { continue };
                let conn = Arc::new(Conn { writer: Mutex::new(w), closed: AtomicBool::new(false) });
                let index = {
                    let mut conns = lock(&st.conns);
                    conns.push(conn.clone());
                    conns.len() - 1
                };
                let st2 = st.clone();
                thread::spawn(move || read_loop(s, index, conn, st2));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Parses Atlas' frames on one connection, records the packets, echoes
/// data packets in echo mode.
fn read_loop(mut s: TcpStream, index: usize, conn: Arc<Conn>, st: Arc<MasterState>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = [0u8; 64 * 1024];
    loop {
        if let Err(e) = drain_frames(&mut buf, index, &conn, &st) {
            lock(&st.errors).push(format!("conn {index}: {e}"));
            let _ = s.shutdown(Shutdown::Both);
            break;
        }
        if st.dropped.load(Ordering::SeqCst) || conn.closed.load(Ordering::SeqCst) {
            break;
        }
        match s.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => break,
        }
    }
    conn.closed.store(true, Ordering::SeqCst);
}

/// Takes every complete frame out of `buf`.
fn drain_frames(buf: &mut Vec<u8>, index: usize, conn: &Conn, st: &MasterState) -> Result<(), String> {
    while buf.len() >= 4 {
        let n = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
        if n > MAX_TEST_FRAME {
            return Err(format!("frame of {n} bytes from Atlas"));
        }
        if n < 9 {
            return Err(format!("frame of {n} bytes from Atlas: shorter than id + flag"));
        }
        if buf.len() < 4 + n {
            break;
        }
        let id = u64::from_le_bytes(buf[4..12].try_into().unwrap());
        let p = Packet { conn: index, id, flag: buf[12], data: buf[13..4 + n].to_vec(), at: Instant::now() };
        buf.drain(..4 + n);
        if p.flag == FLAG_DATA && st.echo.load(Ordering::SeqCst) {
            let mut out = Vec::with_capacity(9 + p.data.len());
            out.extend_from_slice(&p.id.to_le_bytes());
            out.push(FLAG_DATA);
            out.extend_from_slice(&p.data);
            let _ = lock(&conn.writer).write_all(&frame(&out));
        }
        lock(&st.packets).push(p);
    }
    Ok(())
}
