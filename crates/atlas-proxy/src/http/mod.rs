//! HTTP/1.1: `codec` (heads), `chunked` (body framing), `proxy` (the session).

pub mod chunked;
pub mod codec;
pub mod proxy;

pub use proxy::serve;
