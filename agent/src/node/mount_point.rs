//! A mount's host path, handled through its parent directory held open.
//!
//! The agent runs as root; the directories above a mount path may belong to a user who can
//! swap one for a symbolic link at any moment. Every commit, reload, compaction, restart and
//! unmount changes what sits at the mount path, so none of them may resolve that path again:
//! the parent is opened once, refusing any symbolic link on the way (`openat2` with
//! `RESOLVE_NO_SYMLINKS`), kept open, and recorded by (device, inode, owner). What sits at
//! the path is created, switched and removed only relative to that descriptor, so a swapped
//! parent can redirect nothing: the mount stays where the directory went. After a restart
//! the parent is opened again by path and compared with the record; a parent that changed
//! is refused, and the mount is left alone.
//!
//! In overlay mode the path is a **mount point that stays** for the life of the mount:
//! - a *base*: the path's own directory bound onto itself and made shared, so that what is
//!   mounted on it propagates to every bind of the path made with slave propagation
//!   (Docker's `rslave`, Kubernetes' `HostToContainer`), in this namespace or another. The
//!   directory under it holds only [`NOT_MOUNTED`], which the path shows while no snapshot
//!   is mounted (after a reboot, until the agent is back);
//! - on the base, a clone of the current snapshot's overlay. A switch puts a clone of the
//!   new snapshot *beneath* the current one (`move_mount` with `MOVE_MOUNT_BENEATH`), then
//!   detaches the current one lazily: the path shows the old tree or the new one, never the
//!   base; a process inside the old one keeps it until it lets go.
//!
//! In copy mode the path is a symbolic link to the snapshot's directory, switched by
//! renaming a new link over it.

use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use std::os::fd::AsFd;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, StatxAttributes, StatxFlags};
use rustix::mount::{MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags};
use serde::{Deserialize, Serialize};
use tracing::info;

/// The file a mount point holds under its mounts: what the path shows while no snapshot is
/// mounted there (after a reboot, until the agent has mounted the snapshot again).
pub const NOT_MOUNTED: &str = "VOLTOOL-NOT-MOUNTED";

/// Most mounts stacked at one path that [`MountPoint::remove_mounts`] detaches.
const MAX_STACK: usize = 64;

/// Which directory a mount path's parent was when it was mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ParentId {
    /// Device.
    pub(crate) dev: u64,
    /// Inode.
    pub(crate) ino: u64,
    /// Owner.
    pub(crate) uid: u32,
}

/// A failure at a mount's host path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum MountPointError {
    /// Not an absolute path with a last component.
    #[error("{0}: a mount path must be absolute and name an entry in a directory")]
    NotAbsolute(String),
    /// A symbolic link on the way, or another failure opening the parent.
    #[error(
        "{path}: cannot open its directory without following a symbolic link ({source}); give the path with the links resolved"
    )]
    Parent {
        /// The mount path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The parent is not the directory recorded at mount time.
    #[error(
        "{0}: its directory is not the one it was mounted in (replaced or swapped for another since): refusing to touch it"
    )]
    Changed(String),
    /// Something stands at the path.
    #[error("{0} exists; mount on a new path or an empty directory")]
    Exists(String),
    /// No base is mounted at the path (it was never prepared, or someone detached it).
    #[error(
        "{0} is not a mount point of voltool's (its base is gone): unmount and mount the volume again"
    )]
    NoBase(String),
    /// A file-system call failed.
    #[error("{path}: {source}")]
    Io {
        /// The mount path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// A mount path, its parent held open.
#[derive(Debug)]
pub(crate) struct MountPoint {
    parent: OwnedFd,
    name: OsString,
    path: PathBuf,
    id: ParentId,
}

fn io(path: &Path) -> impl Fn(rustix::io::Errno) -> MountPointError + '_ {
    move |e| MountPointError::Io {
        path: path.display().to_string(),
        source: e.into(),
    }
}

/// The id of the mount `fd` is in (as `/proc/*/mountinfo` numbers them).
fn mount_id(fd: &impl AsFd) -> Option<u64> {
    rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)
        .ok()
        .map(|st| st.stx_mnt_id)
}

