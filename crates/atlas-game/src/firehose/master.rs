//! The master links: one TCP stream per master, dialled (and redialled
//! with backoff, 100 ms doubling to 5 s), whose outbox is written as it
//! fills and whose packets are read and handed to the workers; plus the
//! stale-client reaper and the hand-over of the client table to the next
//! Atlas (`persist.rs`).
//!
//! Where they run: on worker 0, when every master address is a literal
//! `ip:port`. A frame from a client of that worker then reaches the link
//! with no thread switch; with one worker that is every frame, and it cut
//! Atlas' CPU per frame by 6 to 15 % against a thread of their own in two
//! interleaved A/B sets (`benches/RESULTS.md`). A master named by host
//! name needs a blocking DNS lookup at each dial, which must not stall a
//! worker: those links run on their own thread, `atlas-firehose`, as do
//! links started by a reload after the workers (the firehose was just
//! added to the config).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;

use super::hub::{lock, Hub, Link, State};
use super::persist;
use super::wire::{self, FLAG_DATA, FLAG_KICK, FLAG_RECONNECT};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Master bytes read per call.
const READ_SIZE: usize = 256 * 1024;

/// Whether worker 0 has started, and links waiting for it to.
struct Place {
    worker0: bool,
    pending: Option<Arc<Hub>>,
}

static PLACE: std::sync::Mutex<Place> = std::sync::Mutex::new(Place { worker0: false, pending: None });

/// Starts the links: on worker 0 when it can take them (see the module
/// header), else on their own thread.
pub fn spawn(hub: Arc<Hub>) -> std::io::Result<()> {
    if hub.links.iter().all(|l| l.addr.parse::<std::net::SocketAddr>().is_ok()) {
        let mut p = lock(&PLACE);
        if !p.worker0 {
            p.pending = Some(hub);
            return Ok(());
        }
    }
    spawn_thread(hub)
}

/// Called by every worker as it starts: worker 0 takes the links.
pub fn on_worker_start(w: usize) {
    if w != 0 {
        return;
    }
    let hub = {
        let mut p = lock(&PLACE);
        p.worker0 = true;
        p.pending.take()
    };
    if let Some(hub) = hub {
        tracing::debug!("firehose: master links run on worker 0");
        run_here(hub);
    }
}

/// Spawns the links, the hand-over and the reaper on this thread's runtime.
fn run_here(hub: Arc<Hub>) {
    for link in &hub.links {
        monoio::spawn(run_link(hub.clone(), link.clone()));
    }
    monoio::spawn(hand_over(hub.clone()));
    monoio::spawn(reaper(hub));
}

fn spawn_thread(hub: Arc<Hub>) -> std::io::Result<()> {
    std::thread::Builder::new().name("atlas-firehose".into()).spawn(move || {
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build();
        let mut rt = match rt {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "internal: the firehose thread cannot start its runtime; no master links");
                return;
            }
        };
        rt.block_on(async move {
            run_here(hub);
            std::future::pending::<()>().await
        });
    })?;
    Ok(())
}

async fn reaper(hub: Arc<Hub>) {
    loop {
        let every = hub.settings.load().stale_reap_interval.max(Duration::from_millis(100));
        monoio::time::sleep(every).await;
        hub.reap(Instant::now());
    }
}

/// After a takeover, imports the previous Atlas' client table as soon as it
/// appears. When this process drains: waits for the workers to close their
/// clients (they go stale; up to 1 s) and for the packets the masters had
/// in flight (100 ms), then writes the table for the next Atlas.
async fn hand_over(hub: Arc<Hub>) {
    // On a worker: its drain waits for this (and the links it needs).
    let _hold = atlas_proxy::drain::Drain::current().hold();
    let path = persist::path_for(&hub.settings.load().key_file);
    while !atlas_proxy::drain::process_drain_requested() {
        monoio::time::sleep(Duration::from_millis(20)).await;
        if hub.awaiting_handoff() {
            hub.import_file(&path);
        }
    }
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until && lock(&hub.table).clients.values().any(|e| matches!(e.state, State::Live { .. })) {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    monoio::time::sleep(Duration::from_millis(100)).await;
    let clients = hub.export();
    if !clients.is_empty() {
        match persist::save(&path, &clients) {
            Ok(()) => tracing::info!(clients = clients.len(), path = %path.display(), "firehose: client table written for the next Atlas"),
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "internal: cannot write the firehose client table; its clients cannot reconnect to the next Atlas")
            }
        }
    }
    hub.saved.store(true, Ordering::SeqCst);
}

