//! WebSocket (RFC 6455): `frame` (the wire format) and `handshake` (the
//! HTTP/1.1 upgrade).

pub mod frame;
pub mod handshake;
