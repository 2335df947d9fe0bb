//! Meaning checks: turns a [`RawConfig`] into a [`Config`] or records, with
//! positions, everything wrong with it. Validation keeps going after an error
//! so that one run reports every problem.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use crate::load::Diag;
use crate::raw::*;
use crate::*;

thread_local! {
    /// Set by `load_str_offline`: do not resolve host names.
    pub(crate) static OFFLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

const STRATEGIES: &str = "round_robin, weighted, weighted_round_robin, random, least_connections, hash";

fn parse_strategy(s: &str) -> Option<Strategy> {
    Some(match s {
        "round_robin" | "weighted" | "weighted_round_robin" => Strategy::RoundRobin,
        "random" => Strategy::Random,
        "least_connections" | "least_conn" => Strategy::LeastConnections,
        "hash" | "consistent_hash" => Strategy::Hash,
        _ => return None,
    })
}

fn parse_hash_key(s: &str) -> Option<HashKey> {
    Some(match s {
        "client_ip" => HashKey::ClientIp,
        "uri" => HashKey::Uri,
        "path" => HashKey::Path,
        _ => {
            let name = s.strip_prefix("header:")?.trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
                return None;
            }
            HashKey::Header(name.to_ascii_lowercase())
        }
    })
}

fn parse_mode(s: &str) -> Option<Mode> {
    Some(match s {
        "http" => Mode::Http,
        "tcp" => Mode::Tcp,
        "static" => Mode::Static,
        "game" => Mode::Game,
        "firehose" => Mode::Firehose,
        _ => return None,
    })
}

pub(crate) fn int_in(diag: &mut Diag<'_>, v: &Option<Spanned<i64>>, key: &str, min: i64, max: i64, default: i64) -> i64 {
    match v {
        None => default,
        Some(s) if (min..=max).contains(s.get_ref()) => *s.get_ref(),
        Some(s) => {
            diag.at(s, key, format!("must be between {min} and {max}, got {}", s.get_ref()));
            default
        }
    }
}

pub(crate) fn duration(diag: &mut Diag<'_>, v: &Option<Spanned<String>>, key: &str, default: Duration) -> Duration {
    match v {
        None => default,
        Some(s) => match parse_duration(s.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                diag.at(s, key, "must be greater than zero");
                default
            }
            Err(e) => {
                diag.at(s, key, e);
                default
            }
        },
    }
}

/// A directory that must exist; returns its canonical path.
fn directory(diag: &mut Diag<'_>, v: &Spanned<String>, key: &str) -> Option<PathBuf> {
    match std::fs::canonicalize(v.get_ref()) {
        Ok(p) if p.is_dir() => Some(p),
        Ok(_) => {
            diag.at(v, key, format!("`{}` is not a directory", v.get_ref()));
            None
        }
        Err(e) => {
            diag.at(v, key, format!("`{}`: {e}", v.get_ref()));
            None
        }
    }
}

/// Checks that a PEM file holds at least one certificate / a private key,
/// so `--check` catches a bad file without starting anything.
fn pem_file(diag: &mut Diag<'_>, v: &Spanned<String>, key: &str, want_key: bool) -> bool {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let path = v.get_ref();
    if let Err(e) = std::fs::metadata(path) {
        diag.at(v, key, format!("`{path}`: {e}"));
        return false;
    }
    let problem = if want_key {
        PrivateKeyDer::from_pem_file(path).err().map(|e| format!("`{path}` has no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"))
    } else {
        match CertificateDer::pem_file_iter(path) {
            Err(e) => Some(format!("`{path}`: {e}")),
            Ok(it) => {
                let certs: Result<Vec<_>, _> = it.collect();
                match certs {
                    Ok(c) if !c.is_empty() => None,
                    Ok(_) => Some(format!("`{path}` holds no CERTIFICATE block")),
                    Err(e) => Some(format!("`{path}` is not valid PEM: {e}")),
                }
            }
        }
    };
    match problem {
        Some(p) => {
            diag.at(v, key, p);
            false
        }
        None => true,
    }
}

