//! Response head parse + rewrite for every client shape: never panics.
#![no_main]
use atlas_proxy::fuzzing::check_response_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check_response_head(data));
