//! Access log: one line per request (or TCP connection), to a file or to
//! stdout, in a combined-like text format or as JSON lines.
//!
//! A worker formats the line into its own buffer for that destination and
//! never writes to the file itself: a buffer is handed to the writer thread
//! when it passes [`FLUSH_BYTES`] and on every housekeeping tick
//! ([`flush_thread`]), through a bounded channel. If the writer falls so
//! far behind that the channel is full, the batch is dropped and counted
//! (`atlas_access_log_dropped_total`): a slow disk never stalls a request.
//!
//! SIGUSR1 calls [`reopen`]: the writer closes and reopens every file (the
//! usual log-rotation handshake: rename the file, then signal).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use crate::time::with_stamp;

/// A worker hands its buffer over once it holds this much.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// Batches waiting for the writer before new ones are dropped.
const QUEUE: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `client - - [time] "request" status bytes "referer" "agent" seconds listener upstream`
    Combined,
    /// One JSON object per line.
    Json,
}

/// Where lines go.
pub struct Dest {
    id: usize,
    /// `None`: standard output.
    path: Option<PathBuf>,
    /// The open file and the reopen generation it was opened in (writer thread only).
    file: Mutex<(u64, Option<File>)>,
}

/// A listener's access log.
#[derive(Clone)]
pub struct AccessLog {
    dest: Arc<Dest>,
    pub format: Format,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);
static REOPEN: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static WRITTEN: AtomicU64 = AtomicU64::new(0);
/// Batches handed over and not written yet.
static QUEUED: AtomicU64 = AtomicU64::new(0);
static DESTS: Mutex<Vec<Weak<Dest>>> = Mutex::new(Vec::new());
static WRITER: OnceLock<SyncSender<Batch>> = OnceLock::new();

struct Batch {
    dest: Arc<Dest>,
    bytes: Vec<u8>,
    lines: u64,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl AccessLog {
    /// The log at `path` (`None`: stdout). A file is opened (created if
    /// missing) now, so a bad path is a configuration error; a path already
    /// in use keeps its open file and buffers.
    pub fn open(path: Option<&Path>, format: Format) -> Result<AccessLog, String> {
        let mut dests = DESTS.lock().unwrap_or_else(|p| p.into_inner());
        dests.retain(|d| d.strong_count() > 0);
        let existing = dests.iter().filter_map(Weak::upgrade).find(|d| d.path.as_deref() == path);
        let dest = match existing {
            Some(d) => d,
            None => {
                let file = match path {
                    Some(p) => Some(open_append(p).map_err(|e| format!("cannot open access log {}: {e}", p.display()))?),
                    None => None,
                };
                let d = Arc::new(Dest {
                    id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                    path: path.map(Path::to_path_buf),
                    file: Mutex::new((REOPEN.load(Ordering::Relaxed), file)),
                });
                dests.push(Arc::downgrade(&d));
                d
            }
        };
        writer();
        Ok(AccessLog { dest, format })
    }

    /// Appends one line to this worker's buffer for the log.
    pub fn write(&self, r: &Record) {
        BUFS.with(|bufs| {
            let mut bufs = bufs.borrow_mut();
            let i = match bufs.iter().position(|b| b.dest.id == self.dest.id) {
                Some(i) => i,
                None => {
                    bufs.push(Pending { dest: self.dest.clone(), bytes: Vec::with_capacity(FLUSH_BYTES + 1024), lines: 0 });
                    bufs.len() - 1
                }
            };
            let p = &mut bufs[i];
            match self.format {
                Format::Combined => combined(&mut p.bytes, r),
                Format::Json => json(&mut p.bytes, r),
            }
            p.lines += 1;
            if p.bytes.len() >= FLUSH_BYTES {
                hand_over(p);
            }
        });
    }
}

/// One request as the access log (and the skim) sees it.
pub struct Record<'a> {
    pub time: SystemTime,
    pub listener: &'a str,
    pub client: IpAddr,
    pub method: &'a str,
    pub target: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_us: u64,
    /// Upstream name, or `-` (static file, Atlas' own reply).
    pub upstream: &'a str,
    pub referer: &'a str,
    pub user_agent: &'a str,
}

