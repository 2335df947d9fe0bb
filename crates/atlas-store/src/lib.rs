//! The room directory (room -> game server, with the player slots each room
//! reserves on its server) behind one trait, [`RoomStore`], with two
//! backends: [`MemoryStore`] (one Atlas; optional snapshot file) and
//! [`RedisStore`] (a fleet of Atlas instances sharing one Redis, which also
//! holds the server registry under leases so any instance routes to any
//! server).
//!
//! The calls are blocking: they run on the control-plane threads (the API
//! thread, the registry monitor), never on a worker. Workers read rooms
//! through [`RoomStore::cached`], which never does I/O.
//!
//! Placement is one function, [`pick`], used by both backends: the Redis
//! backend runs it inside a WATCH/MULTI transaction on the reservation
//! hash, so two instances creating rooms at once cannot overfill a server
//! (the loser's EXEC aborts and it picks again).

mod memory;
mod redis_store;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use memory::MemoryStore;
pub use redis_store::RedisStore;

/// One room and where it lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Room {
    pub id: String,
    pub server_id: String,
    pub address: String,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Player slots reserved on the server.
    pub capacity: u32,
    #[serde(default)]
    pub metadata: Value,
    /// Players its server last reported.
    #[serde(default)]
    pub players: u32,
    pub created_at_ms: u64,
    /// Creation order across the store (ids are random; many rooms share a
    /// millisecond).
    #[serde(default)]
    pub seq: u64,
    /// Since when its server reports it empty or no longer reports it.
    #[serde(default)]
    pub idle_since_ms: Option<u64>,
    /// The server it lived on before a migration.
    #[serde(default)]
    pub migrated_from: Option<String>,
    /// Its server died and no other could take it.
    #[serde(default)]
    pub lost: bool,
    /// Migrated here and the new server was not told yet (`RoomMigrated`).
    #[serde(default)]
    pub announce: bool,
}

impl Room {
    /// The room a create places on `c`.
    fn placed(n: &NewRoom, c: &Candidate, seq: u64) -> Room {
        Room {
            id: n.id.clone(),
            server_id: c.id.clone(),
            address: c.address.clone(),
            mode: n.mode.clone(),
            region: n.region.clone(),
            capacity: n.capacity,
            metadata: n.metadata.clone(),
            players: 0,
            created_at_ms: n.now_ms,
            seq,
            idle_since_ms: None,
            migrated_from: None,
            lost: false,
            announce: false,
        }
    }

    /// This room after a migration off `from` onto `c` (which may be
    /// `from` itself: a lost room whose server came back).
    fn moved(self, from: &str, c: &Candidate) -> Room {
        let elsewhere = c.id != from;
        Room {
            server_id: c.id.clone(),
            address: c.address.clone(),
            migrated_from: if elsewhere { Some(from.to_string()) } else { self.migrated_from.clone() },
            lost: false,
            announce: elsewhere,
            players: 0,
            idle_since_ms: None,
            ..self
        }
    }
}

/// What a create asks for (the id is chosen by the caller).
#[derive(Clone, Debug)]
pub struct NewRoom {
    pub id: String,
    pub mode: Option<String>,
    pub region: Option<String>,
    pub capacity: u32,
    pub metadata: Value,
    pub now_ms: u64,
}

/// A server that may take a room (healthy and accepting).
#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: String,
    pub address: String,
    /// Player capacity it registered with.
    pub capacity: u32,
    /// Players it reports (or Atlas counts) now.
    pub players: u64,
    /// It is in the region the room asked for.
    pub preferred: bool,
}

/// Reserved slots and rooms of one server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub reserved: u64,
    pub rooms: u64,
}

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// No candidate has room for it (`no_server`: there was none at all).
    Full { no_server: bool },
    /// The backend cannot be reached or answered an error: nothing was
    /// changed, a retry later is safe.
    Unavailable(String),
    /// The id is taken (only with ids the caller did not draw at random).
    Exists,
}

impl StoreError {
    pub fn retry_safe(&self) -> bool {
        !matches!(self, StoreError::Exists)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Full { no_server: true } => f.write_str("no game server is available"),
            StoreError::Full { no_server: false } => f.write_str("every game server is at capacity"),
            StoreError::Unavailable(e) => write!(f, "room store unavailable: {e}"),
            StoreError::Exists => f.write_str("room id already exists"),
        }
    }
}

impl std::error::Error for StoreError {}

