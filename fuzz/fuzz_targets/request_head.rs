//! Request head parse + rewrite: never panics, and what it accepts has a
//! head inside the input and a rewritten head that parses again as one
//! request with a single framing header.
#![no_main]
use atlas_proxy::fuzzing::check_request_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check_request_head(data));