struct Pending {
    dest: Arc<Dest>,
    bytes: Vec<u8>,
    lines: u64,
}

thread_local! {
    static BUFS: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

fn hand_over(p: &mut Pending) {
    if p.bytes.is_empty() {
        return;
    }
    let bytes = std::mem::replace(&mut p.bytes, Vec::with_capacity(FLUSH_BYTES + 1024));
    let lines = std::mem::take(&mut p.lines);
    let batch = Batch { dest: p.dest.clone(), bytes, lines };
    QUEUED.fetch_add(1, Ordering::SeqCst);
    match writer().try_send(batch) {
        Ok(()) => {}
        Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => {
            QUEUED.fetch_sub(1, Ordering::SeqCst);
            DROPPED.fetch_add(b.lines, Ordering::Relaxed);
        }
    }
}

/// Hands this thread's buffered lines to the writer (workers call it on
/// every housekeeping tick, and when they stop).
pub fn flush_thread() {
    BUFS.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        for p in bufs.iter_mut() {
            hand_over(p);
        }
        // Forget destinations no configuration uses any more.
        bufs.retain(|p| Arc::strong_count(&p.dest) > 1 || !p.bytes.is_empty());
    });
}

/// Asks the writer to reopen every file (SIGUSR1).
pub fn reopen() {
    REOPEN.fetch_add(1, Ordering::Relaxed);
}

/// Waits (up to `timeout`) until every batch handed over is written: at
/// exit, after the workers flushed their buffers.
pub fn wait_written(timeout: Duration) {
    let until = std::time::Instant::now() + timeout;
    while QUEUED.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lines dropped because the writer was behind or a file could not be written.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Lines written.
pub fn written() -> u64 {
    WRITTEN.load(Ordering::Relaxed)
}

fn writer() -> &'static SyncSender<Batch> {
    WRITER.get_or_init(|| {
        let (tx, rx) = sync_channel(QUEUE);
        if let Err(e) = std::thread::Builder::new().name("atlas-log".into()).spawn(move || writer_main(rx)) {
            tracing::error!(error = %e, "internal: cannot start the access log writer; lines will be dropped");
        }
        tx
    })
}

