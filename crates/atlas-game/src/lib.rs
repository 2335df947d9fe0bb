//! The game gateway (listener `mode = "game"`, seed 000 made real):
//!
//! - `ws`: RFC 6455 framing (an incremental decoder that lets the proxy
//!   forward bytes as they arrive while it tracks frame and message
//!   boundaries, and a side tap that rebuilds text messages) and the
//!   opening handshake.
//! - `position`: where a player's position is found in client messages.
//! - `spatial`: region geometry, routing with hysteresis, prediction.
//! - `registry`: registered servers, heartbeats, players, the snapshot file.
//! - `api`: the registration and game REST routes (served by atlas-admin).
//! - `rooms`: the room gateway (rooms on the least-loaded server, the room
//!   store, joins through Atlas, cleanup and migration).
//! - `session`: the WebSocket proxy session with seamless transfers.
//! - `token`: HMAC-SHA256 transfer tokens.
//! - `maestro`: auto-scale requests.
//! - `stats`: the gateway's metrics.
//! - `firehose`: the connection firehose (connserver protocol v2).

pub mod api;
pub mod firehose;
pub mod fuzzing;
pub mod maestro;
pub mod position;
pub mod registry;
pub mod rooms;
pub mod session;
pub mod spatial;
pub mod stats;
pub mod token;
pub mod ws;
