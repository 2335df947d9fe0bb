//! `[spatial]`: the game gateway's settings (regions, heartbeats, transfers,
//! prediction, auto-scale, WebSocket limits and position rules), their
//! serde-facing form, validation and the `ATLAS_*` environment overrides.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::load::Diag;
use crate::validate::{duration, int_in};

/// Where the point sits inside a message that carries a position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PositionPlace {
    /// An object at `path` (empty: the root) with three number fields.
    Fields { path: Vec<String>, x: String, y: String, z: String },
    /// An array `[x, y, z]` (or `[x, y]`) at `path`.
    Array { path: Vec<String> },
}

/// Which client messages carry a position, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PositionRule {
    /// The message matches when this top-level field holds one of the values.
    pub field: String,
    pub values: Vec<String>,
    /// Tried in order; the first that yields a point wins.
    pub places: Vec<PositionPlace>,
}

/// The game gateway's settings.
#[derive(Clone, Debug)]
pub struct Spatial {
    /// World units per region (`ATLAS_REGION_SIZE`): the grid Atlas uses
    /// for regions no server covers (auto-scale) and the default bounds.
    pub region_size: f64,
    /// The interval Atlas asks servers to heartbeat at ...
    pub heartbeat_interval: Duration,
    /// ... and how many intervals may pass without one before a server is down.
    pub heartbeat_misses: u32,
    /// A player stays on its server while within this many world units
    /// outside the server's cube (no flapping on a border).
    pub hysteresis: f64,
    /// HMAC-SHA256 key for transfer tokens (servers that verify tokens
    /// share it); unset: a random key per process.
    pub token_secret: Option<String>,
    pub token_ttl: Duration,
    /// Registry snapshot, written on every change and read at start-up.
    pub snapshot: Option<PathBuf>,
    /// Ask Maestro for servers (`ATLAS_AUTO_SCALE`, `ATLAS_MAESTRO_URL`).
    pub auto_scale: bool,
    pub maestro_url: Option<String>,
    pub maestro_image: String,
    /// At most one request per region per cooldown.
    pub scale_cooldown: Duration,
    /// A region whose server holds this fraction of its capacity is near capacity.
    pub scale_threshold: f64,
    /// Predictive pre-connect: open the target's connection when a player
    /// is predicted to cross within this horizon (zero: off).
    pub predict_horizon: Duration,
    /// How long the old server may take to deliver its last messages and
    /// answer the close after a switch.
    pub transfer_drain_timeout: Duration,
    /// Hand the player's state over at a switch: InitiateTransfer to the
    /// old server, its TransferAccepted's state in AcceptTransfer to the new.
    pub transfer_messages: bool,
    /// Largest WebSocket frame in either direction (close 1009 beyond).
    pub max_frame_bytes: u64,
    /// Ping an idle client this often (zero: never).
    pub ping_interval: Duration,
    /// Close a session with no traffic either way for this long.
    pub idle_timeout: Duration,
    /// Position rules; empty: the defaults (every form in the spec).
    pub positions: Vec<PositionRule>,
}

