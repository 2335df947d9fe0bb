//! The writing side of a player's client socket, shared by everything that
//! writes to the client: the backend reader relaying its server's frames,
//! and Atlas's own frames (keepalive pings, closes).
//!
//! Whoever writes takes the write half, writes in its own task and puts it
//! back: a server's bytes go from the backend reader straight to the client
//! socket, with no queue hop through a writer task (one task wake and one
//! buffer less per message; see the relay figures in `benches/RESULTS.md`).
//! While a write is in flight the writer is out: a backend reader waits for
//! it (backpressure: a slow client stops the reader, whose server then sees
//! its socket buffer fill); Atlas's own frames are queued (bounded) and go
//! out right before the next write, or from a small flush task when nobody
//! writes. A write that fails shuts the socket down and ends every later
//! write with an error.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::{Poll, Waker};

use atlas_proxy::io::{shutdown_fd, write_vec};
use atlas_proxy::tls_stream::TlsStream;
use monoio::io::{AsyncWriteRent, OwnedWriteHalf};
use monoio::net::TcpStream;

/// Atlas's own frames that may wait for the writer (pings and closes are
/// rare: more means the client is not reading).
const OWN_QUEUE: usize = 8;

/// The client's write half: plain or TLS (an enum, so sessions need no
/// type parameter).
pub enum ClientW {
    Plain(OwnedWriteHalf<TcpStream>),
    Tls(Box<OwnedWriteHalf<TlsStream>>),
}

impl ClientW {
    async fn write(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        match self {
            ClientW::Plain(w) => write_vec(w, buf).await,
            ClientW::Tls(w) => write_vec(w.as_mut(), buf).await,
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            ClientW::Plain(w) => w.shutdown().await,
            ClientW::Tls(w) => w.shutdown().await,
        };
    }
}

/// Client streams whose write half a session can hold.
pub trait IntoClientW {
    fn into_client_w(self) -> ClientW;
}

impl IntoClientW for OwnedWriteHalf<TcpStream> {
    fn into_client_w(self) -> ClientW {
        ClientW::Plain(self)
    }
}

impl IntoClientW for OwnedWriteHalf<TlsStream> {
    fn into_client_w(self) -> ClientW {
        ClientW::Tls(Box::new(self))
    }
}

pub(crate) struct ClientOut {
    fd: RawFd,
    /// `None` while a write is in flight.
    w: RefCell<Option<ClientW>>,
    /// Atlas's own frames waiting for the writer.
    own: RefCell<VecDeque<Vec<u8>>>,
    /// Tasks waiting for the writer.
    waiters: RefCell<Vec<Waker>>,
    broken: Cell<bool>,
}

impl ClientOut {
    pub(crate) fn new(w: ClientW, fd: RawFd) -> Rc<Self> {
        Rc::new(ClientOut { fd, w: RefCell::new(Some(w)), own: RefCell::new(VecDeque::new()), waiters: RefCell::new(Vec::new()), broken: Cell::new(false) })
    }

    /// Waits for the writer; `None` once the socket is broken.
    async fn take(&self) -> Option<ClientW> {
        std::future::poll_fn(|cx| {
            if self.broken.get() {
                return Poll::Ready(None);
            }
            if let Some(w) = self.w.borrow_mut().take() {
                return Poll::Ready(Some(w));
            }
            self.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn put(&self, w: ClientW) {
        *self.w.borrow_mut() = Some(w);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    fn fail(&self, e: &io::Error) {
        tracing::debug!(error = %e, "client: write failed; closing");
        self.broken.set(true);
        shutdown_fd(self.fd);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Writes Atlas's queued frames with the writer held.
    async fn write_own(&self, w: &mut ClientW) -> io::Result<()> {
        loop {
            let next = self.own.borrow_mut().pop_front();
            let Some(mut f) = next else { return Ok(()) };
            w.write(&mut f).await?;
        }
    }

    /// Writes `buf` (kept for reuse), after any frames Atlas queued before
    /// it and followed by those queued meanwhile. Err: the client is gone.
    pub(crate) async fn send(&self, buf: &mut Vec<u8>) -> Result<(), ()> {
        let Some(mut w) = self.take().await else { return Err(()) };
        let mut r = self.write_own(&mut w).await;
        if r.is_ok() {
            r = w.write(buf).await;
        }
        if r.is_ok() {
            r = self.write_own(&mut w).await;
        }
        match r {
            Ok(()) => {
                self.put(w);
                Ok(())
            }
            Err(e) => {
                self.fail(&e);
                Err(())
            }
        }
    }

    /// Queues a frame of Atlas's own; it goes out before the next relayed
    /// bytes. False when the socket is broken or too much is queued.
    pub(crate) fn push_own(self: &Rc<Self>, frame: Vec<u8>) -> bool {
        if self.broken.get() || self.own.borrow().len() >= OWN_QUEUE {
            return false;
        }
        self.own.borrow_mut().push_back(frame);
        if self.w.borrow().is_some() && self.own.borrow().len() == 1 {
            // Nobody writes now: flush from a task of its own.
            let me = self.clone();
            monoio::spawn(async move {
                let Some(mut w) = me.take().await else { return };
                match me.write_own(&mut w).await {
                    Ok(()) => me.put(w),
                    Err(e) => me.fail(&e),
                }
            });
        }
        true
    }

    /// The session ended: what is queued goes out, then the write side is
    /// shut down (a TLS close_notify, a FIN).
    pub(crate) fn finish(self: &Rc<Self>) {
        let me = self.clone();
        monoio::spawn(async move {
            let Some(mut w) = me.take().await else { return };
            if me.write_own(&mut w).await.is_ok() {
                w.shutdown().await;
            }
            me.broken.set(true);
        });
    }
}
