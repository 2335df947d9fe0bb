//! Shared harness for the Atlas integration tests.
//!
//! - [`Atlas`]: runs the real binary with a temporary TOML config, waits for
//!   its `listening` log lines, kills it on drop and prints its stderr when the
//!   test failed.
//! - [`Backend`]: small std::net servers (one thread per connection) that
//!   count connections, record every byte and parsed request, and answer
//!   through a closure ([`Backend::http`]) or hand the raw socket to a closure
//!   ([`Backend::raw`]).
//! - [`Client`]: a raw HTTP/1.1 client that keeps leftover bytes between
//!   responses (pipelining) and can tell whether the server closed.
//!
//! Only std is used; every socket has read and write timeouts so no test can
//! hang.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Read/write timeout of test clients: generous, only there so nothing hangs.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long Atlas may take to print its listeners.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Read timeout of backend connections (idle pooled connections included).
const BACKEND_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub const BIN: &str = env!("CARGO_BIN_EXE_atlas");

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh path in the temp directory (not created).
pub fn temp_path(ext: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    std::env::temp_dir().join(format!("atlas-it-{}-{n}-{nanos}.{ext}", std::process::id()))
}

/// Writes `text` to a fresh temporary `.toml` file.
pub fn write_config(text: &str) -> PathBuf {
    let p = temp_path("toml");
    std::fs::write(&p, text).expect("write temp config");
    p
}

/// A local address that refuses connections (bound once, then released).
pub fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// FNV-1a 64, to compare large bodies by hash in messages.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Polls `cond` until it holds or `within` passes.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

pub fn set_timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).unwrap();
    s.set_write_timeout(Some(t)).unwrap();
}

/// A printable excerpt of raw bytes for assertion messages.
pub fn show(bytes: &[u8]) -> String {
    const MAX: usize = 600;
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
    if bytes.len() > MAX {
        format!("{s:?}... ({} bytes)", bytes.len())
    } else {
        format!("{s:?}")
    }
}

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

/// `[[upstreams]]` entries named u0, u1, ... with the given weights.
pub fn upstreams_toml(ups: &[(SocketAddr, u32)], group: Option<&str>) -> String {
    let mut s = String::new();
    let prefix = group.map(|g| format!("{g}-")).unwrap_or_default();
    for (i, (a, w)) in ups.iter().enumerate() {
        s.push_str(&format!("[[upstreams]]\nname = \"{prefix}u{i}\"\naddress = \"{}\"\nport = {}\nweight = {w}\n", a.ip(), a.port()));
        if let Some(g) = group {
            s.push_str(&format!("group = \"{g}\"\n"));
        }
        s.push('\n');
    }
    s
}

/// One listener on 127.0.0.1:0 in `mode`, one worker, weighted upstreams,
/// then `extra` (more sections such as `[routing]` or `[timeouts]`).
pub fn config_weighted(mode: &str, ups: &[(SocketAddr, u32)], extra: &str) -> String {
    format!("[listen]\naddress = \"127.0.0.1\"\nport = 0\nmode = \"{mode}\"\nworkers = 1\n\n{}{extra}\n", upstreams_toml(ups, None))
}

/// An HTTP listener over `ups` (weight 1 each) plus `extra` sections.
pub fn http_config(ups: &[SocketAddr], extra: &str) -> String {
    let w: Vec<(SocketAddr, u32)> = ups.iter().map(|a| (*a, 1)).collect();
    config_weighted("http", &w, extra)
}

/// A TCP listener over `ups` (weight 1 each) plus `extra` sections.
pub fn tcp_config(ups: &[SocketAddr], extra: &str) -> String {
    let w: Vec<(SocketAddr, u32)> = ups.iter().map(|a| (*a, 1)).collect();
    config_weighted("tcp", &w, extra)
}

// ---------------------------------------------------------------------------
// The Atlas process
// ---------------------------------------------------------------------------

