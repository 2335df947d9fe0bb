//! Worker threads: one monoio runtime each, owning its listener sockets,
//! buffer pool and upstream keep-alive pool; accept loops spawn one task
//! per connection onto the same thread (no cross-thread hand-off).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use atlas_balance::Picker;
use atlas_config::{Config, Listener, Mode, RouteTarget, Strategy};
use atlas_observe::metrics::{self, ListenerStats, Reject, UpstreamKey};
use atlas_observe::PerWorker;
use atlas_proxy::drain::{self, Drain};

use atlas_proxy::limits::ListenerConns;
use atlas_proxy::pool::ConnPool;
use atlas_proxy::static_files::fs::{FileCache, Root};
use atlas_proxy::static_files::StaticSite;
use atlas_proxy::upstream::Passive;
use atlas_proxy::{ListenerCtx, Skim, Target, Upstreams};
use monoio::net::{TcpListener, TcpStream};

use crate::{BoundListener, ChosenDriver, Shared};

/// One applied configuration: what workers build their contexts from.
pub struct Generation {
    pub version: u64,
    pub cfg: Arc<Config>,
    pub shared: Arc<Shared>,
}

/// The current generation, swapped by a reload, read by the workers.
pub type Current = Arc<ArcSwap<Generation>>;

pub struct Workers {
    pub handles: Vec<JoinHandle<()>>,
    pub driver: ChosenDriver,
}

/// How often a worker looks for a reload or a drain request.
const HOUSEKEEPING: Duration = Duration::from_millis(100);

/// Spawns `cfg.workers` threads serving the bound listeners.
pub fn start(current: Current, bound: Vec<BoundListener>, driver: ChosenDriver) -> std::io::Result<Workers> {
    let gen = current.load_full();
    let workers = gen.cfg.workers;
    // Hand each worker its own sockets of every listener (a listener taken
    // over from a process with more workers may give one worker several).
    let mut per_worker: Vec<Vec<(usize, StdListener)>> = (0..workers).map(|_| Vec::new()).collect();
    for b in bound {
        for (i, s) in b.sockets.into_iter().enumerate() {
            per_worker[i % workers].push((b.index, s));
        }
    }
    let mut handles = Vec::new();
    for (w, sockets) in per_worker.into_iter().enumerate() {
        let current = current.clone();
        let ring_entries = gen.cfg.ring_entries;
        let h = std::thread::Builder::new().name(format!("atlas-worker-{w}")).spawn(move || {
            let body = worker_main(w, current, sockets);
            let res = match driver {
                ChosenDriver::IoUring => uring_runtime(w, ring_entries).map(|mut rt| rt.block_on(body)),
                ChosenDriver::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().map(|mut rt| rt.block_on(body)),
            };
            if let Err(e) = res {
                tracing::error!(worker = w, error = %e, "internal: cannot start worker runtime");
                std::process::exit(1);
            }
        })?;
        handles.push(h);
    }
    Ok(Workers { handles, driver })
}

/// Builds one worker's view of a listener for one generation.
struct CtxBuilder<'a> {
    w: usize,
    cfg: &'a Config,
    shared: &'a Shared,
    pool: Rc<ConnPool>,
    cache: Rc<RefCell<FileCache>>,
    sites: usize,
    seeds: u64,
}

