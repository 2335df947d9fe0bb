//! `[firehose]`: the connection firehose (connserver protocol v2): the
//! masters Atlas dials, the connserver settings under their connserver
//! names and defaults, and Atlas' own defences. Serde-facing form,
//! validation, and the `VOLTLANE_*` environment overrides that people
//! migrating from connserver already use.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::load::Diag;
use crate::validate::{duration, int_in};

/// How a new client is given a master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirehoseBalance {
    /// The master with the fewest clients (live and stale) that is up.
    LeastClients,
    /// A hash of the client id over the masters (stable for a given list).
    Hash,
}

/// Notices Atlas may send the master besides data and failures (all off
/// by default: a v2 master does not expect them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Notices {
    /// Flag 0x10 when a new client got its id.
    pub connect: bool,
    /// Flag 0x11 when a client's socket closed (it is stale now).
    pub disconnect: bool,
    /// Flag 0x03 when a stale client came back and kept its id.
    pub reconnect: bool,
}

#[derive(Clone, Debug)]
pub struct Firehose {
    /// `host:port` of each master, dialled by Atlas (names resolve at dial time).
    pub masters: Vec<String>,
    pub balance: FirehoseBalance,
    /// A failed master's clients move to another one (with a 0x03 notice).
    pub failover: bool,
    /// Packets queued for one master link; full: clients' reads pause.
    pub master_channel_capacity: usize,
    /// Packets queued for one client; full: the client is disconnected
    /// (it becomes stale and may reconnect).
    pub channel_capacity: usize,
    pub stale_timeout: Duration,
    pub stale_reap_interval: Duration,
    /// Master packets kept per stale client; 0: such a packet fails it.
    pub missed_packets_buffer_size: usize,
    /// Past this many stale clients, the oldest is failed.
    pub max_stale_clients: usize,
    /// Largest frame payload accepted from a client or a master.
    pub max_frame_length: usize,
    /// Atlas' secp256k1 secret key (hex); created 0600 when missing.
    pub key_file: PathBuf,
    /// The handshake (version to client id, or the reconnect challenge)
    /// must finish within this.
    pub handshake_timeout: Duration,
    /// Frames per second read from one client; 0: unlimited.
    pub client_rate: f64,
    /// New connections per second per client IP; 0: unlimited.
    pub per_ip_connect_rate: f64,
    pub notices: Notices,
    /// connserver's `general.log_level` (off, error, warn, info, debug,
    /// trace) for the firehose's own log lines.
    pub log_level: Option<String>,
}

