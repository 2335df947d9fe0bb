//! Chunked scanner: never panics, and scanning in pieces gives the same
//! verdict, length and payload as scanning at once.
#![no_main]
use atlas_proxy::fuzzing::check_chunked;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check_chunked(data));