fn tls_listener(diag: &mut Diag<'_>, t: &Spanned<RawTls>, key: &str) -> Option<TlsListener> {
    let r = t.get_ref();
    let mut ok = pem_file(diag, &r.cert, &format!("{key}.cert"), false);
    ok &= pem_file(diag, &r.key, &format!("{key}.key"), true);
    let default = CertFiles { cert: PathBuf::from(r.cert.get_ref()), key: PathBuf::from(r.key.get_ref()), names: Vec::new(), origin: diag.origin(t, key) };
    let mut sni = Vec::new();
    for (i, s) in r.sni.iter().enumerate() {
        let k = format!("{key}.sni[{i}]");
        let c = s.get_ref();
        ok &= pem_file(diag, &c.cert, &format!("{k}.cert"), false);
        ok &= pem_file(diag, &c.key, &format!("{k}.key"), true);
        if c.names.is_empty() {
            diag.at(s, format!("{k}.names"), "needs at least one host name");
            ok = false;
        }
        let mut names = Vec::new();
        for n in &c.names {
            let name = n.get_ref().trim().to_ascii_lowercase();
            let bare = name.strip_prefix("*.").unwrap_or(&name);
            if bare.is_empty() || !bare.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')) {
                diag.at(n, format!("{k}.names"), format!("`{}` is not a host name (or *.domain wildcard)", n.get_ref()));
                ok = false;
            }
            names.push(name);
        }
        sni.push(CertFiles { cert: PathBuf::from(c.cert.get_ref()), key: PathBuf::from(c.key.get_ref()), names, origin: diag.origin(s, &k) });
    }
    ok.then_some(TlsListener { default, sni })
}

struct ListenerDraft {
    listener: Listener,
    group_name: Spanned<String>,
    key: String,
}

fn listener(diag: &mut Diag<'_>, raw: &Spanned<RawListener>, key: &str, index: usize, routing: (Strategy, &HashKey)) -> Option<ListenerDraft> {
    let r = raw.get_ref();
    let name = r.name.as_ref().map(|n| n.get_ref().clone()).unwrap_or_else(|| if index == 0 { "default".into() } else { format!("listener{index}") });
    let mut bad_mode = false;
    let mode = match &r.mode {
        None => Mode::Http,
        Some(m) => match parse_mode(m.get_ref()) {
            Some(mode) => mode,
            None => {
                diag.at(m, format!("{key}.mode"), format!("unknown mode `{}`, expected one of: http, tcp, static, game, firehose", m.get_ref()));
                bad_mode = true;
                Mode::Http
            }
        },
    };
    // Address: either `address` + `port`, or `address = "ip:port"`.
    let default_addr = Spanned::new(raw.span(), "0.0.0.0".to_string());
    let address = r.address.as_ref().unwrap_or(&default_addr);
    let port = int_in(diag, &r.port, &format!("{key}.port"), 0, 65535, -1);
    let addr = if port >= 0 {
        match address.get_ref().trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
            Ok(ip) => Some(SocketAddr::new(ip, port as u16)),
            Err(_) => {
                diag.at(address, format!("{key}.address"), format!("`{}` is not an IP address (use e.g. 0.0.0.0, 127.0.0.1 or ::)", address.get_ref()));
                None
            }
        }
    } else if r.port.is_none() {
        match address.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                diag.at(address, format!("{key}.port"), "missing: set `port`, or write `address` as ip:port");
                None
            }
        }
    } else {
        None
    };
    let strategy = match &r.strategy {
        None => routing.0,
        Some(s) => parse_strategy(s.get_ref()).unwrap_or_else(|| {
            diag.at(s, format!("{key}.strategy"), format!("unknown strategy `{}`, expected one of: {STRATEGIES}", s.get_ref()));
            routing.0
        }),
    };
    let hash_key = match &r.hash_key {
        None => routing.1.clone(),
        Some(s) => parse_hash_key(s.get_ref()).unwrap_or_else(|| {
            diag.at(s, format!("{key}.hash_key"), format!("unknown hash key `{}`, expected client_ip, uri, path or header:NAME", s.get_ref()));
            HashKey::ClientIp
        }),
    };
    let tls = r.tls.as_ref().and_then(|t| tls_listener(diag, t, &format!("{key}.tls")));
    let static_root = r.root.as_ref().and_then(|root| directory(diag, root, &format!("{key}.root")));
    let backlog = int_in(diag, &r.backlog, &format!("{key}.backlog"), 1, 65535, 4096) as u32;
    let access_log = access_log(diag, r, key);
    let payload_bytes = int_in(diag, &r.skim_payload_bytes, &format!("{key}.skim_payload_bytes"), 0, 4096, 0) as usize;
    let skim = Skim { all: r.skim.unwrap_or(false), routes: false, payload_bytes };
    if bad_mode {
        return None;
    }
    let group_name = r.group.clone().unwrap_or_else(|| Spanned::new(raw.span(), "default".to_string()));
    Some(ListenerDraft {
        listener: Listener {
            name,
            addr: addr?,
            mode,
            tls,
            group: None,
            strategy,
            hash_key,
            backlog,
            static_root,
            max_connections: int_in(diag, &r.max_connections, &format!("{key}.max_connections"), 0, 10_000_000, 0) as usize,
            routes: Vec::new(),
            access_log,
            skim,
        },
        group_name,
        key: key.to_string(),
    })
}

