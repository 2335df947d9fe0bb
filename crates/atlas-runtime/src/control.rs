//! The control plane's side of the engine: applying a new configuration
//! (hot reload) and noticing that the file changed.
//!
//! A reload parses and validates the file; if it has errors they are all
//! logged and nothing changes. Otherwise the new shared state is built
//! beside the old one (carrying over the in-flight counters of upstreams
//! that remain), published as a new generation, and each worker rebuilds its
//! listener contexts on its next housekeeping tick, keeping its upstream
//! pool and file cache. What cannot change in a running process (listen
//! addresses, modes, TLS on/off, new or removed listeners, worker count,
//! driver) is logged as needing a restart or a takeover.
//!
//! The watcher uses notify on the file's *directory*, because editors and
//! deploy tools replace files by rename: a watch on the file itself would
//! follow the old inode and miss every later change.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use atlas_config::Config;
use notify::{RecursiveMode, Watcher};

use crate::{Current, Generation, Shared};

static VERSION: AtomicU64 = AtomicU64::new(1);

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied { version: u64, needs_restart: Vec<String> },
    Rejected(usize),
}

/// Differences that a live process cannot apply.
fn fixed_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.workers != new.workers {
        out.push(format!("workers {} -> {}", old.workers, new.workers));
    }
    if old.driver != new.driver {
        out.push(format!("runtime.driver {:?} -> {:?}", old.driver, new.driver));
    }
    if old.ring_entries != new.ring_entries {
        out.push("runtime.ring_entries".into());
    }
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.name == l.name) {
            None => out.push(format!("new listener `{}` on {}", l.name, l.addr)),
            Some(o) => {
                if o.addr != l.addr && !(o.addr.port() == 0 && l.addr.port() == 0) {
                    out.push(format!("listener `{}` address {} -> {}", l.name, o.addr, l.addr));
                }
                if o.mode != l.mode {
                    out.push(format!("listener `{}` mode {} -> {}", l.name, o.mode.as_str(), l.mode.as_str()));
                }
                if o.tls.is_some() != l.tls.is_some() {
                    out.push(format!("listener `{}` TLS switched {}", l.name, if l.tls.is_some() { "on" } else { "off" }));
                }
            }
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|l| l.name == o.name) {
            out.push(format!("listener `{}` removed (it keeps serving until a restart)", o.name));
        }
    }
    if old.api.as_ref().map(|a| a.addr) != new.api.as_ref().map(|a| a.addr) {
        out.push("api.address".into());
    }
    out
}

/// Loads `path` and, if valid, publishes it as the new generation.
pub fn reload(current: &Current, path: &Path) -> ReloadOutcome {
    let new = match atlas_config::load_file(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!("config: {e}");
            }
            tracing::error!(errors = errors.0.len(), "config: reload rejected; the running configuration is unchanged");
            rejected(errors.0.first().map(|e| e.to_string()).unwrap_or_default());
            return ReloadOutcome::Rejected(errors.0.len());
        }
    };
    let old = current.load_full();
    let needs_restart = fixed_changes(&old.cfg, &new);
    let mut new = new;
    // Settings fixed for the life of the process keep their running values.
    new.workers = old.cfg.workers;
    let shared = match Shared::build(&new, Some(&old.shared)) {
        Ok(s) => s,
        Err(errors) => {
            for e in &errors {
                tracing::error!("config: {e}");
            }
            tracing::error!(errors = errors.len(), "config: reload rejected; the running configuration is unchanged");
            rejected(errors.first().cloned().unwrap_or_default());
            return ReloadOutcome::Rejected(errors.len());
        }
    };
    for change in &needs_restart {
        tracing::warn!(change = %change, "config: this change needs a restart or a takeover (--takeover) to apply");
    }
    let version = VERSION.fetch_add(1, Ordering::SeqCst) + 1;
    atlas_game::registry::registry().configure(&new.spatial);
    atlas_game::rooms::configure(&new);
    atlas_game::firehose::configure(&new);
    current.store(Arc::new(Generation { version, cfg: Arc::new(new), shared: Arc::new(shared) }));
    tracing::info!(version, file = %path.display(), "configuration reloaded");
    atlas_observe::metrics::registry().reloads_ok.fetch_add(1, Ordering::Relaxed);
    atlas_observe::events::record("info", "reload", format!("configuration version {version} applied from {}", path.display()));
    ReloadOutcome::Applied { version, needs_restart }
}

