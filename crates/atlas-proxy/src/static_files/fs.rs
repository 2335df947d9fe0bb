//! Mapping a request path to a file under a root, safely, and the
//! per-worker cache of small files.
//!
//! The path is percent-decoded and split into segments; `..` is refused
//! outright. The file is then opened relative to an `O_PATH` descriptor of
//! the root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, so the
//! kernel itself refuses any resolution (including through a symlink) that
//! leaves the root. With `allow_symlinks_outside`, plain `openat` is used.
//! On kernels without openat2 (before 5.6) the opened file's real path is
//! checked against the root instead.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs::File;
use std::hash::BuildHasherDefault;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Instant, SystemTime};

/// Why a path does not lead to a servable file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed encoding: 400.
    BadPath,
    /// Missing, escaping the root, or not a regular file: 404.
    NotFound,
    /// A directory requested without its trailing slash: 301.
    AddSlash,
}

/// Decodes `%XX` and splits into clean segments. `..` anywhere (raw or
/// encoded) is an escape attempt and refused. Returns the path relative to
/// the root and whether the request ended in a slash.
///
/// A path with nothing encoded and no empty, `.` or `..` segment (nearly
/// every request) is its own relative path once its end slashes are off:
/// it is returned borrowed, without the decode, the split and two
/// allocations.
pub fn decode_path(raw: &str) -> Result<(Cow<'_, str>, bool), Refusal> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return Err(Refusal::BadPath);
    }
    let bytes = path.as_bytes();
    let plain = !bytes.contains(&b'%') && !bytes.contains(&0) && !bytes.windows(2).any(|w| w[0] == b'/' && (w[1] == b'/' || w[1] == b'.'));
    if plain {
        let slash = path.ends_with('/');
        let inner = &path[1..];
        return Ok((Cow::Borrowed(inner.strip_suffix('/').unwrap_or(inner)), slash));
    }
    decode_path_general(path).map(|(rel, slash)| (Cow::Owned(rel), slash))
}

/// Every path, by decoding and splitting it.
fn decode_path_general(path: &str) -> Result<(String, bool), Refusal> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(Refusal::BadPath)?;
            let s = std::str::from_utf8(hex).map_err(|_| Refusal::BadPath)?;
            decoded.push(u8::from_str_radix(s, 16).map_err(|_| Refusal::BadPath)?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    if decoded.contains(&0) {
        return Err(Refusal::BadPath);
    }
    let decoded = String::from_utf8(decoded).map_err(|_| Refusal::BadPath)?;
    let mut rel = String::with_capacity(decoded.len());
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => return Err(Refusal::NotFound),
            s => {
                if !rel.is_empty() {
                    rel.push('/');
                }
                rel.push_str(s);
            }
        }
    }
    Ok((rel, decoded.ends_with('/')))
}

/// A root directory held open so every lookup is relative to it.
pub struct Root {
    pub path: PathBuf,
    fd: OwnedFd,
    allow_outside: bool,
}

fn cstr(p: &str) -> Result<CString, Refusal> {
    CString::new(if p.is_empty() { "." } else { p }).map_err(|_| Refusal::BadPath)
}

impl Root {
    pub fn open(path: &Path, allow_outside: bool) -> std::io::Result<Root> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: plain syscall with a valid C string; the result is checked.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        Ok(Root { path: path.to_path_buf(), fd: unsafe { OwnedFd::from_raw_fd(fd) }, allow_outside })
    }

    /// Opens `rel` (read-only) beneath the root.
    pub fn open_file(&self, rel: &str) -> Result<File, Refusal> {
        let c = cstr(rel)?;
        let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
        let fd = if self.allow_outside {
            // SAFETY: valid descriptor and C string.
            unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) }
        } else {
            // SAFETY: open_how is plain data; all-zero is its documented default.
            let mut how: libc::open_how = unsafe { std::mem::zeroed() };
            how.flags = flags as u64;
            how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
            // SAFETY: openat2 with a valid descriptor, C string and open_how of the size passed.
            let fd = unsafe {
                libc::syscall(libc::SYS_openat2, self.fd.as_raw_fd(), c.as_ptr(), &how as *const libc::open_how, std::mem::size_of::<libc::open_how>())
            } as RawFd;
            if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                return self.open_checked(&c, flags);
            }
            fd
        };
        if fd < 0 {
            return Err(Refusal::NotFound);
        }
        // SAFETY: a fresh descriptor we own.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Pre-5.6 kernels: open, then compare the real path with the root.
    fn open_checked(&self, c: &CString, flags: i32) -> Result<File, Refusal> {
        // SAFETY: valid descriptor and C string.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) };
        if fd < 0 {
            return Err(Refusal::NotFound);
        }
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        let real = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|_| Refusal::NotFound)?;
        if real.starts_with(&self.path) {
            Ok(file)
        } else {
            Err(Refusal::NotFound)
        }
    }
}

