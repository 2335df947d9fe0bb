//! The connection firehose (listener `mode = "firehose"`, seed 003 made
//! real): many client connections multiplexed into one tagged stream per
//! master server, wire-compatible with connserver protocol v2 clients and
//! masters (`shared/specs/firehose-protocol.md`), with cryptographic
//! reconnects that keep the client's id, missed-packet buffering, several
//! masters with balancing and failover, and bounded queues everywhere.
//!
//! - `wire`: framing, control messages, tagged packets.
//! - `crypto`: the reconnect challenge and Atlas' persistent key pair.
//! - `hub`: the client table, master outboxes, worker mailboxes.
//! - `master`: the `atlas-firehose` thread (master links, stale reaper).
//! - `client`: a client connection on a worker, and the worker's dispatcher.

pub mod client;
pub mod crypto;
pub mod hub;
pub mod master;
pub mod wire;

use std::sync::{Arc, OnceLock};

use atlas_config::{Config, Mode};

pub use client::serve;
use hub::Hub;

static HUB: OnceLock<Arc<Hub>> = OnceLock::new();

/// The firehose, once [`start`] ran.
pub fn hub() -> Option<Arc<Hub>> {
    HUB.get().cloned()
}

/// Loads (or creates) the key pair and starts the master links, when a
/// listener has `mode = "firehose"`. Errors are configuration errors.
pub fn start(cfg: &Config) -> Result<(), String> {
    if HUB.get().is_some() || !cfg.listeners.iter().any(|l| l.mode == Mode::Firehose) {
        return Ok(());
    }
    let f = cfg.firehose.clone();
    let key = crypto::ServerKey::load_or_create(&f.key_file).map_err(|e| format!("config: [firehose] key_file: {e}"))?;
    let masters = f.masters.join(", ");
    let hub = Arc::new(Hub::new(f, key).map_err(|e| format!("internal: firehose doorbells: {e}"))?);
    master::spawn(hub.clone()).map_err(|e| format!("internal: cannot start the firehose thread: {e}"))?;
    tracing::info!(masters = %masters, "firehose: started");
    let _ = HUB.set(hub);
    Ok(())
}

/// A reload: new settings apply to what follows; the masters and the key
/// are kept (changing them needs a restart, which is logged).
pub fn configure(cfg: &Config) {
    if let Some(h) = hub() {
        let old = h.settings.load_full();
        if old.masters != cfg.firehose.masters || old.key_file != cfg.firehose.key_file {
            tracing::warn!("config: [firehose] masters and key_file take effect at the next restart; the other settings apply now");
        }
        let mut f = cfg.firehose.clone();
        f.masters = old.masters.clone();
        f.key_file = old.key_file.clone();
        h.settings.store(Arc::new(f));
    } else if let Err(e) = start(cfg) {
        tracing::error!(error = %e, "firehose: cannot start");
    }
}
