//! Overlay mode: the mount path is a **mount point that stays** for the life of the mount.
//! - a *base*: the path's own directory bound onto itself and made shared, so that what is
//!   mounted on it propagates to every bind of the path made with slave propagation
//!   (Docker's `rslave`, Kubernetes' `HostToContainer`), in this namespace or another. The
//!   directory under it holds only [`NOT_MOUNTED`], which the path shows while no snapshot
//!   is mounted (after a reboot, until the agent is back);
//! - on the base, a clone of the current snapshot's overlay. A switch puts a clone of the
//!   new snapshot *beneath* the current one (`move_mount` with `MOVE_MOUNT_BENEATH`), then
//!   detaches the current one lazily: the path shows the old tree or the new one, never the
//!   base; a process inside the old one keeps it until it lets go.

use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::mount::{MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags};
use tracing::info;

use super::binds::bound_elsewhere;
use super::{MountPoint, MountPointError, io, is_mount_root, proc_fd};

/// The file a mount point holds under its mounts: what the path shows while no snapshot is
/// mounted there (after a reboot, until the agent has mounted the snapshot again).
pub const NOT_MOUNTED: &str = "VOLTOOL-NOT-MOUNTED";

/// Most mounts stacked at one path that [`MountPoint::remove_mounts`] detaches.
const MAX_STACK: usize = 64;

impl MountPoint {
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
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

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
}