/// A small file held in memory with its precomputed headers.
pub struct Cached {
    pub body: Box<[u8]>,
    /// `Content-Type`, `Last-Modified`, `ETag`, `Accept-Ranges` lines.
    pub headers: String,
    pub etag: String,
    pub mtime: SystemTime,
    pub size: u64,
    ino: u64,
    checked: Instant,
}

/// Identity and metadata of an opened file.
pub struct Opened {
    pub file: File,
    pub size: u64,
    pub mtime: SystemTime,
    pub ino: u64,
    /// The path (relative to the root) actually opened (index appended).
    pub rel: String,
}

/// Resolves a decoded relative path to a regular file, appending the index
/// file for directories.
pub fn open(root: &Root, rel: &str, trailing_slash: bool, index: &str) -> Result<Opened, Refusal> {
    let file = root.open_file(rel)?;
    let meta = file.metadata().map_err(|_| Refusal::NotFound)?;
    if meta.is_dir() {
        if !trailing_slash && !rel.is_empty() {
            return Err(Refusal::AddSlash);
        }
        let with_index = if rel.is_empty() { index.to_string() } else { format!("{rel}/{index}") };
        let file = root.open_file(&with_index)?;
        let meta = file.metadata().map_err(|_| Refusal::NotFound)?;
        if !meta.is_file() {
            return Err(Refusal::NotFound);
        }
        return Ok(Opened { file, size: meta.len(), mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), ino: meta.ino(), rel: with_index });
    }
    // `/file.txt/` names a directory that does not exist (ENOTDIR), as nginx says.
    if !meta.is_file() || trailing_slash {
        return Err(Refusal::NotFound);
    }
    Ok(Opened { file, size: meta.len(), mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), ino: meta.ino(), rel: rel.to_string() })
}

/// `"<mtime seconds hex>.<nanos hex>-<size hex>"`: changes whenever the
/// file's content is replaced or rewritten.
pub fn etag(mtime: SystemTime, size: u64) -> String {
    let d = mtime.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    format!("\"{:x}.{:x}-{:x}\"", d.as_secs(), d.subsec_nanos(), size)
}

pub fn content_type(rel: &str) -> String {
    let mime = mime_guess::from_path(rel).first_or_octet_stream();
    match mime.type_() {
        mime_guess::mime::TEXT => format!("{}; charset=utf-8", mime.essence_str()),
        _ if mime.essence_str() == "application/javascript" || mime.essence_str() == "application/json" => format!("{}; charset=utf-8", mime.essence_str()),
        _ => mime.essence_str().to_string(),
    }
}

pub fn entity_headers(rel: &str, mtime: SystemTime, etag: &str) -> String {
    format!("Content-Type: {}\r\nLast-Modified: {}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\n", content_type(rel), httpdate::fmt_http_date(mtime))
}

/// Per-worker cache of small files: FIFO eviction under a byte budget,
/// entries re-checked (stat of the path) once older than `revalidate`.
///
/// Keyed by site, path and trailing slash, packed into bytes in a scratch
/// buffer, and hashed with FxHash: only files that exist get an entry, so
/// a client cannot choose keys to collide, and SipHash plus a `format!`ed
/// key were a tenth of a cached response's instructions.
pub struct FileCache {
    map: HashMap<Box<[u8]>, Rc<Cached>, BuildHasherDefault<fxhash::FxHasher>>,
    order: VecDeque<Box<[u8]>>,
    scratch: Vec<u8>,
    bytes: usize,
    pub max_bytes: usize,
    pub max_file: usize,
}

impl FileCache {
    pub fn new(max_bytes: usize, max_file: usize) -> Self {
        FileCache { map: HashMap::default(), order: VecDeque::new(), scratch: Vec::new(), bytes: 0, max_bytes, max_file: max_file.min(max_bytes) }
    }

    /// New limits after a reload; entries are evicted lazily as files load.
    pub fn set_limits(&mut self, max_bytes: usize, max_file: usize) {
        self.max_bytes = max_bytes;
        self.max_file = max_file.min(max_bytes);
    }

    /// The key of `rel` (with or without its trailing slash) under site
    /// `site`, in the scratch buffer.
    fn key(&mut self, site: usize, rel: &str, slash: bool) -> &[u8] {
        self.scratch.clear();
        self.scratch.extend_from_slice(&site.to_le_bytes());
        self.scratch.push(slash as u8);
        self.scratch.extend_from_slice(rel.as_bytes());
        &self.scratch
    }

    /// A cached entry still fresh by `revalidate`, or `None`.
    pub fn fresh(&mut self, site: usize, rel: &str, slash: bool, revalidate: std::time::Duration) -> Option<Rc<Cached>> {
        self.key(site, rel, slash);
        self.map.get(&self.scratch[..]).filter(|c| c.checked.elapsed() < revalidate).cloned()
    }

