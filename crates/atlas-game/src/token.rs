//! Transfer tokens: what Atlas hands the target server when it moves a
//! player (header `X-Atlas-Transfer-Token`). The fields are those of
//! Horizon's token (spec §3); the signature is HMAC-SHA256 over them with
//! `[spatial] token_secret` (Horizon's reference uses a plain hash, which
//! anyone can forge). The header value is base64url (no padding) of the
//! token's JSON; a server that shares the secret checks it with [`verify`].

use base64::Engine;
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub token_id: String,
    pub player_id: String,
    pub source_server: String,
    pub target_server: String,
    pub target_address: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

impl Token {
    /// The signed bytes: every field, `\n`-separated (no field holds a newline
    /// that could shift another: ids and addresses are checked by the caller
    /// of [`verify`] through the signature itself).
    fn message(&self) -> String {
        format!(
            "atlas-transfer-v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.token_id, self.player_id, self.source_server, self.target_server, self.target_address, self.created_at_ms, self.expires_at_ms
        )
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// A fresh token id.
pub fn new_id() -> String {
    let mut b = [0u8; 12];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex(&b)
}

/// Signs `t` and encodes it for the header.
pub fn sign(key: &ring::hmac::Key, t: &Token) -> String {
    let sig = ring::hmac::sign(key, t.message().as_bytes());
    let v = json!({
        "token_id": t.token_id, "player_id": t.player_id, "source_server": t.source_server,
        "target_server": t.target_server, "target_address": t.target_address,
        "created_at_ms": t.created_at_ms, "expires_at_ms": t.expires_at_ms, "signature": hex(sig.as_ref()),
    });
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Decodes and checks a header value: the signature (constant time) and
/// the expiry against `now_ms`.
pub fn verify(key: &ring::hmac::Key, header: &str, now_ms: u64) -> Result<Token, String> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header.trim()).map_err(|_| "token is not base64url".to_string())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| "token is not JSON".to_string())?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string).ok_or_else(|| format!("token has no `{k}`"));
    let n = |k: &str| v.get(k).and_then(Value::as_u64).ok_or_else(|| format!("token has no `{k}`"));
    let t = Token {
        token_id: s("token_id")?,
        player_id: s("player_id")?,
        source_server: s("source_server")?,
        target_server: s("target_server")?,
        target_address: s("target_address")?,
        created_at_ms: n("created_at_ms")?,
        expires_at_ms: n("expires_at_ms")?,
    };
    let sig = unhex(&s("signature")?).ok_or("signature is not hex")?;
    ring::hmac::verify(key, t.message().as_bytes(), &sig).map_err(|_| "bad signature".to_string())?;
    if now_ms > t.expires_at_ms {
        return Err("token expired".into());
    }
    Ok(t)
}

/// A room's join token (the direct flow: a client that got a room's
/// server address presents it to that server):
/// `base64url(JSON {room_id, server_id, expires_at_ms, nonce}) "." hex(HMAC-SHA256(secret, the base64 text))`,
/// with `[spatial] token_secret` as the secret.
pub fn sign_join(key: &ring::hmac::Key, room_id: &str, server_id: &str, expires_at_ms: u64) -> String {
    let payload = json!({"room_id": room_id, "server_id": server_id, "expires_at_ms": expires_at_ms, "nonce": new_id()});
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload.to_string());
    let sig = ring::hmac::sign(key, b.as_bytes());
    format!("{b}.{}", hex(sig.as_ref()))
}

/// Checks a join token: `(room_id, server_id)` when the signature holds and
/// it has not expired at `now_ms`.
pub fn verify_join(key: &ring::hmac::Key, token: &str, now_ms: u64) -> Result<(String, String), String> {
    let (b, sig) = token.trim().split_once('.').ok_or("join token has no signature")?;
    let sig = unhex(sig).ok_or("join token signature is not hex")?;
    ring::hmac::verify(key, b.as_bytes(), &sig).map_err(|_| "bad signature".to_string())?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b).map_err(|_| "join token is not base64url".to_string())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| "join token is not JSON".to_string())?;
    if v["expires_at_ms"].as_u64().is_none_or(|t| now_ms > t) {
        return Err("join token expired".into());
    }
    match (v["room_id"].as_str(), v["server_id"].as_str()) {
        (Some(r), Some(s)) => Ok((r.to_string(), s.to_string())),
        _ => Err("join token lacks room_id or server_id".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &[u8]) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s)
    }

    fn token() -> Token {
        Token {
            token_id: new_id(),
            player_id: "p1".into(),
            source_server: "a".into(),
            target_server: "b".into(),
            target_address: "127.0.0.1:9".into(),
            created_at_ms: 1000,
            expires_at_ms: 61_000,
        }
    }

    #[test]
    fn round_trip_and_forgery() {
        let t = token();
        let h = sign(&key(b"secret"), &t);
        assert_eq!(verify(&key(b"secret"), &h, 2000), Ok(t.clone()));
        assert_eq!(verify(&key(b"other"), &h, 2000), Err("bad signature".into()));
        assert_eq!(verify(&key(b"secret"), &h, 61_001), Err("token expired".into()));
        // A changed field (player id) with the old signature fails.
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&h).unwrap();
        let forged = String::from_utf8(raw).unwrap().replace("\"p1\"", "\"p2\"");
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged);
        assert_eq!(verify(&key(b"secret"), &forged, 2000), Err("bad signature".into()));
        assert!(verify(&key(b"secret"), "!!", 0).is_err());
        assert!(verify(&key(b"secret"), "e30", 0).is_err());
    }

    #[test]
    fn join_tokens() {
        let t = sign_join(&key(b"secret"), "room-1", "srv-a", 5000);
        assert_eq!(verify_join(&key(b"secret"), &t, 4000), Ok(("room-1".into(), "srv-a".into())));
        assert_eq!(verify_join(&key(b"other"), &t, 4000), Err("bad signature".into()));
        assert_eq!(verify_join(&key(b"secret"), &t, 5001), Err("join token expired".into()));
        let (b, sig) = t.split_once('.').unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b).unwrap();
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(String::from_utf8(raw).unwrap().replace("room-1", "room-2"));
        assert!(verify_join(&key(b"secret"), &format!("{forged}.{sig}"), 4000).is_err());
        assert!(verify_join(&key(b"secret"), "no-dot", 0).is_err());
    }
}
