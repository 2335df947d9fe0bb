//! One player's WebSocket session through the gateway: the client's
//! handshake, routing to the server whose region holds the player, the
//! relay in both directions, position reading, and seamless transfers.
//!
//! Tasks per session (all on the worker that accepted it):
//! - the client reader (this function's body): reads client frames,
//!   forwards the bytes to the current backend as they arrive, reads
//!   positions from complete text messages on the side, and cuts the
//!   stream between two messages when a switch is ready;
//! - no client writer: the backend reader writes its server's bytes to
//!   the client socket itself, and Atlas's own frames (pings, closes) go
//!   through a small queue in front of it (`client_out.rs`);
//! - one backend reader per backend connection (`backend.rs`), chained so
//!   the old server's last messages reach the client before the new one's;
//! - short-lived connect tasks for transfers and pre-connects.
//!
//! A per-worker ticker (`ticker.rs`) handles what no read wakes up for:
//! a changed registry (server down, drained), operator transfers,
//! keepalive pings, idle timeouts, expired pre-connects and drain.
//!
//! Client frames must be masked and server frames not (checked by the
//! decoders); no extension is negotiated (the backend request drops
//! `Sec-WebSocket-Extensions`), so no compression context ever spans two
//! backends and RSV bits are protocol errors.

mod backend;
mod client_out;
mod ticker;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atlas_proxy::drain::Drain;
use atlas_proxy::io::{give_buf, read_more, refit_read_buf, shutdown_fd, take_buf, write_range, write_vec, BUF_SIZE};
use atlas_proxy::ListenerCtx;
use local_sync::oneshot;
use monoio::io::{AsyncReadRent, AsyncWriteRent, OwnedWriteHalf, Split, Splitable};

use self::backend::{connect, forwarded_for, hand_off, retire, run_reader, Conn, Upstream};
use self::client_out::ClientOut;
pub use self::client_out::IntoClientW;
use crate::position::{extract, Point};
use crate::registry::{registry, Player, Server, Settings, TransferEvent};
use crate::spatial::{self, Motion};
use crate::stats::{slot, GameStats};
use crate::token::{self, Token};
use crate::ws::frame::{apply_mask, encode_header, Chunk, Decoder, Opcode, Sender, TextTap};
use crate::ws::handshake::{self, ClientHandshake};

/// Longest text message read for a position (longer ones pass unread).
pub(crate) const MAX_TAP: usize = 64 * 1024;

/// Why a player moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Crossed into another server's region.
    Crossed,
    /// Its server went down, was drained or unregistered.
    Moved,
    /// Its server's connection failed.
    Lost,
    /// An operator asked (`POST /transfer`).
    Forced,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Crossed => "crossed",
            Reason::Moved => "server_unavailable",
            Reason::Lost => "server_lost",
            Reason::Forced => "forced",
        }
    }
}

/// A backend ready to take over, waiting for a message boundary.
struct Ready {
    conn: Conn,
    started: Instant,
    reason: Reason,
}

/// A pre-connected backend kept warm for a predicted crossing.
struct Warm {
    conn: Conn,
    at: Instant,
}

pub(crate) struct Session {
    w: usize,
    ctx: Rc<ListenerCtx>,
    settings: RefCell<Arc<Settings>>,
    player: Arc<Player>,
    hs: ClientHandshake,
    peer: SocketAddr,
    client_fd: RawFd,
    out: Rc<ClientOut>,
    /// The current backend's writer; `None` while the client reader writes
    /// to it (`writing`) or after it failed.
    backend: RefCell<Option<Upstream>>,
    writing: Cell<bool>,
    /// The server the player is on (the target once switched).
    server: RefCell<Arc<Server>>,
    pending: RefCell<Option<Ready>>,
    /// A transfer is being prepared (connecting) or waits for a boundary.
    transferring: Cell<bool>,
    /// Holds the client's messages back while a transfer's state handoff
    /// runs (dropped by [`hand_off`] when the target may have them).
    gate: RefCell<Option<oneshot::Receiver<()>>>,
    /// The most recent backend reader's end, for the next one to wait on.
    last_reader: RefCell<Option<oneshot::Receiver<()>>>,
    /// The client's stream, as decoded so far, ends between two messages.
    at_boundary: Cell<bool>,
    /// The stream to the client ends between two frames.
    s2c_boundary: Cell<bool>,
    motion: Cell<Motion>,
    last_pos: Cell<Option<Point>>,
    world_version: Cell<u64>,
    warm: RefCell<Option<Warm>>,
    warming: Cell<Option<usize>>,
    /// The close handshake started (or the session is failing).
    closing: Cell<bool>,
    last_in: Cell<Instant>,
    last_out: Cell<Instant>,
    pinged: Cell<bool>,
    wished: Cell<Option<[i64; 3]>>,
    /// A room join (`/rooms/{id}`): the player follows the room, not its position.
    room: Option<String>,
    /// The room's server was lost: wait until then for the room to migrate.
    room_wait: Cell<Option<Instant>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.server.borrow().live.fetch_sub(1, Ordering::Relaxed);
        registry().remove_player(&self.player);
        self.stats().sessions.add(-1);
        if let Some(w) = self.warm.get_mut().take() {
            shutdown_fd(w.conn.up.link.fd);
        }
        self.out.finish();
    }
}

