//! RFC 6455 framing, incremental, for a proxy that forwards bytes as they
//! arrive and still knows where every frame and message ends.
//!
//! Written here rather than taken from a crate: the maintained codecs
//! (tungstenite, websocket-codec, ...) own the stream or buffer whole
//! frames and re-encode them, while the gateway must pass a backend's and
//! a client's bytes through untouched (masked as they came), without
//! holding a frame back, and only *observe* boundaries (to switch backends
//! between two messages) and text payloads (to read positions). That needs
//! a decoder that reports header / payload slice / frame end over
//! arbitrary read boundaries, which is what [`Decoder`] is. It is fuzzed
//! (`fuzz/fuzz_targets/ws_frames.rs`): any input cut anywhere decodes the
//! same, and every header re-encodes to the bytes it was read from.
//!
//! Strictness (the connection is failed on any of these, as RFC 6455 §5
//! requires): reserved opcodes, RSV bits no extension allows, control
//! frames longer than 125 bytes or fragmented, a 64-bit length with the
//! top bit set, lengths not in their minimal form, client frames without a
//! mask or server frames with one, a continuation with no message open or
//! a new data frame inside a fragmented message, and frames over the
//! configured size limit.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(b: u8) -> Option<Opcode> {
        Some(match b {
            0 => Opcode::Continuation,
            1 => Opcode::Text,
            2 => Opcode::Binary,
            8 => Opcode::Close,
            9 => Opcode::Ping,
            10 => Opcode::Pong,
            _ => return None,
        })
    }

    pub fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0,
            Opcode::Text => 1,
            Opcode::Binary => 2,
            Opcode::Close => 8,
            Opcode::Ping => 9,
            Opcode::Pong => 10,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// Who sent the frames being decoded (decides the masking rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// Frames from a client: must be masked.
    Client,
    /// Frames from a server: must not be masked.
    Server,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1..RSV3 as the top three bits of the first byte (0x70 mask).
    pub rsv: u8,
    pub opcode: Opcode,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// Bytes the header took on the wire (2 to 14).
    pub header_len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    ReservedOpcode(u8),
    ReservedBits(u8),
    ControlTooLong(u64),
    ControlFragmented,
    LengthTopBit,
    NonMinimalLength,
    MaskMissing,
    MaskUnexpected,
    TooLarge { len: u64, max: u64 },
    ContinuationWithoutMessage,
    DataInsideFragmentedMessage,
}

