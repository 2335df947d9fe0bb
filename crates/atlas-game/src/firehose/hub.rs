//! The firehose's shared state.
//!
//! Clients live on the per-core workers (whichever accepted them); each
//! master link is ONE TCP stream, owned by worker 0 (or by the
//! `atlas-firehose` thread, see `master.rs`), so a v2 master sees exactly
//! what connserver gave it: one connection. (Per worker links would give a
//! master one stream per core, which v2 masters do not expect, and a
//! reconnecting client usually lands on another worker than the one its id
//! was tagged on.)
//!
//! Crossing threads:
//! - client -> master: a worker appends tagged frames straight into the
//!   link's outbox (one lock per read, not per frame) and rings the link's
//!   doorbell if the outbox was empty; the link writes the whole outbox in
//!   one write. The outbox holds at most `master_channel_capacity` packets:
//!   past that the clients' readers pause (backpressure, nothing lost).
//! - master -> client: the link reads a batch, looks every id up under one
//!   table lock and appends the packets to the owning worker's mailbox,
//!   ringing that worker's doorbell once per batch. A worker hands each
//!   packet to the client's bounded queue (`channel_capacity`); a client
//!   whose queue is full cannot keep up and is failed.
//!
//! A doorbell is a socketpair: the waiting side reads it with the
//! runtime's I/O (io_uring or epoll), the other side writes one byte only
//! when the doorbell is not already armed.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::net::UnixStream as StdUnix;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;
use atlas_config::{Firehose, FirehoseBalance};
use monoio::io::AsyncReadRent;

use super::crypto::ServerKey;
use super::wire::{self, FLAG_CONNECT, FLAG_DATA, FLAG_DISCONNECT, FLAG_FAILURE, FLAG_RECONNECT};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Doorbells
// ---------------------------------------------------------------------------

pub struct Doorbell {
    tx: StdUnix,
    rx: Mutex<Option<StdUnix>>,
    armed: AtomicBool,
}

impl Doorbell {
    pub fn new() -> std::io::Result<Doorbell> {
        let (tx, rx) = StdUnix::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Doorbell { tx, rx: Mutex::new(Some(rx)), armed: AtomicBool::new(false) })
    }

    /// Wakes the waiter (a no-op while it has not consumed the last ring).
    pub fn ring(&self) {
        if !self.armed.swap(true, Ordering::SeqCst) {
            // Full socket buffer: a ring is pending anyway.
            let _ = (&self.tx).write(&[1]);
        }
    }

    /// The waiting end, for the thread that owns it (once).
    pub fn waiter(&self) -> Option<Waiter> {
        let rx = lock(&self.rx).take()?;
        monoio::net::UnixStream::from_std(rx).ok().map(|rx| Waiter { rx, buf: Some(Vec::with_capacity(64)) })
    }
}

pub struct Waiter {
    rx: monoio::net::UnixStream,
    buf: Option<Vec<u8>>,
}

