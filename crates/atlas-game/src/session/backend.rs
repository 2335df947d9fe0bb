//! The backend side of a session: connecting to a game server (WebSocket
//! handshake on the client's behalf), the reader that relays a server's
//! frames to the client, and the switch from one server to the next.
//!
//! Ordering across a switch: each backend's reader starts only when the
//! previous one has finished (a oneshot from it), so everything the old
//! server sent before answering Atlas's close reaches the client before
//! anything of the new one; the new server's bytes wait in its socket
//! buffer meanwhile (kernel backpressure, nothing buffered here). The old
//! server's close is not relayed. A reader forwards only whole control
//! frames (a close must be recognised before any of it is sent), so the
//! bytes it holds back are at most one control frame.

use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atlas_proxy::io::{give_buf, next_read_buf, read_more, shutdown_fd, take_buf, write_vec, BUF_SIZE};
use local_sync::oneshot;
use monoio::io::{OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use super::{close_frame, Session};
use crate::registry::Server;
use crate::ws::frame::{Chunk, Decoder, Opcode, Sender};
use crate::ws::handshake::{backend_request, check_backend_response, ClientHandshake};

/// State one backend connection's writer and reader share.
pub(crate) struct Link {
    pub fd: RawFd,
    /// Atlas sent this server a close (the player moved): its close is not relayed.
    pub retiring: Cell<bool>,
    /// Its reader has finished.
    pub finished: Cell<bool>,
}

/// The writing side of a backend connection (owned by the session).
pub(crate) struct Upstream {
    pub server: Arc<Server>,
    pub w: OwnedWriteHalf<TcpStream>,
    pub link: Rc<Link>,
}

/// The reading side, before its reader task starts.
pub(crate) struct Downstream {
    pub r: OwnedReadHalf<TcpStream>,
    /// Bytes the server sent right behind its 101.
    pub leftover: Vec<u8>,
    pub link: Rc<Link>,
}

/// A connected, handshaken backend.
pub(crate) struct Conn {
    pub up: Upstream,
    pub down: Downstream,
    pub protocol: Option<String>,
}

/// Opens a WebSocket to `server` for this client: the client's handshake
/// headers replayed, plus the player id, the client address and, on a
/// transfer, the signed token.
pub(crate) async fn connect(hs: &ClientHandshake, server: &Arc<Server>, extra: &[(&str, &str)], timeout: Duration) -> Result<Conn, String> {
    let work = async {
        let tcp = TcpStream::connect_addr(server.addr).await.map_err(|e| format!("connect {}: {e}", server.addr))?;
        let _ = tcp.set_nodelay(true);
        let mut tcp = tcp;
        let (mut req, key) = backend_request(hs, &server.address, extra);
        write_vec(&mut tcp, &mut req).await.map_err(|e| format!("send handshake: {e}"))?;
        let mut buf = take_buf();
        loop {
            let n = read_more(&mut tcp, &mut buf, 16 * 1024).await.map_err(|e| format!("read handshake answer: {e}"))?;
            if n == 0 {
                return Err("closed during the handshake".to_string());
            }
            match parse_answer(&buf, &key)? {
                Some((len, protocol)) => {
                    let leftover = buf.split_off(len);
                    give_buf(buf);
                    let link = Rc::new(Link { fd: tcp.as_raw_fd(), retiring: Cell::new(false), finished: Cell::new(false) });
                    let (r, w) = tcp.into_split();
                    return Ok(Conn { up: Upstream { server: server.clone(), w, link: link.clone() }, down: Downstream { r, leftover, link }, protocol });
                }
                None if buf.len() < 16 * 1024 => {}
                None => return Err("handshake answer too large".to_string()),
            }
        }
    };
    match monoio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no handshake answer from {} within {timeout:?}", server.addr)),
    }
}