impl CtxBuilder<'_> {
    fn upstreams(&mut self, listener: &str, group: usize, strategy: Strategy) -> Target {
        self.seeds += 1;
        let g = self.shared.groups[group].clone();
        let picker = RefCell::new(Picker::new(strategy, &g, (self.w as u64) << 32 | self.seeds));
        let h = &self.cfg.health;
        let passive = RefCell::new(Passive::new(g.len(), h.max_fails, h.fail_timeout));
        let registry = metrics::registry();
        let stats =
            g.names.iter().map(|n| registry.upstream(UpstreamKey { listener: listener.to_string(), group: g.name.clone(), upstream: n.clone() })).collect();
        Target::Upstreams(Upstreams { group: g, picker, tls: self.shared.group_tls[group].clone(), passive, stats })
    }

    fn site(&mut self, root: &Path, strip_prefix: Option<String>) -> Option<Target> {
        self.sites += 1;
        match Root::open(root, self.cfg.static_files.allow_symlinks_outside) {
            Ok(root) => {
                Some(Target::Static(StaticSite { id: self.sites, root, strip_prefix, settings: self.cfg.static_files.clone(), cache: self.cache.clone() }))
            }
            Err(e) => {
                tracing::error!(worker = self.w, root = %root.display(), error = %e, "config: cannot open static root");
                None
            }
        }
    }

    fn ctx(&mut self, li: usize) -> ListenerCtx {
        let l: &Listener = &self.cfg.listeners[li];
        let default = match l.mode {
            Mode::Http | Mode::Tcp => l.group.map(|g| self.upstreams(&l.name, g, l.strategy)),
            Mode::Static => l.static_root.as_deref().and_then(|r| self.site(r, None)),
            Mode::Game | Mode::Firehose => None,
        };
        let mut routes = Vec::new();
        for r in &l.routes {
            let t = match &r.target {
                RouteTarget::Group(g) => Some(self.upstreams(&l.name, *g, l.strategy)),
                RouteTarget::Static { root, strip_prefix } => self.site(root, strip_prefix.then(|| r.prefix.clone())),
            };
            if let Some(target) = t {
                routes.push(atlas_proxy::Route { prefix: r.prefix.clone(), target, skim: r.skim });
            }
        }
        ListenerCtx {
            worker: self.w,
            name: l.name.clone(),
            mode: l.mode,
            proto: if l.tls.is_some() { "https" } else { "http" },
            tls: self.shared.server_tls[li].as_ref().map(|t| t.config.clone()),
            default,
            routes,
            hash_key: (l.strategy == Strategy::Hash).then(|| l.hash_key.clone()),
            pool: self.pool.clone(),
            timeouts: self.cfg.timeouts,
            limits: self.cfg.limits,
            conns: ListenerConns { count: listener_counter(&l.name), max: l.max_connections },
            stats: metrics::registry().listener(&l.name),
            access_log: self.shared.access_logs.get(li).cloned().flatten(),
            skim: l.skim.enabled().then(|| Skim { tap: atlas_observe::skim::tap(&l.name), all: l.skim.all, payload_bytes: l.skim.payload_bytes }),
            next: RefCell::new(None),
        }
    }
}

/// The open-connection count of a listener, shared by every worker and kept
/// across reloads (by listener name).
fn listener_counter(name: &str) -> Arc<AtomicUsize> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<AtomicUsize>>>> = OnceLock::new();
    let mut reg = REGISTRY.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    reg.entry(name.to_string()).or_default().clone()
}

async fn worker_main(w: usize, current: Current, sockets: Vec<(usize, StdListener)>) {
    let drain = Drain::current();
    let gen = current.load_full();
    let pool = Rc::new(ConnPool::new(gen.cfg.pool.max_idle_per_upstream, gen.cfg.pool.idle_timeout));
    let cache = Rc::new(RefCell::new(FileCache::new(gen.cfg.static_files.cache_max_bytes, gen.cfg.static_files.cache_max_file_bytes)));
    // The context of each listener this worker serves, by listener name.
    let mut ctxs: Vec<Rc<ListenerCtx>> = Vec::new();
    {
        let mut b = CtxBuilder { w, cfg: &gen.cfg, shared: &gen.shared, pool: pool.clone(), cache: cache.clone(), sites: 0, seeds: 0 };
        for (li, sock) in sockets {
            let ctx = Rc::new(b.ctx(li));
            match TcpListener::from_std(sock) {
                Ok(listener) => {
                    monoio::spawn(accept_loop(ctx.clone(), listener));
                }
                Err(e) => tracing::error!(worker = w, listener = %ctx.name, error = %e, "internal: cannot register listener"),
            }
            if !ctxs.iter().any(|c| c.name == ctx.name) {
                ctxs.push(ctx);
            }
        }
    }
    // Worker 0 runs the firehose's master links (when there is a firehose).
    atlas_game::firehose::master::on_worker_start(w);
    let mut version = gen.version;
    let mut last_sweep = Instant::now();
    loop {
        monoio::time::sleep(HOUSEKEEPING).await;
        if drain::process_drain_requested() {
            drain.start();
            break;
        }
        let gen = current.load();
        if gen.version != version {
            version = gen.version;
            apply(w, &gen, &mut ctxs, &pool, &cache);
        }
        atlas_observe::access_log::flush_thread();
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            pool.sweep();
            atlas_proxy::limits::sweep(&current.load().cfg.limits);
            last_sweep = Instant::now();
        }
    }
    // Accept loops have stopped; wait for the last connection to finish.
    drain.idle().await;
    atlas_observe::access_log::flush_thread();
    tracing::debug!(worker = w, "worker drained");
}

