//! The firehose wire format (connserver protocol v2,
//! `shared/specs/firehose-protocol.md`): u32-LE length-prefixed frames on
//! both links, bincode-2 control messages on the client link, and tagged
//! packets (u64-LE client id, u8 flag, data) on the master link.
//!
//! The control messages are encoded by the `bincode` crate itself (the
//! clients use it), in its "standard" configuration with a size limit so a
//! hostile length prefix cannot make it allocate. Framing and tagging are
//! a few lines of byte slicing, written here.

use std::fmt;

use bincode::{Decode, Encode};

/// The only protocol version this side speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// The ciphertext of a 32-byte challenge: 32 + 16-byte tag + 24-byte nonce.
pub const SEALED_LEN: usize = 72;
/// SEC1 compressed secp256k1 point.
pub const PUBKEY_LEN: usize = 33;
/// Largest control message (a 72-byte challenge and its prefixes).
const CONTROL_LIMIT: usize = 128;

/// Master-link flags.
pub const FLAG_DATA: u8 = 0x00;
pub const FLAG_FAILURE: u8 = 0x01;
pub const FLAG_KICK: u8 = 0x02;
pub const FLAG_RECONNECT: u8 = 0x03;
/// Atlas extensions (opt-in: `[firehose] notices`).
pub const FLAG_CONNECT: u8 = 0x10;
pub const FLAG_DISCONNECT: u8 = 0x11;

/// Client-link control messages; the variant order is the wire index.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Control {
    Ping,
    ProtocolVersion(u32),
    PubKey(Vec<u8>),
    ClientId(u64),
    Challenge(Vec<u8>),
    ChallengeResponse(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// A length prefix past the configured maximum.
    TooLong { len: usize, max: usize },
    /// Not a control message (unknown variant, bad varint, trailing bytes).
    BadControl(String),
    /// A master packet shorter than its 9-byte header.
    ShortPacket(usize),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::TooLong { len, max } => write!(f, "frame of {len} bytes is longer than max_frame_length ({max})"),
            WireError::BadControl(e) => write!(f, "malformed control message: {e}"),
            WireError::ShortPacket(n) => write!(f, "master packet of {n} bytes is shorter than its 9-byte header"),
        }
    }
}

impl std::error::Error for WireError {}

fn config() -> bincode::config::Configuration<bincode::config::LittleEndian, bincode::config::Varint, bincode::config::Limit<CONTROL_LIMIT>> {
    bincode::config::standard().with_limit::<CONTROL_LIMIT>()
}

/// The payload of `c` (without the frame's length prefix).
pub fn encode_control(c: &Control) -> Vec<u8> {
    bincode::encode_to_vec(c, config()).unwrap_or_default()
}

/// Appends `c` as a whole frame.
pub fn push_control(out: &mut Vec<u8>, c: &Control) {
    push_frame(out, &encode_control(c));
}

/// Decodes one control message; the payload must hold exactly one.
pub fn decode_control(payload: &[u8]) -> Result<Control, WireError> {
    match bincode::decode_from_slice::<Control, _>(payload, config()) {
        Ok((c, used)) if used == payload.len() => Ok(c),
        Ok((_, used)) => Err(WireError::BadControl(format!("{} trailing bytes", payload.len() - used))),
        Err(e) => Err(WireError::BadControl(e.to_string())),
    }
}

/// The first frame of `buf`: `Ok(Some((start, end)))` is its payload's
/// range when it is complete, `Ok(None)` when more bytes are needed.
pub fn next_frame(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, WireError> {
    let Some(head) = buf.get(..4) else { return Ok(None) };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    Ok((buf.len() >= 4 + len).then_some((4, 4 + len)))
}

/// Appends `payload` as a frame.
pub fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// One master-link packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tagged<'a> {
    pub id: u64,
    pub flag: u8,
    pub data: &'a [u8],
}

