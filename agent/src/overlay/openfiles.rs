//! Files open for writing in a file system, found through `/proc` (as `lsof` does): a
//! switch to a new snapshot would leave such a writer on the old one, and its later writes
//! would be lost, so a switch refuses and names the file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The first file under `dir`, or anywhere in the file system mounted at `dir` (through
/// any mount of it: a bind, a mount point, another namespace), that some process holds
/// open for writing, if any, named as that process sees it. Processes whose descriptors
/// cannot be read (gone meanwhile, or not ours to see) are skipped.
pub fn first_open_for_writing(dir: &Path) -> Option<PathBuf> {
    // A file system's device, where `dir` is the root of a mount (not of a directory that
    // merely shares a device with the rest of its disk).
    let dev = rustix::fs::statx(
        rustix::fs::CWD,
        dir,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        rustix::fs::StatxFlags::BASIC_STATS,
    )
    .ok()
    .filter(|st| {
        st.stx_attributes
            .contains(rustix::fs::StatxAttributes::MOUNT_ROOT)
    })
    .and_then(|_| std::fs::metadata(dir).ok())
    .map(|m| m.dev());
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let name = p.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inside = target.starts_with(dir)
                || dev.is_some_and(|d| std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == d));
            if !inside {
                continue;
            }
            let info = p.path().join("fdinfo").join(fd.file_name());
            if std::fs::read_to_string(info).is_ok_and(|s| writes(&s)) {
                return Some(target);
            }
        }
    }
    None
}

/// Whether an fdinfo's `flags:` (octal) open the file for writing.
fn writes(fdinfo: &str) -> bool {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| matches!(flags & 0o3, 1 | 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_held_for_writing_is_found_and_a_reader_is_not() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let reader = std::fs::File::open(&p).unwrap();
        assert_eq!(first_open_for_writing(d.path()), None);
        let writer = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        assert_eq!(first_open_for_writing(d.path()), Some(p.clone()));
        drop((reader, writer));
        assert_eq!(first_open_for_writing(d.path()), None);
    }
}
