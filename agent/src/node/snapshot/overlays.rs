//! The overlay kind: a snapshot is an overlay of metadata layers over the store's blobs
//! (its data-only layer) with an upper layer for what is written through it, mounted under
//! its directory (`merged`) and shown at the mount path by the stable mount point.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tracing::{info, warn};
use voltool_protocol::VolPath;

use crate::overlay::{self, Overlay};
use crate::scan::StatCache;

use super::super::mount_point::{MountPoint, MountPointError};
use super::super::mounts::MountRecord;
use super::super::trash::discard;
use super::layers::{LayerPart, thin_layer, write_layer};
use super::{Built, LAZY_MARKER, Snapshots, Source, owner_of};

/// Overlay snapshots.
#[derive(Debug)]
pub(super) struct Overlays {
    pub(super) store: crate::store::Store,
    pub(super) pages: crate::store::Pages,
    pub(super) trash: PathBuf,
    /// Where the lazy data layer is mounted.
    pub(super) lazy: PathBuf,
}

impl Overlays {
    /// Mounts the overlay of snapshot `snapshot` in `vol` over `layers` (names relative to
    /// `vol`), with its upper layer (new, or kept from before a restart); read-only when
    /// `read_only`. The mount's root (the upper layer's) belongs to `owner`, as every entry
    /// of its layers does. Its data-only layer is the store's blob directory, or the lazy
    /// data layer for a snapshot marked lazy (`lazy` marks a new one so).
    fn mount(
        &self,
        vol: &Path,
        snapshot: &str,
        layers: &[String],
        read_only: bool,
        owner: u32,
        lazy: bool,
    ) -> Result<(), String> {
        let dir = vol.join(snapshot);
        for d in ["upper", "work", "merged"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        let marker = dir.join(LAZY_MARKER);
        if lazy {
            std::fs::write(&marker, b"").map_err(|e| format!("{}: {e}", marker.display()))?;
        }
        let data = if marker.exists() {
            self.lazy.as_path()
        } else {
            self.store.data_layer()
        };
        if let Some(uid) = owner_of(owner) {
            let upper = dir.join("upper");
            std::os::unix::fs::lchown(&upper, Some(uid), None)
                .map_err(|e| format!("{}: {e}", upper.display()))?;
        }
        let ov = Overlay {
            lowers: layers.iter().map(|l| vol.join(l)).collect(),
            data,
            upper: &dir.join("upper"),
            work: &dir.join("work"),
            read_only,
        };
        overlay::mount(&ov, &dir.join("merged"))
            .map_err(|e| format!("cannot mount the snapshot overlay: {e}"))
    }
}

impl Snapshots for Overlays {
    fn name(&self) -> &'static str {
        "overlay"
    }

    fn layered(&self) -> bool {
        true
    }

    fn start(&self, data: &Path) -> Result<(), String> {
        // The whole data directory, so that sealed upper layers (under mounts/) can be
        // hard-linked into the store: links never cross mount points.
        overlay::make_private_root(data).map_err(|e| e.to_string())
    }

    fn data_mode(&self) -> u32 {
        // Snapshots are mounted at their paths: nobody else enters the data directory.
        0o700
    }

    fn view(&self, dir: &Path) -> PathBuf {
        dir.join("merged")
    }

    fn build(
        &self,
        vol: &Path,
        snapshot: &str,
        source: Source,
        read_only: bool,
        owner: u32,
        lazy: bool,
    ) -> Result<Built, String> {
        let (part, mut layers) = match source {
            Source::Over { layers } => {
                return match self.mount(vol, snapshot, &layers, read_only, owner, lazy) {
                    Ok(()) => Ok(Built::layers(snapshot, layers)),
                    Err(e) => {
                        let _ = crate::scan::remove_tree(&vol.join(snapshot));
                        Err(e)
                    }
                };
            }
            Source::Thin {
                under,
                deltas,
                root,
            } => {
                let thin = thin_layer(&deltas, &self.pages, &root).map_err(|e| e.to_string())?;
                (LayerPart::Thin(thin), under)
            }
            Source::Full { root } => (LayerPart::Full(root), Vec::new()),
            Source::Copy { .. } => return Err("overlay snapshots are built from layers".into()),
        };
        let name = write_layer(vol, snapshot, part, &self.pages, owner_of(owner))?;
        layers.insert(0, name.clone());
        if let Err(e) = self.mount(vol, snapshot, &layers, read_only, owner, lazy) {
            // Leave nothing of a failed build behind (a full disk must not stay full).
            let _ = crate::scan::remove_tree(&vol.join(&name));
            let _ = crate::scan::remove_tree(&vol.join(snapshot));
            return Err(e);
        }
        Ok(Built::layers(snapshot, layers))
    }

