//! Buffer plumbing for monoio's owned-buffer I/O: a per-thread buffer pool,
//! read/write helpers that keep a `Vec<u8>` in place across awaits, and the
//! bidirectional byte pipe used by TCP mode and by upgraded (101) HTTP
//! connections.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split, Splitable};
use monoio::BufResult;

/// Size of the per-connection buffers.
pub const BUF_SIZE: usize = 16 * 1024;
const POOL_MAX: usize = 4096;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Takes an empty buffer of at least [`BUF_SIZE`] from this thread's pool.
pub fn take_buf() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
}

/// Returns a buffer to this thread's pool (oversized ones are shrunk).
pub fn give_buf(mut b: Vec<u8>) {
    if b.capacity() < BUF_SIZE {
        return;
    }
    if b.capacity() > 4 * BUF_SIZE {
        b = Vec::with_capacity(BUF_SIZE);
    }
    b.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

/// Read buffer of a connection that is mostly idle or sends little: with
/// io_uring a pending read owns its buffer until data comes, so an idle
/// connection reading into a pooled [`BUF_SIZE`] buffer (dirty from earlier
/// traffic) would keep 16 KiB resident per direction.
pub const SMALL_BUF: usize = 2 * 1024;

/// Whether the next read should get a big buffer, after a read of `last`
/// bytes into a buffer of capacity `cap`: a small buffer that filled up
/// means data is flowing; a big one stays while reads are at least half a
/// small buffer (hysteresis, so a busy stream does not swap every read).
fn wants_big(last: usize, cap: usize) -> bool {
    last >= if cap >= BUF_SIZE { SMALL_BUF / 2 } else { SMALL_BUF }
}

/// A fresh empty buffer for the next read (see [`SMALL_BUF`]).
pub fn next_read_buf(last: usize, cap: usize) -> Vec<u8> {
    if wants_big(last, cap) {
        take_buf()
    } else {
        Vec::with_capacity(SMALL_BUF)
    }
}

/// Swaps the empty `buf` for a small or a big one as [`next_read_buf`]
/// would choose, after a read of `last` bytes into it.
pub fn refit_read_buf(buf: &mut Vec<u8>, last: usize) {
    let cap = buf.capacity();
    let keep = if wants_big(last, cap) { cap >= BUF_SIZE } else { (SMALL_BUF..=2 * SMALL_BUF).contains(&cap) };
    if !keep {
        give_buf(std::mem::replace(buf, next_read_buf(last, cap)));
    }
}

/// Reads more bytes at the end of `buf`, growing it when full (up to `max`).
/// Returns the number of bytes read (0: end of stream).
pub async fn read_more<S: AsyncReadRent>(s: &mut S, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    make_room(buf, max)?;
    let owned = std::mem::take(buf);
    let (len, cap) = (owned.len(), owned.capacity());
    let (res, slice) = s.read(owned.slice_mut(len..cap)).await;
    *buf = slice.into_inner();
    res
}

/// Makes sure `buf` has room to read into, growing it up to `max`.
pub(crate) fn make_room(buf: &mut Vec<u8>, max: usize) -> io::Result<()> {
    if buf.capacity() - buf.len() < 512 {
        if buf.capacity() >= max {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "buffer limit reached"));
        }
        buf.reserve(buf.capacity().max(BUF_SIZE).min(max - buf.len()));
    }
    Ok(())
}

/// Writes all of `buf` (it is kept, unchanged, for reuse).
pub async fn write_vec<S: AsyncWriteRent>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let owned = std::mem::take(buf);
    let (res, b) = s.write_all(owned).await;
    *buf = b;
    res.map(|_| ())
}

/// Writes `buf[range]`.
pub async fn write_range<S: AsyncWriteRent>(s: &mut S, buf: &mut Vec<u8>, range: std::ops::Range<usize>) -> io::Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    let owned = std::mem::take(buf);
    let (res, slice) = s.write_all(owned.slice(range)).await;
    *buf = slice.into_inner();
    res.map(|_| ())
}

