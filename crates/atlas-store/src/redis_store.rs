//! The Redis backend: rooms and the server registry shared by a fleet of
//! Atlas instances. Uses the `redis` crate's blocking client (no second
//! async runtime; these calls run on control-plane threads).
//!
//! Keys (all under `prefix`):
//! - `room:{id}`: the room as JSON; `rooms`: sorted set of ids by creation;
//! - `srv:{server}`: set of the server's room ids;
//! - `reserved` / `nrooms`: hashes server -> reserved slots / rooms;
//! - `idle`: sorted set of the idle rooms by `idle_since_ms` (what the
//!   sweep reads, so it costs the idle rooms, not all of them);
//! - `server:{id}`: a server's registration as JSON, with a lease (PX) its
//!   owning instance renews on every heartbeat; `servers`: set of ids;
//! - `cmd:{server}`: list of heartbeat commands (JSON) left by other
//!   instances for a server registered elsewhere; expires after a minute;
//! - channel `events`: `room:{id}` / `server:{id}` when one changes.
//!
//! Creation, migration, reports and deletion are WATCH/MULTI transactions
//! (on the reservation hash or the room key): a concurrent change aborts
//! the EXEC and the call reads and decides again. Plain Redis only (the
//! keys of one transaction are not declared for Redis Cluster slots).
//!
//! Availability: each call has `timeout`; after a failure the connection
//! is dropped and new calls fail fast (503 upstream) until a backoff
//! (100 ms doubling to 5 s) allows a reconnect. Reads fall back to the
//! local cache, which the `events` subscription keeps fresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::{Connection, RedisResult};
use serde_json::Value;

use crate::{expired, pick, reported, Candidate, Load, NewRoom, Room, RoomStore, StoreError};

/// How long a cached room is served to workers without a re-read
/// (invalidations usually arrive much sooner).
const CACHE_TTL: Duration = Duration::from_secs(30);
/// Rooms one sweep removes at most (the next sweep, a second later, goes on).
const SWEEP_BATCH: usize = 1000;
/// How long a command waits for its server's next heartbeat.
const COMMAND_TTL: Duration = Duration::from_secs(60);

struct Conn {
    con: Option<Connection>,
    /// No reconnect before this (backoff after a failure).
    retry_at: Instant,
    backoff: Duration,
}

