//! The game gateway's figures, one slot per worker (written only by that
//! worker, summed when read), like the listener metrics of atlas-observe.

use std::sync::OnceLock;

use atlas_observe::metrics::{Counter, Gauge, Histogram};
use atlas_observe::PerWorker;

#[derive(Default)]
#[repr(align(128))]
pub struct GameStats {
    /// Sessions open now (players connected).
    pub sessions: Gauge,
    pub sessions_total: Counter,
    /// Handshakes refused (malformed, no server, backend refused).
    pub refused: Counter,
    /// Messages (complete data messages) client -> server and back.
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub transfers_ok: Counter,
    pub transfers_failed: Counter,
    /// From the decision to move a player to its stream running to the
    /// new server.
    pub switch_time: Histogram,
    /// Predictive pre-connect: connections opened early, and how many of
    /// them a transfer used or that were cancelled (the player turned back).
    pub preconnects: Counter,
    pub preconnect_hits: Counter,
    pub preconnect_cancelled: Counter,
    /// Sessions moved because their server failed (lost or down).
    pub failovers: Counter,
    /// Positions read from client messages.
    pub positions: Counter,
}

static STATS: OnceLock<PerWorker<GameStats>> = OnceLock::new();

/// The per-worker slots (sized by `atlas_observe::metrics::init`).
pub fn stats() -> &'static PerWorker<GameStats> {
    STATS.get_or_init(|| PerWorker::new(atlas_observe::metrics::registry_workers().max(1)))
}

/// Worker `w`'s slot.
pub fn slot(w: usize) -> &'static GameStats {
    stats().slot(w)
}