/// A whole frame Atlas writes itself (close, ping, a transfer notice):
/// masked towards a server.
pub(crate) fn own_frame(op: Opcode, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    let mask = masked.then(|| fastrand::u32(..).to_be_bytes());
    encode_header(&mut out, true, 0, op, mask, payload.len() as u64);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(k) = mask {
        apply_mask(&mut out[start..], k, 0);
    }
    out
}

pub(crate) fn close_frame(code: u16, reason: &str, masked: bool) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(&reason.as_bytes()[..reason.len().min(120)]);
    own_frame(Opcode::Close, &p, masked)
}

/// Shuts a socket down after `delay`. The descriptor is duplicated now, so
/// the shutdown reaches this socket even if its number was closed and
/// reused by another connection meanwhile (the duplicate keeps the socket
/// alive until then).
pub(crate) fn shutdown_later(fd: RawFd, delay: Duration) {
    // SAFETY: dup of a descriptor number; on failure nothing is done.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return;
    }
    // SAFETY: `dup` is a fresh descriptor owned here.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
    monoio::spawn(async move {
        monoio::time::sleep(delay).await;
        shutdown_fd(std::os::fd::AsRawFd::as_raw_fd(&owned));
        drop(owned);
    });
}

impl Session {
    fn stats(&self) -> &'static GameStats {
        slot(self.w)
    }

    fn touch_out(&self) {
        self.last_out.set(Instant::now());
        self.pinged.set(false);
    }

    /// Writes bytes to the client (`buf` is kept for reuse); waits while
    /// another write is in flight.
    async fn send_client(&self, buf: &mut Vec<u8>) -> Result<(), ()> {
        self.out.send(buf).await
    }

    /// Queues a frame Atlas writes to the client, if it can go in now
    /// (between two frames, queue not full). Never waits.
    fn try_send_client(&self, frame: Vec<u8>) -> bool {
        self.s2c_boundary.get() && self.out.push_own(frame)
    }

    /// Ends the session with `code`: the client is told, both sides cut.
    fn fail(&self, code: u16, why: &str) {
        if self.closing.replace(true) {
            return;
        }
        tracing::debug!(player = %self.player.id, code, why, "closing the player's session");
        self.try_send_client(close_frame(code, why, false));
        for b in self.backend.borrow().iter() {
            shutdown_later(b.link.fd, Duration::from_millis(200));
        }
        shutdown_later(self.client_fd, Duration::from_millis(200));
    }

    /// The server closed the player (its close was relayed): the client
    /// answers, then everything ends.
    fn server_closed(&self) {
        self.closing.set(true);
        shutdown_later(self.client_fd, Duration::from_secs(5));
    }

    /// The current server's connection ended without a close.
    fn server_lost(self: &Rc<Self>, fd: RawFd) {
        if self.backend.borrow().as_ref().is_some_and(|b| b.link.fd == fd) {
            self.backend.borrow_mut().take();
        }
        self.stats().failovers.inc();
        if self.room.is_some() {
            // The room moves when the registry sees its server fail; hold
            // the client's messages until then (see follow_room).
            let s = self.settings.borrow().clone();
            let limit = s.spatial.heartbeat_interval * s.spatial.heartbeat_misses + Duration::from_secs(5);
            self.transferring.set(true);
            self.room_wait.set(Some(Instant::now() + limit));
            return;
        }
        let current = self.server.borrow().clone();
        let p = self.last_pos.get().unwrap_or(current.center);
        let world = registry().world();
        match spatial::route(&world, p, Some(&current.id)) {
            Some((target, _)) => self.start_transfer(target, Reason::Lost),
            None => {
                tracing::info!(player = %self.player.id, server = %current.id, "upstream: game server lost and no other server can take the player; asking it to reconnect");
                self.fail(1012, "game server lost; reconnect");
            }
        }
    }

    /// A room session follows its room: when the room moved to another
    /// server (migration), the player moves too; after its server was lost,
    /// the session waits (client messages held) until the room moved or
    /// the wait ran out (close 1012). Called by the ticker.
    pub(super) fn follow_room(self: &Rc<Self>) {
        let Some(id) = &self.room else { return };
        let waiting = self.room_wait.get();
        if self.closing.get() || (self.transferring.get() && waiting.is_none()) {
            return;
        }
        let current = self.server.borrow().clone();
        match crate::rooms::rooms().store().cached(id) {
            Some(r) if r.server_id != current.id && !r.lost => {
                let world = registry().world();
                if let Some(t) = world.get(&r.server_id).filter(|x| spatial::open(x)).cloned() {
                    self.room_wait.set(None);
                    self.transferring.set(false);
                    self.start_transfer(t, Reason::Moved);
                    return;
                }
            }
            Some(_) => {}
            None => crate::rooms::rooms().refresh(id),
        }
        if waiting.is_some_and(|d| Instant::now() > d) {
            self.room_wait.set(None);
            tracing::info!(player = %self.player.id, room = %id, "upstream: the room's game server failed and the room did not move in time; asking the client to reconnect");
            self.fail(1012, "the room's game server failed; reconnect");
        }
    }

    /// A position read from the player's messages.
    fn on_position(self: &Rc<Self>, p: Point) {
        self.stats().positions.inc();
        self.player.set_position(p);
        self.last_pos.set(Some(p));
        let now = Instant::now();
        let mut m = self.motion.get();
        m.record(p, now);
        self.motion.set(m);
        self.reconsider(p, Reason::Crossed);
        self.predict(&m);
    }

    /// Moves the player if its position calls for another server.
    fn reconsider(self: &Rc<Self>, p: Point, reason: Reason) {
        if self.transferring.get() || self.closing.get() || self.room.is_some() {
            return;
        }
        let settings = self.settings.borrow().clone();
        let world = registry().world();
        self.world_version.set(world.version);
        let current = self.server.borrow().clone();
        if let Some(target) = spatial::decide(&world, &current, p, settings.spatial.hysteresis) {
            let r = if world.get(&current.id).is_some_and(|s| spatial::open(s)) { reason } else { Reason::Moved };
            self.start_transfer(target, r);
        }
        if settings.spatial.auto_scale {
            self.maybe_wish(&world, p, &settings);
        }
    }

    /// Auto-scale: an uncovered point, or a crowded region.
    fn maybe_wish(&self, world: &crate::registry::World, p: Point, settings: &Settings) {
        let covered = world.servers.iter().filter(|s| spatial::open(s) && spatial::contains(s, p, 0.0)).collect::<Vec<_>>();
        let region = spatial::region_of(p, settings.spatial.region_size);
        let reason = if covered.is_empty() {
            "uncovered"
        } else if covered.iter().all(|s| s.players() as f64 >= settings.spatial.scale_threshold * f64::from(s.capacity.max(1))) {
            "near_capacity"
        } else {
            return;
        };
        if self.wished.get() != Some(region) {
            self.wished.set(Some(region));
            registry().wish_server(region, reason);
        }
    }

    /// Predictive pre-connect: open the predicted target's connection early.
    fn predict(self: &Rc<Self>, m: &Motion) {
        let settings = self.settings.borrow().clone();
        let horizon = settings.spatial.predict_horizon;
        if horizon.is_zero() || self.transferring.get() || self.closing.get() || self.room.is_some() {
            return;
        }
        let world = registry().world();
        let current = self.server.borrow().clone();
        let warm_server = self.warm.borrow().as_ref().map(|w| w.conn.up.server.id.clone());
        let target = spatial::warm_target(&world, &current, m, horizon.as_secs_f64(), settings.spatial.hysteresis, warm_server.as_deref());
        match target {
            Some(t) if warm_server.as_deref() == Some(t.id.as_str()) => {}
            Some(t) => {
                self.cancel_warm();
                if self.warming.get().is_none() {
                    self.spawn_warm(t);
                }
            }
            None => self.cancel_warm(),
        }
    }

    fn cancel_warm(&self) {
        if let Some(w) = self.warm.borrow_mut().take() {
            self.stats().preconnect_cancelled.inc();
            shutdown_fd(w.conn.up.link.fd);
        }
    }

    fn spawn_warm(self: &Rc<Self>, target: Arc<Server>) {
        let s = self.clone();
        let gen = fastrand::usize(..);
        self.warming.set(Some(gen));
        monoio::spawn(async move {
            let res = s.open_backend(&target, true).await;
            if s.warming.get() != Some(gen) {
                return;
            }
            s.warming.set(None);
            match res {
                Ok(conn) if !s.closing.get() => {
                    s.stats().preconnects.inc();
                    *s.warm.borrow_mut() = Some(Warm { conn, at: Instant::now() });
                }
                Ok(conn) => shutdown_fd(conn.up.link.fd),
                Err(e) => tracing::debug!(player = %s.player.id, server = %target.id, error = %e, "upstream: pre-connect failed"),
            }
        });
    }

    /// Connects to `target` for this player (with a transfer token when it
    /// is not the first server).
    async fn open_backend(&self, target: &Arc<Server>, transfer: bool) -> Result<Conn, String> {
        let settings = self.settings.borrow().clone();
        let xff = forwarded_for(self.peer);
        let source = self.server.borrow().id.clone();
        let now = atlas_observe::now_ms();
        let tok = transfer.then(|| {
            token::sign(
                &settings.token_key,
                &Token {
                    token_id: token::new_id(),
                    player_id: self.player.id.clone(),
                    source_server: source,
                    target_server: target.id.clone(),
                    target_address: target.address.clone(),
                    created_at_ms: now,
                    expires_at_ms: now + settings.spatial.token_ttl.as_millis() as u64,
                },
            )
        });
        let mut extra: Vec<(&str, &str)> = vec![("X-Atlas-Player-Id", &self.player.id), ("X-Forwarded-For", &xff)];
        if let Some(t) = &tok {
            extra.push(("X-Atlas-Transfer-Token", t));
        }
        let join = self
            .room
            .as_ref()
            .map(|id| crate::token::sign_join(&settings.token_key, id, &target.id, now + crate::rooms::rooms().settings().join_token_ttl.as_millis() as u64));
        if let (Some(id), Some(j)) = (&self.room, &join) {
            extra.push(("X-Atlas-Room-Id", id));
            extra.push(("X-Atlas-Join-Token", j));
        }
        let mut conn = connect(&self.hs, target, &extra, self.ctx.timeouts.connect).await?;
        conn.token = tok;
        Ok(conn)
    }

    /// Starts moving the player to `target`.
    fn start_transfer(self: &Rc<Self>, target: Arc<Server>, reason: Reason) {
        if self.transferring.replace(true) || self.closing.get() {
            return;
        }
        let started = Instant::now();
        let warm = self.warm.borrow_mut().take();
        match warm {
            Some(w) if w.conn.up.server.id == target.id => {
                self.stats().preconnect_hits.inc();
                *self.pending.borrow_mut() = Some(Ready { conn: w.conn, started, reason });
                self.try_switch();
                return;
            }
            Some(w) => {
                self.stats().preconnect_cancelled.inc();
                shutdown_fd(w.conn.up.link.fd);
            }
            None => {}
        }
        self.warming.set(None);
        let s = self.clone();
        monoio::spawn(async move {
            match s.open_backend(&target, true).await {
                Ok(conn) if !s.closing.get() => {
                    *s.pending.borrow_mut() = Some(Ready { conn, started, reason });
                    s.try_switch();
                }
                Ok(conn) => {
                    shutdown_fd(conn.up.link.fd);
                    s.transferring.set(false);
                }
                Err(e) => {
                    s.stats().transfers_failed.inc();
                    s.transferring.set(false);
                    let from = s.server.borrow().id.clone();
                    tracing::info!(player = %s.player.id, from = %from, to = %target.id, error = %e, "upstream: transfer failed; the player stays (retry is safe)");
                    registry().record_transfer(TransferEvent {
                        at_ms: atlas_observe::now_ms(),
                        player: s.player.id.clone(),
                        from: from.clone(),
                        to: target.id.clone(),
                        switch_us: started.elapsed().as_micros() as u64,
                        ok: false,
                        reason: reason.as_str(),
                    });
                    if s.backend.borrow().is_none() && !s.writing.get() && s.room.is_some() {
                        s.fail(1012, "the room's game server is unavailable; reconnect");
                    } else if s.backend.borrow().is_none() && !s.writing.get() {
                        // The old server is gone too: try another, else give up.
                        let p = s.last_pos.get().unwrap_or(target.center);
                        let world = registry().world();
                        match spatial::nearest_open(&world, p, &[&target.id, &from]) {
                            Some(n) => s.start_transfer(n, Reason::Lost),
                            None => s.fail(1012, "no game server available; reconnect"),
                        }
                    }
                }
            }
        });
    }

    /// Switches the client's stream to the pending backend if the client
    /// is between two messages and no write is in progress. Returns
    /// whether it switched.
    fn try_switch(self: &Rc<Self>) -> bool {
        if self.writing.get() || !self.at_boundary.get() {
            return false;
        }
        self.switch_now()
    }

    /// The switch itself (the caller knows the client is at a boundary).
    fn switch_now(self: &Rc<Self>) -> bool {
        let Some(ready) = self.pending.borrow_mut().take() else { return false };
        let Conn { up, down, token, .. } = ready.conn;
        let target = up.server.clone();
        let old = self.backend.borrow_mut().replace(up);
        // The new reader starts when the previous one has finished.
        let wait = self.last_reader.borrow_mut().take();
        let (tx, rx) = oneshot::channel();
        *self.last_reader.borrow_mut() = Some(rx);
        monoio::spawn(run_reader(self.clone(), down, wait, tx));
        let from = std::mem::replace(&mut *self.server.borrow_mut(), target.clone());
        from.live.fetch_sub(1, Ordering::Relaxed);
        target.live.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.player.server.lock() {
            s.clone_from(&target.id);
        }
        let settings = self.settings.borrow().clone();
        let drain = settings.spatial.transfer_drain_timeout;
        // With transfer messages the handoff ends the transfer; until then
        // no other transfer starts and the client's messages wait.
        let mut handing_off = false;
        match (old, token) {
            (Some(old), Some(token)) if settings.spatial.transfer_messages => {
                let (open, gate) = oneshot::channel();
                *self.gate.borrow_mut() = Some(gate);
                handing_off = true;
                monoio::spawn(hand_off(self.clone(), old, token, target.clone(), open, drain, drain));
            }
            (Some(old), _) => {
                monoio::spawn(retire(old, drain));
            }
            (None, _) => {}
        }
        let us = ready.started.elapsed().as_micros() as u64;
        let st = self.stats();
        st.transfers_ok.inc();
        st.switch_time.observe_us(us);
        if !handing_off {
            self.transferring.set(false);
        }
        tracing::debug!(player = %self.player.id, from = %from.id, to = %target.id, switch_us = us, reason = ready.reason.as_str(), "player transferred");
        registry().record_transfer(TransferEvent {
            at_ms: atlas_observe::now_ms(),
            player: self.player.id.clone(),
            from: from.id.clone(),
            to: target.id.clone(),
            switch_us: us,
            ok: true,
            reason: ready.reason.as_str(),
        });
        true
    }

    /// Writes `buf[range]` to the current backend. When the backend has
    /// failed, waits for the failover's new backend and, if `range` starts
    /// between two messages, sends it there; otherwise the partial message
    /// is dropped (the failed server had its beginning). Err: give up.
    async fn send_backend(self: &Rc<Self>, buf: &mut Vec<u8>, range: std::ops::Range<usize>, starts_at_boundary: bool) -> Result<(), ()> {
        if range.is_empty() {
            return Ok(());
        }
        loop {
            // A transfer's state handoff runs: the target gets nothing before it.
            let gate = self.gate.borrow_mut().take();
            if let Some(g) = gate {
                let _ = g.await;
            }
            let taken = self.backend.borrow_mut().take();
            match taken {
                Some(mut up) => {
                    self.writing.set(true);
                    let r = write_range(&mut up.w, buf, range.clone()).await;
                    self.writing.set(false);
                    match r {
                        Ok(()) => {
                            // A switch may have been prepared meanwhile: the
                            // backend slot is still ours (nobody swaps while writing).
                            *self.backend.borrow_mut() = Some(up);
                            return Ok(());
                        }
                        Err(_) => {
                            let fd = up.link.fd;
                            shutdown_fd(fd);
                            drop(up);
                            if !self.transferring.get() {
                                self.server_lost(fd);
                            }
                            if !starts_at_boundary {
                                return Ok(());
                            }
                        }
                    }
                }
                None => {
                    // Failing over: wait for the new backend.
                    if self.closing.get() {
                        return Err(());
                    }
                    if self.pending.borrow().is_some() {
                        if starts_at_boundary {
                            self.switch_now();
                            continue;
                        }
                        return Ok(());
                    }
                    if !self.transferring.get() {
                        return Err(());
                    }
                    self.writing.set(true);
                    monoio::time::sleep(Duration::from_millis(1)).await;
                    self.writing.set(false);
                }
            }
        }
    }
}

