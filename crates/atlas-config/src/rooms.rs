//! `[rooms]` (the room gateway: capacities, cleanup, join tokens, per-IP
//! rates) and `[store]` (where rooms and the server registry are kept:
//! memory, or Redis shared by a fleet of Atlas instances): serde-facing
//! forms and validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::load::Diag;
use crate::validate::{duration, int_in};

/// The room gateway's settings.
#[derive(Clone, Debug)]
pub struct Rooms {
    /// Player slots a room reserves on its server when the create request
    /// names none.
    pub default_capacity: u32,
    /// A room reported empty (or no longer reported by its server) for this
    /// long is removed and its slots freed.
    pub empty_grace: Duration,
    /// Lifetime of the `join_token` a create or lookup returns.
    pub join_token_ttl: Duration,
    /// Room creations per second per client IP (burst: the same number); 0: off.
    pub create_rate: f64,
    /// Joins through Atlas (`/rooms/{id}`) per second per client IP; 0: off.
    pub join_rate: f64,
}

impl Default for Rooms {
    fn default() -> Rooms {
        Rooms { default_capacity: 16, empty_grace: Duration::from_secs(60), join_token_ttl: Duration::from_secs(60), create_rate: 10.0, join_rate: 50.0 }
    }
}

/// Which directory backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreBackend {
    Memory,
    Redis,
}

/// Where rooms (and, with Redis, the server registry) live.
#[derive(Clone, Debug)]
pub struct Store {
    pub backend: StoreBackend,
    /// `redis://[:password@]host:port/db` (Redis only).
    pub url: Option<String>,
    /// Memory backend: rooms written here on every change, read at start-up.
    pub snapshot: Option<PathBuf>,
    /// Prefix of every Redis key and channel (several fleets on one Redis).
    pub prefix: String,
    /// Lease of the records an instance keeps alive in Redis (its servers'
    /// registrations): a dead instance's records expire after this long.
    pub lease: Duration,
    /// Redis commands give up after this long (the caller answers 503).
    pub timeout: Duration,
}

impl Default for Store {
    fn default() -> Store {
        Store {
            backend: StoreBackend::Memory,
            url: None,
            snapshot: None,
            prefix: "atlas:".into(),
            lease: Duration::from_secs(15),
            timeout: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRooms {
    pub default_capacity: Option<Spanned<i64>>,
    pub empty_grace: Option<Spanned<String>>,
    pub join_token_ttl: Option<Spanned<String>>,
    pub create_rate: Option<Spanned<f64>>,
    pub join_rate: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<Spanned<String>>,
    pub url: Option<Spanned<String>>,
    pub snapshot: Option<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
    pub lease: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

fn rate(diag: &mut Diag<'_>, v: &Option<Spanned<f64>>, key: &str, default: f64) -> f64 {
    match v {
        None => default,
        Some(s) if s.get_ref().is_finite() && *s.get_ref() >= 0.0 => *s.get_ref(),
        Some(s) => {
            diag.at(s, key, "must be a number >= 0 (per second; 0 turns the limit off)");
            default
        }
    }
}

pub(crate) fn validate_rooms(diag: &mut Diag<'_>, r: &RawRooms) -> Rooms {
    let d = Rooms::default();
    Rooms {
        default_capacity: int_in(diag, &r.default_capacity, "rooms.default_capacity", 1, 1_000_000, d.default_capacity as i64) as u32,
        empty_grace: duration(diag, &r.empty_grace, "rooms.empty_grace", d.empty_grace),
        join_token_ttl: duration(diag, &r.join_token_ttl, "rooms.join_token_ttl", d.join_token_ttl),
        create_rate: rate(diag, &r.create_rate, "rooms.create_rate", d.create_rate),
        join_rate: rate(diag, &r.join_rate, "rooms.join_rate", d.join_rate),
    }
}

/// Why a Redis URL is not usable, or `None`.
pub fn redis_url_error(url: &str) -> Option<String> {
    let rest = url.strip_prefix("redis://")?;
    let hostpart = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostpart.split('/').next().unwrap_or("");
    if hostport.is_empty() {
        return Some(format!("`{url}` has no host (expected redis://host:port/db)"));
    }
    if let Some(db) = hostpart.split_once('/').map(|(_, d)| d).filter(|d| !d.is_empty()) {
        if db.parse::<u32>().is_err() {
            return Some(format!("`{url}`: the database `{db}` is not a number"));
        }
    }
    None
}

pub(crate) fn validate_store(diag: &mut Diag<'_>, r: &RawStore) -> Store {
    let d = Store::default();
    let backend = match &r.backend {
        None => StoreBackend::Memory,
        Some(b) => match b.get_ref().as_str() {
            "memory" => StoreBackend::Memory,
            "redis" => StoreBackend::Redis,
            other => {
                diag.at(b, "store.backend", format!("unknown backend `{other}`, expected memory or redis"));
                StoreBackend::Memory
            }
        },
    };
    let url = r.url.as_ref().and_then(|u| {
        let s = u.get_ref();
        if !s.starts_with("redis://") {
            diag.at(u, "store.url", format!("`{s}` is not a redis:// URL (redis://[:password@]host:port/db)"));
            return None;
        }
        match redis_url_error(s) {
            Some(e) => {
                diag.at(u, "store.url", e);
                None
            }
            None => Some(s.clone()),
        }
    });
    if backend == StoreBackend::Redis && url.is_none() && r.url.is_none() {
        if let Some(b) = &r.backend {
            diag.at(b, "store.url", "backend = \"redis\" needs url = \"redis://host:port/db\"");
        }
    }
    let prefix = match &r.prefix {
        Some(p) if p.get_ref().chars().any(|c| c.is_whitespace() || c.is_control()) => {
            diag.at(p, "store.prefix", "must not contain spaces or control characters");
            d.prefix.clone()
        }
        Some(p) => p.get_ref().clone(),
        None => d.prefix.clone(),
    };
    let lease = duration(diag, &r.lease, "store.lease", d.lease);
    if lease < Duration::from_secs(1) {
        if let Some(l) = &r.lease {
            diag.at(l, "store.lease", "must be at least 1s");
        }
    }
    Store {
        backend,
        url,
        snapshot: r.snapshot.as_ref().map(|s| PathBuf::from(s.get_ref())),
        prefix,
        lease: lease.max(Duration::from_secs(1)),
        timeout: duration(diag, &r.timeout, "store.timeout", d.timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::redis_url_error;

    #[test]
    fn redis_urls() {
        assert_eq!(redis_url_error("redis://127.0.0.1:6379/0"), None);
        assert_eq!(redis_url_error("redis://:secret@10.0.0.1:6379/2"), None);
        assert_eq!(redis_url_error("redis://localhost"), None);
        assert!(redis_url_error("redis:///0").is_some());
        assert!(redis_url_error("redis://h:1/x").is_some());
    }
}
