//! Firehose decoding (frames, bincode control messages, master packets,
//! the client table handed to the next Atlas):
//! never panics, bounded lengths, decoded values re-encode consistently.
#![no_main]
use atlas_game::fuzzing::check_firehose;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check_firehose(data));
