//! The copy kind (where overlays cannot be mounted): a snapshot is a whole tree of files
//! (reflinks where the file system makes them; unchanged files linked from the snapshot
//! before), and the mount path is a symbolic link to it, switched by a rename. Its changes
//! are found by a scan against the stat cache.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tracing::warn;
use voltool_protocol::VolPath;

use crate::scan::{self, StatCache};

use super::super::mount_point::{MountPoint, MountPointError};
use super::super::mounts::MountRecord;
use super::super::trash::{discard, in_use};
use super::{Built, LAZY_NEEDS_OVERLAYS, Snapshots, Source, owner_of};

/// Copied snapshots.
#[derive(Debug)]
pub(super) struct Copies {
    pub(super) store: crate::store::Store,
    pub(super) trash: PathBuf,
}

impl Snapshots for Copies {
    fn name(&self) -> &'static str {
        "copy"
    }

    fn layered(&self) -> bool {
        false
    }

    fn start(&self, _data: &Path) -> Result<(), String> {
        Ok(())
    }

    fn data_mode(&self) -> u32 {
        // Mounts are links into it, which others may follow (not list).
        0o711
    }

    fn view(&self, dir: &Path) -> PathBuf {
        dir.to_path_buf()
    }

    fn build(
        &self,
        vol: &Path,
        snapshot: &str,
        source: Source,
        _read_only: bool,
        owner: u32,
        lazy: bool,
    ) -> Result<Built, String> {
        if lazy {
            return Err(LAZY_NEEDS_OVERLAYS.into());
        }
        let Source::Copy {
            manifest,
            prev,
            reuse,
        } = source
        else {
            return Err("copied snapshots are built from a whole manifest".into());
        };
        let dir = vol.join(snapshot);
        let old = prev.map(|p| vol.join(p));
        let stats = scan::build_snapshot(
            &dir,
            &manifest,
            &self.store,
            old.as_deref(),
            &reuse,
            owner_of(owner),
        );
        match stats {
            Ok(stats) => Ok(Built {
                snapshot: snapshot.to_string(),
                layers: Vec::new(),
                stats,
            }),
            Err(e) => {
                // Leave nothing of a failed build behind (a full disk must not stay full).
                let _ = scan::remove_tree(&dir);
                Err(e.to_string())
            }
        }
    }

    fn prepare(&self, mp: &MountPoint, _owner: u32, fresh: bool) -> Result<(), MountPointError> {
        // Room for a new mount's link; after a restart the link is there already.
        if fresh { mp.prepare() } else { Ok(()) }
    }

    fn show(&self, mp: &MountPoint, view: &Path) -> Result<(), MountPointError> {
        mp.switch(view)
    }

    fn shows(&self, mp: &MountPoint, view: &Path) -> bool {
        mp.read_link().as_deref() == Some(view)
    }

    fn remove(&self, mp: &MountPoint) -> Result<(), MountPointError> {
        mp.remove()
    }

    fn freeze(&self, _view: &Path) -> std::io::Result<bool> {
        // A copied tree is read by a scan, not frozen: what is written after the scan
        // stays in the old tree (README says so).
        Ok(true)
    }

    fn thaw(&self, _view: &Path) -> std::io::Result<()> {
        Ok(())
    }

    fn revive(&self, _vol: &Path, _rec: &MountRecord) -> Result<(), String> {
        Ok(())
    }

    fn unfreeze(&self, _view: &Path, _rec: &MountRecord) -> Result<(), String> {
        Ok(())
    }

    fn retire(
        &self,
        vol: &Path,
        old: &MountRecord,
        new: Option<&MountRecord>,
        reuse: &HashSet<VolPath>,
    ) -> Result<StatCache, String> {
        let old_dir = vol.join(&old.snapshot);
        let Some(new) = new else {
            discard(&self.trash, vec![old_dir], None);
            return Ok(StatCache::new());
        };
        // Removing the old snapshot changes the change time of the files the new one shares
        // with it: refresh their stats, or the next scan would rehash them all. A tree a
        // process is still inside (a working directory, an open file) waits in the trash
        // instead, until nothing holds it (the next scan after it goes rehashes the files
        // they shared).
        if in_use(&old_dir) {
            discard(&self.trash, vec![old_dir], None);
        } else if let Err(e) = scan::remove_tree(&old_dir) {
            warn!(path = %old_dir.display(), "cannot remove the old snapshot: {e}");
        }
        scan::restat(&vol.join(&new.snapshot), reuse).map_err(|e| e.to_string())
    }
}