    fn prepare(&self, mp: &MountPoint, owner: u32, fresh: bool) -> Result<(), MountPointError> {
        mp.prepare_base(owner, fresh)
    }

    fn show(&self, mp: &MountPoint, view: &Path) -> Result<(), MountPointError> {
        mp.show(view)
    }

    fn shows(&self, mp: &MountPoint, view: &Path) -> bool {
        mp.shows(view)
    }

    fn remove(&self, mp: &MountPoint) -> Result<(), MountPointError> {
        mp.remove_mounts()
    }

    fn freeze(&self, view: &Path) -> std::io::Result<bool> {
        // The whole file system: the kernel then counts writers through every mount of it
        // (the mount point, binds of it, copies in other namespaces).
        overlay::freeze(view)
    }

    fn thaw(&self, view: &Path) -> std::io::Result<()> {
        overlay::thaw(view)
    }

    fn revive(&self, vol: &Path, rec: &MountRecord) -> Result<(), String> {
        let dir = vol.join(&rec.snapshot);
        let view = self.view(&dir);
        let lazy = dir.join(LAZY_MARKER).exists();
        if lazy && overlay::is_mounted(&view) {
            // Over the lazy data layer of the agent before: that one is gone (its reads
            // fail), the overlay is mounted again over this agent's. Files open in the old
            // one keep failing; new opens work.
            info!(
                volume = rec.name,
                "mounting the lazy snapshot again over the lazy data layer"
            );
            overlay::unmount_lazy(&view).map_err(|e| format!("{}: {e}", view.display()))?;
        }
        if !overlay::is_mounted(&view) {
            info!(volume = rec.name, "mounting the recorded snapshot again");
            self.mount(
                vol,
                &rec.snapshot,
                &rec.layers,
                rec.read_only,
                rec.owner,
                false,
            )?;
        }
        Ok(())
    }

    fn unfreeze(&self, view: &Path, rec: &MountRecord) -> Result<(), String> {
        if overlay::is_frozen(view) {
            // Frozen for a switch (a reload, a compaction, or a commit before its seal
            // began) that never happened.
            info!(
                volume = rec.name,
                "making the mount writable again: a switch stopped before it was made"
            );
            overlay::thaw(view).map_err(|e| e.to_string())?;
        }
        if !rec.read_only && overlay::is_mount_ro(view) {
            // An older voltool froze single mounts.
            overlay::thaw_mount(view).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn retire(
        &self,
        vol: &Path,
        old: &MountRecord,
        new: Option<&MountRecord>,
        _reuse: &HashSet<VolPath>,
    ) -> Result<StatCache, String> {
        let old_dir = vol.join(&old.snapshot);
        let keep: HashSet<&String> = new.iter().flat_map(|n| &n.layers).collect();
        let old_upper = format!("{}/upper", old.snapshot);
        // The old snapshot goes, but for its upper layer if a commit made it a layer.
        let old_parts: Vec<PathBuf> = if keep.contains(&old_upper) {
            vec![old_dir.join("work"), old_dir.join("merged")]
        } else {
            vec![old_dir.clone()]
        };
        let stale: Vec<PathBuf> = old
            .layers
            .iter()
            .filter(|l| !keep.contains(l))
            .map(|l| vol.join(l))
            .chain(old_parts)
            .collect();
        let (name, merged, trash) = (old.name.clone(), self.view(&old_dir), self.trash.clone());
        // In the background: the operation is done, and turning the old file system
        // read-only drops the kernel's cached entries of every file read through it.
        tokio::task::spawn_blocking(move || retire_overlay(&name, &merged, &trash, stale));
        Ok(StatCache::new())
    }
}

/// Turns a replaced overlay read-only as a whole (so that a process still writing into it
/// through another mount of it, a container's bind mount, gets an error rather than losing
/// its writes with the old upper layer), detaches it, and moves its parts to the trash.
fn retire_overlay(volume: &str, merged: &Path, trash: &Path, stale: Vec<PathBuf>) {
    // Its device names it in the trash: its parts wait while any process or mount (a
    // private bind of the mount path, in any namespace) still holds the overlay.
    let dev = overlay::is_mounted(merged)
        .then(|| std::fs::metadata(merged).ok())
        .flatten()
        .map(|m| std::os::unix::fs::MetadataExt::dev(&m));
    if overlay::is_mounted(merged) {
        match overlay::freeze(merged) {
            Ok(true) => {}
            Ok(false) => warn!(
                volume,
                "a file in the replaced snapshot is still open for writing (through another mount of it); what is written there is not committed"
            ),
            Err(e) => warn!(volume, "cannot make the replaced snapshot read-only: {e}"),
        }
        if let Err(e) = overlay::unmount_lazy(merged) {
            warn!("cannot detach the old snapshot: {e}");
        }
    }
    discard(trash, stale, dev);
}
