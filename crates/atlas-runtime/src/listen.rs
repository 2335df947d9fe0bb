//! Listening sockets: one SO_REUSEPORT socket per worker per listener.
//! A listener on port 0 gets an ephemeral port from its first socket and the
//! other workers' sockets join that same port. With `--takeover`, the
//! sockets received from the previous process come first.

use std::io;
use std::net::{SocketAddr, TcpListener};

use atlas_config::Config;
use socket2::{Domain, Protocol, Socket, Type};

use crate::takeover::Inherited;

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

/// Binds every listener of `cfg` once per worker. Sockets taken over from
/// a previous process (`inherited`) are used first for the listener of the
/// same name and address (a port-0 listener matches by name); the ones used
/// are removed from `inherited`.
pub fn bind_all(cfg: &Config, inherited: &mut Vec<Inherited>) -> Result<Vec<BoundListener>, String> {
    let mut out = Vec::new();
    for (index, l) in cfg.listeners.iter().enumerate() {
        let mut sockets: Vec<TcpListener> = Vec::new();
        let mut i = 0;
        while i < inherited.len() {
            if inherited[i].name == l.name && (l.addr.port() == 0 || inherited[i].addr == l.addr) {
                let s = TcpListener::from(inherited.remove(i).fd);
                s.set_nonblocking(true).map_err(|e| format!("listener `{}`: {e}", l.name))?;
                sockets.push(s);
            } else {
                i += 1;
            }
        }
        if !sockets.is_empty() {
            let addr = sockets[0].local_addr().map_err(|e| format!("listener `{}`: {e}", l.name))?;
            tracing::info!(listener = %l.name, %addr, sockets = sockets.len(), "took over listening sockets");
            while sockets.len() < cfg.workers {
                sockets.push(bind_one(addr, l.backlog).map_err(|e| format!("listener `{}`: cannot listen on {addr}: {e}", l.name))?);
            }
            out.push(BoundListener { index, addr, sockets });
            continue;
        }
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
