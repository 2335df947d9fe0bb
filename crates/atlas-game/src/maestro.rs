//! Auto-scale through Maestro (spec §4): `POST /instances` asking for a
//! game server for a region no server covers, or one near capacity. Runs
//! on the monitor thread (blocking std I/O with short timeouts, never on a
//! worker); the registry's cooldown makes it at most one request per
//! region per `[spatial] scale_cooldown`. The new server registers itself
//! like any other (its environment tells it where Atlas's API is and which
//! region to serve), and players are routed to it from then on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::time::Duration;

use atlas_config::Spatial;
use serde_json::json;

use crate::registry::registry;
use crate::spatial::region_center;

/// The request body for `region`.
pub fn instance_body(s: &Spatial, api: Option<SocketAddr>, region: [i64; 3]) -> serde_json::Value {
    let c = region_center(region, s.region_size);
    let name = format!("horizon-{}-{}-{}", region[0], region[1], region[2]);
    json!({
        "name": name,
        "image": s.maestro_image,
        "ports": [{"host_port": 0, "container_port": 8080, "protocol": "tcp"}],
        "environment": {
            "HORIZON_ATLAS_URL": api.map(|a| a.to_string()).unwrap_or_default(),
            "HORIZON_REGION_X": region[0].to_string(),
            "HORIZON_REGION_Y": region[1].to_string(),
            "HORIZON_REGION_Z": region[2].to_string(),
            "HORIZON_REGION_CENTER": format!("{},{},{}", c.x, c.y, c.z),
            "HORIZON_REGION_BOUNDS": (s.region_size / 2.0).to_string(),
        },
        "volumes": [],
    })
}

/// Sends one `POST /instances`; logs and counts the outcome.
pub fn request(s: &Spatial, api: Option<SocketAddr>, region: [i64; 3], reason: &'static str) {
    if !s.auto_scale {
        return;
    }
    let Some(url) = &s.maestro_url else {
        tracing::warn!(?region, reason, "config: auto_scale is on but no Maestro URL is set (ATLAS_MAESTRO_URL)");
        return;
    };
    let body = instance_body(s, api, region).to_string();
    let reg = registry();
    match post(url, "/instances", &body) {
        Ok(status) if (200..300).contains(&status) => {
            reg.scale_requests_sent.fetch_add(1, Ordering::Relaxed);
            tracing::info!(?region, reason, status, "auto-scale: asked Maestro for a server");
            atlas_observe::events::record("info", "game", format!("auto-scale: asked Maestro for region {region:?} ({reason})"));
        }
        Ok(status) => {
            reg.scale_requests_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(?region, status, "upstream: Maestro refused the instance request (retried after the cooldown)");
            atlas_observe::events::record("warn", "game", format!("auto-scale: Maestro answered {status} for region {region:?}"));
        }
        Err(e) => {
            reg.scale_requests_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(?region, error = %e, "upstream: Maestro unreachable (retried after the cooldown)");
            atlas_observe::events::record("warn", "game", format!("auto-scale: Maestro unreachable: {e}"));
        }
    }
}

/// One HTTP/1.1 POST with `Connection: close`; returns the status.
fn post(url: &str, path: &str, body: &str) -> Result<u16, String> {
    let host = url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/');
    let addr = host.to_socket_addrs().map_err(|e| format!("cannot resolve {host}: {e}"))?.next().ok_or_else(|| format!("{host} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let req =
        format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let mut h = [httparse::EMPTY_HEADER; 32];
    let mut res = httparse::Response::new(&mut h);
    match res.parse(&head) {
        Ok(_) => res.code.ok_or_else(|| "no status in Maestro's answer".to_string()),
        Err(e) => Err(format!("malformed answer: {e}")),
    }
}
