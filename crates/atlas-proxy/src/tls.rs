//! TLS with rustls (ring provider): server configs for listeners with SNI
//! certificate choice and live certificate reload, and client configs for
//! upstreams that speak TLS.
//!
//! Certificates are held in an `ArcSwap` inside the resolver: a handshake
//! loads the current set once; a reload builds a new set beside it and
//! swaps it in, so new handshakes get the new certificate while live
//! connections carry on. The reloader polls the files' metadata (inode,
//! size, mtime) once a second: that catches both in-place writes and the
//! rename-over that editors and cert tools do, with no watcher state to
//! lose. A file that fails to load keeps the previous certificate and is
//! logged.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use atlas_config::{CertFiles, TlsListener, UpstreamTls};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads one certificate chain and its key, checking they belong together.
pub fn load_certified_key(files: &CertFiles) -> Result<Arc<CertifiedKey>, String> {
    let err = |what: &str, e: &dyn fmt::Display| format!("{}: {what}: {e}", files.origin);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| err(&format!("cannot read certificate `{}`", files.cert.display()), &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(&format!("bad certificate PEM `{}`", files.cert.display()), &e))?;
    if certs.is_empty() {
        return Err(format!("{}: `{}` holds no certificate", files.origin, files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| err(&format!("cannot read private key `{}`", files.key.display()), &e))?;
    let ck = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| err("certificate and key do not match or the key type is unsupported", &e))?;
    Ok(Arc::new(ck))
}

/// The certificates of one listener.
struct CertSet {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

fn load_set(tls: &TlsListener) -> Result<CertSet, String> {
    let mut set = CertSet { default: load_certified_key(&tls.default)?, exact: HashMap::new(), wildcard: HashMap::new() };
    for files in &tls.sni {
        let ck = load_certified_key(files)?;
        for name in &files.names {
            match name.strip_prefix("*.") {
                Some(suffix) => set.wildcard.insert(suffix.to_string(), ck.clone()),
                None => set.exact.insert(name.clone(), ck.clone()),
            };
        }
    }
    Ok(set)
}

/// Chooses a certificate by SNI: exact name, then `*.parent`, then default.
pub struct SniResolver {
    set: ArcSwap<CertSet>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SniResolver")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.set.load();
        let Some(name) = hello.server_name() else { return Some(set.default.clone()) };
        let name = name.to_ascii_lowercase();
        if let Some(ck) = set.exact.get(&name) {
            return Some(ck.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(ck) = set.wildcard.get(parent) {
                return Some(ck.clone());
            }
        }
        Some(set.default.clone())
    }
}

/// A listener's TLS: the rustls config workers accept with, and what the
/// reloader needs to refresh its certificates.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    resolver: Arc<SniResolver>,
    files: TlsListener,
}

impl ServerTls {
    /// Builds the server config; `http` adds ALPN `http/1.1`.
    pub fn new(tls: &TlsListener, http: bool) -> Result<ServerTls, String> {
        let resolver = Arc::new(SniResolver { set: ArcSwap::from_pointee(load_set(tls)?) });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("{}: {e}", tls.default.origin))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        if http {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
        }
        Ok(ServerTls { config: Arc::new(config), resolver, files: tls.clone() })
    }

    /// Reloads every certificate of this listener; on error the old set stays.
    pub fn reload(&self) -> Result<(), String> {
        let set = load_set(&self.files)?;
        self.resolver.set.store(Arc::new(set));
        Ok(())
    }

    fn paths(&self) -> Vec<&Path> {
        self.files.all().flat_map(|c| [c.cert.as_path(), c.key.as_path()]).collect()
    }
}

type Stamp = Option<(u64, u64, i64, i64)>;

fn stamp(p: &Path) -> Stamp {
    std::fs::metadata(p).ok().map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// Watches the certificate files of every TLS listener and reloads a
/// listener's set when any of its files changes. `listeners` is asked for
/// the current list on every round, so listeners of a reloaded
/// configuration are followed. Runs on its own thread.
pub fn spawn_reloader<F>(listeners: F, every: Duration)
where
    F: Fn() -> Vec<(String, Arc<ServerTls>)> + Send + 'static,
{
    let spawned = std::thread::Builder::new().name("atlas-certs".into()).spawn(move || {
        let snapshot = |t: &ServerTls| t.paths().into_iter().map(stamp).collect::<Vec<Stamp>>();
        // Keyed by the ServerTls object: a configuration reload brings new
        // ones (already holding freshly loaded certificates).
        let mut seen: HashMap<*const ServerTls, Vec<Stamp>> = HashMap::new();
        loop {
            let current = listeners();
            seen.retain(|k, _| current.iter().any(|(_, t)| Arc::as_ptr(t) == *k));
            for (name, tls) in &current {
                let key = Arc::as_ptr(tls);
                let now = snapshot(tls);
                let Some(before) = seen.get(&key) else {
                    seen.insert(key, now);
                    continue;
                };
                if *before == now {
                    continue;
                }
                // Let a writer finish (cert and key are often replaced one after the other).
                std::thread::sleep(Duration::from_millis(100));
                let now = snapshot(tls);
                match tls.reload() {
                    Ok(()) => tracing::info!(listener = %name, "TLS certificates reloaded"),
                    Err(e) => tracing::error!(listener = %name, error = %e, "config: TLS certificate reload failed; keeping the previous certificates"),
                }
                seen.insert(key, now);
            }
            std::thread::sleep(every);
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "internal: cannot start the certificate reloader");
    }
}

/// TLS towards one upstream.
pub struct ClientTls {
    pub connector: monoio_rustls::TlsConnector,
    pub name: ServerName<'static>,
}

impl ClientTls {
    pub fn new(t: &UpstreamTls, upstream: &str) -> Result<ClientTls, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &t.ca {
            Some(ca) => {
                let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("upstream `{upstream}`: cannot read tls_ca `{}`: {e}", ca.display()))?;
                for c in certs {
                    let c = c.map_err(|e| format!("upstream `{upstream}`: bad tls_ca PEM `{}`: {e}", ca.display()))?;
                    roots.add(c).map_err(|e| format!("upstream `{upstream}`: unusable CA in `{}`: {e}", ca.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("upstream `{upstream}`: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(t.sni.clone()).map_err(|e| format!("upstream `{upstream}`: tls_sni `{}`: {e}", t.sni))?;
        Ok(ClientTls { connector: monoio_rustls::TlsConnector::from(Arc::new(config)), name })
    }
}
