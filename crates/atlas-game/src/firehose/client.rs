//! One firehose client connection on a worker (plain TCP, TLS, or a
//! WebSocket whose binary messages carry the frame payloads): the
//! handshake or the reconnect challenge (spec §3), then the reader, which
//! tags client frames straight into the master link's outbox, and the
//! writer, which drains the client's queue. Also the worker's dispatcher,
//! which takes the packets the master links left in this worker's
//! mailbox and hands them to the clients' queues.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atlas_proxy::drain::Drain;
use atlas_proxy::io::{give_buf, read_more, shutdown_fd, take_buf, write_vec};
use atlas_proxy::ListenerCtx;
use local_sync::mpsc::unbounded;
use monoio::io::{AsyncReadRent, AsyncWriteRent, Split, Splitable};

use super::crypto;
use super::hub::{lock, Delivery, Hub, Mailbox};
use super::wire::{self, Control, WireError, FLAG_DATA, PROTOCOL_VERSION, PUBKEY_LEN, SEALED_LEN};
use crate::session::{close_frame, own_frame, read_handshake};
use crate::ws::frame::{apply_mask, encode_header, Chunk, Decoder, Opcode, Sender};
use crate::ws::handshake;

/// What a client's writer sends.
enum Out {
    /// A payload, framed by the writer (length prefix or WebSocket frame).
    Data(Vec<u8>),
    /// Bytes already framed (a WebSocket pong or close).
    Raw(Vec<u8>),
}

/// A client's queue as the dispatcher sees it.
struct Local {
    tx: unbounded::Tx<Out>,
    queued: Rc<Cell<usize>>,
    fd: RawFd,
}

thread_local! {
    static LOCAL: RefCell<HashMap<u64, Local>> = RefCell::new(HashMap::new());
    static DISPATCHING: Cell<bool> = const { Cell::new(false) };
}

// ---------------------------------------------------------------------------
// Client framing
// ---------------------------------------------------------------------------

/// How payloads are framed on this connection.
enum Framing {
    Raw,
    Ws(Box<WsIn>),
}

struct WsIn {
    dec: Decoder,
    mask: Option<[u8; 4]>,
    /// The frame being decoded is a control frame (they may come between
    /// the fragments of a data message).
    in_ctl: bool,
    op: Opcode,
    msg: Vec<u8>,
    ctl: Vec<u8>,
}

/// WebSocket control traffic the reader must answer.
enum WsCtl {
    Pong(Vec<u8>),
    Close,
}

impl Framing {
    /// Takes every complete payload out of `buf`, in order.
    fn drain(&mut self, buf: &mut Vec<u8>, max: usize, on: &mut dyn FnMut(&[u8]), ctl: &mut Vec<WsCtl>) -> Result<(), String> {
        match self {
            Framing::Raw => {
                let mut pos = 0;
                let r = loop {
                    match wire::next_frame(&buf[pos..], max) {
                        Ok(Some((s, e))) => {
                            on(&buf[pos + s..pos + e]);
                            pos += e;
                        }
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e.to_string()),
                    }
                };
                buf.drain(..pos);
                r
            }
            Framing::Ws(ws) => {
                let mut done: Vec<Vec<u8>> = Vec::new();
                let mut err = None;
                let WsIn { dec, mask, in_ctl, op, msg, ctl: cbuf } = &mut **ws;
                let r = dec.feed(buf, |c| match c {
                    Chunk::Header(h) => {
                        *mask = h.mask;
                        *in_ctl = h.opcode.is_control();
                        if *in_ctl {
                            cbuf.clear();
                        } else {
                            if h.opcode != Opcode::Continuation {
                                *op = h.opcode;
                            }
                            if msg.len() as u64 + h.len > max as u64 {
                                err = Some(format!("WebSocket message longer than max_frame_length ({max})"));
                            }
                        }
                    }
                    Chunk::Payload { data, offset } if err.is_none() => {
                        let into: &mut Vec<u8> = if *in_ctl { cbuf } else { msg };
                        let at = into.len();
                        into.extend_from_slice(data);
                        if let Some(k) = *mask {
                            apply_mask(&mut into[at..], k, offset);
                        }
                    }
                    Chunk::Payload { .. } => {}
                    Chunk::FrameEnd { opcode, message_end, .. } => match opcode {
                        Opcode::Ping => ctl.push(WsCtl::Pong(std::mem::take(cbuf))),
                        Opcode::Close => ctl.push(WsCtl::Close),
                        Opcode::Pong => cbuf.clear(),
                        _ if message_end => {
                            if *op == Opcode::Text {
                                err.get_or_insert_with(|| "a text WebSocket message (firehose payloads are binary)".into());
                            }
                            done.push(std::mem::take(msg));
                        }
                        _ => {}
                    },
                });
                buf.clear();
                if let Err(e) = r {
                    return Err(format!("WebSocket: {e}"));
                }
                if let Some(e) = err {
                    return Err(e);
                }
                for m in &done {
                    on(m);
                }
                Ok(())
            }
        }
    }

    /// Appends `payload` framed for the client.
    fn frame_out(&self, out: &mut Vec<u8>, payload: &[u8]) {
        frame_out(out, payload, self.is_ws());
    }

    fn is_ws(&self) -> bool {
        matches!(self, Framing::Ws(_))
    }
}

