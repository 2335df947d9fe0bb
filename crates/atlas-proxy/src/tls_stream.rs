//! The server side of a TLS connection after its handshake: a monoio stream
//! on rustls's unbuffered API, used for every client that speaks TLS.
//!
//! Written here instead of taking `monoio_rustls::ServerTlsStream`, which
//! reads the socket into a 16 KiB buffer of its own and copies that into
//! rustls's deframer, and on the way out copies rustls's encrypted records
//! into a second 16 KiB buffer before the send; and whose idle read cannot
//! be canceled by a drain without dropping the read (and what it had read).
//! Here the socket is read straight into `incoming`, where rustls deframes
//! and decrypts, and records are encrypted into `wbuf`, the buffer the send
//! takes. Measured (benches/RESULTS.md, "TLS on rustls's unbuffered API"):
//! CPU per request unchanged, because rustls 0.23 still allocates and
//! copies each record inside; 45.4 -> 38.9 KiB per idle TLS connection.
//!
//! Reads and writes may run at once from the two halves of a split stream
//! (the game relay writes to a client while it reads from it), as with any
//! monoio `Split` stream: each side touches the rustls session only between
//! its awaits, never across one. TLS bytes that reading produces (an alert
//! after a bad record) wait in `pending` and go out in front of the next
//! write, or at once when no write is in flight. (A reply to the client's
//! key update is queued by rustls itself in front of the next record it
//! encrypts.)
//!
//! Decrypted bytes that do not fit the caller's buffer wait in `plain`.

use std::io;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut, RawBuf};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::server::ServerConnectionData;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, ReadTraffic, UnbufferedStatus};

use crate::io::{read_more, SMALL_BUF};

/// Largest ciphertext kept in `incoming`: a whole record (16 KiB of
/// payload and its overhead) must fit, with room for the next one's start.
const INCOMING_MAX: usize = 40 * 1024;

/// A write buffer larger than this is let go after its write.
const WBUF_KEEP: usize = 64 * 1024;

/// A TLS server stream over a TCP socket. Built by
/// [`crate::handshake::accept`], which runs the handshake on it.
pub struct TlsStream {
    pub(crate) io: TcpStream,
    pub(crate) conn: UnbufferedServerConnection,
    /// Ciphertext read from the socket and not yet processed.
    pub(crate) incoming: Vec<u8>,
    /// Decrypted bytes not yet read, from `plain_pos`.
    pub(crate) plain: Vec<u8>,
    plain_pos: usize,
    /// TLS bytes produced while reading, sent before the next write.
    pending: Vec<u8>,
    /// The write buffer, kept between writes; `None` while a write has it.
    wbuf: Option<Vec<u8>>,
    /// A write is in flight (from the write half of a split stream).
    writing: bool,
    /// The client sent close_notify: reads end.
    peer_closed: bool,
}

// SAFETY: the read and write halves of a split stream share it; each side
// touches `conn` and the buffers it shares with the other side (`pending`,
// `writing`, `peer_closed`) only between awaits, and each keeps its own
// buffer (`incoming` and `plain` for reads, `wbuf` for writes) out of the
// struct while its I/O is in flight. This is the contract monoio's own
// `Split` streams (and monoio-rustls's) rely on: tasks of one thread never
// run at the same time.
unsafe impl Split for TlsStream {}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn internal(what: &str) -> io::Error {
    io::Error::other(format!("internal: unexpected TLS state {what}"))
}