/// One line of a mountinfo table: the mount's id, its parent's, and its peer group
/// (`shared:N`) and master (`master:N`), if any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MountLine {
    id: u64,
    parent: u64,
    shared: Option<u64>,
    master: Option<u64>,
}

fn parse_mountinfo(text: &str) -> Vec<MountLine> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let id = f.next()?.parse().ok()?;
            let parent = f.next()?.parse().ok()?;
            let mut m = MountLine {
                id,
                parent,
                ..Default::default()
            };
            // Optional fields run from the 7th to the `-` separator.
            for tag in f.skip(4).take_while(|t| *t != "-") {
                if let Some(n) = tag.strip_prefix("shared:") {
                    m.shared = n.parse().ok();
                } else if let Some(n) = tag.strip_prefix("master:") {
                    m.master = n.parse().ok();
                }
            }
            Some(m)
        })
        .collect()
}

/// Whether the snapshot shown at a mount point (the mount `top`, on the base) has a copy
/// that is the root of a bind somewhere, in this mount namespace or another: a copy that
/// is not itself on a copy of the base. Such a copy (Docker's `-v PATH:…:rslave`) follows
/// only what is mounted on the snapshot, never a switch beneath it; copies of the whole
/// path (a namespace made with slave propagation, a bind of a directory above it) follow
/// either.
fn bound_elsewhere(top: &impl AsFd) -> bool {
    let Some(id) = mount_id(top) else {
        return false;
    };
    let Ok(own) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let own = parse_mountinfo(&own);
    let Some(me) = own.iter().find(|m| m.id == id).copied() else {
        return false;
    };
    let Some(group) = me.shared else {
        return false;
    };
    let base_group = own
        .iter()
        .find(|m| m.id == me.parent)
        .and_then(|b| b.shared);
    let is_copy =
        |m: &MountLine| m.id != id && (m.shared == Some(group) || m.master == Some(group));
    let on_base_copy = |table: &[MountLine], m: &MountLine| {
        table.iter().any(|p| {
            p.id == m.parent
                && base_group.is_some()
                && (p.shared == base_group || p.master == base_group)
        })
    };
    // Every mount namespace once: a table per namespace, read through one of its processes.
    let mut seen = std::collections::HashSet::new();
    let procs = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    for p in procs {
        let name = p.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(ns) = std::fs::read_link(p.path().join("ns/mnt")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(p.path().join("mountinfo")) else {
            continue;
        };
        let table = parse_mountinfo(&text);
        if table.iter().any(|m| is_copy(m) && !on_base_copy(&table, m)) {
            return true;
        }
    }
    false
}

/// Whether `fd` is the root of a mount.
fn is_mount_root(fd: &impl AsFd) -> bool {
    rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)
        .is_ok_and(|st| st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT))
}

