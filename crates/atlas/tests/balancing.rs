//! Load-balancing strategies, observed through backends that answer with
//! their own name.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `n` backends answering with their name ("b0", "b1", ...).
fn named_backends(n: usize) -> Vec<Backend> {
    (0..n).map(|i| Backend::fixed(&format!("b{i}"))).collect()
}

fn addrs(bes: &[Backend]) -> Vec<SocketAddr> {
    bes.iter().map(|b| b.addr).collect()
}

fn routing(strategy: &str) -> String {
    format!("[routing]\nstrategy = \"{strategy}\"\n")
}

/// Requests `n` times on one keep-alive connection; returns the bodies.
fn bodies_on_one_connection(atlas: &Atlas, n: usize) -> Vec<String> {
    let mut c = Client::connect(atlas.addr());
    (0..n)
        .map(|i| {
            let r = c.get(&format!("/r{i}"));
            assert_eq!(r.status, 200, "{}", r.head);
            r.text()
        })
        .collect()
}

fn tally(bodies: &[String]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for b in bodies {
        *m.entry(b.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn round_robin_is_exactly_even_across_client_connections() {
    let bes = named_backends(3);
    let atlas = Atlas::start(&http_config(&addrs(&bes), &routing("round_robin")));
    let bodies: Vec<String> = (0..30).map(|i| http_get(atlas.addr(), &format!("/c{i}")).text()).collect();
    let t = tally(&bodies);
    for name in ["b0", "b1", "b2"] {
        assert_eq!(t.get(name).copied().unwrap_or(0), 10, "round robin over 30 requests: {t:?}");
    }
}

#[test]
fn round_robin_selects_per_request_on_one_keepalive_connection() {
    let bes = named_backends(2);
    let atlas = Atlas::start(&http_config(&addrs(&bes), &routing("round_robin")));
    let bodies = bodies_on_one_connection(&atlas, 20);
    let t = tally(&bodies);
    assert_eq!((t.get("b0").copied(), t.get("b1").copied()), (Some(10), Some(10)), "{bodies:?}");
    assert!(bodies.windows(2).all(|w| w[0] != w[1]), "equal-weight round robin must alternate: {bodies:?}");
}

#[test]
fn weights_3_to_1_give_exactly_3_to_1() {
    for strategy in ["round_robin", "weighted"] {
        let bes = named_backends(2);
        let cfg = config_weighted("http", &[(bes[0].addr, 3), (bes[1].addr, 1)], &routing(strategy));
        let atlas = Atlas::start(&cfg);
        let t = tally(&bodies_on_one_connection(&atlas, 400));
        assert_eq!((t.get("b0").copied(), t.get("b1").copied()), (Some(300), Some(100)), "strategy {strategy}: {t:?}");
    }
}

#[test]
fn random_is_roughly_even() {
    let bes = named_backends(2);
    let atlas = Atlas::start(&http_config(&addrs(&bes), &routing("random")));
    let bodies = bodies_on_one_connection(&atlas, 200);
    let t = tally(&bodies);
    for name in ["b0", "b1"] {
        let n = t.get(name).copied().unwrap_or(0);
        assert!((50..=150).contains(&n), "random over 200 requests gave {t:?}");
    }
    // Not a fixed alternation either.
    assert!(bodies.windows(2).any(|w| w[0] == w[1]), "random strictly alternated over 200 requests: looks like round robin");
}

#[test]
fn least_connections_sends_more_to_the_fast_backend_under_load() {
    let slow = Backend::http(|_| Reply::ok("slow").after(Duration::from_millis(300)));
    let fast = Backend::fixed("fast");
    let atlas = Atlas::start(&http_config(&[slow.addr, fast.addr], &routing("least_connections")));
    let addr = atlas.addr();
    let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let until = Instant::now() + Duration::from_millis(800);
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let counts = counts.clone();
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                while Instant::now() < until {
                    let r = c.get("/");
                    assert_eq!(r.status, 200);
                    counts[if r.text() == "slow" { 0 } else { 1 }].fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (s, f) = (counts[0].load(Ordering::SeqCst), counts[1].load(Ordering::SeqCst));
    assert!(f > 3 * s && f >= 20, "least_connections: slow backend got {s}, fast backend got {f}");
}

#[test]
fn least_connections_avoids_the_backend_with_a_request_in_flight() {
    // `/hold/K` is answered only once `released >= K`.
    let released = Arc::new(AtomicUsize::new(0));
    let mk = |name: &'static str| {
        let released = released.clone();
        Backend::http(move |r| {
            if let Some(k) = r.target.strip_prefix("/hold/") {
                let k: usize = k.parse().unwrap();
                wait_until(Duration::from_secs(5), || released.load(Ordering::SeqCst) >= k);
            }
            Reply::ok(name)
        })
    };
    let bes = [mk("b0"), mk("b1")];
    let atlas = Atlas::start(&http_config(&addrs(&bes), &routing("least_connections")));
    let addr = atlas.addr();
    let holder = |k: usize| thread::spawn(move || http_get(addr, &format!("/hold/{k}")).text());
    let holding = |target: &str| -> usize {
        let mut at = None;
        assert!(
            wait_until(Duration::from_secs(3), || {
                at = bes.iter().position(|b| b.requests().iter().any(|r| r.target == target));
                at.is_some()
            }),
            "{target} reached no backend"
        );
        at.unwrap()
    };

    let h1 = holder(1);
    let x = holding("/hold/1");
    let y = 1 - x;
    let mut c = Client::connect(addr);
    for i in 0..10 {
        assert_eq!(c.get(&format!("/a{i}")).text(), format!("b{y}"), "request {i} went to b{x}, which has a request in flight");
    }
    // A second long request goes to the idle backend.
    let h2 = holder(2);
    assert_eq!(holding("/hold/2"), y, "second long request should go to the backend without one in flight");
    // Finish the first: now only b{y} is busy.
    released.store(1, Ordering::SeqCst);
    assert_eq!(h1.join().unwrap(), format!("b{x}"));
    for i in 0..10 {
        assert_eq!(c.get(&format!("/b{i}")).text(), format!("b{x}"), "request {i} went to b{y}, which has a request in flight");
    }
    released.store(2, Ordering::SeqCst);
    assert_eq!(h2.join().unwrap(), format!("b{y}"));
}

#[test]
fn hash_on_header_pins_each_user_to_one_backend() {
    let bes = named_backends(3);
    let extra = "[routing]\nstrategy = \"hash\"\nhash_key = \"header:X-User\"\n";
    let atlas = Atlas::start(&http_config(&addrs(&bes), extra));
    let mut seen: HashMap<String, String> = HashMap::new();
    // Several rounds interleaving users on one keep-alive connection, plus
    // one fresh connection per user.
    let mut c = Client::connect(atlas.addr());
    for round in 0..3 {
        for u in 0..30 {
            let user = format!("user-{u}");
            let req = format!("GET /p{round} HTTP/1.1\r\nHost: h\r\nX-User: {user}\r\n\r\n");
            let got = if round == 1 { one_shot(atlas.addr(), &req).text() } else { c.request(&req).text() };
            match seen.get(&user) {
                None => {
                    seen.insert(user, got);
                }
                Some(prev) => assert_eq!(prev, &got, "{user} moved from {prev} to {got} in round {round}"),
            }
        }
    }
    let used: std::collections::HashSet<&String> = seen.values().collect();
    assert!(used.len() > 1, "30 users all hashed to {used:?}");
}

#[test]
fn zero_weight_upstream_never_receives_a_request() {
    for strategy in ["round_robin", "random", "least_connections", "hash"] {
        let bes = named_backends(3);
        let ups = [(bes[0].addr, 1), (bes[1].addr, 0), (bes[2].addr, 1)];
        let extra = format!("[routing]\nstrategy = \"{strategy}\"\nhash_key = \"header:X-User\"\n");
        let atlas = Atlas::start(&config_weighted("http", &ups, &extra));
        let mut c = Client::connect(atlas.addr());
        for i in 0..40 {
            let r = c.request(format!("GET /z{i} HTTP/1.1\r\nHost: h\r\nX-User: u{i}\r\n\r\n"));
            assert_eq!(r.status, 200);
            assert_ne!(r.text(), "b1", "strategy {strategy}: request {i} reached the weight-0 upstream");
        }
        assert_eq!(bes[1].connections(), 0, "strategy {strategy}: weight-0 upstream was connected to");
        if strategy != "hash" {
            assert!(bes[0].request_count() > 0 && bes[2].request_count() > 0, "strategy {strategy}: both weighted upstreams should serve");
        }
    }
}
