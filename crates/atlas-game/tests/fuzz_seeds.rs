//! Replays the `ws_frames` and `firehose` fuzz seeds (and any local
//! corpus) through the targets' properties on stable Rust, as part of
//! `scripts/test`.

use std::path::Path;

use atlas_game::fuzzing::{check_firehose, check_frames};

#[test]
fn ws_frames_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["seeds", "corpus", "artifacts"].map(|d| root.join(d).join("ws_frames")) {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(data) = std::fs::read(e.path()) else { continue };
            // Prefixes: how bytes arrive from a socket (about 64 per seed).
            for cut in (0..data.len()).step_by((data.len() / 64).max(11)).chain([data.len()]) {
                check_frames(&data[..cut]);
            }
            n += 1;
        }
    }
    assert!(n >= 5, "seed corpus missing: {n} files");
}

#[test]
fn firehose_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["seeds", "corpus", "artifacts"].map(|d| root.join(d).join("firehose")) {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(data) = std::fs::read(e.path()) else { continue };
            for cut in 0..=data.len() {
                check_firehose(&data[..cut]);
            }
            n += 1;
        }
    }
    assert!(n >= 5, "seed corpus missing: {n} files");
}
