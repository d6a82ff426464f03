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
//! What sits at the path depends on the snapshot kind: a mount point that stays (overlay
//! mode, [`stack`]) or a symbolic link (copy mode, [`link`]).

mod binds;
mod link;
mod stack;

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, StatxAttributes, StatxFlags};
use serde::{Deserialize, Serialize};

pub use stack::NOT_MOUNTED;

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
        self.open_at(OFlags::RDONLY)
    }

    /// The path's top mount (or the directory itself), opened without following a link.
    fn open_top(&self) -> Result<OwnedFd, MountPointError> {
        self.open_at(OFlags::PATH)
    }

    /// The directory at the path, relative to the held parent, never through a link.
    fn open_at(&self, how: OFlags) -> Result<OwnedFd, MountPointError> {
        rustix::fs::openat(
            &self.parent,
            &self.name,
            how | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
