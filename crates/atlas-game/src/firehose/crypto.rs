//! The reconnect challenge's cryptography (spec §3.3), with the RustCrypto
//! crates the clients use: secp256k1 ECDH (`k256`), HKDF-SHA256 with salt
//! and info `VOLTLANE.NET` (`hkdf`), XChaCha20-Poly1305 with a random
//! 24-byte nonce sent after the ciphertext and tag (`chacha20poly1305`).
//!
//! Atlas' key pair lives in `[firehose] key_file` (the secret scalar in
//! hex), created with mode 0600 on first start, so clients that check the
//! server key see the same one after a restart or a takeover.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use k256::elliptic_curve::sec1::ToEncodedPoint;
use k256::{PublicKey, SecretKey};
use sha2::Sha256;

const HKDF_SALT: &[u8] = b"VOLTLANE.NET";
const HKDF_INFO: &[u8] = b"VOLTLANE.NET";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Atlas' firehose key pair.
pub struct ServerKey {
    secret: SecretKey,
    public: Vec<u8>,
}

impl ServerKey {
    fn from_secret(secret: SecretKey) -> ServerKey {
        let public = secret.public_key().to_encoded_point(true).as_bytes().to_vec();
        ServerKey { secret, public }
    }

    /// A fresh key pair (not persisted).
    pub fn generate() -> ServerKey {
        ServerKey::from_secret(SecretKey::random(&mut OsRng))
    }

    /// Reads the key in `path`, or creates it (mode 0600) when missing.
    /// Errors name the file and what is wrong with it.
    pub fn load_or_create(path: &Path) -> Result<ServerKey, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex_decode(text.trim()).ok_or_else(|| format!("{}: not a hex secp256k1 secret key", path.display()))?;
                let secret = SecretKey::from_slice(&bytes).map_err(|_| format!("{}: not a valid secp256k1 secret key", path.display()))?;
                if let Ok(meta) = std::fs::metadata(path) {
                    if meta.permissions().mode() & 0o077 != 0 {
                        tracing::warn!(file = %path.display(), "config: the firehose key file is readable by other users; chmod 600 it");
                    }
                }
                Ok(ServerKey::from_secret(secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = ServerKey::generate();
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| format!("{}: cannot create the firehose key file: {e}", path.display()))?;
                let text = format!("{}\n", hex_encode(&key.secret.to_bytes()));
                f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| format!("{}: cannot write the firehose key: {e}", path.display()))?;
                tracing::info!(file = %path.display(), "firehose: created a new key pair (clients see its public key from now on)");
                Ok(key)
            }
            Err(e) => Err(format!("{}: cannot read the firehose key file: {e}", path.display())),
        }
    }

    /// SEC1 compressed public key (33 bytes): what `PubKey` carries.
    pub fn public_sec1(&self) -> &[u8] {
        &self.public
    }

    /// The symmetric key shared with the holder of `client`'s secret.
    pub fn shared_key(&self, client: &PublicKey) -> [u8; 32] {
        let shared = k256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), client.as_affine());
        derive(shared.raw_secret_bytes())
    }
}

/// HKDF-SHA256 of a raw ECDH secret, as both sides compute it.
pub fn derive(raw_shared: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit: expand cannot fail.
    let _ = Hkdf::<Sha256>::new(Some(HKDF_SALT), raw_shared).expand(HKDF_INFO, &mut key);
    key
}

/// Parses a client's `PubKey` payload.
pub fn parse_public(sec1: &[u8]) -> Option<PublicKey> {
    PublicKey::from_sec1_bytes(sec1).ok()
}

/// `plaintext` sealed as `ciphertext || tag || nonce`.
pub fn seal(key: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let mut out = cipher.encrypt(&nonce, plaintext).unwrap_or_default();
    out.extend_from_slice(&nonce);
    out
}

/// Opens `ciphertext || tag || nonce`; `None` when it does not authenticate.
pub fn open(key: &[u8; 32], wire: &[u8]) -> Option<Vec<u8>> {
    if wire.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (body, nonce) = wire.split_at(wire.len() - NONCE_LEN);
    XChaCha20Poly1305::new(key.into()).decrypt(XNonce::from_slice(nonce), body).ok()
}

/// 32 random bytes: a challenge.
pub fn challenge() -> [u8; 32] {
    let mut c = [0u8; 32];
    OsRng.fill_bytes(&mut c);
    c
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides derive the same key; a sealed challenge opens with it and
    /// is 72 bytes; a tampered one or another key does not open.
    #[test]
    fn challenge_round_trip() {
        let server = ServerKey::generate();
        let client = SecretKey::random(&mut OsRng);
        let server_pub = parse_public(server.public_sec1()).expect("server key parses");
        let k_client = derive(k256::ecdh::diffie_hellman(client.to_nonzero_scalar(), server_pub.as_affine()).raw_secret_bytes());
        let k_server = server.shared_key(&client.public_key());
        assert_eq!(k_client, k_server);
        let c = challenge();
        let sealed = seal(&k_server, &c);
        assert_eq!(sealed.len(), 72);
        assert_eq!(open(&k_client, &sealed).as_deref(), Some(&c[..]));
        let mut bad = sealed.clone();
        bad[3] ^= 1;
        assert_eq!(open(&k_client, &bad), None);
        assert_eq!(open(&[7u8; 32], &sealed), None);
        assert_eq!(open(&k_client, &sealed[..30]), None);
        // A fresh nonce each time.
        assert_ne!(seal(&k_server, &c), sealed);
    }

    #[test]
    fn key_file_is_created_0600_and_read_back() {
        let dir = std::env::temp_dir().join(format!("atlas-fh-key-{}-{}", std::process::id(), challenge()[0]));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let a = ServerKey::load_or_create(&path).expect("create");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let b = ServerKey::load_or_create(&path).expect("read back");
        assert_eq!(a.public_sec1(), b.public_sec1());
        assert_eq!(a.public_sec1().len(), 33);
        std::fs::write(&path, "zz\n").unwrap();
        let e = ServerKey::load_or_create(&path).err().expect("a bad key is an error");
        assert!(e.contains("not a hex"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
