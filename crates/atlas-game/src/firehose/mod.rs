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
//! - `master`: the master links and the stale reaper (on worker 0, or on
//!   the `atlas-firehose` thread).
//! - `client`: a client connection on a worker, and the worker's dispatcher.
//! - `persist`: the client table handed to the next Atlas (restart, takeover).

pub mod client;
pub mod crypto;
pub mod hub;
pub mod master;
pub mod persist;
pub mod wire;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
    let table = persist::path_for(&f.key_file);
    let hub = Arc::new(Hub::new(f, key).map_err(|e| format!("internal: firehose doorbells: {e}"))?);
    // A restart: the previous Atlas left its clients here.
    hub.import_file(&table);
    master::spawn(hub.clone()).map_err(|e| format!("internal: cannot start the firehose master links: {e}"))?;
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

/// This process took the sockets over from a running Atlas, which is
/// about to drain: for `window`, a reconnect naming an id not known here
/// waits for that Atlas' client table (see `persist`).
pub fn expect_handoff(window: Duration) {
    if let Some(h) = hub() {
        *hub::lock(&h.awaiting) = Some(Instant::now() + window);
    }
}

/// Waits (at most `max`) until a draining firehose has written its client
/// table, so the process does not exit before the next Atlas can have it.
pub fn wait_saved(max: Duration) {
    let Some(h) = hub() else { return };
    let until = Instant::now() + max;
    while !h.saved.load(Ordering::SeqCst) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}
