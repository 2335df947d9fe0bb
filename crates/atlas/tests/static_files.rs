//! Static files: headers and content types, index.html and the 301 for
//! directories, path traversal (raw `..`, encoded dots, symlinks out of the
//! root), conditional requests (304), byte ranges (206 / 416), HEAD and 405,
//! keep-alive and HTTP/1.0, files changed on disk, files bigger than the
//! cache (streamed; a 200 MiB file with flat RSS), and `[[routes]]` mixing
//! static prefixes with proxying on one port.

mod common;

use std::fs;
use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A static listener on `root` with `[static_files]` lines `settings`.
fn static_cfg(root: &Path, settings: &str) -> String {
    format!("[listen]\naddress = \"127.0.0.1\"\nport = 0\nmode = \"static\"\nworkers = 1\nroot = {:?}\n\n[static_files]\n{settings}\n", path_of(root))
}

fn req(method: &str, path: &str, extra: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: atlas.test\r\n{extra}\r\n")
}

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p).unwrap().modified().unwrap()
}

fn set_mtime(p: &Path, t: SystemTime) {
    fs::File::options().write(true).open(p).unwrap().set_modified(t).unwrap();
}

/// Asserts a full 200 for `data`, returns the response.
fn assert_full(r: &Response, data: &[u8], what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.head);
    assert_eq!(r.header("content-length"), Some(data.len().to_string().as_str()), "{what}: {}", r.head);
    assert!(r.header("content-range").is_none(), "{what}: a 200 must not carry Content-Range: {}", r.head);
    assert!(r.body == data, "{what}: body differs (got {} bytes, hash {:x}; want {} bytes, hash {:x})", r.body.len(), fnv64(&r.body), data.len(), fnv64(data));
}

/// The status of `GET raw_path` sent byte for byte on a fresh connection.
fn raw_get(addr: SocketAddr, raw_path: &str) -> Response {
    one_shot(addr, req("GET", raw_path, ""))
}

fn curl_code(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]).args(args).output().expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Byte ranges on `path` (whose content is `data`, at least 1000 bytes) over
/// one keep-alive connection.
fn check_ranges(addr: SocketAddr, path: &str, data: &[u8]) {
    let n = data.len();
    let mut c = Client::connect(addr);
    let etag = c.get(path).header("etag").expect("ETag").to_string();

    let cases: Vec<(String, usize, usize)> = vec![
        ("bytes=0-99".into(), 0, 99),
        ("bytes=10-10".into(), 10, 10),
        (format!("bytes={}-{}", n / 2, n / 2 + 333), n / 2, n / 2 + 333),
        (format!("bytes={}-{}", n - 10, n + 500), n - 10, n - 1),
        ("bytes=-10".into(), n - 10, n - 1),
        ("bytes=-1".into(), n - 1, n - 1),
        ("bytes=500-".into(), 500, n - 1),
        (format!("bytes={}-", n - 1), n - 1, n - 1),
    ];
    for (range, a, b) in cases {
        let r = c.request(req("GET", path, &format!("Range: {range}\r\n")));
        assert_eq!(r.status, 206, "Range: {range}: {}", r.head);
        assert_eq!(r.header("content-range"), Some(format!("bytes {a}-{b}/{n}").as_str()), "Range: {range}: {}", r.head);
        assert_eq!(r.header("content-length"), Some((b - a + 1).to_string().as_str()), "Range: {range}: {}", r.head);
        assert!(r.body == data[a..=b], "Range: {range}: wrong bytes (got {} bytes)", r.body.len());
    }

    // A suffix longer than the file: the whole file.
    let r = c.request(req("GET", path, &format!("Range: bytes=-{}\r\n", n + 100)));
    assert!(r.status == 200 || r.status == 206, "{}", r.head);
    assert!(r.body == data, "suffix range longer than the file must give the whole file");

    // Unsatisfiable.
    for range in [format!("bytes={n}-"), format!("bytes={}-{}", n + 5, n + 10)] {
        let r = c.request(req("GET", path, &format!("Range: {range}\r\n")));
        assert_eq!(r.status, 416, "Range: {range}: {}", r.head);
        assert_eq!(r.header("content-range"), Some(format!("bytes */{n}").as_str()), "Range: {range}: {}", r.head);
        assert!(r.body.is_empty(), "416 body: {}", show(&r.body));
    }

    // Several ranges: a plain 200 with the whole file.
    let r = c.request(req("GET", path, "Range: bytes=0-1,5-6\r\n"));
    assert_full(&r, data, "multi-range");

    // If-Range with the current ETag honours the Range, with a stale one not.
    let r = c.request(req("GET", path, &format!("Range: bytes=100-199\r\nIf-Range: {etag}\r\n")));
    assert_eq!(r.status, 206, "If-Range with the current ETag: {}", r.head);
    assert!(r.body == data[100..200]);
    let r = c.request(req("GET", path, "Range: bytes=100-199\r\nIf-Range: \"stale-etag\"\r\n"));
    assert_full(&r, data, "If-Range with a stale ETag");

    // The connection survived all of that.
    assert_full(&c.get(path), data, "after the range requests");
}