/// Dials, serves and redials one master for ever.
async fn run_link(hub: Arc<Hub>, link: Arc<Link>) {
    let Some(mut bell) = link.bell.waiter() else { return };
    let mut backoff = BACKOFF_MIN;
    let mut was_up = false;
    loop {
        let conn = monoio::time::timeout(Duration::from_secs(5), TcpStream::connect(link.addr.as_str())).await;
        let stream = match conn {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                atlas_proxy::log_limited(
                    || tracing::warn!(master = %link.addr, error = %e, "upstream: cannot reach the firehose master; retrying with backoff"),
                );
                monoio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(_) => {
                atlas_proxy::log_limited(|| tracing::warn!(master = %link.addr, "upstream: connecting to the firehose master timed out; retrying"));
                monoio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        backoff = BACKOFF_MIN;
        link.up.store(true, Ordering::Relaxed);
        tracing::info!(master = %link.addr, again = was_up, "firehose: master link up");
        was_up = true;
        serve_link(&hub, &link, stream, &mut bell).await;
        link.up.store(false, Ordering::Relaxed);
        hub.stats.link_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(master = %link.addr, queued = link.queued(), "upstream: firehose master link down; redialling (its clients are kept)");
        hub.fail_over(&link);
        monoio::time::sleep(BACKOFF_MIN).await;
    }
}

/// Runs one connection to a master until either direction fails.
async fn serve_link(hub: &Arc<Hub>, link: &Arc<Link>, stream: TcpStream, bell: &mut super::hub::Waiter) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let (mut r, mut w) = stream.into_split();
    let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Reader: its own task; it flags the link dead and rings the writer.
    let (h, l, d) = (hub.clone(), link.clone(), dead.clone());
    let reader = monoio::spawn(async move {
        let why = read_master(&h, &l, &mut r).await;
        tracing::warn!(master = %l.addr, reason = %why, "upstream: firehose master link closed");
        d.store(true, Ordering::SeqCst);
        atlas_proxy::io::shutdown_fd(fd);
        l.bell.ring();
    });
    let mut spare: Vec<u8> = Vec::new();
    loop {
        if dead.load(Ordering::SeqCst) {
            break;
        }
        let batch = {
            let mut o = lock(&link.out);
            o.packets = 0;
            std::mem::replace(&mut o.bytes, std::mem::take(&mut spare))
        };
        if batch.is_empty() {
            spare = batch;
            bell.wait(&link.bell).await;
            continue;
        }
        let (res, mut b) = w.write_all(batch).await;
        if let Err(e) = res {
            tracing::warn!(master = %link.addr, error = %e, "upstream: write to the firehose master failed");
            // The unsent batch is lost with the connection (as any bytes in
            // flight on a TCP stream that breaks are).
            atlas_proxy::io::shutdown_fd(fd);
            break;
        }
        b.clear();
        if b.capacity() <= 4 * READ_SIZE {
            spare = b;
        }
    }
    let _ = reader.await;
}

/// Reads master packets until the link fails; returns why.
async fn read_master(hub: &Hub, link: &Link, r: &mut monoio::net::tcp::TcpOwnedReadHalf) -> String {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_SIZE);
    let mut start = 0usize;
    let mut batch: Vec<(u64, u8, Vec<u8>)> = Vec::new();
    loop {
        if start > 0 && (start == buf.len() || start > buf.capacity() / 2) {
            buf.drain(..start);
            start = 0;
        }
        let max = hub.settings.load().max_frame_length + 13;
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_SIZE.max(max + 4 - (buf.len() - start)));
        }
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = r.read(std::mem::take(&mut buf).slice_mut(len..cap)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => return "the master closed the connection".into(),
            Err(e) => return format!("read error: {e}"),
            Ok(_) => {}
        }
        loop {
            // The payload holds the 9-byte tag and at most max_frame_length of data.
            let frame = match wire::next_frame(&buf[start..], max - 4) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return format!("protocol: {e} (dropping the link)"),
            };
            let payload = &buf[start + frame.0..start + frame.1];
            match wire::parse_tagged(payload) {
                Ok(p) if p.flag == FLAG_DATA || p.flag == FLAG_KICK => batch.push((p.id, p.flag, p.data.to_vec())),
                Ok(p) if p.flag == FLAG_RECONNECT => {}
                Ok(p) => atlas_proxy::log_limited(
                    || tracing::warn!(master = %link.addr, flag = p.flag, "upstream: unknown flag from the firehose master; packet ignored"),
                ),
                Err(e) => {
                    if !batch.is_empty() {
                        hub.deliver(link, &mut batch);
                    }
                    return format!("protocol: {e} (dropping the link)");
                }
            }
            start += frame.1;
        }
        if !batch.is_empty() {
            hub.deliver(link, &mut batch);
        }
    }
}
