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
//! When the handshake is done, the same rustls session becomes a
//! `monoio_rustls` stream (`Stream::new`). Any data the client sent after its
//! Finished is already decrypted inside that session, where the stream's
//! first read finds it. The rest of the data path does not change.

use std::io;
use std::rc::Rc;
use std::sync::Arc;

use local_sync::semaphore::Semaphore;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio_rustls::ServerTlsStream;
use rustls::{ServerConfig, ServerConnection};

/// Handshakes that may do their CPU work in one pass of a worker's event
/// loop. The per-handshake cost of the pacing is one driver pass of
/// latency, not CPU: see benches/RESULTS.md.
pub const PERMITS: usize = 1;

thread_local! {
    static GATE: Rc<Semaphore> = Rc::new(Semaphore::new(PERMITS));
}

/// Runs the server side of a TLS handshake on `io`. The caller bounds it with
/// a timeout. Errors are the client's: a bad or truncated handshake.
pub async fn accept(config: Arc<ServerConfig>, mut io: TcpStream) -> io::Result<ServerTlsStream<TcpStream>> {
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let gate = GATE.with(Rc::clone);
    let mut buf = crate::io::take_buf();
    let mut out = Vec::new();
    let r = drive(&mut conn, &mut io, &gate, &mut buf, &mut out).await;
    crate::io::give_buf(buf);
    r?;
    Ok(ServerTlsStream::new(io, conn))
}

async fn drive(conn: &mut ServerConnection, io: &mut TcpStream, gate: &Semaphore, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> io::Result<()> {
    loop {
        // The reply to the last flight (and, once done, the session tickets).
        flush(conn, io, out).await?;
        if !conn.is_handshaking() {
            return Ok(());
        }
        buf.clear();
        let (r, b) = io.read(std::mem::take(buf)).await;
        *buf = b;
        if r? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed the connection during the TLS handshake"));
        }
        let mut rest: &[u8] = buf;
        while !rest.is_empty() {
            conn.read_tls(&mut rest)?;
            let state = match conn.is_handshaking() {
                true => {
                    let mut permit = Some(gate.acquire().await.map_err(io::Error::other)?);
                    let state = conn.process_new_packets();
                    // Keep the permit until the reply has been handed to the
                    // kernel: the write completes on the worker's next pass
                    // through the driver, after the tasks that became ready
                    // meanwhile (open connections' requests) have run. A
                    // reply that might not fit a fresh socket's send buffer
                    // (a long certificate chain) lets go first, so that no
                    // write the client can stall is made under the permit.
                    if state.is_ok() {
                        take_reply(conn, out)?;
                        if out.len() > HELD_WRITE_MAX {
                            permit = None;
                        }
                        write_out(io, out).await?;
                    }
                    drop(permit);
                    state
                }
                false => conn.process_new_packets(),
            };
            match state {
                Ok(s) if s.peer_has_closed() && conn.is_handshaking() => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client sent close_notify during the TLS handshake"));
                }
                Ok(_) => {}
                Err(e) => {
                    // Send the alert rustls queued, then fail.
                    let _ = flush(conn, io, out).await;
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
        }
    }
}

/// Largest reply written while holding the permit: well inside the 16 KiB
/// a fresh TCP socket may queue (`tcp_wmem`'s default), so the write does
/// not wait for the client to read.
const HELD_WRITE_MAX: usize = 8 * 1024;

/// Moves everything rustls has to send into `out`.
fn take_reply(conn: &mut ServerConnection, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

async fn write_out(io: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let (r, b) = io.write_all(std::mem::take(out)).await;
    *out = b;
    r.map(|_| ())
}

async fn flush(conn: &mut ServerConnection, io: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    take_reply(conn, out)?;
    write_out(io, out).await
}