/// `access_log` and `access_log_format`: stdout or a file whose directory exists.
fn access_log(diag: &mut Diag<'_>, r: &RawListener, key: &str) -> Option<AccessLog> {
    let format = match &r.access_log_format {
        None => AccessLogFormat::Combined,
        Some(f) => match f.get_ref().as_str() {
            "combined" => AccessLogFormat::Combined,
            "json" => AccessLogFormat::Json,
            other => {
                diag.at(f, format!("{key}.access_log_format"), format!("unknown format `{other}`, expected combined or json"));
                AccessLogFormat::Combined
            }
        },
    };
    let v = r.access_log.as_ref()?;
    let text = v.get_ref().trim();
    let path = match text {
        "stdout" | "-" => None,
        "" => {
            diag.at(v, format!("{key}.access_log"), "empty: use \"stdout\" or a file path (or leave the key out)");
            return None;
        }
        p => {
            let path = PathBuf::from(p);
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !dir.is_dir() {
                diag.at(v, format!("{key}.access_log"), format!("directory `{}` does not exist", dir.display()));
                return None;
            }
            if path.is_dir() {
                diag.at(v, format!("{key}.access_log"), format!("`{p}` is a directory"));
                return None;
            }
            Some(path)
        }
    };
    Some(AccessLog { path, format })
}

fn upstream(diag: &mut Diag<'_>, raw: &Spanned<RawUpstream>, key: &str) -> Option<(String, Upstream)> {
    let r = raw.get_ref();
    let text = r.address.get_ref().trim();
    let (host, port) = match &r.port {
        Some(p) => {
            let port = int_in(diag, &Some(p.clone()), &format!("{key}.port"), 1, 65535, -1);
            if port < 0 {
                return None;
            }
            (text.trim_matches(|c| c == '[' || c == ']').to_string(), port as u16)
        }
        None => match text.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?))) {
            Some((h, p)) if p > 0 => (h.trim_matches(|c| c == '[' || c == ']').to_string(), p),
            _ => {
                diag.at(&r.address, format!("{key}.port"), "missing: set `port`, or write `address` as host:port");
                return None;
            }
        },
    };
    if host.is_empty() {
        diag.at(&r.address, format!("{key}.address"), "must not be empty");
        return None;
    }
    let offline = OFFLINE.with(|o| o.get()) && host.parse::<IpAddr>().is_err();
    let lookup = if offline { Ok(Some(SocketAddr::from(([0, 0, 0, 0], port)))) } else { (host.as_str(), port).to_socket_addrs().map(|mut it| it.next()) };
    let addr = match lookup {
        Ok(Some(a)) => a,
        Ok(None) | Err(_) => {
            diag.at(&r.address, format!("{key}.address"), format!("cannot resolve `{host}`"));
            return None;
        }
    };
    let weight = int_in(diag, &r.weight, &format!("{key}.weight"), 0, 1_000_000, 1) as u32;
    let name = r.name.as_ref().map(|n| n.get_ref().clone()).unwrap_or_else(|| format!("{host}:{port}"));
    let group = r.group.as_ref().map(|g| g.get_ref().clone()).unwrap_or_else(|| "default".into());
    let tls = if r.tls == Some(true) {
        if let Some(ca) = &r.tls_ca {
            pem_file(diag, ca, &format!("{key}.tls_ca"), false);
        }
        Some(UpstreamTls {
            ca: r.tls_ca.as_ref().map(|c| PathBuf::from(c.get_ref())),
            sni: r.tls_sni.as_ref().map(|s| s.get_ref().clone()).unwrap_or_else(|| host.clone()),
        })
    } else {
        for (v, k) in [(&r.tls_ca, "tls_ca"), (&r.tls_sni, "tls_sni")] {
            if let Some(v) = v {
                diag.at(v, format!("{key}.{k}"), "has no effect without `tls = true`");
            }
        }
        None
    };
    let max_conns = int_in(diag, &r.max_conns, &format!("{key}.max_conns"), 0, 10_000_000, 0) as u32;
    Some((group, Upstream { name, host, port, addr, weight, max_conns, tls }))
}

