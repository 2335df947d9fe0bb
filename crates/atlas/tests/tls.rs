//! TLS termination: HTTPS proxying (X-Forwarded-Proto, keep-alive, ALPN),
//! TLS 1.2 / 1.3 (1.1 refused), SNI certificate choice, key formats
//! (PKCS#8 ECDSA and Ed25519, SEC1, PKCS#1 RSA), static files over TLS,
//! certificate reload without restart, `--check` on bad TLS files, TCP mode
//! with TLS, and TLS towards upstreams (CA and SNI verification).
//!
//! Certificates come from a test CA made with rcgen (support/tls.rs); clients are rustls
//! (blocking `StreamOwned` over std sockets) and curl.

mod common;
#[path = "support/tls.rs"]
mod tls_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::KeyPair;
use rustls::{ProtocolVersion, ServerConfig, ServerConnection, StreamOwned};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use common::*;
use tls_support::*;

fn have_openssl() -> bool {
    Command::new("openssl").arg("version").output().map(|o| o.status.success()).unwrap_or(false)
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Writes `leaf`'s key in the "traditional" form (SEC1 for EC, PKCS#1 for
/// RSA) with openssl; returns the path and checks the PEM label.
fn traditional_key(dir: &TempDir, leaf: &Leaf, stem: &str, label: &str) -> PathBuf {
    let pk8 = dir.write(&format!("{stem}-pkcs8.pem"), &leaf.key_pem);
    let out = dir.join(&format!("{stem}-trad.pem"));
    openssl(&["pkey", "-in", &path_of(&pk8), "-out", &path_of(&out), "-traditional"]);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains(&format!("-----BEGIN {label}-----")), "openssl did not write a {label}: {text}");
    out
}

// ---------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------

