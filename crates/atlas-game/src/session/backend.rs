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
//!
//! Transfer messages (`transfer_messages = true`, see [`hand_off`]): while
//! Atlas waits for the old server's `TransferAccepted`, that server's
//! reader also holds back single-frame text messages (up to 64 KiB) until
//! they are whole, takes the answer out of the stream and passes its
//! `player_state` on.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atlas_proxy::io::{give_buf, next_read_buf, read_more, refit_read_buf, shutdown_fd, take_buf, write_vec, BUF_SIZE};
use local_sync::oneshot;
use monoio::io::{OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use serde_json::{json, Value};

use super::{close_frame, own_frame, Session};
use crate::registry::Server;
use crate::ws::frame::{Chunk, Decoder, Opcode, Sender, TextTap};
use crate::ws::handshake::{backend_request, check_backend_response, ClientHandshake};

/// State one backend connection's writer and reader share.
pub(crate) struct Link {
    pub fd: RawFd,
    /// Atlas sent this server a close (the player moved): its close is not relayed.
    pub retiring: Cell<bool>,
    /// Its reader has finished.
    pub finished: Cell<bool>,
    /// Set while Atlas waits for this server's `TransferAccepted`: the
    /// reader sends the answer's `player_state` here.
    pub handoff: RefCell<Option<oneshot::Sender<Option<Value>>>>,
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
    /// The signed transfer token the server was given (transfers only).
    pub token: Option<String>,
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
                    let link = Rc::new(Link { fd: tcp.as_raw_fd(), retiring: Cell::new(false), finished: Cell::new(false), handoff: RefCell::new(None) });
                    let (r, w) = tcp.into_split();
                    let up = Upstream { server: server.clone(), w, link: link.clone() };
                    return Ok(Conn { up, down: Downstream { r, leftover, link }, protocol, token: None });
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
    // Transfer messages: the text frame being held (its start in `out`)
    // while a TransferAccepted is awaited, and the tap reading it.
    let mut tap: Option<TextTap> = None;
    let mut open_text: Option<usize> = None;
    loop {
        if fed == out.len() {
            let cap = out.capacity();
            // A held text frame may be larger than a read buffer.
            let max = if open_text.is_some() { super::MAX_TAP + BUF_SIZE } else { BUF_SIZE + 256 };
            match read_more(&mut d.r, &mut out, max).await {
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
        let awaiting = d.link.handoff.borrow().is_some();
        if awaiting && tap.is_none() {
            tap = Some(TextTap::new(super::MAX_TAP));
        }
        // Answers to take out of the stream: (start, end, player_state).
        let mut answers: Vec<(usize, usize, Option<Value>)> = Vec::new();
        let r = dec.feed(&out[fed..], |c| {
            let answer = match tap.as_mut() {
                Some(t) if awaiting => t.follow(&c).and_then(transfer_accepted),
                _ => None,
            };
            match c {
                Chunk::Header(h) => {
                    open_is_control = h.opcode.is_control();
                    let candidate = awaiting && h.opcode == Opcode::Text && h.fin && h.len <= super::MAX_TAP as u64;
                    open_text = candidate.then_some(last_end);
                }
                Chunk::FrameEnd { opcode, message_end, consumed } => {
                    if opcode == Opcode::Close && close.is_none() {
                        close = Some((last_end, base + consumed));
                    }
                    if let (Some(state), Some(start)) = (answer, open_text.take()) {
                        answers.push((start, base + consumed, state));
                    }
                    if message_end {
                        messages += 1;
                    }
                    last_end = base + consumed;
                    open_is_control = false;
                }
                Chunk::Payload { .. } => {}
            }
        });
        s.stats().messages_out.add(messages);
        if let Err(e) = r {
            tracing::debug!(player = %s.player.id, error = %e, "upstream: game server broke the WebSocket protocol");
            error = Some(1011);
            // Forward the whole frames before the bad one.
            let tail = out.split_off(last_end.min(out.len()));
            drop(tail);
            take_answers(&mut out, &answers, &d.link);
            let _ = s.send_client(&mut out).await;
            break;
        }
        if let Some((start, end)) = close {
            let retiring = d.link.retiring.get();
            // Forward what came before the close; the close itself only
            // when the server closes the player (not when it was retired).
            out.truncate(if retiring { start } else { end });
            take_answers(&mut out, &answers, &d.link);
            if !out.is_empty() {
                let _ = s.send_client(&mut out).await;
            }
            clean_end = dec.at_message_boundary() || !retiring;
            if !retiring {
                s.server_closed();
            }
            break;
        }
        // Hold back an unfinished control frame (or header): it may be a close.
        // So is a text frame that may be the awaited TransferAccepted.
        let holding = open_is_control || open_text.is_some();
        let hold_from = if dec.at_frame_boundary() || (dec.in_frame() && !holding) { out.len() } else { last_end };
        let held = out.split_off(hold_from);
        open_text = open_text.filter(|_| dec.in_frame()).map(|start| start.saturating_sub(hold_from));
        take_answers(&mut out, &answers, &d.link);
        // Whether the client's stream now ends between two frames (a ping may go in).
        s.s2c_boundary.set(dec.at_frame_boundary() || !held.is_empty() || hold_from == last_end);
        if !out.is_empty() && s.send_client(&mut out).await.is_err() {
            break;
        }
        fed = held.len();
        if held.is_empty() {
            // The written buffer is read into again (or swapped for one
            // sized for the traffic): no allocation per message.
            out.clear();
            refit_read_buf(&mut out, last.0);
        } else {
            give_buf(std::mem::replace(&mut out, held));
        }
    }
    give_buf(out);
    d.link.finished.set(true);
    // Nobody waits for an answer from a server that is gone.
    d.link.handoff.borrow_mut().take();
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

/// `Some(player_state)` when `text` is the old server's `TransferAccepted`
/// (`{"type": "TransferAccepted", "payload": {"player_id", "token_id",
/// "player_state"?}}`).
fn transfer_accepted(text: &str) -> Option<Option<Value>> {
    if !text.contains("TransferAccepted") {
        return None;
    }
    let v: Value = serde_json::from_str(text).ok()?;
    (v.get("type")?.as_str()? == "TransferAccepted").then(|| v.get("payload").and_then(|p| p.get("player_state")).cloned())
}

/// Removes the answers (whole frames, in order) from `out` and hands the
/// first one's state to whoever waits for it.
fn take_answers(out: &mut Vec<u8>, answers: &[(usize, usize, Option<Value>)], link: &Link) {
    for (start, end, _) in answers.iter().rev() {
        if *end <= out.len() {
            out.drain(*start..*end);
        }
    }
    if let Some((_, _, state)) = answers.first() {
        if let Some(tx) = link.handoff.borrow_mut().take() {
            let _ = tx.send(state.clone());
        }
    }
}

/// The state handoff of a transfer (`transfer_messages = true`), run when
/// the client's stream has been switched to `target` but before any client
/// message goes there (`gate` holds them): the old server gets
/// `InitiateTransfer{player_id, target_server, token}` (the token the
/// target got in `X-Atlas-Transfer-Token`) and answers `TransferAccepted`
/// (taken out of its stream, not relayed); the target then gets
/// `AcceptTransfer{token, player_state, player_id, source_server}` as its
/// first message. The source sees no client message after InitiateTransfer,
/// the target none before AcceptTransfer. No answer within `wait`: the
/// target gets a null state. Then the old server is retired.
pub(crate) async fn hand_off(
    s: Rc<Session>,
    mut old: Upstream,
    token: String,
    target: Arc<Server>,
    gate: oneshot::Sender<()>,
    wait: Duration,
    drain: Duration,
) {
    // From now on its close is not the player's.
    old.link.retiring.set(true);
    let (tx, rx) = oneshot::channel();
    *old.link.handoff.borrow_mut() = Some(tx);
    let ask = json!({"type": "InitiateTransfer", "payload": {"player_id": s.player.id, "target_server": target.id, "token": token}});
    let mut frame = own_frame(Opcode::Text, ask.to_string().as_bytes(), true);
    let state = match write_vec(&mut old.w, &mut frame).await {
        Ok(()) => match monoio::time::timeout(wait, rx).await {
            Ok(Ok(state)) => state,
            _ => {
                tracing::info!(player = %s.player.id, server = %old.server.id, "upstream: no TransferAccepted from the old game server in time; the new one gets no player state");
                None
            }
        },
        Err(e) => {
            tracing::info!(player = %s.player.id, server = %old.server.id, error = %e, "upstream: cannot send InitiateTransfer to the old game server");
            None
        }
    };
    old.link.handoff.borrow_mut().take();
    let taken = s.backend.borrow_mut().take();
    if let Some(mut up) = taken {
        if up.server.id == target.id {
            let accept =
                json!({"type": "AcceptTransfer", "payload": {"token": token, "player_state": state, "player_id": s.player.id, "source_server": old.server.id}});
            let mut frame = own_frame(Opcode::Text, accept.to_string().as_bytes(), true);
            if let Err(e) = write_vec(&mut up.w, &mut frame).await {
                tracing::info!(player = %s.player.id, server = %target.id, error = %e, "upstream: cannot send AcceptTransfer to the new game server");
            }
        }
        if s.closing.get() {
            shutdown_fd(up.link.fd);
        }
        *s.backend.borrow_mut() = Some(up);
    }
    s.transferring.set(false);
    drop(gate);
    retire(old, drain).await;
}

/// Retires the old backend after a switch: closes it (1001), and cuts it
/// off if it does not finish within the drain timeout.
pub(crate) async fn retire(mut old: Upstream, drain: Duration) {
    old.link.retiring.set(true);
    let mut frames = close_frame(1001, "player transferred", true);
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
