//! The WebSocket opening handshake (RFC 6455 §4): validating a client's
//! upgrade request, the `Sec-WebSocket-Accept` value, and the request the
//! gateway sends to a backend on the client's behalf.
//!
//! Compression: the gateway moves a client between backends mid-stream,
//! and a permessage-deflate context must never span two backends. The
//! request sent to a backend therefore drops `Sec-WebSocket-Extensions`,
//! so no compression is negotiated end to end (the gateway may later
//! terminate compression itself; until then messages travel uncompressed).

use base64::Engine;

/// What a valid client handshake carries that the gateway needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHandshake {
    pub path: String,
    pub key: String,
    /// `Sec-WebSocket-Protocol` as sent (passed to the backend).
    pub protocols: Option<String>,
    /// Headers to replay to a backend (everything but the hop-by-hop and
    /// WebSocket-negotiation ones, which the gateway writes itself).
    pub forward: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    NotGet,
    NotHttp11,
    NoUpgradeWebsocket,
    NoConnectionUpgrade,
    BadVersion,
    BadKey,
    MissingHost,
}

impl HandshakeError {
    /// The HTTP status to refuse with.
    pub fn status(self) -> u16 {
        match self {
            HandshakeError::NotGet => 405,
            HandshakeError::BadVersion => 426,
            _ => 400,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            HandshakeError::NotGet => "a WebSocket handshake must be a GET",
            HandshakeError::NotHttp11 => "a WebSocket handshake needs HTTP/1.1",
            HandshakeError::NoUpgradeWebsocket => "missing `Upgrade: websocket`",
            HandshakeError::NoConnectionUpgrade => "missing `Connection: Upgrade`",
            HandshakeError::BadVersion => "only Sec-WebSocket-Version 13 is supported",
            HandshakeError::BadKey => "Sec-WebSocket-Key must be 16 bytes in base64",
            HandshakeError::MissingHost => "missing Host",
        }
    }
}

fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&c| c == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Headers the gateway sets itself on the backend request.
const OWN: [&str; 9] = [
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "content-length",
    "transfer-encoding",
];

