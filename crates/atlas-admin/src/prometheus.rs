//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4),
//! rendered on each scrape by summing the workers' slots. Only listeners
//! and upstreams of the running configuration are shown; their counters
//! keep counting across reloads.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use atlas_observe::metrics::{self, HistogramSnapshot, Reject, CLASSES, LATENCY_BOUNDS_US};

use crate::AdminState;

/// Escapes a label value (backslash, double quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    let mut cum = 0u64;
    let sep = if labels.is_empty() { "" } else { "," };
    for (i, n) in h.buckets.iter().enumerate() {
        cum += n;
        let le = match LATENCY_BOUNDS_US.get(i) {
            Some(&us) => format!("{}", us as f64 / 1e6),
            None => "+Inf".to_string(),
        };
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
    }
    let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{braces} {cum}");
}

/// The game gateway's figures (when a listener is in game mode).
fn game(out: &mut String) {
    use atlas_game::stats::{stats, GameStats};
    let sum = |f: &dyn Fn(&GameStats) -> u64| stats().iter().map(f).sum::<u64>();
    let reg = atlas_game::registry::registry();
    let world = reg.world();
    family(out, "atlas_game_servers", "gauge", "Registered game servers by status.");
    for status in ["up", "down", "draining"] {
        let n = world.servers.iter().filter(|s| s.status.as_str() == status).count();
        let _ = writeln!(out, "atlas_game_servers{{status=\"{status}\"}} {n}");
    }
    family(out, "atlas_game_server_players", "gauge", "Players Atlas has on each game server.");
    for s in &world.servers {
        let _ = writeln!(out, "atlas_game_server_players{{server=\"{}\",name=\"{}\"}} {}", esc(&s.id), esc(&s.name), s.players());
    }
    family(out, "atlas_game_players", "gauge", "Players connected (open sessions).");
    let _ = writeln!(out, "atlas_game_players {}", stats().iter().map(|s| s.sessions.get()).sum::<i64>());
    let counters: [(&str, &str, &dyn Fn(&GameStats) -> u64); 7] = [
        ("atlas_game_sessions_total", "Player sessions opened.", &|s| s.sessions_total.get()),
        ("atlas_game_handshakes_refused_total", "Client handshakes refused (malformed, no server, server refused).", &|s| s.refused.get()),
        ("atlas_game_positions_total", "Positions read from client messages.", &|s| s.positions.get()),
        ("atlas_game_failovers_total", "Sessions whose server failed under them.", &|s| s.failovers.get()),
        ("atlas_game_preconnects_total", "Predictive pre-connects opened.", &|s| s.preconnects.get()),
        ("atlas_game_preconnect_hits_total", "Transfers that used a pre-connected server.", &|s| s.preconnect_hits.get()),
        ("atlas_game_preconnect_cancelled_total", "Pre-connects closed unused (the player turned back).", &|s| s.preconnect_cancelled.get()),
    ];
    for (name, help, f) in counters {
        family(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", sum(f));
    }
    family(out, "atlas_game_heartbeats_total", "counter", "Heartbeats received from game servers.");
    let _ = writeln!(out, "atlas_game_heartbeats_total {}", reg.heartbeats.load(Ordering::Relaxed));
    family(out, "atlas_game_messages_total", "counter", "WebSocket data messages relayed, by direction.");
    let _ = writeln!(out, "atlas_game_messages_total{{direction=\"client_to_server\"}} {}", sum(&|s| s.messages_in.get()));
    let _ = writeln!(out, "atlas_game_messages_total{{direction=\"server_to_client\"}} {}", sum(&|s| s.messages_out.get()));
    family(out, "atlas_game_transfers_total", "counter", "Player transfers between game servers, by result.");
    let _ = writeln!(out, "atlas_game_transfers_total{{result=\"ok\"}} {}", sum(&|s| s.transfers_ok.get()));
    let _ = writeln!(out, "atlas_game_transfers_total{{result=\"failed\"}} {}", sum(&|s| s.transfers_failed.get()));
    family(out, "atlas_game_servers_marked_down_total", "counter", "Game servers marked down after missing heartbeats.");
    let _ = writeln!(out, "atlas_game_servers_marked_down_total {}", reg.servers_marked_down.load(Ordering::Relaxed));
    family(out, "atlas_game_scale_requests_total", "counter", "Auto-scale requests to Maestro, by result.");
    let _ = writeln!(out, "atlas_game_scale_requests_total{{result=\"ok\"}} {}", reg.scale_requests_sent.load(Ordering::Relaxed));
    let _ = writeln!(out, "atlas_game_scale_requests_total{{result=\"error\"}} {}", reg.scale_requests_failed.load(Ordering::Relaxed));
    family(out, "atlas_game_transfer_switch_seconds", "histogram", "From deciding to move a player to its stream running to the new server.");
    let mut h = HistogramSnapshot::default();
    for s in stats().iter() {
        h.merge(&s.switch_time);
    }
    histogram(out, "atlas_game_transfer_switch_seconds", "", &h);
    rooms(out);
}

/// The firehose's gauges and counters (when a firehose listener runs).
fn firehose(out: &mut String) {
    let Some(hub) = atlas_game::firehose::hub() else { return };
    let st = &hub.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (clients, stale) = {
        let t = hub.table.lock().unwrap_or_else(|e| e.into_inner());
        (t.clients.len(), t.nstale)
    };
    family(out, "atlas_firehose_clients", "gauge", "Firehose clients by state (stale: disconnected, may still reconnect).");
    let _ = writeln!(out, "atlas_firehose_clients{{state=\"live\"}} {}", clients - stale);
    let _ = writeln!(out, "atlas_firehose_clients{{state=\"stale\"}} {stale}");
    family(out, "atlas_firehose_master_up", "gauge", "1 while the link to a master is connected.");
    for l in &hub.links {
        let _ = writeln!(out, "atlas_firehose_master_up{{master=\"{}\"}} {}", l.addr, u8::from(l.up.load(Ordering::Relaxed)));
    }
    family(out, "atlas_firehose_master_queued_packets", "gauge", "Packets waiting in a master link's outbox.");
    for l in &hub.links {
        let _ = writeln!(out, "atlas_firehose_master_queued_packets{{master=\"{}\"}} {}", l.addr, l.queued());
    }
    family(out, "atlas_firehose_frames_total", "counter", "Frames relayed, by direction.");
    let _ = writeln!(out, "atlas_firehose_frames_total{{direction=\"to_master\"}} {}", get(&st.to_master));
    let _ = writeln!(out, "atlas_firehose_frames_total{{direction=\"to_clients\"}} {}", get(&st.to_clients));
    family(out, "atlas_firehose_clients_total", "counter", "Client handshakes, by outcome.");
    let _ = writeln!(out, "atlas_firehose_clients_total{{outcome=\"new\"}} {}", get(&st.accepted));
    let _ = writeln!(out, "atlas_firehose_clients_total{{outcome=\"reconnected\"}} {}", get(&st.reconnected));
    let _ = writeln!(out, "atlas_firehose_clients_total{{outcome=\"reconnect_refused\"}} {}", get(&st.reconnects_refused));
    let _ = writeln!(out, "atlas_firehose_clients_total{{outcome=\"refused\"}} {}", get(&st.refused));
    family(out, "atlas_firehose_clients_removed_total", "counter", "Clients forgotten, by cause (failed: the master got 0x01).");
    let _ = writeln!(out, "atlas_firehose_clients_removed_total{{cause=\"failed\"}} {}", get(&st.failed));
    let _ = writeln!(out, "atlas_firehose_clients_removed_total{{cause=\"kicked\"}} {}", get(&st.kicked));
    family(out, "atlas_firehose_master_link_failures_total", "counter", "Master links that went down.");
    let _ = writeln!(out, "atlas_firehose_master_link_failures_total {}", get(&st.link_failures));
}

/// The room gateway's counters (this instance's; a fleet sums them).
fn rooms(out: &mut String) {
    let st = &atlas_game::rooms::rooms().stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    family(out, "atlas_rooms_created_total", "counter", "Rooms created through this instance.");
    let _ = writeln!(out, "atlas_rooms_created_total {}", get(&st.created));
    family(out, "atlas_rooms_create_refused_total", "counter", "Room creations refused, by reason.");
    let _ = writeln!(out, "atlas_rooms_create_refused_total{{reason=\"full\"}} {}", get(&st.refused_full));
    let _ = writeln!(out, "atlas_rooms_create_refused_total{{reason=\"store_unavailable\"}} {}", get(&st.store_errors));
    let _ = writeln!(out, "atlas_rooms_create_refused_total{{reason=\"rate_limited\"}} {}", get(&st.rate_limited));
    family(out, "atlas_rooms_removed_total", "counter", "Rooms removed, by cause.");
    let _ = writeln!(out, "atlas_rooms_removed_total{{cause=\"deleted\"}} {}", get(&st.deleted));
    let _ = writeln!(out, "atlas_rooms_removed_total{{cause=\"empty\"}} {}", get(&st.cleaned));
    family(out, "atlas_rooms_migrated_total", "counter", "Rooms moved off a failed game server (lost: no server could take them).");
    let _ = writeln!(out, "atlas_rooms_migrated_total{{result=\"ok\"}} {}", get(&st.migrated));
    let _ = writeln!(out, "atlas_rooms_migrated_total{{result=\"lost\"}} {}", get(&st.lost));
    family(out, "atlas_rooms_joins_total", "counter", "Joins through Atlas (/rooms/{id}), by result.");
    let _ = writeln!(out, "atlas_rooms_joins_total{{result=\"ok\"}} {}", get(&st.joins));
    let _ = writeln!(out, "atlas_rooms_joins_total{{result=\"refused\"}} {}", get(&st.joins_refused));
}

pub fn render(state: &AdminState) -> String {
    let g = state.current.load();
    let reg = metrics::registry();
    let mut out = String::with_capacity(16 * 1024);

    family(&mut out, "atlas_build_info", "gauge", "Atlas version and I/O driver.");
    let _ = writeln!(out, "atlas_build_info{{version=\"{}\",driver=\"{}\"}} 1", env!("CARGO_PKG_VERSION"), state.driver);
    family(&mut out, "atlas_uptime_seconds", "gauge", "Seconds since this process started.");
    let _ = writeln!(out, "atlas_uptime_seconds {}", state.started.elapsed().as_secs_f64());
    family(&mut out, "atlas_workers", "gauge", "Worker threads.");
    let _ = writeln!(out, "atlas_workers {}", g.cfg.workers);
    family(&mut out, "atlas_config_version", "gauge", "Version of the configuration in use (bumped by each applied reload).");
    let _ = writeln!(out, "atlas_config_version {}", g.version);
    family(&mut out, "atlas_config_reloads_total", "counter", "Configuration reloads by result.");
    let _ = writeln!(out, "atlas_config_reloads_total{{result=\"ok\"}} {}", reg.reloads_ok.load(Ordering::Relaxed));
    let _ = writeln!(out, "atlas_config_reloads_total{{result=\"error\"}} {}", reg.reloads_failed.load(Ordering::Relaxed));
    family(&mut out, "atlas_draining", "gauge", "1 while the process drains.");
    let _ = writeln!(out, "atlas_draining {}", atlas_proxy::drain::process_drain_requested() as u8);

    let listeners: Vec<_> = reg.listeners().into_iter().filter(|(n, _)| g.cfg.listeners.iter().any(|l| &l.name == n)).collect();
    let per_listener = |out: &mut String, name: &str, kind: &str, help: &str, f: &dyn Fn(&metrics::ListenerSnapshot) -> String| {
        family(out, name, kind, help);
        for (l, s) in &listeners {
            let _ = writeln!(out, "{name}{{listener=\"{}\"}} {}", esc(l), f(s));
        }
    };
    per_listener(&mut out, "atlas_connections_active", "gauge", "Open client connections.", &|s| s.connections_active.max(0).to_string());
    per_listener(&mut out, "atlas_connections_total", "counter", "Client connections accepted.", &|s| s.connections_total.to_string());
    per_listener(&mut out, "atlas_received_bytes_total", "counter", "Bytes read from clients.", &|s| s.bytes_in.to_string());
    per_listener(&mut out, "atlas_sent_bytes_total", "counter", "Bytes written to clients.", &|s| s.bytes_out.to_string());
    per_listener(&mut out, "atlas_retries_total", "counter", "Requests sent again (another upstream, or a fresh connection).", &|s| s.retries.to_string());

    family(&mut out, "atlas_http_requests_total", "counter", "HTTP requests answered, by status class.");
    for (l, s) in &listeners {
        for (i, c) in CLASSES.iter().enumerate() {
            let _ = writeln!(out, "atlas_http_requests_total{{listener=\"{}\",class=\"{c}\"}} {}", esc(l), s.requests[i]);
        }
    }
    family(&mut out, "atlas_http_request_duration_seconds", "histogram", "From a request's first byte to its last response byte.");
    for (l, s) in &listeners {
        histogram(&mut out, "atlas_http_request_duration_seconds", &format!("listener=\"{}\"", esc(l)), &s.latency);
    }
    family(&mut out, "atlas_rejected_total", "counter", "Connections and requests refused, by reason (limits, smuggling attempts, malformed input).");
    for (l, s) in &listeners {
        for r in Reject::ALL {
            let _ = writeln!(out, "atlas_rejected_total{{listener=\"{}\",reason=\"{}\"}} {}", esc(l), r.as_str(), s.rejected[r as usize]);
        }
    }

    // Upstreams: figures per (listener, group, upstream), state per (group, upstream).
    let live = |group: &str, name: &str| g.shared.groups.iter().any(|x| x.name == group && x.names.iter().any(|n| n == name));
    let ups: Vec<_> =
        reg.upstreams().into_iter().filter(|(k, _)| live(&k.group, &k.upstream) && g.cfg.listeners.iter().any(|l| l.name == k.listener)).collect();
    let lbl = |k: &metrics::UpstreamKey| format!("listener=\"{}\",group=\"{}\",upstream=\"{}\"", esc(&k.listener), esc(&k.group), esc(&k.upstream));
    family(&mut out, "atlas_upstream_responses_total", "counter", "Responses from upstreams, by status class.");
    for (k, s) in &ups {
        for (i, c) in CLASSES.iter().enumerate() {
            let _ = writeln!(out, "atlas_upstream_responses_total{{{},class=\"{c}\"}} {}", lbl(k), s.responses[i]);
        }
    }
    family(&mut out, "atlas_upstream_errors_total", "counter", "Attempts that got no valid response (connect failure, reset, timeout, malformed).");
    for (k, s) in &ups {
        let _ = writeln!(out, "atlas_upstream_errors_total{{{}}} {}", lbl(k), s.errors);
    }
    family(&mut out, "atlas_upstream_pool_hits_total", "counter", "Requests sent on a pooled keep-alive connection.");
    for (k, s) in &ups {
        let _ = writeln!(out, "atlas_upstream_pool_hits_total{{{}}} {}", lbl(k), s.pool_hits);
    }
    family(&mut out, "atlas_upstream_pool_misses_total", "counter", "Requests that needed a new upstream connection.");
    for (k, s) in &ups {
        let _ = writeln!(out, "atlas_upstream_pool_misses_total{{{}}} {}", lbl(k), s.pool_misses);
    }
    family(&mut out, "atlas_upstream_header_duration_seconds", "histogram", "From sending a request to receiving the upstream's response head.");
    for (k, s) in &ups {
        histogram(&mut out, "atlas_upstream_header_duration_seconds", &lbl(k), &s.latency);
    }
    family(&mut out, "atlas_upstream_up", "gauge", "1 when the active health check has the upstream up.");
    for group in &g.shared.groups {
        for i in 0..group.len() {
            let c = group.inflight.counters(i);
            let _ = writeln!(out, "atlas_upstream_up{{group=\"{}\",upstream=\"{}\"}} {}", esc(&group.name), esc(&group.names[i]), c.is_healthy() as u8);
        }
    }
    family(&mut out, "atlas_upstream_drained", "gauge", "1 when an operator drained the upstream.");
    for group in &g.shared.groups {
        for i in 0..group.len() {
            let c = group.inflight.counters(i);
            let _ = writeln!(out, "atlas_upstream_drained{{group=\"{}\",upstream=\"{}\"}} {}", esc(&group.name), esc(&group.names[i]), c.is_drained() as u8);
        }
    }
    family(&mut out, "atlas_upstream_in_flight", "gauge", "Requests (or TCP connections) in flight to the upstream.");
    for group in &g.shared.groups {
        for i in 0..group.len() {
            let c = group.inflight.counters(i);
            let _ = writeln!(out, "atlas_upstream_in_flight{{group=\"{}\",upstream=\"{}\"}} {}", esc(&group.name), esc(&group.names[i]), c.total());
        }
    }

    family(&mut out, "atlas_access_log_lines_total", "counter", "Access log lines written.");
    let _ = writeln!(out, "atlas_access_log_lines_total {}", atlas_observe::access_log::written());
    family(&mut out, "atlas_access_log_dropped_total", "counter", "Access log lines dropped (writer behind, or write failed).");
    let _ = writeln!(out, "atlas_access_log_dropped_total {}", atlas_observe::access_log::dropped());
    family(&mut out, "atlas_skim_samples_total", "counter", "Samples taken by the traffic skim.");
    let taps: Vec<_> = g.cfg.listeners.iter().filter(|l| l.skim.enabled()).filter_map(|l| atlas_observe::skim::find(&l.name)).collect();
    for t in &taps {
        let _ = writeln!(out, "atlas_skim_samples_total{{listener=\"{}\"}} {}", esc(&t.listener), t.counts().0);
    }
    family(&mut out, "atlas_skim_dropped_total", "counter", "Samples the traffic skim dropped because a ring was full or busy.");
    for t in &taps {
        let _ = writeln!(out, "atlas_skim_dropped_total{{listener=\"{}\"}} {}", esc(&t.listener), t.counts().1);
    }
    if g.cfg.listeners.iter().any(|l| l.mode == atlas_config::Mode::Game) {
        game(&mut out);
    }
    firehose(&mut out);
    out
}