struct Curl {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `curl -sS --max-time 5 -o /dev/null -w '%{http_code} %{http_version}' ARGS`.
fn curl(args: &[&str]) -> Curl {
    let out =
        Command::new("curl").args(["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code} %{http_version}"]).args(args).output().expect("run curl");
    Curl { ok: out.status.success(), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

fn resolve(name: &str, addr: SocketAddr) -> String {
    format!("{name}:{}:127.0.0.1", addr.port())
}

// ---------------------------------------------------------------------------
// HTTPS proxying
// ---------------------------------------------------------------------------

#[test]
fn https_proxy_keep_alive_alpn_and_forwarded_proto() {
    let ca = Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let ca_pem = dir.write("ca.pem", &ca.pem);
    let (cert, key) = ca.leaf(&["localhost"], "localhost", &rcgen::PKCS_ECDSA_P256_SHA256).write(&dir, "default");
    let be = Backend::http(|r| Reply::ok(format!("{} {} proto={}", r.method, r.target, r.header("x-forwarded-proto").unwrap_or("-"))));
    let atlas = Atlas::start(&tls_config("http", &[be.addr], &tls_section(&cert, &key, &[]), ""));
    let addr = atlas.addr();

    let t = tls_connect(addr, "localhost", &ClientOpts { ca: Some(&ca), ..Default::default() }).expect("TLS handshake with the CA-verified certificate");
    assert_eq!(t.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "ALPN must select http/1.1 (client offered h2 and http/1.1)");
    let mut c = Client::over(t);
    for i in 0..20 {
        let r = c.get(&format!("/item/{i}?q=1"));
        assert_eq!((r.status, r.text()), (200, format!("GET /item/{i}?q=1 proto=https")), "{}", r.head);
    }
    let r = c.request("POST /submit HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world");
    assert_eq!(r.text(), "POST /submit proto=https");
    assert_eq!(be.last().body, b"hello world");
    // A client cannot claim another scheme.
    let r = c.request("GET /spoof HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: http\r\n\r\n");
    assert_eq!(r.text(), "GET /spoof proto=https", "{}", r.head);
    assert_eq!(be.last().header_all("x-forwarded-proto"), vec!["https"], "{}", be.last().head);

    // curl verifies the chain and the name, and ends up on HTTP/1.1 by ALPN.
    let out = curl(&["--cacert", &path_of(&ca_pem), "--resolve", &resolve("localhost", addr), &format!("https://localhost:{}/curl", addr.port())]);
    assert!(out.ok, "curl failed: {}", out.stderr);
    assert_eq!(out.stdout, "200 1.1");
    // Plain HTTP on the TLS port is not served as HTTP.
    let mut plain = Client::connect(addr);
    plain.send(get_req("/plain"));
    let got = plain.read_to_close();
    assert!(!got.starts_with(b"HTTP/1.1 200"), "plain HTTP was answered on a TLS listener: {}", show(&got));
}

// ---------------------------------------------------------------------------
// Protocol versions
// ---------------------------------------------------------------------------

/// A minimal ClientHello offering only `version` (0x0302 = TLS 1.1,
/// 0x0303 = TLS 1.2), without the supported_versions extension.
fn client_hello(version: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&[0x5a; 32]);
    body.push(0);
    let suites: [u16; 9] = [0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc009, 0xc013, 0x002f];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]);
    let mut ext = Vec::new();
    let mut push_ext = |ty: u16, data: &[u8]| {
        ext.extend_from_slice(&ty.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    };
    let host = b"localhost";
    let mut sni = Vec::new();
    sni.extend_from_slice(&((host.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(host.len() as u16).to_be_bytes());
    sni.extend_from_slice(host);
    push_ext(0x0000, &sni);
    push_ext(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]);
    push_ext(0x000b, &[1, 0]);
    push_ext(0x000d, &[0, 8, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x08, 0x07]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

/// Sends a raw ClientHello; returns the first bytes the server answers with.
fn probe_hello(addr: SocketAddr, version: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    set_timeouts(&s, IO_TIMEOUT);
    s.write_all(&client_hello(version)).unwrap();
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    while got.len() < 7 {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&tmp[..n]),
        }
    }
    got
}

#[test]
fn tls12_and_tls13_negotiate_and_tls11_is_refused() {
    let ca = Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let ca_pem = dir.write("ca.pem", &ca.pem);
    let (cert, key) = ca.leaf(&["localhost"], "localhost", &rcgen::PKCS_ECDSA_P256_SHA256).write(&dir, "default");
    let be = Backend::echo_path();
    let atlas = Atlas::start(&tls_config("http", &[be.addr], &tls_section(&cert, &key, &[]), ""));
    let addr = atlas.addr();

    for (ver, want) in [(Ver::V12, ProtocolVersion::TLSv1_2), (Ver::V13, ProtocolVersion::TLSv1_3), (Ver::Both, ProtocolVersion::TLSv1_3)] {
        let t =
            tls_connect(addr, "localhost", &ClientOpts { ca: Some(&ca), ver, ..Default::default() }).unwrap_or_else(|e| panic!("handshake for {want:?}: {e}"));
        assert_eq!(t.conn.protocol_version(), Some(want));
        assert_eq!(t.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "ALPN with {want:?}");
        let mut c = Client::over(t);
        assert_eq!(c.get("/v").text(), "/v", "request over {want:?}");
        assert_eq!(c.get("/w").text(), "/w", "second request over {want:?}");
    }

    let base = ["--cacert", &path_of(&ca_pem), "--resolve", &resolve("localhost", addr)];
    let url = format!("https://localhost:{}/curl", addr.port());
    for flags in [&["--tlsv1.2", "--tls-max", "1.2"][..], &["--tlsv1.3", "--tls-max", "1.3"][..]] {
        let out = curl(&[&base[..], flags, &[url.as_str()]].concat());
        assert!(out.ok && out.stdout.starts_with("200"), "curl {flags:?}: {} {}", out.stdout, out.stderr);
    }
    let out = curl(&[&base[..], &["--tlsv1.1", "--tls-max", "1.1", url.as_str()]].concat());
    assert!(!out.ok && !out.stdout.starts_with("200"), "curl with TLS 1.1 must fail: {} {}", out.stdout, out.stderr);
    eprintln!("curl --tlsv1.1 --tls-max 1.1: {}", out.stderr.trim());

    // A hand-made TLS 1.1 ClientHello gets no ServerHello (the same hello
    // claiming TLS 1.2 does: the probe itself works).
    let got = probe_hello(addr, 0x0303);
    assert_eq!(got.first(), Some(&0x16), "a TLS 1.2 ClientHello must get a handshake record back: {got:02x?}");
    let got = probe_hello(addr, 0x0302);
    assert_ne!(got.first(), Some(&0x16), "a TLS 1.1-only ClientHello got a handshake answer (TLS 1.1 accepted?): {got:02x?}");
    if got.first() == Some(&0x15) && got.len() >= 7 {
        assert_eq!(got[5], 2, "fatal alert expected: {got:02x?}");
    }
}

// ---------------------------------------------------------------------------
// SNI and key formats
// ---------------------------------------------------------------------------

#[test]
fn sni_chooses_the_certificate_and_key_formats_load() {
    let ca = Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let ca_pem = dir.write("ca.pem", &ca.pem);
    // Default: ECDSA P-256, PKCS#8.
    let def = ca.leaf(&["localhost", "b.test"], "default", &rcgen::PKCS_ECDSA_P256_SHA256);
    let (def_c, def_k) = def.write(&dir, "default");
    // a.test and *.b.test: Ed25519, PKCS#8.
    let a = ca.leaf(&["a.test", "*.b.test"], "a", &rcgen::PKCS_ED25519);
    let (a_c, a_k) = a.write(&dir, "a");
    let mut sni: Vec<(&[&str], PathBuf, PathBuf)> = vec![(&["a.test", "*.b.test"], a_c, a_k)];

    // SEC1 EC key and PKCS#1 RSA key, converted with openssl when present.
    let openssl_ok = have_openssl();
    let mut extra: Vec<(&str, Leaf)> = Vec::new();
    if openssl_ok {
        let sec1 = ca.leaf(&["sec1.test"], "sec1", &rcgen::PKCS_ECDSA_P256_SHA256);
        let sec1_key = traditional_key(&dir, &sec1, "sec1", "EC PRIVATE KEY");
        sni.push((&["sec1.test"], dir.write("sec1-cert.pem", &sec1.cert_pem), sec1_key));
        extra.push(("sec1.test", sec1));

        let rsa8 = dir.join("rsa-gen.pem");
        openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", &path_of(&rsa8)]);
        let key = KeyPair::from_pem_and_sign_algo(&std::fs::read_to_string(&rsa8).unwrap(), &rcgen::PKCS_RSA_SHA256).unwrap();
        let rsa = ca.leaf_with_key(&["rsa.test"], "rsa", key);
        let rsa_key = traditional_key(&dir, &rsa, "rsa", "RSA PRIVATE KEY");
        sni.push((&["rsa.test"], dir.write("rsa-cert.pem", &rsa.cert_pem), rsa_key));
        extra.push(("rsa.test", rsa));
    } else {
        eprintln!("openssl not found: skipping the SEC1 and PKCS#1 key cases");
    }
    let sni_ref: Vec<(&[&str], &Path, &Path)> = sni.iter().map(|(n, c, k)| (*n, c.as_path(), k.as_path())).collect();
    let be = Backend::echo_path();
    let atlas = Atlas::start(&tls_config("http", &[be.addr], &tls_section(&def_c, &def_k, &sni_ref), ""));
    let addr = atlas.addr();

    // Which certificate each name gets (no verification, to see it).
    let which = |name: &str, sni: bool| -> CertificateDer<'static> {
        let t = tls_connect(addr, name, &ClientOpts { sni, ..Default::default() }).unwrap_or_else(|e| panic!("handshake with SNI {name:?}: {e}"));
        peer_leaf(&t)
    };
    let label = |d: &CertificateDer<'_>| {
        if *d == def.der {
            "default".to_string()
        } else if *d == a.der {
            "a.test".to_string()
        } else {
            extra.iter().find(|(_, l)| l.der == *d).map(|(n, _)| n.to_string()).unwrap_or_else(|| "unknown".into())
        }
    };
    let cases: Vec<(&str, bool, &str)> = vec![
        ("a.test", true, "a.test"),
        ("x.b.test", true, "a.test"),
        ("deep.x.b.test", true, "default"),
        ("b.test", true, "default"),
        ("localhost", true, "default"),
        ("unknown.test", true, "default"),
        ("a.test", false, "default"),
    ];
    for (name, with_sni, want) in cases {
        let got = which(name, with_sni);
        assert_eq!(label(&got), want, "SNI {:?}", if with_sni { name } else { "(none)" });
    }
    for (name, _) in &extra {
        assert_eq!(label(&which(name, true)), *name, "SNI {name}");
    }

