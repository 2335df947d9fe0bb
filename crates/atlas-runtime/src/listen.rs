//! Listening sockets: one SO_REUSEPORT socket per worker per listener.
//! A listener on port 0 gets an ephemeral port from its first socket and the
//! other workers' sockets join that same port.

use std::io;
use std::net::{SocketAddr, TcpListener};

use atlas_config::Config;
use socket2::{Domain, Protocol, Socket, Type};

pub struct BoundListener {
    /// Index into `Config::listeners`.
    pub index: usize,
    /// The address actually bound (port resolved when 0 was asked).
    pub addr: SocketAddr,
    /// One socket per worker.
    pub sockets: Vec<TcpListener>,
}

fn bind_one(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Binds every listener of `cfg` once per worker.
pub fn bind_all(cfg: &Config) -> Result<Vec<BoundListener>, String> {
    let mut out = Vec::new();
    for (index, l) in cfg.listeners.iter().enumerate() {
        let first = bind_one(l.addr, l.backlog).map_err(|e| format!("listener `{}`: cannot listen on {}: {e}", l.name, l.addr))?;
        let addr = first.local_addr().map_err(|e| format!("listener `{}`: {e}", l.name))?;
        let mut sockets = vec![first];
        for _ in 1..cfg.workers {
            sockets.push(bind_one(addr, l.backlog).map_err(|e| format!("listener `{}`: cannot listen on {addr}: {e}", l.name))?);
        }
        out.push(BoundListener { index, addr, sockets });
    }
    Ok(out)
}