pub struct Atlas {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    /// Listener addresses, in config order.
    pub listeners: Vec<SocketAddr>,
    pub api: Option<SocketAddr>,
    config: Option<PathBuf>,
    /// The takeover socket path this process was given (`--takeover-socket`)
    /// when the harness chose it; shared with successors started by
    /// [`Atlas::start_takeover`], removed when the last of them is dropped.
    takeover: Option<Arc<SocketPath>>,
    /// The test waits for (or causes) this process's exit: an exit is not a
    /// crash.
    exit_expected: bool,
}

/// A Unix socket path in the temp directory, removed on drop.
pub struct SocketPath(pub PathBuf);

impl SocketPath {
    pub fn new() -> Arc<SocketPath> {
        Arc::new(SocketPath(temp_path("sock")))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// True if `cmd` already names a takeover socket.
fn has_takeover_socket_arg(cmd: &Command) -> bool {
    cmd.get_args().any(|a| a.to_str().is_some_and(|s| s == "--takeover-socket" || s.starts_with("--takeover-socket=")))
}

fn log_filter() -> String {
    std::env::var("ATLAS_TEST_LOG").unwrap_or_else(|_| "debug".into())
}

/// The value of `key=` in a tracing line (up to the next space).
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let i = line.find(&pat)? + pat.len();
    let rest = &line[i..];
    Some(rest.split_whitespace().next().unwrap_or("").trim_matches('"'))
}

impl Atlas {
    /// Runs Atlas on `config` and waits for its single listener (and API when
    /// the config has an `[api]` table).
    pub fn start(config: &str) -> Atlas {
        Self::start_n(config, 1)
    }

    /// Same as [`Atlas::start`] for a config with `listeners` listeners.
    pub fn start_n(config: &str, listeners: usize) -> Atlas {
        let path = write_config(config);
        let api = config.lines().any(|l| l.trim() == "[api]");
        let mut cmd = Command::new(BIN);
        cmd.arg(&path);
        Self::spawn(cmd, Some(path), listeners, api)
    }

    /// Runs Atlas on a config file the test owns (not removed on drop), e.g.
    /// one it rewrites to test hot reload.
    pub fn start_file(path: &Path, listeners: usize) -> Atlas {
        let text = std::fs::read_to_string(path).expect("read config");
        let api = text.lines().any(|l| l.trim() == "[api]");
        let mut cmd = Command::new(BIN);
        cmd.arg(path);
        Self::spawn(cmd, None, listeners, api)
    }

    /// Starts `atlas --takeover` on `config` against `prev`'s takeover
    /// socket and waits for its `listeners` listening lines.
    pub fn start_takeover(prev: &Atlas, config: &str, listeners: usize) -> Atlas {
        let sock = prev.takeover.clone().expect("the previous Atlas has no harness-chosen takeover socket");
        let path = write_config(config);
        let mut cmd = Command::new(BIN);
        cmd.arg("--takeover").arg("--takeover-socket").arg(sock.path()).arg(&path);
        let api = config.lines().any(|l| l.trim() == "[api]");
        Self::spawn_inner(cmd, Some(path), listeners, api, Some(sock))
    }

    /// Spawns a prepared command (stderr captured) and waits for the
    /// `listening` lines. Unless `cmd` names one, the process gets its own
    /// takeover socket (`--takeover-socket <temp path>`) so that parallel
    /// tests never share the default one.
    pub fn spawn(mut cmd: Command, config: Option<PathBuf>, listeners: usize, api: bool) -> Atlas {
        let takeover = if has_takeover_socket_arg(&cmd) {
            None
        } else {
            let sock = SocketPath::new();
            cmd.arg("--takeover-socket").arg(sock.path());
            Some(sock)
        };
        Self::spawn_inner(cmd, config, listeners, api, takeover)
    }

