//! Snapshots of a mount, in either mode: overlays over metadata layers (one write per byte,
//! uncommitted changes are the upper layer) or copied trees (the fallback, with a scan).

use std::collections::BTreeMap;

use crate::overlay::{self, Overlay, layer, upper};

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

/// Layers stacked on one mount before a reload writes one full layer instead of a thin one.
pub const MAX_LAYERS: usize = 32;

/// What [`Inner::local_state`] does with files written through a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Take {
    /// Hash them (to find uncommitted changes).
    Hash,
    /// Copy them into the store (to commit them while the mount stays writable).
    Copy,
    /// Hard-link them into the store (to commit a frozen upper layer: one write per byte).
    Link,
}

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

    /// Builds a snapshot of `new` for volume `id`. Overlay mode: the layers of `prev` (whose
    /// layers show `prev_lowers`) under a thin layer of what differs, or one full layer,
    /// with a fresh upper layer, mounted. Copy mode: a copied tree, the files in `reuse`
    /// hard-linked from `prev`'s snapshot.
    pub(super) async fn build(
        &self,
        id: VolumeId,
        version: u64,
        new: &Manifest,
        prev: Option<(&MountRecord, &Manifest)>,
        reuse: HashSet<VolPath>,
    ) -> OpResult<Built> {
        let snapshot = format!("v{version}-{:08x}", rand::random::<u32>());
        let vol_dir = self.mounts_dir(id);
        std::fs::create_dir_all(&vol_dir).map_err(failed)?;
        if !self.overlays {
            let store = self.store.clone();
            let (m, dir) = (new.clone(), vol_dir.join(&snapshot));
            let old = prev.map(|(r, _)| vol_dir.join(&r.snapshot));
            let stats = tokio::task::spawn_blocking(move || {
                let r = scan::build_snapshot(&dir, &m, &store, old.as_deref(), &reuse);
                if r.is_err() {
                    // Leave nothing of a failed build behind (a full disk must not stay full).
                    let _ = scan::remove_tree(&dir);
                }
                r
            })
            .await
            .map_err(failed)?
            .map_err(failed)?;
            return Ok(Built {
                snapshot,
                layers: Vec::new(),
                stats,
            });
        }
        let (entries, mut layers) = match prev {
            Some((r, lowers)) if r.layers.len() < MAX_LAYERS => {
                (thin_layer(lowers, new), r.layers.clone())
            }
            _ => (full_layer(new), Vec::new()),
        };
        let name = format!("{LAYERS}/{snapshot}");
        let dir = vol_dir.join(&name);
        std::fs::create_dir_all(self.layers_dir(id)).map_err(failed)?;
        let d2 = dir.clone();
        let written = tokio::task::spawn_blocking(move || layer::write_layer(&d2, &entries))
            .await
            .map_err(failed)?;
        layers.insert(0, name);
        let mounted = match written {
            Ok(()) => self.mount_overlay(id, &snapshot, &layers),
            Err(e) => Err(failed(format!("cannot write a snapshot layer: {e}"))),
        };
        if let Err(e) = mounted {
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

    /// After a commit that froze the mount: the frozen upper layer becomes the top layer of
    /// a new snapshot with a fresh upper, and the mount switches to it, so the next commit
    /// reads only what is written from now on. `lowers` is the manifest the new layers show.
    pub(super) async fn switch_after_commit(
        &self,
        rec: &MountRecord,
        lowers: Hash,
    ) -> OpResult<()> {
        let snapshot = format!("v{}-{:08x}", rec.version, rand::random::<u32>());
        let mut layers = rec.layers.clone();
        layers.insert(0, format!("{}/upper", rec.snapshot));
        if let Err(e) = self.mount_overlay(rec.id, &snapshot, &layers) {
            let _ = scan::remove_tree(&self.mounts_dir(rec.id).join(&snapshot));
            return Err(e);
        }
        let new = MountRecord {
            snapshot,
            layers,
            lower_manifest: lowers,
            ..rec.clone()
        };
        self.put_mount(&new, &StatCache::new())?;
        switch_link(&new.path, &self.link_target(new.id, &new.snapshot))?;
        self.retire(rec, &new, HashSet::new()).await?;
        Ok(())
    }

    /// Mounts the overlay of a snapshot: its layers, and its upper layer (new, or kept from
    /// before a restart).
    pub(super) fn mount_overlay(
        &self,
        id: VolumeId,
        snapshot: &str,
        layers: &[String],
    ) -> OpResult<()> {
        let dir = self.mounts_dir(id).join(snapshot);
        for d in ["upper", "work", "merged"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| failed(format!("{}: {e}", p.display())))?;
        }
        let data = self.store.blobs_dir();
        let ov = Overlay {
            lowers: layers.iter().map(|l| self.mounts_dir(id).join(l)).collect(),
            data: &data,
            upper: &dir.join("upper"),
            work: &dir.join("work"),
            read_only: false,
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
            if overlay::is_mounted(&merged)
                && let Err(e) = overlay::unmount_lazy(&merged)
            {
                warn!("cannot detach the old snapshot: {e}");
            }
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
            tokio::task::spawn_blocking(move || {
                for p in stale {
                    let _ = scan::remove_tree(&p);
                }
            })
            .await
            .map_err(failed)?;
            return Ok(StatCache::new());
        }
        // Removing the old snapshot changes the change time of the files the new one shares
        // with it: refresh their stats, or the next scan would rehash them all.
        let new_dir = self.mounts_dir(new.id).join(&new.snapshot);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = scan::remove_tree(&old_dir) {
                warn!(path = %old_dir.display(), "cannot remove the old snapshot: {e}");
            }
            scan::restat(&new_dir, &reuse)
        })
        .await
        .map_err(failed)?
        .map_err(failed)
    }

    /// The mount's local state: overlay mode, the manifest its layers show with the upper
    /// layer's changes; copy mode, a scan of its tree against `base` and the stat cache.
    /// Files written through the mount are hashed, or taken into the store (durable
    /// before this returns), as `take` says.
    pub(super) async fn local_state(
        &self,
        rec: &MountRecord,
        base: &Manifest,
        take: Take,
    ) -> OpResult<scan::Scan> {
        let cache = self.stats(&rec.name)?;
        let dir = self.mounts_dir(rec.id).join(&rec.snapshot);
        let lowers = if self.overlays {
            Some(self.read_manifest(rec.lower_manifest).await?)
        } else {
            None
        };
        let (base, store) = (base.clone(), self.store.clone());
        tokio::task::spawn_blocking(move || {
            let batch = store.batch();
            let how = match take {
                Take::Hash => ScanMode::HashOnly,
                Take::Copy => ScanMode::Import(&batch),
                Take::Link => ScanMode::Link(&batch),
            };
            let state = match lowers {
                None => scan::scan(&dir, &base, &cache, how)?,
                Some(lowers) => {
                    let up = upper::read_upper(&dir.join("upper"), &lowers, &base, &cache, how)?;
                    let mut manifest = lowers;
                    manifest.apply(&up.changes)?;
                    scan::Scan {
                        manifest,
                        stats: up.stats,
                        hashed_bytes: up.hashed_bytes,
                    }
                }
            };
            batch.finish()?;
            Ok::<_, scan::ScanError>(state)
        })
        .await
        .map_err(failed)?
        .map_err(|e| err(ErrorCode::Invalid, format!("cannot read the mount: {e}")))
    }
}

