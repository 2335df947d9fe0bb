//! Admin API request head and query decoding: never panics, and plain
//! text decodes as itself.
#![no_main]
use atlas_admin::fuzzing::check_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check_request(data));