// ---------------------------------------------------------------------------
// Basics: headers, content types, index, 301, 404
// ---------------------------------------------------------------------------

#[test]
fn serves_files_with_entity_headers_and_content_types() {
    let d = TempDir::new();
    let files: &[(&str, &[u8], &str)] = &[
        ("index.html", b"<h1>home</h1>", "text/html; charset=utf-8"),
        ("pic.png", b"\x89PNG\r\n\x1a\nnot-really-a-png", "image/png"),
        ("blob.zzqx", b"\x00\x01\x02unknown", "application/octet-stream"),
        ("noext", b"no extension", "application/octet-stream"),
        ("sub/page.html", b"<p>sub page</p>", "text/html; charset=utf-8"),
    ];
    for (p, body, _) in files {
        d.write(p, body);
    }
    d.write("style.css", "body { color: red }");
    d.write("app.js", "console.log(1)");
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    let mut c = Client::connect(atlas.addr());

    for (p, body, ctype) in files {
        let r = c.get(&format!("/{p}"));
        assert_full(&r, body, p);
        assert_eq!(r.header("content-type"), Some(*ctype), "/{p}: {}", r.head);
        let etag = r.header("etag").unwrap_or_else(|| panic!("/{p}: no ETag: {}", r.head));
        assert!(etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'), "/{p}: ETag must be quoted: {etag:?}");
        assert_eq!(r.header("last-modified"), Some(http_date(mtime(&d.join(p))).as_str()), "/{p}: {}", r.head);
        assert_eq!(r.header("accept-ranges"), Some("bytes"), "/{p}: {}", r.head);
        assert_eq!(r.header("server"), Some("atlas"), "/{p}: {}", r.head);
        let date = r.header("date").unwrap_or_else(|| panic!("/{p}: no Date: {}", r.head));
        assert!(date.len() == 29 && date.ends_with(" GMT"), "/{p}: Date is not an HTTP date: {date:?}");
        assert!(!r.chunked);
    }
    let r = c.get("/style.css");
    assert!(r.header("content-type").unwrap_or("").starts_with("text/css"), "{}", r.head);
    let r = c.get("/app.js?v=3");
    assert_eq!(r.status, 200, "a query string is not part of the file name: {}", r.head);
    assert!(r.header("content-type").unwrap_or("").contains("javascript"), "{}", r.head);
    assert_eq!(r.text(), "console.log(1)");

    // Different files get different ETags.
    let e1 = c.get("/noext").header("etag").unwrap().to_string();
    let e2 = c.get("/blob.zzqx").header("etag").unwrap().to_string();
    assert_ne!(e1, e2);
}

#[test]
fn index_html_for_directories_and_301_without_slash() {
    let d = TempDir::new();
    d.write("index.html", "root index");
    d.write("docs/index.html", "docs index");
    d.write("docs/deep/index.html", "deep index");
    d.write("docs/a.txt", "a");
    fs::create_dir_all(d.join("empty")).unwrap();
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    let mut c = Client::connect(atlas.addr());

    let r = c.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "root index"), "{}", r.head);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let r = c.get("/docs/");
    assert_eq!((r.status, r.text().as_str()), (200, "docs index"), "{}", r.head);
    let r = c.get("/docs/deep/?q=1");
    assert_eq!((r.status, r.text().as_str()), (200, "deep index"), "{}", r.head);
    assert_eq!(c.get("/index.html").text(), "root index");

    for (path, location) in [("/docs", "/docs/"), ("/docs/deep", "/docs/deep/"), ("/docs?x=1&y=2", "/docs/?x=1&y=2"), ("/empty", "/empty/")] {
        let r = c.get(path);
        assert_eq!(r.status, 301, "{path}: {}", r.head);
        assert_eq!(r.header("location"), Some(location), "{path}: {}", r.head);
    }
    // A directory without an index, a missing file, a file used as a directory.
    for path in ["/empty/", "/missing.txt", "/docs/missing/", "/docs/a.txt/x"] {
        let r = c.get(path);
        assert_eq!(r.status, 404, "{path}: {}", r.head);
    }
    // Still the same connection.
    assert_eq!(c.get("/docs/a.txt").text(), "a");
}

/// A regular file named with a trailing slash is not a directory: like a
/// POSIX path lookup (ENOTDIR) and nginx, `/file/` must not serve `/file`.
#[test]
fn file_with_trailing_slash_is_not_found() {
    let d = TempDir::new();
    d.write("docs/a.txt", "a");
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    let r = http_get(atlas.addr(), "/docs/a.txt/");
    assert_eq!(r.status, 404, "GET /docs/a.txt/ served the file: {}", r.head);
}