// ---------------------------------------------------------------------------
// The connection
// ---------------------------------------------------------------------------

/// Reads until `framing` yields one payload (handshake steps).
async fn next_payload<S: AsyncReadRent>(
    s: &mut S,
    framing: &mut Framing,
    buf: &mut Vec<u8>,
    pending: &mut VecDeque<Vec<u8>>,
    max: usize,
) -> Result<Vec<u8>, String> {
    loop {
        if let Some(p) = pending.pop_front() {
            return Ok(p);
        }
        let mut ctl = Vec::new();
        framing.drain(buf, max, &mut |p| pending.push_back(p.to_vec()), &mut ctl)?;
        if ctl.iter().any(|c| matches!(c, WsCtl::Close)) {
            return Err("the client closed the WebSocket".into());
        }
        if let Some(p) = pending.pop_front() {
            return Ok(p);
        }
        match read_more(s, buf, max + 64).await {
            Ok(0) => return Err("the client closed the connection during the handshake".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// The next payload as a control message. Frames are bounded by
/// `max_frame_length` (a client may pipeline data after its handshake);
/// the control decoder has its own small limit.
async fn next_control<S: AsyncReadRent>(
    s: &mut S,
    framing: &mut Framing,
    buf: &mut Vec<u8>,
    pending: &mut VecDeque<Vec<u8>>,
    max: usize,
) -> Result<Control, String> {
    let p = next_payload(s, framing, buf, pending, max).await?;
    wire::decode_control(&p).map_err(|e: WireError| e.to_string())
}

async fn send_control<S: AsyncWriteRent>(s: &mut S, framing: &Framing, c: &Control) -> Result<(), String> {
    let mut out = Vec::with_capacity(96);
    framing.frame_out(&mut out, &wire::encode_control(c));
    write_vec(s, &mut out).await.map_err(|e| format!("write: {e}"))
}

/// How the handshake ended.
enum Joined {
    New { id: u64, route: Arc<AtomicUsize> },
    Back { id: u64, route: Arc<AtomicUsize>, missed: VecDeque<Vec<u8>> },
}

/// Serves one connection of a `mode = "firehose"` listener.
pub async fn serve<S>(ctx: Rc<ListenerCtx>, mut stream: S, peer: SocketAddr, fd: RawFd)
where
    S: AsyncReadRent + AsyncWriteRent + Split + 'static,
{
    let _live = Drain::current().connection();
    let Some(hub) = super::hub() else { return };
    let s = hub.settings.load_full();
    if !hub.connects.admit(peer.ip(), s.per_ip_connect_rate) {
        hub.stats.refused.fetch_add(1, Ordering::Relaxed);
        atlas_proxy::log_limited(
            || tracing::warn!(%peer, rate = s.per_ip_connect_rate, "client: firehose connections from this IP come faster than per_ip_connect_rate; closing"),
        );
        return;
    }
    let w = ctx.worker;
    ensure_dispatcher(&hub, w);
    let mut buf = take_buf();
    let mut pending = VecDeque::new();
    // Raw protocol or a WebSocket upgrade: the first bytes tell.
    let first = monoio::time::timeout(s.handshake_timeout, read_more(&mut stream, &mut buf, 16 * 1024)).await;
    if !matches!(first, Ok(Ok(n)) if n > 0) {
        hub.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, "client: no firehose handshake within handshake_timeout; closing");
        give_buf(buf);
        return;
    }
    let mut framing = Framing::Raw;
    if buf.starts_with(b"GET ") {
        let Some((hs, n)) = read_handshake(&ctx, &mut stream, &mut buf).await else {
            give_buf(buf);
            return;
        };
        buf.drain(..n);
        let mut resp = handshake::client_response(&hs.key, None);
        if write_vec(&mut stream, &mut resp).await.is_err() {
            return;
        }
        framing = Framing::Ws(Box::new(WsIn {
            dec: Decoder::new(Sender::Client, 0, s.max_frame_length as u64),
            mask: None,
            in_ctl: false,
            op: Opcode::Binary,
            msg: Vec::new(),
            ctl: Vec::new(),
        }));
    }
    let (tx, rx) = unbounded::channel();
    let queued = Rc::new(Cell::new(0usize));
    let local = Local { tx: tx.clone(), queued: queued.clone(), fd };
    let registered = Cell::new(None);
    let joined = monoio::time::timeout(s.handshake_timeout, handshake(&hub, w, &mut stream, &mut framing, &mut buf, &mut pending, local, &registered)).await;
    if joined.is_err() {
        // Cut off after it got an id (its ClientId write hung): it must not
        // stay live with no connection.
        if let Some(id) = registered.get() {
            end_client(&hub, id, w);
        }
    }
    let joined = match joined {
        Ok(Ok(j)) => j,
        Ok(Err(why)) => {
            hub.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, reason = %why, "client: firehose handshake refused; closing");
            if framing.is_ws() {
                let mut c = close_frame(1008, "firehose handshake refused", false);
                let _ = write_vec(&mut stream, &mut c).await;
            }
            give_buf(buf);
            return;
        }
        Err(_) => {
            hub.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "client: firehose handshake timed out; closing");
            give_buf(buf);
            return;
        }
    };
    let (id, route, missed, back) = match joined {
        Joined::New { id, route } => (id, route, VecDeque::new(), false),
        Joined::Back { id, route, missed } => (id, route, missed, true),
    };
    // Spec §3.2 steps 6-7: the client pings, Atlas pings back, then the
    // packets it missed, in order, before anything newer.
    if back {
        let ok = match monoio::time::timeout(s.handshake_timeout, next_control(&mut stream, &mut framing, &mut buf, &mut pending, s.max_frame_length)).await {
            Ok(Ok(Control::Ping)) => {
                let mut out = Vec::new();
                framing.frame_out(&mut out, &wire::encode_control(&Control::Ping));
                for p in &missed {
                    framing.frame_out(&mut out, p);
                }
                write_vec(&mut stream, &mut out).await.is_ok()
            }
            _ => false,
        };
        if !ok {
            tracing::debug!(client = id, %peer, "client: reconnected firehose client did not complete the ping; it is stale again");
            end_client(&hub, id, w);
            give_buf(buf);
            return;
        }
        tracing::debug!(client = id, %peer, missed = missed.len(), "firehose: client reconnected");
    }
    let ws = framing.is_ws();
    let (r, wr) = stream.into_split();
    monoio::spawn(writer(wr, rx, queued, ws, fd));
    let why = reader(&hub, id, &route, r, framing, buf, pending, &tx).await;
    tracing::debug!(client = id, %peer, reason = %why, "firehose: client connection ended");
    end_client(&hub, id, w);
    shutdown_fd(fd);
}

/// The handshake of a new client, or the challenge of a returning one.
async fn handshake<S: AsyncReadRent + AsyncWriteRent>(
    hub: &Hub,
    w: usize,
    s: &mut S,
    framing: &mut Framing,
    buf: &mut Vec<u8>,
    pending: &mut VecDeque<Vec<u8>>,
    local: Local,
    registered: &Cell<Option<u64>>,
) -> Result<Joined, String> {
    // The client's queue is registered in the same step that makes it live
    // (no await between), so no packet for it can find this worker without it.
    let register = |id: u64, local: Local| {
        registered.set(Some(id));
        LOCAL.with(|l| l.borrow_mut().insert(id, local))
    };
    match next_control(s, framing, buf, pending, hub.settings.load().max_frame_length).await? {
        Control::ProtocolVersion(PROTOCOL_VERSION) => {}
        Control::ProtocolVersion(v) => return Err(format!("protocol version {v} (only {PROTOCOL_VERSION} is spoken)")),
        other => return Err(format!("expected ProtocolVersion, got {other:?}")),
    }
    send_control(s, framing, &Control::PubKey(hub.key.public_sec1().to_vec())).await?;
    match next_control(s, framing, buf, pending, hub.settings.load().max_frame_length).await? {
        Control::PubKey(k) => {
            if k.len() != PUBKEY_LEN || crypto::parse_public(&k).is_none() {
                return Err("the client's PubKey is not a SEC1 compressed secp256k1 point".into());
            }
            let (id, route) = hub.add_client(w, k);
            register(id, local);
            if let Err(e) = send_control(s, framing, &Control::ClientId(id)).await {
                end_client(hub, id, w);
                return Err(e);
            }
            Ok(Joined::New { id, route })
        }
        Control::ClientId(id) => {
            let refused = |why: &str| {
                hub.stats.reconnects_refused.fetch_add(1, Ordering::Relaxed);
                format!("reconnect as {id} refused: {why}")
            };
            // Just after a takeover the previous Atlas' clients are not
            // known yet: wait (briefly) for its table.
            while hub.stale_key(id).is_err() && hub.awaiting_handoff() && !lock(&hub.table).clients.contains_key(&id) {
                monoio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let key = hub.stale_key(id).map_err(refused)?;
            let public = crypto::parse_public(&key).ok_or_else(|| refused("stored key unreadable"))?;
            let shared = hub.key.shared_key(&public);
            let secret = crypto::challenge();
            send_control(s, framing, &Control::Challenge(crypto::seal(&shared, &secret))).await?;
            match next_control(s, framing, buf, pending, hub.settings.load().max_frame_length).await? {
                Control::ChallengeResponse(r) if r.len() == SEALED_LEN && crypto::open(&shared, &r).is_some_and(|p| p == secret) => {}
                Control::ChallengeResponse(_) => return Err(refused("wrong challenge response")),
                other => return Err(refused(&format!("expected ChallengeResponse, got {other:?}"))),
            }
            let (route, missed) = hub.revive(id, w).ok_or_else(|| refused("it expired or came back on another connection meanwhile"))?;
            register(id, local);
            Ok(Joined::Back { id, route, missed })
        }
        other => Err(format!("expected PubKey or ClientId, got {other:?}")),
    }
}

/// The client is gone from this worker: it goes stale (unless it was
/// kicked or failed, which already removed it).
fn end_client(hub: &Hub, id: u64, w: usize) {
    LOCAL.with(|l| l.borrow_mut().remove(&id));
    hub.disconnected(id, w);
}

/// Appends what `f` pushes to the outbox of the client's current master
/// (one lock for the lot) and wakes the link when it was idle.
fn forward<T>(hub: &Hub, route: &AtomicUsize, id: u64, f: impl FnOnce(&mut dyn FnMut(&[u8])) -> T) -> T {
    let (link, mut o) = loop {
        let m = route.load(Ordering::Relaxed);
        let Some(link) = hub.links.get(m) else {
            return f(&mut |_| {});
        };
        let o = lock(&link.out);
        // A failover moves the route before it takes the failed link's
        // outbox (under this lock): checked here, no frame can land in an
        // outbox already emptied for the client's new master.
        if route.load(Ordering::Relaxed) == m {
            break (link, o);
        }
    };
    let mut n = 0u64;
    let was_empty = o.bytes.is_empty();
    let out = f(&mut |p: &[u8]| {
        wire::push_tagged(&mut o.bytes, id, FLAG_DATA, p);
        o.packets += 1;
        n += 1;
    });
    drop(o);
    if was_empty && n > 0 {
        link.bell.ring();
    }
    hub.stats.to_master.fetch_add(n, Ordering::Relaxed);
    out
}

/// Client frames -> the master link's outbox, until the client leaves.
#[allow(clippy::too_many_arguments)]
async fn reader<R: AsyncReadRent>(
    hub: &Hub,
    id: u64,
    route: &AtomicUsize,
    mut r: R,
    mut framing: Framing,
    mut buf: Vec<u8>,
    pending: VecDeque<Vec<u8>>,
    tx: &unbounded::Tx<Out>,
) -> String {
    let drain = Drain::current();
    let rate0 = hub.settings.load().client_rate;
    let mut tokens = rate0.max(1.0);
    let mut refill = Instant::now();
    // Payloads read along with the handshake come first.
    let mut early = pending;
    loop {
        let s = hub.settings.load();
        let mut ctl = Vec::new();
        let res = if s.client_rate > 0.0 {
            // Per-client rate: frames past it wait here, and reading waits
            // with them (nothing is dropped).
            let res = framing.drain(&mut buf, s.max_frame_length, &mut |p| early.push_back(p.to_vec()), &mut ctl);
            while !early.is_empty() {
                let now = Instant::now();
                tokens = (tokens + now.duration_since(refill).as_secs_f64() * s.client_rate).min(s.client_rate.max(1.0));
                refill = now;
                if tokens < 1.0 {
                    monoio::time::sleep(Duration::from_secs_f64((1.0 - tokens) / s.client_rate)).await;
                    continue;
                }
                let k = (tokens as usize).min(early.len());
                forward(hub, route, id, |push| early.drain(..k).for_each(|p| push(&p)));
                tokens -= k as f64;
            }
            res
        } else {
            forward(hub, route, id, |push| {
                early.drain(..).for_each(|p| push(&p));
                framing.drain(&mut buf, s.max_frame_length, push, &mut ctl)
            })
        };
        if let Err(e) = res {
            return format!("client: {e}");
        }
        for c in ctl {
            match c {
                WsCtl::Pong(p) => {
                    let _ = tx.send(Out::Raw(own_frame(Opcode::Pong, &p, false)));
                }
                WsCtl::Close => {
                    let _ = tx.send(Out::Raw(close_frame(1000, "", false)));
                    return "the client closed the WebSocket".into();
                }
            }
        }
        // Backpressure: a full outbox pauses this client's reads.
        while hub.links.get(route.load(Ordering::Relaxed)).is_some_and(|l| l.queued() >= s.master_channel_capacity) && !drain.is_draining() {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        if drain.is_draining() {
            return "Atlas is shutting down".into();
        }
        match read_more(&mut r, &mut buf, s.max_frame_length + 64).await {
            Ok(0) => return "the client closed the connection".into(),
            Ok(_) => {}
            Err(e) => return format!("read: {e}"),
        }
    }
}

/// Appends `payload` as a length-prefixed frame, or as an unmasked binary
/// WebSocket frame (header straight into `out`: no copy per frame).
fn frame_out(out: &mut Vec<u8>, payload: &[u8], ws: bool) {
    if ws {
        encode_header(out, true, 0, Opcode::Binary, None, payload.len() as u64);
        out.extend_from_slice(payload);
    } else {
        wire::push_frame(out, payload);
    }
}

/// The only writer of the client socket.
async fn writer<W: AsyncWriteRent>(mut w: W, mut rx: unbounded::Rx<Out>, queued: Rc<Cell<usize>>, ws: bool, fd: RawFd) {
    let mut out = Vec::new();
    while let Some(first) = rx.recv().await {
        out.clear();
        let add = |out: &mut Vec<u8>, m: Out| match m {
            Out::Data(p) => {
                queued.set(queued.get().saturating_sub(1));
                frame_out(out, &p, ws);
            }
            Out::Raw(b) => out.extend_from_slice(&b),
        };
        add(&mut out, first);
        while out.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(m) => add(&mut out, m),
                Err(_) => break,
            }
        }
        if write_vec(&mut w, &mut out).await.is_err() {
            shutdown_fd(fd);
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// The worker's dispatcher
// ---------------------------------------------------------------------------

/// Starts this worker's mailbox and dispatcher on first use.
fn ensure_dispatcher(hub: &Arc<Hub>, w: usize) {
    if DISPATCHING.with(|d| d.replace(true)) {
        return;
    }
    let mb = match super::hub::Doorbell::new() {
        Ok(bell) => Arc::new(Mailbox { q: std::sync::Mutex::new(Vec::new()), bell }),
        Err(e) => {
            tracing::error!(error = %e, "internal: cannot create the firehose mailbox of this worker");
            DISPATCHING.with(|d| d.set(false));
            return;
        }
    };
    let Some(waiter) = mb.bell.waiter() else { return };
    hub.set_mailbox(w, mb.clone());
    monoio::spawn(dispatch(hub.clone(), mb, waiter));
    // A drain (SIGTERM, takeover) closes this worker's clients at once
    // rather than at the drain timeout; they reconnect to the successor.
    monoio::spawn(async {
        Drain::current().started().await;
        LOCAL.with(|l| l.borrow().values().for_each(|c| shutdown_fd(c.fd)));
    });
}

async fn dispatch(hub: Arc<Hub>, mb: Arc<Mailbox>, mut waiter: super::hub::Waiter) {
    let mut batch = Vec::new();
    loop {
        waiter.wait(&mb.bell).await;
        std::mem::swap(&mut batch, &mut *lock(&mb.q));
        let cap = hub.settings.load().channel_capacity;
        for d in batch.drain(..) {
            match d {
                Delivery::Data(id, p) => {
                    let full = LOCAL.with(|l| {
                        let l = l.borrow();
                        let Some(c) = l.get(&id) else { return Err(p) };
                        if c.queued.get() >= cap {
                            return Ok(Some(c.fd));
                        }
                        c.queued.set(c.queued.get() + 1);
                        let _ = c.tx.send(Out::Data(p));
                        Ok(None)
                    });
                    // Its socket closed after the packet left the master
                    // thread: it is stale now, the packet is a missed one.
                    let full = match full {
                        Ok(f) => f,
                        Err(p) => {
                            hub.requeue(id, p);
                            None
                        }
                    };
                    if let Some(fd) = full {
                        // It cannot keep up: fail it rather than grow.
                        LOCAL.with(|l| l.borrow_mut().remove(&id));
                        shutdown_fd(fd);
                        hub.fail(id, "the client does not read fast enough (channel_capacity packets queued)");
                    }
                }
                Delivery::Kick(id) => {
                    if let Some(c) = LOCAL.with(|l| l.borrow_mut().remove(&id)) {
                        shutdown_fd(c.fd);
                    }
                }
            }
        }
    }
}
