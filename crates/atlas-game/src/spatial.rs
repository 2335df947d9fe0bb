//! Region geometry and routing decisions (pure): which server holds a
//! point, when a player should move (with hysteresis so a player on a
//! border does not flap), which grid region an uncovered point falls in,
//! and where a player is predicted to be from its last two positions.

use std::sync::Arc;
use std::time::Instant;

use crate::position::Point;
use crate::registry::{Server, Status, World};

/// Whether `p` lies in `s`'s cube grown by `margin` on every side.
pub fn contains(s: &Server, p: Point, margin: f64) -> bool {
    let r = s.bounds + margin;
    (p.x - s.center.x).abs() <= r && (p.y - s.center.y).abs() <= r && (p.z - s.center.z).abs() <= r
}

/// Distance from `p` to `s`'s cube (0 inside).
pub fn distance(s: &Server, p: Point) -> f64 {
    let d = |v: f64, c: f64| ((v - c).abs() - s.bounds).max(0.0);
    let (dx, dy, dz) = (d(p.x, s.center.x), d(p.y, s.center.y), d(p.z, s.center.z));
    (dx * dx + dy * dy + dz * dz).sqrt()
}

/// A server that can take new players.
pub fn open(s: &Server) -> bool {
    s.status == Status::Up && s.accepting
}

fn fill(s: &Server) -> f64 {
    s.players() as f64 / f64::from(s.capacity.max(1))
}

/// Where a player at `p` goes: among open servers, the least-filled one
/// whose region contains the point; else the nearest one. `.1` is true
/// when no server contains the point (an auto-scale candidate).
pub fn route(world: &World, p: Point, exclude: Option<&str>) -> Option<(Arc<Server>, bool)> {
    let candidates = || world.servers.iter().filter(|s| open(s) && Some(s.id.as_str()) != exclude);
    let inside = candidates().filter(|s| contains(s, p, 0.0)).min_by(|a, b| fill(a).total_cmp(&fill(b)));
    if let Some(s) = inside {
        return Some((s.clone(), false));
    }
    nearest_open(world, p, exclude.as_slice()).map(|s| (s, true))
}

/// The open server nearest to `p`, skipping the ids in `exclude`.
pub fn nearest_open(world: &World, p: Point, exclude: &[&str]) -> Option<Arc<Server>> {
    world.servers.iter().filter(|s| open(s) && !exclude.contains(&s.id.as_str())).min_by(|a, b| distance(a, p).total_cmp(&distance(b, p))).cloned()
}

/// Where a player without a known position starts: the least-filled open server.
pub fn spawn(world: &World) -> Option<Arc<Server>> {
    world.servers.iter().filter(|s| open(s)).min_by(|a, b| fill(a).total_cmp(&fill(b))).cloned()
}

/// Whether a player at `p` on `current` should move, and where to. It
/// stays while `current` is open and `p` is within its cube grown by
/// `hysteresis`; it also stays when no server contains `p` and `current`
/// is already the nearest.
pub fn decide(world: &World, current: &Server, p: Point, hysteresis: f64) -> Option<Arc<Server>> {
    let live = world.servers.iter().find(|s| s.id == current.id);
    let usable = live.is_some_and(|s| open(s) || s.status == Status::Up);
    if usable && live.is_some_and(|s| s.status == Status::Up) && contains(current, p, hysteresis) {
        return None;
    }
    let (best, uncovered) = route(world, p, None)?;
    if best.id == current.id {
        return None;
    }
    if uncovered && usable && distance(&best, p) >= distance(current, p) {
        return None;
    }
    Some(best)
}

/// The grid cell of `p` for regions of `size` units (Horizon's
/// `region_coord`: cell (0,0,0) spans 0..size on every axis).
pub fn region_of(p: Point, size: f64) -> [i64; 3] {
    let c = |v: f64| (v / size).floor().clamp(i64::MIN as f64, i64::MAX as f64) as i64;
    [c(p.x), c(p.y), c(p.z)]
}

/// The centre of grid cell `r`.
pub fn region_center(r: [i64; 3], size: f64) -> Point {
    let c = |i: i64| (i as f64 + 0.5) * size;
    Point { x: c(r[0]), y: c(r[1]), z: c(r[2]) }
}

/// The last two positions of a player, for its velocity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Motion {
    last: Option<(Point, Instant)>,
    velocity: Option<Point>,
}

/// Time constant of the velocity smoothing: jitter between position
/// updates (client send timing, network) averages out over about this long.
const VELOCITY_TAU: f64 = 0.2;
/// Least weight of a new sample, so a player sending many updates a
/// second still turns in the estimate within a few of them.
const VELOCITY_MIN_WEIGHT: f64 = 0.3;

