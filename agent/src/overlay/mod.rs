//! Snapshots as overlay file systems (Linux, needs the right to mount).
//!
//! A mount of a volume is an overlay whose layers, top to bottom, are:
//! - a fresh, writable **upper** directory of the mount's own: the kernel copies a file up
//!   on its first write, so nothing written through the mount, not even by root, reaches
//!   the layers below, the store, or what the agent serves;
//! - read-only **metadata layers** built by the agent from manifests: directories with their
//!   modes, symlinks, and for each file an empty sparse file of the right size, mode and
//!   mtime carrying `trusted.overlay.metacopy` and a `trusted.overlay.redirect` to the blob
//!   (`/<xx>/<hex>.data`), so any number of paths can share one blob with metadata of
//!   their own, and no link count limit applies;
//! - the store's blob directory as a **data-only layer**, reached only through redirects.
//!
//! A live overlay's layers never change: a reload stacks a thin layer of what changed
//! (whiteouts for removed paths) on the previous ones under a new upper and mounts a new
//! overlay beside the old one; the user's path is a symbolic link switched atomically.
//! Whether overlays work here is found by trying ([`probe`]); where they do not, snapshots
//! are copies.

use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::CWD;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MountPropagationFlags, MoveMountFlags,
    UnmountFlags, fsconfig_create, fsconfig_set_string, fsmount, fsopen, mount_bind_recursive,
    mount_change, mount_remount, move_mount, unmount,
};

pub mod layer;
pub mod openfiles;
pub mod upper;

/// Marks a file whose data lies in a lower layer.
pub const XATTR_METACOPY: &str = "trusted.overlay.metacopy";
/// Where a file's data (or a renamed directory's contents) lie in the layers below.
pub const XATTR_REDIRECT: &str = "trusted.overlay.redirect";
/// Marks a directory that hides everything below it.
pub const XATTR_OPAQUE: &str = "trusted.overlay.opaque";

/// The layers of one overlay.
#[derive(Debug)]
pub struct Overlay<'a> {
    /// Metadata layers, topmost first.
    pub lowers: Vec<PathBuf>,
    /// The data-only layer (the store's directory).
    pub data: &'a Path,
    /// The writable layer and the overlay's work directory (same file system).
    pub upper: &'a Path,
    /// The overlay's work directory.
    pub work: &'a Path,
    /// Mount read-only.
    pub read_only: bool,
}

fn with_path(what: &str, p: &Path) -> impl FnOnce(rustix::io::Errno) -> io::Error {
    let msg = format!("{what} {}", p.display());
    move |e| io::Error::new(io::Error::from(e).kind(), format!("{msg}: {e}"))
}

/// What every snapshot's mount is, whatever else it is: `nosuid,nodev`.
const SAFE_ATTRS: MountAttrFlags =
    MountAttrFlags::MOUNT_ATTR_NOSUID.union(MountAttrFlags::MOUNT_ATTR_NODEV);
/// The same flags for a remount, which sets a mount's flags whole: every remount passes them,
/// or it would clear them.
const SAFE_FLAGS: MountFlags = MountFlags::NOSUID.union(MountFlags::NODEV);

/// Mounts `ov` at `target` (an empty directory).
pub fn mount(ov: &Overlay<'_>, target: &Path) -> io::Result<()> {
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(with_path("overlay file system for", target))?;
    for l in &ov.lowers {
        fsconfig_set_string(&fs, "lowerdir+", l).map_err(with_path("lower layer", l))?;
    }
    fsconfig_set_string(&fs, "datadir+", ov.data).map_err(with_path("data layer", ov.data))?;
    fsconfig_set_string(&fs, "upperdir", ov.upper).map_err(with_path("upper layer", ov.upper))?;
    fsconfig_set_string(&fs, "workdir", ov.work).map_err(with_path("work dir", ov.work))?;
    // index=off: a frozen upper becomes a lower layer of the next snapshot while the old
    // overlay may still live on (detached lazily); with an index the kernel refuses that.
    for (k, v) in [("metacopy", "on"), ("redirect_dir", "on"), ("index", "off")] {
        fsconfig_set_string(&fs, k, v).map_err(with_path(k, target))?;
    }
    fsconfig_create(&fs).map_err(with_path("overlay for", target))?;
    // A volume's contents never grant privileges on the host: no setuid/setgid program,
    // no device node takes effect through a snapshot.
    let attrs = if ov.read_only {
        MountAttrFlags::MOUNT_ATTR_RDONLY | SAFE_ATTRS
    } else {
        SAFE_ATTRS
    };
    let m = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(with_path("overlay for", target))?;
    move_mount(&m, "", CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .map_err(with_path("mount at", target))
}

/// Makes the mount at `target` read-only, so its upper layer can no longer change; `false`
/// (and nothing done) while a file in it is open for writing: the kernel refuses then, so
/// the check and the freeze are one step.
pub fn freeze(target: &Path) -> io::Result<bool> {
    // The whole file system, not one mount of it: the kernel then counts writers on
    // every mount of it (bind mounts, other namespaces), and all of them turn read-only.
    match mount_remount(target, MountFlags::RDONLY | SAFE_FLAGS, "") {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::BUSY) => Ok(false),
        Err(e) => Err(with_path("freeze", target)(e)),
    }
}

