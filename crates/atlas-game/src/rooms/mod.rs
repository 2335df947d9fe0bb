//! The room gateway (seed 002): rooms placed on the least-loaded healthy
//! game server, the mapping kept in the room store (`atlas-store`: memory,
//! or Redis shared by a fleet of Atlas instances), joins through Atlas
//! (`/rooms/{id}` on the game listener) or direct with a signed join token,
//! cleanup of empty rooms from the servers' heartbeat reports, and
//! migration when a server dies.
//!
//! Threads: the API thread calls the store (blocking, bounded by
//! `[store] timeout`); the `atlas-rooms` thread sweeps, migrates, syncs the
//! shared server registry and fetches rooms for workers; workers only read
//! the store's local cache ([`RoomStore::cached`]) and, on a miss, ask the
//! rooms thread and poll the cache (a join waits, a worker never blocks).

pub mod api;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use atlas_config::{Config, StoreBackend};
use atlas_store::{MemoryStore, RedisStore, Room, RoomStore};
use serde_json::json;

use crate::registry::{registry, Status};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per-client-IP token buckets (burst: the rate, at least 1).
pub struct Limiter {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl Default for Limiter {
    fn default() -> Limiter {
        Limiter::new()
    }
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter { buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes a token for `ip` at `rate` per second (0: unlimited).
    pub fn admit(&self, ip: IpAddr, rate: f64) -> bool {
        if rate <= 0.0 {
            return true;
        }
        let burst = rate.max(1.0);
        let now = Instant::now();
        let mut b = lock(&self.buckets);
        if b.len() > 100_000 {
            b.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = b.entry(ip).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Rooms {
    store: OnceLock<Arc<dyn RoomStore>>,
    settings: ArcSwap<atlas_config::Rooms>,
    store_cfg: ArcSwap<atlas_config::Store>,
    pub creates: Limiter,
    pub joins: Limiter,
    /// Rooms a fetch found missing (workers answer 404 without waiting).
    misses: Mutex<HashMap<String, Instant>>,
    fetches: Mutex<Option<Sender<String>>>,
    /// Counters for `/metrics`.
    pub stats: RoomStats,
}

/// The room gateway's counters (process-wide; rare events, so atomics).
#[derive(Default)]
pub struct RoomStats {
    pub created: AtomicU64,
    /// Refused: no server had room (503 full / no_server).
    pub refused_full: AtomicU64,
    /// Failed: the store was unavailable (503).
    pub store_errors: AtomicU64,
    pub rate_limited: AtomicU64,
    pub deleted: AtomicU64,
    /// Removed by the sweep (empty or unreported past the grace).
    pub cleaned: AtomicU64,
    pub migrated: AtomicU64,
    pub lost: AtomicU64,
    /// Joins through Atlas that reached the room's server.
    pub joins: AtomicU64,
    pub joins_refused: AtomicU64,
}

impl RoomStats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

static ROOMS: OnceLock<Rooms> = OnceLock::new();

/// The process's room gateway.
pub fn rooms() -> &'static Rooms {
    ROOMS.get_or_init(|| Rooms {
        store: OnceLock::new(),
        settings: ArcSwap::from_pointee(atlas_config::Rooms::default()),
        store_cfg: ArcSwap::from_pointee(atlas_config::Store::default()),
        creates: Limiter::new(),
        joins: Limiter::new(),
        misses: Mutex::new(HashMap::new()),
        fetches: Mutex::new(None),
        stats: RoomStats::default(),
    })
}

/// Opens the configured store and starts the rooms thread (once, at
/// start-up). A store that cannot be opened is a config error.
pub fn start(cfg: &Config) -> Result<(), String> {
    let r = rooms();
    r.settings.store(Arc::new(cfg.rooms.clone()));
    r.store_cfg.store(Arc::new(cfg.store.clone()));
    let store: Arc<dyn RoomStore> = match cfg.store.backend {
        StoreBackend::Memory => Arc::new(MemoryStore::open(cfg.store.snapshot.clone())),
        StoreBackend::Redis => {
            let url = cfg.store.url.as_deref().ok_or("config: [store] backend = \"redis\" needs url")?;
            Arc::new(RedisStore::open(url, &cfg.store.prefix, cfg.store.timeout)?)
        }
    };
    if r.store.set(store).is_err() {
        return Ok(());
    }
    let (tx, rx) = channel();
    *lock(&r.fetches) = Some(tx);
    std::thread::Builder::new().name("atlas-rooms".into()).spawn(move || run(rx)).map_err(|e| format!("internal: cannot start the rooms thread: {e}"))?;
    Ok(())
}

/// Applies a reloaded `[rooms]` (the store itself needs a restart).
pub fn configure(cfg: &Config) {
    let r = rooms();
    r.settings.store(Arc::new(cfg.rooms.clone()));
    let old = r.store_cfg.load();
    if old.backend != cfg.store.backend || old.url != cfg.store.url || old.prefix != cfg.store.prefix {
        tracing::warn!("config: [store] changed; the room store is kept until Atlas restarts");
    }
}

impl Rooms {
    pub fn settings(&self) -> Arc<atlas_config::Rooms> {
        self.settings.load_full()
    }

    /// The store (a memory store before [`start`], e.g. in unit tests).
    pub fn store(&self) -> &Arc<dyn RoomStore> {
        self.store.get_or_init(|| Arc::new(MemoryStore::open(None)))
    }

    /// A signed join token for `room`.
    pub fn join_token(&self, room: &Room) -> String {
        let ttl = self.settings().join_token_ttl.as_millis() as u64;
        crate::token::sign_join(&registry().settings().token_key, &room.id, &room.server_id, atlas_observe::now_ms() + ttl)
    }

    /// A worker's lookup: the cached room, `Err(true)` when known missing,
    /// `Err(false)` when a fetch was asked for (poll again).
    pub fn cached_or_fetch(&self, id: &str) -> Result<Room, bool> {
        if let Some(r) = self.store().cached(id) {
            return Ok(r);
        }
        if lock(&self.misses).get(id).is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return Err(true);
        }
        if let Some(tx) = lock(&self.fetches).as_ref() {
            let _ = tx.send(id.to_string());
        }
        Err(false)
    }

    /// Asks the rooms thread to refresh `id` in the cache.
    pub fn refresh(&self, id: &str) {
        if let Some(tx) = lock(&self.fetches).as_ref() {
            let _ = tx.send(id.to_string());
        }
    }

    /// Moves the rooms of `server` (down or gone) to other servers; the new
    /// servers hear of it in their next heartbeat (`RoomMigrated`).
    pub fn migrate_from(&self, server: &str) {
        let store = self.store();
        let rooms = match store.rooms_on(server) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(server, error = %e, "store: cannot list the rooms of a failed server (retrying)");
                return;
            }
        };
        let candidates = registry().room_candidates(None);
        for r in rooms.into_iter().filter(|r| !r.lost) {
            match store.migrate(&r.id, server, &candidates) {
                Ok(Some(m)) if m.lost => {
                    RoomStats::inc(&self.stats.lost);
                    tracing::warn!(room = %r.id, server, "upstream: the room's game server failed and no other server can take the room; it answers 410 until one can");
                }
                Ok(Some(m)) => {
                    RoomStats::inc(&self.stats.migrated);
                    tracing::info!(room = %r.id, from = server, to = %m.server_id, "room migrated off a failed game server");
                    atlas_observe::events::record("warn", "rooms", format!("room {} migrated from {server} to {}", r.id, m.server_id));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(room = %r.id, error = %e, "store: room migration failed (retrying)"),
            }
        }
    }

    /// `RoomMigrated` commands for `server`'s heartbeat answer, and the
    /// commands other instances left for it.
    pub fn announcements(&self, server: &str) -> Vec<serde_json::Value> {
        let store = self.store();
        let mut out: Vec<serde_json::Value> = match store.take_announcements(server) {
            Ok(rooms) => {
                rooms.iter().map(|r| json!({"type": "RoomMigrated", "room_id": r.id, "from_server": r.migrated_from, "capacity": r.capacity})).collect()
            }
            Err(_) => Vec::new(),
        };
        if store.shared() {
            match store.take_commands(server) {
                Ok(c) => out.extend(c),
                Err(e) => tracing::debug!(server, error = %e, "store: commands from other instances not fetched"),
            }
        }
        out
    }

    /// Sends `cmd` to `server` with its next heartbeat answer, through the
    /// store when the server is registered with another instance.
    pub fn tell(&self, server: &str, cmd: serde_json::Value) {
        if registry().queue_command(server, cmd.clone()) {
            return;
        }
        let store = self.store();
        if store.shared() {
            if let Err(e) = store.post_command(server, &cmd) {
                tracing::warn!(server, error = %e, "store: a command for a game server registered elsewhere was not delivered");
            }
        }
    }
}

/// The rooms thread: worker fetches as they come; every 200 ms the shared
/// registry sync and failed-server migration; every second the sweep;
/// every 5 s a scan for lost rooms and rooms on vanished servers.
fn run(rx: Receiver<String>) {
    let r = rooms();
    let mut last_sweep = Instant::now();
    let mut last_lost = Instant::now();
    let mut last_sync = Instant::now() - Duration::from_secs(10);
    let mut up: HashSet<String> = HashSet::new();
    let started = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(id) => {
                fetch(r, &id);
                while let Ok(id) = rx.try_recv() {
                    fetch(r, &id);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let store = r.store();
        if store.shared() && (store.take_servers_changed() || last_sync.elapsed() >= Duration::from_millis(500)) {
            last_sync = Instant::now();
            sync_registry(store.as_ref());
        }
        // Servers that were up and no longer are: their rooms move.
        let world = registry().world();
        let now_up: HashSet<String> = world.servers.iter().filter(|s| s.status != Status::Down).map(|s| s.id.clone()).collect();
        for gone in up.difference(&now_up) {
            r.migrate_from(gone);
        }
        up = now_up;
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            let grace = r.settings().empty_grace.as_millis() as u64;
            match store.sweep(atlas_observe::now_ms(), grace) {
                Ok(gone) => {
                    for g in gone {
                        RoomStats::inc(&r.stats.cleaned);
                        tracing::info!(room = %g.id, server = %g.server_id, "room removed: empty or unreported for longer than empty_grace");
                        r.tell(&g.server_id, json!({"type": "RoomClosed", "room_id": g.id, "reason": "empty"}));
                    }
                }
                Err(e) => tracing::debug!(error = %e, "store: sweep skipped"),
            }
            lock(&r.misses).retain(|_, at| at.elapsed() < Duration::from_secs(5));
        }
        if last_lost.elapsed() >= Duration::from_secs(5) {
            last_lost = Instant::now();
            // Right after a start the servers have not re-registered yet:
            // their rooms are not orphans.
            let s = registry().settings();
            retry_lost(r, started.elapsed() > s.spatial.heartbeat_interval * s.spatial.heartbeat_misses);
        }
    }
}

fn fetch(r: &Rooms, id: &str) {
    match r.store().get(id) {
        Ok(Some(_)) => {
            lock(&r.misses).remove(id);
        }
        Ok(None) => {
            lock(&r.misses).insert(id.to_string(), Instant::now());
        }
        Err(e) => tracing::debug!(room = id, error = %e, "store: room fetch failed"),
    }
}

/// Lost rooms (their server died with nowhere to go) get another chance,
/// and rooms on a server the registry no longer has (gone between two
/// ticks) are moved.
fn retry_lost(r: &Rooms, vanished_too: bool) {
    let store = r.store();
    let mut offset = 0;
    loop {
        let Ok((page, total)) = store.list(offset, 500) else { return };
        let world = registry().world();
        let vanished = |x: &Room| vanished_too && world.get(&x.server_id).is_none_or(|s| s.status == Status::Down);
        for room in page.iter().filter(|x| x.lost || vanished(x)) {
            // A lost room whose server is back stays there.
            let mut c = registry().room_candidates(None);
            c.iter_mut().for_each(|c| c.preferred = c.id == room.server_id);
            if let Ok(Some(m)) = store.migrate(&room.id, &room.server_id, &c) {
                if !m.lost {
                    tracing::info!(room = %m.id, to = %m.server_id, "lost room placed on a server again");
                }
            }
        }
        offset += page.len();
        if page.is_empty() || offset >= total {
            return;
        }
    }
}

/// Publishes this instance's servers under leases and takes in the fleet's.
fn sync_registry(store: &dyn RoomStore) {
    let lease = rooms().store_cfg.load().lease;
    for (id, record) in registry().local_records() {
        if let Err(e) = store.put_server(&id, &record, lease) {
            tracing::debug!(error = %e, "store: cannot publish the server registry");
            return;
        }
    }
    match store.servers() {
        Ok(records) => registry().merge_remote(&records),
        Err(e) => tracing::debug!(error = %e, "store: cannot read the fleet's servers"),
    }
}

/// The room id of a join path `/rooms/{id}` (query ignored).
pub fn room_path(path: &str) -> Option<&str> {
    let p = path.split('?').next().unwrap_or("");
    let id = p.strip_prefix("/rooms/")?.trim_end_matches('/');
    (!id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_paths() {
        assert_eq!(room_path("/rooms/abc-1"), Some("abc-1"));
        assert_eq!(room_path("/rooms/abc?player_id=x"), Some("abc"));
        assert_eq!(room_path("/rooms/"), None);
        assert_eq!(room_path("/rooms/a/b"), None);
        assert_eq!(room_path("/play"), None);
    }

    #[test]
    fn limiter_allows_the_burst_then_the_rate() {
        let l = Limiter::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(l.admit(ip, 2.0));
        assert!(l.admit(ip, 2.0));
        assert!(!l.admit(ip, 2.0));
        assert!(l.admit("10.0.0.2".parse().unwrap(), 2.0), "per IP");
        assert!(l.admit(ip, 0.0), "0 is off");
    }
}
