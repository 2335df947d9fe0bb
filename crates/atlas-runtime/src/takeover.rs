//! Socket takeover: a new Atlas receives the listening sockets of the
//! running one over a Unix socket (SCM_RIGHTS), starts serving on them, and
//! only then tells the old one to drain. No connection is refused at any
//! moment: the sockets (and their accept queues) never close, they just
//! gain a second owner and then lose the first.
//!
//! The Unix socket is SOCK_SEQPACKET (message boundaries, so each socket's
//! descriptor travels with its own description), mode 0600, and a peer
//! whose uid differs from ours is refused (SO_PEERCRED). The exchange:
//!
//! ```text
//! new -> old   ATLAS-TAKEOVER 1
//! old -> new   OK 1                       (or: ERR <reason>)
//! old -> new   S <listener> <addr>        + one descriptor, once per socket
//! old -> new   END
//!                                         new starts its workers on them
//! new -> old   READY
//!                                         old unlinks the path, starts draining
//! old -> new   BYE
//!                                         new binds the path: it is now the
//!                                         takeover server for the next one
//! ```
//!
//! Anything else, or silence past the timeouts, aborts the takeover and the
//! old process keeps serving as before.

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use nix::sys::socket::{
    accept, bind, connect, getsockopt, listen, recv, recvmsg, send, sendmsg, setsockopt, socket, sockopt, AddressFamily, Backlog, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;

const VERSION: u32 = 1;

/// The takeover listener of this process (-1: none), so a signal-started
/// drain can withdraw the offer.
static LISTENER_FD: AtomicI32 = AtomicI32::new(-1);
static WITHDRAWN: AtomicBool = AtomicBool::new(false);

/// Withdraws the offer when this process drains without a successor: the
/// takeover thread closes its copies of the listening sockets (so new
/// connections are refused once the workers close theirs) and removes the
/// socket file.
pub fn withdraw() {
    WITHDRAWN.store(true, Ordering::SeqCst);
    let fd = LISTENER_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: shutdown of our own listening socket wakes its accept().
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }
}

/// A listening socket handed over from the old process.
pub struct Inherited {
    pub name: String,
    pub addr: SocketAddr,
    pub fd: OwnedFd,
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("takeover: {what}: {e}")
}

fn seqpacket() -> Result<OwnedFd, String> {
    socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(|e| err("socket", e))
}

fn set_timeout(fd: &OwnedFd, t: Duration) {
    let tv = TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
    let _ = setsockopt(fd, sockopt::ReceiveTimeout, &tv);
    let _ = setsockopt(fd, sockopt::SendTimeout, &tv);
}

fn send_msg(fd: &OwnedFd, text: &str) -> Result<(), String> {
    send(fd.as_raw_fd(), text.as_bytes(), MsgFlags::empty()).map(|_| ()).map_err(|e| err("send", e))
}

fn recv_msg(fd: &OwnedFd) -> Result<String, String> {
    let mut buf = [0u8; 512];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|e| err("receive", e))?;
    if n == 0 {
        return Err("takeover: peer closed the connection".into());
    }
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// Receives one message and the descriptors attached to it.
fn recv_with_fds(fd: &OwnedFd) -> Result<(String, Vec<OwnedFd>), String> {
    let mut buf = [0u8; 512];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC).map_err(|e| err("receive", e))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| err("control message", e))? {
        if let ControlMessageOwned::ScmRights(list) = c {
            // SAFETY: descriptors just received through SCM_RIGHTS belong to us.
            fds.extend(list.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    let n = msg.bytes;
    if n == 0 && fds.is_empty() {
        return Err("takeover: peer closed the connection".into());
    }
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), fds))
}

/// The new process's side, after the sockets arrived.
pub struct Session {
    conn: OwnedFd,
    path: PathBuf,
}

/// Connects to the running Atlas at `path` and receives its listening
/// sockets. Nothing has changed for the old process yet.
pub fn take_over(path: &Path) -> Result<(Vec<Inherited>, Session), String> {
    let conn = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(|e| err("socket path", e))?;
    connect(conn.as_raw_fd(), &addr).map_err(|e| err(&format!("cannot reach a running Atlas at {}", path.display()), e))?;
    set_timeout(&conn, Duration::from_secs(10));
    send_msg(&conn, &format!("ATLAS-TAKEOVER {VERSION}"))?;
    let reply = recv_msg(&conn)?;
    if reply != format!("OK {VERSION}") {
        return Err(format!("takeover: the running Atlas answered `{reply}`"));
    }
    let mut sockets = Vec::new();
    loop {
        let (text, mut fds) = recv_with_fds(&conn)?;
        if text == "END" {
            break;
        }
        let mut parts = text.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next().and_then(|a| a.parse::<SocketAddr>().ok()), fds.pop()) {
            (Some("S"), Some(name), Some(addr), Some(fd)) => sockets.push(Inherited { name: name.to_string(), addr, fd }),
            _ => return Err(format!("takeover: unexpected message `{text}`")),
        }
    }
    Ok((sockets, Session { conn, path: path.to_path_buf() }))
}