/// Every entry of a manifest, as one layer.
fn full_layer(m: &Manifest) -> BTreeMap<VolPath, Option<Entry>> {
    m.entries()
        .iter()
        .map(|(p, e)| (p.clone(), Some(e.clone())))
        .collect()
}

/// What turns the layers showing `lowers` into `new`: changed entries, whiteouts for
/// removed ones (the topmost removed path only), and the parent directories of both with
/// their modes in `new`.
fn thin_layer(lowers: &Manifest, new: &Manifest) -> BTreeMap<VolPath, Option<Entry>> {
    let mut out: BTreeMap<VolPath, Option<Entry>> = BTreeMap::new();
    let changes = lowers.diff(new);
    // A change below a removed path or below a path that became a non-directory is hidden
    // by that one already.
    let hiding: HashSet<VolPath> = changes
        .iter()
        .filter(|c| c.entry.as_ref().is_none_or(|e| !e.is_dir()))
        .map(|c| c.path.clone())
        .collect();
    for c in &changes {
        if c.path.ancestors().any(|a| hiding.contains(&a)) {
            continue;
        }
        for a in c.path.ancestors() {
            if let Some(e) = new.get(&a) {
                out.entry(a).or_insert_with(|| Some(e.clone()));
            }
        }
        out.insert(c.path.clone(), c.entry.clone());
    }
    out
}
