//! Copy mode: the mount path is a symbolic link to the snapshot's directory, switched by
//! renaming a new link over it, all relative to the held parent.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType};

use super::{MountPoint, MountPointError, io};

impl MountPoint {
    /// Makes room for a new mount's link (copy mode): nothing may stand at the path but an
    /// empty directory, which is removed.
    pub(crate) fn prepare(&self) -> Result<(), MountPointError> {
        if self.free()? {
            rustix::fs::unlinkat(&self.parent, &self.name, AtFlags::REMOVEDIR)
                .map_err(io(&self.path))?;
        }
        Ok(())
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
}
