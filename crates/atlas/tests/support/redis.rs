#![allow(dead_code)]
//! A throwaway `redis-server` for the tests of the Redis store.
//!
//! [`RedisServer::start`] runs `redis-server` on a free loopback port with a
//! fresh data directory, append-only persistence fsynced on every write (so a
//! `kill -9` followed by [`RedisServer::restart`] on the same port keeps the
//! data) and no RDB snapshots, and waits until it answers `PING`.
//! [`RedisServer::kill`] is a crash (SIGKILL); drop kills it and removes the
//! directory. Only std.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long `redis-server` may take to answer its first `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);

static DIRS: AtomicUsize = AtomicUsize::new(0);

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// `requirepass`, when the server asks for one.
    password: Option<String>,
}

/// Panics with a clear message when `redis-server` cannot be run.
fn require_redis_server() {
    let ok = Command::new("redis-server").arg("--version").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        panic!(
            "redis-server is not installed (or not on PATH): the Redis store tests need it. \
             scripts/test installs it; by hand: apt-get install -y redis-server"
        );
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Sends `PING` and returns true on `+PONG` (a `-LOADING` answer while the
/// append-only file is replayed is not ready yet).
pub fn ping(port: u16) -> bool {
    ping_as(port, None)
}

/// [`ping`] after `AUTH password` (its `+OK` is skipped).
fn ping_as(port: u16, password: Option<&str>) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    let auth = password.map(|p| format!("AUTH {p}\r\n")).unwrap_or_default();
    if s.write_all(format!("{auth}PING\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    if password.is_some() {
        // `+OK\r\n` then the PING answer.
        while got.windows(2).filter(|w| *w == b"\r\n").count() < 2 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        return got.starts_with(b"+OK\r\n+PONG");
    }
    got.starts_with(b"+PONG")
}

impl RedisServer {
    /// Starts a fresh server on a free port (a few attempts in case another
    /// test takes the port between the probe and the bind).
    pub fn start() -> RedisServer {
        RedisServer::start_as(None)
    }

    /// A fresh server that requires `AUTH password` (`requirepass`).
    pub fn start_with_password(password: &str) -> RedisServer {
        RedisServer::start_as(Some(password.to_string()))
    }

    fn start_as(password: Option<String>) -> RedisServer {
        require_redis_server();
        let n = DIRS.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("atlas-it-redis-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the redis data dir");
        let mut last_error = String::new();
        for _attempt in 0..5 {
            let mut server = RedisServer { child: None, port: free_port(), dir: dir.clone(), password: password.clone() };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    eprintln!("redis: {e}; trying another port");
                    last_error = e;
                    // Keep the directory for the next attempt.
                    server.dir = PathBuf::new();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("could not start redis-server: {last_error}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.join("redis.log");
        let mut cmd = Command::new("redis-server");
        if let Some(p) = &self.password {
            cmd.arg("--requirepass").arg(p);
        }
        let child = cmd
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("yes")
            .arg("--appendfsync")
            .arg("always")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .arg("--daemonize")
            .arg("no")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping_as(self.port, self.password.as_deref()) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("redis-server on port {} exited ({status}); its log:\n{text}", self.port));
            }
            if Instant::now() >= deadline {
                self.kill();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("redis-server on port {} did not answer PING within {START_TIMEOUT:?}; its log:\n{text}", self.port));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// `redis://127.0.0.1:<port>/0` (`redis://:<password>@...` when it
    /// requires one).
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// A crash: SIGKILL, then waits for the process (the port refuses
    /// connections when this returns).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and directory (the append-only file
    /// brings the data back); waits for PING.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port may linger for a moment after the kill.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("redis restart: {e}; retrying");
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("redis restart on port {}: {e}", self.port),
            }
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if !self.dir.as_os_str().is_empty() {
            if thread::panicking() {
                eprintln!("----- redis log -----\n{}\n----- end of redis log -----", self.log());
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------
// A minimal RESP client (to look at what Atlas wrote)
// ---------------------------------------------------------------------------

/// One RESP value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// Parses one RESP value at the start of `buf`: `Ok(None)` when more bytes
/// are needed, otherwise the value and the bytes used.
fn parse_resp(buf: &[u8]) -> Result<Option<(Resp, usize)>, String> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    if line_end == 0 {
        return Err("empty RESP line".into());
    }
    let line = String::from_utf8_lossy(&buf[1..line_end]).into_owned();
    let after = line_end + 2;
    let int = |s: &str| s.parse::<i64>().map_err(|e| format!("bad RESP integer {s:?}: {e}"));
    match buf[0] {
        b'+' => Ok(Some((Resp::Simple(line), after))),
        b'-' => Ok(Some((Resp::Error(line), after))),
        b':' => Ok(Some((Resp::Int(int(&line)?), after))),
        b'$' => {
            let n = int(&line)?;
            if n < 0 {
                return Ok(Some((Resp::Bulk(None), after)));
            }
            let end = after + n as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            Ok(Some((Resp::Bulk(Some(buf[after..end].to_vec())), end + 2)))
        }
        b'*' => {
            let n = int(&line)?;
            if n < 0 {
                return Ok(Some((Resp::Array(None), after)));
            }
            let mut items = Vec::with_capacity(n as usize);
            let mut pos = after;
            for _ in 0..n {
                match parse_resp(&buf[pos..])? {
                    Some((v, used)) => {
                        items.push(v);
                        pos += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Resp::Array(Some(items)), pos)))
        }
        other => Err(format!("unexpected RESP type byte {other:#04x}")),
    }
}

/// Appends `args` as a RESP array of bulk strings.
fn encode(req: &mut Vec<u8>, args: &[&str]) {
    req.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
}

impl RedisServer {
    /// Runs one command on a fresh connection and returns the answer.
    pub fn command(&self, args: &[&str]) -> Result<Resp, String> {
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2)).map_err(|e| format!("connect to redis: {e}"))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        let mut req = Vec::new();
        if let Some(p) = &self.password {
            encode(&mut req, &["AUTH", p]);
        }
        encode(&mut req, args);
        s.write_all(&req).map_err(|e| format!("write to redis: {e}"))?;
        // After AUTH, its `+OK` comes first.
        let mut answers_left = if self.password.is_some() { 2 } else { 1 };
        let mut buf = Vec::new();
        let mut tmp = [0u8; 16 << 10];
        loop {
            while let Some((v, used)) = parse_resp(&buf)? {
                answers_left -= 1;
                if answers_left == 0 {
                    return Ok(v);
                }
                if let Resp::Error(e) = v {
                    return Err(format!("redis AUTH: {e}"));
                }
                buf.drain(..used);
            }
            match s.read(&mut tmp) {
                Ok(0) => return Err("redis closed the connection before a full answer".into()),
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(e) => return Err(format!("read from redis: {e}")),
            }
        }
    }

    /// Every key (`KEYS *`), sorted.
    pub fn keys(&self) -> Vec<String> {
        match self.command(&["KEYS", "*"]) {
            Ok(Resp::Array(Some(items))) => {
                let mut keys: Vec<String> = items
                    .into_iter()
                    .filter_map(|i| match i {
                        Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(&b).into_owned()),
                        _ => None,
                    })
                    .collect();
                keys.sort();
                keys
            }
            other => panic!("KEYS *: unexpected answer {other:?}"),
        }
    }
}