/// Appends what `f` writes to `out`, growing it when rustls says it needs more.
pub(crate) fn append_with<E>(
    out: &mut Vec<u8>,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    let mut room = guess;
    loop {
        out.resize(start + room, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match needs(&e) {
                Some(need) if need > room => room = need,
                _ => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

pub(crate) fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

/// Moves the records rustls has decrypted to `plain`. They must all be
/// taken before rustls is asked for anything else: until they are, it
/// answers every call with `ReadTraffic`, writers' included.
pub(crate) fn stash(rt: &mut ReadTraffic<'_, '_, ServerConnectionData>, plain: &mut Vec<u8>) -> io::Result<()> {
    while let Some(rec) = rt.next_record() {
        plain.extend_from_slice(rec.map_err(tls_err)?.payload);
    }
    Ok(())
}

/// After a fatal TLS error: appends the alert rustls queued for the peer.
pub(crate) fn take_alert(conn: &mut UnbufferedServerConnection, out: &mut Vec<u8>) {
    for _ in 0..4 {
        match conn.process_tls_records(&mut []).state {
            Ok(ConnectionState::EncodeTlsData(mut e)) => {
                if append_with(out, 64, |b| e.encode(b), encode_needs).is_err() {
                    return;
                }
            }
            Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
            _ => return,
        }
    }
}

/// Room for `n` bytes of plaintext once encrypted: 16 KiB records with at
/// most 29 bytes of overhead each (TLS 1.2 AES-GCM), plus slack.
fn sealed_len(n: usize) -> usize {
    n + (n / 16384 + 1) * 32 + 64
}

impl TlsStream {
    pub(crate) fn new(io: TcpStream, conn: UnbufferedServerConnection) -> Self {
        TlsStream {
            io,
            conn,
            incoming: Vec::with_capacity(SMALL_BUF),
            plain: Vec::new(),
            plain_pos: 0,
            pending: Vec::new(),
            wbuf: Some(Vec::new()),
            writing: false,
            peer_closed: false,
        }
    }

    /// Drops the first `n` processed bytes of `incoming`, and lets go of a
    /// large buffer once it is empty (an idle connection then holds little).
    pub(crate) fn discard(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.incoming.drain(..n);
        if self.incoming.is_empty() && self.incoming.capacity() > INCOMING_MAX {
            self.incoming = Vec::with_capacity(SMALL_BUF);
        }
    }

    /// Copies waiting plaintext to `dst`; returns how much.
    fn take_plain(&mut self, dst: &mut Dst) -> usize {
        let n = dst.put(&self.plain[self.plain_pos..]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            self.plain.clear();
            self.plain_pos = 0;
        }
        n
    }

    /// Decrypts what `incoming` holds into `dst` (the rest of a record that
    /// does not fit goes to `plain`). `Ok(None)`: more bytes are needed;
    /// `Ok(Some(0))`: the client closed the TLS session.
    fn decrypt(&mut self, dst: &mut Dst) -> io::Result<Option<usize>> {
        loop {
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(&mut self.incoming);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    self.discard(discard);
                    self.queue_alert();
                    return Err(tls_err(e));
                }
            };
            let got = match state {
                ConnectionState::ReadTraffic(mut rt) => {
                    let mut n = 0;
                    // Every record must be taken now: rustls keeps
                    // decrypted records until they are, and would hand a
                    // writer `ReadTraffic` instead of `WriteTraffic`.
                    while let Some(rec) = rt.next_record() {
                        let rec = rec.map_err(tls_err)?;
                        discard += rec.discard;
                        let k = dst.put(rec.payload);
                        n += k;
                        self.plain.extend_from_slice(&rec.payload[k..]);
                    }
                    (n > 0).then_some(n)
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    append_with(&mut self.pending, 256, |b| e.encode(b), encode_needs).map_err(io::Error::other)?;
                    None
                }
                ConnectionState::TransmitTlsData(t) => {
                    // Sent in order in front of the next write.
                    t.done();
                    None
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.peer_closed = true;
                    Some(0)
                }
                ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake => {
                    self.discard(discard);
                    return Ok(None);
                }
                other => return Err(internal(&format!("{other:?} while reading"))),
            };
            self.discard(discard);
            if got.is_some() {
                return Ok(got);
            }
            if !self.plain.is_empty() {
                return Ok(Some(self.take_plain(dst)));
            }
        }
    }

    /// What a read can return without waiting: waiting plaintext, records
    /// already received, or the end of the session.
    fn read_now(&mut self, dst: &mut Dst) -> io::Result<Option<usize>> {
        if self.plain_pos < self.plain.len() {
            return Ok(Some(self.take_plain(dst)));
        }
        if self.peer_closed {
            return Ok(Some(0));
        }
        if self.incoming.is_empty() {
            return Ok(None);
        }
        self.decrypt(dst)
    }

    /// Reads plaintext into `dst`, reading the socket as needed.
    async fn read_plain(&mut self, dst: &mut Dst) -> io::Result<usize> {
        loop {
            if let Some(n) = self.read_now(dst)? {
                return Ok(n);
            }
            if read_more(&mut self.io, &mut self.incoming, INCOMING_MAX).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed the connection without a TLS close_notify"));
            }
        }
    }

    /// After a fatal TLS error: queues the alert rustls has for the client
    /// and sends it if no write is in flight (best effort; the connection
    /// is closed next anyway).
    fn queue_alert(&mut self) {
        take_alert(&mut self.conn, &mut self.pending);
        if !self.writing && !self.pending.is_empty() {
            // The socket is fresh enough to take a few bytes without waiting;
            // a non-blocking send keeps this synchronous.
            use std::os::fd::AsRawFd;
            // SAFETY: send on our open socket from a live buffer.
            unsafe {
                libc::send(self.io.as_raw_fd(), self.pending.as_ptr().cast(), self.pending.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
            }
            self.pending.clear();
        }
    }

    /// Encrypts `plain` into `out`, after whatever TLS bytes rustls still
    /// has to send. `close` queues a close_notify instead.
    fn seal(&mut self, plain: &[&[u8]], close: bool, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let UnbufferedStatus { discard: _, state } = self.conn.process_tls_records(&mut []);
            match state.map_err(tls_err)? {
                ConnectionState::EncodeTlsData(mut e) => {
                    append_with(out, 256, |b| e.encode(b), encode_needs).map_err(io::Error::other)?;
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::WriteTraffic(mut w) => {
                    if close {
                        return append_with(out, 64, |b| w.queue_close_notify(b), encrypt_needs).map_err(io::Error::other);
                    }
                    for p in plain {
                        append_with(out, sealed_len(p.len()), |b| w.encrypt(p, b), encrypt_needs).map_err(io::Error::other)?;
                    }
                    return Ok(());
                }
                // Records decrypted but not taken: keep them for the reader.
                ConnectionState::ReadTraffic(mut rt) => stash(&mut rt, &mut self.plain)?,
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS session already closed")),
                other => return Err(internal(&format!("{other:?} while writing"))),
            }
        }
    }

    /// Seals `plain` (or a close_notify) and writes it all to the socket.
    async fn seal_and_send(&mut self, plain: &[&[u8]], close: bool) -> io::Result<()> {
        let mut out = self.wbuf.take().unwrap_or_default();
        out.clear();
        out.append(&mut self.pending);
        let sealed = self.seal(plain, close, &mut out);
        let res = match sealed {
            Ok(()) if out.is_empty() => Ok(()),
            Ok(()) => {
                self.writing = true;
                let (r, b) = self.io.write_all(out).await;
                out = b;
                self.writing = false;
                r.map(|_| ())
            }
            Err(e) => Err(e),
        };
        if out.capacity() <= WBUF_KEEP {
            self.wbuf = Some(out);
        }
        res
    }
}

impl AsyncReadRent for TlsStream {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        let mut dst = Dst { ptr: buf.write_ptr(), room: buf.bytes_total() };
        let r = self.read_plain(&mut dst).await;
        if let Ok(n) = r {
            unsafe { buf.set_init(n) };
        }
        (r, buf)
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: as monoio-rustls does, read into the first iovec.
        let n = match unsafe { RawBuf::new_from_iovec_mut(&mut buf) } {
            Some(raw) => self.read(raw).await.0,
            None => Ok(0),
        };
        if let Ok(n) = n {
            unsafe { buf.set_init(n) };
        }
        (n, buf)
    }
}

impl AsyncWriteRent for TlsStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: the caller's initialized bytes, alive for the call.
        let src = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let r = self.seal_and_send(&[src], false).await.map(|_| src.len());
        (r, buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: the iovecs describe the caller's initialized bytes, alive for the call.
        let parts: Vec<&[u8]> = unsafe {
            std::slice::from_raw_parts(buf.read_iovec_ptr(), buf.read_iovec_len())
                .iter()
                .map(|v| std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len))
                .collect()
        };
        let total = parts.iter().map(|p| p.len()).sum();
        let r = self.seal_and_send(&parts, false).await.map(|_| total);
        (r, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.seal_and_send(&[], false).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.seal_and_send(&[], true).await?;
        self.io.shutdown().await
    }
}