impl Default for Firehose {
    fn default() -> Firehose {
        Firehose {
            masters: Vec::new(),
            balance: FirehoseBalance::LeastClients,
            failover: false,
            master_channel_capacity: 32768,
            channel_capacity: 8192,
            stale_timeout: Duration::from_secs(300),
            stale_reap_interval: Duration::from_secs(15),
            missed_packets_buffer_size: 0,
            max_stale_clients: 65535,
            max_frame_length: 65536,
            key_file: PathBuf::from("firehose.key"),
            handshake_timeout: Duration::from_secs(10),
            client_rate: 0.0,
            per_ip_connect_rate: 0.0,
            notices: Notices::default(),
            log_level: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFirehose {
    pub masters: Option<Spanned<Vec<String>>>,
    pub balance: Option<Spanned<String>>,
    pub failover: Option<bool>,
    pub master_channel_capacity: Option<Spanned<i64>>,
    pub channel_capacity: Option<Spanned<i64>>,
    pub stale_timeout_secs: Option<Spanned<i64>>,
    pub stale_reap_interval_secs: Option<Spanned<i64>>,
    pub missed_packets_buffer_size: Option<Spanned<i64>>,
    pub max_stale_clients: Option<Spanned<i64>>,
    pub max_frame_length: Option<Spanned<i64>>,
    pub key_file: Option<String>,
    pub handshake_timeout: Option<Spanned<String>>,
    pub client_rate: Option<Spanned<f64>>,
    pub per_ip_connect_rate: Option<Spanned<f64>>,
    pub notices: Option<Spanned<Vec<String>>>,
    pub log_level: Option<Spanned<String>>,
}

const LOG_LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// Why `s` is not a `host:port` master address, or `None`.
pub fn master_addr_error(s: &str) -> Option<String> {
    let Some((host, port)) = s.rsplit_once(':') else { return Some(format!("`{s}` is not host:port")) };
    if host.trim_matches(|c| c == '[' || c == ']').is_empty() {
        return Some(format!("`{s}` has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => None,
        _ => Some(format!("`{s}`: `{port}` is not a port (1-65535)")),
    }
}

fn rate(diag: &mut Diag<'_>, v: &Option<Spanned<f64>>, key: &str) -> f64 {
    match v {
        None => 0.0,
        Some(s) if s.get_ref().is_finite() && *s.get_ref() >= 0.0 => *s.get_ref(),
        Some(s) => {
            diag.at(s, key, "must be a number >= 0 (per second; 0 turns the limit off)");
            0.0
        }
    }
}

fn secs(diag: &mut Diag<'_>, v: &Option<Spanned<i64>>, key: &str, min: i64, default: Duration) -> Duration {
    Duration::from_secs(int_in(diag, v, key, min, 31_536_000, default.as_secs() as i64) as u64)
}

pub(crate) fn validate_firehose(diag: &mut Diag<'_>, r: &RawFirehose) -> Firehose {
    let d = Firehose::default();
    let mut masters = Vec::new();
    if let Some(m) = &r.masters {
        for a in m.get_ref() {
            match master_addr_error(a) {
                None => masters.push(a.clone()),
                Some(e) => diag.at(m, "firehose.masters", e),
            }
        }
    }
    let balance = match &r.balance {
        None => d.balance,
        Some(b) => match b.get_ref().as_str() {
            "least_clients" => FirehoseBalance::LeastClients,
            "hash" => FirehoseBalance::Hash,
            other => {
                diag.at(b, "firehose.balance", format!("unknown balance `{other}`, expected least_clients or hash"));
                d.balance
            }
        },
    };
    let mut notices = Notices::default();
    if let Some(n) = &r.notices {
        for kind in n.get_ref() {
            match kind.as_str() {
                "connect" => notices.connect = true,
                "disconnect" => notices.disconnect = true,
                "reconnect" => notices.reconnect = true,
                other => diag.at(n, "firehose.notices", format!("unknown notice `{other}`, expected connect, disconnect or reconnect")),
            }
        }
    }
    let log_level = r.log_level.as_ref().and_then(|l| {
        let v = l.get_ref().to_ascii_lowercase();
        if LOG_LEVELS.contains(&v.as_str()) {
            Some(v)
        } else {
            diag.at(l, "firehose.log_level", format!("unknown level `{}`, expected one of: {}", l.get_ref(), LOG_LEVELS.join(", ")));
            None
        }
    });
    let cap = |diag: &mut Diag<'_>, v: &Option<Spanned<i64>>, key: &str, min: i64, default: usize| int_in(diag, v, key, min, 1 << 24, default as i64) as usize;
    Firehose {
        masters,
        balance,
        failover: r.failover.unwrap_or(d.failover),
        master_channel_capacity: cap(diag, &r.master_channel_capacity, "firehose.master_channel_capacity", 1, d.master_channel_capacity),
        channel_capacity: cap(diag, &r.channel_capacity, "firehose.channel_capacity", 1, d.channel_capacity),
        stale_timeout: secs(diag, &r.stale_timeout_secs, "firehose.stale_timeout_secs", 0, d.stale_timeout),
        stale_reap_interval: secs(diag, &r.stale_reap_interval_secs, "firehose.stale_reap_interval_secs", 1, d.stale_reap_interval),
        missed_packets_buffer_size: cap(diag, &r.missed_packets_buffer_size, "firehose.missed_packets_buffer_size", 0, d.missed_packets_buffer_size),
        max_stale_clients: cap(diag, &r.max_stale_clients, "firehose.max_stale_clients", 0, d.max_stale_clients),
        max_frame_length: int_in(diag, &r.max_frame_length, "firehose.max_frame_length", 16, 64 << 20, d.max_frame_length as i64) as usize,
        key_file: r.key_file.as_ref().map(PathBuf::from).unwrap_or(d.key_file),
        handshake_timeout: duration(diag, &r.handshake_timeout, "firehose.handshake_timeout", d.handshake_timeout),
        client_rate: rate(diag, &r.client_rate, "firehose.client_rate"),
        per_ip_connect_rate: rate(diag, &r.per_ip_connect_rate, "firehose.per_ip_connect_rate"),
        notices,
        log_level,
    }
}

/// Applies connserver's `VOLTLANE_*` variables: to `[firehose]`, and
/// `VOLTLANE_LISTENER_ADDRESS` to `listener` (the firehose listener's
/// address, when there is one). Returns the errors.
pub fn apply_env(f: &mut Firehose, listener: Option<&mut SocketAddr>, get: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let mut errors = Vec::new();
    let mut num = |name: &str, min: u64, out: &mut dyn FnMut(u64)| {
        if let Some(v) = get(name).filter(|v| !v.trim().is_empty()) {
            match v.trim().parse::<u64>() {
                Ok(n) if n >= min => out(n),
                _ => errors.push(format!("{name}: `{v}` is not a whole number >= {min}")),
            }
        }
    };
    num("VOLTLANE_MASTER_CHANNEL_CAPACITY", 1, &mut |n| f.master_channel_capacity = n as usize);
    num("VOLTLANE_CLIENTS_CHANNEL_CAPACITY", 1, &mut |n| f.channel_capacity = n as usize);
    num("VOLTLANE_CLIENTS_STALE_TIMEOUT_SECS", 0, &mut |n| f.stale_timeout = Duration::from_secs(n));
    num("VOLTLANE_CLIENTS_MAX_STALE_CLIENTS", 0, &mut |n| f.max_stale_clients = n as usize);
    num("VOLTLANE_CLIENTS_STALE_REAP_INTERVAL_SECS", 1, &mut |n| f.stale_reap_interval = Duration::from_secs(n));
    num("VOLTLANE_CLIENTS_MISSED_PACKETS_BUFFER_SIZE", 0, &mut |n| f.missed_packets_buffer_size = n as usize);
    if let Some(v) = get("VOLTLANE_MASTER_ADDRESS").filter(|v| !v.trim().is_empty()) {
        match master_addr_error(v.trim()) {
            None => f.masters = vec![v.trim().to_string()],
            Some(e) => errors.push(format!("VOLTLANE_MASTER_ADDRESS: {e}")),
        }
    }
    if let Some(v) = get("VOLTLANE_LOG_LEVEL").filter(|v| !v.trim().is_empty()) {
        let l = v.trim().to_ascii_lowercase();
        if LOG_LEVELS.contains(&l.as_str()) {
            f.log_level = Some(l);
        } else {
            errors.push(format!("VOLTLANE_LOG_LEVEL: unknown level `{v}`, expected one of: {}", LOG_LEVELS.join(", ")));
        }
    }
    if let Some(v) = get("VOLTLANE_LISTENER_ADDRESS").filter(|v| !v.trim().is_empty()) {
        match v.trim().to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(a)) => {
                if let Some(l) = listener {
                    *l = a;
                }
            }
            _ => errors.push(format!("VOLTLANE_LISTENER_ADDRESS: `{v}` is not an ip:port (or host:port) address")),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_addresses() {
        assert_eq!(master_addr_error("127.0.0.1:42001"), None);
        assert_eq!(master_addr_error("master.internal:7000"), None);
        assert_eq!(master_addr_error("[::1]:7000"), None);
        assert!(master_addr_error("127.0.0.1").is_some());
        assert!(master_addr_error(":7000").is_some());
        assert!(master_addr_error("h:0").is_some());
        assert!(master_addr_error("h:70000").is_some());
    }

    #[test]
    fn voltlane_environment() {
        let mut f = Firehose::default();
        let mut l: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let env = |k: &str| match k {
            "VOLTLANE_MASTER_ADDRESS" => Some("10.0.0.9:42001".to_string()),
            "VOLTLANE_LISTENER_ADDRESS" => Some("127.0.0.1:42000".to_string()),
            "VOLTLANE_CLIENTS_STALE_TIMEOUT_SECS" => Some("7".to_string()),
            "VOLTLANE_CLIENTS_MISSED_PACKETS_BUFFER_SIZE" => Some("64".to_string()),
            "VOLTLANE_LOG_LEVEL" => Some("Debug".to_string()),
            _ => None,
        };
        assert!(apply_env(&mut f, Some(&mut l), env).is_empty());
        assert_eq!(f.masters, vec!["10.0.0.9:42001".to_string()]);
        assert_eq!(l, "127.0.0.1:42000".parse().unwrap());
        assert_eq!(f.stale_timeout, Duration::from_secs(7));
        assert_eq!(f.missed_packets_buffer_size, 64);
        assert_eq!(f.log_level.as_deref(), Some("debug"));
        let bad = |k: &str| (k == "VOLTLANE_CLIENTS_CHANNEL_CAPACITY").then(|| "0".to_string());
        let errors = apply_env(&mut f, None, bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("VOLTLANE_CLIENTS_CHANNEL_CAPACITY"), "{errors:?}");
    }
}