fn rejected(first_error: String) {
    atlas_observe::metrics::registry().reloads_failed.fetch_add(1, Ordering::Relaxed);
    atlas_observe::events::record("error", "reload", format!("reload rejected: {first_error}"));
}

/// The first generation.
pub fn first_generation(cfg: Config, shared: Shared) -> Current {
    Arc::new(arc_swap::ArcSwap::from_pointee(Generation { version: VERSION.load(Ordering::SeqCst), cfg: Arc::new(cfg), shared: Arc::new(shared) }))
}

/// Watches `path` (through its directory) and sends `()` on every change
/// to it. The watcher lives as long as the returned value.
pub fn watch(path: &Path, tx: Sender<()>) -> Result<notify::RecommendedWatcher, String> {
    let path: PathBuf = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev.kind.is_access() {
                return;
            }
            if ev.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name) {
                let _ = tx.send(());
            }
        }
    })
    .map_err(|e| format!("cannot watch the configuration: {e}"))?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("atlas.toml");
        let tmp = dir.join("atlas.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }

    const BASE: &str = "[listen]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 0\nworkers = 2\n[[upstreams]]\nname = \"a\"\naddress = \"127.0.0.1:9\"\n";

    #[test]
    fn bad_file_is_rejected_and_good_file_applied_with_counters_carried() {
        let dir = std::env::temp_dir().join(format!("atlas-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = write(&dir, BASE);
        let cfg = atlas_config::load_file(&path).unwrap();
        let shared = Shared::build(&cfg, None).unwrap();
        let current = first_generation(cfg, shared);
        let v0 = current.load().version;
        current.load().shared.groups[0].inflight.add(1, 0, 3);

        write(&dir, "this is [ not toml");
        assert_eq!(reload(&current, &path), ReloadOutcome::Rejected(1));
        assert_eq!(current.load().version, v0, "a rejected reload changes nothing");
        write(&dir, &BASE.replace("port = 0", "port = 0\nstrategy = \"fastest\""));
        assert!(matches!(reload(&current, &path), ReloadOutcome::Rejected(_)));

        write(&dir, &format!("{BASE}[[upstreams]]\nname = \"b\"\naddress = \"127.0.0.1:10\"\n[routing]\nstrategy = \"least_connections\"\n"));
        match reload(&current, &path) {
            ReloadOutcome::Applied { version, needs_restart } => {
                assert!(version > v0);
                assert!(needs_restart.is_empty(), "{needs_restart:?}");
            }
            other => panic!("{other:?}"),
        }
        let g = current.load();
        assert_eq!(g.cfg.listeners[0].strategy, atlas_config::Strategy::LeastConnections);
        assert_eq!(g.shared.groups[0].len(), 2);
        assert_eq!(g.shared.groups[0].inflight.total(0), 3, "in-flight count of `a` carried over");

        write(&dir, &BASE.replace("workers = 2", "workers = 3").replace("port = 0", "port = 1").replace("name = \"web\"", "name = \"web\"\nmode = \"tcp\""));
        match reload(&current, &path) {
            ReloadOutcome::Applied { needs_restart, .. } => {
                let all = needs_restart.join("; ");
                assert!(all.contains("workers 2 -> 3") && all.contains("address") && all.contains("mode http -> tcp"), "{all}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(current.load().cfg.workers, 2, "the worker count of a running process does not change");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
