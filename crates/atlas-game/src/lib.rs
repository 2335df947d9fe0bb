//! The game gateway's building blocks (issue 7, in progress):
//!
//! - `ws`: RFC 6455 framing (an incremental decoder that lets the proxy
//!   forward bytes as they arrive while it tracks frame and message
//!   boundaries, and a side tap that rebuilds text messages) and the
//!   opening handshake.
//! - `position`: where a player's position is found in client messages.
//!
//! Everything here is pure (no I/O), fuzzed (`fuzz/fuzz_targets/ws_frames.rs`)
//! and unit-tested; the proxy session that uses it comes next.

pub mod fuzzing;
pub mod position;
pub mod ws;
