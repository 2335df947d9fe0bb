//! Server-side TLS handshakes, paced so they do not starve connections that
//! are already open.
//!
//! A full handshake costs about 170 µs of CPU (key exchange and signature,
//! benches/RESULTS.md). When many clients connect at once, for example after
//! a restart or a network blip, or `wrk -c500`, every new connection's
//! ClientHello becomes ready in the same scheduling round. In monoio's FIFO
//! task order, a request on a connection that is already open then waits
//! behind all of them: 500 handshakes are about 85 ms of one core, and that
//! was Atlas's p99 at c=500 over TLS.
//!
//! So this module drives the handshake itself, rather than through
//! `monoio_rustls::TlsAcceptor::accept`. The step that does the CPU work,
//! rustls' `process_new_packets` while handshaking, first takes one of
//! [`PERMITS`] per-worker permits, and keeps it until its reply has been
//! written. On io_uring that write completes only on the worker's next pass
//! through the driver, after the tasks that became ready meanwhile have
//! run. So each pass serves the open connections and then one handshake,
//! which is what nginx gets by accepting one connection per event-loop
//! turn. A plain yield to the back of the task queue is not
//! enough: monoio runs up to twice the queue's length of tasks before it
//! looks at I/O again, so a chain of yielding handshakes still ran ~100
//! deep before a waiting request was even seen. (On the epoll fallback the
//! write is done inside the poll, so there the gate orders nothing; io_uring
//! is the default.)
//!
//! The permit is taken after the bytes have been read. A reply of up to
//! [`HELD_WRITE_MAX`] goes to a fresh socket's empty send buffer, so its
//! write waits on nothing the client controls; a larger one (a long
//! certificate chain) is written after the permit is given back. Nothing is
//! held across a read, so a client that stalls mid-handshake holds no
//! permit, and the gate gives a slow client attack nothing to use.
//!
//! The handshake runs on the same [`TlsStream`] that then carries the
//! connection's data (rustls's unbuffered API, see `tls_stream`). Any data
//! the client sent right after its Finished stays in the stream's buffer,
//! where its first read finds it.

use std::io;
use std::rc::Rc;
use std::sync::Arc;

use local_sync::semaphore::Semaphore;
use monoio::net::TcpStream;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::ServerConfig;

use crate::tls_stream::{append_with, encode_needs, stash, take_alert, TlsStream};

/// Handshakes that may do their CPU work in one pass of a worker's event
/// loop. The per-handshake cost of the pacing is one driver pass of
/// latency, not CPU: see benches/RESULTS.md.
pub const PERMITS: usize = 1;

thread_local! {
    static GATE: Rc<Semaphore> = Rc::new(Semaphore::new(PERMITS));
}

/// Runs the server side of a TLS handshake on `io`. The caller bounds it with
/// a timeout. Errors are the client's: a bad or truncated handshake.
pub async fn accept(config: Arc<ServerConfig>, io: TcpStream) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut s = TlsStream::new(io, conn);
    let gate = GATE.with(Rc::clone);
    let mut out = Vec::new();
    drive(&mut s, &gate, &mut out).await?;
    Ok(s)
}

/// What the handshake waits for next.
enum Next {
    /// Write `out` (a flight is complete).
    Send,
    /// Read more from the client.
    Read,
    /// The handshake is over.
    Done,
}

async fn drive(s: &mut TlsStream, gate: &Semaphore, out: &mut Vec<u8>) -> io::Result<()> {
    let mut fresh = false;
    loop {
        // New bytes from the client while handshaking: the next step may do
        // the expensive work (key exchange, signature), so it takes a permit.
        let mut permit = match fresh && s.conn.is_handshaking() {
            true => Some(gate.acquire().await.map_err(io::Error::other)?),
            false => None,
        };
        fresh = false;
        match step(s, out) {
            Ok(Next::Send) => {
                // Keep the permit until the reply has been handed to the
                // kernel: the write completes on the worker's next pass
                // through the driver, after the tasks that became ready
                // meanwhile (open connections' requests) have run. A reply
                // that might not fit a fresh socket's send buffer (a long
                // certificate chain) lets go first, so that no write the
                // client can stall is made under the permit.
                if out.len() > HELD_WRITE_MAX {
                    permit = None;
                }
                write_out(&mut s.io, out).await?;
                drop(permit);
            }
            Ok(Next::Read) => {
                drop(permit);
                write_out(&mut s.io, out).await?;
                if crate::io::read_more(&mut s.io, &mut s.incoming, HANDSHAKE_MAX).await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed the connection during the TLS handshake"));
                }
                fresh = true;
            }
            Ok(Next::Done) => {
                drop(permit);
                return write_out(&mut s.io, out).await;
            }
            Err(e) => {
                drop(permit);
                // Send the alert rustls queued, then fail.
                let _ = write_out(&mut s.io, out).await;
                return Err(e);
            }
        }
    }
}

/// Most handshake bytes held while a message is incomplete: rustls caps a
/// handshake message at 64 KiB, which may span several records.
const HANDSHAKE_MAX: usize = 72 * 1024;

/// Runs rustls on what the client sent until it needs I/O; the bytes to
/// send are appended to `out`.
fn step(s: &mut TlsStream, out: &mut Vec<u8>) -> io::Result<Next> {
    loop {
        let UnbufferedStatus { discard, state } = s.conn.process_tls_records(&mut s.incoming);
        let next = match state {
            Err(e) => {
                s.discard(discard);
                take_alert(&mut s.conn, out);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            Ok(ConnectionState::EncodeTlsData(mut e)) => {
                append_with(out, 4096, |b| e.encode(b), encode_needs).map_err(io::Error::other)?;
                None
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                // `out` is written before anything else is sent.
                t.done();
                Some(Next::Send)
            }
            Ok(ConnectionState::BlockedHandshake) => Some(Next::Read),
            Ok(ConnectionState::WriteTraffic(_)) => Some(Next::Done),
            // Application data right behind the client's Finished: kept
            // for the stream's first read.
            Ok(ConnectionState::ReadTraffic(mut rt)) => {
                stash(&mut rt, &mut s.plain)?;
                Some(Next::Done)
            }
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client sent close_notify during the TLS handshake"));
            }
            Ok(other) => return Err(io::Error::other(format!("internal: unexpected TLS state {other:?} during the handshake"))),
        };
        s.discard(discard);
        if let Some(next) = next {
            return Ok(next);
        }
    }
}

/// Largest reply written while holding the permit: well inside the 16 KiB
/// a fresh TCP socket may queue (`tcp_wmem`'s default), so the write does
/// not wait for the client to read.
const HELD_WRITE_MAX: usize = 8 * 1024;

async fn write_out(io: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    let r = crate::io::write_vec(io, out).await;
    out.clear();
    r
}