    // Verified end to end (chain + name), for every key type, with both versions.
    let mut names = vec!["localhost", "a.test", "www.b.test"];
    names.extend(extra.iter().map(|(n, _)| *n));
    for name in &names {
        for ver in [Ver::V12, Ver::V13] {
            let t = tls_connect(addr, name, &ClientOpts { ca: Some(&ca), ver, ..Default::default() })
                .unwrap_or_else(|e| panic!("verified handshake for {name} ({}): {e}", if ver == Ver::V12 { "1.2" } else { "1.3" }));
            let mut c = Client::over(t);
            assert_eq!(c.get(&format!("/{name}")).text(), format!("/{name}"));
        }
        let out = curl(&["--cacert", &path_of(&ca_pem), "--resolve", &resolve(name, addr), &format!("https://{name}:{}/c", addr.port())]);
        assert!(out.ok && out.stdout.starts_with("200"), "curl https://{name}: {} {}", out.stdout, out.stderr);
    }
}

// ---------------------------------------------------------------------------
// Static files over TLS
// ---------------------------------------------------------------------------

#[test]
fn static_files_over_tls_including_a_large_file() {
    let ca = Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let root = TempDir::new();
    let (cert, key) = ca.leaf(&["localhost"], "localhost", &rcgen::PKCS_ECDSA_P256_SHA256).write(&dir, "default");
    let big = pattern(20 * 1024 * 1024, 11);
    root.write("big.bin", &big);
    root.write("index.html", "<h1>tls index</h1>");
    let cfg = format!(
        "[listen]\naddress = \"127.0.0.1\"\nport = 0\nmode = \"static\"\nworkers = 1\nroot = {:?}\n\n{}",
        path_of(root.path()),
        tls_section(&cert, &key, &[])
    );
    let atlas = Atlas::start(&cfg);
    let t = tls_connect(atlas.addr(), "localhost", &ClientOpts { ca: Some(&ca), ..Default::default() }).expect("handshake");
    assert_eq!(t.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "static listener ALPN");
    let mut c = Client::over(t);

    let r = c.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "<h1>tls index</h1>"), "{}", r.head);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));

    let started = Instant::now();
    for round in 0..2 {
        let r = c.get("/big.bin");
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.header("content-length"), Some(big.len().to_string().as_str()));
        assert!(r.body == big, "20 MiB over TLS (round {round}) differs: got {} bytes, hash {:x}, want hash {:x}", r.body.len(), fnv64(&r.body), fnv64(&big));
    }
    eprintln!("2 x 20 MiB over TLS in {:?}", started.elapsed());

    let a = 10 * 1024 * 1024 - 7;
    let r = c.request(format!("GET /big.bin HTTP/1.1\r\nHost: h\r\nRange: bytes={a}-{}\r\n\r\n", a + 99_999));
    assert_eq!(r.status, 206, "{}", r.head);
    assert_eq!(r.header("content-range"), Some(format!("bytes {a}-{}/{}", a + 99_999, big.len()).as_str()));
    assert!(r.body == big[a..a + 100_000], "range over TLS differs");
    c.send("HEAD /big.bin HTTP/1.1\r\nHost: atlas.test\r\n\r\n");
    let r = c.read_head_response();
    assert_eq!(r.header("content-length"), Some(big.len().to_string().as_str()));
    let etag = r.header("etag").unwrap().to_string();
    let r = c.request(format!("GET /big.bin HTTP/1.1\r\nHost: h\r\nIf-None-Match: {etag}\r\n\r\n"));
    assert_eq!(r.status, 304, "{}", r.head);
    assert_eq!(c.get("/").text(), "<h1>tls index</h1>", "keep-alive after a large TLS body");
}

