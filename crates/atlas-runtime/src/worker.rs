//! Worker threads: one monoio runtime each, owning its listener sockets,
//! buffer pool and upstream keep-alive pool; accept loops spawn one task
//! per connection onto the same thread (no cross-thread hand-off).

use std::cell::RefCell;
use std::net::TcpListener as StdListener;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use atlas_balance::{GroupShared, Picker};
use atlas_config::{Config, Mode, Strategy};
use atlas_proxy::http::codec::simple_response;
use atlas_proxy::io::{read_more, write_vec};
use atlas_proxy::pool::ConnPool;
use atlas_proxy::ListenerCtx;
use monoio::net::{TcpListener, TcpStream};

use crate::{BoundListener, ChosenDriver};

pub struct Workers {
    pub handles: Vec<JoinHandle<()>>,
    pub driver: ChosenDriver,
}

/// Spawns `cfg.workers` threads serving the bound listeners.
pub fn start(cfg: Arc<Config>, bound: Vec<BoundListener>, driver: ChosenDriver) -> std::io::Result<Workers> {
    let groups: Arc<Vec<Arc<GroupShared>>> = Arc::new(cfg.groups.iter().map(|g| Arc::new(GroupShared::new(g, cfg.workers))).collect());
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
        let groups = groups.clone();
        let h = std::thread::Builder::new().name(format!("atlas-worker-{w}")).spawn(move || {
            let body = worker_main(w, cfg.clone(), groups, sockets);
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

async fn worker_main(w: usize, cfg: Arc<Config>, groups: Arc<Vec<Arc<GroupShared>>>, sockets: Vec<(usize, StdListener)>) {
    let pool = Rc::new(ConnPool::new(cfg.pool.max_idle_per_upstream, cfg.pool.idle_timeout));
    for (li, sock) in sockets {
        let l = &cfg.listeners[li];
        let group = l.group.map(|g| groups[g].clone());
        let seed = (w as u64) << 32 | li as u64;
        let ctx = Rc::new(ListenerCtx {
            worker: w,
            name: l.name.clone(),
            proto: "http",
            picker: group.as_ref().map(|g| RefCell::new(Picker::new(l.strategy, g, seed))),
            group,
            hash_key: (l.strategy == Strategy::Hash).then(|| l.hash_key.clone()),
            pool: pool.clone(),
            timeouts: cfg.timeouts,
            limits: cfg.limits,
        });
        match TcpListener::from_std(sock) {
            Ok(listener) => {
                monoio::spawn(accept_loop(ctx, listener, l.mode));
            }
            Err(e) => tracing::error!(worker = w, listener = %l.name, error = %e, "internal: cannot register listener"),
        }
    }
    loop {
        monoio::time::sleep(Duration::from_secs(1)).await;
        pool.sweep();
    }
}

async fn accept_loop(ctx: Rc<ListenerCtx>, listener: TcpListener, mode: Mode) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                tracing::warn!(listener = %ctx.name, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        let ctx = ctx.clone();
        match mode {
            Mode::Http => {
                monoio::spawn(atlas_proxy::http::serve(ctx, stream, peer, fd));
            }
            Mode::Tcp => {
                monoio::spawn(atlas_proxy::tcp::serve_plain(ctx, stream, peer));
            }
            Mode::Game | Mode::Static | Mode::Firehose => {
                monoio::spawn(not_yet(stream));
            }
        }
    }
}

/// Placeholder for modes whose issue has not landed (the game gateway):
/// answers every request with 503 and closes.
async fn not_yet(mut stream: TcpStream) {
    let mut buf = atlas_proxy::io::take_buf();
    let _ = monoio::time::timeout(Duration::from_secs(5), read_more(&mut stream, &mut buf, 16 * 1024)).await;
    let mut resp = simple_response(503, "Service Unavailable", "the game gateway is not implemented in this build yet\n", false);
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
