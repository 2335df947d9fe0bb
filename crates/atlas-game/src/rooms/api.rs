//! The room routes of the REST API (served by `atlas-admin` under its
//! access control; rooms are writes, lookups reads):
//!
//! | route | |
//! |---|---|
//! | `POST /api/v1/rooms` | create: `{mode?, region? (or geo), capacity?, metadata?}` -> 201 `{room_id, server_id, address, join_token, ...}` |
//! | `GET /api/v1/rooms?offset=&limit=` | a page of rooms in creation order, and the total |
//! | `GET /api/v1/rooms/{id}` | the mapping (404 unknown, 410 lost with its server) |
//! | `DELETE /api/v1/rooms/{id}` | remove (its slots are freed) |
//!
//! Errors say whose fault it is: 400 (the request), 429 (the caller's
//! rate), 503 with `reason` `no_server` / `full` / `store_unavailable`
//! (retry later is safe; nothing was created).

use std::net::IpAddr;

use atlas_store::{NewRoom, Room, StoreError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{rooms, RoomStats};
use crate::api::Access;
use crate::registry::registry;

/// The route's access class, or `None` when `path` is not a room route.
pub fn access(method: &str, path: &str) -> Option<Access> {
    let room = path == "/api/v1/rooms" || path.starts_with("/api/v1/rooms/");
    room.then_some(if method == "GET" || method == "HEAD" { Access::Read } else { Access::Write })
}

#[derive(Deserialize)]
struct CreateReq {
    mode: Option<String>,
    #[serde(alias = "geo")]
    region: Option<String>,
    capacity: Option<u32>,
    #[serde(default)]
    metadata: Value,
}

fn err(status: u16, msg: impl Into<String>) -> (u16, Value) {
    let m = msg.into();
    (status, json!({"success": false, "error": m}))
}

/// The JSON of a room, with a fresh join token.
pub fn room_json(r: &Room) -> Value {
    let mut v = json!({
        "room_id": r.id, "server_id": r.server_id, "address": r.address,
        "join_token": rooms().join_token(r),
        "capacity": r.capacity, "mode": r.mode, "region": r.region, "metadata": r.metadata,
        "players": r.players, "created_at_ms": r.created_at_ms,
    });
    if let Some(from) = &r.migrated_from {
        v["migrated_from"] = json!(from);
    }
    v
}

fn unavailable(e: &StoreError) -> (u16, Value) {
    (503, json!({"success": false, "error": e.to_string(), "reason": "store_unavailable", "retry": true}))
}

/// Serves a room route (call [`access`] first). `query` holds the decoded
/// query parameters, `peer` the caller (rate limits).
pub fn handle(method: &str, path: &str, query: &[(String, String)], body: &[u8], peer: IpAddr) -> (u16, Value) {
    let r = rooms();
    let store = r.store();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        ("POST", ["api", "v1", "rooms"]) => {
            let settings = r.settings();
            if !r.creates.admit(peer, settings.create_rate) {
                RoomStats::inc(&r.stats.rate_limited);
                return err(429, format!("{peer} creates rooms faster than [rooms] create_rate ({}/s)", settings.create_rate));
            }
            let req: CreateReq = if body.iter().all(u8::is_ascii_whitespace) {
                CreateReq { mode: None, region: None, capacity: None, metadata: Value::Null }
            } else {
                match serde_json::from_slice(body) {
                    Ok(q) => q,
                    Err(e) => return err(400, format!("invalid room request: {e}")),
                }
            };
            let capacity = req.capacity.unwrap_or(settings.default_capacity);
            if capacity == 0 {
                return err(400, "`capacity` must be at least 1");
            }
            let new = NewRoom {
                id: format!("room-{}", crate::token::new_id()),
                mode: req.mode,
                region: req.region.clone(),
                capacity,
                metadata: req.metadata,
                now_ms: atlas_observe::now_ms(),
            };
            let candidates = registry().room_candidates(req.region.as_deref());
            match store.create(&new, &candidates) {
                Ok(room) => {
                    RoomStats::inc(&r.stats.created);
                    tracing::info!(room = %room.id, server = %room.server_id, capacity, "room created");
                    let mut v = room_json(&room);
                    v["success"] = json!(true);
                    (201, v)
                }
                Err(e @ StoreError::Full { no_server }) => {
                    RoomStats::inc(&r.stats.refused_full);
                    if registry().settings().spatial.auto_scale {
                        registry().wish_server([0, 0, 0], "rooms_full");
                    }
                    let reason = if no_server { "no_server" } else { "full" };
                    (
                        503,
                        json!({"success": false, "error": format!("{e}: no game server can take a room of {capacity} players"), "reason": reason, "retry": true}),
                    )
                }
                Err(e @ StoreError::Unavailable(_)) => {
                    RoomStats::inc(&r.stats.store_errors);
                    unavailable(&e)
                }
                Err(e) => err(500, format!("internal: {e}")),
            }
        }
        ("GET" | "HEAD", ["api", "v1", "rooms"]) => {
            let num = |k: &str, d: usize| query.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.parse::<usize>().ok()).unwrap_or(d);
            let (offset, limit) = (num("offset", 0), num("limit", 100).min(1000));
            match store.list(offset, limit) {
                Ok((page, total)) => (200, json!({"rooms": page.iter().map(room_json).collect::<Vec<_>>(), "total": total, "offset": offset, "limit": limit})),
                Err(e) => unavailable(&e),
            }
        }
        ("GET" | "HEAD", ["api", "v1", "rooms", id]) => match store.get(id) {
            Ok(Some(room)) if room.lost => {
                (410, json!({"success": false, "error": "the room's game server failed and no other server could take it", "room_id": room.id}))
            }
            Ok(Some(room)) => (200, room_json(&room)),
            Ok(None) => err(404, format!("no room {id}")),
            Err(e) => unavailable(&e),
        },
        ("DELETE", ["api", "v1", "rooms", id]) => match store.delete(id) {
            Ok(Some(room)) => {
                RoomStats::inc(&r.stats.deleted);
                tracing::info!(room = %room.id, server = %room.server_id, "room deleted");
                r.tell(&room.server_id, json!({"type": "RoomClosed", "room_id": room.id, "reason": "deleted"}));
                (200, json!({"success": true, "deleted": room.id}))
            }
            Ok(None) => err(404, format!("no room {id}")),
            Err(e) => unavailable(&e),
        },
        (_, ["api", "v1", "rooms"]) => err(405, format!("{method} is not allowed on {path}; use GET or POST")),
        (_, ["api", "v1", "rooms", _]) => err(405, format!("{method} is not allowed on {path}; use GET or DELETE")),
        _ => err(404, format!("no route {path}")),
    }
}
