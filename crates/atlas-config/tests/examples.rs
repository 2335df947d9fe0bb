//! Every example in config/ must validate, so the examples never rot.

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = atlas_config::load_file(&path) {
                panic!("{} is invalid:\n{e}", path.display());
            }
            n += 1;
        }
    }
    assert!(n >= 3, "expected example configs in {}", dir.display());
}
