//! `atlas [CONFIG]`: command line, logging, start-up wiring and signals.
//!
//! Start-up order: parse arguments, load and validate the configuration
//! (every error printed with file:line:column), choose the I/O driver, bind
//! every listener (a busy port fails here, before anything is served), start
//! the API thread and the workers, then wait for a signal on the main thread
//! (signals are blocked in every other thread).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

const USAGE: &str = "\
atlas — load balancer and game gateway

USAGE:
    atlas [CONFIG]                 run with CONFIG (TOML); without it, the embedded
                                   game-gateway default (ATLAS_PROXY_ADDR, ATLAS_API_ADDR)
    atlas --master HOST:PORT [--listen IP:PORT]
                                   a connection firehose to that master (connserver's
                                   command line; without CONFIG: listener 127.0.0.1:42000)
    atlas --check CONFIG           validate CONFIG, print every error, exit non-zero on error
    atlas --version                print the version
    atlas --help                   print this help

OPTIONS:
    --takeover                     take the listening sockets over from the running Atlas,
                                   start serving on them, then let it drain and exit
    --takeover-socket PATH         Unix socket for takeover, on both sides: where a running
                                   Atlas offers its sockets and where --takeover connects
                                   (default: [runtime] takeover_socket, /tmp/atlas-takeover.sock)
    --master HOST:PORT             the firehose's master (overrides [firehose] masters)
    --listen IP:PORT               the firehose listener's address

ENVIRONMENT:
    ATLAS_LOG                      log filter (tracing EnvFilter syntax), default \"info\"
    ATLAS_PROXY_ADDR, ATLAS_API_ADDR   addresses of the embedded default
                                   (default 0.0.0.0:9000 and 127.0.0.1:9001)
    ATLAS_REGION_SIZE              world units per region (overrides [spatial] region_size)
    ATLAS_AUTO_SCALE, ATLAS_MAESTRO_URL   ask Maestro for servers (override [spatial])
    VOLTLANE_*                     connserver's variables override [firehose] (MASTER_ADDRESS,
                                   LISTENER_ADDRESS, LOG_LEVEL, CLIENTS_STALE_TIMEOUT_SECS, ...)
";

struct Args {
    config: Option<PathBuf>,
    check: bool,
    takeover: bool,
    takeover_socket: Option<PathBuf>,
    /// connserver's `--master` / `--listen` (the firehose).
    master: Option<String>,
    listen: Option<String>,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args { config: None, check: false, takeover: false, takeover_socket: None, master: None, listen: None };
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-h" | "--help") => {
                print!("{USAGE}");
                return Ok(None);
            }
            Some("-V" | "--version") => {
                println!("atlas {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            Some("--check" | "-t") => args.check = true,
            Some("--takeover") => args.takeover = true,
            Some("--takeover-socket") => {
                args.takeover_socket = Some(it.next().map(PathBuf::from).ok_or("--takeover-socket needs a PATH")?);
            }
            Some(s) if s.starts_with("--takeover-socket=") => args.takeover_socket = Some(PathBuf::from(&s["--takeover-socket=".len()..])),
            Some("--master") => args.master = Some(it.next().and_then(|a| a.into_string().ok()).ok_or("--master needs HOST:PORT")?),
            Some("--listen") => args.listen = Some(it.next().and_then(|a| a.into_string().ok()).ok_or("--listen needs IP:PORT")?),
            Some(s) if s.starts_with('-') && s.len() > 1 => return Err(format!("unknown option `{s}` (see --help)")),
            _ => {
                if args.config.is_some() {
                    return Err("more than one CONFIG given (see --help)".into());
                }
                args.config = Some(PathBuf::from(a));
            }
        }
    }
    if args.check && args.config.is_none() {
        return Err("--check needs a CONFIG".into());
    }
    Ok(Some(args))
}

