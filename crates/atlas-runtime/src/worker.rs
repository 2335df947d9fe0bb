//! Worker threads: one monoio runtime each, owning its listener sockets,
//! buffer pool and upstream keep-alive pool; accept loops spawn one task
//! per connection onto the same thread (no cross-thread hand-off).

use std::cell::RefCell;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use atlas_balance::Picker;
use atlas_config::{Config, Listener, Mode, RouteTarget, Strategy};
use atlas_proxy::http::codec::simple_response;
use atlas_proxy::io::{read_more, write_vec};
use atlas_proxy::pool::ConnPool;
use atlas_proxy::static_files::fs::{FileCache, Root};
use atlas_proxy::static_files::StaticSite;
use atlas_proxy::{ListenerCtx, Target, Upstreams};
use monoio::net::{TcpListener, TcpStream};
use monoio_rustls::TlsAcceptor;

use crate::{BoundListener, ChosenDriver, Shared};

pub struct Workers {
    pub handles: Vec<JoinHandle<()>>,
    pub driver: ChosenDriver,
}

/// Spawns `cfg.workers` threads serving the bound listeners.
pub fn start(cfg: Arc<Config>, shared: Arc<Shared>, bound: Vec<BoundListener>, driver: ChosenDriver) -> std::io::Result<Workers> {
    // Hand each worker its own socket of every listener.
    let mut per_worker: Vec<Vec<(usize, StdListener)>> = (0..cfg.workers).map(|_| Vec::new()).collect();
    for b in bound {
        for (w, s) in b.sockets.into_iter().enumerate() {
            per_worker[w].push((b.index, s));
        }
    }
    let mut handles = Vec::new();
    for (w, sockets) in per_worker.into_iter().enumerate() {
        let cfg = cfg.clone();
        let shared = shared.clone();
        let h = std::thread::Builder::new().name(format!("atlas-worker-{w}")).spawn(move || {
            let body = worker_main(w, cfg.clone(), shared, sockets);
            let res = match driver {
                ChosenDriver::IoUring => uring_runtime(w, cfg.ring_entries).map(|mut rt| rt.block_on(body)),
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

/// Builds one worker's view of a listener: its default target and routes.
struct CtxBuilder<'a> {
    w: usize,
    cfg: &'a Config,
    shared: &'a Shared,
    cache: Rc<RefCell<FileCache>>,
    sites: usize,
    seeds: u64,
}

impl CtxBuilder<'_> {
    fn upstreams(&mut self, group: usize, strategy: Strategy) -> Target {
        self.seeds += 1;
        let g = self.shared.groups[group].clone();
        let picker = RefCell::new(Picker::new(strategy, &g, (self.w as u64) << 32 | self.seeds));
        Target::Upstreams(Upstreams { group: g, picker, tls: self.shared.group_tls[group].clone() })
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

    fn ctx(&mut self, l: &Listener, pool: &Rc<ConnPool>) -> ListenerCtx {
        let default = match l.mode {
            Mode::Http | Mode::Tcp => l.group.map(|g| self.upstreams(g, l.strategy)),
            Mode::Static => l.static_root.as_deref().and_then(|r| self.site(r, None)),
            Mode::Game | Mode::Firehose => None,
        };
        let mut routes = Vec::new();
        for r in &l.routes {
            let t = match &r.target {
                RouteTarget::Group(g) => Some(self.upstreams(*g, l.strategy)),
                RouteTarget::Static { root, strip_prefix } => self.site(root, strip_prefix.then(|| r.prefix.clone())),
            };
            if let Some(t) = t {
                routes.push((r.prefix.clone(), t));
            }
        }
        ListenerCtx {
            worker: self.w,
            name: l.name.clone(),
            proto: if l.tls.is_some() { "https" } else { "http" },
            default,
            routes,
            hash_key: (l.strategy == Strategy::Hash).then(|| l.hash_key.clone()),
            pool: pool.clone(),
            timeouts: self.cfg.timeouts,
            limits: self.cfg.limits,
        }
    }
}

async fn worker_main(w: usize, cfg: Arc<Config>, shared: Arc<Shared>, sockets: Vec<(usize, StdListener)>) {
    let pool = Rc::new(ConnPool::new(cfg.pool.max_idle_per_upstream, cfg.pool.idle_timeout));
    let cache = Rc::new(RefCell::new(FileCache::new(cfg.static_files.cache_max_bytes, cfg.static_files.cache_max_file_bytes)));
    let mut builder = CtxBuilder { w, cfg: &cfg, shared: &shared, cache, sites: 0, seeds: 0 };
    for (li, sock) in sockets {
        let l = &cfg.listeners[li];
        let ctx = Rc::new(builder.ctx(l, &pool));
        let tls = shared.server_tls[li].as_ref().map(|t| TlsAcceptor::from(t.config.clone()));
        match TcpListener::from_std(sock) {
            Ok(listener) => {
                monoio::spawn(accept_loop(ctx, listener, l.mode, tls));
            }
            Err(e) => tracing::error!(worker = w, listener = %l.name, error = %e, "internal: cannot register listener"),
        }
    }
    loop {
        monoio::time::sleep(Duration::from_secs(1)).await;
        pool.sweep();
    }
}

async fn accept_loop(ctx: Rc<ListenerCtx>, listener: TcpListener, mode: Mode, tls: Option<TlsAcceptor>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                atlas_proxy::log_limited(|| tracing::warn!(listener = %ctx.name, error = %e, "accept failed"));
                monoio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        match &tls {
            None => match mode {
                Mode::Http | Mode::Static => {
                    let fd = stream.as_raw_fd();
                    monoio::spawn(atlas_proxy::http::serve(ctx, stream, peer, fd));
                }
                Mode::Tcp => {
                    monoio::spawn(atlas_proxy::tcp::serve_plain(ctx, stream, peer));
                }
                Mode::Game | Mode::Firehose => {
                    monoio::spawn(not_yet(stream));
                }
            },
            Some(acceptor) => {
                monoio::spawn(serve_tls(ctx, acceptor.clone(), stream, peer, mode));
            }
        }
    }
}

/// TLS handshake (bounded by the header timeout), then the mode's handler
/// over the encrypted stream: the same code as for plain connections.
async fn serve_tls(ctx: Rc<ListenerCtx>, acceptor: TlsAcceptor, stream: TcpStream, peer: SocketAddr, mode: Mode) {
    let fd = stream.as_raw_fd();
    let tls = match monoio::time::timeout(ctx.timeouts.client_header, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "client: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "client: TLS handshake timed out");
            return;
        }
    };
    match mode {
        Mode::Http | Mode::Static => atlas_proxy::http::serve(ctx, tls, peer, fd).await,
        Mode::Tcp => atlas_proxy::tcp::serve_stream(ctx, tls, peer, fd).await,
        Mode::Game | Mode::Firehose => {}
    }
}

/// Placeholder for modes whose issue has not landed (the game gateway):
/// answers every request with 503 and closes.
async fn not_yet(mut stream: TcpStream) {
    let mut buf = atlas_proxy::io::take_buf();
    let _ = monoio::time::timeout(Duration::from_secs(5), read_more(&mut stream, &mut buf, 16 * 1024)).await;
    let mut resp = simple_response(503, "the game gateway is not implemented in this build yet", false, false, "");
    let _ = write_vec(&mut stream, &mut resp).await;
    atlas_proxy::io::give_buf(buf);
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
