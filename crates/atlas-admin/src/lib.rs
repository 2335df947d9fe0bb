//! The control-plane API on `[api] address`, on its own thread and runtime
//! so it never competes with a worker. For now it answers `GET /health`
//! (liveness); the admin issue adds status, upstreams, metrics and the
//! dashboard on the same server.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::thread::JoinHandle;
use std::time::Duration;

use atlas_proxy::io::{give_buf, read_more, take_buf, write_vec};
use monoio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 16 * 1024;

/// Binds `addr` now (so a busy port fails start-up) and serves it on a thread.
pub fn start(addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let std = StdListener::bind(addr)?;
    std.set_nonblocking(true)?;
    let local = std.local_addr()?;
    let h = std::thread::Builder::new().name("atlas-api".into()).spawn(move || {
        let mut rt = match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "internal: cannot start API runtime");
                return;
            }
        };
        rt.block_on(async move {
            let listener = match TcpListener::from_std(std) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "internal: cannot register API listener");
                    return;
                }
            };
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        monoio::spawn(serve(s));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "api accept failed");
                        monoio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    })?;
    Ok((local, h))
}

fn response(status: u16, reason: &str, body: &str, keep: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
        body.len(),
        if keep { "keep-alive" } else { "close" }
    )
    .into_bytes()
}

fn route(method: &str, path: &str) -> (u16, &'static str, String) {
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/health") => (200, "OK", "{\"status\":\"ok\"}".into()),
        (_, "/health") => (405, "Method Not Allowed", "{\"error\":\"method not allowed\"}".into()),
        _ => (404, "Not Found", format!("{{\"error\":\"no route for {method} {}\"}}", path.escape_default())),
    }
}

async fn serve(mut s: TcpStream) {
    let mut buf = take_buf();
    loop {
        let parsed = loop {
            let mut h = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut h);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let keep = req.version == Some(1)
                        && !req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close"));
                    let (status, reason, body) = route(req.method.unwrap_or(""), req.path.unwrap_or(""));
                    break Some((n, response(status, reason, &body, keep), keep));
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                _ => break Some((buf.len(), response(400, "Bad Request", "{\"error\":\"malformed request\"}", false), false)),
            }
            match monoio::time::timeout(Duration::from_secs(10), read_more(&mut s, &mut buf, MAX_HEAD + 1024)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => break None,
            }
        };
        let Some((n, mut out, keep)) = parsed else { break };
        buf.drain(..n);
        if write_vec(&mut s, &mut out).await.is_err() || !keep {
            break;
        }
    }
    give_buf(buf);
}
