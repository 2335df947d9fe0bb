//! TCP mode: layer-4 passthrough. Picks an upstream per connection (hash on
//! the client IP when the strategy is `hash`), then pipes bytes both ways.
//! Half-close is honoured: when one side finishes sending, the other side's
//! write half is shut down and the opposite direction keeps flowing until it
//! ends too. Plain sockets copy small reads and splice(2) bulk transfers
//! through a pipe (no copy through user space); other streams (TLS) copy
//! through a pooled buffer.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use atlas_balance::hash64;
use monoio::io::as_fd::{AsReadFd, AsWriteFd};
use monoio::io::splice::{SpliceDestination, SpliceSource};
use monoio::io::{AsyncReadRent, AsyncWriteRent, Split, Splitable};
use monoio::net::TcpStream;

use crate::io::{give_buf, next_read_buf, pipe_both, read_more, refit_read_buf, shutdown_fd, write_vec, BUF_SIZE};
use crate::upstream::{self, InflightGuard, UpstreamConn};
use crate::ListenerCtx;
use atlas_observe::skim;

const SPLICE_CHUNK: u32 = 64 * 1024;

fn client_hash(ctx: &ListenerCtx, peer: SocketAddr) -> u64 {
    match (&ctx.hash_key, peer.ip()) {
        (None, _) => 0,
        (Some(_), std::net::IpAddr::V4(v4)) => hash64(&v4.octets()),
        (Some(_), std::net::IpAddr::V6(v6)) => hash64(&v6.octets()),
    }
}

/// Once a splice moves less than this, the direction goes back to copying.
const SPLICE_BACK: usize = 4 * 1024;

/// One direction of a plain-socket tunnel, until end of stream (then `to`
/// is half-closed). Small reads are copied through a buffer; a read that
/// fills a whole 16 KiB buffer means a bulk transfer, and the direction
/// switches to splice(2) through a pipe until a splice moves less than
/// [`SPLICE_BACK`]. Measured (benches/RESULTS.md, issue 10): for 1 KiB
/// request/response traffic, copying cost 8.2 µs of proxy CPU per request
/// where splicing every read cost 15.4 (two ops and a pipe per chunk); for
/// 1 MiB responses, splicing cost 305 µs per response and copying 820.
/// `total` counts the bytes delivered (also when it fails).
async fn relay_half<R, W>(from: &mut R, to: &mut W, idle: Duration, total: &mut u64) -> io::Result<()>
where
    R: AsReadFd + AsyncReadRent,
    W: AsWriteFd + AsyncWriteRent,
{
    // Small while the connection idles or trickles, pooled 16 KiB ones while
    // data flows (see `io::refit_read_buf`): an idle tunnel holds 2 KiB per
    // direction, not 16.
    let mut buf = next_read_buf(0, 0);
    let mut pipe = None;
    let res = relay_loop(from, to, idle, total, &mut buf, &mut pipe).await;
    give_buf(buf);
    res
}