pub(crate) fn validate(diag: &mut Diag<'_>, raw: RawConfig) -> Config {
    let strategy = match &raw.routing.strategy {
        None => Strategy::RoundRobin,
        Some(s) => parse_strategy(s.get_ref()).unwrap_or_else(|| {
            diag.at(s, "routing.strategy", format!("unknown strategy `{}`, expected one of: {STRATEGIES}", s.get_ref()));
            Strategy::RoundRobin
        }),
    };
    let hash_key = match &raw.routing.hash_key {
        None => HashKey::ClientIp,
        Some(s) => parse_hash_key(s.get_ref()).unwrap_or_else(|| {
            diag.at(s, "routing.hash_key", format!("unknown hash key `{}`, expected client_ip, uri, path or header:NAME", s.get_ref()));
            HashKey::ClientIp
        }),
    };

    // Upstreams, grouped; names unique across the file.
    let mut groups: Vec<Group> = Vec::new();
    let mut seen_names: HashMap<String, ()> = HashMap::new();
    for (i, u) in raw.upstreams.iter().enumerate() {
        let key = format!("upstreams[{i}]");
        if let Some((gname, up)) = upstream(diag, u, &key) {
            if seen_names.insert(up.name.clone(), ()).is_some() {
                let span = u.get_ref().name.as_ref().map(|n| n.span()).unwrap_or(u.span());
                diag.push(Some(span), format!("{key}.name"), format!("duplicate upstream name `{}`", up.name));
            }
            match groups.iter_mut().find(|g| g.name == gname) {
                Some(g) => g.upstreams.push(up),
                None => groups.push(Group { name: gname, upstreams: vec![up] }),
            }
        }
    }
    for g in &groups {
        if g.upstreams.iter().all(|u| u.weight == 0) {
            let span = raw.upstreams.iter().find(|u| u.get_ref().group.as_ref().map(|x| x.get_ref().as_str()).unwrap_or("default") == g.name).map(|u| u.span());
            diag.push(span, "upstreams.weight", format!("total weight of upstream group `{}` is zero: at least one upstream needs weight > 0", g.name));
        }
    }

    // Listeners: [listen] first, then [[listeners]].
    let mut drafts = Vec::new();
    let mut worker_hint: Option<Spanned<i64>> = None;
    let all: Vec<(&Spanned<RawListener>, String)> =
        raw.listen.iter().map(|l| (l, "listen".to_string())).chain(raw.listeners.iter().enumerate().map(|(i, l)| (l, format!("listeners[{i}]")))).collect();
    if all.is_empty() && !diag.failed.iter().any(|f| f == "listen" || f == "listeners") {
        diag.push(None, "listen", "no listener: add a [listen] table or [[listeners]] entries");
    }
    for (index, (l, key)) in all.iter().enumerate() {
        if let Some(w) = &l.get_ref().workers {
            match &worker_hint {
                Some(prev) if prev.get_ref() != w.get_ref() => {
                    diag.at(
                        w,
                        format!("{key}.workers"),
                        format!("differs from the {} set earlier: worker threads are shared by all listeners; set [runtime] workers", prev.get_ref()),
                    );
                }
                _ => worker_hint = Some(w.clone()),
            }
        }
        if let Some(d) = listener(diag, l, key, index, (strategy, &hash_key)) {
            drafts.push(d);
        }
    }
    let global_root =
        raw.static_files.root.as_ref().and_then(|r| match drafts.iter().any(|d| d.listener.mode == Mode::Static && d.listener.static_root.is_none()) {
            // Only a root someone serves from has to exist (the seed file names
            // /var/www/html while running in http mode).
            true => directory(diag, r, "static_files.root"),
            false => Some(PathBuf::from(r.get_ref())),
        });
    let mut listeners = Vec::new();
    let mut names: HashMap<String, ()> = HashMap::new();
    for mut d in drafts {
        if d.listener.mode == Mode::Static && d.listener.static_root.is_none() {
            match &global_root {
                Some(r) => d.listener.static_root = Some(r.clone()),
                None if raw.static_files.root.is_some() => {}
                None => diag.at(&d.group_name, format!("{}.mode", d.key), "mode `static` needs a root: set [static_files] root or the listener's `root`"),
            }
        }
        if names.insert(d.listener.name.clone(), ()).is_some() {
            diag.at(&d.group_name, format!("{}.name", d.key), format!("duplicate listener name `{}`", d.listener.name));
        }
        if matches!(d.listener.mode, Mode::Http | Mode::Tcp) {
            match groups.iter().position(|g| &g.name == d.group_name.get_ref()) {
                Some(i) => d.listener.group = Some(i),
                None if groups.is_empty() && diag.failed.iter().any(|f| f == "upstreams") => {}
                None if groups.is_empty() => diag.at(
                    &d.group_name,
                    format!("{}.mode", d.key),
                    format!("mode `{}` needs upstreams: add at least one [[upstreams]] entry", d.listener.mode.as_str()),
                ),
                None => diag.at(&d.group_name, format!("{}.group", d.key), format!("no upstream has group `{}`", d.group_name.get_ref())),
            }
        }
        listeners.push(d.listener);
    }
    routes(diag, &raw.routes, &mut listeners, &groups);
    for (i, a) in listeners.iter().enumerate() {
        if a.addr.port() != 0 && listeners[..i].iter().any(|b| b.addr == a.addr) {
            diag.push(None, "listeners", format!("two listeners on {}", a.addr));
        }
    }

    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as i64;
    let workers_key = if raw.runtime.workers.is_some() { "runtime.workers" } else { "listen.workers" };
    let workers = match raw.runtime.workers.as_ref().or(worker_hint.as_ref()) {
        Some(w) => int_in(diag, &Some(w.clone()), workers_key, 1, 1024, cpus) as usize,
        None => cpus as usize,
    };
    let driver = match &raw.runtime.driver {
        None => Driver::Auto,
        Some(d) => match d.get_ref().as_str() {
            "auto" => Driver::Auto,
            "io_uring" | "iouring" => Driver::IoUring,
            "epoll" | "legacy" => Driver::Epoll,
            other => {
                diag.at(d, "runtime.driver", format!("unknown driver `{other}`, expected auto, io_uring or epoll"));
                Driver::Auto
            }
        },
    };
    let ring_entries = int_in(diag, &raw.runtime.ring_entries, "runtime.ring_entries", 64, 32768, 1024) as u32;
    if !ring_entries.is_power_of_two() {
        if let Some(r) = &raw.runtime.ring_entries {
            diag.at(r, "runtime.ring_entries", "must be a power of two");
        }
    }

    let api = raw.api.as_ref().and_then(|a| {
        let r = a.get_ref();
        if r.enabled == Some(false) {
            return None;
        }
        let addr = match &r.address {
            None => "127.0.0.1:9001".parse().ok(),
            Some(s) => match s.get_ref().parse::<SocketAddr>() {
                Ok(x) => Some(x),
                Err(_) => {
                    diag.at(s, "api.address", format!("`{}` is not ip:port", s.get_ref()));
                    None
                }
            },
        }?;
        let mut cidrs = |list: &Option<Vec<Spanned<String>>>, key: &str| {
            list.as_ref().map(|list| {
                list.iter()
                    .filter_map(|c| {
                        let text = c.get_ref();
                        let parsed = text.parse::<ipnet::IpNet>().or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
                        if parsed.is_err() {
                            diag.at(c, key, format!("`{text}` is not an address or CIDR (e.g. 10.0.0.0/8)"));
                        }
                        parsed.ok()
                    })
                    .collect::<Vec<_>>()
            })
        };
        let allow = cidrs(&r.allow, "api.allow").unwrap_or_else(default_api_allow);
        let read_allow = cidrs(&r.read_allow, "api.read_allow").unwrap_or_else(|| allow.clone());
        Some(Api { addr, allow, token: r.token.as_ref().map(|t| t.get_ref().clone()).filter(|t| !t.is_empty()), read_allow })
    });

    let t = &raw.timeouts;
    let d = Timeouts::default();
    let timeouts = Timeouts {
        connect: duration(diag, &t.connect, "timeouts.connect", d.connect),
        client_header: duration(diag, &t.client_header, "timeouts.client_header", d.client_header),
        client_idle: duration(diag, &t.client_idle, "timeouts.client_idle", d.client_idle),
        client_body: duration(diag, &t.client_body, "timeouts.client_body", d.client_body),
        upstream_response: duration(diag, &t.upstream_response, "timeouts.upstream_response", d.upstream_response),
        upstream_idle: duration(diag, &t.upstream_idle, "timeouts.upstream_idle", d.upstream_idle),
        tcp_idle: duration(diag, &t.tcp_idle, "timeouts.tcp_idle", d.tcp_idle),
        request: match &t.request {
            None => None,
            Some(v) => match parse_duration(v.get_ref()) {
                Ok(d) if d.is_zero() => None,
                Ok(d) => Some(d),
                Err(e) => {
                    diag.at(v, "timeouts.request", e);
                    None
                }
            },
        },
    };
    let dl = Limits::default();
    let limits = Limits {
        max_header_bytes: int_in(diag, &raw.limits.max_header_bytes, "limits.max_header_bytes", 1024, 1 << 20, dl.max_header_bytes as i64) as usize,
        max_headers: int_in(diag, &raw.limits.max_headers, "limits.max_headers", 8, 1000, dl.max_headers as i64) as usize,
        max_body_bytes: int_in(diag, &raw.limits.max_body_bytes, "limits.max_body_bytes", 0, i64::MAX, 0) as u64,
        max_connections: int_in(diag, &raw.limits.max_connections, "limits.max_connections", 0, 10_000_000, 0) as usize,
        queue_timeout: match &raw.limits.queue_timeout {
            None => Duration::ZERO,
            Some(v) => parse_duration(v.get_ref()).unwrap_or_else(|e| {
                diag.at(v, "limits.queue_timeout", e);
                Duration::ZERO
            }),
        },
        per_ip_connections: int_in(diag, &raw.limits.per_ip_connections, "limits.per_ip_connections", 0, 1_000_000, 0) as u32,
        per_ip_requests_per_sec: match &raw.limits.per_ip_requests_per_sec {
            None => 0.0,
            Some(v) if v.get_ref().is_finite() && *v.get_ref() >= 0.0 => *v.get_ref(),
            Some(v) => {
                diag.at(v, "limits.per_ip_requests_per_sec", "must be a number >= 0");
                0.0
            }
        },
        per_ip_burst: int_in(diag, &raw.limits.per_ip_burst, "limits.per_ip_burst", 0, 1_000_000, 0) as u32,
    };
    let dp = Pool::default();
    let pool = Pool {
        max_idle_per_upstream: int_in(diag, &raw.pool.max_idle_per_upstream, "pool.max_idle_per_upstream", 0, 100_000, dp.max_idle_per_upstream as i64)
            as usize,
        idle_timeout: duration(diag, &raw.pool.idle_timeout, "pool.idle_timeout", dp.idle_timeout),
    };

    let h = &raw.health;
    let dh = Health::default();
    let health = Health {
        check: match &h.check {
            None => HealthCheck::None,
            Some(c) => match c.get_ref().as_str() {
                "none" => HealthCheck::None,
                "tcp" => HealthCheck::Tcp,
                "http" => HealthCheck::Http,
                other => {
                    diag.at(c, "health.check", format!("unknown check `{other}`, expected none, tcp or http"));
                    HealthCheck::None
                }
            },
        },
        path: match &h.path {
            Some(p) if !p.get_ref().starts_with('/') || p.get_ref().bytes().any(|b| b <= b' ' || b == 0x7f) => {
                diag.at(p, "health.path", "must start with `/` and contain no spaces or control characters");
                dh.path.clone()
            }
            Some(p) => p.get_ref().clone(),
            None => dh.path.clone(),
        },
        expect_status: int_in(diag, &h.expect_status, "health.expect_status", 100, 599, dh.expect_status as i64) as u16,
        interval: duration(diag, &h.interval, "health.interval", dh.interval),
        timeout: duration(diag, &h.timeout, "health.timeout", dh.timeout),
        rise: int_in(diag, &h.rise, "health.rise", 1, 100, dh.rise as i64) as u32,
        fall: int_in(diag, &h.fall, "health.fall", 1, 100, dh.fall as i64) as u32,
        max_fails: int_in(diag, &h.max_fails, "health.max_fails", 0, 1000, dh.max_fails as i64) as u32,
        fail_timeout: duration(diag, &h.fail_timeout, "health.fail_timeout", dh.fail_timeout),
    };

    Config {
        source: None,
        driver,
        workers,
        ring_entries,
        drain_timeout: duration(diag, &raw.runtime.drain_timeout, "runtime.drain_timeout", Duration::from_secs(30)),
        takeover_socket: raw.runtime.takeover_socket.as_ref().map(|p| PathBuf::from(p.get_ref())).unwrap_or_else(|| PathBuf::from("/tmp/atlas-takeover.sock")),
        listeners,
        groups,
        static_root: global_root,
        static_files: static_settings(diag, &raw.static_files),
        api,
        timeouts,
        limits,
        pool,
        health,
        spatial: crate::spatial::validate(diag, &raw.spatial),
        rooms: crate::rooms::validate_rooms(diag, &raw.rooms),
        store: crate::rooms::validate_store(diag, &raw.store),
        firehose: crate::firehose::validate_firehose(diag, &raw.firehose),
    }
}