fn init_logging(cfg: &atlas_config::Config) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("ATLAS_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // connserver's log_level, for the firehose's lines (ATLAS_LOG decides
    // for everything else).
    if let Some(level) = &cfg.firehose.log_level {
        if let Ok(d) = format!("atlas_game::firehose={level}").parse() {
            filter = filter.add_directive(d);
        }
    }
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
}

/// The signals Atlas handles. They are blocked in every thread and taken by
/// the main thread with sigtimedwait (see `run`).
fn handled_signals() -> SigSet {
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT, Signal::SIGHUP, Signal::SIGUSR1] {
        signals.add(s);
    }
    signals
}

fn main() -> ExitCode {
    // Block the handled signals before any thread exists, so every thread
    // inherits the mask. A thread started earlier (the rooms thread was)
    // would take a SIGTERM or SIGHUP with its default action, killing the
    // process, whenever the main thread was not in sigtimedwait.
    if let Err(e) = handled_signals().thread_block() {
        eprintln!("atlas: internal: cannot block signals: {e}");
        return ExitCode::from(1);
    }
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atlas: {e}");
            return ExitCode::from(2);
        }
    };
    // connserver's flags win over its variables, which win over the file
    // (and stay in force across reloads, which read the variables again).
    // SAFETY (set_var): no other thread exists yet.
    if let Some(m) = &args.master {
        std::env::set_var("VOLTLANE_MASTER_ADDRESS", m);
    }
    if let Some(l) = &args.listen {
        std::env::set_var("VOLTLANE_LISTENER_ADDRESS", l);
    }
    let loaded = match &args.config {
        Some(p) => atlas_config::load_file(p),
        None if args.master.is_some() || args.listen.is_some() => atlas_config::firehose_default(),
        None => atlas_config::embedded_default(),
    };
    let cfg = match loaded {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("atlas: configuration has {} error(s)", errors.0.len());
            return ExitCode::from(1);
        }
    };
    // Per-worker metric slots are sized before anything registers a series.
    atlas_observe::metrics::init(cfg.workers);
    atlas_game::registry::registry().configure(&cfg.spatial);
    let shared = match atlas_runtime::Shared::build(&cfg, None) {
        Ok(s) => s,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("atlas: configuration has {} error(s)", errors.len());
            return ExitCode::from(1);
        }
    };
    if args.check {
        let upstreams: usize = cfg.groups.iter().map(|g| g.upstreams.len()).sum();
        println!(
            "atlas: configuration {} is valid ({} listener(s), {} upstream(s), {} worker(s))",
            args.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            cfg.listeners.len(),
            upstreams,
            cfg.workers
        );
        return ExitCode::SUCCESS;
    }
    init_logging(&cfg);
    match run(cfg, shared, &args) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Restores the game server registry from its snapshot and starts the
/// monitor (heartbeats, auto-scale) and the room gateway (its store) when a
/// listener is in game mode.
fn start_game(cfg: &atlas_config::Config) -> Result<(), String> {
    // The room API answers even without a game listener: open the store
    // the config names.
    atlas_game::rooms::start(cfg)?;
    atlas_game::firehose::start(cfg)?;
    if !cfg.listeners.iter().any(|l| l.mode == atlas_config::Mode::Game) {
        return Ok(());
    }
    let s = &cfg.spatial;
    if let Some(path) = &s.snapshot {
        match atlas_game::registry::registry().restore(path) {
            Ok(n) => tracing::info!(servers = n, path = %path.display(), "game server registry restored from its snapshot"),
            Err(e) => tracing::warn!("config: {e}; starting with an empty registry"),
        }
    }
    if s.auto_scale && s.maestro_url.is_none() {
        tracing::warn!("config: auto-scale is on but no Maestro URL is set ([spatial] maestro_url or ATLAS_MAESTRO_URL): no servers will be requested");
    }
    if cfg.api.is_none() {
        tracing::warn!("config: a game listener without [api]: game servers have nowhere to register");
    }
    atlas_game::registry::spawn_monitor(cfg.api.as_ref().map(|a| a.addr));
    Ok(())
}