/// Reads a master-link frame payload.
pub fn parse_tagged(payload: &[u8]) -> Result<Tagged<'_>, WireError> {
    if payload.len() < 9 {
        return Err(WireError::ShortPacket(payload.len()));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&payload[..8]);
    Ok(Tagged { id: u64::from_le_bytes(id), flag: payload[8], data: &payload[9..] })
}

/// Appends a whole master-link frame.
pub fn push_tagged(out: &mut Vec<u8>, id: u64, flag: u8, data: &[u8]) {
    out.extend_from_slice(&((9 + data.len()) as u32).to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.push(flag);
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example payloads of the spec's table, byte for byte.
    #[test]
    fn control_messages_match_the_spec_examples() {
        assert_eq!(encode_control(&Control::Ping), [0x00]);
        assert_eq!(encode_control(&Control::ProtocolVersion(2)), [0x01, 0x02]);
        assert_eq!(encode_control(&Control::ClientId(7)), [0x03, 0x07]);
        assert_eq!(encode_control(&Control::ClientId(300)), [0x03, 0xFB, 0x2C, 0x01]);
        let key = vec![0x02; 33];
        let mut want = vec![0x02, 0x21];
        want.extend_from_slice(&key);
        assert_eq!(encode_control(&Control::PubKey(key.clone())), want);
        let ch = vec![9u8; 72];
        assert_eq!(&encode_control(&Control::Challenge(ch.clone()))[..2], [0x04, 0x48]);
        assert_eq!(&encode_control(&Control::ChallengeResponse(ch))[..2], [0x05, 0x48]);
        // u64 ids past u32 use the 0xFD marker.
        assert_eq!(encode_control(&Control::ClientId(1 << 40)), [0x03, 0xFD, 0, 0, 0, 0, 0, 1, 0, 0]);
        for c in [Control::Ping, Control::ProtocolVersion(2), Control::PubKey(key), Control::ClientId(u64::MAX)] {
            assert_eq!(decode_control(&encode_control(&c)), Ok(c));
        }
    }

    #[test]
    fn malformed_control_messages_are_errors() {
        assert!(decode_control(&[]).is_err());
        assert!(decode_control(&[0x06]).is_err(), "unknown variant");
        assert!(decode_control(&[0xFF]).is_err());
        assert!(decode_control(&[0x00, 0x00]).is_err(), "trailing byte");
        assert!(decode_control(&[0x03, 0xFB, 0x2C]).is_err(), "cut varint");
        // A byte vector claiming far more than the limit allocates nothing.
        assert!(decode_control(&[0x02, 0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).is_err());
    }

    #[test]
    fn frames_are_bounded() {
        let mut out = Vec::new();
        push_frame(&mut out, b"hello");
        assert_eq!(next_frame(&out, 16), Ok(Some((4, 9))));
        assert_eq!(next_frame(&out[..6], 16), Ok(None));
        assert_eq!(next_frame(&out[..3], 16), Ok(None));
        assert_eq!(next_frame(&out, 4), Err(WireError::TooLong { len: 5, max: 4 }));
        assert!(next_frame(&[0xFF, 0xFF, 0xFF, 0xFF], 1 << 20).is_err());
    }

    #[test]
    fn tagged_packets() {
        let mut out = Vec::new();
        push_tagged(&mut out, 300, FLAG_DATA, b"xy");
        assert_eq!(out, [11, 0, 0, 0, 0x2C, 0x01, 0, 0, 0, 0, 0, 0, 0, b'x', b'y']);
        let (s, e) = next_frame(&out, 64).unwrap().unwrap();
        assert_eq!(parse_tagged(&out[s..e]), Ok(Tagged { id: 300, flag: 0, data: b"xy" }));
        // The reference implementation crashes on exactly 8 bytes.
        assert_eq!(parse_tagged(&[0; 8]), Err(WireError::ShortPacket(8)));
        assert_eq!(parse_tagged(&[0; 9]), Ok(Tagged { id: 0, flag: 0, data: b"" }));
    }
}
