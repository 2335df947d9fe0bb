//! TLS test helpers shared by tls.rs and tls_handshakes.rs: a test CA and
//! leaf certificates (rcgen), `[listen.tls]` config snippets, and a
//! blocking rustls client (`StreamOwned` over std sockets).

#![allow(dead_code)]

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SignatureAlgorithm};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme, StreamOwned};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::common::*;

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub der: CertificateDer<'static>,
    pub pem: String,
}

/// A certificate and its key, as PEM and DER.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    pub key_pkcs8: Vec<u8>,
}

impl Ca {
    pub fn new(cn: &str) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        Ca { der: cert.der().clone(), pem: cert.pem(), issuer: Issuer::new(p, key) }
    }

    pub fn leaf_with_key(&self, names: &[&str], cn: &str, key: KeyPair) -> Leaf {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone(), key_pkcs8: key.serialize_der() }
    }

    pub fn leaf(&self, names: &[&str], cn: &str, alg: &'static SignatureAlgorithm) -> Leaf {
        self.leaf_with_key(names, cn, KeyPair::generate_for(alg).unwrap())
    }
}

impl Leaf {
    /// Writes `<stem>-cert.pem` and `<stem>-key.pem` into `dir`.
    pub fn write(&self, dir: &TempDir, stem: &str) -> (PathBuf, PathBuf) {
        (dir.write(&format!("{stem}-cert.pem"), &self.cert_pem), dir.write(&format!("{stem}-key.pem"), &self.key_pem))
    }
}

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

pub fn tls_section(cert: &Path, key: &Path, sni: &[(&[&str], &Path, &Path)]) -> String {
    let mut s = format!("[listen.tls]\ncert = {:?}\nkey = {:?}\n", path_of(cert), path_of(key));
    for (names, c, k) in sni {
        let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
        s.push_str(&format!("\n[[listen.tls.sni]]\nnames = [{}]\ncert = {:?}\nkey = {:?}\n", names.join(", "), path_of(c), path_of(k)));
    }
    s
}

/// One TLS listener in `mode` over `ups` (may be empty for static), then `extra`.
pub fn tls_config(mode: &str, ups: &[SocketAddr], tls: &str, extra: &str) -> String {
    let w: Vec<(SocketAddr, u32)> = ups.iter().map(|a| (*a, 1)).collect();
    format!("[listen]\naddress = \"127.0.0.1\"\nport = 0\nmode = \"{mode}\"\nworkers = 1\n\n{tls}\n{}{extra}\n", upstreams_toml(&w, None))
}

// ---------------------------------------------------------------------------
// rustls client
// ---------------------------------------------------------------------------

/// Accepts any certificate (to look at which one the server chose).
#[derive(Debug)]
pub struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &provider().signature_verification_algorithms)
    }
    fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &provider().signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Ver {
    Both,
    V12,
    V13,
}

pub struct ClientOpts<'a> {
    /// Trust anchors; `None`: accept any certificate.
    pub ca: Option<&'a Ca>,
    pub ver: Ver,
    pub alpn: bool,
    pub sni: bool,
}

impl Default for ClientOpts<'_> {
    fn default() -> Self {
        ClientOpts { ca: None, ver: Ver::Both, alpn: true, sni: true }
    }
}

pub fn client_config(o: &ClientOpts<'_>) -> Arc<ClientConfig> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match o.ver {
        Ver::Both => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Ver::V12 => &[&rustls::version::TLS12],
        Ver::V13 => &[&rustls::version::TLS13],
    };
    let b = ClientConfig::builder_with_provider(provider()).with_protocol_versions(versions).unwrap();
    let mut cfg = match o.ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.der.clone()).unwrap();
            b.with_root_certificates(roots).with_no_client_auth()
        }
        None => b.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny)).with_no_client_auth(),
    };
    if o.alpn {
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    cfg.enable_sni = o.sni;
    Arc::new(cfg)
}

pub type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes the handshake.
pub fn tls_connect(addr: SocketAddr, name: &str, o: &ClientOpts<'_>) -> io::Result<Tls> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    set_timeouts(&tcp, IO_TIMEOUT);
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(name.to_string()).map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
    let mut conn = ClientConnection::new(client_config(o), name).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(StreamOwned::new(conn, tcp))
}

pub fn peer_leaf(t: &Tls) -> CertificateDer<'static> {
    t.conn.peer_certificates().and_then(|c| c.first()).expect("server sent no certificate").clone().into_owned()
}
