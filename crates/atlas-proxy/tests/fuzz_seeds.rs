//! Replays the fuzz seed corpus (and any corpus cargo-fuzz grew locally)
//! through the same property checks the fuzz targets run, on stable Rust,
//! as part of `scripts/test`: the deterministic fuzz smoke run.

use std::path::Path;

use atlas_proxy::fuzzing::{check_chunked, check_request_head, check_response_head};

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in [root.join("seeds").join(target), root.join("corpus").join(target), root.join("artifacts").join(target)] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            // A running fuzzer may remove files from its corpus meanwhile.
            let Ok(data) = std::fs::read(e.path()) else { continue };
            check(&data);
            // Every prefix too: that is how bytes arrive from a socket.
            for cut in (0..data.len()).step_by(7) {
                check(&data[..cut]);
            }
            n += 1;
        }
    }
    n
}

#[test]
fn request_head_seeds() {
    assert!(replay("request_head", check_request_head) >= 3);
}

#[test]
fn response_head_seeds() {
    assert!(replay("response_head", check_response_head) >= 3);
}

#[test]
fn chunked_seeds() {
    assert!(replay("chunked", check_chunked) >= 3);
}