#[test]
fn custom_index_and_global_root() {
    let d = TempDir::new();
    d.write("home.htm", "custom index");
    d.write("index.html", "not the configured index");
    let cfg = format!(
        "[listen]\naddress = \"127.0.0.1\"\nport = 0\nmode = \"static\"\nworkers = 1\n\n[static_files]\nroot = {:?}\nindex = \"home.htm\"\n",
        path_of(d.path())
    );
    let atlas = Atlas::start(&cfg);
    let r = http_get(atlas.addr(), "/");
    assert_eq!((r.status, r.text().as_str()), (200, "custom index"), "{}", r.head);
    assert_eq!(http_get(atlas.addr(), "/index.html").text(), "not the configured index");
}

// ---------------------------------------------------------------------------
// Traversal and symlinks
// ---------------------------------------------------------------------------

/// base/secret.txt and base/outside/other.txt outside the root base/root,
/// with symlinks inside the root that lead out (and one that stays in).
fn traversal_tree() -> (TempDir, std::path::PathBuf) {
    let base = TempDir::new();
    base.write("secret.txt", "TOP-SECRET outside the root");
    base.write("outside/other.txt", "OUTSIDE-DIR file");
    base.write("root/index.html", "root index");
    base.write("root/sub/a.txt", "inside a");
    let root = base.join("root");
    symlink("/etc/passwd", root.join("passwd")).unwrap();
    symlink("../secret.txt", root.join("secret-link")).unwrap();
    symlink(base.join("outside"), root.join("outdir")).unwrap();
    symlink("sub/a.txt", root.join("inside-link")).unwrap();
    (base, root)
}

const ESCAPES: &[&str] = &[
    "/../secret.txt",
    "/sub/../../secret.txt",
    "/./../secret.txt",
    "/../../../../../../etc/passwd",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/%2e%2e%2fsecret.txt",
    "/sub/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/..%2fsecret.txt",
    "/.%2e/secret.txt",
    "/sub/..%2F..%2Fsecret.txt",
    "/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
];

fn assert_not_leaked(r: &Response, what: &str) {
    let body = r.text();
    assert!(
        !body.contains("TOP-SECRET") && !body.contains("OUTSIDE-DIR") && !body.contains("root:"),
        "{what}: leaked a file from outside the root: {}",
        show(&r.body)
    );
}

#[test]
fn traversal_and_symlinks_out_of_the_root_are_404() {
    let (_base, root) = traversal_tree();
    let atlas = Atlas::start(&static_cfg(&root, ""));
    let addr = atlas.addr();

    for p in ESCAPES {
        let r = raw_get(addr, p);
        assert_eq!(r.status, 404, "GET {p} (raw socket): {}", r.head);
        assert_not_leaked(&r, p);
    }
    for p in ["/passwd", "/secret-link", "/outdir/other.txt", "/outdir/"] {
        let r = raw_get(addr, p);
        assert_eq!(r.status, 404, "symlink out of the root, GET {p}: {}", r.head);
        assert_not_leaked(&r, p);
    }
    // A symlink that stays inside the root is fine.
    let r = raw_get(addr, "/inside-link");
    assert_eq!((r.status, r.text().as_str()), (200, "inside a"), "{}", r.head);

    // NUL and malformed percent-encoding.
    for p in ["/a%00b", "/sub/a.txt%00.html", "/%zz", "/abc%2", "/%"] {
        let r = raw_get(addr, p);
        assert_eq!(r.status, 400, "GET {p}: {}", r.head);
    }

    // curl --path-as-is sends the dots as they are.
    let port = addr.port().to_string();
    for p in ["/../secret.txt", "/sub/../../secret.txt", "/../../../../etc/passwd"] {
        let code = curl_code(&["--path-as-is", &format!("http://127.0.0.1:{port}{p}")]);
        assert_eq!(code, "404", "curl --path-as-is {p}");
    }
    // The server is fine afterwards.
    assert_eq!(http_get(addr, "/sub/a.txt").text(), "inside a");
}

#[test]
fn symlinks_outside_are_served_when_allowed() {
    let (_base, root) = traversal_tree();
    let atlas = Atlas::start(&static_cfg(&root, "allow_symlinks_outside = true"));
    let addr = atlas.addr();

    let r = raw_get(addr, "/secret-link");
    assert_eq!((r.status, r.text().as_str()), (200, "TOP-SECRET outside the root"), "{}", r.head);
    let r = raw_get(addr, "/outdir/other.txt");
    assert_eq!((r.status, r.text().as_str()), (200, "OUTSIDE-DIR file"), "{}", r.head);
    let r = raw_get(addr, "/passwd");
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.body, fs::read("/etc/passwd").unwrap());

    // `..` in the request is still refused: the setting is about symlinks only.
    for p in ESCAPES {
        let r = raw_get(addr, p);
        assert_eq!(r.status, 404, "GET {p} with allow_symlinks_outside: {}", r.head);
        assert_not_leaked(&r, p);
    }
}