/// What the bytes read so far say about the upgrade request.
pub(crate) enum Head {
    Done(ClientHandshake, usize),
    Partial,
    Refuse(u16, &'static str, &'static str),
}

/// Parses the upgrade request (a plain function: httparse's header array
/// must not live across an await, or every session's task would carry it).
pub(crate) fn parse_head(buf: &[u8], max: usize) -> Head {
    let mut h = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut h);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => match handshake::validate(&req) {
            Ok(hs) => Head::Done(hs, n),
            Err(e) => {
                let status = e.status();
                let extra = if status == 426 { "Sec-WebSocket-Version: 13\r\n" } else { "" };
                Head::Refuse(status, e.reason(), extra)
            }
        },
        Ok(httparse::Status::Partial) if buf.len() < max => Head::Partial,
        Ok(httparse::Status::Partial) => Head::Refuse(431, "request head too large", ""),
        Err(_) => Head::Refuse(400, "malformed request", ""),
    }
}

/// Reads the upgrade request; answers refusals itself. Returns the
/// handshake and any bytes read past it.
pub(crate) async fn read_handshake<S: AsyncReadRent + AsyncWriteRent>(
    ctx: &ListenerCtx,
    client: &mut S,
    buf: &mut Vec<u8>,
) -> Option<(ClientHandshake, usize)> {
    let deadline = Instant::now() + ctx.timeouts.client_header;
    loop {
        match parse_head(buf, ctx.limits.max_header_bytes) {
            Head::Done(hs, n) => return Some((hs, n)),
            Head::Partial => {}
            Head::Refuse(status, why, extra) => {
                refuse(client, status, why, extra).await;
                return None;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, read_more(client, buf, ctx.limits.max_header_bytes + 1024)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

async fn refuse<S: AsyncWriteRent>(client: &mut S, status: u16, why: &str, extra: &str) {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        429 => "Too Many Requests",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = format!("{why}\n");
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}", body.len())
        .into_bytes();
    let _ = write_vec(client, &mut out).await;
    let _ = client.shutdown().await;
}

/// A query parameter of the handshake's target.
fn query<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    let q = path.split_once('?')?.1;
    q.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

fn header<'a>(hs: &'a ClientHandshake, name: &str) -> Option<&'a str> {
    hs.forward.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The start position: `?x=&y=&z=` or `X-Atlas-Position: x,y,z`.
fn start_position(hs: &ClientHandshake) -> Option<Point> {
    let f = |s: &str| s.trim().parse::<f64>().ok().filter(|v| v.is_finite());
    if let (Some(x), Some(y)) = (query(&hs.path, "x").and_then(f), query(&hs.path, "y").and_then(f)) {
        let z = query(&hs.path, "z").and_then(f).unwrap_or(0.0);
        return Some(Point { x, y, z });
    }
    let h = header(hs, "x-atlas-position")?;
    let v: Vec<f64> = h.split(',').filter_map(f).collect();
    match v.as_slice() {
        [x, y] => Some(Point { x: *x, y: *y, z: 0.0 }),
        [x, y, z] => Some(Point { x: *x, y: *y, z: *z }),
        _ => None,
    }
}

/// The player id: `?player_id=`, else `X-Player-Id`, else a fresh one.
fn player_id(hs: &ClientHandshake) -> String {
    let ok = |s: &&str| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b));
    query(&hs.path, "player_id")
        .filter(ok)
        .or_else(|| header(hs, "x-player-id").filter(ok))
        .map(str::to_string)
        .unwrap_or_else(|| format!("p-{}", token::new_id()))
}