impl FrameError {
    /// The close code to fail the connection with (RFC 6455 §7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::TooLarge { .. } => 1009,
            _ => 1002,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::ReservedOpcode(o) => write!(f, "reserved opcode {o:#x}"),
            FrameError::ReservedBits(r) => write!(f, "reserved bits {r:#04x} set without an extension"),
            FrameError::ControlTooLong(n) => write!(f, "control frame of {n} bytes (at most 125)"),
            FrameError::ControlFragmented => f.write_str("fragmented control frame"),
            FrameError::LengthTopBit => f.write_str("64-bit length with the top bit set"),
            FrameError::NonMinimalLength => f.write_str("payload length not in its minimal form"),
            FrameError::MaskMissing => f.write_str("client frame without a mask"),
            FrameError::MaskUnexpected => f.write_str("server frame with a mask"),
            FrameError::TooLarge { len, max } => write!(f, "frame of {len} bytes over the {max}-byte limit"),
            FrameError::ContinuationWithoutMessage => f.write_str("continuation frame with no message in progress"),
            FrameError::DataInsideFragmentedMessage => f.write_str("new data frame inside a fragmented message"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Reads one frame header from the start of `buf`: `Ok(None)` when more
/// bytes are needed. `rsv_allowed` holds the RSV bits extensions allow.
pub fn parse_header(buf: &[u8], sender: Sender, rsv_allowed: u8, max_len: u64) -> Result<Option<FrameHeader>, FrameError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else { return Ok(None) };
    let opcode = Opcode::from_bits(b0 & 0x0f).ok_or(FrameError::ReservedOpcode(b0 & 0x0f))?;
    let fin = b0 & 0x80 != 0;
    let rsv = b0 & 0x70;
    if rsv & !rsv_allowed != 0 {
        return Err(FrameError::ReservedBits(rsv));
    }
    let masked = b1 & 0x80 != 0;
    match (sender, masked) {
        (Sender::Client, false) => return Err(FrameError::MaskMissing),
        (Sender::Server, true) => return Err(FrameError::MaskUnexpected),
        _ => {}
    }
    let short = (b1 & 0x7f) as u64;
    let (len, mut at) = match short {
        126 => {
            let Some(b) = buf.get(2..4) else { return Ok(None) };
            let n = u16::from_be_bytes([b[0], b[1]]) as u64;
            if n < 126 {
                return Err(FrameError::NonMinimalLength);
            }
            (n, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else { return Ok(None) };
            let n = u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
            if n >> 63 != 0 {
                return Err(FrameError::LengthTopBit);
            }
            if n <= u16::MAX as u64 {
                return Err(FrameError::NonMinimalLength);
            }
            (n, 10)
        }
        n => (n, 2),
    };
    if opcode.is_control() {
        if len > 125 {
            return Err(FrameError::ControlTooLong(len));
        }
        if !fin {
            return Err(FrameError::ControlFragmented);
        }
    }
    if len > max_len {
        return Err(FrameError::TooLarge { len, max: max_len });
    }
    let mask = if masked {
        let Some(k) = buf.get(at..at + 4) else { return Ok(None) };
        at += 4;
        Some([k[0], k[1], k[2], k[3]])
    } else {
        None
    };
    Ok(Some(FrameHeader { fin, rsv, opcode, mask, len, header_len: at }))
}

/// Writes a frame header (lengths in their minimal form).
pub fn encode_header(out: &mut Vec<u8>, fin: bool, rsv: u8, opcode: Opcode, mask: Option<[u8; 4]>, len: u64) {
    out.push((fin as u8) << 7 | (rsv & 0x70) | opcode.bits());
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= u16::MAX as u64 {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
}

/// XORs `data` with the masking key; `offset` is the position of
/// `data[0]` within the frame's payload (for payloads seen in pieces).
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: u64) {
    let start = (offset % 4) as usize;
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[(start + i) % 4];
    }
}

/// What the decoder saw in the bytes it was fed.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    Header(FrameHeader),
    /// Payload bytes as they are on the wire (still masked), and their
    /// offset within the frame's payload.
    Payload {
        data: &'a [u8],
        offset: u64,
    },
    /// The frame ended. `message_end`: it was the last frame of a data
    /// message (a switch between backends may happen here); control frames
    /// never end a message.
    FrameEnd {
        opcode: Opcode,
        message_end: bool,
        /// Bytes of the input of this `feed` call up to the frame's end
        /// (where a stream can be cut between two messages).
        consumed: usize,
    },
}

/// Incremental decoder over one direction of a WebSocket connection.
#[derive(Debug, Clone)]
pub struct Decoder {
    sender: Sender,
    rsv_allowed: u8,
    max_len: u64,
    /// The current frame and how much of its payload is left.
    frame: Option<(FrameHeader, u64)>,
    /// Opcode of the fragmented data message in progress.
    message: Option<Opcode>,
    /// Bytes of a header split across reads (at most 13).
    partial: Vec<u8>,
}

impl Decoder {
    pub fn new(sender: Sender, rsv_allowed: u8, max_len: u64) -> Decoder {
        Decoder { sender, rsv_allowed, max_len, frame: None, message: None, partial: Vec::new() }
    }

    /// Between two messages: no frame and no fragmented message open.
    pub fn at_message_boundary(&self) -> bool {
        self.frame.is_none() && self.message.is_none() && self.partial.is_empty()
    }

    /// Inside a frame whose header was read (its payload is streaming).
    pub fn in_frame(&self) -> bool {
        self.frame.is_some()
    }

    /// Between two frames (a control frame may be inserted here).
    pub fn at_frame_boundary(&self) -> bool {
        self.frame.is_none() && self.partial.is_empty()
    }

