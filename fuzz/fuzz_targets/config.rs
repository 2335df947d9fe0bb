//! Configuration loading: any text gives a config or located errors, never
//! a panic. Offline: host names are not looked up.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = atlas_config::load_str_offline(text, "fuzz.toml");
    }
});
