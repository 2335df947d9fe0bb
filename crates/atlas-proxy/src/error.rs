//! The proxy's error type: which side failed and whether a retry is safe.
//!
//! Modelled on Pingora's: an error carries its source and its retryability,
//! and maps to the status code the client sees (502, 504, 400...).

use std::fmt;
use std::io;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The downstream client (bad request, went away, too slow).
    Client,
    /// The upstream server (refused, reset, timed out, malformed reply).
    Upstream,
    /// The configuration (e.g. no usable upstream).
    Config,
    /// Atlas itself.
    Internal,
}

#[derive(Debug)]
pub struct ProxyError {
    pub side: Side,
    /// Sending the same request again (elsewhere) cannot cause harm.
    pub retry_safe: bool,
    pub what: &'static str,
    pub source: Option<io::Error>,
}

impl ProxyError {
    pub fn new(side: Side, retry_safe: bool, what: &'static str) -> Self {
        ProxyError { side, retry_safe, what, source: None }
    }
    pub fn io(side: Side, retry_safe: bool, what: &'static str, e: io::Error) -> Self {
        ProxyError { side, retry_safe, what, source: Some(e) }
    }
    /// The client went away (closed, reset): nothing can be answered.
    pub fn client_gone(&self) -> bool {
        self.side == Side::Client && (self.source.is_some() || self.what.contains("closed"))
    }

    /// Status for the client when nothing has been sent to it yet.
    pub fn status(&self) -> u16 {
        match (self.side, self.what) {
            (Side::Upstream, w) if w.contains("timed out") => 504,
            (Side::Upstream, _) => 502,
            (Side::Client, w) if w.contains("too large") => 413,
            (Side::Client, w) if w.contains("timed out") => 408,
            (Side::Config, _) => 503,
            (Side::Client, _) => 400,
            (Side::Internal, _) => 500,
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = match self.side {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Config => "config",
            Side::Internal => "internal",
        };
        write!(f, "{side}: {}", self.what)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        write!(f, " (retry {})", if self.retry_safe { "safe" } else { "unsafe" })
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}
