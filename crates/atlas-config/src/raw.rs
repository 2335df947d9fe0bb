//! The serde-facing configuration schema: exactly what a user writes in TOML.
//!
//! Every table denies unknown keys. Fields whose value is checked after
//! parsing are `Spanned` so a validation error can point at the line and
//! column of the offending value. Nothing here has meaning yet: `validate.rs`
//! turns a [`RawConfig`] into the runtime [`crate::Config`].

use serde::Deserialize;
use toml::Spanned;

/// One listener: the seed's `[listen]` table and each `[[listeners]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<Spanned<String>>,
    pub address: Option<Spanned<String>>,
    pub port: Option<Spanned<i64>>,
    pub mode: Option<Spanned<String>>,
    pub workers: Option<Spanned<i64>>,
    pub tls: Option<Spanned<RawTls>>,
    /// Which upstream group this listener balances over (default "default").
    pub group: Option<Spanned<String>>,
    /// Overrides `[routing] strategy` for this listener.
    pub strategy: Option<Spanned<String>>,
    /// Overrides `[routing] hash_key` for this listener.
    pub hash_key: Option<Spanned<String>>,
    pub backlog: Option<Spanned<i64>>,
    /// Static root for this listener (overrides `[static_files] root`).
    pub root: Option<Spanned<String>>,
    /// Most open client connections on this listener (whole process).
    pub max_connections: Option<Spanned<i64>>,
    /// `"stdout"` or a file path; absent: no access log.
    pub access_log: Option<Spanned<String>>,
    /// `"combined"` (default) or `"json"`.
    pub access_log_format: Option<Spanned<String>>,
    /// Tap this listener's traffic for `GET /api/v1/skim`.
    pub skim: Option<bool>,
    /// Copy this many leading payload bytes into each sample (default 0).
    pub skim_payload_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    /// More certificates, chosen by the SNI name the client sends.
    #[serde(default)]
    pub sni: Vec<Spanned<RawSniCert>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSniCert {
    /// Host names (exact, or `*.example.com`) this certificate serves.
    pub names: Vec<Spanned<String>>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Option<Spanned<String>>,
    pub address: Spanned<String>,
    pub port: Option<Spanned<i64>>,
    pub weight: Option<Spanned<i64>>,
    pub group: Option<Spanned<String>>,
    /// Most requests in flight to this upstream (whole process).
    pub max_conns: Option<Spanned<i64>>,
    /// Speak TLS to this upstream.
    pub tls: Option<bool>,
    /// PEM file of CA certificates to verify it (default: Mozilla's roots).
    pub tls_ca: Option<Spanned<String>>,
    /// Name sent as SNI and verified in its certificate (default: address host).
    pub tls_sni: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub strategy: Option<Spanned<String>>,
    pub hash_key: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatic {
    pub root: Option<Spanned<String>>,
    pub index: Option<Spanned<String>>,
    pub allow_symlinks_outside: Option<bool>,
    pub cache_max_bytes: Option<Spanned<i64>>,
    pub cache_max_file_bytes: Option<Spanned<i64>>,
    pub revalidate: Option<Spanned<String>>,
}

/// `[[routes]]`: a path prefix sent to static files or an upstream group.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Listener name; default: every HTTP-speaking listener.
    pub listener: Option<Spanned<String>>,
    pub prefix: Spanned<String>,
    /// Serve files from this directory ...
    pub static_root: Option<Spanned<String>>,
    /// ... or proxy to this upstream group.
    pub group: Option<Spanned<String>>,
    /// Remove the prefix before mapping to files (nginx `alias`).
    pub strip_prefix: Option<bool>,
    /// Tap the requests of this route for `GET /api/v1/skim`.
    pub skim: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub driver: Option<Spanned<String>>,
    pub workers: Option<Spanned<i64>>,
    pub ring_entries: Option<Spanned<i64>>,
    pub drain_timeout: Option<Spanned<String>>,
    pub takeover_socket: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub address: Option<Spanned<String>>,
    pub allow: Option<Vec<Spanned<String>>>,
    pub token: Option<Spanned<String>>,
    /// Sources allowed to call read endpoints (default: same as `allow`).
    pub read_allow: Option<Vec<Spanned<String>>>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<Spanned<String>>,
    pub client_header: Option<Spanned<String>>,
    pub client_idle: Option<Spanned<String>>,
    pub client_body: Option<Spanned<String>>,
    pub upstream_response: Option<Spanned<String>>,
    pub upstream_idle: Option<Spanned<String>>,
    pub tcp_idle: Option<Spanned<String>>,
    pub request: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_header_bytes: Option<Spanned<i64>>,
    pub max_headers: Option<Spanned<i64>>,
    pub max_body_bytes: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub queue_timeout: Option<Spanned<String>>,
    pub per_ip_connections: Option<Spanned<i64>>,
    pub per_ip_requests_per_sec: Option<Spanned<f64>>,
    pub per_ip_burst: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// `none` (default), `tcp` or `http`.
    pub check: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub expect_status: Option<Spanned<i64>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    /// Passive checks: consecutive failures that eject an upstream ...
    pub max_fails: Option<Spanned<i64>>,
    /// ... for this long.
    pub fail_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub max_idle_per_upstream: Option<Spanned<i64>>,
    pub idle_timeout: Option<Spanned<String>>,
}

/// The whole file. Sections are deserialised one by one (see `load.rs`) so
/// that an error in one section does not hide the errors in the others.
#[derive(Debug, Default)]
pub struct RawConfig {
    pub listen: Option<Spanned<RawListener>>,
    pub listeners: Vec<Spanned<RawListener>>,
    pub upstreams: Vec<Spanned<RawUpstream>>,
    pub routing: RawRouting,
    pub static_files: RawStatic,
    pub runtime: RawRuntime,
    pub api: Option<Spanned<RawApi>>,
    pub timeouts: RawTimeouts,
    pub limits: RawLimits,
    pub pool: RawPool,
    pub routes: Vec<Spanned<RawRoute>>,
    pub health: RawHealth,
    pub spatial: crate::spatial::RawSpatial,
    pub rooms: crate::rooms::RawRooms,
    pub store: crate::rooms::RawStore,
    pub firehose: crate::firehose::RawFirehose,
}