/// Checks the server's answer to the upgrade: `Some((head length, the
/// chosen subprotocol))` when complete, `None` when more is needed. A plain
/// function so httparse's header array is not kept in the session's task.
fn parse_answer(buf: &[u8], key: &str) -> Result<Option<(usize, Option<String>)>, String> {
    let mut h = [httparse::EMPTY_HEADER; 32];
    let mut res = httparse::Response::new(&mut h);
    match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            check_backend_response(&res, key)?;
            let protocol =
                res.headers.iter().find(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol")).map(|h| String::from_utf8_lossy(h.value).into_owned());
            Ok(Some((len, protocol)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("malformed handshake answer: {e}")),
    }
}

/// The client address for `X-Forwarded-For`.
pub(crate) fn forwarded_for(peer: SocketAddr) -> String {
    peer.ip().to_string()
}

/// Relays one backend's frames to the client. Waits for `wait` (the
/// previous backend's reader) first; signals `done` when it ends.
pub(crate) async fn run_reader(s: Rc<Session>, mut d: Downstream, wait: Option<oneshot::Receiver<()>>, done: oneshot::Sender<()>) {
    if let Some(w) = wait {
        let _ = w.await;
    }
    let max = s.settings.borrow().spatial.max_frame_bytes;
    let mut dec = Decoder::new(Sender::Server, 0, max);
    // out[..fed] was decoded; out[..held_end] is not forwarded yet.
    let mut out = if d.leftover.is_empty() { next_read_buf(0, 0) } else { std::mem::take(&mut d.leftover) };
    // The last read's size and its buffer's capacity (picks the next buffer).
    let mut last = (0, 0);
    let mut fed = 0;
    let mut clean_end = true;
    // The frame being decoded is a control frame (kept across reads).
    let mut open_is_control = false;
    let mut error: Option<u16> = None;
    loop {
        if fed == out.len() {
            let cap = out.capacity();
            match read_more(&mut d.r, &mut out, BUF_SIZE + 256).await {
                Ok(n) if n > 0 => last = (n, cap),
                r => {
                    // End of stream (or reset) without a close.
                    tracing::debug!(player = %s.player.id, result = ?r.map_err(|e| e.to_string()), retiring = d.link.retiring.get(), "upstream: game server connection ended");
                    clean_end = dec.at_message_boundary();
                    break;
                }
            }
        }
        s.touch_out();
        // Decode the new bytes; note frame ends and a close.
        let mut last_end = 0usize;
        let mut close: Option<(usize, usize)> = None;
        let mut messages = 0u64;
        let base = fed;
        let r = dec.feed(&out[fed..], |c| match c {
            Chunk::Header(h) => open_is_control = h.opcode.is_control(),
            Chunk::FrameEnd { opcode, message_end, consumed } => {
                if opcode == Opcode::Close && close.is_none() {
                    close = Some((last_end, base + consumed));
                }
                if message_end {
                    messages += 1;
                }
                last_end = base + consumed;
                open_is_control = false;
            }
            Chunk::Payload { .. } => {}
        });
        s.stats().messages_out.add(messages);
        if let Err(e) = r {
            tracing::debug!(player = %s.player.id, error = %e, "upstream: game server broke the WebSocket protocol");
            error = Some(1011);
            // Forward the whole frames before the bad one.
            let tail = out.split_off(last_end.min(out.len()));
            drop(tail);
            let _ = s.send_client(std::mem::take(&mut out)).await;
            break;
        }
        if let Some((start, end)) = close {
            let retiring = d.link.retiring.get();
            // Forward what came before the close; the close itself only
            // when the server closes the player (not when it was retired).
            out.truncate(if retiring { start } else { end });
            if !out.is_empty() {
                let _ = s.send_client(std::mem::take(&mut out)).await;
            }
            clean_end = dec.at_message_boundary() || !retiring;
            if !retiring {
                s.server_closed();
            }
            break;
        }
        // Hold back an unfinished control frame (or header): it may be a close.
        let hold_from = if dec.at_frame_boundary() || (dec.in_frame() && !open_is_control) { out.len() } else { last_end };
        let held = out.split_off(hold_from);
        // Whether the client's stream now ends between two frames (a ping may go in).
        s.s2c_boundary.set(dec.at_frame_boundary() || !held.is_empty() || hold_from == last_end);
        if !out.is_empty() && s.send_client(std::mem::take(&mut out)).await.is_err() {
            break;
        }
        fed = held.len();
        out = if held.is_empty() { next_read_buf(last.0, last.1) } else { held };
    }
    give_buf(out);
    d.link.finished.set(true);
    let retiring = d.link.retiring.get();
    drop(done);
    if let Some(code) = error {
        s.fail(code, "game server protocol error");
    } else if !retiring && !s.closing.get() {
        if clean_end {
            // The server went away without closing the player: move it.
            s.server_lost(d.link.fd);
        } else {
            s.fail(1011, "game server lost mid-message");
        }
    }
}

/// Retires the old backend after a switch: optionally tells it about the
/// transfer, closes it (1001), and cuts it off if it does not finish
/// within the drain timeout.
pub(crate) async fn retire(mut old: Upstream, notice: Option<Vec<u8>>, drain: Duration) {
    old.link.retiring.set(true);
    let mut frames = notice.unwrap_or_default();
    frames.extend_from_slice(&close_frame(1001, "player transferred", true));
    let _ = write_vec(&mut old.w, &mut frames).await;
    let link = old.link.clone();
    drop(old);
    let start = Instant::now();
    while !link.finished.get() && start.elapsed() < drain {
        monoio::time::sleep(Duration::from_millis(5).min(drain)).await;
    }
    if !link.finished.get() {
        tracing::debug!("upstream: old game server did not finish within the transfer drain timeout; cut off");
        shutdown_fd(link.fd);
    }
}