async fn relay_loop<R, W>(
    from: &mut R,
    to: &mut W,
    idle: Duration,
    total: &mut u64,
    buf: &mut Vec<u8>,
    pipe: &mut Option<(monoio::net::unix::Pipe, monoio::net::unix::Pipe)>,
) -> io::Result<()>
where
    R: AsReadFd + AsyncReadRent,
    W: AsWriteFd + AsyncWriteRent,
{
    let idle_err = || io::Error::new(io::ErrorKind::TimedOut, "idle timeout");
    let mut bulk = false;
    loop {
        if bulk && pipe.is_none() {
            match monoio::net::unix::new_pipe() {
                Ok(p) => *pipe = Some(p),
                // Out of descriptors: keep copying.
                Err(_) => bulk = false,
            }
        }
        let n = match pipe.as_mut().filter(|_| bulk) {
            None => {
                let n = monoio::time::timeout(idle, read_more(from, buf, BUF_SIZE)).await.map_err(|_| idle_err())??;
                if n > 0 {
                    write_vec(to, buf).await?;
                    *total += n as u64;
                    bulk = n == buf.capacity() && n >= BUF_SIZE;
                }
                buf.clear();
                refit_read_buf(buf, n);
                n
            }
            Some((pr, pw)) => {
                let n = monoio::time::timeout(idle, from.splice_to_pipe(pw, SPLICE_CHUNK)).await.map_err(|_| idle_err())?? as usize;
                let mut left = n;
                while left > 0 {
                    let w = to.splice_from_pipe(pr, left as u32).await? as usize;
                    if w == 0 {
                        return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped reading"));
                    }
                    left -= w;
                    *total += w as u64;
                }
                bulk = n >= SPLICE_BACK;
                n
            }
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
    }
}

/// Counts a finished TCP connection and writes its log line and skim sample.
fn finish(ctx: &ListenerCtx, peer: SocketAddr, started: std::time::Instant, upstream: &str, bytes_in: u64, bytes_out: u64) {
    let st = ctx.stats();
    st.bytes_in.add(bytes_in);
    st.bytes_out.add(bytes_out);
    let us = started.elapsed().as_micros() as u64;
    if let Some(log) = &ctx.access_log {
        log.write(&atlas_observe::access_log::Record {
            time: std::time::SystemTime::now(),
            listener: &ctx.name,
            client: peer.ip(),
            method: "",
            target: "",
            protocol: "TCP",
            status: 0,
            bytes_in,
            bytes_out,
            duration_us: us,
            upstream,
            referer: "",
            user_agent: "",
        });
    }
    if let Some(s) = ctx.skim.as_ref().filter(|s| s.all) {
        s.tap.push(
            ctx.worker,
            skim::Sample {
                at_ms: atlas_observe::now_ms(),
                worker: ctx.worker as u16,
                kind: skim::Kind::Tcp,
                client: peer,
                text: upstream.to_string(),
                method_len: 0,
                target_len: 0,
                status: 0,
                bytes_in,
                bytes_out,
                duration_us: us,
                request_payload: None,
                response_payload: None,
            },
        );
    }
}

/// Picks and connects an upstream for a new TCP-mode client.
async fn connect_for(ctx: &ListenerCtx, up: &upstream::Upstreams, peer: SocketAddr) -> Option<upstream::Connected> {
    let mut excluded = 0;
    match upstream::connect(ctx, up, client_hash(ctx, peer), &mut excluded, false).await {
        Ok(c) => {
            up.record(c.idx, true);
            Some(c)
        }
        Err(e) => {
            crate::log_limited(|| tracing::warn!(%peer, error = %e, "tcp: no upstream, closing client"));
            None
        }
    }
}

/// Serves one TCP-mode connection on a plain socket (copy or splice, see
/// [`relay_half`]).
pub async fn serve_plain(ctx: Rc<ListenerCtx>, client: TcpStream, peer: SocketAddr) {
    let _live = crate::drain::Drain::current().connection();
    let started = std::time::Instant::now();
    let client_fd = client.as_raw_fd();
    let Some(up) = ctx.upstreams() else { return };
    let group = &*up.group;
    let Some(c) = connect_for(&ctx, up, peer).await else {
        finish(&ctx, peer, started, "-", 0, 0);
        return;
    };
    let name = group.names[c.idx].as_str();
    let _inflight = InflightGuard::new(group, ctx.worker, c.idx);
    let up_fd = c.conn.raw_fd();
    let idle = ctx.timeouts.tcp_idle;
    let conn = match c.conn {
        UpstreamConn::Plain(s) => s,
        tls => {
            // TLS to the upstream: bytes must go through rustls, no splice.
            let (sent, received) = pipe_both(client, tls, [client_fd, up_fd], idle).await;
            finish(&ctx, peer, started, name, sent, received);
            return;
        }
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = conn.into_split();
    let fail = |e: io::Error| {
        tracing::debug!(%peer, error = %e, "tcp pipe ended with error");
        shutdown_fd(client_fd);
        shutdown_fd(up_fd);
    };
    let a = async {
        let mut n = 0;
        if let Err(e) = relay_half(&mut cr, &mut uw, idle, &mut n).await {
            fail(e);
        }
        n
    };
    let b = async {
        let mut n = 0;
        if let Err(e) = relay_half(&mut ur, &mut cw, idle, &mut n).await {
            fail(e);
        }
        n
    };
    let (sent, received) = monoio::join!(a, b);
    finish(&ctx, peer, started, name, sent, received);
}

/// Serves one TCP-mode connection over any stream (e.g. TLS), copying.
pub async fn serve_stream<S>(ctx: Rc<ListenerCtx>, client: S, peer: SocketAddr, client_fd: RawFd)
where
    S: AsyncReadRent + AsyncWriteRent + Split + 'static,
{
    let _live = crate::drain::Drain::current().connection();
    let started = std::time::Instant::now();
    let Some(up) = ctx.upstreams() else { return };
    let group = &*up.group;
    let Some(c) = connect_for(&ctx, up, peer).await else {
        finish(&ctx, peer, started, "-", 0, 0);
        return;
    };
    let _inflight = InflightGuard::new(group, ctx.worker, c.idx);
    let up_fd = c.conn.raw_fd();
    let (sent, received) = pipe_both(client, c.conn, [client_fd, up_fd], ctx.timeouts.tcp_idle).await;
    finish(&ctx, peer, started, &group.names[c.idx], sent, received);
}
