//! Workers and listeners: the thread-per-core engine under every mode.
//!
//! `bind_all` creates, for every configured listener, one SO_REUSEPORT socket
//! per worker (the kernel spreads connections across them). `start` spawns
//! one OS thread per worker, each with its own monoio runtime (io_uring, or
//! the epoll driver), its own sockets, buffer pool and upstream connection
//! pool. The only state shared between workers is read-only (`Arc`ed
//! configuration and upstream groups) plus the per-worker in-flight lines
//! that `least_connections` reads.

pub mod control;
pub mod health;
mod listen;
mod shared;
pub mod takeover;
mod worker;

pub use listen::{bind_all, BoundListener};
pub use shared::Shared;
pub use worker::{start, Current, Generation, Workers};

use atlas_config::Driver;

/// The driver actually used, after `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChosenDriver {
    IoUring,
    Epoll,
}

impl ChosenDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            ChosenDriver::IoUring => "io_uring",
            ChosenDriver::Epoll => "epoll",
        }
    }
}

/// Resolves `auto`: io_uring when the kernel lets us create a ring.
pub fn choose_driver(wanted: Driver) -> Result<ChosenDriver, String> {
    let uring = monoio::utils::detect_uring();
    match wanted {
        Driver::Epoll => Ok(ChosenDriver::Epoll),
        Driver::IoUring if uring => Ok(ChosenDriver::IoUring),
        Driver::IoUring => Err("runtime.driver = \"io_uring\" but this kernel does not allow io_uring (use \"auto\" or \"epoll\")".into()),
        Driver::Auto if uring => Ok(ChosenDriver::IoUring),
        Driver::Auto => Ok(ChosenDriver::Epoll),
    }
}
