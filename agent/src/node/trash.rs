//! Where retired snapshots and layers wait before they are removed: a process may still be
//! inside an old snapshot (an overlay detached lazily, a private bind of a mount path made
//! before a switch, a working directory in an old copied tree), and what it reads must not
//! be taken from under it.
//!
//! An entry waits at least [`TRASH_AGE`], and then for as long as something still uses what
//! it was retired with: an overlay (named by its device) that a mount in any mount namespace
//! shows, or that a process holds through an open file, a working directory or a root; a
//! copied tree a process holds likewise. A layer can serve older overlays than the one it
//! was retired with, so nothing younger than the oldest entry still in use is removed.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::scan;

/// The trash's directory under the data directory.
pub(super) const TRASH: &str = "trash";
/// How long retired snapshots and layers wait in the trash at least.
pub(super) const TRASH_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Moves `paths` into the trash as one entry per path, each named after the time it went
/// there and marked with the device of the overlay it was retired with (`None`: a copied
/// tree, or parts nothing mounted), and removes from the trash what has waited
/// [`TRASH_AGE`] and nothing uses any more.
pub(super) fn discard(trash: &Path, paths: Vec<PathBuf>, overlay: Option<u64>) {
    let _ = std::fs::create_dir_all(trash);
    let now = unix_now();
    for p in paths {
        let mut name = format!("{now}-{:08x}", rand::random::<u32>());
        if let Some(dev) = overlay {
            name.push_str(&format!(".d{dev}"));
        }
        if std::fs::rename(&p, trash.join(name)).is_err() {
            let _ = scan::remove_tree(&p);
        }
    }
    empty(trash, now);
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An entry's time in the trash (seconds since the epoch) and overlay device, from its
/// name; an entry named otherwise (an older voltool's) counts as old and unmarked.
fn parse_entry(name: &str) -> (u64, Option<u64>) {
    let (stem, dev) = match name.split_once(".d") {
        Some((s, d)) => (s, d.parse().ok()),
        None => (name, None),
    };
    let at = stem
        .split_once('-')
        .and_then(|(t, _)| t.parse().ok())
        .unwrap_or(0);
    (at, dev)
}

/// Removes what may go at time `now` (see the module's documentation).
pub(super) fn empty(trash: &Path, now: u64) {
    let mut entries: Vec<(u64, PathBuf, Option<u64>)> = std::fs::read_dir(trash)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let (at, dev) = parse_entry(&e.file_name().to_string_lossy());
            (at, e.path(), dev)
        })
        .collect();
    let waited = |at: u64| now.saturating_sub(at) >= TRASH_AGE.as_secs();
    if !entries.iter().any(|(at, _, _)| waited(*at)) {
        return;
    }
    // Oldest first.
    entries.sort_by_key(|(at, p, _)| (*at, p.clone()));
    let held = Held::now();
    for (at, path, dev) in entries {
        let used = match dev {
            Some(d) => held.devices.contains(&d),
            None => held.paths.iter().any(|p| p.starts_with(&path)),
        };
        if used || !waited(at) {
            // This one waits, and so does everything younger.
            return;
        }
        let _ = scan::remove_tree(&path);
    }
}

/// Whether a process holds something at or below `path` (an open file, a working
/// directory, a root).
pub(super) fn in_use(path: &Path) -> bool {
    Held::now().paths.iter().any(|p| p.starts_with(path))
}

/// What the host's processes hold: the devices of every mount in every mount namespace and
/// of every open file, working directory and root, and the paths of the last three.
#[derive(Debug, Default)]
struct Held {
    devices: HashSet<u64>,
    paths: Vec<PathBuf>,
}

impl Held {
    fn now() -> Held {
        let mut h = Held::default();
        let mut namespaces = HashSet::new();
        let procs = std::fs::read_dir("/proc").into_iter().flatten().flatten();
        for p in procs {
            let is_pid = p
                .file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
            if !is_pid {
                continue;
            }
            let dir = p.path();
            if let Ok(ns) = std::fs::read_link(dir.join("ns/mnt"))
                && namespaces.insert(ns)
                && let Ok(info) = std::fs::read_to_string(dir.join("mountinfo"))
            {
                h.devices.extend(info.lines().filter_map(mount_device));
            }
            let fds = std::fs::read_dir(dir.join("fd"))
                .into_iter()
                .flatten()
                .flatten();
            let links = [dir.join("cwd"), dir.join("root")]
                .into_iter()
                .chain(fds.map(|f| f.path()));
            for l in links {
                if let Ok(md) = std::fs::metadata(&l) {
                    h.devices.insert(md.dev());
                }
                if let Ok(t) = std::fs::read_link(&l) {
                    h.paths.push(t);
                }
            }
        }
        h
    }
}

/// The device of a mountinfo line (its third field, `major:minor`).
fn mount_device(line: &str) -> Option<u64> {
    let (major, minor) = line.split(' ').nth(2)?.split_once(':')?;
    Some(rustix::fs::makedev(
        major.parse().ok()?,
        minor.parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mountinfo_line_names_its_device() {
        let l = "54 47 0:42 / /srv/m rw,nosuid - overlay none rw";
        assert_eq!(mount_device(l), Some(rustix::fs::makedev(0, 42)));
        assert_eq!(mount_device("garbage"), None);
    }

    #[test]
    fn entry_names_carry_their_time_and_device() {
        assert_eq!(
            parse_entry("1700000000-0a0b0c0d.d42"),
            (1_700_000_000, Some(42))
        );
        assert_eq!(parse_entry("1700000000-0a0b0c0d"), (1_700_000_000, None));
        assert_eq!(parse_entry("00000000deadbeef"), (0, None));
    }

    #[test]
    fn a_tree_a_process_is_inside_waits_and_so_does_what_came_after() {
        let t = tempfile::tempdir().unwrap();
        let trash = t.path().join("trash");
        let old = trash.join("100-00000001");
        let young = trash.join("200-00000002");
        std::fs::create_dir_all(old.join("sub")).unwrap();
        std::fs::create_dir_all(&young).unwrap();
        std::fs::write(old.join("sub/f"), b"x").unwrap();
        let count = || std::fs::read_dir(&trash).unwrap().count();
        // Not waited long enough: all stays.
        empty(&trash, 150);
        assert_eq!(count(), 2);
        // Waited, but a process holds a file in the older one: it waits, and the younger
        // one with it (it may hold layers the older one's overlay still reads).
        let held = std::fs::File::open(old.join("sub/f")).unwrap();
        let later = 200 + TRASH_AGE.as_secs();
        empty(&trash, later);
        assert_eq!(count(), 2);
        drop(held);
        empty(&trash, later);
        assert_eq!(count(), 0);
    }

    #[test]
    fn an_overlay_still_mounted_somewhere_keeps_its_entry() {
        let t = tempfile::tempdir().unwrap();
        let trash = t.path().join("trash");
        // The device of a mount that is surely there: the root's.
        let root = std::fs::metadata("/").unwrap().dev();
        std::fs::create_dir_all(trash.join(format!("100-00000001.d{root}"))).unwrap();
        empty(&trash, 100 + TRASH_AGE.as_secs());
        assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 1);
        // An overlay gone from everywhere: its entry goes.
        std::fs::remove_dir(trash.join(format!("100-00000001.d{root}"))).unwrap();
        std::fs::create_dir_all(trash.join("100-00000001.d1")).unwrap();
        empty(&trash, 100 + TRASH_AGE.as_secs());
        assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 0);
    }
}