impl crate::io::ClientStream for TlsStream {
    /// Like the plain socket's: the wait for the next request is a
    /// cancelable read of the socket, so a drain loses no request that
    /// raced it.
    async fn read_idle(&mut self, buf: &mut Vec<u8>, max: usize, drain: &crate::drain::Drain) -> io::Result<usize> {
        use monoio::io::CancelableAsyncReadRent;
        let Some(handle) = drain.cancel_handle() else {
            return Ok(0);
        };
        crate::io::make_room(buf, max)?;
        // Plaintext or records already here need no wait.
        if let Some(n) = self.read_now(&mut spare(buf))? {
            // SAFETY: `read_now` wrote `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            return Ok(n);
        }
        crate::io::make_room(&mut self.incoming, INCOMING_MAX)?;
        let owned = std::mem::take(&mut self.incoming);
        let (len, cap) = (owned.len(), owned.capacity());
        let (res, slice) = self.io.cancelable_read(owned.slice_mut(len..cap), handle).await;
        self.incoming = slice.into_inner();
        match res {
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) || e.kind() == io::ErrorKind::Interrupted => return Ok(0),
            Err(e) => return Err(e),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed the connection without a TLS close_notify")),
            Ok(_) => {}
        }
        let n = self.read_plain(&mut spare(buf)).await?;
        // SAFETY: `read_plain` wrote `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        Ok(n)
    }
}

/// Where decrypted bytes go: the caller's buffer, whose bytes may not be
/// initialized yet (so no `&mut [u8]` over it), filled front to back.
struct Dst {
    ptr: *mut u8,
    room: usize,
}

impl Dst {
    /// Copies as much of `src` as fits; returns how much.
    fn put(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(self.room);
        // SAFETY: `ptr` is valid for `room` more bytes (see `spare` and the
        // `read` impl, which build it from a buffer they hold), and `src`
        // is a different allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, n);
            self.ptr = self.ptr.add(n);
        }
        self.room -= n;
        n
    }
}

/// The spare capacity of `buf`, for decrypted bytes.
fn spare(buf: &mut Vec<u8>) -> Dst {
    let len = buf.len();
    // SAFETY: `len` is within the allocation.
    Dst { ptr: unsafe { buf.as_mut_ptr().add(len) }, room: buf.capacity() - len }
}
