//! Unit tests for loading and validation: the seed format, and every class of
//! error the issue names (unknown key, wrong type, zero weight, unknown
//! strategy, empty upstream list), each located by line and key.

use super::*;

const SEED: &str = r#"
[listen]
address = "0.0.0.0"
port = 8080
mode = "http"
workers = 4

[[upstreams]]
name = "backend"
address = "127.0.0.1"
port = 8081

[routing]
strategy = "round_robin"

[static_files]
root = "/var/www/html"
"#;

fn errors(text: &str) -> Vec<ConfigError> {
    match load_str(text, "t.toml") {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0,
    }
}

#[test]
fn seed_format_loads_unchanged() {
    let c = load_str(SEED, "seed.toml").unwrap();
    assert_eq!(c.workers, 4);
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].addr, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(c.listeners[0].mode, Mode::Http);
    assert_eq!(c.listeners[0].strategy, Strategy::RoundRobin);
    assert_eq!(c.groups[0].upstreams[0].addr, "127.0.0.1:8081".parse().unwrap());
    assert_eq!(c.groups[0].upstreams[0].weight, 1);
    assert_eq!(c.static_root.as_deref(), Some(std::path::Path::new("/var/www/html")));
}

#[test]
fn seed_tls_section_parses_and_is_reported_as_not_yet_available() {
    let text = SEED.replace("workers = 4", "workers = 4\n[listen.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].key, "listen.tls");
    assert!(e[0].message.contains("not available"), "{e:?}");
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = SEED.replace("port = 8081", "port = 8081\nwieght = 3");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].key, "upstreams[0].wieght");
    assert_eq!(e[0].line, 12);
    assert!(e[0].message.contains("unknown field"), "{}", e[0].message);
}

#[test]
fn unknown_section_is_an_error() {
    let e = errors(&format!("{SEED}\n[routnig]\nstrategy = \"random\"\n"));
    assert_eq!(e[0].key, "routnig");
    assert!(e[0].message.contains("unknown section"));
}

#[test]
fn wrong_type_names_key() {
    let e = errors(&SEED.replace("port = 8080", "port = \"8080\""));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].key, "listen.port");
    assert_eq!((e[0].line, e[0].column), (4, 8));
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let text = r#"
[listen]
port = 99999
mode = "htp"
[[upstreams]]
address = "127.0.0.1"
port = 0
[[upstreams]]
address = "127.0.0.1"
port = 1
wat = 1
[routing]
strategy = "fastest"
[runtime]
driver = "kqueue"
"#;
    let e = errors(text);
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    for k in ["listen.port", "listen.mode", "upstreams[0].port", "upstreams[1].wat", "routing.strategy", "runtime.driver"] {
        assert!(keys.contains(&k), "missing {k} in {keys:?}");
    }
}

#[test]
fn zero_total_weight_is_rejected() {
    let text = SEED.replace("port = 8081", "port = 8081\nweight = 0");
    let e = errors(&text);
    assert!(e.iter().any(|e| e.message.contains("total weight")), "{e:?}");
}

#[test]
fn negative_weight_is_rejected() {
    let e = errors(&SEED.replace("port = 8081", "port = 8081\nweight = -2"));
    assert_eq!(e[0].key, "upstreams[0].weight");
}

#[test]
fn unknown_strategy_lists_the_valid_ones() {
    let e = errors(&SEED.replace("\"round_robin\"", "\"roundrobin\""));
    assert_eq!(e[0].key, "routing.strategy");
    assert!(e[0].message.contains("least_connections"));
    assert_eq!(e[0].line, 14);
}

#[test]
fn http_and_tcp_need_upstreams() {
    for mode in ["http", "tcp"] {
        let e = errors(&format!("[listen]\nport = 80\nmode = \"{mode}\"\n"));
        assert!(e[0].message.contains("needs upstreams"), "{e:?}");
    }
}

