//! HTTP/1.1: `codec` (heads), `chunked` (body framing), `proxy` (the
//! session), `record` (what an exchange leaves in metrics, logs and skim).

pub mod chunked;
pub mod codec;
pub mod proxy;
mod record;

pub use proxy::serve;
