//! A strict, incremental scanner for chunked transfer coding (RFC 9112 §7.1).
//!
//! It does not copy: it walks bytes as they arrive, validates every chunk
//! line, and says where the message ends and which ranges are payload data.
//! The proxy forwards validated bytes verbatim (so a chunked body reaches the
//! upstream exactly as Atlas framed it) or, for an HTTP/1.0 client, only the
//! data ranges. Strictness is the point: hex digits only (at most 16, no
//! overflow), CRLF only (a bare LF is an error), chunk extensions limited in
//! length and to token / quoted-string characters, trailers limited in size.

use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    InvalidSize,
    SizeOverflow,
    InvalidExtension,
    ExtensionTooLong,
    MissingCrlf,
    TrailersTooLarge,
    InvalidTrailer,
}

impl ChunkError {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkError::InvalidSize => "invalid chunk size",
            ChunkError::SizeOverflow => "chunk size overflow",
            ChunkError::InvalidExtension => "invalid chunk extension",
            ChunkError::ExtensionTooLong => "chunk extension too long",
            ChunkError::MissingCrlf => "chunk not terminated by CRLF",
            ChunkError::TrailersTooLarge => "trailer section too large",
            ChunkError::InvalidTrailer => "invalid trailer field",
        }
    }
}

const MAX_EXTENSION: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size; `digits` so far.
    Size {
        digits: u8,
    },
    /// After the size: extensions until CR.
    Ext {
        len: usize,
        quoted: bool,
        escape: bool,
    },
    /// Expecting LF after the size line's CR.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Start of a trailer line (or the final CRLF).
    TrailerStart,
    TrailerLine,
    TrailerLf {
        end: bool,
    },
    Done,
}

#[derive(Debug, Clone)]
pub struct ChunkedScanner {
    state: State,
    size: u64,
    remaining: u64,
    trailer_bytes: usize,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        Self::new()
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl ChunkedScanner {
    pub fn new() -> Self {
        ChunkedScanner { state: State::Size { digits: 0 }, size: 0, remaining: 0, trailer_bytes: 0 }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Scans `buf`; returns how many bytes belong to the message (all of
    /// `buf` unless the message ended inside it). `data` receives the ranges
    /// of payload bytes within `buf`.
    pub fn scan(&mut self, buf: &[u8], mut data: impl FnMut(Range<usize>)) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                State::Done => return Ok(i),
                State::Size { digits } => {
                    if let Some(d) = (b as char).to_digit(16) {
                        if digits >= 16 {
                            return Err(ChunkError::SizeOverflow);
                        }
                        self.size = self.size.checked_mul(16).and_then(|s| s.checked_add(d as u64)).ok_or(ChunkError::SizeOverflow)?;
                        self.state = State::Size { digits: digits + 1 };
                    } else if digits == 0 {
                        return Err(ChunkError::InvalidSize);
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.state = State::Ext { len: 1, quoted: false, escape: false };
                    } else {
                        return Err(ChunkError::InvalidSize);
                    }
                }
                State::Ext { len, quoted, escape } => {
                    if len >= MAX_EXTENSION {
                        return Err(ChunkError::ExtensionTooLong);
                    }
                    let (mut q, mut e) = (quoted, false);
                    if quoted {
                        if escape {
                            if b < 0x20 && b != b'\t' || b == 0x7f {
                                return Err(ChunkError::InvalidExtension);
                            }
                        } else if b == b'\\' {
                            e = true;
                        } else if b == b'"' {
                            q = false;
                        } else if b < 0x20 && b != b'\t' || b == 0x7f {
                            return Err(ChunkError::InvalidExtension);
                        }
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                        i += 1;
                        continue;
                    } else if b == b'"' {
                        q = true;
                    } else if !(is_tchar(b) || b"; \t=".contains(&b)) {
                        return Err(ChunkError::InvalidExtension);
                    }
                    self.state = State::Ext { len: len + 1, quoted: q, escape: e };
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    if self.size == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        self.remaining = self.size;
                        self.state = State::Data;
                    }
                    self.size = 0;
                }
                State::Data => {
                    let take = (buf.len() - i).min(self.remaining.min(usize::MAX as u64) as usize);
                    data(i..i + take);
                    i += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = State::Size { digits: 0 };
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::TrailerLf { end: true };
                    } else if is_tchar(b) {
                        self.state = State::TrailerLine;
                        self.trailer_bytes += 1;
                    } else {
                        return Err(ChunkError::InvalidTrailer);
                    }
                }
                State::TrailerLine => {
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(ChunkError::TrailersTooLarge);
                    }
                    if b == b'\r' {
                        self.state = State::TrailerLf { end: false };
                    } else if b == b'\n' || b == 0 {
                        return Err(ChunkError::InvalidTrailer);
                    }
                }
                State::TrailerLf { end } => {
                    if b != b'\n' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = if end { State::Done } else { State::TrailerStart };
                    if end {
                        return Ok(i + 1);
                    }
                }
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8]) -> Result<(usize, Vec<u8>, bool), ChunkError> {
        let mut s = ChunkedScanner::new();
        let mut out = Vec::new();
        let n = s.scan(input, |r| out.extend_from_slice(&input[r]))?;
        Ok((n, out, s.is_done()))
    }

    #[test]
    fn simple_body_and_end() {
        let (n, data, done) = scan_all(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nNEXT").unwrap();
        assert_eq!(data, b"hello world");
        assert!(done);
        assert_eq!(n, b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n".len());
    }

    #[test]
    fn byte_by_byte_equals_whole() {
        let input = b"a\r\n0123456789\r\n3;q=\"a;b\\\"\"\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";
        let mut s = ChunkedScanner::new();
        let mut out = Vec::new();
        for (i, _) in input.iter().enumerate() {
            let n = s.scan(&input[i..i + 1], |r| out.extend_from_slice(&input[i..i + 1][r])).unwrap();
            assert_eq!(n, 1);
        }
        assert!(s.is_done());
        assert_eq!(out, b"0123456789abc");
    }

    #[test]
    fn rejects_smuggling_shapes() {
        for bad in [
            &b"g\r\n"[..],            // not hex
            b"\r\n",                  // empty size
            b"5\nhello\r\n",          // bare LF after size
            b"5\r\nhello\n0\r\n\r\n", // bare LF after data
            b"5\r\nhelloX\r\n",       // data longer than size
            b"11111111111111111\r\n", // 17 hex digits
            b"ffffffffffffffff0\r\n", // overflow
            b"-1\r\n",                // sign
            b"0x5\r\n",               // prefix
            b"5;a\0b\r\n",            // NUL in extension
            b"0\r\nX: y\n\r\n",       // bare LF in trailer
        ] {
            assert!(scan_all(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn extension_length_is_bounded() {
        let mut v = b"1;".to_vec();
        v.extend(std::iter::repeat_n(b'a', 5000));
        assert_eq!(scan_all(&v).unwrap_err(), ChunkError::ExtensionTooLong);
    }

    #[test]
    fn max_size_within_u64_is_fine() {
        let mut s = ChunkedScanner::new();
        assert_eq!(s.scan(b"ffffffffffffffff\r\nab", |_| {}).unwrap(), 20);
        assert!(!s.is_done());
    }
}