#[test]
fn several_listeners_with_groups() {
    let text = r#"
[[listeners]]
name = "web"
address = "127.0.0.1"
port = 8080
[[listeners]]
name = "db"
address = "127.0.0.1:5433"
mode = "tcp"
group = "pg"
strategy = "least_connections"
[[upstreams]]
address = "10.0.0.1:80"
[[upstreams]]
address = "127.0.0.1"
port = 5432
group = "pg"
weight = 3
"#;
    let c = load_str(text, "t").unwrap();
    assert_eq!(c.listeners.len(), 2);
    let db = &c.listeners[1];
    assert_eq!(db.mode, Mode::Tcp);
    assert_eq!(db.strategy, Strategy::LeastConnections);
    assert_eq!(c.groups[db.group.unwrap()].upstreams[0].weight, 3);
    assert_eq!(c.groups[c.listeners[0].group.unwrap()].name, "default");
}

#[test]
fn unknown_group_is_rejected() {
    let e = errors(&SEED.replace("mode = \"http\"", "mode = \"http\"\ngroup = \"nope\""));
    assert_eq!(e[0].key, "listen.group");
}

#[test]
fn durations_and_hash_keys() {
    let c = load_str(&format!("{SEED}\n[timeouts]\nconnect = \"250ms\"\nclient_idle = \"2m\"\n"), "t").unwrap();
    assert_eq!(c.timeouts.connect, Duration::from_millis(250));
    assert_eq!(c.timeouts.client_idle, Duration::from_secs(120));
    let e = errors(&format!("{SEED}\n[timeouts]\nconnect = \"5 parsecs\"\n"));
    assert_eq!(e[0].key, "timeouts.connect");
    let c = load_str(&SEED.replace("\"round_robin\"", "\"hash\"\nhash_key = \"header:X-User\""), "t").unwrap();
    assert_eq!(c.listeners[0].hash_key, HashKey::Header("x-user".into()));
    let e = errors(&SEED.replace("\"round_robin\"", "\"hash\"\nhash_key = \"cookie\""));
    assert_eq!(e[0].key, "routing.hash_key");
}

#[test]
fn syntax_error_has_position() {
    let e = errors("[listen\nport = 1\n");
    assert_eq!(e[0].line, 1);
}

#[test]
fn garbage_never_panics() {
    for text in [
        "",
        "=",
        "[[listen]]\n",
        "listen = 5",
        "[listen]\nport = 1e99",
        "[[upstreams]]\n",
        "upstreams = [1,2]",
        "[listen]\nworkers = 0\nport=1\nmode=\"game\"",
        "\u{0}\u{1}",
    ] {
        let _ = load_str(text, "t");
    }
}

#[test]
fn workers_default_to_cpu_count_and_must_agree() {
    let c = load_str("[listen]\nport = 1\nmode = \"game\"\n", "t").unwrap();
    assert!(c.workers >= 1);
    let e = errors("[[listeners]]\nport = 1\nmode=\"game\"\nworkers = 2\n[[listeners]]\nport = 2\nmode=\"game\"\nworkers = 3\n");
    assert!(e[0].message.contains("shared"), "{e:?}");
}

#[test]
fn embedded_default_is_valid() {
    let c = embedded_default().unwrap();
    assert_eq!(c.listeners[0].mode, Mode::Game);
    assert!(c.api.is_some());
}

#[test]
fn mutated_configs_never_panic() {
    let mut rng = fastrand::Rng::with_seed(7);
    let base = format!("{SEED}\n[timeouts]\nconnect = \"5s\"\n[limits]\nmax_headers = 10\n[[listeners]]\nport = 1\nmode = \"tcp\"\ngroup = \"default\"\n");
    // Host names would be resolved (DNS): leave the address lines alone.
    let protected = |b: &[u8]| -> Vec<std::ops::Range<usize>> {
        (0..b.len()).filter(|&i| b[i..].starts_with(b"address")).map(|i| i..b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p)).collect()
    };
    for _ in 0..3000 {
        let mut b = base.clone().into_bytes();
        for _ in 0..rng.usize(1..5) {
            let i = rng.usize(..b.len());
            if protected(&b).iter().any(|r| r.start.saturating_sub(1) <= i && i <= r.end) {
                continue;
            }
            match rng.u8(..3) {
                0 => b[i] = *rng.choice(b"[]=\"'.,\n 0-9xz".iter()).unwrap(),
                1 => {
                    b.remove(i);
                }
                _ => b.insert(i, rng.u8(..)),
            }
        }
        let text = String::from_utf8_lossy(&b);
        let _ = load_str(&text, "fuzz.toml");
    }
}
