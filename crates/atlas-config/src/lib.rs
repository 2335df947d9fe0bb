//! Atlas configuration: the validated runtime [`Config`] and how to load it.
//!
//! Users write TOML (`raw.rs` is that schema, serde-facing, unknown keys
//! denied). `load.rs` parses it section by section and `validate.rs` checks
//! meaning and builds [`Config`]; every problem becomes a [`ConfigError`] with
//! file, line, column and key, and all of them are reported at once (like
//! `nginx -t`). Nothing here panics on user input.

mod firehose;
mod load;
mod raw;
mod rooms;
mod spatial;
mod validate;

pub use firehose::{master_addr_error, Firehose, FirehoseBalance, Notices};
pub use rooms::{redis_url_error, Rooms, Store, StoreBackend};
pub use spatial::{apply_env, maestro_url_error, PositionPlace, PositionRule, Spatial};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One problem in a configuration, located in its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the error has no position (e.g. a missing section).
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `upstreams[1].weight`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: {}: {}", self.file, self.line, self.column, self.key, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

/// Every error found in one configuration.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/1.1 reverse proxy.
    Http,
    /// Layer-4 passthrough.
    Tcp,
    /// Static files from a root directory.
    Static,
    /// WebSocket game gateway: spatial routing and seamless transfers.
    Game,
    /// Connection firehose (not in this build yet; rejected by validation).
    Firehose,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Tcp => "tcp",
            Mode::Static => "static",
            Mode::Game => "game",
            Mode::Firehose => "firehose",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Smooth weighted round robin (plain round robin when all weights are equal).
    RoundRobin,
    /// Weighted random choice.
    Random,
    /// Fewest in-flight requests across the whole process, relative to weight.
    LeastConnections,
    /// Consistent hash (ring with weight-proportional virtual nodes).
    Hash,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::LeastConnections => "least_connections",
            Strategy::Hash => "hash",
        }
    }
}

/// What the `hash` strategy hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    /// The request target (path and query).
    Uri,
    /// The path without the query.
    Path,
    /// A request header, lower-cased name. Missing header: client IP.
    Header(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Auto,
    IoUring,
    Epoll,
}

/// One certificate chain and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SNI names it serves; empty for a listener's default certificate.
    pub names: Vec<String>,
    /// Where it was configured (`file:line:column: key`), for error messages.
    pub origin: String,
}

/// TLS termination on a listener: a default certificate and SNI ones.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub default: CertFiles,
    pub sni: Vec<CertFiles>,
}

impl TlsListener {
    pub fn all(&self) -> impl Iterator<Item = &CertFiles> {
        std::iter::once(&self.default).chain(self.sni.iter())
    }
}

/// Where a `[[routes]]` prefix sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    Static {
        root: PathBuf,
        strip_prefix: bool,
    },
    /// Index into [`Config::groups`].
    Group(usize),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub target: RouteTarget,
    /// Skim this route's requests (even when the listener is not tapped).
    pub skim: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Combined,
    Json,
}

/// A listener's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    /// `None`: standard output.
    pub path: Option<PathBuf>,
    pub format: AccessLogFormat,
}

/// A listener's traffic tap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skim {
    /// Every request of the listener is sampled (`skim = true` on it).
    pub all: bool,
    /// Some of its routes are sampled (`skim = true` on the route).
    pub routes: bool,
    /// Leading payload bytes copied into each sample (0: metadata only).
    pub payload_bytes: usize,
}

impl Skim {
    /// Whether the listener needs a tap at all.
    pub fn enabled(&self) -> bool {
        self.all || self.routes
    }
}

/// `[static_files]` settings shared by every static root.
#[derive(Debug, Clone)]
pub struct StaticSettings {
    pub index: String,
    /// Follow symlinks that point outside the root (off: 404).
    pub allow_symlinks_outside: bool,
    /// Per-worker in-memory cache: total bytes and largest cached file.
    pub cache_max_bytes: usize,
    pub cache_max_file_bytes: usize,
    /// How long a cached file is trusted before its mtime/size is checked.
    pub revalidate: Duration,
}

impl Default for StaticSettings {
    fn default() -> Self {
        StaticSettings {
            index: "index.html".into(),
            allow_symlinks_outside: false,
            cache_max_bytes: 64 << 20,
            cache_max_file_bytes: 1 << 20,
            revalidate: Duration::from_secs(1),
        }
    }
}

