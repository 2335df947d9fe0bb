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

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("atlas-config-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn seed_tls_section_with_missing_files_names_cert_and_key() {
    let text = SEED.replace("workers = 4", "workers = 4\n[listen.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"");
    let e = errors(&text);
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!((e[0].key.as_str(), e[0].line), ("listen.tls.cert", 8));
    assert_eq!((e[1].key.as_str(), e[1].line), ("listen.tls.key", 9));
}

#[test]
fn tls_files_are_checked_for_pem_content() {
    let dir = temp_dir("tls");
    let ck = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
    let (cert, key, junk) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("junk.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(&junk, "not pem at all\n").unwrap();
    let tls = |c: &std::path::Path, k: &std::path::Path| {
        SEED.to_string().replace(
            "workers = 4",
            &format!(
                "workers = 4\n[listen.tls]\ncert = {:?}\nkey = {:?}\n[[listen.tls.sni]]\nnames = [\"a.test\", \"*.b.test\"]\ncert = {:?}\nkey = {:?}",
                c, k, c, k
            ),
        )
    };
    let c = load_str(&tls(&cert, &key), "t").unwrap();
    let t = c.listeners[0].tls.as_ref().unwrap();
    assert_eq!(t.sni[0].names, vec!["a.test", "*.b.test"]);
    assert!(t.default.origin.starts_with("t:7:1: listen.tls"), "{}", t.default.origin);
    let e = errors(&tls(&junk, &junk));
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"listen.tls.cert") && keys.contains(&"listen.tls.key"), "{e:?}");
    assert!(keys.contains(&"listen.tls.sni[0].cert"), "{e:?}");
    let e = errors(&tls(&key, &cert));
    assert!(e.iter().any(|e| e.key == "listen.tls.cert" && e.message.contains("no CERTIFICATE")), "{e:?}");
    assert!(e.iter().any(|e| e.key == "listen.tls.key" && e.message.contains("private key")), "{e:?}");
}

#[test]
fn static_mode_routes_and_settings() {
    let dir = temp_dir("static");
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    let root = dir.display();
    let text = format!(
        "[[listeners]]\nname = \"site\"\nport = 0\nmode = \"static\"\nroot = \"{root}\"\n\n[[listeners]]\nname = \"web\"\nport = 0\n\n[[upstreams]]\naddress = \"127.0.0.1:9\"\n[[upstreams]]\naddress = \"127.0.0.1:10\"\ngroup = \"api\"\n\n[[routes]]\nlistener = \"web\"\nprefix = \"/static/\"\nstatic_root = \"{root}/assets\"\nstrip_prefix = true\n\n[[routes]]\nprefix = \"/api/\"\ngroup = \"api\"\n\n[static_files]\ncache_max_bytes = 1000\nrevalidate = \"50ms\"\n"
    );
    let c = load_str(&text, "t").unwrap();
    let site = &c.listeners[0];
    assert_eq!(site.mode, Mode::Static);
    assert_eq!(site.static_root.as_deref(), Some(std::fs::canonicalize(&dir).unwrap().as_path()));
    assert_eq!(site.routes.len(), 1, "the unnamed /api/ route applies to every http listener");
    let web = &c.listeners[1];
    assert_eq!(web.routes.len(), 2);
    assert_eq!(web.routes[0].prefix, "/static/", "longest prefix first");
    assert!(matches!(&web.routes[0].target, RouteTarget::Static { strip_prefix: true, .. }));
    assert_eq!(web.routes[1].target, RouteTarget::Group(1));
    assert_eq!(c.static_files.cache_max_bytes, 1000);
    assert_eq!(c.static_files.revalidate, Duration::from_millis(50));

    let e = errors("[listen]\nport = 0\nmode = \"static\"\n");
    assert!(e[0].message.contains("needs a root"), "{e:?}");
    let e = errors("[listen]\nport = 0\nmode = \"static\"\nroot = \"/nonexistent/atlas\"\n");
    assert_eq!(e[0].key, "listen.root");
    let e = errors(&format!("[listen]\nport = 0\nmode = \"static\"\nroot = \"{root}\"\n[[routes]]\nprefix = \"x\"\ngroup = \"g\"\n[[routes]]\nprefix = \"/a\"\n[[routes]]\nprefix = \"/b\"\ngroup = \"nope\"\nlistener = \"default\"\n"));
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, vec!["routes[0].prefix", "routes[1]", "routes[2].group"], "{e:?}");
}

#[test]
fn seed_static_root_need_not_exist_in_http_mode() {
    let c = load_str(SEED, "seed").unwrap();
    assert_eq!(c.static_root.as_deref(), Some(std::path::Path::new("/var/www/html")));
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
    for _ in 0..3000 {
        let mut b = base.clone().into_bytes();
        for _ in 0..rng.usize(1..5) {
            let i = rng.usize(..b.len());
            match rng.u8(..3) {
                0 => b[i] = *rng.choice(b"[]=\"'.,\n 0-9xz".iter()).unwrap(),
                1 => {
                    b.remove(i);
                }
                _ => b.insert(i, rng.u8(..)),
            }
        }
        let text = String::from_utf8_lossy(&b);
        // Offline: a mutated address must not send the test to DNS.
        let _ = load_str_offline(&text, "fuzz.toml");
    }
}