/// Validates a parsed client upgrade request.
pub fn validate(req: &httparse::Request) -> Result<ClientHandshake, HandshakeError> {
    if req.method != Some("GET") {
        return Err(HandshakeError::NotGet);
    }
    if req.version != Some(1) {
        return Err(HandshakeError::NotHttp11);
    }
    let get = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    if !get("upgrade").is_some_and(|v| has_token(v, "websocket")) {
        return Err(HandshakeError::NoUpgradeWebsocket);
    }
    if !req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")).any(|h| has_token(h.value, "upgrade")) {
        return Err(HandshakeError::NoConnectionUpgrade);
    }
    if get("sec-websocket-version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(HandshakeError::BadVersion);
    }
    if get("host").is_none() {
        return Err(HandshakeError::MissingHost);
    }
    let key = get("sec-websocket-key").map(<[u8]>::trim_ascii).ok_or(HandshakeError::BadKey)?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if k.len() == 16 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let forward = req.headers.iter().filter(|h| !OWN.iter().any(|o| h.name.eq_ignore_ascii_case(o))).map(|h| (h.name.to_string(), text(h.value))).collect();
    Ok(ClientHandshake { path: req.path.unwrap_or("/").to_string(), key: text(key), protocols: get("sec-websocket-protocol").map(text), forward })
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// A fresh random `Sec-WebSocket-Key` for a request the gateway sends.
pub fn new_key() -> String {
    let mut k = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k);
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// The upgrade request to a backend for client `hs`, with `extra`
/// headers (player id, transfer token). Returns it and the key used.
pub fn backend_request(hs: &ClientHandshake, host: &str, extra: &[(&str, &str)]) -> (Vec<u8>, String) {
    let key = new_key();
    let mut out = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n",
        hs.path
    );
    if let Some(p) = &hs.protocols {
        out.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    for (n, v) in &hs.forward {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    for (n, v) in extra {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    (out.into_bytes(), key)
}

/// Checks a backend's answer to [`backend_request`]: 101 with the right
/// accept value and no extension we did not offer.
pub fn check_backend_response(res: &httparse::Response, key: &str) -> Result<(), String> {
    if res.code != Some(101) {
        return Err(format!("backend answered {} instead of 101", res.code.unwrap_or(0)));
    }
    let get = |name: &str| res.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    if get("sec-websocket-accept").map(<[u8]>::trim_ascii) != Some(accept_key(key).as_bytes()) {
        return Err("backend sent a wrong Sec-WebSocket-Accept".into());
    }
    if get("sec-websocket-extensions").is_some_and(|v| !v.trim_ascii().is_empty()) {
        return Err("backend negotiated an extension that was not offered".into());
    }
    Ok(())
}

/// The 101 response to the client.
pub fn client_response(key: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n", accept_key(key));
    if let Some(p) = protocol {
        out.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str) -> Result<ClientHandshake, HandshakeError> {
        let mut h = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut h);
        req.parse(raw.as_bytes()).unwrap();
        validate(&req)
    }

    const GOOD: &str = "GET /play?id=7 HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Extensions: permessage-deflate\r\nX-Player: p1\r\nCookie: a=b\r\n\r\n";

    #[test]
    fn rfc_accept_value() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn valid_handshake_and_backend_request_drop_extensions() {
        let hs = check(GOOD).unwrap();
        assert_eq!(hs.path, "/play?id=7");
        assert_eq!(hs.forward, vec![("X-Player".to_string(), "p1".to_string()), ("Cookie".to_string(), "a=b".to_string())]);
        let (req, key) = backend_request(&hs, "10.0.0.5:8080", &[("X-Atlas-Player-Id", "p1")]);
        let text = String::from_utf8(req).unwrap();
        assert!(text.contains("Host: 10.0.0.5:8080\r\n") && text.contains("X-Atlas-Player-Id: p1\r\n") && text.contains(&key));
        assert!(!text.to_ascii_lowercase().contains("sec-websocket-extensions"), "{text}");
        assert!(!text.contains("dGhlIHNhbXBsZSBub25jZQ=="), "a fresh key per backend");
        assert!(String::from_utf8(client_response(&hs.key, None)).unwrap().contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[test]
    fn refusals() {
        let with = |from: &str, to: &str| check(&GOOD.replace(from, to));
        assert_eq!(with("GET /play", "POST /play"), Err(HandshakeError::NotGet));
        assert_eq!(with("HTTP/1.1\r\nHost", "HTTP/1.0\r\nHost"), Err(HandshakeError::NotHttp11));
        assert_eq!(with("Upgrade: websocket", "Upgrade: h2c"), Err(HandshakeError::NoUpgradeWebsocket));
        assert_eq!(with("keep-alive, Upgrade", "keep-alive"), Err(HandshakeError::NoConnectionUpgrade));
        assert_eq!(with("Version: 13", "Version: 8"), Err(HandshakeError::BadVersion));
        assert_eq!(with("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="), Err(HandshakeError::BadKey));
        assert_eq!(with("dGhlIHNhbXBsZSBub25jZQ==", "!!!"), Err(HandshakeError::BadKey));
        assert_eq!(with("Host: g\r\n", ""), Err(HandshakeError::MissingHost));
        assert_eq!(HandshakeError::BadVersion.status(), 426);
    }

    #[test]
    fn backend_response_checks() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let parse = |raw: &str| {
            let mut h = [httparse::EMPTY_HEADER; 16];
            let mut res = httparse::Response::new(&mut h);
            res.parse(raw.as_bytes()).unwrap();
            check_backend_response(&res, key)
        };
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(parse(ok), Ok(()));
        assert!(parse(&ok.replace("s3pP", "XXXX")).is_err());
        assert!(parse(&ok.replace("101 Switching Protocols", "200 OK")).is_err());
        assert!(parse(&ok.replace("\r\n\r\n", "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n")).is_err());
    }
}