pub struct RedisStore {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    conn: Mutex<Conn>,
    cache: Arc<Mutex<HashMap<String, (Room, Instant)>>>,
    /// Servers changed (an event arrived): the registry should sync now.
    servers_changed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn parse_room(s: Option<String>) -> Option<Room> {
    s.and_then(|s| serde_json::from_str(&s).ok())
}

fn json(r: &Room) -> String {
    serde_json::to_string(r).unwrap_or_default()
}

/// Servers' loads from the `reserved` and `nrooms` hashes.
fn load_from(reserved: HashMap<String, i64>, nrooms: HashMap<String, i64>) -> HashMap<String, Load> {
    let mut out: HashMap<String, Load> = HashMap::new();
    for (k, v) in reserved {
        out.entry(k).or_default().reserved = v.max(0) as u64;
    }
    for (k, v) in nrooms {
        out.entry(k).or_default().rooms = v.max(0) as u64;
    }
    out
}

/// Keeps the `idle` index in step with a room written in `pipe`.
fn index_idle(pipe: &mut redis::Pipeline, idle: &str, r: &Room) {
    match r.idle_since_ms {
        Some(t) if !r.lost => pipe.cmd("ZADD").arg(idle).arg(t).arg(&r.id).ignore(),
        _ => pipe.cmd("ZREM").arg(idle).arg(&r.id).ignore(),
    };
}

impl RedisStore {
    /// A store on `url`; connects lazily (Atlas starts even if Redis is
    /// down) and starts the subscription thread that keeps the cache fresh.
    pub fn open(url: &str, prefix: &str, timeout: Duration) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| format!("config: bad Redis URL {url}: {e}"))?;
        let s = RedisStore {
            client,
            prefix: prefix.to_string(),
            timeout,
            conn: Mutex::new(Conn { con: None, retry_at: Instant::now(), backoff: Duration::from_millis(100) }),
            cache: Arc::new(Mutex::new(HashMap::new())),
            servers_changed: Arc::new(AtomicBool::new(true)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        s.spawn_subscriber();
        Ok(s)
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Runs `f` on the shared connection, (re)connecting when allowed.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Result<T, StoreError> {
        let mut c = lock(&self.conn);
        if c.con.is_none() {
            if Instant::now() < c.retry_at {
                return Err(StoreError::Unavailable("Redis is down (reconnecting with backoff)".into()));
            }
            match self.client.get_connection_with_timeout(self.timeout) {
                Ok(con) => {
                    let _ = con.set_read_timeout(Some(self.timeout));
                    let _ = con.set_write_timeout(Some(self.timeout));
                    tracing::info!("store: connected to Redis");
                    c.con = Some(con);
                    c.backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    c.retry_at = Instant::now() + c.backoff;
                    c.backoff = (c.backoff * 2).min(Duration::from_secs(5));
                    atlas_log_limited(&e);
                    return Err(unavailable(e));
                }
            }
        }
        let Some(con) = c.con.as_mut() else { return Err(StoreError::Unavailable("no connection".into())) };
        match f(con) {
            Ok(v) => Ok(v),
            Err(e) => {
                // A server-side error (e.g. WRONGTYPE) keeps the connection;
                // anything else (I/O, timeout) drops it.
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    c.con = None;
                    c.retry_at = Instant::now() + c.backoff;
                }
                Err(unavailable(e))
            }
        }
    }

    fn remember(&self, r: &Room) {
        lock(&self.cache).insert(r.id.clone(), (r.clone(), Instant::now()));
    }

    fn forget(&self, id: &str) {
        lock(&self.cache).remove(id);
    }

    /// The subscription thread: invalidates cached rooms on `room:{id}` and
    /// flags `server:{id}`; reconnects with backoff; clears the cache when
    /// it (re)subscribes (invalidations may have been missed meanwhile).
    fn spawn_subscriber(&self) {
        let (client, channel, timeout) = (self.client.clone(), self.key("events"), self.timeout);
        let (cache, changed, stop) = (self.cache.clone(), self.servers_changed.clone(), self.stop.clone());
        let spawned = std::thread::Builder::new().name("atlas-store-sub".into()).spawn(move || {
            let mut backoff = Duration::from_millis(100);
            while !stop.load(Ordering::Relaxed) {
                let mut con = match client.get_connection_with_timeout(timeout) {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                let _ = con.set_read_timeout(Some(Duration::from_millis(500)));
                let mut ps = con.as_pubsub();
                if ps.subscribe(&channel).is_err() {
                    std::thread::sleep(backoff);
                    continue;
                }
                backoff = Duration::from_millis(100);
                // Missed invalidations while unsubscribed: start afresh.
                lock(&cache).clear();
                changed.store(true, Ordering::Relaxed);
                while !stop.load(Ordering::Relaxed) {
                    match ps.get_message() {
                        Ok(msg) => {
                            let Ok(text) = msg.get_payload::<String>() else { continue };
                            if let Some(id) = text.strip_prefix("room:") {
                                lock(&cache).remove(id);
                            } else if text.starts_with("server:") {
                                changed.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(e) if e.is_timeout() => {}
                        Err(_) => break,
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "internal: cannot start the Redis subscription thread; rooms are read from Redis every time");
        }
    }

    fn load_of(con: &mut Connection, reserved: &str, nrooms: &str) -> RedisResult<HashMap<String, Load>> {
        let (r, n) = redis::pipe().cmd("HGETALL").arg(reserved).cmd("HGETALL").arg(nrooms).query(con)?;
        Ok(load_from(r, n))
    }

    fn get_rooms(con: &mut Connection, keys: &[String]) -> RedisResult<Vec<Option<Room>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<String>> = redis::cmd("MGET").arg(keys).query(con)?;
        Ok(raw.into_iter().map(parse_room).collect())
    }

    /// Deletes room `id` if `keep` says so about its current value.
    fn delete_if(&self, id: &str, keep: impl Fn(&Room) -> bool) -> Result<Option<Room>, StoreError> {
        let (rk, reserved, nrooms, rooms, events) =
            (self.key(&format!("room:{id}")), self.key("reserved"), self.key("nrooms"), self.key("rooms"), self.key("events"));
        let (prefix, idle) = (self.prefix.clone(), self.key("idle"));
        let out = self.with(|con| {
            redis::transaction(con, &[&rk], |con, pipe| {
                let Some(r) = parse_room(redis::cmd("GET").arg(&rk).query(con)?) else {
                    redis::cmd("ZREM").arg(&idle).arg(id).exec(con)?;
                    return Ok(Some(None));
                };
                if keep(&r) {
                    return Ok(Some(None));
                }
                pipe.cmd("DEL").arg(&rk).ignore();
                pipe.cmd("HINCRBY").arg(&reserved).arg(&r.server_id).arg(-i64::from(r.capacity)).ignore();
                pipe.cmd("HINCRBY").arg(&nrooms).arg(&r.server_id).arg(-1).ignore();
                pipe.cmd("ZREM").arg(&rooms).arg(&r.id).ignore();
                pipe.cmd("ZREM").arg(&idle).arg(&r.id).ignore();
                pipe.cmd("SREM").arg(format!("{prefix}srv:{}", r.server_id)).arg(&r.id).ignore();
                pipe.cmd("PUBLISH").arg(&events).arg(format!("room:{}", r.id)).ignore();
                let done: Option<()> = pipe.query(con)?;
                Ok(done.map(|_| Some(r.clone())))
            })
        })?;
        self.forget(id);
        Ok(out)
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn atlas_log_limited(e: &redis::RedisError) {
    use std::sync::atomic::AtomicU64;
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if LAST.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(error = %e, "store: cannot reach Redis (room creation answers 503; lookups use the cache; retrying with backoff)");
    }
}

impl RoomStore for RedisStore {
    fn create(&self, room: &NewRoom, candidates: &[Candidate]) -> Result<Room, StoreError> {
        let (reserved, nrooms, rooms, events) = (self.key("reserved"), self.key("nrooms"), self.key("rooms"), self.key("events"));
        let rk = self.key(&format!("room:{}", room.id));
        let srv = |id: &str| self.key(&format!("srv:{id}"));
        let seq_key = self.key("seq");
        let res = self.with(|con| {
            // Two round trips when nothing races: WATCH, the sequence number
            // (creation order across the fleet; a gap when a create fails is
            // fine) and the reads in one pipeline, then MULTI/EXEC. A
            // concurrent change to the reservations aborts the EXEC: read
            // and decide again.
            let mut seq: Option<u64> = None;
            loop {
                let mut p = redis::pipe();
                p.cmd("WATCH").arg(&reserved).ignore();
                if seq.is_none() {
                    p.cmd("INCR").arg(&seq_key);
                }
                p.cmd("EXISTS").arg(&rk).cmd("HGETALL").arg(&reserved).cmd("HGETALL").arg(&nrooms);
                let (n, exists, r, n_rooms): (u64, bool, HashMap<String, i64>, HashMap<String, i64>) = match seq {
                    Some(n) => {
                        let (e, r, nr) = p.query(con)?;
                        (n, e, r, nr)
                    }
                    None => p.query(con)?,
                };
                seq = Some(n);
                let refuse = |con: &mut Connection, e: StoreError| -> RedisResult<Result<Room, StoreError>> {
                    redis::cmd("UNWATCH").exec(con)?;
                    Ok(Err(e))
                };
                if exists {
                    return refuse(con, StoreError::Exists);
                }
                let load = load_from(r, n_rooms);
                let c = match pick(candidates, room.capacity, &load) {
                    Ok(c) => c,
                    Err(e) => return refuse(con, e),
                };
                let r = Room::placed(room, c, n);
                let mut tx = redis::pipe();
                tx.atomic();
                tx.cmd("HINCRBY").arg(&reserved).arg(&c.id).arg(i64::from(room.capacity)).ignore();
                tx.cmd("HINCRBY").arg(&nrooms).arg(&c.id).arg(1).ignore();
                tx.cmd("SET").arg(&rk).arg(json(&r)).ignore();
                tx.cmd("ZADD").arg(&rooms).arg(n).arg(&room.id).ignore();
                tx.cmd("SADD").arg(srv(&c.id)).arg(&room.id).ignore();
                tx.cmd("PUBLISH").arg(&events).arg(format!("room:{}", room.id)).ignore();
                let done: Option<()> = tx.query(con)?;
                if done.is_some() {
                    return Ok(Ok(r));
                }
            }
        })?;
        if let Ok(r) = &res {
            self.remember(r);
        }
        res
    }

    fn get(&self, id: &str) -> Result<Option<Room>, StoreError> {
        let rk = self.key(&format!("room:{id}"));
        match self.with(|con| redis::cmd("GET").arg(&rk).query::<Option<String>>(con)) {
            Ok(s) => {
                let r = parse_room(s);
                match &r {
                    Some(r) => self.remember(r),
                    None => self.forget(id),
                }
                Ok(r)
            }
            // Redis down: the last copy we saw, however old.
            Err(e) => lock(&self.cache).get(id).map(|(r, _)| Some(r.clone())).ok_or(e),
        }
    }

    fn cached(&self, id: &str) -> Option<Room> {
        lock(&self.cache).get(id).filter(|(_, at)| at.elapsed() < CACHE_TTL).map(|(r, _)| r.clone())
    }

    fn list(&self, offset: usize, limit: usize) -> Result<(Vec<Room>, usize), StoreError> {
        let rooms = self.key("rooms");
        let prefix = self.prefix.clone();
        self.with(|con| {
            let total: usize = redis::cmd("ZCARD").arg(&rooms).query(con)?;
            if limit == 0 || offset >= total {
                return Ok((Vec::new(), total));
            }
            let ids: Vec<String> = redis::cmd("ZRANGE").arg(&rooms).arg(offset).arg(offset + limit - 1).query(con)?;
            let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}room:{id}")).collect();
            Ok((Self::get_rooms(con, &keys)?.into_iter().flatten().collect(), total))
        })
    }

    fn delete(&self, id: &str) -> Result<Option<Room>, StoreError> {
        self.delete_if(id, |_| false)
    }

    fn report(&self, server_id: &str, rooms: &HashMap<String, u32>, now_ms: u64) -> Result<(), StoreError> {
        let srv = self.key(&format!("srv:{server_id}"));
        let (prefix, idle) = (self.prefix.clone(), self.key("idle"));
        let ids: Vec<String> = self.with(|con| redis::cmd("SMEMBERS").arg(&srv).query(con))?;
        if ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}room:{id}")).collect();
        let changed = self.with(|con| {
            redis::transaction(con, &keys, |con, pipe| {
                let mut changed = Vec::new();
                for (k, r) in keys.iter().zip(Self::get_rooms(con, &keys)?) {
                    // Moved off this server meanwhile: not this report's business.
                    let Some(r) = r.filter(|r| r.server_id == server_id) else { continue };
                    let n = reported(r.clone(), rooms, now_ms);
                    if n != r {
                        pipe.cmd("SET").arg(k).arg(json(&n)).ignore();
                        if n.idle_since_ms != r.idle_since_ms {
                            index_idle(pipe, &idle, &n);
                        }
                        changed.push(n);
                    }
                }
                if changed.is_empty() {
                    return Ok(Some(changed));
                }
                let done: Option<()> = pipe.query(con)?;
                Ok(done.map(|_| changed.clone()))
            })
        })?;
        for r in &changed {
            self.remember(r);
        }
        Ok(())
    }

    fn sweep(&self, now_ms: u64, grace_ms: u64) -> Result<Vec<Room>, StoreError> {
        // Idle since before now - grace, a bounded batch per call.
        let idle = self.key("idle");
        let cutoff = now_ms.saturating_sub(grace_ms);
        let ids: Vec<String> =
            self.with(|con| redis::cmd("ZRANGEBYSCORE").arg(&idle).arg("-inf").arg(format!("({cutoff}")).arg("LIMIT").arg(0).arg(SWEEP_BATCH).query(con))?;
        let mut gone = Vec::new();
        for id in &ids {
            if let Some(r) = self.delete_if(id, |cur| !expired(cur, now_ms, grace_ms))? {
                gone.push(r);
            }
        }
        Ok(gone)
    }

    fn rooms_on(&self, server_id: &str) -> Result<Vec<Room>, StoreError> {
        let (srv, prefix) = (self.key(&format!("srv:{server_id}")), self.prefix.clone());
        self.with(|con| {
            let ids: Vec<String> = redis::cmd("SMEMBERS").arg(&srv).query(con)?;
            let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}room:{id}")).collect();
            Ok(Self::get_rooms(con, &keys)?.into_iter().flatten().filter(|r| r.server_id == server_id).collect())
        })
    }

    fn migrate(&self, id: &str, from: &str, candidates: &[Candidate]) -> Result<Option<Room>, StoreError> {
        let (reserved, nrooms, events, prefix) = (self.key("reserved"), self.key("nrooms"), self.key("events"), self.prefix.clone());
        let (rk, idle) = (self.key(&format!("room:{id}")), self.key("idle"));
        let out = self.with(|con| {
            redis::transaction(con, &[&rk, &reserved], |con, pipe| {
                let Some(r) = parse_room(redis::cmd("GET").arg(&rk).query(con)?) else { return Ok(Some(None)) };
                if r.server_id != from {
                    return Ok(Some(None));
                }
                let mut load = Self::load_of(con, &reserved, &nrooms)?;
                // Its own slots count as free when it may stay.
                if let Some(l) = load.get_mut(from) {
                    l.reserved = l.reserved.saturating_sub(u64::from(r.capacity));
                }
                let moved = match pick(candidates, r.capacity, &load) {
                    Ok(c) => {
                        let m = r.clone().moved(from, c);
                        pipe.cmd("HINCRBY").arg(&reserved).arg(from).arg(-i64::from(r.capacity)).ignore();
                        pipe.cmd("HINCRBY").arg(&nrooms).arg(from).arg(-1).ignore();
                        pipe.cmd("HINCRBY").arg(&reserved).arg(&c.id).arg(i64::from(r.capacity)).ignore();
                        pipe.cmd("HINCRBY").arg(&nrooms).arg(&c.id).arg(1).ignore();
                        pipe.cmd("SREM").arg(format!("{prefix}srv:{from}")).arg(id).ignore();
                        pipe.cmd("SADD").arg(format!("{prefix}srv:{}", c.id)).arg(id).ignore();
                        m
                    }
                    Err(_) if r.lost => return Ok(Some(Some(r))),
                    Err(_) => Room { lost: true, ..r.clone() },
                };
                pipe.cmd("SET").arg(&rk).arg(json(&moved)).ignore();
                index_idle(pipe, &idle, &moved);
                pipe.cmd("PUBLISH").arg(&events).arg(format!("room:{id}")).ignore();
                let done: Option<()> = pipe.query(con)?;
                Ok(done.map(|_| Some(moved.clone())))
            })
        })?;
        if let Some(r) = &out {
            self.remember(r);
        }
        Ok(out)
    }

    fn load(&self) -> Result<HashMap<String, Load>, StoreError> {
        let (reserved, nrooms) = (self.key("reserved"), self.key("nrooms"));
        self.with(|con| Self::load_of(con, &reserved, &nrooms))
    }

    fn put_server(&self, id: &str, record: &Value, lease: Duration) -> Result<(), StoreError> {
        let (sk, servers, events) = (self.key(&format!("server:{id}")), self.key("servers"), self.key("events"));
        let body = record.to_string();
        self.with(|con| {
            let existed: Option<String> = redis::cmd("GET").arg(&sk).query(con)?;
            let mut p = redis::pipe();
            p.cmd("SET").arg(&sk).arg(&body).arg("PX").arg(lease.as_millis().max(1) as u64).ignore();
            p.cmd("SADD").arg(&servers).arg(id).ignore();
            // Tell the others only about changes (a heartbeat renews silently).
            let same = existed.as_deref().and_then(|e| serde_json::from_str::<Value>(e).ok()).is_some_and(|e| same_record(&e, record));
            if !same {
                p.cmd("PUBLISH").arg(&events).arg(format!("server:{id}")).ignore();
            }
            p.query::<()>(con)
        })
    }

    fn remove_server(&self, id: &str) -> Result<(), StoreError> {
        let (sk, servers, events) = (self.key(&format!("server:{id}")), self.key("servers"), self.key("events"));
        self.with(|con| {
            let mut p = redis::pipe();
            p.cmd("DEL").arg(&sk).ignore();
            p.cmd("SREM").arg(&servers).arg(id).ignore();
            p.cmd("PUBLISH").arg(&events).arg(format!("server:{id}")).ignore();
            p.query::<()>(con)
        })
    }

    fn servers(&self) -> Result<Vec<Value>, StoreError> {
        let (servers, prefix) = (self.key("servers"), self.prefix.clone());
        self.with(|con| {
            let ids: Vec<String> = redis::cmd("SMEMBERS").arg(&servers).query(con)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}server:{id}")).collect();
            let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(con)?;
            let mut out = Vec::new();
            let mut expired = Vec::new();
            for (id, r) in ids.iter().zip(raw) {
                match r.and_then(|s| serde_json::from_str::<Value>(&s).ok()) {
                    Some(v) => out.push(v),
                    None => expired.push(id.clone()),
                }
            }
            if !expired.is_empty() {
                redis::cmd("SREM").arg(&servers).arg(&expired).exec(con)?;
            }
            Ok(out)
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn take_servers_changed(&self) -> bool {
        self.servers_changed.swap(false, Ordering::Relaxed)
    }

    fn post_command(&self, server_id: &str, cmd: &Value) -> Result<(), StoreError> {
        let k = self.key(&format!("cmd:{server_id}"));
        let body = cmd.to_string();
        self.with(|con| {
            let mut p = redis::pipe();
            p.cmd("RPUSH").arg(&k).arg(&body).ignore();
            p.cmd("PEXPIRE").arg(&k).arg(COMMAND_TTL.as_millis() as u64).ignore();
            p.query::<()>(con)
        })
    }

    fn take_commands(&self, server_id: &str) -> Result<Vec<Value>, StoreError> {
        let k = self.key(&format!("cmd:{server_id}"));
        let (raw,): (Vec<String>,) = self.with(|con| redis::pipe().atomic().cmd("LRANGE").arg(&k).arg(0).arg(-1).cmd("DEL").arg(&k).ignore().query(con))?;
        Ok(raw.iter().filter_map(|s| serde_json::from_str(s).ok()).collect())
    }

    fn take_announcements(&self, server_id: &str) -> Result<Vec<Room>, StoreError> {
        let (srv, prefix) = (self.key(&format!("srv:{server_id}")), self.prefix.clone());
        let ids: Vec<String> = self.with(|con| redis::cmd("SMEMBERS").arg(&srv).query(con))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}room:{id}")).collect();
        self.with(|con| {
            redis::transaction(con, &keys, |con, pipe| {
                let mut told = Vec::new();
                for (k, r) in keys.iter().zip(Self::get_rooms(con, &keys)?) {
                    let Some(r) = r.filter(|r| r.server_id == server_id && r.announce) else { continue };
                    let done = Room { announce: false, ..r };
                    pipe.cmd("SET").arg(k).arg(json(&done)).ignore();
                    told.push(done);
                }
                if told.is_empty() {
                    return Ok(Some(told));
                }
                let ok: Option<()> = pipe.query(con)?;
                Ok(ok.map(|_| told.clone()))
            })
        })
    }
}

/// Two records of one server equal but for the fields a heartbeat changes.
fn same_record(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("players");
            o.remove("heartbeat_ms");
        }
        v
    };
    strip(a) == strip(b)
}
