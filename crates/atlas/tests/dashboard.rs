//! The dashboard page in a real browser: headless Chromium loads `GET /`
//! from a running Atlas that carries traffic, lets the page's own script
//! refresh a few times (virtual time), and the test reads the DOM it built.
//! Chromium is installed from Debian when missing (as `scripts/test` does).
//! A screenshot is saved in the test's temporary directory and copied to
//! `target/tmp/dashboard.png` for a human to look at.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn find_chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        let out = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().ok()?;
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !p.is_empty()).then(|| PathBuf::from(p))
    })
}

/// Chromium, installed with apt-get if it is not there yet.
fn chromium() -> PathBuf {
    if let Some(p) = find_chromium() {
        return p;
    }
    eprintln!("chromium not found: installing it with apt-get");
    let apt = |args: &[&str]| Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status().map(|s| s.success()).unwrap_or(false);
    if !apt(&["install", "-y", "-q", "chromium"]) {
        apt(&["update", "-q"]);
        apt(&["install", "-y", "-q", "chromium"]);
    }
    find_chromium().expect("chromium is needed for this test and could not be installed (apt-get install -y chromium)")
}

/// Runs headless Chromium on `url` with `extra` flags; returns stdout.
fn run_chromium(profile: &Path, url: &str, extra: &[&str]) -> String {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
        "--mute-audio",
        "--hide-scrollbars",
        "--window-size=1280,900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

fn get(api: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(api).unwrap();
    set_timeouts(&s, Duration::from_secs(5));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0), out)
}

/// The value of `attr="..."` on the element whose `id` is `id`.
fn attr_of(dom: &str, id: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let tag_start = dom[..at].rfind('<')?;
    let tag_end = at + dom[at..].find('>')?;
    let tag = &dom[tag_start..tag_end];
    let k = tag.find(&format!("{attr}=\""))? + attr.len() + 2;
    Some(tag[k..k + tag[k..].find('"')?].to_string())
}

#[test]
fn dashboard_is_self_contained() {
    let a = Backend::fixed("A");
    let atlas = Atlas::start(&http_config(&[a.addr], "[api]\naddress = \"127.0.0.1:0\"\n"));
    let (status, page) = get(atlas.api.unwrap(), "/");
    assert_eq!(status, 200);
    assert!(page.contains("Content-Type: text/html"), "{}", &page[..200.min(page.len())]);
    let body = page.split_once("\r\n\r\n").unwrap().1;
    // No CDN, no external asset: everything is inline.
    for external in ["src=\"http", "href=\"http", "src='http", "<script src", "<link ", "@import", "url(http"] {
        assert!(!body.contains(external), "the page loads something from outside: {external}");
    }
    assert!(body.contains("<script>") && body.contains("<style>"));
}

#[test]
fn dashboard_shows_live_figures_in_a_real_browser() {
    let a = Backend::fixed("A");
    let b = Backend::fixed("B");
    let atlas = Atlas::start(&http_config(&[a.addr, b.addr], "[api]\naddress = \"127.0.0.1:0\"\n"));
    let api = atlas.api.unwrap();
    let mut c = Client::connect(atlas.addr());
    for i in 0..30 {
        assert_eq!(c.get(&format!("/warm{i}")).status, 200);
    }
    // Keep traffic flowing while the page is open.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let addr = atlas.addr();
        std::thread::spawn(move || {
            let mut c = Client::connect(addr);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                c.get(&format!("/live{n}"));
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    let dir = TempDir::new();
    let dom = run_chromium(&dir.join("profile-dom"), &format!("http://{api}/"), &["--virtual-time-budget=4000", "--dump-dom"]);
    let shot = dir.join("dashboard.png");
    run_chromium(&dir.join("profile-shot"), &format!("http://{api}/"), &["--virtual-time-budget=3000", &format!("--screenshot={}", shot.display())]);
    stop.store(true, Ordering::Relaxed);
    let sent_live = traffic.join().unwrap();

    assert!(dom.contains("<body"), "no DOM from chromium: {dom}");
    // The script ran and refreshed itself more than once.
    let refreshes: u32 = dom.split("data-refreshes=\"").nth(1).and_then(|r| r.split('"').next()?.parse().ok()).unwrap_or(0);
    assert!(refreshes >= 2, "the page did not refresh live (data-refreshes={refreshes})");
    assert!(dom.contains("id=\"version\">0.1.0<"), "version not shown");
    // Upstreams by name, with their health, and the listener.
    for name in ["u0", "u1"] {
        assert!(dom.contains(&format!("data-upstream=\"{name}\"")), "upstream {name} missing from the page");
    }
    assert!(dom.contains("class=\"badge up\""), "health badge missing");
    assert!(dom.contains("data-listener=\""), "listener row missing");
    // Live figures: at least the warm-up requests, counted by the proxy.
    let total: u64 = attr_of(&dom, "total-requests", "data-value").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(total >= 30, "total requests shown: {total} (30 warm-up + {sent_live} live sent)");
    // The screenshot exists and is a PNG.
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.len() > 1000 && png.starts_with(b"\x89PNG"), "not a PNG screenshot");
    let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::copy(&shot, &keep);
    eprintln!("dashboard screenshot: {} (copy: {})", shot.display(), keep.display());
}