/// A join through Atlas (`/rooms/{id}`): the room's id, its server and a
/// join token for it, or the refusal (404 unknown, 410 lost, 429 over
/// `[rooms] join_rate`, 503 server or store unavailable).
async fn join_room(hs: &ClientHandshake, peer: SocketAddr) -> Result<(String, Arc<Server>, String), (u16, String)> {
    let r = crate::rooms::rooms();
    let Some(id) = crate::rooms::room_path(&hs.path) else { return Err((404, "not a room id".into())) };
    let rate = r.settings().join_rate;
    if !r.joins.admit(peer.ip(), rate) {
        return Err((429, format!("joins from {} are over [rooms] join_rate ({rate}/s)", peer.ip())));
    }
    // The cache first; on a miss the rooms thread fetches it (never this worker).
    let deadline = Instant::now() + Duration::from_secs(2);
    let room = loop {
        match r.cached_or_fetch(id) {
            Ok(room) => break room,
            Err(true) => return Err((404, format!("no room {id}"))),
            Err(false) if Instant::now() < deadline => monoio::time::sleep(Duration::from_millis(2)).await,
            Err(false) => return Err((503, "the room store did not answer; retry".into())),
        }
    };
    if room.lost {
        return Err((410, format!("room {id}: its game server failed and no other server could take it")));
    }
    let world = registry().world();
    let Some(server) = world.get(&room.server_id).filter(|s| spatial::open(s)).cloned() else {
        return Err((503, format!("room {id}: its game server is unavailable (the room is moving); retry")));
    };
    let join = r.join_token(&room);
    Ok((id.to_string(), server, join))
}