/// Waits up to `timeout` for one of `signals` (all blocked in every thread).
fn wait_signal(signals: &SigSet, timeout: Duration) -> Option<Signal> {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: a valid signal set and timespec; no siginfo requested.
    let n = unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &ts) };
    if n > 0 {
        Signal::try_from(n).ok()
    } else {
        None
    }
}

fn run(cfg: atlas_config::Config, shared: atlas_runtime::Shared, args: &Args) -> Result<ExitCode, String> {
    if args.config.is_none() && args.master.is_none() && args.listen.is_none() {
        tracing::info!("no CONFIG given: running the embedded default (the game gateway and its API)");
    }
    start_game(&cfg)?;
    // Blocked in main() before any thread existed; taken here.
    let signals = handled_signals();

    // Watch the file before anything is announced, so a change made right
    // after start-up is not missed (it is applied once serving).
    let (tx, rx) = mpsc::channel();
    let _watcher = match &args.config {
        Some(path) => match atlas_runtime::control::watch(path, tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("{e}; reload with SIGHUP instead");
                None
            }
        },
        None => None,
    };
    let driver = atlas_runtime::choose_driver(cfg.driver)?;
    tracing::info!(driver = driver.as_str(), requested = ?cfg.driver, workers = cfg.workers, "I/O driver chosen");
    let takeover_path = args.takeover_socket.clone().unwrap_or_else(|| cfg.takeover_socket.clone());
    let (mut inherited, session) = if args.takeover {
        let (sockets, session) = atlas_runtime::takeover::take_over(&takeover_path).map_err(|e| format!("{e}; the running Atlas keeps serving"))?;
        tracing::info!(sockets = sockets.len(), path = %takeover_path.display(), "takeover: received the running Atlas' listening sockets");
        (sockets, Some(session))
    } else {
        (Vec::new(), None)
    };
    let bound = atlas_runtime::bind_all(&cfg, &mut inherited)?;
    for gone in inherited.drain(..) {
        tracing::info!(listener = %gone.name, addr = %gone.addr, "takeover: listener no longer configured; closing it after the handover");
    }
    let offered: Vec<(String, std::net::SocketAddr, std::os::fd::RawFd)> = bound
        .iter()
        .flat_map(|b| {
            let name = cfg.listeners[b.index].name.clone();
            b.sockets.iter().map(move |s| (name.clone(), b.addr, std::os::fd::AsRawFd::as_raw_fd(s)))
        })
        .collect();
    let offer = atlas_runtime::takeover::Offer::dup(&offered)?;
    for b in &bound {
        let l = &cfg.listeners[b.index];
        tracing::info!(name = %l.name, addr = %b.addr, mode = l.mode.as_str(), "listening");
    }
    let api_addr = cfg.api.as_ref().map(|a| a.addr);
    let bound_names: Vec<(String, std::net::SocketAddr)> = bound.iter().map(|b| (cfg.listeners[b.index].name.clone(), b.addr)).collect();
    let current = atlas_runtime::control::first_generation(cfg, shared);
    let admin = Arc::new(atlas_admin::AdminState {
        current: current.clone(),
        started: Instant::now(),
        driver: driver.as_str(),
        config_path: args.config.clone(),
        last_reload: Mutex::new(serde_json::Value::Null),
        ready: AtomicBool::new(false),
        bound: bound_names,
    });
    if let Some(addr) = api_addr {
        let (addr, _h) = atlas_admin::start(addr, admin.clone()).map_err(|e| format!("api: cannot listen on {addr}: {e}"))?;
        tracing::info!(%addr, "api listening");
    }
    {
        let current = current.clone();
        atlas_proxy::tls::spawn_reloader(
            move || {
                let g = current.load();
                g.cfg.listeners.iter().zip(&g.shared.server_tls).filter_map(|(l, t)| t.clone().map(|t| (l.name.clone(), t))).collect()
            },
            Duration::from_secs(1),
        );
    }
    let workers = atlas_runtime::start(current.clone(), bound, driver).map_err(|e| format!("internal: cannot start workers: {e}"))?;
    atlas_runtime::health::spawn(current.clone());
    admin.ready.store(true, Ordering::Relaxed);
    // Serving now: let the previous process go, then offer our sockets to the next.
    if session.is_some() {
        // Its firehose clients will come back here with their ids.
        atlas_game::firehose::expect_handoff(Duration::from_secs(15));
    }
    let offered = match session {
        Some(session) => session.finish(offer).map(|()| tracing::info!("takeover: complete; the previous Atlas is draining")),
        None => atlas_runtime::takeover::serve(&takeover_path, offer),
    };
    match offered {
        Ok(()) => tracing::info!(path = %takeover_path.display(), "offering our sockets to a successor (atlas --takeover)"),
        Err(e) => tracing::warn!("{e}"),
    }

    let reload = || match &args.config {
        Some(path) => {
            let outcome = match atlas_runtime::control::reload(&current, path) {
                atlas_runtime::control::ReloadOutcome::Applied { version, needs_restart } => {
                    serde_json::json!({ "result": "applied", "version": version, "needs_restart": needs_restart })
                }
                atlas_runtime::control::ReloadOutcome::Rejected(errors) => serde_json::json!({ "result": "rejected", "errors": errors }),
            };
            if let Ok(mut last) = admin.last_reload.lock() {
                *last = outcome;
            }
        }
        None => tracing::warn!("reload asked, but Atlas runs on its embedded default (no CONFIG file)"),
    };
    let mut draining: Option<Instant> = None;
    loop {
        match wait_signal(&signals, Duration::from_millis(100)) {
            Some(Signal::SIGHUP) => {
                tracing::info!("SIGHUP: reloading the configuration");
                reload();
            }
            Some(Signal::SIGUSR1) => {
                tracing::info!("SIGUSR1: reopening access logs");
                atlas_observe::access_log::reopen();
            }
            Some(sig) if draining.is_some() => {
                tracing::warn!(signal = ?sig, "second signal while draining: exiting now");
                return Ok(ExitCode::from(1));
            }
            Some(sig) => {
                let timeout = current.load().cfg.drain_timeout;
                tracing::info!(signal = ?sig, ?timeout, "draining: no new connections; finishing in-flight requests (signal again to exit at once)");
                atlas_proxy::drain::request_process_drain();
                // No successor: our copies of the listening sockets go too,
                // so new connections are refused rather than left queued.
                atlas_runtime::takeover::withdraw();
                draining = Some(Instant::now());
            }
            None => {}
        }
        if draining.is_none() && atlas_proxy::drain::process_drain_requested() {
            tracing::info!("draining: a successor took over our sockets");
            draining = Some(Instant::now());
        }
        if rx.try_recv().is_ok() {
            // Editors write in several steps: let the file settle, then reload once.
            std::thread::sleep(Duration::from_millis(150));
            while rx.try_recv().is_ok() {}
            reload();
        }
        if let Some(since) = draining {
            if workers.handles.iter().all(|h| h.is_finished()) {
                atlas_game::firehose::wait_saved(Duration::from_secs(3));
                tracing::info!(took = ?since.elapsed(), "drained; exiting");
                atlas_observe::access_log::wait_written(Duration::from_secs(2));
                return Ok(ExitCode::SUCCESS);
            }
            if since.elapsed() >= current.load().cfg.drain_timeout {
                tracing::warn!("drain timeout reached: exiting with connections still open");
                atlas_game::firehose::wait_saved(Duration::from_secs(3));
                atlas_observe::access_log::wait_written(Duration::from_secs(2));
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}
