//! Trees and bytes to compare and to write.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// What a tree holds, for comparison: kind, mode, content hash or target.
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            let v = if m.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {mode:o}")
            } else {
                let bytes = std::fs::read(&p).unwrap();
                format!(
                    "file {mode:o} {} {}",
                    bytes.len(),
                    blake3::hash(&bytes).to_hex()
                )
            };
            out.insert(rel, v);
        }
    }
    out
}

/// Seeded pseudo-random bytes.
pub fn bytes(seed: u8, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new_keyed(&[seed; 32])
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Inode of a file (to check snapshots never share one with the store).
pub fn ino(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}