fn static_settings(diag: &mut Diag<'_>, r: &RawStatic) -> StaticSettings {
    let d = StaticSettings::default();
    let index = match &r.index {
        Some(i) if i.get_ref().is_empty() || i.get_ref().contains('/') || i.get_ref() == ".." => {
            diag.at(i, "static_files.index", "must be a plain file name such as index.html");
            d.index
        }
        Some(i) => i.get_ref().clone(),
        None => d.index,
    };
    StaticSettings {
        index,
        allow_symlinks_outside: r.allow_symlinks_outside.unwrap_or(false),
        cache_max_bytes: int_in(diag, &r.cache_max_bytes, "static_files.cache_max_bytes", 0, 1 << 40, d.cache_max_bytes as i64) as usize,
        cache_max_file_bytes: int_in(diag, &r.cache_max_file_bytes, "static_files.cache_max_file_bytes", 0, 1 << 30, d.cache_max_file_bytes as i64) as usize,
        revalidate: match &r.revalidate {
            None => d.revalidate,
            Some(v) => parse_duration(v.get_ref()).unwrap_or_else(|e| {
                diag.at(v, "static_files.revalidate", e);
                d.revalidate
            }),
        },
    }
}

/// Attaches `[[routes]]` to their listeners, longest prefix first.
fn routes(diag: &mut Diag<'_>, raw: &[Spanned<RawRoute>], listeners: &mut [Listener], groups: &[Group]) {
    for (i, r) in raw.iter().enumerate() {
        let key = format!("routes[{i}]");
        let route = r.get_ref();
        let prefix = route.prefix.get_ref();
        if !prefix.starts_with('/') {
            diag.at(&route.prefix, format!("{key}.prefix"), "must start with `/`");
            continue;
        }
        let target = match (&route.static_root, &route.group) {
            (Some(root), None) => match directory(diag, root, &format!("{key}.static_root")) {
                Some(root) => RouteTarget::Static { root, strip_prefix: route.strip_prefix.unwrap_or(false) },
                None => continue,
            },
            (None, Some(g)) => match groups.iter().position(|x| &x.name == g.get_ref()) {
                Some(gi) => RouteTarget::Group(gi),
                None => {
                    diag.at(g, format!("{key}.group"), format!("no upstream has group `{}`", g.get_ref()));
                    continue;
                }
            },
            _ => {
                diag.at(r, &key, "needs exactly one of `static_root` or `group`");
                continue;
            }
        };
        let serves_http = |l: &Listener| matches!(l.mode, Mode::Http | Mode::Static);
        let skim = route.skim.unwrap_or(false);
        match &route.listener {
            Some(name) => match listeners.iter_mut().find(|l| &l.name == name.get_ref()) {
                Some(l) if serves_http(l) => l.routes.push(Route { prefix: prefix.clone(), target, skim }),
                Some(l) => diag.at(
                    name,
                    format!("{key}.listener"),
                    format!("listener `{}` is in mode `{}`: routes apply to http and static listeners", l.name, l.mode.as_str()),
                ),
                None => diag.at(name, format!("{key}.listener"), format!("no listener named `{}`", name.get_ref())),
            },
            None => {
                for l in listeners.iter_mut().filter(|l| serves_http(l)) {
                    l.routes.push(Route { prefix: prefix.clone(), target: target.clone(), skim });
                }
            }
        }
    }
    for l in listeners.iter_mut() {
        l.routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        l.skim.routes = l.routes.iter().any(|r| r.skim);
    }
}
