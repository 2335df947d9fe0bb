//! Graceful drain, per worker: a signal that stops accept loops and wakes
//! idle keep-alive connections, and a count of live connections the worker
//! waits on before it exits.
//!
//! Everything here is thread-local (one worker = one thread): no lock and no
//! atomic on the per-request path. Waits use monoio's cancelable operations
//! (accept, the idle keep-alive read of plain and TLS connections), all
//! tied to one canceller per worker, so a connection (or a request) that
//! arrives at the very moment of the drain is still delivered and served
//! rather than lost with a dropped operation.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use monoio::io::{CancelHandle, Canceller};

/// Slots reused through a free list: O(1) insert and remove, so registering
/// a waiter for the drain's start costs no hashing or scanning.
struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { slots: Vec::new(), free: Vec::new() }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, v: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(v);
                i
            }
            None => {
                self.slots.push(Some(v));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.slots.get_mut(i)?.take();
        if v.is_some() {
            self.free.push(i);
        }
        v
    }

    fn replace(&mut self, i: usize, v: T) {
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Some(v);
        }
    }

    fn take_all(&mut self) -> Vec<T> {
        self.free.clear();
        self.slots.drain(..).flatten().collect()
    }
}

/// Set (once) by the signal thread or a takeover; each worker's
/// housekeeping task notices it within its tick and starts its own drain.
static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks every worker of this process to drain.
pub fn request_process_drain() {
    REQUESTED.store(true, Ordering::SeqCst);
}

pub fn process_drain_requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

struct Inner {
    wakers: RefCell<Slab<Waker>>,
    /// One canceller for every wait of this worker (idle keep-alive reads,
    /// accepts): operations associate with it and leave it as they finish.
    /// One per worker rather than one per wait, because monoio's
    /// `Canceller::new` allocates an `Rc` and a `HashSet` each time: about
    /// 8 % of a keep-alive static request's instructions (benches/RESULTS.md).
    /// `None` once the drain has fired it: that is what "draining" means.
    canceller: RefCell<Option<Canceller>>,
    /// Client connections open on this worker.
    live: Cell<usize>,
    /// Other work the drain must wait for (accept loops finishing their
    /// canceled accept, connections accepted but not yet running).
    holds: Cell<usize>,
    /// Woken when `live` drops to zero while draining (only the worker's
    /// own drain task waits here).
    idle_wakers: RefCell<Vec<Waker>>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            wakers: RefCell::default(),
            canceller: RefCell::new(Some(Canceller::new())),
            live: Cell::new(0),
            holds: Cell::new(0),
            idle_wakers: RefCell::default(),
        }
    }
}

/// A worker's drain state. Cheap to clone (an `Rc`).
#[derive(Clone, Default)]
pub struct Drain(Rc<Inner>);

thread_local! {
    static CURRENT: Drain = Drain::default();
}

impl Drain {
    /// This worker thread's drain state.
    pub fn current() -> Drain {
        CURRENT.with(Drain::clone)
    }

    pub fn is_draining(&self) -> bool {
        self.0.canceller.borrow().is_none()
    }

    /// Starts draining: cancels registered waits and wakes waiters.
    pub fn start(&self) {
        let Some(c) = self.0.canceller.borrow_mut().take() else {
            return;
        };
        let _ = c.cancel();
        let wakers = self.0.wakers.borrow_mut().take_all();
        for w in wakers {
            w.wake();
        }
        self.wake_if_idle();
    }

    /// A handle for a cancelable operation that the drain must interrupt,
    /// or `None` when the drain has already started (the caller then does
    /// not wait at all). An operation that completed before the cancel
    /// reaches it keeps its result, so nothing that raced the drain is lost.
    pub fn cancel_handle(&self) -> Option<CancelHandle> {
        self.0.canceller.borrow().as_ref().map(Canceller::handle)
    }

    /// Resolves when the drain starts.
    pub fn started(&self) -> Started {
        Started { drain: self.clone(), slot: None }
    }

    /// Counts a client connection as live until the guard drops.
    pub fn connection(&self) -> LiveGuard {
        self.0.live.set(self.0.live.get() + 1);
        LiveGuard(self.clone())
    }

    pub fn live(&self) -> usize {
        self.0.live.get()
    }

    /// Keeps the worker from finishing its drain while the guard lives,
    /// without counting as a client connection.
    pub fn hold(&self) -> HoldGuard {
        self.0.holds.set(self.0.holds.get() + 1);
        HoldGuard(self.clone())
    }

    fn quiet(&self) -> bool {
        self.0.live.get() == 0 && self.0.holds.get() == 0
    }

    /// Resolves when draining, no connection is live and nothing is held.
    pub fn idle(&self) -> Idle {
        Idle(self.clone())
    }

    fn wake_if_idle(&self) {
        if self.is_draining() && self.quiet() {
            for w in self.0.idle_wakers.borrow_mut().drain(..) {
                w.wake();
            }
        }
    }
}

pub struct LiveGuard(Drain);

pub struct HoldGuard(Drain);

impl Drop for HoldGuard {
    fn drop(&mut self) {
        let inner = &self.0 .0;
        inner.holds.set(inner.holds.get() - 1);
        self.0.wake_if_idle();
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let inner = &self.0 .0;
        inner.live.set(inner.live.get() - 1);
        self.0.wake_if_idle();
    }
}

pub struct Started {
    drain: Drain,
    slot: Option<usize>,
}

impl Future for Started {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.drain.is_draining() {
            self.slot = None;
            return Poll::Ready(());
        }
        let waker = cx.waker().clone();
        match self.slot {
            Some(i) => self.drain.0.wakers.borrow_mut().replace(i, waker),
            None => {
                let i = self.drain.0.wakers.borrow_mut().insert(waker);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            if !self.drain.is_draining() {
                self.drain.0.wakers.borrow_mut().remove(i);
            }
        }
    }
}

pub struct Idle(Drain);

impl Future for Idle {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.is_draining() && self.0.quiet() {
            return Poll::Ready(());
        }
        self.0 .0.idle_wakers.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}