    /// Decodes all of `input`, reporting what it holds in order. After an
    /// error the connection must be failed; the decoder is left as is.
    pub fn feed<'a>(&mut self, input: &'a [u8], mut on: impl FnMut(Chunk<'a>)) -> Result<(), FrameError> {
        let mut rest = input;
        loop {
            if let Some((h, left)) = self.frame {
                let take = (rest.len() as u64).min(left) as usize;
                if take > 0 {
                    on(Chunk::Payload { data: &rest[..take], offset: h.len - left });
                    rest = &rest[take..];
                }
                let left = left - take as u64;
                if left > 0 {
                    self.frame = Some((h, left));
                    return Ok(());
                }
                self.frame = None;
                self.end_frame(h, input.len() - rest.len(), &mut on);
                continue;
            }
            if rest.is_empty() {
                return Ok(());
            }
            // A header, possibly continuing one split across reads.
            let parsed = if self.partial.is_empty() {
                parse_header(rest, self.sender, self.rsv_allowed, self.max_len)?.map(|h| (h, h.header_len))
            } else {
                let had = self.partial.len();
                self.partial.extend_from_slice(&rest[..rest.len().min(14 - had)]);
                let h = parse_header(&self.partial, self.sender, self.rsv_allowed, self.max_len)?;
                match h {
                    Some(h) => {
                        self.partial.clear();
                        Some((h, h.header_len - had))
                    }
                    None => {
                        // Everything fed so far is header: keep it all.
                        self.partial.truncate(had);
                        self.partial.extend_from_slice(rest);
                        return Ok(());
                    }
                }
            };
            let Some((h, used)) = parsed else {
                self.partial.extend_from_slice(rest);
                return Ok(());
            };
            self.check_sequence(&h)?;
            rest = &rest[used..];
            on(Chunk::Header(h));
            self.frame = Some((h, h.len));
            if h.len == 0 {
                self.frame = None;
                self.end_frame(h, input.len() - rest.len(), &mut on);
            }
        }
    }

    fn check_sequence(&mut self, h: &FrameHeader) -> Result<(), FrameError> {
        match (h.opcode, self.message) {
            (Opcode::Continuation, None) => Err(FrameError::ContinuationWithoutMessage),
            (Opcode::Text | Opcode::Binary, Some(_)) => Err(FrameError::DataInsideFragmentedMessage),
            _ => Ok(()),
        }
    }

    fn end_frame<'a>(&mut self, h: FrameHeader, consumed: usize, on: &mut impl FnMut(Chunk<'a>)) {
        let message_end = match h.opcode {
            op if op.is_control() => false,
            Opcode::Continuation => {
                if h.fin {
                    self.message = None;
                }
                h.fin
            }
            op => {
                if !h.fin {
                    self.message = Some(op);
                }
                h.fin
            }
        };
        on(Chunk::FrameEnd { opcode: h.opcode, message_end, consumed });
    }
}

/// Rebuilds the text messages of one direction beside the byte stream,
/// unmasked, for reading (positions). Messages longer than `max` are
/// skipped, not buffered: the stream itself is never held back.
#[derive(Debug, Clone)]
pub struct TextTap {
    max: usize,
    buf: Vec<u8>,
    /// The data message in progress is text and still under `max`.
    collecting: bool,
    /// The current frame's payload belongs to that message (not a control frame).
    in_data_frame: bool,
    mask: Option<[u8; 4]>,
}

impl TextTap {
    pub fn new(max: usize) -> TextTap {
        TextTap { max, buf: Vec::new(), collecting: false, in_data_frame: false, mask: None }
    }