/// Applies a new generation on this worker: a new context per listener,
/// linked from the old one so connections move over at their next request.
/// The pool and the file cache carry over (their limits are updated).
fn apply(w: usize, gen: &Generation, ctxs: &mut [Rc<ListenerCtx>], pool: &Rc<ConnPool>, cache: &Rc<RefCell<FileCache>>) {
    pool.set_limits(gen.cfg.pool.max_idle_per_upstream, gen.cfg.pool.idle_timeout);
    cache.borrow_mut().set_limits(gen.cfg.static_files.cache_max_bytes, gen.cfg.static_files.cache_max_file_bytes);
    let mut b = CtxBuilder { w, cfg: &gen.cfg, shared: &gen.shared, pool: pool.clone(), cache: cache.clone(), sites: 0, seeds: 0 };
    for slot in ctxs.iter_mut() {
        let Some(li) = gen.cfg.listeners.iter().position(|l| l.name == slot.name) else { continue };
        let new = Rc::new(b.ctx(li));
        *slot.next.borrow_mut() = Some(new.clone());
        *slot = new;
    }
}

/// Counts a client connection as active on its listener while it lives.
struct ActiveConn {
    stats: Arc<PerWorker<ListenerStats>>,
    w: usize,
}

impl ActiveConn {
    fn new(stats: Arc<PerWorker<ListenerStats>>, w: usize) -> Self {
        let s = stats.slot(w);
        s.connections_total.inc();
        s.connections_active.add(1);
        ActiveConn { stats, w }
    }
}

impl Drop for ActiveConn {
    fn drop(&mut self) {
        self.stats.slot(self.w).connections_active.add(-1);
    }
}