/// The room directory. Every method may block on I/O except [`cached`](RoomStore::cached).
pub trait RoomStore: Send + Sync {
    /// Places and stores a new room atomically.
    fn create(&self, room: &NewRoom, candidates: &[Candidate]) -> Result<Room, StoreError>;
    fn get(&self, id: &str) -> Result<Option<Room>, StoreError>;
    /// The last known copy, without I/O (workers' join path).
    fn cached(&self, id: &str) -> Option<Room>;
    /// A page of rooms in creation order, and the total.
    fn list(&self, offset: usize, limit: usize) -> Result<(Vec<Room>, usize), StoreError>;
    fn delete(&self, id: &str) -> Result<Option<Room>, StoreError>;
    /// A server's report of its rooms and their players: rooms it reports
    /// empty or leaves out start idling, the others stop.
    fn report(&self, server_id: &str, rooms: &HashMap<String, u32>, now_ms: u64) -> Result<(), StoreError>;
    /// Removes the rooms idle for longer than `grace_ms`; returns them.
    fn sweep(&self, now_ms: u64, grace_ms: u64) -> Result<Vec<Room>, StoreError>;
    fn rooms_on(&self, server_id: &str) -> Result<Vec<Room>, StoreError>;
    /// Moves a room off `from` to the best candidate (`from` itself when it
    /// is among them: a lost room whose server came back). `Ok(None)`: it
    /// is no longer on `from` (another instance moved it). No candidate:
    /// the room is marked lost and returned as such.
    fn migrate(&self, id: &str, from: &str, candidates: &[Candidate]) -> Result<Option<Room>, StoreError>;
    fn load(&self) -> Result<HashMap<String, Load>, StoreError>;
    /// The rooms migrated to `server_id` it was not told about yet (and
    /// marks them told).
    fn take_announcements(&self, server_id: &str) -> Result<Vec<Room>, StoreError>;

    // The shared server registry (Redis; the memory store keeps none).

    /// Publishes a server this instance owns, valid for `lease`.
    fn put_server(&self, _id: &str, _record: &Value, _lease: Duration) -> Result<(), StoreError> {
        Ok(())
    }
    fn remove_server(&self, _id: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Every server record whose lease is alive.
    fn servers(&self) -> Result<Vec<Value>, StoreError> {
        Ok(Vec::new())
    }
    /// Whether records come from other instances (so the registry syncs).
    fn shared(&self) -> bool {
        false
    }
    /// Whether another instance changed a server since the last call.
    fn take_servers_changed(&self) -> bool {
        false
    }
    /// Leaves a heartbeat command for a server registered with another
    /// instance (which hands it over in [`take_commands`](RoomStore::take_commands)).
    fn post_command(&self, _server_id: &str, _cmd: &Value) -> Result<(), StoreError> {
        Ok(())
    }
    /// The commands other instances left for `server_id` (and forgets them).
    fn take_commands(&self, _server_id: &str) -> Result<Vec<Value>, StoreError> {
        Ok(Vec::new())
    }
}

/// Picks the server for a room of `slots`: among candidates with room
/// (reserved + slots <= capacity), preferred (region) ones first, then the
/// least loaded (max(reserved, players) / capacity), then fewer rooms, then
/// the smaller id.
pub fn pick<'a>(candidates: &'a [Candidate], slots: u32, load: &HashMap<String, Load>) -> Result<&'a Candidate, StoreError> {
    if candidates.is_empty() {
        return Err(StoreError::Full { no_server: true });
    }
    let slots = u64::from(slots);
    candidates
        .iter()
        .filter(|c| load.get(&c.id).copied().unwrap_or_default().reserved + slots <= u64::from(c.capacity))
        .min_by(|a, b| {
            let (la, lb) = (load.get(&a.id).copied().unwrap_or_default(), load.get(&b.id).copied().unwrap_or_default());
            let ratio = |c: &Candidate, l: Load| l.reserved.max(c.players) as f64 / f64::from(c.capacity.max(1));
            b.preferred.cmp(&a.preferred).then(ratio(a, la).total_cmp(&ratio(b, lb))).then(la.rooms.cmp(&lb.rooms)).then(a.id.cmp(&b.id))
        })
        .ok_or(StoreError::Full { no_server: false })
}

/// The room a report leaves: players and idle time updated.
fn reported(mut r: Room, rooms: &HashMap<String, u32>, now_ms: u64) -> Room {
    match rooms.get(&r.id) {
        Some(&n) if n > 0 => {
            r.players = n;
            r.idle_since_ms = None;
        }
        Some(_) => {
            r.players = 0;
            r.idle_since_ms.get_or_insert(now_ms);
        }
        None => {
            r.idle_since_ms.get_or_insert(now_ms);
        }
    }
    r
}

fn expired(r: &Room, now_ms: u64, grace_ms: u64) -> bool {
    !r.lost && r.idle_since_ms.is_some_and(|t| now_ms.saturating_sub(t) > grace_ms)
}

#[cfg(test)]
mod tests;
