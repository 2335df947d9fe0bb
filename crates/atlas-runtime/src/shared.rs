//! State built once at start-up and shared read-only by every worker:
//! upstream groups (with their in-flight tables), TLS server configs per
//! listener and TLS client configs per upstream. Building it is also what
//! `--check` runs beyond parsing, so a certificate that does not match its
//! key (or an access log that cannot be opened) is caught before anything
//! listens.

use std::sync::Arc;

use atlas_balance::GroupShared;
use atlas_config::{AccessLogFormat, Config, Mode};
use atlas_observe::access_log::{AccessLog, Format};
use atlas_proxy::tls::{ClientTls, ServerTls};

pub struct Shared {
    pub groups: Vec<Arc<GroupShared>>,
    /// Per group, per upstream: TLS to that upstream.
    pub group_tls: Vec<Arc<Vec<Option<ClientTls>>>>,
    /// Per listener: TLS termination.
    pub server_tls: Vec<Option<Arc<ServerTls>>>,
    /// Per listener: its access log, opened.
    pub access_logs: Vec<Option<AccessLog>>,
}

impl Shared {
    /// Builds the shared state for `cfg`; with `previous` (a reload), the
    /// in-flight counters of upstreams that remain carry over.
    pub fn build(cfg: &Config, previous: Option<&Shared>) -> Result<Shared, Vec<String>> {
        let mut errors = Vec::new();
        let old: &[Arc<GroupShared>] = previous.map(|p| p.groups.as_slice()).unwrap_or(&[]);
        let groups = cfg.groups.iter().map(|g| Arc::new(GroupShared::carrying(g, cfg.workers, old))).collect();
        let group_tls = cfg
            .groups
            .iter()
            .map(|g| {
                Arc::new(
                    g.upstreams
                        .iter()
                        .map(|u| {
                            u.tls.as_ref().and_then(|t| match ClientTls::new(t, &u.name) {
                                Ok(c) => Some(c),
                                Err(e) => {
                                    errors.push(e);
                                    None
                                }
                            })
                        })
                        .collect(),
                )
            })
            .collect();
        let server_tls = cfg
            .listeners
            .iter()
            .map(|l| {
                l.tls.as_ref().and_then(|t| match ServerTls::new(t, matches!(l.mode, Mode::Http | Mode::Static | Mode::Game)) {
                    Ok(s) => Some(Arc::new(s)),
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                })
            })
            .collect();
        let access_logs = cfg
            .listeners
            .iter()
            .map(|l| {
                let a = l.access_log.as_ref()?;
                let format = match a.format {
                    AccessLogFormat::Combined => Format::Combined,
                    AccessLogFormat::Json => Format::Json,
                };
                AccessLog::open(a.path.as_deref(), format).map_err(|e| errors.push(format!("listener `{}`: {e}", l.name))).ok()
            })
            .collect();
        if errors.is_empty() {
            register_series(cfg);
            Ok(Shared { groups, group_tls, server_tls, access_logs })
        } else {
            Err(errors)
        }
    }
}

/// Creates the metric series of every listener and of the upstreams each
/// one sends to, so a scrape right after start-up (or a reload) shows them
/// at zero instead of missing until a worker builds its contexts.
fn register_series(cfg: &Config) {
    let reg = atlas_observe::metrics::registry();
    for l in &cfg.listeners {
        reg.listener(&l.name);
        let routed = l.routes.iter().filter_map(|r| match r.target {
            atlas_config::RouteTarget::Group(g) => Some(g),
            _ => None,
        });
        for gi in l.group.into_iter().chain(routed) {
            let Some(g) = cfg.groups.get(gi) else { continue };
            for u in &g.upstreams {
                reg.upstream(atlas_observe::metrics::UpstreamKey { listener: l.name.clone(), group: g.name.clone(), upstream: u.name.clone() });
            }
        }
    }
}