async fn accept_loop(mut ctx: Rc<ListenerCtx>, listener: TcpListener) {
    let w = ctx.worker;
    let drain = Drain::current();
    // The loop counts as live until it has seen its canceled accept
    // complete: an accept that raced the cancel still yields a connection,
    // and the worker must not exit before that connection is served.
    let _loop_hold = drain.hold();
    loop {
        let Some(handle) = drain.cancel_handle() else {
            break;
        };
        let accepted = listener.cancelable_accept(handle).await;
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(_) if drain.is_draining() => break,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                atlas_proxy::log_limited(|| tracing::warn!(listener = %ctx.name, error = %e, "accept failed"));
                monoio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if let Some(newer) = ListenerCtx::latest(&ctx) {
            ctx = newer;
        }
        // Limits: past them the connection is accepted and closed at once.
        let limits = &ctx.limits;
        if limits.max_connections > 0 && drain.live() >= limits.max_connections {
            ctx.stats().reject(Reject::ConnectionLimit);
            atlas_proxy::log_limited(
                || tracing::warn!(listener = %ctx.name, limit = limits.max_connections, "worker connection limit reached; closing new connections"),
            );
            continue;
        }
        let Some(listener_slot) = ctx.conns.admit() else {
            ctx.stats().reject(Reject::ConnectionLimit);
            atlas_proxy::log_limited(
                || tracing::warn!(listener = %ctx.name, limit = ctx.conns.max, "listener connection limit reached; closing new connections"),
            );
            continue;
        };
        let Some(ip_slot) = atlas_proxy::limits::admit_connection(peer.ip(), limits) else {
            ctx.stats().reject(Reject::ConnectionLimit);
            atlas_proxy::log_limited(|| tracing::warn!(listener = %ctx.name, %peer, "per-IP connection limit reached; closing"));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        // Live from the accept on, not from when the task first runs.
        let hold = drain.hold();
        let stats = ctx.stats.clone();
        let conn_gauge = ActiveConn::new(stats, w);
        let slots = (listener_slot, ip_slot, hold, conn_gauge);
        // One task per connection, sized for its own mode's future: a single
        // async block over every mode would be as large as the largest (the
        // TLS one, about 12 KiB), paid by every idle connection.
        match (ctx.tls.clone(), ctx.mode) {
            (None, Mode::Http | Mode::Static) => {
                let fd = stream.as_raw_fd();
                spawn_conn(slots, atlas_proxy::http::serve(ctx, stream, peer, fd))
            }
            (None, Mode::Tcp) => spawn_conn(slots, atlas_proxy::tcp::serve_plain(ctx, stream, peer)),
            (None, Mode::Game) => {
                let fd = stream.as_raw_fd();
                spawn_conn(slots, atlas_game::session::serve(ctx, stream, peer, fd))
            }
            (None, Mode::Firehose) => {
                let fd = stream.as_raw_fd();
                spawn_conn(slots, atlas_game::firehose::serve(ctx, stream, peer, fd))
            }
            (Some(config), _) => spawn_conn(slots, serve_tls(ctx, config, stream, peer)),
        }
    }
    tracing::debug!(listener = %ctx.name, "stopped accepting");
}

/// Runs one connection's handler in its own task, holding its admission
/// slots until it ends.
fn spawn_conn<T: 'static, F: std::future::Future<Output = ()> + 'static>(slots: T, f: F) {
    monoio::spawn(async move {
        let _slots = slots;
        f.await
    });
}

/// TLS handshake (bounded by the header timeout), then the mode's handler
/// over the encrypted stream: the same code as for plain connections.
async fn serve_tls(ctx: Rc<ListenerCtx>, config: Arc<rustls::ServerConfig>, stream: TcpStream, peer: SocketAddr) {
    let _live = Drain::current().connection();
    let fd = stream.as_raw_fd();
    let tls = match monoio::time::timeout(ctx.timeouts.client_header, atlas_proxy::handshake::accept(config, stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.stats().reject(Reject::TlsHandshake);
            tracing::debug!(%peer, error = %e, "client: TLS handshake failed");
            return;
        }
        Err(_) => {
            ctx.stats().reject(Reject::TlsHandshake);
            tracing::debug!(%peer, "client: TLS handshake timed out");
            return;
        }
    };
    match ctx.mode {
        Mode::Http | Mode::Static => atlas_proxy::http::serve(ctx, tls, peer, fd).await,
        Mode::Tcp => atlas_proxy::tcp::serve_stream(ctx, tls, peer, fd).await,
        Mode::Game => atlas_game::session::serve(ctx, tls, peer, fd).await,
        Mode::Firehose => atlas_game::firehose::serve(ctx, tls, peer, fd).await,
    }
}

/// Builds an io_uring runtime with COOP_TASKRUN + SINGLE_ISSUER (each ring
/// is driven by its own worker thread only). Without COOP_TASKRUN every
/// completion for a socket another CPU wrote to costs that CPU an IPI to
/// interrupt this worker; measured on kernel 6.18 with wrk c=100 it was
/// 317k vs 483k requests in 4 s (benches/RESULTS.md). DEFER_TASKRUN was
/// measured too and brought nothing but a worse p99. Kernels older than 6.0
/// reject the flags: then the ring is built plain.
fn uring_runtime(w: usize, entries: u32) -> std::io::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    let mut tuned = io_uring::IoUring::builder();
    tuned.setup_coop_taskrun().setup_single_issuer();
    match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().uring_builder(tuned).with_entries(entries).enable_timer().build() {
        Ok(rt) => {
            if w == 0 {
                tracing::info!("io_uring rings use COOP_TASKRUN and SINGLE_ISSUER");
            }
            Ok(rt)
        }
        Err(e) => {
            if w == 0 {
                tracing::info!(error = %e, "io_uring without COOP_TASKRUN/SINGLE_ISSUER (kernel too old?)");
            }
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(entries).enable_timer().build()
        }
    }
}