    fn spawn_inner(mut cmd: Command, config: Option<PathBuf>, listeners: usize, api: bool, takeover: Option<Arc<SocketPath>>) -> Atlas {
        cmd.env("ATLAS_LOG", log_filter()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn atlas");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let logs2 = logs.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                logs2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut atlas = Atlas { child, logs, reader: Some(reader), listeners: Vec::new(), api: None, config, takeover, exit_expected: false };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while atlas.listeners.len() < listeners || (api && atlas.api.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if line.contains("api listening") {
                        atlas.api = log_field(&line, "addr").and_then(|a| a.parse().ok());
                    } else if line.contains("listening") && line.contains(" name=") {
                        let a = log_field(&line, "addr").and_then(|a| a.parse().ok());
                        atlas.listeners.push(a.unwrap_or_else(|| panic!("cannot parse addr in {line:?}")));
                    }
                }
                Err(_) => {
                    let status = atlas.child.try_wait();
                    panic!(
                        "atlas did not report {listeners} listener(s){} in time (exit status: {status:?}); its stderr is printed below",
                        if api { " and the API" } else { "" }
                    );
                }
            }
        }
        atlas
    }

    /// The first (usually only) listener.
    pub fn addr(&self) -> SocketAddr {
        self.listeners[0]
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Process id of the Atlas child (e.g. to read /proc/<pid>/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The takeover socket path the harness gave this process, if any.
    pub fn takeover_socket(&self) -> Option<&Path> {
        self.takeover.as_deref().map(SocketPath::path)
    }

    /// Sends `signal` (a `kill -s` name: TERM, INT, QUIT, HUP, ...).
    pub fn signal(&self, signal: &str) {
        let st = Command::new("kill").arg("-s").arg(signal).arg(self.pid().to_string()).stdout(Stdio::null()).stderr(Stdio::null()).status().expect("run kill");
        assert!(st.success(), "kill -s {signal} {} failed: {st}", self.pid());
    }

    /// Declares that the process will exit during the test (drain, takeover):
    /// its exit is not reported as a crash on drop.
    pub fn expect_exit(&mut self) {
        self.exit_expected = true;
    }

    /// Waits up to `within` for the process to exit (and expects it to).
    /// `None`: still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        self.exit_expected = true;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stderr lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// How many stderr lines so far contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.logs.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until at least `n` stderr lines contain `needle`.
    pub fn wait_log(&self, needle: &str, n: usize, within: Duration) -> bool {
        wait_until(within, || self.count_log(needle) >= n)
    }
}

impl Drop for Atlas {
    fn drop(&mut self) {
        // Atlas must still be running at the end of a test: an exit means it
        // crashed (or aborted) under the test's traffic.
        let exited = self.child.try_wait().ok().flatten().filter(|_| !self.exit_expected);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if let Some(p) = &self.config {
            let _ = std::fs::remove_file(p);
        }
        if thread::panicking() || exited.is_some() {
            eprintln!("----- atlas stderr -----\n{}\n----- end of atlas stderr -----", self.logs());
        }
        if let (Some(status), false) = (exited, thread::panicking()) {
            panic!("atlas exited during the test ({status}); its stderr is printed above");
        }
    }
}

/// Runs the binary to completion with `args` (for CLI tests), bounded in time.
pub fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn atlas");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("atlas {args:?} did not exit within 10 s");
            }
        }
    };
    (status.code(), t_out.join().unwrap(), t_err.join().unwrap())
}

// ---------------------------------------------------------------------------
// Parsed messages
// ---------------------------------------------------------------------------

fn header_lookup<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
}

/// Splits a head (without the final CRLFCRLF) into start line and headers.
fn parse_head(head: &str) -> (String, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let start = lines.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for l in lines {
        if l.is_empty() {
            continue;
        }
        match l.split_once(':') {
            Some((n, v)) => headers.push((n.to_string(), v.trim().to_string())),
            None => headers.push((l.to_string(), String::new())),
        }
    }
    (start, headers)
}

/// Decodes a chunked body at the start of `buf`. `Ok(None)`: incomplete.
/// Returns the decoded bytes and how many input bytes were used (trailers
/// included).
pub fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(&buf[pos..], b"\r\n") else { return Ok(None) };
        let line = std::str::from_utf8(&buf[pos..pos + eol]).map_err(|_| "chunk size line is not UTF-8".to_string())?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size line {line:?}"))?;
        pos += eol + 2;
        if size == 0 {
            // Trailer section: lines until an empty one.
            loop {
                let Some(eol) = find(&buf[pos..], b"\r\n") else { return Ok(None) };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        pos += size + 2;
    }
}