impl Motion {
    pub fn record(&mut self, p: Point, at: Instant) {
        if let Some((q, t)) = self.last {
            let dt = at.saturating_duration_since(t).as_secs_f64();
            if dt > 1e-4 {
                let now = Point { x: (p.x - q.x) / dt, y: (p.y - q.y) / dt, z: (p.z - q.z) / dt };
                // Exponential smoothing weighted by the time between samples;
                // after a long pause the new velocity stands alone.
                self.velocity = Some(match self.velocity {
                    Some(v) if dt < 1.0 => {
                        let a = (1.0 - (-dt / VELOCITY_TAU).exp()).max(VELOCITY_MIN_WEIGHT);
                        Point { x: v.x + a * (now.x - v.x), y: v.y + a * (now.y - v.y), z: v.z + a * (now.z - v.z) }
                    }
                    _ => now,
                });
            }
        }
        self.last = Some((p, at));
    }

    /// Units per second, once two positions were seen.
    pub fn velocity(&self) -> Option<Point> {
        self.velocity
    }

    /// Where the player will be `secs` after its last position, at its velocity.
    pub fn predict(&self, secs: f64) -> Option<Point> {
        let ((p, _), v) = (self.last?, self.velocity?);
        Some(Point { x: p.x + v.x * secs, y: p.y + v.y * secs, z: p.z + v.z * secs })
    }
}