/// Serves one game-listener connection (plain or TLS).
pub async fn serve<S>(ctx: Rc<ListenerCtx>, mut client: S, peer: SocketAddr, client_fd: RawFd)
where
    S: AsyncReadRent + AsyncWriteRent + Split + 'static,
    OwnedWriteHalf<S>: IntoClientW,
{
    let _live = Drain::current().connection();
    let w = ctx.worker;
    let mut buf = take_buf();
    let Some((mut hs, head_len)) = read_handshake(&ctx, &mut client, &mut buf).await else {
        slot(w).refused.inc();
        give_buf(buf);
        return;
    };
    // Atlas's own headers are never taken from the client.
    hs.forward.retain(|(n, _)| !n.to_ascii_lowercase().starts_with("x-atlas-") || n.eq_ignore_ascii_case("x-atlas-position"));
    hs.forward.retain(|(n, _)| !n.eq_ignore_ascii_case("x-forwarded-for"));
    let leftover = buf.split_off(head_len);
    give_buf(buf);
    let settings = registry().settings();
    let start = start_position(&hs);
    let id = player_id(&hs);
    // A room join goes to the room's server and nowhere else.
    let room = if hs.path.starts_with("/rooms/") {
        match join_room(&hs, peer).await {
            Ok(r) => Some(r),
            Err((status, why)) => {
                slot(w).refused.inc();
                crate::rooms::RoomStats::inc(&crate::rooms::rooms().stats.joins_refused);
                let extra = if status == 429 || status == 503 { "Retry-After: 1\r\n" } else { "" };
                refuse(&mut client, status, &why, extra).await;
                return;
            }
        }
    } else {
        None
    };
    let world = registry().world();
    let first = match start {
        _ if room.is_some() => room.as_ref().map(|(_, s, _)| s.clone()),
        Some(p) => {
            let r = spatial::route(&world, p, None);
            if settings.spatial.auto_scale && r.as_ref().is_none_or(|(_, uncovered)| *uncovered) {
                registry().wish_server(spatial::region_of(p, settings.spatial.region_size), "uncovered");
            }
            r.map(|(s, _)| s)
        }
        None => spatial::spawn(&world),
    };
    let Some(mut server) = first else {
        slot(w).refused.inc();
        refuse(&mut client, 503, "no game server is available", "Retry-After: 5\r\n").await;
        return;
    };
    // Connect, trying other servers if the chosen one fails.
    let xff = forwarded_for(peer);
    let mut tried: Vec<String> = Vec::new();
    let conn = loop {
        let mut extra = vec![("X-Atlas-Player-Id", id.as_str()), ("X-Forwarded-For", xff.as_str())];
        if let Some((room_id, _, join)) = &room {
            extra.push(("X-Atlas-Room-Id", room_id.as_str()));
            extra.push(("X-Atlas-Join-Token", join.as_str()));
        }
        match connect(&hs, &server, &extra, ctx.timeouts.connect).await {
            Ok(c) => break c,
            Err(e) if room.is_some() => {
                tracing::info!(player = %id, server = %server.id, error = %e, "upstream: cannot open the connection to the room's game server");
                slot(w).refused.inc();
                refuse(&mut client, 502, "the room's game server did not accept the connection", "Retry-After: 1\r\n").await;
                return;
            }
            Err(e) => {
                tracing::info!(player = %id, server = %server.id, error = %e, "upstream: cannot open the player's game server connection (trying another)");
                tried.push(server.id.clone());
                let p = start.unwrap_or(server.center);
                let excluded: Vec<&str> = tried.iter().map(String::as_str).collect();
                match spatial::nearest_open(&world, p, &excluded) {
                    Some(n) if tried.len() < 3 => server = n,
                    _ => {
                        slot(w).refused.inc();
                        refuse(&mut client, 502, "the game server did not accept the connection", "").await;
                        return;
                    }
                }
            }
        }
    };
    drop(world);
    let mut resp = handshake::client_response(&hs.key, conn.protocol.as_deref());
    if write_vec(&mut client, &mut resp).await.is_err() {
        shutdown_fd(conn.up.link.fd);
        return;
    }
    server.live.fetch_add(1, Ordering::Relaxed);
    let player = registry().add_player(&id, w, &server.id, start);
    let st = slot(w);
    st.sessions.add(1);
    st.sessions_total.inc();
    let (cr, cw) = client.into_split();
    let Conn { up, down, .. } = conn;
    let now = Instant::now();
    let s = Rc::new(Session {
        w,
        ctx: ctx.clone(),
        settings: RefCell::new(settings),
        player,
        hs,
        peer,
        client_fd,
        out: ClientOut::new(cw.into_client_w(), client_fd),
        backend: RefCell::new(Some(up)),
        writing: Cell::new(false),
        server: RefCell::new(server),
        pending: RefCell::new(None),
        transferring: Cell::new(false),
        gate: RefCell::new(None),
        last_reader: RefCell::new(None),
        at_boundary: Cell::new(true),
        s2c_boundary: Cell::new(true),
        motion: Cell::new(Motion::default()),
        last_pos: Cell::new(start),
        world_version: Cell::new(registry().world().version),
        warm: RefCell::new(None),
        warming: Cell::new(None),
        closing: Cell::new(false),
        last_in: Cell::new(now),
        last_out: Cell::new(now),
        pinged: Cell::new(false),
        wished: Cell::new(None),
        room: room.map(|(room_id, _, _)| {
            crate::rooms::RoomStats::inc(&crate::rooms::rooms().stats.joins);
            room_id
        }),
        room_wait: Cell::new(None),
    });
    if let Some(p) = start {
        s.motion.set({
            let mut m = Motion::default();
            m.record(p, now);
            m
        });
    }
    let (done_tx, done_rx) = oneshot::channel();
    *s.last_reader.borrow_mut() = Some(done_rx);
    monoio::spawn(run_reader(s.clone(), down, None, done_tx));
    ticker::track(&s);
    client_reader(s, cr, leftover).await;
}