fn writer_main(rx: Receiver<Batch>) {
    let mut seen = REOPEN.load(Ordering::Relaxed);
    loop {
        let batch = rx.recv_timeout(Duration::from_millis(200));
        let gen = REOPEN.load(Ordering::Relaxed);
        if gen != seen {
            seen = gen;
            let dests: Vec<Arc<Dest>> = DESTS.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
            for d in dests {
                reopen_dest(&d, gen);
            }
        }
        match batch {
            Ok(b) => {
                write_batch(b, gen);
                QUEUED.fetch_sub(1, Ordering::SeqCst);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn reopen_dest(d: &Dest, gen: u64) {
    let Some(path) = &d.path else { return };
    let mut f = d.file.lock().unwrap_or_else(|p| p.into_inner());
    if f.0 == gen {
        return;
    }
    match open_append(path) {
        Ok(file) => {
            *f = (gen, Some(file));
            tracing::info!(path = %path.display(), "access log reopened");
        }
        Err(e) => {
            // Keep writing to the old file rather than losing lines.
            f.0 = gen;
            tracing::error!(path = %path.display(), error = %e, "cannot reopen access log; still writing to the previous file");
        }
    }
}

fn write_batch(b: Batch, gen: u64) {
    let res = match &b.dest.path {
        None => std::io::stdout().lock().write_all(&b.bytes),
        Some(_) => {
            reopen_dest(&b.dest, gen);
            let mut f = b.dest.file.lock().unwrap_or_else(|p| p.into_inner());
            match f.1.as_mut() {
                Some(file) => file.write_all(&b.bytes),
                None => Err(std::io::Error::other("not open")),
            }
        }
    };
    match res {
        Ok(()) => {
            WRITTEN.fetch_add(b.lines, Ordering::Relaxed);
        }
        Err(e) => {
            DROPPED.fetch_add(b.lines, Ordering::Relaxed);
            tracing::error!(error = %e, "access log write failed; lines dropped");
        }
    }
}

/// Writes `s` for a quoted log field: `"`, `\`, control and non-ASCII bytes
/// become `\xHH` (as nginx does), so a client cannot forge a log line.
fn escaped(out: &mut Vec<u8>, s: &str) {
    if s.is_empty() {
        out.push(b'-');
        return;
    }
    for &c in s.as_bytes() {
        if c == b'"' || c == b'\\' || !(0x20..0x7f).contains(&c) {
            let _ = write!(out, "\\x{c:02X}");
        } else {
            out.push(c);
        }
    }
}

fn combined(out: &mut Vec<u8>, r: &Record) {
    let _ = write!(out, "{} - - [", r.client);
    with_stamp(r.time, |s| out.extend_from_slice(s.clf.as_bytes()));
    out.extend_from_slice(b"] \"");
    if r.method.is_empty() {
        out.push(b'-');
    } else {
        escaped(out, r.method);
        out.push(b' ');
        escaped(out, r.target);
        out.push(b' ');
        escaped(out, r.protocol);
    }
    let _ = write!(out, "\" {} {} \"", r.status, r.bytes_out);
    escaped(out, r.referer);
    out.extend_from_slice(b"\" \"");
    escaped(out, r.user_agent);
    let _ = write!(out, "\" {}.{:06} ", r.duration_us / 1_000_000, r.duration_us % 1_000_000);
    escaped(out, r.listener);
    out.push(b' ');
    escaped(out, r.upstream);
    out.push(b'\n');
}

fn json_str(out: &mut Vec<u8>, key: &str, v: &str) {
    let _ = write!(out, ",\"{key}\":");
    let _ = serde_json::to_writer(&mut *out, v);
}

fn json(out: &mut Vec<u8>, r: &Record) {
    let ms = crate::time::unix_ms(r.time) % 1000;
    out.extend_from_slice(b"{\"time\":\"");
    with_stamp(r.time, |s| out.extend_from_slice(s.iso.as_bytes()));
    let _ = write!(out, ".{ms:03}Z\"");
    json_str(out, "listener", r.listener);
    json_str(out, "client", &r.client.to_string());
    json_str(out, "method", r.method);
    json_str(out, "target", r.target);
    json_str(out, "protocol", r.protocol);
    let _ = write!(out, ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration_us\":{}", r.status, r.bytes_in, r.bytes_out, r.duration_us);
    json_str(out, "upstream", r.upstream);
    json_str(out, "referer", r.referer);
    json_str(out, "user_agent", r.user_agent);
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec<'a>(target: &'a str, ua: &'a str) -> Record<'a> {
        Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_255_205_042),
            listener: "web",
            client: "10.0.0.1".parse().unwrap(),
            method: "GET",
            target,
            protocol: "HTTP/1.1",
            status: 200,
            bytes_in: 80,
            bytes_out: 1234,
            duration_us: 1_500,
            upstream: "app1",
            referer: "",
            user_agent: ua,
        }
    }

    #[test]
    fn combined_line() {
        let mut out = Vec::new();
        combined(&mut out, &rec("/a?b=1", "curl/8.0"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "10.0.0.1 - - [21/Nov/2026:10:00:05 +0000] \"GET /a?b=1 HTTP/1.1\" 200 1234 \"-\" \"curl/8.0\" 0.001500 web app1\n"
        );
    }

    #[test]
    fn log_injection_is_escaped() {
        let mut out = Vec::new();
        combined(&mut out, &rec("/x", "evil\"\n1.2.3.4 - - [fake]"));
        let line = String::from_utf8(out).unwrap();
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.contains("evil\\x22\\x0A1.2.3.4"), "{line}");
    }

    #[test]
    fn json_line_parses() {
        let mut out = Vec::new();
        json(&mut out, &rec("/q\"uote", "ua\u{1}"));
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2026-11-21T10:00:05.042Z");
        assert_eq!(v["target"], "/q\"uote");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_out"], 1234);
        assert_eq!(v["user_agent"], "ua\u{1}");
    }
}
