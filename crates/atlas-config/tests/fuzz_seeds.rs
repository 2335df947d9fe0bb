//! Replays the config fuzz seeds (and any local corpus) through loading:
//! a config or located errors, never a panic.

use std::path::Path;

#[test]
fn config_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in [root.join("seeds/config"), root.join("corpus/config"), root.join("artifacts/config")] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(data) = std::fs::read(e.path()) else { continue };
            if let Ok(text) = std::str::from_utf8(&data) {
                if let Err(errors) = atlas_config::load_str_offline(text, "seed.toml") {
                    for e in &errors.0 {
                        assert!(!e.key.is_empty() && !e.message.is_empty(), "{}: an error without key or message: {e:?}\n{text:?}", e.file);
                    }
                }
            }
            n += 1;
        }
    }
    assert!(n >= 3);
}