/// Makes a single mount of an overlay writable again (older versions froze single mounts
/// for a reload; a restart thaws what one left frozen).
pub fn thaw_mount(target: &Path) -> io::Result<()> {
    mount_remount(target, MountFlags::BIND | SAFE_FLAGS, "").map_err(with_path("thaw", target))
}

/// Whether the mount at `dir` (this mount, not its file system) is read-only.
pub fn is_mount_ro(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        fields.get(4).map(|p| unescape(p)).as_deref() == dir.to_str()
            && fields
                .get(5)
                .is_some_and(|o| o.split(',').any(|o| o == "ro"))
    })
}

/// Makes a frozen mount writable again.
pub fn thaw(target: &Path) -> io::Result<()> {
    mount_remount(target, SAFE_FLAGS, "").map_err(with_path("thaw", target))
}

/// Detaches the overlay at `target` now; the kernel frees it once nothing uses it.
pub fn unmount_lazy(target: &Path) -> io::Result<()> {
    unmount(target, UnmountFlags::DETACH).map_err(with_path("unmount", target))
}

/// Mount points at or below `dir`, deepest first (from `/proc/self/mountinfo`).
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(out)
}

/// Makes `dir` a private mount (a bind mount of itself with what is mounted below it, made
/// private; kept if it is one already), so that overlays mounted below it never propagate
/// into other mount namespaces: copies there would outlive a lazy detach.
pub fn make_private_root(dir: &Path) -> io::Result<()> {
    if !is_mounted(dir) {
        mount_bind_recursive(dir, dir).map_err(with_path("bind mount", dir))?;
    }
    mount_change(dir, MountPropagationFlags::PRIVATE).map_err(with_path("make private", dir))
}

/// Detaches every mount at or below `dir` (deepest first); returns how many. For tearing
/// down test fleets and testnets, whose agents leave their mounts in place when they stop.
pub fn unmount_all_under(dir: &Path) -> usize {
    let mounts = mounts_under(dir).unwrap_or_default();
    mounts.iter().filter(|m| unmount_lazy(m).is_ok()).count()
}

/// Whether the file system mounted at `dir` is read-only (a frozen overlay).
pub fn is_frozen(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        let mut halves = l.splitn(2, " - ");
        let (mount, sb) = (halves.next().unwrap_or(""), halves.next().unwrap_or(""));
        mount.split(' ').nth(4).map(unescape).as_deref() == dir.to_str()
            && sb
                .split(' ')
                .nth(2)
                .is_some_and(|o| o.split(',').any(|o| o == "ro"))
    })
}

/// Whether `dir` is a mount point.
pub fn is_mounted(dir: &Path) -> bool {
    mounts_under(dir).is_ok_and(|m| m.iter().any(|p| p == dir))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether overlays with metadata layers and a data-only layer can be mounted here: mounts
/// a tiny one under `scratch` (removed afterwards) and reads a file through it.
pub fn probe(scratch: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(scratch);
    let r = try_probe(scratch);
    if is_mounted(&scratch.join("merged")) {
        let _ = unmount(scratch.join("merged"), UnmountFlags::DETACH);
    }
    let _ = std::fs::remove_dir_all(scratch);
    r
}

fn try_probe(scratch: &Path) -> Result<(), String> {
    let e = |e: io::Error| e.to_string();
    for d in ["data", "meta", "upper", "work", "merged"] {
        std::fs::create_dir_all(scratch.join(d)).map_err(e)?;
    }
    std::fs::write(scratch.join("data/blob"), b"voltool").map_err(e)?;
    layer::metacopy_file(&scratch.join("meta/file"), 7, 0o644, 0, "/blob").map_err(e)?;
    let merged = scratch.join("merged");
    mount(
        &Overlay {
            lowers: vec![scratch.join("meta")],
            data: &scratch.join("data"),
            upper: &scratch.join("upper"),
            work: &scratch.join("work"),
            read_only: false,
        },
        &merged,
    )
    .map_err(e)?;
    let read = std::fs::read(merged.join("file")).map_err(e)?;
    if read != b"voltool" {
        return Err("a file read through a probe overlay has the wrong bytes".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }
}
