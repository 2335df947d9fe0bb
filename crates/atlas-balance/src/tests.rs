//! Strategy unit tests: distributions, weights, least-in-flight across
//! workers, consistent-hash stability and exclusion on retry.

use super::*;
use atlas_config::Upstream;
use std::sync::Arc;

fn group(weights: &[u32]) -> GroupShared {
    let upstreams = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Upstream {
            name: format!("u{i}"),
            host: "127.0.0.1".into(),
            port: 1000 + i as u16,
            addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
            weight: w,
            max_conns: 0,
            tls: None,
        })
        .collect();
    GroupShared::new(&Group { name: "g".into(), upstreams }, 2)
}

fn counts(p: &mut Picker, g: &GroupShared, n: usize) -> Vec<usize> {
    let mut c = vec![0; g.len()];
    for i in 0..n {
        c[p.pick(g, hash64(&i.to_le_bytes()), 0).unwrap()] += 1;
    }
    c
}

#[test]
fn round_robin_is_exactly_even() {
    let g = group(&[1, 1, 1]);
    let mut p = Picker::new(Strategy::RoundRobin, &g, 7);
    assert_eq!(counts(&mut p, &g, 300), vec![100, 100, 100]);
}

#[test]
fn weighted_round_robin_follows_weights_smoothly() {
    let g = group(&[5, 1, 1]);
    let mut p = Picker::new(Strategy::RoundRobin, &g, 0);
    let seq: Vec<usize> = (0..7).map(|_| p.pick(&g, 0, 0).unwrap()).collect();
    // nginx's smooth WRR for {5,1,1}: a a b a c a a
    assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    assert_eq!(counts(&mut p, &g, 700), vec![500, 100, 100]);
}

#[test]
fn zero_weight_is_never_picked() {
    let g = group(&[0, 1, 2]);
    for s in [Strategy::RoundRobin, Strategy::Random, Strategy::LeastConnections, Strategy::Hash] {
        let mut p = Picker::new(s, &g, 1);
        assert_eq!(counts(&mut p, &g, 1000)[0], 0, "{s:?}");
    }
}

#[test]
fn random_is_roughly_weighted() {
    let g = group(&[1, 3]);
    let mut p = Picker::new(Strategy::Random, &g, 42);
    let c = counts(&mut p, &g, 40_000);
    let share = c[1] as f64 / 40_000.0;
    assert!((0.72..0.78).contains(&share), "{c:?}");
    let g = group(&[1, 1, 1, 1]);
    let mut p = Picker::new(Strategy::Random, &g, 42);
    for c in counts(&mut p, &g, 40_000) {
        assert!((9_000..11_000).contains(&c));
    }
}

#[test]
fn least_connections_sees_other_workers_in_flight() {
    let g = group(&[1, 1, 1]);
    // Worker 1 has 5 in flight on u0 and 2 on u1; worker 0 picks for itself.
    g.inflight.add(1, 0, 5);
    g.inflight.add(1, 1, 2);
    let mut p = Picker::new(Strategy::LeastConnections, &g, 0);
    assert_eq!(p.pick(&g, 0, 0), Some(2));
    g.inflight.add(0, 2, 3);
    assert_eq!(p.pick(&g, 0, 0), Some(1));
    assert_eq!(g.inflight.total(2), 3);
    g.inflight.add(0, 2, -3);
    assert_eq!(g.inflight.total(2), 0);
}

#[test]
fn least_connections_spreads_ties() {
    let g = group(&[1, 1, 1]);
    let mut p = Picker::new(Strategy::LeastConnections, &g, 0);
    let c = counts(&mut p, &g, 300);
    assert_eq!(c, vec![100, 100, 100]);
}

#[test]
fn least_connections_respects_weight() {
    let g = group(&[1, 3]);
    g.inflight.add(0, 0, 1);
    g.inflight.add(0, 1, 2);
    // 1/1 vs 2/3: u1 is less loaded relative to its weight.
    let mut p = Picker::new(Strategy::LeastConnections, &g, 0);
    assert_eq!(p.pick(&g, 0, 0), Some(1));
}

#[test]
fn hash_is_stable_and_consistent() {
    let g = group(&[1, 1, 1, 1]);
    let mut p = Picker::new(Strategy::Hash, &g, 3);
    let before: Vec<usize> = (0..1000u32).map(|k| p.pick(&g, hash64(&k.to_le_bytes()), 0).unwrap()).collect();
    let mut p2 = Picker::new(Strategy::Hash, &g, 99);
    let again: Vec<usize> = (0..1000u32).map(|k| p2.pick(&g, hash64(&k.to_le_bytes()), 0).unwrap()).collect();
    assert_eq!(before, again, "same key, same upstream, whatever the worker");
    for u in 0..4 {
        let n = before.iter().filter(|&&x| x == u).count();
        assert!((150..350).contains(&n), "share of u{u}: {n}");
    }
    // Removing u3 moves only u3's keys.
    let g3 = group(&[1, 1, 1]);
    let mut p3 = Picker::new(Strategy::Hash, &g3, 3);
    for k in 0..1000u32 {
        let now = p3.pick(&g3, hash64(&k.to_le_bytes()), 0).unwrap();
        if before[k as usize] != 3 {
            assert_eq!(now, before[k as usize], "key {k} moved");
        }
    }
}

