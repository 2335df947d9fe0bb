//! The server registry: game servers that registered (Horizon's API or the
//! seed's), their heartbeats and status, the players Atlas carries, and the
//! settings in force. One per process ([`registry()`]).
//!
//! Writers (the API thread, the monitor thread) change the state under a
//! mutex and publish an immutable [`World`] snapshot; workers read the
//! snapshot (an `ArcSwap` load) when they route or re-check a player, never
//! the mutex. A server's live player count is an atomic shared by all the
//! snapshots that list it. The registry is written to `[spatial] snapshot`
//! on every membership change and read back at start-up, so a restart does
//! not forget the fleet.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use atlas_config::Spatial;
use serde_json::{json, Value};

use crate::position::{default_rules, Point, Rule};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Heartbeating and taking players.
    Up,
    /// Missed its heartbeats: no new players; its players are moved.
    Down,
    /// Drained by an operator: no new players; its players are moved and
    /// its next heartbeat answer carries `PrepareShutdown`.
    Draining,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "up",
            Status::Down => "down",
            Status::Draining => "draining",
        }
    }
}

/// One registered server as workers see it (immutable; a change publishes
/// a new [`World`]).
#[derive(Debug, Clone)]
pub struct Server {
    pub id: String,
    pub name: String,
    /// As registered (`host:port`).
    pub address: String,
    pub addr: SocketAddr,
    pub region: [i64; 3],
    pub center: Point,
    /// Half-extent of its cube.
    pub bounds: f64,
    pub capacity: u32,
    pub version: String,
    pub metadata: Value,
    pub status: Status,
    /// Its last heartbeat said it accepts connections.
    pub accepting: bool,
    /// Players Atlas has on it now (all workers).
    pub live: Arc<AtomicI64>,
}

impl Server {
    pub fn players(&self) -> i64 {
        self.live.load(Ordering::Relaxed)
    }
}

/// The published view of the fleet.
#[derive(Debug, Default)]
pub struct World {
    /// Bumped on every change, so a session knows to re-check its server.
    pub version: u64,
    pub servers: Vec<Arc<Server>>,
}

impl World {
    pub fn get(&self, id: &str) -> Option<&Arc<Server>> {
        self.servers.iter().find(|s| s.id == id)
    }
}

/// Settings in force, derived from `[spatial]` (replaced by a reload).
pub struct Settings {
    pub spatial: Spatial,
    pub rules: Vec<Rule>,
    pub token_key: ring::hmac::Key,
}

/// A player Atlas carries, as the API and the dashboard see it. The
/// session owns the truth; it publishes its position (relaxed stores,
/// no lock) and polls `force` for an operator's transfer.
pub struct Player {
    pub id: String,
    pub worker: usize,
    pos: [AtomicU64; 3],
    pub server: Mutex<String>,
    pub since_ms: u64,
    /// A forced transfer: the target server id.
    pub force: Mutex<Option<String>>,
    pub forced: AtomicBool,
}

impl Player {
    pub fn set_position(&self, p: Point) {
        self.pos[0].store(p.x.to_bits(), Ordering::Relaxed);
        self.pos[1].store(p.y.to_bits(), Ordering::Relaxed);
        self.pos[2].store(p.z.to_bits(), Ordering::Relaxed);
    }

    pub fn position(&self) -> Point {
        let f = |i: usize| f64::from_bits(self.pos[i].load(Ordering::Relaxed));
        Point { x: f(0), y: f(1), z: f(2) }
    }