/// Predictive pre-connect: the server whose connection should be warm for
/// a player on `current` moving as `m`, or `None` (close any). A crossing
/// predicted within `horizon` opens one; a warm one (`warm`) is kept while
/// the player would still reach that server within 1.5 x `horizon`, so a
/// player slowing near the threshold does not open and close connections
/// on every update; it goes when the player turns away.
pub fn warm_target(world: &World, current: &Server, m: &Motion, horizon: f64, hysteresis: f64, warm: Option<&str>) -> Option<Arc<Server>> {
    let ahead = |secs: f64| m.predict(secs).and_then(|f| decide(world, current, f, hysteresis));
    match ahead(horizon) {
        Some(t) => Some(t),
        None => ahead(horizon * 1.5).filter(|t| Some(t.id.as_str()) == warm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::test_server;

    fn pt(x: f64, y: f64) -> Point {
        Point { x, y, z: 500.0 }
    }

    fn world() -> World {
        World { version: 1, servers: vec![Arc::new(test_server("a", [0, 0, 0], 1000.0)), Arc::new(test_server("b", [1, 0, 0], 1000.0))] }
    }

    #[test]
    fn routes_to_the_containing_region_else_the_nearest() {
        let w = world();
        assert_eq!(route(&w, pt(100.0, 100.0), None).map(|(s, u)| (s.id.clone(), u)), Some(("a".into(), false)));
        assert_eq!(route(&w, pt(1500.0, 100.0), None).map(|(s, u)| (s.id.clone(), u)), Some(("b".into(), false)));
        assert_eq!(route(&w, pt(5000.0, 100.0), None).map(|(s, u)| (s.id.clone(), u)), Some(("b".into(), true)));
        assert_eq!(route(&w, pt(-5000.0, 100.0), None).map(|(s, u)| (s.id.clone(), u)), Some(("a".into(), true)));
        assert!(route(&w, pt(100.0, 100.0), Some("a")).is_some_and(|(s, _)| s.id == "b"));
    }

    #[test]
    fn hysteresis_keeps_a_player_on_the_border() {
        let w = world();
        let a = w.servers[0].clone();
        assert!(decide(&w, &a, pt(1005.0, 100.0), 10.0).is_none(), "5 units over the border: stays");
        assert_eq!(decide(&w, &a, pt(1011.0, 100.0), 10.0).map(|s| s.id.clone()), Some("b".into()));
        let b = w.servers[1].clone();
        assert!(decide(&w, &b, pt(995.0, 100.0), 10.0).is_none());
        assert_eq!(decide(&w, &b, pt(989.0, 100.0), 10.0).map(|s| s.id.clone()), Some("a".into()));
        // Uncovered and already on the nearest: stays.
        assert!(decide(&w, &b, pt(9000.0, 100.0), 10.0).is_none());
    }

    #[test]
    fn down_server_moves_its_players() {
        let mut w = world();
        let a = w.servers[0].clone();
        let mut down = test_server("a", [0, 0, 0], 1000.0);
        down.status = Status::Down;
        w.servers[0] = Arc::new(down);
        assert_eq!(decide(&w, &a, pt(100.0, 100.0), 10.0).map(|s| s.id.clone()), Some("b".into()));
    }

    #[test]
    fn regions_and_prediction() {
        assert_eq!(region_of(pt(-1.0, 999.0), 1000.0), [-1, 0, 0]);
        assert_eq!(region_center([1, 0, 0], 1000.0), Point { x: 1500.0, y: 500.0, z: 500.0 });
        let mut m = Motion::default();
        let t = Instant::now();
        m.record(pt(0.0, 0.0), t);
        assert!(m.predict(1.0).is_none());
        m.record(pt(10.0, 0.0), t + std::time::Duration::from_millis(100));
        let p = m.predict(0.5).unwrap();
        assert!((p.x - 60.0).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn velocity_is_smoothed_over_jittery_updates() {
        // 100 units/s along x, sampled every 50 ms, each position off by +-2.
        let t0 = Instant::now();
        let mut m = Motion::default();
        let (mut raw_worst, mut worst): (f64, f64) = (0.0, 0.0);
        let mut prev: Option<(f64, f64)> = None;
        for i in 0..40u64 {
            let secs = i as f64 * 0.05;
            let x = secs * 100.0 + if i % 2 == 0 { 2.0 } else { -2.0 };
            m.record(pt(x, 0.0), t0 + std::time::Duration::from_secs_f64(secs));
            if let Some((px, ps)) = prev {
                raw_worst = raw_worst.max(((x - px) / (secs - ps) - 100.0).abs());
            }
            prev = Some((x, secs));
            if i >= 10 {
                worst = worst.max((m.velocity().unwrap().x - 100.0).abs());
            }
        }
        assert!(raw_worst >= 79.0, "raw velocity swings by 80 u/s: {raw_worst}");
        assert!(worst < raw_worst / 3.0, "smoothed swing {worst} vs raw {raw_worst}");
        // Many updates a second: a turn shows within a few samples.
        let mut f = Motion::default();
        for i in 0..20u64 {
            f.record(pt(i as f64, 0.0), t0 + std::time::Duration::from_millis(i));
        }
        assert!((f.velocity().unwrap().x - 1000.0).abs() < 1e-6);
        for k in 1..=4u64 {
            f.record(pt(19.0 - k as f64, 0.0), t0 + std::time::Duration::from_millis(19 + k));
        }
        assert!(f.velocity().unwrap().x < 0.0, "turned: {:?}", f.velocity());
        // After a long pause the new velocity stands alone.
        m.record(pt(2000.0, 0.0), t0 + std::time::Duration::from_secs(10));
        m.record(pt(2000.0, 0.0), t0 + std::time::Duration::from_secs(12));
        assert_eq!(m.velocity().unwrap().x, 0.0);
    }

    #[test]
    fn a_warm_connection_survives_slowing_near_the_threshold_but_not_turning_back() {
        let w = world();
        let a = w.servers[0].clone();
        let t0 = Instant::now();
        let at = |m: &mut Motion, x: f64, ms: u64| m.record(pt(x, 100.0), t0 + std::time::Duration::from_millis(ms));
        let b = |t: Option<Arc<Server>>| t.map(|s| s.id.clone());
        // 100 u/s towards the border at 1000 (hysteresis 5), horizon 0.5 s.
        let mut m = Motion::default();
        for i in 0..6u64 {
            at(&mut m, 900.0 + 10.0 * i as f64, 100 * i);
        }
        assert!(warm_target(&w, &a, &m, 0.5, 5.0, None).is_none(), "1000 predicted: no crossing yet");
        at(&mut m, 960.0, 600);
        assert_eq!(b(warm_target(&w, &a, &m, 0.5, 5.0, None)), Some("b".into()), "1010 predicted: open b");
        // Slowing to 40 u/s: for a while the 0.5 s prediction stops short of
        // the border (a fresh prediction would not open b, a plain one would
        // close it) but 0.75 s still gets there: b stays warm throughout.
        for k in 1..=5u64 {
            at(&mut m, 960.0 + 4.0 * k as f64, 600 + 100 * k);
            assert!(decide(&w, &a, m.predict(0.5).unwrap(), 5.0).is_none(), "sample {k}");
            assert!(warm_target(&w, &a, &m, 0.5, 5.0, None).is_none(), "sample {k}");
            assert_eq!(b(warm_target(&w, &a, &m, 0.5, 5.0, Some("b"))), Some("b".into()), "sample {k}");
        }
        // Turning back: closed.
        for (i, x) in [970.0, 955.0, 940.0, 925.0].iter().enumerate() {
            at(&mut m, *x, 1200 + 100 * i as u64);
        }
        assert!(warm_target(&w, &a, &m, 0.5, 5.0, Some("b")).is_none());
    }
}
