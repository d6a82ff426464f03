//! A mount's host path, handled through its parent directory held open.
//!
//! The agent runs as root; the directories above a mount path may belong to a user who can
//! swap one for a symbolic link at any moment. Every commit, reload, compaction, restart and
//! unmount changes what sits at the mount path, so none of them may resolve that path again:
//! the parent is opened once, refusing any symbolic link on the way (`openat2` with
//! `RESOLVE_NO_SYMLINKS`), kept open, and recorded by (device, inode, owner). What sits at
//! the path is created, switched and removed only relative to that descriptor (`symlinkat`,
//! `renameat`, `unlinkat`), so a swapped parent can redirect nothing: the mount stays where
//! the directory went. After a restart the parent is opened again by path and compared with
//! the record; a parent that changed is refused, and the mount is left alone.

use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};

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

    /// Makes room for a new mount: nothing may stand at the path but an empty directory,
    /// which is removed.
    pub(crate) fn prepare(&self) -> Result<(), MountPointError> {
        let st = match rustix::fs::statat(&self.parent, &self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io(&self.path)(e)),
        };
        let exists = || MountPointError::Exists(self.path.display().to_string());
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(exists());
        }
        let dir = rustix::fs::openat(
            &self.parent,
            &self.name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io(&self.path))?;
        let empty = rustix::fs::Dir::read_from(&dir)
            .map_err(io(&self.path))?
            .filter_map(Result::ok)
            .all(|e| matches!(e.file_name().to_bytes(), b"." | b".."));
        if !empty {
            return Err(exists());
        }
        rustix::fs::unlinkat(&self.parent, &self.name, AtFlags::REMOVEDIR).map_err(io(&self.path))
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