/// TLS towards an upstream.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// CA bundle (PEM); `None`: the bundled Mozilla roots.
    pub ca: Option<PathBuf>,
    /// SNI name and the name its certificate must carry.
    pub sni: String,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub addr: SocketAddr,
    pub mode: Mode,
    pub tls: Option<TlsListener>,
    /// Index into [`Config::groups`]; `None` for modes that need no upstreams.
    pub group: Option<usize>,
    pub strategy: Strategy,
    pub hash_key: HashKey,
    pub backlog: u32,
    /// Static root of a `static` listener (canonical path).
    pub static_root: Option<PathBuf>,
    /// Most open client connections on this listener (0: no limit).
    pub max_connections: usize,
    /// Prefix routes, longest first.
    pub routes: Vec<Route>,
    pub access_log: Option<AccessLog>,
    pub skim: Skim,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    /// As written (host name or IP), for logs.
    pub host: String,
    pub port: u16,
    /// Resolved when the configuration was loaded.
    pub addr: SocketAddr,
    pub weight: u32,
    /// Most requests in flight to it across the process (0: no limit).
    pub max_conns: u32,
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub upstreams: Vec<Upstream>,
}

#[derive(Debug, Clone)]
pub struct Api {
    pub addr: SocketAddr,
    /// Sources allowed to call write endpoints (default: loopback and
    /// private ranges, where Horizon servers and operators live).
    pub allow: Vec<ipnet::IpNet>,
    /// Bearer token required on write endpoints, when set.
    pub token: Option<String>,
    /// Sources allowed to call read endpoints (metrics, status, skim,
    /// dashboard). `/health` and `/ready` are open to all.
    pub read_allow: Vec<ipnet::IpNet>,
}

/// The default `[api] allow`: loopback and private ranges.
pub fn default_api_allow() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"].iter().filter_map(|c| c.parse().ok()).collect()
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect to an upstream.
    pub connect: Duration,
    /// Whole request head from a client (slowloris guard).
    pub client_header: Duration,
    /// Idle keep-alive client connection between requests.
    pub client_idle: Duration,
    /// Between two reads of a client request body.
    pub client_body: Duration,
    /// From request sent to upstream response head received.
    pub upstream_response: Duration,
    /// Between two reads of an upstream response body.
    pub upstream_idle: Duration,
    /// Idle TCP-mode (and upgraded) connection, both directions quiet.
    pub tcp_idle: Duration,
    /// Whole exchange, first request byte to last response byte; past it
    /// the connection is closed. `None` (the default, as in nginx and
    /// HAProxy): no limit, so long downloads are not cut.
    pub request: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            client_header: Duration::from_secs(10),
            client_idle: Duration::from_secs(60),
            client_body: Duration::from_secs(60),
            upstream_response: Duration::from_secs(60),
            upstream_idle: Duration::from_secs(60),
            tcp_idle: Duration::from_secs(3600),
            request: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request head (request line + headers); beyond: 431.
    pub max_header_bytes: usize,
    /// Most request headers; beyond: 431.
    pub max_headers: usize,
    /// Largest request body (0: no limit); beyond: 413.
    pub max_body_bytes: u64,
    /// Most open client connections per worker (0: no limit); beyond, a
    /// new connection is accepted and closed at once.
    pub max_connections: usize,
    /// How long a request may wait for an upstream below its `max_conns`
    /// (zero: answer 503 at once).
    pub queue_timeout: Duration,
    /// Per client IP, per worker (0: off): open connections ...
    pub per_ip_connections: u32,
    /// ... and requests per second (token bucket, `per_ip_burst` deep);
    /// beyond: 429 (HTTP) or the connection closed (TCP).
    pub per_ip_requests_per_sec: f64,
    pub per_ip_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_body_bytes: 0,
            max_connections: 0,
            queue_timeout: Duration::ZERO,
            per_ip_connections: 0,
            per_ip_requests_per_sec: 0.0,
            per_ip_burst: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Pool {
    /// Idle keep-alive connections kept per upstream, per worker.
    pub max_idle_per_upstream: usize,
    /// An idle pooled connection older than this is closed, not reused.
    pub idle_timeout: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Pool { max_idle_per_upstream: 1024, idle_timeout: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCheck {
    None,
    /// A TCP connect.
    Tcp,
    /// `GET path` answered with the expected status.
    Http,
}

/// Active and passive health checking of upstreams.
#[derive(Debug, Clone)]
pub struct Health {
    pub check: HealthCheck,
    pub path: String,
    pub expect_status: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before a down upstream is up again.
    pub rise: u32,
    /// Consecutive failures before an up upstream is down.
    pub fall: u32,
    /// Passive: consecutive failed requests (connect error, reset, 5xx)
    /// that eject an upstream from a worker's rotation (0: off) ...
    pub max_fails: u32,
    /// ... for this long, after which it is tried again.
    pub fail_timeout: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            check: HealthCheck::None,
            path: "/".into(),
            expect_status: 200,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
        }
    }
}

/// The validated configuration every other part of Atlas runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Option<PathBuf>,
    pub driver: Driver,
    pub workers: usize,
    pub ring_entries: u32,
    /// Longest graceful drain on SIGTERM/SIGINT/SIGQUIT or takeover.
    pub drain_timeout: Duration,
    /// Unix socket where this process offers its listeners to a successor
    /// (`--takeover-socket` overrides it).
    pub takeover_socket: PathBuf,
    pub listeners: Vec<Listener>,
    pub groups: Vec<Group>,
    pub static_root: Option<PathBuf>,
    pub static_files: StaticSettings,
    pub api: Option<Api>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub pool: Pool,
    pub health: Health,
    /// `[spatial]`: the game gateway.
    pub spatial: Spatial,
    /// `[rooms]`: the room gateway.
    pub rooms: Rooms,
    /// `[store]`: where rooms and (with Redis) the server registry live.
    pub store: Store,
    /// `[firehose]`: the connection firehose (connserver protocol v2).
    pub firehose: Firehose,
}