/// Reads the client: forwards its bytes, reads positions, cuts for switches.
async fn client_reader<R: AsyncReadRent>(s: Rc<Session>, mut r: R, mut buf: Vec<u8>) {
    let settings = s.settings.borrow().clone();
    let mut dec = Decoder::new(Sender::Client, 0, settings.spatial.max_frame_bytes);
    let mut tap = TextTap::new(MAX_TAP);
    let mut cuts: Vec<(usize, Option<Point>)> = Vec::new();
    // Bytes in the last read (the handshake's leftover at first).
    let mut last = buf.len();
    if buf.is_empty() {
        refit_read_buf(&mut buf, 0);
    }
    loop {
        if buf.is_empty() {
            match read_more(&mut r, &mut buf, BUF_SIZE).await {
                Ok(n) if n > 0 => last = n,
                Ok(_) => {
                    tracing::debug!(player = %s.player.id, "client: connection closed without a close frame");
                    break;
                }
                Err(e) => {
                    tracing::debug!(player = %s.player.id, error = %e, "client: read failed");
                    break;
                }
            }
        }
        s.last_in.set(Instant::now());
        cuts.clear();
        let mut close_seen = false;
        // An `Arc` of the settings, not a borrow of the cell: the sends below
        // can wait, and the ticker swaps in new settings after a reload.
        let now_settings = s.settings.borrow().clone();
        let rules = &now_settings.rules;
        let was_boundary = dec.at_message_boundary();
        let res = dec.feed(&buf, |c| {
            let end = match &c {
                Chunk::FrameEnd { opcode, message_end, consumed } => {
                    if *opcode == Opcode::Close {
                        close_seen = true;
                    }
                    message_end.then_some(*consumed)
                }
                _ => None,
            };
            let pos = tap.follow(&c).and_then(|t| extract(t, rules));
            if let Some(at) = end {
                cuts.push((at, pos));
            }
        });
        s.stats().messages_in.add(cuts.len() as u64);
        if let Err(e) = res {
            // The complete messages before the bad frame still go through.
            if let Some(&(at, _)) = cuts.last() {
                let _ = s.send_backend(&mut buf, 0..at, was_boundary).await;
            }
            tracing::debug!(player = %s.player.id, peer = %s.peer, error = %e, "client: WebSocket protocol error; closing");
            s.fail(e.close_code(), "protocol error");
            break;
        }
        // Forward, cutting between messages where a switch is ready.
        let mut start = 0;
        let mut start_boundary = was_boundary;
        let mut failed = false;
        for &(at, pos) in &cuts {
            if let Some(p) = pos {
                s.on_position(p);
            }
            if s.pending.borrow().is_some() {
                if s.send_backend(&mut buf, start..at, start_boundary).await.is_err() {
                    tracing::debug!(player = %s.player.id, "upstream: no game server to forward to; closing");
                    failed = true;
                    break;
                }
                start = at;
                start_boundary = true;
                s.switch_now();
            }
        }
        let end = buf.len();
        if !failed && s.send_backend(&mut buf, start..end, start_boundary).await.is_err() {
            tracing::debug!(player = %s.player.id, "upstream: no game server to forward to; closing");
            failed = true;
        }
        s.at_boundary.set(dec.at_message_boundary());
        buf.clear();
        refit_read_buf(&mut buf, last);
        if failed {
            break;
        }
        // A switch prepared while we wrote can happen now.
        s.try_switch();
        if close_seen {
            // The client closed: its close went to the server, whose answer
            // ends the session. Wait no longer than 5 s for it.
            s.closing.set(true);
            if let Some(b) = s.backend.borrow().as_ref() {
                shutdown_later(b.link.fd, Duration::from_secs(5));
            }
            break;
        }
    }
    give_buf(buf);
    if !s.closing.get() {
        // The client went away without a close: tell the server.
        s.closing.set(true);
        if let Some(mut up) = s.backend.borrow_mut().take() {
            monoio::spawn(async move {
                let mut f = close_frame(1001, "client went away", true);
                let _ = monoio::time::timeout(Duration::from_secs(1), write_vec(&mut up.w, &mut f)).await;
                // The writer is still held here, so the socket is open.
                shutdown_later(up.link.fd, Duration::from_secs(1));
                drop(up);
            });
        }
    }
}