// ---------------------------------------------------------------------------
// Conditional requests and ranges
// ---------------------------------------------------------------------------

#[test]
fn not_modified_by_etag_and_by_date() {
    let d = TempDir::new();
    let data = pattern(2000, 1);
    let f = d.write("f.bin", &data);
    set_mtime(&f, SystemTime::now() - Duration::from_secs(3600));
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    let mut c = Client::connect(atlas.addr());

    let r = c.get("/f.bin");
    assert_full(&r, &data, "first GET");
    let etag = r.header("etag").unwrap().to_string();
    let lm = r.header("last-modified").unwrap().to_string();
    let weak = format!("W/{etag}");
    let later = http_date(mtime(&f) + Duration::from_secs(86_400));
    let earlier = http_date(mtime(&f) - Duration::from_secs(86_400));

    let not_modified = [
        format!("If-None-Match: {etag}\r\n"),
        "If-None-Match: *\r\n".to_string(),
        format!("If-None-Match: {weak}\r\n"),
        format!("If-None-Match: \"other\", {etag}\r\n"),
        format!("If-Modified-Since: {lm}\r\n"),
        format!("If-Modified-Since: {later}\r\n"),
    ];
    for h in &not_modified {
        c.send(req("GET", "/f.bin", h));
        let r = c.read_response();
        assert_eq!(r.status, 304, "{}: {}", h.trim(), r.head);
        assert!(r.header("content-length").is_none_or(|v| v == "0" || v == data.len().to_string()), "{}", r.head);
        assert_eq!(r.header("etag"), Some(etag.as_str()), "304 must carry the ETag: {}", r.head);
        // No body followed the 304: the next response parses cleanly.
        assert_full(&c.get("/f.bin"), &data, &format!("GET after a 304 for {}", h.trim()));
    }

    let modified = [
        "If-None-Match: \"something-else\"\r\n".to_string(),
        format!("If-Modified-Since: {earlier}\r\n"),
        "If-Modified-Since: not a date\r\n".to_string(),
        // If-None-Match wins over If-Modified-Since.
        format!("If-None-Match: \"something-else\"\r\nIf-Modified-Since: {later}\r\n"),
    ];
    for h in &modified {
        let r = c.request(req("GET", "/f.bin", h));
        assert_full(&r, &data, h.trim());
    }
}

#[test]
fn not_modified_has_no_body_on_keep_alive() {
    let d = TempDir::new();
    d.write("a.txt", "some text that must not follow a 304");
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    let mut c = Client::connect(atlas.addr());
    let etag = c.get("/a.txt").header("etag").unwrap().to_string();
    for _ in 0..3 {
        let r = c.request(req("GET", "/a.txt", &format!("If-None-Match: {etag}\r\n")));
        assert_eq!(r.status, 304, "{}", r.head);
        let r = c.get("/a.txt");
        assert_eq!(r.status, 200, "response after a 304 (stray body bytes?): {}", r.head);
        assert_eq!(r.text(), "some text that must not follow a 304");
    }
    assert!(c.buf.is_empty(), "unexpected extra bytes: {}", show(&c.buf));
}

#[test]
fn byte_ranges_on_a_cached_file() {
    let d = TempDir::new();
    let data = pattern(1000, 2);
    d.write("r.bin", &data);
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    check_ranges(atlas.addr(), "/r.bin", &data);
}

// ---------------------------------------------------------------------------
// Methods, HEAD, bodies, keep-alive
// ---------------------------------------------------------------------------

#[test]
fn head_returns_headers_only() {
    let d = TempDir::new();
    let data = pattern(5000, 3);
    d.write("h.bin", &data);
    d.write("page.html", "<b>x</b>");
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    let mut c = Client::connect(atlas.addr());

    let get = c.get("/h.bin");
    c.send(req("HEAD", "/h.bin", ""));
    let r = c.read_head_response();
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("content-length"), Some("5000"), "HEAD must announce the full length: {}", r.head);
    for h in ["etag", "last-modified", "content-type", "accept-ranges"] {
        assert_eq!(r.header(h), get.header(h), "HEAD and GET differ in {h}");
    }
    // Nothing follows the HEAD response: the next GET parses and is complete.
    assert_full(&c.get("/h.bin"), &data, "GET after HEAD");

    c.send(req("HEAD", "/page.html", ""));
    let r = c.read_head_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.header("content-length"), Some("8"));
    assert_eq!(c.get("/page.html").text(), "<b>x</b>");
    assert!(c.buf.is_empty(), "unexpected extra bytes: {}", show(&c.buf));
}