/// A request as a backend received it.
#[derive(Clone, Debug)]
pub struct Request {
    /// Index (0-based, per backend) of the TCP connection it came on.
    pub conn: usize,
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    /// Decoded body.
    pub body: Vec<u8>,
    /// The body came with chunked framing.
    pub chunked: bool,
    /// The head as received (without the blank line).
    pub head: String,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_lookup(&self.headers, name).first().copied()
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        header_lookup(&self.headers, name)
    }
    pub fn has_header(&self, name: &str) -> bool {
        !self.header_all(name).is_empty()
    }
}

/// A response as a client received it.
#[derive(Clone, Debug)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    /// Decoded body.
    pub body: Vec<u8>,
    /// The body came with chunked framing.
    pub chunked: bool,
    /// The head as received (without the blank line).
    pub head: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_lookup(&self.headers, name).first().copied()
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        header_lookup(&self.headers, name)
    }
    /// A comma-separated header (all its lines) contains `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_all(name).iter().flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// What an HTTP backend writes back for one request.
pub struct Reply {
    pub bytes: Vec<u8>,
    /// Close the connection after writing.
    pub close: bool,
    /// Wait this long before answering.
    pub delay: Duration,
}

impl Reply {
    /// `200 OK` with a Content-Length body.
    pub fn ok(body: impl AsRef<[u8]>) -> Reply {
        Reply::status(200, "OK", body)
    }
    pub fn status(code: u16, reason: &str, body: impl AsRef<[u8]>) -> Reply {
        let body = body.as_ref();
        let mut bytes = format!("HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        bytes.extend_from_slice(body);
        Reply { bytes, close: false, delay: Duration::ZERO }
    }
    /// Exactly these bytes.
    pub fn raw(bytes: impl AsRef<[u8]>) -> Reply {
        Reply { bytes: bytes.as_ref().to_vec(), close: false, delay: Duration::ZERO }
    }
    pub fn then_close(mut self) -> Reply {
        self.close = true;
        self
    }
    pub fn after(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

#[derive(Default)]
pub struct BackendState {
    conns: AtomicUsize,
    active: AtomicUsize,
    raw: Mutex<Vec<u8>>,
    requests: Mutex<Vec<Request>>,
    stop: AtomicBool,
    /// Set once the accept loop has ended (its listener is closed).
    accept_done: AtomicBool,
    /// Clones of the open connections, by id, for [`Backend::kill`]; only
    /// for backends made by [`Backend::http_tracked`] / [`Backend::http_at`]
    /// (`None` otherwise, so other backends close exactly as before).
    tracked: Mutex<Option<std::collections::HashMap<usize, TcpStream>>>,
}

/// A test server on 127.0.0.1:0.
pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<BackendState>,
}

impl Backend {
    /// Accepts connections and hands each one to `conn` on its own thread.
    fn serve<F>(conn: F) -> Backend
    where
        F: Fn(TcpStream, usize, Arc<BackendState>) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        Self::serve_on(listener, false, conn)
    }

    /// Accepts on `listener`; with `track`, keeps a clone of every open
    /// connection so that [`Backend::kill`] can close them.
    fn serve_on<F>(listener: TcpListener, track: bool, conn: F) -> Backend
    where
        F: Fn(TcpStream, usize, Arc<BackendState>) + Send + Sync + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState::default());
        if track {
            *state.tracked.lock().unwrap() = Some(std::collections::HashMap::new());
        }
        let st = state.clone();
        let conn = Arc::new(conn);
        thread::spawn(move || {
            for s in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(s) = s else { continue };
                let id = st.conns.fetch_add(1, Ordering::SeqCst);
                s.set_read_timeout(Some(BACKEND_READ_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                if let Some(map) = st.tracked.lock().unwrap().as_mut() {
                    if let Ok(c) = s.try_clone() {
                        map.insert(id, c);
                    }
                }
                let st2 = st.clone();
                let conn = conn.clone();
                thread::spawn(move || {
                    st2.active.fetch_add(1, Ordering::SeqCst);
                    conn(s, id, st2.clone());
                    if let Some(map) = st2.tracked.lock().unwrap().as_mut() {
                        map.remove(&id);
                    }
                    st2.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            drop(listener);
            st.accept_done.store(true, Ordering::SeqCst);
        });
        Backend { addr, state }
    }

    /// Like [`Backend::http`], but [`Backend::kill`] can also close the
    /// open connections.
    pub fn http_tracked<F>(handler: F) -> Backend
    where
        F: Fn(&Request) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        Self::serve_on(listener, true, move |s, id, st| serve_http(s, id, &st, &handler))
    }

    /// Like [`Backend::http_tracked`] on a given address (e.g. the port of
    /// a killed backend); retries the bind for up to 3 s.
    pub fn http_at<F>(addr: SocketAddr, handler: F) -> Backend
    where
        F: Fn(&Request) -> Reply + Send + Sync + 'static,
    {
        let deadline = Instant::now() + Duration::from_secs(3);
        let listener = loop {
            match TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("bind backend on {addr}: {e}"),
            }
        };
        Self::serve_on(listener, true, move |s, id, st| serve_http(s, id, &st, &handler))
    }

    /// Closes the listener (new connections are refused) and waits up to
    /// 2 s for that; open connections keep being served.
    pub fn stop_listening(&self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        assert!(wait_until(Duration::from_secs(2), || self.state.accept_done.load(Ordering::SeqCst)), "backend {} did not stop listening", self.addr);
    }

    /// Kills the server: closes the listener and every open connection
    /// (both directions). Only for [`Backend::http_tracked`] /
    /// [`Backend::http_at`] backends.
    pub fn kill(&self) {
        assert!(self.state.tracked.lock().unwrap().is_some(), "kill() needs a tracked backend (http_tracked / http_at)");
        self.stop_listening();
        let open: Vec<TcpStream> = self.state.tracked.lock().unwrap().as_mut().map(|m| m.drain().map(|(_, s)| s).collect()).unwrap_or_default();
        for s in open {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// An HTTP/1.1 server: parses each request (Content-Length or chunked
    /// body), records it, and writes what `handler` returns.
    pub fn http<F>(handler: F) -> Backend
    where
        F: Fn(&Request) -> Reply + Send + Sync + 'static,
    {
        Self::serve(move |s, id, st| serve_http(s, id, &st, &handler))
    }

    /// A server that gives each accepted socket to `handler` (connections
    /// are counted; bytes are not recorded).
    pub fn raw<F>(handler: F) -> Backend
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        Self::serve(move |s, _, _| handler(s))
    }

    /// Answers every request with `200` and `body`.
    pub fn fixed(body: &str) -> Backend {
        let body = body.to_string();
        Self::http(move |_| Reply::ok(&body))
    }

    /// Answers every request with `200` and its request target as the body.
    pub fn echo_path() -> Backend {
        Self::http(|r| Reply::ok(&r.target))
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.conns.load(Ordering::SeqCst)
    }
    /// Connections whose handler is still running.
    pub fn active(&self) -> usize {
        self.state.active.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }
    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }
    /// Every byte received on every connection (HTTP backends only).
    pub fn raw_bytes(&self) -> Vec<u8> {
        self.state.raw.lock().unwrap().clone()
    }
    /// The last request received; panics if there is none.
    pub fn last(&self) -> Request {
        self.requests().pop().expect("the backend received no request")
    }
    pub fn wait_for_requests(&self, n: usize, within: Duration) -> bool {
        wait_until(within, || self.request_count() >= n)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Reads once into `buf`, recording the bytes. `Ok(0)` at EOF.
fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, st: &BackendState) -> io::Result<usize> {
    let mut tmp = [0u8; 64 * 1024];
    let n = s.read(&mut tmp)?;
    buf.extend_from_slice(&tmp[..n]);
    st.raw.lock().unwrap().extend_from_slice(&tmp[..n]);
    Ok(n)
}

fn serve_http(mut s: TcpStream, id: usize, st: &BackendState, handler: &(dyn Fn(&Request) -> Reply + Send + Sync)) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let head_end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            match fill(&mut s, &mut buf, st) {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end - 4]).into_owned();
        let (start, headers) = parse_head(&head);
        let mut parts = start.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let version = parts.next().unwrap_or("").to_string();
        let te = header_lookup(&headers, "transfer-encoding").join(",");
        let chunked = te.to_ascii_lowercase().contains("chunked");
        let (body, used) = if chunked {
            loop {
                match decode_chunked(&buf[head_end..]) {
                    Ok(Some((b, used))) => break (b, used),
                    Ok(None) => match fill(&mut s, &mut buf, st) {
                        Ok(n) if n > 0 => {}
                        _ => return,
                    },
                    Err(e) => {
                        eprintln!("backend: bad chunked request body: {e}");
                        return;
                    }
                }
            }
        } else {
            let len: usize = header_lookup(&headers, "content-length").first().and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            while buf.len() < head_end + len {
                match fill(&mut s, &mut buf, st) {
                    Ok(n) if n > 0 => {}
                    _ => return,
                }
            }
            (buf[head_end..head_end + len].to_vec(), len)
        };
        buf.drain(..head_end + used);
        let req = Request { conn: id, method, target, version, headers, body, chunked, head };
        st.requests.lock().unwrap().push(req.clone());
        let reply = handler(&req);
        if !reply.delay.is_zero() {
            thread::sleep(reply.delay);
        }
        if s.write_all(&reply.bytes).is_err() {
            return;
        }
        if reply.close {
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Reads from `s` until `buf` contains a full head (`\r\n\r\n`); returns its
/// length. For raw backends.
pub fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut tmp = [0u8; 16 * 1024];
    loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            return Ok(p + 4);
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(io::Error::new(ErrorKind::UnexpectedEof, "eof before end of head"));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Copies everything read from `s` back to it until EOF (a TCP echo).
pub fn echo(mut s: TcpStream) {
    let mut tmp = [0u8; 64 * 1024];
    loop {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&tmp[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// A `GET` for `path` with a Host header.
pub fn get_req(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: atlas.test\r\n\r\n")
}

/// A raw HTTP/1.1 client over a plain socket or, with [`Client::over`],
/// any stream (TLS in `tls.rs`).
pub struct Client<S: Read + Write = TcpStream> {
    pub stream: S,
    /// Received bytes not yet consumed by a parsed response.
    pub buf: Vec<u8>,
}

impl Client<TcpStream> {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        set_timeouts(&stream, IO_TIMEOUT);
        let _ = stream.set_nodelay(true);
        Client { stream, buf: Vec::new() }
    }

    /// Like [`Client::connect`], but returns the error (refused, timed out).
    pub fn try_connect(addr: SocketAddr, timeout: Duration) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        set_timeouts(&stream, IO_TIMEOUT);
        let _ = stream.set_nodelay(true);
        Ok(Client { stream, buf: Vec::new() })
    }

    /// True if the peer closes (EOF or reset) within `within`. Bytes that
    /// arrive meanwhile are kept in `buf`.
    pub fn is_closed(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let closed = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.fill() {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe) => break true,
                Err(_) => break false,
            }
        };
        let _ = self.stream.set_read_timeout(Some(IO_TIMEOUT));
        closed
    }
}

impl<S: Read + Write> Client<S> {
    /// A client over an already connected stream.
    pub fn over(stream: S) -> Client<S> {
        Client { stream, buf: Vec::new() }
    }