/// The path naming what `fd` refers to, for calls that take only paths: resolving it
/// reaches exactly that (a magic link), never whatever is at its old path now.
fn proc_fd(fd: &impl AsFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

impl MountPoint {
    /// Opens the parent of `path` (absolute, normalised, no symbolic link on the way).
    pub(crate) fn open(path: &Path) -> Result<Self, MountPointError> {
        let bad = || MountPointError::NotAbsolute(path.display().to_string());
        if !path.is_absolute() {
            return Err(bad());
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(bad());
        };
        if name == OsStr::new("..") || name == OsStr::new(".") {
            return Err(bad());
        }
        let parent_fd = rustix::fs::openat2(
            rustix::fs::CWD,
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| MountPointError::Parent {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        let st = rustix::fs::fstat(&parent_fd).map_err(io(path))?;
        Ok(MountPoint {
            parent: parent_fd,
            name: name.to_os_string(),
            path: path.to_path_buf(),
            id: ParentId {
                dev: st.st_dev,
                ino: st.st_ino,
                uid: st.st_uid,
            },
        })
    }

    /// Opens the parent of `path` again (after a restart) and checks it is the directory
    /// recorded as `id`.
    pub(crate) fn reopen(path: &Path, id: ParentId) -> Result<Self, MountPointError> {
        let mp = Self::open(path)?;
        if mp.id != id {
            return Err(MountPointError::Changed(path.display().to_string()));
        }
        Ok(mp)
    }

    /// The parent directory's identity, for the mount's record.
    pub(crate) fn id(&self) -> ParentId {
        self.id
    }

    /// The mount path (for messages).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Makes room for a new mount's link (copy mode): nothing may stand at the path but an
    /// empty directory, which is removed.
    pub(crate) fn prepare(&self) -> Result<(), MountPointError> {
        if self.free()? {
            rustix::fs::unlinkat(&self.parent, &self.name, AtFlags::REMOVEDIR)
                .map_err(io(&self.path))?;
        }
        Ok(())
    }

    /// Whether a new mount may take the path: nothing stands there, or an empty
    /// directory (left as it is).
    pub(crate) fn check_free(&self) -> Result<(), MountPointError> {
        self.free().map(|_| ())
    }

    /// Refuses a path where something stands but an empty directory that is no mount
    /// point; whether such a directory stands there.
    fn free(&self) -> Result<bool, MountPointError> {
        let st = match rustix::fs::statat(&self.parent, &self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(io(&self.path)(e)),
        };
        let exists = || MountPointError::Exists(self.path.display().to_string());
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(exists());
        }
        let dir = self.open_dir()?;
        let empty = rustix::fs::Dir::read_from(&dir)
            .map_err(io(&self.path))?
            .filter_map(Result::ok)
            .all(|e| matches!(e.file_name().to_bytes(), b"." | b".."));
        if is_mount_root(&dir) || !empty {
            return Err(exists());
        }
        Ok(true)
    }

    /// The directory at the path (the top mount's root, if something is mounted there),
    /// opened for reading without following a link.
    fn open_dir(&self) -> Result<OwnedFd, MountPointError> {
        rustix::fs::openat(
            &self.parent,
            &self.name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io(&self.path))
    }

    /// Where the link at the path leads, if a link stands there.
    pub(crate) fn read_link(&self) -> Option<PathBuf> {
        rustix::fs::readlinkat(&self.parent, &self.name, Vec::new())
            .ok()
            .map(|t| PathBuf::from(OsStr::from_bytes(t.as_bytes())))
    }

    /// Points the path at `target` atomically: a new symbolic link beside it, renamed over
    /// it, both in the held parent.
    pub(crate) fn switch(&self, target: &Path) -> Result<(), MountPointError> {
        let mut tmp = OsString::from(".");
        tmp.push(&self.name);
        tmp.push(format!(".voltool-{:08x}", rand::random::<u32>()));
        rustix::fs::symlinkat(target, &self.parent, &tmp).map_err(io(&self.path))?;
        rustix::fs::renameat(&self.parent, &tmp, &self.parent, &self.name).map_err(|e| {
            let _ = rustix::fs::unlinkat(&self.parent, &tmp, AtFlags::empty());
            io(&self.path)(e)
        })
    }

    /// The path's top mount (or the directory itself), opened without following a link.
    fn open_top(&self) -> Result<OwnedFd, MountPointError> {
        rustix::fs::openat(
            &self.parent,
            &self.name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io(&self.path))
    }

    /// Makes the path a mount point that stays (overlay mode): a directory (made if missing,
    /// belonging to `owner`; a link an older voltool left there is replaced) holding only
    /// [`NOT_MOUNTED`], with its base mounted on it and made shared. Kept as it is where the
    /// base is there already, unless `fresh` (a new mount), which takes only a path that is
    /// missing, an empty directory or a link.
    pub(crate) fn prepare_base(&self, owner: u32, fresh: bool) -> Result<(), MountPointError> {
        let exists = || MountPointError::Exists(self.path.display().to_string());
        let io = io(&self.path);
        match rustix::fs::statat(&self.parent, &self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(rustix::io::Errno::NOENT) => self.make_dir(owner)?,
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::Symlink => {
                    rustix::fs::unlinkat(&self.parent, &self.name, AtFlags::empty())
                        .map_err(&io)?;
                    self.make_dir(owner)?;
                }
                FileType::Directory => {}
                _ => return Err(exists()),
            },
            Err(e) => return Err(io(e)),
        }
        let top = self.open_top()?;
        if is_mount_root(&top) {
            if fresh {
                return Err(exists());
            }
            // A base (or a snapshot on it) from before: the base shared again, in case the
            // agent stopped between mounting it and sharing it.
            if rustix::fs::fstat(&top).map_err(&io)?.st_dev == self.id.dev {
                rustix::mount::mount_change(proc_fd(&top), MountPropagationFlags::SHARED)
                    .map_err(&io)?;
            }
            return Ok(());
        }
        // The directory under the base: empty but for the marker.
        let dir = self.open_dir()?;
        let foreign = rustix::fs::Dir::read_from(&dir)
            .map_err(&io)?
            .filter_map(Result::ok)
            .any(|e| {
                !matches!(
                    e.file_name().to_bytes(),
                    b"." | b".." | b"VOLTOOL-NOT-MOUNTED"
                )
            });
        if foreign {
            return Err(exists());
        }
        match rustix::fs::openat(
            &dir,
            NOT_MOUNTED,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        ) {
            Ok(f) => {
                let text = "This volume is not mounted: its voltool agent has not started (yet).\n";
                rustix::io::write(&f, text.as_bytes()).map_err(&io)?;
            }
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io(e)),
        }
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o555)).map_err(&io)?;
        let base = rustix::mount::open_tree(
            &self.parent,
            &self.name,
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(&io)?;
        rustix::mount::move_mount(
            &base,
            "",
            &self.parent,
            &self.name,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(&io)?;
        let top = self.open_top()?;
        rustix::mount::mount_change(proc_fd(&top), MountPropagationFlags::SHARED).map_err(&io)
    }

    fn make_dir(&self, owner: u32) -> Result<(), MountPointError> {
        let io = io(&self.path);
        rustix::fs::mkdirat(&self.parent, &self.name, Mode::from_raw_mode(0o755)).map_err(&io)?;
        if owner != 0 {
            rustix::fs::chownat(
                &self.parent,
                &self.name,
                Some(rustix::process::Uid::from_raw(owner)),
                None,
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(&io)?;
        }
        Ok(())
    }

    /// Shows the overlay mounted at `snapshot` at the path (overlay mode): a clone of it
    /// goes beneath the snapshot shown now, which is then detached lazily (or onto the base
    /// if none is shown). Nothing to do when it is shown already.
    pub(crate) fn show(&self, snapshot: &Path) -> Result<(), MountPointError> {
        let io = io(&self.path);
        let clone = rustix::mount::open_tree(
            rustix::fs::CWD,
            snapshot,
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(&io)?;
        let want = rustix::fs::fstat(&clone).map_err(&io)?.st_dev;
        let top = self.open_top()?;
        if !is_mount_root(&top) {
            return Err(MountPointError::NoBase(self.path.display().to_string()));
        }
        let shown = rustix::fs::fstat(&top).map_err(&io)?.st_dev;
        if shown == want {
            return Ok(());
        }
        let to = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH;
        if shown == self.id.dev {
            // The base: nothing shown yet.
            return rustix::mount::move_mount(&clone, "", &top, "", to).map_err(&io);
        }
        if bound_elsewhere(&top) {
            // A bind of the path holds a copy of the snapshot shown, and follows only what
            // is mounted on it: the new one goes on top, and the old one stays under it
            // for as long as the mount lives (covered, unused).
            info!(path = %self.path.display(), "a bind of the path follows this mount: the new snapshot is stacked on the old one");
            return rustix::mount::move_mount(&clone, "", &top, "", to).map_err(&io);
        }
        rustix::mount::move_mount(
            &clone,
            "",
            &top,
            "",
            to | MoveMountFlags::MOVE_MOUNT_BENEATH,
        )
        .map_err(&io)?;
        rustix::mount::unmount(proc_fd(&top), UnmountFlags::DETACH).map_err(&io)
    }

    /// Whether the path shows the overlay mounted at `snapshot`.
    pub(crate) fn shows(&self, snapshot: &Path) -> bool {
        let (Ok(top), Ok(want)) = (self.open_top(), rustix::fs::stat(snapshot)) else {
            return false;
        };
        is_mount_root(&top) && rustix::fs::fstat(&top).is_ok_and(|st| st.st_dev == want.st_dev)
    }

    /// Detaches what is mounted at the path (the snapshot shown, the base), then removes
    /// the marker and the directory if nothing else is in it.
    pub(crate) fn remove_mounts(&self) -> Result<(), MountPointError> {
        let io = io(&self.path);
        for _ in 0..MAX_STACK {
            let top = match self.open_top() {
                Ok(t) => t,
                Err(MountPointError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if !is_mount_root(&top) {
                break;
            }
            rustix::mount::unmount(proc_fd(&top), UnmountFlags::DETACH).map_err(&io)?;
        }
        if let Ok(dir) = self.open_dir() {
            let _ = rustix::fs::unlinkat(&dir, NOT_MOUNTED, AtFlags::empty());
            let _ = rustix::fs::unlinkat(&self.parent, &self.name, AtFlags::REMOVEDIR);
        }
        Ok(())
    }

    /// Removes the link at the path (what stands there is left unless it is a link).
    pub(crate) fn remove(&self) -> Result<(), MountPointError> {
        match rustix::fs::statat(&self.parent, &self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                rustix::fs::unlinkat(&self.parent, &self.name, AtFlags::empty())
                    .map_err(io(&self.path))
            }
            Ok(_) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(io(&self.path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parent_swapped_for_a_link_redirects_nothing() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("u/sub")).unwrap();
        std::fs::create_dir_all(root.join("victim")).unwrap();
        std::fs::write(root.join("victim/mnt"), b"precious").unwrap();
        let mp = MountPoint::open(&root.join("u/sub/mnt")).unwrap();
        mp.prepare().unwrap();
        mp.switch(Path::new("/target-1")).unwrap();
        assert_eq!(
            std::fs::read_link(root.join("u/sub/mnt")).unwrap(),
            Path::new("/target-1")
        );
        // The owner of `u` swaps `sub` for a link to the victim.
        std::fs::rename(root.join("u/sub"), root.join("u/old")).unwrap();
        std::os::unix::fs::symlink(root.join("victim"), root.join("u/sub")).unwrap();
        mp.switch(Path::new("/target-2")).unwrap();
        assert_eq!(std::fs::read(root.join("victim/mnt")).unwrap(), b"precious");
        assert_eq!(
            std::fs::read_link(root.join("u/old/mnt")).unwrap(),
            Path::new("/target-2")
        );
        mp.remove().unwrap();
        assert!(root.join("victim/mnt").exists());
        assert!(std::fs::symlink_metadata(root.join("u/old/mnt")).is_err());
        // Opening it again by path: a link on the way is refused, and a parent that is
        // not the recorded one too.
        let e = MountPoint::open(&root.join("u/sub/mnt")).unwrap_err();
        assert!(matches!(e, MountPointError::Parent { .. }), "{e}");
        std::fs::remove_file(root.join("u/sub")).unwrap();
        std::fs::create_dir(root.join("u/sub")).unwrap();
        let e = MountPoint::reopen(&root.join("u/sub/mnt"), mp.id()).unwrap_err();
        assert!(matches!(e, MountPointError::Changed(_)), "{e}");
        assert!(MountPoint::reopen(&root.join("u/old/mnt"), mp.id()).is_ok());
    }

    pub(super) fn tmpfs_with(dir: &Path, file: &str) {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::write(dir.join("file"), file).unwrap();
    }

    /// A process in a mount namespace of its own (slave propagation, as a container's),
    /// that binds `bind` (if given) at `x` and answers each line it reads with what
    /// `x/file` and `p/file` hold.
    struct Namespace {
        child: std::process::Child,
        out: std::io::BufReader<std::process::ChildStdout>,
        input: std::process::ChildStdin,
    }

    impl Namespace {
        fn start(p: &Path, bind: Option<&Path>) -> Self {
            let bind = bind
                .map(|x| format!("mount --rbind {} {} && ", p.display(), x.display()))
                .unwrap_or_default();
            let x = bind.split(' ').nth(3).unwrap_or("/nonexistent").to_string();
            let script = format!(
                "{bind}echo ready && while read -r _; do echo \"$(cat {x}/file 2>/dev/null) $(cat {p}/file)\"; done",
                p = p.display(),
            );
            let mut child = std::process::Command::new("unshare")
                .args(["-m", "--propagation", "slave", "sh", "-c", &script])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let input = child.stdin.take().unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert_eq!(line.trim(), "ready");
            Namespace { child, out, input }
        }

        /// What the bind shows and what the path shows, in the namespace.
        fn sees(&mut self) -> String {
            use std::io::{BufRead, Write};
            writeln!(self.input).unwrap();
            let mut l = String::new();
            self.out.read_line(&mut l).unwrap();
            l.trim().to_string()
        }

        fn stop(self) {
            drop(self.input);
            let mut c = self.child;
            c.wait().unwrap();
        }
    }

    /// How many mounts are stacked at `p` in this namespace.
    fn depth(p: &Path) -> usize {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == p.to_str())
            .count()
    }

    #[test]
    fn binds_and_namespaces_see_every_switch_and_open_files_keep_theirs() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test mounts: run it as root"
        );
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let snaps: Vec<PathBuf> = ["one", "two", "three", "four", "five"]
            .iter()
            .map(|f| {
                let d = root.join(f);
                tmpfs_with(&d, f);
                d
            })
            .collect();
        let p = root.join("u/mnt");
        std::fs::create_dir_all(root.join("u")).unwrap();
        let mp = MountPoint::open(&p).unwrap();
        mp.prepare_base(0, true).unwrap();
        assert!(p.join(NOT_MOUNTED).exists());
        mp.show(&snaps[0]).unwrap();
        assert!(mp.shows(&snaps[0]));
        assert_eq!(std::fs::read_to_string(p.join("file")).unwrap(), "one");
        let held = std::fs::File::open(p.join("file")).unwrap();

        // A namespace that only inherited the path: a switch beneath reaches it, and the
        // path keeps its depth.
        let mut ns = Namespace::start(&p, None);
        assert_eq!(ns.sees(), "one");
        mp.show(&snaps[1]).unwrap();
        assert_eq!(std::fs::read_to_string(p.join("file")).unwrap(), "two");
        assert_eq!(ns.sees(), "two");
        assert_eq!(depth(&p), 2, "the base and one snapshot");

        // A container's bind of the path (rslave): it sees every switch.
        let x = root.join("ctr");
        std::fs::create_dir_all(&x).unwrap();
        let mut ctr = Namespace::start(&p, Some(&x));
        assert_eq!(ctr.sees(), "two two");
        mp.show(&snaps[2]).unwrap();
        assert_eq!(ctr.sees(), "three three");
        assert_eq!(ns.sees(), "three");
        mp.show(&snaps[3]).unwrap();
        assert_eq!(ctr.sees(), "four four");
        assert!(mp.shows(&snaps[3]) && !mp.shows(&snaps[2]));
        // Shown already: nothing changes.
        mp.show(&snaps[3]).unwrap();
        assert_eq!(ctr.sees(), "four four");
        ctr.stop();
        // Without the bind, switches no longer stack.
        let d = depth(&p);
        mp.show(&snaps[4]).unwrap();
        assert_eq!(depth(&p), d);
        assert_eq!(ns.sees(), "five");
        ns.stop();
        // A file opened before the switches still reads the old tree.
        assert_eq!(std::io::read_to_string(&held).unwrap(), "one");
        drop(held);
        mp.remove_mounts().unwrap();
        assert!(!p.exists());
        for s in &snaps {
            rustix::mount::unmount(s.as_path(), UnmountFlags::DETACH).unwrap();
        }
    }

    #[test]
    fn only_a_missing_path_or_an_empty_directory_takes_a_mount() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("full")).unwrap();
        std::fs::write(root.join("full/x"), b"x").unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("file"), b"x").unwrap();
        for (p, ok) in [
            ("full", false),
            ("file", false),
            ("empty", true),
            ("new", true),
        ] {
            let r = MountPoint::open(&root.join(p)).unwrap().prepare();
            assert_eq!(r.is_ok(), ok, "{p}: {r:?}");
        }
        assert!(!root.join("empty").exists());
        assert!(MountPoint::open(Path::new("relative/x")).is_err());
    }
}