/// HEAD answered with an error status carries no body either (RFC 9110
/// 9.3.2): a body would be read as the start of the next response.
#[test]
fn head_error_responses_have_no_body() {
    let d = TempDir::new();
    d.write("page.html", "<b>x</b>");
    fs::create_dir_all(d.join("dir")).unwrap();
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    let mut c = Client::connect(atlas.addr());
    for (path, status) in [("/nope", 404), ("/dir", 301), ("/dir/", 404)] {
        c.send(req("HEAD", path, ""));
        let r = c.read_head_response();
        assert_eq!(r.status, status, "HEAD {path}: {}", r.head);
        // The next response must start right after the head.
        let next = c.get("/page.html");
        assert_eq!((next.status, next.text().as_str()), (200, "<b>x</b>"), "GET after HEAD {path} (leftover body bytes?): {}", next.head);
    }
    c.send(req("HEAD", "/page.html", "Range: bytes=100-\r\n"));
    let r = c.read_head_response();
    assert_eq!(r.status, 416, "{}", r.head);
    let next = c.get("/page.html");
    assert_eq!(next.status, 200, "GET after HEAD with a 416: {}", next.head);
    assert!(c.buf.is_empty(), "unexpected extra bytes: {}", show(&c.buf));
}

#[test]
fn other_methods_get_405_and_bodies_get_400() {
    let d = TempDir::new();
    d.write("m.txt", "methods");
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    let addr = atlas.addr();

    for m in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let r = one_shot(addr, req(m, "/m.txt", "Content-Length: 0\r\n"));
        assert_eq!(r.status, 405, "{m}: {}", r.head);
        let allow = r.header("allow").unwrap_or_else(|| panic!("{m}: 405 without Allow: {}", r.head));
        let mut methods: Vec<&str> = allow.split(',').map(str::trim).collect();
        methods.sort();
        assert_eq!(methods, vec!["GET", "HEAD"], "{m}: Allow: {allow}");
    }

    // A GET with a body: 400, then the connection is closed.
    for extra in ["Content-Length: 5\r\n\r\nhello", "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"] {
        let mut c = Client::connect(addr);
        c.send(format!("GET /m.txt HTTP/1.1\r\nHost: h\r\n{extra}"));
        let r = c.read_response();
        assert_eq!(r.status, 400, "GET with {extra:?}: {}", r.head);
        assert!(c.is_closed(Duration::from_secs(3)), "connection must close after a request body was refused");
    }
    // Content-Length: 0 is no body.
    let r = one_shot(addr, req("GET", "/m.txt", "Content-Length: 0\r\n"));
    assert_eq!((r.status, r.text().as_str()), (200, "methods"), "{}", r.head);
}

