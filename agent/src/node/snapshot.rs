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

/// A file in a snapshot's directory while its upper layer is being sealed: a restart that
/// finds it seals the upper again instead of making it writable (its files may already be
/// linked into the store).
pub(super) const SEALING: &str = "sealing";

/// Where retired snapshots and layers wait before they are removed: a process may still be
/// inside an old overlay (detached lazily), and its layers must not change under it.
pub(super) const TRASH: &str = "trash";
/// How long retired snapshots and layers wait in the trash.
pub(super) const TRASH_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Moves `paths` into the trash, and removes from it what has waited [`TRASH_AGE`].
pub(super) fn discard(trash: &Path, paths: Vec<PathBuf>) {
    use std::os::unix::fs::MetadataExt;
    let _ = std::fs::create_dir_all(trash);
    for p in paths {
        let to = trash.join(format!("{:016x}", rand::random::<u64>()));
        if std::fs::rename(&p, &to).is_err() {
            let _ = scan::remove_tree(&p);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for e in std::fs::read_dir(trash).into_iter().flatten().flatten() {
        // The change time is when it was moved here.
        let age = e.metadata().map_or(i64::MAX, |m| now - m.ctime());
        if age >= TRASH_AGE.as_secs() as i64 {
            let _ = scan::remove_tree(&e.path());
        }
    }
}

/// Layers stacked on one mount before a reload writes one full layer instead of a thin one.
pub const MAX_LAYERS: usize = 32;

/// What [`Inner::local_state`] does with files written through a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Take {
    /// Hash them (to find uncommitted changes).
    Hash,
    /// Copy them into the store (to commit them while the mount stays writable).
    Copy,
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
        // The layer is durable before a record names it (one syncfs, not one per file).
        let written = tokio::task::spawn_blocking(move || {
            layer::write_layer(&d2, &entries)?;
            crate::store::sync_fs_of(&d2)
        })
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

    /// Seals a mount's upper layer (overlay mode): freezes the mount read-only (the kernel
    /// refuses while a file in it is open for writing: then `None`), takes the files
    /// written through it into the store by hard links, and switches the mount to a new
    /// snapshot whose top layer is that upper and whose upper is fresh. The mount is
    /// writable again at once, and what it held is from then on in its lower layers
    /// (`lower_manifest`), where a commit finds it as a difference from its base. Once
    /// files are linked the old mount never becomes writable again: a switch that fails
    /// takes them back out of the store first. Returns the new record and the mount's
    /// state as sealed (its manifest and the bytes read), which a commit takes as is.
    pub(super) async fn seal(
        &self,
        rec: &MountRecord,
    ) -> OpResult<Option<(MountRecord, scan::Scan)>> {
        let merged = self.link_target(rec.id, &rec.snapshot);
        if !overlay::freeze(&merged).map_err(failed)? {
            return Ok(None);
        }
        let snap_dir = self.mounts_dir(rec.id).join(&rec.snapshot);
        let marker = snap_dir.join(SEALING);
        let r = self.seal_frozen(rec, &marker).await;
        if r.as_ref().is_ok_and(|r| r.0.snapshot == rec.snapshot) || r.is_err() {
            // Nothing was sealed (or it failed before any link): writable again.
            let _ = overlay::thaw(&merged);
        }
        let _ = std::fs::remove_file(&marker);
        r.map(Some)
    }

    async fn seal_frozen(
        &self,
        rec: &MountRecord,
        marker: &Path,
    ) -> OpResult<(MountRecord, scan::Scan)> {
        let base = self.read_manifest(rec.manifest).await?;
        let lowers = self.read_manifest(rec.lower_manifest).await?;
        let cache = self.stats(&rec.name)?;
        let snap_dir = self.mounts_dir(rec.id).join(&rec.snapshot);
        std::fs::write(marker, b"").map_err(failed)?;
        let (store, upper_dir, lowers2) = (self.store.clone(), snap_dir.join("upper"), lowers);
        let (state, linked, entries, hashed) = tokio::task::spawn_blocking(move || {
            let batch = store.batch();
            let up =
                upper::read_upper(&upper_dir, &lowers2, &base, &cache, ScanMode::Link(&batch))?;
            let mut state = lowers2;
            state.apply(&up.changes)?;
            let linked = batch.finish()?;
            Ok::<_, scan::ScanError>((state, linked, up.entries, up.hashed_bytes))
        })
        .await
        .map_err(failed)?
        .map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
        self.crash_point("commit-sealing");
        let sealed = |manifest| scan::Scan {
            manifest,
            stats: StatCache::new(),
            hashed_bytes: hashed,
        };
        if entries == 0 {
            // Nothing was written: the mount stays as it is.
            return Ok((rec.clone(), sealed(state)));
        }
        let state_hash = self.store.import_bytes(&state.encode()).map_err(failed)?;
        let mut layers = rec.layers.clone();
        layers.insert(0, format!("{}/upper", rec.snapshot));
        // Its files are now the store's too: nobody but the agent reaches them by this path
        // any more (the kernel reads lower layers with the mounter's rights).
        let upper = snap_dir.join("upper");
        let mode = std::fs::metadata(&upper).map_err(failed)?.permissions();
        std::fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(failed)?;
        let switched = if layers.len() > MAX_LAYERS {
            self.rebuild(rec, &state, state_hash).await
        } else {
            self.switch_to(rec, layers, state_hash).await
        };
        if switched.is_err() {
            let _ = std::fs::set_permissions(&upper, mode);
            let store = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for h in linked {
                    let _ = store.remove(&h);
                }
            })
            .await;
        }
        switched.map(|r| (r, sealed(state)))
    }

    /// Mounts a new snapshot over `layers` with a fresh upper, records it and switches the
    /// mount to it; retires the old one.
    async fn switch_to(
        &self,
        rec: &MountRecord,
        layers: Vec<String>,
        lowers: Hash,
    ) -> OpResult<MountRecord> {
        let snapshot = format!("v{}-{:08x}", rec.version, rand::random::<u32>());
        // What the layers hold is durable before a record names them.
        crate::store::sync_fs_of(&self.mounts_dir(rec.id)).map_err(failed)?;
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
        Ok(new)
    }

    /// Like [`Self::switch_to`], over one full layer of `state` (the stack grew too deep).
    async fn rebuild(
        &self,
        rec: &MountRecord,
        state: &Manifest,
        hash: Hash,
    ) -> OpResult<MountRecord> {
        let built = self
            .build(rec.id, rec.version, state, None, HashSet::new())
            .await?;
        let new = MountRecord {
            snapshot: built.snapshot,
            layers: built.layers,
            lower_manifest: hash,
            ..rec.clone()
        };
        self.put_mount(&new, &StatCache::new())?;
        switch_link(&new.path, &self.link_target(new.id, &new.snapshot))?;
        self.retire(rec, &new, HashSet::new()).await?;
        Ok(new)
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
        mark_unmounted(&dir.join("merged")).map_err(failed)?;
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
            let trash = self.opts.data.join(TRASH);
            tokio::task::spawn_blocking(move || discard(&trash, stale))
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

/// The file a mount point holds under its overlay: after a reboot, until the agent has
/// mounted the snapshot again, a user's path shows this instead of an empty directory.
pub const NOT_MOUNTED: &str = "VOLTOOL-NOT-MOUNTED";

/// Puts [`NOT_MOUNTED`] in a mount point that does not hold it yet, and makes the mount
/// point read-only for everyone but root.
fn mark_unmounted(mount_point: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let marker = mount_point.join(NOT_MOUNTED);
    if !marker.exists() {
        std::fs::write(
            &marker,
            "This volume is not mounted: its voltool agent has not started (yet).\n",
        )?;
        std::fs::set_permissions(mount_point, std::fs::Permissions::from_mode(0o555))?;
    }
    Ok(())
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