    pub fn server(&self) -> String {
        self.server.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Mutable per-server bookkeeping behind the mutex.
struct Entry {
    server: Server,
    last_heartbeat: Instant,
    heartbeats: u64,
    load: f64,
    reported_players: u64,
    avg_tick_ms: f64,
    memory_bytes: u64,
    registered_ms: u64,
    /// Commands for its next heartbeat answer.
    commands: Vec<Value>,
    /// Registered with another Atlas of the fleet (learnt through the
    /// shared store): its liveness is that instance's lease, not our clock.
    remote: bool,
}

#[derive(Default)]
struct State {
    servers: Vec<Entry>,
    version: u64,
    /// Auto-scale: last request per region.
    scale_requests: HashMap<[i64; 3], Instant>,
}

/// A transfer that happened, for the dashboard.
#[derive(Clone, Debug)]
pub struct TransferEvent {
    pub at_ms: u64,
    pub player: String,
    pub from: String,
    pub to: String,
    pub switch_us: u64,
    pub ok: bool,
    pub reason: &'static str,
}

pub struct Registry {
    state: Mutex<State>,
    world: ArcSwap<World>,
    settings: ArcSwap<Settings>,
    players: Mutex<HashMap<String, Arc<Player>>>,
    transfers: Mutex<VecDeque<TransferEvent>>,
    /// Auto-scale wishes from workers: (region, reason).
    wishes: Mutex<Vec<([i64; 3], &'static str)>>,
    pub heartbeats: AtomicU64,
    pub heartbeats_unknown: AtomicU64,
    pub servers_marked_down: AtomicU64,
    pub scale_requests_sent: AtomicU64,
    pub scale_requests_failed: AtomicU64,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// The process's registry (default settings until [`Registry::configure`]).
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init(|| Registry {
        state: Mutex::new(State::default()),
        world: ArcSwap::from_pointee(World::default()),
        settings: ArcSwap::from_pointee(settings_for(&Spatial::default())),
        players: Mutex::new(HashMap::new()),
        transfers: Mutex::new(VecDeque::new()),
        wishes: Mutex::new(Vec::new()),
        heartbeats: AtomicU64::new(0),
        heartbeats_unknown: AtomicU64::new(0),
        servers_marked_down: AtomicU64::new(0),
        scale_requests_sent: AtomicU64::new(0),
        scale_requests_failed: AtomicU64::new(0),
    })
}

fn settings_for(s: &Spatial) -> Settings {
    let secret: Vec<u8> = match &s.token_secret {
        Some(k) => k.as_bytes().to_vec(),
        None => {
            let mut k = [0u8; 32];
            let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k);
            k.to_vec()
        }
    };
    Settings {
        spatial: s.clone(),
        rules: if s.positions.is_empty() { default_rules() } else { s.positions.clone() },
        token_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a registration carries (both API shapes map to it).
#[derive(Debug, Clone)]
pub struct Registration {
    /// Chosen by the server (seed shape) or by Atlas (Horizon shape).
    pub id: Option<String>,
    pub name: String,
    pub address: String,
    pub region: [i64; 3],
    pub center: Point,
    pub bounds: f64,
    pub capacity: u32,
    pub version: String,
    pub metadata: Value,
}

/// A heartbeat's figures.
#[derive(Debug, Clone, Default)]
pub struct Beat {
    pub current_connections: u64,
    pub load: f64,
    pub accepting: bool,
    pub avg_tick_ms: f64,
    pub memory_bytes: u64,
}

fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Ok(a);
    }
    address.to_socket_addrs().map_err(|e| format!("cannot resolve `{address}`: {e}"))?.next().ok_or_else(|| format!("`{address}` resolves to nothing"))
}

fn new_id() -> String {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    format!("srv-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

impl Registry {
    /// Applies `[spatial]` (start-up and reloads). The token key is kept
    /// when the secret did not change (tokens in flight stay valid).
    pub fn configure(&self, s: &Spatial) {
        let old = self.settings.load();
        let mut next = settings_for(s);
        if old.spatial.token_secret == s.token_secret {
            next.token_key = old.token_key.clone();
        }
        self.settings.store(Arc::new(next));
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    pub fn world(&self) -> arc_swap::Guard<Arc<World>> {
        self.world.load()
    }

    fn publish(&self, st: &mut State) {
        st.version += 1;
        let servers = st.servers.iter().map(|e| Arc::new(e.server.clone())).collect();
        self.world.store(Arc::new(World { version: st.version, servers }));
    }

    /// Registers (or re-registers: same id, or same name and address) a server.
    pub fn register(&self, r: Registration) -> Result<(Arc<Server>, bool), String> {
        if r.address.is_empty() {
            return Err("`address` is empty".into());
        }
        if !(r.bounds.is_finite() && r.bounds > 0.0) {
            return Err("`bounds` must be a number > 0".into());
        }
        if ![r.center.x, r.center.y, r.center.z].iter().all(|v| v.is_finite()) {
            return Err("`center` must hold finite numbers".into());
        }
        let addr = resolve(&r.address)?;
        let mut st = lock(&self.state);
        let existing = st.servers.iter().position(|e| match &r.id {
            Some(id) => e.server.id == *id,
            None => e.server.name == r.name && e.server.address == r.address,
        });
        let now = Instant::now();
        // A re-registration keeps its id and its live player count.
        let (id, live) = match existing {
            Some(i) => (st.servers[i].server.id.clone(), st.servers[i].server.live.clone()),
            None => (r.id.unwrap_or_else(new_id), Arc::new(AtomicI64::new(0))),
        };
        let server = Server {
            id,
            name: r.name,
            address: r.address,
            addr,
            region: r.region,
            center: r.center,
            bounds: r.bounds,
            capacity: r.capacity,
            version: r.version,
            metadata: r.metadata,
            status: Status::Up,
            accepting: true,
            live,
        };
        let renewed = match existing {
            Some(i) => {
                let e = &mut st.servers[i];
                e.server = server.clone();
                e.last_heartbeat = now;
                e.remote = false;
                true
            }
            None => {
                st.servers.push(Entry {
                    server: server.clone(),
                    last_heartbeat: now,
                    heartbeats: 0,
                    load: 0.0,
                    reported_players: 0,
                    avg_tick_ms: 0.0,
                    memory_bytes: 0,
                    registered_ms: atlas_observe::now_ms(),
                    commands: Vec::new(),
                    remote: false,
                });
                false
            }
        };
        self.publish(&mut st);
        self.save(&st);
        drop(st);
        atlas_observe::events::record(
            "info",
            "game",
            format!(
                "server {} ({}) {} at {} for region {:?}",
                server.id,
                server.name,
                if renewed { "re-registered" } else { "registered" },
                server.address,
                server.region
            ),
        );
        Ok((Arc::new(server), renewed))
    }

    /// Records a heartbeat; returns the commands for the server, or `None`
    /// for an unknown id (the server should register again).
    pub fn heartbeat(&self, id: &str, beat: &Beat) -> Option<Vec<Value>> {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&self.state);
        let Some(e) = st.servers.iter_mut().find(|e| e.server.id == id) else {
            self.heartbeats_unknown.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        e.last_heartbeat = Instant::now();
        e.heartbeats += 1;
        // A server of another instance heartbeating here: ours from now on.
        e.remote = false;
        e.load = if beat.load.is_finite() { beat.load } else { 0.0 };
        e.reported_players = beat.current_connections;
        e.avg_tick_ms = if beat.avg_tick_ms.is_finite() { beat.avg_tick_ms } else { 0.0 };
        e.memory_bytes = beat.memory_bytes;
        let mut commands = std::mem::take(&mut e.commands);
        let mut changed = e.server.accepting != beat.accepting;
        e.server.accepting = beat.accepting;
        match e.server.status {
            Status::Down => {
                e.server.status = Status::Up;
                changed = true;
                atlas_observe::events::record("info", "game", format!("server {} is heartbeating again: up", e.server.id));
            }
            Status::Draining => commands.push(json!({"type": "PrepareShutdown", "deadline_secs": 30})),
            Status::Up => {}
        }
        if changed {
            self.publish(&mut st);
        }
        Some(commands)
    }

    /// Removes a server; its players are moved by their sessions.
    pub fn unregister(&self, id: &str) -> bool {
        let mut st = lock(&self.state);
        let before = st.servers.len();
        st.servers.retain(|e| e.server.id != id);
        let removed = st.servers.len() != before;
        if removed {
            self.publish(&mut st);
            self.save(&st);
            atlas_observe::events::record("info", "game", format!("server {id} unregistered"));
        }
        removed
    }

    /// Drains (`true`) or re-enables a server. False for an unknown id.
    pub fn set_draining(&self, id: &str, draining: bool) -> bool {
        let mut st = lock(&self.state);
        let Some(e) = st.servers.iter_mut().find(|e| e.server.id == id) else { return false };
        // A draining server's every heartbeat answer carries PrepareShutdown
        // (see `heartbeat`).
        e.server.status = if draining { Status::Draining } else { Status::Up };
        if !draining {
            e.last_heartbeat = Instant::now();
        }
        self.publish(&mut st);
        self.save(&st);
        true
    }

    /// Marks servers whose heartbeats stopped as down. Run by the monitor.
    pub fn check_heartbeats(&self, now: Instant) {
        let s = self.settings();
        let limit = s.spatial.heartbeat_interval * s.spatial.heartbeat_misses;
        let mut st = lock(&self.state);
        let mut changed = false;
        for e in st.servers.iter_mut() {
            if !e.remote && e.server.status == Status::Up && now.saturating_duration_since(e.last_heartbeat) > limit {
                e.server.status = Status::Down;
                changed = true;
                self.servers_marked_down.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(server = %e.server.id, name = %e.server.name, missed = ?limit, "upstream: game server missed its heartbeats; marked down, moving its players");
                atlas_observe::events::record("warn", "game", format!("server {} ({}) missed heartbeats for {limit:?}: down", e.server.id, e.server.name));
            }
        }
        if changed {
            self.publish(&mut st);
        }
    }

    /// JSON view of every server (for the API and the dashboard).
    pub fn servers_json(&self) -> Vec<Value> {
        let st = lock(&self.state);
        let now = Instant::now();
        st.servers.iter().map(|e| entry_json(e, now)).collect()
    }

    pub fn server_json(&self, id: &str) -> Option<Value> {
        let st = lock(&self.state);
        st.servers.iter().find(|e| e.server.id == id).map(|e| entry_json(e, Instant::now()))
    }

    /// The servers whose regions touch `s`'s (for `adjacent_servers`).
    pub fn adjacent(&self, s: &Server) -> Vec<Value> {
        let w = self.world();
        w.servers
            .iter()
            .filter(|o| o.id != s.id && s.region.iter().zip(o.region.iter()).all(|(a, b)| (a - b).abs() <= 1))
            .map(|o| json!({"server_id": o.id, "address": o.address, "region_coord": {"x": o.region[0], "y": o.region[1], "z": o.region[2]}}))
            .collect()
    }

    // ---- players ------------------------------------------------------

    /// Adds a player (a later session with the same id replaces the entry).
    pub fn add_player(&self, id: &str, worker: usize, server: &str, pos: Option<Point>) -> Arc<Player> {
        let p = Arc::new(Player {
            id: id.to_string(),
            worker,
            pos: Default::default(),
            server: Mutex::new(server.to_string()),
            since_ms: atlas_observe::now_ms(),
            force: Mutex::new(None),
            forced: AtomicBool::new(false),
        });
        p.set_position(pos.unwrap_or(Point { x: f64::NAN, y: f64::NAN, z: f64::NAN }));
        lock(&self.players).insert(id.to_string(), p.clone());
        p
    }

    pub fn remove_player(&self, p: &Arc<Player>) {
        let mut players = lock(&self.players);
        if players.get(&p.id).is_some_and(|x| Arc::ptr_eq(x, p)) {
            players.remove(&p.id);
        }
    }

    pub fn player(&self, id: &str) -> Option<Arc<Player>> {
        lock(&self.players).get(id).cloned()
    }

    pub fn players(&self) -> Vec<Arc<Player>> {
        lock(&self.players).values().cloned().collect()
    }

    /// Asks a player's session to move to `server` (an operator's transfer).
    pub fn force_transfer(&self, player: &str, server: &str) -> Result<(), String> {
        let p = self.player(player).ok_or_else(|| format!("no player `{player}` is connected"))?;
        if self.world().get(server).is_none() {
            return Err(format!("no server `{server}` is registered"));
        }
        *lock(&p.force) = Some(server.to_string());
        p.forced.store(true, Ordering::Release);
        Ok(())
    }

    pub fn record_transfer(&self, t: TransferEvent) {
        if let Ok(mut list) = self.transfers.try_lock() {
            if list.len() >= 100 {
                list.pop_front();
            }
            list.push_back(t);
        }
    }

    pub fn recent_transfers(&self, limit: usize) -> Vec<TransferEvent> {
        let list = lock(&self.transfers);
        list.iter().skip(list.len().saturating_sub(limit)).cloned().collect()
    }

    // ---- auto-scale ---------------------------------------------------

    /// A worker saw a player in an uncovered or crowded region.
    pub fn wish_server(&self, region: [i64; 3], reason: &'static str) {
        if let Ok(mut w) = self.wishes.try_lock() {
            if w.len() < 1024 && !w.iter().any(|(r, _)| *r == region) {
                w.push((region, reason));
            }
        }
    }

    /// The wishes that are due (not requested within the cooldown), marked
    /// as requested now. Run by the monitor.
    pub fn due_wishes(&self, now: Instant) -> Vec<([i64; 3], &'static str)> {
        let wishes = std::mem::take(&mut *lock(&self.wishes));
        let cooldown = self.settings().spatial.scale_cooldown;
        let mut st = lock(&self.state);
        let mut due = Vec::new();
        for (region, reason) in wishes {
            let recent = st.scale_requests.get(&region).is_some_and(|t| now.saturating_duration_since(*t) < cooldown);
            if !recent {
                st.scale_requests.insert(region, now);
                due.push((region, reason));
            }
        }
        due
    }

    // ---- snapshot -----------------------------------------------------

    fn save(&self, st: &State) {
        let Some(path) = self.settings().spatial.snapshot.clone() else { return };
        let servers: Vec<Value> = st
            .servers
            .iter()
            .map(|e| {
                let s = &e.server;
                json!({"id": s.id, "name": s.name, "address": s.address, "region": s.region, "center": [s.center.x, s.center.y, s.center.z],
                       "bounds": s.bounds, "capacity": s.capacity, "version": s.version, "metadata": s.metadata,
                       "draining": s.status == Status::Draining, "registered_ms": e.registered_ms})
            })
            .collect();
        let text = json!({"format": 1, "servers": servers}).to_string();
        if let Err(e) = write_atomically(&path, text.as_bytes()) {
            tracing::warn!(path = %path.display(), error = %e, "internal: cannot write the registry snapshot");
        }
    }

    /// Loads the snapshot at start-up; returns how many servers it held.
    /// Restored servers count as heartbeating now (they get the usual
    /// grace period before being marked down).
    pub fn restore(&self, path: &Path) -> Result<usize, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{} is not a registry snapshot: {e}", path.display()))?;
        let list = v.get("servers").and_then(Value::as_array).ok_or_else(|| format!("{}: no `servers` list", path.display()))?;
        let mut n = 0;
        for s in list {
            let f = |k: &str| s.get(k).and_then(Value::as_f64);
            let arr = |k: &str| s.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
            let region: Vec<i64> = arr("region").iter().filter_map(Value::as_i64).collect();
            let center: Vec<f64> = arr("center").iter().filter_map(Value::as_f64).collect();
            let (Some(id), Some(address), [rx, ry, rz], [cx, cy, cz], Some(bounds)) =
                (s.get("id").and_then(Value::as_str), s.get("address").and_then(Value::as_str), region.as_slice(), center.as_slice(), f("bounds"))
            else {
                tracing::warn!(entry = %s, "internal: skipping a malformed registry snapshot entry");
                continue;
            };
            let r = Registration {
                id: Some(id.to_string()),
                name: s.get("name").and_then(Value::as_str).unwrap_or(id).to_string(),
                address: address.to_string(),
                region: [*rx, *ry, *rz],
                center: Point { x: *cx, y: *cy, z: *cz },
                bounds,
                capacity: s.get("capacity").and_then(Value::as_u64).unwrap_or(1000).min(u32::MAX as u64) as u32,
                version: s.get("version").and_then(Value::as_str).unwrap_or("").to_string(),
                metadata: s.get("metadata").cloned().unwrap_or(Value::Null),
            };
            match self.register(r) {
                Ok(_) => {
                    n += 1;
                    if s.get("draining").and_then(Value::as_bool) == Some(true) {
                        self.set_draining(id, true);
                    }
                }
                Err(e) => tracing::warn!(server = id, error = %e, "internal: cannot restore a server from the snapshot"),
            }
        }
        Ok(n)
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

impl Registry {
    /// Servers that may take a new room, with the players they report (or
    /// Atlas carries, if more); `region` marks those whose registration
    /// `metadata.region` matches.
    pub fn room_candidates(&self, region: Option<&str>) -> Vec<atlas_store::Candidate> {
        let st = lock(&self.state);
        st.servers
            .iter()
            .filter(|e| e.server.status == Status::Up && e.server.accepting && e.server.capacity > 0)
            .map(|e| atlas_store::Candidate {
                id: e.server.id.clone(),
                address: e.server.address.clone(),
                capacity: e.server.capacity,
                players: e.reported_players.max(e.server.players().max(0) as u64),
                preferred: region.is_some_and(|r| e.server.metadata.get("region").and_then(Value::as_str) == Some(r)),
            })
            .collect()
    }

    /// Adds a command to a server's next heartbeat answer.
    /// Queues `cmd` for the next heartbeat answer of `id` when it is
    /// registered with this instance; false otherwise (not here, or remote).
    pub fn queue_command(&self, id: &str, cmd: Value) -> bool {
        let mut st = lock(&self.state);
        match st.servers.iter_mut().find(|e| e.server.id == id && !e.remote) {
            Some(e) => {
                e.commands.push(cmd);
                true
            }
            None => false,
        }
    }

    /// The records of the servers registered here (for the shared store).
    pub fn local_records(&self) -> Vec<(String, Value)> {
        let st = lock(&self.state);
        let now = Instant::now();
        st.servers.iter().filter(|e| !e.remote).map(|e| (e.server.id.clone(), entry_json(e, now))).collect()
    }

    /// Takes in the fleet's servers from the shared store: those registered
    /// with other instances are added or updated (as remote), remote ones
    /// no longer there (lease expired, unregistered) are removed. Local
    /// servers are left alone.
    pub fn merge_remote(&self, records: &[Value]) {
        let mut st = lock(&self.state);
        let mut changed = false;
        let mut seen = Vec::new();
        for v in records {
            let Some(server) = server_from_record(v) else { continue };
            seen.push(server.id.clone());
            match st.servers.iter_mut().find(|e| e.server.id == server.id) {
                Some(e) if !e.remote => {}
                Some(e) => {
                    e.reported_players = v["reported_connections"].as_u64().unwrap_or(0);
                    let same = e.server.status == server.status
                        && e.server.accepting == server.accepting
                        && e.server.address == server.address
                        && e.server.capacity == server.capacity;
                    if !same {
                        let live = e.server.live.clone();
                        e.server = Server { live, ..server };
                        changed = true;
                    }
                }
                None => {
                    st.servers.push(Entry {
                        server,
                        last_heartbeat: Instant::now(),
                        heartbeats: 0,
                        load: v["load"].as_f64().unwrap_or(0.0),
                        reported_players: v["reported_connections"].as_u64().unwrap_or(0),
                        avg_tick_ms: 0.0,
                        memory_bytes: 0,
                        registered_ms: v["registered_ms"].as_u64().unwrap_or(0),
                        commands: Vec::new(),
                        remote: true,
                    });
                    changed = true;
                }
            }
        }
        let before = st.servers.len();
        st.servers.retain(|e| !e.remote || seen.contains(&e.server.id));
        changed |= st.servers.len() != before;
        if changed {
            self.publish(&mut st);
        }
    }
}

/// A server from its shared-store record (`entry_json`'s shape).
fn server_from_record(v: &Value) -> Option<Server> {
    let f = |k: &str| v["center"][k].as_f64();
    let address = v["address"].as_str()?.to_string();
    Some(Server {
        id: v["server_id"].as_str()?.to_string(),
        name: v["name"].as_str().unwrap_or("").to_string(),
        addr: resolve(&address).ok()?,
        address,
        region: [v["region_coord"]["x"].as_i64()?, v["region_coord"]["y"].as_i64()?, v["region_coord"]["z"].as_i64()?],
        center: Point { x: f("x")?, y: f("y")?, z: f("z")? },
        bounds: v["bounds"].as_f64()?,
        capacity: v["capacity"].as_u64().unwrap_or(0).min(u64::from(u32::MAX)) as u32,
        version: v["version"].as_str().unwrap_or("").to_string(),
        metadata: v["metadata"].clone(),
        status: match v["status"].as_str() {
            Some("down") => Status::Down,
            Some("draining") => Status::Draining,
            _ => Status::Up,
        },
        accepting: v["accepting_connections"].as_bool().unwrap_or(true),
        live: Arc::new(AtomicI64::new(0)),
    })
}

fn entry_json(e: &Entry, now: Instant) -> Value {
    let s = &e.server;
    json!({
        "server_id": s.id, "name": s.name, "address": s.address,
        "region_coord": {"x": s.region[0], "y": s.region[1], "z": s.region[2]},
        "center": {"x": s.center.x, "y": s.center.y, "z": s.center.z},
        "bounds": s.bounds, "capacity": s.capacity, "version": s.version, "metadata": s.metadata,
        "status": s.status.as_str(), "accepting_connections": s.accepting,
        "players": s.players(), "reported_connections": e.reported_players, "load": e.load,
        "avg_tick_ms": e.avg_tick_ms, "memory_bytes": e.memory_bytes,
        "heartbeats": e.heartbeats, "last_heartbeat_secs_ago": now.saturating_duration_since(e.last_heartbeat).as_secs_f64(),
        "registered_ms": e.registered_ms,
    })
}

/// Starts the monitor thread: heartbeat checks and auto-scale requests.
pub fn spawn_monitor(api_addr: Option<SocketAddr>) {
    let r = std::thread::Builder::new().name("atlas-game".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        let reg = registry();
        let now = Instant::now();
        reg.check_heartbeats(now);
        let due = reg.due_wishes(now);
        if !due.is_empty() {
            let s = reg.settings();
            for (region, reason) in due {
                crate::maestro::request(&s.spatial, api_addr, region, reason);
            }
        }
    });
    if let Err(e) = r {
        tracing::error!(error = %e, "internal: cannot start the game monitor thread");
    }
}

#[cfg(test)]
pub(crate) fn test_server(id: &str, region: [i64; 3], size: f64) -> Server {
    Server {
        id: id.into(),
        name: id.into(),
        address: "127.0.0.1:1".into(),
        addr: "127.0.0.1:1".parse().unwrap(),
        region,
        center: crate::spatial::region_center(region, size),
        bounds: size / 2.0,
        capacity: 100,
        version: String::new(),
        metadata: Value::Null,
        status: Status::Up,
        accepting: true,
        live: Arc::new(AtomicI64::new(0)),
    }
}
