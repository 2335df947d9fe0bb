//! Every example in config/ must validate, so the examples never rot.
//! Examples may name deployment paths under /etc/atlas/ or /var/www/ that do
//! not exist on a build machine; only "missing file" errors on those are
//! tolerated.

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(errors) = atlas_config::load_file(&path) {
                let real: Vec<_> = errors
                    .0
                    .iter()
                    .filter(|e| !((e.message.contains("`/etc/atlas/") || e.message.contains("`/var/www/")) && e.message.contains("No such file or directory")))
                    .collect();
                assert!(real.is_empty(), "{} is invalid:\n{real:#?}", path.display());
            }
            n += 1;
        }
    }
    assert!(n >= 5, "expected example configs in {}", dir.display());
}