/// Wakes anything blocked on `fd` (both directions) so a tunnel whose other
/// half failed does not wait for its idle timeout.
pub fn shutdown_fd(fd: RawFd) {
    // SAFETY: shutdown on a descriptor we own; an error (already closed) is harmless.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Copies `from` -> `to` until end of stream, then half-closes `to`.
/// Each read may wait at most `idle`.
/// `total` counts the bytes written so far (also when it fails).
pub async fn copy_half<R: AsyncReadRent, W: AsyncWriteRent>(from: &mut R, to: &mut W, idle: Duration, total: &mut u64) -> io::Result<()> {
    let mut buf = take_buf();
    let res = loop {
        buf.clear();
        let n = match monoio::time::timeout(idle, read_more(from, &mut buf, BUF_SIZE)).await {
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => break Err(e),
            Err(_) => break Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
        };
        if let Err(e) = write_vec(to, &mut buf).await {
            break Err(e);
        }
        *total += n as u64;
    };
    if res.is_ok() {
        let _ = to.shutdown().await;
    }
    give_buf(buf);
    res
}

/// Pipes bytes both ways between `a` and `b` until both directions end,
/// with half-close. If either direction fails, both sockets (`fds`) are shut
/// down so the other direction ends at once instead of at its idle timeout.
/// Returns the bytes carried a -> b and b -> a (what was copied before an
/// error included).
pub async fn pipe_both<A, B>(a: A, b: B, fds: [RawFd; 2], idle: Duration) -> (u64, u64)
where
    A: AsyncReadRent + AsyncWriteRent + Split + 'static,
    B: AsyncReadRent + AsyncWriteRent + Split + 'static,
{
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let fail = || fds.iter().for_each(|&fd| shutdown_fd(fd));
    let a_to_b = async {
        let mut n = 0;
        if copy_half(&mut ar, &mut bw, idle, &mut n).await.is_err() {
            fail();
        }
        n
    };
    let b_to_a = async {
        let mut n = 0;
        if copy_half(&mut br, &mut aw, idle, &mut n).await.is_err() {
            fail();
        }
        n
    };
    monoio::join!(a_to_b, b_to_a)
}

/// A client stream that counts the bytes it carries, for the metrics and
/// the access log. The counts are taken (and reset) once per request.
pub struct Metered<S> {
    pub inner: S,
    read: u64,
    written: u64,
}

impl<S> Metered<S> {
    pub fn new(inner: S) -> Self {
        Metered { inner, read: 0, written: 0 }
    }

    /// Bytes read and written since the last call.
    pub fn take_counts(&mut self) -> (u64, u64) {
        (std::mem::take(&mut self.read), std::mem::take(&mut self.written))
    }
}

// SAFETY: splitting a `Metered` splits the stream it wraps, which is `Split`;
// the counters are plain integers owned by the one task using both halves.
unsafe impl<S: Split> Split for Metered<S> {}

fn count<T>(total: &mut u64, r: BufResult<usize, T>) -> BufResult<usize, T> {
    if let Ok(n) = r.0 {
        *total += n as u64;
    }
    r
}

impl<S: AsyncReadRent> AsyncReadRent for Metered<S> {
    fn read<T: IoBufMut>(&mut self, buf: T) -> impl std::future::Future<Output = BufResult<usize, T>> {
        async move { count(&mut self.read, self.inner.read(buf).await) }
    }

    fn readv<T: IoVecBufMut>(&mut self, buf: T) -> impl std::future::Future<Output = BufResult<usize, T>> {
        async move { count(&mut self.read, self.inner.readv(buf).await) }
    }
}

impl<S: AsyncWriteRent> AsyncWriteRent for Metered<S> {
    fn write<T: IoBuf>(&mut self, buf: T) -> impl std::future::Future<Output = BufResult<usize, T>> {
        async move { count(&mut self.written, self.inner.write(buf).await) }
    }

    fn writev<T: IoVecBuf>(&mut self, buf: T) -> impl std::future::Future<Output = BufResult<usize, T>> {
        async move { count(&mut self.written, self.inner.writev(buf).await) }
    }

    fn flush(&mut self) -> impl std::future::Future<Output = io::Result<()>> {
        self.inner.flush()
    }

    fn shutdown(&mut self) -> impl std::future::Future<Output = io::Result<()>> {
        self.inner.shutdown()
    }
}

impl<S: ClientStream> ClientStream for Metered<S> {
    async fn read_idle(&mut self, buf: &mut Vec<u8>, max: usize, drain: &crate::drain::Drain) -> io::Result<usize> {
        let r = self.inner.read_idle(buf, max, drain).await;
        if let Ok(n) = r {
            self.read += n as u64;
        }
        r
    }

    async fn send_file(&mut self, file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
        let r = self.inner.send_file(file, offset, len).await;
        if r.is_ok() {
            self.written += len;
        }
        r
    }
}

/// A client connection: plain TCP or TLS.
// monoio tasks never move between threads, so the futures need no `Send`. Everything the handlers need is
/// in the monoio traits; this adds what only some streams can do faster.
#[allow(async_fn_in_trait)]
pub trait ClientStream: AsyncReadRent + AsyncWriteRent + Split + Sized + 'static {
    /// Waits for the first bytes of the next request on an idle keep-alive
    /// connection, like [`read_more`], but gives up (`Ok(0)`, as if the
    /// client had closed) when the worker starts draining. This default
    /// races the read against the drain; a request arriving in that very
    /// instant is lost with the connection, as with any server closing an
    /// idle keep-alive connection. Plain sockets override it with a
    /// cancelable read that loses nothing.
    async fn read_idle(&mut self, buf: &mut Vec<u8>, max: usize, drain: &crate::drain::Drain) -> io::Result<usize> {
        if drain.is_draining() {
            return Ok(0);
        }
        monoio::select! {
            r = read_more(self, buf, max) => r,
            _ = drain.started() => Ok(0),
        }
    }

    /// Sends `len` bytes of `file` starting at `offset`. The default reads
    /// through a pooled buffer (TLS must encrypt anyway); plain sockets
    /// override it with sendfile(2), zero copy.
    async fn send_file(&mut self, file: &std::fs::File, mut offset: u64, mut len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = take_buf();
        let res = loop {
            if len == 0 {
                break Ok(());
            }
            buf.clear();
            buf.resize((BUF_SIZE as u64).min(len) as usize, 0);
            let n = match file.read_at(&mut buf, offset) {
                Ok(0) => break Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being sent")),
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            buf.truncate(n);
            if let Err(e) = write_vec(self, &mut buf).await {
                break Err(e);
            }
            offset += n as u64;
            len -= n as u64;
        };
        give_buf(buf);
        res
    }
}

impl ClientStream for monoio::net::TcpStream {
    async fn read_idle(&mut self, buf: &mut Vec<u8>, max: usize, drain: &crate::drain::Drain) -> io::Result<usize> {
        use monoio::io::CancelableAsyncReadRent;
        let Some(handle) = drain.cancel_handle() else {
            return Ok(0);
        };
        make_room(buf, max)?;
        let owned = std::mem::take(buf);
        let (len, cap) = (owned.len(), owned.capacity());
        let (res, slice) = self.cancelable_read(owned.slice_mut(len..cap), handle).await;
        *buf = slice.into_inner();
        match res {
            // Canceled by the drain before any byte arrived.
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) || e.kind() == io::ErrorKind::Interrupted => Ok(0),
            r => r,
        }
    }

    async fn send_file(&mut self, file: &std::fs::File, offset: u64, mut len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.as_raw_fd();
        // The io_uring driver may leave sockets blocking; sendfile must not
        // block the worker, so make sure of O_NONBLOCK (io_uring ops are
        // unaffected by it).
        // SAFETY: fcntl on an open descriptor.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl >= 0 && fl & libc::O_NONBLOCK == 0 {
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        let mut off = offset as libc::off_t;
        while len > 0 {
            let chunk = len.min(1 << 30) as usize;
            // SAFETY: both descriptors are open for the duration of the call.
            let n = unsafe { libc::sendfile(fd, file.as_raw_fd(), &mut off, chunk) };
            if n > 0 {
                len -= n as u64;
            } else if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being sent"));
            } else {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => self.writable(false).await?,
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_reads_use_small_buffers_and_flowing_reads_big_ones() {
        // A fresh connection's leftover (capacity 0) with nothing in it: small.
        let mut b = Vec::new();
        refit_read_buf(&mut b, 0);
        assert_eq!(b.capacity(), SMALL_BUF);
        // A small read keeps the small buffer (no churn).
        let p = b.as_ptr();
        refit_read_buf(&mut b, 100);
        assert_eq!(b.as_ptr(), p);
        // A read that filled it: data is flowing, go big.
        refit_read_buf(&mut b, SMALL_BUF);
        assert!(b.capacity() >= BUF_SIZE);
        // Big stays big for reads of half a small buffer or more ...
        refit_read_buf(&mut b, SMALL_BUF / 2);
        assert!(b.capacity() >= BUF_SIZE);
        // ... and goes back to small when reads shrink.
        refit_read_buf(&mut b, 10);
        assert_eq!(b.capacity(), SMALL_BUF);
        assert!(next_read_buf(SMALL_BUF, SMALL_BUF).capacity() >= BUF_SIZE);
        assert_eq!(next_read_buf(SMALL_BUF - 1, SMALL_BUF).capacity(), SMALL_BUF);
    }
}
