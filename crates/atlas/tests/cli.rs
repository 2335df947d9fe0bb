//! Command line: `--check`, `--version`, `--help`, bad options, and the
//! embedded default configuration.

mod common;

use std::process::Command;

use common::*;

const GOOD: &str = r#"[listen]
address = "127.0.0.1"
port = 0
mode = "http"
workers = 1

[[upstreams]]
name = "a"
address = "127.0.0.1"
port = 8081

[routing]
strategy = "round_robin"
"#;

/// One `FILE:LINE:COL: KEY: message` line.
#[derive(Debug)]
struct Diag {
    line: usize,
    col: usize,
    key: String,
    message: String,
}

/// Every diagnostic line for `file` in `stderr`; panics on a line that names
/// the file but has no position.
fn diagnostics(stderr: &str, file: &str) -> Vec<Diag> {
    let prefix = format!("{file}:");
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let mut parts = rest.splitn(4, ':');
            let line = parts.next().and_then(|x| x.trim().parse().ok());
            let col = parts.next().and_then(|x| x.trim().parse().ok());
            let (Some(line), Some(col)) = (line, col) else { panic!("error without line:column: {file}:{rest}\nfull stderr:\n{stderr}") };
            let key = parts.next().unwrap_or("").trim().to_string();
            let message = parts.next().unwrap_or("").trim().to_string();
            Diag { line, col, key, message }
        })
        .collect()
}

/// Runs `--check` on `text`; returns (exit code, diagnostics, stderr).
fn check(text: &str) -> (Option<i32>, Vec<Diag>, String) {
    let path = write_config(text);
    let file = path_of(&path);
    let (code, _out, err) = run_cli(&["--check", &file], &[]);
    let _ = std::fs::remove_file(&path);
    let d = diagnostics(&err, &file);
    (code, d, err)
}

/// Line (1-based) of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle:?} not in config")) + 1
}

#[test]
fn check_accepts_a_valid_config() {
    let path = write_config(GOOD);
    let file = path_of(&path);
    let (code, out, err) = run_cli(&["--check", &file], &[]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains(&format!("configuration {file} is valid")), "stdout: {out}");
}

#[test]
fn check_reports_unknown_key_with_position() {
    let text = GOOD.replace("port = 8081", "port = 8081\nwieght = 3");
    let (code, d, err) = check(&text);
    assert_eq!(code, Some(1), "{err}");
    let e = d.iter().find(|e| e.key == "upstreams[0].wieght").unwrap_or_else(|| panic!("no error for the unknown key:\n{err}"));
    assert_eq!((e.line, e.col), (line_of(&text, "wieght"), 1), "{err}");
    assert!(e.message.contains("wieght") || e.message.contains("unknown"), "{err}");
}

#[test]
fn check_reports_wrong_type_with_position() {
    let text = GOOD.replace("port = 0", "port = \"0\"");
    let (code, d, err) = check(&text);
    assert_eq!(code, Some(1), "{err}");
    let e = d.iter().find(|e| e.key == "listen.port").unwrap_or_else(|| panic!("no error for listen.port:\n{err}"));
    assert_eq!((e.line, e.col), (3, 8), "position of the value `\"0\"`:\n{err}");
}

#[test]
fn check_reports_unknown_strategy_with_position() {
    let text = GOOD.replace("\"round_robin\"", "\"fastest\"");
    let (code, d, err) = check(&text);
    assert_eq!(code, Some(1), "{err}");
    let e = d.iter().find(|e| e.key == "routing.strategy").unwrap_or_else(|| panic!("no error for routing.strategy:\n{err}"));
    assert_eq!((e.line, e.col), (line_of(&text, "fastest"), 12), "{err}");
    assert!(e.message.contains("fastest"), "{err}");
}

#[test]
fn check_reports_zero_total_weight() {
    let text = GOOD.replace("port = 8081", "port = 8081\nweight = 0");
    let (code, d, err) = check(&text);
    assert_eq!(code, Some(1), "{err}");
    let e = d.iter().find(|e| e.key.contains("weight")).unwrap_or_else(|| panic!("no weight error:\n{err}"));
    let (first, last) = (line_of(&text, "[[upstreams]]"), line_of(&text, "weight = 0"));
    assert!((first..=last).contains(&e.line), "weight error at line {} outside the upstream ({first}..={last}):\n{err}", e.line);
}

#[test]
fn check_reports_http_listener_without_upstreams() {
    let text = "[listen]\naddress = \"127.0.0.1\"\nport = 0\nmode = \"http\"\n";
    let (code, d, err) = check(text);
    assert_eq!(code, Some(1), "{err}");
    assert!(d.iter().any(|e| e.key.starts_with("listen") && e.message.contains("upstream")), "no located error about the missing upstreams:\n{err}");
}

#[test]
fn check_reports_every_error_at_once() {
    let text = r#"[listen]
address = "127.0.0.1"
port = "eighty"
mode = "http"

[[upstreams]]
address = "127.0.0.1"
port = 8081
weight = 0

[routing]
strategy = "fastest"

[timeouts]
conect = "1s"
"#;
    let (code, d, err) = check(text);
    assert_eq!(code, Some(1), "{err}");
    let keys: Vec<&str> = d.iter().map(|e| e.key.as_str()).collect();
    for (key, line) in [("listen.port", 3), ("routing.strategy", 12), ("timeouts.conect", 15)] {
        let e = d.iter().find(|e| e.key == key).unwrap_or_else(|| panic!("missing {key} in {keys:?}:\n{err}"));
        assert_eq!(e.line, line, "{key}:\n{err}");
    }
    assert!(keys.iter().any(|k| k.contains("weight")), "missing zero-weight error in {keys:?}:\n{err}");
}

#[test]
fn version_prints_name_and_version() {
    let (code, out, _) = run_cli(&["--version"], &[]);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), format!("atlas {}", env!("CARGO_PKG_VERSION")));
    assert_eq!(out.trim(), "atlas 0.1.0");
}

#[test]
fn help_prints_usage() {
    let (code, out, _) = run_cli(&["--help"], &[]);
    assert_eq!(code, Some(0));
    assert!(out.contains("USAGE") || out.to_lowercase().contains("usage"), "{out}");
    assert!(out.contains("--check") && out.contains("--version"), "{out}");
}

#[test]
fn unknown_option_exits_2() {
    let (code, out, err) = run_cli(&["--frobnicate"], &[]);
    assert_eq!(code, Some(2), "stdout: {out}\nstderr: {err}");
    assert!(err.contains("--frobnicate"), "the message should name the option: {err}");
}

#[test]
fn no_config_runs_embedded_default_game_gateway_with_health() {
    let mut cmd = Command::new(BIN);
    cmd.env("ATLAS_PROXY_ADDR", "127.0.0.1:0").env("ATLAS_API_ADDR", "127.0.0.1:0");
    let atlas = Atlas::spawn(cmd, None, 1, true);
    let api = atlas.api.expect("api address");

    let r = one_shot(api, "GET /health HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
    let body: String = r.text().chars().filter(|c| !c.is_whitespace()).collect();
    assert!(body.contains(r#""status":"ok""#), "health body: {}", r.text());

    // The proxy port is the game gateway: a plain GET is not a WebSocket
    // handshake (400); a handshake with no game server registered gets 503.
    let r = one_shot(atlas.addr(), "GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.head);
    let r = one_shot(
        atlas.addr(),
        "GET /play HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert_eq!(r.status, 503, "{}", r.head);
}