    /// Follows one decoder chunk; returns a complete text message when one ends.
    pub fn follow(&mut self, chunk: &Chunk) -> Option<&str> {
        match chunk {
            Chunk::Header(h) => {
                self.in_data_frame = !h.opcode.is_control();
                self.mask = h.mask;
                match h.opcode {
                    Opcode::Text => {
                        self.buf.clear();
                        // Compressed (RSV1) messages are not readable as text here.
                        self.collecting = h.rsv == 0;
                    }
                    Opcode::Binary => self.collecting = false,
                    _ => {}
                }
                None
            }
            Chunk::Payload { data, offset } if self.in_data_frame && self.collecting => {
                if self.buf.len() + data.len() > self.max {
                    self.collecting = false;
                    self.buf.clear();
                    return None;
                }
                let start = self.buf.len();
                self.buf.extend_from_slice(data);
                if let Some(k) = self.mask {
                    apply_mask(&mut self.buf[start..], k, *offset);
                }
                None
            }
            Chunk::Payload { .. } => None,
            Chunk::FrameEnd { message_end: true, .. } if self.collecting => {
                self.collecting = false;
                std::str::from_utf8(&self.buf).ok()
            }
            Chunk::FrameEnd { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, op: Opcode, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_header(&mut out, fin, 0, op, mask, payload.len() as u64);
        let start = out.len();
        out.extend_from_slice(payload);
        if let Some(k) = mask {
            apply_mask(&mut out[start..], k, 0);
        }
        out
    }

    fn decode_all(dec: &mut Decoder, bytes: &[u8], cut: usize) -> Result<Vec<String>, FrameError> {
        let mut tap = TextTap::new(1 << 20);
        let mut texts = Vec::new();
        for piece in bytes.chunks(cut.max(1)) {
            dec.feed(piece, |c| {
                if let Some(t) = tap.follow(&c) {
                    texts.push(t.to_string());
                }
            })?;
        }
        Ok(texts)
    }

    #[test]
    fn rfc_examples() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let masked = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let h = parse_header(&masked, Sender::Client, 0, 1 << 20).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.len, h.header_len), (true, Opcode::Text, 5, 6));
        let mut p = masked[6..].to_vec();
        apply_mask(&mut p, h.mask.unwrap(), 0);
        assert_eq!(&p, b"Hello");
        // Unmasked from a server; 256 bytes and 64 KiB lengths.
        assert_eq!(parse_header(&[0x82, 0x7e, 0x01, 0x00], Sender::Server, 0, 1 << 20).unwrap().unwrap().len, 256);
        let big = [0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0];
        assert_eq!(parse_header(&big, Sender::Server, 0, 1 << 20).unwrap().unwrap().len, 65536);
    }

    #[test]
    fn violations_fail_the_connection() {
        let p = |b: &[u8], s| parse_header(b, s, 0, 1000);
        assert_eq!(p(&[0x83, 0x80, 0, 0, 0, 0], Sender::Client), Err(FrameError::ReservedOpcode(3)));
        assert_eq!(p(&[0xc1, 0x80, 0, 0, 0, 0], Sender::Client), Err(FrameError::ReservedBits(0x40)));
        assert_eq!(p(&[0x81, 0x05], Sender::Client), Err(FrameError::MaskMissing));
        assert_eq!(p(&[0x81, 0x85, 1, 2, 3, 4], Sender::Server), Err(FrameError::MaskUnexpected));
        assert_eq!(p(&[0x89, 0xfe, 0, 126], Sender::Client), Err(FrameError::ControlTooLong(126)));
        assert_eq!(p(&[0x09, 0x80, 0, 0, 0, 0], Sender::Client), Err(FrameError::ControlFragmented));
        assert_eq!(p(&[0x82, 0x7e, 0, 5], Sender::Server), Err(FrameError::NonMinimalLength));
        assert_eq!(p(&[0x82, 0x7f, 0, 0, 0, 0, 0, 0, 0xff, 0xff], Sender::Server), Err(FrameError::NonMinimalLength));
        assert_eq!(p(&[0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 0], Sender::Server), Err(FrameError::LengthTopBit));
        assert_eq!(p(&[0x82, 0x7e, 0x04, 0x00], Sender::Server), Err(FrameError::TooLarge { len: 1024, max: 1000 }));
        // With permessage-deflate, RSV1 is allowed.
        assert!(parse_header(&[0xc1, 0x00], Sender::Server, 0x40, 10).unwrap().is_some());
        assert_eq!(FrameError::TooLarge { len: 1, max: 0 }.close_code(), 1009);
        // Incomplete headers ask for more.
        assert_eq!(p(&[0x81], Sender::Client), Ok(None));
        assert_eq!(p(&[0x81, 0xfe, 0x01], Sender::Client), Ok(None));
        assert_eq!(p(&[0x81, 0x85, 1, 2], Sender::Client), Ok(None));
    }

    #[test]
    fn fragmented_message_with_interleaved_ping_in_any_cut() {
        let k = Some([9, 8, 7, 6]);
        let mut bytes = frame(false, Opcode::Text, k, b"{\"type\":");
        bytes.extend(frame(true, Opcode::Ping, k, b"hi"));
        bytes.extend(frame(false, Opcode::Continuation, k, b"\"move\",\"x\":"));
        bytes.extend(frame(true, Opcode::Continuation, k, b"1}"));
        bytes.extend(frame(true, Opcode::Binary, k, &[0xff; 300]));
        bytes.extend(frame(true, Opcode::Text, k, b""));
        for cut in [1, 2, 3, 5, 7, 13, 64, 10_000] {
            let mut dec = Decoder::new(Sender::Client, 0, 1 << 20);
            let texts = decode_all(&mut dec, &bytes, cut).unwrap();
            assert_eq!(texts, vec!["{\"type\":\"move\",\"x\":1}".to_string(), String::new()], "cut {cut}");
            assert!(dec.at_message_boundary());
        }
    }

    #[test]
    fn message_boundaries_are_reported_only_at_message_ends() {
        let mut bytes = frame(false, Opcode::Binary, None, b"ab");
        bytes.extend(frame(true, Opcode::Pong, None, b""));
        bytes.extend(frame(true, Opcode::Continuation, None, b"cd"));
        let mut dec = Decoder::new(Sender::Server, 0, 100);
        let mut ends = Vec::new();
        let mut boundary_after = Vec::new();
        dec.feed(&bytes, |c| {
            if let Chunk::FrameEnd { message_end, .. } = c {
                ends.push(message_end);
            }
        })
        .unwrap();
        boundary_after.push(dec.at_message_boundary());
        assert_eq!(ends, vec![false, false, true]);
        assert_eq!(boundary_after, vec![true]);
        let mut dec = Decoder::new(Sender::Server, 0, 100);
        dec.feed(&frame(false, Opcode::Text, None, b"x"), |_| {}).unwrap();
        assert!(!dec.at_message_boundary());
    }

    #[test]
    fn sequence_errors() {
        let mut dec = Decoder::new(Sender::Server, 0, 100);
        assert_eq!(dec.feed(&frame(true, Opcode::Continuation, None, b"x"), |_| {}), Err(FrameError::ContinuationWithoutMessage));
        let mut dec = Decoder::new(Sender::Server, 0, 100);
        let mut bytes = frame(false, Opcode::Text, None, b"x");
        bytes.extend(frame(true, Opcode::Text, None, b"y"));
        assert_eq!(dec.feed(&bytes, |_| {}), Err(FrameError::DataInsideFragmentedMessage));
    }

    #[test]
    fn oversized_and_binary_text_are_not_collected() {
        let k = Some([1, 2, 3, 4]);
        let mut bytes = frame(true, Opcode::Text, k, &[b'a'; 200]);
        bytes.extend(frame(true, Opcode::Text, k, &[0xff, 0xfe]));
        bytes.extend(frame(true, Opcode::Text, k, b"ok"));
        let mut dec = Decoder::new(Sender::Client, 0, 1 << 20);
        let mut tap = TextTap::new(100);
        let mut texts = Vec::new();
        dec.feed(&bytes, |c| {
            if let Some(t) = tap.follow(&c) {
                texts.push(t.to_string());
            }
        })
        .unwrap();
        assert_eq!(texts, vec!["ok".to_string()], "too long skipped, invalid UTF-8 skipped");
    }

    #[test]
    fn header_roundtrip() {
        for len in [0u64, 1, 125, 126, 65535, 65536, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = Vec::new();
                encode_header(&mut out, true, 0, Opcode::Binary, mask, len);
                let sender = if mask.is_some() { Sender::Client } else { Sender::Server };
                let h = parse_header(&out, sender, 0, u64::MAX).unwrap().unwrap();
                assert_eq!((h.len, h.mask, h.header_len), (len, mask, out.len()));
            }
        }
    }
}