// ---------------------------------------------------------------------------
// Certificate reload
// ---------------------------------------------------------------------------

/// Replaces `path` with `data` through a temporary file and a rename.
fn replace_file(path: &Path, data: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn wait_for_cert(addr: SocketAddr, want: &CertificateDer<'_>, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Ok(t) = tls_connect(addr, "localhost", &ClientOpts::default()) {
            if peer_leaf(&t) == *want {
                return Some(started.elapsed());
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn certificates_are_reloaded_without_restart() {
    let ca = Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let v1 = ca.leaf(&["localhost"], "v1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let v2 = ca.leaf(&["localhost"], "v2", &rcgen::PKCS_ED25519);
    let v3 = ca.leaf(&["localhost"], "v3", &rcgen::PKCS_ECDSA_P256_SHA256);
    let (cert, key) = v1.write(&dir, "live");
    let be = Backend::echo_path();
    let atlas = Atlas::start(&tls_config("http", &[be.addr], &tls_section(&cert, &key, &[]), ""));
    let addr = atlas.addr();
    let verified = ClientOpts { ca: Some(&ca), ..Default::default() };

    // A connection made before the swap.
    let t = tls_connect(addr, "localhost", &verified).unwrap();
    assert!(peer_leaf(&t) == v1.der, "initial certificate");
    let mut before = Client::over(t);
    assert_eq!(before.get("/before").text(), "/before");

    replace_file(&key, &v2.key_pem);
    replace_file(&cert, &v2.cert_pem);
    let took = wait_for_cert(addr, &v2.der, Duration::from_secs(4));
    assert!(took.is_some_and(|t| t <= Duration::from_millis(3500)), "new handshakes did not present the replaced certificate within ~3 s (got after {took:?})");
    eprintln!("certificate swap seen after {took:?}");
    let t = tls_connect(addr, "localhost", &verified).expect("verified handshake with the new certificate");
    let mut after = Client::over(t);
    assert_eq!(after.get("/after").text(), "/after");

    // The connection from before the swap still works.
    assert_eq!(before.get("/before-again").text(), "/before-again", "a connection established before the reload must keep working");

    // A broken replacement keeps the current certificate: the reloader
    // must have tried it and said so (a fixed sleep would let this pass
    // before any reload attempt) ...
    let rejected = atlas.count_log("TLS certificate reload failed");
    replace_file(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n");
    assert!(
        atlas.wait_log("TLS certificate reload failed", rejected + 1, Duration::from_secs(5)),
        "the broken certificate file was not tried and refused within 5 s:\n{}",
        atlas.logs()
    );
    let t = tls_connect(addr, "localhost", &verified).expect("handshake after a broken certificate file was written");
    assert!(peer_leaf(&t) == v2.der, "a broken certificate file must leave the previous certificate in place");
    // ... and a good one afterwards is picked up again.
    replace_file(&key, &v3.key_pem);
    replace_file(&cert, &v3.cert_pem);
    let took = wait_for_cert(addr, &v3.der, Duration::from_secs(4));
    assert!(took.is_some(), "the certificate written after a broken one was not loaded");
    assert_eq!(after.get("/after-again").text(), "/after-again");
}

#[test]
fn config_reload_switches_to_other_certificate_files() {
    let ca = Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let v1 = ca.leaf(&["localhost"], "v1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let v2 = ca.leaf(&["localhost"], "v2", &rcgen::PKCS_ECDSA_P256_SHA256);
    let (c1, k1) = v1.write(&dir, "one");
    let (c2, k2) = v2.write(&dir, "two");
    let be = Backend::echo_path();
    let path = dir.write("atlas.toml", tls_config("http", &[be.addr], &tls_section(&c1, &k1, &[]), ""));
    let atlas = Atlas::start_file(&path, 1);
    let addr = atlas.addr();
    let verified = ClientOpts { ca: Some(&ca), ..Default::default() };
    let t = tls_connect(addr, "localhost", &verified).unwrap();
    assert!(peer_leaf(&t) == v1.der);
    let mut before = Client::over(t);
    assert_eq!(before.get("/one").text(), "/one");

    // The configuration now names the other pair of files (no file changed).
    replace_file(&path, &tls_config("http", &[be.addr], &tls_section(&c2, &k2, &[]), ""));
    assert!(atlas.wait_log("configuration reloaded", 1, Duration::from_secs(5)), "no reload logged");
    let took = wait_for_cert(addr, &v2.der, Duration::from_secs(3));
    assert!(took.is_some(), "new handshakes must use the certificate the reloaded configuration names");
    assert_eq!(before.get("/one-again").text(), "/one-again", "a TLS connection from before the reload keeps working");
}

// ---------------------------------------------------------------------------
// --check on bad TLS files
// ---------------------------------------------------------------------------

/// True if `text` has `<config>:<line>:<col>:` followed (on that line) by `key`.
fn located(text: &str, config: &Path, key: &str) -> bool {
    let prefix = format!("{}:", path_of(config));
    text.lines().any(|l| {
        let Some(rest) = l.find(&prefix).map(|i| &l[i + prefix.len()..]) else { return false };
        let mut it = rest.splitn(3, ':');
        let (Some(line), Some(col), Some(tail)) = (it.next(), it.next(), it.next()) else { return false };
        line.parse::<usize>().is_ok_and(|n| n > 0) && col.parse::<usize>().is_ok() && tail.contains(key)
    })
}

#[test]
fn check_rejects_missing_bad_and_mismatched_tls_files() {
    let ca = Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let good = ca.leaf(&["localhost"], "good", &rcgen::PKCS_ECDSA_P256_SHA256);
    let other = ca.leaf(&["localhost"], "other", &rcgen::PKCS_ECDSA_P256_SHA256);
    let (cert, key) = good.write(&dir, "good");
    let (_, other_key) = other.write(&dir, "other");
    let junk = dir.write("junk.pem", "this is not a PEM file at all\n");
    let missing = dir.join("missing-cert.pem");
    let up = refused_addr();

    // Runs `--check` on the config, then tries to start Atlas with it (the
    // config is invalid, so it must exit on its own).
    let run = |name: &str, tls: String| -> (PathBuf, Option<i32>, String, Option<i32>, String) {
        let cfg = dir.write(&format!("{name}.toml"), tls_config("http", &[up], &tls, ""));
        let (code, out, err) = run_cli(&["--check", &path_of(&cfg)], &[]);
        let (code2, _, err2) = run_cli(&[&path_of(&cfg)], &[("ATLAS_LOG", "info")]);
        (cfg, code, format!("{out}{err}"), code2, err2)
    };

    // Valid: accepted.
    let valid = dir.write("valid.toml", tls_config("http", &[up], &tls_section(&cert, &key, &[]), ""));
    let (code, out, err) = run_cli(&["--check", &path_of(&valid)], &[]);
    assert_eq!(code, Some(0), "a valid TLS config must pass --check: {out}{err}");

    // Missing certificate file.
    let (cfg, code, out, code2, err2) = run("missing", tls_section(&missing, &key, &[]));
    assert!(code.is_some_and(|c| c != 0), "--check with a missing cert must fail: {out}");
    assert!(located(&out, &cfg, "listen.tls.cert"), "error must name listen.tls.cert with file:line:col: {out}");
    assert!(out.contains("missing-cert.pem"), "error must name the missing file: {out}");
    assert!(code2.is_some_and(|c| c != 0), "starting with a missing cert must fail: {err2}");

    // A key file that is not PEM.
    let (cfg, code, out, code2, err2) = run("badkey", tls_section(&cert, &junk, &[]));
    assert!(code.is_some_and(|c| c != 0), "--check with a non-PEM key must fail: {out}");
    assert!(located(&out, &cfg, "listen.tls.key"), "error must name listen.tls.key with file:line:col: {out}");
    assert!(code2.is_some_and(|c| c != 0), "starting with a non-PEM key must fail: {err2}");

    // A certificate file that is not PEM.
    let (cfg, code, out, _, _) = run("badcert", tls_section(&junk, &key, &[]));
    assert!(code.is_some_and(|c| c != 0) && located(&out, &cfg, "listen.tls.cert"), "non-PEM cert: {out}");

    // A key that does not belong to the certificate.
    let (_, code, out, code2, err2) = run("mismatch", tls_section(&cert, &other_key, &[]));
    assert!(code.is_some_and(|c| c != 0), "--check with a mismatched key must fail: {out}");
    assert!(out.contains("do not match"), "mismatch error must say the files do not match: {out}");
    assert!(code2.is_some_and(|c| c != 0), "starting with a mismatched key must fail: {err2}");
    assert!(err2.contains("do not match"), "start-up error: {err2}");

    // Same for an SNI certificate.
    let (cfg, code, out, _, _) = run("sni-missing", tls_section(&cert, &key, &[(&["a.test"], &missing, &key)]));
    assert!(code.is_some_and(|c| c != 0) && located(&out, &cfg, "listen.tls.sni[0].cert"), "missing SNI cert: {out}");
    let (_, code, out, _, _) = run("sni-mismatch", tls_section(&cert, &key, &[(&["a.test"], &cert, &other_key)]));
    assert!(code.is_some_and(|c| c != 0) && out.contains("do not match"), "mismatched SNI key: {out}");
}

// ---------------------------------------------------------------------------
// TCP mode with TLS termination
// ---------------------------------------------------------------------------

#[test]
fn tcp_mode_terminates_tls() {
    let ca = Ca::new("Atlas Test CA");
    let dir = TempDir::new();
    let (cert, key) = ca.leaf(&["localhost"], "localhost", &rcgen::PKCS_ECDSA_P256_SHA256).write(&dir, "default");
    let seen: Arc<Mutex<Vec<u8>>> = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let be = Backend::raw(move |mut s| {
        let mut tmp = [0u8; 64 * 1024];
        loop {
            match s.read(&mut tmp) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen2.lock().unwrap().extend_from_slice(&tmp[..n]);
                    if s.write_all(&tmp[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let atlas = Atlas::start(&tls_config("tcp", &[be.addr], &tls_section(&cert, &key, &[]), ""));

    let t = tls_connect(atlas.addr(), "localhost", &ClientOpts { ca: Some(&ca), alpn: false, ..Default::default() }).expect("TLS handshake on a tcp listener");
    let mut c = Client::over(t);
    let payload = [b"hello over tls\n".to_vec(), pattern(200_000, 12)].concat();
    c.send(&payload);
    while c.buf.len() < payload.len() {
        let n = c.fill().unwrap_or_else(|e| panic!("read echo after {} bytes: {e}", c.buf.len()));
        assert!(n > 0, "closed after {} echoed bytes", c.buf.len());
    }
    assert!(c.buf == payload, "echo through TLS differs");
    assert!(wait_until(Duration::from_secs(2), || seen.lock().unwrap().len() >= payload.len()));
    let got = seen.lock().unwrap().clone();
    assert!(got == payload, "the backend must get the plain bytes: {}", show(&got));
}

// ---------------------------------------------------------------------------
// TLS to upstreams
// ---------------------------------------------------------------------------

/// (SNI, request line) of every request a [`TlsBackend`] answered.
type Seen = Arc<Mutex<Vec<(Option<String>, String)>>>;

/// An HTTPS backend on its own threads; records (SNI, request line) per request.
struct TlsBackend {
    addr: SocketAddr,
    seen: Seen,
}

fn tls_backend(leaf: &Leaf) -> TlsBackend {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_pkcs8.clone()));
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der.clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let cfg = cfg.clone();
            let seen = seen2.clone();
            thread::spawn(move || {
                set_timeouts(&s, Duration::from_secs(10));
                let Ok(conn) = ServerConnection::new(cfg) else { return };
                let mut t = StreamOwned::new(conn, s);
                let mut buf = Vec::new();
                let mut tmp = [0u8; 16 * 1024];
                loop {
                    let head_end = loop {
                        if let Some(p) = find(&buf, b"\r\n\r\n") {
                            break p + 4;
                        }
                        match t.read(&mut tmp) {
                            Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                            _ => return,
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let len: usize =
                        head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
                    while buf.len() < head_end + len {
                        match t.read(&mut tmp) {
                            Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                            _ => return,
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
                    buf.drain(..head_end + len);
                    let line = head.lines().next().unwrap_or("").to_string();
                    let sni = t.conn.server_name().map(str::to_string);
                    seen.lock().unwrap().push((sni.clone(), line.clone()));
                    let reply = format!("tls-backend: {line} sni={} body={body}", sni.as_deref().unwrap_or("-"));
                    let out = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{reply}", reply.len());
                    if t.write_all(out.as_bytes()).is_err() || t.flush().is_err() {
                        return;
                    }
                }
            });
        }
    });
    TlsBackend { addr, seen }
}

fn tls_upstream_config(up: SocketAddr, ca: Option<&Path>, sni: Option<&str>) -> String {
    let mut s = format!(
        "[listen]\naddress = \"127.0.0.1\"\nport = 0\nmode = \"http\"\nworkers = 1\n\n[[upstreams]]\nname = \"secure\"\naddress = \"127.0.0.1\"\nport = {}\ntls = true\n",
        up.port()
    );
    if let Some(ca) = ca {
        s.push_str(&format!("tls_ca = {:?}\n", path_of(ca)));
    }
    if let Some(n) = sni {
        s.push_str(&format!("tls_sni = {n:?}\n"));
    }
    s
}

#[test]
fn tls_to_upstream_verifies_ca_and_name() {
    let ca = Ca::new("Atlas Upstream CA");
    let dir = TempDir::new();
    let ca_pem = dir.write("ca.pem", &ca.pem);
    let leaf = ca.leaf(&["upstream.test"], "upstream", &rcgen::PKCS_ECDSA_P256_SHA256);
    let be = tls_backend(&leaf);

    let atlas = Atlas::start(&tls_upstream_config(be.addr, Some(&ca_pem), Some("upstream.test")));
    let mut c = Client::connect(atlas.addr());
    for i in 0..5 {
        let r = c.get(&format!("/hello/{i}"));
        assert_eq!(r.status, 200, "plain client -> Atlas -> TLS upstream, request {i}: {}", r.head);
        assert_eq!(r.text(), format!("tls-backend: GET /hello/{i} HTTP/1.1 sni=upstream.test body="));
    }
    let r = c.request("POST /post HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nabcde");
    assert_eq!((r.status, r.text()), (200, "tls-backend: POST /post HTTP/1.1 sni=upstream.test body=abcde".to_string()), "{}", r.head);
    let seen = be.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(seen.iter().all(|(sni, _)| sni.as_deref() == Some("upstream.test")), "SNI sent to the upstream: {seen:?}");
    drop(atlas);

    // A tls_sni the certificate does not carry: verification fails, 502.
    let atlas = Atlas::start(&tls_upstream_config(be.addr, Some(&ca_pem), Some("wrong.test")));
    let r = http_get(atlas.addr(), "/wrong-name");
    assert_eq!(r.status, 502, "upstream certificate not valid for tls_sni must give 502: {}", r.head);
    drop(atlas);

    // No tls_ca: the public roots do not know our CA, 502.
    let atlas = Atlas::start(&tls_upstream_config(be.addr, None, Some("upstream.test")));
    let r = http_get(atlas.addr(), "/unknown-ca");
    assert_eq!(r.status, 502, "an upstream certificate from an unknown CA must give 502: {}", r.head);
    drop(atlas);

    let seen = be.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "no request may reach an unverified upstream: {seen:?}");
}
