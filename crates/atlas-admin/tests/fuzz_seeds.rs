//! Replays the `admin_request` fuzz seeds (and any local corpus) through
//! the target's property check on stable Rust, as part of `scripts/test`.

use std::path::Path;

use atlas_admin::fuzzing::check_request;

#[test]
fn admin_request_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["seeds", "corpus", "artifacts"].map(|d| root.join(d).join("admin_request")) {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(data) = std::fs::read(e.path()) else { continue };
            for cut in (0..data.len()).step_by(5).chain([data.len()]) {
                check_request(&data[..cut]);
            }
            n += 1;
        }
    }
    assert!(n >= 3, "seed corpus missing: {n} files");
}