#[test]
fn exclude_picks_another() {
    let g = group(&[1, 1]);
    for s in [Strategy::RoundRobin, Strategy::Random, Strategy::LeastConnections, Strategy::Hash] {
        let mut p = Picker::new(s, &g, 5);
        for k in 0..50u64 {
            assert_eq!(p.pick(&g, hash64(&k.to_le_bytes()), 1), Some(1), "{s:?}");
        }
    }
    let g1 = group(&[1]);
    let mut p = Picker::new(Strategy::RoundRobin, &g1, 0);
    assert_eq!(p.pick(&g1, 0, 1), None);
}

#[test]
fn hash64_is_frozen() {
    const FROZEN: u64 = 0x440a_50ce_fea4_ffd6;
    // Several Atlas instances must agree: this value may never change.

    assert_ne!(hash64(b"10.0.0.1"), hash64(b"10.0.0.2"));
    assert_eq!(hash64(b"atlas"), FROZEN);
}

#[test]
fn reload_carries_in_flight_counts_of_remaining_upstreams() {
    let old = Arc::new(group(&[1, 1]));
    old.inflight.add(0, 1, 4);
    // New config: u1 stays (same name and address), u0 is gone, u9 is new.
    let mut g = Group { name: "g".into(), upstreams: Vec::new() };
    for (name, port) in [("u1", 1001u16), ("u9", 1009)] {
        g.upstreams.push(Upstream {
            name: name.into(),
            host: "127.0.0.1".into(),
            port,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            weight: 1,
            max_conns: 0,
            tls: None,
        });
    }
    let new = GroupShared::carrying(&g, 2, std::slice::from_ref(&old));
    assert_eq!(new.inflight.total(0), 4, "u1's requests in flight are still counted");
    assert_eq!(new.inflight.total(1), 0);
    // A request that started before the reload finishes on the old table...
    old.inflight.add(0, 1, -1);
    // ...and the new configuration sees it end.
    assert_eq!(new.inflight.total(0), 3);
    let mut p = Picker::new(Strategy::LeastConnections, &new, 0);
    assert_eq!(p.pick(&new, 0, 0), Some(1), "least_connections avoids the busy carried-over upstream");
}

#[test]
fn unhealthy_upstreams_are_skipped_by_every_strategy() {
    let g = group(&[1, 2, 1]);
    assert!(g.inflight.counters(1).set_healthy(false));
    assert!(!g.inflight.counters(1).set_healthy(false), "no transition the second time");
    for s in [Strategy::RoundRobin, Strategy::Random, Strategy::LeastConnections, Strategy::Hash] {
        let mut p = Picker::new(s, &g, 2);
        let c = counts(&mut p, &g, 600);
        assert_eq!(c[1], 0, "{s:?}: {c:?}");
        assert!(c[0] > 0 && c[2] > 0, "{s:?}: {c:?}");
    }
    // Smooth WRR stays exact over the healthy ones.
    let mut p = Picker::new(Strategy::RoundRobin, &g, 0);
    assert_eq!(counts(&mut p, &g, 400), vec![200, 0, 200]);
    for i in 0..3 {
        g.inflight.counters(i).set_healthy(false);
    }
    let mut p = Picker::new(Strategy::RoundRobin, &g, 0);
    assert_eq!(p.pick(&g, 0, 0), None, "all down: nothing to pick");
}

#[test]
fn drained_upstreams_are_skipped_and_come_back() {
    let g = group(&[1, 1]);
    assert!(g.inflight.counters(0).set_drained(true));
    assert!(g.inflight.counters(0).is_healthy() && g.inflight.counters(0).is_drained());
    let mut p = Picker::new(Strategy::RoundRobin, &g, 0);
    assert_eq!(counts(&mut p, &g, 10), vec![0, 10]);
    g.inflight.counters(0).set_healthy(false);
    assert!(g.inflight.counters(0).set_drained(false));
    assert!(!g.inflight.counters(0).is_usable(), "still down");
    g.inflight.counters(0).set_healthy(true);
    assert_eq!(counts(&mut p, &g, 10), vec![5, 5]);
}
