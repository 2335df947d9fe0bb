//! One timer per worker for all its sessions (not one per session, so
//! 9000 idle players cost one wake-up every 100 ms, not 9000): a changed
//! registry (server down, drained, unregistered), operator transfers,
//! keepalive pings, idle timeouts, stale pre-connects and process drain.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use atlas_proxy::drain::Drain;

use super::{own_frame, Reason, Session};
use crate::registry::registry;
use crate::spatial;
use crate::ws::frame::Opcode;

const TICK: Duration = Duration::from_millis(100);

thread_local! {
    static SESSIONS: RefCell<Vec<Weak<Session>>> = const { RefCell::new(Vec::new()) };
    static RUNNING: Cell<bool> = const { Cell::new(false) };
}

/// Puts a session under this worker's ticker (started on first use).
pub(super) fn track(s: &Rc<Session>) {
    SESSIONS.with(|l| l.borrow_mut().push(Rc::downgrade(s)));
    if !RUNNING.with(|r| r.replace(true)) {
        monoio::spawn(run());
    }
}

async fn run() {
    let drain = Drain::current();
    loop {
        monoio::time::sleep(TICK).await;
        let live: Vec<Rc<Session>> = SESSIONS.with(|l| {
            let mut l = l.borrow_mut();
            l.retain(|w| w.strong_count() > 0);
            l.iter().filter_map(Weak::upgrade).collect()
        });
        if live.is_empty() && drain.is_draining() {
            break;
        }
        let world_version = registry().world().version;
        let settings = registry().settings();
        let now = Instant::now();
        for s in live {
            if s.closing.get() {
                continue;
            }
            if drain.is_draining() {
                // Going away: tell the client (it reconnects elsewhere).
                s.fail(1001, "gateway restarting");
                continue;
            }
            if !std::sync::Arc::ptr_eq(&s.settings.borrow(), &settings) {
                *s.settings.borrow_mut() = settings.clone();
            }
            // Operator transfer.
            if s.player.forced.swap(false, Ordering::Acquire) {
                let target = s.player.force.lock().ok().and_then(|mut f| f.take());
                let world = registry().world();
                if let Some(t) = target.and_then(|id| world.get(&id).cloned()) {
                    if t.id != s.server.borrow().id {
                        s.start_transfer(t, Reason::Forced);
                    }
                }
            }
            // A room session follows its room.
            if s.room.is_some() {
                s.follow_room();
            } else if s.world_version.get() != world_version && !s.transferring.get() {
                // The fleet changed: is the player's server still usable?
                s.world_version.set(world_version);
                let current = s.server.borrow().clone();
                let world = registry().world();
                let usable = world.get(&current.id).is_some_and(|x| spatial::open(x) || x.status == crate::registry::Status::Up);
                if !usable {
                    let p = s.last_pos.get().unwrap_or(current.center);
                    if let Some((t, _)) = spatial::route(&world, p, Some(&current.id)) {
                        s.start_transfer(t, Reason::Moved);
                    }
                } else if let Some(p) = s.last_pos.get() {
                    s.reconsider(p, Reason::Crossed);
                }
            }
            // A pre-connect nobody used.
            let stale = s.warm.borrow().as_ref().is_some_and(|w| now.duration_since(w.at) > settings.spatial.predict_horizon * 4 + Duration::from_secs(1));
            if stale {
                s.cancel_warm();
            }
            // Keepalive and idle.
            let quiet = now.duration_since(s.last_in.get().max(s.last_out.get()));
            if quiet >= settings.spatial.idle_timeout {
                tracing::debug!(player = %s.player.id, "client: idle timeout");
                s.fail(1001, "idle timeout");
                continue;
            }
            let ping = settings.spatial.ping_interval;
            if !ping.is_zero() && now.duration_since(s.last_out.get()) >= ping && !s.pinged.get() && s.try_send_client(own_frame(Opcode::Ping, b"atlas", false))
            {
                s.pinged.set(true);
            }
        }
    }
    RUNNING.with(|r| r.set(false));
}