#[test]
fn keep_alive_pipelining_and_http10() {
    let d = TempDir::new();
    let big = pattern(300_000, 4);
    d.write("a.txt", "aaa");
    d.write("b.txt", "bbbbbb");
    d.write("big.bin", &big);
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    let addr = atlas.addr();

    let mut c = Client::connect(addr);
    for i in 0..60 {
        let (p, body): (&str, &[u8]) = match i % 3 {
            0 => ("/a.txt", b"aaa"),
            1 => ("/b.txt", b"bbbbbb"),
            _ => ("/big.bin", &big),
        };
        let r = c.get(p);
        assert_full(&r, body, &format!("request {i} on one connection"));
        assert!(!r.has_token("connection", "close"), "{}", r.head);
    }

    // Pipelined: three requests in one write, three responses in order.
    c.send(format!("{}{}{}", get_req("/b.txt"), get_req("/missing"), get_req("/a.txt")));
    assert_eq!(c.read_response().text(), "bbbbbb");
    assert_eq!(c.read_response().status, 404);
    assert_eq!(c.read_response().text(), "aaa");

    // HTTP/1.1 Connection: close.
    let r = c.request("GET /a.txt HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    assert_eq!(r.text(), "aaa");
    assert!(c.is_closed(Duration::from_secs(3)), "Connection: close must close");

    // HTTP/1.0 closes by default ...
    let mut c = Client::connect(addr);
    let r = c.request("GET /a.txt HTTP/1.0\r\n\r\n");
    assert_eq!((r.status, r.text().as_str()), (200, "aaa"), "{}", r.head);
    assert!(c.is_closed(Duration::from_secs(3)), "an HTTP/1.0 request without keep-alive must close");

    // ... and stays open with Connection: keep-alive.
    let mut c = Client::connect(addr);
    let r = c.request("GET /a.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!((r.status, r.text().as_str()), (200, "aaa"), "{}", r.head);
    assert!(r.has_token("connection", "keep-alive"), "{}", r.head);
    let r = c.request("GET /b.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(r.text(), "bbbbbb");
}

// ---------------------------------------------------------------------------
// Files changed on disk, files bigger than the cache
// ---------------------------------------------------------------------------

fn get_after_revalidate(addr: SocketAddr, path: &str) -> Response {
    thread::sleep(Duration::from_millis(300));
    http_get(addr, path)
}

#[test]
fn cached_file_changed_on_disk_is_served_fresh() {
    let d = TempDir::new();
    let f = d.write("c.txt", "version one");
    set_mtime(&f, SystemTime::now() - Duration::from_secs(100));
    let atlas = Atlas::start(&static_cfg(d.path(), "revalidate = \"100ms\""));
    let addr = atlas.addr();

    let r = http_get(addr, "/c.txt");
    assert_eq!(r.text(), "version one");
    let etag1 = r.header("etag").unwrap().to_string();
    // Served several times: now surely cached.
    for _ in 0..3 {
        assert_eq!(http_get(addr, "/c.txt").text(), "version one");
    }

    // 1. Rewritten in place with a different size.
    fs::write(&f, "version two, longer").unwrap();
    let r = get_after_revalidate(addr, "/c.txt");
    assert_eq!(r.text(), "version two, longer", "content rewritten (different size) must be served fresh: {}", r.head);
    assert_eq!(r.header("content-length"), Some("19"));
    let etag2 = r.header("etag").unwrap().to_string();
    assert_ne!(etag1, etag2, "ETag must change with the content");

    // 2. Same size, different bytes, new mtime.
    let t2 = mtime(&f);
    fs::write(&f, "VERSION TWO, LONGER").unwrap();
    set_mtime(&f, t2 + Duration::from_secs(7));
    let r = get_after_revalidate(addr, "/c.txt");
    assert_eq!(r.text(), "VERSION TWO, LONGER", "same-size rewrite with a new mtime must be served fresh: {}", r.head);
    assert_ne!(r.header("etag"), Some(etag2.as_str()));
    assert_eq!(r.header("last-modified"), Some(http_date(mtime(&f)).as_str()));

    // 3. Replaced by rename (new inode), same size and same mtime.
    let t3 = mtime(&f);
    let tmp = d.write(".c.txt.tmp", "version 3 (renamed)");
    set_mtime(&tmp, t3);
    fs::rename(&tmp, &f).unwrap();
    let r = get_after_revalidate(addr, "/c.txt");
    assert_eq!(r.text(), "version 3 (renamed)", "a file renamed over the old one (new inode) must be served fresh: {}", r.head);

    // 4. Deleted.
    fs::remove_file(&f).unwrap();
    let r = get_after_revalidate(addr, "/c.txt");
    assert_eq!(r.status, 404, "a deleted file must not be served from the cache: {}", r.head);
}

#[test]
fn files_bigger_than_the_cache_limit_are_streamed() {
    let d = TempDir::new();
    let data = pattern(100 * 1024, 5);
    let small = pattern(500, 6);
    let f = d.write("big.bin", &data);
    let s = d.write("small.bin", &small);
    let old = SystemTime::now() - Duration::from_secs(100);
    set_mtime(&f, old);
    set_mtime(&s, old);
    let atlas = Atlas::start(&static_cfg(d.path(), "cache_max_file_bytes = 1024\nrevalidate = \"100ms\""));
    let addr = atlas.addr();

    let mut c = Client::connect(addr);
    for i in 0..5 {
        assert_full(&c.get("/big.bin"), &data, &format!("big file, request {i}"));
        assert_full(&c.get("/small.bin"), &small, &format!("small file, request {i}"));
    }
    c.send(req("HEAD", "/big.bin", ""));
    let r = c.read_head_response();
    assert_eq!(r.header("content-length"), Some("102400"), "{}", r.head);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let etag = c.get("/big.bin").header("etag").unwrap().to_string();
    let r = c.request(req("GET", "/big.bin", &format!("If-None-Match: {etag}\r\n")));
    assert_eq!(r.status, 304, "{}", r.head);
    check_ranges(addr, "/big.bin", &data);

    // Both changed on disk: same sizes, new bytes, new mtimes.
    let data2 = pattern(100 * 1024, 7);
    let small2 = pattern(500, 8);
    fs::write(&f, &data2).unwrap();
    fs::write(&s, &small2).unwrap();
    let now = SystemTime::now();
    set_mtime(&f, now);
    set_mtime(&s, now);
    thread::sleep(Duration::from_millis(300));
    let mut c = Client::connect(addr);
    assert_full(&c.get("/big.bin"), &data2, "big file after change");
    assert_full(&c.get("/small.bin"), &small2, "cached small file after change");
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).expect("VmRSS line")
}

const MIB: usize = 1 << 20;
const HUGE_BLOCKS: usize = 200;

/// Block `i` (1 MiB) of the huge file: a fixed pattern stamped with `i`
/// at both ends, so misplaced or repeated blocks are caught.
fn huge_block(base: &[u8], i: usize) -> Vec<u8> {
    let mut b = base.to_vec();
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b[MIB - 8..].copy_from_slice(&(!(i as u64)).to_le_bytes());
    b
}

/// Streams a response body from `s` (after `first` bytes already read),
/// comparing against the huge file from `offset`; samples RSS meanwhile.
fn stream_and_verify(s: &mut TcpStream, first: Vec<u8>, offset: usize, len: usize, base: &[u8], pid: u32, max_rss: &mut u64) {
    let mut pos = offset;
    let end = offset + len;
    let mut block_idx = usize::MAX;
    let mut block = Vec::new();
    let mut check = |chunk: &[u8], pos: &mut usize| {
        let mut done = 0;
        while done < chunk.len() {
            assert!(*pos < end, "more body bytes than announced");
            let i = *pos / MIB;
            if i != block_idx {
                block = huge_block(base, i);
                block_idx = i;
            }
            let off = *pos % MIB;
            let n = (MIB - off).min(chunk.len() - done).min(end - *pos);
            assert!(chunk[done..done + n] == block[off..off + n], "body differs from the file within bytes {}..{}", *pos, *pos + n);
            done += n;
            *pos += n;
        }
    };
    check(&first, &mut pos);
    let mut buf = vec![0u8; 256 * 1024];
    let mut next_sample = pos;
    while pos < end {
        let n = s.read(&mut buf).unwrap_or_else(|e| panic!("read failed at byte {pos} of {offset}..{end}: {e}"));
        assert!(n > 0, "connection closed at byte {pos} of {offset}..{end}");
        check(&buf[..n], &mut pos);
        if pos >= next_sample {
            *max_rss = (*max_rss).max(vm_rss_kib(pid));
            next_sample = pos + 8 * MIB;
        }
    }
    *max_rss = (*max_rss).max(vm_rss_kib(pid));
}

/// Sends `request` and reads the head; returns (status line + headers text, body bytes read so far, content-length).
fn send_and_read_head(s: &mut TcpStream, request: &str) -> (String, Vec<u8>, usize) {
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let head_len = read_head(s, &mut buf).expect("response head");
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let cl = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    (head, buf[head_len..].to_vec(), cl)
}

#[test]
fn huge_file_is_streamed_intact_with_flat_memory() {
    let d = TempDir::new();
    let base = pattern(MIB, 9);
    let path = d.join("huge.bin");
    {
        let mut w = BufWriter::with_capacity(4 * MIB, fs::File::create(&path).unwrap());
        for i in 0..HUGE_BLOCKS {
            w.write_all(&huge_block(&base, i)).unwrap();
        }
        w.flush().unwrap();
    }
    let size = HUGE_BLOCKS * MIB;
    d.write("small.txt", "warm up");
    let atlas = Atlas::start(&static_cfg(d.path(), ""));
    let addr = atlas.addr();
    let pid = atlas.pid();

    // Warm up (buffers, cache of the small file), then take the baseline.
    assert_eq!(http_get(addr, "/small.txt").text(), "warm up");
    let mut c = Client::connect(addr);
    c.send(req("HEAD", "/huge.bin", ""));
    let r = c.read_head_response();
    assert_eq!(r.header("content-length"), Some(size.to_string().as_str()), "{}", r.head);
    let base_rss = vm_rss_kib(pid);
    let mut max_rss = base_rss;

    let started = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    set_timeouts(&s, Duration::from_secs(10));
    let (head, first, cl) = send_and_read_head(&mut s, &req("GET", "/huge.bin", ""));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(cl, size, "{head}");
    stream_and_verify(&mut s, first, 0, size, &base, pid, &mut max_rss);
    let took = started.elapsed();

    // A range from the middle, crossing a block boundary, on the same connection.
    let a = 100 * MIB - 10;
    let b = a + 65_545;
    let (head, first, cl) = send_and_read_head(&mut s, &req("GET", "/huge.bin", &format!("Range: bytes={a}-{b}\r\n")));
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("content-range: bytes {a}-{b}/{size}")), "{head}");
    assert_eq!(cl, b - a + 1);
    stream_and_verify(&mut s, first, a, cl, &base, pid, &mut max_rss);
    // And an open range from the middle to the end.
    let a = 150 * MIB + 12_345;
    let (head, first, cl) = send_and_read_head(&mut s, &req("GET", "/huge.bin", &format!("Range: bytes={a}-\r\n")));
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    assert_eq!(cl, size - a, "{head}");
    stream_and_verify(&mut s, first, a, cl, &base, pid, &mut max_rss);

    let growth_mib = (max_rss.saturating_sub(base_rss)) as f64 / 1024.0;
    eprintln!("200 MiB download took {took:?}; atlas RSS baseline {} KiB, max {} KiB (+{growth_mib:.1} MiB)", base_rss, max_rss);
    assert!(growth_mib < 32.0, "Atlas RSS grew by {growth_mib:.1} MiB while serving a 200 MiB file (baseline {base_rss} KiB, max {max_rss} KiB): not streamed");
}