    /// Sends a GET for `path` and reads the response, returning any error.
    pub fn try_get(&mut self, path: &str) -> io::Result<Response> {
        self.stream.write_all(get_req(path).as_bytes())?;
        self.try_read_response(false)
    }

    pub fn send(&mut self, data: impl AsRef<[u8]>) {
        self.stream.write_all(data.as_ref()).expect("client write");
        self.stream.flush().expect("client flush");
    }

    /// Sends `data`, returning the error instead of panicking.
    pub fn try_send(&mut self, data: impl AsRef<[u8]>) -> io::Result<()> {
        self.stream.write_all(data.as_ref())
    }

    /// Sends a GET for `path` and reads the response.
    pub fn get(&mut self, path: &str) -> Response {
        self.send(get_req(path));
        self.read_response()
    }

    /// Sends `raw` and reads the response.
    pub fn request(&mut self, raw: impl AsRef<[u8]>) -> Response {
        self.send(raw);
        self.read_response()
    }

    pub fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 64 * 1024];
        let n = match self.stream.read(&mut tmp) {
            Ok(n) => n,
            // A TLS peer closing without close_notify.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Reads one response (to a non-HEAD request); panics on error.
    pub fn read_response(&mut self) -> Response {
        self.try_read_response(false).unwrap_or_else(|e| panic!("reading response: {e}"))
    }

    /// Reads one response to a HEAD request (never a body).
    pub fn read_head_response(&mut self) -> Response {
        self.try_read_response(true).unwrap_or_else(|e| panic!("reading response: {e}"))
    }

    /// Reads one response. Body rules of RFC 9112 §6.3: none for HEAD, 1xx,
    /// 204, 304; chunked; Content-Length; otherwise until close.
    pub fn try_read_response(&mut self, head_request: bool) -> io::Result<Response> {
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(ErrorKind::UnexpectedEof, format!("connection closed before a full response head; got {}", show(&self.buf))));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end - 4]).into_owned();
        let (start, headers) = parse_head(&head);
        let mut parts = start.splitn(3, ' ');
        let version = parts.next().unwrap_or("").to_string();
        let status: u16 =
            parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| io::Error::new(ErrorKind::InvalidData, format!("bad status line {start:?}")))?;
        let reason = parts.next().unwrap_or("").to_string();
        let te = header_lookup(&headers, "transfer-encoding").join(",").to_ascii_lowercase();
        let cl = header_lookup(&headers, "content-length").first().and_then(|v| v.trim().parse::<usize>().ok());
        let no_body = head_request || (100..200).contains(&status) || status == 204 || status == 304;
        let mut chunked = false;
        let (body, used) = if no_body {
            (Vec::new(), 0)
        } else if te.contains("chunked") {
            chunked = true;
            loop {
                match decode_chunked(&self.buf[head_end..]) {
                    Ok(Some(x)) => break x,
                    Ok(None) => {
                        if self.fill()? == 0 {
                            return Err(io::Error::new(ErrorKind::UnexpectedEof, "connection closed inside a chunked body"));
                        }
                    }
                    Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e)),
                }
            }
        } else if let Some(n) = cl {
            while self.buf.len() < head_end + n {
                if self.fill()? == 0 {
                    return Err(io::Error::new(ErrorKind::UnexpectedEof, format!("connection closed after {} of {n} body bytes", self.buf.len() - head_end)));
                }
            }
            (self.buf[head_end..head_end + n].to_vec(), n)
        } else {
            while self.fill()? > 0 {}
            (self.buf[head_end..].to_vec(), self.buf.len() - head_end)
        };
        self.buf.drain(..head_end + used);
        Ok(Response { version, status, reason, headers, body, chunked, head })
    }

    /// Reads exactly `n` bytes (buffered ones first).
    pub fn read_exact_bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            match self.fill() {
                Ok(0) => panic!("connection closed after {} of {n} bytes: {}", self.buf.len(), show(&self.buf)),
                Ok(_) => {}
                Err(e) => panic!("read failed after {} of {n} bytes ({e}): {}", self.buf.len(), show(&self.buf)),
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Everything until EOF (or error), buffered bytes first.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        while let Ok(n) = self.fill() {
            if n == 0 {
                break;
            }
        }
        std::mem::take(&mut self.buf)
    }
}

/// One request on a fresh connection; returns the response.
pub fn one_shot(addr: SocketAddr, raw: impl AsRef<[u8]>) -> Response {
    Client::connect(addr).request(raw)
}

/// Shorthand: GET `path` on a fresh connection.
pub fn http_get(addr: SocketAddr, path: &str) -> Response {
    one_shot(addr, get_req(path))
}

pub fn path_of(p: &Path) -> String {
    p.display().to_string()
}

/// A temporary directory removed (recursively) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = temp_path("d");
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// `self/rel`, not created.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
    /// Writes `data` to `self/rel`, creating parent directories.
    pub fn write(&self, rel: &str, data: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&p, data).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Formats `t` as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        WD[days.rem_euclid(7) as usize],
        day,
        MON[(month - 1) as usize],
        year,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