/// Loads and validates a configuration file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors(vec![ConfigError { file: name.clone(), line: 0, column: 0, key: "(file)".into(), message: format!("cannot read: {e}") }]))?;
    let mut cfg = load_str(&text, &name)?;
    cfg.source = Some(path.to_path_buf());
    with_env(cfg, &name)
}

/// Applies the `ATLAS_*` overrides of `[spatial]` and connserver's
/// `VOLTLANE_*` ones of `[firehose]` from the environment.
fn with_env(mut cfg: Config, name: &str) -> Result<Config, ConfigErrors> {
    let mut errors = apply_env(&mut cfg.spatial, |k| std::env::var(k).ok());
    let listener = cfg.listeners.iter_mut().find(|l| l.mode == Mode::Firehose).map(|l| &mut l.addr);
    errors.extend(firehose::apply_env(&mut cfg.firehose, listener, |k| std::env::var(k).ok()));
    if errors.is_empty() && cfg.listeners.iter().any(|l| l.mode == Mode::Firehose) && cfg.firehose.masters.is_empty() {
        errors.push("a listener has mode = \"firehose\" but [firehose] masters is empty (or set VOLTLANE_MASTER_ADDRESS)".into());
    }
    if errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(
            errors.into_iter().map(|message| ConfigError { file: name.to_string(), line: 0, column: 0, key: "(environment)".into(), message }).collect(),
        ))
    }
}

/// Like [`load_str`], but host names are not looked up (they resolve to
/// 0.0.0.0): for fuzzing and tests that must not touch DNS.
pub fn load_str_offline(text: &str, name: &str) -> Result<Config, ConfigErrors> {
    validate::OFFLINE.with(|o| o.set(true));
    let r = load_str(text, name);
    validate::OFFLINE.with(|o| o.set(false));
    r
}

/// Loads and validates configuration text; `name` is used in error messages.
pub fn load_str(text: &str, name: &str) -> Result<Config, ConfigErrors> {
    let mut diag = load::Diag::new(name, text);
    let raw = load::parse_raw(&mut diag);
    if !diag.errors.is_empty() && diag.errors.iter().all(|e| e.key == "(syntax)") {
        // Meaning checks on a half-parsed document only add noise.
        return Err(ConfigErrors(diag.errors));
    }
    let cfg = validate::validate(&mut diag, raw);
    if diag.errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(diag.errors))
    }
}

/// The embedded default used when `atlas` runs with no CONFIG: the game
/// gateway of seed 000 on `ATLAS_PROXY_ADDR` (default 0.0.0.0:9000) and its
/// API on `ATLAS_API_ADDR` (default 127.0.0.1:9001, loopback for safety).
pub fn embedded_default() -> Result<Config, ConfigErrors> {
    let proxy = std::env::var("ATLAS_PROXY_ADDR").unwrap_or_else(|_| "0.0.0.0:9000".into());
    let api = std::env::var("ATLAS_API_ADDR").unwrap_or_else(|_| "127.0.0.1:9001".into());
    let text = format!("[listen]\nname = \"game\"\naddress = {proxy:?}\nmode = \"game\"\n\n[api]\naddress = {api:?}\n",);
    let name = "(embedded default; ATLAS_PROXY_ADDR / ATLAS_API_ADDR)";
    with_env(load_str(&text, name)?, name)
}

/// connserver's defaults as a configuration: a firehose listener on
/// 127.0.0.1:42000 to the master 127.0.0.1:42001, both overridden by
/// `--listen` / `--master` (through `VOLTLANE_LISTENER_ADDRESS` /
/// `VOLTLANE_MASTER_ADDRESS`) and the other `VOLTLANE_*` variables.
pub fn firehose_default() -> Result<Config, ConfigErrors> {
    let text = "[listen]\nname = \"firehose\"\naddress = \"127.0.0.1:42000\"\nmode = \"firehose\"\n\n[firehose]\nmasters = [\"127.0.0.1:42001\"]\n";
    let name = "(firehose default; --listen / --master / VOLTLANE_*)";
    with_env(load_str(text, name)?, name)
}

/// Parses durations such as `250ms`, `5s`, `2m`, `1h`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration (examples: 250ms, 5s, 2m, 1h)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown duration unit `{u}` in `{s}` (use ms, s, m or h)")),
    };
    if !secs.is_finite() || !(0.0..=31_536_000.0).contains(&secs) {
        return Err(format!("duration `{s}` is out of range (0 to 365 days)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests;