/// Our own copies of the listening sockets, to hand to a successor. Made
/// before the workers start, so they stay valid whatever the workers do.
pub struct Offer(Vec<(String, SocketAddr, OwnedFd)>);

impl Offer {
    pub fn dup(sockets: &[(String, SocketAddr, RawFd)]) -> Result<Offer, String> {
        let mut owned = Vec::new();
        for (name, addr, fd) in sockets {
            // SAFETY: dup of a descriptor that is open for the duration of the call.
            let d = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 0) };
            if d < 0 {
                return Err(err("dup", std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh descriptor we own.
            owned.push((name.clone(), *addr, unsafe { OwnedFd::from_raw_fd(d) }));
        }
        Ok(Offer(owned))
    }
}

impl Session {
    /// Tells the old process we serve; waits for it to let go of the path,
    /// then becomes the takeover server there.
    pub fn finish(self, offer: Offer) -> Result<(), String> {
        send_msg(&self.conn, "READY")?;
        set_timeout(&self.conn, Duration::from_secs(30));
        let bye = recv_msg(&self.conn)?;
        if bye != "BYE" {
            return Err(format!("takeover: expected BYE, got `{bye}`"));
        }
        serve(&self.path, offer)
    }
}

/// Listens on `path` for a successor and hands it the offered sockets.
/// Runs on its own thread; returns once bound.
pub fn serve(path: &Path, offer: Offer) -> Result<(), String> {
    let owned = offer.0;
    let listener = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(|e| err("socket path", e))?;
    if path.exists() {
        // Another Atlas answering there keeps the path; a stale file goes.
        let probe = seqpacket()?;
        if connect(probe.as_raw_fd(), &addr).is_ok() {
            return Err(format!("takeover: {} is served by another running Atlas; not offering takeover", path.display()));
        }
        let _ = std::fs::remove_file(path);
    }
    // SAFETY: umask is process-wide but only narrows permissions briefly.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = bind(listener.as_raw_fd(), &addr);
    unsafe { libc::umask(old_mask) };
    bound.map_err(|e| err(&format!("cannot listen on {}", path.display()), e))?;
    listen(&listener, Backlog::new(4).unwrap_or(Backlog::MAXCONN)).map_err(|e| err("listen", e))?;
    LISTENER_FD.store(listener.as_raw_fd(), Ordering::SeqCst);
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("atlas-takeover".into())
        .spawn(move || loop {
            if WITHDRAWN.load(Ordering::SeqCst) {
                LISTENER_FD.store(-1, Ordering::SeqCst);
                let _ = std::fs::remove_file(&path);
                drop(owned);
                tracing::debug!("takeover: offer withdrawn (draining)");
                return;
            }
            let conn = match accept(listener.as_raw_fd()) {
                // SAFETY: a fresh descriptor from accept.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(_) if WITHDRAWN.load(Ordering::SeqCst) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "takeover: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            match hand_over(&conn, &owned, &path) {
                Ok(()) => {
                    LISTENER_FD.store(-1, Ordering::SeqCst);
                    tracing::info!("takeover: a new Atlas serves our sockets; draining");
                    return;
                }
                Err(e) => tracing::warn!("{e}; still serving"),
            }
        })
        .map_err(|e| err("thread", e))?;
    Ok(())
}

fn hand_over(conn: &OwnedFd, sockets: &[(String, SocketAddr, OwnedFd)], path: &Path) -> Result<(), String> {
    let me = unsafe { libc::getuid() };
    let peer = getsockopt(conn, sockopt::PeerCredentials).map_err(|e| err("SO_PEERCRED", e))?;
    if peer.uid() != me {
        return Err(format!("takeover: refused a peer with uid {} (we run as {me})", peer.uid()));
    }
    set_timeout(conn, Duration::from_secs(10));
    let hello = recv_msg(conn)?;
    if hello != format!("ATLAS-TAKEOVER {VERSION}") {
        let _ = send_msg(conn, &format!("ERR unsupported handshake; this Atlas speaks ATLAS-TAKEOVER {VERSION}"));
        return Err(format!("takeover: unsupported handshake `{hello}`"));
    }
    send_msg(conn, &format!("OK {VERSION}"))?;
    for (name, addr, fd) in sockets {
        let text = format!("S {name} {addr}");
        let fds = [fd.as_raw_fd()];
        sendmsg::<()>(conn.as_raw_fd(), &[IoSlice::new(text.as_bytes())], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
            .map_err(|e| err("send socket", e))?;
    }
    send_msg(conn, "END")?;
    // The new process starts its workers before it answers.
    set_timeout(conn, Duration::from_secs(60));
    let ready = recv_msg(conn)?;
    if ready != "READY" {
        return Err(format!("takeover: expected READY, got `{ready}`"));
    }
    let _ = std::fs::remove_file(path);
    atlas_proxy::drain::request_process_drain();
    send_msg(conn, "BYE")?;
    Ok(())
}
