//! Snapshots of a mount, in either mode: overlays over metadata layers (one write per byte,
//! uncommitted changes are the upper layer) or copied trees (the fallback, with a scan).
//! Here: choosing the mode, building a snapshot (its layers, or its copied tree), mounting
//! it, and retiring the one it replaces. Sealing an upper layer is in `seal`, reading a
//! mount's state and changes in `local`.

use std::collections::BTreeMap;

use crate::overlay::{self, Overlay, layer};

use super::*;

/// How an agent makes snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotMode {
    /// Overlays where they can be mounted (found by trying), copies otherwise.
    #[default]
    Auto,
    /// Overlays only: the agent refuses to start without them.
    Overlay,
    /// Copies (reflinks where the file system makes them).
    Copy,
}

impl std::str::FromStr for SnapshotMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SnapshotMode::Auto),
            "overlay" => Ok(SnapshotMode::Overlay),
            "copy" => Ok(SnapshotMode::Copy),
            o => Err(format!("{o:?}: snapshots are auto, overlay or copy")),
        }
    }
}

/// Decides whether snapshots are overlays, by trying one under `data` unless `mode` says
/// copies.
pub(super) fn resolve_mode(data: &Path, mode: SnapshotMode) -> Result<bool, String> {
    if mode == SnapshotMode::Copy {
        return Ok(false);
    }
    match overlay::probe(&data.join("overlay-probe")) {
        Ok(()) => Ok(true),
        Err(e) if mode == SnapshotMode::Overlay => Err(format!(
            "overlay snapshots were asked for but cannot be mounted here: {e}"
        )),
        Err(e) => {
            info!("snapshots are copies: overlays cannot be mounted here ({e})");
            Ok(false)
        }
    }
}

/// Where built layers live in a volume's mounts directory. A layer is named by its path
/// relative to that directory: `layers/<name>` for built ones, `<snapshot>/upper` for the
/// upper layer of a snapshot frozen by a commit.
const LAYERS: &str = "layers";

pub(super) use super::trash::{TRASH, discard};

/// Layers stacked on one mount before a reload writes one full layer instead of a thin one.
pub const MAX_LAYERS: usize = 32;

/// What a snapshot is built from.
pub(super) enum Source<'a> {
    /// Copy mode: the whole manifest; the files in `reuse` are linked from `prev`'s
    /// snapshot.
    Copy {
        manifest: &'a Manifest,
        prev: Option<&'a MountRecord>,
        reuse: HashSet<VolPath>,
    },
    /// Overlay mode: the tree at `root`, as one full layer.
    Full { root: PageRef },
    /// Overlay mode: `prev`'s layers under a thin layer of `deltas`, which turn the tree
    /// its layers show into the tree at `root`.
    Thin {
        prev: &'a MountRecord,
        deltas: &'a [Delta],
        root: PageRef,
    },
}

/// Entries a full layer writes at a time.
const LAYER_PART: usize = 16_384;

/// A snapshot built, ready to be switched to.
#[derive(Debug)]
pub(super) struct Built {
    /// Its directory under the volume's mounts directory.
    pub(super) snapshot: String,
    /// Overlay mode: its metadata layers, topmost first.
    pub(super) layers: Vec<String>,
    /// Copy mode: stats of the files built.
    pub(super) stats: StatCache,
}

impl Inner {
    /// What a mount's host path points at.
    pub(super) fn link_target(&self, id: VolumeId, snapshot: &str) -> PathBuf {
        let dir = self.mounts_dir(id).join(snapshot);
        if self.overlays {
            dir.join("merged")
        } else {
            dir
        }
    }

    fn layers_dir(&self, id: VolumeId) -> PathBuf {
        self.mounts_dir(id).join(LAYERS)
    }

    /// Builds a snapshot of volume `id` at `version` from `source`: copied trees in copy
    /// mode; in overlay mode a thin layer over the previous layers (or one full layer once
    /// there are [`MAX_LAYERS`]) with a fresh upper layer, mounted.
    pub(super) async fn build(
        &self,
        id: VolumeId,
        version: u64,
        source: Source<'_>,
        read_only: bool,
        owner: u32,
    ) -> OpResult<Built> {
        let snapshot = format!("v{version}-{:08x}", rand::random::<u32>());
        let vol_dir = self.mounts_dir(id);
        std::fs::create_dir_all(&vol_dir).map_err(failed)?;
        let (part, mut layers) = match source {
            Source::Copy {
                manifest,
                prev,
                reuse,
            } => {
                let stats = self
                    .build_copy(&vol_dir, &snapshot, manifest, prev, reuse, owner)
                    .await?;
                return Ok(Built {
                    snapshot,
                    layers: Vec::new(),
                    stats,
                });
            }
            Source::Thin { prev, deltas, root } if self.base_layers(prev).len() < MAX_LAYERS => {
                let pages = self.pages.clone();
                let deltas = deltas.to_vec();
                let thin = self
                    .blocking(move || thin_layer(&deltas, &pages, &root))
                    .await?;
                (LayerPart::Thin(thin), self.base_layers(prev))
            }
            Source::Thin { root, .. } | Source::Full { root } => {
                (LayerPart::Full(root), Vec::new())
            }
        };
        let name = self.write_layer(id, &snapshot, part, owner).await?;
        let dir = vol_dir.join(&name);
        layers.insert(0, name);
        if let Err(e) = self.mount_overlay(id, &snapshot, &layers, read_only, owner) {
            // Leave nothing of a failed build behind (a full disk must not stay full).
            let _ = scan::remove_tree(&dir);
            let _ = scan::remove_tree(&vol_dir.join(&snapshot));
            return Err(e);
        }
        Ok(Built {
            snapshot,
            layers,
            stats: StatCache::new(),
        })
    }

