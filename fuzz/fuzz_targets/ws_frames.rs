//! WebSocket frame decoding: never panics, does not depend on where the
//! input is cut, and headers re-encode to the bytes they came from.
#![no_main]
use atlas_game::fuzzing::check_frames;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check_frames(data));