impl Waiter {
    /// Waits for a ring; then whatever was queued before it is visible.
    pub async fn wait(&mut self, bell: &Doorbell) {
        let mut buf = self.buf.take().unwrap_or_else(|| Vec::with_capacity(64));
        buf.clear();
        let (_, b) = self.rx.read(buf).await;
        self.buf = Some(b);
        bell.armed.store(false, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// Master links
// ---------------------------------------------------------------------------

/// Tagged frames waiting for a master.
#[derive(Default)]
pub struct Outbox {
    pub bytes: Vec<u8>,
    pub packets: usize,
}

pub struct Link {
    pub index: usize,
    pub addr: String,
    pub out: Mutex<Outbox>,
    pub bell: Doorbell,
    pub up: AtomicBool,
    /// Clients assigned to this master (live and stale).
    pub clients: AtomicUsize,
}

impl Link {
    /// Appends one packet whatever the capacity (failures and notices: a
    /// few bytes each, and they must not be lost).
    pub fn push(&self, id: u64, flag: u8, data: &[u8]) {
        let was_empty = {
            let mut o = lock(&self.out);
            let e = o.bytes.is_empty();
            wire::push_tagged(&mut o.bytes, id, flag, data);
            o.packets += 1;
            e
        };
        if was_empty {
            self.bell.ring();
        }
    }

    pub fn queued(&self) -> usize {
        lock(&self.out).packets
    }
}

// ---------------------------------------------------------------------------
// Worker mailboxes
// ---------------------------------------------------------------------------

/// What a master link hands a worker.
pub enum Delivery {
    /// A master packet for a live client.
    Data(u64, Vec<u8>),
    /// The master kicked it: close the socket; it is already forgotten.
    Kick(u64),
}

pub struct Mailbox {
    pub q: Mutex<Vec<Delivery>>,
    pub bell: Doorbell,
}

// ---------------------------------------------------------------------------
// The client table
// ---------------------------------------------------------------------------

pub enum State {
    Live { worker: usize },
    Stale { since: Instant, missed: VecDeque<Vec<u8>> },
}

pub struct Entry {
    /// The master this client is tagged on (a worker reads it per batch).
    pub route: Arc<AtomicUsize>,
    /// The client's SEC1 public key from its first handshake.
    pub pubkey: Vec<u8>,
    pub state: State,
}

#[derive(Default)]
pub struct Table {
    pub clients: HashMap<u64, Entry>,
    /// (id, when it went stale), oldest first; entries that came back or
    /// were removed are skipped when met.
    pub(super) stale: VecDeque<(u64, Instant)>,
    pub nstale: usize,
}

impl Table {
    /// Drops the oldest stale clients while there are more than `max`;
    /// returns them, to be failed with the reason given.
    pub(super) fn evict_over(&mut self, max: usize) -> Vec<(u64, &'static str)> {
        let mut gone = Vec::new();
        while self.nstale > max {
            let Some((old, since)) = self.stale.pop_front() else { break };
            if matches!(self.clients.get(&old), Some(Entry { state: State::Stale { since: s, .. }, .. }) if *s == since) {
                self.nstale -= 1;
                gone.push((old, "stale client limit (max_stale_clients) reached: the oldest stale client was dropped"));
            }
        }
        gone
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub reconnected: AtomicU64,
    pub reconnects_refused: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    pub kicked: AtomicU64,
    pub to_master: AtomicU64,
    pub to_clients: AtomicU64,
    pub link_failures: AtomicU64,
}

pub struct Hub {
    pub settings: ArcSwap<Firehose>,
    pub key: ServerKey,
    pub table: Mutex<Table>,
    pub links: Vec<Arc<Link>>,
    pub mailboxes: Mutex<Vec<Option<Arc<Mailbox>>>>,
    next_id: AtomicU64,
    pub connects: crate::rooms::Limiter,
    pub stats: Stats,
    /// The clients were written out for the next Atlas (`persist.rs`):
    /// master packets are no longer taken, nothing is reaped.
    pub handed_off: AtomicBool,
    /// The hand-over is complete (the table is written, or there was none).
    pub saved: AtomicBool,
    /// Until when a reconnect for an unknown id waits for the previous
    /// Atlas' table (set after a takeover; cleared by the import).
    pub awaiting: Mutex<Option<Instant>>,
}

impl Hub {
    pub fn new(settings: Firehose, key: ServerKey) -> std::io::Result<Hub> {
        let mut links = Vec::new();
        for (index, addr) in settings.masters.iter().enumerate() {
            links.push(Arc::new(Link {
                index,
                addr: addr.clone(),
                out: Mutex::new(Outbox::default()),
                bell: Doorbell::new()?,
                up: AtomicBool::new(false),
                clients: AtomicUsize::new(0),
            }));
        }
        // Ids start from the clock, so a master that outlives an Atlas
        // restart does not see an old id again for a new client.
        let base = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1) << 20;
        Ok(Hub {
            settings: ArcSwap::from_pointee(settings),
            key,
            table: Mutex::new(Table::default()),
            links,
            mailboxes: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(base),
            connects: crate::rooms::Limiter::new(),
            stats: Stats::default(),
            handed_off: AtomicBool::new(false),
            saved: AtomicBool::new(false),
            awaiting: Mutex::new(None),
        })
    }

    /// The mailbox of `worker`, if that worker has started its dispatcher.
    pub fn mailbox(&self, worker: usize) -> Option<Arc<Mailbox>> {
        lock(&self.mailboxes).get(worker).cloned().flatten()
    }

    pub fn set_mailbox(&self, worker: usize, m: Arc<Mailbox>) {
        let mut v = lock(&self.mailboxes);
        if v.len() <= worker {
            v.resize(worker + 1, None);
        }
        v[worker] = Some(m);
    }

    /// The master for a new client.
    pub(super) fn assign(&self, id: u64, s: &Firehose) -> usize {
        let n = self.links.len().max(1);
        let up = |i: usize| self.links.get(i).is_some_and(|l| l.up.load(Ordering::Relaxed));
        match s.balance {
            FirehoseBalance::Hash => {
                let h = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % n;
                if s.failover && !up(h) {
                    (1..n).map(|k| (h + k) % n).find(|&i| up(i)).unwrap_or(h)
                } else {
                    h
                }
            }
            FirehoseBalance::LeastClients => {
                let load = |i: usize| self.links[i].clients.load(Ordering::Relaxed);
                (0..n).filter(|&i| i < self.links.len()).min_by_key(|&i| (!up(i), load(i), i)).unwrap_or(0)
            }
        }
    }

    /// Registers a new client live on `worker`; returns its id and route.
    pub fn add_client(&self, worker: usize, pubkey: Vec<u8>) -> (u64, Arc<AtomicUsize>) {
        let s = self.settings.load();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let m = self.assign(id, &s);
        let route = Arc::new(AtomicUsize::new(m));
        lock(&self.table).clients.insert(id, Entry { route: route.clone(), pubkey, state: State::Live { worker } });
        if let Some(l) = self.links.get(m) {
            l.clients.fetch_add(1, Ordering::Relaxed);
            if s.notices.connect {
                l.push(id, FLAG_CONNECT, b"");
            }
        }
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        (id, route)
    }

    /// The public key of stale client `id`, or why it cannot reconnect.
    pub fn stale_key(&self, id: u64) -> Result<Vec<u8>, &'static str> {
        if self.handed_off.load(Ordering::Relaxed) {
            return Err("this Atlas handed its clients over to the next one");
        }
        match lock(&self.table).clients.get(&id) {
            Some(Entry { state: State::Stale { .. }, pubkey, .. }) => Ok(pubkey.clone()),
            Some(_) => Err("that client is still connected"),
            None => Err("unknown or expired client id"),
        }
    }

    /// A stale client proved itself: it is live on `worker` again. Returns
    /// its route and the packets missed meanwhile (`None`: it expired or
    /// came back elsewhere in the meantime).
    pub fn revive(&self, id: u64, worker: usize) -> Option<(Arc<AtomicUsize>, VecDeque<Vec<u8>>)> {
        let mut t = lock(&self.table);
        let e = t.clients.get_mut(&id)?;
        let State::Stale { missed, .. } = std::mem::replace(&mut e.state, State::Live { worker }) else {
            // Not stale: put nothing back (it was live, leave it so).
            return None;
        };
        let route = e.route.clone();
        t.nstale -= 1;
        drop(t);
        self.stats.reconnected.fetch_add(1, Ordering::Relaxed);
        if self.settings.load().notices.reconnect {
            if let Some(l) = self.links.get(route.load(Ordering::Relaxed)) {
                l.push(id, FLAG_RECONNECT, b"");
            }
        }
        Some((route, missed))
    }

    /// The socket of live client `id` on `worker` closed: it goes stale
    /// (or fails at once when nothing can wait for it).
    pub fn disconnected(&self, id: u64, worker: usize) {
        let s = self.settings.load();
        let now = Instant::now();
        let mut failed = Vec::new();
        {
            let mut t = lock(&self.table);
            let Some(e) = t.clients.get_mut(&id) else { return };
            if !matches!(e.state, State::Live { worker: w } if w == worker) {
                return;
            }
            if s.max_stale_clients == 0 || s.stale_timeout.is_zero() {
                failed.push((id, "disconnected (stale clients are not kept: stale_timeout_secs or max_stale_clients is 0)"));
            } else {
                e.state = State::Stale { since: now, missed: VecDeque::new() };
                t.nstale += 1;
                t.stale.push_back((id, now));
                // Over the bound: the oldest stale clients go.
                failed.extend(t.evict_over(s.max_stale_clients));
            }
        }
        if s.notices.disconnect {
            if let Some(l) = self.link_of(id) {
                l.push(id, FLAG_DISCONNECT, b"");
            }
        }
        for (id, why) in failed {
            self.fail(id, why);
        }
    }

    fn link_of(&self, id: u64) -> Option<&Arc<Link>> {
        let m = lock(&self.table).clients.get(&id)?.route.load(Ordering::Relaxed);
        self.links.get(m)
    }

    /// Forgets `id` and tells its master why (flag 0x01).
    pub fn fail(&self, id: u64, why: &str) {
        let Some(e) = self.forget(id) else { return };
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(client = id, reason = why, "firehose: client failed");
        if let Some(l) = self.links.get(e.route.load(Ordering::Relaxed)) {
            l.push(id, FLAG_FAILURE, why.as_bytes());
        }
    }

    /// Removes `id` from the table (no notice).
    pub fn forget(&self, id: u64) -> Option<Entry> {
        let mut t = lock(&self.table);
        let e = t.clients.remove(&id)?;
        if matches!(e.state, State::Stale { .. }) {
            t.nstale -= 1;
        }
        drop(t);
        if let Some(l) = self.links.get(e.route.load(Ordering::Relaxed)) {
            l.clients.fetch_sub(1, Ordering::Relaxed);
        }
        Some(e)
    }

    /// Fails the stale clients older than `stale_timeout_secs`.
    pub fn reap(&self, now: Instant) {
        if self.handed_off.load(Ordering::Relaxed) {
            return;
        }
        let timeout = self.settings.load().stale_timeout;
        let mut expired = Vec::new();
        {
            let mut t = lock(&self.table);
            while let Some(&(id, since)) = t.stale.front() {
                if now.saturating_duration_since(since) < timeout {
                    break;
                }
                t.stale.pop_front();
                if matches!(t.clients.get(&id), Some(Entry { state: State::Stale { since: s, .. }, .. }) if *s == since) {
                    expired.push(id);
                }
            }
        }
        for id in expired {
            self.fail(id, "stale timeout: the client did not reconnect within stale_timeout_secs");
        }
    }

    /// Routes one batch of master packets (flag 0x00 and 0x02) to the
    /// clients' workers, buffering for stale ones; failures (unknown id,
    /// buffering off or full) go back to the master as 0x01.
    pub fn deliver(&self, link: &Link, packets: &mut Vec<(u64, u8, Vec<u8>)>) {
        if self.handed_off.load(Ordering::Relaxed) {
            // The clients are the next Atlas' now: failing them here would
            // make their master forget them.
            tracing::debug!(packets = packets.len(), master = %link.addr, "firehose: master packets after the hand-over dropped");
            packets.clear();
            return;
        }
        let s = self.settings.load();
        let mut per_worker: HashMap<usize, Vec<Delivery>> = HashMap::new();
        let mut failures: Vec<(u64, &'static str)> = Vec::new();
        let mut kicked = Vec::new();
        {
            let mut t = lock(&self.table);
            for (id, flag, data) in packets.drain(..) {
                let Some(e) = t.clients.get_mut(&id) else {
                    if flag == FLAG_DATA {
                        link.push(id, FLAG_FAILURE, b"unknown client id");
                    }
                    continue;
                };
                if flag == wire::FLAG_KICK {
                    if let State::Live { worker } = e.state {
                        per_worker.entry(worker).or_default().push(Delivery::Kick(id));
                    }
                    kicked.push(id);
                    continue;
                }
                match &mut e.state {
                    State::Live { worker } => per_worker.entry(*worker).or_default().push(Delivery::Data(id, data)),
                    State::Stale { missed, .. } => {
                        if s.missed_packets_buffer_size == 0 {
                            failures.push((id, "the client is disconnected and missed-packet buffering is off (missed_packets_buffer_size = 0)"));
                        } else if missed.len() >= s.missed_packets_buffer_size {
                            failures.push((id, "missed-packet buffer overflow while the client was disconnected"));
                        } else {
                            missed.push_back(data);
                        }
                    }
                }
            }
        }
        for id in kicked {
            if self.forget(id).is_some() {
                self.stats.kicked.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client = id, "firehose: client kicked by its master");
            }
        }
        for (id, why) in failures {
            self.fail(id, why);
        }
        for (worker, items) in per_worker {
            let n = items.iter().filter(|d| matches!(d, Delivery::Data(..))).count() as u64;
            self.stats.to_clients.fetch_add(n, Ordering::Relaxed);
            match self.mailbox(worker) {
                Some(mb) => {
                    let was_empty = {
                        let mut q = lock(&mb.q);
                        let e = q.is_empty();
                        q.extend(items);
                        e
                    };
                    if was_empty {
                        mb.bell.ring();
                    }
                }
                None => tracing::warn!(worker, "internal: firehose packets for a worker without a mailbox dropped"),
            }
        }
    }

    /// A packet that reached a worker after its client left it: buffered
    /// if the client is stale, forwarded if it is live elsewhere.
    pub fn requeue(&self, id: u64, data: Vec<u8>) {
        let s = self.settings.load();
        let mut fail = None;
        let mut forward = None;
        {
            let mut t = lock(&self.table);
            match t.clients.get_mut(&id).map(|e| &mut e.state) {
                Some(State::Stale { missed, .. }) if missed.len() < s.missed_packets_buffer_size => missed.push_back(data),
                Some(State::Stale { .. }) => fail = Some("missed-packet buffer overflow (or buffering off) while the client was disconnected"),
                Some(State::Live { worker }) => forward = Some((*worker, data)),
                None => {}
            }
        }
        if let Some(why) = fail {
            self.fail(id, why);
        }
        if let Some((w, data)) = forward {
            if let Some(mb) = self.mailbox(w) {
                lock(&mb.q).push(Delivery::Data(id, data));
                mb.bell.ring();
            }
        }
    }

    /// Link `failed` went down: with `failover`, its clients move to the
    /// other masters that are up (each gets a 0x03 notice there) and the
    /// packets queued for it follow them.
    ///
    /// Every outbox is held (in link order; workers lock one at a time)
    /// while routes change and packets move. A worker that read the old
    /// route finds it changed once it has the outbox and retries, so no
    /// frame lands in the emptied outbox; one that reads a new route waits
    /// for the moved packets to be queued first, so a client's frames reach
    /// its new master in order.
    pub fn fail_over(&self, failed: &Link) {
        if !self.settings.load().failover {
            return;
        }
        let up: Vec<usize> = self.links.iter().filter(|l| l.index != failed.index && l.up.load(Ordering::Relaxed)).map(|l| l.index).collect();
        if up.is_empty() {
            return;
        }
        let mut moved = 0usize;
        let mut woken = vec![false; self.links.len()];
        {
            let t = lock(&self.table);
            let mut outs: Vec<MutexGuard<'_, Outbox>> = self.links.iter().map(|l| lock(&l.out)).collect();
            let mut queue = |outs: &mut Vec<MutexGuard<'_, Outbox>>, to: usize, id: u64, flag: u8, data: &[u8]| {
                woken[to] |= outs[to].bytes.is_empty();
                wire::push_tagged(&mut outs[to].bytes, id, flag, data);
                outs[to].packets += 1;
            };
            for (&id, e) in t.clients.iter() {
                if e.route.load(Ordering::Relaxed) != failed.index {
                    continue;
                }
                let Some(&to) = up.iter().min_by_key(|&&i| self.links[i].clients.load(Ordering::Relaxed)) else { break };
                e.route.store(to, Ordering::Relaxed);
                failed.clients.fetch_sub(1, Ordering::Relaxed);
                self.links[to].clients.fetch_add(1, Ordering::Relaxed);
                queue(&mut outs, to, id, FLAG_RECONNECT, b"");
                moved += 1;
            }
            let pending = std::mem::take(&mut *outs[failed.index]);
            let mut rest = &pending.bytes[..];
            while let Ok(Some((s, e))) = wire::next_frame(rest, usize::MAX) {
                if let Ok(p) = wire::parse_tagged(&rest[s..e]) {
                    // A client no longer in the table (failed, kicked):
                    // its notice waits for its own master.
                    let to = t.clients.get(&p.id).map_or(failed.index, |c| c.route.load(Ordering::Relaxed));
                    queue(&mut outs, to, p.id, p.flag, p.data);
                }
                rest = &rest[e..];
            }
        }
        for (i, l) in self.links.iter().enumerate() {
            if woken[i] {
                l.bell.ring();
            }
        }
        if moved > 0 {
            tracing::warn!(master = %failed.addr, clients = moved, "firehose: master link down; its clients failed over to the other masters");
        }
    }
}