impl Default for Spatial {
    fn default() -> Self {
        Spatial {
            region_size: 1000.0,
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_misses: 3,
            hysteresis: 10.0,
            token_secret: None,
            token_ttl: Duration::from_secs(60),
            snapshot: None,
            auto_scale: false,
            maestro_url: None,
            maestro_image: "horizon:latest".into(),
            scale_cooldown: Duration::from_secs(60),
            scale_threshold: 0.9,
            predict_horizon: Duration::from_millis(500),
            transfer_drain_timeout: Duration::from_secs(2),
            transfer_messages: false,
            max_frame_bytes: 1 << 20,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            positions: Vec::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpatial {
    pub region_size: Option<Spanned<f64>>,
    pub heartbeat_interval: Option<Spanned<String>>,
    pub heartbeat_misses: Option<Spanned<i64>>,
    pub hysteresis: Option<Spanned<f64>>,
    pub token_secret: Option<Spanned<String>>,
    pub token_ttl: Option<Spanned<String>>,
    pub snapshot: Option<Spanned<String>>,
    pub auto_scale: Option<bool>,
    pub maestro_url: Option<Spanned<String>>,
    pub maestro_image: Option<Spanned<String>>,
    pub scale_cooldown: Option<Spanned<String>>,
    pub scale_threshold: Option<Spanned<f64>>,
    /// "0s" turns prediction off.
    pub predict_horizon: Option<Spanned<String>>,
    pub transfer_drain_timeout: Option<Spanned<String>>,
    pub transfer_messages: Option<bool>,
    pub max_frame_bytes: Option<Spanned<i64>>,
    /// "0s" turns keepalive pings off.
    pub ping_interval: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub positions: Vec<Spanned<RawPosition>>,
}

/// `[[spatial.positions]]`: one rule with one place.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPosition {
    pub field: Spanned<String>,
    pub values: Vec<String>,
    /// Dotted path of the object holding the fields (default: the root) ...
    pub path: Option<String>,
    pub x: Option<String>,
    pub y: Option<String>,
    pub z: Option<String>,
    /// ... or dotted path of an `[x, y, z]` array.
    pub array: Option<String>,
}

fn dotted(s: &str) -> Vec<String> {
    s.split('.').filter(|p| !p.is_empty()).map(str::to_string).collect()
}

fn positive(diag: &mut Diag<'_>, v: &Option<Spanned<f64>>, key: &str, default: f64, allow_zero: bool) -> f64 {
    match v {
        None => default,
        Some(s) if s.get_ref().is_finite() && (*s.get_ref() > 0.0 || (allow_zero && *s.get_ref() == 0.0)) => *s.get_ref(),
        Some(s) => {
            diag.at(s, key, if allow_zero { "must be a number >= 0" } else { "must be a number > 0" });
            default
        }
    }
}

/// A duration where zero means "off".
fn optional_duration(diag: &mut Diag<'_>, v: &Option<Spanned<String>>, key: &str, default: Duration) -> Duration {
    match v {
        None => default,
        Some(s) => crate::parse_duration(s.get_ref()).unwrap_or_else(|e| {
            diag.at(s, key, e);
            default
        }),
    }
}

/// Checks a Maestro URL: `http://host:port[/]` or `host:port`.
pub fn maestro_url_error(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if url.starts_with("https://") {
        return Some("Maestro over https is not supported; use http://host:port".into());
    }
    let host_port = rest.trim_end_matches('/');
    match host_port.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() && !host_port.contains('/') => None,
        _ => Some(format!("`{url}` is not http://host:port")),
    }
}

pub(crate) fn validate(diag: &mut Diag<'_>, r: &RawSpatial) -> Spatial {
    let d = Spatial::default();
    let mut positions = Vec::new();
    for (i, p) in r.positions.iter().enumerate() {
        let key = format!("spatial.positions[{i}]");
        let p = p.get_ref();
        if p.field.get_ref().is_empty() || p.values.is_empty() {
            diag.at(&p.field, &key, "needs a `field` and at least one of `values`");
            continue;
        }
        let place = match (&p.array, &p.path) {
            (Some(a), None) if p.x.is_none() && p.y.is_none() && p.z.is_none() => PositionPlace::Array { path: dotted(a) },
            (Some(_), _) => {
                diag.at(&p.field, &key, "`array` cannot be combined with `path`, `x`, `y` or `z`");
                continue;
            }
            (None, path) => PositionPlace::Fields {
                path: path.as_deref().map(dotted).unwrap_or_default(),
                x: p.x.clone().unwrap_or_else(|| "x".into()),
                y: p.y.clone().unwrap_or_else(|| "y".into()),
                z: p.z.clone().unwrap_or_else(|| "z".into()),
            },
        };
        positions.push(PositionRule { field: p.field.get_ref().clone(), values: p.values.clone(), places: vec![place] });
    }
    let maestro_url = r.maestro_url.as_ref().and_then(|u| match maestro_url_error(u.get_ref()) {
        None => Some(u.get_ref().clone()),
        Some(e) => {
            diag.at(u, "spatial.maestro_url", e);
            None
        }
    });
    let scale_threshold = positive(diag, &r.scale_threshold, "spatial.scale_threshold", d.scale_threshold, false);
    if scale_threshold > 1.0 {
        if let Some(s) = &r.scale_threshold {
            diag.at(s, "spatial.scale_threshold", "is a fraction of capacity: between 0 and 1");
        }
    }
    Spatial {
        region_size: positive(diag, &r.region_size, "spatial.region_size", d.region_size, false),
        heartbeat_interval: duration(diag, &r.heartbeat_interval, "spatial.heartbeat_interval", d.heartbeat_interval),
        heartbeat_misses: int_in(diag, &r.heartbeat_misses, "spatial.heartbeat_misses", 1, 100, d.heartbeat_misses as i64) as u32,
        hysteresis: positive(diag, &r.hysteresis, "spatial.hysteresis", d.hysteresis, true),
        token_secret: r.token_secret.as_ref().map(|s| s.get_ref().clone()).filter(|s| !s.is_empty()),
        token_ttl: duration(diag, &r.token_ttl, "spatial.token_ttl", d.token_ttl),
        snapshot: r.snapshot.as_ref().map(|s| PathBuf::from(s.get_ref())),
        auto_scale: r.auto_scale.unwrap_or(false),
        maestro_url,
        maestro_image: r.maestro_image.as_ref().map(|s| s.get_ref().clone()).unwrap_or(d.maestro_image),
        scale_cooldown: duration(diag, &r.scale_cooldown, "spatial.scale_cooldown", d.scale_cooldown),
        scale_threshold,
        predict_horizon: optional_duration(diag, &r.predict_horizon, "spatial.predict_horizon", d.predict_horizon),
        transfer_drain_timeout: duration(diag, &r.transfer_drain_timeout, "spatial.transfer_drain_timeout", d.transfer_drain_timeout),
        transfer_messages: r.transfer_messages.unwrap_or(false),
        max_frame_bytes: int_in(diag, &r.max_frame_bytes, "spatial.max_frame_bytes", 125, 1 << 30, d.max_frame_bytes as i64) as u64,
        ping_interval: optional_duration(diag, &r.ping_interval, "spatial.ping_interval", d.ping_interval),
        idle_timeout: duration(diag, &r.idle_timeout, "spatial.idle_timeout", d.idle_timeout),
        positions,
    }
}

/// Applies `ATLAS_REGION_SIZE`, `ATLAS_MAESTRO_URL` and `ATLAS_AUTO_SCALE`
/// (they override the file, as in seed 000). Returns the errors of bad values.
pub fn apply_env(s: &mut Spatial, get: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(v) = get("ATLAS_REGION_SIZE") {
        match v.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => s.region_size = f,
            _ => errors.push(format!("ATLAS_REGION_SIZE: `{v}` is not a number > 0")),
        }
    }
    if let Some(v) = get("ATLAS_MAESTRO_URL").filter(|v| !v.trim().is_empty()) {
        match maestro_url_error(v.trim()) {
            None => s.maestro_url = Some(v.trim().to_string()),
            Some(e) => errors.push(format!("ATLAS_MAESTRO_URL: {e}")),
        }
    }
    if let Some(v) = get("ATLAS_AUTO_SCALE") {
        match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => s.auto_scale = true,
            "0" | "false" | "no" | "off" | "" => s.auto_scale = false,
            _ => errors.push(format!("ATLAS_AUTO_SCALE: `{v}` is not true or false")),
        }
    }
    errors
}