    /// Writes a metadata layer named after `snapshot` under volume `id`'s mounts
    /// directory, durable before it returns (one syncfs, not one per file); its name
    /// relative to that directory. Nothing of it is left when it fails.
    async fn write_layer(
        &self,
        id: VolumeId,
        snapshot: &str,
        part: LayerPart,
        owner: u32,
    ) -> OpResult<String> {
        let name = format!("{LAYERS}/{snapshot}");
        let dir = self.mounts_dir(id).join(&name);
        std::fs::create_dir_all(self.layers_dir(id)).map_err(failed)?;
        let (d2, pages) = (dir.clone(), self.pages.clone());
        let written = tokio::task::spawn_blocking(move || {
            write_part(&d2, part, &pages, owner_of(owner))?;
            crate::store::sync_fs_of(&d2).map_err(|e| e.to_string())
        })
        .await
        .map_err(failed)?;
        if let Err(e) = written {
            let _ = scan::remove_tree(&dir);
            return Err(failed(format!("cannot write a snapshot layer: {e}")));
        }
        Ok(name)
    }

    /// One full layer of the tree at `root`, for volume `id` at `version` (a compaction):
    /// its name.
    pub(super) async fn full_layer(
        &self,
        id: VolumeId,
        version: u64,
        root: PageRef,
        owner: u32,
    ) -> OpResult<String> {
        let snapshot = format!("v{version}-{:08x}", rand::random::<u32>());
        std::fs::create_dir_all(self.mounts_dir(id)).map_err(failed)?;
        self.write_layer(id, &snapshot, LayerPart::Full(root), owner)
            .await
    }

    async fn build_copy(
        &self,
        vol_dir: &Path,
        snapshot: &str,
        manifest: &Manifest,
        prev: Option<&MountRecord>,
        reuse: HashSet<VolPath>,
        owner: u32,
    ) -> OpResult<StatCache> {
        let store = self.store.clone();
        let (m, dir) = (manifest.clone(), vol_dir.join(snapshot));
        let old = prev.map(|r| vol_dir.join(&r.snapshot));
        tokio::task::spawn_blocking(move || {
            let r = scan::build_snapshot(&dir, &m, &store, old.as_deref(), &reuse, owner_of(owner));
            if r.is_err() {
                // Leave nothing of a failed build behind (a full disk must not stay full).
                let _ = scan::remove_tree(&dir);
            }
            r
        })
        .await
        .map_err(failed)?
        .map_err(failed)
    }

