//! Properties the `ws_frames` and `firehose` fuzz targets check (and the
//! seed replay in `tests/fuzz_seeds.rs` runs on stable Rust).

use crate::ws::frame::{encode_header, parse_header, Chunk, Decoder, Sender, TextTap};

/// What decoding produced, in a form two runs can be compared by.
fn run(data: &[u8], cut: usize, sender: Sender) -> (Vec<String>, Result<(), String>, Vec<u8>) {
    let mut dec = Decoder::new(sender, 0x40, 1 << 16);
    let mut tap = TextTap::new(1 << 12);
    let mut events = Vec::new();
    let mut payload = Vec::new();
    let mut verdict = Ok(());
    for (i, piece) in data.chunks(cut.max(1)).enumerate() {
        let base = i * cut.max(1);
        let r = dec.feed(piece, |c| {
            match &c {
                Chunk::Header(h) => events.push(format!("H{:?}", (h.fin, h.rsv, h.opcode, h.mask, h.len))),
                Chunk::Payload { data, .. } => payload.extend_from_slice(data),
                // Where the frame ends in the whole input must not depend on the cut.
                Chunk::FrameEnd { opcode, message_end, consumed } => events.push(format!("E{opcode:?}{message_end}@{}", base + consumed)),
            }
            if let Some(t) = tap.follow(&c) {
                events.push(format!("T{t}"));
            }
        });
        if let Err(e) = r {
            verdict = Err(e.to_string());
            break;
        }
    }
    (events, verdict, payload)
}

/// Decoding never panics and does not depend on how the input is cut;
/// every header re-encodes to the exact bytes it was read from.
pub fn check_frames(data: &[u8]) {
    for sender in [Sender::Client, Sender::Server] {
        let whole = run(data, data.len(), sender);
        for cut in [1, 2, 3, 7] {
            assert_eq!(run(data, cut, sender), whole, "cut {cut} differs");
        }
        if let Ok(Some(h)) = parse_header(data, sender, 0x70, u64::MAX) {
            let mut out = Vec::new();
            encode_header(&mut out, h.fin, h.rsv, h.opcode, h.mask, h.len);
            assert_eq!(&out[..], &data[..h.header_len]);
        }
    }
}

/// Firehose decoding (client frames, control messages, master packets):
/// never panics; a decoded control message re-encodes to a message that
/// decodes the same; frame lengths are bounded whatever the prefix says;
/// a master packet shorter than 9 bytes is an error, not a crash; a client
/// table left for the next Atlas (`persist`) parses only when it
/// re-encodes to the same bytes.
pub fn check_firehose(data: &[u8]) {
    if let Ok((clients, at)) = crate::firehose::persist::decode(data) {
        assert_eq!(crate::firehose::persist::encode(&clients, at), data, "a client table re-encodes to its bytes");
    }
    use crate::firehose::wire::{decode_control, encode_control, next_frame, parse_tagged, push_tagged};
    if let Ok(c) = decode_control(data) {
        let again = encode_control(&c);
        assert_eq!(decode_control(&again).as_ref(), Ok(&c), "re-encoding changed {c:?}");
        assert!(again.len() <= data.len(), "a canonical encoding is never longer");
    }
    let max = data.first().map_or(16, |b| 16 + usize::from(*b) * 8);
    let mut rest = data;
    while let Ok(Some((s, e))) = next_frame(rest, max) {
        assert!(e - s <= max, "a frame past the bound was accepted");
        let payload = &rest[s..e];
        let _ = decode_control(payload);
        match parse_tagged(payload) {
            Ok(p) => {
                let mut out = Vec::new();
                push_tagged(&mut out, p.id, p.flag, p.data);
                assert_eq!(&out[4..], payload, "a master packet re-encodes to its bytes");
            }
            Err(_) => assert!(payload.len() < 9),
        }
        rest = &rest[e..];
    }
}