    /// The cached entry if it still describes `opened`, refreshing its check time.
    pub fn matching(&mut self, site: usize, rel: &str, slash: bool, opened: &Opened) -> Option<Rc<Cached>> {
        self.key(site, rel, slash);
        let c = self.map.get_mut(&self.scratch[..])?;
        if c.size == opened.size && c.mtime == opened.mtime && c.ino == opened.ino {
            if let Some(inner) = Rc::get_mut(c) {
                inner.checked = Instant::now();
            } else {
                let fresh = Cached {
                    body: c.body.clone(),
                    headers: c.headers.clone(),
                    etag: c.etag.clone(),
                    mtime: c.mtime,
                    size: c.size,
                    ino: c.ino,
                    checked: Instant::now(),
                };
                *c = Rc::new(fresh);
            }
            return Some(c.clone());
        }
        None
    }

    /// Reads `opened` whole and caches it when it fits the limits.
    pub fn load(&mut self, site: usize, rel: &str, slash: bool, opened: &mut Opened) -> Option<Rc<Cached>> {
        if opened.size as usize > self.max_file {
            return None;
        }
        let mut body = Vec::with_capacity(opened.size as usize);
        opened.file.read_to_end(&mut body).ok()?;
        if body.len() as u64 != opened.size {
            // Changed while we read it: serve it uncached this time.
            return None;
        }
        let etag = etag(opened.mtime, opened.size);
        let entry = Rc::new(Cached {
            headers: entity_headers(&opened.rel, opened.mtime, &etag),
            body: body.into_boxed_slice(),
            etag,
            mtime: opened.mtime,
            size: opened.size,
            ino: opened.ino,
            checked: Instant::now(),
        });
        let key: Box<[u8]> = self.key(site, rel, slash).into();
        if let Some(old) = self.map.remove(&key) {
            self.bytes -= old.body.len();
            self.order.retain(|k| *k != key);
        }
        while self.bytes + entry.body.len() > self.max_bytes {
            let Some(k) = self.order.pop_front() else { break };
            if let Some(old) = self.map.remove(&k) {
                self.bytes -= old.body.len();
            }
        }
        self.bytes += entry.body.len();
        self.order.push_back(key.clone());
        self.map.insert(key, entry.clone());
        Some(entry)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_traversal_and_bad_encoding() {
        assert_eq!(decode_path("/a/b/../c"), Err(Refusal::NotFound));
        assert_eq!(decode_path("/%2e%2e/etc/passwd"), Err(Refusal::NotFound));
        assert_eq!(decode_path("/%2E%2E%2Fetc"), Err(Refusal::NotFound));
        assert_eq!(decode_path("/a/%2e%2e%2f%2e%2e/x"), Err(Refusal::NotFound));
        assert_eq!(decode_path("/a%00b"), Err(Refusal::BadPath));
        assert_eq!(decode_path("/a%zz"), Err(Refusal::BadPath));
        assert_eq!(decode_path("/a%2"), Err(Refusal::BadPath));
        assert_eq!(decode_path("a"), Err(Refusal::BadPath));
        assert_eq!(decode_path("/a/./b//c.txt?x=1"), Ok(("a/b/c.txt".into(), false)));
        assert_eq!(decode_path("/dir/"), Ok(("dir".into(), true)));
        assert_eq!(decode_path("/"), Ok(("".into(), true)));
        assert_eq!(decode_path("/caf%C3%A9.txt"), Ok(("café.txt".into(), false)));
        assert_eq!(decode_path("/..."), Ok(("...".into(), false)));
    }

    /// The borrowed fast path must give what decoding and splitting gives,
    /// for every mix of plain, dot, empty and encoded segments.
    #[test]
    fn the_fast_path_agrees_with_the_general_decoder() {
        let segs = ["", ".", "..", "a", ".h", "b.c", "%61", "x%2F", "...", "a.", "%2e"];
        let mut paths = vec![String::from("/")];
        for a in segs {
            for b in segs {
                for c in ["", "/", "?q=/../x", "#f"] {
                    paths.push(format!("/{a}{c}"));
                    paths.push(format!("/{a}/{b}{c}"));
                    paths.push(format!("/{a}//{b}/{c}"));
                }
            }
        }
        let mut fast = 0;
        for p in &paths {
            let path = p.split(['?', '#']).next().unwrap();
            let got = decode_path(p).map(|(r, s)| {
                fast += matches!(r, Cow::Borrowed(_)) as usize;
                (r.into_owned(), s)
            });
            assert_eq!(got, decode_path_general(path), "{p}");
        }
        assert!(fast > 50, "the fast path served {fast} of {} paths", paths.len());
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type("a/index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("x.png"), "image/png");
        assert_eq!(content_type("x.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }
}