    /// Mounts the overlay of a snapshot: its layers, and its upper layer (new, or kept from
    /// before a restart); a read-only mount of it when `read_only`. The mount's root (the
    /// upper layer's) belongs to `owner`, as every entry of its layers does.
    pub(super) fn mount_overlay(
        &self,
        id: VolumeId,
        snapshot: &str,
        layers: &[String],
        read_only: bool,
        owner: u32,
    ) -> OpResult<()> {
        let dir = self.mounts_dir(id).join(snapshot);
        for d in ["upper", "work", "merged"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| failed(format!("{}: {e}", p.display())))?;
        }
        if let Some(uid) = owner_of(owner) {
            let upper = dir.join("upper");
            std::os::unix::fs::lchown(&upper, Some(uid), None)
                .map_err(|e| failed(format!("{}: {e}", upper.display())))?;
        }
        let ov = Overlay {
            lowers: layers.iter().map(|l| self.mounts_dir(id).join(l)).collect(),
            data: self.store.data_layer(),
            upper: &dir.join("upper"),
            work: &dir.join("work"),
            read_only,
        };
        overlay::mount(&ov, &dir.join("merged"))
            .map_err(|e| failed(format!("cannot mount the snapshot overlay: {e}")))
    }

    /// After a switch: detaches and removes the old snapshot and the layers no mount uses.
    /// Copy mode: returns fresh stats of the files `reuse` shares with the removed tree.
    pub(super) async fn retire(
        &self,
        old: &MountRecord,
        new: &MountRecord,
        reuse: HashSet<VolPath>,
    ) -> OpResult<StatCache> {
        let old_dir = self.mounts_dir(old.id).join(&old.snapshot);
        if self.overlays {
            let merged = old_dir.join("merged");
            let keep: HashSet<&String> = new.layers.iter().collect();
            let vol = self.mounts_dir(old.id);
            let old_upper = format!("{}/upper", old.snapshot);
            // The old snapshot goes, but for its upper layer if a commit made it a layer.
            let old_parts: Vec<PathBuf> = if keep.contains(&old_upper) {
                vec![old_dir.join("work"), old_dir.join("merged")]
            } else {
                vec![old_dir]
            };
            let stale: Vec<PathBuf> = old
                .layers
                .iter()
                .filter(|l| !keep.contains(l))
                .map(|l| vol.join(l))
                .chain(old_parts)
                .collect();
            let trash = self.opts.data.join(TRASH);
            let name = old.name.clone();
            // In the background: the operation is done, and turning the old file system
            // read-only drops the kernel's cached entries of every file read through it.
            tokio::task::spawn_blocking(move || retire_overlay(&name, &merged, &trash, stale));
            return Ok(StatCache::new());
        }
        // Removing the old snapshot changes the change time of the files the new one shares
        // with it: refresh their stats, or the next scan would rehash them all. A tree a
        // process is still inside (a working directory, an open file) waits in the trash
        // instead, until nothing holds it (the next scan after it goes rehashes the files
        // they shared).
        let new_dir = self.mounts_dir(new.id).join(&new.snapshot);
        let trash = self.opts.data.join(TRASH);
        tokio::task::spawn_blocking(move || {
            if super::trash::in_use(&old_dir) {
                discard(&trash, vec![old_dir], None);
            } else if let Err(e) = scan::remove_tree(&old_dir) {
                warn!(path = %old_dir.display(), "cannot remove the old snapshot: {e}");
            }
            scan::restat(&new_dir, &reuse)
        })
        .await
        .map_err(failed)?
        .map_err(failed)
    }
}

/// Turns a replaced overlay read-only as a whole (so that a process still writing into it
/// through another mount of it, a container's bind mount, gets an error rather than losing
/// its writes with the old upper layer), detaches it, and moves its parts to the trash.
pub(super) fn retire_overlay(volume: &str, merged: &Path, trash: &Path, stale: Vec<PathBuf>) {
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

/// The user whose files a snapshot shows, when it is not root (whose they are anyway).
fn owner_of(owner: u32) -> Option<u32> {
    (owner != 0).then_some(owner)
}

/// What a layer holds: every entry of a tree, or the thin layer of a change.
enum LayerPart {
    Full(PageRef),
    Thin(Vec<(VolPath, Option<Entry>)>),
}

/// Writes a layer, a full one in parts as its entries are read.
fn write_part(
    dir: &Path,
    part: LayerPart,
    pages: &crate::store::Pages,
    owner: Option<u32>,
) -> Result<(), String> {
    let mut w = layer::LayerWriter::create(dir, owner).map_err(|e| e.to_string())?;
    match part {
        LayerPart::Thin(entries) => w.add(&entries).map_err(|e| e.to_string())?,
        LayerPart::Full(root) => {
            let mut chunk = Vec::with_capacity(LAYER_PART);
            let mut failed = None;
            tree::range(pages, &root, "", &mut |p, e| {
                chunk.push((p.clone(), Some(e.clone())));
                if chunk.len() == LAYER_PART {
                    if let Err(e) = w.add(&chunk) {
                        failed = Some(e.to_string());
                        return false;
                    }
                    chunk.clear();
                }
                true
            })
            .map_err(|e| e.to_string())?;
            if let Some(e) = failed {
                return Err(e);
            }
            w.add(&chunk).map_err(|e| e.to_string())?;
        }
    }
    w.finish().map_err(|e| e.to_string())
}

/// What turns the layers showing one tree into another (`deltas` between them, the new
/// tree at `new`): changed entries, whiteouts for removed ones (the topmost removed path
/// only), and the parent directories of both with their modes in the new tree.
fn thin_layer(
    deltas: &[Delta],
    pages: &crate::store::Pages,
    new: &PageRef,
) -> Result<Vec<(VolPath, Option<Entry>)>, tree::TreeError> {
    let mut out: BTreeMap<VolPath, Option<Entry>> = BTreeMap::new();
    // A change below a removed path or below a path that became a non-directory is hidden
    // by that one already.
    let hiding: HashSet<&VolPath> = deltas
        .iter()
        .filter(|d| d.new.as_ref().is_none_or(|e| !e.is_dir()))
        .map(|d| &d.path)
        .collect();
    for d in deltas {
        if d.path.ancestors().any(|a| hiding.contains(&a)) {
            continue;
        }
        for a in d.path.ancestors() {
            if out.contains_key(&a) {
                break;
            }
            if let Some(e) = tree::get(pages, new, &a)? {
                out.insert(a, Some(e));
            }
        }
        out.insert(d.path.clone(), d.new.clone());
    }
    Ok(out.into_iter().collect())
}