// ---------------------------------------------------------------------------
// Routes: static prefixes and proxying on one listener
// ---------------------------------------------------------------------------

#[test]
fn routes_mix_static_prefixes_and_upstream_groups() {
    let main = Backend::http(|r| Reply::ok(format!("main:{} {}", r.method, r.target)));
    let api = Backend::http(|r| Reply::ok(format!("api:{} {} body={}", r.method, r.target, String::from_utf8_lossy(&r.body))));
    let a = TempDir::new();
    let b = TempDir::new();
    a.write("static/a.css", "A static/a.css");
    a.write("static/index.html", "A static index");
    a.write("a.css", "WRONG: root-level file of the root route");
    b.write("a.css", "B a.css (alias)");
    b.write("img/x.png", "png bytes");
    b.write("assets/a.css", "WRONG: alias route must strip the prefix");
    let cfg = format!(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 0\nmode = \"http\"\nworkers = 1\n\n\
         [[upstreams]]\nname = \"main\"\naddress = \"127.0.0.1\"\nport = {}\n\n\
         [[upstreams]]\nname = \"api0\"\naddress = \"127.0.0.1\"\nport = {}\ngroup = \"api\"\n\n\
         [[routes]]\nlistener = \"web\"\nprefix = \"/static/\"\nstatic_root = {:?}\n\n\
         [[routes]]\nprefix = \"/assets/\"\nstatic_root = {:?}\nstrip_prefix = true\n\n\
         [[routes]]\nprefix = \"/api/\"\ngroup = \"api\"\n\n\
         [[routes]]\nprefix = \"/static/special/\"\ngroup = \"api\"\n",
        main.addr.port(),
        api.addr.port(),
        path_of(a.path()),
        path_of(b.path()),
    );
    let atlas = Atlas::start(&cfg);
    let mut c = Client::connect(atlas.addr());

    // Static with `root` semantics: the prefix stays in the file path.
    let r = c.get("/static/a.css");
    assert_eq!((r.status, r.text().as_str()), (200, "A static/a.css"), "{}", r.head);
    assert!(r.header("content-type").unwrap_or("").starts_with("text/css"), "{}", r.head);
    assert!(r.header("etag").is_some() && r.header("last-modified").is_some(), "{}", r.head);
    assert_eq!(c.get("/static/").text(), "A static index");
    let r = c.get("/static/missing.css");
    assert_eq!(r.status, 404, "a static route answers 404 itself: {}", r.head);

    // Proxying: everything else to the default group ...
    let r = c.get("/other/page?x=1");
    assert_eq!((r.status, r.text().as_str()), (200, "main:GET /other/page?x=1"), "{}", r.head);
    // ... `/api/` to the api group (target unchanged) ...
    let r = c.request("POST /api/users?id=7 HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nabcd");
    assert_eq!((r.status, r.text().as_str()), (200, "api:POST /api/users?id=7 body=abcd"), "{}", r.head);
    // ... and the longest prefix wins over `/static/`.
    let r = c.get("/static/special/thing");
    assert_eq!((r.status, r.text().as_str()), (200, "api:GET /static/special/thing body="), "{}", r.head);

    // Alias semantics with strip_prefix.
    let r = c.get("/assets/a.css");
    assert_eq!((r.status, r.text().as_str()), (200, "B a.css (alias)"), "{}", r.head);
    let r = c.get("/assets/img/x.png");
    assert_eq!((r.status, r.header("content-type")), (200, Some("image/png")), "{}", r.head);
    for p in ["/assets/../a.css", "/assets/%2e%2e/static/a.css", "/static/../a.css", "/assets/..%2f..%2fetc/passwd"] {
        let r = raw_get(atlas.addr(), p);
        assert_eq!(r.status, 404, "GET {p}: {}", r.head);
        assert!(!r.text().contains("WRONG") && !r.text().contains("root:"), "GET {p}: {}", r.text());
    }

    // Static restrictions on a static route: 405 for POST, 304 and Range work.
    let r = c.request("POST /static/a.css HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.status, 405, "{}", r.head);
    let mut c = Client::connect(atlas.addr());
    let etag = c.get("/static/a.css").header("etag").unwrap().to_string();
    assert_eq!(c.request(req("GET", "/static/a.css", &format!("If-None-Match: {etag}\r\n"))).status, 304);
    let r = c.request(req("GET", "/static/a.css", "Range: bytes=2-7\r\n"));
    assert_eq!((r.status, r.text().as_str()), (206, "static"), "{}", r.head);
    // Mixed on one connection after all that.
    assert_eq!(c.get("/x").text(), "main:GET /x");
    assert_eq!(c.get("/assets/a.css").text(), "B a.css (alias)");

    // The upstreams saw only the proxied requests.
    let main_targets: Vec<String> = main.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(main_targets, vec!["/other/page?x=1", "/x"], "requests that reached the default group");
    let api_targets: Vec<String> = api.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(api_targets, vec!["/api/users?id=7", "/static/special/thing"], "requests that reached the api group");
}
